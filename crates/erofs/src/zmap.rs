//! The map of a compressed file: its extents, and the lcluster indexes that encode them
//! (`COMPRESSED_FULL`, as erofs-utils' `z_erofs_write_full_indexes` writes them and the
//! kernel's `z_erofs_map_blocks_fo` reads them).
//!
//! A compressed file is cut into *extents* of decoded data, each stored in one physical
//! cluster (pcluster) of whole blocks: compressed, or raw when compressing did not save a
//! block. The file is also cut into *logical clusters* (lclusters) of one block each, and
//! every lcluster has an 8-byte index:
//!
//! - a **head** (`HEAD1`, or `PLAIN` for a raw extent) where an extent starts: the
//!   offset in the lcluster where it starts and its pcluster's block address;
//! - a **non-head** for lclusters no extent starts in: the distance back to the head and
//!   forward to the next one; the first non-head after a head carries the pcluster's size
//!   in blocks instead (`D0_CBLKCNT`) when pclusters may be bigger than one block.
//!
//! Hence the one rule on extents: each but the last must end in a later lcluster than the
//! one it starts in (two extents cannot start in the same lcluster). Compressed extents
//! always do (they decode to more than their pcluster, which is at least a block) and raw
//! ones are a whole block long.

use crate::format::{LclusterIndex, LclusterType, LI_D0_CBLKCNT, NULL_ADDR};

/// One extent of a compressed file, in file order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZExtent {
    /// Decoded bytes.
    pub len: u32,
    /// Stored uncompressed (a `PLAIN` lcluster): one block holding `len` bytes from its
    /// start.
    pub raw: bool,
    /// First block of the pcluster.
    pub blkaddr: u32,
    /// Blocks of the pcluster.
    pub blocks: u32,
    /// The file's last extent, its pcluster packed after the indexes (`ztailpacking`):
    /// `blkaddr` means nothing and `blocks` is 1, as erofs-utils writes it.
    pub inline: bool,
}

/// The lcluster indexes of a file of `size` bytes made of `extents` (which must cover it
/// exactly), with block-sized lclusters of `1 << bits` bytes. `big_pcluster`: the image
/// has the big pcluster feature, so first non-heads carry the pcluster size. `shift` is
/// added to every block address (the metadata-first layout moves the data).
pub fn full_indexes(extents: &[ZExtent], bits: u8, big_pcluster: bool, shift: u32) -> Vec<LclusterIndex> {
    let bs = 1u64 << bits;
    let total: u64 = extents.iter().map(|e| u64::from(e.len)).sum();
    let mut out = Vec::with_capacity(total.div_ceil(bs) as usize);
    let mut clusterofs = 0u64;
    for e in extents {
        let kind = if e.raw {
            LclusterType::Plain
        } else {
            LclusterType::Head1
        };
        let blkaddr = if e.inline {
            0
        } else if e.blkaddr == NULL_ADDR {
            e.blkaddr
        } else {
            e.blkaddr + shift
        };
        let head = LclusterIndex::head(kind, clusterofs as u16, blkaddr);
        let mut count = u64::from(e.len);
        let mut d1 = (clusterofs + count) >> bits;
        if d1 == 0 {
            // The last extent, ending inside the lcluster it starts in: no terminator.
            out.push(head);
            clusterofs = 0;
            continue;
        }
        let mut d0 = 0u64;
        loop {
            out.push(if d0 == 0 {
                head
            } else if d0 == 1 && big_pcluster {
                LclusterIndex::nonhead(head.clusterofs, e.blocks as u16 | LI_D0_CBLKCNT, d1 as u16)
            } else {
                // A distance of 2048 or more would read as a CBLKCNT: erofs-utils caps it,
                // and the reader steps back again from there.
                LclusterIndex::nonhead(head.clusterofs, d0.min(u64::from(LI_D0_CBLKCNT) - 1) as u16, d1 as u16)
            });
            count -= bs - clusterofs;
            clusterofs = 0;
            d0 += 1;
            d1 -= 1;
            if count < bs {
                break;
            }
        }
        clusterofs = count;
    }
    if clusterofs != 0 {
        // Marks where the last extent ends, inside the last lcluster.
        out.push(LclusterIndex::head(LclusterType::Plain, clusterofs as u16, 0));
    }
    out
}

