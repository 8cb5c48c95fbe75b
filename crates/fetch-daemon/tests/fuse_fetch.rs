//! End-to-end tests of `dedupd`: the real binary, a real FUSE mount, a real docker-registry or a
//! scripted blob server on loopback. They need root and FUSE and fail (not skip) without them.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::*;
use fetch_api::ErrorKind;

fn eio(r: std::io::Result<Vec<u8>>) -> bool {
    matches!(r, Err(ref e) if e.raw_os_error() == Some(libc::EIO))
}

#[test]
fn serves_a_registry_blob_through_fuse() {
    require_fuse();
    let registry = Registry::start();
    let blob = data((5 * MIB + 12_345) as usize, 1);
    let digest = registry.push("layers/test", &blob);
    let place = Place::new();
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let d = Dedupd::start(&place, &["--metrics-address", &metrics_addr]);

    let mut spec = spec_for(&blob, MIB, &registry.addr, "layers/test");
    spec.prefetch = vec![4, 1];
    assert_eq!(spec.digest, digest);
    let reg = d.client.register(&spec).unwrap();
    assert_eq!(
        reg.path,
        d.mountpoint.join(format!("sha256-{}", &digest[7..])).to_str().unwrap()
    );
    // Idempotent for the same spec; a different spec for the same digest is refused.
    d.client.register(&spec).unwrap();
    let mut other = spec.clone();
    other.prefetch = vec![0];
    assert_eq!(d.client.register(&other).unwrap_err().kind, ErrorKind::InvalidArgument);

    let path = std::path::PathBuf::from(&reg.path);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), blob.len() as u64);
    assert_eq!(meta.mode() & 0o7777, 0o444);
    let names: Vec<String> = std::fs::read_dir(&d.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, [format!("sha256-{}", &digest[7..])]);

    let file = std::fs::File::open(&path).unwrap();
    for (offset, len) in [
        (0u64, 4096usize),
        (MIB + 100, 200_000),
        (3 * MIB - 10, 20),
        (5 * MIB, 12_345),
    ] {
        let got = read_at(&file, offset, len).unwrap();
        assert!(
            got == blob[offset as usize..offset as usize + len],
            "bytes at {offset}+{len} differ"
        );
    }
    assert!(read_all(&path) == blob, "the whole file differs from the blob");

    let status = d.client.wait(&digest, Duration::from_secs(60)).unwrap();
    assert!(status.complete && status.verified, "{status:?}");
    assert_eq!((status.chunks, status.present, status.size), (6, 6, blob.len() as u64));
    assert!(status.fetched_bytes >= blob.len() as u64, "{status:?}");
    assert_eq!(d.client.list().unwrap(), [d.client.status(&digest).unwrap()]);
    assert!(place.root().join(format!("blobs/{}.verified", &digest[7..])).exists());

    assert!(d.metric("dedupd_fetched_bytes_total") >= blob.len() as f64);
    assert!(d.metric("dedupd_fetches_total") >= 6.0);
    assert_eq!(d.metric("dedupd_verify_failures_total"), 0.0);
    // A second read of data the kernel no longer caches is served by the daemon from its cache.
    let hits = d.metric("dedupd_cache_hits_total");
    let fetches = d.metric("dedupd_fetches_total");
    drop_page_cache(&file);
    assert!(read_at(&file, 2 * MIB, 8192).unwrap() == blob[2 * MIB as usize..2 * MIB as usize + 8192]);
    assert!(d.metric("dedupd_cache_hits_total") > hits, "{}", d.metrics());
    assert_eq!(d.metric("dedupd_fetches_total"), fetches);

    // The same metrics over HTTP, with the per-blob gauges.
    let text = http_get(&metrics_addr, "/metrics");
    assert!(
        text.contains(&format!("dedupd_blob_size_bytes{{digest=\"{digest}\"}} {}", blob.len())),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "dedupd_blob_present_bytes{{digest=\"{digest}\"}} {}",
            blob.len()
        )),
        "{text}"
    );
    assert!(text.contains("dedupd_fetch_seconds_count"), "{text}");

    // A trace records the reads that reach the daemon.
    d.client.trace_start().unwrap();
    drop_page_cache(&file);
    read_at(&file, 4 * MIB, 4096).unwrap();
    let trace = d.client.trace_stop().unwrap();
    assert!(
        trace
            .iter()
            .any(|a| a.digest == digest && a.offset <= 4 * MIB && a.offset + a.len > 4 * MIB),
        "{trace:?}"
    );
    assert_eq!(d.client.trace_stop().unwrap_err().kind, ErrorKind::InvalidArgument);

    // Unregister: the file and the cache go.
    drop(file);
    d.client.unregister(&digest).unwrap();
    assert_eq!(d.client.status(&digest).unwrap_err().kind, ErrorKind::NotFound);
    assert!(!path.exists(), "the file is still visible after unregister");
    assert!(!place.root().join(format!("blobs/{}.data", &digest[7..])).exists());
}

