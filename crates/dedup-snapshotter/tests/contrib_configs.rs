//! What contrib/ ships, checked as users meet it:
//!
//! - **containerd snippets** (`containerd-config.toml` for 1.6/1.7, `containerd-config-v3.toml` for 2.x) parse and
//!   name what the README promises (the proxy snapshotter `dedup`, the proxy differ `dedup-diff` first in the diff
//!   service, the transfer service's `unpack_config`, CRI's `snapshotter = "dedup"`,
//!   `disable_snapshot_annotations = false`, `discard_unpacked_layers = false`), and containerd **1.7.24 and 2.1.9
//!   start with them verbatim**: only the socket path the snippets name is moved into a temporary directory, and a
//!   wrapper adds what a host's own config has (root, state, the gRPC socket, CRI's stream port, the opt dir). With
//!   our daemon serving on that socket (started with `--config contrib/config.toml`, flags moving its paths),
//!   `ctr plugins ls` must list `dedup`, `dedup-diff`, the diff and transfer services and CRI as `ok`, a snapshot
//!   listing through containerd must reach the daemon, CRI's `ImageFsInfo` must name the `dedup` snapshotter's
//!   directory, and CRI's image settings must be ours as containerd decoded them (`containerd config dump`, which
//!   drops misplaced keys) and as CRI runs with them: 1.7's `Status` with `verbose` (what `crictl info` prints)
//!   shows them; 2.x shows only its runtime part there, and logs that annotations send it to the client-side
//!   unpacker ("Falling back to local image pull mode").
//! - **k3s** (`k3s/config-v3.toml.tmpl`): its only template action is `{{ template "base" . }}`; rendered with a
//!   stand-in for k3s's v3 base (which owns CRI's tables, hence `--snapshotter=dedup` instead of a CRI table here)
//!   it is valid TOML, and containerd 2.1 starts with it, loads the same plugins and pulls for CRI through the
//!   transfer service (annotations off, as k3s's base sets them).
//! - **Kubernetes** (`kubernetes/daemonset.yaml`): parses as YAML (yaml-rust2); both containers privileged, running
//!   the units' command lines; every path the daemons use is on a host mount, `/dev/fuse` is the host's, the mounts
//!   the daemons make (`/run/dedupd/blobs`, the snapshotter's root) propagate back to the host (Bidirectional); the
//!   ConfigMap's config.toml is accepted by the daemon, and dedupd starts with the DaemonSet's arguments.
//!
//! Needs root (mounts, containerd). The first run downloads containerd 1.7/2.1 into the cache
//! (scripts/lib/containerd-versions.sh).
//!
//!     cargo test --release -p dedup-snapshotter --test contrib_configs -- --nocapture

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread::sleep;
use std::time::{Duration, Instant};

use test_support::{workspace_bin, ChildGuard, TestDir};
use yaml_rust2::{Yaml, YamlLoader};

/// The socket every snippet names (contrib/config.toml's `address`).
const SOCKET: &str = "/run/dedup-snapshotter/snapshotter.sock";
/// The one template action k3s's templates may use here.
const K3S_BASE: &str = r#"{{ template "base" . }}"#;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

fn contrib(p: &str) -> PathBuf {
    repo().join("contrib").join(p)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn parse_toml(what: &str, text: &str) -> toml::Table {
    text.parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("{what} is not valid TOML: {e}\n--- {what} ---\n{text}"))
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "these tests start containerd and mount FUSE: run them as root");
}

/// One containerd at a time: they share two cores with everything else.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `toml` path lookup: `get(&t, &["plugins", "io.containerd.grpc.v1.cri", "containerd"])`.
fn get<'a>(t: &'a toml::Table, path: &[&str]) -> &'a toml::Value {
    let mut cur: Option<&toml::Value> = None;
    let mut table = t;
    for (i, k) in path.iter().enumerate() {
        let v = table
            .get(*k)
            .unwrap_or_else(|| panic!("no `{}` in the config", path[..=i].join(".")));
        cur = Some(v);
        if i + 1 < path.len() {
            table = v
                .as_table()
                .unwrap_or_else(|| panic!("`{}` is not a table", path[..=i].join(".")));
        }
    }
    cur.expect("non-empty path")
}

