//! A model of what a layer means, independent of the converter's tree: a flat map of
//! clean paths, built entry by entry with GNU tar's extraction rules as containerd's
//! applier uses them, plus the OCI image spec's whiteouts, turned into the overlayfs
//! form an EROFS layer carries (a whiteout is a 0/0 character device, an opaque
//! directory has `trusted.overlay.opaque=y`).
//!
//! Names (restated here from the rules of `oci_layer::name`, not taken from it, so the
//! fuzzer checks them):
//! - Empty components and `.` are ignored. A name with nothing left (`""`, `.`, `./`,
//!   `/`) is the root: a directory entry sets the root's metadata, any other type is
//!   refused (`NotADirectory`).
//! - A `..` component anywhere is refused: `PathEscape` when it climbs above the root,
//!   `InvalidName` otherwise. A component with a NUL byte or longer than 255 bytes is
//!   `InvalidName`. The same holds for hard link targets, refused as `LinkTarget`.
//! - Only the last component makes a whiteout. `.wh..wh..opq` at the root is refused
//!   (`Unsupported`); elsewhere it makes its directory opaque and drops the whiteouts in
//!   it. Other `.wh..wh.*` names are aufs bookkeeping: nothing at all happens (not even
//!   their parents are created). `.wh.`, `.wh..` and `.wh...` are `InvalidName`.
//!
//! Entries:
//! - A later entry replaces an earlier one of the same path; a directory over a
//!   directory only replaces its metadata. Anything replacing a directory drops the
//!   directory's whole subtree.
//! - Missing parents are created with mode 0755, owner 0, the build time; a parent that
//!   is not a directory is refused (`NotADirectory`).
//! - A hard link copies its target (which must exist, not be a whiteout and not be a
//!   directory).
//! - Symlinks have mode 0777 (an empty target is refused). Times are kept exactly, those
//!   before 1970 and after 2106 too (EROFS stores 64-bit seconds, read as signed).
//! - `.wh.NAME` hides NAME of lower layers: it becomes a whiteout unless this layer has
//!   NAME already, which stays (a directory of this layer becomes opaque), or the
//!   directory is opaque. A directory entry over a whiteout is opaque; a whiteout in the
//!   way of a later entry's parent becomes an opaque directory.
//! - `trusted.overlay.*` xattrs in the tar are dropped: only whiteouts make them.
//!
//! A refusal carries the converter's error kind where the rule fixes one (names, parents,
//! links, truncated bodies), and the fuzz target checks it.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};

use layer_convert::tar::{Kind, TarReader};
use layer_convert::ErrorKind;

use crate::{Content, Node, Tree};

const OPAQUE: &[u8] = b"trusted.overlay.opaque";

/// Why the model refuses a layer (the converter must refuse it too).
#[derive(Debug)]
pub struct Refused {
    /// What is wrong.
    pub why: String,
    /// The error kind the converter must give, where the rule decides it.
    pub kind: Option<ErrorKind>,
}

