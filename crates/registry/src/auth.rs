//! Credentials from the docker config file and its credential helpers, `WWW-Authenticate` challenges, and the token cache.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::reference::DOCKER_HUB;

/// What the docker config (or its credential helper) holds for a registry.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Credentials {
    /// A user name and password: sent as Basic auth, to the registry or to its token endpoint.
    Basic { username: String, password: String },
    /// An identity token (`identitytoken`, or a helper's `<token>` user): an OAuth2 refresh token,
    /// exchanged at the token endpoint for access tokens.
    IdentityToken(String),
}

impl Credentials {
    /// The Basic Authorization header, for credentials that have a password.
    pub(crate) fn basic_header(&self) -> Option<String> {
        match self {
            Credentials::Basic { username, password } => {
                let raw = format!("{username}:{password}");
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                ))
            }
            Credentials::IdentityToken(_) => None,
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Basic { username, .. } => write!(f, "Credentials({username}:***)"),
            Credentials::IdentityToken(_) => write!(f, "Credentials(identity token)"),
        }
    }
}

/// How long a credential helper's answer is reused: helpers are processes (and some hand out
/// short-lived secrets), and a host that wants Basic auth asks for credentials on every request.
const HELPER_CACHE: Duration = Duration::from_secs(300);
/// How long a credential helper may take before it is killed and the lookup fails.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// The credentials of a docker config file: `auths` (keyed by normalized registry host), and the
/// credential helpers (`credHelpers` per host, else `credsStore`).
///
/// Helpers are run here with `std::process` rather than through the `docker_credential` crate: it
/// waits on a helper without a time limit (a helper stuck on a keychain prompt would hang a lazy
/// layer's reads for good), and reports "no credentials" and a failing helper the same way.
#[derive(Debug, Default)]
pub(crate) struct DockerConfig {
    auths: HashMap<String, Credentials>,
    creds_store: Option<String>,
    cred_helpers: HashMap<String, String>,
    helper_answers: Mutex<HashMap<String, (Instant, Option<Credentials>)>>,
}

impl DockerConfig {
    /// Loads `explicit` (which must exist), else `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`
    /// (either may be missing: then there are no credentials).
    pub(crate) fn load(explicit: Option<&Path>) -> Result<DockerConfig> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => match default_path() {
                Some(p) if p.exists() => p,
                _ => return Ok(DockerConfig::default()),
            },
        };
        let data = std::fs::read(&path).map_err(|e| Error::Config {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        DockerConfig::parse(&data).map_err(|msg| Error::Config { path, msg })
    }

    pub(crate) fn parse(data: &[u8]) -> std::result::Result<DockerConfig, String> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct File {
            #[serde(default)]
            auths: HashMap<String, Entry>,
            creds_store: Option<String>,
            #[serde(default)]
            cred_helpers: HashMap<String, String>,
        }
        #[derive(Deserialize)]
        struct Entry {
            auth: Option<String>,
            username: Option<String>,
            password: Option<String>,
            identitytoken: Option<String>,
        }
        let file: File = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        let mut auths = HashMap::new();
        for (key, entry) in file.auths {
            let creds = if let Some(token) = entry.identitytoken.filter(|t| !t.is_empty()) {
                // `docker login` stores the refresh token next to an `auth` with an empty password.
                Credentials::IdentityToken(token)
            } else if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| format!("auths[{key:?}].auth: {e}"))?;
                let raw = String::from_utf8(raw).map_err(|_| format!("auths[{key:?}].auth: not UTF-8"))?;
                let (u, p) = raw
                    .split_once(':')
                    .ok_or_else(|| format!("auths[{key:?}].auth: expected user:password"))?;
                Credentials::Basic {
                    username: u.to_string(),
                    password: p.to_string(),
                }
            } else if let (Some(u), Some(p)) = (entry.username, entry.password) {
                Credentials::Basic {
                    username: u,
                    password: p,
                }
            } else {
                // Entries filled by a credential helper carry no secret here.
                continue;
            };
            auths.insert(normalize_host(&key), creds);
        }
        let cred_helpers = file
            .cred_helpers
            .into_iter()
            .filter(|(_, h)| !h.is_empty())
            .map(|(k, h)| (normalize_host(&k), h))
            .collect();
        Ok(DockerConfig {
            auths,
            creds_store: file.creds_store.filter(|s| !s.is_empty()),
            cred_helpers,
            helper_answers: Mutex::new(HashMap::new()),
        })
    }

    /// The credentials for `registry`: from its credential helper (`credHelpers`, else
    /// `credsStore`), else from `auths`. A helper that has none is not an error; one that fails is.
    pub(crate) fn lookup(&self, registry: &str) -> Result<Option<Credentials>> {
        let host = normalize_host(registry);
        let helper = self.cred_helpers.get(&host).or(self.creds_store.as_ref());
        if let Some(helper) = helper {
            if let Some(found) = self.ask_helper(helper, &host)? {
                return Ok(Some(found));
            }
        }
        Ok(self.auths.get(&host).cloned())
    }

    fn ask_helper(&self, helper: &str, host: &str) -> Result<Option<Credentials>> {
        let key = format!("{helper}\0{host}");
        if let Some((at, answer)) = self.helper_answers.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            if at.elapsed() < HELPER_CACHE {
                return Ok(answer.clone());
            }
        }
        // What `docker login` stored the credentials under: Docker Hub's legacy URL, else the host.
        let server = if host == DOCKER_HUB {
            "https://index.docker.io/v1/"
        } else {
            host
        };
        let answer = run_helper(helper, server, HELPER_TIMEOUT)?;
        self.helper_answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (Instant::now(), answer.clone()));
        Ok(answer)
    }
}

