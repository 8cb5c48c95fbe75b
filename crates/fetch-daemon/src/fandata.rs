//! The daemon's side of the fanotify data path (see [`crate::fanotify`] for the kernel's side): which cache
//! files are marked, the thread that reads events, and the workers that make ranges present before answering.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tracing::{debug, error, info, warn};

use crate::daemon::{Blob, ChunkError, Daemon};
use crate::fanotify::{self, Group, Journal, FAN_PRE_ACCESS};

/// Workers that wait for fetches on behalf of readers. Reads of data already here never wait for them: the
/// event reader answers those itself.
const WORKERS: usize = 32;

/// An event handed to a worker.
struct Job {
    /// The number the answer names.
    number: RawFd,
    /// Keeps the number ours until answered: the event's own descriptor, or a placeholder for an event a
    /// previous instance read.
    _fd: Option<OwnedFd>,
    blob: Arc<Blob>,
    offset: u64,
    count: u64,
}

/// The fanotify data path's state.
pub struct Fan {
    group: Group,
    journal: Journal,
    /// Marked cache files by `(st_dev, st_ino)`: an event names the file by descriptor only.
    by_inode: RwLock<HashMap<(u64, u64), Arc<Blob>>>,
    /// Where each blob gets a `sha256-<hex>` link to its cache file (for tools that name blobs so).
    links: PathBuf,
    jobs: Mutex<Sender<Job>>,
    /// Taken by the workers once the daemon is attached.
    rx: Mutex<Option<Receiver<Job>>>,
    /// The daemon, once it has loaded its blobs (events of other processes wait for it; the daemon's own, made
    /// while it loads, are answered before).
    daemon: std::sync::OnceLock<std::sync::Weak<Daemon>>,
    /// Set once every known blob is marked and indexed: events are handled from then on.
    ready: std::sync::atomic::AtomicBool,
    /// Events the previous instance took and did not answer, with their numbers reserved here.
    inherited: Mutex<Vec<(fanotify::Journaled, Option<OwnedFd>)>>,
}

/// How the group was found.
pub struct Setup {
    /// The group.
    pub group: Group,
    /// Its instance number (kept by the holder across restarts).
    pub instance: u64,
    /// Taken from a holder, with marks and maybe events of a previous instance.
    pub taken: bool,
}

/// Takes the group from the holder at `socket`, or makes one and starts a holder for it.
pub fn setup(socket: &Path) -> anyhow::Result<Setup> {
    match fanotify::take_from_holder(socket) {
        Ok(Some((group, instance))) => {
            info!(
                instance,
                "took the fanotify group from its holder: marks and queued reads carry over"
            );
            return Ok(Setup {
                group,
                instance,
                taken: true,
            });
        }
        Ok(None) => {}
        Err(e) => warn!(error = %e, "the fanotify group holder did not hand over its group: making a new one"),
    }
    let group = Group::new()?;
    let instance = crate::daemon::random_u64();
    fanotify::spawn_holder(&group, socket, instance)?;
    info!(instance, socket = %socket.display(), "new fanotify group; its holder keeps it across restarts");
    Ok(Setup {
        group,
        instance,
        taken: false,
    })
}

impl Fan {
    /// Starts the data path's event reader on `setup`'s group, before the daemon loads its blobs (which may
    /// touch marked files): when the group was taken over, events the previous instance read and did not journal
    /// are denied first, and those it journaled are kept for [`Fan::attach`].
    pub fn start(setup: Setup, root: &Path, links: PathBuf) -> anyhow::Result<Arc<Fan>> {
        let journal = Journal::open(&root.join("fanotify.inflight"))?;
        let mut inherited = Vec::new();
        if setup.taken {
            // Before reading any event: every event pending now is the previous instance's.
            let entries = journal.entries()?;
            let keep: HashSet<RawFd> = entries.iter().map(|e| e.fd).collect();
            let limit = entries.iter().map(|e| e.fd + 1024).max().unwrap_or(0).max(4096);
            fanotify::deny_orphans(&setup.group, limit, &keep);
            // Reserved before the first event is read: an event of ours given a journaled number would take the
            // answer meant for the old one (the kernel matches answers by number alone).
            inherited = entries
                .into_iter()
                .map(|e| {
                    let fd = fanotify::reserve_number(e.fd);
                    (e, fd)
                })
                .collect();
        } else {
            journal.clear_all()?;
        }
        let (tx, rx) = channel();
        let fan = Arc::new(Fan {
            group: setup.group,
            journal,
            by_inode: RwLock::new(HashMap::new()),
            links,
            jobs: Mutex::new(tx),
            rx: Mutex::new(Some(rx)),
            daemon: std::sync::OnceLock::new(),
            ready: std::sync::atomic::AtomicBool::new(false),
            inherited: Mutex::new(inherited),
        });
        let f = fan.clone();
        std::thread::Builder::new()
            .name("fan-events".into())
            .spawn(move || f.read_loop())?;
        Ok(fan)
    }

