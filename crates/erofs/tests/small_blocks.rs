//! Images with blocks smaller than 4 KiB (`Options::block_bits` 9 ..= 11), as tar-index
//! images need: their chunk-based files point into an uncompressed tar stream given as an
//! extra device, whose data is only 512-byte aligned.
//!
//! - The default block size must keep producing the very bytes it always did: a set of
//!   trees, built with every layout the writer has, is pinned by sha256.
//! - Small-block images of a tree with every kind of node must read back, through this
//!   crate's reader and validator, as the tree that was written, and pass erofs-utils'
//!   `fsck.erofs` when a recent one is installed.
//! - The kernel must mount them (file-backed, with the data file as extra device) and show
//!   that same tree, bytes included; so must `fsck.erofs --extract`, when installed (the
//!   root tier: needs root and erofs).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_int, c_ulong, c_void, CString};
use std::io::{self, Cursor};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use erofs::format::DeviceSlot;
use erofs::reader::{FileKind, Image};
use erofs::writer::{
    Body, ChunkAddr, ChunkSink, Compression, Error, FileData, ImageWriter, Meta, Node, NodeId, Options, Summary, Tree,
    Xattr,
};

// ---- SHA-256 (FIPS 180-4): pins image bytes without a hashing dependency ---------------

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
    0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
    0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
    0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2,
];

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes(word.try_into().unwrap());
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let mut v = h;
        for i in 0..64 {
            let s1 = v[4].rotate_right(6) ^ v[4].rotate_right(11) ^ v[4].rotate_right(25);
            let ch = (v[4] & v[5]) ^ (!v[4] & v[6]);
            let t1 = v[7]
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = v[0].rotate_right(2) ^ v[0].rotate_right(13) ^ v[0].rotate_right(22);
            let maj = (v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]);
            let t2 = s0.wrapping_add(maj);
            v = [
                t1.wrapping_add(t2),
                v[0],
                v[1],
                v[2],
                v[3].wrapping_add(t1),
                v[4],
                v[5],
                v[6],
            ];
        }
        for (a, b) in h.iter_mut().zip(v) {
            *a = a.wrapping_add(b);
        }
    }
    let mut out = [0u8; 32];
    for (o, x) in out.chunks_exact_mut(4).zip(h) {
        o.copy_from_slice(&x.to_be_bytes());
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn sha256_known_answers() {
    assert_eq!(
        hex(&sha256(b"")),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        hex(&sha256(b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        hex(&sha256(&[b'a'; 1_000])),
        "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
    );
}

// ---- The trees ---------------------------------------------------------------------------

const BUILD: u64 = 1_700_000_000;

/// How an image is built.
#[derive(Debug, Clone, Copy)]
struct Spec {
    block_bits: u8,
    inline_data: bool,
    /// Regular files go through a [`ChunkSink`] onto device 1.
    sink: bool,
    /// Chunk-based files built by the caller, tar-index style, point into device 1.
    caller_chunks: bool,
    chunk_bits: u8,
    compression: Option<(&'static str, u64)>,
    meta_first: bool,
    /// Dummy devices after device 1 (enough of them push the table out of the head).
    dummy_devices: u16,
    devt_reserve_blocks: u32,
    flat_devices: bool,
}

impl Spec {
    const fn new(block_bits: u8) -> Spec {
        Spec {
            block_bits,
            inline_data: true,
            sink: false,
            caller_chunks: false,
            chunk_bits: 16,
            compression: None,
            meta_first: false,
            dummy_devices: 0,
            devt_reserve_blocks: 0,
            flat_devices: false,
        }
    }

    fn bs(&self) -> u64 {
        1 << self.block_bits
    }

    fn has_devices(&self) -> bool {
        self.sink || self.caller_chunks || self.dummy_devices > 0
    }

    fn options(&self) -> Options {
        Options {
            block_bits: self.block_bits,
            inline_data: self.inline_data,
            build_time: BUILD,
            build_time_nsec: 0,
            uuid: [0x5a; 16],
            volume_name: *b"small-blocks\0\0\0\0",
            chunk_bits: self.chunk_bits,
            compression: self.compression.map(|(codec, pcluster)| {
                let mut c = Compression::new(codec.parse().unwrap())
                    .with_pcluster_size(pcluster)
                    .unwrap();
                c.workers = 2;
                c
            }),
            devt_reserve_blocks: self.devt_reserve_blocks,
            flat_devices: self.flat_devices,
        }
    }
}

/// What an entry must look like, read back or mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    /// Size and sha256 of the contents (not the bytes: a failed comparison stays readable).
    File(u64, String),
    Symlink(String),
    CharDev(u32, u32),
    BlockDev(u32, u32),
    Fifo,
    Socket,
}

/// An entry as seen: by the reader or through the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    kind: Kind,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: u64,
    mtime_nsec: u32,
    nlink: u32,
    /// (full name, value), sorted.
    xattrs: Vec<(String, String)>,
}

fn file_kind(data: &[u8]) -> Kind {
    Kind::File(data.len() as u64, hex(&sha256(data)))
}

fn xattr_seen(name: &[u8], value: &[u8]) -> (String, String) {
    (String::from_utf8_lossy(name).into_owned(), hex(value))
}

/// Device 1: the data file chunk-based files point into (a tar stream's stand-in).
struct DataDevice {
    bytes: Vec<u8>,
    bs: u64,
    /// Filler written before each file placed, as a tar header would be.
    filler: u64,
}

impl DataDevice {
    /// Appends `data` at the next block boundary (filler first); returns its block.
    fn place(&mut self, data: &[u8]) -> u32 {
        let filler = test_support::pseudo_random(self.filler as usize, self.bytes.len() as u64);
        self.bytes.extend_from_slice(&filler);
        self.pad();
        let at = self.bytes.len() as u64 / self.bs;
        self.bytes.extend_from_slice(data);
        self.pad();
        u32::try_from(at).unwrap()
    }

    fn pad(&mut self) {
        let len = (self.bytes.len() as u64).next_multiple_of(self.bs);
        self.bytes.resize(len as usize, 0);
    }

    fn slot(&self) -> DeviceSlot {
        let mut tag = [0u8; 64];
        tag[..9].copy_from_slice(b"tar-index");
        DeviceSlot {
            tag,
            blocks: (self.bytes.len() as u64).div_ceil(self.bs) as u32,
            mapped_blkaddr: 0,
        }
    }
}

impl ChunkSink for DataDevice {
    fn put(&mut self, data: &[u8]) -> io::Result<ChunkAddr> {
        if data.iter().all(|&b| b == 0) {
            return Ok(ChunkAddr::HOLE);
        }
        Ok(ChunkAddr {
            device: 1,
            blkaddr: self.place(data),
        })
    }

    fn device_slots(&self) -> Vec<DeviceSlot> {
        vec![self.slot()]
    }
}

/// Text that compresses, for the compressed variants.
fn words(n: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&[u8]; 8] = [
        b"block ", b"chunk ", b"extent ", b"index ", b"tail ", b"inode ", b"tar ", b"z ",
    ];
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n + 16);
    while out.len() < n {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        out.extend_from_slice(WORDS[(x >> 61) as usize]);
    }
    out.truncate(n);
    out
}

