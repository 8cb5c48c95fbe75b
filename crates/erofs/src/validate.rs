//! A full validation pass over an untrusted image, before the kernel mounts it.
//!
//! A native EROFS layer from a registry is a filesystem image someone else built: the
//! kernel's EROFS driver parses it in ring 0. [`Image::validate`] walks the whole image
//! the way the kernel would reach it from the root and refuses anything the kernel or a
//! container could trip over:
//!
//! - the superblock and its features (at open: [`Image::open`] already refuses unknown
//!   incompatible features and impossible block sizes), and extra devices that were not
//!   given;
//! - every reachable inode: a valid file type, a sane size, its xattr body, and its data
//!   (flat blocks, inline tail, chunk indexes) inside the image or device it names;
//! - every directory: records and names in bounds, names sorted and unique (the kernel's
//!   lookup is a binary search that silently misses entries otherwise), exactly one `.`
//!   naming the directory itself and one `..` naming its parent, recorded file types that
//!   match the inodes, and no directory reached twice (a cycle or a hard-linked dir);
//! - chunk indexes: device ids within the device table, addresses inside the device.
//!
//! - compressed inodes: the map header, every lcluster index (full or compact) and every
//!   pcluster inside the image; features the reader does not decode (tail-packed
//!   pclusters, fragments, MicroLZMA) are refused as unsupported.
//!
//! Every failure is an [`Invalid`] naming the check that failed, never a panic. The work
//! is bounded by the image size: honest images never share directory blocks or chunk
//! indexes between inodes, so more bytes of those than the image holds means a hostile
//! image, which is refused instead of walked for ever.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::Path;

use crate::format::{
    self, ft, xattr_entry_size, xattr_ibody_size, ChunkIndex, DataLayout, XattrEntry, XattrIbodyHeader,
    BLOCK_MAP_ENTRY_SIZE, CHUNK_FORMAT_ALL, CHUNK_FORMAT_BLKBITS_MASK, CHUNK_FORMAT_INDEXES, CHUNK_INDEX_SIZE,
    NULL_ADDR, XATTR_ENTRY_SIZE, XATTR_IBODY_HEADER_SIZE,
};
use crate::reader::{display_path, split_xattr, Entry, Error, FileKind, Image};

/// Longest symlink target the kernel can hand out (`PATH_MAX - 1`).
const MAX_LINK_LEN: u64 = 4095;

/// Why an image failed validation: which check, and where.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    /// The image (or an extra device) could not be read.
    #[error("I/O error reading the EROFS image: {0}")]
    Io(#[from] std::io::Error),
    /// The superblock is missing, has a bad magic, block size or device table.
    #[error("invalid EROFS superblock: {0}")]
    Superblock(String),
    /// Incompatible feature bits the reader does not implement.
    #[error("EROFS image needs unsupported incompatible features {unsupported:#x} (it sets {incompat:#x})")]
    UnsupportedFeatures {
        /// The bits not understood.
        unsupported: u32,
        /// The whole `feature_incompat`.
        incompat: u32,
    },
    /// The image has extra devices (a device table) that were not given: its data
    /// would be read from the wrong place.
    #[error("EROFS image needs {0} extra devices, which were not given (a layer must be self-contained)")]
    MissingDevices(usize),
    /// An inode is out of bounds, has an invalid type, layout or an absurd size.
    #[error("EROFS inode nid {nid}: {why}")]
    Inode {
        /// The inode.
        nid: u64,
        /// What is wrong.
        why: String,
    },
    /// An inode's xattr body, or a shared xattr it names, is malformed or out of bounds.
    #[error("EROFS xattrs of nid {nid}: {why}")]
    Xattr {
        /// The inode.
        nid: u64,
        /// What is wrong.
        why: String,
    },
    /// A directory's blocks or records are malformed, or a record disagrees with its inode.
    #[error("EROFS directory nid {dir}: {why}")]
    Dirent {
        /// The directory.
        dir: u64,
        /// What is wrong.
        why: String,
    },
    /// A directory's names are not in strictly increasing byte order.
    #[error("EROFS directory nid {dir}: name {name:?} after {prev:?} is out of order")]
    Unsorted {
        /// The directory.
        dir: u64,
        /// The earlier name.
        prev: String,
        /// The name that should have come first.
        name: String,
    },
    /// A directory has the same name twice.
    #[error("EROFS directory nid {dir}: duplicate name {name:?}")]
    Duplicate {
        /// The directory.
        dir: u64,
        /// The name.
        name: String,
    },
    /// `.` or `..` is missing, or names the wrong directory.
    #[error("EROFS directory nid {dir}: {why}")]
    DotEntries {
        /// The directory.
        dir: u64,
        /// What is wrong.
        why: String,
    },
    /// A directory is reachable by two paths (a cycle, or a hard-linked directory).
    #[error("EROFS directory nid {nid} is reached twice (again at {path})")]
    DirectoryReachedTwice {
        /// The directory.
        nid: u64,
        /// The second path.
        path: String,
    },
    /// File data (flat blocks or an inline tail) lies outside the image or its device.
    #[error("EROFS nid {nid}: {why}")]
    Data {
        /// The inode.
        nid: u64,
        /// What is wrong.
        why: String,
    },
    /// A chunk index is malformed or points outside its device.
    #[error("EROFS nid {nid} chunk {chunk}: {why}")]
    ChunkIndex {
        /// The inode.
        nid: u64,
        /// The chunk number.
        chunk: u64,
        /// What is wrong.
        why: String,
    },
    /// A chunk index names a device the image does not have.
    #[error("EROFS nid {nid} chunk {chunk} is on device {dev}, but the image has {devices} extra devices")]
    DeviceId {
        /// The inode.
        nid: u64,
        /// The chunk number.
        chunk: u64,
        /// The device id (masked as the kernel masks it).
        dev: u16,
        /// How many extra devices the image has.
        devices: usize,
    },
    /// An inode uses a layout this validator cannot check (compression).
    #[error("EROFS nid {nid}: {why}")]
    Unsupported {
        /// The inode.
        nid: u64,
        /// What it uses.
        why: String,
    },
    /// The metadata references more directory or index bytes than the image holds.
    #[error("EROFS metadata references more than {limit} bytes of directories and chunk indexes: {what}")]
    TooLarge {
        /// The bound (the image and its devices' size).
        limit: u64,
        /// Where it was exceeded.
        what: String,
    },
}

