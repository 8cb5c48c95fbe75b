//! From what a container start read (files, or byte ranges of files) to the chunks of
//! a converted layer that hold that data, and the text format of such a list.
//!
//! # The prefetch list format
//!
//! One entry per line, in the order the start first read them (`→` stands for a TAB):
//!
//! ```text
//! # a comment; blank lines are ignored too
//! /usr/bin/python3.11→0+65536
//! /usr/bin/python3.11→2097152+12288
//! /etc/ld.so.cache
//! ```
//!
//! - `PATH<TAB>START+LEN`: the bytes `[START, START + LEN)` of the file at the absolute
//!   `PATH` (decimal byte counts, `LEN > 0`). The range is cut at the end of the file.
//! - `PATH` alone: the whole file (the format `record` wrote before ranges existed).
//!
//! The path is everything before the line's last TAB, taken as is (spaces included);
//! a line without a TAB is a bare path, whose trailing spaces and CR are dropped (hand
//! edits). Paths holding a TAB or a newline cannot be listed. Any other line (a
//! relative path, a range that does not parse) is an error naming the line.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use erofs::format::DataLayout;
use erofs::reader::{Entry, FileKind, Image, Placement};

/// One line of a prefetch list: a file, or a byte range of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchEntry {
    /// Absolute path inside the image.
    pub path: String,
    /// `(start, len)` in bytes of the file; `None`: the whole file.
    pub range: Option<(u64, u64)>,
}

impl PrefetchEntry {
    /// Whether `path` can be written as a prefetch list line (no TAB or newline, absolute).
    pub fn listable(path: &str) -> bool {
        path.starts_with('/') && !path.contains(['\t', '\n', '\r'])
    }
}

impl fmt::Display for PrefetchEntry {
    /// The entry as one line of the list, without the newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.range {
            None => f.write_str(&self.path),
            Some((start, len)) => write!(f, "{}\t{start}+{len}", self.path),
        }
    }
}

/// Parses a prefetch list (see the module documentation for the format). Errors name
/// the line (1-based) and say what is wrong with it.
pub fn parse_prefetch_list(text: &str) -> Result<Vec<PrefetchEntry>, String> {
    let mut entries = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (path, range) = match line.rsplit_once('\t') {
            None => (line.trim_end_matches([' ', '\r']), None),
            Some((path, range)) => {
                let range = parse_range(range.trim()).map_err(|e| format!("line {n}: {e}: {raw:?}"))?;
                (path, Some(range))
            }
        };
        if !path.starts_with('/') {
            return Err(format!(
                "line {n}: expected an absolute path, optionally followed by a TAB and START+LEN: {raw:?}"
            ));
        }
        entries.push(PrefetchEntry {
            path: path.to_string(),
            range,
        });
    }
    Ok(entries)
}

/// `START+LEN`, decimal bytes, `LEN > 0`, no overflow.
fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("the range {s:?} is not START+LEN (decimal bytes)");
    let (a, b) = s.split_once('+').ok_or_else(bad)?;
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|c| c.is_ascii_digit());
    if !digits(a) || !digits(b) {
        return Err(bad());
    }
    let (start, len): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if len == 0 {
        return Err(format!("the range {s:?} is empty"));
    }
    start
        .checked_add(len)
        .ok_or_else(|| format!("the range {s:?} ends beyond 2^64"))?;
    Ok((start, len))
}

/// A run of a regular file's data stored in the image's own blocks: file bytes
/// `[file_offset, file_offset + len)` are at image bytes `[image_offset, image_offset + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub file_offset: u64,
    /// Offset in the image.
    pub image_offset: u64,
    /// Bytes.
    pub len: u64,
}

