//! The EROFS on-disk format, as one module (after erofs-utils' `include/erofs_fs.h`).
//!
//! Every structure is little-endian and is encoded/decoded by hand into byte arrays:
//! the layout is the contract with the kernel, so it is spelled out field by field
//! with its byte offset rather than left to a `repr(C)` struct and `unsafe` casts.

use std::mem::{offset_of, size_of};

/// Byte offset of the superblock inside block 0 (room for x86 boot sectors).
pub const SUPER_OFFSET: u64 = 1024;
/// Superblock magic number (`EROFS_SUPER_MAGIC_V1`).
pub const SUPER_MAGIC: u32 = 0xE0F5_E1E2;
/// log2 of [`BLOCK_SIZE`].
pub const BLKSZBITS: u8 = 12;
/// The block size this project writes: 4 KiB, the page size the kernel wants on the
/// platforms we run on. The reader accepts any size the kernel does (see the superblock's
/// `blkszbits`).
pub const BLOCK_SIZE: u64 = 1 << BLKSZBITS;
/// Inode slots are 32 bytes: `nid * 32` is an inode's offset from `meta_blkaddr`.
pub const ISLOT_BITS: u32 = 5;
/// Longest file name the kernel accepts.
pub const NAME_LEN: usize = 255;
/// A block address meaning "no block": a hole in a chunk index or block map, and the
/// `raw_blkaddr` of files without data blocks. `EROFS_NULL_ADDR` is -1, and the
/// address fields this project uses are 32 bits wide.
pub const NULL_ADDR: u32 = u32::MAX;

/// Superblock checksum is present (`EROFS_FEATURE_COMPAT_SB_CHKSUM`).
pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x1;
/// Compact inodes carry their own mtime (`EROFS_FEATURE_COMPAT_MTIME`).
pub const FEATURE_COMPAT_MTIME: u32 = 0x2;

/// Compressed data is zero-padded at the front (`EROFS_FEATURE_INCOMPAT_ZERO_PADDING`).
pub const FEATURE_INCOMPAT_ZERO_PADDING: u32 = 0x1;
/// Compression configurations follow the superblock (`EROFS_FEATURE_INCOMPAT_COMPR_CFGS`);
/// the same bit as `BIG_PCLUSTER`.
pub const FEATURE_INCOMPAT_COMPR_CFGS: u32 = 0x2;
/// Physical clusters of more than one block (`EROFS_FEATURE_INCOMPAT_BIG_PCLUSTER`); the
/// same bit as `COMPR_CFGS`, so an image with big pclusters always has configurations.
pub const FEATURE_INCOMPAT_BIG_PCLUSTER: u32 = 0x2;
/// Chunk-based files (`EROFS_FEATURE_INCOMPAT_CHUNKED_FILE`).
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
/// Extra devices and a device table (`EROFS_FEATURE_INCOMPAT_DEVICE_TABLE`); the same bit
/// as `COMPR_HEAD2`, which only means something to compressed inodes.
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;
/// Compressed tails packed after the inode (`EROFS_FEATURE_INCOMPAT_ZTAILPACKING`).
pub const FEATURE_INCOMPAT_ZTAILPACKING: u32 = 0x10;
/// Compressed fragments in a packed inode (`EROFS_FEATURE_INCOMPAT_FRAGMENTS`).
pub const FEATURE_INCOMPAT_FRAGMENTS: u32 = 0x20;
/// Long xattr name prefixes (`EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES`).
pub const FEATURE_INCOMPAT_XATTR_PREFIXES: u32 = 0x40;
/// 48-bit block addresses (`EROFS_FEATURE_INCOMPAT_48BIT`).
pub const FEATURE_INCOMPAT_48BIT: u32 = 0x80;
/// Metadata in a metabox inode (`EROFS_FEATURE_INCOMPAT_METABOX`).
pub const FEATURE_INCOMPAT_METABOX: u32 = 0x100;
/// The incompatible features the reader understands and the writer may set. An image
/// with any other bit needs a decoder this crate does not have: reading it as if the bit
/// were clear would misread addresses or names, so the reader refuses it instead.
///
/// The compression bits are in: they change only how compressed inodes' data is laid
/// out, never the metadata, so a compressed image (a native EROFS layer made with
/// `mkfs.erofs -z…`) can still be opened, listed and counted; reading a compressed
/// inode's data is refused inode by inode.
pub const FEATURE_INCOMPAT_SUPPORTED: u32 = FEATURE_INCOMPAT_CHUNKED_FILE
    | FEATURE_INCOMPAT_DEVICE_TABLE
    | FEATURE_INCOMPAT_ZERO_PADDING
    | FEATURE_INCOMPAT_COMPR_CFGS
    | FEATURE_INCOMPAT_ZTAILPACKING
    | FEATURE_INCOMPAT_FRAGMENTS;

/// `i_format` bit 0: 0 = compact, 1 = extended inode (`EROFS_INODE_LAYOUT_EXTENDED`).
pub const INODE_LAYOUT_EXTENDED: u16 = 1;
/// `i_format` bits 1..=3 hold the data layout (`EROFS_I_DATALAYOUT_BIT`).
pub const INODE_DATALAYOUT_BIT: u16 = 1;
/// Mask of the data layout after shifting (`EROFS_I_DATALAYOUT_MASK`).
pub const INODE_DATALAYOUT_MASK: u16 = 0x7;

/// Where an inode's data is (`i_format` bits 1..=3; erofs_fs.h's `EROFS_INODE_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum DataLayout {
    /// Contiguous blocks from `raw_blkaddr`, the last one padded (`EROFS_INODE_FLAT_PLAIN`).
    #[default]
    FlatPlain = 0,
    /// Compressed, with full lcluster indexes (`EROFS_INODE_COMPRESSED_FULL`).
    CompressedFull = 1,
    /// Full blocks plus a tail packed right after the inode and its xattrs
    /// (`EROFS_INODE_FLAT_INLINE`).
    FlatInline = 2,
    /// Compressed, with compacted lcluster indexes (`EROFS_INODE_COMPRESSED_COMPACT`).
    CompressedCompact = 3,
    /// Data in chunks addressed by a per-inode index (`EROFS_INODE_CHUNK_BASED`).
    ChunkBased = 4,
}

impl DataLayout {
    /// The layout with this on-disk number; `None` for the reserved 5..=7.
    pub const fn from_raw(v: u16) -> Option<DataLayout> {
        Some(match v {
            0 => DataLayout::FlatPlain,
            1 => DataLayout::CompressedFull,
            2 => DataLayout::FlatInline,
            3 => DataLayout::CompressedCompact,
            4 => DataLayout::ChunkBased,
            _ => return None,
        })
    }

    /// The on-disk number.
    pub const fn raw(self) -> u16 {
        self as u16
    }

    /// Whether the data is compressed (`erofs_inode_is_data_compressed`).
    pub const fn is_compressed(self) -> bool {
        matches!(self, DataLayout::CompressedFull | DataLayout::CompressedCompact)
    }
}

/// Chunk format (`i_u.c.format`): the index holds 8-byte [`ChunkIndex`] entries with a
/// device id rather than a 4-byte block map (`EROFS_CHUNK_FORMAT_INDEXES`).
pub const CHUNK_FORMAT_INDEXES: u16 = 0x20;
/// Chunk format: low 5 bits are log2(chunk size) - block size bits
/// (`EROFS_CHUNK_FORMAT_BLKBITS_MASK`).
pub const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x1f;
/// The chunk format bits this crate knows; 48-bit chunk addresses are not among them.
pub const CHUNK_FORMAT_ALL: u16 = CHUNK_FORMAT_INDEXES | CHUNK_FORMAT_BLKBITS_MASK;
/// Size of a block map entry: the 4-byte block address array chunk-based files use
/// without `CHUNK_FORMAT_INDEXES` (`EROFS_BLOCK_MAP_ENTRY_SIZE`).
pub const BLOCK_MAP_ENTRY_SIZE: usize = 4;

