use std::fmt::Write as _;
use std::io;
use std::path::PathBuf;

use serde::Deserialize;

/// The coarse class of an [`Error`]: what a caller branches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The manifest, blob or repository does not exist (HTTP 404).
    NotFound,
    /// No or wrong credentials (HTTP 401, also from the token endpoint).
    Unauthorized,
    /// Authenticated but not allowed (HTTP 403).
    Denied,
    /// Content does not hash to the digest it was asked for or announced under.
    DigestMismatch,
    /// Any other HTTP error status, including 5xx/429 once the retries are spent.
    Http,
    /// Connection, TLS, timeout or local read errors.
    Io,
    /// The registry answered something this client cannot make sense of.
    Protocol,
    /// A reference, repository name or digest given by the caller is malformed.
    InvalidInput,
    /// The docker config file is unreadable or malformed, or its credential helper failed.
    Config,
    /// A `hosts.toml` (or a certificate file it names) is unreadable or malformed.
    HostsConfig,
}

/// One entry of the `errors` array a registry sends with an error status.
#[derive(Debug, Clone, Deserialize)]
pub struct RegistryError {
    /// e.g. `MANIFEST_UNKNOWN`, `BLOB_UNKNOWN`, `DENIED`, `UNAUTHORIZED`.
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
    /// Free-form detail; its shape differs between registries.
    #[serde(default)]
    pub detail: Option<serde_json::Value>,
}

/// A registry client error. Each names the request (`METHOD URL`) or the thing it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The registry answered with an unexpected HTTP status.
    #[error("{request}: HTTP {status}{}", describe_status(*status, errors, body))]
    Status {
        request: String,
        status: u16,
        /// Parsed from the body when it is the registry's error JSON.
        errors: Vec<RegistryError>,
        /// The start of the body when it was not error JSON (for proxies answering HTML or text).
        body: String,
    },
    /// Content did not hash to the expected digest.
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// The request could not be sent or its answer not received.
    #[error("{request}: {source}")]
    Transport {
        request: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// Reading local data or a response body failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The registry's answer is malformed (missing header, bad JSON, wrong Content-Range ...).
    #[error("{request}: {msg}")]
    Protocol { request: String, msg: String },
    /// A reference, repository or digest given by the caller is malformed.
    #[error("invalid {what}{}: {msg}", if value.is_empty() { String::new() } else { format!(" {value:?}") })]
    InvalidInput {
        what: &'static str,
        value: String,
        msg: String,
    },
    /// The docker config file could not be used.
    #[error("docker config {}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    /// A docker credential helper failed (not: it had no credentials for the registry).
    #[error("credential helper docker-credential-{helper} for {server}: {msg}")]
    CredentialHelper {
        helper: String,
        server: String,
        msg: String,
    },
    /// A registry's host configuration could not be used; `line` is where in the file, when known.
    #[error("{}{}: {msg}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    HostsConfig {
        path: PathBuf,
        line: Option<usize>,
        msg: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Status { status: 404, .. } => ErrorKind::NotFound,
            Error::Status { status: 401, .. } => ErrorKind::Unauthorized,
            Error::Status { status: 403, .. } => ErrorKind::Denied,
            Error::Status { .. } => ErrorKind::Http,
            Error::DigestMismatch { .. } => ErrorKind::DigestMismatch,
            Error::Transport { .. } | Error::Io { .. } => ErrorKind::Io,
            Error::Protocol { .. } => ErrorKind::Protocol,
            Error::InvalidInput { .. } => ErrorKind::InvalidInput,
            Error::Config { .. } | Error::CredentialHelper { .. } => ErrorKind::Config,
            Error::HostsConfig { .. } => ErrorKind::HostsConfig,
        }
    }

    /// The HTTP status, for errors that carry one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub(crate) fn invalid(what: &'static str, value: &str, msg: impl Into<String>) -> Error {
        Error::InvalidInput {
            what,
            value: value.to_string(),
            msg: msg.into(),
        }
    }

    pub(crate) fn protocol(request: &str, msg: impl Into<String>) -> Error {
        Error::Protocol {
            request: request.to_string(),
            msg: msg.into(),
        }
    }
}

