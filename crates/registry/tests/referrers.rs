//! OCI 1.1 referrers: the referrers API's answers (pages, filters, refusals) against the scripted server,
//! and the referrers tag schema against a real docker-registry (distribution 2.8, which has no
//! referrers API: the root tier).

mod common;

use std::sync::{Arc, Mutex};

use common::{anonymous_client, FakeServer, Reply, Request};
use registry::{sha256_digest, Descriptor, ErrorKind, Repository, OCI_INDEX, OCI_MANIFEST};
use serde_json::json;

const TARINDEX: &str = "application/vnd.dedup-snapshotter.tarindex.v1";
const SBOM: &str = "application/vnd.example.sbom.v1+json";

fn digest_of(seed: &str) -> String {
    sha256_digest(seed.as_bytes())
}

fn entry(digest: &str, artifact_type: &str) -> serde_json::Value {
    json!({ "mediaType": OCI_MANIFEST, "digest": digest, "size": 100, "artifactType": artifact_type,
            "annotations": { "n": digest } })
}

fn index(entries: &[serde_json::Value]) -> String {
    json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries }).to_string()
}

fn digests(found: &[Descriptor]) -> Vec<&str> {
    found.iter().map(|d| d.digest.as_str()).collect()
}

#[test]
fn api_pages_are_followed_and_filtered_here_when_the_registry_did_not() {
    let subject = digest_of("image");
    let (d1, d2, d3) = (digest_of("1"), digest_of("2"), digest_of("3"));
    let path = format!("/v2/app/referrers/{subject}");
    let server = {
        let (page1, page2) = (
            index(&[entry(&d1, TARINDEX), entry(&d2, SBOM)]),
            // The first again (a registry's page boundary moving): listed once.
            index(&[entry(&d3, TARINDEX), entry(&d1, TARINDEX)]),
        );
        let path = path.clone();
        FakeServer::start(move |req: &Request| {
            assert_eq!(req.path(), path);
            assert_eq!(req.header("accept"), Some(OCI_INDEX));
            let reply = Reply::new(200).header("Content-Type", OCI_INDEX);
            if req.query().contains("last=") {
                reply.body(page2.clone())
            } else {
                // A relative link, keeping the query as a registry does.
                let link = format!("<{path}?{}&n=2&last=2>; rel=\"next\"", req.query());
                reply.header("Link", &link).body(page1.clone())
            }
        })
    };
    let (client, _cfg) = anonymous_client();
    let repo = Repository::parse(&format!("{}/app", server.addr)).unwrap();

    let all = client.referrers(&repo, &subject, None).unwrap();
    assert_eq!(digests(&all), [&d1, &d2, &d3]);
    assert_eq!(all[1].artifact_type.as_deref(), Some(SBOM));
    assert_eq!(all[2].annotations.as_ref().unwrap()["n"], d3);
    assert_eq!(
        server.lines(),
        [format!("GET {path}"), format!("GET {path}?&n=2&last=2")]
    );

    // No OCI-Filters-Applied: the client drops the SBOM itself, on every page.
    let tarindexes = client.referrers(&repo, &subject, Some(TARINDEX)).unwrap();
    assert_eq!(digests(&tarindexes), [&d1, &d3]);
    let query = "artifactType=application%2Fvnd.dedup-snapshotter.tarindex.v1";
    assert_eq!(
        server.lines()[2..],
        [format!("GET {path}?{query}"), format!("GET {path}?{query}&n=2&last=2")]
    );
}

#[test]
fn a_filter_the_registry_applied_is_trusted() {
    let subject = digest_of("image");
    let d1 = digest_of("1");
    let server = {
        let body = index(&[entry(&d1, "application/vnd.registry-says-so")]);
        FakeServer::start(move |_req: &Request| {
            Reply::new(200)
                .header("Content-Type", OCI_INDEX)
                .header("OCI-Filters-Applied", "artifactType")
                .body(body.clone())
        })
    };
    let (client, _cfg) = anonymous_client();
    let repo = Repository::parse(&format!("{}/app", server.addr)).unwrap();
    let found = client.referrers(&repo, &subject, Some(TARINDEX)).unwrap();
    assert_eq!(digests(&found), [&d1]);
}

