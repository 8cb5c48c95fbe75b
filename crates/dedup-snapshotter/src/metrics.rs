//! `serve --metrics-address`: the daemon's Prometheus metrics (`dedup_snapshotter_*`)
//! at `GET /metrics`, over a small HTTP/1.1 listener of its own.
//!
//! The gRPC services record their calls into the families of
//! [`grpc_services::ServiceMetrics`] (which also reads the store's gauges at each
//! scrape); this module adds the fetch daemon's view of the lazy layers and serves
//! the registry. A thread per connection, off the gRPC runtime: a scrape reads the
//! store (blocking) and may wait on dedupd, and must never hold up containerd's calls.

use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text::{encode, CONTENT_TYPE};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The registry behind `/metrics`, and the services' handle into it.
pub struct Metrics {
    /// What the gRPC services record into.
    pub services: Arc<grpc_services::ServiceMetrics>,
    registry: Arc<Registry>,
}

impl Metrics {
    /// The daemon's registry: the services' families and the store's gauges, and
    /// with `fetch_socket`, the lazy layers' states as the fetch daemon reports them.
    pub fn new(store: Arc<snapshotter::Snapshotter>, fetch_socket: Option<PathBuf>) -> Metrics {
        let mut registry = Registry::with_prefix("dedup_snapshotter");
        let services = grpc_services::ServiceMetrics::register(&mut registry, store);
        if let Some(socket) = fetch_socket {
            // Short: a fetch daemon that hangs must not make scrapes time out.
            let client = fetch_api::Client::new(socket).with_timeout(Duration::from_secs(2));
            registry.register_collector(Box::new(LazyLayers(client)));
        }
        Metrics {
            services,
            registry: Arc::new(registry),
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug in a metric's name.
        encode(&mut out, &self.registry).expect("encoding metrics");
        out
    }

    /// Binds `address` (host:port) and serves `GET /metrics` on it from a thread
    /// until the process ends. Binding happens here, so a bad address fails the start.
    pub fn serve(self: &Arc<Self>, address: &str) -> Result<()> {
        let listener = TcpListener::bind(address).with_context(|| format!("metrics: cannot listen on {address}"))?;
        tracing::info!(address, "metrics at /metrics");
        let metrics = self.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let metrics = metrics.clone();
                    let _ = std::thread::Builder::new().name("metrics-http".into()).spawn(move || {
                        if let Err(e) = answer(&metrics, conn) {
                            tracing::debug!(error = %e, "metrics connection failed");
                        }
                    });
                }
            })
            .context("metrics: starting the listener thread")?;
        Ok(())
    }
}

/// Answers one request, then closes the connection.
fn answer(metrics: &Metrics, conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Nothing in the headers changes the answer; they are read so the client sees
    // its whole request consumed before the connection closes.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim_end().is_empty() {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, target.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => ("200 OK", CONTENT_TYPE, metrics.render()),
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

/// The lazy layers' blobs by state, from the fetch daemon, which holds exactly the
/// blobs of this store's lazy layers (registered at Prepare, unregistered with the
/// last snapshot that reads them).
struct LazyLayers(fetch_api::Client);

impl fmt::Debug for LazyLayers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LazyLayers")
    }
}

impl Collector for LazyLayers {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::result::Result<(), fmt::Error> {
        let blobs = self.0.list();
        let up = encoder.encode_descriptor(
            "fetch_daemon_up",
            "Whether the fetch daemon (dedupd) answered this scrape.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(blobs.is_ok())).encode(up)?;
        let refused = encoder.encode_descriptor(
            "tar_index_refused",
            "Tar indexes refused at Prepare (an artifact or bundle that does not match the image, a first chunk \
             that does not verify): each such layer was pulled in full.",
            None,
            MetricType::Counter,
        )?;
        prometheus_client::metrics::counter::ConstCounter::new(
            crate::lazy::TAR_INDEX_REFUSED.load(std::sync::atomic::Ordering::Relaxed),
        )
        .encode(refused)?;
        let Ok(blobs) = blobs else { return Ok(()) };
        let complete = blobs.iter().filter(|b| b.complete && b.verified).count();
        let mut family = encoder.encode_descriptor(
            "lazy_layers",
            "Lazily pulled layers by state: fetching (data still arriving from the registry) or complete \
             (every chunk local and the whole blob verified).",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in [("fetching", blobs.len() - complete), ("complete", complete)] {
            ConstGauge::new(n as i64).encode(family.encode_family(&[("state", state)])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use fetch_api::{BlobStatus, Response};
    use test_support::prometheus::Exposition;

    use super::*;

    fn scrape(socket: PathBuf) -> Exposition {
        let mut registry = Registry::with_prefix("dedup_snapshotter");
        let client = fetch_api::Client::new(socket).with_timeout(Duration::from_secs(2));
        registry.register_collector(Box::new(LazyLayers(client)));
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        Exposition::parse(&text).unwrap()
    }

    fn blob(n: u8, complete: bool, verified: bool) -> BlobStatus {
        BlobStatus {
            digest: format!("sha256:{n:064x}"),
            size: 10,
            chunks: 1,
            present: u64::from(complete),
            complete,
            verified,
            fetched_bytes: 0,
            errors: 0,
        }
    }

    #[test]
    fn lazy_layers_by_state_from_the_fetch_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("dedupd.sock");

        // No fetch daemon: down, and no states rather than zeros that would read as "nothing lazy".
        let down = scrape(socket.clone());
        assert_eq!(down.get("dedup_snapshotter_fetch_daemon_up", &[]), Some(0.0));
        assert_eq!(down.matching("dedup_snapshotter_lazy_layers", &[]).count(), 0);

        // One that answers List: complete means every chunk local and the whole blob verified.
        let listener = UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let request: fetch_api::Request = serde_json::from_str(&fetch_api::read_line(&conn).unwrap()).unwrap();
            assert!(matches!(request, fetch_api::Request::List), "{request:?}");
            let blobs = vec![blob(1, true, true), blob(2, true, false), blob(3, false, false)];
            conn.write_all(Response::line(&Ok::<_, fetch_api::Error>(blobs)).as_bytes())
                .unwrap();
        });
        let up = scrape(socket);
        server.join().unwrap();
        assert_eq!(up.get("dedup_snapshotter_fetch_daemon_up", &[]), Some(1.0));
        assert_eq!(
            up.get("dedup_snapshotter_lazy_layers", &[("state", "complete")]),
            Some(1.0)
        );
        assert_eq!(
            up.get("dedup_snapshotter_lazy_layers", &[("state", "fetching")]),
            Some(2.0)
        );
    }
}
