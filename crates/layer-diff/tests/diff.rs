//! Diffs written from hand-built trees, checked with GNU tar and the project's tar reader.
//! Needs root (chown, mknod, trusted.* xattrs).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use layer_diff::{write_upper_diff, write_walk_diff, Compression, DiffOptions, DiffStats};
use oci_layer::tar::{Entry, Kind, TarReader};
use rustix::fs::{FileType, Mode, Timespec, Timestamps};
use sha2::{Digest, Sha256};

fn assert_root() {
    let probe = tempfile::NamedTempFile::new().unwrap();
    assert_eq!(
        probe.as_file().metadata().unwrap().uid(),
        0,
        "these tests need root (chown, mknod, xattrs)"
    );
}

// ---------- building trees ----------

fn write(p: &Path, data: &[u8]) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

fn mtime(p: &Path, sec: i64, nsec: i64) {
    let ts = Timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &Timestamps {
            last_access: ts,
            last_modification: ts,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn xattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, rustix::fs::XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", p.display()));
}

fn mknod(p: &Path, ft: FileType, major: u32, minor: u32) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        ft,
        Mode::from_raw_mode(0o644),
        rustix::fs::makedev(major, minor),
    )
    .unwrap();
}

fn symlink(target: &str, p: &Path) {
    std::os::unix::fs::symlink(target, p).unwrap();
}

fn socket(p: &Path) {
    // The listener is dropped; the socket file stays.
    std::os::unix::net::UnixListener::bind(p).unwrap();
}

/// A directory path of more than 300 bytes under `root` (components under 255 bytes).
fn long_dir(root: &Path) -> PathBuf {
    root.join("long").join("d".repeat(150)).join("e".repeat(120))
}

