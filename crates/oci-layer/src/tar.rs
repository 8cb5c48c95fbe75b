//! A streaming tar reader: ustar, GNU (long names and links, base-256 numbers) and
//! PAX (per-entry and global headers, sub-second times, xattrs).
//!
//! Written by hand rather than taken from the `tar` crate because the converter needs
//! to own the byte stream: file bodies are handed to the EROFS writer straight from the
//! decompressed buffers (no per-entry reader object, no copy), and every malformation
//! must surface as an error that names the entry and its offset — a truncated stream,
//! a checksum mismatch or a missing end-of-archive marker is never a quiet end.

use std::io::{self, BufRead};

use crate::error::{Error, ErrorKind};

const BLOCK: usize = 512;
/// Upper bound on a PAX or GNU long-name body; real ones are a few KiB.
const MAX_META_BODY: u64 = 16 << 20;

/// The type of a tar entry, after the meta headers (PAX, GNU long names) are folded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file (types '0', '\0', '7').
    File,
    /// A hard link to `link` (type '1').
    HardLink,
    /// A symbolic link to `link` (type '2').
    Symlink,
    /// A character device (type '3').
    CharDev,
    /// A block device (type '4').
    BlockDev,
    /// A directory (type '5', or an old-style file whose name ends in '/').
    Dir,
    /// A FIFO (type '6').
    Fifo,
}

/// One tar entry's header, with PAX and GNU extensions applied.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    /// Path as stored (not cleaned).
    pub path: Vec<u8>,
    /// Entry type.
    pub kind: Option<Kind>,
    /// Permission bits (07777).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time, seconds since the epoch (negative before 1970).
    pub mtime: i64,
    /// Modification time, nanoseconds after `mtime` (always forward: -1.5 s is
    /// `mtime` -2 and `mtime_nsec` 500000000).
    pub mtime_nsec: u32,
    /// Bytes of body that follow the header.
    pub size: u64,
    /// Link target for hard and symbolic links.
    pub link: Vec<u8>,
    /// Device major.
    pub devmajor: u32,
    /// Device minor.
    pub devminor: u32,
    /// Extended attributes from `SCHILY.xattr.*` records, in archive order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Byte offset of the entry's header in the uncompressed stream.
    pub offset: u64,
}

impl Entry {
    /// The entry's path for error messages.
    pub fn display_path(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }

    /// What the entry's name refers to (see [`crate::name`]).
    pub fn target(&self) -> Result<crate::name::Target<'_>, Error> {
        crate::name::target(&self.path)
    }
}

/// PAX records that override header fields.
#[derive(Debug, Clone, Default)]
struct Pax {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<(i64, u32)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Pax {
    fn merge_from(&mut self, other: &Pax) {
        macro_rules! take {
            ($f:ident) => {
                if other.$f.is_some() {
                    self.$f = other.$f.clone();
                }
            };
        }
        take!(path);
        take!(link);
        take!(size);
        take!(uid);
        take!(gid);
        take!(mtime);
        for (k, v) in &other.xattrs {
            self.xattrs.retain(|(k2, _)| k2 != k);
            self.xattrs.push((k.clone(), v.clone()));
        }
    }
}

/// Reads entries from an uncompressed tar stream.
///
/// After [`TarReader::next_entry`] returns an entry with a body, the caller either reads
/// exactly `size` body bytes from [`TarReader::body`] and calls
/// [`TarReader::body_done`], or does nothing and the next call skips the body.
pub struct TarReader<R: BufRead> {
    src: R,
    /// Offset in the uncompressed stream.
    pos: u64,
    /// Body bytes of the current entry not yet consumed by the caller.
    body_left: u64,
    /// Padding after the current body.
    pad_left: u64,
    global: Pax,
    finished: bool,
}

impl<R: BufRead> TarReader<R> {
    /// Wraps an uncompressed tar stream.
    pub fn new(src: R) -> Self {
        TarReader {
            src,
            pos: 0,
            body_left: 0,
            pad_left: 0,
            global: Pax::default(),
            finished: false,
        }
    }

    /// The stream, positioned at the current entry's body.
    pub fn body(&mut self) -> &mut R {
        &mut self.src
    }

    /// Declares that the caller consumed the whole body from [`TarReader::body`].
    pub fn body_done(&mut self) {
        self.pos += self.body_left;
        self.body_left = 0;
    }

    /// Byte offset in the uncompressed stream.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Gives the stream back, e.g. to drain what follows the end-of-archive marker.
    pub fn into_inner(self) -> R {
        self.src
    }

