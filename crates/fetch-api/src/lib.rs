//! The control protocol of `dedupd`, the FUSE fetch daemon, and a blocking client for it.
//!
//! The daemon serves registry blobs (EROFS layer images) as files on a FUSE mount and fetches their
//! chunks from the registry on first access. It is driven over a unix socket: one connection carries
//! one request line and one response line, both JSON.
//!
//! - A request is a [`Request`], tagged by `op`: `{"op":"status","digest":"sha256:..."}`.
//! - A success is `{"ok": VALUE}` where VALUE is the request's result type (see [`Request`]).
//! - A failure is `{"error": {"kind": "NotFound", "message": "..."}}` (see [`Error`]).
//!
//! ```no_run
//! # fn main() -> Result<(), fetch_api::Error> {
//! let client = fetch_api::Client::new("/run/dedupd/dedupd.sock");
//! let ping = client.ping()?;
//! println!("dedupd pid {} serves {}", ping.pid, ping.mountpoint);
//! for blob in client.list()? {
//!     println!("{} {}/{} chunks", blob.digest, blob.present, blob.chunks);
//! }
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The longest line either side reads. A register request for a 100 GiB blob in 1 MiB chunks is
/// about 7 MiB of JSON; a long access trace can be larger still.
pub const MAX_LINE: u64 = 256 << 20;

/// Where a blob is fetched from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Source {
    /// The registry's `host[:port]`, e.g. `127.0.0.1:5000` or `registry-1.docker.io`.
    pub registry: String,
    /// The repository name inside the registry, e.g. `library/busybox`.
    pub repository: String,
}

/// A blob to serve: its identity, how it is cut into chunks, the digest of each chunk, and where to
/// fetch it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobSpec {
    /// `sha256:<64 lowercase hex>`: the digest of the whole blob.
    pub digest: String,
    /// The blob's size in bytes.
    pub size: u64,
    /// The size of every chunk but the last, which may be shorter.
    pub chunk_size: u64,
    /// Lowercase hex sha256 of each `chunk_size` piece of the blob, in order;
    /// `len == ceil(size / chunk_size)`.
    pub chunk_digests: Vec<String>,
    /// Chunk indices the daemon fetches first, in this order, before the rest in index order.
    #[serde(default)]
    pub prefetch: Vec<u32>,
    /// Where the blob is fetched from.
    pub source: Source,
}

impl BlobSpec {
    /// How many chunks the blob has: `ceil(size / chunk_size)` (0 when `chunk_size` is 0).
    pub fn chunk_count(&self) -> u64 {
        if self.chunk_size == 0 {
            0
        } else {
            self.size.div_ceil(self.chunk_size)
        }
    }

    /// The hex part of the digest (`sha256:` removed), if the digest is well formed.
    pub fn hex(&self) -> Option<&str> {
        self.digest.strip_prefix("sha256:").filter(|h| is_sha256_hex(h))
    }

    /// The byte range `[start, end)` of chunk `index`.
    pub fn chunk_range(&self, index: u64) -> (u64, u64) {
        let start = index.saturating_mul(self.chunk_size).min(self.size);
        (start, start.saturating_add(self.chunk_size).min(self.size))
    }

    /// Checks that the spec is self-consistent: digest format, chunk count, chunk digest format,
    /// prefetch indices in range, a non-empty source.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::new(ErrorKind::InvalidArgument, msg));
        if self.hex().is_none() {
            return bad(format!("digest {:?} is not sha256:<64 lowercase hex>", self.digest));
        }
        if self.chunk_size == 0 {
            return bad("chunk_size is 0".into());
        }
        let chunks = self.chunk_count();
        if self.chunk_digests.len() as u64 != chunks {
            return bad(format!(
                "{} chunk digests for {} bytes in chunks of {} (want {chunks})",
                self.chunk_digests.len(),
                self.size,
                self.chunk_size
            ));
        }
        if let Some((i, d)) = self.chunk_digests.iter().enumerate().find(|(_, d)| !is_sha256_hex(d)) {
            return bad(format!("chunk digest {i} {d:?} is not 64 lowercase hex"));
        }
        if let Some(p) = self.prefetch.iter().find(|&&p| u64::from(p) >= chunks) {
            return bad(format!("prefetch chunk {p} is out of range (blob has {chunks} chunks)"));
        }
        if self.source.registry.is_empty() || self.source.repository.is_empty() {
            return bad("source registry and repository must not be empty".into());
        }
        Ok(())
    }
}