/// The on-disk structures, field by field as erofs_fs.h declares them.
///
/// Fields are byte arrays (little-endian on disk), so the structs have alignment 1 and no
/// padding: their sizes and field offsets are exactly the on-disk ones. The codecs below
/// take every offset from here (`offset_of!`) and every size is checked at compile time
/// against erofs_fs.h, so a misplaced field cannot go unnoticed. They are never read or
/// written through a cast; they only describe the layout.
pub mod raw {
    type Le16 = [u8; 2];
    type Le32 = [u8; 4];
    type Le64 = [u8; 8];

    /// `struct erofs_super_block`, the 128 bytes every version has. Newer formats put
    /// fields of the 48-bit and metabox features into `reserved2`; images using them carry
    /// incompatible feature bits, which the reader refuses.
    #[repr(C)]
    pub struct SuperBlock {
        /// `magic`
        pub magic: Le32,
        /// `checksum`: crc32c of the superblock block from byte 1024.
        pub checksum: Le32,
        /// `feature_compat`
        pub feature_compat: Le32,
        /// `blkszbits`
        pub blkszbits: u8,
        /// `sb_extslots`: 16-byte slots following the superblock.
        pub sb_extslots: u8,
        /// `root_nid` (`rootnid_2b`)
        pub root_nid: Le16,
        /// `inos`
        pub inos: Le64,
        /// `build_time` (`epoch`)
        pub build_time: Le64,
        /// `build_time_nsec` (`fixed_nsec`)
        pub build_time_nsec: Le32,
        /// `blocks` (`blocks_lo`)
        pub blocks: Le32,
        /// `meta_blkaddr`
        pub meta_blkaddr: Le32,
        /// `xattr_blkaddr`
        pub xattr_blkaddr: Le32,
        /// `uuid`
        pub uuid: [u8; 16],
        /// `volume_name`
        pub volume_name: [u8; 16],
        /// `feature_incompat`
        pub feature_incompat: Le32,
        /// `available_compr_algs` / `lz4_max_distance`
        pub u1: Le16,
        /// `extra_devices`
        pub extra_devices: Le16,
        /// `devt_slotoff`
        pub devt_slotoff: Le16,
        /// `dirblkbits`
        pub dirblkbits: u8,
        /// `xattr_prefix_count`
        pub xattr_prefix_count: u8,
        /// `xattr_prefix_start`
        pub xattr_prefix_start: Le32,
        /// `packed_nid`
        pub packed_nid: Le64,
        /// `xattr_filter_reserved`
        pub xattr_filter_reserved: u8,
        /// `reserved`
        pub reserved: [u8; 3],
        /// Reserved here; `build_time`, `rootnid_8b` and `reserved2` in newer formats.
        pub reserved2: [u8; 20],
    }

    /// `struct erofs_inode_compact`
    #[repr(C)]
    pub struct InodeCompact {
        /// `i_format`
        pub i_format: Le16,
        /// `i_xattr_icount`
        pub i_xattr_icount: Le16,
        /// `i_mode`
        pub i_mode: Le16,
        /// `i_nlink` (`i_nb`)
        pub i_nlink: Le16,
        /// `i_size`
        pub i_size: Le32,
        /// `i_mtime` in newer formats (with `FEATURE_COMPAT_MTIME`), reserved before.
        pub i_mtime: Le32,
        /// `i_u`: `raw_blkaddr`, `rdev` or the chunk info.
        pub i_u: Le32,
        /// `i_ino`
        pub i_ino: Le32,
        /// `i_uid`
        pub i_uid: Le16,
        /// `i_gid`
        pub i_gid: Le16,
        /// `i_reserved`
        pub i_reserved: Le32,
    }

    /// `struct erofs_inode_extended`
    #[repr(C)]
    pub struct InodeExtended {
        /// `i_format`
        pub i_format: Le16,
        /// `i_xattr_icount`
        pub i_xattr_icount: Le16,
        /// `i_mode`
        pub i_mode: Le16,
        /// `i_nb` (reserved here)
        pub i_nb: Le16,
        /// `i_size`
        pub i_size: Le64,
        /// `i_u`: `raw_blkaddr`, `rdev` or the chunk info.
        pub i_u: Le32,
        /// `i_ino`
        pub i_ino: Le32,
        /// `i_uid`
        pub i_uid: Le32,
        /// `i_gid`
        pub i_gid: Le32,
        /// `i_mtime`
        pub i_mtime: Le64,
        /// `i_mtime_nsec`
        pub i_mtime_nsec: Le32,
        /// `i_nlink`
        pub i_nlink: Le32,
        /// `i_reserved2`
        pub i_reserved2: [u8; 16],
    }

    /// `struct erofs_inode_chunk_info`, the `i_u` of chunk-based inodes.
    #[repr(C)]
    pub struct ChunkInfo {
        /// `format`: `CHUNK_FORMAT_*`.
        pub format: Le16,
        /// `reserved`
        pub reserved: Le16,
    }

    /// `struct erofs_inode_chunk_index`
    #[repr(C)]
    pub struct ChunkIndex {
        /// `startblk_hi` (48-bit addressing only; `advise` before).
        pub startblk_hi: Le16,
        /// `device_id`
        pub device_id: Le16,
        /// `startblk_lo` (`blkaddr`)
        pub startblk_lo: Le32,
    }

    /// `struct erofs_dirent`
    #[repr(C)]
    pub struct Dirent {
        /// `nid`
        pub nid: Le64,
        /// `nameoff`
        pub nameoff: Le16,
        /// `file_type`
        pub file_type: u8,
        /// `reserved`
        pub reserved: u8,
    }

    /// `struct erofs_xattr_ibody_header`, followed by `h_shared_count` 4-byte ids.
    #[repr(C)]
    pub struct XattrIbodyHeader {
        /// `h_name_filter` (`h_reserved` before the xattr filter feature).
        pub h_name_filter: Le32,
        /// `h_shared_count`
        pub h_shared_count: u8,
        /// `h_reserved2`
        pub h_reserved2: [u8; 7],
    }

    /// `struct erofs_xattr_entry`, followed by the name suffix and the value.
    #[repr(C)]
    pub struct XattrEntry {
        /// `e_name_len`
        pub e_name_len: u8,
        /// `e_name_index`
        pub e_name_index: u8,
        /// `e_value_size`
        pub e_value_size: Le16,
    }

    /// `struct z_erofs_map_header`: after a compressed inode and its xattrs, at the next
    /// 8-byte boundary.
    #[repr(C)]
    pub struct MapHeader {
        /// `h_reserved1` (the low half of `h_fragmentoff` with fragments).
        pub h_reserved1: Le16,
        /// `h_idata_size`: bytes of the compressed tail packed inline (`ZTAILPACKING`).
        pub h_idata_size: Le16,
        /// `h_advise`: `Z_EROFS_ADVISE_*`.
        pub h_advise: Le16,
        /// `h_algorithmtype`: bits 0..=3 the HEAD1 algorithm, 4..=7 the HEAD2 one.
        pub h_algorithmtype: u8,
        /// `h_clusterbits`: bits 0..=3 log2(lcluster size) - block size bits; bit 7 the
        /// whole file is a fragment.
        pub h_clusterbits: u8,
    }

    /// `struct z_erofs_lcluster_index`, one per logical cluster of a
    /// `COMPRESSED_FULL` inode.
    #[repr(C)]
    pub struct LclusterIndex {
        /// `di_advise`: the lcluster type in bits 0..=1, plus `Z_EROFS_LI_*` flags.
        pub di_advise: Le16,
        /// `di_clusterofs`: where the extent starting here begins inside the lcluster.
        pub di_clusterofs: Le16,
        /// `di_u`: the pcluster's block address (heads) or `delta[2]` (non-heads).
        pub di_u: Le32,
    }

    /// `struct erofs_deviceslot`
    #[repr(C)]
    pub struct DeviceSlot {
        /// `tag`
        pub tag: [u8; 64],
        /// `blocks_lo`
        pub blocks: Le32,
        /// `uniaddr_lo` (`mapped_blkaddr`)
        pub mapped_blkaddr: Le32,
        /// `blocks_hi` (48-bit addressing only)
        pub blocks_hi: Le32,
        /// `uniaddr_hi` (48-bit addressing only)
        pub uniaddr_hi: Le16,
        /// `reserved`
        pub reserved: [u8; 50],
    }
}

