//! `dedup-snapshotter pull`: containerd's client-side pull and unpack, with the
//! snapshot labels CRI passes, for people who use `ctr` or nerdctl.
//!
//! `ctr images pull` and nerdctl never label a Prepare with the layer's digest and
//! image, so a snapshotter cannot mount a layer before it is downloaded: the layers
//! of a `convert-image`d image are then fetched in full. This command does what
//! containerd's unpacker does (one Prepare per layer, chained by chain ID; fetch,
//! Apply and Commit where the snapshotter did not prepare the layer itself), talking
//! to containerd's own services, so the image, its content and its snapshots are
//! containerd's as after any pull: `ctr run --snapshotter dedup IMAGE` uses them.
//!
//! Written against containerd's gRPC API rather than by shelling out to `ctr`:
//! `ctr` cannot set the labels, and the same code path must work on 1.6 to 2.x.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use containerd_client::services::v1 as pb;
use containerd_client::services::v1::snapshots as sn;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request};
use containerd_client::types as pbt;
use differ::content::rfc3339;
use differ::{CallContext, ContentStore};
use registry::{Descriptor, Reference};
use sha2::{Digest, Sha256};

use crate::lazy::{IMAGE_REF_LABEL, LAYER_DIGEST_LABEL, MANIFEST_DIGEST_LABEL};

/// The layers from this one to the top, as CRI passes them (stargz and nydus read it).
const IMAGE_LAYERS_LABEL: &str = "containerd.io/snapshot/cri.image-layers";
/// The committed snapshot a Prepare aims at; a snapshotter that can make it itself
/// answers AlreadyExists and containerd skips the download.
const TARGET_REF_LABEL: &str = "containerd.io/snapshot.ref";
/// containerd's limit on one label's key plus value.
const MAX_LABEL: usize = 4096;

/// What `pull` is asked to do.
#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// containerd's socket.
    #[arg(long, short = 'a', default_value = "/run/containerd/containerd.sock")]
    pub address: PathBuf,
    /// containerd namespace.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// The snapshotter, as named in containerd's config (`proxy_plugins.NAME`).
    #[arg(long, default_value = "dedup")]
    pub snapshotter: String,
    /// Also use plain HTTP for this registry host (loopback always does).
    #[arg(long)]
    pub plain_http: Vec<String>,
    /// Docker config file with registry credentials (default: $DOCKER_CONFIG or ~/.docker).
    #[arg(long)]
    pub docker_config: Option<PathBuf>,
    /// containerd's registry host configuration directory: DIR/<registry>/hosts.toml names mirrors
    /// (tried first, in order), CAs and client certificates, as containerd reads it.
    #[arg(long, default_value = registry::hosts::DEFAULT_HOSTS_DIR)]
    pub hosts_dir: PathBuf,
    /// Seconds to wait for a connection to a registry host before the next one is tried.
    #[arg(long, default_value_t = 5)]
    pub connect_timeout_secs: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The image (`registry/name:tag` or `…@sha256:…`).
    pub image: String,
}

/// What one pull did.
#[derive(Debug, serde::Serialize)]
struct Report {
    image: String,
    target: String,
    manifest: String,
    /// Layers the snapshotter prepared itself (lazy): not downloaded.
    lazy: usize,
    /// Layers downloaded and applied through containerd's Diff service.
    unpacked: usize,
    /// Layers whose snapshot already existed.
    present: usize,
    seconds: f64,
}

/// Pulls `a.image` into containerd and unpacks it for `a.snapshotter`.
pub fn pull(a: PullArgs) -> Result<()> {
    let mut copts = registry::ClientOptions {
        docker_config: a.docker_config.clone(),
        hosts_dir: Some(a.hosts_dir.clone()),
        connect_timeout: std::time::Duration::from_secs(a.connect_timeout_secs.max(1)),
        ..Default::default()
    };
    copts.plain_http.extend(a.plain_http.iter().cloned());
    let registry = registry::Client::new(copts)?;
    let reference = Reference::parse(&a.image).with_context(|| format!("image {}", a.image))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(Puller::run(&a, registry, reference))?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{}: {} layers lazy, {} unpacked, {} already present ({:.2}s)",
            report.image, report.lazy, report.unpacked, report.present, report.seconds
        );
    }
    Ok(())
}

