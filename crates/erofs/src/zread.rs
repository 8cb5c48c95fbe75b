//! Reading compressed files: the map header, lcluster indexes in both layouts (full, as
//! this crate writes them, and compact, as `mkfs.erofs -z` does by default), and
//! decoding extents.
//!
//! Compact indexes are decoded into the full form ([`LclusterIndex`]) lcluster by
//! lcluster, as the kernel's `z_erofs_load_compact_lcluster` does, so one walk
//! ([`zmap::map`]) serves both.
//!
//! Tail-packed pclusters (`ztailpacking`) are read as the kernel reads them: the
//! extent holding the file's last byte has its pcluster right after the index of the
//! last lcluster (full indexes) or after the pack holding it (compact ones), within one
//! block.
//!
//! Not read (refused with an error naming the feature): fragments and encoded extents
//! (48-bit images).

use std::sync::Mutex;

use crate::format::{
    self, xattr_ibody_size, z_advise, Algorithm, DataLayout, LclusterIndex, LclusterType, MapHeader,
    FEATURE_INCOMPAT_COMPR_CFGS, FEATURE_INCOMPAT_ZERO_PADDING, LI_D0_CBLKCNT, MAP_HEADER_SIZE,
};
use crate::reader::{Entry, Error, Image, Result};
use crate::zmap::{self, Mapped};

/// What a compressed inode's map header says, checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ZInfo {
    pub(crate) alg: Algorithm,
    pub(crate) bits: u8,
    big: bool,
    compact: bool,
    compact_2b: bool,
    interlaced: bool,
    /// Full: where the indexes start. Compact: `ebase`, right after the header.
    base: u64,
    pub(crate) size: u64,
    /// The tail-packed last extent: where it starts in the file, and its pcluster's
    /// position in the image and length.
    tail: Option<(u64, u64, u32)>,
}

/// The last extent decoded, kept so that block-sized reads of one extent decode it once.
#[derive(Debug, Default)]
pub(crate) struct ZCache {
    key: Option<(u64, u64)>,
    data: Vec<u8>,
}

pub(crate) type ZCacheCell = Mutex<ZCache>;

/// How errors about features this reader lacks end (the validator reports them as
/// unsupported rather than corrupt).
pub const UNSUPPORTED: &str = "which this reader does not support";

/// What errors about compressed data that fails to decode say. The validator checks
/// maps, not data: such an error can come from a validated image, as a read error does
/// from the kernel.
pub const DOES_NOT_DECODE: &str = "does not decode";

fn corrupt(nid: u64, why: String) -> Error {
    Error::Corrupt(format!("compressed nid {nid}: {why}"))
}

impl Image {
    /// Reads and checks the map header of a compressed inode.
    pub(crate) fn zinfo(&self, e: &Entry) -> Result<ZInfo> {
        let nid = e.nid;
        let ino = &e.inode;
        let end = self.inode_offset(nid)? + ino.size_on_disk() as u64 + xattr_ibody_size(ino.xattr_icount) as u64;
        let hpos = format::map_header_start(end);
        let mut raw = [0u8; MAP_HEADER_SIZE];
        self.read_exact(hpos, &mut raw, || format!("map header of nid {nid}"))?;
        let h = MapHeader::decode(&raw).map_err(|e| corrupt(nid, e.to_string()))?;
        let compact = ino.layout == DataLayout::CompressedCompact;
        let unsupported = |what: &str| corrupt(nid, format!("{what}, {UNSUPPORTED}"));
        if h.clusterbits & 0x80 != 0 || h.advise & z_advise::FRAGMENT_PCLUSTER != 0 {
            return Err(unsupported("data in a fragment of the packed inode"));
        }
        if !compact && h.advise & z_advise::EXTENTS != 0 {
            return Err(unsupported("encoded extents"));
        }
        if self.sb.feature_incompat & FEATURE_INCOMPAT_ZERO_PADDING == 0 {
            return Err(unsupported("compressed data without zero padding (pre-5.3 images)"));
        }
        let alg = Algorithm::from_raw(h.algorithm_head1)
            .ok_or_else(|| corrupt(nid, format!("unknown algorithm {}", h.algorithm_head1)))?;
        let available = if self.sb.feature_incompat & FEATURE_INCOMPAT_COMPR_CFGS != 0 {
            self.sb.compr_algs
        } else {
            Algorithm::Lz4.bit()
        };
        if available & alg.bit() == 0 {
            return Err(corrupt(nid, format!("algorithm {alg:?} is not among the image's")));
        }
        let bits = self.sb.blkszbits + (h.clusterbits & 0xf);
        // Compact indexes encode cluster offsets in at most 14 bits; full ones in 16.
        if bits > if compact { 14 } else { 16 } {
            return Err(corrupt(nid, format!("lcluster size 2^{bits} out of range")));
        }
        let big = h.advise & z_advise::BIG_PCLUSTER_1 != 0;
        if big && self.sb.feature_incompat & format::FEATURE_INCOMPAT_BIG_PCLUSTER == 0 {
            return Err(corrupt(nid, "big pclusters in an image without the feature".into()));
        }
        if compact && big != (h.advise & z_advise::BIG_PCLUSTER_2 != 0) {
            return Err(corrupt(
                nid,
                "compact indexes with only one of the two big pcluster bits".into(),
            ));
        }
        let base = if compact {
            hpos + MAP_HEADER_SIZE as u64
        } else {
            format::full_index_start(end)
        };
        let mut z = ZInfo {
            alg,
            bits,
            big,
            compact,
            compact_2b: compact && h.advise & z_advise::COMPACTED_2B != 0,
            interlaced: h.advise & z_advise::INTERLACED_PCLUSTER != 0,
            base,
            size: ino.size,
            tail: None,
        };
        if h.advise & z_advise::INLINE_PCLUSTER != 0 {
            z.tail = Some(self.ztail(nid, &z, h.idata_size)?);
        }
        Ok(z)
    }

