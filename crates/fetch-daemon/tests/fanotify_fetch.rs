//! End-to-end tests of dedupd's fanotify data path: the real binary, real pre-content events on its cache
//! files, a real docker-registry or a scripted blob server on loopback. The test process reads the cache files
//! as the kernel's EROFS mounts would; it is not dedupd, so its reads raise events. Root and a kernel with
//! fanotify pre-content events (6.14+) are required: without them these fail, they do not skip.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use test_support::prometheus::Exposition;

fn fanotify(place: &Place, extra: &[&str]) -> Dedupd {
    let mut args = vec!["--data-path", "fanotify"];
    args.extend_from_slice(extra);
    Dedupd::start(place, &args)
}

fn eio(r: &std::io::Result<Vec<u8>>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EIO))
}

fn labelled(d: &Dedupd, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    Exposition::parse(&d.metrics()).unwrap().get(name, labels)
}

/// The marks the fanotify group holds, as the holder's `/proc/PID/fdinfo/3` lists them: inode numbers.
fn marked_inodes(root: &Path) -> Vec<u64> {
    let socket = root.join("fanotify-group.sock");
    let holder = holder_pid(&socket).expect("no fanotify group holder runs");
    let info = std::fs::read_to_string(format!("/proc/{holder}/fdinfo/3")).unwrap();
    info.lines()
        .filter_map(|l| l.strip_prefix("fanotify ino:"))
        .map(|rest| u64::from_str_radix(rest.split_whitespace().next().unwrap(), 16).unwrap())
        .collect()
}

fn holder_pid(socket: &Path) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.len() >= 3 && args[1] == b"--fanotify-group-holder" && args[2] == socket.as_os_str().as_encoded_bytes()
        {
            return Some(pid);
        }
    }
    None
}

fn ino(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
}

