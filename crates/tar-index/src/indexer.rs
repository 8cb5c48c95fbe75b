//! The one-pass indexer: decompresses a layer for its caller and records the index.

use std::io::{self, BufRead, Read};

use sha2::{Digest, Sha256};

use crate::gzip::{self, MAX_HEADER, TRAILER};
use crate::zlib::{self, RawInflate, DT_AT_BOUNDARY, DT_BITS, DT_LAST_BLOCK, Z_BLOCK};
use crate::zstdf::{self, MAX_FRAME_HEADER, MIN_WINDOW_LOG};
use crate::{Checkpoint, CheckpointKind, ChunkEntry, Error, Format, Index, IndexOptions, MAX_SKIP_CHUNKS, WINDOW_SIZE};

/// Input buffer: holds the largest gzip header flate2 accepts, plus a little history.
const IN_BUF: usize = 256 << 10;
/// Input bytes kept before the read position when the buffer is compacted: a gzip
/// checkpoint's partial byte can lie up to 8 bytes back (zlib's 64-bit bit buffer).
const IN_HISTORY: usize = 16;
/// Output buffer, after the window history kept in front.
const OUT_BUF: usize = 1 << 20;
/// Largest output of one decoder call: small enough that the bytes are still in cache
/// when they are hashed.
const STEP: usize = 256 << 10;
/// zstd level of the stored windows.
const WINDOW_LEVEL: i32 = 3;

/// Reads a compressed layer, yields its uncompressed bytes (implements [`Read`] and
/// [`BufRead`]), and records the index as a side effect, in the same pass.
///
/// Errors while reading come out as [`io::Error`]s that convert back into the crate's
/// [`Error`] (`Error::from(io_error)`); they are sticky, and [`finish`](Indexer::finish)
/// returns them too. A stream is accepted exactly when the project's decoders
/// (`flate2::bufread::MultiGzDecoder`, `zstd::stream::read::Decoder`) accept it.
pub struct Indexer<R: Read> {
    input: Input<R>,
    format: Format,
    chunk_size: u64,
    max_uncompressed: u64,

    /// Output: `obuf[opos..oend]` is what the caller has not consumed yet; before it,
    /// up to 32 KiB of history for the gzip windows.
    obuf: Box<[u8]>,
    opos: usize,
    oend: usize,
    /// Uncompressed offset of `obuf[0]`.
    obase: u64,

    unc_hash: Sha256,
    chunk_hash: Sha256,
    chunk_digests: Vec<[u8; 32]>,
    chunks: Vec<ChunkEntry>,
    checkpoints: Vec<Checkpoint>,
    /// The latest restart point seen: becomes the checkpoint of the next chunk to start.
    cand: Option<Cand>,
    max_distance: u64,
    no_random_access: bool,
    zstd_window_log: u8,
    window_compressor: Option<zstd::bulk::Compressor<'static>>,

    engine: Engine,
    state: State,
}

enum State {
    Running,
    Done,
    Failed(Error),
}

/// A restart point not yet (or already) made a checkpoint.
struct Cand {
    kind: CheckpointKind,
    in_off: u64,
    bits: u8,
    partial: u8,
    out_off: u64,
    /// Uncompressed offset where the window starts (`out_off` for none).
    win_start: u64,
    /// The window, copied out once the output buffer no longer holds it.
    saved: Option<Vec<u8>>,
    /// Its index among the checkpoints, once it is one.
    checkpoint: Option<u32>,
}

enum Engine {
    Gzip(GzEngine),
    Zstd(ZstdEngine),
}

