//! The layer converter: tar entries in, an EROFS image out, in one pass.
//!
//! Entries are applied to an in-memory [`Tree`] with the semantics containerd's
//! applier gives a layer on disk (a later entry replaces an earlier one, parents are
//! created as needed, OCI whiteouts become overlayfs whiteouts), while file bodies go
//! straight from the decompressed stream into the image's data area.

use std::fs::{self, File};
use std::io::{BufRead, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use erofs::writer::{self, Body, ChunkSink, ImageWriter, Meta, Node, NodeId, Summary, Tree, Xattr};
use sha2::{Digest, Sha256};

use oci_layer::name::Target;
use oci_layer::stream::{self, Compression};
use oci_layer::tar::{self, Kind, TarReader};
use oci_layer::{ChunkSize, Error, ErrorKind};

/// Default bound on the uncompressed size of a layer: large enough for real images
/// (model weights, toolchains), small enough to stop a decompression bomb well
/// before it fills a disk.
pub const DEFAULT_MAX_SIZE: u64 = 64 << 30;

const OPAQUE_NAME: &[u8] = b"overlay.opaque";

/// How to build an image, from a layer tar ([`convert`]) or from a directory
/// ([`crate::convert_dir`]): one set of options for both.
#[derive(Debug, Clone)]
pub struct Options {
    /// The layer's media type; `None` detects the compression from the stream (tar
    /// only).
    pub media_type: Option<String>,
    /// Largest uncompressed size accepted (tar only).
    pub max_size: u64,
    /// Pack small files and tails after their inodes.
    pub inline_data: bool,
    /// Timestamp for compact inodes and implied directories (SOURCE_DATE_EPOCH or 0).
    pub build_time: u64,
    /// fsync the image (and its directory) before and after renaming it into place.
    pub fsync: bool,
    /// The chunk size of chunk-based files (with a chunk sink).
    pub chunk_size: ChunkSize,
    /// Metadata first, file data after (for images read over the network before
    /// they are whole); costs one copy of the file data (tar only).
    pub meta_first: bool,
    /// Filesystem UUID; `None`: derived from the input digest (tar), zero (directory).
    pub uuid: Option<[u8; 16]>,
    /// Compress file data in the image (`None`, the default: uncompressed, which merged
    /// metadata and VMDK need). With a chunk sink, files are shared chunks instead.
    pub compress: Option<erofs::writer::Compression>,
    /// The layers below this one (tar only): an implied directory (a parent the tar
    /// names no entry for) takes the attributes they show for it, as containerd's
    /// applier keeps them; empty, the default: 0755, root, the build time.
    pub lowers: crate::Lowers,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            chunk_size: ChunkSize::DEFAULT,
            media_type: None,
            max_size: DEFAULT_MAX_SIZE,
            inline_data: true,
            build_time: 0,
            fsync: false,
            meta_first: false,
            uuid: None,
            compress: None,
            lowers: crate::Lowers::default(),
        }
    }
}

