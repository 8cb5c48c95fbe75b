//! The lazy path's remote source: a Prepare carrying CRI's layer labels names an
//! EROFS-native layer of a converted image; its blob is registered with the fetch
//! daemon (`dedupd`) and mounted from the file the daemon serves.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use image_convert::annotations::{is_erofs_native, LazyLayer};
use registry::Descriptor;
use snapshotter::{Attached, RemoteLayer, RemoteLayers};

/// The layer's digest, as CRI labels a Prepare.
pub const LAYER_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.layer-digest";
/// The image reference being pulled.
pub const IMAGE_REF_LABEL: &str = "containerd.io/snapshot/cri.image-ref";
/// The digest of the (platform) manifest that lists the layer.
pub const MANIFEST_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.manifest-digest";

/// Lazy layers served through a fetch daemon.
pub struct Lazy {
    registry: registry::Client,
    fetch: fetch_api::Client,
    /// Layers of manifests read so far, by manifest digest (a pull asks once per layer).
    manifests: Mutex<HashMap<String, Arc<Vec<Descriptor>>>>,
}

impl Lazy {
    /// A source using the fetch daemon at `socket` and `registry` for manifests.
    pub fn new(socket: PathBuf, registry: registry::Client) -> Lazy {
        Lazy {
            registry,
            fetch: fetch_api::Client::new(socket).with_timeout(Duration::from_secs(30)),
            manifests: Mutex::new(HashMap::new()),
        }
    }

    fn layers(&self, image_ref: &str, manifest_digest: &str) -> Result<Arc<Vec<Descriptor>>, String> {
        if let Some(l) = self.manifests.lock().unwrap().get(manifest_digest) {
            return Ok(l.clone());
        }
        let reference = registry::Reference::parse(image_ref).map_err(|e| format!("image ref {image_ref:?}: {e}"))?;
        let pinned = reference.with_digest(manifest_digest).map_err(|e| e.to_string())?;
        // The registry client checks the bytes against the digest: the chunk table in
        // the annotations is as trusted as the manifest digest containerd resolved.
        let m = self
            .registry
            .get_manifest(&pinned)
            .map_err(|e| format!("fetching manifest {pinned}: {e}"))?;
        let v: serde_json::Value = serde_json::from_slice(&m.bytes).map_err(|e| format!("manifest {pinned}: {e}"))?;
        let layers: Vec<Descriptor> =
            serde_json::from_value(v["layers"].clone()).map_err(|e| format!("manifest {pinned} layers: {e}"))?;
        let layers = Arc::new(layers);
        self.manifests
            .lock()
            .unwrap()
            .insert(manifest_digest.to_string(), layers.clone());
        Ok(layers)
    }
}

impl RemoteLayers for Lazy {
    fn resolve(&self, labels: &BTreeMap<String, String>) -> Result<Option<RemoteLayer>, String> {
        let (Some(digest), Some(image_ref), Some(manifest)) = (
            labels.get(LAYER_DIGEST_LABEL),
            labels.get(IMAGE_REF_LABEL),
            labels.get(MANIFEST_DIGEST_LABEL),
        ) else {
            return Ok(None);
        };
        let layers = self.layers(image_ref, manifest)?;
        let desc = layers
            .iter()
            .find(|d| &d.digest == digest)
            .ok_or_else(|| format!("manifest {manifest} of {image_ref} has no layer {digest}"))?;
        if !is_erofs_native(&desc.media_type) {
            return Ok(None);
        }
        let lazy = match LazyLayer::from_descriptor(desc) {
            Ok(l) => l,
            Err(why) => {
                // An EROFS layer from another tool: containerd downloads it and our
                // differ keeps it as is.
                tracing::info!(%digest, why, "EROFS layer without a chunk table: not lazy");
                return Ok(None);
            }
        };
        let reference = registry::Reference::parse(image_ref).map_err(|e| e.to_string())?;
        let mut prefetch: Vec<u32> = lazy.metadata_chunks().collect();
        prefetch.extend(lazy.prefetch.iter().filter(|c| !lazy.metadata_chunks().contains(c)));
        let spec = fetch_api::BlobSpec {
            digest: lazy.digest.clone(),
            size: lazy.size,
            chunk_size: lazy.chunk_size,
            chunk_digests: lazy.chunk_digests,
            prefetch,
            source: fetch_api::Source {
                registry: reference.registry().to_string(),
                repository: reference.repository().to_string(),
            },
        };
        Ok(Some(RemoteLayer {
            digest: lazy.digest,
            size: lazy.size,
            spec: serde_json::to_value(&spec).map_err(|e| e.to_string())?,
        }))
    }

    fn attach(&self, layer: &RemoteLayer) -> std::io::Result<Attached> {
        let spec: fetch_api::BlobSpec = serde_json::from_value(layer.spec.clone()).map_err(std::io::Error::other)?;
        let reg = self.fetch.register(&spec).map_err(std::io::Error::other)?;
        let ping = self.fetch.ping().map_err(std::io::Error::other)?;
        Ok(Attached {
            path: PathBuf::from(reg.path),
            instance: ping.instance,
        })
    }

    fn instance(&self) -> Option<u64> {
        self.fetch.ping().ok().map(|p| p.instance)
    }

    fn detach(&self, layer: &RemoteLayer) {
        if let Err(e) = self.fetch.unregister(&layer.digest) {
            tracing::warn!(digest = %layer.digest, error = %e, "unregistering a lazy blob");
        }
    }
}
