//! Registry access as users configure it: containerd's hosts.toml (mirrors tried first with fallback to
//! the upstream, capabilities, a private CA), docker credential helpers and identity tokens, and a
//! broken hosts.toml. Real docker-registry instances on loopback, with registry-proxy in front of them
//! to count requests and to take a mirror down.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::{data, FakeServer, Registry, RegistryExt, Reply};
use registry::{sha256_digest, Client, ClientOptions, ErrorKind, Reference, Repository, OCI_CONFIG, OCI_MANIFEST};
use serde_json::json;

/// The registry name the tests pull from: it resolves nowhere, so every request must go where
/// hosts.toml sends it.
const NAME: &str = "reg.test:5000";

/// A registry-proxy in front of a registry, in this process: counts what passes and can play dead.
struct Counting {
    addr: String,
    shared: Arc<registry_proxy::Shared>,
}

impl Counting {
    fn to(upstream: &str) -> Counting {
        let proxy = registry_proxy::Proxy::bind("127.0.0.1:0", upstream).unwrap();
        let addr = proxy.local_addr().unwrap().to_string();
        let shared = proxy.shared();
        // The thread ends with the test process; the listener holds no files or mounts.
        std::thread::spawn(move || proxy.serve());
        Counting { addr, shared }
    }

    fn requests(&self) -> u64 {
        self.shared.stats.snapshot().requests
    }

    fn reset(&self) {
        self.shared.stats.reset();
    }
}

/// A client with an empty docker config (or `docker_config`) reading hosts from `hosts_dir`.
fn configured(
    hosts_dir: &Path,
    docker_config: Option<&Path>,
    plain_http: Option<Vec<String>>,
) -> (Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = match docker_config {
        Some(p) => p.to_path_buf(),
        None => {
            let p = dir.path().join("config.json");
            std::fs::write(&p, "{}").unwrap();
            p
        }
    };
    let mut options = ClientOptions {
        docker_config: Some(config),
        hosts_dir: Some(hosts_dir.to_path_buf()),
        timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(1),
        retries: 0,
        ..Default::default()
    };
    if let Some(p) = plain_http {
        options.plain_http = p;
    }
    (Client::new(options).unwrap(), dir)
}

fn write_hosts(hosts_dir: &Path, registry: &str, text: &str) -> PathBuf {
    let dir = hosts_dir.join(registry);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("hosts.toml");
    std::fs::write(&file, text).unwrap();
    file
}

/// An image of one layer and a config pushed under `repo:tag`; returns the layer's bytes and digest.
fn push_image(client: &Client, repo: &Repository, tag: &str) -> (Vec<u8>, String, String) {
    let layer = data(70_000, 3);
    let layer_digest = sha256_digest(&layer);
    client
        .push_blob(repo, &layer_digest, layer.len() as u64, &layer[..])
        .unwrap();
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = sha256_digest(config);
    client
        .push_blob(repo, &config_digest, config.len() as u64, &config[..])
        .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len() }],
    }))
    .unwrap();
    let digest = client
        .put_manifest(&repo.tag(tag).unwrap(), OCI_MANIFEST, &manifest)
        .unwrap();
    (layer, layer_digest, digest)
}

fn plain_client() -> (Client, tempfile::TempDir) {
    common::anonymous_client()
}

/// Pulls `NAME/app:v1` the way the lazy path does: the manifest by tag, then by digest, a range of
/// the layer, the whole layer.
fn pull(client: &Client, layer: &[u8], layer_digest: &str) -> Result<(), registry::Error> {
    let reference = Reference::parse(&format!("{NAME}/app:v1"))?;
    let m = client.get_manifest(&reference)?;
    client.get_manifest(&reference.with_digest(&m.digest)?)?;
    let repo = reference.repo();
    assert_eq!(client.get_blob_range(repo, layer_digest, 100, 50)?, layer[100..150]);
    let mut all = Vec::new();
    client.get_blob(repo, layer_digest)?.read_to_end(&mut all)?;
    assert_eq!(all, layer);
    Ok(())
}