// The sizes erofs_fs.h checks with BUILD_BUG_ON (erofs_check_ondisk_layout_definitions).
const _: () = assert!(size_of::<raw::SuperBlock>() == 128);
const _: () = assert!(size_of::<raw::InodeCompact>() == 32);
const _: () = assert!(size_of::<raw::InodeExtended>() == 64);
const _: () = assert!(size_of::<raw::ChunkInfo>() == 4);
const _: () = assert!(size_of::<raw::ChunkIndex>() == 8);
const _: () = assert!(size_of::<raw::Dirent>() == 12);
const _: () = assert!(size_of::<raw::XattrIbodyHeader>() == 12);
const _: () = assert!(size_of::<raw::XattrEntry>() == 4);
const _: () = assert!(size_of::<raw::DeviceSlot>() == 128);
const _: () = assert!(size_of::<raw::MapHeader>() == 8);
const _: () = assert!(size_of::<raw::LclusterIndex>() == 8);
// "keep in sync between 2 index structures for better extendibility" (erofs_fs.h)
const _: () = assert!(size_of::<raw::LclusterIndex>() == size_of::<raw::ChunkIndex>());
// Offsets the kernel and mkfs.erofs agree on, as a second check on the field lists.
const _: () = assert!(offset_of!(raw::SuperBlock, root_nid) == 14);
const _: () = assert!(offset_of!(raw::SuperBlock, feature_incompat) == 80);
const _: () = assert!(offset_of!(raw::SuperBlock, devt_slotoff) == 88);
const _: () = assert!(offset_of!(raw::SuperBlock, packed_nid) == 96);
const _: () = assert!(offset_of!(raw::InodeCompact, i_u) == 16);
const _: () = assert!(offset_of!(raw::InodeExtended, i_u) == 16);
const _: () = assert!(offset_of!(raw::InodeExtended, i_nlink) == 44);
const _: () = assert!(offset_of!(raw::DeviceSlot, mapped_blkaddr) == 68);
// The kernel reads the superblock as one block from byte 1024.
const _: () = assert!(SUPER_OFFSET as usize + SUPER_SIZE <= BLOCK_SIZE as usize);

/// Size of the base superblock.
pub const SUPER_SIZE: usize = size_of::<raw::SuperBlock>();
/// Size of a compact inode.
pub const COMPACT_INODE_SIZE: usize = size_of::<raw::InodeCompact>();
/// Size of an extended inode.
pub const EXTENDED_INODE_SIZE: usize = size_of::<raw::InodeExtended>();
/// Size of a directory entry record.
pub const DIRENT_SIZE: usize = size_of::<raw::Dirent>();
/// Size of the inline xattr body header.
pub const XATTR_IBODY_HEADER_SIZE: usize = size_of::<raw::XattrIbodyHeader>();
/// Size of an xattr entry header (before name and value).
pub const XATTR_ENTRY_SIZE: usize = size_of::<raw::XattrEntry>();
/// Size of a device table slot.
pub const DEVICE_SLOT_SIZE: usize = size_of::<raw::DeviceSlot>();
/// Size of a chunk index entry (chunk-based files with a device table).
pub const CHUNK_INDEX_SIZE: usize = size_of::<raw::ChunkIndex>();
/// Size of [`MapHeader`].
pub const MAP_HEADER_SIZE: usize = size_of::<raw::MapHeader>();
/// Size of [`LclusterIndex`].
pub const LCLUSTER_INDEX_SIZE: usize = size_of::<raw::LclusterIndex>();

/// Why bytes could not be decoded as a format structure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the structure needs.
    #[error("{what} is truncated: {got} bytes, needs {need}")]
    Truncated {
        /// The structure.
        what: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes given.
        got: usize,
    },
    /// The superblock magic is wrong: not an EROFS image (or not at this offset).
    #[error("bad superblock magic {0:#010x} (expected {SUPER_MAGIC:#010x})")]
    BadMagic(u32),
    /// An inode's data layout is one of the reserved values.
    #[error("unknown data layout {0}")]
    UnknownLayout(u16),
}

/// The first `N` bytes of `b`, or why there are not that many.
fn fixed<'a, const N: usize>(b: &'a [u8], what: &'static str) -> Result<&'a [u8; N], DecodeError> {
    b.get(..N)
        .and_then(|s| s.try_into().ok())
        .ok_or(DecodeError::Truncated {
            what,
            need: N,
            got: b.len(),
        })
}

/// Copies `N` bytes at `off`; `off + N` is within the structure by construction
/// (offsets come from `offset_of!` on the raw structs, whose sizes are the array sizes).
fn get<const N: usize, const S: usize>(b: &[u8; S], off: usize) -> [u8; N] {
    let mut v = [0u8; N];
    v.copy_from_slice(&b[off..off + N]);
    v
}
fn le16<const S: usize>(b: &[u8; S], off: usize) -> u16 {
    u16::from_le_bytes(get(b, off))
}
fn le32<const S: usize>(b: &[u8; S], off: usize) -> u32 {
    u32::from_le_bytes(get(b, off))
}
fn le64<const S: usize>(b: &[u8; S], off: usize) -> u64 {
    u64::from_le_bytes(get(b, off))
}
fn put(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

/// Directory entry file types.
pub mod ft {
    /// Unknown.
    pub const UNKNOWN: u8 = 0;
    /// Regular file.
    pub const REG: u8 = 1;
    /// Directory.
    pub const DIR: u8 = 2;
    /// Character device.
    pub const CHR: u8 = 3;
    /// Block device.
    pub const BLK: u8 = 4;
    /// FIFO.
    pub const FIFO: u8 = 5;
    /// Socket.
    pub const SOCK: u8 = 6;
    /// Symbolic link.
    pub const SYMLINK: u8 = 7;
}

/// POSIX file type bits of `i_mode`.
pub mod mode {
    /// Mask of the type bits.
    pub const S_IFMT: u16 = 0o170000;
    /// Socket.
    pub const S_IFSOCK: u16 = 0o140000;
    /// Symbolic link.
    pub const S_IFLNK: u16 = 0o120000;
    /// Regular file.
    pub const S_IFREG: u16 = 0o100000;
    /// Block device.
    pub const S_IFBLK: u16 = 0o060000;
    /// Directory.
    pub const S_IFDIR: u16 = 0o040000;
    /// Character device.
    pub const S_IFCHR: u16 = 0o020000;
    /// FIFO.
    pub const S_IFIFO: u16 = 0o010000;
}

/// The directory entry file type for an `i_mode`.
pub fn file_type_of(m: u16) -> u8 {
    match m & mode::S_IFMT {
        mode::S_IFREG => ft::REG,
        mode::S_IFDIR => ft::DIR,
        mode::S_IFCHR => ft::CHR,
        mode::S_IFBLK => ft::BLK,
        mode::S_IFIFO => ft::FIFO,
        mode::S_IFSOCK => ft::SOCK,
        mode::S_IFLNK => ft::SYMLINK,
        _ => ft::UNKNOWN,
    }
}

/// Xattr name prefix indexes (`e_name_index`). The stored name is the part after the prefix.
pub mod xattr_index {
    /// `user.`
    pub const USER: u8 = 1;
    /// `system.posix_acl_access` (whole name, empty suffix)
    pub const POSIX_ACL_ACCESS: u8 = 2;
    /// `system.posix_acl_default` (whole name, empty suffix)
    pub const POSIX_ACL_DEFAULT: u8 = 3;
    /// `trusted.`
    pub const TRUSTED: u8 = 4;
    /// `security.`
    pub const SECURITY: u8 = 6;
}

/// The prefix table, longest-specific first so ACL names are not taken for plain prefixes.
pub const XATTR_PREFIXES: &[(u8, &[u8])] = &[
    (xattr_index::POSIX_ACL_ACCESS, b"system.posix_acl_access"),
    (xattr_index::POSIX_ACL_DEFAULT, b"system.posix_acl_default"),
    (xattr_index::USER, b"user."),
    (xattr_index::TRUSTED, b"trusted."),
    (xattr_index::SECURITY, b"security."),
];

/// Splits a full xattr name into (index, suffix). `None` when EROFS has no prefix for it.
pub fn split_xattr_name(name: &[u8]) -> Option<(u8, &[u8])> {
    for (idx, prefix) in XATTR_PREFIXES {
        if let Some(rest) = name.strip_prefix(*prefix) {
            let is_acl = *idx == xattr_index::POSIX_ACL_ACCESS || *idx == xattr_index::POSIX_ACL_DEFAULT;
            if is_acl && !rest.is_empty() {
                continue;
            }
            if !is_acl && rest.is_empty() {
                return None;
            }
            return Some((*idx, rest));
        }
    }
    None
}

/// Joins an (index, suffix) pair back into a full xattr name.
pub fn join_xattr_name(index: u8, suffix: &[u8]) -> Option<Vec<u8>> {
    let (_, prefix) = XATTR_PREFIXES.iter().find(|(i, _)| *i == index)?;
    let mut v = prefix.to_vec();
    v.extend_from_slice(suffix);
    Some(v)
}

/// Rounds up to a multiple of 4 (xattr entries are 4-byte aligned).
pub const fn xattr_align(n: usize) -> usize {
    (n + 3) & !3
}

/// On-disk size of one xattr entry with its name suffix and value.
pub const fn xattr_entry_size(suffix_len: usize, value_len: usize) -> usize {
    xattr_align(XATTR_ENTRY_SIZE + suffix_len + value_len)
}

/// Size in bytes of an inode's xattr body for a given `i_xattr_icount`.
pub const fn xattr_ibody_size(icount: u16) -> usize {
    if icount == 0 {
        0
    } else {
        XATTR_IBODY_HEADER_SIZE + (icount as usize - 1) * 4
    }
}

/// `i_xattr_icount` for a body with `shared` shared ids and `inline_bytes` of inline entries.
pub const fn xattr_icount(shared: usize, inline_bytes: usize) -> usize {
    if shared == 0 && inline_bytes == 0 {
        0
    } else {
        1 + shared + inline_bytes / 4
    }
}

/// Linux `new_encode_dev`, the form EROFS stores device numbers in.
pub const fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Linux `new_decode_dev`: (major, minor).
pub const fn decode_dev(dev: u32) -> (u32, u32) {
    ((dev & 0xfff00) >> 8, (dev & 0xff) | ((dev >> 12) & 0xfff00))
}

/// The superblock (the fields this project uses; the rest are written as zero).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SuperBlock {
    /// Checksum (only meaningful with `FEATURE_COMPAT_SB_CHKSUM`).
    pub checksum: u32,
    /// Compatible feature bits.
    pub feature_compat: u32,
    /// log2 of the block size.
    pub blkszbits: u8,
    /// nid of the root directory; must fit 16 bits.
    pub root_nid: u16,
    /// Number of inodes.
    pub inos: u64,
    /// Time compact inodes report, seconds.
    pub build_time: u64,
    /// Time compact inodes report, nanoseconds.
    pub build_time_nsec: u32,
    /// Total blocks in the image.
    pub blocks: u32,
    /// Start block of the inode (metadata) area.
    pub meta_blkaddr: u32,
    /// Start block of the shared xattr area.
    pub xattr_blkaddr: u32,
    /// Filesystem UUID.
    pub uuid: [u8; 16],
    /// Volume name (NUL padded).
    pub volume_name: [u8; 16],
    /// Incompatible feature bits.
    pub feature_incompat: u32,
    /// `u1`: with [`FEATURE_INCOMPAT_COMPR_CFGS`], the bitmap of compression algorithms
    /// whose configurations follow the superblock (`available_compr_algs`); without it,
    /// LZ4's match distance (`lz4_max_distance`, 0 for the default 64 KiB).
    pub compr_algs: u16,
    /// Number of devices besides the primary one.
    pub extra_devices: u16,
    /// Device table offset in 128-byte slots.
    pub devt_slotoff: u16,
    /// Directory block size bits beyond the block size (0: same as block).
    pub dirblkbits: u8,
}