fn str_at<'a>(t: &'a toml::Table, path: &[&str]) -> &'a str {
    get(t, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{}` is not a string", path.join(".")))
}

fn bool_at(t: &toml::Table, path: &[&str]) -> bool {
    get(t, path)
        .as_bool()
        .unwrap_or_else(|| panic!("`{}` is not a boolean", path.join(".")))
}

/// The proxies, the diff service order and the transfer service's unpack_config, shared by every snippet.
fn check_proxies(t: &toml::Table, diff_service: &str, transfer: &str) {
    assert_eq!(str_at(t, &["proxy_plugins", "dedup", "type"]), "snapshot");
    assert_eq!(str_at(t, &["proxy_plugins", "dedup", "address"]), SOCKET);
    assert_eq!(str_at(t, &["proxy_plugins", "dedup-diff", "type"]), "diff");
    assert_eq!(str_at(t, &["proxy_plugins", "dedup-diff", "address"]), SOCKET);
    let default: Vec<&str> = get(t, &["plugins", diff_service, "default"])
        .as_array()
        .expect("diff-service default is a list")
        .iter()
        .map(|v| v.as_str().expect("differ names are strings"))
        .collect();
    assert_eq!(
        default,
        ["dedup-diff", "walking"],
        "our differ first, containerd's after it"
    );
    let unpack = get(t, &["plugins", transfer, "unpack_config"])
        .as_array()
        .expect("unpack_config is an array of tables");
    assert!(
        unpack
            .iter()
            .any(|u| u.get("snapshotter").and_then(|v| v.as_str()) == Some("dedup")
                && u.get("differ").and_then(|v| v.as_str()) == Some("dedup-diff")
                && u.get("platform").and_then(|v| v.as_str()).is_some()),
        "no unpack_config entry with snapshotter dedup and differ dedup-diff: {unpack:?}"
    );
}

#[test]
fn containerd_snippets_name_the_proxies_unpack_config_and_cri_lines() {
    let v2 = parse_toml("containerd-config.toml", &read(&contrib("containerd-config.toml")));
    assert_eq!(get(&v2, &["version"]).as_integer(), Some(2));
    check_proxies(
        &v2,
        "io.containerd.service.v1.diff-service",
        "io.containerd.transfer.v1.local",
    );
    let cri = ["plugins", "io.containerd.grpc.v1.cri", "containerd"];
    assert_eq!(str_at(&v2, &[&cri[..], &["snapshotter"]].concat()), "dedup");
    assert!(!bool_at(&v2, &[&cri[..], &["disable_snapshot_annotations"]].concat()));
    assert!(!bool_at(&v2, &[&cri[..], &["discard_unpacked_layers"]].concat()));

    let v3 = parse_toml(
        "containerd-config-v3.toml",
        &read(&contrib("containerd-config-v3.toml")),
    );
    assert_eq!(get(&v3, &["version"]).as_integer(), Some(3));
    check_proxies(
        &v3,
        "io.containerd.service.v1.diff-service",
        "io.containerd.transfer.v1.local",
    );
    assert_eq!(
        str_at(
            &v3,
            &[
                "proxy_plugins",
                "dedup",
                "exports",
                "enable_remote_snapshot_annotations"
            ]
        ),
        "true"
    );
    let cri = ["plugins", "io.containerd.cri.v1.images"];
    assert_eq!(str_at(&v3, &[&cri[..], &["snapshotter"]].concat()), "dedup");
    assert!(!bool_at(&v3, &[&cri[..], &["disable_snapshot_annotations"]].concat()));
    assert!(!bool_at(&v3, &[&cri[..], &["discard_unpacked_layers"]].concat()));
}

/// A stand-in for what k3s's v3 base template renders to with `--snapshotter=dedup`: the tables it owns (CRI's
/// images and runtime plugins, the opt dir, the gRPC socket) in the form k3s writes them, its host paths moved
/// into `dir`. Enough to catch a template that redefines one of them (TOML forbids that).
fn k3s_base(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"# File generated by k3s. DO NOT EDIT. Use config-v3.toml.tmpl instead.
version = 3
root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{d}/c.sock"

[ttrpc]
  address = "{d}/c.sock.ttrpc"

[plugins.'io.containerd.internal.v1.opt']
  path = "{d}/opt"

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
  enable_unprivileged_ports = true
  enable_unprivileged_icmp = true
  device_ownership_from_security_context = false

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "dedup"
  disable_snapshot_annotations = true

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "rancher/mirrored-pause:3.6"

[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dir = "{d}/cni/bin"
  conf_dir = "{d}/cni/conf"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  SystemdCgroup = false

[plugins.'io.containerd.cri.v1.images'.registry]
  config_path = "{d}/certs.d"
"#
    )
}

/// The k3s template with its one action replaced by `base`, as k3s's text/template renders it (every other
/// byte is copied as it is, so there must be no other action).
fn render_k3s(template: &str, base: &str) -> String {
    let actions = template.matches("{{").count();
    assert_eq!(
        template.lines().filter(|l| l.trim() == K3S_BASE).count(),
        1,
        "the k3s template must have exactly one `{K3S_BASE}` line"
    );
    assert_eq!(
        actions, 1,
        "the k3s template has template actions besides `{K3S_BASE}` (comments included)"
    );
    template.replace(K3S_BASE, base)
}

#[test]
fn k3s_template_renders_to_valid_toml_over_the_v3_base() {
    let template = read(&contrib("k3s/config-v3.toml.tmpl"));
    let dir = TestDir::new("k3s.");
    let rendered = render_k3s(&template, &k3s_base(dir.path()));
    let t = parse_toml("the rendered k3s template", &rendered);
    assert_eq!(get(&t, &["version"]).as_integer(), Some(3));
    check_proxies(
        &t,
        "io.containerd.service.v1.diff-service",
        "io.containerd.transfer.v1.local",
    );
    assert_eq!(
        str_at(
            &t,
            &[
                "proxy_plugins",
                "dedup",
                "exports",
                "enable_remote_snapshot_annotations"
            ]
        ),
        "true"
    );
    // What follows the base line is everything the template adds: none of the base's tables.
    let after = template.split(K3S_BASE).nth(1).unwrap();
    for owned in [
        "io.containerd.cri.v1.images",
        "io.containerd.cri.v1.runtime",
        "io.containerd.grpc.v1.cri",
    ] {
        assert!(
            !after.contains(owned),
            "the k3s template redefines `{owned}`, which k3s's base template writes"
        );
    }
}

/// Runs `cmd`; panics unless it succeeds; returns stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The bin dir of containerd `version` (`1.7` or `2.1`), installed into the cache on first use.
fn containerd_bindir(version: &str) -> PathBuf {
    let out = Command::new(repo().join("scripts/lib/containerd-versions.sh"))
        .args(["install", version])
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/lib/containerd-versions.sh");
    assert!(
        out.status.success(),
        "cannot install containerd {version} (scripts/lib/containerd-versions.sh)"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Our daemon and a containerd started with a given config, in one temporary directory.
struct Node {
    // Dropped in this order: containerd, then the daemon, then the directory (unmounting what is left).
    _containerd: ChildGuard,
    _daemon: ChildGuard,
    ctr: PathBuf,
    sock: PathBuf,
    dir: TestDir,
}

/// A log file both of a child's output streams append to (appends do not overwrite each other).
fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

fn wait_until(what: &str, timeout: Duration, child: &mut ChildGuard, log: &Path, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        if let Some(st) = child.child_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!(
                "{what} exited with {st}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < timeout,
            "{what} did not come up within {timeout:?}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        sleep(Duration::from_millis(100));
    }
}

impl Node {
    /// Starts the daemon on `DIR/dedup.sock` (contrib/config.toml, its paths moved by flags) and containerd
    /// `version` with `config(DIR)` (which must point the proxies at `DIR/dedup.sock` and containerd's socket at
    /// `DIR/c.sock`).
    fn start(version: &str, config: impl FnOnce(&Path) -> String) -> Node {
        let bindir = containerd_bindir(version);
        let dir = TestDir::new_in(Path::new("/tmp"), "cc.");
        let sock = dir.join("dedup.sock");
        let dlog = dir.join("daemon.log");
        let child = Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
            .arg("serve")
            .arg("--config")
            .arg(contrib("config.toml"))
            .arg("--root")
            .arg(dir.join("snapshotter"))
            .arg("--address")
            .arg(&sock)
            .arg("--containerd")
            .arg(dir.join("c.sock"))
            .stdin(Stdio::null())
            .stdout(log_file(&dlog))
            .stderr(log_file(&dlog))
            .spawn()
            .expect("spawn dedup-snapshotter serve");
        let mut daemon = ChildGuard::new(child);
        wait_until(
            "dedup-snapshotter serve",
            Duration::from_secs(30),
            &mut daemon,
            &dlog,
            || UnixStream::connect(&sock).is_ok(),
        );

        let cfg = dir.join("containerd.toml");
        std::fs::write(&cfg, config(dir.path())).unwrap();
        let clog = dir.join("containerd.log");
        let child = Command::new(bindir.join("containerd"))
            .arg("--config")
            .arg(&cfg)
            // containerd-shim-runc-v2 is found through PATH (no task runs here, but keep it that version's).
            .env(
                "PATH",
                format!("{}:{}", bindir.display(), std::env::var("PATH").unwrap_or_default()),
            )
            .stdin(Stdio::null())
            .stdout(log_file(&clog))
            .stderr(log_file(&clog))
            .spawn()
            .expect("spawn containerd");
        let mut containerd = ChildGuard::new(child);
        let ctr = bindir.join("ctr");
        let csock = dir.join("c.sock");
        wait_until("containerd", Duration::from_secs(60), &mut containerd, &clog, || {
            Command::new(&ctr)
                .arg("-a")
                .arg(&csock)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        });
        Node {
            _containerd: containerd,
            _daemon: daemon,
            ctr,
            sock: csock,
            dir,
        }
    }

    fn ctr(&self, args: &[&str]) -> String {
        let out = Command::new(&self.ctr)
            .arg("-a")
            .arg(&self.sock)
            .args(args)
            .output()
            .expect("run ctr");
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}\n--- containerd log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr plugins ls`: (type, id) -> status.
    fn plugins(&self) -> HashMap<(String, String), String> {
        self.ctr(&["plugins", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 4).then(|| ((f[0].to_string(), f[1].to_string()), f[f.len() - 1].to_string()))
            })
            .collect()
    }

    /// Fails unless every (type, id) is listed and `ok`.
    fn check_plugins_ok(&self, want: &[(&str, &str)]) {
        let plugins = self.plugins();
        for (ty, id) in want {
            match plugins.get(&(ty.to_string(), id.to_string())) {
                Some(s) if s == "ok" => {}
                other => panic!(
                    "plugin {ty} {id} is {other:?}, not ok\n--- ctr plugins ls ---\n{}\n--- containerd log ---\n{}",
                    self.ctr(&["plugins", "ls"]),
                    self.log()
                ),
            }
        }
    }

    /// CRI's `Status` with `verbose` (what `crictl info` prints): the info map, each value JSON.
    fn cri_info(&self) -> HashMap<String, serde_json::Value> {
        use k8s_cri::v1 as cri;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let info = rt.block_on(async {
            let ch = containerd_client::connect(&self.sock)
                .await
                .expect("connect to containerd");
            cri::runtime_service_client::RuntimeServiceClient::new(ch)
                .status(cri::StatusRequest { verbose: true })
                .await
                .expect("CRI Status")
                .into_inner()
                .info
        });
        info.into_iter()
            .map(|(k, v)| {
                let j = serde_json::from_str(&v).unwrap_or(serde_json::Value::String(v));
                (k, j)
            })
            .collect()
    }

    /// CRI's image service works from our snapshotter's file system (`ImageFsInfo`, what the kubelet's image
    /// garbage collection reads): its mount point is the `dedup` snapshotter's directory.
    fn check_cri_image_fs(&self) {
        use k8s_cri::v1 as cri;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let fs = rt.block_on(async {
            let ch = containerd_client::connect(&self.sock)
                .await
                .expect("connect to containerd");
            cri::image_service_client::ImageServiceClient::new(ch)
                .image_fs_info(cri::ImageFsInfoRequest {})
                .await
                .expect("CRI ImageFsInfo")
                .into_inner()
                .image_filesystems
        });
        let points: Vec<String> = fs
            .iter()
            .filter_map(|f| f.fs_id.as_ref().map(|id| id.mountpoint.clone()))
            .collect();
        assert!(
            points
                .iter()
                .any(|p| p.ends_with("/io.containerd.snapshotter.v1.dedup")),
            "CRI's image file systems are {points:?}, not the dedup snapshotter's"
        );
    }

    /// The config as containerd decoded it (`containerd config dump`: every plugin's table through its config type,
    /// so a misspelt or misplaced key is not there); the table of CRI's image settings and its three values.
    fn dumped_cri_images(&self, version: u8) -> (String, bool, bool) {
        let bindir = self.ctr.parent().unwrap();
        let dump = run_ok(
            Command::new(bindir.join("containerd"))
                .arg("--config")
                .arg(self.dir.join("containerd.toml"))
                .args(["config", "dump"]),
        );
        let t = parse_toml("containerd config dump", &dump);
        let table: &[&str] = if version == 2 {
            &["plugins", "io.containerd.grpc.v1.cri", "containerd"]
        } else {
            &["plugins", "io.containerd.cri.v1.images"]
        };
        (
            str_at(&t, &[table, &["snapshotter"]].concat()).to_string(),
            bool_at(&t, &[table, &["disable_snapshot_annotations"]].concat()),
            bool_at(&t, &[table, &["discard_unpacked_layers"]].concat()),
        )
    }

    /// The containerd proxy reaches our daemon: a snapshot listing through containerd answers.
    fn check_snapshotter_answers(&self) {
        self.ctr(&["-n", "contrib", "snapshots", "--snapshotter", "dedup", "ls"]);
    }
}