struct GzEngine {
    z: RawInflate,
    phase: GzPhase,
    crc: u32,
    member_len: u64,
    /// Uncompressed offset where the current member's output starts.
    member_out: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum GzPhase {
    Header,
    Body,
    Trailer,
}

struct ZstdEngine {
    d: zstd::zstd_safe::DCtx<'static>,
    /// Nothing decoded yet: the next input starts the first frame.
    fresh: bool,
    /// The decoder returned 0: a frame (or skippable frame) just ended.
    finished_frame: bool,
}

/// What one decoder step did.
#[derive(Default)]
struct StepOut {
    /// A restart point (member/frame start) at this compressed offset, before the output.
    start: Option<u64>,
    /// Bytes written at `obuf[oend..]`.
    produced: usize,
    /// A deflate block boundary after the output: (bit position in the input, member
    /// output start).
    boundary: Option<u64>,
    /// The stream ended properly (all input consumed).
    done: bool,
}

/// Buffered compressed input, hashed as it is read.
struct Input<R> {
    inner: R,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    /// Compressed offset of `buf[0]`.
    base: u64,
    eof: bool,
    hash: Sha256,
}

impl<R: Read> Input<R> {
    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    fn consume(&mut self, n: usize) {
        debug_assert!(self.pos + n <= self.end);
        self.pos += n;
    }

    /// Compressed offset of the next unconsumed byte.
    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// The input byte at compressed offset `off`, if still buffered.
    fn byte_at(&self, off: u64) -> Option<u8> {
        let i = usize::try_from(off.checked_sub(self.base)?).ok()?;
        if i < self.end {
            Some(self.buf[i])
        } else {
            None
        }
    }

