//! The streaming EROFS image writer.
//!
//! An image is produced in two steps:
//!
//! 1. While the source is read (a tar stream, a directory walk), each regular file's
//!    body goes straight to the output with [`ImageWriter::write_file_data`]: full
//!    blocks are appended to the data area as they arrive, and the tail (size mod block
//!    size) is either kept in memory to be packed after the inode (`FLAT_INLINE`) or
//!    padded out to a block right away (`FLAT_PLAIN`). Nothing is ever re-read, so the
//!    source is consumed in one pass and memory holds only metadata and small tails.
//! 2. [`ImageWriter::finish`] lays out everything else after the file data: directory
//!    blocks, the shared xattr area, the inodes (with inline xattrs and tails), and
//!    finally the superblock in the head.
//!
//! Layout of a finished image (block numbers grow downwards; the head is the first
//! 4 KiB whatever the block size, [`Options::block_bits`]: block 0 of 4 KiB blocks,
//! blocks 0..8 of 512-byte ones):
//!
//! ```text
//! head (0..H)      superblock at byte 1024, the device table after it if it fits
//! blocks H..D      file bodies, in arrival order
//! blocks D..T      the device table, when files have chunks on extra devices
//! blocks T..M      directory blocks and long symlink targets that are not inlined
//! blocks M..       meta area: shared xattrs, then inodes (root first), 32-byte slots
//! ```
//!
//! Chunk-based files ([`ImageWriter::write_file_chunked`], for deduplicated layers)
//! put nothing in the data area: a [`ChunkSink`] decides where each chunk lives, on
//! this image or on an extra device (another blob), and the inode carries an 8-byte
//! index per chunk (`EROFS_CHUNK_FORMAT_INDEXES`: device id, start block).
//!
//! The output is a pure function of the tree and the data given: directory entries are
//! sorted, nodes are laid out in depth-first order of sorted names, and the shared xattr
//! table is ordered by first use, so the same input always gives the same bytes.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, Seek, SeekFrom, Write};

use crate::compress::Codec;
use crate::format::{
    self, mode, ChunkIndex, DataLayout, DeviceSlot, Dirent, Inode, MapHeader, SuperBlock, XattrEntry, XattrIbodyHeader,
};
use crate::zmap::{self, ZExtent};
use crate::zwriter::{Done, Piece, Pipeline, SEGMENT};

/// Errors from building an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the source or writing the image failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The tree cannot be represented in EROFS (names, sizes, addresses out of range).
    #[error("{0}")]
    Unrepresentable(String),
}

/// Result of writer operations.
pub type Result<T> = std::result::Result<T, Error>;

/// How the image is written.
#[derive(Debug, Clone)]
pub struct Options {
    /// Pack small regular files and the tails of regular files right after their inode.
    /// Off gives block-aligned data for every regular file, which layers that will later
    /// be merged or chunk-shared prefer, and which keeps the inode area dense: the kernel
    /// reads metadata one block at a time, without readahead. Directories and symlinks
    /// are inlined whenever they fit either way (as `mkfs.erofs -E noinline_data` does):
    /// they are metadata, read together with their inode.
    pub inline_data: bool,
    /// Timestamp compact inodes report; inodes with any other mtime are extended.
    pub build_time: u64,
    /// Nanoseconds part of [`Options::build_time`].
    pub build_time_nsec: u32,
    /// Filesystem UUID.
    pub uuid: [u8; 16],
    /// Volume label.
    pub volume_name: [u8; 16],
    /// log2 of the chunk size for [`ImageWriter::write_file_chunked`]
    /// ([`Options::block_bits`] ..= `block_bits` + 31, e.g. 12 = 4 KiB); chunk-based files
    /// need it, other files ignore it.
    pub chunk_bits: u8,
    /// Compress regular files' data ([`ImageWriter::write_file`]); `None` (the default)
    /// writes every file uncompressed, which merged metadata and chunk sharing need.
    pub compression: Option<Compression>,
    /// Blocks kept free before the file data for the device table (32 devices each), for
    /// images that have both file data of their own (over 8 MiB) and chunks on more than
    /// 22 devices; the kernel reads the table only within the first 8 MiB. Not with the
    /// metadata-first layout.
    pub devt_reserve_blocks: u32,
    /// Lay the extra devices out after this image in one address space (each device
    /// slot's `mapped_blkaddr`: the image's blocks, then each device's in table order).
    /// The image and its devices concatenated, each padded to whole blocks, are then one
    /// flat EROFS device that mounts with no extra devices (as a VMDK describes them);
    /// given as extra devices, they still mount as before.
    pub flat_devices: bool,
    /// log2 of the image's block size: 12 (4 KiB, the default) down to 9 (512 bytes).
    /// Smaller blocks let chunk indexes address data that is only 512-byte aligned (the
    /// members of a tar stream given as an extra device) and pack directories, symlinks
    /// and tails in finer units. The first 4 KiB stay the image's head (the superblock at
    /// byte 1024, then the device table when it fits) whatever the block size, so with
    /// 512-byte blocks data and metadata start at block 8. Below 12, [`Self::compression`]
    /// must be `None`, [`Self::flat_devices`] false and [`Self::devt_reserve_blocks`] 0
    /// ([`ImageWriter::new`] refuses the image otherwise). The kernel reads uncompressed
    /// images with any block size from 512 bytes to the page size (tests: Linux 6.18,
    /// file-backed mounts with `-o device=`); an extra device must then hold whole blocks
    /// of this size, its last one included, or reads of that block fail (EIO).
    pub block_bits: u8,
}

/// How file data is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    /// Codec and level.
    pub codec: Codec,
    /// Physical cluster size in blocks (1 ..= 256): how much compressed data one read
    /// decodes at most. Bigger compresses better and reads more per miss; more than one
    /// block sets the big pcluster feature (Linux 5.13 and later).
    pub pcluster_blocks: u32,
    /// Compression threads beside the one that parses.
    pub workers: usize,
}

impl Compression {
    /// `codec` with one-block pclusters (as `mkfs.erofs` without `-C`), one worker per CPU.
    pub fn new(codec: Codec) -> Compression {
        Compression {
            codec,
            pcluster_blocks: 1,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// Sets the pcluster size in bytes (`mkfs.erofs -C`): a multiple of the block size
    /// (4 KiB: compressed images have no other) up to 1 MiB.
    pub fn with_pcluster_size(mut self, bytes: u64) -> std::result::Result<Compression, String> {
        if bytes == 0 || !bytes.is_multiple_of(BLOCK_SIZE) || bytes > format::PCLUSTER_MAX_SIZE {
            return Err(format!(
                "pcluster size {bytes}: must be a multiple of {BLOCK_SIZE} bytes, at most {} bytes",
                format::PCLUSTER_MAX_SIZE
            ));
        }
        self.pcluster_blocks = (bytes / BLOCK_SIZE) as u32;
        Ok(self)
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            chunk_bits: 16,
            compression: None,
            devt_reserve_blocks: 0,
            flat_devices: false,
            block_bits: BLKSZBITS,
            inline_data: true,
            build_time: 0,
            build_time_nsec: 0,
            uuid: [0; 16],
            volume_name: [0; 16],
        }
    }
}

/// The block size this writer produces by default ([`Options::block_bits`] 12);
/// re-exported because callers lay out blocks for it (dedup blobs, data offsets).
pub use crate::format::BLOCK_SIZE;
use crate::format::{BLKSZBITS, NULL_ADDR};

/// The smallest [`Options::block_bits`]: the kernel reads no smaller blocks.
pub const MIN_BLOCK_BITS: u8 = 9;

/// The image's head: the first 4 KiB, whatever the block size. The superblock is at byte
/// 1024 of it and the device table may follow; with smaller blocks it spans several
/// blocks (8 of 512 bytes), so that the places of both are the same in every image and
/// the data starts at the same byte.
const HEAD: u64 = 4096;

/// Index of a node in a [`Tree`].
pub type NodeId = u32;

/// One extended attribute, split into the EROFS prefix index and the name suffix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Xattr {
    /// Prefix index (`format::xattr_index`).
    pub index: u8,
    /// Name after the prefix.
    pub suffix: Box<[u8]>,
    /// Value.
    pub value: Box<[u8]>,
}

impl Xattr {
    /// Builds an xattr from its full name. Fails when EROFS has no prefix for the name
    /// or the name or value is too long for the format.
    pub fn new(name: &[u8], value: &[u8]) -> Result<Xattr> {
        let shown = || String::from_utf8_lossy(name).into_owned();
        let (index, suffix) = format::split_xattr_name(name)
            .ok_or_else(|| Error::Unrepresentable(format!("xattr {:?}: namespace not supported by EROFS", shown())))?;
        if suffix.len() > 255 {
            return Err(Error::Unrepresentable(format!(
                "xattr {:?}: name longer than 255 bytes",
                shown()
            )));
        }
        if value.len() > 65535 {
            return Err(Error::Unrepresentable(format!(
                "xattr {:?}: value longer than 65535 bytes",
                shown()
            )));
        }
        Ok(Xattr {
            index,
            suffix: suffix.into(),
            value: value.into(),
        })
    }

    /// The full name, e.g. `user.foo`.
    pub fn name(&self) -> Vec<u8> {
        format::join_xattr_name(self.index, &self.suffix).unwrap_or_default()
    }

    fn entry_size(&self) -> usize {
        format::xattr_entry_size(self.suffix.len(), self.value.len())
    }
}

/// Inode metadata of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits (07777); the type comes from the node's [`Body`].
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Extended attributes, kept sorted and unique by name.
    pub xattrs: Vec<Xattr>,
}

