//! The full validation pass: images our writer and erofs-utils' mkfs.erofs build pass
//! it, and each kind of corruption (patched into a real image at the structure it
//! targets) is refused with the error kind naming that check.

use std::io::{self, Cursor};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use erofs::format::{self, DeviceSlot};
use erofs::reader::{Entry, Image};
use erofs::writer::{Body, ChunkAddr, ChunkSink, ImageWriter, Meta, Node, Options, Tree, Xattr};
use erofs::{validate_file, validate_path, Invalid, Summary};

fn meta(perm: u16) -> Meta {
    Meta {
        perm,
        mtime: 1_700_000_000,
        ..Default::default()
    }
}

/// Chunks on the image itself (device 0) at the blocks it hands out, which it writes
/// into the image afterwards: no device table.
struct Local {
    next: u32,
    data: Vec<Vec<u8>>,
}

impl ChunkSink for Local {
    fn put(&mut self, data: &[u8]) -> io::Result<ChunkAddr> {
        let blkaddr = self.next;
        self.next += data.len().div_ceil(4096) as u32;
        self.data.push(data.to_vec());
        Ok(ChunkAddr { device: 1, blkaddr })
    }
    fn device_slots(&self) -> Vec<DeviceSlot> {
        vec![DeviceSlot {
            tag: [1; 64],
            blocks: self.next,
            mapped_blkaddr: 0,
        }]
    }
}

/// A small image with a subdirectory, plain, inline and chunked files, symlinks, a device
/// node and xattrs; `chunked` puts one file's chunks on an extra device (returned).
fn image(chunked: bool) -> (Vec<u8>, Option<Vec<u8>>) {
    let opts = Options {
        build_time: 1_700_000_000,
        chunk_bits: 12,
        ..Default::default()
    };
    let mut w = ImageWriter::new(Cursor::new(Vec::new()), opts).unwrap();
    let mut tree = Tree::new(meta(0o755));
    let root = tree.root();
    let add = |tree: &mut Tree, dir, name: &[u8], body: Body, m: Meta| {
        let id = tree.add(Node { meta: m, body });
        tree.link(dir, name, id);
    };
    let mut m = meta(0o644);
    m.set_xattr(Xattr::new(b"user.note", b"hello").unwrap());
    m.set_xattr(Xattr::new(b"security.capability", b"shared").unwrap());
    let small = w.write_file(&mut &b"small\n"[..], 6, &m, None).unwrap();
    add(&mut tree, root, b"aa", Body::File(small), m.clone());
    let big: Vec<u8> = (0..9000u32).map(|i| (i % 251) as u8).collect();
    let f = w
        .write_file_data(&mut &big[..], big.len() as u64, &meta(0o600))
        .unwrap();
    add(&mut tree, root, b"bb", Body::File(f), meta(0o600));
    add(
        &mut tree,
        root,
        b"cc",
        Body::Symlink(b"aa".to_vec().into()),
        meta(0o777),
    );
    add(&mut tree, root, b"dd", Body::CharDev(1, 3), meta(0o600));
    let sub = tree.add(Node::dir(meta(0o700)));
    tree.link(root, b"sub", sub);
    // Only the security xattr is on two inodes (and shared); user.note stays inline.
    let mut m2 = meta(0o644);
    m2.set_xattr(Xattr::new(b"security.capability", b"shared").unwrap());
    let f2 = w.write_file(&mut &b"inner"[..], 5, &m2, None).unwrap();
    add(&mut tree, sub, b"inner", Body::File(f2), m2);
    let mut dev = None;
    if chunked {
        let mut sink = Local {
            next: 0,
            data: Vec::new(),
        };
        let f = w
            .write_file(&mut &big[..], big.len() as u64, &meta(0o644), Some(&mut sink))
            .unwrap();
        add(&mut tree, root, b"chunked", Body::File(f), meta(0o644));
        w.set_devices(sink.device_slots());
        let mut d = Vec::new();
        for c in &sink.data {
            d.extend_from_slice(c);
            d.resize(d.len().next_multiple_of(4096), 0);
        }
        dev = Some(d);
    }
    let (out, _) = w.finish(&tree).unwrap();
    (out.into_inner(), dev)
}

fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Validates image bytes (no extra devices).
fn check(bytes: &[u8]) -> Result<Summary, Invalid> {
    let dir = tempfile::tempdir().unwrap();
    validate_path(&write_tmp(dir.path(), "img", bytes))
}

/// Where things are in an image: inode offsets and directory records.
struct Layout {
    img: Image,
    _dir: tempfile::TempDir,
}

impl Layout {
    fn new(bytes: &[u8]) -> Layout {
        let dir = tempfile::tempdir().unwrap();
        let img = Image::open(&write_tmp(dir.path(), "img", bytes)).unwrap();
        Layout { img, _dir: dir }
    }
    fn entry(&self, path: &str) -> Entry {
        self.img.lookup(path.as_bytes()).unwrap()
    }
    fn inode_off(&self, e: &Entry) -> usize {
        (self.img.superblock().meta_blkaddr as u64 * self.img.block_size() + e.nid * 32) as usize
    }
    /// Byte offset of an inline directory's data (every test directory is inline).
    fn dir_data(&self, dir: &Entry) -> usize {
        assert_eq!(dir.inode.layout, format::DataLayout::FlatInline, "test dirs are inline");
        assert!(dir.inode.size < 4096);
        self.inode_off(dir) + dir.inode.size_on_disk() + format::xattr_ibody_size(dir.inode.xattr_icount)
    }
    /// Offset of the record named `name` in directory `dir` and of its name.
    fn dirent(&self, dir: &str, name: &[u8]) -> (usize, usize) {
        let d = self.entry(dir);
        let records = self.img.read_dir(&d).unwrap();
        let i = records.iter().position(|r| r.name == name).expect("record exists");
        let base = self.dir_data(&d);
        let rec = base + i * format::DIRENT_SIZE;
        let img_bytes_nameoff = {
            let mut b = [0u8; 2];
            // nameoff at byte 8 of the record
            self.read(rec + 8, &mut b);
            u16::from_le_bytes(b) as usize
        };
        (rec, base + img_bytes_nameoff)
    }
    fn read(&self, at: usize, buf: &mut [u8]) {
        let f = std::fs::File::open(self._dir.path().join("img")).unwrap();
        f.read_exact_at(buf, at as u64).unwrap();
    }
}

#[test]
fn writer_images_validate() {
    let (bytes, _) = image(false);
    let s = check(&bytes).unwrap();
    // root, sub, aa, bb, cc, dd, inner
    assert_eq!(
        s,
        Summary {
            inodes: 7,
            directories: 2,
            entries: 6
        }
    );
}

#[test]
fn extra_devices_are_needed_and_checked() {
    let (bytes, dev) = image(true);
    let dev = dev.unwrap();
    assert!(matches!(check(&bytes), Err(Invalid::MissingDevices(1))));
    let dir = tempfile::tempdir().unwrap();
    let img = write_tmp(dir.path(), "img", &bytes);
    let devp = write_tmp(dir.path(), "dev", &dev);
    let s = Image::open_with_devices(&img, std::slice::from_ref(&devp))
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(s.inodes, 8);
    // A device shorter than the chunks it must hold.
    std::fs::write(&devp, &dev[..4096]).unwrap();
    let e = Image::open_with_devices(&img, &[devp]).unwrap().validate().unwrap_err();
    assert!(matches!(e, Invalid::ChunkIndex { chunk: 1, .. }), "{e:?}");
}

