//! The node-local chunk store: which blobs exist, which chunks they hold, and how many
//! snapshots name each blob in their device tables.
//!
//! ```text
//! blobs/<16 hex>          a blob: block-aligned chunks, an extra EROFS device
//! table blobs             id -> {blocks, refs}
//! table chunks            blake3 -> (blob id, first block)     the chunk index
//! table blob_chunks       id -> the digests it holds           (to drop them with it)
//! ```
//!
//! A snapshot's record lists the blobs its `layer.erofs` names, in device order, and
//! each listed blob counts one reference. References are added in the same
//! transaction that records the layer, and dropped in the one that deletes it, so the
//! counts are exact after any crash; start-up recounts them from the records anyway
//! and deletes blob files no record owns (a crash between writing a blob and recording
//! it). A blob whose count reaches zero is deleted with its index entries, unless a
//! conversion in progress has it pinned: conversions look chunks up in blobs that must
//! not vanish before their layer is recorded.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use dedup::{BlobId, ChunkDigest, ChunkLookup, Located, SinkReport};
use redb::{ReadOnlyTable, ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub(crate) const BLOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("blobs");
pub(crate) const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
pub(crate) const BLOB_CHUNKS: TableDefinition<u64, &[u8]> = TableDefinition::new("blob_chunks");

fn internal<E: std::fmt::Display>(e: E) -> Error {
    Error::Internal(e.to_string())
}

/// A blob's record.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct BlobRecord {
    /// Size in blocks.
    pub blocks: u32,
    /// Snapshots whose device table names it.
    pub refs: u64,
    /// Chunks it holds.
    pub chunks: u64,
}

fn encode_loc(l: Located) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..8].copy_from_slice(&l.blob.to_le_bytes());
    v[8..].copy_from_slice(&l.blkaddr.to_le_bytes());
    v
}

fn decode_loc(v: &[u8]) -> Option<Located> {
    Some(Located {
        blob: u64::from_le_bytes(v.get(..8)?.try_into().ok()?),
        blkaddr: u32::from_le_bytes(v.get(8..12)?.try_into().ok()?),
    })
}

/// The chunk index as one conversion sees it: a read transaction, so the answers
/// stay consistent while the layer streams through, over blobs pinned for as long.
pub(crate) struct Lookup {
    chunks: ReadOnlyTable<&'static [u8], &'static [u8]>,
    blocks: HashMap<BlobId, u32>,
    _txn: ReadTransaction,
}

impl Lookup {
    pub(crate) fn new(txn: ReadTransaction) -> Result<Lookup> {
        let chunks = txn.open_table(CHUNKS).map_err(internal)?;
        let mut blocks = HashMap::new();
        for item in txn.open_table(BLOBS).map_err(internal)?.iter().map_err(internal)? {
            let (k, v) = item.map_err(internal)?;
            let r: BlobRecord = serde_json::from_slice(v.value()).map_err(internal)?;
            blocks.insert(k.value(), r.blocks);
        }
        Ok(Lookup {
            chunks,
            blocks,
            _txn: txn,
        })
    }

    /// The blobs this view can answer with.
    pub(crate) fn blobs(&self) -> impl Iterator<Item = BlobId> + '_ {
        self.blocks.keys().copied()
    }
}

impl ChunkLookup for Lookup {
    fn lookup(&self, digest: &ChunkDigest) -> Option<Located> {
        let v = self.chunks.get(&digest[..]).ok()??;
        decode_loc(v.value()).filter(|l| self.blocks.contains_key(&l.blob))
    }

    fn blob_blocks(&self, blob: BlobId) -> u32 {
        self.blocks.get(&blob).copied().unwrap_or(0)
    }
}

/// Blobs in use by conversions that have not recorded their layer yet (the blobs
/// their lookups may answer with, and the blob each is writing).
#[derive(Default)]
pub(crate) struct Pins(Mutex<HashMap<BlobId, u32>>);

