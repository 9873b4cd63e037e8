//! Protocol detection from the bytes that flow anyway: the first chunk a
//! client sends decides HTTP/1.1, HTTP/2 or opaque TCP, and request
//! trackers follow the streams without holding any bytes back (nothing is
//! buffered beyond a 9-byte HTTP/2 frame header).

use std::{collections::HashMap, time::Instant};

/// The client preface of HTTP/2 (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Opaque => "tcp",
        }
    }
}

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Classifies the first bytes a client sent.
pub fn classify(first: &[u8]) -> Protocol {
    let n = first.len().min(H2_PREFACE.len());
    if n >= 4 && first[..n] == H2_PREFACE[..n] {
        return Protocol::Http2;
    }
    if METHODS.iter().any(|m| first.starts_with(m)) {
        return Protocol::Http1;
    }
    Protocol::Opaque
}

/// Whether the first byte opens a TLS handshake record (a ClientHello).
pub fn is_tls_handshake(first: u8) -> bool {
    first == 0x16
}

/// Whether a TLS ClientHello (as peeked, from its record header on) offers
/// the ALPN protocol `alpn`; `None` while the record is still incomplete.
/// ALPN names are length-prefixed in the extension, and the ClientHello is
/// plaintext, so the prefixed name appearing in it is the offer.
pub fn client_hello_offers(peeked: &[u8], alpn: &[u8]) -> Option<bool> {
    let needle: Vec<u8> = std::iter::once(alpn.len() as u8)
        .chain(alpn.iter().copied())
        .collect();
    let found = peeked.windows(needle.len()).any(|w| w == needle.as_slice());
    if found {
        return Some(true);
    }
    let record_len = 5 + usize::from(u16::from_be_bytes([*peeked.get(3)?, *peeked.get(4)?]));
    (peeked.len() >= record_len).then_some(false)
}

/// Requests seen and their latency (request start to first response byte).
#[derive(Debug)]
pub enum Tracker {
    Http1(Http1),
    Http2(Http2),
    Opaque,
}

impl Tracker {
    pub fn new(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Http1 => Tracker::Http1(Http1::default()),
            Protocol::Http2 => Tracker::Http2(Http2::default()),
            Protocol::Opaque => Tracker::Opaque,
        }
    }

    /// Bytes from the client; returns how many requests started.
    pub fn client_data(&mut self, chunk: &[u8], now: Instant) -> u64 {
        match self {
            Tracker::Http1(t) => t.client_data(now),
            Tracker::Http2(t) => t.client_data(chunk, now),
            Tracker::Opaque => 0,
        }
    }

    /// Bytes from the server; returns the latencies of requests answered.
    pub fn server_data(&mut self, chunk: &[u8], now: Instant) -> Vec<std::time::Duration> {
        match self {
            Tracker::Http1(t) => t.server_data(now).into_iter().collect(),
            Tracker::Http2(t) => t.server_data(chunk, now),
            Tracker::Opaque => Vec::new(),
        }
    }
}

/// HTTP/1.1 without pipelining: client bytes after a response (or at the
/// start) begin a request; the first server bytes after it answer it.
#[derive(Debug, Default)]
pub struct Http1 {
    pending: Option<Instant>,
    responding: bool,
}

impl Http1 {
    fn client_data(&mut self, now: Instant) -> u64 {
        if self.pending.is_none() {
            self.pending = Some(now);
            self.responding = false;
            return 1;
        }
        0
    }

    fn server_data(&mut self, now: Instant) -> Option<std::time::Duration> {
        let start = self.pending.take()?;
        self.responding = true;
        Some(now.saturating_duration_since(start))
    }
}

/// Follows frame headers of one direction of an HTTP/2 connection.
#[derive(Debug, Default)]
struct Frames {
    preface_left: usize,
    header: [u8; 9],
    have: usize,
    payload_left: usize,
}

impl Frames {
    /// Calls `f(type, stream)` for each frame header completed in `chunk`.
    fn feed(&mut self, mut chunk: &[u8], mut f: impl FnMut(u8, u32)) {
        while !chunk.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(chunk.len());
                self.preface_left -= n;
                chunk = &chunk[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(chunk.len());
                self.payload_left -= n;
                chunk = &chunk[n..];
            } else {
                let n = (9 - self.have).min(chunk.len());
                self.header[self.have..self.have + n].copy_from_slice(&chunk[..n]);
                self.have += n;
                chunk = &chunk[n..];
                if self.have == 9 {
                    self.have = 0;
                    let h = self.header;
                    self.payload_left =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    f(h[3], stream);
                }
            }
        }
    }
}