    /// Finds the tail-packed pcluster of `idata` bytes, as the kernel's
    /// `z_erofs_fill_inode_lazy` does: the extent holding the last byte is the tail, and
    /// its data follows the index (or index pack) of the last lcluster.
    fn ztail(&self, nid: u64, z: &ZInfo, idata: u16) -> Result<(u64, u64, u32)> {
        if z.size == 0 || idata == 0 {
            return Err(corrupt(
                nid,
                format!("a tail-packed pcluster of {idata} bytes in a file of {} bytes", z.size),
            ));
        }
        if z.interlaced {
            return Err(corrupt(
                nid,
                format!("a tail-packed pcluster with interlaced raw extents, {UNSUPPORTED}"),
            ));
        }
        let m = self.zmap(nid, z, z.size - 1)?;
        let last = (z.size - 1) >> z.bits;
        let pa = if z.compact {
            let (pos, shift) = self.compact_pos(z, last, z.size.div_ceil(1 << z.bits));
            let pack_len = if shift == 2 { 8 } else { 32 };
            pos / pack_len * pack_len + pack_len
        } else {
            z.base + (last + 1) * format::LCLUSTER_INDEX_SIZE as u64
        };
        let bs = self.block_size;
        if pa % bs + u64::from(idata) > bs {
            return Err(corrupt(
                nid,
                format!("the tail-packed pcluster of {idata} bytes at byte {pa} crosses a block boundary"),
            ));
        }
        if m.raw && m.llen > u64::from(idata) {
            return Err(corrupt(
                nid,
                format!("a raw tail of {} bytes in a tail-packed pcluster of {idata}", m.llen),
            ));
        }
        Ok((m.la, pa, u32::from(idata)))
    }

    /// The index of lcluster `lcn`, decoded from either layout.
    pub(crate) fn zindex(&self, nid: u64, z: &ZInfo, lcn: u64) -> Result<LclusterIndex> {
        let total = z.size.div_ceil(1 << z.bits);
        if lcn >= total {
            return Err(corrupt(nid, format!("lcluster {lcn} beyond the last ({total})")));
        }
        if !z.compact {
            let mut raw = [0u8; format::LCLUSTER_INDEX_SIZE];
            let at = z.base + lcn * format::LCLUSTER_INDEX_SIZE as u64;
            self.read_exact(at, &mut raw, || format!("lcluster index {lcn} of nid {nid}"))?;
            return LclusterIndex::decode(&raw).map_err(|e| corrupt(nid, e.to_string()));
        }
        self.compact_index(nid, z, lcn, total)
    }

