//! The differs' Apply and Compare.

use std::collections::HashMap;
use std::io::{self, Write};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use snapshotter::Mount;

use crate::content::CallContext;
use crate::{mounts, DiffError, Differ, Result};

/// An OCI descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Media type.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes.
    pub size: i64,
    /// Annotations.
    pub annotations: HashMap<String, String>,
}

/// What Apply returns: the uncompressed layer's descriptor (digest = diffID).
pub type Applied = Descriptor;

/// An Apply call.
#[derive(Debug, Clone, Default)]
pub struct ApplyRequest {
    /// The layer blob in containerd's content store.
    pub diff: Descriptor,
    /// Where to apply it.
    pub mounts: Vec<Mount>,
    /// The stream processors (by id) the caller sent payloads for; see `check_payloads`.
    pub payloads: Vec<String>,
}

/// A Diff (Compare) call.
#[derive(Debug, Clone, Default)]
pub struct CompareRequest {
    /// The lower side (the parent's view), possibly empty.
    pub left: Vec<Mount>,
    /// The upper side (the snapshot with changes).
    pub right: Vec<Mount>,
    /// Output media type; empty means tar+gzip.
    pub media_type: String,
    /// Content store ref; empty means a unique one.
    pub reference: String,
    /// Labels for the blob.
    pub labels: HashMap<String, String>,
    /// Clamp times to this (reproducible layers).
    pub source_date_epoch: Option<SystemTime>,
}

/// The plain OCI layer media type Apply reports (containerd's walking differ does).
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const UNCOMPRESSED_LABEL: &str = "containerd.io/uncompressed";

/// What a layer blob is.
enum Media {
    Tar(layer_convert::Compression),
    /// A native EROFS image; `zstd` when compressed as `+zstd`.
    Erofs {
        base: String,
        zstd: bool,
    },
}

fn classify(mt: &str) -> Result<Media> {
    let (base, suffix) = match mt.split_once('+') {
        Some((b, s)) => (b, Some(s)),
        None => (mt, None),
    };
    if base.starts_with("application/vnd.erofs.layer.v1") || base.ends_with(".erofs") {
        return match suffix {
            None => Ok(Media::Erofs {
                base: base.to_string(),
                zstd: false,
            }),
            Some("zstd") => Ok(Media::Erofs {
                base: base.to_string(),
                zstd: true,
            }),
            Some(s) => Err(DiffError::InvalidArgument(format!(
                "{mt}: EROFS layer compressed with {s:?} is not supported (only +zstd is)"
            ))),
        };
    }
    layer_convert::Compression::from_media_type(mt)
        .map(Media::Tar)
        // A type we do not read (`+encrypted`, a vendor's) may be one containerd's own
        // differ reads through a stream processor: let the next differ try.
        .map_err(|e| match e.kind {
            layer_convert::ErrorKind::Unsupported => DiffError::NotImplemented(e.to_string()),
            _ => DiffError::InvalidArgument(e.to_string()),
        })
}

/// Stream processors are containerd's (it runs them in its own differs). CRI sends
/// imgcrypt's decryption payloads with every layer it unpacks; those processors only
/// take `+encrypted` media types, which [`classify`] leaves to the next differ, so
/// their payloads are ignored. Any other processor's payload may be meant for this
/// layer: the next differ (containerd's walking, which runs processors) takes it.
fn check_payloads(req: &ApplyRequest) -> Result<()> {
    match req
        .payloads
        .iter()
        .find(|id| !id.starts_with("io.containerd.ocicrypt.decoder."))
    {
        None => Ok(()),
        Some(id) => Err(DiffError::NotImplemented(format!(
            "a payload for stream processor {id:?}: left to a differ that runs stream processors"
        ))),
    }
}

fn conv_err(e: layer_convert::Error) -> DiffError {
    match e.kind {
        layer_convert::ErrorKind::Io => DiffError::Internal(e.to_string()),
        _ => DiffError::InvalidArgument(e.to_string()),
    }
}

fn join_err(e: tokio::task::JoinError) -> DiffError {
    DiffError::Internal(format!("worker thread: {e}"))
}

fn check_blob(desc: &Descriptor, digest: &str, size: u64) -> Result<()> {
    if digest != desc.digest {
        return Err(DiffError::InvalidArgument(format!(
            "blob digest is {digest}, the descriptor says {}",
            desc.digest
        )));
    }
    if desc.size > 0 && size != desc.size as u64 {
        return Err(DiffError::InvalidArgument(format!(
            "blob size is {size}, the descriptor says {}",
            desc.size
        )));
    }
    Ok(())
}

