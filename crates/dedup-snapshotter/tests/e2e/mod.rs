//! Helpers for the containerd end-to-end tests: a private registry + containerd + proxy snapshotter started by
//! `scripts/e2e-env.sh` in a temporary directory, and `ctr` wrappers.
//!
//! The snapshotter command comes from `E2E_SNAPSHOTTER_CMD` (with `{root}` and `{socket}`; leading `+flag` words are
//! harness flags, see the script; `reference` = containerd's own overlayfs snapshotter served as a proxy) and defaults
//! to this crate's binary: `dedup-snapshotter serve --root {root} --address {socket}`.
//!
//! The containerd version comes from `E2E_CONTAINERD` (`1.6`, the default and the system's; `1.7`; `2.1`: see the
//! script and scripts/lib/containerd-versions.sh), or [`Env::start_version`]. `ctr` is always that version's.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

fn script(name: &str) -> PathBuf {
    repo_root().join("scripts").join(name)
}

/// One environment at a time: two containerds pulling in parallel on two cores only slow each other down.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fails loudly (never skips) unless we are root and every tool the environment needs is installed.
pub fn require_root_and_tools() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the containerd end-to-end tests need root (containerd, runc, mounts); run them as root"
    );
    let mut missing = Vec::new();
    for tool in [
        "containerd",
        "ctr",
        "runc",
        "containerd-shim-runc-v2",
        "docker-registry",
        "skopeo",
        "umoci",
        "fsck.erofs",
        "curl",
        "ss",
        "tar",
        "timeout",
    ] {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            missing.push(tool);
        }
    }
    assert!(
        missing.is_empty(),
        "missing tools {missing:?}; install them with:\n  apt-get install -y containerd runc docker-registry skopeo \
         umoci busybox-static debootstrap erofs-utils curl iproute2"
    );
    let fss = fs::read_to_string("/proc/filesystems").expect("read /proc/filesystems");
    for want in ["erofs", "overlay"] {
        assert!(
            fss.lines().any(|l| l.split_whitespace().last() == Some(want)),
            "the kernel lacks `{want}` (modprobe {want})"
        );
    }
}