#[test]
fn mirror_first_then_the_upstream_when_it_is_down() {
    let reg = Registry::start();
    let (plain, _c) = plain_client();
    let (layer, layer_digest, _) = push_image(&plain, &reg.repo("app"), "v1");
    let upstream = Counting::to(&reg.addr);
    let mirror = Counting::to(&reg.addr);
    let hosts = tempfile::tempdir().unwrap();
    write_hosts(
        hosts.path(),
        NAME,
        &format!(
            "server = \"http://{}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            upstream.addr, mirror.addr
        ),
    );

    let (client, _c) = configured(hosts.path(), None, None);
    pull(&client, &layer, &layer_digest).unwrap();
    assert_eq!(mirror.requests(), 4, "every request goes to the mirror");
    assert_eq!(upstream.requests(), 0);

    // The mirror stops answering: the same pull is served by the upstream.
    mirror.shared.settings.set_down(true);
    mirror.reset();
    let (client, _c) = client_again(hosts.path());
    pull(&client, &layer, &layer_digest).unwrap();
    assert_eq!(upstream.requests(), 4);
    assert_eq!(mirror.requests(), 0);

    // The mirror is back: a new client uses it again.
    mirror.shared.settings.set_down(false);
    upstream.reset();
    let (client, _c) = client_again(hosts.path());
    pull(&client, &layer, &layer_digest).unwrap();
    assert_eq!((mirror.requests(), upstream.requests()), (4, 0));
}

fn client_again(hosts: &Path) -> (Client, tempfile::TempDir) {
    configured(hosts, None, None)
}

#[test]
fn unreachable_mirrors_are_skipped_in_order_within_the_connect_timeout() {
    let reg = Registry::start();
    let (plain, _c) = plain_client();
    let (layer, layer_digest, _) = push_image(&plain, &reg.repo("app"), "v1");
    let upstream = Counting::to(&reg.addr);
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let hosts = tempfile::tempdir().unwrap();
    // A refused port, then an address nothing answers (TEST-NET-1: it may also fail at once).
    write_hosts(
        hosts.path(),
        NAME,
        &format!(
            "server = \"http://{}\"\n[host.\"http://{closed}\"]\n[host.\"http://192.0.2.1:5000\"]\n",
            upstream.addr
        ),
    );
    let (client, _c) = configured(hosts.path(), None, None);
    let start = Instant::now();
    pull(&client, &layer, &layer_digest).unwrap();
    // One connect timeout (1 s) at most: once a host failed to connect it is passed over.
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    assert_eq!(upstream.requests(), 4);
}

#[test]
fn capabilities_decide_what_a_host_is_asked() {
    let reg = Registry::start();
    let (plain, _c) = plain_client();
    let (layer, layer_digest, _) = push_image(&plain, &reg.repo("app"), "v1");
    let upstream = Counting::to(&reg.addr);
    let mirror = Counting::to(&reg.addr);
    let hosts = tempfile::tempdir().unwrap();
    // A public mirror: trusted with content (verified by digest), not with tags or pushes.
    write_hosts(
        hosts.path(),
        NAME,
        &format!(
            "server = \"http://{}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\"]\n",
            upstream.addr, mirror.addr
        ),
    );
    let (client, _c) = configured(hosts.path(), None, None);
    pull(&client, &layer, &layer_digest).unwrap();
    assert_eq!(upstream.requests(), 1, "only the tag is resolved upstream");
    assert_eq!(mirror.requests(), 3);

    upstream.reset();
    mirror.reset();
    let repo = Repository::parse(&format!("{NAME}/pushed")).unwrap();
    let blob = data(1000, 9);
    client.push_blob(&repo, &sha256_digest(&blob), 1000, &blob[..]).unwrap();
    assert_eq!(mirror.requests(), 0);
    assert!(upstream.requests() >= 3, "HEAD, POST, PUT upstream");

    // A server that may not push leaves no host to push to.
    write_hosts(
        hosts.path(),
        NAME,
        &format!(
            "server = \"http://{}\"\ncapabilities = [\"pull\", \"resolve\"]\n",
            upstream.addr
        ),
    );
    let (client, _c) = configured(hosts.path(), None, None);
    let e = client
        .push_blob(&repo, &sha256_digest(&blob), 1000, &blob[..])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::HostsConfig, "{e}");
    pull(&client, &layer, &layer_digest).unwrap();
}

#[test]
fn a_broken_hosts_toml_is_reported_with_its_line_and_the_defaults_apply() {
    let reg = Registry::start();
    let (plain, _c) = plain_client();
    let repo = reg.repo("app");
    let (layer, layer_digest, _) = push_image(&plain, &repo, "v1");
    let hosts = tempfile::tempdir().unwrap();
    // Would send everything to a dead mirror, were it read.
    let file = write_hosts(
        hosts.path(),
        &reg.addr,
        "server = \"http://127.0.0.1:1\"\n\n[host.\"http://127.0.0.1:2\"]\n  capabilities = [\"pull\", \"teleport\"]\n",
    );
    let e = registry::hosts::load(hosts.path(), &reg.addr).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::HostsConfig);
    assert!(e.to_string().starts_with(&format!("{}:4: ", file.display())), "{e}");

    let (client, _c) = configured(hosts.path(), None, None);
    let m = client.get_manifest(&repo.tag("v1").unwrap()).unwrap();
    assert_eq!(m.media_type, OCI_MANIFEST);
    assert_eq!(client.get_blob_range(&repo, &layer_digest, 0, 10).unwrap(), layer[..10]);
}

