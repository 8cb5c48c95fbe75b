//! `dedupd`, the fetch daemon: serves registry blobs (EROFS layer images) as read-only files on a
//! FUSE mount and fetches their chunks from the registry when they are first read.
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
mod fs;
mod limits;
pub mod metrics;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use tracing::{info, warn};

pub use daemon::{Daemon, Options};

/// A started daemon: mounted, serving its socket.
pub struct Running {
    /// The daemon's state.
    pub daemon: Arc<Daemon>,
    session: fuser::BackgroundSession,
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
    info!(mountpoint = %mountpoint.display(), socket = %opts.socket.display(), instance = daemon.instance, "dedupd ready");
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
    /// Stops: background work ends, the mount is detached lazily (EROFS mounts on top may still hold
    /// its files open; they keep working until this process exits), and the socket is removed.
    pub fn stop(self) {
        let daemon = self.daemon;
        daemon.shutdown();
        if let Err(e) = rustix::mount::unmount(&daemon.mountpoint, rustix::mount::UnmountFlags::DETACH) {
            warn!(mountpoint = %daemon.mountpoint.display(), error = %e, "cannot detach the mount");
        }
        let _ = std::fs::remove_file(&daemon.opts.socket);
        // Dropping the session would unmount by path again, and could hit a mount made there since.
        std::mem::forget(self.session);
        info!("dedupd stopped");
    }
}
