//! The containerd version matrix: containerd 1.7.24 (Debian trixie's) and 2.1.9 (Debian forky's), installed into a
//! cache by scripts/lib/containerd-versions.sh, with our daemon as the `dedup` snapshot proxy **and** the `dedup-diff`
//! diff proxy on the same socket (scripts/e2e-env.sh with `E2E_CONTAINERD`). containerd 1.6 (no diff proxies: our
//! Commit converts) stays covered by e2e_containerd and the other e2e tests.
//!
//! One containerd per version (start-ups cost), three phases, each from an empty store:
//! 1. **Transfer service** (`ctr images pull`; on 1.7 `--local=false --platform linux/amd64`, and from a TLS registry:
//!    1.7's transfer service ignores `--plain-http`): `unpack_config` sends every layer to `dedup-diff` alone.
//! 2. **Client-side unpacker** (`ctr images pull --local`): layers go through containerd's diff service, whose
//!    `default = ["dedup-diff", "walking"]` tries ours first.
//!
//!    In both, busybox and the layered image (a whiteout, an opaque dir, an umoci whiteout across three layers) run
//!    and show what they must, and OUR Apply did the work: the daemon logged a successful Apply of every layer blob,
//!    and every committed `layer.erofs` carries the UUID the erofs differ derives from its blob's digest (a Commit-time
//!    conversion stamps the snapshot id instead). Phase 1 also runs a writer container and diffs its snapshot
//!    (`ctr snapshots diff`): ours on 2.1; on 1.7, whose proxy calls carry no namespace or lease, our Compare answers
//!    Unimplemented and containerd's walking differ writes the same changes.
//! 3. **Fall-through**: the daemon runs with `--differs erofs`, so a layer for another snapshotter (`--local
//!    --snapshotter overlayfs`: mounts that are not ours) gets Unimplemented from us and containerd's `walking`
//!    unpacks it; the image runs. (The transfer service has no fall-through: it uses the one differ unpack_config
//!    names.)
//!
//! On 1.7 the pulls work only because Apply reads the namespace from the target snapshot's key (1.7 sends no
//! `containerd-namespace` to proxy differs).
//!
//! Needs root and the e2e tools (see tests/e2e/mod.rs); the first run downloads the two containerd packages.
//!
//!     cargo test --release -p dedup-snapshotter --test e2e_matrix -- --nocapture

mod e2e;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use e2e::{host_sh, is_whiteout, Env};

/// What the layered image must show (as in e2e_containerd).
const LAYERED_SCRIPT: &str = "test -e /data/gone || echo gone:absent; test -e /data/gone2 || echo gone2:absent; \
                              echo dir: $(ls -A /data/dir); echo data: $(ls -A /data); \
                              cat /data/keep /data/new /data/dir/c";
const LAYERED_OUT: &str = "gone:absent\ngone2:absent\ndir: c\ndata: dir keep new\nkeep v2\nnew\nc\n";
const BUSYBOX_SCRIPT: &str = "echo hello; wc -l < /etc/passwd; readlink /bin/sh; id -u";
const BUSYBOX_OUT: &str = "hello\n2\nbusybox\n0\n";

/// The UUID the erofs differ gives the image of a layer blob (`uuid_from` in crates/layer-convert/src/convert.rs:
/// RFC 4122 version/variant bits over the first 16 bytes of the blob's sha256).
fn differ_uuid(blob_digest: &str) -> [u8; 16] {
    let hex = blob_digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("not a sha256 digest: {blob_digest}"));
    let d = hex::decode(hex).expect("hex digest");
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

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The daemon's log lines written since `from` (a byte offset of the log), without colours.
fn log_since(env: &Env, from: usize) -> Vec<String> {
    let log = env.log();
    strip_ansi(log.get(from..).unwrap_or(""))
        .lines()
        .map(str::to_string)
        .collect()
}

/// How a phase pulls.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    /// The transfer service.
    Transfer,
    /// The client-side unpacker (`--local`).
    Local,
}

struct M {
    env: Env,
    version: String,
}

impl M {
    /// The registry a phase pulls from: containerd 1.7's transfer service speaks HTTPS only.
    fn registry(&self, how: Via) -> String {
        if how == Via::Transfer && self.version == "1.7" {
            self.env.var("E2E_REGISTRY_TLS")
        } else {
            self.env.registry.clone()
        }
    }

    fn reference(&self, how: Via, name: &str) -> String {
        format!("{}/{name}:latest", self.registry(how))
    }

    fn pull(&self, how: Via, snapshotter: &str, name: &str) -> String {
        let r = self.reference(how, name);
        let mut a = vec!["image", "pull", "--snapshotter", snapshotter];
        match (how, self.version.as_str()) {
            // 1.7: `--local` defaults to true, and its transfer path unpacks only for the platforms named
            (Via::Transfer, "1.7") => a.extend(["--local=false", "--platform", "linux/amd64"]),
            (Via::Transfer, _) => a.push("--plain-http"),
            (Via::Local, _) => a.extend(["--local", "--plain-http"]),
        }
        a.push(&r);
        let t = Instant::now();
        self.env.ctr(&a);
        eprintln!(
            "e2e[{}]: pulled {r} ({how:?}, {snapshotter}) in {:.2}s",
            self.version,
            t.elapsed().as_secs_f64()
        );
        r
    }

