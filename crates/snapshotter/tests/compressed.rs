//! The store with `compression` set, against the real kernel: layers it writes, by Commit
//! conversion and by Apply of a tar layer, are compressed and read back exactly; with
//! dedup as well, sharing comes first: files are chunks, not compressed.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use erofs::format::DataLayout;
use erofs::reader::{FileKind, Image};
use sha2::{Digest, Sha256};
use snapshotter::{LayerBlob, LayerFormat, Snapshotter, StoreOptions};

fn options(dedup: bool) -> StoreOptions {
    StoreOptions {
        dedup,
        chunk_size: layer_convert::ChunkSize::DEFAULT,
        trash_idle: std::time::Duration::from_secs(10),
        compression: Some(erofs::writer::Compression::new("lz4hc".parse().unwrap())),
        ..Default::default()
    }
}

fn text(n: usize, seed: u8) -> Vec<u8> {
    format!("line {seed} of a compressible file\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(n)
        .collect()
}

/// The files every layer holds: compressible ones of several sizes, an incompressible
/// one, and one of a chunk or more.
fn files(seed: u8) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("etc/small", b"tiny\n".to_vec()),
        ("etc/text", text(20_000, seed)),
        ("usr/lib/big-text", text(300_000, seed)),
        ("usr/bin/random", test_support::pseudo_random(50_000, u64::from(seed))),
    ]
}

/// Every `*.erofs` layer image under the store root.
fn images(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "erofs") {
                out.push(p);
            }
        }
    }
    out
}

/// The data layout of each regular file of a layer image, by path.
fn layouts(image: &Path) -> BTreeMap<String, DataLayout> {
    let img = Image::open(image).unwrap();
    let mut out = BTreeMap::new();
    img.walk(&mut |path, e| {
        if e.kind == FileKind::File {
            out.insert(String::from_utf8_lossy(path).into_owned(), e.inode.layout);
        }
        Ok(())
    })
    .unwrap();
    out
}

/// Reads `files` through a view of `name`.
fn check(s: &Snapshotter, work: &Path, name: &str, files: &[(&str, Vec<u8>)]) {
    let key = format!("check-{name}");
    let m = s.view(&key, name, BTreeMap::new()).unwrap();
    {
        let t = work.join(&key);
        let _g = Mounted::new(&m, &t);
        for (p, d) in files {
            let got = fs::read(t.join(p)).unwrap_or_else(|e| panic!("{name}: reading {p}: {e}"));
            assert!(got == *d, "{name}: {p} differs");
        }
    }
    s.remove(&key).unwrap();
}

/// A tar layer of `files`, made by GNU tar.
fn tar_of(work: &Path, files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let src = work.join("tar-src");
    for (p, d) in files {
        let p = src.join(p);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, d).unwrap();
    }
    let tar = work.join("layer.tar");
    let st = Command::new("tar")
        .args(["--format=posix", "--sort=name", "-C"])
        .arg(&src)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    fs::read(&tar).unwrap()
}

#[test]
fn commit_and_apply_write_compressed_layers() {
    need_root();
    for dedup in [false, true] {
        let tmp = test_support::TestDir::new("snapshotter-compressed-");
        let root = tmp.path().join("root");
        let work = tmp.path().join("work");
        fs::create_dir_all(&work).unwrap();
        let s = Snapshotter::open_with(&root, options(dedup)).unwrap();

        // Commit conversion: files written through the active snapshot's mount.
        let a = files(1);
        let m = s.prepare("a-active", "", BTreeMap::new()).unwrap();
        {
            let t = work.join("a-active");
            let _g = Mounted::new(&m, &t);
            for (p, d) in &a {
                let p = t.join(p);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(p, d).unwrap();
            }
        }
        s.commit("a", "a-active", BTreeMap::new()).unwrap();
        check(&s, &work, "a", &a);

        // Apply: a tar layer over it.
        let b = files(2);
        let tar = tar_of(&work, &b);
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
        s.prepare("b-active", "a", BTreeMap::new()).unwrap();
        let applied = s
            .apply_layer(
                "b-active",
                LayerBlob {
                    reader: Box::new(Cursor::new(tar.clone())),
                    format: LayerFormat::Tar,
                    media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                    digest: digest.clone(),
                    size: Some(tar.len() as u64),
                    diff_id: Some(digest.clone()),
                    max_size: 1 << 30,
                },
            )
            .unwrap();
        assert_eq!(applied.digest, digest);
        s.commit("b", "b-active", BTreeMap::new()).unwrap();
        check(&s, &work, "b", &b);

        // Without dedup both layers are compressed: text compressed, random bytes plain.
        // With dedup, sharing comes first: every file of a block or more is chunks.
        let imgs: Vec<PathBuf> = images(&root)
            .into_iter()
            .filter(|p| !p.starts_with(root.join("blobs")))
            .collect();
        let layer_images: Vec<_> = imgs.iter().filter(|p| layouts(p).contains_key("/etc/text")).collect();
        assert_eq!(layer_images.len(), 2, "dedup {dedup}: {imgs:?}");
        for img in layer_images {
            let l = layouts(img);
            let (text, random) = if dedup {
                (DataLayout::ChunkBased, DataLayout::ChunkBased)
            } else {
                (DataLayout::CompressedFull, DataLayout::FlatPlain)
            };
            assert_eq!(l["/etc/text"], text, "dedup {dedup}: {img:?} {l:?}");
            assert_eq!(l["/usr/lib/big-text"], text, "dedup {dedup}: {img:?} {l:?}");
            assert_eq!(l["/usr/bin/random"], random, "dedup {dedup}: {img:?} {l:?}");
        }
        drop(s);
        for e in fs::read_dir(root.join("m")).unwrap() {
            let _ = rustix::mount::unmount(e.unwrap().path(), rustix::mount::UnmountFlags::DETACH);
        }
    }
}
