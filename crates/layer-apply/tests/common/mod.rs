//! Helpers: trees built by shell and python, reference extraction by GNU tar, and an
//! entry-by-entry comparison of two directory trees.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use layer_apply::{apply_tar, ApplyOptions, ApplyStats, Whiteouts};

pub fn assert_root() {
    let uid = std::fs::metadata("/proc/self").expect("/proc").uid();
    assert_eq!(
        uid, 0,
        "these tests need root (ownership, devices, trusted.* xattrs, overlay mounts)"
    );
}

pub fn sh(script: &str) {
    let out = Command::new("bash").arg("-ec").arg(script).output().expect("bash");
    assert!(
        out.status.success(),
        "script failed: {}\nstdout: {}\nstderr: {}",
        script,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a python3 script with `out` as `sys.argv[1]`. The script gets a helper
/// `add(tf, name, type, **kw)` and the `tarfile`, `io` modules.
pub fn py(script: &str, out: &Path) {
    let prelude = r#"
import sys, tarfile, io
def add(tf, name, type=tarfile.REGTYPE, data=b"", mode=0o644, uid=0, gid=0, mtime=1600000000.5, link="", pax=None, devmajor=0, devminor=0):
    ti = tarfile.TarInfo(name)
    ti.type = type
    ti.mode = mode
    ti.uid = uid
    ti.gid = gid
    ti.mtime = mtime
    ti.linkname = link
    ti.devmajor = devmajor
    ti.devminor = devminor
    if pax:
        ti.pax_headers = dict(pax)
    if type == tarfile.REGTYPE:
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    else:
        tf.addfile(ti)
"#;
    let full = format!("{prelude}\n{script}");
    let o = Command::new("python3")
        .arg("-c")
        .arg(&full)
        .arg(out)
        .output()
        .expect("python3");
    assert!(
        o.status.success(),
        "python failed: {}\n{}",
        full,
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn gnu_extract(tar: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    sh(&format!(
        "tar -xpf '{}' --xattrs --xattrs-include='*' --numeric-owner -C '{}'",
        tar.display(),
        dir.display()
    ));
}

pub fn apply(tar: &Path, root: &Path, whiteouts: Whiteouts) -> Result<ApplyStats, layer_apply::Error> {
    apply_over(tar, root, whiteouts, &[])
}

/// [`apply`] with the layers below (directories, nearest first) for implied directories,
/// resolved as the differ resolves them.
pub fn apply_over(
    tar: &Path,
    root: &Path,
    whiteouts: Whiteouts,
    lowers: &[PathBuf],
) -> Result<ApplyStats, layer_apply::Error> {
    std::fs::create_dir_all(root).unwrap();
    let f = std::io::BufReader::with_capacity(256 << 10, std::fs::File::open(tar).unwrap());
    let lower = layer_convert::Lowers::dirs(lowers.to_vec());
    apply_tar(f, root, &ApplyOptions { whiteouts, lower })
}

#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Meta {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub hash: u64,
    pub mtime: (i64, i64),
    pub link: Option<PathBuf>,
    pub rdev: u64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Tree {
    pub entries: BTreeMap<PathBuf, Meta>,
    /// Hard-link groups (non-directories with more than one name in the tree).
    pub links: BTreeSet<Vec<PathBuf>>,
}

pub fn xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 1 << 16];
    let n = rustix::fs::llistxattr(p, &mut buf[..]).unwrap_or(0);
    let names: Vec<Vec<u8>> = buf[..n]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| s.to_vec())
        .collect();
    for name in names {
        let mut v = vec![0u8; 1 << 16];
        let m = rustix::fs::lgetxattr(p, name.as_slice(), &mut v[..]).unwrap();
        out.insert(name, v[..m].to_vec());
    }
    out
}

/// Every entry under `root` (not `root` itself), by relative path.
pub fn snapshot(root: &Path) -> Tree {
    let mut entries = BTreeMap::new();
    let mut inodes: HashMap<u64, Vec<PathBuf>> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for ent in std::fs::read_dir(&dir).unwrap() {
            let p = ent.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_file() {
                "file"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_char_device() {
                "char"
            } else if ft.is_block_device() {
                "block"
            } else if ft.is_fifo() {
                "fifo"
            } else {
                "other"
            };
            let mut hash = 0;
            if ft.is_file() {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                let mut f = std::fs::File::open(&p).unwrap();
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = f.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    buf[..n].hash(&mut h);
                }
                hash = h.finish();
            }
            if ft.is_dir() {
                stack.push(p.clone());
            } else if md.nlink() > 1 {
                inodes.entry(md.ino()).or_default().push(rel.clone());
            }
            entries.insert(
                rel,
                Meta {
                    kind,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    size: if ft.is_dir() { 0 } else { md.size() },
                    hash,
                    mtime: (md.mtime(), md.mtime_nsec()),
                    link: if ft.is_symlink() {
                        Some(std::fs::read_link(&p).unwrap())
                    } else {
                        None
                    },
                    rdev: md.rdev(),
                    xattrs: xattrs(&p),
                },
            );
        }
    }
    let links = inodes
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    Tree { entries, links }
}

/// Forgets the mtimes of `paths` in both trees (directories a tar only implies are
/// created "now").
pub fn forget_mtimes(trees: &mut [&mut Tree], paths: &[&str]) {
    for t in trees.iter_mut() {
        for p in paths {
            t.entries
                .get_mut(Path::new(p))
                .unwrap_or_else(|| panic!("{p} missing"))
                .mtime = (0, 0);
        }
    }
}

/// Asserts two trees are equal, reporting the first differences by path.
pub fn assert_same(got: &Tree, want: &Tree, what: &str) {
    let mut diffs = Vec::new();
    for (p, m) in &want.entries {
        match got.entries.get(p) {
            None => diffs.push(format!("missing {p:?}: {m:?}")),
            Some(g) if g != m => diffs.push(format!("differs {p:?}:\n   got  {g:?}\n   want {m:?}")),
            _ => {}
        }
    }
    for p in got.entries.keys() {
        if !want.entries.contains_key(p) {
            diffs.push(format!("extra {p:?}: {:?}", got.entries[p]));
        }
    }
    if got.links != want.links {
        diffs.push(format!("hard links: got {:?}, want {:?}", got.links, want.links));
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}
