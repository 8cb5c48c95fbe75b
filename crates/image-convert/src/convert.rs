//! Pull, convert, push.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use registry::{Client, Descriptor, Reference, OCI_CONFIG, OCI_MANIFEST};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::annotations::{self, LazyLayer, EROFS_LAYER_MEDIA_TYPE};

/// Errors of an image conversion.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Talking to a registry failed.
    #[error("registry: {0}")]
    Registry(#[from] registry::Error),
    /// A layer could not be converted.
    #[error("layer {index} ({digest}): {source}")]
    Layer {
        /// Position of the layer in the manifest.
        index: usize,
        /// The source layer's digest.
        digest: String,
        /// What went wrong.
        source: layer_convert::Error,
    },
    /// Local files.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The source image is not something this tool converts.
    #[error("{0}")]
    Invalid(String),
}

/// How to convert.
#[derive(Clone)]
pub struct ConvertOptions {
    /// Size of the verification chunks (a power of two, 4 KiB .. 1 GiB).
    pub chunk_size: u64,
    /// What a start reads, in first-read order: files or byte ranges of files (absolute
    /// paths in the image). The chunks holding them become the layer's prefetch list.
    pub prefetch_paths: Vec<crate::PrefetchEntry>,
    /// Where converted layers are written before they are pushed.
    pub work_dir: Option<PathBuf>,
    /// Converter settings (limits, inline data, build time).
    pub layer: layer_convert::Options,
    /// Draw progress bars on stderr.
    pub progress: bool,
    /// Media type of the converted layers: [`EROFS_LAYER_MEDIA_TYPE`] by default, or
    /// [`annotations::OCI_EROFS_LAYER_MEDIA_TYPE`] for containerd before 2.x, whose
    /// unpacker treats only `application/vnd.oci.image.layer.*` (and Docker's) types as
    /// layers: it passes no snapshot labels for others, so they cannot be pulled lazily.
    pub layer_media_type: String,
    /// Compress each chunk on the wire: `Some(level)` pushes each layer as one zstd
    /// frame per chunk at this level plus a seek table, under the `+zstd` form of
    /// `layer_media_type` ([`crate::zstd_chunks`]); `None` pushes the image as it is.
    pub chunk_zstd_level: Option<i32>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            chunk_size: 128 << 10,
            prefetch_paths: Vec::new(),
            work_dir: None,
            layer: layer_convert::Options {
                // Inline tails would put file data between the inodes, spreading the
                // inodes a start looks up over many more chunks to fetch.
                inline_data: false,
                ..layer_convert::Options::from_env()
            },
            progress: false,
            layer_media_type: EROFS_LAYER_MEDIA_TYPE.to_string(),
            chunk_zstd_level: None,
        }
    }
}

/// One layer of the converted image.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertedLayer {
    /// The source layer's digest and media type.
    pub source_digest: String,
    pub source_media_type: String,
    pub source_size: u64,
    /// The pushed blob (the EROFS image, or its compressed chunks).
    pub digest: String,
    pub size: u64,
    /// The EROFS image (the layer's diffID): the blob itself unless its chunks are compressed.
    pub uncompressed_digest: String,
    pub uncompressed_size: u64,
    /// Where file data starts (bytes before it are metadata).
    pub data_offset: u64,
    /// Verification chunks.
    pub chunks: u64,
    /// Prefetch list: chunk indexes, and the files they came from.
    pub prefetch_chunks: Vec<u32>,
    pub prefetch_files: Vec<String>,
    /// Seconds spent converting (pull included: they are one stream).
    pub convert_seconds: f64,
    /// "uploaded", "existed" or "kept" (already EROFS-native).
    pub push: String,
}

/// What [`convert_image`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertReport {
    /// The source, pinned to the manifest digest converted.
    pub source: String,
    /// The target reference and the digest of the pushed manifest.
    pub target: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub layers: Vec<ConvertedLayer>,
    pub seconds: f64,
}

/// An image as read from its registry: the manifest (an index resolved to this host's
/// platform), its config and layers, and a config whose diffIDs match the layers.
pub(crate) struct SourceImage {
    /// The platform manifest's bytes and media type (what a `subject` names).
    pub manifest: registry::RawManifest,
    pub layers: Vec<Descriptor>,
    pub config: Value,
}

