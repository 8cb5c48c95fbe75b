//! Sixteen clients at once over shared parents, with a crash in the middle: the
//! store's records, indexes, directories, mounts and blob references must agree
//! afterwards, and no call may fail with anything but the errors containerd
//! expects from races (NotFound, AlreadyExists, FailedPrecondition).
//!
//! The first half runs in a child process (this test binary again, in worker
//! mode), which is killed with SIGKILL mid-way; the second half reopens the store
//! in this process, as a restarted daemon would, and goes on. Needs root (Commit
//! mounts EROFS).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::need_root;
use snapshotter::{Error, Kind, Mount, Snapshotter, StoreOptions};

const CLIENTS: usize = 16;
const WORKER_ENV: &str = "DEDUP_STORE_CONCURRENCY_WORKER";

fn options() -> StoreOptions {
    StoreOptions {
        dedup: true,
        chunk_size: layer_convert::ChunkSize::from_bits(14).unwrap(),
        trash_idle: Duration::from_millis(200),
        compression: None,
        // Snapshots over chains of two or more layers mount merged metadata: its images
        // are built, shared, released and repaired under the same load and crash.
        merge_layers: true,
        max_unmerged_layers: 1,
    }
}

/// What the clients share: the committed snapshots any of them may build on.
struct Shared {
    store: Arc<Snapshotter>,
    committed: Mutex<Vec<String>>,
    seq: AtomicU64,
    ops: Mutex<BTreeMap<&'static str, (u64, u64)>>,
    unexpected: Mutex<Vec<String>>,
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// The upper dir a mount spec writes to (a differ's view of an active snapshot).
fn upper(m: &[Mount]) -> PathBuf {
    let m = &m[0];
    match m.kind.as_str() {
        "bind" => PathBuf::from(&m.source),
        _ => PathBuf::from(
            m.options
                .iter()
                .find_map(|o| o.strip_prefix("upperdir="))
                .expect("an active snapshot's overlay has an upper dir"),
        ),
    }
}

impl Shared {
    fn record(&self, op: &'static str, r: Result<(), Error>) -> bool {
        let ok = r.is_ok();
        {
            let mut ops = self.ops.lock().unwrap();
            let e = ops.entry(op).or_default();
            if ok {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        match r {
            Ok(()) | Err(Error::NotFound(_) | Error::AlreadyExists(_) | Error::FailedPrecondition(_)) => {}
            Err(e) => self.unexpected.lock().unwrap().push(format!("{op}: {e}")),
        }
        ok
    }

    fn random_committed(&self, rng: &mut Rng) -> String {
        let c = self.committed.lock().unwrap();
        // One in eight snapshots starts a new chain.
        if c.is_empty() || rng.below(8) == 0 {
            return String::new();
        }
        c[rng.below(c.len())].clone()
    }

    fn client(&self, id: usize, until: Instant) {
        let s = &self.store;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((id as u64 + 1) << 32) ^ std::process::id() as u64);
        let mut mine: Vec<(String, Kind)> = Vec::new();
        while Instant::now() < until {
            let n = self.seq.fetch_add(1, Ordering::Relaxed);
            // A node's worth of snapshots, not an ever-growing pile: past these sizes
            // the clients remove more than they make.
            let op = match rng.below(10) {
                0..=2 | 5 if mine.len() >= 6 => 7,
                3 | 4 if self.committed.lock().unwrap().len() >= 150 => 8,
                op => op,
            };
            match op {
                0..=2 => {
                    let key = format!("active-{}-{id}-{n}", std::process::id());
                    let parent = self.random_committed(&mut rng);
                    let r = s.prepare(&key, &parent, BTreeMap::new()).map(|m| {
                        // Content shared between clients, so the chunk store dedups.
                        let data = test_support::pseudo_random(8192 * (1 + rng.below(8)), n % 5);
                        std::fs::write(upper(&m).join(format!("f{n}")), data).expect("write into the upper dir");
                    });
                    if self.record("prepare", r) {
                        mine.push((key, Kind::Active));
                    }
                }
                3 | 4 => {
                    let Some(i) = mine.iter().position(|(_, k)| *k == Kind::Active) else {
                        continue;
                    };
                    let (key, _) = mine.remove(i);
                    let name = format!("layer-{}-{id}-{n}", std::process::id());
                    if self.record("commit", s.commit(&name, &key, BTreeMap::new())) {
                        self.committed.lock().unwrap().push(name);
                    } else {
                        mine.push((key, Kind::Active));
                    }
                }
                5 => {
                    let key = format!("view-{}-{id}-{n}", std::process::id());
                    let parent = self.random_committed(&mut rng);
                    if self.record("view", s.view(&key, &parent, BTreeMap::new()).map(drop)) {
                        mine.push((key, Kind::View));
                    }
                }
                6 => {
                    if mine.is_empty() {
                        continue;
                    }
                    let (key, _) = &mine[rng.below(mine.len())];
                    self.record("mounts", s.mounts(key).map(drop));
                }
                7 => {
                    if mine.is_empty() {
                        continue;
                    }
                    let (key, _) = mine.remove(rng.below(mine.len()));
                    self.record("remove", s.remove(&key));
                }
                8 => {
                    // Another client's layer, perhaps with children or just removed.
                    let name = {
                        let c = self.committed.lock().unwrap();
                        if c.is_empty() {
                            continue;
                        }
                        c[rng.below(c.len())].clone()
                    };
                    if self.record("remove-shared", s.remove(&name)) {
                        self.committed.lock().unwrap().retain(|k| *k != name);
                    }
                }
                _ => {
                    let name = self.random_committed(&mut rng);
                    if !name.is_empty() {
                        self.record("stat", s.stat(&name).map(drop));
                    }
                }
            }
        }
    }
}

/// Runs the clients against the store at `root` until `until`.
fn run_clients(store: Arc<Snapshotter>, until: Instant) -> Arc<Shared> {
    let committed = store
        .list()
        .unwrap()
        .into_iter()
        .filter(|i| i.kind == Kind::Committed)
        .map(|i| i.name)
        .collect();
    let shared = Arc::new(Shared {
        store,
        committed: Mutex::new(committed),
        seq: AtomicU64::new(0),
        ops: Mutex::default(),
        unexpected: Mutex::default(),
    });
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let sh = shared.clone();
            std::thread::spawn(move || sh.client(i, until))
        })
        .collect();
    for t in threads {
        t.join().expect("a client panicked");
    }
    shared
}