impl Options {
    /// Defaults, with the build time taken from `SOURCE_DATE_EPOCH` when set.
    pub fn from_env() -> Options {
        let build_time = std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Options {
            build_time,
            ..Options::default()
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// `sha256:<hex>` of the uncompressed tar (the layer's diffID).
    pub diff_id: String,
    /// `sha256:<hex>` of the input as given.
    pub input_digest: String,
    /// Input bytes.
    pub input_size: u64,
    /// Uncompressed tar bytes.
    pub uncompressed_size: u64,
    /// Image bytes.
    pub output_size: u64,
    /// Tar entries applied (extension headers not counted).
    pub entries: u64,
    /// Compression of the input.
    pub compression: Compression,
    /// Wall time.
    pub seconds: f64,
    /// Byte offset of the first block of file data: with [`Options::meta_first`],
    /// everything before it is metadata (superblock, directories, inodes, xattrs,
    /// inline tails).
    pub data_offset: u64,
    /// Files stored compressed (with [`Options::erofs`]' compression).
    pub compressed_files: u64,
    /// Of those, files whose last pcluster is packed after the inode (`ztailpacking`).
    pub tail_packed_files: u64,
}

/// Converts a layer read from `input` into an EROFS image at `output`.
///
/// The image is written to a temporary file beside `output` and renamed only on
/// success; on any error nothing is left behind.
pub fn convert<R: Read + Send>(
    input: R,
    output: &Path,
    opts: &Options,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<Report, Error> {
    convert_with(input, output, opts, progress, None)
}

/// [`convert`], with regular files written as chunk-based files whose chunks go to
/// `sink` (deduplicated layers); the sink's devices make the image's device table.
pub fn convert_with<R: Read + Send>(
    input: R,
    output: &Path,
    opts: &Options,
    progress: Option<&(dyn Fn(u64) + Sync)>,
    sink: Option<&mut dyn ChunkSink>,
) -> Result<Report, Error> {
    let started = Instant::now();
    let compression = match &opts.media_type {
        Some(mt) => Some(Compression::from_media_type(mt)?),
        None => None,
    };
    let tmp = TempOutput::create(output)?;
    let wopts = writer::Options {
        inline_data: opts.inline_data,
        build_time: opts.build_time,
        chunk_bits: opts.chunk_size.bits(),
        compression: opts.compress,
        ..Default::default()
    };
    let out = || {
        Ok::<_, Error>(BufWriter::with_capacity(
            1 << 20,
            Output::new(tmp.file.try_clone().map_err(Error::io)?, opts.fsync),
        ))
    };
    let ((summary, entries, diff, usize_, input_stats), compression) = if opts.meta_first {
        // File bodies stream into an unnamed spool beside the output and are copied
        // behind the metadata once its size is known (see
        // `ImageWriter::finish_meta_first`).
        let dir = output
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let spool = Spool(BufWriter::with_capacity(
            1 << 20,
            tempfile::tempfile_in(dir).map_err(Error::io)?,
        ));
        let image = ImageWriter::new(spool, wopts).map_err(werr)?;
        let final_out = out()?;
        build_stream(input, compression, opts, progress, sink, image, |image, tree| {
            let (_, mut w, summary) = image.finish_meta_first(tree, final_out).map_err(werr)?;
            std::io::Write::flush(&mut w).map_err(Error::io)?;
            Ok(summary)
        })?
    } else {
        let image = ImageWriter::new(out()?, wopts).map_err(werr)?;
        build_stream(input, compression, opts, progress, sink, image, |image, tree| {
            let (mut w, summary) = image.finish(tree).map_err(werr)?;
            std::io::Write::flush(&mut w).map_err(Error::io)?;
            Ok(summary)
        })?
    };

    if opts.fsync {
        tmp.file.sync_all().map_err(Error::io)?;
    }
    tmp.persist(opts.fsync)?;
    Ok(Report {
        diff_id: format!("sha256:{}", hex::encode(diff)),
        input_digest: format!("sha256:{}", hex::encode(input_stats.digest)),
        input_size: input_stats.size,
        uncompressed_size: usize_,
        output_size: summary.bytes,
        entries,
        compression,
        seconds: started.elapsed().as_secs_f64(),
        data_offset: u64::from(summary.data_blkaddr) * writer::BLOCK_SIZE,
        compressed_files: summary.compressed_files,
        tail_packed_files: summary.tail_packed_files,
    })
}

type Streamed = ((Summary, u64, [u8; 32], u64, stream::InputStats), Compression);

/// Reads the layer once, building the tree and streaming file bodies into `image`,
/// then lets `finish` lay out the rest.
fn build_stream<R: Read + Send, W: std::io::Write + std::io::Seek>(
    input: R,
    compression: Option<Compression>,
    opts: &Options,
    progress: Option<&(dyn Fn(u64) + Sync)>,
    mut sink: Option<&mut dyn ChunkSink>,
    image: ImageWriter<W>,
    finish: impl FnOnce(ImageWriter<W>, &Tree) -> Result<Summary, Error>,
) -> Result<Streamed, Error> {
    stream::with_uncompressed(input, compression, opts.max_size, progress, |s| {
        let r = build(s, image, opts.build_time, &opts.lowers, reborrow(&mut sink), false);
        let r = match r {
            Err(e) => Err(s.take_failure().unwrap_or(e)),
            Ok(v) => Ok(v),
        };
        let (mut image, tree, entries) = r?;
        let (diff, size, stats) = s
            .digests()
            .ok_or_else(|| Error::new(ErrorKind::Io, "input ended without its digest"))?;
        // The UUID is known only now: derived from the input digest so the same
        // input gives the same image.
        image.set_uuid(opts.uuid.unwrap_or_else(|| uuid_from(&stats.digest)));
        if let Some(sink) = &sink {
            image.set_devices(sink.device_slots());
        }
        let summary = finish(image, &tree)?;
        Ok((summary, entries, diff, size, stats))
    })
}

/// The data spool of a metadata-first image: buffered writes, and reads back once
/// the metadata is written in front of it.
struct Spool(BufWriter<File>);

impl std::io::Write for Spool {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl std::io::Seek for Spool {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        self.0.seek(to)
    }
}

impl Read for Spool {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::io::Write::flush(&mut self.0)?;
        self.0.get_mut().read(buf)
    }
}

/// Reborrows an optional sink for a shorter time (`as_deref_mut` cannot shorten the
/// trait object's lifetime inside the `Option`).
pub(crate) fn reborrow<'a>(s: &'a mut Option<&mut dyn ChunkSink>) -> Option<&'a mut dyn ChunkSink> {
    match s {
        Some(s) => Some(&mut **s),
        None => None,
    }
}

