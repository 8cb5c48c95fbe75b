//! `dedup-snapshotter record`: which files a container start reads, in order.
//!
//! The fetch daemon (`dedupd`) sees every read the kernel makes of a lazily pulled layer blob, as a byte range
//! of the blob. Between a `trace_start` and a `trace_stop` around one container run, those ranges are mapped
//! back to the files whose data they hold, using the layer's own EROFS metadata. The result, one absolute
//! path per line, is what `convert-image --prefetch` takes to order a layer's chunks for the next pulls.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use erofs::format::DataLayout;
use erofs::reader::{FileKind, Image};
use serde::Serialize;

/// EROFS block size of the converted layers (`convert-image` writes 4 KiB blocks).
const BLOCK: u64 = 4096;

/// What `record` is asked to do.
pub struct RecordArgs {
    /// dedupd's control socket.
    pub fetch_socket: PathBuf,
    /// containerd's socket.
    pub containerd: PathBuf,
    /// containerd namespace the image lives in.
    pub namespace: String,
    /// Snapshotter the image was pulled with.
    pub snapshotter: String,
    /// Where the paths (or the JSON report) go; stdout when `None`.
    pub output: Option<PathBuf>,
    /// Write the JSON report instead of the path list.
    pub json: bool,
    /// The image reference, already pulled lazily.
    pub image: String,
    /// The command run in the container.
    pub command: Vec<String>,
}

/// What one blob contributed to the trace.
#[derive(Debug, Clone, Serialize)]
pub struct BlobReport {
    /// `sha256:<hex>` of the layer blob.
    pub digest: String,
    /// FUSE reads of this blob.
    pub accesses: u64,
    /// Bytes those reads asked for.
    pub bytes_read: u64,
    /// Reads that touched no file data (superblock, directories, inodes, inline tails).
    pub metadata_only: u64,
    /// Files of this blob newly listed because of its reads.
    pub files: u64,
}

/// The `--json` report.
#[derive(Debug, Clone, Serialize)]
pub struct RecordReport {
    /// Files whose data the start read, in first-read order, each once.
    pub paths: Vec<String>,
    /// FUSE reads between trace start and stop.
    pub accesses: u64,
    /// Bytes those reads asked for.
    pub bytes_read: u64,
    /// Per blob, in the order each was first read.
    pub blobs: Vec<BlobReport>,
}