/// CRI's image settings as containerd 1.7 reports them at run time (`Status` with `verbose`, `config.containerd`):
/// (snapshotter, disable_snapshot_annotations, discard_unpacked_layers). containerd 2.x reports only the runtime
/// part there; [`Node::dumped_cri_images`] covers it.
fn cri_status_settings(info: &HashMap<String, serde_json::Value>) -> (String, bool, bool) {
    let c = info
        .get("config")
        .and_then(|c| c.get("containerd"))
        .unwrap_or_else(|| panic!("CRI Status (verbose) has no config.containerd: {info:?}"));
    (
        c["snapshotter"].as_str().expect("snapshotter").to_string(),
        c["disableSnapshotAnnotations"]
            .as_bool()
            .expect("disableSnapshotAnnotations"),
        c["discardUnpackedLayers"].as_bool().expect("discardUnpackedLayers"),
    )
}

/// The snippet with its socket moved into `dir`, inside what a host config around it has.
fn wrap(snippet: &str, dir: &Path, cri_table: &str, opt_table: &str) -> String {
    let d = dir.display();
    let body = snippet.replace(SOCKET, &format!("{d}/dedup.sock"));
    assert!(
        body.contains(&format!("{d}/dedup.sock")),
        "the snippet names no {SOCKET}"
    );
    format!(
        r#"# Host settings around the snippet (the snippet leaves them to the host's own config).
root = "{d}/root"
state = "{d}/state"

# --- the snippet, verbatim but for the socket path ---
{body}
# --- end of the snippet ---

[grpc]
  address = "{d}/c.sock"

[ttrpc]
  address = "{d}/c.sock.ttrpc"

# Parallel test runs' containerds must not share CRI's stream port or /opt/containerd.
[plugins.{cri_table}]
  stream_server_port = "0"

[plugins.{opt_table}]
  path = "{d}/opt"
"#
    )
}

