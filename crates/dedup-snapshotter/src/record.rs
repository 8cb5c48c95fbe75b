//! `dedup-snapshotter record`: which parts of which files a container start reads, in order.
//!
//! The fetch daemon (`dedupd`) sees every read the kernel makes of a lazily pulled layer blob, as a byte range
//! of the blob. Between a `trace_start` and a `trace_stop` around one container run, those ranges are mapped
//! back to the files whose data they hold, using the layer's own EROFS metadata, as 4 KiB-aligned byte ranges
//! of those files in the order they were first read. The result, one `PATH<TAB>START+LEN` line per range (the
//! format [`image_convert::parse_prefetch_list`] reads), is what `convert-image --prefetch` takes to order a
//! layer's chunks for the next pulls.
//!
//! Readahead would pad every read the start makes with up to 128 KiB it never asked for (the EROFS mounts'
//! own readahead), so by default `record` turns it off for the run: `read_ahead_kb` 0 on the file-backed EROFS
//! mounts' backing devices, restored afterwards.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use erofs::reader::{FileKind, Image};
use image_convert::PrefetchEntry;
use serde::Serialize;

/// EROFS block size of the converted layers (`convert-image` writes 4 KiB blocks); ranges are recorded in
/// whole blocks, the unit the kernel reads.
const BLOCK: u64 = 4096;

/// Where the kernel lists backing devices (`read_ahead_kb` per device).
const BDI_DIR: &str = "/sys/class/bdi";

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
    /// Where the list (or the JSON report) goes; stdout when `None`.
    pub output: Option<PathBuf>,
    /// Write the JSON report instead of the list.
    pub json: bool,
    /// Leave readahead as it is during the run (the list then holds what readahead added).
    pub keep_readahead: bool,
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
    /// Reads of this blob the daemon served.
    pub accesses: u64,
    /// Bytes those reads asked for.
    pub bytes_read: u64,
    /// Reads that touched no file data (superblock, directories, inodes, inline tails).
    pub metadata_only: u64,
    /// Files of this blob newly listed because of its reads.
    pub files: u64,
    /// File bytes of this blob's files the reads covered (what the list holds for this blob).
    pub bytes_listed: u64,
}

/// One recorded range: bytes `[start, start + len)` of the file at `path`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RangeReport {
    /// Absolute path in the image.
    pub path: String,
    /// First byte, a multiple of 4 KiB.
    pub start: u64,
    /// Bytes: a multiple of 4 KiB, except a range that ends at the end of the file.
    pub len: u64,
}

/// One backing device whose readahead the run turned off.
#[derive(Debug, Clone, Serialize)]
pub struct ReadaheadReport {
    /// The device's directory name under /sys/class/bdi (`erofs-N`: a file-backed EROFS mount).
    pub bdi: String,
    /// Its `read_ahead_kb` before (and again after) the run.
    pub read_ahead_kb: u64,
}

/// The `--json` report.
#[derive(Debug, Clone, Serialize)]
pub struct RecordReport {
    /// Files whose data the start read, in first-read order, each once.
    pub paths: Vec<String>,
    /// The ranges of those files the start read, in first-read order, each place once (what the list holds).
    pub ranges: Vec<RangeReport>,
    /// Sum of the ranges' lengths.
    pub bytes_listed: u64,
    /// Sum of the listed files' sizes (what a list of whole files would hold).
    pub bytes_of_files: u64,
    /// Reads the daemon served between trace start and stop.
    pub accesses: u64,
    /// Bytes those reads asked for.
    pub bytes_read: u64,
    /// Per blob, in the order each was first read.
    pub blobs: Vec<BlobReport>,
    /// Backing devices whose readahead was off during the run (empty with `--keep-readahead`).
    pub readahead_off: Vec<ReadaheadReport>,
}

