//! The remote source of Prepare: a Prepare carrying CRI's layer labels names a layer
//! of an image in a registry.
//!
//! - An EROFS-native layer of a converted image (with a fetch daemon configured):
//!   its blob is registered with `dedupd` and mounted from the file the daemon
//!   serves (lazy pull).
//! - A `tar+gzip` / `tar+zstd` layer of an image with a tar index (`index-image`'s
//!   artifact, found among the manifest's OCI referrers): the layer's metadata is
//!   mounted from the index, with the uncompressed tar as its device, which `dedupd`
//!   serves from the unmodified layer blob (lazy pull, no converted copy).
//! - A tar layer (with `stream_layers`): the store downloads it itself and converts
//!   it as it arrives, so downloading, inflating and converting overlap instead of
//!   containerd downloading the whole blob before our Apply starts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use image_convert::annotations::{is_erofs_native, is_erofs_zstd, LazyLayer};
use registry::Descriptor;
use sha2::Digest as _;
use snapshotter::{Attached, RemoteLayer, RemoteLayers, StreamedLayer};

/// The layer's digest, as CRI labels a Prepare.
pub const LAYER_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.layer-digest";
/// The image reference being pulled.
pub const IMAGE_REF_LABEL: &str = "containerd.io/snapshot/cri.image-ref";
/// The digest of the (platform) manifest that lists the layer.
pub const MANIFEST_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.manifest-digest";

/// The layer digest, image reference and manifest digest CRI's labels name, if all are there.
fn cri_labels(labels: &BTreeMap<String, String>) -> Option<(&String, &String, &String)> {
    Some((
        labels.get(LAYER_DIGEST_LABEL)?,
        labels.get(IMAGE_REF_LABEL)?,
        labels.get(MANIFEST_DIGEST_LABEL)?,
    ))
}

/// Lazy layers served through a fetch daemon, and layers streamed from the registry.
pub struct Lazy {
    registry: registry::Client,
    /// The fetch daemon; `None`: no lazy layers.
    fetch: Option<fetch_api::Client>,
    /// Stream tar layers from the registry into the store.
    stream: bool,
    /// Layers of manifests read so far, by manifest digest (a pull asks once per layer).
    manifests: Mutex<HashMap<String, Arc<Vec<Descriptor>>>>,
    /// The diffIDs of image configs read so far, by manifest digest.
    diff_ids: Mutex<HashMap<String, Arc<Vec<String>>>>,
    /// Blobs whose image passed validation: the same digest is the same bytes, so a
    /// remount (after a fetch daemon restart) need not read the metadata again.
    validated: Mutex<HashSet<String>>,
    /// Where tar-index images and indexes are kept (`None`: tar indexes are not looked for).
    tar_index_dir: Option<PathBuf>,
    /// The tar-index artifact of each manifest looked up so far (`None`: it has none).
    artifacts: Mutex<HashMap<String, Option<Arc<Vec<Descriptor>>>>>,
}

impl Lazy {
    /// A source using the fetch daemon at `socket` (if any) and `registry` for
    /// manifests, and streaming tar layers when `stream` is set.
    pub fn new(socket: Option<PathBuf>, registry: registry::Client, stream: bool) -> Lazy {
        Lazy {
            registry,
            fetch: socket.map(|s| fetch_api::Client::new(s).with_timeout(Duration::from_secs(30))),
            stream,
            manifests: Mutex::new(HashMap::new()),
            diff_ids: Mutex::new(HashMap::new()),
            validated: Mutex::new(HashSet::new()),
            tar_index_dir: None,
            artifacts: Mutex::new(HashMap::new()),
        }
    }

    /// Also pulls lazily the gzip/zstd layers of images that have a tar index, keeping the
    /// indexes under `dir`.
    pub fn with_tar_index(mut self, dir: PathBuf) -> Lazy {
        self.tar_index_dir = Some(dir);
        self
    }

    fn fetch(&self) -> std::io::Result<&fetch_api::Client> {
        self.fetch
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no fetch daemon is configured"))
    }

