//! What a tar entry name means in a layer.
//!
//! Every consumer (converter, walking Apply) must read a name the same way, or the
//! same layer gives different trees. The rules, checked against GNU tar 1.34 and the
//! OCI image spec (`layer.md`):
//!
//! * Empty components and `.` are dropped, so repeated slashes, a trailing slash, a
//!   leading `/` or `./` change nothing: `a//b`, `./a/b`, `/a/b/` and `a/./b` all name
//!   `a/b` (GNU tar strips the leading `/` the same way).
//! * A name with no component left (`""`, `.`, `./`, `/`, `./.`) is the layer root. A
//!   directory entry for it carries the root's metadata (GNU tar applies `./`'s mode,
//!   owner and times to the directory it extracts into); any other type is refused.
//! * A `..` component is refused, wherever it stands: GNU tar skips such members
//!   ("Member name contains '..'") and exits with an error, and resolving it lexically
//!   would disagree with the file system whenever the component before it is a symlink.
//!   A `..` that climbs above the root is [`ErrorKind::PathEscape`]; one that does not
//!   (`a/..`, `a/../b`) is [`ErrorKind::InvalidName`].
//! * A component holding a NUL byte (possible in a PAX `path` record) or longer than 255
//!   bytes cannot be a file name on Linux: [`ErrorKind::InvalidName`].
//! * The last component decides whiteouts: `.wh..wh..opq` makes its directory opaque,
//!   other `.wh..wh.*` names are aufs bookkeeping with no meaning in OCI layers (skipped,
//!   as containerd does), and `.wh.NAME` hides `NAME` of the lower layers. `NAME` must be
//!   a file name: `.wh.` (nothing), `.wh..` (the directory itself) and `.wh...` (its
//!   parent) are [`ErrorKind::InvalidName`].
//! * An opaque marker at the root (`.wh..wh..opq`, `./.wh..wh..opq`) is refused as
//!   [`ErrorKind::Unsupported`]: overlayfs never treats a layer's root directory as
//!   opaque, so neither an EROFS layer nor an upper dir can say "hide every lower
//!   layer", and a layer must not mean one thing through one path and another through
//!   the next.

use crate::error::{Error, ErrorKind};

/// The whiteout prefix: `.wh.NAME` deletes `NAME` of the lower layers.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The prefix of aufs bookkeeping names (`.wh..wh.plnk`, `.wh..wh.aufs`, ...).
pub const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
/// The opaque marker: its directory hides the lower layers' content of that directory.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Longest file name Linux (and EROFS) accepts.
pub const NAME_MAX: usize = 255;

/// What an entry name refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    /// The layer root itself.
    Root,
    /// `name` in the directory `parent` (components from the root).
    Path {
        /// Components of the parent directory, from the root.
        parent: Vec<&'a [u8]>,
        /// The entry's own name.
        name: &'a [u8],
    },
    /// `.wh.NAME`: `name` in `parent` is deleted from the lower layers.
    Whiteout {
        /// Components of the directory holding the whiteout.
        parent: Vec<&'a [u8]>,
        /// The name it hides (without the prefix).
        name: &'a [u8],
    },
    /// `.wh..wh..opq`: the directory `dir` hides all lower content.
    Opaque {
        /// Components of the opaque directory (never empty: see the module docs).
        dir: Vec<&'a [u8]>,
    },
    /// Another `.wh..wh.` name: aufs bookkeeping, nothing to apply.
    AufsMeta,
}

/// Splits an entry name (or a hard link target) into its components, by the rules of
/// the module documentation. An empty result is the root.
pub fn components(path: &[u8]) -> Result<Vec<&[u8]>, Error> {
    let mut parts: Vec<&[u8]> = Vec::new();
    let mut dotdot = false;
    let mut depth: isize = 0;
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                dotdot = true;
                depth -= 1;
                if depth < 0 {
                    return Err(Error::new(
                        ErrorKind::PathEscape,
                        "the name leads outside the layer root",
                    ));
                }
            }
            _ => {
                check_component(c)?;
                depth += 1;
                parts.push(c);
            }
        }
    }
    if dotdot {
        return Err(Error::new(
            ErrorKind::InvalidName,
            "the name has a '..' component (GNU tar refuses these too)",
        ));
    }
    Ok(parts)
}

/// Checks that `c` can be a file name: not empty, `.` or `..`, no `/` or NUL, at most
/// [`NAME_MAX`] bytes.
pub fn check_component(c: &[u8]) -> Result<(), Error> {
    if c.is_empty() || c == b"." || c == b".." || c.contains(&b'/') {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!("{:?} is not a file name", String::from_utf8_lossy(c)),
        ));
    }
    if c.contains(&0) {
        return Err(Error::new(ErrorKind::InvalidName, "a name component holds a NUL byte"));
    }
    if c.len() > NAME_MAX {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!("a name component is {} bytes long (at most {NAME_MAX})", c.len()),
        ));
    }
    Ok(())
}

