//! Layer errors: a kind to match on, the entry and offset to point at.

use std::fmt;
use std::io;

/// What went wrong, for callers that branch on it (and tests that check it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The tar or compressed stream ended early.
    Truncated,
    /// A tar header is malformed (checksum, numeric field, extension record).
    BadHeader,
    /// The compressed stream is corrupt.
    Decompress,
    /// The uncompressed layer exceeds the configured maximum size.
    SizeLimit,
    /// A path leaves the layer root.
    PathEscape,
    /// A hard link names something that is not in the layer (or is a directory).
    LinkTarget,
    /// A path goes through something that is not a directory, or a non-directory
    /// entry names the layer root.
    NotADirectory,
    /// An entry name that cannot name a file: a whiteout of nothing, of `.` or of `..`
    /// (`.wh.`, `.wh..`, `.wh...`), a NUL byte, or a component longer than 255 bytes.
    InvalidName,
    /// The input uses a feature this converter refuses (sparse files, unknown types,
    /// unknown media types or compressions, unrepresentable names).
    Unsupported,
    /// Reading the input or writing the output failed.
    Io,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Truncated => "truncated input",
            ErrorKind::BadHeader => "malformed tar header",
            ErrorKind::Decompress => "corrupt compressed stream",
            ErrorKind::SizeLimit => "layer too large",
            ErrorKind::PathEscape => "path escapes the layer root",
            ErrorKind::LinkTarget => "bad hard link",
            ErrorKind::NotADirectory => "not a directory",
            ErrorKind::InvalidName => "invalid entry name",
            ErrorKind::Unsupported => "unsupported input",
            ErrorKind::Io => "I/O error",
        }
    }
}

/// An error reading, applying or converting a layer.
#[derive(Debug)]
pub struct Error {
    /// The kind.
    pub kind: ErrorKind,
    /// Details.
    pub message: String,
    /// The tar entry concerned, when there is one.
    pub entry: Option<String>,
    /// Offset in the uncompressed stream, when known.
    pub offset: Option<u64>,
    /// The underlying I/O error, for `ErrorKind::Io`.
    pub source: Option<io::Error>,
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::io(e)
    }
}

impl Error {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            entry: None,
            offset: None,
            source: None,
        }
    }

    /// An I/O error.
    pub fn io(e: io::Error) -> Error {
        Error {
            kind: ErrorKind::Io,
            message: e.to_string(),
            entry: None,
            offset: None,
            source: Some(e),
        }
    }

    /// Names the entry (keeps an entry already named).
    pub fn entry(mut self, path: &str) -> Error {
        if self.entry.is_none() {
            self.entry = Some(path.to_string());
        }
        self
    }

    /// Records the offset (keeps one already recorded).
    pub fn at(mut self, offset: u64) -> Error {
        if self.offset.is_none() {
            self.offset = Some(offset);
        }
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.describe(), self.message)?;
        if let Some(e) = &self.entry {
            write!(f, " (entry {e:?}")?;
            if let Some(o) = self.offset {
                write!(f, " at byte {o} of the tar stream")?;
            }
            write!(f, ")")?;
        } else if let Some(o) = self.offset {
            write!(f, " (at byte {o} of the tar stream)")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}
