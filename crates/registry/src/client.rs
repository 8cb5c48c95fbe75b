//! The registry client: requests with auth and retries, and the pull/push operations on top.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use ureq::http::{self, Method, Response};
use ureq::{BodyReader, SendBody};
use url::Url;

use crate::auth::{parse_challenges, AuthCache, Challenge, Credentials, DockerConfig, HostAuth, TokenResponse};
use crate::digest::{sha256_digest, validate_digest, verify, Hasher, VerifyingReader};
use crate::error::{status_error, Error, Result};
use crate::hosts::{self, Capabilities, HostEntry};
use crate::manifest::{Descriptor, MANIFEST_ACCEPT};
use crate::reference::{Reference, Repository};

/// Registries refuse manifests over 4 MiB; this leaves room for ones that do not, without trusting a
/// server to send a bounded body.
const MAX_MANIFEST: u64 = 16 << 20;
const MAX_SMALL_BODY: u64 = 1 << 20;

/// How a [`Client`] reaches registries.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Registries spoken to over plain HTTP instead of HTTPS: `host` (any port) or `host:port`.
    /// Defaults to the loopback names `127.0.0.1`, `localhost` and `[::1]`.
    pub plain_http: Vec<String>,
    /// The docker config file with credentials (`auths`). `None` means `$DOCKER_CONFIG/config.json`,
    /// else `~/.docker/config.json`, either of which may be missing; an explicit file must exist.
    pub docker_config: Option<PathBuf>,
    /// Limit for connecting and for each read or write on the connection (not for a whole transfer,
    /// so large blobs are fine).
    pub timeout: Duration,
    /// How many times an idempotent request is retried after a connection error, 5xx or 429.
    pub retries: u32,
    /// containerd's registry host configuration directory (`certs.d`: `<dir>/<registry>/hosts.toml`,
    /// see [`crate::hosts`]): mirrors, CAs, client certificates. `None` reads none.
    pub hosts_dir: Option<PathBuf>,
    /// Limit for establishing a connection (at most `timeout`): how long an unreachable mirror holds a
    /// request up before the next host is tried. A host's `dial_timeout` in hosts.toml overrides it.
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            plain_http: vec!["127.0.0.1".into(), "localhost".into(), "[::1]".into()],
            docker_config: None,
            timeout: Duration::from_secs(30),
            retries: 3,
            hosts_dir: None,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// A blocking OCI Distribution client. Shareable between threads; it keeps connections and tokens.
///
/// Each registry is reached through the hosts its `hosts.toml` names (read once per registry, on first
/// use): mirrors first, in file order, then the upstream. A request goes to the first host whose
/// capabilities allow it and falls back to the next on any failure; pushes go to the first host that
/// may push, only.
pub struct Client {
    agent: ureq::Agent,
    options: ClientOptions,
    creds: DockerConfig,
    auth: Mutex<AuthCache>,
    retries: u32,
    /// Per registry name: the hosts to try, in order.
    hosts: Mutex<HashMap<String, Arc<Vec<Endpoint>>>>,
    /// Hosts that could not be reached, by origin, and until when they are passed over.
    down: Mutex<HashMap<String, Instant>>,
}

/// How long a host that could not be connected to is passed over (unless it is the last one): without
/// it every chunk a lazy layer fetches would wait out the dead mirror's connect timeout first.
const DOWN_FOR: Duration = Duration::from_secs(30);

/// One host a registry's requests may go to: a mirror or the upstream.
pub(crate) struct Endpoint {
    /// `scheme://host[:port]`: where credentials may be sent, and the key of the down list.
    origin: String,
    /// The API root (`…/v2`), no trailing slash.
    api: String,
    /// `host[:port]`: the key of its tokens and learnt auth scheme.
    authority: String,
    /// Whose credentials it gets: the registry's name for the upstream, its own for a mirror.
    creds_key: String,
    /// `ns=<registry>` for a host that is not the registry itself, as containerd sends it.
    ns: Option<String>,
    capabilities: Capabilities,
    agent: ureq::Agent,
    headers: Vec<(String, String)>,
}

/// Which operation a request is for, i.e. which capability a host needs to be asked.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Need {
    Pull,
    Resolve,
    Push,
}

impl Need {
    fn allowed(self, c: Capabilities) -> bool {
        match self {
            Need::Pull => c.pull,
            Need::Resolve => c.resolve,
            Need::Push => c.push,
        }
    }
}

/// A manifest as the registry sent it.
#[derive(Debug, Clone)]
pub struct RawManifest {
    /// The exact bytes: the digest is over them, so they must not be re-serialized.
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: String,
}

impl RawManifest {
    /// The descriptor of this manifest (media type, digest, size), e.g. as the `subject` of a referrer.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.bytes.len() as u64,
            ..Default::default()
        }
    }
}

/// What a blob push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobPush {
    /// The repository already had the blob; nothing was read from the reader.
    Existed,
    /// The registry linked it from the other repository; nothing was read from the reader.
    Mounted,
    /// The reader's content was uploaded.
    Uploaded,
}

/// A blob being downloaded: `Read` it to the end to have it verified.
///
/// The digest is checked when the body ends: the read that would return 0 fails with an `io::Error`
/// wrapping [`Error::DigestMismatch`] instead (`Error::from(io_err)` gets it back). Until then the data
/// read is unverified.
pub struct Blob {
    inner: VerifyingReader<BodyReader<'static>>,
    size: Option<u64>,
}

impl Blob {
    /// The size the registry announced (`Content-Length`), if it did.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// The digest the content is checked against.
    pub fn digest(&self) -> &str {
        self.inner.digest()
    }

    /// The body without the digest check, for a consumer that hashes every byte
    /// itself anyway and checks the digest before it trusts anything (the layer
    /// converter): hashing twice would cost the decompressing thread ~7%.
    pub fn into_unverified(self) -> impl Read + Send {
        self.inner.into_inner()
    }
}

