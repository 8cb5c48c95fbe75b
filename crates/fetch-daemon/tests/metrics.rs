//! dedupd's Prometheus metrics, scraped over HTTP from the real daemon while it does real work
//! (FUSE reads fetched from a scripted registry, served from the cache, failed fetches, corrupt
//! chunks): every scrape is parsed as the exposition format and the counters must move with the
//! work, no more and no less. Needs root and FUSE.

mod common;

use common::*;
use test_support::prometheus::Exposition;

fn scrape(addr: &str) -> Exposition {
    let text = http_get(addr, "/metrics");
    Exposition::parse(&text).unwrap_or_else(|e| panic!("/metrics does not parse ({e}):\n{text}"))
}

fn value(e: &Exposition, name: &str) -> f64 {
    e.get(name, &[])
        .unwrap_or_else(|| panic!("no {name} in the scrape: {:?}", e.samples))
}

#[test]
fn counters_move_with_the_work() {
    require_fuse();
    let blob = data((4 * MIB + 777) as usize, 11);
    let server = BlobServer::start(blob.clone());
    let place = Place::new();
    let addr = format!("127.0.0.1:{}", free_port());
    // No prefetcher: only the test's reads fetch, so the counts are exact.
    let d = Dedupd::start(
        &place,
        &["--metrics-address", &addr, "--no-prefetch", "--read-deadline-secs", "2"],
    );

    let before = scrape(&addr);
    for (family, kind) in [
        ("dedupd_fetches_total", "counter"),
        ("dedupd_fetched_bytes_total", "counter"),
        ("dedupd_fetch_errors_total", "counter"),
        ("dedupd_verify_failures_total", "counter"),
        ("dedupd_cache_hits_total", "counter"),
        ("dedupd_cache_misses_total", "counter"),
        ("dedupd_fetch_seconds", "histogram"),
    ] {
        assert_eq!(before.types.get(family).map(String::as_str), Some(kind), "{family}");
    }
    for name in [
        "dedupd_fetches_total",
        "dedupd_fetched_bytes_total",
        "dedupd_cache_hits_total",
        "dedupd_cache_misses_total",
        "dedupd_fetch_seconds_count",
    ] {
        assert_eq!(value(&before, name), 0.0, "{name} before any work");
    }

    // A read of one chunk: one range request, one miss, the chunk's bytes.
    let spec = spec_for(&blob, MIB, &server.addr, "layers/metrics");
    let digest = spec.digest.clone();
    let reg = d.client.register(&spec).unwrap();
    let file = std::fs::File::open(&reg.path).unwrap();
    assert!(read_at(&file, MIB + 5, 4096).unwrap() == blob[MIB as usize + 5..MIB as usize + 5 + 4096]);
    let after = scrape(&addr);
    assert_eq!(value(&after, "dedupd_fetches_total"), 1.0);
    assert_eq!(value(&after, "dedupd_fetched_bytes_total"), MIB as f64);
    assert!(value(&after, "dedupd_cache_misses_total") >= 1.0);
    assert_eq!(value(&after, "dedupd_fetch_seconds_count"), 1.0);
    assert!(value(&after, "dedupd_fetch_seconds_sum") > 0.0);
    assert_eq!(after.get("dedupd_fetch_seconds_bucket", &[("le", "+Inf")]), Some(1.0));
    assert_eq!(
        after.get("dedupd_blob_present_bytes", &[("digest", &digest)]),
        Some(MIB as f64)
    );
    assert_eq!(
        after.get("dedupd_blob_size_bytes", &[("digest", &digest)]),
        Some(blob.len() as f64)
    );

    // The same bytes again, past the page cache: a hit, nothing fetched.
    drop_page_cache(&file);
    read_at(&file, MIB + 5, 4096).unwrap();
    let again = scrape(&addr);
    assert!(value(&again, "dedupd_cache_hits_total") > value(&after, "dedupd_cache_hits_total"));
    assert_eq!(value(&again, "dedupd_fetches_total"), 1.0);

    // A registry that answers 503, then one that sends corrupt bytes: the read fails (EIO) and
    // the errors are counted.
    server.set_mode(Mode::Unavailable);
    assert!(read_at(&file, 2 * MIB, 4096).is_err());
    let unavailable = scrape(&addr);
    assert!(value(&unavailable, "dedupd_fetch_errors_total") >= 1.0);
    assert_eq!(value(&unavailable, "dedupd_verify_failures_total"), 0.0);
    server.set_mode(Mode::Corrupt);
    assert!(read_at(&file, 3 * MIB, 4096).is_err());
    let corrupt = scrape(&addr);
    assert!(value(&corrupt, "dedupd_verify_failures_total") >= 1.0);
    assert!(value(&corrupt, "dedupd_fetches_total") > value(&unavailable, "dedupd_fetches_total"));
    // Only verified chunks count as present.
    assert_eq!(
        corrupt.get("dedupd_blob_present_bytes", &[("digest", &digest)]),
        Some(MIB as f64)
    );

    // The control socket's Metrics is the same exposition.
    let over_socket = Exposition::parse(&d.metrics()).unwrap();
    assert!(value(&over_socket, "dedupd_fetches_total") >= value(&corrupt, "dedupd_fetches_total"));

    // Unregistered: the blob's gauges go.
    drop(file);
    d.client.unregister(&digest).unwrap();
    let gone = scrape(&addr);
    assert_eq!(
        gone.matching("dedupd_blob_size_bytes", &[]).count(),
        0,
        "{:?}",
        gone.samples
    );
}
