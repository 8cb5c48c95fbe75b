//! dedupd's Prometheus metrics (`dedupd_*`), encoded with `prometheus-client` in the
//! Prometheus text format (0.0.4) for `GET /metrics` and the control socket's `Metrics`.

use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of the `dedupd_fetch_seconds` buckets: from a loopback hit to a slow WAN.
const BUCKETS: [f64; 12] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The daemon-wide counters; per-blob gauges are added at render time from the blobs themselves.
///
/// The handles are clones of what the registry holds: incrementing one moves the scraped value.
#[derive(Debug)]
pub struct Metrics {
    /// Bytes received from registries (verified or not).
    pub fetched_bytes: Counter,
    /// Range requests sent (successful or not).
    pub fetches: Counter,
    /// Range requests that failed (transport, HTTP status, short body).
    pub fetch_errors: Counter,
    /// Chunks whose bytes did not hash to their digest (fetched or cached), and whole-blob mismatches.
    pub verify_failures: Counter,
    /// Reads (FUSE reads or pre-content events of other processes) served without waiting for a fetch.
    pub cache_hits: Counter,
    /// Reads that needed a fetch (theirs or another's in flight).
    pub cache_misses: Counter,
    /// Pre-content events of other processes (fanotify data path).
    pub fanotify_events: Counter,
    /// 1 for the data path in use (`path="fanotify"` or `path="fuse"`).
    pub data_path: prometheus_client::metrics::family::Family<DataPathLabel, prometheus_client::metrics::gauge::Gauge>,
    fetch_seconds: Histogram,
    registry: Registry,
}

/// The label of `dedupd_data_path`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct DataPathLabel {
    /// `fanotify` or `fuse`.
    pub path: String,
}

/// One blob's gauges.
#[derive(Debug, Clone)]
pub struct BlobGauges {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes of the blob that are cached.
    pub present_bytes: u64,
    /// The blob's size.
    pub size: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("dedupd");
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        // prometheus-client appends `_total` to counters.
        let fetched_bytes = counter("fetched_bytes", "Bytes received from registries");
        let fetches = counter("fetches", "Range requests sent to registries");
        let fetch_errors = counter("fetch_errors", "Range requests that failed");
        let verify_failures = counter(
            "verify_failures",
            "Chunks or blobs whose content did not match their digest",
        );
        let cache_hits = counter(
            "cache_hits",
            "Reads (FUSE reads or pre-content events) served from the cache alone",
        );
        let cache_misses = counter(
            "cache_misses",
            "Reads (FUSE reads or pre-content events) that waited for a fetch",
        );
        let fanotify_events = counter(
            "fanotify_events",
            "Pre-content events of other processes on marked cache files",
        );
        let data_path = prometheus_client::metrics::family::Family::<
            DataPathLabel,
            prometheus_client::metrics::gauge::Gauge,
        >::default();
        registry.register(
            "data_path",
            "How reads of lazy blobs reach the daemon: 1 for the path in use",
            data_path.clone(),
        );
        let fetch_seconds = Histogram::new(BUCKETS);
        registry.register("fetch_seconds", "Duration of range requests", fetch_seconds.clone());
        Metrics {
            fetched_bytes,
            fetches,
            fetch_errors,
            verify_failures,
            cache_hits,
            cache_misses,
            fanotify_events,
            data_path,
            fetch_seconds,
            registry,
        }
    }
}

impl Metrics {
    /// Records how long one range request took.
    pub fn observe_fetch(&self, took: Duration) {
        self.fetch_seconds.observe(took.as_secs_f64());
    }

    /// The text exposition of every metric, with `blobs`' gauges.
    pub fn render(&self, blobs: Vec<BlobGauges>) -> String {
        use prometheus_client::encoding::prometheus_text::encode;
        // The blobs come and go: they are a scrape-time collector in a registry of their own.
        let mut per_blob = Registry::with_prefix("dedupd");
        per_blob.register_collector(Box::new(BlobCollector(blobs)));
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug in a metric's name.
        encode(&mut out, &self.registry).expect("encoding metrics");
        encode(&mut out, &per_blob).expect("encoding metrics");
        out
    }
}

#[derive(Debug)]
struct BlobCollector(Vec<BlobGauges>);

impl Collector for BlobCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        type Value = fn(&BlobGauges) -> u64;
        let gauges: [(&str, &str, Value); 2] = [
            ("blob_present_bytes", "Cached bytes of a blob.", |b| b.present_bytes),
            ("blob_size_bytes", "Size of a blob.", |b| b.size),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for b in &self.0 {
                let labels = [("digest", b.digest.as_str())];
                ConstGauge::new(value(b) as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_gauges() {
        let m = Metrics::default();
        m.fetches.inc();
        m.fetched_bytes.inc_by(1 << 20);
        m.observe_fetch(Duration::from_millis(30));
        let text = m.render(vec![BlobGauges {
            digest: "sha256:ab".into(),
            present_bytes: 5,
            size: 9,
        }]);
        for line in [
            "# TYPE dedupd_fetches_total counter\n",
            "dedupd_fetches_total 1\n",
            "dedupd_fetched_bytes_total 1048576\n",
            "dedupd_cache_hits_total 0\n",
            "# TYPE dedupd_fetch_seconds histogram\n",
            "dedupd_fetch_seconds_bucket{le=\"0.025\"} 0\n",
            "dedupd_fetch_seconds_bucket{le=\"0.05\"} 1\n",
            "dedupd_fetch_seconds_bucket{le=\"+Inf\"} 1\n",
            "dedupd_fetch_seconds_count 1\n",
            "# TYPE dedupd_blob_present_bytes gauge\n",
            "dedupd_blob_present_bytes{digest=\"sha256:ab\"} 5\n",
            "dedupd_blob_size_bytes{digest=\"sha256:ab\"} 9\n",
        ] {
            assert!(text.contains(line), "no {line:?} in:\n{text}");
        }
    }
}
