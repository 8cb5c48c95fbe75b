//! Credentials from the docker config file, `WWW-Authenticate` challenges, and the token cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::reference::DOCKER_HUB;

#[derive(Clone)]
pub(crate) struct Credentials {
    pub username: String,
    pub password: String,
}

impl Credentials {
    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}:***)", self.username)
    }
}

/// The `auths` of a docker config file, keyed by normalized registry host.
#[derive(Debug, Default)]
pub(crate) struct DockerConfig {
    auths: HashMap<String, Credentials>,
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
        struct File {
            #[serde(default)]
            auths: HashMap<String, Entry>,
        }
        #[derive(Deserialize)]
        struct Entry {
            auth: Option<String>,
            username: Option<String>,
            password: Option<String>,
        }
        let file: File = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        let mut auths = HashMap::new();
        for (key, entry) in file.auths {
            let creds = if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| format!("auths[{key:?}].auth: {e}"))?;
                let raw = String::from_utf8(raw).map_err(|_| format!("auths[{key:?}].auth: not UTF-8"))?;
                let (u, p) = raw
                    .split_once(':')
                    .ok_or_else(|| format!("auths[{key:?}].auth: expected user:password"))?;
                Credentials {
                    username: u.to_string(),
                    password: p.to_string(),
                }
            } else if let (Some(u), Some(p)) = (entry.username, entry.password) {
                Credentials {
                    username: u,
                    password: p,
                }
            } else {
                // Entries filled by a credential helper carry no secret here.
                continue;
            };
            auths.insert(normalize_host(&key), creds);
        }
        Ok(DockerConfig { auths })
    }

    pub(crate) fn lookup(&self, registry: &str) -> Option<&Credentials> {
        self.auths.get(&normalize_host(registry))
    }
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
                "helper.example":{}
            },"credsStore":"desktop"}"#,
        )
        .unwrap();
        let get = |h| cfg.lookup(h).map(|c| (c.username.clone(), c.password.clone()));
        assert_eq!(get("docker.io"), Some(("u1".into(), "p1".into())));
        assert_eq!(get("registry-1.docker.io"), Some(("u1".into(), "p1".into())));
        assert_eq!(get("127.0.0.1:5000"), Some(("u2".into(), "p2:with:colons".into())));
        assert_eq!(get("reg.example:8443"), Some(("u3".into(), "p3".into())));
        assert_eq!(get("helper.example"), None);
        assert_eq!(get("127.0.0.1:5001"), None);
        assert_eq!(cfg.lookup("docker.io").unwrap().basic_header(), "Basic dTE6cDE=");
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
