//! Reads an EROFS image without mounting it.
//!
//! Used by the `inspect`/`ls`/`cat` subcommands and by tests that check what the writer
//! produced. Every offset, length and count read from the image is validated before use:
//! images may come from untrusted sources, so a corrupt or hostile image yields
//! [`Error::Corrupt`] and never a panic, an unbounded allocation or an endless loop.
//!
//! Supported: uncompressed images (flat plain, flat inline and chunk-based layouts), data on
//! extra devices of the device table (chunk indexes with a device id, and block addresses in
//! the devices' `mapped_blkaddr` ranges, both resolved as the kernel does), shared and
//! inline xattrs with the standard name prefixes. An image setting any incompatible feature
//! outside [`format::FEATURE_INCOMPAT_SUPPORTED`] is refused at open
//! ([`Error::UnsupportedFeatures`]).

use std::collections::HashSet;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::format::{
    self, file_type_of, ft, join_xattr_name, mode, xattr_entry_size, xattr_ibody_size, ChunkIndex, DataLayout,
    DecodeError, DeviceSlot, Dirent, Inode, SuperBlock, XattrEntry, XattrIbodyHeader, BLOCK_MAP_ENTRY_SIZE,
    CHUNK_FORMAT_ALL, CHUNK_FORMAT_BLKBITS_MASK, CHUNK_FORMAT_INDEXES, CHUNK_INDEX_SIZE, COMPACT_INODE_SIZE,
    DEVICE_SLOT_SIZE, DIRENT_SIZE, EXTENDED_INODE_SIZE, FEATURE_COMPAT_SB_CHKSUM, FEATURE_INCOMPAT_DEVICE_TABLE,
    ISLOT_BITS, NAME_LEN, NULL_ADDR, SUPER_OFFSET, SUPER_SIZE, XATTR_ENTRY_SIZE, XATTR_IBODY_HEADER_SIZE,
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
    /// The extra devices given do not match the image's device table.
    #[error("extra devices don't match the EROFS image: {0}")]
    DeviceMismatch(String),
    /// The image sets incompatible feature bits this reader does not implement: reading it
    /// anyway would misinterpret its metadata, as the kernel would without the feature.
    #[error(
        "EROFS image needs unsupported incompatible features {unsupported:#x} (it sets {incompat:#x}; this reader \
         supports {:#x})",
        format::FEATURE_INCOMPAT_SUPPORTED
    )]
    UnsupportedFeatures {
        /// The bits not understood.
        unsupported: u32,
        /// The image's whole `feature_incompat`.
        incompat: u32,
    },
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

/// Where a regular file's data lives, for an image that points at it instead of copying
/// it (merged metadata over layers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// No data.
    Empty,
    /// Consecutive blocks of this image from `blkaddr`, the last one padded (`FLAT_PLAIN`).
    Blocks {
        /// First block.
        blkaddr: u32,
    },
    /// Chunks of `1 << bits` bytes, each `(device, blkaddr)` with device ids as in this
    /// image's device table (0: this image) and [`format::NULL_ADDR`] for a hole.
    Chunks {
        /// log2 of the chunk size.
        bits: u8,
        /// Every chunk, in order.
        addrs: Vec<(u16, u32)>,
    },
    /// Not addressable by blocks: an inline tail after the inode.
    Inline,
    /// Compressed.
    Compressed,
}

/// Where a run of file bytes lives.
enum Extent {
    /// At this byte offset of the primary image, whatever the devices: an inline tail is
    /// metadata, which the kernel never redirects to another device.
    Meta(u64),
    /// At byte address `pa` of device `dev` (0: the primary one, though a `mapped_blkaddr`
    /// range may redirect it), before `map_dev` resolves it to a file and offset.
    Mapped {
        /// Device id, already masked with the device id mask.
        dev: u16,
        /// Byte address on that device.
        pa: u64,
    },
    /// Nowhere: reads as zeros.
    Hole,
}

/// An extra device given at open time.
#[derive(Debug)]
pub(crate) struct Device {
    pub(crate) file: File,
    pub(crate) size: u64,
    path: PathBuf,
}

/// An open EROFS image.
#[derive(Debug)]
pub struct Image {
    file: File,
    pub(crate) sb: SuperBlock,
    pub(crate) file_size: u64,
    pub(crate) block_size: u64,
    /// The device table; empty without the device table feature, as the kernel ignores
    /// `extra_devices` then.
    pub(crate) slots: Vec<DeviceSlot>,
    /// Device id `i + 1` is `devices[i]`; empty when the image was opened without them.
    pub(crate) devices: Vec<Device>,
    /// The kernel's `device_id_mask`, applied to the device ids of chunk indexes.
    pub(crate) device_id_mask: u16,
    /// The compressed extent decoded last.
    pub(crate) zcache: crate::zread::ZCacheCell,
}

impl Image {
    /// Opens the image at `path` and validates its superblock. Data on extra devices
    /// cannot be read from an image opened this way; see [`Image::open_with_devices`].
    pub fn open(path: &Path) -> Result<Image> {
        Image::from_file(File::open(path)?)
    }