fn worker(root: &Path) {
    let store = Arc::new(Snapshotter::open_with(root, options()).expect("open the store"));
    // Runs until killed; the deadline only bounds a worker nobody kills.
    run_clients(store, Instant::now() + Duration::from_secs(120));
}

#[test]
fn sixteen_clients_over_shared_parents_with_a_crash() {
    if let Ok(root) = std::env::var(WORKER_ENV) {
        worker(Path::new(&root));
        return;
    }
    need_root();
    let tmp = test_support::TestDir::new_in(Path::new("/var/tmp"), "store-concurrency-");
    let root = tmp.join("root");

    // First half: a separate process, killed mid-way.
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sixteen_clients_over_shared_parents_with_a_crash",
            "--nocapture",
        ])
        .env(WORKER_ENV, &root)
        .spawn()
        .expect("start the worker");
    let mut child = test_support::ChildGuard::new(child);
    std::thread::sleep(Duration::from_secs(30));
    let st = child.kill9().expect("the worker ran until killed");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9), "{st}");

    // Second half: the store comes back as a restarted daemon's would, consistent.
    let t = Instant::now();
    let store = Arc::new(Snapshotter::open_with(&root, options()).expect("reopen after the crash"));
    let before = store.list().unwrap();
    assert!(
        before.iter().filter(|i| i.kind == Kind::Committed).count() > 10,
        "the worker committed too little to test anything: {} snapshots",
        before.len()
    );
    eprintln!("reopened with {} snapshots in {:?}", before.len(), t.elapsed());
    assert_eq!(store.verify().unwrap(), Vec::<String>::new(), "after the crash");
    let t = Instant::now();
    let shared = run_clients(store.clone(), Instant::now() + Duration::from_secs(30));
    let ops = shared.ops.lock().unwrap().clone();
    eprintln!("after the restart (ok, refused) in {:?}: {ops:?}", t.elapsed());
    let t = Instant::now();
    assert_eq!(shared.unexpected.lock().unwrap().clone(), Vec::<String>::new());
    for op in ["prepare", "commit", "view", "mounts", "remove"] {
        assert!(
            ops.get(op).is_some_and(|(ok, _)| *ok > 0),
            "no successful {op}: {ops:?}"
        );
    }
    assert_eq!(store.verify().unwrap(), Vec::<String>::new(), "after the clients");

    // Everything removed, leaves first: nothing may be left behind.
    loop {
        let all = store.list().unwrap();
        if all.is_empty() {
            break;
        }
        let parents: std::collections::HashSet<String> = all.iter().map(|i| i.parent.clone()).collect();
        for i in all.iter().filter(|i| !parents.contains(&i.name)) {
            store.remove(&i.name).unwrap();
        }
    }
    eprintln!("verified and removed everything in {:?}", t.elapsed());
    store.cleanup().unwrap();
    assert_eq!(
        store.verify().unwrap(),
        Vec::<String>::new(),
        "after removing everything"
    );
    for d in ["snapshots", "m", "blobs", "staging", "merged", "mm"] {
        let left: Vec<_> = std::fs::read_dir(root.join(d))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{d}/ holds {left:?} with no snapshots left");
    }
    assert_eq!(store.stats().unwrap().chunks.blobs, 0);
    store.shutdown();
}