/// Builds a tree and its image, recording what every path must show.
struct Builder {
    spec: Spec,
    w: ImageWriter<Cursor<Vec<u8>>>,
    dev: DataDevice,
    tree: Tree,
    /// Path -> (node, what it must look like but for its link count).
    expected: BTreeMap<Vec<u8>, (NodeId, Seen)>,
    paths: HashMap<NodeId, Vec<u8>>,
    n: u64,
}

impl Builder {
    fn new(spec: Spec) -> Builder {
        let w = ImageWriter::new(Cursor::new(Vec::new()), spec.options()).unwrap();
        let mut root = Meta {
            perm: 0o755,
            mtime: BUILD,
            ..Default::default()
        };
        root.set_xattr(Xattr::new(b"user.root", b"the root").unwrap());
        let tree = Tree::new(root.clone());
        let mut b = Builder {
            spec,
            w,
            dev: DataDevice {
                bytes: Vec::new(),
                bs: spec.bs(),
                filler: 512,
            },
            tree,
            expected: BTreeMap::new(),
            paths: HashMap::new(),
            n: 0,
        };
        b.paths.insert(0, Vec::new());
        b.expected.insert(b"/".to_vec(), (0, seen_of(&root, Kind::Dir)));
        b
    }

    /// Metadata that varies from node to node: compact and extended inodes, big ids,
    /// shared, inline and long xattrs. `user.*` only on files and directories, where
    /// the kernel lets them be read.
    fn meta(&mut self, perm: u16, user_xattrs: bool) -> Meta {
        self.n += 1;
        let n = self.n;
        let mut m = Meta {
            perm,
            uid: [0, 1000, 65535, 70000, 4_000_000_000][(n % 5) as usize],
            gid: [0, 100, 65536, 5][(n % 4) as usize],
            mtime: if n.is_multiple_of(3) { BUILD } else { BUILD - 86_400 * n },
            mtime_nsec: if n.is_multiple_of(3) {
                0
            } else {
                (n * 7919 % 1_000_000_000) as u32
            },
            xattrs: Vec::new(),
        };
        if n.is_multiple_of(2) {
            m.set_xattr(Xattr::new(b"trusted.shared", b"one value many inodes").unwrap());
        }
        if n.is_multiple_of(3) {
            m.set_xattr(Xattr::new(format!("trusted.k{n}").as_bytes(), format!("v{n}").as_bytes()).unwrap());
        }
        if n.is_multiple_of(11) {
            m.set_xattr(Xattr::new(b"security.test", &test_support::pseudo_random(700, n)).unwrap());
        }
        if user_xattrs && n % 4 == 1 {
            m.set_xattr(Xattr::new(b"user.empty", b"").unwrap());
        }
        m
    }

    fn path(&self, dir: NodeId, name: &[u8]) -> Vec<u8> {
        let mut p = self.paths[&dir].clone();
        p.push(b'/');
        p.extend_from_slice(name);
        p
    }

    fn put(&mut self, dir: NodeId, name: &[u8], node: Node, kind: Kind) -> NodeId {
        let seen = seen_of(&node.meta, kind);
        let is_dir = node.is_dir();
        let id = self.tree.add(node);
        assert!(self.tree.link(dir, name, id).is_none());
        let p = self.path(dir, name);
        if is_dir {
            self.paths.insert(id, p.clone());
        }
        self.expected.insert(p, (id, seen));
        id
    }

    /// A second name for `id`.
    fn hardlink(&mut self, dir: NodeId, name: &[u8], id: NodeId) {
        let seen = self
            .expected
            .values()
            .find(|(n, _)| *n == id)
            .map(|(_, s)| s.clone())
            .unwrap();
        assert!(self.tree.link(dir, name, id).is_none());
        let p = self.path(dir, name);
        self.expected.insert(p, (id, seen));
    }

    fn dir(&mut self, parent: NodeId, name: &[u8]) -> NodeId {
        let m = self.meta(0o755, true);
        self.put(parent, name, Node::dir(m), Kind::Dir)
    }

    fn file(&mut self, dir: NodeId, name: &[u8], data: &[u8], perm: u16) -> NodeId {
        let m = self.meta(perm, true);
        let sink: Option<&mut dyn ChunkSink> = if self.spec.sink { Some(&mut self.dev) } else { None };
        let f = self.w.write_file(&mut &data[..], data.len() as u64, &m, sink).unwrap();
        self.put(
            dir,
            name,
            Node {
                meta: m,
                body: Body::File(f),
            },
            file_kind(data),
        )
    }

    /// A chunk-based file built by the caller, as a tar index does: chunks of `1 << bits`
    /// bytes, each placed in the data device on its own (after filler), `holes` not at all.
    fn chunked(&mut self, dir: NodeId, name: &[u8], data: &[u8], bits: u8, holes: &[usize]) -> NodeId {
        let chunk = 1usize << bits;
        let mut contents = data.to_vec();
        let chunks = data
            .chunks(chunk)
            .enumerate()
            .map(|(i, c)| {
                if holes.contains(&i) {
                    contents[i * chunk..i * chunk + c.len()].fill(0);
                    ChunkAddr::HOLE
                } else {
                    ChunkAddr {
                        device: 1,
                        blkaddr: self.dev.place(c),
                    }
                }
            })
            .collect();
        let m = self.meta(0o644, true);
        let f = FileData {
            size: data.len() as u64,
            chunks: Some(chunks),
            chunk_bits: bits,
            blkaddr: u32::MAX,
            ..Default::default()
        };
        self.put(
            dir,
            name,
            Node {
                meta: m,
                body: Body::File(f),
            },
            file_kind(&contents),
        )
    }

