//! The store against the real kernel: snapshots prepared, written through the mounts
//! it hands out, committed into EROFS, stacked, reopened and removed.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;

mod common;

use common::*;
use snapshotter::{Error, Kind, Snapshotter};

#[test]
fn layers_commit_to_erofs_and_stack() {
    need_root();
    let tmp = test_support::TestDir::new("snapshotter-store-");
    let root = tmp.path().join("root");
    let work = tmp.path().join("work");
    let s = Snapshotter::open(&root).unwrap();

    // Layer 1: written through the bind mount, as containerd's differ does.
    let m = s.prepare("l1-active", "", BTreeMap::new()).unwrap();
    {
        let t = work.join("a");
        let _g = Mounted::new(&m, &t);
        fs::create_dir(t.join("etc")).unwrap();
        fs::write(t.join("etc/hostname"), "one\n").unwrap();
        fs::write(t.join("gone"), "bye").unwrap();
        fs::create_dir_all(t.join("dir/sub")).unwrap();
        fs::write(t.join("dir/sub/x"), "x").unwrap();
        fs::set_permissions(t.join("etc/hostname"), fs::Permissions::from_mode(0o600)).unwrap();
    }
    s.commit("l1", "l1-active", labels(&[("k", "v")])).unwrap();
    let info = s.stat("l1").unwrap();
    assert_eq!(info.kind, Kind::Committed);
    assert_eq!(info.labels, labels(&[("k", "v")]));
    assert!(matches!(s.stat("l1-active"), Err(Error::NotFound(_))));
    let usage = s.usage("l1").unwrap();
    assert!(usage.size > 0 && usage.inodes == 7, "{usage:?}");

    let snaps: Vec<_> = fs::read_dir(root.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(snaps.len(), 1);
    assert!(snaps[0].join("layer.erofs").is_file());
    assert_eq!(
        fs::read_dir(snaps[0].join("fs")).unwrap().count(),
        0,
        "fs/ is emptied after commit"
    );

    // Layer 2 over it: overlay, deleting and replacing.
    let m = s.prepare("l2-active", "l1", BTreeMap::new()).unwrap();
    assert_eq!(m[0].kind, "overlay");
    {
        let t = work.join("b");
        let _g = Mounted::new(&m, &t);
        assert_eq!(fs::read_to_string(t.join("etc/hostname")).unwrap(), "one\n");
        fs::remove_file(t.join("gone")).unwrap();
        fs::remove_dir_all(t.join("dir")).unwrap();
        fs::create_dir(t.join("dir")).unwrap();
        fs::write(t.join("dir/new"), "n").unwrap();
        fs::write(t.join("etc/hostname"), "two\n").unwrap();
    }
    s.commit("l2", "l2-active", BTreeMap::new()).unwrap();

    // A view of both: the merged tree, read-only.
    let m = s.view("v", "l2", BTreeMap::new()).unwrap();
    {
        let t = work.join("v");
        let _g = Mounted::new(&m, &t);
        assert_eq!(fs::read_to_string(t.join("etc/hostname")).unwrap(), "two\n");
        assert!(!t.join("gone").exists());
        let names: Vec<_> = fs::read_dir(t.join("dir"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["new"]);
        assert!(fs::write(t.join("nope"), "x").is_err(), "a view is read-only");
        assert_eq!(
            fs::metadata(t.join("etc/hostname")).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    // Mounts are stable, and come back after a reopen even if something unmounted them.
    let before = s.mounts("v").unwrap();
    drop(s);
    for e in fs::read_dir(root.join("m")).unwrap() {
        let _ = rustix::mount::unmount(e.unwrap().path(), rustix::mount::UnmountFlags::DETACH);
    }
    let s = Snapshotter::open(&root).unwrap();
    assert_eq!(s.mounts("v").unwrap(), before);
    {
        let t = work.join("v2");
        let _g = Mounted::new(&before, &t);
        assert_eq!(fs::read_to_string(t.join("dir/new")).unwrap(), "n");
    }

    // Containerd's error semantics.
    assert!(matches!(
        s.prepare("v", "", BTreeMap::new()),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        s.prepare("x", "nope", BTreeMap::new()),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        s.prepare("x", "v", BTreeMap::new()),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        s.commit("c", "v", BTreeMap::new()),
        Err(Error::FailedPrecondition(_))
    ));
    assert!(matches!(s.remove("l1"), Err(Error::FailedPrecondition(_))));
    assert!(matches!(s.mounts("l1"), Err(Error::FailedPrecondition(_))));

    // Labels.
    let mut info = s.stat("l2").unwrap();
    info.labels = labels(&[("a", "1"), ("b", "2")]);
    let got = s.update(info.clone(), &[]).unwrap();
    assert_eq!(got.labels, labels(&[("a", "1"), ("b", "2")]));
    info.labels = labels(&[("a", "9")]);
    let got = s.update(info.clone(), &["labels.a".into(), "labels.b".into()]).unwrap();
    assert_eq!(got.labels, labels(&[("a", "9")]));
    assert!(matches!(
        s.update(info, &["parent".into()]),
        Err(Error::InvalidArgument(_))
    ));

    // Remove all, child first: nothing is left mounted or on disk.
    for k in ["v", "l2", "l1"] {
        s.remove(k).unwrap();
    }
    assert!(s.list().unwrap().is_empty());
    s.cleanup().unwrap();
    assert_eq!(fs::read_dir(root.join("snapshots")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(root.join("m")).unwrap().count(), 0);
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(root.to_str().unwrap()), "mounts left under the root");
}

#[test]
fn orphans_are_removed_at_start() {
    need_root();
    let tmp = test_support::TestDir::new("snapshotter-store-");
    let root = tmp.path().join("root");
    let s = Snapshotter::open(&root).unwrap();
    s.prepare("a", "", BTreeMap::new()).unwrap();
    drop(s);
    // What a crash between creating a directory and recording it leaves.
    fs::create_dir_all(root.join("snapshots/999/fs")).unwrap();
    fs::create_dir_all(root.join("staging/1000")).unwrap();
    let s = Snapshotter::open(&root).unwrap();
    assert!(!root.join("snapshots/999").exists());
    assert!(!root.join("staging/1000").exists());
    assert_eq!(s.list().unwrap().len(), 1);
}
