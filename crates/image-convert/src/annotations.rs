//! The annotations an EROFS-native layer descriptor carries for lazy fetching, and
//! their parsing (the snapshotter reads them from the manifest at Prepare).

use std::collections::BTreeMap;

use base64::Engine;
use registry::Descriptor;

/// The media type of EROFS-native layers: containerd's EROFS differ copies such a
/// layer as is, and so does ours.
pub const EROFS_LAYER_MEDIA_TYPE: &str = "application/vnd.erofs.layer.v1";

/// The same layers under a type containerd 1.6 and 1.7 unpack as layers (an OCI layer
/// type with the `.erofs` suffix, which containerd's EROFS differ also takes as is).
pub const OCI_EROFS_LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.erofs";

/// Digest of the OCI layer this one was converted from.
pub const SOURCE_DIGEST: &str = "io.dedup-snapshotter.source.digest";
/// Media type of that source layer.
pub const SOURCE_MEDIA_TYPE: &str = "io.dedup-snapshotter.source.media-type";
/// Byte offset where file data starts: everything before is metadata.
pub const DATA_OFFSET: &str = "io.dedup-snapshotter.data-offset";
/// Size in bytes of the verification chunks (the last one may be shorter).
pub const CHUNK_SIZE: &str = "io.dedup-snapshotter.chunk-size";
/// The chunks' sha256 digests: the raw 32-byte digests concatenated, in base64.
pub const CHUNK_DIGESTS: &str = "io.dedup-snapshotter.chunk-digests";
/// Chunks to fetch first after the metadata, in order: comma-separated indexes.
pub const PREFETCH: &str = "io.dedup-snapshotter.prefetch";
/// On the manifest: the image this one was converted from (`name@digest`).
pub const SOURCE_IMAGE: &str = "io.dedup-snapshotter.source.image";

/// True for EROFS-native layer media types: `application/vnd.erofs.layer.v1` (and
/// parameters after it) or the older `….erofs` suffix; a `+suffix` is not native.
pub fn is_erofs_native(media_type: &str) -> bool {
    let base = media_type.split(';').next().unwrap_or("").trim();
    base.starts_with(EROFS_LAYER_MEDIA_TYPE) || (base.ends_with(".erofs") && !base.contains('+'))
}

/// What lazy fetching needs to know about one converted layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyLayer {
    /// The blob's digest (`sha256:<hex>`).
    pub digest: String,
    /// The blob's size.
    pub size: u64,
    /// Byte offset where file data starts.
    pub data_offset: u64,
    /// Verification chunk size.
    pub chunk_size: u64,
    /// Lowercase hex sha256 of each chunk.
    pub chunk_digests: Vec<String>,
    /// Chunks a start reads, in order (metadata chunks not included).
    pub prefetch: Vec<u32>,
}

