//! Tar indexes and tar-index bundles come from registries: `Index::from_bytes` and
//! `Bundle::from_bytes` must refuse anything malformed with an error, never a panic or a
//! huge allocation, and an index they accept must decode any bytes given for any chunk
//! without panicking, to exactly the chunk's length or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = image_convert::Bundle::from_bytes(data);
    // The first byte splits the input: an index, then the bytes given to its chunks.
    let Some((&cut, rest)) = data.split_first() else { return };
    let at = (usize::from(cut) * rest.len() / 255).min(rest.len());
    let (index, raw) = rest.split_at(at);
    let Ok(ix) = tar_index::Index::from_bytes(index) else { return };
    for i in 0..ix.chunk_count().min(4) {
        let (start, end) = ix.chunk_range(i);
        if let Ok(out) = ix.decode_chunk(i, raw) {
            assert_eq!(out.len() as u64, end - start, "chunk {i} decoded to the wrong length");
        }
    }
    // What an accepted index serializes to is accepted again.
    let again = tar_index::Index::from_bytes(&ix.to_bytes()).expect("an accepted index round-trips");
    assert_eq!(again.to_bytes(), ix.to_bytes());
});