pub(crate) fn werr(e: writer::Error) -> Error {
    match e {
        writer::Error::Io(e) => Error::io(e),
        writer::Error::Unrepresentable(m) => Error::new(ErrorKind::Unsupported, m),
    }
}

/// An RFC 4122 UUID (version 5 layout) from the first bytes of a digest.
fn uuid_from(digest: &[u8; 32]) -> [u8; 16] {
    let mut u: [u8; 16] = digest[..16].try_into().unwrap();
    u[6] = (u[6] & 0x0f) | 0x50;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

type Built<W> = (ImageWriter<W>, Tree, u64);

/// Applies every tar entry to the tree, streaming file bodies into the image; with
/// `tar_index`, regular files are not copied but point at their bodies in the tar itself,
/// which is the image's device 1 (see [`crate::tarindex`]).
pub(crate) fn build<S: BufRead, W: std::io::Write + std::io::Seek>(
    s: &mut S,
    mut image: ImageWriter<W>,
    build_time: u64,
    lowers: &crate::Lowers,
    sink: Option<&mut dyn ChunkSink>,
    tar_index: bool,
) -> Result<Built<W>, Error> {
    let implied = Meta {
        perm: 0o755,
        uid: 0,
        gid: 0,
        mtime: build_time,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    };
    let mut b = Builder {
        tree: Tree::new(implied.clone()),
        implied,
        lowers,
        sink,
        tar_index,
    };
    let mut tar = TarReader::new(s);
    let mut entries = 0u64;
    while let Some(e) = tar.next_entry()? {
        entries += 1;
        let name = e.display_path();
        b.apply(&e, &mut tar, &mut image)
            .map_err(|err| err.entry(&name).at(e.offset))?;
    }
    tar::drain(tar.body()).map_err(Error::io)?;
    Ok((image, b.tree, entries))
}

struct Builder<'s, 'l> {
    tree: Tree,
    implied: Meta,
    lowers: &'l crate::Lowers,
    sink: Option<&'s mut dyn ChunkSink>,
    /// Regular files point into the tar (device 1) instead of being copied.
    tar_index: bool,
}

fn is_whiteout_node(n: &Node) -> bool {
    matches!(n.body, Body::CharDev(0, 0))
}

fn opaque() -> Xattr {
    Xattr {
        index: erofs::format::xattr_index::TRUSTED,
        suffix: OPAQUE_NAME.into(),
        value: (*b"y").into(),
    }
}

fn is_opaque(n: &Node) -> bool {
    n.meta.xattrs.contains(&opaque())
}

/// Seconds as the EROFS extended inode stores them: `i_mtime` is a 64-bit field that
/// the kernel reads as signed (`time64_t`), so a time before 1970 keeps its exact value
/// in two's complement, and every time a tar can carry (64-bit seconds) fits.
pub(crate) fn erofs_seconds(secs: i64) -> u64 {
    secs as u64
}

impl Builder<'_, '_> {
    fn meta_of(&self, e: &tar::Entry) -> Result<Meta, Error> {
        let uid = u32::try_from(e.uid).map_err(|_| Error::new(ErrorKind::Unsupported, "uid above 2^32"))?;
        let gid = u32::try_from(e.gid).map_err(|_| Error::new(ErrorKind::Unsupported, "gid above 2^32"))?;
        let mut meta = Meta {
            perm: (e.mode & 0o7777) as u16,
            uid,
            gid,
            mtime: erofs_seconds(e.mtime),
            mtime_nsec: e.mtime_nsec,
            xattrs: Vec::new(),
        };
        for (name, value) in &e.xattrs {
            // overlayfs reads trusted.overlay.* from its layers (opaque, redirect,
            // metacopy): a layer must not be able to set them, only whiteouts can.
            if oci_layer::xattr::is_overlay(name) {
                continue;
            }
            let x = Xattr::new(name, value).map_err(|e| Error::new(ErrorKind::Unsupported, e.to_string()))?;
            meta.set_xattr(x);
        }
        Ok(meta)
    }

    /// Finds or creates the directory `parts`, creating missing parents with the
    /// attributes the lower layers show for them (or default ones). A whiteout in the
    /// way becomes an opaque directory (the lower one is deleted, this layer's takes its
    /// place); anything else in the way is an error.
    fn ensure_dir(&mut self, parts: &[&[u8]]) -> Result<NodeId, Error> {
        let mut dir = self.tree.root();
        for (i, part) in parts.iter().enumerate() {
            dir = match self.tree.child(dir, part) {
                Some(id) if self.tree.node(id).is_dir() => id,
                Some(id) if is_whiteout_node(self.tree.node(id)) => {
                    let mut meta = self.implied.clone();
                    meta.set_xattr(opaque());
                    let new = self.tree.add(Node::dir(meta));
                    self.tree.link(dir, part, new);
                    new
                }
                Some(_) => {
                    return Err(Error::new(
                        ErrorKind::NotADirectory,
                        format!(
                            "parent {:?} is not a directory in this layer",
                            String::from_utf8_lossy(part)
                        ),
                    ))
                }
                None => {
                    let meta = self
                        .lowers
                        .dir_meta(&parts[..=i])
                        .unwrap_or_else(|| self.implied.clone());
                    let new = self.tree.add(Node::dir(meta));
                    self.tree.link(dir, part, new);
                    new
                }
            };
        }
        Ok(dir)
    }

    /// Looks up an existing path without creating anything or following symlinks.
    fn lookup(&self, parts: &[&[u8]]) -> Option<NodeId> {
        let mut cur = self.tree.root();
        for p in parts {
            cur = self.tree.child(cur, p)?;
        }
        Some(cur)
    }

    /// `.wh..wh..opq` in `dir`: the directory hides the lower layers' content.
    fn opaque_marker(&mut self, dir: &[&[u8]]) -> Result<(), Error> {
        let dir = self.ensure_dir(dir)?;
        self.make_opaque(dir);
        Ok(())
    }

    /// Marks the directory `dir` opaque and drops the whiteouts in it: an opaque dir is
    /// shown as it is, unmerged, so whiteouts in it would be listed as broken entries,
    /// and it hides the lower dir anyway.
    fn make_opaque(&mut self, dir: NodeId) {
        self.tree.node_mut(dir).meta.set_xattr(opaque());
        let whiteouts: Vec<Box<[u8]>> = match &self.tree.node(dir).body {
            Body::Dir(children) => children
                .iter()
                .filter(|(_, &c)| is_whiteout_node(self.tree.node(c)))
                .map(|(n, _)| n.clone())
                .collect(),
            _ => Vec::new(),
        };
        for n in whiteouts {
            self.tree.unlink(dir, &n);
        }
    }

    /// `.wh.NAME` in `parent`: NAME of the lower layers is hidden. What this layer
    /// itself puts at NAME, before or after the whiteout, stays (OCI image spec): a
    /// directory of this layer becomes opaque (its lower namesake is gone, not merged),
    /// anything else already replaces the lower entry.
    fn whiteout(&mut self, e: &tar::Entry, parent: &[&[u8]], name: &[u8]) -> Result<(), Error> {
        let dir = self.ensure_dir(parent)?;
        if is_opaque(self.tree.node(dir)) {
            // Nothing below an opaque dir needs hiding (see `opaque_marker`).
            return Ok(());
        }
        match self.tree.child(dir, name) {
            Some(id) if self.tree.node(id).is_dir() => self.make_opaque(id),
            Some(_) => {}
            None => {
                let mut meta = self.meta_of(e)?;
                meta.perm = 0;
                meta.xattrs.clear();
                let id = self.tree.add(Node {
                    meta,
                    body: Body::CharDev(0, 0),
                });
                self.tree.link(dir, name, id);
            }
        }
        Ok(())
    }

    fn apply<R: BufRead, W: std::io::Write + std::io::Seek>(
        &mut self,
        e: &tar::Entry,
        tar: &mut TarReader<R>,
        image: &mut ImageWriter<W>,
    ) -> Result<(), Error> {
        let kind = e.kind.expect("reader returns typed entries");
        let (parents, name) = match e.target()? {
            Target::Root => {
                // The root itself ("./"): a directory entry sets the root's metadata, as
                // GNU tar sets the metadata of the directory it extracts into.
                if kind == Kind::Dir {
                    let mut meta = self.meta_of(e)?;
                    let root = self.tree.root();
                    if is_opaque(self.tree.node(root)) {
                        meta.set_xattr(opaque());
                    }
                    self.tree.node_mut(root).meta = meta;
                    return Ok(());
                }
                return Err(Error::new(
                    ErrorKind::NotADirectory,
                    "the layer root must be a directory",
                ));
            }
            Target::AufsMeta => return Ok(()),
            Target::Opaque { dir } => return self.opaque_marker(&dir),
            Target::Whiteout { parent, name } => return self.whiteout(e, &parent, name),
            Target::Path { parent, name } => (parent, name),
        };

        let dir = self.ensure_dir(&parents)?;
        let existing = self.tree.child(dir, name);
        let mut meta = self.meta_of(e)?;
        let body = match kind {
            Kind::Dir => {
                if let Some(id) = existing {
                    let node = self.tree.node(id);
                    // A whiteout of this layer (before or after) hides the lower
                    // directory: this layer's directory is opaque.
                    if is_whiteout_node(node) || is_opaque(node) {
                        meta.set_xattr(opaque());
                    }
                    if node.is_dir() {
                        self.tree.node_mut(id).meta = meta;
                        return Ok(());
                    }
                }
                Body::Dir(Default::default())
            }
            Kind::File if self.tar_index => Body::File(crate::tarindex::file_in_tar(tar.position(), e.size)?),
            Kind::File => {
                let data = image
                    .write_file(tar.body(), e.size, &meta, reborrow(&mut self.sink))
                    .map_err(|err| match err {
                        writer::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                            Error::new(ErrorKind::Truncated, "stream ended inside the file's data")
                        }
                        other => werr(other),
                    })?;
                tar.body_done();
                Body::File(data)
            }
            Kind::HardLink => {
                let bad = |why: &str| {
                    Error::new(
                        ErrorKind::LinkTarget,
                        format!("hard link target {:?} {why}", String::from_utf8_lossy(&e.link)),
                    )
                };
                let target_parts = oci_layer::name::components(&e.link).map_err(|err| bad(&err.message))?;
                let target = self
                    .lookup(&target_parts)
                    .filter(|&t| !is_whiteout_node(self.tree.node(t)))
                    .ok_or_else(|| bad("is not in the layer"))?;
                if self.tree.node(target).is_dir() {
                    return Err(bad("is a directory"));
                }
                self.tree.link(dir, name, target);
                return Ok(());
            }
            Kind::Symlink => {
                if e.link.is_empty() {
                    return Err(Error::new(ErrorKind::Unsupported, "symlink with an empty target"));
                }
                // Linux gives every symlink mode 0777, whatever the header says.
                meta.perm = 0o777;
                Body::Symlink(e.link.clone().into_boxed_slice())
            }
            Kind::CharDev => Body::CharDev(e.devmajor, e.devminor),
            Kind::BlockDev => Body::BlockDev(e.devmajor, e.devminor),
            Kind::Fifo => Body::Fifo,
        };
        let id = self.tree.add(Node { meta, body });
        self.tree.link(dir, name, id);
        Ok(())
    }
}

