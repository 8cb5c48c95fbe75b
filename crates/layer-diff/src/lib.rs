//! Directory changes to OCI layer tars: the Diff (Compare) side of the differ.
//!
//! Two sources of changes, both written as one tar stream the way containerd's
//! `archive.WriteDiff` writes it (entries in walk order, parents before children, the
//! unchanged parent directories of changed paths included so the layer applies on its own,
//! hard links kept, sockets skipped, deletions as `.wh.NAME`):
//!
//! * [`write_upper_diff`] reads an overlayfs upper directory (not mounted), where a deleted
//!   path is a character device 0/0 and an opaque directory carries
//!   `trusted.overlay.opaque=y`. Nothing else is looked at: this is containerd's overlay
//!   differ fast path.
//! * [`write_walk_diff`] compares two plain (or mounted) trees side by side, like
//!   containerd's `fs.Changes` double walk.
//!
//! The tar is PAX (ustar headers plus extended records where a field does not fit: long
//! paths and link targets, uid/gid above 2097151, sizes from 8 GiB, sub-second and
//! out-of-range mtimes, `SCHILY.xattr.*`), and is hashed before compression so the caller
//! gets the diffID ([`DiffStats::uncompressed_digest`]) without a second pass.
//!
//! Differences from containerd, on purpose:
//! * every xattr is written (containerd writes only `security.capability`), except the
//!   overlayfs bookkeeping `trusted.overlay.*`; the walk diff also compares every xattr;
//! * mtimes keep their nanoseconds (containerd truncates to whole seconds);
//! * whiteouts taken from an upper dir carry the mtime of the overlay whiteout device
//!   rather than the time of the diff, so the same upper dir gives the same bytes.

mod tar;
mod upper;
mod walk;

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Compression of the stream written to `out` (gzip is containerd's default).
pub use oci_layer::Compression;

/// How to write a diff.
#[derive(Debug, Clone)]
pub struct DiffOptions {
    /// Compression of the output stream: gzip (level 6) unless told otherwise, as
    /// containerd does; zstd is level 3.
    pub compression: Compression,
    /// When set, every mtime later than this (whiteouts included) is written as this time
    /// (containerd's `WithSourceDateEpoch`, for reproducible layers).
    pub source_date_epoch: Option<SystemTime>,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions {
            compression: Compression::Gzip,
            source_date_epoch: None,
        }
    }
}

/// What a diff wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffStats {
    /// Tar entries written (files, dirs, links, whiteouts; PAX extended headers not counted).
    pub entries: u64,
    /// Bytes of the tar before compression, end-of-archive blocks included.
    pub uncompressed_size: u64,
    /// `sha256:<hex>` of the tar before compression: the layer's diffID.
    pub uncompressed_digest: String,
}

/// A failed diff: the path concerned, what was being done, and the I/O error.
#[derive(Debug, thiserror::Error)]
#[error("{}: {what}: {source}", path.display())]
pub struct Error {
    path: PathBuf,
    what: &'static str,
    #[source]
    source: io::Error,
}

impl Error {
    pub(crate) fn new(path: &Path, what: &'static str, source: io::Error) -> Self {
        Error {
            path: path.to_path_buf(),
            what,
            source,
        }
    }

    /// The file or directory the error is about.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying I/O error (kind `Unsupported` for inputs this crate refuses, such as an
    /// overlayfs redirect or metacopy upper dir).
    pub fn io_error(&self) -> &io::Error {
        &self.source
    }
}

/// Writes the changes recorded in an overlayfs upper directory (not mounted) as a layer tar:
/// files and directories as they are, a character device 0/0 as `.wh.NAME`, a directory
/// with `trusted.overlay.opaque=y` as the directory entry followed by `DIR/.wh..wh..opq`.
/// `trusted.overlay.*` xattrs are never written. An upper dir that relies on overlayfs
/// `redirect_dir` or `metacopy` (whose changes cannot be read from the upper dir alone) is
/// refused with an `Unsupported` error.
pub fn write_upper_diff<W: io::Write>(upper: &Path, out: W, opts: &DiffOptions) -> Result<DiffStats, Error> {
    let mut t = tar::TarOut::new(out, opts, upper)?;
    upper::walk_upper(&mut t, upper)?;
    t.finish(upper)
}

/// Writes the changes from `lower` to `upper` (two plain or mounted trees) as a layer tar,
/// walking both side by side like containerd's `fs.Changes`: added and modified entries as
/// they are in `upper`, deleted ones as `.wh.NAME` (one whiteout for a whole deleted
/// subtree), a directory replaced by a non-directory as the new entry alone (appliers
/// replace the old subtree), the unchanged parent directories of changed entries included.
///
/// An entry is modified when its type, permission bits, owner, device number or xattrs
/// differ, or (non-directories) its size, mtime or symlink target; when both mtimes have
/// zero nanoseconds (a tree extracted from a tar that truncated them) and sizes agree, the
/// contents are compared. A directory's mtime alone does not make it modified.
pub fn write_walk_diff<W: io::Write>(
    lower: &Path,
    upper: &Path,
    out: W,
    opts: &DiffOptions,
) -> Result<DiffStats, Error> {
    let mut t = tar::TarOut::new(out, opts, upper)?;
    walk::walk_trees(&mut t, lower, upper)?;
    t.finish(upper)
}
