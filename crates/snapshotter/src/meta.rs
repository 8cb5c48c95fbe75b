//! The snapshot records and their indexes, as transaction-scoped functions (as
//! containerd's `snapshots/storage` does over bolt): every RPC of the store runs in
//! one redb transaction, and only the functions here touch the tables.
//!
//! ```text
//! table snapshots   key -> Record (JSON)
//! table ids         id -> key                        snapshot dir / mount -> record
//! table children    (parent, key) -> ()              "has children", without a scan
//! table targets     (parent, snapshot.ref) -> key    committed layers by containerd's target label
//! table remotes     (digest, id) -> ()               lazy layers by blob, for detaching
//! table counters    name -> u64                      ids, and the schema version
//! ```
//!
//! The indexes are written by [`put`] and [`delete`] only, in the same transaction
//! as the record, so they cannot disagree with it. A database written before they
//! existed is indexed once at open ([`migrate`]).

use std::collections::BTreeMap;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use dedup::BlobId;

use crate::{Error, Info, Kind, Result};

pub(crate) const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const IDS: TableDefinition<u64, &str> = TableDefinition::new("ids");
const CHILDREN: TableDefinition<(&str, &str), ()> = TableDefinition::new("children");
const TARGETS: TableDefinition<(&str, &str), &str> = TableDefinition::new("targets");
const REMOTES: TableDefinition<(&str, u64), ()> = TableDefinition::new("remotes");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// The schema this code writes: 2 = records plus the index tables.
const SCHEMA: u64 = 2;

/// The label containerd puts on a Prepare to say which committed snapshot the
/// layer would become: a snapshotter that can make it without the layer's data
/// does so and answers AlreadyExists, and containerd downloads nothing.
pub const TARGET_SNAPSHOT_LABEL: &str = "containerd.io/snapshot.ref";

pub(crate) fn internal<E: std::fmt::Display>(e: E) -> Error {
    Error::Internal(e.to_string())
}

/// A layer mounted from a blob that is fetched on demand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// The blob's digest.
    pub digest: String,
    /// The blob's size in bytes.
    pub size: u64,
    /// What the [`crate::RemoteLayers`] implementation needs to attach the blob again
    /// (after a restart of either daemon); opaque to the store.
    pub spec: serde_json::Value,
}

/// The persisted record of one snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub id: u64,
    pub kind: Kind,
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    pub created: (u64, u32),
    pub updated: (u64, u32),
    pub size: i64,
    pub inodes: i64,
    /// Blobs the layer's device table names, in device order (dedup only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blobs: Vec<BlobId>,
    /// File bytes of the layer (dedup only; what it would take without sharing).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub logical: u64,
    /// A lazily fetched layer: the blob the mount reads through the fetch daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteLayer>,
    /// An active snapshot or view mounted over its parent chain's merged metadata:
    /// the id of the chain's top layer, whose merged image (`merged/<id>`) is its one
    /// lower.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged: Option<u64>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Record {
    /// A new record of `kind` over `parent`, created and updated now.
    pub fn new(id: u64, kind: Kind, parent: &str, labels: BTreeMap<String, String>) -> Record {
        let now = now_pair();
        Record {
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
            merged: None,
        }
    }

    pub fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_string(),
            parent: self.parent.clone(),
            kind: self.kind,
            labels: self.labels.clone(),
            created: from_pair(self.created),
            updated: from_pair(self.updated),
        }
    }

    /// The target label, when this is a committed layer containerd can find by it.
    fn target(&self) -> Option<&str> {
        (self.kind == Kind::Committed)
            .then(|| self.labels.get(TARGET_SNAPSHOT_LABEL).map(String::as_str))
            .flatten()
    }
}

pub(crate) fn now_pair() -> (u64, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

fn from_pair((s, n): (u64, u32)) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::new(s, n)
}

fn decode(v: &[u8]) -> Result<Record> {
    serde_json::from_slice(v).map_err(internal)
}

/// Creates the tables and indexes a database written before the indexes existed.
pub(crate) fn migrate(db: &Database) -> Result<()> {
    let txn = db.begin_write().map_err(internal)?;
    let schema = {
        let mut c = txn.open_table(COUNTERS).map_err(internal)?;
        let v = c.get("schema").map_err(internal)?.map(|v| v.value()).unwrap_or(1);
        c.insert("schema", SCHEMA).map_err(internal)?;
        v
    };
    txn.open_table(SNAPSHOTS).map_err(internal)?;
    txn.open_table(IDS).map_err(internal)?;
    txn.open_table(CHILDREN).map_err(internal)?;
    txn.open_table(TARGETS).map_err(internal)?;
    txn.open_table(REMOTES).map_err(internal)?;
    if schema > SCHEMA {
        return Err(Error::Internal(format!(
            "the metadata database has schema {schema}, newer than this version's {SCHEMA}"
        )));
    }
    if schema < SCHEMA {
        let records: Vec<(String, Record)> = {
            let t = txn.open_table(SNAPSHOTS).map_err(internal)?;
            let mut v = Vec::new();
            for item in t.iter().map_err(internal)? {
                let (k, r) = item.map_err(internal)?;
                v.push((k.value().to_string(), decode(r.value())?));
            }
            v
        };
        for (k, r) in &records {
            index(&txn, k, r)?;
        }
        tracing::info!(snapshots = records.len(), "indexed the metadata database");
    }
    txn.commit().map_err(internal)
}

