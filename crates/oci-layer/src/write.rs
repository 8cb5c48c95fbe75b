//! A PAX tar writer for layers: ustar headers with extended records where a field does
//! not fit (long paths and link targets, uid/gid above 2097151, sizes from 8 GiB,
//! sub-second, negative and far-future mtimes, `SCHILY.xattr.*`), compressed on the way
//! out and hashed before compression, so the caller gets the diffID without a second
//! pass. What [`crate::tar::TarReader`] reads back is exactly what was written.

use std::io::{self, BufWriter, Write};

use sha2::{Digest, Sha256};

use crate::stream::Compression;
use crate::tar::Kind;

const BLOCK: usize = 512;
/// Largest value of an 8-byte octal field (7 digits).
const MAX_OCTAL_8: u64 = 0o7777777;
/// Largest value of a 12-byte octal field (11 digits).
const MAX_OCTAL_12: u64 = 0o77777777777;
/// containerd's levels for new layers.
const GZIP_LEVEL: u32 = 6;
const ZSTD_LEVEL: i32 = 3;

/// One entry's header before encoding.
#[derive(Debug, Clone)]
pub struct Header {
    /// Path in the archive (directories conventionally with a trailing `/`).
    pub name: Vec<u8>,
    /// Entry type.
    pub kind: Kind,
    /// Permission bits (07777).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Bytes of body that follow (regular files only).
    pub size: u64,
    /// Modification time: seconds since the epoch and nanoseconds forward from them.
    pub mtime: (i64, u32),
    /// Link target (hard and symbolic links).
    pub link: Vec<u8>,
    /// Device major.
    pub devmajor: u64,
    /// Device minor.
    pub devminor: u64,
    /// Extended attributes, written in this order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Header {
    /// A header of `kind` named `name`, everything else zero or empty.
    pub fn new(name: Vec<u8>, kind: Kind) -> Header {
        Header {
            name,
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: (0, 0),
            link: Vec::new(),
            devmajor: 0,
            devminor: 0,
            xattrs: Vec::new(),
        }
    }
}

fn typeflag(k: Kind) -> u8 {
    match k {
        Kind::File => b'0',
        Kind::HardLink => b'1',
        Kind::Symlink => b'2',
        Kind::CharDev => b'3',
        Kind::BlockDev => b'4',
        Kind::Dir => b'5',
        Kind::Fifo => b'6',
    }
}

/// The compressor at the bottom of the output stack.
enum Compressor<W: Write> {
    Plain(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Plain(w) => w.write(buf),
            Compressor::Gzip(w) => w.write(buf),
            Compressor::Zstd(w) => w.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Compressor::Plain(w) => w.write_all(buf),
            Compressor::Gzip(w) => w.write_all(buf),
            Compressor::Zstd(w) => w.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Plain(w) => w.flush(),
            Compressor::Gzip(w) => w.flush(),
            Compressor::Zstd(w) => w.flush(),
        }
    }
}

impl<W: Write> Compressor<W> {
    fn finish(self) -> io::Result<()> {
        match self {
            Compressor::Plain(mut w) => w.flush(),
            Compressor::Gzip(w) => w.finish()?.flush(),
            Compressor::Zstd(w) => w.finish()?.flush(),
        }
    }
}

/// Hashes and counts the uncompressed tar on its way to the compressor.
struct Hashing<W: Write> {
    inner: Compressor<W>,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        self.hasher.update(buf);
        self.count += buf.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What a finished tar stream holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// Entries written (PAX extended headers not counted).
    pub entries: u64,
    /// Bytes of the tar before compression, end-of-archive blocks included.
    pub size: u64,
    /// `sha256:<hex>` of the tar before compression: the layer's diffID.
    pub digest: String,
}

/// A layer tar being written: [`TarWriter::append`] a header, write a regular file's
/// `size` body bytes to [`TarWriter::body`], [`TarWriter::pad`], and [`TarWriter::finish`]
/// at the end.
pub struct TarWriter<W: Write> {
    out: BufWriter<Hashing<W>>,
    entries: u64,
}

