//! `index-image`: lazy pulls of an unmodified image, from a small artifact next to it.
//!
//! Each `tar+gzip` / `tar+zstd` layer is read once. In that one pass:
//! - the tar is parsed into a *tar-index* EROFS image ([`layer_convert::tarindex`]): the
//!   layer's metadata, whose regular files point into the uncompressed tar (the image's
//!   device 1);
//! - decompression checkpoints are recorded ([`tar_index`]): for gzip a 32 KiB window at a
//!   deflate block boundary before every chunk, for zstd the frame starts;
//! - every chunk of the uncompressed tar is hashed, so that any read can be verified.
//!
//! The two go into one blob per layer (a [`Bundle`]), and the blobs into an OCI artifact
//! whose `subject` is the image manifest: registries list it among the manifest's
//! referrers (or under the referrers tag, `sha256-<hex>`, where they have no referrers
//! API). The image itself is not touched.
//!
//! A node that pulls the image with CRI's labels finds the artifact, mounts each
//! layer's metadata at once, and has `dedupd` serve the uncompressed tar: a read fetches
//! the compressed range that covers it from the original layer blob, inflates it from
//! the nearest checkpoint and checks it against the chunk digest before it is used.

use std::collections::BTreeMap;
use std::io::{self, BufReader};
use std::path::PathBuf;
use std::time::Instant;

use indicatif::ProgressBar;
use registry::{Client, Reference, OCI_MANIFEST};
use serde::Serialize;
use serde_json::json;
use tracing::info;

use crate::Error;

/// `artifactType` of the artifact `index-image` pushes.
pub const TARINDEX_ARTIFACT_TYPE: &str = "application/vnd.dedup-snapshotter.tarindex.v1";
/// Media type of one layer's [`Bundle`] in that artifact.
pub const TARINDEX_LAYER_MEDIA_TYPE: &str = "application/vnd.dedup-snapshotter.tarindex.layer.v1";
/// Annotation of a bundle's descriptor: the digest of the image layer it indexes.
pub const ANNOTATION_LAYER_DIGEST: &str = "dev.dedup-snapshotter.tarindex.layer.digest";
/// Annotation of a bundle's descriptor: that layer's diffID.
pub const ANNOTATION_DIFF_ID: &str = "dev.dedup-snapshotter.tarindex.layer.diff-id";
/// The empty config of an artifact (`application/vnd.oci.empty.v1+json`, content `{}`).
pub const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// Digest of `{}`.
pub const EMPTY_CONFIG_DIGEST: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

const BUNDLE_MAGIC: [u8; 8] = *b"DSTIDX\0\x01";
const BUNDLE_HEADER: usize = 8 + 8 * 3;
/// Largest tar-index image a bundle may carry: metadata only, so even millions of files
/// stay far below it; a bundle claiming more is refused before anything is allocated.
pub const MAX_BUNDLE_META: u64 = 1 << 30;

/// One layer's part of the artifact: its tar-index EROFS image and its [`tar_index::Index`].
///
/// On the wire: the magic `DSTIDX\0\x01`, then three little-endian u64s (the image's size,
/// its zstd-compressed size, the index's size), the compressed image (one zstd frame), the
/// index ([`tar_index::Index::to_bytes`]), and nothing after.
#[derive(Debug)]
pub struct Bundle {
    /// The tar-index EROFS image (512-byte blocks; device 1 is the uncompressed tar).
    pub meta: Vec<u8>,
    /// Checkpoints and chunk digests of the layer.
    pub index: tar_index::Index,
}

impl Bundle {
    /// The bundle's bytes.
    pub fn to_bytes(&self) -> io::Result<Vec<u8>> {
        let z = zstd::bulk::compress(&self.meta, 10)?;
        let ix = self.index.to_bytes();
        let mut out = Vec::with_capacity(BUNDLE_HEADER + z.len() + ix.len());
        out.extend_from_slice(&BUNDLE_MAGIC);
        out.extend_from_slice(&(self.meta.len() as u64).to_le_bytes());
        out.extend_from_slice(&(z.len() as u64).to_le_bytes());
        out.extend_from_slice(&(ix.len() as u64).to_le_bytes());
        out.extend_from_slice(&z);
        out.extend_from_slice(&ix);
        Ok(out)
    }