    /// The next entry, or `None` at the end-of-archive marker.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, Error> {
        if self.finished {
            return Ok(None);
        }
        self.skip(self.body_left + self.pad_left, None)?;
        self.body_left = 0;
        self.pad_left = 0;

        let mut local = Pax::default();
        let mut gnu_name: Option<Vec<u8>> = None;
        let mut gnu_link: Option<Vec<u8>> = None;
        loop {
            let offset = self.pos;
            let mut hdr = [0u8; BLOCK];
            let got = self.read_block(&mut hdr)?;
            if got == 0 {
                return Err(
                    Error::new(ErrorKind::Truncated, "stream ended without the end-of-archive marker").at(offset),
                );
            }
            if got < BLOCK {
                return Err(Error::new(ErrorKind::Truncated, "stream ended inside a header").at(offset));
            }
            if hdr.iter().all(|&b| b == 0) {
                // End of archive. GNU tar writes two zero blocks; a lone one is accepted
                // as GNU tar does. What follows is left for the caller to drain.
                let mut second = [0u8; BLOCK];
                let _ = self.read_block(&mut second)?;
                self.finished = true;
                return Ok(None);
            }
            verify_checksum(&hdr).map_err(|m| Error::new(ErrorKind::BadHeader, m).at(offset))?;

            let typeflag = hdr[156];
            let size = parse_number(&hdr[124..136])
                .map_err(|m| Error::new(ErrorKind::BadHeader, format!("size field: {m}")).at(offset))?;
            let size = u64::try_from(size).map_err(|_| Error::new(ErrorKind::BadHeader, "negative size").at(offset))?;
            match typeflag {
                b'x' | b'g' | b'L' | b'K' => {
                    if size > MAX_META_BODY {
                        return Err(Error::new(
                            ErrorKind::BadHeader,
                            format!("extension header of {size} bytes exceeds the {MAX_META_BODY}-byte limit"),
                        )
                        .at(offset));
                    }
                    let mut body = vec![0u8; size as usize];
                    self.read_exact_counted(&mut body, offset)?;
                    self.skip(padding(size), Some(offset))?;
                    match typeflag {
                        b'x' => parse_pax(&body, &mut local)
                            .map_err(|m| Error::new(ErrorKind::BadHeader, format!("PAX header: {m}")).at(offset))?,
                        b'g' => {
                            let mut g = Pax::default();
                            parse_pax(&body, &mut g).map_err(|m| {
                                Error::new(ErrorKind::BadHeader, format!("PAX global header: {m}")).at(offset)
                            })?;
                            self.global.merge_from(&g);
                        }
                        b'L' => gnu_name = Some(trim_nul(&body).to_vec()),
                        _ => gnu_link = Some(trim_nul(&body).to_vec()),
                    }
                    continue;
                }
                _ => {}
            }

            let mut e = self.decode_header(&hdr, offset, size)?;
            let mut pax = self.global.clone();
            pax.merge_from(&local);
            if let Some(n) = gnu_name.take() {
                e.path = n;
            }
            if let Some(l) = gnu_link.take() {
                e.link = l;
            }
            if let Some(p) = pax.path {
                e.path = p;
            }
            if let Some(l) = pax.link {
                e.link = l;
            }
            if let Some(s) = pax.size {
                e.size = s;
            }
            if let Some(u) = pax.uid {
                e.uid = u;
            }
            if let Some(g) = pax.gid {
                e.gid = g;
            }
            if let Some((s, ns)) = pax.mtime {
                e.mtime = s;
                e.mtime_nsec = ns;
            }
            e.xattrs = pax.xattrs;
            if e.kind.is_none() {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("entry type {:?} is not supported", typeflag as char),
                )
                .entry(&e.display_path())
                .at(offset));
            }
            // A trailing slash makes an old-style regular file ('\0') or a contiguous
            // file ('7') a directory, as GNU tar and Go's archive/tar read them; GNU tar
            // extracts a '0' entry named "x/" as the file "x".
            if matches!(typeflag, 0 | b'7') && e.path.ends_with(b"/") {
                e.kind = Some(Kind::Dir);
            }
            self.body_left = e.size;
            self.pad_left = padding(e.size);
            return Ok(Some(e));
        }
    }

    fn decode_header(&self, h: &[u8; BLOCK], offset: u64, size: u64) -> Result<Entry, Error> {
        let posix = &h[257..263] == b"ustar\0";
        let mut path = trim_nul(&h[0..100]).to_vec();
        if posix {
            let prefix = trim_nul(&h[345..500]);
            if !prefix.is_empty() {
                let mut p = prefix.to_vec();
                p.push(b'/');
                p.extend_from_slice(&path);
                path = p;
            }
        }
        let field = |name: &str, r: std::ops::Range<usize>| {
            parse_number(&h[r]).map_err(|m| {
                Error::new(ErrorKind::BadHeader, format!("{name} field: {m}"))
                    .entry(&String::from_utf8_lossy(&path))
                    .at(offset)
            })
        };
        let mode = field("mode", 100..108)?;
        let uid = field("uid", 108..116)?;
        let gid = field("gid", 116..124)?;
        let mtime = field("mtime", 136..148)?;
        let (devmajor, devminor) = match h[156] {
            b'3' | b'4' => (field("devmajor", 329..337)?, field("devminor", 337..345)?),
            _ => (0, 0),
        };
        let kind = match h[156] {
            b'0' | b'\0' | b'7' => Some(Kind::File),
            b'1' => Some(Kind::HardLink),
            b'2' => Some(Kind::Symlink),
            b'3' => Some(Kind::CharDev),
            b'4' => Some(Kind::BlockDev),
            b'5' => Some(Kind::Dir),
            b'6' => Some(Kind::Fifo),
            _ => None,
        };
        let nonneg = |v: i128, what: &str| {
            u64::try_from(v).map_err(|_| {
                Error::new(ErrorKind::BadHeader, format!("{what} out of range"))
                    .entry(&String::from_utf8_lossy(&path))
                    .at(offset)
            })
        };
        let dev = |v: i128, what: &str| {
            u32::try_from(v).map_err(|_| {
                Error::new(ErrorKind::BadHeader, format!("{what} out of range"))
                    .entry(&String::from_utf8_lossy(&path))
                    .at(offset)
            })
        };
        Ok(Entry {
            kind,
            mode: (mode & 0o7777) as u32,
            uid: nonneg(uid, "uid")?,
            gid: nonneg(gid, "gid")?,
            mtime: i64::try_from(mtime).map_err(|_| {
                Error::new(ErrorKind::BadHeader, "mtime beyond the 64-bit range of any file system")
                    .entry(&String::from_utf8_lossy(&path))
                    .at(offset)
            })?,
            mtime_nsec: 0,
            size,
            link: trim_nul(&h[157..257]).to_vec(),
            devmajor: dev(devmajor, "devmajor")?,
            devminor: dev(devminor, "devminor")?,
            xattrs: Vec::new(),
            offset,
            path,
        })
    }

    /// Reads up to one block; returns how many bytes were read (short only at EOF).
    fn read_block(&mut self, buf: &mut [u8; BLOCK]) -> Result<usize, Error> {
        let mut got = 0;
        while got < BLOCK {
            let avail = self.src.fill_buf().map_err(|e| Error::io(e).at(self.pos))?;
            if avail.is_empty() {
                break;
            }
            let n = avail.len().min(BLOCK - got);
            buf[got..got + n].copy_from_slice(&avail[..n]);
            self.src.consume(n);
            got += n;
        }
        self.pos += got as u64;
        Ok(got)
    }

    fn read_exact_counted(&mut self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let mut got = 0;
        while got < buf.len() {
            let avail = self.src.fill_buf().map_err(|e| Error::io(e).at(self.pos))?;
            if avail.is_empty() {
                return Err(Error::new(ErrorKind::Truncated, "stream ended inside an extension header").at(offset));
            }
            let n = avail.len().min(buf.len() - got);
            buf[got..got + n].copy_from_slice(&avail[..n]);
            self.src.consume(n);
            got += n;
            self.pos += n as u64;
        }
        Ok(())
    }

    fn skip(&mut self, mut n: u64, offset: Option<u64>) -> Result<(), Error> {
        while n > 0 {
            let avail = self.src.fill_buf().map_err(|e| Error::io(e).at(self.pos))?;
            if avail.is_empty() {
                return Err(Error::new(ErrorKind::Truncated, "stream ended inside an entry's data")
                    .at(offset.unwrap_or(self.pos)));
            }
            let k = avail.len().min(n as usize);
            self.src.consume(k);
            n -= k as u64;
            self.pos += k as u64;
        }
        Ok(())
    }
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn trim_nul(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

fn verify_checksum(h: &[u8; BLOCK]) -> Result<(), String> {
    let stored = parse_number(&h[148..156]).map_err(|m| format!("checksum field: {m}"))?;
    let mut unsigned: i128 = 0;
    let mut signed: i128 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += i128::from(b);
        signed += i128::from(b as i8);
    }
    if stored == unsigned || stored == signed {
        Ok(())
    } else {
        Err(format!(
            "header checksum mismatch (stored {stored}, computed {unsigned})"
        ))
    }
}