/// What a valid image holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Distinct inodes reached (hard links count once).
    pub inodes: u64,
    /// Directories, the root included.
    pub directories: u64,
    /// Directory records other than `.` and `..`.
    pub entries: u64,
}

/// Opens the image at `path` (without extra devices) and validates it.
pub fn validate_path(path: &Path) -> Result<Summary, Invalid> {
    validate_file(File::open(path)?)
}

/// Validates an open image file (without extra devices): what a layer's `layer.erofs`
/// must pass before it is mounted.
pub fn validate_file(file: File) -> Result<Summary, Invalid> {
    let img = Image::from_file(file).map_err(|e| classify(e, Invalid::Superblock))?;
    img.validate()
}

/// Maps a reader error onto the check that was running.
fn classify(e: Error, kind: impl FnOnce(String) -> Invalid) -> Invalid {
    match e {
        Error::Io(e) => Invalid::Io(e),
        Error::UnsupportedFeatures { unsupported, incompat } => Invalid::UnsupportedFeatures { unsupported, incompat },
        Error::Corrupt(s) => kind(s),
        other => kind(other.to_string()),
    }
}

/// State of one validation walk.
struct Walk<'a> {
    img: &'a Image,
    /// Bytes of directory data and chunk indexes still allowed.
    budget: u64,
    limit: u64,
    /// Non-directory inodes already checked (hard links are checked once).
    checked: HashSet<u64>,
    /// Shared xattr ids already checked.
    shared: HashSet<u32>,
    /// Each directory's parent and name, for paths in errors.
    parents: HashMap<u64, (u64, Vec<u8>)>,
    summary: Summary,
}

impl Image {
    /// Validates the whole image as described in [`crate::validate`]: every inode,
    /// xattr, directory record and chunk index reachable from the root. An image opened
    /// without the extra devices its device table lists is refused
    /// ([`Invalid::MissingDevices`]).
    pub fn validate(&self) -> Result<Summary, Invalid> {
        if !self.slots.is_empty() && self.devices.is_empty() {
            return Err(Invalid::MissingDevices(self.slots.len()));
        }
        let meta = self.sb.meta_blkaddr as u64 * self.block_size;
        if meta >= self.file_size {
            return Err(Invalid::Superblock(format!(
                "metadata area at byte {meta} is beyond the end of the image ({} bytes)",
                self.file_size
            )));
        }
        let limit = self
            .devices
            .iter()
            .fold(self.file_size, |t, d| t.saturating_add(d.size));
        let mut w = Walk {
            img: self,
            budget: limit,
            limit,
            checked: HashSet::new(),
            shared: HashSet::new(),
            parents: HashMap::new(),
            summary: Summary::default(),
        };
        w.run()?;
        Ok(w.summary)
    }
}

