//! The daemon's state: registered blobs, their on-disk cache, chunk fetching with verification, the
//! prefetcher and whole-blob verification. The FUSE layer and the control socket call into this.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use fetch_api::{Access, BlobSpec, BlobStatus, Error as ApiError, PingInfo, Registered};
use registry::Repository;
use sha2::{Digest, Sha256};
use tracing::{debug, error, info, warn};

use crate::limits::{FetchSlots, TokenBucket};
use crate::metrics::{BlobGauges, Metrics};

/// What the daemon was started with (the command line, minus what only `main` needs).
#[derive(Debug, Clone)]
pub struct Options {
    /// The cache directory; blobs live in `ROOT/blobs`.
    pub root: PathBuf,
    /// Where the FUSE file system is mounted.
    pub mountpoint: PathBuf,
    /// The control socket.
    pub socket: PathBuf,
    /// `host:port` for `GET /metrics`, if any.
    pub metrics_address: Option<String>,
    /// Docker config file with registry credentials; `None` = the usual places.
    pub docker_config: Option<PathBuf>,
    /// Registries spoken to over plain HTTP, in addition to the loopback names.
    pub plain_http: Vec<String>,
    /// containerd's registry host configuration (`certs.d`: mirrors, CAs, client certificates).
    pub hosts_dir: Option<PathBuf>,
    /// Limit for connecting to a registry host (an unreachable mirror is left for the next host
    /// after this).
    pub connect_timeout: Duration,
    /// Range requests in flight at most.
    pub fetch_threads: usize,
    /// How long a FUSE read keeps retrying a chunk before failing with EIO.
    pub read_deadline: Duration,
    /// Prefetch bandwidth in bytes per second; 0 = unlimited.
    pub prefetch_rate: u64,
    /// Fetch only what is read.
    pub no_prefetch: bool,
    /// The background fetch of chunks not on a blob's prefetch list waits until FUSE reads have
    /// paused this long, so a starting container's reads are not queued behind it.
    pub prefetch_idle: Duration,
    /// Timeout for connecting and for each read or write of one HTTP request.
    pub request_timeout: Duration,
    /// How reads of lazy blobs reach the daemon.
    pub data_path: DataPathChoice,
}

/// How the kernel's reads of a lazy blob reach the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// The blob is a local sparse file marked for fanotify pre-content events: the kernel reads it directly and
    /// asks the daemon only for ranges not yet checked (Linux 6.14+).
    Fanotify,
    /// The blob is a file on the daemon's FUSE mount: every read goes through the daemon.
    Fuse,
}

impl DataPath {
    /// `fanotify` or `fuse`, as logs, metrics and `Ping` show it.
    pub fn name(self) -> &'static str {
        match self {
            DataPath::Fanotify => "fanotify",
            DataPath::Fuse => "fuse",
        }
    }
}

/// What the operator asked for: [`DataPath::Fanotify`] where the kernel has it, else FUSE (`Auto`), or one of
/// them whatever the kernel has (a missing fanotify is then an error at start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataPathChoice {
    /// Fanotify when the start-up probe finds pre-content events, FUSE otherwise.
    #[default]
    Auto,
    /// Fanotify or fail.
    Fanotify,
    /// FUSE.
    Fuse,
}

/// The inode of the mount's root directory; blobs get numbers from 2 up, never reused in a process.
pub const ROOT_INO: u64 = 1;

/// A registered blob: its spec, cache files, and which chunks are present.
pub struct Blob {
    /// What was registered.
    pub spec: BlobSpec,
    /// The digest's hex: the file is `sha256-<hex>`, the cache files `<hex>.*`.
    pub hex: String,
    /// Inode number on the mount.
    pub ino: u64,
    repo: Repository,
    data: File,
    bitmap_file: File,
    state: Mutex<ChunkState>,
    /// Signalled when a chunk's fetch ends (either way) and when the blob is removed.
    changed: Condvar,
    verified: AtomicBool,
    verifying: AtomicBool,
    /// The chunk table disagrees with the digest: prefetching it again would loop forever.
    broken: AtomicBool,
    removed: AtomicBool,
    fetched_bytes: AtomicU64,
    errors: AtomicU64,
    paths: BlobPaths,
    /// Marked for pre-content events (fanotify data path).
    pub(crate) marked: AtomicBool,
    /// The registry blob's range holding each chunk (its compressed frame when the chunks are compressed).
    fetch_ranges: Vec<(u64, u64)>,
    /// Turns a fetched range into the chunk's bytes (a tar index is parsed once, here).
    decoder: fetch_api::ChunkDecoder,
    /// For a tar index: the running sha256 of the compressed layer, fed in order by the fetches
    /// (chunk ranges overlap, and what a read fetched out of order is fetched again for it by the
    /// prefetcher), checked against the blob digest before the blob counts as verified.
    layer_hash: Mutex<LayerHash>,
    /// The compressed layer matched its digest (in this process, or before the verified marker was
    /// written).
    layer_checked: AtomicBool,
}

/// See [`Blob::layer_hash`].
struct LayerHash {
    hasher: Sha256,
    /// Bytes of the compressed layer hashed so far, from 0.
    pos: u64,
}

struct BlobPaths {
    json: PathBuf,
    data: PathBuf,
    bitmap: PathBuf,
    verified: PathBuf,
}

impl BlobPaths {
    fn new(dir: &Path, hex: &str) -> BlobPaths {
        BlobPaths {
            json: dir.join(format!("{hex}.json")),
            data: dir.join(format!("{hex}.data")),
            bitmap: dir.join(format!("{hex}.bitmap")),
            verified: dir.join(format!("{hex}.verified")),
        }
    }
}

struct ChunkState {
    /// One bit per chunk, as persisted in `<hex>.bitmap`.
    bitmap: Vec<u8>,
    /// Chunks this process has seen verify (fetched now, or a cached one checked once).
    checked: Vec<u8>,
    present: u64,
    /// Chunks someone is fetching or checking right now: others wait instead of fetching twice.
    in_flight: HashSet<u64>,
}