impl Meta {
    /// The attributes an inode read from an image holds (xattrs apart: they are read
    /// separately).
    pub fn of_inode(ino: &format::Inode) -> Meta {
        Meta {
            perm: ino.mode & 0o7777,
            uid: ino.uid,
            gid: ino.gid,
            mtime: ino.mtime,
            mtime_nsec: ino.mtime_nsec,
            xattrs: Vec::new(),
        }
    }

    /// Sets (or replaces) an xattr, keeping the list sorted by name.
    pub fn set_xattr(&mut self, x: Xattr) {
        match self
            .xattrs
            .binary_search_by(|o| (o.index, &o.suffix).cmp(&(x.index, &x.suffix)))
        {
            Ok(i) => self.xattrs[i] = x,
            Err(i) => self.xattrs.insert(i, x),
        }
    }

    /// Worst-case size of the xattr body: every xattr inline.
    fn xattr_upper_bound(&self) -> usize {
        let inline: usize = self.xattrs.iter().map(Xattr::entry_size).sum();
        format::xattr_ibody_size(format::xattr_icount(0, inline) as u16)
    }
}

/// Where a regular file's body is in the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileData {
    /// File size in bytes.
    pub size: u64,
    /// First data block (meaningless when `blocks` is 0).
    pub blkaddr: u32,
    /// Data blocks written, including a padded tail block when the tail is not inline.
    pub blocks: u32,
    /// The tail, to be packed after the inode.
    pub tail: Option<Box<[u8]>>,
    /// For a chunk-based file: where each chunk lives (the image's own data area is
    /// device 0, the device table's entries are 1..). The file is then written with
    /// the `CHUNK_BASED` layout and 8-byte chunk indexes.
    pub chunks: Option<Box<[ChunkAddr]>>,
    /// For a compressed file: its extents, whose pclusters are in this image's data area
    /// (`blocks` then counts the pcluster blocks). Written `COMPRESSED_FULL`.
    pub compressed: Option<Box<[ZExtent]>>,
    /// A body still being compressed: the writer's own index of it, resolved when the
    /// image is finished. Callers only store the `FileData` they were given.
    pub pending: Option<u32>,
    /// For a chunk-based file built by the caller: log2 of its chunk size in bytes, which
    /// `chunks` must match; 0 for [`Options::chunk_bits`]. The image's block size bounds
    /// it: [`Options::block_bits`] ..= `block_bits` + 31 (12 ..= 43 with 4 KiB blocks,
    /// 9 ..= 40 with 512-byte ones), and [`ChunkAddr::blkaddr`] counts blocks of that size.
    pub chunk_bits: u8,
}

impl FileData {
    /// A body of `size` bytes still in the writer's queue, as its `id`-th queued file.
    fn pending(size: u64, id: u32) -> FileData {
        FileData {
            size,
            blkaddr: NULL_ADDR,
            pending: Some(id),
            ..Default::default()
        }
    }
}

/// Where one chunk of a chunk-based file lives: a block on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkAddr {
    /// 0 for the image itself, `n` for the n-th entry of the device table.
    pub device: u16,
    /// First block of the chunk on that device, in blocks of the image's block size
    /// ([`Options::block_bits`], whatever the device); [`ChunkAddr::HOLE`] reads as zeros.
    pub blkaddr: u32,
}

impl ChunkAddr {
    /// A chunk with no storage: the kernel reads it as zeros.
    pub const HOLE: ChunkAddr = ChunkAddr {
        device: 0,
        blkaddr: NULL_ADDR,
    };
}

/// Decides where the chunks of chunk-based files go. The writer hands over each
/// chunk's bytes (a whole chunk, or a file's shorter last chunk) and gets back its
/// address; a sink that deduplicates answers with the address of an identical chunk
/// stored earlier, in this image's blob or in another one.
pub trait ChunkSink {
    /// Stores (or finds) `data`; the returned blocks must hold exactly these bytes,
    /// zero-padded to whole blocks.
    fn put(&mut self, data: &[u8]) -> io::Result<ChunkAddr>;
    /// The device table the addresses given out so far need (device `n` is entry
    /// `n - 1`).
    fn device_slots(&self) -> Vec<DeviceSlot>;
}

/// What a node is, with its type-specific payload.
#[derive(Debug, Clone)]
pub enum Body {
    /// A directory and its children, sorted by name.
    Dir(BTreeMap<Box<[u8]>, NodeId>),
    /// A regular file whose data is already in the image.
    File(FileData),
    /// A symbolic link and its target.
    Symlink(Box<[u8]>),
    /// A character device (major, minor).
    CharDev(u32, u32),
    /// A block device (major, minor).
    BlockDev(u32, u32),
    /// A named pipe.
    Fifo,
    /// A socket.
    Socket,
}

impl Body {
    fn type_bits(&self) -> u16 {
        match self {
            Body::Dir(_) => mode::S_IFDIR,
            Body::File(_) => mode::S_IFREG,
            Body::Symlink(_) => mode::S_IFLNK,
            Body::CharDev(..) => mode::S_IFCHR,
            Body::BlockDev(..) => mode::S_IFBLK,
            Body::Fifo => mode::S_IFIFO,
            Body::Socket => mode::S_IFSOCK,
        }
    }
}

/// A node: metadata and body.
#[derive(Debug, Clone)]
pub struct Node {
    /// Inode metadata.
    pub meta: Meta,
    /// Type and payload.
    pub body: Body,
}

impl Node {
    /// A new empty directory.
    pub fn dir(meta: Meta) -> Node {
        Node {
            meta,
            body: Body::Dir(BTreeMap::new()),
        }
    }

    /// Whether this node is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.body, Body::Dir(_))
    }
}

/// The file tree of an image being built: an arena of nodes, node 0 the root.
///
/// Hard links are several directory entries naming the same node. Nodes unlinked from
/// the tree (replaced by a later entry) stay in the arena and are simply not written.
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
    /// Link counts to report at least, by node (see [`Tree::keep_nlink`]).
    min_nlink: BTreeMap<NodeId, u32>,
}

impl Tree {
    /// A tree holding only the root directory.
    pub fn new(root: Meta) -> Tree {
        Tree {
            nodes: vec![Node::dir(root)],
            min_nlink: BTreeMap::new(),
        }
    }

    /// Makes a non-directory node report at least `n` links, whatever the tree holds.
    /// Merged metadata shows a lower layer's inode as overlayfs does: with that layer's
    /// link count, even where later layers hid some of its names.
    pub fn keep_nlink(&mut self, id: NodeId, n: u32) {
        self.min_nlink.insert(id, n);
    }

    /// The root directory.
    pub fn root(&self) -> NodeId {
        0
    }

    /// A node by id.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    /// A node by id, for changes.
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id as usize]
    }

    /// Adds an unlinked node; link it with [`Tree::link`].
    pub fn add(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        (self.nodes.len() - 1) as NodeId
    }

    /// Number of nodes in the arena (linked or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the arena holds only the root.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    /// The child of `dir` called `name`.
    pub fn child(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &self.node(dir).body {
            Body::Dir(children) => children.get(name).copied(),
            _ => None,
        }
    }

    /// Links `node` into `dir` under `name`, returning what was there before.
    /// Panics if `dir` is not a directory (a caller bug).
    pub fn link(&mut self, dir: NodeId, name: &[u8], node: NodeId) -> Option<NodeId> {
        match &mut self.node_mut(dir).body {
            Body::Dir(children) => children.insert(name.into(), node),
            _ => panic!("link into a non-directory node"),
        }
    }

    /// Unlinks `name` from `dir`, returning the node that was there.
    pub fn unlink(&mut self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &mut self.node_mut(dir).body {
            Body::Dir(children) => children.remove(name),
            _ => None,
        }
    }
}

/// Figures about a finished image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Inodes written.
    pub inodes: u64,
    /// Total blocks.
    pub blocks: u32,
    /// Image size in bytes.
    pub bytes: u64,
    /// Blocks holding file bodies.
    pub data_blocks: u32,
    /// First block of the file bodies (the first after the 4 KiB head: 1 with 4 KiB
    /// blocks, 8 with 512-byte ones; or after the metadata in the metadata-first layout).
    pub data_blkaddr: u32,
    /// Start of the meta area.
    pub meta_blkaddr: u32,
    /// nid of the root directory.
    pub root_nid: u16,
    /// Shared xattr entries.
    pub shared_xattrs: usize,
    /// Chunk-based files written.
    pub chunked_files: u64,
    /// Compressed files written.
    pub compressed_files: u64,
    /// Compressed files whose last pcluster is packed after their inode.
    pub tail_packed_files: u64,
    /// Extra devices in the device table.
    pub devices: u16,
}

/// Writes an image: file bodies first, as they stream in, then everything else.
pub struct ImageWriter<W: Write + Seek> {
    out: W,
    opts: Options,
    /// [`Options::block_bits`], checked.
    bits: u8,
    /// Next free block in the data area.
    next_block: u32,
    /// The device table written by `finish` (device ids 1..).
    devices: Vec<DeviceSlot>,
    /// Reused buffer for one chunk of a chunk-based file.
    chunk_buf: Vec<u8>,
    /// Compression workers, with [`Options::compression`].
    pipeline: Option<Pipeline>,
    /// Bodies handed to the workers (by [`FileData::pending`]), and the file each
    /// submitted segment belongs to, in submission order.
    zfiles: Vec<ZFile>,
    seg_owner: std::collections::VecDeque<u32>,
    /// Whether any file was written compressed.
    compressed_files: u64,
    /// How many of those have a tail-packed pcluster (`ztailpacking`).
    ztailpacked_files: u64,
    /// A device table that goes into the head, written with the superblock.
    pending_block0: Vec<u8>,
}