/// The image as the registry describes it.
struct Resolved {
    /// The name containerd records (the reference as given, normalized).
    name: String,
    /// The index, when the reference names one, then the platform's manifest.
    index: Option<(Descriptor, Vec<u8>)>,
    manifest: (Descriptor, Vec<u8>),
    config: (Descriptor, Vec<u8>),
    layers: Vec<Descriptor>,
    diff_ids: Vec<String>,
}

struct Puller {
    ctx: CallContext,
    channel: Channel,
    snapshotter: String,
    content: ContentStore,
}

impl Puller {
    async fn run(a: &PullArgs, registry: registry::Client, reference: Reference) -> Result<Report> {
        let started = Instant::now();
        let registry = std::sync::Arc::new(registry);
        let resolved = {
            let (r, reg) = (reference.clone(), registry.clone());
            tokio::task::spawn_blocking(move || resolve(&reg, &r)).await??
        };
        let channel = containerd_client::connect(&a.address)
            .await
            .with_context(|| format!("connecting to containerd at {}", a.address.display()))?;
        let mut p = Puller {
            ctx: CallContext {
                namespace: a.namespace.clone(),
                lease: None,
            },
            channel,
            snapshotter: a.snapshotter.clone(),
            content: ContentStore::new(&a.address),
        };
        // Everything written before the image record exists is held by a lease that
        // expires on its own if this process dies.
        let lease = p.create_lease().await?;
        p.ctx.lease = Some(lease.clone());
        let result = p.pull(&resolved, &reference, &registry).await;
        p.ctx.lease = None;
        if let Err(e) = p.delete_lease(&lease).await {
            tracing::warn!(lease, error = %e, "deleting the pull's lease (it expires in a day)");
        }
        let (lazy, unpacked, present) = result?;
        Ok(Report {
            image: resolved.name.clone(),
            target: resolved.index.as_ref().unwrap_or(&resolved.manifest).0.digest.clone(),
            manifest: resolved.manifest.0.digest.clone(),
            lazy,
            unpacked,
            present,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        if let Ok(v) = self.ctx.namespace.parse() {
            md.insert("containerd-namespace", v);
        }
        if let Some(Ok(v)) = self.ctx.lease.as_ref().map(|l| l.parse()) {
            md.insert("containerd-lease", v);
        }
        r
    }

    async fn create_lease(&self) -> Result<String> {
        let id = format!("dedup-pull-{}", nanos());
        let expire = SystemTime::now() + Duration::from_secs(24 * 3600);
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), rfc3339(expire))]);
        let mut c = pb::leases_client::LeasesClient::new(self.channel.clone());
        c.create(self.req(pb::CreateRequest { id: id.clone(), labels }))
            .await
            .context("creating a lease")?;
        Ok(id)
    }

    async fn delete_lease(&self, id: &str) -> Result<()> {
        let mut c = pb::leases_client::LeasesClient::new(self.channel.clone());
        c.delete(self.req(pb::DeleteRequest {
            id: id.to_string(),
            sync: false,
        }))
        .await?;
        Ok(())
    }

    /// Returns (lazy, unpacked, present) layer counts.
    async fn pull(
        &self,
        r: &Resolved,
        reference: &Reference,
        registry: &std::sync::Arc<registry::Client>,
    ) -> Result<(usize, usize, usize)> {
        let source = source_labels(reference);
        let chain = chain_ids(&r.diff_ids);

        // Layers first, the way containerd's unpacker goes: bottom up, each on its parent.
        let (mut lazy, mut unpacked, mut present) = (0, 0, 0);
        for (i, layer) in r.layers.iter().enumerate() {
            let parent = if i == 0 { "" } else { chain[i - 1].as_str() };
            if self.stat(&chain[i]).await? {
                present += 1;
                continue;
            }
            let key = format!("extract-{}-{}", nanos(), chain[i]);
            let mut labels = HashMap::from([
                (TARGET_REF_LABEL.to_string(), chain[i].clone()),
                (LAYER_DIGEST_LABEL.to_string(), layer.digest.clone()),
                (IMAGE_REF_LABEL.to_string(), r.name.clone()),
                (MANIFEST_DIGEST_LABEL.to_string(), r.manifest.0.digest.clone()),
            ]);
            if let Some(v) = image_layers(&r.layers[i..]) {
                labels.insert(IMAGE_LAYERS_LABEL.to_string(), v);
            }
            let mut ss = sn::snapshots_client::SnapshotsClient::new(self.channel.clone());
            let prepared = ss
                .prepare(self.req(sn::PrepareSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    key: key.clone(),
                    parent: parent.to_string(),
                    labels,
                }))
                .await;
            let mounts = match prepared {
                Ok(resp) => resp.into_inner().mounts,
                // The snapshotter made the layer's snapshot itself (mounted lazily).
                Err(s) if s.code() == Code::AlreadyExists => {
                    if !self.stat(&chain[i]).await? {
                        bail!(
                            "the snapshotter answered AlreadyExists for layer {} but has no snapshot {}",
                            layer.digest,
                            chain[i]
                        );
                    }
                    lazy += 1;
                    continue;
                }
                Err(s) => {
                    return Err(anyhow!(
                        "preparing the snapshot of layer {}: {}",
                        layer.digest,
                        s.message()
                    ))
                }
            };
            let applied = self
                .unpack(
                    layer,
                    &r.diff_ids[i],
                    &key,
                    &chain[i],
                    mounts,
                    reference,
                    registry,
                    &source,
                )
                .await;
            if let Err(e) = applied {
                let _ = ss
                    .remove(self.req(sn::RemoveSnapshotRequest {
                        snapshotter: self.snapshotter.clone(),
                        key,
                    }))
                    .await;
                return Err(e);
            }
            unpacked += 1;
        }

        // Then the image's own blobs, each naming what it holds so containerd's
        // garbage collector keeps the layers' content and the snapshot chain.
        let mut config_labels = source.clone();
        if let Some(top) = chain.last() {
            config_labels.insert(
                format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter),
                top.clone(),
            );
        }
        self.put(&r.config.0, &r.config.1, config_labels).await?;
        let mut m_labels = source.clone();
        m_labels.insert("containerd.io/gc.ref.content.config".into(), r.config.0.digest.clone());
        for (i, l) in r.layers.iter().enumerate() {
            m_labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), l.digest.clone());
        }
        self.put(&r.manifest.0, &r.manifest.1, m_labels).await?;
        if let Some((desc, bytes)) = &r.index {
            let mut labels = source.clone();
            labels.insert("containerd.io/gc.ref.content.m.0".into(), r.manifest.0.digest.clone());
            self.put(desc, bytes, labels).await?;
        }
        self.record_image(r).await?;
        Ok((lazy, unpacked, present))
    }

    async fn stat(&self, key: &str) -> Result<bool> {
        let mut ss = sn::snapshots_client::SnapshotsClient::new(self.channel.clone());
        match ss
            .stat(self.req(sn::StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(anyhow!("stat of snapshot {key}: {}", s.message())),
        }
    }

    /// Downloads the layer into the content store (unless it is there), has
    /// containerd's Diff service apply it onto `key`'s mounts, checks the diff ID
    /// and commits the snapshot as `name`.
    #[allow(clippy::too_many_arguments)]
    async fn unpack(
        &self,
        layer: &Descriptor,
        diff_id: &str,
        key: &str,
        name: &str,
        mounts: Vec<pbt::Mount>,
        reference: &Reference,
        registry: &std::sync::Arc<registry::Client>,
        source: &HashMap<String, String>,
    ) -> Result<()> {
        if !self.has_content(&layer.digest).await? {
            self.fetch(layer, reference, registry, source.clone()).await?;
        }
        let mut diff = pb::diff_client::DiffClient::new(self.channel.clone());
        let applied = diff
            .apply(self.req(pb::ApplyRequest {
                diff: Some(proto_descriptor(layer)),
                mounts,
                payloads: HashMap::new(),
                sync_fs: false,
            }))
            .await
            .map_err(|s| anyhow!("applying layer {}: {}", layer.digest, s.message()))?
            .into_inner()
            .applied
            .ok_or_else(|| anyhow!("applying layer {}: no descriptor returned", layer.digest))?;
        if applied.digest != diff_id {
            bail!(
                "layer {} unpacked to {}, but the image config says its diff ID is {diff_id}",
                layer.digest,
                applied.digest
            );
        }
        let mut ss = sn::snapshots_client::SnapshotsClient::new(self.channel.clone());
        ss.commit(self.req(sn::CommitSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            name: name.to_string(),
            key: key.to_string(),
            labels: HashMap::new(),
        }))
        .await
        .map_err(|s| anyhow!("committing the snapshot of layer {}: {}", layer.digest, s.message()))?;
        Ok(())
    }

    async fn has_content(&self, digest: &str) -> Result<bool> {
        let mut c = pb::content_client::ContentClient::new(self.channel.clone());
        match c
            .info(self.req(pb::InfoRequest {
                digest: digest.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(anyhow!("content info of {digest}: {}", s.message())),
        }
    }

    /// Streams a blob from the registry into the content store; the store checks
    /// the digest when it commits.
    async fn fetch(
        &self,
        desc: &Descriptor,
        reference: &Reference,
        registry: &std::sync::Arc<registry::Client>,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let (reg, repo, digest, size) = (
            registry.clone(),
            reference.repo().clone(),
            desc.digest.clone(),
            desc.size,
        );
        let reader = tokio::task::spawn_blocking(move || -> Result<()> {
            let mut blob = reg.get_blob(&repo, &digest)?;
            let mut total = 0u64;
            loop {
                let mut buf = vec![0u8; 1 << 20];
                // The last read checks the digest, so a corrupt download fails here.
                let n = blob.read(&mut buf).with_context(|| format!("downloading {digest}"))?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                if total > size {
                    bail!("blob {digest} is larger than the {size} bytes its descriptor says");
                }
                buf.truncate(n);
                if tx.blocking_send(buf).is_err() {
                    bail!("the content store stopped taking {digest}");
                }
            }
            drop(tx);
            let _ = done_tx.send((digest, total as i64, labels));
            Ok(())
        });
        let reference = format!("dedup-pull-{}", desc.digest);
        let written = self.content.write(&self.ctx, &reference, true, rx, done_rx).await;
        let read = reader.await?;
        read?;
        written.map_err(|e| anyhow!("storing layer {}: {e}", desc.digest))
    }

    /// Writes a small blob (manifest, config, index) with `labels`; an existing
    /// blob gets the labels.
    async fn put(&self, desc: &Descriptor, bytes: &[u8], labels: HashMap<String, String>) -> Result<()> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        tx.send(bytes.to_vec()).await.ok();
        drop(tx);
        let _ = done_tx.send((desc.digest.clone(), bytes.len() as i64, labels));
        let reference = format!("dedup-pull-{}", desc.digest);
        self.content
            .write(&self.ctx, &reference, true, rx, done_rx)
            .await
            .map_err(|e| anyhow!("storing {} {}: {e}", desc.media_type, desc.digest))
    }

    /// Creates the image record, or points an existing one at what was pulled.
    async fn record_image(&self, r: &Resolved) -> Result<()> {
        let target = r.index.as_ref().unwrap_or(&r.manifest).0.clone();
        let now = prost_types::Timestamp::from(SystemTime::now());
        let image = pb::Image {
            name: r.name.clone(),
            labels: HashMap::new(),
            target: Some(proto_descriptor(&target)),
            created_at: Some(now),
            updated_at: Some(now),
        };
        let mut c = pb::images_client::ImagesClient::new(self.channel.clone());
        match c
            .create(self.req(pb::CreateImageRequest {
                image: Some(image.clone()),
                source_date_epoch: None,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                c.update(self.req(pb::UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".into()],
                    }),
                    source_date_epoch: None,
                }))
                .await
                .map_err(|s| anyhow!("updating image {}: {}", r.name, s.message()))?;
                Ok(())
            }
            Err(s) => Err(anyhow!("creating image {}: {}", r.name, s.message())),
        }
    }
}

