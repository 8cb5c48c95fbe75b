//! gzip layers: flate2 at several levels, multi-member, pigz, fancy headers, errors.

mod common;

use common::*;
use tar_index::{ErrorKind, Format, IndexOptions, Indexer};

const K64: u64 = 64 << 10;
const M1: u64 = 1 << 20;

#[test]
fn sizes_levels_and_chunk_sizes() {
    let sizes = [
        0usize,
        1,
        1000,
        (64 << 10) - 1,
        64 << 10,
        (64 << 10) + 1,
        700_000,
        3 << 20,
    ];
    for (n, &size) in sizes.iter().enumerate() {
        let plain = gen(n as u64, size, 200 << 10);
        for level in [1, 6, 9] {
            let blob = gzip(&plain, level);
            for cs in [K64, M1] {
                // flate2 on zlib-rs at level 1 writes one fixed-Huffman block per stream
                // (zlib-ng's deflate_quick): no block boundary to restart from.
                let expect = if level == 1 && plain.len() as u64 > 8 * cs {
                    Expect::Any
                } else {
                    Expect::Index
                };
                check(Format::Gzip, &blob, &plain, cs, expect);
            }
        }
    }
}

#[test]
fn big_mixed_input() {
    // ~40 MiB, zero runs up to 4 MiB (deflate blocks of several MiB).
    let plain = gen(40, 40 << 20, 4 << 20);
    let blob = gzip(&plain, 6);
    let ix = check(Format::Gzip, &blob, &plain, M1, Expect::Index).unwrap();
    assert!(ix.checkpoints() > 20, "{}", ix.checkpoints());
    eprintln!(
        "40 MiB level 6, 1 MiB chunks: {} chunks, {} checkpoints, index {} bytes for {} compressed",
        ix.chunk_count(),
        ix.checkpoints(),
        ix.to_bytes().len(),
        blob.len()
    );
    // Those zero runs are too far from any block boundary for 64 KiB chunks.
    check(Format::Gzip, &blob, &plain, K64, Expect::NoRandomAccess);
}

#[test]
fn moderate_zero_runs_with_small_chunks() {
    let plain = gen(41, 12 << 20, 64 << 10);
    for level in [6, 9] {
        let blob = gzip(&plain, level);
        check(Format::Gzip, &blob, &plain, K64, Expect::Index);
    }
}

#[test]
fn gzip_cli_levels() {
    // GNU gzip's deflate (zlib-style blocks at every level).
    if !std::path::Path::new("/usr/bin/gzip").exists() {
        eprintln!("gzip not installed: skipped");
        return;
    }
    let plain = gen(42, 5 << 20, 64 << 10);
    for level in ["-1", "-6", "-9"] {
        let blob = run_filter("/usr/bin/gzip", &[level, "-n", "-c"], &plain);
        for cs in [K64, M1] {
            check(Format::Gzip, &blob, &plain, cs, Expect::Index);
        }
    }
}

#[test]
fn single_block_stream_has_no_random_access() {
    // flate2 (zlib-rs) level 1: one fixed-Huffman block for the whole stream.
    let plain = gen(43, 3 << 20, 1000);
    let blob = gzip(&plain, 1);
    check(Format::Gzip, &blob, &plain, K64, Expect::NoRandomAccess);
    // At 1 MiB chunks, 3 MiB is within reach of the stream start.
    check(Format::Gzip, &blob, &plain, M1, Expect::Index);
}

#[test]
fn multi_member() {
    let a = gen(1, 1_500_000, 100 << 10);
    let b = gen(2, 300_000, 100 << 10);
    let c = gen(3, 2_000_001, 100 << 10);
    let mut blob = gzip(&a, 6);
    blob.extend(gzip(&b, 1));
    blob.extend(gzip(&[], 6)); // an empty member
    blob.extend(gzip_fancy_header(&c, 9));
    let plain = [a.as_slice(), &b, &c].concat();
    for cs in [K64, M1] {
        check(Format::Gzip, &blob, &plain, cs, Expect::Index);
    }
    // Members of exactly one chunk each: member starts on chunk boundaries.
    let d = gen(4, 64 << 10, 0);
    let e = gen(5, 128 << 10, 0);
    let mut blob = gzip(&d, 6);
    blob.extend(gzip(&e, 6));
    blob.extend(gzip(&d, 1));
    let plain = [d.as_slice(), &e, &d].concat();
    let ix = check(Format::Gzip, &blob, &plain, K64, Expect::Index).unwrap();
    // At least the three member starts (chunks 0, 1 and 3 start there).
    assert!(ix.checkpoints() >= 3);
}

#[test]
fn many_tiny_members() {
    let mut blob = Vec::new();
    let mut plain = Vec::new();
    for i in 0..300u64 {
        let p = gen(i, (i as usize * 7919) % 5000, 100);
        blob.extend(gzip(&p, (i % 10) as u32));
        plain.extend(p);
    }
    check(Format::Gzip, &blob, &plain, K64, Expect::Index);
}

#[test]
fn fancy_header() {
    let plain = gen(9, 900_000, 50 << 10);
    let blob = gzip_fancy_header(&plain, 6);
    check(Format::Gzip, &blob, &plain, K64, Expect::Index);
    // flate2's GzBuilder header (FNAME, FCOMMENT, FEXTRA).
    let mut e = flate2::GzBuilder::new()
        .filename("layer.tar")
        .comment("comment")
        .extra(vec![1, 2, 3, 4])
        .write(Vec::new(), flate2::Compression::new(9));
    std::io::Write::write_all(&mut e, &plain).unwrap();
    let blob = e.finish().unwrap();
    check(Format::Gzip, &blob, &plain, M1, Expect::Index);
}

