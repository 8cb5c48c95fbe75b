//! Test helpers: the shared docker-registry fixture (test-support), a scripted blob server that can corrupt or
//! refuse, and the `dedupd` binary started on a temporary root, mountpoint and socket.
//!
//! Everything these tests need (root, /dev/fuse, fuse in the kernel, docker-registry) is checked
//! up front and its absence fails the test with a message: nothing is skipped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fetch_api::{BlobSpec, Source};
use sha2::{Digest, Sha256};
use test_support::prometheus::Exposition;

pub const MIB: u64 = 1 << 20;

/// Panics unless this test can mount FUSE: root, /dev/fuse, and fuse in /proc/filesystems.
pub fn require_fuse() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "the fetch-daemon tests mount FUSE and must run as root");
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: `modprobe fuse` (the fetch-daemon tests need FUSE)"
    );
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap();
    assert!(
        fs.lines().any(|l| l.split_whitespace().last() == Some("fuse")),
        "fuse is not in /proc/filesystems: `modprobe fuse` (the fetch-daemon tests need FUSE)"
    );
}

pub use test_support::pseudo_random as data;

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// The spec of `blob` in chunks of `chunk_size` on `registry`/`repository`.
pub fn spec_for(blob: &[u8], chunk_size: u64, registry: &str, repository: &str) -> BlobSpec {
    BlobSpec {
        digest: digest_of(blob),
        size: blob.len() as u64,
        chunk_size,
        chunk_digests: blob.chunks(chunk_size as usize).map(sha256_hex).collect(),
        prefetch: Vec::new(),
        compressed: None,
        source: Source {
            registry: registry.to_string(),
            repository: repository.to_string(),
        },
    }
}

/// The shared docker-registry fixture (test-support).
pub use test_support::registry::Registry;

/// Pushing blobs to a [`Registry`] with the workspace's registry client.
pub trait PushBlob {
    /// Pushes `blob` to `repository`; returns its digest.
    fn push(&self, repository: &str, blob: &[u8]) -> String;
}

impl PushBlob for Registry {
    fn push(&self, repository: &str, blob: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.json");
        std::fs::write(&config, "{}").unwrap();
        let client = registry::Client::new(registry::ClientOptions {
            docker_config: Some(config),
            timeout: Duration::from_secs(20),
            ..Default::default()
        })
        .unwrap();
        let repo = registry::Repository::parse(&format!("{}/{repository}", self.addr)).unwrap();
        let digest = digest_of(blob);
        client.push_blob(&repo, &digest, blob.len() as u64, blob).unwrap();
        digest
    }
}

/// How the [`BlobServer`] answers blob requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// The right bytes.
    Good = 0,
    /// The right range with its first byte flipped.
    Corrupt = 1,
    /// HTTP 503.
    Unavailable = 2,
    /// Closes the connection without answering.
    Refuse = 3,
}

/// One blob request the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// `(first, last)` of a Range header.
    pub range: Option<(u64, u64)>,
    pub mode: Mode,
}

/// A minimal registry serving one blob, over HTTP/1.1 with a thread per connection; its answers
/// depend on [`Mode`], which the test switches. Stops on drop.
pub struct BlobServer {
    pub addr: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    mode: Arc<AtomicU8>,
    /// With token auth: the generation of the one token accepted (`tok-N`); 0 = no auth.
    token: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BlobServer {
    /// Without authentication.
    pub fn start(blob: Vec<u8>) -> BlobServer {
        BlobServer::start_with(blob, false)
    }

    /// Blob requests need a Bearer token from `/token`; [`BlobServer::expire_token`] revokes it.
    pub fn start_with_token_auth(blob: Vec<u8>) -> BlobServer {
        BlobServer::start_with(blob, true)
    }

    fn start_with(blob: Vec<u8>, auth: bool) -> BlobServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mode = Arc::new(AtomicU8::new(Mode::Good as u8));
        let token = Arc::new(AtomicU64::new(u64::from(auth)));
        let stop = Arc::new(AtomicBool::new(false));
        let blob = Arc::new(blob);
        let thread = {
            let (seen, mode, token, stop) = (seen.clone(), mode.clone(), token.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (seen, mode, token, blob) = (seen.clone(), mode.clone(), token.clone(), blob.clone());
                    std::thread::spawn(move || {
                        let _ = serve_blob(conn, &blob, &mode, &token, &seen);
                    });
                }
            })
        };
        BlobServer {
            addr,
            seen,
            mode,
            token,
            stop,
            thread: Some(thread),
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Revokes the current token (as if it expired early): the next blob request gets a 401.
    pub fn expire_token(&self) {
        self.token.fetch_add(1, Ordering::SeqCst);
    }

    /// Blob GETs seen so far.
    pub fn blob_gets(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == "GET" && s.path.contains("/blobs/"))
            .cloned()
            .collect()
    }
}

