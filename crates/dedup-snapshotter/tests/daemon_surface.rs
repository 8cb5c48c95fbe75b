//! The daemon as an operator meets it: `--version` names the build, a bad config
//! file fails the start with the key and the reason, readiness reaches systemd
//! (Type=notify) only once the socket answers, and the socket carries the gRPC
//! health service.
//!
//! Needs root (the store's directories and mounts are root's).

use std::io::ErrorKind;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use test_support::{ChildGuard, TestDir};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
}

#[test]
fn version_names_the_git_revision() {
    let out = bin().arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with(&format!("dedup-snapshotter {} (", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string());
    match head {
        // Built from a checkout: the revision is the one checked out (or it was
        // built before the last commit, and cargo rebuilds when HEAD moves).
        Some(rev) => assert!(text.contains(&format!("git {rev}")), "{text} does not name {rev}"),
        None => assert!(text.contains("unknown revision"), "{text}"),
    }
}

/// Runs `serve --config FILE` with `config`; it must fail at once; returns stderr.
fn serve_fails_with(config: &str) -> String {
    let dir = TestDir::new("surface.");
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, config).unwrap();
    let out = bin()
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--root"])
        .arg(dir.join("root"))
        .args(["--address"])
        .arg(dir.join("s.sock"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve started with {config:?}");
    assert!(!dir.join("s.sock").exists(), "a socket was bound with {config:?}");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn bad_config_files_fail_the_start_with_key_and_reason() {
    let err = serve_fails_with("version = 1\nlog_levle = \"debug\"\n");
    assert!(err.contains("log_levle") && err.contains("unknown field"), "{err}");
    let err = serve_fails_with("version = 1\ndedup = \"yes\"\n");
    assert!(err.contains("dedup") && err.contains("invalid type"), "{err}");
    let err = serve_fails_with("version = 2\n");
    assert!(err.contains("config version 2 is not supported"), "{err}");
}

#[test]
fn readiness_is_notified_after_the_socket_answers_and_health_serves() {
    let dir = TestDir::new("surface.");
    let notify = dir.join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let sock = dir.join("s.sock");
    let child = bin()
        .args(["serve", "--differs", "none", "--root"])
        .arg(dir.join("root"))
        .arg("--address")
        .arg(&sock)
        .env("NOTIFY_SOCKET", &notify)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = ChildGuard::new(child);
    let started = Instant::now();
    let mut buf = [0u8; 512];
    let n = match listener.recv(&mut buf) {
        Ok(n) => n,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("no readiness notification within 30 s")
        }
        Err(e) => panic!("notify socket: {e}"),
    };
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "notification {msg:?}");
    // Ready means reachable: the socket accepts connections as the message arrives.
    UnixStream::connect(&sock).expect("the socket answers once READY=1 was sent");
    eprintln!("ready after {:.2}s", started.elapsed().as_secs_f64());

    assert_eq!(
        health(&sock),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    assert!(
        daemon.terminate().is_some_and(|s| s.success()),
        "SIGTERM stops the daemon cleanly"
    );
    assert!(!sock.exists(), "the socket is removed on stop");
}

fn health(sock: &Path) -> tonic_health::pb::health_check_response::ServingStatus {
    use tonic_health::pb::health_client::HealthClient;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = containerd_client::connect(sock).await.expect("connect");
        let resp = HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await
            .expect("grpc.health.v1.Health/Check")
            .into_inner();
        resp.status()
    })
}
