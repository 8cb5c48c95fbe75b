//! One-pass conversion of OCI image layers into EROFS images.
//!
//! A layer (tar, tar+gzip or tar+zstd) is decompressed on one thread while another
//! parses the tar stream and writes the image: file bodies go straight into EROFS data
//! blocks, metadata is collected in memory and written at the end. There is no unpacked
//! copy on disk and memory is bounded by the layer's metadata, not its size.
//!
//! ```no_run
//! let input = std::fs::File::open("layer.tar.gz")?;
//! let report = layer_convert::convert(input, "layer.erofs".as_ref(), &Default::default(), None)?;
//! println!("diffID {}", report.diff_id);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod convert;
mod dir;
mod lower;
pub mod tarindex;

/// The layer stream: compression detection and decompression (from [`oci_layer`]).
pub use oci_layer::stream;
/// The tar reader (from [`oci_layer`]).
pub use oci_layer::tar;

pub use convert::{convert, convert_with, Options, Report, DEFAULT_MAX_SIZE};
pub use dir::{convert_dir, convert_dir_with, DirReport};
pub use lower::{ImageLayer, LowerEntry, LowerLayer, Lowers};
pub use oci_layer::{ChunkSize, Compression, Error, ErrorKind};
