//! Content digests (`sha256:<hex>`, `sha512:<hex>`) and a reader that verifies one.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256, Sha512};

use crate::error::{Error, Result};

/// Checks that `digest` is `sha256:` or `sha512:` followed by the right number of lowercase hex digits.
///
/// Other algorithms are rejected: the client could not verify them, and digests end up in URLs.
pub fn validate_digest(digest: &str) -> Result<()> {
    Hasher::for_digest(digest).map(|_| ())
}

/// The `sha256:<hex>` digest of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub(crate) enum Hasher {
    Sha256(Sha256),
    /// Boxed: rare, and twice the size of the common case.
    Sha512(Box<Sha512>),
}

impl Hasher {
    /// A hasher for the algorithm of `digest`, which it validates.
    pub(crate) fn for_digest(digest: &str) -> Result<Hasher> {
        let (algo, hex) = digest
            .split_once(':')
            .ok_or_else(|| Error::invalid("digest", digest, "expected ALGORITHM:HEX"))?;
        let (hasher, len) = match algo {
            "sha256" => (Hasher::Sha256(Sha256::new()), 64),
            "sha512" => (Hasher::Sha512(Box::new(Sha512::new())), 128),
            _ => {
                return Err(Error::invalid(
                    "digest",
                    digest,
                    "unsupported algorithm (sha256 and sha512 are)",
                ))
            }
        };
        if hex.len() != len || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(Error::invalid(
                "digest",
                digest,
                format!("expected {len} lowercase hex digits"),
            ));
        }
        Ok(hasher)
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub(crate) fn finish(self) -> String {
        match self {
            Hasher::Sha256(h) => format!("sha256:{}", hex::encode(h.finalize())),
            Hasher::Sha512(h) => format!("sha512:{}", hex::encode((*h).finalize())),
        }
    }
}

/// Checks `data` against `digest`, returning [`Error::DigestMismatch`] naming `what` when it differs.
pub(crate) fn verify(what: &str, digest: &str, data: &[u8]) -> Result<()> {
    let mut h = Hasher::for_digest(digest)?;
    h.update(data);
    let actual = h.finish();
    if actual != digest {
        return Err(Error::DigestMismatch {
            what: what.to_string(),
            expected: digest.to_string(),
            actual,
        });
    }
    Ok(())
}

enum State {
    Reading(Hasher),
    Verified,
    Mismatch(String),
}

/// A reader that hashes everything read through it and, at end of input, fails unless the data matched.
///
/// The mismatch surfaces as an `io::Error` of kind `InvalidData` wrapping [`Error::DigestMismatch`]
/// (`Error::from(io_err)` recovers it); it is returned at EOF and on every read after, so a caller that
/// copies the stream somewhere cannot miss it. Data is handed out before it is verified: consumers must
/// not trust what they wrote until the read that returned 0.
pub struct VerifyingReader<R> {
    inner: R,
    expected: String,
    what: String,
    state: State,
}

impl<R: Read> VerifyingReader<R> {
    /// Wraps `inner`, expected to hash to `digest`; `what` names the data in the error.
    pub fn new(inner: R, digest: &str, what: impl Into<String>) -> Result<Self> {
        Ok(VerifyingReader {
            inner,
            state: State::Reading(Hasher::for_digest(digest)?),
            expected: digest.to_string(),
            what: what.into(),
        })
    }

    /// The expected digest.
    pub fn digest(&self) -> &str {
        &self.expected
    }

    /// The reader underneath, for a caller that hashes the data itself anyway.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// True once the whole input was read and matched.
    pub fn is_verified(&self) -> bool {
        matches!(self.state, State::Verified)
    }

    fn mismatch(&self, actual: &str) -> io::Error {
        Error::DigestMismatch {
            what: self.what.clone(),
            expected: self.expected.clone(),
            actual: actual.to_string(),
        }
        .into()
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.state {
            State::Verified => return Ok(0),
            State::Mismatch(actual) => {
                let actual = actual.clone();
                return Err(self.mismatch(&actual));
            }
            State::Reading(_) if buf.is_empty() => return Ok(0),
            State::Reading(hasher) => {
                let n = self.inner.read(buf)?;
                if n > 0 {
                    hasher.update(&buf[..n]);
                    return Ok(n);
                }
            }
        }
        let State::Reading(hasher) = std::mem::replace(&mut self.state, State::Verified) else {
            unreachable!()
        };
        let actual = hasher.finish();
        if actual == self.expected {
            return Ok(0);
        }
        let err = self.mismatch(&actual);
        self.state = State::Mismatch(actual);
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn validates_digests() {
        let good = sha256_digest(b"x");
        validate_digest(&good).unwrap();
        validate_digest(&format!("sha512:{}", "0".repeat(128))).unwrap();
        for bad in [
            "sha256",
            "sha256:",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            &good.to_uppercase(),
            &good[..good.len() - 1],
            &format!("{good}0"),
            &good.replace("sha256:", "sha256:/"),
        ] {
            let e = validate_digest(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
        }
    }

    #[test]
    fn verifying_reader_passes_matching_data() {
        let data = vec![7u8; 100_000];
        let mut r = VerifyingReader::new(&data[..], &sha256_digest(&data), "blob").unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        assert!(r.is_verified());
        assert_eq!(r.read(&mut [0; 8]).unwrap(), 0);
    }

    #[test]
    fn verifying_reader_fails_at_eof_and_after() {
        let expected = sha256_digest(b"hello");
        let mut r = VerifyingReader::new(&b"jello"[..], &expected, "blob X").unwrap();
        let mut buf = [0u8; 3];
        assert_eq!(r.read(&mut buf).unwrap(), 3);
        assert_eq!(r.read(&mut buf).unwrap(), 2);
        let e = r.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e
            .to_string()
            .starts_with(&format!("blob X: digest mismatch: expected {expected}, got sha256:")));
        assert!(r.read(&mut buf).is_err());
        assert_eq!(Error::from(e).kind(), ErrorKind::DigestMismatch);
        assert!(!r.is_verified());
    }

    #[test]
    fn verifying_reader_catches_truncation() {
        let mut r = VerifyingReader::new(&b"hell"[..], &sha256_digest(b"hello"), "blob").unwrap();
        let e = io::copy(&mut r, &mut io::sink()).unwrap_err();
        assert_eq!(Error::from(e).kind(), ErrorKind::DigestMismatch);
    }

    #[test]
    fn verify_checks_sha512_too() {
        let d = format!("sha512:{}", hex::encode(Sha512::digest(b"abc")));
        verify("m", &d, b"abc").unwrap();
        assert_eq!(verify("m", &d, b"abd").unwrap_err().kind(), ErrorKind::DigestMismatch);
    }
}
