//! Building an EROFS image from a directory: what a snapshot's Commit does when
//! containerd's own differ unpacked the layer into the snapshot's `fs/`.
//!
//! The directory is taken as an overlayfs upper layer: whiteouts (char 0/0) and
//! `trusted.overlay.opaque` are kept as they are, so the image stacks exactly as the
//! directory did. Other `trusted.overlay.*` xattrs (origin, impure, …) describe the
//! upper dir's relation to the lower file systems it had, which the image no longer
//! has, and are dropped.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use erofs::writer::{self, Body, ChunkSink, ImageWriter, Meta, Node, NodeId, Tree, Xattr};

use crate::convert::{Options, Output, TempOutput};
use oci_layer::{Error, ErrorKind};

/// What a directory build did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DirReport {
    /// Entries below the root (the root not counted).
    pub entries: u64,
    /// Inodes in the image.
    pub inodes: u64,
    /// Image bytes.
    pub output_size: u64,
}

/// Deeper trees than this are refused rather than risk the stack.
const MAX_DEPTH: usize = 4096;

/// Builds an EROFS image of `src` at `output` (temporary file, renamed on success).
/// The options for tar input only (`media_type`, `max_size`, `meta_first`) are ignored.
pub fn convert_dir(src: &Path, output: &Path, opts: &Options) -> Result<DirReport, Error> {
    convert_dir_with(src, output, opts, None)
}

/// [`convert_dir`], with regular files written as chunk-based files whose chunks go
/// to `sink` (deduplicated layers).
pub fn convert_dir_with(
    src: &Path,
    output: &Path,
    opts: &Options,
    sink: Option<&mut dyn ChunkSink>,
) -> Result<DirReport, Error> {
    let tmp = TempOutput::create(output)?;
    let out = BufWriter::with_capacity(
        1 << 20,
        Output::new(tmp.file.try_clone().map_err(Error::io)?, opts.fsync),
    );
    let wopts = writer::Options {
        inline_data: opts.inline_data,
        build_time: opts.build_time,
        uuid: opts.uuid.unwrap_or_default(),
        chunk_bits: opts.chunk_size.bits(),
        compression: opts.compress,
        ..Default::default()
    };
    let mut image = ImageWriter::new(out, wopts).map_err(crate::convert::werr)?;
    let root_md = fs::symlink_metadata(src).map_err(|e| Error::io(e).entry(&src.display().to_string()))?;
    if !root_md.is_dir() {
        return Err(Error::new(
            ErrorKind::NotADirectory,
            format!("{} is not a directory", src.display()),
        ));
    }
    let mut w = Walker {
        tree: Tree::new(meta_of(src, &root_md)?),
        links: HashMap::new(),
        entries: 0,
        sink,
    };
    let root = w.tree.root();
    w.add_children(src, root, &mut image, 0)?;
    if let Some(sink) = &w.sink {
        image.set_devices(sink.device_slots());
    }
    let (mut out, summary) = image.finish(&w.tree).map_err(crate::convert::werr)?;
    std::io::Write::flush(&mut out).map_err(Error::io)?;
    drop(out);
    if opts.fsync {
        tmp.file.sync_all().map_err(Error::io)?;
    }
    tmp.persist(opts.fsync)?;
    Ok(DirReport {
        entries: w.entries,
        inodes: summary.inodes,
        output_size: summary.bytes,
    })
}

struct Walker<'s> {
    tree: Tree,
    /// (dev, ino) of multiply-linked non-directories already added: hard links.
    links: HashMap<(u64, u64), NodeId>,
    entries: u64,
    sink: Option<&'s mut dyn ChunkSink>,
}

