//! The daemon's Diff service (containerd.services.diff.v1.Diff) end to end, driven by containerd 1.6's own client
//! code (`scripts/harness/diffclient.sh`, the unpacker `ctr`/nerdctl use) and, where a test must look at a
//! snapshot between Apply and Commit, by gRPC calls straight to the daemon.
//!
//! - Apply: busybox, layered and minbase pulled with every layer applied by our erofs differ; each committed layer's
//!   `layer.erofs` carries the UUID the differ derives from the compressed blob's digest (a Commit-time conversion
//!   would carry the snapshot id), passes fsck.erofs, and leaves `fs/` empty; the top view equals the same image
//!   unpacked by containerd's builtin overlayfs snapshotter, entry by entry.
//! - Native EROFS layers (`application/vnd.erofs.layer.v1`, `+zstd` as one stream or as convert-image's
//!   `--chunk-compression zstd` frames with a seek table; `+gzip` refused).
//! - Round trips Compare -> Apply through the erofs differ (our snapshots) and through the walking differ
//!   (containerd's overlayfs snapshotter), with every kind of change an upper dir can hold.
//! - Fall-through: a daemon with `--differs erofs` answers Unimplemented for mounts that are not its own.
//! - Bad input: corrupt and truncated blobs leave nothing behind; hostile tars stay inside the target.
//!
//! Needs root, the e2e tools (see tests/e2e/mod.rs), Go (diffclient builds with Debian's containerd sources).
//!
//!     cargo test --release -p dedup-snapshotter --test e2e_diff -- --nocapture

mod common;
mod e2e;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{compare_trees, lsetxattr, set_mtime, sha256_file, snapshot_tree, CompareOpts, Tree};
use containerd_client::services::v1 as pb;
use containerd_client::services::v1::snapshots as spb;
use containerd_client::types::{Descriptor as PbDescriptor, Mount as PbMount};
use e2e::{describe, host_sh, Env};
use tonic::Request;

const CACHE: &str = "/var/cache/dedup-snapshotter-tests";
const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const EROFS_LAYER: &str = "application/vnd.erofs.layer.v1";

fn diffclient_path() -> PathBuf {
    let p =
        PathBuf::from(std::env::var("DIFFCLIENT").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/harness/diffclient.sh").to_string()
        }));
    assert!(
        p.is_file(),
        "{} is missing: these tests drive the Diff service with containerd's own client code (set DIFFCLIENT)",
        p.display()
    );
    p
}

/// An environment whose daemon serves the Diff service, dialling back the environment's containerd
/// (`{root}/../containerd.sock` is DIR/containerd.sock: the directory is only known once the script made it).
fn start_env() -> Env {
    // SAFETY (edition 2021: safe call): the e2e tests hold `e2e::serial()`, so no other test reads it meanwhile.
    std::env::set_var(
        "E2E_SNAPSHOTTER_CMD",
        format!(
            "{} serve --root {{root}} --address {{socket}} --containerd {{root}}/../containerd.sock",
            env!("CARGO_BIN_EXE_dedup-snapshotter")
        ),
    );
    diffclient_path();
    common::require_commands(
        &["zstd", "gzip", "python3", "mount", "umount"],
        "apt-get install -y zstd gzip python3 mount",
    );
    Env::start()
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

fn digest_bytes(d: &str) -> [u8; 32] {
    let hex = d
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("not a sha256 digest: {d}"));
    let v = hex::decode(hex).expect("hex digest");
    v.try_into().expect("32 bytes")
}

