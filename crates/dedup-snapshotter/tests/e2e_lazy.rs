//! Lazy pulls end to end: `convert-image` turns a two-layer Debian + python3 image (built by
//! scripts/build-python-image.sh) into EROFS-native layers; containerd 1.6 pulls it through our snapshotter
//! with CRI's labels (`diffclient -cri-labels`, what CRI does) from a throttled proxy in front of the registry,
//! and the fetch daemon (`dedupd`) serves the blobs over FUSE, fetching verified chunks as they are read.
//!
//! - The converted image, pulled the normal way (our Diff service copies native layers), equals the source
//!   image pulled by containerd's own overlayfs snapshotter, entry by entry, and runs.
//! - Lazy: `python3 -c 'print(42)'` prints 42 before the layers are fully fetched (the fraction fetched is
//!   printed); the background fetch completes and every blob verifies against its digest; once local, the image
//!   keeps working with the registry gone across a kill -9 of dedupd.
//! - `record` lists the files a start reads (the python binary, its libraries), each once, and
//!   `convert-image --prefetch` turns the list into the python layer's prefetch chunks.
//! - Failures: a corrupting registry makes the read fail (no wrong bytes) and a good one then serves it; an outage
//!   fails the read after the deadline and the same read works once the registry is back; kill -9 of dedupd and
//!   of the snapshotter, each followed by a restart: the next container start works.
//!
//! - Unmodified images (issue 17): `index-image` pushes a tar-index artifact next to the gzip python image; CRI
//!   (containerd 1.7 with dedupd on FUSE, 2.1 on fanotify; containerd 1.6's unpacker with CRI's labels) pulls the image
//!   itself lazily through it, a corrupt index falls back to a full
//!   pull of that layer, and an artifact of another manifest is ignored.
//!
//! Needs root, the e2e tools (see tests/e2e/mod.rs), Go (diffclient), FUSE, and the workspace's release binaries
//! `dedupd` and `registry-proxy` (scripts/test.sh builds them first).
//!
//!     cargo test --release -p dedup-snapshotter --test e2e_lazy -- --nocapture

mod common;
mod cri;
mod e2e;

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{compare_trees, snapshot_tree, CompareOpts};
use cri::{Cri, CRI_NAMESPACE};
use e2e::*;

fn diffclient() -> PathBuf {
    let p =
        PathBuf::from(std::env::var("DIFFCLIENT").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/harness/diffclient.sh").to_string()
        }));
    assert!(p.is_file(), "{} is missing (set DIFFCLIENT)", p.display());
    p
}

