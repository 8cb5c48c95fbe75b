//! The client against a real docker-registry (Debian's `docker-registry`, distribution 2.8) on loopback.

mod common;

use std::io::Read;

use common::{anonymous_client, client_with, data, docker_config, registry_codes, Registry, RegistryExt};
use registry::{sha256_digest, BlobPush, Client, Error, ErrorKind, Repository, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST};
use serde_json::json;

const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

struct Pushed {
    digest: String,
    size: u64,
    bytes: Vec<u8>,
}

fn push(client: &Client, repo: &Repository, bytes: Vec<u8>) -> Pushed {
    let digest = sha256_digest(&bytes);
    let size = bytes.len() as u64;
    assert_eq!(
        client.push_blob(repo, &digest, size, &bytes[..]).unwrap(),
        BlobPush::Uploaded
    );
    Pushed { digest, size, bytes }
}

fn descriptor(media_type: &str, p: &Pushed) -> serde_json::Value {
    json!({ "mediaType": media_type, "digest": p.digest, "size": p.size })
}

/// Pushes two layers and a config for `arch`; returns the OCI manifest bytes (not pushed).
fn image(client: &Client, repo: &Repository, arch: &str, seed: u64) -> (Vec<u8>, Vec<Pushed>) {
    let layers = vec![
        push(client, repo, data(300_000, seed)),
        push(client, repo, data(1000, seed + 1)),
    ];
    let config = serde_json::to_vec(&json!({
        "architecture": arch, "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [sha256_digest(b"a"), sha256_digest(b"b")] },
    }))
    .unwrap();
    let config = push(client, repo, config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": layers.iter().map(|l| descriptor(LAYER, l)).collect::<Vec<_>>(),
    }))
    .unwrap();
    let mut blobs = layers;
    blobs.push(config);
    (manifest, blobs)
}

fn read_all(mut r: impl Read) -> Result<Vec<u8>, Error> {
    let mut v = Vec::new();
    r.read_to_end(&mut v)?;
    Ok(v)
}

#[test]
fn push_and_pull_an_image() {
    let reg = Registry::start();
    let (client, _cfg) = anonymous_client();
    let repo = reg.repo("family-flat");
    let (manifest, blobs) = image(&client, &repo, "amd64", 1);

    // Pushing again reads nothing.
    let b = &blobs[0];
    let mut untouched: &[u8] = &[];
    assert_eq!(
        client.push_blob(&repo, &b.digest, b.size, &mut untouched).unwrap(),
        BlobPush::Existed
    );

    let tagged = reg.reference("family-flat:v3");
    let digest = client.put_manifest(&tagged, OCI_MANIFEST, &manifest).unwrap();
    assert_eq!(digest, sha256_digest(&manifest));

    let by_tag = client.get_manifest(&tagged).unwrap();
    assert_eq!(
        (by_tag.bytes.as_slice(), by_tag.media_type.as_str()),
        (manifest.as_slice(), OCI_MANIFEST)
    );
    assert_eq!(by_tag.digest, digest);
    let by_digest = client.get_manifest(&tagged.with_digest(&digest).unwrap()).unwrap();
    assert_eq!((by_digest.bytes, by_digest.digest), (manifest.clone(), digest.clone()));
    let by_digest_only = client.get_manifest(&repo.digest(&digest).unwrap()).unwrap();
    assert_eq!(by_digest_only.media_type, OCI_MANIFEST);

    for b in &blobs {
        let blob = client.get_blob(&repo, &b.digest).unwrap();
        assert_eq!(blob.size(), Some(b.size));
        assert_eq!(read_all(blob).unwrap(), b.bytes);
        assert_eq!(client.blob_exists(&repo, &b.digest).unwrap(), Some(b.size));
    }
}

