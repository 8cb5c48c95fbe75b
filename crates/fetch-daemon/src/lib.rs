//! `dedupd`, the fetch daemon: serves registry blobs (EROFS layer images) as local files and fetches their
//! chunks from the registry when they are first read.
//!
//! Two data paths, chosen at start (`--data-path`, shown in the log, `Ping` and `dedupd_data_path`):
//! - **fanotify** (Linux 6.14+): the cache file itself is mounted; the kernel asks the daemon, through
//!   pre-content events, only for ranges not yet present (see [`fanotify`]). No daemon in the path of local
//!   data, and running containers keep working across a daemon restart.
//! - **FUSE** (fallback): the blobs are files on the daemon's FUSE mount; every read goes through it.
//!
//! - Every chunk is checked against its sha256 from the registered [`fetch_api::BlobSpec`] before it
//!   is written to the cache or served: the daemon never serves bytes that did not verify.
//! - The cache lives under `ROOT/blobs`: `<hex>.json` (the spec), `<hex>.data` (sparse, full size),
//!   `<hex>.bitmap` (one bit per cached chunk), `<hex>.verified` (the whole blob matched its digest).
//! - A prefetcher per blob fills in the rest in the background under a global bandwidth limit.
//! - It is driven over a unix socket with the [`fetch_api`] protocol, and exports Prometheus metrics.
//!
//! [`start`] mounts and serves; [`Running::stop`] detaches the mount and removes the socket.

mod control;
mod daemon;
mod fandata;
pub mod fanotify;
mod fs;
mod limits;
pub mod metrics;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use tracing::{info, warn};

pub use daemon::{Daemon, DataPath, DataPathChoice, Options};

/// A started daemon: mounted, serving its socket.
pub struct Running {
    /// The daemon's state.
    pub daemon: Arc<Daemon>,
    session: Option<fuser::BackgroundSession>,
}

/// The holder of the fanotify group for a daemon whose cache is `root`.
pub fn holder_socket(root: &Path) -> std::path::PathBuf {
    root.join("fanotify-group.sock")
}

/// Picks the data path: the probe decides `Auto`; `Fanotify` without kernel support is an error.
fn choose_data_path(opts: &Options) -> anyhow::Result<DataPath> {
    let probe = || fanotify::probe(&opts.root);
    Ok(match opts.data_path {
        DataPathChoice::Fuse => DataPath::Fuse,
        DataPathChoice::Fanotify => {
            probe().map_err(|e| anyhow::anyhow!("--data-path fanotify: this kernel cannot: {e}"))?;
            DataPath::Fanotify
        }
        DataPathChoice::Auto => match probe() {
            Ok(()) => DataPath::Fanotify,
            Err(e) => {
                info!(reason = %e, "no fanotify pre-content events: serving lazy blobs through FUSE");
                DataPath::Fuse
            }
        },
    })
}