/// An overlayfs upper dir with every kind of change.
fn build_upper(u: &Path) {
    write(&u.join("bin/sh"), b"#!shell\n");
    chmod(&u.join("bin/sh"), 0o755);
    mtime(&u.join("bin/sh"), 1_700_000_000, 123_456_789);
    write(&u.join("bin/su"), b"su binary");
    chmod(&u.join("bin/su"), 0o4755);
    write(&u.join("bin/ping"), b"ping");
    xattr(&u.join("bin/ping"), "security.test", b"\x01\x00\x00\x02");
    fs::hard_link(u.join("bin/sh"), u.join("bin/hard2")).unwrap();
    write(&u.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n");
    chown(&u.join("etc/passwd"), 70000, 70001);
    xattr(&u.join("etc/passwd"), "user.comment", b"hello world");
    xattr(&u.join("etc/passwd"), "trusted.overlay.origin", b"\x00\xfb");
    fs::hard_link(u.join("bin/sh"), u.join("etc/hard3")).unwrap();
    symlink("/usr/share/zoneinfo/UTC", &u.join("etc/localtime"));
    write(&u.join("etc/empty"), b"");
    chmod(&u.join("etc"), 0o750);
    fs::create_dir_all(u.join("dev")).unwrap();
    mknod(&u.join("dev/null"), FileType::CharacterDevice, 1, 3);
    mknod(&u.join("dev/loop0"), FileType::BlockDevice, 7, 0);
    mknod(&u.join("dev/fifo"), FileType::Fifo, 0, 0);
    mknod(&u.join("deleted"), FileType::CharacterDevice, 0, 0);
    // The kernel shares one whiteout inode between many whiteouts: a link must not become a
    // hard link entry.
    fs::hard_link(u.join("deleted"), u.join("dev/gone")).unwrap();
    fs::create_dir_all(u.join("var/lib")).unwrap();
    write(&u.join("var/new"), b"new in opaque dir");
    xattr(&u.join("var"), "trusted.overlay.opaque", b"y");
    xattr(&u.join("var"), "user.dir", b"on a dir");
    let long = long_dir(u);
    write(&long.join("f".repeat(60)), b"long path");
    symlink(&format!("/{}", "t".repeat(200)), &long.join("longlink"));
    socket(&u.join("sock"));
    write(
        &u.join("big"),
        &(0..100_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
    );
    mtime(&u.join("big"), 1_600_000_000, 999_999_999);
    mtime(&u.join("deleted"), 1_650_000_000, 0);
    mtime(&u.join("dev/fifo"), 1_500_000_000, 5);
    mtime(&u.join("etc/localtime"), 1_400_000_000, 7);
}

// ---------- reading tars ----------

fn list(tar: &[u8]) -> Vec<Entry> {
    let mut r = TarReader::new(BufReader::new(tar));
    let mut out = Vec::new();
    while let Some(e) = r.next_entry().unwrap() {
        out.push(e);
    }
    out
}

fn names(entries: &[Entry]) -> Vec<String> {
    entries.iter().map(|e| e.display_path()).collect()
}

fn find<'a>(entries: &'a [Entry], name: &str) -> &'a Entry {
    entries
        .iter()
        .find(|e| e.path == name.as_bytes())
        .unwrap_or_else(|| panic!("{name} not in {:?}", names(entries)))
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn diff_upper(upper: &Path, compression: Compression) -> (Vec<u8>, DiffStats) {
    let mut out = Vec::new();
    let opts = DiffOptions {
        compression,
        source_date_epoch: None,
    };
    let stats = write_upper_diff(upper, &mut out, &opts).unwrap();
    (out, stats)
}

fn decompress(data: &[u8], c: Compression) -> Vec<u8> {
    let mut out = Vec::new();
    match c {
        Compression::None => out = data.to_vec(),
        Compression::Gzip => {
            flate2::read::GzDecoder::new(data).read_to_end(&mut out).unwrap();
        }
        Compression::Zstd => {
            zstd::stream::read::Decoder::new(data)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
        }
    }
    out
}

fn gnu_tar(args: &[&str], tar: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("layer.tar");
    fs::write(&file, tar).unwrap();
    let out = Command::new("tar").args(args).arg("-f").arg(&file).output().unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "tar {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn extract(tar: &[u8], dest: &Path) {
    let d = dest.to_str().unwrap();
    gnu_tar(
        &["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xp", "-C", d],
        tar,
    );
}

/// OCI whiteouts after a plain extraction: `.wh.X` deletes X, `.wh..wh..opq` empties its
/// directory of everything the layer itself did not add.
fn process_whiteouts(root: &Path, entries: &[Entry]) {
    let in_layer: HashSet<Vec<u8>> = entries
        .iter()
        .map(|e| e.path.strip_suffix(b"/").unwrap_or(&e.path).to_vec())
        .collect();
    for e in entries {
        let path = e.path.strip_suffix(b"/").unwrap_or(&e.path);
        let (parent, base) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&b""[..], path),
        };
        let dir = if parent.is_empty() {
            root.to_path_buf()
        } else {
            root.join(OsStr::from_bytes(parent))
        };
        if base == b".wh..wh..opq" {
            for child in fs::read_dir(&dir).unwrap() {
                let child = child.unwrap();
                let mut rel = parent.to_vec();
                if !rel.is_empty() {
                    rel.push(b'/');
                }
                rel.extend_from_slice(child.file_name().as_bytes());
                if !in_layer.contains(&rel) {
                    remove_any(&child.path());
                }
            }
        } else if let Some(target) = base.strip_prefix(b".wh.") {
            let t = dir.join(OsStr::from_bytes(target));
            if t.symlink_metadata().is_ok() {
                remove_any(&t);
            }
        } else {
            continue;
        }
        fs::remove_file(root.join(OsStr::from_bytes(path))).unwrap();
    }
}

fn remove_any(p: &Path) {
    if p.symlink_metadata().unwrap().is_dir() {
        fs::remove_dir_all(p).unwrap();
    } else {
        fs::remove_file(p).unwrap();
    }
}

// ---------- comparing trees ----------

#[derive(Debug, PartialEq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    /// None for directories (their mtimes move when whiteouts are processed).
    mtime: Option<(i64, i64)>,
    size: u64,
    rdev: u64,
    content: Option<String>,
    link: Option<String>,
    xattrs: Vec<(String, Vec<u8>)>,
    /// The first path (in sorted order) with the same inode.
    hard_link_group: Option<String>,
}

