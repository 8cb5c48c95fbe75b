//! `containerd.services.snapshots.v1.Snapshots` over the snapshot store.
//!
//! Every call runs the store's blocking method on tokio's blocking pool, translates
//! the messages, and maps the store's errors to the gRPC codes containerd's
//! `errdefs.FromGRPC` turns back into `ErrNotFound`, `ErrAlreadyExists`, ... —
//! containerd branches on those (AlreadyExists after Prepare with
//! `containerd.io/snapshot.ref` is the remote-snapshot shortcut; NotFound from Stat is
//! "not unpacked yet").

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use containerd_client::services::v1::snapshots as pb;
use containerd_client::types::Mount as PbMount;
use snapshotter::{Error, Info, Kind, Mount, Snapshotter};
use tonic::{Code, Request, Response, Status};

use crate::filters::Filter;
pub use crate::generated::snapshots_server::{Snapshots, SnapshotsServer};
use crate::metrics::{Failure, ServiceMetrics, SNAPSHOTS};

/// How many snapshot infos one `List` response message carries. containerd's own
/// service batches the same way, which keeps each message far below gRPC's 4 MiB
/// default limit even with many labels.
pub const LIST_BATCH: usize = 100;

/// The Snapshots gRPC service backed by a [`Snapshotter`].
#[derive(Clone)]
pub struct SnapshotsService {
    inner: Arc<Snapshotter>,
    metrics: Option<Arc<ServiceMetrics>>,
}

impl SnapshotsService {
    /// A service over `snapshotter` (shared, so the daemon can keep a handle too).
    pub fn new(snapshotter: Arc<Snapshotter>) -> SnapshotsService {
        SnapshotsService {
            inner: snapshotter,
            metrics: None,
        }
    }

    /// Records every call in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<ServiceMetrics>) -> SnapshotsService {
        self.metrics = Some(metrics);
        self
    }

    /// This service wrapped in the generated tonic server, ready for a router.
    pub fn into_server(self) -> SnapshotsServer<SnapshotsService> {
        SnapshotsServer::new(self)
    }

    /// Runs `f` on the blocking pool and logs one event for the call: the store
    /// does file system work and layer conversion, which must not stall the
    /// runtime's worker threads (2 cores: one blocked worker is half the server).
    async fn call<T, F>(&self, rpc: &'static str, key: &str, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Snapshotter) -> snapshotter::Result<T> + Send + 'static,
    {
        self.call_timed(rpc, key, Instant::now(), f).await
    }

    /// [`Self::call`] for a call that began at `start`.
    async fn call_timed<T, F>(&self, rpc: &'static str, key: &str, start: Instant, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Snapshotter) -> snapshotter::Result<T> + Send + 'static,
    {
        let store = Arc::clone(&self.inner);
        let result = match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err((error_kind(&e), to_status(e))),
            // A panic in the store: the call failed, the server goes on.
            Err(e) => Err(("panic", Status::unknown(format!("{rpc}: store task failed: {e}")))),
        };
        log_call(rpc, key, start, result.as_ref().err().map(|(_, s)| s));
        if let Some(m) = &self.metrics {
            let failure = result.as_ref().err().map(|(kind, s)| Failure { code: s.code(), kind });
            m.record(SNAPSHOTS, rpc, start, failure);
        }
        result.map_err(|(_, s)| s)
    }

    /// Answers a request refused before it reached the store.
    fn reject(&self, rpc: &'static str, key: &str, status: Status) -> Status {
        let start = Instant::now();
        log_call(rpc, key, start, Some(&status));
        if let Some(m) = &self.metrics {
            let failure = Failure {
                code: status.code(),
                kind: "invalid_argument",
            };
            m.record(SNAPSHOTS, rpc, start, Some(failure));
        }
        status
    }
}

/// The store error's kind, as the `errors` metric names it.
fn error_kind(e: &Error) -> &'static str {
    match e {
        Error::NotFound(_) => "not_found",
        Error::AlreadyExists(_) => "already_exists",
        Error::FailedPrecondition(_) => "failed_precondition",
        Error::InvalidArgument(_) => "invalid_argument",
        Error::Unavailable(_) => "unavailable",
        Error::Internal(_) => "internal",
    }
}

/// One event per RPC: `debug` for success and for the codes containerd expects as
/// part of normal operation, `warn` for failures someone should look at.
fn log_call(rpc: &'static str, key: &str, start: Instant, err: Option<&Status>) {
    let micros = start.elapsed().as_micros() as u64;
    match err {
        None => tracing::debug!(rpc, key, code = "Ok", micros, "snapshots call"),
        Some(s) if s.code() == Code::Unknown || s.code() == Code::Internal => {
            tracing::warn!(rpc, key, code = ?s.code(), micros, error = s.message(), "snapshots call failed")
        }
        Some(s) => tracing::debug!(rpc, key, code = ?s.code(), micros, error = s.message(), "snapshots call"),
    }
}