/// Apply onto one of our active snapshots: the store converts (or, for a native
/// EROFS layer, copies) the blob into the snapshot's layer and verifies it.
pub(crate) async fn apply_erofs(d: &Differ, ctx: &CallContext, req: &ApplyRequest) -> Result<Applied> {
    let store = d.store.clone();
    let mounts = req.mounts.clone();
    let active = tokio::task::spawn_blocking(move || store.active_for_mounts(&mounts))
        .await
        .map_err(join_err)?
        .map_err(store_err)?;
    let Some(active) = active else {
        return Err(DiffError::NotImplemented(
            "the mounts are not a dedup-snapshotter active snapshot".into(),
        ));
    };
    check_payloads(req)?;
    let (format, media_type) = match classify(&req.diff.media_type)? {
        Media::Tar(_) => (snapshotter::LayerFormat::Tar, LAYER_TAR.to_string()),
        Media::Erofs { base, zstd } => (snapshotter::LayerFormat::Erofs { zstd }, base),
    };
    let reader = d.content.reader(ctx, &req.diff.digest).await?;
    let blob = snapshotter::LayerBlob {
        reader: Box::new(reader),
        format,
        media_type: req.diff.media_type.clone(),
        digest: req.diff.digest.clone(),
        size: (req.diff.size > 0).then_some(req.diff.size as u64),
        diff_id: None,
        max_size: d.max_size,
    };
    let store = d.store.clone();
    let applied = tokio::task::spawn_blocking(move || store.apply_layer(&active.key, blob))
        .await
        .map_err(join_err)?
        .map_err(store_err)?;
    Ok(Descriptor {
        media_type,
        digest: applied.digest,
        size: applied.size as i64,
        annotations: HashMap::new(),
    })
}

/// The differ's error for a store error, by kind.
fn store_err(e: snapshotter::Error) -> DiffError {
    match e {
        snapshotter::Error::NotFound(m) => DiffError::NotFound(m),
        snapshotter::Error::AlreadyExists(m) => DiffError::AlreadyExists(m),
        snapshotter::Error::FailedPrecondition(m) => DiffError::FailedPrecondition(m),
        snapshotter::Error::InvalidArgument(m) => DiffError::InvalidArgument(m),
        e @ (snapshotter::Error::Unavailable(_) | snapshotter::Error::Internal(_)) => {
            DiffError::Internal(e.to_string())
        }
    }
}

/// Apply onto any mounts: the upper dir of a single overlay mount directly (overlay
/// whiteouts), anything else mounted in a temporary directory (OCI whiteouts).
pub(crate) async fn apply_walking(d: &Differ, ctx: &CallContext, req: &ApplyRequest) -> Result<Applied> {
    check_payloads(req)?;
    let compression = match classify(&req.diff.media_type)? {
        Media::Tar(c) => c,
        Media::Erofs { .. } => {
            return Err(DiffError::NotImplemented(
                "a native EROFS layer needs an EROFS snapshot".into(),
            ));
        }
    };
    let blob = d.content.reader(ctx, &req.diff.digest).await?;
    let desc = req.diff.clone();
    let mounts = req.mounts.clone();
    let scratch = d.store.scratch_dir();
    let max_size = d.max_size;
    tokio::task::spawn_blocking(move || {
        let (target, whiteouts, _guard) = match mounts::overlay_upper(&mounts) {
            Some(upper) => (upper, layer_apply::Whiteouts::Overlay, None),
            None => {
                let tm = mounts::TempMount::new(&scratch, &mounts, false)?;
                (tm.path().to_path_buf(), layer_apply::Whiteouts::Oci, Some(tm))
            }
        };
        let lower = layer_convert::Lowers::dirs(match mounts.as_slice() {
            [m] if m.kind == "overlay" => mounts::overlay_lowers(m),
            _ => Vec::new(),
        });
        let opts = layer_apply::ApplyOptions { whiteouts, lower };
        let (digests, _) = layer_convert::stream::with_uncompressed(blob, Some(compression), max_size, None, |s| {
            if let Err(e) = layer_apply::apply_tar(&mut *s, &target, &opts) {
                return Err(s.take_failure().unwrap_or(e));
            }
            // Drain what follows the end-of-archive marker: it is part of the diffID.
            io::copy(s, &mut io::sink()).map_err(layer_convert::Error::io)?;
            s.digests()
                .ok_or_else(|| layer_convert::Error::new(layer_convert::ErrorKind::Truncated, "stream ended early"))
        })
        .map_err(conv_err)?;
        let (diff, size, input) = digests;
        check_blob(&desc, &format!("sha256:{}", hex::encode(input.digest)), input.size)?;
        Ok(Descriptor {
            media_type: LAYER_TAR.into(),
            digest: format!("sha256:{}", hex::encode(diff)),
            size: size as i64,
            annotations: HashMap::new(),
        })
    })
    .await
    .map_err(join_err)?
}