impl SuperBlock {
    /// Encodes into the 128-byte on-disk form.
    pub fn encode(&self) -> [u8; SUPER_SIZE] {
        use raw::SuperBlock as R;
        let mut b = [0u8; SUPER_SIZE];
        put(&mut b, offset_of!(R, magic), &SUPER_MAGIC.to_le_bytes());
        put(&mut b, offset_of!(R, checksum), &self.checksum.to_le_bytes());
        put(
            &mut b,
            offset_of!(R, feature_compat),
            &self.feature_compat.to_le_bytes(),
        );
        b[offset_of!(R, blkszbits)] = self.blkszbits;
        put(&mut b, offset_of!(R, root_nid), &self.root_nid.to_le_bytes());
        put(&mut b, offset_of!(R, inos), &self.inos.to_le_bytes());
        put(&mut b, offset_of!(R, build_time), &self.build_time.to_le_bytes());
        put(
            &mut b,
            offset_of!(R, build_time_nsec),
            &self.build_time_nsec.to_le_bytes(),
        );
        put(&mut b, offset_of!(R, blocks), &self.blocks.to_le_bytes());
        put(&mut b, offset_of!(R, meta_blkaddr), &self.meta_blkaddr.to_le_bytes());
        put(&mut b, offset_of!(R, xattr_blkaddr), &self.xattr_blkaddr.to_le_bytes());
        put(&mut b, offset_of!(R, uuid), &self.uuid);
        put(&mut b, offset_of!(R, volume_name), &self.volume_name);
        put(
            &mut b,
            offset_of!(R, feature_incompat),
            &self.feature_incompat.to_le_bytes(),
        );
        put(&mut b, offset_of!(R, u1), &self.compr_algs.to_le_bytes());
        put(&mut b, offset_of!(R, extra_devices), &self.extra_devices.to_le_bytes());
        put(&mut b, offset_of!(R, devt_slotoff), &self.devt_slotoff.to_le_bytes());
        b[offset_of!(R, dirblkbits)] = self.dirblkbits;
        b
    }

    /// Decodes the on-disk form (`b` from the superblock's first byte).
    pub fn decode(b: &[u8]) -> Result<SuperBlock, DecodeError> {
        use raw::SuperBlock as R;
        let b = fixed::<SUPER_SIZE>(b, "superblock")?;
        let magic = le32(b, offset_of!(R, magic));
        if magic != SUPER_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        Ok(SuperBlock {
            checksum: le32(b, offset_of!(R, checksum)),
            feature_compat: le32(b, offset_of!(R, feature_compat)),
            blkszbits: b[offset_of!(R, blkszbits)],
            root_nid: le16(b, offset_of!(R, root_nid)),
            inos: le64(b, offset_of!(R, inos)),
            build_time: le64(b, offset_of!(R, build_time)),
            build_time_nsec: le32(b, offset_of!(R, build_time_nsec)),
            blocks: le32(b, offset_of!(R, blocks)),
            meta_blkaddr: le32(b, offset_of!(R, meta_blkaddr)),
            xattr_blkaddr: le32(b, offset_of!(R, xattr_blkaddr)),
            uuid: get(b, offset_of!(R, uuid)),
            volume_name: get(b, offset_of!(R, volume_name)),
            feature_incompat: le32(b, offset_of!(R, feature_incompat)),
            compr_algs: le16(b, offset_of!(R, u1)),
            extra_devices: le16(b, offset_of!(R, extra_devices)),
            devt_slotoff: le16(b, offset_of!(R, devt_slotoff)),
            dirblkbits: b[offset_of!(R, dirblkbits)],
        })
    }

    /// The incompatible feature bits set that this crate does not understand (0: none).
    pub fn unsupported_incompat(&self) -> u32 {
        self.feature_incompat & !FEATURE_INCOMPAT_SUPPORTED
    }
}

/// An inode in the form common to both on-disk layouts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inode {
    /// Extended (64-byte) rather than compact (32-byte) layout.
    pub extended: bool,
    /// Data layout.
    pub layout: DataLayout,
    /// `i_xattr_icount`.
    pub xattr_icount: u16,
    /// Type and permission bits.
    pub mode: u16,
    /// Link count.
    pub nlink: u32,
    /// Size in bytes.
    pub size: u64,
    /// The `i_u` union: raw_blkaddr, rdev or chunk_info.
    pub i_u: u32,
    /// 32-bit inode number for stat.
    pub ino: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds (extended only; compact inodes use the build time).
    pub mtime: u64,
    /// Modification time, nanoseconds (extended only).
    pub mtime_nsec: u32,
}

