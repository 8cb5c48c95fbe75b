//! The daemons as an operator meets them: `--version` names the build, a bad config
//! file fails the start with the key and the reason, readiness reaches systemd
//! (Type=notify) only once the socket answers, and the socket carries the gRPC
//! health service.
//!
//! Readiness is checked against the sd_notify protocol itself, not a running
//! systemd (the tests do not assume it is PID 1): the test binds the datagram
//! socket named by `NOTIFY_SOCKET`, as systemd does for a `Type=notify` unit, with
//! `SO_PASSCRED`, and each daemon (`dedup-snapshotter serve` and `dedupd`, the two
//! units' `ExecStart`) must send `READY=1` from its own process (the units say
//! `NotifyAccess=main`) once its socket accepts connections (and, for dedupd, its
//! FUSE file system is mounted). The units themselves are checked with
//! `systemd-analyze verify`, in a root holding the binaries where `ExecStart`
//! names them.
//!
//! Needs root (the store's directories and mounts are root's).

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use test_support::{is_mounted, workspace_bin, ChildGuard, TestDir};

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

/// The notification socket a service manager listens on: a datagram socket with
/// `SO_PASSCRED`, so each message carries the sender's pid (systemd's check for
/// `NotifyAccess=main`).
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> NotifySocket {
        let sock = UnixDatagram::bind(&path).unwrap();
        let on: libc::c_int = 1;
        // SAFETY: a valid socket fd and a c_int option of the right size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PASSCRED,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_PASSCRED: {}", std::io::Error::last_os_error());
        NotifySocket { sock, path }
    }

    /// The next message and its sender's pid; panics after `timeout`.
    fn recv(&self, timeout: Duration) -> (String, libc::pid_t) {
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
        assert!(n > 0, "no notification on {} within {timeout:?}", self.path.display());
        let mut buf = [0u8; 4096];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // u64 elements: cmsghdr needs 8-byte alignment.
        let mut cmsg = [0u64; 16];
        // SAFETY: msghdr is plain data; every pointer set below outlives the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg);
        // SAFETY: msg describes valid buffers.
        let len = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, 0) };
        assert!(len >= 0, "recvmsg: {}", std::io::Error::last_os_error());
        let mut pid = None;
        // SAFETY: walking the control buffer the kernel filled, with the libc macros.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_CREDENTIALS {
                    let cred: libc::ucred = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    pid = Some(cred.pid);
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let text = String::from_utf8_lossy(&buf[..len as usize]).into_owned();
        (text, pid.expect("SO_PASSCRED: a message without credentials"))
    }

    /// Waits for `READY=1` (other messages, e.g. STATUS=, may come first); returns the sender's pid.
    fn wait_ready(&self, timeout: Duration) -> libc::pid_t {
        let start = Instant::now();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            assert!(!left.is_zero(), "no READY=1 within {timeout:?}");
            let (msg, pid) = self.recv(left);
            if msg.lines().any(|l| l == "READY=1") {
                return pid;
            }
        }
    }
}