    fn symlink(&mut self, dir: NodeId, name: &[u8], target: &[u8]) -> NodeId {
        let m = self.meta(0o777, false);
        self.put(
            dir,
            name,
            Node {
                meta: m,
                body: Body::Symlink(target.into()),
            },
            Kind::Symlink(String::from_utf8(target.to_vec()).unwrap()),
        )
    }

    fn special(&mut self, dir: NodeId, name: &[u8], body: Body) -> NodeId {
        let kind = match body {
            Body::CharDev(a, b) => Kind::CharDev(a, b),
            Body::BlockDev(a, b) => Kind::BlockDev(a, b),
            Body::Fifo => Kind::Fifo,
            Body::Socket => Kind::Socket,
            _ => unreachable!(),
        };
        let m = self.meta(0o640, false);
        self.put(dir, name, Node { meta: m, body }, kind)
    }

    /// Every kind of node, names and sizes around the block sizes.
    fn populate(&mut self) {
        let root = self.tree.root();
        let bs = self.spec.bs() as usize;

        let files = self.dir(root, b"files");
        let sizes = [
            0usize, 1, 100, 511, 512, 513, 1000, 1023, 1024, 1025, 2047, 2048, 2049, 3000, 4095, 4096, 4097, 8191,
            8192, 10_000, 70_000, 300_000,
        ];
        for (i, size) in sizes.into_iter().enumerate() {
            let data = if i % 2 == 0 {
                test_support::pseudo_random(size, i as u64 + 1)
            } else {
                words(size, i as u64)
            };
            self.file(files, format!("f{i:02}-{size}").as_bytes(), &data, 0o644);
        }
        // All zeros: a sink stores it as holes.
        self.file(files, b"zeros", &vec![0u8; 40_000], 0o600);
        self.file(files, b"setuid", b"#!/bin/sh\n", 0o4755);

        // Nested directories, each with a file and a link to its parent.
        let mut d = self.dir(root, b"dirs");
        for (depth, name) in [&b"a"[..], b"b", b"c", b"d", b"e"].into_iter().enumerate() {
            d = self.dir(d, name);
            self.file(d, b"file", &words(depth * 700 + 5, depth as u64), 0o644);
            self.symlink(d, b"up", b"..");
        }

        // A directory over many blocks of any size: mixed kinds, names of growing length.
        let many = self.dir(root, b"many");
        for i in 0..700usize {
            let name = format!("entry-{i:05}-{}", "x".repeat(i % 50));
            let name = name.as_bytes();
            match i % 5 {
                0 => {
                    self.file(many, name, b"", 0o644);
                }
                1 => {
                    self.file(many, name, format!("{i}").as_bytes(), 0o644);
                }
                2 => {
                    self.symlink(many, name, format!("t{i}").as_bytes());
                }
                3 => {
                    self.special(many, name, Body::Fifo);
                }
                _ => {
                    self.dir(many, name);
                }
            }
        }

        // Names up to the longest EROFS allows.
        let long = self.dir(root, b"long");
        for len in [128usize, 200, 254, 255] {
            let name: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let mut other = name.clone();
            other[0] = b'Z';
            let mut dname = name.clone();
            dname[0] = b'D';
            self.file(long, &name, &words(len * 3, len as u64), 0o644);
            self.symlink(long, &other, &name);
            let sub = self.dir(long, &dname);
            self.file(sub, &name, b"deep", 0o644);
        }

        // Symlink targets around the block sizes, up to PATH_MAX - 1.
        let links = self.dir(root, b"links");
        for len in [1usize, 10, 100, 400, 511, 512, 513, 1000, 2047, 2048, 3000, 4095] {
            let target: Vec<u8> = (0..len)
                .map(|i| if i % 16 == 15 { b'/' } else { b'a' + (i % 23) as u8 })
                .collect();
            self.symlink(links, format!("l{len}").as_bytes(), &target);
        }

        let dev = self.dir(root, b"dev");
        self.special(dev, b"null", Body::CharDev(1, 3));
        self.special(dev, b"tty-big-minor", Body::CharDev(136, 300));
        self.special(dev, b"sda1", Body::BlockDev(8, 1));
        self.special(dev, b"nvme-big-minor", Body::BlockDev(259, 70_000));
        self.special(dev, b"fifo", Body::Fifo);
        self.special(dev, b"sock", Body::Socket);

        // Two names (and more) for one node, of several kinds.
        let hard = self.dir(root, b"hard");
        let a = self.file(hard, b"a", &words(3000, 77), 0o644);
        self.hardlink(hard, b"b", a);
        let deep = self
            .paths
            .iter()
            .find(|(_, p)| p.ends_with(b"/e"))
            .map(|(id, _)| *id)
            .unwrap();
        self.hardlink(deep, b"hl", a);
        let e = self.file(hard, b"e1", b"", 0o644);
        self.hardlink(hard, b"e2", e);
        let c = self.special(hard, b"c1", Body::CharDev(5, 1));
        self.hardlink(hard, b"c2", c);
        let s = self.symlink(hard, b"s1", b"a");
        self.hardlink(hard, b"s2", s);

        self.dir(root, b"empty");

        // Xattrs: many per inode, and values larger than a small block.
        let x = self.dir(root, b"x");
        let id = self.file(x, b"many-xattrs", b"x", 0o644);
        for i in 0..12u64 {
            let v = test_support::pseudo_random(200, i);
            self.set_xattr(id, format!("user.attr{i:02}").as_bytes(), &v);
        }
        let id = self.file(x, b"big-xattr", &words(bs + 7, 3), 0o644);
        self.set_xattr(id, b"trusted.big", &test_support::pseudo_random(3000, 9));
        self.set_xattr(id, b"user.huge", &test_support::pseudo_random(10_000, 10));
        let id = self.dir(x, b"dir-with-xattrs");
        self.set_xattr(id, b"trusted.overlay.opaque", b"y");
        self.set_xattr(id, b"user.long", &test_support::pseudo_random(1500, 11));
        let id = self.symlink(x, b"link-with-xattrs", b"target");
        self.set_xattr(id, b"trusted.big", &test_support::pseudo_random(3000, 9));

        if self.spec.caller_chunks {
            let bits = self.spec.block_bits;
            let chunks = self.dir(root, b"chunks");
            for (i, size) in [1usize, 511, 512, 513, 1000, 4096, 5000, 20_000, 100_000]
                .into_iter()
                .enumerate()
            {
                let data = test_support::pseudo_random(size, 1000 + i as u64);
                // One chunk covering the whole file, as a tar index maps a member.
                let one = (size as u64).next_power_of_two().trailing_zeros().max(u32::from(bits)) as u8;
                self.chunked(chunks, format!("one-{size}").as_bytes(), &data, one, &[]);
            }
            let data = test_support::pseudo_random((13 << bits) + 123, 2000);
            self.chunked(chunks, b"block-chunks", &data, bits, &[4]);
            let data = words((7 << (bits + 3)) + 5, 2001);
            self.chunked(chunks, b"multi-chunks", &data, bits + 3, &[2, 5]);
            let data = test_support::pseudo_random(3 << (bits + 1), 2002);
            self.chunked(chunks, b"exact-chunks", &data, bits + 1, &[]);
        }
    }

