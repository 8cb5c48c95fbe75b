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
//! staging/               new snapshot dirs before they are renamed into place
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

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use dedup::{BlobId, BlobSink, SinkReport};
use erofs::writer::ChunkSink;

use crate::blobs::{self, Pins};
use crate::{mounts, Error, Info, Kind, Mount, Result, Usage};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// The persisted record of one snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: u64,
    kind: Kind,
    parent: String,
    labels: BTreeMap<String, String>,
    created: (u64, u32),
    updated: (u64, u32),
    size: i64,
    inodes: i64,
    /// Blobs the layer's device table names, in device order (dedup only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    blobs: Vec<BlobId>,
    /// File bytes of the layer (dedup only; what it would take without sharing).
    #[serde(default, skip_serializing_if = "is_zero")]
    logical: u64,
    /// A lazily fetched layer: the blob the mount reads through the fetch daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remote: Option<RemoteLayer>,
}

/// The label containerd puts on a Prepare to say which committed snapshot the
/// layer would become: a snapshotter that can make it without the layer's data
/// does so and answers AlreadyExists, and containerd downloads nothing.
pub const TARGET_SNAPSHOT_LABEL: &str = "containerd.io/snapshot.ref";

/// A layer mounted from a blob that is fetched on demand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// The blob's digest.
    pub digest: String,
    /// The blob's size in bytes.
    pub size: u64,
    /// What the [`RemoteLayers`] implementation needs to attach the blob again (after
    /// a restart of either daemon); opaque to the store.
    pub spec: serde_json::Value,
}

/// A blob made available as a local file.
#[derive(Debug, Clone)]
pub struct Attached {
    /// The file the EROFS mount reads.
    pub path: PathBuf,
    /// Which incarnation of the fetch daemon serves it: a mount made from an earlier
    /// one reads nothing new and must be made again.
    pub instance: u64,
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
    /// The blob is not needed any more (no layer names it).
    fn detach(&self, layer: &RemoteLayer);
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

fn is_zero(v: &u64) -> bool {
    *v == 0
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
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            dedup: false,
            chunk_size: layer_convert::ChunkSize::DEFAULT,
            trash_idle: Duration::from_secs(10),
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
    last_activity: Mutex<std::time::Instant>,
}

impl Trash {
    fn touch(&self) {
        *self.last_activity.lock().unwrap() = std::time::Instant::now();
    }