impl LazyLayer {
    /// The annotations describing this layer (source digest and media type are added
    /// by the converter).
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut raw = Vec::with_capacity(self.chunk_digests.len() * 32);
        for d in &self.chunk_digests {
            raw.extend_from_slice(&hex::decode(d).expect("chunk digests are hex"));
        }
        let mut a = BTreeMap::new();
        a.insert(DATA_OFFSET.to_string(), self.data_offset.to_string());
        a.insert(CHUNK_SIZE.to_string(), self.chunk_size.to_string());
        a.insert(
            CHUNK_DIGESTS.to_string(),
            base64::engine::general_purpose::STANDARD.encode(raw),
        );
        if !self.prefetch.is_empty() {
            let list: Vec<String> = self.prefetch.iter().map(u32::to_string).collect();
            a.insert(PREFETCH.to_string(), list.join(","));
        }
        a
    }

    /// The lazy description of a layer descriptor, or why it has none. Every value is
    /// checked against the descriptor's size, so a manifest cannot make the fetcher
    /// index out of range.
    pub fn from_descriptor(desc: &Descriptor) -> Result<LazyLayer, String> {
        if !is_erofs_native(&desc.media_type) {
            return Err(format!("media type {} is not EROFS-native", desc.media_type));
        }
        // The fetch daemon serves, names and verifies a lazy blob by its sha256: any
        // other digest (found by fuzzing: one with a non-hex character) would pass here
        // and only be refused when the blob is registered, at mount time.
        let hex = desc.digest.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(format!("digest {:?} is not sha256:<64 lowercase hex>", desc.digest));
        }
        let a = desc.annotations.as_ref().ok_or("no annotations")?;
        let get = |k: &str| a.get(k).ok_or_else(|| format!("no annotation {k}"));
        let num = |k: &str| -> Result<u64, String> { get(k)?.parse().map_err(|e| format!("annotation {k}: {e}")) };
        let chunk_size = num(CHUNK_SIZE)?;
        if !(4096..=(1 << 30)).contains(&chunk_size) || !chunk_size.is_power_of_two() {
            return Err(format!(
                "chunk size {chunk_size} is not a power of two from 4 KiB to 1 GiB"
            ));
        }
        let data_offset = num(DATA_OFFSET)?;
        if data_offset > desc.size {
            return Err(format!(
                "data offset {data_offset} beyond the blob's {} bytes",
                desc.size
            ));
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(get(CHUNK_DIGESTS)?)
            .map_err(|e| format!("annotation {CHUNK_DIGESTS}: {e}"))?;
        let chunks = desc.size.div_ceil(chunk_size);
        if raw.len() as u64 != chunks * 32 {
            return Err(format!(
                "{} chunk digests for a blob of {chunks} chunks",
                raw.len() / 32
            ));
        }
        let chunk_digests = raw.chunks(32).map(hex::encode).collect();
        let prefetch = match a.get(PREFETCH) {
            None => Vec::new(),
            Some(s) if s.is_empty() => Vec::new(),
            Some(s) => s
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|i| u64::from(*i) < chunks)
                        .ok_or_else(|| format!("annotation {PREFETCH}: bad chunk index {x:?}"))
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(LazyLayer {
            digest: desc.digest.clone(),
            size: desc.size,
            data_offset,
            chunk_size,
            chunk_digests,
            prefetch,
        })
    }

    /// Chunks holding metadata (fetched before anything else).
    pub fn metadata_chunks(&self) -> std::ops::Range<u32> {
        0..self.data_offset.div_ceil(self.chunk_size) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer() -> LazyLayer {
        LazyLayer {
            digest: format!("sha256:{}", "ab".repeat(32)),
            size: 3 * 4096 + 10,
            data_offset: 8192,
            chunk_size: 4096,
            chunk_digests: (0..4).map(|i| format!("{i:02x}").repeat(32)).collect(),
            prefetch: vec![3, 2],
        }
    }

    fn desc(l: &LazyLayer) -> Descriptor {
        Descriptor {
            media_type: EROFS_LAYER_MEDIA_TYPE.into(),
            digest: l.digest.clone(),
            size: l.size,
            platform: None,
            annotations: Some(l.annotations()),
        }
    }

    #[test]
    fn annotations_round_trip() {
        let l = layer();
        assert_eq!(LazyLayer::from_descriptor(&desc(&l)).unwrap(), l);
        assert_eq!(l.metadata_chunks(), 0..2);
    }

    #[test]
    fn bad_annotations_are_refused() {
        let l = layer();
        let mut d = desc(&l);
        d.size += 4096; // one chunk more than the table has
        assert!(LazyLayer::from_descriptor(&d).unwrap_err().contains("chunk digests"));
        let mut d = desc(&l);
        d.annotations.as_mut().unwrap().insert(PREFETCH.into(), "1,9".into());
        assert!(LazyLayer::from_descriptor(&d).unwrap_err().contains("bad chunk index"));
        let mut d = desc(&l);
        d.annotations.as_mut().unwrap().insert(CHUNK_SIZE.into(), "5000".into());
        assert!(LazyLayer::from_descriptor(&d).is_err());
        let mut d = desc(&l);
        d.media_type = "application/vnd.oci.image.layer.v1.tar+gzip".into();
        assert!(LazyLayer::from_descriptor(&d).is_err());
        // Found by fuzzing (fuzz/README.md): a digest dedupd cannot serve the blob by.
        for digest in [
            format!("sha256:{}ja{}", "ab".repeat(21), "ab".repeat(10)),
            format!("sha256:{}", "AB".repeat(32)),
            format!("sha512:{}", "ab".repeat(32)),
            "sha256:abab".to_string(),
        ] {
            let mut d = desc(&l);
            d.digest = digest.clone();
            assert!(
                LazyLayer::from_descriptor(&d).unwrap_err().contains("digest"),
                "{digest}"
            );
        }
    }

    #[test]
    fn native_media_types() {
        assert!(is_erofs_native("application/vnd.erofs.layer.v1"));
        assert!(is_erofs_native("application/vnd.erofs.layer.v1; x=y"));
        assert!(is_erofs_native("application/vnd.example.layer.erofs"));
        assert!(is_erofs_native(OCI_EROFS_LAYER_MEDIA_TYPE));
        assert!(!is_erofs_native("application/vnd.example.layer.erofs+gzip"));
        assert!(!is_erofs_native("application/vnd.oci.image.layer.v1.tar"));
    }
}