    /// Parses a bundle from a registry: every length is checked against the bytes given
    /// and the image's against [`MAX_BUNDLE_META`] before anything is allocated, and the
    /// image must decompress to exactly its stated size. (The image is still untrusted
    /// EROFS: callers validate it before it is mounted.)
    pub fn from_bytes(b: &[u8]) -> Result<Bundle, String> {
        if b.len() < BUNDLE_HEADER || b[..8] != BUNDLE_MAGIC {
            return Err("not a tar-index bundle (bad magic or too short)".into());
        }
        let word = |i: usize| u64::from_le_bytes(b[8 + 8 * i..16 + 8 * i].try_into().unwrap());
        let (meta_len, z_len, ix_len) = (word(0), word(1), word(2));
        let rest = (b.len() - BUNDLE_HEADER) as u64;
        if meta_len == 0 || meta_len > MAX_BUNDLE_META {
            return Err(format!("bundle image of {meta_len} bytes"));
        }
        if z_len.checked_add(ix_len) != Some(rest) {
            return Err(format!("bundle sections of {z_len} + {ix_len} bytes in {rest} bytes"));
        }
        let z = &b[BUNDLE_HEADER..BUNDLE_HEADER + z_len as usize];
        let meta = zstd::bulk::decompress(z, meta_len as usize).map_err(|e| format!("bundle image: {e}"))?;
        if meta.len() as u64 != meta_len {
            return Err(format!("bundle image is {} bytes, not {meta_len}", meta.len()));
        }
        let index = tar_index::Index::from_bytes(&b[BUNDLE_HEADER + z_len as usize..])
            .map_err(|e| format!("bundle index: {e}"))?;
        Ok(Bundle { meta, index })
    }
}

/// How to index.
#[derive(Clone)]
pub struct IndexOptions {
    /// Uncompressed bytes per verified chunk, and the spacing of checkpoints (a power of
    /// two, 64 KiB .. 64 MiB): what a read fetches and inflates at least. 1 MiB by default:
    /// on the python image (scripts/bench-lazy.sh) 2 MiB makes an artifact of 1.8% of the
    /// image but the first output only 4.2x sooner at 3 MB/s; 1 MiB 3.4% and 5.2x.
    pub chunk_size: u64,
    /// Where tar-index images are written while the layers are read.
    pub work_dir: Option<PathBuf>,
    /// Converter settings (limits, build time).
    pub layer: layer_convert::Options,
    /// Draw progress bars on stderr.
    pub progress: bool,
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions {
            chunk_size: 1 << 20,
            work_dir: None,
            layer: layer_convert::Options::from_env(),
            progress: false,
        }
    }
}

/// One layer of the image, indexed or skipped.
#[derive(Debug, Clone, Serialize)]
pub struct IndexedLayer {
    /// The layer's digest, media type and size.
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// Why it has no index (not gzip/zstd, no random access), `None` when it has one.
    pub skipped: Option<String>,
    /// The bundle blob pushed for it, and its size.
    pub bundle_digest: Option<String>,
    pub bundle_size: u64,
    /// Of the bundle: the tar-index image, the checkpoints.
    pub meta_size: u64,
    pub checkpoints: usize,
    /// The uncompressed tar's size and its chunks.
    pub uncompressed_size: u64,
    pub chunks: u64,
    /// Seconds to read and index it.
    pub seconds: f64,
}

/// What [`index_image`] did.
#[derive(Debug, Clone, Serialize)]
pub struct IndexReport {
    /// The image, pinned to the manifest indexed.
    pub image: String,
    pub manifest_digest: String,
    /// The artifact pushed (`None` when no layer could be indexed).
    pub artifact_digest: Option<String>,
    pub layers: Vec<IndexedLayer>,
    /// Compressed size of the image's layers, and of the artifact (bundles, manifest).
    pub image_bytes: u64,
    pub artifact_bytes: u64,
    pub seconds: f64,
}