/// Whether `s` is a lowercase hex sha256 (64 characters of `0-9a-f`).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A request to the daemon; the comment on each says what `ok` carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// → [`PingInfo`].
    Ping,
    /// Serve a blob (idempotent; a different spec for a known digest is `InvalidArgument`) → [`Registered`].
    Register(BlobSpec),
    /// → [`BlobStatus`].
    Status {
        /// `sha256:<hex>`.
        digest: String,
    },
    /// → `Vec<BlobStatus>`, every registered blob.
    List,
    /// Remove the blob's file and its cache → `null`.
    Unregister {
        /// `sha256:<hex>`.
        digest: String,
    },
    /// → the Prometheus text exposition as one string.
    Metrics,
    /// Start recording every FUSE read (restarting a running trace) → `null`.
    TraceStart,
    /// Stop recording → `Vec<Access>`, the reads since `TraceStart` in arrival order.
    TraceStop,
    /// Wait until the blob is complete and verified, or `timeout_ms` passed → [`BlobStatus`] either way.
    Wait {
        /// `sha256:<hex>`.
        digest: String,
        /// How long the daemon waits at most.
        timeout_ms: u64,
    },
}

/// The answer to [`Request::Ping`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingInfo {
    /// The daemon's process id.
    pub pid: u32,
    /// A random number chosen at each start: a change means the daemon restarted.
    pub instance: u64,
    /// The FUSE mount's absolute path.
    pub mountpoint: String,
}

/// The answer to [`Request::Register`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The absolute path of the blob's file under the FUSE mount.
    pub path: String,
    /// How many chunks are already cached.
    pub present: u64,
    /// Whether every chunk is cached.
    pub complete: bool,
}

/// The state of one blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobStatus {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Number of chunks.
    pub chunks: u64,
    /// Number of cached chunks.
    pub present: u64,
    /// Every chunk is cached.
    pub complete: bool,
    /// The whole cached blob was hashed and matched `digest`.
    pub verified: bool,
    /// Bytes fetched from the registry for this blob by this daemon process.
    pub fetched_bytes: u64,
    /// Failed fetches and verification failures for this blob in this daemon process.
    pub errors: u64,
}

/// One FUSE read, as recorded between [`Request::TraceStart`] and [`Request::TraceStop`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// The blob read.
    pub digest: String,
    /// Byte offset of the read.
    pub offset: u64,
    /// Length the kernel asked for.
    pub len: u64,
}

/// The class of an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The blob (or other thing named) is unknown to the daemon.
    NotFound,
    /// The request is malformed or conflicts with the daemon's state.
    InvalidArgument,
    /// The daemon cannot be reached (no socket, refused, timed out).
    Unavailable,
    /// Anything else going wrong inside the daemon or in the protocol.
    Internal,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// An error from the daemon or from reaching it; also the `error` object on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Error {
    /// What kind of failure this is: what a caller branches on.
    pub kind: ErrorKind,
    /// A human-readable explanation.
    pub message: String,
}

impl Error {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// Shorthand for a `NotFound` error.
    pub fn not_found(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotFound, message)
    }

    /// Shorthand for an `InvalidArgument` error.
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    /// Shorthand for an `Internal` error.
    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Internal, message)
    }

    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// A response line on the wire: `{"ok": ...}` or `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// The request's result.
    Ok(serde_json::Value),
    /// Why the request failed.
    Error(Error),
}

impl Response {
    /// The response line (with its `\n`) for a request's outcome.
    pub fn line<T: Serialize>(result: &Result<T, Error>) -> String {
        let response = match result {
            Ok(v) => match serde_json::to_value(v) {
                Ok(v) => Response::Ok(v),
                Err(e) => Response::Error(Error::internal(format!("cannot encode the answer: {e}"))),
            },
            Err(e) => Response::Error(e.clone()),
        };
        let mut s = serde_json::to_string(&response).expect("a Response always serializes");
        s.push('\n');
        s
    }
}

