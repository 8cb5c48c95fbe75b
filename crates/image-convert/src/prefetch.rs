//! From file paths (what a container start opened) to the chunks of a converted
//! layer that hold their data.

use std::path::Path;

use erofs::format::DataLayout;
use erofs::reader::{FileKind, Image};

const BLOCK: u64 = 4096;

/// The chunks of the EROFS image at `image` that hold the data of `paths` (absolute
/// paths inside the image), in the order of `paths`, each chunk once; paths the
/// layer does not have are skipped. Returns the chunks and the paths found.
///
/// Only file bodies count: metadata (and inline tails, which live in it) is fetched
/// first anyway.
pub fn prefetch_chunks(
    image: &Path,
    paths: &[String],
    chunk_size: u64,
) -> erofs::reader::Result<(Vec<u32>, Vec<String>)> {
    let img = Image::open(image)?;
    let mut chunks = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut found = Vec::new();
    for p in paths {
        let Ok(e) = img.lookup(p.as_bytes()) else { continue };
        if e.kind != FileKind::File {
            continue;
        }
        let size = e.inode.size;
        let blocks = match e.inode.layout {
            DataLayout::FlatPlain => size.div_ceil(BLOCK),
            DataLayout::FlatInline => size / BLOCK,
            _ => 0,
        };
        found.push(p.clone());
        if blocks == 0 {
            continue;
        }
        let start = u64::from(e.inode.i_u) * BLOCK;
        let end = start + blocks * BLOCK;
        for c in start / chunk_size..end.div_ceil(chunk_size) {
            if seen.insert(c) {
                chunks.push(c as u32);
            }
        }
    }
    Ok((chunks, found))
}
