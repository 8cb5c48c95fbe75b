//! OCI 1.1 referrers: artifacts that name another manifest as their `subject`, and how to find them
//! from that manifest's digest.
//!
//! A referrer is an ordinary manifest (usually an image manifest with an `artifactType`, the empty
//! config and the artifact's blobs as layers) with a `subject` descriptor. A registry with the
//! referrers API (distribution spec 1.1) indexes it when it is pushed and lists it at
//! `GET /v2/<name>/referrers/<subject digest>`. On a registry without that API (distribution 2.8,
//! Debian's `docker-registry`, among many) the pushing client keeps the list itself, as an image index
//! under the *referrers tag* `<alg>-<hex>` ([`referrers_tag`]): [`Client::push_referrer`] and
//! [`Client::referrers`] do whichever the registry needs.
//!
//! ```no_run
//! use registry::{Client, ClientOptions, Reference, Repository, OCI_MANIFEST};
//! # fn main() -> Result<(), registry::Error> {
//! let client = Client::new(ClientOptions::default())?;
//! let image = client.get_manifest(&Reference::parse("127.0.0.1:5000/app:v1")?)?;
//! let repo = Repository::parse("127.0.0.1:5000/app")?;
//! // The artifact's blobs are pushed first (Client::push_blob), then the empty config, then the manifest.
//! let layers = vec![/* descriptors of the pushed blobs */];
//! client.push_empty_config(&repo)?;
//! let manifest = registry::artifact_manifest("application/vnd.example.index.v1", &image.descriptor(), &layers, None)?;
//! client.push_referrer(&repo, &manifest, OCI_MANIFEST)?;
//! for found in client.referrers(&repo, &image.digest, Some("application/vnd.example.index.v1"))? {
//!     println!("{} {:?}", found.digest, found.annotations);
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashSet};
use std::io::Read;

use serde::{Deserialize, Serialize};
use tracing::debug;
use ureq::http::Method;

use crate::client::{describe, expect, header, Client, Endpoint, Need, ReqBody, Scope};
use crate::digest::{sha256_digest, validate_digest};
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::{Descriptor, OCI_INDEX, OCI_MANIFEST};
use crate::reference::Repository;

/// The empty JSON object's media type (`application/vnd.oci.empty.v1+json`): the config of an artifact
/// that has none, and its only layer when it has no blobs either.
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// The content of the empty descriptor's blob: `{}`.
pub const EMPTY_JSON: &[u8] = b"{}";
/// The digest of [`EMPTY_JSON`].
pub const EMPTY_JSON_DIGEST: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

/// The most a referrers list is read to (all its pages together, or the referrers tag's index).
const MAX_REFERRERS: u64 = 4 << 20;
/// The most pages of a referrers list that are followed (tiny pages could otherwise go on for long
/// within the byte budget).
const MAX_PAGES: usize = 1000;

/// The empty descriptor: [`OCI_EMPTY`], [`EMPTY_JSON_DIGEST`], size 2. Push its blob with
/// [`Client::push_empty_config`].
pub fn empty_descriptor() -> Descriptor {
    Descriptor {
        media_type: OCI_EMPTY.to_string(),
        digest: EMPTY_JSON_DIGEST.to_string(),
        size: EMPTY_JSON.len() as u64,
        ..Default::default()
    }
}

/// The referrers tag of a subject digest: `sha256:<hex>` → `sha256-<hex>`.
///
/// As the distribution spec's *Referrers Tag Schema* has it: the algorithm truncated to 32
/// characters, `-`, the encoded part truncated to 64 characters, and any character a tag may not have
/// replaced by `-` (a `sha512` digest keeps the first 64 of its 128 hex digits).
pub fn referrers_tag(subject_digest: &str) -> Result<String> {
    validate_digest(subject_digest)?;
    let (alg, encoded) = subject_digest.split_once(':').expect("a validated digest has a colon");
    let truncate = |s: &str, n: usize| s.chars().take(n).collect::<String>();
    let tag = format!("{}-{}", truncate(alg, 32), truncate(encoded, 64));
    Ok(tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect())
}

