//! Just enough HTTP/1.1 for `canary-backend` and `canary-probe`: message
//! heads, `Content-Length` and chunked bodies, over any `Read`.

use std::io::{self, Read};

/// Largest message head either side accepts.
pub const MAX_HEAD: usize = 64 * 1024;

/// A parsed request or status line plus headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Head {
    /// `GET / HTTP/1.1` or `HTTP/1.1 200 OK`.
    pub start_line: String,
    pub headers: Vec<(String, String)>,
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// Until the peer closes (responses only).
    Close,
}

/// Buffered reading of HTTP messages; keeps bytes of a following
/// (pipelined) message for the next call.
#[derive(Debug)]
pub struct HttpReader<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
}

// === impl Head ===

impl Head {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether header `name` holds `token` in its comma-separated list.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The three words of the start line (the third may hold spaces).
    pub fn start_parts(&self) -> (&str, &str, &str) {
        let mut parts = self.start_line.splitn(3, ' ');
        let a = parts.next().unwrap_or("");
        let b = parts.next().unwrap_or("");
        let c = parts.next().unwrap_or("");
        (a, b, c)
    }

    /// The status code of a response head.
    pub fn status(&self) -> Option<u16> {
        let (version, code, _) = self.start_parts();
        if !version.starts_with("HTTP/") {
            return None;
        }
        code.parse().ok()
    }

    /// Body framing of a request (no body unless announced).
    pub fn request_framing(&self) -> io::Result<Framing> {
        if self.has_token("transfer-encoding", "chunked") {
            return Ok(Framing::Chunked);
        }
        Ok(Framing::Length(self.content_length()?.unwrap_or(0)))
    }

    /// Body framing of a response to a non-HEAD request.
    pub fn response_framing(&self) -> io::Result<Framing> {
        if matches!(self.status(), Some(100..=199 | 204 | 304)) {
            return Ok(Framing::Length(0));
        }
        if self.has_token("transfer-encoding", "chunked") {
            return Ok(Framing::Chunked);
        }
        Ok(self
            .content_length()?
            .map_or(Framing::Close, Framing::Length))
    }

    fn content_length(&self) -> io::Result<Option<u64>> {
        self.header("content-length")
            .map(|v| {
                v.trim()
                    .parse()
                    .map_err(|_| invalid(format!("bad Content-Length {v:?}")))
            })
            .transpose()
    }

    /// Parses a head (without its final blank line).
    pub fn parse(bytes: &[u8]) -> io::Result<Head> {
        let text = std::str::from_utf8(bytes).map_err(|_| invalid("head is not UTF-8"))?;
        let mut lines = text.split("\r\n");
        let start_line = lines.next().unwrap_or("").to_owned();
        if start_line.is_empty() {
            return Err(invalid("empty start line"));
        }
        let headers = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                l.split_once(':')
                    .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                    .ok_or_else(|| invalid(format!("bad header line {l:?}")))
            })
            .collect::<io::Result<_>>()?;
        Ok(Head {
            start_line,
            headers,
        })
    }
}

// === impl HttpReader ===

impl<R: Read> HttpReader<R> {
    pub fn new(inner: R) -> Self {
        HttpReader {
            inner,
            buf: Vec::with_capacity(4096),
            pos: 0,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Reads the next message head; `None` on a clean end of stream before
    /// its first byte.
    pub fn read_head(&mut self) -> io::Result<Option<Head>> {
        loop {
            let pending = &self.buf[self.pos..];
            if let Some(end) = find(pending, b"\r\n\r\n") {
                let head = Head::parse(&pending[..end])?;
                self.pos += end + 4;
                return Ok(Some(head));
            }
            if pending.len() > MAX_HEAD {
                return Err(invalid("message head too large"));
            }
            if self.fill()? == 0 {
                return if self.buf.len() == self.pos {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a message head",
                    ))
                };
            }
        }
    }

