//! The converter against the kernel: trees packed by GNU tar (or crafted with
//! python's tarfile) are converted, the image is mounted with mount(2), and
//! the mounted tree must equal what GNU tar extracts from the same input.
//! Every image also passes fsck.erofs and the project's reader must see
//! exactly what the kernel sees.
//!
//! Needs root and a kernel with erofs: the tests panic without them.

mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;

/// What a tar format can represent: ustar has 100-byte link targets, a
/// 155+100 split path, 7-digit octal ids and an 11-digit octal mtime.
#[derive(Clone, Copy)]
struct Features {
    long_names: bool,
    big_numbers: bool,
}

const FULL: Features = Features {
    long_names: true,
    big_numbers: true,
};
const USTAR: Features = Features {
    long_names: false,
    big_numbers: false,
};

/// Builds a source tree on disk, recording metadata to apply afterwards:
/// owners and modes after creation (chown clears setuid bits, so chmod must
/// follow it) and mtimes last, children before parents (creating a child
/// bumps its parent's mtime).
struct Builder {
    root: PathBuf,
    f: Features,
    meta: Vec<(PathBuf, u32, u32, Option<u32>)>,
    n: usize,
}

impl Builder {
    fn new(root: &Path, f: Features) -> Builder {
        Builder {
            root: root.to_path_buf(),
            f,
            meta: Vec::new(),
            n: 0,
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Owners cycle through the interesting ids, so every case gets some.
    fn next_owner(&mut self) -> (u32, u32) {
        let mut ids = vec![0u32, 1000, 65534, 65536];
        if self.f.big_numbers {
            ids.push(4_000_000_000);
        }
        self.n += 1;
        (ids[self.n % ids.len()], ids[(self.n / 2 + 1) % ids.len()])
    }

    fn dir(&mut self, rel: &str, mode: u32) {
        fs::create_dir_all(self.p(rel)).unwrap();
        let (u, g) = self.next_owner();
        self.meta.push((self.p(rel), u, g, Some(mode)));
    }

    fn file(&mut self, rel: &str, data: &[u8], mode: u32) {
        fs::write(self.p(rel), data).unwrap();
        let (u, g) = self.next_owner();
        self.meta.push((self.p(rel), u, g, Some(mode)));
    }

    fn owned_file(&mut self, rel: &str, uid: u32, gid: u32) {
        fs::write(self.p(rel), rel.as_bytes()).unwrap();
        self.meta.push((self.p(rel), uid, gid, Some(0o640)));
    }

    fn symlink(&mut self, rel: &str, target: &str) {
        symlink(target, self.p(rel)).unwrap();
        let (u, g) = self.next_owner();
        self.meta.push((self.p(rel), u, g, None));
    }

    fn node(&mut self, rel: &str, kind: Kind, major: u32, minor: u32, mode: u32) {
        mknod(&self.p(rel), kind, major, minor);
        let (u, g) = self.next_owner();
        self.meta.push((self.p(rel), u, g, Some(mode)));
    }

    fn hardlink(&mut self, rel: &str, existing: &str) {
        fs::hard_link(self.p(existing), self.p(rel)).unwrap();
    }

    fn finish(self) {
        for (p, u, g, mode) in &self.meta {
            std::os::unix::fs::lchown(p, Some(*u), Some(*g)).unwrap();
            if let Some(m) = mode {
                fs::set_permissions(p, fs::Permissions::from_mode(*m)).unwrap();
            }
        }
        let mut times: Vec<(i64, i64)> = vec![
            (0, 0),
            (1, 1),
            (1_000_000_000, 0),
            (1_700_000_000, 123_456_789),
            (1_700_000_001, 999_999_999),
            (2_147_483_653, 500_000_000), // past 2038
            (4_102_444_800, 1),           // 2100
        ];
        if self.f.big_numbers {
            times.push((17_179_869_184, 42)); // 2^34: beyond ustar's 11 octal digits
        }
        // Walk the whole tree (hard links and unrecorded parents included),
        // deepest first, so later utimensat calls are not undone.
        let mut all = Vec::new();
        collect(&self.root, &mut all);
        all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for (i, p) in all.iter().enumerate() {
            let (s, ns) = times[i % times.len()];
            set_mtime(p, s, ns);
        }
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if fs::symlink_metadata(dir).unwrap().is_dir() {
        let mut ents: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        ents.sort();
        for e in ents {
            collect(&e, out);
        }
    }
}

/// The main test tree: every file type, odd modes and owners, sizes around
/// block boundaries, hard-link groups, long and non-ASCII names, deep
/// nesting, and xattrs in user/trusted/security (some shared by many files).
fn build_rich_tree(root: &Path, f: Features) {
    let mut b = Builder::new(root, f);
    b.dir("types", 0o755);
    b.file("types/file", b"hello\n", 0o644);
    b.dir("types/dir", 0o750);
    b.symlink("types/short", "file");
    let long_target = if f.long_names {
        // 3000 bytes: longer than one 4 KiB-inline tail would like, and than ustar's 100.
        "t/".repeat(1499) + "x"
    } else {
        "u".repeat(100)
    };
    b.symlink("types/long", &long_target);
    b.symlink("types/dangling-abs", "/does/not/exist");
    b.node("types/null", Kind::Char, 1, 3, 0o666);
    b.node("types/bigdev", Kind::Char, 259, 70000, 0o600);
    b.node("types/sda1", Kind::Block, 8, 1, 0o660);
    b.node("types/fifo", Kind::Fifo, 0, 0, 0o644);

    b.dir("modes", 0o755);
    for m in [0o000, 0o777, 0o4755, 0o2755, 0o1777, 0o6711, 0o644, 0o400] {
        b.file(&format!("modes/f{m:04o}"), format!("{m:o}").as_bytes(), m);
    }
    for m in [0o000, 0o777, 0o1777, 0o2755, 0o700] {
        b.dir(&format!("modes/d{m:04o}"), m);
        b.file(&format!("modes/d{m:04o}/inside"), b"x", 0o644);
    }

    b.dir("ids", 0o755);
    let mut ids = vec![0u32, 1000, 65534, 65536];
    if f.big_numbers {
        ids.push(4_000_000_000);
    }
    for &u in &ids {
        for &g in &ids {
            b.owned_file(&format!("ids/{u}-{g}"), u, g);
        }
    }

    b.dir("sizes", 0o755);
    for (i, size) in [0usize, 1, 4095, 4096, 4097, 8191, (1 << 20) + 3]
        .into_iter()
        .enumerate()
    {
        b.file(&format!("sizes/s{size}"), &pseudo_random(size, i as u64 + 1), 0o644);
    }

    b.dir("links", 0o755);
    b.dir("links/sub", 0o755);
    b.file("links/pair-a", b"pair", 0o600);
    b.hardlink("links/pair-b", "links/pair-a");
    b.file("links/five-1", &pseudo_random(5000, 99), 0o4755);
    b.hardlink("links/five-2", "links/five-1");
    b.hardlink("links/five-3", "links/five-1");
    b.hardlink("links/sub/five-4", "links/five-1");
    b.hardlink("links/sub/five-5", "links/five-1");
    b.file("links/empty-a", b"", 0o644);
    b.hardlink("links/sub/empty-b", "links/empty-a");

    b.dir("long", 0o755);
    if f.long_names {
        let c200 = "a".repeat(200);
        let c255 = "b".repeat(255);
        b.file(&format!("long/{c200}"), b"200", 0o644);
        b.file(&format!("long/{c255}"), b"255", 0o644);
        b.dir(&format!("long/d{}", "c".repeat(254)), 0o755);
        // > 255 bytes in total: only PAX / GNU longname can carry it.
        b.dir(&format!("long/{}", "d".repeat(200)), 0o755);
        b.dir(&format!("long/{}/{}", "d".repeat(200), "e".repeat(200)), 0o755);
        b.file(
            &format!("long/{}/{}/file", "d".repeat(200), "e".repeat(200)),
            b"deep long",
            0o644,
        );
        b.symlink(&format!("long/link-{}", "f".repeat(240)), &"g".repeat(1000));
        b.hardlink(&format!("long/hl-{}", "h".repeat(240)), &format!("long/{c255}"));
    } else {
        // ustar: > 100 bytes in total via the 155-byte prefix field.
        b.dir(&format!("long/{}", "d".repeat(60)), 0o755);
        b.dir(&format!("long/{}/{}", "d".repeat(60), "e".repeat(60)), 0o755);
        b.file(
            &format!("long/{}/{}/file", "d".repeat(60), "e".repeat(60)),
            b"ustar split",
            0o644,
        );
    }

    b.dir("xattrs", 0o755);
    b.file("xattrs/several", b"x", 0o644);
    lsetxattr(&b.p("xattrs/several"), "user.a", b"1");
    lsetxattr(&b.p("xattrs/several"), "user.b", b"");
    lsetxattr(&b.p("xattrs/several"), "trusted.t", b"trusted value");
    lsetxattr(&b.p("xattrs/several"), "security.s", b"sec\0binary\xff");
    b.file("xattrs/big-value", b"y", 0o644);
    lsetxattr(&b.p("xattrs/big-value"), "user.big", &pseudo_random(2000, 7));
    b.dir("xattrs/dir", 0o755);
    lsetxattr(&b.p("xattrs/dir"), "trusted.dirattr", b"on a dir");
    lsetxattr(&b.p("xattrs/dir"), "user.shared", b"same everywhere");
    b.dir("xattrs/many", 0o755);
    for i in 0..40 {
        let p = format!("xattrs/many/f{i:02}");
        b.file(&p, format!("{i}").as_bytes(), 0o644);
        // The same name=value on many inodes: what shared xattrs are for.
        lsetxattr(&b.p(&p), "user.shared", b"same everywhere");
        lsetxattr(&b.p(&p), "trusted.shared", b"\x00\xfb\x21\x00");
        if i % 10 == 0 {
            // A layer must not smuggle in overlayfs' own attributes: the
            // converter drops these (checked via strip_overlay_xattrs).
            lsetxattr(&b.p(&p), "trusted.overlay.redirect", b"/elsewhere");
        }
        if i % 3 == 0 {
            lsetxattr(&b.p(&p), "user.own", format!("value {i}").as_bytes());
        }
    }
    b.file("xattrs/empty-file", b"", 0o644);
    lsetxattr(&b.p("xattrs/empty-file"), "user.only", b"xattr, no data");

    let mut deep = String::from("deep");
    b.dir(&deep, 0o755);
    for i in 1..=30 {
        deep.push_str(&format!("/level{i}"));
        b.dir(&deep, 0o755);
    }
    b.file(&format!("{deep}/bottom"), b"bottom", 0o644);

    b.dir("utf8", 0o755);
    b.file("utf8/héllo wörld", b"latin", 0o644);
    b.file("utf8/日本語のファイル", b"cjk", 0o644);
    b.dir("utf8/emoji 😀", 0o755);
    b.file("utf8/emoji 😀/ñandú", b"nested", 0o644);
    b.symlink("utf8/Ωlink", "日本語のファイル");
    b.finish();
}

/// Packs, converts and checks one tree in one format/compression.
fn roundtrip(src: &Path, format: TarFormat, comp: Compression, extra: &[&str]) -> serde_json::Value {
    require_root_and_kernel();
    let work = tempdir();
    let tar = work.path().join("layer.tar");
    gnu_create(src, &tar, format);
    let input = compress(&tar, comp);
    let image = work.path().join("layer.erofs");
    let report = convert_ok(&input, &image, extra);
    check_report(&report, &tar, &input, &image, comp);
    let (_x, mut expected) = gnu_extract_tree(&tar);
    strip_overlay_xattrs(&mut expected);
    check_image(
        &format!("{}/{} {extra:?}", format.name(), comp.name()),
        &image,
        &expected,
        &CompareOpts::default(),
    );
    report
}

/// The --json report must describe the input and output exactly.
fn check_report(report: &serde_json::Value, tar: &Path, input: &Path, image: &Path, comp: Compression) {
    let mut errs = Vec::new();
    let want_str = |k: &str, v: String, errs: &mut Vec<String>| {
        if report[k].as_str() != Some(v.as_str()) {
            errs.push(format!("{k}: expected {v:?}, got {}", report[k]));
        }
    };
    want_str("diff_id", sha256_file(tar), &mut errs);
    want_str("input_digest", sha256_file(input), &mut errs);
    want_str("compression", comp.name().to_string(), &mut errs);
    let want_num = |k: &str, v: u64, errs: &mut Vec<String>| {
        if report[k].as_u64() != Some(v) {
            errs.push(format!("{k}: expected {v}, got {}", report[k]));
        }
    };
    want_num("input_size", fs::metadata(input).unwrap().len(), &mut errs);
    want_num("uncompressed_size", fs::metadata(tar).unwrap().len(), &mut errs);
    want_num("output_size", fs::metadata(image).unwrap().len(), &mut errs);
    if report["entries"].as_u64().is_none_or(|n| n == 0) {
        errs.push(format!("entries: expected a positive count, got {}", report["entries"]));
    }
    if report["seconds"].as_f64().is_none_or(|s| s < 0.0) {
        errs.push(format!("seconds: expected a number >= 0, got {}", report["seconds"]));
    }
    assert!(
        errs.is_empty(),
        "--json report for {}:\n  {}\nreport: {report}",
        input.display(),
        errs.join("\n  ")
    );
}

fn rich_roundtrip(format: TarFormat, comp: Compression) {
    require_root_and_kernel();
    let src = tempdir();
    let f = if format == TarFormat::Ustar { USTAR } else { FULL };
    build_rich_tree(src.path(), f);
    roundtrip(src.path(), format, comp, &[]);
}

#[test]
fn rich_posix_uncompressed() {
    rich_roundtrip(TarFormat::Posix, Compression::None);
}

#[test]
fn rich_posix_gzip() {
    rich_roundtrip(TarFormat::Posix, Compression::Gzip);
}

#[test]
fn rich_posix_zstd() {
    rich_roundtrip(TarFormat::Posix, Compression::Zstd);
}

#[test]
fn rich_gnu_uncompressed() {
    rich_roundtrip(TarFormat::Gnu, Compression::None);
}

#[test]
fn rich_gnu_gzip() {
    rich_roundtrip(TarFormat::Gnu, Compression::Gzip);
}

#[test]
fn rich_gnu_zstd() {
    rich_roundtrip(TarFormat::Gnu, Compression::Zstd);
}

#[test]
fn rich_ustar_uncompressed() {
    rich_roundtrip(TarFormat::Ustar, Compression::None);
}

#[test]
fn rich_ustar_gzip() {
    rich_roundtrip(TarFormat::Ustar, Compression::Gzip);
}

#[test]
fn rich_ustar_zstd() {
    rich_roundtrip(TarFormat::Ustar, Compression::Zstd);
}

/// Tails stored in separate blocks instead of inline must read back the same.
#[test]
fn rich_posix_no_inline() {
    require_root_and_kernel();
    let src = tempdir();
    build_rich_tree(src.path(), FULL);
    roundtrip(src.path(), TarFormat::Posix, Compression::Gzip, &["--no-inline"]);
}

/// 5000 entries: a directory spanning many blocks, plus names of many lengths
/// so dirents straddle block boundaries in varied ways.
#[test]
fn directory_with_5000_entries() {
    require_root_and_kernel();
    let src = tempdir();
    let mut b = Builder::new(src.path(), FULL);
    b.dir("big", 0o755);
    for i in 0..5000 {
        let name = format!("entry-{i:05}-{}", "n".repeat(i % 97));
        match i % 4 {
            0 => b.file(&format!("big/{name}"), format!("{i}").as_bytes(), 0o644),
            1 => b.symlink(&format!("big/{name}"), &format!("target-{i}")),
            2 => b.file(&format!("big/{name}"), b"", 0o600),
            _ => b.dir(&format!("big/{name}"), 0o755),
        }
    }
    b.finish();
    roundtrip(src.path(), TarFormat::Posix, Compression::Zstd, &[]);
    roundtrip(src.path(), TarFormat::Gnu, Compression::None, &["--no-inline"]);
}

/// Same input, same bytes: images must be reproducible, and the report's
/// digests must be those of the uncompressed tar and of the input.
#[test]
fn deterministic_output_and_report() {
    require_root_and_kernel();
    let src = tempdir();
    build_rich_tree(src.path(), FULL);
    let work = tempdir();
    let tar = work.path().join("layer.tar");
    gnu_create(src.path(), &tar, TarFormat::Posix);
    for comp in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let input = compress(&tar, comp);
        let a = work.path().join(format!("a-{}.erofs", comp.name()));
        let b = work.path().join(format!("b-{}.erofs", comp.name()));
        let ra = convert_ok(&input, &a, &[]);
        check_report(&ra, &tar, &input, &a, comp);
        // A pause makes a build-time-dependent image differ.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let rb = convert_ok(&input, &b, &[]);
        check_report(&rb, &tar, &input, &b, comp);
        assert!(
            fs::read(&a).unwrap() == fs::read(&b).unwrap(),
            "{}: converting the same input twice gave different images ({} vs {})",
            comp.name(),
            sha256_file(&a),
            sha256_file(&b)
        );
    }
    // Compression must not leak into the image beyond the superblock UUID,
    // which the converter derives from the input digest by design (and the
    // superblock checksum that covers it).
    let masked = |c: &str| {
        let mut b = fs::read(work.path().join(format!("a-{c}.erofs"))).unwrap();
        b[1024 + 4..1024 + 8].fill(0);
        b[1024 + 48..1024 + 64].fill(0);
        b
    };
    let none = masked("none");
    for c in ["gzip", "zstd"] {
        assert!(
            masked(c) == none,
            "the image from the {c} input differs from the one from the plain tar \
             in more than the superblock UUID/checksum"
        );
    }
}

// ---------------------------------------------------------------------------
// Tar semantics, with tars crafted by python's tarfile.
// ---------------------------------------------------------------------------

/// python helpers: `add(t, name, ...)` appends one entry; `out(i)` opens
/// sys.argv[i] as a PAX tar for writing.
const PY_PRELUDE: &str = r#"
import io, sys, tarfile
def out(i, **kw):
    return tarfile.open(sys.argv[i], "w", format=tarfile.PAX_FORMAT, **kw)
def add(t, name, kind="f", data=b"", mode=0o644, uid=0, gid=0, mtime=1600000000, link="", pax=None):
    ti = tarfile.TarInfo(name)
    ti.type = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE,
               "h": tarfile.LNKTYPE, "c": tarfile.CHRTYPE}[kind]
    ti.mode, ti.uid, ti.gid, ti.mtime, ti.linkname = mode, uid, gid, mtime, link
    if pax:
        ti.pax_headers = pax
    if kind == "f":
        ti.size = len(data)
        t.addfile(ti, io.BytesIO(data))
    else:
        t.addfile(ti)
"#;

/// Writes `input.tar` (argv[1]) and `expect.tar` (argv[2]) with `body`,
/// converts the first, and compares the mount with GNU tar's extraction of
/// the second (which GNU tar can extract without the contested semantics).
fn semantics_case(what: &str, body: &str, opts: CompareOpts) -> (TestDir, PathBuf) {
    require_root_and_kernel();
    let work = tempdir();
    let input = work.path().join("input.tar");
    let expect = work.path().join("expect.tar");
    python(
        &format!("{PY_PRELUDE}\n{body}"),
        &[input.as_os_str(), expect.as_os_str()],
    );
    let image = work.path().join("layer.erofs");
    let report = convert_ok(&input, &image, &[]);
    check_report(&report, &input, &input, &image, Compression::None);
    let (_x, expected) = gnu_extract_tree(&expect);
    check_image(what, &image, &expected, &opts);
    (work, image)
}

#[test]
fn later_entry_replaces_file_with_file() {
    semantics_case(
        "file replaced by file",
        r#"
with out(1) as t:
    add(t, "./", "d", mode=0o755)
    add(t, "a", data=b"old contents", mode=0o600, uid=1, gid=1, mtime=1000)
    add(t, "b", data=b"old b", mode=0o600)
    add(t, "b", "l", link="elsewhere", mtime=1234)
    add(t, "a", data=b"new", mode=0o644, uid=2, gid=3, mtime=2000)
with out(2) as t:
    add(t, "./", "d", mode=0o755)
    add(t, "b", "l", link="elsewhere", mtime=1234)
    add(t, "a", data=b"new", mode=0o644, uid=2, gid=3, mtime=2000)
"#,
        CompareOpts::default(),
    );
}

#[test]
fn later_entry_replaces_file_with_dir() {
    semantics_case(
        "file replaced by dir",
        r#"
with out(1) as t:
    add(t, "./", "d", mode=0o755)
    add(t, "x", data=b"a file first", mtime=1000)
    add(t, "x", "d", mode=0o711, uid=5, mtime=3000)
    add(t, "x/child", data=b"child", mtime=2000)
with out(2) as t:
    add(t, "./", "d", mode=0o755)
    add(t, "x", "d", mode=0o711, uid=5, mtime=3000)
    add(t, "x/child", data=b"child", mtime=2000)
"#,
        CompareOpts::default(),
    );
}

/// containerd removes the whole old subtree when a non-directory replaces a
/// directory; GNU tar would refuse, hence the expected tar without it.
#[test]
fn later_entry_replaces_dir_with_file_removing_subtree() {
    semantics_case(
        "dir with children replaced by file",
        r#"
with out(1) as t:
    add(t, "./", "d", mode=0o755)
    add(t, "d", "d", mode=0o755)
    add(t, "d/sub", "d", mode=0o700)
    add(t, "d/sub/f", data=b"gone")
    add(t, "d/g", data=b"gone too")
    add(t, "d/hl", "h", link="d/g")
    add(t, "keep", data=b"keep", mtime=1500)
    add(t, "d", data=b"now a file", mode=0o640, uid=9, mtime=5000)
    add(t, "e", "d", mode=0o700, uid=1, mtime=100)
    add(t, "e/keep", data=b"kept child", mtime=200)
    add(t, "e", "d", mode=0o755, uid=2, mtime=300)
with out(2) as t:
    add(t, "./", "d", mode=0o755)
    add(t, "keep", data=b"keep", mtime=1500)
    add(t, "d", data=b"now a file", mode=0o640, uid=9, mtime=5000)
    add(t, "e", "d", mode=0o755, uid=2, mtime=300)
    add(t, "e/keep", data=b"kept child", mtime=200)
"#,
        CompareOpts::default(),
    );
}

/// Parents only implied by deeper entries exist as 0755 0:0 directories;
/// a directory's own entry, even when it comes after its children, wins.
#[test]
fn implicit_parents_and_late_directory_entries() {
    let opts = CompareOpts::ignoring_mtime_of(["/", "/p", "/p/q", "/p/q/r", "/m/n"]);
    let (_w, image) = semantics_case(
        "implicit parents",
        r#"
for i in (1, 2):
    with out(i) as t:
        add(t, "p/q/r/file", data=b"deep", mtime=1111)
        add(t, "m/n/file2", data=b"m", mtime=2222)
        add(t, "m", "d", mode=0o700, uid=5, gid=6, mtime=3333)
"#,
        opts,
    );
    // The reference's implicit dirs come from tar (umask 022); state the
    // rule explicitly too, independent of GNU tar.
    let mnt = Mount::erofs(&image);
    let tree = snapshot_tree(mnt.path());
    for p in ["/", "/p", "/p/q", "/p/q/r", "/m/n"] {
        let n = &tree[Path::new(p)];
        assert_eq!(
            (n.mode, n.uid, n.gid),
            (libc::S_IFDIR | 0o755, 0, 0),
            "implicit directory {p}"
        );
    }
    let m = &tree[Path::new("/m")];
    assert_eq!((m.mode & 0o7777, m.uid, m.gid, m.mtime), (0o700, 5, 6, 3333));
}

/// `./x`, `/x`, `a/./b`, `a//b` and a trailing slash on a regular file (GNU tar
/// extracts `c/` of type '0' as the file `c`) all name paths inside the root and must
/// be normalised. (`a/x/../b` is refused, as GNU tar refuses it: layer-apply's
/// tests/edges.rs.)
#[test]
fn names_are_normalised() {
    let opts = CompareOpts::ignoring_mtime_of(["/", "/dot", "/abs", "/a", "/dbl"]);
    semantics_case(
        "name normalisation",
        r#"
with out(1) as t:
    add(t, "./dot/file", data=b"1")
    add(t, "/abs/file", data=b"2")
    add(t, "a/./b", data=b"3")
    add(t, "./a//c/", data=b"4")
    add(t, "dbl//file", data=b"5")
    add(t, "./a/./trail/", "d", mode=0o750, mtime=77)
with out(2) as t:
    add(t, "dot/file", data=b"1")
    add(t, "abs/file", data=b"2")
    add(t, "a/b", data=b"3")
    add(t, "a/c", data=b"4")
    add(t, "dbl/file", data=b"5")
    add(t, "a/trail", "d", mode=0o750, mtime=77)
"#,
        opts,
    );
}

/// A PAX global header ('g') is metadata for the archive, not an entry.
#[test]
fn pax_global_header_is_not_an_entry() {
    semantics_case(
        "pax global header",
        r#"
with out(1, pax_headers={"comment": "global comment"}) as t:
    add(t, "./", "d", mode=0o755)
    add(t, "file", data=b"after a global header", pax={"comment": "local"})
with out(2) as t:
    add(t, "./", "d", mode=0o755)
    add(t, "file", data=b"after a global header")
"#,
        CompareOpts::default(),
    );
}

/// Symlinks have no permissions of their own: 0777 whatever the entry says.
#[test]
fn symlink_permissions_are_0777() {
    let (_w, image) = semantics_case(
        "symlink modes",
        r#"
for i in (1, 2):
    with out(i) as t:
        add(t, "./", "d", mode=0o755)
        add(t, "l644", "l", link="target", mode=0o644)
        add(t, "l000", "l", link="target", mode=0o000)
        add(t, "l4755", "l", link="/abs/target", mode=0o4755, uid=3, gid=4)
"#,
        CompareOpts::default(),
    );
    let mnt = Mount::erofs(&image);
    let tree = snapshot_tree(mnt.path());
    for p in ["/l644", "/l000", "/l4755"] {
        assert_eq!(tree[Path::new(p)].mode, libc::S_IFLNK | 0o777, "{p}");
    }
}

/// OCI whiteouts become overlayfs ones: `.wh.NAME` → char device 0/0 NAME
/// (perms 0000, owner from the entry); `.wh..wh..opq` → the directory gets
/// trusted.overlay.opaque=y and the marker itself vanishes.
#[test]
fn oci_whiteouts_become_overlay_whiteouts() {
    require_root_and_kernel();
    let work = tempdir();
    let input = work.path().join("input.tar");
    python(
        &format!(
            "{PY_PRELUDE}\n{}",
            r#"
with out(1) as t:
    add(t, "./", "d", mode=0o755)
    add(t, ".wh.gone", uid=7, gid=8, mode=0o644, mtime=1234)
    add(t, "dir", "d", mode=0o750, mtime=4000)
    add(t, "dir/.wh..wh..opq", mtime=4001)
    add(t, "dir/keep", data=b"kept", mtime=4002)
    add(t, "sub", "d", mode=0o755, mtime=5000)
    add(t, "sub/.wh.deleted dir", uid=1000, gid=1000, mtime=5001)
    add(t, "sub/present", data=b"present", mtime=5002)
    add(t, "opq-only", "d", mode=0o711, uid=3, mtime=6000)
    add(t, "opq-only/.wh..wh..opq", mtime=6001)
"#
        ),
        &[input.as_os_str()],
    );
    let image = work.path().join("layer.erofs");
    convert_ok(&input, &image, &[]);

    // Reference: GNU tar's extraction, with the markers rewritten as the
    // overlay representation the converter must produce.
    let (_x, mut expected) = gnu_extract_tree(&input);
    let mut opts = CompareOpts::default();
    for (marker, name, uid, gid) in [
        ("/.wh.gone", "/gone", 7, 8),
        ("/sub/.wh.deleted dir", "/sub/deleted dir", 1000, 1000),
    ] {
        let m = expected.remove(Path::new(marker)).expect("marker extracted");
        expected.insert(
            PathBuf::from(name),
            Node {
                kind: Kind::Char,
                mode: libc::S_IFCHR,
                uid,
                gid,
                size: 0,
                mtime: m.mtime,
                mtime_nsec: 0,
                rdev: Some((0, 0)),
                link: None,
                xattrs: vec![],
                sha256: None,
                ino: (u64::MAX, m.ino.1),
                nlink: 1,
            },
        );
        // The whiteout's mtime is not specified by OCI.
        opts.ignore_mtime.insert(PathBuf::from(name));
    }
    for (marker, dir) in [("/dir/.wh..wh..opq", "/dir"), ("/opq-only/.wh..wh..opq", "/opq-only")] {
        expected.remove(Path::new(marker)).expect("marker extracted");
        let d = expected.get_mut(Path::new(dir)).unwrap();
        d.xattrs.push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()));
        d.xattrs.sort();
    }
    check_image("whiteouts", &image, &expected, &opts);
}