const HEADERS: u8 = 0x1;
/// Streams awaiting a response that are remembered (a client that opens
/// more without answers stops being timed, never grows memory).
const MAX_OPEN_STREAMS: usize = 1024;

/// HTTP/2: a HEADERS frame on a new client stream starts a request; the
/// server's first HEADERS on that stream answers it.
#[derive(Debug)]
pub struct Http2 {
    client: Frames,
    server: Frames,
    open: HashMap<u32, Instant>,
    highest: u32,
}

impl Default for Http2 {
    fn default() -> Self {
        Self {
            client: Frames {
                preface_left: H2_PREFACE.len(),
                ..Frames::default()
            },
            server: Frames::default(),
            open: HashMap::new(),
            highest: 0,
        }
    }
}

impl Http2 {
    fn client_data(&mut self, chunk: &[u8], now: Instant) -> u64 {
        let mut started = 0;
        let (open, highest) = (&mut self.open, &mut self.highest);
        self.client.feed(chunk, |ty, stream| {
            // Trailers are HEADERS too, on a stream already open.
            if ty == HEADERS && stream > *highest {
                *highest = stream;
                started += 1;
                if open.len() < MAX_OPEN_STREAMS {
                    open.insert(stream, now);
                }
            }
        });
        started
    }

    fn server_data(&mut self, chunk: &[u8], now: Instant) -> Vec<std::time::Duration> {
        let mut done = Vec::new();
        let open = &mut self.open;
        self.server.feed(chunk, |ty, stream| {
            if ty == HEADERS
                && let Some(start) = open.remove(&stream)
            {
                done.push(now.saturating_duration_since(start));
            }
        });
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(classify(b"POST /x HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(classify(H2_PREFACE), Protocol::Http2);
        assert_eq!(classify(b"PRI * HT"), Protocol::Http2);
        assert_eq!(classify(b"\x16\x03\x01"), Protocol::Opaque);
        assert_eq!(classify(b"hello"), Protocol::Opaque);
    }

    #[test]
    fn finds_the_mesh_alpn_in_a_client_hello() {
        let mut hello = vec![0x16, 0x03, 0x01, 0x00, 20];
        hello.extend_from_slice(b"\x00\x0e\x0bskep-mesh/1\x00\x00\x00\x00\x00");
        assert_eq!(client_hello_offers(&hello, b"skep-mesh/1"), Some(true));
        let mut other = vec![0x16, 0x03, 0x01, 0x00, 7];
        other.extend_from_slice(b"\x00\x03\x02h2\x00\x00");
        assert_eq!(client_hello_offers(&other, b"skep-mesh/1"), Some(false));
        assert_eq!(client_hello_offers(&other[..9], b"skep-mesh/1"), None);
        assert_eq!(client_hello_offers(&other[..2], b"skep-mesh/1"), None);
    }

    #[test]
    fn http1_counts_request_response_pairs() {
        let t0 = Instant::now();
        let mut t = Tracker::new(Protocol::Http1);
        assert_eq!(t.client_data(b"GET / HTTP/1.1\r\n", t0), 1);
        assert_eq!(t.client_data(b"Host: x\r\n\r\n", t0), 0);
        let l = t.server_data(b"HTTP/1.1 200 OK\r\n", t0 + Duration::from_millis(5));
        assert_eq!(l, vec![Duration::from_millis(5)]);
        assert!(t.server_data(b"body", t0).is_empty());
        assert_eq!(t.client_data(b"GET /2 HTTP/1.1\r\n\r\n", t0), 1);
    }

    fn frame(ty: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, 0];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn http2_counts_streams_across_chunk_boundaries() {
        let t0 = Instant::now();
        let mut t = Tracker::new(Protocol::Http2);
        let mut client = H2_PREFACE.to_vec();
        client.extend(frame(0x4, 0, &[0; 6])); // SETTINGS
        client.extend(frame(HEADERS, 1, &[1, 2, 3]));
        client.extend(frame(0x0, 1, b"data"));
        client.extend(frame(HEADERS, 3, &[4]));
        let mut started = 0;
        for piece in client.chunks(5) {
            started += t.client_data(piece, t0);
        }
        assert_eq!(started, 2);
        let mut server = frame(0x4, 0, &[]);
        server.extend(frame(HEADERS, 3, &[9]));
        server.extend(frame(HEADERS, 1, &[9]));
        let later = t0 + Duration::from_millis(2);
        let mut latencies = Vec::new();
        for piece in server.chunks(4) {
            latencies.extend(t.server_data(piece, later));
        }
        assert_eq!(latencies.len(), 2);
    }
}
