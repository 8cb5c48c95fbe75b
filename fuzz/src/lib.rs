//! Shared by the fuzz targets: images in memory, reading a whole image back into a
//! comparable tree, and the model of a layer the converter's output is checked against.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;

use erofs::reader::{Entry, FileKind, Image};

pub mod model;

/// Most file bytes read back from one image: a validated image may still describe
/// huge sparse files (holes cost nothing on disk), which reading in full would only
/// spend the fuzzer's time on.
pub const READ_BUDGET: u64 = 4 << 20;

/// An anonymous in-memory file holding `bytes`.
pub fn memfile(bytes: &[u8]) -> File {
    let fd = rustix::fs::memfd_create("fuzz", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd_create");
    let mut f = File::from(fd);
    f.write_all(bytes).expect("writing a memfd");
    f
}

/// What one inode reads back as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A directory (its children are separate paths).
    Dir,
    /// A regular file's bytes.
    File(Vec<u8>),
    /// A symlink's target.
    Symlink(Vec<u8>),
    /// A character device (0/0 is an overlay whiteout).
    CharDev(u32, u32),
    /// A block device.
    BlockDev(u32, u32),
    /// A FIFO.
    Fifo,
    /// A socket.
    Socket,
}

/// One path of an image or a model: content and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// What it is.
    pub content: Content,
    /// Permission bits (07777).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime: u64,
    /// Its nanoseconds.
    pub mtime_nsec: u32,
    /// Every xattr, by full name.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// A whole tree by path (`/` is the root; `/a/b` below it).
pub type Tree = BTreeMap<Vec<u8>, Node>;

/// Reads every inode, xattr and byte of an image (file bytes up to [`READ_BUDGET`] in
/// all), the way a mounted filesystem would be read. Errors are returned, never panics.
pub fn read_tree(img: &Image) -> erofs::reader::Result<Tree> {
    let mut out = Tree::new();
    let mut budget = READ_BUDGET;
    let mut err = None;
    img.walk(&mut |path, e| {
        let node = read_node(img, e, &mut budget);
        match node {
            Ok(n) => {
                out.insert(path.to_vec(), n);
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                err = Some(e);
                Err(erofs::reader::Error::Corrupt(msg))
            }
        }
    })
    .map_err(|e| err.take().unwrap_or(e))?;
    Ok(out)
}

fn read_node(img: &Image, e: &Entry, budget: &mut u64) -> erofs::reader::Result<Node> {
    let content = match e.kind {
        FileKind::Dir => {
            img.read_dir(e)?;
            Content::Dir
        }
        FileKind::File => {
            let take = e.inode.size.min(*budget);
            *budget -= take;
            let mut buf = vec![0u8; take as usize];
            let n = img.read_at(e, 0, &mut buf)?;
            if n != buf.len() {
                return Err(erofs::reader::Error::Corrupt(format!("nid {} reads short", e.nid)));
            }
            if e.inode.size > take {
                // The end of a file larger than the budget too (a huge sparse file's
                // last chunk), so reads far into a file are exercised as well.
                let mut tail = vec![0u8; 4096.min(e.inode.size) as usize];
                img.read_at(e, e.inode.size - tail.len() as u64, &mut tail)?;
            }
            Content::File(buf)
        }
        FileKind::Symlink => Content::Symlink(img.read_link(e)?),
        FileKind::CharDev => {
            let (a, b) = img.rdev(e);
            Content::CharDev(a, b)
        }
        FileKind::BlockDev => {
            let (a, b) = img.rdev(e);
            Content::BlockDev(a, b)
        }
        FileKind::Fifo => Content::Fifo,
        FileKind::Socket => Content::Socket,
    };
    Ok(Node {
        content,
        perm: e.inode.mode & 0o7777,
        uid: e.inode.uid,
        gid: e.inode.gid,
        mtime: e.inode.mtime,
        mtime_nsec: e.inode.mtime_nsec,
        xattrs: img.xattrs(e)?.into_iter().collect(),
    })
}
