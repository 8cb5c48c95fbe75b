//! The changes from one tree to another, walked side by side (containerd's double walk).

use std::cmp::Ordering;
use std::fs::Metadata;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::SystemTime;

use crate::tar::{join, list_dir, read_xattrs, split_time, TarOut};
use crate::Error;

struct Walk<'a, W: Write> {
    t: &'a mut TarOut<W>,
    lower: &'a Path,
    upper: &'a Path,
    /// mtime of the whiteouts: the time of the diff, in whole seconds (as containerd).
    whiteout_time: (i64, u32),
}

pub(crate) fn walk_trees<W: Write>(t: &mut TarOut<W>, lower: &Path, upper: &Path) -> Result<(), Error> {
    for root in [lower, upper] {
        let meta = std::fs::symlink_metadata(root).map_err(|e| Error::new(root, "reading the tree", e))?;
        if !meta.is_dir() {
            return Err(Error::new(
                root,
                "reading the tree",
                io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            ));
        }
    }
    let mut w = Walk {
        t,
        lower,
        upper,
        whiteout_time: (split_time(SystemTime::now()).0, 0),
    };
    let mut rel = Vec::new();
    w.both_dirs(&mut rel)
}

impl<W: Write> Walk<'_, W> {
    /// `rel` is a directory in both trees: merge their listings.
    fn both_dirs(&mut self, rel: &mut Vec<u8>) -> Result<(), Error> {
        let lnames = list_dir(&join(self.lower, rel))?;
        let unames = list_dir(&join(self.upper, rel))?;
        let (mut i, mut j) = (0, 0);
        loop {
            let order = match (lnames.get(i), unames.get(j)) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(l), Some(u)) => l.cmp(u),
            };
            let name = match order {
                Ordering::Less => &lnames[i],
                _ => &unames[j],
            };
            let parent_len = rel.len();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name);
            match order {
                Ordering::Less => {
                    self.t
                        .whiteout(self.upper, &rel[..parent_len], name, self.whiteout_time)?;
                    i += 1;
                }
                Ordering::Greater => {
                    self.added(rel)?;
                    j += 1;
                }
                Ordering::Equal => {
                    self.in_both(rel)?;
                    i += 1;
                    j += 1;
                }
            }
            rel.truncate(parent_len);
        }
        Ok(())
    }

    /// `rel` is new in the upper tree: it and everything under it.
    fn added(&mut self, rel: &mut Vec<u8>) -> Result<(), Error> {
        let meta = lstat(self.upper, rel)?;
        self.t.add(self.upper, rel, &meta, false, None)?;
        if meta.is_dir() {
            for name in list_dir(&join(self.upper, rel))? {
                let parent_len = rel.len();
                rel.push(b'/');
                rel.extend_from_slice(&name);
                self.added(rel)?;
                rel.truncate(parent_len);
            }
        }
        Ok(())
    }

    fn in_both(&mut self, rel: &mut Vec<u8>) -> Result<(), Error> {
        let lm = lstat(self.lower, rel)?;
        let um = lstat(self.upper, rel)?;
        match (lm.is_dir(), um.is_dir()) {
            (true, true) => {
                if !self.same(rel, &lm, &um)? {
                    self.t.add(self.upper, rel, &um, false, None)?;
                }
                self.both_dirs(rel)
            }
            // A non-directory became a directory: appliers replace the old entry.
            (false, true) => self.added(rel),
            // A directory became a non-directory: the new entry replaces the old subtree.
            (true, false) => self.t.add(self.upper, rel, &um, false, None),
            (false, false) => {
                let unchanged = self.same(rel, &lm, &um)?;
                self.t.add(self.upper, rel, &um, unchanged, None)
            }
        }
    }

    /// Whether `rel` is unchanged (containerd's `sameFile`, with every xattr compared).
    fn same(&self, rel: &[u8], lm: &Metadata, um: &Metadata) -> Result<bool, Error> {
        if lm.dev() == um.dev() && lm.ino() == um.ino() {
            return Ok(true);
        }
        if lm.mode() != um.mode() || lm.uid() != um.uid() || lm.gid() != um.gid() || lm.rdev() != um.rdev() {
            return Ok(false);
        }
        let lpath = join(self.lower, rel);
        let upath = join(self.upper, rel);
        if !lm.is_dir() {
            if lm.size() != um.size() || lm.mtime() != um.mtime() {
                return Ok(false);
            }
            if lm.file_type().is_symlink() {
                let l = std::fs::read_link(&lpath).map_err(|e| Error::new(&lpath, "reading the symlink", e))?;
                let u = std::fs::read_link(&upath).map_err(|e| Error::new(&upath, "reading the symlink", e))?;
                if l != u {
                    return Ok(false);
                }
            }
            if lm.mtime_nsec() == 0 && um.mtime_nsec() == 0 {
                // Both times may have been truncated by a tar round trip: look at the data.
                if lm.is_file() && lm.size() > 0 && !same_content(&lpath, &upath)? {
                    return Ok(false);
                }
            } else if lm.mtime_nsec() != um.mtime_nsec() {
                return Ok(false);
            }
        }
        Ok(read_xattrs(&lpath)? == read_xattrs(&upath)?)
    }
}

fn lstat(root: &Path, rel: &[u8]) -> Result<Metadata, Error> {
    let path = join(root, rel);
    std::fs::symlink_metadata(&path).map_err(|e| Error::new(&path, "reading the entry", e))
}

fn same_content(a: &Path, b: &Path) -> Result<bool, Error> {
    let open = |p: &Path| std::fs::File::open(p).map_err(|e| Error::new(p, "opening the file to compare", e));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let mut ba = vec![0u8; 64 << 10];
    let mut bb = vec![0u8; 64 << 10];
    loop {
        let na = read_full(&mut fa, &mut ba).map_err(|e| Error::new(a, "comparing contents", e))?;
        let nb = read_full(&mut fb, &mut bb).map_err(|e| Error::new(b, "comparing contents", e))?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
