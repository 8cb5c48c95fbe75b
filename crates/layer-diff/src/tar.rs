//! The tar side: PAX/ustar headers written by hand, the hashing and compressing output
//! stack, and the bookkeeping both walkers share (hard links, parent directories).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::Metadata;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::{Compression, DiffOptions, DiffStats, Error};

/// Extended attributes as (name, value), sorted by name.
pub(crate) type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

const BLOCK: usize = 512;
/// Largest value of an 8-byte octal field (7 digits).
const MAX_OCTAL_8: u64 = 0o7777777;
/// Largest value of a 12-byte octal field (11 digits).
const MAX_OCTAL_12: u64 = 0o77777777777;
const GZIP_LEVEL: u32 = 6;
const ZSTD_LEVEL: i32 = 3;
/// Prefix of the overlayfs bookkeeping xattrs, never written to a layer.
pub(crate) const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";

const TYPE_REG: u8 = b'0';
const TYPE_LINK: u8 = b'1';
const TYPE_SYMLINK: u8 = b'2';
const TYPE_CHAR: u8 = b'3';
const TYPE_BLOCK: u8 = b'4';
const TYPE_DIR: u8 = b'5';
const TYPE_FIFO: u8 = b'6';
const TYPE_PAX: u8 = b'x';

/// One entry's header before encoding.
struct Header {
    /// Path in the archive (directories with a trailing `/`).
    name: Vec<u8>,
    typeflag: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: (i64, u32),
    link: Vec<u8>,
    devmajor: u64,
    devminor: u64,
    xattrs: Xattrs,
}

/// The compressor at the bottom of the output stack.
enum Sink<W: Write> {
    Plain(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Gzip(w) => w.write(buf),
            Sink::Zstd(w) => w.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.write_all(buf),
            Sink::Gzip(w) => w.write_all(buf),
            Sink::Zstd(w) => w.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Gzip(w) => w.flush(),
            Sink::Zstd(w) => w.flush(),
        }
    }
}

impl<W: Write> Sink<W> {
    fn finish(self) -> io::Result<()> {
        match self {
            Sink::Plain(mut w) => w.flush(),
            Sink::Gzip(w) => w.finish()?.flush(),
            Sink::Zstd(w) => w.finish()?.flush(),
        }
    }
}

/// Hashes and counts the uncompressed tar on its way to the compressor.
struct Hashing<W: Write> {
    inner: Sink<W>,
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

/// A tar stream being written, with the state both walkers share.
pub(crate) struct TarOut<W: Write> {
    out: BufWriter<Hashing<W>>,
    entries: u64,
    /// Upper bound for every mtime (SOURCE_DATE_EPOCH).
    epoch: Option<(i64, u32)>,
    /// The first archive name written for an inode with more than one link.
    link_src: HashMap<(u64, u64), Vec<u8>>,
    /// Unchanged names of a linked inode none of whose names was written yet: they are
    /// written as links after the first changed name (walk diff only).
    link_refs: HashMap<(u64, u64), Vec<Vec<u8>>>,
    /// Directories written so far (names without the trailing `/`).
    added_dirs: HashSet<Vec<u8>>,
}

impl<W: Write> TarOut<W> {
    pub(crate) fn new(out: W, opts: &DiffOptions, root: &Path) -> Result<Self, Error> {
        let sink = match opts.compression {
            Compression::None => Sink::Plain(out),
            Compression::Gzip => Sink::Gzip(flate2::write::GzEncoder::new(out, flate2::Compression::new(GZIP_LEVEL))),
            Compression::Zstd => Sink::Zstd(
                zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)
                    .map_err(|e| Error::new(root, "starting the zstd encoder", e))?,
            ),
        };
        Ok(TarOut {
            out: BufWriter::with_capacity(
                256 << 10,
                Hashing {
                    inner: sink,
                    hasher: Sha256::new(),
                    count: 0,
                },
            ),
            entries: 0,
            epoch: opts.source_date_epoch.map(split_time),
            link_src: HashMap::new(),
            link_refs: HashMap::new(),
            added_dirs: HashSet::new(),
        })
    }

    /// Writes the end-of-archive marker and finishes the compressed stream.
    pub(crate) fn finish(mut self, root: &Path) -> Result<DiffStats, Error> {
        let err = |e| Error::new(root, "finishing the output stream", e);
        self.out.write_all(&[0u8; 2 * BLOCK]).map_err(err)?;
        let hashing = self.out.into_inner().map_err(|e| err(e.into_error()))?;
        let Hashing { inner, hasher, count } = hashing;
        inner.finish().map_err(err)?;
        Ok(DiffStats {
            entries: self.entries,
            uncompressed_size: count,
            uncompressed_digest: format!("sha256:{}", hex::encode(hasher.finalize())),
        })
    }