impl Inode {
    /// On-disk size of this inode's fixed part.
    pub fn size_on_disk(&self) -> usize {
        if self.extended {
            EXTENDED_INODE_SIZE
        } else {
            COMPACT_INODE_SIZE
        }
    }

    /// Whether the inode starting with these bytes is extended, from `i_format` (the first
    /// two bytes of both layouts), so a reader knows how much to read; `None` if `b` is
    /// shorter than that.
    pub fn is_extended(b: &[u8]) -> Option<bool> {
        let f = fixed::<2>(b, "i_format").ok()?;
        Some(u16::from_le_bytes(*f) & INODE_LAYOUT_EXTENDED != 0)
    }

    /// Appends the on-disk form to `out`. Callers choose `extended` so every field fits.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let format =
            (if self.extended { INODE_LAYOUT_EXTENDED } else { 0 }) | (self.layout.raw() << INODE_DATALAYOUT_BIT);
        let start = out.len();
        out.resize(start + self.size_on_disk(), 0);
        let b = &mut out[start..];
        if self.extended {
            use raw::InodeExtended as R;
            put(b, offset_of!(R, i_format), &format.to_le_bytes());
            put(b, offset_of!(R, i_xattr_icount), &self.xattr_icount.to_le_bytes());
            put(b, offset_of!(R, i_mode), &self.mode.to_le_bytes());
            put(b, offset_of!(R, i_size), &self.size.to_le_bytes());
            put(b, offset_of!(R, i_u), &self.i_u.to_le_bytes());
            put(b, offset_of!(R, i_ino), &self.ino.to_le_bytes());
            put(b, offset_of!(R, i_uid), &self.uid.to_le_bytes());
            put(b, offset_of!(R, i_gid), &self.gid.to_le_bytes());
            put(b, offset_of!(R, i_mtime), &self.mtime.to_le_bytes());
            put(b, offset_of!(R, i_mtime_nsec), &self.mtime_nsec.to_le_bytes());
            put(b, offset_of!(R, i_nlink), &self.nlink.to_le_bytes());
        } else {
            use raw::InodeCompact as R;
            put(b, offset_of!(R, i_format), &format.to_le_bytes());
            put(b, offset_of!(R, i_xattr_icount), &self.xattr_icount.to_le_bytes());
            put(b, offset_of!(R, i_mode), &self.mode.to_le_bytes());
            put(b, offset_of!(R, i_nlink), &(self.nlink as u16).to_le_bytes());
            put(b, offset_of!(R, i_size), &(self.size as u32).to_le_bytes());
            put(b, offset_of!(R, i_u), &self.i_u.to_le_bytes());
            put(b, offset_of!(R, i_ino), &self.ino.to_le_bytes());
            put(b, offset_of!(R, i_uid), &(self.uid as u16).to_le_bytes());
            put(b, offset_of!(R, i_gid), &(self.gid as u16).to_le_bytes());
        }
    }

    /// Decodes an inode. `b` must hold at least 64 bytes when the inode is extended;
    /// `build_time` fills the time of compact inodes.
    pub fn decode(b: &[u8], build_time: u64, build_time_nsec: u32) -> Result<Inode, DecodeError> {
        let compact = fixed::<COMPACT_INODE_SIZE>(b, "compact inode")?;
        let format = le16(compact, offset_of!(raw::InodeCompact, i_format));
        let extended = format & INODE_LAYOUT_EXTENDED != 0;
        let raw_layout = (format >> INODE_DATALAYOUT_BIT) & INODE_DATALAYOUT_MASK;
        if extended {
            use raw::InodeExtended as R;
            let b = fixed::<EXTENDED_INODE_SIZE>(b, "extended inode")?;
            let layout = DataLayout::from_raw(raw_layout).ok_or(DecodeError::UnknownLayout(raw_layout))?;
            Ok(Inode {
                extended,
                layout,
                xattr_icount: le16(b, offset_of!(R, i_xattr_icount)),
                mode: le16(b, offset_of!(R, i_mode)),
                size: le64(b, offset_of!(R, i_size)),
                i_u: le32(b, offset_of!(R, i_u)),
                ino: le32(b, offset_of!(R, i_ino)),
                uid: le32(b, offset_of!(R, i_uid)),
                gid: le32(b, offset_of!(R, i_gid)),
                mtime: le64(b, offset_of!(R, i_mtime)),
                mtime_nsec: le32(b, offset_of!(R, i_mtime_nsec)),
                nlink: le32(b, offset_of!(R, i_nlink)),
            })
        } else {
            use raw::InodeCompact as R;
            let b = compact;
            let layout = DataLayout::from_raw(raw_layout).ok_or(DecodeError::UnknownLayout(raw_layout))?;
            Ok(Inode {
                extended,
                layout,
                xattr_icount: le16(b, offset_of!(R, i_xattr_icount)),
                mode: le16(b, offset_of!(R, i_mode)),
                nlink: le16(b, offset_of!(R, i_nlink)) as u32,
                size: le32(b, offset_of!(R, i_size)) as u64,
                i_u: le32(b, offset_of!(R, i_u)),
                ino: le32(b, offset_of!(R, i_ino)),
                uid: le16(b, offset_of!(R, i_uid)) as u32,
                gid: le16(b, offset_of!(R, i_gid)) as u32,
                mtime: build_time,
                mtime_nsec: build_time_nsec,
            })
        }
    }
}

/// One entry of a chunk-based file's index: where one chunk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkIndex {
    /// 0 for the image itself, `n` for the n-th device table entry (the reader masks it
    /// as the kernel does).
    pub device_id: u16,
    /// First block of the chunk; [`NULL_ADDR`] for a hole.
    pub blkaddr: u32,
}

impl ChunkIndex {
    /// On-disk form: without 48-bit addressing the high start block bits stay 0.
    pub fn encode(&self) -> [u8; CHUNK_INDEX_SIZE] {
        use raw::ChunkIndex as R;
        let mut b = [0u8; CHUNK_INDEX_SIZE];
        put(&mut b, offset_of!(R, device_id), &self.device_id.to_le_bytes());
        put(&mut b, offset_of!(R, startblk_lo), &self.blkaddr.to_le_bytes());
        b
    }

    /// Decodes an 8-byte index entry (chunk format with `CHUNK_FORMAT_INDEXES`). The high
    /// start block bits are ignored: they only mean something with the 48-bit feature,
    /// which this crate (like the kernel before 6.15) does not know.
    pub fn decode(b: &[u8]) -> Result<ChunkIndex, DecodeError> {
        use raw::ChunkIndex as R;
        let b = fixed::<CHUNK_INDEX_SIZE>(b, "chunk index")?;
        Ok(ChunkIndex {
            device_id: le16(b, offset_of!(R, device_id)),
            blkaddr: le32(b, offset_of!(R, startblk_lo)),
        })
    }

    /// Decodes a 4-byte block map entry (chunk format without `CHUNK_FORMAT_INDEXES`),
    /// which is always on the primary device.
    pub fn decode_block_map(b: &[u8]) -> Result<ChunkIndex, DecodeError> {
        let b = fixed::<BLOCK_MAP_ENTRY_SIZE>(b, "block map entry")?;
        Ok(ChunkIndex {
            device_id: 0,
            blkaddr: u32::from_le_bytes(*b),
        })
    }
}

/// A directory entry record (the name is stored separately, at `nameoff`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dirent {
    /// Target inode.
    pub nid: u64,
    /// Offset of the name from the start of the directory block.
    pub nameoff: u16,
    /// `ft::*`.
    pub file_type: u8,
}

impl Dirent {
    /// On-disk form.
    pub fn encode(&self) -> [u8; DIRENT_SIZE] {
        use raw::Dirent as R;
        let mut b = [0u8; DIRENT_SIZE];
        put(&mut b, offset_of!(R, nid), &self.nid.to_le_bytes());
        put(&mut b, offset_of!(R, nameoff), &self.nameoff.to_le_bytes());
        b[offset_of!(R, file_type)] = self.file_type;
        b
    }

