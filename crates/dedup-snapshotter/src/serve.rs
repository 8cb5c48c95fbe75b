//! `dedup-snapshotter serve`: the daemon containerd talks to as a proxy plugin.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::Deserialize;

/// Default store root.
pub const DEFAULT_ROOT: &str = "/var/lib/dedup-snapshotter";
/// Default socket.
pub const DEFAULT_ADDRESS: &str = "/run/dedup-snapshotter/snapshotter.sock";

/// The daemon's settings, from `--config FILE` (TOML) and the command line; flags win.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The config format's version: 1 (the only one so far; a file without it is read as 1).
    pub version: Option<u32>,
    /// Store root.
    pub root: Option<PathBuf>,
    /// Unix socket to serve on.
    pub address: Option<PathBuf>,
    /// Socket permission bits, e.g. `0o660` (default 0600).
    pub socket_mode: Option<u32>,
    /// Group owning the socket (a numeric gid), to let a non-root group connect.
    pub socket_gid: Option<u32>,
    /// `tracing` filter, e.g. `info` or `dedup=debug` (default `info`, or RUST_LOG).
    pub log_level: Option<String>,
    /// Log as JSON lines.
    pub log_json: Option<bool>,
    /// The Diff service's differs, tried in order (default `["erofs", "walking"]`;
    /// empty: no Diff service).
    pub differs: Option<Vec<String>>,
    /// containerd's socket, dialled back for its content store (Diff service).
    pub containerd_address: Option<PathBuf>,
    /// Store file data as chunks shared across layers (default false).
    pub dedup: Option<bool>,
    /// Chunk size in bytes for dedup: a power of two from 4096 to 16 MiB (default 65536),
    /// checked when the file is read.
    pub chunk_size: Option<layer_convert::ChunkSize>,
    /// Compress the layers this daemon writes (Apply of tar layers, Commit conversions):
    /// `lz4`, `lz4hc[,LEVEL]`, `zstd[,LEVEL]`, `deflate[,LEVEL]` or `lzma[,LEVEL]`, as `mkfs.erofs -z`
    /// names them (default: none, uncompressed). Native EROFS layers keep theirs. With
    /// `dedup`, sharing comes first: files are chunks, which EROFS cannot compress.
    pub compression: Option<String>,
    /// Physical cluster size in bytes for `compression` (`mkfs.erofs -C`; default 4096).
    pub pcluster_size: Option<u64>,
    /// Mount containers' roots and views over one merged metadata image of their layer
    /// chain (fsmeta) instead of one EROFS mount per layer (default false). Chains with
    /// compressed or lazy layers, or too many devices, stay per-layer, with a log line.
    pub merge_layers: Option<bool>,
    /// With `merge_layers`: chains of at most this many layers stay per-layer (default 1,
    /// as containerd's EROFS snapshotter's `max_unmerged_layers`).
    pub max_unmerged_layers: Option<usize>,
    /// Seconds without Prepare/View/Commit before committed layers' unpacked copies are
    /// deleted (default 10; deleting them during a pull burst slows ext4's inode allocation).
    pub trash_idle_secs: Option<u64>,
    /// The fetch daemon's (`dedupd`) control socket: when set, a Prepare with CRI's
    /// layer labels for an EROFS-native layer of a converted image mounts the layer
    /// before it is downloaded (lazy pull).
    pub fetch_socket: Option<PathBuf>,
    /// With `fetch_socket`: look for a tar index (`index-image`'s artifact, among the image
    /// manifest's OCI referrers) when a Prepare with CRI's labels names a `tar+gzip` or
    /// `tar+zstd` layer, and pull an indexed layer lazily from the unmodified image
    /// (default true).
    pub tar_index: Option<bool>,
    /// Download tar layers ourselves when a Prepare carries CRI's layer labels (image
    /// reference, manifest and layer digests), converting them as they arrive, and
    /// answer containerd that the layer exists (default false). Download, inflate and
    /// conversion overlap, and containerd keeps no compressed copy of the layer (so
    /// the image cannot be pushed or exported from this node without a pull).
    pub stream_layers: Option<bool>,
    /// Registries (host or host:port) to reach over plain HTTP besides loopback, for
    /// the manifests of lazy layers.
    pub plain_http: Option<Vec<String>>,
    /// Docker config file with registry credentials (default $DOCKER_CONFIG, ~/.docker).
    pub docker_config: Option<PathBuf>,
    /// containerd's registry host configuration directory (`DIR/<registry>/hosts.toml`:
    /// mirrors, CAs, client certificates; default /etc/containerd/certs.d).
    pub hosts_dir: Option<PathBuf>,
    /// Seconds to wait for a connection to a registry host before the next one is tried
    /// (default 5).
    pub connect_timeout_secs: Option<u64>,
    /// `host:port` to serve Prometheus metrics on at `/metrics` (default: none).
    pub metrics_address: Option<String>,
}

/// The config file format this daemon reads.
pub const CONFIG_VERSION: u32 = 1;

/// Default containerd socket.
pub const DEFAULT_CONTAINERD: &str = "/run/containerd/containerd.sock";