/// Every entry under `root` but `root`, except those `skip` rejects.
fn snapshot(root: &Path, skip: &dyn Fn(&str, &fs::Metadata) -> bool) -> BTreeMap<String, Node> {
    let mut paths = Vec::new();
    fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, PathBuf)>) {
        let mut children: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        children.sort();
        for c in children {
            let r = if rel.is_empty() {
                c.to_str().unwrap().to_string()
            } else {
                format!("{rel}/{}", c.to_str().unwrap())
            };
            let p = dir.join(&c);
            out.push((r.clone(), p.clone()));
            if p.symlink_metadata().unwrap().is_dir() {
                walk(&p, &r, out);
            }
        }
    }
    walk(root, "", &mut paths);
    let mut first_of_inode: HashMap<u64, String> = HashMap::new();
    let mut out = BTreeMap::new();
    for (rel, p) in paths {
        let m = p.symlink_metadata().unwrap();
        if skip(&rel, &m) {
            continue;
        }
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "socket"
        };
        let group = if !ft.is_dir() && m.nlink() > 1 {
            Some(first_of_inode.entry(m.ino()).or_insert_with(|| rel.clone()).clone())
        } else {
            None
        };
        let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
        let mut buf = vec![0u8; 4096];
        let n = rustix::fs::llistxattr(&p, &mut buf[..]).unwrap();
        for name in buf[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let name = String::from_utf8(name.to_vec()).unwrap();
            if name.starts_with("trusted.overlay.") {
                continue;
            }
            let mut v = vec![0u8; 4096];
            let len = rustix::fs::lgetxattr(&p, name.as_str(), &mut v[..]).unwrap();
            v.truncate(len);
            xattrs.push((name, v));
        }
        xattrs.sort();
        out.insert(
            rel,
            Node {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                mtime: if ft.is_dir() {
                    None
                } else {
                    Some((m.mtime(), m.mtime_nsec()))
                },
                size: if ft.is_dir() { 0 } else { m.size() },
                rdev: m.rdev(),
                content: if ft.is_file() {
                    Some(hex::encode(Sha256::digest(fs::read(&p).unwrap())))
                } else {
                    None
                },
                link: if ft.is_symlink() {
                    Some(fs::read_link(&p).unwrap().to_str().unwrap().to_string())
                } else {
                    None
                },
                xattrs,
                hard_link_group: group,
            },
        );
    }
    out
}

fn assert_same_trees(expected: &BTreeMap<String, Node>, actual: &BTreeMap<String, Node>) {
    let ek: Vec<_> = expected.keys().collect();
    let ak: Vec<_> = actual.keys().collect();
    assert_eq!(ek, ak, "paths differ");
    for (k, e) in expected {
        assert_eq!(e, &actual[k], "{k} differs");
    }
}

