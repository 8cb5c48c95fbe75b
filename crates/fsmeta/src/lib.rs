//! Merged metadata (fsmeta) over a chain of EROFS layers: one image holding the whole
//! stack's tree as overlayfs would show it, whose regular files point into the layers'
//! data through chunk indexes, each layer image (and each blob a deduplicated layer
//! names) an extra device. Mounted with those devices, it replaces an overlayfs stack of
//! one EROFS mount per layer with a single EROFS mount.
//!
//! The stack is resolved as overlayfs resolves it, bottom layer first:
//!
//! - a later entry replaces an earlier one at the same path (a directory replacing a
//!   non-directory, or the reverse, takes the earlier subtree with it);
//! - a directory over a directory merges with it and takes the later one's attributes,
//!   unless it is opaque (`trusted.overlay.opaque` = `y`), which hides what is below;
//! - a whiteout (a character device 0/0) removes what is below and is not itself shown;
//! - hard links are kept within their layer (overlayfs shows one lower inode per layer),
//!   each inode with its layer's link count, as overlayfs shows it, even where later
//!   layers hid some of its names.
//!
//! Data is never copied when it is block-addressable: a plain (`FLAT_PLAIN`) file is one
//! chunk on its layer's device, and a chunk-based file keeps its chunks, with device ids
//! renumbered into the merged device table. A file whose tail is packed after its inode
//! (`FLAT_INLINE`, which the store never writes but native layers may have) is copied
//! into the merged image. Compressed files are refused ([`Error::Unmergeable`]): their
//! data is not block-addressable, so a chain holding them stays per-layer.
//!
//! Written by hand on the project's own reader and writer, like the rest of the EROFS
//! code: merging is the same tree and chunk-index machinery the converter uses.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use erofs::format::{DeviceSlot, BLKSZBITS, NULL_ADDR};
use erofs::reader::{Entry, FileKind, Image, Placement};
use erofs::writer::{self, Body, ChunkAddr, FileData, ImageWriter, Meta, Node, NodeId, Options, Tree, Xattr};

/// The xattr overlayfs marks an opaque directory with.
const OPAQUE: &[u8] = b"trusted.overlay.opaque";

/// One layer of the chain: its EROFS image and, for a deduplicated layer, the blobs its
/// device table names, in that table's order.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The layer's image file.
    pub image: PathBuf,
    /// Its extra devices, in device-table order.
    pub devices: Vec<PathBuf>,
}

/// Why a chain could not be merged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The chain holds something merged metadata cannot point at (compressed data):
    /// the caller keeps the layers mounted one by one.
    #[error("layer {layer} ({image}): {why}")]
    Unmergeable {
        /// Index of the layer, 0 the bottom.
        layer: usize,
        /// Its image.
        image: PathBuf,
        /// What it holds.
        why: String,
    },
    /// A layer image is corrupt or could not be read.
    #[error("layer {layer} ({image}): {source}")]
    Layer {
        /// Index of the layer, 0 the bottom.
        layer: usize,
        /// Its image.
        image: PathBuf,
        /// The reader's error.
        source: erofs::reader::Error,
    },
    /// The merged image cannot hold the tree (too many devices or inodes, for example).
    #[error("merged image: {0}")]
    Write(#[from] writer::Error),
    /// Writing the merged image failed.
    #[error("merged image: {0}")]
    Io(#[from] io::Error),
}

/// What [`merge`] wrote.
#[derive(Debug, Clone)]
pub struct Merged {
    /// The merged image's extra devices, in device-table order: what to mount it with.
    pub devices: Vec<PathBuf>,
    /// The writer's figures about the image.
    pub summary: writer::Summary,
}

/// The merged device table: every layer image or blob a file points into, once.
#[derive(Default)]
struct Devices {
    paths: Vec<PathBuf>,
    ids: HashMap<PathBuf, u16>,
}

impl Devices {
    fn id(&mut self, path: &Path) -> Result<u16, writer::Error> {
        if let Some(&id) = self.ids.get(path) {
            return Ok(id);
        }
        let id = u16::try_from(self.paths.len() + 1)
            .map_err(|_| writer::Error::Unrepresentable("more than 65535 devices".into()))?;
        self.paths.push(path.to_path_buf());
        self.ids.insert(path.to_path_buf(), id);
        Ok(id)
    }

    fn slots(&self) -> io::Result<Vec<DeviceSlot>> {
        self.paths
            .iter()
            .map(|p| {
                let size = std::fs::metadata(p)?.len();
                let blocks = u32::try_from(size.div_ceil(writer::BLOCK_SIZE))
                    .map_err(|_| io::Error::other(format!("{} is over 16 TiB", p.display())))?;
                // The tag names the device for people (mounts pass the paths): the end of
                // its path, which is what tells layers apart.
                let name = p.as_os_str().as_encoded_bytes();
                let name = &name[name.len().saturating_sub(64)..];
                let mut tag = [0u8; 64];
                tag[..name.len()].copy_from_slice(name);
                Ok(DeviceSlot {
                    tag,
                    blocks,
                    mapped_blkaddr: 0,
                })
            })
            .collect()
    }
}

/// Reads a file of a layer image as a stream (for the files that are copied).
struct EntryReader<'a> {
    img: &'a Image,
    entry: &'a Entry,
    pos: u64,
}