    fn set_xattr(&mut self, id: NodeId, name: &[u8], value: &[u8]) {
        self.tree.node_mut(id).meta.set_xattr(Xattr::new(name, value).unwrap());
        let (n, v) = xattr_seen(name, value);
        for (node, seen) in self.expected.values_mut() {
            if *node == id {
                seen.xattrs.retain(|x| x.0 != n);
                seen.xattrs.push((n.clone(), v.clone()));
                seen.xattrs.sort();
            }
        }
    }

    fn finish(mut self) -> Built {
        if self.spec.has_devices() {
            let mut slots = vec![self.dev.slot()];
            for i in 0..self.spec.dummy_devices {
                let mut tag = [0u8; 64];
                tag[..8].copy_from_slice(format!("dummy{i:03}").as_bytes());
                slots.push(DeviceSlot {
                    tag,
                    blocks: 16 + u32::from(i),
                    mapped_blkaddr: 0,
                });
            }
            self.w.set_devices(slots);
        }
        let (image, summary) = if self.spec.meta_first {
            let (_, out, summary) = self.w.finish_meta_first(&self.tree, Vec::new()).unwrap();
            (out, summary)
        } else {
            let (out, summary) = self.w.finish(&self.tree).unwrap();
            (out.into_inner(), summary)
        };
        // Link counts: names per node; a directory's `.` and its subdirectories' `..`.
        let mut names: HashMap<NodeId, u32> = HashMap::new();
        for (id, _) in self.expected.values() {
            *names.entry(*id).or_default() += 1;
        }
        let expected = self
            .expected
            .iter()
            .map(|(p, (id, s))| {
                let mut s = s.clone();
                s.nlink = match self.tree.node(*id).body {
                    Body::Dir(ref c) => 2 + c.values().filter(|c| self.tree.node(**c).is_dir()).count() as u32,
                    _ => names[id],
                };
                (p.clone(), s)
            })
            .collect();
        let mut groups: BTreeMap<NodeId, Vec<Vec<u8>>> = BTreeMap::new();
        for (p, (id, _)) in &self.expected {
            groups.entry(*id).or_default().push(p.clone());
        }
        Built {
            image,
            data: self.dev.bytes,
            dummy_devices: self.spec.dummy_devices,
            expected,
            groups: groups.into_values().collect(),
            summary,
        }
    }
}

fn seen_of(m: &Meta, kind: Kind) -> Seen {
    let mut xattrs: Vec<(String, String)> = m.xattrs.iter().map(|x| xattr_seen(&x.name(), &x.value)).collect();
    xattrs.sort();
    Seen {
        kind,
        perm: m.perm,
        uid: m.uid,
        gid: m.gid,
        mtime: m.mtime,
        mtime_nsec: m.mtime_nsec,
        nlink: 0,
        xattrs,
    }
}

/// A finished image and what it must show.
struct Built {
    image: Vec<u8>,
    /// Device 1.
    data: Vec<u8>,
    dummy_devices: u16,
    expected: BTreeMap<Vec<u8>, Seen>,
    /// The paths of each node (several for hard links).
    groups: Vec<Vec<Vec<u8>>>,
    summary: Summary,
}

fn build(spec: Spec) -> Built {
    let mut b = Builder::new(spec);
    b.populate();
    b.finish()
}

/// The image and its devices written to `dir`: (image, devices in table order).
fn write_out(built: &Built, dir: &Path, name: &str) -> (PathBuf, Vec<PathBuf>) {
    let img = dir.join(format!("{name}.erofs"));
    std::fs::write(&img, &built.image).unwrap();
    let mut devices = Vec::new();
    if !built.data.is_empty() || built.dummy_devices > 0 {
        let p = dir.join(format!("{name}.data"));
        std::fs::write(&p, &built.data).unwrap();
        devices.push(p);
    }
    for i in 0..built.dummy_devices {
        let p = dir.join(format!("{name}.dummy{i}"));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len((16 + u64::from(i)) * 4096).unwrap();
        devices.push(p);
    }
    (img, devices)
}

// ---- The reader's view -------------------------------------------------------------------