/// A CA and a certificate it signed for 127.0.0.1, made with openssl.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("leaf.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .unwrap_or_else(|e| panic!("openssl is not installed (apt-get install -y openssl): {e}"));
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-days",
            "2",
            "-subj",
            "/CN=dedup test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        run(&ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend(["-subj", "/CN=127.0.0.1", "-keyout", "leaf.key", "-out", "leaf.csr"]);
        run(&csr);
        run(&[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
            "-out",
            "leaf.crt",
        ]);
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

#[test]
fn a_private_ca_from_hosts_toml() {
    let pki = Pki::new();
    let reg = Registry::start_tls(&pki.path("leaf.crt"), &pki.path("leaf.key"));
    let hosts = tempfile::tempdir().unwrap();
    let repo = reg.repo("secure");
    let blob = data(5000, 4);
    let digest = sha256_digest(&blob);
    // Loopback is plain HTTP by default: hosts.toml's https server URL is what makes this TLS.
    let server = format!("server = \"https://{}\"\n", reg.addr);

    // Without the CA, the system's roots do not know the registry's certificate.
    write_hosts(hosts.path(), &reg.addr, &server);
    let (client_no_ca, _c) = configured(hosts.path(), None, None);
    let e = client_no_ca.blob_exists(&repo, &digest).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");

    // The CA, relative to the file's directory.
    std::fs::copy(pki.path("ca.crt"), hosts.path().join(&reg.addr).join("ca.crt")).unwrap();
    write_hosts(hosts.path(), &reg.addr, &format!("{server}ca = \"ca.crt\"\n"));
    let (client, _c) = configured(hosts.path(), None, None);
    client.push_blob(&repo, &digest, blob.len() as u64, &blob[..]).unwrap();
    assert_eq!(client.get_blob_range(&repo, &digest, 10, 20).unwrap(), blob[10..30]);

    // skip_verify trusts anything.
    write_hosts(hosts.path(), &reg.addr, &format!("{server}skip_verify = true\n"));
    let (client, _c) = configured(hosts.path(), None, None);
    assert_eq!(client.blob_exists(&repo, &digest).unwrap(), Some(5000));

    // Docker's pattern: no hosts.toml, a *.crt in the host's directory (under the host_port_ name).
    let docker_style = tempfile::tempdir().unwrap();
    let (host, port) = reg.addr.split_once(':').unwrap();
    let dir = docker_style.path().join(format!("{host}_{port}_"));
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(pki.path("ca.crt"), dir.join("my-ca.crt")).unwrap();
    let (client, _c) = configured(docker_style.path(), None, Some(Vec::new()));
    assert_eq!(client.blob_exists(&repo, &digest).unwrap(), Some(5000));
}

/// A `docker-credential-test` on PATH (set up once per test process, in cargo's scratch directory for
/// integration tests, so nothing is left in /tmp): it answers with the file named after the server it
/// is asked about, from its own directory, fails when a `.fail` file says so, or says it has no
/// credentials. It notes each server it is asked about in `<server>.asked`.
fn credential_helper_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("docker-credential-test");
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("docker-credential-test");
        let tmp = dir.join(format!(".script.{}", std::process::id()));
        std::fs::write(
            &tmp,
            "#!/bin/sh\n\
             [ \"$1\" = get ] || exit 2\n\
             d=$(dirname \"$0\")\n\
             server=$(cat)\n\
             echo \"$server\" >> \"$d/$server.asked\"\n\
             if [ -f \"$d/$server.json\" ]; then cat \"$d/$server.json\"; exit 0; fi\n\
             if [ -f \"$d/$server.fail\" ]; then echo 'keychain locked' >&2; exit 1; fi\n\
             echo 'credentials not found in native keychain'\n\
             exit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &script).unwrap();
        // Prepended: everything else the tests run is still found.
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut new = std::ffi::OsString::from(&dir);
        new.push(":");
        new.push(path);
        std::env::set_var("PATH", new);
        dir
    })
}

/// Removes a test's answer files from the helper's directory, panics included.
struct HelperFiles(Vec<PathBuf>);

