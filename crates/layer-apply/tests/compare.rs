//! `apply_tar` against GNU tar's own extraction of the same tar, entry by entry.

mod common;

use common::*;
use layer_apply::Whiteouts;

/// A tree with every entry type, odd modes and owners, xattrs, nanosecond times, hard
/// links, long names; tarred by GNU tar in POSIX format.
#[test]
fn gnu_tar_tree_matches_gnu_extraction() {
    assert_root();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let tar = t.path().join("layer.tar");
    std::fs::create_dir(&src).unwrap();
    sh(&format!(
        r#"
cd '{src}'
mkdir -p d/sub/deep e empty sticky
echo hello > d/f
: > empty_file
head -c 3000017 /dev/urandom > big
head -c 70000 /dev/urandom > d/sub/deep/medium
chown 1000:2000 d/f; chmod 4755 d/f
echo sg > sg; chown 0:50 sg; chmod 2750 sg
echo z > zero; chmod 0 zero
chmod 1777 sticky
mkdir -m 0700 priv; chown 5:6 priv
mkdir -m 0555 ro; echo inro > ro/file
ln -s f d/rel; ln -s /etc/passwd abs; ln -s nowhere/at/all dangling
chown -h 123:456 d/rel
ln d/f hard1; ln d/f d/sub/hard2
ln -s d/f symlink_with_hardlink; ln symlink_with_hardlink symlink_hardlink2
mknod cdev c 1 3; mknod bdev b 7 200; mkfifo fifo; chown 7:8 fifo; chmod 0620 fifo
setfattr -n user.foo -v bar d/f
setfattr -n trusted.t -v 1 d/sub
setfattr -n user.bin -v 0sAAECAwD/ big
setfattr -n user.empty -v '' empty_file
setfattr -n trusted.dev -v x cdev
long=$(printf 'x%.0s' $(seq 1 255))
mid=$(printf 'y%.0s' $(seq 1 200))
mkdir -p "$long/$mid/$mid/$mid"
echo deep > "$long/$mid/$mid/$mid/$long"
ln -s "$long/$mid" "l$mid"
echo u > 'ünïcödé name with spaces'
find . -mindepth 1 -depth -exec touch -h -d '2001-02-03 04:05:06.123456789' {{}} +
touch -h -d '1999-12-31 23:59:59.000000001' d/rel big
touch -d '2020-05-05 05:05:05.5' d/sub empty
touch -d '1960-01-01 00:00:00.25' e
tar --format=posix --xattrs --xattrs-include='*' --numeric-owner -cpf '{tar}' .
"#,
        src = src.display(),
        tar = tar.display()
    ));
    let want_dir = t.path().join("want");
    gnu_extract(&tar, &want_dir);
    let got_dir = t.path().join("got");
    let stats = apply(&tar, &got_dir, Whiteouts::Oci).unwrap();
    let want = snapshot(&want_dir);
    assert_same(&snapshot(&got_dir), &want, "GNU tar tree");
    assert_eq!(stats.bytes, 6 + 3000017 + 70000 + 3 + 2 + 5 + 5 + 2);
    assert!(stats.entries as usize >= want.entries.len());
    // Sanity: the fixture exercised what it claims.
    let f = &want.entries[std::path::Path::new("d/f")];
    assert_eq!((f.mode, f.uid, f.gid, f.mtime.1), (0o4755, 1000, 2000, 123456789));
    assert_eq!(want.entries[std::path::Path::new("e")].mtime.0, -315619200);
    assert_eq!(want.links.len(), 2);
    assert!(f.xattrs.contains_key(&b"user.foo"[..]));
}

