//! Prometheus metrics of the gRPC services, recorded where the calls are answered,
//! and scrape-time gauges read from the store.
//!
//! [`ServiceMetrics::register`] puts the families into the daemon's registry (the
//! daemon chooses the prefix, `dedup_snapshotter`); the services record into them
//! when built with `with_metrics`. Instrumenting here rather than inside the store or
//! the differs keeps metrics out of the code that does the work: every RPC passes
//! through one place per service, with its method, result and duration at hand.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use snapshotter::{Kind, Snapshotter};
use tonic::Code;

/// Bucket bounds (seconds) of the duration histograms: a Stat takes microseconds, the
/// Apply or Commit conversion of a large layer minutes.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0,
];

/// The file that marks a snapshot directory as ours (the store writes it, the erofs
/// differ looks for it).
/// The `service` label of the Snapshots service.
pub const SNAPSHOTS: &str = "snapshots";
/// The `service` label of the Diff service.
pub const DIFF: &str = "diff";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Method {
    service: &'static str,
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodCode {
    service: &'static str,
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodKind {
    service: &'static str,
    method: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// The families the services record into.
#[derive(Debug)]
pub struct ServiceMetrics {
    requests: Family<MethodCode, Counter>,
    durations: HistogramFamily<Method>,
    errors: Family<MethodKind, Counter>,
    pull_prepares: HistogramFamily<Outcome>,
    commit_conversions: Histogram,
    applied_bytes: Counter,
}

/// How a failed call failed: the gRPC code the client sees and the crate's own
/// error kind (`not_found`, `internal`, `not_implemented`, `panic`, ...).
#[derive(Debug, Clone, Copy)]
pub struct Failure {
    /// The code answered.
    pub code: Code,
    /// The error kind before it became a status.
    pub kind: &'static str,
}

impl ServiceMetrics {
    /// Registers the RPC families and the store's gauges in `registry`.
    pub fn register(registry: &mut Registry, store: Arc<Snapshotter>) -> Arc<ServiceMetrics> {
        let m = ServiceMetrics {
            requests: Family::default(),
            durations: Family::new_with_constructor(histogram),
            errors: Family::default(),
            pull_prepares: Family::new_with_constructor(histogram),
            commit_conversions: histogram(),
            applied_bytes: Counter::default(),
        };
        registry.register(
            "requests",
            "gRPC calls answered, by service, method and status code",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer a gRPC call, by service and method",
            m.durations.clone(),
        );
        registry.register(
            "errors",
            "gRPC calls that failed, by service, method and the daemon's error kind",
            m.errors.clone(),
        );
        registry.register(
            "pull_prepare_seconds",
            "Prepares of image layers (with containerd.io/snapshot.ref, as pulls send): unpack = containerd \
             downloads and unpacks the layer, exists = already here or mounted lazily (nothing downloaded), error",
            m.pull_prepares.clone(),
        );
        registry.register(
            "commit_conversion_seconds",
            "Commits that converted an unpacked upper dir to EROFS (no differ had written the layer)",
            m.commit_conversions.clone(),
        );
        registry.register(
            "applied_bytes",
            "Layer blob bytes (as the descriptors give them) the Diff service applied",
            m.applied_bytes.clone(),
        );
        registry.register_collector(Box::new(StoreGauges(store)));
        Arc::new(m)
    }

    /// Records one answered call.
    pub fn record(&self, service: &'static str, method: &'static str, started: Instant, failure: Option<Failure>) {
        let code = failure.map_or(Code::Ok, |f| f.code);
        self.requests
            .get_or_create(&MethodCode {
                service,
                method,
                code: code_name(code),
            })
            .inc();
        self.durations
            .get_or_create(&Method { service, method })
            .observe(started.elapsed().as_secs_f64());
        if let Some(f) = failure {
            self.errors
                .get_or_create(&MethodKind {
                    service,
                    method,
                    kind: f.kind,
                })
                .inc();
        }
    }

    /// Records a Prepare that named the committed snapshot it would become (a layer of a pull).
    pub fn record_pull_prepare(&self, started: Instant, failed: Option<Code>) {
        let outcome = match failed {
            None => "unpack",
            Some(Code::AlreadyExists) => "exists",
            Some(_) => "error",
        };
        self.pull_prepares
            .get_or_create(&Outcome { outcome })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Records a Commit that converted the snapshot's upper dir.
    pub fn record_commit_conversion(&self, started: Instant) {
        self.commit_conversions.observe(started.elapsed().as_secs_f64());
    }

    /// Records a successful Apply of a blob of `size` bytes.
    pub fn record_applied(&self, size: i64) {
        self.applied_bytes.inc_by(size.max(0) as u64);
    }
}

/// gRPC code names as Go's `codes.Code.String()` prints them (what containerd logs).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// The store's figures, read at each scrape (they change with every pull and
/// removal, and the store already has them).
struct StoreGauges(Arc<Snapshotter>);

impl fmt::Debug for StoreGauges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreGauges")
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), fmt::Error> {
    ConstGauge::new(value as i64).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for StoreGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        // A store that cannot be read leaves its gauges out of this scrape rather
        // than failing the others; the daemon's log says why.
        match self.0.list() {
            Ok(infos) => {
                let mut family = encoder.encode_descriptor(
                    "snapshots",
                    "Snapshots by kind (each committed one is a mounted EROFS layer).",
                    None,
                    MetricType::Gauge,
                )?;
                for (kind, name) in [
                    (Kind::Active, "active"),
                    (Kind::View, "view"),
                    (Kind::Committed, "committed"),
                ] {
                    let n = infos.iter().filter(|i| i.kind == kind).count();
                    ConstGauge::new(n as i64).encode(family.encode_family(&[("kind", name)])?)?;
                }
            }
            Err(e) => tracing::warn!(error = %e, "metrics: cannot list snapshots"),
        }
        match self.0.stats() {
            Ok(st) => {
                gauge(
                    &mut encoder,
                    "logical_bytes",
                    "File bytes of the committed dedup layers, as if nothing were shared.",
                    st.logical_bytes,
                )?;
                gauge(
                    &mut encoder,
                    "stored_bytes",
                    "Bytes the committed layers take on disk: layer images plus chunk blobs.",
                    st.stored_bytes,
                )?;
                gauge(
                    &mut encoder,
                    "image_bytes",
                    "Bytes of the layer images (metadata, and file data without dedup).",
                    st.image_bytes,
                )?;
                gauge(
                    &mut encoder,
                    "chunk_blob_bytes",
                    "Bytes of the dedup chunk blobs.",
                    st.chunks.blob_bytes,
                )?;
                gauge(
                    &mut encoder,
                    "chunks",
                    "Entries in the dedup chunk index.",
                    st.chunks.chunks,
                )?;
            }
            Err(e) => tracing::warn!(error = %e, "metrics: cannot read the store's stats"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_requests_errors_and_durations() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Snapshotter::open(dir.path()).unwrap());
        let mut registry = Registry::with_prefix("t");
        let m = ServiceMetrics::register(&mut registry, store.clone());
        let t = Instant::now();
        m.record(SNAPSHOTS, "Stat", t, None);
        m.record(
            SNAPSHOTS,
            "Stat",
            t,
            Some(Failure {
                code: Code::NotFound,
                kind: "not_found",
            }),
        );
        m.record_pull_prepare(t, Some(Code::AlreadyExists));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        for line in [
            "t_requests_total{service=\"snapshots\",method=\"Stat\",code=\"OK\"} 1\n",
            "t_requests_total{service=\"snapshots\",method=\"Stat\",code=\"NotFound\"} 1\n",
            "t_errors_total{service=\"snapshots\",method=\"Stat\",kind=\"not_found\"} 1\n",
            "t_request_duration_seconds_count{service=\"snapshots\",method=\"Stat\"} 2\n",
            "t_pull_prepare_seconds_count{outcome=\"exists\"} 1\n",
            "t_commit_conversion_seconds_count 0\n",
            "t_snapshots{kind=\"committed\"} 0\n",
            "t_stored_bytes 0\n",
        ] {
            assert!(text.contains(line), "no {line:?} in:\n{text}");
        }
        store.shutdown();
    }
}
