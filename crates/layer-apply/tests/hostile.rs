//! Hostile layers: nothing may be written, linked or deleted outside the root.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;
use layer_apply::ErrorKind;
use layer_apply::Whiteouts;

/// A scratch area: `base/root` is the target; `base/canary` and `base/outdir/` are
/// outside it and must stay exactly as they are.
struct Jail {
    _t: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
}

impl Jail {
    fn new() -> Jail {
        assert_root();
        let t = tempfile::tempdir().unwrap();
        let base = t.path().to_path_buf();
        let root = base.join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(base.join("canary"), b"canary").unwrap();
        std::fs::create_dir(base.join("outdir")).unwrap();
        std::fs::write(base.join("outdir/inside"), b"inside").unwrap();
        Jail { _t: t, base, root }
    }

    /// Base path without the leading '/', to build paths that would reach it through
    /// a symlink to '/'.
    fn base_rel(&self) -> String {
        self.base.to_str().unwrap().trim_start_matches('/').to_string()
    }

    fn tar(&self, script: &str) -> PathBuf {
        let p = self.base.join(format!("t{}.tar", rand_suffix()));
        let script = script.replace("BASE", self.base.to_str().unwrap());
        let script = script.replace("BREL", &self.base_rel());
        py(&script, &p);
        p
    }

    fn apply(&self, tar: &Path, w: Whiteouts) -> Result<layer_apply::ApplyStats, layer_apply::Error> {
        apply(tar, &self.root, w)
    }

