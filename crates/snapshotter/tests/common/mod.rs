//! Helpers shared by the store tests. Each test keeps its store root and mount
//! points in a `test_support::TestDir`, which unmounts whatever is left under it
//! when the test ends (passed, failed or panicked): dropping a `Snapshotter` does
//! not unmount its layers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use snapshotter::Mount;

pub fn need_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests mount file systems: run them as root"
    );
}

/// Performs containerd's side of a mount spec; unmounted on drop.
pub struct Mounted(#[allow(dead_code)] test_support::SpecMount);

impl Mounted {
    pub fn new(m: &[Mount], target: &Path) -> Mounted {
        assert_eq!(m.len(), 1);
        Mounted(test_support::SpecMount::new(
            &m[0].kind,
            &m[0].source,
            &m[0].options,
            target,
        ))
    }
}

pub fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}
