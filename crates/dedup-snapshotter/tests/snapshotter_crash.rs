//! Crash safety of the real daemon: `dedup-snapshotter serve` is killed with SIGKILL in the middle of a Commit's
//! EROFS conversion and after completed commits, then started again on the same root; the store must come back
//! consistent (the interrupted snapshot still active with its upper dir intact, no half-written image; every
//! committed layer mounted again; new work possible).
//!
//! Driven over gRPC with containerd-client, exactly as containerd's proxy plugin drives it.  Needs root (the
//! daemon mounts EROFS images, the test bind-mounts views): fails, never skips, without it.
//!
//!     cargo test --release -p dedup-snapshotter --test snapshotter_crash -- --nocapture

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use containerd_client::services::v1::snapshots as pb;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

const SNAPSHOTTER: &str = "dedup";

fn assert_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the crash tests run the daemon, which mounts EROFS images, and bind-mount views: run them as root"
    );
    let fss = fs::read_to_string("/proc/filesystems").expect("read /proc/filesystems");
    for want in ["erofs", "overlay"] {
        assert!(
            fss.lines().any(|l| l.split_whitespace().last() == Some(want)),
            "the kernel lacks `{want}` (modprobe {want})"
        );
    }
}

/// One line of /proc/self/mountinfo: (mount point, fs type, source), in mount order.
fn mountinfo() -> Vec<(String, String, String)> {
    let unescape = |p: &str| {
        p.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
    };
    fs::read_to_string("/proc/self/mountinfo")
        .expect("read mountinfo")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some((
                unescape(f.get(4)?),
                f.get(sep + 1)?.to_string(),
                unescape(f.get(sep + 2)?),
            ))
        })
        .collect()
}

fn umount_lazy(p: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; umount2 has no other preconditions.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A daemon on a temporary root.  Drop kills it; then the directory's guard unmounts everything under it (deepest
/// first) and removes it, also when a test panics.
struct Daemon {
    dir: test_support::TestDir,
    root: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// Extra `serve` flags (e.g. `--dedup`).
    flags: Vec<String>,
}

impl Daemon {
    fn new() -> Daemon {
        assert_root();
        let dir = test_support::TestDir::new_in(Path::new("/var/tmp"), "crash.");
        Daemon {
            root: dir.join("root"),
            socket: dir.join("s.sock"),
            dir,
            child: None,
            starts: 0,
            flags: Vec::new(),
        }
    }

    fn with_flags(flags: &[&str]) -> Daemon {
        let mut d = Daemon::new();
        d.flags = flags.iter().map(|s| s.to_string()).collect();
        d
    }

    fn log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    /// Starts the daemon and waits until its socket accepts connections (a stale socket of a killed daemon refuses
    /// them until the new one replaces it).
    fn start(&mut self) {
        assert!(self.child.is_none(), "the daemon runs already");
        self.starts += 1;
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("open log");
        writeln!(log, "=== start {} ===", self.starts).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
            .arg("serve")
            .arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket)
            .args(&self.flags)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn dedup-snapshotter serve");
        self.child = Some(child);
        let t = Instant::now();
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("the daemon exited with {st} before answering:\n{}", self.log_tail());
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the daemon did not answer within 30 s:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        let mut c = self.child.take().expect("the daemon runs");
        c.kill().expect("kill -9 the daemon");
        let st = c.wait().expect("wait for the daemon");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGKILL),
            "{st}"
        );
    }

    /// SIGTERM and wait: the daemon must stop cleanly.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            loop {
                if let Some(st) = c.try_wait().unwrap() {
                    assert!(st.success(), "the daemon stopped with {st}:\n{}", self.log_tail());
                    return;
                }
                if t.elapsed() > Duration::from_secs(20) {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("the daemon ignored SIGTERM for 20 s:\n{}", self.log_tail());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn log_tail(&self) -> String {
        let s = fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    async fn client(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(
            containerd_client::connect(&self.socket)
                .await
                .expect("connect to the daemon"),
        )
    }

    fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn mounts_under(&self) -> Vec<String> {
        test_support::mounts_under(self.dir.path())
            .into_iter()
            .map(|m| m.point.display().to_string())
            .collect()
    }

    /// The EROFS mounts at ROOT/m/<id>: mount point -> sources (one per stacked mount).
    fn erofs_mounts(&self) -> BTreeMap<String, Vec<String>> {
        let prefix = format!("{}/", self.root.join("m").display());
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (p, ty, src) in mountinfo() {
            if p.starts_with(&prefix) {
                assert_eq!(ty, "erofs", "{p} is a {ty} mount of {src}");
                out.entry(p).or_default().push(src);
            }
        }
        out
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- daemon log ({}) -----\n{}", self.log().display(), self.log_tail());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // `self.dir` goes next: it unmounts what is left and removes the directory.
    }
}

/// A read-only bind mount made by the test, removed on drop.
struct BindMount(PathBuf);

impl BindMount {
    fn new(source: &str, target: &Path, options: &[String]) -> BindMount {
        fs::create_dir_all(target).unwrap();
        let ro = options.iter().any(|o| o == "ro");
        assert!(ro, "a view's bind mount must be read-only: {options:?}");
        let out = Command::new("mount")
            .args(["--rbind", "-o", "ro"])
            .arg(source)
            .arg(target)
            .output()
            .expect("spawn mount");
        assert!(out.status.success(), "mount --rbind {source}: {out:?}");
        // A bind mount only becomes read-only with a remount.
        let out = Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(target)
            .output()
            .expect("spawn mount");
        assert!(out.status.success(), "remount ro {}: {out:?}", target.display());
        BindMount(target.to_path_buf())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        test_support::unmount_under(&self.0);
    }
}

/// An overlay mounted by the test from a snapshot's mounts, removed on drop.
struct OverlayMount(PathBuf);

impl OverlayMount {
    fn new(m: &containerd_client::types::Mount, target: &Path) -> OverlayMount {
        assert_eq!(m.r#type, "overlay", "{m:?}");
        fs::create_dir_all(target).unwrap();
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &m.options.join(",")])
            .arg(target)
            .output()
            .expect("spawn mount");
        assert!(out.status.success(), "mount overlay {m:?}: {out:?}");
        OverlayMount(target.to_path_buf())
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        test_support::unmount_under(&self.0);
    }
}

