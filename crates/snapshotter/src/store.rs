//! The snapshotter: containerd's snapshot semantics over directories, EROFS images
//! and a metadata database.
//!
//! Layout under the root:
//!
//! ```text
//! metadata.redb          records: key -> {id, kind, parent, labels, times, usage}
//! snapshots/<id>/fs      upper dir of an active snapshot (unpack target)
//! snapshots/<id>/work    overlayfs work dir
//! snapshots/<id>/.erofslayer   marks our active snapshots for a differ
//! snapshots/<id>/layer.erofs   the committed layer
//! m/<id>                 where a committed layer is mounted (short: 128 of them
//!                        must fit one overlay option string)
//! staging/               new snapshot dirs before they are renamed into place, and
//!                        layers being applied before they are verified and recorded
//! blobs/<16 hex>         with dedup: shared chunk blobs, extra devices of layers
//!                        (see `blobs.rs`)
//! ```
//!
//! A *lazy* layer (see [`RemoteLayers`]) has no `layer.erofs`: its committed record
//! names a remote blob, and `m/<id>` mounts the file a fetch daemon serves for it.
//!
//! Ordering keeps every crash recoverable: directories are created before the record
//! that owns them and deleted after it; a directory, mount or blob without a record is
//! removed at start-up and by Cleanup; a committed record without its mount is
//! mounted again at start-up.
//!
//! Concurrency, as containerd's overlay snapshotter does it over bolt: every RPC
//! reads and writes its records in one redb transaction ([`crate::meta`]), and redb
//! serialises the write transactions, so a check and the write it guards cannot be
//! split by another RPC. Work that must not hold the database (conversions, mounts
//! of new layers) runs outside and is re-checked in the transaction that records it.
//! The few in-memory locks never poison (a panicking RPC fails alone):
//! - `busy`: keys a Commit or an Apply works on, which Remove and a second Commit refuse;
//! - `mount_locks`: one per layer id (striped), held to mount, re-mount or unmount
//!   `m/<id>`, with the record re-read under it, so a re-mount never races the
//!   Remove that deletes the layer;
//! - `gc`: blob collection against the pinning of a conversion's chunk view;
//! - `pending`: ids whose directory exists before their record (Cleanup leaves them).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable};
use serde::Serialize;

use dedup::{BlobId, BlobSink, SinkReport};
use erofs::writer::ChunkSink;

use crate::apply::{self, AppliedLayer, LayerBlob, LayerFormat, Written};
use crate::blobs::{self, Pins};
use crate::meta::{self, internal, now_pair, Record, RemoteLayer, TARGET_SNAPSHOT_LABEL};
use crate::{merged, mounts, Error, Info, Kind, Mount, Result, Usage};

/// Locks a mutex whether or not an earlier holder panicked: the data these locks
/// guard (sets of ids, a timestamp) stays valid across a panic, and one failed RPC
/// must not fail every later one.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A blob made available as a local file.
#[derive(Debug, Clone)]
pub struct Attached {
    /// The file the EROFS mount reads: the layer's image, or with `meta` the device its
    /// regular files' data is on.
    pub path: PathBuf,
    /// A tar-index layer: the local EROFS image (metadata only) to mount with `path` as
    /// its one extra device.
    pub meta: Option<PathBuf>,
    /// Which incarnation of the fetch daemon serves it: a mount made from an earlier
    /// one reads nothing new and must be made again.
    pub instance: u64,
    /// The blob was complete and verified when attached. A mount made before that
    /// is made again once it is: on the fanotify data path, a file opened while it
    /// was watched keeps paying for the watch on every read.
    pub complete: bool,
}

/// Where lazy layers come from: the store asks it at Prepare whether the labels
/// name a layer it can mount without downloading, and to attach blobs at mount time.
pub trait RemoteLayers: Send + Sync {
    /// The lazily mountable layer the Prepare labels name, `None` when they name
    /// none (no labels, a tar layer, ...), an error when it should be and is not.
    fn resolve(&self, labels: &BTreeMap<String, String>) -> std::result::Result<Option<RemoteLayer>, String>;
    /// Makes the blob's file available (registers it with the fetch daemon).
    fn attach(&self, layer: &RemoteLayer) -> std::io::Result<Attached>;
    /// The fetch daemon's current incarnation, `None` when it is not reachable.
    fn instance(&self) -> Option<u64>;
    /// Whether the layer's blob is complete and verified, and a mount made now would
    /// read it with nothing in the way (false when unknown).
    fn complete(&self, _layer: &RemoteLayer) -> bool {
        false
    }
    /// The blob is not needed any more (no layer names it).
    fn detach(&self, layer: &RemoteLayer);
    /// At start-up, the lazy layers the store records: whatever the source keeps for
    /// layers not among them (left by a crash between its files and the record) can go.
    fn retain(&self, _layers: &[RemoteLayer]) {}
    /// A plain (tar) layer the labels name that the source can stream from its
    /// registry, for the store to convert while it downloads; `None` (the default)
    /// lets containerd download it and our Diff service apply it.
    fn stream(&self, _labels: &BTreeMap<String, String>) -> std::result::Result<Option<StreamedLayer>, String> {
        Ok(None)
    }
}

/// A layer blob being downloaded, converted by the store as it arrives.
pub struct StreamedLayer {
    /// The blob's digest, checked once it is read.
    pub digest: String,
    /// The blob's size, checked too.
    pub size: u64,
    /// The layer's media type (tar, tar+gzip, tar+zstd).
    pub media_type: String,
    /// The uncompressed layer's digest from the image config, checked when known.
    pub diff_id: Option<String>,
    /// The blob's bytes.
    pub reader: Box<dyn std::io::Read + Send>,
}

/// How the store converts layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Store file data as chunks shared across layers.
    pub dedup: bool,
    /// The chunk size of deduplicated layers.
    pub chunk_size: layer_convert::ChunkSize,
    /// How long the store must be idle (no Prepare, View or Commit) before the
    /// unpacked trees that commits moved to `trash/` are deleted.
    pub trash_idle: Duration,
    /// Compress the file data of the layers the store writes (Apply of tar layers,
    /// Commit conversions); `None`, the default, keeps them uncompressed. Native EROFS
    /// layers are kept as they come.
    pub compression: Option<erofs::writer::Compression>,
    /// Mount the snapshots (containers' roots and views) over chains of more than
    /// `max_unmerged_layers` layers on one merged metadata image of the chain instead
    /// of one EROFS mount per layer.
    pub merge_layers: bool,
    /// With `merge_layers`: chains of at most this many layers stay per-layer.
    pub max_unmerged_layers: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            dedup: false,
            chunk_size: layer_convert::ChunkSize::DEFAULT,
            trash_idle: Duration::from_secs(10),
            compression: None,
            merge_layers: false,
            max_unmerged_layers: 1,
        }
    }
}

/// The deferred deletion of `trash/`.
///
/// Why deferred: ext4 will not reuse an inode within minutes of its deletion, and
/// skips each such inode (a buffer-cache lookup apiece) on every allocation in its
/// group. Deleting a committed layer's unpacked copy (thousands of files) while
/// containerd unpacks the next layer made each pull of a burst slower than the one
/// before (flat image family: 2.7× overlayfs's pull time, with perf showing
/// `recently_deleted` in ext4's inode allocator as the top cost). So trees wait in
/// `trash/` until the store has been idle for a while.
struct Trash {
    dir: PathBuf,
    idle: Duration,
    epoch: std::time::Instant,
    /// Milliseconds from `epoch` to the last Prepare, View or Commit.
    last_activity: AtomicU64,
}

impl Trash {
    fn touch(&self) {
        self.last_activity
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_activity.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    /// Runs until the store is dropped (its `Arc` is the only other owner).
    fn run(self: Arc<Trash>) {
        while Arc::strong_count(&self) > 1 {
            std::thread::sleep(Duration::from_millis(250).min(self.idle.max(Duration::from_millis(10))));
            if self.idle_for() < self.idle {
                continue;
            }
            let next = fs::read_dir(&self.dir)
                .ok()
                .and_then(|mut rd| rd.next())
                .and_then(|e| e.ok());
            if let Some(e) = next {
                if let Err(err) = fs::remove_dir_all(e.path()) {
                    if err.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = %e.path().display(), error = %err, "deleting trash");
                        std::thread::sleep(Duration::from_secs(5));
                    }
                }
            }
        }
    }
}

/// A deduplicating conversion in progress: the sink's lookups answer with pinned
/// blobs, which stay until the layer is recorded (or the conversion fails).
pub struct DedupSession<'a> {
    store: &'a Snapshotter,
    lookup: blobs::Lookup,
    pinned: Vec<BlobId>,
    id: BlobId,
}

