//! Compressing file bodies for the writer, on worker threads.
//!
//! The writer hands over each file body (cut into segments of [`SEGMENT`] bytes) and goes
//! on parsing; workers cut segments into extents and compress them
//! ([`compress_segment`]); the writer takes the results back **in submission order**, so
//! the data area's layout depends only on the input, never on thread timing.
//!
//! Segments start on block boundaries, so each one's extents can be cut without looking
//! at its neighbours: the last extent of a segment ends on a block boundary, which is
//! always a valid place for an extent to end (`zmap`).

use std::collections::BTreeMap;
use std::io;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::compress::{Codec, Compressor};

/// Bytes of a file body compressed as one job. Bodies up to this size are compressed
/// whole, so the writer can still store them uncompressed when that is smaller.
pub const SEGMENT: usize = 4 << 20;

/// Longest input one extent takes: a bound on what one read may have to decode (the
/// kernel's limit is 12 MiB, `Z_EROFS_PCLUSTER_MAX_DSIZE`).
pub const MAX_EXTENT_INPUT: usize = 1 << 20;

/// One extent as a worker produced it.
#[derive(Debug)]
pub enum Piece {
    /// `len` bytes compressed into `bytes`: whole blocks, the stream at their end after
    /// zero padding (`ZERO_PADDING`, which every kernel with compression reads).
    Compressed { len: u32, bytes: Vec<u8> },
    /// `len` (≤ one block) bytes stored as they are, from the segment's data.
    Raw { len: u32 },
    /// The file's last `len` bytes, packed after the inode's indexes (`ztailpacking`):
    /// compressed into `bytes`, or as they are (from the segment's data) with `None`.
    Inline { len: u32, compressed: Option<Vec<u8>> },
}

/// Cuts one segment into extents. `start` is the segment's offset in the file (a
/// multiple of the block size `bs`); `last`: the file ends with this segment.
///
/// As `mkfs.erofs` does: every pcluster is filled with as much input as fits
/// (destination-size compression) and kept only when it saves at least a block
/// against storing that input raw; input that does not compress is stored raw a block at
/// a time; and a file's last bytes that fit in a block are stored raw (compressing them
/// cannot save a block).
///
/// With `inline` > 0 (the most bytes that fit after the inode's indexes in its block),
/// the file's tail is packed there as `mkfs.erofs -E ztailpacking` packs it: everything
/// left compressed into one inline pcluster when it fits, or else, for the last bytes
/// under a block, those bytes as they are. Inline data saves bytes, not blocks, so any
/// saving counts.
pub fn compress_segment(
    c: &mut Compressor,
    data: &[u8],
    last: bool,
    bs: usize,
    pcluster: usize,
    inline: usize,
) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut dst = vec![0u8; pcluster];
    let mut head = 0usize;
    let packs = last && inline > 0;
    while head < data.len() {
        let rem = data.len() - head;
        if last && rem <= bs && !packs {
            pieces.push(Piece::Raw { len: rem as u32 });
            break;
        }
        let input = &data[head..head + rem.min(MAX_EXTENT_INPUT)];
        let attempt = c.compress_destsize(input, &mut dst);
        if packs {
            match attempt {
                Some((used, w)) if used == rem && w <= inline && w < used && dst[0] != 0 => {
                    pieces.push(Piece::Inline {
                        len: rem as u32,
                        compressed: Some(dst[..w].to_vec()),
                    });
                    break;
                }
                _ if rem < bs && rem <= inline => {
                    pieces.push(Piece::Inline {
                        len: rem as u32,
                        compressed: None,
                    });
                    break;
                }
                _ if rem <= bs => {
                    pieces.push(Piece::Raw { len: rem as u32 });
                    break;
                }
                _ => {}
            }
        }
        match attempt {
            // The stream must not start with a zero byte: the kernel finds its start by
            // skipping the padding's zeros.
            Some((used, w)) if w.next_multiple_of(bs) < used && dst[0] != 0 => {
                let plen = w.next_multiple_of(bs);
                let mut bytes = vec![0u8; plen];
                bytes[plen - w..].copy_from_slice(&dst[..w]);
                pieces.push(Piece::Compressed {
                    len: used as u32,
                    bytes,
                });
                head += used;
            }
            _ => {
                // Raw blocks for what was tried, so incompressible data is compressed
                // about once, not once per block.
                let tried = attempt.map_or(bs, |(used, _)| used).max(bs);
                for _ in 0..(tried / bs).max(1) {
                    let len = bs.min(data.len() - head);
                    if len == 0 {
                        break;
                    }
                    pieces.push(Piece::Raw { len: len as u32 });
                    head += len;
                }
            }
        }
    }
    pieces
}

