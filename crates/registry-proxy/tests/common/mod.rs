//! Test helpers: the shared docker-registry fixture (test-support), the proxy binary in front of it, and a raw HTTP
//! client for the control endpoints.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use registry::{Client, ClientOptions};

/// The shared docker-registry fixture (test-support).
pub use test_support::registry::Registry;

/// The `registry-proxy` binary in front of an upstream; killed on drop.
pub struct Proxy {
    pub addr: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Proxy {
    pub fn start(upstream: &str, extra: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("addr");
        let mut child = Command::new(env!("CARGO_BIN_EXE_registry-proxy"))
            .args(["--listen", "127.0.0.1:0", "--upstream", upstream, "--port-file"])
            .arg(&port_file)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = std::fs::read_to_string(&port_file) {
                let addr = s.trim().to_string();
                assert!(addr.starts_with("127.0.0.1:"), "{addr:?}");
                return Proxy { addr, child, _dir: dir };
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("registry-proxy exited: {status}");
            }
            assert!(Instant::now() < deadline, "registry-proxy wrote no port file");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A raw request to the proxy: (status, headers, body).
    pub fn request(&self, method: &str, target: &str, headers: &[(&str, &str)]) -> Response {
        raw_request(&self.addr, method, target, headers, b"")
    }

    /// `POST /_proxy/config?{query}`, which must succeed.
    pub fn config(&self, query: &str) -> serde_json::Value {
        let r = self.request("POST", &format!("/_proxy/config?{query}"), &[]);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        serde_json::from_slice(&r.body).unwrap()
    }

    pub fn stats(&self) -> serde_json::Value {
        let r = self.request("GET", "/_proxy/stats", &[]);
        assert_eq!(r.status, 200);
        serde_json::from_slice(&r.body).unwrap()
    }

    pub fn reset_stats(&self) {
        assert_eq!(self.request("POST", "/_proxy/reset-stats", &[]).status, 200);
    }

    /// `ADDR/name` through the proxy.
    pub fn repo(&self, name: &str) -> registry::Repository {
        registry::Repository::parse(&format!("{}/{name}", self.addr)).unwrap()
    }

    pub fn reference(&self, s: &str) -> registry::Reference {
        registry::Reference::parse(&format!("{}/{s}", self.addr)).unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on a fresh connection (`Connection: close`); the body is read to EOF or Content-Length.
pub fn raw_request(addr: &str, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no status line: {line:?}"))
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if method != "HEAD" {
        match resp.header("content-length").map(|l| l.parse::<u64>().unwrap()) {
            Some(n) => {
                r.take(n).read_to_end(&mut resp.body).unwrap();
            }
            None => {
                r.read_to_end(&mut resp.body).unwrap();
            }
        }
    }
    resp
}

pub use test_support::registry::which;

/// A client with an empty docker config (never the machine's own ~/.docker).
pub fn client(retries: u32) -> (Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    std::fs::write(&p, "{}").unwrap();
    let options = ClientOptions {
        docker_config: Some(p),
        timeout: Duration::from_secs(10),
        retries,
        ..Default::default()
    };
    (Client::new(options).unwrap(), dir)
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
