//! The serialized index.
//!
//! All integers little-endian.
//!
//! ```text
//! header (100 bytes)
//!   magic "TIDX", version u16 = 1, format u8 (1 gzip, 2 zstd), log2(chunk_size) u8,
//!   zstd window log u8 (0 for gzip), 3 zero bytes,
//!   uncompressed_size u64, compressed_size u64,
//!   compressed_digest [32], uncompressed_digest [32],
//!   checkpoint count u32, chunk count u32
//! checkpoints (24 bytes each)
//!   in_off u64, out_off u64, kind u8 (0 start, 1 deflate block), bits u8, partial u8,
//!   zero u8, window length u32 (stored bytes; 0 = none)
//! chunks (44 bytes each)
//!   sha256 [32], checkpoint u32, fetch_end u64
//! windows
//!   each checkpoint's window, in order: one zstd frame of at most 32 KiB content
//! ```

use crate::decode::window_into;
use crate::zstdf::{MAX_WINDOW_LOG, MIN_WINDOW_LOG};
use crate::{
    valid_chunk_size, Checkpoint, CheckpointKind, ChunkEntry, Error, Format, Index, MAX_SKIP_CHUNKS, WINDOW_SIZE,
};

const MAGIC: [u8; 4] = *b"TIDX";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 100;
const CHECKPOINT_LEN: usize = 24;
const CHUNK_LEN: usize = 44;

pub(crate) fn to_bytes(ix: &Index) -> Vec<u8> {
    let windows: usize = ix.checkpoints.iter().map(|c| c.window.len()).sum();
    let mut b =
        Vec::with_capacity(HEADER_LEN + ix.checkpoints.len() * CHECKPOINT_LEN + ix.chunks.len() * CHUNK_LEN + windows);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.push(match ix.format {
        Format::Gzip => 1,
        Format::Zstd => 2,
    });
    b.push(ix.chunk_size.trailing_zeros() as u8);
    b.push(ix.zstd_window_log);
    b.extend_from_slice(&[0; 3]);
    b.extend_from_slice(&ix.uncompressed_size.to_le_bytes());
    b.extend_from_slice(&ix.compressed_size.to_le_bytes());
    b.extend_from_slice(&ix.compressed_digest);
    b.extend_from_slice(&ix.uncompressed_digest);
    b.extend_from_slice(&(ix.checkpoints.len() as u32).to_le_bytes());
    // An index whose public fields were made inconsistent serializes to bytes that
    // `from_bytes` refuses (fewer chunks than the size needs), never to a panic.
    let nch = ix.chunks.len().min(ix.chunk_digests.len());
    b.extend_from_slice(&(nch as u32).to_le_bytes());
    for c in &ix.checkpoints {
        b.extend_from_slice(&c.in_off.to_le_bytes());
        b.extend_from_slice(&c.out_off.to_le_bytes());
        b.push(match c.kind {
            CheckpointKind::Start => 0,
            CheckpointKind::Block => 1,
        });
        b.push(c.bits);
        b.push(c.partial);
        b.push(0);
        b.extend_from_slice(&(c.window.len() as u32).to_le_bytes());
    }
    for (c, digest) in ix.chunks.iter().zip(&ix.chunk_digests) {
        b.extend_from_slice(digest);
        b.extend_from_slice(&c.checkpoint.to_le_bytes());
        b.extend_from_slice(&c.fetch_end.to_le_bytes());
    }
    for c in &ix.checkpoints {
        b.extend_from_slice(&c.window);
    }
    b
}

fn bad(m: impl Into<String>) -> Error {
    Error::BadIndex(m.into())
}

/// A cursor that fails with `BadIndex` instead of running off the end.
struct Cur<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let s = self
            .pos
            .checked_add(n)
            .and_then(|end| self.b.get(self.pos..end))
            .ok_or_else(|| bad("truncated"))?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn digest(&mut self) -> Result<[u8; 32], Error> {
        Ok(self.take(32)?.try_into().expect("32"))
    }
}