#[test]
fn an_answer_that_is_not_an_index_is_refused() {
    let subject = digest_of("image");
    let big = index(&vec![entry(&digest_of("x"), TARINDEX); 25_000]);
    assert!(big.len() > 4 << 20);
    let answers: Vec<(&str, String)> = vec![
        (OCI_MANIFEST, index(&[])),
        ("application/json", r#"{"schemaVersion":2,"layers":[]}"#.to_string()),
        (OCI_INDEX, "not json".to_string()),
        (OCI_INDEX, big),
    ];
    for (content_type, body) in answers {
        let server = {
            let (content_type, body) = (content_type.to_string(), body.clone());
            FakeServer::start(move |_req: &Request| {
                Reply::new(200).header("Content-Type", &content_type).body(body.clone())
            })
        };
        let (client, _cfg) = anonymous_client();
        let repo = Repository::parse(&format!("{}/app", server.addr)).unwrap();
        let e = client.referrers(&repo, &subject, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{content_type} {}: {e}", body.len());
        // Not taken for a registry without the API: no fallback to the tag.
        assert_eq!(server.requests().len(), 1);
    }
}

#[test]
fn pages_that_loop_are_refused() {
    let subject = digest_of("image");
    let server = FakeServer::start(|req: &Request| {
        let link = format!("<{}>; rel=\"next\"", req.target);
        Reply::new(200)
            .header("Content-Type", OCI_INDEX)
            .header("Link", &link)
            .body(index(&[]))
    });
    let (client, _cfg) = anonymous_client();
    let repo = Repository::parse(&format!("{}/app", server.addr)).unwrap();
    let e = client.referrers(&repo, &subject, None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn without_the_api_the_referrers_tag_is_read() {
    let subject = digest_of("image");
    let hex = subject.strip_prefix("sha256:").unwrap().to_string();
    let (d1, d2) = (digest_of("1"), digest_of("2"));
    for status in [404, 400, 405] {
        let tag_index = index(&[entry(&d1, TARINDEX), entry(&d2, SBOM)]);
        let tag_exists = Arc::new(Mutex::new(true));
        let server = {
            let (hex, tag_exists) = (hex.clone(), tag_exists.clone());
            FakeServer::start(move |req: &Request| {
                if req.path().contains("/referrers/") {
                    return Reply::new(status).body("404 page not found");
                }
                assert_eq!(req.path(), format!("/v2/app/manifests/sha256-{hex}"));
                if !*tag_exists.lock().unwrap() {
                    return Reply::new(404).body(r#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#);
                }
                Reply::new(200)
                    .header("Content-Type", OCI_INDEX)
                    .body(tag_index.clone())
            })
        };
        let (client, _cfg) = anonymous_client();
        let repo = Repository::parse(&format!("{}/app", server.addr)).unwrap();
        assert_eq!(digests(&client.referrers(&repo, &subject, None).unwrap()), [&d1, &d2]);
        assert_eq!(digests(&client.referrers(&repo, &subject, Some(SBOM)).unwrap()), [&d2]);
        assert!(client.referrers(&repo, &subject, Some("other")).unwrap().is_empty());
        *tag_exists.lock().unwrap() = false;
        assert!(client.referrers(&repo, &subject, None).unwrap().is_empty());
        assert_eq!(server.requests().len(), 8, "{status}");
    }
}

#[test]
fn a_registry_that_indexes_the_subject_gets_no_tag() {
    let image = Descriptor {
        media_type: OCI_MANIFEST.into(),
        digest: digest_of("image"),
        size: 10,
        ..Default::default()
    };
    let manifest = registry::artifact_manifest(TARINDEX, &image, &[], None).unwrap();
    let digest = sha256_digest(&manifest);
    let server = {
        let subject = image.digest.clone();
        FakeServer::start(move |_req: &Request| Reply::new(201).header("OCI-Subject", &subject))
    };
    let (client, _cfg) = anonymous_client();
    let repo = Repository::parse(&format!("{}/app", server.addr)).unwrap();
    assert_eq!(client.push_referrer(&repo, &manifest, OCI_MANIFEST).unwrap(), digest);
    assert_eq!(server.lines(), [format!("PUT /v2/app/manifests/{digest}")]);
    let put = &server.requests()[0];
    assert_eq!((put.header("content-type"), &put.body), (Some(OCI_MANIFEST), &manifest));
}

#[test]
fn without_oci_subject_the_tag_gets_an_entry() {
    let subject = digest_of("image");
    let hex = subject.strip_prefix("sha256:").unwrap().to_string();
    // No artifactType: the entry takes the config's media type; the annotations are copied.
    let config = digest_of("config");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": { "mediaType": "application/vnd.example.config.v1+json", "digest": config, "size": 6 },
        "layers": [],
        "subject": { "mediaType": OCI_MANIFEST, "digest": subject, "size": 10 },
        "annotations": { "org.example.k": "v" },
    }))
    .unwrap();
    let digest = sha256_digest(&manifest);
    let server = FakeServer::start(|req: &Request| match req.method.as_str() {
        "GET" => Reply::new(404),
        _ => Reply::new(201),
    });
    let (client, _cfg) = anonymous_client();
    let repo = Repository::parse(&format!("{}/app", server.addr)).unwrap();
    assert_eq!(client.push_referrer(&repo, &manifest, OCI_MANIFEST).unwrap(), digest);
    let tag = format!("/v2/app/manifests/sha256-{hex}");
    assert_eq!(
        server.lines(),
        [
            format!("PUT /v2/app/manifests/{digest}"),
            format!("GET {tag}"),
            format!("PUT {tag}")
        ]
    );
    let put = &server.requests()[2];
    assert_eq!(put.header("content-type"), Some(OCI_INDEX));
    let index: serde_json::Value = serde_json::from_slice(&put.body).unwrap();
    assert_eq!(
        index,
        json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{
            "mediaType": OCI_MANIFEST, "digest": digest, "size": manifest.len(),
            "artifactType": "application/vnd.example.config.v1+json",
            "annotations": { "org.example.k": "v" },
        }]})
    );
}