/// Runs `docker-credential-HELPER get` with `server` on stdin (the credential helper protocol) and
/// reads `{"Username": …, "Secret": …}`; `None` when the helper has no credentials for it.
pub(crate) fn run_helper(helper: &str, server: &str, timeout: Duration) -> Result<Option<Credentials>> {
    let fail = |msg: String| Error::CredentialHelper {
        helper: helper.to_string(),
        server: server.to_string(),
        msg,
    };
    let program = format!("docker-credential-{helper}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run {program}: {e}")))?;
    // The helper reads all of stdin before it answers; a write error shows up as its exit status.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let read_all = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(r) = r {
                let _ = r.take(1 << 20).read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = read_all(child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let stderr = read_all(child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("no answer within {timeout:?}; killed")));
            }
            Err(e) => return Err(fail(format!("waiting for {program}: {e}"))),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    if !status.success() {
        let (out, err) = (text(&stdout), text(&stderr));
        // docker-credential-helpers' errCredentialsNotFound message.
        if out.contains("credentials not found") || err.contains("credentials not found") {
            return Ok(None);
        }
        let detail = if err.is_empty() { out } else { err };
        return Err(fail(format!("{status}: {detail}")));
    }
    #[derive(Deserialize)]
    struct Answer {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let a: Answer = serde_json::from_slice(&stdout).map_err(|e| fail(format!("bad answer: {e}")))?;
    if a.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(if a.username == "<token>" {
        Credentials::IdentityToken(a.secret)
    } else {
        Credentials::Basic {
            username: a.username,
            password: a.secret,
        }
    }))
}

fn default_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// `https://index.docker.io/v1/` → `docker.io`, `http://host:5000/x` → `host:5000`.
fn normalize_host(key: &str) -> String {
    let key = key.trim();
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB.to_string(),
        _ => host,
    }
}

/// One challenge from a `WWW-Authenticate` header.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Challenge {
    /// Lowercased: `bearer`, `basic`.
    pub scheme: String,
    /// Parameter names lowercased.
    pub params: HashMap<String, String>,
}

/// Parses `Bearer realm="https://auth/token",service="reg",scope="repository:a:pull", Basic realm="x"`.
///
/// A header may hold several challenges; a token not followed by `=` starts the next one.
pub(crate) fn parse_challenges(header: &str) -> Vec<Challenge> {
    let s = header.as_bytes();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let is_token = |b: u8| !b.is_ascii_whitespace() && b != b',' && b != b'=' && b != b'"';
    loop {
        while i < s.len() && (s[i].is_ascii_whitespace() || s[i] == b',') {
            i += 1;
        }
        let start = i;
        while i < s.len() && is_token(s[i]) {
            i += 1;
        }
        if start == i {
            break;
        }
        let token = &header[start..i];
        let mut j = i;
        while j < s.len() && s[j].is_ascii_whitespace() {
            j += 1;
        }
        if j < s.len() && s[j] == b'=' {
            i = j + 1;
            while i < s.len() && s[i].is_ascii_whitespace() {
                i += 1;
            }
            let mut value = String::new();
            if i < s.len() && s[i] == b'"' {
                i += 1;
                let mut seg = i;
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' && i + 1 < s.len() {
                        value.push_str(&header[seg..i]);
                        i += 1;
                        seg = i;
                    }
                    i += 1;
                }
                value.push_str(&header[seg..i]);
                i = (i + 1).min(s.len());
            } else {
                let vs = i;
                while i < s.len() && s[i] != b',' && !s[i].is_ascii_whitespace() {
                    i += 1;
                }
                value.push_str(&header[vs..i]);
            }
            if let Some(c) = out.last_mut() {
                c.params.insert(token.to_ascii_lowercase(), value);
            }
        } else {
            out.push(Challenge {
                scheme: token.to_ascii_lowercase(),
                params: HashMap::new(),
            });
        }
    }
    out
}

/// How a host wants to be authenticated, learnt from its last challenge.
#[derive(Debug, Clone)]
pub(crate) enum HostAuth {
    Basic,
    Bearer { realm: String, service: Option<String> },
}

#[derive(Debug)]
pub(crate) struct Token {
    pub value: String,
    pub expires: Instant,
}

