//! Shared helpers for the converter's integration tests.
//!
//! The tests prove the converter against the kernel: an image is mounted with
//! mount(2) (file-backed EROFS, no loop device) and the mounted tree is compared
//! with what GNU tar extracts from the same input. That needs root and a kernel
//! with erofs (and overlay for the layering tests); without them the tests panic
//! instead of skipping, so a green run always means the checks really ran.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr, OsString};
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Once;

use sha2::{Digest, Sha256};
pub use test_support::TestDir;

/// Path of the converter binary built by cargo for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dedup-snapshotter"))
}

/// Panics unless the process is root and the kernel knows erofs and overlay.
///
/// Panicking (not skipping) is deliberate: a skipped kernel test would let a
/// broken converter pass CI silently.
pub fn require_root_and_kernel() {
    static CHECK: Once = Once::new();
    CHECK.call_once(|| {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "these tests need root (mount(2), mknod, chown, trusted.* xattrs); run them as root"
        );
        let fss = fs::read_to_string("/proc/filesystems").expect("read /proc/filesystems");
        for want in ["erofs", "overlay"] {
            assert!(
                fss.lines().any(|l| l.split_whitespace().last() == Some(want)),
                "the kernel lacks `{want}` in /proc/filesystems; these tests need it (modprobe {want})"
            );
        }
        require_tools();
    });
}

/// Panics unless the tools the converter tests run next to the binary are installed (no root needed): the
/// unit tier's converter tests need these and nothing else.
pub fn require_tools() {
    require_commands(
        &["tar", "fsck.erofs", "python3", "gzip", "zstd"],
        "apt-get install -y tar erofs-utils python3 gzip zstd",
    );
}

/// Panics unless every command in `tools` is on PATH; `install` says how to get them.
pub fn require_commands(tools: &[&str], install: &str) {
    for tool in tools {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "`{tool}` is not installed; {install}");
    }
}

/// A fresh temporary directory (under the system temp dir); on drop, whatever is
/// mounted under it is unmounted (lazily, deepest first) and it is removed, also
/// when the test panics.
pub fn tempdir() -> TestDir {
    TestDir::new("dedup-test-")
}

/// Runs `dedup-snapshotter convert [extra...] INPUT OUTPUT`.
pub fn convert(input: &Path, output: &Path, extra: &[&str]) -> Output {
    Command::new(bin())
        .arg("convert")
        .args(extra)
        .arg(input)
        .arg(output)
        .output()
        .expect("spawn dedup-snapshotter")
}

/// Converts with `--json` plus `extra`, asserts success, returns the JSON report.
pub fn convert_ok(input: &Path, output: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let out = convert(input, output, &args);
    parse_report(&out, &format!("convert {} -> {}", input.display(), output.display()))
}

