//! Random access into **unmodified** compressed OCI layers (`tar+gzip`, `tar+zstd`),
//! in the manner of SOCI's zTOC and nydus' zran.
//!
//! An [`Indexer`] decompresses a layer once, in a single streaming pass: it hands the
//! uncompressed tar to its caller (it is a [`BufRead`]) and, as a side effect, records an
//! [`Index`]: the layer digest and diffID, a sha256 per fixed-size chunk of the
//! uncompressed tar, and *checkpoints* from which decompression can restart. Later, a
//! node reads any chunk `i` by fetching only [`Index::fetch_range`]`(i)` of the original
//! blob (an HTTP Range request) and calling [`Index::decode_chunk`], then checks the
//! result against [`Index::chunk_digests`]`[i]`.
//!
//! Checkpoints:
//! - **gzip**: zran-style. The checkpoint of chunk `j` is the last deflate block
//!   boundary (or gzip member start) at or before `j * chunk_size` bytes of output. A
//!   block boundary stores the compressed byte offset, the bit offset and partial byte,
//!   and the 32 KiB window of output before it (stored zstd-compressed). Decoding may run
//!   across member boundaries (concatenated gzip members, as `pigz` or `cat` make).
//! - **zstd**: the last frame start at or before `j * chunk_size`; no window needed.
//!
//! A chunk whose checkpoint lies more than [`MAX_SKIP_CHUNKS`]` * chunk_size` before it
//! would cost too much to decode: such a layer (a single-frame zstd layer, a gzip layer
//! of huge blocks) makes [`Indexer::finish`] fail with [`Error::NoRandomAccess`], and the
//! caller falls back to fetching the whole layer.
//!
//! [`BufRead`]: std::io::BufRead

#![warn(missing_docs)]

mod decode;
mod gzip;
mod indexer;
mod wire;
mod zlib;
mod zstdf;

use std::fmt;
use std::io;

pub use indexer::Indexer;

/// Smallest chunk size accepted (64 KiB).
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;
/// Largest chunk size accepted (64 MiB).
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// Default chunk size (2 MiB).
pub const DEFAULT_CHUNK_SIZE: u64 = 2 << 20;
/// Default limit on a layer's uncompressed size (64 GiB): a decompression bomb guard.
pub const DEFAULT_MAX_UNCOMPRESSED: u64 = 64 << 30;
/// A chunk's checkpoint may lie at most this many chunk sizes before the chunk's start.
pub const MAX_SKIP_CHUNKS: u64 = 8;
/// Size of the deflate window a gzip checkpoint carries.
pub const WINDOW_SIZE: usize = 32 << 10;

/// Compression of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// gzip: one member or several concatenated ones.
    Gzip,
    /// zstd: one frame or several, skippable frames allowed.
    Zstd,
}

impl Format {
    /// Name as printed (`"gzip"`, `"zstd"`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Gzip => "gzip",
            Format::Zstd => "zstd",
        }
    }
}

/// How an [`Indexer`] cuts and guards a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexOptions {
    /// Size of the uncompressed chunks that get a digest each and can be read alone: a
    /// power of two from [`MIN_CHUNK_SIZE`] to [`MAX_CHUNK_SIZE`]. Default 2 MiB.
    pub chunk_size: u64,
    /// Uncompressed bytes beyond this fail the read with [`Error::TooLarge`]. Default
    /// [`DEFAULT_MAX_UNCOMPRESSED`] (64 GiB).
    pub max_uncompressed: u64,
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_uncompressed: DEFAULT_MAX_UNCOMPRESSED,
        }
    }
}

impl IndexOptions {
    /// Default options with another chunk size.
    pub fn with_chunk_size(chunk_size: u64) -> Self {
        IndexOptions {
            chunk_size,
            ..Default::default()
        }
    }

    /// Checks the chunk size ([`Error::InvalidOptions`] if out of range or not a power
    /// of two).
    pub fn validate(&self) -> Result<(), Error> {
        if !valid_chunk_size(self.chunk_size) {
            return Err(Error::InvalidOptions(format!(
                "chunk size {} is not a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}",
                self.chunk_size
            )));
        }
        Ok(())
    }
}

pub(crate) fn valid_chunk_size(cs: u64) -> bool {
    cs.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs)
}