/// The record of `key`, in any transaction.
pub(crate) fn get(t: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<Option<Record>> {
    t.get(key).map_err(internal)?.map(|v| decode(v.value())).transpose()
}

/// Reads in a read transaction.
pub(crate) fn read<T>(db: &Database, f: impl FnOnce(&Reader) -> Result<T>) -> Result<T> {
    let txn = db.begin_read().map_err(internal)?;
    f(&Reader { txn })
}

/// One write transaction: `f`'s changes are committed when it returns `Ok`, and
/// none of them when it fails (or panics: the transaction is dropped, not committed).
pub(crate) fn write<T>(db: &Database, f: impl FnOnce(&WriteTransaction) -> Result<T>) -> Result<T> {
    let txn = db.begin_write().map_err(internal)?;
    let v = f(&txn)?;
    txn.commit().map_err(internal)?;
    Ok(v)
}

/// Runs read-only checks in a write transaction and aborts it: serialised with every
/// writer (so a check cannot fall between another RPC's check and write), and free of
/// the commit's fsync.
pub(crate) fn check<T>(db: &Database, f: impl FnOnce(&WriteTransaction) -> Result<T>) -> Result<T> {
    let txn = db.begin_write().map_err(internal)?;
    let v = f(&txn);
    txn.abort().map_err(internal)?;
    v
}

/// A read transaction over the records.
pub(crate) struct Reader {
    txn: redb::ReadTransaction,
}

impl Reader {
    pub fn get(&self, key: &str) -> Result<Option<Record>> {
        get(&self.txn.open_table(SNAPSHOTS).map_err(internal)?, key)
    }

    pub fn get_existing(&self, key: &str) -> Result<Record> {
        self.get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))
    }

    pub fn key_of(&self, id: u64) -> Result<Option<String>> {
        let t = self.txn.open_table(IDS).map_err(internal)?;
        Ok(t.get(id).map_err(internal)?.map(|v| v.value().to_string()))
    }

    pub fn parents(&self, parent: &str) -> Result<Vec<(String, Record)>> {
        parents(&self.txn.open_table(SNAPSHOTS).map_err(internal)?, parent)
    }

    pub fn find_target(&self, parent: &str, target: &str) -> Result<Option<String>> {
        let t = self.txn.open_table(TARGETS).map_err(internal)?;
        Ok(t.get((parent, target))
            .map_err(internal)?
            .map(|v| v.value().to_string()))
    }

    /// Whether a child of `parent` is mounted over the merged image of id `merged`.
    pub fn merged_in_use(&self, parent: &str, merged: u64) -> Result<bool> {
        let children = self.txn.open_table(CHILDREN).map_err(internal)?;
        let records = self.txn.open_table(SNAPSHOTS).map_err(internal)?;
        for item in children.range((parent, "")..).map_err(internal)? {
            let (k, _) = item.map_err(internal)?;
            let (p, c) = k.value();
            if p != parent {
                break;
            }
            if get(&records, c)?.is_some_and(|r| r.merged == Some(merged)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Every record: for List, stats and start-up, which must see them all.
    pub fn all(&self) -> Result<Vec<(String, Record)>> {
        let t = self.txn.open_table(SNAPSHOTS).map_err(internal)?;
        let mut out = Vec::with_capacity(t.len().map_err(internal)? as usize);
        for item in t.iter().map_err(internal)? {
            let (k, v) = item.map_err(internal)?;
            out.push((k.value().to_string(), decode(v.value())?));
        }
        Ok(out)
    }

    /// Where the indexes disagree with the records (empty when they agree).
    pub fn index_problems(&self) -> Result<Vec<String>> {
        let records = self.all()?;
        let by_key: BTreeMap<&str, &Record> = records.iter().map(|(k, r)| (k.as_str(), r)).collect();
        let mut want_ids = BTreeMap::new();
        let mut want_children = std::collections::BTreeSet::new();
        let mut want_targets = BTreeMap::new();
        let mut want_remotes = std::collections::BTreeSet::new();
        let mut problems = Vec::new();
        for (k, r) in &records {
            if let Some(other) = want_ids.insert(r.id, k.clone()) {
                problems.push(format!("snapshots {other:?} and {k:?} share id {}", r.id));
            }
            if !r.parent.is_empty() {
                want_children.insert((r.parent.clone(), k.clone()));
                if !by_key.contains_key(r.parent.as_str()) {
                    problems.push(format!("snapshot {k:?} names a missing parent {:?}", r.parent));
                }
            }
            if let Some(t) = r.target() {
                want_targets.insert((r.parent.clone(), t.to_string()), k.clone());
            }
            if let Some(l) = &r.remote {
                want_remotes.insert((l.digest.clone(), r.id));
            }
        }
        let mut ids = BTreeMap::new();
        for item in self.txn.open_table(IDS).map_err(internal)?.iter().map_err(internal)? {
            let (k, v) = item.map_err(internal)?;
            ids.insert(k.value(), v.value().to_string());
        }
        let mut children = std::collections::BTreeSet::new();
        for item in self
            .txn
            .open_table(CHILDREN)
            .map_err(internal)?
            .iter()
            .map_err(internal)?
        {
            let (k, _) = item.map_err(internal)?;
            let (p, c) = k.value();
            children.insert((p.to_string(), c.to_string()));
        }
        let mut targets = BTreeMap::new();
        for item in self
            .txn
            .open_table(TARGETS)
            .map_err(internal)?
            .iter()
            .map_err(internal)?
        {
            let (k, v) = item.map_err(internal)?;
            let (p, t) = k.value();
            targets.insert((p.to_string(), t.to_string()), v.value().to_string());
        }
        let mut remotes = std::collections::BTreeSet::new();
        for item in self
            .txn
            .open_table(REMOTES)
            .map_err(internal)?
            .iter()
            .map_err(internal)?
        {
            let (k, _) = item.map_err(internal)?;
            let (d, id) = k.value();
            remotes.insert((d.to_string(), id));
        }
        if ids != want_ids {
            problems.push(format!("the id index is {ids:?}, the records say {want_ids:?}"));
        }
        if children != want_children {
            problems.push(format!(
                "the parent index is {children:?}, the records say {want_children:?}"
            ));
        }
        // Two committed layers may carry the same target over one parent only when
        // the labels were set by Update; the index names one of them.
        for (pt, key) in &targets {
            if !want_targets.contains_key(pt)
                || by_key.get(key.as_str()).and_then(|r| r.target()) != Some(pt.1.as_str())
            {
                problems.push(format!("the target index maps {pt:?} to {key:?}, which no record says"));
            }
        }
        for pt in want_targets.keys() {
            if !targets.contains_key(pt) {
                problems.push(format!("the target index lacks {pt:?}"));
            }
        }
        if remotes != want_remotes {
            problems.push(format!(
                "the remote index is {remotes:?}, the records say {want_remotes:?}"
            ));
        }
        Ok(problems)
    }

    pub fn txn(&self) -> &redb::ReadTransaction {
        &self.txn
    }
}

/// `parent` and its ancestors, nearest first: one lookup per layer.
fn parents(t: &impl ReadableTable<&'static str, &'static [u8]>, parent: &str) -> Result<Vec<(String, Record)>> {
    let mut out: Vec<(String, Record)> = Vec::new();
    let mut cur = parent.to_string();
    while !cur.is_empty() {
        let r = get(t, &cur)?.ok_or_else(|| Error::Internal(format!("parent {cur:?} of a snapshot is missing")))?;
        let next = r.parent.clone();
        out.push((cur, r));
        cur = next;
        if out.len() > 10_000 {
            return Err(Error::Internal("parent chain too long (cycle?)".into()));
        }
    }
    Ok(out)
}

/// The write side: every function takes the RPC's transaction.
pub(crate) fn get_w(txn: &WriteTransaction, key: &str) -> Result<Option<Record>> {
    get(&txn.open_table(SNAPSHOTS).map_err(internal)?, key)
}

pub(crate) fn get_existing_w(txn: &WriteTransaction, key: &str) -> Result<Record> {
    get_w(txn, key)?.ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))
}