struct Job {
    seq: u64,
    data: Vec<u8>,
    last: bool,
    inline: usize,
}

/// A finished job: the segment's data back (raw pieces and the whole-file fallback need
/// it) and its extents.
pub struct Done {
    /// The segment's bytes.
    pub data: Vec<u8>,
    /// Its extents, in order.
    pub pieces: Vec<Piece>,
}

/// The worker threads and the reorder buffer.
pub struct Pipeline {
    jobs: Option<Sender<Job>>,
    results: Receiver<io::Result<(u64, Done)>>,
    workers: Vec<JoinHandle<()>>,
    next_seq: u64,
    next_out: u64,
    ready: BTreeMap<u64, Done>,
    /// Bytes handed over and not yet taken back, and the bound on them.
    in_flight: usize,
    max_in_flight: usize,
}

impl Pipeline {
    /// Starts `workers` threads compressing with `codec` into pclusters of `pcluster`
    /// bytes (blocks of `bs`).
    pub fn new(codec: Codec, workers: usize, bs: usize, pcluster: usize) -> io::Result<Pipeline> {
        let (job_tx, job_rx) = channel::<Job>();
        let (res_tx, res_rx) = channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let workers = workers.max(1);
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers {
            let job_rx = Arc::clone(&job_rx);
            let res_tx = res_tx.clone();
            let mut comp = Compressor::new(codec, pcluster)?;
            handles.push(
                std::thread::Builder::new()
                    .name(format!("erofs-z{i}"))
                    .spawn(move || loop {
                        let job = match job_rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                            Ok(j) => j,
                            Err(_) => return,
                        };
                        let pieces = compress_segment(&mut comp, &job.data, job.last, bs, pcluster, job.inline);
                        if res_tx.send(Ok((job.seq, Done { data: job.data, pieces }))).is_err() {
                            return;
                        }
                    })?,
            );
        }
        Ok(Pipeline {
            jobs: Some(job_tx),
            results: res_rx,
            workers: handles,
            next_seq: 0,
            next_out: 0,
            ready: BTreeMap::new(),
            in_flight: 0,
            max_in_flight: (2 * workers + 2) * SEGMENT,
        })
    }

    /// Queues a segment; returns its sequence number. `last`: the file ends with it;
    /// `inline`: bytes its tail may take packed after the inode (see [`compress_segment`]).
    pub fn submit(&mut self, data: Vec<u8>, last: bool, inline: usize) -> io::Result<u64> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight += data.len();
        self.jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("compression workers stopped"))?
            .send(Job {
                seq,
                data,
                last,
                inline,
            })
            .map_err(|_| io::Error::other("compression workers stopped"))?;
        Ok(seq)
    }

    /// Whether every submitted segment has been taken back.
    pub fn idle(&self) -> bool {
        self.next_out == self.next_seq
    }

    /// Queues data that is not to be compressed (a small file stored plain), so that it
    /// comes back in its place in the order without waiting for the segments before it
    /// to be compressed; returns its sequence number.
    pub fn pass(&mut self, data: Vec<u8>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight += data.len();
        self.ready.insert(
            seq,
            Done {
                data,
                pieces: Vec::new(),
            },
        );
        seq
    }

    /// Whether the writer must take results back before submitting more (bounds memory:
    /// a few segments per worker, whether being compressed or waiting their turn).
    pub fn full(&self) -> bool {
        self.in_flight >= self.max_in_flight
    }

    /// The next result in submission order: waits for it when `wait`, else `None` when it
    /// is not done yet (or nothing is pending).
    pub fn next(&mut self, wait: bool) -> io::Result<Option<(u64, Done)>> {
        loop {
            if self.idle() {
                return Ok(None);
            }
            if let Some(d) = self.ready.remove(&self.next_out) {
                let seq = self.next_out;
                self.next_out += 1;
                self.in_flight -= d.data.len();
                return Ok(Some((seq, d)));
            }
            let got = if wait {
                self.results
                    .recv()
                    .map_err(|_| io::Error::other("a compression worker died"))?
            } else {
                match self.results.try_recv() {
                    Ok(r) => r,
                    Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(None),
                    Err(_) => return Err(io::Error::other("a compression worker died")),
                }
            };
            let (seq, done) = got?;
            self.ready.insert(seq, done);
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(p: &[Piece]) -> usize {
        p.iter()
            .map(|p| match p {
                Piece::Compressed { len, .. } | Piece::Raw { len } | Piece::Inline { len, .. } => *len as usize,
            })
            .sum()
    }

    #[test]
    fn segments_are_cut_into_valid_extents() {
        let codec: Codec = "lz4hc".parse().unwrap();
        let mut c = Compressor::new(codec, 4096).unwrap();
        let mut x = 7u64;
        let mut random = vec![0u8; 50_000];
        for b in &mut random {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *b = (x >> 56) as u8;
        }
        let text: Vec<u8> = b"some text that repeats; "
            .iter()
            .cycle()
            .take(70_000)
            .copied()
            .collect();
        let mut mixed = text.clone();
        mixed.extend_from_slice(&random);
        mixed.extend_from_slice(&text[..12_345]);
        for (data, last) in [
            (&random, true),
            (&text, true),
            (&mixed, true),
            (&mixed[..65536].to_vec(), false),
        ] {
            let p = compress_segment(&mut c, data, last, 4096, 4096, 0);
            assert_eq!(total(&p), data.len());
            // Every extent but the last ends in a later block than it starts in.
            let mut at = 0usize;
            for (i, piece) in p.iter().enumerate() {
                let len = match piece {
                    Piece::Compressed { len, bytes } => {
                        assert!(bytes.len() % 4096 == 0 && bytes.len() < *len as usize);
                        *len as usize
                    }
                    Piece::Raw { len } => {
                        assert!(*len as usize <= 4096);
                        *len as usize
                    }
                    Piece::Inline { .. } => unreachable!("no inline budget"),
                };
                if i + 1 < p.len() {
                    assert!((at % 4096) + len >= 4096, "extent {i} at {at} of {len}");
                }
                at += len;
            }
        }
        // Random data is stored raw, text compressed.
        let p = compress_segment(&mut c, &random, true, 4096, 4096, 0);
        assert!(p.iter().all(|p| matches!(p, Piece::Raw { .. })));
        let p = compress_segment(&mut c, &text, true, 4096, 4096, 0);
        assert!(p.len() < 10);
    }

    #[test]
    fn tails_are_packed_where_they_fit() {
        let mut c = Compressor::new("lz4hc".parse().unwrap(), 4096).unwrap();
        let text: Vec<u8> = (0..300_000u32)
            .map(|i| b"tail packing "[(i * 7 % 13) as usize])
            .collect();
        let random = test_support::pseudo_random(3000, 9);
        // All of a compressible file in one inline pcluster.
        let p = compress_segment(&mut c, &text[..9000], true, 4096, 4096, 3000);
        assert!(matches!(&p[..], [Piece::Inline { len: 9000, compressed: Some(b) }] if b.len() <= 3000));
        // Incompressible bytes under a block: inline as they are, if they fit.
        let p = compress_segment(&mut c, &random, true, 4096, 4096, 3500);
        assert!(matches!(
            &p[..],
            [Piece::Inline {
                len: 3000,
                compressed: None
            }]
        ));
        let p = compress_segment(&mut c, &random, true, 4096, 4096, 2999);
        assert!(matches!(&p[..], [Piece::Raw { len: 3000 }]));
        // Not the file's last segment: nothing inline.
        let p = compress_segment(&mut c, &text[..65536], false, 4096, 4096, 3000);
        assert!(p.iter().all(|p| !matches!(p, Piece::Inline { .. })));
        // A long file: raw blocks, then the tail inline, the lengths adding up.
        let mut long = test_support::pseudo_random(16_384, 4);
        long.extend_from_slice(&text[..30_000]);
        let p = compress_segment(&mut c, &long, true, 4096, 4096, 2000);
        assert_eq!(total(&p), long.len());
        let kinds: Vec<_> = p
            .iter()
            .map(|p| match p {
                Piece::Compressed { len, bytes } => format!("C{len}/{}", bytes.len()),
                Piece::Raw { len } => format!("R{len}"),
                Piece::Inline { len, compressed } => format!("I{len}/{:?}", compressed.as_ref().map(Vec::len)),
            })
            .collect();
        assert!(
            matches!(
                p.last(),
                Some(Piece::Inline {
                    compressed: Some(_),
                    ..
                })
            ),
            "{kinds:?}"
        );
        assert_eq!(p.iter().filter(|p| matches!(p, Piece::Inline { .. })).count(), 1);
    }

    #[test]
    fn results_come_back_in_order() {
        let mut p = Pipeline::new("lz4".parse().unwrap(), 3, 4096, 4096).unwrap();
        let sizes = [100_000usize, 10, 5000, 300_000, 1, 8192];
        for (i, n) in sizes.iter().enumerate() {
            p.submit(vec![i as u8 + 1; *n], true, 0).unwrap();
        }
        for (i, n) in sizes.iter().enumerate() {
            let (seq, d) = p.next(true).unwrap().unwrap();
            assert_eq!((seq, d.data.len(), total(&d.pieces)), (i as u64, *n, *n));
        }
        assert!(p.idle() && p.next(true).unwrap().is_none());
    }
}