fn output_compression(mt: &str) -> Result<(layer_diff::Compression, String)> {
    let mt = if mt.is_empty() {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    } else {
        mt
    };
    match layer_convert::Compression::from_media_type(mt) {
        Ok(layer_convert::Compression::None) => Ok((layer_diff::Compression::None, mt.to_string())),
        Ok(layer_convert::Compression::Gzip) => Ok((layer_diff::Compression::Gzip, mt.to_string())),
        Ok(layer_convert::Compression::Zstd) => Ok((layer_diff::Compression::Zstd, mt.to_string())),
        Err(e) => Err(DiffError::InvalidArgument(format!(
            "cannot write a layer as {mt:?}: {e}"
        ))),
    }
}

/// Compare for our snapshots: the changes are exactly the upper dir.
pub(crate) async fn compare_erofs(d: &Differ, ctx: &CallContext, req: &CompareRequest) -> Result<Descriptor> {
    let store = d.store.clone();
    let right = req.right.clone();
    let active = tokio::task::spawn_blocking(move || store.active_for_mounts(&right))
        .await
        .map_err(join_err)?
        .map_err(store_err)?;
    let Some(active) = active else {
        return Err(DiffError::NotImplemented(
            "the upper mounts are not a dedup-snapshotter active snapshot".into(),
        ));
    };
    match mounts::view_layers(&req.left) {
        Some(left) if left == active.lowers => {}
        _ => {
            return Err(DiffError::NotImplemented(
                "the lower mounts are not the snapshot's parent layers; a walk is needed".into(),
            ))
        }
    }
    let upper = active.upper;
    write_layer(d, ctx, req, move |out, opts| {
        layer_diff::write_upper_diff(&upper, out, opts)
    })
    .await
}

/// Compare any two mount sets by walking both trees.
pub(crate) async fn compare_walking(d: &Differ, ctx: &CallContext, req: &CompareRequest) -> Result<Descriptor> {
    let scratch = d.store.scratch_dir();
    let (left, right) = (req.left.clone(), req.right.clone());
    let mounted = tokio::task::spawn_blocking(move || -> Result<(mounts::TempMount, mounts::TempMount)> {
        Ok((
            mounts::TempMount::new(&scratch, &left, true)?,
            mounts::TempMount::new(&scratch, &right, true)?,
        ))
    })
    .await
    .map_err(join_err)??;
    let (lower, upper) = (mounted.0.path().to_path_buf(), mounted.1.path().to_path_buf());
    let r = write_layer(d, ctx, req, move |out, opts| {
        layer_diff::write_walk_diff(&lower, &upper, out, opts)
    })
    .await;
    drop(mounted);
    r
}

