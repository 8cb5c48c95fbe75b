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

/// A compression algorithm of [`ChunkCompression`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompressionAlgorithm {
    /// One independent zstd frame per chunk (the registry blob is in zstd's seekable format:
    /// the frames, then a seek table in a skippable frame).
    Zstd,
    /// The registry blob is an unmodified `tar+gzip` or `tar+zstd` layer, and the served file
    /// its uncompressed tar: chunk `i` is decoded from the nearest decompression checkpoint
    /// before it, as [`ChunkCompression::index`] says (a serialized [`tar_index::Index`]).
    TarIndex,
}

/// How a compressed registry blob holds the chunks of the image the daemon serves.
///
/// Chunk `i` is the `i`-th frame of the blob; the frames are contiguous from offset 0, so frame
/// `i` starts at the sum of `sizes[..i]`. Anything after the last frame (the seek table) is never
/// fetched.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkCompression {
    /// How each frame is compressed.
    pub algorithm: CompressionAlgorithm,
    /// Compressed size in bytes of each chunk's frame, in chunk order.
    pub sizes: Vec<u32>,
    /// `sha256:<64 lowercase hex>` of the whole uncompressed image (what the cache file holds when
    /// complete).
    pub uncompressed_digest: String,
    /// For [`CompressionAlgorithm::TarIndex`]: the layer's [`tar_index::Index`], serialized and
    /// base64-encoded (checkpoints, and where each chunk's compressed bytes are); `sizes` is then
    /// empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<String>,
}

/// A blob to serve: its identity, how it is cut into chunks, the digest of each chunk, and where to
/// fetch it.
///
/// `size`, `chunk_size` and `chunk_digests` always describe the file the daemon serves (its cache
/// file); `digest` names the registry blob the bytes are fetched from. They are the same bytes
/// unless `compressed` is set: then the registry blob holds each chunk compressed on its own (see
/// [`BlobSpec::fetch_ranges`] and [`BlobSpec::decode_chunk`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobSpec {
    /// `sha256:<64 lowercase hex>`: the digest of the registry blob (fetching and naming).
    pub digest: String,
    /// The served file's size in bytes (the uncompressed image when `compressed` is set).
    pub size: u64,
    /// The size of every chunk but the last, which may be shorter.
    pub chunk_size: u64,
    /// Lowercase hex sha256 of each `chunk_size` piece of the served file (uncompressed), in order;
    /// `len == ceil(size / chunk_size)`.
    pub chunk_digests: Vec<String>,
    /// Chunk indices the daemon fetches first, in this order, before the rest in index order.
    #[serde(default)]
    pub prefetch: Vec<u32>,
    /// Where the blob is fetched from.
    pub source: Source,
    /// Set when the registry blob holds the chunks compressed one by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compressed: Option<ChunkCompression>,
}

/// The largest frame zstd makes of `len` bytes (`ZSTD_compressBound`): a frame claiming more
/// for a chunk is not one a compressor wrote.
pub fn zstd_bound(len: u64) -> u64 {
    usize::try_from(len).map_or(u64::MAX, |n| zstd::zstd_safe::compress_bound(n) as u64)
}

