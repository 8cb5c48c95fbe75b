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
/// How each chunk is compressed on the wire: `zstd` (one zstd frame per chunk, then a
/// zstd seekable-format seek table), only on the `+zstd` media types.
pub const CHUNK_COMPRESSION: &str = "io.dedup-snapshotter.chunk-compression";
/// The size of each chunk's frame in the blob: u32 little endian per chunk, in base64.
pub const COMPRESSED_SIZES: &str = "io.dedup-snapshotter.compressed-sizes";
/// The size of the uncompressed EROFS image a compressed blob holds.
pub const UNCOMPRESSED_SIZE: &str = "io.dedup-snapshotter.uncompressed-size";
/// The sha256 of that image (`sha256:<hex>`): the layer's diffID.
pub const UNCOMPRESSED_DIGEST: &str = "io.dedup-snapshotter.uncompressed-digest";

/// [`EROFS_LAYER_MEDIA_TYPE`] with each chunk compressed by zstd: any zstd decoder
/// decompresses the whole blob to the EROFS image. Not EROFS-native (see
/// [`is_erofs_native`]): a reader that copies native layers as they are cannot take it.
pub const EROFS_ZSTD_LAYER_MEDIA_TYPE: &str = "application/vnd.erofs.layer.v1+zstd";
/// [`OCI_EROFS_LAYER_MEDIA_TYPE`] with each chunk compressed by zstd.
pub const OCI_EROFS_ZSTD_LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.erofs+zstd";

/// The only chunk compression: the value of [`CHUNK_COMPRESSION`].
pub const ZSTD: &str = "zstd";

/// True for EROFS-native layer media types: `application/vnd.erofs.layer.v1` (and
/// parameters after it) or the older `….erofs` suffix; a `+suffix` is not native (a
/// `+zstd` blob copied as is would be no image).
pub fn is_erofs_native(media_type: &str) -> bool {
    let base = media_type.split(';').next().unwrap_or("").trim();
    !base.contains('+') && (base.starts_with(EROFS_LAYER_MEDIA_TYPE) || base.ends_with(".erofs"))
}

/// True for an EROFS layer compressed with zstd: an EROFS-native media type with `+zstd`
/// (parameters after it allowed). Whether its chunks are independent frames is up to the
/// annotations ([`LazyLayer::from_descriptor`]); any zstd decoder reads the whole blob.
pub fn is_erofs_zstd(media_type: &str) -> bool {
    let base = media_type.split(';').next().unwrap_or("").trim();
    base.strip_suffix("+zstd").is_some_and(is_erofs_native)
}

/// The largest frame zstd makes of `len` bytes (`ZSTD_compressBound`).
pub fn zstd_bound(len: u64) -> u64 {
    usize::try_from(len).map_or(u64::MAX, |n| zstd::zstd_safe::compress_bound(n) as u64)
}

/// A layer blob made of one zstd frame per chunk of the uncompressed EROFS image (then a
/// seek table, never fetched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZstdChunks {
    /// The size of each chunk's frame, in chunk order; the frames start at offset 0.
    pub sizes: Vec<u32>,
    /// The uncompressed image's size.
    pub uncompressed_size: u64,
    /// The uncompressed image's digest (`sha256:<hex>`), the layer's diffID.
    pub uncompressed_digest: String,
}

