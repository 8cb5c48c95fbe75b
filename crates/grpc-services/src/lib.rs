//! containerd's gRPC services over the snapshot store, served on a unix socket.
//!
//! containerd runs an out-of-process snapshotter as a **proxy plugin**: it dials a
//! unix socket and speaks `containerd.services.snapshots.v1.Snapshots` (config.toml
//! `[proxy_plugins.NAME] type = "snapshot"`). [`serve`] answers that on one socket.
//! The Diff service (`type = "diff"`, containerd ≥ 1.7.4) shares the socket
//! ([`serve_with_differ`]).
//!
//! The server stubs are generated at build time from containerd's .proto files (in
//! `proto/`) over containerd-client's message types, so clients built with
//! containerd-client and this server exchange the very same Rust types.
//!
//! - [`snapshots`]: the Snapshots service ([`SnapshotsService`]).
//! - [`diff`]: the Diff service ([`DiffService`]) over the ordered differs.
//! - [`filters`]: containerd's filter expressions, as `List` receives them.
//! - [`metrics`]: the Prometheus metrics the services record ([`ServiceMetrics`]).

#![warn(missing_docs)]

use std::error::Error;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use snapshotter::Snapshotter;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;
use tonic::transport::Server;

pub mod diff;
pub mod filters;
pub mod metrics;
pub mod snapshots;

pub use diff::DiffService;
pub use filters::Filter;
pub use metrics::ServiceMetrics;
pub use snapshots::SnapshotsService;

/// The generated tonic servers (messages are containerd-client's).
pub mod generated {
    /// `containerd.services.snapshots.v1.Snapshots`: the `Snapshots` trait and `SnapshotsServer`.
    #[allow(missing_docs, clippy::all)]
    pub mod snapshots {
        tonic::include_proto!("containerd.services.snapshots.v1");
    }
    /// `containerd.services.diff.v1.Diff`: the `Diff` trait and `DiffServer`.
    #[allow(missing_docs, clippy::all)]
    pub mod diff {
        tonic::include_proto!("containerd.services.diff.v1");
    }
    pub use diff::diff_server;
    pub use snapshots::snapshots_server;
}

