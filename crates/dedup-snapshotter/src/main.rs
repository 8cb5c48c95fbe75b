//! `dedup-snapshotter`: a containerd snapshotter and differ that stores image layers
//! as EROFS images. This binary carries the daemon and the tools around it.

use std::fs::File;
use std::io::{self, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

mod inspect;
mod lazy;
mod logging;
mod metrics;
mod pull;
mod record;
mod serve;
mod stats;

#[derive(Parser)]
#[command(
    name = "dedup-snapshotter",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("DEDUP_GIT_REVISION"), ")"),
    about = "A containerd snapshotter and differ storing layers as EROFS images"
)]
struct Cli {
    /// Log filter for every subcommand (`tracing` syntax: `info`, `debug`, `snapshotter=debug`);
    /// default: RUST_LOG, else `info`. Wins over `log_level` in
    /// the config file.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an OCI layer (tar, tar+gzip, tar+zstd) into an EROFS image in one pass.
    Convert {
        /// The layer's media type; by default the compression is detected from the stream.
        #[arg(long)]
        media_type: Option<String>,
        /// Print the report as JSON; on failure, the error as JSON (`{"error": {"kind", ...}}`).
        #[arg(long)]
        json: bool,
        /// Do not pack small files and tails after their inodes (block-aligned data).
        #[arg(long)]
        no_inline: bool,
        /// Largest uncompressed layer accepted, in bytes (suffixes K, M, G, T).
        #[arg(long, value_parser = parse_size, default_value = "64G")]
        max_size: u64,
        /// fsync the image before renaming it into place.
        #[arg(long)]
        fsync: bool,
        /// Write regular files as chunk-based files, each distinct chunk stored once in a blob in this
        /// directory (named by a new 16-hex-digit id) that the image names as its extra device.
        #[arg(long)]
        blob_dir: Option<PathBuf>,
        /// Chunk size with --blob-dir: a power of two from 4K to 16M.
        #[arg(long, default_value = "64K")]
        chunk_size: layer_convert::ChunkSize,
        /// Metadata first, file data after: an image that can be listed and stat-ed
        /// from its first bytes alone (the layout of lazily fetched layers).
        #[arg(long)]
        meta_first: bool,
        /// Compress file data: lz4, lz4hc[,LEVEL], zstd[,LEVEL], deflate[,LEVEL] or lzma[,LEVEL], named as
        /// `mkfs.erofs -z` names them. Uncompressed by default (what merged metadata needs).
        #[arg(long, value_name = "ALGO[,LEVEL]")]
        compress: Option<erofs::compress::Codec>,
        /// Physical cluster size with --compress (`mkfs.erofs -C`): a multiple of 4K up to 1M.
        #[arg(long, value_parser = parse_size, default_value = "4K")]
        pcluster_size: u64,
        /// The layer file, or `-` for standard input.
        input: PathBuf,
        /// The EROFS image to write.
        output: PathBuf,
    },
    /// Serve containerd's Snapshots API on a unix socket (a containerd proxy plugin).
    Serve {
        /// Store root (default /var/lib/dedup-snapshotter).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Unix socket (default /run/dedup-snapshotter/snapshotter.sock).
        #[arg(long)]
        address: Option<PathBuf>,
        /// containerd's socket, for its content store (the Diff service reads and writes blobs there).
        #[arg(long)]
        containerd: Option<PathBuf>,
        /// Differs of the Diff service, in order (default erofs,walking; "none" disables the service).
        #[arg(long, value_delimiter = ',')]
        differs: Option<Vec<String>>,
        /// Store file data as chunks shared across all layers (node-local dedup).
        #[arg(long)]
        dedup: bool,
        /// Chunk size for --dedup: a power of two from 4K to 16M (default 64K).
        #[arg(long)]
        chunk_size: Option<layer_convert::ChunkSize>,
        /// The fetch daemon's (dedupd) control socket: lazy pulls of converted images.
        #[arg(long)]
        fetch_socket: Option<PathBuf>,
        /// containerd's registry host configuration directory (hosts.toml per registry; default
        /// /etc/containerd/certs.d), for the manifests of lazy layers.
        #[arg(long)]
        hosts_dir: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDRESS/metrics, e.g. 127.0.0.1:9101 (config `metrics_address`).
        #[arg(long, value_name = "ADDRESS")]
        metrics_address: Option<String>,
        /// Download tar layers ourselves when a Prepare carries CRI's layer labels, converting them as they
        /// arrive (containerd then keeps no compressed copy; see README).
        #[arg(long)]
        stream_layers: bool,
        /// Compress the layers this daemon writes: lz4, lz4hc[,LEVEL], zstd[,LEVEL], deflate[,LEVEL], lzma[,LEVEL]
        /// (config `compression`; default none).
        #[arg(long, value_name = "ALGO[,LEVEL]")]
        compression: Option<String>,
        /// Mount containers' roots and views over one merged metadata image of their layers (fsmeta) instead
        /// of one EROFS mount per layer (config `merge_layers`; default off).
        #[arg(long)]
        merge_layers: bool,
        /// With --merge-layers: chains of at most N layers stay per-layer (config `max_unmerged_layers`;
        /// default 1).
        #[arg(long, value_name = "N")]
        max_unmerged_layers: Option<usize>,
        /// A TOML file with the same settings (root, address, socket_mode, socket_gid, log_level, log_json,
        /// differs, containerd_address, dedup, chunk_size, compression, pcluster_size, merge_layers,
        /// max_unmerged_layers, fetch_socket, stream_layers, plain_http, docker_config, hosts_dir,
        /// connect_timeout_secs).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Convert an image in a registry into one with EROFS-native layers that can be mounted
    /// before they are downloaded (metadata first, a sha256 per chunk in the annotations).
    ConvertImage(ConvertImageArgs),
    /// Index an unmodified image for lazy pulls: for each tar+gzip/tar+zstd layer, its metadata as an
    /// EROFS tar index, decompression checkpoints and a sha256 per chunk of the uncompressed tar, pushed
    /// as an OCI artifact whose subject is the image manifest (found by the referrers API, or the
    /// referrers tag). The image is not touched; nodes that find the artifact mount its layers at once.
    IndexImage(IndexImageArgs),
    /// Pull an image into containerd and unpack it for our snapshotter, with the snapshot labels CRI
    /// passes: layers of a `convert-image`d image are mounted lazily instead of downloaded (what
    /// `ctr images pull` and nerdctl cannot ask for).
    Pull(pull::PullArgs),
    /// What a store holds: layers, logical vs stored bytes, chunks, index size, sharing per image.
    /// Asks the running daemon (its admin socket under the root), or reads the store when none runs.
    Stats {
        /// Store root (default /var/lib/dedup-snapshotter).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a VMDK descriptor (monolithicFlat) for a committed snapshot: its chain's merged metadata
    /// (written beside OUT, as OUT with the extension .erofs), then each layer image and blob it points
    /// into. VM runtimes attach it as one block device that mounts as EROFS. Asks the running daemon,
    /// or opens the store when none runs.
    Vmdk {
        /// Store root (default /var/lib/dedup-snapshotter).
        #[arg(long)]
        root: Option<PathBuf>,
        /// The committed snapshot: its key in the store, or containerd's name for it (the chain ID
        /// `ctr snapshots ls` shows), when one key ends in /NAME.
        key: String,
        /// The descriptor to write.
        out: PathBuf,
    },
    /// For each chunk size from 4K to 1M, how much of the given layers' file data is
    /// distinct (the dedup ratio) and how large the chunk index would be. Runs the real
    /// converter over every layer with a counting chunk sink.
    ChunkSweep {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Layers (tar, tar+gzip, tar+zstd), in the order a node would pull them.
        #[arg(required = true)]
        layers: Vec<PathBuf>,
    },
    /// Write merged metadata (fsmeta) for a chain of uncompressed layer images: one EROFS image holding
    /// the stack's tree as overlayfs shows it, whose files point into the layers' data. Mount it with
    /// the devices it prints, in order. Compressed layers cannot be merged (exit 2).
    Merge {
        /// Print JSON: {"devices": [...], "bytes": N, "inodes": N}.
        #[arg(long)]
        json: bool,
        /// Also write a VMDK descriptor (monolithicFlat) of the image followed by its devices: one
        /// flat block device for VM runtimes, which mounts with no extra devices.
        #[arg(long)]
        vmdk: Option<PathBuf>,
        /// The merged image to write.
        out: PathBuf,
        /// Layer images, bottom first; IMAGE=BLOB,BLOB,... for a deduplicated layer's devices.
        #[arg(required = true)]
        layers: Vec<String>,
    },
    /// Record which parts of which files a container start reads, in order (for `convert-image
    /// --prefetch`): traces the fetch daemon's reads while the image (already pulled lazily) runs once,
    /// with readahead off, and maps them to the file blocks they hold. Output: one `PATH<TAB>START+LEN`
    /// line per range (decimal bytes of the file at the absolute PATH, 4 KiB aligned, the last one cut
    /// at the end of the file), in order of first read, each place once (overlapping or adjacent ranges
    /// of a file merged, at the earliest one's place). A bare `PATH` line, which convert-image also
    /// takes, means the whole file.
    Record {
        /// The fetch daemon's (dedupd) control socket.
        #[arg(long)]
        fetch_socket: PathBuf,
        /// containerd's socket.
        #[arg(long)]
        containerd: PathBuf,
        /// containerd namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// The snapshotter the image was pulled with.
        #[arg(long, default_value = "dedup")]
        snapshotter: String,
        /// Write the list here instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Print a JSON report (paths, ranges, bytes_listed, bytes_of_files, accesses, bytes_read, blobs,
        /// readahead_off) instead of the list.
        #[arg(long)]
        json: bool,
        /// Leave readahead on during the run. By default `read_ahead_kb` is 0, for the run only, on every
        /// file-backed EROFS mount's backing device (/sys/class/bdi/erofs-*): their readahead would add up
        /// to 128 KiB the start never read around each read.
        #[arg(long)]
        keep_readahead: bool,
        /// The image, already pulled lazily with the snapshotter.
        image: String,
        /// The command to run in the container, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Show an EROFS image's superblock and device table.
    Inspect {
        /// The image.
        image: PathBuf,
        /// An extra device of the image (repeat for each, in device table order).
        #[arg(long = "device", value_name = "FILE")]
        devices: Vec<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List a directory (or one entry) of an EROFS image.
    Ls {
        /// The image.
        image: PathBuf,
        /// The path inside the image (default `/`).
        path: Option<String>,
        /// List recursively.
        #[arg(short = 'R', long)]
        recursive: bool,
        /// An extra device of the image (repeat for each, in device table order).
        #[arg(long = "device", value_name = "FILE")]
        devices: Vec<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a file from an EROFS image.
    Cat {
        /// The image.
        image: PathBuf,
        /// The file's path inside the image.
        path: String,
        /// An extra device of the image (repeat for each, in device table order); needed to
        /// read data stored on it.
        #[arg(long = "device", value_name = "FILE")]
        devices: Vec<PathBuf>,
    },
    /// Decompress a gzip or zstd file with the converter's decompressor and discard the
    /// output: the benchmark's baseline.
    BenchDecompress {
        /// The compressed file.
        input: PathBuf,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let mult = match s[i..].to_ascii_uppercase().trim_end_matches(['B', 'I']) {
                "K" => 1u64 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                "" => 1,
                other => return Err(format!("unknown size suffix {other:?}")),
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("bad size {s:?}"))?;
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} too large"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_errors = matches!(cli.command, Command::Convert { json: true, .. });
    // The daemon sets its logging up itself, once its config file is read.
    if !matches!(cli.command, Command::Serve { .. }) {
        logging::init(cli.log_level.as_deref(), "info", false);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that closed the pipe (`ls | head`) got what it wanted.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<io::Error>()
                    .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            if json_errors {
                println!("{}", error_json(&e));
            }
            ExitCode::FAILURE
        }
    }
}

/// The machine-readable form of a failed `convert --json`, printed as one line on stdout (where
/// the report would have been): `{"error": {"kind", "message", "entry", "offset", "io"}}`.
///
/// `kind` is the converter's [`layer_convert::ErrorKind`] variant (`Truncated`, `PathEscape`, ...),
/// `Io` for an I/O error outside the converter (opening the input), `Usage` for options refused
/// before converting; `io` is the I/O error's `std::io::ErrorKind` when there is one. Scripts and
/// tests branch on these fields, not on the message's words, which may change.
fn error_json(e: &anyhow::Error) -> serde_json::Value {
    let conv = e.chain().find_map(|c| c.downcast_ref::<layer_convert::Error>());
    let io = e.chain().find_map(|c| c.downcast_ref::<io::Error>());
    let kind = match (conv, io) {
        (Some(c), _) => format!("{:?}", c.kind),
        (None, Some(_)) => "Io".to_string(),
        (None, None) => "Usage".to_string(),
    };
    serde_json::json!({
        "error": {
            "kind": kind,
            "message": format!("{e:#}"),
            "entry": conv.and_then(|c| c.entry.clone()),
            "offset": conv.and_then(|c| c.offset),
            "io": io.map(|e| format!("{:?}", e.kind())),
        }
    })
}

fn run(cli: Cli) -> Result<()> {
    let log_level = cli.log_level;
    match cli.command {
        Command::Convert {
            media_type,
            json,
            no_inline,
            max_size,
            fsync,
            blob_dir,
            chunk_size,
            meta_first,
            compress,
            pcluster_size,
            input,
            output,
        } => {
            if meta_first && blob_dir.is_some() {
                anyhow::bail!("--meta-first and --blob-dir do not go together: a blob image has no file data");
            }
            let mut opts = layer_convert::Options::from_env();
            opts.media_type = media_type;
            opts.inline_data = !no_inline;
            opts.max_size = max_size;
            opts.fsync = fsync;
            opts.chunk_size = chunk_size;
            opts.meta_first = meta_first;
            opts.compress = compress
                .map(|c| erofs::writer::Compression::new(c).with_pcluster_size(pcluster_size))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            convert(&input, &output, &opts, json, blob_dir.as_deref())
        }
        Command::ConvertImage(args) => convert_image(args),
        Command::IndexImage(args) => index_image(args),
        Command::Pull(args) => pull::pull(args),
        Command::Stats { root, json } => {
            stats::stats(&root.unwrap_or_else(|| PathBuf::from(serve::DEFAULT_ROOT)), json)
        }
        Command::Vmdk { root, key, out } => {
            stats::vmdk(&root.unwrap_or_else(|| PathBuf::from(serve::DEFAULT_ROOT)), &key, &out)
        }
        Command::ChunkSweep { json, layers } => stats::chunk_sweep(&layers, json),
        Command::Merge {
            json,
            vmdk,
            out,
            layers,
        } => merge(&out, &layers, vmdk.as_deref(), json),
        Command::Serve {
            root,
            address,
            containerd,
            differs,
            dedup,
            chunk_size,
            fetch_socket,
            hosts_dir,
            stream_layers,
            compression,
            merge_layers,
            max_unmerged_layers,
            metrics_address,
            config,
        } => {
            let mut cfg = match config {
                Some(path) => serve::Config::load(&path)?,
                None => serve::Config::default(),
            };
            cfg.root = root.or(cfg.root);
            cfg.address = address.or(cfg.address);
            cfg.containerd_address = containerd.or(cfg.containerd_address);
            if let Some(d) = differs {
                cfg.differs = Some(d.into_iter().filter(|s| s != "none").collect());
            }
            if dedup {
                cfg.dedup = Some(true);
            }
            cfg.chunk_size = chunk_size.or(cfg.chunk_size);
            cfg.compression = compression.or(cfg.compression);
            if merge_layers {
                cfg.merge_layers = Some(true);
            }
            cfg.max_unmerged_layers = max_unmerged_layers.or(cfg.max_unmerged_layers);
            cfg.fetch_socket = fetch_socket.or(cfg.fetch_socket);
            cfg.hosts_dir = hosts_dir.or(cfg.hosts_dir);
            cfg.metrics_address = metrics_address.or(cfg.metrics_address);
            if stream_layers {
                cfg.stream_layers = Some(true);
            }
            cfg.log_level = log_level.or(cfg.log_level);
            serve::serve(cfg)
        }
        Command::Record {
            fetch_socket,
            containerd,
            namespace,
            snapshotter,
            output,
            json,
            keep_readahead,
            image,
            command,
        } => record::record(record::RecordArgs {
            fetch_socket,
            containerd,
            namespace,
            snapshotter,
            output,
            json,
            keep_readahead,
            image,
            command,
        }),
        Command::Inspect { image, devices, json } => inspect::inspect(&image, &devices, json),
        Command::Ls {
            image,
            path,
            recursive,
            devices,
            json,
        } => inspect::ls(&image, &devices, path.as_deref(), recursive, json),
        Command::Cat { image, path, devices } => inspect::cat(&image, &devices, &path),
        Command::BenchDecompress { input } => bench_decompress(&input),
    }
}

fn convert(
    input: &Path,
    output: &Path,
    opts: &layer_convert::Options,
    json: bool,
    blob_dir: Option<&Path>,
) -> Result<()> {
    let (reader, total): (Box<dyn Read + Send>, Option<u64>) = if input.as_os_str() == "-" {
        (Box::new(io::stdin()), None)
    } else {
        let f = File::open(input).with_context(|| format!("opening {}", input.display()))?;
        let len = f.metadata().ok().map(|m| m.len());
        (Box::new(f), len)
    };
    // A bar only where someone watches, and only when it will be on screen a while.
    let bar = (io::stderr().is_terminal() && total.is_none_or(|t| t > 32 << 20)).then(|| {
        let bar = match total {
            Some(t) => ProgressBar::new(t),
            None => ProgressBar::no_length(),
        };
        bar.set_style(
            ProgressStyle::with_template("{spinner} {bytes}/{total_bytes} {bytes_per_sec} {wide_bar} {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let progress = bar.clone().map(|b| move |n: u64| b.set_position(n));
    let progress = progress.as_ref().map(|p| p as &(dyn Fn(u64) + Sync));
    let (report, chunks) = match blob_dir {
        None => (layer_convert::convert(reader, output, opts, progress), None),
        Some(dir) => {
            // A new id per run: nanoseconds since the epoch, unique enough for one
            // directory (the sink refuses to overwrite an existing blob).
            let id = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            let mut sink = dedup::BlobSink::new(&dedup::NoChunks, dir, id);
            match layer_convert::convert_with(reader, output, opts, progress, Some(&mut sink)) {
                Ok(r) => match sink.finish(opts.fsync) {
                    Ok(c) => (Ok(r), Some(c)),
                    Err(e) => (Err(layer_convert::Error::io(e)), None),
                },
                Err(e) => {
                    sink.discard();
                    (Err(e), None)
                }
            }
        }
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let report = report.with_context(|| format!("converting {}", input.display()))?;
    if json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(c) = &chunks {
            v["blob"] = serde_json::json!(c.own.as_ref().map(|o| o.path.display().to_string()));
            v["devices"] = serde_json::json!(c.devices.iter().map(|d| dedup::blob_name(*d)).collect::<Vec<_>>());
            v["chunks"] = serde_json::json!(c.chunks);
            v["logical_bytes"] = serde_json::json!(c.logical_bytes);
            v["blob_bytes"] = serde_json::json!(c.written_bytes);
            v["repeated_bytes"] = serde_json::json!(c.repeated_bytes);
            v["zero_bytes"] = serde_json::json!(c.zero_bytes);
        }
        println!("{v}");
    } else {
        if let Some(c) = &chunks {
            if let Some(own) = &c.own {
                println!("blob:          {}", own.path.display());
            }
            println!("chunks:        {}", c.chunks);
            println!("file bytes:    {}", c.logical_bytes);
            println!("blob bytes:    {}", c.written_bytes);
            println!("repeated:      {}", c.repeated_bytes);
            println!("zero (holes):  {}", c.zero_bytes);
        }
        println!("diff id:       {}", report.diff_id);
        println!("input digest:  {}", report.input_digest);
        println!("compression:   {}", report.compression.name());
        println!("input size:    {}", report.input_size);
        println!("tar size:      {}", report.uncompressed_size);
        println!("image size:    {}", report.output_size);
        println!("entries:       {}", report.entries);
        if report.compressed_files > 0 {
            println!(
                "compressed:    {} files ({} with packed tails)",
                report.compressed_files, report.tail_packed_files
            );
        }
        println!("time:          {:.3}s", report.seconds);
    }
    Ok(())
}

fn merge(out: &Path, layers: &[String], vmdk: Option<&Path>, json: bool) -> Result<()> {
    let layers: Vec<fsmeta::Layer> = layers
        .iter()
        .map(|l| match l.split_once('=') {
            Some((image, devs)) => fsmeta::Layer {
                image: PathBuf::from(image),
                devices: devs.split(',').filter(|d| !d.is_empty()).map(PathBuf::from).collect(),
            },
            None => fsmeta::Layer {
                image: PathBuf::from(l),
                devices: Vec::new(),
            },
        })
        .collect();
    let merged = match fsmeta::merge_with(&layers, out, vmdk.is_some()) {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(out);
            eprintln!("error: {e}");
            std::process::exit(if matches!(e, fsmeta::Error::Unmergeable { .. }) {
                2
            } else {
                1
            });
        }
    };
    if let Some(v) = vmdk {
        fsmeta::write_vmdk(v, out, &merged.devices).with_context(|| format!("writing {}", v.display()))?;
    }
    if json {
        let v = serde_json::json!({
            "devices": merged.devices,
            "bytes": merged.summary.bytes,
            "inodes": merged.summary.inodes,
        });
        println!("{v}");
    } else {
        for d in &merged.devices {
            println!("device: {}", d.display());
        }
        println!("image size:    {}", merged.summary.bytes);
        println!("inodes:        {}", merged.summary.inodes);
    }
    Ok(())
}

fn bench_decompress(input: &Path) -> Result<()> {
    let started = Instant::now();
    let f = File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let mut src = io::BufReader::with_capacity(256 << 10, f);
    let head = io::BufRead::fill_buf(&mut src)?;
    let c = layer_convert::Compression::sniff(head)?;
    let mut dec: Box<dyn Read> = match c {
        layer_convert::Compression::Gzip => Box::new(flate2_reader(src)),
        layer_convert::Compression::Zstd => Box::new(zstd_reader(src)?),
        layer_convert::Compression::None => Box::new(src),
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = dec.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    println!(
        "{}",
        serde_json::json!({"compression": c.name(), "uncompressed_size": total, "seconds": started.elapsed().as_secs_f64()})
    );
    Ok(())
}

fn flate2_reader<R: io::BufRead>(r: R) -> impl Read {
    layer_convert::stream::gzip_decoder(r)
}

fn zstd_reader<R: io::BufRead>(r: R) -> Result<impl Read> {
    Ok(layer_convert::stream::zstd_decoder(r)?)
}

/// The arguments of `convert-image`.
#[derive(clap::Args)]
struct ConvertImageArgs {
    /// Source image (`registry/name:tag` or `@sha256:…`); loopback registries use plain HTTP.
    src: String,
    /// Target image reference, pushed when every layer is converted.
    dst: String,
    /// Size of the verification chunks (and of each fetch): a power of two from 4K to 1G. Smaller
    /// fetches less beyond what a start reads, larger makes fewer round trips (scripts/bench-lazy.sh,
    /// share of the image fetched before the first output: 1M 21.5%, 256K 11.2%, 128K 9.9%, 64K 9.4%
    /// but 3.0x instead of 5.2x sooner than a full pull).
    #[arg(long, value_parser = parse_size, default_value = "128K")]
    chunk_size: u64,
    /// What a start reads first (e.g. `record`'s output): the chunks of the converted layers holding
    /// it become each layer's prefetch list, in the list's order. One entry a line: `PATH<TAB>START+LEN`
    /// (bytes of the file at the absolute PATH, decimal) or a bare `PATH` (the whole file); the path is
    /// what precedes the last TAB, spaces included. `#` comments and blank lines are skipped; anything
    /// else is an error. A path is looked up in the topmost layer that has it.
    #[arg(long)]
    prefetch: Option<PathBuf>,
    /// Where converted layers are kept until they are pushed (default: $TMPDIR).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Media type of the converted layers. containerd before 2.x unpacks only OCI/Docker layer types
    /// through its unpacker (the one that lets a snapshotter mount a layer lazily): use `oci` there
    /// (application/vnd.oci.image.layer.v1.erofs); `erofs` is application/vnd.erofs.layer.v1.
    #[arg(long, default_value = "erofs")]
    layer_media_type: String,
    /// Compress each chunk on the wire: `zstd[:LEVEL]` pushes every layer as one zstd frame per
    /// chunk plus a zstd seekable-format seek table, under the media type with `+zstd` (pulled by
    /// our differ and our lazy path, not by containerd's EROFS differ); `none` pushes the image as
    /// it is. The default level keeps the python image under 1.2x its gzip size (README.md).
    #[arg(long, value_parser = parse_chunk_compression, default_value = "none")]
    chunk_compression: ChunkCompression,
    /// Pack small files and tails after their inodes. Off by default here: inline data would
    /// spread the inodes a start looks up over many more chunks to fetch.
    #[arg(long)]
    inline: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The arguments of `index-image`.
#[derive(clap::Args)]
struct IndexImageArgs {
    /// The image (`registry/name:tag` or `@sha256:…`); an index is resolved to this host's platform.
    image: String,
    /// Uncompressed bytes per verified chunk, and the spacing of decompression checkpoints: a power of
    /// two from 64K to 64M. A read fetches and inflates at least one chunk; each gzip checkpoint keeps a
    /// 32 KiB window, so smaller chunks make a bigger artifact (scripts/bench-lazy.sh, python image:
    /// 2M 1.8% of the image and first output 4.2x sooner at 3 MB/s, 1M 3.4% and 5.2x).
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    chunk_size: u64,
    /// Where tar-index images are kept until they are pushed (default: $TMPDIR).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// How `convert-image` and `index-image` reach registries.
#[derive(clap::Args)]
struct RegistryArgs {
    /// Docker config file with registry credentials (default: $DOCKER_CONFIG or ~/.docker).
    #[arg(long)]
    docker_config: Option<PathBuf>,
    /// Also use plain HTTP for this registry host (loopback always does).
    #[arg(long)]
    plain_http: Vec<String>,
    /// containerd's registry host configuration directory: DIR/<registry>/hosts.toml names mirrors
    /// (tried first, in order), CAs and client certificates, as containerd reads it.
    #[arg(long, default_value = registry::hosts::DEFAULT_HOSTS_DIR)]
    hosts_dir: PathBuf,
    /// Seconds to wait for a connection to a registry host before the next one is tried.
    #[arg(long, default_value_t = 5)]
    connect_timeout_secs: u64,
}

impl RegistryArgs {
    fn client(self) -> Result<registry::Client> {
        let mut copts = registry::ClientOptions {
            docker_config: self.docker_config,
            hosts_dir: Some(self.hosts_dir),
            connect_timeout: std::time::Duration::from_secs(self.connect_timeout_secs.max(1)),
            ..Default::default()
        };
        copts.plain_http.extend(self.plain_http);
        Ok(registry::Client::new(copts)?)
    }
}

fn index_image(a: IndexImageArgs) -> Result<()> {
    let client = a.registry.client()?;
    let image = registry::Reference::parse(&a.image).with_context(|| format!("image {}", a.image))?;
    let opts = image_convert::IndexOptions {
        chunk_size: a.chunk_size,
        work_dir: a.work_dir,
        progress: !a.json && io::stderr().is_terminal(),
        ..Default::default()
    };
    let report = image_convert::index_image(&client, &image, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for (i, l) in report.layers.iter().enumerate() {
        match &l.skipped {
            Some(why) => println!("layer {}: {} skipped: {why}", i + 1, l.digest),
            None => println!(
                "layer {}: {} ({} bytes, tar {} bytes) -> index {} bytes ({:.2}%: image {} bytes, {} checkpoints, {} chunks), {:.2} s",
                i + 1,
                l.digest,
                l.size,
                l.uncompressed_size,
                l.bundle_size,
                100.0 * l.bundle_size as f64 / l.size.max(1) as f64,
                l.meta_size,
                l.checkpoints,
                l.chunks,
                l.seconds
            ),
        }
    }
    match &report.artifact_digest {
        Some(d) => println!(
            "{}: artifact {d}, {} bytes = {:.2}% of the image's {} bytes ({:.1} s)",
            report.image,
            report.artifact_bytes,
            report.artifact_percent(),
            report.image_bytes,
            report.seconds
        ),
        None => anyhow::bail!("{}: no layer could be indexed: nothing pushed", report.image),
    }
    Ok(())
}

/// `--chunk-compression`: the zstd level, if any (a newtype: clap takes an `Option` field
/// for an optional argument).
#[derive(Debug, Clone, Copy)]
struct ChunkCompression(Option<i32>);

/// `none` or `zstd[:LEVEL]` (see `--chunk-compression`).
fn parse_chunk_compression(s: &str) -> std::result::Result<ChunkCompression, String> {
    let (algo, level) = match s.split_once(':') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    match (algo, level) {
        ("none", None) => Ok(ChunkCompression(None)),
        ("zstd", None) => Ok(ChunkCompression(Some(image_convert::zstd_chunks::DEFAULT_LEVEL))),
        ("zstd", Some(l)) => {
            let range = image_convert::zstd_chunks::level_range();
            match l.parse::<i32>() {
                Ok(n) if range.contains(&n) => Ok(ChunkCompression(Some(n))),
                _ => Err(format!(
                    "zstd level {l:?} is not a number from {} to {}",
                    range.start(),
                    range.end()
                )),
            }
        }
        _ => Err(format!("{s:?}: expected none, zstd or zstd:LEVEL")),
    }
}

fn convert_image(a: ConvertImageArgs) -> Result<()> {
    let client = a.registry.client()?;
    let src = registry::Reference::parse(&a.src).with_context(|| format!("source {}", a.src))?;
    let dst = registry::Reference::parse(&a.dst).with_context(|| format!("target {}", a.dst))?;
    let prefetch_paths = match &a.prefetch {
        None => Vec::new(),
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            image_convert::parse_prefetch_list(&text)
                .map_err(|e| anyhow::anyhow!("prefetch list {}: {e}", p.display()))?
        }
    };
    let mut layer = layer_convert::Options::from_env();
    layer.inline_data = a.inline;
    let opts = image_convert::ConvertOptions {
        layer,
        chunk_size: a.chunk_size,
        prefetch_paths,
        work_dir: a.work_dir,
        progress: !a.json && io::stderr().is_terminal(),
        layer_media_type: match a.layer_media_type.as_str() {
            "erofs" => image_convert::EROFS_LAYER_MEDIA_TYPE.to_string(),
            "oci" => image_convert::annotations::OCI_EROFS_LAYER_MEDIA_TYPE.to_string(),
            other => other.to_string(),
        },
        chunk_zstd_level: a.chunk_compression.0,
    };
    let report = image_convert::convert_image(&client, &src, &dst, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (i, l) in report.layers.iter().enumerate() {
            println!(
                "layer {}: {} ({} bytes) -> {} ({} bytes, image {} bytes, metadata {} bytes, {} chunks, {} prefetch), {:.2} s",
                i + 1,
                l.source_digest,
                l.source_size,
                l.digest,
                l.size,
                l.uncompressed_size,
                l.data_offset,
                l.chunks,
                l.prefetch_chunks.len(),
                l.convert_seconds
            );
        }
        println!("{}@{} ({:.1} s)", report.target, report.manifest_digest, report.seconds);
    }
    Ok(())
}
