//! `stats` (what a store holds, from the running daemon or the store itself) and
//! `chunk-sweep` (how well a set of layers deduplicates at each chunk size).

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use erofs::format::DeviceSlot;
use erofs::writer::{ChunkAddr, ChunkSink};
use sha2::{Digest, Sha256};

/// The daemon's admin socket: a client connects, writes one JSON request (or nothing,
/// for stats), shuts its side down and reads one JSON document.
pub fn admin_socket(root: &Path) -> PathBuf {
    root.join("admin.sock")
}

/// Serves the store's stats on the admin socket (mode 0600, root's only).
pub fn serve_admin(store: Arc<snapshotter::Snapshotter>, root: &Path) -> io::Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt;
    let path = admin_socket(root);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let store = store.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut req = Vec::new();
                let mut limited = (&mut conn).take(64 << 10);
                let read = limited.read_to_end(&mut req);
                if tokio::time::timeout(std::time::Duration::from_secs(5), read)
                    .await
                    .is_err()
                {
                    return;
                }
                let doc = tokio::task::spawn_blocking(move || {
                    let err = |e: String| serde_json::to_vec(&serde_json::json!({ "error": e })).unwrap_or_default();
                    let req: serde_json::Value = if req.iter().all(u8::is_ascii_whitespace) {
                        serde_json::json!({})
                    } else {
                        match serde_json::from_slice(&req) {
                            Ok(v) => v,
                            Err(e) => return err(format!("bad request: {e}")),
                        }
                    };
                    match req.get("vmdk") {
                        None => match store.stats() {
                            Ok(s) => serde_json::to_vec(&s).unwrap_or_default(),
                            Err(e) => err(e.to_string()),
                        },
                        Some(v) => {
                            let key = v.get("key").and_then(|k| k.as_str()).unwrap_or_default();
                            let out = v.get("out").and_then(|k| k.as_str()).unwrap_or_default();
                            match store.vmdk(key, Path::new(out)) {
                                Ok((image, devices)) => {
                                    serde_json::to_vec(&serde_json::json!({ "image": image, "devices": devices }))
                                        .unwrap_or_default()
                                }
                                Err(e) => err(e.to_string()),
                            }
                        }
                    }
                })
                .await
                .unwrap_or_default();
                let _ = conn.write_all(&doc).await;
            });
        }
    }))
}

/// Sends `req` to the running daemon's admin socket and returns its answer; `None` when
/// no daemon listens.
fn ask_daemon(root: &Path, req: &serde_json::Value) -> Result<Option<serde_json::Value>> {
    let Ok(mut conn) = std::os::unix::net::UnixStream::connect(admin_socket(root)) else {
        return Ok(None);
    };
    conn.write_all(req.to_string().as_bytes())
        .context("asking the daemon")?;
    conn.shutdown(std::net::Shutdown::Write).context("asking the daemon")?;
    let mut buf = Vec::new();
    conn.read_to_end(&mut buf).context("reading the daemon's answer")?;
    Ok(Some(
        serde_json::from_slice(&buf).context("parsing the daemon's answer")?,
    ))
}

/// `dedup-snapshotter vmdk`: through the running daemon, or the store when none runs.
pub fn vmdk(root: &Path, key: &str, out: &Path) -> Result<()> {
    let out = if out.is_absolute() {
        out.to_path_buf()
    } else {
        std::env::current_dir()?.join(out)
    };
    let req = serde_json::json!({ "vmdk": { "key": key, "out": out } });
    let doc = match ask_daemon(root, &req)? {
        Some(doc) => doc,
        None => {
            let store = snapshotter::Snapshotter::open_with(root, snapshotter::StoreOptions::default())
                .with_context(|| format!("opening the store at {} (is the daemon running?)", root.display()))?;
            let res = store.vmdk(key, &out);
            store.shutdown();
            let (image, devices) = res?;
            serde_json::json!({ "image": image, "devices": devices })
        }
    };
    if let Some(e) = doc.get("error") {
        anyhow::bail!("{}", e.as_str().unwrap_or_default());
    }
    println!("vmdk:     {}", out.display());
    println!("metadata: {}", doc["image"].as_str().unwrap_or_default());
    for d in doc["devices"].as_array().into_iter().flatten() {
        println!("device:   {}", d.as_str().unwrap_or_default());
    }
    Ok(())
}

/// `dedup-snapshotter stats`.
pub fn stats(root: &Path, json: bool) -> Result<()> {
    let doc: serde_json::Value = match ask_daemon(root, &serde_json::json!({}))? {
        Some(doc) => doc,
        None => {
            // No daemon: read the store (opening it also repairs, as a start would).
            let opts = snapshotter::StoreOptions::default();
            let store = snapshotter::Snapshotter::open_with(root, opts)
                .with_context(|| format!("opening the store at {} (is the daemon running?)", root.display()))?;
            let s = store.stats()?;
            store.shutdown();
            serde_json::to_value(s)?
        }
    };
    if let Some(e) = doc.get("error") {
        anyhow::bail!("the daemon could not compute stats: {e}");
    }
    if json {
        println!("{doc}");
        return Ok(());
    }
    let n = |k: &str| doc.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let logical = n("logical_bytes");
    let blob = n("blob_bytes");
    println!("layers:          {}", n("layers"));
    println!(
        "logical bytes:   {} (file data of the dedup layers, as if nothing were shared)",
        logical
    );
    println!("blob bytes:      {} ({} blobs)", blob, n("blobs"));
    println!("image bytes:     {} (metadata and small files)", n("image_bytes"));
    println!("stored bytes:    {}", n("stored_bytes"));
    if blob > 0 {
        println!(
            "dedup ratio:     {:.2} (logical / blob bytes)",
            logical as f64 / blob as f64
        );
    }
    println!("chunks:          {}", n("chunks"));
    println!("index bytes:     {}", n("index_bytes"));
    if let Some(chains) = doc.get("chains").and_then(|c| c.as_array()) {
        println!("images (layer chains):");
        for c in chains {
            let g = |k: &str| c.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            println!(
                "  {}  layers {}  logical {}  blobs {}  shared with others {}",
                c.get("top").and_then(|v| v.as_str()).unwrap_or("?"),
                g("layers"),
                g("logical_bytes"),
                g("blob_bytes"),
                g("shared_blob_bytes")
            );
        }
    }
    Ok(())
}

