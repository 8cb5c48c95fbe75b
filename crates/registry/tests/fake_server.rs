//! What a real registry will not do on demand, against a tiny scripted HTTP server: bearer tokens (and
//! their expiry), ignoring Range, failing with 5xx, relative upload locations.

mod common;

use std::io::Read;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use common::{anonymous_client, client_with, data, docker_config, FakeServer, Reply, Request};
use registry::{sha256_digest, BlobPush, ErrorKind, Reference, Repository, OCI_MANIFEST};

const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;

/// A registry that wants `Bearer tok-N` (N = `valid`), and its token endpoint, which wants Basic
/// `u:p` and hands out the current token with `expires_in` seconds of life.
struct TokenRegistry {
    server: FakeServer,
    valid: Arc<AtomicU32>,
}

impl TokenRegistry {
    fn start(expires_in: u64) -> TokenRegistry {
        let valid = Arc::new(AtomicU32::new(1));
        let addr = Arc::new(Mutex::new(String::new()));
        let server = {
            let (valid, addr) = (valid.clone(), addr.clone());
            FakeServer::start(move |req: &Request| {
                let n = valid.load(Ordering::SeqCst);
                if req.path() == "/token" {
                    if req.header("authorization") != Some("Basic dTpw") {
                        return Reply::new(401).body(r#"{"details":"bad credentials"}"#);
                    }
                    assert_eq!(req.query(), "service=fake&scope=repository%3Aimg%3Apull");
                    return Reply::new(200).body(format!(r#"{{"token":"tok-{n}","expires_in":{expires_in}}}"#));
                }
                if req.header("authorization") != Some(&format!("Bearer tok-{n}")) {
                    let realm = format!("http://{}/token", addr.lock().unwrap());
                    let challenge = format!(r#"Bearer realm="{realm}",service="fake",scope="repository:img:pull""#);
                    return Reply::new(401)
                        .header("WWW-Authenticate", &challenge)
                        .body(r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#);
                }
                Reply::new(200).header("Content-Type", OCI_MANIFEST).body(MANIFEST)
            })
        };
        *addr.lock().unwrap() = server.addr.clone();
        TokenRegistry { server, valid }
    }

    fn reference(&self) -> Reference {
        Reference::parse(&format!("{}/img:v1", self.server.addr)).unwrap()
    }

    /// The Authorization header of each request so far, `-` for none, with the path.
    fn log(&self) -> Vec<String> {
        let reqs = self.server.requests();
        reqs.iter()
            .map(|r| format!("{} {}", r.path(), r.header("authorization").unwrap_or("-")))
            .collect()
    }
}

#[test]
fn bearer_token_with_credentials_is_fetched_once_and_refreshed_once_on_expiry() {
    let reg = TokenRegistry::start(300);
    let dir = tempfile::tempdir().unwrap();
    let cfg = docker_config(dir.path(), &reg.server.addr, "u", "p");
    let (client, _) = client_with(Some(&cfg), 0);

    let m = client.get_manifest(&reg.reference()).unwrap();
    assert_eq!((m.bytes.as_slice(), m.digest), (MANIFEST, sha256_digest(MANIFEST)));
    let manifest = "/v2/img/manifests/v1";
    assert_eq!(
        reg.log(),
        [
            format!("{manifest} -"),
            "/token Basic dTpw".into(),
            format!("{manifest} Bearer tok-1")
        ]
    );
    // The cached token is sent up front: no new challenge, no new token.
    client.get_manifest(&reg.reference()).unwrap();
    assert_eq!(reg.log()[3..], [format!("{manifest} Bearer tok-1")]);

    // The registry stops accepting the token: one 401, one refresh, success.
    reg.valid.store(2, Ordering::SeqCst);
    client.get_manifest(&reg.reference()).unwrap();
    assert_eq!(
        reg.log()[4..],
        [
            format!("{manifest} Bearer tok-1"),
            "/token Basic dTpw".into(),
            format!("{manifest} Bearer tok-2")
        ]
    );
}

#[test]
fn expired_token_is_replaced_before_use() {
    // One second of life, minus the safety margin: gone after the sleep.
    let reg = TokenRegistry::start(1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = docker_config(dir.path(), &reg.server.addr, "u", "p");
    let (client, _) = client_with(Some(&cfg), 0);
    client.get_manifest(&reg.reference()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    reg.valid.store(2, Ordering::SeqCst);
    client.get_manifest(&reg.reference()).unwrap();
    // The second manifest GET went out with the new token at once.
    assert_eq!(
        reg.log()[3..],
        ["/token Basic dTpw", "/v2/img/manifests/v1 Bearer tok-2"]
    );
}

#[test]
fn token_endpoint_refusal_is_unauthorized() {
    let reg = TokenRegistry::start(300);
    let dir = tempfile::tempdir().unwrap();
    let cfg = docker_config(dir.path(), &reg.server.addr, "u", "wrong");
    let (client, _) = client_with(Some(&cfg), 0);
    let e = client.get_manifest(&reg.reference()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("GET http://{}/token?service=fake", reg.server.addr)),
        "{e}"
    );

    // Anonymous: the token endpoint refuses too (it wants credentials).
    let (anonymous, _) = anonymous_client();
    let e = anonymous.get_manifest(&reg.reference()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
}

#[test]
fn a_registry_refusing_every_token_does_not_loop() {
    let tokens = FakeServer::start(|_req: &Request| Reply::new(200).body(r#"{"access_token":"t"}"#));
    let challenge = format!(r#"Bearer realm="http://{}/token",service="s""#, tokens.addr);
    let server = FakeServer::start(move |_req: &Request| Reply::new(401).header("WWW-Authenticate", &challenge));
    let (client, _) = anonymous_client();
    let e = client
        .get_manifest(&Reference::parse(&format!("{}/x:y", server.addr)).unwrap())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    let auths: Vec<_> = server
        .requests()
        .iter()
        .map(|r| r.header("authorization").map(str::to_string))
        .collect();
    assert_eq!(auths, [None, Some("Bearer t".to_string())]);
    assert_eq!(tokens.requests().len(), 1);
}

#[test]
fn range_answered_with_whole_blob() {
    let blob = data(10_000, 1);
    let digest = sha256_digest(&blob);
    let server = {
        let blob = blob.clone();
        FakeServer::start(move |_req: &Request| Reply::new(200).body(blob.clone()))
    };
    let (client, _) = anonymous_client();
    let repo = Repository::parse(&format!("{}/r", server.addr)).unwrap();
    assert_eq!(client.get_blob_range(&repo, &digest, 0, 100).unwrap(), blob[..100]);
    assert_eq!(
        client.get_blob_range(&repo, &digest, 5_000, 100).unwrap(),
        blob[5_000..5_100]
    );
    assert_eq!(
        client.get_blob_range(&repo, &digest, 9_950, 100).unwrap(),
        blob[9_950..]
    );
    assert_eq!(
        client.get_blob_range(&repo, &digest, 20_000, 100).unwrap(),
        Vec::<u8>::new()
    );
    assert_eq!(server.requests()[1].header("range"), Some("bytes=5000-5099"));
}

#[test]
fn bad_content_range_is_a_protocol_error() {
    let server = FakeServer::start(|_req: &Request| {
        Reply::new(206)
            .header("Content-Range", "bytes 1-10/100")
            .body(vec![0u8; 10])
    });
    let (client, _) = anonymous_client();
    let repo = Repository::parse(&format!("{}/r", server.addr)).unwrap();
    let e = client.get_blob_range(&repo, &sha256_digest(b""), 0, 10).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
}

#[test]
fn served_blob_with_wrong_content_is_a_mismatch() {
    let server = FakeServer::start(|_req: &Request| Reply::new(200).body("not what was asked"));
    let (client, _) = anonymous_client();
    let repo = Repository::parse(&format!("{}/r", server.addr)).unwrap();
    let mut blob = client.get_blob(&repo, &sha256_digest(b"what was asked")).unwrap();
    let e = blob.read_to_end(&mut Vec::new()).unwrap_err();
    assert_eq!(registry::Error::from(e).kind(), ErrorKind::DigestMismatch);
}

#[test]
fn retries_5xx_and_429_then_gives_up() {
    let failures = Arc::new(AtomicU32::new(0));
    let server = {
        let failures = failures.clone();
        FakeServer::start(move |_req: &Request| {
            if failures.fetch_add(1, Ordering::SeqCst) < 2 {
                let status = if failures.load(Ordering::SeqCst) == 1 { 503 } else { 429 };
                return Reply::new(status).header("Retry-After", "0");
            }
            Reply::new(200).header("Content-Type", OCI_MANIFEST).body(MANIFEST)
        })
    };
    let reference = Reference::parse(&format!("{}/r:t", server.addr)).unwrap();
    let (client2, _) = client_with(None, 2);
    assert_eq!(client2.get_manifest(&reference).unwrap().bytes, MANIFEST);
    assert_eq!(server.requests().len(), 3);

    failures.store(0, Ordering::SeqCst);
    let (client1, _) = client_with(None, 1);
    let e = client1.get_manifest(&reference).unwrap_err();
    assert_eq!((e.kind(), e.status()), (ErrorKind::Http, Some(429)), "{e}");
}

#[test]
fn connection_errors_are_io() {
    // Nothing listens there once the listener is gone.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (client, _) = client_with(None, 1);
    let reference = Reference::parse(&format!("127.0.0.1:{port}/r:t")).unwrap();
    let e = client.get_manifest(&reference).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("GET http://127.0.0.1:{port}/v2/r/manifests/t: ")),
        "{e}"
    );
}

#[test]
fn upload_to_relative_location_keeps_its_query() {
    let blob = data(3_000, 2);
    let digest = sha256_digest(&blob);
    let server = FakeServer::start(|req: &Request| match (req.method.as_str(), req.path()) {
        ("HEAD", _) => Reply::new(404),
        ("POST", "/v2/r/blobs/uploads/") => Reply::new(202).header("Location", "session-1?_state=abc%2Fdef"),
        ("PUT", "/v2/r/blobs/uploads/session-1") => Reply::new(201),
        _ => Reply::new(500),
    });
    let (client, _) = anonymous_client();
    let repo = Repository::parse(&format!("{}/r", server.addr)).unwrap();
    assert_eq!(
        client.push_blob(&repo, &digest, 3_000, &blob[..]).unwrap(),
        BlobPush::Uploaded
    );
    let reqs = server.requests();
    let put = reqs.iter().find(|r| r.method == "PUT").unwrap();
    assert_eq!(
        put.query(),
        format!("_state=abc%2Fdef&digest={}", digest.replace(':', "%3A"))
    );
    assert_eq!(put.body, blob);
    assert_eq!(put.header("content-length"), Some("3000"));
}

#[test]
fn upload_location_on_another_host_gets_no_credentials() {
    let other = FakeServer::start(|_req: &Request| Reply::new(201));
    let location = format!("http://{}/upload/1", other.addr);
    let server = FakeServer::start(move |req: &Request| {
        if req.header("authorization") != Some("Basic dTpw") {
            return Reply::new(401).header("WWW-Authenticate", r#"Basic realm="r""#);
        }
        match req.method.as_str() {
            "HEAD" => Reply::new(404),
            _ => Reply::new(202).header("Location", &location),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = docker_config(dir.path(), &server.addr, "u", "p");
    let (client, _) = client_with(Some(&cfg), 0);
    let repo = Repository::parse(&format!("{}/r", server.addr)).unwrap();
    assert_eq!(
        client.push_blob(&repo, &sha256_digest(b"abc"), 3, &b"abc"[..]).unwrap(),
        BlobPush::Uploaded
    );
    let put = &other.requests()[0];
    assert_eq!((put.method.as_str(), put.body.as_slice()), ("PUT", &b"abc"[..]));
    assert_eq!(put.header("authorization"), None);
}
