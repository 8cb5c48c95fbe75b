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
    Data(Vec<u8>),
    Done(InputStats),
    Failed(Error),
}

const CHUNK: usize = 1 << 20;
const IN_FLIGHT: usize = 4;

/// Reads the input on a thread of its own, hashing it (the input digest) and
/// reporting progress, so the decompressor's core does nothing but inflate.
fn read_input<R: Read>(
    mut input: R,
    progress: Option<&(dyn Fn(u64) + Sync)>,
    tx: SyncSender<Msg>,
    recycle: Receiver<Vec<u8>>,
) {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    loop {
        let mut buf = recycle.try_recv().unwrap_or_else(|_| Vec::with_capacity(CHUNK));
        buf.resize(CHUNK, 0);
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.send(Msg::Failed(Error::io(e)));
                return;
            }
        };
        if n == 0 {
            if let Some(p) = progress {
                p(size);
            }
            let _ = tx.send(Msg::Done(InputStats {
                digest: hasher.finalize().into(),
                size,
            }));
            return;
        }
        buf.truncate(n);
        hasher.update(&buf);
        size += n as u64;
        if let Some(p) = progress {
            p(size);
        }
        if tx.send(Msg::Data(buf)).is_err() {
            return;
        }
    }
}

/// The decompressor: reads the input chunks, inflates, and sends chunks of at most
/// 1 MiB downstream until the end, an error, or the consumer hanging up. `max_size`
/// bounds the uncompressed bytes (a decompression bomb stops here, not on disk).
fn produce(
    mut src: Chunks,
    compression: Option<Compression>,
    max_size: u64,
    tx: SyncSender<Msg>,
    recycle: Receiver<Vec<u8>>,
) {
    let result = (|| -> Result<InputStats, Error> {
        if let Err(e) = src.fill_buf() {
            return Err(src.take_failure().unwrap_or(Error::io(e)));
        }
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
        let _ = tx.send(Msg::Start(c));
        let decoder: Box<dyn Read + '_> = match c {
            Compression::None => Box::new(&mut src),
            Compression::Gzip => Box::new(gzip_decoder(&mut src)),
            Compression::Zstd => Box::new(zstd_decoder(&mut src).map_err(Error::io)?),
        };
        let pumped = pump(decoder, c, max_size, &tx, &recycle);
        if let Some(e) = src.take_failure() {
            return Err(e);
        }
        pumped?;
        // Whatever trails the compressed stream is part of the input digest too.
        if let Err(e) = io::copy(&mut src, &mut io::sink()) {
            return Err(src.take_failure().unwrap_or(Error::io(e)));
        }
        src.done
            .clone()
            .ok_or_else(|| Error::new(ErrorKind::Io, "input ended without its digest"))
    })();
    let msg = match result {
        Ok(stats) => Msg::Done(stats),
        Err(e) => Msg::Failed(e),
    };
    let _ = tx.send(msg);
}

fn pump(
    mut decoder: Box<dyn Read + '_>,
    c: Compression,
    max_size: u64,
    tx: &SyncSender<Msg>,
    recycle: &Receiver<Vec<u8>>,
) -> Result<(), Error> {
    let mut total: u64 = 0;
    loop {
        let mut buf = recycle.try_recv().unwrap_or_else(|_| Vec::with_capacity(CHUNK));
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

/// A [`BufRead`] over chunks sent by another thread. The consumer's view of the
/// uncompressed stream hashes every byte it receives (the diffID); the decompressor's
/// view of the input does not (the reader thread hashed it). A failure on the sending
/// side is held for the caller to report in place of the bare I/O error its parser saw.
pub struct Chunks {
    rx: Receiver<Msg>,
    recycle: SyncSender<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
    hasher: Option<Sha256>,
    compression: Option<Compression>,
    size: u64,
    done: Option<InputStats>,
    failure: Option<Error>,
}

impl Chunks {
    fn new(rx: Receiver<Msg>, recycle: SyncSender<Vec<u8>>, hash: bool) -> Chunks {
        Chunks {
            rx,
            recycle,
            buf: Vec::new(),
            pos: 0,
            hasher: hash.then(Sha256::new),
            compression: None,
            size: 0,
            done: None,
            failure: None,
        }
    }

    /// The sender's error, if the stream failed on its side.
    pub fn take_failure(&mut self) -> Option<Error> {
        self.failure.take()
    }

    /// sha256 and size of the stream and the input stats; only meaningful once the
    /// stream was read to its end.
    pub fn digests(&self) -> ([u8; 32], u64, Option<InputStats>) {
        let digest = match (&self.hasher, &self.done) {
            (Some(h), _) => h.clone().finalize().into(),
            // A plain tar input: the input digest is the diffID, no need to hash twice.
            (None, Some(stats)) => stats.digest,
            (None, None) => [0; 32],
        };
        (digest, self.size, self.done.clone())
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
        while self.pos >= self.buf.len() && self.done.is_none() {
            if self.failure.is_some() {
                return Err(io::Error::other("input stream failed"));
            }
            match self.rx.recv() {
                Ok(Msg::Start(c)) => {
                    self.compression = Some(c);
                    if c == Compression::None {
                        self.hasher = None;
                    }
                }
                Ok(Msg::Data(chunk)) => {
                    if let Some(h) = &mut self.hasher {
                        h.update(&chunk);
                    }
                    self.size += chunk.len() as u64;
                    let old = std::mem::replace(&mut self.buf, chunk);
                    let _ = self.recycle.try_send(old);
                    self.pos = 0;
                }
                Ok(Msg::Done(stats)) => self.done = Some(stats),
                Ok(Msg::Failed(e)) => {
                    self.failure = Some(e);
                    return Err(io::Error::other("input stream failed"));
                }
                Err(_) => return Err(io::Error::other("input thread ended")),
            }
        }
        Ok(&self.buf[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }
}

/// Runs `consume` on the uncompressed form of `input` while scoped threads read and
/// decompress it. Returns `consume`'s result and the compression seen.
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
    let (in_tx, in_rx) = mpsc::sync_channel(IN_FLIGHT);
    let (in_recycle_tx, in_recycle_rx) = mpsc::sync_channel(IN_FLIGHT + 2);
    let (tx, rx) = mpsc::sync_channel(IN_FLIGHT);
    let (recycle_tx, recycle_rx) = mpsc::sync_channel(IN_FLIGHT + 2);
    std::thread::scope(|s| {
        let reader = s.spawn(move || read_input(input, progress, in_tx, in_recycle_rx));
        let compressed = Chunks::new(in_rx, in_recycle_tx, false);
        let producer = s.spawn(move || produce(compressed, compression, max_size, tx, recycle_rx));
        let mut stream = Chunks::new(rx, recycle_tx, true);
        let r = consume(&mut stream);
        let c = stream.compression.unwrap_or(Compression::None);
        // Hang up first so threads blocked on a full channel return.
        drop(stream);
        producer.join().expect("decompressor thread panicked");
        reader.join().expect("input reader thread panicked");
        r.map(|t| (t, c))
    })
}
