//! Chunk-based (deduplicated) layers under the kernel: images whose file data lives in
//! blobs given as extra devices read back exactly as their source tars.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

/// Converts `input` with `--blob-dir`, returning the image, its blob (if any new
/// chunk) and the report.
fn convert_chunked(input: &Path, dir: &Path, name: &str, chunk: &str) -> (PathBuf, Option<PathBuf>, serde_json::Value) {
    let blobs = dir.join("blobs");
    fs::create_dir_all(&blobs).unwrap();
    let image = dir.join(format!("{name}.erofs"));
    let r = convert_ok(
        input,
        &image,
        &["--blob-dir", blobs.to_str().unwrap(), "--chunk-size", chunk],
    );
    let blob = r["blob"].as_str().map(PathBuf::from);
    (image, blob, r)
}

/// A layer made to exercise chunking: files at and around chunk boundaries, the
/// same content under several names, all-zero files (stored as holes), a file whose
/// chunks repeat inside it, small inline files, hard links and xattrs.
fn chunky_layer(dir: &Path) {
    let f = |p: &str, data: &[u8]| {
        let path = dir.join(p);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, data).unwrap();
    };
    for (i, len) in [
        0usize,
        1,
        4095,
        4096,
        4097,
        65535,
        65536,
        65537,
        200_000,
        1 << 20,
        (1 << 20) + 3,
    ]
    .iter()
    .enumerate()
    {
        f(&format!("sizes/f{i}-{len}"), &pseudo_random(*len, i as u64 + 1));
    }
    let big = pseudo_random(300_000, 99);
    f("copies/a", &big);
    f("copies/sub/b", &big);
    f("copies/c", &big[..131072]);
    f("zeros/z1", &vec![0u8; 200_000]);
    let mut half = vec![0u8; 70_000];
    half[65536..].copy_from_slice(&pseudo_random(70_000 - 65536, 5));
    f("zeros/half", &half);
    let chunk = pseudo_random(65536, 7);
    f("repeat/r", &chunk.repeat(5));
    f("small/s", b"hello\n");
    fs::hard_link(dir.join("copies/a"), dir.join("copies/hard-a")).unwrap();
    lsetxattr(&dir.join("copies/a"), "user.k", b"v");
    set_mode(&dir.join("sizes/f1-1"), 0o4755);
}

#[test]
fn chunked_layers_read_back_exactly() {
    require_root_and_kernel();
    let work = tempdir();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    chunky_layer(&src);
    let tar = work.path().join("layer.tar");
    gnu_create(&src, &tar, TarFormat::Posix);
    let (_x, expected) = gnu_extract_tree(&tar);
    for chunk in ["4K", "64K", "1M"] {
        let dir = work.path().join(chunk);
        let (image, blob, r) = convert_chunked(&compress(&tar, Compression::Gzip), &dir, "layer", chunk);
        let blob = blob.expect("new chunks went to a blob");
        // Repeats are stored once: the copies of `big`, the repeated chunk.
        assert!(r["repeated_bytes"].as_u64().unwrap() >= 300_000, "{chunk}: {r}");
        assert!(r["zero_bytes"].as_u64().unwrap() >= 200_000, "{chunk}: {r}");
        let logical = r["logical_bytes"].as_u64().unwrap();
        let stored = fs::metadata(&blob).unwrap().len();
        assert!(stored < logical, "{chunk}: blob {stored} >= file data {logical}");
        let m = Mount::erofs_with_devices(&image, std::slice::from_ref(&blob));
        assert_trees_eq(
            &format!("chunk size {chunk}: kernel mount vs GNU tar"),
            &expected,
            &snapshot_tree(m.path()),
            &CompareOpts::default(),
        );
    }
}

/// The minbase rootfs as chunk-based files on a blob: the kernel mount equals the tar.
#[test]
fn minbase_chunked_equals_tar() {
    require_root_and_kernel();
    let tgz = debian_minbase();
    let tar = tgz.with_extension("");
    let work = tempdir();
    let (image, blob, r) = convert_chunked(&tgz, work.path(), "minbase", "64K");
    let blob = blob.expect("blob");
    let (_x, expected) = gnu_extract_tree(&tar);
    let m = Mount::erofs_with_devices(&image, std::slice::from_ref(&blob));
    assert_trees_eq(
        "minbase, 64K chunks: kernel mount vs GNU tar",
        &expected,
        &snapshot_tree(m.path()),
        &CompareOpts::default(),
    );
    assert_eq!(r["devices"].as_array().unwrap().len(), 1, "{r}");
}

