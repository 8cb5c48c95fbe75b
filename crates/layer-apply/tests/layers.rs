//! Two layers with whiteouts: OCI mode onto a directory against the expected merged
//! tree, and overlay mode into an upper dir mounted over the first layer.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use common::*;
use layer_apply::Whiteouts;

const LAYERS: &str = r#"
def D(tf, name, mode=0o755, **kw):
    add(tf, name, type=tarfile.DIRTYPE, mode=mode, **kw)
which = sys.argv[1].rsplit("/", 1)[1]
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
    if which == "l1.tar":
        D(tf, "a/", mtime=1000)
        add(tf, "a/keep", data=b"keep")
        add(tf, "a/gone", data=b"gone")
        D(tf, "a/sub/")
        add(tf, "a/sub/x", data=b"x")
        D(tf, "b/")
        add(tf, "b/old1", data=b"old1")
        D(tf, "b/olddir/", mode=0o700)
        add(tf, "b/olddir/y", data=b"y")
        D(tf, "b2/")
        add(tf, "b2/old", data=b"old")
        D(tf, "b2/olddir/")
        add(tf, "b2/olddir/y", data=b"y")
        add(tf, "b2/olddir/keepname", data=b"old content")
        D(tf, "c/")
        add(tf, "c/f", data=b"f")
        add(tf, "top", data=b"top")
        add(tf, "link", type=tarfile.SYMTYPE, link="a")
        D(tf, "d/")
        D(tf, "d/e/")
        add(tf, "d/e/f", data=b"f")
        add(tf, "repl", data=b"file in lower")
        D(tf, "repldir/")
        add(tf, "repldir/q", data=b"q")
        D(tf, "untouched/", mode=0o711, uid=3, mtime=1234)
        add(tf, "untouched/u", data=b"u")
    else:
        l2 = which == "l2.tar"
        D(tf, "a/", mode=0o750, uid=1, mtime=2000000000.25)
        if l2:
            add(tf, "a/.wh.gone", uid=5)
            add(tf, "a/.wh.sub")
        add(tf, "a/new", data=b"new")
        if not l2:
            add(tf, "a/keep", data=b"keep")
        D(tf, "b/", mtime=2000000001)
        add(tf, "b/new1", data=b"new1")
        if l2:
            add(tf, "b/.wh..wh..opq")
        D(tf, "b/olddir/", mode=0o751)
        add(tf, "b/olddir/z", data=b"z")
        D(tf, "b2/", mtime=2000000002)
        D(tf, "b2/olddir/", mtime=2000000003)
        add(tf, "b2/olddir/keepname", data=b"new content")
        if l2:
            add(tf, "b2/.wh..wh..opq")
            add(tf, ".wh.top", uid=5, gid=6)
            add(tf, ".wh.c")
            add(tf, ".wh..wh.plnk")
            add(tf, ".wh.nothere")
        D(tf, "d/", mtime=2000000004)
        if l2:
            add(tf, "d/.wh..wh..opq")
        D(tf, "repl/", mtime=2000000005)
        add(tf, "repl/in", data=b"in")
        add(tf, "repldir", data=b"now a file")
        D(tf, "e/", mtime=2000000006)
        if l2:
            add(tf, "e/.wh..wh..opq")
        add(tf, "e/n", data=b"n")
        if not l2:
            # What else survives of layer 1 in the merged tree.
            add(tf, "link", type=tarfile.SYMTYPE, link="a")
            D(tf, "untouched/", mode=0o711, uid=3, mtime=1234)
            add(tf, "untouched/u", data=b"u")
"#;

fn build(dir: &Path) {
    for name in ["l1.tar", "l2.tar", "merged.tar"] {
        py(LAYERS, &dir.join(name));
    }
}

#[test]
fn oci_layers_match_expected_merge() {
    assert_root();
    let t = tempfile::tempdir().unwrap();
    build(t.path());
    let want_dir = t.path().join("want");
    gnu_extract(&t.path().join("merged.tar"), &want_dir);
    let got_dir = t.path().join("got");
    apply(&t.path().join("l1.tar"), &got_dir, Whiteouts::Oci).unwrap();
    let stats = apply(&t.path().join("l2.tar"), &got_dir, Whiteouts::Oci).unwrap();
    assert_eq!(stats.entries, 25);
    assert_same(&snapshot(&got_dir), &snapshot(&want_dir), "OCI layers");
}