    /// Runs until the store is dropped (its `Arc` is the only other owner).
    fn run(self: Arc<Trash>) {
        while Arc::strong_count(&self) > 1 {
            std::thread::sleep(Duration::from_millis(250).min(self.idle.max(Duration::from_millis(10))));
            if self.last_activity.lock().unwrap().elapsed() < self.idle {
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
        let _g = self.store.lock.lock().unwrap();
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

impl Record {
    fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_string(),
            parent: self.parent.clone(),
            kind: self.kind,
            labels: self.labels.clone(),
            created: from_pair(self.created),
            updated: from_pair(self.updated),
        }
    }
}

fn now_pair() -> (u64, u32) {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

fn from_pair((s, n): (u64, u32)) -> SystemTime {
    UNIX_EPOCH + Duration::new(s, n)
}

fn internal<E: std::fmt::Display>(e: E) -> Error {
    Error::Internal(e.to_string())
}

/// A snapshot store rooted in one directory. All methods block (file system work,
/// layer conversion); call them from a blocking-capable thread.
pub struct Snapshotter {
    root: PathBuf,
    db: Database,
    /// Serialises read-check-write sequences; conversions run outside it.
    lock: Mutex<()>,
    /// Keys whose Commit is converting right now.
    committing: Mutex<HashSet<String>>,
    opts: StoreOptions,
    pins: Pins,
    trash: Arc<Trash>,
    remote: Option<Arc<dyn RemoteLayers>>,
    /// Lazy layers mounted by this process: id -> fetch daemon instance.
    attached: Mutex<std::collections::HashMap<u64, u64>>,
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
        for d in ["snapshots", "m", "staging", "trash", "blobs"] {
            fs::create_dir_all(root.join(d)).map_err(internal)?;
        }
        fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(internal)?;
        let db = Database::create(root.join("metadata.redb")).map_err(internal)?;
        {
            let txn = db.begin_write().map_err(internal)?;
            txn.open_table(SNAPSHOTS).map_err(internal)?;
            txn.open_table(COUNTERS).map_err(internal)?;
            txn.open_table(blobs::BLOBS).map_err(internal)?;
            txn.open_table(blobs::CHUNKS).map_err(internal)?;
            txn.open_table(blobs::BLOB_CHUNKS).map_err(internal)?;
            txn.commit().map_err(internal)?;
        }
        let s = Snapshotter {
            root: root.to_path_buf(),
            db,
            lock: Mutex::new(()),
            committing: Mutex::new(HashSet::new()),
            opts,
            pins: Pins::default(),
            trash: Arc::new(Trash {
                dir: root.join("trash"),
                idle: opts.trash_idle,
                last_activity: Mutex::new(std::time::Instant::now()),
            }),
            remote,
            attached: Mutex::new(Default::default()),
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

    /// The options the store was opened with.
    pub fn options(&self) -> StoreOptions {
        self.opts
    }

    /// Mounts a committed layer with its blobs as devices.
    fn mount_layer(&self, rec: &Record) -> std::io::Result<()> {
        if let Some(layer) = &rec.remote {
            let remote = self.remote.as_ref().ok_or_else(|| {
                std::io::Error::other(format!(
                    "layer {} is lazy but no fetch daemon is configured",
                    layer.digest
                ))
            })?;
            let a = remote.attach(layer)?;
            mounts::mount_erofs_with_devices(&a.path, &[], &self.mountpoint(rec.id))?;
            self.attached.lock().unwrap().insert(rec.id, a.instance);
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
        let txn = self.db.begin_write().map_err(internal)?;
        let id = next_counter(&txn, "next_blob")?;
        txn.commit().map_err(internal)?;
        // Under the lock, so no deletion decides between the view and the pins.
        let _g = self.lock.lock().unwrap();
        let lookup = blobs::Lookup::new(self.db.begin_read().map_err(internal)?)?;
        let pinned = self.pins.pin(lookup.blobs().chain([id]));
        Ok(Some(DedupSession {
            store: self,
            lookup,
            pinned,
            id,
        }))
    }

    /// Records what a differ's deduplicating Apply wrote for the active snapshot with
    /// directory `snapshots/<id>` (its `layer.erofs` is renamed into place after
    /// this): the new blob, its chunks and the references. References an earlier
    /// Apply recorded are dropped.
    pub fn record_applied(&self, id: u64, report: &SinkReport, logical: u64) -> Result<()> {
        fsync_dir(&self.blob_dir()).map_err(internal)?;
        let _g = self.lock.lock().unwrap();
        let (key, mut rec) = self
            .all()?
            .into_iter()
            .find(|(_, r)| r.id == id)
            .ok_or_else(|| Error::NotFound(format!("snapshot with id {id}")))?;
        let key = key.as_str();
        if rec.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!("snapshot {key:?} is not active")));
        }
        let txn = self.db.begin_write().map_err(internal)?;
        blobs::record(&txn, report)?;
        blobs::release(&txn, &rec.blobs)?;
        rec.blobs = report.devices.clone();
        rec.logical = logical;
        {
            let mut t = txn.open_table(SNAPSHOTS).map_err(internal)?;
            t.insert(key, serde_json::to_vec(&rec).map_err(internal)?.as_slice())
                .map_err(internal)?;
        }
        txn.commit().map_err(internal)?;
        self.collect_blobs()
    }

    /// Deletes unreferenced, unpinned blobs: records first, files after. Call with
    /// the lock held.
    fn collect_blobs(&self) -> Result<()> {
        let txn = self.db.begin_write().map_err(internal)?;
        let dead = blobs::collect(&txn, &self.pins)?;
        if dead.is_empty() {
            return Ok(());
        }
        txn.commit().map_err(internal)?;
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
        let records = self.all()?;
        let txn = self.db.begin_read().map_err(internal)?;
        let chunks = blobs::stats(&txn)?;
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
        let mut st = StoreStats {
            chunks,
            ..Default::default()
        };
        let by_name: BTreeMap<&str, &Record> = records.iter().map(|(k, r)| (k.as_str(), r)).collect();
        let has_child: HashSet<&str> = records.iter().map(|(_, r)| r.parent.as_str()).collect();
        for (_, r) in &records {
            if r.kind == Kind::Committed {
                st.layers += 1;
                st.logical_bytes += r.logical;
                st.image_bytes += r.size.max(0) as u64;
            }
        }
        // Chains: from each committed snapshot nothing committed builds on.
        let mut chain_blobs: Vec<(String, u64, u64, HashSet<BlobId>)> = Vec::new();
        for (name, r) in &records {
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
        Ok(st)
    }

    fn get(&self, key: &str) -> Result<Option<Record>> {
        let txn = self.db.begin_read().map_err(internal)?;
        let t = txn.open_table(SNAPSHOTS).map_err(internal)?;
        let v = t.get(key).map_err(internal)?;
        v.map(|v| serde_json::from_slice(v.value()).map_err(internal))
            .transpose()
    }

    fn get_existing(&self, key: &str) -> Result<Record> {
        self.get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))
    }

    fn all(&self) -> Result<Vec<(String, Record)>> {
        let txn = self.db.begin_read().map_err(internal)?;
        let t = txn.open_table(SNAPSHOTS).map_err(internal)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(internal)? {
            let (k, v) = item.map_err(internal)?;
            out.push((
                k.value().to_string(),
                serde_json::from_slice(v.value()).map_err(internal)?,
            ));
        }
        Ok(out)
    }

    /// The key of the snapshot whose directory is `snapshots/<id>` (a differ knows a
    /// snapshot only by the mounts naming its directory); `None` when no record has
    /// that id. A scan of the records: for the rare caller that needs it.
    pub fn key_of_id(&self, id: u64) -> Result<Option<String>> {
        Ok(self.all()?.into_iter().find(|(_, r)| r.id == id).map(|(k, _)| k))
    }

    /// Ids of `parent` and its ancestors, nearest first.
    fn parent_ids(&self, parent: &str) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        let mut cur = parent.to_string();
        while !cur.is_empty() {
            let r = self
                .get(&cur)?
                .ok_or_else(|| Error::Internal(format!("parent {cur:?} of a snapshot is missing")))?;
            ids.push(r.id);
            cur = r.parent;
            if ids.len() > 10_000 {
                return Err(Error::Internal("parent chain too long (cycle?)".into()));
            }
        }
        Ok(ids)
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
        let _g = self.lock.lock().unwrap();
        if self.get(key)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
        }
        self.check_parent(parent)?;
        let parents = self.parent_ids(parent)?;