/// An OCI image manifest for an artifact that refers to `subject`: `artifactType` set, the empty
/// descriptor as config, `layers` as given (the empty descriptor alone when none, as the image spec
/// advises for portability), and `annotations` when there are some.
///
/// The blobs it names (the empty one included: [`Client::push_empty_config`]) must be in the
/// repository before it is pushed with [`Client::push_referrer`].
pub fn artifact_manifest(
    artifact_type: &str,
    subject: &Descriptor,
    layers: &[Descriptor],
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<Vec<u8>> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Manifest<'a> {
        schema_version: u32,
        media_type: &'a str,
        artifact_type: &'a str,
        config: Descriptor,
        layers: Vec<Descriptor>,
        subject: &'a Descriptor,
        #[serde(skip_serializing_if = "Option::is_none")]
        annotations: Option<&'a BTreeMap<String, String>>,
    }
    if artifact_type.is_empty() {
        return Err(Error::invalid("artifact type", artifact_type, "empty"));
    }
    validate_digest(&subject.digest)?;
    let layers = if layers.is_empty() {
        vec![empty_descriptor()]
    } else {
        layers.to_vec()
    };
    let manifest = Manifest {
        schema_version: 2,
        media_type: OCI_MANIFEST,
        artifact_type,
        config: empty_descriptor(),
        layers,
        subject,
        annotations: annotations.filter(|a| !a.is_empty()),
    };
    Ok(serde_json::to_vec(&manifest).expect("a manifest serializes"))
}

/// What [`Client::push_referrer`] reads from the manifest it pushes.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Referrer {
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Config>,
    subject: Option<Descriptor>,
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Config {
    media_type: Option<String>,
}

impl Client {
    /// Pushes the empty JSON blob `{}` ([`empty_descriptor`]), the config of an artifact, unless the
    /// repository has it; returns its descriptor.
    pub fn push_empty_config(&self, repo: &Repository) -> Result<Descriptor> {
        self.push_blob(repo, EMPTY_JSON_DIGEST, EMPTY_JSON.len() as u64, EMPTY_JSON)?;
        Ok(empty_descriptor())
    }