/// Asserts a successful `convert --json` run and parses its stdout.
pub fn parse_report(out: &Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what} failed with {}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is not one JSON object ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `sha256:<hex>` of a byte string.
pub fn sha256_hex(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `sha256:<hex>` of a file, streamed.
pub fn sha256_file(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path has no NUL")
}

/// An image (or overlay) mounted read-only at a private temp dir; unmounted
/// (lazily, so a stray open file cannot wedge the test) and removed on drop, by the
/// directory's guard.
pub struct Mount {
    dir: TestDir,
}

impl Mount {
    /// mount(2)s an EROFS image file directly (file-backed mount, kernel ≥ 6.12).
    pub fn erofs(image: &Path) -> Mount {
        require_root_and_kernel();
        let dir = tempdir();
        let src = cstr(image);
        let tgt = cstr(dir.path());
        // SAFETY: all pointers are valid NUL-terminated strings for the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                tgt.as_ptr(),
                c"erofs".as_ptr(),
                libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount -t erofs {} {}: {} (see dmesg for the kernel's reason)",
            image.display(),
            dir.path().display(),
            std::io::Error::last_os_error()
        );
        Mount { dir }
    }

    /// Mounts an EROFS image file with extra devices (blobs), in device-table order,
    /// through the snapshotter's own new-mount-API code path.
    pub fn erofs_with_devices(image: &Path, devices: &[PathBuf]) -> Mount {
        require_root_and_kernel();
        let dir = tempdir();
        snapshotter::mounts::mount_erofs_with_devices(image, devices, dir.path()).unwrap_or_else(|e| {
            panic!(
                "mounting {} with {} devices: {e} (see dmesg for the kernel's reason)",
                image.display(),
                devices.len()
            )
        });
        Mount { dir }
    }

    /// A read-only overlay of `lowers`, topmost first (`lowerdir=top:mid:bottom`).
    pub fn overlay(lowers: &[&Path]) -> Mount {
        require_root_and_kernel();
        let dir = tempdir();
        let lowerdir = lowers
            .iter()
            .map(|p| {
                let s = p.to_str().expect("utf-8 lower path");
                assert!(!s.contains([':', ',']), "lowerdir path needs escaping: {s}");
                s
            })
            .collect::<Vec<_>>()
            .join(":");
        let data = CString::new(format!("lowerdir={lowerdir}")).unwrap();
        let tgt = cstr(dir.path());
        // SAFETY: all pointers are valid NUL-terminated strings for the call.
        let rc = unsafe {
            libc::mount(
                c"overlay".as_ptr(),
                tgt.as_ptr(),
                c"overlay".as_ptr(),
                libc::MS_RDONLY,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount -t overlay -o {data:?}: {}",
            std::io::Error::last_os_error()
        );
        Mount { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// File type of a tree entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
    /// Listed by readdir but lstat fails (e.g. an overlayfs whiteout that
    /// leaks into a listing): always a difference worth reporting.
    Broken,
}

impl Kind {
    pub fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFCHR => Kind::Char,
            libc::S_IFBLK => Kind::Block,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            other => panic!("unknown file type {other:o}"),
        }
    }
}

/// Everything the tests compare about one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    /// Full st_mode (type and permission bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
    /// (major, minor) for device nodes.
    pub rdev: Option<(u32, u32)>,
    /// Symlink target.
    pub link: Option<Vec<u8>>,
    /// All xattrs (every namespace), sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// `sha256:<hex>` of a regular file's content.
    pub sha256: Option<String>,
    /// (st_dev, st_ino): only used to group hard links, never compared directly.
    pub ino: (u64, u64),
    pub nlink: u64,
}

/// Paths (absolute within the tree: "/" is the root, "/etc/passwd") to nodes.
pub type Tree = BTreeMap<PathBuf, Node>;

/// glibc's dev_t split (major/minor), so no unsafe libc call is needed.
pub fn dev_split(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// All xattrs of `path` itself (not following symlinks), sorted by name.
pub fn lxattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = cstr(path);
    // SAFETY: a NULL buffer with size 0 asks for the needed size.
    let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(
        n >= 0,
        "llistxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    let mut names = vec![0u8; n as usize];
    // SAFETY: buffer is valid for `names.len()` bytes.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", path.display());
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let cname = CString::new(name).unwrap();
        // SAFETY: size query as above.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
        assert!(
            len >= 0,
            "lgetxattr {} {}: {}",
            path.display(),
            String::from_utf8_lossy(name),
            std::io::Error::last_os_error()
        );
        let mut value = vec![0u8; len as usize];
        // SAFETY: buffer is valid for `value.len()` bytes.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        assert!(len >= 0, "lgetxattr {}", path.display());
        value.truncate(len as usize);
        out.push((name.to_vec(), value));
    }
    out.sort();
    out
}

/// Sets an xattr on `path` itself (not following symlinks).
pub fn lsetxattr(path: &Path, name: &str, value: &[u8]) {
    let c = cstr(path);
    let n = CString::new(name).unwrap();
    // SAFETY: valid pointers and lengths.
    let rc = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(
        rc,
        0,
        "lsetxattr {} {name}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn broken_node() -> Node {
    Node {
        kind: Kind::Broken,
        mode: 0,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: 0,
        mtime_nsec: 0,
        rdev: None,
        link: None,
        xattrs: vec![],
        sha256: None,
        ino: (u64::MAX, u64::MAX),
        nlink: 0,
    }
}

/// Walks `root` with lstat (never following symlinks) and records every entry.
pub fn snapshot_tree(root: &Path) -> Tree {
    let mut tree = Tree::new();
    walk(root, Path::new("/"), &mut tree);
    tree
}

fn walk(real: &Path, rel: &Path, tree: &mut Tree) {
    let md = match fs::symlink_metadata(real) {
        Ok(md) => md,
        Err(e) => {
            eprintln!("lstat {}: {e}", real.display());
            tree.insert(rel.to_path_buf(), broken_node());
            return;
        }
    };
    let kind = Kind::from_mode(md.mode());
    let sha256 = (kind == Kind::File).then(|| sha256_file(real));
    let link = (kind == Kind::Symlink).then(|| fs::read_link(real).expect("readlink").into_os_string().into_vec());
    let rdev = matches!(kind, Kind::Char | Kind::Block).then(|| dev_split(md.rdev()));
    tree.insert(
        rel.to_path_buf(),
        Node {
            kind,
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            size: md.size(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec(),
            rdev,
            link,
            xattrs: lxattrs(real),
            sha256,
            ino: (md.dev(), md.ino()),
            nlink: md.nlink(),
        },
    );
    if kind == Kind::Dir {
        for ent in fs::read_dir(real).unwrap_or_else(|e| panic!("readdir {}: {e}", real.display())) {
            let ent = ent.expect("readdir entry");
            walk(&ent.path(), &rel.join(ent.file_name()), tree);
        }
    }
}

/// What `compare_trees` may leave out.
#[derive(Clone, Debug, Default)]
pub struct CompareOpts {
    /// Paths whose mtime is not compared (e.g. parents a tar only implies,
    /// which tar creates "now").
    pub ignore_mtime: BTreeSet<PathBuf>,
    /// Skip the root directory's own metadata (mode/owner/mtime/xattrs).
    pub ignore_root: bool,
    /// Skip the mtime of every directory (overlay/merge cases where the
    /// reference tree's directory times are disturbed by the merge itself).
    pub ignore_dir_mtimes: bool,
}

impl CompareOpts {
    pub fn ignoring_mtime_of<I: IntoIterator<Item = S>, S: AsRef<Path>>(paths: I) -> Self {
        CompareOpts {
            ignore_mtime: paths.into_iter().map(|p| p.as_ref().to_path_buf()).collect(),
            ..Default::default()
        }
    }
}

fn show(b: &[u8]) -> String {
    if b.len() > 80 {
        format!("{:?}…({} bytes)", String::from_utf8_lossy(&b[..80]), b.len())
    } else {
        format!("{:?}", String::from_utf8_lossy(b))
    }
}

fn show_xattrs(x: &[(Vec<u8>, Vec<u8>)]) -> String {
    let parts: Vec<String> = x
        .iter()
        .map(|(n, v)| format!("{}={}", String::from_utf8_lossy(n), show(v)))
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Hard-link groups: for each non-directory path, the sorted set of paths
/// that share its inode.
fn link_groups(tree: &Tree) -> BTreeMap<PathBuf, Vec<PathBuf>> {
    let mut by_ino: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    for (p, n) in tree {
        if n.kind != Kind::Dir {
            by_ino.entry(n.ino).or_default().push(p.clone());
        }
    }
    let mut out = BTreeMap::new();
    for group in by_ino.into_values() {
        for p in &group {
            out.insert(p.clone(), group.clone());
        }
    }
    out
}

/// Compares two trees entry by entry and returns every difference, each
/// naming its path, so one failing run shows the whole picture.
pub fn compare_trees(expected: &Tree, actual: &Tree, opts: &CompareOpts) -> Result<(), String> {
    let mut diffs = Vec::new();
    let eg = link_groups(expected);
    let ag = link_groups(actual);
    for (path, e) in expected {
        let Some(a) = actual.get(path) else {
            diffs.push(format!("{}: missing (expected {:?})", path.display(), e.kind));
            continue;
        };
        let p = path.display();
        if e.kind != a.kind {
            diffs.push(format!("{p}: kind expected {:?}, got {:?}", e.kind, a.kind));
            continue;
        }
        let is_root = path == Path::new("/");
        if is_root && opts.ignore_root {
            continue;
        }
        if e.mode != a.mode {
            diffs.push(format!("{p}: mode expected {:o}, got {:o}", e.mode, a.mode));
        }
        if (e.uid, e.gid) != (a.uid, a.gid) {
            diffs.push(format!(
                "{p}: owner expected {}:{}, got {}:{}",
                e.uid, e.gid, a.uid, a.gid
            ));
        }
        // Directory sizes are filesystem-specific (ext4 blocks vs EROFS dirents).
        if e.kind != Kind::Dir && e.size != a.size {
            diffs.push(format!("{p}: size expected {}, got {}", e.size, a.size));
        }
        let skip_mtime = opts.ignore_mtime.contains(path) || (opts.ignore_dir_mtimes && e.kind == Kind::Dir);
        if !skip_mtime && (e.mtime, e.mtime_nsec) != (a.mtime, a.mtime_nsec) {
            diffs.push(format!(
                "{p}: mtime expected {}.{:09}, got {}.{:09}",
                e.mtime, e.mtime_nsec, a.mtime, a.mtime_nsec
            ));
        }
        if e.rdev != a.rdev {
            diffs.push(format!("{p}: rdev expected {:?}, got {:?}", e.rdev, a.rdev));
        }
        if e.link != a.link {
            diffs.push(format!(
                "{p}: symlink target expected {}, got {}",
                e.link.as_deref().map(show).unwrap_or_default(),
                a.link.as_deref().map(show).unwrap_or_default()
            ));
        }
        if e.xattrs != a.xattrs {
            diffs.push(format!(
                "{p}: xattrs expected {}, got {}",
                show_xattrs(&e.xattrs),
                show_xattrs(&a.xattrs)
            ));
        }
        if e.sha256 != a.sha256 {
            diffs.push(format!("{p}: content expected {:?}, got {:?}", e.sha256, a.sha256));
        }
        if e.kind != Kind::Dir {
            if e.nlink != a.nlink {
                diffs.push(format!("{p}: nlink expected {}, got {}", e.nlink, a.nlink));
            }
            if eg.get(path) != ag.get(path) {
                diffs.push(format!(
                    "{p}: hard-link group expected {:?}, got {:?}",
                    eg[path],
                    ag.get(path)
                ));
            }
        }
    }
    for (path, a) in actual {
        if !expected.contains_key(path) {
            diffs.push(format!("{}: unexpected {:?}", path.display(), a.kind));
        }
    }
    if diffs.is_empty() {
        return Ok(());
    }
    let mut msg = format!("{} difference(s):\n", diffs.len());
    // A broken converter can produce thousands; the first 200 tell the story.
    for d in diffs.iter().take(200) {
        let _ = writeln!(msg, "  {d}");
    }
    if diffs.len() > 200 {
        let _ = writeln!(msg, "  … and {} more", diffs.len() - 200);
    }
    Err(msg)
}

/// Panics with every difference if the trees differ.
pub fn assert_trees_eq(what: &str, expected: &Tree, actual: &Tree, opts: &CompareOpts) {
    if let Err(e) = compare_trees(expected, actual, opts) {
        panic!("{what}: {e}");
    }
}

pub fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: spawn: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Extracts `tar` into `dir` the way root's GNU tar does, as the reference.
///
/// umask 022 is forced so the parents tar creates implicitly get 0755, the
/// same mode the converter gives implicit parents.
pub fn gnu_extract(tar: &Path, dir: &Path) {
    fs::create_dir_all(dir).expect("mkdir extraction dir");
    run(
        Command::new("sh")
            .arg("-c")
            .arg(
                "umask 022; exec tar -xpf \"$1\" --xattrs --xattrs-include='*' \
                 --numeric-owner -C \"$2\"",
            )
            .arg("sh")
            .arg(tar)
            .arg(dir),
        &format!("tar -xpf {}", tar.display()),
    );
}

/// Like `gnu_extract` into a fresh dir whose root is 0755 0:0, then snapshot.
pub fn gnu_extract_tree(tar: &Path) -> (TestDir, Tree) {
    let dir = tempdir();
    set_mode(dir.path(), 0o755);
    gnu_extract(tar, dir.path());
    let tree = snapshot_tree(dir.path());
    (dir, tree)
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The bin dir of erofs-utils 1.9.4 (`scripts/lib/erofs-utils.sh`, which `scripts/test.sh`
/// builds from Debian's source package): the fsck.erofs that knows every feature the
/// writer uses (zstd, DEFLATE, big pclusters). Panics when it is not built.
pub fn erofs_utils_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/lib/erofs-utils.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("bindir")
            .output()
            .expect("run erofs-utils.sh");
        assert!(
            out.status.success(),
            "erofs-utils 1.9.4 is not built: run `sudo bash scripts/lib/erofs-utils.sh install` (scripts/test.sh does)"
        );
        PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim())
    })
    .clone()
}

/// Runs erofs-utils 1.9.4's `fsck.erofs` on the image and panics with its output on failure.
pub fn fsck(image: &Path) {
    run(
        Command::new(erofs_utils_bin().join("fsck.erofs")).arg(image),
        &format!("fsck.erofs {}", image.display()),
    );
}

/// GNU tar archive formats used to pack reference trees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TarFormat {
    Posix,
    Gnu,
    Ustar,
}

impl TarFormat {
    pub fn name(self) -> &'static str {
        match self {
            TarFormat::Posix => "posix",
            TarFormat::Gnu => "gnu",
            TarFormat::Ustar => "ustar",
        }
    }
}