#[test]
fn never_serves_corrupted_chunks() {
    require_fuse();
    let blob = data((5 * MIB + 300 * 1024) as usize, 2);
    let server = BlobServer::start(blob.clone());
    server.set_mode(Mode::Corrupt);
    let place = Place::new();
    let d = Dedupd::start(&place, &["--no-prefetch", "--read-deadline-secs", "3"]);
    let spec = spec_for(&blob, MIB, &server.addr, "layers/corrupt");
    let reg = d.client.register(&spec).unwrap();
    let file = std::fs::File::open(&reg.path).unwrap();

    let began = Instant::now();
    let r = read_at(&file, MIB + 10, 4096);
    let took = began.elapsed();
    assert!(eio(r), "a read of a corrupted chunk must fail with EIO");
    assert!(
        took >= Duration::from_millis(2900),
        "EIO came after {took:?}, before the 3 s deadline"
    );
    assert!(took < Duration::from_secs(20), "EIO took {took:?}");
    assert!(server.blob_gets().len() >= 2, "no retries: {:?}", server.blob_gets());
    assert!(d.metric("dedupd_verify_failures_total") >= 2.0);
    let status = d.client.status(&spec.digest).unwrap();
    assert_eq!(status.present, 0, "a corrupted chunk was cached: {status:?}");
    assert!(status.errors >= 2);
    let log = d.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("does not match its digest"))
        .unwrap_or_else(|| panic!("no verify error in the log:\n{log}"));
    for want in [
        spec.digest.as_str(),
        "chunk=1",
        &format!("{}-{}", MIB, 2 * MIB),
        &spec.chunk_digests[1],
    ] {
        assert!(line.contains(want), "the verify error lacks {want}: {line}");
    }

    // Good data again: the same read succeeds with the right bytes.
    server.set_mode(Mode::Good);
    let got = read_at(&file, MIB + 10, 4096).unwrap();
    assert!(got == blob[MIB as usize + 10..MIB as usize + 10 + 4096]);
    assert_eq!(d.client.status(&spec.digest).unwrap().present, 1);
}

#[test]
fn rides_out_a_registry_outage() {
    require_fuse();
    let blob = data((5 * MIB + 300 * 1024) as usize, 3);
    let server = BlobServer::start(blob.clone());
    let place = Place::new();
    let d = Dedupd::start(&place, &["--no-prefetch", "--read-deadline-secs", "3"]);
    let spec = spec_for(&blob, MIB, &server.addr, "layers/outage");
    let reg = d.client.register(&spec).unwrap();
    let file = std::fs::File::open(&reg.path).unwrap();

    for (mode, offset) in [(Mode::Unavailable, 0), (Mode::Refuse, 2 * MIB + 77)] {
        server.set_mode(mode);
        let before = server.blob_gets().len();
        let began = Instant::now();
        assert!(
            eio(read_at(&file, offset, 4096)),
            "{mode:?}: the read must fail with EIO"
        );
        assert!(
            began.elapsed() >= Duration::from_millis(2900),
            "{mode:?}: EIO before the deadline"
        );
        assert!(server.blob_gets().len() - before >= 2, "{mode:?}: no retries");
    }
    assert!(d.metric("dedupd_fetch_errors_total") >= 4.0);
    assert_eq!(d.metric("dedupd_verify_failures_total"), 0.0);

    server.set_mode(Mode::Good);
    for offset in [0, 2 * MIB + 77] {
        let o = offset as usize;
        assert!(read_at(&file, offset, 4096).unwrap() == blob[o..o + 4096]);
    }
    // Reads during the outage hold up nothing once it ends: the whole blob reads back.
    assert!(read_all(std::path::Path::new(&reg.path)) == blob);
}