impl Read for Blob {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

/// The token scope of a request, and the host whose credentials and tokens it uses.
pub(crate) struct Scope {
    host: String,
    registry: String,
    origin: String,
    scopes: Vec<String>,
}

impl Scope {
    fn new(ep: &Endpoint, scopes: Vec<String>) -> Scope {
        Scope {
            host: ep.authority.clone(),
            registry: ep.creds_key.clone(),
            origin: ep.origin.clone(),
            scopes,
        }
    }

    pub(crate) fn pull(ep: &Endpoint, repo: &Repository) -> Scope {
        Scope::new(ep, vec![format!("repository:{}:pull", repo.name())])
    }

    pub(crate) fn push(ep: &Endpoint, repo: &Repository) -> Scope {
        Scope::new(ep, vec![format!("repository:{}:pull,push", repo.name())])
    }

    fn key(&self) -> String {
        self.scopes.join(" ")
    }
}

pub(crate) enum ReqBody<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// Sent once: a request with a streamed body is never retried.
    Stream(&'a mut dyn Read, u64),
}

impl Client {
    /// A client; reads the docker config file now (hosts.toml files later, per registry).
    pub fn new(options: ClientOptions) -> Result<Client> {
        let agent = new_agent(&options, None)?;
        Ok(Client {
            agent,
            creds: DockerConfig::load(options.docker_config.as_deref())?,
            auth: Mutex::new(AuthCache::default()),
            retries: options.retries,
            options,
            hosts: Mutex::new(HashMap::new()),
            down: Mutex::new(HashMap::new()),
        })
    }

    /// The hosts to try for `repo`'s registry, in order; read from its hosts.toml on first use. A
    /// configuration with errors is logged with its file and line, and the registry is reached
    /// as if it had none.
    fn endpoints(&self, repo: &Repository) -> Arc<Vec<Endpoint>> {
        let registry = repo.registry();
        if let Some(e) = self.hosts.lock().unwrap_or_else(|e| e.into_inner()).get(registry) {
            return e.clone();
        }
        let configured = match &self.options.hosts_dir {
            None => Ok(None),
            Some(dir) => hosts::load(dir, registry).and_then(|c| c.map(|c| self.build_endpoints(repo, c)).transpose()),
        };
        let endpoints = match configured {
            Ok(Some(e)) => e,
            Ok(None) => vec![self.default_endpoint(repo)],
            Err(e) => {
                warn!(registry, error = %e, "registry host configuration not used: reaching the registry with the defaults");
                vec![self.default_endpoint(repo)]
            }
        };
        let endpoints = Arc::new(endpoints);
        self.hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(registry.to_string(), endpoints.clone());
        endpoints
    }

    fn default_endpoint(&self, repo: &Repository) -> Endpoint {
        let base = self.base(repo.host());
        Endpoint {
            api: format!("{base}/v2"),
            origin: base,
            authority: repo.host().to_string(),
            creds_key: repo.registry().to_string(),
            ns: None,
            capabilities: Capabilities::ALL,
            agent: self.agent.clone(),
            headers: Vec::new(),
        }
    }

    fn build_endpoints(&self, repo: &Repository, config: hosts::HostsConfig) -> Result<Vec<Endpoint>> {
        let mut out = Vec::new();
        let entries = config.mirrors.iter().chain(std::iter::once(&config.server));
        for entry in entries {
            let url = match &entry.url {
                Some(u) => u.clone(),
                None => Url::parse(&self.base(repo.host()))
                    .map_err(|e| Error::invalid("registry URL", repo.host(), e.to_string()))?,
            };
            let authority = match url.port() {
                Some(p) => format!("{}:{p}", url.host_str().unwrap_or("")),
                None => url.host_str().unwrap_or("").to_string(),
            };
            let upstream = authority == repo.host() || authority == repo.registry();
            let agent = if entry.custom_tls() || entry.dial_timeout.is_some() {
                new_agent(&self.options, Some(entry)).map_err(|e| Error::HostsConfig {
                    path: config.source.clone(),
                    line: None,
                    msg: format!("{url}: {e}"),
                })?
            } else {
                self.agent.clone()
            };
            out.push(Endpoint {
                origin: hosts::origin(&url),
                api: entry.api_root(&url),
                creds_key: if upstream {
                    repo.registry().to_string()
                } else {
                    authority.clone()
                },
                ns: (!upstream).then(|| repo.registry().to_string()),
                authority,
                capabilities: entry.capabilities,
                agent,
                headers: entry.headers.clone(),
            });
        }
        debug!(
            registry = repo.registry(),
            source = %config.source.display(),
            hosts = ?out.iter().map(|e| e.api.as_str()).collect::<Vec<_>>(),
            "registry hosts"
        );
        Ok(out)
    }

    /// Runs `op` against each host allowed to do `need`, in order, until one succeeds; the last host's
    /// error is returned. Pushes use the first host that may push, only: an upload session lives on
    /// one host.
    pub(crate) fn each<T>(
        &self,
        repo: &Repository,
        need: Need,
        mut op: impl FnMut(&Endpoint) -> Result<T>,
    ) -> Result<T> {
        let endpoints = self.endpoints(repo);
        let mut candidates: Vec<&Endpoint> = endpoints.iter().filter(|e| need.allowed(e.capabilities)).collect();
        if need == Need::Push {
            candidates.truncate(1);
        }
        if candidates.is_empty() {
            return Err(Error::HostsConfig {
                path: self.options.hosts_dir.clone().unwrap_or_default(),
                line: None,
                msg: format!("no host of {} has the {need:?} capability", repo.registry()),
            });
        }
        let last = candidates.len() - 1;
        for (i, ep) in candidates.into_iter().enumerate() {
            if i < last && self.is_down(&ep.origin) {
                debug!(host = %ep.origin, "passed over: unreachable a moment ago");
                continue;
            }
            match op(ep) {
                Ok(v) => return Ok(v),
                Err(e) if i == last => return Err(e),
                Err(e) => {
                    if matches!(e, Error::Transport { .. }) {
                        warn!(host = %ep.origin, error = %e, "registry host unreachable: trying the next one");
                        self.down
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(ep.origin.clone(), Instant::now() + DOWN_FOR);
                    } else {
                        debug!(host = %ep.origin, error = %e, "trying the next registry host");
                    }
                }
            }
        }
        unreachable!("the last candidate returns")
    }