/// Where the extent holding a byte is, as read from the indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapped {
    /// File offset where the extent starts.
    pub la: u64,
    /// Its decoded length.
    pub llen: u64,
    /// Raw (`PLAIN`) rather than compressed.
    pub raw: bool,
    /// Compressed with the second algorithm (`HEAD2`).
    pub head2: bool,
    /// First block of its pcluster.
    pub blkaddr: u32,
    /// Blocks of its pcluster.
    pub blocks: u32,
    /// A tail-packed pcluster: its byte position in the image and its length (set by the
    /// caller, which knows the inode; [`map`] reads indexes only).
    pub inline: Option<(u64, u32)>,
}

/// Finds the extent holding byte `pos` (< `size`) of a file whose lcluster indexes
/// `index(lcn)` returns (an error for a missing or unreadable one), with lclusters of
/// `1 << bits` bytes. `big_pcluster`: the inode's advise allows HEAD1 pclusters of more
/// than one lcluster. Every step is checked, so a hostile map ends in an error.
pub fn map<E>(
    pos: u64,
    size: u64,
    bits: u8,
    big_pcluster: bool,
    mut index: impl FnMut(u64) -> Result<LclusterIndex, E>,
    corrupt: impl Fn(String) -> E,
) -> Result<Mapped, E> {
    let bs = 1u64 << bits;
    let nidx = size.div_ceil(bs);
    // 1. The head of the extent holding pos.
    let mut lcn = pos >> bits;
    let mut i = index(lcn)?;
    let head_lcn = if i.kind() != LclusterType::NonHead && (pos & (bs - 1)) >= u64::from(i.clusterofs) {
        lcn
    } else {
        if i.kind() != LclusterType::NonHead {
            // pos is before the extent starting here: it is in the previous one.
            lcn = lcn
                .checked_sub(1)
                .ok_or_else(|| corrupt("lcluster 0 does not start at 0".into()))?;
            i = index(lcn)?;
        }
        let mut steps = 0u32;
        while i.kind() == LclusterType::NonHead {
            let back = if i.delta0() & LI_D0_CBLKCNT != 0 && big_pcluster {
                1
            } else {
                u64::from(i.delta0())
            };
            steps += 1;
            if back == 0 || back > lcn || steps > 1 << 16 {
                return Err(corrupt(format!("lcluster {lcn}: bad distance to its head")));
            }
            lcn -= back;
            i = index(lcn)?;
        }
        lcn
    };
    let head = i;
    if u64::from(head.clusterofs) >= bs {
        return Err(corrupt(format!(
            "lcluster {head_lcn}: cluster offset {} too large",
            head.clusterofs
        )));
    }
    let la = head_lcn << bits | u64::from(head.clusterofs);
    if la > pos {
        return Err(corrupt(format!("lcluster {head_lcn}: extent starts after byte {pos}")));
    }
    // 2. Its end: the next head (non-heads say how far it is).
    let mut blocks = 1u32;
    let mut l = head_lcn + 1;
    let mut first = true;
    let end = loop {
        if l >= nidx {
            break size;
        }
        let n = index(l)?;
        if n.kind() != LclusterType::NonHead {
            break (l << bits | u64::from(n.clusterofs)).min(size);
        }
        if first && n.delta0() & LI_D0_CBLKCNT != 0 && big_pcluster {
            blocks = u32::from(n.delta0() & !LI_D0_CBLKCNT);
        } else if first && big_pcluster && head.kind() == LclusterType::Head1 {
            return Err(corrupt(format!("lcluster {l}: first non-head without a pcluster size")));
        }
        first = false;
        l += u64::from(n.delta1()).max(1);
    };
    if end <= pos {
        return Err(corrupt(format!(
            "the extent at lcluster {head_lcn} ends before byte {pos}"
        )));
    }
    let raw = head.kind() == LclusterType::Plain;
    if raw {
        blocks = 1;
    }
    if blocks == 0 {
        return Err(corrupt(format!("lcluster {head_lcn}: empty pcluster")));
    }
    Ok(Mapped {
        la,
        llen: end - la,
        raw,
        head2: head.kind() == LclusterType::Head2,
        blkaddr: head.u,
        blocks,
        inline: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(len: u32, raw: bool, blkaddr: u32, blocks: u32) -> ZExtent {
        ZExtent {
            len,
            raw,
            blkaddr,
            blocks,
            inline: false,
        }
    }

    /// Every byte maps back to the extent that holds it.
    fn check(extents: &[ZExtent], big: bool) {
        let size: u64 = extents.iter().map(|e| u64::from(e.len)).sum();
        let idx = full_indexes(extents, 12, big, 0);
        assert_eq!(idx.len() as u64, size.div_ceil(4096), "{extents:?}");
        let mut la = 0u64;
        for e in extents {
            for pos in [la, la + u64::from(e.len) / 2, la + u64::from(e.len) - 1] {
                let m = map(pos, size, 12, big, |l| idx.get(l as usize).copied().ok_or(()), |_| ()).unwrap();
                assert_eq!(
                    m,
                    Mapped {
                        la,
                        llen: u64::from(e.len),
                        raw: e.raw,
                        head2: false,
                        blkaddr: e.blkaddr,
                        blocks: if e.raw {
                            1
                        } else if big {
                            e.blocks
                        } else {
                            1
                        },
                        inline: None,
                    },
                    "pos {pos} of {extents:?}"
                );
            }
            la += u64::from(e.len);
        }
    }

    #[test]
    fn extents_round_trip_through_indexes() {
        check(&[ext(10000, false, 1, 1)], false);
        check(&[ext(9000, false, 1, 1), ext(1000, true, 2, 1)], false);
        check(&[ext(8192, false, 1, 1), ext(4096, false, 2, 1)], false);
        check(
            &[ext(4096, true, 1, 1), ext(4096, true, 2, 1), ext(17, true, 3, 1)],
            false,
        );
        check(
            &[
                ext(5000, false, 1, 1),
                ext(4096, true, 2, 1),
                ext(30000, false, 3, 1),
                ext(100, true, 4, 1),
            ],
            false,
        );
        check(
            &[
                ext(70000, false, 10, 4),
                ext(20000, false, 14, 2),
                ext(4000, true, 16, 1),
            ],
            true,
        );
        check(&[ext(3000, true, 7, 1)], true);
        // Longer than 2048 lclusters: non-heads cap their distance and step back again.
        check(&[ext(9 << 20, false, 1, 8), ext(5000, false, 9, 1)], true);
    }

    #[test]
    fn hostile_indexes_are_errors() {
        let bad = |idx: Vec<LclusterIndex>, size: u64, pos: u64| {
            map(pos, size, 12, true, |l| idx.get(l as usize).copied().ok_or(()), |_| ()).is_err()
        };
        // A non-head pointing before the file, or at itself.
        assert!(bad(vec![LclusterIndex::nonhead(0, 5, 1)], 4096, 10));
        assert!(bad(vec![LclusterIndex::nonhead(0, 0, 1)], 4096, 10));
        // The first lcluster's extent starting after byte 0.
        assert!(bad(vec![LclusterIndex::head(LclusterType::Head1, 100, 1)], 4096, 10));
        // A cluster offset beyond the lcluster.
        assert!(bad(vec![LclusterIndex::head(LclusterType::Head1, 5000, 1)], 4096, 4000));
        // A missing index.
        assert!(bad(vec![], 4096, 0));
        // Big pclusters: a first non-head without the size.
        assert!(bad(
            vec![
                LclusterIndex::head(LclusterType::Head1, 0, 1),
                LclusterIndex::nonhead(0, 1, 1)
            ],
            8192,
            0
        ));
    }
}
