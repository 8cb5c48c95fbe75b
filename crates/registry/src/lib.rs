//! A blocking client for OCI Distribution registries (docker-registry, Docker Hub, ...).
//!
//! Pulls and pushes manifests and blobs: blobs stream in both directions and are verified against their
//! digests, byte ranges of blobs can be read on their own (for fetching layer data on demand), and
//! cross-repository mounts avoid re-uploading what a registry already has. Authentication follows the
//! registry's `WWW-Authenticate` challenge: Bearer tokens (fetched with the docker config's credentials
//! when there are some, cached per host and scope) or Basic credentials. OCI 1.1 referrers (artifacts
//! attached to a manifest through their `subject`) are pushed and listed with or without the registry's
//! referrers API (see [`Client::referrers`]).
//!
//! ```no_run
//! use registry::{Client, ClientOptions, Reference};
//! # fn main() -> Result<(), registry::Error> {
//! let client = Client::new(ClientOptions::default())?;
//! let reference = Reference::parse("127.0.0.1:5000/family-flat:v3")?;
//! let manifest = client.get_manifest(&reference)?;
//! let manifest = if registry::is_index(&manifest.media_type) {
//!     let entry = registry::resolve_platform(&manifest.bytes, "linux", registry::host_arch())?
//!         .expect("no manifest for this platform");
//!     client.get_manifest(&reference.with_digest(&entry.digest)?)?
//! } else {
//!     manifest
//! };
//! # let _ = manifest;
//! # Ok(())
//! # }
//! ```

mod auth;
mod client;
mod digest;
mod error;
pub mod hosts;
mod manifest;
mod reference;
mod referrers;

pub use client::{Blob, BlobPush, Client, ClientOptions, RawManifest};
pub use digest::{sha256_digest, validate_digest, VerifyingReader};
pub use error::{Error, ErrorKind, RegistryError, Result};
pub use manifest::{
    host_arch, is_index, resolve_platform, Descriptor, Platform, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST,
    MANIFEST_ACCEPT, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST,
};
pub use reference::{Reference, Repository, DOCKER_HUB, DOCKER_HUB_HOST};
pub use referrers::{artifact_manifest, empty_descriptor, referrers_tag, EMPTY_JSON, EMPTY_JSON_DIGEST, OCI_EMPTY};