/// The magic number starting every zstd frame (skippable frames excepted), little endian.
const ZSTD_FRAME_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

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

    /// The digest the complete served file must have: the uncompressed image's when the blob
    /// is compressed, else the blob's own.
    pub fn content_digest(&self) -> &str {
        match &self.compressed {
            Some(c) => &c.uncompressed_digest,
            None => &self.digest,
        }
    }

    /// How chunks come out of the registry blob's bytes: parses the tar index once, so a daemon
    /// keeps the result for the blob's lifetime. Call on a [validated](BlobSpec::validate) spec.
    pub fn decoder(&self) -> Result<ChunkDecoder, Error> {
        let Some(c) = &self.compressed else {
            return Ok(ChunkDecoder::Plain);
        };
        match c.algorithm {
            CompressionAlgorithm::Zstd => Ok(ChunkDecoder::Zstd(c.sizes.clone())),
            CompressionAlgorithm::TarIndex => Ok(ChunkDecoder::TarIndex(std::sync::Arc::new(parse_index(c)?))),
        }
    }

    /// The registry blob's byte range `[start, end)` holding each chunk, in chunk order: the
    /// chunk's own range for a plain blob, its frame's for a compressed one, from its checkpoint
    /// to past its end for a tar index. Call on a [validated](BlobSpec::validate) spec
    /// (otherwise a compressed spec's ranges may not cover every chunk).
    pub fn fetch_ranges(&self) -> Vec<(u64, u64)> {
        match self.decoder() {
            Ok(d) => d.fetch_ranges(self),
            Err(_) => Vec::new(),
        }
    }

    /// The bytes of chunk `index` from what its [fetch range](BlobSpec::fetch_ranges) held (see
    /// [`ChunkDecoder::decode`]; a daemon keeps one [`BlobSpec::decoder`] instead).
    pub fn decode_chunk(&self, index: u64, raw: Vec<u8>) -> Result<Vec<u8>, String> {
        self.decoder().map_err(|e| e.message)?.decode(self, index, raw)
    }

    /// Checks that the spec is self-consistent: digest format, chunk count, chunk digest format,
    /// prefetch indices in range, a non-empty source, and for a compressed blob one frame size per
    /// chunk, each possible for its chunk, and a well-formed uncompressed digest.
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
        if let Some(c) = &self.compressed {
            let hex = c.uncompressed_digest.strip_prefix("sha256:").unwrap_or("");
            if !is_sha256_hex(hex) {
                return bad(format!(
                    "uncompressed digest {:?} is not sha256:<64 lowercase hex>",
                    c.uncompressed_digest
                ));
            }
            if c.algorithm == CompressionAlgorithm::TarIndex {
                return self.validate_tar_index(c);
            }
            if c.index.is_some() {
                return bad("a tar index given for zstd chunks".into());
            }
            if c.sizes.len() as u64 != chunks {
                return bad(format!("{} compressed sizes for {chunks} chunks", c.sizes.len()));
            }
            for (i, &n) in c.sizes.iter().enumerate() {
                let (start, end) = self.chunk_range(i as u64);
                let bound = zstd_bound(end - start);
                if n == 0 || u64::from(n) > bound {
                    return bad(format!(
                        "compressed size {n} of chunk {i} is not in 1..={bound} for its {} bytes",
                        end - start
                    ));
                }
            }
        }
        Ok(())
    }
}

impl BlobSpec {
    /// A tar index must describe exactly this spec: the blob it was made from (its digest), the
    /// served file (size, chunking, every chunk digest) and its whole digest.
    fn validate_tar_index(&self, c: &ChunkCompression) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::new(ErrorKind::InvalidArgument, msg));
        let index = parse_index(c)?;
        if !c.sizes.is_empty() {
            return bad("frame sizes given with a tar index".into());
        }
        let hex_of = |d: &[u8; 32]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        if self.hex() != Some(hex_of(&index.compressed_digest).as_str()) {
            return bad(format!("the tar index was made from another blob than {}", self.digest));
        }
        if c.uncompressed_digest != format!("sha256:{}", hex_of(&index.uncompressed_digest)) {
            return bad(format!(
                "the tar index is of an uncompressed layer other than {}",
                c.uncompressed_digest
            ));
        }
        if index.uncompressed_size != self.size || index.chunk_size != self.chunk_size {
            return bad(format!(
                "the tar index describes {} bytes in chunks of {}, the spec {} in chunks of {}",
                index.uncompressed_size, index.chunk_size, self.size, self.chunk_size
            ));
        }
        if index.chunk_digests.len() != self.chunk_digests.len()
            || index
                .chunk_digests
                .iter()
                .zip(&self.chunk_digests)
                .any(|(a, b)| hex_of(a) != *b)
        {
            return bad("the tar index's chunk digests differ from the spec's".into());
        }
        Ok(())
    }
}