/// Output of a finished command, for messages.
pub fn describe(cmd: &str, out: &Output) -> String {
    format!(
        "`{cmd}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `sh -c SCRIPT` on the host, panics on failure, returns stdout.
pub fn host_sh(script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).output().expect("spawn sh");
    assert!(out.status.success(), "{}", describe(script, &out));
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// A snapshot as `ctr snapshot ls` lists it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Snap {
    pub key: String,
    pub parent: String,
    pub kind: String,
}

pub struct Env {
    pub dir: PathBuf,
    pub vars: BTreeMap<String, String>,
    pub ctrd_sock: String,
    pub ns: String,
    pub registry: String,
    pub root: PathBuf,
    /// False for a snapshotter that is not ours (`+noerofs`): the EROFS layout checks are skipped.
    pub erofs: bool,
    /// The containerd line: `1.6`, `1.7` or `2.1`.
    pub containerd: String,
    /// That containerd's `--version` (e.g. `1.7.24~ds1`).
    pub containerd_version: String,
    /// Its `ctr`.
    pub ctr_bin: String,
    /// Whether containerd has our Diff service as the `dedup-diff` proxy (1.7 and 2.1 with a daemon serving it).
    pub diff_proxy: bool,
    stopped: bool,
    started: Instant,
}

impl Env {
    /// Starts registry, snapshotter and containerd in a fresh directory under /tmp (short paths: unix sockets).
    pub fn start() -> Env {
        let cmd = std::env::var("E2E_SNAPSHOTTER_CMD").unwrap_or_else(|_| {
            format!(
                "{} serve --root {{root}} --address {{socket}}",
                env!("CARGO_BIN_EXE_dedup-snapshotter")
            )
        });
        Env::start_with(&cmd)
    }

    /// [`Env::start`] with this containerd (`1.6`, `1.7` or `2.1`) whatever `E2E_CONTAINERD` says.
    pub fn start_version(version: &str) -> Env {
        let cmd = std::env::var("E2E_SNAPSHOTTER_CMD").unwrap_or_else(|_| {
            format!(
                "{} serve --root {{root}} --address {{socket}}",
                env!("CARGO_BIN_EXE_dedup-snapshotter")
            )
        });
        Env::start_with_version(&cmd, Some(version))
    }

    /// [`Env::start`] with this snapshotter command (`{root}` and `{socket}` substituted).
    pub fn start_with(cmd: &str) -> Env {
        Env::start_with_version(cmd, None)
    }

    /// [`Env::start_with`] on this containerd (`None`: `E2E_CONTAINERD`, default 1.6).
    pub fn start_with_version(cmd: &str, version: Option<&str>) -> Env {
        Env::start_with_options(cmd, version, false)
    }

    /// [`Env::start_with_version`] with containerd's CRI plugin on (`E2E_CRI=1`, see the script): our snapshotter
    /// for CRI with snapshot annotations, the registry's `pause` image as the sandbox image.
    pub fn start_cri(cmd: &str, version: &str) -> Env {
        Env::start_with_options(cmd, Some(version), true)
    }

    fn start_with_options(cmd: &str, version: Option<&str>, cri: bool) -> Env {
        require_root_and_tools();
        let dir = tempfile::Builder::new()
            .prefix("e2e.")
            .tempdir_in("/tmp")
            .expect("tempdir")
            .keep();
        eprintln!("e2e: environment in {} with snapshotter `{cmd}`", dir.display());
        let started = Instant::now();
        let mut start = Command::new(script("e2e-env.sh"));
        start.arg("start").arg(&dir).arg(cmd).stdin(Stdio::null());
        if let Some(v) = version {
            start.env("E2E_CONTAINERD", v);
        }
        if cri {
            start.env("E2E_CRI", "1");
        }
        let out = start.output().expect("run scripts/e2e-env.sh");
        let mut env = Env {
            dir: dir.clone(),
            vars: BTreeMap::new(),
            ctrd_sock: String::new(),
            ns: String::new(),
            registry: String::new(),
            root: PathBuf::new(),
            erofs: true,
            containerd: String::new(),
            containerd_version: String::new(),
            ctr_bin: "ctr".into(),
            diff_proxy: false,
            stopped: false,
            started,
        };
        // On failure, Drop prints the logs, stops what did start and removes the directory (unless E2E_KEEP).
        assert!(out.status.success(), "{}", describe("e2e-env.sh start", &out));
        env.load_vars();
        env.ctrd_sock = env.var("E2E_CONTAINERD_SOCK");
        env.ns = env.var("E2E_NAMESPACE");
        env.registry = env.var("E2E_REGISTRY");
        env.root = PathBuf::from(env.var("E2E_SNAPSHOTTER_ROOT"));
        env.erofs = !env
            .var("E2E_SNAPSHOTTER_FLAGS")
            .split_whitespace()
            .any(|f| f == "noerofs");
        env.containerd = env.var("E2E_CONTAINERD");
        env.containerd_version = env.var("E2E_CONTAINERD_VERSION");
        env.ctr_bin = env.var("E2E_CTR");
        env.diff_proxy = env.var("E2E_DIFF_PROXY") == "1";
        eprintln!(
            "e2e: up in {:.1}s (containerd {} {}, diff proxy {}, registry {}, erofs checks {})",
            started.elapsed().as_secs_f64(),
            env.containerd,
            env.containerd_version,
            if env.diff_proxy { "on" } else { "off" },
            env.registry,
            if env.erofs { "on" } else { "off" }
        );
        env
    }

    fn load_vars(&mut self) {
        // The script writes `KEY=VALUE` lines with bash %q quoting; let bash undo it.
        let envf = self.dir.join("env");
        let out = Command::new("bash")
            .arg("-c")
            .arg(r#"set -e; . "$1"; for k in $(sed -n 's/=.*//p' "$1"); do printf '%s=%s\0' "$k" "${!k}"; done"#)
            .arg("load-env")
            .arg(&envf)
            .output()
            .expect("spawn bash");
        assert!(out.status.success(), "{}", describe("source env", &out));
        self.vars = String::from_utf8(out.stdout)
            .expect("utf-8 env")
            .split('\0')
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
    }

    pub fn var(&self, k: &str) -> String {
        self.vars
            .get(k)
            .cloned()
            .unwrap_or_else(|| panic!("{k} missing from {}/env", self.dir.display()))
    }

    pub fn image(&self, name: &str) -> String {
        format!("{}/{name}:latest", self.registry)
    }

    /// Runs `ctr -a SOCK -n NS ARGS...` with a timeout; returns the output whatever the status.
    pub fn ctr_raw(&self, args: &[&str], timeout_s: u32) -> Output {
        self.ctr_raw_in(&self.ns, args, timeout_s)
    }

    /// `ctr ARGS...` in namespace `ns` (CRI keeps its images and containers in `k8s.io`); stdout, panicking on failure.
    pub fn ctr_in(&self, ns: &str, args: &[&str]) -> String {
        let out = self.ctr_raw_in(ns, args, 180);
        assert!(
            out.status.success(),
            "{}",
            describe(&format!("ctr -n {ns} {}", args.join(" ")), &out)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    fn ctr_raw_in(&self, ns: &str, args: &[&str], timeout_s: u32) -> Output {
        Command::new("timeout")
            .args([
                "-k",
                "5",
                &timeout_s.to_string(),
                &self.ctr_bin,
                "-a",
                &self.ctrd_sock,
                "-n",
                ns,
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("spawn ctr")
    }

    /// `ctr ARGS...`, panicking with the output on failure; returns stdout.
    pub fn ctr(&self, args: &[&str]) -> String {
        let out = self.ctr_raw(args, 180);
        assert!(
            out.status.success(),
            "{}",
            describe(&format!("ctr {}", args.join(" ")), &out)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// `ctr snapshot --snapshotter dedup ARGS...`
    pub fn snap(&self, args: &[&str]) -> String {
        let mut a = vec!["snapshot", "--snapshotter", "dedup"];
        a.extend_from_slice(args);
        self.ctr(&a)
    }

    pub fn pull(&self, name: &str) {
        let t = Instant::now();
        self.ctr(&[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "dedup",
            &self.image(name),
        ]);
        eprintln!("e2e: pulled {name} in {:.2}s", t.elapsed().as_secs_f64());
    }

    /// The layer digests (bottom first) of a pulled image, `reference` as `ctr image ls` lists it (a
    /// single-platform manifest).
    pub fn image_layer_digests(&self, reference: &str) -> Vec<String> {
        let ls = self.ctr(&["image", "ls"]);
        let target = ls
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&reference)).then(|| f[2].to_string())
            })
            .unwrap_or_else(|| panic!("{reference} not in `ctr image ls`:\n{ls}"));
        let manifest: serde_json::Value =
            serde_json::from_str(&self.ctr(&["content", "get", &target])).expect("manifest JSON");
        manifest["layers"]
            .as_array()
            .unwrap_or_else(|| panic!("{reference}: no layers in its manifest (an index?): {manifest}"))
            .iter()
            .map(|l| l["digest"].as_str().expect("layer digest").to_string())
            .collect()
    }

    /// `ctr run --rm --snapshotter dedup IMAGE ID ARGS...`; returns stdout.
    pub fn run(&self, name: &str, id: &str, args: &[&str]) -> String {
        let image = self.image(name);
        let mut a = vec!["run", "--rm", "--snapshotter", "dedup", &image, id];
        a.extend_from_slice(args);
        self.ctr(&a)
    }

    /// `ctr run -d --snapshotter dedup IMAGE ID ARGS...`, then waits until the task runs.
    pub fn run_detached(&self, name: &str, id: &str, args: &[&str]) {
        let image = self.image(name);
        let mut a = vec!["run", "-d", "--snapshotter", "dedup", &image, id];
        a.extend_from_slice(args);
        self.ctr(&a);
        self.wait_until(&format!("task {id} running"), 30, || {
            self.task_status(id).as_deref() == Some("RUNNING")
        });
    }

    pub fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr_raw(&["task", "ls"], 30);
        String::from_utf8_lossy(&out.stdout).lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f.last().unwrap_or(&"").to_string())
        })
    }

    /// Stops and removes a task and its container (and so the container's active snapshot).
    pub fn remove_container(&self, id: &str) {
        if self.task_status(id).is_some() {
            let _ = self.ctr_raw(&["task", "kill", "-s", "SIGKILL", id], 30);
            self.wait_until(&format!("task {id} stopped"), 30, || {
                self.task_status(id).is_none_or(|s| s == "STOPPED")
            });
            self.ctr(&["task", "rm", "-f", id]);
        }
        self.ctr(&["container", "rm", id]);
    }

    pub fn wait_until(&self, what: &str, timeout_s: u64, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(
                t.elapsed() < Duration::from_secs(timeout_s),
                "timed out after {timeout_s}s waiting for {what}"
            );
            sleep(Duration::from_millis(100));
        }
    }

    pub fn snapshots(&self) -> Vec<Snap> {
        let out = self.snap(&["ls"]);
        let mut v: Vec<Snap> = out
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f.as_slice() {
                    [k, kind] => Snap {
                        key: k.to_string(),
                        parent: String::new(),
                        kind: kind.to_string(),
                    },
                    [k, p, kind] => Snap {
                        key: k.to_string(),
                        parent: p.to_string(),
                        kind: kind.to_string(),
                    },
                    _ => panic!("unexpected `ctr snapshot ls` line {l:?}"),
                }
            })
            .collect();
        v.sort();
        v
    }

    /// `ctr snapshot info KEY` as JSON.
    pub fn snapshot_info(&self, key: &str) -> serde_json::Value {
        serde_json::from_str(&self.snap(&["info", key])).expect("snapshot info is JSON")
    }

    /// The mount options of KEY as `ctr snapshot mounts` prints them: (type, options).
    pub fn snapshot_mounts(&self, key: &str) -> Vec<(String, Vec<String>)> {
        let out = self.snap(&["mounts", "/mnt/e2e-unused", key]);
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let ty = w
                    .iter()
                    .position(|x| *x == "-t")
                    .and_then(|i| w.get(i + 1))
                    .unwrap_or(&"")
                    .to_string();
                let opts = w
                    .iter()
                    .position(|x| *x == "-o")
                    .and_then(|i| w.get(i + 1))
                    .map(|o| o.split(',').map(str::to_string).collect())
                    .unwrap_or_default();
                (ty, opts)
            })
            .collect()
    }

    /// The upper dir of an active snapshot (from its overlay mount), checked to be ROOT/snapshots/<id>/fs.
    pub fn upperdir(&self, key: &str) -> PathBuf {
        let mounts = self.snapshot_mounts(key);
        let upper = mounts
            .iter()
            .flat_map(|(_, o)| o.iter())
            .find_map(|o| o.strip_prefix("upperdir="))
            .unwrap_or_else(|| panic!("active snapshot {key} has no upperdir in its mounts {mounts:?}"));
        let upper = PathBuf::from(upper);
        let snaps = self.root.join("snapshots");
        assert!(
            upper.parent().and_then(Path::parent) == Some(snaps.as_path()) && upper.file_name() == Some("fs".as_ref()),
            "upperdir {} of {key} is not {}/<id>/fs",
            upper.display(),
            snaps.display()
        );
        upper
    }

    /// Directories under ROOT/snapshots.
    pub fn snapshot_dirs(&self) -> BTreeSet<PathBuf> {
        match fs::read_dir(self.root.join("snapshots")) {
            Ok(rd) => rd.map(|e| e.expect("read_dir entry").path()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => panic!("read {}/snapshots: {e}", self.root.display()),
        }
    }

    /// Checks the on-disk layout against `ctr snapshot ls`: one dir per snapshot; active ones own their upperdir;
    /// with erofs checks on, every committed dir has a `layer.erofs` that fsck.erofs passes and an empty `fs/`.
    pub fn check_layout(&self) {
        // containerd removes a proxy's snapshots in its GC, after the metadata: wait for the backend to catch up.
        let t = Instant::now();
        let (snaps, dirs) = loop {
            let snaps = self.snapshots();
            let dirs = self.snapshot_dirs();
            if dirs.len() == snaps.len() || t.elapsed() > Duration::from_secs(20) {
                break (snaps, dirs);
            }
            sleep(Duration::from_millis(200));
        };
        let mut active_dirs = BTreeSet::new();
        for s in &snaps {
            let info = self.snapshot_info(&s.key);
            assert_eq!(
                info["Kind"].as_str(),
                Some(s.kind.as_str()),
                "info of {} disagrees with ls: {info}",
                s.key
            );
            assert_eq!(info["Name"].as_str(), Some(s.key.as_str()), "info of {}: {info}", s.key);
            if !s.parent.is_empty() {
                assert_eq!(
                    info["Parent"].as_str(),
                    Some(s.parent.as_str()),
                    "info of {}: {info}",
                    s.key
                );
            }
            if s.kind == "Active" {
                if self.erofs {
                    self.check_lowers_are_erofs(&s.key);
                }
                let upper = self.upperdir(&s.key);
                let d = upper.parent().unwrap().to_path_buf();
                assert!(
                    dirs.contains(&d),
                    "upperdir {} of {} does not exist",
                    upper.display(),
                    s.key
                );
                assert!(d.join("work").is_dir(), "{} has no work/", d.display());
                active_dirs.insert(d);
            }
        }
        let committed: Vec<&Snap> = snaps.iter().filter(|s| s.kind == "Committed").collect();
        let views = snaps.iter().filter(|s| s.kind == "View").count();
        assert_eq!(
            dirs.len(),
            snaps.len(),
            "{} dirs under {}/snapshots but {} snapshots: dirs {dirs:?}, snapshots {snaps:#?}",
            dirs.len(),
            self.root.display(),
            snaps.len()
        );
        if views > 0 {
            return; // a view's dir cannot be told from a committed one from the outside
        }
        let committed_dirs: Vec<&PathBuf> = dirs.difference(&active_dirs).collect();
        assert_eq!(committed_dirs.len(), committed.len());
        if !self.erofs {
            return;
        }
        for d in committed_dirs {
            let img = d.join("layer.erofs");
            assert!(
                img.is_file(),
                "committed snapshot dir {} has no layer.erofs",
                d.display()
            );
            let mut fsck = Command::new("fsck.erofs");
            for d in self.image_devices(&img) {
                fsck.arg(format!("--device={}", d.display()));
            }
            let out = fsck.arg(&img).output().expect("spawn fsck.erofs");
            assert!(
                out.status.success(),
                "{}",
                describe(&format!("fsck.erofs {}", img.display()), &out)
            );
            let fsd = d.join("fs");
            assert!(fsd.is_dir(), "committed snapshot dir {} has no fs/", d.display());
            let left: Vec<_> = fs::read_dir(&fsd)
                .expect("read fs/")
                .map(|e| e.unwrap().file_name())
                .collect();
            assert!(
                left.is_empty(),
                "fs/ of committed {} is not empty: {left:?}",
                d.display()
            );
        }
    }

    /// The blobs a layer image names in its device table, as files of the store (`blobs/<tag>`).
    pub fn image_devices(&self, img: &Path) -> Vec<PathBuf> {
        let out = Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
            .args(["inspect", "--json"])
            .arg(img)
            .output()
            .expect("spawn dedup-snapshotter inspect");
        assert!(out.status.success(), "{}", describe("inspect --json", &out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
        v["devices"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|d| self.root.join("blobs").join(d["tag"].as_str().expect("device tag")))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every lowerdir of an active snapshot's overlay is a read-only EROFS mount of some committed snapshot's
    /// ROOT/snapshots/<id>/layer.erofs.
    pub fn check_lowers_are_erofs(&self, key: &str) {
        let mounts = self.snapshot_mounts(key);
        let table = mountinfo();
        let snaps = self.root.join("snapshots");
        for lower in mounts
            .iter()
            .flat_map(|(_, o)| o.iter())
            .filter_map(|o| o.strip_prefix("lowerdir="))
        {
            for l in lower.split(':') {
                let m = table.iter().rev().find(|m| m.point == l).unwrap_or_else(|| {
                    panic!("lowerdir {l} of {key} is not a mount point (expected an EROFS mount): mounts {mounts:?}")
                });
                assert_eq!(
                    m.fstype, "erofs",
                    "lowerdir {l} of {key} is a {} mount, not erofs: {m:?}",
                    m.fstype
                );
                let src = Path::new(&m.source);
                assert!(
                    src.file_name() == Some("layer.erofs".as_ref())
                        && src.parent().and_then(Path::parent) == Some(snaps.as_path()),
                    "lowerdir {l} of {key} mounts {}, not {}/<id>/layer.erofs",
                    m.source,
                    snaps.display()
                );
            }
        }
    }

    /// Mount points under the environment's directory (from /proc/self/mountinfo).
    pub fn mounts_under_dir(&self) -> Vec<String> {
        let prefix = format!("{}/", self.dir.display());
        mountinfo()
            .into_iter()
            .map(|m| m.point)
            .filter(|p| p.starts_with(&prefix) || *p == prefix.trim_end_matches('/'))
            .collect()
    }

    /// Removes every image (synchronous GC), then whatever snapshots remain child-first, and checks the daemon
    /// leaves no snapshot dirs and no mounts behind.
    pub fn remove_everything(&self) {
        let images: Vec<String> = self
            .ctr(&["image", "ls", "-q"])
            .lines()
            .map(str::to_string)
            .filter(|s| !s.is_empty())
            .collect();
        if !images.is_empty() {
            let mut a = vec!["image", "rm", "--sync"];
            a.extend(images.iter().map(String::as_str));
            self.ctr(&a);
        }
        // containerd's GC removes the unpacked snapshots of deleted images; give it a moment.
        let t = Instant::now();
        while !self.snapshots().is_empty() && t.elapsed() < Duration::from_secs(5) {
            sleep(Duration::from_millis(200));
        }
        let left = self.snapshots();
        if !left.is_empty() {
            eprintln!(
                "e2e: {} snapshots left after image rm --sync; removing them child-first",
                left.len()
            );
        }
        let t = Instant::now();
        loop {
            let snaps = self.snapshots();
            if snaps.is_empty() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "snapshots would not go away: {snaps:#?}"
            );
            let parents: BTreeSet<&str> = snaps.iter().map(|s| s.parent.as_str()).collect();
            for s in snaps.iter().filter(|s| !parents.contains(s.key.as_str())) {
                self.snap(&["rm", &s.key]);
            }
        }
        // The proxy's Remove runs in containerd's GC, after the metadata is gone.
        self.wait_until("the daemon's snapshot dirs to go away", 30, || {
            self.snapshot_dirs().is_empty()
        });
        let m = self.mounts_under_dir();
        assert!(
            m.is_empty(),
            "mounts left under {} with no snapshots: {m:#?}",
            self.dir.display()
        );
    }

    pub fn kill9_snapshotter(&mut self) {
        let pid: i32 = self.var("E2E_SNAPSHOTTER_PID").parse().expect("pid");
        // SAFETY: plain kill(2) of the process the script started and recorded.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill -9 {pid}");
        self.wait_until("the snapshotter to die", 10, || {
            // The script started it with setsid, so it is not our child: poll /proc until it is gone or a zombie.
            match fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => true,
                Ok(s) => s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')),
            }
        });
    }

    pub fn restart_snapshotter(&mut self) {
        let t = Instant::now();
        let out = Command::new(script("e2e-env.sh"))
            .arg("restart-snapshotter")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run e2e-env.sh");
        if !out.status.success() {
            self.dump_logs();
            panic!("{}", describe("e2e-env.sh restart-snapshotter", &out));
        }
        self.load_vars();
        eprintln!("e2e: snapshotter restarted in {:.2}s", t.elapsed().as_secs_f64());
    }

    /// The snapshotter's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("logs").join("snapshotter.log")).unwrap_or_default()
    }

    /// Prints the tails of the logs (on failure).
    pub fn dump_logs(&self) {
        for (name, lines) in [("snapshotter.log", 80), ("containerd.log", 40)] {
            let p = self.dir.join("logs").join(name);
            let text = fs::read_to_string(&p).unwrap_or_default();
            let v: Vec<&str> = if name == "containerd.log" {
                text.lines()
                    .filter(|l| l.contains("level=error") || l.contains("level=warn"))
                    .collect()
            } else {
                text.lines().collect()
            };
            eprintln!("----- last {lines} lines of {} -----", p.display());
            for l in &v[v.len().saturating_sub(lines)..] {
                eprintln!("{l}");
            }
        }
    }

    /// Stops everything; asserts nothing stays mounted; removes the directory.
    pub fn stop(mut self) {
        self.stopped = true;
        let out = Command::new(script("e2e-env.sh"))
            .arg("stop")
            .arg(&self.dir)
            .output()
            .expect("run e2e-env.sh");
        assert!(out.status.success(), "{}", describe("e2e-env.sh stop", &out));
        let m = self.mounts_under_dir();
        assert!(m.is_empty(), "still mounted after stop: {m:#?}");
        let _ = fs::remove_dir_all(&self.dir);
        eprintln!("e2e: done in {:.1}s", self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        if std::thread::panicking() {
            self.dump_logs();
        }
        let out = Command::new(script("e2e-env.sh")).arg("stop").arg(&self.dir).output();
        match out {
            Ok(o) if o.status.success() && self.mounts_under_dir().is_empty() => {
                if std::env::var_os("E2E_KEEP").is_none() {
                    let _ = fs::remove_dir_all(&self.dir);
                } else {
                    eprintln!("e2e: kept {}", self.dir.display());
                }
            }
            Ok(o) => eprintln!(
                "e2e: stop failed, {} kept: {}",
                self.dir.display(),
                describe("e2e-env.sh stop", &o)
            ),
            Err(e) => eprintln!("e2e: stop failed, {} kept: {e}", self.dir.display()),
        }
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug)]
pub struct MountEntry {
    pub point: String,
    pub fstype: String,
    pub source: String,
}

fn unescape_mountinfo(p: &str) -> String {
    p.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// /proc/self/mountinfo, in mount order.
pub fn mountinfo() -> Vec<MountEntry> {
    fs::read_to_string("/proc/self/mountinfo")
        .expect("read mountinfo")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some(MountEntry {
                point: unescape_mountinfo(f.get(4)?),
                fstype: f.get(sep + 1)?.to_string(),
                source: unescape_mountinfo(f.get(sep + 2)?),
            })
        })
        .collect()
}

/// True when `p` is an overlay whiteout (char device 0/0).
pub fn is_whiteout(p: &Path) -> bool {
    fs::symlink_metadata(p)
        .map(|m| m.file_type().is_char_device() && m.rdev() == 0)
        .unwrap_or(false)
}