impl Drop for BlobServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn mode_of(v: u8) -> Mode {
    match v {
        1 => Mode::Corrupt,
        2 => Mode::Unavailable,
        3 => Mode::Refuse,
        _ => Mode::Good,
    }
}

fn serve_blob(
    conn: TcpStream,
    blob: &[u8],
    mode: &AtomicU8,
    token: &AtomicU64,
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(());
    };
    let mut range = None;
    let mut authorization = String::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("authorization") {
                authorization = v.trim().to_string();
            }
            if k.trim().eq_ignore_ascii_case("range") {
                range = v
                    .trim()
                    .strip_prefix("bytes=")
                    .and_then(|r| r.split_once('-'))
                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
            }
        }
    }
    let path = target.split('?').next().unwrap_or("").to_string();
    let mode = mode_of(mode.load(Ordering::SeqCst));
    seen.lock().unwrap().push(Seen {
        method: method.to_string(),
        path: path.clone(),
        range,
        mode,
    });
    let mut conn = conn;
    let respond = |conn: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
        let mut out = format!(
            "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        conn.write_all(out.as_bytes())?;
        if method != "HEAD" {
            conn.write_all(body)?;
        }
        conn.flush()
    };
    if path == "/v2/" || path == "/v2" {
        return respond(&mut conn, "200 OK", &[], b"{}");
    }
    let generation = token.load(Ordering::SeqCst);
    if path == "/token" {
        let body = format!(r#"{{"token":"tok-{generation}","expires_in":300}}"#);
        return respond(&mut conn, "200 OK", &[], body.as_bytes());
    }
    if !path.contains("/blobs/sha256:") {
        return respond(&mut conn, "404 Not Found", &[], b"");
    }
    if generation != 0 && authorization != format!("Bearer tok-{generation}") {
        let challenge = format!(
            r#"Bearer realm="http://{}/token",service="blob-server""#,
            conn.local_addr()?
        );
        return respond(
            &mut conn,
            "401 Unauthorized",
            &[("WWW-Authenticate".to_string(), challenge)],
            br#"{"errors":[{"code":"UNAUTHORIZED","message":"token expired"}]}"#,
        );
    }
    match mode {
        Mode::Refuse => {
            let _ = conn.shutdown(std::net::Shutdown::Both);
            Ok(())
        }
        Mode::Unavailable => respond(&mut conn, "503 Service Unavailable", &[], b"down for a test"),
        Mode::Good | Mode::Corrupt => {
            let size = blob.len() as u64;
            let (first, last) = range.unwrap_or((0, size.saturating_sub(1)));
            if first >= size {
                return respond(&mut conn, "416 Range Not Satisfiable", &[], b"");
            }
            let last = last.min(size - 1);
            let mut body = blob[first as usize..=last as usize].to_vec();
            if mode == Mode::Corrupt {
                body[0] ^= 0xff;
            }
            let headers = [
                ("Content-Range".to_string(), format!("bytes {first}-{last}/{size}")),
                ("Content-Type".to_string(), "application/octet-stream".to_string()),
            ];
            let status = if range.is_some() {
                "206 Partial Content"
            } else {
                "200 OK"
            };
            respond(&mut conn, status, &headers, &body)
        }
    }
}