/// A body being compressed.
struct ZFile {
    size: u64,
    /// Its tail may be packed after the inode, should it be stored uncompressed.
    inline_ok: bool,
    segments_left: u32,
    extents: Vec<ZExtent>,
    blocks: u32,
    /// The tail-packed pcluster, once its last segment is back.
    tail: Option<Box<[u8]>>,
    /// Where the body ended up, once its last segment is written.
    done: Option<FileData>,
}

impl<W: Write + Seek> ImageWriter<W> {
    /// Starts an image in `out`, which must be empty: the first 4 KiB are left for the
    /// superblock, file data starts right after them.
    ///
    /// Fails with [`Error::Unrepresentable`] when [`Options::block_bits`] is out of
    /// 9 ..= 12, or below 12 with compression, flat devices or reserved device table
    /// blocks.
    pub fn new(mut out: W, opts: Options) -> Result<Self> {
        let bits = opts.block_bits;
        if !(MIN_BLOCK_BITS..=BLKSZBITS).contains(&bits) {
            return Err(Error::Unrepresentable(format!(
                "block size 2^{bits}: the writer makes blocks of 512 to 4096 bytes (block_bits 9 to 12)"
            )));
        }
        if bits < BLKSZBITS {
            let bs = 1u32 << bits;
            // Compressed extents and the flat/reserved device table layouts are written
            // and tested for 4 KiB blocks only; small blocks are for chunk indexes.
            let refused = if opts.compression.is_some() {
                Some("compression")
            } else if opts.flat_devices {
                Some("flat devices")
            } else if opts.devt_reserve_blocks > 0 {
                Some("blocks reserved for the device table")
            } else {
                None
            };
            if let Some(what) = refused {
                return Err(Error::Unrepresentable(format!(
                    "{what} with {bs}-byte blocks: only 4096-byte blocks (block_bits 12) support it"
                )));
            }
        }
        let reserve = opts.devt_reserve_blocks;
        let head = (HEAD >> bits) as u32;
        out.seek(SeekFrom::Start((u64::from(head) + u64::from(reserve)) << bits))?;
        Ok(ImageWriter {
            out,
            opts,
            bits,
            next_block: head + reserve,
            pending_block0: Vec::new(),
            devices: Vec::new(),
            chunk_buf: Vec::new(),
            pipeline: None,
            zfiles: Vec::new(),
            seg_owner: Default::default(),
            compressed_files: 0,
            ztailpacked_files: 0,
        })
    }

    /// The options this writer was made with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The image's block size in bytes ([`Options::block_bits`]).
    pub fn block_size(&self) -> u64 {
        1 << self.bits
    }

    /// Blocks of the head (the first 4 KiB), where the file data starts.
    fn head_blocks(&self) -> u32 {
        (HEAD >> self.bits) as u32
    }

    /// Sets the UUID; it is written with the superblock, last, so it may depend on
    /// everything read (e.g. the input's digest).
    pub fn set_uuid(&mut self, uuid: [u8; 16]) {
        self.opts.uuid = uuid;
    }

    /// Whether a file of `size` bytes with `meta` will get its tail inlined. The answer
    /// must be known before the body streams past, so it assumes the worst case (an
    /// extended inode, every xattr inline); [`ImageWriter::finish`] can only do better.
    pub fn will_inline_tail(&self, meta: &Meta, size: u64) -> bool {
        let bs = self.block_size();
        let tail = (size % bs) as usize;
        self.opts.inline_data
            && tail != 0
            && format::EXTENDED_INODE_SIZE + meta.xattr_upper_bound() + tail <= bs as usize
    }

    /// Bytes a compressed file of `size` bytes with `meta` may pack after its indexes
    /// (`ztailpacking`; 0 when tails are not inlined). Worst case, as for
    /// [`Self::will_inline_tail`]: with this much the inode, its xattrs, map and tail fit in
    /// one block, where [`ImageWriter::finish`] keeps it, so the tail never straddles a
    /// block as the kernel requires.
    fn zinline_budget(&self, meta: &Meta, size: u64) -> usize {
        if !self.opts.inline_data {
            return 0;
        }
        let before = format::map_header_start((format::EXTENDED_INODE_SIZE + meta.xattr_upper_bound()) as u64)
            + (format::MAP_HEADER_SIZE + 8) as u64
            + size.div_ceil(self.block_size()) * format::LCLUSTER_INDEX_SIZE as u64;
        self.block_size().saturating_sub(before) as usize
    }

    /// Sets the device table: entry `n - 1` is device `n` of the chunk addresses.
    pub fn set_devices(&mut self, devices: Vec<DeviceSlot>) {
        self.devices = devices;
    }

    /// Streams a regular file's body: with a sink, as a chunk-based file, except that
    /// a file small enough to be packed after its inode stays in the image (a chunk
    /// would cost a whole block for it, and such files rarely repeat exactly); without
    /// one, into the image's data area, compressed with [`Options::compression`].
    pub fn write_file<R: BufRead + ?Sized>(
        &mut self,
        src: &mut R,
        size: u64,
        meta: &Meta,
        sink: Option<&mut dyn ChunkSink>,
    ) -> Result<FileData> {
        // With a sink, sharing comes first, compression or not: chunk-based files cannot
        // be compressed, and compressing the small files into each layer instead (the
        // first design: files under one chunk) stored 2.1x the bytes of dedup alone over
        // ten versions of an image (scripts/bench-dedup.sh, README "Compressed layers").
        match sink {
            Some(sink) if size > 0 && !(size < self.block_size() && self.will_inline_tail(meta, size)) => {
                self.write_file_chunked(src, size, sink)
            }
            // A body of one block or less cannot save a block by compression.
            _ if self.opts.compression.is_some() && size > self.block_size() => {
                self.write_file_compressed(src, size, meta)
            }
            _ => self.write_file_data(src, size, meta),
        }
    }

    /// Streams a regular file's body of exactly `size` bytes from `src` to the
    /// compression workers ([`Options::compression`] must be set). The body is read now;
    /// where it lands is decided when its segments come back, in order: compressed, or
    /// plain when compression does not make it smaller.
    pub fn write_file_compressed<R: BufRead + ?Sized>(
        &mut self,
        src: &mut R,
        size: u64,
        meta: &Meta,
    ) -> Result<FileData> {
        let Some(z) = self.opts.compression else {
            return self.write_file_data(src, size, meta);
        };
        if self.pipeline.is_none() {
            let bs = self.block_size() as usize;
            let pcluster = z.pcluster_blocks.clamp(1, 256) as usize * bs;
            self.pipeline = Some(Pipeline::new(z.codec, z.workers, bs, pcluster)?);
        }
        let segments = u32::try_from(size.div_ceil(SEGMENT as u64))
            .map_err(|_| Error::Unrepresentable("file too large".into()))?;
        let budget = self.zinline_budget(meta, size);
        let id = self.queue_file(size, meta, segments)?;
        let mut left = size;
        while left > 0 {
            let n = left.min(SEGMENT as u64) as usize;
            let mut buf = vec![0u8; n];
            read_exact(src, &mut buf)?;
            while self.pipeline.as_ref().is_some_and(|p| p.full()) {
                self.take_compressed(true)?;
            }
            left -= n as u64;
            self.pipeline
                .as_mut()
                .expect("started above")
                .submit(buf, left == 0, budget)?;
            self.seg_owner.push_back(id);
        }
        while self.take_compressed(false)? {}
        Ok(FileData::pending(size, id))
    }

    /// Writes out the next compressed segment in submission order, if it is done (or
    /// waiting for it with `wait`). Returns whether one was written.
    fn take_compressed(&mut self, wait: bool) -> Result<bool> {
        let Some(p) = self.pipeline.as_mut() else {
            return Ok(false);
        };
        let Some((_, done)) = p.next(wait)? else {
            return Ok(false);
        };
        let id = self.seg_owner.pop_front().expect("one owner per segment") as usize;
        let whole = self.zfiles[id].extents.is_empty() && self.zfiles[id].segments_left == 1;
        if whole && !self.saves(&self.zfiles[id], &done) {
            // Stored plain: the body is all here.
            let f = &self.zfiles[id];
            let (size, inline) = (f.size, f.inline_ok);
            let data = self.write_plain(&mut &done.data[..], size, inline)?;
            let f = &mut self.zfiles[id];
            f.segments_left = 0;
            f.done = Some(data);
            return Ok(true);
        }
        let bs = self.block_size() as usize;
        let first = self.next_block;
        let mut at = 0usize;
        let mut extents = Vec::with_capacity(done.pieces.len());
        let mut tail: Option<Box<[u8]>> = None;
        for piece in &done.pieces {
            let blkaddr = self.next_block;
            let (len, blocks) = match piece {
                Piece::Compressed { len, bytes } => {
                    self.out.write_all(bytes)?;
                    (*len, (bytes.len() / bs) as u32)
                }
                Piece::Raw { len } => {
                    let n = *len as usize;
                    self.out.write_all(&done.data[at..at + n])?;
                    self.out.write_all(&ZEROS[..(bs - n % bs) % bs])?;
                    (*len, 1)
                }
                Piece::Inline { len, compressed } => {
                    let n = *len as usize;
                    let bytes = compressed.as_deref().unwrap_or(&done.data[at..at + n]);
                    tail = Some(bytes.into());
                    // No data block (its index counts one, as erofs-utils writes it).
                    (*len, 0)
                }
            };
            at += len as usize;
            self.next_block = self
                .next_block
                .checked_add(blocks)
                .filter(|b| *b < NULL_ADDR)
                .ok_or_else(|| Error::Unrepresentable("image larger than 16 TiB".into()))?;
            let inline = matches!(piece, Piece::Inline { .. });
            extents.push(ZExtent {
                len,
                raw: matches!(piece, Piece::Raw { .. } | Piece::Inline { compressed: None, .. }),
                blkaddr: if inline { NULL_ADDR } else { blkaddr },
                blocks: if inline { 1 } else { blocks },
                inline,
            });
        }
        let f = &mut self.zfiles[id];
        f.extents.extend(extents);
        f.blocks += self.next_block - first;
        f.segments_left -= 1;
        if tail.is_some() {
            f.tail = tail;
        }
        if f.segments_left == 0 {
            let extents = std::mem::take(&mut f.extents);
            let data = if extents.iter().all(|e| e.raw) {
                // Nothing compressed: raw extents of whole blocks from offset 0 are
                // exactly the plain layout, in consecutive blocks, and a raw inline tail
                // is a plain inline tail (its budget is stricter than a plain tail's).
                FileData {
                    size: f.size,
                    blkaddr: extents.first().filter(|e| !e.inline).map_or(NULL_ADDR, |e| e.blkaddr),
                    blocks: f.blocks,
                    tail: f.tail.take(),
                    ..Default::default()
                }
            } else {
                self.compressed_files += 1;
                if f.tail.is_some() {
                    self.ztailpacked_files += 1;
                }
                FileData {
                    size: f.size,
                    blkaddr: NULL_ADDR,
                    blocks: f.blocks,
                    tail: f.tail.take(),
                    compressed: Some(extents.into_boxed_slice()),
                    ..Default::default()
                }
            };
            f.done = Some(data);
        }
        Ok(true)
    }