#[test]
fn a_referrer_needs_a_subject() {
    let server = FakeServer::start(|_req: &Request| Reply::new(500));
    let (client, _cfg) = anonymous_client();
    let repo = Repository::parse(&format!("{}/app", server.addr)).unwrap();
    let plain = serde_json::to_vec(&json!({ "schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [] })).unwrap();
    for (bytes, media_type) in [
        (plain.clone(), OCI_MANIFEST),
        (plain.clone(), OCI_INDEX),
        (plain, "application/vnd.docker.distribution.manifest.v2+json"),
        (b"nope".to_vec(), OCI_MANIFEST),
    ] {
        let e = client.push_referrer(&repo, &bytes, media_type).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }
    assert!(server.requests().is_empty());
}

/// Against Debian's docker-registry (distribution 2.8.2): it has no referrers API (404, text body),
/// and it takes artifact manifests (`subject`, `artifactType`, the empty config, layers of any media
/// type) and the referrers tag's index (entries with `artifactType` and annotations, no platform).
#[cfg(feature = "root-tests")]
mod distribution {
    use std::collections::BTreeMap;

    use super::*;
    use common::{Registry, RegistryExt};
    use registry::{BlobPush, Client, RawManifest, OCI_CONFIG};

    fn blob(client: &Client, repo: &Repository, media_type: &str, bytes: &[u8]) -> Descriptor {
        let digest = sha256_digest(bytes);
        client.push_blob(repo, &digest, bytes.len() as u64, bytes).unwrap();
        Descriptor {
            media_type: media_type.into(),
            digest,
            size: bytes.len() as u64,
            ..Default::default()
        }
    }

    /// A one-layer image tagged `tag`, as fetched back.
    fn image(client: &Client, repo: &Repository, tag: &str) -> RawManifest {
        let layer = blob(
            client,
            repo,
            "application/vnd.oci.image.layer.v1.tar",
            format!("layer of {tag}").as_bytes(),
        );
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
        }))
        .unwrap();
        let config = blob(client, repo, OCI_CONFIG, &config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer],
        }))
        .unwrap();
        let tagged = repo.tag(tag).unwrap();
        client.put_manifest(&tagged, OCI_MANIFEST, &manifest).unwrap();
        let got = client.get_manifest(&tagged).unwrap();
        assert_eq!(got.bytes, manifest);
        got
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn referrers_through_the_tag_schema() {
        let reg = Registry::start();
        let (client, _cfg) = anonymous_client();
        let repo = reg.repo("app");
        let img = image(&client, &repo, "v1");
        let other = image(&client, &repo, "v2");
        let lonely = image(&client, &repo, "v3");
        assert!(client.referrers(&repo, &img.digest, None).unwrap().is_empty());

        assert_eq!(client.push_empty_config(&repo).unwrap(), registry::empty_descriptor());
        let mut untouched: &[u8] = &[];
        assert_eq!(
            client
                .push_blob(&repo, registry::EMPTY_JSON_DIGEST, 2, &mut untouched)
                .unwrap(),
            BlobPush::Existed
        );
        let index_blobs = [
            blob(&client, &repo, TARINDEX, b"tar index of layer 0"),
            blob(&client, &repo, TARINDEX, b"tar index of layer 1"),
        ];
        let sbom = blob(
            &client,
            &repo,
            "application/spdx+json",
            br#"{"spdxVersion":"SPDX-2.3"}"#,
        );

        let tarindex_notes = annotations(&[("org.example.layers", "2")]);
        let tarindex =
            registry::artifact_manifest(TARINDEX, &img.descriptor(), &index_blobs, Some(&tarindex_notes)).unwrap();
        let sbom_notes = annotations(&[("org.opencontainers.image.created", "2024-01-01T00:00:00Z")]);
        let sbom_manifest =
            registry::artifact_manifest(SBOM, &img.descriptor(), std::slice::from_ref(&sbom), Some(&sbom_notes))
                .unwrap();
        let elsewhere = registry::artifact_manifest(TARINDEX, &other.descriptor(), &[], None).unwrap();

        let tarindex_digest = client.push_referrer(&repo, &tarindex, OCI_MANIFEST).unwrap();
        assert_eq!(tarindex_digest, sha256_digest(&tarindex));
        let sbom_digest = client.push_referrer(&repo, &sbom_manifest, OCI_MANIFEST).unwrap();
        let elsewhere_digest = client.push_referrer(&repo, &elsewhere, OCI_MANIFEST).unwrap();
        // Pushed again: listed once.
        assert_eq!(
            client.push_referrer(&repo, &tarindex, OCI_MANIFEST).unwrap(),
            tarindex_digest
        );

        let found = client.referrers(&repo, &img.digest, None).unwrap();
        assert_eq!(digests(&found), [&tarindex_digest, &sbom_digest]);
        assert_eq!(
            found[0],
            Descriptor {
                media_type: OCI_MANIFEST.into(),
                digest: tarindex_digest.clone(),
                size: tarindex.len() as u64,
                artifact_type: Some(TARINDEX.into()),
                platform: None,
                annotations: Some(tarindex_notes),
            }
        );
        assert_eq!(found[1].artifact_type.as_deref(), Some(SBOM));
        assert_eq!(found[1].annotations.as_ref(), Some(&sbom_notes));

        let only = client.referrers(&repo, &img.digest, Some(TARINDEX)).unwrap();
        assert_eq!(digests(&only), [&tarindex_digest]);
        let only = client.referrers(&repo, &img.digest, Some(SBOM)).unwrap();
        assert_eq!(digests(&only), [&sbom_digest]);
        assert!(client
            .referrers(&repo, &img.digest, Some("application/vnd.none"))
            .unwrap()
            .is_empty());
        assert_eq!(
            digests(&client.referrers(&repo, &other.digest, None).unwrap()),
            [&elsewhere_digest]
        );
        assert!(client.referrers(&repo, &lonely.digest, None).unwrap().is_empty());

        // What the tag holds: an image index listing both, as another client would read it.
        let tag = registry::referrers_tag(&img.digest).unwrap();
        assert_eq!(tag, img.digest.replace(':', "-"));
        let listed = client.get_manifest(&repo.tag(&tag).unwrap()).unwrap();
        assert_eq!(listed.media_type, OCI_INDEX);
        let listed: serde_json::Value = serde_json::from_slice(&listed.bytes).unwrap();
        assert_eq!(listed["mediaType"], OCI_INDEX);
        let entries = listed["manifests"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0]["artifactType"], TARINDEX);
        assert_eq!(entries[1]["artifactType"], SBOM);
        assert!(entries.iter().all(|e| e.get("platform").is_none()));

        // The registry keeps the artifact as pushed (subject and all), and the image untouched.
        let stored = client.get_manifest(&repo.digest(&tarindex_digest).unwrap()).unwrap();
        assert_eq!((stored.bytes, stored.media_type.as_str()), (tarindex, OCI_MANIFEST));
        assert_eq!(client.get_manifest(&repo.tag("v1").unwrap()).unwrap().bytes, img.bytes);
    }

    #[test]
    fn a_referrer_without_artifact_type_is_listed_by_its_config_type() {
        let reg = Registry::start();
        let (client, _cfg) = anonymous_client();
        let repo = reg.repo("app");
        let img = image(&client, &repo, "v1");
        let config_type = "application/vnd.example.config.v1+json";
        let config = blob(&client, &repo, config_type, b"{\"k\":1}");
        let layer = blob(&client, &repo, TARINDEX, b"an index");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer],
            "subject": img.descriptor(),
        }))
        .unwrap();
        let digest = client.push_referrer(&repo, &manifest, OCI_MANIFEST).unwrap();
        let found = client.referrers(&repo, &img.digest, Some(config_type)).unwrap();
        assert_eq!(digests(&found), [&digest]);
        assert_eq!(found[0].annotations, None);
    }
}