    fn is_down(&self, origin: &str) -> bool {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        match down.get(origin) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                down.remove(origin);
                false
            }
            None => false,
        }
    }

    /// Fetches a manifest (or index) by tag or digest.
    ///
    /// Fetched by digest, the content is verified against it; by tag, against `Docker-Content-Digest` when
    /// the registry sends it. The returned digest is that of the bytes.
    pub fn get_manifest(&self, reference: &Reference) -> Result<RawManifest> {
        // A tag means whatever the host says: only hosts trusted to resolve are asked.
        let need = if reference.digest().is_some() {
            Need::Pull
        } else {
            Need::Resolve
        };
        self.each(reference.repo(), need, |ep| self.get_manifest_from(ep, reference))
    }

    fn get_manifest_from(&self, ep: &Endpoint, reference: &Reference) -> Result<RawManifest> {
        self.get_manifest_limited(ep, reference, MAX_MANIFEST)
    }

    /// [`Client::get_manifest`] from one host, reading at most `limit` bytes of body.
    pub(crate) fn get_manifest_limited(&self, ep: &Endpoint, reference: &Reference, limit: u64) -> Result<RawManifest> {
        let url = self.url(ep, reference.repo(), &format!("manifests/{}", reference.locator()))?;
        let request = describe(&Method::GET, &url);
        let accept = MANIFEST_ACCEPT.join(", ");
        let scope = Scope::pull(ep, reference.repo());
        let resp = self.send(
            ep,
            Method::GET,
            &url,
            Some(&scope),
            &[("Accept", &accept)],
            ReqBody::Empty,
            true,
        )?;
        let resp = expect(&request, resp, &[200])?;
        let content_type = header(&resp, "content-type").map(|c| c.split(';').next().unwrap_or("").trim().to_string());
        let header_digest = header(&resp, "docker-content-digest")
            .filter(|d| validate_digest(d).is_ok())
            .map(str::to_string);
        let bytes = read_body(&request, resp, limit)?;

        let digest = match (reference.digest(), header_digest.as_deref()) {
            (Some(d), _) | (None, Some(d)) => {
                verify(&format!("{request}: manifest"), d, &bytes)?;
                d.to_string()
            }
            (None, None) => sha256_digest(&bytes),
        };
        let generic = |t: &str| t.is_empty() || t == "application/json" || t == "text/plain";
        let media_type = match content_type.filter(|t| !generic(t)) {
            Some(t) => t,
            None => {
                #[derive(serde::Deserialize)]
                #[serde(rename_all = "camelCase")]
                struct Typed {
                    media_type: Option<String>,
                }
                serde_json::from_slice::<Typed>(&bytes)
                    .ok()
                    .and_then(|t| t.media_type)
                    .ok_or_else(|| Error::protocol(&request, "no Content-Type and no mediaType in the manifest"))?
            }
        };
        Ok(RawManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// Stores a manifest under the reference's tag (or digest); returns its digest.
    ///
    /// Every blob and manifest it refers to must already be in the repository.
    pub fn put_manifest(&self, reference: &Reference, media_type: &str, bytes: &[u8]) -> Result<String> {
        self.each(reference.repo(), Need::Push, |ep| {
            self.put_manifest_to(ep, reference, media_type, bytes)
        })
    }

    fn put_manifest_to(&self, ep: &Endpoint, reference: &Reference, media_type: &str, bytes: &[u8]) -> Result<String> {
        self.put_manifest_subject(ep, reference, media_type, bytes)
            .map(|(digest, _)| digest)
    }

    /// [`Client::put_manifest`] to one host; also returns the `OCI-Subject` header of the answer, by which
    /// a registry with the referrers API says it indexed the manifest's `subject`.
    pub(crate) fn put_manifest_subject(
        &self,
        ep: &Endpoint,
        reference: &Reference,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(String, Option<String>)> {
        let url = self.url(ep, reference.repo(), &format!("manifests/{}", reference.locator()))?;
        let request = describe(&Method::PUT, &url);
        let digest = match reference.digest() {
            Some(d) => {
                verify(&format!("{request}: manifest"), d, bytes)?;
                d.to_string()
            }
            None => sha256_digest(bytes),
        };
        let scope = Scope::push(ep, reference.repo());
        let headers = [("Content-Type", media_type)];
        let resp = self.send(
            ep,
            Method::PUT,
            &url,
            Some(&scope),
            &headers,
            ReqBody::Bytes(bytes),
            true,
        )?;
        let resp = expect(&request, resp, &[200, 201, 202, 204])?;
        // A registry that rewrote the manifest would store something else than the caller's bytes.
        if let Some(theirs) = header(&resp, "docker-content-digest") {
            if theirs.split(':').next() == digest.split(':').next() && theirs != digest {
                return Err(Error::DigestMismatch {
                    what: format!("{request}: Docker-Content-Digest"),
                    expected: digest,
                    actual: theirs.to_string(),
                });
            }
        }
        let subject = header(&resp, "oci-subject").map(str::to_string);
        Ok((digest, subject))
    }

    /// Streams a blob; see [`Blob`] for when its digest is checked.
    pub fn get_blob(&self, repo: &Repository, digest: &str) -> Result<Blob> {
        validate_digest(digest)?;
        self.each(repo, Need::Pull, |ep| self.get_blob_from(ep, repo, digest))
    }

    fn get_blob_from(&self, ep: &Endpoint, repo: &Repository, digest: &str) -> Result<Blob> {
        let url = self.url(ep, repo, &format!("blobs/{digest}"))?;
        let request = describe(&Method::GET, &url);
        let scope = Scope::pull(ep, repo);
        let resp = self.send(ep, Method::GET, &url, Some(&scope), &[], ReqBody::Empty, true)?;
        let resp = expect(&request, resp, &[200])?;
        let size = header(&resp, "content-length").and_then(|l| l.parse().ok());
        let reader = resp.into_body().into_reader();
        Ok(Blob {
            inner: VerifyingReader::new(reader, digest, format!("{request}: blob"))?,
            size,
        })
    }

    /// Reads `len` bytes of a blob from `offset` (an HTTP Range request).
    ///
    /// Like `pread`, it returns fewer bytes only when the range passes the end of the blob, and none when
    /// `offset` is at or past it. Ranges are not verified against the digest (they cannot be).
    pub fn get_blob_range(&self, repo: &Repository, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        validate_digest(digest)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let last = offset
            .checked_add(len - 1)
            .ok_or_else(|| Error::invalid("range", &format!("{offset}+{len}"), "overflows"))?;
        self.each(repo, Need::Pull, |ep| {
            self.get_range_from(ep, repo, digest, offset, len, last)
        })
    }

    fn get_range_from(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        digest: &str,
        offset: u64,
        len: u64,
        last: u64,
    ) -> Result<Vec<u8>> {
        let url = self.url(ep, repo, &format!("blobs/{digest}"))?;
        let request = format!("{} bytes={offset}-{last}", describe(&Method::GET, &url));
        let range = format!("bytes={offset}-{last}");
        let resp = self.send(
            ep,
            Method::GET,
            &url,
            Some(&Scope::pull(ep, repo)),
            &[("Range", &range)],
            ReqBody::Empty,
            true,
        )?;
        match resp.status().as_u16() {
            206 => {
                let content_range = header(&resp, "content-range").unwrap_or_default().to_string();
                let (start, end) = parse_content_range(&content_range)
                    .filter(|&(s, e)| s == offset && e >= s && e <= last)
                    .ok_or_else(|| Error::protocol(&request, format!("bad Content-Range {content_range:?}")))?;
                let want = end - start + 1;
                let data = read_exact_body(&request, resp, want)?;
                Ok(data)
            }
            // The registry (or a proxy or redirect target) ignored the Range: skip to it in the whole blob.
            200 => {
                let mut body = resp.into_body().into_reader();
                let skipped = io::copy(&mut (&mut body).take(offset), &mut io::sink()).map_err(|e| Error::Io {
                    what: request.clone(),
                    source: e,
                })?;
                if skipped < offset {
                    return Ok(Vec::new());
                }
                let mut data = Vec::with_capacity(len.min(16 << 20) as usize);
                body.take(len).read_to_end(&mut data).map_err(|e| Error::Io {
                    what: request.clone(),
                    source: e,
                })?;
                Ok(data)
            }
            416 => Ok(Vec::new()),
            _ => Err(error_from(&request, resp)),
        }
    }

    /// The blob's size if the repository has it, `None` if not (a HEAD request).
    pub fn blob_exists(&self, repo: &Repository, digest: &str) -> Result<Option<u64>> {
        validate_digest(digest)?;
        self.each(repo, Need::Pull, |ep| {
            self.head_blob(ep, repo, digest, &Scope::pull(ep, repo))
        })
    }

    /// Uploads a blob of `size` bytes read from `reader`, unless the repository has it already.
    ///
    /// Reads exactly `size` bytes (a shorter reader is an error) and checks their digest on the way; the
    /// body is streamed in one PUT, so this is not retried: the caller can, with a fresh reader.
    pub fn push_blob(&self, repo: &Repository, digest: &str, size: u64, reader: impl Read) -> Result<BlobPush> {
        validate_digest(digest)?;
        let mut reader = Some(reader);
        self.each(repo, Need::Push, |ep| {
            let scope = Scope::push(ep, repo);
            if self.head_blob(ep, repo, digest, &scope)?.is_some() {
                return Ok(BlobPush::Existed);
            }
            let session = self
                .start_upload(ep, repo, &scope, None)?
                .expect("only mounts complete at once");
            let reader = reader.take().expect("pushes go to one host");
            self.upload(ep, &scope, session, digest, size, reader)?;
            Ok(BlobPush::Uploaded)
        })
    }

    /// Asks the registry to link a blob from another repository of the same registry (no data moves).
    ///
    /// `false` when it would not (the source lacks the blob, or the registry does not mount): then push
    /// it with [`Client::push_blob`], or use [`Client::mount_or_push_blob`] which does both.
    pub fn mount_blob(&self, repo: &Repository, from: &Repository, digest: &str) -> Result<bool> {
        validate_digest(digest)?;
        self.each(repo, Need::Push, |ep| {
            let scope = mount_scope(ep, repo, from)?;
            match self.start_upload(ep, repo, &scope, Some((digest, from)))? {
                None => Ok(true),
                Some(session) => {
                    // The registry opened a plain upload instead; nothing will be sent to it.
                    self.cancel_upload(ep, &scope, session);
                    Ok(false)
                }
            }
        })
    }

    /// Puts a blob into `repo` the cheapest way: nothing if it is there, a mount from `from` if the
    /// registry does one, else an upload through the session the refused mount opened.
    pub fn mount_or_push_blob(
        &self,
        repo: &Repository,
        from: &Repository,
        digest: &str,
        size: u64,
        reader: impl Read,
    ) -> Result<BlobPush> {
        validate_digest(digest)?;
        let mut reader = Some(reader);
        self.each(repo, Need::Push, |ep| {
            let scope = mount_scope(ep, repo, from)?;
            if self.head_blob(ep, repo, digest, &scope)?.is_some() {
                return Ok(BlobPush::Existed);
            }
            match self.start_upload(ep, repo, &scope, Some((digest, from)))? {
                None => Ok(BlobPush::Mounted),
                Some(session) => {
                    let reader = reader.take().expect("pushes go to one host");
                    self.upload(ep, &scope, session, digest, size, reader)?;
                    Ok(BlobPush::Uploaded)
                }
            }
        })
    }

    fn head_blob(&self, ep: &Endpoint, repo: &Repository, digest: &str, scope: &Scope) -> Result<Option<u64>> {
        let url = self.url(ep, repo, &format!("blobs/{digest}"))?;
        let request = describe(&Method::HEAD, &url);
        let resp = self.send(ep, Method::HEAD, &url, Some(scope), &[], ReqBody::Empty, true)?;
        match resp.status().as_u16() {
            200 => header(&resp, "content-length")
                .and_then(|l| l.parse().ok())
                .map(Some)
                .ok_or_else(|| Error::protocol(&request, "no Content-Length")),
            404 => Ok(None),
            _ => Err(error_from(&request, resp)),
        }
    }

    /// POSTs to the uploads endpoint: `None` when a mount completed, else the upload session's URL.
    fn start_upload(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        scope: &Scope,
        mount: Option<(&str, &Repository)>,
    ) -> Result<Option<Url>> {
        let mut url = self.url(ep, repo, "blobs/uploads/")?;
        if let Some((digest, from)) = mount {
            url.query_pairs_mut()
                .append_pair("mount", digest)
                .append_pair("from", from.name());
        }
        let request = describe(&Method::POST, &url);
        // Retrying the POST is safe: an abandoned upload session is only garbage on the registry.
        let resp = self.send(ep, Method::POST, &url, Some(scope), &[], ReqBody::Bytes(&[]), true)?;
        match resp.status().as_u16() {
            201 if mount.is_some() => Ok(None),
            202 => {
                let location =
                    header(&resp, "location").ok_or_else(|| Error::protocol(&request, "202 without Location"))?;
                let session = url
                    .join(location)
                    .map_err(|e| Error::protocol(&request, format!("bad Location {location:?}: {e}")))?;
                Ok(Some(session))
            }
            _ => Err(error_from(&request, resp)),
        }
    }

    /// Completes an upload session with one PUT carrying the whole blob.
    fn upload(
        &self,
        ep: &Endpoint,
        scope: &Scope,
        session: Url,
        digest: &str,
        size: u64,
        reader: impl Read,
    ) -> Result<()> {
        let mut url = session.clone();
        // Appends to the session's own query (`_state=...`), which must be sent back as it came.
        url.query_pairs_mut().append_pair("digest", digest);
        let request = describe(&Method::PUT, &url);
        let mut src = UploadReader::new(reader, Hasher::for_digest(digest)?, size);
        let headers = [("Content-Type", "application/octet-stream")];
        let result = self.send(
            ep,
            Method::PUT,
            &url,
            Some(scope),
            &headers,
            ReqBody::Stream(&mut src, size),
            false,
        );
        // The local reader's faults explain a failed PUT better than the registry's view of them.
        let local = if src.short {
            let msg = format!("blob reader ended after {} of {size} bytes", size - src.left);
            Some(Error::Io {
                what: request.clone(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, msg),
            })
        } else {
            match src.actual.take() {
                Some(actual) if actual != digest => Some(Error::DigestMismatch {
                    what: format!("{request}: local blob"),
                    expected: digest.to_string(),
                    actual,
                }),
                _ => None,
            }
        };
        let result = match (local, result) {
            (Some(e), _) => Err(e),
            (None, Err(e)) => Err(e),
            (None, Ok(resp)) => expect(&request, resp, &[201, 204]).map(drop),
        };
        if result.is_err() {
            self.cancel_upload(ep, scope, session);
        }
        result
    }

    /// Best effort: a session left open only costs the registry some storage until its GC.
    fn cancel_upload(&self, ep: &Endpoint, scope: &Scope, session: Url) {
        match self.send(ep, Method::DELETE, &session, Some(scope), &[], ReqBody::Empty, false) {
            Ok(resp) => debug!(status = resp.status().as_u16(), "cancelled upload session"),
            Err(e) => debug!(error = %e, "cancelling upload session failed"),
        }
    }

    pub(crate) fn url(&self, ep: &Endpoint, repo: &Repository, path: &str) -> Result<Url> {
        let s = format!("{}/{}/{}", ep.api, repo.name(), path);
        let mut url = Url::parse(&s).map_err(|e| Error::invalid("registry URL", &s, e.to_string()))?;
        if let Some(ns) = &ep.ns {
            url.query_pairs_mut().append_pair("ns", ns);
        }
        Ok(url)
    }

    fn base(&self, host: &str) -> String {
        let bare = strip_port(host);
        let plain = self
            .options
            .plain_http
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host) || h.eq_ignore_ascii_case(bare));
        format!("{}://{host}", if plain { "http" } else { "https" })
    }

    fn auth_cache(&self) -> MutexGuard<'_, AuthCache> {
        self.auth.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a request, retrying transient failures when `retry` is set and the body can be sent again,
    /// and answering one authentication challenge. Returns any response that is not retried, error
    /// statuses included: callers decide which statuses they expect.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send(
        &self,
        ep: &Endpoint,
        method: Method,
        url: &Url,
        scope: Option<&Scope>,
        headers: &[(&str, &str)],
        mut body: ReqBody<'_>,
        retry: bool,
    ) -> Result<Response<ureq::Body>> {
        let request = describe(&method, url);
        let replayable = !matches!(body, ReqBody::Stream(..));
        let attempts = if retry && replayable { self.retries + 1 } else { 1 };
        // Credentials go only to the registry itself, not to wherever a Location header points.
        let scope = scope.filter(|s| same_origin(url, &s.origin));
        // hosts.toml's headers are for the host, not for token endpoints or redirect targets.
        let host_headers = if same_origin(url, &ep.origin) {
            ep.headers.as_slice()
        } else {
            &[]
        };
        let mut attempt = 0;
        let mut challenged = false;
        loop {
            attempt += 1;
            let authorization = match scope {
                Some(s) => self.authorization(ep, s)?,
                None => None,
            };
            let mut builder = http::Request::builder().method(method.clone()).uri(url.as_str());
            for (k, v) in headers {
                builder = builder.header(*k, *v);
            }
            for (k, v) in host_headers {
                builder = builder.header(k.as_str(), v.as_str());
            }
            if let Some(a) = &authorization {
                builder = builder.header("Authorization", a);
            }
            let built = |e: http::Error| Error::protocol(&request, format!("cannot build request: {e}"));
            let result = match &mut body {
                ReqBody::Empty => ep.agent.run(builder.body(()).map_err(built)?),
                ReqBody::Bytes(bytes) => ep.agent.run(builder.body(*bytes).map_err(built)?),
                ReqBody::Stream(reader, len) => {
                    let req = builder
                        .header("Content-Length", *len)
                        .body(SendBody::from_reader(*reader));
                    ep.agent.run(req.map_err(built)?)
                }
            };
            let resp = match result {
                Ok(resp) => resp,
                Err(e) if attempt < attempts && transient(&e) => {
                    let wait = backoff(attempt);
                    debug!(%request, error = %e, ?wait, "retrying");
                    std::thread::sleep(wait);
                    continue;
                }
                Err(e) => {
                    return Err(Error::Transport {
                        request,
                        source: Box::new(e),
                    })
                }
            };
            let status = resp.status().as_u16();
            debug!(%request, status, "registry answered");
            if status == 401 && !challenged {
                if let Some(s) = scope {
                    challenged = true;
                    if self.on_challenge(ep, s, &resp, authorization.as_deref())? && replayable {
                        // Not a retry of a failure: the first try is expected to be refused.
                        attempt -= 1;
                        continue;
                    }
                }
            }
            if (status == 429 || status >= 500) && attempt < attempts {
                let wait = retry_after(&resp).unwrap_or_else(|| backoff(attempt));
                debug!(%request, status, ?wait, "retrying");
                std::thread::sleep(wait);
                continue;
            }
            return Ok(resp);
        }
    }

    /// The Authorization header for a request in `scope`, from what its host asked for before.
    ///
    /// Sending it up front saves the 401 round trip, and is what makes streamed uploads work at all: their
    /// body cannot be sent a second time after a challenge.
    fn authorization(&self, ep: &Endpoint, scope: &Scope) -> Result<Option<String>> {
        let host_auth = self.auth_cache().hosts.get(&scope.host).cloned();
        match host_auth {
            None => Ok(None),
            Some(HostAuth::Basic) => Ok(self.creds.lookup(&scope.registry)?.and_then(|c| c.basic_header())),
            Some(HostAuth::Bearer { realm, service }) => {
                if let Some(token) = self.auth_cache().token(&scope.host, &scope.key()) {
                    return Ok(Some(format!("Bearer {token}")));
                }
                let token = self.fetch_token(ep, scope, &realm, service.as_deref(), None)?;
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    /// Learns from a 401's challenge; true if sending the request again with new credentials can help.
    fn on_challenge(
        &self,
        ep: &Endpoint,
        scope: &Scope,
        resp: &Response<ureq::Body>,
        sent: Option<&str>,
    ) -> Result<bool> {
        let challenges: Vec<Challenge> = resp
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
            let Some(realm) = c.params.get("realm") else {
                return Ok(false);
            };
            let service = c.params.get("service").cloned();
            {
                let mut cache = self.auth_cache();
                cache.hosts.insert(
                    scope.host.clone(),
                    HostAuth::Bearer {
                        realm: realm.clone(),
                        service: service.clone(),
                    },
                );
                // Whatever token was sent is expired or short of the scope: never send it again.
                cache.tokens.remove(&(scope.host.clone(), scope.key()));
            }
            self.fetch_token(
                ep,
                scope,
                realm,
                service.as_deref(),
                c.params.get("scope").map(String::as_str),
            )?;
            return Ok(true);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let already_sent = sent.is_some_and(|s| s.starts_with("Basic "));
            let basic = self.creds.lookup(&scope.registry)?.and_then(|c| c.basic_header());
            if already_sent || basic.is_none() {
                return Ok(false);
            }
            self.auth_cache().hosts.insert(scope.host.clone(), HostAuth::Basic);
            return Ok(true);
        }
        Ok(false)
    }

    /// Gets a bearer token for `scope` (plus the challenge's own scope) and caches it.
    ///
    /// With an identity token this is the OAuth2 refresh-token grant (a form POST, as the distribution
    /// token spec has it); otherwise a GET, with Basic credentials when there are some.
    fn fetch_token(
        &self,
        ep: &Endpoint,
        scope: &Scope,
        realm: &str,
        service: Option<&str>,
        extra: Option<&str>,
    ) -> Result<String> {
        let mut url = Url::parse(realm)
            .map_err(|e| Error::protocol(&format!("token realm {realm:?}"), format!("bad URL: {e}")))?;
        let mut scopes: Vec<&str> = scope.scopes.iter().map(String::as_str).collect();
        if let Some(extra) = extra.filter(|e| !scopes.contains(e)) {
            scopes.push(extra);
        }
        let creds = self.creds.lookup(&scope.registry)?;
        let (request, resp) = if let Some(Credentials::IdentityToken(refresh)) = &creds {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "refresh_token")
                .append_pair("refresh_token", refresh)
                .append_pair("client_id", "dedup-snapshotter");
            if let Some(service) = service {
                form.append_pair("service", service);
            }
            // The spec's form takes the scopes space-separated in one field.
            form.append_pair("scope", &scopes.join(" "));
            let form = form.finish();
            let headers = [("Content-Type", "application/x-www-form-urlencoded")];
            let request = describe(&Method::POST, &url);
            let resp = self.send(
                ep,
                Method::POST,
                &url,
                None,
                &headers,
                ReqBody::Bytes(form.as_bytes()),
                true,
            )?;
            (request.clone(), expect(&request, resp, &[200])?)
        } else {
            {
                let mut query = url.query_pairs_mut();
                if let Some(service) = service {
                    query.append_pair("service", service);
                }
                for s in &scopes {
                    query.append_pair("scope", s);
                }
            }
            let basic = creds.and_then(|c| c.basic_header());
            let mut headers = Vec::new();
            if let Some(b) = &basic {
                headers.push(("Authorization", b.as_str()));
            }
            let request = describe(&Method::GET, &url);
            let resp = self.send(ep, Method::GET, &url, None, &headers, ReqBody::Empty, true)?;
            (request.clone(), expect(&request, resp, &[200])?)
        };
        let body = read_body(&request, resp, MAX_SMALL_BODY)?;
        let token = serde_json::from_slice::<TokenResponse>(&body)
            .ok()
            .and_then(TokenResponse::into_token)
            .ok_or_else(|| Error::protocol(&request, "no token in the answer"))?;
        debug!(host = %scope.host, scope = %scope.key(), "got a registry token");
        let value = token.value.clone();
        self.auth_cache()
            .tokens
            .insert((scope.host.clone(), scope.key()), token);
        Ok(value)
    }
}

