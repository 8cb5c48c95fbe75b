//! A model of what a layer means, independent of the converter's tree: a flat map of
//! clean paths, built entry by entry with GNU tar's extraction rules as containerd's
//! applier uses them, plus the OCI image spec's whiteouts, turned into the overlayfs
//! form an EROFS layer carries (a whiteout is a 0/0 character device, an opaque
//! directory has `trusted.overlay.opaque=y`).
//!
//! - A later entry replaces an earlier one of the same path; a directory over a
//!   directory only replaces its metadata. Anything replacing a directory drops the
//!   directory's whole subtree.
//! - Missing parents are created with mode 0755, owner 0, the build time.
//! - `.` and empty components are ignored, `..` goes up; leaving the root is refused.
//! - A hard link copies its target (which must exist and not be a directory).
//! - Symlinks have mode 0777. Times before 1970 read as the epoch.
//! - `.wh.NAME` hides NAME of lower layers: it becomes a whiteout unless this layer
//!   has NAME already (this layer's entry stays), the directory is opaque, or NAME is
//!   itself `.wh.`-prefixed (aufs bookkeeping). `.wh..wh..opq` makes its directory
//!   opaque and drops the whiteouts in it. A whiteout in the way of a later entry's
//!   parent becomes an opaque directory.
//! - `trusted.overlay.*` xattrs in the tar are dropped: only whiteouts make them.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};

use layer_convert::tar::{Kind, TarReader};

use crate::{Content, Node, Tree};

const OPAQUE: &[u8] = b"trusted.overlay.opaque";

/// Why the model refuses a layer (the converter must refuse it too).
#[derive(Debug)]
pub struct Refused(pub String);

fn refuse<T>(why: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(why.into()))
}

/// The model of the layer in the tar stream `src`, with `build_time` for implied
/// directories (and the root), or why it is refused.
pub fn model<R: BufRead>(src: R, build_time: u64) -> Result<Tree, Refused> {
    let mut m = Model {
        tree: Tree::new(),
        build_time,
    };
    let root = m.implied();
    m.tree.insert(b"/".to_vec(), root);
    let mut tar = TarReader::new(src);
    while let Some(e) = tar.next_entry().map_err(|e| Refused(format!("tar: {e}")))? {
        let body = if e.kind == Some(Kind::File) {
            let mut b = Vec::new();
            tar.body()
                .take(e.size)
                .read_to_end(&mut b)
                .map_err(|e| Refused(e.to_string()))?;
            if b.len() as u64 != e.size {
                return refuse("truncated body");
            }
            tar.body_done();
            b
        } else {
            Vec::new()
        };
        m.apply(&e, body)?;
    }
    Ok(m.tree)
}

struct Model {
    tree: Tree,
    build_time: u64,
}

/// The path of components `parts` as the image reader names it.
fn join(parts: &[&[u8]]) -> Vec<u8> {
    if parts.is_empty() {
        return b"/".to_vec();
    }
    let mut p = Vec::new();
    for c in parts {
        p.push(b'/');
        p.extend_from_slice(c);
    }
    p
}

fn clean(p: &[u8]) -> Result<Vec<&[u8]>, Refused> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return refuse("path escapes the root");
                }
            }
            c if c.len() > 255 => return refuse("component longer than 255 bytes"),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn is_whiteout(n: &Node) -> bool {
    n.content == Content::CharDev(0, 0)
}

fn is_opaque(n: &Node) -> bool {
    n.xattrs.get(OPAQUE).map(Vec::as_slice) == Some(b"y")
}

impl Model {
    fn implied(&self) -> Node {
        Node {
            content: Content::Dir,
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: self.build_time,
            mtime_nsec: 0,
            xattrs: BTreeMap::new(),
        }
    }

    fn meta(&self, e: &layer_convert::tar::Entry, content: Content) -> Result<Node, Refused> {
        let uid = u32::try_from(e.uid).or_else(|_| refuse("uid"))?;
        let gid = u32::try_from(e.gid).or_else(|_| refuse("gid"))?;
        let (mtime, mtime_nsec) = if e.mtime < 0 {
            (0, 0)
        } else {
            (e.mtime as u64, e.mtime_nsec)
        };
        let mut xattrs = BTreeMap::new();
        for (k, v) in &e.xattrs {
            if k.starts_with(b"trusted.overlay.") {
                continue;
            }
            let Some((_, suffix)) = erofs::format::split_xattr_name(k) else {
                return refuse("xattr namespace");
            };
            if suffix.len() > 255 || v.len() > 65535 {
                return refuse("xattr too long");
            }
            xattrs.insert(k.clone(), v.clone());
        }
        Ok(Node {
            content,
            perm: (e.mode & 0o7777) as u16,
            uid,
            gid,
            mtime,
            mtime_nsec,
            xattrs,
        })
    }

