//! The product leaves no mount behind: `dedup-snapshotter serve` is driven over gRPC as containerd drives it
//! (Prepare, Commit, View, the test mounting what they return as containerd would), then
//!
//! - stopped with SIGTERM while its layers are still there: nothing of the store stays mounted (a restart mounts the
//!   layers again);
//! - every snapshot is removed: nothing stays mounted while the daemon still runs;
//! - stopped again: nothing at all is left mounted under its root.
//!
//! For plain layers, dedup layers (`serve --dedup`, layers naming shared chunk blobs as devices) and lazy layers (a
//! `convert-image`d image in a loopback docker-registry, Prepared with CRI's labels, mounted from the files `dedupd`
//! serves over FUSE; after the removes dedupd holds no blob, and once it is stopped its FUSE mount is gone too).
//!
//! The test's own cleanup (a `TestDir` that unmounts whatever is left and removes itself) is the safety net for a
//! failing run, never what makes these checks pass: they look before it runs.
//!
//! Needs root, erofs, overlay, fuse, docker-registry and the workspace's `dedupd` (scripts/test.sh builds it):
//!
//!     cargo build --release --workspace && cargo test --release -p dedup-snapshotter --test no_mounts_left

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use containerd_client::services::v1::snapshots as pb;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::types::Mount;
use test_support::{ChildGuard, TestDir, Unmount};
use tonic::transport::Channel;

const SNAPSHOTTER: &str = "dedup";

fn assert_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the daemon mounts EROFS images and the test mounts snapshots: run as root"
    );
}

/// What is mounted at or under `dir`, as "point (type)".
fn mounts_under(dir: &Path) -> Vec<String> {
    test_support::mounts_under(dir)
        .into_iter()
        .map(|m| format!("{} ({})", m.point.display(), m.fstype))
        .collect()
}

use test_support::pseudo_random as data;

/// `dedup-snapshotter serve` on `root`, restartable; SIGTERM (then SIGKILL) on drop.
struct Daemon {
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    flags: Vec<String>,
    child: Option<ChildGuard>,
}

impl Daemon {
    fn new(dir: &Path, flags: &[String]) -> Daemon {
        Daemon {
            root: dir.join("root"),
            socket: dir.join("snap.sock"),
            log: dir.join("serve.log"),
            flags: flags.to_vec(),
            child: None,
        }
    }

    fn log_tail(&self) -> String {
        let s = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    async fn start(&mut self) -> SnapshotsClient<Channel> {
        assert!(self.child.is_none(), "the daemon runs already");
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(log, "=== start ===").unwrap();
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
        let mut g = ChildGuard::new(child).with_grace(Duration::from_secs(20));
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Ok(Some(st)) = g.child_mut().unwrap().try_wait() {
                panic!("serve exited with {st} at start:\n{}", self.log_tail());
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "serve did not answer:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(g);
        SnapshotsClient::new(
            containerd_client::connect(&self.socket)
                .await
                .expect("connect to serve"),
        )
    }

    /// SIGTERM; the daemon must exit cleanly.
    fn stop(&mut self) {
        let mut g = self.child.take().expect("the daemon runs");
        let st = g.terminate();
        assert!(
            st.is_some_and(|s| s.success()),
            "serve did not stop cleanly on SIGTERM ({st:?}):\n{}",
            self.log_tail()
        );
    }

    /// The store's own mounts: every one must be an EROFS layer at ROOT/m/<id>.
    fn layer_mounts(&self) -> Vec<String> {
        let m = self.root.join("m");
        test_support::mounts_under(&self.root)
            .into_iter()
            .map(|e| {
                assert!(
                    e.fstype == "erofs" && e.point.parent() == Some(m.as_path()),
                    "the store has a {} mount at {}",
                    e.fstype,
                    e.point.display()
                );
                e.point.display().to_string()
            })
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- serve log ({}) -----\n{}", self.log.display(), self.log_tail());
        }
    }
}

/// Mounts a snapshot's mounts at `target` as containerd does (bind or overlay); unmounted on drop.
fn mount_snapshot(mounts: &[Mount], target: &Path) -> Unmount {
    use rustix::mount::{mount, mount_bind_recursive, mount_remount, MountFlags};
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let m = &mounts[0];
    fs::create_dir_all(target).unwrap();
    let guard = Unmount(target.to_path_buf());
    let ro = m.options.iter().any(|o| o == "ro");
    match m.r#type.as_str() {
        "bind" => {
            mount_bind_recursive(Path::new(&m.source), target).unwrap_or_else(|e| panic!("bind {m:?}: {e}"));
            if ro {
                mount_remount(target, MountFlags::BIND | MountFlags::RDONLY, "").unwrap();
            }
        }
        "overlay" => {
            let data: Vec<&str> = m
                .options
                .iter()
                .map(String::as_str)
                .filter(|o| !matches!(*o, "ro" | "rw"))
                .collect();
            let data = std::ffi::CString::new(data.join(",")).unwrap();
            let flags = if ro { MountFlags::RDONLY } else { MountFlags::empty() };
            mount("overlay", target, "overlay", flags, Some(data.as_c_str()))
                .unwrap_or_else(|e| panic!("overlay {m:?}: {e}"));
        }
        other => panic!("unexpected mount type {other}: {m:?}"),
    }
    guard
}