fn mount_scope(ep: &Endpoint, repo: &Repository, from: &Repository) -> Result<Scope> {
    if repo.registry() != from.registry() {
        return Err(Error::invalid(
            "mount source",
            &from.to_string(),
            format!("not on {}", repo.registry()),
        ));
    }
    let mut scope = Scope::push(ep, repo);
    scope.scopes.push(format!("repository:{}:pull", from.name()));
    Ok(scope)
}

/// Counts and hashes what an upload sends, and refuses to end before `left` reaches 0.
struct UploadReader<R> {
    inner: R,
    hasher: Option<Hasher>,
    left: u64,
    /// The digest of what was sent, once all of it was.
    actual: Option<String>,
    /// The reader ended before `left` reached 0.
    short: bool,
}

impl<R> UploadReader<R> {
    fn new(inner: R, hasher: Hasher, size: u64) -> Self {
        let mut r = UploadReader {
            inner,
            hasher: Some(hasher),
            left: size,
            actual: None,
            short: false,
        };
        if size == 0 {
            r.actual = r.hasher.take().map(Hasher::finish);
        }
        r
    }
}

impl<R: Read> Read for UploadReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let max = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            self.short = true;
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "blob reader ended early"));
        }
        self.left -= n as u64;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        if self.left == 0 {
            self.actual = self.hasher.take().map(Hasher::finish);
        }
        Ok(n)
    }
}

