//! Layer semantics at the edges, the same in the three consumers of a layer tar:
//! the converter (tar → EROFS, mounted by the kernel and read by our reader), the
//! walking Apply in OCI mode (tar onto the lower layers' tree) and in Overlay mode (tar
//! into an upper dir), checked against GNU tar where GNU tar has a meaning, and against
//! the OCI image spec's whiteout rules where it has not:
//!
//! * every spelling of the root, of one path, and the names that cannot name anything;
//! * every timestamp a tar can carry: before 1970 (PAX and GNU base-256), after 2106,
//!   beyond the 11-digit octal field, sub-second;
//! * a whiteout and an entry of the same name in one layer, in either order;
//! * opaque markers together with whiteouts;
//! * duplicate names (last one wins) with no duplicate directory entry in the image.
//!
//! Every image is checked by `fsck.erofs` and by our reader (names sorted and unique,
//! one `.` and one `..` per directory). Needs root (kernel mounts, devices, `trusted.*`).

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use layer_apply::{ErrorKind, Whiteouts};

/// A mount, detached on drop.
struct Mnt(PathBuf);

impl Mnt {
    fn erofs(image: &Path, at: &Path) -> Mnt {
        std::fs::create_dir_all(at).unwrap();
        rustix::mount::mount(image, at, "erofs", rustix::mount::MountFlags::RDONLY, None)
            .unwrap_or_else(|e| panic!("mounting {} (file-backed erofs): {e}", image.display()));
        Mnt(at.to_path_buf())
    }

    /// A read-only overlay of `lowers` (topmost first).
    fn overlay(lowers: &[&Path], at: &Path) -> Mnt {
        std::fs::create_dir_all(at).unwrap();
        let dirs: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let data = std::ffi::CString::new(format!("lowerdir={}", dirs.join(":"))).unwrap();
        rustix::mount::mount(
            "overlay",
            at,
            "overlay",
            rustix::mount::MountFlags::RDONLY,
            data.as_c_str(),
        )
        .unwrap_or_else(|e| panic!("overlay mount of {dirs:?}: {e}"));
        Mnt(at.to_path_buf())
    }
}

impl Drop for Mnt {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

struct Case {
    t: tempfile::TempDir,
}

impl Case {
    fn new() -> Case {
        assert_root();
        Case {
            t: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.t.path().join(name)
    }

    /// A PAX tar (GNU format when `gnu`) made by python's tarfile from `body`, run
    /// with `tf` open.
    fn tar(&self, name: &str, gnu: bool, body: &str) -> PathBuf {
        let out = self.path(name);
        let fmt = if gnu { "GNU_FORMAT" } else { "PAX_FORMAT" };
        let mut script = format!("with tarfile.open(sys.argv[1], 'w', format=tarfile.{fmt}) as tf:\n");
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            script.push_str("    ");
            script.push_str(line.trim());
            script.push('\n');
        }
        script.push_str("    pass\n");
        py(&script, &out);
        out
    }
}

fn convert(tar: &Path, out: &Path) -> Result<(), layer_apply::Error> {
    layer_convert::convert(File::open(tar).unwrap(), out, &layer_convert::Options::default(), None).map(|_| ())
}

/// fsck.erofs accepts the image, and our reader finds every directory's names sorted
/// and unique, with exactly one `.` and one `..`.
fn check_image(img: &Path) {
    let out = Command::new("fsck.erofs").arg(img).output().expect("fsck.erofs");
    assert!(
        out.status.success(),
        "fsck.erofs {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let image = erofs::reader::Image::open(img).unwrap();
    let mut stack = vec![(b"/".to_vec(), image.root().unwrap())];
    while let Some((path, dir)) = stack.pop() {
        let names = image.read_dir(&dir).unwrap();
        let shown = String::from_utf8_lossy(&path).into_owned();
        assert!(
            names.windows(2).all(|w| w[0].name < w[1].name),
            "{shown}: names not sorted and unique: {:?}",
            names
                .iter()
                .map(|n| String::from_utf8_lossy(&n.name).into_owned())
                .collect::<Vec<_>>()
        );
        assert_eq!(names.iter().filter(|n| n.name == b".").count(), 1, "{shown}: '.'");
        assert_eq!(names.iter().filter(|n| n.name == b"..").count(), 1, "{shown}: '..'");
        for n in names.iter().filter(|n| n.name != b"." && n.name != b"..") {
            assert!(!n.name.is_empty() && !n.name.contains(&b'/') && !n.name.contains(&0));
            let e = image.entry(n.nid).unwrap();
            if e.kind == erofs::reader::FileKind::Dir {
                let mut p = path.clone();
                p.extend_from_slice(&n.name);
                p.push(b'/');
                stack.push((p, e));
            }
        }
    }
}

/// Mode, owner and mtime of a directory itself.
fn own_meta(p: &Path) -> (u32, u32, u32, (i64, i64)) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.mode() & 0o7777, m.uid(), m.gid(), (m.mtime(), m.mtime_nsec()))
}