impl<W: Write> TarWriter<W> {
    /// A tar stream written to `out`, compressed as `compression` says (gzip level 6 and
    /// zstd level 3, containerd's levels).
    pub fn new(out: W, compression: Compression) -> io::Result<Self> {
        let inner = match compression {
            Compression::None => Compressor::Plain(out),
            Compression::Gzip => {
                Compressor::Gzip(flate2::write::GzEncoder::new(out, flate2::Compression::new(GZIP_LEVEL)))
            }
            Compression::Zstd => Compressor::Zstd(zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?),
        };
        Ok(TarWriter {
            out: BufWriter::with_capacity(
                256 << 10,
                Hashing {
                    inner,
                    hasher: Sha256::new(),
                    count: 0,
                },
            ),
            entries: 0,
        })
    }

    /// Where the body of the entry just appended goes.
    pub fn body(&mut self) -> &mut impl Write {
        &mut self.out
    }

    /// Pads a body of `size` bytes to the block size.
    pub fn pad(&mut self, size: u64) -> io::Result<()> {
        self.out.write_all(&[0u8; BLOCK][..padding(size)])
    }

    /// Writes the end-of-archive marker and finishes the compressed stream.
    pub fn finish(self) -> io::Result<Finished> {
        let mut out = self.out;
        out.write_all(&[0u8; 2 * BLOCK])?;
        let Hashing { inner, hasher, count } = out.into_inner().map_err(|e| e.into_error())?;
        inner.finish()?;
        Ok(Finished {
            entries: self.entries,
            size: count,
            digest: format!("sha256:{}", hex::encode(hasher.finalize())),
        })
    }

    /// Writes `h` (with a PAX extended header first when a field needs one).
    pub fn append(&mut self, h: &Header) -> io::Result<()> {
        encode(h, &mut self.out)?;
        self.entries += 1;
        Ok(())
    }
}

/// Encodes `h` as tar header blocks: a PAX extended header when needed, then the
/// ustar header.
pub fn encode(h: &Header, out: &mut impl Write) -> io::Result<()> {
    if h.devmajor > MAX_OCTAL_8 || h.devminor > MAX_OCTAL_8 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "device number too large for a tar header",
        ));
    }
    if h.mtime.1 >= 1_000_000_000 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "nanoseconds out of range"));
    }
    let mut pax = Vec::new();
    let mut binary = false;
    if h.name.len() > 100 {
        pax_record(&mut pax, b"path", &h.name);
        binary |= std::str::from_utf8(&h.name).is_err();
    }
    if h.link.len() > 100 {
        pax_record(&mut pax, b"linkpath", &h.link);
        binary |= std::str::from_utf8(&h.link).is_err();
    }
    if binary {
        pax_record(&mut pax, b"hdrcharset", b"BINARY");
    }
    if h.uid > MAX_OCTAL_8 {
        pax_record(&mut pax, b"uid", h.uid.to_string().as_bytes());
    }
    if h.gid > MAX_OCTAL_8 {
        pax_record(&mut pax, b"gid", h.gid.to_string().as_bytes());
    }
    if h.size > MAX_OCTAL_12 {
        pax_record(&mut pax, b"size", h.size.to_string().as_bytes());
    }
    let mtime = h.mtime;
    if mtime.1 != 0 || mtime.0 < 0 || mtime.0 as u64 > MAX_OCTAL_12 {
        pax_record(&mut pax, b"mtime", pax_time(mtime).as_bytes());
    }
    for (k, v) in &h.xattrs {
        if k.contains(&b'=') || k.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "xattr name {:?} cannot be written as a PAX record",
                    String::from_utf8_lossy(k)
                ),
            ));
        }
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(k);
        pax_record(&mut pax, &key, v);
    }

    // The ustar field holds what fits; the PAX record, when there is one, the exact time.
    let mtime_field = mtime.0.clamp(0, MAX_OCTAL_12 as i64) as u64;
    if !pax.is_empty() {
        let base = h.name.strip_suffix(b"/").unwrap_or(&h.name);
        let base = base.rsplit(|&b| b == b'/').next().unwrap_or(base);
        let mut pax_name = b"PaxHeaders.0/".to_vec();
        pax_name.extend_from_slice(base);
        let block = ustar_block(&UstarFields {
            name: &pax_name,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: pax.len() as u64,
            mtime: mtime_field,
            typeflag: b'x',
            link: b"",
            devmajor: 0,
            devminor: 0,
        });
        out.write_all(&block)?;
        out.write_all(&pax)?;
        out.write_all(&[0u8; BLOCK][..padding(pax.len() as u64)])?;
    }
    let block = ustar_block(&UstarFields {
        name: &h.name,
        mode: u64::from(h.mode & 0o7777),
        uid: if h.uid > MAX_OCTAL_8 { 0 } else { h.uid },
        gid: if h.gid > MAX_OCTAL_8 { 0 } else { h.gid },
        size: if h.size > MAX_OCTAL_12 { 0 } else { h.size },
        mtime: mtime_field,
        typeflag: typeflag(h.kind),
        link: &h.link,
        devmajor: h.devmajor,
        devminor: h.devminor,
    });
    out.write_all(&block)
}

