//! Dedup end to end: the daemon with `--dedup` behind containerd 1.6 and a local registry. Images that repeat each
//! other's files store them once, whether a layer was unpacked by containerd and converted at Commit (`ctr pull`)
//! or applied by our Diff service (containerd's own client unpack via diffclient); a layer keeps reading its shared
//! chunks after the image that first wrote them is removed; removing every image leaves no blob, index entry or
//! mount. Needs root and the e2e tools (see tests/e2e/mod.rs).

mod common;
mod e2e;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use e2e::*;

fn stats(env: &Env) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
        .args(["stats", "--json", "--root"])
        .arg(&env.root)
        .output()
        .expect("spawn stats");
    assert!(out.status.success(), "{}", describe("stats", &out));
    serde_json::from_slice(&out.stdout).expect("stats JSON")
}

fn blob_files(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(root.join("blobs"))
        .expect("read blobs/")
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn host_sha256(path: &str) -> String {
    let d = common::sha256_file(Path::new(path));
    d.strip_prefix("sha256:").unwrap_or(&d).to_string()
}

/// The (only) layer blob of a test image's OCI layout.
fn oci_layer_blob(name: &str) -> PathBuf {
    let dir =
        PathBuf::from(std::env::var("E2E_IMAGES").unwrap_or_else(|_| "/var/cache/dedup-snapshotter-tests/oci".into()))
            .join(name);
    let blob = |d: &str| {
        dir.join("blobs/sha256")
            .join(d.strip_prefix("sha256:").expect("sha256 digest"))
    };
    let json =
        |p: PathBuf| -> serde_json::Value { serde_json::from_slice(&fs::read(p).expect("read layout")).unwrap() };
    let index = json(dir.join("index.json"));
    let manifest = json(blob(index["manifests"][0]["digest"].as_str().unwrap()));
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "{name} has one layer");
    blob(layers[0]["digest"].as_str().unwrap())
}

/// The sha256 of a file inside a container of `image`.
fn sha_in(env: &Env, image: &str, id: &str, path: &str) -> String {
    let out = env.run(image, id, &["sha256sum", path]);
    out.split_whitespace().next().unwrap_or_default().to_string()
}

