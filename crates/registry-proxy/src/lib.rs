//! A loopback HTTP/1.1 reverse proxy put in front of a registry in tests and benchmarks, to simulate a
//! slow or failing network.
//!
//! One thread per client connection; requests are parsed (request line, headers, `Content-Length` or
//! chunked bodies) so client connections stay alive, while each forwarded request gets its own upstream
//! connection (`Connection: close`). `Location` headers naming the upstream are rewritten to name the
//! proxy, so blob uploads keep going through it.
//!
//! Control endpoints on the same listener, never forwarded:
//!
//! - `POST /_proxy/config?rate=N&down=0|1&corrupt=0|1&delay_ms=N&refuse_agent=S`: sets any subset;
//!   answers the whole configuration as JSON (`GET /_proxy/config` only reads it). `refuse_agent`
//!   takes the upstream away only for clients whose `User-Agent` contains `S` (empty: none), so one
//!   client (the snapshotter) sees a dead registry while another (containerd) pulls.
//! - `GET /_proxy/stats`: `{"requests":N,"range_requests":N,"blob_bytes":N,"bytes_out":N}`.
//! - `POST /_proxy/reset-stats`: zeroes the counters; answers their values before.

mod http;

use std::io::{self, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use http::{copy_body, read_head, BodyHook, Framing, Head, NoHook};

use http::{request_framing, response_framing};

/// The control endpoints' path prefix.
pub const CONTROL_PREFIX: &str = "/_proxy/";

/// How long an idle client connection, or a silent upstream, is waited for.
const IO_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The fault settings, changeable while the proxy runs (the `/_proxy/config` endpoint).
#[derive(Debug, Default)]
pub struct Settings {
    rate: AtomicU64,
    down: AtomicBool,
    corrupt: AtomicBool,
    delay_ms: AtomicU64,
    refuse_agent: std::sync::Mutex<String>,
}

impl Settings {
    /// Response body bytes per second for all connections together; 0 is unlimited.
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::SeqCst)
    }

    /// Sets the rate limit (0: unlimited).
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::SeqCst)
    }

    /// Whether forwarded requests get their connection closed without a response.
    pub fn down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// Takes the upstream away (`true`) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst)
    }

    /// Whether responses to blob GETs with a `Range` header have their first body byte flipped.
    pub fn corrupt(&self) -> bool {
        self.corrupt.load(Ordering::SeqCst)
    }

    /// Turns range corruption on or off.
    pub fn set_corrupt(&self, corrupt: bool) {
        self.corrupt.store(corrupt, Ordering::SeqCst)
    }

    /// Milliseconds waited before each forwarded response.
    pub fn delay_ms(&self) -> u64 {
        self.delay_ms.load(Ordering::SeqCst)
    }

    /// Sets the latency added before each forwarded response.
    pub fn set_delay_ms(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst)
    }

    /// The `User-Agent` substring whose requests are refused as if the upstream were down.
    pub fn refuse_agent(&self) -> String {
        self.refuse_agent.lock().unwrap().clone()
    }

    /// Sets the refused `User-Agent` substring (empty: refuse none).
    pub fn set_refuse_agent(&self, agent: &str) {
        *self.refuse_agent.lock().unwrap() = agent.to_string();
    }

    /// Whether a request from `agent` is refused (`refuse_agent`).
    fn refuses(&self, agent: Option<&str>) -> bool {
        let refused = self.refuse_agent.lock().unwrap();
        !refused.is_empty() && agent.is_some_and(|a| a.contains(refused.as_str()))
    }

    /// The settings as JSON: `{"rate":N,"down":bool,"corrupt":bool,"delay_ms":N,"refuse_agent":S}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "rate": self.rate(),
            "down": self.down(),
            "corrupt": self.corrupt(),
            "delay_ms": self.delay_ms(),
            "refuse_agent": self.refuse_agent(),
        })
    }
}

