//! The input side of the pipeline: compression detection, a decompressing producer
//! thread, and a [`BufRead`] over the chunks it sends.
//!
//! Decompression is the one step that cannot be split, so it gets a core of its own:
//! the producer reads, hashes the compressed bytes and inflates; the consumer (the
//! converter's thread) hashes the uncompressed bytes for the diffID, parses tar and
//! writes EROFS. Chunks travel through a bounded channel and come back for reuse, so
//! memory stays at a few MiB whatever the layer size.

use std::io::{self, BufRead, Read};
use std::sync::mpsc::{self, Receiver, SyncSender};

use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind};

/// Compression of a layer stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (one or more members).
    Gzip,
    /// zstd (one or more frames).
    Zstd,
}

impl Compression {
    /// Name as printed.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    /// The compression an OCI or Docker layer media type declares. EROFS-native types
    /// and anything unknown are refused: they are not tar layers.
    pub fn from_media_type(mt: &str) -> Result<Compression, Error> {
        let known_tar = [
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.oci.image.layer.nondistributable.v1.tar",
            "application/vnd.docker.image.rootfs.diff.tar",
            "application/vnd.docker.image.rootfs.foreign.diff.tar",
        ];
        let (base, suffix) = match mt.split_once('+') {
            Some((b, s)) => (b, Some(s)),
            None => (mt, None),
        };
        let docker_gzip = matches!(
            mt,
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
                | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
        );
        if docker_gzip {
            return Ok(Compression::Gzip);
        }
        if !known_tar.contains(&base) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("media type {mt:?} is not a tar layer"),
            ));
        }
        match suffix {
            None => Ok(Compression::None),
            Some("gzip") => Ok(Compression::Gzip),
            Some("zstd") => Ok(Compression::Zstd),
            Some(s) => Err(Error::new(
                ErrorKind::Unsupported,
                format!("media type {mt:?}: unknown compression {s:?}"),
            )),
        }
    }

    /// Detects the compression from the first bytes of a stream.
    pub fn sniff(head: &[u8]) -> Result<Compression, Error> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Ok(Compression::Gzip)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Ok(Compression::Zstd)
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Err(Error::new(
                ErrorKind::Unsupported,
                "xz-compressed layers are not supported",
            ))
        } else if head.starts_with(b"BZh") {
            Err(Error::new(
                ErrorKind::Unsupported,
                "bzip2-compressed layers are not supported",
            ))
        } else {
            Ok(Compression::None)
        }
    }
}

/// The gzip decoder the converter uses (flate2 on zlib-rs; multi-member streams).
pub fn gzip_decoder<R: BufRead>(r: R) -> impl Read {
    flate2::bufread::MultiGzDecoder::new(r)
}

/// The zstd decoder the converter uses (multi-frame streams).
pub fn zstd_decoder<R: BufRead>(r: R) -> io::Result<impl Read> {
    zstd::stream::read::Decoder::with_buffer(r)
}

/// Digest and size of the input as read.
#[derive(Debug, Clone, Default)]
pub struct InputStats {
    /// sha256 of the input bytes.
    pub digest: [u8; 32],
    /// Input size.
    pub size: u64,
}

enum Msg {
    /// The producer's first message: the compression it found.
    Start(Compression),
    /// Input bytes the decompressor is done with, for the consumer to hash.
    Compressed(Vec<u8>),
    /// Uncompressed bytes.
    Data(Vec<u8>),
    Done,
    Failed(Error),
}

const CHUNK: usize = 1 << 20;
const IN_FLIGHT: usize = 6;

/// The decompressor's input: reads `inner` in 1 MiB chunks and, once the decoder has
/// consumed a chunk, hands it to the consumer to hash (the input digest). Hashing
/// there keeps this thread's core for inflating alone, and moving the buffer costs no
/// copy.
struct TeeInput<'p, R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
    tee: bool,
    size: u64,
    eof: bool,
    tx: SyncSender<Msg>,
    recycle: Receiver<Vec<u8>>,
    progress: Option<&'p (dyn Fn(u64) + Sync)>,
}