    /// Whether a whole body, compressed as `done`, takes less room than stored plain
    /// (as mkfs.erofs decides: pclusters plus indexes against the file size).
    fn saves(&self, f: &ZFile, done: &Done) -> bool {
        let bytes: usize = done
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Compressed { bytes, .. } => bytes.len(),
                Piece::Raw { .. } => self.block_size() as usize,
                Piece::Inline { len, compressed } => compressed.as_ref().map_or(*len as usize, Vec::len),
            })
            .sum();
        let any = done.pieces.iter().any(|p| {
            matches!(
                p,
                Piece::Compressed { .. }
                    | Piece::Inline {
                        compressed: Some(_),
                        ..
                    }
            )
        });
        let map = 8 + 16 + f.size.div_ceil(self.block_size()) * format::LCLUSTER_INDEX_SIZE as u64;
        any && bytes as u64 + map < f.size
    }

    /// Takes back every segment handed to the workers.
    fn drain_compressed(&mut self) -> Result<()> {
        while self.take_compressed(true)? {}
        Ok(())
    }

    /// Streams a regular file's body of exactly `size` bytes from `src` as a
    /// chunk-based file: every chunk of `1 << chunk_bits` bytes (the last one may be
    /// shorter) goes to `sink`, which says where it lives. Nothing is written to this
    /// image; the chunk indexes are laid out by [`ImageWriter::finish`].
    pub fn write_file_chunked<R: BufRead + ?Sized>(
        &mut self,
        src: &mut R,
        size: u64,
        sink: &mut dyn ChunkSink,
    ) -> Result<FileData> {
        let bits = self.opts.chunk_bits;
        if !(self.bits..self.bits + 32).contains(&bits) {
            return Err(Error::Unrepresentable(format!("chunk size 2^{bits} out of range")));
        }
        let chunk = 1u64 << bits;
        let n = size.div_ceil(chunk);
        let mut addrs = Vec::with_capacity(n as usize);
        let mut buf = std::mem::take(&mut self.chunk_buf);
        let mut left = size;
        let result = (|| {
            while left > 0 {
                let len = left.min(chunk) as usize;
                buf.resize(len, 0);
                read_exact(src, &mut buf)?;
                addrs.push(sink.put(&buf)?);
                left -= len as u64;
            }
            Ok::<_, Error>(())
        })();
        self.chunk_buf = buf;
        result?;
        Ok(FileData {
            size,
            blkaddr: NULL_ADDR,
            blocks: 0,
            tail: None,
            chunks: Some(addrs.into_boxed_slice()),
            ..Default::default()
        })
    }

    /// Streams a regular file's body of exactly `size` bytes from `src` into the data
    /// area. Ends with `UnexpectedEof` if `src` runs dry first.
    pub fn write_file_data<R: BufRead + ?Sized>(&mut self, src: &mut R, size: u64, meta: &Meta) -> Result<FileData> {
        let inline = self.will_inline_tail(meta, size);
        if size >= self.block_size() || (size > 0 && !inline) {
            // Blocks are appended in submission order: bodies still with the workers go
            // first. A small body joins the queue rather than waiting for them, so that
            // a layer of many small files keeps the workers busy.
            if size <= SEGMENT as u64 && self.pipeline.as_ref().is_some_and(|p| !p.idle()) {
                return self.pass_plain(src, size, meta);
            }
            self.drain_compressed()?;
        }
        self.write_plain(src, size, inline)
    }

    /// Records a body of `size` bytes that goes through the queue in `segments` segments;
    /// returns its index.
    fn queue_file(&mut self, size: u64, meta: &Meta, segments: u32) -> Result<u32> {
        let id = u32::try_from(self.zfiles.len()).map_err(|_| Error::Unrepresentable("too many files".into()))?;
        self.zfiles.push(ZFile {
            size,
            inline_ok: self.will_inline_tail(meta, size),
            segments_left: segments,
            extents: Vec::new(),
            blocks: 0,
            tail: None,
            done: None,
        });
        Ok(id)
    }

    /// Queues a body to be stored plain behind the segments still being compressed.
    fn pass_plain<R: BufRead + ?Sized>(&mut self, src: &mut R, size: u64, meta: &Meta) -> Result<FileData> {
        let mut buf = vec![0u8; size as usize];
        read_exact(src, &mut buf)?;
        let id = self.queue_file(size, meta, 1)?;
        while self.pipeline.as_ref().is_some_and(|p| p.full()) {
            self.take_compressed(true)?;
        }
        // No pieces: `take_compressed` finds it saves nothing and stores it plain.
        self.pipeline.as_mut().expect("not idle").pass(buf);
        self.seg_owner.push_back(id);
        while self.take_compressed(false)? {}
        Ok(FileData::pending(size, id))
    }

    fn write_plain<R: BufRead + ?Sized>(&mut self, src: &mut R, size: u64, inline: bool) -> Result<FileData> {
        if size == 0 {
            return Ok(FileData {
                size,
                blkaddr: NULL_ADDR,
                blocks: 0,
                tail: None,
                ..Default::default()
            });
        }
        let bs = self.block_size();
        let full = size / bs;
        let tail_len = (size % bs) as usize;
        let blocks = full + u64::from(tail_len != 0 && !inline);
        let blkaddr = self.next_block;
        let end = u64::from(blkaddr) + blocks;
        if end > u64::from(u32::MAX) {
            return Err(Error::Unrepresentable("image larger than 16 TiB".into()));
        }
        copy_exact(src, &mut self.out, full * bs)?;
        let tail = if tail_len == 0 {
            None
        } else if inline {
            let mut t = vec![0u8; tail_len];
            read_exact(src, &mut t)?;
            Some(t.into_boxed_slice())
        } else {
            copy_exact(src, &mut self.out, tail_len as u64)?;
            self.out.write_all(&ZEROS[..bs as usize - tail_len])?;
            None
        };
        self.next_block = end as u32;
        Ok(FileData {
            size,
            blkaddr: if full > 0 || tail.is_none() { blkaddr } else { NULL_ADDR },
            blocks: blocks as u32,
            tail,
            ..Default::default()
        })
    }

    /// Lays out and writes everything but file bodies, then the superblock. Returns
    /// the output (positioned at its end) and a summary.
    pub fn finish(mut self, tree: &Tree) -> Result<(W, Summary)> {
        let files = self.settle()?;
        let bs = self.block_size();
        let data_blocks = self.next_block - self.head_blocks() - self.opts.devt_reserve_blocks;
        // The device table's offset is stored in 128-byte units in a 16-bit field, so it
        // must start within the first 8 MiB. It goes, in order of preference: into the
        // head after the superblock (up to 22 devices); into the blocks reserved before
        // the data (`Options::devt_reserve_blocks`); right after the file data, which
        // suits chunk-based images (no file data of their own) of any size.
        let block0 = self.block0_table_start();
        let slots = self.devices.len() * format::DEVICE_SLOT_SIZE;
        let reserved = u64::from(self.opts.devt_reserve_blocks) * bs;
        let (table, devt_slotoff, extra_devices) = if !self.devices.is_empty() && block0 + slots <= HEAD as usize {
            let (mut t, _, n) = self.device_table(block0 as u64)?;
            t.truncate(slots);
            self.pending_block0 = t;
            (Vec::new(), (block0 / format::DEVICE_SLOT_SIZE) as u16, n)
        } else if !self.devices.is_empty() && slots as u64 <= reserved {
            let (t, off, n) = self.device_table(HEAD)?;
            let end = self.out.stream_position()?;
            self.out.seek(SeekFrom::Start(HEAD))?;
            self.out.write_all(&t[..slots])?;
            self.out.seek(SeekFrom::Start(end))?;
            (Vec::new(), off, n)
        } else {
            let devt_offset = u64::from(self.next_block) * bs;
            self.device_table(devt_offset)?
        };
        self.out.write_all(&table)?;
        let plan = Plan::new(
            tree,
            &self.opts,
            self.next_block + (table.len() as u64 / bs) as u32,
            files,
        )?;
        check_devices(tree, &plan, extra_devices)?;
        let (late, meta) = plan.encode_meta(tree);
        self.out.write_all(&late)?;
        self.out.write_all(&meta)?;

        let blocks = u64::from(plan.meta_blkaddr) + meta.len() as u64 / bs;
        let blocks = u32::try_from(blocks).map_err(|_| Error::Unrepresentable("image larger than 16 TiB".into()))?;
        if self.opts.flat_devices && !self.devices.is_empty() {
            // Only now is the image's size known: the slots are written again, in place.
            let mut at = u64::from(blocks);
            for d in &mut self.devices {
                d.mapped_blkaddr =
                    u32::try_from(at).map_err(|_| Error::Unrepresentable("flat device larger than 16 TiB".into()))?;
                at += u64::from(d.blocks);
            }
            u32::try_from(at).map_err(|_| Error::Unrepresentable("flat device larger than 16 TiB".into()))?;
            let t: Vec<u8> = self.devices.iter().flat_map(|d| d.encode()).collect();
            if self.pending_block0.is_empty() {
                let end = self.out.stream_position()?;
                self.out.seek(SeekFrom::Start(
                    u64::from(devt_slotoff) * format::DEVICE_SLOT_SIZE as u64,
                ))?;
                self.out.write_all(&t)?;
                self.out.seek(SeekFrom::Start(end))?;
            } else {
                self.pending_block0 = t;
            }
        }
        let sb = self.superblock(&plan, blocks, extra_devices, devt_slotoff);
        self.out.seek(SeekFrom::Start(format::SUPER_OFFSET))?;
        self.out.write_all(&sb.encode())?;
        self.out.write_all(&self.compr_cfgs())?;
        if !self.pending_block0.is_empty() {
            self.out.seek(SeekFrom::Start(self.block0_table_start() as u64))?;
            let t = std::mem::take(&mut self.pending_block0);
            self.out.write_all(&t)?;
        }
        self.out.seek(SeekFrom::Start(u64::from(blocks) * bs))?;
        self.out.flush()?;
        let summary = self.summary(&plan, blocks, data_blocks, extra_devices);
        Ok((self.out, summary))
    }

    /// Finishes the image in the *metadata-first* layout, for images that are read
    /// over the network before they are whole: the superblock, device table,
    /// directory blocks and inodes fill the first blocks of `out`, and the file bodies
    /// streamed so far into this writer's own output (then only a spool, which must
    /// be readable) follow, copied once. A lazy reader fetches one prefix and can list
    /// and stat the whole tree; file data is fetched as it is read.
    ///
    /// Block addresses of file data are shifted by the size of the metadata, which is
    /// known only now; the plan's sizes do not depend on any address, so the layout
    /// is computed once and the addresses are adjusted as inodes are encoded.
    ///
    /// ```text
    /// head (0..H)      superblock at byte 1024 (the first 4 KiB)
    /// blocks H..T      the device table, when files have chunks on extra devices
    /// blocks T..M      directory blocks and long symlink targets that are not inlined
    /// blocks M..D      meta area: shared xattrs, then inodes
    /// blocks D..       file bodies, in arrival order
    /// ```
    pub fn finish_meta_first<O: Write>(mut self, tree: &Tree, mut out: O) -> Result<(W, O, Summary)>
    where
        W: io::Read,
    {
        if self.opts.devt_reserve_blocks > 0 {
            return Err(Error::Unrepresentable(
                "the metadata-first layout keeps its device table before the data: no reserved blocks".into(),
            ));
        }
        let files = self.settle()?;
        let bs = self.block_size();
        let head = self.head_blocks();
        let data_blocks = self.next_block - head;
        let (table, devt_slotoff, extra_devices) = self.device_table(HEAD)?;
        let mut plan = Plan::new(tree, &self.opts, head + (table.len() as u64 / bs) as u32, files)?;
        check_devices(tree, &plan, extra_devices)?;
        let meta_end = u64::from(plan.meta_blkaddr) + plan.meta_bytes.div_ceil(bs);
        // Data was addressed from the end of the head while it streamed; it now starts
        // at meta_end.
        plan.data_shift = u32::try_from(meta_end - u64::from(head))
            .map_err(|_| Error::Unrepresentable("image larger than 16 TiB".into()))?;
        let (late, meta) = plan.encode_meta(tree);
        debug_assert_eq!(u64::from(plan.meta_blkaddr) * bs + meta.len() as u64, meta_end * bs);
        let blocks = meta_end + u64::from(data_blocks);
        let blocks = u32::try_from(blocks).map_err(|_| Error::Unrepresentable("image larger than 16 TiB".into()))?;
        let sb = self.superblock(&plan, blocks, extra_devices, devt_slotoff);
        let mut block0 = vec![0u8; HEAD as usize];
        let sbb = sb.encode();
        block0[format::SUPER_OFFSET as usize..format::SUPER_OFFSET as usize + sbb.len()].copy_from_slice(&sbb);
        let cfgs = self.compr_cfgs();
        let at = format::SUPER_OFFSET as usize + sbb.len();
        block0[at..at + cfgs.len()].copy_from_slice(&cfgs);
        out.write_all(&block0)?;
        out.write_all(&table)?;
        out.write_all(&late)?;
        out.write_all(&meta)?;
        self.out.flush()?;
        self.out.seek(SeekFrom::Start(HEAD))?;
        let copied = io::copy(
            &mut io::Read::take(&mut self.out, u64::from(data_blocks) * bs),
            &mut out,
        )?;
        if copied != u64::from(data_blocks) * bs {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the data spool is shorter than the data written to it",
            )));
        }
        out.flush()?;
        let mut summary = self.summary(&plan, blocks, data_blocks, extra_devices);
        summary.data_blkaddr = meta_end as u32;
        Ok((self.out, out, summary))
    }

    /// The encoded device table (whole blocks) for a table at byte `offset`, its slot
    /// offset and the number of devices.
    fn device_table(&self, offset: u64) -> Result<(Vec<u8>, u16, u16)> {
        let bs = self.block_size() as usize;
        let devt_blocks = (self.devices.len() * format::DEVICE_SLOT_SIZE).div_ceil(bs);
        let devt_slotoff = if self.devices.is_empty() {
            0
        } else {
            u16::try_from(offset / format::DEVICE_SLOT_SIZE as u64).map_err(|_| {
                Error::Unrepresentable("device table would start beyond 8 MiB: too much data in the image".into())
            })?
        };
        let extra_devices = u16::try_from(self.devices.len())
            .ok()
            .filter(|n| *n < u16::MAX)
            .ok_or_else(|| Error::Unrepresentable("more than 65534 extra devices".into()))?;
        let mut table = Vec::with_capacity(devt_blocks * bs);
        for d in &self.devices {
            table.extend_from_slice(&d.encode());
        }
        table.resize(devt_blocks * bs, 0);
        Ok((table, devt_slotoff, extra_devices))
    }

    /// Takes back every compressed body and returns where each ended up, by
    /// [`FileData::pending`]; stops the workers.
    fn settle(&mut self) -> Result<Vec<FileData>> {
        self.drain_compressed()?;
        self.pipeline = None;
        self.zfiles
            .iter_mut()
            .map(|f| {
                f.done
                    .take()
                    .ok_or_else(|| Error::Io(io::Error::other("a compressed body was never written")))
            })
            .collect()
    }

    /// The compression settings the image's compressed files need, if it has any:
    /// (algorithm, big pclusters).
    /// Where a device table in the head would start: after the superblock and the
    /// compression configurations, on a slot boundary.
    fn block0_table_start(&self) -> usize {
        (format::SUPER_OFFSET as usize + format::SUPER_SIZE + self.compr_cfgs().len())
            .next_multiple_of(format::DEVICE_SLOT_SIZE)
    }

    fn compr_in_use(&self) -> Option<(format::Algorithm, bool)> {
        let z = self.opts.compression.filter(|_| self.compressed_files > 0)?;
        Some((z.codec.algorithm(), z.pcluster_blocks > 1))
    }

    /// Whether the algorithm configurations follow the superblock: for anything but LZ4
    /// with one-block pclusters, which every kernel with EROFS reads without them.
    fn has_cfgs(&self) -> bool {
        self.compr_in_use()
            .is_some_and(|(alg, big)| big || alg != format::Algorithm::Lz4)
    }

    fn compr_features(&self) -> u32 {
        let tails = if self.ztailpacked_files > 0 {
            format::FEATURE_INCOMPAT_ZTAILPACKING
        } else {
            0
        };
        match self.compr_in_use() {
            None => 0,
            Some(_) if self.has_cfgs() => {
                format::FEATURE_INCOMPAT_ZERO_PADDING | format::FEATURE_INCOMPAT_COMPR_CFGS | tails
            }
            Some(_) => format::FEATURE_INCOMPAT_ZERO_PADDING | tails,
        }
    }

    fn compr_algs_field(&self) -> u16 {
        match self.compr_in_use() {
            Some((alg, _)) if self.has_cfgs() => alg.bit(),
            _ => 0,
        }
    }

    /// The configuration records after the superblock (empty without them).
    fn compr_cfgs(&self) -> Vec<u8> {
        match (self.compr_in_use(), self.opts.compression) {
            (Some((alg, _)), Some(z)) if self.has_cfgs() => {
                let pcluster = z.pcluster_blocks.clamp(1, 256) as usize * self.block_size() as usize;
                format::encode_compr_cfgs(
                    alg.bit(),
                    z.pcluster_blocks.clamp(1, 256) as u16,
                    crate::compress::lzma_dict_size(pcluster),
                    crate::compress::zstd_window_log(pcluster),
                )
            }
            _ => Vec::new(),
        }
    }

    fn superblock(&self, plan: &Plan, blocks: u32, extra_devices: u16, devt_slotoff: u16) -> SuperBlock {
        SuperBlock {
            blkszbits: self.bits,
            root_nid: plan.root_nid,
            inos: plan.slots.len() as u64,
            build_time: self.opts.build_time,
            build_time_nsec: self.opts.build_time_nsec,
            blocks,
            meta_blkaddr: plan.meta_blkaddr,
            xattr_blkaddr: plan.meta_blkaddr,
            uuid: self.opts.uuid,
            volume_name: self.opts.volume_name,
            feature_incompat: (if plan.chunked_files > 0 {
                format::FEATURE_INCOMPAT_CHUNKED_FILE
            } else {
                0
            }) | (if extra_devices > 0 {
                format::FEATURE_INCOMPAT_DEVICE_TABLE
            } else {
                0
            }) | self.compr_features(),
            compr_algs: self.compr_algs_field(),
            extra_devices,
            devt_slotoff,
            ..Default::default()
        }
    }

    fn summary(&self, plan: &Plan, blocks: u32, data_blocks: u32, extra_devices: u16) -> Summary {
        Summary {
            inodes: plan.slots.len() as u64,
            blocks,
            bytes: u64::from(blocks) * self.block_size(),
            data_blocks,
            data_blkaddr: self.head_blocks() + self.opts.devt_reserve_blocks,
            meta_blkaddr: plan.meta_blkaddr,
            root_nid: plan.root_nid,
            shared_xattrs: plan.shared_ids.len(),
            chunked_files: plan.chunked_files,
            compressed_files: self.compressed_files,
            tail_packed_files: self.ztailpacked_files,
            devices: extra_devices,
        }
    }
}