/// `parent`'s chain, nearest first, checking that `parent` is "" or committed.
pub(crate) fn committed_chain(txn: &WriteTransaction, parent: &str) -> Result<Vec<(String, Record)>> {
    let t = txn.open_table(SNAPSHOTS).map_err(internal)?;
    check_parent(get(&t, parent)?.as_ref(), parent)?;
    parents(&t, parent)
}

/// NotFound or InvalidArgument unless `parent` is "" or a committed snapshot.
pub(crate) fn check_parent(rec: Option<&Record>, parent: &str) -> Result<()> {
    if parent.is_empty() {
        return Ok(());
    }
    let p = rec.ok_or_else(|| Error::NotFound(format!("parent snapshot {parent:?}")))?;
    if p.kind != Kind::Committed {
        return Err(Error::InvalidArgument(format!(
            "parent {parent:?} is not a committed snapshot"
        )));
    }
    Ok(())
}

/// Writes `rec` as `key`, replacing `old` (the record `key` had, if any), and
/// keeps the indexes in step.
pub(crate) fn put(txn: &WriteTransaction, key: &str, old: Option<&Record>, rec: &Record) -> Result<()> {
    if let Some(old) = old {
        unindex(txn, key, old)?;
    }
    let mut t = txn.open_table(SNAPSHOTS).map_err(internal)?;
    t.insert(key, serde_json::to_vec(rec).map_err(internal)?.as_slice())
        .map_err(internal)?;
    drop(t);
    index(txn, key, rec)
}

