//! `convert_image` with compressed chunks against a real registry (Debian's
//! docker-registry): a small tar image converted twice, plain and with zstd frames per
//! chunk, and the two compared as a puller sees them.
//!
//! - The whole `+zstd` blob through a plain zstd decoder is the plain conversion, byte
//!   for byte; the config's diffID is that image's digest.
//! - Each chunk, fetched by its frame's range and decoded by `BlobSpec::decode_chunk`
//!   (what dedupd does), is its piece of the image and matches its digest.
//! - The seek table (zstd's seekable format) parses and lists the same frames.
//! - Converting the compressed image again without compression gives the plain layer.

use std::io::Read;
use std::path::Path;
use std::process::Command;

use image_convert::annotations::{self, LazyLayer};
use image_convert::zstd_chunks::{SEEKABLE_MAGIC, SKIPPABLE_MAGIC};
use image_convert::{convert_image, ConvertOptions};
use registry::{Client, ClientOptions, Descriptor, Reference};
use sha2::{Digest, Sha256};
use test_support::registry::Registry;

const CHUNK: u64 = 4096;

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// A tar layer (GNU tar) of compressible text, incompressible bytes and small files.
fn tar_layer(dir: &Path) -> Vec<u8> {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("usr/lib")).unwrap();
    let text: Vec<u8> = b"a compressible line of text\n"
        .iter()
        .cycle()
        .take(40_000)
        .copied()
        .collect();
    std::fs::write(src.join("usr/lib/text"), text).unwrap();
    std::fs::write(src.join("usr/lib/random"), test_support::pseudo_random(30_000, 7)).unwrap();
    for i in 0..40 {
        std::fs::write(src.join(format!("usr/lib/small-{i}")), format!("file {i}\n")).unwrap();
    }
    let tar = dir.join("layer.tar");
    let st = Command::new("tar")
        .args([
            "--format=posix",
            "--sort=name",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "-C",
        ])
        .arg(&src)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read(&tar).unwrap()
}

/// Pushes a one-layer image of `tar` as `reference`.
fn push_image(client: &Client, reference: &Reference, tar: &[u8]) {
    let repo = reference.repo();
    let layer = digest(tar);
    client.push_blob(repo, &layer, tar.len() as u64, tar).unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": registry::host_arch(),
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer]},
    }))
    .unwrap();
    client
        .push_blob(repo, &digest(&config), config.len() as u64, &config[..])
        .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": registry::OCI_MANIFEST,
        "config": {"mediaType": registry::OCI_CONFIG, "digest": digest(&config), "size": config.len()},
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer,
            "size": tar.len(),
        }],
    }))
    .unwrap();
    client
        .put_manifest(reference, registry::OCI_MANIFEST, &manifest)
        .unwrap();
}

/// The image's one layer descriptor, its blob, and the config's diffIDs.
fn pulled(client: &Client, reference: &Reference) -> (Descriptor, Vec<u8>, Vec<String>) {
    let m = client.get_manifest(reference).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
    let layers: Vec<Descriptor> = serde_json::from_value(m["layers"].clone()).unwrap();
    assert_eq!(layers.len(), 1);
    let read = |d: &str| {
        let mut b = Vec::new();
        client
            .get_blob(reference.repo(), d)
            .unwrap()
            .read_to_end(&mut b)
            .unwrap();
        b
    };
    let blob = read(&layers[0].digest);
    let config: serde_json::Value = serde_json::from_slice(&read(m["config"]["digest"].as_str().unwrap())).unwrap();
    let diff_ids = serde_json::from_value(config["rootfs"]["diff_ids"].clone()).unwrap();
    (layers[0].clone(), blob, diff_ids)
}

/// The seek table at the end of `blob`, parsed from the seekable format's own
/// description: (compressed, decompressed) size per frame.
fn seek_table(blob: &[u8]) -> Vec<(u32, u32)> {
    let u32_at = |at: usize| u32::from_le_bytes(blob[at..at + 4].try_into().unwrap());
    let footer = blob.len() - 9;
    assert_eq!(u32_at(footer + 5), SEEKABLE_MAGIC, "Seekable_Magic_Number");
    assert_eq!(blob[footer + 4] & 0x7c, 0, "reserved bits");
    assert_eq!(blob[footer + 4] & 0x80, 0, "no checksums");
    let frames = u32_at(footer) as usize;
    let table = blob.len() - 8 - frames * 8 - 9;
    assert_eq!(u32_at(table), SKIPPABLE_MAGIC, "the seek table is a skippable frame");
    assert_eq!(u32_at(table + 4) as usize, frames * 8 + 9, "Frame_Size");
    (0..frames)
        .map(|i| (u32_at(table + 8 + i * 8), u32_at(table + 12 + i * 8)))
        .collect()
}