// ---------------------------------------------------------------------------
// A real root filesystem.
// ---------------------------------------------------------------------------

/// Debian bookworm minbase (debootstrap), built once and cached by
/// tests/fixtures/debian-minbase.sh: thousands of real files, hard links,
/// setuid binaries, device nodes and long symlink chains.
#[test]
fn debian_minbase_rootfs() {
    require_root_and_kernel();
    let tgz = debian_minbase();
    let tar = tgz.with_extension(""); // .tar.gz -> .tar
    let work = tempdir();
    let image = work.path().join("debian.erofs");
    let report = convert_ok(
        &tgz,
        &image,
        &["--media-type", "application/vnd.oci.image.layer.v1.tar+gzip"],
    );
    check_report(&report, &tar, &tgz, &image, Compression::Gzip);
    let (_x, expected) = gnu_extract_tree(&tar);
    assert!(
        expected.len() > 5000,
        "suspiciously small rootfs: {} entries",
        expected.len()
    );
    check_image("debian minbase", &image, &expected, &CompareOpts::default());
}

/// `--meta-first` (the layout of lazily fetched layers): the same tree, and every
/// piece of metadata lies before the report's `data_offset`, so an image whose
/// data blocks are all still missing (zeros) lists and stats exactly like the
/// whole one.
#[test]
fn meta_first_layout_keeps_all_metadata_in_front() {
    require_root_and_kernel();
    let src = tempdir();
    build_rich_tree(src.path(), FULL);
    let work = tempdir();
    let tar = work.path().join("layer.tar");
    gnu_create(src.path(), &tar, TarFormat::Posix);
    let input = compress(&tar, Compression::Gzip);
    let image = work.path().join("layer.erofs");
    let report = convert_ok(&input, &image, &["--meta-first"]);
    check_report(&report, &tar, &input, &image, Compression::Gzip);
    let (_x, mut expected) = gnu_extract_tree(&tar);
    strip_overlay_xattrs(&mut expected);
    check_image("meta-first", &image, &expected, &CompareOpts::default());

    let size = fs::metadata(&image).unwrap().len();
    let data_offset = report["data_offset"].as_u64().expect("data_offset in the report");
    assert!(
        data_offset > 4096 && data_offset < size,
        "data_offset {data_offset} should split the {size}-byte image"
    );
    // The same layer in the default layout must hold the same number of data blocks.
    let plain = work.path().join("plain.erofs");
    convert_ok(&input, &plain, &[]);
    assert_eq!(
        size,
        fs::metadata(&plain).unwrap().len(),
        "meta-first moves blocks, it adds none"
    );

    // Zero everything from data_offset on: only metadata remains.
    let prefix = work.path().join("prefix.erofs");
    let mut bytes = fs::read(&image).unwrap();
    bytes[data_offset as usize..].fill(0);
    fs::write(&prefix, &bytes).unwrap();
    let meta_of = |path: &Path| {
        let img = erofs::reader::Image::open(path).unwrap();
        let mut out = Vec::new();
        img.walk(&mut |p, e| {
            let xattrs = img.xattrs(e)?;
            let link = if e.kind == erofs::reader::FileKind::Symlink {
                img.read_link(e)?
            } else {
                Vec::new()
            };
            let names = if e.kind == erofs::reader::FileKind::Dir {
                img.read_dir(e)?.into_iter().map(|d| d.name).collect()
            } else {
                Vec::new()
            };
            out.push(format!(
                "{:?} {:?} {:?} {:?} {:?}",
                String::from_utf8_lossy(p),
                e.inode,
                xattrs,
                link,
                names
            ));
            Ok(())
        })
        .unwrap();
        out
    };
    let whole = meta_of(&image);
    assert!(whole.len() > 20, "the rich tree has many entries, got {}", whole.len());
    assert_eq!(whole, meta_of(&prefix), "metadata read from the prefix alone differs");
}