/// Unwraps an [`Error`] that travelled inside an `io::Error` (as [`crate::Blob`] reports a digest mismatch),
/// so `Error::from(io_err).kind()` works on errors from `Read`.
impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            return *e.into_inner().unwrap().downcast::<Error>().unwrap();
        }
        Error::Io {
            what: "read".to_string(),
            source: e,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match e.kind() {
            ErrorKind::NotFound => io::ErrorKind::NotFound,
            ErrorKind::Unauthorized | ErrorKind::Denied => io::ErrorKind::PermissionDenied,
            ErrorKind::DigestMismatch | ErrorKind::Protocol => io::ErrorKind::InvalidData,
            ErrorKind::InvalidInput => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

fn describe_status(status: u16, errors: &[RegistryError], body: &str) -> String {
    let mut s = String::new();
    if let Some(reason) = ureq::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|c| c.canonical_reason())
    {
        let _ = write!(s, " {reason}");
    }
    for (i, e) in errors.iter().enumerate() {
        s.push_str(if i == 0 { ": " } else { "; " });
        match (e.code.is_empty(), e.message.is_empty()) {
            (false, false) => {
                let _ = write!(s, "{}: {}", e.code, e.message);
            }
            (false, true) => s.push_str(&e.code),
            _ => s.push_str(&e.message),
        }
        if let Some(detail) = &e.detail {
            if !detail.is_null() {
                let _ = write!(s, " ({detail})");
            }
        }
    }
    if errors.is_empty() && !body.is_empty() {
        let _ = write!(s, ": {body}");
    }
    s
}

/// Builds the [`Error::Status`] for an error response, reading the registry's error JSON from its body.
pub(crate) fn status_error(request: &str, status: u16, body: &[u8]) -> Error {
    #[derive(Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<RegistryError>,
    }
    let errors = serde_json::from_slice::<Errors>(body)
        .map(|e| e.errors)
        .unwrap_or_default();
    let body = if errors.is_empty() {
        // Enough to recognize a proxy's error page without flooding a log line.
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        match text.char_indices().nth(200) {
            Some((i, _)) => format!("{}...", &text[..i]),
            None => text.to_string(),
        }
    } else {
        String::new()
    };
    Error::Status {
        request: request.to_string(),
        status,
        errors,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_error_shows_registry_errors() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"v9"}}]}"#;
        let e = status_error("GET http://r/v2/a/manifests/v9", 404, body);
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(
            e.to_string(),
            r#"GET http://r/v2/a/manifests/v9: HTTP 404 Not Found: MANIFEST_UNKNOWN: manifest unknown ({"Tag":"v9"})"#
        );
    }

    #[test]
    fn status_error_shows_start_of_other_bodies() {
        let e = status_error("PUT http://r/x", 502, b"<html>bad gateway</html>\n");
        assert_eq!(e.kind(), ErrorKind::Http);
        assert_eq!(
            e.to_string(),
            "PUT http://r/x: HTTP 502 Bad Gateway: <html>bad gateway</html>"
        );
        let e = status_error("HEAD http://r/x", 401, b"");
        assert_eq!(e.to_string(), "HEAD http://r/x: HTTP 401 Unauthorized");
    }

    #[test]
    fn errors_survive_a_trip_through_io_error() {
        let e = Error::DigestMismatch {
            what: "blob".into(),
            expected: "a".into(),
            actual: "b".into(),
        };
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::InvalidData);
        assert_eq!(Error::from(io).kind(), ErrorKind::DigestMismatch);
        let plain = io::Error::other("boom");
        assert_eq!(Error::from(plain).kind(), ErrorKind::Io);
    }
}
