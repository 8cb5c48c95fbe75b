//! End to end with a real containerd 1.6 (Debian's), runc and a loopback registry: images are pulled and unpacked
//! through the snapshotter served as a proxy plugin, and containers run on its mounts.
//!
//! Needs root and `apt-get install -y containerd runc docker-registry skopeo umoci busybox-static debootstrap
//! erofs-utils`; fails (never skips) without them.  The test images are built once into
//! /var/cache/dedup-snapshotter-tests/oci by scripts/build-test-images.sh.
//!
//! The snapshotter defaults to this crate's `dedup-snapshotter serve`; `E2E_SNAPSHOTTER_CMD` replaces it, e.g.
//! `E2E_SNAPSHOTTER_CMD=reference` runs the same tests against containerd's own overlayfs snapshotter served as a
//! proxy (EROFS layout checks off).  `E2E_KEEP=1` keeps the environment directory of a failed run.
//!
//!     cargo test --release -p dedup-snapshotter --test e2e_containerd -- --nocapture

mod e2e;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::time::Instant;

use e2e::{host_sh, is_whiteout, Env};

const CACHE: &str = "/var/cache/dedup-snapshotter-tests";

#[test]
fn pull_run_layers_minbase_and_cleanup() {
    let _serial = e2e::serial();
    let env = Env::start();

    // busybox: one layer.
    env.pull("busybox");
    let out = env.run(
        "busybox",
        "bb1",
        &["sh", "-c", "echo hello; wc -l < /etc/passwd; readlink /bin/sh; id -u"],
    );
    assert_eq!(out, "hello\n2\nbusybox\n0\n");

    // layered: a whiteout, an opaque dir and an umoci-made whiteout across three layers.
    env.pull("layered");
    let script = "test -e /data/gone || echo gone:absent; test -e /data/gone2 || echo gone2:absent; \
                  echo dir: $(ls -A /data/dir); echo data: $(ls -A /data); cat /data/keep /data/new /data/dir/c";
    let out = env.run("layered", "lay1", &["sh", "-c", script]);
    assert_eq!(
        out,
        "gone:absent\ngone2:absent\ndir: c\ndata: dir keep new\nkeep v2\nnew\nc\n"
    );
    let chain: Vec<_> = env.snapshots().into_iter().filter(|s| s.kind == "Committed").collect();
    assert_eq!(
        chain.len(),
        4,
        "busybox (1 layer) + layered (3 layers; its base differs from busybox's): {chain:#?}"
    );

    // Writes in a running container land in its active snapshot's upper dir.
    env.run_detached(
        "layered",
        "writer",
        &[
            "sh",
            "-c",
            "echo written > /data/written; rm /data/keep; mkdir /data/newdir; touch /ready; sleep 600",
        ],
    );
    let upper = env.upperdir("writer");
    env.wait_until("the writer's marker in its upper dir", 20, || {
        upper.join("ready").exists()
    });
    assert_eq!(fs::read_to_string(upper.join("data/written")).unwrap(), "written\n");
    assert!(
        is_whiteout(&upper.join("data/keep")),
        "rm /data/keep did not leave a whiteout in {}",
        upper.display()
    );
    assert!(upper.join("data/newdir").is_dir());
    let out = env.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "x1",
        "writer",
        "sh",
        "-c",
        "cat /data/written; ls /data",
    ]);
    assert_eq!(out, "written\ndir\nnew\nnewdir\nwritten\n");
    let info = env.snapshot_info("writer");
    assert_eq!(info["Kind"], "Active", "{info}");

    // minbase: a real Debian userland in one layer.
    env.pull("minbase");
    let tar = format!("{CACHE}/debian-minbase.tar");
    let want_count = host_sh(&format!("tar -tf {tar} | grep -cE '^\\./usr/bin/[^/]+/?$'"));
    let want_version = host_sh(&format!("tar -xOf {tar} ./etc/debian_version"));
    let out = env.run(
        "minbase",
        "mb1",
        &["/bin/sh", "-c", "ls /usr/bin | wc -l; cat /etc/debian_version"],
    );
    assert_eq!(out, format!("{want_count}{want_version}"));
    let t = Instant::now();
    let out = env.run(
        "minbase",
        "mb2",
        &[
            "/bin/sh",
            "-c",
            "find / -xdev -type f -exec cat {} + >/dev/null && echo read-all",
        ],
    );
    assert_eq!(out, "read-all\n");
    eprintln!("e2e: read every minbase file in {:.2}s", t.elapsed().as_secs_f64());
    compare_minbase_tree(&env, &tar);

    env.check_layout();

    env.remove_container("writer");
    env.remove_everything();
    env.stop();
}