/// The class of an [`Error`], for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Reading the input failed.
    Io,
    /// The compressed stream is invalid or truncated.
    Corrupt,
    /// The uncompressed stream exceeds [`IndexOptions::max_uncompressed`].
    TooLarge,
    /// The layer has too few checkpoints for random access.
    NoRandomAccess,
    /// [`Index::from_bytes`] refused its input.
    BadIndex,
    /// [`Index::decode_chunk`] failed.
    Decode,
    /// [`IndexOptions`] out of range.
    InvalidOptions,
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the compressed input failed.
    #[error("reading the layer: {0}")]
    Io(#[source] io::Error),
    /// The compressed stream is invalid or truncated (what the project's decoders refuse).
    #[error("corrupt compressed layer: {0}")]
    Corrupt(String),
    /// The uncompressed stream is larger than the configured limit.
    #[error("uncompressed layer larger than {limit} bytes")]
    TooLarge {
        /// The limit, [`IndexOptions::max_uncompressed`].
        limit: u64,
    },
    /// Some chunk lies more than `limit` uncompressed bytes after its nearest checkpoint
    /// (e.g. a single-frame zstd layer): random access would cost too much.
    #[error("no random access: a chunk lies {max_distance} bytes after its checkpoint (limit {limit})")]
    NoRandomAccess {
        /// The largest distance from a chunk's start back to its checkpoint.
        max_distance: u64,
        /// The largest distance allowed ([`MAX_SKIP_CHUNKS`] chunk sizes).
        limit: u64,
    },
    /// A serialized index was refused.
    #[error("bad index: {0}")]
    BadIndex(String),
    /// A chunk could not be decoded from the bytes given.
    #[error("chunk decode failed: {0}")]
    Decode(String),
    /// Invalid [`IndexOptions`].
    #[error("invalid index options: {0}")]
    InvalidOptions(String),
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io(_) => ErrorKind::Io,
            Error::Corrupt(_) => ErrorKind::Corrupt,
            Error::TooLarge { .. } => ErrorKind::TooLarge,
            Error::NoRandomAccess { .. } => ErrorKind::NoRandomAccess,
            Error::BadIndex(_) => ErrorKind::BadIndex,
            Error::Decode(_) => ErrorKind::Decode,
            Error::InvalidOptions(_) => ErrorKind::InvalidOptions,
        }
    }

    /// A copy (an I/O error is copied as its kind and message).
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Io(e) => Error::Io(io::Error::new(e.kind(), e.to_string())),
            Error::Corrupt(m) => Error::Corrupt(m.clone()),
            Error::TooLarge { limit } => Error::TooLarge { limit: *limit },
            Error::NoRandomAccess { max_distance, limit } => Error::NoRandomAccess {
                max_distance: *max_distance,
                limit: *limit,
            },
            Error::BadIndex(m) => Error::BadIndex(m.clone()),
            Error::Decode(m) => Error::Decode(m.clone()),
            Error::InvalidOptions(m) => Error::InvalidOptions(m.clone()),
        }
    }
}

/// Wraps the error for [`std::io::Read`] callers: I/O errors keep their kind, the
/// others become `InvalidData` carrying the [`Error`] (see `From<io::Error>`).
impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e {
            Error::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// Unwraps an [`Error`] that went through [`std::io::Read`]; any other I/O error
/// becomes [`Error::Io`].
impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            match e.into_inner().map(|b| b.downcast::<Error>()) {
                Some(Ok(inner)) => *inner,
                // Unreachable after the check above; keep something sensible.
                Some(Err(other)) => Error::Io(io::Error::other(other)),
                None => Error::Io(io::Error::other("unknown I/O error")),
            }
        } else {
            Error::Io(e)
        }
    }
}

/// Where decompression can restart.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// Compressed byte offset: decoding reads from here.
    pub in_off: u64,
    /// Uncompressed offset of the first byte decoded from here.
    pub out_off: u64,
    /// What starts here.
    pub kind: CheckpointKind,
    /// gzip block boundary: bits (0..=7) of the byte before `in_off` still unread.
    pub bits: u8,
    /// gzip block boundary: those bits, in the low bits.
    pub partial: u8,
    /// gzip block boundary: the window (output before `out_off`, at most 32 KiB, within
    /// the member), zstd-compressed; empty for none.
    pub window: Vec<u8>,
}

/// What a checkpoint points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CheckpointKind {
    /// A gzip member header or a zstd frame: decoding starts from scratch.
    Start,
    /// A deflate block boundary inside a gzip member: needs the bits and the window.
    Block,
}

/// A chunk's entry: its checkpoint and the end of the compressed bytes it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkEntry {
    /// Index into the checkpoints.
    pub checkpoint: u32,
    /// End (exclusive) of the compressed range to fetch.
    pub fetch_end: u64,
}

