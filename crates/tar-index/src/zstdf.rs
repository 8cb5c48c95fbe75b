//! zstd frame headers: just enough to learn the window a frame needs, so chunk decoding
//! can cap the decoder's memory at what the layer itself requires.

/// Bytes that always hold a frame's magic and whole header.
pub(crate) const MAX_FRAME_HEADER: usize = 18;

/// zstd's smallest window log.
pub(crate) const MIN_WINDOW_LOG: u8 = 10;
/// zstd's default decoder limit (`ZSTD_WINDOWLOG_LIMIT_DEFAULT`): larger frames are
/// refused by the project's decoder, so no index ever needs more.
pub(crate) const MAX_WINDOW_LOG: u8 = 27;

const MAGIC: u32 = 0xFD2F_B528;
const SKIPPABLE_MASK: u32 = 0xFFFF_FFF0;
const SKIPPABLE: u32 = 0x184D_2A50;

/// The window log a decoder needs for the frame at the start of `b` (`ceil(log2(window
/// size))`, at least 10), or `None` if `b` does not hold a whole zstd frame header
/// (skippable frames, garbage, too few bytes: the decoder itself judges those).
pub(crate) fn window_log(b: &[u8]) -> Option<u8> {
    let magic = u32::from_le_bytes(b.get(..4)?.try_into().ok()?);
    if magic & SKIPPABLE_MASK == SKIPPABLE || magic != MAGIC {
        return None;
    }
    let fhd = *b.get(4)?;
    let single_segment = fhd & 0x20 != 0;
    let fcs_code = fhd >> 6;
    let dict_len = [0usize, 1, 2, 4][usize::from(fhd & 3)];
    let mut p = 5usize;
    let mut window: u64 = 0;
    if !single_segment {
        let wd = *b.get(5)?;
        let wlog = 10 + u32::from(wd >> 3);
        let base = 1u64 << wlog;
        window = base + (base / 8) * u64::from(wd & 7);
        p = 6;
    }
    p += dict_len;
    if single_segment {
        let fcs = match fcs_code {
            0 => u64::from(*b.get(p)?),
            1 => u64::from(u16::from_le_bytes(b.get(p..p + 2)?.try_into().ok()?)) + 256,
            2 => u64::from(u32::from_le_bytes(b.get(p..p + 4)?.try_into().ok()?)),
            _ => u64::from_le_bytes(b.get(p..p + 8)?.try_into().ok()?),
        };
        window = fcs;
    }
    let window = window.max(1 << MIN_WINDOW_LOG);
    // ceil(log2(window)); zstd refuses frames beyond MAX_WINDOW_LOG anyway.
    let log = 64 - (window - 1).leading_zeros();
    Some(log.min(u32::from(MAX_WINDOW_LOG)) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_logs_of_real_frames() {
        let data = vec![7u8; 3 << 20];
        let small = zstd::bulk::compress(&data[..1000], 3).unwrap();
        assert_eq!(window_log(&small), Some(10));
        let big = zstd::bulk::compress(&data, 19).unwrap();
        let w = window_log(&big).unwrap();
        assert!((22..=23).contains(&w), "{w}");
        // A streamed frame (unknown content size) declares its window.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        std::io::Write::write_all(&mut enc, &data).unwrap();
        let streamed = enc.finish().unwrap();
        let w = window_log(&streamed).unwrap();
        assert!((10..=27).contains(&w), "{w}");
        assert_eq!(window_log(&[0x50, 0x2a, 0x4d, 0x18, 0, 0, 0, 0]), None);
        assert_eq!(window_log(&small[..4]), None);
    }
}
