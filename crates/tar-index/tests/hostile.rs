//! `from_bytes` on hostile input, `decode_chunk` on hostile ranges and indexes.

mod common;

use common::*;
use tar_index::{ErrorKind, Format, Index};

const K64: u64 = 64 << 10;

/// The serialized layout (see src/wire.rs), for crafting indexes field by field.
#[derive(Clone, Debug)]
struct RawIx {
    magic: [u8; 4],
    version: u16,
    format: u8,
    shift: u8,
    wlog: u8,
    reserved: [u8; 3],
    unc: u64,
    comp: u64,
    cdig: [u8; 32],
    udig: [u8; 32],
    ncp: Option<u32>,
    nch: Option<u32>,
    cps: Vec<RawCp>,
    chunks: Vec<RawChunk>,
    trailing: Vec<u8>,
}

#[derive(Clone, Debug)]
struct RawCp {
    in_off: u64,
    out_off: u64,
    kind: u8,
    bits: u8,
    partial: u8,
    reserved: u8,
    window: Vec<u8>,
    wlen: Option<u32>,
}

#[derive(Clone, Debug)]
struct RawChunk {
    digest: [u8; 32],
    cp: u32,
    fetch_end: u64,
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

impl RawIx {
    fn parse(b: &[u8]) -> RawIx {
        let ncp = le32(b, 92) as usize;
        let nch = le32(b, 96) as usize;
        let mut cps = Vec::new();
        let mut wpos = 100 + 24 * ncp + 44 * nch;
        for i in 0..ncp {
            let at = 100 + 24 * i;
            let wlen = le32(b, at + 20) as usize;
            cps.push(RawCp {
                in_off: le64(b, at),
                out_off: le64(b, at + 8),
                kind: b[at + 16],
                bits: b[at + 17],
                partial: b[at + 18],
                reserved: b[at + 19],
                window: b[wpos..wpos + wlen].to_vec(),
                wlen: None,
            });
            wpos += wlen;
        }
        assert_eq!(wpos, b.len());
        let chunks = (0..nch)
            .map(|j| {
                let at = 100 + 24 * ncp + 44 * j;
                RawChunk {
                    digest: b[at..at + 32].try_into().unwrap(),
                    cp: le32(b, at + 32),
                    fetch_end: le64(b, at + 36),
                }
            })
            .collect();
        RawIx {
            magic: b[0..4].try_into().unwrap(),
            version: u16::from_le_bytes([b[4], b[5]]),
            format: b[6],
            shift: b[7],
            wlog: b[8],
            reserved: b[9..12].try_into().unwrap(),
            unc: le64(b, 12),
            comp: le64(b, 20),
            cdig: b[28..60].try_into().unwrap(),
            udig: b[60..92].try_into().unwrap(),
            ncp: None,
            nch: None,
            cps,
            chunks,
            trailing: Vec::new(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&self.magic);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.push(self.format);
        b.push(self.shift);
        b.push(self.wlog);
        b.extend_from_slice(&self.reserved);
        b.extend_from_slice(&self.unc.to_le_bytes());
        b.extend_from_slice(&self.comp.to_le_bytes());
        b.extend_from_slice(&self.cdig);
        b.extend_from_slice(&self.udig);
        b.extend_from_slice(&self.ncp.unwrap_or(self.cps.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.nch.unwrap_or(self.chunks.len() as u32).to_le_bytes());
        for c in &self.cps {
            b.extend_from_slice(&c.in_off.to_le_bytes());
            b.extend_from_slice(&c.out_off.to_le_bytes());
            b.extend_from_slice(&[c.kind, c.bits, c.partial, c.reserved]);
            b.extend_from_slice(&c.wlen.unwrap_or(c.window.len() as u32).to_le_bytes());
        }
        for c in &self.chunks {
            b.extend_from_slice(&c.digest);
            b.extend_from_slice(&c.cp.to_le_bytes());
            b.extend_from_slice(&c.fetch_end.to_le_bytes());
        }
        for c in &self.cps {
            b.extend_from_slice(&c.window);
        }
        b.extend_from_slice(&self.trailing);
        b
    }
}

/// A gzip layer of three members with block checkpoints (windows) and member starts.
fn gzip_case() -> (Vec<u8>, Vec<u8>, Index) {
    let a = gen(100, 900_000, 20 << 10);
    let b = gen(101, 200_000, 0);
    let mut blob = gzip(&a, 6);
    blob.extend(gzip_fancy_header(&b, 9));
    blob.extend(gzip(&a[..300_000], 6));
    let plain = [a.as_slice(), &b, &a[..300_000]].concat();
    let ix = check(Format::Gzip, &blob, &plain, K64, Expect::Index).unwrap();
    (blob, plain, ix)
}

fn zstd_case() -> (Vec<u8>, Vec<u8>, Index) {
    let plain = gen(102, 1_000_000, 20 << 10);
    let blob = zstd_frames(&plain, 128 << 10, 3);
    let ix = check(Format::Zstd, &blob, &plain, K64, Expect::Index).unwrap();
    (blob, plain, ix)
}

#[track_caller]
fn refused(raw: &RawIx, what: &str) {
    match Index::from_bytes(&raw.bytes()) {
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::BadIndex, "{what}: {e}");
        }
        Ok(_) => panic!("{what}: accepted"),
    }
}

#[test]
fn baseline_parses() {
    let (_, _, ix) = gzip_case();
    let bytes = ix.to_bytes();
    let raw = RawIx::parse(&bytes);
    assert_eq!(raw.bytes(), bytes);
    assert!(raw.cps.iter().any(|c| c.kind == 1 && !c.window.is_empty()));
    assert!(raw.cps.iter().filter(|c| c.kind == 0).count() >= 3);
    assert!(raw.cps.iter().any(|c| c.bits != 0));
    Index::from_bytes(&bytes).unwrap();
}

#[test]
fn truncation_and_trailing_bytes() {
    for (_, _, ix) in [gzip_case(), zstd_case()] {
        let bytes = ix.to_bytes();
        for n in 0..bytes.len() {
            let e = Index::from_bytes(&bytes[..n]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::BadIndex, "prefix {n}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(Index::from_bytes(&long).unwrap_err().kind(), ErrorKind::BadIndex);
    }
}

#[test]
fn header_fields() {
    let (_, _, ix) = gzip_case();
    let base = RawIx::parse(&ix.to_bytes());
    let mut r = base.clone();
    r.magic = *b"TIDY";
    refused(&r, "magic");
    for v in [0, 2, 0xffff] {
        let mut r = base.clone();
        r.version = v;
        refused(&r, "version");
    }
    for f in [0, 3, 255] {
        let mut r = base.clone();
        r.format = f;
        refused(&r, "format");
    }
    // Chunk sizes are powers of two by construction (a shift); out of range refused.
    for s in [0, 15, 27, 63, 64, 200] {
        let mut r = base.clone();
        r.shift = s;
        refused(&r, "chunk size");
    }
    // Another valid chunk size makes the chunk count inconsistent.
    let mut r = base.clone();
    r.shift = 17;
    refused(&r, "chunk count vs chunk size");
    let mut r = base.clone();
    r.unc += K64;
    refused(&r, "chunk count vs size");
    let mut r = base.clone();
    r.unc -= 1; // still the same count unless on a boundary: then the last chunk
    if r.unc.div_ceil(K64) == base.unc.div_ceil(K64) {
        // Same count: only the last chunk's length changes; the index stays coherent.
        assert!(Index::from_bytes(&r.bytes()).is_ok());
    } else {
        refused(&r, "chunk count");
    }
    let mut r = base.clone();
    r.wlog = 20;
    refused(&r, "window log for gzip");
    let mut r = base.clone();
    r.reserved = [0, 1, 0];
    refused(&r, "reserved");
    // Counts that do not fit the data: no allocation from them.
    for (ncp, nch) in [
        (Some(u32::MAX), None),
        (None, Some(u32::MAX)),
        (Some(u32::MAX), Some(u32::MAX)),
    ] {
        let mut r = base.clone();
        r.ncp = ncp;
        r.nch = nch;
        refused(&r, "huge counts");
    }
    let mut r = base.clone();
    r.ncp = Some(base.cps.len() as u32 - 1);
    refused(&r, "fewer checkpoints");
    let mut r = base.clone();
    r.comp = base.chunks.last().unwrap().fetch_end - 1;
    refused(&r, "compressed size below a fetch range");
}

#[test]
fn checkpoint_fields() {
    let (_, _, ix) = gzip_case();
    let base = RawIx::parse(&ix.to_bytes());
    let blk = base.cps.iter().position(|c| c.kind == 1 && c.bits != 0).unwrap();
    let start = base.cps.iter().skip(1).position(|c| c.kind == 0).unwrap() + 1;

    let mut r = base.clone();
    r.cps[blk].bits = 8;
    refused(&r, "bits > 7");
    let mut r = base.clone();
    r.cps[blk].partial = 0xff;
    refused(&r, "partial byte beyond its bits");
    let mut r = base.clone();
    r.cps[blk].kind = 2;
    refused(&r, "kind");
    let mut r = base.clone();
    r.cps[blk].reserved = 1;
    refused(&r, "reserved");
    // Not strictly increasing.
    let mut r = base.clone();
    r.cps[blk].in_off = r.cps[blk - 1].in_off;
    refused(&r, "in offsets not increasing");
    let mut r = base.clone();
    r.cps[blk].out_off = r.cps[blk - 1].out_off;
    refused(&r, "out offsets not increasing");
    let mut r = base.clone();
    r.cps.swap(blk, blk - 1);
    refused(&r, "swapped");
    // Offsets beyond the layer.
    let mut r = base.clone();
    let last = r.cps.len() - 1;
    r.cps[last].in_off = r.comp;
    refused(&r, "in_off beyond");
    let mut r = base.clone();
    r.cps[last].out_off = r.unc;
    refused(&r, "out_off beyond");
    // A member start with a window or bits.
    let mut r = base.clone();
    r.cps[start].window = zstd_frame(&[1; 100], 3);
    refused(&r, "window on a stream start");
    let mut r = base.clone();
    r.cps[start].bits = 3;
    refused(&r, "bits on a stream start");
    // Windows: too big, garbage, two frames, reaching before the stream, length lies.
    let mut r = base.clone();
    r.cps[blk].window = zstd_frame(&vec![5; 32769], 3);
    refused(&r, "window > 32 KiB");
    let mut r = base.clone();
    r.cps[blk].window = zstd_frame(&vec![5; 32768], 3);
    assert!(Index::from_bytes(&r.bytes()).is_ok(), "a full 32 KiB window is fine");
    let mut r = base.clone();
    r.cps[blk].window = vec![1, 2, 3, 4, 5, 6, 7, 8, 9];
    refused(&r, "window garbage");
    let mut r = base.clone();
    let mut two = zstd_frame(&[1; 10], 3);
    two.extend(zstd_frame(&[2; 10], 3));
    r.cps[blk].window = two;
    refused(&r, "window of two frames");
    let mut r = base.clone();
    let mut w = r.cps[blk].window.clone();
    w.push(0);
    r.cps[blk].window = w;
    refused(&r, "window with a trailing byte");
    let mut r = base.clone();
    r.cps[blk].wlen = Some(r.cps[blk].window.len() as u32 + 1);
    refused(&r, "window length off by one");
    let mut r = base.clone();
    r.cps[blk].wlen = Some(u32::MAX);
    refused(&r, "huge window length");
    // A window longer than the output before the first block checkpoint.
    let first_blk = base.cps.iter().position(|c| c.kind == 1).unwrap();
    if base.cps[first_blk].out_off < 32768 {
        let mut r = base.clone();
        r.cps[first_blk].window = zstd_frame(&vec![0; 32768], 3);
        refused(&r, "window before the layer start");
    }
}

#[test]
fn zstd_with_windows_or_blocks() {
    let (_, _, ix) = zstd_case();
    let base = RawIx::parse(&ix.to_bytes());
    assert!(base.cps.len() > 2);
    let mut r = base.clone();
    r.cps[1].window = zstd_frame(&[1; 100], 3);
    refused(&r, "a window in a zstd index");
    let mut r = base.clone();
    r.cps[1].kind = 1;
    refused(&r, "a block checkpoint in a zstd index");
    let mut r = base.clone();
    r.cps[1].kind = 1;
    r.cps[1].window = zstd_frame(&[1; 100], 3);
    refused(&r, "a gzip checkpoint in a zstd index");
    for w in [0, 9, 28, 255] {
        let mut r = base.clone();
        r.wlog = w;
        refused(&r, "zstd window log");
    }
}

#[test]
fn chunk_fields() {
    let (_, _, ix) = gzip_case();
    let base = RawIx::parse(&ix.to_bytes());
    // A chunk whose checkpoint changes to the next one: that checkpoint lies after the
    // chunk start (or the order breaks).
    let j = (1..base.chunks.len())
        .find(|&j| base.chunks[j].cp == base.chunks[j - 1].cp)
        .unwrap();
    let mut r = base.clone();
    r.chunks[j - 1].cp += 1;
    refused(&r, "checkpoint after the chunk");
    let mut r = base.clone();
    r.chunks[j].cp += 1;
    refused(&r, "checkpoint after the chunk");
    let mut r = base.clone();
    r.chunks[0].cp = 1;
    refused(&r, "first chunk not on the first checkpoint");
    let mut r = base.clone();
    r.chunks[j].cp = base.cps.len() as u32 + 5;
    refused(&r, "missing checkpoint");
    let mut r = base.clone();
    r.chunks[j].cp = u32::MAX;
    refused(&r, "checkpoint u32::MAX");
    // Fetch ranges: empty, before the checkpoint, beyond the blob.
    let cp_in = base.cps[base.chunks[j].cp as usize].in_off;
    for fe in [cp_in, cp_in.saturating_sub(1), base.comp + 1, u64::MAX] {
        let mut r = base.clone();
        r.chunks[j].fetch_end = fe;
        refused(&r, "fetch range");
    }
    // Unused checkpoint at the end.
    let mut r = base.clone();
    let last = r.cps.last().unwrap().clone();
    r.cps.push(RawCp {
        in_off: last.in_off + 1,
        out_off: last.out_off + 1,
        kind: 0,
        bits: 0,
        partial: 0,
        reserved: 0,
        window: vec![],
        wlen: None,
    });
    refused(&r, "unused checkpoint");
}

#[test]
fn checkpoint_too_far_before_a_chunk() {
    // Crafted: zstd, 64 KiB chunks, one checkpoint at 0 for every chunk.
    let craft = |chunks: u64| RawIx {
        magic: *b"TIDX",
        version: 1,
        format: 2,
        shift: 16,
        wlog: 20,
        reserved: [0; 3],
        unc: chunks * K64,
        comp: 1000,
        cdig: [0; 32],
        udig: [0; 32],
        ncp: None,
        nch: None,
        cps: vec![RawCp {
            in_off: 0,
            out_off: 0,
            kind: 0,
            bits: 0,
            partial: 0,
            reserved: 0,
            window: vec![],
            wlen: None,
        }],
        chunks: (0..chunks)
            .map(|_| RawChunk {
                digest: [0; 32],
                cp: 0,
                fetch_end: 1000,
            })
            .collect(),
        trailing: vec![],
    };
    // Chunk 8 starts 8 chunks after the checkpoint: the limit.
    let ok = Index::from_bytes(&craft(9).bytes()).unwrap();
    assert_eq!(ok.chunk_count(), 9);
    assert_eq!(ok.fetch_range(8), (0, 1000));
    refused(&craft(10), "chunk 9 chunks after its checkpoint");
    // Decoding garbage from the crafted index fails cleanly.
    for i in 0..9 {
        let e = ok.decode_chunk(i, &[0x28; 1000]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Decode);
    }
}

#[test]
fn random_flips_never_panic() {
    for (blob, plain, ix) in [gzip_case(), zstd_case()] {
        let bytes = ix.to_bytes();
        let mut rng = Rng::new(77);
        let (mut accepted, mut refused_n) = (0, 0);
        for round in 0..3000 {
            let mut b = bytes.clone();
            let flips = 1 + rng.below(4);
            for _ in 0..flips {
                // Mostly the tables; sometimes the windows.
                let i = if round % 3 == 0 {
                    rng.below(b.len() as u64) as usize
                } else {
                    rng.below((b.len() as u64).min(100 + 24 * 40 + 44 * 40)) as usize
                };
                b[i] ^= 1 << rng.below(8);
            }
            match Index::from_bytes(&b) {
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::BadIndex);
                    refused_n += 1;
                }
                Ok(p) => {
                    accepted += 1;
                    for i in 0..p.chunk_count() {
                        let (a, e) = p.fetch_range(i);
                        assert!(a < e && e <= p.compressed_size);
                        let raw = &blob[(a as usize).min(blob.len())..(e as usize).min(blob.len())];
                        if let Ok(got) = p.decode_chunk(i, raw) {
                            let (s, e) = p.chunk_range(i);
                            assert_eq!(got.len() as u64, e - s);
                            // Right bytes or wrong ones: the digest decides. Wrong
                            // bytes never pass an unflipped digest.
                            let right = (e as usize) <= plain.len() && got == plain[s as usize..e as usize];
                            if !right && Some(&p.chunk_digests[i as usize]) == ix.chunk_digests.get(i as usize) {
                                assert_ne!(sha(&got), p.chunk_digests[i as usize]);
                            }
                        }
                    }
                }
            }
        }
        eprintln!(
            "{:?}: {accepted} flipped indexes parsed, {refused_n} refused",
            ix.format
        );
        assert!(refused_n > 0);
    }
}

#[test]
fn random_raw_never_panics() {
    for (blob, _plain, ix) in [gzip_case(), zstd_case()] {
        let mut rng = Rng::new(3);
        for i in 0..ix.chunk_count() {
            let (a, e) = ix.fetch_range(i);
            let len = (e - a) as usize;
            for variant in 0..4 {
                let mut raw = blob[a as usize..e as usize].to_vec();
                match variant {
                    0 => rng.fill(&mut raw),
                    1 => raw.iter_mut().for_each(|b| *b = 0),
                    2 => {
                        for _ in 0..8 {
                            let k = rng.below(len as u64) as usize;
                            raw[k] ^= 1 << rng.below(8);
                        }
                    }
                    _ => raw.iter_mut().for_each(|b| *b = 0xff),
                }
                if let Ok(got) = ix.decode_chunk(i, &raw) {
                    let (s, e) = ix.chunk_range(i);
                    assert_eq!(got.len() as u64, e - s);
                }
            }
            // Truncated ranges: a Decode error.
            for cut in [0, 1, len / 2, len - 1] {
                let e = ix.decode_chunk(i, &blob[a as usize..a as usize + cut]).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Decode);
            }
        }
    }
}