#[test]
fn containerd_1_7_starts_with_the_v2_snippet() {
    require_root();
    let _serial = serial();
    let snippet = read(&contrib("containerd-config.toml"));
    let node = Node::start("1.7", |d| {
        wrap(
            &snippet,
            d,
            r#""io.containerd.grpc.v1.cri""#,
            r#""io.containerd.internal.v1.opt""#,
        )
    });
    node.check_plugins_ok(&[
        ("io.containerd.snapshotter.v1", "dedup"),
        ("io.containerd.differ.v1", "dedup-diff"),
        ("io.containerd.differ.v1", "walking"),
        ("io.containerd.service.v1", "diff-service"),
        ("io.containerd.transfer.v1", "local"),
        ("io.containerd.grpc.v1", "cri"),
    ]);
    node.check_snapshotter_answers();
    node.check_cri_image_fs();
    let want = ("dedup".to_string(), false, false);
    assert_eq!(node.dumped_cri_images(2), want);
    assert_eq!(
        cri_status_settings(&node.cri_info()),
        want,
        "CRI runs with the snippet's settings"
    );
}

#[test]
fn containerd_2_1_starts_with_the_v3_snippet() {
    require_root();
    let _serial = serial();
    let snippet = read(&contrib("containerd-config-v3.toml"));
    let node = Node::start("2.1", |d| {
        wrap(
            &snippet,
            d,
            "'io.containerd.grpc.v1.cri'",
            "'io.containerd.internal.v1.opt'",
        )
    });
    check_2_1(&node);
    assert_eq!(node.dumped_cri_images(3), ("dedup".to_string(), false, false));
    // With annotations on, CRI 2.x leaves the transfer service for the client-side unpacker, which labels
    // each layer (README): its log says so.
    assert!(
        node.log().contains("Falling back to local image pull mode"),
        "CRI did not pick up disable_snapshot_annotations = false:\n{}",
        node.log()
    );
}