fn forget_dir_mtimes(t: &mut Tree) {
    for m in t.entries.values_mut() {
        if m.kind == "dir" {
            m.mtime = (0, 0);
        }
    }
}

/// The layer applied by all three over the lower layer `lower_tar` (extracted by GNU
/// tar): OCI Apply on a copy of the lower tree, the converted image and the Overlay
/// Apply's upper dir each stacked on the lower tree by the kernel's overlayfs. The three
/// trees must be equal (directory mtimes aside: deleting from a lower directory changes
/// its mtime on disk, not in an overlay); the OCI one is returned.
fn three_ways(c: &Case, lower_tar: &Path, layer_tar: &Path) -> Tree {
    let lower = c.path("lower");
    gnu_extract(lower_tar, &lower);
    let oci = c.path("oci");
    sh(&format!("cp -a '{}' '{}'", lower.display(), oci.display()));
    apply(layer_tar, &oci, Whiteouts::Oci).unwrap();

    // Both are given the lower layer, as the store and the differ give theirs: implied
    // directories take its attributes.
    let img = c.path("layer.erofs");
    let opts = layer_convert::Options {
        lowers: layer_convert::Lowers::dirs(vec![lower.clone()]),
        ..Default::default()
    };
    layer_convert::convert(File::open(layer_tar).unwrap(), &img, &opts, None).unwrap();
    check_image(&img);
    let m_img = Mnt::erofs(&img, &c.path("m-img"));
    let m_conv = Mnt::overlay(&[&m_img.0, &lower], &c.path("m-conv"));

    let upper = c.path("upper");
    apply_over(layer_tar, &upper, Whiteouts::Overlay, std::slice::from_ref(&lower)).unwrap();
    let m_up = Mnt::overlay(&[&upper, &lower], &c.path("m-up"));

    let mut want = snapshot(&oci);
    let mut conv = snapshot(&m_conv.0);
    let mut up = snapshot(&m_up.0);
    for t in [&mut want, &mut conv, &mut up] {
        forget_dir_mtimes(t);
    }
    assert_same(&conv, &want, "converted image over the lower layer vs OCI Apply");
    assert_same(
        &up,
        &want,
        "Overlay Apply's upper dir over the lower layer vs OCI Apply",
    );
    drop((m_conv, m_up));
    drop(m_img);
    want
}

/// The layer alone: GNU tar's extraction, OCI Apply and the mounted image agree, root
/// included; `implied` names the directories the tar only implies (their mtimes are
/// "now" on disk and the build time in the image).
fn alone_vs_gnu(c: &Case, tar: &Path, implied: &[&str], root: bool) -> Tree {
    let gnu = c.path("gnu");
    gnu_extract(tar, &gnu);
    let oci = c.path("oci-alone");
    apply(tar, &oci, Whiteouts::Oci).unwrap();
    let img = c.path("alone.erofs");
    convert(tar, &img).unwrap();
    check_image(&img);
    let m = Mnt::erofs(&img, &c.path("m-alone"));
    let mut want = snapshot(&gnu);
    let mut got = snapshot(&oci);
    let mut conv = snapshot(&m.0);
    forget_mtimes(&mut [&mut want, &mut got, &mut conv], implied);
    assert_same(&got, &want, "OCI Apply vs GNU tar");
    assert_same(&conv, &want, "mounted image vs GNU tar");
    if root {
        assert_eq!(own_meta(&oci), own_meta(&gnu), "root of OCI Apply vs GNU tar");
        assert_eq!(own_meta(&m.0), own_meta(&gnu), "root of the image vs GNU tar");
    }
    want
}

