//! `convert-image`: an OCI image in a registry becomes an image whose layers are
//! EROFS-native, ready to be mounted before they are downloaded.
//!
//! Each layer is converted with the one-pass converter in the *metadata-first*
//! layout (superblock, directories, inodes and xattrs in the first bytes, file data
//! after), so a lazy reader fetches one prefix and can list the whole tree. The layer
//! descriptor carries, in annotations (see [`annotations`]), the source layer's
//! digest, where the file data starts, a sha256 per fixed-size chunk of the blob
//! (any fetched range can be verified on its own) and the chunks a start reads
//! first. The annotations are part of the manifest, whose digest the client
//! verifies, so the chunk table is as trustworthy as the image reference.
//!
//! The image config's `rootfs.diff_ids` become the EROFS image digests: an
//! uncompressed EROFS layer's diff id is its blob digest (what containerd's EROFS
//! differ reports when it applies such a layer as is). With compressed chunks on the
//! wire ([`zstd_chunks`], `+zstd` media types) the blob is one zstd frame per chunk and
//! the diff id is the uncompressed image's digest.

pub mod annotations;
mod convert;
pub mod index;
mod prefetch;
pub mod zstd_chunks;

pub use annotations::{LazyLayer, EROFS_LAYER_MEDIA_TYPE};
pub use convert::{convert_image, ConvertOptions, ConvertReport, ConvertedLayer, Error};
pub use index::{index_image, Bundle, IndexOptions, IndexReport, IndexedLayer};
pub use prefetch::{file_extents, parse_prefetch_list, prefetch_chunks, Extent, PrefetchEntry};
