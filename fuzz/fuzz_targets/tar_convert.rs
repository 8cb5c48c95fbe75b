//! The whole tar -> EROFS converter on arbitrary (uncompressed) tar streams.
//!
//! Oracle:
//! - an accepted layer gives an image the validator accepts (what stands between a
//!   registry and the kernel) and that reads back, path by path, equal to the model
//!   of the layer (`dedup_fuzz::model`: GNU tar extraction plus OCI whiteouts);
//! - the converter accepts exactly what the model accepts;
//! - where the model's rule decides the error kind (names, parents, links, truncated
//!   bodies), the converter gives that kind;
//! - a refused layer leaves nothing behind in the output directory.
//!
//! The image layout options (inline tails, metadata first) vary with the input so
//! every writer path is exercised.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use dedup_fuzz::{memfile, model, read_tree};
use erofs::reader::Image;
use libfuzzer_sys::fuzz_target;

/// One scratch directory per fuzzing process; each run leaves it empty.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::Builder::new().prefix("fuzz-convert").tempdir().unwrap();
        d.keep()
    })
}

fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    let out = dir.join("layer.erofs");
    let opts = layer_convert::Options {
        media_type: Some("application/vnd.oci.image.layer.v1.tar".into()),
        max_size: 64 << 20,
        inline_data: data.len() % 2 == 0,
        meta_first: data.len() % 3 == 0,
        build_time: 1_700_000_000,
        uuid: (data.len() % 5 == 0).then_some([0x5a; 16]),
        ..Default::default()
    };
    let converted = layer_convert::convert(data, &out, &opts, None);
    let expected = model::model(data, opts.build_time);
    match converted {
        Err(e) => {
            let left = listing(dir);
            assert!(left.is_empty(), "refused layer ({e}) left {left:?} behind");
            match expected {
                Ok(m) => panic!("converter refused a layer the model accepts ({} paths): {e}", m.len()),
                Err(why) => {
                    if let Some(kind) = why.kind {
                        assert_eq!(e.kind, kind, "converter: {e}; model: {}", why.why);
                    }
                }
            }
        }
        Ok(report) => {
            assert_eq!(
                listing(dir),
                ["layer.erofs"],
                "an accepted layer leaves exactly its image"
            );
            let bytes = std::fs::read(&out).unwrap();
            std::fs::remove_file(&out).unwrap();
            assert_eq!(bytes.len() as u64, report.output_size);
            let img = Image::from_file(memfile(&bytes)).expect("the converter's image opens");
            if let Err(e) = img.validate() {
                panic!("the converter's image fails validation: {e}");
            }
            let got = read_tree(&img).expect("a validated image reads back");
            let want = match expected {
                Ok(m) => m,
                Err(why) => panic!("converter accepted a layer the model refuses: {}", why.why),
            };
            if got != want {
                for (p, n) in &want {
                    match got.get(p) {
                        None => eprintln!("missing in image: {:?}", String::from_utf8_lossy(p)),
                        Some(g) if g != n => {
                            eprintln!(
                                "differs: {:?}\n  image: {g:?}\n  model: {n:?}",
                                String::from_utf8_lossy(p)
                            )
                        }
                        _ => {}
                    }
                }
                for p in got.keys().filter(|p| !want.contains_key(*p)) {
                    eprintln!("extra in image: {:?}", String::from_utf8_lossy(p));
                }
                panic!("the image differs from the model of the layer");
            }
        }
    }
});