#[test]
fn corrupted_windows_give_wrong_bytes_or_errors() {
    let (blob, plain, ix) = gzip_case();
    let base = RawIx::parse(&ix.to_bytes());
    let blocks: Vec<usize> = (0..base.cps.len()).filter(|&i| base.cps[i].kind == 1).collect();
    assert!(!blocks.is_empty());
    let mut wrong = 0;
    let mut errors = 0;
    let mut rng = Rng::new(11);
    for &c in &blocks {
        // The window's real content, damaged: a few flipped bytes, or replaced outright.
        let real = zstd::bulk::decompress(&base.cps[c].window, 32768).unwrap();
        for variant in 0..2 {
            let mut w = real.clone();
            if variant == 0 {
                for _ in 0..64 {
                    let k = rng.below(w.len() as u64) as usize;
                    w[k] = w[k].wrapping_add(1 + rng.below(255) as u8);
                }
            } else {
                rng.fill(&mut w);
            }
            let mut r = base.clone();
            r.cps[c].window = zstd_frame(&w, 3);
            let p = Index::from_bytes(&r.bytes()).unwrap();
            for i in 0..p.chunk_count() {
                if r.chunks[i as usize].cp as usize != c {
                    continue;
                }
                let (a, e) = p.fetch_range(i);
                match p.decode_chunk(i, &blob[a as usize..e as usize]) {
                    Ok(got) => {
                        let (s, e) = p.chunk_range(i);
                        if got != plain[s as usize..e as usize] {
                            assert_ne!(sha(&got), p.chunk_digests[i as usize]);
                            wrong += 1;
                        }
                    }
                    Err(e) => {
                        assert_eq!(e.kind(), ErrorKind::Decode);
                        errors += 1;
                    }
                }
            }
        }
    }
    eprintln!("damaged windows: {wrong} chunks decoded wrong (digest mismatch), {errors} errors");
    assert!(wrong + errors > 0);
}