fn is_overlay_whiteout(m: &fs::Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

// ---------- upper dir ----------

#[test]
fn upper_diff_lists_and_extracts_like_the_upper_dir() {
    assert_root();
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    fs::create_dir(&upper).unwrap();
    build_upper(&upper);

    let (tar, stats) = diff_upper(&upper, Compression::None);
    assert_eq!(stats.uncompressed_size, tar.len() as u64);
    assert_eq!(stats.uncompressed_digest, sha256(&tar));
    assert_eq!(&tar[tar.len() - 1024..], &[0u8; 1024][..], "ends with two zero blocks");
    assert_eq!(tar.len() % 512, 0);

    let entries = list(&tar);
    assert_eq!(stats.entries, entries.len() as u64);
    let long = format!("long/{}/{}", "d".repeat(150), "e".repeat(120));
    let expected = vec![
        "big".to_string(),
        "bin/".into(),
        "bin/hard2".into(),
        "bin/ping".into(),
        "bin/sh".into(),
        "bin/su".into(),
        ".wh.deleted".into(),
        "dev/".into(),
        "dev/fifo".into(),
        "dev/.wh.gone".into(),
        "dev/loop0".into(),
        "dev/null".into(),
        "etc/".into(),
        "etc/empty".into(),
        "etc/hard3".into(),
        "etc/localtime".into(),
        "etc/passwd".into(),
        "long/".into(),
        format!("long/{}/", "d".repeat(150)),
        format!("{long}/"),
        format!("{long}/{}", "f".repeat(60)),
        format!("{long}/longlink"),
        "var/".into(),
        "var/.wh..wh..opq".into(),
        "var/lib/".into(),
        "var/new".into(),
    ];
    assert_eq!(names(&entries), expected);

    // Hard links: the first name in walk order carries the data.
    let hard2 = find(&entries, "bin/hard2");
    assert_eq!((hard2.kind, hard2.size), (Some(Kind::File), 8));
    for other in ["bin/sh", "etc/hard3"] {
        let e = find(&entries, other);
        assert_eq!(
            (e.kind, e.link.as_slice()),
            (Some(Kind::HardLink), &b"bin/hard2"[..]),
            "{other}"
        );
    }
    let sh = find(&entries, "bin/sh");
    assert_eq!((sh.mode, sh.mtime, sh.mtime_nsec), (0o755, 1_700_000_000, 123_456_789));
    assert_eq!(find(&entries, "bin/su").mode, 0o4755);
    assert_eq!(find(&entries, "big").mtime_nsec, 999_999_999);
    let passwd = find(&entries, "etc/passwd");
    assert_eq!((passwd.uid, passwd.gid), (70000, 70001));
    assert_eq!(passwd.xattrs, vec![(b"user.comment".to_vec(), b"hello world".to_vec())]);
    assert_eq!(
        find(&entries, "bin/ping").xattrs,
        vec![(b"security.test".to_vec(), b"\x01\x00\x00\x02".to_vec())]
    );
    assert_eq!(find(&entries, "etc/").mode, 0o750);
    let var = find(&entries, "var/");
    assert_eq!(var.kind, Some(Kind::Dir));
    assert_eq!(
        var.xattrs,
        vec![(b"user.dir".to_vec(), b"on a dir".to_vec())],
        "no trusted.overlay.*"
    );
    let wh = find(&entries, ".wh.deleted");
    assert_eq!(
        (wh.kind, wh.size, wh.mtime, wh.mode),
        (Some(Kind::File), 0, 1_650_000_000, 0)
    );
    let null = find(&entries, "dev/null");
    assert_eq!((null.kind, null.devmajor, null.devminor), (Some(Kind::CharDev), 1, 3));
    let lp = find(&entries, "dev/loop0");
    assert_eq!((lp.kind, lp.devmajor, lp.devminor), (Some(Kind::BlockDev), 7, 0));
    assert_eq!(find(&entries, "dev/fifo").kind, Some(Kind::Fifo));
    let ll = find(&entries, &format!("{long}/longlink"));
    assert_eq!(
        (ll.kind, ll.link.clone()),
        (Some(Kind::Symlink), format!("/{}", "t".repeat(200)).into_bytes())
    );
    assert!(entries
        .iter()
        .all(|e| !e.path.starts_with(b"sock") && !e.path.starts_with(b"./")));
    assert!(entries
        .iter()
        .all(|e| e.xattrs.iter().all(|(k, _)| !k.starts_with(b"trusted.overlay."))));

    // GNU tar lists it cleanly, with owners and the long names.
    let listing = gnu_tar(&["--numeric-owner", "-tv"], &tar);
    assert_eq!(listing.lines().count(), entries.len(), "{listing}");
    assert!(
        listing
            .lines()
            .any(|l| l.contains("70000/70001") && l.ends_with("etc/passwd")),
        "{listing}"
    );
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("-rwsr-xr-x") && l.ends_with("bin/su")),
        "{listing}"
    );
    assert!(listing.contains(&format!("{long}/{}", "f".repeat(60))), "{listing}");
    assert!(listing.contains("bin/sh link to bin/hard2"), "{listing}");
    let full_times = gnu_tar(&["--full-time", "--utc", "-tv"], &tar);
    assert!(
        full_times
            .lines()
            .any(|l| l.contains("2023-11-14 22:13:20.123456789") && l.ends_with("bin/hard2")),
        "{full_times}"
    );

    // Extracted with GNU tar, it is the upper dir minus whiteouts and sockets.
    let dest = tmp.path().join("extracted");
    fs::create_dir(&dest).unwrap();
    extract(&tar, &dest);
    assert!(dest.join(".wh.deleted").exists() && dest.join("var/.wh..wh..opq").exists());
    process_whiteouts(&dest, &entries);
    let want = snapshot(&upper, &|_, m| is_overlay_whiteout(m) || m.file_type().is_socket());
    let got = snapshot(&dest, &|_, _| false);
    assert_same_trees(&want, &got);
    assert_eq!(got["bin/sh"].hard_link_group.as_deref(), Some("bin/hard2"));

    // Compressed: same tar inside, same stats; the upper diff is deterministic.
    for c in [Compression::Gzip, Compression::Zstd] {
        let (z, zstats) = diff_upper(&upper, c);
        assert_eq!(zstats, stats, "{c:?}");
        assert_eq!(decompress(&z, c), tar, "{c:?}");
        assert!(z.len() < tar.len() / 2, "{c:?}: {} of {}", z.len(), tar.len());
    }
    let (gz, _) = diff_upper(&upper, Compression::Gzip);
    let dest = tmp.path().join("extracted-gz");
    fs::create_dir(&dest).unwrap();
    gnu_tar(
        &[
            "-xz",
            "--xattrs",
            "--xattrs-include=*",
            "-p",
            "-C",
            dest.to_str().unwrap(),
        ],
        &gz,
    );
    process_whiteouts(&dest, &entries);
    assert_same_trees(&want, &snapshot(&dest, &|_, _| false));
}

