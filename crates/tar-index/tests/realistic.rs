//! A real tar of system files through `tar | gzip -6`: everything checks, and the index
//! size relative to the blob is reported at 1, 2 and 4 MiB chunks.

mod common;

use std::process::{Command, Stdio};

use common::*;
use tar_index::Format;

fn tar_gz(dir: &str) -> Option<Vec<u8>> {
    if !std::path::Path::new(dir).is_dir() {
        return None;
    }
    let mut tar = Command::new("tar")
        .args(["-cf", "-", dir])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let out = Command::new("gzip")
        .args(["-6", "-n", "-c"])
        .stdin(tar.stdout.take()?)
        .output()
        .ok()?;
    let tar_ok = tar.wait().ok()?.success();
    (tar_ok && out.status.success()).then_some(out.stdout)
}

#[test]
fn python_stdlib_layer() {
    let dir = ["/usr/lib/python3.11", "/usr/lib/python3", "/usr/share/doc"]
        .into_iter()
        .find(|d| std::path::Path::new(d).is_dir());
    let Some(dir) = dir else {
        eprintln!("no input directory: skipped");
        return;
    };
    let Some(blob) = tar_gz(dir) else {
        eprintln!("tar or gzip missing: skipped");
        return;
    };
    let plain = plain_decode(Format::Gzip, &blob).unwrap();
    for cs in [1u64 << 20, 2 << 20, 4 << 20] {
        let ix = check(Format::Gzip, &blob, &plain, cs, Expect::Index).unwrap();
        let size = ix.to_bytes().len();
        let pct = 100.0 * size as f64 / blob.len() as f64;
        eprintln!(
            "{dir} (tar {} MB, gzip -6 {} MB), chunk {} MiB: {} chunks, {} checkpoints, \
             index {size} bytes = {pct:.2}% of the blob",
            plain.len() >> 20,
            blob.len() >> 20,
            cs >> 20,
            ix.chunk_count(),
            ix.checkpoints(),
        );
        // Roughly one compressed 32 KiB window per chunk.
        assert!(pct < 8.0 / (cs >> 20) as f64, "{pct}");
    }
}
