//! Decoding one chunk from its checkpoint and the fetched compressed range.

use crate::gzip::{self, TRAILER};
use crate::zlib::{RawInflate, Z_NO_FLUSH};
use crate::zstdf::{MAX_WINDOW_LOG, MIN_WINDOW_LOG};
use crate::{valid_chunk_size, CheckpointKind, Error, Format, Index, MAX_SKIP_CHUNKS, WINDOW_SIZE};

fn err(m: impl Into<String>) -> Error {
    Error::Decode(m.into())
}

/// Decompresses a stored (zstd-compressed) window into `buf`; returns its length.
pub(crate) fn window_into(stored: &[u8], buf: &mut [u8; WINDOW_SIZE]) -> Result<usize, String> {
    if stored.is_empty() {
        return Ok(0);
    }
    match zstd::zstd_safe::find_frame_compressed_size(stored) {
        Ok(n) if n == stored.len() => {}
        _ => return Err("window is not exactly one zstd frame".into()),
    }
    zstd::zstd_safe::decompress(&mut buf[..], stored)
        .map_err(|c| format!("window: {}", zstd::zstd_safe::get_error_name(c)))
}

pub(crate) fn decode_chunk(ix: &Index, i: u64, raw: &[u8]) -> Result<Vec<u8>, Error> {
    let cs = ix.chunk_size;
    if !valid_chunk_size(cs) {
        return Err(err("index has an invalid chunk size"));
    }
    if i >= ix.chunk_count() {
        return Err(err(format!("chunk {i} out of range")));
    }
    let entry = usize::try_from(i)
        .ok()
        .and_then(|i| ix.chunks.get(i))
        .ok_or_else(|| err("index has no entry for the chunk"))?;
    let cp = ix
        .checkpoints
        .get(entry.checkpoint as usize)
        .ok_or_else(|| err("chunk refers to a missing checkpoint"))?;
    // chunk_count() > i, so neither overflows.
    let start = i * cs;
    let end = start.saturating_add(cs).min(ix.uncompressed_size);
    let len = (end - start) as usize;
    let skip = start
        .checked_sub(cp.out_off)
        .filter(|&d| d <= MAX_SKIP_CHUNKS * cs)
        .ok_or_else(|| err("checkpoint not within reach of the chunk"))?;
    let expected = entry
        .fetch_end
        .checked_sub(cp.in_off)
        .ok_or_else(|| err("empty fetch range"))?;
    if raw.len() as u64 != expected {
        return Err(err(format!(
            "got {} compressed bytes, the chunk's range is {expected}",
            raw.len()
        )));
    }
    let mut out = vec![0u8; len];
    match ix.format {
        Format::Gzip => gzip_decode(cp, raw, skip, &mut out)?,
        Format::Zstd => zstd_decode(ix.zstd_window_log, raw, skip, &mut out)?,
    }
    Ok(out)
}

/// Fills `out` with the output that follows the first `skip` bytes decoded from `raw`.
fn gzip_decode(cp: &crate::Checkpoint, raw: &[u8], skip: u64, out: &mut [u8]) -> Result<(), Error> {
    #[derive(PartialEq)]
    enum Phase {
        Header,
        Body,
        Trailer,
    }
    let mut z = RawInflate::new().map_err(err)?;
    let mut phase = match cp.kind {
        CheckpointKind::Start => Phase::Header,
        CheckpointKind::Block => {
            if cp.bits > 7 {
                return Err(err("checkpoint bit offset above 7"));
            }
            z.prime(cp.bits, cp.partial).map_err(err)?;
            let mut window = Box::new([0u8; WINDOW_SIZE]);
            let n = window_into(&cp.window, &mut window).map_err(err)?;
            z.set_dictionary(&window[..n]).map_err(err)?;
            Phase::Body
        }
    };
    let mut pos = 0usize;
    let mut skip = skip;
    let mut filled = 0usize;
    while filled < out.len() {
        match phase {
            Phase::Header => match gzip::parse_header(&raw[pos..]) {
                Ok(Some(n)) => {
                    pos += n;
                    z.reset().map_err(err)?;
                    phase = Phase::Body;
                }
                Ok(None) => return Err(err("compressed range ends inside a gzip header")),
                Err(m) => return Err(err(m)),
            },
            Phase::Body => {
                let dst = if skip > 0 {
                    let k = skip.min(out.len() as u64) as usize;
                    &mut out[..k]
                } else {
                    &mut out[filled..]
                };
                let s = z.inflate(&raw[pos..], dst, Z_NO_FLUSH).map_err(err)?;
                pos += s.consumed;
                if skip > 0 {
                    skip -= s.produced as u64;
                } else {
                    filled += s.produced;
                }
                if s.end {
                    phase = Phase::Trailer;
                } else if s.produced == 0 && s.consumed == 0 {
                    return Err(err("compressed range ends before the chunk does"));
                }
            }
            Phase::Trailer => {
                if raw.len() - pos < TRAILER {
                    return Err(err("compressed range ends inside a gzip trailer"));
                }
                pos += TRAILER;
                phase = Phase::Header;
            }
        }
    }
    Ok(())
}

fn zstd_decode(window_log: u8, raw: &[u8], skip: u64, out: &mut [u8]) -> Result<(), Error> {
    use zstd::zstd_safe::{get_error_name, DCtx, DParameter, InBuffer, OutBuffer};

    let mut d = DCtx::try_create().ok_or_else(|| err("cannot create a zstd context"))?;
    // The layer's own largest window: no frame in `raw` gets more memory than that.
    let wlog = window_log.clamp(MIN_WINDOW_LOG, MAX_WINDOW_LOG);
    d.set_parameter(DParameter::WindowLogMax(u32::from(wlog)))
        .map_err(|c| err(get_error_name(c)))?;
    let mut pos = 0usize;
    let mut skip = skip;
    let mut filled = 0usize;
    while filled < out.len() {
        let dst = if skip > 0 {
            let k = skip.min(out.len() as u64) as usize;
            &mut out[..k]
        } else {
            &mut out[filled..]
        };
        let mut src = InBuffer::around(&raw[pos..]);
        let mut dst = OutBuffer::around(dst);
        d.decompress_stream(&mut dst, &mut src)
            .map_err(|c| err(get_error_name(c)))?;
        let (consumed, produced) = (src.pos(), dst.pos());
        pos += consumed;
        if skip > 0 {
            skip -= produced as u64;
        } else {
            filled += produced;
        }
        if consumed == 0 && produced == 0 {
            return Err(err("compressed range ends before the chunk does"));
        }
    }
    Ok(())
}
