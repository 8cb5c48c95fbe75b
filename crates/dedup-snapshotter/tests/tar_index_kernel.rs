//! Tar-index images against the kernel: a gzip layer is read once by the indexer, which
//! yields the tar to the tar-index builder and records checkpoints and chunk digests. The
//! image (512-byte blocks, regular files pointing into the tar, the tar as device 1) is
//! mounted with the uncompressed tar as its device, and the mounted tree must equal, entry
//! by entry and byte by byte, the tree of the same layer converted the normal way. The tar
//! rebuilt chunk by chunk from the compressed blob's fetch ranges must be the tar itself.
//!
//! Needs root and a kernel with erofs: the tests panic without them.

mod common;

use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};

use common::*;
use sha2::Digest as _;

/// Builds the tar-index image of the gzip layer `tgz` at `out`; returns its index.
fn tar_index(tgz: &Path, out: &Path, chunk_size: u64) -> tar_index::Index {
    let opts = tar_index::IndexOptions {
        chunk_size,
        max_uncompressed: 64 << 30,
    };
    let mut indexer = tar_index::Indexer::new(tar_index::Format::Gzip, File::open(tgz).unwrap(), opts).unwrap();
    let diff_id = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    layer_convert::tarindex::convert_tar_index(
        BufReader::with_capacity(1 << 20, &mut indexer),
        out,
        &layer_convert::Options::default(),
        diff_id,
    )
    .unwrap_or_else(|e| panic!("tar index of {}: {e}", tgz.display()));
    indexer.finish().unwrap()
}

/// The layer converted the normal way, mounted, against its tar-index image mounted on the
/// tar; and the tar decoded chunk by chunk from `tgz` against the tar.
fn check_layer(what: &str, tgz: &Path, tar: &Path, chunk_size: u64) {
    require_root_and_kernel();
    let work = tempdir();
    let plain = work.path().join("plain.erofs");
    layer_convert::convert(File::open(tgz).unwrap(), &plain, &Default::default(), None).unwrap();
    let indexed = work.path().join("index.erofs");
    let ix = tar_index(tgz, &indexed, chunk_size);

    // The index describes this blob and this tar.
    let tar_bytes = fs::read(tar).unwrap();
    let tgz_bytes = fs::read(tgz).unwrap();
    assert_eq!(ix.uncompressed_size, tar_bytes.len() as u64, "{what}");
    assert_eq!(ix.compressed_size, tgz_bytes.len() as u64, "{what}");
    assert_eq!(
        ix.uncompressed_digest[..],
        sha2::Sha256::digest(&tar_bytes)[..],
        "{what}"
    );
    assert_eq!(ix.compressed_digest[..], sha2::Sha256::digest(&tgz_bytes)[..], "{what}");

    // Every chunk from its fetch range alone, verified, rebuilds the tar.
    let mut rebuilt = Vec::with_capacity(tar_bytes.len());
    for i in 0..ix.chunk_count() {
        let (s, e) = ix.fetch_range(i);
        let chunk = ix
            .decode_chunk(i, &tgz_bytes[s as usize..e as usize])
            .unwrap_or_else(|e| panic!("{what}: chunk {i}: {e}"));
        assert_eq!(
            sha2::Sha256::digest(&chunk)[..],
            ix.chunk_digests[i as usize][..],
            "{what}: chunk {i}"
        );
        rebuilt.extend_from_slice(&chunk);
    }
    assert!(rebuilt == tar_bytes, "{what}: the chunks do not rebuild the tar");

    // The image is valid EROFS with 512-byte blocks and one device of the tar's size.
    let img = erofs::reader::Image::open_with_devices(&indexed, &[tar.to_path_buf()]).unwrap();
    img.validate()
        .unwrap_or_else(|e| panic!("{what}: the tar-index image is invalid: {e}"));
    assert_eq!(img.superblock().blkszbits, 9, "{what}");
    let devices = img.devices();
    assert_eq!(devices.len(), 1, "{what}");
    assert_eq!(
        u64::from(devices[0].blocks),
        ix.uncompressed_size.div_ceil(512),
        "{what}"
    );
    let meta = fs::metadata(&indexed).unwrap().len();
    eprintln!(
        "{what}: tar {} bytes, gzip {} bytes, tar-index image {meta} bytes, index {} bytes, {} chunks, {} checkpoints",
        ix.uncompressed_size,
        ix.compressed_size,
        ix.to_bytes().len(),
        ix.chunk_count(),
        ix.checkpoints()
    );

    let a = Mount::erofs(&plain);
    let b = Mount::erofs_with_devices(&indexed, &[tar.to_path_buf()]);
    assert_trees_eq(
        &format!("{what}: tar-index mount vs converted layer"),
        &snapshot_tree(a.path()),
        &snapshot_tree(b.path()),
        &CompareOpts::default(),
    );
}

