//! The tar side: PAX/ustar headers written by hand, the hashing and compressing output
//! stack, and the bookkeeping both walkers share (hard links, parent directories).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::Metadata;
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use oci_layer::tar::Kind;
use oci_layer::write::{Header, TarWriter};

use crate::{DiffOptions, DiffStats, Error};

/// Extended attributes as (name, value), sorted by name.
pub(crate) type Xattrs = oci_layer::xattr::Xattrs;

/// A tar stream being written, with the state both walkers share.
pub(crate) struct TarOut<W: Write> {
    w: TarWriter<W>,
    /// Upper bound for every mtime (SOURCE_DATE_EPOCH).
    epoch: Option<(i64, u32)>,
    /// The first archive name written for an inode with more than one link.
    link_src: HashMap<(u64, u64), Vec<u8>>,
    /// Unchanged names of a linked inode none of whose names was written yet: they are
    /// written as links after the first changed name (walk diff only).
    link_refs: HashMap<(u64, u64), Vec<Vec<u8>>>,
    /// Directories written so far (names without the trailing `/`).
    added_dirs: HashSet<Vec<u8>>,
}

impl<W: Write> TarOut<W> {
    pub(crate) fn new(out: W, opts: &DiffOptions, root: &Path) -> Result<Self, Error> {
        let w = TarWriter::new(out, opts.compression).map_err(|e| Error::new(root, "starting the compressor", e))?;
        Ok(TarOut {
            w,
            epoch: opts.source_date_epoch.map(split_time),
            link_src: HashMap::new(),
            link_refs: HashMap::new(),
            added_dirs: HashSet::new(),
        })
    }

    /// Writes the end-of-archive marker and finishes the compressed stream.
    pub(crate) fn finish(self, root: &Path) -> Result<DiffStats, Error> {
        let f = self
            .w
            .finish()
            .map_err(|e| Error::new(root, "finishing the output stream", e))?;
        Ok(DiffStats {
            entries: f.entries,
            uncompressed_size: f.size,
            uncompressed_digest: f.digest,
        })
    }

    /// Writes the filesystem entry `root/rel` (stat `meta`) as the archive entry `rel`.
    ///
    /// `unchanged` entries are written only when they are a further name of an inode
    /// already written (so the link survives in the layer); otherwise they are remembered
    /// in case a later changed name of the same inode is written. Sockets are skipped.
    /// `xattrs`, when given, are the entry's xattrs already read (and filtered).
    pub(crate) fn add(
        &mut self,
        root: &Path,
        rel: &[u8],
        meta: &Metadata,
        unchanged: bool,
        xattrs: Option<Xattrs>,
    ) -> Result<(), Error> {
        let ft = meta.file_type();
        if ft.is_socket() {
            return Ok(());
        }
        let path = join(root, rel);
        let mut name = rel.to_vec();
        if ft.is_dir() {
            name.push(b'/');
        }

        let mut additional = Vec::new();
        let mut hard_link_to = None;
        if !ft.is_dir() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(src) = self.link_src.get(&key) {
                hard_link_to = Some(src.clone());
            } else {
                if unchanged {
                    self.link_refs.entry(key).or_default().push(name);
                    return Ok(());
                }
                self.link_src.insert(key, name.clone());
                additional = self.link_refs.remove(&key).unwrap_or_default();
            }
        } else if unchanged {
            return Ok(());
        }

        self.include_parents(root, rel)?;
        let mut h = Header::new(name, Kind::File);
        h.mode = meta.mode() & 0o7777;
        h.uid = meta.uid() as u64;
        h.gid = meta.gid() as u64;
        h.mtime = (meta.mtime(), meta.mtime_nsec() as u32);
        if let Some(target) = hard_link_to {
            h.kind = Kind::HardLink;
            h.link = target;
        } else {
            if ft.is_file() {
                h.size = meta.size();
            } else if ft.is_dir() {
                h.kind = Kind::Dir;
            } else if ft.is_symlink() {
                h.kind = Kind::Symlink;
                h.link = std::fs::read_link(&path)
                    .map_err(|e| Error::new(&path, "reading the symlink", e))?
                    .into_os_string()
                    .into_vec();
            } else if ft.is_char_device() || ft.is_block_device() {
                h.kind = if ft.is_char_device() {
                    Kind::CharDev
                } else {
                    Kind::BlockDev
                };
                h.devmajor = rustix::fs::major(meta.rdev()) as u64;
                h.devminor = rustix::fs::minor(meta.rdev()) as u64;
            } else if ft.is_fifo() {
                h.kind = Kind::Fifo;
            } else {
                return Err(Error::new(
                    &path,
                    "writing the entry",
                    io::Error::other("unknown file type"),
                ));
            }
            h.xattrs = match xattrs {
                Some(x) => x,
                None => read_xattrs(&path)?,
            };
        }

        self.write_header(&h)
            .map_err(|e| Error::new(&path, "writing the entry", e))?;
        if h.kind == Kind::File && h.size > 0 {
            self.copy_body(&path, h.size)?;
        }
        if h.kind == Kind::Dir {
            self.added_dirs.insert(rel.to_vec());
        }

