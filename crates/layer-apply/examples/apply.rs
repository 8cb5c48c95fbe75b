//! `cargo run --release -p layer-apply --example apply -- LAYER.tar DIR [--overlay]`:
//! applies an uncompressed layer tar onto DIR and prints what it did.

use layer_apply::{apply_tar, ApplyOptions, Whiteouts};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: apply LAYER.tar DIR [--overlay]");
        std::process::exit(2);
    }
    let whiteouts = if args.iter().any(|a| a == "--overlay") {
        Whiteouts::Overlay
    } else {
        Whiteouts::Oci
    };
    let f = std::fs::File::open(&args[1]).unwrap_or_else(|e| {
        eprintln!("{}: {e}", args[1]);
        std::process::exit(1)
    });
    let start = std::time::Instant::now();
    match apply_tar(
        std::io::BufReader::with_capacity(1 << 20, f),
        args[2].as_ref(),
        &ApplyOptions {
            whiteouts,
            ..Default::default()
        },
    ) {
        Ok(s) => println!(
            "{} entries, {} bytes in {:.3} s",
            s.entries,
            s.bytes,
            start.elapsed().as_secs_f64()
        ),
        Err(e) => {
            eprintln!("apply failed: {e}");
            std::process::exit(1);
        }
    }
}