/// Per-client auth state: what each host asked for, and bearer tokens per (host, scope).
#[derive(Debug, Default)]
pub(crate) struct AuthCache {
    pub hosts: HashMap<String, HostAuth>,
    pub tokens: HashMap<(String, String), Token>,
}

impl AuthCache {
    pub(crate) fn token(&mut self, host: &str, scope: &str) -> Option<String> {
        let key = (host.to_string(), scope.to_string());
        match self.tokens.get(&key) {
            Some(t) if t.expires > Instant::now() => Some(t.value.clone()),
            Some(_) => {
                self.tokens.remove(&key);
                None
            }
            None => None,
        }
    }
}

/// A token endpoint's answer.
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token and when to stop using it. Tokens without `expires_in` live 60 s (the spec's default);
    /// they are dropped a little early so a request does not carry one that expires in flight.
    pub(crate) fn into_token(self) -> Option<Token> {
        let value = self
            .token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))?;
        let life = Duration::from_secs(self.expires_in.unwrap_or(60).max(1));
        Some(Token {
            value,
            expires: Instant::now() + life.mul_f64(0.9),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(c: &Challenge) -> Vec<(&str, &str)> {
        let mut v: Vec<_> = c.params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        v.sort();
        v
    }

    #[test]
    fn parses_bearer_challenge() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(
            params(&c[0]),
            [
                ("realm", "https://auth.docker.io/token"),
                ("scope", "repository:library/busybox:pull,push"),
                ("service", "registry.docker.io")
            ]
        );
    }

    #[test]
    fn parses_several_challenges_and_odd_spacing() {
        let c =
            parse_challenges(r#"Basic realm="Registry Realm" , bearer Realm = "a\"b", error=invalid_token, Negotiate"#);
        assert_eq!(c.len(), 3);
        assert_eq!(
            (c[0].scheme.as_str(), params(&c[0])),
            ("basic", vec![("realm", "Registry Realm")])
        );
        assert_eq!(params(&c[1]), [("error", "invalid_token"), ("realm", "a\"b")]);
        assert_eq!(c[2].scheme, "negotiate");
        assert!(parse_challenges("").is_empty());
        assert_eq!(
            parse_challenges(r#"Bearer realm="unterminated"#)[0].params["realm"],
            "unterminated"
        );
    }

    #[test]
    fn reads_docker_config() {
        let cfg = DockerConfig::parse(
            br#"{"auths":{
                "https://index.docker.io/v1/":{"auth":"dTE6cDE="},
                "127.0.0.1:5000":{"auth":"dTI6cDI6d2l0aDpjb2xvbnM="},
                "http://Reg.Example:8443/v2/":{"username":"u3","password":"p3"},
                "helper.example":{},
                "token.example":{"auth":"dTQ6","identitytoken":"refresh-me"}
            }}"#,
        )
        .unwrap();
        let get = |h| match cfg.lookup(h).unwrap() {
            Some(Credentials::Basic { username, password }) => Some((username, password)),
            _ => None,
        };
        assert_eq!(get("docker.io"), Some(("u1".into(), "p1".into())));
        assert_eq!(get("registry-1.docker.io"), Some(("u1".into(), "p1".into())));
        assert_eq!(get("127.0.0.1:5000"), Some(("u2".into(), "p2:with:colons".into())));
        assert_eq!(get("reg.example:8443"), Some(("u3".into(), "p3".into())));
        assert_eq!(get("helper.example"), None);
        assert_eq!(get("127.0.0.1:5001"), None);
        assert_eq!(
            cfg.lookup("docker.io").unwrap().unwrap().basic_header().unwrap(),
            "Basic dTE6cDE="
        );
        let token = cfg.lookup("token.example").unwrap().unwrap();
        assert_eq!(token, Credentials::IdentityToken("refresh-me".into()));
        assert_eq!(token.basic_header(), None);
    }

    #[test]
    fn rejects_bad_docker_config() {
        assert!(DockerConfig::parse(b"{").is_err());
        assert!(DockerConfig::parse(br#"{"auths":{"h":{"auth":"!!"}}}"#).is_err());
        assert!(DockerConfig::parse(br#"{"auths":{"h":{"auth":"bm9jb2xvbg=="}}}"#).is_err());
        assert!(DockerConfig::parse(b"{}").unwrap().auths.is_empty());
    }

    #[test]
    fn token_expiry() {
        let t: TokenResponse = serde_json::from_str(r#"{"access_token":"abc","expires_in":300}"#).unwrap();
        let t = t.into_token().unwrap();
        assert_eq!(t.value, "abc");
        assert!(t.expires > Instant::now() + Duration::from_secs(200));
        let mut cache = AuthCache::default();
        cache.tokens.insert(
            ("h".into(), "s".into()),
            Token {
                value: "old".into(),
                expires: Instant::now(),
            },
        );
        assert_eq!(cache.token("h", "s"), None);
        assert!(cache.tokens.is_empty());
        let t: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert!(t.into_token().is_none());
    }
}
