//! Merged metadata through containerd 2.1 (`serve --merge-layers`): a 300-layer image, too deep for one
//! overlayfs option page of per-layer lowers, runs with one merged EROFS lower; its VMDK, asked of the running
//! daemon, mounts (through `qemu-img convert`) as exactly the root containerd's own overlayfs snapshotter gives
//! the same image.
//!
//! Needs root and what scripts/test.sh installs (containerd 2.1 via scripts/lib/containerd-versions.sh,
//! docker-registry, skopeo, qemu-utils).

mod common;
mod e2e;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::{assert_trees_eq, qemu_img_info, qemu_img_raw, snapshot_tree, strip_overlay_xattrs, CompareOpts};
use e2e::{describe, mountinfo, Env};

use sha2::{Digest, Sha256};

const LAYERS: usize = 300;

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{}", describe(&format!("{cmd:?}"), &out));
}

fn put_blob(layout: &Path, data: &[u8]) -> (String, usize) {
    let hex = hex::encode(Sha256::digest(data));
    fs::write(layout.join("blobs/sha256").join(&hex), data).unwrap();
    (format!("sha256:{hex}"), data.len())
}

/// Builds `deep`: busybox, then 299 uncompressed layers. Layer i adds /layers/<i> and rewrites /data/top;
/// every tenth deletes the file the layer below added (a whiteout), every fiftieth makes /data/dir opaque and
/// refills it. Returns what `/layers` must hold and `/data/top`'s content.
fn build(env: &Env, work: &Path) -> (usize, String) {
    let cache = std::env::var("E2E_IMAGES").unwrap_or_else(|_| "/var/cache/dedup-snapshotter-tests/oci".into());
    let layout = work.join("deep");
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{cache}/busybox"))
        .arg(&layout));
    let read_json = |digest: &str| -> serde_json::Value {
        let hex = digest.strip_prefix("sha256:").unwrap();
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(hex)).unwrap()).unwrap()
    };
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mut manifest = read_json(index["manifests"][0]["digest"].as_str().unwrap());
    let mut config = read_json(manifest["config"]["digest"].as_str().unwrap());
    let mut present = std::collections::BTreeSet::new();
    let mut top = String::new();
    for i in 1..LAYERS {
        let dir = work.join(format!("l{i}"));
        fs::create_dir_all(dir.join("layers")).unwrap();
        fs::create_dir_all(dir.join("data")).unwrap();
        fs::write(dir.join(format!("layers/{i}")), format!("layer {i}\n")).unwrap();
        present.insert(i);
        top = format!("top from layer {i}\n");
        fs::write(dir.join("data/top"), &top).unwrap();
        if i % 10 == 0 {
            fs::write(dir.join(format!("layers/.wh.{}", i - 1)), "").unwrap();
            present.remove(&(i - 1));
        }
        if i % 50 == 0 || i == 1 {
            fs::create_dir_all(dir.join("data/dir")).unwrap();
            fs::write(dir.join("data/dir/.wh..wh..opq"), "").unwrap();
            fs::write(dir.join(format!("data/dir/from-{i}")), "x").unwrap();
        }
        let tar = work.join(format!("l{i}.tar"));
        run(Command::new("tar")
            .args([
                "--numeric-owner",
                "--owner=0",
                "--group=0",
                "--sort=name",
                "--mtime=@0",
                "-C",
            ])
            .arg(&dir)
            .arg("-cf")
            .arg(&tar)
            .args(["layers", "data"]));
        let (digest, size) = put_blob(&layout, &fs::read(&tar).unwrap());
        manifest["layers"].as_array_mut().unwrap().push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest,
            "size": size,
        }));
        config["rootfs"]["diff_ids"]
            .as_array_mut()
            .unwrap()
            .push(digest.clone().into());
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_file(&tar).unwrap();
    }
    config.as_object_mut().unwrap().remove("history");
    let (cd, cs) = put_blob(&layout, &serde_json::to_vec(&config).unwrap());
    manifest["config"]["digest"] = cd.into();
    manifest["config"]["size"] = cs.into();
    let (md, ms) = put_blob(&layout, &serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md,
            "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--insecure-policy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!("docker://{}", env.image("deep"))));
    fs::remove_dir_all(&layout).unwrap();
    (present.len(), top)
}