/// Refuses chunks addressed to devices the table does not have.
fn check_devices(tree: &Tree, plan: &Plan, extra_devices: u16) -> Result<()> {
    for slot in &plan.slots {
        if let Body::File(FileData { chunks: Some(c), .. }) = &tree.node(slot.id).body {
            if let Some(bad) = c.iter().find(|a| a.blkaddr != NULL_ADDR && a.device > extra_devices) {
                return Err(Error::Unrepresentable(format!(
                    "chunk on device {} but the device table has {extra_devices} entries",
                    bad.device
                )));
            }
        }
    }
    Ok(())
}

/// Padding up to a block of the largest size.
static ZEROS: [u8; BLOCK_SIZE as usize] = [0; BLOCK_SIZE as usize];

fn copy_exact<R: BufRead + ?Sized, W: Write>(src: &mut R, out: &mut W, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let buf = src.fill_buf()?;
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "stream ended inside file data",
            ));
        }
        let take = buf.len().min(n as usize);
        out.write_all(&buf[..take])?;
        src.consume(take);
        n -= take as u64;
    }
    Ok(())
}

fn read_exact<R: BufRead + ?Sized>(src: &mut R, mut dst: &mut [u8]) -> io::Result<()> {
    while !dst.is_empty() {
        let buf = src.fill_buf()?;
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "stream ended inside file data",
            ));
        }
        let take = buf.len().min(dst.len());
        dst[..take].copy_from_slice(&buf[..take]);
        src.consume(take);
        dst = &mut dst[take..];
    }
    Ok(())
}