async fn prepare(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    parent: &str,
    labels: HashMap<String, String>,
) -> Result<Vec<Mount>, tonic::Status> {
    c.prepare(pb::PrepareSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        key: key.into(),
        parent: parent.into(),
        labels,
    })
    .await
    .map(|r| r.into_inner().mounts)
}

async fn view(c: &mut SnapshotsClient<Channel>, key: &str, parent: &str) -> Vec<Mount> {
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

async fn commit(c: &mut SnapshotsClient<Channel>, name: &str, key: &str) {
    c.commit(pb::CommitSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("Commit {key} as {name}: {e}"));
}

async fn remove(c: &mut SnapshotsClient<Channel>, key: &str) {
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        key: key.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("Remove {key}: {e}"));
}

async fn list(c: &mut SnapshotsClient<Channel>) -> Vec<String> {
    let mut s = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: SNAPSHOTTER.into(),
            filters: Vec::new(),
        })
        .await
        .expect("List")
        .into_inner();
    let mut names = Vec::new();
    while let Some(r) = s.message().await.expect("List") {
        names.extend(r.info.into_iter().map(|i| i.name));
    }
    names
}

type Files = Vec<(&'static str, Vec<u8>)>;

/// The two layers every case stacks: `top` replaces a file of `base` and adds its own; with 64 KiB chunks, `top`
/// repeats one of `base`'s files (shared chunks under --dedup).
fn layer_files() -> (Files, Files) {
    let base = vec![
        ("etc/hello", b"hello\n".to_vec()),
        ("data/big", data(300_000, 1)),
        ("data/other", data(150_000, 2)),
    ];
    let top = vec![
        ("etc/hello", b"hello again\n".to_vec()),
        ("opt/copy-of-big", data(300_000, 1)),
        ("opt/new", data(100_000, 3)),
    ];
    (base, top)
}

/// What a view of `top` over `base` shows.
fn merged(base: &Files, top: &Files) -> Files {
    let mut out: Files = base
        .iter()
        .filter(|(p, _)| !top.iter().any(|(q, _)| q == p))
        .cloned()
        .collect();
    out.extend(top.iter().cloned());
    out
}

fn check_files(what: &str, dir: &Path, files: &Files) {
    for (p, want) in files {
        let got = fs::read(dir.join(p)).unwrap_or_else(|e| panic!("{what}: reading {p}: {e}"));
        assert!(
            got == *want,
            "{what}: {p} differs ({} vs {} bytes)",
            got.len(),
            want.len()
        );
    }
}

/// Prepares `name`-active over `parent`, writes `files` through the mount the way a differ does, commits `name`.
async fn write_layer(c: &mut SnapshotsClient<Channel>, work: &Path, name: &str, parent: &str, files: &Files) {
    let key = format!("{name}-active");
    let m = prepare(c, &key, parent, HashMap::new())
        .await
        .unwrap_or_else(|e| panic!("Prepare {key}: {e}"));
    {
        let t = work.join(&key);
        let _g = mount_snapshot(&m, &t);
        for (p, d) in files {
            let p = t.join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, d).unwrap();
        }
    }
    commit(c, name, &key).await;
}

