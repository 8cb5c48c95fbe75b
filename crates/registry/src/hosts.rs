//! Registry host configuration as containerd reads it: `<hosts dir>/<registry>/hosts.toml`
//! (containerd's `docs/hosts.md`), or Docker's certificate files in that directory.
//!
//! A registry's directory is the first of `host_port_` (for `host:port`), `host:port` (or `host`) and
//! `_default` that has a `hosts.toml`; with none, the first of them that exists is read for Docker's
//! pattern (`*.crt` CAs, `*.cert` + `*.key` client pairs). The file names mirrors (`[host."URL"]`,
//! tried in file order) before the `server` (the upstream: the registry itself when not set), and
//! for each of them what it may be asked (`capabilities`), which CAs and client certificate to use,
//! whether to verify at all (`skip_verify`), extra request headers, the API root (`override_path`),
//! a connect timeout (`dial_timeout`) and a proxy. Relative paths are relative to the directory of
//! the file. Keys this reader does not know are ignored, as containerd does.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use toml::Spanned;
use ureq::tls::{Certificate, PemItem, PrivateKey};
use url::Url;

use crate::error::{Error, Result};
use crate::reference::{DOCKER_HUB, DOCKER_HUB_HOST};

/// Where containerd looks for host configuration by default.
pub const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";

/// What a host may be asked: a mirror that is not trusted to map tags to digests has `pull` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Blobs, and manifests by digest (content that is verified against its name).
    pub pull: bool,
    /// Manifests by tag: the host decides which digest a tag means.
    pub resolve: bool,
    /// Uploads of blobs and manifests.
    pub push: bool,
}

impl Capabilities {
    /// Everything: the default of a host that does not list its capabilities.
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
}

/// A client certificate chain and its key.
pub struct ClientIdentity {
    /// The certificate first, then any intermediates.
    pub chain: Vec<Certificate<'static>>,
    /// The private key of the first certificate.
    pub key: PrivateKey<'static>,
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        ClientIdentity {
            chain: self.chain.clone(),
            key: self.key.to_owned(),
        }
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientIdentity({} certificates, key)", self.chain.len())
    }
}

/// One host of a registry's configuration: a mirror or the server, with its files already read.
#[derive(Debug, Clone)]
pub struct HostEntry {
    /// `scheme://host[:port][/path]` as configured; `None` for a server left to the default.
    pub url: Option<Url>,
    /// Whether the URL's path is the API root itself instead of the prefix of `/v2`.
    pub override_path: bool,
    /// What the host may be asked.
    pub capabilities: Capabilities,
    /// CA certificates trusted for this host, on top of the system's.
    pub ca: Vec<Certificate<'static>>,
    /// The client certificate to present (the first pair when several are configured).
    pub client: Option<ClientIdentity>,
    /// Do not verify the host's certificate chain and name.
    pub skip_verify: bool,
    /// Headers added to every request to this host.
    pub headers: Vec<(String, String)>,
    /// Connect timeout for this host (`dial_timeout`); `None` uses the client's.
    pub dial_timeout: Option<Duration>,
    /// HTTP(S)/SOCKS proxy URL for this host.
    pub proxy: Option<String>,
}

impl HostEntry {
    fn new(url: Option<Url>) -> HostEntry {
        HostEntry {
            url,
            override_path: false,
            capabilities: Capabilities::ALL,
            ca: Vec::new(),
            client: None,
            skip_verify: false,
            headers: Vec::new(),
            dial_timeout: None,
            proxy: None,
        }
    }

    /// Whether this host needs TLS settings of its own (else the client's shared agent serves it).
    pub fn custom_tls(&self) -> bool {
        !self.ca.is_empty() || self.client.is_some() || self.skip_verify || self.proxy.is_some()
    }

    /// The API root: the URL's path with `/v2` appended unless it ends with it or `override_path`
    /// says the path is the root already. No trailing slash.
    pub fn api_root(&self, url: &Url) -> String {
        let mut root = origin(url);
        let path = url.path().trim_end_matches('/');
        root.push_str(path);
        if !self.override_path && !path.ends_with("/v2") {
            root.push_str("/v2");
        }
        root
    }
}

/// `scheme://host[:port]`.
pub(crate) fn origin(url: &Url) -> String {
    let mut s = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        s.push_str(&format!(":{port}"));
    }
    s
}

/// A registry's host configuration.
#[derive(Debug, Clone)]
pub struct HostsConfig {
    /// The `hosts.toml`, or the directory whose certificate files were read.
    pub source: PathBuf,
    /// Mirrors, in file order: tried before the server.
    pub mirrors: Vec<HostEntry>,
    /// The upstream, tried last.
    pub server: HostEntry,
}