#[test]
fn missing_things_are_not_found() {
    let reg = Registry::start();
    let (client, _cfg) = anonymous_client();
    let repo = reg.repo("empty");
    let absent = sha256_digest(b"never pushed");
    assert_eq!(client.blob_exists(&repo, &absent).unwrap(), None);

    let e = client.get_blob(&repo, &absent).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("GET http://{}/v2/empty/blobs/{absent}: HTTP 404", reg.addr)),
        "{e}"
    );
    assert_eq!(registry_codes(&e), ["BLOB_UNKNOWN"], "{e}");

    let e = client.get_manifest(&reg.reference("empty:nope")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let Error::Status {
        status: 404, errors, ..
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(errors[0].code, "MANIFEST_UNKNOWN");

    // A manifest whose layer is not in the repository is refused with the registry's reason.
    let (manifest, _) = image(&client, &repo, "amd64", 5);
    let other = reg.repo("other");
    let e = client
        .put_manifest(&other.tag("x").unwrap(), OCI_MANIFEST, &manifest)
        .unwrap_err();
    assert_eq!((e.kind(), e.status()), (ErrorKind::Http, Some(400)), "{e}");
    // One entry per missing blob (the config and each layer).
    let codes = registry_codes(&e);
    assert!(
        !codes.is_empty() && codes.iter().all(|c| c == "MANIFEST_BLOB_UNKNOWN"),
        "{e}"
    );
}

#[test]
fn blob_ranges() {
    let reg = Registry::start();
    let (client, _cfg) = anonymous_client();
    let repo = reg.repo("ranges");
    let b = push(&client, &repo, data(100_000, 7));
    let range = |offset: u64, len: u64| client.get_blob_range(&repo, &b.digest, offset, len).unwrap();
    let slice = |from: usize, to: usize| b.bytes[from..to].to_vec();

    assert_eq!(range(0, 4096), slice(0, 4096));
    assert_eq!(range(12_345, 50_000), slice(12_345, 62_345));
    assert_eq!(range(99_000, 1000), slice(99_000, 100_000));
    assert_eq!(range(0, 100_000), b.bytes);
    // Past the end: short, then empty, like pread.
    assert_eq!(range(99_990, 1000), slice(99_990, 100_000));
    assert_eq!(range(100_000, 10), Vec::<u8>::new());
    assert_eq!(range(500_000, 10), Vec::<u8>::new());
    assert_eq!(range(5, 0), Vec::<u8>::new());

    let e = client
        .get_blob_range(&repo, &sha256_digest(b"nope"), 0, 10)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[test]
fn corrupted_blob_is_a_digest_mismatch() {
    let reg = Registry::start();
    let (client, _cfg) = anonymous_client();
    let repo = reg.repo("corrupt");
    let b = push(&client, &repo, data(50_000, 9));

    // Flip one byte of the registry's stored copy: same size, so only the digest can tell.
    let path = reg.blob_data_path(&b.digest);
    let mut stored = std::fs::read(&path).unwrap();
    assert_eq!(stored, b.bytes);
    stored[25_000] ^= 0xff;
    std::fs::write(&path, &stored).unwrap();

    let blob = client.get_blob(&repo, &b.digest).unwrap();
    let e = read_all(blob).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DigestMismatch, "{e}");
    let Error::DigestMismatch { expected, actual, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!((expected, actual), (&b.digest, &sha256_digest(&stored)));

    // Ranges cannot be verified: they return what is stored.
    assert_eq!(
        client.get_blob_range(&repo, &b.digest, 24_999, 3).unwrap(),
        stored[24_999..25_002]
    );
}

#[test]
fn pushing_wrong_data_fails_locally_checked() {
    let reg = Registry::start();
    let (client, _cfg) = anonymous_client();
    let repo = reg.repo("bad-push");
    let bytes = data(10_000, 3);
    let digest = sha256_digest(&bytes);

    let mut other = bytes.clone();
    other[0] ^= 1;
    let e = client.push_blob(&repo, &digest, 10_000, &other[..]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DigestMismatch, "{e}");

    let e = client.push_blob(&repo, &digest, 10_000, &bytes[..9_000]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.to_string().contains("ended after 9000 of 10000 bytes"), "{e}");

    assert_eq!(client.blob_exists(&repo, &digest).unwrap(), None);
    // A longer reader is cut at `size`.
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"trailing");
    assert_eq!(
        client.push_blob(&repo, &digest, 10_000, &longer[..]).unwrap(),
        BlobPush::Uploaded
    );
    assert_eq!(read_all(client.get_blob(&repo, &digest).unwrap()).unwrap(), bytes);

    let empty = sha256_digest(b"");
    assert_eq!(
        client.push_blob(&repo, &empty, 0, &b""[..]).unwrap(),
        BlobPush::Uploaded
    );
    assert_eq!(client.blob_exists(&repo, &empty).unwrap(), Some(0));
}

#[test]
fn cross_repo_mount() {
    let reg = Registry::start();
    let (client, _cfg) = anonymous_client();
    let (src, dst) = (reg.repo("src/app"), reg.repo("dst/app"));
    let b = push(&client, &src, data(20_000, 11));

    assert!(client.mount_blob(&dst, &src, &b.digest).unwrap());
    assert_eq!(client.blob_exists(&dst, &b.digest).unwrap(), Some(b.size));
    assert_eq!(read_all(client.get_blob(&dst, &b.digest).unwrap()).unwrap(), b.bytes);

    // The source lacks this one: the registry opens an upload (202) instead of mounting.
    let lonely = data(5_000, 12);
    let lonely_digest = sha256_digest(&lonely);
    assert!(!client.mount_blob(&dst, &src, &lonely_digest).unwrap());
    assert_eq!(client.blob_exists(&dst, &lonely_digest).unwrap(), None);

    let third = reg.repo("third");
    let r = client
        .mount_or_push_blob(&third, &src, &lonely_digest, 5_000, &lonely[..])
        .unwrap();
    assert_eq!(r, BlobPush::Uploaded);
    assert_eq!(
        read_all(client.get_blob(&third, &lonely_digest).unwrap()).unwrap(),
        lonely
    );
    let r = client
        .mount_or_push_blob(&third, &src, &b.digest, b.size, &b""[..])
        .unwrap();
    assert_eq!(r, BlobPush::Mounted);
    let r = client
        .mount_or_push_blob(&third, &src, &b.digest, b.size, &b""[..])
        .unwrap();
    assert_eq!(r, BlobPush::Existed);

    let elsewhere = Repository::parse("other.example/src/app").unwrap();
    let e = client.mount_blob(&dst, &elsewhere, &b.digest).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}

#[test]
fn index_resolves_to_host_platform() {
    let reg = Registry::start();
    let (client, _cfg) = anonymous_client();
    let repo = reg.repo("multi");
    let host = registry::host_arch();
    let other = if host == "amd64" { "arm64" } else { "amd64" };
    let mut entries = Vec::new();
    let mut digests = Vec::new();
    for (seed, arch) in [(20, other), (30, host)] {
        let (manifest, _) = image(&client, &repo, arch, seed);
        let digest = client.put_manifest(
            &repo.digest(&sha256_digest(&manifest)).unwrap(),
            OCI_MANIFEST,
            &manifest,
        );
        let digest = digest.unwrap();
        entries.push(json!({
            "mediaType": OCI_MANIFEST, "digest": digest, "size": manifest.len(),
            "platform": { "os": "linux", "architecture": arch },
        }));
        digests.push(digest);
    }
    let index =
        serde_json::to_vec(&json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries })).unwrap();
    let tagged = repo.tag("latest").unwrap();
    client.put_manifest(&tagged, OCI_INDEX, &index).unwrap();

    let got = client.get_manifest(&reg.reference("multi")).unwrap();
    assert_eq!((got.media_type.as_str(), &got.bytes), (OCI_INDEX, &index));
    assert!(registry::is_index(&got.media_type));
    let entry = registry::resolve_platform(&got.bytes, "linux", host).unwrap().unwrap();
    assert_eq!(entry.digest, digests[1]);
    assert_eq!(entry.platform.unwrap().architecture, host);
    let manifest = client
        .get_manifest(&tagged.with_digest(&entry.digest).unwrap())
        .unwrap();
    assert_eq!(manifest.media_type, OCI_MANIFEST);
    let config: serde_json::Value = serde_json::from_slice(&manifest.bytes).unwrap();
    let config_digest = config["config"]["digest"].as_str().unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&read_all(client.get_blob(&repo, config_digest).unwrap()).unwrap()).unwrap();
    assert_eq!(config["architecture"], host);
}

