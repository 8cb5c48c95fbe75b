//! Writing a layer blob into the store: a tar layer converted to EROFS as it
//! streams in, or a native EROFS layer copied; either way verified against its
//! digests (and, for EROFS, checked as an image) before the store records it.
//!
//! The store calls this for the Diff service's Apply and for streamed layers; the
//! caller only hands over bytes and what the manifest says about them, so no other
//! crate learns where the store keeps its files.

use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

use dedup::SinkReport;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// What a layer blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerFormat {
    /// An OCI tar layer (plain, gzip or zstd, as its media type says).
    Tar,
    /// A native EROFS image, `zstd` when the blob is that image compressed with zstd.
    Erofs {
        /// `+zstd` on the media type.
        zstd: bool,
    },
}

/// A layer blob for [`crate::Snapshotter::apply_layer`].
pub struct LayerBlob {
    /// The blob's bytes.
    pub reader: Box<dyn Read + Send>,
    /// What the bytes are.
    pub format: LayerFormat,
    /// The media type (for a tar layer, it names the compression).
    pub media_type: String,
    /// `sha256:<hex>` the blob must hash to.
    pub digest: String,
    /// The size the blob must have, when the caller knows it.
    pub size: Option<u64>,
    /// The uncompressed layer's digest from the image config, checked when known.
    pub diff_id: Option<String>,
    /// Largest uncompressed size accepted.
    pub max_size: u64,
}

/// What Apply reports: the uncompressed layer (tar or EROFS image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedLayer {
    /// `sha256:<hex>` of the uncompressed layer (a tar layer's diffID).
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A layer written to its staging file.
pub(crate) struct Written {
    pub applied: AppliedLayer,
    /// Bytes of the image file.
    pub image_size: u64,
    /// The chunks a deduplicating conversion wrote and named.
    pub sink: Option<SinkReport>,
}

fn conv_err(e: layer_convert::Error) -> Error {
    match e.kind {
        layer_convert::ErrorKind::Io => Error::Internal(e.to_string()),
        _ => Error::InvalidArgument(e.to_string()),
    }
}

/// The conversion settings every layer the store writes shares.
pub(crate) fn tar_options(media_type: &str, max_size: u64, store: &crate::StoreOptions) -> layer_convert::Options {
    layer_convert::Options {
        media_type: Some(media_type.to_string()),
        max_size,
        // Block-aligned file data: inline tails would fill the inode area that the
        // kernel reads one block at a time (cold reads ~1.6x slower).
        inline_data: false,
        build_time: 0,
        fsync: true,
        chunk_size: store.chunk_size,
        meta_first: false,
        uuid: None,
        compress: store.compression,
        lowers: layer_convert::Lowers::default(),
    }
}

/// Converts a tar layer into `staged`, through `session`'s chunk sink when the
/// store deduplicates, and checks the digests.
pub(crate) fn write_tar(
    blob: LayerBlob,
    staged: &Path,
    session: Option<&crate::DedupSession<'_>>,
    store: &crate::StoreOptions,
    lowers: layer_convert::Lowers,
) -> Result<Written> {
    let opts = layer_convert::Options {
        lowers,
        ..tar_options(&blob.media_type, blob.max_size, store)
    };
    let (report, sink) = match session {
        None => (
            layer_convert::convert(blob.reader, staged, &opts, None).map_err(conv_err)?,
            None,
        ),
        Some(sess) => {
            let (r, rep) = sess
                .run(|sink| layer_convert::convert_with(blob.reader, staged, &opts, None, Some(sink)))
                .map_err(conv_err)?;
            (r, Some(rep))
        }
    };
    let mut bad = check_blob(&blob.digest, blob.size, &report.input_digest, report.input_size).err();
    if bad.is_none() {
        if let Some(d) = blob.diff_id.as_ref().filter(|d| **d != report.diff_id) {
            bad = Some(Error::InvalidArgument(format!(
                "diffID {} but the image config says {d}",
                report.diff_id
            )));
        }
    }
    if let Some(e) = bad {
        discard(staged, sink.as_ref());
        return Err(e);
    }
    Ok(Written {
        applied: AppliedLayer {
            digest: report.diff_id,
            size: report.uncompressed_size,
        },
        image_size: report.output_size,
        sink,
    })
}