    /// Reads more input (one `read` call that returns data, or EOF).
    fn fill(&mut self) -> io::Result<()> {
        if self.eof {
            return Ok(());
        }
        if self.buf.len() - self.end < self.buf.len() / 4 {
            let from = self.pos.saturating_sub(IN_HISTORY);
            if from == 0 && self.end == self.buf.len() {
                // Full of unconsumed input: callers only ask for more when they need it,
                // and never need more than the buffer holds.
                return Err(io::Error::other("tar-index: input buffer overflow"));
            }
            self.buf.copy_within(from..self.end, 0);
            self.base += from as u64;
            self.pos -= from;
            self.end -= from;
        }
        loop {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.hash.update(&self.buf[self.end..self.end + n]);
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Makes at least `n` bytes available unless the input ends first.
    fn ensure(&mut self, n: usize) -> io::Result<()> {
        while self.end - self.pos < n && !self.eof {
            self.fill()?;
        }
        Ok(())
    }
}

impl<R: Read> Indexer<R> {
    /// An indexer reading the compressed layer `input`. Reads nothing yet: stream errors
    /// come with the first reads.
    pub fn new(format: Format, input: R, opts: IndexOptions) -> Result<Self, Error> {
        opts.validate()?;
        let engine = match format {
            Format::Gzip => Engine::Gzip(GzEngine {
                z: RawInflate::new().map_err(|m| Error::Io(io::Error::other(m)))?,
                phase: GzPhase::Header,
                crc: 0,
                member_len: 0,
                member_out: 0,
            }),
            Format::Zstd => Engine::Zstd(ZstdEngine {
                d: zstd::zstd_safe::DCtx::try_create()
                    .ok_or_else(|| Error::Io(io::Error::other("cannot create a zstd context")))?,
                fresh: true,
                finished_frame: false,
            }),
        };
        let history = match format {
            Format::Gzip => WINDOW_SIZE,
            Format::Zstd => 0,
        };
        Ok(Indexer {
            input: Input {
                inner: input,
                buf: vec![0; IN_BUF].into_boxed_slice(),
                pos: 0,
                end: 0,
                base: 0,
                eof: false,
                hash: Sha256::new(),
            },
            format,
            chunk_size: opts.chunk_size,
            max_uncompressed: opts.max_uncompressed,
            obuf: vec![0; history + OUT_BUF].into_boxed_slice(),
            opos: 0,
            oend: 0,
            obase: 0,
            unc_hash: Sha256::new(),
            chunk_hash: Sha256::new(),
            chunk_digests: Vec::new(),
            chunks: Vec::new(),
            checkpoints: Vec::new(),
            cand: None,
            max_distance: 0,
            no_random_access: false,
            zstd_window_log: match format {
                Format::Gzip => 0,
                Format::Zstd => MIN_WINDOW_LOG,
            },
            window_compressor: None,
            engine,
            state: State::Running,
        })
    }

    /// Uncompressed bytes produced so far (consumed by the caller or not).
    pub fn uncompressed_position(&self) -> u64 {
        self.obase + self.oend as u64
    }

    /// Compressed bytes read from the input so far.
    pub fn compressed_position(&self) -> u64 {
        self.input.base + self.input.end as u64
    }

    /// Reads whatever the caller left unread to the end, then returns the index.
    ///
    /// Fails with the stream's error if reading failed, and with
    /// [`Error::NoRandomAccess`] if some chunk lies too far from its checkpoint (the
    /// stream itself was fine: the caller has read it all correctly).
    pub fn finish(mut self) -> Result<Index, Error> {
        loop {
            self.opos = self.oend;
            match &self.state {
                State::Done => break,
                State::Failed(_) => break,
                State::Running => {
                    // Errors land in `self.state`.
                    let _ = self.produce();
                }
            }
        }
        match std::mem::replace(&mut self.state, State::Done) {
            State::Failed(e) => return Err(e),
            State::Done | State::Running => {}
        }
        if self.no_random_access {
            return Err(Error::NoRandomAccess {
                max_distance: self.max_distance,
                limit: MAX_SKIP_CHUNKS * self.chunk_size,
            });
        }
        let compressed_size = self.input.offset();
        for c in &mut self.chunks {
            c.fetch_end = c.fetch_end.min(compressed_size);
        }
        if let Some(last) = self.chunks.last_mut() {
            last.fetch_end = compressed_size;
        }
        Ok(Index {
            format: self.format,
            chunk_size: self.chunk_size,
            uncompressed_size: self.uncompressed_position(),
            compressed_size,
            compressed_digest: self.input.hash.clone().finalize().into(),
            uncompressed_digest: self.unc_hash.clone().finalize().into(),
            chunk_digests: std::mem::take(&mut self.chunk_digests),
            checkpoints: std::mem::take(&mut self.checkpoints),
            chunks: std::mem::take(&mut self.chunks),
            zstd_window_log: self.zstd_window_log,
        })
    }

    /// Decodes until there is unconsumed output or the stream ends. Errors are sticky.
    fn produce(&mut self) -> Result<(), Error> {
        match &self.state {
            State::Running => {}
            State::Done => return Ok(()),
            State::Failed(e) => return Err(e.duplicate()),
        }
        match self.produce_inner() {
            Ok(()) => Ok(()),
            Err(e) => {
                let copy = e.duplicate();
                self.state = State::Failed(e);
                Err(copy)
            }
        }
    }

    fn produce_inner(&mut self) -> Result<(), Error> {
        debug_assert_eq!(self.opos, self.oend);
        while self.opos == self.oend {
            if self.oend == self.obuf.len() {
                self.compact_output()?;
            }
            let out_abs = self.uncompressed_position();
            let next_chunk = (out_abs / self.chunk_size + 1) * self.chunk_size;
            let limit = (self.obuf.len() - self.oend)
                .min(STEP)
                .min(usize::try_from(next_chunk - out_abs).unwrap_or(usize::MAX))
                .min(if out_abs < self.max_uncompressed {
                    // Up to the limit exactly...
                    usize::try_from(self.max_uncompressed - out_abs).unwrap_or(usize::MAX)
                } else {
                    // ...then one byte more means too large.
                    1
                });
            debug_assert!(limit > 0);
            let out = &mut self.obuf[self.oend..self.oend + limit];
            let step = match &mut self.engine {
                Engine::Gzip(g) => gzip_step(g, &mut self.input, out, out_abs)?,
                Engine::Zstd(z) => zstd_step(z, &mut self.input, out, &mut self.zstd_window_log)?,
            };
            if let Some(in_off) = step.start {
                self.set_cand(Cand {
                    kind: CheckpointKind::Start,
                    in_off,
                    bits: 0,
                    partial: 0,
                    out_off: out_abs,
                    win_start: out_abs,
                    saved: None,
                    checkpoint: None,
                });
            }
            if step.produced > 0 {
                self.account(step.produced)?;
            }
            if let Some(bitpos) = step.boundary {
                self.block_boundary(bitpos);
            }
            if step.done {
                self.end_of_stream();
                return Ok(());
            }
        }
        Ok(())
    }

    /// Hashes `n` new output bytes at `obuf[oend..]` and keeps the chunk table.
    fn account(&mut self, n: usize) -> Result<(), Error> {
        let data = &self.obuf[self.oend..self.oend + n];
        self.unc_hash.update(data);
        self.chunk_hash.update(data);
        let start = self.uncompressed_position();
        if start % self.chunk_size == 0 {
            // The first byte of a chunk: its checkpoint is the latest restart point.
            self.start_chunk(start)?;
        }
        self.oend += n;
        let end = start + n as u64;
        if end > self.max_uncompressed {
            return Err(Error::TooLarge {
                limit: self.max_uncompressed,
            });
        }
        if end % self.chunk_size == 0 {
            self.end_chunk();
        }
        Ok(())
    }

    fn start_chunk(&mut self, chunk_start: u64) -> Result<(), Error> {
        let Some(cand) = &self.cand else {
            return Err(Error::Corrupt("output before any stream start".into()));
        };
        let distance = chunk_start - cand.out_off;
        self.max_distance = self.max_distance.max(distance);
        if distance > MAX_SKIP_CHUNKS * self.chunk_size {
            // The index is lost; keep reading the stream correctly, but stop paying for
            // checkpoints.
            self.no_random_access = true;
        }
        let checkpoint = if self.no_random_access { 0 } else { self.materialize()? };
        self.chunks.push(ChunkEntry {
            checkpoint,
            fetch_end: 0,
        });
        Ok(())
    }

    fn end_chunk(&mut self) {
        let digest = self.chunk_hash.finalize_reset();
        self.chunk_digests.push(digest.into());
        // Everything consumed so far produced the chunk: a sufficient prefix. zstd may
        // hold the last byte of a frame "hostage" (reported unconsumed although read
        // while the frame's output is being flushed): one byte more covers it (clamped to
        // the blob in `finish`).
        let slack = match self.format {
            Format::Gzip => 0,
            Format::Zstd => 1,
        };
        if let Some(last) = self.chunks.last_mut() {
            last.fetch_end = self.input.offset() + slack;
        }
    }

    /// Makes the candidate a checkpoint (once) and returns its index.
    fn materialize(&mut self) -> Result<u32, Error> {
        let cand = self.cand.as_mut().expect("checked by the caller");
        if let Some(i) = cand.checkpoint {
            return Ok(i);
        }
        let window = if cand.kind == CheckpointKind::Block && cand.win_start < cand.out_off {
            let raw: &[u8] = match &cand.saved {
                Some(w) => w,
                None => {
                    let from = usize::try_from(cand.win_start - self.obase).ok();
                    let to = usize::try_from(cand.out_off - self.obase).ok();
                    match (cand.win_start >= self.obase, from, to) {
                        (true, Some(from), Some(to)) if to <= self.oend => &self.obuf[from..to],
                        _ => return Err(Error::Io(io::Error::other("tar-index: window lost"))),
                    }
                }
            };
            let c = match &mut self.window_compressor {
                Some(c) => c,
                None => self
                    .window_compressor
                    .insert(zstd::bulk::Compressor::new(WINDOW_LEVEL).map_err(Error::Io)?),
            };
            c.compress(raw).map_err(Error::Io)?
        } else {
            Vec::new()
        };
        let index = u32::try_from(self.checkpoints.len()).map_err(|_| Error::Corrupt("too many checkpoints".into()))?;
        self.checkpoints.push(Checkpoint {
            in_off: cand.in_off,
            out_off: cand.out_off,
            kind: cand.kind,
            bits: cand.bits,
            partial: cand.partial,
            window,
        });
        cand.checkpoint = Some(index);
        cand.saved = None;
        Ok(index)
    }

    fn set_cand(&mut self, cand: Cand) {
        self.cand = Some(cand);
    }

    /// A deflate block boundary at input bit position `bitpos`, at the current output.
    fn block_boundary(&mut self, bitpos: u64) {
        let Engine::Gzip(g) = &self.engine else {
            return;
        };
        let out_off = self.uncompressed_position();
        let in_off = bitpos.div_ceil(8);
        let bits = (in_off * 8 - bitpos) as u8;
        let partial = if bits == 0 {
            0
        } else {
            match self.input.byte_at(in_off - 1) {
                Some(b) => b >> (8 - bits),
                // Not buffered any more (cannot happen with IN_HISTORY): skip it.
                None => return,
            }
        };
        let win_start = out_off.saturating_sub(WINDOW_SIZE as u64).max(g.member_out);
        self.set_cand(Cand {
            kind: CheckpointKind::Block,
            in_off,
            bits,
            partial,
            out_off,
            win_start,
            saved: None,
            checkpoint: None,
        });
    }

    /// Makes room in the output buffer (all of it consumed), keeping the last 32 KiB for
    /// gzip windows; saves the candidate's window first if it would be dropped.
    fn compact_output(&mut self) -> Result<(), Error> {
        let keep = match self.format {
            Format::Gzip => WINDOW_SIZE.min(self.oend),
            Format::Zstd => 0,
        };
        let from = self.oend - keep;
        let new_base = self.obase + from as u64;
        if let Some(c) = &mut self.cand {
            if c.kind == CheckpointKind::Block
                && c.checkpoint.is_none()
                && c.saved.is_none()
                && c.win_start < new_base
                && !self.no_random_access
            {
                let (Some(a), Some(b)) = (c.win_start.checked_sub(self.obase), c.out_off.checked_sub(self.obase))
                else {
                    return Err(Error::Io(io::Error::other("tar-index: window lost")));
                };
                c.saved = Some(self.obuf[a as usize..b as usize].to_vec());
            }
        }
        self.obuf.copy_within(from..self.oend, 0);
        self.obase = new_base;
        self.opos = keep;
        self.oend = keep;
        Ok(())
    }

    fn end_of_stream(&mut self) {
        if self.uncompressed_position() % self.chunk_size != 0 {
            self.end_chunk();
        }
        self.state = State::Done;
    }
}

fn corrupt(m: impl Into<String>) -> Error {
    Error::Corrupt(m.into())
}

/// One step of gzip decoding into `out` (non-empty).
fn gzip_step<R: Read>(g: &mut GzEngine, input: &mut Input<R>, out: &mut [u8], out_abs: u64) -> Result<StepOut, Error> {
    match g.phase {
        GzPhase::Header => {
            let start = input.offset();
            let n = loop {
                match gzip::parse_header(input.avail()) {
                    Ok(Some(n)) => break n,
                    Ok(None) if input.eof => {
                        return Err(corrupt("unexpected end of gzip header"));
                    }
                    Ok(None) => {
                        debug_assert!(input.avail().len() < MAX_HEADER);
                        input.fill()?;
                    }
                    Err(m) => return Err(corrupt(m)),
                }
            };
            input.consume(n);
            g.z.reset().map_err(|m| Error::Io(io::Error::other(m)))?;
            g.crc = 0;
            g.member_len = 0;
            g.member_out = out_abs;
            g.phase = GzPhase::Body;
            Ok(StepOut {
                start: Some(start),
                ..Default::default()
            })
        }
        GzPhase::Body => {
            if input.avail().is_empty() {
                input.fill()?;
            }
            let s = g.z.inflate(input.avail(), out, Z_BLOCK).map_err(corrupt)?;
            input.consume(s.consumed);
            let produced = &out[..s.produced];
            g.crc = zlib::crc32(g.crc, produced);
            g.member_len += s.produced as u64;
            let mut step = StepOut {
                produced: s.produced,
                ..Default::default()
            };
            if s.end {
                g.phase = GzPhase::Trailer;
                return Ok(step);
            }
            if s.produced == 0 && s.consumed == 0 {
                // Output space and (unless at EOF) input were offered: no progress means
                // the deflate stream is cut short.
                if input.avail().is_empty() && input.eof {
                    return Err(corrupt("unexpected end of gzip stream"));
                }
                if !input.avail().is_empty() {
                    return Err(corrupt("inflate made no progress"));
                }
            }
            if s.data_type & DT_AT_BOUNDARY != 0 && s.data_type & DT_LAST_BLOCK == 0 {
                let held = (s.data_type & DT_BITS) as u64;
                step.boundary = Some(input.offset() * 8 - held);
            }
            Ok(step)
        }
        GzPhase::Trailer => {
            input.ensure(TRAILER)?;
            let Some(t) = input.avail().get(..TRAILER) else {
                return Err(corrupt("unexpected end of gzip trailer"));
            };
            let t: [u8; TRAILER] = t.try_into().expect("8 bytes");
            gzip::check_trailer(&t, g.crc, g.member_len).map_err(corrupt)?;
            input.consume(TRAILER);
            // Like MultiGzDecoder: more input means another member.
            input.ensure(1)?;
            if input.avail().is_empty() {
                return Ok(StepOut {
                    done: true,
                    ..Default::default()
                });
            }
            g.phase = GzPhase::Header;
            Ok(StepOut::default())
        }
    }
}

/// One step of zstd decoding into `out` (non-empty), with the same frame logic as
/// `zstd::stream::read::Decoder`.
fn zstd_step<R: Read>(
    z: &mut ZstdEngine,
    input: &mut Input<R>,
    out: &mut [u8],
    window_log: &mut u8,
) -> Result<StepOut, Error> {
    use zstd::zstd_safe::{get_error_name, InBuffer, OutBuffer, ResetDirective};

    if input.avail().is_empty() {
        input.fill()?;
    }
    let mut step = StepOut::default();
    if !input.avail().is_empty() && (z.fresh || z.finished_frame) {
        if z.finished_frame {
            z.d.reset(ResetDirective::SessionOnly)
                .map_err(|c| corrupt(get_error_name(c)))?;
        }
        z.fresh = false;
        z.finished_frame = false;
        step.start = Some(input.offset());
        input.ensure(MAX_FRAME_HEADER)?;
        if let Some(w) = zstdf::window_log(input.avail()) {
            *window_log = (*window_log).max(w);
        }
    }
    let mut src = InBuffer::around(input.avail());
    let mut dst = OutBuffer::around(out);
    let hint =
        z.d.decompress_stream(&mut dst, &mut src)
            .map_err(|c| corrupt(get_error_name(c)))?;
    let consumed = src.pos();
    let produced = dst.pos();
    input.consume(consumed);
    if hint == 0 {
        z.finished_frame = true;
    }
    step.produced = produced;
    if produced == 0 && consumed == 0 && input.avail().is_empty() && input.eof {
        if z.finished_frame {
            step.done = true;
        } else {
            return Err(corrupt("incomplete zstd frame"));
        }
    }
    Ok(step)
}

impl<R: Read> BufRead for Indexer<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.opos == self.oend {
            self.produce()?;
        }
        Ok(&self.obuf[self.opos..self.oend])
    }

    fn consume(&mut self, amt: usize) {
        self.opos = (self.opos + amt).min(self.oend);
    }
}

impl<R: Read> Read for Indexer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}