#[test]
fn serves_a_registry_blob_with_no_fuse_and_unmarks_it_once_verified() {
    let registry = Registry::start();
    let blob = data((5 * MIB + 12_345) as usize, 7);
    let digest = registry.push("layers/fan", &blob);
    let place = Place::new();
    let d = fanotify(&place, &["--no-prefetch"]);
    let ping = d.client.ping().unwrap();
    assert_eq!(ping.data_path, "fanotify");
    assert_eq!(labelled(&d, "dedupd_data_path", &[("path", "fanotify")]), Some(1.0));

    let spec = spec_for(&blob, MIB, &registry.addr, "layers/fan");
    let reg = d.client.register(&spec).unwrap();
    // The mount reads the cache file itself; the mountpoint links to it under the blob's name.
    let path = PathBuf::from(&reg.path);
    assert_eq!(path, place.root().join(format!("blobs/{}.data", &digest[7..])));
    assert_eq!(
        std::fs::read_link(place.mountpoint().join(format!("sha256-{}", &digest[7..]))).unwrap(),
        path
    );
    assert_eq!(marked_inodes(&place.root()), [ino(&path)]);

    let file = std::fs::File::open(&path).unwrap();
    assert_eq!(file.metadata().unwrap().len(), blob.len() as u64);
    d.client.trace_start().unwrap();
    for (offset, len) in [(MIB + 100, 200_000usize), (3 * MIB - 10, 20), (5 * MIB, 12_345)] {
        let got = read_at(&file, offset, len).unwrap();
        assert!(
            got == blob[offset as usize..offset as usize + len],
            "bytes at {offset}+{len} differ"
        );
    }
    let trace = d.client.trace_stop().unwrap();
    assert!(
        trace
            .iter()
            .any(|a| a.offset <= MIB + 100 && a.offset + a.len > MIB + 100),
        "the trace misses the read: {trace:?}"
    );
    // Only the chunks read are here: 1, 2 (the first read crosses into it), 3 and 5.
    let status = d.client.status(&digest).unwrap();
    assert_eq!(status.present, 4, "{status:?}");
    assert!(labelled(&d, "dedupd_fanotify_events_total", &[]).unwrap() >= 3.0);

    // The rest, read whole: complete, verified, and the mark goes.
    assert!(read_all(&path) == blob, "the whole file differs from the blob");
    let status = d.client.wait(&digest, Duration::from_secs(60)).unwrap();
    assert!(status.complete && status.verified, "{status:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marked_inodes(&place.root()).is_empty() {
        assert!(Instant::now() < deadline, "the verified blob is still marked");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Reads of it no longer reach the daemon at all.
    let events = labelled(&d, "dedupd_fanotify_events_total", &[]).unwrap();
    drop_page_cache(&file);
    assert!(read_at(&file, 2 * MIB, 8192).unwrap() == blob[2 * MIB as usize..2 * MIB as usize + 8192]);
    assert_eq!(labelled(&d, "dedupd_fanotify_events_total", &[]).unwrap(), events);

    drop(file);
    d.client.unregister(&digest).unwrap();
    assert!(!path.exists());
    assert!(!place.mountpoint().join(format!("sha256-{}", &digest[7..])).exists());
}

#[test]
fn corrupt_ranges_are_never_written_and_an_outage_blocks_only_missing_data() {
    let blob = data((4 * MIB + 300 * 1024) as usize, 8);
    let server = BlobServer::start(blob.clone());
    let place = Place::new();
    let d = fanotify(&place, &["--no-prefetch", "--read-deadline-secs", "3"]);
    let spec = spec_for(&blob, MIB, &server.addr, "layers/corrupt");
    let reg = d.client.register(&spec).unwrap();
    let file = std::fs::File::open(&reg.path).unwrap();
    assert!(read_at(&file, 10, 100).unwrap() == blob[10..110]);

    server.set_mode(Mode::Corrupt);
    let began = Instant::now();
    let r = read_at(&file, MIB + 10, 4096);
    let took = began.elapsed();
    assert!(eio(&r), "a read of a corrupted chunk must fail with EIO: {r:?}");
    assert!(
        took >= Duration::from_millis(2900),
        "EIO after {took:?}, before the 3 s deadline"
    );
    assert!(d.metric("dedupd_verify_failures_total") >= 1.0);
    // Nothing of the bad chunk reached the cache file: it is still a hole there (reading it would raise an
    // event; SEEK_DATA does not).
    let raw = std::fs::File::open(place.root().join(format!("blobs/{}.data", &spec.digest[7..]))).unwrap();
    let next_data = rustix::fs::seek(&raw, rustix::fs::SeekFrom::Data(MIB));
    assert!(
        matches!(next_data, Err(rustix::io::Errno::NXIO)) || matches!(next_data, Ok(o) if o >= 2 * MIB),
        "bytes of a chunk that failed verification were written: data at {next_data:?}"
    );
    assert_eq!(d.client.status(&spec.digest).unwrap().present, 1);

    // An outage: missing data waits for the deadline; local data does not wait at all.
    server.set_mode(Mode::Unavailable);
    let local = Instant::now();
    assert!(read_at(&file, 200, 4096).unwrap() == blob[200..4296]);
    assert!(
        local.elapsed() < Duration::from_secs(1),
        "a local read waited {:?}",
        local.elapsed()
    );
    let began = Instant::now();
    let r = read_at(&file, 2 * MIB, 4096);
    assert!(eio(&r), "{r:?}");
    assert!(began.elapsed() >= Duration::from_millis(2900));

    server.set_mode(Mode::Good);
    assert!(read_at(&file, MIB + 10, 4096).unwrap() == blob[MIB as usize + 10..MIB as usize + 4106]);
    assert!(read_at(&file, 2 * MIB, 4096).unwrap() == blob[2 * MIB as usize..2 * MIB as usize + 4096]);
}

/// A reader waiting for a fetch when dedupd is killed, and one that starts while no dedupd runs, both get their
/// exact bytes from the next instance: the group (and its marks and queued events) stays with the holder, and
/// the event the killed instance was working on is answered from its journal.
#[test]
fn kill9_mid_read_and_restart_answers_every_waiting_reader() {
    let blob = data((4 * MIB) as usize, 9);
    let server = BlobServer::start(blob.clone());
    let place = Place::new();
    let mut d = fanotify(&place, &["--no-prefetch", "--read-deadline-secs", "60"]);
    let instance = d.client.ping().unwrap().instance;
    let spec = spec_for(&blob, MIB, &server.addr, "layers/restart");
    let reg = d.client.register(&spec).unwrap();
    let path = PathBuf::from(&reg.path);
    assert!(read_at(&std::fs::File::open(&path).unwrap(), 0, 10).unwrap() == blob[..10]);

    server.set_mode(Mode::Unavailable);
    let reader = |offset: u64| {
        let path = path.clone();
        std::thread::spawn(move || {
            let began = Instant::now();
            let r = read_at(&std::fs::File::open(&path).unwrap(), offset, 8192);
            (r, began.elapsed())
        })
    };
    let first = reader(MIB + 5);
    // Until the daemon has taken the event and journaled it (it retries the unavailable registry meanwhile).
    let journal = place.root().join("fanotify.inflight");
    let deadline = Instant::now() + Duration::from_secs(10);
    // A live slot starts with the magic; an answered one has it zeroed.
    let live = |j: &[u8]| j.chunks(64).any(|slot| slot[..4] == 0x444a_4631u32.to_le_bytes());
    while !std::fs::read(&journal).is_ok_and(|j| live(&j)) {
        assert!(Instant::now() < deadline, "the read was never journaled");
        std::thread::sleep(Duration::from_millis(20));
    }
    d.kill9();
    let second = reader(3 * MIB);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !first.is_finished() && !second.is_finished(),
        "a read ended with no daemon to answer it"
    );

    server.set_mode(Mode::Good);
    let d = fanotify(&place, &["--no-prefetch", "--read-deadline-secs", "60"]);
    assert_eq!(
        d.client.ping().unwrap().instance,
        instance,
        "the group did not carry over"
    );
    for (h, offset) in [(first, MIB + 5), (second, 3 * MIB)] {
        let (r, took) = h.join().unwrap();
        let got = r.unwrap_or_else(|e| panic!("the read at {offset} failed after {took:?}: {e}"));
        assert!(
            got == blob[offset as usize..offset as usize + 8192],
            "wrong bytes at {offset}"
        );
    }
    assert!(
        d.log_text().contains("answering a read the previous instance took"),
        "{}",
        d.log_text()
    );
}