/// The data of the regular file `e` that lives in `img`'s own blocks, in file order:
/// plain blocks, the full blocks of an inline file (its tail sits in the metadata, which
/// is fetched first anyway), and the chunks of a chunk-based file that are on the image
/// itself (not on an extra device, not holes). Compressed files have none that maps.
pub fn file_extents(img: &Image, e: &Entry) -> erofs::reader::Result<Vec<Extent>> {
    let bs = img.block_size();
    let size = e.inode.size;
    let start = u64::from(e.inode.i_u) * bs;
    Ok(match e.inode.layout {
        // `placement` says nothing about the full blocks before the tail.
        DataLayout::FlatInline => match size / bs * bs {
            0 => Vec::new(),
            len => vec![Extent {
                file_offset: 0,
                image_offset: start,
                len,
            }],
        },
        _ => match img.placement(e)? {
            Placement::Blocks { blkaddr } => vec![Extent {
                file_offset: 0,
                image_offset: u64::from(blkaddr) * bs,
                len: size,
            }],
            Placement::Chunks { bits, addrs } => {
                let chunk = 1u64 << bits;
                let mut out: Vec<Extent> = Vec::new();
                for (k, (dev, blkaddr)) in addrs.into_iter().enumerate() {
                    if dev != 0 || blkaddr == erofs::format::NULL_ADDR {
                        continue;
                    }
                    let file_offset = k as u64 * chunk;
                    let x = Extent {
                        file_offset,
                        image_offset: u64::from(blkaddr) * bs,
                        len: chunk.min(size - file_offset),
                    };
                    // Consecutive chunks stored one after the other are one run.
                    match out.last_mut() {
                        Some(l)
                            if l.file_offset + l.len == x.file_offset && l.image_offset + l.len == x.image_offset =>
                        {
                            l.len += x.len
                        }
                        _ => out.push(x),
                    }
                }
                out
            }
            Placement::Empty | Placement::Inline | Placement::Compressed => Vec::new(),
        },
    })
}

