//! gzip member framing (RFC 1952), parsed exactly as `flate2`'s `GzDecoder` does: the
//! same checks, the same limits, so the indexer accepts what the project's decoder
//! accepts.

use crate::zlib::crc32;

const FHCRC: u8 = 1 << 1;
const FEXTRA: u8 = 1 << 2;
const FNAME: u8 = 1 << 3;
const FCOMMENT: u8 = 1 << 4;
const FRESERVED: u8 = 0xe0;

/// flate2's limit on the FNAME and FCOMMENT fields (bytes before the NUL).
const MAX_FIELD: usize = 65535;

/// The largest header [`parse_header`] can accept: fixed part, FEXTRA, FNAME and
/// FCOMMENT at their limits, FHCRC.
pub(crate) const MAX_HEADER: usize = 10 + 2 + 65535 + (MAX_FIELD + 1) * 2 + 2;

/// Length of the trailer (CRC-32, ISIZE).
pub(crate) const TRAILER: usize = 8;

/// Parses a gzip member header at the start of `b`.
///
/// `Ok(Some(n))`: a complete, valid header of `n` bytes. `Ok(None)`: valid so far but
/// `b` ends inside it. `Err`: invalid.
pub(crate) fn parse_header(b: &[u8]) -> Result<Option<usize>, &'static str> {
    if b.len() < 10 {
        return Ok(None);
    }
    if b[0] != 0x1f || b[1] != 0x8b || b[2] != 8 {
        return Err("invalid gzip header");
    }
    let flags = b[3];
    if flags & FRESERVED != 0 {
        return Err("invalid gzip header (reserved flags)");
    }
    let mut p = 10usize;
    if flags & FEXTRA != 0 {
        let Some(xlen) = b.get(p..p + 2) else {
            return Ok(None);
        };
        let xlen = usize::from(u16::from_le_bytes([xlen[0], xlen[1]]));
        p += 2;
        if b.len() < p + xlen {
            return Ok(None);
        }
        p += xlen;
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            let avail = &b[p..];
            let window = &avail[..avail.len().min(MAX_FIELD + 1)];
            match window.iter().position(|&c| c == 0) {
                Some(i) => p += i + 1,
                None if window.len() > MAX_FIELD => return Err("gzip header field too long"),
                None => return Ok(None),
            }
        }
    }
    if flags & FHCRC != 0 {
        let Some(stored) = b.get(p..p + 2) else {
            return Ok(None);
        };
        let stored = u16::from_le_bytes([stored[0], stored[1]]);
        if stored != crc32(0, &b[..p]) as u16 {
            return Err("corrupt gzip header (header CRC mismatch)");
        }
        p += 2;
    }
    Ok(Some(p))
}

/// Checks a member trailer against the member's CRC-32 and length.
pub(crate) fn check_trailer(t: &[u8; TRAILER], crc: u32, len: u64) -> Result<(), &'static str> {
    let stored_crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
    let stored_len = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
    if stored_crc != crc || stored_len != len as u32 {
        return Err("corrupt gzip stream does not have a matching checksum");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u8, extra: &[u8], name: &[u8], comment: &[u8]) -> Vec<u8> {
        let mut h = vec![0x1f, 0x8b, 8, flags, 1, 2, 3, 4, 0, 3];
        if flags & FEXTRA != 0 {
            h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            h.extend_from_slice(extra);
        }
        if flags & FNAME != 0 {
            h.extend_from_slice(name);
            h.push(0);
        }
        if flags & FCOMMENT != 0 {
            h.extend_from_slice(comment);
            h.push(0);
        }
        if flags & FHCRC != 0 {
            let c = crc32(0, &h) as u16;
            h.extend_from_slice(&c.to_le_bytes());
        }
        h
    }

    #[test]
    fn full_header_and_prefixes() {
        let h = header(FEXTRA | FNAME | FCOMMENT | FHCRC, b"xyz", b"name", b"comment");
        assert_eq!(parse_header(&h), Ok(Some(h.len())));
        for n in 0..h.len() {
            assert_eq!(parse_header(&h[..n]), Ok(None), "prefix {n}");
        }
        let mut bad = h.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(parse_header(&bad).is_err());
    }

    #[test]
    fn rejects_like_flate2() {
        assert!(parse_header(&[0x1f, 0x8b, 7, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(parse_header(&[0x1f, 0x8b, 8, 0x20, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(parse_header(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        // Longest name flate2 accepts, and one byte more.
        let ok = header(FNAME, b"", &vec![b'a'; MAX_FIELD], b"");
        assert_eq!(parse_header(&ok), Ok(Some(ok.len())));
        let long = header(FNAME, b"", &vec![b'a'; MAX_FIELD + 1], b"");
        assert!(parse_header(&long).is_err());
        let max = header(
            FEXTRA | FNAME | FCOMMENT | FHCRC,
            &vec![1; 65535],
            &vec![b'a'; MAX_FIELD],
            &vec![b'b'; MAX_FIELD],
        );
        assert_eq!(max.len(), MAX_HEADER);
        assert_eq!(parse_header(&max), Ok(Some(MAX_HEADER)));
    }
}