#[test]
fn upper_diff_clamps_to_source_date_epoch() {
    assert_root();
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    fs::create_dir(&upper).unwrap();
    build_upper(&upper);
    let epoch = 1_600_000_000i64;
    let mut tar = Vec::new();
    let opts = DiffOptions {
        compression: Compression::None,
        source_date_epoch: Some(UNIX_EPOCH + Duration::from_secs(epoch as u64)),
    };
    write_upper_diff(&upper, &mut tar, &opts).unwrap();
    let entries = list(&tar);
    for e in &entries {
        assert!(
            e.mtime <= epoch && (e.mtime < epoch || e.mtime_nsec == 0),
            "{}: {}",
            e.display_path(),
            e.mtime
        );
    }
    // Earlier times are kept as they are.
    let fifo = find(&entries, "dev/fifo");
    assert_eq!((fifo.mtime, fifo.mtime_nsec), (1_500_000_000, 5));
    let sh = find(&entries, "bin/hard2");
    assert_eq!((sh.mtime, sh.mtime_nsec), (epoch, 0));
    // .wh.deleted was at 1_650_000_000.
    assert_eq!(find(&entries, ".wh.deleted").mtime, epoch);
    // Files written just now are clamped too.
    assert_eq!(find(&entries, "etc/passwd").mtime, epoch);
}

#[test]
fn upper_diff_refuses_what_it_cannot_represent() {
    assert_root();
    let tmp = tempfile::tempdir().unwrap();
    let err = write_upper_diff(&tmp.path().join("missing"), Vec::new(), &DiffOptions::default()).unwrap_err();
    assert_eq!(err.path(), tmp.path().join("missing"));
    assert!(err.to_string().contains("missing"), "{err}");

    let upper = tmp.path().join("upper");
    write(&upper.join("a/file"), b"x");
    xattr(&upper.join("a/file"), "trusted.overlay.metacopy", b"");
    let err = write_upper_diff(&upper, Vec::new(), &DiffOptions::default()).unwrap_err();
    assert_eq!(err.path(), upper.join("a/file"));
    assert_eq!(err.io_error().kind(), std::io::ErrorKind::Unsupported);

    let upper = tmp.path().join("upper2");
    fs::create_dir_all(upper.join("moved")).unwrap();
    xattr(&upper.join("moved"), "trusted.overlay.redirect", b"/old");
    let err = write_upper_diff(&upper, Vec::new(), &DiffOptions::default()).unwrap_err();
    assert_eq!(err.io_error().kind(), std::io::ErrorKind::Unsupported, "{err}");
}

#[test]
fn empty_upper_is_just_the_end_marker() {
    let tmp = tempfile::tempdir().unwrap();
    let (tar, stats) = diff_upper(tmp.path(), Compression::None);
    assert_eq!(tar, vec![0u8; 1024]);
    assert_eq!(stats.entries, 0);
    assert_eq!(stats.uncompressed_digest, sha256(&tar));
}

// ---------- two trees ----------

fn cp_a(from: &Path, to: &Path) {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success());
}