impl Pins {
    pub(crate) fn pin(&self, ids: impl IntoIterator<Item = BlobId>) -> Vec<BlobId> {
        let mut m = crate::store::lock(&self.0);
        let ids: Vec<BlobId> = ids.into_iter().collect();
        for id in &ids {
            *m.entry(*id).or_default() += 1;
        }
        ids
    }

    pub(crate) fn unpin(&self, ids: &[BlobId]) {
        let mut m = crate::store::lock(&self.0);
        for id in ids {
            if let Some(n) = m.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    m.remove(id);
                }
            }
        }
    }

    pub(crate) fn is_pinned(&self, id: BlobId) -> bool {
        crate::store::lock(&self.0).contains_key(&id)
    }
}

/// Records a conversion's new blob and chunks, and adds one reference to every blob
/// its device table names.
pub(crate) fn record(txn: &WriteTransaction, report: &SinkReport) -> Result<()> {
    let mut blobs = txn.open_table(BLOBS).map_err(internal)?;
    if let Some(own) = &report.own {
        let mut chunks = txn.open_table(CHUNKS).map_err(internal)?;
        let mut digests = Vec::with_capacity(own.chunks.len() * 32);
        for (d, blkaddr) in &own.chunks {
            // A digest another conversion recorded meanwhile keeps its first home.
            if chunks.get(&d[..]).map_err(internal)?.is_none() {
                let loc = encode_loc(Located {
                    blob: own.id,
                    blkaddr: *blkaddr,
                });
                chunks.insert(&d[..], &loc[..]).map_err(internal)?;
            }
            digests.extend_from_slice(d);
        }
        txn.open_table(BLOB_CHUNKS)
            .map_err(internal)?
            .insert(own.id, digests.as_slice())
            .map_err(internal)?;
        let rec = BlobRecord {
            blocks: own.blocks,
            refs: 0,
            chunks: own.chunks.len() as u64,
        };
        blobs
            .insert(own.id, serde_json::to_vec(&rec).map_err(internal)?.as_slice())
            .map_err(internal)?;
    }
    for id in &report.devices {
        let mut rec: BlobRecord = match blobs.get(*id).map_err(internal)? {
            Some(v) => serde_json::from_slice(v.value()).map_err(internal)?,
            None => return Err(Error::Internal(format!("blob {id:016x} vanished during a conversion"))),
        };
        rec.refs += 1;
        blobs
            .insert(*id, serde_json::to_vec(&rec).map_err(internal)?.as_slice())
            .map_err(internal)?;
    }
    Ok(())
}

/// Drops one reference from each of `ids`.
pub(crate) fn release(txn: &WriteTransaction, ids: &[BlobId]) -> Result<()> {
    let mut blobs = txn.open_table(BLOBS).map_err(internal)?;
    for id in ids {
        let rec = blobs.get(*id).map_err(internal)?.map(|v| v.value().to_vec());
        if let Some(v) = rec {
            let mut rec: BlobRecord = serde_json::from_slice(&v).map_err(internal)?;
            rec.refs = rec.refs.saturating_sub(1);
            blobs
                .insert(*id, serde_json::to_vec(&rec).map_err(internal)?.as_slice())
                .map_err(internal)?;
        }
    }
    Ok(())
}

/// Sets every blob's count to the references `owners` make (start-up repair).
pub(crate) fn recount(txn: &WriteTransaction, owners: &[Vec<BlobId>]) -> Result<usize> {
    let mut counts: BTreeMap<BlobId, u64> = BTreeMap::new();
    for list in owners {
        for id in list {
            *counts.entry(*id).or_default() += 1;
        }
    }
    let mut blobs = txn.open_table(BLOBS).map_err(internal)?;
    let mut fixed = Vec::new();
    for item in blobs.iter().map_err(internal)? {
        let (k, v) = item.map_err(internal)?;
        let mut rec: BlobRecord = serde_json::from_slice(v.value()).map_err(internal)?;
        let want = counts.get(&k.value()).copied().unwrap_or(0);
        if rec.refs != want {
            rec.refs = want;
            fixed.push((k.value(), rec));
        }
    }
    for (id, rec) in &fixed {
        blobs
            .insert(*id, serde_json::to_vec(rec).map_err(internal)?.as_slice())
            .map_err(internal)?;
    }
    Ok(fixed.len())
}