pub(crate) fn describe(method: &Method, url: &Url) -> String {
    let s = url.as_str();
    // Upload URLs carry a long opaque `_state`: keep error messages readable.
    match url.query() {
        Some(q) if q.len() > 100 => format!("{method} {}?...", &s[..s.len() - q.len() - 1]),
        _ => format!("{method} {s}"),
    }
}

pub(crate) fn header<'a>(resp: &'a Response<ureq::Body>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

pub(crate) fn expect(request: &str, resp: Response<ureq::Body>, ok: &[u16]) -> Result<Response<ureq::Body>> {
    if ok.contains(&resp.status().as_u16()) {
        Ok(resp)
    } else {
        Err(error_from(request, resp))
    }
}

fn error_from(request: &str, resp: Response<ureq::Body>) -> Error {
    let status = resp.status().as_u16();
    // The body is only decoration here: a failure to read it must not hide the status.
    let body = resp
        .into_body()
        .with_config()
        .limit(MAX_SMALL_BODY)
        .read_to_vec()
        .unwrap_or_default();
    status_error(request, status, &body)
}

fn read_body(request: &str, resp: Response<ureq::Body>, limit: u64) -> Result<Vec<u8>> {
    resp.into_body()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| Error::Transport {
            request: request.to_string(),
            source: Box::new(e),
        })
}