/// The tree a container sees equals what GNU tar extracts from the same layer: types, modes, owners, sizes (not of
/// directories: that is the filesystem's business), link targets, mtimes and file contents of /usr, /etc and /var.
fn compare_minbase_tree(env: &Env, tar: &str) {
    let t = Instant::now();
    let list = "cd / && { find usr etc var bin sbin lib lib64 -xdev ! -type d -printf '%p %y %m %U:%G %s %T@ %l\\n'; \
                find usr etc var -xdev -type d -printf '%p %y %m %U:%G %T@\\n'; } | sort; \
                find usr etc var -xdev -type f -print0 | sort -z | xargs -0 sha256sum | sed 's/^\\([^ ]*\\)  \\(.*\\)/\\2 \\1/'";
    let inside = env.run("minbase", "mb3", &["/bin/sh", "-c", list]);
    let reference = env.dir.join("minbase-ref");
    fs::create_dir(&reference).unwrap();
    let host = host_sh(&format!(
        "tar --numeric-owner --xattrs --xattrs-include='*' -C {d} -xf {tar} && cd {d} && {}",
        &list["cd / && ".len()..],
        d = reference.display()
    ));
    fs::remove_dir_all(&reference).unwrap();
    if inside != host {
        // Pair the differing lines up by path (the first word).
        let index = |s: &str| -> BTreeMap<String, Vec<String>> {
            let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for l in s.lines() {
                m.entry(l.split(' ').next().unwrap_or("").to_string())
                    .or_default()
                    .push(l.to_string());
            }
            m
        };
        let (a, b) = (index(&inside), index(&host));
        let paths: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let diffs: Vec<String> = paths
            .into_iter()
            .filter(|p| a.get(*p) != b.get(*p))
            .map(|p| format!("{p}:\n  container: {:?}\n  tar -x:    {:?}", a.get(p), b.get(p)))
            .collect();
        panic!(
            "the minbase tree in the container differs from `tar -x` for {} paths; the first 25:\n{}",
            diffs.len(),
            diffs.iter().take(25).cloned().collect::<Vec<_>>().join("\n")
        );
    }
    eprintln!(
        "e2e: minbase tree ({} lines) equals tar -x in {:.2}s",
        host.lines().count(),
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn daemon_restart_keeps_running_containers() {
    let _serial = e2e::serial();
    let mut env = Env::start();

    env.pull("busybox");
    env.run_detached(
        "busybox",
        "sleeper",
        &["sh", "-c", "echo before > /tmp/before; sleep 600"],
    );
    let before = env.snapshots();
    assert_eq!(before.iter().filter(|s| s.kind == "Active").count(), 1, "{before:#?}");
    let upper = env.upperdir("sleeper");

    env.kill9_snapshotter();
    assert_eq!(
        env.task_status("sleeper").as_deref(),
        Some("RUNNING"),
        "the container died with the snapshotter"
    );
    env.restart_snapshotter();

    assert_eq!(env.task_status("sleeper").as_deref(), Some("RUNNING"));
    let out = env.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "x1",
        "sleeper",
        "sh",
        "-c",
        "cat /tmp/before; echo after > /tmp/after; wc -l < /etc/passwd",
    ]);
    assert_eq!(out, "before\n2\n");
    assert_eq!(fs::read_to_string(upper.join("tmp/after")).unwrap(), "after\n");
    assert_eq!(env.snapshots(), before, "the snapshot list changed across the restart");
    assert_eq!(
        env.upperdir("sleeper"),
        upper,
        "the active snapshot's upper dir moved across the restart"
    );
    env.check_layout();

    // New work after the restart: a pull and a run.
    env.pull("layered");
    let out = env.run(
        "layered",
        "lay1",
        &["sh", "-c", "echo dir: $(ls -A /data/dir); cat /data/keep"],
    );
    assert_eq!(out, "dir: c\nkeep v2\n");
    env.check_layout();

    // A second kill with nothing running, then a restart and the same checks on an idle daemon.
    env.remove_container("sleeper");
    env.check_layout();
    env.kill9_snapshotter();
    env.restart_snapshotter();
    let out = env.run("busybox", "bb2", &["sh", "-c", "echo ok"]);
    assert_eq!(out, "ok\n");
    env.check_layout();

    env.remove_everything();
    env.stop();
}