fn sh(script: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .expect("spawn bash");
    assert!(out.status.success(), "{}", describe(script, &out));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The loopback proxy between containerd/dedupd and the registry.
struct Proxy {
    child: Child,
    addr: String,
}

impl Proxy {
    fn start(upstream: &str, rate: u64) -> Proxy {
        let mut child = Command::new(test_support::workspace_bin("registry-proxy"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                upstream,
                "--rate",
                &rate.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn registry-proxy");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the proxy's address");
        let addr = line.trim().to_string();
        assert!(addr.starts_with("127.0.0.1:"), "registry-proxy printed {line:?}");
        Proxy { child, addr }
    }

    fn config(&self, query: &str) {
        sh(&format!(
            "curl -sf -X POST 'http://{}/_proxy/config?{query}' >/dev/null",
            self.addr
        ));
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&sh(&format!("curl -sf http://{}/_proxy/stats", self.addr))).expect("proxy stats")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fetch daemon, in a directory of its own (its FUSE mount outlives the e2e environment's checks).
struct Dedupd {
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
}

impl Dedupd {
    fn start(socket: &Path, extra: &[&str]) -> Dedupd {
        let dir = tempfile::Builder::new().prefix("dedupd.").tempdir_in("/tmp").unwrap();
        let mut args: Vec<String> = vec![
            "--root".into(),
            dir.path().join("cache").display().to_string(),
            "--mountpoint".into(),
            dir.path().join("fuse").display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut d = Dedupd { dir, args, child: None };
        d.spawn();
        d
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("dedupd.log")
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let child = Command::new(test_support::workspace_bin("dedupd"))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn dedupd");
        self.child = Some(child);
        let c = self.client();
        let t = Instant::now();
        while c.ping().is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "dedupd did not answer: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn client(&self) -> fetch_api::Client {
        let sock = &self.args[self.args.iter().position(|a| a == "--socket").unwrap() + 1];
        fetch_api::Client::new(sock)
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill -9 dedupd");
            c.wait().unwrap();
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn blobs(&self) -> Vec<fetch_api::BlobStatus> {
        self.client().list().expect("dedupd list")
    }
}

impl Drop for Dedupd {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // SAFETY: plain kill(2) of our child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        if let Some(mut c) = self.child.take() {
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path().join("fuse"))
            .stderr(Stdio::null())
            .status();
        if std::thread::panicking() {
            eprintln!("----- dedupd log -----\n{}", self.log_text());
        }
    }
}

/// Everything a lazy test needs.
struct Lazy {
    env: Env,
    dedupd: Dedupd,
    proxy: Proxy,
    /// The source image in the registry, and its conversion as seen through the proxy.
    source: String,
    lazy: String,
    converted: serde_json::Value,
}

impl Lazy {
    /// `media`: the converted layers' media type (`erofs` or `oci`, see `convert-image --layer-media-type`).
    fn start(media: &str, proxy_rate: u64, dedupd_args: &[&str]) -> Lazy {
        Lazy::start_on(media, proxy_rate, dedupd_args, None)
    }

    /// [`Lazy::start`] on containerd `cri_version` (`1.7`, `2.1`) with its CRI plugin on, when given. A `+zstd`
    /// after the media type converts with `--chunk-compression zstd`.
    /// The environment (containerd `cri_version` with CRI when given), dedupd, and the python image pushed as
    /// `python:latest`.
    fn python_env(dedupd_args: &[&str], cri_version: Option<&str>) -> (Env, Dedupd, String) {
        diffclient();
        let cmd = format!(
            "{} serve --root {{root}} --address {{socket}} --containerd {{root}}/../containerd.sock \
             --fetch-socket {{root}}/../dedupd.sock",
            env!("CARGO_BIN_EXE_dedup-snapshotter")
        );
        let env = match cri_version {
            Some(v) => Env::start_cri(&cmd, v),
            None => Env::start_with(&cmd),
        };
        let dedupd = Dedupd::start(&env.dir.join("dedupd.sock"), dedupd_args);
        let t = Instant::now();
        let pushed = sh(&format!(
            "{}/scripts/build-python-image.sh push {} python:latest",
            repo_root().display(),
            env.registry
        ));
        eprintln!("e2e: pushed {} in {:.1}s", pushed.trim(), t.elapsed().as_secs_f64());
        let source = format!("{}/python:latest", env.registry);
        (env, dedupd, source)
    }

    /// The unmodified python image with the tar index `index-image` pushes for it: `lazy` is the image itself
    /// (through the proxy), `converted` the index report.
    fn start_indexed(proxy_rate: u64, dedupd_args: &[&str], cri_version: Option<&str>) -> Lazy {
        Lazy::start_made(proxy_rate, dedupd_args, cri_version, "latest", |source, _| {
            vec!["index-image".into(), "--json".into(), source.into()]
        })
    }

    fn start_on(media: &str, proxy_rate: u64, dedupd_args: &[&str], cri_version: Option<&str>) -> Lazy {
        let (media, zstd) = media.split_once('+').map_or((media, false), |(m, _)| (m, true));
        Lazy::start_made(proxy_rate, dedupd_args, cri_version, "erofs", |source, registry| {
            let mut a: Vec<String> = vec![
                "convert-image".into(),
                "--json".into(),
                "--layer-media-type".into(),
                media.into(),
            ];
            if zstd {
                a.extend(["--chunk-compression".into(), "zstd".into()]);
            }
            a.extend([source.into(), format!("{registry}/python:erofs")]);
            a
        })
    }

    /// The python image pushed, then `dedup-snapshotter` run with the arguments `args(source, registry)` gives
    /// (its JSON report is `converted`); `lazy` is `python:TAG` through a proxy at `proxy_rate`.
    fn start_made(
        proxy_rate: u64,
        dedupd_args: &[&str],
        cri_version: Option<&str>,
        tag: &str,
        args: impl FnOnce(&str, &str) -> Vec<String>,
    ) -> Lazy {
        let (env, dedupd, source) = Lazy::python_env(dedupd_args, cri_version);
        let t = Instant::now();
        let args = args(&source, &env.registry);
        let out = Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
            .args(&args)
            .output()
            .expect("spawn dedup-snapshotter");
        assert!(out.status.success(), "{}", describe(&args[0], &out));
        let converted: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
        eprintln!("e2e: {} in {:.1}s: {converted}", args[0], t.elapsed().as_secs_f64());
        let proxy = Proxy::start(&env.registry, proxy_rate);
        let lazy = format!("{}/python:{tag}", proxy.addr);
        Lazy {
            env,
            dedupd,
            proxy,
            source,
            lazy,
            converted,
        }
    }

    fn dc_raw(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["-k", "5", "300"])
            .arg(diffclient())
            .args([
                "-address",
                &self.env.ctrd_sock,
                "-diff",
                &self.env.var("E2E_SNAPSHOTTER_SOCK"),
            ])
            .args(["-snapshotter", "dedup", "-namespace", &self.env.ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("spawn diffclient")
    }

    fn dc(&self, args: &[&str]) -> serde_json::Value {
        let out = self.dc_raw(args);
        if !out.status.success() {
            self.env.dump_logs();
        }
        assert!(
            out.status.success(),
            "{}",
            describe(&format!("diffclient {}", args.join(" ")), &out)
        );
        serde_json::from_slice(&out.stdout).expect("diffclient JSON")
    }

    /// `dedup-snapshotter pull` (the CRI-labelled pull for ctr users) of `image`; its JSON report.
    fn pull(&self, image: &str) -> serde_json::Value {
        let out = Command::new("timeout")
            .args(["-k", "5", "300"])
            .arg(env!("CARGO_BIN_EXE_dedup-snapshotter"))
            .args([
                "pull",
                "--json",
                "--address",
                &self.env.ctrd_sock,
                "--namespace",
                &self.env.ns,
            ])
            .args(["--snapshotter", "dedup", image])
            .stdin(Stdio::null())
            .output()
            .expect("spawn dedup-snapshotter pull");
        if !out.status.success() {
            self.env.dump_logs();
        }
        assert!(
            out.status.success(),
            "{}",
            describe(&format!("dedup-snapshotter pull {image}"), &out)
        );
        serde_json::from_slice(&out.stdout).expect("pull JSON")
    }

    /// `ctr run --rm` of a full reference; the output whatever the status.
    fn run_raw(&self, image: &str, id: &str, args: &[&str]) -> Output {
        let mut a = vec!["run", "--rm", "--snapshotter", "dedup", image, id];
        a.extend_from_slice(args);
        let out = self.env.ctr_raw(&a, 120);
        if !out.status.success() {
            // A failed start can leave the container behind.
            let _ = self.env.ctr_raw(&["task", "rm", "-f", id], 30);
            let _ = self.env.ctr_raw(&["container", "rm", id], 30);
        }
        out
    }

    fn run(&self, image: &str, id: &str, args: &[&str]) -> String {
        let out = self.run_raw(image, id, args);
        if !out.status.success() {
            self.env.dump_logs();
        }
        assert!(out.status.success(), "{}", describe(&format!("ctr run {id}"), &out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn total_size(&self) -> u64 {
        self.converted["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["size"].as_u64().unwrap())
            .sum()
    }

    fn fetched(&self) -> u64 {
        self.dedupd.blobs().iter().map(|b| b.fetched_bytes).sum()
    }

    /// The committed lazy layers: none has a local `layer.erofs`, each is mounted from a file under dedupd's
    /// FUSE mount.
    fn check_lazy_layers(&self) {
        let fuse = self.dedupd.dir.path().join("fuse");
        let digests: Vec<String> = self.converted["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect();
        let blobs = self.dedupd.blobs();
        for d in &digests {
            assert!(
                blobs.iter().any(|b| &b.digest == d),
                "layer {d} is not registered with dedupd: {blobs:?}"
            );
            let f = fuse.join(d.replace(':', "-"));
            assert!(f.is_file(), "{} missing", f.display());
        }
        let erofs_mounts: Vec<MountEntry> = mountinfo()
            .into_iter()
            .filter(|m| m.fstype == "erofs" && m.point.starts_with(&self.env.root.display().to_string()))
            .collect();
        for d in &digests {
            let hex = d.trim_start_matches("sha256:");
            assert!(
                erofs_mounts.iter().any(|m| m.source.contains(hex)),
                "no EROFS mount of {d} from dedupd's file: {erofs_mounts:#?}"
            );
        }
    }

    fn stop(self) {
        let Lazy { env, dedupd, proxy, .. } = self;
        env.remove_everything();
        assert!(
            dedupd.blobs().is_empty(),
            "removing the lazy snapshots should unregister their blobs: {:?}",
            dedupd.blobs()
        );
        env.stop();
        drop(proxy);
        drop(dedupd);
    }
}

/// sha256 (hex) of a file of the python image's first (Debian) layer, from its tar.
fn source_sha256(path_in_layer: &str) -> String {
    let layout = sh(&format!("{}/scripts/build-python-image.sh path", repo_root().display()));
    let layout = layout.trim();
    let index: serde_json::Value = serde_json::from_slice(&fs::read(format!("{layout}/index.json")).unwrap()).unwrap();
    let blob = |d: &str| format!("{layout}/blobs/sha256/{}", d.trim_start_matches("sha256:"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap()).unwrap();
    let layer = blob(manifest["layers"][0]["digest"].as_str().unwrap());
    let out = sh(&format!(
        "tar -xzOf {layer} --wildcards '*{path_in_layer}' | sha256sum | cut -d' ' -f1"
    ));
    let sha = out.trim().to_string();
    assert_ne!(
        sha, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "{path_in_layer} is not a regular file of the source layer"
    );
    sha
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
}

/// `dedup-snapshotter record` of `image` running `python3 -c 'print(42)'`, with `extra` options.
fn record(env: &Env, image: &str, extra: &[&str]) -> Output {
    let t = Instant::now();
    let out = bin()
        .arg("record")
        .arg("--fetch-socket")
        .arg(env.dir.join("dedupd.sock"))
        .args([
            "--containerd",
            &env.ctrd_sock,
            "--namespace",
            &env.ns,
            "--snapshotter",
            "dedup",
        ])
        .args(extra)
        .args([image, "--", "python3", "-c", "print(42)"])
        .stdin(Stdio::null())
        .output()
        .expect("spawn dedup-snapshotter record");
    if !out.status.success() {
        env.dump_logs();
    }
    assert!(out.status.success(), "{}", describe("dedup-snapshotter record", &out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().any(|l| l.trim() == "42"),
        "the container's output did not reach record's stderr: {}",
        describe("record", &out)
    );
    eprintln!(
        "e2e: record in {:.2}s: {}",
        t.elapsed().as_secs_f64(),
        stderr.lines().last().unwrap_or("")
    );
    out
}

fn check_paths(paths: &[String], python: &str) {
    assert!(!paths.is_empty(), "nothing recorded");
    let mut seen = HashSet::new();
    for p in paths {
        assert!(p.starts_with('/'), "{p:?} is not absolute: {paths:#?}");
        assert!(seen.insert(p), "{p:?} is listed twice: {paths:#?}");
    }
    assert!(
        paths.iter().any(|p| p == python),
        "the python binary {python} is not in the recorded paths: {paths:#?}"
    );
    assert!(
        paths.iter().any(|p| {
            (p.starts_with("/usr/lib/python3.11/") && p.ends_with(".py"))
                || p.contains("/libpython3")
                || p.contains("/libc.so")
        }),
        "no python module, libpython or libc among the recorded paths: {paths:#?}"
    );
}

/// The paths of a prefetch list, each once, in first-listed order.
fn distinct_paths(entries: &[image_convert::PrefetchEntry]) -> Vec<String> {
    let mut seen = HashSet::new();
    entries
        .iter()
        .filter(|e| seen.insert(e.path.clone()))
        .map(|e| e.path.clone())
        .collect()
}

/// Sizes of these files of the lazy image, from `stat` in a container.
fn file_sizes(l: &Lazy, paths: &[String]) -> std::collections::HashMap<String, u64> {
    let mut args = vec!["stat", "-c", "%s %n", "--"];
    args.extend(paths.iter().map(String::as_str));
    let out = l.run(&l.lazy, "record-sizes", &args);
    let sizes: std::collections::HashMap<String, u64> = out
        .lines()
        .map(|line| {
            let (size, path) = line.split_once(' ').unwrap_or_else(|| panic!("stat printed {line:?}"));
            (path.to_string(), size.parse().unwrap())
        })
        .collect();
    for p in paths {
        assert!(sizes.contains_key(p), "no size for {p}: {out}");
    }
    sizes
}

/// Checks `record`'s ranges: each 4 KiB aligned (the end at a block or the end of the file), inside its file, no
/// place of a file listed twice or split into touching ranges. Returns the bytes listed.
fn check_ranges(entries: &[image_convert::PrefetchEntry], sizes: &std::collections::HashMap<String, u64>) -> u64 {
    let mut total = 0;
    for (i, e) in entries.iter().enumerate() {
        let (start, len) = e
            .range
            .unwrap_or_else(|| panic!("record listed {} without a range", e.path));
        let (end, size) = (start + len, sizes[&e.path]);
        assert!(
            len > 0 && start % 4096 == 0 && (end % 4096 == 0 || end == size),
            "{e}: not 4 KiB aligned"
        );
        assert!(end <= size, "{e}: beyond the end of the file ({size} bytes)");
        for o in &entries[..i] {
            let (s, l) = o.range.unwrap();
            assert!(
                o.path != e.path || s + l < start || end < s,
                "{e} overlaps or touches the earlier {o}"
            );
        }
        total += len;
    }
    total
}

/// `convert-image --prefetch LIST` of the test's source image to `python:TAG`; its JSON report.
fn convert_with_prefetch(l: &Lazy, list: &Path, tag: &str) -> serde_json::Value {
    let out = bin()
        .arg("convert-image")
        .arg("--prefetch")
        .arg(list)
        .args(["--layer-media-type", "oci", "--json", &l.source])
        .arg(format!("{}/python:{tag}", l.env.registry))
        .output()
        .expect("spawn convert-image --prefetch");
    assert!(out.status.success(), "{}", describe("convert-image --prefetch", &out));
    serde_json::from_slice(&out.stdout).expect("convert-image JSON")
}

/// Prefetch chunks over all layers of a `convert-image --json` report.
fn prefetch_chunk_count(converted: &serde_json::Value) -> usize {
    converted["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["prefetch_chunks"].as_array().map_or(0, Vec::len))
        .sum()
}

fn sha_in(l: &Lazy, id: &str, path: &str) -> Output {
    l.run_raw(&l.lazy, id, &["sha256sum", path])
}

// ---------------------------------------------------------------------------------------------------------------

#[test]
fn converted_image_pulls_normally_and_equals_the_source() {
    let _serial = e2e::serial();
    let l = Lazy::start("erofs", 0, &[]);
    let converted = format!("{}/python:erofs", l.env.registry);
    // Every layer is EROFS-native, with its source kept in an annotation.
    for layer in l.converted["layers"].as_array().unwrap() {
        assert!(
            layer["source_media_type"].as_str().unwrap().contains("tar+gzip"),
            "{layer}"
        );
        assert!(
            layer["data_offset"].as_u64().unwrap() < layer["size"].as_u64().unwrap(),
            "{layer}"
        );
    }
    // The normal path: containerd downloads the layers, our Diff service keeps them as they are.
    l.dc(&["pull", &converted]);
    assert_eq!(l.run(&converted, "norm", &["python3", "-c", "print(42)"]).trim(), "42");
    let top = {
        let mut chain = String::new();
        for layer in l.converted["layers"].as_array().unwrap() {
            let d = layer["digest"].as_str().unwrap();
            chain = if chain.is_empty() {
                d.to_string()
            } else {
                common::sha256_hex(format!("{chain} {d}").as_bytes())
            };
        }
        chain
    };
    // The source image, unpacked by containerd's own overlayfs snapshotter and walking differ.
    let unpack_started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    l.env
        .ctr(&["image", "pull", "--plain-http", "--snapshotter", "overlayfs", &l.source]);
    let source_top = {
        let cfg = sh(&format!(
            "ctr -a {} -n {} image ls --quiet >/dev/null; skopeo inspect --tls-verify=false --config docker://{}",
            l.env.ctrd_sock, l.env.ns, l.source
        ));
        let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
        let mut chain = String::new();
        for d in cfg["rootfs"]["diff_ids"].as_array().unwrap() {
            let d = d.as_str().unwrap();
            chain = if chain.is_empty() {
                d.to_string()
            } else {
                common::sha256_hex(format!("{chain} {d}").as_bytes())
            };
        }
        chain
    };
    let mount = |snapshotter: &str, key: &str| {
        let dir = tempfile::Builder::new().prefix("mnt.").tempdir_in(&l.env.dir).unwrap();
        let view = format!("cmp-{snapshotter}");
        l.env
            .ctr(&["snapshot", "--snapshotter", snapshotter, "view", &view, key]);
        let cmds = l.env.ctr(&[
            "snapshot",
            "--snapshotter",
            snapshotter,
            "mounts",
            dir.path().to_str().unwrap(),
            &view,
        ]);
        host_sh(&cmds);
        (dir, view)
    };
    let (ours, ours_view) = mount("dedup", &top);
    let (theirs, theirs_view) = mount("overlayfs", &source_top);
    let (a, b) = (snapshot_tree(ours.path()), snapshot_tree(theirs.path()));
    let stamped: Vec<PathBuf> = b
        .iter()
        .filter(|(_, n)| n.kind == common::Kind::Dir && n.mtime >= unpack_started - 1)
        .map(|(p, _)| p.clone())
        .collect();
    let r = compare_trees(&b, &a, &CompareOpts::ignoring_mtime_of(stamped));
    sh(&format!("umount {} {}", ours.path().display(), theirs.path().display()));
    // Views hold no lease: containerd's GC may have taken them already.
    let _ = l
        .env
        .ctr_raw(&["snapshot", "--snapshotter", "dedup", "rm", &ours_view], 30);
    let _ = l
        .env
        .ctr_raw(&["snapshot", "--snapshotter", "overlayfs", "rm", &theirs_view], 30);
    if let Err(e) = r {
        panic!("converted image vs source image: {e}");
    }
    eprintln!("e2e: converted image equals the source: {} entries", b.len());
    l.stop();
}

#[test]
fn lazy_pull_runs_before_the_layers_are_fetched() {
    let _serial = e2e::serial();
    // 20 MB/s at the registry; the background fetch takes half of it, reads are not limited.
    // containerd 1.6 passes snapshot labels only for layer types it knows: the OCI-typed EROFS layers.
    let l = Lazy::start(
        "oci",
        20_000_000,
        &["--prefetch-rate", "10000000", "--read-deadline-secs", "30"],
    );
    let total = l.total_size();
    let t = Instant::now();
    let pulled = l.dc(&["-cri-labels", "pull", &l.lazy]);
    let pull_s = t.elapsed().as_secs_f64();
    l.check_lazy_layers();
    let out = l.run(&l.lazy, "py1", &["python3", "-c", "print(42)"]);
    let first_s = t.elapsed().as_secs_f64();
    let fetched = l.fetched();
    let blobs = l.dedupd.blobs();
    eprintln!(
        "e2e: lazy pull {pull_s:.2}s ({pulled}), first output {first_s:.2}s after the pull started, \
         {fetched} of {total} bytes fetched then ({:.1}%)",
        100.0 * fetched as f64 / total as f64
    );
    assert_eq!(out.trim(), "42");
    assert!(
        blobs.iter().any(|b| !b.complete),
        "every layer was already fetched when the container printed: {blobs:?}"
    );
    // The background fetch completes and each blob matches its digest.
    for b in &blobs {
        let s = l
            .dedupd
            .client()
            .wait(&b.digest, Duration::from_secs(300))
            .expect("wait for the blob");
        assert!(
            s.complete && s.verified,
            "{} did not complete and verify: {s:?}",
            b.digest
        );
    }
    eprintln!(
        "e2e: all layers fetched and verified {:.1}s after the pull started",
        t.elapsed().as_secs_f64()
    );
    let read_all = "find / -xdev -type f -exec cat {} + >/dev/null && echo read-all-ok";
    assert_eq!(l.run(&l.lazy, "ra", &["sh", "-c", read_all]).trim(), "read-all-ok");

    // Local now: with the registry gone, a kill -9 of dedupd and a restart change nothing for new containers.
    l.proxy.config("down=1");
    let mut l = l;
    let before = l.dedupd.client().ping().unwrap();
    l.dedupd.kill9();
    l.dedupd.spawn();
    assert_eq!(l.run(&l.lazy, "py2", &["python3", "-c", "print(6*7)"]).trim(), "42");
    assert_eq!(l.run(&l.lazy, "ra2", &["sh", "-c", read_all]).trim(), "read-all-ok");
    let after = l.dedupd.client().ping().unwrap();
    let remounted = l
        .env
        .log()
        .contains("fetch daemon restarted: mounting the lazy layer again");
    if before.data_path == "fanotify" {
        // The group outlived dedupd in its holder: same instance, nothing mounted again for it.
        assert_eq!(after.instance, before.instance);
        assert!(!remounted, "the snapshotter remounted on the fanotify path");
        // But once complete, each layer was mounted again on its (unwatched) local file for new containers.
        let again = l
            .env
            .log()
            .matches("lazy layer complete: mounting it again on the local file")
            .count();
        assert_eq!(
            again, 2,
            "each of the two lazy layers is mounted again once, once complete"
        );
    } else {
        assert!(remounted, "the snapshotter did not remount after dedupd's restart");
    }
    l.proxy.config("down=0");
    l.stop();
}

#[test]
fn lazy_failures_corruption_outage_and_restarts() {
    let _serial = e2e::serial();
    // Nothing is fetched unless read, so the files below are surely not local.
    let mut l = Lazy::start("oci", 0, &["--no-prefetch", "--read-deadline-secs", "4"]);
    // Our own pull command passes the labels CRI would: every layer is mounted lazily, none downloaded.
    let pulled = l.pull(&l.lazy);
    eprintln!("e2e: dedup-snapshotter pull: {pulled}");
    assert_eq!(
        (pulled["lazy"].as_u64(), pulled["unpacked"].as_u64()),
        (Some(2), Some(0)),
        "{pulled}"
    );
    l.check_lazy_layers();
    // The same command on the plain (gzip) source image downloads and applies every layer.
    let plain = l.pull(&l.source);
    assert_eq!(
        (plain["lazy"].as_u64(), plain["unpacked"].as_u64()),
        (Some(0), Some(2)),
        "{plain}"
    );
    assert_eq!(l.run(&l.source, "plain", &["python3", "-c", "print(42)"]).trim(), "42");
    // Pulled again, nothing is fetched or applied.
    let again = l.pull(&l.lazy);
    assert_eq!(again["present"].as_u64(), Some(2), "{again}");
    assert_eq!(l.run(&l.lazy, "py", &["python3", "-c", "print(42)"]).trim(), "42");
    // sha256sum itself becomes local.
    assert!(sha_in(&l, "warm", "/etc/hostname").status.success());

    // A registry serving modified ranges: the read fails, no wrong bytes reach the container.
    let apt = source_sha256("usr/lib/x86_64-linux-gnu/libapt-pkg.so.6.0.0");
    l.proxy.config("corrupt=1");
    let out = sha_in(&l, "bad", "/usr/lib/x86_64-linux-gnu/libapt-pkg.so.6.0.0");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a corrupted read succeeded: {}",
        describe("sha256sum", &out)
    );
    assert!(!stdout.contains(&apt), "{stdout}");
    let log = l.dedupd.log_text();
    assert!(
        log.lines()
            .any(|x| x.contains("chunk") && x.to_lowercase().contains("digest")),
        "dedupd did not log the bad chunk:\n{log}"
    );
    let metrics = l.dedupd.client().metrics().unwrap();
    assert!(
        metrics
            .lines()
            .any(|x| x.starts_with("dedupd_verify_failures_total") && !x.ends_with(" 0")),
        "{metrics}"
    );
    l.proxy.config("corrupt=0");
    let out = sha_in(&l, "good", "/usr/lib/x86_64-linux-gnu/libapt-pkg.so.6.0.0");
    assert!(
        out.status.success(),
        "{}",
        describe("sha256sum after the registry is good", &out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&apt));

    // An outage: the read waits for the deadline, then fails; the same read works once the registry is back.
    let dpkg = source_sha256("usr/bin/dpkg");
    l.proxy.config("down=1");
    let t = Instant::now();
    let out = sha_in(&l, "down", "/usr/bin/dpkg");
    let waited = t.elapsed().as_secs_f64();
    assert!(!out.status.success(), "a read during the outage succeeded");
    assert!(
        waited >= 3.5,
        "the read failed after {waited:.1}s, before the 4 s deadline"
    );
    eprintln!("e2e: outage: the read failed after {waited:.1}s");
    l.proxy.config("down=0");
    let out = sha_in(&l, "up", "/usr/bin/dpkg");
    assert!(out.status.success(), "{}", describe("sha256sum after the outage", &out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&dpkg));

    // dedupd killed and restarted: the next container start works (the snapshotter mounts the layers again).
    l.dedupd.kill9();
    l.dedupd.spawn();
    assert_eq!(
        l.run(&l.lazy, "after-dedupd", &["python3", "-c", "print(42)"]).trim(),
        "42"
    );

    // The snapshotter killed and restarted: lazy layers are mounted again from dedupd's files.
    l.env.kill9_snapshotter();
    l.env.restart_snapshotter();
    assert_eq!(
        l.run(&l.lazy, "after-snap", &["python3", "-c", "print(42)"]).trim(),
        "42"
    );
    l.check_lazy_layers();
    let stats = l.proxy.stats();
    eprintln!("e2e: proxy stats at the end: {stats}");
    l.stop();
}

#[test]
fn record_lists_the_files_a_start_reads_and_feeds_prefetch() {
    let _serial = e2e::serial();
    // Nothing is fetched unless read: what the start reads is all the daemon sees.
    let l = Lazy::start("oci", 0, &["--no-prefetch"]);
    let (env, dedupd, lazy) = (&l.env, &l.dedupd, l.lazy.clone());
    l.dc(&["-cri-labels", "pull", &lazy]);
    let blobs = dedupd.blobs();
    assert!(
        !blobs.is_empty() && blobs.iter().any(|b| !b.complete),
        "the pull was not lazy (the layers should be registered with dedupd, not fetched): {blobs:?}"
    );

    // First recording (readahead off, the default): the range list, to a file.
    let work = tempfile::Builder::new().prefix("record.").tempdir_in("/tmp").unwrap();
    let list = work.path().join("ranges.txt");
    record(env, &lazy, &["--output", list.to_str().unwrap()]);
    let text = fs::read_to_string(&list).expect("read the recorded list");
    let entries = image_convert::parse_prefetch_list(&text)
        .unwrap_or_else(|e| panic!("record wrote a list convert-image cannot read: {e}\n{text}"));
    let paths = distinct_paths(&entries);

    // /usr/bin/python3 is a symlink; the data read belongs to the file it names.
    let python = l
        .run(&lazy, "readlink", &["readlink", "-f", "/usr/bin/python3"])
        .trim()
        .to_string();
    assert!(
        python.starts_with("/usr/bin/python3."),
        "readlink -f /usr/bin/python3: {python:?}"
    );
    eprintln!(
        "e2e: {} ranges of {} paths recorded for the python start:\n  {}",
        entries.len(),
        paths.len(),
        text.lines().collect::<Vec<_>>().join("\n  ")
    );
    check_paths(&paths, &python);
    let sizes = file_sizes(&l, &paths);
    let listed = check_ranges(&entries, &sizes);
    let whole: u64 = paths.iter().map(|p| sizes[p]).sum();
    let python_listed: u64 = entries
        .iter()
        .filter(|e| e.path == python)
        .map(|e| e.range.unwrap().1)
        .sum();
    eprintln!(
        "e2e: readahead off: {listed} bytes listed of {whole} bytes of whole files; python {python_listed} of {}",
        sizes[&python]
    );
    // The binary is mapped, and the start faults in only the pages it runs.
    assert!(
        python_listed < sizes[&python],
        "the python binary {python} was recorded whole ({python_listed} bytes): {text}"
    );

    // Second recording, as JSON, readahead left on: everything is local now, but reads still reach the daemon once
    // the cache is dropped, so the same start lists the same binary, plus what readahead added.
    let out = record(env, &lazy, &["--json", "--keep-readahead"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("record --json output");
    let paths2: Vec<String> = report["paths"]
        .as_array()
        .expect("paths")
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    check_paths(&paths2, &python);
    let entries2: Vec<image_convert::PrefetchEntry> = report["ranges"]
        .as_array()
        .expect("ranges")
        .iter()
        .map(|r| image_convert::PrefetchEntry {
            path: r["path"].as_str().unwrap().to_string(),
            range: Some((r["start"].as_u64().unwrap(), r["len"].as_u64().unwrap())),
        })
        .collect();
    assert_eq!(distinct_paths(&entries2), paths2, "{report}");
    let sizes2 = file_sizes(&l, &paths2);
    let listed2 = check_ranges(&entries2, &sizes2);
    assert_eq!(report["bytes_listed"].as_u64(), Some(listed2), "{report}");
    assert_eq!(
        report["bytes_of_files"].as_u64(),
        Some(paths2.iter().map(|p| sizes2[p]).sum::<u64>()),
        "{report}"
    );
    assert_eq!(report["readahead_off"].as_array().map(Vec::len), Some(0), "{report}");
    assert!(report["accesses"].as_u64().unwrap() > 0, "{report}");
    assert!(report["bytes_read"].as_u64().unwrap() > 0, "{report}");
    let layer_digests: HashSet<String> = blobs.iter().map(|b| b.digest.clone()).collect();
    let report_blobs = report["blobs"].as_array().expect("blobs");
    assert!(!report_blobs.is_empty(), "{report}");
    for b in report_blobs {
        let d = b["digest"].as_str().unwrap();
        assert!(
            layer_digests.contains(d),
            "blob {d} is not a layer of the image: {report}"
        );
    }
    eprintln!(
        "e2e: readahead kept: {} ranges of {} paths, {listed2} bytes listed of {} bytes of whole files, {} accesses, \
         {} bytes read, blobs {}",
        entries2.len(),
        paths2.len(),
        report["bytes_of_files"],
        report["accesses"],
        report["bytes_read"],
        serde_json::Value::Array(report_blobs.clone())
    );

    // The list drives convert-image's prefetch: the python layer gets chunks, and the binary among its files; the
    // ranges need fewer chunks than the same files whole (a list of bare paths, the old format).
    let whole_list = work.path().join("paths.txt");
    fs::write(&whole_list, paths.iter().map(|p| format!("{p}\n")).collect::<String>()).unwrap();
    let ranged = convert_with_prefetch(&l, &list, "prefetch");
    let whole_files = convert_with_prefetch(&l, &whole_list, "prefetch-whole");
    let (n_ranged, n_whole) = (prefetch_chunk_count(&ranged), prefetch_chunk_count(&whole_files));
    eprintln!("e2e: prefetch chunks: {n_ranged} from the ranges, {n_whole} from the whole files");
    for converted in [&ranged, &whole_files] {
        let layers = converted["layers"].as_array().expect("layers");
        let py_layer = layers
            .iter()
            .find(|l| {
                l["prefetch_files"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|p| p.as_str() == Some(python.as_str())))
            })
            .unwrap_or_else(|| panic!("no layer lists {python} in prefetch_files: {converted}"));
        let chunks = py_layer["prefetch_chunks"].as_array().expect("prefetch_chunks");
        assert!(
            !chunks.is_empty(),
            "the python layer has no prefetch chunks: {py_layer}"
        );
        let distinct: HashSet<u64> = chunks.iter().map(|c| c.as_u64().unwrap()).collect();
        assert_eq!(distinct.len(), chunks.len(), "a chunk listed twice: {py_layer}");
        for (i, l) in layers.iter().enumerate() {
            eprintln!(
                "e2e: prefetch layer {i}: {} chunks of {}, {} files",
                l["prefetch_chunks"].as_array().map_or(0, Vec::len),
                l["chunks"],
                l["prefetch_files"].as_array().map_or(0, Vec::len)
            );
        }
    }
    assert!(
        0 < n_ranged && n_ranged < n_whole,
        "the ranges gave {n_ranged} prefetch chunks, the whole files {n_whole}"
    );
    l.stop();
}

/// Kubernetes' path, with no help from the test: containerd's CRI plugin (snapshot annotations on, as
/// contrib/containerd-config*.toml) pulls the converted image, passing CRI's labels itself; the snapshotter mounts
/// every layer from dedupd and containerd downloads no layer. A host-network pod runs it, and its first output
/// arrives while most of the image is still in the registry. A plain OCI image pulled through CRI is unpacked by our
/// Diff service (one pass, no Commit conversion).
fn cri_pull_is_lazy_and_runs(version: &str) {
    let _serial = e2e::serial();
    let l = Lazy::start_on(
        "oci",
        20_000_000,
        &["--prefetch-rate", "10000000", "--read-deadline-secs", "30"],
        Some(version),
    );
    let mut cri = Cri::connect(&l.env.ctrd_sock);
    // The sandbox image first, so that the timing below is the application image's alone.
    let pause = format!("{}/pause:latest", l.env.registry);
    cri.pull(&pause);
    let pod = cri.run_pod("lazy", &l.env.dir.join("pods"));

    let total = l.total_size();
    let t = Instant::now();
    let image_ref = cri.pull(&l.lazy);
    let pull_s = t.elapsed().as_secs_f64();
    l.check_lazy_layers();
    // containerd fetched no layer into its content store: the layers are only in dedupd's cache.
    let content = l.env.ctr_in(CRI_NAMESPACE, &["content", "ls", "-q"]);
    for layer in l.converted["layers"].as_array().unwrap() {
        let d = layer["digest"].as_str().unwrap();
        assert!(!content.contains(d), "containerd downloaded layer {d}: {content}");
    }
    let id = cri.start_container(&pod, "py", &l.lazy, &["python3", "-c", "print(42)"]);
    let code = cri.wait_exit(&id, Duration::from_secs(120));
    let first_s = t.elapsed().as_secs_f64();
    let fetched = l.fetched();
    let blobs = l.dedupd.blobs();
    let out = Cri::logs(&pod, "py");
    eprintln!(
        "e2e: CRI on containerd {version}: lazy PullImage {pull_s:.2}s ({image_ref}), first output {first_s:.2}s \
         after the pull started, {fetched} of {total} bytes fetched then ({:.1}%)",
        100.0 * fetched as f64 / total as f64
    );
    assert_eq!((code, out.trim()), (0, "42"), "the container's log: {out:?}");
    assert!(
        fetched < total / 2,
        "{fetched} of {total} bytes were fetched before the first output"
    );
    assert!(
        blobs.iter().any(|b| !b.complete),
        "every layer was already fetched when the container printed: {blobs:?}"
    );

    // A plain OCI image through CRI: each layer applied by our Diff service, none converted at Commit.
    let applied = |log: &str| {
        log.lines()
            .filter(|l| l.contains("rpc=\"Apply\"") && l.contains("ok=true"))
            .count()
    };
    let before = applied(&l.env.log());
    cri.pull(&l.source);
    let source_layers = l.converted["layers"].as_array().unwrap().len();
    assert_eq!(
        applied(&l.env.log()) - before,
        source_layers,
        "our Diff service should have applied every layer of {}",
        l.source
    );
    let id = cri.start_container(&pod, "plain", &l.source, &["python3", "-c", "print(6*7)"]);
    assert_eq!(cri.wait_exit(&id, Duration::from_secs(120)), 0);
    assert_eq!(Cri::logs(&pod, "plain").trim(), "42");

    // Everything CRI made goes away with the pod and the images; the lazy blobs are unregistered.
    cri.remove_pod(&pod);
    for image in [&l.lazy, &l.source, &pause] {
        cri.remove_image(image);
    }
    l.env.wait_until("CRI's snapshots to be collected", 60, || {
        l.env
            .ctr_in(CRI_NAMESPACE, &["snapshots", "--snapshotter", "dedup", "ls"])
            .lines()
            .count()
            <= 1
    });

    if version == "2.1" {
        // containerd 2.x's transfer service labels layers for a snapshotter that exports
        // enable_remote_snapshot_annotations (contrib/containerd-config-v3.toml): plain `ctr images pull` is lazy too.
        l.env.ctr(&["images", "pull", "--snapshotter", "dedup", &l.lazy]);
        l.check_lazy_layers();
        let content = l.env.ctr(&["content", "ls", "-q"]);
        for layer in l.converted["layers"].as_array().unwrap() {
            let d = layer["digest"].as_str().unwrap();
            assert!(
                !content.contains(d),
                "the transfer service downloaded layer {d}: {content}"
            );
        }
        let out = l.run(&l.lazy, "transfer", &["python3", "-c", "print(42)"]);
        assert_eq!(out.trim(), "42");
    }
    l.stop();
}

#[test]
fn cri_pull_is_lazy_and_runs_on_containerd_1_7() {
    cri_pull_is_lazy_and_runs("1.7");
}

#[test]
fn cri_pull_is_lazy_and_runs_on_containerd_2_1() {
    cri_pull_is_lazy_and_runs("2.1");
}

/// The CRI pull of a converted image while the snapshotter cannot reach the registry (the proxy refuses its user
/// agent only), then while dedupd is down: containerd downloads every layer and our Diff service keeps them, the
/// snapshotter says so once per layer, the image runs, and nothing of the failed lazy attempts is left behind.
#[test]
fn cri_pull_falls_back_when_the_registry_or_dedupd_is_unreachable() {
    let _serial = e2e::serial();
    let mut l = Lazy::start_on("oci", 0, &[], Some("2.1"));
    let mut cri = Cri::connect(&l.env.ctrd_sock);
    let pause = format!("{}/pause:latest", l.env.registry);
    cri.pull(&pause);
    let pod = cri.run_pod("fallback", &l.env.dir.join("pods"));
    let layers: Vec<String> = l.converted["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["digest"].as_str().unwrap().to_string())
        .collect();
    let fallbacks = |log: &str| {
        log.lines()
            .filter(|x| x.contains("WARN") && x.contains("containerd will download it"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };

    let cri_snapshots = || {
        l.env
            .ctr_in(CRI_NAMESPACE, &["snapshots", "--snapshotter", "dedup", "ls"])
            .lines()
            .count()
            - 1
    };
    // The pause image's layer and the sandbox's snapshot.
    let before = cri_snapshots();
    for (phase, setup) in [
        ("registry", "refuse_agent=dedup-snapshotter"),
        ("dedupd", "refuse_agent="),
    ] {
        l.proxy.config(setup);
        if phase == "dedupd" {
            l.dedupd.kill9();
        }
        let log_from = l.env.log().len();
        let t = Instant::now();
        cri.pull(&l.lazy);
        let log = l.env.log().get(log_from..).unwrap_or("").to_string();
        let warned = fallbacks(&log);
        eprintln!(
            "e2e: CRI pull with the {phase} unreachable: {:.1}s, {} fallback line(s): {warned:#?}",
            t.elapsed().as_secs_f64(),
            warned.len()
        );
        assert_eq!(
            warned.len(),
            layers.len(),
            "[{phase}] one fallback line per layer expected:\n{log}"
        );
        let applied = log
            .lines()
            .filter(|x| x.contains("rpc=\"Apply\"") && x.contains("ok=true"))
            .count();
        assert_eq!(
            applied,
            layers.len(),
            "[{phase}] our Diff service should have applied every layer:\n{log}"
        );
        let content = l.env.ctr_in(CRI_NAMESPACE, &["content", "ls", "-q"]);
        for d in &layers {
            assert!(
                content.contains(d.as_str()),
                "[{phase}] containerd did not download layer {d}"
            );
        }
        // Every layer is local: no mount reads a dedupd file.
        let fuse = l.dedupd.dir.path().join("fuse").display().to_string();
        let from_dedupd: Vec<MountEntry> = mountinfo()
            .into_iter()
            .filter(|m| m.fstype == "erofs" && m.source.starts_with(&fuse))
            .collect();
        assert!(from_dedupd.is_empty(), "[{phase}] lazy mounts left: {from_dedupd:#?}");
        let name = format!("py-{phase}");
        let id = cri.start_container(&pod, &name, &l.lazy, &["python3", "-c", "print(42)"]);
        assert_eq!(cri.wait_exit(&id, Duration::from_secs(120)), 0);
        assert_eq!(Cri::logs(&pod, &name).trim(), "42");
        // Nothing of the failed lazy attempts is left: one directory per snapshot CRI has, nothing staged.
        l.env.wait_until("one snapshot dir per snapshot", 20, || {
            l.env.snapshot_dirs().len() == cri_snapshots()
        });
        let staged: Vec<_> = fs::read_dir(l.env.root.join("staging"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(staged.is_empty(), "[{phase}] left in staging/: {staged:?}");
        // Removed, the image leaves nothing but the pause image's snapshot.
        cri.remove_container(&id);
        cri.remove_image(&l.lazy);
        l.env.wait_until("the image's snapshots to be collected", 60, || {
            cri_snapshots() == before && l.env.snapshot_dirs().len() == before
        });
    }
    cri.remove_pod(&pod);
    cri.remove_image(&pause);
    let Lazy { env, dedupd, proxy, .. } = l;
    env.remove_everything();
    env.stop();
    drop(proxy);
    drop(dedupd);
}

// ---------------------------------------------------------------------------------------------------------------

/// The source python image's layers extracted in order into one directory: the reference for file contents.
fn source_rootfs(dir: &Path) {
    let layout = sh(&format!("{}/scripts/build-python-image.sh path", repo_root().display()));
    let layout = layout.trim();
    let index: serde_json::Value = serde_json::from_slice(&fs::read(format!("{layout}/index.json")).unwrap()).unwrap();
    let blob = |d: &str| format!("{layout}/blobs/sha256/{}", d.trim_start_matches("sha256:"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap()).unwrap();
    fs::create_dir_all(dir).unwrap();
    for l in manifest["layers"].as_array().unwrap() {
        sh(&format!(
            "tar -xzf {} -C {} --no-same-owner",
            blob(l["digest"].as_str().unwrap()),
            dir.display()
        ));
    }
}

/// The exit status of container `id`'s task once it stopped (None while it runs), from containerd's Tasks service.
fn task_exit_status(env: &Env, id: &str) -> Option<u32> {
    use containerd_client::services::v1 as pb;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = containerd_client::connect(&env.ctrd_sock)
            .await
            .expect("connect containerd");
        let mut c = pb::tasks_client::TasksClient::new(ch);
        let mut r = tonic::Request::new(pb::GetRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        });
        r.metadata_mut().insert("containerd-namespace", env.ns.parse().unwrap());
        let p = c
            .get(r)
            .await
            .expect("Tasks.Get")
            .into_inner()
            .process
            .expect("the task's process");
        (p.status == containerd_client::types::v1::Status::Stopped as i32).then_some(p.exit_status)
    })
}

/// One read of a whole file through a running container's root file system.
#[derive(Debug)]
struct LazyRead {
    path: String,
    started: Instant,
    ended: Instant,
    /// The bytes' sha256, or the errno of the failed read.
    result: Result<String, i32>,
}

fn read_one(rootfs: &Path, rel: &str) -> LazyRead {
    let started = Instant::now();
    let result = fs::read(rootfs.join(rel))
        .map(|b| common::sha256_hex(&b))
        .map_err(|e| e.raw_os_error().unwrap_or(-1));
    LazyRead {
        path: rel.to_string(),
        started,
        ended: Instant::now(),
        result,
    }
}

/// A whole file mapped and locked in memory, so its pages stay cached whatever serves the file.
struct Pinned {
    addr: *mut libc::c_void,
    len: usize,
}

impl Pinned {
    fn new(path: &Path) -> Pinned {
        let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let len = f.metadata().expect("stat").len() as usize;
        assert!(len > 0, "{} is empty", path.display());
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh read-only shared mapping of an open file; unmapped once in Drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        // SAFETY: the range is the mapping just made.
        let rc = unsafe { libc::mlock(addr, len) };
        assert_eq!(rc, 0, "mlock {}: {}", path.display(), std::io::Error::last_os_error());
        Pinned { addr, len }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new, unmapped only here.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

fn errno_name(e: i32) -> String {
    match e {
        libc::EIO => "EIO".into(),
        libc::ENOTCONN => "ENOTCONN".into(),
        libc::ECONNABORTED => "ECONNABORTED".into(),
        libc::EINTR => "EINTR".into(),
        libc::ENXIO => "ENXIO".into(),
        _ => format!("errno {e}"),
    }
}

/// Regular files of at least `min` bytes under `dirs` of `rootfs` (relative paths, sorted).
fn files_under(rootfs: &Path, dirs: &[&str], min: u64) -> Vec<String> {
    fn walk(base: &Path, d: &Path, min: u64, out: &mut Vec<String>) {
        let Ok(rd) = fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(md) = fs::symlink_metadata(&p) else { continue };
            if md.is_dir() {
                walk(base, &p, min, out);
            } else if md.is_file() && md.len() >= min {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    for d in dirs {
        walk(rootfs, &rootfs.join(d), min, &mut out);
    }
    out.sort();
    out
}

/// Starts container `id` of the lazy image, python3 sleeping (its start already read), and returns its root file
/// system as the host sees it.
fn sleeping_container(l: &Lazy, id: &str) -> PathBuf {
    l.env.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "dedup",
        &l.lazy,
        id,
        "python3",
        "-c",
        "import time; time.sleep(3600)",
    ]);
    l.env.wait_until("the burst container to run", 60, || {
        l.env.task_status(id).as_deref() == Some("RUNNING")
    });
    let suffix = format!("/{id}/rootfs");
    PathBuf::from(
        mountinfo()
            .into_iter()
            .find(|m| m.fstype == "overlay" && m.point.ends_with(&suffix))
            .unwrap_or_else(|| panic!("no overlay mount of the container's rootfs (…{suffix})"))
            .point,
    )
}

/// Up to `n` files never read yet, but `except` (and larger than a block, so their data is not inline in the
/// metadata), that the reference has too.
fn cold_files(rootfs: &Path, reference: &Path, except: &[&str], n: usize) -> Vec<String> {
    let cold: Vec<String> = files_under(
        rootfs,
        &["usr/share", "usr/lib/x86_64-linux-gnu", "usr/lib/python3.11"],
        64 << 10,
    )
    .into_iter()
    .filter(|p| !except.contains(&p.as_str()) && reference.join(p).is_file())
    .take(n)
    .collect();
    assert!(cold.len() >= 100, "only {} cold files", cold.len());
    cold
}

/// Four readers taking `files` in turn, each read whole through `rootfs`; their results in completion order.
type Results = std::sync::Arc<std::sync::Mutex<Vec<LazyRead>>>;
fn burst(rootfs: &Path, files: &[String]) -> (Vec<std::thread::JoinHandle<()>>, Results) {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let results: Results = Default::default();
    let readers = (0..4)
        .map(|_| {
            let (next, results, files, rootfs) = (next.clone(), results.clone(), files.to_vec(), rootfs.to_path_buf());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(rel) = files.get(i) else { return };
                let r = read_one(&rootfs, rel);
                results.lock().unwrap().push(r);
            })
        })
        .collect();
    (readers, results)
}

/// Kill -9 of dedupd while four readers pull unfetched files through a running container's root file system
/// (lazy layers, a 4 MB/s registry, no prefetch). What the running container sees, asserted:
/// - every read that completed before the kill returned the file's exact bytes;
/// - every read that did not complete before the kill failed with EIO (the FUSE connection is gone: the backing
///   file's reads fail, and EROFS reports that as EIO), or returned exactly the right bytes; none returned wrong
///   bytes, and reads of unfetched data fail at once, without waiting for the read deadline;
/// - data the container had pinned (mapped and mlocked) stays readable (the kernel's page cache of the EROFS
///   mount); data it had only read gives the right bytes or EIO once the kernel has evicted it;
/// - the container's process, though idle, dies of SIGBUS (exit status 135) within seconds; its root file system
///   stays broken for unfetched data after dedupd's restart (its mounts hold the dead FUSE connection's file),
///   while new containers work: the snapshotter mounts the lazy layers again from the new dedupd, and they read
///   the same files with the right bytes.
#[test]
fn kill_dedupd_during_a_burst_of_lazy_reads_on_the_fuse_path() {
    let _serial = e2e::serial();
    let mut l = Lazy::start(
        "oci",
        4_000_000,
        &["--no-prefetch", "--read-deadline-secs", "30", "--data-path", "fuse"],
    );
    assert_eq!(l.dedupd.client().ping().unwrap().data_path, "fuse");
    let pulled = l.pull(&l.lazy);
    assert_eq!(pulled["lazy"].as_u64(), Some(2), "{pulled}");
    l.check_lazy_layers();
    let reference = l.env.dir.join("source-rootfs");
    source_rootfs(&reference);

    // A running container: python3 sleeping, its start already read (the interpreter and its libraries).
    let id = "burst";
    let rootfs = sleeping_container(&l, id);
    let want = |rel: &str| common::sha256_file(&reference.join(rel));

    // Warm files: read whole before the kill.
    let warm = [
        "usr/bin/dpkg",
        "usr/lib/x86_64-linux-gnu/libapt-pkg.so.6.0.0",
        "usr/bin/perl",
    ];
    for w in warm {
        let r = read_one(&rootfs, w);
        assert_eq!(r.result.as_ref().ok(), Some(&want(w)), "warm read of {w}: {r:?}");
    }
    // The kernel may evict clean page cache at any time, so only pinned pages are sure to outlive dedupd: the warm
    // files are mapped and mlocked, as a running program's hot pages would be.
    let pins: Vec<Pinned> = warm.iter().map(|w| Pinned::new(&rootfs.join(w))).collect();
    let cold = cold_files(&rootfs, &reference, &warm, 400);

    assert_eq!(
        l.env.task_status(id).as_deref(),
        Some("RUNNING"),
        "the container before the kill"
    );

    // The burst: four readers; dedupd dies once ten reads have completed.
    let started = Instant::now();
    let (readers, results) = burst(&rootfs, &cold);
    loop {
        let done = results.lock().unwrap().len();
        if done >= 10 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "only {done} lazy reads completed in 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let before_kill = Instant::now();
    l.dedupd.kill9();
    let killed = Instant::now();
    for r in readers {
        r.join().expect("reader thread");
    }
    let results = std::mem::take(&mut *results.lock().unwrap());
    let after_burst = Instant::now();

    let mut completed_before = 0;
    let mut later_ok = 0;
    let mut errnos = std::collections::BTreeMap::<String, usize>::new();
    let mut slowest_failure = Duration::ZERO;
    let mut failed = Vec::new();
    for r in &results {
        match &r.result {
            Ok(sha) => {
                assert_eq!(sha, &want(&r.path), "wrong bytes from a lazy read of {}", r.path);
                if r.ended < before_kill {
                    completed_before += 1;
                } else {
                    later_ok += 1;
                }
            }
            Err(e) => {
                assert!(
                    r.ended >= before_kill,
                    "{} failed ({}) before dedupd was killed",
                    r.path,
                    errno_name(*e)
                );
                *errnos.entry(errno_name(*e)).or_default() += 1;
                if r.started >= killed {
                    slowest_failure = slowest_failure.max(r.ended - r.started);
                }
                failed.push(r.path.clone());
            }
        }
    }
    eprintln!(
        "e2e: burst of {} lazy reads, dedupd killed {:.2}s in: {completed_before} completed before the kill, \
         {later_ok} read right after it (page cache), failures by errno {errnos:?}, slowest failure after the \
         kill {:.3}s, the burst ended {:.2}s after the kill",
        results.len(),
        (before_kill - started).as_secs_f64(),
        slowest_failure.as_secs_f64(),
        (after_burst - killed).as_secs_f64()
    );
    assert!(
        completed_before >= 10,
        "{completed_before} reads completed before the kill"
    );
    assert!(!failed.is_empty(), "no read failed after dedupd was killed");
    assert_eq!(
        errnos.keys().cloned().collect::<Vec<_>>(),
        vec!["EIO".to_string()],
        "reads of unfetched data after the kill must fail with EIO, and only so"
    );
    assert!(
        slowest_failure < Duration::from_secs(5),
        "a failing read took {slowest_failure:?}: it waited instead of failing at once"
    );

    // What the container had pinned stays readable: the page cache of its EROFS mounts.
    for w in warm {
        let r = read_one(&rootfs, w);
        assert_eq!(
            r.result.as_ref().ok(),
            Some(&want(w)),
            "re-read of pinned {w} after the kill: {r:?}"
        );
    }
    // Mapped, they would keep the container's root busy.
    drop(pins);
    // What it had only read may have been evicted since: a re-read gives the right bytes or EIO, never others.
    let mut cached = 0;
    for w in results.iter().filter(|r| r.result.is_ok() && r.ended < before_kill) {
        let r = read_one(&rootfs, &w.path);
        match &r.result {
            Ok(sha) => {
                assert_eq!(sha, &want(&w.path), "re-read of {} after the kill", w.path);
                cached += 1;
            }
            Err(e) => assert_eq!(*e, libc::EIO, "re-read of {} after the kill: {r:?}", w.path),
        }
    }
    eprintln!("e2e: {cached} of {completed_before} files read before the kill were still cached");
    // Its process, idle in a sleep, does not survive: it dies of SIGBUS (exit status 128 + 7) within seconds, as
    // a process does whose mapped file (here the interpreter and its libraries) can no longer be read.
    let t = Instant::now();
    let exit = loop {
        if let Some(code) = task_exit_status(&l.env, id) {
            break code;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the container's process still runs 20 s after dedupd was killed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "e2e: the container's process exited with status {exit} {:.2}s after dedupd was killed",
        (Instant::now() - killed).as_secs_f64()
    );
    assert_eq!(exit, 128 + libc::SIGBUS as u32, "the container's exit status");

    // dedupd restarted: the old container's root file system stays broken for what was never fetched ...
    l.dedupd.spawn();
    let probe = &failed[0];
    let r = read_one(&rootfs, probe);
    eprintln!("e2e: the old container's rootfs re-reads {probe} after dedupd's restart: {r:?}");
    assert_eq!(
        r.result.map_err(errno_name),
        Err("EIO".to_string()),
        "the old container's mount of {probe} after dedupd's restart"
    );
    // ... and new containers work, reading the same files with the right bytes.
    assert_eq!(
        l.run(&l.lazy, "after-kill", &["python3", "-c", "print(42)"]).trim(),
        "42"
    );
    let probes: Vec<String> = failed.iter().take(5).map(|p| format!("/{p}")).collect();
    let mut args = vec!["sha256sum"];
    args.extend(probes.iter().map(String::as_str));
    let sums = l.run(&l.lazy, "after-kill-read", &args);
    for p in failed.iter().take(5) {
        let hex = want(p).trim_start_matches("sha256:").to_string();
        assert!(
            sums.lines()
                .any(|x| x.starts_with(&hex) && x.ends_with(&format!("/{p}"))),
            "a new container read {p} wrong or not at all:\n{sums}"
        );
    }
    assert!(
        l.env
            .log()
            .contains("fetch daemon restarted: mounting the lazy layer again"),
        "the snapshotter did not remount after dedupd's restart"
    );
    l.env.remove_container(id);
    l.stop();
}

/// Kill -9 of dedupd while four readers pull unfetched files through a running container's root file system, on
/// the fanotify data path (lazy layers, a 4 MB/s registry, no prefetch). The EROFS layers are mounted on dedupd's
/// cache files and the fanotify group outlives dedupd in its holder, so asserted:
/// - no read fails and none returns wrong bytes: reads in flight at the kill, and reads started while no dedupd
///   runs, wait and complete with the file's exact bytes once dedupd is back;
/// - a read was still waiting when dedupd came back (the restart window was really crossed);
/// - the container keeps running (no SIGBUS), and the snapshotter does not mount the layers again: the restarted
///   dedupd is the same instance;
/// - a new container of the image starts after the restart.
#[test]
fn kill_dedupd_during_a_burst_of_lazy_reads_on_the_fanotify_path() {
    let _serial = e2e::serial();
    let mut l = Lazy::start(
        "oci",
        4_000_000,
        &["--no-prefetch", "--read-deadline-secs", "60", "--data-path", "fanotify"],
    );
    let ping = l.dedupd.client().ping().unwrap();
    assert_eq!(ping.data_path, "fanotify");
    let pulled = l.pull(&l.lazy);
    assert_eq!(pulled["lazy"].as_u64(), Some(2), "{pulled}");
    l.check_lazy_layers();
    let reference = l.env.dir.join("source-rootfs");
    source_rootfs(&reference);
    let id = "burst-fan";
    let rootfs = sleeping_container(&l, id);
    // The lazy layers are EROFS mounts of dedupd's cache files, not of a FUSE file.
    let erofs: Vec<_> = mountinfo().into_iter().filter(|m| m.fstype == "erofs").collect();
    assert!(
        erofs
            .iter()
            .any(|m| m.source.contains("/cache/blobs/") && m.source.ends_with(".data")),
        "no EROFS mount of a cache file: {:?}",
        erofs.iter().map(|m| &m.source).collect::<Vec<_>>()
    );
    let want = |rel: &str| common::sha256_file(&reference.join(rel));
    let cold = cold_files(&rootfs, &reference, &[], 200);
    let (readers, results) = burst(&rootfs, &cold);
    let t = Instant::now();
    while results.lock().unwrap().len() < 10 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "ten reads did not complete in 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    l.dedupd.kill9();
    let killed = Instant::now();
    // No dedupd for two seconds: readers wait (in flight, or newly queued by the kernel).
    std::thread::sleep(Duration::from_secs(2));
    let done_while_dead = results.lock().unwrap().len();
    l.dedupd.spawn();
    let restarted = Instant::now();
    assert_eq!(
        l.dedupd.client().ping().unwrap().instance,
        ping.instance,
        "the restarted dedupd has another fanotify group"
    );
    for r in readers {
        r.join().unwrap();
    }
    let results = std::mem::take(&mut *results.lock().unwrap());
    assert_eq!(results.len(), cold.len());
    let mut waited_across = 0;
    for r in &results {
        match &r.result {
            Ok(sum) => assert_eq!(sum, &want(&r.path), "wrong bytes for {}", r.path),
            Err(e) => panic!(
                "{} failed with {} ({:?} after the kill)",
                r.path,
                errno_name(*e),
                r.ended.saturating_duration_since(killed)
            ),
        }
        if r.started < restarted && r.ended > restarted {
            waited_across += 1;
        }
    }
    eprintln!(
        "e2e: fanotify burst: {} reads, {done_while_dead} done before the restart, {waited_across} waited across it",
        results.len()
    );
    assert!(waited_across > 0, "no read waited across the restart");
    assert_eq!(l.env.task_status(id).as_deref(), Some("RUNNING"), "the container died");
    assert!(
        !l.env
            .log()
            .contains("fetch daemon restarted: mounting the lazy layer again"),
        "the snapshotter mounted the lazy layers again"
    );
    assert_eq!(
        l.run(&l.lazy, "after-restart", &["python3", "-c", "print(42)"]).trim(),
        "42"
    );
    l.env.remove_container(id);
    l.stop();
}

/// An image converted with `--chunk-compression zstd` pulls lazily: each layer's blob in the registry is its
/// chunks as independent zstd frames, dedupd fetches the frames a read needs, verifies what they decode to and
/// serves the uncompressed image; the container sees the source image's bytes; the whole blob ends up fetched,
/// verified against the uncompressed digest, having moved about the compressed size, not the image's.
#[test]
fn compressed_chunks_pull_lazily_and_run() {
    let _serial = e2e::serial();
    let l = Lazy::start("oci+zstd", 0, &[]);
    let mut stored = 0u64;
    let mut image = 0u64;
    for layer in l.converted["layers"].as_array().unwrap() {
        stored += layer["size"].as_u64().unwrap();
        image += layer["uncompressed_size"].as_u64().unwrap();
        assert_ne!(layer["digest"], layer["uncompressed_digest"], "{layer}");
    }
    let source: u64 = l.converted["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["source_size"].as_u64().unwrap())
        .sum();
    eprintln!("e2e: compressed chunks: {stored} bytes stored for {image} bytes of images (gzip source {source})");
    assert!(
        stored * 10 < source * 12,
        "the converted image is {stored} bytes, over 1.2x the source's {source}"
    );
    let pulled = l.pull(&l.lazy);
    assert_eq!(
        (pulled["lazy"].as_u64(), pulled["unpacked"].as_u64()),
        (Some(2), Some(0)),
        "{pulled}"
    );
    l.check_lazy_layers();
    assert_eq!(l.run(&l.lazy, "py", &["python3", "-c", "print(42)"]).trim(), "42");
    let apt = source_sha256("usr/lib/x86_64-linux-gnu/libapt-pkg.so.6.0.0");
    let out = sha_in(&l, "apt", "/usr/lib/x86_64-linux-gnu/libapt-pkg.so.6.0.0");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&apt),
        "{}",
        describe("sha256sum", &out)
    );
    for b in l.dedupd.blobs() {
        let s = l
            .dedupd
            .client()
            .wait(&b.digest, Duration::from_secs(300))
            .expect("wait");
        assert!(s.complete && s.verified, "{s:?}");
    }
    let fetched: u64 = l.dedupd.blobs().iter().map(|b| b.fetched_bytes).sum();
    assert!(
        fetched <= stored + stored / 10 && fetched < image,
        "dedupd fetched {fetched} bytes for {stored} stored ({image} uncompressed)"
    );
    l.stop();
}

/// Pushes, as `tag`, the image manifest of `python:latest` with one annotation more (same config and layers, another
/// digest); returns the new manifest's descriptor (media type, digest, size).
fn manifest_copy(l: &Lazy, tag: &str) -> (String, String, u64) {
    let client = registry::Client::new(Default::default()).unwrap();
    let src = registry::Reference::parse(&l.source).unwrap();
    let m = client.get_manifest(&src).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
    v["annotations"]["dev.dedup-snapshotter.test"] = serde_json::Value::String(tag.into());
    let bytes = serde_json::to_vec(&v).unwrap();
    let dst = registry::Reference::parse(&format!("{}/python:{tag}", l.env.registry)).unwrap();
    let digest = client.put_manifest(&dst, &m.media_type, &bytes).unwrap();
    (m.media_type, digest, bytes.len() as u64)
}

/// Pushes a copy of `python:latest`'s tar-index artifact for the manifest `subject`, with `edit` applied to layer 0's
/// bundle; returns the artifact's digest.
fn artifact_copy(l: &Lazy, subject: &(String, String, u64), edit: impl FnOnce(&mut image_convert::Bundle)) -> String {
    let client = registry::Client::new(Default::default()).unwrap();
    let src = registry::Reference::parse(&l.source).unwrap();
    let artifact = l.converted["artifact_digest"].as_str().unwrap();
    let m = client.get_manifest(&src.with_digest(artifact).unwrap()).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
    let layer0 = v["layers"][0]["digest"].as_str().unwrap().to_string();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut client.get_blob(src.repo(), &layer0).unwrap(), &mut bytes).unwrap();
    let mut bundle = image_convert::Bundle::from_bytes(&bytes).unwrap();
    edit(&mut bundle);
    let bytes = bundle.to_bytes().unwrap();
    let digest = registry::sha256_digest(&bytes);
    client
        .push_blob(src.repo(), &digest, bytes.len() as u64, &bytes[..])
        .unwrap();
    v["layers"][0]["digest"] = serde_json::Value::String(digest);
    v["layers"][0]["size"] = serde_json::json!(bytes.len());
    v["subject"] = serde_json::json!({"mediaType": subject.0, "digest": subject.1, "size": subject.2});
    client
        .push_referrer(src.repo(), &serde_json::to_vec(&v).unwrap(), registry::OCI_MANIFEST)
        .unwrap()
}

/// Issue 17: the unmodified gzip python image, with the artifact `index-image` pushed next to it, pulled by CRI
/// (containerd 1.7 and 2.1) from a throttled proxy: every layer is mounted from its tar index at once (containerd downloads
/// no layer), dedupd serves the uncompressed tars from Range requests on the original gzip blobs, the container
/// prints before the layers are fetched, and the background fetch completes and verifies them (chunk digests, then
/// the diffID). Bad indexes: one whose first chunk does not match its digest makes that layer a full pull (the
/// other layer stays lazy); an artifact that names another manifest as its subject is ignored.
fn cri_pull_through_a_tar_index(version: &str, data_path: &str) {
    let _serial = e2e::serial();
    let l = Lazy::start_indexed(
        20_000_000,
        &[
            "--prefetch-rate",
            "10000000",
            "--read-deadline-secs",
            "30",
            "--data-path",
            data_path,
        ],
        Some(version),
    );
    assert_eq!(l.dedupd.client().ping().unwrap().data_path, data_path);
    let layers = l.converted["layers"].as_array().unwrap();
    for x in layers {
        assert!(
            x["skipped"].is_null() && x["bundle_digest"].is_string(),
            "every gzip layer is indexed: {x}"
        );
    }
    let image_bytes = l.converted["image_bytes"].as_u64().unwrap();
    let artifact_bytes = l.converted["artifact_bytes"].as_u64().unwrap();
    assert!(
        artifact_bytes > 0 && artifact_bytes * 10 < image_bytes,
        "the artifact ({artifact_bytes} bytes) should be a few percent of the image ({image_bytes} bytes)"
    );
    // The image is untouched: its tag still names the manifest the artifact refers to.
    let client = registry::Client::new(Default::default()).unwrap();
    let m = client
        .get_manifest(&registry::Reference::parse(&l.source).unwrap())
        .unwrap();
    assert_eq!(
        registry::sha256_digest(&m.bytes),
        l.converted["manifest_digest"].as_str().unwrap()
    );

    let mut cri = Cri::connect(&l.env.ctrd_sock);
    let pause = format!("{}/pause:latest", l.env.registry);
    cri.pull(&pause);
    let pod = cri.run_pod("index", &l.env.dir.join("pods"));
    let layer_digests: Vec<String> = layers
        .iter()
        .map(|x| x["digest"].as_str().unwrap().to_string())
        .collect();
    let snapshots = || {
        l.env
            .ctr_in(CRI_NAMESPACE, &["snapshots", "--snapshotter", "dedup", "ls"])
            .lines()
            .count()
    };
    // The sandbox's: what stays while the pod runs.
    let base = snapshots();
    let collected = |cri: &mut Cri, image: &str| {
        cri.remove_image(image);
        l.env
            .wait_until("CRI's snapshots to be collected", 60, || snapshots() <= base);
    };

    // 1. An artifact whose first chunk digest is wrong: layer 0 is pulled in full, layer 1 lazily.
    let corrupt = manifest_copy(&l, "corrupt");
    artifact_copy(&l, &corrupt, |b| b.index.chunk_digests[0][0] ^= 1);
    let image = format!("{}/python:corrupt", l.proxy.addr);
    cri.pull(&image);
    let content = l.env.ctr_in(CRI_NAMESPACE, &["content", "ls", "-q"]);
    assert!(
        content.contains(&layer_digests[0]),
        "layer 0 should have been downloaded: {content}"
    );
    // containerd may have fetched layer 1 meanwhile (it downloads ahead of unpacking), but the snapshotter mounted
    // it from its index: dedupd serves it, and not layer 0.
    let served: Vec<String> = l.dedupd.blobs().into_iter().map(|b| b.digest).collect();
    assert_eq!(served, vec![layer_digests[1].clone()], "only layer 1 should be lazy");
    assert!(
        l.env.log().contains("tar index refused"),
        "the snapshotter should say why layer 0 is pulled in full"
    );
    let id = cri.start_container(&pod, "corrupt", &image, &["python3", "-c", "print(42)"]);
    assert_eq!(cri.wait_exit(&id, Duration::from_secs(120)), 0);
    assert_eq!(Cri::logs(&pod, "corrupt").trim(), "42");
    cri.remove_container(&id);
    collected(&mut cri, &image);
    let _ = l.env.ctr_in(CRI_NAMESPACE, &["content", "rm", &layer_digests[0]]);

    // 2. An artifact of another manifest, listed among this one's referrers: ignored, a full pull.
    let other = manifest_copy(&l, "other");
    let artifact = l.converted["artifact_digest"].as_str().unwrap();
    let m = client
        .get_manifest(
            &registry::Reference::parse(&l.source)
                .unwrap()
                .with_digest(artifact)
                .unwrap(),
        )
        .unwrap();
    let tag_index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": registry::OCI_INDEX,
        "manifests": [{"mediaType": registry::OCI_MANIFEST, "digest": artifact, "size": m.bytes.len(),
                       "artifactType": image_convert::index::TARINDEX_ARTIFACT_TYPE}],
    });
    let tag = format!(
        "{}/python:sha256-{}",
        l.env.registry,
        other.1.trim_start_matches("sha256:")
    );
    client
        .put_manifest(
            &registry::Reference::parse(&tag).unwrap(),
            registry::OCI_INDEX,
            &serde_json::to_vec(&tag_index).unwrap(),
        )
        .unwrap();
    let image = format!("{}/python:other", l.proxy.addr);
    cri.pull(&image);
    let content = l.env.ctr_in(CRI_NAMESPACE, &["content", "ls", "-q"]);
    for d in &layer_digests {
        assert!(content.contains(d), "layer {d} should have been downloaded: {content}");
    }
    assert!(
        l.env.log().contains("tar index artifact of another manifest: ignored"),
        "the snapshotter should say it ignored the artifact"
    );
    collected(&mut cri, &image);
    for d in &layer_digests {
        let _ = l.env.ctr_in(CRI_NAMESPACE, &["content", "rm", d]);
    }

    // 3. The image itself: lazy through its index.
    let total: u64 = layers.iter().map(|x| x["size"].as_u64().unwrap()).sum();
    let t = Instant::now();
    cri.pull(&l.lazy);
    let pull_s = t.elapsed().as_secs_f64();
    l.check_lazy_layers();
    let content = l.env.ctr_in(CRI_NAMESPACE, &["content", "ls", "-q"]);
    for d in &layer_digests {
        assert!(!content.contains(d), "containerd downloaded layer {d}: {content}");
    }
    let id = cri.start_container(&pod, "py", &l.lazy, &["python3", "-c", "print(42)"]);
    let code = cri.wait_exit(&id, Duration::from_secs(120));
    let first_s = t.elapsed().as_secs_f64();
    let fetched = l.fetched();
    let blobs = l.dedupd.blobs();
    let out = Cri::logs(&pod, "py");
    eprintln!(
        "e2e: tar index on containerd {version}: PullImage {pull_s:.2}s, first output {first_s:.2}s, {fetched} of {total} \
         compressed bytes fetched then ({:.1}%)",
        100.0 * fetched as f64 / total as f64
    );
    assert_eq!((code, out.trim()), (0, "42"), "the container's log: {out:?}");
    assert!(
        fetched < total / 2,
        "{fetched} of {total} bytes were fetched before the first output"
    );
    assert!(
        blobs.iter().any(|b| !b.complete),
        "every layer was already fetched when the container printed: {blobs:?}"
    );
    // The background fetch completes every layer and checks it against its diffID.
    l.env
        .wait_until("the tar-index layers to be fetched and verified", 180, || {
            let b = l.dedupd.blobs();
            b.len() == layer_digests.len() && b.iter().all(|b| b.complete && b.verified)
        });
    assert!(l.dedupd.blobs().iter().all(|b| b.errors == 0), "{:?}", l.dedupd.blobs());
    // A file read through the index is the file of the layer.
    let want = source_sha256("usr/bin/bash");
    let id = cri.start_container(&pod, "sha", &l.lazy, &["sha256sum", "/usr/bin/bash"]);
    assert_eq!(cri.wait_exit(&id, Duration::from_secs(120)), 0);
    let got = Cri::logs(&pod, "sha");
    assert!(got.starts_with(&want), "sha256sum /usr/bin/bash: {got:?}, want {want}");

    cri.remove_pod(&pod);
    for image in [&l.lazy, &pause] {
        cri.remove_image(image);
    }
    l.env.wait_until("CRI's snapshots to be collected", 60, || {
        l.env
            .ctr_in(CRI_NAMESPACE, &["snapshots", "--snapshotter", "dedup", "ls"])
            .lines()
            .count()
            <= 1
    });
    let kept: Vec<_> = fs::read_dir(l.env.root.join("tarindex"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(kept.is_empty(), "tar indexes left after their layers went: {kept:?}");
    l.stop();
}

/// containerd 1.7, dedupd on its FUSE data path.
#[test]
fn cri_pull_of_an_unmodified_image_through_its_tar_index_on_containerd_1_7_fuse() {
    cri_pull_through_a_tar_index("1.7", "fuse");
}

/// containerd 2.1, dedupd on its fanotify data path.
#[test]
fn cri_pull_of_an_unmodified_image_through_its_tar_index_on_containerd_2_1_fanotify() {
    cri_pull_through_a_tar_index("2.1", "fanotify");
}

/// containerd 1.6 (no CRI plugin here): its client-side unpacker with CRI's labels (`diffclient -cri-labels`), as
/// the kubelet's pulls label layers; the unmodified image mounts from its tar index and runs.
#[test]
fn labelled_pull_of_an_unmodified_image_through_its_tar_index_on_containerd_1_6() {
    let _serial = e2e::serial();
    let l = Lazy::start_indexed(20_000_000, &["--read-deadline-secs", "30"], None);
    l.dc(&["-cri-labels", "pull", &l.lazy]);
    l.check_lazy_layers();
    let content = l.env.ctr(&["content", "ls", "-q"]);
    for layer in l.converted["layers"].as_array().unwrap() {
        let d = layer["digest"].as_str().unwrap();
        assert!(!content.contains(d), "containerd downloaded layer {d}: {content}");
    }
    assert_eq!(l.run(&l.lazy, "indexed", &["python3", "-c", "print(42)"]).trim(), "42");
    l.stop();
}