/// Every entry as this crate's reader sees it, and the nid behind each path.
fn read_back(img: &Path, devices: &[PathBuf]) -> (BTreeMap<Vec<u8>, Seen>, HashMap<Vec<u8>, u64>) {
    let image = Image::open_with_devices(img, devices).unwrap();
    image.validate().unwrap_or_else(|e| panic!("{}: {e}", img.display()));
    let mut entries = Vec::new();
    image
        .walk(&mut |p, e| {
            entries.push((p.to_vec(), e.clone()));
            Ok(())
        })
        .unwrap();
    let mut seen = BTreeMap::new();
    let mut nids = HashMap::new();
    for (p, e) in entries {
        let kind = match e.kind {
            FileKind::Dir => Kind::Dir,
            FileKind::File => file_kind(&image.read_all(&e).unwrap()),
            FileKind::Symlink => Kind::Symlink(String::from_utf8(image.read_link(&e).unwrap()).unwrap()),
            FileKind::CharDev => {
                let (a, b) = image.rdev(&e);
                Kind::CharDev(a, b)
            }
            FileKind::BlockDev => {
                let (a, b) = image.rdev(&e);
                Kind::BlockDev(a, b)
            }
            FileKind::Fifo => Kind::Fifo,
            FileKind::Socket => Kind::Socket,
        };
        let mut xattrs: Vec<(String, String)> = image
            .xattrs(&e)
            .unwrap()
            .iter()
            .map(|(n, v)| xattr_seen(n, v))
            .collect();
        xattrs.sort();
        let ino = &e.inode;
        seen.insert(
            p.clone(),
            Seen {
                kind,
                perm: ino.mode & 0o7777,
                uid: ino.uid,
                gid: ino.gid,
                mtime: ino.mtime,
                mtime_nsec: ino.mtime_nsec,
                nlink: ino.nlink,
                xattrs,
            },
        );
        nids.insert(p, e.nid);
    }
    (seen, nids)
}

/// `got` must equal `want`, entry by entry (a message per difference, not one huge diff).
fn compare(what: &str, want: &BTreeMap<Vec<u8>, Seen>, got: &BTreeMap<Vec<u8>, Seen>) {
    let mut diffs = Vec::new();
    for (p, w) in want {
        match got.get(p) {
            None => diffs.push(format!("{}: missing", String::from_utf8_lossy(p))),
            Some(g) if g != w => diffs.push(format!("{}:\n  want {w:?}\n  got  {g:?}", String::from_utf8_lossy(p))),
            Some(_) => {}
        }
    }
    for p in got.keys().filter(|p| !want.contains_key(*p)) {
        diffs.push(format!("{}: unexpected", String::from_utf8_lossy(p)));
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences:\n{}",
        diffs.len(),
        diffs.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Hard links are one inode, everything else distinct ones.
fn check_identity(what: &str, groups: &[Vec<Vec<u8>>], ident: &HashMap<Vec<u8>, u64>) {
    let mut owner = HashMap::new();
    for (g, paths) in groups.iter().enumerate() {
        let ids: Vec<u64> = paths.iter().map(|p| ident[p]).collect();
        assert!(
            ids.windows(2).all(|w| w[0] == w[1]),
            "{what}: {paths:?} are not one inode: {ids:?}"
        );
        if let Some(other) = owner.insert(ids[0], g) {
            panic!("{what}: {:?} and {:?} share inode {}", groups[other], paths, ids[0]);
        }
    }
}

// ---- erofs-utils -------------------------------------------------------------------------

/// An `fsck.erofs` of erofs-utils 1.7 or later (the first to check images with blocks
/// smaller than 4 KiB), where scripts/lib/erofs-utils.sh builds one or on the PATH.
fn recent_fsck() -> Option<PathBuf> {
    let cache = std::env::var_os("DEDUP_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/dedup-snapshotter-tests"), PathBuf::from);
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(&cache)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().as_bytes().starts_with(b"erofs-utils-"))
        .map(|e| e.path().join("bin/fsck.erofs"))
        .collect();
    candidates.sort();
    candidates.reverse();
    candidates.push(PathBuf::from("fsck.erofs"));
    candidates.into_iter().find(|p| {
        let Ok(out) = Command::new(p).arg("-V").output() else {
            return false;
        };
        // "fsck.erofs (erofs-utils) 1.9.4", then the decompressors it has.
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or("");
        let mut parts = version.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (major, minor) >= (1, 7)
    })
}

