//! Codecs for compressed files: what the writer compresses pclusters with and what the
//! reader decodes them with.
//!
//! EROFS compresses into *fixed-size physical clusters*: each pcluster is filled with as
//! much input as fits (destination-size compression), so that every read decodes whole
//! blocks. LZ4 and LZ4HC have that natively (`LZ4_compress_destSize`,
//! `LZ4_compress_HC_destSize`, from liblz4 as the `lz4-sys` crate builds it). Zstandard
//! and DEFLATE do not: [`Compressor::compress_destsize`] finds the longest input prefix
//! that fits by compressing trial prefixes, starting from the size the last ratio
//! predicts, which converges in two or three trials on ordinary data.
//!
//! The codecs are maintained libraries; only the fitting is ours.

use std::ffi::{c_char, c_int, c_void};
use std::fmt;
use std::str::FromStr;

use crate::format::Algorithm;

// liblz4 exports these (lz4-sys compiles lz4.c and lz4hc.c) but lz4-sys does not declare
// them; the signatures are lz4.h's and lz4hc.h's of liblz4 1.9 and later.
extern "C" {
    fn LZ4_compress_destSize(src: *const c_char, dst: *mut c_char, src_size: *mut c_int, target: c_int) -> c_int;
    fn LZ4_sizeofStateHC() -> c_int;
    fn LZ4_compress_HC_destSize(
        state: *mut c_void,
        src: *const c_char,
        dst: *mut c_char,
        src_size: *mut c_int,
        target: c_int,
        level: c_int,
    ) -> c_int;
}

/// A codec and its level, named as `mkfs.erofs -z` names them: `lz4`, `lz4hc[,N]`,
/// `zstd[,N]`, `deflate[,N]`, `lzma[,N]` (also `ALGO,level=N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    /// Which compressor.
    pub kind: CodecKind,
    /// Its level (the default when not given: lz4hc 9, zstd 3, deflate 1, lzma 6).
    pub level: i32,
}

/// The compressors the writer has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecKind {
    /// LZ4, fast.
    Lz4,
    /// LZ4 high compression: same format, better ratio, slower to write.
    Lz4hc,
    /// Zstandard.
    Zstd,
    /// DEFLATE (libdeflate).
    Deflate,
    /// MicroLZMA (liblzma): the best ratio, the slowest to write and read.
    Lzma,
}

