//! EROFS images, written and read in pure Rust.
//!
//! - [`format`]: the on-disk structures, one module, like erofs-utils' `erofs_fs.h`.
//! - [`writer`]: a streaming image writer. File data is appended block by block as it
//!   arrives (one pass, no unpacked copy); directories, inodes and xattrs are kept in
//!   memory as a [`writer::Tree`] and laid out after the data when the image is finished.
//! - [`reader`]: reads an image without mounting it (inspect, list, cat, and tests).
//! - [`validate`]: the full check an untrusted image (a native EROFS layer) passes before
//!   the kernel mounts it.
//!
//! The writer is the product's core and is written by hand on purpose: the converter
//! streams tar bodies straight into data blocks, which no existing crate offers, and the
//! layout decisions (inline tails, shared xattrs, deterministic order) are ours to own.

pub mod compress;
pub mod format;
pub mod reader;
pub mod validate;
pub mod writer;
pub mod zmap;
pub mod zread;
mod zwriter;

pub use validate::{validate_file, validate_path, Invalid, Summary};