// ---------------------------------------------------------------------------
// Compressed images (convert --compress).
// ---------------------------------------------------------------------------

/// The algorithms `--compress` takes, at their default levels.
const ALGORITHMS: [&str; 5] = ["lz4", "lz4hc", "zstd", "deflate", "lzma"];

#[test]
fn rich_tree_compressed_with_every_algorithm() {
    require_root_and_kernel();
    let src = tempdir();
    build_rich_tree(src.path(), FULL);
    for algo in ALGORITHMS {
        roundtrip(src.path(), TarFormat::Posix, Compression::Gzip, &["--compress", algo]);
    }
    // Big pclusters, and the highest levels.
    roundtrip(
        src.path(),
        TarFormat::Gnu,
        Compression::None,
        &["--compress", "lz4hc,12", "--pcluster-size", "64K"],
    );
    roundtrip(
        src.path(),
        TarFormat::Posix,
        Compression::Zstd,
        &["--compress", "zstd,19", "--pcluster-size", "1M"],
    );
}

/// Files of every size around the block, pcluster and segment boundaries, with data
/// that compresses well, not at all, is all zeros, or mixes runs of each: the kernel
/// reads back exactly what GNU tar extracts, for every algorithm and pcluster size.
#[test]
fn compressed_files_at_cluster_boundaries() {
    require_root_and_kernel();
    let src = tempdir();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    };
    let text = |n: usize| -> Vec<u8> {
        let words = ["layer ", "erofs ", "chunk\n", "snapshot ", "containerd ", "0x1f2e "];
        let mut v = Vec::with_capacity(n + 16);
        let mut i = 7usize;
        while v.len() < n {
            i = i.wrapping_mul(31).wrapping_add(17);
            v.extend_from_slice(words[i % words.len()].as_bytes());
        }
        v.truncate(n);
        v
    };
    const K: usize = 4096;
    let mut sizes = vec![0, 1, 100, K - 1, K, K + 1, 2 * K - 1, 2 * K, 2 * K + 1, 3 * K + 5];
    for base in [16 * K, 64 * K, 1 << 20, 4 << 20] {
        sizes.extend([base - 1, base, base + 1]);
    }
    sizes.push((5 << 20) + 12345);
    let mut n = 0;
    for &size in &sizes {
        let r = random(size);
        let t = text(size);
        let mixed: Vec<u8> = (0..size)
            .map(|i| {
                if (i / 5000) % 3 == 0 {
                    r[i]
                } else if (i / 5000) % 3 == 1 {
                    0
                } else {
                    t[i]
                }
            })
            .collect();
        for (kind, data) in [("random", r), ("zeros", vec![0u8; size]), ("text", t), ("mixed", mixed)] {
            fs::write(src.path().join(format!("{kind}-{size}")), data).unwrap();
            n += 1;
        }
    }
    assert!(n > 80);
    for (algo, pcluster) in [
        ("lz4", "4K"),
        ("lz4hc", "4K"),
        ("lz4hc", "16K"),
        ("zstd", "4K"),
        ("zstd", "128K"),
        ("deflate", "4K"),
        ("lzma", "4K"),
        ("lzma,0", "64K"),
    ] {
        let report = roundtrip(
            src.path(),
            TarFormat::Posix,
            Compression::None,
            &["--compress", algo, "--pcluster-size", pcluster],
        );
        // Tails are packed after their inodes where they fit (most text and mixed files).
        let packed = report["tail_packed_files"].as_u64().unwrap();
        assert!(packed > 10, "{algo}: {packed} tail-packed files");
    }
    // Without inline data, every pcluster is in whole blocks.
    let report = roundtrip(
        src.path(),
        TarFormat::Gnu,
        Compression::None,
        &["--compress", "lz4hc", "--no-inline"],
    );
    assert_eq!(report["tail_packed_files"], 0);
    assert!(report["compressed_files"].as_u64().unwrap() > 40);
}

