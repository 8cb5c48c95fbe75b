//! Index size and indexing throughput on a real layer.
//!
//! ```sh
//! cargo run --release -p tar-index --example measure -- [LAYER.tar.gz | DIR...]
//! ```
//!
//! With directories (default: /usr/lib/python3.11 /usr/lib/gcc /usr/share/doc), packs
//! them with `tar | gzip -6` first. Prints the index size relative to the compressed
//! blob at 1, 2 and 4 MiB chunks, and the throughput of indexing (reading the
//! uncompressed stream through `BufRead` as a tar parser would) against plain
//! `flate2::bufread::MultiGzDecoder` decoding of the same blob.

use std::io::{BufRead, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use tar_index::{Format, IndexOptions, Indexer};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let blob = if args.len() == 1 && Path::new(&args[0]).is_file() {
        std::fs::read(&args[0]).unwrap()
    } else {
        let dirs: Vec<String> = if args.is_empty() {
            ["/usr/lib/python3.11", "/usr/lib/gcc", "/usr/share/doc"]
                .iter()
                .filter(|d| Path::new(d).is_dir())
                .map(|d| d.to_string())
                .collect()
        } else {
            args
        };
        eprintln!("packing {dirs:?} with tar | gzip -6 ...");
        let mut tar = Command::new("tar")
            .args(["-cf", "-"])
            .args(&dirs)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = Command::new("gzip")
            .args(["-6", "-n", "-c"])
            .stdin(tar.stdout.take().unwrap())
            .output()
            .unwrap();
        tar.wait().unwrap();
        out.stdout
    };
    let mb = |n: u64| n as f64 / 1e6;

    // Plain decoding, best of 3.
    let mut plain_secs = f64::MAX;
    let mut unc = 0u64;
    for _ in 0..3 {
        let t = Instant::now();
        let mut d = flate2::bufread::MultiGzDecoder::new(blob.as_slice());
        let mut buf = vec![0u8; 256 << 10];
        unc = 0;
        loop {
            let n = d.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            unc += n as u64;
        }
        plain_secs = plain_secs.min(t.elapsed().as_secs_f64());
    }
    println!("layer: {:.1} MB gzip, {:.1} MB tar", mb(blob.len() as u64), mb(unc));
    println!(
        "flate2 MultiGzDecoder: {:.3} s = {:.0} MB/s uncompressed ({:.0} MB/s compressed)",
        plain_secs,
        mb(unc) / plain_secs,
        mb(blob.len() as u64) / plain_secs
    );

    for cs in [1u64 << 20, 2 << 20, 4 << 20] {
        let mut best = f64::MAX;
        let mut index = None;
        for _ in 0..3 {
            let t = Instant::now();
            let mut ix = Indexer::new(Format::Gzip, blob.as_slice(), IndexOptions::with_chunk_size(cs)).unwrap();
            // Consume as a tar parser does: borrow the buffer, take it all.
            loop {
                let n = ix.fill_buf().unwrap().len();
                if n == 0 {
                    break;
                }
                ix.consume(n);
            }
            let i = ix.finish().unwrap();
            best = best.min(t.elapsed().as_secs_f64());
            index = Some(i);
        }
        let index = index.unwrap();
        let bytes = index.to_bytes();
        // Decode every chunk once from its fetch range.
        let t = Instant::now();
        let mut fetched = 0u64;
        for i in 0..index.chunk_count() {
            let (a, b) = index.fetch_range(i);
            fetched += b - a;
            let c = index.decode_chunk(i, &blob[a as usize..b as usize]).unwrap();
            let (s, e) = index.chunk_range(i);
            assert_eq!(c.len() as u64, e - s);
        }
        let dec = t.elapsed().as_secs_f64();
        println!(
            "chunk {} MiB: {} chunks, {} checkpoints, index {} bytes = {:.2}% of the blob; \
             indexing {:.3} s = {:.0} MB/s uncompressed ({:.0}% of plain); \
             all chunks decoded in {:.3} s, fetching {:.2}x the blob",
            cs >> 20,
            index.chunk_count(),
            index.checkpoints(),
            bytes.len(),
            100.0 * bytes.len() as f64 / blob.len() as f64,
            best,
            mb(unc) / best,
            100.0 * plain_secs / best,
            dec,
            fetched as f64 / blob.len() as f64,
        );
    }
}