#[test]
fn readiness_is_notified_after_the_socket_answers_and_health_serves() {
    let dir = TestDir::new("surface.");
    let notify = NotifySocket::bind(dir.join("notify.sock"));
    let sock = dir.join("s.sock");
    let child = bin()
        .args(["serve", "--differs", "none", "--root"])
        .arg(dir.join("root"))
        .arg("--address")
        .arg(&sock)
        .env("NOTIFY_SOCKET", &notify.path)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = ChildGuard::new(child);
    let started = Instant::now();
    let sender = notify.wait_ready(Duration::from_secs(30));
    // Ready means reachable: the socket accepts connections as the message arrives.
    UnixStream::connect(&sock).expect("the socket answers once READY=1 was sent");
    assert_eq!(
        Some(sender as u32),
        daemon.id(),
        "READY=1 must come from the main process (NotifyAccess=main)"
    );
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

/// On each data path: READY=1 comes from the main process once the control socket answers and the data path is
/// up (the FUSE mount; or the fanotify group's holder, which a clean stop with nothing marked releases).
#[test]
fn dedupd_notifies_readiness_once_its_socket_and_data_path_are_up() {
    for data_path in ["fuse", "fanotify"] {
        let dir = TestDir::new("surface.");
        let notify = NotifySocket::bind(dir.join("notify.sock"));
        let sock = dir.join("d.sock");
        let mountpoint = dir.join("blobs");
        std::fs::create_dir(&mountpoint).unwrap();
        let child = Command::new(workspace_bin("dedupd"))
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--mountpoint")
            .arg(&mountpoint)
            .arg("--socket")
            .arg(&sock)
            .args(["--data-path", data_path])
            .env("NOTIFY_SOCKET", &notify.path)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut daemon = ChildGuard::new(child);
        let sender = notify.wait_ready(Duration::from_secs(30));
        UnixStream::connect(&sock).expect("the control socket answers once READY=1 was sent");
        let ping = fetch_api::Client::new(&sock).ping().unwrap();
        assert_eq!(ping.data_path, data_path);
        let holder = dir.join("root/fanotify-group.sock");
        match data_path {
            "fuse" => assert!(
                is_mounted(&mountpoint),
                "the FUSE file system is mounted once READY=1 was sent"
            ),
            _ => assert!(
                UnixStream::connect(&holder).is_ok(),
                "the fanotify group's holder answers once READY=1 was sent"
            ),
        }
        assert_eq!(
            Some(sender as u32),
            daemon.id(),
            "READY=1 must come from the main process (NotifyAccess=main)"
        );
        assert!(
            daemon.terminate().is_some_and(|s| s.success()),
            "SIGTERM stops dedupd cleanly"
        );
        assert!(!is_mounted(&mountpoint), "no mount is left on stop");
        assert!(!sock.exists(), "the control socket is removed on stop");
        if data_path == "fanotify" {
            // Nothing was marked: the group is released and its holder goes.
            let t = Instant::now();
            while holder.exists() {
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "the holder outlived a stop with nothing marked"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The repository's contrib/ directory.
fn contrib() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib")
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let analyze = Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output()
        .unwrap();
    assert!(
        analyze.status.success(),
        "systemd-analyze is missing (apt-get install -y systemd): the units cannot be verified"
    );
    // A root with the host's own units (the targets ours order against) and our binaries where ExecStart
    // names them: `verify` checks that the command exists and is executable.
    let root = TestDir::new("units.");
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    let out = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(root.join("usr/lib/systemd"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "copying /usr/lib/systemd/system: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let etc = root.join("etc/systemd/system");
    std::fs::create_dir_all(&etc).unwrap();
    let mut units = Vec::new();
    for unit in ["dedup-snapshotter.service", "dedupd.service"] {
        let text = std::fs::read_to_string(contrib().join(unit)).unwrap();
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{unit} has no ExecStart"));
        let program = Path::new(exec.split_whitespace().next().unwrap());
        assert!(program.is_absolute(), "{unit}: ExecStart needs an absolute path");
        let built = match program.file_name().and_then(|n| n.to_str()) {
            Some("dedup-snapshotter") => PathBuf::from(env!("CARGO_BIN_EXE_dedup-snapshotter")),
            Some("dedupd") => workspace_bin("dedupd"),
            other => panic!("{unit} runs {other:?}, not one of ours"),
        };
        let dest = root.join(program.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        // A hard link when the target dir is on the same file system: no 100 MB copy.
        if std::fs::hard_link(&built, &dest).is_err() {
            std::fs::copy(&built, &dest).unwrap();
        }
        std::fs::copy(contrib().join(unit), etc.join(unit)).unwrap();
        units.push(unit);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .args(&units)
        .output()
        .unwrap();
    // Only what concerns our units counts: the host's own units may draw warnings of their own.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("dedup")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify {units:?}: {}\n{stderr}",
        out.status
    );
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
