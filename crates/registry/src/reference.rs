//! Image references (`host/repo:tag`, `host/repo@sha256:...`) with Docker's defaults.

use std::fmt;

use crate::digest::validate_digest;
use crate::error::{Error, Result};

/// The registry name Docker gives to references without a host.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API is actually served.
pub const DOCKER_HUB_HOST: &str = "registry-1.docker.io";

/// A repository on a registry: `127.0.0.1:5000/family-flat`, `docker.io/library/busybox`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Repository {
    registry: String,
    name: String,
}

impl Repository {
    /// Parses `[HOST/]NAME`, with Docker's defaults: no host means `docker.io`, and a one-component name
    /// there gets the `library/` prefix.
    pub fn parse(s: &str) -> Result<Repository> {
        // The first component is a host only when it looks like one; `foo/bar` is `docker.io/foo/bar`.
        let (registry, name) = match s.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.bytes().any(|b| b.is_ascii_uppercase()) =>
            {
                (first, rest)
            }
            _ => (DOCKER_HUB, s),
        };
        if registry.is_empty() || registry.contains(|c: char| c.is_whitespace() || c == '@' || c == '?' || c == '#') {
            return Err(Error::invalid("reference", s, "bad registry host"));
        }
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB
        } else {
            registry
        };
        let name = if registry == DOCKER_HUB && !name.contains('/') {
            format!("library/{name}")
        } else {
            name.to_string()
        };
        validate_name(&name).map_err(|msg| Error::invalid("reference", s, msg))?;
        Ok(Repository {
            registry: registry.to_string(),
            name,
        })
    }

    /// The registry as written, `docker.io` for Docker Hub. Also the key for credentials.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The `host[:port]` to connect to (`registry-1.docker.io` for Docker Hub).
    pub fn host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_HOST
        } else {
            &self.registry
        }
    }

    /// The repository name inside the registry (`library/busybox`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The reference to `tag` in this repository.
    pub fn tag(&self, tag: &str) -> Result<Reference> {
        validate_tag(tag).map_err(|msg| Error::invalid("tag", tag, msg))?;
        Ok(Reference {
            repo: self.clone(),
            tag: Some(tag.to_string()),
            digest: None,
        })
    }

    /// The reference to the manifest `digest` in this repository.
    pub fn digest(&self, digest: &str) -> Result<Reference> {
        validate_digest(digest)?;
        Ok(Reference {
            repo: self.clone(),
            tag: None,
            digest: Some(digest.to_string()),
        })
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

/// A manifest reference: a repository and a tag or digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    repo: Repository,
    tag: Option<String>,
    digest: Option<String>,
}

