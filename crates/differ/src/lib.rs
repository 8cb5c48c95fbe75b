//! containerd's Diff service, as an ordered list of differs.
//!
//! - **erofs**: Apply of a layer onto one of *our* active snapshots converts the blob
//!   straight into the snapshot's `layer.erofs` in one streaming pass (so Commit has
//!   nothing left to convert); Compare of our snapshot reads only its upper dir.
//! - **walking**: Apply onto any mounts (mounted in a temporary directory, or the
//!   upper dir of a single overlay mount), Compare of any two mount sets by walking
//!   both trees.
//!
//! A differ that cannot take a request answers [`DiffError::NotImplemented`] and the
//! next one is tried; when none can, the caller sees gRPC Unimplemented and
//! containerd falls through to its own differs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod content;
mod mounts;
mod ops;

pub use content::{CallContext, ContentStore};
pub use ops::{Applied, ApplyRequest, CompareRequest, Descriptor};

/// Errors, by the gRPC code each maps to.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// This differ does not handle the request; try the next one.
    #[error("not implemented: {0}")]
    NotImplemented(String),
    /// Malformed request or input (bad media type, digest mismatch, hostile tar).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Something named does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// Already exists.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The target is in the wrong state.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

/// Result of differ operations.
pub type Result<T> = std::result::Result<T, DiffError>;

/// A differ by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Our EROFS snapshots, converted in one pass.
    Erofs,
    /// Any mounts.
    Walking,
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Kind, String> {
        match s {
            "erofs" => Ok(Kind::Erofs),
            "walking" => Ok(Kind::Walking),
            other => Err(format!("unknown differ {other:?} (known: erofs, walking)")),
        }
    }
}

/// The Diff service's logic.
pub struct Differ {
    order: Vec<Kind>,
    /// The snapshot store's root: mounts under it with a `.erofslayer` marker are ours.
    root: PathBuf,
    content: Arc<ContentStore>,
    max_size: u64,
    /// The snapshot store, when it deduplicates: Apply then writes chunk-based
    /// layers whose chunks the store indexes.
    store: Option<Arc<snapshotter::Snapshotter>>,
}

impl Differ {
    /// Differs tried in `order`, our snapshots under `root`, blobs from the content
    /// store of the containerd at `containerd`.
    pub fn new(order: Vec<Kind>, root: &Path, containerd: &Path) -> Differ {
        Differ {
            order,
            root: root.to_path_buf(),
            content: Arc::new(ContentStore::new(containerd)),
            max_size: layer_convert::DEFAULT_MAX_SIZE,
            store: None,
        }
    }

    /// Applies through `store`'s chunk index when the store deduplicates (the same
    /// store whose root this differ serves).
    pub fn with_store(mut self, store: Arc<snapshotter::Snapshotter>) -> Differ {
        self.store = Some(store);
        self
    }

    /// Applies a layer onto mounts; returns the applied (uncompressed) descriptor.
    pub async fn apply(&self, ctx: &CallContext, req: ApplyRequest) -> Result<Descriptor> {
        let mut why = Vec::new();
        for kind in &self.order {
            let r = match kind {
                Kind::Erofs => ops::apply_erofs(self, ctx, &req).await,
                Kind::Walking => ops::apply_walking(self, ctx, &req).await,
            };
            match r {
                Err(DiffError::NotImplemented(m)) => why.push(format!("{kind:?}: {m}")),
                other => return other,
            }
        }
        Err(DiffError::NotImplemented(format!(
            "no differ applies this layer ({})",
            why.join("; ")
        )))
    }

    /// Writes the changes between two mount sets into the content store as a layer.
    pub async fn compare(&self, ctx: &CallContext, req: CompareRequest) -> Result<Descriptor> {
        let mut why = Vec::new();
        for kind in &self.order {
            let r = match kind {
                Kind::Erofs => ops::compare_erofs(self, ctx, &req).await,
                Kind::Walking => ops::compare_walking(self, ctx, &req).await,
            };
            match r {
                Err(DiffError::NotImplemented(m)) => why.push(format!("{kind:?}: {m}")),
                other => return other,
            }
        }
        Err(DiffError::NotImplemented(format!(
            "no differ compares these mounts ({})",
            why.join("; ")
        )))
    }
}