/// Runs `record`: trace, run the container once, map the trace to file ranges, write them.
pub fn record(a: RecordArgs) -> Result<()> {
    if a.command.is_empty() {
        bail!("no command to run in the container (give it after `--`)");
    }
    let client = fetch_api::Client::new(&a.fetch_socket);
    let ping = client
        .ping()
        .with_context(|| format!("fetch daemon at {}", a.fetch_socket.display()))?;
    let mountpoint = PathBuf::from(&ping.mountpoint);

    // Restored when dropped, whatever happens below.
    let readahead = if a.keep_readahead {
        ReadaheadOff::default()
    } else {
        ReadaheadOff::apply()?
    };
    client.trace_start().context("starting the fetch daemon's trace")?;
    // Whatever happens to the run, the daemon must stop recording: a trace left running grows forever.
    let run = drop_caches().and_then(|()| run_container(&a));
    let trace = client.trace_stop().context("stopping the fetch daemon's trace");
    let readahead_off = readahead.restore();
    run?;
    let trace = trace?;
    // A blob that is complete may no longer tell dedupd about reads (on the fanotify data path its cache file
    // is unmarked once verified), so its share of the start would be missing from the list.
    let complete: Vec<String> = client
        .list()
        .context("listing the fetch daemon's blobs")?
        .into_iter()
        .filter(|b| b.complete)
        .map(|b| b.digest)
        .collect();
    if trace.is_empty() {
        bail!(
            "no read of a lazy blob reached the fetch daemon during the run (is the image pulled lazily with \
             snapshotter {}?{})",
            a.snapshotter,
            if complete.is_empty() {
                String::new()
            } else {
                format!(
                    " complete blobs, whose reads dedupd may no longer see: {}; record on a fetch daemon run \
                     with --no-prefetch",
                    complete.join(" ")
                )
            }
        );
    }
    for d in &complete {
        eprintln!(
            "record: blob {d} is complete: reads of it after it completed may not have reached the fetch daemon \
             (record on a fetch daemon run with --no-prefetch for a full list)"
        );
    }

    let mut report = map_trace(&mountpoint, &trace)?;
    report.readahead_off = readahead_off;
    let text = if a.json {
        let mut s = serde_json::to_string_pretty(&report)?;
        s.push('\n');
        s
    } else {
        let mut s = String::new();
        for r in &report.ranges {
            if !PrefetchEntry::listable(&r.path) {
                eprintln!(
                    "record: {:?} cannot be written to the list (a TAB or newline in it); left out",
                    r.path
                );
                continue;
            }
            let e = PrefetchEntry {
                path: r.path.clone(),
                range: Some((r.start, r.len)),
            };
            s.push_str(&format!("{e}\n"));
        }
        s
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
        "record: {} ranges ({} bytes) of {} files ({} bytes) from {} reads ({} bytes) of {} blobs; readahead {}",
        report.ranges.len(),
        report.bytes_listed,
        report.paths.len(),
        report.bytes_of_files,
        report.accesses,
        report.bytes_read,
        report.blobs.len(),
        if a.keep_readahead {
            "kept".to_string()
        } else {
            let bdis: Vec<&str> = report.readahead_off.iter().map(|r| r.bdi.as_str()).collect();
            format!("off on {}", bdis.join(" "))
        }
    );
    Ok(())
}

/// Readahead turned off (`read_ahead_kb` 0) on backing devices for the run, each with the value to restore.
///
/// A file-backed EROFS mount (mount(2) of a regular file, how lazy layers are mounted on dedupd's blob files)
/// has a backing device of its own, named `erofs-N` on Linux 6.18 (not after the superblock's device number),
/// whose readahead widens a page cache miss in a file of the image to up to 128 KiB of the image: that is
/// what reaches the daemon. Which `erofs-N` belongs to which mount is not exposed, so all of them are turned
/// off (the lazy layers' mounts exist before the run: the pull made them). The readahead of the blob files'
/// own filesystem (dedupd's FUSE mount, or the cache file's filesystem on the fanotify path) was measured to
/// change nothing the daemon sees, so it is left alone: for the fanotify path it is the host disk's.
#[derive(Debug, Default)]
struct ReadaheadOff {
    saved: Vec<(PathBuf, ReadaheadReport)>,
}

