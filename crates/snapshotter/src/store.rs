//! The snapshotter: containerd's snapshot semantics over directories, EROFS images
//! and a metadata database.

use std::collections::BTreeMap;
use std::path::Path;

use crate::{Error, Info, Mount, Result, Usage};

/// A snapshot store rooted in one directory. All methods block (file system work,
/// layer conversion); call them from a blocking-capable thread.
pub struct Snapshotter {}

impl Snapshotter {
    /// Opens (or creates) the store at `root`, repairing what a crash left behind and
    /// mounting every committed layer that is not mounted.
    pub fn open(_root: &Path) -> Result<Snapshotter> {
        Err(Error::Internal("in progress".into()))
    }

    /// Creates an active snapshot `key` over the committed `parent` ("" for none).
    pub fn prepare(&self, _key: &str, _parent: &str, _labels: BTreeMap<String, String>) -> Result<Vec<Mount>> {
        Err(Error::Internal("in progress".into()))
    }

    /// Creates a read-only view `key` of the committed `parent` ("" for none).
    pub fn view(&self, _key: &str, _parent: &str, _labels: BTreeMap<String, String>) -> Result<Vec<Mount>> {
        Err(Error::Internal("in progress".into()))
    }

    /// The mounts of an active snapshot or view.
    pub fn mounts(&self, _key: &str) -> Result<Vec<Mount>> {
        Err(Error::Internal("in progress".into()))
    }

    /// Commits the active snapshot `key` as `name`, converting its contents to EROFS.
    pub fn commit(&self, _name: &str, _key: &str, _labels: BTreeMap<String, String>) -> Result<()> {
        Err(Error::Internal("in progress".into()))
    }

    /// Removes a snapshot that has no children.
    pub fn remove(&self, _key: &str) -> Result<()> {
        Err(Error::Internal("in progress".into()))
    }

    /// Metadata of a snapshot.
    pub fn stat(&self, _key: &str) -> Result<Info> {
        Err(Error::Internal("in progress".into()))
    }

    /// Updates labels (`labels` or `labels.<key>` field paths; empty = all labels).
    pub fn update(&self, _info: Info, _fieldpaths: &[String]) -> Result<Info> {
        Err(Error::Internal("in progress".into()))
    }

    /// Disk usage.
    pub fn usage(&self, _key: &str) -> Result<Usage> {
        Err(Error::Internal("in progress".into()))
    }

    /// Every snapshot.
    pub fn list(&self) -> Result<Vec<Info>> {
        Err(Error::Internal("in progress".into()))
    }

    /// Removes directories, mounts and blobs no record owns.
    pub fn cleanup(&self) -> Result<()> {
        Err(Error::Internal("in progress".into()))
    }
}