/// Odd tars from python: entries before their parents, re-declared directories,
/// replacements between types, PAX times and xattrs.
#[test]
fn python_odd_cases_match_gnu_extraction() {
    assert_root();
    let t = tempfile::tempdir().unwrap();
    let tar = t.path().join("odd.tar");
    py(
        r#"
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
    add(tf, "implied/deeper/file", data=b"x", mode=0o640, uid=3, gid=4)
    add(tf, "implied/", type=tarfile.DIRTYPE, mode=0o711, uid=9, gid=9, mtime=1234567890.75)
    add(tf, "/abs/leading", data=b"abs")
    add(tf, "./dot/./y", data=b"y")
    add(tf, "dir/", type=tarfile.DIRTYPE, mode=0o755)
    add(tf, "dir/", type=tarfile.DIRTYPE, mode=0o700, uid=11, gid=12, mtime=1000000000.000000001)
    add(tf, "f2d", data=b"was a file")
    add(tf, "f2d/", type=tarfile.DIRTYPE, mode=0o750)
    add(tf, "f2d/in", data=b"in")
    add(tf, "d2f/", type=tarfile.DIRTYPE)
    add(tf, "d2f", data=b"now a file", mode=0o600)
    add(tf, "s2f", type=tarfile.SYMTYPE, link="nowhere")
    add(tf, "s2f", data=b"file, not through the link")
    add(tf, "twice", data=b"first")
    add(tf, "twice", data=b"second, longer", mode=0o6711, uid=1, gid=2)
    add(tf, "pax", data=b"p", pax={"mtime": "1700000000.987654321", "SCHILY.xattr.user.k": "v",
        "SCHILY.xattr.trusted.overlay.keep": "y", "uid": "4000000", "gid": "4000001"})
    add(tf, "sym", type=tarfile.SYMTYPE, link="../../../../whatever", uid=77, gid=88, mtime=1500000000.5,
        pax={"SCHILY.xattr.trusted.sym": "s"})
    add(tf, "hl_to_sym", type=tarfile.LNKTYPE, link="sym", uid=77, gid=88, mtime=1500000000.5)
    add(tf, "fifo", type=tarfile.FIFOTYPE, mode=0o600, mtime=1.5)
    add(tf, "neg", data=b"old", mtime=-100000.5)
    add(tf, "dir/hl", type=tarfile.LNKTYPE, link="./twice", mode=0o6711, uid=1, gid=2)
"#,
        &tar,
    );
    let want_dir = t.path().join("want");
    gnu_extract(&tar, &want_dir);
    let got_dir = t.path().join("got");
    apply(&tar, &got_dir, Whiteouts::Oci).unwrap();
    let mut got = snapshot(&got_dir);
    let mut want = snapshot(&want_dir);
    // GNU tar leaves a twice-declared directory with the time its last child gave it.
    assert_eq!(got.entries[std::path::Path::new("dir")].mtime, (1000000000, 0));
    forget_mtimes(&mut [&mut got, &mut want], &["abs", "dot", "implied/deeper", "dir"]);
    assert_same(&got, &want, "python odd cases");
    let p = &got.entries[std::path::Path::new("pax")];
    assert_eq!((p.uid, p.gid, p.mtime), (4000000, 4000001, (1700000000, 987654321)));
    assert_eq!(
        p.xattrs.get(&b"trusted.overlay.keep"[..]).map(|v| v.as_slice()),
        Some(&b"y"[..])
    );
    assert_eq!(got.entries[std::path::Path::new("implied/deeper")].mode, 0o755);
    assert_eq!(got.entries[std::path::Path::new("twice")].mode, 0o6711);

    // In overlay mode trusted.overlay.* from the tar is dropped, the rest kept.
    let ov = t.path().join("ov");
    apply(&tar, &ov, Whiteouts::Overlay).unwrap();
    let x = xattrs(&ov.join("pax"));
    assert!(!x.contains_key(&b"trusted.overlay.keep"[..]), "{x:?}");
    assert_eq!(x.get(&b"user.k"[..]).map(|v| v.as_slice()), Some(&b"v"[..]));
}

/// Applying a layer over its own result changes nothing (everything is replaced or
/// merged in place, hard links are re-made).
#[test]
fn applying_twice_equals_applying_once() {
    assert_root();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let tar = t.path().join("layer.tar");
    std::fs::create_dir(&src).unwrap();
    sh(&format!(
        r#"
cd '{src}'
mkdir -p d/sub; echo a > d/a; ln d/a d/sub/b; ln -s a d/s; mkfifo d/p; mknod d/c c 4 5
chown 3:4 d/a; chmod 4711 d/a; setfattr -n user.x -v y d/sub
find . -mindepth 1 -depth -exec touch -h -d '2011-01-01 00:00:00.5' {{}} +
tar --format=posix --xattrs --xattrs-include='*' --numeric-owner -cpf '{tar}' .
"#,
        src = src.display(),
        tar = tar.display()
    ));
    let once = t.path().join("once");
    let twice = t.path().join("twice");
    apply(&tar, &once, Whiteouts::Oci).unwrap();
    apply(&tar, &twice, Whiteouts::Oci).unwrap();
    apply(&tar, &twice, Whiteouts::Oci).unwrap();
    let want = snapshot(&once);
    assert_eq!(want.entries[std::path::Path::new("d/a")].mode, 0o4711);
    assert_same(&snapshot(&twice), &want, "applied twice");
}