/// With the committed layers `base` and `top` (over `base`) in the store: views and a container snapshot are used
/// and released; a stop with the layers present leaves nothing mounted, a restart mounts them again; then everything
/// is removed (nothing mounted while the daemon runs) and the daemon stops (nothing mounted at all).
async fn use_remove_and_stop(
    d: &mut Daemon,
    mut c: SnapshotsClient<Channel>,
    work: &Path,
    (base, top): (&str, &str),
    (base_files, top_files): (&Files, &Files),
) {
    let all = merged(base_files, top_files);
    // Views, as `ctr snapshot view` or a differ's Diff make them: of one layer (a bind of its EROFS mount) and of
    // the chain (a read-only overlay).
    let vb = view(&mut c, "view-base", base).await;
    let vt = view(&mut c, "view-top", top).await;
    {
        let _b = mount_snapshot(&vb, &work.join("view-base"));
        let _t = mount_snapshot(&vt, &work.join("view-top"));
        check_files("view of base", &work.join("view-base"), base_files);
        check_files("view of top", &work.join("view-top"), &all);
    }
    // A container's rootfs: written, then released.
    let cm = prepare(&mut c, "container", top, HashMap::new())
        .await
        .expect("Prepare container");
    {
        let t = work.join("container");
        let _g = mount_snapshot(&cm, &t);
        check_files("container", &t, &all);
        fs::write(t.join("etc/written"), b"by the container").unwrap();
    }
    assert_eq!(d.layer_mounts().len(), 2, "one EROFS mount per committed layer");

    // A stop with the layers still there: the store unmounts them.
    drop(c);
    d.stop();
    assert_eq!(mounts_under(&d.root), Vec::<String>::new(), "mounted after a stop");
    // A restart mounts them again, at the same places.
    let mut c = d.start().await;
    assert_eq!(d.layer_mounts().len(), 2, "layers mounted again after the restart");
    {
        let _t = mount_snapshot(&vt, &work.join("view-top"));
        check_files("view of top after the restart", &work.join("view-top"), &all);
    }

    // Everything removed (children first, as containerd's garbage collector does): nothing stays mounted.
    for k in ["container", "view-top", "view-base", top, base] {
        remove(&mut c, k).await;
    }
    assert_eq!(list(&mut c).await, Vec::<String>::new());
    assert_eq!(
        mounts_under(&d.root),
        Vec::<String>::new(),
        "mounted after every snapshot was removed"
    );
    drop(c);
    d.stop();
    assert_eq!(mounts_under(&d.root), Vec::<String>::new(), "mounted after the stop");
    assert_eq!(
        fs::read_dir(d.root.join("m")).unwrap().count(),
        0,
        "mount points left in ROOT/m"
    );
}