#[test]
fn htpasswd_basic_auth_from_docker_config() {
    let reg = Registry::start_htpasswd("alice", "s3cret");
    let repo = reg.repo("private");

    let (anonymous, _cfg) = anonymous_client();
    let e = anonymous.blob_exists(&repo, &sha256_digest(b"x")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    let e = anonymous
        .push_blob(&repo, &sha256_digest(b"x"), 1, &b"x"[..])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");

    let dir = tempfile::tempdir().unwrap();
    let wrong = docker_config(dir.path(), &format!("http://{}", reg.addr), "alice", "guess");
    let (client_wrong, _) = client_with(Some(&wrong), 0);
    let e = client_wrong.get_manifest(&reg.reference("private:v1")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert_eq!(registry_codes(&e), ["UNAUTHORIZED"], "{e}");

    let good = docker_config(dir.path(), &reg.addr, "alice", "s3cret");
    let (client, _) = client_with(Some(&good), 0);
    let (manifest, blobs) = image(&client, &repo, "amd64", 40);
    let tagged = repo.tag("v1").unwrap();
    let digest = client.put_manifest(&tagged, OCI_MANIFEST, &manifest).unwrap();
    let got = client.get_manifest(&tagged).unwrap();
    assert_eq!((got.bytes, got.digest), (manifest, digest));
    assert_eq!(
        read_all(client.get_blob(&repo, &blobs[0].digest).unwrap()).unwrap(),
        blobs[0].bytes
    );
    assert_eq!(
        client.get_blob_range(&repo, &blobs[0].digest, 10, 5).unwrap(),
        blobs[0].bytes[10..15]
    );
    assert!(client.mount_blob(&reg.repo("copy"), &repo, &blobs[0].digest).unwrap());
}
