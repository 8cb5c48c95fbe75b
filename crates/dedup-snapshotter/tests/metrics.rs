//! `serve --metrics-address`: the daemon's Prometheus metrics, scraped over HTTP while it does real
//! work — a pull through containerd 1.6 (Prepare, containerd's walking differ, Commit converting
//! the unpacked layer with dedup on), then straight gRPC calls: Prepare (labelled as a pull's
//! unpacker labels it), Mounts, an Apply through
//! the Diff service from containerd's content store, a Commit with nothing to convert, a Stat of a
//! missing key. Every scrape is parsed as the exposition format; each counter must move with its
//! work, and only with it.
//!
//! Needs root and the e2e tools (see tests/e2e/mod.rs).
//!
//!     cargo test --release -p dedup-snapshotter --test metrics -- --nocapture

mod common;
mod e2e;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use containerd_client::services::v1 as pb;
use containerd_client::services::v1::snapshots as spb;
use containerd_client::types::Descriptor as PbDescriptor;
use e2e::{describe, Env};
use test_support::prometheus::Exposition;
use test_support::{ChildGuard, TestDir};
use tonic::Request;

const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET http://addr/path`: status line and body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap_or("").to_string(), body.to_string())
}

fn scrape(addr: &str) -> Exposition {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    Exposition::parse(&body).unwrap_or_else(|e| panic!("/metrics does not parse ({e}):\n{body}"))
}

/// `dedup_snapshotter_requests_total` of one method and code.
fn requests(e: &Exposition, service: &str, method: &str, code: &str) -> f64 {
    e.sum(
        "dedup_snapshotter_requests_total",
        &[("service", service), ("method", method), ("code", code)],
    )
}

fn gauge(e: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    e.get(name, labels)
        .unwrap_or_else(|| panic!("no {name}{labels:?} in the scrape: {:?}", e.samples))
}

/// A small gzip'd layer tar with a few files, as a registry would serve it.
fn make_layer(dir: &Path) -> std::path::PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/metrics-test"), b"hello metrics\n").unwrap();
    std::fs::write(tree.join("data.bin"), test_support::pseudo_random(300_000, 7)).unwrap();
    let out = dir.join("layer.tar.gz");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .args(["--owner=0", "--group=0", "-czf"])
        .arg(&out)
        .arg(".")
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", describe("tar -czf", &st));
    out
}

/// Puts `file` into containerd's content store (kept by a gc.root label); returns its descriptor.
fn ingest(env: &Env, file: &Path) -> PbDescriptor {
    let digest = common::sha256_file(file);
    let size = std::fs::metadata(file).unwrap().len();
    let out = Command::new(&env.ctr_bin)
        .args(["-a", &env.ctrd_sock, "-n", &env.ns, "content", "ingest"])
        .args([
            "--expected-digest",
            &digest,
            "--expected-size",
            &size.to_string(),
            "metrics-layer",
        ])
        .stdin(std::fs::File::open(file).unwrap())
        .output()
        .expect("spawn ctr");
    assert!(out.status.success(), "{}", describe("ctr content ingest", &out));
    env.ctr(&["content", "label", &digest, "containerd.io/gc.root=e2e"]);
    PbDescriptor {
        media_type: GZIP_LAYER.into(),
        digest,
        size: size as i64,
        annotations: Default::default(),
    }
}

/// A request carrying the environment's namespace, as containerd sends it.
fn req<T>(env: &Env, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("containerd-namespace", env.ns.parse().unwrap());
    r
}