        let txn = self.db.begin_write().map_err(internal)?;
        let id = next_counter(&txn, "next_id")?;
        // The directory goes into place before the record that owns it exists.
        let dir = self.dir(id);
        self.stage_dir(id, &parents).map_err(internal)?;
        let now = now_pair();
        let rec = Record {
            id,
            kind,
            parent: parent.to_string(),
            labels,
            created: now,
            updated: now,
            size: 0,
            inodes: 0,
            blobs: Vec::new(),
            logical: 0,
            remote: None,
        };
        let result = (|| {
            let mut t = txn.open_table(SNAPSHOTS).map_err(internal)?;
            t.insert(key, serde_json::to_vec(&rec).map_err(internal)?.as_slice())
                .map_err(internal)?;
            Ok::<_, Error>(())
        })();
        if let Err(e) = result.and_then(|_| txn.commit().map_err(internal)) {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(self.mounts_of(&rec, &parents))
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
        if self.find_target(target, parent)?.is_some() {
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
        let id = self.new_id()?;
        // As in Commit: directory, then mount, then record; start-up removes what a
        // crash leaves without a record.
        self.stage_dir(id, &parents).map_err(internal)?;
        let now = now_pair();
        let mut rec = Record {
            id,
            kind: Kind::Committed,
            parent: parent.to_string(),
            labels: labels.clone(),
            created: now,
            updated: now,
            size: layer.size as i64,
            inodes: 0,
            blobs: Vec::new(),
            logical: 0,
            remote: Some(layer.clone()),
        };
        if let Err(e) = self.mount_layer(&rec) {
            self.remove_files(id);
            return Err(Error::Unavailable(format!("mounting lazy layer {}: {e}", layer.digest)));
        }
        // The inode count is in the superblock, which the mount has read already.
        rec.inodes = rustix::fs::statfs(self.mountpoint(id)).map_or(0, |st| st.f_files as i64);
        let res = self.record_prepared(key, target, &rec, None);
        match res {
            Ok(()) => {
                tracing::info!(key, target, digest = %layer.digest, id, "lazy layer committed");
                Ok(true)
            }
            // Another Prepare made it meanwhile: theirs stands.
            Err(Error::AlreadyExists(_)) => {
                self.attached.lock().unwrap().remove(&id);
                self.remove_files(id);
                Ok(true)
            }
            Err(e) => {
                self.attached.lock().unwrap().remove(&id);
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
        let id = self.new_id()?;
        self.stage_dir(id, &parents).map_err(internal)?;
        let blob = self.dir(id).join("layer.erofs");
        let opts = layer_convert::Options {
            media_type: Some(layer.media_type.clone()),
            // as the differ's Apply: block-aligned file data, a dense inode area
            inline_data: false,
            build_time: 0,
            fsync: true,
            chunk_size: self.opts.chunk_size,
            meta_first: false,
            ..Default::default()
        };
        let digest = layer.digest.clone();
        let fail = |e: Error, own: Option<&Path>| {
            if let Some(p) = own {
                let _ = fs::remove_file(p);
            }
            self.remove_files(id);
            e
        };
        let conv_err = |e: layer_convert::Error| Error::Unavailable(format!("streaming layer {digest}: {e}"));
        let session = self.dedup_session().map_err(|e| fail(e, None))?;
        let (report, sink) = match &session {
            None => (
                layer_convert::convert(layer.reader, &blob, &opts, None).map_err(|e| fail(conv_err(e), None))?,
                None,
            ),
            Some(sess) => {
                let (r, rep) = sess
                    .run(|sink| layer_convert::convert_with(layer.reader, &blob, &opts, None, Some(sink)))
                    .map_err(|e| fail(conv_err(e), None))?;
                (r, Some(rep))
            }
        };
        let own = sink.as_ref().and_then(|s| s.own.as_ref()).map(|o| o.path.clone());
        let own = own.as_deref();
        let mut bad = None;
        if report.input_digest != layer.digest || report.input_size != layer.size {
            bad = Some(format!(
                "the blob read is {} ({} bytes), the manifest says {} ({} bytes)",
                report.input_digest, report.input_size, layer.digest, layer.size
            ));
        } else if let Some(d) = layer.diff_id.as_ref().filter(|d| **d != report.diff_id) {
            bad = Some(format!("diffID {} but the image config says {d}", report.diff_id));
        }
        if let Some(why) = bad {
            return Err(fail(
                Error::InvalidArgument(format!("streamed layer {digest}: {why}")),
                own,
            ));
        }
        if sink.is_some() {
            fsync_dir(&self.blob_dir()).map_err(|e| fail(internal(e), own))?;
        }
        let image = erofs::reader::Image::open(&blob)
            .map_err(|e| fail(Error::Internal(format!("{}: {e}", blob.display())), own))?;
        let inodes = image.superblock().inos as i64;
        drop(image);
        let now = now_pair();
        let rec = Record {
            id,
            kind: Kind::Committed,
            parent: parent.to_string(),
            labels: labels.clone(),
            created: now,
            updated: now,
            size: report.output_size as i64,
            inodes,
            blobs: sink.as_ref().map(|s| s.devices.clone()).unwrap_or_default(),
            logical: sink.as_ref().map_or(0, |s| s.logical_bytes),
            remote: None,
        };
        self.mount_layer(&rec)
            .map_err(|e| fail(Error::Internal(format!("mounting {}: {e}", blob.display())), own))?;
        let res = self.record_prepared(key, target, &rec, sink.as_ref());
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
                let _ = fail(Error::Internal(String::new()), own);
                Ok(true)
            }
            Err(e) => Err(fail(e, own)),
        }
    }

    /// A new snapshot id, for a layer whose record is written only once it is ready.
    fn new_id(&self) -> Result<u64> {
        let _g = self.lock.lock().unwrap();
        let txn = self.db.begin_write().map_err(internal)?;
        let id = next_counter(&txn, "next_id")?;
        txn.commit().map_err(internal)?;
        Ok(id)
    }

    /// Records a layer made at Prepare (lazy or streamed) as committed `key`, with the
    /// blobs it names; AlreadyExists when another Prepare made the same target meanwhile.
    fn record_prepared(&self, key: &str, target: &str, rec: &Record, blobs: Option<&SinkReport>) -> Result<()> {
        let _g = self.lock.lock().unwrap();
        if self.find_target(target, &rec.parent)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {target:?}")));
        }
        if self.get(key)?.is_some() {
            return Err(Error::Internal(format!("snapshot {key:?} exists")));
        }
        let txn = self.db.begin_write().map_err(internal)?;
        if let Some(report) = blobs {
            blobs::record(&txn, report)?;
        }
        {
            let mut t = txn.open_table(SNAPSHOTS).map_err(internal)?;
            t.insert(key, serde_json::to_vec(rec).map_err(internal)?.as_slice())
                .map_err(internal)?;
        }
        txn.commit().map_err(internal)
    }

