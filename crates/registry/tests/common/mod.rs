//! Test helpers: the shared docker-registry fixture (test-support), and a tiny scripted HTTP server for what a real
//! registry will not do on demand (token auth, ignoring Range, failing).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use registry::{Client, ClientOptions};

/// The shared docker-registry fixture (test-support), with names in it as the client's own types.
pub use test_support::registry::Registry;

/// Repositories and references in a [`Registry`], as the registry client's types.
pub trait RegistryExt {
    /// `ADDR/name`.
    fn repo(&self, name: &str) -> registry::Repository;
    /// `ADDR/s` (`name:tag` or `name@digest`).
    fn reference(&self, s: &str) -> registry::Reference;
}

impl RegistryExt for Registry {
    fn repo(&self, name: &str) -> registry::Repository {
        registry::Repository::parse(&format!("{}/{name}", self.addr)).unwrap()
    }

    fn reference(&self, s: &str) -> registry::Reference {
        registry::Reference::parse(&format!("{}/{s}", self.addr)).unwrap()
    }
}

/// The `errors[].code`s the registry sent with an error status (`MANIFEST_UNKNOWN`, ...): what the
/// tests check instead of the words of the message.
pub fn registry_codes(e: &registry::Error) -> Vec<String> {
    match e {
        registry::Error::Status { errors, .. } => errors.iter().map(|x| x.code.clone()).collect(),
        _ => Vec::new(),
    }
}

/// A client that reads `docker_config`, or an empty one (never the machine's own ~/.docker).
pub fn client_with(docker_config: Option<&Path>, retries: u32) -> (Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = match docker_config {
        Some(p) => p.to_path_buf(),
        None => {
            let p = dir.path().join("config.json");
            std::fs::write(&p, "{}").unwrap();
            p
        }
    };
    let options = ClientOptions {
        docker_config: Some(path),
        timeout: Duration::from_secs(10),
        retries,
        ..Default::default()
    };
    (Client::new(options).unwrap(), dir)
}

pub fn anonymous_client() -> (Client, tempfile::TempDir) {
    client_with(None, 2)
}

/// Writes a docker config with `auths` for `host`.
pub fn docker_config(dir: &Path, host: &str, user: &str, password: &str) -> PathBuf {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let path = dir.join("docker-config.json");
    std::fs::write(&path, format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#)).unwrap();
    path
}

/// Deterministic pseudo-random bytes.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An HTTP request as the fake server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap()
    }

    pub fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, q)| q)
    }
}

/// The fake server's answer.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }

    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Reply {
        self.body = b.into();
        self
    }
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

/// A one-thread HTTP/1.1 server on 127.0.0.1 answering each connection's one request with `handler`;
/// it keeps every request it saw, and stops on drop.
pub struct FakeServer {
    pub addr: String,
    pub requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeServer {
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        let _ = serve(conn, &*handler, &requests);
                    }
                }
            })
        };
        FakeServer {
            addr,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// `METHOD target` of each request so far.
    pub fn lines(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.target))
            .collect()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: TcpStream, handler: &Handler, log: &Mutex<Vec<Request>>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(());
    };
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut req = Request {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        body: Vec::new(),
    };
    let len: usize = req.header("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    req.body.resize(len, 0);
    reader.read_exact(&mut req.body)?;
    log.lock().unwrap().push(req.clone());
    let reply = handler(&req);
    let mut out = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", reply.status);
    if !reply
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        out.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
    }
    for (k, v) in &reply.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut conn = conn;
    conn.write_all(out.as_bytes())?;
    if req.method != "HEAD" {
        conn.write_all(&reply.body)?;
    }
    conn.flush()
}