/// Maps a store error to the status containerd's errdefs maps back to the same
/// error class. Anything the store cannot classify is Unknown (errdefs has no
/// dedicated class for Internal in containerd 1.6).
pub fn to_status(err: Error) -> Status {
    match err {
        Error::NotFound(m) => Status::not_found(m),
        Error::AlreadyExists(m) => Status::already_exists(m),
        Error::FailedPrecondition(m) => Status::failed_precondition(m),
        Error::InvalidArgument(m) => Status::invalid_argument(m),
        Error::Unavailable(m) => Status::unavailable(m),
        Error::Internal(m) => Status::unknown(m),
    }
}

/// A store mount as containerd's `types.Mount`.
pub fn mount_to_proto(m: Mount) -> PbMount {
    PbMount {
        r#type: m.kind,
        source: m.source,
        target: m.target,
        options: m.options,
    }
}

fn mounts_to_proto(mounts: Vec<Mount>) -> Vec<PbMount> {
    mounts.into_iter().map(mount_to_proto).collect()
}

/// A store kind as the proto enum value.
pub fn kind_to_proto(kind: Kind) -> pb::Kind {
    match kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

/// A proto kind as the store's: like containerd's `KindFromProto`, anything that is
/// neither VIEW nor ACTIVE (UNKNOWN, unknown numbers) counts as committed.
pub fn kind_from_proto(kind: i32) -> Kind {
    match pb::Kind::try_from(kind) {
        Ok(pb::Kind::View) => Kind::View,
        Ok(pb::Kind::Active) => Kind::Active,
        _ => Kind::Committed,
    }
}

/// A store info as the proto message.
pub fn info_to_proto(info: Info) -> pb::Info {
    pb::Info {
        name: info.name,
        parent: info.parent,
        kind: kind_to_proto(info.kind) as i32,
        created_at: Some(info.created.into()),
        updated_at: Some(info.updated.into()),
        labels: info.labels.into_iter().collect(),
    }
}

/// A proto info as the store's. Missing (or unrepresentable) timestamps become the
/// epoch: Update ignores them (they are immutable or set by the store).
pub fn info_from_proto(info: pb::Info) -> Info {
    let time = |t: Option<prost_types::Timestamp>| {
        t.and_then(|t| SystemTime::try_from(t).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    Info {
        kind: kind_from_proto(info.kind),
        created: time(info.created_at),
        updated: time(info.updated_at),
        labels: info.labels.into_iter().collect::<BTreeMap<_, _>>(),
        name: info.name,
        parent: info.parent,
    }
}

/// The stream `List` answers with: the batches are computed before the first is
/// sent (the store lists in one blocking call), so a plain iterator is enough.
pub type ListStream = tokio_stream::Iter<std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>>>;

#[tonic::async_trait]
impl Snapshots for SnapshotsService {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let pull = r.labels.contains_key(snapshotter::TARGET_SNAPSHOT_LABEL);
        let labels = r.labels.into_iter().collect();
        let start = Instant::now();
        let result = self
            .call_timed("Prepare", &key, start, move |s| s.prepare(&r.key, &r.parent, labels))
            .await;
        if let (Some(m), true) = (&self.metrics, pull) {
            m.record_pull_prepare(start, result.as_ref().err().map(Status::code));
        }
        let mounts = result?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts_to_proto(mounts),
        }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let labels = r.labels.into_iter().collect();
        let mounts = self
            .call("View", &key, move |s| s.view(&r.key, &r.parent, labels))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts_to_proto(mounts),
        }))
    }

    async fn mounts(&self, request: Request<pb::MountsRequest>) -> Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let mounts = self.call("Mounts", &key, move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse {
            mounts: mounts_to_proto(mounts),
        }))
    }

    async fn commit(&self, request: Request<pb::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        // Log both: containerd commits "extract-…" keys under the layer's chain ID.
        let what = format!("{} -> {}", r.key, r.name);
        let labels = r.labels.into_iter().collect();
        let start = Instant::now();
        let measure = self.metrics.is_some();
        let converted = self
            .call_timed("Commit", &what, start, move |s| {
                // Whether Commit converts can only be seen before it runs (afterwards
                // the layer is there either way).
                let converts = measure && s.commit_converts(&r.key);
                s.commit(&r.name, &r.key, labels).map(|()| converts)
            })
            .await?;
        if let (Some(m), true) = (&self.metrics, converted) {
            m.record_commit_conversion(start);
        }
        Ok(Response::new(()))
    }

    async fn remove(&self, request: Request<pb::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        self.call("Remove", &key, move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let info = self.call("Stat", &key, move |s| s.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info_to_proto(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let Some(info) = r.info else {
            return Err(self.reject("Update", "", Status::invalid_argument("update: info is required")));
        };
        let info = info_from_proto(info);
        let key = info.name.clone();
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = self.call("Update", &key, move |s| s.update(info, &paths)).await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info_to_proto(info)),
        }))
    }

    type ListStream = ListStream;

    async fn list(&self, request: Request<pb::ListSnapshotsRequest>) -> Result<Response<ListStream>, Status> {
        let r = request.into_inner();
        let what = r.filters.join(" || ");
        // Parse before touching the store: a bad filter is the caller's error
        // whatever the store holds.
        let filter = match Filter::parse_all(&r.filters) {
            Ok(f) => f,
            Err(e) => return Err(self.reject("List", &what, Status::invalid_argument(e.to_string()))),
        };
        let infos = self
            .call("List", &what, move |s| {
                Ok(s.list()?.into_iter().filter(|i| filter.matches(i)).collect::<Vec<_>>())
            })
            .await?;
        Ok(Response::new(tokio_stream::iter(list_batches(infos))))
    }

    async fn usage(&self, request: Request<pb::UsageRequest>) -> Result<Response<pb::UsageResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let u = self.call("Usage", &key, move |s| s.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.call("Cleanup", "", |s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}

/// Splits infos into `List` response messages of at most [`LIST_BATCH`]. No infos
/// means no messages: containerd's client just sees the stream end.
fn list_batches(infos: Vec<Info>) -> std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>> {
    let mut batches = Vec::with_capacity(infos.len().div_ceil(LIST_BATCH));
    let mut infos = infos.into_iter().map(info_to_proto).peekable();
    while infos.peek().is_some() {
        batches.push(Ok(pb::ListSnapshotsResponse {
            info: infos.by_ref().take(LIST_BATCH).collect(),
        }));
    }
    batches.into_iter()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn info(name: &str, kind: Kind) -> Info {
        Info {
            name: name.into(),
            parent: "p".into(),
            kind,
            labels: [("a".to_string(), "1".to_string()), ("b".to_string(), String::new())].into(),
            created: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            updated: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_001, 5),
        }
    }

    #[test]
    fn errors_map_to_the_codes_errdefs_knows() {
        let cases = [
            (Error::NotFound("k".into()), Code::NotFound),
            (Error::AlreadyExists("k".into()), Code::AlreadyExists),
            (Error::FailedPrecondition("k".into()), Code::FailedPrecondition),
            (Error::InvalidArgument("k".into()), Code::InvalidArgument),
            (Error::Internal("disk on fire".into()), Code::Unknown),
        ];
        for (err, code) in cases {
            let s = to_status(err);
            assert_eq!(s.code(), code);
            assert!(!s.message().is_empty());
        }
        assert_eq!(
            to_status(Error::Internal("disk on fire".into())).message(),
            "disk on fire"
        );
    }

    #[test]
    fn kinds_round_trip_and_unknown_is_committed() {
        for k in [Kind::View, Kind::Active, Kind::Committed] {
            assert_eq!(kind_from_proto(kind_to_proto(k) as i32), k);
        }
        assert_eq!(kind_to_proto(Kind::View) as i32, 1);
        assert_eq!(kind_to_proto(Kind::Active) as i32, 2);
        assert_eq!(kind_to_proto(Kind::Committed) as i32, 3);
        assert_eq!(kind_from_proto(0), Kind::Committed);
        assert_eq!(kind_from_proto(42), Kind::Committed);
    }

    #[test]
    fn infos_round_trip() {
        let i = info("n", Kind::Active);
        let p = info_to_proto(i.clone());
        assert_eq!(p.kind, pb::Kind::Active as i32);
        assert_eq!(
            p.created_at,
            Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_456_789
            })
        );
        assert_eq!(p.labels.get("a").map(String::as_str), Some("1"));
        assert_eq!(p.labels.get("b").map(String::as_str), Some(""));
        assert_eq!(info_from_proto(p), i);
        // Missing timestamps (Update's caller rarely sets them) do not fail an Update.
        let p = pb::Info {
            name: "n".into(),
            ..Default::default()
        };
        let i = info_from_proto(p);
        assert_eq!((i.created, i.updated), (SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH));
    }

    #[test]
    fn mounts_translate_field_by_field() {
        let m = Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec!["lowerdir=/a:/b".into(), "upperdir=/u".into()],
        };
        let p = mount_to_proto(m);
        assert_eq!(p.r#type, "overlay");
        assert_eq!(p.source, "overlay");
        assert_eq!(p.target, "");
        assert_eq!(p.options, ["lowerdir=/a:/b", "upperdir=/u"]);
    }

    #[test]
    fn list_batches_of_100() {
        assert_eq!(list_batches(vec![]).count(), 0);
        let infos: Vec<_> = (0..250).map(|n| info(&n.to_string(), Kind::Committed)).collect();
        let sizes: Vec<_> = list_batches(infos).map(|b| b.unwrap().info.len()).collect();
        assert_eq!(sizes, [100, 100, 50]);
        let infos: Vec<_> = (0..100).map(|n| info(&n.to_string(), Kind::Committed)).collect();
        let batches: Vec<_> = list_batches(infos).map(|b| b.unwrap()).collect();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].info[99].name, "99");
    }
}
