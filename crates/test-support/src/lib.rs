//! Cleanup guards for tests that mount file systems or start processes.
//!
//! A test that mounts must leave nothing mounted behind, whether it passes, fails
//! or panics, and whatever the code under test did or did not clean up itself (a
//! store's shutdown, a daemon's SIGTERM handler). The guards here do that from
//! `Drop`, which also runs while a failed assertion unwinds:
//!
//! - [`TestDir`]: a temporary directory. On drop, everything mounted at or under it
//!   is lazily unmounted (deepest first, stacked mounts one by one, as read from
//!   `/proc/self/mountinfo`), then the directory is removed. If a mount cannot be
//!   detached, the directory is kept (removing it would recurse into the mount)
//!   and a warning names it.
//! - [`Unmount`]: the same for one mount point the test made itself.
//! - [`ChildGuard`]: a child process, stopped on drop (SIGTERM, then SIGKILL).
//!
//! [`prometheus`] parses the daemons' `/metrics` for the tests that scrape them, and
//! [`registry::Registry`] is a real docker-registry on loopback for the tests that pull or push.
//!
//! Put every mount a test makes (and every root a daemon under test mounts in)
//! under a [`TestDir`], declared before the things that use it so that it is
//! dropped after them.

pub mod prometheus;
pub mod registry;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted (unescaped).
    pub point: PathBuf,
    /// The file system type (`erofs`, `overlay`, `fuse.dedupd`, ...).
    pub fstype: String,
    /// The mount source (unescaped).
    pub source: String,
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_line(l: &str) -> Option<MountEntry> {
    let f: Vec<&str> = l.split(' ').collect();
    let sep = f.iter().position(|x| *x == "-")?;
    Some(MountEntry {
        point: PathBuf::from(unescape(f.get(4)?)),
        fstype: f.get(sep + 1)?.to_string(),
        source: unescape(f.get(sep + 2)?),
    })
}

/// The mounts of this mount namespace, in mount order (empty if mountinfo cannot be read).
pub fn mountinfo() -> Vec<MountEntry> {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|s| s.lines().filter_map(parse_line).collect())
        .unwrap_or_default()
}