impl Config {
    /// Reads a TOML config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn serve(cfg: Config) -> Result<()> {
    crate::logging::init(cfg.log_level.as_deref(), "info", cfg.log_json.unwrap_or(false));
    if let Some(v) = cfg.version.filter(|v| *v != CONFIG_VERSION) {
        anyhow::bail!("config version {v} is not supported: this daemon reads version {CONFIG_VERSION}");
    }
    let root = cfg.root.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
    let address = cfg.address.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_ADDRESS));
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let chunk_size = cfg.chunk_size.unwrap_or_default();
    let compression = match &cfg.compression {
        Some(spec) if !spec.is_empty() && spec != "none" => {
            let codec: erofs::compress::Codec = spec.parse().context("config key compression")?;
            Some(
                erofs::writer::Compression::new(codec)
                    .with_pcluster_size(cfg.pcluster_size.unwrap_or(erofs::format::BLOCK_SIZE))
                    .map_err(anyhow::Error::msg)
                    .context("config key pcluster_size")?,
            )
        }
        _ => None,
    };
    if compression.is_some() && cfg.dedup.unwrap_or(false) {
        tracing::warn!("compression and dedup are both set: files are shared chunks, which EROFS cannot compress");
    }
    let opts = snapshotter::StoreOptions {
        dedup: cfg.dedup.unwrap_or(false),
        chunk_size,
        trash_idle: std::time::Duration::from_secs(cfg.trash_idle_secs.unwrap_or(10)),
        compression,
        merge_layers: cfg.merge_layers.unwrap_or(false),
        max_unmerged_layers: cfg.max_unmerged_layers.unwrap_or(1),
    };
    let stream = cfg.stream_layers.unwrap_or(false);
    let remote: Option<Arc<dyn snapshotter::RemoteLayers>> = if cfg.fetch_socket.is_some() || stream {
        let mut ro = registry::ClientOptions {
            docker_config: cfg.docker_config.clone(),
            hosts_dir: Some(
                cfg.hosts_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(registry::hosts::DEFAULT_HOSTS_DIR)),
            ),
            ..Default::default()
        };
        if let Some(secs) = cfg.connect_timeout_secs {
            ro.connect_timeout = std::time::Duration::from_secs(secs.max(1));
        }
        ro.plain_http.extend(cfg.plain_http.clone().unwrap_or_default());
        let client = registry::Client::new(ro).context("registry client for lazy and streamed layers")?;
        if let Some(sock) = &cfg.fetch_socket {
            tracing::info!(fetch_socket = %sock.display(), "lazy layers through the fetch daemon");
        }
        if stream {
            tracing::info!("tar layers streamed from the registry when a Prepare names them");
        }
        let tar_index = cfg.fetch_socket.is_some() && cfg.tar_index.unwrap_or(true);
        if tar_index {
            tracing::info!("tar+gzip/zstd layers with a tar index are pulled lazily");
        }
        let lazy = crate::lazy::Lazy::new(cfg.fetch_socket.clone(), client, stream);
        Some(Arc::new(if tar_index {
            lazy.with_tar_index(root.join("tarindex"))
        } else {
            lazy
        }))
    } else {
        None
    };
    let store = Arc::new(
        snapshotter::Snapshotter::open_with_remote(&root, opts, remote)
            .with_context(|| format!("opening the store at {}", root.display()))?,
    );
    tracing::info!(root = %root.display(), address = %address.display(), dedup = opts.dedup, chunk_size = %chunk_size, compression = %opts.compression.map_or("none".into(), |c| format!("{} pcluster {}K", c.codec, c.pcluster_blocks * 4)), merge_layers = opts.merge_layers, max_unmerged_layers = opts.max_unmerged_layers, "serving snapshots");

    let order = cfg
        .differs
        .clone()
        .unwrap_or_else(|| vec!["erofs".into(), "walking".into()]);
    let order: Vec<differ::Kind> = order
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, String>>()
        .map_err(anyhow::Error::msg)?;
    let containerd = cfg
        .containerd_address
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTAINERD));
    let differ = (!order.is_empty()).then(|| Arc::new(differ::Differ::new(order, store.clone(), &containerd)));

    let metrics = match &cfg.metrics_address {
        None => None,
        Some(addr) => {
            let m = Arc::new(crate::metrics::Metrics::new(store.clone(), cfg.fetch_socket.clone()));
            m.serve(addr)?;
            Some(m)
        }
    };

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let served = rt.block_on(async {
        let admin = match crate::stats::serve_admin(store.clone(), &root) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "no admin socket: `stats` will not reach this daemon");
                None
            }
        };
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing the SIGTERM handler");
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
            }
        };
        let served = grpc_services::serve_with_differ(
            store.clone(),
            differ,
            metrics.as_ref().map(|m| m.services.clone()),
            &address,
            cfg.socket_mode.unwrap_or(0o600),
            cfg.socket_gid,
            shutdown,
        )
        .await;
        if let Some(a) = admin {
            a.abort();
        }
        let _ = std::fs::remove_file(crate::stats::admin_socket(&root));
        served
    });
    store.shutdown();
    tracing::info!("stopped");
    served.map_err(|e| anyhow::anyhow!("serving on {}: {e}", address.display()))
}
