//! The EROFS on-disk format, as one module (after erofs-utils' `include/erofs_fs.h`).
//!
//! Every structure is little-endian and is encoded/decoded by hand into byte arrays:
//! the layout is the contract with the kernel, so it is spelled out field by field
//! with its byte offset rather than left to a `repr(C)` struct and `unsafe` casts.

/// Byte offset of the superblock inside block 0.
pub const SUPER_OFFSET: u64 = 1024;
/// Superblock magic number.
pub const SUPER_MAGIC: u32 = 0xE0F5_E1E2;
/// Size of the base superblock.
pub const SUPER_SIZE: usize = 128;
/// Inode slots are 32 bytes: `nid * 32` is an inode's offset from `meta_blkaddr`.
pub const ISLOT_BITS: u32 = 5;
/// Size of a compact inode.
pub const COMPACT_INODE_SIZE: usize = 32;
/// Size of an extended inode.
pub const EXTENDED_INODE_SIZE: usize = 64;
/// Size of a directory entry record.
pub const DIRENT_SIZE: usize = 12;
/// Longest file name the kernel accepts.
pub const NAME_LEN: usize = 255;
/// Size of the inline xattr body header.
pub const XATTR_IBODY_HEADER_SIZE: usize = 12;
/// Size of an xattr entry header (before name and value).
pub const XATTR_ENTRY_SIZE: usize = 4;
/// Size of a device table slot.
pub const DEVICE_SLOT_SIZE: usize = 128;
/// Size of a chunk index entry (chunk-based files with a device table).
pub const CHUNK_INDEX_SIZE: usize = 8;

/// Superblock checksum is present (`feature_compat`).
pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x1;
/// Chunk-based files (`feature_incompat`).
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
/// Extra devices and a device table (`feature_incompat`).
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;

/// `i_format` bit 0: 0 = compact, 1 = extended inode.
pub const INODE_LAYOUT_EXTENDED: u16 = 1;
/// Data layouts (`i_format` bits 1..=3).
pub const LAYOUT_FLAT_PLAIN: u16 = 0;
/// Full blocks plus a tail packed right after the inode and its xattrs.
pub const LAYOUT_FLAT_INLINE: u16 = 2;
/// Data in chunks addressed by a per-inode index.
pub const LAYOUT_CHUNK_BASED: u16 = 4;

/// Chunk format flag: the index holds 8-byte entries with a device id.
pub const CHUNK_FORMAT_INDEXES: u16 = 0x20;
/// Chunk format: low 5 bits are log2(chunk size) - block size bits.
pub const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x1f;

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

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
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
        let mut b = [0u8; SUPER_SIZE];
        b[0..4].copy_from_slice(&SUPER_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.checksum.to_le_bytes());
        b[8..12].copy_from_slice(&self.feature_compat.to_le_bytes());
        b[12] = self.blkszbits;
        b[13] = 0; // sb_extslots
        b[14..16].copy_from_slice(&self.root_nid.to_le_bytes());
        b[16..24].copy_from_slice(&self.inos.to_le_bytes());
        b[24..32].copy_from_slice(&self.build_time.to_le_bytes());
        b[32..36].copy_from_slice(&self.build_time_nsec.to_le_bytes());
        b[36..40].copy_from_slice(&self.blocks.to_le_bytes());
        b[40..44].copy_from_slice(&self.meta_blkaddr.to_le_bytes());
        b[44..48].copy_from_slice(&self.xattr_blkaddr.to_le_bytes());
        b[48..64].copy_from_slice(&self.uuid);
        b[64..80].copy_from_slice(&self.volume_name);
        b[80..84].copy_from_slice(&self.feature_incompat.to_le_bytes());
        // 84..86: available_compr_algs / lz4_max_distance (no compression)
        b[86..88].copy_from_slice(&self.extra_devices.to_le_bytes());
        b[88..90].copy_from_slice(&self.devt_slotoff.to_le_bytes());
        b[90] = self.dirblkbits;
        b
    }

    /// Decodes the on-disk form; `None` when the magic is wrong.
    pub fn decode(b: &[u8]) -> Option<SuperBlock> {
        if b.len() < SUPER_SIZE || le32(b, 0) != SUPER_MAGIC {
            return None;
        }
        Some(SuperBlock {
            checksum: le32(b, 4),
            feature_compat: le32(b, 8),
            blkszbits: b[12],
            root_nid: le16(b, 14),
            inos: le64(b, 16),
            build_time: le64(b, 24),
            build_time_nsec: le32(b, 32),
            blocks: le32(b, 36),
            meta_blkaddr: le32(b, 40),
            xattr_blkaddr: le32(b, 44),
            uuid: b[48..64].try_into().unwrap(),
            volume_name: b[64..80].try_into().unwrap(),
            feature_incompat: le32(b, 80),
            extra_devices: le16(b, 86),
            devt_slotoff: le16(b, 88),
            dirblkbits: b[90],
        })
    }
}