impl ReadaheadOff {
    fn apply() -> Result<ReadaheadOff> {
        let mut bdis = Vec::new();
        let dir = std::fs::read_dir(BDI_DIR).with_context(|| format!("listing {BDI_DIR}"))?;
        for d in dir {
            let name = d?.file_name().to_string_lossy().into_owned();
            if name.starts_with("erofs-") {
                bdis.push(name);
            }
        }
        if bdis.is_empty() {
            eprintln!("record: no file-backed EROFS mount in {BDI_DIR} (erofs-*): readahead stays as it is");
        }
        bdis.sort();
        let mut off = ReadaheadOff::default();
        for bdi in bdis {
            let file = Path::new(BDI_DIR).join(&bdi).join("read_ahead_kb");
            let read_ahead_kb = match std::fs::read_to_string(&file) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .with_context(|| format!("{}: {v:?} is not a number", file.display()))?,
                // An EROFS mount that went away since the listing.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
            };
            if read_ahead_kb == 0 {
                continue;
            }
            std::fs::write(&file, "0\n")
                .with_context(|| format!("turning readahead off: {} (needs root)", file.display()))?;
            off.saved.push((file, ReadaheadReport { bdi, read_ahead_kb }));
        }
        Ok(off)
    }

    /// Puts the saved values back (a device gone meanwhile is skipped), returning what was off.
    fn restore(mut self) -> Vec<ReadaheadReport> {
        self.restore_all();
        std::mem::take(&mut self.saved).into_iter().map(|(_, r)| r).collect()
    }

    fn restore_all(&mut self) {
        for (file, r) in &self.saved {
            match std::fs::write(file, format!("{}\n", r.read_ahead_kb)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => eprintln!("record: restoring {} to {}: {e}", file.display(), r.read_ahead_kb),
            }
        }
    }
}

impl Drop for ReadaheadOff {
    fn drop(&mut self) {
        // `restore` empties `saved`; this is for the paths that return early with an error.
        self.restore_all();
    }
}

/// Empties the kernel's caches. Reads already cached by the kernel (the blob files' page cache under the FUSE
/// mount, kept across opens, and the EROFS mounts' own caches) are served without reaching the daemon, so it
/// would never see them and their ranges would be missing from the trace. `sync` first: only clean pages can
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

/// `ctr run --rm` of the image once, the container's output copied to our stderr (stdout carries the list).
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

/// A file a [`DataMap`] knows.
#[derive(Debug, Clone)]
pub struct MappedFile {
    /// Absolute path in the image.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
}

/// Where one layer's regular files keep their data in the image, for finding the file bytes a read touches.
#[derive(Debug, Default)]
pub struct DataMap {
    files: Vec<MappedFile>,
    /// `(image_start, image_end, file index, file offset at image_start)`, sorted by `image_start`.
    extents: Vec<(u64, u64, usize, u64)>,
    /// `max_end[i]`: the largest end among `extents[..=i]`, so a lookup can stop scanning backwards even if
    /// extents overlapped (they do not in a sound image, but the image is not trusted).
    max_end: Vec<u64>,
}

impl DataMap {
    /// Reads the metadata of the EROFS image at `path`: where every regular file's data is.
    pub fn open(path: &Path) -> Result<DataMap> {
        let img = Image::open(path).with_context(|| format!("opening EROFS image {}", path.display()))?;
        let mut seen_nids = HashSet::new();
        let mut files = Vec::new();
        let mut extents = Vec::new();
        img.walk(&mut |p, e| {
            // Hard links share one inode and its data: the first name found stands for all.
            if e.kind != FileKind::File || !seen_nids.insert(e.nid) {
                return Ok(());
            }
            let xs = image_convert::file_extents(&img, e)?;
            if xs.is_empty() {
                return Ok(());
            }
            let f = files.len();
            files.push(MappedFile {
                path: String::from_utf8_lossy(p).into_owned(),
                size: e.inode.size,
            });
            for x in xs {
                extents.push((x.image_offset, x.image_offset + x.len, f, x.file_offset));
            }
            Ok(())
        })
        .with_context(|| format!("walking EROFS image {}", path.display()))?;
        Ok(DataMap::from_extents(files, extents))
    }

