//! The proxy binary in front of a real docker-registry on loopback: forwarding (with the workspace's
//! registry client and with skopeo), and the faults it injects.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{client, data, raw_request, which, Proxy, Registry};
use registry::{sha256_digest, BlobPush, Client, Repository, OCI_CONFIG, OCI_MANIFEST};
use serde_json::json;

const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

struct Pushed {
    digest: String,
    bytes: Vec<u8>,
}

fn push(client: &Client, repo: &Repository, bytes: Vec<u8>) -> Pushed {
    let digest = sha256_digest(&bytes);
    assert_eq!(
        client.push_blob(repo, &digest, bytes.len() as u64, &bytes[..]).unwrap(),
        BlobPush::Uploaded
    );
    Pushed { digest, bytes }
}

/// Pushes a layer of `layer_size` bytes, a config and a manifest tagged `tag`; returns the manifest
/// bytes and the blobs (layer first).
fn push_image(client: &Client, proxy: &Proxy, name: &str, tag: &str, layer_size: usize) -> (Vec<u8>, Vec<Pushed>) {
    let repo = proxy.repo(name);
    // Starts like gzip, so skopeo copies it as it is instead of compressing it.
    let mut layer = vec![0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0xff];
    layer.extend(data(layer_size - layer.len(), layer_size as u64));
    let layer = push(client, &repo, layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [sha256_digest(b"a")] },
    }))
    .unwrap();
    let config = push(client, &repo, config);
    let desc = |m: &str, p: &Pushed| json!({ "mediaType": m, "digest": p.digest, "size": p.bytes.len() });
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(OCI_CONFIG, &config),
        "layers": [desc(LAYER, &layer)],
    }))
    .unwrap();
    let digest = client
        .put_manifest(&proxy.reference(&format!("{name}:{tag}")), OCI_MANIFEST, &manifest)
        .unwrap();
    assert_eq!(digest, sha256_digest(&manifest));
    (manifest, vec![layer, config])
}

fn read_all(mut r: impl Read) -> Result<Vec<u8>, registry::Error> {
    let mut v = Vec::new();
    r.read_to_end(&mut v)?;
    Ok(v)
}

fn stat(proxy: &Proxy, key: &str) -> u64 {
    proxy.stats()[key].as_u64().unwrap()
}

#[test]
fn push_and_pull_through_the_proxy() {
    let reg = Registry::start();
    let proxy = Proxy::start(&reg.addr, &[]);
    let (client, _cfg) = client(0);
    let (manifest, blobs) = push_image(&client, &proxy, "lib/app", "v1", 1 << 20);
    // The uploads went through the proxy (their PATCH/PUT follow the rewritten Location).
    assert!(stat(&proxy, "requests") >= 7, "{}", proxy.stats());

    // The registry itself has it all.
    let direct = Repository::parse(&format!("{}/lib/app", reg.addr)).unwrap();
    for b in &blobs {
        assert_eq!(read_all(client.get_blob(&direct, &b.digest).unwrap()).unwrap(), b.bytes);
    }

    // Pulled back through the proxy, on kept-alive connections, with HEADs between GETs.
    proxy.reset_stats();
    let got = client.get_manifest(&proxy.reference("lib/app:v1")).unwrap();
    assert_eq!(got.bytes, manifest);
    let repo = proxy.repo("lib/app");
    for b in &blobs {
        assert_eq!(
            client.blob_exists(&repo, &b.digest).unwrap(),
            Some(b.bytes.len() as u64)
        );
        assert_eq!(read_all(client.get_blob(&repo, &b.digest).unwrap()).unwrap(), b.bytes);
    }
    let layer = &blobs[0];
    let range = client.get_blob_range(&repo, &layer.digest, 1000, 5000).unwrap();
    assert_eq!(range, &layer.bytes[1000..6000]);

    let stats = proxy.stats();
    let total: u64 = blobs.iter().map(|b| b.bytes.len() as u64).sum();
    assert_eq!(stats["requests"], 6, "{stats}");
    assert_eq!(stats["range_requests"], 1, "{stats}");
    assert_eq!(stats["blob_bytes"], total + 5000, "{stats}");
    assert_eq!(stats["bytes_out"], total + 5000 + manifest.len() as u64, "{stats}");
    proxy.reset_stats();
    assert_eq!(
        proxy.stats(),
        json!({"requests":0,"range_requests":0,"blob_bytes":0,"bytes_out":0})
    );

    // Location headers name the proxy, not the registry.
    let r = raw_request(&proxy.addr, "POST", "/v2/lib/app/blobs/uploads/", &[], b"");
    assert_eq!(r.status, 202);
    let location = r.header("location").unwrap();
    assert!(
        location.starts_with(&format!("http://{}/v2/lib/app/blobs/uploads/", proxy.addr)),
        "{location}"
    );

    // A chunked upload through the proxy (PATCH with Transfer-Encoding: chunked, then PUT).
    let body = data(70_000, 9);
    let digest = sha256_digest(&body);
    let mut s = TcpStream::connect(&proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let path = location.strip_prefix(&format!("http://{}", proxy.addr)).unwrap();
    let mut req = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        proxy.addr
    )
    .into_bytes();
    for chunk in body.chunks(30_000) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&req).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 202"), "{head}");
    let next = head
        .lines()
        .find_map(|l| l.strip_prefix("Location: "))
        .unwrap()
        .to_string();
    let sep = if next.contains('?') { '&' } else { '?' };
    let r = raw_request(&proxy.addr, "PUT", &format!("{next}{sep}digest={digest}"), &[], b"");
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(read_all(client.get_blob(&direct, &digest).unwrap()).unwrap(), body);
}