#[test]
fn restart_after_kill_keeps_the_cache() {
    require_fuse();
    let blob = data((5 * MIB + 300 * 1024) as usize, 4);
    let server = BlobServer::start(blob.clone());
    let place = Place::new();
    let spec = spec_for(&blob, MIB, &server.addr, "layers/restart");
    let hex = &spec.digest[7..];

    let mut first = Dedupd::start(&place, &["--no-prefetch"]);
    let first_instance = first.client.ping().unwrap().instance;
    let reg = first.client.register(&spec).unwrap();
    {
        let file = std::fs::File::open(&reg.path).unwrap();
        for chunk in [0u64, 2, 4] {
            let o = (chunk * MIB) as usize + 10;
            assert!(read_at(&file, o as u64, 4096).unwrap() == blob[o..o + 4096]);
        }
    }
    assert_eq!(first.client.status(&spec.digest).unwrap().present, 3);
    first.kill9();
    let err = std::fs::metadata(place.mountpoint()).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOTCONN),
        "the killed daemon's mount is not dead: {err}"
    );
    let fetched_before: Vec<u64> = server.blob_gets().iter().filter_map(|s| s.range).map(|r| r.0).collect();
    assert_eq!(fetched_before, [0, 2 * MIB, 4 * MIB]);
    // Chunk 4 rots on disk while the daemon is down: the next one must not trust its bitmap bit.
    {
        use std::os::unix::fs::FileExt;
        let data = std::fs::OpenOptions::new()
            .write(true)
            .open(place.root().join(format!("blobs/{hex}.data")))
            .unwrap();
        data.write_all_at(b"rot", 4 * MIB + 500).unwrap();
    }

    let second = Dedupd::start(&place, &[]);
    assert_ne!(second.client.ping().unwrap().instance, first_instance);
    let meta = std::fs::metadata(&reg.path).expect("the blob's file is back after the restart");
    assert_eq!(meta.len(), blob.len() as u64);
    let file = std::fs::File::open(&reg.path).unwrap();
    for chunk in [0u64, 2, 4] {
        let o = (chunk * MIB) as usize + 100;
        assert!(read_at(&file, o as u64, 4096).unwrap() == blob[o..o + 4096]);
    }
    let status = second.client.wait(&spec.digest, Duration::from_secs(60)).unwrap();
    assert!(status.complete && status.verified, "{status:?}");
    assert!(read_all(std::path::Path::new(&reg.path)) == blob);
    // The cached chunks were not fetched again; every other chunk was, once, and so was the rotten one.
    let mut fetched_after: Vec<u64> = server
        .blob_gets()
        .iter()
        .skip(3)
        .filter_map(|s| s.range)
        .map(|r| r.0)
        .collect();
    fetched_after.sort();
    assert_eq!(fetched_after, [MIB, 3 * MIB, 4 * MIB, 5 * MIB]);
    assert_eq!(second.metric("dedupd_verify_failures_total"), 1.0);
    assert_eq!(status.fetched_bytes, blob.len() as u64 - 2 * MIB);
    let log = second.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("cached chunk does not match its digest") && l.contains("chunk=4")),
        "no error for the rotten chunk in the log:\n{log}"
    );

    // SIGTERM: the daemon exits cleanly, detaches its mount and removes its socket.
    drop(file);
    let mut second = second;
    let exit = second.terminate().expect("dedupd did not stop on SIGTERM");
    assert!(exit.success(), "dedupd exited with {exit}");
    assert!(!place.socket().exists(), "the socket was left behind");
    assert!(!is_mounted(&place.mountpoint()), "the mount was left behind");
    assert!(place.root().join(format!("blobs/{hex}.verified")).exists());
}

#[test]
fn refuses_bad_specs() {
    require_fuse();
    let place = Place::new();
    let d = Dedupd::start(&place, &["--no-prefetch"]);
    let blob = data(1000, 5);
    let mut spec = spec_for(&blob, 256, "127.0.0.1:1", "x/y");
    spec.chunk_digests.pop();
    assert_eq!(d.client.register(&spec).unwrap_err().kind, ErrorKind::InvalidArgument);
    assert_eq!(
        d.client.status("sha256:nope").unwrap_err().kind,
        ErrorKind::InvalidArgument
    );
    let unknown = format!("sha256:{}", "0".repeat(64));
    assert_eq!(d.client.status(&unknown).unwrap_err().kind, ErrorKind::NotFound);
    assert_eq!(d.client.unregister(&unknown).unwrap_err().kind, ErrorKind::NotFound);
    assert!(d.client.list().unwrap().is_empty());
}