        let source = std::mem::take(&mut h.name);
        for extra in additional {
            self.include_parents(root, &extra)?;
            h.name = extra;
            h.kind = Kind::HardLink;
            h.link = source.clone();
            h.size = 0;
            h.xattrs.clear();
            self.write_header(&h)
                .map_err(|e| Error::new(&join(root, &h.name), "writing the entry", e))?;
        }
        Ok(())
    }

    /// Writes the whiteout `PARENT/.wh.BASE` for the deleted path `parent/base`.
    pub(crate) fn whiteout(&mut self, root: &Path, parent: &[u8], base: &[u8], mtime: (i64, u32)) -> Result<(), Error> {
        let mut name = parent.to_vec();
        if !name.is_empty() {
            name.push(b'/');
        }
        name.extend_from_slice(b".wh.");
        name.extend_from_slice(base);
        self.include_parents(root, &name)?;
        let mut h = Header::new(name, Kind::File);
        h.mtime = mtime;
        self.write_header(&h)
            .map_err(|e| Error::new(&join(root, &h.name), "writing the whiteout", e))
    }

    /// Writes the opaque marker `DIR/.wh..wh..opq` after the directory `dir` (stat `meta`).
    pub(crate) fn opaque(&mut self, root: &Path, dir: &[u8], meta: &Metadata) -> Result<(), Error> {
        let mut name = dir.to_vec();
        name.extend_from_slice(b"/.wh..wh..opq");
        let mut h = Header::new(name, Kind::File);
        h.mode = meta.mode() & 0o777;
        h.uid = meta.uid() as u64;
        h.gid = meta.gid() as u64;
        h.mtime = (meta.mtime(), meta.mtime_nsec() as u32);
        self.write_header(&h)
            .map_err(|e| Error::new(&join(root, dir), "writing the opaque marker", e))
    }

    /// Writes every ancestor directory of `rel` not written yet (from `root`, top first).
    fn include_parents(&mut self, root: &Path, rel: &[u8]) -> Result<(), Error> {
        let rel = rel.strip_suffix(b"/").unwrap_or(rel);
        for (i, &b) in rel.iter().enumerate() {
            if b != b'/' || self.added_dirs.contains(&rel[..i]) {
                continue;
            }
            let parent = &rel[..i];
            let path = join(root, parent);
            let meta =
                std::fs::symlink_metadata(&path).map_err(|e| Error::new(&path, "reading a parent directory", e))?;
            if !meta.is_dir() {
                return Err(Error::new(
                    &path,
                    "reading a parent directory",
                    io::Error::new(
                        io::ErrorKind::NotADirectory,
                        "a parent of a changed path is not a directory",
                    ),
                ));
            }
            self.add(root, parent, &meta, false, None)?;
        }
        Ok(())
    }

    fn copy_body(&mut self, path: &Path, size: u64) -> Result<(), Error> {
        let err = |e| Error::new(path, "copying the file's content", e);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .map_err(err)?;
        let n = io::copy(&mut file.take(size), self.w.body()).map_err(err)?;
        if n != size {
            return Err(err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file shrank while being read ({n} of {size} bytes)"),
            )));
        }
        self.w.pad(size).map_err(err)
    }

    fn write_header(&mut self, h: &Header) -> io::Result<()> {
        match self.epoch {
            Some(epoch) if h.mtime > epoch => {
                let mut h = h.clone();
                h.mtime = epoch;
                self.w.append(&h)
            }
            _ => self.w.append(h),
        }
    }
}

/// Splits a time into (seconds, nanoseconds forward) since the Unix epoch.
pub(crate) fn split_time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            }
        }
    }
}

/// `root/rel` (`root` itself for an empty `rel`).
pub(crate) fn join(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

/// The names in a directory, sorted bytewise.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<Vec<u8>>, Error> {
    let err = |e| Error::new(dir, "reading the directory", e);
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        names.push(entry.map_err(err)?.file_name().into_vec());
    }
    names.sort_unstable();
    Ok(names)
}

/// All xattrs of a path (not following symlinks), sorted by name, raw (overlayfs ones
/// included).
pub(crate) fn read_raw_xattrs(path: &Path) -> Result<Xattrs, Error> {
    oci_layer::xattr::read(path).map_err(|e| Error::new(path, "reading xattrs", e))
}

/// The xattrs a layer carries: all but `trusted.overlay.*`, sorted by name.
pub(crate) fn read_xattrs(path: &Path) -> Result<Xattrs, Error> {
    Ok(filter_xattrs(read_raw_xattrs(path)?))
}

pub(crate) fn filter_xattrs(mut x: Xattrs) -> Xattrs {
    x.retain(|(k, _)| !oci_layer::xattr::is_overlay(k));
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_times() {
        assert_eq!(
            split_time(UNIX_EPOCH - std::time::Duration::from_millis(1500)),
            (-2, 500_000_000)
        );
        assert_eq!(
            split_time(UNIX_EPOCH + std::time::Duration::from_millis(1500)),
            (1, 500_000_000)
        );
        assert_eq!(split_time(UNIX_EPOCH - std::time::Duration::from_secs(3)), (-3, 0));
    }
}