impl<R: Read> TeeInput<'_, R> {
    fn fresh_buffer(&self) -> Vec<u8> {
        let mut b = self.recycle.try_recv().unwrap_or_default();
        b.clear();
        b.reserve(CHUNK);
        b
    }

    /// Hands the consumed chunk over and reads the next one.
    fn refill(&mut self) -> io::Result<()> {
        let next = self.fresh_buffer();
        let done = std::mem::replace(&mut self.buf, next);
        self.pos = 0;
        if self.tee && !done.is_empty() && self.tx.send(Msg::Compressed(done)).is_err() {
            return Err(io::Error::other("consumer hung up"));
        }
        // Read until the chunk is full or the input ends: fewer, larger messages.
        while self.buf.len() < CHUNK {
            let start = self.buf.len();
            self.buf.resize(CHUNK, 0);
            match self.inner.read(&mut self.buf[start..]) {
                Ok(0) => {
                    self.buf.truncate(start);
                    self.eof = true;
                    break;
                }
                Ok(n) => self.buf.truncate(start + n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.buf.truncate(start),
                Err(e) => {
                    self.buf.truncate(start);
                    return Err(e);
                }
            }
        }
        self.size += self.buf.len() as u64;
        if let Some(p) = self.progress {
            p(self.size);
        }
        Ok(())
    }

    /// Sends the last chunk for hashing.
    fn flush(&mut self) -> io::Result<()> {
        let done = std::mem::take(&mut self.buf);
        if self.tee && !done.is_empty() && self.tx.send(Msg::Compressed(done)).is_err() {
            return Err(io::Error::other("consumer hung up"));
        }
        Ok(())
    }
}

impl<R: Read> Read for TeeInput<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: Read> BufRead for TeeInput<'_, R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos >= self.buf.len() && !self.eof {
            self.refill()?;
        }
        Ok(&self.buf[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }
}

/// The decompressor thread: reads the input, inflates, and sends chunks of at most
/// 1 MiB downstream until the end, an error, or the consumer hanging up. `max_size`
/// bounds the uncompressed bytes (a decompression bomb stops here, not on disk).
fn produce<R: Read>(
    input: R,
    compression: Option<Compression>,
    max_size: u64,
    progress: Option<&(dyn Fn(u64) + Sync)>,
    tx: SyncSender<Msg>,
    recycle: Receiver<Vec<u8>>,
    data_recycle: Receiver<Vec<u8>>,
) {
    let mut src = TeeInput {
        inner: input,
        buf: Vec::new(),
        pos: 0,
        tee: true,
        size: 0,
        eof: false,
        tx: tx.clone(),
        recycle,
        progress,
    };
    let result = (|| -> Result<(), Error> {
        let head = src.fill_buf().map_err(Error::io)?;
        let sniffed = Compression::sniff(head)?;
        let c = compression.unwrap_or(sniffed);
        if compression.is_some() && c != sniffed && !head.is_empty() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "the media type says {} but the stream looks like {}",
                    c.name(),
                    sniffed.name()
                ),
            ));
        }
        // A plain tar is its own diffID: the consumer hashes it once, as data.
        src.tee = c != Compression::None;
        let _ = tx.send(Msg::Start(c));
        match c {
            Compression::None => pump(&mut src, c, max_size, &tx, &data_recycle)?,
            Compression::Gzip => pump(gzip_decoder(&mut src), c, max_size, &tx, &data_recycle)?,
            Compression::Zstd => pump(
                zstd_decoder(&mut src).map_err(Error::io)?,
                c,
                max_size,
                &tx,
                &data_recycle,
            )?,
        }
        // Whatever trails the compressed stream is part of the input digest too.
        io::copy(&mut src, &mut io::sink()).map_err(Error::io)?;
        src.flush().map_err(Error::io)?;
        Ok(())
    })();
    let msg = match result {
        Ok(()) => Msg::Done,
        Err(e) => Msg::Failed(e),
    };
    let _ = tx.send(msg);
}

fn pump(
    mut decoder: impl Read,
    c: Compression,
    max_size: u64,
    tx: &SyncSender<Msg>,
    recycle: &Receiver<Vec<u8>>,
) -> Result<(), Error> {
    let mut total: u64 = 0;
    loop {
        let mut buf = recycle.try_recv().unwrap_or_default();
        buf.resize(CHUNK, 0);
        let mut filled = 0;
        while filled < CHUNK {
            match decoder.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(decode_error(c, e, total + filled as u64)),
            }
        }
        buf.truncate(filled);
        total += filled as u64;
        if total > max_size {
            return Err(Error::new(
                ErrorKind::SizeLimit,
                format!("the uncompressed layer exceeds the limit of {max_size} bytes (--max-size)"),
            ));
        }
        if filled == 0 {
            return Ok(());
        }
        if tx.send(Msg::Data(buf)).is_err() {
            // The consumer gave up (it has its own error to report).
            return Ok(());
        }
    }
}

