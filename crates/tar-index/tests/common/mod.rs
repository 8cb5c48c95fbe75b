//! Shared helpers of the integration tests: deterministic inputs, compressors, and the
//! full check of an index against independently computed values.
#![allow(dead_code)]

use std::io::{BufRead, Read, Write};

use sha2::{Digest, Sha256};
use tar_index::{Error, ErrorKind, Format, Index, IndexOptions, Indexer};

/// xorshift64*: deterministic, seedable.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "layer",
    "snapshot",
    "erofs",
    "overlay",
    "chunk",
    "digest",
    "registry",
    "manifest",
    "the",
    "of",
    "and",
    "import",
    "def",
    "return",
    "self",
    "None",
    "static",
    "const",
    "fn",
    "let",
    "usr/lib/python3/dist-packages/",
    "#include <stdio.h>\n",
    "\n",
    "    ",
    "{",
    "}",
    "();",
];

/// `size` bytes mixing compressible text, random bytes, zero runs up to `max_zero_run`
/// (huge deflate blocks) and short repeated patterns.
pub fn gen(seed: u64, size: usize, max_zero_run: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let mut v = Vec::with_capacity(size);
    while v.len() < size {
        let left = size - v.len();
        match r.below(10) {
            0..=4 => {
                let n = (r.below(64 << 10) as usize + 1).min(left);
                let end = v.len() + n;
                while v.len() < end {
                    let w = WORDS[r.below(WORDS.len() as u64) as usize].as_bytes();
                    let k = w.len().min(end - v.len());
                    v.extend_from_slice(&w[..k]);
                    if v.len() < end && r.below(3) == 0 {
                        v.push(b' ');
                    }
                }
            }
            5..=6 => {
                let n = (r.below(48 << 10) as usize + 1).min(left);
                let start = v.len();
                v.resize(start + n, 0);
                r.fill(&mut v[start..]);
            }
            7 => {
                let n = (r.below(max_zero_run as u64 + 1) as usize).min(left);
                v.resize(v.len() + n, 0);
            }
            _ => {
                let pat_len = r.below(16) as usize + 1;
                let mut pat = vec![0u8; pat_len];
                r.fill(&mut pat);
                let n = (r.below(8 << 10) as usize + 1).min(left);
                for i in 0..n {
                    v.push(pat[i % pat_len]);
                }
            }
        }
    }
    v
}

pub fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

pub fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// gzip with a header carrying FEXTRA, FNAME, FCOMMENT and FHCRC.
pub fn gzip_fancy_header(data: &[u8], level: u32) -> Vec<u8> {
    let mut h = vec![0x1f, 0x8b, 8, 0x02 | 0x04 | 0x08 | 0x10, 0x78, 0x56, 0x34, 0x12, 0, 3];
    let extra = b"AB\x04\x00xyzw";
    h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
    h.extend_from_slice(extra);
    h.extend_from_slice(b"layer.tar\0");
    h.extend_from_slice(b"a comment\0");
    let crc = crc32(&h) as u16;
    h.extend_from_slice(&crc.to_le_bytes());
    let mut d = flate2::write::DeflateEncoder::new(h, flate2::Compression::new(level));
    d.write_all(data).unwrap();
    let mut out = d.finish().unwrap();
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

pub fn crc32(b: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(b);
    c.sum()
}

/// Runs `prog args` with `data` on stdin, returns stdout.
pub fn run_filter(prog: &str, args: &[&str], data: &[u8]) -> Vec<u8> {
    use std::process::{Command, Stdio};
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&input).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "{prog} {args:?}");
    out.stdout
}

pub fn pigz_path() -> Option<&'static str> {
    let p = "/usr/bin/pigz";
    std::path::Path::new(p).exists().then_some(p)
}

/// Runs `pigz args` over `data`.
pub fn pigz(data: &[u8], args: &[&str]) -> Vec<u8> {
    let mut a = args.to_vec();
    a.push("-c");
    run_filter(pigz_path().unwrap(), &a, data)
}

pub fn zstd_frame(data: &[u8], level: i32) -> Vec<u8> {
    zstd::bulk::compress(data, level).unwrap()
}

