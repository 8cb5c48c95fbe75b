//! Helpers shared by the store tests. Each test keeps its store root and mount
//! points in a `test_support::TestDir`, which unmounts whatever is left under it
//! when the test ends (passed, failed or panicked): dropping a `Snapshotter` does
//! not unmount its layers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use snapshotter::Mount;

pub fn need_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests mount file systems: run them as root"
    );
}

/// Performs containerd's side of a mount spec.
pub struct Mounted(pub std::path::PathBuf);

impl Mounted {
    pub fn new(m: &[Mount], target: &Path) -> Mounted {
        assert_eq!(m.len(), 1);
        let m = &m[0];
        fs::create_dir_all(target).unwrap();
        use rustix::mount::{mount, mount_bind_recursive, mount_remount, MountFlags};
        match m.kind.as_str() {
            "bind" => {
                mount_bind_recursive(Path::new(&m.source), target).unwrap();
                if m.options.iter().any(|o| o == "ro") {
                    mount_remount(target, MountFlags::BIND | MountFlags::RDONLY, "").unwrap();
                }
            }
            "overlay" => {
                let data = m.options.join(",");
                let data = std::ffi::CString::new(data).unwrap();
                mount("overlay", target, "overlay", MountFlags::empty(), Some(data.as_c_str())).unwrap();
            }
            other => panic!("unexpected mount type {other}"),
        }
        Mounted(target.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Everything at the target (an rbind brings the mounts below its source along).
        test_support::unmount_under(&self.0);
    }
}

pub fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}