/// Runs a layer writer on a blocking thread and streams its output into the content
/// store, committed under its digest with the `containerd.io/uncompressed` label.
async fn write_layer<F>(d: &Differ, ctx: &CallContext, req: &CompareRequest, produce: F) -> Result<Descriptor>
where
    F: FnOnce(
            &mut dyn Write,
            &layer_diff::DiffOptions,
        ) -> std::result::Result<layer_diff::DiffStats, layer_diff::Error>
        + Send
        + 'static,
{
    let (compression, media_type) = output_compression(&req.media_type)?;
    let opts = layer_diff::DiffOptions {
        compression,
        source_date_epoch: req.source_date_epoch,
    };
    let (reference, truncate) = if req.reference.is_empty() {
        (format!("dedup-diff-{}", unique()), false)
    } else {
        (req.reference.clone(), true)
    };
    let (chunk_tx, chunk_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let (fin_tx, fin_rx) = tokio::sync::oneshot::channel();
    let mut labels = req.labels.clone();
    let producer = tokio::task::spawn_blocking(move || {
        let mut w = ChunkWriter {
            tx: chunk_tx,
            buf: Vec::with_capacity(1 << 20),
            h: Sha256::new(),
            n: 0,
        };
        let stats = produce(&mut w, &opts).map_err(|e| DiffError::Internal(format!("writing the layer: {e}")))?;
        w.flush_chunk().map_err(|e| DiffError::Internal(e.to_string()))?;
        let digest = format!("sha256:{}", hex::encode(w.h.clone().finalize()));
        let size = w.n as i64;
        labels.insert(UNCOMPRESSED_LABEL.into(), stats.uncompressed_digest.clone());
        let _ = fin_tx.send((digest.clone(), size, labels));
        Ok::<_, DiffError>((digest, size))
    });
    // containerd 2.x calls proxy differs without the client's lease: hold the layer
    // with a lease of our own for an hour, long enough for the client to use it.
    let owned;
    let ctx = match ctx.lease {
        Some(_) => ctx,
        None => {
            let lease = d.content.expiring_lease(ctx, Duration::from_secs(3600)).await?;
            tracing::debug!(lease, "no lease with the Compare call: writing under an expiring one");
            owned = CallContext {
                namespace: ctx.namespace.clone(),
                lease: Some(lease),
            };
            &owned
        }
    };
    let written = d.content.write(ctx, &reference, truncate, chunk_rx, fin_rx).await;
    let produced = producer.await.map_err(join_err)?;
    match (produced, written) {
        (Ok((digest, size)), Ok(())) => Ok(Descriptor {
            media_type,
            digest,
            size,
            annotations: HashMap::new(),
        }),
        (Err(e), _) | (Ok(_), Err(e)) => {
            d.content.abort(ctx, &reference).await;
            Err(e)
        }
    }
}

fn unique() -> String {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let h = Sha256::digest(format!(
        "{}{}{:?}",
        t.as_nanos(),
        std::process::id(),
        std::thread::current().id()
    ));
    hex::encode(&h[..8])
}

/// A `Write` that hashes what it is given and sends it on in 1 MiB chunks.
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
    h: Sha256,
    n: u64,
}

impl ChunkWriter {
    fn flush_chunk(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(1 << 20));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::other("the content store writer stopped"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.h.update(b);
        self.n += b.len() as u64;
        self.buf.extend_from_slice(b);
        if self.buf.len() >= 1 << 20 {
            self.flush_chunk()?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(media_type: &str, payloads: &[&str]) -> ApplyRequest {
        ApplyRequest {
            diff: Descriptor {
                media_type: media_type.into(),
                ..Default::default()
            },
            payloads: payloads.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn cri_decryption_payloads_do_not_stop_a_plain_layer() {
        // What CRI sends with every layer (imgcrypt's decoders).
        let r = req(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            &[
                "io.containerd.ocicrypt.decoder.v1.tar",
                "io.containerd.ocicrypt.decoder.v1.tar.gzip",
            ],
        );
        assert!(check_payloads(&r).is_ok());
        assert!(matches!(classify(&r.diff.media_type), Ok(Media::Tar(_))));
    }

    #[test]
    fn other_processors_and_unread_types_go_to_the_next_differ() {
        let r = req(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            &["com.example.processor"],
        );
        assert!(matches!(check_payloads(&r), Err(DiffError::NotImplemented(_))));
        let encrypted = classify("application/vnd.oci.image.layer.v1.tar+gzip+encrypted");
        assert!(matches!(encrypted, Err(DiffError::NotImplemented(_))));
        let vendor = classify("application/vnd.example.layer");
        assert!(matches!(vendor, Err(DiffError::NotImplemented(_))));
    }

    #[test]
    fn erofs_layers_plain_or_zstd() {
        for (mt, want_base, want_zstd) in [
            (
                "application/vnd.erofs.layer.v1",
                "application/vnd.erofs.layer.v1",
                false,
            ),
            // convert-image --chunk-compression zstd, both types (the frames and seek
            // table decode as one zstd stream).
            (
                "application/vnd.erofs.layer.v1+zstd",
                "application/vnd.erofs.layer.v1",
                true,
            ),
            (
                "application/vnd.oci.image.layer.v1.erofs+zstd",
                "application/vnd.oci.image.layer.v1.erofs",
                true,
            ),
        ] {
            match classify(mt) {
                Ok(Media::Erofs { base, zstd }) => assert_eq!((base.as_str(), zstd), (want_base, want_zstd), "{mt}"),
                _ => panic!("{mt} is not an EROFS layer"),
            }
        }
        for mt in [
            "application/vnd.erofs.layer.v1+gzip",
            "application/vnd.oci.image.layer.v1.erofs+zstd+encrypted",
        ] {
            match classify(mt) {
                Err(DiffError::InvalidArgument(m)) => assert!(m.contains("only +zstd"), "{m}"),
                _ => panic!("{mt} is not refused"),
            }
        }
    }
}
