//! `containerd.services.diff.v1.Diff` over the [`differ::Differ`].

use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use containerd_client::services::v1 as pb;
use containerd_client::types as pbt;
use differ::{ApplyRequest, CallContext, CompareRequest, DiffError, Differ};
use tonic::{Request, Response, Status};

pub use crate::generated::diff_server::{Diff, DiffServer};
use crate::metrics::{Failure, ServiceMetrics, DIFF};

/// A failed call: the error's kind (for the `errors` metric) and the status answered.
type Failed = (&'static str, Status);

/// The Diff service: Apply and Diff (Compare) over the ordered differs.
#[derive(Clone)]
pub struct DiffService {
    inner: Arc<Differ>,
    metrics: Option<Arc<ServiceMetrics>>,
}

impl DiffService {
    /// A service over `differ`.
    pub fn new(differ: Arc<Differ>) -> DiffService {
        DiffService {
            inner: differ,
            metrics: None,
        }
    }

    /// Records every call in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<ServiceMetrics>) -> DiffService {
        self.metrics = Some(metrics);
        self
    }

    fn record<T>(&self, method: &'static str, started: Instant, result: Result<T, Failed>) -> Result<T, Status> {
        if let Some(m) = &self.metrics {
            let failure = result.as_ref().err().map(|(kind, s)| Failure { code: s.code(), kind });
            m.record(DIFF, method, started, failure);
        }
        result.map_err(|(_, s)| s)
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> DiffServer<DiffService> {
        DiffServer::new(self)
    }
}

/// The differ error's kind, as the `errors` metric names it.
fn error_kind(e: &DiffError) -> &'static str {
    match e {
        DiffError::NotImplemented(_) => "not_implemented",
        DiffError::InvalidArgument(_) => "invalid_argument",
        DiffError::NotFound(_) => "not_found",
        DiffError::AlreadyExists(_) => "already_exists",
        DiffError::FailedPrecondition(_) => "failed_precondition",
        DiffError::Internal(_) => "internal",
    }
}

fn failed(e: DiffError) -> Failed {
    (error_kind(&e), diff_status(e))
}

/// Maps a differ error to the gRPC status containerd expects; NotImplemented becomes
/// Unimplemented, which makes containerd try its next differ.
pub fn diff_status(e: DiffError) -> Status {
    match e {
        DiffError::NotImplemented(m) => Status::unimplemented(m),
        DiffError::InvalidArgument(m) => Status::invalid_argument(m),
        DiffError::NotFound(m) => Status::not_found(m),
        DiffError::AlreadyExists(m) => Status::already_exists(m),
        DiffError::FailedPrecondition(m) => Status::failed_precondition(m),
        DiffError::Internal(m) => Status::unknown(m),
    }
}