fn bit(bits: &[u8], i: u64) -> bool {
    bits[(i / 8) as usize] & (1 << (i % 8)) != 0
}

fn set_bit(bits: &mut [u8], i: u64, on: bool) {
    let mask = 1u8 << (i % 8);
    if on {
        bits[(i / 8) as usize] |= mask;
    } else {
        bits[(i / 8) as usize] &= !mask;
    }
}

impl Blob {
    /// The compressed layer's size when the blob is served through a tar index (whose layer digest
    /// is checked besides the uncompressed one).
    fn layer_size(&self) -> Option<u64> {
        match &self.decoder {
            fetch_api::ChunkDecoder::TarIndex(ix) => Some(ix.compressed_size),
            _ => None,
        }
    }

    /// Feeds the layer hash with `raw`, the registry blob's bytes from `start`, if they extend it.
    fn feed_layer(&self, start: u64, raw: &[u8]) {
        let mut h = self.layer_hash.lock().unwrap();
        let end = start + raw.len() as u64;
        if start <= h.pos && h.pos < end {
            let from = (h.pos - start) as usize;
            h.hasher.update(&raw[from..]);
            h.pos = end;
        }
    }

    fn chunks(&self) -> u64 {
        self.spec.chunk_count()
    }

    fn lock(&self) -> MutexGuard<'_, ChunkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The file's name on the mount.
    pub fn file_name(&self) -> String {
        format!("sha256-{}", self.hex)
    }

    /// Whether the whole blob is cached and matched its digest.
    pub fn status_verified(&self) -> bool {
        self.complete() && self.verified.load(Ordering::SeqCst)
    }

    /// The cache file.
    pub fn data_path(&self) -> &Path {
        &self.paths.data
    }

    /// Whether every chunk is cached.
    pub fn complete(&self) -> bool {
        self.lock().present == self.chunks()
    }

    fn present_bytes(&self) -> u64 {
        let st = self.lock();
        let n = self.chunks();
        let mut bytes = st.present * self.spec.chunk_size;
        // The last chunk is usually short: count what it really holds.
        if n > 0 && bit(&st.bitmap, n - 1) {
            let (start, end) = self.spec.chunk_range(n - 1);
            bytes = bytes - self.spec.chunk_size + (end - start);
        }
        bytes
    }

    fn status(&self) -> BlobStatus {
        let present = self.lock().present;
        let chunks = self.chunks();
        BlobStatus {
            digest: self.spec.digest.clone(),
            size: self.spec.size,
            chunks,
            present,
            complete: present == chunks,
            verified: present == chunks && self.verified.load(Ordering::SeqCst),
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    /// Marks chunk `i` present or missing, in memory and in `<hex>.bitmap`. The caller has written the
    /// chunk's data before marking it present, so a bitmap bit never promises bytes that are not there
    /// (and cached chunks are verified again by the next process anyway).
    fn mark(&self, st: &mut ChunkState, i: u64, present: bool) {
        if bit(&st.bitmap, i) != present {
            set_bit(&mut st.bitmap, i, present);
            if present {
                st.present += 1;
            } else {
                st.present -= 1;
            }
            let byte = (i / 8) as usize;
            if let Err(e) = self.bitmap_file.write_all_at(&st.bitmap[byte..=byte], byte as u64) {
                // The in-memory state stays right; a lost bit only means a refetch after a restart.
                warn!(digest = %self.spec.digest, chunk = i, error = %e, "cannot persist the chunk bitmap");
            }
        }
        set_bit(&mut st.checked, i, present);
        if !present {
            self.verified.store(false, Ordering::SeqCst);
            let _ = fs::remove_file(&self.paths.verified);
        }
    }

    fn read_chunk(&self, i: u64) -> io::Result<Vec<u8>> {
        let (start, end) = self.spec.chunk_range(i);
        let mut buf = vec![0; (end - start) as usize];
        self.data.read_exact_at(&mut buf, start)?;
        Ok(buf)
    }
}

/// Why a chunk could not be made present.
#[derive(Debug)]
pub enum ChunkError {
    /// The blob was unregistered while waiting.
    Removed,
    /// The daemon is shutting down.
    Shutdown,
    /// The deadline passed; the last failure.
    Failed(String),
}

/// Who asks for a chunk: a FUSE read retries until its deadline and is not rate-limited; the
/// prefetcher makes one attempt under the bandwidth limit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Demand,
    Background,
}

/// The daemon. Shared (`Arc`) by the FUSE workers, the control socket, the prefetchers.
pub struct Daemon {
    /// The options it runs with.
    pub opts: Options,
    /// The mountpoint, absolute.
    pub mountpoint: PathBuf,
    /// Which incarnation serves the blobs: a random number chosen at start (FUSE), or the fanotify group's,
    /// which outlives restarts. Mounts made under another instance must be made again.
    pub instance: u64,
    /// How reads reach the daemon.
    pub data_path: DataPath,
    /// The fanotify data path, once started.
    pub(crate) fan: OnceLock<Arc<crate::fandata::Fan>>,
    blobs_dir: PathBuf,
    blobs: RwLock<BTreeMap<String, Arc<Blob>>>,
    inodes: RwLock<HashMap<u64, Arc<Blob>>>,
    next_ino: AtomicU64,
    client: registry::Client,
    slots: FetchSlots,
    bucket: TokenBucket,
    /// Counters for `Metrics` and `/metrics`.
    pub metrics: Arc<Metrics>,
    trace: Mutex<Option<Vec<Access>>>,
    /// Set once the FUSE session runs; used to drop the kernel's entry of an unregistered blob.
    pub notifier: OnceLock<fuser::Notifier>,
    shutdown: AtomicBool,
    /// When the daemon started, and the last FUSE read in milliseconds since then.
    started: Instant,
    last_read_ms: AtomicU64,
}

impl Daemon {
    /// Builds the daemon and loads every blob persisted under `ROOT/blobs` (without starting their
    /// prefetchers: see [`Daemon::start_prefetchers`]).
    pub fn new(opts: Options, mountpoint: PathBuf) -> anyhow::Result<Arc<Daemon>> {
        Daemon::with_data_path(opts, mountpoint, DataPath::Fuse, random_u64())
    }