/// The image file, written through; when the image will be fsync'd, writeback of
/// what is written starts every 32 MiB (`sync_file_range`), so the disk works while
/// the conversion goes on and the final fsync has little left to wait for.
pub(crate) struct Output {
    file: File,
    early_writeback: bool,
    pos: u64,
    flushed_to: u64,
}

const WRITEBACK_STEP: u64 = 32 << 20;

impl Output {
    pub(crate) fn new(file: File, early_writeback: bool) -> Output {
        Output {
            file,
            early_writeback,
            pos: 0,
            flushed_to: 0,
        }
    }

    fn start_writeback(&mut self) {
        if self.early_writeback && self.pos >= self.flushed_to + WRITEBACK_STEP {
            use std::os::fd::AsRawFd;
            let len = self.pos - self.flushed_to;
            // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
            // A failure only means the final fsync does all the work, so it is ignored.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.flushed_to as libc::off64_t,
                    len as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.flushed_to = self.pos;
        }
    }
}

impl std::io::Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.pos += n as u64;
        self.start_writeback();
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl std::io::Seek for Output {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        self.pos = self.file.seek(to)?;
        // Writeback was started up to `flushed_to`; after a seek back (the superblock)
        // the final fsync takes care of the rest.
        self.flushed_to = self.flushed_to.min(self.pos);
        Ok(self.pos)
    }
}