/// Where one reachable node goes.
struct Slot {
    id: NodeId,
    nid: u64,
    ino: u32,
    nlink: u32,
    /// nid of the parent directory (directories only).
    parent_nid: u64,
    extended: bool,
    xattr_icount: u16,
    /// Shared xattr ids of this node, then its inline xattrs, in order.
    shared: Vec<u32>,
    inline_xattrs: Vec<usize>,
    /// Bytes of inline tail after the xattrs.
    inline_len: usize,
    /// Size of the data (file, directory or symlink target).
    size: u64,
    /// Data blocks in the late area (directories, long symlinks).
    late_blkaddr: u32,
    late_blocks: u32,
    /// Directory only: entries (name, child id) sorted, with "." and "..".
    dir_blocks: Vec<std::ops::Range<usize>>,
}

/// The layout of everything written by `finish`.
struct Plan {
    slots: Vec<Slot>,
    /// NodeId -> index in `slots`.
    index: Vec<u32>,
    shared_area: Vec<u8>,
    shared_ids: HashMap<Xattr, u32>,
    meta_blkaddr: u32,
    meta_bytes: u64,
    root_nid: u16,
    chunked_files: u64,
    chunk_bits: u8,
    /// [`Options::block_bits`].
    bits: u8,
    /// Added to the address of every block of file data in this image (device 0):
    /// non-zero in the metadata-first layout, where the data moves behind the meta.
    data_shift: u32,
    /// Where compressed bodies ended up, by [`FileData::pending`].
    files: Vec<FileData>,
    /// The compressed files' algorithm and whether they may have big pclusters.
    z: Option<(u8, bool)>,
}

/// The settled form of a body that was still being compressed when it was stored.
fn resolve<'a>(files: &'a [FileData], f: &'a FileData) -> &'a FileData {
    match f.pending {
        Some(i) => files.get(i as usize).unwrap_or(f),
        None => f,
    }
}

impl Plan {
    fn new(tree: &Tree, opts: &Options, late_start: u32, files: Vec<FileData>) -> Result<Plan> {
        let (order, nlink, parents) = walk(tree)?;
        let bits = opts.block_bits;
        let bs = 1u64 << bits;

        let mut index = vec![u32::MAX; tree.len()];
        for (i, id) in order.iter().enumerate() {
            index[*id as usize] = i as u32;
        }

        // Values carried by more than one inode are stored once in the shared area.
        let mut uses: HashMap<&Xattr, u32> = HashMap::new();
        for id in &order {
            for x in &tree.node(*id).meta.xattrs {
                *uses.entry(x).or_default() += 1;
            }
        }
        let mut shared_area = Vec::new();
        let mut shared_ids = HashMap::new();
        for id in &order {
            for x in &tree.node(*id).meta.xattrs {
                if uses[x] > 1 && !shared_ids.contains_key(x) {
                    shared_ids.insert(x.clone(), (shared_area.len() / 4) as u32);
                    XattrEntry::encode_into(x.index, &x.suffix, &x.value, &mut shared_area);
                }
            }
        }

        let mut slots = Vec::with_capacity(order.len());
        // Inodes start after the shared area and never at nid 0.
        let mut cursor = (shared_area.len() as u64).max(32).next_multiple_of(32);
        // Unused room at the end of metadata blocks: (bytes, offset).
        let mut holes = std::collections::BTreeSet::<(u64, u64)>::new();
        let mut late_cursor = u64::from(late_start);
        let mut chunked_files = 0;
        for (i, &id) in order.iter().enumerate() {
            let node = tree.node(id);
            let m = &node.meta;
            let mut shared = Vec::new();
            let mut inline_xattrs = Vec::new();
            let mut inline_bytes = 0;
            for (xi, x) in m.xattrs.iter().enumerate() {
                match shared_ids.get(x) {
                    Some(sid) => shared.push(*sid),
                    None => {
                        inline_xattrs.push(xi);
                        inline_bytes += x.entry_size();
                    }
                }
            }
            if shared.len() > 255 {
                return Err(Error::Unrepresentable(
                    "more than 255 shared xattrs on one inode".into(),
                ));
            }
            let icount = format::xattr_icount(shared.len(), inline_bytes);
            let xattr_icount = u16::try_from(icount)
                .map_err(|_| Error::Unrepresentable("xattrs of one inode exceed 256 KiB".into()))?;
            let xattr_size = format::xattr_ibody_size(xattr_icount);

            let mut dir_blocks = Vec::new();
            let mut chunk_index_bytes = 0;
            let mut zmap_bytes = 0;
            let (size, tail_len, late_blocks) = match &node.body {
                Body::File(f) => {
                    let f = resolve(&files, f);
                    if f.compressed.is_some() {
                        // Header, 8 reserved bytes, one index per lcluster.
                        zmap_bytes =
                            format::MAP_HEADER_SIZE + 8 + f.size.div_ceil(bs) as usize * format::LCLUSTER_INDEX_SIZE;
                    }
                    if let Some(c) = &f.chunks {
                        let bits = if f.chunk_bits != 0 {
                            f.chunk_bits
                        } else {
                            opts.chunk_bits
                        };
                        if !(opts.block_bits..opts.block_bits + 32).contains(&bits)
                            || c.len() as u64 != f.size.div_ceil(1u64 << bits)
                        {
                            return Err(Error::Unrepresentable(format!(
                                "{} chunk addresses for {} bytes in chunks of 2^{bits} ({}-byte blocks)",
                                c.len(),
                                f.size,
                                bs
                            )));
                        }
                        chunk_index_bytes = c.len() * format::CHUNK_INDEX_SIZE;
                        chunked_files += 1;
                    }
                    (f.size, f.tail.as_ref().map_or(0, |t| t.len()), 0)
                }
                Body::Symlink(t) => split_data(t.len() as u64, m, xattr_size, bs),
                Body::Dir(children) => {
                    let entries = dir_entries(children, &[]);
                    let (blocks, size) = pack_dir(&entries, bs);
                    dir_blocks = blocks;
                    split_data(size, m, xattr_size, bs)
                }
                _ => (0, 0, 0),
            };
            let nlink_v = nlink[id as usize];
            let extended = m.uid > 0xffff
                || m.gid > 0xffff
                || size > u64::from(u32::MAX)
                || nlink_v > 0xffff
                || m.mtime != opts.build_time
                || m.mtime_nsec != opts.build_time_nsec;
            let isize = if extended {
                format::EXTENDED_INODE_SIZE
            } else {
                format::COMPACT_INODE_SIZE
            };
            // Chunk indexes follow the xattrs at the next 8-byte boundary (inodes are
            // 32-byte aligned and xattr bodies a multiple of 4).
            let total = if chunk_index_bytes > 0 {
                ((isize + xattr_size).next_multiple_of(format::CHUNK_INDEX_SIZE) + chunk_index_bytes) as u64
            } else if zmap_bytes > 0 {
                format::map_header_start((isize + xattr_size) as u64) + (zmap_bytes + tail_len) as u64
            } else {
                (isize + xattr_size + tail_len) as u64
            };
            // An inline tail must sit in the same block as its inode; keep every small
            // inode within one block so readers never straddle. The room a small inode
            // leaves at a block's end when it does not fit is kept for a later one that
            // does (the smallest room that fits, as erofs-utils' buffer manager picks):
            // with inline tails, inodes run up to a block long and that room adds up.
            let need = total.next_multiple_of(32);
            let at = match holes.range((total, 0)..).next().copied() {
                Some((room, at)) if total <= bs => {
                    holes.remove(&(room, at));
                    if room > need {
                        holes.insert((room - need, at + need));
                    }
                    at
                }
                _ => {
                    let rest = bs - cursor % bs;
                    if total <= bs && total > rest {
                        if (32..bs).contains(&rest) {
                            holes.insert((rest, cursor));
                        }
                        cursor = cursor.next_multiple_of(bs);
                    }
                    let at = cursor;
                    cursor += need;
                    at
                }
            };
            let nid = at >> format::ISLOT_BITS;
            let late_blkaddr = if late_blocks > 0 { late_cursor as u32 } else { NULL_ADDR };
            late_cursor += u64::from(late_blocks);
            slots.push(Slot {
                id,
                nid,
                ino: i as u32 + 1,
                nlink: nlink_v,
                parent_nid: 0,
                extended,
                xattr_icount,
                shared,
                inline_xattrs,
                inline_len: tail_len,
                size,
                late_blkaddr,
                late_blocks,
                dir_blocks,
            });
        }
        for (i, slot) in slots.iter_mut().enumerate() {
            slot.parent_nid = u64::from(parents[i]);
        }
        // parents[] holds slot indexes; turn them into nids.
        let nids: Vec<u64> = slots.iter().map(|s| s.nid).collect();
        for slot in &mut slots {
            slot.parent_nid = nids[slot.parent_nid as usize];
        }
        let root_nid = u16::try_from(slots[0].nid)
            .map_err(|_| Error::Unrepresentable("shared xattr area too large for the root nid".into()))?;
        let meta_blkaddr =
            u32::try_from(late_cursor).map_err(|_| Error::Unrepresentable("image larger than 16 TiB".into()))?;
        Ok(Plan {
            slots,
            index,
            shared_area,
            shared_ids,
            meta_blkaddr,
            meta_bytes: cursor,
            root_nid,
            chunked_files,
            chunk_bits: opts.chunk_bits,
            bits,
            data_shift: 0,
            files,
            z: opts
                .compression
                .map(|z| (z.codec.algorithm() as u8, z.pcluster_blocks > 1)),
        })
    }