impl DedupSession<'_> {
    /// Runs `convert` with a chunk sink writing this session's blob. On failure the
    /// blob is deleted.
    pub fn run<T, E>(
        &self,
        convert: impl FnOnce(&mut dyn ChunkSink) -> std::result::Result<T, E>,
    ) -> std::result::Result<(T, SinkReport), E>
    where
        E: From<std::io::Error>,
    {
        let mut sink = BlobSink::new(&self.lookup, &self.store.blob_dir(), self.id);
        match convert(&mut sink) {
            Ok(v) => match sink.finish(true) {
                Ok(r) => Ok((v, r)),
                Err(e) => {
                    let _ = fs::remove_file(blobs::path(&self.store.blob_dir(), self.id));
                    Err(e.into())
                }
            },
            Err(e) => {
                sink.discard();
                Err(e)
            }
        }
    }

    /// The chunk size to convert with.
    pub fn chunk_size(&self) -> layer_convert::ChunkSize {
        self.store.opts.chunk_size
    }
}

impl Drop for DedupSession<'_> {
    fn drop(&mut self) {
        self.store.pins.unpin(&self.pinned);
        // Blobs that lost their last reference while pinned go now.
        if let Err(e) = self.store.collect_blobs() {
            tracing::warn!(error = %e, "deleting unreferenced blobs");
        }
    }
}

/// What the store holds, for `stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreStats {
    /// Committed layers.
    pub layers: u64,
    /// File bytes of all committed dedup layers, as if nothing were shared.
    pub logical_bytes: u64,
    /// Bytes of layer images (metadata and small files).
    pub image_bytes: u64,
    /// Chunk store figures.
    #[serde(flatten)]
    pub chunks: blobs::ChunkStats,
    /// Images (`layer.erofs`) plus blobs: what the layers take on disk.
    pub stored_bytes: u64,
    /// Per chain of layers (an image's rootfs), top layer name first.
    pub chains: Vec<ChainStats>,
}

/// Sharing within one image's chain of layers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChainStats {
    /// The top committed snapshot (containerd names it by the image's chain ID).
    pub top: String,
    /// Layers in the chain.
    pub layers: u64,
    /// File bytes of the chain's layers.
    pub logical_bytes: u64,
    /// Bytes of the blobs the chain names.
    pub blob_bytes: u64,
    /// Of those, bytes in blobs that other chains name too.
    pub shared_blob_bytes: u64,
}

/// Stripes of the per-layer mount locks: ids map onto them, so the table never grows.
const MOUNT_STRIPES: usize = 64;

/// The active snapshot a set of mounts names (what a differ is handed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveSnapshot {
    /// The snapshot's key.
    pub key: String,
    /// Its upper dir: everything the snapshot changed.
    pub upper: PathBuf,
    /// The committed layers below it, nearest first, as the mounts name them.
    pub lowers: Vec<PathBuf>,
}

/// A snapshot store rooted in one directory. All methods block (file system work,
/// layer conversion); call them from a blocking-capable thread.
pub struct Snapshotter {
    root: PathBuf,
    db: Database,
    opts: StoreOptions,
    pins: Pins,
    trash: Arc<Trash>,
    remote: Option<Arc<dyn RemoteLayers>>,
    /// Keys a Commit or an Apply is working on.
    busy: Mutex<HashSet<String>>,
    /// Ids whose directory (and maybe mount) exists before their record does.
    pending: Mutex<HashSet<u64>>,
    /// Held to mount or unmount `m/<id>` (striped by id).
    mount_locks: Vec<Mutex<()>>,
    /// Blob collection against the pinning of a conversion's view of the chunks.
    gc: Mutex<()>,
    /// Lazy layers mounted by this process: id -> fetch daemon instance.
    attached: Mutex<HashMap<u64, u64>>,
    /// Lazy layers mounted before their blob was complete (see [`Attached::complete`]).
    incomplete: Mutex<HashSet<u64>>,
    /// Names staged files uniquely within this process.
    seq: AtomicU64,
    /// Held to build, mount, take a user of, or remove `merged/<id>` (striped by id).
    merge_locks: Vec<Mutex<()>>,
    /// Merged images mounted at `mm/<id>`.
    merged_mounted: Mutex<HashSet<u64>>,
    /// Chains found unmergeable (compressed data, too many devices): per-layer for good.
    unmergeable: Mutex<HashSet<u64>>,
}

/// Removes a key from `busy` (or an id from `pending`) when the work ends, however it ends.
struct Claim<'a, T: std::hash::Hash + Eq + Clone> {
    set: &'a Mutex<HashSet<T>>,
    item: T,
}

impl<'a, T: std::hash::Hash + Eq + Clone> Claim<'a, T> {
    fn take(set: &'a Mutex<HashSet<T>>, item: T) -> Option<Claim<'a, T>> {
        lock(set).insert(item.clone()).then_some(Claim { set, item })
    }
}

impl<T: std::hash::Hash + Eq + Clone> Drop for Claim<'_, T> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.item);
    }
}

impl Snapshotter {
    /// Opens (or creates) the store at `root`, repairing what a crash left behind and
    /// mounting every committed layer that is not mounted.
    pub fn open(root: &Path) -> Result<Snapshotter> {
        Self::open_with(root, StoreOptions::default())
    }

    /// [`Snapshotter::open`] with options.
    pub fn open_with(root: &Path, opts: StoreOptions) -> Result<Snapshotter> {
        Self::open_with_remote(root, opts, None)
    }

    /// [`Snapshotter::open_with`], with lazily fetched layers from `remote`.
    pub fn open_with_remote(
        root: &Path,
        opts: StoreOptions,
        remote: Option<Arc<dyn RemoteLayers>>,
    ) -> Result<Snapshotter> {
        for d in ["snapshots", "m", "staging", "trash", "blobs", "merged", "mm"] {
            fs::create_dir_all(root.join(d)).map_err(internal)?;
        }
        fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(internal)?;
        let db = Database::create(root.join("metadata.redb")).map_err(internal)?;
        meta::migrate(&db)?;
        meta::write(&db, |txn| {
            txn.open_table(blobs::BLOBS).map_err(internal)?;
            txn.open_table(blobs::CHUNKS).map_err(internal)?;
            txn.open_table(blobs::BLOB_CHUNKS).map_err(internal)?;
            Ok(())
        })?;
        let s = Snapshotter {
            root: root.to_path_buf(),
            db,
            opts,
            pins: Pins::default(),
            trash: Arc::new(Trash {
                dir: root.join("trash"),
                idle: opts.trash_idle,
                epoch: std::time::Instant::now(),
                last_activity: AtomicU64::new(0),
            }),
            remote,
            busy: Mutex::default(),
            pending: Mutex::default(),
            mount_locks: (0..MOUNT_STRIPES).map(|_| Mutex::new(())).collect(),
            gc: Mutex::new(()),
            attached: Mutex::default(),
            incomplete: Mutex::default(),
            seq: AtomicU64::new(0),
            merge_locks: (0..MOUNT_STRIPES).map(|_| Mutex::new(())).collect(),
            merged_mounted: Mutex::default(),
            unmergeable: Mutex::default(),
        };
        s.repair()?;
        let trash = s.trash.clone();
        std::thread::Builder::new()
            .name("trash".into())
            .spawn(move || trash.run())
            .map_err(internal)?;
        Ok(s)
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn mountpoint(&self, id: u64) -> PathBuf {
        self.root.join("m").join(id.to_string())
    }

    fn blob_dir(&self) -> PathBuf {
        self.root.join("blobs")
    }

    /// A new file name under `staging/` for work on snapshot `id`.
    fn staging_file(&self, what: &str, id: u64) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.root.join("staging").join(format!("{what}-{id}-{n}.erofs"))
    }

    /// A directory for a differ's temporary mounts; emptied at start-up.
    pub fn scratch_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// The options the store was opened with.
    pub fn options(&self) -> StoreOptions {
        self.opts
    }