    /// [`Daemon::new`] for a chosen data path and instance number.
    pub fn with_data_path(
        opts: Options,
        mountpoint: PathBuf,
        data_path: DataPath,
        instance: u64,
    ) -> anyhow::Result<Arc<Daemon>> {
        let blobs_dir = opts.root.join("blobs");
        fs::create_dir_all(&blobs_dir)?;
        let mut plain_http = registry::ClientOptions::default().plain_http;
        plain_http.extend(opts.plain_http.iter().cloned());
        let client = registry::Client::new(registry::ClientOptions {
            plain_http,
            docker_config: opts.docker_config.clone(),
            timeout: opts.request_timeout,
            // Retries happen here, against the read's deadline, not inside the client's own schedule.
            retries: 0,
            hosts_dir: opts.hosts_dir.clone(),
            connect_timeout: opts.connect_timeout,
        })?;
        let daemon = Arc::new(Daemon {
            started: Instant::now(),
            last_read_ms: AtomicU64::new(0),
            slots: FetchSlots::new(opts.fetch_threads),
            bucket: TokenBucket::new(opts.prefetch_rate),
            instance,
            data_path,
            fan: OnceLock::new(),
            mountpoint,
            blobs_dir,
            blobs: RwLock::new(BTreeMap::new()),
            inodes: RwLock::new(HashMap::new()),
            next_ino: AtomicU64::new(ROOT_INO + 1),
            client,
            metrics: Arc::new(Metrics::default()),
            trace: Mutex::new(None),
            notifier: OnceLock::new(),
            shutdown: AtomicBool::new(false),
            opts,
        });
        daemon.load_persisted()?;
        Ok(daemon)
    }

    fn load_persisted(self: &Arc<Self>) -> anyhow::Result<()> {
        let mut loaded = 0;
        for entry in fs::read_dir(&self.blobs_dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let spec = match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<BlobSpec>(&b).map_err(|e| e.to_string()))
                .and_then(|s| s.validate().map(|()| s).map_err(|e| e.message))
            {
                Ok(spec) => spec,
                Err(e) => {
                    error!(path = %path.display(), error = %e, "skipping an unreadable persisted blob spec");
                    continue;
                }
            };
            match self.open_blob(spec, false) {
                Ok(blob) => {
                    let st = blob.status();
                    info!(digest = %st.digest, present = st.present, chunks = st.chunks, verified = st.verified, "restored blob");
                    self.insert(blob);
                    loaded += 1;
                }
                Err(e) => error!(path = %path.display(), error = %e, "cannot restore a persisted blob"),
            }
        }
        info!(blobs = loaded, "loaded the cache");
        Ok(())
    }