fn refuse<T>(kind: Option<ErrorKind>, why: impl Into<String>) -> Result<T, Refused> {
    Err(Refused { why: why.into(), kind })
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
    loop {
        // Tar errors are the reader's (shared with the converter): no kind is checked.
        let e = match tar.next_entry() {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(e) => return refuse(None, format!("tar: {e}")),
        };
        m.apply(&e, &mut tar)?;
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

/// The components of a name (empty: the root), by the rules in the module docs.
fn clean(p: &[u8]) -> Result<Vec<&[u8]>, Refused> {
    let mut out: Vec<&[u8]> = Vec::new();
    let mut up = false;
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                up = true;
                if out.pop().is_none() {
                    return refuse(Some(ErrorKind::PathEscape), "path escapes the root");
                }
            }
            c if c.contains(&0) => return refuse(Some(ErrorKind::InvalidName), "NUL in a component"),
            c if c.len() > 255 => return refuse(Some(ErrorKind::InvalidName), "component longer than 255 bytes"),
            c => out.push(c),
        }
    }
    if up {
        return refuse(Some(ErrorKind::InvalidName), "a '..' component");
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
        let unsupported = Some(ErrorKind::Unsupported);
        let uid = u32::try_from(e.uid).or_else(|_| refuse(unsupported, "uid"))?;
        let gid = u32::try_from(e.gid).or_else(|_| refuse(unsupported, "gid"))?;
        let mut xattrs = BTreeMap::new();
        for (k, v) in &e.xattrs {
            if k.starts_with(b"trusted.overlay.") {
                continue;
            }
            let Some((_, suffix)) = erofs::format::split_xattr_name(k) else {
                return refuse(unsupported, "xattr namespace");
            };
            if suffix.len() > 255 || v.len() > 65535 {
                return refuse(unsupported, "xattr too long");
            }
            xattrs.insert(k.clone(), v.clone());
        }
        Ok(Node {
            content,
            perm: (e.mode & 0o7777) as u16,
            uid,
            gid,
            // Two's complement: the image keeps a time before 1970 as the kernel reads it.
            mtime: e.mtime as u64,
            mtime_nsec: e.mtime_nsec,
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
                Some(_) => return refuse(Some(ErrorKind::NotADirectory), "a parent is not a directory"),
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

    /// Marks the directory at `dir` opaque and drops the whiteouts in it.
    fn make_opaque(&mut self, dir: &[u8]) {
        self.tree
            .get_mut(dir)
            .unwrap()
            .xattrs
            .insert(OPAQUE.to_vec(), b"y".to_vec());
        for c in self.children(dir) {
            if is_whiteout(&self.tree[&c]) {
                self.tree.remove(&c);
            }
        }
    }

    /// A whiteout or marker entry (`name` is the last component, `.wh.`-prefixed).
    fn whiteout(&mut self, e: &layer_convert::tar::Entry, parents: &[&[u8]], name: &[u8]) -> Result<(), Refused> {
        let invalid = Some(ErrorKind::InvalidName);
        if name == b".wh..wh..opq" {
            if parents.is_empty() {
                return refuse(Some(ErrorKind::Unsupported), "opaque marker at the root");
            }
            self.ensure_dirs(parents)?;
            self.make_opaque(&join(parents));
            return Ok(());
        }
        if name.starts_with(b".wh..wh.") {
            return Ok(());
        }
        let hidden = &name[4..];
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return refuse(invalid, "whiteout of nothing, of the directory or of its parent");
        }
        self.ensure_dirs(parents)?;
        if is_opaque(&self.tree[&join(parents)]) {
            return Ok(());
        }
        let mut p = parents.to_vec();
        p.push(hidden);
        let target = join(&p);
        match self.tree.get(&target) {
            Some(n) if n.content == Content::Dir => self.make_opaque(&target),
            Some(_) => {}
            None => {
                let mut n = self.meta(e, Content::CharDev(0, 0))?;
                n.perm = 0;
                n.xattrs.clear();
                self.tree.insert(target, n);
            }
        }
        Ok(())
    }

    fn apply<R: BufRead>(&mut self, e: &layer_convert::tar::Entry, tar: &mut TarReader<R>) -> Result<(), Refused> {
        let kind = e.kind.expect("typed entry");
        let parts = clean(&e.path)?;
        let Some((&name, parents)) = parts.split_last() else {
            if kind == Kind::Dir {
                let n = self.meta(e, Content::Dir)?;
                self.tree.insert(b"/".to_vec(), n);
                return Ok(());
            }
            return refuse(Some(ErrorKind::NotADirectory), "the root must be a directory");
        };
        if name.starts_with(b".wh.") {
            return self.whiteout(e, parents, name);
        }
        self.ensure_dirs(parents)?;
        let path = join(&parts);
        let existing = self.tree.get(&path).cloned();
        // Metadata first: a bad owner or xattr is refused before the body is read.
        let mut node = self.meta(e, Content::Fifo)?;
        node.content = match kind {
            Kind::Dir => Content::Dir,
            Kind::File => {
                let mut b = Vec::new();
                tar.body()
                    .take(e.size)
                    .read_to_end(&mut b)
                    .or_else(|e| refuse(None, e.to_string()))?;
                if b.len() as u64 != e.size {
                    return refuse(Some(ErrorKind::Truncated), "truncated body");
                }
                tar.body_done();
                Content::File(b)
            }
            Kind::Symlink => Content::Symlink(e.link.clone()),
            Kind::CharDev => Content::CharDev(e.devmajor, e.devminor),
            Kind::BlockDev => Content::BlockDev(e.devmajor, e.devminor),
            Kind::Fifo | Kind::HardLink => Content::Fifo, // a hard link's is replaced below
        };
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
                let bad = Some(ErrorKind::LinkTarget);
                let target = match clean(&e.link) {
                    Ok(t) => join(&t),
                    Err(r) => return refuse(bad, format!("hard link target: {}", r.why)),
                };
                let Some(t) = self.tree.get(&target).filter(|t| !is_whiteout(t)).cloned() else {
                    return refuse(bad, "hard link target missing");
                };
                if t.content == Content::Dir {
                    return refuse(bad, "hard link to a directory");
                }
                self.put(path, t);
            }
            Kind::Symlink => {
                if e.link.is_empty() {
                    return refuse(Some(ErrorKind::Unsupported), "empty symlink");
                }
                node.perm = 0o777;
                self.put(path, node);
            }
            _ => self.put(path, node),
        }
        Ok(())
    }
}