/// Packs the contents of `src` into `out` with GNU tar, deterministically.
pub fn gnu_create(src: &Path, out: &Path, format: TarFormat) {
    run(
        Command::new("tar")
            .arg(format!("--format={}", format.name()))
            .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "--sort=name", "-C"])
            .arg(src)
            .arg("-cf")
            .arg(out)
            .arg("."),
        &format!("tar -cf {} ({})", out.display(), format.name()),
    );
}

/// Layer compressions the converter must accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// Compresses `tar` with the system tool; returns the path to feed the
/// converter (the tar itself for `None`).
pub fn compress(tar: &Path, c: Compression) -> PathBuf {
    let (tool, ext) = match c {
        Compression::None => return tar.to_path_buf(),
        Compression::Gzip => ("gzip", "gz"),
        Compression::Zstd => ("zstd", "zst"),
    };
    let mut out_name: OsString = tar.as_os_str().to_owned();
    out_name.push(".");
    out_name.push(ext);
    let out = PathBuf::from(out_name);
    let f = fs::File::create(&out).expect("create compressed file");
    let status = Command::new(tool)
        .args(["-c", "-q"])
        .arg(tar)
        .stdout(f)
        .status()
        .expect("spawn compressor");
    assert!(status.success(), "{tool} -c {}: {status}", tar.display());
    out
}