    /// A manifest by digest, as JSON.
    fn manifest(&self, image_ref: &str, manifest_digest: &str) -> Result<serde_json::Value, String> {
        let reference = registry::Reference::parse(image_ref).map_err(|e| format!("image ref {image_ref:?}: {e}"))?;
        let pinned = reference.with_digest(manifest_digest).map_err(|e| e.to_string())?;
        // The registry client checks the bytes against the digest: what the manifest
        // says (the chunk table in the annotations, the config) is as trusted as the
        // manifest digest containerd resolved.
        let m = self
            .registry
            .get_manifest(&pinned)
            .map_err(|e| format!("fetching manifest {pinned}: {e}"))?;
        serde_json::from_slice(&m.bytes).map_err(|e| format!("manifest {pinned}: {e}"))
    }

    fn layers(&self, image_ref: &str, manifest_digest: &str) -> Result<Arc<Vec<Descriptor>>, String> {
        if let Some(l) = self.manifests.lock().unwrap().get(manifest_digest) {
            return Ok(l.clone());
        }
        let v = self.manifest(image_ref, manifest_digest)?;
        let layers: Vec<Descriptor> = serde_json::from_value(v["layers"].clone())
            .map_err(|e| format!("manifest {manifest_digest} layers: {e}"))?;
        let layers = Arc::new(layers);
        self.manifests
            .lock()
            .unwrap()
            .insert(manifest_digest.to_string(), layers.clone());
        Ok(layers)
    }

    /// The diffIDs of the manifest's image config, checked against streamed layers.
    fn diff_ids(&self, image_ref: &str, manifest_digest: &str) -> Result<Arc<Vec<String>>, String> {
        if let Some(d) = self.diff_ids.lock().unwrap().get(manifest_digest) {
            return Ok(d.clone());
        }
        let v = self.manifest(image_ref, manifest_digest)?;
        let config: Descriptor = serde_json::from_value(v["config"].clone())
            .map_err(|e| format!("manifest {manifest_digest} config: {e}"))?;
        let reference = registry::Reference::parse(image_ref).map_err(|e| e.to_string())?;
        let blob = self
            .registry
            .get_blob(reference.repo(), &config.digest)
            .map_err(|e| format!("fetching config {}: {e}", config.digest))?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(blob, 16 << 20), &mut bytes)
            .map_err(|e| format!("reading config {}: {e}", config.digest))?;
        let c: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("config {}: {e}", config.digest))?;
        let ids: Vec<String> = serde_json::from_value(c["rootfs"]["diff_ids"].clone())
            .map_err(|e| format!("config {} rootfs.diff_ids: {e}", config.digest))?;
        let ids = Arc::new(ids);
        self.diff_ids
            .lock()
            .unwrap()
            .insert(manifest_digest.to_string(), ids.clone());
        Ok(ids)
    }
}

/// What dedupd is asked to serve for a lazy layer: the EROFS image (uncompressed size and
/// chunk table), the metadata chunks first, then the layer's prefetch list; for a `+zstd`
/// layer, the frame sizes it fetches each chunk by.
fn blob_spec(lazy: LazyLayer, source: fetch_api::Source) -> fetch_api::BlobSpec {
    let mut prefetch: Vec<u32> = lazy.metadata_chunks().collect();
    prefetch.extend(lazy.prefetch.iter().filter(|c| !lazy.metadata_chunks().contains(c)));
    let compressed = lazy.zstd.as_ref().map(|z| fetch_api::ChunkCompression {
        algorithm: fetch_api::CompressionAlgorithm::Zstd,
        sizes: z.sizes.clone(),
        uncompressed_digest: z.uncompressed_digest.clone(),
        index: None,
    });
    fetch_api::BlobSpec {
        size: lazy.image_size(),
        digest: lazy.digest,
        chunk_size: lazy.chunk_size,
        chunk_digests: lazy.chunk_digests,
        prefetch,
        source,
        compressed,
    }
}

