//! Merged metadata images of committed chains (fsmeta): the files of one, and how it
//! is built, checked and mounted. The store decides when (see `Snapshotter::merge_for`).
//!
//! ```text
//! merged/<id>/fsmeta.erofs   the chain's whole tree, files pointing into the layers' data
//! merged/<id>/devices        its extra devices in device-table order, one path per line,
//!                            relative to the store's root
//! mm/<id>                    where it is mounted: the one lower of the chain's users
//! ```
//!
//! `<id>` is the chain's top committed layer. A chain's layers never change, so its
//! merged image is written once, renamed into place complete (the rename is the commit
//! point: a crash before it leaves only `staging/`), and never rewritten while mounted.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The directory of the merged image of the chain topped by `id`.
pub(crate) fn dir(root: &Path, id: u64) -> PathBuf {
    root.join("merged").join(id.to_string())
}

/// Where that image is mounted.
pub(crate) fn mountpoint(root: &Path, id: u64) -> PathBuf {
    root.join("mm").join(id.to_string())
}

/// Writes the merged image of `layers` (bottom first) in `staging` and renames it to
/// [`dir`]. The image is laid out flat (each device's block address recorded), so the
/// same file also serves a VMDK of the chain.
pub(crate) fn build(root: &Path, staging: &Path, id: u64, layers: &[fsmeta::Layer]) -> Result<(), String> {
    let _ = fs::remove_dir_all(staging);
    let res = (|| {
        fs::create_dir_all(staging).map_err(|e| e.to_string())?;
        let merged = fsmeta::merge_with(layers, &staging.join("fsmeta.erofs"), true).map_err(|e| e.to_string())?;
        let mut list = Vec::new();
        for d in &merged.devices {
            let rel = d
                .strip_prefix(root)
                .map_err(|_| format!("device {} is outside the store", d.display()))?;
            let rel = rel
                .to_str()
                .filter(|s| !s.contains('\n'))
                .ok_or_else(|| format!("device path {rel:?} cannot be listed"))?;
            list.extend_from_slice(rel.as_bytes());
            list.push(b'\n');
        }
        let mut f = fs::File::create(staging.join("devices")).map_err(|e| e.to_string())?;
        f.write_all(&list)
            .and_then(|_| f.sync_all())
            .map_err(|e| e.to_string())?;
        fsync(staging).map_err(|e| e.to_string())?;
        let target = dir(root, id);
        let _ = fs::remove_dir_all(&target);
        fs::rename(staging, &target).map_err(|e| e.to_string())?;
        fsync(&root.join("merged")).map_err(|e| e.to_string())
    })();
    if res.is_err() {
        let _ = fs::remove_dir_all(staging);
    }
    res
}

/// Checks the merged image of `id` before it is mounted: the image must validate with
/// its devices (`erofs::reader::Image::validate`), and its device list must name as many files as its device
/// table has slots, all present. Returns the devices' paths.
pub(crate) fn check(root: &Path, id: u64) -> Result<Vec<PathBuf>, String> {
    let d = dir(root, id);
    let list = fs::read_to_string(d.join("devices")).map_err(|e| format!("device list: {e}"))?;
    let devices: Vec<PathBuf> = list.lines().map(|l| root.join(l)).collect();
    let img = erofs::reader::Image::open_with_devices(&d.join("fsmeta.erofs"), &devices)
        .map_err(|e| format!("merged image: {e}"))?;
    if img.devices().len() != devices.len() {
        return Err(format!(
            "device list names {} files, the image {} devices",
            devices.len(),
            img.devices().len()
        ));
    }
    for (p, slot) in devices.iter().zip(img.devices()) {
        let size = fs::metadata(p)
            .map_err(|e| format!("device {}: {e}", p.display()))?
            .len();
        if size.div_ceil(erofs::format::BLOCK_SIZE) != u64::from(slot.blocks) {
            return Err(format!("device {} is not the size the image records", p.display()));
        }
    }
    img.validate().map_err(|e| format!("invalid merged image: {e}"))?;
    Ok(devices)
}

/// Mounts the merged image of `id` with `devices` at [`mountpoint`].
pub(crate) fn mount(root: &Path, id: u64, devices: &[PathBuf]) -> io::Result<()> {
    crate::mounts::mount_erofs_with_devices(&dir(root, id).join("fsmeta.erofs"), devices, &mountpoint(root, id))
}

/// Unmounts and deletes the merged image of `id`.
pub(crate) fn remove(root: &Path, id: u64) {
    let mp = mountpoint(root, id);
    if mp.exists() {
        if let Err(e) = crate::mounts::unmount(&mp) {
            tracing::warn!(path = %mp.display(), error = %e, "unmounting a merged image");
        }
        let _ = fs::remove_dir(&mp);
    }
    let _ = fs::remove_dir_all(dir(root, id));
}

fn fsync(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}