/// Reads `src`'s manifest (resolving an index to this host's platform) and config.
pub(crate) fn read_image(client: &Client, src: &Reference) -> Result<SourceImage, Error> {
    let mut manifest = client.get_manifest(src)?;
    if registry::is_index(&manifest.media_type) {
        let d = registry::resolve_platform(&manifest.bytes, "linux", registry::host_arch())?
            .ok_or_else(|| Error::Invalid(format!("{src}: the index has no linux/{} image", registry::host_arch())))?;
        manifest = client.get_manifest(&src.with_digest(&d.digest)?)?;
    }
    let m: Value = serde_json::from_slice(&manifest.bytes)
        .map_err(|e| Error::Invalid(format!("{src}: manifest is not JSON: {e}")))?;
    let config_desc: Descriptor = serde_json::from_value(m["config"].clone())
        .map_err(|e| Error::Invalid(format!("{src}: manifest config: {e}")))?;
    let layers: Vec<Descriptor> = serde_json::from_value(m["layers"].clone())
        .map_err(|e| Error::Invalid(format!("{src}: manifest layers: {e}")))?;
    let mut config = Vec::new();
    client
        .get_blob(src.repo(), &config_desc.digest)?
        .take(64 << 20)
        .read_to_end(&mut config)?;
    let config: Value =
        serde_json::from_slice(&config).map_err(|e| Error::Invalid(format!("{src}: config is not JSON: {e}")))?;
    let diff_ids = config["rootfs"]["diff_ids"].as_array().map_or(0, Vec::len);
    if diff_ids != layers.len() {
        return Err(Error::Invalid(format!(
            "{src}: {} layers but {diff_ids} diff_ids in the config",
            layers.len()
        )));
    }
    Ok(SourceImage {
        manifest,
        layers,
        config,
    })
}

/// Where layers are written until they are pushed: a new directory in `dir` (or $TMPDIR),
/// removed with everything in it when dropped.
pub(crate) fn work_dir(dir: Option<&std::path::Path>) -> io::Result<tempfile::TempDir> {
    match dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
}