/// Traffic counters (the `/_proxy/stats` endpoint). Control requests are not counted.
#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    range_requests: AtomicU64,
    blob_bytes: AtomicU64,
    bytes_out: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Requests forwarded to the upstream.
    pub requests: u64,
    /// Of those, the ones with a `Range` header.
    pub range_requests: u64,
    /// Response body bytes sent to clients for blob GETs (`GET /v2/<name>/blobs/<digest>`).
    pub blob_bytes: u64,
    /// Response body bytes sent to clients for all forwarded requests (heads not counted).
    pub bytes_out: u64,
}

impl StatsSnapshot {
    /// `{"requests":N,"range_requests":N,"blob_bytes":N,"bytes_out":N}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests,
            "range_requests": self.range_requests,
            "blob_bytes": self.blob_bytes,
            "bytes_out": self.bytes_out,
        })
    }
}

impl Stats {
    /// The current counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::SeqCst),
            range_requests: self.range_requests.load(Ordering::SeqCst),
            blob_bytes: self.blob_bytes.load(Ordering::SeqCst),
            bytes_out: self.bytes_out.load(Ordering::SeqCst),
        }
    }

    /// Zeroes the counters; returns their values before.
    pub fn reset(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.swap(0, Ordering::SeqCst),
            range_requests: self.range_requests.swap(0, Ordering::SeqCst),
            blob_bytes: self.blob_bytes.swap(0, Ordering::SeqCst),
            bytes_out: self.bytes_out.swap(0, Ordering::SeqCst),
        }
    }
}

/// A token bucket shared by all connections. Takers may go into debt and sleep it off, so the
/// aggregate rate holds however many connections take at once.
#[derive(Debug)]
pub struct RateLimiter {
    bucket: Mutex<(f64, Instant)>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter {
            bucket: Mutex::new((0.0, Instant::now())),
        }
    }
}

impl RateLimiter {
    /// Takes `n` bytes' worth of tokens at `rate` bytes per second (0: returns at once), sleeping
    /// as long as the bucket is in debt. The bucket holds at most 50 ms of tokens.
    pub fn take(&self, n: usize, rate: u64) {
        if rate == 0 {
            return;
        }
        let rate = rate as f64;
        let wait = {
            let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let burst = (rate / 20.0).max(1.0);
            b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * rate).min(burst);
            b.1 = now;
            b.0 -= n as f64;
            if b.0 < 0.0 {
                -b.0 / rate
            } else {
                0.0
            }
        };
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
}

/// State shared by the proxy's connection threads.
#[derive(Debug)]
pub struct Shared {
    /// `host:port` of the upstream registry.
    pub upstream: String,
    /// The fault settings.
    pub settings: Settings,
    /// The traffic counters.
    pub stats: Stats,
    /// The response body rate limiter.
    pub limiter: RateLimiter,
    /// Log each forwarded request to stderr: method, target, request body framing, status.
    pub verbose: AtomicBool,
}

/// A bound proxy; [`Proxy::serve`] runs it.
pub struct Proxy {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Binds `listen` (port 0 picks one) to forward to `upstream` (`host:port`, an `http://` prefix
    /// and trailing `/` are accepted).
    pub fn bind(listen: &str, upstream: &str) -> io::Result<Proxy> {
        let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_string();
        if upstream.is_empty() || !upstream.contains(':') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("upstream {upstream:?} is not host:port"),
            ));
        }
        let listener = TcpListener::bind(listen)?;
        Ok(Proxy {
            listener,
            shared: Arc::new(Shared {
                upstream,
                settings: Settings::default(),
                stats: Stats::default(),
                limiter: RateLimiter::default(),
                verbose: AtomicBool::new(false),
            }),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The settings, counters and limiter, shared with the running proxy.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Accepts connections forever, one thread each.
    pub fn serve(self) -> io::Result<()> {
        let local = self.listener.local_addr()?;
        for conn in self.listener.incoming() {
            let conn = match conn {
                Ok(c) => c,
                Err(e) if is_transient_accept_error(&e) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let shared = self.shared.clone();
            std::thread::spawn(move || {
                let _ = serve_connection(conn, &shared, local);
            });
        }
        Ok(())
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    ) || e.raw_os_error().is_some_and(|c| c == 24 || c == 23) // EMFILE, ENFILE
}

/// Hop-by-hop header fields, never passed on.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "expect",
    "proxy-authorization",
];

fn is_hop_by_hop(head: &Head, name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name)) || head.has_token("connection", name)
}