/// The image being written: a temporary file beside the output, removed unless
/// [`TempOutput::persist`] renames it into place.
pub(crate) struct TempOutput {
    pub(crate) file: File,
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl TempOutput {
    pub(crate) fn create(dest: &Path) -> Result<TempOutput, Error> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dest
            .file_name()
            .ok_or_else(|| Error::new(ErrorKind::Io, format!("output {} has no file name", dest.display())))?;
        let nonce = Sha256::digest(format!("{:?}{}", Instant::now(), std::process::id()));
        let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), hex::encode(&nonce[..6])));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(e).entry(&tmp.display().to_string()))?;
        Ok(TempOutput {
            file,
            tmp,
            dest: dest.to_path_buf(),
            done: false,
        })
    }

    pub(crate) fn persist(mut self, sync_dir: bool) -> Result<(), Error> {
        fs::rename(&self.tmp, &self.dest).map_err(Error::io)?;
        self.done = true;
        if sync_dir {
            if let Some(dir) = self.dest.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                File::open(dir).and_then(|d| d.sync_all()).map_err(Error::io)?;
            }
        }
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_map_to_compressions() {
        let c = |m: &str| Compression::from_media_type(m).map_err(|e| e.kind);
        assert_eq!(c("application/vnd.oci.image.layer.v1.tar"), Ok(Compression::None));
        assert_eq!(c("application/vnd.oci.image.layer.v1.tar+gzip"), Ok(Compression::Gzip));
        assert_eq!(c("application/vnd.oci.image.layer.v1.tar+zstd"), Ok(Compression::Zstd));
        assert_eq!(
            c("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Ok(Compression::Gzip)
        );
        assert_eq!(
            c("application/vnd.oci.image.layer.v1.tar+bzip2"),
            Err(ErrorKind::Unsupported)
        );
        assert_eq!(c("application/vnd.erofs.layer.v1"), Err(ErrorKind::Unsupported));
    }
}
