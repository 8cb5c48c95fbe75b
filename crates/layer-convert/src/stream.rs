//! The input side of the pipeline: compression detection, a decompressing producer
//! thread, and a [`BufRead`] over the chunks it sends.
//!
//! Decompression is the one step that cannot be split, so it gets a core of its own:
//! the producer reads, hashes the compressed bytes and inflates; the consumer (the
//! converter's thread) hashes the uncompressed bytes for the diffID, parses tar and
//! writes EROFS. Chunks travel through a bounded channel and come back for reuse, so
//! memory stays at a few MiB whatever the layer size.

use std::io::{self, BufRead, BufReader, Read};
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
            return Err(Error::new(ErrorKind::Unsupported, format!("media type {mt:?} is not a tar layer")));
        }
        match suffix {
            None => Ok(Compression::None),
            Some("gzip") => Ok(Compression::Gzip),
            Some("zstd") => Ok(Compression::Zstd),
            Some(s) => Err(Error::new(ErrorKind::Unsupported, format!("media type {mt:?}: unknown compression {s:?}"))),
        }
    }

    /// Detects the compression from the first bytes of a stream.
    pub fn sniff(head: &[u8]) -> Result<Compression, Error> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Ok(Compression::Gzip)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Ok(Compression::Zstd)
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Err(Error::new(ErrorKind::Unsupported, "xz-compressed layers are not supported"))
        } else if head.starts_with(b"BZh") {
            Err(Error::new(ErrorKind::Unsupported, "bzip2-compressed layers are not supported"))
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

/// A reader that hashes what passes through and reports progress.
struct Hashing<'p, R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    progress: Option<&'p (dyn Fn(u64) + Sync)>,
    reported: u64,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if let Some(p) = self.progress {
            if self.count - self.reported >= 1 << 20 || n == 0 {
                p(self.count);
                self.reported = self.count;
            }
        }
        Ok(n)
    }
}

enum Msg {
    Data(Vec<u8>),
    Done(InputStats),
    Failed(Error),
}

const CHUNK: usize = 1 << 20;
const IN_FLIGHT: usize = 4;

/// Runs the producer: reads `input`, decompresses it, and sends chunks of at most
/// 1 MiB until the end, an error, or the consumer hanging up. `max_size` bounds the
/// uncompressed bytes (a decompression bomb stops here, not in the filesystem).
fn produce<R: Read>(
    input: R,
    compression: Option<Compression>,
    max_size: u64,
    progress: Option<&(dyn Fn(u64) + Sync)>,
    tx: SyncSender<Msg>,
    recycle: Receiver<Vec<u8>>,
    detected: &mut Compression,
) {
    let hashing = Hashing { inner: input, hasher: Sha256::new(), count: 0, progress, reported: 0 };
    let mut src = BufReader::with_capacity(256 << 10, hashing);
    let result = (|| -> Result<(), Error> {
        let head = src.fill_buf().map_err(Error::io)?;
        let sniffed = Compression::sniff(head)?;
        let c = compression.unwrap_or(sniffed);
        if compression.is_some() && c != sniffed && !(c == Compression::None && head.is_empty()) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("the media type says {} but the stream looks like {}", c.name(), sniffed.name()),
            ));
        }
        *detected = c;
        let decoder: Box<dyn Read + '_> = match c {
            Compression::None => Box::new(&mut src),
            Compression::Gzip => Box::new(gzip_decoder(&mut src)),
            Compression::Zstd => Box::new(zstd_decoder(&mut src).map_err(Error::io)?),
        };
        pump(decoder, c, max_size, &tx, &recycle)?;
        // Whatever trails the compressed stream is part of the input digest too.
        io::copy(&mut src, &mut io::sink()).map_err(Error::io)?;
        Ok(())
    })();
    let msg = match result {
        Ok(()) => {
            let h = src.into_inner();
            Msg::Done(InputStats { digest: h.hasher.finalize().into(), size: h.count })
        }
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

/// The consumer's view of the uncompressed stream. Hashes every byte it receives
/// (the diffID) and holds the producer's error, if any, for the caller to report in
/// place of the I/O error it shows the tar parser.
pub struct Uncompressed {
    rx: Receiver<Msg>,
    recycle: SyncSender<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
    hasher: Sha256,
    size: u64,
    done: Option<InputStats>,
    failure: Option<Error>,
}

impl Uncompressed {
    /// The producer's error, if the stream failed on its side.
    pub fn take_failure(&mut self) -> Option<Error> {
        self.failure.take()
    }

    /// sha256 and size of the uncompressed stream and the input stats; only
    /// meaningful once the stream was read to its end.
    pub fn digests(&self) -> ([u8; 32], u64, Option<InputStats>) {
        (self.hasher.clone().finalize().into(), self.size, self.done.clone())
    }
}

impl Read for Uncompressed {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Uncompressed {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos >= self.buf.len() && self.done.is_none() {
            if self.failure.is_some() {
                return Err(io::Error::other("input stream failed"));
            }
            match self.rx.recv() {
                Ok(Msg::Data(chunk)) => {
                    self.hasher.update(&chunk);
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
                Err(_) => return Err(io::Error::other("input reader thread ended")),
            }
        }
        Ok(&self.buf[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }
}

/// Runs `consume` on the uncompressed form of `input` while a scoped thread
/// decompresses. Returns `consume`'s result and the compression seen.
pub fn with_uncompressed<R, T>(
    input: R,
    compression: Option<Compression>,
    max_size: u64,
    progress: Option<&(dyn Fn(u64) + Sync)>,
    consume: impl FnOnce(&mut Uncompressed) -> Result<T, Error>,
) -> Result<(T, Compression), Error>
where
    R: Read + Send,
{
    let (tx, rx) = mpsc::sync_channel(IN_FLIGHT);
    let (recycle_tx, recycle_rx) = mpsc::sync_channel(IN_FLIGHT + 2);
    let mut detected = Compression::None;
    let result = std::thread::scope(|s| {
        let producer = s.spawn(|| produce(input, compression, max_size, progress, tx, recycle_rx, &mut detected));
        let mut stream = Uncompressed {
            rx,
            recycle: recycle_tx,
            buf: Vec::new(),
            pos: 0,
            hasher: Sha256::new(),
            size: 0,
            done: None,
            failure: None,
        };
        let r = consume(&mut stream);
        // Hang up first so a producer blocked on a full channel returns.
        drop(stream);
        producer.join().expect("decompressor thread panicked");
        r
    });
    result.map(|t| (t, detected))
}