/// A deterministic pseudo-random byte stream (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Fills `dir` with about `total` bytes in many files of varied sizes across nested directories, plus symlinks,
/// empty files, hard links, odd modes and an empty directory.  Returns the number of regular files written.
fn fill_tree(dir: &Path, total: u64, seed: u64) -> usize {
    let mut rng = Rng(seed | 1);
    let mut written = 0u64;
    let mut n = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    while written < total {
        let d = dir.join(format!("d{:02}/s{}", n % 40, (n / 40) % 4));
        fs::create_dir_all(&d).unwrap();
        // Mostly 4 KiB .. 256 KiB, some tiny, some a couple of MiB.
        let size = match rng.next() % 20 {
            0 => rng.next() % 100,
            1 => (1 << 20) + rng.next() % (2 << 20),
            _ => 4096 + rng.next() % (256 << 10),
        } as usize;
        let p = d.join(format!("f{n:05}.bin"));
        let mut f = fs::File::create(&p).unwrap();
        let mut left = size;
        while left > 0 {
            let k = left.min(buf.len());
            rng.fill(&mut buf[..k]);
            f.write_all(&buf[..k]).unwrap();
            left -= k;
        }
        if n.is_multiple_of(7) {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o750)).unwrap();
        }
        written += size as u64;
        n += 1;
    }
    fs::create_dir_all(dir.join("empty-dir")).unwrap();
    fs::write(dir.join("empty-file"), b"").unwrap();
    std::os::unix::fs::symlink("d00/s0/f00000.bin", dir.join("link-to-first")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/dangling", dir.join("dangling")).unwrap();
    fs::hard_link(dir.join("d01/s0/f00001.bin"), dir.join("hardlink")).unwrap();
    n
}

