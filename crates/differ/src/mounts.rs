//! Reading containerd mount specs: the layers a view shows, and mounting
//! the others in a temporary directory for the walking differ.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use snapshotter::Mount;

use crate::{DiffError, Result};

fn option<'a>(m: &'a Mount, key: &str) -> Option<&'a str> {
    m.options
        .iter()
        .find_map(|o| o.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// The lower layers of an overlay mount, nearest first.
pub fn overlay_lowers(m: &Mount) -> Vec<PathBuf> {
    option(m, "lowerdir")
        .map(|l| l.split(':').map(PathBuf::from).collect())
        .unwrap_or_default()
}

/// The layers a read-only mount set shows, nearest first: a bind's source or an
/// overlay's lowerdirs (no upper). `None` for anything else.
pub fn view_layers(mounts: &[Mount]) -> Option<Vec<PathBuf>> {
    match mounts {
        [] => Some(Vec::new()),
        [m] if m.kind == "bind" || m.kind == "rbind" => Some(vec![PathBuf::from(&m.source)]),
        [m] if m.kind == "overlay" && option(m, "upperdir").is_none() => Some(overlay_lowers(m)),
        _ => None,
    }
}

/// The upper dir of a single overlay mount (the walking differ applies there
/// directly, writing overlay whiteouts).
pub fn overlay_upper(mounts: &[Mount]) -> Option<PathBuf> {
    match mounts {
        [m] if m.kind == "overlay" => option(m, "upperdir").map(PathBuf::from),
        _ => None,
    }
}

/// Mounts in a temporary directory, unmounted (lazily) and removed on drop.
pub struct TempMount {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl TempMount {
    /// Performs `mounts` (containerd's forms: bind, overlay, or a file system type
    /// with a source) on a new temporary directory under `parent`.
    pub fn new(parent: &Path, mounts: &[Mount], readonly: bool) -> Result<TempMount> {
        let dir = tempfile::Builder::new()
            .prefix("diff-mount-")
            .tempdir_in(parent)
            .map_err(|e| DiffError::Internal(format!("temporary mount point: {e}")))?;
        let mut tm = TempMount { dir, mounted: false };
        for m in mounts {
            mount_one(m, tm.dir.path(), readonly)?;
            tm.mounted = true;
        }
        Ok(tm)
    }

    /// Where the mounts are.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        if self.mounted {
            // Detach repeatedly: several mounts may be stacked on the same point.
            while rustix::mount::unmount(self.dir.path(), rustix::mount::UnmountFlags::DETACH).is_ok() {}
        }
    }
}

fn mount_one(m: &Mount, target: &Path, readonly: bool) -> Result<()> {
    use rustix::mount::{mount, mount_bind_recursive, mount_remount, MountFlags};
    let err = |e: rustix::io::Errno| DiffError::Internal(format!("mounting {} ({}) : {e}", m.source, m.kind));
    let ro = readonly || m.options.iter().any(|o| o == "ro");
    match m.kind.as_str() {
        "bind" | "rbind" => {
            mount_bind_recursive(Path::new(&m.source), target).map_err(err)?;
            if ro {
                mount_remount(target, MountFlags::BIND | MountFlags::RDONLY, "").map_err(err)?;
            }
        }
        fstype => {
            // Flags containerd expresses as options; the rest is file system data.
            let mut flags = MountFlags::empty();
            let mut data = Vec::new();
            for o in &m.options {
                match o.as_str() {
                    "ro" => flags |= MountFlags::RDONLY,
                    "rw" | "defaults" => {}
                    "nosuid" => flags |= MountFlags::NOSUID,
                    "nodev" => flags |= MountFlags::NODEV,
                    "noexec" => flags |= MountFlags::NOEXEC,
                    other => data.push(other.to_string()),
                }
            }
            if ro {
                flags |= MountFlags::RDONLY;
            }
            let data =
                CString::new(data.join(",")).map_err(|_| DiffError::InvalidArgument("NUL in mount options".into()))?;
            mount(m.source.as_str(), target, fstype, flags, Some(data.as_c_str())).map_err(err)?;
        }
    }
    Ok(())
}