/// One progress bar a layer, on stderr when `progress`, else hidden.
pub(crate) fn progress_bars(progress: bool) -> (MultiProgress, ProgressStyle) {
    let bars = MultiProgress::with_draw_target(if progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template("{prefix:>10} {bar:30} {bytes:>10}/{total_bytes:10} {msg}")
        .expect("a valid template");
    (bars, style)
}

/// Converts `src` (a manifest, or an index resolved to this host's platform) into
/// an image of EROFS-native layers pushed as `dst`.
pub fn convert_image(
    client: &Client,
    src: &Reference,
    dst: &Reference,
    opts: &ConvertOptions,
) -> Result<ConvertReport, Error> {
    let started = Instant::now();
    if !opts.chunk_size.is_power_of_two() || !(4096..=(1 << 30)).contains(&opts.chunk_size) {
        return Err(Error::Invalid(format!(
            "chunk size {} is not a power of two from 4 KiB to 1 GiB",
            opts.chunk_size
        )));
    }
    if !annotations::is_erofs_native(&opts.layer_media_type) {
        return Err(Error::Invalid(format!(
            "{} is not an EROFS-native layer media type",
            opts.layer_media_type
        )));
    }
    if let Some(level) = opts.chunk_zstd_level {
        let range = crate::zstd_chunks::level_range();
        if !range.contains(&level) {
            return Err(Error::Invalid(format!(
                "zstd level {level} is not in {}..={}",
                range.start(),
                range.end()
            )));
        }
    }
    let SourceImage {
        manifest,
        layers,
        config,
        ..
    } = read_image(client, src)?;
    let m: Value = serde_json::from_slice(&manifest.bytes)
        .map_err(|e| Error::Invalid(format!("{src}: manifest is not JSON: {e}")))?;
    let mut config = config;
    let src_repo = src.repo();
    let dst_repo = dst.repo();
    let work = work_dir(opts.work_dir.as_deref())?;
    let (bars, style) = progress_bars(opts.progress);

    let mut converted = Vec::new();
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    // Each layer's image, opened once, bottom first: the lowers of the layers above it.
    let mut below: Vec<std::sync::Arc<dyn layer_convert::LowerLayer>> = Vec::new();
    for (index, layer) in layers.iter().enumerate() {
        let bar = bars.add(ProgressBar::new(layer.size).with_style(style.clone()));
        bar.set_prefix(format!("layer {}/{}", index + 1, layers.len()));
        let path = work.path().join(format!("layer-{index}.erofs"));
        let t = Instant::now();
        let native = annotations::is_erofs_native(&layer.media_type);
        let (data_offset, kept) = if native || annotations::is_erofs_zstd(&layer.media_type) {
            bar.set_message("copying (already EROFS)");
            let mut blob = client.get_blob(src_repo, &layer.digest)?;
            let mut out = File::create(&path)?;
            if native {
                io::copy(&mut bar.wrap_read(&mut blob), &mut out)?;
            } else {
                // Compressed (chunk frames or one stream, either decodes in one pass):
                // the image is what gets hashed, compressed again or not, and pushed.
                let limit = opts.layer.max_size;
                let mut dec = zstd::stream::read::Decoder::new(bar.wrap_read(&mut blob))?.take(limit + 1);
                if io::copy(&mut dec, &mut out)? > limit {
                    return Err(Error::Invalid(format!(
                        "layer {index}: {} decompresses to more than {limit} bytes",
                        layer.digest
                    )));
                }
            }
            // Unknown layout: all of it counts as metadata, fetched before the mount.
            let offset = LazyLayer::from_descriptor(layer).map_or(layer.size, |l| l.data_offset);
            (offset, true)
        } else {
            bar.set_message("converting");
            let blob = client.get_blob(src_repo, &layer.digest)?;
            let mut lopts = opts.layer.clone();
            lopts.media_type = Some(layer.media_type.clone());
            lopts.meta_first = true;
            // The layers converted so far are this one's lowers, nearest first: its implied
            // directories keep the attributes they show (see layer_convert::Lowers).
            lopts.lowers = layer_convert::Lowers(below.iter().rev().cloned().collect());
            let progress = |n: u64| bar.set_position(n.min(layer.size));
            let report =
                layer_convert::convert(blob, &path, &lopts, Some(&progress)).map_err(|source| Error::Layer {
                    index,
                    digest: layer.digest.clone(),
                    source,
                })?;
            if report.input_digest != layer.digest {
                return Err(Error::Invalid(format!(
                    "layer {index}: read {} but the manifest names {}",
                    report.input_digest, layer.digest
                )));
            }
            (report.data_offset, false)
        };
        let convert_seconds = t.elapsed().as_secs_f64();
        bar.set_message("hashing");
        let (image_digest, image_size, chunk_digests) = hash_chunks(&path, opts.chunk_size)?;
        let (blob_path, digest, size, zstd) = match opts.chunk_zstd_level {
            None => (path.clone(), image_digest.clone(), image_size, None),
            Some(level) => {
                bar.set_message(format!("compressing (zstd {level})"));
                let zst = work.path().join(format!("layer-{index}.erofs.zst"));
                let c = crate::zstd_chunks::compress_chunks(&path, &zst, opts.chunk_size, level)?;
                if c.uncompressed_size != image_size {
                    return Err(Error::Invalid(format!(
                        "layer {index}: {} changed while it was compressed",
                        path.display()
                    )));
                }
                let zstd = annotations::ZstdChunks {
                    sizes: c.sizes,
                    uncompressed_size: image_size,
                    uncompressed_digest: image_digest.clone(),
                };
                (zst, c.digest, c.size, Some(zstd))
            }
        };
        bar.set_length(size);
        bar.set_position(0);
        bar.set_message("pushing");
        let push = client.push_blob(dst_repo, &digest, size, bar.wrap_read(File::open(&blob_path)?))?;
        if blob_path != path {
            // Only the image stays: the prefetch lists and the layers above read it.
            let _ = std::fs::remove_file(&blob_path);
        }
        bar.finish_with_message(format!("{digest:.19}… {size} bytes"));
        info!(index, source = %layer.digest, %digest, size, image_size, data_offset, "layer converted");
        converted.push((
            LazyLayer {
                digest: digest.clone(),
                size,
                data_offset,
                chunk_size: opts.chunk_size,
                chunk_digests,
                prefetch: Vec::new(),
                zstd,
            },
            ConvertedLayer {
                source_digest: layer.digest.clone(),
                source_media_type: layer.media_type.clone(),
                source_size: layer.size,
                digest,
                size,
                uncompressed_digest: image_digest,
                uncompressed_size: image_size,
                data_offset,
                chunks: image_size.div_ceil(opts.chunk_size),
                prefetch_chunks: Vec::new(),
                prefetch_files: Vec::new(),
                convert_seconds,
                push: if kept {
                    "kept".into()
                } else {
                    match push {
                        registry::BlobPush::Uploaded => "uploaded".into(),
                        _ => "existed".into(),
                    }
                },
            },
        ));
        match erofs::reader::Image::open(&path) {
            Ok(img) => below.push(std::sync::Arc::new(layer_convert::ImageLayer(img))),
            // A native layer our reader cannot open still converts; the layers above it then
            // see through it for their implied directories.
            Err(e) => tracing::warn!(index, error = %e, "layer not readable as a lower layer"),
        }
        files.push(path);
    }

    // A path's data is read from the topmost layer that has it.
    let mut claimed = HashSet::new();
    for i in (0..converted.len()).rev() {
        let wanted: Vec<crate::PrefetchEntry> = opts
            .prefetch_paths
            .iter()
            .filter(|e| !claimed.contains(&e.path))
            .cloned()
            .collect();
        if wanted.is_empty() {
            break;
        }
        let (chunks, found) = crate::prefetch_chunks(&files[i], &wanted, opts.chunk_size)
            .map_err(|e| Error::Invalid(format!("layer {i}: reading the converted image: {e}")))?;
        claimed.extend(found.iter().cloned());
        converted[i].0.prefetch = chunks.clone();
        converted[i].1.prefetch_chunks = chunks;
        converted[i].1.prefetch_files = found;
    }

    let new_layers: Vec<Value> = converted
        .iter()
        .zip(&layers)
        .map(|((lazy, _), src_layer)| {
            let mut a: BTreeMap<String, String> = src_layer.annotations.clone().unwrap_or_default();
            a.extend(lazy.annotations());
            a.insert(annotations::SOURCE_DIGEST.into(), src_layer.digest.clone());
            a.insert(annotations::SOURCE_MEDIA_TYPE.into(), src_layer.media_type.clone());
            json!({
                "mediaType": if lazy.zstd.is_some() {
                    zstd_media_type(&opts.layer_media_type)
                } else {
                    opts.layer_media_type.clone()
                },
                "digest": lazy.digest,
                "size": lazy.size,
                "annotations": a,
            })
        })
        .collect();
    // containerd checks each diffID against the digest Apply returns: the image's.
    config["rootfs"]["diff_ids"] = Value::Array(
        converted
            .iter()
            .map(|(l, _)| Value::String(l.image_digest().to_string()))
            .collect(),
    );
    let config_bytes = serde_json::to_vec(&config).map_err(|e| Error::Invalid(e.to_string()))?;
    let config_digest = registry::sha256_digest(&config_bytes);
    client.push_blob(dst_repo, &config_digest, config_bytes.len() as u64, &config_bytes[..])?;

    let mut annotations = match &m["annotations"] {
        Value::Object(o) => o.clone(),
        _ => serde_json::Map::new(),
    };
    annotations.insert(
        annotations::SOURCE_IMAGE.into(),
        Value::String(format!("{src_repo}@{}", manifest.digest)),
    );
    let new_manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": new_layers,
        "annotations": annotations,
    });
    let bytes = serde_json::to_vec_pretty(&new_manifest).map_err(|e| Error::Invalid(e.to_string()))?;
    let manifest_digest = client.put_manifest(dst, OCI_MANIFEST, &bytes)?;
    Ok(ConvertReport {
        source: format!("{src_repo}@{}", manifest.digest),
        target: dst.to_string(),
        manifest_digest,
        config_digest,
        layers: converted.into_iter().map(|(_, c)| c).collect(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The `+zstd` form of an EROFS layer media type (its parameters kept after it).
fn zstd_media_type(media_type: &str) -> String {
    match media_type.split_once(';') {
        Some((base, params)) => format!("{}+zstd;{params}", base.trim_end()),
        None => format!("{media_type}+zstd"),
    }
}

/// The blob's digest and size, and the sha256 of each `chunk`-sized piece.
fn hash_chunks(path: &std::path::Path, chunk: u64) -> io::Result<(String, u64, Vec<String>)> {
    let mut f = File::open(path)?;
    let mut whole = Sha256::new();
    let mut digests = Vec::new();
    let mut buf = vec![0u8; chunk as usize];
    let mut size = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        digests.push(hex::encode(Sha256::digest(&buf[..n])));
        size += n as u64;
        if n < buf.len() {
            break;
        }
    }
    Ok((format!("sha256:{}", hex::encode(whole.finalize())), size, digests))
}