fn serve_connection(client: TcpStream, shared: &Shared, local: SocketAddr) -> io::Result<()> {
    client.set_nodelay(true)?;
    client.set_read_timeout(Some(IO_TIMEOUT))?;
    client.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut writer = client;
    loop {
        let head = match read_head(&mut reader) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(()),
            Err(e) => {
                if e.kind() == io::ErrorKind::InvalidData {
                    let _ =
                        writer.write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
                }
                let _ = writer.shutdown(Shutdown::Both);
                return Err(e);
            }
        };
        let (_, target, version) = head.parts();
        let keep_alive = version.eq_ignore_ascii_case("HTTP/1.1") && !head.has_token("connection", "close");
        let path = target.split('?').next().unwrap_or("");
        let keep = if path.starts_with(CONTROL_PREFIX) {
            control(&head, &mut reader, &mut writer, shared, keep_alive)?
        } else if shared.settings.down() || shared.settings.refuses(head.header("user-agent")) {
            false
        } else {
            forward(&head, &mut reader, &mut writer, shared, local, keep_alive)?
        };
        if !keep {
            let _ = writer.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}

/// Writes a small complete response.
fn respond(w: &mut impl Write, status: &str, body: &[u8], keep_alive: bool) -> io::Result<()> {
    let conn = if keep_alive { "keep-alive" } else { "close" };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    w.write_all(&out)
}

/// Answers a `/_proxy/` request; whether the connection stays open.
fn control(
    head: &Head,
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    shared: &Shared,
    keep_alive: bool,
) -> io::Result<bool> {
    let (method, target, _) = head.parts();
    // Drain any request body first.
    let framing = request_framing(head)?;
    if head.has_token("expect", "100-continue") && framing != Framing::None {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    copy_body(reader, &mut io::sink(), framing, &mut NoHook)?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let action = path.strip_prefix(CONTROL_PREFIX).unwrap_or("");
    let json = |v: serde_json::Value| {
        let mut b = serde_json::to_vec(&v).unwrap_or_default();
        b.push(b'\n');
        b
    };
    let (status, body) = match (method, action) {
        ("POST", "config") => match apply_config(&shared.settings, query) {
            Ok(()) => ("200 OK", json(shared.settings.to_json())),
            Err(msg) => ("400 Bad Request", json(serde_json::json!({ "error": msg }))),
        },
        ("GET", "config") => ("200 OK", json(shared.settings.to_json())),
        ("GET", "stats") => ("200 OK", json(shared.stats.snapshot().to_json())),
        ("POST", "reset-stats") => ("200 OK", json(shared.stats.reset().to_json())),
        (_, "config" | "stats" | "reset-stats") => (
            "405 Method Not Allowed",
            json(serde_json::json!({ "error": "method not allowed" })),
        ),
        _ => (
            "404 Not Found",
            json(serde_json::json!({ "error": "unknown control endpoint" })),
        ),
    };
    respond(writer, status, &body, keep_alive)?;
    Ok(keep_alive)
}

/// Applies `rate=N&down=0|1&corrupt=0|1&delay_ms=N&refuse_agent=S`: all of it, or nothing when a part
/// is invalid.
pub fn apply_config(settings: &Settings, query: &str) -> Result<(), String> {
    let (mut rate, mut down, mut corrupt, mut delay, mut agent) = (None, None, None, None, None);
    let flag = |k: &str, v: &str| match v {
        "0" | "false" => Ok(false),
        "1" | "true" => Ok(true),
        _ => Err(format!("{k}={v:?}: want 0 or 1")),
    };
    let num = |k: &str, v: &str| v.parse::<u64>().map_err(|_| format!("{k}={v:?}: want a number"));
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "rate" => rate = Some(num(k, v)?),
            "down" => down = Some(flag(k, v)?),
            "corrupt" => corrupt = Some(flag(k, v)?),
            "delay_ms" => delay = Some(num(k, v)?),
            // A user agent token has no characters that need URL-decoding.
            "refuse_agent" => agent = Some(v),
            _ => return Err(format!("unknown setting {k:?}")),
        }
    }
    if let Some(r) = rate {
        settings.set_rate(r);
    }
    if let Some(d) = down {
        settings.set_down(d);
    }
    if let Some(c) = corrupt {
        settings.set_corrupt(c);
    }
    if let Some(d) = delay {
        settings.set_delay_ms(d);
    }
    if let Some(a) = agent {
        settings.set_refuse_agent(a);
    }
    Ok(())
}

