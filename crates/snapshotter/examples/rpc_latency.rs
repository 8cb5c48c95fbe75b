//! Store RPC latency with many existing snapshots (issue 13's measurement).
//!
//! ```text
//! cargo run --release -p snapshotter --example rpc_latency -- [ROOT] [SNAPSHOTS]
//! ```
//!
//! As root (Commit mounts EROFS). Builds `SNAPSHOTS` (default 1,000) snapshots the way
//! a node holds them: chains of five committed layers (images), and active
//! snapshots and views over their tops (containers), then times Prepare, View,
//! Mounts, Stat, Commit and Remove against that store and prints p50/p99 per call.
//! Commit converts an empty upper dir, so its time is the store's own work plus
//! a minimal conversion and mount.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use snapshotter::Snapshotter;

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e3
}

/// A small deterministic generator, so every run makes the same choices.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let root = args
        .get(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("dedup-rpc-latency"));
    let total: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let _ = std::fs::remove_dir_all(&root);
    let s = Snapshotter::open(&root).expect("open the store");
    let none = BTreeMap::new;

    // A quarter committed (chains of five), the rest containers over the tops.
    let chains = (total / 4).div_ceil(5);
    let mut tops = Vec::new();
    let mut n = 0;
    for c in 0..chains {
        let mut parent = String::new();
        for l in 0..5 {
            let key = format!("c{c}-l{l}-active");
            let name = format!("c{c}-l{l}");
            s.prepare(&key, &parent, none()).unwrap();
            s.commit(&name, &key, none()).unwrap();
            parent = name;
            n += 1;
        }
        tops.push(parent);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut actives = Vec::new();
    while n < total {
        let top = &tops[rng.below(tops.len())];
        let key = format!("ctr-{n}");
        if n % 4 == 0 {
            s.view(&key, top, none()).unwrap();
        } else {
            s.prepare(&key, top, none()).unwrap();
            actives.push(key);
        }
        n += 1;
    }
    eprintln!("store at {} with {n} snapshots", root.display());

    let rounds = 200;
    let mut times: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut time = |name: &'static str, f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        times.entry(name).or_default().push(t.elapsed());
    };
    for i in 0..rounds {
        let top = tops[rng.below(tops.len())].clone();
        let key = format!("bench-{i}");
        time("Prepare", &mut || {
            s.prepare(&key, &top, none()).unwrap();
        });
        let view = format!("bench-view-{i}");
        time("View", &mut || {
            s.view(&view, &top, none()).unwrap();
        });
        let a = actives[rng.below(actives.len())].clone();
        time("Mounts", &mut || {
            s.mounts(&a).unwrap();
        });
        time("Stat", &mut || {
            s.stat(&a).unwrap();
        });
        let name = format!("bench-{i}-committed");
        time("Commit", &mut || {
            s.commit(&name, &key, none()).unwrap();
        });
        time("Remove", &mut || {
            s.remove(&name).unwrap();
        });
        s.remove(&view).unwrap();
    }
    println!(
        "{:<8} {:>9} {:>9}   (ms, {rounds} calls each, {n} snapshots)",
        "call", "p50", "p99"
    );
    for (name, v) in times.iter_mut() {
        println!("{name:<8} {:>9.3} {:>9.3}", pct(v, 0.5), pct(v, 0.99));
    }
    drop(s);
    // The committed layers stay mounted until unmounted: clean up what we made.
    let s = Snapshotter::open(&root).unwrap();
    s.shutdown();
    drop(s);
    let _ = std::fs::remove_dir_all(&root);
}