    fn run(&self, snapshotter: &str, reference: &str, id: &str, script: &str) -> String {
        self.env.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            reference,
            id,
            "sh",
            "-c",
            script,
        ])
    }

    /// Committed layers of our store by their image's UUID.
    fn committed_by_uuid(&self) -> BTreeMap<[u8; 16], PathBuf> {
        self.env
            .snapshot_dirs()
            .into_iter()
            .filter(|d| d.join("layer.erofs").is_file())
            .map(|d| (image_uuid(&d.join("layer.erofs")), d))
            .collect()
    }

    /// Every layer of `reference` was applied by our erofs differ: a successful Apply of its blob in the log since
    /// `log_from`, and a committed layer.erofs with the differ's UUID for that blob (no Commit conversion).
    fn check_applied_by_us(&self, reference: &str, log_from: usize) {
        let lines = log_since(&self.env, log_from);
        let committed = self.committed_by_uuid();
        for d in self.env.image_layer_digests(reference) {
            let applied = lines
                .iter()
                .any(|l| l.contains("rpc=\"Apply\"") && l.contains(&format!("digest={d} ")) && l.contains("ok=true"));
            if !applied {
                self.env.dump_logs();
            }
            assert!(
                applied,
                "[{}] {reference}: no successful Apply of layer {d} in the daemon's log since this pull",
                self.version
            );
            assert!(
                committed.contains_key(&differ_uuid(&d)),
                "[{}] {reference}: no committed layer.erofs carries the erofs differ's UUID for {d} (converted at \
                 Commit?); committed: {:?}",
                self.version,
                committed.values().collect::<Vec<_>>()
            );
        }
    }

    /// Pulls busybox and layered through `how`, checks our Apply made every layer, runs both.
    fn pull_and_run(&self, how: Via) -> (String, String) {
        let from = self.env.log().len();
        let busybox = self.pull(how, "dedup", "busybox");
        let layered = self.pull(how, "dedup", "layered");
        self.check_applied_by_us(&busybox, from);
        self.check_applied_by_us(&layered, from);
        let n = self.committed_by_uuid().len();
        assert_eq!(
            n, 4,
            "[{}] busybox (1 layer) + layered (3 layers, another base): 4 committed layers, got {n}",
            self.version
        );
        let tag = format!("{how:?}").to_lowercase();
        assert_eq!(
            self.run("dedup", &busybox, &format!("bb-{tag}"), BUSYBOX_SCRIPT),
            BUSYBOX_OUT
        );
        assert_eq!(
            self.run("dedup", &layered, &format!("lay-{tag}"), LAYERED_SCRIPT),
            LAYERED_OUT
        );
        self.env.check_layout();
        (busybox, layered)
    }

    /// A writer container on `layered`, its changes in its upper dir, and `ctr snapshots diff` of its snapshot
    /// through containerd's diff service: our Compare on 2.1; on 1.7 (no namespace, no lease on proxy calls) ours
    /// answers Unimplemented and containerd's walking differ writes it.
    fn writer_and_compare(&self, layered: &str) {
        self.env.ctr(&[
            "run",
            "-d",
            "--snapshotter",
            "dedup",
            layered,
            "writer",
            "sh",
            "-c",
            "echo written > /data/written; rm /data/keep; touch /ready; sleep 600",
        ]);
        let upper = self.env.upperdir("writer");
        self.env.wait_until("the writer's marker in its upper dir", 20, || {
            upper.join("ready").exists()
        });
        assert_eq!(fs::read_to_string(upper.join("data/written")).unwrap(), "written\n");
        assert!(
            is_whiteout(&upper.join("data/keep")),
            "no whiteout for /data/keep in {}",
            upper.display()
        );

        let from = self.env.log().len();
        let listing = host_sh(&format!(
            "{} -a {} -n {} snapshots --snapshotter dedup diff writer | tar -tzf - | sort",
            self.env.ctr_bin, self.env.ctrd_sock, self.env.ns
        ));
        let names: Vec<&str> = listing.lines().map(|l| l.trim_start_matches("./")).collect();
        for want in ["data/written", "data/.wh.keep", "ready"] {
            assert!(
                names.contains(&want),
                "[{}] the writer's diff lacks {want}: {names:?}",
                self.version
            );
        }
        let lines = log_since(&self.env, from);
        let ours: Vec<&String> = lines.iter().filter(|l| l.contains("rpc=\"Diff\"")).collect();
        if self.version == "1.7" {
            assert!(
                ours.iter().any(|l| l.contains("Unimplemented")),
                "[1.7] our Compare should have answered Unimplemented (no namespace): {ours:?}"
            );
        } else {
            assert!(
                ours.iter().any(|l| l.contains("ok=true")),
                "[{}] our Compare did not write the diff: {ours:?}",
                self.version
            );
        }
        self.env.remove_container("writer");
    }

    /// `--local` pull for containerd's overlayfs snapshotter: our differ (erofs only) answers Unimplemented for
    /// every layer (not our mounts), containerd's walking differ unpacks them, and the image runs.
    fn fall_through(&self) {
        let from = self.env.log().len();
        let ours_before = self.env.snapshots();
        let r = self.pull(Via::Local, "overlayfs", "busybox-plus");
        let lines = log_since(&self.env, from);
        for d in self.env.image_layer_digests(&r) {
            let refused = lines.iter().any(|l| {
                l.contains("rpc=\"Apply\"")
                    && l.contains(&format!("digest={d}"))
                    && (l.contains("Unimplemented") || l.contains("not implemented"))
                    && !l.contains("ok=true")
            });
            assert!(
                refused,
                "[{}] our differ was not asked (or did not refuse) layer {d} of {r}: {lines:#?}",
                self.version
            );
        }
        assert_eq!(
            self.env.snapshots(),
            ours_before,
            "[{}] a pull for overlayfs touched our snapshots",
            self.version
        );
        let out = self.env.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "overlayfs",
            &r,
            "bbp",
            "sh",
            "-c",
            "echo walked; id -u",
        ]);
        assert_eq!(out, "walked\n0\n");
    }
}