    /// Decodes a record from its first 12 bytes.
    pub fn decode(b: &[u8]) -> Result<Dirent, DecodeError> {
        use raw::Dirent as R;
        let b = fixed::<DIRENT_SIZE>(b, "directory entry")?;
        Ok(Dirent {
            nid: le64(b, offset_of!(R, nid)),
            nameoff: le16(b, offset_of!(R, nameoff)),
            file_type: b[offset_of!(R, file_type)],
        })
    }
}

/// The inline xattr body header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XattrIbodyHeader {
    /// Number of shared xattr ids following the header.
    pub shared_count: u8,
}

impl XattrIbodyHeader {
    /// On-disk form (name filter left 0: the filter feature is not set).
    pub fn encode(&self) -> [u8; XATTR_IBODY_HEADER_SIZE] {
        let mut b = [0u8; XATTR_IBODY_HEADER_SIZE];
        b[offset_of!(raw::XattrIbodyHeader, h_shared_count)] = self.shared_count;
        b
    }

    /// Decodes the 12-byte header.
    pub fn decode(b: &[u8]) -> Result<XattrIbodyHeader, DecodeError> {
        let b = fixed::<XATTR_IBODY_HEADER_SIZE>(b, "xattr body header")?;
        Ok(XattrIbodyHeader {
            shared_count: b[offset_of!(raw::XattrIbodyHeader, h_shared_count)],
        })
    }
}

/// An xattr entry header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XattrEntry {
    /// Length of the name suffix.
    pub name_len: u8,
    /// Prefix index.
    pub name_index: u8,
    /// Length of the value.
    pub value_size: u16,
}

impl XattrEntry {
    /// The 4-byte header's on-disk form.
    pub fn encode(&self) -> [u8; XATTR_ENTRY_SIZE] {
        use raw::XattrEntry as R;
        let mut b = [0u8; XATTR_ENTRY_SIZE];
        b[offset_of!(R, e_name_len)] = self.name_len;
        b[offset_of!(R, e_name_index)] = self.name_index;
        put(&mut b, offset_of!(R, e_value_size), &self.value_size.to_le_bytes());
        b
    }

    /// Appends header, name and value, padded to 4 bytes.
    pub fn encode_into(index: u8, suffix: &[u8], value: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        let header = XattrEntry {
            name_len: suffix.len() as u8,
            name_index: index,
            value_size: value.len() as u16,
        };
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(suffix);
        out.extend_from_slice(value);
        out.resize(start + xattr_entry_size(suffix.len(), value.len()), 0);
    }

    /// Decodes the 4-byte header.
    pub fn decode(b: &[u8]) -> Result<XattrEntry, DecodeError> {
        use raw::XattrEntry as R;
        let b = fixed::<XATTR_ENTRY_SIZE>(b, "xattr entry")?;
        Ok(XattrEntry {
            name_len: b[offset_of!(R, e_name_len)],
            name_index: b[offset_of!(R, e_name_index)],
            value_size: le16(b, offset_of!(R, e_value_size)),
        })
    }
}

/// A device table slot (an extra data device, e.g. a blob holding shared chunks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSlot {
    /// Tag identifying the blob (e.g. its digest, truncated to 64 bytes).
    pub tag: [u8; 64],
    /// Size of the device in blocks.
    pub blocks: u32,
    /// Start of the device in the unified address space (0 when unused).
    pub mapped_blkaddr: u32,
}

impl DeviceSlot {
    /// On-disk form (128 bytes).
    pub fn encode(&self) -> [u8; DEVICE_SLOT_SIZE] {
        use raw::DeviceSlot as R;
        let mut b = [0u8; DEVICE_SLOT_SIZE];
        put(&mut b, offset_of!(R, tag), &self.tag);
        put(&mut b, offset_of!(R, blocks), &self.blocks.to_le_bytes());
        put(
            &mut b,
            offset_of!(R, mapped_blkaddr),
            &self.mapped_blkaddr.to_le_bytes(),
        );
        b
    }

    /// Decodes a slot.
    pub fn decode(b: &[u8]) -> Result<DeviceSlot, DecodeError> {
        use raw::DeviceSlot as R;
        let b = fixed::<DEVICE_SLOT_SIZE>(b, "device slot")?;
        Ok(DeviceSlot {
            tag: get(b, offset_of!(R, tag)),
            blocks: le32(b, offset_of!(R, blocks)),
            mapped_blkaddr: le32(b, offset_of!(R, mapped_blkaddr)),
        })
    }
}

// ---- Compressed files (erofs_fs.h: `z_erofs_*`) -------------------------------------

/// Largest encoded (compressed) size of one physical cluster (`Z_EROFS_PCLUSTER_MAX_SIZE`).
pub const PCLUSTER_MAX_SIZE: u64 = 1024 * 1024;
/// Largest decoded size of one physical cluster the kernel accepts
/// (`Z_EROFS_PCLUSTER_MAX_DSIZE`).
pub const PCLUSTER_MAX_DSIZE: u64 = 12 * 1024 * 1024;

/// `h_advise` bits of a [`MapHeader`] (`Z_EROFS_ADVISE_*`).
pub mod z_advise {
    /// Compact indexes use the 2-byte form too (`COMPACTED_2B`, compact layout only).
    pub const COMPACTED_2B: u16 = 0x0001;
    /// Encoded extents instead of lcluster indexes (`EXTENTS`, full layout, 48-bit only).
    pub const EXTENTS: u16 = 0x0001;
    /// HEAD1 pclusters may be bigger than one lcluster (`BIG_PCLUSTER_1`).
    pub const BIG_PCLUSTER_1: u16 = 0x0002;
    /// HEAD2 and plain pclusters may be bigger than one lcluster (`BIG_PCLUSTER_2`).
    pub const BIG_PCLUSTER_2: u16 = 0x0004;
    /// The last pcluster is packed inline after the indexes (`INLINE_PCLUSTER`).
    pub const INLINE_PCLUSTER: u16 = 0x0008;
    /// Plain pclusters are rotated by their cluster offset (`INTERLACED_PCLUSTER`).
    pub const INTERLACED_PCLUSTER: u16 = 0x0010;
    /// The tail is a fragment of the packed inode (`FRAGMENT_PCLUSTER`).
    pub const FRAGMENT_PCLUSTER: u16 = 0x0020;
}

/// Compression algorithms (`Z_EROFS_COMPRESSION_*`), numbered as on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Algorithm {
    /// LZ4 block format (lz4 and lz4hc write the same format).
    Lz4 = 0,
    /// MicroLZMA.
    Lzma = 1,
    /// Raw DEFLATE.
    Deflate = 2,
    /// Zstandard frames.
    Zstd = 3,
}

impl Algorithm {
    /// The algorithm with this on-disk number.
    pub const fn from_raw(v: u8) -> Option<Algorithm> {
        Some(match v {
            0 => Algorithm::Lz4,
            1 => Algorithm::Lzma,
            2 => Algorithm::Deflate,
            3 => Algorithm::Zstd,
            _ => return None,
        })
    }

    /// Its bit in `available_compr_algs`.
    pub const fn bit(self) -> u16 {
        1 << self as u8
    }

    /// The size of its configuration record after the superblock (without the 2-byte
    /// length): `struct z_erofs_{lz4,lzma,deflate,zstd}_cfgs`.
    pub const fn cfg_size(self) -> usize {
        match self {
            Algorithm::Lz4 | Algorithm::Lzma => 14,
            Algorithm::Deflate | Algorithm::Zstd => 6,
        }
    }
}

/// Every algorithm bit the format defines (`Z_EROFS_ALL_COMPR_ALGS`).
pub const ALL_COMPR_ALGS: u16 = 0xf;