/// Merged metadata (`merge`) over a chunk-based layer, a block-aligned plain one and a
/// second chunk-based one that shares chunks with the first: one kernel mount, the
/// layers and blobs its devices, equals GNU tar extracting the three layers in order.
/// A compressed layer is refused (exit 2) and nothing is left.
#[test]
fn merged_metadata_over_chunked_and_plain_layers() {
    require_root_and_kernel();
    let work = tempdir();
    let mk = |name: &str, build: &dyn Fn(&Path)| -> PathBuf {
        let src = work.path().join(format!("src-{name}"));
        fs::create_dir(&src).unwrap();
        set_mode(&src, 0o755);
        build(&src);
        let tar = work.path().join(format!("{name}.tar"));
        gnu_create(&src, &tar, TarFormat::Posix);
        tar
    };
    let a = mk("a", &|d| chunky_layer(d));
    let b = mk("b", &|d| {
        fs::create_dir_all(d.join("copies")).unwrap();
        fs::write(d.join("copies/c"), pseudo_random(50_000, 31)).unwrap();
        fs::write(d.join("plain-big"), pseudo_random(3 << 20, 32)).unwrap();
        fs::create_dir_all(d.join("sizes")).unwrap();
        set_mode(&d.join("sizes"), 0o700);
    });
    let c = mk("c", &|d| {
        fs::create_dir_all(d.join("copies/sub")).unwrap();
        fs::write(d.join("copies/sub/b"), &pseudo_random(300_000, 99)[..200_000]).unwrap();
        fs::write(d.join("new-in-c"), pseudo_random(70_000, 33)).unwrap();
    });
    let expected_dir = tempdir();
    set_mode(expected_dir.path(), 0o755);
    for t in [&a, &b, &c] {
        gnu_extract(t, expected_dir.path());
    }
    let expected = snapshot_tree(expected_dir.path());

    let dir = work.path().join("store");
    let (ia, _, ra) = convert_chunked(&compress(&a, Compression::Gzip), &dir, "a", "64K");
    let ib = dir.join("b.erofs");
    convert_ok(&b, &ib, &["--no-inline"]);
    let (ic, _, rc) = convert_chunked(&c, &dir, "c", "64K");
    // The report names the layer's blobs (its device table's tags), which live in the blob dir.
    let devs = |r: &serde_json::Value| -> String {
        let d: Vec<String> = r["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| dir.join("blobs").join(d.as_str().unwrap()).display().to_string())
            .collect();
        d.join(",")
    };
    let merged = work.path().join("merged.erofs");
    let args = [
        format!("{}={}", ia.display(), devs(&ra)),
        ib.display().to_string(),
        format!("{}={}", ic.display(), devs(&rc)),
    ];
    let vmdk = work.path().join("merged.vmdk");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
        .args(["merge", "--json", "--vmdk"])
        .arg(&vmdk)
        .arg(&merged)
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "merge: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let devices: Vec<PathBuf> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d.as_str().unwrap()))
        .collect();
    assert!(devices.contains(&ib), "the plain layer is a device: {v}");
    let m = Mount::erofs_with_devices(&merged, &devices);
    assert_trees_eq(
        "merged metadata over chunked, plain and chunked layers vs GNU tar",
        &expected,
        &snapshot_tree(m.path()),
        &CompareOpts::default(),
    );
    drop(m);
    // The same as one flat device (the VMDK's extents concatenated), with no extra devices.
    let raw = work.path().join("merged.raw");
    qemu_img_raw(&vmdk, &raw);
    let m = Mount::erofs(&raw);
    assert_trees_eq(
        "the merged VMDK as a raw flat device vs GNU tar",
        &expected,
        &snapshot_tree(m.path()),
        &CompareOpts::default(),
    );
    drop(m);
    // The merged image is metadata: far smaller than the layers' data.
    let size = fs::metadata(&merged).unwrap().len();
    assert!(size < 256 << 10, "merged metadata is {size} bytes");

    // A compressed layer cannot be pointed at: refused, nothing written.
    let z = mk("z", &|d| {
        fs::write(d.join("text"), b"compressible text ".repeat(10_000)).unwrap()
    });
    let iz = dir.join("z.erofs");
    let r = convert_ok(&z, &iz, &["--compress", "lz4"]);
    assert_eq!(r["compressed_files"], 1, "{r}");
    let refused = work.path().join("refused.erofs");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dedup-snapshotter"))
        .arg("merge")
        .arg(&refused)
        .arg(&ib)
        .arg(&iz)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("compressed"));
    assert!(!refused.exists());
}