fn decode_error(c: Compression, e: io::Error, at: u64) -> Error {
    match (c, e.kind()) {
        (Compression::None, _) => Error::io(e),
        (_, io::ErrorKind::UnexpectedEof) => {
            Error::new(ErrorKind::Truncated, format!("{} stream ended early: {e}", c.name())).at(at)
        }
        (_, io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData | io::ErrorKind::Other) => {
            Error::new(ErrorKind::Decompress, format!("{}: {e}", c.name())).at(at)
        }
        _ => Error::io(e),
    }
}

/// The consumer's view of the uncompressed stream, a [`BufRead`] over the chunks the
/// decompressor sends. It hashes every uncompressed byte (the diffID) and every input
/// byte passed along (the input digest). A failure on the decompressor's side is held
/// for the caller to report in place of the bare I/O error its parser saw.
pub struct Chunks {
    rx: Receiver<Msg>,
    recycle: SyncSender<Vec<u8>>,
    data_recycle: SyncSender<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
    hasher: Sha256,
    input_hasher: Sha256,
    input_size: u64,
    compression: Option<Compression>,
    size: u64,
    done: bool,
    failure: Option<Error>,
}

impl Chunks {
    /// The decompressor's error, if the stream failed on its side.
    pub fn take_failure(&mut self) -> Option<Error> {
        self.failure.take()
    }

    /// sha256 and size of the uncompressed stream and the input stats; `None` until
    /// the stream was read to its end.
    pub fn digests(&self) -> Option<([u8; 32], u64, InputStats)> {
        if !self.done {
            return None;
        }
        let diff: [u8; 32] = self.hasher.clone().finalize().into();
        let input = match self.compression {
            Some(Compression::None) | None => InputStats {
                digest: diff,
                size: self.size,
            },
            _ => InputStats {
                digest: self.input_hasher.clone().finalize().into(),
                size: self.input_size,
            },
        };
        Some((diff, self.size, input))
    }
}

impl Read for Chunks {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Chunks {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos >= self.buf.len() && !self.done {
            if self.failure.is_some() {
                return Err(io::Error::other("input stream failed"));
            }
            match self.rx.recv() {
                Ok(Msg::Start(c)) => self.compression = Some(c),
                Ok(Msg::Compressed(chunk)) => {
                    self.input_hasher.update(&chunk);
                    self.input_size += chunk.len() as u64;
                    let _ = self.recycle.try_send(chunk);
                }
                Ok(Msg::Data(chunk)) => {
                    self.hasher.update(&chunk);
                    self.size += chunk.len() as u64;
                    let old = std::mem::replace(&mut self.buf, chunk);
                    let _ = self.data_recycle.try_send(old);
                    self.pos = 0;
                }
                Ok(Msg::Done) => self.done = true,
                Ok(Msg::Failed(e)) => {
                    self.failure = Some(e);
                    return Err(io::Error::other("input stream failed"));
                }
                Err(_) => return Err(io::Error::other("decompressor thread ended")),
            }
        }
        Ok(&self.buf[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }
}

/// Runs `consume` on the uncompressed form of `input` while a scoped thread reads and
/// decompresses it. Returns `consume`'s result and the compression seen.
pub fn with_uncompressed<R, T>(
    input: R,
    compression: Option<Compression>,
    max_size: u64,
    progress: Option<&(dyn Fn(u64) + Sync)>,
    consume: impl FnOnce(&mut Chunks) -> Result<T, Error>,
) -> Result<(T, Compression), Error>
where
    R: Read + Send,
{
    let (tx, rx) = mpsc::sync_channel(IN_FLIGHT);
    let (recycle_tx, recycle_rx) = mpsc::sync_channel(IN_FLIGHT + 2);
    let (data_recycle_tx, data_recycle_rx) = mpsc::sync_channel(IN_FLIGHT + 2);
    std::thread::scope(|s| {
        let producer = std::thread::Builder::new()
            .name("layer-inflate".into())
            .spawn_scoped(s, move || {
                produce(input, compression, max_size, progress, tx, recycle_rx, data_recycle_rx)
            })
            .map_err(Error::io)?;
        let mut stream = Chunks {
            rx,
            recycle: recycle_tx,
            data_recycle: data_recycle_tx,
            buf: Vec::new(),
            pos: 0,
            hasher: Sha256::new(),
            input_hasher: Sha256::new(),
            input_size: 0,
            compression: None,
            size: 0,
            done: false,
            failure: None,
        };
        let r = consume(&mut stream);
        let c = stream.compression.unwrap_or(Compression::None);
        // Hang up first so a producer blocked on a full channel returns.
        drop(stream);
        producer.join().expect("decompressor thread panicked");
        r.map(|t| (t, c))
    })
}