    /// Opens the image at `path` with its extra devices in device table order (the first
    /// is device id 1), like the kernel's `-o device=` options. There must be as many as the
    /// image has extra devices; an empty list opens the image as [`Image::open`] does.
    pub fn open_with_devices(path: &Path, devices: &[PathBuf]) -> Result<Image> {
        let mut img = Image::open(path)?;
        if devices.is_empty() {
            return Ok(img);
        }
        if devices.len() != img.slots.len() {
            return Err(Error::DeviceMismatch(format!(
                "{} has {} extra devices, {} given",
                path.display(),
                img.slots.len(),
                devices.len()
            )));
        }
        for p in devices {
            let with_path =
                |e: std::io::Error| std::io::Error::new(e.kind(), format!("extra device {}: {e}", p.display()));
            let mut file = File::open(p).map_err(with_path)?;
            // Seeking rather than metadata: a block device's metadata says 0 bytes.
            let size = file.seek(SeekFrom::End(0)).map_err(with_path)?;
            img.devices.push(Device {
                file,
                size,
                path: p.clone(),
            });
        }
        Ok(img)
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
        let sb = SuperBlock::decode(&raw).map_err(|e| corrupt(format!("superblock at byte {SUPER_OFFSET}: {e}")))?;
        // Before anything else is trusted: an unknown feature may change what every other
        // field means.
        let unsupported = sb.unsupported_incompat();
        if unsupported != 0 {
            return Err(Error::UnsupportedFeatures {
                unsupported,
                incompat: sb.feature_incompat,
            });
        }
        // The kernel accepts 512 bytes up to the page size; 64 KiB covers every page size.
        if !(9..=16).contains(&sb.blkszbits) {
            return Err(corrupt(format!("unsupported block size bits {}", sb.blkszbits)));
        }
        // The kernel rejects directory blocks larger than filesystem blocks too.
        if sb.dirblkbits != 0 {
            return Err(corrupt(format!("unsupported dirblkbits {}", sb.dirblkbits)));
        }
        let block_size = 1u64 << sb.blkszbits;
        let mut img = Image {
            file,
            sb,
            file_size,
            block_size,
            slots: Vec::new(),
            devices: Vec::new(),
            device_id_mask: 0,
            zcache: Default::default(),
        };
        if img.sb.feature_compat & FEATURE_COMPAT_SB_CHKSUM != 0 {
            img.verify_checksum()?;
        }
        img.read_device_table()?;
        Ok(img)
    }