impl Lazy {
    fn complete_blob(&self, digest: &str) -> bool {
        self.fetch
            .as_ref()
            .and_then(|f| f.status(digest).ok())
            .is_some_and(|s| s.complete && s.verified)
    }
}

/// Reads the chunks a lazy layer's spec lists first from 0 on (`resolve` puts the chunks before the layer's
/// data offset there, in order), so that dedupd has fetched and verified them.
fn read_metadata_chunks(path: &std::path::Path, spec: &fetch_api::BlobSpec) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let leading = spec
        .prefetch
        .iter()
        .enumerate()
        .take_while(|&(i, &c)| c as usize == i)
        .count()
        .max(1) as u64;
    let end = (leading * spec.chunk_size).min(spec.size);
    let file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; (1 << 20).min(end as usize)];
    let mut off = 0;
    while off < end {
        let n = buf.len().min((end - off) as usize);
        file.read_exact_at(&mut buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

impl RemoteLayers for Lazy {
    fn resolve(&self, labels: &BTreeMap<String, String>) -> Result<Option<RemoteLayer>, String> {
        let Some((digest, image_ref, manifest)) = cri_labels(labels) else {
            return Ok(None);
        };
        let layers = self.layers(image_ref, manifest)?;
        let desc = layers
            .iter()
            .find(|d| &d.digest == digest)
            .ok_or_else(|| format!("manifest {manifest} of {image_ref} has no layer {digest}"))?;
        if self.fetch.is_none() {
            return Ok(None);
        }
        if let (Some(dir), Ok(_)) = (
            &self.tar_index_dir,
            image_convert::index::index_format(&desc.media_type),
        ) {
            let index = layers.iter().position(|d| &d.digest == digest).expect("found above");
            return match self.resolve_tar_index(dir, image_ref, manifest, desc, index) {
                Ok(found) => Ok(found),
                Err(why) => {
                    // Nothing is mounted yet: the layer is pulled in full, as without an index.
                    TAR_INDEX_REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(%digest, image = %image_ref, why, "tar index refused: pulling the layer in full");
                    Ok(None)
                }
            };
        }
        if !(is_erofs_native(&desc.media_type) || is_erofs_zstd(&desc.media_type)) {
            return Ok(None);
        }
        let lazy = match LazyLayer::from_descriptor(desc) {
            Ok(l) => l,
            Err(why) => {
                // An EROFS layer from another tool: containerd downloads it and our
                // differ keeps it as is (decompressing a `+zstd` one).
                tracing::info!(%digest, why, "EROFS layer without a chunk table: not lazy");
                return Ok(None);
            }
        };
        let reference = registry::Reference::parse(image_ref).map_err(|e| e.to_string())?;
        let source = fetch_api::Source {
            registry: reference.registry().to_string(),
            repository: reference.repository().to_string(),
        };
        let spec = blob_spec(lazy, source);
        Ok(Some(RemoteLayer {
            digest: spec.digest.clone(),
            size: spec.size,
            spec: serde_json::to_value(&spec).map_err(|e| e.to_string())?,
        }))
    }

    fn attach(&self, layer: &RemoteLayer) -> std::io::Result<Attached> {
        if let Ok(t) = serde_json::from_value::<TarIndexLayer>(layer.spec.clone()) {
            return self.attach_tar_index(t);
        }
        let spec: fetch_api::BlobSpec = serde_json::from_value(layer.spec.clone()).map_err(std::io::Error::other)?;
        let reg = self.fetch()?.register(&spec).map_err(std::io::Error::other)?;
        let path = PathBuf::from(reg.path);
        // EROFS reads its metadata (superblock, inodes, xattrs) through the backing file's page cache, not
        // through read(2): on dedupd's fanotify path such reads raise no event and would see the sparse file's
        // zeros. So every metadata chunk is made present here, by reading it, before the kernel mounts it.
        if let Err(e) = read_metadata_chunks(&path, &spec) {
            self.detach(layer);
            return Err(std::io::Error::new(
                e.kind(),
                format!("lazy EROFS layer {}: fetching its metadata: {e}", spec.digest),
            ));
        }
        if !self.validated.lock().unwrap().contains(&spec.digest) {
            // The image is untrusted input to the kernel: validated in full before it is
            // mounted. Every byte read here comes through the fetch daemon, which checks
            // each chunk against its digest from the manifest before serving it, so the
            // metadata is verified first and then validated, and the kernel later reads
            // the same verified bytes.
            if let Err(e) = erofs::validate_path(&path) {
                self.detach(layer);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("lazy EROFS layer {} refused: {e}", spec.digest),
                ));
            }
            self.validated.lock().unwrap().insert(spec.digest.clone());
        }
        let ping = self.fetch()?.ping().map_err(std::io::Error::other)?;
        let complete = ping.data_path == "fanotify" && self.complete_blob(&spec.digest);
        Ok(Attached {
            path,
            meta: None,
            instance: ping.instance,
            complete,
        })
    }

    fn instance(&self) -> Option<u64> {
        self.fetch.as_ref()?.ping().ok().map(|p| p.instance)
    }

    fn complete(&self, layer: &RemoteLayer) -> bool {
        // Only the fanotify path gains from a new mount: a FUSE file stays a FUSE file.
        let fanotify = self
            .fetch
            .as_ref()
            .and_then(|f| f.ping().ok())
            .is_some_and(|p| p.data_path == "fanotify");
        fanotify && self.complete_blob(&layer.digest)
    }

    fn detach(&self, layer: &RemoteLayer) {
        let Some(fetch) = &self.fetch else { return };
        if let Err(e) = fetch.unregister(&layer.digest) {
            tracing::warn!(digest = %layer.digest, error = %e, "unregistering a lazy blob");
        }
        if let Ok(t) = serde_json::from_value::<TarIndexLayer>(layer.spec.clone()) {
            for p in [&t.tar_index.meta, &t.tar_index.index] {
                if let Err(e) = std::fs::remove_file(p) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = %p.display(), error = %e, "removing a tar index");
                    }
                }
            }
        }
    }

    fn retain(&self, layers: &[RemoteLayer]) {
        let Some(dir) = &self.tar_index_dir else { return };
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let kept: HashSet<PathBuf> = layers
            .iter()
            .filter_map(|l| serde_json::from_value::<TarIndexLayer>(l.spec.clone()).ok())
            .flat_map(|t| [t.tar_index.meta, t.tar_index.index])
            .collect();
        for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
            if !kept.contains(&path) {
                tracing::info!(path = %path.display(), "removing a tar index no layer uses");
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "removing a tar index");
                }
            }
        }
    }

    fn stream(&self, labels: &BTreeMap<String, String>) -> Result<Option<StreamedLayer>, String> {
        if !self.stream {
            return Ok(None);
        }
        let Some((digest, image_ref, manifest)) = cri_labels(labels) else {
            return Ok(None);
        };
        let layers = self.layers(image_ref, manifest)?;
        let Some(index) = layers.iter().position(|d| &d.digest == digest) else {
            return Err(format!("manifest {manifest} of {image_ref} has no layer {digest}"));
        };
        let desc = &layers[index];
        if layer_convert::Compression::from_media_type(&desc.media_type).is_err() {
            // Not a tar layer we convert (EROFS-native, encrypted, foreign): the
            // normal path decides.
            return Ok(None);
        }
        let diff_id = self.diff_ids(image_ref, manifest)?.get(index).cloned();
        if diff_id.is_none() {
            return Err(format!("config of {image_ref} has no diffID for layer {index}"));
        }
        let reference = registry::Reference::parse(image_ref).map_err(|e| e.to_string())?;
        let blob = self
            .registry
            .get_blob(reference.repo(), digest)
            .map_err(|e| format!("fetching layer {digest}: {e}"))?;
        tracing::info!(%digest, image = %image_ref, "streaming the layer from the registry");
        Ok(Some(StreamedLayer {
            digest: digest.clone(),
            size: desc.size,
            media_type: desc.media_type.clone(),
            diff_id,
            // The store checks the converter's digest of the input against `digest`
            // before it records anything.
            reader: Box::new(blob.into_unverified()),
        }))
    }
}