/// The chunks of the EROFS image at `image` that hold the data `entries` name (whole
/// files, or byte ranges of them), in the order of `entries`, each chunk once; paths the
/// layer does not have (or has as something other than a regular file) are skipped.
/// Returns the chunks and the paths found, each once, in first-listed order.
///
/// Only file bodies count: metadata (and inline tails, which live in it) is fetched
/// first anyway.
pub fn prefetch_chunks(
    image: &Path,
    entries: &[PrefetchEntry],
    chunk_size: u64,
) -> erofs::reader::Result<(Vec<u32>, Vec<String>)> {
    let img = Image::open(image)?;
    let mut chunks = Vec::new();
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    // Per path: its extents, or `None` if the layer does not have it as a file.
    let mut files: HashMap<&str, Option<Vec<Extent>>> = HashMap::new();
    for entry in entries {
        let extents = match files.get(entry.path.as_str()) {
            Some(x) => x,
            None => {
                let x = match img.lookup(entry.path.as_bytes()) {
                    Ok(e) if e.kind == FileKind::File => {
                        found.push(entry.path.clone());
                        Some(file_extents(&img, &e)?)
                    }
                    _ => None,
                };
                files.entry(&entry.path).or_insert(x)
            }
        };
        let Some(extents) = extents else { continue };
        let (want_start, want_end) = match entry.range {
            None => (0, u64::MAX),
            Some((start, len)) => (start, start.saturating_add(len)),
        };
        for x in extents {
            let a = want_start.max(x.file_offset);
            let b = want_end.min(x.file_offset + x.len);
            if a >= b {
                continue;
            }
            let (a, b) = (
                x.image_offset + (a - x.file_offset),
                x.image_offset + (b - x.file_offset),
            );
            for c in a / chunk_size..b.div_ceil(chunk_size) {
                if seen.insert(c) {
                    chunks.push(c as u32);
                }
            }
        }
    }
    Ok((chunks, found))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, range: Option<(u64, u64)>) -> PrefetchEntry {
        PrefetchEntry {
            path: path.into(),
            range,
        }
    }

    /// `/a` 20000 bytes and `/b` 40 blocks of plain data, `/d` a directory; chunks of 2 blocks.
    fn image(dir: &Path) -> std::path::PathBuf {
        use erofs::writer::{Body, ImageWriter, Meta, Node, Options, Tree};
        let meta = || Meta {
            perm: 0o644,
            ..Default::default()
        };
        let mut w = ImageWriter::new(std::io::Cursor::new(Vec::new()), Options::default()).unwrap();
        let mut tree = Tree::new(meta());
        let root = tree.root();
        for (name, size) in [(&b"a"[..], 20000usize), (b"b", 40 * 4096)] {
            let body = vec![7u8; size];
            let f = w.write_file_data(&mut &body[..], size as u64, &meta()).unwrap();
            let id = tree.add(Node {
                meta: meta(),
                body: Body::File(f),
            });
            tree.link(root, name, id);
        }
        let d = tree.add(Node::dir(meta()));
        tree.link(root, b"d", d);
        let (out, _) = w.finish(&tree).unwrap();
        let path = dir.join("layer.erofs");
        std::fs::write(&path, out.into_inner()).unwrap();
        path
    }

    #[test]
    fn chunks_of_ranges_in_list_order_each_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(dir.path());
        let img = Image::open(&path).unwrap();
        let first_block = |p: &str| u64::from(img.lookup(p.as_bytes()).unwrap().inode.i_u);
        let (a, b) = (first_block("/a"), first_block("/b"));
        let chunk = 8192;
        let list = vec![
            // Blocks 4..6 of /b, then block 0 of /b, then /b's block 5 again (listed already).
            e("/b", Some((4 * 4096 + 100, 2 * 4096))),
            e("/missing", None),
            e("/d", None),
            e("/b", Some((0, 1))),
            e("/a", None),
            e("/b", Some((5 * 4096, 10))),
            // Beyond the end of /a: nothing.
            e("/a", Some((1 << 20, 4096))),
        ];
        let (chunks, found) = prefetch_chunks(&path, &list, chunk).unwrap();
        let mut want = Vec::new();
        let mut add = |first: u64, last: u64| {
            for c in first * 4096 / chunk..=last * 4096 / chunk {
                if !want.contains(&(c as u32)) {
                    want.push(c as u32);
                }
            }
        };
        add(b + 4, b + 6);
        add(b, b);
        add(a, a + 4);
        assert_eq!(chunks, want);
        assert_eq!(found, vec!["/b".to_string(), "/a".to_string()]);
        // The whole of /b: every chunk its 40 blocks touch.
        let (whole, _) = prefetch_chunks(&path, &[e("/b", None)], chunk).unwrap();
        let all: Vec<u32> = (b * 4096 / chunk..=(b + 39) * 4096 / chunk).map(|c| c as u32).collect();
        assert_eq!(whole, all);
    }

    #[test]
    fn parses_bare_paths_ranges_and_comments() {
        let text = "# recorded\n\n/usr/bin/python3.11\t0+65536\r\n/etc/ld.so.cache\n/a dir/with spaces \t4096+4096\n  # indented comment\n/trailing  \n";
        assert_eq!(
            parse_prefetch_list(text).unwrap(),
            vec![
                e("/usr/bin/python3.11", Some((0, 65536))),
                e("/etc/ld.so.cache", None),
                e("/a dir/with spaces ", Some((4096, 4096))),
                e("/trailing", None),
            ]
        );
        assert_eq!(parse_prefetch_list("").unwrap(), vec![]);
    }

    #[test]
    fn formats_what_it_parses() {
        let list = vec![e("/x y", Some((8192, 12288))), e("/z", None)];
        let text: String = list.iter().map(|x| format!("{x}\n")).collect();
        assert_eq!(text, "/x y\t8192+12288\n/z\n");
        assert_eq!(parse_prefetch_list(&text).unwrap(), list);
        assert!(PrefetchEntry::listable("/a b"));
        assert!(!PrefetchEntry::listable("/a\tb"));
        assert!(!PrefetchEntry::listable("/a\nb"));
        assert!(!PrefetchEntry::listable("a"));
    }

    #[test]
    fn rejects_malformed_lines_naming_them() {
        for (text, line, what) in [
            ("/ok\nrelative/path\n", "line 2", "absolute path"),
            ("/a\t12\n", "line 1", "START+LEN"),
            ("/ok\n/a\t0+0\n", "line 2", "empty"),
            ("/a\t-1+5\n", "line 1", "START+LEN"),
            ("/a\t1+x\n", "line 1", "START+LEN"),
            ("/a\t0x10+5\n", "line 1", "START+LEN"),
            ("/a\t18446744073709551615+2\n", "line 1", "2^64"),
            ("/a\t99999999999999999999999+1\n", "line 1", "START+LEN"),
            ("\t0+4096\n", "line 1", "absolute path"),
            ("/ok\n\n\n/a\t1+2+3\n", "line 4", "START+LEN"),
        ] {
            let err = parse_prefetch_list(text).unwrap_err();
            assert!(err.starts_with(&format!("{line}:")), "{text:?}: {err}");
            assert!(err.contains(what), "{text:?}: {err}");
        }
    }
}