#[test]
fn every_spelling_of_the_root_sets_the_root() {
    let c = Case::new();
    // One root entry: what GNU tar gives the directory it extracts into.
    for (i, spelling) in [
        "name='./'",
        "name='.'",
        "name='/'",
        "name='./.'",
        "name='.//'",
        "name='x/', pax={'path': ''}",
    ]
    .iter()
    .enumerate()
    {
        let t = Case::new();
        let (name, pax) = spelling.split_once(", ").unwrap_or((spelling, "pax=None"));
        let name = name.trim_start_matches("name=");
        let tar = t.tar(
            "root.tar",
            false,
            &format!(
                "add(tf, {name}, type=tarfile.DIRTYPE, mode=0o1750, uid=7, gid=8, mtime=-1000.25, {pax})\nadd(tf, 'a/f', data=b'x', mtime=5)"
            ),
        );
        alone_vs_gnu(&t, &tar, &["a"], true);
        assert_eq!(
            own_meta(&t.path("oci-alone")),
            (0o1750, 7, 8, (-1001, 750_000_000)),
            "{i}: {spelling}"
        );
    }

    // Several: the last one wins, in the image and in both Apply modes alike. (GNU tar
    // keeps one delayed set-stat record per spelling and applies them in its own order.)
    let tar = c.tar(
        "roots.tar",
        false,
        r#"
add(tf, "./", type=tarfile.DIRTYPE, mode=0o750, uid=7, gid=8, mtime=1000)
add(tf, "a/f", data=b"x", mtime=5)
add(tf, "/", type=tarfile.DIRTYPE, mode=0o700, uid=9, gid=9, mtime=3000)
add(tf, "./.", type=tarfile.DIRTYPE, mode=0o1777, uid=5, gid=6, mtime=4000.5)
add(tf, ".", type=tarfile.DIRTYPE, mode=0o711, uid=3, gid=4, mtime=2000.25, pax={"SCHILY.xattr.user.root": "r"})
"#,
    );
    let want = (0o711, 3, 4, (2000, 250_000_000));
    let img = c.path("roots.erofs");
    convert(&tar, &img).unwrap();
    check_image(&img);
    let m = Mnt::erofs(&img, &c.path("m-roots"));
    assert_eq!(own_meta(&m.0), want, "image root");
    assert_eq!(xattrs(&m.0).get(&b"user.root"[..]).map(|v| &v[..]), Some(&b"r"[..]));
    for w in [Whiteouts::Oci, Whiteouts::Overlay] {
        let root = c.path(&format!("roots-{w:?}"));
        apply(&tar, &root, w).unwrap();
        assert_eq!(own_meta(&root), want, "{w:?} root");
        assert_eq!(xattrs(&root).get(&b"user.root"[..]).map(|v| &v[..]), Some(&b"r"[..]));
    }
    drop(m);

    // A non-directory cannot be the root: refused by both, the same way.
    for (i, name) in ["./", ".", "/", ""].iter().enumerate() {
        let tar = c.tar(
            &format!("bad{i}.tar"),
            false,
            &format!(r#"add(tf, "{name}", data=b"x")"#),
        );
        let img = c.path(&format!("bad{i}.erofs"));
        assert_eq!(
            convert(&tar, &img).unwrap_err().kind,
            ErrorKind::NotADirectory,
            "{name:?}"
        );
        assert!(!img.exists());
        for w in [Whiteouts::Oci, Whiteouts::Overlay] {
            let err = apply(&tar, &c.path(&format!("bad{i}-{w:?}")), w).unwrap_err();
            assert_eq!(err.kind, ErrorKind::NotADirectory, "{name:?} {w:?}");
        }
    }
}

#[test]
fn spellings_of_one_path_are_one_entry_and_the_last_wins() {
    let c = Case::new();
    let tar = c.tar(
        "dups.tar",
        false,
        r#"
add(tf, "a/b", data=b"one")
add(tf, "./a/b", data=b"two", mode=0o600)
add(tf, "a//b", data=b"three", mode=0o640)
add(tf, "/a/./b", data=b"four", mode=0o604, uid=4)
add(tf, "d/", type=tarfile.DIRTYPE, mode=0o700)
add(tf, "./d", data=b"file now")
add(tf, "e", data=b"file first")
add(tf, "e/", type=tarfile.DIRTYPE, mode=0o750)
add(tf, "e//x", data=b"in e")
add(tf, "s", type=tarfile.SYMTYPE, link="nowhere")
add(tf, "./s", data=b"not through the link")
add(tf, "t", data=b"old target")
add(tf, "h", type=tarfile.LNKTYPE, link="./t")
add(tf, "t", data=b"new target", mode=0o600)
add(tf, "self", data=b"linked to itself")
add(tf, "self", type=tarfile.LNKTYPE, link="self")
add(tf, "g", data=b"g")
add(tf, "g2", type=tarfile.LNKTYPE, link="g")
add(tf, "./g2", type=tarfile.LNKTYPE, link="/g")
add(tf, "dd/", type=tarfile.DIRTYPE, mode=0o711)
add(tf, "./dd//", type=tarfile.DIRTYPE, mode=0o755, uid=2)
"#,
    );
    let want = alone_vs_gnu(&c, &tar, &["a"], false);
    let e = |p: &str| &want.entries[Path::new(p)];
    assert_eq!((e("a/b").kind, e("a/b").mode, e("a/b").uid), ("file", 0o604, 4));
    assert_eq!(std::fs::read(c.path("oci-alone/a/b")).unwrap(), b"four");
    assert_eq!(std::fs::read(c.path("oci-alone/h")).unwrap(), b"old target");
    assert_eq!(std::fs::read(c.path("oci-alone/t")).unwrap(), b"new target");
    assert_eq!(std::fs::read(c.path("oci-alone/self")).unwrap(), b"linked to itself");
    assert_eq!((e("d").kind, e("e").kind, e("s").kind), ("file", "dir", "file"));
    assert_eq!((e("dd").mode, e("dd").uid), (0o755, 2));
    assert!(want.links.contains(&vec![PathBuf::from("g"), PathBuf::from("g2")]));

    // A directory with content replaced by a file: the whole subtree goes (containerd's
    // semantics; GNU tar fails to remove a non-empty directory), in all three.
    let tar = c.tar(
        "subtree.tar",
        false,
        r#"
add(tf, "d/", type=tarfile.DIRTYPE)
add(tf, "d/x/y", data=b"deep")
add(tf, "d", data=b"file")
add(tf, "d2/x", data=b"x")
add(tf, "d2", type=tarfile.SYMTYPE, link="elsewhere")
"#,
    );
    let lower = c.tar("empty.tar", false, "");
    let got = three_ways(&c, &lower, &tar);
    let kinds: Vec<_> = got
        .entries
        .iter()
        .map(|(p, m)| (p.display().to_string(), m.kind))
        .collect();
    assert_eq!(kinds, [("d".to_string(), "file"), ("d2".to_string(), "symlink")]);
}

#[test]
fn names_that_cannot_name_a_file_are_refused_alike() {
    let c = Case::new();
    let cases: &[(&str, ErrorKind)] = &[
        ("..", ErrorKind::PathEscape),
        ("../x", ErrorKind::PathEscape),
        ("a/../../x", ErrorKind::PathEscape),
        ("a/..", ErrorKind::InvalidName),
        ("a/../b", ErrorKind::InvalidName),
        ("./a/b/../c", ErrorKind::InvalidName),
        (".wh.", ErrorKind::InvalidName),
        (".wh..", ErrorKind::InvalidName),
        (".wh...", ErrorKind::InvalidName),
        ("a/.wh..", ErrorKind::InvalidName),
        ("a/.wh.../", ErrorKind::InvalidName),
        ("../.wh.x", ErrorKind::PathEscape),
        ("a/.wh..wh..opq/../x", ErrorKind::InvalidName),
    ];
    let long = "n".repeat(256);
    let mut all: Vec<(String, ErrorKind)> = cases.iter().map(|(n, k)| (n.to_string(), *k)).collect();
    all.push((long.clone(), ErrorKind::InvalidName));
    all.push((format!(".wh.{}", "n".repeat(252)), ErrorKind::InvalidName));
    all.push(("a/b\\0c".into(), ErrorKind::InvalidName));
    for (i, (name, kind)) in all.iter().enumerate() {
        let tar = if name.contains("\\0") {
            // Only a PAX record can carry a NUL inside a name.
            c.tar(
                &format!("n{i}.tar"),
                false,
                &format!(r#"add(tf, "x", data=b"x", pax={{"path": "{name}"}})"#),
            )
        } else {
            c.tar(&format!("n{i}.tar"), false, &format!(r#"add(tf, "{name}", data=b"x")"#))
        };
        let img = c.path(&format!("n{i}.erofs"));
        let err = convert(&tar, &img).unwrap_err();
        assert_eq!(err.kind, *kind, "converter, {name:?}: {err}");
        assert!(!img.exists(), "{name:?}: an image was left");
        for w in [Whiteouts::Oci, Whiteouts::Overlay] {
            let root = c.path(&format!("n{i}-{w:?}"));
            let err = apply(&tar, &root, w).unwrap_err();
            assert_eq!(err.kind, *kind, "Apply {w:?}, {name:?}: {err}");
            assert_eq!(
                std::fs::read_dir(&root).unwrap().count(),
                0,
                "{name:?}: Apply wrote something"
            );
        }
        // Hard link targets get the same reading.
        if !name.contains(".wh.") && !name.contains("\\0") && name != &long {
            let tar = c.tar(
                &format!("l{i}.tar"),
                false,
                &format!("add(tf, \"a/b\", data=b\"x\")\nadd(tf, \"h\", type=tarfile.LNKTYPE, link=\"{name}\")"),
            );
            assert_eq!(
                convert(&tar, &c.path("l.erofs")).unwrap_err().kind,
                ErrorKind::LinkTarget,
                "{name:?}"
            );
            let err = apply(&tar, &c.path(&format!("l{i}")), Whiteouts::Oci).unwrap_err();
            assert_eq!(err.kind, ErrorKind::LinkTarget, "{name:?}");
        }
    }
}

/// Every timestamp a tar can carry reaches the image exactly: the EROFS extended inode
/// has 64-bit seconds that the kernel reads as signed, and 32-bit nanoseconds.
#[test]
fn every_timestamp_reaches_the_image_exactly() {
    let c = Case::new();
    let times: &[(&str, i64, u32)] = &[
        ("neg_frac", -2, 500_000_000),
        ("neg_small_frac", -1, 999_999_999),
        ("neg_whole", -1, 0),
        ("before_1901", -(1 << 31) - 1, 0),
        ("year_1", -62_135_596_800, 0),
        ("after_2106", 1 << 32, 250_000_000),
        ("after_2446", 1 << 34, 0),
        ("beyond_octal", 0o77777777777 + 1, 1),
        ("i64_max", i64::MAX, 999_999_999),
        ("i64_min", i64::MIN, 0),
        ("nsec", 1, 1),
        ("epoch", 0, 0),
    ];
    let mut body = String::new();
    for (name, s, ns) in times {
        body.push_str(&format!(
            "add(tf, \"{name}\", data=b\"{name}\", mtime=0, pax={{\"mtime\": \"{}\"}})\n",
            pax_time(*s, *ns)
        ));
        body.push_str(&format!(
            "add(tf, \"d_{name}/\", type=tarfile.DIRTYPE, mtime=0, pax={{\"mtime\": \"{}\"}})\n",
            pax_time(*s, *ns)
        ));
    }
    let tar = c.tar("times.tar", false, &body);
    let img = c.path("times.erofs");
    convert(&tar, &img).unwrap();
    check_image(&img);
    let image = erofs::reader::Image::open(&img).unwrap();
    let m = Mnt::erofs(&img, &c.path("m"));
    for (name, s, ns) in times {
        for p in [name.to_string(), format!("d_{name}")] {
            let e = image.lookup(p.as_bytes()).unwrap();
            assert_eq!((e.inode.mtime as i64, e.inode.mtime_nsec), (*s, *ns), "reader, {p}");
            assert_eq!(own_meta(&m.0.join(&p)).3, (*s, i64::from(*ns)), "kernel, {p}");
        }
    }
    drop(m);

    // GNU base-256 numeric fields (negative and beyond the octal field).
    let tar = c.tar(
        "b256.tar",
        true,
        r#"
add(tf, "neg", data=b"n", mtime=-1)
add(tf, "neg_big", data=b"n", mtime=-(1 << 40))
add(tf, "big", data=b"b", mtime=(1 << 40))
"#,
    );
    let raw = std::fs::read(&tar).unwrap();
    assert_eq!(raw[136] & 0x80, 0x80, "python did not write a base-256 mtime");
    let img = c.path("b256.erofs");
    convert(&tar, &img).unwrap();
    check_image(&img);
    let image = erofs::reader::Image::open(&img).unwrap();
    for (p, s) in [("neg", -1i64), ("neg_big", -(1 << 40)), ("big", 1 << 40)] {
        assert_eq!(image.lookup(p.as_bytes()).unwrap().inode.mtime as i64, s, "{p}");
    }

    // A time beyond 64 bits is refused, not clamped.
    let mut bad = raw.clone();
    bad[136..148].copy_from_slice(&[0x80, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    bad[148..156].fill(b' ');
    let sum: u32 = bad[..512].iter().map(|&b| u32::from(b)).sum();
    bad[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let bad_tar = c.path("bad_time.tar");
    std::fs::write(&bad_tar, &bad).unwrap();
    assert_eq!(
        convert(&bad_tar, &c.path("bad.erofs")).unwrap_err().kind,
        ErrorKind::BadHeader
    );
    assert_eq!(
        apply(&bad_tar, &c.path("bad"), Whiteouts::Oci).unwrap_err().kind,
        ErrorKind::BadHeader
    );
}

/// On disk, Apply gives what GNU tar gives for the times the file system stores, and
/// refuses (rather than clamps, as GNU tar does quietly) those it cannot.
#[test]
fn apply_keeps_times_the_file_system_stores_and_refuses_the_rest() {
    let c = Case::new();
    let tar = c.tar(
        "ok.tar",
        false,
        r#"
add(tf, "neg_frac", data=b"a", mtime=0, pax={"mtime": "-1.5"})
add(tf, "neg_tiny", data=b"a", mtime=0, pax={"mtime": "-0.000000001"})
add(tf, "min32", data=b"a", mtime=0, pax={"mtime": "-2147483648"})
add(tf, "after_2106", data=b"a", mtime=0, pax={"mtime": "4294967296.25"})
add(tf, "nsec", data=b"a", mtime=0, pax={"mtime": "1.000000001"})
add(tf, "dir/", type=tarfile.DIRTYPE, mtime=0, pax={"mtime": "-3.75"})
add(tf, "sym", type=tarfile.SYMTYPE, link="x", mtime=0, pax={"mtime": "5000000000.5"})
"#,
    );
    let want = alone_vs_gnu(&c, &tar, &[], false);
    assert_eq!(want.entries[Path::new("neg_frac")].mtime, (-2, 500_000_000));
    assert_eq!(want.entries[Path::new("neg_tiny")].mtime, (-1, 999_999_999));
    assert_eq!(want.entries[Path::new("dir")].mtime, (-4, 250_000_000));
    // ext4 (the test's /tmp) stores 1901-12-13 .. 2446-05-10.
    for (i, (t, kind)) in [
        ("-2147483649", "data=b'x'"),
        ("17179869184", "type=tarfile.DIRTYPE"),
        ("9223372036854775807", "type=tarfile.SYMTYPE, link='x'"),
    ]
    .iter()
    .enumerate()
    {
        let tar = c.tar(
            &format!("far{i}.tar"),
            false,
            &format!(r#"add(tf, "far", {kind}, mtime=0, pax={{"mtime": "{t}"}})"#),
        );
        let err = apply(&tar, &c.path(&format!("far{i}")), Whiteouts::Oci).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unsupported, "{t}: {err}");
        assert_eq!(err.entry.as_deref(), Some("far"));
        // The image holds it.
        convert(&tar, &c.path(&format!("far{i}.erofs"))).unwrap();
    }
}

fn pax_time(s: i64, ns: u32) -> String {
    if ns == 0 {
        s.to_string()
    } else if s >= 0 {
        format!("{s}.{ns:09}")
    } else {
        format!("-{}.{:09}", -(s + 1), 1_000_000_000 - ns)
    }
}

const LOWER: &str = r#"
add(tf, "f", data=b"lower f")
add(tf, "g", data=b"lower g")
add(tf, "d/", type=tarfile.DIRTYPE, mode=0o755)
add(tf, "d/old", data=b"lower d/old")
add(tf, "e/", type=tarfile.DIRTYPE, mode=0o755)
add(tf, "e/old", data=b"lower e/old")
add(tf, "h/", type=tarfile.DIRTYPE, mode=0o755)
add(tf, "h/old", data=b"lower h/old")
add(tf, "k/", type=tarfile.DIRTYPE, mode=0o755)
add(tf, "k/old", data=b"lower k/old")
add(tf, "m", data=b"lower m")
add(tf, "o/", type=tarfile.DIRTYPE, mode=0o755)
add(tf, "o/a", data=b"lower o/a")
add(tf, "o/b", data=b"lower o/b")
add(tf, "o/sub/", type=tarfile.DIRTYPE, mode=0o755)
add(tf, "o/sub/x", data=b"lower o/sub/x")
add(tf, "p/", type=tarfile.DIRTYPE, mode=0o755)
add(tf, "p/a", data=b"lower p/a")
add(tf, "p/b", data=b"lower p/b")
add(tf, "q/", type=tarfile.DIRTYPE, mode=0o755)
add(tf, "q/a", data=b"lower q/a")
add(tf, "q/deep/", type=tarfile.DIRTYPE, mode=0o755)
add(tf, "q/deep/y", data=b"lower q/deep/y")
add(tf, "keep", data=b"lower keep")
"#;

/// OCI image spec: a whiteout hides lower layers' content only; what this layer puts
/// at the same name stays, whichever comes first in the tar.
/// A directory the layer only implies keeps what the lower layer has for it (mode, owner,
/// xattrs), as containerd's applier, working inside the overlay, keeps it; one the lower
/// layer lacks is 0755 root.
#[test]
fn implied_directories_keep_the_lower_ones_attributes() {
    let c = Case::new();
    let lower = c.tar(
        "lower.tar",
        false,
        r#"
add(tf, "root/", type=tarfile.DIRTYPE, mode=0o700, uid=7, gid=8, pax={"SCHILY.xattr.user.note": "lower"})
add(tf, "root/deep/", type=tarfile.DIRTYPE, mode=0o750, uid=7, gid=8)
add(tf, "var/cache/", type=tarfile.DIRTYPE, mode=0o770, uid=0, gid=9)
add(tf, "keep", data=b"lower keep")
"#,
    );
    let layer = c.tar(
        "layer.tar",
        false,
        r#"
add(tf, "root/.bashrc", data=b"new")
add(tf, "root/deep/f", data=b"new")
add(tf, "var/cache/ldconfig/aux", data=b"new")
add(tf, "fresh/dir/f", data=b"new")
"#,
    );
    let got = three_ways(&c, &lower, &layer);
    let e = |p: &str| got.entries[Path::new(p)].clone();
    assert_eq!((e("root").mode, e("root").uid, e("root").gid), (0o700, 7, 8));
    assert_eq!((e("root/deep").mode, e("root/deep").uid), (0o750, 7));
    assert_eq!((e("var/cache").mode, e("var/cache").gid), (0o770, 9));
    assert_eq!((e("var/cache/ldconfig").mode, e("var/cache/ldconfig").uid), (0o755, 0));
    assert_eq!((e("fresh").mode, e("fresh/dir").mode), (0o755, 0o755));
}

#[test]
fn a_whiteout_hides_only_the_lower_layers() {
    let c = Case::new();
    let lower = c.tar("lower.tar", false, LOWER);
    let layer = c.tar(
        "layer.tar",
        false,
        r#"
add(tf, "f", data=b"new f")
add(tf, ".wh.f")
add(tf, ".wh.g")
add(tf, "g", data=b"new g")
add(tf, "d/", type=tarfile.DIRTYPE, mode=0o750)
add(tf, "d/new", data=b"new d/new")
add(tf, ".wh.d")
add(tf, ".wh.e")
add(tf, "e/", type=tarfile.DIRTYPE, mode=0o700)
add(tf, "e/new", data=b"new e/new")
add(tf, ".wh.h")
add(tf, "h/new", data=b"new h/new")
add(tf, "k/new", data=b"new k/new")
add(tf, ".wh.k")
add(tf, "m", type=tarfile.SYMTYPE, link="f")
add(tf, "./.wh.m")
add(tf, ".wh.gone")
add(tf, ".wh.keep2")
"#,
    );
    let got = three_ways(&c, &lower, &layer);
    let names: Vec<String> = got.entries.keys().map(|p| p.display().to_string()).collect();
    assert_eq!(
        names,
        [
            "d", "d/new", "e", "e/new", "f", "g", "h", "h/new", "k", "k/new", "keep", "m", "o", "o/a", "o/b", "o/sub",
            "o/sub/x", "p", "p/a", "p/b", "q", "q/a", "q/deep", "q/deep/y"
        ]
    );
    assert_eq!(std::fs::read(c.path("oci/f")).unwrap(), b"new f");
    assert_eq!(std::fs::read(c.path("oci/g")).unwrap(), b"new g");
    assert_eq!(got.entries[Path::new("m")].kind, "symlink");
    assert_eq!(got.entries[Path::new("d")].mode, 0o750);
}

#[test]
fn opaque_markers_together_with_whiteouts() {
    let c = Case::new();
    let lower = c.tar("lower.tar", false, LOWER);
    let layer = c.tar(
        "layer.tar",
        false,
        r#"
add(tf, "o/.wh.a")
add(tf, "o/.wh..wh..opq")
add(tf, "o/c", data=b"new o/c")
add(tf, "o/.wh.b")
add(tf, "p/c", data=b"new p/c")
add(tf, "p/.wh..wh..opq")
add(tf, "p/.wh.c")
add(tf, "p/.wh.a")
add(tf, "q/.wh.a")
add(tf, "q/deep/z", data=b"new q/deep/z")
add(tf, "q/deep/.wh..wh..opq")
add(tf, "q/deep/.wh.y")
add(tf, "q/.wh..wh..opq")
add(tf, "q/.wh.deep")
add(tf, "r/.wh..wh..opq")
add(tf, "r/.wh.nothing")
add(tf, ".wh.o/x", data=b"a file under a directory named like a whiteout")
"#,
    );
    let got = three_ways(&c, &lower, &layer);
    let under = |d: &str| -> Vec<String> {
        got.entries
            .keys()
            .filter(|p| p.parent() == Some(Path::new(d)))
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(under("o"), ["c"]);
    assert_eq!(under("p"), ["c"]);
    assert_eq!(under("q"), ["deep"]);
    assert_eq!(under("q/deep"), ["z"]);
    assert_eq!(under("r"), Vec::<String>::new());
    assert_eq!(under(".wh.o"), ["x"]);

    // In the image, an opaque directory holds no whiteout (overlayfs would list it).
    let image = erofs::reader::Image::open(&c.path("layer.erofs")).unwrap();
    for d in ["o", "p", "q", "q/deep", "r"] {
        let e = image.lookup(d.as_bytes()).unwrap();
        let x = image.xattrs(&e).unwrap();
        assert!(
            x.contains(&(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())),
            "{d}: {x:?}"
        );
        for n in image.read_dir(&e).unwrap() {
            let child = image.entry(n.nid).unwrap();
            assert!(
                !(child.kind == erofs::reader::FileKind::CharDev && image.rdev(&child) == (0, 0)),
                "{d}/{}: a whiteout in an opaque dir",
                String::from_utf8_lossy(&n.name)
            );
        }
    }
}

/// An opaque marker at the root cannot be represented: overlayfs ignores opaqueness of
/// a layer's root (checked below with an upper dir), so the converter and both Apply
/// modes refuse it alike rather than let the layer mean different things.
#[test]
fn an_opaque_marker_at_the_root_is_refused_alike() {
    let c = Case::new();
    let lower = c.path("lower");
    std::fs::create_dir_all(&lower).unwrap();
    std::fs::write(lower.join("f"), b"lower").unwrap();
    let upper = c.path("upper");
    std::fs::create_dir_all(&upper).unwrap();
    rustix::fs::setxattr(&upper, "trusted.overlay.opaque", b"y", rustix::fs::XattrFlags::empty()).unwrap();
    let m = Mnt::overlay(&[&upper, &lower], &c.path("m"));
    assert!(
        m.0.join("f").exists(),
        "overlayfs now honours an opaque layer root: represent the marker"
    );
    drop(m);

    for (i, name) in ["./.wh..wh..opq", ".wh..wh..opq", "/.wh..wh..opq"].iter().enumerate() {
        let tar = c.tar(
            &format!("root-opq{i}.tar"),
            false,
            &format!("add(tf, \"keep\", data=b\"x\")\nadd(tf, \"{name}\")"),
        );
        let img = c.path(&format!("root-opq{i}.erofs"));
        assert_eq!(convert(&tar, &img).unwrap_err().kind, ErrorKind::Unsupported, "{name}");
        assert!(!img.exists());
        for w in [Whiteouts::Oci, Whiteouts::Overlay] {
            let err = apply(&tar, &c.path(&format!("root-opq{i}-{w:?}")), w).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Unsupported, "{name} {w:?}");
        }
    }
}