/// What lazy fetching needs to know about one converted layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyLayer {
    /// The blob's digest (`sha256:<hex>`).
    pub digest: String,
    /// The blob's size.
    pub size: u64,
    /// Byte offset in the (uncompressed) image where file data starts.
    pub data_offset: u64,
    /// Verification chunk size.
    pub chunk_size: u64,
    /// Lowercase hex sha256 of each chunk of the (uncompressed) image.
    pub chunk_digests: Vec<String>,
    /// Chunks a start reads, in order (metadata chunks not included).
    pub prefetch: Vec<u32>,
    /// Set when the blob holds each chunk as a zstd frame (a `+zstd` media type).
    pub zstd: Option<ZstdChunks>,
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
        if let Some(z) = &self.zstd {
            let sizes: Vec<u8> = z.sizes.iter().flat_map(|n| n.to_le_bytes()).collect();
            a.insert(CHUNK_COMPRESSION.to_string(), ZSTD.to_string());
            a.insert(
                COMPRESSED_SIZES.to_string(),
                base64::engine::general_purpose::STANDARD.encode(sizes),
            );
            a.insert(UNCOMPRESSED_SIZE.to_string(), z.uncompressed_size.to_string());
            a.insert(UNCOMPRESSED_DIGEST.to_string(), z.uncompressed_digest.clone());
        }
        a
    }

    /// The size of the EROFS image: the blob's, or what its frames decompress to.
    pub fn image_size(&self) -> u64 {
        self.zstd.as_ref().map_or(self.size, |z| z.uncompressed_size)
    }

    /// The digest of the EROFS image (the layer's diffID): the blob's own unless compressed.
    pub fn image_digest(&self) -> &str {
        self.zstd.as_ref().map_or(&self.digest, |z| &z.uncompressed_digest)
    }

    /// The lazy description of a layer descriptor, or why it has none. Every value is
    /// checked against the descriptor's size, so a manifest cannot make the fetcher
    /// index out of range.
    pub fn from_descriptor(desc: &Descriptor) -> Result<LazyLayer, String> {
        let compressed = is_erofs_zstd(&desc.media_type);
        if !compressed && !is_erofs_native(&desc.media_type) {
            return Err(format!("media type {} is not EROFS-native", desc.media_type));
        }
        // The fetch daemon serves, names and verifies a lazy blob by its sha256: any
        // other digest (found by fuzzing: one with a non-hex character) would pass here
        // and only be refused when the blob is registered, at mount time.
        if !is_sha256_digest(&desc.digest) {
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
        // The media type and the annotations must agree: chunks taken for plain bytes
        // (or frames for chunks) would fail every digest, after the mount.
        match (compressed, a.get(CHUNK_COMPRESSION).map(String::as_str)) {
            (false, None) | (true, Some(ZSTD)) => {}
            (false, Some(c)) => {
                return Err(format!(
                    "annotation {CHUNK_COMPRESSION}={c:?} on the uncompressed media type {}",
                    desc.media_type
                ))
            }
            (true, c) => {
                return Err(format!(
                    "media type {} needs annotation {CHUNK_COMPRESSION}={ZSTD:?}, not {c:?}",
                    desc.media_type
                ))
            }
        }
        let image_size = if compressed { num(UNCOMPRESSED_SIZE)? } else { desc.size };
        let data_offset = num(DATA_OFFSET)?;
        if data_offset > image_size {
            return Err(format!(
                "data offset {data_offset} beyond the image's {image_size} bytes"
            ));
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(get(CHUNK_DIGESTS)?)
            .map_err(|e| format!("annotation {CHUNK_DIGESTS}: {e}"))?;
        let chunks = image_size.div_ceil(chunk_size);
        if raw.len() as u64 != chunks.saturating_mul(32) {
            return Err(format!(
                "{} chunk digests for an image of {chunks} chunks",
                raw.len() / 32
            ));
        }
        let chunk_digests = raw.chunks(32).map(hex::encode).collect();
        let zstd = if compressed {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(get(COMPRESSED_SIZES)?)
                .map_err(|e| format!("annotation {COMPRESSED_SIZES}: {e}"))?;
            if raw.len() as u64 != chunks.saturating_mul(4) {
                return Err(format!(
                    "{} bytes of compressed sizes for an image of {chunks} chunks (4 bytes each)",
                    raw.len()
                ));
            }
            let sizes: Vec<u32> = raw
                .chunks(4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("chunks of 4")))
                .collect();
            let mut total = 0u64;
            for (i, &n) in sizes.iter().enumerate() {
                let len = chunk_size.min(image_size - i as u64 * chunk_size);
                if n == 0 || u64::from(n) > zstd_bound(len) {
                    return Err(format!(
                        "compressed size {n} of chunk {i} is not in 1..={} for its {len} bytes",
                        zstd_bound(len)
                    ));
                }
                total += u64::from(n);
            }
            if total > desc.size {
                return Err(format!(
                    "compressed sizes add up to {total} bytes, beyond the blob's {}",
                    desc.size
                ));
            }
            let uncompressed_digest = get(UNCOMPRESSED_DIGEST)?.clone();
            if !is_sha256_digest(&uncompressed_digest) {
                return Err(format!(
                    "annotation {UNCOMPRESSED_DIGEST}: {uncompressed_digest:?} is not sha256:<64 lowercase hex>"
                ));
            }
            Some(ZstdChunks {
                sizes,
                uncompressed_size: image_size,
                uncompressed_digest,
            })
        } else {
            None
        };
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
            zstd,
        })
    }

    /// Chunks holding metadata (fetched before anything else).
    pub fn metadata_chunks(&self) -> std::ops::Range<u32> {
        0..self.data_offset.div_ceil(self.chunk_size) as u32
    }
}

