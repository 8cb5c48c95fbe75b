//! Merged metadata in the store (`merge_layers`): snapshots over a chain get one EROFS
//! lower, whose tree is the per-layer stack's; the merged image lives while a snapshot
//! uses it, survives restarts, is rebuilt when corrupt, and a chain that cannot be merged
//! stays per-layer. The VMDK of a committed chain mounts, through qemu-img, as the same tree.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;
use snapshotter::{Snapshotter, StoreOptions};

/// Performs containerd's side of one of the store's mount specs; unmounted on drop.
struct Mounted(#[allow(dead_code)] test_support::SpecMount);

impl Mounted {
    fn new(m: &[snapshotter::Mount], target: &Path) -> Mounted {
        assert_eq!(m.len(), 1, "{m:?}");
        Mounted(test_support::SpecMount::new(
            &m[0].kind,
            &m[0].source,
            &m[0].options,
            target,
        ))
    }
}

fn opts(merge: bool, dedup: bool) -> StoreOptions {
    StoreOptions {
        merge_layers: merge,
        max_unmerged_layers: 1,
        dedup,
        ..Default::default()
    }
}

/// The lowers a mount spec names: the bind's source, or the overlay's lowerdir.
fn lowers(m: &[snapshotter::Mount]) -> Vec<String> {
    let m = &m[0];
    match m.kind.as_str() {
        "bind" => vec![m.source.clone()],
        _ => m
            .options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .map(|l| l.split(':').map(String::from).collect())
            .unwrap_or_default(),
    }
}

/// Writes a layer through an active snapshot and commits it as `name`.
fn layer(s: &Snapshotter, work: &Path, name: &str, parent: &str, write: impl FnOnce(&Path)) {
    let key = format!("{name}-active");
    let m = s.prepare(&key, parent, BTreeMap::new()).unwrap();
    {
        let _g = Mounted::new(&m, &work.join(&key));
        write(&work.join(&key));
    }
    s.commit(name, &key, BTreeMap::new()).unwrap();
}

/// Four layers: files replaced, deleted (whiteouts), a directory made opaque, hard links,
/// symlinks, xattrs, modes, large files (block-addressed data) and small ones.
fn four_layers(s: &Snapshotter, work: &Path) {
    layer(s, work, "l1", "", |t| {
        fs::create_dir_all(t.join("etc/conf.d")).unwrap();
        fs::write(t.join("etc/hostname"), "one\n").unwrap();
        fs::write(t.join("etc/conf.d/a"), "a").unwrap();
        fs::write(t.join("etc/conf.d/b"), "b").unwrap();
        fs::create_dir_all(t.join("usr/bin")).unwrap();
        fs::write(t.join("usr/bin/big"), test_support::pseudo_random(300_000, 1)).unwrap();
        fs::hard_link(t.join("usr/bin/big"), t.join("usr/bin/big-link")).unwrap();
        std::os::unix::fs::symlink("big", t.join("usr/bin/sym")).unwrap();
        fs::write(t.join("gone"), "bye").unwrap();
        fs::set_permissions(t.join("etc/hostname"), fs::Permissions::from_mode(0o600)).unwrap();
    });
    layer(s, work, "l2", "l1", |t| {
        fs::remove_file(t.join("gone")).unwrap();
        fs::remove_dir_all(t.join("etc/conf.d")).unwrap();
        fs::create_dir(t.join("etc/conf.d")).unwrap();
        fs::write(t.join("etc/conf.d/c"), "c").unwrap();
        fs::write(t.join("etc/hostname"), "two\n").unwrap();
        fs::write(t.join("usr/bin/tool"), test_support::pseudo_random(70_000, 2)).unwrap();
    });
    layer(s, work, "l3", "l2", |t| {
        rustix::fs::setxattr(
            t.join("usr/bin/tool"),
            "user.note",
            b"three",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        fs::create_dir_all(t.join("var/lib")).unwrap();
        fs::write(t.join("var/lib/state"), test_support::pseudo_random(9_000, 3)).unwrap();
        fs::remove_file(t.join("usr/bin/sym")).unwrap();
        fs::create_dir(t.join("usr/bin/sym")).unwrap();
    });
    layer(s, work, "l4", "l3", |t| {
        fs::write(t.join("usr/bin/big"), test_support::pseudo_random(200_000, 4)).unwrap();
        fs::remove_dir_all(t.join("var")).unwrap();
        fs::write(t.join("etc/new"), "").unwrap();
    });
}

fn tree_of(m: &[snapshotter::Mount], at: &Path) -> Tree {
    let _g = Mounted::new(m, at);
    let mut t = snapshot_tree(at);
    strip_overlay_xattrs(&mut t);
    t
}

fn dir_names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(d)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn merged_chain(dedup: bool) {
    require_root_and_kernel();
    let tmp = test_support::TestDir::new("merged-store-");
    let root = tmp.path().join("root");
    let work = tmp.path().join("work");

    // The per-layer stack, from a store that does not merge: the reference.
    let s = Snapshotter::open_with(&root, opts(false, dedup)).unwrap();
    four_layers(&s, &work);
    let m = s.view("ref", "l4", BTreeMap::new()).unwrap();
    assert_eq!(lowers(&m).len(), 4, "{m:?}");
    let expected = tree_of(&m, &work.join("ref"));
    s.remove("ref").unwrap();
    drop(s);

    // The same store, merging: one lower, the same tree.
    let s = Snapshotter::open_with(&root, opts(true, dedup)).unwrap();
    let m = s.view("v", "l4", BTreeMap::new()).unwrap();
    let l = lowers(&m);
    assert_eq!(l.len(), 1, "{m:?}");
    assert!(l[0].starts_with(root.join("mm").to_str().unwrap()), "{m:?}");
    assert_trees_eq(
        "merged view",
        &expected,
        &tree_of(&m, &work.join("v")),
        &CompareOpts::default(),
    );
    let top = dir_names(&root.join("merged"));
    assert_eq!(top.len(), 1, "one merged image: {top:?}");
    assert_eq!(
        dir_names(&root.join("merged").join(&top[0])),
        ["devices", "fsmeta.erofs"]
    );

    // A container over the same chain shares it; its writes go to its upper dir.
    let c = s.prepare("c", "l4", BTreeMap::new()).unwrap();
    assert_eq!(c[0].kind, "overlay");
    assert_eq!(lowers(&c), l);
    {
        let _g = Mounted::new(&c, &work.join("c"));
        fs::write(work.join("c/etc/hostname"), "five\n").unwrap();
        fs::remove_file(work.join("c/usr/bin/tool")).unwrap();
    }
    assert_eq!(s.mounts("c").unwrap(), c);
    // A chain of one layer is not merged (max_unmerged_layers = 1).
    let one = s.view("one", "l1", BTreeMap::new()).unwrap();
    assert!(lowers(&one)[0].starts_with(root.join("m").to_str().unwrap()), "{one:?}");
    // Nor is a layer being unpacked (containerd's target label): only its upper dir counts.
    let unpack = s
        .prepare(
            "extract",
            "l4",
            BTreeMap::from([("containerd.io/snapshot.ref".to_string(), "sha256:0123".to_string())]),
        )
        .unwrap();
    assert_eq!(lowers(&unpack).len(), 4, "{unpack:?}");
    s.remove("extract").unwrap();

    // Committing the container makes a layer; the merged image stays for the view.
    s.commit("l5", "c", BTreeMap::new()).unwrap();
    assert_eq!(dir_names(&root.join("merged")), top);
    assert!(s.verify().unwrap().is_empty(), "{:?}", s.verify().unwrap());

    // A new chain (l1..l5) gets its own merged image; both are used.
    let v5 = s.view("v5", "l5", BTreeMap::new()).unwrap();
    let t5 = tree_of(&v5, &work.join("v5"));
    assert!(t5.contains_key(Path::new("/etc/hostname")) && !t5.contains_key(Path::new("/usr/bin/tool")));
    assert_eq!(dir_names(&root.join("merged")).len(), 2);

    // A restart keeps them mounted where they are, and the mounts the same.
    drop(s);
    let s = Snapshotter::open_with(&root, opts(true, dedup)).unwrap();
    assert_eq!(s.mounts("v").unwrap(), m);
    assert!(s.verify().unwrap().is_empty(), "{:?}", s.verify().unwrap());

    // A crash: the merged images unmounted (a reboot), one corrupted, a half-built one
    // in staging/ and one nobody uses. At start the corrupt one is built again (never
    // mounted as it was), the others go.
    drop(s);
    test_support::unmount_under(&root.join("mm"));
    let image = root.join("merged").join(&top[0]).join("fsmeta.erofs");
    let mut bytes = fs::read(&image).unwrap();
    bytes[1024..1100].fill(0xa5);
    fs::write(&image, &bytes).unwrap();
    fs::create_dir_all(root.join("staging/merged-9-9")).unwrap();
    fs::write(root.join("staging/merged-9-9/fsmeta.erofs"), b"half").unwrap();
    fs::create_dir_all(root.join("merged/424242")).unwrap();
    let s = Snapshotter::open_with(&root, opts(true, dedup)).unwrap();
    assert_ne!(fs::read(&image).unwrap(), bytes, "the corrupt merged image was kept");
    erofs::reader::Image::open_with_devices(&image, &devices_of(&root, &top[0]))
        .unwrap()
        .validate()
        .expect("the rebuilt merged image validates");
    assert_eq!(dir_names(&root.join("merged")).len(), 2);
    assert!(dir_names(&root.join("staging")).is_empty());
    assert_trees_eq(
        "merged view after a rebuild",
        &expected,
        &tree_of(&s.mounts("v").unwrap(), &work.join("v-again")),
        &CompareOpts::default(),
    );
    assert!(s.verify().unwrap().is_empty(), "{:?}", s.verify().unwrap());

    // The VMDK of the chain: qemu-img reads it, and its raw form mounts, with no extra
    // devices, as the same tree.
    let vmdk = work.join("l4.vmdk");
    let (meta, devices) = s.vmdk("l4", &vmdk).unwrap();
    assert_eq!(meta, work.join("l4.erofs"));
    assert!(!devices.is_empty());
    qemu_img_info(&vmdk);
    let raw = work.join("l4.raw");
    qemu_img_raw(&vmdk, &raw);
    {
        let m = Mount::erofs(&raw);
        assert_trees_eq(
            "VMDK, raw",
            &expected,
            &snapshot_tree(m.path()),
            &CompareOpts::default(),
        );
    }
    assert!(matches!(
        s.vmdk("v", &work.join("x.vmdk")),
        Err(snapshotter::Error::FailedPrecondition(_))
    ));
    assert!(matches!(
        s.vmdk("nope", &work.join("x.vmdk")),
        Err(snapshotter::Error::NotFound(_))
    ));

    // The last user gone, each merged image goes with it.
    for k in ["v", "one"] {
        s.remove(k).unwrap();
    }
    assert_eq!(dir_names(&root.join("merged")).len(), 1, "l5's chain is still viewed");
    s.remove("v5").unwrap();
    assert!(dir_names(&root.join("merged")).is_empty());
    assert!(dir_names(&root.join("mm")).is_empty());
    assert!(s.verify().unwrap().is_empty(), "{:?}", s.verify().unwrap());
    for k in ["l5", "l4", "l3", "l2", "l1"] {
        s.remove(k).unwrap();
    }
    s.cleanup().unwrap();
    drop(s);

    // With no daemon, the CLI opens the store itself; a committed name it does not know
    // is an error.
    let out = std::process::Command::new(test_support::workspace_bin("dedup-snapshotter"))
        .args(["vmdk", "--root"])
        .arg(&root)
        .args(["l4", work.join("gone.vmdk").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"), "{out:?}");
    test_support::unmount_under(&root);
}

#[test]
fn merged_chain_of_plain_layers() {
    merged_chain(false);
}

#[test]
fn merged_chain_of_deduplicated_layers() {
    merged_chain(true);
}

/// A chain holding compressed layers cannot be merged: its snapshots mount the layers one
/// by one, and nothing is left in `merged/`.
#[test]
fn compressed_chains_stay_per_layer() {
    require_root_and_kernel();
    let tmp = test_support::TestDir::new("merged-store-z-");
    let root = tmp.path().join("root");
    let work = tmp.path().join("work");
    let s = Snapshotter::open_with(
        &root,
        StoreOptions {
            compression: Some(erofs::writer::Compression::new("lz4".parse().unwrap())),
            ..opts(true, false)
        },
    )
    .unwrap();
    layer(&s, &work, "z1", "", |t| {
        fs::write(t.join("text"), "compressible ".repeat(10_000)).unwrap();
    });
    layer(&s, &work, "z2", "z1", |t| {
        fs::write(t.join("more"), "again ".repeat(10_000)).unwrap();
    });
    for i in 0..2 {
        let m = s.view(&format!("zv{i}"), "z2", BTreeMap::new()).unwrap();
        assert_eq!(lowers(&m).len(), 2, "{m:?}");
        let t = tree_of(&m, &work.join(format!("zv{i}")));
        assert!(t.contains_key(Path::new("/text")) && t.contains_key(Path::new("/more")));
    }
    assert!(dir_names(&root.join("merged")).is_empty());
    assert!(dir_names(&root.join("staging")).is_empty());
    assert!(s.verify().unwrap().is_empty(), "{:?}", s.verify().unwrap());
}

/// The devices a merged image of the store lists.
fn devices_of(root: &Path, id: &str) -> Vec<PathBuf> {
    fs::read_to_string(root.join("merged").join(id).join("devices"))
        .unwrap()
        .lines()
        .map(|l| root.join(l))
        .collect()
}
