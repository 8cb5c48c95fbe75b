//! Eight parallel pulls of different images through the proxy snapshotter complete with correct content.
//!
//! The images are built in the test's environment directory from the cached busybox layout (see
//! scripts/build-test-images.sh): busybox's layer shared by all eight (so eight unpacks of the same base race), plus a
//! distinct layer per image holding a known text, a pseudo-random blob and a symlink; the odd ones get one more
//! layer that rewrites a file and deletes another (a whiteout).  All eight are pushed to the environment's registry,
//! pulled with `ctr image pull --snapshotter dedup` at the same time, each run to check its own content, and every
//! committed layer is checked with fsck.erofs (`Env::check_layout`).
//!
//! Needs root and the end-to-end packages (see e2e_containerd.rs); fails, never skips, without them.
//!
//!     cargo test --release -p dedup-snapshotter --test e2e_parallel -- --nocapture

mod e2e;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use e2e::{describe, Env};
use sha2::{Digest, Sha256};

const IMAGES: usize = 8;

/// Deterministic pseudo-random bytes (xorshift64*).
fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        out.extend_from_slice(&s.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn run(cmd: &mut Command) -> String {
    let what = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    assert!(out.status.success(), "{}", describe(&what, &out));
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// A layer tar of the directory `src` (owned by root, sorted, numeric owners).
fn tar_layer(src: &Path, out: &Path) {
    run(Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "--sort=name", "-C"])
        .arg(src)
        .arg("-cf")
        .arg(out)
        .arg("data"));
}

/// What image `i` must show: (stdout of the check script inside the container).
struct Expected {
    name: String,
    out: String,
}

/// Builds the eight images as tags of one OCI layout under `work` and pushes each to the registry as `par<i>`.
fn build_and_push(env: &Env, work: &Path) -> Vec<Expected> {
    let t = Instant::now();
    let cache = std::env::var("E2E_IMAGES").unwrap_or_else(|_| "/var/cache/dedup-snapshotter-tests/oci".into());
    let layout = work.join("par");
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{cache}/busybox"))
        .arg(&layout));
    let mut expected = Vec::new();
    for i in 0..IMAGES {
        let l = work.join(format!("l{i}"));
        let d = l.join("data");
        fs::create_dir_all(d.join(format!("nested/only-in-{i}"))).unwrap();
        let id = format!("image {i} of {IMAGES}\n");
        fs::write(d.join("id"), &id).unwrap();
        let b = blob(i as u64 + 1, (3 << 20) + i * 40_000 + 123);
        fs::write(d.join("blob.bin"), &b).unwrap();
        // Many small files, so that the eight conversions overlap for a while.
        fs::create_dir(d.join("many")).unwrap();
        let mut many = Sha256::new();
        for j in 0..300 {
            let small = blob((i * 1000 + j) as u64 + 7, 100 + (j * 37) % 9000);
            fs::write(d.join(format!("many/{j:04}")), &small).unwrap();
            many.update(&small);
        }
        let many = hex::encode(many.finalize());
        fs::write(d.join("gone"), "to be deleted\n").unwrap();
        std::os::unix::fs::symlink("../id", d.join("nested/id-link")).unwrap();
        let tar = work.join(format!("layer{i}.tar"));
        tar_layer(&l, &tar);
        let tag = format!("img{i}");
        run(Command::new("umoci")
            .args(["raw", "add-layer", "--tag", &tag, "--image"])
            .arg(format!("{}:latest", layout.display()))
            .arg(&tar));
        let mut text_id = id.clone();
        let mut listing = "blob.bin gone id many nested".to_string();
        if i % 2 == 1 {
            // A second distinct layer: rewrites /data/id, deletes /data/gone.
            let l2 = work.join(format!("l{i}b"));
            let d2 = l2.join("data");
            fs::create_dir_all(&d2).unwrap();
            text_id = format!("image {i} of {IMAGES}, layer 2\n");
            fs::write(d2.join("id"), &text_id).unwrap();
            fs::write(d2.join(".wh.gone"), "").unwrap();
            let tar2 = work.join(format!("layer{i}b.tar"));
            tar_layer(&l2, &tar2);
            run(Command::new("umoci")
                .args(["raw", "add-layer", "--image"])
                .arg(format!("{}:{tag}", layout.display()))
                .arg(&tar2));
            listing = "blob.bin id many nested".to_string();
        }
        let sha = hex::encode(Sha256::digest(&b));
        expected.push(Expected {
            name: format!("par{i}"),
            out: format!(
                "{text_id}{sha}  /data/blob.bin\n{listing}\nonly-in-{i}\n{text_id}{}\n300\n{many}  -\n",
                b.len()
            ),
        });
    }
    // Push all eight at once (they share busybox's blob).
    let pushes: Vec<_> = (0..IMAGES)
        .map(|i| {
            Command::new("skopeo")
                .args(["copy", "--quiet", "--insecure-policy", "--dest-tls-verify=false"])
                .arg(format!("oci:{}:img{i}", layout.display()))
                .arg(format!("docker://{}/par{i}:latest", env.registry))
                .stdin(Stdio::null())
                .output()
        })
        .collect();
    for (i, p) in pushes.into_iter().enumerate() {
        let out = p.expect("spawn skopeo");
        assert!(
            out.status.success(),
            "{}",
            describe(&format!("skopeo copy img{i}"), &out)
        );
    }
    eprintln!(
        "e2e-parallel: built and pushed {IMAGES} images in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    expected
}