/// What the entry name `path` refers to.
pub fn target(path: &[u8]) -> Result<Target<'_>, Error> {
    let mut parts = components(path)?;
    let Some(name) = parts.pop() else {
        return Ok(Target::Root);
    };
    if name == OPAQUE_MARKER {
        if parts.is_empty() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "an opaque marker at the layer root (overlayfs ignores opaqueness of a layer's root)",
            ));
        }
        return Ok(Target::Opaque { dir: parts });
    }
    if name.starts_with(WHITEOUT_META_PREFIX) {
        return Ok(Target::AufsMeta);
    }
    if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(Error::new(
                ErrorKind::InvalidName,
                format!(
                    "whiteout {:?} names no file (nothing, the directory itself or its parent)",
                    String::from_utf8_lossy(name)
                ),
            ));
        }
        return Ok(Target::Whiteout {
            parent: parts,
            name: hidden,
        });
    }
    Ok(Target::Path { parent: parts, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comps(p: &str) -> Result<Vec<String>, ErrorKind> {
        components(p.as_bytes())
            .map(|v| v.iter().map(|c| String::from_utf8_lossy(c).into_owned()).collect())
            .map_err(|e| e.kind)
    }

    #[test]
    fn every_spelling_of_the_root_is_the_root() {
        for p in ["", ".", "./", "/", "//", "./.", "././", "/./", ".//."] {
            assert_eq!(target(p.as_bytes()).unwrap(), Target::Root, "{p:?}");
        }
    }

    #[test]
    fn spellings_of_one_path_agree() {
        for p in [
            "a/b",
            "./a/b",
            "/a/b",
            "a//b",
            "a/b/",
            "a/./b",
            ".//a///b//",
            "/./a/./b/.",
        ] {
            assert_eq!(comps(p), Ok(vec!["a".into(), "b".into()]), "{p:?}");
        }
    }

    #[test]
    fn dotdot_is_refused_with_a_kind_that_says_whether_it_escapes() {
        for p in ["..", "../", "../a", "./..", "a/../..", "/../a", "a/b/../../.."] {
            assert_eq!(comps(p), Err(ErrorKind::PathEscape), "{p:?}");
        }
        for p in ["a/..", "a/../", "a/../b", "a/b/../c", "./a/.."] {
            assert_eq!(comps(p), Err(ErrorKind::InvalidName), "{p:?}");
        }
    }

    #[test]
    fn impossible_components_are_refused() {
        assert_eq!(comps("a/b\0c"), Err(ErrorKind::InvalidName));
        assert_eq!(comps(&"x".repeat(256)), Err(ErrorKind::InvalidName));
        assert_eq!(comps(&format!("d/{}", "x".repeat(255))).unwrap().len(), 2);
    }

    #[test]
    fn whiteouts_and_markers() {
        assert_eq!(
            target(b"a/.wh.b").unwrap(),
            Target::Whiteout {
                parent: vec![&b"a"[..]],
                name: b"b"
            }
        );
        assert_eq!(
            target(b"./a//.wh.b/").unwrap(),
            Target::Whiteout {
                parent: vec![&b"a"[..]],
                name: b"b"
            }
        );
        assert_eq!(
            target(b"a/.wh..wh..opq").unwrap(),
            Target::Opaque { dir: vec![&b"a"[..]] }
        );
        for root in [&b".wh..wh..opq"[..], b"./.wh..wh..opq", b"/.wh..wh..opq/"] {
            assert_eq!(target(root).unwrap_err().kind, ErrorKind::Unsupported);
        }
        assert_eq!(target(b"a/.wh..wh.plnk").unwrap(), Target::AufsMeta);
        // A name that only looks like a whiteout further up is a plain path.
        assert_eq!(
            target(b".wh.a/b").unwrap(),
            Target::Path {
                parent: vec![&b".wh.a"[..]],
                name: b"b"
            }
        );
        // `.wh...x` hides `..x`, a legal name.
        assert_eq!(
            target(b".wh...x").unwrap(),
            Target::Whiteout {
                parent: vec![],
                name: b"..x"
            }
        );
    }

    #[test]
    fn whiteouts_of_nothing_of_dot_or_of_dotdot_are_refused() {
        for p in [".wh.", ".wh..", ".wh...", "a/.wh..", "a/.wh...", "./.wh./", "a/.wh../"] {
            assert_eq!(target(p.as_bytes()).unwrap_err().kind, ErrorKind::InvalidName, "{p:?}");
        }
    }
}