#[test]
fn containerd_2_1_starts_with_the_k3s_template() {
    require_root();
    let _serial = serial();
    let template = read(&contrib("k3s/config-v3.toml.tmpl"));
    let node = Node::start("2.1", |d| {
        render_k3s(&template, &k3s_base(d)).replace(SOCKET, &format!("{}/dedup.sock", d.display()))
    });
    check_2_1(&node);
    // k3s's base turns annotations off for any snapshotter but stargz; the snapshotter is k3s's --snapshotter.
    let (snapshotter, disable_annotations, _) = node.dumped_cri_images(3);
    assert_eq!((snapshotter.as_str(), disable_annotations), ("dedup", true));
    // So CRI pulls through the transfer service, which unpacks with the template's unpack_config.
    assert!(
        !node.log().contains("Falling back to local image pull mode"),
        "CRI left the transfer service:\n{}",
        node.log()
    );
}

fn check_2_1(node: &Node) {
    node.check_plugins_ok(&[
        ("io.containerd.snapshotter.v1", "dedup"),
        ("io.containerd.differ.v1", "dedup-diff"),
        ("io.containerd.differ.v1", "walking"),
        ("io.containerd.service.v1", "diff-service"),
        ("io.containerd.transfer.v1", "local"),
        ("io.containerd.cri.v1", "images"),
        ("io.containerd.cri.v1", "runtime"),
        ("io.containerd.grpc.v1", "cri"),
    ]);
    node.check_snapshotter_answers();
    node.check_cri_image_fs();
}