#[test]
fn tampered_public_fields_never_panic() {
    let (blob, _plain, ix) = gzip_case();
    let n = ix.chunk_count();
    let (a, e) = ix.fetch_range(1);
    let raw = &blob[a as usize..e as usize];
    let mut t = ix.clone();
    t.chunk_size = 0;
    assert_eq!(t.chunk_count(), 0);
    assert_eq!(t.decode_chunk(1, raw).unwrap_err().kind(), ErrorKind::Decode);
    assert_eq!(
        Index::from_bytes(&t.to_bytes()).unwrap_err().kind(),
        ErrorKind::BadIndex
    );
    let mut t = ix.clone();
    t.chunk_size = 3 << 20;
    assert_eq!(t.decode_chunk(1, raw).unwrap_err().kind(), ErrorKind::Decode);
    let mut t = ix.clone();
    t.uncompressed_size = u64::MAX;
    assert!(t.decode_chunk(n + 5, raw).is_err());
    assert_eq!(
        Index::from_bytes(&t.to_bytes()).unwrap_err().kind(),
        ErrorKind::BadIndex
    );
    let mut t = ix.clone();
    t.format = Format::Zstd;
    assert_eq!(t.decode_chunk(1, raw).unwrap_err().kind(), ErrorKind::Decode);
    assert_eq!(
        Index::from_bytes(&t.to_bytes()).unwrap_err().kind(),
        ErrorKind::BadIndex
    );
    let mut t = ix.clone();
    t.chunk_digests.clear();
    assert_eq!(
        Index::from_bytes(&t.to_bytes()).unwrap_err().kind(),
        ErrorKind::BadIndex
    );
}
