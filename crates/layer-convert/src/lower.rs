//! The layers below the one being converted, for the attributes of its implied
//! directories.
//!
//! A layer tar may hold `root/.bashrc` without an entry for `root/`. containerd applies
//! such a layer inside the overlay of the layers below, where `root/` already exists:
//! writing the file copies the lower `root/` up with its mode, owner and xattrs, and the
//! stack keeps them. A layer converted on its own has to invent `root/` (0755, root), and
//! since overlayfs takes a merged directory's attributes from its uppermost layer, that
//! invention would replace the lower `root/`'s 0700. So when the lower layers are known,
//! an implied directory takes the attributes the stack below shows for it, resolved as
//! overlayfs resolves them (whiteouts and opaque directories hide what is below), and the
//! invented ones only where the stack has nothing.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use erofs::reader::{FileKind, Image};
use erofs::writer::{Meta, Xattr};

/// One path looked up in one lower layer, without looking through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LowerEntry {
    /// The layer has nothing there.
    Missing,
    /// A directory, with its attributes (overlayfs' own xattrs left out) and whether it
    /// is opaque.
    Dir {
        /// Mode, owner, time and xattrs.
        meta: Meta,
        /// `trusted.overlay.opaque` = `y`: the layers below are hidden under it.
        opaque: bool,
    },
    /// Anything else (a whiteout or a non-directory): the layers below are hidden there.
    Other,
}

/// A lower layer that can be asked about one path.
pub trait LowerLayer: Send + Sync {
    /// The entry at `path` (components from the layer's root) in this layer alone.
    fn entry(&self, path: &[&[u8]]) -> LowerEntry;
}

/// The layers below a layer, nearest first. Empty (the default): nothing is below, and
/// implied directories get the converter's defaults.
#[derive(Clone, Default)]
pub struct Lowers(pub Vec<Arc<dyn LowerLayer>>);

impl std::fmt::Debug for Lowers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lowers({} layers)", self.0.len())
    }
}

impl Lowers {
    /// Lower layers mounted (or extracted) as directories, nearest first: each one layer
    /// alone, whiteouts as character devices 0/0, as the store mounts its layers.
    pub fn dirs(dirs: Vec<PathBuf>) -> Lowers {
        Lowers(
            dirs.into_iter()
                .map(|d| Arc::new(DirLayer(d)) as Arc<dyn LowerLayer>)
                .collect(),
        )
    }

    /// The attributes the stack of lower layers shows for the directory `path`, or `None`
    /// when it shows no directory there.
    pub fn dir_meta(&self, path: &[&[u8]]) -> Option<Meta> {
        if path.is_empty() {
            return None;
        }
        'layers: for layer in &self.0 {
            let mut opaque_above = false;
            for i in 0..path.len() {
                match layer.entry(&path[..=i]) {
                    LowerEntry::Missing if opaque_above => return None,
                    LowerEntry::Missing => continue 'layers,
                    LowerEntry::Other => return None,
                    LowerEntry::Dir { meta, opaque } => {
                        if i + 1 == path.len() {
                            return Some(meta);
                        }
                        opaque_above |= opaque;
                    }
                }
            }
        }
        None
    }
}

/// Keeps an xattr for the directory that copies it, telling whether it marks opacity.
fn keep_xattr(meta: &mut Meta, name: &[u8], value: &[u8]) -> bool {
    if name == oci_layer::xattr::OVERLAY_OPAQUE {
        return value == b"y";
    }
    if !oci_layer::xattr::is_overlay(name) {
        if let Ok(x) = Xattr::new(name, value) {
            meta.set_xattr(x);
        }
    }
    false
}

/// A lower layer as a directory tree.
struct DirLayer(PathBuf);

