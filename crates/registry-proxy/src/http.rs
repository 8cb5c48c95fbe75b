//! Just enough HTTP/1.1 for a forwarding proxy: message heads, and bodies copied by their framing.

use std::io::{self, BufRead, Read, Write};

/// Longest request or status line, or header line, accepted.
const MAX_LINE: u64 = 16 << 10;
/// Most header lines accepted in one head.
const MAX_HEADERS: usize = 200;

/// A request or response head: the start line and the header fields, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// `GET /v2/ HTTP/1.1` or `HTTP/1.1 200 OK`, without the line end.
    pub start: String,
    /// Field names as sent; values trimmed.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header (`Connection`, `Transfer-Encoding`) lists `token`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The three parts of the start line (the last one may contain spaces: a reason phrase).
    pub fn parts(&self) -> (&str, &str, &str) {
        let mut it = self.start.splitn(3, ' ');
        let a = it.next().unwrap_or("");
        let b = it.next().unwrap_or("");
        let c = it.next().unwrap_or("");
        (a, b, c)
    }

    /// The head as sent on the wire, ending with the empty line.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = String::with_capacity(256);
        out.push_str(&self.start);
        out.push_str("\r\n");
        for (k, v) in &self.headers {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

/// How a message's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (a response without length).
    UntilEof,
}

/// The framing of a request body.
pub fn request_framing(head: &Head) -> io::Result<Framing> {
    if head.header("transfer-encoding").is_some() {
        if head.has_token("transfer-encoding", "chunked") {
            return Ok(Framing::Chunked);
        }
        return Err(bad("request Transfer-Encoding without chunked"));
    }
    match content_length(head)? {
        Some(0) | None => Ok(Framing::None),
        Some(n) => Ok(Framing::Length(n)),
    }
}

/// The framing of a response body to a request with `method`.
pub fn response_framing(method: &str, status: u16, head: &Head) -> io::Result<Framing> {
    if method.eq_ignore_ascii_case("HEAD") || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::None);
    }
    if head.header("transfer-encoding").is_some() {
        return Ok(if head.has_token("transfer-encoding", "chunked") {
            Framing::Chunked
        } else {
            Framing::UntilEof
        });
    }
    Ok(match content_length(head)? {
        Some(0) => Framing::None,
        Some(n) => Framing::Length(n),
        None => Framing::UntilEof,
    })
}

fn content_length(head: &Head) -> io::Result<Option<u64>> {
    match head.header("content-length") {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| bad(&format!("bad Content-Length {v:?}"))),
    }
}