    /// Removes `path` and everything below it.
    fn remove(&mut self, path: &[u8]) {
        self.tree.remove(path);
        let mut prefix = path.to_vec();
        prefix.push(b'/');
        let below: Vec<Vec<u8>> = self
            .tree
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in below {
            self.tree.remove(&k);
        }
    }

    /// Puts `node` at `path`, replacing whatever was there (and below it).
    fn put(&mut self, path: Vec<u8>, node: Node) {
        self.remove(&path);
        self.tree.insert(path, node);
    }

    /// Makes every component of `parts` a directory.
    fn ensure_dirs(&mut self, parts: &[&[u8]]) -> Result<(), Refused> {
        for i in 1..=parts.len() {
            let p = join(&parts[..i]);
            match self.tree.get(&p) {
                Some(n) if n.content == Content::Dir => {}
                Some(n) if is_whiteout(n) => {
                    let mut d = self.implied();
                    d.xattrs.insert(OPAQUE.to_vec(), b"y".to_vec());
                    self.put(p, d);
                }
                Some(_) => return refuse("a parent is not a directory"),
                None => {
                    let d = self.implied();
                    self.tree.insert(p, d);
                }
            }
        }
        Ok(())
    }

    /// The direct children of directory `dir`.
    fn children(&self, dir: &[u8]) -> Vec<Vec<u8>> {
        let mut prefix = dir.to_vec();
        if prefix != b"/" {
            prefix.push(b'/');
        }
        self.tree
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| k.len() > prefix.len() && !k[prefix.len()..].contains(&b'/'))
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn apply(&mut self, e: &layer_convert::tar::Entry, body: Vec<u8>) -> Result<(), Refused> {
        let kind = e.kind.expect("typed entry");
        let parts = clean(&e.path)?;
        let Some((&name, parents)) = parts.split_last() else {
            if kind == Kind::Dir {
                let n = self.meta(e, Content::Dir)?;
                self.tree.insert(b"/".to_vec(), n);
                return Ok(());
            }
            return refuse("the root must be a directory");
        };
        if let Some(rest) = name.strip_prefix(b".wh.") {
            self.ensure_dirs(parents)?;
            let dir = join(parents);
            let opaque = is_opaque(&self.tree[&dir]);
            if name == b".wh..wh..opq" {
                self.tree
                    .get_mut(&dir)
                    .unwrap()
                    .xattrs
                    .insert(OPAQUE.to_vec(), b"y".to_vec());
                for c in self.children(&dir) {
                    if is_whiteout(&self.tree[&c]) {
                        self.tree.remove(&c);
                    }
                }
            } else if opaque || rest.starts_with(b".wh.") {
            } else if rest.is_empty() || rest == b"." || rest == b".." {
                return refuse("whiteout without a name, or of the directory itself or its parent");
            } else {
                let mut p = parents.to_vec();
                p.push(rest);
                let target = join(&p);
                if !self.tree.contains_key(&target) {
                    let mut n = self.meta(e, Content::CharDev(0, 0))?;
                    n.perm = 0;
                    n.xattrs.clear();
                    self.tree.insert(target, n);
                }
            }
            return Ok(());
        }
        self.ensure_dirs(parents)?;
        let path = join(&parts);
        let existing = self.tree.get(&path).cloned();
        let mut node = self.meta(
            e,
            match kind {
                Kind::Dir => Content::Dir,
                Kind::File => Content::File(body),
                Kind::Symlink => Content::Symlink(e.link.clone()),
                Kind::CharDev => Content::CharDev(e.devmajor, e.devminor),
                Kind::BlockDev => Content::BlockDev(e.devmajor, e.devminor),
                Kind::Fifo => Content::Fifo,
                Kind::HardLink => Content::Fifo, // replaced below
            },
        )?;
        match kind {
            Kind::Dir => {
                if let Some(old) = &existing {
                    if is_whiteout(old) || is_opaque(old) {
                        node.xattrs.insert(OPAQUE.to_vec(), b"y".to_vec());
                    }
                    if old.content == Content::Dir {
                        // Metadata only: the children stay.
                        self.tree.insert(path, node);
                        return Ok(());
                    }
                }
                self.put(path, node);
            }
            Kind::HardLink => {
                let target = join(&clean(&e.link)?);
                let Some(t) = self.tree.get(&target).cloned() else {
                    return refuse("hard link target missing");
                };
                if t.content == Content::Dir {
                    return refuse("hard link to a directory");
                }
                self.put(path, t);
            }
            Kind::Symlink => {
                if e.link.is_empty() {
                    return refuse("empty symlink");
                }
                node.perm = 0o777;
                self.put(path, node);
            }
            _ => self.put(path, node),
        }
        Ok(())
    }
}