/// The configuration records of the algorithms in `algs` (a bitmap), as they follow the
/// superblock when [`FEATURE_INCOMPAT_COMPR_CFGS`] is set: for each algorithm in bit
/// order, a 4-byte aligned little-endian length and the record.
///
/// - LZ4: `max_distance` 0 (the default 64 KiB) and `max_pclusterblks`;
/// - LZMA: `dict_size`, `format` 0;
/// - DEFLATE: `windowbits` 15;
/// - Zstandard: `format` 0, `windowlog` - 10.
pub fn encode_compr_cfgs(algs: u16, max_pcluster_blocks: u16, lzma_dict: u32, zstd_windowlog: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for a in [Algorithm::Lz4, Algorithm::Lzma, Algorithm::Deflate, Algorithm::Zstd] {
        if algs & a.bit() == 0 {
            continue;
        }
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(&(a.cfg_size() as u16).to_le_bytes());
        let mut rec = vec![0u8; a.cfg_size()];
        match a {
            Algorithm::Lz4 => rec[2..4].copy_from_slice(&max_pcluster_blocks.to_le_bytes()),
            Algorithm::Lzma => rec[0..4].copy_from_slice(&lzma_dict.to_le_bytes()),
            Algorithm::Deflate => rec[0] = 15,
            Algorithm::Zstd => rec[1] = zstd_windowlog.saturating_sub(10),
        }
        out.extend_from_slice(&rec);
    }
    out
}

/// Type of a logical cluster (`Z_EROFS_LCLUSTER_TYPE_*`, `di_advise` bits 0..=1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LclusterType {
    /// An extent of uncompressed data starts here (`PLAIN`).
    Plain = 0,
    /// An extent compressed with the HEAD1 algorithm starts here (`HEAD1`).
    Head1 = 1,
    /// No extent starts here (`NONHEAD`).
    NonHead = 2,
    /// An extent compressed with the HEAD2 algorithm starts here (`HEAD2`).
    Head2 = 3,
}

/// `di_advise`: the extent starting here refers to part of its decoded data
/// (`Z_EROFS_LI_PARTIAL_REF`).
pub const LI_PARTIAL_REF: u16 = 1 << 15;
/// `di_advise` of the first non-head lcluster after a head: `delta[0]` holds the
/// pcluster's size in blocks (`Z_EROFS_LI_D0_CBLKCNT`).
pub const LI_D0_CBLKCNT: u16 = 1 << 11;

/// The header of a compressed inode's map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapHeader {
    /// Bytes of the inline (tail-packed) pcluster, or the low 16 bits of the fragment
    /// offset with [`z_advise::FRAGMENT_PCLUSTER`].
    pub idata_size: u16,
    /// `h_reserved1` (the fragment offset's high half).
    pub reserved1: u16,
    /// `Z_EROFS_ADVISE_*` bits.
    pub advise: u16,
    /// HEAD1's algorithm (bits 0..=3 of `h_algorithmtype`).
    pub algorithm_head1: u8,
    /// HEAD2's algorithm (bits 4..=7).
    pub algorithm_head2: u8,
    /// `h_clusterbits` as stored: log2(lcluster size) - block size bits in bits 0..=3,
    /// bit 7 set when the whole file is a fragment.
    pub clusterbits: u8,
}

impl MapHeader {
    /// On-disk form.
    pub fn encode(&self) -> [u8; MAP_HEADER_SIZE] {
        use raw::MapHeader as R;
        let mut b = [0u8; MAP_HEADER_SIZE];
        put(&mut b, offset_of!(R, h_reserved1), &self.reserved1.to_le_bytes());
        put(&mut b, offset_of!(R, h_idata_size), &self.idata_size.to_le_bytes());
        put(&mut b, offset_of!(R, h_advise), &self.advise.to_le_bytes());
        b[offset_of!(R, h_algorithmtype)] = self.algorithm_head2 << 4 | (self.algorithm_head1 & 0xf);
        b[offset_of!(R, h_clusterbits)] = self.clusterbits;
        b
    }

    /// Decodes the 8-byte header.
    pub fn decode(b: &[u8]) -> Result<MapHeader, DecodeError> {
        use raw::MapHeader as R;
        let b = fixed::<MAP_HEADER_SIZE>(b, "compressed map header")?;
        let alg = b[offset_of!(R, h_algorithmtype)];
        Ok(MapHeader {
            reserved1: le16(b, offset_of!(R, h_reserved1)),
            idata_size: le16(b, offset_of!(R, h_idata_size)),
            advise: le16(b, offset_of!(R, h_advise)),
            algorithm_head1: alg & 0xf,
            algorithm_head2: alg >> 4,
            clusterbits: b[offset_of!(R, h_clusterbits)],
        })
    }
}

/// Where a `COMPRESSED_FULL` inode's map header is: the first 8-byte boundary after the
/// inode and its xattrs (`Z_EROFS_MAP_HEADER_START`), `end` being that byte offset.
pub const fn map_header_start(end: u64) -> u64 {
    end.next_multiple_of(8)
}

/// Where its lcluster indexes start: after the header and 8 reserved bytes
/// (`Z_EROFS_FULL_INDEX_START`).
pub const fn full_index_start(end: u64) -> u64 {
    map_header_start(end) + MAP_HEADER_SIZE as u64 + 8
}

/// One lcluster index of a `COMPRESSED_FULL` inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LclusterIndex {
    /// `di_advise`: the type in bits 0..=1 plus [`LI_PARTIAL_REF`] / [`LI_D0_CBLKCNT`].
    pub advise: u16,
    /// `di_clusterofs`.
    pub clusterofs: u16,
    /// `di_u`: the block address for heads, `delta[0] | delta[1] << 16` for non-heads.
    pub u: u32,
}

impl LclusterIndex {
    /// A head or plain index.
    pub fn head(kind: LclusterType, clusterofs: u16, blkaddr: u32) -> LclusterIndex {
        LclusterIndex {
            advise: kind as u16,
            clusterofs,
            u: blkaddr,
        }
    }

    /// A non-head index with its two deltas.
    pub fn nonhead(clusterofs: u16, delta0: u16, delta1: u16) -> LclusterIndex {
        LclusterIndex {
            advise: LclusterType::NonHead as u16,
            clusterofs,
            u: u32::from(delta0) | u32::from(delta1) << 16,
        }
    }

    /// The lcluster type.
    pub fn kind(&self) -> LclusterType {
        match self.advise & 3 {
            0 => LclusterType::Plain,
            1 => LclusterType::Head1,
            2 => LclusterType::NonHead,
            _ => LclusterType::Head2,
        }
    }

    /// `delta[0]` (non-heads).
    pub fn delta0(&self) -> u16 {
        self.u as u16
    }

    /// `delta[1]` (non-heads).
    pub fn delta1(&self) -> u16 {
        (self.u >> 16) as u16
    }

    /// On-disk form.
    pub fn encode(&self) -> [u8; LCLUSTER_INDEX_SIZE] {
        use raw::LclusterIndex as R;
        let mut b = [0u8; LCLUSTER_INDEX_SIZE];
        put(&mut b, offset_of!(R, di_advise), &self.advise.to_le_bytes());
        put(&mut b, offset_of!(R, di_clusterofs), &self.clusterofs.to_le_bytes());
        put(&mut b, offset_of!(R, di_u), &self.u.to_le_bytes());
        b
    }

