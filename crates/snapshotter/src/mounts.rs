//! Kernel mounts: EROFS layers mounted by the store itself, and the mount specs
//! handed to containerd.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::{Kind, Mount};

/// Mounts an EROFS image file read-only at `target` with mount(2): the kernel
/// mounts a regular file directly, with no loop device (util-linux `mount` would
/// make one).
pub fn mount_erofs(image: &Path, target: &Path) -> io::Result<()> {
    mount_erofs_with_devices(image, &[], target)
}

/// Mounts the EROFS image file `image` read-only at `target` with `devices` as its
/// extra devices, in device-table order.
///
/// With devices this uses the new mount API (fsopen/fsconfig/fsmount/move_mount):
/// each `device` is its own fsconfig call, so a layer may name any number of blobs,
/// where mount(2) would have to fit them all in one 4 KiB option page.
pub fn mount_erofs_with_devices(image: &Path, devices: &[PathBuf], target: &Path) -> io::Result<()> {
    fs::create_dir_all(target)?;
    if is_mountpoint(target)? {
        return Ok(());
    }
    if devices.is_empty() {
        rustix::mount::mount(image, target, "erofs", rustix::mount::MountFlags::RDONLY, None)?;
        return Ok(());
    }
    use rustix::mount::{
        fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount, FsMountFlags,
        FsOpenFlags, MountAttrFlags, MoveMountFlags,
    };
    let ctx = |what: &str, e: rustix::io::Errno| io::Error::new(e.kind(), format!("{what}: {e}"));
    let fsfd = fsopen("erofs", FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| ctx("fsopen erofs", e))?;
    fsconfig_set_string(&fsfd, "source", image).map_err(|e| ctx("fsconfig source", e))?;
    for d in devices {
        fsconfig_set_string(&fsfd, "device", d).map_err(|e| ctx(&format!("fsconfig device={}", d.display()), e))?;
    }
    fsconfig_set_flag(&fsfd, "ro").map_err(|e| ctx("fsconfig ro", e))?;
    fsconfig_create(&fsfd).map_err(|e| ctx("fsconfig create", e))?;
    let mnt = fsmount(&fsfd, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::MOUNT_ATTR_RDONLY)
        .map_err(|e| ctx("fsmount", e))?;
    move_mount(
        &mnt,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| ctx("move_mount", e))?;
    Ok(())
}

/// Detaches the mount at `target`. Lazy, so a layer still referenced by a running
/// container's overlay stays usable for it; not mounted is not an error.
pub fn unmount(target: &Path) -> io::Result<()> {
    match rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether `path` is a mount point in this mount namespace.
pub fn is_mountpoint(path: &Path) -> io::Result<bool> {
    let path = fs::canonicalize(path)?;
    Ok(mount_points()?.contains(&path))
}

/// Mount points directly below `dir`.
pub fn mounted_under(dir: &Path) -> io::Result<HashSet<PathBuf>> {
    let dir = fs::canonicalize(dir)?;
    Ok(mount_points()?
        .into_iter()
        .filter(|p| p.parent() == Some(dir.as_path()))
        .collect())
}

fn mount_points() -> io::Result<HashSet<PathBuf>> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts containerd performs for a snapshot, in the forms containerd's own
/// overlayfs snapshotter uses (so containerd 1.6 mounts them with plain mount(2)):
///
/// - no parent: a bind of the snapshot's own dir (read-only for a view);
/// - a view of one layer: a read-only bind of that layer's EROFS mount;
/// - otherwise overlayfs, `lowerdir` = the parents' EROFS mounts (nearest first),
///   with `upperdir`/`workdir` for an active snapshot.
pub fn for_snapshot(kind: Kind, fs_dir: &Path, work: &Path, lowers: &[PathBuf]) -> Vec<Mount> {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    if lowers.is_empty() {
        let rw = if kind == Kind::Active { "rw" } else { "ro" };
        return vec![Mount {
            kind: "bind".into(),
            source: s(fs_dir),
            target: String::new(),
            options: vec![rw.into(), "rbind".into()],
        }];
    }
    if kind != Kind::Active && lowers.len() == 1 {
        return vec![Mount {
            kind: "bind".into(),
            source: s(&lowers[0]),
            target: String::new(),
            options: vec!["ro".into(), "rbind".into()],
        }];
    }
    let mut options = vec!["index=off".to_string()];
    if kind == Kind::Active {
        options.push(format!("workdir={}", s(work)));
        options.push(format!("upperdir={}", s(fs_dir)));
    }
    let lower: Vec<String> = lowers.iter().map(|p| s(p)).collect();
    options.push(format!("lowerdir={}", lower.join(":")));
    vec![Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
    }

    #[test]
    fn mount_forms() {
        let fs_dir = Path::new("/r/snapshots/3/fs");
        let work = Path::new("/r/snapshots/3/work");
        let active = for_snapshot(Kind::Active, fs_dir, work, &[]);
        assert_eq!(active[0].kind, "bind");
        assert_eq!(active[0].options, vec!["rw", "rbind"]);
        let view1 = for_snapshot(Kind::View, fs_dir, work, &[PathBuf::from("/r/m/1")]);
        assert_eq!((view1[0].kind.as_str(), view1[0].source.as_str()), ("bind", "/r/m/1"));
        let lowers = [PathBuf::from("/r/m/2"), PathBuf::from("/r/m/1")];
        let over = for_snapshot(Kind::Active, fs_dir, work, &lowers);
        assert_eq!(over[0].kind, "overlay");
        assert_eq!(
            over[0].options,
            vec![
                "index=off",
                "workdir=/r/snapshots/3/work",
                "upperdir=/r/snapshots/3/fs",
                "lowerdir=/r/m/2:/r/m/1"
            ]
        );
        let view2 = for_snapshot(Kind::View, fs_dir, work, &lowers);
        assert_eq!(view2[0].options, vec!["index=off", "lowerdir=/r/m/2:/r/m/1"]);
    }
}