#[test]
fn pigz_outputs() {
    if pigz_path().is_none() {
        eprintln!("pigz not installed: skipped");
        return;
    }
    let plain = gen(11, 6 << 20, 100 << 10);
    for args in [
        &["-6"][..],
        &["-b", "128"],
        &["-b", "128", "-p", "2", "-9"],
        &["-1", "-b", "32"],
        &["-i", "-6"],
        &["-11"],
    ] {
        let blob = pigz(&plain, args);
        for cs in [K64, M1] {
            check(Format::Gzip, &blob, &plain, cs, Expect::Index);
        }
    }
    // Two pigz members concatenated.
    let second = gen(12, 1 << 20, 0);
    let mut blob = pigz(&plain, &["-b", "128"]);
    blob.extend(pigz(&second, &["-1"]));
    let all = [plain.as_slice(), &second].concat();
    check(Format::Gzip, &blob, &all, K64, Expect::Index);
}

#[test]
fn stored_blocks() {
    // Level 0: stored blocks only (byte-aligned boundaries).
    let plain = gen(13, 2 << 20, 1000);
    let blob = gzip(&plain, 0);
    check(Format::Gzip, &blob, &plain, K64, Expect::Index);
}

#[test]
fn refuses_what_the_plain_decoder_refuses() {
    let plain = gen(20, 300_000, 10 << 10);
    let blob = gzip(&plain, 6);
    // Empty input, truncations, trailing bytes.
    assert!(!same_verdict(Format::Gzip, &[]));
    for cut in [
        1,
        5,
        9,
        10,
        11,
        100,
        blob.len() / 2,
        blob.len() - 9,
        blob.len() - 8,
        blob.len() - 4,
        blob.len() - 1,
    ] {
        assert!(!same_verdict(Format::Gzip, &blob[..cut]), "cut at {cut}");
    }
    for tail in [
        &[0u8][..],
        &[0; 20],
        &[0x1f],
        &[0x1f, 0x8b],
        &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3],
        b"garbage",
    ] {
        let mut b = blob.clone();
        b.extend_from_slice(tail);
        assert!(!same_verdict(Format::Gzip, &b), "tail {tail:?}");
    }
    // A second member cut short.
    let mut b = blob.clone();
    b.extend_from_slice(&blob[..blob.len() / 3]);
    assert!(!same_verdict(Format::Gzip, &b));
    // Bad CRC, bad length.
    for pos in [blob.len() - 8, blob.len() - 2] {
        let mut b = blob.clone();
        b[pos] ^= 1;
        assert!(!same_verdict(Format::Gzip, &b));
    }
    // The valid blob and two members pass.
    assert!(same_verdict(Format::Gzip, &blob));
    let two = [blob.as_slice(), &blob].concat();
    assert!(same_verdict(Format::Gzip, &two));
}

#[test]
fn mutations_get_the_same_verdict() {
    let plain = gen(21, 40_000, 1000);
    let mut blob = gzip_fancy_header(&plain, 6);
    blob.extend(gzip(&plain[..5000], 1));
    let (ok, bad) = mutation_verdicts(Format::Gzip, &blob, 5);
    eprintln!("mutated gzip: {ok} accepted, {bad} refused by both");
    assert!(bad > 0);
}

#[test]
fn too_large() {
    let plain = gen(30, 1 << 20, 0);
    let blob = gzip(&plain, 6);
    let opts = IndexOptions {
        chunk_size: 64 << 10,
        max_uncompressed: (1 << 20) - 1,
    };
    let mut ix = Indexer::new(Format::Gzip, blob.as_slice(), opts).unwrap();
    let mut out = Vec::new();
    let err = std::io::Read::read_to_end(&mut ix, &mut out).unwrap_err();
    assert_eq!(out.len() as u64, opts.max_uncompressed);
    assert_eq!(tar_index::Error::from(err).kind(), ErrorKind::TooLarge);
    assert_eq!(ix.finish().unwrap_err().kind(), ErrorKind::TooLarge);
    // Exactly at the limit is fine.
    let opts = IndexOptions {
        chunk_size: 64 << 10,
        max_uncompressed: 1 << 20,
    };
    let ix = Indexer::new(Format::Gzip, blob.as_slice(), opts).unwrap();
    let index = ix.finish().unwrap();
    assert_eq!(index.uncompressed_size, 1 << 20);
}

#[test]
fn finish_reads_the_rest() {
    let plain = gen(31, 2 << 20, 1000);
    let blob = gzip(&plain, 6);
    let mut ix = Indexer::new(Format::Gzip, blob.as_slice(), IndexOptions::with_chunk_size(K64)).unwrap();
    let mut head = [0u8; 1000];
    std::io::Read::read_exact(&mut ix, &mut head).unwrap();
    assert_eq!(&head[..], &plain[..1000]);
    let index = ix.finish().unwrap();
    verify_index(&index, Format::Gzip, &blob, &plain, K64);
}

#[test]
fn io_errors_pass_through() {
    struct Failing;
    impl std::io::Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "boom"))
        }
    }
    let mut ix = Indexer::new(Format::Gzip, Failing, IndexOptions::default()).unwrap();
    let e = std::io::Read::read(&mut ix, &mut [0; 10]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    let e = ix.finish().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    let bad = IndexOptions::with_chunk_size(1000);
    assert_eq!(
        Indexer::new(Format::Gzip, &[][..], bad).err().unwrap().kind(),
        ErrorKind::InvalidOptions
    );
}