    /// Compact indexes come in packs: 2 lclusters in 8 bytes (4B) or 16 in 32 bytes (2B),
    /// each lcluster a 2-bit type and a `lobits` value, and the pack's first block address
    /// in its last 4 bytes; a head's address is that plus the pclusters before it in the
    /// pack. First come up to 7 4B entries (to align the 2B packs to 32 bytes), then 2B
    /// packs (with `COMPACTED_2B`), then 4B packs.
    fn compact_index(&self, nid: u64, z: &ZInfo, lcn: u64, total: u64) -> Result<LclusterIndex> {
        let (pos, shift) = self.compact_pos(z, lcn, total);
        let vcnt: u64 = if shift == 2 { 2 } else { 16 };
        if shift == 1 && z.bits > 12 {
            return Err(corrupt(nid, "2-byte compact indexes with lclusters over 4 KiB".into()));
        }

        let pack_len = vcnt << shift;
        let pack_start = pos / pack_len * pack_len;
        let mut pack = vec![0u8; pack_len as usize + 4];
        self.read_exact(pack_start, &mut pack[..pack_len as usize], || {
            format!("compact index pack of lcluster {lcn} of nid {nid}")
        })?;
        let lobits = u32::from(z.bits).max(12);
        let encodebits = ((pack_len as u32 - 4) * 8) / vcnt as u32;
        let decode = |i: i64| -> (u32, LclusterType) {
            let bit = encodebits as usize * i as usize;
            let v = u32::from_le_bytes(pack[bit / 8..bit / 8 + 4].try_into().expect("4 bytes")) >> (bit % 8);
            let kind = match (v >> lobits) & 3 {
                0 => LclusterType::Plain,
                1 => LclusterType::Head1,
                2 => LclusterType::NonHead,
                _ => LclusterType::Head2,
            };
            (v & ((1 << lobits) - 1), kind)
        };
        let i = ((pos - pack_start) >> shift) as i64;
        let (lo, kind) = decode(i);
        if kind == LclusterType::NonHead {
            // delta[1]: non-heads from here to the next head (the pack's last entry holds
            // the rest of the distance).
            let mut d1 = 0u32;
            let mut j = i;
            loop {
                let (lo_j, k) = decode(j);
                if k != LclusterType::NonHead {
                    break;
                }
                d1 += 1;
                j += 1;
                if j >= vcnt as i64 {
                    if lo_j & u32::from(LI_D0_CBLKCNT) == 0 {
                        d1 += lo_j.saturating_sub(1);
                    }
                    break;
                }
            }
            let d1 = d1.min(u32::from(u16::MAX)) as u16;
            if lo & u32::from(LI_D0_CBLKCNT) != 0 {
                if !z.big {
                    return Err(corrupt(nid, format!("lcluster {lcn}: CBLKCNT without big pclusters")));
                }
                return Ok(LclusterIndex::nonhead(0, lo as u16, d1));
            }
            let d0 = if i + 1 != vcnt as i64 {
                lo
            } else {
                // The pack's last entry holds delta[1]: delta[0] comes from the one before.
                let (plo, pk) = decode(i - 1);
                let plo = if pk != LclusterType::NonHead {
                    0
                } else if plo & u32::from(LI_D0_CBLKCNT) != 0 {
                    1
                } else {
                    plo
                };
                plo + 1
            };
            return Ok(LclusterIndex::nonhead(
                0,
                d0.min(u32::from(LI_D0_CBLKCNT) - 1) as u16,
                d1,
            ));
        }
        // A head: the pack's base address plus the pclusters of the heads before it.
        let mut nblk: u64 = if z.big { 0 } else { 1 };
        let mut j = i;
        while j > 0 {
            j -= 1;
            let (lo_j, k) = decode(j);
            if !z.big {
                if k == LclusterType::NonHead {
                    j -= i64::from(lo_j);
                }
                if j >= 0 {
                    nblk += 1;
                }
            } else if k == LclusterType::NonHead {
                if lo_j & u32::from(LI_D0_CBLKCNT) != 0 {
                    j -= 1;
                    nblk += u64::from(lo_j & !u32::from(LI_D0_CBLKCNT));
                    continue;
                }
                if lo_j <= 1 {
                    return Err(corrupt(nid, format!("lcluster {lcn}: bad big pcluster distance")));
                }
                j -= i64::from(lo_j) - 2;
            } else {
                nblk += 1;
            }
        }
        let base = u32::from_le_bytes(
            pack[pack_len as usize - 4..pack_len as usize]
                .try_into()
                .expect("4 bytes"),
        );
        let blkaddr = u64::from(base) + nblk;
        let blkaddr = u32::try_from(blkaddr).map_err(|_| corrupt(nid, format!("lcluster {lcn}: address overflow")))?;
        Ok(LclusterIndex::head(kind, lo as u16, blkaddr))
    }

    /// Where lcluster `lcn`'s compact index is, and log2 of its amortized size: 2 in 4B
    /// packs, 1 in 2B packs.
    fn compact_pos(&self, z: &ZInfo, lcn: u64, total: u64) -> (u64, u32) {
        let initial = ((32 - z.base % 32) / 4) & 7;
        let two_b = if z.compact_2b && initial < total {
            (total - initial) / 16 * 16
        } else {
            0
        };
        let mut pos = z.base;
        let mut shift = 2u32;
        let mut l = lcn;
        if l >= initial {
            pos += initial * 4;
            l -= initial;
            if l < two_b {
                shift = 1;
            } else {
                pos += two_b * 2;
                l -= two_b;
            }
        }
        pos += l << shift;
        (pos, shift)
    }