/// Mounts the file system, restores the cache, and starts serving the socket (and `/metrics`).
///
/// The socket is bound last: once it answers, the mount is live.
pub fn start(opts: Options) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&opts.root).with_context(|| format!("cannot create {}", opts.root.display()))?;
    fs::clear_dead_mount(&opts.mountpoint)
        .with_context(|| format!("cannot detach the dead mount at {}", opts.mountpoint.display()))?;
    std::fs::create_dir_all(&opts.mountpoint)
        .with_context(|| format!("cannot create the mountpoint {}", opts.mountpoint.display()))?;
    let mountpoint = opts.mountpoint.canonicalize()?;
    prepare_socket(&opts.socket)?;
    let metrics_listener = match &opts.metrics_address {
        Some(addr) => Some(std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?),
        None => None,
    };

    let data_path = choose_data_path(&opts)?;
    let (daemon, session) = match data_path {
        DataPath::Fanotify => {
            let setup = fandata::setup(&holder_socket(&opts.root))?;
            let instance = setup.instance;
            // The event reader runs before the blobs load: loading may touch marked files.
            let fan = fandata::Fan::start(setup, &opts.root, mountpoint.clone())?;
            let daemon = Daemon::with_data_path(opts.clone(), mountpoint.clone(), data_path, instance)?;
            fan.attach(&daemon)?;
            let _ = daemon.fan.set(fan);
            (daemon, None)
        }
        DataPath::Fuse => {
            let daemon = Daemon::new(opts.clone(), mountpoint.clone())?;
            let mut config = fuser::Config::default();
            config.mount_options = vec![
                fuser::MountOption::RO,
                fuser::MountOption::FSName("dedupd".into()),
                fuser::MountOption::Subtype("dedupd".into()),
                fuser::MountOption::DefaultPermissions,
                fuser::MountOption::NoAtime,
            ];
            // Layers are mounted by root, but containers' processes read through the EROFS mounts on top.
            config.acl = fuser::SessionACL::All;
            config.n_threads = Some(2);
            let session = fuser::Session::new(fs::BlobFs::new(daemon.clone()), &mountpoint, &config)
                .with_context(|| format!("cannot mount FUSE at {}", mountpoint.display()))?
                .spawn()?;
            let _ = daemon.notifier.set(session.notifier());
            (daemon, Some(session))
        }
    };
    daemon
        .metrics
        .data_path
        .get_or_create(&metrics::DataPathLabel {
            path: data_path.name().into(),
        })
        .set(1);
    daemon.start_prefetchers();

    if let Some(listener) = metrics_listener {
        let d = daemon.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || control::serve_metrics(d, listener))?;
    }
    let listener =
        UnixListener::bind(&opts.socket).with_context(|| format!("cannot listen on {}", opts.socket.display()))?;
    let d = daemon.clone();
    std::thread::Builder::new()
        .name("control-accept".into())
        .spawn(move || control::serve_control(d, listener))?;
    info!(data_path = data_path.name(), mountpoint = %mountpoint.display(), socket = %opts.socket.display(),
        instance = daemon.instance, "dedupd ready");
    Ok(Running { daemon, session })
}

/// Refuses to start next to a live daemon on the same socket; removes a stale socket file.
fn prepare_socket(socket: &Path) -> anyhow::Result<()> {
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            bail!("another daemon answers on {}", socket.display());
        }
        std::fs::remove_file(socket).with_context(|| format!("cannot remove the stale socket {}", socket.display()))?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    Ok(())
}

impl Running {
    /// Stops: background work ends, the socket is removed.
    ///
    /// - FUSE: the mount is detached lazily (EROFS mounts on top may still hold its files open; they keep
    ///   working until this process exits).
    /// - fanotify: the group stays with its holder, so running containers' reads of missing data wait for the
    ///   next instance. Only when no file is marked and no read waits is the holder told to go.
    pub fn stop(self) {
        let daemon = self.daemon;
        daemon.shutdown();
        let _ = std::fs::remove_file(&daemon.opts.socket);
        match self.session {
            Some(session) => {
                if let Err(e) = rustix::mount::unmount(&daemon.mountpoint, rustix::mount::UnmountFlags::DETACH) {
                    warn!(mountpoint = %daemon.mountpoint.display(), error = %e, "cannot detach the mount");
                }
                // Dropping the session would unmount by path again, and could hit a mount made there since.
                std::mem::forget(session);
            }
            None => {
                if let Some(fan) = daemon.fan.get() {
                    // Workers see the shutdown and leave what they had not finished journaled.
                    std::thread::sleep(std::time::Duration::from_millis(250));
                    if !fan.any_marked() && !fan.in_flight() {
                        fanotify::release_holder(&holder_socket(&daemon.opts.root));
                        info!("no marked file left: the fanotify group is released");
                    } else {
                        info!("marked files remain: the fanotify group stays with its holder for the next instance");
                    }
                }
            }
        }
        info!("dedupd stopped");
    }
}
