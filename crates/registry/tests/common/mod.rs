//! Test helpers: a real docker-registry on loopback, and a tiny scripted HTTP server for what a real
//! registry will not do on demand (token auth, ignoring Range, failing).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use registry::{Client, ClientOptions};

/// A docker-registry serving a fresh temporary directory on 127.0.0.1; killed on drop.
pub struct Registry {
    pub addr: String,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Registry {
    /// Without authentication.
    pub fn start() -> Registry {
        Registry::start_with(None)
    }

    /// With `auth: htpasswd` for one user.
    pub fn start_htpasswd(user: &str, password: &str) -> Registry {
        Registry::start_with(Some((user, password)))
    }

    /// Serving HTTPS with this certificate and key (PEM files).
    pub fn start_tls(cert: &Path, key: &Path) -> Registry {
        Registry::start_full(None, Some((cert, key)))
    }

    fn start_with(htpasswd: Option<(&str, &str)>) -> Registry {
        Registry::start_full(htpasswd, None)
    }

    fn start_full(htpasswd: Option<(&str, &str)>, tls: Option<(&Path, &Path)>) -> Registry {
        let bin = which("docker-registry").unwrap_or_else(|| {
            panic!("docker-registry is not installed: apt-get install -y docker-registry (the registry tests need it)")
        });
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).unwrap();
        let mut auth = String::new();
        if let Some((user, password)) = htpasswd {
            // Cost 4, the minimum: the registry checks the hash on every request.
            let hash = bcrypt::hash_with_result(password, 4)
                .unwrap()
                .format_for_version(bcrypt::Version::TwoY);
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, format!("{user}:{hash}\n")).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
                file.display()
            );
        }
        // The port is picked by binding :0 and released for the registry; a rare collision is retried.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let addr = format!("127.0.0.1:{port}");
            let tls_conf = match tls {
                Some((cert, key)) => format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    cert.display(),
                    key.display()
                ),
                None => String::new(),
            };
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    \
                     rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{tls_conf}{auth}",
                    storage.display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let mut child = Command::new(&bin)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if answers_http(&addr) || (tls.is_some() && answers_tcp(&addr)) {
                    return Registry { addr, dir, child };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let log = std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
        panic!("docker-registry did not start; its log:\n{log}");
    }

    /// Where the registry keeps a blob's bytes (distribution's filesystem layout).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir.path().join(format!(
            "storage/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }

    /// `ADDR/name`.
    pub fn repo(&self, name: &str) -> registry::Repository {
        registry::Repository::parse(&format!("{}/{name}", self.addr)).unwrap()
    }

    pub fn reference(&self, s: &str) -> registry::Reference {
        registry::Reference::parse(&format!("{}/{s}", self.addr)).unwrap()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/bin", "/usr/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Whether something accepts connections at `addr` (a TLS server does not answer plain HTTP).
fn answers_tcp(addr: &str) -> bool {
    TcpStream::connect(addr).is_ok()
}

/// Whether something at `addr` answers `GET /v2/` with an HTTP status line (401 counts).
fn answers_http(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET /v2/ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("HTTP/1.1 ")
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