fn matrix(version: &str) {
    let _serial = e2e::serial();
    let t0 = Instant::now();
    let cmd = format!(
        "{} serve --root {{root}} --address {{socket}} --containerd {{containerd}} --differs erofs",
        env!("CARGO_BIN_EXE_dedup-snapshotter")
    );
    let env = Env::start_with_version(&cmd, Some(version));
    assert_eq!(env.containerd, version);
    assert!(env.diff_proxy, "containerd {version} should have our diff proxy");
    let m = M {
        env,
        version: version.to_string(),
    };

    let t = Instant::now();
    let (_, layered) = m.pull_and_run(Via::Transfer);
    m.writer_and_compare(&layered);
    m.env.remove_everything();
    eprintln!(
        "e2e[{version}]: transfer service phase in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    m.pull_and_run(Via::Local);
    m.env.remove_everything();
    eprintln!(
        "e2e[{version}]: client-side unpack phase in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    m.fall_through();
    m.env.remove_everything();
    eprintln!(
        "e2e[{version}]: fall-through phase in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    m.env.stop();
    eprintln!(
        "e2e[{version}]: containerd {version} matrix in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn containerd_1_7() {
    matrix("1.7");
}

#[test]
fn containerd_2_1() {
    matrix("2.1");
}

/// `serve --stream-layers` on containerd 2.1's transfer service (which passes the layer labels to a snapshotter that
/// exports enable_remote_snapshot_annotations): every layer is downloaded by the snapshotter and converted as it
/// arrives, containerd downloads none of them and calls no Apply, and the images run with whiteouts and opaque
/// directories intact.
#[test]
fn streamed_layers_on_containerd_2_1() {
    let _serial = e2e::serial();
    let cmd = format!(
        "{} serve --root {{root}} --address {{socket}} --containerd {{containerd}} --differs erofs --stream-layers",
        env!("CARGO_BIN_EXE_dedup-snapshotter")
    );
    let m = M {
        env: Env::start_with_version(&cmd, Some("2.1")),
        version: "2.1".into(),
    };
    let from = m.env.log().len();
    let busybox = m.pull(Via::Transfer, "dedup", "busybox");
    let layered = m.pull(Via::Transfer, "dedup", "layered");
    let lines = log_since(&m.env, from);
    let content = m.env.ctr(&["content", "ls", "-q"]);
    let mut streamed = 0;
    for r in [&busybox, &layered] {
        for d in m.env.image_layer_digests(r) {
            let ok = lines
                .iter()
                .any(|l| l.contains("streamed layer committed") && l.contains(&format!("digest={d}")));
            if !ok {
                m.env.dump_logs();
            }
            assert!(ok, "{r}: layer {d} was not streamed: {lines:#?}");
            assert!(
                !lines.iter().any(|l| l.contains("rpc=\"Apply\"") && l.contains(&d)),
                "{r}: containerd applied {d} although it was streamed"
            );
            assert!(!content.contains(&d), "{r}: containerd downloaded {d}");
            streamed += 1;
        }
    }
    assert_eq!(streamed, 4, "busybox (1 layer) + layered (3 layers)");
    assert_eq!(m.run("dedup", &busybox, "bb-stream", BUSYBOX_SCRIPT), BUSYBOX_OUT);
    assert_eq!(m.run("dedup", &layered, "lay-stream", LAYERED_SCRIPT), LAYERED_OUT);
    m.env.check_layout();
    m.env.remove_everything();
    m.env.stop();
}