/// The directories searched for `registry`'s configuration, in order.
pub fn candidate_dirs(hosts_dir: &Path, registry: &str) -> Vec<PathBuf> {
    let mut names = Vec::new();
    if let Some((host, port)) = registry.rsplit_once(':') {
        if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
            names.push(format!("{host}_{port}_"));
        }
    }
    names.push(registry.to_string());
    names.push("_default".to_string());
    names.into_iter().map(|n| hosts_dir.join(n)).collect()
}

/// Reads `registry`'s configuration under `hosts_dir`; `None` when there is none (no directory for
/// it, or a directory with neither `hosts.toml` nor certificate files).
///
/// A file with errors is an [`Error::HostsConfig`] naming the file and, where known, the line.
pub fn load(hosts_dir: &Path, registry: &str) -> Result<Option<HostsConfig>> {
    let dirs = candidate_dirs(hosts_dir, registry);
    for dir in &dirs {
        let file = dir.join("hosts.toml");
        match std::fs::read_to_string(&file) {
            Ok(text) => return parse(&text, &file).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(hosts_error(&file, None, e.to_string())),
        }
    }
    match dirs.iter().find(|d| d.is_dir()) {
        Some(dir) => cert_files(dir),
        None => Ok(None),
    }
}

fn hosts_error(path: &Path, line: Option<usize>, msg: impl Into<String>) -> Error {
    Error::HostsConfig {
        path: path.to_path_buf(),
        line,
        msg: msg.into(),
    }
}

/// Docker's pattern: `*.crt` are CAs, `*.cert` with the `*.key` of the same name a client pair.
fn cert_files(dir: &Path) -> Result<Option<HostsConfig>> {
    let entries = std::fs::read_dir(dir).map_err(|e| hosts_error(dir, None, e.to_string()))?;
    let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    names.sort();
    let mut server = HostEntry::new(None);
    for path in &names {
        match path.extension().and_then(|e| e.to_str()) {
            Some("crt") => server
                .ca
                .extend(read_certs(path).map_err(|m| hosts_error(path, None, m))?),
            Some("cert") if server.client.is_none() => {
                let key = path.with_extension("key");
                if !key.exists() {
                    return Err(hosts_error(path, None, format!("no {} next to it", key.display())));
                }
                server.client = Some(read_identity(path, Some(&key)).map_err(|m| hosts_error(path, None, m))?);
            }
            _ => {}
        }
    }
    if server.ca.is_empty() && server.client.is_none() {
        return Ok(None);
    }
    Ok(Some(HostsConfig {
        source: dir.to_path_buf(),
        mirrors: Vec::new(),
        server,
    }))
}

/// A string or an array of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `client`: a path, or an array of paths and `[cert, key]` pairs.
#[derive(Deserialize)]
#[serde(untagged)]
enum ClientField {
    One(String),
    Many(Vec<OneOrMany>),
}

#[derive(Deserialize)]
struct Fields {
    capabilities: Option<Spanned<Vec<Spanned<String>>>>,
    ca: Option<Spanned<OneOrMany>>,
    client: Option<Spanned<ClientField>>,
    skip_verify: Option<bool>,
    override_path: Option<bool>,
    header: Option<Spanned<Headers>>,
    dial_timeout: Option<Spanned<String>>,
    proxy: Option<Spanned<String>>,
}

/// The top level: the server's own fields next to `server` and the `host` table. Spelt out rather
/// than `#[serde(flatten)]`, which would lose the spans that give errors their line.
#[derive(Deserialize)]
struct File {
    server: Option<Spanned<String>>,
    capabilities: Option<Spanned<Vec<Spanned<String>>>>,
    ca: Option<Spanned<OneOrMany>>,
    client: Option<Spanned<ClientField>>,
    skip_verify: Option<bool>,
    override_path: Option<bool>,
    header: Option<Spanned<Headers>>,
    dial_timeout: Option<Spanned<String>>,
    proxy: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "ordered")]
    host: Vec<(Spanned<String>, Fields)>,
}

/// `[header]`: names to a value or several, in file order.
struct Headers(Vec<(String, OneOrMany)>);