/// Runs `record`: trace, run the container once, map the trace to paths, write them.
pub fn record(a: RecordArgs) -> Result<()> {
    if a.command.is_empty() {
        bail!("no command to run in the container (give it after `--`)");
    }
    let client = fetch_api::Client::new(&a.fetch_socket);
    let ping = client
        .ping()
        .with_context(|| format!("fetch daemon at {}", a.fetch_socket.display()))?;
    let mountpoint = PathBuf::from(&ping.mountpoint);

    client.trace_start().context("starting the fetch daemon's trace")?;
    // Whatever happens to the run, the daemon must stop recording: a trace left running grows forever.
    let run = drop_caches().and_then(|()| run_container(&a));
    let trace = client.trace_stop().context("stopping the fetch daemon's trace");
    run?;
    let trace = trace?;

    let report = map_trace(&mountpoint, &trace)?;
    let text = if a.json {
        let mut s = serde_json::to_string_pretty(&report)?;
        s.push('\n');
        s
    } else {
        report.paths.iter().map(|p| format!("{p}\n")).collect()
    };
    match &a.output {
        Some(path) => std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?,
        None => {
            let mut out = io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
    }
    eprintln!(
        "record: {} files from {} reads ({} bytes) of {} blobs",
        report.paths.len(),
        report.accesses,
        report.bytes_read,
        report.blobs.len()
    );
    Ok(())
}

/// Empties the kernel's caches. Reads already cached by the kernel (the blob files' page cache under the FUSE
/// mount, kept across opens, and the EROFS mounts' own caches) are served without reaching FUSE, so the daemon
/// would never see them and their files would be missing from the trace. `sync` first: only clean pages can
/// be dropped.
fn drop_caches() -> Result<()> {
    let status = Command::new("sync")
        .status()
        .context("running sync before dropping the page cache")?;
    if !status.success() {
        bail!("sync failed: {status}");
    }
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .context("dropping the page cache (/proc/sys/vm/drop_caches; needs root)")
}

/// `ctr run --rm` of the image once, the container's output copied to our stderr (stdout carries the paths).
fn run_container(a: &RecordArgs) -> Result<()> {
    let id = format!("record-{}", std::process::id());
    let stderr = || -> Result<Stdio> { Ok(Stdio::from(io::stderr().as_fd().try_clone_to_owned()?)) };
    let ctr = |args: &[&str]| {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(&a.containerd).args(["-n", &a.namespace]).args(args);
        c
    };
    let mut cmd = ctr(&["run", "--rm", "--snapshotter", &a.snapshotter, &a.image, &id]);
    let status = cmd
        .args(&a.command)
        .stdin(Stdio::null())
        .stdout(stderr()?)
        .stderr(stderr()?)
        .status()
        .context("running ctr (is containerd's ctr installed?)")?;
    if !status.success() {
        // A start that failed half-way can leave its task and container behind; best effort, the error
        // below is what matters.
        for args in [&["task", "rm", "-f", &id][..], &["container", "rm", &id][..]] {
            let _ = ctr(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
        bail!(
            "the container run failed ({status}): ctr -a {} -n {} run --rm --snapshotter {} {} {id} {}",
            a.containerd.display(),
            a.namespace,
            a.snapshotter,
            a.image,
            a.command.join(" ")
        );
    }
    Ok(())
}

/// The data byte ranges of one layer's regular files, sorted, for finding the files a read touches.
#[derive(Debug, Default)]
pub struct DataMap {
    /// `(start, end, path)`, sorted by `start`.
    ranges: Vec<(u64, u64, String)>,
    /// `max_end[i]`: the largest `end` among `ranges[..=i]`, so a lookup can stop scanning backwards
    /// even if ranges overlapped (they do not in a sound image, but the image is not trusted).
    max_end: Vec<u64>,
}

impl DataMap {
    /// Reads the metadata of the EROFS image at `path`: every regular file's data blocks.
    pub fn open(path: &Path) -> Result<DataMap> {
        let img = Image::open(path).with_context(|| format!("opening EROFS image {}", path.display()))?;
        let mut seen_nids = HashSet::new();
        let mut ranges = Vec::new();
        img.walk(&mut |p, e| {
            // Hard links share one inode and its data: the first name found stands for all.
            if e.kind != FileKind::File || !seen_nids.insert(e.nid) {
                return Ok(());
            }
            let size = e.inode.size;
            let blocks = match e.inode.layout {
                DataLayout::FlatPlain => size.div_ceil(BLOCK),
                // The tail lives in the inode's metadata block: only the full blocks are file data.
                DataLayout::FlatInline => size / BLOCK,
                // Chunk-based or compressed data is not what convert-image writes; nothing to map.
                _ => 0,
            };
            if blocks > 0 {
                let start = u64::from(e.inode.i_u) * BLOCK;
                ranges.push((start, start + blocks * BLOCK, String::from_utf8_lossy(p).into_owned()));
            }
            Ok(())
        })
        .with_context(|| format!("walking EROFS image {}", path.display()))?;
        Ok(DataMap::from_ranges(ranges))
    }

    /// A map of these `(start, end, path)` ranges.
    pub fn from_ranges(mut ranges: Vec<(u64, u64, String)>) -> DataMap {
        ranges.sort_by_key(|r| r.0);
        let max_end = ranges
            .iter()
            .scan(0u64, |m, r| {
                *m = (*m).max(r.1);
                Some(*m)
            })
            .collect();
        DataMap { ranges, max_end }
    }

    /// Paths of the files whose data overlaps `[offset, offset + len)`, in offset order.
    pub fn overlapping(&self, offset: u64, len: u64) -> Vec<&str> {
        let end = offset.saturating_add(len);
        let mut hits = Vec::new();
        if len == 0 {
            return hits;
        }
        // Ranges starting before `end` are candidates; walk them back while any can still reach `offset`.
        let mut i = self.ranges.partition_point(|r| r.0 < end);
        while i > 0 && self.max_end[i - 1] > offset {
            i -= 1;
            let (_, e, p) = &self.ranges[i];
            if *e > offset {
                hits.push(p.as_str());
            }
        }
        hits.reverse();
        hits
    }
}

/// Maps trace accesses to file paths: each blob's EROFS metadata is read from the daemon's file under
/// `mountpoint` (local by now: the run read it), and every access adds the files it overlaps, each once.
pub fn map_trace(mountpoint: &Path, trace: &[fetch_api::Access]) -> Result<RecordReport> {
    let mut maps: HashMap<&str, DataMap> = HashMap::new();
    let mut blob_order: Vec<&str> = Vec::new();
    let mut blobs: BTreeMap<&str, BlobReport> = BTreeMap::new();
    let mut seen = HashSet::new();
    let mut paths = Vec::new();
    for acc in trace {
        let digest = acc.digest.as_str();
        if !maps.contains_key(digest) {
            let hex = digest
                .strip_prefix("sha256:")
                .filter(|h| fetch_api::is_sha256_hex(h))
                .with_context(|| format!("the trace names a blob {digest:?} that is not sha256:<hex>"))?;
            let file = mountpoint.join(format!("sha256-{hex}"));
            let map = DataMap::open(&file).with_context(|| format!("layer blob {digest}"))?;
            maps.insert(digest, map);
            blob_order.push(digest);
        }
        let b = blobs.entry(digest).or_insert_with(|| BlobReport {
            digest: digest.to_string(),
            accesses: 0,
            bytes_read: 0,
            metadata_only: 0,
            files: 0,
        });
        b.accesses += 1;
        b.bytes_read += acc.len;
        let hits = maps[digest].overlapping(acc.offset, acc.len);
        if hits.is_empty() {
            b.metadata_only += 1;
        }
        for p in hits {
            // A path in two layers (a file replaced by an upper one) is listed once: convert-image looks it
            // up in the topmost layer that has it.
            if seen.insert(p.to_string()) {
                paths.push(p.to_string());
                b.files += 1;
            }
        }
    }
    Ok(RecordReport {
        paths,
        accesses: trace.len() as u64,
        bytes_read: trace.iter().map(|a| a.len).sum(),
        blobs: blob_order.iter().map(|d| blobs[d].clone()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> DataMap {
        DataMap::from_ranges(vec![
            (8192, 16384, "/b".into()),
            (0, 4096, "/a".into()),
            (16384, 20480, "/c".into()),
            (40960, 45056, "/d".into()),
        ])
    }

    #[test]
    fn overlapping_ranges() {
        let m = map();
        assert_eq!(m.overlapping(0, 1), vec!["/a"]);
        assert_eq!(m.overlapping(4096, 4096), Vec::<&str>::new());
        assert_eq!(m.overlapping(4095, 8192), vec!["/a", "/b"]);
        assert_eq!(m.overlapping(0, 1 << 20), vec!["/a", "/b", "/c", "/d"]);
        assert_eq!(m.overlapping(16383, 2), vec!["/b", "/c"]);
        assert_eq!(m.overlapping(20480, 20480), Vec::<&str>::new());
        assert_eq!(m.overlapping(45056, 10), Vec::<&str>::new());
        assert_eq!(m.overlapping(100, 0), Vec::<&str>::new());
    }

    #[test]
    fn overlapping_tolerates_nested_ranges() {
        let m = DataMap::from_ranges(vec![(0, 100_000, "/big".into()), (4096, 8192, "/small".into())]);
        assert_eq!(m.overlapping(50_000, 10), vec!["/big"]);
        assert_eq!(m.overlapping(5000, 10), vec!["/big", "/small"]);
    }
}