/// Runs an inline python3 script with `args` (as sys.argv[1:]).
pub fn python(script: &str, args: &[&OsStr]) -> Output {
    let mut child = Command::new("python3")
        .arg("-")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .expect("write script");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "python3 script failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Deterministic pseudo-random bytes (xorshift64*), so content is "random"
/// yet every run builds the same trees.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Sets mtime (and atime) of `path` itself, with nanoseconds.
pub fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let c = cstr(path);
    let ts = [
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: valid path and two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(
        rc,
        0,
        "utimensat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Creates a device node or fifo.
pub fn mknod(path: &Path, kind: Kind, major: u32, minor: u32) {
    let c = cstr(path);
    let t = match kind {
        Kind::Char => libc::S_IFCHR,
        Kind::Block => libc::S_IFBLK,
        Kind::Fifo => libc::S_IFIFO,
        other => panic!("mknod of {other:?}"),
    };
    let dev = libc::makedev(major, minor);
    // SAFETY: valid path; mode and dev are plain integers.
    let rc = unsafe { libc::mknod(c.as_ptr(), t | 0o644, dev) };
    assert_eq!(rc, 0, "mknod {}: {}", path.display(), std::io::Error::last_os_error());
}

/// Join a tree-absolute path ("/a/b") onto a real directory.
pub fn under(root: &Path, rel: &Path) -> PathBuf {
    root.join(rel.strip_prefix("/").unwrap_or(rel))
}

/// `true` if `dir` has no entries at all.
pub fn dir_entries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .expect("readdir")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Tree-absolute path from raw bytes (reader paths are bytes).
pub fn path_from_bytes(b: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(b))
}

/// The image as the project's own reader sees it, in the same shape as a
/// kernel mount's `snapshot_tree`, so the two can be compared directly.
/// Hard links are grouped by nid, which is what the kernel's st_ino reflects.
pub fn reader_tree(image: &Path) -> Tree {
    use erofs::reader::{FileKind, Image};
    let img = Image::open(image).unwrap_or_else(|e| panic!("reader: open {}: {e}", image.display()));
    let mut tree = Tree::new();
    img.walk(&mut |path: &[u8], e| {
        let kind = match e.kind {
            FileKind::File => Kind::File,
            FileKind::Dir => Kind::Dir,
            FileKind::Symlink => Kind::Symlink,
            FileKind::CharDev => Kind::Char,
            FileKind::BlockDev => Kind::Block,
            FileKind::Fifo => Kind::Fifo,
            FileKind::Socket => Kind::Socket,
        };
        let mut xattrs = img.xattrs(e)?;
        xattrs.sort();
        let sha256 = match kind {
            Kind::File => Some(sha256_hex(&img.read_all(e)?)),
            _ => None,
        };
        let link = match kind {
            Kind::Symlink => Some(img.read_link(e)?),
            _ => None,
        };
        let rdev = matches!(kind, Kind::Char | Kind::Block).then(|| img.rdev(e));
        let ino = &e.inode;
        tree.insert(
            path_from_bytes(path),
            Node {
                kind,
                mode: u32::from(ino.mode),
                uid: ino.uid,
                gid: ino.gid,
                size: ino.size,
                mtime: ino.mtime as i64,
                mtime_nsec: i64::from(ino.mtime_nsec),
                rdev,
                link,
                xattrs,
                sha256,
                ino: (0, e.nid),
                nlink: u64::from(ino.nlink),
            },
        );
        Ok(())
    })
    .unwrap_or_else(|e| panic!("reader: walk {}: {e}", image.display()));
    tree
}

/// Drops trusted.overlay.* xattrs from a reference tree: the converter must
/// not carry them over from a layer, since overlayfs would obey them
/// (redirects, opaque, metacopy); only OCI whiteouts may produce them.
pub fn strip_overlay_xattrs(tree: &mut Tree) {
    for n in tree.values_mut() {
        n.xattrs.retain(|(k, _)| !k.starts_with(b"trusted.overlay."));
    }
}

/// Full check of one converted image: fsck.erofs passes, the kernel mount
/// equals `expected`, and the project's reader agrees with the kernel.
pub fn check_image(what: &str, image: &Path, expected: &Tree, opts: &CompareOpts) {
    fsck(image);
    let mnt = Mount::erofs(image);
    let kernel = snapshot_tree(mnt.path());
    let mut failures = Vec::new();
    if let Err(e) = compare_trees(expected, &kernel, opts) {
        failures.push(format!("kernel mount vs GNU tar extraction: {e}"));
    }
    // The reader must agree with the kernel on everything, root included.
    let reader = reader_tree(image);
    if let Err(e) = compare_trees(&kernel, &reader, &CompareOpts::default()) {
        failures.push(format!("erofs::reader vs kernel mount: {e}"));
    }
    assert!(failures.is_empty(), "{what}:\n{}", failures.join("\n"));
}

/// The cached debootstrap bookworm minbase layer (`tests/fixtures/debian-minbase.sh`
/// builds it once): returns the `.tar.gz`; the plain `.tar` lies beside it.
pub fn debian_minbase() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debian-minbase.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run debian-minbase.sh");
    assert!(
        out.status.success(),
        "{} failed: {}\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let tgz = PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim());
    assert!(
        tgz.with_extension("").exists(),
        "the .tar is missing beside {}",
        tgz.display()
    );
    tgz
}

/// `qemu-img info` of a VMDK descriptor (qemu-utils), which must accept it as one: its
/// JSON report.
pub fn qemu_img_info(vmdk: &Path) -> serde_json::Value {
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(vmdk)
        .output()
        .expect("qemu-img (qemu-utils) must be installed");
    assert!(
        info.status.success(),
        "qemu-img info: {}",
        String::from_utf8_lossy(&info.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "vmdk", "{info}");
    info
}

/// `qemu-img convert -O raw VMDK RAW` (qemu-utils): the flat device a VMDK describes, as
/// one file.
pub fn qemu_img_raw(vmdk: &Path, raw: &Path) {
    let conv = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(vmdk)
        .arg(raw)
        .output()
        .expect("qemu-img (qemu-utils) must be installed");
    assert!(
        conv.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&conv.stderr)
    );
}