impl Read for EntryReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self
            .img
            .read_at(self.entry, self.pos, buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Writes to `out` the merged metadata of `layers` (bottom first). `out` is created or
/// truncated; the caller stages and renames it.
pub fn merge(layers: &[Layer], out: &Path) -> Result<Merged, Error> {
    merge_with(layers, out, false)
}

/// [`merge`], with `flat`: the device table also lays the devices out after the image in
/// one address space, so that the image followed by its devices (each padded to whole
/// blocks) is one flat EROFS device ([`write_vmdk`] describes it).
pub fn merge_with(layers: &[Layer], out: &Path, flat: bool) -> Result<Merged, Error> {
    let file = File::create(out)?;
    let opts = Options {
        build_time: 0,
        flat_devices: flat,
        ..Default::default()
    };
    let mut w = ImageWriter::new(io::BufWriter::new(file), opts)?;
    let mut tree = Tree::new(Meta::default());
    let mut devices = Devices::default();
    for (i, layer) in layers.iter().enumerate() {
        let layer_err = |source| Error::Layer {
            layer: i,
            image: layer.image.clone(),
            source,
        };
        let img = Image::open_with_devices(&layer.image, &layer.devices).map_err(layer_err)?;
        let mut entries = Vec::new();
        img.walk(&mut |path, e| {
            entries.push((path.to_vec(), e.clone()));
            Ok(())
        })
        .map_err(layer_err)?;
        add_layer(&mut w, &mut tree, &mut devices, i, layer, &img, &entries)?;
    }
    w.set_devices(devices.slots()?);
    let (out, summary) = w.finish(&tree)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(Merged {
        devices: devices.paths,
        summary,
    })
}

/// Lays one layer's entries (in walk order: a directory before its children) over the
/// tree.
fn add_layer<W: io::Write + io::Seek>(
    w: &mut ImageWriter<W>,
    tree: &mut Tree,
    devices: &mut Devices,
    index: usize,
    layer: &Layer,
    img: &Image,
    entries: &[(Vec<u8>, Entry)],
) -> Result<(), Error> {
    let layer_err = |source| Error::Layer {
        layer: index,
        image: layer.image.clone(),
        source,
    };
    let unmergeable = |why: String| Error::Unmergeable {
        layer: index,
        image: layer.image.clone(),
        why,
    };
    // This layer's directories by path, and its other inodes by nid (hard links).
    let mut dirs: HashMap<&[u8], NodeId> = HashMap::new();
    let mut by_nid: HashMap<u64, NodeId> = HashMap::new();
    for (path, e) in entries {
        let (meta, opaque) = meta_of(img, e).map_err(layer_err)?;
        if path.as_slice() == b"/" {
            let root = tree.root();
            if opaque {
                tree.node_mut(root).body = Body::Dir(Default::default());
            }
            tree.node_mut(root).meta = meta;
            dirs.insert(path, root);
            continue;
        }
        let cut = path.iter().rposition(|&b| b == b'/').expect("walk paths start with /");
        let (parent_path, name) = (&path[..cut.max(1)], &path[cut + 1..]);
        let parent = *dirs
            .get(parent_path)
            .ok_or_else(|| unmergeable(format!("{} has no parent directory", String::from_utf8_lossy(path))))?;
        if e.kind == FileKind::CharDev && img.rdev(e) == (0, 0) {
            tree.unlink(parent, name);
            continue;
        }
        if e.kind == FileKind::Dir {
            let node = match tree.child(parent, name) {
                Some(d) if tree.node(d).is_dir() && !opaque => {
                    tree.node_mut(d).meta = meta;
                    d
                }
                _ => {
                    let d = tree.add(Node::dir(meta));
                    tree.link(parent, name, d);
                    d
                }
            };
            dirs.insert(path, node);
            continue;
        }
        if let Some(&node) = by_nid.get(&e.nid) {
            tree.link(parent, name, node);
            continue;
        }
        let body = match e.kind {
            FileKind::File => Body::File(file_data(w, devices, layer, img, e, &meta, &unmergeable, &layer_err)?),
            FileKind::Symlink => Body::Symlink(img.read_link(e).map_err(layer_err)?.into()),
            FileKind::CharDev => {
                let (ma, mi) = img.rdev(e);
                Body::CharDev(ma, mi)
            }
            FileKind::BlockDev => {
                let (ma, mi) = img.rdev(e);
                Body::BlockDev(ma, mi)
            }
            FileKind::Fifo => Body::Fifo,
            FileKind::Socket => Body::Socket,
            FileKind::Dir => unreachable!("handled above"),
        };
        let node = tree.add(Node { meta, body });
        if e.inode.nlink > 1 {
            tree.keep_nlink(node, e.inode.nlink);
        }
        by_nid.insert(e.nid, node);
        tree.link(parent, name, node);
    }
    Ok(())
}

/// An entry's attributes, without the opaque marker (returned apart: it is consumed by
/// the merge, not shown).
fn meta_of(img: &Image, e: &Entry) -> erofs::reader::Result<(Meta, bool)> {
    let mut meta = Meta::of_inode(&e.inode);
    let mut opaque = false;
    for (name, value) in img.xattrs(e)? {
        if name == OPAQUE {
            opaque = e.kind == FileKind::Dir && value == b"y";
            continue;
        }
        let x = Xattr::new(&name, &value)
            .map_err(|err| erofs::reader::Error::Corrupt(format!("nid {}: xattr: {err}", e.nid)))?;
        meta.set_xattr(x);
    }
    Ok((meta, opaque))
}

/// Where a merged regular file's data is: the layer's blocks or chunks when they can be
/// pointed at, else a copy in the merged image.
#[allow(clippy::too_many_arguments)]
fn file_data<W: io::Write + io::Seek>(
    w: &mut ImageWriter<W>,
    devices: &mut Devices,
    layer: &Layer,
    img: &Image,
    e: &Entry,
    meta: &Meta,
    unmergeable: &dyn Fn(String) -> Error,
    layer_err: &dyn Fn(erofs::reader::Error) -> Error,
) -> Result<FileData, Error> {
    let size = e.inode.size;
    match img.placement(e).map_err(layer_err)? {
        Placement::Empty => Ok(FileData {
            size: 0,
            blkaddr: NULL_ADDR,
            ..Default::default()
        }),
        Placement::Blocks { blkaddr } => {
            // One chunk for the whole file: its blocks are consecutive.
            let bits = (u64::BITS - (size - 1).leading_zeros()).max(u32::from(BLKSZBITS)) as u8;
            Ok(FileData {
                size,
                blkaddr: NULL_ADDR,
                chunks: Some(Box::new([ChunkAddr {
                    device: devices.id(&layer.image)?,
                    blkaddr,
                }])),
                chunk_bits: bits,
                ..Default::default()
            })
        }
        Placement::Chunks { bits, addrs } => {
            let mut out = Vec::with_capacity(addrs.len());
            for (dev, blkaddr) in addrs {
                if blkaddr == NULL_ADDR {
                    out.push(ChunkAddr::HOLE);
                    continue;
                }
                let path = match dev {
                    0 => &layer.image,
                    d => layer
                        .devices
                        .get(usize::from(d) - 1)
                        .ok_or_else(|| unmergeable(format!("nid {} names device {d}, which was not given", e.nid)))?,
                };
                out.push(ChunkAddr {
                    device: devices.id(path)?,
                    blkaddr,
                });
            }
            Ok(FileData {
                size,
                blkaddr: NULL_ADDR,
                chunks: Some(out.into_boxed_slice()),
                chunk_bits: bits,
                ..Default::default()
            })
        }
        Placement::Inline => {
            let mut src = BufReader::new(EntryReader { img, entry: e, pos: 0 });
            Ok(w.write_file_data(&mut src, size, meta)?)
        }
        Placement::Compressed => Err(unmergeable(format!(
            "nid {} is compressed: its data is not block-addressable",
            e.nid
        ))),
    }
}

/// Writes a VMDK descriptor (`monolithicFlat`) at `path` for the flat device made of
/// `image` (merged metadata written with `flat`) followed by `devices` in order, each
/// padded with zeros to whole blocks as the image's device table lays them out. VM
/// runtimes attach it as one block device, which mounts as EROFS with no extra devices.
/// Paths are written absolute; every file must be a whole number of 512-byte sectors.
pub fn write_vmdk(path: &Path, image: &Path, devices: &[PathBuf]) -> io::Result<()> {
    let mut extents = String::new();
    let mut sectors_total = 0u64;
    for f in std::iter::once(image).chain(devices.iter().map(PathBuf::as_path)) {
        let abs = std::fs::canonicalize(f)?;
        let name = abs
            .to_str()
            .filter(|n| !n.contains('"') && !n.contains('\n'))
            .ok_or_else(|| io::Error::other(format!("{}: a path a VMDK descriptor cannot name", abs.display())))?;
        let size = std::fs::metadata(&abs)?.len();
        if size % 512 != 0 || size == 0 {
            return Err(io::Error::other(format!(
                "{name}: {size} bytes, not a whole number of 512-byte sectors"
            )));
        }
        let sectors = size / 512;
        let padded = size.div_ceil(writer::BLOCK_SIZE) * writer::BLOCK_SIZE / 512;
        extents.push_str(&format!("RW {sectors} FLAT \"{name}\" 0\n"));
        if padded > sectors {
            extents.push_str(&format!("RW {} ZERO\n", padded - sectors));
        }
        sectors_total += padded;
    }
    let cylinders = sectors_total.div_ceil(16 * 63).min(16383);
    let text = format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         CID=fffffffe\n\
         parentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\
         \n\
         # Extent description\n\
         {extents}\n\
         # The Disk Data Base\n\
         #DDB\n\
         ddb.virtualHWVersion = \"4\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"16\"\n\
         ddb.geometry.sectors = \"63\"\n\
         ddb.adapterType = \"ide\"\n"
    );
    std::fs::write(path, text)
}