impl LowerLayer for DirLayer {
    fn entry(&self, path: &[&[u8]]) -> LowerEntry {
        let mut p = self.0.clone();
        for c in path {
            p.push(OsStr::from_bytes(c));
        }
        let md = match std::fs::symlink_metadata(&p) {
            Ok(md) => md,
            Err(_) => return LowerEntry::Missing,
        };
        if !md.is_dir() {
            return LowerEntry::Other;
        }
        let mut meta = Meta {
            perm: (md.mode() & 0o7777) as u16,
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime() as u64,
            mtime_nsec: md.mtime_nsec() as u32,
            xattrs: Vec::new(),
        };
        let mut opaque = false;
        for (name, value) in oci_layer::xattr::read(&p).unwrap_or_default() {
            opaque |= keep_xattr(&mut meta, &name, &value);
        }
        LowerEntry::Dir { meta, opaque }
    }
}

/// A lower layer as an EROFS image, read with the project's reader.
pub struct ImageLayer(pub Image);

impl LowerLayer for ImageLayer {
    fn entry(&self, path: &[&[u8]]) -> LowerEntry {
        let joined = path.join(&b'/');
        let e = match self.0.lookup(&joined) {
            Ok(e) => e,
            Err(_) => return LowerEntry::Missing,
        };
        if e.kind != FileKind::Dir {
            return LowerEntry::Other;
        }
        let mut meta = Meta::of_inode(&e.inode);
        let mut opaque = false;
        for (name, value) in self.0.xattrs(&e).unwrap_or_default() {
            opaque |= keep_xattr(&mut meta, &name, &value);
        }
        LowerEntry::Dir { meta, opaque }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer given as a list of (path, entry).
    struct Listed(Vec<(&'static str, LowerEntry)>);

    impl LowerLayer for Listed {
        fn entry(&self, path: &[&[u8]]) -> LowerEntry {
            let p = path.join(&b'/');
            self.0
                .iter()
                .find(|(k, _)| k.as_bytes() == p.as_slice())
                .map(|(_, e)| e.clone())
                .unwrap_or(LowerEntry::Missing)
        }
    }

    fn dir(perm: u16, opaque: bool) -> LowerEntry {
        LowerEntry::Dir {
            meta: Meta {
                perm,
                ..Meta::default()
            },
            opaque,
        }
    }

    fn perm(l: &Lowers, p: &str) -> Option<u16> {
        let parts: Vec<&[u8]> = p.split('/').map(str::as_bytes).collect();
        l.dir_meta(&parts).map(|m| m.perm)
    }

    #[test]
    fn resolved_as_overlayfs_resolves() {
        let top = Listed(vec![
            ("a", dir(0o711, false)),
            ("gone", LowerEntry::Other),
            ("o", dir(0o755, true)),
            ("f", LowerEntry::Other),
        ]);
        let bottom = Listed(vec![
            ("a", dir(0o700, false)),
            ("a/b", dir(0o750, false)),
            ("gone", dir(0o700, false)),
            ("gone/x", dir(0o700, false)),
            ("o", dir(0o700, false)),
            ("o/hidden", dir(0o700, false)),
            ("only", dir(0o701, false)),
            ("f/x", dir(0o700, false)),
        ]);
        let l = Lowers(vec![Arc::new(top), Arc::new(bottom)]);
        assert_eq!(perm(&l, "a"), Some(0o711), "the nearest layer wins");
        assert_eq!(perm(&l, "a/b"), Some(0o750), "merged directories show what is below");
        assert_eq!(perm(&l, "gone"), None, "a whiteout hides the directory");
        assert_eq!(perm(&l, "gone/x"), None, "and what is under it");
        assert_eq!(perm(&l, "o"), Some(0o755));
        assert_eq!(perm(&l, "o/hidden"), None, "an opaque directory hides what is below");
        assert_eq!(perm(&l, "only"), Some(0o701));
        assert_eq!(perm(&l, "f/x"), None, "a non-directory hides the path");
        assert_eq!(perm(&l, "nope"), None);
        assert_eq!(perm(&Lowers::default(), "a"), None);
    }
}