    /// Writes the filesystem entry `root/rel` (stat `meta`) as the archive entry `rel`.
    ///
    /// `unchanged` entries are written only when they are a further name of an inode
    /// already written (so the link survives in the layer); otherwise they are remembered
    /// in case a later changed name of the same inode is written. Sockets are skipped.
    /// `xattrs`, when given, are the entry's xattrs already read (and filtered).
    pub(crate) fn add(
        &mut self,
        root: &Path,
        rel: &[u8],
        meta: &Metadata,
        unchanged: bool,
        xattrs: Option<Xattrs>,
    ) -> Result<(), Error> {
        let ft = meta.file_type();
        if ft.is_socket() {
            return Ok(());
        }
        let path = join(root, rel);
        let mut name = rel.to_vec();
        if ft.is_dir() {
            name.push(b'/');
        }

        let mut additional = Vec::new();
        let mut hard_link_to = None;
        if !ft.is_dir() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(src) = self.link_src.get(&key) {
                hard_link_to = Some(src.clone());
            } else {
                if unchanged {
                    self.link_refs.entry(key).or_default().push(name);
                    return Ok(());
                }
                self.link_src.insert(key, name.clone());
                additional = self.link_refs.remove(&key).unwrap_or_default();
            }
        } else if unchanged {
            return Ok(());
        }

        self.include_parents(root, rel)?;
        let mut h = Header {
            name,
            typeflag: TYPE_REG,
            mode: meta.mode() & 0o7777,
            uid: meta.uid() as u64,
            gid: meta.gid() as u64,
            size: 0,
            mtime: (meta.mtime(), meta.mtime_nsec() as u32),
            link: Vec::new(),
            devmajor: 0,
            devminor: 0,
            xattrs: Vec::new(),
        };
        if let Some(target) = hard_link_to {
            h.typeflag = TYPE_LINK;
            h.link = target;
        } else {
            if ft.is_file() {
                h.size = meta.size();
            } else if ft.is_dir() {
                h.typeflag = TYPE_DIR;
            } else if ft.is_symlink() {
                h.typeflag = TYPE_SYMLINK;
                h.link = std::fs::read_link(&path)
                    .map_err(|e| Error::new(&path, "reading the symlink", e))?
                    .into_os_string()
                    .into_vec();
            } else if ft.is_char_device() || ft.is_block_device() {
                h.typeflag = if ft.is_char_device() { TYPE_CHAR } else { TYPE_BLOCK };
                h.devmajor = rustix::fs::major(meta.rdev()) as u64;
                h.devminor = rustix::fs::minor(meta.rdev()) as u64;
            } else if ft.is_fifo() {
                h.typeflag = TYPE_FIFO;
            } else {
                return Err(Error::new(
                    &path,
                    "writing the entry",
                    io::Error::other("unknown file type"),
                ));
            }
            h.xattrs = match xattrs {
                Some(x) => x,
                None => read_xattrs(&path)?,
            };
        }

        self.write_header(&h)
            .map_err(|e| Error::new(&path, "writing the entry", e))?;
        if h.typeflag == TYPE_REG && h.size > 0 {
            self.copy_body(&path, h.size)?;
        }
        if h.typeflag == TYPE_DIR {
            self.added_dirs.insert(rel.to_vec());
        }