/// An image erofs-utils builds from a real directory (chunked files, xattrs, a big
/// directory over several blocks) passes too.
#[test]
// erofs-utils is a package scripts/test.sh installs: the root tier.
#[cfg_attr(
    not(feature = "root-tests"),
    ignore = "needs mkfs.erofs: the root tier (scripts/test.sh)"
)]
fn mkfs_erofs_images_validate() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    std::fs::write(src.join("a/b/f"), vec![7u8; 100_000]).unwrap();
    std::fs::write(src.join("small"), b"x").unwrap();
    std::os::unix::fs::symlink("small", src.join("link")).unwrap();
    std::fs::create_dir(src.join("big")).unwrap();
    for i in 0..500 {
        std::fs::write(src.join(format!("big/name-{i:04}")), b"").unwrap();
    }
    for (name, args) in [("plain", vec![]), ("chunked", vec!["--chunksize=8192"])] {
        let img = dir.path().join(name);
        mkfs(&args, &img, &src);
        let s = validate_path(&img).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(s.directories, 4, "{name}");
        assert_eq!(s.entries, 506, "{name}");
    }
}

/// Runs the system's mkfs.erofs (erofs-utils) on a directory.
fn mkfs(args: &[&str], img: &Path, src: &Path) {
    let out = Command::new("mkfs.erofs")
        .args(args)
        .arg(img)
        .arg(src)
        .output()
        .expect("mkfs.erofs (erofs-utils) must be installed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn patch(bytes: &[u8], at: usize, with: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + with.len()].copy_from_slice(with);
    b
}

#[test]
fn superblock_and_features() {
    let (bytes, _) = image(false);
    assert!(matches!(check(&bytes[..1000]), Err(Invalid::Superblock(_))));
    assert!(matches!(
        check(&patch(&bytes, 1024, &[0; 4])),
        Err(Invalid::Superblock(_))
    ));
    // blkszbits at byte 12 of the superblock
    assert!(matches!(
        check(&patch(&bytes, 1024 + 12, &[30])),
        Err(Invalid::Superblock(_))
    ));
    // feature_incompat at byte 80: the 48-bit feature this reader does not know
    let incompat = patch(&bytes, 1024 + 80, &format::FEATURE_INCOMPAT_48BIT.to_le_bytes());
    assert!(matches!(
        check(&incompat),
        Err(Invalid::UnsupportedFeatures { unsupported, .. }) if unsupported == format::FEATURE_INCOMPAT_48BIT
    ));
    // meta_blkaddr (byte 40) beyond the image
    assert!(matches!(
        check(&patch(&bytes, 1024 + 40, &[0xff; 4])),
        Err(Invalid::Superblock(_))
    ));
    // root nid (byte 14) pointing at a regular file
    let l = Layout::new(&bytes);
    let aa = l.entry("/aa").nid as u16;
    assert!(matches!(
        check(&patch(&bytes, 1024 + 14, &aa.to_le_bytes())),
        Err(Invalid::Inode { .. })
    ));
}

#[test]
fn inodes() {
    let (bytes, _) = image(false);
    let l = Layout::new(&bytes);
    let (rec, _) = l.dirent("/", b"aa");
    // A record naming an inode past the end of the image.
    let far = patch(&bytes, rec, &(1u64 << 40).to_le_bytes());
    assert!(matches!(check(&far), Err(Invalid::Inode { nid, .. }) if nid == 1 << 40));
    // An invalid file type in the mode (i_mode at byte 4 of both inode layouts).
    let aa = l.entry("/aa");
    let bad_mode = patch(&bytes, l.inode_off(&aa) + 4, &0o000644u16.to_le_bytes());
    assert!(matches!(check(&bad_mode), Err(Invalid::Inode { .. })));
    // A symlink longer than PATH_MAX (compact i_size at byte 8).
    let cc = l.entry("/cc");
    assert!(!cc.inode.extended);
    let long = patch(&bytes, l.inode_off(&cc) + 8, &5000u32.to_le_bytes());
    assert!(matches!(check(&long), Err(Invalid::Inode { .. })));
    // A compressed layout (i_format bits 1..3).
    let mut fmt = [0u8; 2];
    l.read(l.inode_off(&aa), &mut fmt);
    let f = (u16::from_le_bytes(fmt) & !0xe) | (format::DataLayout::CompressedFull.raw() << 1);
    let compressed = patch(&bytes, l.inode_off(&aa), &f.to_le_bytes());
    assert!(matches!(check(&compressed), Err(Invalid::Unsupported { .. })));
}

#[test]
fn xattrs() {
    let (bytes, _) = image(false);
    let l = Layout::new(&bytes);
    let aa = l.entry("/aa");
    assert!(aa.inode.xattr_icount > 0);
    let body = l.inode_off(&aa) + aa.inode.size_on_disk();
    // Shared count larger than the body.
    let bad = patch(&bytes, body + 4, &[200]);
    assert!(matches!(check(&bad), Err(Invalid::Xattr { .. })), "{:?}", check(&bad));
    // A shared xattr id far beyond the image.
    let mut hdr = [0u8; 1];
    l.read(body + 4, &mut hdr);
    assert!(hdr[0] >= 1, "the security xattr is shared");
    let bad = patch(&bytes, body + 12, &u32::MAX.to_le_bytes());
    assert!(matches!(check(&bad), Err(Invalid::Xattr { .. })));
    // An inline xattr with an unknown name prefix index (after the shared ids).
    let inline = body + 12 + 4 * hdr[0] as usize;
    let bad = patch(&bytes, inline + 1, &[99]);
    assert!(matches!(check(&bad), Err(Invalid::Xattr { .. })));
}

#[test]
fn directory_records() {
    let (bytes, _) = image(false);
    let l = Layout::new(&bytes);
    let (rec, name) = l.dirent("/", b"bb");
    // Name offset past the block.
    let bad = patch(&bytes, rec + 8, &u16::MAX.to_le_bytes());
    assert!(matches!(check(&bad), Err(Invalid::Dirent { .. })));
    // A name with a slash.
    let bad = patch(&bytes, name, b"b/");
    assert!(matches!(check(&bad), Err(Invalid::Dirent { .. })));
    // A file type that disagrees with the inode (byte 10 of the record).
    let bad = patch(&bytes, rec + 10, &[format::ft::DIR]);
    assert!(matches!(check(&bad), Err(Invalid::Dirent { .. })));
}

#[test]
fn names_sorted_and_unique() {
    let (bytes, _) = image(false);
    let l = Layout::new(&bytes);
    let (_, bb) = l.dirent("/", b"bb");
    // "bb" renamed "aa": the same name twice (the kernel's binary search finds one).
    assert!(matches!(
        check(&patch(&bytes, bb, b"aa")),
        Err(Invalid::Duplicate { name, .. }) if name == "aa"
    ));
    // "bb" renamed "ab"... still in order; "a0" is before "aa": out of order.
    assert!(check(&patch(&bytes, bb, b"ab")).is_ok());
    assert!(matches!(
        check(&patch(&bytes, bb, b"a0")),
        Err(Invalid::Unsorted { name, .. }) if name == "a0"
    ));
}

#[test]
fn dot_entries() {
    let (bytes, _) = image(false);
    let l = Layout::new(&bytes);
    let sub = l.entry("/sub");
    let root = l.entry("/");
    let (dot, dot_name) = l.dirent("/sub", b".");
    let (dotdot, _) = l.dirent("/sub", b"..");
    // "." naming the parent.
    assert!(matches!(
        check(&patch(&bytes, dot, &root.nid.to_le_bytes())),
        Err(Invalid::DotEntries { dir, .. }) if dir == sub.nid
    ));
    // ".." naming the directory itself.
    assert!(matches!(
        check(&patch(&bytes, dotdot, &sub.nid.to_le_bytes())),
        Err(Invalid::DotEntries { .. })
    ));
    // No "." at all: renamed "," (which keeps the order) and made a hard link to a file.
    let inner = l.entry("/sub/inner");
    let mut no_dot = patch(&bytes, dot_name, b",");
    no_dot[dot..dot + 8].copy_from_slice(&inner.nid.to_le_bytes());
    no_dot[dot + 10] = format::ft::REG;
    assert!(
        matches!(check(&no_dot), Err(Invalid::DotEntries { .. })),
        "{:?}",
        check(&no_dot)
    );
}

#[test]
fn directory_reached_twice() {
    let (bytes, _) = image(false);
    let l = Layout::new(&bytes);
    let sub = l.entry("/sub");
    let root = l.entry("/");
    // /sub/inner made a directory record naming the root: a cycle.
    let (rec, _) = l.dirent("/sub", b"inner");
    let mut cycle = patch(&bytes, rec, &root.nid.to_le_bytes());
    cycle[rec + 10] = format::ft::DIR;
    assert!(matches!(
        check(&cycle),
        Err(Invalid::DirectoryReachedTwice { nid, path }) if nid == root.nid && path == "/sub/inner"
    ));
    // /dd naming /sub: a hard-linked directory.
    let (rec, _) = l.dirent("/", b"dd");
    let mut twice = patch(&bytes, rec, &sub.nid.to_le_bytes());
    twice[rec + 10] = format::ft::DIR;
    assert!(matches!(check(&twice), Err(Invalid::DirectoryReachedTwice { nid, .. }) if nid == sub.nid));
}

#[test]
fn data_in_bounds() {
    let (bytes, _) = image(false);
    let l = Layout::new(&bytes);
    let bb = l.entry("/bb");
    assert!(bb.inode.size > 4096);
    // raw_blkaddr (i_u at byte 16) far past the end.
    let bad = patch(&bytes, l.inode_off(&bb) + 16, &0x00ff_ffffu32.to_le_bytes());
    assert!(matches!(check(&bad), Err(Invalid::Data { .. })));
}

#[test]
fn chunk_indexes_and_devices() {
    let (bytes, _) = image(true);
    let l = Layout::new(&bytes);
    let c = l.entry("/chunked");
    assert_eq!(c.inode.layout, format::DataLayout::ChunkBased);
    let index =
        (l.inode_off(&c) + c.inode.size_on_disk() + format::xattr_ibody_size(c.inode.xattr_icount)).next_multiple_of(8);
    let dir = tempfile::tempdir().unwrap();
    let dev = write_tmp(dir.path(), "dev", &image(true).1.unwrap());
    let run = |b: &[u8]| {
        let img = write_tmp(dir.path(), "img", b);
        Image::open_with_devices(&img, std::slice::from_ref(&dev))
            .unwrap()
            .validate()
    };
    run(&bytes).unwrap();
    // device_id is at byte 2 of an index: 1 is the one device.
    let bad = patch(&bytes, index + 2, &1u16.to_le_bytes());
    run(&bad).unwrap();
    // Start block past the device.
    let bad = patch(&bytes, index + 4, &1000u32.to_le_bytes());
    assert!(
        matches!(run(&bad), Err(Invalid::ChunkIndex { chunk: 0, .. })),
        "{:?}",
        run(&bad)
    );
    // Device id 0 with an address past the primary image.
    let mut bad = patch(&bytes, index + 2, &0u16.to_le_bytes());
    bad[index + 4..index + 8].copy_from_slice(&100_000u32.to_le_bytes());
    assert!(matches!(run(&bad), Err(Invalid::ChunkIndex { .. })));
    // A chunk format with unknown bits.
    let bad = patch(&bytes, l.inode_off(&c) + 16, &0x100u32.to_le_bytes());
    assert!(matches!(run(&bad), Err(Invalid::Inode { .. })));
    // An absurd size: more chunk indexes than the image has bytes (compact i_size).
    assert!(!c.inode.extended);
    let bad = patch(&bytes, l.inode_off(&c) + 8, &u32::MAX.to_le_bytes());
    assert!(matches!(run(&bad), Err(Invalid::TooLarge { .. })));
}

#[test]
fn device_ids_beyond_the_table() {
    // Without a device table the mask is 0: every id selects the image itself, as in the
    // kernel. With one device the mask is 1, so id 2 would mask to 0 too; the table
    // needs two devices (mask 3) for id 3 to stay out of range.
    let (bytes, dev) = image(true);
    let dev = dev.unwrap();
    let l = Layout::new(&bytes);
    let c = l.entry("/chunked");
    let index =
        (l.inode_off(&c) + c.inode.size_on_disk() + format::xattr_ibody_size(c.inode.xattr_icount)).next_multiple_of(8);
    // extra_devices (superblock byte 86) := 2, with a second slot after the first.
    let slotoff = u16::from_le_bytes([bytes[1024 + 88], bytes[1024 + 89]]) as usize * 128;
    let mut two = patch(&bytes, 1024 + 86, &2u16.to_le_bytes());
    let first: Vec<u8> = two[slotoff..slotoff + 128].to_vec();
    two[slotoff + 128..slotoff + 256].copy_from_slice(&first);
    two[index + 2..index + 4].copy_from_slice(&3u16.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let devp = write_tmp(dir.path(), "dev", &dev);
    let img = write_tmp(dir.path(), "img", &two);
    let e = Image::open_with_devices(&img, &[devp.clone(), devp])
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(matches!(e, Invalid::DeviceId { dev: 3, devices: 2, .. }), "{e:?}");
}

#[test]
fn validate_file_reads_an_open_file() {
    let (bytes, _) = image(false);
    let dir = tempfile::tempdir().unwrap();
    let p = write_tmp(dir.path(), "img", &bytes);
    assert_eq!(validate_file(std::fs::File::open(&p).unwrap()).unwrap().inodes, 7);
}

/// The writer never emits a record the validator would refuse for its name: a tree
/// with a child named `.`, `..`, empty, or with `/` or NUL is unrepresentable (the
/// converter once linked a whiteout named `..`; see fuzz/README.md).
#[test]
fn writer_refuses_names_no_directory_can_hold() {
    for name in [&b"."[..], b"..", b"", b"a/b", b"a\0b"] {
        let w = ImageWriter::new(Cursor::new(Vec::new()), Options::default()).unwrap();
        let mut tree = Tree::new(meta(0o755));
        let root = tree.root();
        let id = tree.add(Node {
            meta: meta(0o600),
            body: Body::CharDev(0, 0),
        });
        tree.link(root, name, id);
        match w.finish(&tree) {
            Err(erofs::writer::Error::Unrepresentable(_)) => {}
            Err(e) => panic!("{name:?}: {e}"),
            Ok(_) => panic!("{name:?}: written"),
        }
    }
}

/// `n` bytes of words picked at random: compressible about 2 to 3 times, so that a long
/// file takes many pclusters.
fn words(n: usize) -> Vec<u8> {
    const WORDS: [&[u8]; 8] = [
        b"block ",
        b"cluster ",
        b"extent ",
        b"index ",
        b"tail ",
        b"inode ",
        b"map ",
        b"z ",
    ];
    let mut x = 3u64;
    let mut out = Vec::with_capacity(n + 16);
    while out.len() < n {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        out.extend_from_slice(WORDS[(x >> 61) as usize]);
    }
    out.truncate(n);
    out
}

/// A compressed image from the writer: regular files of text (compressed), random
/// bytes (stored plain) and a mix.
fn compressed_image(codec: &str, pcluster: u64) -> Vec<u8> {
    let opts = Options {
        build_time: 1_700_000_000,
        compression: Some(
            erofs::writer::Compression::new(codec.parse().unwrap())
                .with_pcluster_size(pcluster)
                .unwrap(),
        ),
        ..Default::default()
    };
    let mut w = ImageWriter::new(Cursor::new(Vec::new()), opts).unwrap();
    let mut tree = Tree::new(meta(0o755));
    let root = tree.root();
    let text = words(200_000);
    let mut x = 1u32;
    let random: Vec<u8> = (0..30_000)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect();
    for (name, data) in [("text", &text[..]), ("random", &random[..]), ("short", &text[..5000])] {
        let f = w
            .write_file(&mut &data[..], data.len() as u64, &meta(0o644), None)
            .unwrap();
        let id = tree.add(Node {
            meta: meta(0o644),
            body: Body::File(f),
        });
        tree.link(root, name.as_bytes(), id);
    }
    let (out, summary) = w.finish(&tree).unwrap();
    assert_eq!(summary.compressed_files, 2, "text and short compress, random does not");
    assert!(summary.tail_packed_files >= 1, "{summary:?}");
    out.into_inner()
}

#[test]
fn compressed_images_validate_and_bad_maps_are_refused() {
    for (codec, pcluster) in [("lz4hc", 4096), ("zstd", 65536), ("deflate", 4096), ("lzma", 16384)] {
        let bytes = compressed_image(codec, pcluster);
        check(&bytes).unwrap_or_else(|e| panic!("{codec}: {e}"));
        let l = Layout::new(&bytes);
        let text = l.entry("/text");
        assert_eq!(text.inode.layout, format::DataLayout::CompressedFull);
        assert_eq!(l.img.read_all(&text).unwrap().len(), 200_000);
        // Compact inode, no xattrs: the map header right after it, the indexes 16 bytes on.
        let header = l.inode_off(&text) + 32;
        let index0 = header + 16;
        // An algorithm the image does not have.
        let bad_alg = patch(&bytes, header + 6, &[2]);
        let alg = if codec == "deflate" { 3 } else { 2 };
        let alg = if codec == "lzma" { 0 } else { alg };
        let bad_alg = patch(&bad_alg, header + 6, &[alg]);
        assert!(matches!(check(&bad_alg), Err(Invalid::Data { .. })), "{codec}");
        // The short file is one tail-packed pcluster. Its map header (`h_idata_size` at
        // byte 2) claiming an empty
        // one, or one that crosses a block boundary, is corrupt.
        let short = l.entry("/short");
        assert_eq!(short.inode.i_u, 0, "{codec}: the short file has no data blocks");
        assert_eq!(l.img.read_all(&short).unwrap(), words(5000));
        let sheader = l.inode_off(&short) + 32;
        let empty = patch(&bytes, sheader + 2, &0u16.to_le_bytes());
        assert!(matches!(check(&empty), Err(Invalid::Data { .. })), "{codec}");
        let crossing = patch(&bytes, sheader + 2, &4000u16.to_le_bytes());
        assert!(matches!(check(&crossing), Err(Invalid::Data { .. })), "{codec}");
        // The first pcluster beyond the end of the image.
        let far = patch(&bytes, index0 + 4, &0x00ff_ffffu32.to_le_bytes());
        assert!(matches!(check(&far), Err(Invalid::Data { .. })), "{codec}");
        // A non-head index pointing before the file.
        let back = patch(&bytes, index0 + 8, &format::LclusterIndex::nonhead(0, 9, 1).encode());
        assert!(matches!(check(&back), Err(Invalid::Data { .. })), "{codec}");
        // A first lcluster whose extent starts after byte 0.
        let late = patch(&bytes, index0 + 2, &100u16.to_le_bytes());
        assert!(matches!(check(&late), Err(Invalid::Data { .. })), "{codec}");
    }
}

/// mkfs.erofs's compressed images (compact indexes; with 1.5, lz4 and lz4hc), with and
/// without tail-packed pclusters, validate and read back; fragments (1.6 and later, not
/// read by this crate) are refused as unsupported, not as corrupt.
#[test]
#[cfg_attr(
    not(feature = "root-tests"),
    ignore = "needs mkfs.erofs: the root tier (scripts/test.sh)"
)]
fn mkfs_compressed_images_validate() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    let text: Vec<u8> = b"mkfs text 0123456789 ".iter().cycle().take(300_000).copied().collect();
    let random = test_support::pseudo_random(9_000, 5);
    let mut mixed = text[..20_000].to_vec();
    mixed.extend_from_slice(&random);
    std::fs::write(src.join("d/text"), &text).unwrap();
    std::fs::write(src.join("small"), &text[..6000]).unwrap();
    std::fs::write(src.join("mixed"), &mixed).unwrap();
    let files: [(&[u8], &[u8]); 3] = [(b"/d/text", &text), (b"/small", &text[..6000]), (b"/mixed", &mixed)];
    for (name, args) in [
        ("lz4", vec!["-zlz4"]),
        ("lz4hc", vec!["-zlz4hc,12"]),
        ("big", vec!["-zlz4hc", "-C65536"]),
        ("ztail", vec!["-zlz4hc", "-Eztailpacking"]),
        ("ztail-lz4", vec!["-zlz4", "-Eztailpacking"]),
        ("ztail-big", vec!["-zlz4hc", "-C65536", "-Eztailpacking"]),
        ("ztail-legacy", vec!["-zlz4hc", "-Eztailpacking,legacy-compress"]),
    ] {
        let img = dir.path().join(name);
        mkfs(&args, &img, &src);
        validate_path(&img).unwrap_or_else(|e| panic!("{name}: {e}"));
        let image = Image::open(&img).unwrap();
        for (path, want) in files {
            let e = image.lookup(path).unwrap();
            assert!(e.inode.layout.is_compressed(), "{name}: {path:?} stored plain");
            assert!(image.read_all(&e).unwrap() == want, "{name}: {path:?} reads back wrong");
        }
    }
}