impl Reference {
    /// Parses `[HOST/]NAME[:TAG][@DIGEST]` (see [`Repository::parse`] for the host defaults). Without tag
    /// and digest the tag is `latest`; with both, the digest is what gets fetched.
    pub fn parse(s: &str) -> Result<Reference> {
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => {
                validate_digest(digest)?;
                (rest, Some(digest.to_string()))
            }
            None => (s, None),
        };
        // A colon after the last slash starts the tag; an earlier one is the host's port.
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(|msg| Error::invalid("reference", s, msg))?;
        }
        let repo = Repository::parse(name).map_err(|e| match e {
            Error::InvalidInput { msg, .. } => Error::invalid("reference", s, msg),
            e => e,
        })?;
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference { repo, tag, digest })
    }

    /// The repository this reference points into.
    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// The registry as written (`docker.io` for Docker Hub).
    pub fn registry(&self) -> &str {
        self.repo.registry()
    }

    /// The repository name inside the registry.
    pub fn repository(&self) -> &str {
        self.repo.name()
    }

    /// The tag, if the reference has one.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference has one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// What goes after `/manifests/` in the URL: the digest if there is one, else the tag.
    pub fn locator(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// The same repository pinned to `digest` (the tag is kept for display).
    pub fn with_digest(&self, digest: &str) -> Result<Reference> {
        validate_digest(digest)?;
        Ok(Reference {
            repo: self.repo.clone(),
            tag: self.tag.clone(),
            digest: Some(digest.to_string()),
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repo)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Repository names: `/`-separated components of lowercase alphanumerics joined by `.`, `_`, `__` or dashes.
fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err("repository name must be 1 to 255 characters".into());
    }
    for comp in name.split('/') {
        let bytes = comp.as_bytes();
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        let ok = !bytes.is_empty() && alnum(bytes[0]) && alnum(bytes[bytes.len() - 1]) && {
            let mut i = 0;
            let mut ok = true;
            while i < bytes.len() {
                if alnum(bytes[i]) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < bytes.len() && !alnum(bytes[i]) {
                    i += 1;
                }
                let sep = &comp[start..i];
                ok &= sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
            }
            ok
        };
        if !ok {
            return Err(format!(
                "bad repository name component {comp:?} (lowercase letters, digits, . _ __ -)"
            ));
        }
    }
    Ok(())
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let b = tag.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    if b.is_empty() || b.len() > 128 || !word(b[0]) || !b.iter().all(|&c| word(c) || c == b'.' || c == b'-') {
        return Err(format!(
            "bad tag {tag:?} (1 to 128 of A-Z a-z 0-9 _ . -, not starting with . or -)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::sha256_digest;

    fn parts(s: &str) -> (String, String, String, Option<String>, Option<String>) {
        let r = Reference::parse(s).unwrap();
        (
            r.registry().to_string(),
            r.repo().host().to_string(),
            r.repository().to_string(),
            r.tag().map(str::to_string),
            r.digest().map(str::to_string),
        )
    }

    #[test]
    fn parses_host_port_and_tag() {
        let r = Reference::parse("127.0.0.1:5000/family-flat:v3").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repo().host(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "family-flat");
        assert_eq!(r.tag(), Some("v3"));
        assert_eq!(r.digest(), None);
        assert_eq!(r.locator(), "v3");
        assert_eq!(r.to_string(), "127.0.0.1:5000/family-flat:v3");
    }

    #[test]
    fn defaults_to_latest_without_tag() {
        let (reg, host, name, tag, digest) = parts("127.0.0.1:5000/a/b");
        assert_eq!(
            (reg.as_str(), host.as_str(), name.as_str()),
            ("127.0.0.1:5000", "127.0.0.1:5000", "a/b")
        );
        assert_eq!((tag.as_deref(), digest), (Some("latest"), None));
        assert_eq!(parts("localhost/x").0, "localhost");
        assert_eq!(parts("[::1]:5000/x:y").0, "[::1]:5000");
    }

    #[test]
    fn parses_digests() {
        let d = sha256_digest(b"m");
        let r = Reference::parse(&format!("quay.io/a/b@{d}")).unwrap();
        assert_eq!((r.tag(), r.digest(), r.locator()), (None, Some(d.as_str()), d.as_str()));
        let r = Reference::parse(&format!("quay.io/a/b:t@{d}")).unwrap();
        assert_eq!((r.tag(), r.locator()), (Some("t"), d.as_str()));
        assert_eq!(r.to_string(), format!("quay.io/a/b:t@{d}"));
    }

    #[test]
    fn docker_hub_defaults() {
        let (reg, host, name, tag, _) = parts("busybox");
        assert_eq!(
            (reg.as_str(), host.as_str(), name.as_str(), tag.as_deref()),
            (DOCKER_HUB, DOCKER_HUB_HOST, "library/busybox", Some("latest"))
        );
        assert_eq!(parts("user/app:1.0").2, "user/app");
        assert_eq!(parts("docker.io/busybox:1").2, "library/busybox");
        assert_eq!(parts("index.docker.io/busybox").0, DOCKER_HUB);
        assert_eq!(
            Reference::parse("busybox").unwrap().to_string(),
            "docker.io/library/busybox:latest"
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "Upper/Case:tag",
            "host.io/UPPER",
            "host.io/a//b",
            "host.io/a/",
            "host.io/-a",
            "host.io/a:",
            "host.io/a:-t",
            "host.io/a@sha256:abc",
            "host.io/a@md5:d41d8cd98f00b204e9800998ecf8427e",
            "host.io/a b",
            "host.io/a...b",
        ] {
            let e = Reference::parse(bad).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidInput, "{bad}: {e}");
        }
        for good in ["host.io/a.b_c__d---e/f", "host.io/a:V1.2-rc_3"] {
            Reference::parse(good).unwrap();
        }
    }

    #[test]
    fn repository_builds_references() {
        let repo = Repository::parse("127.0.0.1:5000/x").unwrap();
        assert_eq!(repo.tag("v1").unwrap().to_string(), "127.0.0.1:5000/x:v1");
        let d = sha256_digest(b"");
        assert_eq!(repo.digest(&d).unwrap().locator(), d);
        assert!(repo.tag("a/b").is_err());
    }
}
