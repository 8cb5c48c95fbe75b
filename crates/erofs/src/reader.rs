//! Reads an EROFS image without mounting it.
//!
//! Used by the `inspect`/`ls`/`cat` subcommands and by tests that check what the writer
//! produced. Every offset, length and count read from the image is validated before use:
//! images may come from untrusted sources, so a corrupt or hostile image yields
//! [`Error::Corrupt`] and never a panic, an unbounded allocation or an endless loop.
//!
//! Supported: uncompressed images (flat plain, flat inline and chunk-based layouts on the
//! primary device), shared and inline xattrs with the standard name prefixes.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::format::{
    self, file_type_of, ft, join_xattr_name, mode, xattr_entry_size, xattr_ibody_size, Dirent, Inode, SuperBlock,
    XattrEntry, CHUNK_FORMAT_BLKBITS_MASK, CHUNK_FORMAT_INDEXES, COMPACT_INODE_SIZE, DIRENT_SIZE, EXTENDED_INODE_SIZE,
    FEATURE_COMPAT_SB_CHKSUM, ISLOT_BITS, LAYOUT_CHUNK_BASED, LAYOUT_FLAT_INLINE, LAYOUT_FLAT_PLAIN, NAME_LEN,
    SUPER_OFFSET, SUPER_SIZE, XATTR_ENTRY_SIZE, XATTR_IBODY_HEADER_SIZE,
};

/// Errors from reading an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The underlying file could not be read.
    #[error("I/O error reading EROFS image: {0}")]
    Io(#[from] std::io::Error),
    /// The image violates the format (or uses a feature this reader does not support).
    #[error("corrupt or unsupported EROFS image: {0}")]
    Corrupt(String),
    /// A looked-up path does not exist.
    #[error("no such file or directory in image: {0}")]
    NotFound(String),
    /// A path component that must be a directory is not one.
    #[error("not a directory in image: {0}")]
    NotADirectory(String),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The type of an inode, from the type bits of its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Character device.
    CharDev,
    /// Block device.
    BlockDev,
    /// FIFO.
    Fifo,
    /// Unix socket.
    Socket,
}

impl FileKind {
    /// The kind for an `i_mode`, `None` for an invalid type.
    pub fn from_mode(m: u16) -> Option<FileKind> {
        Some(match m & mode::S_IFMT {
            mode::S_IFREG => FileKind::File,
            mode::S_IFDIR => FileKind::Dir,
            mode::S_IFLNK => FileKind::Symlink,
            mode::S_IFCHR => FileKind::CharDev,
            mode::S_IFBLK => FileKind::BlockDev,
            mode::S_IFIFO => FileKind::Fifo,
            mode::S_IFSOCK => FileKind::Socket,
            _ => return None,
        })
    }
}

/// An inode of the image, with its nid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The inode's nid (its 32-byte slot number from `meta_blkaddr`).
    pub nid: u64,
    /// The decoded inode (compact inodes carry the build time as mtime).
    pub inode: Inode,
    /// The file type, derived from the mode.
    pub kind: FileKind,
}

/// One directory record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The name, without any terminator.
    pub name: Vec<u8>,
    /// The target inode.
    pub nid: u64,
    /// The recorded file type (`format::ft::*`).
    pub file_type: u8,
}

/// Longest symlink target accepted (Linux `PATH_MAX - 1`).
const MAX_LINK_LEN: u64 = 4095;

/// Where a run of file bytes lives.
enum Extent {
    /// At this byte offset of the image.
    Disk(u64),
    /// Nowhere: reads as zeros.
    Hole,
}

/// An open EROFS image.
#[derive(Debug)]
pub struct Image {
    file: File,
    sb: SuperBlock,
    file_size: u64,
    block_size: u64,
}

impl Image {
    /// Opens the image at `path` and validates its superblock.
    pub fn open(path: &Path) -> Result<Image> {
        Image::from_file(File::open(path)?)
    }

    /// Uses an already open image file and validates its superblock.
    pub fn from_file(file: File) -> Result<Image> {
        let file_size = file.metadata()?.len();
        let sb_end = SUPER_OFFSET + SUPER_SIZE as u64;
        if file_size < sb_end {
            return Err(corrupt(format!(
                "image is {file_size} bytes, too small to hold a superblock (needs {sb_end})"
            )));
        }
        let mut raw = [0u8; SUPER_SIZE];
        file.read_exact_at(&mut raw, SUPER_OFFSET)?;
        let sb = SuperBlock::decode(&raw).ok_or_else(|| {
            let magic = u32::from_le_bytes(raw[0..4].try_into().unwrap());
            corrupt(format!(
                "bad superblock magic {magic:#010x} at byte {SUPER_OFFSET} (expected {:#010x})",
                format::SUPER_MAGIC
            ))
        })?;
        // The kernel accepts 512 bytes up to the page size; 64 KiB covers every page size.
        if !(9..=16).contains(&sb.blkszbits) {
            return Err(corrupt(format!("unsupported block size bits {}", sb.blkszbits)));
        }
        // The kernel rejects directory blocks larger than filesystem blocks too.
        if sb.dirblkbits != 0 {
            return Err(corrupt(format!("unsupported dirblkbits {}", sb.dirblkbits)));
        }
        let block_size = 1u64 << sb.blkszbits;
        let img = Image {
            file,
            sb,
            file_size,
            block_size,
        };
        if img.sb.feature_compat & FEATURE_COMPAT_SB_CHKSUM != 0 {
            img.verify_checksum()?;
        }
        Ok(img)
    }

    /// The decoded superblock.
    pub fn superblock(&self) -> &SuperBlock {
        &self.sb
    }

    /// The block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// The root directory.
    pub fn root(&self) -> Result<Entry> {
        let e = self.entry(self.sb.root_nid as u64)?;
        if e.kind != FileKind::Dir {
            return Err(corrupt(format!("root nid {} is not a directory", e.nid)));
        }
        Ok(e)
    }