/// The UUID the erofs differ gives the image of a layer blob (RFC 4122 version/variant bits over the first 16
/// bytes of the compressed blob's sha256: `uuid_from` in crates/layer-convert/src/convert.rs).
fn differ_uuid(blob_digest: &str) -> [u8; 16] {
    let d = digest_bytes(blob_digest);
    let mut u: [u8; 16] = d[..16].try_into().unwrap();
    u[6] = (u[6] & 0x0f) | 0x50;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// The superblock UUID of an EROFS image (superblock at 1024, uuid at +48).
fn image_uuid(image: &Path) -> [u8; 16] {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(image).unwrap_or_else(|e| panic!("open {}: {e}", image.display()));
    let mut u = [0u8; 16];
    f.read_exact_at(&mut u, 1024 + 48)
        .unwrap_or_else(|e| panic!("read the superblock of {}: {e}", image.display()));
    u
}

fn fsck(image: &Path) {
    let out = Command::new("fsck.erofs")
        .arg(image)
        .output()
        .expect("spawn fsck.erofs");
    assert!(
        out.status.success(),
        "{}",
        describe(&format!("fsck.erofs {}", image.display()), &out)
    );
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            // CSI: ESC [ params final-byte
            if it.peek() == Some(&'[') {
                it.next();
                for c in it.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A layer as a manifest lists it.
#[derive(Clone, Debug)]
struct Layer {
    digest: String,
    media_type: String,
    size: u64,
}

/// A snapshot (or view) mounted in a temporary directory; unmounted and its view removed on drop.
struct Mounted {
    dir: tempfile::TempDir,
    ctrd: String,
    ns: String,
    snapshotter: String,
    view: Option<String>,
}

impl Mounted {
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
        if let Some(v) = &self.view {
            let _ = Command::new("ctr")
                .args([
                    "-a",
                    &self.ctrd,
                    "-n",
                    &self.ns,
                    "snapshot",
                    "--snapshotter",
                    &self.snapshotter,
                    "rm",
                    v,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// What the tests need on top of [`Env`].
struct T {
    env: Env,
    diffclient: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl T {
    fn new() -> T {
        let env = start_env();
        T {
            env,
            diffclient: diffclient_path(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime"),
        }
    }

    fn our_sock(&self) -> String {
        self.env.var("E2E_SNAPSHOTTER_SOCK")
    }

    /// Runs diffclient against `diff_sock` (None: containerd's own differ) for `snapshotter`.
    fn dc_raw(&self, diff_sock: Option<&str>, snapshotter: &str, args: &[&str]) -> Output {
        let mut c = Command::new("timeout");
        c.args(["-k", "5", "300"])
            .arg(&self.diffclient)
            .args(["-address", &self.env.ctrd_sock]);
        if let Some(s) = diff_sock {
            c.args(["-diff", s]);
        }
        c.args(["-snapshotter", snapshotter, "-namespace", &self.env.ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("spawn diffclient")
    }

    /// diffclient through OUR Diff service; panics on failure; returns the JSON it prints.
    fn dc(&self, snapshotter: &str, args: &[&str]) -> serde_json::Value {
        let out = self.dc_raw(Some(&self.our_sock()), snapshotter, args);
        if !out.status.success() {
            self.env.dump_logs();
        }
        assert!(
            out.status.success(),
            "{}",
            describe(
                &format!("diffclient -snapshotter {snapshotter} {}", args.join(" ")),
                &out
            )
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "diffclient printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn sn(&self, snapshotter: &str, args: &[&str]) -> String {
        let mut a = vec!["snapshot", "--snapshotter", snapshotter];
        a.extend_from_slice(args);
        self.env.ctr(&a)
    }

    /// The daemon's log without colours.
    fn log(&self) -> String {
        strip_ansi(&fs::read_to_string(self.env.dir.join("logs/snapshotter.log")).unwrap_or_default())
    }

    /// Log lines of `rpc` (Apply or Diff), optionally for one digest.
    fn rpc_lines(&self, rpc: &str, digest: Option<&str>) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(&format!("rpc=\"{rpc}\"")))
            .filter(|l| digest.is_none_or(|d| l.contains(&format!("digest={d} "))))
            .map(str::to_string)
            .collect()
    }

    /// Manifest layers and config diff_ids of a pulled image.
    fn image_layers(&self, name: &str) -> (Vec<Layer>, Vec<String>) {
        let image = self.env.image(name);
        let ls = self.env.ctr(&["image", "ls"]);
        let target = ls
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&image.as_str())).then(|| f[2].to_string())
            })
            .unwrap_or_else(|| panic!("{image} not in `ctr image ls`:\n{ls}"));
        let manifest: serde_json::Value =
            serde_json::from_str(&self.env.ctr(&["content", "get", &target])).expect("manifest JSON");
        let layers: Vec<Layer> = manifest["layers"]
            .as_array()
            .expect("manifest layers (a single-platform manifest)")
            .iter()
            .map(|l| Layer {
                digest: l["digest"].as_str().unwrap().to_string(),
                media_type: l["mediaType"].as_str().unwrap().to_string(),
                size: l["size"].as_u64().unwrap(),
            })
            .collect();
        let config: serde_json::Value =
            serde_json::from_str(
                &self
                    .env
                    .ctr(&["content", "get", manifest["config"]["digest"].as_str().unwrap()]),
            )
            .expect("config JSON");
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .expect("diff_ids")
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect();
        assert_eq!(layers.len(), diff_ids.len(), "{name}: layers vs diff_ids");
        (layers, diff_ids)
    }

    /// The snapshot dirs (ROOT/snapshots/<id>) of a committed chain, bottom first, found through a view's mounts.
    fn chain_dirs(&self, key: &str) -> Vec<PathBuf> {
        let v = unique("chain-view");
        self.sn("dedup", &["view", &v, key]);
        let out = self.sn("dedup", &["mounts", "/mnt/unused", &v]);
        self.sn("dedup", &["rm", &v]);
        let m = self.env.root.join("m");
        let words: Vec<&str> = out.split_whitespace().collect();
        let layers: Vec<PathBuf> = if let Some(l) = words.iter().find_map(|w| {
            w.split(',')
                .find_map(|o| o.strip_prefix("lowerdir="))
                .map(|l| l.split(':').map(PathBuf::from).collect::<Vec<_>>())
        }) {
            l
        } else {
            // A single layer: `mount -t bind ROOT/m/<id> TARGET -o ro,rbind`.
            vec![PathBuf::from(
                words.get(3).unwrap_or_else(|| panic!("mounts of {v}: {out}")),
            )]
        };
        layers
            .iter()
            .rev()
            .map(|p| {
                assert_eq!(
                    p.parent(),
                    Some(m.as_path()),
                    "view of {key} shows {} (mounts: {out})",
                    p.display()
                );
                self.env.root.join("snapshots").join(p.file_name().unwrap())
            })
            .collect()
    }

    /// Mounts the snapshot `key` (active: its own mounts; committed: a new view of it).
    fn mount(&self, snapshotter: &str, key: &str, committed: bool) -> Mounted {
        let dir = tempfile::Builder::new()
            .prefix("mnt.")
            .tempdir_in(&self.env.dir)
            .expect("mount dir");
        let view = committed.then(|| {
            let v = unique("view");
            self.sn(snapshotter, &["view", &v, key]);
            v
        });
        let m = Mounted {
            dir,
            ctrd: self.env.ctrd_sock.clone(),
            ns: self.env.ns.clone(),
            snapshotter: snapshotter.to_string(),
            view: view.clone(),
        };
        let target = m.path().to_str().unwrap().to_string();
        let cmds = self.sn(snapshotter, &["mounts", &target, view.as_deref().unwrap_or(key)]);
        host_sh(&cmds);
        m
    }

    /// Puts a file into containerd's content store (kept by a gc.root label); returns its digest.
    fn ingest(&self, file: &Path) -> String {
        let digest = sha256_file(file);
        let size = fs::metadata(file).unwrap().len().to_string();
        let r = unique("ingest");
        let out = Command::new("ctr")
            .args(["-a", &self.env.ctrd_sock, "-n", &self.env.ns, "content", "ingest"])
            .args(["--expected-digest", &digest, "--expected-size", &size, &r])
            .stdin(fs::File::open(file).unwrap())
            .output()
            .expect("spawn ctr");
        assert!(out.status.success(), "{}", describe("ctr content ingest", &out));
        self.env
            .ctr(&["content", "label", &digest, "containerd.io/gc.root=e2e"]);
        digest
    }

    /// The labels of a blob in the content store, as `ctr content ls` prints them.
    fn content_labels(&self, digest: &str) -> String {
        let ls = self.env.ctr(&["content", "ls"]);
        ls.lines()
            .find(|l| l.starts_with(digest))
            .unwrap_or_else(|| panic!("{digest} not in the content store:\n{ls}"))
            .to_string()
    }

    /// The mounts of the active snapshot `key` of `snapshotter`, through containerd.
    fn grpc_mounts(&self, snapshotter: &str, key: &str) -> Vec<PbMount> {
        let (sock, ns) = (self.env.ctrd_sock.clone(), self.env.ns.clone());
        let req = spb::MountsRequest {
            snapshotter: snapshotter.to_string(),
            key: key.to_string(),
        };
        self.rt.block_on(async move {
            let ch = containerd_client::connect(&sock).await.expect("connect containerd");
            let mut c = spb::snapshots_client::SnapshotsClient::new(ch);
            let mut r = Request::new(req);
            r.metadata_mut().insert("containerd-namespace", ns.parse().unwrap());
            c.mounts(r).await.expect("Mounts").into_inner().mounts
        })
    }

    /// Apply straight to a Diff service socket (no lease: the blob carries a gc.root label).
    fn grpc_apply(&self, sock: &str, blob: &Layer, mounts: Vec<PbMount>) -> Result<PbDescriptor, tonic::Status> {
        let (sock, ns) = (sock.to_string(), self.env.ns.clone());
        let req = pb::ApplyRequest {
            diff: Some(PbDescriptor {
                media_type: blob.media_type.clone(),
                digest: blob.digest.clone(),
                size: blob.size as i64,
                annotations: Default::default(),
            }),
            mounts,
            payloads: Default::default(),
            sync_fs: false,
        };
        self.rt.block_on(async move {
            let ch = containerd_client::connect(&sock)
                .await
                .expect("connect the Diff service");
            let mut c = pb::diff_client::DiffClient::new(ch);
            let mut r = Request::new(req);
            r.metadata_mut().insert("containerd-namespace", ns.parse().unwrap());
            c.apply(r)
                .await
                .map(|r| r.into_inner().applied.expect("applied descriptor"))
        })
    }

    /// The dir of one of our active snapshots (from its upperdir, or a bind's source).
    fn active_dir(&self, key: &str) -> PathBuf {
        let m = self.grpc_mounts("dedup", key);
        let fs_dir = m
            .iter()
            .find_map(|m| {
                m.options
                    .iter()
                    .find_map(|o| o.strip_prefix("upperdir=").map(PathBuf::from))
                    .or_else(|| (m.r#type == "bind").then(|| PathBuf::from(&m.source)))
            })
            .unwrap_or_else(|| panic!("no upper dir in the mounts of {key}: {m:?}"));
        fs_dir.parent().unwrap().to_path_buf()
    }
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// An active snapshot dir that nothing was applied to: the marker, an empty fs/, work/, nothing else.
fn assert_untouched_active(dir: &Path, what: &str) {
    let n = names(dir);
    let want: BTreeSet<String> = [".erofslayer", "fs", "work"].iter().map(|s| s.to_string()).collect();
    assert_eq!(n, want, "{what}: {} holds {n:?}", dir.display());
    assert!(
        names(&dir.join("fs")).is_empty(),
        "{what}: fs/ of {} is not empty",
        dir.display()
    );
    // A refused Apply leaves nothing where the store stages layers either.
    let staged = names(&dir.join("../../staging"));
    assert!(staged.is_empty(), "{what}: the store's staging/ holds {staged:?}");
}

fn check_trees(what: &str, expected: &Tree, actual: &Tree, opts: &CompareOpts) {
    if let Err(e) = compare_trees(expected, actual, opts) {
        panic!("{what}: {e}");
    }
    eprintln!("e2e: {what}: {} entries equal", expected.len());
}

// ---------------------------------------------------------------------------------------------------------------

#[test]
fn apply_pulls_through_erofs_differ() {
    let _serial = e2e::serial();
    let t = T::new();
    for name in ["busybox", "layered", "minbase"] {
        let s = Instant::now();
        let out = t.dc("dedup", &["pull", &t.env.image(name)]);
        eprintln!(
            "e2e: diffclient pull {name} in {:.2}s: {out}",
            s.elapsed().as_secs_f64()
        );
        // Success already proves each Apply returned the config's diff_id ("wrong diff id" otherwise).
        let (layers, diff_ids) = t.image_layers(name);
        let mut chain = String::new();
        for d in &diff_ids {
            chain = if chain.is_empty() {
                d.clone()
            } else {
                common::sha256_hex(format!("{chain} {d}").as_bytes())
            };
        }
        let dirs = t.chain_dirs(&chain);
        assert_eq!(dirs.len(), layers.len(), "{name}: {dirs:?}");
        for (l, dir) in layers.iter().zip(&dirs) {
            let lines = t.rpc_lines("Apply", Some(&l.digest));
            assert!(
                lines.iter().any(|x| x.contains("ok=true")),
                "{name}: no successful Apply of {} in the daemon log: {lines:?}",
                l.digest
            );
            let img = dir.join("layer.erofs");
            assert!(img.is_file(), "{name}: {} missing", img.display());
            assert_eq!(
                image_uuid(&img),
                differ_uuid(&l.digest),
                "{name}: {} does not carry the UUID the erofs differ derives from {} (converted at Commit?)",
                img.display(),
                l.digest
            );
            fsck(&img);
            assert!(
                names(&dir.join("fs")).is_empty(),
                "{name}: {}/fs is not empty",
                dir.display()
            );
            let staged = names(&dir.join("../../staging"));
            assert!(staged.is_empty(), "{name}: the store's staging/ holds {staged:?}");
        }

        // The same image unpacked by containerd's builtin overlayfs snapshotter and walking differ.
        let unpack_started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        t.env.ctr(&[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "overlayfs",
            &t.env.image(name),
        ]);
        let ours = t.mount("dedup", &chain, true);
        let theirs = t.mount("overlayfs", &chain, true);
        let (a, b) = (snapshot_tree(ours.path()), snapshot_tree(theirs.path()));
        // Directories containerd creates without a tar entry (the root: its applier skips `./`; parents a layer
        // only implies) carry the unpack time there, the image's build time (0) here: those mtimes say nothing.
        // Every other mtime, and everything else about every entry, must be equal.
        let stamped: Vec<PathBuf> = b
            .iter()
            .filter(|(_, n)| n.kind == common::Kind::Dir && n.mtime >= unpack_started - 1)
            .map(|(p, _)| p.clone())
            .collect();
        eprintln!("e2e: {name}: dirs stamped with containerd's unpack time (mtime not compared): {stamped:?}");
        check_trees(
            &format!("{name}: our view vs containerd's overlayfs view"),
            &b,
            &a,
            &CompareOpts::ignoring_mtime_of(stamped),
        );
    }
    // minbase also against GNU tar (the tarball the image was made from).
    let tar = format!("{CACHE}/debian-minbase.tar");
    if Path::new(&tar).is_file() {
        let (layers, diff_ids) = t.image_layers("minbase");
        assert_eq!(layers.len(), 1);
        let ours = t.mount("dedup", &diff_ids[0], true);
        let (_d, expected) = common::gnu_extract_tree(Path::new(&tar));
        let opts = CompareOpts {
            ignore_root: true,
            ..Default::default()
        };
        check_trees(
            "minbase: our view vs GNU tar -x",
            &expected,
            &snapshot_tree(ours.path()),
            &opts,
        );
    }
    t.env.check_layout();
    t.env.stop();
}

#[test]
fn native_erofs_layers() {
    let _serial = e2e::serial();
    let t = T::new();
    // An EROFS image of the busybox layer, made by our converter.
    let layer_blob = {
        let idx: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(format!("{CACHE}/oci/busybox/index.json")).unwrap()).unwrap();
        let m = idx["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .strip_prefix("sha256:")
            .unwrap()
            .to_string();
        let man: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(format!("{CACHE}/oci/busybox/blobs/sha256/{m}")).unwrap())
                .unwrap();
        let l = man["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .strip_prefix("sha256:")
            .unwrap()
            .to_string();
        PathBuf::from(format!("{CACHE}/oci/busybox/blobs/sha256/{l}"))
    };
    let work = t.env.dir.join("native");
    fs::create_dir(&work).unwrap();
    let image = work.join("busybox.erofs");
    let out = Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
        .arg("convert")
        .arg(&layer_blob)
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe("dedup-snapshotter convert", &out));
    let image_digest = sha256_file(&image);
    let zst = work.join("busybox.erofs.zst");
    host_sh(&format!("zstd -q -c {} > {}", image.display(), zst.display()));
    let gz = work.join("busybox.erofs.gz");
    host_sh(&format!("gzip -c {} > {}", image.display(), gz.display()));
    // convert-image's compressed chunks: a frame per 4 KiB chunk, then the seek table (a skippable frame),
    // under the OCI type `--layer-media-type oci` pushes.
    let chunks = work.join("busybox.erofs.chunks.zst");
    let c = image_convert::zstd_chunks::compress_chunks(&image, &chunks, 4096, 3).unwrap();
    assert!(c.sizes.len() > 100, "{} frames", c.sizes.len());

    let mut failures = Vec::new();
    for (file, mt, key) in [
        (&image, EROFS_LAYER.to_string(), "native-plain"),
        (&zst, format!("{EROFS_LAYER}+zstd"), "native-zstd"),
        (
            &chunks,
            image_convert::annotations::OCI_EROFS_ZSTD_LAYER_MEDIA_TYPE.to_string(),
            "native-chunks",
        ),
    ] {
        let digest = t.ingest(file);
        let out = t.dc_raw(Some(&t.our_sock()), "dedup", &["apply", &digest, &mt, "", key]);
        if !out.status.success() {
            failures.push(describe(&format!("diffclient apply {digest} {mt}"), &out));
            continue;
        }
        let desc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(desc["digest"].as_str(), Some(image_digest.as_str()), "{mt}: {desc}");
        let dirs = t.chain_dirs(key);
        assert_eq!(dirs.len(), 1);
        let got = dirs[0].join("layer.erofs");
        assert_eq!(
            sha256_file(&got),
            image_digest,
            "{mt}: {} is not the (decompressed) blob",
            got.display()
        );
        assert!(names(&dirs[0].join("fs")).is_empty());
        // And it mounts as the layer it is.
        let v = t.mount("dedup", key, true);
        assert_eq!(fs::read_link(v.path().join("bin/sh")).unwrap(), Path::new("busybox"));
    }
    // A malformed image (the root's "." names a subdirectory: the kernel would mount it, our validator must
    // not let it get that far) is refused as invalid, and nothing of it stays.
    let bad = work.join("dot.erofs");
    fs::write(&bad, corrupt_dot(&image)).unwrap();
    let digest = t.ingest(&bad);
    let out = t.dc_raw(
        Some(&t.our_sock()),
        "dedup",
        &["apply", &digest, EROFS_LAYER, "", "native-malformed"],
    );
    assert!(
        !out.status.success(),
        "{}",
        describe("diffclient apply (malformed)", &out)
    );
    // The kind, as the daemon answered it (diffclient prints containerd's errdefs form).
    let answered = t.rpc_lines("Apply", Some(&digest));
    assert!(
        answered.iter().any(|l| l.contains("kind=\"invalid_argument\"")),
        "{}\nApply in the daemon log: {answered:#?}",
        describe("diffclient apply (malformed)", &out)
    );
    assert!(
        t.env.snapshots().iter().all(|s| !s.key.starts_with("native-malformed")),
        "{:#?}",
        t.env.snapshots()
    );
    // gzip is not a compression for EROFS layers.
    let digest = t.ingest(&gz);
    let mt = format!("{EROFS_LAYER}+gzip");
    let out = t.dc_raw(
        Some(&t.our_sock()),
        "dedup",
        &["apply", &digest, &mt, "", "native-gzip"],
    );
    assert!(!out.status.success(), "{}", describe("diffclient apply +gzip", &out));
    assert!(
        t.env.snapshots().iter().all(|s| !s.key.starts_with("native-gzip")),
        "{:#?}",
        t.env.snapshots()
    );
    assert!(
        failures.is_empty(),
        "native EROFS apply failed:\n{}\ndaemon log:\n{}",
        failures.join("\n"),
        t.rpc_lines("Apply", None).join("\n")
    );
    t.env.check_layout();
    t.env.stop();
}

/// The image with its root directory's "." record pointing at the root's first subdirectory: a structurally
/// readable image (the kernel mounts it) that erofs::validate refuses (`Invalid::DotEntries`).
fn corrupt_dot(image: &Path) -> Vec<u8> {
    use erofs::format::{self, DataLayout};
    use erofs::reader::{FileKind, Image};
    let img = Image::open(image).unwrap();
    let root = img.root().unwrap();
    let records = img.read_dir(&root).unwrap();
    let sub = records
        .iter()
        .find(|d| d.name != b"." && d.name != b".." && img.entry(d.nid).unwrap().kind == FileKind::Dir)
        .expect("a subdirectory of the root");
    let dot = records.iter().position(|d| d.name == b".").unwrap();
    let bs = img.block_size();
    let inode_off = img.superblock().meta_blkaddr as u64 * bs + root.nid * 32;
    let data = match root.inode.layout {
        DataLayout::FlatInline if root.inode.size < bs => {
            inode_off + root.inode.size_on_disk() as u64 + format::xattr_ibody_size(root.inode.xattr_icount) as u64
        }
        DataLayout::FlatPlain | DataLayout::FlatInline => root.inode.i_u as u64 * bs,
        l => panic!("root directory layout {l:?}"),
    };
    assert!(
        dot < (bs / format::DIRENT_SIZE as u64) as usize,
        "'.' in the first block"
    );
    let mut bytes = fs::read(image).unwrap();
    let at = (data + (dot * format::DIRENT_SIZE) as u64) as usize;
    bytes[at..at + 8].copy_from_slice(&sub.nid.to_le_bytes());
    assert!(matches!(
        erofs::validate::validate_file({
            let f = tempfile::tempfile().unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, &bytes, 0).unwrap();
            f
        }),
        Err(erofs::Invalid::DotEntries { .. })
    ));
    bytes
}

/// Whole-second and nanosecond mtimes, so the check covers both.
const T0: i64 = 1_600_000_000;

/// Every kind of change an upper dir can hold, made through the mounted active snapshot at `root` (busybox).
fn make_changes(root: &Path) {
    use std::os::unix::fs::{chown, lchown, symlink};
    let p = |s: &str| root.join(s);
    // add
    fs::create_dir(p("data")).unwrap();
    fs::set_permissions(p("data"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(p("data/new.txt"), "new file\n".repeat(1000)).unwrap();
    fs::set_permissions(p("data/new.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    chown(p("data/new.txt"), Some(1234), Some(5678)).unwrap();
    lsetxattr(&p("data/new.txt"), "user.dedup.test", b"hello");
    lsetxattr(&p("data/new.txt"), "trusted.dedup.bin", &[0, 1, 2, 255]);
    set_mtime(&p("data/new.txt"), T0, 123_456_789);
    fs::write(p("data/empty"), "").unwrap();
    set_mtime(&p("data/empty"), T0 + 1, 0);
    fs::write(p("data/suid"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(p("data/suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    // hard links: two new names, and one across directories
    fs::hard_link(p("data/new.txt"), p("data/hl")).unwrap();
    // symlinks
    symlink("../etc/passwd", p("data/link")).unwrap();
    lchown(p("data/link"), Some(7), Some(8)).unwrap();
    symlink("/nonexistent/absolute", p("data/dangling")).unwrap();
    host_sh(&format!("mkfifo -m 0600 {}", p("data/fifo").display()));
    // modify (copy-up) and hard-link a lower file
    let mut pw = fs::read_to_string(p("etc/passwd")).unwrap();
    pw.push_str("dedup:x:1000:1000::/home/dedup:/bin/sh\n");
    fs::write(p("etc/passwd"), pw).unwrap();
    fs::hard_link(p("etc/passwd"), p("etc/passwd.hl")).unwrap();
    lsetxattr(&p("etc/passwd"), "user.dedup.lower", b"x");
    // delete
    fs::remove_file(p("etc/group")).unwrap();
    // chmod / chown of lower entries (a dir and a file)
    fs::set_permissions(p("root"), fs::Permissions::from_mode(0o700)).unwrap();
    chown(p("sys"), Some(100), Some(101)).unwrap();
    // replace a directory with an opaque one: /bin loses every applet but a new file and a symlink to it
    fs::remove_dir_all(p("bin")).unwrap();
    fs::create_dir(p("bin")).unwrap();
    fs::write(p("bin/only"), "only\n").unwrap();
    symlink("only", p("bin/sh")).unwrap();
    fs::hard_link(p("bin/only"), p("data/only.hl")).unwrap();
    set_mtime(&p("bin/only"), T0 + 2, 5);
    // a new dir with an xattr and an odd mode
    fs::create_dir(p("tmp/sub")).unwrap();
    fs::set_permissions(p("tmp/sub"), fs::Permissions::from_mode(0o1777)).unwrap();
    lsetxattr(&p("tmp/sub"), "user.dir", b"d");
}

/// Checks a tree has what `make_changes` made (so a round trip that loses everything cannot pass).
fn check_changes(tree: &Tree, what: &str) {
    let get = |s: &str| tree.get(Path::new(s)).unwrap_or_else(|| panic!("{what}: {s} missing"));
    let n = get("/data/new.txt");
    assert_eq!((n.mode & 0o7777, n.uid, n.gid), (0o640, 1234, 5678), "{what}: {n:?}");
    assert_eq!((n.mtime, n.mtime_nsec, n.nlink), (T0, 123_456_789, 2), "{what}: {n:?}");
    assert_eq!(get("/data/hl").ino, n.ino, "{what}: hard link");
    assert_eq!(
        get("/data/only.hl").ino,
        get("/bin/only").ino,
        "{what}: hard link across dirs"
    );
    assert!(
        n.xattrs.iter().any(|(k, v)| k == b"user.dedup.test" && v == b"hello"),
        "{what}: {n:?}"
    );
    assert!(
        !tree.contains_key(Path::new("/etc/group")),
        "{what}: /etc/group not deleted"
    );
    assert!(!tree.contains_key(Path::new("/bin/busybox")), "{what}: /bin not opaque");
    assert_eq!(get("/root").mode & 0o7777, 0o700, "{what}");
    assert_eq!((get("/sys").uid, get("/sys").gid), (100, 101), "{what}");
    assert_eq!(get("/data/suid").mode & 0o7777, 0o4755, "{what}");
    assert_eq!(get("/data/fifo").kind, common::Kind::Fifo, "{what}");
    assert_eq!(get("/etc/passwd").nlink, 2, "{what}");
}

/// prepare over PARENT, change, Compare (diffclient diff), Apply onto a fresh snapshot of PARENT, commit both,
/// compare the views.  Returns the Compare descriptor.
fn round_trip(t: &T, snapshotter: &str, parent: &str, tag: &str) -> (serde_json::Value, serde_json::Value) {
    let work = format!("{tag}-work");
    t.sn(snapshotter, &["prepare", &work, parent]);
    {
        let m = t.mount(snapshotter, &work, false);
        make_changes(m.path());
    }
    let desc = t.dc(snapshotter, &["diff", &work]);
    eprintln!("e2e: {tag}: Compare -> {desc}");
    let digest = desc["digest"].as_str().unwrap().to_string();
    assert_eq!(desc["mediaType"].as_str(), Some(GZIP_LAYER), "{desc}");
    let labels = t.content_labels(&digest);
    assert!(labels.contains("containerd.io/uncompressed=sha256:"), "{labels}");
    let uncompressed = labels
        .split(|c: char| c == ',' || c.is_whitespace())
        .find_map(|l| l.strip_prefix("containerd.io/uncompressed="))
        .unwrap()
        .to_string();
    let applied = t.dc(
        snapshotter,
        &["apply", &digest, GZIP_LAYER, parent, &format!("{tag}-new")],
    );
    eprintln!("e2e: {tag}: Apply -> {applied}");
    assert_eq!(
        applied["digest"].as_str(),
        Some(uncompressed.as_str()),
        "diffID vs the uncompressed label"
    );
    t.sn(snapshotter, &["commit", &format!("{tag}-committed"), &work]);
    let a = t.mount(snapshotter, &format!("{tag}-committed"), true);
    let b = t.mount(snapshotter, &format!("{tag}-new"), true);
    let (ta, tb) = (snapshot_tree(a.path()), snapshot_tree(b.path()));
    check_changes(&ta, &format!("{tag}: the changed snapshot"));
    // Every mtime is compared, directories' included, but the root's: a layer holds no `./` entry (as
    // containerd's), so the applied root has the image's build time (erofs differ) or the apply time (walking).
    let opts = CompareOpts::ignoring_mtime_of(["/"]);
    check_trees(&format!("{tag}: committed changes vs Compare+Apply"), &ta, &tb, &opts);
    (desc, applied)
}

fn busybox_parent(t: &T) -> String {
    let (_, diff_ids) = t.image_layers("busybox");
    assert_eq!(diff_ids.len(), 1);
    diff_ids[0].clone()
}

#[test]
fn round_trip_erofs_differ() {
    let _serial = e2e::serial();
    let t = T::new();
    t.dc("dedup", &["pull", &t.env.image("busybox")]);
    let parent = busybox_parent(&t);
    let diffs_before = t.rpc_lines("Diff", None).len();
    let (desc, _) = round_trip(&t, "dedup", &parent, "rt");
    let diffs = t.rpc_lines("Diff", None);
    assert_eq!(diffs.len(), diffs_before + 1, "{diffs:?}");
    assert!(diffs.last().unwrap().contains("ok=true"), "{diffs:?}");
    // Applied by the erofs differ (its UUID), not converted at Commit.
    let dirs = t.chain_dirs("rt-new");
    let blob = desc["digest"].as_str().unwrap();
    assert_eq!(
        image_uuid(&dirs[1].join("layer.erofs")),
        differ_uuid(blob),
        "rt-new was not applied by the erofs differ"
    );
    fsck(&dirs[1].join("layer.erofs"));
    t.env.check_layout();
    t.env.stop();
}

#[test]
fn round_trip_walking_differ_on_overlayfs() {
    let _serial = e2e::serial();
    let t = T::new();
    t.env.ctr(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        &t.env.image("busybox"),
    ]);
    let parent = busybox_parent(&t);
    let (desc, applied) = round_trip(&t, "overlayfs", &parent, "walk");
    let blob = desc["digest"].as_str().unwrap();
    assert!(
        t.rpc_lines("Diff", None).iter().any(|l| l.contains("ok=true")),
        "no successful Diff in the daemon log"
    );
    assert!(
        t.rpc_lines("Apply", Some(blob)).iter().any(|l| l.contains("ok=true")),
        "no successful Apply of {blob} in the daemon log"
    );
    // The layer the walking differ wrote, applied by the erofs differ onto our own busybox, gives the same tree.
    t.dc("dedup", &["pull", &t.env.image("busybox")]);
    let ours = t.dc("dedup", &["apply", blob, GZIP_LAYER, &parent, "walk-ours"]);
    assert_eq!(ours["digest"], applied["digest"], "{ours} vs {applied}");
    let a = t.mount("overlayfs", "walk-new", true);
    let b = t.mount("dedup", "walk-ours", true);
    let opts = CompareOpts::ignoring_mtime_of(["/"]);
    check_trees(
        "walking differ's layer: overlayfs vs erofs differ",
        &snapshot_tree(a.path()),
        &snapshot_tree(b.path()),
        &opts,
    );
    drop((a, b));

    // Fall-through: a second daemon with only the erofs differ answers Unimplemented for overlayfs's mounts.
    let root2 = t.env.dir.join("erofs-only");
    let sock2 = t.env.dir.join("erofs-only.sock");
    let log2 = fs::File::create(t.env.dir.join("logs/erofs-only.log")).unwrap();
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
        .arg("serve")
        .arg("--root")
        .arg(&root2)
        .arg("--address")
        .arg(&sock2)
        .arg("--containerd")
        .arg(&t.env.ctrd_sock)
        .args(["--differs", "erofs"])
        .stdin(Stdio::null())
        .stdout(log2.try_clone().unwrap())
        .stderr(log2)
        .spawn()
        .expect("spawn a second daemon");
    let s = Instant::now();
    while !sock2.exists() {
        assert!(s.elapsed() < Duration::from_secs(20), "the second daemon did not start");
        assert!(child.try_wait().unwrap().is_none(), "the second daemon exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    let sock2s = sock2.to_str().unwrap();
    let (layers, _) = t.image_layers("busybox");
    let out = t.dc_raw(
        Some(sock2s),
        "overlayfs",
        &["apply", &layers[0].digest, &layers[0].media_type, "", "ft"],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let grpc = {
        t.sn("overlayfs", &["prepare", "ft-grpc", ""]);
        let m = t.grpc_mounts("overlayfs", "ft-grpc");
        let r = t.grpc_apply(
            sock2s,
            &Layer {
                digest: layers[0].digest.clone(),
                media_type: layers[0].media_type.clone(),
                size: layers[0].size,
            },
            m,
        );
        t.sn("overlayfs", &["rm", "ft-grpc"]);
        r
    };
    let cmp = t.dc_raw(Some(sock2s), "overlayfs", &["diff", "walk-committed"]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !out.status.success(),
        "{}",
        describe("diffclient apply with --differs erofs", &out)
    );
    assert!(
        err.contains("not implemented") || err.contains("Unimplemented"),
        "expected Unimplemented: {err}"
    );
    eprintln!("e2e: fall-through: diffclient apply: {} {}", out.status, err.trim());
    let st = grpc.expect_err("Apply onto overlayfs mounts with --differs erofs succeeded");
    assert_eq!(st.code(), tonic::Code::Unimplemented, "{st:?}");
    assert!(
        !cmp.status.success(),
        "{}",
        describe("diffclient diff with --differs erofs", &cmp)
    );
    let cerr = String::from_utf8_lossy(&cmp.stderr);
    assert!(
        cerr.contains("not implemented") || cerr.contains("Unimplemented"),
        "{cerr}"
    );
    t.env.stop();
}

/// The hostile layers: each a tar with one attack (python's tarfile writes names verbatim) between two good
/// entries, so a differ that skips the bad entry still has something to apply.
const ATTACKS: [&str; 7] = [
    "dotdot",
    "deep",
    "abs",
    "symlink-root",
    "symlink-up",
    "hardlink-out",
    "symlink-then-dir",
];

fn hostile_tar(path: &Path, attack: &str, marker: &str, hl_target: &Path) {
    let script = r#"
import io, sys, tarfile
out, attack, marker, hl = sys.argv[1:5]
def reg(t, name, data=b"evil\n"):
    i = tarfile.TarInfo(name); i.size = len(data); i.mode = 0o644; i.mtime = 1600000000
    t.addfile(i, io.BytesIO(data))
def sym(t, name, target):
    i = tarfile.TarInfo(name); i.type = tarfile.SYMTYPE; i.linkname = target; t.addfile(i)
with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as t:
    reg(t, "ok.txt", b"fine\n")
    if attack == "dotdot":
        reg(t, "../" + marker + "-dotdot")
    elif attack == "deep":
        reg(t, "../../../../../../../../tmp/" + marker + "-deep")
    elif attack == "abs":
        reg(t, "/tmp/" + marker + "-abs")
    elif attack == "symlink-root":
        sym(t, "a", "/")
        reg(t, "a/tmp/" + marker + "-via-root")
    elif attack == "symlink-up":
        sym(t, "up", "../../../../../../../..")
        reg(t, "up/tmp/" + marker + "-via-up")
    elif attack == "hardlink-out":
        i = tarfile.TarInfo("hl"); i.type = tarfile.LNKTYPE; i.linkname = "../../../../../../../.." + hl; t.addfile(i)
    elif attack == "symlink-then-dir":
        sym(t, "d", "/tmp")
        i = tarfile.TarInfo("d/" + marker + "-dir"); i.type = tarfile.DIRTYPE; i.mode = 0o755; t.addfile(i)
    reg(t, "after.txt", b"after\n")
"#;
    common::python(
        script,
        &[
            path.as_os_str(),
            attack.as_ref(),
            marker.as_ref(),
            hl_target.as_os_str(),
        ],
    );
}

/// Nothing named after `marker` exists outside `inside` anywhere the hostile tar aims at.
fn assert_nothing_escaped(t: &T, marker: &str, hl_target: &Path, what: &str) {
    let found = host_sh(&format!(
        "{{ find / -xdev -maxdepth 1 -name '{marker}*'; find /tmp -maxdepth 1 -name '{marker}*'; \
         find {} -xdev -name '{marker}*' -not -path '*/mnt.*'; }} 2>/dev/null || true",
        t.env.dir.display()
    ));
    // Inside a snapshot's own upper dir (`.../snapshots/<id>/fs/...`, ours or overlayfs's) is confined;
    // anywhere else (a snapshot dir itself, staging/, /tmp, /) is an escape.
    let escaped: Vec<&str> = found
        .lines()
        .filter(|l| !l.is_empty())
        .filter(|l| {
            let p = Path::new(l);
            !p.ancestors().any(|a| {
                a.file_name() == Some("fs".as_ref())
                    && a.parent().and_then(Path::parent).and_then(Path::file_name) == Some("snapshots".as_ref())
            })
        })
        .collect();
    assert!(
        escaped.is_empty(),
        "{what}: the hostile tar wrote outside its target: {escaped:?}"
    );
    let md = fs::metadata(hl_target).unwrap();
    assert_eq!(
        md.nlink(),
        1,
        "{what}: {} got hard-linked from a layer",
        hl_target.display()
    );
    assert_eq!(fs::read_to_string(hl_target).unwrap(), "host secret\n", "{what}");
}

/// When a hostile apply succeeded: the target holds only confined entries; `hl` is not the host file.
fn check_confined_tree(root: &Path, hl_target: &Path, what: &str) -> Vec<String> {
    let tree = snapshot_tree(root);
    let host = fs::metadata(hl_target).unwrap();
    if let Some(n) = tree.get(Path::new("/hl")) {
        assert!(
            n.sha256.as_deref() != Some(sha256_file(hl_target).as_str()) || n.ino != (host.dev(), host.ino()),
            "{what}: /hl is the host's {}",
            hl_target.display()
        );
    }
    if let Some(n) = tree.get(Path::new("/a")) {
        assert_eq!(n.kind, common::Kind::Symlink, "{what}: /a");
    }
    // What the layer added (busybox's own entries aside), for the log.
    let base = ["bin", "etc", "proc", "sys", "dev", "root"];
    tree.keys()
        .filter(|p| {
            let first = p
                .components()
                .nth(1)
                .map(|c| c.as_os_str().to_string_lossy().into_owned());
            p.as_path() != Path::new("/")
                && p.as_path() != Path::new("/tmp")
                && !first.is_some_and(|f| base.contains(&f.as_str()))
        })
        .map(|p| p.display().to_string())
        .collect()
}

#[test]
fn bad_and_hostile_input() {
    let _serial = e2e::serial();
    let t = T::new();
    t.dc("dedup", &["pull", &t.env.image("busybox")]);
    t.env.ctr(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        &t.env.image("busybox"),
    ]);
    let parent = busybox_parent(&t);
    let (layers, _) = t.image_layers("busybox");
    let good = layers[0].clone();
    let work = t.env.dir.join("bad");
    fs::create_dir(&work).unwrap();
    let blob = host_sh(&format!(
        "ctr -a {} -n {} content get {} > {}/good.gz && echo {}/good.gz",
        t.env.ctrd_sock,
        t.env.ns,
        good.digest,
        work.display(),
        work.display()
    ));
    let blob = PathBuf::from(blob.trim());
    let bytes = fs::read(&blob).unwrap();
    // corrupt: flip bytes in the middle of the deflate stream; truncated: the first half.
    let mut corrupt = bytes.clone();
    for i in (bytes.len() / 2..bytes.len() / 2 + 64).step_by(3) {
        corrupt[i] ^= 0x5a;
    }
    fs::write(work.join("corrupt.gz"), &corrupt).unwrap();
    fs::write(work.join("truncated.gz"), &bytes[..bytes.len() / 2]).unwrap();
    // garbage: not gzip at all
    fs::write(work.join("garbage.gz"), common::pseudo_random(100_000, 7)).unwrap();

    let key = "bad-target";
    t.sn("dedup", &["prepare", key, &parent]);
    let dir = t.active_dir(key);
    assert_untouched_active(&dir, "before");
    for name in ["corrupt.gz", "truncated.gz", "garbage.gz"] {
        let f = work.join(name);
        let l = Layer {
            digest: t.ingest(&f),
            media_type: GZIP_LAYER.into(),
            size: fs::metadata(&f).unwrap().len(),
        };
        let r = t.grpc_apply(&t.our_sock(), &l, t.grpc_mounts("dedup", key));
        let st = r.expect_err(&format!("Apply of {name} succeeded"));
        eprintln!("e2e: {name}: {:?} {}", st.code(), st.message());
        assert_untouched_active(&dir, name);
        // and through containerd's client: an error, and no snapshot left behind
        let out = t.dc_raw(
            Some(&t.our_sock()),
            "dedup",
            &["apply", &l.digest, GZIP_LAYER, &parent, "bad-dc"],
        );
        assert!(
            !out.status.success(),
            "{}",
            describe(&format!("diffclient apply {name}"), &out)
        );
        assert!(t.env.snapshots().iter().all(|s| !s.key.starts_with("bad-dc")));
    }
    // A wrong size or digest in the descriptor is refused too.
    let mut wrong = good.clone();
    wrong.size += 1;
    let st = t
        .grpc_apply(&t.our_sock(), &wrong, t.grpc_mounts("dedup", key))
        .expect_err("Apply with a wrong size succeeded");
    eprintln!("e2e: wrong size: {:?} {}", st.code(), st.message());
    assert_untouched_active(&dir, "wrong size");
    // A good Apply onto the same snapshot afterwards works, and commits to a layer from the differ.
    let applied = t
        .grpc_apply(&t.our_sock(), &good, t.grpc_mounts("dedup", key))
        .expect("the good Apply after the bad ones");
    assert!(dir.join("layer.erofs").is_file());
    assert!(names(&dir.join("../../staging")).is_empty());
    t.sn("dedup", &["commit", "bad-committed", key]);
    let dirs = t.chain_dirs("bad-committed");
    assert_eq!(image_uuid(&dirs[1].join("layer.erofs")), differ_uuid(&good.digest));
    assert_eq!(applied.media_type, TAR_LAYER);
    eprintln!("e2e: good Apply after bad ones: {}", applied.digest);

    // Hostile tars through the erofs differ (our snapshot, with and without a parent) and the walking differ
    // (overlayfs: into the upper dir of an overlay, and into a bind-mounted snapshot in a temporary mount).
    let marker = unique("dedup-evil");
    let hl_target = PathBuf::from(format!("/tmp/hltarget-{marker}"));
    fs::write(&hl_target, "host secret\n").unwrap();
    let mut outcomes = Vec::new();
    for attack in ATTACKS {
        let tar = work.join(format!("{attack}.tar"));
        hostile_tar(&tar, attack, &marker, &hl_target);
        let hostile = Layer {
            digest: t.ingest(&tar),
            media_type: TAR_LAYER.into(),
            size: fs::metadata(&tar).unwrap().len(),
        };
        let cases: [(&str, &str, &str); 4] = [
            ("dedup", "erofs", parent.as_str()),
            ("dedup", "erofs-base", ""),
            ("overlayfs", "walk-overlay", parent.as_str()),
            ("overlayfs", "walk-bind", ""),
        ];
        for (snapshotter, case, p) in cases {
            let key = format!("evil-{attack}-{case}");
            t.sn(snapshotter, &["prepare", &key, p]);
            let m = t.grpc_mounts(snapshotter, &key);
            let r = t.grpc_apply(&t.our_sock(), &hostile, m);
            assert_nothing_escaped(&t, &marker, &hl_target, &key);
            match r {
                Err(st) => {
                    outcomes.push(format!("{key}: refused ({:?}: {})", st.code(), st.message()));
                    if snapshotter == "dedup" {
                        assert_untouched_active(&t.active_dir(&key), &key);
                    }
                    t.sn(snapshotter, &["rm", &key]);
                }
                Ok(d) => {
                    let c = format!("{key}-c");
                    t.sn(snapshotter, &["commit", &c, &key]);
                    let v = t.mount(snapshotter, &c, true);
                    let names = check_confined_tree(v.path(), &hl_target, &key);
                    outcomes.push(format!("{key}: applied as {}, confined: {names:?}", d.digest));
                }
            }
            assert_nothing_escaped(&t, &marker, &hl_target, &key);
        }
    }
    eprintln!("e2e: hostile layers:\n  {}", outcomes.join("\n  "));
    let _ = fs::remove_file(&hl_target);
    t.env.check_layout();
    t.env.stop();
}

// ---------------------------------------------------------------------------------------------------------------

/// Every entry under the daemon's root, as "relative path type size", not crossing into mounts (the layers'
/// EROFS mounts under `m/`) and leaving out the store's database, whose bytes change with every transaction.
/// Staging and temp files of an Apply, wherever the store keeps them under its root, show up here.
fn root_listing(root: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, dir: &Path, dev: u64, out: &mut BTreeSet<String>) {
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => panic!("read_dir {}: {e}", dir.display()),
        };
        for e in rd {
            let p = e.expect("read_dir entry").path();
            let Ok(md) = fs::symlink_metadata(&p) else {
                continue; // removed meanwhile (the daemon is running)
            };
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            if rel == "metadata.redb" {
                continue;
            }
            if md.is_dir() {
                out.insert(format!("{rel} dir"));
                if md.dev() == dev {
                    walk(base, &p, dev, out);
                }
            } else if md.is_file() {
                out.insert(format!("{rel} file {}", md.len()));
            } else {
                out.insert(format!("{rel} other"));
            }
        }
    }
    let dev = fs::metadata(root).expect("stat the daemon's root").dev();
    let mut out = BTreeSet::new();
    walk(root, root, dev, &mut out);
    out
}

/// Bytes in regular files under `root` (same file system, database left out) that `before` does not list.
fn new_bytes(root: &Path, before: &BTreeSet<String>) -> (u64, Vec<String>) {
    let mut total = 0;
    let mut files = Vec::new();
    for l in root_listing(root).difference(before) {
        let mut w = l.rsplitn(3, ' ');
        let (size, kind, path) = (w.next().unwrap(), w.next().unwrap_or(""), w.next().unwrap_or(""));
        if kind == "file" {
            total += size.parse::<u64>().unwrap();
            files.push(path.to_string());
        }
    }
    (total, files)
}

/// The EROFS mounts under the daemon's root (mount points).
fn erofs_mounts_under(root: &Path) -> Vec<String> {
    e2e::mountinfo()
        .into_iter()
        .filter(|m| Path::new(&m.point).starts_with(root) && m.fstype == "erofs")
        .map(|m| m.point)
        .collect()
}

/// Kill -9 of the daemon in the middle of the Diff service's Apply of a ~300 MB layer onto one of its snapshots,
/// then a restart on the same root. Afterwards: the snapshot is still active and untouched (empty `fs/`, no layer
/// image), the daemon's root holds exactly the entries it held before the Apply (no staging or temp file, no
/// half-written layer), nothing is mounted for it, its mounts are the same, and the same Apply then succeeds and
/// commits to the layer's tree.
#[test]
fn kill_during_apply_then_recover() {
    let _serial = e2e::serial();
    let mut t = T::new();
    let work = t.env.dir.join("crash-apply");
    let src = work.join("src");
    fs::create_dir_all(&src).unwrap();
    // ~300 MB of incompressible files across directories: long enough to kill the daemon in mid-Apply.
    let mut written = 0usize;
    for i in 0..150 {
        let d = src.join(format!("d{:02}", i % 12));
        fs::create_dir_all(&d).unwrap();
        let size = (2 << 20) + (i * 4099) % 65536;
        fs::write(
            d.join(format!("f{i:03}.bin")),
            common::pseudo_random(size, i as u64 + 1),
        )
        .unwrap();
        written += size;
    }
    fs::write(src.join("small.txt"), "small\n").unwrap();
    std::os::unix::fs::symlink("d00/f000.bin", src.join("link")).unwrap();
    let tar = work.join("big.tar");
    host_sh(&format!(
        "tar --sort=name --numeric-owner --owner=0 --group=0 -C {} -cf {} .",
        src.display(),
        tar.display()
    ));
    let layer = Layer {
        digest: t.ingest(&tar),
        media_type: TAR_LAYER.into(),
        size: fs::metadata(&tar).unwrap().len(),
    };
    eprintln!(
        "e2e: crash layer {} ({} bytes, {written} in files)",
        layer.digest, layer.size
    );

    let key = "crash-apply-target";
    t.sn("dedup", &["prepare", key]);
    let dir = t.active_dir(key);
    assert_untouched_active(&dir, "before the Apply");
    let mounts = t.grpc_mounts("dedup", key);
    let root = t.env.root.clone();
    let before = root_listing(&root);
    let mounted_before = erofs_mounts_under(&root);

    // Apply in a thread of its own (its own runtime): the test watches the root meanwhile.
    let apply = {
        let (sock, ns, layer, mounts) = (t.our_sock(), t.env.ns.clone(), layer.clone(), mounts.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let ch = containerd_client::connect(&sock)
                    .await
                    .expect("connect the Diff service");
                let mut c = pb::diff_client::DiffClient::new(ch);
                let mut r = Request::new(pb::ApplyRequest {
                    diff: Some(PbDescriptor {
                        media_type: layer.media_type,
                        digest: layer.digest,
                        size: layer.size as i64,
                        annotations: Default::default(),
                    }),
                    mounts,
                    payloads: Default::default(),
                    sync_fs: false,
                });
                r.metadata_mut().insert("containerd-namespace", ns.parse().unwrap());
                c.apply(r).await.map(|r| r.into_inner())
            })
        })
    };
    // Kill once the Apply has staged 8 MiB somewhere under the root.
    let started = Instant::now();
    let staged = loop {
        let (bytes, files) = new_bytes(&root, &before);
        if bytes >= 8 << 20 {
            break files;
        }
        assert!(
            !apply.is_finished(),
            "the Apply returned before the test could kill the daemon ({:.2}s, {bytes} bytes staged): \
             make the layer larger",
            started.elapsed().as_secs_f64()
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the Apply staged {bytes} bytes in 60 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    t.env.kill9_snapshotter();
    eprintln!(
        "e2e: killed the daemon {:.2}s into the Apply, staging {staged:?}",
        started.elapsed().as_secs_f64()
    );
    let res = apply.join().expect("the Apply thread");
    let st = res.expect_err("the Apply succeeded although the daemon was killed");
    eprintln!("e2e: the interrupted Apply returned {:?}: {}", st.code(), st.message());

    t.env.restart_snapshotter();
    let info = t.env.snapshot_info(key);
    assert_eq!(info["Kind"].as_str(), Some("Active"), "{info}");
    assert_untouched_active(&dir, "after the kill and restart");
    let after = root_listing(&root);
    assert_eq!(
        after.symmetric_difference(&before).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "the daemon's root after the restart differs from before the Apply (left: staging or temp files)"
    );
    assert_eq!(
        erofs_mounts_under(&root),
        mounted_before,
        "EROFS mounts after the restart"
    );
    assert_eq!(
        t.grpc_mounts("dedup", key),
        mounts,
        "the snapshot's mounts changed across the restart"
    );

    // The same Apply now succeeds, and the committed layer holds the layer's tree.
    let applied = t
        .grpc_apply(&t.our_sock(), &layer, mounts)
        .expect("the same Apply after the restart");
    assert_eq!(
        applied.digest,
        sha256_file(&tar),
        "the diffID of an uncompressed layer is its digest"
    );
    assert_eq!(applied.media_type, TAR_LAYER);
    t.sn("dedup", &["commit", "crash-applied", key]);
    let dirs = t.chain_dirs("crash-applied");
    assert_eq!(
        dirs,
        vec![dir.clone()],
        "the committed layer is the Apply's target snapshot"
    );
    fsck(&dir.join("layer.erofs"));
    {
        // The reference: the same tar as GNU tar extracts it (whole-second mtimes in its format).
        let (_gnu_dir, gnu) = common::gnu_extract_tree(&tar);
        let v = t.mount("dedup", "crash-applied", true);
        check_trees(
            "the layer applied after the crash",
            &gnu,
            &snapshot_tree(v.path()),
            &CompareOpts {
                ignore_root: true,
                ..Default::default()
            },
        );
    }
    t.env.check_layout();
    t.env.stop();
}