#[test]
fn serve_metrics_move_with_the_work() {
    let _serial = e2e::serial();
    let work = TestDir::new("metrics.");
    let addr = format!("127.0.0.1:{}", free_port());
    let env = Env::start_with(&format!(
        "{} serve --root {{root}} --address {{socket}} --containerd {{root}}/../containerd.sock --dedup \
         --metrics-address {addr}",
        env!("CARGO_BIN_EXE_dedup-snapshotter")
    ));
    let socket = env.var("E2E_SNAPSHOTTER_SOCK");

    let (status, _) = http_get(&addr, "/nothing");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let before = scrape(&addr);
    assert_eq!(
        gauge(&before, "dedup_snapshotter_snapshots", &[("kind", "committed")]),
        0.0
    );
    assert_eq!(gauge(&before, "dedup_snapshotter_logical_bytes", &[]), 0.0);
    assert_eq!(
        before.sum("dedup_snapshotter_commit_conversion_seconds_count", &[]),
        0.0
    );
    assert_eq!(before.types["dedup_snapshotter_commit_conversion_seconds"], "histogram");

    // A pull through containerd 1.6: its walking differ unpacks into our snapshots, our Commit
    // converts them (with dedup: the chunks are counted as logical and stored bytes).
    env.pull("busybox");
    let pulled = scrape(&addr);
    let prepares = requests(&pulled, "snapshots", "Prepare", "OK");
    let commits = requests(&pulled, "snapshots", "Commit", "OK");
    assert!(prepares >= 1.0, "{:?}", pulled.samples);
    assert!(commits >= 1.0, "{:?}", pulled.samples);
    let conversions = pulled.sum("dedup_snapshotter_commit_conversion_seconds_count", &[]);
    assert_eq!(conversions, commits, "every Commit of the pull converted");
    assert!(pulled.sum("dedup_snapshotter_commit_conversion_seconds_sum", &[]) > 0.0);
    assert!(gauge(&pulled, "dedup_snapshotter_snapshots", &[("kind", "committed")]) >= 1.0);
    let logical = gauge(&pulled, "dedup_snapshotter_logical_bytes", &[]);
    let stored = gauge(&pulled, "dedup_snapshotter_stored_bytes", &[]);
    assert!(logical > 0.0 && stored > 0.0, "logical {logical}, stored {stored}");
    assert!(gauge(&pulled, "dedup_snapshotter_chunks", &[]) > 0.0);
    assert!(
        pulled.sum(
            "dedup_snapshotter_request_duration_seconds_count",
            &[("service", "snapshots"), ("method", "Commit")]
        ) >= commits
    );

    // Straight to the daemon: Prepare, Mounts, Apply of a blob from containerd's content store,
    // Commit (nothing to convert: the differ wrote the layer), Stat of a key that does not exist.
    let layer = ingest(&env, &make_layer(work.path()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = containerd_client::connect(&socket).await.expect("connect the daemon");
        let mut sn = spb::snapshots_client::SnapshotsClient::new(channel.clone());
        let mut diff = pb::diff_client::DiffClient::new(channel);
        let key = format!("{}/metrics/active", env.ns);
        let name = format!("{}/metrics/committed", env.ns);
        // As containerd's pull unpacker (CRI's) prepares a layer: naming the snapshot it becomes.
        sn.prepare(req(
            &env,
            spb::PrepareSnapshotRequest {
                snapshotter: "dedup".into(),
                key: key.clone(),
                labels: [("containerd.io/snapshot.ref".to_string(), name.clone())].into(),
                ..Default::default()
            },
        ))
        .await
        .expect("Prepare");
        let mounts = sn
            .mounts(req(
                &env,
                spb::MountsRequest {
                    snapshotter: "dedup".into(),
                    key: key.clone(),
                },
            ))
            .await
            .expect("Mounts")
            .into_inner()
            .mounts;
        diff.apply(req(
            &env,
            pb::ApplyRequest {
                diff: Some(layer.clone()),
                mounts,
                ..Default::default()
            },
        ))
        .await
        .expect("Apply");
        sn.commit(req(
            &env,
            spb::CommitSnapshotRequest {
                snapshotter: "dedup".into(),
                name,
                key: key.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("Commit");
        let missing = sn
            .stat(req(
                &env,
                spb::StatSnapshotRequest {
                    snapshotter: "dedup".into(),
                    key: "no-such-snapshot".into(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound);
    });

    let after = scrape(&addr);
    assert_eq!(requests(&after, "snapshots", "Prepare", "OK"), prepares + 1.0);
    assert_eq!(requests(&after, "snapshots", "Commit", "OK"), commits + 1.0);
    // `ctr image pull` on containerd 1.6 labels no layer; the labelled Prepare above is a pull's.
    let unpack = [("outcome", "unpack")];
    assert_eq!(
        after.sum("dedup_snapshotter_pull_prepare_seconds_count", &unpack),
        pulled.sum("dedup_snapshotter_pull_prepare_seconds_count", &unpack) + 1.0
    );
    assert!(requests(&after, "snapshots", "Mounts", "OK") > requests(&pulled, "snapshots", "Mounts", "OK"));
    assert_eq!(
        requests(&after, "diff", "Apply", "OK"),
        requests(&pulled, "diff", "Apply", "OK") + 1.0
    );
    assert_eq!(
        after.sum(
            "dedup_snapshotter_request_duration_seconds_count",
            &[("service", "diff"), ("method", "Apply")]
        ),
        pulled.sum(
            "dedup_snapshotter_request_duration_seconds_count",
            &[("service", "diff"), ("method", "Apply")]
        ) + 1.0
    );
    assert_eq!(
        gauge(&after, "dedup_snapshotter_applied_bytes_total", &[]),
        gauge(&pulled, "dedup_snapshotter_applied_bytes_total", &[]) + layer.size as f64
    );
    // Apply wrote the layer: that Commit converted nothing.
    assert_eq!(
        after.sum("dedup_snapshotter_commit_conversion_seconds_count", &[]),
        conversions
    );
    assert!(requests(&after, "snapshots", "Stat", "NotFound") >= 1.0);
    assert!(
        after.sum(
            "dedup_snapshotter_errors_total",
            &[("service", "snapshots"), ("method", "Stat"), ("kind", "not_found")]
        ) >= 1.0
    );
    assert_eq!(
        gauge(&after, "dedup_snapshotter_snapshots", &[("kind", "committed")]),
        gauge(&pulled, "dedup_snapshotter_snapshots", &[("kind", "committed")]) + 1.0
    );
    assert!(gauge(&after, "dedup_snapshotter_logical_bytes", &[]) >= logical + 300_000.0);
    drop(env);
}

/// `metrics_address` in the config file turns the endpoint on; an address that cannot be bound
/// fails the start before the gRPC socket exists.
#[test]
fn metrics_address_from_the_config_file() {
    let dir = TestDir::new("metrics-config.");
    let addr = format!("127.0.0.1:{}", free_port());
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, format!("version = 1\nmetrics_address = \"{addr}\"\n")).unwrap();
    let serve = |cfg: Option<&Path>, extra: &[&str], socket: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"));
        c.arg("serve");
        if let Some(cfg) = cfg {
            c.arg("--config").arg(cfg);
        }
        c.arg("--root")
            .arg(dir.join("root"))
            .arg("--address")
            .arg(dir.join(socket))
            .args(extra)
            .stdin(Stdio::null());
        c
    };
    let child = serve(Some(&cfg), &[], "s.sock")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = ChildGuard::new(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(&addr).is_err() || !dir.join("s.sock").exists() {
        assert!(Instant::now() < deadline, "no metrics on {addr} after 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let e = scrape(&addr);
    assert_eq!(e.types["dedup_snapshotter_snapshots"], "gauge");
    assert_eq!(gauge(&e, "dedup_snapshotter_snapshots", &[("kind", "committed")]), 0.0);
    let status = daemon.terminate().expect("the daemon ran");
    assert!(status.success(), "{status:?}");

    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let out = serve(None, &["--metrics-address", &taken_addr], "s2.sock")
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve started on a taken metrics port");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&taken_addr), "{stderr}");
    assert!(!dir.join("s2.sock").exists(), "the gRPC socket was bound");
}