        let source = std::mem::take(&mut h.name);
        for extra in additional {
            self.include_parents(root, &extra)?;
            h.name = extra;
            h.typeflag = TYPE_LINK;
            h.link = source.clone();
            h.size = 0;
            h.xattrs.clear();
            self.write_header(&h)
                .map_err(|e| Error::new(&join(root, &h.name), "writing the entry", e))?;
        }
        Ok(())
    }

    /// Writes the whiteout `PARENT/.wh.BASE` for the deleted path `parent/base`.
    pub(crate) fn whiteout(&mut self, root: &Path, parent: &[u8], base: &[u8], mtime: (i64, u32)) -> Result<(), Error> {
        let mut name = parent.to_vec();
        if !name.is_empty() {
            name.push(b'/');
        }
        name.extend_from_slice(b".wh.");
        name.extend_from_slice(base);
        self.include_parents(root, &name)?;
        let h = Header {
            name,
            typeflag: TYPE_REG,
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime,
            link: Vec::new(),
            devmajor: 0,
            devminor: 0,
            xattrs: Vec::new(),
        };
        self.write_header(&h)
            .map_err(|e| Error::new(&join(root, &h.name), "writing the whiteout", e))
    }

    /// Writes the opaque marker `DIR/.wh..wh..opq` after the directory `dir` (stat `meta`).
    pub(crate) fn opaque(&mut self, root: &Path, dir: &[u8], meta: &Metadata) -> Result<(), Error> {
        let mut name = dir.to_vec();
        name.extend_from_slice(b"/.wh..wh..opq");
        let h = Header {
            name,
            typeflag: TYPE_REG,
            mode: meta.mode() & 0o777,
            uid: meta.uid() as u64,
            gid: meta.gid() as u64,
            size: 0,
            mtime: (meta.mtime(), meta.mtime_nsec() as u32),
            link: Vec::new(),
            devmajor: 0,
            devminor: 0,
            xattrs: Vec::new(),
        };
        self.write_header(&h)
            .map_err(|e| Error::new(&join(root, dir), "writing the opaque marker", e))
    }

    /// Writes every ancestor directory of `rel` not written yet (from `root`, top first).
    fn include_parents(&mut self, root: &Path, rel: &[u8]) -> Result<(), Error> {
        let rel = rel.strip_suffix(b"/").unwrap_or(rel);
        for (i, &b) in rel.iter().enumerate() {
            if b != b'/' || self.added_dirs.contains(&rel[..i]) {
                continue;
            }
            let parent = &rel[..i];
            let path = join(root, parent);
            let meta =
                std::fs::symlink_metadata(&path).map_err(|e| Error::new(&path, "reading a parent directory", e))?;
            if !meta.is_dir() {
                return Err(Error::new(
                    &path,
                    "reading a parent directory",
                    io::Error::new(
                        io::ErrorKind::NotADirectory,
                        "a parent of a changed path is not a directory",
                    ),
                ));
            }
            self.add(root, parent, &meta, false, None)?;
        }
        Ok(())
    }

    fn copy_body(&mut self, path: &Path, size: u64) -> Result<(), Error> {
        let err = |e| Error::new(path, "copying the file's content", e);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .map_err(err)?;
        let n = io::copy(&mut file.take(size), &mut self.out).map_err(err)?;
        if n != size {
            return Err(err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file shrank while being read ({n} of {size} bytes)"),
            )));
        }
        self.out.write_all(&[0u8; BLOCK][..padding(size)]).map_err(err)
    }

    fn write_header(&mut self, h: &Header) -> io::Result<()> {
        let mtime = match self.epoch {
            Some(epoch) if h.mtime > epoch => epoch,
            _ => h.mtime,
        };
        if h.devmajor > MAX_OCTAL_8 || h.devminor > MAX_OCTAL_8 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "device number too large for a tar header",
            ));
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
                typeflag: TYPE_PAX,
                link: b"",
                devmajor: 0,
                devminor: 0,
            });
            self.out.write_all(&block)?;
            self.out.write_all(&pax)?;
            self.out.write_all(&[0u8; BLOCK][..padding(pax.len() as u64)])?;
        }
        let block = ustar_block(&UstarFields {
            name: &h.name,
            mode: h.mode as u64,
            uid: if h.uid > MAX_OCTAL_8 { 0 } else { h.uid },
            gid: if h.gid > MAX_OCTAL_8 { 0 } else { h.gid },
            size: if h.size > MAX_OCTAL_12 { 0 } else { h.size },
            mtime: mtime_field,
            typeflag: h.typeflag,
            link: &h.link,
            devmajor: h.devmajor,
            devminor: h.devminor,
        });
        self.out.write_all(&block)?;
        self.entries += 1;
        Ok(())
    }
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
fn pax_time((sec, nsec): (i64, u32)) -> String {
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

/// Splits a time into (seconds, nanoseconds forward) since the Unix epoch.
pub(crate) fn split_time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            }
        }
    }
}

fn padding(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

/// `root/rel` (`root` itself for an empty `rel`).
pub(crate) fn join(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

/// The names in a directory, sorted bytewise.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<Vec<u8>>, Error> {
    let err = |e| Error::new(dir, "reading the directory", e);
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        names.push(entry.map_err(err)?.file_name().into_vec());
    }
    names.sort_unstable();
    Ok(names)
}

/// All xattrs of a path (not following symlinks), sorted by name, raw (overlayfs ones
/// included).
pub(crate) fn read_raw_xattrs(path: &Path) -> Result<Xattrs, Error> {
    read_xattrs_io(path).map_err(|e| Error::new(path, "reading xattrs", e))
}

/// The xattrs a layer carries: all but `trusted.overlay.*`, sorted by name.
pub(crate) fn read_xattrs(path: &Path) -> Result<Xattrs, Error> {
    Ok(filter_xattrs(read_raw_xattrs(path)?))
}

pub(crate) fn filter_xattrs(mut x: Xattrs) -> Xattrs {
    x.retain(|(k, _)| !k.starts_with(OVERLAY_XATTR_PREFIX));
    x
}

fn read_xattrs_io(path: &Path) -> io::Result<Xattrs> {
    use rustix::fs::{lgetxattr, llistxattr};
    let mut names = vec![0u8; 1024];
    let n = loop {
        match llistxattr(path, &mut names[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
        let mut value = vec![0u8; 256];
        let len = loop {
            match lgetxattr(path, cname.as_c_str(), &mut value[..]) {
                Ok(len) => break Some(len),
                Err(rustix::io::Errno::RANGE) => value.resize(value.len() * 4, 0),
                // Removed between list and get.
                Err(rustix::io::Errno::NODATA) => break None,
                Err(e) => return Err(e.into()),
            }
        };
        if let Some(len) = len {
            value.truncate(len);
            out.push((name.to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            split_time(UNIX_EPOCH - std::time::Duration::from_millis(1500)),
            (-2, 500_000_000)
        );
        assert_eq!(
            split_time(UNIX_EPOCH + std::time::Duration::from_millis(1500)),
            (1, 500_000_000)
        );
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
            typeflag: TYPE_REG,
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
}
