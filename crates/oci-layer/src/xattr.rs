//! Extended attributes: reading them from files on disk, and the overlayfs names that a
//! layer's own content may not set.

use std::io;
use std::path::Path;

/// Prefix of overlayfs's own xattrs. A layer may not set them through `SCHILY.xattr`
/// records: in an image or an upper dir they would steer overlayfs (opaque, redirect,
/// metacopy); only whiteouts produce them.
pub const OVERLAY_PREFIX: &[u8] = b"trusted.overlay.";
/// The overlayfs opaque-directory xattr (value `y`).
pub const OVERLAY_OPAQUE: &[u8] = b"trusted.overlay.opaque";

/// Extended attributes as (name, value).
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Whether `name` is one of overlayfs's own xattrs.
pub fn is_overlay(name: &[u8]) -> bool {
    name.starts_with(OVERLAY_PREFIX)
}

/// All xattrs of `path`, not following a symlink at the end, sorted by name. A file
/// system without xattr support has none; one removed between listing and reading is
/// left out.
pub fn read(path: &Path) -> io::Result<Xattrs> {
    use rustix::fs::{lgetxattr, llistxattr};
    let mut names = vec![0u8; 1024];
    let n = loop {
        match llistxattr(path, &mut names[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
        let mut value = vec![0u8; 256];
        let len = loop {
            match lgetxattr(path, cname.as_c_str(), &mut value[..]) {
                Ok(len) => break Some(len),
                Err(rustix::io::Errno::RANGE) => value.resize(value.len() * 4, 0),
                Err(rustix::io::Errno::NODATA) => break None,
                Err(e) => return Err(e.into()),
            }
        };
        if let Some(len) = len {
            value.truncate(len);
            out.push((name.to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_user_xattrs_sorted_and_not_through_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"").unwrap();
        for (k, v) in [
            ("user.b", &b"2"[..]),
            ("user.a", &b""[..]),
            ("user.big", &[7u8; 3000][..]),
        ] {
            rustix::fs::setxattr(&f, k, v, rustix::fs::XattrFlags::empty()).unwrap();
        }
        let got = read(&f).unwrap();
        let names: Vec<_> = got
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect();
        assert_eq!(names, ["user.a", "user.b", "user.big"]);
        assert_eq!(got[2].1, vec![7u8; 3000]);
        let l = d.path().join("l");
        std::os::unix::fs::symlink("f", &l).unwrap();
        assert!(read(&l).unwrap().iter().all(|(k, _)| !k.starts_with(b"user.")));
        assert!(is_overlay(b"trusted.overlay.opaque") && !is_overlay(b"trusted.overlayx"));
    }
}