/// Cache files corrupted or truncated while no daemon ran are checked again at start, chunk by chunk: what is
/// wrong is fetched again and readers only ever see the blobs' bytes.
#[test]
fn verified_caches_corrupted_or_truncated_between_runs_are_checked_again_at_start() {
    let corrupt = data((3 * MIB) as usize, 10);
    let truncated = data((3 * MIB + 77) as usize, 11);
    let registry = Registry::start();
    registry.push("layers/recheck", &corrupt);
    registry.push("layers/recheck", &truncated);
    let place = Place::new();
    let mut d = fanotify(&place, &[]);
    let specs = [
        spec_for(&corrupt, MIB, &registry.addr, "layers/recheck"),
        spec_for(&truncated, MIB, &registry.addr, "layers/recheck"),
    ];
    for spec in &specs {
        d.client.register(spec).unwrap();
        let status = d.client.wait(&spec.digest, Duration::from_secs(60)).unwrap();
        assert!(status.verified, "{status:?}");
    }
    let data_file = |spec: &fetch_api::BlobSpec| place.root().join(format!("blobs/{}.data", &spec.digest[7..]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marked_inodes(&place.root()).is_empty() {
        assert!(Instant::now() < deadline, "the verified blobs are still marked");
        std::thread::sleep(Duration::from_millis(50));
    }
    d.terminate();
    // Unmarked: these writes raise no event.
    let open = |p: PathBuf| std::fs::File::options().write(true).open(p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&open(data_file(&specs[0])), b"XXXX", MIB + 7).unwrap();
    open(data_file(&specs[1])).set_len(MIB + 5).unwrap();

    let d = fanotify(&place, &[]);
    for (spec, blob) in specs.iter().zip([&corrupt, &truncated]) {
        let status = d.client.wait(&spec.digest, Duration::from_secs(60)).unwrap();
        assert!(status.complete && status.verified, "{status:?}");
        let file = std::fs::File::open(data_file(spec)).unwrap();
        assert_eq!(file.metadata().unwrap().len(), blob.len() as u64);
        drop_page_cache(&file);
        assert!(
            read_all(&data_file(spec)) == *blob,
            "{} differs after the restart",
            spec.digest
        );
    }
    assert!(d.metric("dedupd_verify_failures_total") >= 2.0, "{}", d.metrics());
}

/// A blob whose chunks are stored as independent zstd frames: dedupd fetches each frame's range, decodes it
/// into the cache file, verifies the chunk, and the whole file against the uncompressed digest. A frame that
/// decodes to anything else is refused like a corrupt chunk.
#[test]
fn compressed_chunks_are_fetched_as_frames_and_served_uncompressed() {
    // Compressible, so frames are really smaller than their chunks.
    let plain: Vec<u8> = (0..(3 * MIB + 5000) as usize)
        .map(|i| ((i / 512) % 251) as u8 ^ (i % 7) as u8)
        .collect();
    let frames: Vec<Vec<u8>> = plain
        .chunks(MIB as usize)
        .map(|c| zstd::bulk::compress(c, 3).unwrap())
        .collect();
    let wire: Vec<u8> = frames.concat();
    assert!(wire.len() < plain.len() / 2);
    let server = BlobServer::start(wire.clone());
    let place = Place::new();
    let d = fanotify(&place, &["--no-prefetch", "--read-deadline-secs", "3"]);
    let mut spec = spec_for(&plain, MIB, &server.addr, "layers/zstd");
    spec.digest = digest_of(&wire);
    spec.compressed = Some(fetch_api::ChunkCompression {
        algorithm: fetch_api::CompressionAlgorithm::Zstd,
        sizes: frames.iter().map(|f| f.len() as u32).collect(),
        uncompressed_digest: digest_of(&plain),
        index: None,
    });
    let reg = d.client.register(&spec).unwrap();
    let file = std::fs::File::open(&reg.path).unwrap();
    assert_eq!(file.metadata().unwrap().len(), plain.len() as u64);
    let fetched = d.metric("dedupd_fetched_bytes_total");
    assert!(read_at(&file, 2 * MIB + 3, 100).unwrap() == plain[2 * MIB as usize + 3..2 * MIB as usize + 103]);
    // Exactly the third frame went over the wire.
    assert_eq!(d.metric("dedupd_fetched_bytes_total") - fetched, frames[2].len() as f64);
    let seen = server.seen.lock().unwrap().clone();
    let start = (frames[0].len() + frames[1].len()) as u64;
    assert!(
        seen.iter()
            .any(|s| s.range == Some((start, start + frames[2].len() as u64 - 1))),
        "no request for the third frame: {seen:?}"
    );

    server.set_mode(Mode::Corrupt);
    assert!(eio(&read_at(&file, 10, 100)), "a corrupt frame was served");
    server.set_mode(Mode::Good);
    assert!(read_all(Path::new(&reg.path)) == plain);
    let status = d.client.wait(&spec.digest, Duration::from_secs(30)).unwrap();
    assert!(status.complete && status.verified, "{status:?}");
}

/// A tar-index blob (an unmodified gzip layer served uncompressed): reads are answered with chunks inflated from
/// their checkpoints and verified. The registry serves a gzip stream that differs from the indexed one only in its
/// header's MTIME: every chunk decodes and matches, the whole tar matches its diffID, but the compressed layer does
/// not match its digest once the background fetch has hashed it all, so the blob is not served any more (EIO),
/// never counts as verified, and the mismatch is counted.
#[test]
fn a_tar_index_layer_whose_compressed_bytes_do_not_match_its_digest_stops_being_served() {
    use base64::Engine as _;
    use std::io::Write as _;
    let plain: Vec<u8> = (0..(3 * MIB + 5000) as usize)
        .map(|i| ((i / 512) % 251) as u8 ^ (i % 7) as u8)
        .collect();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gz.write_all(&plain).unwrap();
    let indexed = gz.finish().unwrap();
    let opts = tar_index::IndexOptions {
        chunk_size: MIB,
        max_uncompressed: 1 << 30,
    };
    let mut ix = tar_index::Indexer::new(tar_index::Format::Gzip, &indexed[..], opts).unwrap();
    std::io::copy(&mut ix, &mut std::io::sink()).unwrap();
    let ix = ix.finish().unwrap();
    // Bytes 4..8 of a gzip header are its MTIME: no decoder output depends on them.
    let mut served = indexed.clone();
    served[4] ^= 0x5a;
    let server = BlobServer::start(served);
    let place = Place::new();
    let d = fanotify(&place, &["--read-deadline-secs", "3", "--prefetch-idle-ms", "10"]);
    let mut spec = spec_for(&plain, MIB, &server.addr, "layers/indexed");
    spec.digest = digest_of(&indexed);
    spec.compressed = Some(fetch_api::ChunkCompression {
        algorithm: fetch_api::CompressionAlgorithm::TarIndex,
        sizes: vec![],
        uncompressed_digest: digest_of(&plain),
        index: Some(base64::engine::general_purpose::STANDARD.encode(ix.to_bytes())),
    });
    let reg = d.client.register(&spec).unwrap();
    let file = std::fs::File::open(&reg.path).unwrap();
    // Chunk 2, inflated from its checkpoint: the bytes of the tar.
    assert!(read_at(&file, 2 * MIB + 3, 100).unwrap() == plain[2 * MIB as usize + 3..2 * MIB as usize + 103]);
    let t = Instant::now();
    loop {
        let s = d.client.status(&spec.digest).unwrap();
        assert!(
            !s.verified,
            "a layer that does not match its digest was verified: {s:?}"
        );
        if s.errors > 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no mismatch found: {s:?}\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.metric("dedupd_verify_failures_total") >= 1.0);
    assert!(
        d.log_text().contains("the compressed layer does not match its digest"),
        "{}",
        d.log_text()
    );
    drop_page_cache(&file);
    assert!(
        eio(&read_at(&file, 10, 100)),
        "a layer that does not match its digest was still served"
    );
    assert!(!d.client.status(&spec.digest).unwrap().verified);
}