#[test]
fn corrupt_flips_range_responses_only() {
    let reg = Registry::start();
    let proxy = Proxy::start(&reg.addr, &[]);
    let (client, _cfg) = client(0);
    let (_, blobs) = push_image(&client, &proxy, "corrupt", "v1", 100_000);
    let layer = &blobs[0];
    let repo = proxy.repo("corrupt");
    let size = layer.bytes.len() as u64;

    assert_eq!(proxy.config("corrupt=1")["corrupt"], true);
    let range = client.get_blob_range(&repo, &layer.digest, 10, 100).unwrap();
    assert_eq!(range.len(), 100);
    assert_ne!(range, &layer.bytes[10..110]);
    assert_eq!(range[0], layer.bytes[10] ^ 0xff);
    assert_eq!(range[1..], layer.bytes[11..110]);
    // The whole blob by Range: its digest no longer matches.
    let whole = client.get_blob_range(&repo, &layer.digest, 0, size).unwrap();
    assert_eq!(whole.len() as u64, size);
    assert_ne!(sha256_digest(&whole), layer.digest);
    // Without Range, intact (and verified by the client).
    assert_eq!(
        read_all(client.get_blob(&repo, &layer.digest).unwrap()).unwrap(),
        layer.bytes
    );

    assert_eq!(proxy.config("corrupt=0")["corrupt"], false);
    let whole = client.get_blob_range(&repo, &layer.digest, 0, size).unwrap();
    assert_eq!(sha256_digest(&whole), layer.digest);
}

#[test]
fn down_fails_requests_and_up_recovers() {
    let reg = Registry::start();
    let proxy = Proxy::start(&reg.addr, &[]);
    let (client, _cfg) = client(0);
    let (manifest, blobs) = push_image(&client, &proxy, "down", "v1", 10_000);
    let repo = proxy.repo("down");

    proxy.reset_stats();
    assert_eq!(proxy.config("down=1")["down"], true);
    // The client's kept-alive connection is closed too, as are new ones.
    assert!(client.get_manifest(&proxy.reference("down:v1")).is_err());
    assert!(client.get_blob(&repo, &blobs[0].digest).is_err());
    assert!(client.blob_exists(&repo, &blobs[1].digest).is_err());
    let mut s = TcpStream::connect(&proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
    // The control endpoints still answer; nothing was forwarded.
    assert_eq!(stat(&proxy, "requests"), 0);

    assert_eq!(proxy.config("down=0")["down"], false);
    assert_eq!(
        client.get_manifest(&proxy.reference("down:v1")).unwrap().bytes,
        manifest
    );
    assert_eq!(
        read_all(client.get_blob(&repo, &blobs[0].digest).unwrap()).unwrap(),
        blobs[0].bytes
    );

    // A delay holds the response, and down during it closes the connection instead.
    proxy.config("delay_ms=300");
    let start = Instant::now();
    assert_eq!(
        client.get_manifest(&proxy.reference("down:v1")).unwrap().bytes,
        manifest
    );
    assert!(start.elapsed() >= Duration::from_millis(300));
    proxy.config("delay_ms=3000");
    let addr = proxy.addr.clone();
    let waiting = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf
    });
    std::thread::sleep(Duration::from_millis(500));
    proxy.config("down=1");
    assert!(waiting.join().unwrap().is_empty());
    proxy.config("down=0&delay_ms=0");
    assert_eq!(
        client.get_manifest(&proxy.reference("down:v1")).unwrap().bytes,
        manifest
    );
}

#[test]
fn rate_limits_blob_downloads() {
    let reg = Registry::start();
    let proxy = Proxy::start(&reg.addr, &["--rate", "2000000"]);
    assert_eq!(proxy.request("GET", "/_proxy/config", &[]).status, 200);
    let (client, _cfg) = client(0);
    let (_, blobs) = push_image(&client, &proxy, "slow", "v1", 4 << 20);
    let layer = &blobs[0];
    let repo = proxy.repo("slow");

    let start = Instant::now();
    assert_eq!(
        read_all(client.get_blob(&repo, &layer.digest).unwrap()).unwrap(),
        layer.bytes
    );
    let limited = start.elapsed();
    // 4 MiB at 2 MB/s is 2.1 s.
    assert!(limited >= Duration::from_millis(1500), "{limited:?}");
    assert!(limited < Duration::from_secs(20), "{limited:?}");

    // Two at once share the rate.
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let (c, _cfg) = common::client(0);
                assert_eq!(
                    read_all(c.get_blob(&repo, &layer.digest).unwrap()).unwrap(),
                    layer.bytes
                );
            });
        }
    });
    assert!(start.elapsed() >= Duration::from_millis(3500), "{:?}", start.elapsed());

    assert_eq!(proxy.config("rate=0")["rate"], 0);
    let start = Instant::now();
    assert_eq!(
        read_all(client.get_blob(&repo, &layer.digest).unwrap()).unwrap(),
        layer.bytes
    );
    assert!(start.elapsed() < Duration::from_millis(1500), "{:?}", start.elapsed());
}