impl Walk<'_> {
    fn run(&mut self) -> Result<(), Invalid> {
        let img = self.img;
        let root_nid = img.sb.root_nid as u64;
        let root = self.entry(root_nid)?;
        if root.kind != FileKind::Dir {
            return Err(Invalid::Inode {
                nid: root_nid,
                why: "the root is not a directory".into(),
            });
        }
        self.parents.insert(root_nid, (root_nid, Vec::new()));
        // Explicit stack: a deep hostile tree must not overflow ours.
        let mut stack = vec![(root, root_nid)];
        while let Some((dir, parent)) = stack.pop() {
            self.check_inode(&dir)?;
            self.summary.inodes += 1;
            self.summary.directories += 1;
            self.spend(dir.inode.size, || format!("directory nid {}", dir.nid))?;
            let records = img
                .read_dir(&dir)
                .map_err(|e| classify(e, |why| Invalid::Dirent { dir: dir.nid, why }))?;
            let (mut dot, mut dotdot) = (false, false);
            let mut prev: Option<&[u8]> = None;
            for d in &records {
                if let Some(p) = prev {
                    if d.name.as_slice() == p {
                        return Err(Invalid::Duplicate {
                            dir: dir.nid,
                            name: display_path(&d.name),
                        });
                    }
                    if d.name.as_slice() < p {
                        return Err(Invalid::Unsorted {
                            dir: dir.nid,
                            prev: display_path(p),
                            name: display_path(&d.name),
                        });
                    }
                }
                prev = Some(&d.name);
                let expect = match d.name.as_slice() {
                    b"." => {
                        dot = true;
                        Some(dir.nid)
                    }
                    b".." => {
                        dotdot = true;
                        Some(parent)
                    }
                    _ => None,
                };
                if let Some(want) = expect {
                    if d.nid != want {
                        return Err(Invalid::DotEntries {
                            dir: dir.nid,
                            why: format!("{:?} names nid {} instead of {want}", display_path(&d.name), d.nid),
                        });
                    }
                    if d.file_type != ft::UNKNOWN && d.file_type != ft::DIR {
                        return Err(Invalid::Dirent {
                            dir: dir.nid,
                            why: format!("{:?} has file type {}", display_path(&d.name), d.file_type),
                        });
                    }
                    continue;
                }
                self.summary.entries += 1;
                let child = self.entry(d.nid)?;
                if d.file_type != ft::UNKNOWN && d.file_type != crate::format::file_type_of(child.inode.mode) {
                    return Err(Invalid::Dirent {
                        dir: dir.nid,
                        why: format!(
                            "record {:?} says file type {} but nid {} has mode {:#o}",
                            display_path(&d.name),
                            d.file_type,
                            d.nid,
                            child.inode.mode
                        ),
                    });
                }
                if child.kind == FileKind::Dir {
                    if self.parents.contains_key(&child.nid) {
                        let mut path = self.path_of(dir.nid);
                        path.push(b'/');
                        path.extend_from_slice(&d.name);
                        return Err(Invalid::DirectoryReachedTwice {
                            nid: child.nid,
                            path: display_path(&path),
                        });
                    }
                    self.parents.insert(child.nid, (dir.nid, d.name.clone()));
                    stack.push((child, dir.nid));
                } else if self.checked.insert(child.nid) {
                    self.check_inode(&child)?;
                    self.summary.inodes += 1;
                }
            }
            if !dot || !dotdot {
                return Err(Invalid::DotEntries {
                    dir: dir.nid,
                    why: format!("no {:?} record", if dot { ".." } else { "." }),
                });
            }
        }
        Ok(())
    }

    /// The path of a directory already reached, for errors.
    fn path_of(&self, mut nid: u64) -> Vec<u8> {
        let mut parts = Vec::new();
        // Bounded by the number of directories: each has one recorded parent, and the
        // chain ends at the root (its own parent).
        for _ in 0..=self.parents.len() {
            match self.parents.get(&nid) {
                Some((parent, name)) if *parent != nid => {
                    parts.push(name.clone());
                    nid = *parent;
                }
                _ => break,
            }
        }
        let mut out = Vec::new();
        for p in parts.iter().rev() {
            out.push(b'/');
            out.extend_from_slice(p);
        }
        if out.is_empty() {
            out.push(b'/');
        }
        out
    }

    fn spend(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<(), Invalid> {
        match self.budget.checked_sub(n) {
            Some(left) => {
                self.budget = left;
                Ok(())
            }
            None => Err(Invalid::TooLarge {
                limit: self.limit,
                what: what(),
            }),
        }
    }

    fn entry(&self, nid: u64) -> Result<Entry, Invalid> {
        self.img
            .entry(nid)
            .map_err(|e| classify(e, |why| Invalid::Inode { nid, why }))
    }

    /// Everything about one inode but its directory records.
    fn check_inode(&mut self, e: &Entry) -> Result<(), Invalid> {
        let nid = e.nid;
        let ino = &e.inode;
        let bad = |why: String| Invalid::Inode { nid, why };
        // The kernel's i_size is signed: a larger size is negative there.
        if ino.size > i64::MAX as u64 {
            return Err(bad(format!("absurd size {}", ino.size)));
        }
        self.check_xattrs(e)?;
        match e.kind {
            FileKind::File | FileKind::Dir | FileKind::Symlink => {}
            // Device numbers, FIFOs and sockets have no data: `i_u` is the rdev.
            _ => return Ok(()),
        }
        match e.kind {
            FileKind::Dir if ino.size == 0 => return Err(bad("empty directory (no . and ..)".into())),
            FileKind::Dir if ino.size > self.img.file_size => {
                return Err(bad(format!("directory size {} is larger than the image", ino.size)))
            }
            FileKind::Symlink if ino.size > MAX_LINK_LEN => {
                return Err(bad(format!(
                    "symlink target of {} bytes, longer than {MAX_LINK_LEN}",
                    ino.size
                )))
            }
            _ => {}
        }
        self.check_data(e)
    }

    /// The inline xattr body and every shared xattr it names (each shared one once).
    fn check_xattrs(&mut self, e: &Entry) -> Result<(), Invalid> {
        let icount = e.inode.xattr_icount;
        if icount == 0 {
            return Ok(());
        }
        let nid = e.nid;
        let img = self.img;
        let bad = |why: String| Invalid::Xattr { nid, why };
        let body_len = xattr_ibody_size(icount);
        let body_off = img
            .inode_offset(nid)
            .map_err(|e| classify(e, bad))?
            .saturating_add(e.inode.size_on_disk() as u64);
        let mut body = vec![0u8; body_len];
        img.read_exact(body_off, &mut body, || "xattr body".into())
            .map_err(|e| classify(e, bad))?;
        let shared = XattrIbodyHeader::decode(&body)
            .map_err(|e| bad(e.to_string()))?
            .shared_count as usize;
        let inline_start = XATTR_IBODY_HEADER_SIZE + shared * 4;
        if inline_start > body_len {
            return Err(bad(format!(
                "{shared} shared xattr ids do not fit the {body_len}-byte body"
            )));
        }
        for i in 0..shared {
            let at = XATTR_IBODY_HEADER_SIZE + i * 4;
            let id = u32::from_le_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
            if !self.shared.insert(id) {
                continue;
            }
            let off = (img.sb.xattr_blkaddr as u64 * img.block_size).saturating_add(id as u64 * 4);
            let mut hdr = [0u8; XATTR_ENTRY_SIZE];
            img.read_exact(off, &mut hdr, || format!("shared xattr {id}"))
                .map_err(|e| classify(e, bad))?;
            let h = XattrEntry::decode(&hdr).map_err(|e| bad(e.to_string()))?;
            let mut rest = vec![0u8; h.name_len as usize + h.value_size as usize];
            img.read_exact(off + XATTR_ENTRY_SIZE as u64, &mut rest, || {
                format!("shared xattr {id}")
            })
            .map_err(|e| classify(e, bad))?;
            split_xattr(&h, &rest, || format!("shared xattr {id}")).map_err(|e| classify(e, bad))?;
        }
        let mut pos = inline_start;
        while pos < body_len {
            if pos + XATTR_ENTRY_SIZE > body_len {
                return Err(bad(format!(
                    "inline xattr header at body offset {pos} overruns the body"
                )));
            }
            let h = XattrEntry::decode(&body[pos..]).map_err(|e| bad(e.to_string()))?;
            let len = xattr_entry_size(h.name_len as usize, h.value_size as usize);
            if pos + len > body_len {
                return Err(bad(format!(
                    "inline xattr at body offset {pos} ({len} bytes) overruns the {body_len}-byte body"
                )));
            }
            split_xattr(&h, &body[pos + XATTR_ENTRY_SIZE..], || {
                format!("inline xattr at body offset {pos}")
            })
            .map_err(|e| classify(e, bad))?;
            pos += len;
        }
        Ok(())
    }

    /// Checks that `len` bytes at address `pa` of device `dev` lie inside the file that
    /// holds them.
    fn in_bounds(&self, dev: u16, pa: u64, len: u64, nid: u64) -> Result<(), String> {
        let img = self.img;
        let (dev_file, at) = img.map_dev(dev, pa, nid, 0).map_err(|e| e.to_string())?;
        let (size, name) = match dev_file {
            None => (img.file_size, "the image".to_string()),
            Some(d) => (d.size, format!("extra device {dev}")),
        };
        match at.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(format!(
                "{len} bytes at byte {at} lie beyond the end of {name} ({size} bytes)"
            )),
        }
    }

    /// Where the inode's data lives: every extent inside its file.
    fn check_data(&mut self, e: &Entry) -> Result<(), Invalid> {
        let img = self.img;
        let ino = &e.inode;
        let nid = e.nid;
        let bs = img.block_size;
        let size = ino.size;
        let data = |why: String| Invalid::Data { nid, why };
        let after_inode = || -> Result<u64, Invalid> {
            Ok(img
                .inode_offset(nid)
                .map_err(|e| classify(e, |why| Invalid::Inode { nid, why }))?
                .saturating_add(ino.size_on_disk() as u64 + xattr_ibody_size(ino.xattr_icount) as u64))
        };
        match ino.layout {
            DataLayout::FlatPlain => {
                if size > 0 {
                    let pa = (ino.i_u as u64).saturating_mul(bs);
                    self.in_bounds(0, pa, size, nid).map_err(data)?;
                }
                Ok(())
            }
            DataLayout::FlatInline => {
                if size == 0 {
                    return Ok(());
                }
                // As the kernel: the last (possibly full) block is the inline tail.
                let tail_start = (size.div_ceil(bs) - 1) * bs;
                if tail_start > 0 {
                    let pa = (ino.i_u as u64).saturating_mul(bs);
                    self.in_bounds(0, pa, tail_start, nid).map_err(data)?;
                }
                let tail_off = after_inode()?;
                let tail_len = size - tail_start;
                if tail_off % bs + tail_len > bs {
                    return Err(data(format!(
                        "{tail_len}-byte inline tail at byte {tail_off} crosses a block boundary"
                    )));
                }
                if tail_off.saturating_add(tail_len) > img.file_size {
                    return Err(data(format!(
                        "{tail_len}-byte inline tail at byte {tail_off} lies beyond the end of the image"
                    )));
                }
                Ok(())
            }
            DataLayout::ChunkBased => self.check_chunks(e, after_inode()?),
            DataLayout::CompressedFull | DataLayout::CompressedCompact => self.check_compressed(e),
        }
    }

    /// Every extent of a compressed inode: its map header (algorithm among the image's,
    /// no feature the reader lacks), every lcluster index reachable and consistent, and
    /// every pcluster inside the image. The data itself is not decoded: a stream that
    /// does not decode is an I/O error for the reader, as for the kernel.
    fn check_compressed(&mut self, e: &Entry) -> Result<(), Invalid> {
        let img = self.img;
        let nid = e.nid;
        let bad = |err: Error| {
            classify(err, |why| {
                if why.ends_with(crate::zread::UNSUPPORTED) {
                    Invalid::Unsupported { nid, why }
                } else {
                    Invalid::Data { nid, why }
                }
            })
        };
        let z = img.zinfo(e).map_err(bad)?;
        let lclusters = e.inode.size.div_ceil(1 << z.bits);
        self.spend(lclusters.saturating_mul(format::LCLUSTER_INDEX_SIZE as u64), || {
            format!("{lclusters} lcluster indexes of nid {nid}")
        })?;
        let bs = img.block_size;
        // Every lcluster is mapped, as a read starting there would map it, and so is
        // every extent starting inside it (reads start there too, and an extent that ends
        // in the lcluster it starts in is seen from no lcluster's start); the extents must
        // tile the file, each one starting where the last ended, up to its size.
        let size = e.inode.size;
        let mut end = 0u64;
        for lcn in 0..lclusters {
            let lend = ((lcn + 1) << z.bits).min(size);
            let mut pos = lcn << z.bits;
            loop {
                let m = img.zmap(nid, &z, pos).map_err(bad)?;
                if m.la + m.llen > end {
                    if m.la != end {
                        return Err(Invalid::Data {
                            nid,
                            why: format!(
                                "byte {pos} maps to an extent at {}, but the one before ends at {end}",
                                m.la
                            ),
                        });
                    }
                    let (pa, plen) = match m.inline {
                        Some((pa, plen)) => (pa, u64::from(plen)),
                        None => (u64::from(m.blkaddr) * bs, u64::from(m.blocks) * bs),
                    };
                    self.in_bounds(0, pa, plen, nid).map_err(|why| Invalid::Data {
                        nid,
                        why: format!("pcluster of the extent at {}: {why}", m.la),
                    })?;
                    end = m.la + m.llen;
                }
                // `zmap` maps a byte into an extent that holds it, so `end` moved past
                // `pos`: this ends.
                if end >= lend {
                    break;
                }
                pos = end;
            }
        }
        if end != size {
            return Err(Invalid::Data {
                nid,
                why: format!("the extents end at {end}, the file at {size}"),
            });
        }
        Ok(())
    }

    /// Every chunk index of a chunk-based inode whose index array starts at or after `after`.
    fn check_chunks(&mut self, e: &Entry, after: u64) -> Result<(), Invalid> {
        let img = self.img;
        let ino = &e.inode;
        let nid = e.nid;
        let fmt = ino.i_u;
        if fmt & !u32::from(CHUNK_FORMAT_ALL) != 0 {
            return Err(Invalid::Inode {
                nid,
                why: format!("unsupported chunk format {fmt:#x}"),
            });
        }
        let chunkbits = img.sb.blkszbits as u32 + (fmt & CHUNK_FORMAT_BLKBITS_MASK as u32);
        let chunk_size = 1u64 << chunkbits;
        let count = ino.size.div_ceil(chunk_size);
        let wide = fmt & CHUNK_FORMAT_INDEXES as u32 != 0;
        let unit = if wide { CHUNK_INDEX_SIZE } else { BLOCK_MAP_ENTRY_SIZE } as u64;
        let start = after.next_multiple_of(unit);
        let bytes = count.saturating_mul(unit);
        self.spend(bytes, || format!("{count} chunk indexes of nid {nid}"))?;
        match start.checked_add(bytes) {
            Some(end) if end <= img.file_size => {}
            _ => {
                return Err(Invalid::ChunkIndex {
                    nid,
                    chunk: 0,
                    why: format!("{count} indexes of {unit} bytes at byte {start} lie beyond the end of the image"),
                })
            }
        }
        // Read in pieces: the array may be large (bounded by the image, checked above).
        const PER_READ: u64 = 8192;
        let mut buf = vec![0u8; (PER_READ * unit) as usize];
        let mut chunk = 0u64;
        while chunk < count {
            let n = (count - chunk).min(PER_READ);
            let raw = &mut buf[..(n * unit) as usize];
            img.read_exact(start + chunk * unit, raw, || format!("chunk indexes of nid {nid}"))
                .map_err(|e| classify(e, |why| Invalid::ChunkIndex { nid, chunk, why }))?;
            for (i, b) in raw.chunks_exact(unit as usize).enumerate() {
                let c = chunk + i as u64;
                let index = if wide {
                    ChunkIndex::decode(b)
                } else {
                    ChunkIndex::decode_block_map(b)
                }
                .map_err(|e| Invalid::ChunkIndex {
                    nid,
                    chunk: c,
                    why: e.to_string(),
                })?;
                if index.blkaddr == NULL_ADDR {
                    continue;
                }
                // Masked as the kernel masks it, so both pick the same device.
                let dev = index.device_id & img.device_id_mask;
                if dev as usize > img.slots.len() {
                    return Err(Invalid::DeviceId {
                        nid,
                        chunk: c,
                        dev,
                        devices: img.slots.len(),
                    });
                }
                let len = chunk_size.min(ino.size - c * chunk_size);
                self.in_bounds(dev, index.blkaddr as u64 * img.block_size, len, nid)
                    .map_err(|why| Invalid::ChunkIndex { nid, chunk: c, why })?;
            }
            chunk += n;
        }
        Ok(())
    }
}