pub(crate) fn from_bytes(b: &[u8]) -> Result<Index, Error> {
    let mut r = Cur { b, pos: 0 };
    if r.take(4)? != MAGIC {
        return Err(bad("bad magic"));
    }
    let version = r.u16()?;
    if version != VERSION {
        return Err(bad(format!("unsupported version {version}")));
    }
    let format = match r.u8()? {
        1 => Format::Gzip,
        2 => Format::Zstd,
        f => return Err(bad(format!("unknown format {f}"))),
    };
    let shift = r.u8()?;
    if shift >= 64 || !valid_chunk_size(1u64 << shift) {
        return Err(bad(format!("chunk size 2^{shift} out of range")));
    }
    let chunk_size = 1u64 << shift;
    let zstd_window_log = r.u8()?;
    let window_log_ok = match format {
        Format::Gzip => zstd_window_log == 0,
        Format::Zstd => (MIN_WINDOW_LOG..=MAX_WINDOW_LOG).contains(&zstd_window_log),
    };
    if !window_log_ok {
        return Err(bad(format!(
            "window log {zstd_window_log} invalid for {}",
            format.name()
        )));
    }
    if r.take(3)? != [0; 3] {
        return Err(bad("reserved bytes not zero"));
    }
    let uncompressed_size = r.u64()?;
    let compressed_size = r.u64()?;
    let compressed_digest = r.digest()?;
    let uncompressed_digest = r.digest()?;
    let ncp = r.u32()? as usize;
    let nch = r.u32()? as usize;
    if uncompressed_size.div_ceil(chunk_size) != nch as u64 {
        return Err(bad(format!(
            "{nch} chunks for {uncompressed_size} bytes in chunks of {chunk_size}"
        )));
    }
    // Every checkpoint serves at least one chunk.
    if ncp > nch || (nch > 0 && ncp == 0) {
        return Err(bad(format!("{ncp} checkpoints for {nch} chunks")));
    }
    // Counts are u32, so this cannot overflow; checked before anything is allocated.
    let fixed = HEADER_LEN as u64 + ncp as u64 * CHECKPOINT_LEN as u64 + nch as u64 * CHUNK_LEN as u64;
    if fixed > b.len() as u64 {
        return Err(bad("truncated (counts larger than the data)"));
    }

    struct Raw {
        in_off: u64,
        out_off: u64,
        kind: CheckpointKind,
        bits: u8,
        partial: u8,
        wlen: usize,
    }
    let mut raws = Vec::with_capacity(ncp);
    let mut windows_len = 0u64;
    for i in 0..ncp {
        let in_off = r.u64()?;
        let out_off = r.u64()?;
        let kind = match r.u8()? {
            0 => CheckpointKind::Start,
            1 if format == Format::Gzip => CheckpointKind::Block,
            k => return Err(bad(format!("checkpoint {i}: kind {k} invalid for {}", format.name()))),
        };
        let bits = r.u8()?;
        let partial = r.u8()?;
        if r.u8()? != 0 {
            return Err(bad(format!("checkpoint {i}: reserved byte not zero")));
        }
        let wlen = r.u32()? as usize;
        if bits > 7 || u16::from(partial) >> bits != 0 {
            return Err(bad(format!(
                "checkpoint {i}: bit offset {bits}, partial byte {partial}"
            )));
        }
        if kind == CheckpointKind::Start && (bits != 0 || wlen != 0) {
            return Err(bad(format!("checkpoint {i}: a stream start with bits or a window")));
        }
        if in_off >= compressed_size || out_off >= uncompressed_size {
            return Err(bad(format!("checkpoint {i}: offsets beyond the layer")));
        }
        if let Some(prev) = raws.last() {
            let prev: &Raw = prev;
            if in_off <= prev.in_off || out_off <= prev.out_off {
                return Err(bad(format!("checkpoint {i}: offsets not increasing")));
            }
        }
        windows_len += wlen as u64;
        raws.push(Raw {
            in_off,
            out_off,
            kind,
            bits,
            partial,
            wlen,
        });
    }

    let mut chunk_digests = Vec::with_capacity(nch);
    let mut chunks = Vec::with_capacity(nch);
    for i in 0..nch {
        let digest = r.digest()?;
        let checkpoint = r.u32()?;
        let fetch_end = r.u64()?;
        // Checkpoints in order, each used: the first chunk uses the first, and each
        // chunk uses the same checkpoint as the one before or the next.
        let expected_first = i == 0 && checkpoint != 0;
        let skipped = chunks
            .last()
            .is_some_and(|p: &ChunkEntry| checkpoint != p.checkpoint && checkpoint != p.checkpoint + 1);
        if expected_first || skipped {
            return Err(bad(format!("chunk {i}: checkpoint {checkpoint} out of order")));
        }
        let cp = raws
            .get(checkpoint as usize)
            .ok_or_else(|| bad(format!("chunk {i}: no checkpoint {checkpoint}")))?;
        let start = i as u64 * chunk_size;
        if cp.out_off > start {
            return Err(bad(format!("chunk {i}: checkpoint after the chunk start")));
        }
        if start - cp.out_off > MAX_SKIP_CHUNKS * chunk_size {
            return Err(bad(format!("chunk {i}: checkpoint too far before the chunk")));
        }
        if fetch_end <= cp.in_off || fetch_end > compressed_size {
            return Err(bad(format!("chunk {i}: fetch range empty or beyond the layer")));
        }
        chunk_digests.push(digest);
        chunks.push(ChunkEntry { checkpoint, fetch_end });
    }
    if chunks.last().is_some_and(|c| c.checkpoint as usize + 1 != ncp) {
        return Err(bad("unused checkpoints"));
    }

    let rest = (b.len() - r.pos) as u64;
    if rest != windows_len {
        return Err(bad(format!(
            "{rest} bytes after the tables, the windows take {windows_len}"
        )));
    }
    let mut scratch = Box::new([0u8; WINDOW_SIZE]);
    let mut checkpoints = Vec::with_capacity(ncp);
    for (i, c) in raws.into_iter().enumerate() {
        let window = r.take(c.wlen)?.to_vec();
        let n = window_into(&window, &mut scratch).map_err(|m| bad(format!("checkpoint {i}: {m}")))?;
        if n as u64 > c.out_off {
            return Err(bad(format!("checkpoint {i}: window reaches before the layer start")));
        }
        checkpoints.push(Checkpoint {
            in_off: c.in_off,
            out_off: c.out_off,
            kind: c.kind,
            bits: c.bits,
            partial: c.partial,
            window,
        });
    }
    debug_assert_eq!(r.pos, b.len());
    Ok(Index {
        format,
        chunk_size,
        uncompressed_size,
        compressed_size,
        compressed_digest,
        uncompressed_digest,
        chunk_digests,
        checkpoints,
        chunks,
        zstd_window_log,
    })
}