struct UstarFields<'a> {
    name: &'a [u8],
    mode: u64,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    typeflag: u8,
    link: &'a [u8],
    devmajor: u64,
    devminor: u64,
}

/// One ustar header block; `name` and `link` are cut at 100 bytes (the PAX records carry
/// the whole values), numbers must fit their octal fields.
fn ustar_block(f: &UstarFields) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    let n = f.name.len().min(100);
    b[..n].copy_from_slice(&f.name[..n]);
    octal(&mut b[100..108], f.mode);
    octal(&mut b[108..116], f.uid);
    octal(&mut b[116..124], f.gid);
    octal(&mut b[124..136], f.size);
    octal(&mut b[136..148], f.mtime);
    b[156] = f.typeflag;
    let n = f.link.len().min(100);
    b[157..157 + n].copy_from_slice(&f.link[..n]);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    octal(&mut b[329..337], f.devmajor);
    octal(&mut b[337..345], f.devminor);
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|&x| x as u32).sum();
    let s = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(s.as_bytes());
    b
}

/// Zero-padded octal with a NUL terminator, filling `field`.
fn octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    debug_assert_eq!(s.len(), digits, "value {v} does not fit a {}-byte field", field.len());
    field[..digits].copy_from_slice(&s.as_bytes()[s.len() - digits..]);
    field[digits] = 0;
}

/// Appends the PAX record `"<len> <key>=<value>\n"`.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + decimal_digits(len) {
        len = body + decimal_digits(len);
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn decimal_digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// A PAX time `[-]sec[.frac]` for (seconds, nanoseconds) with nanoseconds counted forward
/// from `seconds` (so -1.5 s is (-2, 500000000)).
pub fn pax_time((sec, nsec): (i64, u32)) -> String {
    if nsec == 0 {
        return sec.to_string();
    }
    let s = if sec >= 0 {
        format!("{sec}.{nsec:09}")
    } else {
        format!("-{}.{:09}", -(sec + 1), 1_000_000_000 - nsec)
    };
    s.trim_end_matches('0').to_string()
}