#[test]
fn kernel_mounts_erofs_from_a_fuse_file() {
    require_fuse();
    let mkfs = ["/usr/bin/mkfs.erofs", "/sbin/mkfs.erofs", "/usr/sbin/mkfs.erofs"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("mkfs.erofs is missing: apt-get install -y erofs-utils (this test builds an EROFS image)");
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap();
    assert!(
        filesystems.contains("erofs"),
        "erofs is not in /proc/filesystems: `modprobe erofs`"
    );
    let work = test_support::TestDir::new("dedupd-erofs-");
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("sub/f{i}"), data(700_000 + i * 1000, 10 + i as u64)))
        .chain([("hello".to_string(), b"hello from erofs over fuse\n".to_vec())])
        .collect();
    for (name, content) in &files {
        std::fs::write(tree.join(name), content).unwrap();
    }
    let image_path = work.path().join("layer.erofs");
    let out = std::process::Command::new(mkfs)
        .arg("--quiet")
        .arg(&image_path)
        .arg(&tree)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mkfs.erofs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = std::fs::read(&image_path).unwrap();

    let server = BlobServer::start(image.clone());
    let place = Place::new();
    let d = Dedupd::start(&place, &["--no-prefetch"]);
    let spec = spec_for(&image, 256 * 1024, &server.addr, "layers/erofs");
    let reg = d.client.register(&spec).unwrap();

    let target = work.path().join("layer");
    std::fs::create_dir(&target).unwrap();
    d.client.trace_start().unwrap();
    rustix::mount::mount(
        reg.path.as_str(),
        &target,
        "erofs",
        rustix::mount::MountFlags::RDONLY,
        None,
    )
    .expect("mount(2) of an EROFS image file on the FUSE mount");
    let guard = test_support::Unmount(target.clone());
    for (name, content) in &files {
        assert!(std::fs::read(target.join(name)).unwrap() == *content, "{name} differs");
    }
    let trace = d.client.trace_stop().unwrap();
    assert!(!trace.is_empty() && trace.iter().all(|a| a.digest == spec.digest));
    assert!(d.client.status(&spec.digest).unwrap().present > 0);
    drop(guard);
    assert!(!is_mounted(&target));
}

#[test]
fn prefetches_in_order_under_the_rate_limit() {
    require_fuse();
    let blob = data((4 * MIB) as usize, 6);
    let server = BlobServer::start(blob.clone());
    let place = Place::new();
    let rate = MIB.to_string();
    let d = Dedupd::start(&place, &["--prefetch-rate", &rate]);
    let mut spec = spec_for(&blob, MIB, &server.addr, "layers/prefetch");
    spec.prefetch = vec![3, 1];
    let began = Instant::now();
    d.client.register(&spec).unwrap();
    let status = d.client.wait(&spec.digest, Duration::from_secs(60)).unwrap();
    let took = began.elapsed();
    assert!(status.complete && status.verified, "{status:?}");
    // 4 MiB at 1 MiB/s with one second of burst: at least 3 s.
    assert!(
        took >= Duration::from_millis(2800),
        "prefetch of 4 MiB at 1 MiB/s took only {took:?}"
    );
    let order: Vec<u64> = server
        .blob_gets()
        .iter()
        .filter_map(|s| s.range)
        .map(|r| r.0 / MIB)
        .collect();
    assert_eq!(order, [3, 1, 0, 2]);
    assert!(place
        .root()
        .join(format!("blobs/{}.verified", &spec.digest[7..]))
        .exists());
}

#[test]
fn refreshes_an_expired_registry_token() {
    require_fuse();
    let blob = data((3 * MIB) as usize, 7);
    let server = BlobServer::start_with_token_auth(blob.clone());
    let place = Place::new();
    let d = Dedupd::start(&place, &["--no-prefetch", "--read-deadline-secs", "5"]);
    let spec = spec_for(&blob, MIB, &server.addr, "layers/auth");
    let reg = d.client.register(&spec).unwrap();
    let file = std::fs::File::open(&reg.path).unwrap();
    assert!(read_at(&file, 10, 4096).unwrap() == blob[10..4106]);
    // The token the daemon holds stops working: it must get a new one on the 401, not fail the read.
    server.expire_token();
    let o = (MIB + 10) as usize;
    assert!(read_at(&file, o as u64, 4096).unwrap() == blob[o..o + 4096]);
    let token_requests = server
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.path == "/token")
        .count();
    assert_eq!(token_requests, 2, "one token per generation");
    assert_eq!(d.metric("dedupd_fetch_errors_total"), 0.0);
}