    /// The referrers of the manifest `subject_digest` in `repo`: descriptors of the manifests whose
    /// `subject` it is, with their `artifactType` and annotations; only those of `artifact_type` when
    /// given. Empty when there are none.
    ///
    /// Asks the referrers API (`GET /v2/<name>/referrers/<digest>`, following `Link: <...>; rel="next"`
    /// pages, filtered here unless the registry says it did with `OCI-Filters-Applied: artifactType`).
    /// A registry without the API answers 404 (some 400 or 405): then the referrers tag
    /// ([`referrers_tag`]) is read, whose index lists what clients pushed with
    /// [`Client::push_referrer`]; no such tag means no referrers. The answer must be an image index
    /// (else [`ErrorKind::Protocol`]), of at most 4 MiB in all.
    ///
    /// The list is mutable, like a tag: only hosts allowed to resolve are asked. Each descriptor is as
    /// the registry (or the pusher of the tag) wrote it: fetch a referrer by digest to trust it.
    pub fn referrers(
        &self,
        repo: &Repository,
        subject_digest: &str,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>> {
        let tag = referrers_tag(subject_digest)?;
        self.each(repo, Need::Resolve, |ep| {
            if let Some(found) = self.referrers_api(ep, repo, subject_digest, artifact_type)? {
                return Ok(found);
            }
            debug!(%repo, subject = subject_digest, %tag, "no referrers API: reading the referrers tag");
            let listed = match self.referrers_index(ep, repo, &tag)? {
                Some((_, listed)) => listed,
                None => Vec::new(),
            };
            let mut seen = HashSet::new();
            Ok(listed
                .into_iter()
                .filter(|d| artifact_type.is_none() || d.artifact_type.as_deref() == artifact_type)
                .filter(|d| seen.insert(d.digest.clone()))
                .collect())
        })
    }

    /// Pushes `manifest` (an OCI image manifest or index of `media_type`, with a `subject`) by its digest
    /// and makes it findable with [`Client::referrers`]; returns its digest.
    ///
    /// A registry that indexes referrers itself says so with an `OCI-Subject` header on the PUT, and
    /// nothing more is done. Otherwise the referrers tag of the subject ([`referrers_tag`]) is updated:
    /// its image index (a new one if there is none) gets a descriptor of the manifest (media type,
    /// digest, size, its `artifactType` or else its config's media type, its annotations) unless it
    /// lists it already, and is put back under the tag.
    ///
    /// That update is a read-modify-write of a tag with no lock: two clients adding referrers to the
    /// same subject at the same moment can each write an index without the other's entry, and the last
    /// writer wins (the distribution spec leaves these races to clients). The losing referrer stays in
    /// the repository; pushing it again lists it. The index the tag held before is left in the
    /// repository, untagged.
    pub fn push_referrer(&self, repo: &Repository, manifest: &[u8], media_type: &str) -> Result<String> {
        if media_type != OCI_MANIFEST && media_type != OCI_INDEX {
            return Err(Error::invalid(
                "referrer media type",
                media_type,
                "only OCI image manifests and indexes have a subject",
            ));
        }
        let parsed: Referrer = serde_json::from_slice(manifest)
            .map_err(|e| Error::invalid("referrer manifest", "", format!("not a manifest: {e}")))?;
        if let Some(declared) = parsed.media_type.as_deref().filter(|m| *m != media_type) {
            return Err(Error::invalid(
                "referrer manifest",
                "",
                format!("its mediaType {declared:?} is not {media_type:?}"),
            ));
        }
        let subject = parsed
            .subject
            .ok_or_else(|| Error::invalid("referrer manifest", "", "no \"subject\""))?;
        let tag = referrers_tag(&subject.digest)?;
        // The spec's rule for the entry: the manifest's artifactType, else (image manifests only) the
        // config's media type.
        let artifact_type = parsed.artifact_type.filter(|t| !t.is_empty()).or_else(|| {
            (media_type == OCI_MANIFEST)
                .then(|| parsed.config.and_then(|c| c.media_type))
                .flatten()
        });
        let digest = sha256_digest(manifest);
        let entry = Descriptor {
            media_type: media_type.to_string(),
            digest: digest.clone(),
            size: manifest.len() as u64,
            artifact_type,
            platform: None,
            annotations: parsed.annotations.filter(|a| !a.is_empty()),
        };
        let reference = repo.digest(&digest)?;
        self.each(repo, Need::Push, |ep| {
            let (_, indexed) = self.put_manifest_subject(ep, &reference, media_type, manifest)?;
            if let Some(indexed) = indexed {
                if indexed != subject.digest {
                    debug!(%digest, subject = %subject.digest, %indexed, "OCI-Subject names another digest");
                }
                debug!(%digest, "the registry indexed the referrer itself");
                return Ok(digest.clone());
            }
            self.add_to_referrers_tag(ep, repo, &tag, &entry)?;
            Ok(digest.clone())
        })
    }

    /// The referrers API on one host: `None` when the host has none (404, 400, 405 on the first page).
    fn referrers_api(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        subject_digest: &str,
        artifact_type: Option<&str>,
    ) -> Result<Option<Vec<Descriptor>>> {
        let mut url = self.url(ep, repo, &format!("referrers/{subject_digest}"))?;
        if let Some(t) = artifact_type {
            url.query_pairs_mut().append_pair("artifactType", t);
        }
        // A mirror's `ns` goes on every page, as the registry may not carry it into its links.
        let ns: Option<String> = url.query_pairs().find(|(k, _)| k == "ns").map(|(_, v)| v.into_owned());
        let scope = Scope::pull(ep, repo);
        let mut budget = MAX_REFERRERS;
        let mut found = Vec::new();
        let mut seen = HashSet::new();
        let mut visited = HashSet::new();
        let mut next = Some(url);
        while let Some(url) = next.take() {
            let request = describe(&Method::GET, &url);
            if !visited.insert(url.to_string()) {
                return Err(Error::protocol(&request, "the referrers pages link back to this one"));
            }
            if visited.len() > MAX_PAGES {
                return Err(Error::protocol(
                    &request,
                    format!("more than {MAX_PAGES} pages of referrers"),
                ));
            }
            let resp = self.send(
                ep,
                Method::GET,
                &url,
                Some(&scope),
                &[("Accept", OCI_INDEX)],
                ReqBody::Empty,
                true,
            )?;
            let status = resp.status().as_u16();
            if visited.len() == 1 && matches!(status, 400 | 404 | 405) {
                debug!(%request, status, "no referrers API");
                // The body is of no use; dropping it closes the connection at worst.
                return Ok(None);
            }
            let resp = expect(&request, resp, &[200])?;
            let filtered = resp
                .headers()
                .get_all("oci-filters-applied")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|f| f.trim() == "artifactType");
            let content_type = header(&resp, "content-type").map(str::to_string);
            let links: Vec<String> = resp
                .headers()
                .get_all("link")
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::to_string))
                .collect();
            next = match next_link(&links) {
                Some(target) => {
                    let mut u = url
                        .join(&target)
                        .map_err(|e| Error::protocol(&request, format!("bad Link {target:?}: {e}")))?;
                    if let Some(ns) = &ns {
                        if !u.query_pairs().any(|(k, _)| k == "ns") {
                            u.query_pairs_mut().append_pair("ns", ns);
                        }
                    }
                    Some(u)
                }
                None => None,
            };
            let body = read_bounded(&request, resp.into_body().into_reader(), budget)?;
            budget -= body.len() as u64;
            for d in parse_index(&request, content_type.as_deref(), &body)? {
                let wanted = artifact_type.is_none() || filtered || d.artifact_type.as_deref() == artifact_type;
                if wanted && seen.insert(d.digest.clone()) {
                    found.push(d);
                }
            }
        }
        Ok(Some(found))
    }

    /// The index under the referrers tag on one host, as bytes and its entries; `None` when there is
    /// no such tag.
    fn referrers_index(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        tag: &str,
    ) -> Result<Option<(Vec<u8>, Vec<Descriptor>)>> {
        let reference = repo.tag(tag)?;
        match self.get_manifest_limited(ep, &reference, MAX_REFERRERS) {
            Ok(m) => {
                let what = format!("referrers tag {reference}");
                let listed = parse_index(&what, Some(&m.media_type), &m.bytes)?;
                Ok(Some((m.bytes, listed)))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Adds `entry` to the index under the referrers tag `tag` on one host (creating it), unless it
    /// lists that digest already. The index's other fields and entries are kept.
    fn add_to_referrers_tag(&self, ep: &Endpoint, repo: &Repository, tag: &str, entry: &Descriptor) -> Result<()> {
        let reference = repo.tag(tag)?;
        let mut index = match self.referrers_index(ep, repo, tag)? {
            Some((bytes, listed)) => {
                if listed.iter().any(|d| d.digest == entry.digest) {
                    debug!(%reference, digest = %entry.digest, "already in the referrers tag's index");
                    return Ok(());
                }
                serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&bytes).map_err(|e| {
                    Error::protocol(&format!("referrers tag {reference}"), format!("not a JSON object: {e}"))
                })?
            }
            None => {
                let mut new = serde_json::Map::new();
                new.insert("schemaVersion".into(), 2.into());
                new.insert("mediaType".into(), OCI_INDEX.into());
                new.insert("manifests".into(), serde_json::Value::Array(Vec::new()));
                new
            }
        };
        let entry = serde_json::to_value(entry).expect("a descriptor serializes");
        match index.get_mut("manifests") {
            Some(serde_json::Value::Array(list)) => list.push(entry),
            // parse_index accepted it, so the list is there.
            _ => unreachable!("an index without a manifests list"),
        }
        let bytes = serde_json::to_vec(&index).expect("an index serializes");
        self.put_manifest_subject(ep, &reference, OCI_INDEX, &bytes)?;
        debug!(%reference, "referrers tag updated");
        Ok(())
    }
}

/// Reads at most `limit` bytes; more is a protocol error (a referrers list is small).
fn read_bounded(request: &str, reader: impl Read, limit: u64) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut body)
        .map_err(|e| Error::Io {
            what: request.to_string(),
            source: e,
        })?;
    if body.len() as u64 > limit {
        return Err(Error::protocol(
            request,
            format!("referrers list over {} MiB", MAX_REFERRERS >> 20),
        ));
    }
    Ok(body)
}