/// How the chunks of one blob are decoded (see [`BlobSpec::decoder`]).
#[derive(Debug, Clone)]
pub enum ChunkDecoder {
    /// The blob is the served file.
    Plain,
    /// One zstd frame per chunk, of these sizes.
    Zstd(Vec<u32>),
    /// An unmodified compressed tar layer and its index.
    TarIndex(std::sync::Arc<tar_index::Index>),
}

impl ChunkDecoder {
    /// See [`BlobSpec::fetch_ranges`].
    pub fn fetch_ranges(&self, spec: &BlobSpec) -> Vec<(u64, u64)> {
        match self {
            ChunkDecoder::Plain => (0..spec.chunk_count()).map(|i| spec.chunk_range(i)).collect(),
            ChunkDecoder::Zstd(sizes) => {
                let mut start = 0u64;
                sizes
                    .iter()
                    .map(|&n| {
                        let end = start + u64::from(n);
                        let r = (start, end);
                        start = end;
                        r
                    })
                    .collect()
            }
            ChunkDecoder::TarIndex(index) => (0..index.chunk_count()).map(|i| index.fetch_range(i)).collect(),
        }
    }

    /// The bytes of chunk `index` from what its fetch range held: `raw` itself for a plain
    /// blob; for zstd chunks, `raw` must be exactly one zstd frame that decompresses to exactly
    /// the chunk's length; for a tar index, what decompressing from the chunk's checkpoint gives
    /// for the chunk's range. The output is the chunk's length and no more, so the input cannot
    /// make the daemon allocate beyond it. The caller still checks the result against the
    /// chunk's digest.
    pub fn decode(&self, spec: &BlobSpec, index: u64, raw: Vec<u8>) -> Result<Vec<u8>, String> {
        if matches!(self, ChunkDecoder::Plain) {
            return Ok(raw);
        }
        if index >= spec.chunk_count() {
            return Err(format!("chunk {index} out of range ({} chunks)", spec.chunk_count()));
        }
        let (start, end) = spec.chunk_range(index);
        let len = usize::try_from(end - start).map_err(|_| format!("chunk {index} is too large"))?;
        match self {
            ChunkDecoder::Plain => Ok(raw),
            ChunkDecoder::Zstd(_) => decode_zstd_frame(&raw, len).map_err(|e| format!("chunk {index}: {e}")),
            ChunkDecoder::TarIndex(ix) => {
                let out = ix
                    .decode_chunk(index, &raw)
                    .map_err(|e| format!("chunk {index}: {e}"))?;
                if out.len() != len {
                    return Err(format!("chunk {index} decodes to {} bytes, not {len}", out.len()));
                }
                Ok(out)
            }
        }
    }
}