// --- Kubernetes ---------------------------------------------------------------------------------------------

fn yaml_str<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str().unwrap_or_else(|| panic!("{what} is not a string: {y:?}"))
}

fn yaml_list<'a>(y: &'a Yaml, what: &str) -> &'a [Yaml] {
    y.as_vec().unwrap_or_else(|| panic!("{what} is not a list: {y:?}"))
}

/// A container's volume mount.
struct VolMount {
    volume: String,
    path: String,
    bidirectional: bool,
}

fn mounts_of(c: &Yaml) -> Vec<VolMount> {
    yaml_list(&c["volumeMounts"], "volumeMounts")
        .iter()
        .map(|m| VolMount {
            volume: yaml_str(&m["name"], "volumeMount name").to_string(),
            path: yaml_str(&m["mountPath"], "mountPath").to_string(),
            bidirectional: m["mountPropagation"].as_str() == Some("Bidirectional"),
        })
        .collect()
}

/// The deepest mount of `mounts` that holds `path`.
fn mount_for<'a>(mounts: &'a [VolMount], path: &str, container: &str) -> &'a VolMount {
    mounts
        .iter()
        .filter(|m| Path::new(path).starts_with(&m.path))
        .max_by_key(|m| m.path.len())
        .unwrap_or_else(|| panic!("{container}: {path} is on no volume mount"))
}