/// Errors [`serve`] returns.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// The socket's mode when the caller has no opinion: containerd runs as root, and
/// anyone who can talk to a snapshotter can mount and delete layers.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Serves the Snapshots service for `snapshotter` on the unix socket `socket` until
/// `shutdown` completes.
///
/// A stale socket file left by a previous run is replaced; a socket another server
/// still answers on, or a path that is not a socket, is an error (never delete what
/// is not ours). The socket gets `socket_mode` (see [`DEFAULT_SOCKET_MODE`]) and, when
/// given, the group `socket_gid` (so a group can be allowed in with mode 0660). On
/// shutdown, calls in flight complete, then the socket file is removed.
pub async fn serve(
    snapshotter: Arc<Snapshotter>,
    socket: &Path,
    socket_mode: u32,
    socket_gid: Option<u32>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BoxError> {
    serve_routes(
        routes(snapshotter, None, None),
        socket,
        socket_mode,
        socket_gid,
        shutdown,
    )
    .await
}

/// [`serve`], with the Diff service on the same socket when `differ` is given
/// (containerd ≥ 1.7.4 dials it as a `type = "diff"` proxy plugin), and both
/// services recording into `metrics` when given.
pub async fn serve_with_differ(
    snapshotter: Arc<Snapshotter>,
    differ: Option<Arc<differ::Differ>>,
    metrics: Option<Arc<ServiceMetrics>>,
    socket: &Path,
    socket_mode: u32,
    socket_gid: Option<u32>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BoxError> {
    serve_routes(
        routes(snapshotter, differ, metrics),
        socket,
        socket_mode,
        socket_gid,
        shutdown,
    )
    .await
}

/// The services on the socket.
fn routes(
    snapshotter: Arc<Snapshotter>,
    differ: Option<Arc<differ::Differ>>,
    metrics: Option<Arc<ServiceMetrics>>,
) -> Routes {
    let mut routes = Routes::builder();
    // grpc.health.v1: the overall status ("") answers SERVING while the socket is up,
    // for probes (grpc_health_probe, a DaemonSet's liveness check).
    let (_reporter, health) = tonic_health::server::health_reporter();
    routes.add_service(health);
    let mut snapshots = SnapshotsService::new(snapshotter);
    if let Some(m) = &metrics {
        snapshots = snapshots.with_metrics(m.clone());
    }
    routes.add_service(snapshots.into_server());
    if let Some(d) = differ {
        let mut diff = DiffService::new(d);
        if let Some(m) = metrics {
            diff = diff.with_metrics(m);
        }
        routes.add_service(diff.into_server());
    }
    routes.routes()
}

/// [`serve`] for any set of routes (tests serve none, to exercise the socket
/// handling without a store).
async fn serve_routes(
    routes: Routes,
    socket: &Path,
    socket_mode: u32,
    socket_gid: Option<u32>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BoxError> {
    clear_stale_socket(socket)?;
    let listener = UnixListener::bind(socket).map_err(|e| with_path(e, "binding", socket))?;
    // Identify our socket file so that cleanup never removes one a newer instance
    // bound at the same path meanwhile.
    let ours = std::fs::symlink_metadata(socket).map(|m| (m.dev(), m.ino())).ok();
    let result = async {
        // bind() created the socket with the umask's mode; the window until chmod is
        // short, and the daemon's run directory is expected to be root-only anyway.
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(socket_mode))
            .map_err(|e| with_path(e, "setting the mode of", socket))?;
        if let Some(gid) = socket_gid {
            std::os::unix::fs::lchown(socket, None, Some(gid))
                .map_err(|e| with_path(e, "setting the group of", socket))?;
        }
        tracing::info!(socket = %socket.display(), mode = format!("{socket_mode:o}"), "serving");
        // systemd's Type=notify: ready once the socket accepts connections (a no-op
        // outside systemd, where NOTIFY_SOCKET is unset).
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            tracing::warn!(error = %e, "cannot notify systemd of readiness");
        }
        Server::builder()
            .add_routes(routes)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
            .await?;
        tracing::info!(socket = %socket.display(), "stopped serving");
        Ok::<(), BoxError>(())
    }
    .await;
    if let (Ok(m), Some(ours)) = (std::fs::symlink_metadata(socket), ours) {
        if (m.dev(), m.ino()) == ours {
            if let Err(e) = std::fs::remove_file(socket) {
                tracing::warn!(socket = %socket.display(), error = %e, "cannot remove the socket");
            }
        }
    }
    result
}

/// Makes `socket` bindable: creates its directory, removes a socket nobody listens
/// on (a crashed run's), refuses a live socket or anything that is not a socket.
fn clear_stale_socket(socket: &Path) -> Result<(), BoxError> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| with_path(e, "creating the directory of", socket))?;
    }
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(with_path(e, "inspecting", socket).into()),
    };
    // io::Errors with a kind, so that callers (and tests) can tell these apart from the words.
    if !meta.file_type().is_socket() {
        let msg = format!("{} exists and is not a socket", socket.display());
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, msg).into());
    }
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        let msg = format!("another server is listening on {}", socket.display());
        return Err(io::Error::new(io::ErrorKind::AddrInUse, msg).into());
    }
    tracing::info!(socket = %socket.display(), "removing a stale socket");
    std::fs::remove_file(socket).map_err(|e| with_path(e, "removing the stale socket", socket))?;
    Ok(())
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use containerd_client::services::v1::snapshots::{snapshots_client::SnapshotsClient, StatSnapshotRequest};
    use tokio::sync::oneshot;

    use super::*;

    /// Starts an empty server on `socket`; returns its stop handle and task.
    async fn start(socket: &Path, mode: u32) -> (oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), String>>) {
        let (tx, rx) = oneshot::channel::<()>();
        let path = socket.to_path_buf();
        let task = tokio::spawn(async move {
            serve_routes(Routes::default(), &path, mode, None, async {
                let _ = rx.await;
            })
            .await
            .map_err(|e| e.to_string())
        });
        for _ in 0..200 {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return (tx, task);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("server did not come up: {:?}", task.await);
    }

    #[tokio::test]
    async fn serves_sets_mode_and_removes_the_socket_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        // A directory that does not exist yet is created.
        let socket = dir.path().join("run/snap.sock");
        let (stop, task) = start(&socket, 0o640).await;
        let meta = std::fs::symlink_metadata(&socket).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);

        // Nothing registered: a call is Unimplemented, which is also what containerd
        // needs to fall through to another differ.
        let channel = containerd_client::connect(&socket).await.unwrap();
        let err = SnapshotsClient::new(channel)
            .stat(StatSnapshotRequest {
                snapshotter: "x".into(),
                key: "k".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented);

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!socket.exists(), "socket removed on shutdown");
    }

    #[tokio::test]
    async fn replaces_a_stale_socket_but_not_a_live_one_nor_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("snap.sock");

        // Stale: a socket file with nobody listening (a crashed run).
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(socket.exists());
        let (stop, task) = start(&socket, DEFAULT_SOCKET_MODE).await;
        let meta = std::fs::symlink_metadata(&socket).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);

        // Live: a second server on the same path is refused and leaves it alone.
        let err = serve_routes(Routes::default(), &socket, 0o600, None, std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(
            err.downcast_ref::<io::Error>().map(io::Error::kind),
            Some(io::ErrorKind::AddrInUse),
            "{err}"
        );
        assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());
        stop.send(()).unwrap();
        task.await.unwrap().unwrap();

        // Not a socket: refused, untouched.
        std::fs::write(&socket, "precious").unwrap();
        let err = serve_routes(Routes::default(), &socket, 0o600, None, std::future::pending())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&socket).unwrap(), "precious");
    }
}
