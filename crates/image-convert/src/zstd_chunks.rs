//! Compressed chunks on the wire: an EROFS image becomes one independent zstd frame per
//! chunk, followed by a seek table in zstd's seekable format
//! (facebook/zstd `contrib/seekable_format/zstd_seekable_compression_format.md`).
//!
//! Any zstd decoder decompresses the whole blob to the image (the seek table is a
//! skippable frame, which decoders skip); the lazy fetcher fetches and decompresses one
//! frame per chunk, found from the frame sizes in the layer's annotations, and tools
//! that know the seekable format find the same frames from the seek table.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// The skippable frame magic number the seek table's frame starts with.
pub const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
/// The magic number ending the seek table.
pub const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;
/// The most frames a seek table may list (`ZSTD_SEEKABLE_MAXFRAMES`).
pub const MAX_FRAMES: u64 = 0x800_0000;
/// The zstd level `convert-image --chunk-compression zstd` uses. On the python image of
/// scripts/bench-lazy.sh (68 MB gzip, 178 MB of EROFS images in 128 KiB chunks) level 3
/// stores 67.6 MB (0.99x the gzip source) in the time an uncompressed conversion takes;
/// 6 and 9 save 5-6% more for 1.5-2x the time, 15 saves 11% for 7.5x (README.md).
pub const DEFAULT_LEVEL: i32 = 3;

/// The zstd levels [`compress_chunks`] takes (this libzstd's, negative ones included).
pub fn level_range() -> std::ops::RangeInclusive<i32> {
    zstd::compression_level_range()
}

/// What [`compress_chunks`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressedBlob {
    /// `sha256:<hex>` of the blob written (frames and seek table).
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// The size of each chunk's frame, in order.
    pub sizes: Vec<u32>,
    /// The uncompressed size read.
    pub uncompressed_size: u64,
}

/// Writes `image` to `out` as one zstd frame (at `level`, with its content size) per
/// `chunk_size` piece, then the seek table. Chunks are compressed on every core, in
/// batches, so memory stays a few chunks per core whatever the image's size.
pub fn compress_chunks(image: &Path, out: &Path, chunk_size: u64, level: i32) -> io::Result<CompressedBlob> {
    let chunk = usize::try_from(chunk_size)
        .ok()
        .filter(|&c| c > 0 && c <= u32::MAX as usize)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("chunk size {chunk_size}")))?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let batch_len = workers * 4;
    let mut input = File::open(image)?;
    let mut w = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, File::create(out)?),
        hash: Sha256::new(),
        n: 0,
    };
    let mut sizes: Vec<u32> = Vec::new();
    let mut uncompressed: Vec<u32> = Vec::new();
    let mut total = 0u64;
    loop {
        let mut batch = Vec::with_capacity(batch_len);
        let mut eof = false;
        while batch.len() < batch_len {
            let piece = read_full(&mut input, chunk)?;
            eof = piece.len() < chunk;
            if !piece.is_empty() {
                batch.push(piece);
            }
            if eof {
                break;
            }
        }
        let frames = compress_batch(&batch, level, workers)?;
        for (piece, frame) in batch.iter().zip(frames) {
            w.write_all(&frame)?;
            sizes.push(u32::try_from(frame.len()).map_err(io::Error::other)?);
            uncompressed.push(piece.len() as u32);
            total += piece.len() as u64;
        }
        if eof {
            break;
        }
    }
    if sizes.len() as u64 > MAX_FRAMES {
        return Err(io::Error::other(format!(
            "{} chunks: a seek table lists at most {MAX_FRAMES} frames (use larger chunks)",
            sizes.len()
        )));
    }
    w.write_all(&seek_table(&sizes, &uncompressed))?;
    w.inner.flush()?;
    w.inner.get_ref().sync_all()?;
    Ok(CompressedBlob {
        digest: format!("sha256:{}", hex::encode(w.hash.finalize())),
        size: w.n,
        sizes,
        uncompressed_size: total,
    })
}

/// The seek table of frames of `compressed[i]` bytes holding `uncompressed[i]` bytes:
/// a skippable frame of one entry per frame (no checksums: the chunk digests in the
/// annotations verify the data) and the footer.
pub fn seek_table(compressed: &[u32], uncompressed: &[u32]) -> Vec<u8> {
    let entries = compressed.len();
    let mut t = Vec::with_capacity(8 + entries * 8 + 9);
    t.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    t.extend_from_slice(&((entries * 8 + 9) as u32).to_le_bytes());
    for (c, u) in compressed.iter().zip(uncompressed) {
        t.extend_from_slice(&c.to_le_bytes());
        t.extend_from_slice(&u.to_le_bytes());
    }
    t.extend_from_slice(&(entries as u32).to_le_bytes());
    // Seek_Table_Descriptor: bit 7 (checksums) clear, the reserved bits zero.
    t.push(0);
    t.extend_from_slice(&SEEKABLE_MAGIC.to_le_bytes());
    t
}

fn compress_batch(batch: &[Vec<u8>], level: i32, workers: usize) -> io::Result<Vec<Vec<u8>>> {
    let per = batch.len().div_ceil(workers.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = batch
            .chunks(per)
            .map(|part| {
                s.spawn(move || -> io::Result<Vec<Vec<u8>>> {
                    let mut c = zstd::bulk::Compressor::new(level)?;
                    // Content size in each frame header: a decoder knows a chunk's
                    // length before it decodes it.
                    c.include_contentsize(true)?;
                    part.iter().map(|p| c.compress(p)).collect()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(batch.len());
        for h in handles {
            out.extend(
                h.join()
                    .map_err(|_| io::Error::other("a compression thread panicked"))??,
            );
        }
        Ok(out)
    })
}

/// Up to `len` bytes: fewer only at the end of the input.
fn read_full(r: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut n = 0;
    while n < len {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    Ok(buf)
}

struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    n: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(b)?;
        self.hash.update(&b[..k]);
        self.n += k as u64;
        Ok(k)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