#[test]
fn debian_minbase_through_its_tar_index_equals_the_converted_layer() {
    let tgz = debian_minbase();
    let tar: PathBuf = tgz.with_extension("");
    check_layer("debian minbase", &tgz, &tar, 1 << 20);
}

/// Everything a layer can hold that the tar-index image must represent itself: hard links,
/// short and long symlinks, devices, fifos, xattrs, whiteouts and opaque directories, empty
/// and large files, long names, a directory of many entries (several 512-byte blocks).
#[test]
fn rich_layer_through_its_tar_index_equals_the_converted_layer() {
    require_root_and_kernel();
    let work = tempdir();
    let tar = work.path().join("layer.tar");
    let script = r#"
import io, sys, tarfile, random
rnd = random.Random(7)
t = tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT)
def add(name, kind=tarfile.REGTYPE, data=b"", mode=0o644, **kw):
    i = tarfile.TarInfo(name); i.type = kind; i.mode = mode; i.mtime = 1700000000 + len(name)
    i.uid = kw.get("uid", 0); i.gid = kw.get("gid", 0)
    if "link" in kw: i.linkname = kw["link"]
    if "dev" in kw: i.devmajor, i.devminor = kw["dev"]
    if "pax" in kw: i.pax_headers = kw["pax"]
    if kind == tarfile.REGTYPE:
        i.size = len(data); t.addfile(i, io.BytesIO(data))
    else:
        t.addfile(i)
add("etc/", tarfile.DIRTYPE, mode=0o755)
add("etc/empty")
add("etc/small", data=b"hello\n")
add("etc/odd", data=bytes(rnd.getrandbits(8) for _ in range(513)), uid=1000, gid=1000)
add("usr/", tarfile.DIRTYPE, mode=0o755)
add("usr/big", data=bytes(rnd.getrandbits(8) for _ in range(3 << 20)), mode=0o755)
add("usr/zeros", data=bytes(5 << 20))
add("usr/hard", tarfile.LNKTYPE, link="usr/big")
add("usr/short-link", tarfile.SYMTYPE, link="big", mode=0o777)
add("usr/long-link", tarfile.SYMTYPE, link="/" + "x" * 1000, mode=0o777)
add("dev/", tarfile.DIRTYPE, mode=0o755)
add("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
add("dev/sda", tarfile.BLKTYPE, mode=0o660, dev=(8, 0))
add("dev/fifo", tarfile.FIFOTYPE, mode=0o600)
add("x/", tarfile.DIRTYPE, mode=0o700, pax={"SCHILY.xattr.user.comment": "a" * 300, "SCHILY.xattr.user.b": "1"})
add("x/with-xattr", data=b"x", pax={"SCHILY.xattr.user.other": "v"})
add("x/.wh.gone")
add("opaque/", tarfile.DIRTYPE, mode=0o755)
add("opaque/.wh..wh..opq")
add("opaque/kept", data=b"kept")
add("n" * 200 + "/", tarfile.DIRTYPE, mode=0o755)
add("n" * 200 + "/" + "m" * 255, data=b"long name")
add("many/", tarfile.DIRTYPE, mode=0o755)
for k in range(400):
    add("many/entry-%04d-%s" % (k, "z" * (k % 60)), data=b"%d" % k)
t.close()
"#;
    let out = python(script, &[tar.as_os_str()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tgz = compress(&tar, Compression::Gzip);
    // Small chunks (the zeros are one deflate block of 5 MiB: chunks of 1 MiB keep it within
    // reach of a checkpoint): chunks inside the big files and across entries.
    check_layer("rich layer", &tgz, &tar, 1 << 20);
}