/// A chunk sink that stores nothing and counts distinct chunks: the same decisions
/// the converter makes with a real store, without the writes.
#[derive(Default)]
struct Census {
    seen: HashSet<[u8; 32]>,
    logical: u64,
    unique_bytes: u64,
    zero_bytes: u64,
    chunks: u64,
    next: u32,
}

impl ChunkSink for Census {
    fn put(&mut self, data: &[u8]) -> io::Result<ChunkAddr> {
        self.logical += data.len() as u64;
        self.chunks += 1;
        if data.iter().all(|b| *b == 0) {
            self.zero_bytes += data.len() as u64;
            return Ok(ChunkAddr::HOLE);
        }
        let d: [u8; 32] = Sha256::digest(data).into();
        if self.seen.insert(d) {
            self.unique_bytes += (data.len() as u64).div_ceil(dedup::BLOCK_SIZE) * dedup::BLOCK_SIZE;
        }
        self.next = self.next.wrapping_add(1);
        Ok(ChunkAddr {
            device: 1,
            blkaddr: self.next & 0x7fff_ffff,
        })
    }

    fn device_slots(&self) -> Vec<DeviceSlot> {
        vec![DeviceSlot {
            tag: [0; 64],
            blocks: 0,
            mapped_blkaddr: 0,
        }]
    }
}

#[derive(serde::Serialize)]
struct SweepRow {
    chunk_size: u64,
    logical_bytes: u64,
    unique_bytes: u64,
    zero_bytes: u64,
    dedup_ratio: f64,
    chunks: u64,
    unique_chunks: u64,
    index_bytes: u64,
    image_bytes: u64,
    stored_bytes: u64,
    seconds: f64,
}

/// `dedup-snapshotter chunk-sweep`.
pub fn chunk_sweep(layers: &[PathBuf], json: bool) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("layer.erofs");
    // Baseline: the same layers converted without chunks.
    let mut plain_bytes = 0u64;
    for l in layers {
        let r = layer_convert::convert(
            File::open(l).with_context(|| format!("opening {}", l.display()))?,
            &out,
            &layer_convert::Options::default(),
            None,
        )
        .with_context(|| format!("converting {}", l.display()))?;
        plain_bytes += r.output_size;
    }
    let mut rows = Vec::new();
    for bits in 12u8..=20 {
        let started = std::time::Instant::now();
        let mut census = Census::default();
        let mut image_bytes = 0;
        for l in layers {
            let opts = layer_convert::Options {
                chunk_size: layer_convert::ChunkSize::from_bits(bits)?,
                ..Default::default()
            };
            let r = layer_convert::convert_with(File::open(l)?, &out, &opts, None, Some(&mut census))
                .with_context(|| format!("converting {}", l.display()))?;
            image_bytes += r.output_size;
        }
        // Index entry: digest + location, and the digest again in its blob's list
        // (the store's layout, see snapshotter::blobs).
        let index_bytes = census.seen.len() as u64 * (32 + 12 + 32);
        rows.push(SweepRow {
            chunk_size: 1 << bits,
            logical_bytes: census.logical,
            unique_bytes: census.unique_bytes,
            zero_bytes: census.zero_bytes,
            dedup_ratio: census.logical as f64 / census.unique_bytes.max(1) as f64,
            chunks: census.chunks,
            unique_chunks: census.seen.len() as u64,
            index_bytes,
            image_bytes,
            stored_bytes: image_bytes + census.unique_bytes,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    if json {
        println!(
            "{}",
            serde_json::json!({ "layers": layers.len(), "plain_bytes": plain_bytes, "rows": rows })
        );
        return Ok(());
    }
    let mut o = io::stdout().lock();
    writeln!(
        o,
        "{} layers; without dedup the images take {} bytes",
        layers.len(),
        plain_bytes
    )?;
    writeln!(
        o,
        "| chunk | file bytes | distinct (blocks) | ratio | chunks | distinct chunks | index | images | stored/plain | s |"
    )?;
    writeln!(o, "|---|---|---|---|---|---|---|---|---|---|")?;
    for r in &rows {
        writeln!(
            o,
            "| {}K | {} | {} | {:.2} | {} | {} | {} | {} | {:.3} | {:.1} |",
            r.chunk_size >> 10,
            r.logical_bytes,
            r.unique_bytes,
            r.dedup_ratio,
            r.chunks,
            r.unique_chunks,
            r.index_bytes,
            r.image_bytes,
            r.stored_bytes as f64 / plain_bytes.max(1) as f64,
            r.seconds
        )?;
    }
    Ok(())
}