    /// Opens (`fresh`: creates anew) the cache files of `spec` and builds its [`Blob`].
    fn open_blob(&self, spec: BlobSpec, fresh: bool) -> anyhow::Result<Arc<Blob>> {
        let hex = spec.hex().expect("validated").to_string();
        let paths = BlobPaths::new(&self.blobs_dir, &hex);
        let repo = Repository::parse(&format!("{}/{}", spec.source.registry, spec.source.repository))?;
        let chunks = spec.chunk_count();
        let bitmap_len = chunks.div_ceil(8) as usize;
        let decoder = spec
            .decoder()
            .map_err(|e| anyhow::anyhow!("{}: {}", spec.digest, e.message))?;
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(fresh)
                .open(p)
        };
        let data = open(&paths.data)?;
        // Sparse: only fetched chunks take space.
        if data.metadata()?.len() != spec.size {
            data.set_len(spec.size)?;
        }
        let mut bitmap_file = open(&paths.bitmap)?;
        let mut bitmap = Vec::new();
        bitmap_file.read_to_end(&mut bitmap)?;
        if bitmap.len() != bitmap_len {
            if !bitmap.is_empty() {
                warn!(digest = %spec.digest, "the chunk bitmap has the wrong size: starting the blob afresh");
            }
            bitmap = vec![0; bitmap_len];
            bitmap_file.set_len(0)?;
            bitmap_file.write_all_at(&bitmap, 0)?;
        }
        // Bits past the last chunk would count as present chunks that do not exist.
        for i in chunks..(bitmap_len as u64 * 8) {
            set_bit(&mut bitmap, i, false);
        }
        let present = (0..chunks).filter(|&i| bit(&bitmap, i)).count() as u64;
        if fresh {
            let _ = fs::remove_file(&paths.verified);
        }
        let verified = present == chunks && paths.verified.exists();
        let ino = self.next_ino.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(Blob {
            state: Mutex::new(ChunkState {
                checked: vec![0; bitmap_len],
                bitmap,
                present,
                in_flight: HashSet::new(),
            }),
            changed: Condvar::new(),
            verified: AtomicBool::new(verified),
            verifying: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            fetched_bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            marked: AtomicBool::new(false),
            fetch_ranges: decoder.fetch_ranges(&spec),
            decoder,
            layer_hash: Mutex::new(LayerHash {
                hasher: Sha256::new(),
                pos: 0,
            }),
            layer_checked: AtomicBool::new(verified),
            hex,
            ino,
            repo,
            data,
            bitmap_file,
            paths,
            spec,
        }))
    }

    fn insert(&self, blob: Arc<Blob>) {
        self.inodes.write().unwrap().insert(blob.ino, blob.clone());
        self.blobs.write().unwrap().insert(blob.hex.clone(), blob);
    }

    /// Starts the prefetcher of every blob not complete and verified (at start-up).
    ///
    /// On the fanotify path the kernel reads cache files directly, with no per-chunk check on first read as
    /// FUSE makes: a blob an earlier process verified is hashed again, chunk by chunk, before its mark goes.
    pub fn start_prefetchers(self: &Arc<Self>) {
        let blobs: Vec<_> = self.blobs.read().unwrap().values().cloned().collect();
        let mut recheck = Vec::new();
        for blob in blobs {
            if self.fan.get().is_some() && blob.status_verified() {
                blob.verified.store(false, Ordering::SeqCst);
                recheck.push(blob);
            } else {
                self.start_prefetch(&blob);
            }
        }
        if recheck.is_empty() {
            return;
        }
        let daemon = self.clone();
        // One at a time: hashing every cached blob at once would compete with the reads of starting containers.
        std::thread::spawn(move || {
            for blob in recheck {
                if daemon.stopping() {
                    return;
                }
                if blob.verifying.swap(true, Ordering::SeqCst) {
                    continue;
                }
                verify_whole(&blob, &daemon.metrics);
                blob.verifying.store(false, Ordering::SeqCst);
                if let Some(fan) = daemon.fan.get() {
                    fan.after_verify(&blob);
                }
                if !blob.status_verified() {
                    warn!(digest = %blob.spec.digest, "a cached blob failed its check at start: fetching what it lacks");
                    daemon.start_prefetch(&blob);
                }
            }
        });
    }

    /// Stops background work; prefetchers and waiting reads end soon after.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        for blob in self.blobs.read().unwrap().values() {
            blob.changed.notify_all();
        }
    }

    fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// Whether [`Daemon::shutdown`] was called.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping()
    }

    /// The blob with inode `ino`.
    pub fn blob_by_ino(&self, ino: u64) -> Option<Arc<Blob>> {
        self.inodes.read().unwrap().get(&ino).cloned()
    }

    /// The blob whose file is named `name` (`sha256-<hex>`).
    pub fn blob_by_name(&self, name: &str) -> Option<Arc<Blob>> {
        let hex = name.strip_prefix("sha256-")?;
        self.blobs.read().unwrap().get(hex).cloned()
    }

    /// Every blob, by digest.
    pub fn all_blobs(&self) -> Vec<Arc<Blob>> {
        self.blobs.read().unwrap().values().cloned().collect()
    }

    fn blob_by_digest(&self, digest: &str) -> Result<Arc<Blob>, ApiError> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| fetch_api::is_sha256_hex(h))
            .ok_or_else(|| ApiError::invalid(format!("bad digest {digest:?}")))?;
        self.blobs
            .read()
            .unwrap()
            .get(hex)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("blob {digest} is not registered")))
    }

    // ---- control requests ----

    /// `Ping`.
    pub fn ping(&self) -> PingInfo {
        PingInfo {
            pid: std::process::id(),
            instance: self.instance,
            mountpoint: self.mountpoint.to_string_lossy().into_owned(),
            data_path: self.data_path.name().into(),
        }
    }

    /// `Register`: idempotent for an equal spec.
    pub fn register(self: &Arc<Self>, spec: BlobSpec) -> Result<Registered, ApiError> {
        spec.validate()?;
        let hex = spec.hex().expect("validated").to_string();
        // Held across creation so that two concurrent registrations of one digest cannot both create.
        let mut blobs = self.blobs.write().unwrap();
        let blob = match blobs.get(&hex) {
            Some(b) if b.spec == spec => b.clone(),
            Some(_) => {
                return Err(ApiError::invalid(format!(
                    "{} is registered with a different spec",
                    spec.digest
                )))
            }
            None => {
                let blob = self
                    .open_blob(spec, true)
                    .map_err(|e| ApiError::internal(format!("cannot create the cache files: {e:#}")))?;
                persist_spec(&blob).map_err(|e| ApiError::internal(format!("cannot persist the spec: {e}")))?;
                if let Some(fan) = self.fan.get() {
                    // Before the path is handed out: a file opened unmarked never raises events.
                    fan.watch(&blob)
                        .map_err(|e| ApiError::internal(format!("cannot mark the cache file: {e}")))?;
                }
                self.inodes.write().unwrap().insert(blob.ino, blob.clone());
                blobs.insert(hex, blob.clone());
                drop(blobs);
                info!(digest = %blob.spec.digest, size = blob.spec.size, chunks = blob.chunks(), "registered blob");
                self.start_prefetch(&blob);
                blob
            }
        };
        let status = blob.status();
        Ok(Registered {
            path: self.blob_path(&blob).to_string_lossy().into_owned(),
            present: status.present,
            complete: status.complete,
        })
    }

    /// The file a mount reads: the cache file itself (fanotify) or its name on the FUSE mount.
    pub fn blob_path(&self, blob: &Blob) -> PathBuf {
        match self.data_path {
            DataPath::Fanotify => blob.paths.data.clone(),
            DataPath::Fuse => self.mountpoint.join(blob.file_name()),
        }
    }

    /// The blob's cache file.
    pub(crate) fn data_file(blob: &Blob) -> &File {
        &blob.data
    }

    /// `Status`.
    pub fn status(&self, digest: &str) -> Result<BlobStatus, ApiError> {
        Ok(self.blob_by_digest(digest)?.status())
    }

    /// `List`.
    pub fn list(&self) -> Vec<BlobStatus> {
        self.all_blobs().iter().map(|b| b.status()).collect()
    }

    /// `Unregister`: the file disappears and the cache files are deleted (open descriptors keep
    /// working on the unlinked files until closed).
    pub fn unregister(&self, digest: &str) -> Result<(), ApiError> {
        let blob = self.blob_by_digest(digest)?;
        self.blobs.write().unwrap().remove(&blob.hex);
        self.inodes.write().unwrap().remove(&blob.ino);
        blob.removed.store(true, Ordering::SeqCst);
        blob.changed.notify_all();
        if let Some(fan) = self.fan.get() {
            fan.forget(&blob);
        }
        // The spec first: a crash half-way must not bring back a blob without its cache.
        for p in [
            &blob.paths.json,
            &blob.paths.verified,
            &blob.paths.bitmap,
            &blob.paths.data,
        ] {
            if let Err(e) = fs::remove_file(p) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(path = %p.display(), error = %e, "cannot delete a cache file");
                }
            }
        }
        if let Some(n) = self.notifier.get() {
            // The entry TTL is long: without this the kernel would keep showing the file.
            if let Err(e) = n.inval_entry(fuser::INodeNo(ROOT_INO), blob.file_name().as_ref()) {
                debug!(error = %e, "entry invalidation failed");
            }
        }
        info!(digest, "unregistered blob");
        Ok(())
    }

    /// `Metrics`: the Prometheus text.
    pub fn render_metrics(&self) -> String {
        let gauges: Vec<BlobGauges> = self
            .all_blobs()
            .iter()
            .map(|b| BlobGauges {
                digest: b.spec.digest.clone(),
                present_bytes: b.present_bytes(),
                size: b.spec.size,
            })
            .collect();
        self.metrics.render(gauges)
    }

    /// `TraceStart`.
    pub fn trace_start(&self) {
        *self.trace.lock().unwrap() = Some(Vec::new());
    }

    /// `TraceStop`.
    pub fn trace_stop(&self) -> Result<Vec<Access>, ApiError> {
        self.trace
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| ApiError::invalid("no trace is running"))
    }

    /// Records a FUSE read if a trace runs.
    pub fn record_access(&self, blob: &Blob, offset: u64, len: u64) {
        if let Some(trace) = self.trace.lock().unwrap().as_mut() {
            trace.push(Access {
                digest: blob.spec.digest.clone(),
                offset,
                len,
            });
        }
    }

    /// `Wait`: until complete and verified, or the timeout.
    pub fn wait(&self, digest: &str, timeout: Duration) -> Result<BlobStatus, ApiError> {
        let deadline = Instant::now() + timeout;
        loop {
            let blob = self.blob_by_digest(digest)?;
            let status = blob.status();
            if (status.complete && status.verified) || Instant::now() >= deadline || self.stopping() {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20).min(deadline.saturating_duration_since(Instant::now())));
        }
    }

    // ---- reads ----

    /// Serves a FUSE read: makes the chunks under the range present (fetching and verifying them as
    /// needed, retrying until the read deadline) and returns the bytes. `Err` means EIO.
    pub fn read(&self, blob: &Arc<Blob>, offset: u64, len: u32) -> Result<Vec<u8>, String> {
        let size = blob.spec.size;
        if offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        let end = offset.saturating_add(u64::from(len)).min(size);
        self.ensure_range(blob, offset, end - offset)
            .map_err(|e| format!("{e:?}"))?;
        let mut buf = vec![0; (end - offset) as usize];
        blob.data.read_exact_at(&mut buf, offset).map_err(|e| {
            error!(digest = %blob.spec.digest, offset, error = %e, "cannot read the cache file");
            e.to_string()
        })?;
        Ok(buf)
    }

    /// Makes the chunks under `[offset, offset + len)` present and checked (fetching and verifying them as
    /// needed, retrying until the read deadline), for a read of the kernel's: FUSE's or a pre-content event's.
    /// Counts the read as a cache hit or miss.
    pub(crate) fn ensure_range(&self, blob: &Arc<Blob>, offset: u64, len: u64) -> Result<(), ChunkError> {
        let size = blob.spec.size;
        if offset >= size || len == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(len).min(size);
        self.note_read();
        let deadline = Instant::now() + self.opts.read_deadline;
        let cs = blob.spec.chunk_size;
        let mut missed = false;
        for i in offset / cs..=(end - 1) / cs {
            match self.ensure_chunk(blob, i, deadline, Mode::Demand) {
                Ok(ready) => missed |= !ready,
                Err(e) => {
                    self.metrics.cache_misses.inc();
                    let (start, stop) = blob.spec.chunk_range(i);
                    warn!(digest = %blob.spec.digest, chunk = i, range = %format!("{start}-{stop}"), offset, len,
                        error = ?e, "read failed: answering EIO");
                    return Err(e);
                }
            }
        }
        if missed {
            self.metrics.cache_misses.inc();
        } else {
            self.metrics.cache_hits.inc();
        }
        Ok(())
    }

    /// Whether every chunk under the range is present and checked, without waiting for the blob's lock: the
    /// fanotify event reader answers such reads itself and must never block (`None`: could not tell).
    pub(crate) fn range_ready(&self, blob: &Blob, offset: u64, len: u64) -> Option<bool> {
        let size = blob.spec.size;
        if offset >= size || len == 0 {
            return Some(true);
        }
        let end = offset.saturating_add(len).min(size);
        let cs = blob.spec.chunk_size;
        let st = blob.state.try_lock().ok()?;
        Some((offset / cs..=(end - 1) / cs).all(|i| bit(&st.bitmap, i) && bit(&st.checked, i)))
    }

    /// A read came: background fetches of unlisted chunks wait for reads to pause.
    pub(crate) fn note_read(&self) {
        self.last_read_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Makes chunk `i` present and verified in this process. `Ok(true)` if it already was (no wait).
    ///
    /// One thread at a time works on a chunk (fetching it, or checking a chunk cached by an earlier
    /// process); others wait for its outcome and then look again. A demand read makes attempts with
    /// backoff until `deadline`; the prefetcher makes one attempt and waits for others until `deadline`.
    fn ensure_chunk(&self, blob: &Arc<Blob>, i: u64, deadline: Instant, mode: Mode) -> Result<bool, ChunkError> {
        let mut first_look = true;
        let mut attempt = 0u32;
        loop {
            let cached_unchecked = {
                let mut st = blob.lock();
                loop {
                    if blob.removed.load(Ordering::SeqCst) {
                        return Err(ChunkError::Removed);
                    }
                    if self.stopping() {
                        return Err(ChunkError::Shutdown);
                    }
                    if bit(&st.bitmap, i) && bit(&st.checked, i) {
                        return Ok(first_look);
                    }
                    if blob.broken.load(Ordering::SeqCst) {
                        // Every chunk matched its digest, the whole did not match the blob's: the chunk
                        // table describes other bytes than the digest names. Nothing more is served.
                        return Err(ChunkError::Failed(format!(
                            "{} does not match its digest: not served",
                            blob.spec.content_digest()
                        )));
                    }
                    if !st.in_flight.contains(&i) {
                        break;
                    }
                    first_look = false;
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ChunkError::Failed(
                            "timed out waiting for another fetch of the chunk".into(),
                        ));
                    }
                    st = blob.changed.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
                }
                st.in_flight.insert(i);
                bit(&st.bitmap, i)
            };
            let result = self.work_on_chunk(blob, i, cached_unchecked, mode);
            blob.lock().in_flight.remove(&i);
            blob.changed.notify_all();
            match result {
                // A cached chunk that checked out is a hit; anything fetched is not.
                Ok(fetched) => {
                    if fetched {
                        self.after_chunk_present(blob);
                    }
                    return Ok(first_look && !fetched);
                }
                Err(e) => {
                    first_look = false;
                    attempt += 1;
                    let left = deadline.saturating_duration_since(Instant::now());
                    if mode == Mode::Background || left.is_zero() {
                        return Err(ChunkError::Failed(e));
                    }
                    // Exponential backoff, but never past the deadline: the last attempt lands on it.
                    let wait = Duration::from_millis(100u64 << attempt.min(5))
                        .min(Duration::from_secs(2))
                        .min(left);
                    debug!(digest = %blob.spec.digest, chunk = i, attempt, ?wait, error = %e, "retrying chunk");
                    std::thread::sleep(wait);
                    if self.stopping() {
                        return Err(ChunkError::Shutdown);
                    }
                }
            }
        }
    }

    /// With chunk `i` claimed: checks it if cached by an earlier process, else fetches it.
    /// `Ok(true)` when it was fetched.
    fn work_on_chunk(&self, blob: &Blob, i: u64, cached: bool, mode: Mode) -> Result<bool, String> {
        let (start, end) = blob.spec.chunk_range(i);
        let expected = &blob.spec.chunk_digests[i as usize];
        if cached {
            // Whatever a previous process left may be torn or corrupted on disk: trust it once checked.
            match blob.read_chunk(i) {
                Ok(bytes) if sha256_hex(&bytes) == *expected => {
                    set_bit(&mut blob.lock().checked, i, true);
                    return Ok(false);
                }
                Ok(bytes) => {
                    self.metrics.verify_failures.inc();
                    blob.errors.fetch_add(1, Ordering::Relaxed);
                    error!(digest = %blob.spec.digest, chunk = i, range = %format!("{start}-{end}"),
                        expected = %expected, got = %sha256_hex(&bytes),
                        "cached chunk does not match its digest: fetching it again");
                }
                Err(e) => warn!(digest = %blob.spec.digest, chunk = i, error = %e, "cannot read a cached chunk"),
            }
            let mut st = blob.lock();
            blob.mark(&mut st, i, false);
        }
        let bytes = self.fetch_chunk(blob, i, mode)?;
        // Data first, then the bitmap bit: a bit is never set for bytes that are not written.
        blob.data
            .write_all_at(&bytes, start)
            .map_err(|e| format!("cannot write the cache file: {e}"))?;
        let mut st = blob.lock();
        blob.mark(&mut st, i, true);
        Ok(true)
    }

    /// One range request for chunk `i` (its compressed frame, when the chunks are compressed), decoded and
    /// verified against the chunk's digest. Nothing that fails the check leaves this function.
    fn fetch_chunk(&self, blob: &Blob, i: u64, mode: Mode) -> Result<Vec<u8>, String> {
        let (start, end) = blob.fetch_ranges[i as usize];
        let len = end - start;
        let _slot = self.slots.acquire(mode == Mode::Background);
        let began = Instant::now();
        self.metrics.fetches.inc();
        let result = self.client.get_blob_range(&blob.repo, &blob.spec.digest, start, len);
        self.metrics.observe_fetch(began.elapsed());
        let raw = match result {
            Ok(b) if b.len() as u64 == len => b,
            Ok(b) => {
                self.metrics.fetched_bytes.inc_by(b.len() as u64);
                blob.fetched_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                return Err(self.fetch_failed(blob, i, format!("got {} bytes of {len}", b.len())));
            }
            Err(e) => return Err(self.fetch_failed(blob, i, e.to_string())),
        };
        self.metrics.fetched_bytes.inc_by(len);
        blob.fetched_bytes.fetch_add(len, Ordering::Relaxed);
        let expected = &blob.spec.chunk_digests[i as usize];
        let kept = blob.layer_size().map(|_| raw.clone());
        // A frame that does not decode to exactly the chunk's length is as bad as wrong bytes.
        let decoded = blob.decoder.decode(&blob.spec, i, raw);
        let got = decoded.as_ref().map(|b| sha256_hex(b));
        match decoded {
            Ok(bytes) if got.as_deref() == Ok(expected.as_str()) => {
                if let Some(raw) = kept {
                    blob.feed_layer(start, &raw);
                }
                debug!(digest = %blob.spec.digest, chunk = i, bytes = len, took = ?began.elapsed(), "fetched chunk");
                Ok(bytes)
            }
            _ => {
                let got = got.unwrap_or_else(|e| format!("undecodable ({e})"));
                self.metrics.verify_failures.inc();
                blob.errors.fetch_add(1, Ordering::Relaxed);
                error!(digest = %blob.spec.digest, chunk = i, range = %format!("{start}-{end}"), expected = %expected,
                    got = %got, "fetched chunk does not match its digest: discarded");
                Err(format!("chunk {i} digest mismatch: expected {expected}, got {got}"))
            }
        }
    }

    fn fetch_failed(&self, blob: &Blob, i: u64, msg: String) -> String {
        self.metrics.fetch_errors.inc();
        blob.errors.fetch_add(1, Ordering::Relaxed);
        let (start, end) = blob.spec.chunk_range(i);
        warn!(digest = %blob.spec.digest, chunk = i, range = %format!("{start}-{end}"), error = %msg, "chunk fetch failed");
        msg
    }

    /// When a chunk arrival completes the blob, verify it in the background (a running prefetcher
    /// waits for that instead of hashing twice).
    fn after_chunk_present(&self, blob: &Arc<Blob>) {
        if !blob.complete() || blob.verified.load(Ordering::SeqCst) {
            return;
        }
        if blob.verifying.swap(true, Ordering::SeqCst) {
            return;
        }
        let (blob, metrics, fan) = (blob.clone(), self.metrics.clone(), self.fan.get().cloned());
        // Hashing a large blob takes a while: not on a FUSE worker.
        std::thread::spawn(move || {
            verify_whole(&blob, &metrics);
            blob.verifying.store(false, Ordering::SeqCst);
            if let Some(fan) = fan {
                fan.after_verify(&blob);
            }
        });
    }

    // ---- prefetch ----

    fn start_prefetch(self: &Arc<Self>, blob: &Arc<Blob>) {
        if self.opts.no_prefetch {
            // Nothing fetches in the background, but a blob that is complete can still be verified.
            if blob.complete() && !blob.verified.load(Ordering::SeqCst) {
                self.after_chunk_present(blob);
            }
            return;
        }
        if blob.complete() && blob.verified.load(Ordering::SeqCst) {
            return;
        }
        let (daemon, blob) = (self.clone(), blob.clone());
        let name = format!("prefetch-{}", &blob.hex[..12]);
        if let Err(e) = std::thread::Builder::new()
            .name(name)
            .spawn(move || daemon.prefetch(&blob))
        {
            error!(error = %e, "cannot start a prefetch thread");
        }
    }

    /// Fetches the spec's prefetch chunks, then all others in order; then verifies the whole blob.
    fn prefetch(&self, blob: &Arc<Blob>) {
        let n = blob.chunks();
        let mut order: Vec<u64> = Vec::with_capacity(n as usize);
        let mut seen = vec![false; n as usize];
        for i in blob.spec.prefetch.iter().map(|&p| u64::from(p)).chain(0..n) {
            if !std::mem::replace(&mut seen[i as usize], true) {
                order.push(i);
            }
        }
        let mut listed = vec![false; n as usize];
        for &p in &blob.spec.prefetch {
            if let Some(l) = listed.get_mut(p as usize) {
                *l = true;
            }
        }
        let began = Instant::now();
        let mut backoff = Duration::from_secs(1);
        let gone = || self.stopping() || blob.removed.load(Ordering::SeqCst) || blob.broken.load(Ordering::SeqCst);
        while !gone() {
            let mut failed = false;
            for &i in &order {
                if gone() {
                    return;
                }
                let present = || bit(&blob.lock().bitmap, i);
                if !present() && !listed[i as usize] {
                    self.wait_for_quiet(blob);
                    if gone() {
                        return;
                    }
                }
                if present() {
                    if let Err(e) = self.fill_layer_hash(blob, blob.fetch_ranges[i as usize].1) {
                        debug!(digest = %blob.spec.digest, chunk = i, error = %e, ?backoff, "prefetch will retry");
                        failed = true;
                        self.sleep_unless_stopped(blob, backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                        break;
                    }
                    continue;
                }
                // Paid before the chunk is claimed: a read of the same chunk must never wait for the
                // bandwidth limit, only for a fetch already on the wire. What the wire carries is paid.
                let (start, end) = blob.fetch_ranges[i as usize];
                self.bucket.take(end - start);
                if gone() {
                    return;
                }
                // Long enough to wait out a read's own fetch of the same chunk.
                let deadline = Instant::now() + self.opts.request_timeout * 2;
                match self.ensure_chunk(blob, i, deadline, Mode::Background) {
                    Ok(_) => backoff = Duration::from_secs(1),
                    Err(ChunkError::Failed(e)) => {
                        debug!(digest = %blob.spec.digest, chunk = i, error = %e, ?backoff, "prefetch will retry");
                        failed = true;
                        self.sleep_unless_stopped(blob, backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                        break;
                    }
                    Err(_) => return,
                }
            }
            if failed {
                continue;
            }
            if let Some(size) = blob.layer_size() {
                if let Err(e) = self.fill_layer_hash(blob, size) {
                    debug!(digest = %blob.spec.digest, error = %e, ?backoff, "prefetch will retry");
                    self.sleep_unless_stopped(blob, backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    continue;
                }
            }
            if blob.complete() {
                // Another thread may be hashing already (a read completed the blob): wait for it.
                while blob.verifying.swap(true, Ordering::SeqCst) {
                    self.sleep_unless_stopped(blob, Duration::from_millis(50));
                    if gone() {
                        return;
                    }
                }
                if !blob.verified.load(Ordering::SeqCst) && blob.complete() {
                    verify_whole(blob, &self.metrics);
                }
                blob.verifying.store(false, Ordering::SeqCst);
                if let Some(fan) = self.fan.get() {
                    fan.after_verify(blob);
                }
                if blob.verified.load(Ordering::SeqCst) {
                    info!(digest = %blob.spec.digest, took = ?began.elapsed(), "prefetch complete, blob verified");
                    return;
                }
            }
        }
    }

    /// Hashes the compressed layer of a tar-index blob up to `end`, fetching what no chunk fetch
    /// of this process gave in order (what reads fetched out of order, or before a restart).
    fn fill_layer_hash(&self, blob: &Blob, end: u64) -> Result<(), String> {
        let Some(size) = blob.layer_size() else { return Ok(()) };
        if blob.layer_checked.load(Ordering::SeqCst) {
            return Ok(());
        }
        let end = end.min(size);
        let pos = blob.layer_hash.lock().unwrap().pos;
        if pos >= end {
            return Ok(());
        }
        self.bucket.take(end - pos);
        let _slot = self.slots.acquire(true);
        let raw = self
            .client
            .get_blob_range(&blob.repo, &blob.spec.digest, pos, end - pos)
            .map_err(|e| e.to_string())?;
        self.metrics.fetched_bytes.inc_by(raw.len() as u64);
        blob.fetched_bytes.fetch_add(raw.len() as u64, Ordering::Relaxed);
        if raw.len() as u64 != end - pos {
            return Err(format!("got {} bytes of {}", raw.len(), end - pos));
        }
        blob.feed_layer(pos, &raw);
        Ok(())
    }

    /// Waits until no FUSE read has come for [`Options::prefetch_idle`].
    fn wait_for_quiet(&self, blob: &Blob) {
        loop {
            let now = self.started.elapsed().as_millis() as u64;
            let idle = Duration::from_millis(now.saturating_sub(self.last_read_ms.load(Ordering::Relaxed)));
            if idle >= self.opts.prefetch_idle || self.stopping() || blob.removed.load(Ordering::SeqCst) {
                return;
            }
            self.sleep_unless_stopped(blob, self.opts.prefetch_idle - idle);
        }
    }

    fn sleep_unless_stopped(&self, blob: &Blob, d: Duration) {
        let st = blob.lock();
        let _ = blob
            .changed
            .wait_timeout_while(st, d, |_| !self.stopping() && !blob.removed.load(Ordering::SeqCst));
    }
}

/// Hashes the whole cached blob (and each chunk on the way). A match persists `verified`; a chunk
/// that does not match its own digest is dropped for refetching; a blob whose chunks all match but
/// whose whole digest does not has an inconsistent chunk table: its bitmap is cleared and it is marked
/// broken, so it is not prefetched in a loop.
fn verify_whole(blob: &Blob, metrics: &Metrics) {
    if let Some(size) = blob.layer_size() {
        if !blob.layer_checked.load(Ordering::SeqCst) {
            let h = blob.layer_hash.lock().unwrap();
            if h.pos != size {
                // The prefetcher completes the hash, then comes back here.
                debug!(digest = %blob.spec.digest, hashed = h.pos, size, "layer digest not checked yet");
                return;
            }
            let got = format!("sha256:{}", hex::encode(h.hasher.clone().finalize()));
            drop(h);
            if got != blob.spec.digest {
                metrics.verify_failures.inc();
                blob.errors.fetch_add(1, Ordering::Relaxed);
                error!(digest = %blob.spec.digest, got = %got,
                    "the compressed layer does not match its digest: not served any more");
                let mut st = blob.lock();
                for i in 0..blob.chunks() {
                    blob.mark(&mut st, i, false);
                }
                blob.broken.store(true, Ordering::SeqCst);
                drop(st);
                blob.changed.notify_all();
                return;
            }
            blob.layer_checked.store(true, Ordering::SeqCst);
            info!(digest = %blob.spec.digest, "compressed layer matches its digest");
        }
    }
    let mut whole = Sha256::new();
    let mut bad = Vec::new();
    for i in 0..blob.chunks() {
        match blob.read_chunk(i) {
            Ok(bytes) => {
                whole.update(&bytes);
                if sha256_hex(&bytes) != blob.spec.chunk_digests[i as usize] {
                    bad.push(i);
                }
            }
            Err(e) => {
                error!(digest = %blob.spec.digest, chunk = i, error = %e, "cannot read the cache file to verify it");
                return;
            }
        }
    }
    let got = format!("sha256:{}", hex::encode(whole.finalize()));
    let mut st = blob.lock();
    if got == blob.spec.content_digest() && bad.is_empty() {
        if let Err(e) = File::create(&blob.paths.verified).and_then(|f| f.sync_all()) {
            warn!(digest = %blob.spec.digest, error = %e, "cannot persist the verified marker");
        }
        for i in 0..blob.chunks() {
            set_bit(&mut st.checked, i, true);
        }
        blob.verified.store(true, Ordering::SeqCst);
        info!(digest = %blob.spec.digest, "blob verified");
        return;
    }
    if bad.is_empty() {
        metrics.verify_failures.inc();
        blob.errors.fetch_add(1, Ordering::Relaxed);
        error!(digest = %blob.spec.digest, got = %got,
            "every chunk matches the chunk table but the blob does not match its digest: clearing its cache");
        for i in 0..blob.chunks() {
            blob.mark(&mut st, i, false);
        }
        blob.broken.store(true, Ordering::SeqCst);
    } else {
        // The pass above ran without the lock: a chunk that a read found bad and is fetching again may
        // have been caught half-written. Only a chunk that nobody is working on and that still fails
        // now is really bad; anything else is left for the next pass.
        let mut confirmed = 0;
        for &i in &bad {
            if st.in_flight.contains(&i) || !bit(&st.bitmap, i) {
                continue;
            }
            if blob
                .read_chunk(i)
                .is_ok_and(|b| sha256_hex(&b) == blob.spec.chunk_digests[i as usize])
            {
                continue;
            }
            let (start, end) = blob.spec.chunk_range(i);
            error!(digest = %blob.spec.digest, chunk = i, range = %format!("{start}-{end}"),
                expected = %blob.spec.chunk_digests[i as usize], "cached chunk does not match its digest: dropping it");
            blob.mark(&mut st, i, false);
            confirmed += 1;
        }
        if confirmed > 0 {
            metrics.verify_failures.inc();
            blob.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    drop(st);
    blob.changed.notify_all();
}

fn persist_spec(blob: &Blob) -> io::Result<()> {
    let tmp = blob.paths.json.with_extension("json.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(&blob.spec).map_err(io::Error::other)?)?;
    f.sync_all()?;
    // Rename: a crash never leaves a half-written spec for the next start to trip over.
    fs::rename(&tmp, &blob.paths.json)
}

/// Lowercase hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A random number without a dependency: std's hasher keys are seeded from the OS per process.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits() {
        let mut b = vec![0u8; 2];
        set_bit(&mut b, 9, true);
        assert!(bit(&b, 9) && !bit(&b, 8));
        assert_eq!(b, [0, 2]);
        set_bit(&mut b, 9, false);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn instances_differ() {
        assert_ne!(random_u64(), random_u64());
    }
}