/// Parses a numeric header field: octal (space/NUL padded) or GNU base-256.
fn parse_number(f: &[u8]) -> Result<i128, String> {
    if let Some(&first) = f.first() {
        if first & 0x80 != 0 {
            let negative = first & 0x40 != 0;
            let mut v: i128 = i128::from(first & 0x3f);
            if negative {
                v -= 0x40;
            }
            for &b in &f[1..] {
                v = v
                    .checked_mul(256)
                    .and_then(|v| v.checked_add(i128::from(b)))
                    .ok_or("number too large")?;
            }
            return Ok(v);
        }
    }
    let s = f.iter().skip_while(|&&b| b == b' ' || b == 0);
    let mut v: i128 = 0;
    let mut ended = false;
    for &b in s {
        match b {
            b'0'..=b'7' if !ended => v = v * 8 + i128::from(b - b'0'),
            b' ' | 0 => ended = true,
            _ => return Err(format!("invalid octal digit {:?}", b as char)),
        }
    }
    Ok(v)
}

/// Parses PAX records `"<len> <key>=<value>\n"` into `pax`.
fn parse_pax(mut body: &[u8], pax: &mut Pax) -> Result<(), String> {
    while !body.is_empty() {
        if body.iter().all(|&b| b == 0) {
            break;
        }
        let sp = body.iter().position(|&b| b == b' ').ok_or("record without length")?;
        let len: usize = std::str::from_utf8(&body[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("bad record length")?;
        if len <= sp + 1 || len > body.len() || body[len - 1] != b'\n' {
            return Err("record length out of range".into());
        }
        let rec = &body[sp + 1..len - 1];
        body = &body[len..];
        let eq = rec.iter().position(|&b| b == b'=').ok_or("record without '='")?;
        let (key, value) = (&rec[..eq], &rec[eq + 1..]);
        let num = |v: &[u8]| -> Result<u64, String> {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad number for {}", String::from_utf8_lossy(key)))
        };
        match key {
            b"path" => pax.path = Some(value.to_vec()),
            b"linkpath" => pax.link = Some(value.to_vec()),
            b"size" => pax.size = Some(num(value)?),
            b"uid" => pax.uid = Some(num(value)?),
            b"gid" => pax.gid = Some(num(value)?),
            b"mtime" => pax.mtime = Some(parse_time(value).ok_or("bad mtime")?),
            _ if key.starts_with(b"SCHILY.xattr.") => {
                let name = key[b"SCHILY.xattr.".len()..].to_vec();
                pax.xattrs.retain(|(k, _)| *k != name);
                pax.xattrs.push((name, value.to_vec()));
            }
            _ if key.starts_with(b"GNU.sparse.") => {
                return Err("sparse files are not supported".into());
            }
            // atime, ctime, uname, gname, comment, charset, ACL text records and the
            // like carry nothing an EROFS inode stores.
            _ => {}
        }
    }
    Ok(())
}

/// Parses a PAX time `[-]seconds[.fraction]` into (seconds, nanoseconds), flooring
/// negative times so the nanoseconds stay positive.
fn parse_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Parsed wider than i64 so that i64::MIN (whose magnitude i64 cannot hold) and
    // the floor of a negative time stay exact; anything beyond i64 is refused.
    let secs: i128 = i128::from(int.parse::<u64>().ok()?);
    let mut ns: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        ns += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
    }
    let (secs, ns) = match (neg, ns) {
        (false, ns) => (secs, ns),
        (true, 0) => (-secs, 0),
        (true, ns) => (-secs - 1, 1_000_000_000 - ns),
    };
    Some((i64::try_from(secs).ok()?, ns))
}