/// Whether `d` is `sha256:<64 lowercase hex>`.
fn is_sha256_digest(d: &str) -> bool {
    let hex = d.strip_prefix("sha256:").unwrap_or("");
    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
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
            zstd: None,
        }
    }

    fn desc(l: &LazyLayer) -> Descriptor {
        Descriptor {
            media_type: EROFS_LAYER_MEDIA_TYPE.into(),
            digest: l.digest.clone(),
            size: l.size,
            platform: None,
            annotations: Some(l.annotations()),
            artifact_type: None,
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

    /// A compressed layer: 4 chunks (the last 10 bytes) behind frames of 100 bytes (20 for
    /// the last), in a blob of 320 bytes of frames and a 49-byte seek table.
    fn zstd_layer() -> LazyLayer {
        let mut l = layer();
        l.size = 369;
        l.zstd = Some(ZstdChunks {
            sizes: vec![100, 100, 100, 20],
            uncompressed_size: 3 * 4096 + 10,
            uncompressed_digest: format!("sha256:{}", "cd".repeat(32)),
        });
        l
    }

    fn zstd_desc(l: &LazyLayer) -> Descriptor {
        Descriptor {
            media_type: OCI_EROFS_ZSTD_LAYER_MEDIA_TYPE.into(),
            ..desc(l)
        }
    }

    #[test]
    fn compressed_annotations_round_trip() {
        let l = zstd_layer();
        let d = zstd_desc(&l);
        let a = d.annotations.as_ref().unwrap();
        assert_eq!(a[CHUNK_COMPRESSION], "zstd");
        assert_eq!(a[UNCOMPRESSED_SIZE], "12298");
        assert_eq!(a[COMPRESSED_SIZES], "ZAAAAGQAAABkAAAAFAAAAA==");
        assert_eq!(LazyLayer::from_descriptor(&d).unwrap(), l);
        let d = Descriptor {
            media_type: EROFS_ZSTD_LAYER_MEDIA_TYPE.into(),
            ..d
        };
        let got = LazyLayer::from_descriptor(&d).unwrap();
        assert_eq!(got.image_size(), 3 * 4096 + 10);
        assert_eq!(got.image_digest(), format!("sha256:{}", "cd".repeat(32)));
        assert_eq!(got.metadata_chunks(), 0..2);
        assert_eq!(layer().image_digest(), layer().digest);
    }

    /// Each hostile value is refused for what it is, and nothing panics.
    #[test]
    fn hostile_compressed_annotations_are_refused() {
        let l = zstd_layer();
        let refused = |why: &str, f: &dyn Fn(&mut Descriptor)| {
            let mut d = zstd_desc(&l);
            f(&mut d);
            let e = LazyLayer::from_descriptor(&d).unwrap_err();
            assert!(e.contains(why), "{why:?} not in {e:?}");
        };
        let set = |k: &'static str, v: String| {
            move |d: &mut Descriptor| {
                d.annotations.as_mut().unwrap().insert(k.into(), v.clone());
            }
        };
        let sizes = |v: &[u32]| {
            let raw: Vec<u8> = v.iter().flat_map(|n| n.to_le_bytes()).collect();
            base64::engine::general_purpose::STANDARD.encode(raw)
        };
        // The media type and the annotations disagree, either way.
        refused("needs annotation", &|d| {
            d.annotations.as_mut().unwrap().remove(CHUNK_COMPRESSION);
        });
        refused("needs annotation", &set(CHUNK_COMPRESSION, "gzip".into()));
        refused("on the uncompressed media type", &|d| {
            d.media_type = OCI_EROFS_LAYER_MEDIA_TYPE.into()
        });
        refused("not EROFS-native", &|d| {
            d.media_type = format!("{OCI_EROFS_LAYER_MEDIA_TYPE}+gzip")
        });
        // Sizes: missing, not base64, a count for another chunk count, zero, beyond
        // zstd's bound for the chunk (the last one's bound is smaller), beyond the blob.
        refused("no annotation", &|d| {
            d.annotations.as_mut().unwrap().remove(COMPRESSED_SIZES);
        });
        refused(COMPRESSED_SIZES, &set(COMPRESSED_SIZES, "!!".into()));
        refused(
            "for an image of 4 chunks",
            &set(COMPRESSED_SIZES, sizes(&[100, 100, 100])),
        );
        refused("for an image of 4 chunks", &set(COMPRESSED_SIZES, "AAAA".into()));
        refused(
            "of chunk 1 is not in",
            &set(COMPRESSED_SIZES, sizes(&[100, 0, 100, 100])),
        );
        let big = zstd_bound(4096) as u32 + 1;
        refused("of chunk 0 is not in", &set(COMPRESSED_SIZES, sizes(&[big, 1, 1, 1])));
        let last = zstd_bound(10) as u32;
        refused(
            "of chunk 3 is not in",
            &set(COMPRESSED_SIZES, sizes(&[1, 1, 1, last + 1])),
        );
        refused(
            "of chunk 2 is not in",
            &set(COMPRESSED_SIZES, sizes(&[1, 1, u32::MAX, 1])),
        );
        refused(
            "beyond the blob's 369",
            &set(COMPRESSED_SIZES, sizes(&[200, 100, 60, 10])),
        );
        // Uncompressed size: missing, not a number, another chunk count, below the data offset.
        refused("no annotation", &|d| {
            d.annotations.as_mut().unwrap().remove(UNCOMPRESSED_SIZE);
        });
        refused(UNCOMPRESSED_SIZE, &set(UNCOMPRESSED_SIZE, "-1".into()));
        refused(
            UNCOMPRESSED_SIZE,
            &set(UNCOMPRESSED_SIZE, "99999999999999999999999".into()),
        );
        refused(
            "chunk digests for an image of 5",
            &set(UNCOMPRESSED_SIZE, "16385".into()),
        );
        refused(
            "chunk digests for an image of",
            &set(UNCOMPRESSED_SIZE, u64::MAX.to_string()),
        );
        refused("data offset 8192 beyond", &set(UNCOMPRESSED_SIZE, "4096".into()));
        // Uncompressed digest: missing or malformed.
        refused("no annotation", &|d| {
            d.annotations.as_mut().unwrap().remove(UNCOMPRESSED_DIGEST);
        });
        for bad in [
            format!("sha256:{}", "CD".repeat(32)),
            format!("sha512:{}", "cd".repeat(32)),
            "sha256:".into(),
        ] {
            refused(UNCOMPRESSED_DIGEST, &set(UNCOMPRESSED_DIGEST, bad));
        }
        // Prefetch indexes count the image's chunks, not the blob's bytes.
        refused("bad chunk index", &set(PREFETCH, "4".into()));
    }

    #[test]
    fn native_media_types() {
        assert!(is_erofs_native("application/vnd.erofs.layer.v1"));
        assert!(is_erofs_native("application/vnd.erofs.layer.v1; x=y"));
        assert!(is_erofs_native("application/vnd.example.layer.erofs"));
        assert!(is_erofs_native(OCI_EROFS_LAYER_MEDIA_TYPE));
        assert!(!is_erofs_native("application/vnd.example.layer.erofs+gzip"));
        assert!(!is_erofs_native("application/vnd.oci.image.layer.v1.tar"));
        // Compressed chunks are never taken for a native image.
        assert!(!is_erofs_native(EROFS_ZSTD_LAYER_MEDIA_TYPE));
        assert!(!is_erofs_native(OCI_EROFS_ZSTD_LAYER_MEDIA_TYPE));
        assert!(is_erofs_zstd(EROFS_ZSTD_LAYER_MEDIA_TYPE));
        assert!(is_erofs_zstd(OCI_EROFS_ZSTD_LAYER_MEDIA_TYPE));
        assert!(is_erofs_zstd("application/vnd.erofs.layer.v1+zstd; x=y"));
        assert!(!is_erofs_zstd("application/vnd.oci.image.layer.v1.tar+zstd"));
        assert!(!is_erofs_zstd("application/vnd.erofs.layer.v1+gzip"));
        assert!(!is_erofs_zstd("application/vnd.erofs.layer.v1+zstd+zstd"));
        assert!(!is_erofs_zstd(EROFS_LAYER_MEDIA_TYPE));
    }
}
