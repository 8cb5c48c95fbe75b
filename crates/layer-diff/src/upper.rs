//! The changes of an overlayfs upper directory, read without mounting.

use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::tar::{filter_xattrs, join, list_dir, read_raw_xattrs, TarOut};
use crate::Error;

const OPAQUE: &[u8] = b"trusted.overlay.opaque";
/// Xattrs that mean the upper dir alone does not hold the change.
const UNSUPPORTED: [(&[u8], &str); 2] = [
    (
        b"trusted.overlay.redirect",
        "overlayfs redirect_dir (a renamed directory) is not supported",
    ),
    (
        b"trusted.overlay.metacopy",
        "overlayfs metacopy (content left in a lower layer) is not supported",
    ),
];

pub(crate) fn walk_upper<W: Write>(t: &mut TarOut<W>, upper: &Path) -> Result<(), Error> {
    let meta = std::fs::symlink_metadata(upper).map_err(|e| Error::new(upper, "reading the upper dir", e))?;
    if !meta.is_dir() {
        return Err(Error::new(
            upper,
            "reading the upper dir",
            io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let mut rel = Vec::new();
    walk_dir(t, upper, &mut rel)
}

fn walk_dir<W: Write>(t: &mut TarOut<W>, root: &Path, rel: &mut Vec<u8>) -> Result<(), Error> {
    for name in list_dir(&join(root, rel))? {
        let parent_len = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(&name);
        let path = join(root, rel);
        let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::new(&path, "reading the entry", e))?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            // An overlayfs whiteout (possibly one of many links to the shared whiteout inode).
            t.whiteout(
                root,
                &rel[..parent_len],
                &name,
                (meta.mtime(), meta.mtime_nsec() as u32),
            )?;
        } else if !ft.is_socket() {
            let raw = read_raw_xattrs(&path)?;
            for (key, why) in UNSUPPORTED {
                if raw.iter().any(|(k, _)| k == key) {
                    return Err(Error::new(
                        &path,
                        "reading the entry",
                        io::Error::new(io::ErrorKind::Unsupported, why),
                    ));
                }
            }
            let opaque = ft.is_dir() && raw.iter().any(|(k, v)| k == OPAQUE && v == b"y");
            t.add(root, rel, &meta, false, Some(filter_xattrs(raw)))?;
            if opaque {
                t.opaque(root, rel, &meta)?;
            }
            if ft.is_dir() {
                walk_dir(t, root, rel)?;
            }
        }
        rel.truncate(parent_len);
    }
    Ok(())
}
