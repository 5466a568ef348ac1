//! HTTP/1.1 or h2c? Told apart by peeking at a connection's first bytes.
//!
//! hyper-util's auto server reads the first bytes itself and replays them
//! to hyper through a rewind buffer. hyper then finds its 8 KiB read
//! buffer already holding them and doubles it before its next read, so
//! every HTTP/1.1 connection kept 16 KiB of read buffer for as long as it
//! stayed open. Peeking leaves the bytes in the socket: hyper's own first
//! read takes them, and its buffer stays at 8 KiB. Only when the first
//! bytes are still a prefix of the h2 preface (a lone `P` could start
//! `POST` or `PRI`) is the choice left to the auto server.

use std::io;

use tokio::net::TcpStream;

/// What every h2c connection with prior knowledge starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    Http2,
    /// Too few bytes yet (or none: the client closed) to tell.
    Undecided,
}

/// The protocol the bytes received so far begin.
pub(crate) fn classify(first: &[u8]) -> Protocol {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        Protocol::Http1
    } else if n == H2_PREFACE.len() {
        Protocol::Http2
    } else {
        Protocol::Undecided
    }
}

/// Waits for the client's first bytes and classifies them, leaving them in
/// the socket.
pub(crate) async fn peek(stream: &TcpStream) -> io::Result<Protocol> {
    let mut first = [0u8; H2_PREFACE.len()];
    let n = stream.peek(&mut first).await?;
    Ok(classify(&first[..n]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_http1_from_their_first_differing_byte() {
        for req in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /x HTTP/1.1\r\n",
            b"PUT",
            b"PATCH",
            b"PROPFIND /",
            b"OPTIONS *",
        ] {
            assert_eq!(
                classify(req),
                Protocol::Http1,
                "{:?}",
                String::from_utf8_lossy(req)
            );
        }
    }

    #[test]
    fn the_whole_preface_is_h2_and_a_part_of_it_is_undecided() {
        assert_eq!(classify(H2_PREFACE), Protocol::Http2);
        let mut with_frame = H2_PREFACE.to_vec();
        with_frame.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(classify(&with_frame), Protocol::Http2);
        assert_eq!(classify(b""), Protocol::Undecided);
        assert_eq!(classify(b"P"), Protocol::Undecided);
        assert_eq!(classify(b"PR"), Protocol::Undecided);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Protocol::Undecided);
    }

    #[tokio::test]
    async fn peeking_leaves_the_bytes_for_the_server() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(peek(&server).await.expect("peek"), Protocol::Http1);
        let mut got = [0u8; 18];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"GET / HTTP/1.1\r\n\r\n");
    }
}
