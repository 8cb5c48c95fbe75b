//! The lazy layers' annotations and chunk tables. A manifest's layer descriptors (as
//! the snapshotter reads them at Prepare) and the fetch daemon's control requests (as
//! `dedupd` reads them) are parsed from arbitrary JSON. Nothing may panic, and what
//! the parsers accept must be usable: a lazy layer the annotations describe gives a
//! chunk table the fetch daemon accepts, whose chunks tile the blob exactly.
#![no_main]

use image_convert::annotations::LazyLayer;
use libfuzzer_sys::fuzz_target;
use registry::Descriptor;

/// The chunk table's ranges tile `[0, size)`, each at most `chunk_size` long; each chunk
/// has one fetch range (a validated spec has as many chunks as digests: no huge table).
fn check_spec(spec: &fetch_api::BlobSpec) {
    assert_eq!(spec.fetch_ranges().len() as u64, spec.chunk_count());
    let n = spec.chunk_count();
    assert_eq!(n, spec.chunk_digests.len() as u64);
    let mut at = 0;
    for i in 0..n.min(1 << 16) {
        let (s, e) = spec.chunk_range(i);
        assert_eq!(s, at, "chunk {i} of {spec:?} does not start where the last ended");
        assert!(e > s && e - s <= spec.chunk_size, "chunk {i} of {spec:?}: {s}..{e}");
        at = e;
    }
    if n <= 1 << 16 {
        assert_eq!(at, spec.size, "the chunks of {spec:?} do not cover the blob");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    // The fetch daemon's side: a control request.
    if let Ok(fetch_api::Request::Register(spec)) = serde_json::from_value::<fetch_api::Request>(v.clone()) {
        if spec.validate().is_ok() {
            check_spec(&spec);
        }
    }
    // The snapshotter's side: the layers of a manifest.
    let Ok(layers) = serde_json::from_value::<Vec<Descriptor>>(v["layers"].clone()) else {
        return;
    };
    for desc in &layers {
        let Ok(lazy) = LazyLayer::from_descriptor(desc) else {
            continue;
        };
        assert_eq!(lazy.size, desc.size);
        assert!(lazy.data_offset <= lazy.image_size());
        if let Some(z) = &lazy.zstd {
            // The frames fit in the blob, one per chunk of the image.
            assert_eq!(z.sizes.len(), lazy.chunk_digests.len());
            assert!(z.sizes.iter().map(|&n| u64::from(n)).sum::<u64>() <= lazy.size);
        }
        let meta = lazy.metadata_chunks();
        assert!(u64::from(meta.end) <= lazy.chunk_digests.len() as u64);
        // What the annotations say round-trips.
        let again = Descriptor {
            annotations: Some(lazy.annotations()),
            ..desc.clone()
        };
        assert_eq!(LazyLayer::from_descriptor(&again).as_ref(), Ok(&lazy));
        // And the fetch daemon accepts the chunk table the snapshotter registers.
        let spec = fetch_api::BlobSpec {
            digest: lazy.digest.clone(),
            size: lazy.image_size(),
            chunk_size: lazy.chunk_size,
            chunk_digests: lazy.chunk_digests.clone(),
            prefetch: meta.chain(lazy.prefetch.iter().copied()).collect(),
            source: fetch_api::Source {
                registry: "r".into(),
                repository: "x".into(),
            },
            compressed: lazy.zstd.as_ref().map(|z| fetch_api::ChunkCompression {
                algorithm: fetch_api::CompressionAlgorithm::Zstd,
                sizes: z.sizes.clone(),
                uncompressed_digest: z.uncompressed_digest.clone(),
                index: None,
            }),
        };
        if let Err(e) = spec.validate() {
            panic!("annotations accepted for {desc:?} give a chunk table dedupd refuses: {e}");
        }
        check_spec(&spec);
    }
});