impl Drop for HelperFiles {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

#[test]
fn a_credential_helper_supplies_the_credentials() {
    let reg = Registry::start_htpasswd("carol", "from-the-helper");
    let helper = credential_helper_dir();
    let answer = helper.join(format!("{}.json", reg.addr));
    std::fs::write(
        &answer,
        format!(
            r#"{{"ServerURL":"{}","Username":"carol","Secret":"from-the-helper"}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let asked = helper.join(format!("{}.asked", reg.addr));
    let _cleanup = HelperFiles(vec![answer.clone(), asked.clone()]);
    let repo = reg.repo("private");
    let blob = data(3000, 5);
    let digest = sha256_digest(&blob);
    let hosts = tempfile::tempdir().unwrap();
    let configs = tempfile::tempdir().unwrap();

    // credHelpers names the helper for this registry.
    let per_host = configs.path().join("per-host.json");
    std::fs::write(&per_host, format!(r#"{{"credHelpers":{{"{}":"test"}}}}"#, reg.addr)).unwrap();
    let (client, _c) = configured(hosts.path(), Some(&per_host), None);
    client.push_blob(&repo, &digest, 3000, &blob[..]).unwrap();
    assert_eq!(client.get_blob_range(&repo, &digest, 0, 3000).unwrap(), blob);
    let asked = std::fs::read_to_string(&asked).unwrap();
    assert!(asked.lines().all(|l| l == reg.addr), "{asked}");

    // credsStore is the helper for every registry.
    let store = configs.path().join("store.json");
    std::fs::write(&store, r#"{"credsStore":"test"}"#).unwrap();
    let (client, _c) = configured(hosts.path(), Some(&store), None);
    assert_eq!(client.blob_exists(&repo, &digest).unwrap(), Some(3000));

    // A helper without credentials for the registry: anonymous, and refused.
    std::fs::remove_file(&answer).unwrap();
    let (client, _c) = configured(hosts.path(), Some(&store), None);
    let e = client.blob_exists(&repo, &digest).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");

    // A helper that fails is an error of its own, with what it said.
    let fail = helper.join(format!("{}.fail", reg.addr));
    std::fs::write(&fail, "").unwrap();
    let _cleanup2 = HelperFiles(vec![fail]);
    let (client, _c) = configured(hosts.path(), Some(&store), None);
    let e = client.blob_exists(&repo, &digest).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("keychain locked"), "{e}");
}

#[test]
fn an_identity_token_is_a_refresh_token() {
    let blob = data(2000, 6);
    let digest = sha256_digest(&blob);
    let token_server = FakeServer::start(|req| {
        let form: Vec<(String, String)> = url::form_urlencoded::parse(&req.body).into_owned().collect();
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if req.method == "POST" && get("grant_type") == Some("refresh_token") && get("refresh_token") == Some("idt-1") {
            assert_eq!(get("service"), Some("fake-registry"));
            assert!(get("scope").unwrap().contains("repository:app:pull"), "{form:?}");
            Reply::new(200).body(r#"{"access_token":"access-1","expires_in":300}"#)
        } else {
            Reply::new(401)
        }
    });
    let realm = format!("http://{}/token", token_server.addr);
    let (blob2, digest2) = (blob.clone(), digest.clone());
    let reg = FakeServer::start(move |req| {
        if req.header("authorization") != Some("Bearer access-1") {
            return Reply::new(401).header(
                "WWW-Authenticate",
                &format!(r#"Bearer realm="{realm}",service="fake-registry",scope="repository:app:pull""#),
            );
        }
        if req.path() == format!("/v2/app/blobs/{digest2}") {
            Reply::new(200).body(blob2.clone())
        } else {
            Reply::new(404)
        }
    });
    let hosts = tempfile::tempdir().unwrap();
    let configs = tempfile::tempdir().unwrap();
    let repo = Repository::parse(&format!("{}/app", reg.addr)).unwrap();

    // From `auths`, as `docker login` leaves it with an identity provider.
    let cfg = configs.path().join("auths.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"PHRva2VuPjo=","identitytoken":"idt-1"}}}}}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let (client, _c) = configured(hosts.path(), Some(&cfg), None);
    let mut got = Vec::new();
    client.get_blob(&repo, &digest).unwrap().read_to_end(&mut got).unwrap();
    assert_eq!(got, blob);
    assert!(
        token_server.lines().iter().all(|l| l == "POST /token"),
        "{:?}",
        token_server.lines()
    );

    // From a helper, as the `<token>` user.
    let helper = credential_helper_dir();
    let answer = helper.join(format!("{}.json", reg.addr));
    std::fs::write(&answer, r#"{"Username":"<token>","Secret":"idt-1"}"#).unwrap();
    let _cleanup = HelperFiles(vec![answer, helper.join(format!("{}.asked", reg.addr))]);
    let store = configs.path().join("store.json");
    std::fs::write(&store, r#"{"credsStore":"test"}"#).unwrap();
    let (client, _c) = configured(hosts.path(), Some(&store), None);
    assert_eq!(client.get_blob_range(&repo, &digest, 5, 5).unwrap(), blob[5..10]);
}