/// An inode in the form common to both on-disk layouts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inode {
    /// Extended (64-byte) rather than compact (32-byte) layout.
    pub extended: bool,
    /// Data layout (`LAYOUT_*`).
    pub layout: u16,
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

    /// Appends the on-disk form to `out`. Callers choose `extended` so every field fits.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let format = (if self.extended { INODE_LAYOUT_EXTENDED } else { 0 }) | (self.layout << 1);
        let start = out.len();
        out.resize(start + self.size_on_disk(), 0);
        let b = &mut out[start..];
        b[0..2].copy_from_slice(&format.to_le_bytes());
        b[2..4].copy_from_slice(&self.xattr_icount.to_le_bytes());
        b[4..6].copy_from_slice(&self.mode.to_le_bytes());
        if self.extended {
            b[8..16].copy_from_slice(&self.size.to_le_bytes());
            b[16..20].copy_from_slice(&self.i_u.to_le_bytes());
            b[20..24].copy_from_slice(&self.ino.to_le_bytes());
            b[24..28].copy_from_slice(&self.uid.to_le_bytes());
            b[28..32].copy_from_slice(&self.gid.to_le_bytes());
            b[32..40].copy_from_slice(&self.mtime.to_le_bytes());
            b[40..44].copy_from_slice(&self.mtime_nsec.to_le_bytes());
            b[44..48].copy_from_slice(&self.nlink.to_le_bytes());
        } else {
            b[6..8].copy_from_slice(&(self.nlink as u16).to_le_bytes());
            b[8..12].copy_from_slice(&(self.size as u32).to_le_bytes());
            b[16..20].copy_from_slice(&self.i_u.to_le_bytes());
            b[20..24].copy_from_slice(&self.ino.to_le_bytes());
            b[24..26].copy_from_slice(&(self.uid as u16).to_le_bytes());
            b[26..28].copy_from_slice(&(self.gid as u16).to_le_bytes());
        }
    }

    /// Decodes an inode. `b` must hold at least 64 bytes when the inode is extended;
    /// `build_time` fills the time of compact inodes. `None` if too short.
    pub fn decode(b: &[u8], build_time: u64, build_time_nsec: u32) -> Option<Inode> {
        if b.len() < COMPACT_INODE_SIZE {
            return None;
        }
        let format = le16(b, 0);
        let extended = format & INODE_LAYOUT_EXTENDED != 0;
        let layout = (format >> 1) & 0x7;
        if extended {
            if b.len() < EXTENDED_INODE_SIZE {
                return None;
            }
            Some(Inode {
                extended,
                layout,
                xattr_icount: le16(b, 2),
                mode: le16(b, 4),
                size: le64(b, 8),
                i_u: le32(b, 16),
                ino: le32(b, 20),
                uid: le32(b, 24),
                gid: le32(b, 28),
                mtime: le64(b, 32),
                mtime_nsec: le32(b, 40),
                nlink: le32(b, 44),
            })
        } else {
            Some(Inode {
                extended,
                layout,
                xattr_icount: le16(b, 2),
                mode: le16(b, 4),
                nlink: le16(b, 6) as u32,
                size: le32(b, 8) as u64,
                i_u: le32(b, 16),
                ino: le32(b, 20),
                uid: le16(b, 24) as u32,
                gid: le16(b, 26) as u32,
                mtime: build_time,
                mtime_nsec: build_time_nsec,
            })
        }
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
        let mut b = [0u8; DIRENT_SIZE];
        b[0..8].copy_from_slice(&self.nid.to_le_bytes());
        b[8..10].copy_from_slice(&self.nameoff.to_le_bytes());
        b[10] = self.file_type;
        b
    }

    /// Decodes a record from 12 bytes.
    pub fn decode(b: &[u8]) -> Dirent {
        Dirent {
            nid: le64(b, 0),
            nameoff: le16(b, 8),
            file_type: b[10],
        }
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
        b[4] = self.shared_count;
        b
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
    /// Appends header, name and value, padded to 4 bytes.
    pub fn encode_into(index: u8, suffix: &[u8], value: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.push(suffix.len() as u8);
        out.push(index);
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        out.extend_from_slice(suffix);
        out.extend_from_slice(value);
        out.resize(start + xattr_entry_size(suffix.len(), value.len()), 0);
    }

    /// Decodes the 4-byte header.
    pub fn decode(b: &[u8]) -> XattrEntry {
        XattrEntry {
            name_len: b[0],
            name_index: b[1],
            value_size: le16(b, 2),
        }
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
        let mut b = [0u8; DEVICE_SLOT_SIZE];
        b[0..64].copy_from_slice(&self.tag);
        b[64..68].copy_from_slice(&self.blocks.to_le_bytes());
        b[68..72].copy_from_slice(&self.mapped_blkaddr.to_le_bytes());
        b
    }

    /// Decodes a slot.
    pub fn decode(b: &[u8]) -> DeviceSlot {
        DeviceSlot {
            tag: b[0..64].try_into().unwrap(),
            blocks: le32(b, 64),
            mapped_blkaddr: le32(b, 68),
        }
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
        assert_eq!(SuperBlock::decode(&sb.encode()), Some(sb));
    }

    #[test]
    fn inodes_round_trip() {
        for extended in [false, true] {
            let ino = Inode {
                extended,
                layout: LAYOUT_FLAT_INLINE,
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
            out.resize(64, 0);
            assert_eq!(Inode::decode(&out, 1, 2), Some(ino));
        }
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
}
