//! HTTP/1.1 wire pieces both directions share: limits, reads into a
//! buffer, header blocks, body slices, and the chunked decoder.

use std::io::{self, Write as _};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncRead, ReadBuf};

use crate::shim::body::BoxError;

/// A request or response head (start line and headers) may take this
/// much at most: Envoy's `max_request_headers_kb` default, 60 KiB, rounded
/// up (hyper's buffer allows ~400 KB).
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// Header fields per head or trailer block (hyper's default).
pub(super) const MAX_HEADERS: usize = 100;
/// What one read asks the kernel for.
const READ_SIZE: usize = 8 * 1024;
/// A chunk size line (hex digits and extensions) longer than this is
/// refused.
pub(super) const MAX_CHUNK_LINE: usize = 1024;
/// Body bytes at least this many go out as a slice of the read buffer
/// (no copy; the next read allocates a new buffer); fewer are copied, so
/// the buffer stays whole and is reused.
pub(super) const SPLIT_MIN: usize = 4 * 1024;

/// One read from the peer into `buf`.
pub(super) async fn read_more<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_more(Pin::new(&mut *rd), cx, buf)).await
}

/// One read from the peer into `buf` (with at least `READ_SIZE` bytes of
/// room); 0 at the end of stream.
pub(super) fn poll_read_more<R: AsyncRead>(
    rd: Pin<&mut R>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    buf.reserve(READ_SIZE);
    let n = {
        let spare = buf.spare_capacity_mut();
        let mut rb = ReadBuf::uninit(spare);
        ready!(rd.poll_read(cx, &mut rb))?;
        rb.filled().len()
    };
    // SAFETY: `poll_read` initialised the first `n` spare bytes.
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

/// Parsed header fields as a map (`what` names them in errors).
pub(super) fn header_map(
    fields: &[httparse::Header<'_>],
    what: &str,
) -> Result<HeaderMap, BoxError> {
    // One spare entry: a map exactly full grows (a reallocation and a
    // rehash) on the next insert, even one that replaces a field, as the
    // shim's `host` does for every request.
    let mut map = HeaderMap::with_capacity(fields.len() + 1);
    for f in fields {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| format!("bad {what} name {:?}", f.name))?;
        let value =
            HeaderValue::from_bytes(f.value).map_err(|_| format!("bad value in {what} {name}"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// Appends `name: value\r\n` for every field.
pub(super) fn put_fields(out: &mut Vec<u8>, h: &HeaderMap) {
    for (k, v) in h {
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Appends one chunk of a chunked body (RFC 9112 §7.1). An empty one is
/// skipped: it would read as the last chunk.
pub(super) fn put_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends the last chunk and the trailer section of a chunked body.
pub(super) fn put_last_chunk(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    if let Some(t) = trailers {
        put_fields(out, t);
    }
    out.extend_from_slice(b"\r\n");
}

/// Whether a comma-separated header lists `token` (case-insensitive).
pub(super) fn has_token(h: &HeaderMap, name: HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Chunk {
    /// Reading a chunk size line.
    Size,
    /// This many data bytes left in the chunk.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section after the last chunk.
    Trailers,
}

/// Up to `max` bytes from the front of `buf`, sliced off when large
/// (no copy) and copied when small (the buffer stays whole for reuse).
pub(super) fn take_data(buf: &mut BytesMut, max: u64) -> Bytes {
    let n = buf.len().min(usize::try_from(max).unwrap_or(usize::MAX));
    if n >= SPLIT_MIN {
        buf.split_to(n).freeze()
    } else {
        let data = Bytes::copy_from_slice(&buf[..n]);
        buf.advance(n);
        data
    }
}

pub(super) enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The last chunk and an empty trailer section.
    End,
    /// A state change; go on with what is buffered.
    Progress,
    NeedMore,
}

/// One step of the chunked decoder over what `buf` holds.
pub(super) fn chunk_step(state: &mut Chunk, buf: &mut BytesMut) -> Result<Step, BoxError> {
    match state {
        Chunk::Size => {
            let Some(eol) = find_crlf(buf) else {
                return if buf.len() > MAX_CHUNK_LINE {
                    Err("chunk size line too long".into())
                } else {
                    Ok(Step::NeedMore)
                };
            };
            let line = &buf[..eol];
            // Extensions (`;name=value`) are ignored, as RFC 9112 allows.
            let digits = line.split(|b| *b == b';').next().unwrap_or_default();
            let digits = std::str::from_utf8(digits)
                .map_err(|_| "bad chunk size")?
                .trim_matches([' ', '\t']);
            if digits.is_empty() || digits.len() > 15 {
                return Err(format!("bad chunk size {digits:?}").into());
            }
            let size = u64::from_str_radix(digits, 16)
                .map_err(|_| format!("bad chunk size {digits:?}"))?;
            buf.advance(eol + 2);
            *state = if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            };
            Ok(Step::Progress)
        }
        Chunk::Data(left) => {
            let data = take_data(buf, *left);
            *left -= data.len() as u64;
            if *left == 0 {
                *state = Chunk::DataEnd;
            }
            Ok(Step::Data(data))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::NeedMore);
            }
            if &buf[..2] != b"\r\n" {
                return Err("missing CRLF after chunk data".into());
            }
            buf.advance(2);
            *state = Chunk::Size;
            Ok(Step::Progress)
        }
        Chunk::Trailers => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
                return Ok(Step::End);
            }
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(buf, &mut fields) {
                Ok(httparse::Status::Complete((len, fields))) => {
                    let trailers = header_map(fields, "trailer")?;
                    buf.advance(len);
                    Ok(Step::Trailers(trailers))
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => Ok(Step::NeedMore),
                Ok(httparse::Status::Partial) => Err("trailers too long".into()),
                Err(e) => Err(format!("bad trailers: {e}").into()),
            }
        }
    }
}

pub(super) fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chunked_decoder_takes_its_input_a_byte_at_a_time() {
        let wire =
            b"4\r\nWiki\r\n6;name=v\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nx-t: 1\r\n\r\n";
        let mut state = Chunk::Size;
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut trailers = None;
        let mut ended = false;
        for b in wire {
            buf.extend_from_slice(&[*b]);
            loop {
                match chunk_step(&mut state, &mut buf).expect("valid") {
                    Step::Data(d) => data.extend_from_slice(&d),
                    Step::Trailers(t) => {
                        trailers = Some(t);
                        ended = true;
                    }
                    Step::End => ended = true,
                    Step::Progress => continue,
                    Step::NeedMore => {}
                }
                if buf.is_empty() || ended {
                    break;
                }
                if matches!(state, Chunk::Size | Chunk::DataEnd | Chunk::Trailers) {
                    break;
                }
            }
        }
        assert!(ended);
        assert_eq!(
            String::from_utf8_lossy(&data),
            "Wikipedia in \r\n\r\nchunks."
        );
        assert_eq!(trailers.expect("trailers")["x-t"], "1");
    }
}