    /// Outside the root: exactly the canary, outdir/inside and our tar files.
    fn check_outside(&self) {
        assert_eq!(std::fs::read(self.base.join("canary")).unwrap(), b"canary");
        let c = std::fs::symlink_metadata(self.base.join("canary")).unwrap();
        assert_eq!(c.nlink(), 1, "canary gained a hard link");
        assert_eq!(std::fs::read(self.base.join("outdir/inside")).unwrap(), b"inside");
        let mut names: Vec<String> = std::fs::read_dir(&self.base)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.ends_with(".tar"))
            .collect();
        names.sort();
        assert_eq!(names, ["canary", "outdir", "root"]);
        let out: Vec<_> = std::fs::read_dir(self.base.join("outdir")).unwrap().collect();
        assert_eq!(out.len(), 1, "something was created in outdir");
        let passwd = std::fs::symlink_metadata("/etc/passwd").unwrap();
        assert_eq!(passwd.nlink(), 1, "/etc/passwd gained a hard link");
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn kind(r: Result<layer_apply::ApplyStats, layer_apply::Error>) -> ErrorKind {
    match r {
        Ok(s) => panic!("expected an error, got {s:?}"),
        Err(e) => {
            assert!(e.entry.is_some(), "error does not name the entry: {e}");
            e.kind
        }
    }
}

#[test]
fn dotdot_escapes_are_refused() {
    let j = Jail::new();
    for name in ["../canary", "a/../../canary", "./../outdir/x", "/../canary"] {
        let tar = j.tar(&format!(
            r#"
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
    add(tf, "{name}", data=b"evil")
"#
        ));
        let err = j.apply(&tar, Whiteouts::Oci).unwrap_err();
        assert_eq!(err.kind, ErrorKind::PathEscape, "{name}: {err}");
        assert_eq!(err.entry.as_deref(), Some(name));
        j.check_outside();
    }
    // Whiteouts too.
    let tar = j.tar(
        r#"
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
    add(tf, "../.wh.canary")
"#,
    );
    assert_eq!(kind(j.apply(&tar, Whiteouts::Oci)), ErrorKind::PathEscape);
    for bad in [".wh..", ".wh.", "x/.wh..", ".wh...", "x/.wh.../"] {
        let tar = j.tar(&format!(
            r#"
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
    add(tf, "{bad}")
"#
        ));
        assert_eq!(kind(j.apply(&tar, Whiteouts::Oci)), ErrorKind::InvalidName, "{bad}");
        assert_eq!(kind(j.apply(&tar, Whiteouts::Overlay)), ErrorKind::InvalidName, "{bad}");
    }
    j.check_outside();
    assert!(j.root.exists());
}

#[test]
fn symlinks_in_the_layer_resolve_inside_the_root() {
    let j = Jail::new();
    let tar = j.tar(
        r#"
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
    add(tf, "slash", type=tarfile.SYMTYPE, link="/")
    add(tf, "slash/BREL/canary", data=b"evil1")
    add(tf, "up", type=tarfile.SYMTYPE, link="../../../../../../..")
    add(tf, "up/canary", data=b"evil2")
    add(tf, "up/BREL/outdir/new", data=b"evil3")
    add(tf, "abs", type=tarfile.SYMTYPE, link="BASE/outdir")
    add(tf, "abs/new2", data=b"evil4")
    add(tf, "abs/sub/deeper/new3", data=b"evil5")
    add(tf, "a", type=tarfile.SYMTYPE, link="/etc")
    add(tf, "a/passwd", data=b"root::0:0::/:/bin/sh\n")
    add(tf, "rel", type=tarfile.SYMTYPE, link="../outdir")
    add(tf, "rel/x", data=b"evil6")
    add(tf, "chain1", type=tarfile.SYMTYPE, link="chain2/..//../")
    add(tf, "chain2", type=tarfile.SYMTYPE, link="slash/BREL")
    add(tf, "chain1/outdir/y", data=b"evil7")
    add(tf, "up/.wh.canary")
    add(tf, "abs/.wh.inside")
    add(tf, "abs/.wh..wh..opq")
"#,
    );
    j.apply(&tar, Whiteouts::Oci).unwrap();
    j.check_outside();
    let r = &j.root;
    let b = j.base_rel();
    assert_eq!(std::fs::read(r.join(&b).join("canary")).unwrap(), b"evil1");
    // "up/canary" landed at the root; the whiteout "up/.wh.canary" that follows hides
    // lower layers' content only, so this layer's own file stays.
    assert_eq!(std::fs::read(r.join("canary")).unwrap(), b"evil2");
    assert_eq!(std::fs::read(r.join(&b).join("outdir/new")).unwrap(), b"evil3");
    assert_eq!(std::fs::read(r.join(&b).join("outdir/new2")).unwrap(), b"evil4");
    assert_eq!(std::fs::read(r.join("etc/passwd")).unwrap(), b"root::0:0::/:/bin/sh\n");
    assert_eq!(std::fs::read(r.join("outdir/x")).unwrap(), b"evil6");
    assert_eq!(std::fs::read_link(r.join("a")).unwrap(), Path::new("/etc"));
    assert!(std::fs::symlink_metadata(r.join("etc")).unwrap().is_dir());

    // Overlay mode: the same confinement.
    let j = Jail::new();
    let tar = j.tar(
        r#"
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
    add(tf, "up", type=tarfile.SYMTYPE, link="../../..")
    add(tf, "up/.wh.canary")
    add(tf, "abs", type=tarfile.SYMTYPE, link="BASE/outdir")
    add(tf, "abs/.wh.inside")
    add(tf, "abs/.wh..wh..opq")
"#,
    );
    j.apply(&tar, Whiteouts::Overlay).unwrap();
    j.check_outside();
    assert!(xattrs(&j.root.join(j.base_rel()).join("outdir")).contains_key(&b"trusted.overlay.opaque"[..]));
}

#[test]
fn symlinks_already_in_the_target_resolve_inside_the_root() {
    let j = Jail::new();
    let r = &j.root;
    std::os::unix::fs::symlink(&j.base, r.join("evil")).unwrap();
    std::os::unix::fs::symlink(j.base.join("canary"), r.join("evilfile")).unwrap();
    std::os::unix::fs::symlink(j.base.join("outdir"), r.join("evildir")).unwrap();
    std::os::unix::fs::symlink("../canary", r.join("evilrel")).unwrap();
    let tar = j.tar(
        r#"
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
    add(tf, "evil/canary", data=b"evil1")
    add(tf, "evilfile", data=b"replaces the link")
    add(tf, "evilrel", type=tarfile.FIFOTYPE)
    add(tf, "evildir/", type=tarfile.DIRTYPE, mode=0o700, uid=1234)
    add(tf, "evildir/f", data=b"in a real dir")
"#,
    );
    j.apply(&tar, Whiteouts::Oci).unwrap();
    j.check_outside();
    assert_eq!(std::fs::read(r.join(j.base_rel()).join("canary")).unwrap(), b"evil1");
    assert_eq!(std::fs::read(r.join("evilfile")).unwrap(), b"replaces the link");
    assert!(!std::fs::symlink_metadata(r.join("evilfile"))
        .unwrap()
        .file_type()
        .is_symlink());
    let d = std::fs::symlink_metadata(r.join("evildir")).unwrap();
    assert!(d.is_dir(), "symlink replaced by a directory");
    assert_eq!((d.uid(), d.mode() & 0o7777), (1234, 0o700));
    assert_eq!(std::fs::read(r.join("evildir/f")).unwrap(), b"in a real dir");
}

#[test]
fn hard_links_stay_inside_the_root() {
    let j = Jail::new();
    for (link, extra) in [
        ("/etc/passwd", ""),
        ("../canary", ""),
        ("BASE/canary", ""),
        ("a/../../canary", ""),
        ("s/canary", "    add(tf, 's', type=tarfile.SYMTYPE, link='BASE')\n"),
        ("s2/canary", "    add(tf, 's2', type=tarfile.SYMTYPE, link='../..')\n"),
        ("up/canary", "    add(tf, 'up', type=tarfile.SYMTYPE, link='/')\n"),
        ("nonexistent", ""),
        ("dir", "    add(tf, 'dir/', type=tarfile.DIRTYPE)\n"),
        (".", ""),
        ("", ""),
    ] {
        let tar = j.tar(&format!(
            r#"
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
{extra}    add(tf, "h", type=tarfile.LNKTYPE, link="{link}")
"#
        ));
        let err = j.apply(&tar, Whiteouts::Oci).unwrap_err();
        assert_eq!(err.kind, ErrorKind::LinkTarget, "{link}: {err}");
        assert_eq!(err.entry.as_deref(), Some("h"));
        j.check_outside();
    }
    // A target reached through a symlink inside the root is fine and stays inside.
    let tar = j.tar(
        r#"
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
    add(tf, "etc/passwd", data=b"fake")
    add(tf, "sl", type=tarfile.SYMTYPE, link="/etc")
    add(tf, "h", type=tarfile.LNKTYPE, link="/sl/passwd")
"#,
    );
    j.apply(&tar, Whiteouts::Oci).unwrap();
    j.check_outside();
    let a = std::fs::metadata(j.root.join("etc/passwd")).unwrap();
    let b = std::fs::symlink_metadata(j.root.join("h")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
}

#[test]
fn long_names_and_symlink_loops() {
    let j = Jail::new();
    let long = "n".repeat(255);
    let tar = j.tar(&format!(
        r#"
c = "{long}"
p = "/".join(["d%02d" % i + "x" * 200 for i in range(15)])
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
    add(tf, c, data=b"long")
    add(tf, c + "/", type=tarfile.DIRTYPE)
    add(tf, c + "/" + c, data=b"longer", mode=0o600)
    add(tf, p + "/" + c, data=b"deep")
    add(tf, "sym" + c[3:], type=tarfile.SYMTYPE, link=p)
"#
    ));
    j.apply(&tar, Whiteouts::Oci).unwrap();
    assert_eq!(std::fs::read(j.root.join(&long).join(&long)).unwrap(), b"longer");
    j.check_outside();

    let too_long = "m".repeat(256);
    let tar = j.tar(&format!(
        r#"
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
    add(tf, "{too_long}", data=b"x")
"#
    ));
    let e = j.apply(&tar, Whiteouts::Oci).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidName, "{e}");

    let tar = j.tar(
        r#"
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
    add(tf, "l1", type=tarfile.SYMTYPE, link="l2")
    add(tf, "l2", type=tarfile.SYMTYPE, link="l1/x")
    add(tf, "l1/y/z", data=b"x")
"#,
    );
    let e = j.apply(&tar, Whiteouts::Oci).unwrap_err();
    assert_eq!(e.entry.as_deref(), Some("l1/y/z"), "{e}");
    j.check_outside();
}

#[test]
fn parents_that_are_files_and_truncation() {
    let j = Jail::new();
    let tar = j.tar(
        r#"
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
    add(tf, "f", data=b"file")
    add(tf, "f/x", data=b"x")
"#,
    );
    assert_eq!(kind(j.apply(&tar, Whiteouts::Oci)), ErrorKind::NotADirectory);

    let tar = j.tar(
        r#"
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tf:
    add(tf, "big", data=b"y" * 100000)
"#,
    );
    let bytes = std::fs::read(&tar).unwrap();
    let cut = j.base.join("cut.tar");
    std::fs::write(&cut, &bytes[..50000]).unwrap();
    let e = j.apply(&cut, Whiteouts::Oci).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Truncated, "{e}");
    assert_eq!(e.entry.as_deref(), Some("big"));
    std::fs::remove_file(&cut).unwrap();
    j.check_outside();
}