fn padding(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tar::TarReader;

    #[test]
    fn pax_records_count_their_own_length() {
        let mut v = Vec::new();
        pax_record(&mut v, b"path", b"a");
        assert_eq!(v, b"9 path=a\n");
        let mut v = Vec::new();
        // A 9-byte body: 9 + 1 digit = 10, which has 2 digits, so 11.
        pax_record(&mut v, b"abcde", b"x");
        assert_eq!(v, b"11 abcde=x\n");
        for n in 0..300 {
            let mut v = Vec::new();
            pax_record(&mut v, b"k", &vec![b'a'; n]);
            let sp = v.iter().position(|&b| b == b' ').unwrap();
            let len: usize = std::str::from_utf8(&v[..sp]).unwrap().parse().unwrap();
            assert_eq!(len, v.len());
        }
    }

    #[test]
    fn pax_times() {
        assert_eq!(pax_time((5, 0)), "5");
        assert_eq!(pax_time((5, 500_000_000)), "5.5");
        assert_eq!(pax_time((5, 1)), "5.000000001");
        assert_eq!(pax_time((-2, 500_000_000)), "-1.5");
        assert_eq!(pax_time((-1, 0)), "-1");
        assert_eq!(pax_time((-1, 999_999_999)), "-0.000000001");
    }

    #[test]
    fn ustar_checksum_and_fields() {
        let b = ustar_block(&UstarFields {
            name: b"etc/passwd",
            mode: 0o4755,
            uid: 1,
            gid: 2,
            size: 3,
            mtime: 4,
            typeflag: b'0',
            link: b"",
            devmajor: 0,
            devminor: 0,
        });
        assert_eq!(&b[100..108], b"0004755\0");
        assert_eq!(&b[124..136], b"00000000003\0");
        let mut c = b;
        c[148..156].fill(b' ');
        let sum: u32 = c.iter().map(|&x| x as u32).sum();
        assert_eq!(&b[148..156], format!("{sum:06o}\0 ").as_bytes());
    }

    /// Every header field the writer can carry comes back from the reader as written,
    /// times included: before 1970, after 2106 (beyond 32 bits), beyond the 11-digit
    /// octal field, and with nanoseconds.
    #[test]
    fn written_headers_read_back_exactly() {
        let times = [
            (0, 0),
            (1, 1),
            (-1, 0),
            (-2, 500_000_000),
            (-1, 999_999_999),
            (-62_135_596_800, 0),         // 0001-01-01
            (4_294_967_296, 123_456_789), // 2106-02-07, one past u32
            (MAX_OCTAL_12 as i64 + 1, 0), // beyond the octal field
            (i64::MAX, 999_999_999),
            (i64::MIN, 0),
        ];
        let mut headers = Vec::new();
        for (i, &t) in times.iter().enumerate() {
            let mut h = Header::new(format!("t{i}").into_bytes(), Kind::File);
            h.mtime = t;
            h.mode = 0o4755;
            headers.push(h);
        }
        let mut long = Header::new(
            format!("{}/{}", "d".repeat(150), "f".repeat(200)).into_bytes(),
            Kind::Symlink,
        );
        long.link = "l".repeat(300).into_bytes();
        long.uid = 1 << 40;
        long.gid = 3_000_000;
        long.xattrs = vec![
            (b"user.a".to_vec(), b"v\n=\0x".to_vec()),
            (b"security.capability".to_vec(), vec![1, 2]),
        ];
        headers.push(long);
        let mut dev = Header::new(b"dev".to_vec(), Kind::BlockDev);
        dev.devmajor = 259;
        dev.devminor = 0o7777777;
        headers.push(dev);

        let mut out = Vec::new();
        let mut w = TarWriter::new(&mut out, Compression::None).unwrap();
        for h in &headers {
            w.append(h).unwrap();
        }
        let mut body = Header::new(b"body".to_vec(), Kind::File);
        body.size = 3;
        w.append(&body).unwrap();
        w.body().write_all(b"abc").unwrap();
        w.pad(3).unwrap();
        let fin = w.finish().unwrap();
        assert_eq!(fin.entries, headers.len() as u64 + 1);
        assert_eq!(fin.size, out.len() as u64);

        let mut r = TarReader::new(&out[..]);
        for h in &headers {
            let e = r.next_entry().unwrap().unwrap();
            assert_eq!(e.path, h.name);
            assert_eq!(e.kind, Some(h.kind));
            assert_eq!((e.mtime, e.mtime_nsec), h.mtime, "{}", e.display_path());
            assert_eq!((e.uid, e.gid, e.mode), (h.uid, h.gid, h.mode));
            assert_eq!(e.link, h.link);
            assert_eq!(e.xattrs, h.xattrs);
            assert_eq!((u64::from(e.devmajor), u64::from(e.devminor)), (h.devmajor, h.devminor));
        }
        let e = r.next_entry().unwrap().unwrap();
        assert_eq!(e.size, 3);
        let mut b = [0u8; 3];
        std::io::Read::read_exact(r.body(), &mut b).unwrap();
        r.body_done();
        assert_eq!(&b, b"abc");
        assert!(r.next_entry().unwrap().is_none());
    }

    #[test]
    fn compressed_streams_hash_the_tar_before_compression() {
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let mut out = Vec::new();
            let mut w = TarWriter::new(&mut out, c).unwrap();
            w.append(&Header::new(b"a/".to_vec(), Kind::Dir)).unwrap();
            let fin = w.finish().unwrap();
            let plain = match c {
                Compression::None => out.clone(),
                Compression::Gzip => {
                    let mut v = Vec::new();
                    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&out[..]), &mut v).unwrap();
                    v
                }
                Compression::Zstd => zstd::decode_all(&out[..]).unwrap(),
            };
            assert_eq!(plain.len() as u64, fin.size);
            assert_eq!(fin.digest, format!("sha256:{}", hex::encode(Sha256::digest(&plain))));
            assert_eq!(Compression::sniff(&out).unwrap(), c);
        }
    }
}