/// A TOML table as its entries in file order (a map type would sort them, and mirrors are tried in
/// the order they are written).
fn ordered<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> std::result::Result<Vec<(Spanned<String>, T)>, D::Error> {
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<(Spanned<String>, T)>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(entry) = map.next_entry()? {
                out.push(entry);
            }
            Ok(out)
        }
    }
    d.deserialize_map(V(std::marker::PhantomData))
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Headers;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of header names to a string or an array of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Headers, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(Headers(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses a `hosts.toml` (its text, and its path for messages and relative paths).
pub fn parse(text: &str, path: &Path) -> Result<HostsConfig> {
    let line = |offset: usize| Some(text[..offset.min(text.len())].matches('\n').count() + 1);
    let file: File = toml::from_str(text).map_err(|e| {
        let at = e.span().and_then(|s| line(s.start));
        hosts_error(path, at, e.message().trim().to_string())
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let spanned_err = |span: std::ops::Range<usize>, msg: String| hosts_error(path, line(span.start), msg);

    let server_url = match &file.server {
        None => None,
        Some(s) => {
            let mut url = host_url(s.get_ref()).map_err(|m| spanned_err(s.span(), format!("server: {m}")))?;
            // Docker Hub's name is not where its API is served.
            if url.host_str() == Some(DOCKER_HUB) {
                let _ = url.set_host(Some(DOCKER_HUB_HOST));
            }
            Some(url)
        }
    };
    let fields = Fields {
        capabilities: file.capabilities,
        ca: file.ca,
        client: file.client,
        skip_verify: file.skip_verify,
        override_path: file.override_path,
        header: file.header,
        dial_timeout: file.dial_timeout,
        proxy: file.proxy,
    };
    let server = entry(server_url, fields, base, &spanned_err)?;
    let mut mirrors = Vec::new();
    for (key, fields) in file.host {
        let url =
            host_url(key.get_ref()).map_err(|m| spanned_err(key.span(), format!("host {:?}: {m}", key.get_ref())))?;
        mirrors.push(entry(Some(url), fields, base, &spanned_err)?);
    }
    Ok(HostsConfig {
        source: path.to_path_buf(),
        mirrors,
        server,
    })
}

/// `https://host[:port][/path]`; no scheme means https, as containerd reads it.
fn host_url(s: &str) -> std::result::Result<Url, String> {
    let s = s.trim();
    let full = if s.contains("://") {
        s.to_string()
    } else {
        format!("https://{s}")
    };
    let url = Url::parse(&full).map_err(|e| format!("bad URL {s:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("scheme of {s:?} is not http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("no host in {s:?}"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(format!("{s:?} has a query, fragment or user name"));
    }
    Ok(url)
}

fn entry(
    url: Option<Url>,
    f: Fields,
    base: &Path,
    err: &dyn Fn(std::ops::Range<usize>, String) -> Error,
) -> Result<HostEntry> {
    let mut e = HostEntry::new(url);
    if let Some(caps) = f.capabilities {
        let mut c = Capabilities {
            pull: false,
            resolve: false,
            push: false,
        };
        for cap in caps.into_inner() {
            match cap.get_ref().as_str() {
                "pull" => c.pull = true,
                "resolve" => c.resolve = true,
                "push" => c.push = true,
                other => {
                    return Err(err(
                        cap.span(),
                        format!("unknown capability {other:?} (pull, resolve, push)"),
                    ))
                }
            }
        }
        e.capabilities = c;
    }
    if let Some(ca) = f.ca {
        let span = ca.span();
        for p in ca.into_inner().into_vec() {
            let p = resolve(base, &p);
            let certs = read_certs(&p).map_err(|m| err(span.clone(), format!("ca {}: {m}", p.display())))?;
            e.ca.extend(certs);
        }
    }
    if let Some(client) = f.client {
        let span = client.span();
        let pairs: Vec<(String, Option<String>)> = match client.into_inner() {
            ClientField::One(p) => vec![(p, None)],
            ClientField::Many(items) => items
                .into_iter()
                .map(|i| match i {
                    OneOrMany::One(p) => Ok((p, None)),
                    OneOrMany::Many(v) if v.len() == 1 || v.len() == 2 => {
                        let mut v = v.into_iter();
                        let cert = v.next().unwrap_or_default();
                        Ok((cert, v.next().filter(|k| !k.is_empty())))
                    }
                    OneOrMany::Many(v) => Err(err(
                        span.clone(),
                        format!("client: a pair is [cert, key], not {} paths", v.len()),
                    )),
                })
                .collect::<Result<_>>()?,
        };
        // ureq presents one identity; containerd's Go client would pick among several by the
        // server's CA list, which a registry rarely sends. The first is what a single pair gives.
        if let Some((cert, key)) = pairs.into_iter().next() {
            let cert = resolve(base, &cert);
            let key = key.map(|k| resolve(base, &k));
            let id = read_identity(&cert, key.as_deref())
                .map_err(|m| err(span.clone(), format!("client {}: {m}", cert.display())))?;
            e.client = Some(id);
        }
    }
    e.skip_verify = f.skip_verify.unwrap_or(false);
    e.override_path = f.override_path.unwrap_or(false);
    if let Some(h) = f.header {
        let span = h.span();
        for (name, values) in h.into_inner().0 {
            if ureq::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(err(span.clone(), format!("header: bad name {name:?}")));
            }
            for v in values.into_vec() {
                if ureq::http::HeaderValue::from_str(&v).is_err() {
                    return Err(err(span.clone(), format!("header {name}: bad value {v:?}")));
                }
                e.headers.push((name.clone(), v));
            }
        }
    }
    if let Some(d) = f.dial_timeout {
        let t = go_duration(d.get_ref())
            .ok_or_else(|| err(d.span(), format!("dial_timeout: bad duration {:?}", d.get_ref())))?;
        e.dial_timeout = Some(t);
    }
    if let Some(p) = f.proxy {
        let u = Url::parse(p.get_ref()).map_err(|x| err(p.span(), format!("proxy {:?}: {x}", p.get_ref())))?;
        if !matches!(u.scheme(), "http" | "https" | "socks5" | "socks5h") || u.host_str().is_none() {
            return Err(err(
                p.span(),
                format!("proxy {:?}: not an http, https or socks5 URL", p.get_ref()),
            ));
        }
        e.proxy = Some(p.into_inner());
    }
    Ok(e)
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn read_certs(path: &Path) -> std::result::Result<Vec<Certificate<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let PemItem::Certificate(c) = item.map_err(|e| format!("bad PEM: {e}"))? {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(certs)
}

/// A certificate chain and its key: from two files, or both from one.
fn read_identity(cert: &Path, key: Option<&Path>) -> std::result::Result<ClientIdentity, String> {
    let chain = read_certs(cert)?;
    let key_path = key.unwrap_or(cert);
    let pem = std::fs::read(key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
    let key = ureq::tls::parse_pem(&pem)
        .filter_map(|i| i.ok())
        .find_map(|i| match i {
            PemItem::PrivateKey(k) => Some(k),
            _ => None,
        })
        .ok_or_else(|| format!("no PEM private key in {}", key_path.display()))?;
    Ok(ClientIdentity { chain, key })
}

/// Go's `time.ParseDuration` forms: `1s`, `500ms`, `1m30s`, `2.5s`.
fn go_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn parse_str(text: &str) -> Result<HostsConfig> {
        parse(text, Path::new("/etc/containerd/certs.d/reg.example:5000/hosts.toml"))
    }

    fn urls(c: &HostsConfig) -> Vec<String> {
        c.mirrors.iter().map(|m| m.url.as_ref().unwrap().to_string()).collect()
    }

    #[test]
    fn mirrors_in_file_order_with_their_settings() {
        let c = parse_str(
            r#"
server = "https://upstream.example:5000"
capabilities = ["pull", "resolve"]
skip_verify = true

[host."https://zzz-first.example"]
  capabilities = ["pull"]
  [host."https://zzz-first.example".header]
    x-custom = ["a", "b"]
    x-other = "c"

[host."http://aaa-second.example:8080/prefix/"]
  override_path = true
  dial_timeout = "1m1.5s"

[host."mirror.example:5001"]
"#,
        )
        .unwrap();
        assert_eq!(
            urls(&c),
            [
                "https://zzz-first.example/",
                "http://aaa-second.example:8080/prefix/",
                "https://mirror.example:5001/"
            ]
        );
        let m = &c.mirrors;
        assert_eq!(
            m[0].capabilities,
            Capabilities {
                pull: true,
                resolve: false,
                push: false
            }
        );
        assert_eq!(
            m[0].headers,
            [
                ("x-custom".into(), "a".into()),
                ("x-custom".into(), "b".into()),
                ("x-other".into(), "c".into())
            ]
        );
        assert_eq!(m[1].capabilities, Capabilities::ALL);
        assert_eq!(m[1].dial_timeout, Some(Duration::from_millis(61_500)));
        assert!(m[1].override_path && !m[0].override_path);
        assert!(!m[2].skip_verify);
        let server = &c.server;
        assert_eq!(server.url.as_ref().unwrap().as_str(), "https://upstream.example:5000/");
        assert!(server.skip_verify && server.custom_tls());
        assert!(!server.capabilities.push && server.capabilities.resolve);
    }

    #[test]
    fn api_roots() {
        let c = parse_str(
            r#"
[host."https://a.example"]
[host."https://b.example/us/"]
[host."https://c.example/x/v2"]
[host."https://d.example/v2/upstream"]
  override_path = true
"#,
        )
        .unwrap();
        let roots: Vec<String> = c.mirrors.iter().map(|m| m.api_root(m.url.as_ref().unwrap())).collect();
        assert_eq!(
            roots,
            [
                "https://a.example/v2",
                "https://b.example/us/v2",
                "https://c.example/x/v2",
                "https://d.example/v2/upstream"
            ]
        );
    }

    #[test]
    fn docker_hub_server_is_its_api_host_and_defaults_apply() {
        let c = parse_str("server = \"https://docker.io\"\n").unwrap();
        assert_eq!(c.server.url.unwrap().host_str(), Some("registry-1.docker.io"));
        let c = parse_str("").unwrap();
        assert!(c.server.url.is_none() && c.mirrors.is_empty());
        assert_eq!(c.server.capabilities, Capabilities::ALL);
        assert!(!c.server.custom_tls());
        // Keys this reader does not know are ignored, like containerd does.
        assert!(parse_str("something_new = 1\n").is_ok());
    }

    fn err_line(text: &str) -> (ErrorKind, Option<usize>, String) {
        let e = parse_str(text).unwrap_err();
        let Error::HostsConfig { line, ref msg, .. } = e else {
            panic!("{e:?}")
        };
        (e.kind(), line, msg.clone())
    }

    #[test]
    fn errors_name_the_line() {
        let (kind, line, msg) =
            err_line("server = \"https://ok\"\n\n[host.\"https://m\"]\n  capabilities = [\"pull\", \"fly\"]\n");
        assert_eq!((kind, line), (ErrorKind::HostsConfig, Some(4)));
        assert!(msg.contains("unknown capability \"fly\""), "{msg}");
        let (_, line, _) = err_line("\n\nserver = 5\n");
        assert_eq!(line, Some(3));
        let (_, line, _) = err_line("[host.\"https://m\"]\nskip_verify = \"yes\"\n");
        assert_eq!(line, Some(2));
        let (_, line, msg) = err_line("server = \"ftp://x\"\n");
        assert_eq!(line, Some(1));
        assert!(msg.contains("not http or https"), "{msg}");
        let (_, line, _) = err_line("[host.\"https://m\"\n");
        assert_eq!(line, Some(1));
        let (_, line, msg) = err_line("\n[host.\"https://m\"]\n  ca = \"missing-ca.crt\"\n");
        assert_eq!(line, Some(3));
        assert!(
            msg.contains("/etc/containerd/certs.d/reg.example:5000/missing-ca.crt"),
            "{msg}"
        );
        let (_, line, _) = err_line("dial_timeout = \"soon\"\n");
        assert_eq!(line, Some(1));
        let e = parse_str("server = 5\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/etc/containerd/certs.d/reg.example:5000/hosts.toml:1: "),
            "{e}"
        );
    }

    #[test]
    fn directory_candidates() {
        let d = Path::new("/h");
        assert_eq!(
            candidate_dirs(d, "reg.example:5000"),
            [
                d.join("reg.example_5000_"),
                d.join("reg.example:5000"),
                d.join("_default")
            ]
        );
        assert_eq!(
            candidate_dirs(d, "docker.io"),
            [d.join("docker.io"), d.join("_default")]
        );
    }

    #[test]
    fn loads_from_the_first_directory_that_has_a_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path(), "reg:5000").unwrap().is_none());
        std::fs::create_dir(dir.path().join("_default")).unwrap();
        std::fs::write(dir.path().join("_default/hosts.toml"), "[host.\"https://all\"]\n").unwrap();
        std::fs::create_dir(dir.path().join("reg:5000")).unwrap();
        let c = load(dir.path(), "reg:5000").unwrap().unwrap();
        assert_eq!(urls(&c), ["https://all/"]);
        std::fs::write(dir.path().join("reg:5000/hosts.toml"), "[host.\"https://own\"]\n").unwrap();
        assert_eq!(urls(&load(dir.path(), "reg:5000").unwrap().unwrap()), ["https://own/"]);
        std::fs::create_dir(dir.path().join("reg_5000_")).unwrap();
        std::fs::write(dir.path().join("reg_5000_/hosts.toml"), "[host.\"https://under\"]\n").unwrap();
        let c = load(dir.path(), "reg:5000").unwrap().unwrap();
        assert_eq!(urls(&c), ["https://under/"]);
        assert_eq!(c.source, dir.path().join("reg_5000_/hosts.toml"));
        assert_eq!(urls(&load(dir.path(), "other").unwrap().unwrap()), ["https://all/"]);
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(go_duration("1h2m"), Some(Duration::from_secs(3720)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("1"), None);
        assert_eq!(go_duration("1d"), None);
        assert_eq!(go_duration(""), None);
    }
}