    /// Reads the inode with the given nid.
    pub fn entry(&self, nid: u64) -> Result<Entry> {
        let off = self.inode_offset(nid)?;
        let mut buf = [0u8; EXTENDED_INODE_SIZE];
        self.read_exact(off, &mut buf[..COMPACT_INODE_SIZE], || format!("inode nid {nid}"))?;
        let extended = u16::from_le_bytes([buf[0], buf[1]]) & format::INODE_LAYOUT_EXTENDED != 0;
        if extended {
            self.read_exact(off, &mut buf, || format!("extended inode nid {nid}"))?;
        }
        let len = if extended {
            EXTENDED_INODE_SIZE
        } else {
            COMPACT_INODE_SIZE
        };
        let inode = Inode::decode(&buf[..len], self.sb.build_time, self.sb.build_time_nsec)
            .ok_or_else(|| corrupt(format!("inode nid {nid} is truncated")))?;
        let kind = FileKind::from_mode(inode.mode).ok_or_else(|| {
            corrupt(format!(
                "inode nid {nid} has invalid file type in mode {:#o}",
                inode.mode
            ))
        })?;
        // Layouts 1 and 3 are the compressed ones: valid EROFS, but only their data is
        // unreadable here, so metadata listing keeps working and read_at reports them.
        if inode.layout > LAYOUT_CHUNK_BASED {
            return Err(corrupt(format!(
                "inode nid {nid} has unknown data layout {}",
                inode.layout
            )));
        }
        Ok(Entry { nid, inode, kind })
    }

    /// Lists a directory in on-disk order, including `.` and `..`.
    pub fn read_dir(&self, dir: &Entry) -> Result<Vec<DirEntry>> {
        if dir.kind != FileKind::Dir {
            return Err(Error::NotADirectory(format!("nid {}", dir.nid)));
        }
        let size = dir.inode.size;
        // Directory blocks are never shared, so a larger directory cannot be genuine; the
        // bound keeps a hostile size from turning into an endless read.
        if size > self.file_size {
            return Err(corrupt(format!(
                "directory nid {} has size {size}, larger than the image ({} bytes)",
                dir.nid, self.file_size
            )));
        }
        let bs = self.block_size;
        let mut block = vec![0u8; bs as usize];
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < size {
            let used = (size - pos).min(bs) as usize;
            let n = self.read_at(dir, pos, &mut block[..used])?;
            if n != used {
                return Err(corrupt(format!("directory nid {} is short at byte {pos}", dir.nid)));
            }
            parse_dir_block(&block[..used], dir.nid, pos / bs, &mut out)?;
            pos += used as u64;
        }
        Ok(out)
    }

    /// Resolves a path (`/a/b` or `a/b`; empty or `/` is the root) without following
    /// symlinks, including in the final component.
    pub fn lookup(&self, path: &[u8]) -> Result<Entry> {
        let mut cur = self.root()?;
        let mut walked: Vec<u8> = Vec::new();
        for comp in path.split(|&c| c == b'/').filter(|c| !c.is_empty()) {
            if cur.kind != FileKind::Dir {
                return Err(Error::NotADirectory(display_path(&walked)));
            }
            walked.push(b'/');
            walked.extend_from_slice(comp);
            let found = self.read_dir(&cur)?.into_iter().find(|d| d.name == comp);
            let Some(d) = found else {
                return Err(Error::NotFound(display_path(&walked)));
            };
            cur = self.child_entry(&d)?;
        }
        Ok(cur)
    }