fn fsck(fsck: &Path, img: &Path, devices: &[PathBuf]) {
    let mut cmd = Command::new(fsck);
    for d in devices {
        cmd.arg(format!("--device={}", d.display()));
    }
    let out = cmd.arg(img).output().unwrap();
    assert!(
        out.status.success(),
        "{} {}: {}{}",
        fsck.display(),
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- Golden digests at the default block size ----------------------------------------------

/// Every layout the writer has at 4 KiB blocks, by name.
fn golden_specs() -> Vec<(&'static str, Spec)> {
    let base = Spec::new(12);
    vec![
        ("inline", base),
        (
            "noinline",
            Spec {
                inline_data: false,
                ..base
            },
        ),
        (
            "sink-4k-chunks",
            Spec {
                sink: true,
                caller_chunks: true,
                chunk_bits: 12,
                ..base
            },
        ),
        (
            "sink-64k-chunks-noinline",
            Spec {
                sink: true,
                caller_chunks: true,
                inline_data: false,
                ..base
            },
        ),
        (
            "lz4",
            Spec {
                compression: Some(("lz4", 4096)),
                ..base
            },
        ),
        (
            "zstd-64k",
            Spec {
                compression: Some(("zstd", 65536)),
                ..base
            },
        ),
        (
            "meta-first",
            Spec {
                meta_first: true,
                ..base
            },
        ),
        (
            "meta-first-chunks",
            Spec {
                meta_first: true,
                sink: true,
                caller_chunks: true,
                ..base
            },
        ),
        (
            "table-after-data",
            Spec {
                caller_chunks: true,
                dummy_devices: 30,
                ..base
            },
        ),
        (
            "table-reserved",
            Spec {
                caller_chunks: true,
                dummy_devices: 30,
                devt_reserve_blocks: 1,
                ..base
            },
        ),
        (
            "flat-devices",
            Spec {
                sink: true,
                caller_chunks: true,
                flat_devices: true,
                ..base
            },
        ),
    ]
}

/// The default block size writes what it always wrote (digests taken before block
/// sizes became an option).
#[test]
fn default_block_size_output_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let mut got = Vec::new();
    for (name, spec) in golden_specs() {
        let built = build(spec);
        // Still an image that reads back as built, not just the same bytes.
        let (img, devices) = write_out(&built, dir.path(), name);
        let (seen, _) = read_back(&img, &devices);
        if spec.compression.is_none() {
            compare(name, &built.expected, &seen);
        } else {
            assert_eq!(
                seen.keys().collect::<Vec<_>>(),
                built.expected.keys().collect::<Vec<_>>()
            );
        }
        got.push((name, built.image.len(), hex(&sha256(&built.image))));
    }
    let want: &[(&str, usize, &str)] = &[
        (
            "inline",
            684032,
            "5a9db966bf7f5b86bd7d6575958d73ac801529690c84a440ddbbb32f81b54269",
        ),
        (
            "noinline",
            1363968,
            "713ed9330e66a9dcbc4506a214a19f577c3d3b94529930ef79f32528f4f5335b",
        ),
        (
            "sink-4k-chunks",
            233472,
            "103458d044a2a6b140c70577e9085e1fff41c62b3ae9f0e8fedae3635dc1a2d9",
        ),
        (
            "sink-64k-chunks-noinline",
            208896,
            "4bd8feb0d506a676f56b5b6f118dd7e220f881447f06b4d6e987d93e690dda39",
        ),
        (
            "lz4",
            458752,
            "d6174cdaf61b3249f4de89190e0e38733b3d7176cc6ec587b270d4f64351903e",
        ),
        (
            "zstd-64k",
            376832,
            "768ac2fcbb71e242fe1156b85887e8c9caa8c488cd834843e1e485088e76f932",
        ),
        (
            "meta-first",
            684032,
            "ad04b49c092222657f1f3644cc93d4ceb9cd0fd6a6ac97fe87921f64a80d06a5",
        ),
        (
            "meta-first-chunks",
            237568,
            "ed004abbbe8b3e1cebdf8851a805d88878a1e8b112c02d75fcb276ca5a1a8a7c",
        ),
        (
            "table-after-data",
            692224,
            "e8bdbdebcc4e876bfd0058998f3efb09a6df9e1e05487126b2c20b4336f44afd",
        ),
        (
            "table-reserved",
            692224,
            "5aff68f359e817af05f47dfef33d6725e28b088f23c1c6be201cd35523408463",
        ),
        (
            "flat-devices",
            233472,
            "f28dac88a5193334973998eecd5b814d37ddb3e8818900ab0cced6a0ee1c85ee",
        ),
    ];
    let got: Vec<(&str, usize, &str)> = got.iter().map(|(n, l, h)| (*n, *l, h.as_str())).collect();
    assert_eq!(got, want, "the writer's output bytes changed at the default block size");
}

// ---- Small blocks ------------------------------------------------------------------------

/// The layouts small blocks have, by name: tar-index images (chunk-based files on a data
/// device, everything else metadata) and images with data of their own.
fn small_specs(block_bits: u8) -> Vec<(String, Spec)> {
    let base = Spec::new(block_bits);
    let bs = 1u32 << block_bits;
    vec![
        (
            format!("tar-index-{bs}"),
            Spec {
                caller_chunks: true,
                sink: true,
                chunk_bits: block_bits + 3,
                ..base
            },
        ),
        (
            format!("tar-index-noinline-{bs}"),
            Spec {
                caller_chunks: true,
                inline_data: false,
                ..base
            },
        ),
        (format!("inline-{bs}"), base),
        (
            format!("noinline-{bs}"),
            Spec {
                inline_data: false,
                ..base
            },
        ),
        (
            format!("meta-first-{bs}"),
            Spec {
                meta_first: true,
                caller_chunks: true,
                ..base
            },
        ),
    ]
}

/// Structural facts of a small-block image: the block size, the head, sizes in blocks.
fn check_layout(name: &str, spec: &Spec, built: &Built) {
    let bs = spec.bs();
    let sb = erofs::format::SuperBlock::decode(&built.image[1024..]).unwrap();
    assert_eq!(sb.blkszbits, spec.block_bits, "{name}");
    assert_eq!(built.image.len() as u64 % bs, 0, "{name}");
    assert_eq!(u64::from(sb.blocks) * bs, built.image.len() as u64, "{name}");
    assert_eq!(built.summary.bytes, built.image.len() as u64, "{name}");
    assert_eq!(
        u64::from(sb.meta_blkaddr),
        u64::from(built.summary.meta_blkaddr),
        "{name}"
    );
    if !spec.meta_first {
        // The head stays 4 KiB: data (or metadata, without data) starts right after it.
        assert_eq!(u64::from(built.summary.data_blkaddr), 4096 / bs, "{name}");
        assert!(u64::from(sb.meta_blkaddr) >= 4096 / bs, "{name}");
    }
    if spec.has_devices() {
        assert_eq!(sb.extra_devices, 1 + spec.dummy_devices, "{name}");
        // The table follows the superblock in the head, or the head in the
        // metadata-first layout.
        let at = if spec.meta_first { 4096 } else { 1024 + 128 };
        assert_eq!(sb.devt_slotoff, at / 128, "{name}");
    }
}

/// Small-block images read back, through this crate's reader and validator (and
/// erofs-utils' fsck.erofs when a recent one is installed), as the trees written.
#[test]
fn small_block_images_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let fsck_bin = recent_fsck();
    match &fsck_bin {
        Some(f) => eprintln!("checking with {}", f.display()),
        None => eprintln!("no fsck.erofs >= 1.7 installed (scripts/lib/erofs-utils.sh): not checking with it"),
    }
    for bits in [9u8, 10, 11] {
        for (name, spec) in small_specs(bits) {
            let built = build(spec);
            check_layout(&name, &spec, &built);
            let (img, devices) = write_out(&built, dir.path(), &name);
            let (seen, nids) = read_back(&img, &devices);
            compare(&name, &built.expected, &seen);
            check_identity(&name, &built.groups, &nids);
            if let Some(f) = &fsck_bin {
                fsck(f, &img, &devices);
            }
        }
    }
}