/// A zstd frame written by the streaming encoder (no content size, checksum on).
pub fn zstd_streamed(data: &[u8], level: i32) -> Vec<u8> {
    let mut e = zstd::stream::write::Encoder::new(Vec::new(), level).unwrap();
    e.include_checksum(true).unwrap();
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// One zstd frame per `frame` bytes of input.
pub fn zstd_frames(data: &[u8], frame: usize, level: i32) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, piece) in data.chunks(frame).enumerate() {
        if i % 2 == 0 {
            out.extend(zstd_frame(piece, level));
        } else {
            out.extend(zstd_streamed(piece, level));
        }
    }
    out
}

pub fn skippable_frame(payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0x53, 0x2a, 0x4d, 0x18];
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// The project's normal decoders (crates/oci-layer/src/stream.rs).
pub fn plain_decode(format: Format, blob: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    match format {
        Format::Gzip => {
            flate2::bufread::MultiGzDecoder::new(blob).read_to_end(&mut out)?;
        }
        Format::Zstd => {
            zstd::stream::read::Decoder::with_buffer(blob)?.read_to_end(&mut out)?;
        }
    }
    Ok(out)
}

/// A reader returning short reads of varying sizes.
pub struct Choppy<'a> {
    data: &'a [u8],
    rng: Rng,
}

impl<'a> Choppy<'a> {
    pub fn new(data: &'a [u8], seed: u64) -> Self {
        Choppy {
            data,
            rng: Rng::new(seed),
        }
    }
}

impl Read for Choppy<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let max = match self.rng.below(4) {
            0 => 1 + self.rng.below(16) as usize,
            1 => 1 + self.rng.below(4096) as usize,
            _ => 1 << 20,
        };
        let n = buf.len().min(max).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Reads the indexer as a tar parser would (BufRead, varying amounts), returning the
/// output and the index result.
pub fn index_stream(
    format: Format,
    blob: &[u8],
    chunk_size: u64,
    seed: u64,
) -> (std::io::Result<Vec<u8>>, Result<Index, Error>) {
    let opts = IndexOptions::with_chunk_size(chunk_size);
    let mut ix = Indexer::new(format, Choppy::new(blob, seed), opts).unwrap();
    let mut rng = Rng::new(seed ^ 0xabc);
    let mut out = Vec::new();
    let read = loop {
        // Mix BufRead and Read, partial consumption, and a stop before the end.
        let step = rng.below(3);
        if step == 0 {
            let mut buf = vec![0u8; 1 + rng.below(100_000) as usize];
            match ix.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => break Err(e),
            }
        } else {
            match ix.fill_buf() {
                Ok([]) => break Ok(()),
                Ok(b) => {
                    let n = if step == 1 {
                        b.len()
                    } else {
                        1 + rng.below(b.len() as u64) as usize
                    };
                    out.extend_from_slice(&b[..n]);
                    ix.consume(n);
                }
                Err(e) => break Err(e),
            }
        }
    };
    let res = ix.finish();
    (read.map(|()| out), res)
}

/// What a check expects of the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Index,
    NoRandomAccess,
    /// Either (the test does not know the block layout).
    Any,
}

/// Indexes `blob`, which decompresses to `plain`, and checks everything: stream output,
/// sizes and digests, every chunk decoded from its fetch range, serialization round
/// trip, truncated raw ranges. Returns the index (None for NoRandomAccess).
pub fn check(format: Format, blob: &[u8], plain: &[u8], chunk_size: u64, expect: Expect) -> Option<Index> {
    assert_eq!(
        plain_decode(format, blob).expect("the plain decoder accepts the blob"),
        plain,
        "the plain decoder's output"
    );
    let (out, res) = index_stream(format, blob, chunk_size, blob.len() as u64 ^ chunk_size);
    let out = out.expect("the indexer's stream reads to the end");
    assert!(out == plain, "the indexer's output equals the plain decoder's");
    let ix = match res {
        Ok(ix) => {
            assert_ne!(expect, Expect::NoRandomAccess, "expected NoRandomAccess");
            ix
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::NoRandomAccess, "{e}");
            assert_ne!(expect, Expect::Index, "unexpected {e}");
            if let Error::NoRandomAccess { max_distance, limit } = e {
                assert!(max_distance > limit);
                assert_eq!(limit, 8 * chunk_size);
            }
            return None;
        }
    };
    verify_index(&ix, format, blob, plain, chunk_size);
    let bytes = ix.to_bytes();
    let parsed = Index::from_bytes(&bytes).expect("from_bytes accepts to_bytes output");
    assert!(parsed == ix, "round trip");
    assert_eq!(parsed.to_bytes(), bytes);
    // Decode from the parsed index too (a sample of chunks).
    let n = parsed.chunk_count();
    for i in (0..n).step_by((n as usize / 7).max(1)) {
        let (a, b) = parsed.fetch_range(i);
        let got = parsed.decode_chunk(i, &blob[a as usize..b as usize]).unwrap();
        let (s, e) = parsed.chunk_range(i);
        assert!(got == plain[s as usize..e as usize]);
    }
    Some(ix)
}