    /// Reads a body with the given framing, up to `limit` bytes.
    pub fn read_body(&mut self, framing: Framing, limit: usize) -> io::Result<Vec<u8>> {
        match framing {
            Framing::Length(n) => {
                let n = usize::try_from(n)
                    .ok()
                    .filter(|n| *n <= limit)
                    .ok_or_else(|| invalid("body too large"))?;
                self.take(n)
            }
            Framing::Chunked => self.read_chunked(limit),
            Framing::Close => {
                let mut body = self.buf.split_off(self.pos);
                self.buf.clear();
                self.pos = 0;
                (&mut self.inner)
                    .take((limit - body.len().min(limit)) as u64 + 1)
                    .read_to_end(&mut body)?;
                if body.len() > limit {
                    return Err(invalid("body too large"));
                }
                Ok(body)
            }
        }
    }

    fn read_chunked(&mut self, limit: usize) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line()?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, up to the blank line.
                while !self.read_line()?.is_empty() {}
                return Ok(body);
            }
            if body.len() + size > limit {
                return Err(invalid("body too large"));
            }
            body.extend_from_slice(&self.take(size)?);
            if !self.read_line()?.is_empty() {
                return Err(invalid("chunk not followed by CRLF"));
            }
        }
    }

    fn read_line(&mut self) -> io::Result<String> {
        loop {
            let pending = &self.buf[self.pos..];
            if let Some(end) = find(pending, b"\r\n") {
                let line = String::from_utf8_lossy(&pending[..end]).into_owned();
                self.pos += end + 2;
                return Ok(line);
            }
            if pending.len() > MAX_HEAD {
                return Err(invalid("line too long"));
            }
            if self.fill()? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() - self.pos < n {
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a body",
                ));
            }
        }
        let out = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n;
        Ok(out)
    }

    /// Reads more bytes into the buffer; returns how many (0 at the end).
    fn fill(&mut self) -> io::Result<usize> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let len = self.buf.len();
        self.buf.resize(len + 4096, 0);
        let res = loop {
            match self.inner.read(&mut self.buf[len..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        self.buf.truncate(len + *res.as_ref().unwrap_or(&0));
        res
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pipelined_requests_with_bodies() -> io::Result<()> {
        let wire: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nhost: y\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\nT: 1\r\n\r\n\
GET /c HTTP/1.0\r\n\r\n";
        let mut r = HttpReader::new(wire);
        let a = r.read_head()?.expect("first head");
        assert_eq!(a.start_parts(), ("POST", "/a", "HTTP/1.1"));
        assert_eq!(a.header("HOST"), Some("x"));
        assert_eq!(r.read_body(a.request_framing()?, 1 << 20)?, b"hello");
        let b = r.read_head()?.expect("second head");
        assert_eq!(b.header("Host"), Some("y"));
        assert_eq!(b.request_framing()?, Framing::Chunked);
        assert_eq!(r.read_body(Framing::Chunked, 1 << 20)?, b"abcde");
        let c = r.read_head()?.expect("third head");
        assert_eq!(c.start_parts().2, "HTTP/1.0");
        assert_eq!(r.read_body(c.request_framing()?, 1 << 20)?, b"");
        assert!(r.read_head()?.is_none());
        Ok(())
    }

    #[test]
    fn reads_responses() -> io::Result<()> {
        let wire: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 3\r\n\r\nabc";
        let mut r = HttpReader::new(wire);
        let head = r.read_head()?.expect("head");
        assert_eq!(head.status(), Some(503));
        assert_eq!(r.read_body(head.response_framing()?, 100)?, b"abc");

        let wire: &[u8] = b"HTTP/1.0 200 OK\r\n\r\nuntil close";
        let mut r = HttpReader::new(wire);
        let head = r.read_head()?.expect("head");
        assert_eq!(head.response_framing()?, Framing::Close);
        assert_eq!(r.read_body(Framing::Close, 100)?, b"until close");
        Ok(())
    }

    #[test]
    fn rejects_truncated_and_malformed_messages() {
        let mut r = HttpReader::new(&b"GET / HTTP/1.1\r\nHost"[..]);
        assert_eq!(
            r.read_head().map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::UnexpectedEof)
        );
        let mut r = HttpReader::new(&b"GET / HTTP/1.1\r\nno colon\r\n\r\n"[..]);
        assert!(r.read_head().is_err());
        let head = Head::parse(b"GET / HTTP/1.1\r\nContent-Length: x").expect("parses");
        assert!(head.request_framing().is_err());
    }
}