/// The tar index of `c`, decoded and checked.
fn parse_index(c: &ChunkCompression) -> Result<tar_index::Index, Error> {
    use base64::Engine as _;
    let b64 = c
        .index
        .as_deref()
        .ok_or_else(|| Error::invalid("tar index compression without an index"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| Error::invalid(format!("tar index: bad base64: {e}")))?;
    tar_index::Index::from_bytes(&bytes).map_err(|e| Error::invalid(format!("tar index: {e}")))
}

/// Decompresses `frame`, which must be exactly one zstd frame of exactly `len` bytes of content.
fn decode_zstd_frame(frame: &[u8], len: usize) -> Result<Vec<u8>, String> {
    // ZSTD_decompress would also decode frames after the first and skip skippable ones:
    // the bytes must be one data frame and nothing else.
    if !frame.starts_with(&ZSTD_FRAME_MAGIC) {
        return Err("not a zstd frame".into());
    }
    match zstd::zstd_safe::find_frame_compressed_size(frame) {
        Ok(n) if n == frame.len() => {}
        Ok(n) => return Err(format!("{} bytes after the {n}-byte zstd frame", frame.len() - n)),
        Err(code) => return Err(format!("bad zstd frame: {}", zstd::zstd_safe::get_error_name(code))),
    }
    let mut out = vec![0u8; len];
    let n = zstd::zstd_safe::decompress(&mut out[..], frame).map_err(|code| {
        format!(
            "zstd frame does not decompress to {len} bytes: {}",
            zstd::zstd_safe::get_error_name(code)
        )
    })?;
    if n != len {
        return Err(format!("zstd frame decompresses to {n} bytes, not {len}"));
    }
    Ok(out)
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
    /// Which incarnation serves the blobs: a change means mounts made before it read nothing new and must be
    /// made again (a FUSE daemon's restart; a fanotify daemon keeps its number across restarts).
    pub instance: u64,
    /// The directory where each blob has a file named `sha256-<hex>`: the FUSE mount, or (fanotify) a
    /// directory of links to the cache files.
    pub mountpoint: String,
    /// How the kernel's reads of lazy blobs reach the daemon: `fanotify` or `fuse`.
    #[serde(default)]
    pub data_path: String,
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
            compressed: None,
        }
    }

    fn sha256(data: &[u8]) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(data))
    }

    /// An image of three chunks (the last short) of mixed compressibility, its spec with one
    /// zstd frame per chunk, and the blob (frames then a dummy seek table).
    fn compressed() -> (Vec<u8>, BlobSpec, Vec<u8>) {
        let chunk = 4096usize;
        let mut image: Vec<u8> = b"compressible text ".iter().cycle().take(2 * chunk).copied().collect();
        let mut x = 0x9e3779b97f4a7c15u64;
        image.extend((0..1000).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        }));
        let frames: Vec<Vec<u8>> = image
            .chunks(chunk)
            .map(|c| zstd::bulk::compress(c, 3).unwrap())
            .collect();
        let mut blob: Vec<u8> = frames.concat();
        blob.extend_from_slice(&[0x5e, 0x2a, 0x4d, 0x18, 0, 0, 0, 0]);
        let spec = BlobSpec {
            digest: format!("sha256:{}", sha256(&blob)),
            size: image.len() as u64,
            chunk_size: chunk as u64,
            chunk_digests: image.chunks(chunk).map(sha256).collect(),
            prefetch: vec![],
            source: spec().source,
            compressed: Some(ChunkCompression {
                algorithm: CompressionAlgorithm::Zstd,
                sizes: frames.iter().map(|f| f.len() as u32).collect(),
                uncompressed_digest: format!("sha256:{}", sha256(&image)),
                index: None,
            }),
        };
        (image, spec, blob)
    }

    #[test]
    fn plain_specs_fetch_their_own_ranges() {
        let s = spec();
        assert_eq!(s.content_digest(), s.digest);
        assert_eq!(
            s.fetch_ranges(),
            vec![(0, 1 << 20), (1 << 20, 2 << 20), (2 << 20, 2_500_000)]
        );
        assert_eq!(s.decode_chunk(1, vec![1, 2, 3]).unwrap(), vec![1, 2, 3]);
        // Old daemons and clients neither send nor expect the field.
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("compressed"), "{json}");
    }

    #[test]
    fn compressed_chunks_decode_from_their_frames() {
        let (image, s, blob) = compressed();
        s.validate().unwrap();
        assert_eq!(s.content_digest(), s.compressed.as_ref().unwrap().uncompressed_digest);
        let ranges = s.fetch_ranges();
        assert_eq!(ranges.len(), 3);
        assert_eq!(ranges[0].0, 0);
        assert!(ranges.windows(2).all(|w| w[0].1 == w[1].0), "{ranges:?}");
        assert_eq!(ranges[2].1, blob.len() as u64 - 8, "the seek table is not fetched");
        for (i, &(start, end)) in ranges.iter().enumerate() {
            let got = s
                .decode_chunk(i as u64, blob[start as usize..end as usize].to_vec())
                .unwrap();
            let (a, b) = s.chunk_range(i as u64);
            assert_eq!(got, image[a as usize..b as usize], "chunk {i}");
        }
        let json = serde_json::to_string(&Request::Register(s.clone())).unwrap();
        assert!(json.contains(r#""compressed":{"algorithm":"zstd","sizes":["#), "{json}");
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), Request::Register(s));
    }

    #[test]
    fn hostile_frames_are_refused() {
        let (image, s, blob) = compressed();
        let r = s.fetch_ranges();
        let frame = |i: usize| blob[r[i].0 as usize..r[i].1 as usize].to_vec();
        let err = |i: u64, raw: Vec<u8>| s.decode_chunk(i, raw).unwrap_err();
        // Chunk 0's frame decompresses to 4096 bytes: too few for nothing, but for the last
        // chunk (1000 bytes) it is too many, and the short frame is too few for chunk 0.
        assert!(
            err(2, frame(0)).contains("does not decompress to 1000"),
            "{}",
            err(2, frame(0))
        );
        assert!(err(0, frame(2)).contains("decompresses to 1000 bytes, not 4096"));
        // A frame of far more than the chunk (a decompression bomb) fails at the chunk's size.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
        assert!(bomb.len() < 64 << 10);
        assert!(err(0, bomb).contains("does not decompress to 4096"));
        // Two frames, trailing bytes, a skippable frame, garbage, nothing, truncation.
        let mut two = frame(0);
        two.extend(frame(1));
        assert!(err(0, two).contains("after the"));
        let mut trailing = frame(0);
        trailing.push(0);
        assert!(err(0, trailing).contains("1 bytes after"));
        assert!(err(2, blob[r[2].1 as usize..].to_vec()).contains("not a zstd frame"));
        assert!(err(0, b"garbage garbage".to_vec()).contains("not a zstd frame"));
        assert!(err(0, Vec::new()).contains("not a zstd frame"));
        let f = frame(2);
        assert!(err(2, f[..f.len() - 1].to_vec()).contains("bad zstd frame"));
        let mut corrupt = frame(2);
        let mid = corrupt.len() / 2;
        corrupt[mid] ^= 0xff;
        match s.decode_chunk(2, corrupt) {
            Err(_) => {}
            // zstd frames need not carry a checksum: a flipped literal can decode; the
            // chunk digest catches it.
            Ok(out) => assert_ne!(out, image[8192..]),
        }
        assert!(err(3, frame(0)).contains("out of range"));
    }

    #[test]
    fn validates_compressed_specs() {
        let (_, s, _) = compressed();
        let with = |f: &dyn Fn(&mut ChunkCompression)| {
            let mut b = s.clone();
            f(b.compressed.as_mut().unwrap());
            b.validate().unwrap_err().message
        };
        assert!(with(&|c| {
            c.sizes.pop();
        })
        .contains("2 compressed sizes for 3 chunks"));
        assert!(with(&|c| c.sizes[1] = 0).contains("chunk 1"));
        assert!(with(&|c| c.sizes[2] = zstd_bound(1000) as u32 + 1).contains("chunk 2"));
        assert!(with(&|c| c.sizes[0] = u32::MAX).contains("chunk 0"));
        assert!(with(&|c| c.uncompressed_digest = "sha256:abc".into()).contains("uncompressed digest"));
        let mut b = s.clone();
        b.compressed.as_mut().unwrap().sizes[2] = zstd_bound(1000) as u32;
        b.validate().unwrap();
        // An unknown algorithm does not even parse.
        let json = serde_json::to_string(&s).unwrap().replace(r#""zstd""#, r#""lzma""#);
        assert!(serde_json::from_str::<BlobSpec>(&json).is_err());
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
                    data_path: "fuse".into(),
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

    /// A gzip blob of 300 KB of mixed bytes, its tar-index spec (chunks of 64 KiB) and the uncompressed bytes.
    fn tar_index_spec() -> (Vec<u8>, Vec<u8>, BlobSpec) {
        use base64::Engine as _;
        use std::io::Write as _;
        let plain: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 & 0x3f)
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let opts = tar_index::IndexOptions {
            chunk_size: 64 << 10,
            max_uncompressed: 1 << 30,
        };
        let mut ix = tar_index::Indexer::new(tar_index::Format::Gzip, &gz[..], opts).unwrap();
        std::io::copy(&mut ix, &mut std::io::sink()).unwrap();
        let ix = ix.finish().unwrap();
        let spec = BlobSpec {
            digest: format!("sha256:{}", sha256(&gz)),
            size: plain.len() as u64,
            chunk_size: 64 << 10,
            chunk_digests: plain.chunks(64 << 10).map(sha256).collect(),
            prefetch: vec![],
            source: spec().source,
            compressed: Some(ChunkCompression {
                algorithm: CompressionAlgorithm::TarIndex,
                sizes: vec![],
                uncompressed_digest: format!("sha256:{}", sha256(&plain)),
                index: Some(base64::engine::general_purpose::STANDARD.encode(ix.to_bytes())),
            }),
        };
        (gz, plain, spec)
    }

    #[test]
    fn tar_index_chunks_decode_from_their_ranges() {
        let (gz, plain, spec) = tar_index_spec();
        spec.validate().unwrap();
        assert_eq!(spec.content_digest(), format!("sha256:{}", sha256(&plain)));
        let d = spec.decoder().unwrap();
        let ranges = d.fetch_ranges(&spec);
        assert_eq!(ranges.len() as u64, spec.chunk_count());
        for (i, &(s, e)) in ranges.iter().enumerate() {
            let got = d.decode(&spec, i as u64, gz[s as usize..e as usize].to_vec()).unwrap();
            let (a, b) = spec.chunk_range(i as u64);
            assert!(got == plain[a as usize..b as usize], "chunk {i}");
        }
        // A range cut short is an error, not short bytes.
        let (s, e) = ranges[1];
        assert!(d.decode(&spec, 1, gz[s as usize..e as usize - 1].to_vec()).is_err());
    }

    #[test]
    fn tar_index_specs_must_match_their_index() {
        let (_, _, good) = tar_index_spec();
        let bad = |f: &dyn Fn(&mut BlobSpec)| {
            let mut s = good.clone();
            f(&mut s);
            s.validate().map_err(|e| e.kind)
        };
        let invalid = Err(ErrorKind::InvalidArgument);
        assert_eq!(
            bad(&|s| s.digest = format!("sha256:{}", "b".repeat(64))),
            invalid,
            "another blob"
        );
        assert_eq!(bad(&|s| s.size += 1), invalid, "another size");
        assert_eq!(bad(&|s| s.chunk_digests[2] = "c".repeat(64)), invalid, "a chunk digest");
        assert_eq!(
            bad(&|s| s.compressed.as_mut().unwrap().uncompressed_digest = format!("sha256:{}", "d".repeat(64))),
            invalid,
            "another diffID"
        );
        assert_eq!(
            bad(&|s| s.compressed.as_mut().unwrap().index = None),
            invalid,
            "no index"
        );
        assert_eq!(
            bad(&|s| s.compressed.as_mut().unwrap().index = Some("%%%".into())),
            invalid,
            "bad base64"
        );
        assert_eq!(
            bad(&|s| s.compressed.as_mut().unwrap().index = Some("AAAA".into())),
            invalid,
            "not an index"
        );
        assert_eq!(
            bad(&|s| s.compressed.as_mut().unwrap().sizes = vec![1]),
            invalid,
            "frame sizes too"
        );
    }
}