    /// Decodes the device table and derives the device id mask, as the kernel's
    /// `erofs_scan_devices` does whether or not devices are given.
    fn read_device_table(&mut self) -> Result<()> {
        if self.sb.feature_incompat & FEATURE_INCOMPAT_DEVICE_TABLE == 0 || self.sb.extra_devices == 0 {
            return Ok(());
        }
        let count = self.sb.extra_devices as usize;
        let off = self.sb.devt_slotoff as u64 * DEVICE_SLOT_SIZE as u64;
        // At most 65535 slots (8 MiB), and read_exact checks they lie inside the image
        // before anything is read.
        let mut raw = vec![0u8; count * DEVICE_SLOT_SIZE];
        self.read_exact(off, &mut raw, || format!("device table of {count} slots"))?;
        self.slots = raw
            .chunks_exact(DEVICE_SLOT_SIZE)
            .map(DeviceSlot::decode)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| corrupt(format!("device table: {e}")))?;
        self.device_id_mask = ((count as u32 + 1).next_power_of_two() - 1) as u16;
        Ok(())
    }

    /// The decoded superblock.
    pub fn superblock(&self) -> &SuperBlock {
        &self.sb
    }

    /// The block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// The decoded device table, device id 1 first; empty when the image has no extra
    /// devices (or lacks the device table feature, which makes the kernel ignore them).
    pub fn devices(&self) -> Vec<DeviceSlot> {
        self.slots.clone()
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
        let extended = Inode::is_extended(&buf) == Some(true);
        if extended {
            self.read_exact(off, &mut buf, || format!("extended inode nid {nid}"))?;
        }
        let len = if extended {
            EXTENDED_INODE_SIZE
        } else {
            COMPACT_INODE_SIZE
        };
        // Layouts 1 and 3 are the compressed ones: valid EROFS, but only their data is
        // unreadable here, so metadata listing keeps working and read_at reports them.
        let inode = Inode::decode(&buf[..len], self.sb.build_time, self.sb.build_time_nsec)
            .map_err(|e| corrupt(format!("inode nid {nid}: {e}")))?;
        let kind = FileKind::from_mode(inode.mode).ok_or_else(|| {
            corrupt(format!(
                "inode nid {nid} has invalid file type in mode {:#o}",
                inode.mode
            ))
        })?;
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
        let total = self
            .devices
            .iter()
            .fold(self.file_size, |t, d| t.saturating_add(d.size));
        if size > total {
            return Err(corrupt(format!(
                "directory nid {} has size {size}, larger than the image and its devices ({total} bytes)",
                dir.nid
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
        let shared = XattrIbodyHeader::decode(&body)
            .map_err(|e| corrupt(format!("nid {nid}: {e}")))?
            .shared_count as usize;
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
            let h = XattrEntry::decode(&hdr).map_err(|e| corrupt(format!("nid {nid}: {e}")))?;
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
            let h = XattrEntry::decode(&body[pos..]).map_err(|e| corrupt(format!("nid {nid}: {e}")))?;
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
        if e.inode.layout.is_compressed() {
            return self.read_compressed(e, offset, buf);
        }
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
            let nid = e.nid;
            let what = || format!("data of nid {nid} at file offset {pos}");
            match extent {
                Extent::Hole => dst.fill(0),
                Extent::Meta(at) => self.read_exact(at, dst, what)?,
                Extent::Mapped { dev, pa } => match self.map_dev(dev, pa, nid, pos)? {
                    (None, at) => self.read_exact(at, dst, what)?,
                    (Some(d), at) => read_bounded(&d.file, d.size, &device_name(dev, d), at, dst, what)?,
                },
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

    /// Where the regular file `e`'s data is ([`Placement`]). Block and chunk addresses
    /// are checked against this image and its device table; with a device that maps
    /// block ranges of this image's address space elsewhere (`mapped_blkaddr`), plain
    /// blocks are refused, as they might not be in this file.
    pub fn placement(&self, e: &Entry) -> Result<Placement> {
        let ino = &e.inode;
        let nid = e.nid;
        if e.kind != FileKind::File {
            return Err(corrupt(format!("nid {nid} is not a regular file")));
        }
        if ino.size == 0 {
            return Ok(Placement::Empty);
        }
        let bs = self.block_size;
        match ino.layout {
            DataLayout::FlatPlain => {
                if self.slots.iter().any(|s| s.mapped_blkaddr != 0) {
                    return Err(corrupt(format!(
                        "nid {nid}: plain data in an image whose devices map its block addresses, {}",
                        crate::zread::UNSUPPORTED
                    )));
                }
                let end = (ino.i_u as u64)
                    .saturating_add(ino.size.div_ceil(bs))
                    .saturating_mul(bs);
                if end > self.file_size {
                    return Err(corrupt(format!("nid {nid}: data blocks beyond the end of the image")));
                }
                Ok(Placement::Blocks { blkaddr: ino.i_u })
            }
            DataLayout::FlatInline => Ok(Placement::Inline),
            DataLayout::CompressedFull | DataLayout::CompressedCompact => Ok(Placement::Compressed),
            DataLayout::ChunkBased => {
                let fmt = ino.i_u;
                if fmt & !u32::from(CHUNK_FORMAT_ALL) != 0 {
                    return Err(corrupt(format!("nid {nid} has unsupported chunk format {fmt:#x}")));
                }
                let bits = self.sb.blkszbits as u32 + (fmt & CHUNK_FORMAT_BLKBITS_MASK as u32);
                let count = ino.size.div_ceil(1u64 << bits);
                let wide = fmt & CHUNK_FORMAT_INDEXES as u32 != 0;
                let unit = if wide { CHUNK_INDEX_SIZE } else { BLOCK_MAP_ENTRY_SIZE } as u64;
                let start =
                    (self.inode_offset(nid)? + ino.size_on_disk() as u64 + xattr_ibody_size(ino.xattr_icount) as u64)
                        .next_multiple_of(unit);
                let len = count.saturating_mul(unit);
                if start.saturating_add(len) > self.file_size {
                    return Err(corrupt(format!(
                        "nid {nid}: {count} chunk indexes beyond the end of the image"
                    )));
                }
                let mut raw = vec![0u8; len as usize];
                self.read_exact(start, &mut raw, || format!("chunk indexes of nid {nid}"))?;
                let mut addrs = Vec::with_capacity(count as usize);
                for b in raw.chunks_exact(unit as usize) {
                    let index = if wide {
                        ChunkIndex::decode(b)
                    } else {
                        ChunkIndex::decode_block_map(b)
                    }
                    .map_err(|e: DecodeError| corrupt(format!("nid {nid}: {e}")))?;
                    if index.blkaddr == NULL_ADDR {
                        addrs.push((0, NULL_ADDR));
                        continue;
                    }
                    let dev = index.device_id & self.device_id_mask;
                    if dev as usize > self.slots.len() {
                        return Err(corrupt(format!(
                            "nid {nid}: a chunk on device {dev}, but the image has {} extra devices",
                            self.slots.len()
                        )));
                    }
                    addrs.push((dev, index.blkaddr));
                }
                Ok(Placement::Chunks {
                    bits: bits as u8,
                    addrs,
                })
            }
        }
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
    pub(crate) fn inode_offset(&self, nid: u64) -> Result<u64> {
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
            DataLayout::FlatPlain => Ok((primary(raw.saturating_add(pos)), size - pos)),
            DataLayout::FlatInline => {
                // As in the kernel: the last (possibly full) block is the inline tail.
                let nblocks = size.div_ceil(bs);
                let tail_start = (nblocks - 1) * bs;
                if pos < tail_start {
                    return Ok((primary(raw.saturating_add(pos)), tail_start - pos));
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
                Ok((Extent::Meta(tail_off + (pos - tail_start)), size - pos))
            }
            DataLayout::ChunkBased => self.map_chunk(e, pos),
            l @ (DataLayout::CompressedFull | DataLayout::CompressedCompact) => Err(corrupt(format!(
                "nid {nid} is compressed (layout {l:?}), which this reader does not support"
            ))),
        }
    }

    fn map_chunk(&self, e: &Entry, pos: u64) -> Result<(Extent, u64)> {
        let ino = &e.inode;
        let nid = e.nid;
        let fmt = ino.i_u;
        if fmt & !u32::from(CHUNK_FORMAT_ALL) != 0 {
            return Err(corrupt(format!("nid {nid} has unsupported chunk format {fmt:#x}")));
        }
        let chunkbits = self.sb.blkszbits as u32 + (fmt & CHUNK_FORMAT_BLKBITS_MASK as u32);
        let chunk = pos >> chunkbits;
        let chunk_start = chunk << chunkbits;
        // Saturating: an absurd size near 2^64 must not overflow the chunk's end.
        let avail = chunk_start.saturating_add(1u64 << chunkbits).min(ino.size) - pos;
        let wide = fmt & CHUNK_FORMAT_INDEXES as u32 != 0;
        let unit = if wide { CHUNK_INDEX_SIZE } else { BLOCK_MAP_ENTRY_SIZE } as u64;
        let index_start =
            (self.inode_offset(nid)? + ino.size_on_disk() as u64 + xattr_ibody_size(ino.xattr_icount) as u64)
                .next_multiple_of(unit);
        let at = index_start.saturating_add(chunk.saturating_mul(unit));
        let mut idx = [0u8; CHUNK_INDEX_SIZE];
        self.read_exact(at, &mut idx[..unit as usize], || {
            format!("chunk index {chunk} of nid {nid}")
        })?;
        let index = if wide {
            ChunkIndex::decode(&idx)
        } else {
            ChunkIndex::decode_block_map(&idx)
        }
        .map_err(|e: DecodeError| corrupt(format!("nid {nid}: {e}")))?;
        let (raw_dev, blkaddr) = (index.device_id, index.blkaddr);
        if blkaddr == NULL_ADDR {
            return Ok((Extent::Hole, avail));
        }
        // Masked as the kernel does, so stray high bits select the same device there and here.
        let dev = raw_dev & self.device_id_mask;
        if dev as usize > self.slots.len() {
            return Err(corrupt(format!(
                "nid {nid} chunk {chunk} is on device {dev} (raw id {raw_dev}), but the image has only {} extra \
                 devices",
                self.slots.len()
            )));
        }
        if dev != 0 && self.devices.is_empty() {
            return Err(corrupt(format!(
                "nid {nid} chunk {chunk} is on extra device {dev}, but the image was opened without its {} extra \
                 devices",
                self.slots.len()
            )));
        }
        let pa = blkaddr as u64 * self.block_size + (pos - chunk_start);
        Ok((Extent::Mapped { dev, pa }, avail))
    }

    /// The kernel's `erofs_map_dev`: which file (`None`: the primary image) holds physical
    /// address `pa` of device `dev`, and at which offset. Device 0 addresses inside a
    /// device's `[mapped_blkaddr, + blocks)` range are on that device, which is how block
    /// maps and flat layouts reach data on extra devices.
    pub(crate) fn map_dev(&self, dev: u16, pa: u64, nid: u64, pos: u64) -> Result<(Option<&Device>, u64)> {
        if dev != 0 {
            let d = self.devices.get(dev as usize - 1).ok_or_else(|| {
                corrupt(format!(
                    "data of nid {nid} at file offset {pos} is on extra device {dev}, which was not given"
                ))
            })?;
            return Ok((Some(d), pa));
        }
        // Without the devices the kernel reads everything from the primary one ("flatdev").
        if self.devices.is_empty() {
            return Ok((None, pa));
        }
        for (slot, d) in self.slots.iter().zip(&self.devices) {
            if slot.mapped_blkaddr == 0 {
                continue;
            }
            let start = slot.mapped_blkaddr as u64 * self.block_size;
            let len = slot.blocks as u64 * self.block_size;
            if pa >= start && pa - start < len {
                return Ok((Some(d), pa - start));
            }
        }
        Ok((None, pa))
    }

    /// `read_exact_at` on the primary image that first checks the range lies inside it,
    /// naming `what` in the error.
    pub(crate) fn read_exact(&self, off: u64, buf: &mut [u8], what: impl FnOnce() -> String) -> Result<()> {
        read_bounded(&self.file, self.file_size, "the image", off, buf, what)
    }

    /// Checks the superblock CRC32C the way the kernel does: over the rest of block 0 from
    /// the superblock on, with the checksum field zeroed, seed !0 and no final inversion.
    /// Blocks of 1 KiB or less (which end before the superblock starts) have it over one
    /// block's length, as the kernel's `erofs_superblock_csum_verify` does.
    fn verify_checksum(&self) -> Result<()> {
        let bs = self.block_size;
        let len = if bs > SUPER_OFFSET { bs - SUPER_OFFSET } else { bs } as usize;
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

/// `read_exact_at` on `file` of `size` bytes (called `name` in errors) that first checks the
/// range lies inside it, naming `what` in the error.
fn read_bounded(
    file: &File,
    size: u64,
    name: &str,
    off: u64,
    buf: &mut [u8],
    what: impl FnOnce() -> String,
) -> Result<()> {
    match off.checked_add(buf.len() as u64) {
        Some(end) if end <= size => {}
        _ => {
            return Err(corrupt(format!(
                "{} at bytes {off}+{} lies beyond the end of {name} ({size} bytes)",
                what(),
                buf.len(),
            )))
        }
    }
    Ok(file.read_exact_at(buf, off)?)
}

/// A data address on the primary device (subject to `mapped_blkaddr` redirection).
fn primary(pa: u64) -> Extent {
    Extent::Mapped { dev: 0, pa }
}

/// How errors name an extra device.
fn device_name(id: u16, d: &Device) -> String {
    format!("extra device {id} ({})", d.path.display())
}

/// Parses one directory block (`blk` = its used bytes), appending its records to `out`.
fn parse_dir_block(blk: &[u8], nid: u64, blkno: u64, out: &mut Vec<DirEntry>) -> Result<()> {
    let bad = |what: String| corrupt(format!("directory nid {nid} block {blkno}: {what}"));
    if blk.len() < DIRENT_SIZE {
        return Err(bad(format!("only {} bytes, too short for a record", blk.len())));
    }
    let dirent = |at: usize| Dirent::decode(blk.get(at..).unwrap_or_default()).map_err(|e| bad(e.to_string()));
    let first = dirent(0)?.nameoff as usize;
    // The first name starts right after the last record, which gives the record count.
    let count = first / DIRENT_SIZE;
    if count == 0 || count * DIRENT_SIZE != first || first >= blk.len() {
        return Err(bad(format!("invalid first name offset {first}")));
    }
    for i in 0..count {
        let d = dirent(i * DIRENT_SIZE)?;
        let start = d.nameoff as usize;
        let end = if i + 1 < count {
            dirent((i + 1) * DIRENT_SIZE)?.nameoff as usize
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
pub(crate) fn split_xattr(h: &XattrEntry, rest: &[u8], what: impl FnOnce() -> String) -> Result<(Vec<u8>, Vec<u8>)> {
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

pub(crate) fn display_path(p: &[u8]) -> String {
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
    use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
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
    fn check_image(img_path: &Path, src: &Path) -> BTreeMap<DataLayout, usize> {
        check_image_with(img_path, &[], src)
    }

    /// [`check_image`] for an image opened with extra devices.
    fn check_image_with(img_path: &Path, devices: &[PathBuf], src: &Path) -> BTreeMap<DataLayout, usize> {
        let img = Image::open_with_devices(img_path, devices).unwrap();
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
    #[cfg_attr(
        not(feature = "root-tests"),
        ignore = "root tier: build_tree makes device nodes and trusted.* xattrs"
    )]
    fn reads_default_image() {
        let fx = fixture();
        let img = mkfs(fx.dir.path(), "default.img", &[], &fx.src);
        let layouts = check_image(&img, &fx.src);
        assert!(layouts.contains_key(&DataLayout::FlatInline), "{layouts:?}");
    }

    #[test]
    #[cfg_attr(
        not(feature = "root-tests"),
        ignore = "root tier: build_tree makes device nodes and trusted.* xattrs"
    )]
    fn reads_noinline_image() {
        let fx = fixture();
        let img = mkfs(fx.dir.path(), "noinline.img", &["-E", "noinline_data"], &fx.src);
        let layouts = check_image(&img, &fx.src);
        assert_eq!(layouts.keys().collect::<Vec<_>>(), [&DataLayout::FlatPlain]);
    }

    #[test]
    #[cfg_attr(
        not(feature = "root-tests"),
        ignore = "root tier: build_tree makes device nodes and trusted.* xattrs"
    )]
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
    #[cfg_attr(
        not(feature = "root-tests"),
        ignore = "root tier: build_tree makes device nodes and trusted.* xattrs"
    )]
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
    #[cfg_attr(
        not(feature = "root-tests"),
        ignore = "root tier: build_tree makes device nodes and trusted.* xattrs"
    )]
    fn reads_chunk_based_images() {
        let fx = fixture();
        for chunk in ["4096", "8192"] {
            let name = format!("chunk{chunk}.img");
            let img = mkfs(fx.dir.path(), &name, &[&format!("--chunksize={chunk}")], &fx.src);
            let layouts = check_image(&img, &fx.src);
            assert!(layouts.contains_key(&DataLayout::ChunkBased), "{layouts:?}");
        }
    }

    /// Sizes around block and chunk boundaries, zeros, a sparse file and repeated chunks:
    /// the tree the extra-device images are built from.
    fn build_blob_tree(root: &Path) {
        fs::create_dir_all(root.join("d/e")).unwrap();
        let sizes = [0usize, 1, 4095, 4096, 4097, 65535, 65537, (1 << 20) + 3];
        for (i, size) in sizes.into_iter().enumerate() {
            fs::write(root.join(format!("size{size}")), content(size, 11 + i as u8)).unwrap();
        }
        fs::write(root.join("d/zeros"), vec![0u8; 3 * 65536 + 5]).unwrap();
        // mkfs.erofs 1.5 stores the holes as ordinary (deduplicated) zero chunks.
        let sparse = fs::File::create(root.join("d/sparse")).unwrap();
        sparse.write_all_at(&content(5000, 40), 0).unwrap();
        sparse.write_all_at(&content(7000, 41), 300_000).unwrap();
        sparse.set_len(600_000).unwrap();
        let part = content(65536, 50);
        fs::write(root.join("d/e/repeat"), [&part[..], &part[..], &part[..4097]].concat()).unwrap();
        std::os::unix::fs::symlink("../size1", root.join("d/link")).unwrap();
    }

    const BLOB_TREE_FILES: usize = 11;

    /// Builds `name` from `src` with its file data on the blob device `name.blob`.
    fn mkfs_blob(dir: &Path, name: &str, chunk: u32, src: &Path) -> (PathBuf, PathBuf) {
        let blob = dir.join(format!("{name}.blob"));
        let args = [format!("--chunksize={chunk}"), format!("--blobdev={}", blob.display())];
        let img = mkfs(dir, name, &[&args[0], &args[1]], src);
        (img, blob)
    }

    /// Every regular file and symlink of `src` reads back byte for byte from `img`, also in
    /// pieces straddling block and chunk boundaries; returns the number of regular files.
    fn check_contents(img: &Image, src: &Path) -> usize {
        let mut files = 0;
        img.walk(&mut |path, e| {
            let what = String::from_utf8_lossy(path).into_owned();
            let sp = src.join(std::ffi::OsStr::from_bytes(&path[1..]));
            match e.kind {
                FileKind::File => {
                    let want = fs::read(&sp).unwrap();
                    assert_eq!(e.inode.size, want.len() as u64, "{what}: size");
                    assert!(img.read_all(e)? == want, "{what}: content");
                    for off in [1usize, 4095, 4097, 65535, 65537, 300_001, 1 << 20] {
                        let mut buf = vec![0xAAu8; 70_000];
                        let n = img.read_at(e, off as u64, &mut buf)?;
                        let exp = want.get(off..want.len().min(off + buf.len())).unwrap_or_default();
                        assert_eq!(&buf[..n], exp, "{what}: read_at {off}");
                    }
                    files += 1;
                }
                FileKind::Symlink => {
                    let target = fs::read_link(&sp).unwrap();
                    assert_eq!(img.read_link(e)?, target.as_os_str().as_bytes(), "{what}");
                }
                _ => {}
            }
            Ok(())
        })
        .unwrap();
        files
    }

    /// Byte offset in the image of chunk index (or block map entry) `i` of `e`.
    fn chunk_entry_offset(img: &Image, e: &Entry, unit: u64, i: u64) -> usize {
        let base = img.inode_offset(e.nid).unwrap()
            + e.inode.size_on_disk() as u64
            + xattr_ibody_size(e.inode.xattr_icount) as u64;
        (base.next_multiple_of(unit) + i * unit) as usize
    }

    /// Number of chunks of a chunk-based inode.
    fn chunk_count(img: &Image, e: &Entry) -> u64 {
        let bits = img.superblock().blkszbits as u32 + (e.inode.i_u & CHUNK_FORMAT_BLKBITS_MASK as u32);
        e.inode.size.div_ceil(1 << bits)
    }

    /// Rewrites the superblock checksum after block 0 was changed, as mkfs.erofs computes it.
    fn fix_checksum(raw: &mut [u8]) {
        raw[1028..1032].fill(0);
        let crc = crc32c(!0, &raw[1024..4096]);
        raw[1028..1032].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    #[cfg_attr(
        not(feature = "root-tests"),
        ignore = "root tier: build_tree makes device nodes and trusted.* xattrs"
    )]
    fn reads_data_on_a_blob_device() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        build_blob_tree(&src);
        for (chunk, blkbits) in [(4096u32, 0u32), (65536, 4)] {
            let (img, blob) = mkfs_blob(dir.path(), &format!("c{chunk}.img"), chunk, &src);
            let image = Image::open_with_devices(&img, std::slice::from_ref(&blob)).unwrap();
            let slots = image.devices();
            assert_eq!(slots.len(), 1);
            // mkfs.erofs 1.5 leaves the slot zeroed: no tag, no size, no mapped range.
            assert_eq!(slots[0].mapped_blkaddr, 0);
            // What mkfs.erofs 1.5 makes of a blob device: chunk indexes naming device 1.
            let e = image.lookup(b"/size1048579").unwrap();
            assert_eq!(e.inode.layout, DataLayout::ChunkBased);
            assert_eq!(e.inode.i_u, CHUNK_FORMAT_INDEXES as u32 | blkbits);
            assert!(matches!(image.map(&e, 5000).unwrap().0, Extent::Mapped { dev: 1, .. }));
            assert_eq!(check_contents(&image, &src), BLOB_TREE_FILES, "chunk size {chunk}");
        }
        // The full fixture too: every file type, xattrs and metadata with data on the blob.
        let fx = fixture();
        let (img, blob) = mkfs_blob(fx.dir.path(), "fixture.img", 4096, &fx.src);
        let layouts = check_image_with(&img, &[blob], &fx.src);
        assert!(layouts.contains_key(&DataLayout::ChunkBased), "{layouts:?}");
    }

    #[test]
    fn refuses_data_on_extra_devices_not_given() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        build_blob_tree(&src);
        let (img, blob) = mkfs_blob(dir.path(), "blob.img", 4096, &src);
        let image = Image::open(&img).unwrap();
        assert_eq!(image.devices().len(), 1);
        // Metadata is all on the primary device ...
        image.walk(&mut |_, _| Ok(())).unwrap();
        // ... file data is not.
        let e = image.lookup(b"/size4097").unwrap();
        match image.read_all(&e) {
            Err(Error::Corrupt(m)) => assert!(m.contains("on extra device 1") && m.contains("without"), "{m}"),
            other => panic!("expected an extra-device error, got {other:?}"),
        }
        // An empty device list is the same as none.
        assert!(Image::open_with_devices(&img, &[]).unwrap().read_all(&e).is_err());

        let mismatch = |r: Result<Image>| match r {
            Err(Error::DeviceMismatch(m)) => m,
            other => panic!("expected a device mismatch, got {other:?}"),
        };
        let m = mismatch(Image::open_with_devices(&img, &[blob.clone(), blob.clone()]));
        assert!(m.contains("1 extra devices, 2 given"), "{m}");
        let plain = mkfs(dir.path(), "plain.img", &[], &src);
        let m = mismatch(Image::open_with_devices(&plain, std::slice::from_ref(&blob)));
        assert!(m.contains("0 extra devices, 1 given"), "{m}");
        match Image::open_with_devices(&img, &[dir.path().join("missing")]) {
            Err(Error::Io(e)) => assert!(e.to_string().contains("missing"), "{e}"),
            other => panic!("expected an I/O error, got {other:?}"),
        }
        // A device shorter than its chunk indexes say.
        let short = dir.path().join("short.blob");
        fs::write(&short, &fs::read(&blob).unwrap()[..8192]).unwrap();
        let image = Image::open_with_devices(&img, &[short]).unwrap();
        let big = image.lookup(b"/size1048579").unwrap();
        match image.read_all(&big) {
            Err(Error::Corrupt(m)) => assert!(m.contains("beyond the end of extra device 1"), "{m}"),
            other => panic!("expected a short-device error, got {other:?}"),
        }
    }

    #[test]
    fn resolves_device_ids_like_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        build_blob_tree(&src);
        let (img_path, blob) = mkfs_blob(dir.path(), "ids.img", 4096, &src);
        let image = Image::open(&img_path).unwrap();
        let e = image.lookup(b"/size1048579").unwrap();
        let mut raw = fs::read(&img_path).unwrap();

        // A second device: the table moves to a new block at the end, with room for two.
        let table = raw.len();
        assert_eq!(table % 4096, 0);
        let old = image.superblock().devt_slotoff as usize * DEVICE_SLOT_SIZE;
        let slot1 = raw[old..old + DEVICE_SLOT_SIZE].to_vec();
        raw.extend_from_slice(&slot1);
        let mut tag = [0u8; 64];
        tag[..6].copy_from_slice(b"second");
        let slot2 = DeviceSlot {
            tag,
            blocks: 0,
            mapped_blkaddr: 0,
        };
        raw.extend_from_slice(&slot2.encode());
        raw.resize(table + 4096, 0);
        raw[1024 + 86..1024 + 88].copy_from_slice(&2u16.to_le_bytes());
        raw[1024 + 88..1024 + 90].copy_from_slice(&((table / DEVICE_SLOT_SIZE) as u16).to_le_bytes());
        // Device 2 is the blob shifted by one block, so only reads from device 2 at the
        // index's address find the data.
        let blob2 = dir.path().join("blob2");
        fs::write(&blob2, [vec![0xEE; 4096], fs::read(&blob).unwrap()].concat()).unwrap();

        let set = |raw: &mut Vec<u8>, chunk: u64, dev: Option<u16>, add: u32| {
            let at = chunk_entry_offset(&image, &e, 8, chunk);
            if let Some(dev) = dev {
                raw[at + 2..at + 4].copy_from_slice(&dev.to_le_bytes());
            }
            let blk = u32::from_le_bytes(raw[at + 4..at + 8].try_into().unwrap());
            raw[at + 4..at + 8].copy_from_slice(&blk.wrapping_add(add).to_le_bytes());
        };
        set(&mut raw, 0, Some(2), 1);
        // The mask for 2 devices is 3: id 5 is device 1, as in the kernel.
        set(&mut raw, 1, Some(5), 0);
        set(&mut raw, 2, None, 0);
        let at = chunk_entry_offset(&image, &e, 8, 2);
        raw[at + 4..at + 8].copy_from_slice(&NULL_ADDR.to_le_bytes());
        set(&mut raw, 3, Some(3), 0);
        fix_checksum(&mut raw);
        let patched = write_image(dir.path(), "patched.img", &raw);

        let m = match Image::open_with_devices(&patched, std::slice::from_ref(&blob)) {
            Err(Error::DeviceMismatch(m)) => m,
            other => panic!("expected a device mismatch, got {other:?}"),
        };
        assert!(m.contains("2 extra devices, 1 given"), "{m}");
        let img = Image::open_with_devices(&patched, &[blob, blob2]).unwrap();
        let slots = img.devices();
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[1], slot2);
        let mut want = fs::read(src.join("size1048579")).unwrap();
        want[8192..12288].fill(0);
        let mut buf = vec![0u8; 3 * 4096];
        assert_eq!(img.read_at(&e, 0, &mut buf).unwrap(), buf.len());
        assert!(buf == want[..buf.len()], "chunks on devices 2, 5 & 3 = 1, and a hole");
        let mut rest = vec![0u8; want.len() - 4 * 4096];
        assert_eq!(img.read_at(&e, 4 * 4096, &mut rest).unwrap(), rest.len());
        assert!(rest == want[4 * 4096..]);
        match img.read_all(&e) {
            Err(Error::Corrupt(m)) => {
                assert!(m.contains(&format!("nid {}", e.nid)) && m.contains("device 3"), "{m}")
            }
            other => panic!("expected a bad device id error, got {other:?}"),
        }
    }

    #[test]
    fn reads_block_maps_through_mapped_blkaddr() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        build_blob_tree(&src);
        for chunk in [4096u32, 65536] {
            let (img_path, blob) = mkfs_blob(dir.path(), &format!("flat{chunk}.img"), chunk, &src);
            let image = Image::open(&img_path).unwrap();
            let mut raw = fs::read(&img_path).unwrap();
            // The blob becomes blocks M.. of the unified address space; M is past the
            // primary image, so a read through the primary fails instead of finding data.
            const M: u32 = 1000;
            let blob_blocks = (fs::metadata(&blob).unwrap().len() / 4096) as u32;
            let slot = image.superblock().devt_slotoff as usize * DEVICE_SLOT_SIZE;
            raw[slot + 64..slot + 68].copy_from_slice(&blob_blocks.to_le_bytes());
            raw[slot + 68..slot + 72].copy_from_slice(&M.to_le_bytes());
            // Every other chunked file gets a block map; the rest keep chunk indexes, but on
            // device 0: both reach the blob only through its mapped range.
            let (mut block_maps, mut indexes) = (Vec::new(), 0);
            image
                .walk(&mut |path, e| {
                    let n = chunk_count(&image, e);
                    if e.kind != FileKind::File || e.inode.layout != DataLayout::ChunkBased || n == 0 {
                        return Ok(());
                    }
                    let entries: Vec<u32> = (0..n)
                        .map(|i| {
                            let at = chunk_entry_offset(&image, e, 8, i);
                            let blk = u32::from_le_bytes(raw[at + 4..at + 8].try_into().unwrap());
                            if blk == NULL_ADDR {
                                return blk;
                            }
                            assert_eq!(raw[at + 2..at + 4], [1, 0], "device id of chunk {i}");
                            blk + M
                        })
                        .collect();
                    let first = chunk_entry_offset(&image, e, 8, 0);
                    raw[first..first + 8 * n as usize].fill(0);
                    let block_map = indexes >= block_maps.len();
                    if block_map {
                        block_maps.push(path.to_vec());
                    } else {
                        indexes += 1;
                    }
                    for (i, blk) in entries.into_iter().enumerate() {
                        if block_map {
                            let at = chunk_entry_offset(&image, e, 4, i as u64);
                            raw[at..at + 4].copy_from_slice(&blk.to_le_bytes());
                        } else {
                            let at = chunk_entry_offset(&image, e, 8, i as u64);
                            raw[at + 4..at + 8].copy_from_slice(&blk.to_le_bytes());
                        }
                    }
                    if block_map {
                        let at = image.inode_offset(e.nid).unwrap() as usize + 16;
                        let fmt = e.inode.i_u & !(CHUNK_FORMAT_INDEXES as u32);
                        raw[at..at + 4].copy_from_slice(&fmt.to_le_bytes());
                    }
                    Ok(())
                })
                .unwrap();
            assert!(block_maps.len() >= 3 && indexes >= 3, "{} {indexes}", block_maps.len());
            fix_checksum(&mut raw);
            let patched = write_image(dir.path(), "patched.img", &raw);
            let img = Image::open_with_devices(&patched, &[blob]).unwrap();
            assert_eq!(img.devices()[0].mapped_blkaddr, M);
            let e = img.lookup(&block_maps[0]).unwrap();
            assert_eq!(e.inode.i_u & CHUNK_FORMAT_INDEXES as u32, 0, "a block map");
            assert_eq!(check_contents(&img, &src), BLOB_TREE_FILES, "chunk size {chunk}");
            // Without the device, the mapped range is read from the primary image.
            match Image::open(&patched).unwrap().read_all(&e) {
                Err(Error::Corrupt(m)) => assert!(m.contains("beyond the end of the image"), "{m}"),
                other => panic!("expected a read past the image, got {other:?}"),
            }
        }
    }

    #[test]
    #[cfg_attr(
        not(feature = "root-tests"),
        ignore = "root tier: build_tree makes device nodes and trusted.* xattrs"
    )]
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
        let (Extent::Meta(at) | Extent::Mapped { dev: 0, pa: at }) = img.map(&d, 0).unwrap().0 else {
            panic!("not on the primary device")
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
    #[cfg_attr(
        not(feature = "root-tests"),
        ignore = "root tier: build_tree makes device nodes and trusted.* xattrs"
    )]
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

    #[test]
    #[cfg_attr(
        not(feature = "root-tests"),
        ignore = "root tier: build_tree makes device nodes and trusted.* xattrs"
    )]
    fn refuses_unknown_incompatible_features() {
        let fx = fixture();
        let raw = fs::read(mkfs(fx.dir.path(), "f.img", &[], &fx.src)).unwrap();
        let incompat = 1024 + std::mem::offset_of!(format::raw::SuperBlock, feature_incompat);
        let base = u32::from_le_bytes(raw[incompat..incompat + 4].try_into().unwrap());
        assert_eq!(
            base & !format::FEATURE_INCOMPAT_SUPPORTED,
            0,
            "mkfs.erofs set {base:#x}"
        );
        for bit in [
            format::FEATURE_INCOMPAT_XATTR_PREFIXES,
            format::FEATURE_INCOMPAT_48BIT,
            format::FEATURE_INCOMPAT_METABOX,
            1 << 31,
        ] {
            let mut bad = raw.clone();
            bad[incompat..incompat + 4].copy_from_slice(&(base | bit).to_le_bytes());
            // A valid checksum, so only the feature bit can be the reason.
            fix_checksum(&mut bad);
            match Image::open(&write_image(fx.dir.path(), "feat.img", &bad)) {
                Err(Error::UnsupportedFeatures { unsupported, incompat }) => {
                    assert_eq!((unsupported, incompat), (bit, base | bit));
                }
                other => panic!("incompat bit {bit:#x}: expected UnsupportedFeatures, got {other:?}"),
            }
        }
        // The supported bits alone open (with whatever else they imply checked later).
        let mut ok = raw.clone();
        ok[incompat..incompat + 4].copy_from_slice(&format::FEATURE_INCOMPAT_CHUNKED_FILE.to_le_bytes());
        fix_checksum(&mut ok);
        Image::open(&write_image(fx.dir.path(), "chunked.img", &ok)).unwrap();

        // A compressed image (mkfs.erofs 1.5, lz4) opens, lists, and reads back the
        // source's bytes.
        let lz4 = Image::open(&mkfs(fx.dir.path(), "lz4.img", &["-zlz4"], &fx.src)).unwrap();
        let mut compressed = 0;
        lz4.walk(&mut |path, e| {
            if e.kind == FileKind::File && e.inode.layout.is_compressed() {
                let rel = std::ffi::OsStr::from_bytes(path.strip_prefix(b"/").unwrap_or(path));
                assert_eq!(lz4.read_all(e)?, std::fs::read(fx.src.join(rel)).unwrap(), "{rel:?}");
                compressed += 1;
            }
            Ok(())
        })
        .unwrap();
        assert!(compressed > 0, "no file was compressed");
    }

    /// Every image shorter than its superblock's end is refused, never panicked on.
    #[test]
    #[cfg_attr(
        not(feature = "root-tests"),
        ignore = "root tier: build_tree makes device nodes and trusted.* xattrs"
    )]
    fn refuses_truncated_superblocks() {
        let fx = fixture();
        let raw = fs::read(mkfs(fx.dir.path(), "t.img", &[], &fx.src)).unwrap();
        for n in (0..SUPER_OFFSET as usize)
            .step_by(97)
            .chain(SUPER_OFFSET as usize..SUPER_OFFSET as usize + SUPER_SIZE)
        {
            match Image::open(&write_image(fx.dir.path(), "t", &raw[..n])) {
                Err(Error::Corrupt(_)) => {}
                other => panic!("{n} bytes: expected Corrupt, got {other:?}"),
            }
        }
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