/// The random-access index of one compressed layer, made by an [`Indexer`] or parsed
/// with [`Index::from_bytes`].
#[derive(Clone, PartialEq, Eq)]
pub struct Index {
    /// Compression of the layer.
    pub format: Format,
    /// Size of the uncompressed chunks (a power of two).
    pub chunk_size: u64,
    /// Size of the uncompressed tar.
    pub uncompressed_size: u64,
    /// Size of the compressed blob.
    pub compressed_size: u64,
    /// sha256 of the compressed blob: the layer digest.
    pub compressed_digest: [u8; 32],
    /// sha256 of the uncompressed tar: the diffID.
    pub uncompressed_digest: [u8; 32],
    /// sha256 of each `chunk_size` piece of the uncompressed tar; the last may be shorter.
    pub chunk_digests: Vec<[u8; 32]>,
    pub(crate) checkpoints: Vec<Checkpoint>,
    pub(crate) chunks: Vec<ChunkEntry>,
    /// zstd: the window log chunk decoding allows (the largest any frame declared); 0
    /// for gzip.
    pub(crate) zstd_window_log: u8,
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Index")
            .field("format", &self.format)
            .field("chunk_size", &self.chunk_size)
            .field("uncompressed_size", &self.uncompressed_size)
            .field("compressed_size", &self.compressed_size)
            .field("chunks", &self.chunk_digests.len())
            .field("checkpoints", &self.checkpoints.len())
            .finish_non_exhaustive()
    }
}

impl Index {
    /// Number of chunks: `ceil(uncompressed_size / chunk_size)`.
    pub fn chunk_count(&self) -> u64 {
        if self.chunk_size == 0 {
            return 0;
        }
        self.uncompressed_size.div_ceil(self.chunk_size)
    }

    /// Uncompressed byte range `[start, end)` of chunk `i`.
    ///
    /// # Panics
    /// If `i >= chunk_count()`.
    pub fn chunk_range(&self, i: u64) -> (u64, u64) {
        assert!(i < self.chunk_count(), "chunk {i} out of range");
        let start = i * self.chunk_size;
        (start, (start + self.chunk_size).min(self.uncompressed_size))
    }

    /// Compressed byte range `[start, end)` of the original blob that
    /// [`decode_chunk`](Index::decode_chunk)`(i, ..)` needs.
    ///
    /// # Panics
    /// If `i >= chunk_count()`.
    pub fn fetch_range(&self, i: u64) -> (u64, u64) {
        assert!(i < self.chunk_count(), "chunk {i} out of range");
        let entry = self.chunks[i as usize];
        (self.checkpoints[entry.checkpoint as usize].in_off, entry.fetch_end)
    }

    /// Decodes chunk `i` from `raw`, exactly the bytes of [`fetch_range`](Index::fetch_range)`(i)`
    /// of the blob, and returns exactly the chunk's bytes.
    ///
    /// Allocates the chunk's length plus bounded working memory (a decompressor, a
    /// window), whatever `raw` holds. Does not check the digest: callers compare the
    /// sha256 of the result with [`chunk_digests`](Index::chunk_digests)`[i]`. Any
    /// failure (wrong length, corrupt or truncated data, `i` out of range) is
    /// [`Error::Decode`].
    pub fn decode_chunk(&self, i: u64, raw: &[u8]) -> Result<Vec<u8>, Error> {
        decode::decode_chunk(self, i, raw)
    }

    /// Number of checkpoints.
    pub fn checkpoints(&self) -> usize {
        self.checkpoints.len()
    }

    /// The serialized index: a compact, versioned binary form (see
    /// [`from_bytes`](Index::from_bytes)).
    pub fn to_bytes(&self) -> Vec<u8> {
        wire::to_bytes(self)
    }

    /// Parses [`to_bytes`](Index::to_bytes) output, strictly: the bytes may come from a
    /// registry and be hostile. Anything inconsistent is [`Error::BadIndex`]; no
    /// allocation depends on a count before it is checked against the input length.
    pub fn from_bytes(b: &[u8]) -> Result<Index, Error> {
        wire::from_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        assert!(IndexOptions::default().validate().is_ok());
        assert!(IndexOptions::with_chunk_size(64 << 10).validate().is_ok());
        assert!(IndexOptions::with_chunk_size(64 << 20).validate().is_ok());
        for bad in [0, 1, 32 << 10, 128 << 20, (1 << 20) + 1, 3 << 20] {
            let e = IndexOptions::with_chunk_size(bad).validate().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidOptions);
        }
    }

    #[test]
    fn errors_round_trip_through_io() {
        let e: io::Error = Error::TooLarge { limit: 5 }.into();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let back = Error::from(e);
        assert!(matches!(back, Error::TooLarge { limit: 5 }));
        let plain = Error::from(io::Error::new(io::ErrorKind::BrokenPipe, "x"));
        assert_eq!(plain.kind(), ErrorKind::Io);
    }
}