/// The namespace (if sent) and lease the client sent, to carry onto content store calls.
fn call_metadata<T>(req: &Request<T>) -> (Option<String>, Option<String>) {
    let md = req.metadata();
    let get = |k: &str| {
        md.get(k)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    (get("containerd-namespace"), get("containerd-lease"))
}

fn mount_from_proto(m: pbt::Mount) -> snapshotter::Mount {
    snapshotter::Mount {
        kind: m.r#type,
        source: m.source,
        target: m.target,
        options: m.options,
    }
}

fn descriptor_from_proto(d: pbt::Descriptor) -> differ::Descriptor {
    differ::Descriptor {
        media_type: d.media_type,
        digest: d.digest,
        size: d.size,
        annotations: d.annotations,
    }
}

fn descriptor_to_proto(d: differ::Descriptor) -> pbt::Descriptor {
    pbt::Descriptor {
        media_type: d.media_type,
        digest: d.digest,
        size: d.size,
        annotations: d.annotations,
    }
}

#[tonic::async_trait]
impl Diff for DiffService {
    async fn apply(&self, request: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let started = Instant::now();
        let r = self.apply_inner(request, started).await;
        self.record("Apply", started, r)
    }

    async fn diff(&self, request: Request<pb::DiffRequest>) -> Result<Response<pb::DiffResponse>, Status> {
        let started = Instant::now();
        let r = self.diff_inner(request, started).await;
        self.record("Diff", started, r)
    }
}

impl DiffService {
    async fn apply_inner(
        &self,
        request: Request<pb::ApplyRequest>,
        started: Instant,
    ) -> Result<Response<pb::ApplyResponse>, Failed> {
        let (namespace, lease) = call_metadata(&request);
        let req = request.into_inner();
        let diff = req.diff.ok_or_else(|| {
            (
                "invalid_argument",
                Status::invalid_argument("apply without a descriptor"),
            )
        })?;
        let digest = diff.digest.clone();
        let size = diff.size;
        let apply = ApplyRequest {
            diff: descriptor_from_proto(diff),
            mounts: req.mounts.into_iter().map(mount_from_proto).collect(),
            payloads: req.payloads.into_keys().collect(),
        };
        // containerd 1.7 calls proxy differs without `containerd-namespace`: the target
        // snapshot's key names it when the target is ours. Otherwise containerd's own
        // differs must take the layer (Unimplemented makes it try the next one).
        let namespace = match namespace.or_else(|| self.inner.namespace_of(&apply.mounts)) {
            Some(ns) => ns,
            None => {
                tracing::info!(rpc = "Apply", digest = %digest, "no containerd-namespace metadata and not our snapshot: Unimplemented");
                return Err((
                    "not_implemented",
                    Status::unimplemented(
                        "no containerd-namespace metadata, and the mounts are not a dedup-snapshotter snapshot to read it from",
                    ),
                ));
            }
        };
        let ctx = CallContext { namespace, lease };
        let r = self.inner.apply(&ctx, apply).await;
        tracing::info!(rpc = "Apply", digest = %digest, ok = r.is_ok(), micros = started.elapsed().as_micros() as u64,
            kind = r.as_ref().err().map(error_kind).unwrap_or("ok"),
            error = r.as_ref().err().map(|e| e.to_string()).unwrap_or_default());
        let applied = r.map_err(failed)?;
        if let Some(m) = &self.metrics {
            m.record_applied(size);
        }
        Ok(Response::new(pb::ApplyResponse {
            applied: Some(descriptor_to_proto(applied)),
        }))
    }

    async fn diff_inner(
        &self,
        request: Request<pb::DiffRequest>,
        started: Instant,
    ) -> Result<Response<pb::DiffResponse>, Failed> {
        // Without the namespace (containerd 1.7's proxy differ calls) the lease is
        // missing too, and a layer written without the client's lease may be
        // garbage-collected before the client references it: leave Compare to
        // containerd's own differs, which see both.
        let (Some(namespace), lease) = call_metadata(&request) else {
            tracing::info!(rpc = "Diff", "no containerd-namespace metadata: Unimplemented");
            return Err((
                "not_implemented",
                Status::unimplemented(
                    "no containerd-namespace metadata (containerd before 2.0): compare with containerd's own differ",
                ),
            ));
        };
        let ctx = CallContext { namespace, lease };
        let req = request.into_inner();
        let source_date_epoch = req
            .source_date_epoch
            .map(|t| UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.clamp(0, 999_999_999) as u32));
        let compare = CompareRequest {
            left: req.left.into_iter().map(mount_from_proto).collect(),
            right: req.right.into_iter().map(mount_from_proto).collect(),
            media_type: req.media_type,
            reference: req.r#ref,
            labels: req.labels,
            source_date_epoch,
        };
        let r = self.inner.compare(&ctx, compare).await;
        tracing::info!(
            rpc = "Diff",
            ok = r.is_ok(),
            micros = started.elapsed().as_micros() as u64,
            error = r.as_ref().err().map(|e| e.to_string()).unwrap_or_default()
        );
        let desc = r.map_err(failed)?;
        Ok(Response::new(pb::DiffResponse {
            diff: Some(descriptor_to_proto(desc)),
        }))
    }
}