/// The value after `--flag` in a command line.
fn flag<'a>(cmd: &'a [String], name: &str) -> &'a str {
    let i = cmd
        .iter()
        .position(|a| a == name)
        .unwrap_or_else(|| panic!("{name} is not in {cmd:?}"));
    cmd.get(i + 1)
        .unwrap_or_else(|| panic!("{name} has no value in {cmd:?}"))
}

/// The ExecStart command line of a contrib unit, split on whitespace (they quote nothing).
fn exec_start(unit: &str) -> Vec<String> {
    read(&contrib(unit))
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("{unit} has no ExecStart"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn kubernetes_daemonset_runs_both_daemons_with_host_mounts() {
    require_root();
    let text = read(&contrib("kubernetes/daemonset.yaml"));
    let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("daemonset.yaml is not valid YAML: {e}"));
    let by_kind = |kind: &str| -> &Yaml {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("daemonset.yaml has no {kind}"))
    };
    let cm = by_kind("ConfigMap");
    let ds = by_kind("DaemonSet");
    assert_eq!(ds["apiVersion"].as_str(), Some("apps/v1"));
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"], ds["spec"]["template"]["metadata"]["labels"],
        "the selector must match the pod template's labels"
    );
    let pod = &ds["spec"]["template"]["spec"];

    // Volumes: name -> (hostPath path and type, or the ConfigMap's name).
    let volumes: HashMap<String, &Yaml> = yaml_list(&pod["volumes"], "volumes")
        .iter()
        .map(|v| (yaml_str(&v["name"], "volume name").to_string(), v))
        .collect();
    let host_path = |vol: &str| -> &str {
        let v = volumes.get(vol).unwrap_or_else(|| panic!("no volume {vol}"));
        yaml_str(&v["hostPath"]["path"], &format!("volume {vol}'s hostPath"))
    };

    let containers = yaml_list(&pod["containers"], "containers");
    let container = |name: &str| -> &Yaml {
        containers
            .iter()
            .find(|c| c["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no container {name}"))
    };
    let command = |c: &Yaml| -> Vec<String> {
        yaml_list(&c["command"], "command")
            .iter()
            .map(|a| yaml_str(a, "command word").to_string())
            .collect()
    };
    for c in containers {
        assert_eq!(
            c["securityContext"]["privileged"].as_bool(),
            Some(true),
            "container {:?} must be privileged (mounts, /dev/fuse)",
            c["name"]
        );
    }

    // dedupd: the unit's command line; /dev/fuse is the host's; its FUSE mount propagates to the host.
    let dedupd = container("dedupd");
    let dcmd = command(dedupd);
    assert_eq!(
        dcmd,
        exec_start("dedupd.service"),
        "the DaemonSet runs dedupd as the unit does"
    );
    let dm = mounts_of(dedupd);
    let fuse = mount_for(&dm, "/dev/fuse", "dedupd");
    assert_eq!(
        (fuse.path.as_str(), host_path(&fuse.volume)),
        ("/dev/fuse", "/dev/fuse")
    );
    assert_eq!(volumes[&fuse.volume]["hostPath"]["type"].as_str(), Some("CharDevice"));
    for f in ["--root", "--socket", "--mountpoint"] {
        let p = flag(&dcmd, f);
        let m = mount_for(&dm, p, "dedupd");
        assert!(
            volumes[&m.volume]["hostPath"].as_hash().is_some(),
            "dedupd {f} {p} is not on a host path"
        );
    }
    let blobs = mount_for(&dm, flag(&dcmd, "--mountpoint"), "dedupd");
    assert!(
        blobs.bidirectional,
        "dedupd's FUSE mount must propagate to the host (Bidirectional)"
    );
    assert_eq!(host_path(&blobs.volume), "/run");

    // The snapshotter: the unit's command line, its config from the ConfigMap, its paths on host mounts.
    let snap = container("snapshotter");
    let scmd = command(snap);
    assert_eq!(
        scmd,
        exec_start("dedup-snapshotter.service"),
        "the DaemonSet runs the daemon as the unit does"
    );
    let sm = mounts_of(snap);
    let cfg_path = Path::new(flag(&scmd, "--config"));
    let cfg_mount = mount_for(&sm, cfg_path.to_str().unwrap(), "snapshotter");
    let cm_name = yaml_str(
        &volumes[&cfg_mount.volume]["configMap"]["name"],
        "the config volume's configMap",
    );
    assert_eq!(Some(cm_name), cm["metadata"]["name"].as_str());
    let key = cfg_path.strip_prefix(&cfg_mount.path).unwrap().to_str().unwrap();
    let config_text = yaml_str(&cm["data"][key], &format!("the ConfigMap's {key}"));
    let config = parse_toml("the ConfigMap's config.toml", config_text);
    for (k, must_propagate) in [
        ("root", true),
        ("address", false),
        ("containerd_address", false),
        ("fetch_socket", false),
    ] {
        let p = str_at(&config, &[k]);
        let m = mount_for(&sm, p, "snapshotter");
        assert!(
            volumes[&m.volume]["hostPath"].as_hash().is_some(),
            "snapshotter {k} {p} is not on a host path"
        );
        if must_propagate {
            assert!(
                m.bidirectional,
                "the layer mounts under {p} must propagate to the host (Bidirectional)"
            );
        }
    }
    assert_eq!(
        str_at(&config, &["fetch_socket"]),
        flag(&dcmd, "--socket"),
        "the snapshotter dials dedupd's socket"
    );

    // Both daemons accept what the DaemonSet gives them (host paths moved into a temporary directory).
    let dir = TestDir::new_in(Path::new("/tmp"), "ds.");
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, config_text).unwrap();
    let sock = dir.join("s.sock");
    let log = dir.join("daemons.log");
    let mut daemon = ChildGuard::new(
        Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--address")
            .arg(&sock)
            .args(["--differs", "none"])
            .stdin(Stdio::null())
            .stderr(log_file(&log))
            .spawn()
            .unwrap(),
    );
    wait_until(
        "serve with the ConfigMap's config",
        Duration::from_secs(30),
        &mut daemon,
        &log,
        || UnixStream::connect(&sock).is_ok(),
    );
    assert!(daemon.terminate().is_some_and(|s| s.success()));

    let moved: Vec<String> = dcmd[1..]
        .iter()
        .map(|a| {
            if a.starts_with('/') {
                format!("{}{a}", dir.path().display())
            } else if a.starts_with("127.0.0.1:") {
                // A dedupd on this machine may hold the real port.
                "127.0.0.1:0".to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let dsock = PathBuf::from(flag(&moved, "--socket"));
    let mountpoint = PathBuf::from(flag(&moved, "--mountpoint"));
    std::fs::create_dir_all(&mountpoint).unwrap();
    let mut dedupd = ChildGuard::new(
        Command::new(workspace_bin("dedupd"))
            .args(&moved)
            .stdin(Stdio::null())
            .stderr(log_file(&log))
            .spawn()
            .unwrap(),
    );
    wait_until(
        "dedupd with the DaemonSet's arguments",
        Duration::from_secs(30),
        &mut dedupd,
        &log,
        || fetch_api::Client::new(&dsock).ping().is_ok(),
    );
    // Its blobs' directory: the FUSE mount, or on the fanotify path a directory of links to the cache files
    // (which the snapshotter container mounts from dedupd's root, mounted there at the same path).
    let ping = fetch_api::Client::new(&dsock).ping().unwrap();
    match ping.data_path.as_str() {
        "fuse" => assert!(
            test_support::is_mounted(&mountpoint),
            "no FUSE mount at {}",
            mountpoint.display()
        ),
        "fanotify" => {
            let root = flag(&dcmd, "--root");
            assert!(
                mount_for(&mounts_of(snap), root, "snapshotter").path == root,
                "the snapshotter does not see dedupd's root {root}"
            );
        }
        other => panic!("unknown data path {other:?}"),
    }
    assert!(dedupd.terminate().is_some_and(|s| s.success()));
}
