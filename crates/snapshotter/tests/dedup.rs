//! Deduplicated layers in the store, against the real kernel: chunks shared across
//! independent images, blobs kept while any layer names them and deleted with the
//! last, repair after a crash, and layers naming more blobs than one mount(2) option
//! page could list.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use redb::ReadableTable;
use snapshotter::{Snapshotter, StoreOptions};

const DEDUP: StoreOptions = StoreOptions {
    dedup: true,
    chunk_size: layer_convert::ChunkSize::DEFAULT,
    trash_idle: std::time::Duration::from_secs(10),
    compression: None,
    merge_layers: false,
    max_unmerged_layers: 1,
};

use test_support::pseudo_random as data;

/// Prepares `key` over `parent`, writes `files` through the mount and commits as `name`.
fn layer(s: &Snapshotter, work: &Path, name: &str, parent: &str, files: &[(&str, Vec<u8>)]) {
    let key = format!("{name}-active");
    let m = s.prepare(&key, parent, BTreeMap::new()).unwrap();
    {
        let t = work.join(&key);
        let _g = Mounted::new(&m, &t);
        for (p, d) in files {
            let p = t.join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, d).unwrap();
        }
    }
    s.commit(name, &key, BTreeMap::new()).unwrap();
}

/// Reads `files` through a view of `name`.
fn check(s: &Snapshotter, work: &Path, name: &str, files: &[(&str, Vec<u8>)]) {
    let key = format!("check-{name}-{}", files.len());
    let m = s.view(&key, name, BTreeMap::new()).unwrap();
    {
        let t = work.join(&key);
        let _g = Mounted::new(&m, &t);
        for (p, d) in files {
            let got = fs::read(t.join(p)).unwrap_or_else(|e| panic!("{name}: reading {p}: {e}"));
            assert!(got == *d, "{name}: {p} differs ({} vs {} bytes)", got.len(), d.len());
        }
    }
    s.remove(&key).unwrap();
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

fn unmount_all(root: &Path) {
    for e in fs::read_dir(root.join("m")).unwrap() {
        let _ = rustix::mount::unmount(e.unwrap().path(), rustix::mount::UnmountFlags::DETACH);
    }
}

#[test]
fn shared_chunks_outlive_the_layer_that_wrote_them() {
    need_root();
    let tmp = test_support::TestDir::new("snapshotter-dedup-");
    let root = tmp.path().join("root");
    let work = tmp.path().join("work");
    let s = Snapshotter::open_with(&root, DEDUP).unwrap();

    let a_files = vec![
        ("usr/big1", data(300_000, 1)),
        ("usr/big2", data(200_000, 2)),
        ("etc/small", b"hi\n".to_vec()),
    ];
    layer(&s, &work, "a", "", &a_files);
    // An unrelated image (no parent) holding one of a's files.
    let b_files = vec![("opt/copy-of-big1", data(300_000, 1)), ("opt/big3", data(150_000, 3))];
    layer(&s, &work, "b", "", &b_files);
    // And a layer on top of b repeating b's and a's data again.
    let c_files = vec![("again/big3", data(150_000, 3)), ("again/big2", data(200_000, 2))];
    layer(&s, &work, "c", "b", &c_files);

    let st = s.stats().unwrap();
    assert_eq!(st.layers, 3);
    assert_eq!(
        st.logical_bytes,
        300_000 + 200_000 + 3 + 300_000 + 150_000 + 150_000 + 200_000
    );
    // Written once each: big1 (5 chunks of 64K), big2 (4), big3 (3), block-padded, and
    // etc/small's block (file data is never inlined: block-aligned layers).
    let expect_blob = (300_000u64.div_ceil(4096) + 200_000u64.div_ceil(4096) + 150_000u64.div_ceil(4096) + 1) * 4096;
    assert_eq!(st.chunks.blob_bytes, expect_blob, "{st:?}");
    assert_eq!(st.chunks.blobs, 2, "c wrote nothing new: {st:?}");
    assert_eq!(files_in(&root.join("blobs")).len(), 2);
    let chain_c = st.chains.iter().find(|c| c.top == "c").expect("chain c");
    assert_eq!(chain_c.layers, 2);
    assert!(chain_c.shared_blob_bytes > 0, "{st:?}");

    check(&s, &work, "a", &a_files);
    check(&s, &work, "c", &[&b_files[..], &c_files[..]].concat());

    // Image a goes: its blob stays, b and c still name it.
    s.remove("a").unwrap();
    assert_eq!(s.stats().unwrap().chunks.blobs, 2);
    check(&s, &work, "c", &[&b_files[..], &c_files[..]].concat());

    // A restart (mounts gone too): layers come back with their blobs as devices.
    drop(s);
    unmount_all(&root);
    let s = Snapshotter::open_with(&root, DEDUP).unwrap();
    check(&s, &work, "c", &[&b_files[..], &c_files[..]].concat());

    // Everything removed: no blob, index entry, mount or directory is left.
    s.remove("c").unwrap();
    s.remove("b").unwrap();
    let st = s.stats().unwrap();
    assert_eq!((st.chunks.blobs, st.chunks.chunks, st.layers), (0, 0, 0), "{st:?}");
    assert!(files_in(&root.join("blobs")).is_empty());
    assert!(files_in(&root.join("m")).is_empty());
    assert!(files_in(&root.join("snapshots")).is_empty());
}

#[test]
fn start_up_removes_unrecorded_blobs_and_recounts_references() {
    need_root();
    let tmp = test_support::TestDir::new("snapshotter-dedup-");
    let root = tmp.path().join("root");
    let work = tmp.path().join("work");
    let s = Snapshotter::open_with(&root, DEDUP).unwrap();
    let files = vec![("f", data(100_000, 9))];
    layer(&s, &work, "one", "", &files);
    let other = vec![("g", data(100_000, 10))];
    layer(&s, &work, "two", "", &other);
    let blobs = files_in(&root.join("blobs"));
    assert_eq!(blobs.len(), 2);
    drop(s);
    unmount_all(&root);

    // What a crash between writing a blob and recording it leaves: a blob file
    // nobody names. And counts gone wrong both ways.
    let stray = root.join("blobs").join("00000000000000ff");
    fs::write(&stray, data(8192, 1)).unwrap();
    {
        let db = redb::Database::create(root.join("metadata.redb")).unwrap();
        let t: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("blobs");
        let txn = db.begin_write().unwrap();
        {
            let mut tab = txn.open_table(t).unwrap();
            let ids: Vec<u64> = tab.iter().unwrap().map(|i| i.unwrap().0.value()).collect();
            assert_eq!(ids.len(), 2);
            for (id, refs) in ids.iter().zip([0u64, 5]) {
                let v: Vec<u8> = tab.get(*id).unwrap().unwrap().value().to_vec();
                let mut rec: serde_json::Value = serde_json::from_slice(&v).unwrap();
                rec["refs"] = refs.into();
                tab.insert(*id, serde_json::to_vec(&rec).unwrap().as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    let s = Snapshotter::open_with(&root, DEDUP).unwrap();
    assert!(!stray.exists(), "an unrecorded blob is removed at start-up");
    assert_eq!(files_in(&root.join("blobs")), blobs, "referenced blobs are kept");
    check(&s, &work, "one", &files);
    check(&s, &work, "two", &other);
    s.remove("one").unwrap();
    s.remove("two").unwrap();
    assert!(
        files_in(&root.join("blobs")).is_empty(),
        "recounted references let both go"
    );
    assert_eq!(s.stats().unwrap().chunks.chunks, 0);
}

/// A layer naming more blobs than fit in one mount(2) option page (4 KiB): each
/// device is its own fsconfig call.
#[test]
fn a_layer_can_name_more_blobs_than_one_option_page_holds() {
    need_root();
    let tmp = test_support::TestDir::new("snapshotter-dedup-");
    // Long paths, so 40 devices take ~9 KiB of options.
    let root = tmp
        .path()
        .join("r".repeat(60))
        .join("o".repeat(60))
        .join("t".repeat(60));
    let work = tmp.path().join("work");
    let s = Snapshotter::open_with(&root, DEDUP).unwrap();
    let mut all = Vec::new();
    for i in 0..40u64 {
        let f = (format!("f{i}"), data(70_000, 100 + i));
        layer(&s, &work, &format!("l{i}"), "", &[(f.0.as_str(), f.1.clone())]);
        all.push(f);
    }
    let files: Vec<(&str, Vec<u8>)> = all.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    layer(&s, &work, "everything", "", &files);
    let blob_paths: usize = files_in(&root.join("blobs"))
        .iter()
        .map(|p| p.as_os_str().len() + 8)
        .sum();
    assert!(blob_paths > 4096, "the device options would take {blob_paths} bytes");
    check(&s, &work, "everything", &files);
    drop(s);
    unmount_all(&root);
    let s = Snapshotter::open_with(&root, DEDUP).unwrap();
    check(&s, &work, "everything", &files);
}