    /// Decodes one 8-byte index.
    pub fn decode(b: &[u8]) -> Result<LclusterIndex, DecodeError> {
        use raw::LclusterIndex as R;
        let b = fixed::<LCLUSTER_INDEX_SIZE>(b, "lcluster index")?;
        Ok(LclusterIndex {
            advise: le16(b, offset_of!(R, di_advise)),
            clusterofs: le16(b, offset_of!(R, di_clusterofs)),
            u: le32(b, offset_of!(R, di_u)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trips() {
        let sb = SuperBlock {
            blkszbits: 12,
            root_nid: 36,
            inos: 7,
            build_time: 1_700_000_000,
            build_time_nsec: 5,
            blocks: 99,
            meta_blkaddr: 3,
            xattr_blkaddr: 3,
            uuid: [7; 16],
            ..Default::default()
        };
        assert_eq!(SuperBlock::decode(&sb.encode()), Ok(sb));
    }

    #[test]
    fn inodes_round_trip() {
        for extended in [false, true] {
            let ino = Inode {
                extended,
                layout: DataLayout::FlatInline,
                xattr_icount: 3,
                mode: mode::S_IFREG | 0o4755,
                nlink: 2,
                size: 12345,
                i_u: 77,
                ino: 9,
                uid: 1000,
                gid: 100,
                mtime: if extended { 42 } else { 1 },
                mtime_nsec: if extended { 999 } else { 2 },
            };
            let mut out = Vec::new();
            ino.encode_into(&mut out);
            assert_eq!(out.len(), ino.size_on_disk());
            assert_eq!(Inode::is_extended(&out), Some(extended));
            assert_eq!(Inode::decode(&out, 1, 2), Ok(ino));
        }
    }

    #[test]
    fn data_layouts_round_trip_and_reserved_ones_are_refused() {
        for v in 0..8u16 {
            match DataLayout::from_raw(v) {
                Some(l) => {
                    assert_eq!(l.raw(), v);
                    assert_eq!(l.is_compressed(), v == 1 || v == 3);
                    let ino = Inode {
                        layout: l,
                        ..Default::default()
                    };
                    let mut out = Vec::new();
                    ino.encode_into(&mut out);
                    assert_eq!(Inode::decode(&out, 0, 0).unwrap().layout, l);
                }
                None => {
                    assert!(v >= 5);
                    let mut b = [0u8; COMPACT_INODE_SIZE];
                    b[0..2].copy_from_slice(&(v << INODE_DATALAYOUT_BIT).to_le_bytes());
                    assert_eq!(Inode::decode(&b, 0, 0), Err(DecodeError::UnknownLayout(v)));
                }
            }
        }
    }

    #[test]
    fn small_structs_round_trip() {
        let d = Dirent {
            nid: 0x0123_4567_89ab_cdef,
            nameoff: 36,
            file_type: ft::SYMLINK,
        };
        assert_eq!(Dirent::decode(&d.encode()), Ok(d));
        let x = XattrEntry {
            name_len: 10,
            name_index: xattr_index::SECURITY,
            value_size: 0x1234,
        };
        assert_eq!(XattrEntry::decode(&x.encode()), Ok(x));
        let h = XattrIbodyHeader { shared_count: 7 };
        assert_eq!(XattrIbodyHeader::decode(&h.encode()), Ok(h));
        let c = ChunkIndex {
            device_id: 3,
            blkaddr: 0xdead_beef,
        };
        assert_eq!(ChunkIndex::decode(&c.encode()), Ok(c));
        assert_eq!(
            ChunkIndex::decode_block_map(&NULL_ADDR.to_le_bytes()),
            Ok(ChunkIndex {
                device_id: 0,
                blkaddr: NULL_ADDR
            })
        );
        let mut tag = [0u8; 64];
        tag[..6].copy_from_slice(b"sha256");
        let s = DeviceSlot {
            tag,
            blocks: 99,
            mapped_blkaddr: 1 << 20,
        };
        assert_eq!(DeviceSlot::decode(&s.encode()), Ok(s));
    }

    /// Every decoder on every strict prefix of a valid encoding: an error, never a panic.
    #[test]
    fn truncated_input_is_an_error() {
        fn each_prefix<T: std::fmt::Debug>(full: &[u8], decode: impl Fn(&[u8]) -> Result<T, DecodeError>) {
            assert!(decode(full).is_ok());
            for n in 0..full.len() {
                match decode(&full[..n]) {
                    Err(DecodeError::Truncated { got, .. }) => assert_eq!(got, n),
                    other => panic!("{n} of {} bytes decoded as {other:?}", full.len()),
                }
            }
        }
        let sb = SuperBlock {
            blkszbits: 12,
            ..Default::default()
        };
        each_prefix(&sb.encode(), SuperBlock::decode);
        for extended in [false, true] {
            let mut out = Vec::new();
            Inode {
                extended,
                ..Default::default()
            }
            .encode_into(&mut out);
            each_prefix(&out, |b| Inode::decode(b, 0, 0));
        }
        let d = Dirent {
            nid: 1,
            nameoff: 12,
            file_type: ft::DIR,
        };
        each_prefix(&d.encode(), Dirent::decode);
        each_prefix(&XattrIbodyHeader { shared_count: 1 }.encode(), XattrIbodyHeader::decode);
        let x = XattrEntry {
            name_len: 1,
            name_index: 1,
            value_size: 1,
        };
        each_prefix(&x.encode(), XattrEntry::decode);
        let c = ChunkIndex {
            device_id: 1,
            blkaddr: 2,
        };
        each_prefix(&c.encode(), ChunkIndex::decode);
        each_prefix(&[1, 2, 3, 4], ChunkIndex::decode_block_map);
        let s = DeviceSlot {
            tag: [1; 64],
            blocks: 1,
            mapped_blkaddr: 0,
        };
        each_prefix(&s.encode(), DeviceSlot::decode);
    }

    #[test]
    fn superblock_magic_is_checked() {
        let mut b = SuperBlock::default().encode();
        b[0] ^= 1;
        assert_eq!(SuperBlock::decode(&b), Err(DecodeError::BadMagic(SUPER_MAGIC ^ 1)));
    }

    #[test]
    fn unsupported_incompat_bits_are_reported() {
        let mut sb = SuperBlock {
            feature_incompat: FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE,
            ..Default::default()
        };
        assert_eq!(sb.unsupported_incompat(), 0);
        sb.feature_incompat |= FEATURE_INCOMPAT_48BIT | FEATURE_INCOMPAT_ZERO_PADDING;
        assert_eq!(sb.unsupported_incompat(), FEATURE_INCOMPAT_48BIT);
    }

    #[test]
    fn device_numbers_round_trip() {
        for (ma, mi) in [(0, 0), (1, 3), (8, 300), (259, 70000)] {
            assert_eq!(decode_dev(encode_dev(ma, mi)), (ma, mi));
        }
    }

    #[test]
    fn xattr_names_split_by_prefix() {
        assert_eq!(split_xattr_name(b"user.foo"), Some((1, &b"foo"[..])));
        assert_eq!(split_xattr_name(b"system.posix_acl_access"), Some((2, &b""[..])));
        assert_eq!(split_xattr_name(b"security.capability"), Some((6, &b"capability"[..])));
        assert_eq!(
            split_xattr_name(b"trusted.overlay.opaque"),
            Some((4, &b"overlay.opaque"[..]))
        );
        assert_eq!(split_xattr_name(b"system.other"), None);
        assert_eq!(split_xattr_name(b"user."), None);
        assert_eq!(join_xattr_name(6, b"capability").unwrap(), b"security.capability");
    }

    #[test]
    fn compressed_maps_round_trip() {
        let h = MapHeader {
            idata_size: 300,
            reserved1: 0,
            advise: z_advise::BIG_PCLUSTER_1 | z_advise::INLINE_PCLUSTER,
            algorithm_head1: Algorithm::Zstd as u8,
            algorithm_head2: Algorithm::Lz4 as u8,
            clusterbits: 0,
        };
        let b = h.encode();
        assert_eq!(b, [0, 0, 44, 1, 10, 0, 3, 0]);
        assert_eq!(MapHeader::decode(&b).unwrap(), h);
        let i = LclusterIndex::nonhead(5, 3 | LI_D0_CBLKCNT, 7);
        assert_eq!(i.encode(), [2, 0, 5, 0, 3, 8, 7, 0]);
        let d = LclusterIndex::decode(&i.encode()).unwrap();
        assert_eq!(
            (d.kind(), d.delta0(), d.delta1()),
            (LclusterType::NonHead, 3 | LI_D0_CBLKCNT, 7)
        );
        let h = LclusterIndex::head(LclusterType::Head1, 4095, 0x0102_0304);
        assert_eq!(h.encode(), [1, 0, 255, 15, 4, 3, 2, 1]);
        assert!(MapHeader::decode(&b[..7]).is_err());
        assert!(LclusterIndex::decode(&[0; 7]).is_err());
        assert_eq!(full_index_start(64 + 12), 96);
        assert_eq!(map_header_start(64), 64);
    }

    #[test]
    fn compression_configs_follow_erofs_fs_h() {
        // lz4 (16 bytes with its length) then zstd (8): erofs_fs.h's comments.
        let c = encode_compr_cfgs(Algorithm::Lz4.bit() | Algorithm::Zstd.bit(), 16, 0, 17);
        assert_eq!(c.len(), 16 + 8);
        assert_eq!(&c[..6], &[14, 0, 0, 0, 16, 0]);
        assert_eq!(&c[16..20], &[6, 0, 0, 7]);
        let c = encode_compr_cfgs(Algorithm::Deflate.bit(), 1, 0, 0);
        assert_eq!(c, [6, 0, 15, 0, 0, 0, 0, 0]);
    }
}
