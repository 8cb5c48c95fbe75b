//! The control socket (one JSON request line, one JSON response line per connection) and the
//! optional plain-HTTP `/metrics` endpoint.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use fetch_api::{Error as ApiError, Request, Response};
use tracing::{debug, warn};

use crate::daemon::Daemon;

/// Answers control connections on `listener` until the process ends, one thread per connection
/// (a `Wait` may block for long).
pub fn serve_control(daemon: Arc<Daemon>, listener: UnixListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(conn) => {
                let daemon = daemon.clone();
                let _ = std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || handle_control(&daemon, conn));
            }
            Err(e) => {
                warn!(error = %e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn handle_control(daemon: &Arc<Daemon>, mut conn: UnixStream) {
    // A client that connects and says nothing must not keep a thread forever.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let line = match fetch_api::read_line(&conn) {
        Ok(l) => l,
        Err(e) => {
            debug!(error = %e, "control connection without a request");
            return;
        }
    };
    let answer = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            debug!(?request, "control request");
            dispatch(daemon, request)
        }
        Err(e) => Response::line::<()>(&Err(ApiError::invalid(format!("malformed request: {e}")))),
    };
    let _ = conn.set_write_timeout(Some(Duration::from_secs(30)));
    if let Err(e) = conn.write_all(answer.as_bytes()) {
        debug!(error = %e, "cannot answer a control request");
    }
}

/// Runs one request; returns its response line.
pub fn dispatch(daemon: &Arc<Daemon>, request: Request) -> String {
    match request {
        Request::Ping => Response::line(&Ok(daemon.ping())),
        Request::Register(spec) => Response::line(&daemon.register(spec)),
        Request::Status { digest } => Response::line(&daemon.status(&digest)),
        Request::List => Response::line(&Ok(daemon.list())),
        Request::Unregister { digest } => Response::line(&daemon.unregister(&digest)),
        Request::Metrics => Response::line(&Ok(daemon.render_metrics())),
        Request::TraceStart => {
            daemon.trace_start();
            Response::line(&Ok(()))
        }
        Request::TraceStop => Response::line(&daemon.trace_stop()),
        Request::Wait { digest, timeout_ms } => {
            Response::line(&daemon.wait(&digest, Duration::from_millis(timeout_ms)))
        }
    }
}

/// Serves `GET /metrics` on `listener` until the process ends.
pub fn serve_metrics(daemon: Arc<Daemon>, listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let daemon = daemon.clone();
        let _ = std::thread::Builder::new().name("metrics-http".into()).spawn(move || {
            if let Err(e) = handle_http(&daemon, conn) {
                debug!(error = %e, "metrics connection failed");
            }
        });
    }
}

fn handle_http(daemon: &Daemon, conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The headers are read and ignored: nothing in them changes the answer.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim_end().is_empty() {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", crate::metrics::CONTENT_TYPE, daemon.render_metrics()),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_string(),
        ),
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}