#[test]
fn eight_parallel_pulls_of_different_images() {
    let _serial = e2e::serial();
    let env = Env::start();
    let work = env.dir.join("par-build");
    fs::create_dir(&work).unwrap();
    let expected = build_and_push(&env, &work);

    // Eight pulls at once.
    let t = Instant::now();
    let results: Vec<(String, std::process::Output, f64)> = std::thread::scope(|s| {
        let handles: Vec<_> = expected
            .iter()
            .map(|e| {
                let env = &env;
                s.spawn(move || {
                    let t = Instant::now();
                    let image = env.image(&e.name);
                    let out = env.ctr_raw(
                        &["image", "pull", "--plain-http", "--snapshotter", "dedup", &image],
                        150,
                    );
                    (image, out, t.elapsed().as_secs_f64())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("pull thread")).collect()
    });
    for (image, out, secs) in &results {
        assert!(
            out.status.success(),
            "{}",
            describe(&format!("ctr image pull {image}"), out)
        );
        eprintln!("e2e-parallel: pulled {image} in {secs:.2}s");
    }
    eprintln!(
        "e2e-parallel: {IMAGES} parallel pulls done in {:.2}s",
        t.elapsed().as_secs_f64()
    );

    // One base + one layer per image + one more for the odd ones; no duplicate of the shared base.
    let snaps = env.snapshots();
    let committed = snaps.iter().filter(|s| s.kind == "Committed").count();
    assert_eq!(committed, 1 + IMAGES + IMAGES / 2, "{snaps:#?}");
    assert_eq!(
        snaps.len(),
        committed,
        "left-over active snapshots after the pulls: {snaps:#?}"
    );
    let bases: Vec<_> = snaps.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(
        bases.len(),
        1,
        "the shared busybox layer was unpacked more than once: {bases:#?}"
    );

    // Each image shows its own content.
    let script = "cat /data/id; sha256sum /data/blob.bin; echo $(ls /data); ls /data/nested | grep only-in; \
                  cat /data/nested/id-link; wc -c < /data/blob.bin; ls /data/many | wc -l; cat /data/many/* | sha256sum";
    for (i, e) in expected.iter().enumerate() {
        let out = env.run(&e.name, &format!("par-run-{i}"), &["sh", "-c", script]);
        assert_eq!(out, e.out, "content of {}", e.name);
    }

    // Every committed layer is an EROFS image that fsck.erofs accepts; the layout matches the snapshot list.
    env.check_layout();
    env.remove_everything();
    env.stop();
}