#[test]
fn compressed_chunks_round_trip() {
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let client = Client::new(ClientOptions::default()).unwrap();
    let at = |name: &str| Reference::parse(&format!("{}/{name}", reg.addr)).unwrap();
    let tar = tar_layer(work.path());
    push_image(&client, &at("src:v1"), &tar);

    let opts = ConvertOptions {
        chunk_size: CHUNK,
        layer_media_type: annotations::OCI_EROFS_LAYER_MEDIA_TYPE.into(),
        ..ConvertOptions::default()
    };
    convert_image(&client, &at("src:v1"), &at("conv:plain"), &opts).unwrap();
    let zopts = ConvertOptions {
        chunk_zstd_level: Some(3),
        ..opts.clone()
    };
    let report = convert_image(&client, &at("src:v1"), &at("conv:zstd"), &zopts).unwrap();
    let (plain_desc, image, plain_ids) = pulled(&client, &at("conv:plain"));
    let (desc, blob, ids) = pulled(&client, &at("conv:zstd"));

    // The descriptor: the +zstd type, never taken for a native image, and annotations
    // that describe the image in chunks and the blob in frames.
    assert_eq!(desc.media_type, annotations::OCI_EROFS_ZSTD_LAYER_MEDIA_TYPE);
    assert!(!annotations::is_erofs_native(&desc.media_type));
    assert_eq!(plain_desc.media_type, annotations::OCI_EROFS_LAYER_MEDIA_TYPE);
    let lazy = LazyLayer::from_descriptor(&desc).unwrap();
    let plain = LazyLayer::from_descriptor(&plain_desc).unwrap();
    let z = lazy.zstd.clone().unwrap();
    assert_eq!(z.uncompressed_size, image.len() as u64);
    assert_eq!(z.uncompressed_digest, digest(&image));
    assert_eq!(lazy.chunk_digests, plain.chunk_digests);
    assert_eq!(lazy.data_offset, plain.data_offset);
    assert!(image.len() as u64 > 8 * CHUNK, "several chunks: {}", image.len());
    assert!(blob.len() < image.len() / 2, "{} of {} bytes", blob.len(), image.len());
    assert_eq!(report.layers[0].size, blob.len() as u64);
    assert_eq!(report.layers[0].uncompressed_digest, digest(&image));
    // containerd compares the diffID with what Apply returns: the image's digest.
    assert_eq!(ids, vec![digest(&image)]);
    assert_eq!(plain_ids, ids);

    // Any zstd decoder gives the image (the seek table is skipped).
    assert_eq!(zstd::decode_all(&blob[..]).unwrap(), image);

    // dedupd's view: one frame per chunk, each decoded alone to its verified piece; the
    // metadata chunks are one range at the start of the blob.
    let spec = fetch_api::BlobSpec {
        digest: lazy.digest.clone(),
        size: lazy.image_size(),
        chunk_size: lazy.chunk_size,
        chunk_digests: lazy.chunk_digests.clone(),
        prefetch: lazy.metadata_chunks().collect(),
        source: fetch_api::Source {
            registry: reg.addr.clone(),
            repository: "conv".into(),
        },
        compressed: Some(fetch_api::ChunkCompression {
            algorithm: fetch_api::CompressionAlgorithm::Zstd,
            sizes: z.sizes.clone(),
            uncompressed_digest: z.uncompressed_digest.clone(),
            index: None,
        }),
    };
    spec.validate().unwrap();
    assert_eq!(spec.content_digest(), digest(&image));
    let ranges = spec.fetch_ranges();
    assert_eq!(ranges.len() as u64, (image.len() as u64).div_ceil(CHUNK));
    let meta = lazy.metadata_chunks();
    assert!(meta.end > 0);
    for (i, &(start, end)) in ranges.iter().enumerate() {
        let raw = client
            .get_blob_range(at("conv:zstd").repo(), &lazy.digest, start, end - start)
            .unwrap();
        let piece = spec.decode_chunk(i as u64, raw).unwrap();
        let (a, b) = spec.chunk_range(i as u64);
        assert_eq!(piece, image[a as usize..b as usize], "chunk {i}");
        assert_eq!(hex::encode(Sha256::digest(&piece)), spec.chunk_digests[i], "chunk {i}");
    }

    // The seek table lists the same frames, and ends the blob right after them.
    let table = seek_table(&blob);
    let listed: Vec<u32> = table.iter().map(|e| e.0).collect();
    assert_eq!(listed, z.sizes);
    let pieces: Vec<u32> = (0..ranges.len() as u64)
        .map(|i| {
            let (a, b) = spec.chunk_range(i);
            (b - a) as u32
        })
        .collect();
    assert_eq!(table.iter().map(|e| e.1).collect::<Vec<_>>(), pieces);
    let frames: u64 = z.sizes.iter().map(|&n| u64::from(n)).sum();
    assert_eq!(frames + 8 + 8 * table.len() as u64 + 9, blob.len() as u64);

    // The compressed image converts back to the plain one (the image is kept as is).
    let back = convert_image(&client, &at("conv:zstd"), &at("conv:back"), &opts).unwrap();
    assert_eq!(back.layers[0].push, "kept");
    assert_eq!(back.layers[0].digest, plain_desc.digest);
    let (_, again, _) = pulled(&client, &at("conv:back"));
    assert_eq!(again, image);
}

#[test]
fn bad_levels_are_refused() {
    let client = Client::new(ClientOptions::default()).unwrap();
    let src = Reference::parse("127.0.0.1:1/x:y").unwrap();
    let opts = ConvertOptions {
        chunk_zstd_level: Some(1000),
        ..ConvertOptions::default()
    };
    let e = convert_image(&client, &src, &src, &opts).unwrap_err().to_string();
    assert!(e.contains("zstd level 1000"), "{e}");
}
