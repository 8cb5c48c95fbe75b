//! `diffdir upper UPPER OUT [none|gzip|zstd]` or `diffdir walk LOWER UPPER OUT [none|gzip|zstd]`:
//! writes a layer tar and prints what the diff wrote and how long it took.

use std::path::Path;
use std::time::Instant;

use layer_diff::{write_upper_diff, write_walk_diff, Compression, DiffOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, rest) = args.split_first().ok_or("usage: diffdir upper|walk …")?;
    let n = if mode == "walk" { 3 } else { 2 };
    if rest.len() < n {
        return Err("usage: diffdir upper UPPER OUT [c] | walk LOWER UPPER OUT [c]".into());
    }
    let compression = match rest.get(n).map(String::as_str) {
        None | Some("gzip") => Compression::Gzip,
        Some("none") => Compression::None,
        Some("zstd") => Compression::Zstd,
        Some(other) => return Err(format!("unknown compression {other}").into()),
    };
    let opts = DiffOptions {
        compression,
        source_date_epoch: None,
    };
    let out = std::io::BufWriter::new(std::fs::File::create(&rest[n - 1])?);
    let start = Instant::now();
    let stats = if mode == "walk" {
        write_walk_diff(Path::new(&rest[0]), Path::new(&rest[1]), out, &opts)?
    } else {
        write_upper_diff(Path::new(&rest[0]), out, &opts)?
    };
    println!("{stats:?} in {:.2?}", start.elapsed());
    Ok(())
}