async fn plain_or_dedup(flags: &[&str]) {
    assert_root();
    // Declared first, dropped last: whatever a failure leaves mounted goes with it.
    let dir = TestDir::new("nml.");
    let work = dir.join("work");
    let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    let mut d = Daemon::new(dir.path(), &flags);
    let mut c = d.start().await;
    let (base, top) = layer_files();
    write_layer(&mut c, &work, "base", "", &base).await;
    write_layer(&mut c, &work, "top", "base", &top).await;
    if flags.iter().any(|f| f == "--dedup") {
        let blobs = fs::read_dir(d.root.join("blobs")).unwrap().count();
        assert!(blobs > 0, "a dedup store keeps file data in blobs");
    }
    use_remove_and_stop(&mut d, c, &work, ("base", "top"), (&base, &top)).await;
    if flags.iter().any(|f| f == "--dedup") {
        assert_eq!(fs::read_dir(d.root.join("blobs")).unwrap().count(), 0, "blobs left");
    }
    assert_eq!(mounts_under(dir.path()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_layers_leave_no_mount() {
    plain_or_dedup(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_layers_leave_no_mount() {
    plain_or_dedup(&["--dedup", "--chunk-size", "65536"]).await;
}

/// Pushes an OCI image with one uncompressed tar layer per entry of `layers` as `reference`.
fn push_image(client: &registry::Client, reference: &str, layers: &[&Files], work: &Path) {
    let r = registry::Reference::parse(reference).unwrap();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, files) in layers.iter().enumerate() {
        let src = work.join(format!("layer-{i}"));
        for (p, d) in files.iter() {
            fs::create_dir_all(src.join(p).parent().unwrap()).unwrap();
            fs::write(src.join(p), d).unwrap();
        }
        let tar = work.join(format!("layer-{i}.tar"));
        let out = Command::new("tar")
            .args(["--format=posix", "--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(&src)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .expect("spawn tar");
        assert!(out.status.success(), "tar: {out:?}");
        let bytes = fs::read(&tar).unwrap();
        let digest = registry::sha256_digest(&bytes);
        client
            .push_blob(r.repo(), &digest, bytes.len() as u64, &bytes[..])
            .expect("push layer");
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest,
            "size": bytes.len(),
        }));
        diff_ids.push(digest);
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_digest = registry::sha256_digest(&config);
    client
        .push_blob(r.repo(), &config_digest, config.len() as u64, &config[..])
        .expect("push config");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": descs,
    }))
    .unwrap();
    client
        .put_manifest(&r, "application/vnd.oci.image.manifest.v1+json", &manifest)
        .expect("push manifest");
}

fn start_dedupd(dir: &Path) -> ChildGuard {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("dedupd.log"))
        .unwrap();
    let child = Command::new(test_support::workspace_bin("dedupd"))
        .arg("--root")
        .arg(dir.join("dedupd/cache"))
        .arg("--mountpoint")
        .arg(dir.join("dedupd/fuse"))
        .arg("--socket")
        .arg(dir.join("dedupd.sock"))
        .arg("--docker-config")
        .arg(dir.join("docker-config.json"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn dedupd");
    let g = ChildGuard::new(child);
    let fetch = fetch_api::Client::new(dir.join("dedupd.sock"));
    let t = Instant::now();
    while fetch.ping().is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "dedupd did not answer:\n{}",
            fs::read_to_string(dir.join("dedupd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    g
}

/// A lazily pulled image: a registry with a `convert-image`d image, dedupd, the snapshotter using it, and the two
/// layers committed by CRI-labelled Prepares. Fields drop in order: the daemons stop, then the directory's guard
/// unmounts what is left.
struct Lazy {
    d: Daemon,
    c: Option<SnapshotsClient<Channel>>,
    dedupd: ChildGuard,
    fetch: fetch_api::Client,
    _reg: test_support::registry::Registry,
    names: Vec<String>,
    base: Files,
    top: Files,
    work: PathBuf,
    dir: TestDir,
}

impl Lazy {
    async fn start() -> Lazy {
        assert_root();
        let dir = TestDir::new("nml.");
        let work = dir.join("work");
        fs::create_dir_all(&work).unwrap();
        let docker_config = dir.join("docker-config.json");
        fs::write(&docker_config, "{}").unwrap();
        let reg = test_support::registry::Registry::start();

        // An image, and its conversion to EROFS-native layers with a chunk table.
        let client = registry::Client::new(registry::ClientOptions {
            docker_config: Some(docker_config.clone()),
            ..Default::default()
        })
        .unwrap();
        let (base, top) = layer_files();
        let source = format!("{}/nml:source", reg.addr);
        let lazy = format!("{}/nml:lazy", reg.addr);
        push_image(&client, &source, &[&base, &top], &work);
        let out = Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
            .args(["convert-image", "--json", "--chunk-size", "64K", "--docker-config"])
            .arg(&docker_config)
            .arg("--work-dir")
            .arg(&work)
            .args([&source, &lazy])
            .output()
            .expect("spawn convert-image");
        assert!(out.status.success(), "convert-image: {out:?}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("convert-image JSON");
        let manifest_digest = report["manifest_digest"].as_str().unwrap().to_string();
        let layer_digests: Vec<String> = report["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(layer_digests.len(), 2, "{report}");

        let dedupd = start_dedupd(dir.path());
        let fetch = fetch_api::Client::new(dir.join("dedupd.sock"));
        let flags = vec![
            "--fetch-socket".to_string(),
            dir.join("dedupd.sock").display().to_string(),
        ];
        let mut d = Daemon::new(dir.path(), &flags);
        let mut c = d.start().await;

        // Prepares as containerd's unpacker makes them for CRI: the snapshotter commits each layer at once, mounted
        // from dedupd's file, and answers AlreadyExists. The committed snapshot is named by the Prepare's key.
        let mut parent = String::new();
        let mut names = Vec::new();
        for (i, digest) in layer_digests.iter().enumerate() {
            let chain = format!("sha256:{:064}", i + 1);
            let key = format!("extract-{i} {chain}");
            let labels: HashMap<String, String> = [
                ("containerd.io/snapshot.ref", chain.as_str()),
                ("containerd.io/snapshot/cri.layer-digest", digest.as_str()),
                ("containerd.io/snapshot/cri.image-ref", lazy.as_str()),
                ("containerd.io/snapshot/cri.manifest-digest", manifest_digest.as_str()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            let err = prepare(&mut c, &key, &parent, labels)
                .await
                .expect_err("a lazy layer's Prepare answers AlreadyExists");
            assert_eq!(
                err.code(),
                tonic::Code::AlreadyExists,
                "Prepare {key}: {err}\n{}",
                d.log_tail()
            );
            parent = key.clone();
            names.push(key);
        }
        assert_eq!(
            fetch.list().expect("dedupd list").len(),
            2,
            "both blobs registered with dedupd"
        );
        assert_eq!(d.layer_mounts().len(), 2);
        Lazy {
            d,
            c: Some(c),
            dedupd,
            fetch,
            _reg: reg,
            names,
            base,
            top,
            work,
            dir,
        }
    }
}

/// Lazy layers: mounted from the files dedupd serves over FUSE, fetched from the registry as they are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_layers_leave_no_mount() {
    let mut l = Lazy::start().await;
    let c = l.c.take().unwrap();
    use_remove_and_stop(&mut l.d, c, &l.work, (&l.names[0], &l.names[1]), (&l.base, &l.top)).await;
    assert_eq!(
        l.fetch.list().expect("dedupd list").len(),
        0,
        "the removed layers' blobs are still registered with dedupd"
    );
    // dedupd stops (SIGTERM) and takes its FUSE mount along.
    let st = l.dedupd.terminate();
    assert!(st.is_some_and(|s| s.success()), "dedupd did not stop cleanly: {st:?}");
    assert_eq!(
        mounts_under(l.dir.path()),
        Vec::<String>::new(),
        "mounted after everything stopped"
    );
}

/// Lazy layers whose fetch daemon crashed (kill -9: its FUSE mount is dead) are still unmounted by Remove, and a stop
/// leaves nothing of the store mounted; the restarted dedupd replaces its dead mount and takes it along at its stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_layers_leave_no_mount_after_dedupd_crashed() {
    let mut l = Lazy::start().await;
    let mut c = l.c.take().unwrap();
    let top = l.names[1].clone();
    let vt = view(&mut c, "view-top", &top).await;
    {
        let _t = mount_snapshot(&vt, &l.work.join("view-top"));
        check_files("view of top", &l.work.join("view-top"), &merged(&l.base, &l.top));
    }
    l.dedupd.kill9();
    for k in ["view-top", &l.names[1], &l.names[0]] {
        remove(&mut c, k).await;
    }
    assert_eq!(list(&mut c).await, Vec::<String>::new());
    assert_eq!(
        mounts_under(&l.d.root),
        Vec::<String>::new(),
        "lazy layers left mounted after their Remove with dedupd dead"
    );
    drop(c);
    l.d.stop();
    assert_eq!(mounts_under(&l.d.root), Vec::<String>::new(), "mounted after the stop");
    // Only dedupd's own dead FUSE mount is left; a restart of dedupd replaces it, its stop removes it.
    let left: Vec<_> = test_support::mounts_under(l.dir.path());
    assert!(
        left.iter().all(|m| m.fstype.starts_with("fuse")),
        "more than dedupd's dead mount left: {left:?}"
    );
    l.dedupd = start_dedupd(l.dir.path());
    let st = l.dedupd.terminate();
    assert!(st.is_some_and(|s| s.success()), "dedupd did not stop cleanly: {st:?}");
    assert_eq!(
        mounts_under(l.dir.path()),
        Vec::<String>::new(),
        "mounted after everything stopped"
    );
}