/// Deletes `key`'s record `rec` and its index entries.
pub(crate) fn delete(txn: &WriteTransaction, key: &str, rec: &Record) -> Result<()> {
    txn.open_table(SNAPSHOTS)
        .map_err(internal)?
        .remove(key)
        .map_err(internal)?;
    unindex(txn, key, rec)
}

fn index(txn: &WriteTransaction, key: &str, rec: &Record) -> Result<()> {
    txn.open_table(IDS)
        .map_err(internal)?
        .insert(rec.id, key)
        .map_err(internal)?;
    if !rec.parent.is_empty() {
        txn.open_table(CHILDREN)
            .map_err(internal)?
            .insert((rec.parent.as_str(), key), ())
            .map_err(internal)?;
    }
    if let Some(target) = rec.target() {
        txn.open_table(TARGETS)
            .map_err(internal)?
            .insert((rec.parent.as_str(), target), key)
            .map_err(internal)?;
    }
    if let Some(r) = &rec.remote {
        txn.open_table(REMOTES)
            .map_err(internal)?
            .insert((r.digest.as_str(), rec.id), ())
            .map_err(internal)?;
    }
    Ok(())
}

fn unindex(txn: &WriteTransaction, key: &str, rec: &Record) -> Result<()> {
    {
        let mut ids = txn.open_table(IDS).map_err(internal)?;
        // Only our own entry: a commit moves the id to the new name first.
        let ours = ids.get(rec.id).map_err(internal)?.is_some_and(|v| v.value() == key);
        if ours {
            ids.remove(rec.id).map_err(internal)?;
        }
    }
    if !rec.parent.is_empty() {
        txn.open_table(CHILDREN)
            .map_err(internal)?
            .remove((rec.parent.as_str(), key))
            .map_err(internal)?;
    }
    if let Some(target) = rec.target() {
        let mut t = txn.open_table(TARGETS).map_err(internal)?;
        let ours = t
            .get((rec.parent.as_str(), target))
            .map_err(internal)?
            .is_some_and(|v| v.value() == key);
        if ours {
            t.remove((rec.parent.as_str(), target)).map_err(internal)?;
        }
    }
    if let Some(r) = &rec.remote {
        txn.open_table(REMOTES)
            .map_err(internal)?
            .remove((r.digest.as_str(), rec.id))
            .map_err(internal)?;
    }
    Ok(())
}

/// Whether some snapshot names `key` as its parent.
pub(crate) fn has_children(txn: &WriteTransaction, key: &str) -> Result<bool> {
    let t = txn.open_table(CHILDREN).map_err(internal)?;
    let mut r = t.range((key, "")..).map_err(internal)?;
    let found = match r.next() {
        Some(item) => item.map_err(internal)?.0.value().0 == key,
        None => false,
    };
    Ok(found)
}

/// The committed snapshot labelled `target` over `parent`.
pub(crate) fn find_target_w(txn: &WriteTransaction, parent: &str, target: &str) -> Result<Option<String>> {
    let t = txn.open_table(TARGETS).map_err(internal)?;
    let key = t
        .get((parent, target))
        .map_err(internal)?
        .map(|v| v.value().to_string());
    Ok(key)
}

/// Whether any lazy layer still mounts the blob `digest`.
pub(crate) fn remote_in_use(txn: &WriteTransaction, digest: &str) -> Result<bool> {
    let t = txn.open_table(REMOTES).map_err(internal)?;
    let mut r = t.range((digest, 0u64)..).map_err(internal)?;
    let found = match r.next() {
        Some(item) => item.map_err(internal)?.0.value().0 == digest,
        None => false,
    };
    Ok(found)
}

/// Takes the next value of a counter (ids of snapshots and blobs, never reused).
pub(crate) fn next_counter(txn: &WriteTransaction, name: &str) -> Result<u64> {
    let mut c = txn.open_table(COUNTERS).map_err(internal)?;
    let id = c.get(name).map_err(internal)?.map(|v| v.value()).unwrap_or(1);
    c.insert(name, id + 1).map_err(internal)?;
    Ok(id)
}