/// The chunk indexes of a tar-index image name the data device's blocks exactly where
/// the caller put each member, in 512-byte units.
#[test]
fn chunk_indexes_address_512_byte_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = DataDevice {
        bytes: Vec::new(),
        bs: 512,
        filler: 512,
    };
    let opts = Options {
        block_bits: 9,
        build_time: BUILD,
        ..Default::default()
    };
    let mut w = ImageWriter::new(Cursor::new(Vec::new()), opts).unwrap();
    assert_eq!(w.block_size(), 512);
    let mut tree = Tree::new(Meta {
        perm: 0o755,
        mtime: BUILD,
        ..Default::default()
    });
    let mut want = Vec::new();
    for (i, size) in [700usize, 512, 3, 9000].into_iter().enumerate() {
        let data = test_support::pseudo_random(size, i as u64);
        let off = dev.place(&data);
        let bits = (size as u64).next_power_of_two().trailing_zeros().max(9) as u8;
        let id = tree.add(Node {
            meta: Meta {
                perm: 0o644,
                mtime: BUILD,
                ..Default::default()
            },
            body: Body::File(FileData {
                size: size as u64,
                chunks: Some(
                    vec![ChunkAddr {
                        device: 1,
                        blkaddr: off,
                    }]
                    .into(),
                ),
                chunk_bits: bits,
                ..Default::default()
            }),
        });
        tree.link(0, format!("m{i}").as_bytes(), id);
        want.push((format!("/m{i}"), bits, off, data));
    }
    w.set_devices(vec![dev.slot()]);
    let (out, summary) = w.finish(&tree).unwrap();
    assert_eq!(summary.data_blkaddr, 8);
    assert_eq!(summary.data_blocks, 0);
    assert_eq!(summary.chunked_files, 4);
    let img = dir.path().join("img");
    let data = dir.path().join("data");
    std::fs::write(&img, out.into_inner()).unwrap();
    std::fs::write(&data, &dev.bytes).unwrap();
    let image = Image::open_with_devices(&img, &[data]).unwrap();
    assert_eq!(image.block_size(), 512);
    assert_eq!(image.devices()[0].blocks as usize, dev.bytes.len() / 512);
    for (path, bits, off, bytes) in want {
        let e = image.lookup(path.as_bytes()).unwrap();
        assert_eq!(
            image.placement(&e).unwrap(),
            erofs::reader::Placement::Chunks {
                bits,
                addrs: vec![(1, off)]
            },
            "{path}"
        );
        assert_eq!(image.read_all(&e).unwrap(), bytes, "{path}");
    }
}

/// Block sizes out of range, and what small blocks do not support, are refused.
#[test]
fn small_block_options_are_checked() {
    let new = |opts: Options| ImageWriter::new(Cursor::new(Vec::new()), opts).map(|_| ());
    let refused = |opts: Options, what: &str| match new(opts) {
        Err(Error::Unrepresentable(m)) => assert!(m.contains(what), "{m}"),
        other => panic!("{what}: {other:?}"),
    };
    for bits in [0u8, 8, 13, 16] {
        refused(
            Options {
                block_bits: bits,
                ..Default::default()
            },
            "block size",
        );
    }
    for bits in 9u8..=12 {
        new(Options {
            block_bits: bits,
            ..Default::default()
        })
        .unwrap();
    }
    assert_eq!(Options::default().block_bits, 12);
    let small = Options {
        block_bits: 9,
        ..Default::default()
    };
    refused(
        Options {
            compression: Some(Compression::new("lz4".parse().unwrap())),
            ..small.clone()
        },
        "compression",
    );
    refused(
        Options {
            flat_devices: true,
            ..small.clone()
        },
        "flat devices",
    );
    refused(
        Options {
            devt_reserve_blocks: 1,
            ..small.clone()
        },
        "reserved",
    );
    // 4 KiB blocks keep them all.
    new(Options {
        compression: Some(Compression::new("lz4".parse().unwrap())),
        flat_devices: true,
        devt_reserve_blocks: 1,
        ..Default::default()
    })
    .unwrap();

    // Chunk sizes run from one block to 2^31 blocks of the image's size.
    let file = |chunk_bits: u8, size: u64| {
        let w = ImageWriter::new(Cursor::new(Vec::new()), small.clone()).unwrap();
        let mut tree = Tree::new(Meta::default());
        let n = size.div_ceil(1 << chunk_bits.min(63)) as usize;
        let id = tree.add(Node {
            meta: Meta::default(),
            body: Body::File(FileData {
                size,
                chunks: Some(vec![ChunkAddr::HOLE; n].into()),
                chunk_bits,
                ..Default::default()
            }),
        });
        tree.link(0, b"f", id);
        w.finish(&tree).map(|_| ())
    };
    file(9, 1000).unwrap();
    file(40, 1000).unwrap();
    assert!(matches!(file(8, 1000), Err(Error::Unrepresentable(_))));
    assert!(matches!(file(41, 1000), Err(Error::Unrepresentable(_))));
    let mut w = ImageWriter::new(
        Cursor::new(Vec::new()),
        Options {
            chunk_bits: 8,
            ..small.clone()
        },
    )
    .unwrap();
    let mut dev = DataDevice {
        bytes: Vec::new(),
        bs: 512,
        filler: 0,
    };
    assert!(matches!(
        w.write_file_chunked(&mut &[1u8; 1000][..], 1000, &mut dev),
        Err(Error::Unrepresentable(_))
    ));
}

// ---- The kernel's view -------------------------------------------------------------------

const MS_RDONLY: c_ulong = 1;