fn canonical(dir: &Path) -> PathBuf {
    fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// The mounts at `dir` or below it, in mount order (a mount point appears once per
/// mount stacked on it).
pub fn mounts_under(dir: &Path) -> Vec<MountEntry> {
    let dir = canonical(dir);
    mountinfo().into_iter().filter(|m| m.point.starts_with(&dir)).collect()
}

/// Whether something is mounted exactly at `path`.
pub fn is_mounted(path: &Path) -> bool {
    let path = canonical(path);
    mountinfo().iter().any(|m| m.point == path)
}

/// Lazily detaches the topmost mount at `target` (MNT_DETACH: a busy or dead mount,
/// e.g. of a killed FUSE daemon, goes too).
pub fn unmount(target: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(target.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated path; umount2 has no other preconditions.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A mount spec performed as containerd performs it (a recursive bind, read-only with
/// `ro`; or overlayfs with its options) at `target`, which is created. Everything at the
/// target is unmounted on drop.
pub struct SpecMount(PathBuf);

impl SpecMount {
    /// Mounts `kind` (`bind`, `rbind` or `overlay`) from `source` with `options`.
    pub fn new(kind: &str, source: &str, options: &[String], target: &Path) -> SpecMount {
        use std::os::unix::ffi::OsStrExt;
        fs::create_dir_all(target).unwrap();
        let c = |b: &[u8]| std::ffi::CString::new(b).unwrap();
        let tgt = c(target.as_os_str().as_bytes());
        let check = |rc: libc::c_int, what: &str| {
            assert_eq!(rc, 0, "{what} at {}: {}", target.display(), io::Error::last_os_error());
        };
        match kind {
            "bind" | "rbind" => {
                let src = c(source.as_bytes());
                // SAFETY: valid NUL-terminated strings; null type and data are allowed for binds.
                let rc = unsafe {
                    libc::mount(
                        src.as_ptr(),
                        tgt.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    )
                };
                check(rc, "bind mount");
                if options.iter().any(|o| o == "ro") {
                    let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
                    // SAFETY: as above.
                    let rc = unsafe {
                        libc::mount(
                            std::ptr::null(),
                            tgt.as_ptr(),
                            std::ptr::null(),
                            flags,
                            std::ptr::null(),
                        )
                    };
                    check(rc, "read-only remount");
                }
            }
            "overlay" => {
                let data = c(options.join(",").as_bytes());
                // SAFETY: valid NUL-terminated strings.
                let rc = unsafe {
                    libc::mount(
                        c"overlay".as_ptr(),
                        tgt.as_ptr(),
                        c"overlay".as_ptr(),
                        0,
                        data.as_ptr().cast(),
                    )
                };
                check(rc, "overlay mount");
            }
            other => panic!("unexpected mount type {other}"),
        }
        SpecMount(target.to_path_buf())
    }
}

impl Drop for SpecMount {
    fn drop(&mut self) {
        // Everything at the target (an rbind brings the mounts below its source along).
        unmount_under(&self.0);
    }
}

/// Lazily unmounts everything mounted at or under `dir`: deepest mount points first,
/// the most recent of stacked mounts first, again until nothing is left or a pass
/// changes nothing. Returns what is still mounted (normally nothing).
pub fn unmount_under(dir: &Path) -> Vec<MountEntry> {
    let mut left = mounts_under(dir);
    for _ in 0..16 {
        if left.is_empty() {
            break;
        }
        let mut order: Vec<(usize, &MountEntry)> = left.iter().enumerate().collect();
        order.sort_by(|a, b| {
            let depth = |m: &MountEntry| m.point.components().count();
            depth(b.1).cmp(&depth(a.1)).then(b.0.cmp(&a.0))
        });
        for (_, m) in order {
            let _ = unmount(&m.point);
        }
        let now = mounts_under(dir);
        if now == left {
            break;
        }
        left = now;
    }
    left
}

/// Unmounts what is under `dir`, then removes it; keeps it (with a warning) when a
/// mount could not be detached, as removing it would delete files through the mount.
fn unmount_and_remove(dir: &Path, keep: bool) {
    let left = unmount_under(dir);
    if !left.is_empty() {
        let points: Vec<_> = left
            .iter()
            .map(|m| format!("{} ({})", m.point.display(), m.fstype))
            .collect();
        eprintln!(
            "test-support: could not unmount under {}, keeping it: {}",
            dir.display(),
            points.join(", ")
        );
        return;
    }
    if keep {
        return;
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            eprintln!("test-support: removing {}: {e}", dir.display());
        }
    }
}

/// A temporary directory that unmounts everything under it and is removed on drop
/// (on success, failure and panic alike).
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
    keep: bool,
}

impl TestDir {
    /// A fresh directory `PREFIX<random>` in the system temp dir (`$TMPDIR` or `/tmp`).
    pub fn new(prefix: &str) -> TestDir {
        TestDir::new_in(&std::env::temp_dir(), prefix)
    }

    /// A fresh directory `PREFIX<random>` in `base` (created if missing).
    pub fn new_in(base: &Path, prefix: &str) -> TestDir {
        fs::create_dir_all(base).unwrap_or_else(|e| panic!("creating {}: {e}", base.display()));
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(base)
            .unwrap_or_else(|e| panic!("creating a temporary directory in {}: {e}", base.display()))
            .keep();
        TestDir::adopt(&dir)
    }

    /// Takes charge of `path` (created if missing): unmounted under and removed on drop.
    pub fn adopt(path: &Path) -> TestDir {
        fs::create_dir_all(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TestDir {
            path: canonical(path),
            keep: false,
        }
    }

    /// The directory (absolute, canonical).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(p)`.
    pub fn join<P: AsRef<Path>>(&self, p: P) -> PathBuf {
        self.path.join(p)
    }

    /// Leaves the directory (its files) in place on drop, e.g. for a post-mortem of a
    /// failed test; its mounts are still removed.
    pub fn keep_files(&mut self) {
        self.keep = true;
    }

    /// The mounts under the directory now.
    pub fn mounts(&self) -> Vec<MountEntry> {
        mounts_under(&self.path)
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        unmount_and_remove(&self.path, self.keep);
    }
}

/// A mount point the test made: on drop, what is mounted at or under it is lazily
/// unmounted (the directory stays).
#[derive(Debug)]
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let left = unmount_under(&self.0);
        if !left.is_empty() {
            eprintln!("test-support: could not unmount {}: {left:?}", self.0.display());
        }
    }
}

/// A child process the test started; stopped on drop: SIGTERM, up to `grace` for it
/// to exit, then SIGKILL; always reaped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    grace: Duration,
}