    /// A data block address as stored: blocks of this image's own data move with
    /// [`Plan::data_shift`]; holes and other devices' blocks stay.
    fn shift(&self, device: u16, blkaddr: u32) -> u32 {
        if device == 0 && blkaddr != NULL_ADDR {
            blkaddr + self.data_shift
        } else {
            blkaddr
        }
    }

    /// The late area (directory blocks, long symlinks) and the meta area (shared
    /// xattrs, inodes), each padded to whole blocks.
    fn encode_meta(&self, tree: &Tree) -> (Vec<u8>, Vec<u8>) {
        // A directory with both full blocks and an inline tail keeps its tail here, so
        // its entries are laid out once.
        let mut late = Vec::new();
        let mut tails: Vec<Option<Vec<u8>>> = vec![None; self.slots.len()];
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.late_blocks == 0 {
                continue;
            }
            let mut bytes = self.late_bytes(tree, slot);
            let full = slot.late_blocks as usize * self.bs();
            let n = full.min(bytes.len());
            late.extend_from_slice(&bytes[..n]);
            late.resize(late.len() + full - n, 0);
            if slot.inline_len > 0 {
                tails[i] = Some(bytes.split_off(bytes.len() - slot.inline_len));
            }
        }
        let meta_len = self.meta_bytes.next_multiple_of(self.bs() as u64);
        let mut meta = vec![0u8; meta_len as usize];
        meta[..self.shared_area.len()].copy_from_slice(&self.shared_area);
        // Inodes are not in nid order (small ones fill earlier blocks' ends). Each is
        // encoded on its own: its alignments are relative to its start, a multiple of 32.
        let mut one = Vec::new();
        for (slot, tail) in self.slots.iter().zip(&tails) {
            one.clear();
            self.encode_inode(tree, slot, tail.as_deref(), &mut one);
            let at = (slot.nid as usize) << format::ISLOT_BITS;
            meta[at..at + one.len()].copy_from_slice(&one);
        }
        (late, meta)
    }

    /// The block size in bytes.
    fn bs(&self) -> usize {
        1 << self.bits
    }

    fn nid_of(&self, id: NodeId) -> u64 {
        self.slots[self.index[id as usize] as usize].nid
    }

    /// The bytes of a directory or symlink (the whole data, tail included).
    fn late_bytes(&self, tree: &Tree, slot: &Slot) -> Vec<u8> {
        match &tree.node(slot.id).body {
            Body::Symlink(t) => t.to_vec(),
            Body::Dir(children) => self.dir_bytes(tree, children, slot),
            _ => Vec::new(),
        }
    }

    fn dir_bytes(&self, tree: &Tree, children: &BTreeMap<Box<[u8]>, NodeId>, slot: &Slot) -> Vec<u8> {
        let dots: [(&[u8], Option<u64>, u8); 2] = [
            (b".", Some(slot.nid), format::ft::DIR),
            (b"..", Some(slot.parent_nid), format::ft::DIR),
        ];
        let entries = dir_entries(children, &dots);
        let bs = self.bs();
        let mut out = Vec::with_capacity(slot.dir_blocks.len() * bs);
        for (bi, range) in slot.dir_blocks.iter().enumerate() {
            let start = out.len();
            let ents = &entries[range.clone()];
            let mut nameoff = ents.len() * format::DIRENT_SIZE;
            for e in ents {
                let (nid, ft) = match e.1 {
                    DirTarget::Node(id) => (self.nid_of(id), format::file_type_of(tree.node(id).body.type_bits())),
                    DirTarget::Fixed(nid, ft) => (nid, ft),
                };
                out.extend_from_slice(
                    &Dirent {
                        nid,
                        nameoff: nameoff as u16,
                        file_type: ft,
                    }
                    .encode(),
                );
                nameoff += e.0.len();
            }
            for e in ents {
                out.extend_from_slice(e.0);
            }
            if bi + 1 < slot.dir_blocks.len() {
                out.resize(start + bs, 0);
            }
        }
        out
    }

    /// Appends the inode, its xattrs and its inline tail (`tail` when the caller has
    /// it already; otherwise it is laid out here).
    fn encode_inode(&self, tree: &Tree, slot: &Slot, tail: Option<&[u8]>, out: &mut Vec<u8>) {
        let node = tree.node(slot.id);
        let m = &node.meta;
        let (layout, i_u) = match &node.body {
            Body::File(FileData {
                chunks: Some(_),
                chunk_bits,
                ..
            }) => {
                let bits = if *chunk_bits != 0 { *chunk_bits } else { self.chunk_bits };
                (
                    DataLayout::ChunkBased,
                    u32::from(format::CHUNK_FORMAT_INDEXES) | u32::from(bits - self.bits),
                )
            }
            Body::File(f) if resolve(&self.files, f).compressed.is_some() => {
                (DataLayout::CompressedFull, resolve(&self.files, f).blocks)
            }
            Body::File(f) => {
                let f = resolve(&self.files, f);
                let addr = self.shift(0, f.blkaddr);
                if f.tail.is_some() {
                    (DataLayout::FlatInline, addr)
                } else {
                    (DataLayout::FlatPlain, addr)
                }
            }
            Body::Dir(_) | Body::Symlink(_) => {
                let layout = if slot.inline_len > 0 {
                    DataLayout::FlatInline
                } else {
                    DataLayout::FlatPlain
                };
                (layout, slot.late_blkaddr)
            }
            Body::CharDev(ma, mi) | Body::BlockDev(ma, mi) => (DataLayout::FlatPlain, format::encode_dev(*ma, *mi)),
            Body::Fifo | Body::Socket => (DataLayout::FlatPlain, 0),
        };
        let inode = Inode {
            extended: slot.extended,
            layout,
            xattr_icount: slot.xattr_icount,
            mode: node.body.type_bits() | (m.perm & 0o7777),
            nlink: slot.nlink,
            size: slot.size,
            i_u,
            ino: slot.ino,
            uid: m.uid,
            gid: m.gid,
            mtime: m.mtime,
            mtime_nsec: m.mtime_nsec,
        };
        inode.encode_into(out);
        if slot.xattr_icount > 0 {
            out.extend_from_slice(
                &XattrIbodyHeader {
                    shared_count: slot.shared.len() as u8,
                }
                .encode(),
            );
            for id in &slot.shared {
                out.extend_from_slice(&id.to_le_bytes());
            }
            for &xi in &slot.inline_xattrs {
                let x = &m.xattrs[xi];
                XattrEntry::encode_into(x.index, &x.suffix, &x.value, out);
            }
        }
        if let Body::File(FileData { chunks: Some(c), .. }) = &node.body {
            out.resize(out.len().next_multiple_of(format::CHUNK_INDEX_SIZE), 0);
            for a in c.iter() {
                let index = ChunkIndex {
                    // Holes name no device, as mkfs.erofs writes them.
                    device_id: if a.blkaddr == NULL_ADDR { 0 } else { a.device },
                    blkaddr: self.shift(a.device, a.blkaddr),
                };
                out.extend_from_slice(&index.encode());
            }
        }
        if let Body::File(f) = &node.body {
            if let (Some(extents), Some((alg, big))) = (&resolve(&self.files, f).compressed, self.z) {
                let start = out.len();
                out.resize(start.next_multiple_of(8), 0);
                let tail = slot.inline_len as u16;
                let header = MapHeader {
                    advise: if big { format::z_advise::BIG_PCLUSTER_1 } else { 0 }
                        | if tail > 0 { format::z_advise::INLINE_PCLUSTER } else { 0 },
                    idata_size: tail,
                    algorithm_head1: alg,
                    ..Default::default()
                };
                out.extend_from_slice(&header.encode());
                out.extend_from_slice(&[0; 8]);
                let indexes = zmap::full_indexes(extents, self.bits, big, self.data_shift);
                debug_assert_eq!(indexes.len() as u64, slot.size.div_ceil(self.bs() as u64));
                for i in indexes {
                    out.extend_from_slice(&i.encode());
                }
            }
        }
        if slot.inline_len > 0 {
            match (&node.body, tail) {
                (Body::File(f), _) => {
                    out.extend_from_slice(resolve(&self.files, f).tail.as_deref().unwrap_or_default())
                }
                (_, Some(t)) => out.extend_from_slice(t),
                (_, None) => {
                    let bytes = self.late_bytes(tree, slot);
                    out.extend_from_slice(&bytes[bytes.len() - slot.inline_len..]);
                }
            }
        }
    }
}