/// Reads one `\n`-terminated line of at most [`MAX_LINE`] bytes (server and client side).
pub fn read_line(reader: impl Read) -> io::Result<String> {
    let mut line = Vec::new();
    BufReader::new(reader.take(MAX_LINE + 1)).read_until(b'\n', &mut line)?;
    if line.len() as u64 > MAX_LINE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before end of line",
        ));
    }
    line.pop();
    String::from_utf8(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// A blocking client of the daemon's control socket. Each call opens a new connection, so a
/// `Client` is cheap, `Clone`, and usable from any thread.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client of the daemon listening on `socket_path`, with a 30 s timeout per request.
    pub fn new(socket_path: impl AsRef<Path>) -> Client {
        Client {
            path: socket_path.as_ref().to_path_buf(),
            timeout: Duration::from_secs(30),
        }
    }

    /// Sets how long a request may take (connecting, sending, waiting for the answer). A
    /// [`Client::wait`] gets its own timeout on top of this.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The socket this client talks to.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Whether the daemon answers, its pid, instance and mountpoint.
    pub fn ping(&self) -> Result<PingInfo, Error> {
        self.call(&Request::Ping, self.timeout)
    }

    /// Registers a blob (idempotent for the same spec); returns where its file is.
    pub fn register(&self, spec: &BlobSpec) -> Result<Registered, Error> {
        self.call(&Request::Register(spec.clone()), self.timeout)
    }

    /// The state of one blob.
    pub fn status(&self, digest: &str) -> Result<BlobStatus, Error> {
        self.call(
            &Request::Status {
                digest: digest.to_string(),
            },
            self.timeout,
        )
    }

    /// The state of every registered blob.
    pub fn list(&self) -> Result<Vec<BlobStatus>, Error> {
        self.call(&Request::List, self.timeout)
    }

    /// Removes a blob's file and deletes its cache.
    pub fn unregister(&self, digest: &str) -> Result<(), Error> {
        self.call(
            &Request::Unregister {
                digest: digest.to_string(),
            },
            self.timeout,
        )
    }

    /// The daemon's metrics in Prometheus text format.
    pub fn metrics(&self) -> Result<String, Error> {
        self.call(&Request::Metrics, self.timeout)
    }

    /// Starts recording FUSE reads (discarding a trace already running).
    pub fn trace_start(&self) -> Result<(), Error> {
        self.call(&Request::TraceStart, self.timeout)
    }

    /// Stops recording; returns every FUSE read since [`Client::trace_start`] in arrival order.
    pub fn trace_stop(&self) -> Result<Vec<Access>, Error> {
        self.call(&Request::TraceStop, self.timeout)
    }

    /// Waits until the blob is complete and verified, or `timeout` passed; returns its status
    /// either way (check `complete` and `verified`).
    pub fn wait(&self, digest: &str, timeout: Duration) -> Result<BlobStatus, Error> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.call(
            &Request::Wait {
                digest: digest.to_string(),
                timeout_ms,
            },
            self.timeout.saturating_add(timeout),
        )
    }

    /// Sends any request and decodes its result as `T`.
    pub fn call<T: DeserializeOwned>(&self, request: &Request, timeout: Duration) -> Result<T, Error> {
        let unavailable = |what: &str, e: io::Error| {
            Error::new(ErrorKind::Unavailable, format!("{what} {}: {e}", self.path.display()))
        };
        let mut stream = UnixStream::connect(&self.path).map_err(|e| unavailable("cannot connect to", e))?;
        // A zero timeout means "block forever" to the socket API; the smallest real one is meant.
        let timeout = Some(timeout.max(Duration::from_millis(1)));
        stream
            .set_read_timeout(timeout)
            .and_then(|()| stream.set_write_timeout(timeout))
            .map_err(|e| unavailable("cannot configure socket", e))?;
        let mut line = serde_json::to_string(request).map_err(|e| Error::internal(format!("encode request: {e}")))?;
        line.push('\n');
        stream
            .write_all(line.as_bytes())
            .and_then(|()| stream.flush())
            .map_err(|e| unavailable("cannot send to", e))?;
        let answer = read_line(&stream).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => unavailable("no answer in time from", e),
            io::ErrorKind::InvalidData => Error::internal(format!("bad answer from {}: {e}", self.path.display())),
            _ => unavailable("connection failed to", e),
        })?;
        match serde_json::from_str::<Response>(&answer) {
            Ok(Response::Ok(v)) => {
                serde_json::from_value(v).map_err(|e| Error::internal(format!("unexpected answer: {e}")))
            }
            Ok(Response::Error(e)) => Err(e),
            Err(e) => Err(Error::internal(format!("malformed answer {answer:?}: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn spec() -> BlobSpec {
        BlobSpec {
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 2_500_000,
            chunk_size: 1 << 20,
            chunk_digests: vec!["b".repeat(64); 3],
            prefetch: vec![2, 0],
            source: Source {
                registry: "127.0.0.1:5000".into(),
                repository: "layers/x".into(),
            },
        }
    }

    #[test]
    fn requests_are_tagged_by_op() {
        assert_eq!(serde_json::to_string(&Request::Ping).unwrap(), r#"{"op":"ping"}"#);
        assert_eq!(
            serde_json::to_string(&Request::Wait {
                digest: "sha256:x".into(),
                timeout_ms: 5
            })
            .unwrap(),
            r#"{"op":"wait","digest":"sha256:x","timeout_ms":5}"#
        );
        let json = serde_json::to_string(&Request::Register(spec())).unwrap();
        assert!(json.starts_with(r#"{"op":"register","digest":"sha256:aaa"#), "{json}");
        assert_eq!(
            serde_json::from_str::<Request>(&json).unwrap(),
            Request::Register(spec())
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"trace_stop"}"#).unwrap(),
            Request::TraceStop
        );
    }

    #[test]
    fn errors_on_the_wire() {
        let line = Response::line::<()>(&Err(Error::not_found("no blob sha256:x")));
        assert_eq!(
            line,
            "{\"error\":{\"kind\":\"NotFound\",\"message\":\"no blob sha256:x\"}}\n"
        );
        assert_eq!(Response::line(&Ok(3u32)), "{\"ok\":3}\n");
        assert_eq!(Response::line(&Ok(())), "{\"ok\":null}\n");
    }

    #[test]
    fn validates_specs() {
        let s = spec();
        assert_eq!(s.chunk_count(), 3);
        assert_eq!(s.chunk_range(2), (2 << 20, 2_500_000));
        s.validate().unwrap();
        let mut bad = spec();
        bad.chunk_digests.pop();
        assert_eq!(bad.validate().unwrap_err().kind, ErrorKind::InvalidArgument);
        let mut bad = spec();
        bad.prefetch.push(3);
        assert!(bad.validate().is_err());
        let mut bad = spec();
        bad.digest = "sha256:ABC".into();
        assert!(bad.validate().is_err());
        let mut bad = spec();
        bad.chunk_digests[1] = "B".repeat(64);
        assert!(bad.validate().is_err());
    }

    #[test]
    fn unavailable_without_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let e = Client::new(dir.path().join("none.sock")).ping().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
    }

    #[test]
    fn round_trip_against_a_scripted_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            for answer in [
                Response::line(&Ok(PingInfo {
                    pid: 7,
                    instance: 9,
                    mountpoint: "/m".into(),
                })),
                Response::line::<()>(&Err(Error::not_found("nope"))),
                "garbage\n".to_string(),
            ] {
                let (mut conn, _) = listener.accept().unwrap();
                let line = read_line(&conn).unwrap();
                serde_json::from_str::<Request>(&line).unwrap();
                conn.write_all(answer.as_bytes()).unwrap();
            }
        });
        let client = Client::new(&path).with_timeout(Duration::from_secs(5));
        assert_eq!(client.ping().unwrap().pid, 7);
        assert_eq!(client.status("sha256:x").unwrap_err().kind, ErrorKind::NotFound);
        assert_eq!(client.list().unwrap_err().kind, ErrorKind::Internal);
        server.join().unwrap();
    }
}
