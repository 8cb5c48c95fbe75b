//! containerd filter expressions: parsing any string never panics, and a parsed
//! filter evaluates against snapshots without panicking (regexes included).
#![no_main]

use std::collections::BTreeMap;

use grpc_services::filters::Filter;
use libfuzzer_sys::fuzz_target;
use snapshotter::{Info, Kind};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // Several filter strings, OR-ed, as a List request carries them.
    let parts: Vec<&str> = s.split('\n').collect();
    let one = Filter::parse(s);
    let all = Filter::parse_all(&parts);
    let mut labels = BTreeMap::new();
    labels.insert("containerd.io/gc.root".to_string(), "2024".to_string());
    labels.insert("a.b".to_string(), String::new());
    labels.insert("x".to_string(), s.chars().take(16).collect());
    let infos = [
        Info {
            name: "default/1/sha256:abc".into(),
            parent: String::new(),
            kind: Kind::Committed,
            labels: labels.clone(),
            created: std::time::SystemTime::UNIX_EPOCH,
            updated: std::time::SystemTime::UNIX_EPOCH,
        },
        Info {
            name: s.chars().take(32).collect(),
            parent: "p".into(),
            kind: Kind::Active,
            labels: BTreeMap::new(),
            created: std::time::SystemTime::UNIX_EPOCH,
            updated: std::time::SystemTime::UNIX_EPOCH,
        },
    ];
    for f in [one, all].into_iter().flatten() {
        for i in &infos {
            let _ = f.matches(i);
        }
        let _ = f.is_always();
    }
});
