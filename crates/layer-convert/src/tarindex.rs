//! Tar-index images: the EROFS metadata of a layer whose regular files are not copied
//! but point at their bodies inside the layer's uncompressed tar.
//!
//! The tar itself is the image's one extra device (device 1). Tar bodies start on
//! 512-byte boundaries, so the image has 512-byte blocks, and each regular file is a
//! chunk-based file of a single chunk (a power of two at least as large as the file) at
//! `body offset / 512` on that device. Directories, symlinks, devices, whiteouts and
//! xattrs are in the image as in any converted layer: the tree is built by the same
//! code as [`crate::convert`], so both give the same tree for the same layer.
//!
//! Mounted with the tar as its device (`-o device=TAR`), the image shows the layer; a
//! lazy pull serves that tar from the unmodified compressed blob in the registry.

use std::io::{BufRead, BufWriter, Read};
use std::path::Path;
use std::time::Instant;

use erofs::format::{DeviceSlot, NULL_ADDR};
use erofs::writer::{self, ChunkAddr, FileData, ImageWriter};

use crate::convert::{build, werr, Output, TempOutput};
use crate::{Error, ErrorKind, Options};

/// log2 of a tar-index image's block size: tar's record size, so that every file body is
/// at a whole block of the tar.
pub const BLOCK_BITS: u8 = 9;

/// The device table tag of the tar device (64 bytes, zero-padded).
pub fn device_tag(diff_id: &str) -> [u8; 64] {
    let mut tag = [0u8; 64];
    let hex = diff_id.strip_prefix("sha256:").unwrap_or(diff_id).as_bytes();
    let n = hex.len().min(64);
    tag[..n].copy_from_slice(&hex[..n]);
    tag
}

/// What [`convert_tar_index`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TarIndexReport {
    /// Tar entries applied.
    pub entries: u64,
    /// Bytes of the uncompressed tar read (the device's size).
    pub uncompressed_size: u64,
    /// Bytes of the image.
    pub output_size: u64,
    /// Wall time.
    pub seconds: f64,
}

/// A regular file of `size` bytes whose body starts at byte `offset` of the tar.
pub(crate) fn file_in_tar(offset: u64, size: u64) -> Result<FileData, Error> {
    if size == 0 {
        return Ok(FileData {
            size,
            blkaddr: NULL_ADDR,
            ..Default::default()
        });
    }
    if !offset.is_multiple_of(1 << BLOCK_BITS) {
        // The tar reader only ever stops on record boundaries; anything else is a bug.
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("file body at {offset}, not on a 512-byte record"),
        ));
    }
    let blkaddr = u32::try_from(offset >> BLOCK_BITS)
        .map_err(|_| Error::new(ErrorKind::Unsupported, "file body beyond 2 TiB of tar"))?;
    // One chunk covers the whole file: the body is contiguous in the tar, so one index
    // says everything (ceil(log2(size)), at least one block).
    let bits = (u64::BITS - (size - 1).leading_zeros()).max(u32::from(BLOCK_BITS)) as u8;
    if bits > BLOCK_BITS + 31 {
        return Err(Error::new(ErrorKind::Unsupported, format!("file of {size} bytes")));
    }
    Ok(FileData {
        size,
        blkaddr: NULL_ADDR,
        chunks: Some(Box::new([ChunkAddr { device: 1, blkaddr }])),
        chunk_bits: bits,
        ..Default::default()
    })
}

/// Counts what is read through it: the tar's size is the device's.
struct Counted<S> {
    inner: S,
    n: u64,
}

impl<S: BufRead> Read for Counted<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

impl<S: BufRead> BufRead for Counted<S> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        self.n += amt as u64;
        self.inner.consume(amt)
    }
}

/// Reads an uncompressed layer tar from `tar` to its end and writes its tar-index image to
/// `output` (a temporary file renamed into place on success; nothing is left on error).
/// `diff_id` names the tar in the device table. Of `opts`, `build_time`, `lowers`, `uuid`
/// and `fsync` apply.
pub fn convert_tar_index<S: BufRead>(
    tar: S,
    output: &Path,
    opts: &Options,
    diff_id: &str,
) -> Result<TarIndexReport, Error> {
    let started = Instant::now();
    let tmp = TempOutput::create(output)?;
    let wopts = writer::Options {
        block_bits: BLOCK_BITS,
        inline_data: false,
        build_time: opts.build_time,
        ..Default::default()
    };
    let out = BufWriter::with_capacity(
        1 << 20,
        Output::new(tmp.file.try_clone().map_err(Error::io)?, opts.fsync),
    );
    let image = ImageWriter::new(out, wopts).map_err(werr)?;
    let mut counted = Counted { inner: tar, n: 0 };
    let (mut image, tree, entries) = build(&mut counted, image, opts.build_time, &opts.lowers, None, true)?;
    // What follows the end-of-archive marker is part of the tar (and of its digest).
    std::io::copy(&mut counted, &mut std::io::sink()).map_err(Error::io)?;
    let size = counted.n;
    let blocks = u32::try_from(size.div_ceil(1 << BLOCK_BITS))
        .map_err(|_| Error::new(ErrorKind::Unsupported, "tar larger than 2 TiB"))?;
    image.set_devices(vec![DeviceSlot {
        tag: device_tag(diff_id),
        blocks,
        mapped_blkaddr: 0,
    }]);
    image.set_uuid(opts.uuid.unwrap_or_default());
    let (mut w, summary) = image.finish(&tree).map_err(werr)?;
    std::io::Write::flush(&mut w).map_err(Error::io)?;
    drop(w);
    if opts.fsync {
        tmp.file.sync_all().map_err(Error::io)?;
    }
    tmp.persist(opts.fsync)?;
    Ok(TarIndexReport {
        entries,
        uncompressed_size: size,
        output_size: summary.bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}