/// Reads the manifest (through an index, for this host's platform), the config and
/// its diff IDs.
fn resolve(client: &registry::Client, reference: &Reference) -> Result<Resolved> {
    let top = client.get_manifest(reference)?;
    let top_desc = Descriptor {
        media_type: top.media_type.clone(),
        digest: top.digest.clone(),
        size: top.bytes.len() as u64,
        platform: None,
        annotations: None,
        artifact_type: None,
    };
    let (index, manifest) = if registry::is_index(&top.media_type) {
        let entry = registry::resolve_platform(&top.bytes, "linux", registry::host_arch())?
            .ok_or_else(|| anyhow!("{reference}: the index has no linux/{} image", registry::host_arch()))?;
        let m = client.get_manifest(&reference.with_digest(&entry.digest)?)?;
        (Some((top_desc, top.bytes)), (entry, m.bytes))
    } else {
        (None, (top_desc, top.bytes))
    };
    #[derive(serde::Deserialize)]
    struct Manifest {
        config: Descriptor,
        layers: Vec<Descriptor>,
    }
    let m: Manifest =
        serde_json::from_slice(&manifest.1).with_context(|| format!("{reference}: manifest {}", manifest.0.digest))?;
    let mut config = Vec::new();
    client
        .get_blob(reference.repo(), &m.config.digest)?
        .take(registry_limit())
        .read_to_end(&mut config)
        .with_context(|| format!("{reference}: config {}", m.config.digest))?;
    let v: serde_json::Value = serde_json::from_slice(&config).with_context(|| format!("{reference}: config"))?;
    let diff_ids: Vec<String> = serde_json::from_value(v["rootfs"]["diff_ids"].clone())
        .with_context(|| format!("{reference}: config rootfs.diff_ids"))?;
    if diff_ids.len() != m.layers.len() {
        bail!(
            "{reference}: {} layers but {} diff IDs in the config",
            m.layers.len(),
            diff_ids.len()
        );
    }
    for d in &diff_ids {
        registry::validate_digest(d).with_context(|| format!("{reference}: diff ID {d}"))?;
    }
    let name = match reference.digest() {
        Some(d) if reference.tag().is_none() => format!("{}@{d}", reference.repo()),
        _ => format!("{}:{}", reference.repo(), reference.tag().unwrap_or("latest")),
    };
    Ok(Resolved {
        name,
        index,
        manifest,
        config: (m.config, config),
        layers: m.layers,
        diff_ids,
    })
}

