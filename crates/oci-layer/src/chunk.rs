//! The chunk size of deduplicated layers, validated once.
//!
//! A deduplicated layer stores each regular file as an EROFS chunk-based file whose
//! chunks live in shared blobs, one copy per distinct chunk. The chunk size is a power
//! of two from 4 KiB (the block size: a chunk cannot be smaller) to 16 MiB (beyond it a
//! chunk index saves nothing and a single changed byte rewrites megabytes). The command
//! line, the daemon's config file, the store and the converter all take this one type,
//! so a value is checked where it enters and nowhere else.

use std::fmt;
use std::str::FromStr;

/// A valid chunk size: a power of two from [`ChunkSize::MIN`] to [`ChunkSize::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct ChunkSize {
    bits: u8,
}

/// A chunk size out of range or not a power of two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidChunkSize(String);

impl fmt::Display for InvalidChunkSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chunk size {} is not a power of two from 4 KiB to 16 MiB", self.0)
    }
}

impl std::error::Error for InvalidChunkSize {}

impl ChunkSize {
    /// 4 KiB, the EROFS block size.
    pub const MIN: ChunkSize = ChunkSize { bits: 12 };
    /// 16 MiB.
    pub const MAX: ChunkSize = ChunkSize { bits: 24 };
    /// 64 KiB: the best dedup-to-index-size trade-off measured (`chunk-sweep`).
    pub const DEFAULT: ChunkSize = ChunkSize { bits: 16 };

    /// The chunk size `1 << bits`.
    pub fn from_bits(bits: u8) -> Result<ChunkSize, InvalidChunkSize> {
        if (Self::MIN.bits..=Self::MAX.bits).contains(&bits) {
            Ok(ChunkSize { bits })
        } else {
            Err(InvalidChunkSize(format!("2^{bits}")))
        }
    }

    /// The chunk size of `bytes` bytes.
    pub fn from_bytes(bytes: u64) -> Result<ChunkSize, InvalidChunkSize> {
        if bytes.is_power_of_two() {
            if let Ok(bits) = u8::try_from(bytes.trailing_zeros()) {
                if let Ok(c) = Self::from_bits(bits) {
                    return Ok(c);
                }
            }
        }
        Err(InvalidChunkSize(bytes.to_string()))
    }

    /// log2 of the size (what EROFS records).
    pub const fn bits(self) -> u8 {
        self.bits
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        1 << self.bits
    }
}

impl Default for ChunkSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u64> for ChunkSize {
    type Error = InvalidChunkSize;
    fn try_from(v: u64) -> Result<Self, Self::Error> {
        Self::from_bytes(v)
    }
}

impl From<ChunkSize> for u64 {
    fn from(c: ChunkSize) -> u64 {
        c.bytes()
    }
}

impl fmt::Display for ChunkSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bits {
            b if b >= 20 => write!(f, "{}M", 1u64 << (b - 20)),
            b => write!(f, "{}K", 1u64 << (b - 10)),
        }
    }
}

/// Parses `65536`, `64K`, `64k`, `64KiB`, `1M`, `16MB`.
impl FromStr for ChunkSize {
    type Err = InvalidChunkSize;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidChunkSize(format!("{s:?}"));
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 1,
            "K" | "KB" | "KIB" => 1 << 10,
            "M" | "MB" | "MIB" => 1 << 20,
            _ => return Err(bad()),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        Self::from_bytes(n.checked_mul(mult).ok_or_else(bad)?).map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_powers_of_two_from_4k_to_16m() {
        assert_eq!(ChunkSize::from_bytes(4096).unwrap().bits(), 12);
        assert_eq!(ChunkSize::from_bytes(16 << 20).unwrap().bits(), 24);
        for bad in [0, 1, 2048, 4095, 4097, 65535, 32 << 20, u64::MAX, 1 << 63] {
            assert!(ChunkSize::from_bytes(bad).is_err(), "{bad}");
        }
        assert!(ChunkSize::from_bits(11).is_err() && ChunkSize::from_bits(25).is_err());
        assert!(ChunkSize::from_bits(25).unwrap_err().to_string().contains("2^25"));
        assert_eq!(ChunkSize::default().bytes(), 65536);
    }

    #[test]
    fn parses_and_prints_sizes() {
        let p = |s: &str| s.parse::<ChunkSize>().map(ChunkSize::bytes);
        assert_eq!(p("64K"), Ok(65536));
        assert_eq!(p("64k"), Ok(65536));
        assert_eq!(p("64KiB"), Ok(65536));
        assert_eq!(p(" 1M "), Ok(1 << 20));
        assert_eq!(p("16MB"), Ok(16 << 20));
        assert_eq!(p("4096"), Ok(4096));
        for bad in ["", "K", "3K", "32M", "1G", "-4K", "4K4", "99999999999999999999K"] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
        assert_eq!(ChunkSize::from_bits(16).unwrap().to_string(), "64K");
        assert_eq!(ChunkSize::from_bits(21).unwrap().to_string(), "2M");
        assert!(p("3K").unwrap_err().to_string().contains("\"3K\""));
    }

    #[test]
    fn config_files_are_checked_on_load() {
        #[derive(serde::Deserialize, serde::Serialize)]
        struct C {
            c: ChunkSize,
        }
        let ok: C = serde_json::from_str(r#"{"c": 131072}"#).unwrap();
        assert_eq!(ok.c.bits(), 17);
        assert_eq!(serde_json::to_string(&ok).unwrap(), r#"{"c":131072}"#);
        assert!(serde_json::from_str::<C>(r#"{"c": 100}"#).is_err());
    }
}