/// The minbase rootfs with every algorithm: the kernel mount equals GNU tar's
/// extraction, fsck.erofs 1.9.4 is clean, and compression saves space.
#[test]
fn debian_minbase_compressed() {
    require_root_and_kernel();
    let tgz = debian_minbase();
    let tar = tgz.with_extension("");
    let (_x, expected) = gnu_extract_tree(&tar);
    let work = tempdir();
    let plain = work.path().join("plain.erofs");
    convert_ok(&tgz, &plain, &[]);
    let plain_size = fs::metadata(&plain).unwrap().len();
    for algo in ALGORITHMS {
        let image = work.path().join(format!("{algo}.erofs"));
        let report = convert_ok(&tgz, &image, &["--compress", algo]);
        check_report(&report, &tar, &tgz, &image, Compression::Gzip);
        check_image(
            &format!("debian minbase, {algo}"),
            &image,
            &expected,
            &CompareOpts::default(),
        );
        let size = fs::metadata(&image).unwrap().len();
        assert!(
            size * 10 < plain_size * 8,
            "{algo}: {size} bytes against {plain_size} uncompressed"
        );
        fs::remove_file(&image).unwrap();
    }
}

/// Bad compression options are refused before anything is written.
#[test]
fn bad_compression_options_are_refused() {
    require_root_and_kernel();
    let src = tempdir();
    fs::write(src.path().join("f"), b"x").unwrap();
    let work = tempdir();
    let tar = work.path().join("l.tar");
    gnu_create(src.path(), &tar, TarFormat::Posix);
    for args in [
        &["--compress", "lzo"][..],
        &["--compress", "lz4hc,13"],
        &["--compress", "zstd", "--pcluster-size", "6000"],
        &["--compress", "zstd", "--pcluster-size", "2M"],
    ] {
        let out = work.path().join("out.erofs");
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
            .arg("convert")
            .args(args)
            .arg(&tar)
            .arg(&out)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
}

/// Images `mkfs.erofs` 1.9.4 compresses (compact indexes, 2-byte packs, big pclusters,
/// every algorithm) read back through the project's reader exactly as the kernel reads
/// them: what `cat`, `ls` and the validation of native layers rely on.
#[test]
fn reader_reads_mkfs_compressed_images() {
    require_root_and_kernel();
    let src = tempdir();
    build_rich_tree(src.path(), FULL);
    // A few bigger files, so that images have many index packs.
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i / 7 % 251) as u8 ^ (i >> 13) as u8)
        .collect();
    fs::write(src.path().join("big"), &big).unwrap();
    fs::write(src.path().join("zeros"), vec![0u8; 1 << 20]).unwrap();
    let work = tempdir();
    let tar = work.path().join("l.tar");
    gnu_create(src.path(), &tar, TarFormat::Posix);
    let mkfs = erofs_utils_bin().join("mkfs.erofs");
    for args in [
        &["-zlz4"][..],
        &["-zlz4hc,9"],
        &["-zlz4hc,12", "-C65536"],
        &["-zzstd,3"],
        &["-zzstd,9", "-C131072"],
        &["-zlibdeflate,6"],
        &["-zlzma,6"],
        &["-zlzma,9", "-C65536"],
        &["-zlz4hc", "-Enoinline_data"],
    ] {
        let image = work.path().join("mkfs.erofs");
        let _ = fs::remove_file(&image);
        run(
            std::process::Command::new(&mkfs)
                .args(args)
                .arg("--tar=f")
                .arg("-Uclear")
                .arg(&image)
                .arg(&tar),
            &format!("mkfs.erofs {args:?}"),
        );
        let mnt = Mount::erofs(&image);
        let kernel = snapshot_tree(mnt.path());
        let reader = reader_tree(&image);
        if let Err(e) = compare_trees(&kernel, &reader, &CompareOpts::default()) {
            panic!("mkfs.erofs {args:?}: erofs::reader vs kernel mount: {e}");
        }
    }
}