fn build_lower(l: &Path) {
    write(&l.join("keep.txt"), b"same");
    mtime(&l.join("keep.txt"), 1_600_000_000, 42);
    write(&l.join("mod.txt"), b"before");
    mtime(&l.join("mod.txt"), 1_600_000_000, 1);
    write(&l.join("trunc.txt"), b"aaaa");
    mtime(&l.join("trunc.txt"), 1_600_000_000, 0);
    write(&l.join("trunc-same.txt"), b"bbbb");
    mtime(&l.join("trunc-same.txt"), 1_600_000_000, 0);
    write(&l.join("chmod.txt"), b"c");
    chmod(&l.join("chmod.txt"), 0o644);
    write(&l.join("chown.txt"), b"c");
    write(&l.join("xattr.txt"), b"x");
    xattr(&l.join("xattr.txt"), "user.a", b"1");
    write(&l.join("del.txt"), b"gone");
    write(&l.join("deldir/a/b"), b"gone too");
    write(&l.join("d2f/child"), b"child");
    write(&l.join("f2d"), b"file");
    symlink("old-target", &l.join("link"));
    write(&l.join("unchanged/sub/file"), b"unchanged");
    chmod(&l.join("unchanged/sub"), 0o700);
    chown(&l.join("unchanged"), 5, 6);
    write(&l.join("hl_a"), b"linked");
    write(&l.join("pair/one"), b"pair");
    fs::hard_link(l.join("pair/one"), l.join("pair/two")).unwrap();
    write(&l.join("z/last"), b"z");
}

fn change_upper(u: &Path) {
    fs::write(u.join("mod.txt"), b"after!").unwrap();
    mtime(&u.join("mod.txt"), 1_600_000_001, 1);
    // Same size and whole-second mtime: only the content tells.
    fs::write(u.join("trunc.txt"), b"AAAA").unwrap();
    mtime(&u.join("trunc.txt"), 1_600_000_000, 0);
    chmod(&u.join("chmod.txt"), 0o600);
    chown(&u.join("chown.txt"), 1000, 1000);
    xattr(&u.join("xattr.txt"), "user.a", b"2");
    fs::remove_file(u.join("del.txt")).unwrap();
    fs::remove_dir_all(u.join("deldir")).unwrap();
    fs::remove_dir_all(u.join("d2f")).unwrap();
    write(&u.join("d2f"), b"now a file");
    fs::remove_file(u.join("f2d")).unwrap();
    write(&u.join("f2d/inside"), b"now a dir");
    fs::remove_file(u.join("link")).unwrap();
    symlink("new-target", &u.join("link"));
    write(&u.join("unchanged/sub/new.txt"), b"new");
    fs::hard_link(u.join("hl_a"), u.join("hl_b")).unwrap();
    write(&u.join("added/deep/file"), b"added");
    mknod(&u.join("added/null"), FileType::CharacterDevice, 1, 3);
    mknod(&u.join("added/fifo"), FileType::Fifo, 0, 0);
    socket(&u.join("added/sock"));
    chown(&u.join("added/deep"), 70000, 70000);
    // Touching a directory alone is not a change.
    mtime(&u.join("z"), 1_000, 0);
}

fn walk_diff(lower: &Path, upper: &Path, c: Compression, epoch: Option<i64>) -> (Vec<u8>, DiffStats) {
    let mut out = Vec::new();
    let opts = DiffOptions {
        compression: c,
        source_date_epoch: epoch.map(|s| UNIX_EPOCH + Duration::from_secs(s as u64)),
    };
    let stats = write_walk_diff(lower, upper, &mut out, &opts).unwrap();
    (out, stats)
}