#[test]
fn images_share_chunks_and_leave_nothing_behind() {
    let _g = serial();
    // SAFETY (edition 2021: safe call): the e2e tests hold `e2e::serial()`, so no other test reads it meanwhile.
    std::env::set_var(
        "E2E_SNAPSHOTTER_CMD",
        format!(
            "{} serve --root {{root}} --address {{socket}} --containerd {{root}}/../containerd.sock --dedup",
            env!("CARGO_BIN_EXE_dedup-snapshotter")
        ),
    );
    let env = Env::start();
    let busybox_sha = {
        // The image's busybox is the host's busybox-static (build-test-images.sh copies it).
        let b = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("busybox on the host");
        host_sha256(b)
    };

    // 1. busybox through containerd's unpack + our Commit conversion.
    env.pull("busybox");
    let s1 = stats(&env);
    assert_eq!(s1["layers"], 1, "{s1}");
    assert_eq!(s1["blobs"], 1, "{s1}");

    // 2. busybox-plus repeats busybox's files in a layer of its own, plus 1 MiB twice.
    env.pull("busybox-plus");
    let s2 = stats(&env);
    assert_eq!(s2["layers"], 2, "{s2}");
    let chains = s2["chains"].as_array().expect("chains");
    assert_eq!(chains.len(), 2, "{s2}");
    for c in chains {
        assert!(
            c["shared_blob_bytes"].as_u64().unwrap() > 0,
            "every image shares busybox's blob: {s2}"
        );
    }
    // busybox-plus's own blob holds the extra data once (1 MiB), not busybox again nor the copy.
    let added = s2["blob_bytes"].as_u64().unwrap() - s1["blob_bytes"].as_u64().unwrap();
    assert!(
        (1 << 20..(1 << 20) + (64 << 10)).contains(&added),
        "busybox-plus added {added} blob bytes: {s1} -> {s2}"
    );
    let logical_plus = s2["logical_bytes"].as_u64().unwrap() - s1["logical_bytes"].as_u64().unwrap();
    assert!(logical_plus > added + (1 << 20), "{s2}");

    // 3. layered (busybox + /data, 3 layers) through our Diff service's Apply: its first layer repeats busybox too.
    let dc = Command::new("timeout")
        .args(["-k", "5", "300"])
        .arg(
            std::env::var("DIFFCLIENT")
                .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/harness/diffclient.sh").into()),
        )
        .args(["-address", &env.ctrd_sock, "-diff", &env.var("E2E_SNAPSHOTTER_SOCK")])
        .args([
            "-snapshotter",
            "dedup",
            "-namespace",
            &env.ns,
            "pull",
            &env.image("layered"),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("spawn diffclient");
    if !dc.status.success() {
        env.dump_logs();
    }
    assert!(dc.status.success(), "{}", describe("diffclient pull layered", &dc));
    let s3 = stats(&env);
    assert_eq!(s3["layers"], 5, "{s3}");
    let added = s3["blob_bytes"].as_u64().unwrap() - s2["blob_bytes"].as_u64().unwrap();
    assert!(
        added < 64 << 10,
        "layered's busybox came from the existing blob, added {added}: {s3}"
    );
    env.check_layout();

    // Containers read the shared chunks.
    assert_eq!(sha_in(&env, "busybox-plus", "p1", "/bin/busybox"), busybox_sha);
    assert_eq!(
        sha_in(&env, "busybox-plus", "p2", "/extra/data"),
        sha_in(&env, "busybox-plus", "p3", "/extra/data-copy")
    );
    assert_eq!(env.run("layered", "l1", &["cat", "/data/keep"]).trim(), "keep v2");

    // 4. The image that wrote busybox's chunks goes; the others keep reading them (its blob stays).
    env.ctr(&["image", "rm", "--sync", &env.image("busybox")]);
    env.wait_until("busybox's snapshot removed", 30, || {
        stats(&env)["layers"].as_u64() == Some(4)
    });
    let s4 = stats(&env);
    assert_eq!(
        s4["blobs"], s3["blobs"],
        "busybox's blob is still named by others: {s4}"
    );
    assert_eq!(sha_in(&env, "busybox-plus", "p4", "/bin/busybox"), busybox_sha);
    assert_eq!(sha_in(&env, "layered", "l2", "/bin/busybox"), busybox_sha);
    env.check_layout();
    // busybox-plus's layer as the kernel mounts it (ROOT/m/<id>) with busybox's blob as a device, entry by entry
    // equal to its tar; but the root's mtime: containerd's unpack into the snapshot (the Commit path) leaves the
    // root with the time of the unpack, where GNU tar applies the layer's `./` entry.
    let (_x, expected) = common::gnu_extract_tree(&oci_layer_blob("busybox-plus"));
    let mp = fs::read_dir(env.root.join("m"))
        .expect("read m/")
        .map(|e| e.unwrap().path())
        .find(|p| p.join("extra/data").exists())
        .expect("busybox-plus's layer is mounted");
    common::assert_trees_eq(
        "busybox-plus's dedup layer after busybox's removal vs its tar",
        &expected,
        &common::snapshot_tree(&mp),
        &common::CompareOpts::ignoring_mtime_of(["/"]),
    );

    // 5. Everything goes: no blob, index entry or mount is left.
    env.remove_everything();
    let s5 = stats(&env);
    assert_eq!(
        (s5["layers"].as_u64(), s5["blobs"].as_u64(), s5["chunks"].as_u64()),
        (Some(0), Some(0), Some(0)),
        "{s5}"
    );
    assert!(blob_files(&env.root).is_empty(), "{:?}", blob_files(&env.root));
    assert!(env.mounts_under_dir().is_empty(), "{:?}", env.mounts_under_dir());
    env.stop();
}

/// Dedup on the newer containerds, where our Diff service unpacks every layer (`ctr image pull`: the client-side
/// unpacker on 1.7, the transfer service on 2.1): the layers share busybox's chunks, containers read them, and
/// removing everything leaves no blob, chunk or mount.
fn dedup_through_our_apply(version: &str) {
    let _g = serial();
    let env = Env::start_with_version(
        &format!(
            "{} serve --root {{root}} --address {{socket}} --dedup",
            env!("CARGO_BIN_EXE_dedup-snapshotter")
        ),
        Some(version),
    );
    assert!(env.diff_proxy, "containerd {version} should get our Diff service");
    let applied = |log: &str| {
        log.lines()
            .filter(|l| l.contains("rpc=\"Apply\"") && l.contains("ok=true"))
            .count()
    };
    env.pull("busybox");
    env.pull("busybox-plus");
    assert_eq!(applied(&env.log()), 2, "our Apply unpacks both layers");
    let s = stats(&env);
    assert_eq!(s["layers"], 2, "{s}");
    for c in s["chains"].as_array().expect("chains") {
        assert!(
            c["shared_blob_bytes"].as_u64().unwrap() > 0,
            "every image shares busybox's blob: {s}"
        );
    }
    busybox_plus_reads_right(&env);
    env.check_layout();
    env.remove_everything();
    let s = stats(&env);
    assert_eq!(
        (s["layers"].as_u64(), s["blobs"].as_u64(), s["chunks"].as_u64()),
        (Some(0), Some(0), Some(0)),
        "{s}"
    );
    assert!(blob_files(&env.root).is_empty(), "{:?}", blob_files(&env.root));
    env.stop();
}

#[test]
fn dedup_through_our_apply_on_containerd_1_7() {
    dedup_through_our_apply("1.7");
}

#[test]
fn dedup_through_our_apply_on_containerd_2_1() {
    dedup_through_our_apply("2.1");
}

/// Containers of busybox and busybox-plus read the files the two images share, and busybox-plus's two copies of
/// the same data, the same.
fn busybox_plus_reads_right(env: &Env) {
    assert_eq!(
        sha_in(env, "busybox-plus", "p1", "/extra/data"),
        sha_in(env, "busybox-plus", "p2", "/extra/data-copy")
    );
    assert_eq!(
        sha_in(env, "busybox", "b1", "/bin/busybox"),
        sha_in(env, "busybox-plus", "p3", "/bin/busybox")
    );
}

/// The regular files of every committed layer image of the store, by layout.
fn layer_layouts(root: &Path) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for e in fs::read_dir(root.join("snapshots")).expect("read snapshots/") {
        let image = e.unwrap().path().join("layer.erofs");
        if !image.exists() {
            continue;
        }
        let img = erofs::reader::Image::open(&image).expect("open layer");
        if img.devices().is_empty() {
            img.validate().expect("layer validates");
        }
        img.walk(&mut |_, e| {
            if e.kind == erofs::reader::FileKind::File {
                *out.entry(format!("{:?}", e.inode.layout)).or_default() += 1;
            }
            Ok(())
        })
        .unwrap();
    }
    out
}

/// `serve --compression`: layers containerd unpacks and we convert at Commit (1.6), and layers our Diff service
/// applies (2.1), are stored compressed, and containers read them right. (With dedup too: the store's tests,
/// `crates/snapshotter/tests/compressed.rs`; busybox has no small file that compresses.)
fn compressed_layers(version: Option<&str>, extra: &str) {
    let _g = serial();
    let env = Env::start_with_version(
        &format!(
            "{} serve --root {{root}} --address {{socket}} --compression lz4hc {extra}",
            env!("CARGO_BIN_EXE_dedup-snapshotter")
        ),
        version,
    );
    env.pull("busybox");
    env.pull("busybox-plus");
    let layouts = layer_layouts(&env.root);
    assert!(
        layouts.get("CompressedFull").is_some_and(|n| *n > 0),
        "no compressed file: {layouts:?}"
    );
    // busybox-plus adds two copies of the same data over busybox.
    busybox_plus_reads_right(&env);
    env.check_layout();
    env.remove_everything();
    assert!(env.mounts_under_dir().is_empty(), "{:?}", env.mounts_under_dir());
    env.stop();
}

#[test]
fn compressed_layers_at_commit_on_containerd_1_6() {
    compressed_layers(None, "");
}

#[test]
fn compressed_layers_through_our_apply_on_containerd_2_1() {
    compressed_layers(Some("2.1"), "");
}