    /// All xattrs of an inode as (full name, value): shared ones first, then inline ones,
    /// each in on-disk order.
    pub fn xattrs(&self, e: &Entry) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let icount = e.inode.xattr_icount;
        if icount == 0 {
            return Ok(Vec::new());
        }
        let nid = e.nid;
        let body_len = xattr_ibody_size(icount);
        let body_off = self.inode_offset(nid)? + e.inode.size_on_disk() as u64;
        let mut body = vec![0u8; body_len];
        self.read_exact(body_off, &mut body, || format!("xattr body of nid {nid}"))?;
        let shared = body[4] as usize;
        let inline_start = XATTR_IBODY_HEADER_SIZE + shared * 4;
        if inline_start > body_len {
            return Err(corrupt(format!(
                "nid {nid}: {shared} shared xattr ids do not fit its {body_len}-byte xattr body"
            )));
        }
        let mut out = Vec::new();
        for i in 0..shared {
            let at = XATTR_IBODY_HEADER_SIZE + i * 4;
            let id = u32::from_le_bytes(body[at..at + 4].try_into().unwrap());
            let off = self.sb.xattr_blkaddr as u64 * self.block_size + id as u64 * 4;
            let mut hdr = [0u8; XATTR_ENTRY_SIZE];
            self.read_exact(off, &mut hdr, || format!("shared xattr {id} of nid {nid}"))?;
            let h = XattrEntry::decode(&hdr);
            let mut rest = vec![0u8; h.name_len as usize + h.value_size as usize];
            self.read_exact(off + XATTR_ENTRY_SIZE as u64, &mut rest, || {
                format!("shared xattr {id} of nid {nid}")
            })?;
            out.push(split_xattr(&h, &rest, || format!("shared xattr {id} of nid {nid}"))?);
        }
        let mut pos = inline_start;
        while pos < body_len {
            if pos + XATTR_ENTRY_SIZE > body_len {
                return Err(corrupt(format!(
                    "nid {nid}: inline xattr header at body offset {pos} overruns the body"
                )));
            }
            let h = XattrEntry::decode(&body[pos..pos + XATTR_ENTRY_SIZE]);
            let len = xattr_entry_size(h.name_len as usize, h.value_size as usize);
            if pos + len > body_len {
                return Err(corrupt(format!(
                    "nid {nid}: inline xattr at body offset {pos} ({len} bytes) overruns the \
                     {body_len}-byte body"
                )));
            }
            let rest = &body[pos + XATTR_ENTRY_SIZE..];
            out.push(split_xattr(&h, rest, || {
                format!("inline xattr at offset {pos} of nid {nid}")
            })?);
            pos += len;
        }
        Ok(out)
    }

    /// Reads file, symlink or directory data at `offset`; returns the bytes read, which is
    /// less than `buf.len()` only at the end of the data. Holes read as zeros.
    pub fn read_at(&self, e: &Entry, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = e.inode.size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset.saturating_add(done as u64);
            if pos >= size {
                break;
            }
            let (extent, avail) = self.map(e, pos)?;
            let n = (buf.len() - done).min(avail.min(usize::MAX as u64) as usize);
            let dst = &mut buf[done..done + n];
            match extent {
                Extent::Hole => dst.fill(0),
                Extent::Disk(at) => {
                    let nid = e.nid;
                    self.read_exact(at, dst, || format!("data of nid {nid} at file offset {pos}"))?
                }
            }
            done += n;
        }
        Ok(done)
    }

    /// Reads all data of an entry into memory.
    pub fn read_all(&self, e: &Entry) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        // Fails cleanly on absurd sizes (e.g. a hostile sparse file) instead of aborting.
        let size = usize::try_from(e.inode.size).unwrap_or(usize::MAX);
        v.try_reserve_exact(size).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                format!(
                    "nid {} is too large ({} bytes) to read into memory",
                    e.nid, e.inode.size
                ),
            )
        })?;
        self.copy_to(e, &mut v)?;
        Ok(v)
    }

    /// Streams all data of an entry to `out` one block at a time (memory use stays at one
    /// block whatever the file size); returns the number of bytes written.
    pub fn copy_to(&self, e: &Entry, out: &mut impl Write) -> Result<u64> {
        let mut buf = vec![0u8; self.block_size as usize];
        let mut pos = 0u64;
        while pos < e.inode.size {
            let n = self.read_at(e, pos, &mut buf)?;
            if n == 0 {
                return Err(corrupt(format!("nid {} data ends early at {pos}", e.nid)));
            }
            out.write_all(&buf[..n])?;
            pos += n as u64;
        }
        Ok(pos)
    }

    /// The target of a symlink.
    pub fn read_link(&self, e: &Entry) -> Result<Vec<u8>> {
        if e.kind != FileKind::Symlink {
            return Err(corrupt(format!("nid {} is not a symlink", e.nid)));
        }
        if e.inode.size > MAX_LINK_LEN {
            return Err(corrupt(format!(
                "symlink nid {} has a {}-byte target, longer than {MAX_LINK_LEN}",
                e.nid, e.inode.size
            )));
        }
        self.read_all(e)
    }

    /// The (major, minor) device number of a device node (meaningless for other kinds).
    pub fn rdev(&self, e: &Entry) -> (u32, u32) {
        format::decode_dev(e.inode.i_u)
    }

    /// Visits every inode depth-first in on-disk directory order, starting with the root
    /// as `/`; paths are absolute (`/etc`, `/etc/passwd`). `.` and `..` are skipped.
    /// Stops at the first error, including one returned by `f`.
    pub fn walk(&self, f: &mut dyn FnMut(&[u8], &Entry) -> Result<()>) -> Result<()> {
        let root = self.root()?;
        // Directories cannot be hard-linked, so meeting one twice means a cycle (or a
        // corrupt image); tracking them bounds the walk on hostile images.
        let mut seen_dirs = HashSet::new();
        // An explicit stack instead of recursion: a deep hostile tree must not overflow.
        let mut stack: Vec<(Vec<u8>, Entry)> = vec![(b"/".to_vec(), root)];
        while let Some((path, e)) = stack.pop() {
            f(&path, &e)?;
            if e.kind != FileKind::Dir {
                continue;
            }
            if !seen_dirs.insert(e.nid) {
                return Err(corrupt(format!(
                    "directory nid {} reached twice (at {})",
                    e.nid,
                    display_path(&path)
                )));
            }
            let children = self.read_dir(&e)?;
            let base = if path == b"/" { &b""[..] } else { &path[..] };
            let first = stack.len();
            for d in children {
                if d.name == b"." || d.name == b".." {
                    continue;
                }
                let child = self.child_entry(&d)?;
                let mut p = Vec::with_capacity(base.len() + 1 + d.name.len());
                p.extend_from_slice(base);
                p.push(b'/');
                p.extend_from_slice(&d.name);
                stack.push((p, child));
            }
            // Pushed in on-disk order; reversed so the first child is popped first.
            stack[first..].reverse();
        }
        Ok(())
    }

    /// Reads a directory record's inode, checking the recorded type matches it.
    fn child_entry(&self, d: &DirEntry) -> Result<Entry> {
        let e = self.entry(d.nid)?;
        if d.file_type != ft::UNKNOWN && d.file_type != file_type_of(e.inode.mode) {
            return Err(corrupt(format!(
                "directory entry {:?} says file type {} but nid {} has mode {:#o}",
                display_path(&d.name),
                d.file_type,
                d.nid,
                e.inode.mode
            )));
        }
        Ok(e)
    }

    /// Byte offset of an inode.
    fn inode_offset(&self, nid: u64) -> Result<u64> {
        (self.sb.meta_blkaddr as u64 * self.block_size)
            .checked_add(nid.saturating_mul(1 << ISLOT_BITS))
            .filter(|&o| o < self.file_size)
            .ok_or_else(|| corrupt(format!("inode nid {nid} lies beyond the end of the image")))
    }

    /// Locates the data byte `pos` (< size) of `e`: where it is and how many bytes from
    /// there on are contiguous.
    fn map(&self, e: &Entry, pos: u64) -> Result<(Extent, u64)> {
        let ino = &e.inode;
        let nid = e.nid;
        let bs = self.block_size;
        let size = ino.size;
        let raw = ino.i_u as u64 * bs;
        match ino.layout {
            // Saturating: a hostile size must fail the bounds check, not overflow.
            LAYOUT_FLAT_PLAIN => Ok((Extent::Disk(raw.saturating_add(pos)), size - pos)),
            LAYOUT_FLAT_INLINE => {
                // As in the kernel: the last (possibly full) block is the inline tail.
                let nblocks = size.div_ceil(bs);
                let tail_start = (nblocks - 1) * bs;
                if pos < tail_start {
                    return Ok((Extent::Disk(raw + pos), tail_start - pos));
                }
                let tail_off =
                    self.inode_offset(nid)? + ino.size_on_disk() as u64 + xattr_ibody_size(ino.xattr_icount) as u64;
                let tail_len = size - tail_start;
                if tail_off % bs + tail_len > bs {
                    return Err(corrupt(format!(
                        "nid {nid}: {tail_len}-byte inline tail at byte {tail_off} crosses a \
                         block boundary"
                    )));
                }
                Ok((Extent::Disk(tail_off + (pos - tail_start)), size - pos))
            }
            LAYOUT_CHUNK_BASED => self.map_chunk(e, pos),
            1 | 3 => Err(corrupt(format!(
                "nid {nid} is compressed (layout {}), which this reader does not support",
                ino.layout
            ))),
            l => Err(corrupt(format!("nid {nid} has unknown data layout {l}"))),
        }
    }

    fn map_chunk(&self, e: &Entry, pos: u64) -> Result<(Extent, u64)> {
        let ino = &e.inode;
        let nid = e.nid;
        let fmt = ino.i_u;
        if fmt & !((CHUNK_FORMAT_INDEXES | CHUNK_FORMAT_BLKBITS_MASK) as u32) != 0 {
            return Err(corrupt(format!("nid {nid} has unsupported chunk format {fmt:#x}")));
        }
        let chunkbits = self.sb.blkszbits as u32 + (fmt & CHUNK_FORMAT_BLKBITS_MASK as u32);
        let chunk = pos >> chunkbits;
        let chunk_start = chunk << chunkbits;
        let avail = (chunk_start + (1u64 << chunkbits)).min(ino.size) - pos;
        let wide = fmt & CHUNK_FORMAT_INDEXES as u32 != 0;
        let unit: u64 = if wide { 8 } else { 4 };
        let index_start =
            (self.inode_offset(nid)? + ino.size_on_disk() as u64 + xattr_ibody_size(ino.xattr_icount) as u64)
                .next_multiple_of(unit);
        let at = index_start.saturating_add(chunk.saturating_mul(unit));
        let mut idx = [0u8; 8];
        self.read_exact(at, &mut idx[..unit as usize], || {
            format!("chunk index {chunk} of nid {nid}")
        })?;
        let blkaddr = if wide {
            let device = u16::from_le_bytes([idx[2], idx[3]]);
            let blkaddr = u32::from_le_bytes(idx[4..8].try_into().unwrap());
            if device != 0 && blkaddr != u32::MAX {
                return Err(corrupt(format!(
                    "data on extra device {device} not supported by this reader (nid {nid}, \
                     chunk {chunk})"
                )));
            }
            blkaddr
        } else {
            u32::from_le_bytes(idx[0..4].try_into().unwrap())
        };
        if blkaddr == u32::MAX {
            return Ok((Extent::Hole, avail));
        }
        Ok((
            Extent::Disk(blkaddr as u64 * self.block_size + (pos - chunk_start)),
            avail,
        ))
    }

    /// `read_exact_at` that first checks the range lies inside the image, naming `what`
    /// in the error.
    fn read_exact(&self, off: u64, buf: &mut [u8], what: impl FnOnce() -> String) -> Result<()> {
        match off.checked_add(buf.len() as u64) {
            Some(end) if end <= self.file_size => {}
            _ => {
                return Err(corrupt(format!(
                    "{} at bytes {off}+{} lies beyond the end of the image ({} bytes)",
                    what(),
                    buf.len(),
                    self.file_size
                )))
            }
        }
        Ok(self.file.read_exact_at(buf, off)?)
    }

    /// Checks the superblock CRC32C the way the kernel does: over the rest of block 0 from
    /// the superblock on, with the checksum field zeroed, seed !0 and no final inversion.
    fn verify_checksum(&self) -> Result<()> {
        let len = self.block_size.saturating_sub(SUPER_OFFSET) as usize;
        let mut buf = vec![0u8; len];
        self.read_exact(SUPER_OFFSET, &mut buf, || "superblock checksum area".into())?;
        buf[4..8].fill(0);
        let crc = crc32c(!0, &buf);
        if crc != self.sb.checksum {
            return Err(corrupt(format!(
                "superblock checksum mismatch: stored {:#010x}, computed {crc:#010x}",
                self.sb.checksum
            )));
        }
        Ok(())
    }
}