pub fn verify_index(ix: &Index, format: Format, blob: &[u8], plain: &[u8], chunk_size: u64) {
    assert_eq!(ix.format, format);
    assert_eq!(ix.chunk_size, chunk_size);
    assert_eq!(ix.uncompressed_size, plain.len() as u64);
    assert_eq!(ix.compressed_size, blob.len() as u64);
    assert_eq!(ix.compressed_digest, sha(blob));
    assert_eq!(ix.uncompressed_digest, sha(plain));
    let n = plain.len().div_ceil(chunk_size as usize);
    assert_eq!(ix.chunk_count(), n as u64);
    assert_eq!(ix.chunk_digests.len(), n);
    assert!(ix.checkpoints() <= n);
    if n > 0 {
        assert!(ix.checkpoints() >= 1);
    }
    for i in 0..n as u64 {
        let (s, e) = ix.chunk_range(i);
        assert_eq!(s, i * chunk_size);
        assert_eq!(e, ((i + 1) * chunk_size).min(plain.len() as u64));
        let want = &plain[s as usize..e as usize];
        assert_eq!(ix.chunk_digests[i as usize], sha(want), "chunk {i} digest");
        let (a, b) = ix.fetch_range(i);
        assert!(a < b && b <= blob.len() as u64, "fetch range {a}..{b}");
        if i == n as u64 - 1 {
            assert_eq!(b, blob.len() as u64);
        }
        let raw = &blob[a as usize..b as usize];
        let got = ix
            .decode_chunk(i, raw)
            .unwrap_or_else(|e| panic!("chunk {i} of {n} (fetch {a}..{b}): {e}"));
        assert!(got == want, "chunk {i} bytes");
        assert_eq!(sha(&got), ix.chunk_digests[i as usize]);
        // Too short or too long a range is refused.
        let short = ix.decode_chunk(i, &raw[..raw.len() - 1]).unwrap_err();
        assert_eq!(short.kind(), ErrorKind::Decode);
        let mut long = raw.to_vec();
        long.push(0);
        assert_eq!(ix.decode_chunk(i, &long).unwrap_err().kind(), ErrorKind::Decode);
    }
    assert_eq!(ix.decode_chunk(n as u64, &[]).unwrap_err().kind(), ErrorKind::Decode);
}

/// Checks that the indexer fails exactly when the plain decoder does, with the same
/// output before failing as far as the plain decoder got.
pub fn same_verdict(format: Format, blob: &[u8]) -> bool {
    let plain = plain_decode(format, blob);
    let (out, res) = index_stream(format, blob, 64 << 10, 7);
    match (&plain, &out) {
        (Ok(p), Ok(o)) => {
            assert!(p == o, "outputs differ");
            match &res {
                Ok(_) => {}
                Err(e) => assert_eq!(e.kind(), ErrorKind::NoRandomAccess, "{e}"),
            }
            true
        }
        (Err(_), Err(e)) => {
            let err = res.expect_err("finish fails after a failed read");
            assert!(matches!(err.kind(), ErrorKind::Corrupt), "{err} (read error {e})");
            false
        }
        (p, o) => panic!(
            "verdicts differ: plain decoder {:?}, indexer {:?}",
            p.as_ref().map(|v| v.len()),
            o.as_ref().map(|v| v.len())
        ),
    }
}

/// Flips 1 to 3 random bits of `blob`, 1500 times, and checks each mutant gets the same verdict
/// (and output) from the indexer and the project's plain decoder; returns (accepted, refused).
pub fn mutation_verdicts(format: Format, blob: &[u8], seed: u64) -> (u32, u32) {
    let mut rng = Rng::new(seed);
    let (mut ok, mut bad) = (0, 0);
    for _ in 0..1500 {
        let mut b = blob.to_vec();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(b.len() as u64) as usize;
            b[i] ^= 1 << rng.below(8);
        }
        if same_verdict(format, &b) {
            ok += 1;
        } else {
            bad += 1;
        }
    }
    (ok, bad)
}