/// An image config larger than this is not read (the registry client verifies
/// whatever it reads; this bounds memory).
fn registry_limit() -> u64 {
    16 << 20
}

/// The chain ID of each layer (OCI image spec): the first is its diff ID, each next
/// one `sha256(parent + " " + diff_id)`.
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let id = match out.last() {
            None => d.clone(),
            Some(parent) => format!("sha256:{}", hex::encode(Sha256::digest(format!("{parent} {d}")))),
        };
        out.push(id);
    }
    out
}

/// The comma-separated layer digests from this layer up, cut where the label
/// would pass containerd's size limit (as CRI does).
fn image_layers(layers: &[Descriptor]) -> Option<String> {
    let mut v = String::new();
    for l in layers {
        let add = l.digest.len() + usize::from(!v.is_empty());
        if IMAGE_LAYERS_LABEL.len() + v.len() + add > MAX_LABEL {
            break;
        }
        if !v.is_empty() {
            v.push(',');
        }
        v.push_str(&l.digest);
    }
    (!v.is_empty()).then_some(v)
}

/// `containerd.io/distribution.source.<registry>` = repository: where containerd
/// can fetch the blob again (it does for layers a lazy pull never downloaded).
fn source_labels(reference: &Reference) -> HashMap<String, String> {
    HashMap::from([(
        format!("containerd.io/distribution.source.{}", reference.registry()),
        reference.repository().to_string(),
    )])
}

fn proto_descriptor(d: &Descriptor) -> pbt::Descriptor {
    pbt::Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size as i64,
        annotations: d.annotations.clone().unwrap_or_default().into_iter().collect(),
    }
}

fn nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        let want = format!("sha256:{}", hex::encode(Sha256::digest(format!("{a} {b}"))));
        assert_eq!(ids[1], want);
    }

    #[test]
    fn image_layers_label_stays_under_the_limit() {
        let layers: Vec<Descriptor> = (0..200)
            .map(|i| Descriptor {
                media_type: String::new(),
                digest: format!("sha256:{i:064x}"),
                size: 0,
                platform: None,
                annotations: None,
                artifact_type: None,
            })
            .collect();
        let v = image_layers(&layers).unwrap();
        assert!(IMAGE_LAYERS_LABEL.len() + v.len() <= MAX_LABEL);
        // 71-byte digests joined by commas: 56 fit beside the 39-byte key, not 57.
        assert_eq!(v.split(',').count(), 56);
        assert_eq!(image_layers(&layers[..1]).unwrap(), layers[0].digest);
    }
}