impl IndexReport {
    /// The artifact's size as a percentage of the image's compressed layers.
    pub fn artifact_percent(&self) -> f64 {
        if self.image_bytes == 0 {
            0.0
        } else {
            100.0 * self.artifact_bytes as f64 / self.image_bytes as f64
        }
    }
}

/// The format a layer media type is indexed as, or why it is not.
pub fn index_format(media_type: &str) -> Result<tar_index::Format, String> {
    match layer_convert::Compression::from_media_type(media_type) {
        Ok(layer_convert::Compression::Gzip) => Ok(tar_index::Format::Gzip),
        Ok(layer_convert::Compression::Zstd) => Ok(tar_index::Format::Zstd),
        Ok(_) => Err(format!("{media_type}: an uncompressed tar has nothing to index")),
        Err(_) => Err(format!("{media_type} is not a tar+gzip or tar+zstd layer")),
    }
}

/// Indexes every gzip/zstd layer of `image` (a manifest, or an index resolved to this
/// host's platform) and pushes the artifact that refers to its manifest.
pub fn index_image(client: &Client, image: &Reference, opts: &IndexOptions) -> Result<IndexReport, Error> {
    let started = Instant::now();
    if !opts.chunk_size.is_power_of_two() || !((64 << 10)..=(64 << 20)).contains(&opts.chunk_size) {
        return Err(Error::Invalid(format!(
            "chunk size {} is not a power of two from 64 KiB to 64 MiB",
            opts.chunk_size
        )));
    }
    let crate::convert::SourceImage {
        manifest,
        layers,
        config,
        ..
    } = crate::convert::read_image(client, image)?;
    let manifest_digest = registry::sha256_digest(&manifest.bytes);
    let diff_ids: Vec<String> = serde_json::from_value(config["rootfs"]["diff_ids"].clone())
        .map_err(|e| Error::Invalid(format!("{image}: config rootfs.diff_ids: {e}")))?;
    let repo = image.repo();
    let work = crate::convert::work_dir(opts.work_dir.as_deref())?;
    let (bars, style) = crate::convert::progress_bars(opts.progress);

    let mut report_layers = Vec::new();
    let mut bundles = Vec::new();
    let mut below: Vec<std::sync::Arc<dyn layer_convert::LowerLayer>> = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let t = Instant::now();
        let bar = bars.add(ProgressBar::new(layer.size).with_style(style.clone()));
        bar.set_prefix(format!("layer {}/{}", i + 1, layers.len()));
        let mut entry = IndexedLayer {
            digest: layer.digest.clone(),
            media_type: layer.media_type.clone(),
            size: layer.size,
            skipped: None,
            bundle_digest: None,
            bundle_size: 0,
            meta_size: 0,
            checkpoints: 0,
            uncompressed_size: 0,
            chunks: 0,
            seconds: 0.0,
        };
        let format = match index_format(&layer.media_type) {
            Ok(f) => f,
            Err(why) => {
                bar.finish_with_message(format!("skipped: {why}"));
                info!(index = i, digest = %layer.digest, why, "layer skipped");
                entry.skipped = Some(why);
                report_layers.push(entry);
                // Its tree is unknown here: the layers above see through it.
                continue;
            }
        };
        bar.set_message("indexing");
        let blob = client.get_blob(repo, &layer.digest)?;
        let ixopts = tar_index::IndexOptions {
            chunk_size: opts.chunk_size,
            max_uncompressed: opts.layer.max_size,
        };
        let layer_err = |source: layer_convert::Error| Error::Layer {
            index: i,
            digest: layer.digest.clone(),
            source,
        };
        let tix = |e: tar_index::Error| Error::Invalid(format!("layer {i} ({}): {e}", layer.digest));
        let mut indexer = tar_index::Indexer::new(format, bar.wrap_read(blob), ixopts).map_err(tix)?;
        let path = work.path().join(format!("layer-{i}.erofs"));
        let mut lopts = opts.layer.clone();
        lopts.lowers = layer_convert::Lowers(below.iter().rev().cloned().collect());
        let converted = layer_convert::tarindex::convert_tar_index(
            BufReader::with_capacity(1 << 20, &mut indexer),
            &path,
            &lopts,
            &diff_ids[i],
        );
        let index = match (converted, indexer.finish()) {
            (Ok(_), Ok(ix)) => ix,
            (_, Err(e @ tar_index::Error::NoRandomAccess { .. })) => {
                let why = format!("no random access: {e}");
                bar.finish_with_message(format!("skipped: {why}"));
                info!(index = i, digest = %layer.digest, why, "layer skipped");
                entry.skipped = Some(why);
                report_layers.push(entry);
                if let Ok(img) = erofs::reader::Image::open(&path) {
                    below.push(std::sync::Arc::new(layer_convert::ImageLayer(img)));
                }
                continue;
            }
            (Err(e), _) => return Err(layer_err(e)),
            (_, Err(e)) => return Err(tix(e)),
        };
        let hex = |d: &[u8; 32]| format!("sha256:{}", hex::encode(d));
        if hex(&index.compressed_digest) != layer.digest || index.compressed_size != layer.size {
            return Err(Error::Invalid(format!(
                "layer {i}: read {} ({} bytes) but the manifest names {} ({} bytes)",
                hex(&index.compressed_digest),
                index.compressed_size,
                layer.digest,
                layer.size
            )));
        }
        if hex(&index.uncompressed_digest) != diff_ids[i] {
            return Err(Error::Invalid(format!(
                "layer {i}: its tar is {} but the config's diffID is {}",
                hex(&index.uncompressed_digest),
                diff_ids[i]
            )));
        }
        let meta = std::fs::read(&path)?;
        let bundle = Bundle { meta, index };
        let bytes = bundle.to_bytes()?;
        let digest = registry::sha256_digest(&bytes);
        bar.set_message("pushing");
        client.push_blob(repo, &digest, bytes.len() as u64, &bytes[..])?;
        entry.bundle_digest = Some(digest.clone());
        entry.bundle_size = bytes.len() as u64;
        entry.meta_size = bundle.meta.len() as u64;
        entry.checkpoints = bundle.index.checkpoints();
        entry.uncompressed_size = bundle.index.uncompressed_size;
        entry.chunks = bundle.index.chunk_count();
        entry.seconds = t.elapsed().as_secs_f64();
        bar.finish_with_message(format!(
            "indexed: {} bytes ({:.2}% of the layer)",
            bytes.len(),
            100.0 * bytes.len() as f64 / layer.size.max(1) as f64
        ));
        info!(index = i, digest = %layer.digest, bundle = %digest, size = bytes.len(), "layer indexed");
        bundles.push(json!({
            "mediaType": TARINDEX_LAYER_MEDIA_TYPE,
            "digest": digest,
            "size": bytes.len(),
            "annotations": {
                ANNOTATION_LAYER_DIGEST: layer.digest,
                ANNOTATION_DIFF_ID: diff_ids[i],
            },
        }));
        match erofs::reader::Image::open(&path) {
            Ok(img) => below.push(std::sync::Arc::new(layer_convert::ImageLayer(img))),
            Err(e) => tracing::warn!(index = i, error = %e, "tar-index image not readable as a lower layer"),
        }
        report_layers.push(entry);
    }

    let image_bytes: u64 = layers.iter().map(|l| l.size).sum();
    let mut artifact_bytes: u64 = report_layers.iter().map(|l| l.bundle_size).sum();
    let artifact_digest = if bundles.is_empty() {
        None
    } else {
        client.push_blob(repo, EMPTY_CONFIG_DIGEST, 2, &b"{}"[..])?;
        let mut annotations = BTreeMap::new();
        annotations.insert(
            "dev.dedup-snapshotter.tarindex.chunk-size".to_string(),
            opts.chunk_size.to_string(),
        );
        let artifact = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": TARINDEX_ARTIFACT_TYPE,
            "config": { "mediaType": EMPTY_CONFIG_MEDIA_TYPE, "digest": EMPTY_CONFIG_DIGEST, "size": 2 },
            "layers": bundles,
            "subject": { "mediaType": manifest.media_type, "digest": manifest_digest, "size": manifest.bytes.len() },
            "annotations": annotations,
        });
        let bytes = serde_json::to_vec(&artifact).map_err(|e| Error::Invalid(e.to_string()))?;
        artifact_bytes += bytes.len() as u64 + 2;
        let digest = client.push_referrer(repo, &bytes, OCI_MANIFEST)?;
        info!(artifact = %digest, subject = %manifest_digest, "tar index pushed");
        Some(digest)
    };
    Ok(IndexReport {
        image: image.with_digest(&manifest_digest)?.to_string(),
        manifest_digest,
        artifact_digest,
        layers: report_layers,
        image_bytes,
        artifact_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_gzip_and_zstd_tar_layers_are_indexed() {
        assert!(matches!(
            index_format("application/vnd.oci.image.layer.v1.tar+gzip"),
            Ok(tar_index::Format::Gzip)
        ));
        assert!(matches!(
            index_format("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Ok(tar_index::Format::Gzip)
        ));
        assert!(matches!(
            index_format("application/vnd.oci.image.layer.v1.tar+zstd"),
            Ok(tar_index::Format::Zstd)
        ));
        for skipped in [
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.erofs.layer.v1",
            "application/vnd.oci.image.layer.v1.erofs",
            "application/vnd.oci.image.layer.v1.tar+encrypted",
            "application/octet-stream",
        ] {
            let why = index_format(skipped).unwrap_err();
            assert!(why.contains(skipped), "{why}");
        }
    }

    /// A real (small) bundle: the index of a tiny gzip layer and a few bytes of "image".
    fn bundle() -> Bundle {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&vec![7u8; 100_000]).unwrap();
        let gz = gz.finish().unwrap();
        let opts = tar_index::IndexOptions {
            chunk_size: 64 << 10,
            max_uncompressed: 1 << 30,
        };
        let mut ix = tar_index::Indexer::new(tar_index::Format::Gzip, &gz[..], opts).unwrap();
        io::copy(&mut ix, &mut io::sink()).unwrap();
        Bundle {
            meta: b"not really EROFS, the bundle does not look".to_vec(),
            index: ix.finish().unwrap(),
        }
    }

    #[test]
    fn bundles_round_trip() {
        let b = bundle();
        let bytes = b.to_bytes().unwrap();
        let back = Bundle::from_bytes(&bytes).unwrap();
        assert_eq!(back.meta, b.meta);
        assert_eq!(back.index.to_bytes(), b.index.to_bytes());
    }

    #[test]
    fn hostile_bundles_are_refused() {
        let good = bundle().to_bytes().unwrap();
        let word = |b: &mut Vec<u8>, i: usize, v: u64| b[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_le_bytes());
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        cases.push(("empty", Vec::new()));
        cases.push(("truncated header", good[..20].to_vec()));
        let mut b = good.clone();
        b[0] ^= 1;
        cases.push(("bad magic", b));
        let mut b = good.clone();
        word(&mut b, 0, MAX_BUNDLE_META + 1);
        cases.push(("image size beyond the bound (a bomb)", b));
        let mut b = good.clone();
        word(&mut b, 0, 5);
        cases.push(("image smaller than it decompresses to", b));
        let mut b = good.clone();
        word(&mut b, 1, u64::MAX);
        cases.push(("section sizes that overflow", b));
        let mut b = good.clone();
        b.push(0);
        cases.push(("a trailing byte", b));
        cases.push(("truncated index", good[..good.len() - 1].to_vec()));
        for (what, bytes) in cases {
            assert!(Bundle::from_bytes(&bytes).is_err(), "{what} was accepted");
        }
    }
}
