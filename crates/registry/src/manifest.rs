//! Media types, descriptors, and picking a platform's manifest out of an index.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker manifest list (the Docker counterpart of an OCI index).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Manifest types this client asks for, in order of preference.
pub const MANIFEST_ACCEPT: [&str; 4] = [OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST];

/// True for the media types that list per-platform manifests.
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// An OCI content descriptor.
///
/// Fields this type does not know (`urls`, `data`, ...) are dropped when one is read and written back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    /// The type of the artifact the descriptor points to (`artifactType`, OCI 1.1): set on the entries
    /// of a referrers list (the referrer's `artifactType`, else its config's media type), and on a
    /// manifest's `subject` or layers when their author set it. Written only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Only in index entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Written only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// The platform of an index entry, with Go's names (`linux`, `amd64`, `arm64`, variant `v8`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, rename = "os.version", skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    #[serde(default, rename = "os.features", skip_serializing_if = "Option::is_none")]
    pub os_features: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// This machine's architecture as OCI names it (`amd64`, `arm64`, ...).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        "mips64" if cfg!(target_endian = "little") => "mips64le",
        other => other,
    }
}

/// Picks from an OCI index or Docker manifest list the manifest for `os` and `arch`.
///
/// `arch` is an OCI architecture, optionally with a variant (`arm/v7`); Rust/uname names (`x86_64`,
/// `aarch64`) are accepted too. Without a variant, an entry without one (or with the architecture's
/// default, `v8` for arm64) is preferred, then the first that matches. `Ok(None)` when nothing matches.
pub fn resolve_platform(index: &[u8], os: &str, arch: &str) -> Result<Option<Descriptor>> {
    #[derive(Deserialize)]
    struct Index {
        manifests: Option<Vec<Descriptor>>,
    }
    let index: Index = serde_json::from_slice(index).map_err(|e| Error::invalid("image index", "", e.to_string()))?;
    let manifests = index
        .manifests
        .ok_or_else(|| Error::invalid("image index", "", "no \"manifests\" list"))?;

    let (arch, variant) = match arch.split_once('/') {
        Some((a, v)) => (normalize_arch(a), Some(v)),
        None => (normalize_arch(arch), None),
    };
    let default_variant = |a: &str| match a {
        "arm64" => Some("v8"),
        _ => None,
    };
    let candidates: Vec<&Descriptor> = manifests
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == os && normalize_arch(&p.architecture) == arch)
        })
        .collect();
    let variant_of = |d: &Descriptor| d.platform.as_ref().and_then(|p| p.variant.clone());
    let wanted = variant.or(default_variant(arch));
    let best = candidates
        .iter()
        .find(|d| variant_of(d).as_deref().or(default_variant(arch)) == wanted)
        .or_else(|| if variant.is_none() { candidates.first() } else { None });
    Ok(best.map(|d| (*d).clone()))
}

fn normalize_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "i386" | "i686" => "386",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(digest: char, os: &str, arch: &str, variant: Option<&str>) -> serde_json::Value {
        let mut platform = serde_json::json!({ "os": os, "architecture": arch });
        if let Some(v) = variant {
            platform["variant"] = v.into();
        }
        serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": format!("sha256:{}", digest.to_string().repeat(64)),
            "size": 100,
            "platform": platform,
        })
    }

    fn index(entries: Vec<serde_json::Value>) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries }))
            .unwrap()
    }

    fn pick(idx: &[u8], os: &str, arch: &str) -> Option<char> {
        resolve_platform(idx, os, arch)
            .unwrap()
            .map(|d| d.digest.chars().last().unwrap())
    }

    #[test]
    fn picks_os_and_arch() {
        let idx = index(vec![
            entry('1', "unknown", "unknown", None),
            entry('2', "linux", "amd64", None),
            entry('3', "linux", "arm64", Some("v8")),
            entry('4', "windows", "amd64", None),
            entry('5', "linux", "arm", Some("v6")),
            entry('6', "linux", "arm", Some("v7")),
        ]);
        assert_eq!(pick(&idx, "linux", "amd64"), Some('2'));
        assert_eq!(pick(&idx, "linux", "x86_64"), Some('2'));
        assert_eq!(pick(&idx, "linux", "arm64"), Some('3'));
        assert_eq!(pick(&idx, "linux", "aarch64"), Some('3'));
        assert_eq!(pick(&idx, "linux", "arm64/v8"), Some('3'));
        assert_eq!(pick(&idx, "linux", "arm/v7"), Some('6'));
        assert_eq!(pick(&idx, "linux", "arm"), Some('5'));
        assert_eq!(pick(&idx, "windows", "amd64"), Some('4'));
        assert_eq!(pick(&idx, "linux", "s390x"), None);
        assert_eq!(pick(&idx, "linux", "arm/v5"), None);
    }

    #[test]
    fn prefers_entry_without_variant_or_default_variant() {
        let idx = index(vec![
            entry('1', "linux", "arm64", Some("v9")),
            entry('2', "linux", "arm64", None),
        ]);
        assert_eq!(pick(&idx, "linux", "arm64"), Some('2'));
        assert_eq!(pick(&idx, "linux", "arm64/v8"), Some('2'));
        assert_eq!(pick(&idx, "linux", "arm64/v9"), Some('1'));
    }

    #[test]
    fn rejects_non_index() {
        let e = resolve_platform(br#"{"schemaVersion":2,"layers":[]}"#, "linux", "amd64").unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidInput);
        assert!(resolve_platform(b"nope", "linux", "amd64").is_err());
    }

    #[test]
    fn host_arch_is_oci_name() {
        assert!(!["x86_64", "aarch64"].contains(&host_arch()));
    }
}