/// Splits in-memory data (directory, symlink) into late blocks and an inline tail,
/// inlined whenever it fits ([`Options::inline_data`] is about regular files only):
/// returns (size, inline tail length, late blocks) for blocks of `bs` bytes.
fn split_data(size: u64, m: &Meta, xattr_size: usize, bs: u64) -> (u64, usize, u32) {
    let tail = (size % bs) as usize;
    let full = (size / bs) as u32;
    // Same worst case as for files, so the decision never depends on the inode
    // layout chosen a moment later.
    let fits = tail != 0 && format::EXTENDED_INODE_SIZE + xattr_size.max(m.xattr_upper_bound()) + tail <= bs as usize;
    if fits {
        (size, tail, full)
    } else {
        (size, 0, size.div_ceil(bs) as u32)
    }
}

#[derive(Clone, Copy)]
enum DirTarget {
    Node(NodeId),
    Fixed(u64, u8),
}

/// All entries of a directory, sorted byte-wise as the kernel's lookup requires,
/// "." and ".." included at their sorted place.
fn dir_entries<'a>(
    children: &'a BTreeMap<Box<[u8]>, NodeId>,
    dots: &[(&'a [u8], Option<u64>, u8)],
) -> Vec<(&'a [u8], DirTarget)> {
    let dots: Vec<(&[u8], DirTarget)> = if dots.is_empty() {
        vec![
            (b".", DirTarget::Fixed(0, format::ft::DIR)),
            (b"..", DirTarget::Fixed(0, format::ft::DIR)),
        ]
    } else {
        dots.iter()
            .map(|(n, nid, ft)| (*n, DirTarget::Fixed(nid.unwrap_or(0), *ft)))
            .collect()
    };
    let mut v: Vec<(&[u8], DirTarget)> = Vec::with_capacity(children.len() + 2);
    let mut dots = dots.into_iter().peekable();
    for (name, &id) in children {
        while let Some(d) = dots.peek() {
            if d.0 < &name[..] {
                v.push(dots.next().unwrap());
            } else {
                break;
            }
        }
        v.push((name, DirTarget::Node(id)));
    }
    v.extend(dots);
    v
}

/// Packs sorted entries into directory blocks of `bs` bytes (the kernel reads a
/// directory block by block, each starting with its own dirents): returns each block's
/// entry range and the directory size (full blocks plus the used part of the last one).
fn pack_dir(entries: &[(&[u8], DirTarget)], bs: u64) -> (Vec<std::ops::Range<usize>>, u64) {
    let mut blocks = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (i, e) in entries.iter().enumerate() {
        let need = format::DIRENT_SIZE + e.0.len();
        if used + need > bs as usize {
            blocks.push(start..i);
            start = i;
            used = 0;
        }
        used += need;
    }
    blocks.push(start..entries.len());
    let size = (blocks.len() as u64 - 1) * bs + used as u64;
    (blocks, size)
}

/// Depth-first order of reachable nodes (root first, children by name), link counts
/// by NodeId, and each slot's parent slot index.
fn walk(tree: &Tree) -> Result<(Vec<NodeId>, Vec<u32>, Vec<u32>)> {
    let mut nlink = vec![0u32; tree.len()];
    let mut seen = vec![false; tree.len()];
    let mut order = Vec::new();
    let mut parents = Vec::new();
    // (node, parent slot index)
    let mut stack: Vec<(NodeId, u32)> = vec![(tree.root(), 0)];
    seen[0] = true;
    while let Some((id, parent)) = stack.pop() {
        let slot = order.len() as u32;
        order.push(id);
        parents.push(if id == tree.root() { slot } else { parent });
        if let Body::Dir(children) = &tree.node(id).body {
            let mut subdirs = 0u32;
            // Reverse so the stack pops children in name order.
            for (name, &c) in children.iter().rev() {
                // The writer adds `.` and `..` itself; a child by either name would be a
                // second record the kernel's lookup may pick (and fsck.erofs rejects), and
                // the others are names no directory can hold.
                if name.is_empty()
                    || &name[..] == b"."
                    || &name[..] == b".."
                    || name.len() > format::NAME_LEN
                    || name.iter().any(|&b| b == b'/' || b == 0)
                {
                    return Err(Error::Unrepresentable(format!(
                        "invalid directory entry name {:?}",
                        String::from_utf8_lossy(name)
                    )));
                }
                let child = tree.node(c);
                if child.is_dir() {
                    subdirs += 1;
                    if seen[c as usize] {
                        return Err(Error::Unrepresentable("directory linked twice".into()));
                    }
                } else {
                    nlink[c as usize] += 1;
                    if seen[c as usize] {
                        continue;
                    }
                }
                seen[c as usize] = true;
                stack.push((c, slot));
            }
            nlink[id as usize] = 2 + subdirs;
        }
    }
    for (&id, &n) in &tree.min_nlink {
        let v = &mut nlink[id as usize];
        if *v > 0 && !tree.node(id).is_dir() {
            *v = (*v).max(n);
        }
    }
    Ok((order, nlink, parents))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn meta(perm: u16) -> Meta {
        Meta {
            perm,
            ..Default::default()
        }
    }

    #[test]
    fn dir_entries_sort_dots_in_place() {
        let mut c = BTreeMap::new();
        c.insert(b"-a".to_vec().into_boxed_slice(), 1);
        c.insert(b"a".to_vec().into_boxed_slice(), 2);
        let names: Vec<&[u8]> = dir_entries(&c, &[]).iter().map(|e| e.0).collect();
        assert_eq!(names, vec![&b"-a"[..], b".", b"..", b"a"]);
    }

    #[test]
    fn pack_dir_splits_blocks() {
        let names: Vec<Vec<u8>> = (0..1000).map(|i| format!("name-{i:05}").into_bytes()).collect();
        let entries: Vec<(&[u8], DirTarget)> = names.iter().map(|n| (&n[..], DirTarget::Fixed(0, 1))).collect();
        let (blocks, size) = pack_dir(&entries, BLOCK_SIZE);
        let per_block = BLOCK_SIZE as usize / (12 + 10);
        assert_eq!(blocks[0], 0..per_block);
        assert_eq!(blocks.len(), 1000usize.div_ceil(per_block));
        assert_eq!(
            size,
            (blocks.len() as u64 - 1) * BLOCK_SIZE + (1000 % per_block) as u64 * 22
        );
    }

    #[test]
    fn small_image_has_superblock_and_root() {
        let mut tree = Tree::new(meta(0o755));
        let mut w = ImageWriter::new(Cursor::new(Vec::new()), Options::default()).unwrap();
        let m = meta(0o644);
        let data = w.write_file_data(&mut &b"hello"[..], 5, &m).unwrap();
        assert!(data.tail.is_some());
        let f = tree.add(Node {
            meta: m,
            body: Body::File(data),
        });
        tree.link(0, b"hello.txt", f);
        let (out, summary) = w.finish(&tree).unwrap();
        let img = out.into_inner();
        assert_eq!(img.len() as u64, summary.bytes);
        let sb = SuperBlock::decode(&img[1024..]).unwrap();
        assert_eq!(sb.inos, 2);
        assert_eq!(sb.root_nid, 1);
    }

    #[test]
    fn truncated_body_is_an_error() {
        let mut w = ImageWriter::new(Cursor::new(Vec::new()), Options::default()).unwrap();
        let err = w.write_file_data(&mut &b"abc"[..], 10, &meta(0o644)).unwrap_err();
        assert!(matches!(err, Error::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof));
    }
}