#[test]
fn overlay_upper_mounted_matches_oci_result() {
    assert_root();
    // The overlay is mounted in here: unmounted (even on panic) before it is removed.
    let t = test_support::TestDir::new("layer-apply-overlay-");
    build(t.path());
    let oci = t.path().join("oci");
    apply(&t.path().join("l1.tar"), &oci, Whiteouts::Oci).unwrap();
    apply(&t.path().join("l2.tar"), &oci, Whiteouts::Oci).unwrap();

    let lower = t.path().join("lower");
    let upper = t.path().join("upper");
    let work = t.path().join("work");
    let merged = t.path().join("merged");
    apply(&t.path().join("l1.tar"), &lower, Whiteouts::Oci).unwrap();
    apply(&t.path().join("l2.tar"), &upper, Whiteouts::Overlay).unwrap();

    // The upper dir as overlayfs expects it.
    let wh = std::fs::symlink_metadata(upper.join("a/gone")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    assert_eq!((wh.uid(), wh.mode() & 0o7777), (5, 0));
    let top = std::fs::symlink_metadata(upper.join("top")).unwrap();
    assert!(top.file_type().is_char_device() && top.rdev() == 0);
    assert_eq!((top.uid(), top.gid()), (5, 6));
    assert!(std::fs::symlink_metadata(upper.join("a/sub"))
        .unwrap()
        .file_type()
        .is_char_device());
    assert!(std::fs::symlink_metadata(upper.join("nothere"))
        .unwrap()
        .file_type()
        .is_char_device());
    for d in ["b", "b2", "d", "e"] {
        let x = xattrs(&upper.join(d));
        assert_eq!(
            x.get(&b"trusted.overlay.opaque"[..]).map(|v| v.as_slice()),
            Some(&b"y"[..]),
            "{d}"
        );
    }
    assert!(!xattrs(&upper.join("a")).contains_key(&b"trusted.overlay.opaque"[..]));
    assert!(!upper.join(".wh..wh.plnk").exists() && !upper.join("plnk").exists());
    assert!(!upper.join("b/.wh..wh..opq").exists());

    for d in [&work, &merged] {
        std::fs::create_dir(d).unwrap();
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let data = std::ffi::CString::new(data).unwrap();
    rustix::mount::mount(
        "overlay",
        &merged,
        "overlay",
        rustix::mount::MountFlags::empty(),
        data.as_c_str(),
    )
    .expect("mount overlay");
    let m = test_support::Unmount(merged.clone());
    let view = snapshot(&merged);
    drop(m);
    assert_same(&view, &snapshot(&oci), "overlay merged view vs OCI apply");
}

/// A whiteout hides lower layers' content only (OCI image spec): what this layer put
/// in the upper dir under the same name stays, and a directory of this layer becomes
/// opaque (its lower namesake is deleted, not merged).
#[test]
fn overlay_whiteout_keeps_this_layers_entry() {
    assert_root();
    let t = tempfile::tempdir().unwrap();
    let tar = t.path().join("w.tar");
    py(
        r#"
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
    add(tf, "x/", type=tarfile.DIRTYPE, mode=0o755)
    add(tf, "x/f", data=b"f")
    add(tf, "x/sub/g", data=b"g")
    add(tf, "x/.wh.f")
    add(tf, "x/.wh.sub")
    add(tf, "y/.wh..wh..opq")
"#,
        &tar,
    );
    let up = t.path().join("up");
    apply(&tar, &up, Whiteouts::Overlay).unwrap();
    assert_eq!(std::fs::read(up.join("x/f")).unwrap(), b"f");
    assert_eq!(std::fs::read(up.join("x/sub/g")).unwrap(), b"g");
    assert_eq!(
        xattrs(&up.join("x/sub"))
            .get(&b"trusted.overlay.opaque"[..])
            .map(|v| v.as_slice()),
        Some(&b"y"[..])
    );
    assert!(!xattrs(&up.join("x")).contains_key(&b"trusted.overlay.opaque"[..]));
    // The opaque marker creates its directory when the tar only implies it.
    let y = std::fs::symlink_metadata(up.join("y")).unwrap();
    assert!(y.is_dir());
    assert_eq!(y.mode() & 0o7777, 0o755);
    assert_eq!(
        xattrs(&up.join("y"))
            .get(&b"trusted.overlay.opaque"[..])
            .map(|v| v.as_slice()),
        Some(&b"y"[..])
    );
}