/// The entries of an image index answered with `content_type`; anything but an image index is a
/// protocol error. A generic or missing Content-Type is settled by the body's `mediaType`.
fn parse_index(request: &str, content_type: Option<&str>, body: &[u8]) -> Result<Vec<Descriptor>> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Index {
        media_type: Option<String>,
        manifests: Option<Vec<Descriptor>>,
    }
    let content_type = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "application/json" && c != "text/plain");
    if let Some(c) = content_type.as_deref().filter(|c| *c != OCI_INDEX) {
        return Err(Error::protocol(request, format!("answered {c}, not an image index")));
    }
    let index: Index =
        serde_json::from_slice(body).map_err(|e| Error::protocol(request, format!("not an image index: {e}")))?;
    match index.media_type.as_deref() {
        Some(OCI_INDEX) => {}
        Some(other) => return Err(Error::protocol(request, format!("a {other}, not an image index"))),
        None if content_type.is_none() => {
            return Err(Error::protocol(
                request,
                "neither Content-Type nor mediaType says image index",
            ))
        }
        None => {}
    }
    let manifests = index
        .manifests
        .ok_or_else(|| Error::protocol(request, "no \"manifests\" list in the image index"))?;
    for d in &manifests {
        validate_digest(&d.digest).map_err(|e| Error::protocol(request, format!("a referrer's digest: {e}")))?;
    }
    Ok(manifests)
}

