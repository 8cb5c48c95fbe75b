//! The writer's output bytes, pinned: a fixed tree that exercises every layout and
//! structure the writer emits (compact and extended inodes, inline tails, plain data,
//! chunk indexes on the image and on an extra device, holes, shared and inline xattrs,
//! devices, long and short symlinks, a multi-block directory) must keep producing the
//! same image, so refactors of the format code cannot silently change what the kernel
//! (and every image digest already recorded) sees.

use std::io::{self, Cursor};

use erofs::format::DeviceSlot;
use erofs::writer::{Body, ChunkAddr, ChunkSink, ImageWriter, Meta, Node, Options, Tree, Xattr};

/// FNV-1a: enough to pin bytes in a test without a hashing dependency.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Hands out consecutive blocks of device 1, and holes for all-zero chunks.
struct Sink {
    next: u32,
}

impl ChunkSink for Sink {
    fn put(&mut self, data: &[u8]) -> io::Result<ChunkAddr> {
        if data.iter().all(|&b| b == 0) {
            return Ok(ChunkAddr::HOLE);
        }
        let blkaddr = self.next;
        self.next += data.len().div_ceil(4096) as u32;
        Ok(ChunkAddr { device: 1, blkaddr })
    }

    fn device_slots(&self) -> Vec<DeviceSlot> {
        let mut tag = [0u8; 64];
        tag[..11].copy_from_slice(b"sha256:blob");
        vec![DeviceSlot {
            tag,
            blocks: self.next,
            mapped_blkaddr: 0,
        }]
    }
}

fn meta(perm: u16, mtime: u64) -> Meta {
    Meta {
        perm,
        mtime,
        ..Default::default()
    }
}

/// Builds the fixed image; `chunked` sends large files through a sink.
fn build(chunked: bool, meta_first: bool) -> Vec<u8> {
    let opts = Options {
        build_time: 1_700_000_000,
        uuid: [9; 16],
        chunk_bits: 13,
        ..Default::default()
    };
    let mut w = ImageWriter::new(Cursor::new(Vec::new()), opts).unwrap();
    let mut sink = Sink { next: 0 };
    let mut tree = Tree::new(meta(0o755, 1_700_000_000));
    let root = tree.root();

    let shared = Xattr::new(b"security.capability", b"shared-by-many").unwrap();
    for (i, size) in [0usize, 1, 100, 4095, 4096, 4097, 9000, 20000, 70000]
        .into_iter()
        .enumerate()
    {
        let mut m = meta(
            0o644,
            if i % 2 == 0 {
                1_700_000_000
            } else {
                1_600_000_000 + i as u64
            },
        );
        m.uid = if i == 3 { 70000 } else { 1000 };
        m.set_xattr(shared.clone());
        if i % 3 == 0 {
            m.set_xattr(Xattr::new(format!("user.k{i}").as_bytes(), &content(i * 7, 3)).unwrap());
        }
        let data = if i == 7 {
            vec![0u8; size]
        } else {
            content(size, i as u8)
        };
        let s: Option<&mut dyn ChunkSink> = if chunked { Some(&mut sink) } else { None };
        let f = w.write_file(&mut &data[..], size as u64, &m, s).unwrap();
        let id = tree.add(Node {
            meta: m,
            body: Body::File(f),
        });
        tree.link(root, format!("file{i}").as_bytes(), id);
    }
    let sub = tree.add(Node::dir(meta(0o700, 1_700_000_000)));
    tree.link(root, b"sub", sub);
    for i in 0..300 {
        let id = tree.add(Node {
            meta: meta(0o777, 1_700_000_000),
            body: Body::Symlink(format!("target-{i:04}").into_bytes().into()),
        });
        tree.link(sub, format!("entry-with-a-longish-name-{i:05}").as_bytes(), id);
    }
    let long = tree.add(Node {
        meta: meta(0o777, 1_700_000_000),
        body: Body::Symlink(vec![b'x'; 4000].into()),
    });
    tree.link(root, b"longlink", long);
    for (name, body) in [
        (&b"null"[..], Body::CharDev(1, 3)),
        (b"disk", Body::BlockDev(259, 70000)),
        (b"fifo", Body::Fifo),
        (b"sock", Body::Socket),
    ] {
        let id = tree.add(Node {
            meta: meta(0o600, 1_700_000_000),
            body,
        });
        tree.link(root, name, id);
    }
    if chunked {
        w.set_devices(sink.device_slots());
    }
    let bytes = if meta_first {
        let (_, out, _) = w.finish_meta_first(&tree, Vec::new()).unwrap();
        out
    } else {
        let (out, _) = w.finish(&tree).unwrap();
        out.into_inner()
    };
    // The result must stay a readable image, not just the same bytes.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    std::fs::write(&path, &bytes).unwrap();
    let img = erofs::reader::Image::open(&path).unwrap();
    img.walk(&mut |_, _| Ok(())).unwrap();
    bytes
}

#[test]
fn writer_output_is_unchanged() {
    let got: Vec<(bool, bool, usize, u64)> = [(false, false), (false, true), (true, false), (true, true)]
        .into_iter()
        .map(|(chunked, meta_first)| {
            let b = build(chunked, meta_first);
            (chunked, meta_first, b.len(), fnv1a(&b))
        })
        .collect();
    let want: &[(bool, bool, usize, u64)] = &[
        // Small inodes fill the room earlier ones left at a block's end (best fit): one
        // metadata block less than placing them strictly in order.
        (false, false, 155648, 16307430631017589873),
        (false, true, 155648, 5294958198017817515),
        // The device table moved into block 0 (after the superblock) for up to 22 devices:
        // one block less than when it followed the (empty) data area.
        (true, false, 45056, 10931546649700021268),
        (true, true, 49152, 3458857073471793441),
    ];
    assert_eq!(got, want, "the writer's output bytes changed");
}