    /// The extent holding byte `pos` of a compressed file.
    pub(crate) fn zmap(&self, nid: u64, z: &ZInfo, pos: u64) -> Result<Mapped> {
        let m = zmap::map(
            pos,
            z.size,
            z.bits,
            z.big,
            |lcn| self.zindex(nid, z, lcn),
            |why| corrupt(nid, why),
        )?;
        let bs = self.block_size;
        let lcluster = 1u64 << z.bits;
        if let Some((la, pa, plen)) = z.tail.filter(|t| t.0 == m.la) {
            // `ztail` checked the raw tail's length against the pcluster.
            if m.head2 {
                return Err(corrupt(
                    nid,
                    format!("a second algorithm (HEAD2) at {la}, {UNSUPPORTED}"),
                ));
            }
            return Ok(Mapped {
                blocks: 0,
                inline: Some((pa, plen)),
                ..m
            });
        }
        if m.head2 {
            return Err(corrupt(
                nid,
                format!("a second algorithm (HEAD2) at {}, {UNSUPPORTED}", m.la),
            ));
        }
        let blocks = if m.raw { lcluster / bs } else { u64::from(m.blocks) };
        if m.raw && m.llen > blocks * bs {
            return Err(corrupt(
                nid,
                format!("raw extent at {} of {} bytes, longer than its pcluster", m.la, m.llen),
            ));
        }
        if !m.raw && m.llen > format::PCLUSTER_MAX_DSIZE {
            return Err(corrupt(
                nid,
                format!("extent at {} decodes to {} bytes, more than 12 MiB", m.la, m.llen),
            ));
        }
        if blocks * bs > format::PCLUSTER_MAX_SIZE {
            return Err(corrupt(nid, format!("pcluster of {blocks} blocks, more than 1 MiB")));
        }
        Ok(Mapped {
            blocks: blocks as u32,
            ..m
        })
    }

    /// Decodes the extent `m` of a compressed file.
    fn zdecode(&self, nid: u64, z: &ZInfo, m: &Mapped) -> Result<Vec<u8>> {
        let bs = self.block_size;
        let mut out = vec![0u8; m.llen as usize];
        let pcl = match m.inline {
            Some((pa, plen)) => {
                // In the metadata, which is always on the primary device.
                let mut pcl = vec![0u8; plen as usize];
                self.read_exact(pa, &mut pcl, || format!("tail-packed pcluster of nid {nid}"))?;
                if m.raw {
                    let n = out.len();
                    out.copy_from_slice(&pcl[..n]);
                    return Ok(out);
                }
                pcl
            }
            None => {
                let pa = u64::from(m.blkaddr) * bs;
                let mut pcl = vec![0u8; m.blocks as usize * bs as usize];
                let what = || format!("pcluster at block {} of nid {nid}", m.blkaddr);
                match self.map_dev(0, pa, nid, m.la)? {
                    (None, at) => self.read_exact(at, &mut pcl, what)?,
                    (Some(d), at) => {
                        use std::os::unix::fs::FileExt;
                        if at.checked_add(pcl.len() as u64).is_none_or(|end| end > d.size) {
                            return Err(corrupt(nid, format!("{} lies beyond its device", what())));
                        }
                        d.file.read_exact_at(&mut pcl, at)?;
                    }
                }
                pcl
            }
        };
        if m.raw {
            // Interlaced: the block is rotated so that the extent's bytes sit at their
            // offset in the lcluster.
            let ofs = if z.interlaced { (m.la % bs) as usize } else { 0 };
            for (i, b) in out.iter_mut().enumerate() {
                *b = pcl[(ofs + i) % pcl.len()];
            }
            return Ok(out);
        }
        let start = pcl.iter().position(|&b| b != 0).ok_or_else(|| {
            corrupt(
                nid,
                format!("pcluster of the extent at {} {DOES_NOT_DECODE}: all zeros", m.la),
            )
        })?;
        crate::compress::decompress(z.alg, &pcl[start..], &mut out)
            .map_err(|why| corrupt(nid, format!("extent at {} {DOES_NOT_DECODE}: {why}", m.la)))?;
        Ok(out)
    }

    /// Reads compressed file data at `offset` into `buf`.
    pub(crate) fn read_compressed(&self, e: &Entry, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let z = self.zinfo(e)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset.saturating_add(done as u64);
            if pos >= z.size {
                break;
            }
            let mut cache = self.zcache.lock().unwrap_or_else(|p| p.into_inner());
            let (la, data) = match cache.key {
                Some((nid, la)) if nid == e.nid && la <= pos && pos - la < cache.data.len() as u64 => (la, &cache.data),
                _ => {
                    let m = self.zmap(e.nid, &z, pos)?;
                    let data = self.zdecode(e.nid, &z, &m)?;
                    cache.key = Some((e.nid, m.la));
                    cache.data = data;
                    (m.la, &cache.data)
                }
            };
            let from = (pos - la) as usize;
            let n = (buf.len() - done).min(data.len() - from);
            buf[done..done + n].copy_from_slice(&data[from..from + n]);
            done += n;
        }
        Ok(done)
    }
}