/// An `InvalidData` error.
pub fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Reads one line ending with LF (the line end is stripped); `None` at EOF before any byte.
fn read_line(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    r.take(MAX_LINE).read_until(b'\n', &mut buf)?;
    if buf.is_empty() {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(if buf.len() as u64 >= MAX_LINE {
            bad("line too long")
        } else {
            io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-line")
        });
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Reads a message head; `None` when the connection closed cleanly before one started.
///
/// A request must start with an ASCII letter: anything else (a TLS ClientHello from a client trying
/// HTTPS first) is an `InvalidData` error at once, without waiting for a line end that never comes.
pub fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let start = loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(None);
        }
        if !buf[0].is_ascii_alphabetic() && buf[0] != b'\r' && buf[0] != b'\n' {
            return Err(bad("not an HTTP message"));
        }
        match read_line(r)? {
            None => return Ok(None),
            // Empty lines before a request are allowed (RFC 9112 2.2).
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed in head"))?;
        if line.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(bad("too many header fields"));
        }
        let (k, v) = line.split_once(':').ok_or_else(|| bad("header line without colon"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(Some(Head { start, headers }))
}

/// What happens to the body bytes as they pass (the payload only, not chunk framing).
pub trait BodyHook {
    /// How many bytes to pass at a time.
    fn chunk_size(&self) -> usize {
        64 << 10
    }

    /// Sees (and may change) each piece of payload before it is written; an error aborts the copy.
    fn data(&mut self, _buf: &mut [u8]) -> io::Result<()> {
        Ok(())
    }
}

/// A hook that passes bytes unchanged.
pub struct NoHook;

impl BodyHook for NoHook {}

/// Copies one body of `framing` from `src` to `dst`, keeping its framing; returns the payload bytes.
pub fn copy_body(
    src: &mut impl BufRead,
    dst: &mut impl Write,
    framing: Framing,
    hook: &mut dyn BodyHook,
) -> io::Result<u64> {
    let mut buf = vec![0u8; hook.chunk_size().max(1)];
    match framing {
        Framing::None => Ok(0),
        Framing::Length(n) => copy_exact(src, dst, n, &mut buf, hook),
        Framing::UntilEof => {
            let mut total = 0;
            loop {
                let k = src.read(&mut buf)?;
                if k == 0 {
                    return Ok(total);
                }
                hook.data(&mut buf[..k])?;
                dst.write_all(&buf[..k])?;
                total += k as u64;
            }
        }
        Framing::Chunked => {
            let mut total = 0;
            loop {
                let line = read_line(src)?
                    .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed in chunked body"))?;
                let size_hex = line.split(';').next().unwrap_or("").trim();
                let size = u64::from_str_radix(size_hex, 16).map_err(|_| bad(&format!("bad chunk size {line:?}")))?;
                dst.write_all(format!("{line}\r\n").as_bytes())?;
                if size == 0 {
                    // Trailer fields, then the empty line.
                    loop {
                        let t = read_line(src)?
                            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed in trailer"))?;
                        dst.write_all(format!("{t}\r\n").as_bytes())?;
                        if t.is_empty() {
                            return Ok(total);
                        }
                    }
                }
                total += copy_exact(src, dst, size, &mut buf, hook)?;
                let end = read_line(src)?;
                if end.as_deref() != Some("") {
                    return Err(bad("chunk data not followed by CRLF"));
                }
                dst.write_all(b"\r\n")?;
            }
        }
    }
}

fn copy_exact(
    src: &mut impl Read,
    dst: &mut impl Write,
    n: u64,
    buf: &mut [u8],
    hook: &mut dyn BodyHook,
) -> io::Result<u64> {
    let mut left = n;
    while left > 0 {
        let want = (buf.len() as u64).min(left) as usize;
        let k = src.read(&mut buf[..want])?;
        if k == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "body ended early"));
        }
        hook.data(&mut buf[..k])?;
        dst.write_all(&buf[..k])?;
        left -= k as u64;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_head() {
        let mut r = &b"\r\nGET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\nrest"[..];
        let h = read_head(&mut r).unwrap().unwrap();
        assert_eq!(h.parts(), ("GET", "/v2/", "HTTP/1.1"));
        assert_eq!(h.header("host"), Some("x"));
        assert_eq!(request_framing(&h).unwrap(), Framing::Chunked);
        assert_eq!(r, b"rest");
        assert!(read_head(&mut &b""[..]).unwrap().is_none());
        assert!(read_head(&mut &b"\x16\x03\x01"[..]).is_err());
    }

    #[test]
    fn copies_chunked_bodies_with_trailers() {
        struct Upper;
        impl BodyHook for Upper {
            fn chunk_size(&self) -> usize {
                2
            }
            fn data(&mut self, buf: &mut [u8]) -> io::Result<()> {
                buf.make_ascii_uppercase();
                Ok(())
            }
        }
        let body = b"5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\nnext";
        let mut src = &body[..];
        let mut out = Vec::new();
        let n = copy_body(&mut src, &mut out, Framing::Chunked, &mut Upper).unwrap();
        assert_eq!(n, 8);
        assert_eq!(out, b"5;ext=1\r\nHELLO\r\n3\r\nABC\r\n0\r\nX-T: 1\r\n\r\n");
        assert_eq!(src, b"next");
    }

    #[test]
    fn response_framing_rules() {
        let h = |hs: &[(&str, &str)]| Head {
            start: "HTTP/1.1 200 OK".into(),
            headers: hs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        assert_eq!(
            response_framing("HEAD", 200, &h(&[("Content-Length", "5")])).unwrap(),
            Framing::None
        );
        assert_eq!(
            response_framing("GET", 200, &h(&[("Content-Length", "5")])).unwrap(),
            Framing::Length(5)
        );
        assert_eq!(response_framing("GET", 200, &h(&[])).unwrap(), Framing::UntilEof);
        assert_eq!(response_framing("GET", 304, &h(&[])).unwrap(), Framing::None);
    }
}
