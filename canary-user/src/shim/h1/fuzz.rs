//! The HTTP/1.1 parsers take bytes from any client and any upstream:
//! mutated and truncated valid messages, and random bytes, must give an
//! answer or an error, never a panic, and never consume more than they
//! were given. (A seeded generator, so a failure repeats.)

use bytes::BytesMut;

use super::client::parse_head;
use super::server::{Parsed, parse_request};
use super::wire::{Chunk, Step, chunk_step};

const ROUNDS: usize = 20_000;

const REQUESTS: &[&[u8]] = &[
    b"GET /a?x=1 HTTP/1.1\r\nhost: reviews:8080\r\nx-canary-user: true\r\n\r\n",
    b"HEAD * HTTP/1.1\r\nHost: a\r\ncontent-length: 0\r\n\r\n",
    b"POST /o HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET http://reviews/p HTTP/1.0\r\nconnection: keep-alive\r\n\r\n",
];

const RESPONSES: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-backend: v1-a\r\n\r\nhello",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.0 503 Service Unavailable\r\nconnection: close\r\n\r\n",
];

const CHUNKED: &[&[u8]] = &[
    b"5;x=y\r\nhello\r\n0\r\n\r\n",
    b"a\r\n0123456789\r\n1\r\n!\r\n0\r\nx-t: 1\r\ny: 2\r\n\r\n",
];

/// A valid message, mutated: bytes flipped, cut short, spliced or random.
fn mutate(rng: &mut fastrand::Rng, seeds: &[&[u8]]) -> Vec<u8> {
    let mut m = seeds[rng.usize(..seeds.len())].to_vec();
    match rng.u8(..5) {
        0 => (0..rng.usize(1..64)).map(|_| rng.u8(..)).collect(),
        1 => {
            m.truncate(rng.usize(..=m.len()));
            m
        }
        2 => {
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(..m.len());
                m[i] = rng.u8(..);
            }
            m
        }
        3 => {
            let i = rng.usize(..=m.len());
            let junk: Vec<u8> = (0..rng.usize(1..16))
                .map(|_| {
                    *rng.choice(b"\r\n :;0aFz\t\x00\xff".iter())
                        .expect("alphabet")
                })
                .collect();
            m.splice(i..i, junk);
            m
        }
        _ => m,
    }
}

#[test]
fn request_heads_never_panic() {
    let mut rng = fastrand::Rng::with_seed(0x5eed_0001);
    // taken, handed to hyper, incomplete, refused
    let mut seen = [0usize; 4];
    for _ in 0..ROUNDS {
        let input = mutate(&mut rng, REQUESTS);
        match parse_request(&input) {
            Ok(Some(Parsed::Take(head))) => {
                assert!(head.len <= input.len());
                seen[0] += 1;
            }
            Ok(Some(Parsed::Hand)) => seen[1] += 1,
            Ok(None) => seen[2] += 1,
            Err(_) => seen[3] += 1,
        }
    }
    assert!(
        seen.iter().all(|n| *n > 0),
        "every outcome exercised: {seen:?}"
    );
}

#[test]
fn response_heads_never_panic() {
    let mut rng = fastrand::Rng::with_seed(0x5eed_0002);
    // heads parsed, incomplete, refused
    let mut seen = [0usize; 3];
    for _ in 0..ROUNDS {
        let input = mutate(&mut rng, RESPONSES);
        let mut buf = BytesMut::from(&input[..]);
        // Interim heads are consumed one by one, as `read_head` does.
        loop {
            match parse_head(&mut buf) {
                Ok(Some(_)) => {
                    assert!(buf.len() < input.len());
                    seen[0] += 1;
                }
                Ok(None) => {
                    seen[1] += 1;
                    break;
                }
                Err(_) => {
                    seen[2] += 1;
                    break;
                }
            }
        }
    }
    assert!(
        seen.iter().all(|n| *n > 0),
        "every outcome exercised: {seen:?}"
    );
}

#[test]
fn chunked_bodies_never_panic_and_always_progress() {
    let mut rng = fastrand::Rng::with_seed(0x5eed_0003);
    // ended, refused, data
    let mut seen = [0usize; 3];
    for _ in 0..ROUNDS {
        let input = mutate(&mut rng, CHUNKED);
        let mut buf = BytesMut::from(&input[..]);
        let mut state = Chunk::Size;
        // Every step consumes bytes or ends: bounded by the input.
        for _ in 0..=input.len() * 2 + 2 {
            match chunk_step(&mut state, &mut buf) {
                Ok(Step::End | Step::Trailers(_)) => {
                    seen[0] += 1;
                    break;
                }
                Err(_) => {
                    seen[1] += 1;
                    break;
                }
                Ok(Step::NeedMore) => break,
                Ok(Step::Data(d)) => {
                    assert!(!d.is_empty());
                    seen[2] += 1;
                }
                Ok(Step::Progress) => {}
            }
            if buf.is_empty() {
                break;
            }
        }
    }
    assert!(
        seen.iter().all(|n| *n > 0),
        "every outcome exercised: {seen:?}"
    );
}