/// Chunks on `n` devices, none stored anywhere: only the device table matters here.
struct Devices(u16);

impl ChunkSink for Devices {
    fn put(&mut self, data: &[u8]) -> io::Result<ChunkAddr> {
        let _ = data;
        Ok(ChunkAddr {
            device: self.0,
            blkaddr: 0,
        })
    }
    fn device_slots(&self) -> Vec<DeviceSlot> {
        (0..self.0)
            .map(|i| DeviceSlot {
                tag: [b'a' + (i % 26) as u8; 64],
                blocks: 16,
                mapped_blkaddr: 0,
            })
            .collect()
    }
}

/// An image with over 8 MiB of its own data (compressed or plain small files) and chunks on
/// other devices still has a device table the kernel can find: in block 0 for a few
/// devices, in reserved blocks for more, refused only beyond both.
#[test]
fn device_tables_with_much_file_data() {
    let random = |seed: u64, n: usize| test_support::pseudo_random(n, seed);
    for (devices, reserve, ok) in [
        (2u16, 0u32, true),
        (22, 0, true),
        (40, 0, false),
        (40, 2, true),
        (300, 8, false),
    ] {
        let opts = Options {
            chunk_bits: 16,
            compression: Some(erofs::writer::Compression::new("lz4".parse().unwrap())),
            devt_reserve_blocks: reserve,
            ..Default::default()
        };
        let mut w = ImageWriter::new(Cursor::new(Vec::new()), opts).unwrap();
        let mut tree = Tree::new(meta(0o755));
        let root = tree.root();
        let mut sink = Devices(devices);
        // 8.6 MiB of small incompressible files (stored in the image), one chunked file.
        for i in 0..150u64 {
            let d = random(i, 60_000);
            let f = w.write_file(&mut &d[..], d.len() as u64, &meta(0o644), None).unwrap();
            let id = tree.add(Node {
                meta: meta(0o644),
                body: Body::File(f),
            });
            tree.link(root, format!("f{i}").as_bytes(), id);
        }
        let big = random(7, 200_000);
        let f = w
            .write_file(&mut &big[..], big.len() as u64, &meta(0o644), Some(&mut sink))
            .unwrap();
        assert!(f.chunks.is_some());
        let id = tree.add(Node {
            meta: meta(0o644),
            body: Body::File(f),
        });
        tree.link(root, b"big", id);
        w.set_devices(sink.device_slots());
        match w.finish(&tree) {
            Ok((out, s)) => {
                assert!(ok, "{devices} devices, reserve {reserve}: accepted");
                assert!(s.bytes > 8 << 20, "{}", s.bytes);
                let dir = tempfile::tempdir().unwrap();
                let img = Image::open(&write_tmp(dir.path(), "img", out.get_ref())).unwrap();
                assert_eq!(img.devices().len(), devices as usize);
                assert!(img.devices().iter().all(|d| d.blocks == 16));
                assert!(matches!(img.validate(), Err(Invalid::MissingDevices(n)) if n == devices as usize));
                let e = img.lookup(b"/f3").unwrap();
                assert_eq!(img.read_all(&e).unwrap(), random(3, 60_000));
            }
            Err(e) => assert!(!ok, "{devices} devices, reserve {reserve}: {e}"),
        }
    }
}