/// A running `dedupd`; on drop it is stopped (SIGTERM, then SIGKILL) and its mount detached.
pub struct Dedupd {
    child: Option<Child>,
    pub root: PathBuf,
    pub mountpoint: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub client: fetch_api::Client,
}

/// Where one test's daemon lives; kept across restarts of the daemon. Whatever is
/// still mounted under it when it is dropped (a killed daemon's dead FUSE mount, an
/// EROFS mount of a served file) is unmounted, then it is removed.
pub struct Place {
    pub dir: test_support::TestDir,
}

impl Place {
    pub fn new() -> Place {
        Place {
            dir: test_support::TestDir::new("dedupd-test-"),
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn mountpoint(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("dedupd.sock")
    }
}

impl Dedupd {
    /// Starts `dedupd` in `place` with `extra` arguments; waits until it answers a ping. The data path is FUSE
    /// unless `extra` names one.
    pub fn start(place: &Place, extra: &[&str]) -> Dedupd {
        let mut extra: Vec<&str> = extra.to_vec();
        if !extra.contains(&"--data-path") {
            extra.extend(["--data-path", "fuse"]);
        }
        if extra.contains(&"fuse") {
            require_fuse();
        }
        let log = place.dir.path().join(format!(
            "dedupd-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let stderr = std::fs::File::create(&log).unwrap();
        // Never the machine's own ~/.docker credentials.
        let docker_config = place.dir.path().join("docker-config.json");
        std::fs::write(&docker_config, "{}").unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dedupd"))
            .arg("--root")
            .arg(place.root())
            .arg("--mountpoint")
            .arg(place.mountpoint())
            .arg("--socket")
            .arg(place.socket())
            .arg("--docker-config")
            .arg(&docker_config)
            .args(&extra)
            .env("RUST_LOG", "info,fetch_daemon=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("cannot run dedupd");
        let mut d = Dedupd {
            child: Some(child),
            root: place.root(),
            mountpoint: place.mountpoint(),
            socket: place.socket(),
            log,
            client: fetch_api::Client::new(place.socket()).with_timeout(Duration::from_secs(60)),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("dedupd exited with {status} at start; its log:\n{}", d.log_text());
            }
            if d.client.ping().is_ok() {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "dedupd did not answer in 20 s; its log:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        self.client.metrics().unwrap()
    }

    /// An unlabelled sample from the daemon's metrics.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.metrics();
        let parsed = Exposition::parse(&text).unwrap_or_else(|e| panic!("bad metrics ({e}):\n{text}"));
        parsed
            .get(name, &[])
            .unwrap_or_else(|| panic!("no {name} in metrics:\n{text}"))
    }

    /// SIGKILL, as a crash: the mount is left dead.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM and wait for the exit (at most 10 s, then SIGKILL).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Dedupd {
    fn drop(&mut self) {
        self.terminate();
        // Whatever the daemon did or did not do, nothing of this test stays mounted.
        test_support::unmount_under(&self.mountpoint);
    }
}

/// Whether `path` is a mount point in this mount namespace (by /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_string_lossy();
    info.lines().any(|l| l.split_whitespace().nth(4) == Some(&*path))
}

/// Drops the kernel's cached pages of `file`, so the next read reaches the daemon.
pub fn drop_page_cache(file: &std::fs::File) {
    // SAFETY: a valid fd; fadvise only affects caching.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise failed");
}

/// `len` bytes at `offset` of `file`.
pub fn read_at(file: &std::fs::File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// The whole file.
pub fn read_all(path: &Path) -> Vec<u8> {
    let mut buf = Vec::new();
    std::fs::File::open(path).unwrap().read_to_end(&mut buf).unwrap();
    buf
}

/// `GET http://addr/path`, the body of a 200.
pub fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    body.to_string()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
