//! zstd layers: single frame, multi-frame, skippable frames, errors.

mod common;

use common::*;
use tar_index::{Error, Format};

const K64: u64 = 64 << 10;
const M1: u64 = 1 << 20;

#[test]
fn single_frame() {
    for (seed, size) in [(0u64, 0usize), (1, 1), (2, 1000), (3, 300_000), (4, 512 << 10)] {
        let plain = gen(seed, size, 50 << 10);
        for blob in [zstd_frame(&plain, 3), zstd_streamed(&plain, 19)] {
            for cs in [K64, M1] {
                check(Format::Zstd, &blob, &plain, cs, Expect::Index);
            }
        }
    }
}

#[test]
fn big_single_frame_has_no_random_access() {
    let plain = gen(5, 5 << 20, 1 << 20);
    for blob in [zstd_frame(&plain, 3), zstd_streamed(&plain, 1)] {
        // What `zstd` and containerd make: one frame, too far for 64 KiB chunks...
        check(Format::Zstd, &blob, &plain, K64, Expect::NoRandomAccess);
        // ...within 8 chunks of 1 MiB.
        check(Format::Zstd, &blob, &plain, M1, Expect::Index);
    }
}

#[test]
fn multi_frame() {
    let plain = gen(6, 9 << 20, 2 << 20);
    for (frame, cs, expect) in [
        (256 << 10, K64, Expect::Index),
        (256 << 10, M1, Expect::Index),
        (1 << 20, M1, Expect::Index),
        // Frames of 1 MiB are 16 chunks of 64 KiB: the last ones are too far.
        (1 << 20, K64, Expect::NoRandomAccess),
        // Frames not aligned with chunks.
        (300_001, K64, Expect::Index),
        (100_000, M1, Expect::Index),
    ] {
        let blob = zstd_frames(&plain, frame, 3);
        let ix = check(Format::Zstd, &blob, &plain, cs, expect);
        if let Some(ix) = ix {
            let frames = plain.len().div_ceil(frame);
            assert!(ix.checkpoints() <= frames);
            assert!(ix.checkpoints() as u64 >= ix.chunk_count().min(frames as u64) / 8);
        }
    }
}

#[test]
fn big_multi_frame() {
    let plain = gen(7, 40 << 20, 4 << 20);
    let blob = zstd_frames(&plain, 1 << 20, 1);
    let ix = check(Format::Zstd, &blob, &plain, M1, Expect::Index).unwrap();
    assert_eq!(ix.checkpoints(), 40);
    let bytes = ix.to_bytes();
    // No windows for zstd: header + 24 bytes per checkpoint + 44 per chunk.
    assert_eq!(bytes.len(), 100 + 40 * 24 + 40 * 44);
}

#[test]
fn skippable_frames() {
    let a = gen(8, 700_000, 10 << 10);
    let b = gen(9, 500_000, 10 << 10);
    let mut blob = skippable_frame(b"at the start");
    blob.extend(zstd_frames(&a, 200_000, 3));
    blob.extend(skippable_frame(&[7; 5000]));
    blob.extend(skippable_frame(&[]));
    blob.extend(zstd_frames(&b, 100_000, 5));
    blob.extend(skippable_frame(b"at the end"));
    let plain = [a.as_slice(), &b].concat();
    for cs in [K64, M1] {
        check(Format::Zstd, &blob, &plain, cs, Expect::Index);
    }
    // Only skippable frames: no output, no chunks.
    let only = skippable_frame(b"nothing");
    let ix = check(Format::Zstd, &only, &[], K64, Expect::Index).unwrap();
    assert_eq!(ix.chunk_count(), 0);
    assert_eq!(ix.checkpoints(), 0);
}

#[test]
fn empty_frames_between() {
    let a = gen(10, 200_000, 0);
    let mut blob = zstd_frame(&[], 3);
    blob.extend(zstd_frame(&a[..65536], 3));
    blob.extend(zstd_frame(&[], 3));
    blob.extend(zstd_frame(&a[65536..], 3));
    blob.extend(zstd_frame(&[], 3));
    check(Format::Zstd, &blob, &a, K64, Expect::Index);
}

#[test]
fn refuses_what_the_plain_decoder_refuses() {
    let plain = gen(11, 400_000, 10 << 10);
    let blob = zstd_frames(&plain, 100_000, 3);
    assert!(same_verdict(Format::Zstd, &blob));
    assert!(!same_verdict(Format::Zstd, &[]));
    for cut in [1, 4, 5, 8, 100, blob.len() / 2, blob.len() - 4, blob.len() - 1] {
        assert!(!same_verdict(Format::Zstd, &blob[..cut]), "cut {cut}");
    }
    for tail in [
        &[0u8][..],
        &[0; 16],
        &[0x28, 0xb5, 0x2f, 0xfd],
        b"garbage",
        &[0x50, 0x2a, 0x4d, 0x18, 9, 0, 0, 0, 1],
    ] {
        let mut b = blob.clone();
        b.extend_from_slice(tail);
        assert!(!same_verdict(Format::Zstd, &b), "tail {tail:?}");
    }
}

#[test]
fn mutations_get_the_same_verdict() {
    let plain = gen(12, 60_000, 1000);
    let mut blob = zstd_streamed(&plain, 3);
    blob.extend(skippable_frame(b"xx"));
    blob.extend(zstd_frame(&plain[..9000], 1));
    let (ok, bad) = mutation_verdicts(Format::Zstd, &blob, 9);
    eprintln!("mutated zstd: {ok} accepted, {bad} refused by both");
    assert!(bad > 0);
}

#[test]
fn no_random_access_reports_distance() {
    let plain = gen(13, 2 << 20, 0);
    let blob = zstd_frame(&plain, 3);
    let (out, res) = index_stream(Format::Zstd, &blob, K64, 1);
    assert!(out.unwrap() == plain);
    match res {
        Err(Error::NoRandomAccess { max_distance, limit }) => {
            assert_eq!(limit, 8 * K64);
            // The last chunk starts 2 MiB - 64 KiB after the only frame start.
            assert_eq!(max_distance, (2 << 20) - K64);
        }
        other => panic!("{other:?}"),
    }
}
