//! Counters and the fetch-latency histogram, rendered in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the `dedupd_fetch_seconds` buckets: from a loopback hit to a slow WAN.
const BUCKETS: [f64; 12] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The daemon-wide counters. Per-blob gauges are added at render time from the blobs themselves.
#[derive(Default)]
pub struct Metrics {
    /// Bytes received from registries (verified or not).
    pub fetched_bytes: AtomicU64,
    /// Range requests sent (successful or not).
    pub fetches: AtomicU64,
    /// Range requests that failed (transport, HTTP status, short body).
    pub fetch_errors: AtomicU64,
    /// Chunks whose bytes did not hash to their digest (fetched or cached), and whole-blob mismatches.
    pub verify_failures: AtomicU64,
    /// FUSE reads served without waiting for a fetch.
    pub cache_hits: AtomicU64,
    /// FUSE reads that needed a fetch (theirs or another's in flight).
    pub cache_misses: AtomicU64,
    histogram: Mutex<Histogram>,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// One blob's gauges.
pub struct BlobGauges {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes of the blob that are cached.
    pub present_bytes: u64,
    /// The blob's size.
    pub size: u64,
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long one range request took.
    pub fn observe_fetch(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let mut h = self.histogram.lock().unwrap_or_else(|e| e.into_inner());
        // Prometheus buckets are cumulative: a sample counts in every bucket whose bound it is under.
        for (count, bound) in h.counts.iter_mut().zip(BUCKETS) {
            if secs <= bound {
                *count += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// The text exposition of every metric.
    pub fn render(&self, blobs: &[BlobGauges]) -> String {
        let mut out = String::new();
        let counters = [
            (
                "dedupd_fetched_bytes_total",
                "Bytes received from registries.",
                &self.fetched_bytes,
            ),
            (
                "dedupd_fetches_total",
                "Range requests sent to registries.",
                &self.fetches,
            ),
            (
                "dedupd_fetch_errors_total",
                "Range requests that failed.",
                &self.fetch_errors,
            ),
            (
                "dedupd_verify_failures_total",
                "Chunks or blobs whose content did not match their digest.",
                &self.verify_failures,
            ),
            (
                "dedupd_cache_hits_total",
                "FUSE reads served from the cache alone.",
                &self.cache_hits,
            ),
            (
                "dedupd_cache_misses_total",
                "FUSE reads that waited for a fetch.",
                &self.cache_misses,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        {
            let h = self.histogram.lock().unwrap_or_else(|e| e.into_inner());
            let name = "dedupd_fetch_seconds";
            let _ = writeln!(
                out,
                "# HELP {name} Duration of range requests.\n# TYPE {name} histogram"
            );
            for (count, bound) in h.counts.iter().zip(BUCKETS) {
                let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
            }
            let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum {}", h.sum);
            let _ = writeln!(out, "{name}_count {}", h.count);
        }
        type Gauge = fn(&BlobGauges) -> u64;
        let gauges: [(&str, &str, Gauge); 2] = [
            ("dedupd_blob_present_bytes", "Cached bytes of a blob.", |b| {
                b.present_bytes
            }),
            ("dedupd_blob_size_bytes", "Size of a blob.", |b| b.size),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for b in blobs {
                let _ = writeln!(out, "{name}{{digest=\"{}\"}} {}", b.digest, value(b));
            }
        }
        out
    }
}

/// The value of an unlabelled sample `name` in a text exposition (for tests and tools).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_gauges() {
        let m = Metrics::default();
        Metrics::inc(&m.fetches);
        m.fetched_bytes.fetch_add(1 << 20, Ordering::Relaxed);
        m.observe_fetch(Duration::from_millis(30));
        let text = m.render(&[BlobGauges {
            digest: "sha256:ab".into(),
            present_bytes: 5,
            size: 9,
        }]);
        assert_eq!(sample(&text, "dedupd_fetches_total"), Some(1.0));
        assert_eq!(sample(&text, "dedupd_fetched_bytes_total"), Some(1048576.0));
        assert_eq!(sample(&text, "dedupd_cache_hits_total"), Some(0.0));
        assert!(text.contains("dedupd_fetch_seconds_bucket{le=\"0.025\"} 0\n"), "{text}");
        assert!(text.contains("dedupd_fetch_seconds_bucket{le=\"0.05\"} 1\n"), "{text}");
        assert!(text.contains("dedupd_fetch_seconds_bucket{le=\"+Inf\"} 1\n"), "{text}");
        assert_eq!(sample(&text, "dedupd_fetch_seconds_count"), Some(1.0));
        assert!(text.contains("dedupd_blob_present_bytes{digest=\"sha256:ab\"} 5\n"));
        assert!(text.contains("dedupd_blob_size_bytes{digest=\"sha256:ab\"} 9\n"));
    }
}