impl ChildGuard {
    /// Guards `child`, with 10 s of grace after SIGTERM.
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard {
            child: Some(child),
            grace: Duration::from_secs(10),
        }
    }

    /// How long it may take to exit after SIGTERM before it is killed.
    pub fn with_grace(mut self, grace: Duration) -> ChildGuard {
        self.grace = grace;
        self
    }

    /// The process id, if it has not been stopped yet.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The child, if it has not been stopped yet.
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Sends SIGTERM and waits for the exit (`grace`, then SIGKILL). `None` if it had
    /// been stopped already or needed the SIGKILL.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        // SAFETY: kill(2) of our own, not yet reaped, child.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < self.grace {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// SIGKILL (a crash) and reap.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = c.kill();
        c.wait().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// A binary of another workspace crate (`dedupd`, `registry-proxy`), beside the
/// running test's own `target/<profile>/deps` directory; cargo builds only the
/// package's own binaries for its tests, so the workspace must have been built.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace first (cargo build --release --workspace)",
        p.display()
    );
    p
}

/// Pseudo-random bytes (xorshift), the same for the same seed, distinct per seed:
/// file contents that neither compress nor deduplicate by accident.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_unescapes_mountinfo() {
        let l = r"36 35 98:0 /mnt1 /tmp/a\040b rw,noatime master:1 - erofs /img\134x ro";
        let m = parse_line(l).unwrap();
        assert_eq!(m.point, PathBuf::from("/tmp/a b"));
        assert_eq!(m.fstype, "erofs");
        assert_eq!(m.source, r"/img\x");
        let l = "36 35 0:50 / /tmp/x rw - fuse.dedupd dedupd rw,user_id=0";
        assert_eq!(parse_line(l).unwrap().fstype, "fuse.dedupd");
        assert!(parse_line("garbage").is_none());
    }

    #[test]
    fn removes_the_directory() {
        let d = TestDir::new("test-support-");
        fs::create_dir_all(d.join("a/b")).unwrap();
        fs::write(d.join("a/b/f"), "x").unwrap();
        let p = d.path().to_path_buf();
        assert!(d.mounts().is_empty());
        drop(d);
        assert!(!p.exists());
    }

    #[test]
    fn prefix_is_compared_by_components() {
        let d = TestDir::new("test-support-");
        let sibling = PathBuf::from(format!("{}x", d.path().display()));
        assert!(!sibling.starts_with(d.path()));
    }

    /// As root: nested and stacked mounts, then a panic, leave nothing behind.
    #[test]
    fn unmounts_nested_and_stacked_mounts_even_on_panic() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: mounting is not possible, only the parsing is tested");
            return;
        }
        let mount_tmpfs = |p: &Path| {
            fs::create_dir_all(p).unwrap();
            let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
            // SAFETY: valid NUL-terminated strings.
            let rc = unsafe { libc::mount(c"tmpfs".as_ptr(), c.as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()) };
            assert_eq!(rc, 0, "mount tmpfs {}: {}", p.display(), io::Error::last_os_error());
        };
        let path = std::sync::Mutex::new(PathBuf::new());
        let r = std::panic::catch_unwind(|| {
            let d = TestDir::new("test-support-");
            *path.lock().unwrap() = d.path().to_path_buf();
            mount_tmpfs(&d.join("m"));
            mount_tmpfs(&d.join("m")); // stacked
            mount_tmpfs(&d.join("m/inner/deeper"));
            mount_tmpfs(d.path()); // on the directory itself
            mount_tmpfs(&d.join("n"));
            assert_eq!(d.mounts().len(), 5);
            panic!("a failing test");
        });
        assert!(r.is_err());
        let p = path.into_inner().unwrap();
        assert!(mounts_under(&p).is_empty(), "{:?}", mounts_under(&p));
        assert!(!p.exists());
    }

    #[test]
    fn child_guard_stops_the_child() {
        let c = std::process::Command::new("sleep").arg("600").spawn().unwrap();
        let pid = c.id();
        drop(ChildGuard::new(c));
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