    /// Serves `daemon`'s blobs: every blob it loaded is marked, the workers start, and the reads the previous
    /// instance left unanswered are handled.
    pub fn attach(self: &Arc<Self>, daemon: &Arc<Daemon>) -> anyhow::Result<()> {
        let _ = self.daemon.set(Arc::downgrade(daemon));
        self.clear_stale_links(daemon);
        for blob in daemon.all_blobs() {
            self.watch(&blob)?;
        }
        let rx = Arc::new(Mutex::new(self.rx.lock().unwrap().take().expect("attached once")));
        for n in 0..WORKERS {
            let (d, f, rx) = (daemon.clone(), self.clone(), rx.clone());
            std::thread::Builder::new()
                .name(format!("fan-worker-{n}"))
                .spawn(move || f.work(&d, &rx))?;
        }
        for (e, reserved) in std::mem::take(&mut *self.inherited.lock().unwrap()) {
            let blob = daemon.all_blobs().into_iter().find(|b| b.hex == e.hex);
            let Some(blob) = blob else {
                // Its blob is gone: nothing to make present, and the reader must not wait forever.
                let _ = self.group.respond(e.fd, false);
                self.journal.clear(e.fd);
                continue;
            };
            info!(digest = %blob.spec.digest, offset = e.offset, count = e.count,
                "answering a read the previous instance took and did not answer");
            self.submit(Job {
                number: e.fd,
                _fd: reserved,
                blob,
                offset: e.offset,
                count: e.count,
            });
        }
        self.ready.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn submit(&self, job: Job) {
        if self.jobs.lock().unwrap().send(job).is_err() {
            error!("the fanotify workers are gone");
        }
    }

    /// Marks a blob's cache file (when it is not complete and verified) and links it under its name.
    pub fn watch(&self, blob: &Arc<Blob>) -> std::io::Result<()> {
        let file = Daemon::data_file(blob);
        let md = file.metadata()?;
        self.by_inode
            .write()
            .unwrap()
            .insert((md.dev(), md.ino()), blob.clone());
        let link = self.links.join(blob.file_name());
        let target = blob.data_path();
        if std::fs::read_link(&link).ok().as_deref() != Some(target) {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(target, &link)?;
        }
        // A restarted daemon re-checks every cached chunk before trusting it: the mark stays until then.
        self.group.mark(file.as_fd())?;
        blob.marked.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// After a whole-blob verification: a verified blob needs no events any more.
    pub fn after_verify(&self, blob: &Blob) {
        if blob.status_verified() && blob.marked.swap(false, Ordering::SeqCst) {
            match self.group.unmark(Daemon::data_file(blob).as_fd()) {
                Ok(()) => info!(digest = %blob.spec.digest, "blob complete and verified: its mark is removed"),
                Err(e) => {
                    blob.marked.store(true, Ordering::SeqCst);
                    warn!(digest = %blob.spec.digest, error = %e, "cannot remove the mark of a verified blob");
                }
            }
        }
    }

    /// The blob is unregistered.
    pub fn forget(&self, blob: &Blob) {
        if blob.marked.swap(false, Ordering::SeqCst) {
            let _ = self.group.unmark(Daemon::data_file(blob).as_fd());
        }
        self.by_inode.write().unwrap().retain(|_, b| b.hex != blob.hex);
        let _ = std::fs::remove_file(self.links.join(blob.file_name()));
    }

    /// Whether any blob is still marked (its readers need a live group).
    pub fn any_marked(&self) -> bool {
        self.by_inode
            .read()
            .unwrap()
            .values()
            .any(|b| b.marked.load(Ordering::SeqCst))
    }

    /// Whether events are journaled and unanswered.
    pub fn in_flight(&self) -> bool {
        self.journal.entries().map(|e| !e.is_empty()).unwrap_or(true)
    }

    fn clear_stale_links(&self, daemon: &Daemon) {
        let known: HashSet<String> = daemon.all_blobs().iter().map(|b| b.file_name()).collect();
        let Ok(dir) = std::fs::read_dir(&self.links) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("sha256-") && !known.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Reads events until the daemon stops. Never waits for a fetch or a blob's lock: the daemon's own reads
    /// and writes of marked files raise events that only this thread answers. Other processes' events that come
    /// before the daemon is attached wait, unanswered, until it is.
    fn read_loop(&self) {
        let me = std::process::id() as i32;
        let mut buf = vec![0u8; 64 << 10];
        let mut parked: Vec<(fanotify::Event, OwnedFd)> = Vec::new();
        loop {
            let daemon = self.daemon.get().and_then(std::sync::Weak::upgrade);
            if daemon.as_ref().is_some_and(|d| d.is_stopping()) {
                break;
            }
            let ready = self.ready.load(Ordering::SeqCst);
            if let (true, Some(d)) = (ready, &daemon) {
                for (ev, fd) in parked.drain(..) {
                    self.handle(d, ev, fd);
                }
            }
            let wait = if !ready {
                Duration::from_millis(20)
            } else {
                Duration::from_millis(200)
            };
            let events = match self.group.read_events(&mut buf, wait) {
                Ok(e) => e,
                Err(e) => {
                    error!(error = %e, "cannot read fanotify events");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            for ev in events {
                if ev.fd < 0 {
                    continue;
                }
                // SAFETY: the kernel opened this descriptor for the event and gave it to us.
                let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(ev.fd) };
                if ev.pid == me || ev.mask & FAN_PRE_ACCESS == 0 {
                    self.answer(ev.fd, true);
                    continue;
                }
                match (&daemon, ready) {
                    (Some(d), true) => self.handle(d, ev, fd),
                    _ => parked.push((ev, fd)),
                }
            }
        }
        debug!("fanotify event reader stopped");
    }

    /// An event of another process: answered here when its range is present, else journaled and handed to a
    /// worker.
    fn handle(&self, daemon: &Arc<Daemon>, ev: fanotify::Event, fd: OwnedFd) {
        daemon.metrics.fanotify_events.inc();
        let blob = rustix::fs::fstat(&fd)
            .ok()
            .and_then(|st| self.by_inode.read().unwrap().get(&(st.st_dev, st.st_ino)).cloned());
        let (Some(blob), Some((offset, count))) = (blob, ev.range) else {
            // Not a blob of ours (a mark left on a file since unregistered), or an access with no range (not a
            // read or write): nothing to fetch for it.
            self.answer(ev.fd, true);
            return;
        };
        daemon.record_access(&blob, offset, count);
        if daemon.range_ready(&blob, offset, count) == Some(true) {
            daemon.note_read();
            daemon.metrics.cache_hits.inc();
            self.answer(ev.fd, true);
            return;
        }
        // Journaled before anything can wait on it: a daemon killed from here on leaves the number for the next
        // one to answer.
        self.journal.record(ev.fd, &blob.hex, offset, count);
        self.submit(Job {
            number: ev.fd,
            _fd: Some(fd),
            blob,
            offset,
            count,
        });
    }

    fn answer(&self, number: RawFd, allow: bool) {
        if let Err(e) = self.group.respond(number, allow) {
            error!(fd = number, error = %e, "cannot answer a fanotify event");
        }
    }

    fn work(&self, daemon: &Arc<Daemon>, rx: &Mutex<Receiver<Job>>) {
        loop {
            let job = match rx.lock().unwrap().recv() {
                Ok(j) => j,
                Err(_) => return,
            };
            match daemon.ensure_range(&job.blob, job.offset, job.count) {
                Ok(()) => self.answer(job.number, true),
                // Left journaled and unanswered: the next instance answers it, and its reader waits meanwhile.
                Err(ChunkError::Shutdown) => continue,
                Err(e) => {
                    debug!(digest = %job.blob.spec.digest, offset = job.offset, count = job.count, error = ?e,
                        "denying a read");
                    self.answer(job.number, false);
                }
            }
            self.journal.clear(job.number);
            drop(job);
        }
    }
}
