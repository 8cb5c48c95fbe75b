//! containerd's Diff service, as an ordered list of differs.
//!
//! - **erofs**: Apply of a layer onto one of *our* active snapshots hands the blob to
//!   the store ([`snapshotter::Snapshotter::apply_layer`]), which converts it in one
//!   streaming pass (so Commit has nothing left to convert); Compare of our snapshot
//!   reads only its upper dir. The store tells which mounts are its snapshots.
//! - **walking**: Apply onto any mounts (mounted in a temporary directory, or the
//!   upper dir of a single overlay mount), Compare of any two mount sets by walking
//!   both trees.
//!
//! A differ that cannot take a request answers [`DiffError::NotImplemented`] and the
//! next one is tried; when none can, the caller sees gRPC Unimplemented and
//! containerd falls through to its own differs.

use std::path::Path;
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
    /// The snapshot store whose snapshots the erofs differ applies to and compares.
    store: Arc<snapshotter::Snapshotter>,
    content: Arc<ContentStore>,
    max_size: u64,
}

impl Differ {
    /// Differs tried in `order`, our snapshots in `store`, blobs from the content
    /// store of the containerd at `containerd`.
    pub fn new(order: Vec<Kind>, store: Arc<snapshotter::Snapshotter>, containerd: &Path) -> Differ {
        Differ {
            order,
            store,
            content: Arc::new(ContentStore::new(containerd)),
            max_size: layer_convert::DEFAULT_MAX_SIZE,
        }
    }

    /// The containerd namespace of the active snapshot `mounts` name, read from its
    /// key: containerd's metadata store names a proxy snapshotter's snapshots
    /// `<namespace>/<id>/<key>`. For containerd 1.7, whose calls to a proxy differ
    /// carry no `containerd-namespace` metadata. `None` when the mounts are not one of
    /// our active snapshots.
    pub fn namespace_of(&self, mounts: &[snapshotter::Mount]) -> Option<String> {
        let snap = self.store.active_for_mounts(mounts).ok()??;
        namespace_from_key(&snap.key)
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

/// The namespace of a snapshot key containerd's metadata store chose
/// (`<namespace>/<id>/<key>`, the namespace a valid containerd identifier and the id a
/// number); `None` for any other key.
pub fn namespace_from_key(key: &str) -> Option<String> {
    let mut parts = key.splitn(3, '/');
    let (ns, id, rest) = (parts.next()?, parts.next()?, parts.next()?);
    let id_ok = !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit());
    (id_ok && !rest.is_empty() && valid_identifier(ns)).then(|| ns.to_string())
}

/// containerd's identifier rule (`identifiers.Validate`): at most 76 characters,
/// alphanumeric runs joined by single `.`, `_` or `-`.
fn valid_identifier(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 76
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.windows(2)
            .all(|w| w[0].is_ascii_alphanumeric() || w[1].is_ascii_alphanumeric())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn namespace_from_containerd_keys() {
        assert_eq!(
            namespace_from_key("default/12/extract-1 sha256:ab").as_deref(),
            Some("default")
        );
        assert_eq!(namespace_from_key("k8s.io/3/a/b/c").as_deref(), Some("k8s.io"));
        assert_eq!(namespace_from_key("e2e-x_y/0/k").as_deref(), Some("e2e-x_y"));
        for bad in [
            "",
            "plain-key",
            "ns/12",
            "ns/12/",
            "ns/x1/k",
            "ns//k",
            "/1/k",
            "-ns/1/k",
            "n..s/1/k",
            "n s/1/k",
        ] {
            assert_eq!(namespace_from_key(bad), None, "{bad:?}");
        }
        assert_eq!(namespace_from_key(&format!("{}/1/k", "a".repeat(77))), None);
    }

    /// containerd 1.7 calls a proxy differ without its namespace: the differ finds it
    /// in the key of the snapshot the Apply's mounts name, and only for ours.
    #[test]
    fn namespace_of_our_snapshot_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let store = Arc::new(snapshotter::Snapshotter::open(&root).expect("open the store"));
        let differ = Differ::new(vec![Kind::Erofs], store.clone(), &dir.path().join("no-containerd.sock"));
        let m = store
            .prepare("ns-one/7/extract-1 sha256:00", "", BTreeMap::new())
            .unwrap();
        assert_eq!(differ.namespace_of(&m).as_deref(), Some("ns-one"));
        // a key containerd did not make: no namespace to derive
        let m = store.prepare("not-containerd", "", BTreeMap::new()).unwrap();
        assert_eq!(differ.namespace_of(&m), None);
        // mounts that are not ours
        let other = snapshotter::Mount {
            kind: "bind".into(),
            source: dir.path().display().to_string(),
            target: String::new(),
            options: vec!["rbind".into()],
        };
        assert_eq!(differ.namespace_of(&[other]), None);
        // a view is not a snapshot a layer is applied to
        let v = store.view("ns-one/8/view", "", BTreeMap::new()).unwrap();
        assert_eq!(differ.namespace_of(&v), None);
        store.shutdown();
    }
}