/// Whether `path` is a blob (not an upload): `/v2/<name>/blobs/<algorithm>:<hex>`.
pub fn is_blob_path(path: &str) -> bool {
    path.strip_prefix("/v2/")
        .and_then(|rest| rest.rsplit_once("/blobs/"))
        .is_some_and(|(name, digest)| !name.is_empty() && digest.contains(':') && !digest.contains('/'))
}

/// What a forwarded response body goes through: rate limit, corruption, counting, outage.
struct ResponseHook<'a> {
    shared: &'a Shared,
    corrupt_next: bool,
    blob: bool,
}

impl BodyHook for ResponseHook<'_> {
    fn chunk_size(&self) -> usize {
        match self.shared.settings.rate() {
            0 => 64 << 10,
            r => ((r / 50) as usize).clamp(256, 16 << 10),
        }
    }

    fn data(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.shared.limiter.take(buf.len(), self.shared.settings.rate());
        if self.shared.settings.down() {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "proxy set down"));
        }
        if self.corrupt_next {
            buf[0] ^= 0xff;
            self.corrupt_next = false;
        }
        let n = buf.len() as u64;
        self.shared.stats.bytes_out.fetch_add(n, Ordering::SeqCst);
        if self.blob {
            self.shared.stats.blob_bytes.fetch_add(n, Ordering::SeqCst);
        }
        Ok(())
    }
}

fn connect(addr: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address"));
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Sleeps `ms`, in steps, giving up early (false) when the proxy goes down.
fn delay(shared: &Shared, ms: u64) -> bool {
    let end = Instant::now() + Duration::from_millis(ms);
    loop {
        if shared.settings.down() {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(10)));
    }
}