/// The target of the `rel="next"` link among `Link` header values (RFC 8288: `<target>; rel="next"`,
/// several links separated by commas, `rel` a space-separated list).
fn next_link(values: &[String]) -> Option<String> {
    for value in values {
        let mut rest = value.as_str();
        while let Some(open) = rest.find('<') {
            let after = &rest[open + 1..];
            let Some(close) = after.find('>') else {
                break;
            };
            let target = &after[..close];
            // The parameters run to the next link's `<` (a comma separates links; targets are in <>).
            let params_end = after[close + 1..].find('<').map_or(after.len(), |i| close + 1 + i);
            let params = &after[close + 1..params_end];
            let is_next = params.split([';', ',']).any(|p| {
                let Some((k, v)) = p.split_once('=') else {
                    return false;
                };
                k.trim().eq_ignore_ascii_case("rel")
                    && v.trim()
                        .trim_matches('"')
                        .split_ascii_whitespace()
                        .any(|r| r.eq_ignore_ascii_case("next"))
            });
            if is_next {
                return Some(target.to_string());
            }
            rest = &after[params_end..];
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_descriptor_matches_its_blob() {
        assert_eq!(sha256_digest(EMPTY_JSON), EMPTY_JSON_DIGEST);
        let d = empty_descriptor();
        assert_eq!((d.media_type.as_str(), d.size), (OCI_EMPTY, 2));
    }

    #[test]
    fn referrers_tags() {
        let hex = "ab".repeat(32);
        assert_eq!(
            referrers_tag(&format!("sha256:{hex}")).unwrap(),
            format!("sha256-{hex}")
        );
        // sha512: the encoded part is cut at 64 characters.
        let long = "0123456789abcdef".repeat(8);
        assert_eq!(
            referrers_tag(&format!("sha512:{long}")).unwrap(),
            format!("sha512-{}", &long[..64])
        );
        assert_eq!(
            referrers_tag("sha256:nope").unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert!(referrers_tag("md5:d41d8cd98f00b204e9800998ecf8427e").is_err());
    }

    #[test]
    fn links() {
        let next = |v: &[&str]| next_link(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            next(&[r#"</v2/a/referrers/sha256:1?n=2&last=x>; rel="next""#]).as_deref(),
            Some("/v2/a/referrers/sha256:1?n=2&last=x")
        );
        assert_eq!(
            next(&[r#"<http://h/prev>; rel="prev", <http://h/next?a=1,2>; rel=next"#]).as_deref(),
            Some("http://h/next?a=1,2")
        );
        assert_eq!(
            next(&[r#"<x>; rel="prev""#, r#"<y>; title="t"; rel="last next""#]).as_deref(),
            Some("y")
        );
        assert_eq!(next(&[r#"<x>; rel="prev""#]), None);
        assert_eq!(next(&["garbage", "<unclosed"]), None);
        assert_eq!(next(&[]), None);
    }

    #[test]
    fn index_parsing() {
        let d = format!("sha256:{}", "1".repeat(64));
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":3,"artifactType":"t","annotations":{{"k":"v"}}}}]}}"#
        );
        let got = parse_index("r", Some(&format!("{OCI_INDEX}; charset=utf-8")), body.as_bytes()).unwrap();
        assert_eq!(got[0].artifact_type.as_deref(), Some("t"));
        assert_eq!(got[0].annotations.as_ref().unwrap()["k"], "v");
        assert!(parse_index("r", Some("application/json"), body.as_bytes()).is_ok());
        assert!(parse_index("r", None, body.as_bytes()).is_ok());
        for (ct, body) in [
            (Some(OCI_MANIFEST), body.clone()),
            (None, body.replace(OCI_INDEX, OCI_MANIFEST)),
            (None, r#"{"manifests":[]}"#.to_string()),
            (Some(OCI_INDEX), r#"{"schemaVersion":2}"#.to_string()),
            (Some(OCI_INDEX), body.replace(&d, "sha256:short")),
            (Some(OCI_INDEX), "[]".to_string()),
        ] {
            let e = parse_index("r", ct, body.as_bytes()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
        }
    }

    #[test]
    fn artifact_manifests() {
        let subject = Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: sha256_digest(b"image"),
            size: 5,
            ..Default::default()
        };
        let m: serde_json::Value =
            serde_json::from_slice(&artifact_manifest("application/x", &subject, &[], None).unwrap()).unwrap();
        assert_eq!(m["artifactType"], "application/x");
        assert_eq!(m["config"]["digest"], EMPTY_JSON_DIGEST);
        assert_eq!(m["layers"][0]["mediaType"], OCI_EMPTY);
        assert_eq!(m["subject"]["digest"], subject.digest);
        assert!(m.get("annotations").is_none());
        assert!(m["subject"].get("artifactType").is_none());
        assert!(artifact_manifest("", &subject, &[], None).is_err());
    }

    #[test]
    fn bounded_reads() {
        assert_eq!(read_bounded("r", &b"abc"[..], 3).unwrap(), b"abc");
        let e = read_bounded("r", &b"abcd"[..], 3).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
    }
}