/// Parses one directory block (`blk` = its used bytes), appending its records to `out`.
fn parse_dir_block(blk: &[u8], nid: u64, blkno: u64, out: &mut Vec<DirEntry>) -> Result<()> {
    let bad = |what: String| corrupt(format!("directory nid {nid} block {blkno}: {what}"));
    if blk.len() < DIRENT_SIZE {
        return Err(bad(format!("only {} bytes, too short for a record", blk.len())));
    }
    let first = Dirent::decode(&blk[..DIRENT_SIZE]).nameoff as usize;
    // The first name starts right after the last record, which gives the record count.
    let count = first / DIRENT_SIZE;
    if count == 0 || count * DIRENT_SIZE != first || first >= blk.len() {
        return Err(bad(format!("invalid first name offset {first}")));
    }
    for i in 0..count {
        let d = Dirent::decode(&blk[i * DIRENT_SIZE..(i + 1) * DIRENT_SIZE]);
        let start = d.nameoff as usize;
        let end = if i + 1 < count {
            Dirent::decode(&blk[(i + 1) * DIRENT_SIZE..]).nameoff as usize
        } else {
            blk.len()
        };
        if start < first || start >= end || end > blk.len() {
            return Err(bad(format!("record {i} has bad name range {start}..{end}")));
        }
        let mut name = &blk[start..end];
        if i + 1 == count {
            // Only the last name has no successor to bound it; the block's slack is NULs.
            if let Some(nul) = name.iter().position(|&c| c == 0) {
                name = &name[..nul];
            }
        }
        if name.is_empty() || name.len() > NAME_LEN || name.iter().any(|&c| c == b'/' || c == 0) {
            return Err(bad(format!("record {i} has invalid name {:?}", display_path(name))));
        }
        out.push(DirEntry {
            name: name.to_vec(),
            nid: d.nid,
            file_type: d.file_type,
        });
    }
    Ok(())
}