/// The tree under `dir`: relative path -> "type mode uid:gid size sha256|target".
fn tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(base: &Path, d: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(d)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", d.display()))
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            let ft = md.file_type();
            let head = format!("{:o} {}:{}", md.mode() & 0o7777, md.uid(), md.gid());
            let v = if ft.is_dir() {
                walk(base, &p, out);
                format!("dir {head}")
            } else if ft.is_symlink() {
                format!("link {head} {}", fs::read_link(&p).unwrap().display())
            } else if ft.is_file() {
                let mut h = Sha256::new();
                let mut f = fs::File::open(&p).unwrap();
                std::io::copy(&mut f, &mut h).unwrap();
                format!("file {head} {} {}", md.len(), hex::encode(h.finalize()))
            } else if ft.is_char_device() {
                format!("chr {head} {}", md.rdev())
            } else {
                format!("other {head}")
            };
            out.insert(rel, v);
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn assert_same_tree(what: &str, got: &BTreeMap<String, String>, want: &BTreeMap<String, String>) {
    if got == want {
        return;
    }
    let mut diffs = Vec::new();
    for k in want.keys().chain(got.keys()).collect::<std::collections::BTreeSet<_>>() {
        if got.get(k) != want.get(k) {
            diffs.push(format!("{k}:\n  got:  {:?}\n  want: {:?}", got.get(k), want.get(k)));
        }
    }
    panic!(
        "{what}: {} paths differ ({} vs {} entries); the first 20:\n{}",
        diffs.len(),
        got.len(),
        want.len(),
        diffs.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

async fn prepare(c: &mut SnapshotsClient<Channel>, key: &str, parent: &str) -> Vec<containerd_client::types::Mount> {
    c.prepare(pb::PrepareSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("Prepare {key} (parent {parent:?}): {e}"))
    .into_inner()
    .mounts
}

async fn view(c: &mut SnapshotsClient<Channel>, key: &str, parent: &str) -> Vec<containerd_client::types::Mount> {
    c.view(pb::ViewSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("View {key} of {parent}: {e}"))
    .into_inner()
    .mounts
}

fn commit_request(name: &str, key: &str) -> pb::CommitSnapshotRequest {
    pb::CommitSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::new(),
    }
}

async fn stat(c: &mut SnapshotsClient<Channel>, key: &str) -> containerd_client::services::v1::snapshots::Info {
    c.stat(pb::StatSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        key: key.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("Stat {key}: {e}"))
    .into_inner()
    .info
    .unwrap_or_else(|| panic!("Stat {key} without info"))
}

async fn remove(c: &mut SnapshotsClient<Channel>, key: &str) {
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        key: key.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("Remove {key}: {e}"));
}

/// A Prepare without parent answers one bind mount of ROOT/snapshots/<id>/fs: returns (fs dir, id).
fn bind_fs_dir(d: &Daemon, mounts: &[containerd_client::types::Mount]) -> (PathBuf, u64) {
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(mounts[0].r#type, "bind", "{mounts:?}");
    let fs_dir = PathBuf::from(&mounts[0].source);
    let id_dir = fs_dir.parent().unwrap();
    assert!(
        fs_dir.file_name() == Some("fs".as_ref()) && id_dir.parent() == Some(d.root.join("snapshots").as_path()),
        "the bind source {} is not ROOT/snapshots/<id>/fs",
        fs_dir.display()
    );
    let id = id_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .parse()
        .expect("numeric id");
    (fs_dir, id)
}

/// An overlay mount of an active snapshot: its upperdir and lowerdirs.
fn overlay_dirs(m: &[containerd_client::types::Mount]) -> (PathBuf, Vec<PathBuf>) {
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0].r#type, "overlay", "{m:?}");
    let upper = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .expect("upperdir");
    let lowers = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .expect("lowerdir")
        .split(':')
        .map(PathBuf::from)
        .collect();
    (PathBuf::from(upper), lowers)
}

/// The files in the store's `staging/`, where a Commit's conversion writes before
/// its layer goes into the snapshot's directory.
fn temp_files(d: &Daemon) -> Vec<String> {
    fs::read_dir(d.root.join("staging"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn fsck(img: &Path) {
    let out = Command::new("fsck.erofs")
        .arg(img)
        .output()
        .expect("spawn fsck.erofs (apt-get install erofs-utils)");
    assert!(out.status.success(), "fsck.erofs {}: {out:?}", img.display());
}

/// Kill -9 while Commit converts ~300 MB in ~1,400 files: after a restart the snapshot is still active with its
/// upper dir intact and no image or temp file; then Commit succeeds and a view shows the same tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_commit_conversion() {
    let mut d = Daemon::new();
    d.start();
    let mut c = d.client().await;

    let mounts = prepare(&mut c, "active-1", "").await;
    let (fs_dir, id) = bind_fs_dir(&d, &mounts);
    let sdir = d.snapshot_dir(id);
    let t = Instant::now();
    let files = fill_tree(&fs_dir, 300 << 20, 0x5eed);
    let before = tree(&fs_dir);
    eprintln!(
        "crash: wrote {files} files ({} entries, ~300 MB) in {:.1}s",
        before.len(),
        t.elapsed().as_secs_f64()
    );

    // Commit in a task; kill once the conversion's temp file holds some data.
    let commit = {
        let mut c = c.clone();
        tokio::spawn(async move { c.commit(commit_request("committed-1", "active-1")).await })
    };
    let t = Instant::now();
    let tmp = loop {
        let tmp = temp_files(&d);
        if let Some(name) = tmp.first() {
            let len = fs::metadata(d.root.join("staging").join(name))
                .map(|m| m.len())
                .unwrap_or(0);
            if len >= 8 << 20 {
                break name.clone();
            }
        }
        assert!(
            !sdir.join("layer.erofs").exists() && !commit.is_finished(),
            "the conversion finished before the test could kill it ({:.2}s): make the tree larger",
            t.elapsed().as_secs_f64()
        );
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no conversion temp file in {} after 60 s",
            sdir.display()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    d.kill9();
    let tmp_len = fs::metadata(d.root.join("staging").join(&tmp))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!(
        "crash: killed {:.2}s into the commit with {tmp} at {tmp_len} bytes",
        t.elapsed().as_secs_f64()
    );
    assert!(
        !sdir.join("layer.erofs").exists(),
        "layer.erofs appeared before the kill landed: the kill came too late to test an interrupted conversion"
    );
    assert_commit_failed(commit).await;
    drop(c);

    d.start();
    let mut c = d.client().await;
    let info = stat(&mut c, "active-1").await;
    assert_eq!(
        info.kind,
        pb::Kind::Active as i32,
        "the interrupted snapshot is not active any more: {info:?}"
    );
    let missing = c
        .stat(pb::StatSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: "committed-1".into(),
        })
        .await;
    assert_eq!(
        missing.as_ref().map_err(|e| e.code()).err(),
        Some(tonic::Code::NotFound),
        "the interrupted commit's name exists: {missing:?}"
    );
    assert!(
        !sdir.join("layer.erofs").exists(),
        "a layer.erofs is left in {}",
        sdir.display()
    );
    assert_eq!(
        temp_files(&d),
        Vec::<String>::new(),
        "temp files left in {}",
        d.root.join("staging").display()
    );
    assert!(
        d.erofs_mounts().is_empty(),
        "EROFS mounts with no committed snapshot: {:?}",
        d.erofs_mounts()
    );
    // The same mounts as before the crash.
    let again = c
        .mounts(pb::MountsRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: "active-1".into(),
        })
        .await
        .expect("Mounts active-1")
        .into_inner()
        .mounts;
    assert_eq!(again, mounts, "the active snapshot's mounts changed across the restart");
    assert_same_tree("fs/ after the restart", &tree(&fs_dir), &before);

    // Commit again: it must succeed this time, and a view shows the same tree.
    let t = Instant::now();
    c.commit(commit_request("committed-1", "active-1"))
        .await
        .expect("Commit after the restart");
    eprintln!("crash: commit after restart in {:.2}s", t.elapsed().as_secs_f64());
    let info = stat(&mut c, "committed-1").await;
    assert_eq!(info.kind, pb::Kind::Committed as i32, "{info:?}");
    assert!(sdir.join("layer.erofs").is_file());
    assert_eq!(temp_files(&d), Vec::<String>::new());
    fsck(&sdir.join("layer.erofs"));
    let vm = view(&mut c, "view-1", "committed-1").await;
    assert_eq!(vm.len(), 1, "{vm:?}");
    assert_eq!(vm[0].r#type, "bind", "{vm:?}");
    {
        let mnt = BindMount::new(&vm[0].source, &d.dir.join("view"), &vm[0].options);
        let got = tree(&mnt.0);
        // EROFS keeps every attribute the test looks at except the hard link's identity, which `tree` ignores.
        assert_same_tree("the view of the committed snapshot", &got, &before);
        assert!(
            fs::write(mnt.0.join("probe"), b"x").is_err(),
            "the view's mount is writable"
        );
    }
    remove(&mut c, "view-1").await;
    drop(c);
    d.stop();
    assert_eq!(d.mounts_under(), Vec::<String>::new(), "mounts left after a clean stop");
}

/// Kill -9 after completed commits: a restart mounts every committed layer again (also one whose mount was lost,
/// as after a reboot), does not stack a second mount on one still there, and a child Prepare over the chain works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_after_commit_remounts_layers() {
    let mut d = Daemon::new();
    d.start();
    let mut c = d.client().await;

    // Layer 1: a base; layer 2 on top modifies, adds and deletes.
    let m1 = prepare(&mut c, "l1", "").await;
    let (fs1, id1) = bind_fs_dir(&d, &m1);
    fill_tree(&fs1, 8 << 20, 1);
    fs::write(fs1.join("base.txt"), "base\n").unwrap();
    fs::write(fs1.join("gone.txt"), "gone\n").unwrap();
    c.commit(commit_request("c1", "l1")).await.expect("Commit c1");

    let m2 = prepare(&mut c, "l2", "c1").await;
    let (up2, lowers2) = overlay_dirs(&m2);
    assert_eq!(lowers2, vec![d.root.join("m").join(id1.to_string())]);
    {
        let mnt = OverlayMount::new(&m2[0], &d.dir.join("l2"));
        fs::write(mnt.0.join("top.txt"), "top\n").unwrap();
        fs::write(mnt.0.join("base.txt"), "base v2\n").unwrap();
        fs::remove_file(mnt.0.join("gone.txt")).unwrap();
        fs::create_dir(mnt.0.join("newdir")).unwrap();
    }
    assert!(up2.join("top.txt").is_file());
    c.commit(commit_request("c2", "l2")).await.expect("Commit c2");
    let id2: u64 = up2
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .parse()
        .unwrap();

    // What a container on c2 sees, before the crash.
    let m3 = prepare(&mut c, "probe", "c2").await;
    let want = {
        let mnt = OverlayMount::new(&m3[0], &d.dir.join("probe"));
        tree(&mnt.0)
    };
    remove(&mut c, "probe").await;
    let mounted = d.erofs_mounts();
    let mp1 = d.root.join("m").join(id1.to_string()).to_string_lossy().into_owned();
    let mp2 = d.root.join("m").join(id2.to_string()).to_string_lossy().into_owned();
    assert_eq!(
        mounted.keys().cloned().collect::<Vec<_>>(),
        vec![mp1.clone(), mp2.clone()],
        "{mounted:?}"
    );
    drop(c);

    // Crash; then lose one layer's mount (as a reboot would lose all of them) and restart.
    d.kill9();
    umount_lazy(Path::new(&mp1)).expect("unmount layer 1");
    assert!(!d.erofs_mounts().contains_key(&mp1));
    d.start();
    let mut c = d.client().await;

    let mounted = d.erofs_mounts();
    for (mp, id) in [(&mp1, id1), (&mp2, id2)] {
        let src = mounted
            .get(mp)
            .unwrap_or_else(|| panic!("committed layer {id} is not mounted at {mp} after the restart: {mounted:?}"));
        assert_eq!(
            src,
            &vec![d.snapshot_dir(id).join("layer.erofs").to_string_lossy().into_owned()],
            "{mp} after the restart (one EROFS mount of the snapshot's layer.erofs)"
        );
        fsck(&d.snapshot_dir(id).join("layer.erofs"));
    }
    assert_eq!(mounted.len(), 2, "{mounted:?}");
    for (key, kind) in [("c1", pb::Kind::Committed), ("c2", pb::Kind::Committed)] {
        let info = stat(&mut c, key).await;
        assert_eq!(info.kind, kind as i32, "{info:?}");
    }

    // A child Prepare over the chain sees the same tree and is writable.
    let m4 = prepare(&mut c, "child", "c2").await;
    let (_, lowers4) = overlay_dirs(&m4);
    assert_eq!(lowers4, vec![PathBuf::from(&mp2), PathBuf::from(&mp1)]);
    {
        let mnt = OverlayMount::new(&m4[0], &d.dir.join("child"));
        assert_same_tree("a child of c2 after the restart", &tree(&mnt.0), &want);
        assert_eq!(fs::read_to_string(mnt.0.join("base.txt")).unwrap(), "base v2\n");
        assert!(!mnt.0.join("gone.txt").exists());
        fs::write(mnt.0.join("after.txt"), "after\n").unwrap();
    }
    c.commit(commit_request("c3", "child"))
        .await
        .expect("Commit child after the restart");
    assert_eq!(d.erofs_mounts().len(), 3);
    drop(c);
    d.stop();
}

/// The Commit call in flight when the daemon was killed returns, with an error.
async fn assert_commit_failed<T: std::fmt::Debug>(commit: tokio::task::JoinHandle<Result<T, tonic::Status>>) {
    let res = tokio::time::timeout(Duration::from_secs(10), commit)
        .await
        .expect("the Commit call did not return after the daemon died")
        .expect("commit task");
    assert!(res.is_err(), "Commit succeeded although the daemon was killed: {res:?}");
}

fn blob_files(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(d.root.join("blobs"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// With dedup: kill -9 while Commit writes a layer's new blob, the layer also naming an earlier layer's blob. After
/// the restart the half-written blob is gone (no record names it), the earlier blob and its layer are intact, the
/// snapshot is still active, and Commit then succeeds; removing everything leaves no blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_while_a_dedup_commit_writes_its_blob() {
    let mut d = Daemon::with_flags(&["--dedup"]);
    d.start();
    let mut c = d.client().await;

    // Layer a: 20 MB, committed.
    let mounts = prepare(&mut c, "a-active", "").await;
    let (a_fs, _) = bind_fs_dir(&d, &mounts);
    fill_tree(&a_fs, 20 << 20, 0xa11ce);
    let a_tree = tree(&a_fs);
    c.commit(commit_request("a", "a-active")).await.expect("Commit a");
    let a_blobs = blob_files(&d);
    assert_eq!(a_blobs.len(), 1, "{a_blobs:?}");

    // Layer b: a's files again (shared chunks) plus 300 MB of its own.
    let mounts = prepare(&mut c, "b-active", "").await;
    let (b_fs, id) = bind_fs_dir(&d, &mounts);
    fill_tree(&b_fs.join("copy"), 20 << 20, 0xa11ce);
    fill_tree(&b_fs.join("own"), 300 << 20, 0xb0b);
    let b_tree = tree(&b_fs);
    let sdir = d.snapshot_dir(id);

    let commit = {
        let mut c = c.clone();
        tokio::spawn(async move { c.commit(commit_request("b", "b-active")).await })
    };
    let t = Instant::now();
    let new_blob = loop {
        let new: Vec<String> = blob_files(&d).into_iter().filter(|b| !a_blobs.contains(b)).collect();
        if let Some(b) = new.first() {
            let len = fs::metadata(d.root.join("blobs").join(b)).map(|m| m.len()).unwrap_or(0);
            if len >= 8 << 20 {
                break b.clone();
            }
        }
        assert!(
            !commit.is_finished(),
            "the commit finished before the test could kill it ({:.2}s)",
            t.elapsed().as_secs_f64()
        );
        assert!(t.elapsed() < Duration::from_secs(60), "no new blob after 60 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    d.kill9();
    eprintln!(
        "crash: killed {:.2}s into the commit, blob {new_blob} being written",
        t.elapsed().as_secs_f64()
    );
    assert_commit_failed(commit).await;
    drop(c);

    d.start();
    let mut c = d.client().await;
    assert_eq!(blob_files(&d), a_blobs, "the unrecorded blob is removed, a's is kept");
    assert_eq!(stat(&mut c, "b-active").await.kind, pb::Kind::Active as i32);
    assert!(!sdir.join("layer.erofs").exists());
    let vm = view(&mut c, "view-a", "a").await;
    {
        let mnt = BindMount::new(&vm[0].source, &d.dir.join("view-a"), &vm[0].options);
        assert_same_tree("layer a after the crash", &tree(&mnt.0), &a_tree);
    }
    remove(&mut c, "view-a").await;

    c.commit(commit_request("b", "b-active"))
        .await
        .expect("Commit b after the restart");
    assert_eq!(blob_files(&d).len(), 2, "{:?}", blob_files(&d));
    let vm = view(&mut c, "view-b", "b").await;
    {
        let mnt = BindMount::new(&vm[0].source, &d.dir.join("view-b"), &vm[0].options);
        assert_same_tree("layer b after the restart", &tree(&mnt.0), &b_tree);
    }
    remove(&mut c, "view-b").await;
    // a goes first: b still names its blob, so it stays.
    remove(&mut c, "a").await;
    assert_eq!(blob_files(&d).len(), 2, "a's blob is still named by b");
    remove(&mut c, "b").await;
    assert_eq!(
        blob_files(&d),
        Vec::<String>::new(),
        "blobs left after removing every layer"
    );
    drop(c);
    d.stop();
    assert_eq!(d.mounts_under(), Vec::<String>::new(), "mounts left after a clean stop");
}