extern "C" {
    fn mount(
        source: *const c_char,
        target: *const c_char,
        fstype: *const c_char,
        flags: c_ulong,
        data: *const c_void,
    ) -> c_int;
    fn llistxattr(path: *const c_char, list: *mut c_char, size: usize) -> isize;
    fn lgetxattr(path: *const c_char, name: *const c_char, value: *mut c_void, size: usize) -> isize;
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Mounts `img` read-only at `target` with mount(2) itself: mount(8) would put a regular
/// file on a loop device, where extra devices must be block devices too.
fn mount_erofs(img: &Path, devices: &[PathBuf], target: &Path) -> io::Result<()> {
    let data = devices
        .iter()
        .map(|d| format!("device={}", d.display()))
        .collect::<Vec<_>>()
        .join(",");
    let data = CString::new(data).unwrap();
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        mount(
            cstr(img).as_ptr(),
            cstr(target).as_ptr(),
            c"erofs".as_ptr(),
            MS_RDONLY,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn xattrs_of(p: &Path) -> Vec<(String, String)> {
    let c = cstr(p);
    // SAFETY: a valid path; a null buffer of size 0 asks for the size.
    let n = unsafe { llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(n >= 0, "llistxattr {}: {}", p.display(), io::Error::last_os_error());
    let mut names = vec![0u8; n as usize];
    // SAFETY: the buffer holds `names.len()` bytes.
    let n = unsafe { llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}: {}", p.display(), io::Error::last_os_error());
    let mut out = Vec::new();
    for name in names[..n as usize].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).unwrap();
        // SAFETY: as above.
        let len = unsafe { lgetxattr(c.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) };
        assert!(len >= 0, "lgetxattr {}: {}", p.display(), io::Error::last_os_error());
        let mut v = vec![0u8; len as usize];
        // SAFETY: the buffer holds `v.len()` bytes.
        let len = unsafe { lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(len >= 0, "lgetxattr {}: {}", p.display(), io::Error::last_os_error());
        v.truncate(len as usize);
        out.push(xattr_seen(name, &v));
    }
    out.sort();
    out
}

/// glibc's `major`/`minor`.
fn split_dev(dev: u64) -> (u32, u32) {
    (
        (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)) as u32,
        ((dev & 0xff) | ((dev >> 12) & !0xff)) as u32,
    )
}

/// Every entry of the mounted tree at `root`, and the inode number behind each path.
fn kernel_view(root: &Path) -> (BTreeMap<Vec<u8>, Seen>, HashMap<Vec<u8>, u64>) {
    let mut seen = BTreeMap::new();
    let mut inos = HashMap::new();
    let mut stack = vec![(b"/".to_vec(), root.to_path_buf())];
    while let Some((rel, p)) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                let e = e.unwrap();
                let mut r = if rel == b"/" { Vec::new() } else { rel.clone() };
                r.push(b'/');
                r.extend_from_slice(e.file_name().as_bytes());
                stack.push((r, e.path()));
            }
            Kind::Dir
        } else if ft.is_file() {
            file_kind(&std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display())))
        } else if ft.is_symlink() {
            let t = std::fs::read_link(&p).unwrap();
            Kind::Symlink(String::from_utf8(t.as_os_str().as_bytes().to_vec()).unwrap())
        } else if ft.is_char_device() {
            let (a, b) = split_dev(md.rdev());
            Kind::CharDev(a, b)
        } else if ft.is_block_device() {
            let (a, b) = split_dev(md.rdev());
            Kind::BlockDev(a, b)
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            assert!(ft.is_socket(), "{}: {ft:?}", p.display());
            Kind::Socket
        };
        seen.insert(
            rel.clone(),
            Seen {
                kind,
                perm: (md.mode() & 0o7777) as u16,
                uid: md.uid(),
                gid: md.gid(),
                mtime: md.mtime() as u64,
                mtime_nsec: md.mtime_nsec() as u32,
                nlink: md.nlink() as u32,
                xattrs: xattrs_of(&p),
            },
        );
        inos.insert(rel, md.ino());
    }
    (seen, inos)
}

fn dmesg_tail() -> String {
    Command::new("dmesg")
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(10)..].join("\n")
        })
        .unwrap_or_default()
}

/// The kernel mounts small-block images (file-backed, the data file as extra device) and
/// shows exactly the trees written: every entry's type, mode, owner, mtime, link count,
/// xattrs, link target and file bytes; hard links as one inode.
#[test]
#[cfg_attr(
    not(feature = "root-tests"),
    ignore = "mounts EROFS images: root and a kernel with erofs, the root tier (scripts/test.sh)"
)]
fn small_block_images_mount() {
    let dir = test_support::TestDir::new("erofs-small-blocks-");
    let fsck_bin = recent_fsck();
    for bits in [9u8, 10, 11, 12] {
        for (name, spec) in small_specs(bits) {
            let built = build(spec);
            let (img, devices) = write_out(&built, dir.path(), &name);
            let target = dir.join(format!("{name}.mnt"));
            std::fs::create_dir_all(&target).unwrap();
            let _unmount = test_support::Unmount(target.clone());
            if let Err(e) = mount_erofs(&img, &devices, &target) {
                panic!(
                    "{name}: mounting {} (devices {devices:?}): {e}\n{}",
                    img.display(),
                    dmesg_tail()
                );
            }
            let mounts = test_support::mounts_under(&target);
            assert_eq!(mounts.len(), 1, "{name}: {mounts:?}");
            assert_eq!(mounts[0].fstype, "erofs", "{name}");
            // File-backed, not on a loop device.
            assert_eq!(Path::new(&mounts[0].source), img, "{name}");
            let (seen, inos) = kernel_view(&target);
            compare(&format!("{name} mounted"), &built.expected, &seen);
            check_identity(&format!("{name} mounted"), &built.groups, &inos);
            test_support::unmount(&target).unwrap();
            assert!(!test_support::is_mounted(&target), "{name}");
            if let Some(f) = &fsck_bin {
                // erofs-utils' own reading of every file, device node and xattr.
                let out = dir.join(format!("{name}.extracted"));
                extract(f, &img, &devices, &out);
                let (seen, inos) = kernel_view(&out);
                // erofs-utils 1.9.4 extracts a file that ends in a hole chunk short (at
                // any block size): the all-zero file, all holes through a sink, is empty.
                let no_xattrs = |m: &BTreeMap<Vec<u8>, Seen>| -> BTreeMap<Vec<u8>, Seen> {
                    m.iter()
                        .filter(|(p, _)| !(spec.sink && p.as_slice() == b"/files/zeros"))
                        .map(|(p, s)| {
                            (
                                p.clone(),
                                Seen {
                                    xattrs: Vec::new(),
                                    ..s.clone()
                                },
                            )
                        })
                        .collect()
                };
                compare(
                    &format!("{name} extracted by fsck.erofs"),
                    &no_xattrs(&built.expected),
                    &no_xattrs(&seen),
                );
                check_identity(&format!("{name} extracted"), &built.groups, &inos);
            }
        }
    }
}

/// `fsck.erofs --extract`, as root: owners, modes and hard links kept. Not xattrs:
/// erofs-utils 1.9.4 fails to extract an empty xattr value (of mkfs.erofs' own images
/// too), and the reader and the kernel have checked them already.
fn extract(fsck: &Path, img: &Path, devices: &[PathBuf], to: &Path) {
    let mut cmd = Command::new(fsck);
    for d in devices {
        cmd.arg(format!("--device={}", d.display()));
    }
    let out = cmd
        .arg(format!("--extract={}", to.display()))
        .arg("--preserve")
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} --extract {}: {}{}",
        fsck.display(),
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