/// Decodes an xattr's name and value from the bytes following its header.
fn split_xattr(h: &XattrEntry, rest: &[u8], what: impl FnOnce() -> String) -> Result<(Vec<u8>, Vec<u8>)> {
    let nl = h.name_len as usize;
    let vl = h.value_size as usize;
    if rest.len() < nl + vl {
        return Err(corrupt(format!("{} is truncated", what())));
    }
    let name = join_xattr_name(h.name_index, &rest[..nl])
        .ok_or_else(|| corrupt(format!("{} has unknown name prefix index {}", what(), h.name_index)))?;
    Ok((name, rest[nl..nl + vl].to_vec()))
}

fn corrupt(msg: String) -> Error {
    Error::Corrupt(msg)
}

fn display_path(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Bitwise CRC32C (Castagnoli, reflected), as erofs-utils computes it: no final inversion.
fn crc32c(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    //! The reader checked against images built by erofs-utils' `mkfs.erofs` from a real
    //! directory tree, compared with what the kernel's own filesystem reports for it.

    use super::*;
    use std::collections::{BTreeMap, HashMap};
    use std::fs;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::PathBuf;
    use std::process::Command;

    const BIG_DIR_ENTRIES: usize = 3000;

    /// (full name, value) pairs.
    type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

    fn run(cmd: &mut Command) {
        let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Deterministic, non-repeating-per-block content so misplaced blocks show up.
    fn content(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| ((i * 31 + i / 4096 * 7) as u8).wrapping_add(seed))
            .collect()
    }

    fn setfattr(path: &Path, name: &str, value: &str) {
        run(Command::new("setfattr").args(["-h", "-n", name, "-v", value]).arg(path));
    }

    fn touch(path: &Path, when: &str) {
        run(Command::new("touch").args(["-h", "-d", when]).arg(path));
    }

    /// Builds the source tree every image is made from.
    fn build_tree(root: &Path) {
        fs::create_dir_all(root.join("a/b/c")).unwrap();
        fs::write(root.join("a/b/c/deep.txt"), b"deep\n").unwrap();
        let big = root.join("big");
        fs::create_dir(&big).unwrap();
        for i in 0..BIG_DIR_ENTRIES {
            fs::write(big.join(format!("entry-with-a-longish-name-{i:05}")), b"").unwrap();
        }
        for (i, size) in [0usize, 1, 4095, 4096, 4097, 100_000].into_iter().enumerate() {
            fs::write(root.join(format!("size{size}")), content(size, i as u8)).unwrap();
        }
        // Three identical 8 KiB halves: chunk-based images may share their blocks.
        let half = content(8192, 99);
        fs::write(root.join("repeat"), [&half[..], &half[..], &half[..]].concat()).unwrap();
        fs::write(root.join("zeros"), vec![0u8; 20000]).unwrap();
        let target: String = (0..300).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        std::os::unix::fs::symlink(&target, root.join("longlink")).unwrap();
        std::os::unix::fs::symlink("size1", root.join("shortlink")).unwrap();
        fs::write(root.join("hard1"), b"linked twice\n").unwrap();
        fs::hard_link(root.join("hard1"), root.join("a/hard2")).unwrap();
        run(Command::new("mkfifo").arg(root.join("fifo")));
        run(Command::new("mknod").arg(root.join("null")).args(["c", "1", "3"]));
        run(Command::new("mknod")
            .arg(root.join("blkdev"))
            .args(["b", "259", "70000"]));
        let sock = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
        drop(sock);
        fs::write(root.join("suid"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::write(root.join("suid-noexec"), b"").unwrap();
        fs::set_permissions(root.join("suid-noexec"), fs::Permissions::from_mode(0o6644)).unwrap();
        fs::create_dir(root.join("sticky")).unwrap();
        fs::set_permissions(root.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::write(root.join("owned"), b"big ids\n").unwrap();
        std::os::unix::fs::chown(root.join("owned"), Some(70000), Some(70001)).unwrap();
        std::os::unix::fs::lchown(root.join("shortlink"), Some(70000), Some(70000)).unwrap();
        // Shared by several inodes (so `-x 1` and the default make it a shared xattr) ...
        for p in ["size1", "size4096", "a", "a/b/c/deep.txt"] {
            setfattr(&root.join(p), "user.common", "shared-value");
        }
        // ... and unique ones, kept inline.
        setfattr(&root.join("size1"), "user.unique", "only here");
        setfattr(&root.join("size1"), "user.empty", "");
        setfattr(&root.join("a"), "security.test", "0x00ff10");
        setfattr(&root.join("longlink"), "security.label", "lnk");
        setfattr(&root.join("size4097"), "user.long", &"v".repeat(1000));
        setfattr(&root.join("a/b"), "user.common", "shared-value");
        setfattr(&root.join("a/b"), "trusted.x", "t");
        touch(&root.join("size4095"), "2021-02-03 04:05:06.123456789");
        touch(&root.join("a/b/c"), "1999-12-31 23:59:59.999999999");
        touch(&root.join("longlink"), "2001-01-01 00:00:00.5");
    }

    fn mkfs(dir: &Path, name: &str, args: &[&str], src: &Path) -> PathBuf {
        let img = dir.join(name);
        run(Command::new("mkfs.erofs").arg("--quiet").args(args).arg(&img).arg(src));
        img
    }

    /// xattrs of every source path (relative, with a leading `/`), via getfattr.
    fn source_xattrs(src: &Path) -> HashMap<Vec<u8>, Xattrs> {
        let out = Command::new("getfattr")
            .args(["-R", "-P", "-h", "-d", "-m", "-", "-e", "hex", "--absolute-names"])
            .arg(src)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let prefix = src.as_os_str().as_bytes();
        let mut map: HashMap<Vec<u8>, Xattrs> = HashMap::new();
        let mut cur: Option<Vec<u8>> = None;
        for line in out.stdout.split(|&c| c == b'\n') {
            if let Some(p) = line.strip_prefix(b"# file: ") {
                let rel = p.strip_prefix(prefix).unwrap();
                cur = Some(if rel.is_empty() { b"/".to_vec() } else { rel.to_vec() });
            } else if let Some(eq) = line.iter().position(|&c| c == b'=') {
                let hexv = line[eq + 1..].strip_prefix(b"0x").unwrap();
                let value = (0..hexv.len() / 2)
                    .map(|i| u8::from_str_radix(std::str::from_utf8(&hexv[2 * i..2 * i + 2]).unwrap(), 16).unwrap())
                    .collect();
                map.entry(cur.clone().unwrap())
                    .or_default()
                    .push((line[..eq].to_vec(), value));
            }
        }
        map
    }

    /// glibc's major()/minor().
    fn split_rdev(dev: u64) -> (u32, u32) {
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        (major as u32, minor as u32)
    }

    /// Everything the reader says about `img` must match the source tree `src`.
    /// Returns the layouts seen on regular files, per layout a count.
    fn check_image(img_path: &Path, src: &Path) -> BTreeMap<u16, usize> {
        let img = Image::open(img_path).unwrap();
        let sb = img.superblock().clone();
        assert_eq!(img.block_size(), 4096);
        let mut xattrs = source_xattrs(src);
        let mut seen: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
        let mut layouts = BTreeMap::new();
        img.walk(&mut |path, e| {
            assert!(seen.insert(path.to_vec(), e.clone()).is_none(), "path twice");
            Ok(())
        })
        .unwrap();

        let mut expected = vec![b"/".to_vec()];
        let mut stack = vec![src.to_path_buf()];
        while let Some(d) = stack.pop() {
            for ent in fs::read_dir(&d).unwrap() {
                let p = ent.unwrap().path();
                let rel = p.as_os_str().as_bytes()[src.as_os_str().len()..].to_vec();
                expected.push(rel);
                if fs::symlink_metadata(&p).unwrap().is_dir() {
                    stack.push(p);
                }
            }
        }
        expected.sort();
        assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), expected);

        for (path, e) in &seen {
            let what = String::from_utf8_lossy(path).into_owned();
            let sp = src.join(std::ffi::OsStr::from_bytes(&path[1..]));
            let meta = fs::symlink_metadata(&sp).unwrap();
            assert_eq!(e.inode.mode as u32, meta.mode(), "{what}: mode");
            assert_eq!(e.inode.uid, meta.uid(), "{what}: uid");
            assert_eq!(e.inode.gid, meta.gid(), "{what}: gid");
            if e.inode.extended {
                assert_eq!(
                    (e.inode.mtime as i64, e.inode.mtime_nsec as i64),
                    (meta.mtime(), meta.mtime_nsec()),
                    "{what}: mtime"
                );
            } else {
                assert_eq!((e.inode.mtime, e.inode.mtime_nsec), (sb.build_time, sb.build_time_nsec));
            }
            assert_eq!(e, &img.lookup(path).unwrap(), "{what}: lookup");
            let mut got_x = img.xattrs(e).unwrap();
            let mut want_x = xattrs.remove(path).unwrap_or_default();
            got_x.sort();
            want_x.sort();
            assert_eq!(got_x, want_x, "{what}: xattrs");
            match e.kind {
                FileKind::File => {
                    *layouts.entry(e.inode.layout).or_default() += 1;
                    assert_eq!(e.inode.nlink as u64, meta.nlink(), "{what}: nlink");
                    assert_eq!(e.inode.size, meta.len(), "{what}: size");
                    let want = fs::read(&sp).unwrap();
                    assert!(img.read_all(e).unwrap() == want, "{what}: content");
                    let mut streamed = Vec::new();
                    assert_eq!(img.copy_to(e, &mut streamed).unwrap(), want.len() as u64);
                    assert!(streamed == want, "{what}: copy_to");
                    // Odd offsets and lengths straddling block and tail boundaries.
                    for off in [0usize, 1, 4000, 4095, 4096, 8191, 50_000, 99_999, 100_000, 200_000] {
                        let mut buf = vec![0xAAu8; 5000];
                        let n = img.read_at(e, off as u64, &mut buf).unwrap();
                        let end = want.len().min(off + buf.len());
                        let exp = if off < want.len() { &want[off..end] } else { &[][..] };
                        assert_eq!(&buf[..n], exp, "{what}: read_at {off}");
                    }
                }
                FileKind::Symlink => {
                    assert_eq!(e.inode.size, meta.len(), "{what}: size");
                    let target = fs::read_link(&sp).unwrap();
                    assert_eq!(img.read_link(e).unwrap(), target.as_os_str().as_bytes());
                }
                FileKind::CharDev | FileKind::BlockDev => {
                    assert_eq!(img.rdev(e), split_rdev(meta.rdev()), "{what}: rdev");
                    let want = if e.kind == FileKind::CharDev {
                        meta.file_type().is_char_device()
                    } else {
                        meta.file_type().is_block_device()
                    };
                    assert!(want, "{what}: kind");
                }
                FileKind::Dir => {
                    let list = img.read_dir(e).unwrap();
                    let names: Vec<&[u8]> = list.iter().map(|d| &d.name[..]).collect();
                    // mkfs.erofs sorts entries bytewise; the kernel's lookup relies on it.
                    assert!(names.windows(2).all(|w| w[0] < w[1]), "{what}: order");
                    let dot = list.iter().find(|d| d.name == b".").unwrap();
                    assert_eq!(dot.nid, e.nid);
                    let parent = if path == b"/" {
                        b"/".to_vec()
                    } else {
                        let cut = path.iter().rposition(|&c| c == b'/').unwrap();
                        if cut == 0 {
                            b"/".to_vec()
                        } else {
                            path[..cut].to_vec()
                        }
                    };
                    let dotdot = list.iter().find(|d| d.name == b"..").unwrap();
                    assert_eq!(dotdot.nid, seen[&parent].nid, "{what}: ..");
                    for d in &list {
                        let child = img.entry(d.nid).unwrap();
                        assert_eq!(d.file_type, file_type_of(child.inode.mode));
                    }
                    assert_eq!(list.len(), fs::read_dir(&sp).unwrap().count() + 2);
                }
                FileKind::Fifo => assert!(meta.file_type().is_fifo()),
                FileKind::Socket => assert!(meta.file_type().is_socket()),
            }
        }
        assert!(xattrs.is_empty(), "xattrs of paths not in the image: {xattrs:?}");

        assert_eq!(seen[&b"/hard1"[..]].nid, seen[&b"/a/hard2"[..]].nid);
        assert_eq!(seen[&b"/"[..]], img.root().unwrap());
        let big = &seen[&b"/big"[..]];
        assert!(big.inode.size > 4096, "the big directory spans blocks");
        assert_eq!(img.read_dir(big).unwrap().len(), BIG_DIR_ENTRIES + 2);
        layouts
    }

    struct Fixture {
        dir: tempfile::TempDir,
        src: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        build_tree(&src);
        Fixture { dir, src }
    }

    #[test]
    fn reads_default_image() {
        let fx = fixture();
        let img = mkfs(fx.dir.path(), "default.img", &[], &fx.src);
        let layouts = check_image(&img, &fx.src);
        assert!(layouts.contains_key(&LAYOUT_FLAT_INLINE), "{layouts:?}");
    }

    #[test]
    fn reads_noinline_image() {
        let fx = fixture();
        let img = mkfs(fx.dir.path(), "noinline.img", &["-E", "noinline_data"], &fx.src);
        let layouts = check_image(&img, &fx.src);
        assert_eq!(layouts.keys().collect::<Vec<_>>(), [&LAYOUT_FLAT_PLAIN]);
    }

    #[test]
    fn reads_shared_xattr_image() {
        let fx = fixture();
        let img = mkfs(fx.dir.path(), "shared.img", &["-x", "1"], &fx.src);
        check_image(&img, &fx.src);
        // The xattr on several inodes must really be stored once, as a shared entry.
        let raw = fs::read(&img).unwrap();
        let hits = raw.windows(12).filter(|w| w == b"shared-value").count();
        assert_eq!(hits, 1);
        let image = Image::open(&img).unwrap();
        let e = image.lookup(b"/a").unwrap();
        let off = image.inode_offset(e.nid).unwrap() as usize + e.inode.size_on_disk();
        assert!(raw[off + 4] >= 1, "shared_count of /a");
    }

    #[test]
    fn reads_compact_inodes() {
        let fx = fixture();
        let img = mkfs(fx.dir.path(), "compact.img", &["--ignore-mtime"], &fx.src);
        check_image(&img, &fx.src);
        let image = Image::open(&img).unwrap();
        assert!(!image.lookup(b"/size1").unwrap().inode.extended);
        assert!(
            image.lookup(b"/owned").unwrap().inode.extended,
            "uid 70000 needs 32 bits"
        );
    }

    #[test]
    fn reads_chunk_based_images() {
        let fx = fixture();
        for chunk in ["4096", "8192"] {
            let name = format!("chunk{chunk}.img");
            let img = mkfs(fx.dir.path(), &name, &[&format!("--chunksize={chunk}")], &fx.src);
            let layouts = check_image(&img, &fx.src);
            assert!(layouts.contains_key(&LAYOUT_CHUNK_BASED), "{layouts:?}");
        }
    }

    #[test]
    fn refuses_data_on_extra_devices() {
        let fx = fixture();
        let blob = fx.dir.path().join("blob");
        let img = mkfs(
            fx.dir.path(),
            "blob.img",
            &["--chunksize=4096", &format!("--blobdev={}", blob.display())],
            &fx.src,
        );
        let image = Image::open(&img).unwrap();
        // Metadata is all on the primary device ...
        image.walk(&mut |_, _| Ok(())).unwrap();
        // ... file data is not.
        let e = image.lookup(b"/size4097").unwrap();
        match image.read_all(&e) {
            Err(Error::Corrupt(m)) => assert!(m.contains("extra device 1"), "{m}"),
            other => panic!("expected an extra-device error, got {other:?}"),
        }
    }

    #[test]
    fn lookup_resolves_paths_without_following_symlinks() {
        let fx = fixture();
        let img = Image::open(&mkfs(fx.dir.path(), "l.img", &[], &fx.src)).unwrap();
        let root = img.root().unwrap();
        assert_eq!(img.lookup(b"").unwrap(), root);
        assert_eq!(img.lookup(b"/").unwrap(), root);
        assert_eq!(img.lookup(b"//a/./b/../b/c/").unwrap(), img.lookup(b"a/b/c").unwrap());
        assert_eq!(img.lookup(b"/shortlink").unwrap().kind, FileKind::Symlink);
        assert_eq!(
            img.read_all(&img.lookup(b"a/b/c/deep.txt").unwrap()).unwrap(),
            b"deep\n"
        );
        assert!(matches!(img.lookup(b"/nope"), Err(Error::NotFound(p)) if p == "/nope"));
        assert!(matches!(img.lookup(b"/a/nope/x"), Err(Error::NotFound(p)) if p == "/a/nope"));
        assert!(matches!(img.lookup(b"/size1/x"), Err(Error::NotADirectory(p)) if p == "/size1"));
        assert!(matches!(img.lookup(b"/shortlink/x"), Err(Error::NotADirectory(_))));
        let file = img.lookup(b"/size1").unwrap();
        assert!(matches!(img.read_dir(&file), Err(Error::NotADirectory(_))));
        assert!(matches!(img.read_link(&file), Err(Error::Corrupt(_))));
        let mut order = Vec::new();
        img.walk(&mut |p, _| {
            order.push(p.to_vec());
            Ok(())
        })
        .unwrap();
        // Depth-first: a directory's subtree comes before its next sibling.
        let pos = |p: &[u8]| order.iter().position(|x| x == p).unwrap();
        assert_eq!(pos(b"/"), 0);
        assert!(pos(b"/a") < pos(b"/a/b/c/deep.txt"));
        assert!(pos(b"/a/hard2") < pos(b"/big"));
        // Errors from the callback stop the walk and come back unchanged.
        let mut calls = 0;
        let r = img.walk(&mut |_, _| {
            calls += 1;
            Err(Error::NotFound("stop".into()))
        });
        assert!(matches!(r, Err(Error::NotFound(s)) if s == "stop"));
        assert_eq!(calls, 1);
    }

    /// Byte offset in the image of the record named `name` in directory `dir`
    /// (directories here are one block, so their records are contiguous).
    fn find_dirent(img: &Image, dir: &[u8], name: &[u8]) -> usize {
        let d = img.lookup(dir).unwrap();
        let i = img.read_dir(&d).unwrap().iter().position(|x| x.name == name).unwrap();
        let Extent::Disk(at) = img.map(&d, 0).unwrap().0 else {
            panic!("hole")
        };
        at as usize + i * DIRENT_SIZE
    }

    fn write_image(dir: &Path, name: &str, raw: &[u8]) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, raw).unwrap();
        p
    }

    /// Clears the checksum feature so tests can alter block 0 without re-checksumming.
    fn drop_checksum(raw: &mut [u8]) {
        raw[1024 + 8] &= !(FEATURE_COMPAT_SB_CHKSUM as u8);
    }

    #[test]
    fn rejects_corrupt_images() {
        let fx = fixture();
        let img_path = mkfs(fx.dir.path(), "c.img", &[], &fx.src);
        let raw = fs::read(&img_path).unwrap();
        let dir = fx.dir.path();
        let open = |name: &str, raw: &[u8]| Image::open(&write_image(dir, name, raw));
        let corrupt_msg = |r: Result<Image>| match r {
            Err(Error::Corrupt(m)) => m,
            other => panic!("expected Corrupt, got {other:?}"),
        };

        let mut bad = raw.clone();
        bad[1024] ^= 1;
        assert!(corrupt_msg(open("magic", &bad)).contains("magic"));
        assert!(corrupt_msg(open("short", &raw[..1100])).contains("too small"));
        let mut bad = raw.clone();
        bad[1024 + 40] ^= 0x40; // meta_blkaddr, without fixing the checksum
        assert!(corrupt_msg(open("csum", &bad)).contains("checksum"));
        let mut bad = raw.clone();
        drop_checksum(&mut bad);
        bad[1024 + 12] = 30;
        assert!(corrupt_msg(open("bits", &bad)).contains("block size"));

        // A subdirectory entry pointing back at the root makes a cycle.
        let image = Image::open(&img_path).unwrap();
        let root_nid = image.superblock().root_nid as u64;
        let mut bad = raw.clone();
        drop_checksum(&mut bad);
        let at = find_dirent(&image, b"/a", b"b");
        assert_eq!(bad[at..at + 8], image.lookup(b"/a/b").unwrap().nid.to_le_bytes());
        bad[at..at + 8].copy_from_slice(&root_nid.to_le_bytes());
        let cyc = open("cycle", &bad).unwrap();
        match cyc.walk(&mut |_, _| Ok(())) {
            Err(Error::Corrupt(m)) => assert!(m.contains("reached twice"), "{m}"),
            other => panic!("expected a cycle error, got {other:?}"),
        }

        // A dirent whose type disagrees with the inode.
        let mut bad = raw.clone();
        drop_checksum(&mut bad);
        bad[at + 10] = ft::REG;
        assert!(matches!(
            open("ftype", &bad).unwrap().lookup(b"/a/b"),
            Err(Error::Corrupt(_))
        ));

        // An inode that lies past the end of the image.
        assert!(matches!(image.entry(u64::MAX / 2), Err(Error::Corrupt(_))));
        assert!(matches!(image.entry(raw.len() as u64 / 32), Err(Error::Corrupt(_))));

        // A truncated image: data and metadata past the cut are reported, not panicked on.
        let cut = open("cut", &raw[..raw.len() / 2]).unwrap();
        assert!(everything(&cut).is_err());
    }

    /// Reads every inode's data, xattrs and links; the first error, if any.
    fn everything(img: &Image) -> Result<u64> {
        let mut total = 0u64;
        img.walk(&mut |_, e| {
            total += img.xattrs(e)?.len() as u64;
            match e.kind {
                FileKind::Symlink => total += img.read_link(e)?.len() as u64,
                FileKind::File | FileKind::Dir => {
                    total += img.copy_to(e, &mut std::io::sink())?;
                }
                _ => {}
            }
            Ok(())
        })?;
        Ok(total)
    }

    #[test]
    fn survives_random_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        // A smaller tree than the fixture keeps hundreds of full reads fast.
        fs::create_dir_all(src.join("d/e")).unwrap();
        for i in 0..40 {
            fs::write(src.join(format!("d/f{i}")), content(i * 397, i as u8)).unwrap();
        }
        std::os::unix::fs::symlink("d/f1", src.join("l")).unwrap();
        setfattr(&src.join("d/f3"), "user.a", "b");
        setfattr(&src.join("d/e"), "user.a", "b");
        setfattr(&src.join("d"), "user.c", "d");
        for (name, args) in [("plain", &["-E", "noinline_data"][..]), ("inline", &[][..])] {
            let img = mkfs(dir.path(), name, args, &src);
            let mut raw = fs::read(&img).unwrap();
            drop_checksum(&mut raw);
            let good = everything(&Image::open(&write_image(dir.path(), "x", &raw)).unwrap());
            assert!(good.is_ok());
            let mut seed = 0x2545_F491_4F6C_DD1Du64;
            let mut rnd = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let (mut ok, mut err) = (0, 0);
            for _ in 0..400 {
                let mut bad = raw.clone();
                for _ in 0..1 + rnd() % 4 {
                    // Past the first 1024 bytes, which nothing reads.
                    let at = 1024 + (rnd() as usize) % (bad.len() - 1024);
                    bad[at] = rnd() as u8;
                }
                let p = write_image(dir.path(), "fuzz", &bad);
                match Image::open(&p).and_then(|i| everything(&i)) {
                    Ok(_) => ok += 1,
                    Err(Error::Io(e)) => panic!("corruption must not surface as I/O: {e}"),
                    Err(_) => err += 1,
                }
            }
            assert!(ok > 0 && err > 0, "{name}: ok {ok}, err {err}");
        }
    }
}