fn read_exact_body(request: &str, resp: Response<ureq::Body>, len: u64) -> Result<Vec<u8>> {
    let mut data = Vec::with_capacity(len.min(16 << 20) as usize);
    resp.into_body()
        .into_reader()
        .take(len)
        .read_to_end(&mut data)
        .map_err(|e| Error::Io {
            what: request.to_string(),
            source: e,
        })?;
    if data.len() as u64 != len {
        return Err(Error::protocol(
            request,
            format!("body has {} bytes, Content-Range said {len}", data.len()),
        ));
    }
    Ok(data)
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`) → (START, END).
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let range = v.trim().strip_prefix("bytes")?.trim_start();
    let (span, _total) = range.split_once('/')?;
    let (start, end) = span.split_once('-')?;
    Some((start.trim().parse().ok()?, end.trim().parse().ok()?))
}

fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn same_origin(url: &Url, base: &str) -> bool {
    Url::parse(base).is_ok_and(|b| {
        b.scheme() == url.scheme()
            && b.host_str() == url.host_str()
            && b.port_or_known_default() == url.port_or_known_default()
    })
}

fn transient(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_) | ureq::Error::Timeout(_) | ureq::Error::ConnectionFailed | ureq::Error::Protocol(_)
    )
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64 << attempt.min(5)).min(Duration::from_secs(5))
}

/// `Retry-After` in seconds (the HTTP-date form is rare from registries and ignored), capped so a
/// confused server cannot park a caller for long.
fn retry_after(resp: &Response<ureq::Body>) -> Option<Duration> {
    let secs: u64 = header(resp, "retry-after")?.parse().ok()?;
    Some(Duration::from_secs(secs.min(30)))
}

/// An agent for `options`, with `host`'s TLS settings, connect timeout and proxy when given.
///
/// Servers are verified against the system's trust roots (plus the host's CAs): what the machine's
/// administrator installed is what a registry behind a corporate CA needs.
fn new_agent(options: &ClientOptions, host: Option<&HostEntry>) -> Result<ureq::Agent> {
    use ureq::tls::{ClientCert, RootCerts, TlsConfig};
    let t = Some(options.timeout);
    let connect = host
        .and_then(|h| h.dial_timeout)
        .unwrap_or(options.connect_timeout)
        .min(options.timeout);
    let mut roots: Vec<ureq::tls::Certificate<'static>> = system_roots().to_vec();
    let mut tls = TlsConfig::builder();
    if let Some(h) = host {
        roots.extend(h.ca.iter().cloned());
        if let Some(id) = &h.client {
            tls = tls.client_cert(Some(ClientCert::new_with_certs(&id.chain, id.key.to_owned())));
        }
        tls = tls.disable_verification(h.skip_verify);
    }
    // A machine without a CA bundle still reaches public registries, through Mozilla's roots.
    let roots = if roots.is_empty() {
        RootCerts::WebPki
    } else {
        RootCerts::Specific(Arc::new(roots))
    };
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(connect))
        .timeout_per_read(t)
        .timeout_per_write(t)
        .tls_config(tls.root_certs(roots).build())
        .user_agent(concat!("dedup-snapshotter-registry/", env!("CARGO_PKG_VERSION")));
    if let Some(proxy) = host.and_then(|h| h.proxy.as_deref()) {
        let proxy = ureq::Proxy::new(proxy).map_err(|e| Error::invalid("proxy", proxy, e.to_string()))?;
        config = config.proxy(Some(proxy));
    }
    Ok(ureq::Agent::new_with_config(config.build()))
}

/// The system's trust roots (`SSL_CERT_FILE`/`SSL_CERT_DIR`, else the distribution's bundle), read
/// once per process; empty when there are none.
fn system_roots() -> &'static [ureq::tls::Certificate<'static>] {
    static ROOTS: OnceLock<Vec<ureq::tls::Certificate<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            debug!(error = %e, "reading the system's trust roots");
        }
        if found.certs.is_empty() {
            warn!("no system trust roots found: using the compiled-in Mozilla roots");
        }
        found
            .certs
            .iter()
            .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_range() {
        assert_eq!(parse_content_range("bytes 0-99/1000"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn plain_http_for_loopback_by_default() {
        let client = Client::new(ClientOptions {
            docker_config: Some(empty_config()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(client.base("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(client.base("localhost"), "http://localhost");
        assert_eq!(client.base("[::1]:80"), "http://[::1]:80");
        assert_eq!(client.base("registry.example:5000"), "https://registry.example:5000");
        let client = Client::new(ClientOptions {
            plain_http: vec!["reg.lan:5000".into()],
            docker_config: Some(empty_config()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(client.base("reg.lan:5000"), "http://reg.lan:5000");
        assert_eq!(client.base("reg.lan:5001"), "https://reg.lan:5001");
        assert_eq!(client.base("127.0.0.1:5000"), "https://127.0.0.1:5000");
    }

    fn empty_config() -> PathBuf {
        let path = std::env::temp_dir().join(format!("registry-unit-{}.json", std::process::id()));
        std::fs::write(&path, "{}").unwrap();
        path
    }

    #[test]
    fn origin_check() {
        let u = Url::parse("http://127.0.0.1:5000/v2/x/blobs/uploads/abc?_state=1").unwrap();
        assert!(same_origin(&u, "http://127.0.0.1:5000"));
        assert!(!same_origin(&u, "http://127.0.0.1:5001"));
        assert!(!same_origin(&u, "https://127.0.0.1:5000"));
        let u = Url::parse("https://r.example/v2/").unwrap();
        assert!(same_origin(&u, "https://r.example:443"));
    }

    #[test]
    fn describes_long_queries_briefly() {
        let u = Url::parse(&format!(
            "http://h/v2/x/blobs/uploads/u?_state={}&digest=d",
            "s".repeat(200)
        ))
        .unwrap();
        assert_eq!(describe(&Method::PUT, &u), "PUT http://h/v2/x/blobs/uploads/u?...");
        let u = Url::parse("http://h/v2/x/blobs/uploads/?mount=a&from=b").unwrap();
        assert_eq!(
            describe(&Method::POST, &u),
            "POST http://h/v2/x/blobs/uploads/?mount=a&from=b"
        );
    }

    #[test]
    fn upload_reader_enforces_size() {
        let data = b"hello world";
        let mut r = UploadReader::new(&data[..], Hasher::for_digest(&sha256_digest(b"hello")).unwrap(), 5);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"hello");
        assert_eq!(r.actual.as_deref(), Some(sha256_digest(b"hello").as_str()));
        let mut short = UploadReader::new(&data[..3], Hasher::for_digest(&sha256_digest(b"")).unwrap(), 5);
        assert_eq!(
            short.read_to_end(&mut Vec::new()).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(short.short);
        let empty = UploadReader::new(&data[..], Hasher::for_digest(&sha256_digest(b"")).unwrap(), 0);
        assert_eq!(empty.actual.as_deref(), Some(sha256_digest(b"").as_str()));
    }
}
