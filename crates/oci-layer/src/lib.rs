//! OCI image layers as tar streams, in one place for every crate that reads or writes
//! them: the converter (tar → EROFS), the walking differ's Apply (tar → directory) and
//! Compare (directory → tar).
//!
//! * [`tar`]: a streaming tar reader (ustar, GNU, PAX) and [`write`]: a PAX tar writer;
//! * [`name`]: what an entry name means — the layer root, a path, a whiteout or an
//!   opaque marker — decided once, so that every consumer gives a name the same meaning;
//! * [`stream`]: compression detection, decompression on a thread of its own, and
//!   compression of written layers;
//! * [`xattr`]: extended attributes of files on disk and the overlayfs names that a
//!   layer may not carry;
//! * [`Error`]: one error type with a kind to match on;
//! * [`ChunkSize`]: the validated chunk size of deduplicated layers.

mod chunk;
mod error;
pub mod name;
pub mod stream;
pub mod tar;
pub mod write;
pub mod xattr;

pub use chunk::{ChunkSize, InvalidChunkSize};
pub use error::{Error, ErrorKind};
pub use stream::Compression;