/// A codec name or level that is not one of [`Codec`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("compression {0:?}: {1}")]
pub struct BadCodec(pub String, pub &'static str);

impl Codec {
    /// The on-disk algorithm this codec writes.
    pub fn algorithm(&self) -> Algorithm {
        match self.kind {
            CodecKind::Lz4 | CodecKind::Lz4hc => Algorithm::Lz4,
            CodecKind::Zstd => Algorithm::Zstd,
            CodecKind::Deflate => Algorithm::Deflate,
            CodecKind::Lzma => Algorithm::Lzma,
        }
    }

    /// The `mkfs.erofs -z` spelling, with the level.
    pub fn name(&self) -> String {
        match self.kind {
            CodecKind::Lz4 => "lz4".into(),
            CodecKind::Lz4hc => format!("lz4hc,{}", self.level),
            CodecKind::Zstd => format!("zstd,{}", self.level),
            CodecKind::Deflate => format!("deflate,{}", self.level),
            CodecKind::Lzma => format!("lzma,{}", self.level),
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for Codec {
    type Err = BadCodec;

    fn from_str(s: &str) -> Result<Codec, BadCodec> {
        let bad = |why| BadCodec(s.to_string(), why);
        let (name, level) = match s.split_once(',') {
            Some((n, l)) => {
                let l = l.strip_prefix("level=").unwrap_or(l);
                (n, Some(l.parse::<i32>().map_err(|_| bad("the level is not a number"))?))
            }
            None => (s, None),
        };
        let (kind, range, default) = match name {
            "lz4" => (CodecKind::Lz4, 0..=0, 0),
            "lz4hc" => (CodecKind::Lz4hc, 0..=12, 9),
            "zstd" => (CodecKind::Zstd, 0..=22, 3),
            "deflate" | "libdeflate" => (CodecKind::Deflate, 0..=12, 1),
            "lzma" => (CodecKind::Lzma, 0..=109, 6),
            _ => return Err(bad("unknown algorithm (lz4, lz4hc, zstd, deflate, lzma)")),
        };
        let level = match level {
            None => default,
            Some(_) if kind == CodecKind::Lz4 => return Err(bad("lz4 has no levels")),
            Some(l) if kind == CodecKind::Lzma && (10..100).contains(&l) => {
                return Err(bad("lzma levels are 0-9, or 100-109 for the extreme presets"))
            }
            Some(l) if range.contains(&l) => l,
            Some(_) => {
                return Err(bad(
                    "level out of range (lz4hc 0-12, zstd 0-22, deflate 0-12, lzma 0-9 and 100-109)",
                ))
            }
        };
        Ok(Codec { kind, level })
    }
}

/// One thread's compressor state (codec contexts are reused across calls).
pub struct Compressor {
    codec: Codec,
    lz4hc_state: Vec<u8>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    deflate: Option<libdeflater::Compressor>,
    trial: Vec<u8>,
    /// MicroLZMA's dictionary size (also recorded in the image's LZMA configuration).
    lzma_dict: u32,
    /// Input bytes per output byte of the last fitted pcluster, × 1024: neighbouring
    /// pclusters compress alike, so the first trial usually fits.
    ratio: u64,
}

/// zstd's window for pclusters of `pcluster` bytes: the kernel allows 2^10..=2^20
/// (`Z_EROFS_ZSTD_MAX_DICT_SIZE`); an extent never needs more than its own size, and a
/// small window keeps the kernel's decompression memory small.
pub fn zstd_window_log(pcluster: usize) -> u8 {
    (pcluster.next_power_of_two().trailing_zeros() as u8 + 5).clamp(12, 20)
}

impl Compressor {
    /// A compressor for pclusters of up to `pcluster` bytes.
    pub fn new(codec: Codec, pcluster: usize) -> std::io::Result<Compressor> {
        let mut c = Compressor {
            codec,
            lz4hc_state: Vec::new(),
            zstd: None,
            deflate: None,
            trial: Vec::new(),
            ratio: 4 << 10,
            lzma_dict: lzma_dict_size(pcluster),
        };
        match codec.kind {
            CodecKind::Lz4 | CodecKind::Lzma => {}
            // SAFETY: a pure function returning the state size.
            CodecKind::Lz4hc => c.lz4hc_state = vec![0u8; unsafe { LZ4_sizeofStateHC() } as usize + 8],
            CodecKind::Zstd => {
                let mut z = zstd::bulk::Compressor::new(codec.level)?;
                z.set_parameter(zstd::zstd_safe::CParameter::WindowLog(u32::from(zstd_window_log(
                    pcluster,
                ))))?;
                z.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(false))?;
                c.zstd = Some(z);
            }
            CodecKind::Deflate => {
                let lvl = libdeflater::CompressionLvl::new(codec.level)
                    .map_err(|_| std::io::Error::other("deflate level out of range"))?;
                c.deflate = Some(libdeflater::Compressor::new(lvl));
            }
        }
        Ok(c)
    }

    /// The codec.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Compresses the longest prefix of `src` whose compressed form fits in `dst`.
    /// Returns (input bytes consumed, compressed bytes written to the start of `dst`), or
    /// `None` when not even a useful prefix fits.
    pub fn compress_destsize(&mut self, src: &[u8], dst: &mut [u8]) -> Option<(usize, usize)> {
        if src.is_empty() || dst.is_empty() {
            return None;
        }
        let src_len = c_int::try_from(src.len()).ok()?;
        let target = c_int::try_from(dst.len()).ok()?;
        match self.codec.kind {
            CodecKind::Lz4 => {
                let mut n = src_len;
                // SAFETY: src and dst are valid for src_len and target bytes; liblz4
                // reads at most *n bytes and writes at most target bytes.
                let w = unsafe { LZ4_compress_destSize(src.as_ptr().cast(), dst.as_mut_ptr().cast(), &mut n, target) };
                (w > 0 && n > 0).then_some((n as usize, w as usize))
            }
            CodecKind::Lz4hc => {
                let mut n = src_len;
                let state = self.lz4hc_state.as_mut_ptr();
                // liblz4 wants the state 8-byte aligned; the buffer has 8 spare bytes.
                let state = unsafe { state.add(state.align_offset(8)) };
                // SAFETY: as above; the state buffer is LZ4_sizeofStateHC() bytes, aligned.
                let w = unsafe {
                    LZ4_compress_HC_destSize(
                        state.cast(),
                        src.as_ptr().cast(),
                        dst.as_mut_ptr().cast(),
                        &mut n,
                        target,
                        self.codec.level,
                    )
                };
                (w > 0 && n > 0).then_some((n as usize, w as usize))
            }
            CodecKind::Zstd | CodecKind::Deflate => self.fit(src, dst),
            CodecKind::Lzma => lzma_encode(src, dst, self.codec.level, self.lzma_dict),
        }
    }

    /// Destination-size compression by trials, for codecs without it.
    fn fit(&mut self, src: &[u8], dst: &mut [u8]) -> Option<(usize, usize)> {
        let cap = dst.len();
        let mut trial = std::mem::take(&mut self.trial);
        trial.resize(cap + 64, 0);
        let mut fits = 0usize; // longest prefix known to fit
        let mut fits_len = 0usize;
        let mut too_long = src.len() + 1; // shortest prefix known not to fit
                                          // Aim a little short of the room at the last ratio, so the first trial fits.
        let mut m = ((cap as u64 * 63 / 64) * self.ratio / 1024) as usize;
        // Close enough: within 1/64 of the room (at most a sliver of one block).
        let slack = cap / 64;
        loop {
            m = m.max(fits + 1).min(too_long - 1);
            match self.compress_once(&src[..m], &mut trial[..cap]) {
                Some(w) => {
                    dst[..w].copy_from_slice(&trial[..w]);
                    fits = m;
                    fits_len = w;
                    self.ratio = (m as u64 * 1024 / w.max(1) as u64).clamp(1024, 1 << 20);
                    if too_long <= fits + 1 || w + slack >= cap {
                        break;
                    }
                    m = (cap as u128 * 63 / 64 * m as u128 / w as u128) as usize;
                }
                None => {
                    too_long = m;
                    if too_long <= fits + 1 {
                        break;
                    }
                    // Bisect, but no lower than 15/16 of the miss: it just overflowed.
                    m = (fits + (too_long - fits) / 2).max(too_long - too_long / 16);
                }
            }
        }
        self.trial = trial;
        (fits > 0).then_some((fits, fits_len))
    }

    fn compress_once(&mut self, src: &[u8], dst: &mut [u8]) -> Option<usize> {
        match self.codec.kind {
            CodecKind::Zstd => self.zstd.as_mut()?.compress_to_buffer(src, dst).ok(),
            CodecKind::Deflate => self.deflate.as_mut()?.deflate_compress(src, dst).ok(),
            _ => None,
        }
    }
}

/// Decodes one pcluster's compressed stream (`src`, its leading zero padding already
/// skipped) into exactly `out.len()` bytes.
pub fn decompress(alg: Algorithm, src: &[u8], out: &mut [u8]) -> Result<(), String> {
    let n = match alg {
        Algorithm::Lz4 => {
            let (Ok(sl), Ok(ol)) = (c_int::try_from(src.len()), c_int::try_from(out.len())) else {
                return Err("pcluster too large".into());
            };
            // SAFETY: src and out are valid for sl and ol bytes; LZ4_decompress_safe never
            // reads or writes outside them (it is the bounds-checked decoder).
            let n = unsafe { lz4_sys::LZ4_decompress_safe(src.as_ptr().cast(), out.as_mut_ptr().cast(), sl, ol) };
            if n < 0 {
                return Err("corrupt LZ4 data".into());
            }
            n as usize
        }
        Algorithm::Zstd => zstd::bulk::Decompressor::new()
            .and_then(|mut d| d.decompress_to_buffer(src, out))
            .map_err(|e| format!("corrupt zstd data: {e}"))?,
        Algorithm::Deflate => libdeflater::Decompressor::new()
            .deflate_decompress(src, out)
            .map_err(|e| format!("corrupt DEFLATE data: {e}"))?,
        Algorithm::Lzma => lzma_decode(src, out)?,
    };
    if n != out.len() {
        return Err(format!("pcluster decodes to {n} bytes, the map says {}", out.len()));
    }
    Ok(())
}

/// MicroLZMA's dictionary for pclusters of `pcluster` bytes: decoded extents are a few
/// times their pcluster, and the kernel allows 4 KiB to 8 MiB (`Z_EROFS_LZMA_MAX_DICT_SIZE`).
pub fn lzma_dict_size(pcluster: usize) -> u32 {
    (pcluster.saturating_mul(8).next_power_of_two() as u64).clamp(32 << 10, 8 << 20) as u32
}

/// MicroLZMA is destination-size compression by design: the encoder stops when the
/// output is full and says how much input it took. Each pcluster is its own stream.
fn lzma_encode(src: &[u8], dst: &mut [u8], level: i32, dict: u32) -> Option<(usize, usize)> {
    use liblzma_sys as x;
    let preset = if level >= 100 {
        (level - 100) as u32 | x::LZMA_PRESET_EXTREME
    } else {
        level as u32
    };
    // SAFETY: the option and stream structs are plain C data, valid all-zero
    // (LZMA_STREAM_INIT); liblzma reads src and writes dst only within the lengths given,
    // and the stream is ended on every path after it was initialised.
    unsafe {
        let mut opts: x::lzma_options_lzma = std::mem::zeroed();
        if x::lzma_lzma_preset(&mut opts, preset) != 0 {
            return None;
        }
        opts.dict_size = dict;
        let mut strm: x::lzma_stream = std::mem::zeroed();
        if x::lzma_microlzma_encoder(&mut strm, &opts) != x::LZMA_OK {
            x::lzma_end(&mut strm);
            return None;
        }
        strm.next_in = src.as_ptr();
        strm.avail_in = src.len();
        strm.next_out = dst.as_mut_ptr();
        strm.avail_out = dst.len();
        let ret = x::lzma_code(&mut strm, x::LZMA_FINISH);
        let (used, written) = (strm.total_in as usize, strm.total_out as usize);
        x::lzma_end(&mut strm);
        (ret == x::LZMA_STREAM_END && used > 0 && written > 0).then_some((used, written))
    }
}

fn lzma_decode(src: &[u8], out: &mut [u8]) -> Result<usize, String> {
    use liblzma_sys as x;
    // A dictionary as large as the output is always enough to decode it.
    let dict = (out.len() as u64).clamp(4096, u64::from(u32::MAX)) as u32;
    // SAFETY: as in lzma_encode; the decoder reads src and writes out within their lengths.
    unsafe {
        let mut strm: x::lzma_stream = std::mem::zeroed();
        if x::lzma_microlzma_decoder(&mut strm, src.len() as u64, out.len() as u64, 1, dict) != x::LZMA_OK {
            x::lzma_end(&mut strm);
            return Err("cannot start a MicroLZMA decoder".into());
        }
        strm.next_in = src.as_ptr();
        strm.avail_in = src.len();
        strm.next_out = out.as_mut_ptr();
        strm.avail_out = out.len();
        let ret = x::lzma_code(&mut strm, x::LZMA_FINISH);
        let n = strm.total_out as usize;
        x::lzma_end(&mut strm);
        if ret != x::LZMA_STREAM_END && !(ret == x::LZMA_OK && n == out.len()) {
            return Err(format!("corrupt MicroLZMA data (liblzma {ret})"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<u8> {
        // Text-like: compressible but not trivially.
        let words = [
            &b"erofs "[..],
            b"layer ",
            b"chunk ",
            b"containerd ",
            b"snapshot\n",
            b"0123 ",
        ];
        let mut v = Vec::with_capacity(n);
        let mut x = 12345u32;
        while v.len() < n {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            v.extend_from_slice(words[(x >> 16) as usize % words.len()]);
        }
        v.truncate(n);
        v
    }

    #[test]
    fn names_parse_like_mkfs() {
        for (s, kind, level) in [
            ("lz4", CodecKind::Lz4, 0),
            ("lz4hc", CodecKind::Lz4hc, 9),
            ("lz4hc,12", CodecKind::Lz4hc, 12),
            ("lz4hc,level=3", CodecKind::Lz4hc, 3),
            ("zstd", CodecKind::Zstd, 3),
            ("zstd,19", CodecKind::Zstd, 19),
            ("deflate,9", CodecKind::Deflate, 9),
            ("lzma", CodecKind::Lzma, 6),
            ("lzma,level=105", CodecKind::Lzma, 105),
        ] {
            assert_eq!(s.parse::<Codec>().unwrap(), Codec { kind, level }, "{s}");
        }
        for s in [
            "lz5",
            "lz4,1",
            "lz4hc,13",
            "zstd,x",
            "",
            "deflate,-1",
            "lzma,50",
            "lzma,110",
        ] {
            assert!(s.parse::<Codec>().is_err(), "{s}");
        }
    }

    #[test]
    fn every_codec_fits_its_output_and_round_trips() {
        let src = sample(64 * 1024);
        for name in [
            "lz4",
            "lz4hc",
            "zstd",
            "zstd,12",
            "deflate",
            "deflate,9",
            "lzma",
            "lzma,109",
        ] {
            let codec: Codec = name.parse().unwrap();
            for cap in [4096usize, 16384] {
                let mut c = Compressor::new(codec, cap).unwrap();
                let mut dst = vec![0u8; cap];
                let (used, written) = c.compress_destsize(&src, &mut dst).unwrap();
                assert!(written <= cap && used > written, "{name}: {used} -> {written}");
                // Filled: at least 90% of the room used, unless all input went in.
                assert!(
                    used == src.len() || written * 10 >= cap * 9,
                    "{name}/{cap}: wrote {written}"
                );
                let mut out = vec![0u8; used];
                decompress(codec.algorithm(), &dst[..written], &mut out).unwrap();
                assert_eq!(out, src[..used], "{name}");
                // A wrong length is an error, not a short read.
                let mut long = vec![0u8; used + 1];
                assert!(
                    decompress(codec.algorithm(), &dst[..written], &mut long).is_err(),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn corrupt_streams_are_errors() {
        for alg in [Algorithm::Lz4, Algorithm::Zstd, Algorithm::Deflate, Algorithm::Lzma] {
            let mut out = vec![0u8; 4096];
            assert!(decompress(alg, &[0xff; 64], &mut out).is_err(), "{alg:?}");
            assert!(decompress(alg, &[0x5d, 0, 0, 1, 2, 3], &mut out).is_err(), "{alg:?}");
        }
    }
}