/// The committed chain of `image` as unpacked for `snapshotter`: its top snapshot's name.
fn chain_top(env: &Env, snapshotter: &str, id: &str) -> String {
    let info: serde_json::Value =
        serde_json::from_str(&env.ctr(&["container", "info", id])).expect("container info is JSON");
    let key = info["SnapshotKey"].as_str().expect("SnapshotKey").to_string();
    let snap: serde_json::Value =
        serde_json::from_str(&env.ctr(&["snapshot", "--snapshotter", snapshotter, "info", &key])).unwrap();
    snap["Parent"].as_str().expect("Parent").to_string()
}

#[test]
fn three_hundred_layers_run_over_merged_metadata() {
    let _serial = e2e::serial();
    let cmd = format!(
        "{} serve --root {{root}} --address {{socket}} --merge-layers",
        env!("CARGO_BIN_EXE_dedup-snapshotter")
    );
    let mut env = Env::start_with_version(&cmd, Some("2.1"));
    let work = env.dir.join("deep-build");
    fs::create_dir(&work).unwrap();
    let t = std::time::Instant::now();
    let (files, top) = build(&env, &work);
    eprintln!(
        "e2e-merged: built and pushed {LAYERS} layers in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    env.pull("deep");

    // A container over the whole chain: one merged lower, the stack's tree.
    let image = env.image("deep");
    let out = env.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "dedup",
        &image,
        "deep1",
        "sh",
        "-c",
        "sleep 600",
    ]);
    let _ = out;
    env.wait_until("task deep1 running", 60, || {
        env.task_status("deep1").as_deref() == Some("RUNNING")
    });
    let info: serde_json::Value =
        serde_json::from_str(&env.ctr(&["container", "info", "deep1"])).expect("container info is JSON");
    let key = info["SnapshotKey"].as_str().expect("SnapshotKey").to_string();
    let mounts = env.snapshot_mounts(&key);
    let lowers: Vec<String> = mounts
        .iter()
        .flat_map(|(_, o)| o.iter())
        .find_map(|o| o.strip_prefix("lowerdir="))
        .expect("lowerdir")
        .split(':')
        .map(String::from)
        .collect();
    assert_eq!(lowers.len(), 1, "one merged lower: {mounts:?}");
    assert!(
        lowers[0].starts_with(env.root.join("mm").to_str().unwrap()),
        "the lower is a merged image: {lowers:?}"
    );
    let mm = mountinfo()
        .into_iter()
        .find(|m| m.point == lowers[0])
        .expect("the merged image's mount");
    assert_eq!(mm.fstype, "erofs");
    let log = env.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "ls",
        "deep1",
        "sh",
        "-c",
        "ls /layers | wc -l; cat /data/top; ls /data/dir",
    ]);
    assert_eq!(
        log,
        format!("{files}\n{top}from-250\n"),
        "the stack as the container sees it"
    );

    // The VMDK of the chain, asked of the running daemon by containerd's name for the snapshot.
    let chain = chain_top(&env, "dedup", "deep1");
    let vmdk = work.join("deep.vmdk");
    let out = Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
        .args(["vmdk", "--root"])
        .arg(&env.root)
        .arg(&chain)
        .arg(&vmdk)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe("dedup-snapshotter vmdk", &out));
    qemu_img_info(&vmdk);
    let raw = work.join("deep.raw");
    qemu_img_raw(&vmdk, &raw);
    let raw_mount = common::Mount::erofs(&raw);
    let got = snapshot_tree(raw_mount.path());

    // containerd's own overlayfs snapshotter, same image: the reference root.
    env.ctr(&["image", "pull", "--plain-http", "--snapshotter", "overlayfs", &image]);
    env.ctr(&["container", "create", "--snapshotter", "overlayfs", &image, "deep-ref"]);
    // The container's own snapshot (kept by the container from containerd's GC): its lowers are the image's root.
    let info: serde_json::Value =
        serde_json::from_str(&env.ctr(&["container", "info", "deep-ref"])).expect("container info is JSON");
    let ref_key = info["SnapshotKey"].as_str().expect("SnapshotKey").to_string();
    let view = work.join("ref-view");
    fs::create_dir(&view).unwrap();
    let mounts = env.ctr(&[
        "snapshot",
        "--snapshotter",
        "overlayfs",
        "mounts",
        view.to_str().unwrap(),
        &ref_key,
    ]);
    // 300 absolute lowers overflow mount(2)'s option page: as containerd itself does, the mount goes relative to
    // their common parent.
    let lowerdir = mounts
        .split_whitespace()
        .flat_map(|w| w.split(','))
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap_or_else(|| panic!("no lowerdir in {mounts}"));
    let parent = env
        .dir
        .join("containerd/root/io.containerd.snapshotter.v1.overlayfs/snapshots");
    let prefix = format!("{}/", parent.display());
    let relative: Vec<&str> = lowerdir
        .split(':')
        .map(|l| {
            l.strip_prefix(&prefix)
                .unwrap_or_else(|| panic!("{l} is not under {prefix}"))
        })
        .collect();
    e2e::host_sh(&format!(
        "cd {} && mount -t overlay overlay -o ro,index=off,lowerdir={} {}",
        parent.display(),
        relative.join(":"),
        view.display()
    ));
    let mut want = snapshot_tree(&view);
    strip_overlay_xattrs(&mut want);
    e2e::host_sh(&format!("umount {}", view.display()));
    let mut got = got;
    strip_overlay_xattrs(&mut got);
    assert_trees_eq(
        "the VMDK's tree (qemu-img convert -O raw, mounted with no devices) against containerd's overlayfs",
        &want,
        &got,
        // A layer tar without a root entry leaves the root's mtime to whoever makes the directory: containerd
        // stamps its own, EROFS layers the build time.
        &CompareOpts::ignoring_mtime_of(["/"]),
    );
    drop(raw_mount);
    fs::remove_file(&raw).unwrap();

    // kill -9 of the snapshotter and a restart: the running container keeps its root, the complete merged
    // image is reused as it is (not rebuilt), and a second container over the chain shares it.
    let merged_dir = fs::read_dir(env.root.join("merged"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect::<Vec<_>>();
    assert_eq!(merged_dir.len(), 1, "one merged image: {merged_dir:?}");
    let image_file = merged_dir[0].join("fsmeta.erofs");
    let before = fs::metadata(&image_file).unwrap();
    env.kill9_snapshotter();
    env.restart_snapshotter();
    let after = fs::metadata(&image_file).unwrap();
    assert_eq!(
        (before.ino(), before.mtime(), before.mtime_nsec()),
        (after.ino(), after.mtime(), after.mtime_nsec()),
        "the merged image was rewritten at restart"
    );
    let again = env.ctr(&["task", "exec", "--exec-id", "ls2", "deep1", "cat", "/data/top"]);
    assert_eq!(again, top, "the running container after the restart");
    let second = env.run("deep", "deep2", &["sh", "-c", "ls /layers | wc -l"]);
    assert_eq!(second, format!("{files}\n"), "a second container after the restart");
    assert_eq!(fs::read_dir(env.root.join("merged")).unwrap().count(), 1);

    // The last container gone, its merged image goes too.
    env.remove_container("deep1");
    env.ctr(&["container", "rm", "deep-ref"]);
    env.wait_until("merged/ emptied", 30, || {
        fs::read_dir(env.root.join("merged"))
            .map(|d| d.count() == 0)
            .unwrap_or(false)
    });
    env.stop();
}