    /// A map of `files` stored at these `(image_start, image_end, file index, file offset)` extents.
    pub fn from_extents(files: Vec<MappedFile>, mut extents: Vec<(u64, u64, usize, u64)>) -> DataMap {
        extents.sort_by_key(|x| x.0);
        let max_end = extents
            .iter()
            .scan(0u64, |m, x| {
                *m = (*m).max(x.1);
                Some(*m)
            })
            .collect();
        DataMap {
            files,
            extents,
            max_end,
        }
    }

    /// The file with this index.
    pub fn file(&self, i: usize) -> &MappedFile {
        &self.files[i]
    }

    /// The file bytes the image bytes `[offset, offset + len)` hold, in image order: `(file index, start, end)`
    /// with `start` and `end` widened to whole blocks (`end` cut at the file's size).
    pub fn overlapping(&self, offset: u64, len: u64) -> Vec<(usize, u64, u64)> {
        let end = offset.saturating_add(len);
        let mut hits = Vec::new();
        if len == 0 {
            return hits;
        }
        // Extents starting before `end` are candidates; walk them back while any can still reach `offset`.
        let mut i = self.extents.partition_point(|x| x.0 < end);
        while i > 0 && self.max_end[i - 1] > offset {
            i -= 1;
            let (s, e, f, file_off) = self.extents[i];
            if e > offset {
                let a = file_off + (offset.max(s) - s);
                let b = file_off + (end.min(e) - s);
                let size = self.files[f].size;
                hits.push((f, a / BLOCK * BLOCK, b.div_ceil(BLOCK).saturating_mul(BLOCK).min(size)));
            }
        }
        hits.reverse();
        hits
    }
}

/// Byte ranges of files in first-read order: a range that overlaps or touches earlier ranges of the same file
/// merges with them, at the place of the earliest, so each byte is listed once and the order between different
/// places is the order they were first read.
#[derive(Debug, Default)]
pub struct Ranges<K> {
    /// `(key, start, end)`; `None` for a range merged into an earlier one.
    list: Vec<Option<(K, u64, u64)>>,
    /// Per key, the indexes in `list` of its live ranges.
    by_key: HashMap<K, Vec<usize>>,
}

impl<K: Clone + Eq + std::hash::Hash> Ranges<K> {
    /// Adds `[start, end)` of `key`; an empty range is ignored.
    pub fn add(&mut self, key: K, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let live = self.by_key.entry(key.clone()).or_default();
        let (mut s, mut e) = (start, end);
        let mut place: Option<usize> = None;
        // Merging can make the range touch one it did not before: repeat until nothing more joins.
        loop {
            let list = &self.list;
            let Some(j) = live.iter().position(|&i| {
                let (_, a, b) = list[i].as_ref().expect("live range");
                *a <= e && s <= *b
            }) else {
                break;
            };
            let i = live.swap_remove(j);
            let (_, a, b) = self.list[i].take().expect("live range");
            (s, e) = (s.min(a), e.max(b));
            place = Some(place.map_or(i, |p| p.min(i)));
        }
        let i = match place {
            Some(i) => i,
            None => {
                self.list.push(None);
                self.list.len() - 1
            }
        };
        self.list[i] = Some((key, s, e));
        live.push(i);
    }

    /// The ranges, `(key, start, end)`, in first-read order.
    pub fn iter(&self) -> impl Iterator<Item = &(K, u64, u64)> {
        self.list.iter().flatten()
    }
}

/// Maps trace accesses to file ranges: each blob's EROFS metadata is read from the daemon's file under
/// `mountpoint` (local by now: the run read it), and every access adds the file blocks it overlaps.
pub fn map_trace(mountpoint: &Path, trace: &[fetch_api::Access]) -> Result<RecordReport> {
    let mut maps: HashMap<&str, DataMap> = HashMap::new();
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
        }
    }
    Ok(map_accesses(&maps, trace))
}