/// Removes what a failed write left: the image and the conversion's own blob.
pub(crate) fn discard(staged: &Path, sink: Option<&SinkReport>) {
    let _ = fs::remove_file(staged);
    if let Some(own) = sink.and_then(|s| s.own.as_ref()) {
        let _ = fs::remove_file(&own.path);
    }
}

fn check_blob(want: &str, want_size: Option<u64>, digest: &str, size: u64) -> Result<()> {
    if digest != want {
        return Err(Error::InvalidArgument(format!(
            "blob digest is {digest}, the descriptor says {want}"
        )));
    }
    if let Some(w) = want_size.filter(|w| *w != size) {
        return Err(Error::InvalidArgument(format!(
            "blob size is {size}, the descriptor says {w}"
        )));
    }
    Ok(())
}

/// Copies a native EROFS blob into `staged` (decompressing `+zstd`), checking both
/// digests and validating the whole image ([`erofs::validate_file`]).
pub(crate) fn write_native(blob: LayerBlob, staged: &Path, zstd: bool) -> Result<Written> {
    let r = copy_native(blob, staged, zstd);
    if r.is_err() {
        let _ = fs::remove_file(staged);
    }
    r
}

fn copy_native(blob: LayerBlob, staged: &Path, zstd: bool) -> Result<Written> {
    struct Hashing<R> {
        inner: R,
        h: Sha256,
        n: u64,
    }
    impl<R: Read> Read for Hashing<R> {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(b)?;
            self.h.update(&b[..n]);
            self.n += n as u64;
            Ok(n)
        }
    }
    let io_err = |e: io::Error| Error::Internal(format!("{}: {e}", staged.display()));
    let max = blob.max_size;
    let mut input = Hashing {
        inner: blob.reader,
        h: Sha256::new(),
        n: 0,
    };
    // Read back below (the validation), so not write-only.
    let mut out = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(staged)
        .map_err(io_err)?;
    let (uncompressed, size) = {
        let mut src: Box<dyn Read + '_> = if zstd {
            Box::new(
                layer_convert::stream::zstd_decoder(io::BufReader::new(&mut input))
                    .map_err(|e| Error::InvalidArgument(format!("zstd: {e}")))?,
            )
        } else {
            Box::new(&mut input)
        };
        let mut h = Sha256::new();
        let mut n = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let k = src
                .read(&mut buf)
                .map_err(|e| Error::InvalidArgument(format!("reading the blob: {e}")))?;
            if k == 0 {
                break;
            }
            n += k as u64;
            if n > max {
                return Err(Error::InvalidArgument(format!("layer larger than {max} bytes")));
            }
            h.update(&buf[..k]);
            out.write_all(&buf[..k]).map_err(io_err)?;
        }
        (format!("sha256:{}", hex::encode(h.finalize())), n)
    };
    io::copy(&mut input, &mut io::sink()).map_err(io_err)?;
    check_blob(
        &blob.digest,
        blob.size,
        &format!("sha256:{}", hex::encode(input.h.finalize())),
        input.n,
    )?;
    // An image from a registry is untrusted input to the kernel's EROFS driver: all
    // of it is validated before the store ever mounts it (the caller removes it).
    let f = out.try_clone().map_err(io_err)?;
    erofs::validate_file(f).map_err(|e| Error::InvalidArgument(format!("native EROFS layer refused: {e}")))?;
    out.sync_all().map_err(io_err)?;
    Ok(Written {
        applied: AppliedLayer {
            digest: uncompressed,
            size,
        },
        image_size: size,
        sink: None,
    })
}