    fn mount_lock(&self, id: u64) -> MutexGuard<'_, ()> {
        lock(&self.mount_locks[(id % MOUNT_STRIPES as u64) as usize])
    }

    /// Mounts a committed layer with its blobs as devices. Call with its mount lock.
    fn mount_layer(&self, rec: &Record) -> std::io::Result<()> {
        if let Some(layer) = &rec.remote {
            let remote = self.remote.as_ref().ok_or_else(|| {
                std::io::Error::other(format!(
                    "layer {} is lazy but no fetch daemon is configured",
                    layer.digest
                ))
            })?;
            let a = remote.attach(layer)?;
            match &a.meta {
                Some(meta) => {
                    mounts::mount_erofs_with_devices(meta, std::slice::from_ref(&a.path), &self.mountpoint(rec.id))?
                }
                None => mounts::mount_erofs_with_devices(&a.path, &[], &self.mountpoint(rec.id))?,
            }
            lock(&self.attached).insert(rec.id, a.instance);
            if a.complete {
                lock(&self.incomplete).remove(&rec.id);
            } else {
                lock(&self.incomplete).insert(rec.id);
            }
            return Ok(());
        }
        let image = self.dir(rec.id).join("layer.erofs");
        let devices: Vec<PathBuf> = rec.blobs.iter().map(|b| blobs::path(&self.blob_dir(), *b)).collect();
        mounts::mount_erofs_with_devices(&image, &devices, &self.mountpoint(rec.id))
    }

    /// Starts a deduplicating conversion, or `None` when the store does not dedup.
    /// Every blob recorded now is pinned until the session is dropped, and a new blob
    /// id is reserved for the layer's own chunks.
    pub fn dedup_session(&self) -> Result<Option<DedupSession<'_>>> {
        if !self.opts.dedup {
            return Ok(None);
        }
        let id = meta::write(&self.db, |txn| meta::next_counter(txn, "next_blob"))?;
        // No collection decides between the view and the pins.
        let _g = lock(&self.gc);
        let lookup = blobs::Lookup::new(self.db.begin_read().map_err(internal)?)?;
        let pinned = self.pins.pin(lookup.blobs().chain([id]));
        Ok(Some(DedupSession {
            store: self,
            lookup,
            pinned,
            id,
        }))
    }

    /// Deletes unreferenced, unpinned blobs: records first, files after.
    fn collect_blobs(&self) -> Result<()> {
        let _g = lock(&self.gc);
        let dead = meta::write(&self.db, |txn| blobs::collect(txn, &self.pins))?;
        for id in dead {
            let p = blobs::path(&self.blob_dir(), id);
            if let Err(e) = fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "removing a blob");
                }
            }
        }
        Ok(())
    }

    /// What the store holds: layers, logical and stored bytes, chunks, sharing per
    /// image chain.
    pub fn stats(&self) -> Result<StoreStats> {
        meta::read(&self.db, |r| {
            let records = r.all()?;
            let txn = r.txn();
            let chunks = blobs::stats(txn)?;
            let sizes: BTreeMap<BlobId, u64> = {
                let t = txn.open_table(blobs::BLOBS).map_err(internal)?;
                let mut m = BTreeMap::new();
                for item in t.iter().map_err(internal)? {
                    let (k, v) = item.map_err(internal)?;
                    let r: blobs::BlobRecord = serde_json::from_slice(v.value()).map_err(internal)?;
                    m.insert(k.value(), u64::from(r.blocks) * dedup::BLOCK_SIZE);
                }
                m
            };
            Ok(chain_stats(&records, chunks, &sizes))
        })
    }

    /// The active snapshot `mounts` name, as a differ receives them: a bind of its
    /// `fs/` (no parent) or an overlay whose `upperdir` is its `fs/`. `None` for
    /// mounts that are not one of this store's active snapshots.
    pub fn active_for_mounts(&self, mounts: &[Mount]) -> Result<Option<ActiveSnapshot>> {
        let [m] = mounts else { return Ok(None) };
        let option = |key: &str| {
            m.options
                .iter()
                .find_map(|o| o.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        };
        let (upper, lowers) = match m.kind.as_str() {
            "bind" | "rbind" => (PathBuf::from(&m.source), Vec::new()),
            "overlay" => match option("upperdir") {
                Some(u) => (
                    PathBuf::from(u),
                    option("lowerdir")
                        .map(|l| l.split(':').map(PathBuf::from).collect())
                        .unwrap_or_default(),
                ),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        let snapshots = self.root.join("snapshots");
        let id = match (upper.file_name(), upper.parent()) {
            (Some(f), Some(dir)) if f == "fs" && dir.parent() == Some(snapshots.as_path()) => dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u64>().ok()),
            _ => None,
        };
        let Some(id) = id else { return Ok(None) };
        meta::read(&self.db, |r| {
            let Some(key) = r.key_of(id)? else { return Ok(None) };
            let rec = r.get_existing(&key)?;
            Ok((rec.kind == Kind::Active).then_some(ActiveSnapshot { key, upper, lowers }))
        })
    }

    /// Whether Commit of the active snapshot `key` will convert its upper dir (no
    /// layer was applied to it).
    pub fn commit_converts(&self, key: &str) -> bool {
        meta::read(&self.db, |r| r.get_existing(key))
            .is_ok_and(|rec| rec.kind == Kind::Active && !self.dir(rec.id).join("layer.erofs").exists())
    }

    /// The key of the snapshot whose directory is `snapshots/<id>`; `None` when no
    /// record has that id.
    pub fn key_of_id(&self, id: u64) -> Result<Option<String>> {
        meta::read(&self.db, |r| r.key_of(id))
    }

    fn create(&self, kind: Kind, key: &str, parent: &str, labels: BTreeMap<String, String>) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("snapshot key must not be empty".into()));
        }
        self.trash.touch();
        tracing::debug!(key, parent, ?labels, "create");
        if kind == Kind::Active {
            if let Some(target) = labels.get(TARGET_SNAPSHOT_LABEL) {
                match self.try_lazy(key, parent, target, &labels) {
                    Ok(true) => return Err(Error::AlreadyExists(format!("snapshot {target:?}"))),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(target, error = %e, "lazy layer failed; containerd will download it"),
                }
            }
        }
        self.refresh_lazy(parent)?;
        // Built (or found) before the transaction, and held until the record naming it
        // is written, so that no Remove deletes it in between.
        let merge = self.merge_for(parent, &labels);
        let mut made: Option<(u64, Claim<'_, u64>)> = None;
        let mut uses_merged = false;
        let res = meta::write(&self.db, |txn| {
            if meta::get_w(txn, key)?.is_some() {
                return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
            }
            let parents: Vec<u64> = meta::committed_chain(txn, parent)?.iter().map(|(_, r)| r.id).collect();
            let id = meta::next_counter(txn, "next_id")?;
            let claim = Claim::take(&self.pending, id).ok_or_else(|| Error::Internal(format!("id {id} in use")))?;
            made = Some((id, claim));
            // The directory goes into place before the record that owns it exists.
            self.stage_dir(id, &parents).map_err(internal)?;
            let mut rec = Record::new(id, kind, parent, labels);
            // The chain may have been removed and made again since the merge.
            rec.merged = merge.as_ref().map(|(m, _)| *m).filter(|m| parents.first() == Some(m));
            uses_merged = rec.merged.is_some();
            meta::put(txn, key, None, &rec)?;
            Ok(self.mounts_of(&rec, &parents))
        });
        if res.is_err() {
            if let Some((id, _)) = &made {
                let _ = fs::remove_dir_all(self.dir(*id));
            }
        }
        if let Some((m, guard)) = merge {
            drop(guard);
            if !uses_merged || res.is_err() {
                self.release_merged(m, parent);
            }
        }
        res
    }

    fn merge_lock(&self, id: u64) -> MutexGuard<'_, ()> {
        lock(&self.merge_locks[(id % MOUNT_STRIPES as u64) as usize])
    }

    /// The merged image a new snapshot over `parent` should mount, built and mounted if
    /// it is not yet, with its lock held: `None` keeps the snapshot per-layer.
    ///
    /// Merged: chains of more than `max_unmerged_layers` committed layers, when the
    /// store merges at all, for snapshots that are not a layer being unpacked (those
    /// carry containerd's target label, and only their upper dir matters). Lazy layers
    /// are served through the fetch daemon and stay per-layer; so does a chain that
    /// cannot be merged (compressed data, too many devices), said once in the log.
    fn merge_for(&self, parent: &str, labels: &BTreeMap<String, String>) -> Option<(u64, MutexGuard<'_, ()>)> {
        if !self.opts.merge_layers || parent.is_empty() || labels.contains_key(TARGET_SNAPSHOT_LABEL) {
            return None;
        }
        let chain = meta::read(&self.db, |r| r.parents(parent)).ok()?;
        if chain.len() <= self.opts.max_unmerged_layers || chain.iter().any(|(_, r)| r.remote.is_some()) {
            return None;
        }
        let top = chain.first()?.1.id;
        if lock(&self.unmergeable).contains(&top) {
            return None;
        }
        let guard = self.merge_lock(top);
        if lock(&self.merged_mounted).contains(&top) {
            return Some((top, guard));
        }
        match self.make_merged(top, &chain) {
            Ok(()) => Some((top, guard)),
            Err(e) => {
                tracing::warn!(
                    parent,
                    layers = chain.len(),
                    error = %e,
                    "cannot merge the chain's metadata: its snapshots mount the layers one by one"
                );
                lock(&self.unmergeable).insert(top);
                merged::remove(&self.root, top);
                None
            }
        }
    }

    /// Mounts the merged image of `chain` (nearest first, topped by `top`): the one in
    /// `merged/` when it checks out, else a new one. Call with its merge lock.
    fn make_merged(&self, top: u64, chain: &[(String, Record)]) -> std::result::Result<(), String> {
        let devices = match merged::check(&self.root, top) {
            Ok(d) => d,
            Err(why) => {
                if merged::dir(&self.root, top).exists() {
                    tracing::warn!(top, why, "merged image refused: building it again");
                }
                let layers = self.layers_of(chain);
                let n = self.seq.fetch_add(1, Ordering::Relaxed);
                let staging = self.root.join("staging").join(format!("merged-{top}-{n}"));
                let t = std::time::Instant::now();
                merged::build(&self.root, &staging, top, &layers)?;
                tracing::info!(
                    top,
                    layers = layers.len(),
                    ms = t.elapsed().as_millis() as u64,
                    "merged metadata built"
                );
                merged::check(&self.root, top)?
            }
        };
        merged::mount(&self.root, top, &devices).map_err(|e| format!("mounting the merged image: {e}"))?;
        lock(&self.merged_mounted).insert(top);
        Ok(())
    }

    /// Writes a VMDK descriptor at `out` for the committed snapshot `key`: one flat block
    /// device made of the chain's merged metadata, then each device it names, which VM
    /// runtimes attach and mount as EROFS with no extra devices. The metadata is written
    /// beside `out` (its extension made `.erofs`) and belongs to the caller; it is a copy
    /// of the store's merged image when that exists, else built. The layer images and
    /// blobs the descriptor names belong to the store and live as long as `key`.
    /// Returns the metadata image and the devices.
    pub fn vmdk(&self, key: &str, out: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
        let chain = meta::read(&self.db, |r| {
            let key = match r.get(key)? {
                Some(_) => key.to_string(),
                // containerd's name for it: its metadata keys snapshots `<namespace>/<n>/<name>`.
                None => {
                    let suffix = format!("/{key}");
                    let found: Vec<String> = r
                        .all()?
                        .into_iter()
                        .filter(|(k, rec)| rec.kind == Kind::Committed && k.ends_with(&suffix))
                        .map(|(k, _)| k)
                        .collect();
                    match found.as_slice() {
                        [one] => one.clone(),
                        [] => return Err(Error::NotFound(format!("snapshot {key:?}"))),
                        many => {
                            return Err(Error::InvalidArgument(format!(
                                "{key:?} names {} snapshots: {many:?}",
                                many.len()
                            )))
                        }
                    }
                }
            };
            let key = key.as_str();
            let rec = r.get_existing(key)?;
            if rec.kind != Kind::Committed {
                return Err(Error::FailedPrecondition(format!("snapshot {key:?} is not committed")));
            }
            r.parents(key)
        })?;
        if chain.iter().any(|(_, r)| r.remote.is_some()) {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} has lazily fetched layers, which a VMDK cannot name"
            )));
        }
        let image = out.with_extension("erofs");
        if image == out {
            return Err(Error::InvalidArgument(format!(
                "{}: the descriptor needs a name other than its metadata's",
                out.display()
            )));
        }
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            image.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            std::process::id()
        ));
        let top = chain[0].1.id;
        let res = (|| {
            let existing = {
                let _g = self.merge_lock(top);
                match merged::check(&self.root, top) {
                    Ok(devices) => {
                        fs::copy(merged::dir(&self.root, top).join("fsmeta.erofs"), &tmp).map_err(internal)?;
                        Some(devices)
                    }
                    Err(_) => None,
                }
            };
            let devices = match existing {
                Some(d) => d,
                None => {
                    fsmeta::merge_with(&self.layers_of(&chain), &tmp, true)
                        .map_err(|e| match e {
                            fsmeta::Error::Unmergeable { .. } => Error::FailedPrecondition(e.to_string()),
                            e => Error::Internal(e.to_string()),
                        })?
                        .devices
                }
            };
            fs::rename(&tmp, &image).map_err(internal)?;
            fsmeta::write_vmdk(out, &image, &devices).map_err(internal)?;
            Ok((image.clone(), devices))
        })();
        let _ = fs::remove_file(&tmp);
        res
    }

    /// The layers of `chain` (nearest first) as the merge takes them: bottom first.
    fn layers_of(&self, chain: &[(String, Record)]) -> Vec<fsmeta::Layer> {
        chain
            .iter()
            .rev()
            .map(|(_, r)| fsmeta::Layer {
                image: self.dir(r.id).join("layer.erofs"),
                devices: r.blobs.iter().map(|b| blobs::path(&self.blob_dir(), *b)).collect(),
            })
            .collect()
    }

    /// Deletes the merged image `id` of `parent`'s chain unless a snapshot still uses it.
    fn release_merged(&self, id: u64, parent: &str) {
        let _g = self.merge_lock(id);
        match meta::read(&self.db, |r| r.merged_in_use(parent, id)) {
            Ok(false) => {
                merged::remove(&self.root, id);
                lock(&self.merged_mounted).remove(&id);
            }
            Ok(true) => {}
            Err(e) => tracing::warn!(id, error = %e, "keeping a merged image"),
        }
    }

    /// The lazy path of Prepare: when the labels name a layer the remote source can
    /// mount without its data, commit it (mounted from the fetch daemon's file) and
    /// say so (`true`); `false` lets the normal path run.
    ///
    /// The committed snapshot is named by the Prepare's key, which containerd made
    /// unique and namespaced; containerd finds it by its `containerd.io/snapshot.ref`
    /// label (the `target`) and its parent.
    fn try_lazy(&self, key: &str, parent: &str, target: &str, labels: &BTreeMap<String, String>) -> Result<bool> {
        let Some(remote) = &self.remote else { return Ok(false) };
        if meta::read(&self.db, |r| r.find_target(parent, target))?.is_some() {
            return Ok(true);
        }
        let layer = match remote.resolve(labels) {
            Ok(Some(l)) => l,
            Ok(None) => {
                return match remote.stream(labels) {
                    Ok(Some(streamed)) => self.stream_layer(key, parent, target, labels, streamed),
                    Ok(None) => {
                        tracing::debug!(target, ?labels, "not a lazy layer");
                        Ok(false)
                    }
                    Err(e) => Err(Error::Unavailable(e)),
                };
            }
            Err(e) => return Err(Error::Unavailable(e)),
        };
        let parents = self.committed_parents(parent)?;
        let (id, _claim) = self.new_id()?;
        // As in Commit: directory, then mount, then record; start-up removes what a
        // crash leaves without a record.
        self.stage_dir(id, &parents).map_err(internal)?;
        let mut rec = Record::new(id, Kind::Committed, parent, labels.clone());
        rec.size = layer.size as i64;
        rec.remote = Some(layer.clone());
        let mounted = {
            let _m = self.mount_lock(id);
            self.mount_layer(&rec)
        };
        if let Err(e) = mounted {
            self.remove_files(id);
            return Err(Error::Unavailable(format!("mounting lazy layer {}: {e}", layer.digest)));
        }
        // The inode count is in the superblock, which the mount has read already.
        rec.inodes = rustix::fs::statfs(self.mountpoint(id)).map_or(0, |st| st.f_files as i64);
        match self.record_prepared(key, target, &rec, None) {
            Ok(()) => {
                tracing::info!(key, target, digest = %layer.digest, id, "lazy layer committed");
                Ok(true)
            }
            // Another Prepare made it meanwhile: theirs stands.
            Err(Error::AlreadyExists(_)) => {
                lock(&self.attached).remove(&id);
                self.remove_files(id);
                Ok(true)
            }
            Err(e) => {
                lock(&self.attached).remove(&id);
                self.remove_files(id);
                Err(e)
            }
        }
    }

    /// The streamed path of Prepare: the layer is downloaded by us and converted as
    /// it arrives (download, inflate and conversion overlap), then committed as
    /// `key`, as the lazy path does. containerd then downloads nothing for it.
    ///
    /// Nothing is recorded until the blob and diffID digests are checked and the
    /// layer is mounted; any failure removes what was written, and `Err` lets
    /// containerd pull the layer the usual way.
    fn stream_layer(
        &self,
        key: &str,
        parent: &str,
        target: &str,
        labels: &BTreeMap<String, String>,
        layer: StreamedLayer,
    ) -> Result<bool> {
        let started = std::time::Instant::now();
        let parents = self.committed_parents(parent)?;
        let (id, _claim) = self.new_id()?;
        self.stage_dir(id, &parents).map_err(internal)?;
        let digest = layer.digest.clone();
        let blob = LayerBlob {
            reader: layer.reader,
            format: LayerFormat::Tar,
            media_type: layer.media_type,
            digest: layer.digest,
            size: Some(layer.size),
            diff_id: layer.diff_id,
            max_size: layer_convert::DEFAULT_MAX_SIZE,
        };
        let image = self.dir(id).join("layer.erofs");
        let session = self.dedup_session().inspect_err(|_| self.remove_files(id))?;
        let lowers = self.lowers_of(&parents);
        let written = match apply::write_tar(blob, &image, session.as_ref(), &self.opts, lowers) {
            Ok(w) => w,
            Err(e) => {
                self.remove_files(id);
                return Err(match e {
                    Error::InvalidArgument(m) | Error::Internal(m) => {
                        Error::Unavailable(format!("streaming layer {digest}: {m}"))
                    }
                    e => e,
                });
            }
        };
        let fail = |e: Error| {
            apply::discard(&image, written.sink.as_ref());
            self.remove_files(id);
            e
        };
        if written.sink.is_some() {
            fsync_dir(&self.blob_dir()).map_err(|e| fail(internal(e)))?;
        }
        let inodes = image_inodes(&image).map_err(fail)?;
        let mut rec = Record::new(id, Kind::Committed, parent, labels.clone());
        rec.size = written.image_size as i64;
        rec.inodes = inodes;
        rec.blobs = written.sink.as_ref().map(|s| s.devices.clone()).unwrap_or_default();
        rec.logical = written.sink.as_ref().map_or(0, |s| s.logical_bytes);
        {
            let _m = self.mount_lock(id);
            self.mount_layer(&rec)
        }
        .map_err(|e| fail(Error::Internal(format!("mounting {}: {e}", image.display()))))?;
        let res = self.record_prepared(key, target, &rec, written.sink.as_ref());
        drop(session);
        match res {
            Ok(()) => {
                tracing::info!(
                    key,
                    target,
                    %digest,
                    id,
                    seconds = started.elapsed().as_secs_f64(),
                    "streamed layer committed"
                );
                Ok(true)
            }
            // Another Prepare made it meanwhile: theirs stands.
            Err(Error::AlreadyExists(_)) => {
                let _ = fail(Error::Internal(String::new()));
                Ok(true)
            }
            Err(e) => Err(fail(e)),
        }
    }

    /// A new snapshot id, for a layer whose record is written only once it is ready;
    /// Cleanup leaves its files alone while the claim lives.
    fn new_id(&self) -> Result<(u64, Claim<'_, u64>)> {
        let id = meta::write(&self.db, |txn| meta::next_counter(txn, "next_id"))?;
        let claim = Claim::take(&self.pending, id).ok_or_else(|| Error::Internal(format!("id {id} in use")))?;
        Ok((id, claim))
    }

    /// Records a layer made at Prepare (lazy or streamed) as committed `key`, with the
    /// blobs it names; AlreadyExists when another Prepare made the same target meanwhile.
    fn record_prepared(&self, key: &str, target: &str, rec: &Record, blobs: Option<&SinkReport>) -> Result<()> {
        meta::write(&self.db, |txn| {
            if meta::find_target_w(txn, &rec.parent, target)?.is_some() {
                return Err(Error::AlreadyExists(format!("snapshot {target:?}")));
            }
            if meta::get_w(txn, key)?.is_some() {
                return Err(Error::Internal(format!("snapshot {key:?} exists")));
            }
            meta::check_parent(meta::get_w(txn, &rec.parent)?.as_ref(), &rec.parent)?;
            if let Some(report) = blobs {
                blobs::record(txn, report)?;
            }
            meta::put(txn, key, None, rec)
        })
    }

    /// The ids of `parent`'s chain, checking that it is committed, with its lazy
    /// layers mounted from the running fetch daemon.
    fn committed_parents(&self, parent: &str) -> Result<Vec<u64>> {
        let chain = meta::read(&self.db, |r| {
            meta::check_parent(r.get(parent)?.as_ref(), parent)?;
            r.parents(parent)
        })?;
        self.refresh_chain(&chain)?;
        Ok(chain.iter().map(|(_, r)| r.id).collect())
    }

    /// [`Self::refresh_chain`] for `parent`'s chain.
    fn refresh_lazy(&self, parent: &str) -> Result<()> {
        if self.remote.is_none() || parent.is_empty() {
            return Ok(());
        }
        let chain = match meta::read(&self.db, |r| r.parents(parent)) {
            Ok(c) => c,
            // A missing parent is the caller's error to report.
            Err(_) => return Ok(()),
        };
        self.refresh_chain(&chain)
    }

    /// Re-mounts the lazy layers of a chain whose mount was made from a fetch daemon
    /// that has since restarted (such a mount cannot read anything not already
    /// cached by the kernel), or before their blob was complete when it is now (a
    /// fresh mount reads the local file with nothing in the way). Running containers
    /// keep the old mount (their overlay holds it); new snapshots get the fresh one at
    /// the same place.
    fn refresh_chain(&self, chain: &[(String, Record)]) -> Result<()> {
        let Some(remote) = &self.remote else { return Ok(()) };
        let lazy: Vec<&(String, Record)> = chain.iter().filter(|(_, r)| r.remote.is_some()).collect();
        if lazy.is_empty() {
            return Ok(());
        }
        let Some(now) = remote.instance() else {
            return Err(Error::Unavailable("the fetch daemon does not answer".into()));
        };
        for (key, rec) in lazy {
            let completed =
                || lock(&self.incomplete).contains(&rec.id) && rec.remote.as_ref().is_some_and(|l| remote.complete(l));
            if lock(&self.attached).get(&rec.id).copied() == Some(now) && !completed() {
                continue;
            }
            let _m = self.mount_lock(rec.id);
            // Under the mount lock: a Remove that deleted the record meanwhile has
            // unmounted it (or will, after us); either way it must not come back.
            let current = meta::read(&self.db, |r| r.get(key))?;
            if current.as_ref().map(|r| r.id) != Some(rec.id) {
                continue;
            }
            let mounted = lock(&self.attached).get(&rec.id).copied();
            if mounted == Some(now) {
                if !completed() {
                    continue;
                }
                tracing::info!(id = rec.id, "lazy layer complete: mounting it again on the local file");
            } else {
                tracing::warn!(
                    id = rec.id,
                    ?mounted,
                    now,
                    "fetch daemon restarted: mounting the lazy layer again"
                );
            }
            let mp = self.mountpoint(rec.id);
            mounts::unmount(&mp).map_err(internal)?;
            self.mount_layer(rec)
                .map_err(|e| Error::Unavailable(format!("mounting lazy layer {}: {e}", mp.display())))?;
        }
        Ok(())
    }

    /// Makes `snapshots/<id>` with `fs`, `work` and the marker, via `staging/`.
    fn stage_dir(&self, id: u64, parents: &[u64]) -> std::io::Result<()> {
        let staged = self.root.join("staging").join(id.to_string());
        let _ = fs::remove_dir_all(&staged);
        fs::create_dir(&staged)?;
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o700))?;
        fs::create_dir(staged.join("fs"))?;
        fs::set_permissions(staged.join("fs"), fs::Permissions::from_mode(0o755))?;
        fs::create_dir(staged.join("work"))?;
        fs::set_permissions(staged.join("work"), fs::Permissions::from_mode(0o711))?;
        fs::write(staged.join(MARKER), b"")?;
        // As containerd's overlayfs does: the upper root takes the owner of the layer
        // below, so a chown'd image root stays chown'd in its containers.
        if let Some(&p) = parents.first() {
            let md = fs::metadata(self.mountpoint(p))?;
            rustix::fs::chown(
                staged.join("fs"),
                Some(rustix::fs::Uid::from_raw(md.uid())),
                Some(rustix::fs::Gid::from_raw(md.gid())),
            )?;
        }
        fs::rename(&staged, self.dir(id))
    }

    /// The committed layers `parents` (nearest first) as a converter's lower layers: their
    /// mounts, so that a layer's implied directories keep the attributes the stack below
    /// shows, as containerd's applier keeps them.
    fn lowers_of(&self, parents: &[u64]) -> layer_convert::Lowers {
        layer_convert::Lowers::dirs(parents.iter().map(|p| self.mountpoint(*p)).collect())
    }

    fn mounts_of(&self, rec: &Record, parents: &[u64]) -> Vec<Mount> {
        let fs_dir = self.dir(rec.id).join("fs");
        let lowers: Vec<PathBuf> = match rec.merged {
            Some(m) => vec![merged::mountpoint(&self.root, m)],
            None => parents.iter().map(|p| self.mountpoint(*p)).collect(),
        };
        let work = self.dir(rec.id).join("work");
        mounts::for_snapshot(rec.kind, &fs_dir, &work, &lowers)
    }

    /// Creates an active snapshot `key` over the committed `parent` ("" for none).
    pub fn prepare(&self, key: &str, parent: &str, labels: BTreeMap<String, String>) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    /// Creates a read-only view `key` of the committed `parent` ("" for none).
    pub fn view(&self, key: &str, parent: &str, labels: BTreeMap<String, String>) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    /// The mounts of an active snapshot or view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let (rec, chain) = meta::read(&self.db, |r| {
            let rec = r.get_existing(key)?;
            if rec.kind == Kind::Committed {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is committed, not active or a view"
                )));
            }
            let chain = r.parents(&rec.parent)?;
            Ok((rec, chain))
        })?;
        self.refresh_chain(&chain)?;
        let parents: Vec<u64> = chain.iter().map(|(_, r)| r.id).collect();
        Ok(self.mounts_of(&rec, &parents))
    }

    /// Claims the active snapshot `key` for a Commit or an Apply: FailedPrecondition
    /// while another one works on it. Checked in a write transaction (aborted, it
    /// writes nothing), so a Remove either comes first (NotFound here) or sees the claim.
    fn claim_active(&self, key: &str, what: &str) -> Result<(Record, Claim<'_, String>)> {
        let claim = Claim::take(&self.busy, key.to_string())
            .ok_or_else(|| Error::FailedPrecondition(format!("snapshot {key:?} is being committed or applied to")))?;
        let rec = meta::check(&self.db, |txn| meta::get_existing_w(txn, key))?;
        if rec.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "cannot {what} snapshot {key:?}: it is not active"
            )));
        }
        Ok((rec, claim))
    }

    /// Applies a layer blob to the active snapshot `key`: the store converts (tar)
    /// or copies (EROFS) it into a staging file, verifies it against its digests,
    /// records the chunks it names and renames it into the snapshot, where Commit
    /// finds it instead of converting the upper dir. Nothing of a failed Apply stays.
    pub fn apply_layer(&self, key: &str, blob: LayerBlob) -> Result<AppliedLayer> {
        self.trash.touch();
        let (rec, _claim) = self.claim_active(key, "apply a layer to")?;
        let staged = self.staging_file("apply", rec.id);
        let session = match blob.format {
            LayerFormat::Tar => self.dedup_session()?,
            LayerFormat::Erofs { .. } => None,
        };
        let written: Written = match blob.format {
            LayerFormat::Tar => {
                let lowers = self.lowers_of(&self.committed_parents(&rec.parent)?);
                apply::write_tar(blob, &staged, session.as_ref(), &self.opts, lowers)?
            }
            LayerFormat::Erofs { zstd } => apply::write_native(blob, &staged, zstd)?,
        };
        if written.sink.is_some() {
            fsync_dir(&self.blob_dir()).map_err(internal)?;
        }
        // Recorded before the rename: a crash in between leaves extra references on
        // a snapshot that has no layer yet, freed with it.
        let res = meta::write(&self.db, |txn| {
            let old = meta::get_existing_w(txn, key)?;
            if old.id != rec.id || old.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} changed during apply"
                )));
            }
            let mut new = old.clone();
            if let Some(report) = &written.sink {
                blobs::record(txn, report)?;
                new.blobs = report.devices.clone();
                new.logical = report.logical_bytes;
            } else {
                new.blobs.clear();
                new.logical = 0;
            }
            // References an earlier Apply to this snapshot recorded go.
            blobs::release(txn, &old.blobs)?;
            meta::put(txn, key, Some(&old), &new)
        })
        .and_then(|()| {
            fs::rename(&staged, self.dir(rec.id).join("layer.erofs")).map_err(internal)?;
            fsync_dir(&self.dir(rec.id)).map_err(internal)
        });
        if let Err(e) = res {
            apply::discard(&staged, written.sink.as_ref());
            return Err(e);
        }
        drop(session);
        if !rec.blobs.is_empty() {
            self.collect_blobs()?;
        }
        Ok(written.applied)
    }

    /// Commits the active snapshot `key` as `name`. Unless a layer was applied to
    /// it, the upper dir is converted to EROFS first (outside any transaction: other
    /// snapshots go on meanwhile).
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("snapshot name must not be empty".into()));
        }
        self.trash.touch();
        let (rec, _claim) = self.claim_active(key, "commit")?;
        if meta::read(&self.db, |r| r.get(name))?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
        }
        self.commit_inner(name, key, labels, rec)
    }

    fn commit_inner(&self, name: &str, key: &str, labels: BTreeMap<String, String>, rec: Record) -> Result<()> {
        let dir = self.dir(rec.id);
        let blob = dir.join("layer.erofs");
        // Kept alive until the layer is recorded: its pins protect the blobs it names.
        let mut session = None;
        let mut converted: Option<SinkReport> = None;
        if !blob.exists() {
            let mut uuid = [0u8; 16];
            uuid[..8].copy_from_slice(&rec.id.to_le_bytes());
            let opts = layer_convert::Options {
                // as the differ's Apply: block-aligned file data, a dense inode area
                inline_data: false,
                build_time: 0,
                uuid: Some(uuid),
                fsync: true,
                chunk_size: self.opts.chunk_size,
                compress: self.opts.compression,
                ..Default::default()
            };
            let conv_err =
                |e: layer_convert::Error| Error::Internal(format!("converting snapshot {key:?} to EROFS: {e}"));
            // Written in `staging/` and renamed into place: a crash mid-way leaves
            // nothing in the snapshot's directory.
            let staged = self.staging_file("commit", rec.id);
            session = self.dedup_session()?;
            match &session {
                None => {
                    layer_convert::convert_dir(&dir.join("fs"), &staged, &opts).map_err(conv_err)?;
                }
                Some(sess) => {
                    let (_, report) = sess
                        .run(|sink| layer_convert::convert_dir_with(&dir.join("fs"), &staged, &opts, Some(sink)))
                        .map_err(conv_err)?;
                    if let Err(e) = fsync_dir(&self.blob_dir()) {
                        apply::discard(&staged, Some(&report));
                        return Err(internal(e));
                    }
                    converted = Some(report);
                }
            }
            if let Err(e) = fs::rename(&staged, &blob) {
                apply::discard(&staged, converted.as_ref());
                return Err(internal(e));
            }
        }
        let undo = |converted: &Option<SinkReport>| {
            if let Some(report) = converted {
                apply::discard(&blob, Some(report));
            }
        };
        let inodes = image_inodes(&blob).inspect_err(|_| undo(&converted))?;
        let size = fs::metadata(&blob).map_err(internal)?.len() as i64;
        // Mounted before the record says committed; a crash in between leaves an
        // active snapshot with a stray mount, which start-up removes.
        let mp = self.mountpoint(rec.id);
        let mut mounted = rec.clone();
        if let Some(report) = &converted {
            mounted.blobs = report.devices.clone();
        }
        let _m = self.mount_lock(rec.id);
        if let Err(e) = self.mount_layer(&mounted) {
            undo(&converted);
            return Err(Error::Internal(format!("mounting {}: {e}", blob.display())));
        }
        let res = meta::write(&self.db, |txn| {
            let cur = meta::get_existing_w(txn, key)?;
            if cur.id != rec.id || cur.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} changed during commit"
                )));
            }
            if meta::get_w(txn, name)?.is_some() {
                return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
            }
            // As containerd's metastore does: the committed snapshot is a new record,
            // created and updated at the commit.
            let now = now_pair();
            let mut committed = Record {
                kind: Kind::Committed,
                labels,
                created: now,
                updated: now,
                size,
                inodes,
                merged: None,
                ..cur.clone()
            };
            if let Some(report) = &converted {
                // An Apply recorded its blobs on the active record already; this
                // conversion replaces the image, so those references go.
                blobs::release(txn, &committed.blobs)?;
                blobs::record(txn, report)?;
                committed.blobs = report.devices.clone();
                committed.logical = report.logical_bytes;
            }
            meta::delete(txn, key, &cur)?;
            meta::put(txn, name, None, &committed)
        });
        if let Err(e) = res {
            let _ = mounts::unmount(&mp);
            undo(&converted);
            return Err(e);
        }
        drop(_m);
        if let Some(m) = rec.merged {
            self.release_merged(m, &rec.parent);
        }
        // Unpinning may delete blobs.
        drop(session);
        // The unpacked copy is not needed any more. Deleting thousands of files takes
        // a while, so the tree is moved aside and deleted in the background when the
        // store is idle; Commit returns as soon as the layer is usable. Start-up
        // empties `trash/`.
        for sub in ["fs", "work"] {
            if let Err(e) = self.discard(&dir.join(sub), 0o755) {
                tracing::warn!(path = %dir.join(sub).display(), error = %e, "emptying after commit");
                empty_dir(&dir.join(sub));
            }
        }
        self.trash.touch();
        Ok(())
    }

    /// Replaces `path` by an empty directory with `mode`; the old tree goes to `trash/`,
    /// deleted in the background once the store is idle (see [`Trash`]).
    fn discard(&self, path: &Path, mode: u32) -> std::io::Result<()> {
        if fs::read_dir(path)?.next().is_none() {
            return Ok(());
        }
        let (secs, nanos) = now_pair();
        let owner = path
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        let leaf = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let trash = self.root.join("trash").join(format!(
            "{}-{}-{secs}.{nanos:09}",
            owner.unwrap_or_default(),
            leaf.unwrap_or_default()
        ));
        fs::rename(path, &trash)?;
        fs::create_dir(path)?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    /// Removes a snapshot that has no children.
    pub fn remove(&self, key: &str) -> Result<()> {
        let (rec, detach) = meta::write(&self.db, |txn| {
            let rec = meta::get_existing_w(txn, key)?;
            if meta::has_children(txn, key)? {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove snapshot {key:?}: it has children"
                )));
            }
            if lock(&self.busy).contains(key) {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is being committed or applied to"
                )));
            }
            meta::delete(txn, key, &rec)?;
            blobs::release(txn, &rec.blobs)?;
            // Another chain may mount the same blob.
            let detach = match &rec.remote {
                Some(l) if !meta::remote_in_use(txn, &l.digest)? => Some(l.clone()),
                _ => None,
            };
            Ok((rec, detach))
        })?;
        // After the record is gone: a crash here leaves only orphans for start-up.
        // The layer is unmounted before its blobs go.
        self.remove_files(rec.id);
        if let Some(m) = rec.merged {
            self.release_merged(m, &rec.parent);
        }
        lock(&self.attached).remove(&rec.id);
        lock(&self.incomplete).remove(&rec.id);
        if !rec.blobs.is_empty() {
            self.collect_blobs()?;
        }
        if let (Some(layer), Some(remote)) = (detach, &self.remote) {
            remote.detach(&layer);
        }
        Ok(())
    }

    /// Unmounts and deletes what belongs to id `id` (its record is gone, or was never
    /// written).
    fn remove_files(&self, id: u64) {
        let mp = self.mountpoint(id);
        {
            let _m = self.mount_lock(id);
            if mp.exists() {
                if let Err(e) = mounts::unmount(&mp) {
                    tracing::warn!(path = %mp.display(), error = %e, "unmounting a removed layer");
                }
                let _ = fs::remove_dir(&mp);
            }
        }
        // A merged image topped by this layer has no user left (they are its children).
        {
            let _g = self.merge_lock(id);
            merged::remove(&self.root, id);
            lock(&self.merged_mounted).remove(&id);
            lock(&self.unmergeable).remove(&id);
        }
        let dir = self.dir(id);
        if let Err(e) = fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %dir.display(), error = %e, "removing a snapshot directory");
            }
        }
    }

    /// Metadata of a snapshot.
    pub fn stat(&self, key: &str) -> Result<Info> {
        meta::read(&self.db, |r| Ok(r.get_existing(key)?.info(key)))
    }

    /// Updates labels (`labels` or `labels.<key>` field paths; none = all labels).
    pub fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info> {
        meta::write(&self.db, |txn| {
            let old = meta::get_existing_w(txn, &info.name)?;
            let mut rec = old.clone();
            if fieldpaths.is_empty() {
                rec.labels = info.labels.clone();
            } else {
                for p in fieldpaths {
                    if p == "labels" {
                        rec.labels = info.labels.clone();
                    } else if let Some(k) = p.strip_prefix("labels.") {
                        match info.labels.get(k) {
                            Some(v) => rec.labels.insert(k.to_string(), v.clone()),
                            None => rec.labels.remove(k),
                        };
                    } else {
                        return Err(Error::InvalidArgument(format!(
                            "cannot update {p:?} of snapshot {:?}: only labels can change",
                            info.name
                        )));
                    }
                }
            }
            rec.updated = now_pair();
            meta::put(txn, &info.name, Some(&old), &rec)?;
            Ok(rec.info(&info.name))
        })
    }

    /// Disk usage: the blob of a committed snapshot, the upper dir of an active one.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let rec = meta::read(&self.db, |r| r.get_existing(key))?;
        if rec.kind == Kind::Committed {
            return Ok(Usage {
                size: rec.size,
                inodes: rec.inodes,
            });
        }
        disk_usage(&self.dir(rec.id).join("fs")).map_err(internal)
    }

    /// Every snapshot.
    pub fn list(&self) -> Result<Vec<Info>> {
        meta::read(&self.db, |r| {
            Ok(r.all()?.into_iter().map(|(k, r)| r.info(&k)).collect())
        })
    }

    /// Removes directories, mounts and blobs no record owns, and deletes blobs no
    /// layer names any more (counting the references afresh).
    pub fn cleanup(&self) -> Result<()> {
        self.repair_blob_counts()?;
        self.remove_orphans(false)
    }

    /// Sets every blob's reference count to what the records name, then deletes the
    /// unreferenced ones (pinned blobs wait).
    fn repair_blob_counts(&self) -> Result<()> {
        let fixed = meta::write(&self.db, |txn| {
            let owners: Vec<Vec<BlobId>> = {
                let t = txn.open_table(meta::SNAPSHOTS).map_err(internal)?;
                let mut v = Vec::new();
                for item in t.iter().map_err(internal)? {
                    let (_, r) = item.map_err(internal)?;
                    let r: Record = serde_json::from_slice(r.value()).map_err(internal)?;
                    v.push(r.blobs);
                }
                v
            };
            blobs::recount(txn, &owners)
        })?;
        if fixed > 0 {
            tracing::warn!(blobs = fixed, "repaired blob reference counts");
        }
        self.collect_blobs()
    }

    /// Removes mounts, directories and blob files no record owns. At start-up
    /// (`starting`) also what in-flight work leaves in `staging/`; while serving,
    /// work in progress (pending ids, busy keys, pinned blobs) is left alone.
    fn remove_orphans(&self, starting: bool) -> Result<()> {
        let (records, recorded) = meta::read(&self.db, |r| {
            Ok((
                r.all()?,
                blobs::known(r.txn())?.into_iter().collect::<HashSet<BlobId>>(),
            ))
        })?;
        let pending = lock(&self.pending).clone();
        let busy = lock(&self.busy).clone();
        let known: HashSet<u64> = records
            .iter()
            .map(|(_, r)| r.id)
            .chain(pending.iter().copied())
            .collect();
        let mounted_ok: HashSet<u64> = records
            .iter()
            .filter(|(k, r)| r.kind == Kind::Committed || busy.contains(k))
            .map(|(_, r)| r.id)
            .chain(pending.iter().copied())
            .collect();
        for entry in fs::read_dir(self.root.join("m")).map_err(internal)? {
            let entry = entry.map_err(internal)?;
            let id = entry.file_name().to_string_lossy().parse::<u64>().ok();
            if id.is_some_and(|id| mounted_ok.contains(&id)) {
                continue;
            }
            let _m = id.map(|id| self.mount_lock(id));
            let _ = mounts::unmount(&entry.path());
            let _ = fs::remove_dir(entry.path());
        }
        for entry in fs::read_dir(self.root.join("snapshots")).map_err(internal)? {
            let entry = entry.map_err(internal)?;
            let id = entry.file_name().to_string_lossy().parse::<u64>().ok();
            if id.is_some_and(|id| known.contains(&id)) {
                continue;
            }
            let _ = fs::remove_dir_all(entry.path());
        }
        // Blob files without a record: written by a conversion that crashed or failed
        // before its layer was recorded (those in progress are pinned).
        blobs::remove_files_except(&self.blob_dir(), |id| recorded.contains(&id) || self.pins.is_pinned(id));
        // At start-up: staged files and dirs of work that never finished, and trees a
        // commit moved aside. While serving, `staging/` belongs to the work in progress
        // and `trash/` to the background deletion: deleting a big unpacked tree here
        // made Cleanup take seconds, and containerd's GC, which waits for it, then
        // missed the removals that came meanwhile.
        let dirs: &[&str] = if starting { &["staging", "trash"] } else { &[] };
        for d in dirs {
            for entry in fs::read_dir(self.root.join(d)).map_err(internal)? {
                let p = entry.map_err(internal)?.path();
                let _ = fs::remove_dir_all(&p).or_else(|_| fs::remove_file(&p));
            }
        }
        Ok(())
    }

    /// Start-up repair: orphans removed, committed layers mounted, leftovers of
    /// interrupted commits cleared.
    fn repair(&self) -> Result<()> {
        self.repair_blob_counts()?;
        self.remove_orphans(true)?;
        if let Some(remote) = &self.remote {
            let layers: Vec<RemoteLayer> = meta::read(&self.db, |r| r.all())?
                .into_iter()
                .filter_map(|(_, rec)| rec.remote)
                .collect();
            remote.retain(&layers);
        }
        let mounted = mounts::mounted_under(&self.root.join("m")).map_err(internal)?;
        for (key, rec) in meta::read(&self.db, |r| r.all())? {
            let dir = self.dir(rec.id);
            match rec.kind {
                Kind::Committed => {
                    let mp = self.mountpoint(rec.id);
                    if !mounted.contains(&mp) {
                        if let Err(e) = self.mount_layer(&rec) {
                            tracing::error!(snapshot = %key, error = %e, "mounting a committed layer");
                        }
                    }
                    // A crash after the commit record but before the upper dir was emptied.
                    empty_dir(&dir.join("fs"));
                }
                Kind::Active | Kind::View => {
                    // A `layer.erofs` beside a non-empty `fs/` is a Commit's conversion
                    // that crashed before it was recorded (an applied layer leaves `fs/`
                    // empty): the tree may have changed since, so convert again.
                    let nonempty = fs::read_dir(dir.join("fs"))
                        .map(|mut r| r.next().is_some())
                        .unwrap_or(false);
                    if nonempty {
                        let _ = fs::remove_file(dir.join("layer.erofs"));
                    }
                }
            }
        }
        self.repair_merged()
    }

    /// Start-up: merged images no snapshot uses are deleted (a crash between their
    /// rename into place and their first user's record, or after their last user went);
    /// the used ones are checked and mounted, and one that does not check out (corrupt,
    /// or missing) is built again, never mounted as it is. A chain that cannot be built
    /// again has its users moved to per-layer mounts, which show the same tree.
    fn repair_merged(&self) -> Result<()> {
        let records = meta::read(&self.db, |r| r.all())?;
        let mut users: BTreeMap<u64, Vec<(String, Record)>> = BTreeMap::new();
        for (k, r) in records {
            if let Some(m) = r.merged {
                users.entry(m).or_default().push((k, r));
            }
        }
        for d in ["merged", "mm"] {
            for entry in fs::read_dir(self.root.join(d)).map_err(internal)? {
                let entry = entry.map_err(internal)?;
                let id = entry.file_name().to_string_lossy().parse::<u64>().ok();
                if !id.is_some_and(|id| users.contains_key(&id)) {
                    let _ = mounts::unmount(&entry.path());
                    let _ = fs::remove_dir_all(entry.path()).or_else(|_| fs::remove_file(entry.path()));
                }
            }
        }
        let mounted = mounts::mounted_under(&self.root.join("mm")).map_err(internal)?;
        for (m, us) in users {
            let _g = self.merge_lock(m);
            if mounted.contains(&merged::mountpoint(&self.root, m)) {
                lock(&self.merged_mounted).insert(m);
                continue;
            }
            let parent = us[0].1.parent.clone();
            let made = meta::read(&self.db, |r| r.parents(&parent))
                .map_err(|e| e.to_string())
                .and_then(|chain| match chain.first() {
                    Some((_, top)) if top.id == m => self.make_merged(m, &chain),
                    _ => Err(format!("the chain under {parent:?} is not the one merged")),
                });
            if let Err(e) = made {
                tracing::error!(id = m, error = %e, "cannot mount a merged image: its snapshots go per-layer");
                merged::remove(&self.root, m);
                meta::write(&self.db, |txn| {
                    for (k, _) in &us {
                        if let Some(mut r) = meta::get_w(txn, k)? {
                            let old = r.clone();
                            r.merged = None;
                            meta::put(txn, k, Some(&old), &r)?;
                        }
                    }
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    /// Checks that the records, their indexes, the directories, the mounts and the
    /// blob references agree, and returns every disagreement found (none: empty).
    /// Work in progress (a Commit converting, a layer being written) is left out.
    pub fn verify(&self) -> Result<Vec<String>> {
        let (records, mut problems) = meta::read(&self.db, |r| Ok((r.all()?, r.index_problems()?)))?;
        let pending = lock(&self.pending).clone();
        let busy = lock(&self.busy).clone();
        let mounted = mounts::mounted_under(&self.root.join("m")).map_err(internal)?;
        let mut ids = HashSet::new();
        for (key, rec) in &records {
            ids.insert(rec.id);
            let dir = self.dir(rec.id);
            if !dir.is_dir() {
                problems.push(format!("snapshot {key:?}: no directory {}", dir.display()));
                continue;
            }
            match rec.kind {
                Kind::Committed => {
                    if rec.remote.is_none() && !dir.join("layer.erofs").is_file() {
                        problems.push(format!("committed {key:?}: no layer.erofs"));
                    }
                    if !mounted.contains(&self.mountpoint(rec.id)) {
                        problems.push(format!("committed {key:?}: m/{} is not mounted", rec.id));
                    }
                }
                Kind::Active | Kind::View => {
                    if !dir.join("fs").is_dir() || !dir.join(MARKER).is_file() {
                        problems.push(format!("{key:?}: fs/ or the marker is missing"));
                    }
                    if mounted.contains(&self.mountpoint(rec.id)) && !busy.contains(key) {
                        problems.push(format!("{key:?} is not committed but m/{} is mounted", rec.id));
                    }
                }
            }
        }
        let owned = |name: &std::ffi::OsStr| {
            name.to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| ids.contains(&id) || pending.contains(&id))
        };
        for e in fs::read_dir(self.root.join("snapshots")).map_err(internal)? {
            let e = e.map_err(internal)?;
            if !owned(&e.file_name()) {
                problems.push(format!("snapshots/{} has no record", e.file_name().to_string_lossy()));
            }
        }
        for mp in &mounted {
            if !mp.file_name().is_some_and(owned) {
                problems.push(format!("{} is mounted and has no record", mp.display()));
            }
        }
        if pending.is_empty() && busy.is_empty() {
            let staged: Vec<String> = fs::read_dir(self.root.join("staging"))
                .map_err(internal)?
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect();
            if !staged.is_empty() {
                problems.push(format!("staging/ holds {staged:?} with no work in progress"));
            }
        }
        let merged_mounts = mounts::mounted_under(&self.root.join("mm")).map_err(internal)?;
        let mut used = HashSet::new();
        for (key, rec) in &records {
            if let Some(m) = rec.merged {
                used.insert(m);
                if !merged_mounts.contains(&merged::mountpoint(&self.root, m)) {
                    problems.push(format!("{key:?} mounts over merged image {m}, which is not mounted"));
                }
            }
        }
        for e in fs::read_dir(self.root.join("merged")).map_err(internal)? {
            let e = e.map_err(internal)?;
            let id = e.file_name().to_string_lossy().parse::<u64>().ok();
            if !id.is_some_and(|id| used.contains(&id)) {
                problems.push(format!("merged/{} has no user", e.file_name().to_string_lossy()));
            }
        }
        let owners: Vec<Vec<BlobId>> = records.iter().map(|(_, r)| r.blobs.clone()).collect();
        let wrong = meta::check(&self.db, |txn| blobs::recount(txn, &owners))?;
        if wrong > 0 {
            problems.push(format!("{wrong} blob reference counts disagree with the records"));
        }
        Ok(problems)
    }

    /// Lazily unmounts every committed layer: for a clean stop. Running containers
    /// keep their overlay's references; the next start mounts the layers again.
    pub fn shutdown(&self) {
        for d in ["mm", "m"] {
            if let Ok(mounted) = mounts::mounted_under(&self.root.join(d)) {
                for mp in mounted {
                    let _ = mounts::unmount(&mp);
                }
            }
        }
    }
}

/// The marker in every active snapshot's directory (containerd's EROFS snapshotter
/// marks its layers the same way).
const MARKER: &str = ".erofslayer";

/// The inode count of an EROFS image, read from its superblock (which also checks
/// that the file is one).
fn image_inodes(image: &Path) -> Result<i64> {
    let img = erofs::reader::Image::open(image).map_err(|e| Error::Internal(format!("{}: {e}", image.display())))?;
    Ok(img.superblock().inos as i64)
}

/// The figures of `stats`, from every record and the blob sizes.
fn chain_stats(records: &[(String, Record)], chunks: blobs::ChunkStats, sizes: &BTreeMap<BlobId, u64>) -> StoreStats {
    let mut st = StoreStats {
        chunks,
        ..Default::default()
    };
    let by_name: BTreeMap<&str, &Record> = records.iter().map(|(k, r)| (k.as_str(), r)).collect();
    let has_child: HashSet<&str> = records.iter().map(|(_, r)| r.parent.as_str()).collect();
    for (_, r) in records {
        if r.kind == Kind::Committed {
            st.layers += 1;
            st.logical_bytes += r.logical;
            st.image_bytes += r.size.max(0) as u64;
        }
    }
    // Chains: from each committed snapshot nothing committed builds on.
    let mut chain_blobs: Vec<(String, u64, u64, HashSet<BlobId>)> = Vec::new();
    for (name, r) in records {
        if r.kind != Kind::Committed || has_child.contains(name.as_str()) {
            continue;
        }
        let (mut layers, mut logical, mut set) = (0u64, 0u64, HashSet::new());
        let mut cur = Some(r);
        while let Some(c) = cur {
            layers += 1;
            logical += c.logical;
            set.extend(c.blobs.iter().copied());
            cur = by_name.get(c.parent.as_str()).copied();
        }
        chain_blobs.push((name.clone(), layers, logical, set));
    }
    for (i, (top, layers, logical, set)) in chain_blobs.iter().enumerate() {
        let blob_bytes = set.iter().map(|b| sizes.get(b).copied().unwrap_or(0)).sum();
        let shared_blob_bytes = set
            .iter()
            .filter(|b| chain_blobs.iter().enumerate().any(|(j, o)| j != i && o.3.contains(b)))
            .map(|b| sizes.get(b).copied().unwrap_or(0))
            .sum();
        st.chains.push(ChainStats {
            top: top.clone(),
            layers: *layers,
            logical_bytes: *logical,
            blob_bytes,
            shared_blob_bytes,
        });
    }
    st.stored_bytes = st.image_bytes + st.chunks.blob_bytes;
    st
}

/// Makes the directory entries in `dir` durable.
fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Removes everything inside `dir`, keeping `dir`.
fn empty_dir(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            let r = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                // overlayfs leaves `work/work` with mode 000; removal works as root.
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            if let Err(err) = r {
                tracing::warn!(path = %p.display(), error = %err, "emptying a directory");
            }
        }
    }
}

/// Bytes (allocated blocks) and inodes under `dir`, counting hard links once, as
/// containerd's `fs.DiskUsage` does.
fn disk_usage(dir: &Path) -> std::io::Result<Usage> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let md = fs::symlink_metadata(&d)?;
        if seen.insert((md.dev(), md.ino())) {
            usage.size += md.blocks() as i64 * 512;
            usage.inodes += 1;
        }
        if md.is_dir() {
            for e in fs::read_dir(&d)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(usage)
}