    /// NotFound or InvalidArgument unless `parent` is "" or a committed snapshot.
    fn check_parent(&self, parent: &str) -> Result<()> {
        if parent.is_empty() {
            return Ok(());
        }
        let p = self
            .get(parent)?
            .ok_or_else(|| Error::NotFound(format!("parent snapshot {parent:?}")))?;
        if p.kind != Kind::Committed {
            return Err(Error::InvalidArgument(format!(
                "parent {parent:?} is not a committed snapshot"
            )));
        }
        Ok(())
    }

    /// The ids of `parent`'s chain, checking that it is committed.
    fn committed_parents(&self, parent: &str) -> Result<Vec<u64>> {
        self.check_parent(parent)?;
        self.refresh_lazy(parent)?;
        self.parent_ids(parent)
    }

    /// The committed snapshot labelled as `target` over `parent`, if any.
    fn find_target(&self, target: &str, parent: &str) -> Result<Option<String>> {
        Ok(self.all()?.into_iter().find_map(|(k, r)| {
            (r.kind == Kind::Committed
                && r.parent == parent
                && r.labels.get(TARGET_SNAPSHOT_LABEL).map(String::as_str) == Some(target))
            .then_some(k)
        }))
    }

    /// Re-mounts the lazy layers of `parent`'s chain whose mount was made from a
    /// fetch daemon that has since restarted: such a mount cannot read anything not
    /// already cached by the kernel. Running containers keep the old mount (their
    /// overlay holds it); new snapshots get the fresh one at the same place.
    fn refresh_lazy(&self, parent: &str) -> Result<()> {
        let Some(remote) = &self.remote else { return Ok(()) };
        let mut chain = Vec::new();
        let mut cur = parent.to_string();
        while !cur.is_empty() {
            let Some(r) = self.get(&cur)? else { break };
            cur = r.parent.clone();
            if r.remote.is_some() {
                chain.push(r);
            }
        }
        if chain.is_empty() {
            return Ok(());
        }
        let Some(now) = remote.instance() else {
            return Err(Error::Unavailable("the fetch daemon does not answer".into()));
        };
        for rec in chain {
            let mounted = self.attached.lock().unwrap().get(&rec.id).copied();
            if mounted == Some(now) {
                continue;
            }
            tracing::warn!(
                id = rec.id,
                ?mounted,
                now,
                "fetch daemon restarted: mounting the lazy layer again"
            );
            let mp = self.mountpoint(rec.id);
            mounts::unmount(&mp).map_err(internal)?;
            self.mount_layer(&rec)
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
        fs::write(staged.join(".erofslayer"), b"")?;
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

    fn mounts_of(&self, rec: &Record, parents: &[u64]) -> Vec<Mount> {
        let fs_dir = self.dir(rec.id).join("fs");
        let lowers: Vec<PathBuf> = parents.iter().map(|p| self.mountpoint(*p)).collect();
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
        let rec = self.get_existing(key)?;
        if rec.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed, not active or a view"
            )));
        }
        self.refresh_lazy(&rec.parent)?;
        let parents = self.parent_ids(&rec.parent)?;
        Ok(self.mounts_of(&rec, &parents))
    }

    /// Commits the active snapshot `key` as `name`. Unless a differ already wrote
    /// `layer.erofs`, the upper dir is converted to EROFS first (outside the lock:
    /// other snapshots go on meanwhile).
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("snapshot name must not be empty".into()));
        }
        self.trash.touch();
        let rec = {
            let _g = self.lock.lock().unwrap();
            let rec = self.get_existing(key)?;
            if rec.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!("snapshot {key:?} is not active")));
            }
            if self.get(name)?.is_some() {
                return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
            }
            if !self.committing.lock().unwrap().insert(key.to_string()) {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is being committed"
                )));
            }
            rec
        };
        let result = self.commit_inner(name, key, labels, rec);
        self.committing.lock().unwrap().remove(key);
        result
    }

    fn commit_inner(&self, name: &str, key: &str, labels: BTreeMap<String, String>, rec: Record) -> Result<()> {
        let dir = self.dir(rec.id);
        let blob = dir.join("layer.erofs");
        // Kept alive until the layer is recorded: its pins protect the blobs it names.
        let mut session = None;
        let mut converted: Option<(SinkReport, u64)> = None;
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
                ..Default::default()
            };
            let conv_err =
                |e: layer_convert::Error| Error::Internal(format!("converting snapshot {key:?} to EROFS: {e}"));
            session = self.dedup_session()?;
            match &session {
                None => {
                    layer_convert::convert_dir(&dir.join("fs"), &blob, &opts).map_err(conv_err)?;
                }
                Some(sess) => {
                    let (_, report) = sess
                        .run(|sink| layer_convert::convert_dir_with(&dir.join("fs"), &blob, &opts, Some(sink)))
                        .map_err(conv_err)?;
                    fsync_dir(&self.blob_dir()).map_err(internal)?;
                    let logical = report.logical_bytes;
                    converted = Some((report, logical));
                }
            }
        }
        let image =
            erofs::reader::Image::open(&blob).map_err(|e| Error::Internal(format!("{}: {e}", blob.display())))?;
        let size = fs::metadata(&blob).map_err(internal)?.len() as i64;
        let inodes = image.superblock().inos as i64;
        drop(image);
        // Mounted before the record says committed; a crash in between leaves an
        // active snapshot with a stray mount, which start-up removes.
        let mp = self.mountpoint(rec.id);
        let mut mounted = rec.clone();
        if let Some((report, _)) = &converted {
            mounted.blobs = report.devices.clone();
        }
        if let Err(e) = self.mount_layer(&mounted) {
            if let Some((report, _)) = &converted {
                if let Some(own) = &report.own {
                    let _ = fs::remove_file(&own.path);
                }
                let _ = fs::remove_file(&blob);
            }
            return Err(Error::Internal(format!("mounting {}: {e}", blob.display())));
        }

        let guard = self.lock.lock().unwrap();
        let res = (|| {
            let cur = self.get_existing(key)?;
            if cur.id != rec.id || cur.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} changed during commit"
                )));
            }
            if self.get(name)?.is_some() {
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
                ..cur
            };
            let txn = self.db.begin_write().map_err(internal)?;
            if let Some((report, logical)) = &converted {
                // A differ's Apply recorded its blobs on the active record already;
                // this conversion replaces the image, so those references go.
                blobs::release(&txn, &committed.blobs)?;
                blobs::record(&txn, report)?;
                committed.blobs = report.devices.clone();
                committed.logical = *logical;
            }
            {
                let mut t = txn.open_table(SNAPSHOTS).map_err(internal)?;
                t.remove(key).map_err(internal)?;
                t.insert(name, serde_json::to_vec(&committed).map_err(internal)?.as_slice())
                    .map_err(internal)?;
            }
            txn.commit().map_err(internal)
        })();
        if let Err(e) = res {
            let _ = mounts::unmount(&mp);
            if let Some((report, _)) = &converted {
                if let Some(own) = &report.own {
                    let _ = fs::remove_file(&own.path);
                }
                let _ = fs::remove_file(&blob);
            }
            return Err(e);
        }
        // Unpinning may delete blobs, which takes the lock.
        drop(guard);
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
        let _g = self.lock.lock().unwrap();
        let rec = self.get_existing(key)?;
        if self.all()?.iter().any(|(_, r)| r.parent == key) {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key:?}: it has children"
            )));
        }
        if self.committing.lock().unwrap().contains(key) {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is being committed"
            )));
        }
        let txn = self.db.begin_write().map_err(internal)?;
        {
            let mut t = txn.open_table(SNAPSHOTS).map_err(internal)?;
            t.remove(key).map_err(internal)?;
        }
        blobs::release(&txn, &rec.blobs)?;
        txn.commit().map_err(internal)?;
        // After the record is gone: a crash here leaves only orphans for start-up.
        // The layer is unmounted before its blobs go.
        self.remove_files(rec.id);
        self.attached.lock().unwrap().remove(&rec.id);
        if !rec.blobs.is_empty() {
            self.collect_blobs()?;
        }
        if let (Some(layer), Some(remote)) = (&rec.remote, &self.remote) {
            // Another chain may mount the same blob.
            if !self
                .all()?
                .iter()
                .any(|(_, r)| r.remote.as_ref().is_some_and(|l| l.digest == layer.digest))
            {
                remote.detach(layer);
            }
        }
        Ok(())
    }

    fn remove_files(&self, id: u64) {
        let mp = self.mountpoint(id);
        if mp.exists() {
            if let Err(e) = mounts::unmount(&mp) {
                tracing::warn!(path = %mp.display(), error = %e, "unmounting a removed layer");
            }
            let _ = fs::remove_dir(&mp);
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
        Ok(self.get_existing(key)?.info(key))
    }

    /// Updates labels (`labels` or `labels.<key>` field paths; none = all labels).
    pub fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info> {
        let _g = self.lock.lock().unwrap();
        let mut rec = self.get_existing(&info.name)?;
        if fieldpaths.is_empty() {
            rec.labels = info.labels;
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
        let txn = self.db.begin_write().map_err(internal)?;
        {
            let mut t = txn.open_table(SNAPSHOTS).map_err(internal)?;
            t.insert(
                info.name.as_str(),
                serde_json::to_vec(&rec).map_err(internal)?.as_slice(),
            )
            .map_err(internal)?;
        }
        txn.commit().map_err(internal)?;
        Ok(rec.info(&info.name))
    }

    /// Disk usage: the blob of a committed snapshot, the upper dir of an active one.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let rec = self.get_existing(key)?;
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
        Ok(self.all()?.into_iter().map(|(k, r)| r.info(&k)).collect())
    }

    /// Removes directories, mounts and blobs no record owns, and deletes blobs no
    /// layer names any more (counting the references afresh).
    pub fn cleanup(&self) -> Result<()> {
        let _g = self.lock.lock().unwrap();
        self.repair_blob_counts()?;
        self.remove_orphans()
    }

    /// Sets every blob's reference count to what the records name, then deletes the
    /// unreferenced ones (pinned blobs wait). Call with the lock held, or before the
    /// store is shared.
    fn repair_blob_counts(&self) -> Result<()> {
        let owners: Vec<Vec<BlobId>> = self.all()?.into_iter().map(|(_, r)| r.blobs).collect();
        let txn = self.db.begin_write().map_err(internal)?;
        let fixed = blobs::recount(&txn, &owners)?;
        txn.commit().map_err(internal)?;
        if fixed > 0 {
            tracing::warn!(blobs = fixed, "repaired blob reference counts");
        }
        self.collect_blobs()
    }

    fn remove_orphans(&self) -> Result<()> {
        let records = self.all()?;
        let known: HashSet<u64> = records.iter().map(|(_, r)| r.id).collect();
        let committed: HashSet<u64> = records
            .iter()
            .filter(|(_, r)| r.kind == Kind::Committed)
            .map(|(_, r)| r.id)
            .collect();
        let busy: HashSet<String> = self.committing.lock().unwrap().clone();
        let busy_ids: HashSet<u64> = records
            .iter()
            .filter(|(k, _)| busy.contains(k))
            .map(|(_, r)| r.id)
            .collect();
        for entry in fs::read_dir(self.root.join("m")).map_err(internal)? {
            let entry = entry.map_err(internal)?;
            let id = entry.file_name().to_string_lossy().parse::<u64>().ok();
            if id.is_some_and(|id| committed.contains(&id) || busy_ids.contains(&id)) {
                continue;
            }
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
        let txn = self.db.begin_read().map_err(internal)?;
        let recorded: HashSet<BlobId> = blobs::known(&txn)?.into_iter().collect();
        drop(txn);
        blobs::remove_files_except(&self.blob_dir(), |id| recorded.contains(&id) || self.pins.is_pinned(id));
        // Staged dirs never recorded, and trees a commit moved aside (a background
        // deletion may be on them too; whoever comes second finds nothing).
        for d in ["staging", "trash"] {
            for entry in fs::read_dir(self.root.join(d)).map_err(internal)? {
                let _ = fs::remove_dir_all(entry.map_err(internal)?.path());
            }
        }
        Ok(())
    }

    /// Start-up repair: orphans removed, committed layers mounted, leftovers of
    /// interrupted commits cleared.
    fn repair(&self) -> Result<()> {
        self.repair_blob_counts()?;
        self.remove_orphans()?;
        let mounted = mounts::mounted_under(&self.root.join("m")).map_err(internal)?;
        for (key, rec) in self.all()? {
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
                    // that crashed before it was recorded (a differ's blob leaves `fs/`
                    // empty): the tree may have changed since, so convert again.
                    let nonempty = fs::read_dir(dir.join("fs"))
                        .map(|mut r| r.next().is_some())
                        .unwrap_or(false);
                    if nonempty {
                        let _ = fs::remove_file(dir.join("layer.erofs"));
                    }
                    if let Ok(rd) = fs::read_dir(&dir) {
                        for e in rd.flatten() {
                            // Temp files of a conversion (`.layer.erofs.tmp-*`), and a
                            // differ's blob not yet verified (`layer.erofs.apply` and its temp).
                            let name = e.file_name().to_string_lossy().into_owned();
                            if name.starts_with(".layer.erofs") || name == "layer.erofs.apply" {
                                let _ = fs::remove_file(e.path());
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Lazily unmounts every committed layer: for a clean stop. Running containers
    /// keep their overlay's references; the next start mounts the layers again.
    pub fn shutdown(&self) {
        if let Ok(mounted) = mounts::mounted_under(&self.root.join("m")) {
            for mp in mounted {
                let _ = mounts::unmount(&mp);
            }
        }
    }
}

/// Takes the next value of a counter (ids of snapshots and blobs, never reused).
fn next_counter(txn: &redb::WriteTransaction, name: &str) -> Result<u64> {
    let mut c = txn.open_table(COUNTERS).map_err(internal)?;
    let id = c.get(name).map_err(internal)?.map(|v| v.value()).unwrap_or(1);
    c.insert(name, id + 1).map_err(internal)?;
    Ok(id)
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
