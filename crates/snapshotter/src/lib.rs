//! The snapshot store behind containerd's Snapshots API.
//!
//! Committed layers are EROFS images (`snapshots/<id>/layer.erofs`) that the store
//! mounts read-only itself at `m/<id>`; active snapshots are an overlayfs upper dir
//! (`snapshots/<id>/fs`) over those mounts. Metadata (names, kinds, parents, labels,
//! times, usage) lives in a transactional database so a crash at any point leaves a
//! state the next start repairs.

use std::collections::BTreeMap;
use std::time::SystemTime;

/// Kinds of snapshot, as containerd names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    /// A read-only view of a committed parent chain.
    View,
    /// A writable snapshot, to be committed or removed.
    Active,
    /// An immutable layer that other snapshots can build on.
    Committed,
}

/// What Stat, Update and List report about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The key (active, view) or name (committed).
    pub name: String,
    /// The parent's name, empty for none.
    pub parent: String,
    /// The kind.
    pub kind: Kind,
    /// User labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time.
    pub created: SystemTime,
    /// Last update time.
    pub updated: SystemTime,
}

/// Disk usage of a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes.
    pub size: i64,
    /// Inodes.
    pub inodes: i64,
}

/// A mount for containerd to perform (`mount -t <kind> -o <options> <source> <target>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type: `bind`, `overlay`.
    pub kind: String,
    /// Source.
    pub source: String,
    /// Target (empty: the caller's).
    pub target: String,
    /// Mount options.
    pub options: Vec<String>,
}

/// Errors, by the gRPC code containerd expects for each.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such snapshot.
    #[error("not found: {0}")]
    NotFound(String),
    /// The key or name is taken.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The snapshot is not in a state that allows the call.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The request is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A service the call needs (the fetch daemon, a registry) cannot be reached.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Anything else (I/O, database, conversion).
    #[error("{0}")]
    Internal(String),
}

/// Result of store operations.
pub type Result<T> = std::result::Result<T, Error>;

mod apply;
pub mod blobs;
mod merged;
mod meta;
pub mod mounts;
mod store;
pub use apply::{AppliedLayer, LayerBlob, LayerFormat};
pub use meta::{RemoteLayer, TARGET_SNAPSHOT_LABEL};
pub use store::{
    ActiveSnapshot, Attached, ChainStats, DedupSession, RemoteLayers, Snapshotter, StoreOptions, StoreStats,
    StreamedLayer,
};
