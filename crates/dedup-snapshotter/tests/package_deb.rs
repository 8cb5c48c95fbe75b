//! The Debian package (`scripts/package.sh`) installs and runs on a fresh Debian bookworm.
//!
//! The package is built from this run's release binaries (`--no-build`: scripts/test.sh has just built the
//! workspace) into a temporary directory. The fresh system is the debootstrap bookworm minbase rootfs the other
//! tests use (tests/fixtures/debian-minbase.sh, cached in `${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests}`),
//! unpacked into a temporary directory and entered with chroot(8): `dpkg -i` must resolve every dependency from
//! what minbase has, both binaries must run there (`--version`), the config must be registered as a conffile with
//! the checksum of contrib/config.toml, and `dpkg -r` / `dpkg -P` must remove what they should (the conffile
//! survives a remove, not a purge). The maintainer scripts must do nothing without systemd (no
//! `/run/systemd/system` in the chroot).
//!
//! Needs root (chroot, the rootfs's owners and device nodes).
//!
//!     cargo test --release -p dedup-snapshotter --test package_deb -- --nocapture

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use test_support::{workspace_bin, TestDir};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

fn describe(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd`, panics unless it succeeds, returns stdout.
fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{}", describe(what, &out));
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

fn chroot(root: &Path, args: &[&str]) -> String {
    run(
        &format!("chroot {} {}", root.display(), args.join(" ")),
        Command::new("chroot")
            .arg(root)
            .args(args)
            // The host's PATH may name directories the chroot does not have.
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn require_root_and_tools() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test unpacks a Debian rootfs and chroots into it: run it as root"
    );
    for tool in ["dpkg-deb", "dpkg-shlibdeps", "strip", "tar", "chroot", "md5sum", "gzip"] {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "missing {tool} (apt-get install -y dpkg-dev binutils tar coreutils gzip)"
        );
    }
}

fn md5(path: &Path) -> String {
    run("md5sum", Command::new("md5sum").arg(path))
        .split_whitespace()
        .next()
        .expect("md5sum output")
        .to_string()
}

#[test]
fn package_installs_and_runs_on_a_fresh_bookworm() {
    require_root_and_tools();
    let dir = TestDir::new("deb.");

    // The package, from the binaries this test run uses.
    let snapshotter = PathBuf::from(env!("CARGO_BIN_EXE_dedup-snapshotter"));
    let bin_dir = snapshotter.parent().unwrap();
    assert_eq!(
        workspace_bin("dedupd").parent(),
        Some(bin_dir),
        "dedupd and dedup-snapshotter are expected side by side"
    );
    let deb = run(
        "scripts/package.sh",
        Command::new(repo().join("scripts/package.sh"))
            .arg("--no-build")
            .arg("--bin-dir")
            .arg(bin_dir)
            .arg("--out")
            .arg(dir.join("out"))
            .stderr(Stdio::inherit()),
    );
    let deb = PathBuf::from(deb.trim());
    assert!(deb.is_file(), "package.sh printed {deb:?}, which is not a file");
    let version = env!("CARGO_PKG_VERSION");
    let field = |name: &str| {
        run(
            "dpkg-deb --field",
            Command::new("dpkg-deb").arg("--field").arg(&deb).arg(name),
        )
        .trim()
        .to_string()
    };
    assert_eq!(field("Package"), "dedup-snapshotter");
    assert_eq!(field("Version"), version);
    let depends = field("Depends");
    assert!(depends.contains("libc6 (>="), "Depends from dpkg-shlibdeps: {depends}");
    let listing = run(
        "dpkg-deb --contents",
        Command::new("dpkg-deb").arg("--contents").arg(&deb),
    );
    for path in [
        "./usr/bin/dedup-snapshotter",
        "./usr/bin/dedupd",
        "./lib/systemd/system/dedup-snapshotter.service",
        "./lib/systemd/system/dedupd.service",
        "./etc/dedup-snapshotter/config.toml",
        "./usr/share/doc/dedup-snapshotter/README.md",
        "./usr/share/doc/dedup-snapshotter/copyright",
        "./usr/share/doc/dedup-snapshotter/changelog.gz",
    ] {
        assert!(
            listing.lines().any(|l| l.split_whitespace().last() == Some(path)),
            "the package has no {path}:\n{listing}"
        );
    }
    assert!(
        listing.lines().all(|l| l.contains(" root/root ")),
        "every file belongs to root:\n{listing}"
    );

    // A fresh bookworm: the cached debootstrap minbase rootfs.
    let tgz = run(
        "tests/fixtures/debian-minbase.sh",
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debian-minbase.sh"))
            .stderr(Stdio::inherit()),
    );
    let tar = PathBuf::from(tgz.trim().strip_suffix(".gz").expect("the fixture prints a .tar.gz"));
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    run(
        "unpacking the minbase rootfs",
        Command::new("tar")
            .args(["--numeric-owner", "-xpf"])
            .arg(&tar)
            .arg("-C")
            .arg(&root),
    );
    assert!(
        !root.join("run/systemd/system").exists(),
        "the chroot must look like a system without systemd running"
    );
    let release = std::fs::read_to_string(root.join("etc/os-release")).unwrap();
    assert!(release.contains("VERSION_CODENAME=bookworm"), "{release}");
    std::fs::copy(&deb, root.join("tmp/pkg.deb")).unwrap();

    // Install, run, and ask dpkg what it registered.
    chroot(&root, &["dpkg", "-i", "/tmp/pkg.deb"]);
    let v = chroot(&root, &["/usr/bin/dedup-snapshotter", "--version"]);
    assert!(v.starts_with(&format!("dedup-snapshotter {version} ")), "{v}");
    let v = chroot(&root, &["/usr/bin/dedupd", "--version"]);
    assert_eq!(v.trim(), format!("dedupd {version}"));
    // The daemons are on PATH for the units' ExecStart and for an operator.
    chroot(
        &root,
        &["sh", "-c", "command -v dedup-snapshotter && command -v dedupd"],
    );
    let status = chroot(&root, &["dpkg-query", "-W", "-f=${Status}", "dedup-snapshotter"]);
    assert_eq!(status, "install ok installed");
    let conffiles = chroot(&root, &["dpkg-query", "-W", "-f=${Conffiles}", "dedup-snapshotter"]);
    let config = repo().join("contrib/config.toml");
    let want = format!("/etc/dedup-snapshotter/config.toml {}", md5(&config));
    assert_eq!(
        conffiles.trim(),
        want,
        "the config is the only conffile, with contrib/config.toml's checksum"
    );
    // Every installed file matches the package's md5sums.
    let verify = chroot(&root, &["dpkg", "--verify", "dedup-snapshotter"]);
    assert!(verify.trim().is_empty(), "dpkg --verify: {verify}");
    for (installed, source) in [
        (
            "lib/systemd/system/dedup-snapshotter.service",
            "contrib/dedup-snapshotter.service",
        ),
        ("lib/systemd/system/dedupd.service", "contrib/dedupd.service"),
        ("etc/dedup-snapshotter/config.toml", "contrib/config.toml"),
    ] {
        assert_eq!(
            std::fs::read(root.join(installed)).unwrap(),
            std::fs::read(repo().join(source)).unwrap(),
            "/{installed} is not {source}"
        );
    }

    // Remove keeps the edited conffile, purge takes it.
    std::fs::write(
        root.join("etc/dedup-snapshotter/config.toml"),
        "version = 1\ndedup = true\n",
    )
    .unwrap();
    chroot(&root, &["dpkg", "-r", "dedup-snapshotter"]);
    assert!(!root.join("usr/bin/dedup-snapshotter").exists());
    assert!(!root.join("usr/bin/dedupd").exists());
    assert!(!root.join("lib/systemd/system/dedupd.service").exists());
    assert!(
        root.join("etc/dedup-snapshotter/config.toml").exists(),
        "remove keeps the conffile"
    );
    chroot(&root, &["dpkg", "-P", "dedup-snapshotter"]);
    assert!(
        !root.join("etc/dedup-snapshotter/config.toml").exists(),
        "purge removes the conffile"
    );
    let out = Command::new("chroot")
        .arg(&root)
        .args(["dpkg-query", "-W", "-f=${Status}", "dedup-snapshotter"])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("installed"),
        "{}",
        describe("dpkg-query after purge", &out)
    );
}