/// Tar indexes refused at Prepare (bad artifact, digests that disagree, a first chunk that
/// does not verify): each such layer was pulled in full.
pub static TAR_INDEX_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Largest bundle (one layer's tar-index image and index) fetched: far beyond what real
/// layers need (a few percent of the layer), small enough to hold in memory.
const MAX_BUNDLE: u64 = 256 << 20;

/// What the store keeps of a layer pulled through a tar index ([`RemoteLayer::spec`]): the
/// fetch daemon's spec without the index (which can be megabytes: it is read from its file
/// at attach time), and where the image and the index are.
#[derive(serde::Serialize, serde::Deserialize)]
struct TarIndexLayer {
    tar_index: TarIndexFiles,
    blob: fetch_api::BlobSpec,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TarIndexFiles {
    /// The tar-index EROFS image (metadata; the tar is its device).
    meta: PathBuf,
    /// The serialized [`tar_index::Index`].
    index: PathBuf,
}

/// `spec` with the index in `path` put back in.
fn with_index(mut spec: fetch_api::BlobSpec, path: &std::path::Path) -> std::io::Result<fetch_api::BlobSpec> {
    use base64::Engine as _;
    let bytes = std::fs::read(path)?;
    if let Some(c) = &mut spec.compressed {
        c.index = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    Ok(spec)
}

/// Writes `bytes` to `path` through a temporary file and a rename: a crash leaves the old
/// file or the new one, never half of one.
fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
}

impl Lazy {
    /// The bundle descriptors of the tar-index artifact of `manifest_digest`, if it has one:
    /// found among the manifest's referrers (the registry's referrers API or the referrers
    /// tag), fetched by digest, and used only if its subject is that manifest.
    fn tar_index_artifact(
        &self,
        image_ref: &str,
        manifest_digest: &str,
    ) -> Result<Option<Arc<Vec<Descriptor>>>, String> {
        if let Some(a) = self.artifacts.lock().unwrap().get(manifest_digest) {
            return Ok(a.clone());
        }
        use image_convert::index::TARINDEX_ARTIFACT_TYPE;
        let reference = registry::Reference::parse(image_ref).map_err(|e| format!("image ref {image_ref:?}: {e}"))?;
        let referrers = match self
            .registry
            .referrers(reference.repo(), manifest_digest, Some(TARINDEX_ARTIFACT_TYPE))
        {
            Ok(r) => r,
            Err(e) => {
                // Asked once per manifest, not once per layer: a registry that cannot say is one
                // without tar indexes, and the layers take the normal path.
                tracing::warn!(manifest = %manifest_digest, error = %e, "cannot list the manifest's referrers: no tar index");
                Vec::new()
            }
        };
        let mut found = None;
        for r in referrers {
            let pinned = reference.with_digest(&r.digest).map_err(|e| e.to_string())?;
            let v: serde_json::Value = match self
                .registry
                .get_manifest(&pinned)
                .map_err(|e| e.to_string())
                .and_then(|m| serde_json::from_slice(&m.bytes).map_err(|e| e.to_string()))
            {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(artifact = %r.digest, error = %e, "tar index artifact unreadable: ignored");
                    continue;
                }
            };
            if v["subject"]["digest"].as_str() != Some(manifest_digest) {
                tracing::warn!(artifact = %r.digest, subject = %v["subject"]["digest"], manifest = %manifest_digest,
                    "tar index artifact of another manifest: ignored");
                continue;
            }
            if v["artifactType"].as_str() != Some(TARINDEX_ARTIFACT_TYPE) {
                continue;
            }
            match serde_json::from_value::<Vec<Descriptor>>(v["layers"].clone()) {
                Ok(l) => {
                    tracing::info!(artifact = %r.digest, manifest = %manifest_digest, layers = l.len(), "tar index found");
                    found = Some(Arc::new(l));
                    break;
                }
                Err(e) => {
                    tracing::warn!(artifact = %r.digest, error = %e, "tar index artifact without layers: ignored")
                }
            }
        }
        self.artifacts
            .lock()
            .unwrap()
            .insert(manifest_digest.to_string(), found.clone());
        Ok(found)
    }

    /// The lazy layer of a gzip/zstd layer `desc` (the `index`-th of the manifest) through
    /// the image's tar index; `None` when the image or this layer has none. Every check is
    /// made here, before anything is mounted: the bundle's digest (the registry client
    /// verifies it), its index against the layer digest, size and the config's diffID, the
    /// EROFS image in full, and the first chunk fetched from the layer blob and decoded
    /// against its digest. An error makes the caller pull the layer in full.
    fn resolve_tar_index(
        &self,
        dir: &std::path::Path,
        image_ref: &str,
        manifest: &str,
        desc: &Descriptor,
        index: usize,
    ) -> Result<Option<RemoteLayer>, String> {
        use image_convert::index::{Bundle, ANNOTATION_LAYER_DIGEST, TARINDEX_LAYER_MEDIA_TYPE};
        use std::io::Read as _;
        let Some(bundles) = self.tar_index_artifact(image_ref, manifest)? else {
            return Ok(None);
        };
        let Some(b) = bundles.iter().find(|b| {
            b.media_type == TARINDEX_LAYER_MEDIA_TYPE
                && b.annotations.as_ref().and_then(|a| a.get(ANNOTATION_LAYER_DIGEST)) == Some(&desc.digest)
        }) else {
            tracing::info!(digest = %desc.digest, "the tar index has no entry for this layer: pulled in full");
            return Ok(None);
        };
        if b.size > MAX_BUNDLE {
            return Err(format!("tar index bundle {} of {} bytes", b.digest, b.size));
        }
        let hex = desc
            .digest
            .strip_prefix("sha256:")
            .filter(|h| fetch_api::is_sha256_hex(h))
            .ok_or_else(|| format!("layer digest {:?} is not sha256", desc.digest))?;
        let reference = registry::Reference::parse(image_ref).map_err(|e| e.to_string())?;
        let mut bytes = Vec::new();
        self.registry
            .get_blob(reference.repo(), &b.digest)
            .map_err(|e| format!("fetching tar index bundle {}: {e}", b.digest))?
            .take(b.size + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("reading tar index bundle {}: {e}", b.digest))?;
        if bytes.len() as u64 != b.size {
            return Err(format!(
                "tar index bundle {} is {} bytes, not {}",
                b.digest,
                bytes.len(),
                b.size
            ));
        }
        let bundle = Bundle::from_bytes(&bytes).map_err(|e| format!("tar index bundle {}: {e}", b.digest))?;
        drop(bytes);
        let ix = &bundle.index;
        let diff_id = self
            .diff_ids(image_ref, manifest)?
            .get(index)
            .cloned()
            .ok_or_else(|| format!("config of {image_ref} has no diffID for layer {index}"))?;
        let sha = |d: &[u8; 32]| format!("sha256:{}", hex::encode(d));
        if sha(&ix.compressed_digest) != desc.digest || ix.compressed_size != desc.size {
            return Err(format!(
                "the tar index was made from {} ({} bytes), not this layer",
                sha(&ix.compressed_digest),
                ix.compressed_size
            ));
        }
        if sha(&ix.uncompressed_digest) != diff_id {
            return Err(format!(
                "the tar index is of a tar {} but the config's diffID is {diff_id}",
                sha(&ix.uncompressed_digest)
            ));
        }
        // The first chunk, fetched from the layer blob and checked now: an index whose
        // checkpoints do not fit the blob is found before anything is mounted.
        let (start, end) = ix.fetch_range(0);
        if ix.chunk_count() > 0 {
            let raw = self
                .registry
                .get_blob_range(reference.repo(), &desc.digest, start, end - start)
                .map_err(|e| format!("fetching the first chunk of {}: {e}", desc.digest))?;
            let chunk = ix
                .decode_chunk(0, &raw)
                .map_err(|e| format!("the first chunk of {} does not decode: {e}", desc.digest))?;
            if sha2::Sha256::digest(&chunk)[..] != ix.chunk_digests[0][..] {
                return Err(format!("the first chunk of {} does not match its digest", desc.digest));
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let files = TarIndexFiles {
            meta: dir.join(format!("{hex}.erofs")),
            index: dir.join(format!("{hex}.index")),
        };
        let written = write_atomic(&files.meta, &bundle.meta)
            .and_then(|()| write_atomic(&files.index, &ix.to_bytes()))
            .map_err(|e| format!("keeping the tar index in {}: {e}", dir.display()));
        let remove = || {
            let _ = std::fs::remove_file(&files.meta);
            let _ = std::fs::remove_file(&files.index);
        };
        if let Err(e) = written {
            remove();
            return Err(e);
        }
        // Untrusted input to the kernel: validated in full, and its one device must be the
        // tar the index serves. The validator bounds chunk addresses by the devices' sizes,
        // read nothing from them: a sparse file of the tar's size stands in for the tar.
        let stand_in = dir.join(format!("{hex}.device-check"));
        let checked = std::fs::File::create(&stand_in)
            .and_then(|f| f.set_len(ix.uncompressed_size))
            .map_err(|e| format!("{}: {e}", stand_in.display()))
            .and_then(|()| {
                erofs::reader::Image::open_with_devices(&files.meta, std::slice::from_ref(&stand_in))
                    .map_err(|e| format!("tar-index image refused: {e}"))
            })
            .and_then(|img| {
                img.validate().map_err(|e| format!("tar-index image refused: {e}"))?;
                let devices = img.devices();
                let blocks = ix.uncompressed_size.div_ceil(512);
                match devices.as_slice() {
                    [d] if u64::from(d.blocks) == blocks && img.superblock().blkszbits == 9 => Ok(()),
                    _ => Err(format!(
                        "tar-index image must have 512-byte blocks and one device of {blocks} blocks (the tar)"
                    )),
                }
            });
        let _ = std::fs::remove_file(&stand_in);
        if let Err(e) = checked {
            remove();
            return Err(e);
        }
        let source = fetch_api::Source {
            registry: reference.registry().to_string(),
            repository: reference.repository().to_string(),
        };
        let blob = fetch_api::BlobSpec {
            digest: desc.digest.clone(),
            size: ix.uncompressed_size,
            chunk_size: ix.chunk_size,
            chunk_digests: ix.chunk_digests.iter().map(hex::encode).collect(),
            prefetch: Vec::new(),
            source,
            compressed: Some(fetch_api::ChunkCompression {
                algorithm: fetch_api::CompressionAlgorithm::TarIndex,
                sizes: Vec::new(),
                uncompressed_digest: diff_id,
                index: None,
            }),
        };
        let full = with_index(blob.clone(), &files.index).map_err(|e| e.to_string());
        if let Err(e) = full.and_then(|f| f.validate().map_err(|e| e.message)) {
            remove();
            return Err(e);
        }
        tracing::info!(digest = %desc.digest, chunks = ix.chunk_count(), checkpoints = ix.checkpoints(), "layer pulled lazily through its tar index");
        Ok(Some(RemoteLayer {
            digest: desc.digest.clone(),
            size: ix.uncompressed_size,
            spec: serde_json::to_value(TarIndexLayer { tar_index: files, blob }).map_err(|e| e.to_string())?,
        }))
    }

    fn attach_tar_index(&self, t: TarIndexLayer) -> std::io::Result<Attached> {
        let spec = with_index(t.blob, &t.tar_index.index)
            .map_err(|e| std::io::Error::new(e.kind(), format!("tar index {}: {e}", t.tar_index.index.display())))?;
        let reg = self.fetch()?.register(&spec).map_err(std::io::Error::other)?;
        let ping = self.fetch()?.ping().map_err(std::io::Error::other)?;
        let complete = ping.data_path == "fanotify" && self.complete_blob(&spec.digest);
        Ok(Attached {
            path: PathBuf::from(reg.path),
            meta: Some(t.tar_index.meta),
            instance: ping.instance,
            complete,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image_convert::annotations::{ZstdChunks, OCI_EROFS_ZSTD_LAYER_MEDIA_TYPE};

    #[test]
    fn start_up_keeps_only_the_tar_indexes_of_recorded_layers() {
        let dir = tempfile::tempdir().unwrap();
        let ti = dir.path().join("tarindex");
        std::fs::create_dir(&ti).unwrap();
        let names = [
            "a.erofs",
            "a.index",
            "b.erofs",
            "b.index",
            "c.erofs.tmp-12",
            "d.device-check",
        ];
        for n in names {
            std::fs::write(ti.join(n), b"x").unwrap();
        }
        let client = registry::Client::new(Default::default()).unwrap();
        let lazy = Lazy::new(None, client, false).with_tar_index(ti.clone());
        let blob = fetch_api::BlobSpec {
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 1,
            chunk_size: 1,
            chunk_digests: vec!["0".repeat(64)],
            prefetch: vec![],
            source: fetch_api::Source {
                registry: "127.0.0.1:5000".into(),
                repository: "app".into(),
            },
            compressed: None,
        };
        let layer = RemoteLayer {
            digest: blob.digest.clone(),
            size: 1,
            spec: serde_json::to_value(TarIndexLayer {
                tar_index: TarIndexFiles {
                    meta: ti.join("a.erofs"),
                    index: ti.join("a.index"),
                },
                blob: blob.clone(),
            })
            .unwrap(),
        };
        // A converted image's lazy layer has no tar index: it keeps nothing.
        let native = RemoteLayer {
            digest: blob.digest.clone(),
            size: 1,
            spec: serde_json::to_value(&blob).unwrap(),
        };
        lazy.retain(&[layer, native]);
        let mut left: Vec<String> = std::fs::read_dir(&ti)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["a.erofs", "a.index"]);
    }

    #[test]
    fn compressed_layers_are_served_uncompressed() {
        // What convert-image annotates: 3 chunks of an image of 2.5 chunks, metadata in
        // the first one, chunk 2 prefetched; 3 frames in a blob of 5000 bytes.
        let lazy = LazyLayer {
            digest: format!("sha256:{}", "ab".repeat(32)),
            size: 5000,
            data_offset: 4096,
            chunk_size: 4096,
            chunk_digests: (0..3).map(|i| format!("{i:02x}").repeat(32)).collect(),
            prefetch: vec![2, 0],
            zstd: Some(ZstdChunks {
                sizes: vec![1500, 3000, 300],
                uncompressed_size: 10240,
                uncompressed_digest: format!("sha256:{}", "cd".repeat(32)),
            }),
        };
        let desc = Descriptor {
            media_type: OCI_EROFS_ZSTD_LAYER_MEDIA_TYPE.into(),
            digest: lazy.digest.clone(),
            size: lazy.size,
            platform: None,
            annotations: Some(lazy.annotations()),
            artifact_type: None,
        };
        let lazy = LazyLayer::from_descriptor(&desc).unwrap();
        let source = fetch_api::Source {
            registry: "127.0.0.1:5000".into(),
            repository: "app".into(),
        };
        let spec = blob_spec(lazy.clone(), source.clone());
        spec.validate().unwrap();
        assert_eq!(spec.digest, lazy.digest, "fetched and named by the registry blob");
        assert_eq!(spec.size, 10240, "the cache file is the image");
        assert_eq!(spec.content_digest(), format!("sha256:{}", "cd".repeat(32)));
        assert_eq!(spec.prefetch, vec![0, 2]);
        assert_eq!(spec.fetch_ranges(), vec![(0, 1500), (1500, 4500), (4500, 4800)]);

        // A plain layer: no compression, the blob is the image.
        let plain = LazyLayer {
            zstd: None,
            size: 10240,
            ..lazy
        };
        let spec = blob_spec(plain, source);
        spec.validate().unwrap();
        assert!(spec.compressed.is_none());
        assert_eq!(spec.size, 10240);
        assert_eq!(spec.content_digest(), spec.digest);
    }
}