/// Deletes the records and index entries of unreferenced, unpinned blobs; returns
/// their ids, whose files the caller removes once the transaction is committed.
pub(crate) fn collect(txn: &WriteTransaction, pins: &Pins) -> Result<Vec<BlobId>> {
    let mut blobs = txn.open_table(BLOBS).map_err(internal)?;
    let mut dead = Vec::new();
    for item in blobs.iter().map_err(internal)? {
        let (k, v) = item.map_err(internal)?;
        let rec: BlobRecord = serde_json::from_slice(v.value()).map_err(internal)?;
        if rec.refs == 0 && !pins.is_pinned(k.value()) {
            dead.push(k.value());
        }
    }
    let mut chunks = txn.open_table(CHUNKS).map_err(internal)?;
    let mut lists = txn.open_table(BLOB_CHUNKS).map_err(internal)?;
    for id in &dead {
        blobs.remove(*id).map_err(internal)?;
        let list = lists.remove(*id).map_err(internal)?.map(|v| v.value().to_vec());
        for d in list.unwrap_or_default().chunks_exact(32) {
            let here = chunks
                .get(d)
                .map_err(internal)?
                .and_then(|v| decode_loc(v.value()))
                .is_some_and(|l| l.blob == *id);
            if here {
                chunks.remove(d).map_err(internal)?;
            }
        }
    }
    Ok(dead)
}

/// Every blob id with a record.
pub(crate) fn known(txn: &ReadTransaction) -> Result<Vec<BlobId>> {
    let t = txn.open_table(BLOBS).map_err(internal)?;
    let mut out = Vec::new();
    for item in t.iter().map_err(internal)? {
        out.push(item.map_err(internal)?.0.value());
    }
    Ok(out)
}

/// Figures for `stats`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ChunkStats {
    /// Blobs recorded.
    pub blobs: u64,
    /// Bytes of all blobs (blocks).
    pub blob_bytes: u64,
    /// Chunk index entries.
    pub chunks: u64,
    /// Bytes of index keys and values (32-byte digest + 12-byte location each), and
    /// of the per-blob digest lists; the database's own overhead is not counted.
    pub index_bytes: u64,
}

pub(crate) fn stats(txn: &ReadTransaction) -> Result<ChunkStats> {
    let mut s = ChunkStats::default();
    for item in txn.open_table(BLOBS).map_err(internal)?.iter().map_err(internal)? {
        let (_, v) = item.map_err(internal)?;
        let r: BlobRecord = serde_json::from_slice(v.value()).map_err(internal)?;
        s.blobs += 1;
        s.blob_bytes += u64::from(r.blocks) * dedup::BLOCK_SIZE;
    }
    s.chunks = txn.open_table(CHUNKS).map_err(internal)?.len().map_err(internal)?;
    s.index_bytes = s.chunks * (32 + 12) + s.chunks * 32;
    Ok(s)
}

/// The file of blob `id` under `dir`.
pub(crate) fn path(dir: &Path, id: BlobId) -> PathBuf {
    dir.join(dedup::blob_name(id))
}

/// Removes blob files of `dir` that `keep` does not accept.
pub(crate) fn remove_files_except(dir: &Path, keep: impl Fn(BlobId) -> bool) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let id = dedup::parse_blob_name(&name);
        if id.is_some_and(&keep) {
            continue;
        }
        tracing::info!(blob = %name, "removing a blob no layer records");
        let _ = fs::remove_file(e.path());
    }
}