/// [`map_trace`] with the blobs' maps at hand (every digest of `trace` must have one).
pub fn map_accesses(maps: &HashMap<&str, DataMap>, trace: &[fetch_api::Access]) -> RecordReport {
    let mut blob_order: Vec<&str> = Vec::new();
    let mut blobs: BTreeMap<&str, BlobReport> = BTreeMap::new();
    let mut ranges: Ranges<(&str, usize)> = Ranges::default();
    for acc in trace {
        let digest = acc.digest.as_str();
        let b = blobs.entry(digest).or_insert_with(|| {
            blob_order.push(digest);
            BlobReport {
                digest: digest.to_string(),
                accesses: 0,
                bytes_read: 0,
                metadata_only: 0,
                files: 0,
                bytes_listed: 0,
            }
        });
        b.accesses += 1;
        b.bytes_read += acc.len;
        let hits = maps[digest].overlapping(acc.offset, acc.len);
        if hits.is_empty() {
            b.metadata_only += 1;
        }
        for (f, start, end) in hits {
            ranges.add((digest, f), start, end);
        }
    }

    // A path in two layers (a file replaced by an upper one) is listed once, with the ranges read of either:
    // convert-image looks it up in the topmost layer that has it, and the data read was at those offsets.
    let mut by_path: Ranges<&str> = Ranges::default();
    let mut origin: HashMap<&str, &str> = HashMap::new();
    for ((digest, f), start, end) in ranges.iter() {
        let file = maps[digest].file(*f);
        origin.entry(file.path.as_str()).or_insert(digest);
        by_path.add(file.path.as_str(), *start, *end);
    }
    let mut paths = Vec::new();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut bytes_of_files = 0;
    for (path, start, end) in by_path.iter() {
        let b = blobs.get_mut(origin[path]).expect("a blob of the trace");
        if seen.insert(*path) {
            paths.push(path.to_string());
            b.files += 1;
            bytes_of_files += maps[origin[path]]
                .files
                .iter()
                .find(|f| f.path == *path)
                .map_or(0, |f| f.size);
        }
        b.bytes_listed += end - start;
        out.push(RangeReport {
            path: path.to_string(),
            start: *start,
            len: end - start,
        });
    }
    RecordReport {
        paths,
        bytes_listed: out.iter().map(|r| r.len).sum(),
        bytes_of_files,
        ranges: out,
        accesses: trace.len() as u64,
        bytes_read: trace.iter().map(|a| a.len).sum(),
        blobs: blob_order.iter().map(|d| blobs[d].clone()).collect(),
        readahead_off: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64) -> MappedFile {
        MappedFile {
            path: path.into(),
            size,
        }
    }

    /// `/a` 1 block at 0, `/b` 2 blocks at 8192, `/c` 3000 bytes at 16384, `/d` two chunks of 8 KiB stored
    /// apart (file 0..8192 at 40960, file 8192..12000 at 20480).
    fn map() -> DataMap {
        DataMap::from_extents(
            vec![file("/a", 4096), file("/b", 8192), file("/c", 3000), file("/d", 12000)],
            vec![
                (8192, 16384, 1, 0),
                (0, 4096, 0, 0),
                (16384, 19384, 2, 0),
                (40960, 49152, 3, 0),
                (20480, 24288, 3, 8192),
            ],
        )
    }

    #[test]
    fn overlapping_maps_to_file_blocks() {
        let m = map();
        assert_eq!(m.overlapping(0, 1), vec![(0, 0, 4096)]);
        assert_eq!(m.overlapping(4096, 4096), vec![]);
        assert_eq!(m.overlapping(4095, 8192), vec![(0, 0, 4096), (1, 0, 4096)]);
        assert_eq!(m.overlapping(12288, 1), vec![(1, 4096, 8192)]);
        // Cut at the file's size.
        assert_eq!(m.overlapping(16383, 2), vec![(1, 4096, 8192), (2, 0, 3000)]);
        // Image offsets of a later chunk map to its file offsets.
        assert_eq!(m.overlapping(20480 + 3000, 100), vec![(3, 8192, 12000)]);
        assert_eq!(m.overlapping(20480, 1), vec![(3, 8192, 12000)]);
        assert_eq!(m.overlapping(45056, 10), vec![(3, 4096, 8192)]);
        assert_eq!(m.overlapping(49152, 10), vec![]);
        assert_eq!(m.overlapping(100, 0), vec![]);
        let all: Vec<usize> = m.overlapping(0, 1 << 20).iter().map(|h| h.0).collect();
        assert_eq!(all, vec![0, 1, 2, 3, 3]);
    }

    #[test]
    fn overlapping_tolerates_nested_extents() {
        let m = DataMap::from_extents(
            vec![file("/big", 100_000), file("/small", 4096)],
            vec![(0, 100_000, 0, 0), (4096, 8192, 1, 0)],
        );
        assert_eq!(m.overlapping(50_000, 10), vec![(0, 49152, 53248)]);
        assert_eq!(m.overlapping(5000, 10), vec![(0, 4096, 8192), (1, 0, 4096)]);
    }

    #[test]
    fn ranges_merge_in_first_read_order() {
        let mut r: Ranges<&str> = Ranges::default();
        r.add("/x", 8192, 12288);
        r.add("/y", 0, 4096);
        r.add("/x", 0, 4096);
        // Touches the first /x range: merged there.
        r.add("/x", 12288, 16384);
        r.add("/x", 100, 100);
        // Already listed.
        r.add("/y", 0, 4096);
        r.add("/z", 4096, 8192);
        // Joins /x's [0,4096) and [8192,16384) into one, at the place of the earlier.
        r.add("/x", 4096, 8192);
        let got: Vec<_> = r.iter().cloned().collect();
        assert_eq!(got, vec![("/x", 0, 16384), ("/y", 0, 4096), ("/z", 4096, 8192)]);
    }

    #[test]
    fn accesses_to_ranges_per_path() {
        let upper = map();
        let lower = DataMap::from_extents(
            vec![file("/b", 8192), file("/e", 4096)],
            vec![(0, 8192, 0, 0), (8192, 12288, 1, 0)],
        );
        let maps: HashMap<&str, DataMap> = [("sha256:up", upper), ("sha256:low", lower)].into_iter().collect();
        let acc = |d: &str, offset, len| fetch_api::Access {
            digest: d.into(),
            offset,
            len,
        };
        let trace = vec![
            acc("sha256:up", 0, 512),      // metadata? no: /a's block
            acc("sha256:up", 4096, 4096),  // between files: metadata only
            acc("sha256:up", 45056, 4096), // /d 4096..8192
            acc("sha256:low", 8192, 4096), // /e
            acc("sha256:low", 4096, 4096), // /b 4096..8192 (the lower copy)
            acc("sha256:up", 8192, 4096),  // /b 0..4096: joins the range above
            acc("sha256:up", 40960, 4096), // /d 0..4096: joins /d's range
        ];
        let r = map_accesses(&maps, &trace);
        assert_eq!(r.paths, vec!["/a", "/d", "/e", "/b"]);
        let ranges: Vec<(&str, u64, u64)> = r.ranges.iter().map(|x| (x.path.as_str(), x.start, x.len)).collect();
        assert_eq!(
            ranges,
            vec![("/a", 0, 4096), ("/d", 0, 8192), ("/e", 0, 4096), ("/b", 0, 8192)]
        );
        assert_eq!(r.bytes_listed, 4096 + 8192 + 4096 + 8192);
        assert_eq!(r.bytes_of_files, 4096 + 12000 + 4096 + 8192);
        assert_eq!(r.accesses, 7);
        let blobs: Vec<(&str, u64, u64, u64)> = r
            .blobs
            .iter()
            .map(|b| (b.digest.as_str(), b.accesses, b.metadata_only, b.files))
            .collect();
        assert_eq!(blobs, vec![("sha256:up", 5, 1, 2), ("sha256:low", 2, 0, 2)]);
    }
}
