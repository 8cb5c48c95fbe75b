//! The EROFS reader on arbitrary images: opening, validating, walking and reading
//! every inode must never panic, and an image the validator accepts must read back
//! in full without a single error (the validator is what stands between a registry
//! and the kernel, so it must not accept what the reader then trips over), but for
//! compressed data that does not decode, which the validator does not decode.
#![no_main]

use dedup_fuzz::{memfile, read_tree};
use erofs::reader::Image;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(img) = Image::from_file(memfile(data)) else {
        return;
    };
    let validated = img.validate();
    let tree = read_tree(&img);
    if let Ok(summary) = validated {
        // The validator checks compressed files' maps, not their data (as the kernel, a
        // stream that does not decode is a read error): only that error may remain.
        let tree = match tree {
            Err(e) if e.to_string().contains(erofs::zread::DOES_NOT_DECODE) => return,
            t => t.unwrap_or_else(|e| panic!("validated image ({summary:?}) does not read back: {e}")),
        };
        // Every path the walk saw is found again by lookup.
        for path in tree.keys().take(64) {
            img.lookup(path)
                .unwrap_or_else(|e| panic!("validated image: lookup of {:?}: {e}", String::from_utf8_lossy(path)));
        }
    }
});