/// Forwards one request and its response; whether the client connection stays open.
fn forward(
    head: &Head,
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    shared: &Shared,
    local: SocketAddr,
    keep_alive: bool,
) -> io::Result<bool> {
    let (method, target, _) = head.parts();
    let req_framing = request_framing(head)?;
    let range = head.header("range").is_some();
    shared.stats.requests.fetch_add(1, Ordering::SeqCst);
    if range {
        shared.stats.range_requests.fetch_add(1, Ordering::SeqCst);
    }
    let path = target.split('?').next().unwrap_or("");
    let blob_get = method == "GET" && is_blob_path(path);
    // The name clients reach the proxy by, for Location rewriting.
    let proxy_host = head
        .header("host")
        .map(str::to_string)
        .unwrap_or_else(|| local.to_string());

    let upstream = match connect(&shared.upstream) {
        Ok(u) => u,
        Err(e) => {
            let body = format!("{{\"error\":\"upstream {}: {e}\"}}\n", shared.upstream);
            respond(writer, "502 Bad Gateway", body.as_bytes(), false)?;
            return Ok(false);
        }
    };
    upstream.set_nodelay(true)?;
    upstream.set_read_timeout(Some(IO_TIMEOUT))?;
    upstream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut up_reader = BufReader::new(upstream.try_clone()?);
    let mut up_writer = upstream;

    let mut out = Head {
        start: format!("{method} {target} HTTP/1.1"),
        headers: Vec::with_capacity(head.headers.len() + 2),
    };
    for (k, v) in &head.headers {
        if k.eq_ignore_ascii_case("host") || is_hop_by_hop(head, k) {
            continue;
        }
        out.headers.push((k.clone(), v.clone()));
    }
    out.headers.push(("Host".into(), shared.upstream.clone()));
    out.headers.push(("Connection".into(), "close".into()));
    if head.has_token("expect", "100-continue") && req_framing != Framing::None {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    up_writer.write_all(&out.to_bytes())?;
    copy_body(reader, &mut up_writer, req_framing, &mut NoHook)?;
    up_writer.flush()?;

    // The response, past any interim (1xx) ones.
    let resp = loop {
        let resp = read_head(&mut up_reader)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "upstream closed without a response"))?;
        let status: u16 = resp.parts().1.parse().map_err(|_| http::bad("bad status line"))?;
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        break resp;
    };
    let status: u16 = resp.parts().1.parse().unwrap_or(0);
    let framing = response_framing(method, status, &resp)?;
    let keep = keep_alive && framing != Framing::UntilEof && status != 101;
    if shared.verbose.load(Ordering::Relaxed) {
        eprintln!("registry-proxy: {method} {target} ({req_framing:?}) -> {status} ({framing:?})");
    }

    let upstream_url = format!("http://{}", shared.upstream);
    let mut back = Head {
        start: resp.start.clone(),
        headers: Vec::with_capacity(resp.headers.len() + 1),
    };
    for (k, v) in &resp.headers {
        if is_hop_by_hop(&resp, k) {
            continue;
        }
        let v = match v.strip_prefix(&upstream_url) {
            Some(rest) if k.eq_ignore_ascii_case("location") && (rest.is_empty() || rest.starts_with('/')) => {
                format!("http://{proxy_host}{rest}")
            }
            _ => v.clone(),
        };
        back.headers.push((k.clone(), v));
    }
    back.headers
        .push(("Connection".into(), if keep { "keep-alive" } else { "close" }.into()));

    let ms = shared.settings.delay_ms();
    if ms > 0 && !delay(shared, ms) {
        return Ok(false);
    }
    if shared.settings.down() {
        return Ok(false);
    }
    writer.write_all(&back.to_bytes())?;
    let mut hook = ResponseHook {
        shared,
        corrupt_next: blob_get && range && shared.settings.corrupt(),
        blob: blob_get,
    };
    copy_body(&mut up_reader, writer, framing, &mut hook)?;
    writer.flush()?;
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_paths() {
        assert!(is_blob_path("/v2/a/b/blobs/sha256:abcd"));
        assert!(!is_blob_path("/v2/a/blobs/uploads/"));
        assert!(!is_blob_path("/v2/a/blobs/uploads/123"));
        assert!(!is_blob_path("/v2/a/manifests/sha256:abcd"));
        assert!(!is_blob_path("/v2//blobs/sha256:abcd"));
    }

    #[test]
    fn config_is_all_or_nothing() {
        let s = Settings::default();
        apply_config(&s, "rate=5&down=1&corrupt=true&delay_ms=7").unwrap();
        assert_eq!((s.rate(), s.down(), s.corrupt(), s.delay_ms()), (5, true, true, 7));
        assert!(apply_config(&s, "rate=9&down=2").is_err());
        assert!(apply_config(&s, "bogus=1").is_err());
        assert_eq!(s.rate(), 5);
    }

    #[test]
    fn limiter_holds_the_rate() {
        let l = RateLimiter::default();
        let start = Instant::now();
        for _ in 0..30 {
            l.take(10_000, 1_000_000);
        }
        // 300 kB at 1 MB/s, less a burst of 50 kB.
        assert!(start.elapsed() >= Duration::from_millis(240), "{:?}", start.elapsed());
    }
}
