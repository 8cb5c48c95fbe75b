//! Compressed images end to end: files cut from the input (text-like, raw and zero runs
//! at every size) are written with a codec and pcluster size the input picks; the image
//! must validate, and every file must read back exactly through the reader. Stresses
//! extent cutting at block, pcluster and segment ends, the per-file fallback, and the
//! lcluster indexes (full layout) the writer derives from the extents.
#![no_main]

use std::io::Cursor;

use dedup_fuzz::memfile;
use erofs::reader::Image;
use erofs::writer::{Body, Compression, ImageWriter, Meta, Node, Options, Tree};
use libfuzzer_sys::fuzz_target;

const CODECS: [&str; 7] = ["lz4", "lz4hc,1", "lz4hc,12", "zstd,1", "zstd,9", "deflate,6", "lzma,0"];

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let codec = CODECS[head as usize % CODECS.len()];
    let pcluster = 4096u64 << (head / 8 % 5);
    let opts = Options {
        compression: Some(
            Compression::new(codec.parse().unwrap())
                .with_pcluster_size(pcluster)
                .unwrap(),
        ),
        ..Default::default()
    };
    let mut w = ImageWriter::new(Cursor::new(Vec::new()), opts).unwrap();
    let mut tree = Tree::new(Meta {
        perm: 0o755,
        ..Default::default()
    });
    let root = tree.root();
    // Each file: 2 bytes of length (scaled up to 256 KiB), 1 byte of kind, then bytes it
    // is built from.
    let mut files = Vec::new();
    let mut input = rest;
    while input.len() >= 3 && files.len() < 16 {
        let len = (u32::from(u16::from_le_bytes([input[0], input[1]])) * 4) as usize;
        let kind = input[2];
        input = &input[3..];
        let take = input.len().min(64);
        let pattern: Vec<u8> = if take == 0 { vec![kind] } else { input[..take].to_vec() };
        input = &input[take..];
        let body: Vec<u8> = match kind % 4 {
            0 => pattern.iter().copied().cycle().take(len).collect(),
            1 => vec![0; len],
            2 => (0..len)
                .map(|i| pattern[i % pattern.len()] ^ (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
                .collect(),
            _ => (0..len)
                .map(|i| if (i / (1 + usize::from(kind))) % 2 == 0 { 0 } else { pattern[i % pattern.len()] })
                .collect(),
        };
        let meta = Meta {
            perm: 0o644,
            ..Default::default()
        };
        let f = w.write_file(&mut &body[..], body.len() as u64, &meta, None).unwrap();
        let id = tree.add(Node {
            meta,
            body: Body::File(f),
        });
        tree.link(root, format!("f{}", files.len()).as_bytes(), id);
        files.push(body);
    }
    let (out, _) = w.finish(&tree).unwrap();
    let img = Image::from_file(memfile(out.get_ref())).unwrap();
    img.validate().unwrap_or_else(|e| panic!("{codec}, pcluster {pcluster}: {e}"));
    for (i, body) in files.iter().enumerate() {
        let e = img.lookup(format!("/f{i}").as_bytes()).unwrap();
        let got = img.read_all(&e).unwrap_or_else(|err| panic!("{codec}, pcluster {pcluster}, f{i}: {err}"));
        assert!(got == *body, "{codec}, pcluster {pcluster}, f{i}: {} bytes back, {} written", got.len(), body.len());
    }
});