impl Walker<'_> {
    fn add_children<W: std::io::Write + std::io::Seek>(
        &mut self,
        dir: &Path,
        node: NodeId,
        image: &mut ImageWriter<W>,
        depth: usize,
    ) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err(Error::new(ErrorKind::Unsupported, "directory tree too deep").entry(&dir.display().to_string()));
        }
        let mut names: Vec<_> = fs::read_dir(dir)
            .map_err(|e| Error::io(e).entry(&dir.display().to_string()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| Error::io(e).entry(&dir.display().to_string()))?;
        // Sorted, so file bodies land in the image in the order the tree lists them.
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let shown = || path.display().to_string();
            let md = fs::symlink_metadata(&path).map_err(|e| Error::io(e).entry(&shown()))?;
            let name = std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str());
            oci_layer::name::check_component(name).map_err(|e| e.entry(&shown()))?;
            self.entries += 1;
            let key = (md.dev(), md.ino());
            if !md.is_dir() && md.nlink() > 1 {
                if let Some(&id) = self.links.get(&key) {
                    self.tree.link(node, name, id);
                    continue;
                }
            }
            let meta = meta_of(&path, &md)?;
            let ft = md.file_type();
            let body = if ft.is_dir() {
                Body::Dir(Default::default())
            } else if ft.is_file() {
                let f = File::open(&path).map_err(|e| Error::io(e).entry(&shown()))?;
                let mut r = BufReader::with_capacity(256 << 10, f);
                let data = image
                    .write_file(&mut r, md.len(), &meta, crate::convert::reborrow(&mut self.sink))
                    .map_err(|e| match e {
                        writer::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                            Error::new(ErrorKind::Truncated, "file shrank while it was read").entry(&shown())
                        }
                        other => crate::convert::werr(other).entry(&shown()),
                    })?;
                Body::File(data)
            } else if ft.is_symlink() {
                let t = fs::read_link(&path).map_err(|e| Error::io(e).entry(&shown()))?;
                Body::Symlink(std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str()).into())
            } else if ft.is_char_device() || ft.is_block_device() {
                let rdev = md.rdev();
                let (ma, mi) = (libc_major(rdev), libc_minor(rdev));
                if ft.is_char_device() {
                    Body::CharDev(ma, mi)
                } else {
                    Body::BlockDev(ma, mi)
                }
            } else if ft.is_fifo() {
                Body::Fifo
            } else {
                Body::Socket
            };
            let is_dir = matches!(body, Body::Dir(_));
            let id = self.tree.add(Node { meta, body });
            self.tree.link(node, name, id);
            if is_dir {
                self.add_children(&path, id, image, depth + 1)?;
            } else if md.nlink() > 1 {
                self.links.insert(key, id);
            }
        }
        Ok(())
    }
}

/// glibc's `gnu_dev_major`.
fn libc_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32
}

/// glibc's `gnu_dev_minor`.
fn libc_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32
}

fn meta_of(path: &Path, md: &fs::Metadata) -> Result<Meta, Error> {
    let shown = || path.display().to_string();
    let mut meta = Meta {
        perm: (md.mode() & 0o7777) as u16,
        uid: md.uid(),
        gid: md.gid(),
        mtime: crate::convert::erofs_seconds(md.mtime()),
        mtime_nsec: md.mtime_nsec() as u32,
        xattrs: Vec::new(),
    };
    for (name, value) in oci_layer::xattr::read(path).map_err(|e| Error::io(e).entry(&shown()))? {
        if oci_layer::xattr::is_overlay(&name) && name != oci_layer::xattr::OVERLAY_OPAQUE {
            continue;
        }
        let x =
            Xattr::new(&name, &value).map_err(|e| Error::new(ErrorKind::Unsupported, e.to_string()).entry(&shown()))?;
        meta.set_xattr(x);
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Commit conversion keeps every time the directory holds: before 1970, after
    /// 2106, with nanoseconds (the kernel reads the 64-bit `i_mtime` as signed).
    #[test]
    fn times_before_1970_and_after_2106_are_kept() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(src.join("dir")).unwrap();
        let times = [
            ("neg", -2i64, 500_000_000u32),
            ("big", 1 << 33, 999_999_999),
            ("dir", -(1 << 31) + 1, 1),
        ];
        for (name, s, ns) in times {
            let p = src.join(name);
            if !p.exists() {
                fs::write(&p, b"x").unwrap();
            }
            let ts = rustix::fs::Timespec {
                tv_sec: s,
                tv_nsec: ns as _,
            };
            rustix::fs::utimensat(
                rustix::fs::CWD,
                &p,
                &rustix::fs::Timestamps {
                    last_access: ts,
                    last_modification: ts,
                },
                rustix::fs::AtFlags::empty(),
            )
            .unwrap();
        }
        let out = d.path().join("t.erofs");
        convert_dir(&src, &out, &Options::default()).unwrap();
        let img = erofs::reader::Image::open(&out).unwrap();
        for (name, s, ns) in times {
            let e = img.lookup(name.as_bytes()).unwrap();
            assert_eq!((e.inode.mtime as i64, e.inode.mtime_nsec), (s, ns), "{name}");
        }
    }

    #[test]
    fn builds_an_image_the_reader_lists() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::write(src.join("a/b/f"), vec![7u8; 5000]).unwrap();
        fs::hard_link(src.join("a/b/f"), src.join("a/h")).unwrap();
        std::os::unix::fs::symlink("b/f", src.join("a/l")).unwrap();
        let out = d.path().join("x.erofs");
        let r = convert_dir(
            &src,
            &out,
            &Options {
                inline_data: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(r.entries, 5);
        let img = erofs::reader::Image::open(&out).unwrap();
        let f = img.lookup(b"/a/b/f").unwrap();
        let h = img.lookup(b"/a/h").unwrap();
        assert_eq!(f.nid, h.nid);
        assert_eq!(f.inode.nlink, 2);
        assert_eq!(img.read_all(&f).unwrap(), vec![7u8; 5000]);
        assert_eq!(img.read_link(&img.lookup(b"/a/l").unwrap()).unwrap(), b"b/f");
        let leftovers: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "{leftovers:?}");
    }
}