/// Drains a stream to its end (to hash bytes after the end-of-archive marker).
pub fn drain<R: BufRead>(src: &mut R) -> io::Result<u64> {
    let mut n = 0;
    loop {
        let len = src.fill_buf()?.len();
        if len == 0 {
            return Ok(n);
        }
        src.consume(len);
        n += len as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_number(b"0000644\0"), Ok(0o644));
        assert_eq!(parse_number(b"  755 \0"), Ok(0o755));
        assert_eq!(parse_number(b"\0\0\0\0"), Ok(0));
        assert_eq!(parse_number(&[0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]), Ok(1 << 32));
        assert!(parse_number(b"12x").is_err());
    }

    #[test]
    fn times() {
        assert_eq!(parse_time(b"1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(parse_time(b"12"), Some((12, 0)));
        assert_eq!(parse_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_time(b"1.1234567891"), Some((1, 123_456_789)));
        assert_eq!(parse_time(b"x"), None);
        assert_eq!(parse_time(b"-0.5"), Some((-1, 500_000_000)));
        assert_eq!(parse_time(b"-9223372036854775808"), Some((i64::MIN, 0)));
        assert_eq!(parse_time(b"-9223372036854775808.5"), None);
        assert_eq!(
            parse_time(b"9223372036854775807.999999999"),
            Some((i64::MAX, 999_999_999))
        );
        assert_eq!(parse_time(b"9223372036854775808"), None);
        assert_eq!(parse_time(b"4294967296.25"), Some((4_294_967_296, 250_000_000)));
    }

    /// A ustar header block for `name` of type `typeflag`, with a valid checksum.
    fn header(name: &[u8], typeflag: u8, mtime_field: &[u8; 12]) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name);
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(b"00000000000\0");
        h[136..148].copy_from_slice(mtime_field);
        h[156] = typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn read_one(h: &[u8; BLOCK]) -> Result<Entry, ErrorKind> {
        let mut tar = h.to_vec();
        tar.extend_from_slice(&[0u8; 2 * BLOCK]);
        let mut r = TarReader::new(&tar[..]);
        r.next_entry().map(|e| e.unwrap()).map_err(|e| e.kind)
    }

    #[test]
    fn a_trailing_slash_makes_a_directory_only_of_old_style_and_contiguous_files() {
        let t = b"00000000000\0";
        // As GNU tar 1.34 extracts them: '\0' and '7' named "x/" are directories, a
        // '0' named "x/" is the file "x".
        assert_eq!(read_one(&header(b"x/", 0, t)).unwrap().kind, Some(Kind::Dir));
        assert_eq!(read_one(&header(b"x/", b'7', t)).unwrap().kind, Some(Kind::Dir));
        assert_eq!(read_one(&header(b"x/", b'0', t)).unwrap().kind, Some(Kind::File));
        assert_eq!(read_one(&header(b"x", 0, t)).unwrap().kind, Some(Kind::File));
    }

    #[test]
    fn base256_times_are_signed_and_bounded() {
        let mut neg = [0xffu8; 12];
        assert_eq!(read_one(&header(b"f", b'0', &neg)).unwrap().mtime, -1);
        neg[11] = 0xfe;
        assert_eq!(read_one(&header(b"f", b'0', &neg)).unwrap().mtime, -2);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[7] = 1; // 2^32: 2106-02-07
        assert_eq!(read_one(&header(b"f", b'0', &big)).unwrap().mtime, 1 << 32);
        let mut min = [0u8; 12];
        min[0] = 0xff;
        min[1..4].fill(0xff);
        min[4] = 0x80; // -2^63
        assert_eq!(read_one(&header(b"f", b'0', &min)).unwrap().mtime, i64::MIN);
        let mut too_big = [0u8; 12];
        too_big[0] = 0x80;
        too_big[3] = 1; // 2^64
        assert_eq!(
            read_one(&header(b"f", b'0', &too_big)).unwrap_err(),
            ErrorKind::BadHeader
        );
        let mut too_small = [0xffu8; 12];
        too_small[3] = 0xfe; // below -2^63
        assert_eq!(
            read_one(&header(b"f", b'0', &too_small)).unwrap_err(),
            ErrorKind::BadHeader
        );
    }

    #[test]
    fn pax_records() {
        let mut p = Pax::default();
        let body = b"30 mtime=1700000000.123456789\n20 path=a/long/name\n27 SCHILY.xattr.user.k=v\nv\n";
        parse_pax(body, &mut p).unwrap();
        assert_eq!(p.mtime, Some((1_700_000_000, 123_456_789)));
        assert_eq!(p.path.as_deref(), Some(&b"a/long/name"[..]));
        assert_eq!(p.xattrs, vec![(b"user.k".to_vec(), b"v\nv".to_vec())]);
        assert!(parse_pax(b"99 path=x\n", &mut p).is_err());
    }
}