#[test]
fn control_api() {
    let reg = Registry::start();
    let proxy = Proxy::start(&reg.addr, &[]);
    let c = proxy.config("rate=5&delay_ms=0");
    assert_eq!(
        c,
        json!({"rate":5,"down":false,"corrupt":false,"delay_ms":0,"refuse_agent":""})
    );
    assert_eq!(proxy.config("rate=0")["rate"], 0);
    assert_eq!(proxy.request("POST", "/_proxy/config?rate=x", &[]).status, 400);
    assert_eq!(proxy.request("POST", "/_proxy/config?speed=1", &[]).status, 400);
    assert_eq!(proxy.request("GET", "/_proxy/nope", &[]).status, 404);
    assert_eq!(proxy.request("GET", "/_proxy/reset-stats", &[]).status, 405);
    // Control requests are not forwarded nor counted; forwarded ones are.
    assert_eq!(stat(&proxy, "requests"), 0);
    assert_eq!(proxy.request("GET", "/v2/", &[]).status, 200);
    assert_eq!(stat(&proxy, "requests"), 1);

    // refuse_agent: that client's connection is closed without an answer, others are served.
    assert_eq!(proxy.config("refuse_agent=probe")["refuse_agent"], "probe");
    let mut s = TcpStream::connect(&proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nUser-Agent: probe/1.0\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
    assert_eq!(proxy.request("GET", "/v2/", &[("User-Agent", "other/1.0")]).status, 200);
    proxy.config("refuse_agent=");
    assert_eq!(proxy.request("GET", "/v2/", &[("User-Agent", "probe/1.0")]).status, 200);

    // A TLS ClientHello (a client trying HTTPS first) is refused at once.
    let mut s = TcpStream::connect(&proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(buf.starts_with(b"HTTP/1.1 400"));
}

fn skopeo(args: &[&str], home: &std::path::Path) {
    let bin =
        which("skopeo").expect("skopeo is not installed: apt-get install -y skopeo (the registry-proxy tests need it)");
    let out = Command::new(bin)
        .arg("--insecure-policy")
        .args(args)
        .env("HOME", home)
        .env("REGISTRY_AUTH_FILE", home.join("auth.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn skopeo_pulls_and_pushes_through_the_proxy() {
    let reg = Registry::start();
    let proxy = Proxy::start(&reg.addr, &[]);
    let (client, _cfg) = client(0);
    let (manifest, blobs) = push_image(&client, &proxy, "sk/app", "v1", 3 << 20);
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::fs::write(home.join("auth.json"), "{}").unwrap();
    let layout = tmp.path().join("layout");

    proxy.reset_stats();
    skopeo(
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{}/sk/app:v1", proxy.addr),
            &format!("oci:{}:v1", layout.display()),
        ],
        &home,
    );
    for b in &blobs {
        let hex = b.digest.strip_prefix("sha256:").unwrap();
        let got = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap_or_else(|e| {
            let files: Vec<_> = std::fs::read_dir(layout.join("blobs/sha256"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            panic!(
                "{hex}: {e}; layout has {files:?}; index {}",
                std::fs::read_to_string(layout.join("index.json")).unwrap()
            )
        });
        assert_eq!(got, b.bytes);
    }
    let hex = sha256_digest(&manifest);
    let hex = hex.strip_prefix("sha256:").unwrap();
    assert_eq!(std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap(), manifest);
    let stats = proxy.stats();
    assert!(
        stats["blob_bytes"].as_u64().unwrap() >= blobs[0].bytes.len() as u64,
        "{stats}"
    );

    // And back up to another repository (Go's client: POST, PATCH, PUT).
    skopeo(
        &[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:v1", layout.display()),
            &format!("docker://{}/sk/copy:v2", proxy.addr),
        ],
        &home,
    );
    let direct = registry::Reference::parse(&format!("{}/sk/copy:v2", reg.addr)).unwrap();
    assert_eq!(client.get_manifest(&direct).unwrap().bytes, manifest);
    let repo = Repository::parse(&format!("{}/sk/copy", reg.addr)).unwrap();
    for b in &blobs {
        assert_eq!(read_all(client.get_blob(&repo, &b.digest).unwrap()).unwrap(), b.bytes);
    }
}