#[test]
fn walk_diff_applies_onto_lower_to_give_upper() {
    assert_root();
    let tmp = tempfile::tempdir().unwrap();
    let lower = tmp.path().join("lower");
    fs::create_dir(&lower).unwrap();
    build_lower(&lower);
    let upper = tmp.path().join("upper");
    cp_a(&lower, &upper);
    change_upper(&upper);

    let (tar, stats) = walk_diff(&lower, &upper, Compression::None, None);
    assert_eq!(stats.uncompressed_digest, sha256(&tar));
    assert_eq!(stats.uncompressed_size, tar.len() as u64);
    let entries = list(&tar);
    assert_eq!(stats.entries, entries.len() as u64);
    assert_eq!(
        names(&entries),
        [
            "added/",
            "added/deep/",
            "added/deep/file",
            "added/fifo",
            "added/null",
            "chmod.txt",
            "chown.txt",
            "d2f",
            ".wh.del.txt",
            ".wh.deldir",
            "f2d/",
            "f2d/inside",
            "hl_b",
            "hl_a",
            "link",
            "mod.txt",
            "trunc.txt",
            "unchanged/",
            "unchanged/sub/",
            "unchanged/sub/new.txt",
            "xattr.txt",
        ]
    );
    let hl_a = find(&entries, "hl_a");
    assert_eq!((hl_a.kind, hl_a.link.as_slice()), (Some(Kind::HardLink), &b"hl_b"[..]));
    let sub = find(&entries, "unchanged/sub/");
    assert_eq!(sub.mode, 0o700);
    assert_eq!(
        (find(&entries, "unchanged/").uid, find(&entries, "unchanged/").gid),
        (5, 6)
    );
    assert_eq!(find(&entries, "added/deep/").uid, 70000);
    assert_eq!(
        find(&entries, "xattr.txt").xattrs,
        vec![(b"user.a".to_vec(), b"2".to_vec())]
    );
    assert_eq!(find(&entries, "link").link, b"new-target");
    let wh = find(&entries, ".wh.deldir");
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - 600..=now).contains(&wh.mtime), "whiteout time {}", wh.mtime);

    gnu_tar(&["-tv"], &tar);
    let applied = tmp.path().join("applied");
    cp_a(&lower, &applied);
    // Like containerd's applier: a non-directory replaces whatever was at its path.
    for e in &entries {
        if e.kind != Some(Kind::Dir) {
            let p = applied.join(OsStr::from_bytes(&e.path));
            if p.symlink_metadata().map(|m| m.is_dir()).unwrap_or(false) {
                fs::remove_dir_all(&p).unwrap();
            }
        }
    }
    extract(&tar, &applied);
    process_whiteouts(&applied, &entries);
    let want = snapshot(&upper, &|_, m| m.file_type().is_socket());
    let got = snapshot(&applied, &|_, _| false);
    assert_same_trees(&want, &got);
    assert_eq!(got["hl_a"].hard_link_group.as_deref(), Some("hl_a"));
    assert_eq!(got["hl_b"].hard_link_group.as_deref(), Some("hl_a"));
    assert_eq!(got["pair/two"].hard_link_group.as_deref(), Some("pair/one"));

    for c in [Compression::Gzip, Compression::Zstd] {
        let (z, zstats) = walk_diff(&lower, &upper, c, Some(1_700_000_000));
        let plain = decompress(&z, c);
        assert_eq!(zstats.uncompressed_digest, sha256(&plain), "{c:?}");
        assert_eq!(names(&list(&plain)), names(&entries), "{c:?}");
    }
}

#[test]
fn walk_diff_of_identical_trees_is_empty_and_epoch_clamps_whiteouts() {
    assert_root();
    let tmp = tempfile::tempdir().unwrap();
    let lower = tmp.path().join("lower");
    fs::create_dir(&lower).unwrap();
    build_lower(&lower);
    let upper = tmp.path().join("upper");
    cp_a(&lower, &upper);
    let (tar, stats) = walk_diff(&lower, &upper, Compression::None, None);
    assert_eq!((stats.entries, tar.len()), (0, 1024));

    fs::remove_file(upper.join("unchanged/sub/file")).unwrap();
    write(&upper.join("new"), b"new");
    let epoch = 1_000_000_000;
    let (tar, _) = walk_diff(&lower, &upper, Compression::None, Some(epoch));
    let entries = list(&tar);
    assert_eq!(
        names(&entries),
        ["new", "unchanged/", "unchanged/sub/", "unchanged/sub/.wh.file"]
    );
    for e in &entries {
        assert_eq!((e.mtime, e.mtime_nsec), (epoch, 0), "{}", e.display_path());
    }
    // Same trees and an epoch: the same bytes every time.
    let (again, _) = walk_diff(&lower, &upper, Compression::None, Some(epoch));
    assert_eq!(again, tar);
}
