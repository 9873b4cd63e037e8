//! The HTTP/1.1 fast path: a connection loop that parses request heads
//! with httparse straight out of one reused buffer, routes on the borrowed
//! host and path, writes the rewritten head (and body) to a pooled
//! upstream connection ([`crate::upstream`]), and streams the upstream's
//! head and body back, re-framed where needed.
//!
//! Why: hyper's server side built a `Request` with a `HeaderMap` per
//! request, ran its dispatcher state machine and serialized the response
//! from another `HeaderMap`; under the ingress benchmark that was most of
//! the proxy's user-space CPU per plain request (profiled with perf). Here
//! a keep-alive request costs one read from the client, one write and one
//! read upstream and one write back, and no allocation.
//!
//! Everything it does not handle itself goes to the hyper path
//! ([`Proxy::serve_conn`]) with the bytes already read replayed in front
//! of the connection ([`Rewind`]), so behaviour there is unchanged:
//! `Upgrade` (WebSocket, h2c), `Expect`, HTTP/1.0, HTTP/2's preface,
//! absolute-form or `*` targets, requests without exactly one Host,
//! ambiguous framing (Content-Length with Transfer-Encoding, codings other
//! than chunked, repeated lengths) and anything httparse rejects (hyper
//! answers those 400). Heads above [`MAX_REQUEST_HEAD`] or with more
//! than 100 headers are answered 431 here, as hyper would.
//!
//! Framing (RFC 9112): request bodies keep their Content-Length or are
//! decoded and re-chunked (extensions and trailers dropped, so the
//! upstream never parses the client's chunk syntax); responses keep their
//! Content-Length, chunked ones are decoded and re-chunked, and responses
//! delimited by the upstream's close reach the client chunked, so the
//! client's connection survives them. HEAD, 1xx, 204 and 304 carry no
//! body. Hop-by-hop headers are dropped both ways, X-Forwarded-For is
//! appended and X-Forwarded-Host/-Proto set, as on the hyper path.

use crate::{
    proxy::{self, Conn, Proxy},
    routes::Backend,
    upstream::{self, UpstreamError},
};
use bytes::{Buf, Bytes, BytesMut};
use std::{
    io::{self, Write as _},
    mem::MaybeUninit,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Request heads larger than this are answered 431 (nginx's default
/// large header buffers hold 4 × 8 KiB).
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// hyper's limit too (more: 431).
const MAX_REQUEST_HEADERS: usize = 100;
const MAX_RESPONSE_HEADERS: usize = 128;
/// Header names a `Connection` header may list (more: the hyper path).
const MAX_LISTED: usize = 8;
/// The client's read buffer starts at this and grows up to
/// [`MAX_REQUEST_HEAD`] for large heads.
const INITIAL_BUF: usize = 4 * 1024;
/// A chunk-size line (with extensions) longer than this is malformed.
const MAX_CHUNK_LINE: usize = 1024;
const MAX_TRAILERS: usize = 16 * 1024;
/// Closing a connection whose request body was not read: the client gets
/// the answer and a FIN, and what it still sends is read and dropped for
/// at most this long (or this much) so the kernel does not answer it with
/// a reset that could destroy the answer in flight.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Connect attempts per request (each on another endpoint), as the hyper
/// path.
const MAX_ATTEMPTS: usize = 3;

// ---------------------------------------------------------------------
// Buffers

/// Bytes read from the client and not consumed yet: `buf[start..end]`.
/// The vector stays initialised (no per-read zeroing).
struct Inbuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Inbuf {
    fn new() -> Self {
        Self {
            buf: vec![0; INITIAL_BUF],
            start: 0,
            end: 0,
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads what the client sent next; `Ok(0)` at its end.
    async fn fill<S: AsyncRead + Unpin>(&mut self, io: &mut S) -> io::Result<usize> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < MAX_REQUEST_HEAD {
                let grown = (self.buf.len() * 2).min(MAX_REQUEST_HEAD);
                self.buf.resize(grown, 0);
            } else {
                // Heads this large were refused and bodies are consumed
                // as they arrive, so only a malformed stream gets here.
                return Err(io::Error::other("request buffer full"));
            }
        }
        let n = io.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

/// One chunk in the wire format (`size CRLF data CRLF`).
fn put_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        // A zero-size chunk would end the body.
        return;
    }
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A chunked-body decoder (RFC 9112 7.1): strict about line ends, sizes
/// and the CRLF after each chunk's data; extensions and trailers are
/// skipped.
#[derive(Debug, Clone, Copy, Default)]
struct Dechunk {
    state: ChunkState,
    trailer_bytes: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

impl Dechunk {
    fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes what `input` holds, handing each piece of content to
    /// `data`; returns how much of `input` was used (the rest is an
    /// incomplete line, to be given again with more bytes).
    fn decode(&mut self, input: &[u8], mut data: impl FnMut(&[u8])) -> Result<usize, &'static str> {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match self.state {
                ChunkState::Done => return Ok(pos),
                ChunkState::Size => {
                    let Some(nl) = rest.iter().position(|b| *b == b'\n') else {
                        if rest.len() > MAX_CHUNK_LINE {
                            return Err("chunk size line too long");
                        }
                        return Ok(pos);
                    };
                    if nl > MAX_CHUNK_LINE {
                        return Err("chunk size line too long");
                    }
                    let size = chunk_size(&rest[..nl])?;
                    pos += nl + 1;
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if rest.is_empty() {
                        return Ok(pos);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                    data(&rest[..n]);
                    pos += n;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataEnd => {
                    if rest.len() < 2 {
                        return Ok(pos);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF");
                    }
                    pos += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(nl) = rest.iter().position(|b| *b == b'\n') else {
                        if self.trailer_bytes + rest.len() > MAX_TRAILERS {
                            return Err("trailers too large");
                        }
                        return Ok(pos);
                    };
                    if nl == 0 || rest[nl - 1] != b'\r' {
                        return Err("trailer line without CRLF");
                    }
                    self.trailer_bytes += nl + 1;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err("trailers too large");
                    }
                    pos += nl + 1;
                    if nl == 1 {
                        self.state = ChunkState::Done;
                    }
                }
            }
        }
    }
}

/// The size from a chunk-size line (`line` up to its LF): hex digits,
/// optional whitespace and `;extensions`, then CR.
fn chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let Some((&b'\r', line)) = line.split_last() else {
        return Err("chunk size line without CRLF");
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err("bad chunk size");
    }
    let mut size = 0u64;
    for b in &line[..digits] {
        // A hex digit by the take_while above.
        let v = (*b as char).to_digit(16).unwrap_or(0);
        size = size * 16 + u64::from(v);
    }
    let after = &line[digits..];
    let ext = after.trim_ascii_start();
    if !(ext.is_empty() || ext[0] == b';') {
        return Err("bad chunk size");
    }
    if ext.iter().any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f) {
        return Err("control character in a chunk extension");
    }
    Ok(size)
}

// ---------------------------------------------------------------------
// Dates

/// Appends `date: <IMF-fixdate>\r\n` (hyper adds it to answers that have
/// none); formatted once a second per thread.
fn put_date(out: &mut Vec<u8>) {
    use std::cell::Cell;
    thread_local! {
        static CACHE: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let text = CACHE.with(|c| {
        let (at, text) = c.get();
        if at == now {
            return text;
        }
        let text = imf_fixdate(now);
        c.set((now, text));
        text
    });
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(&text);
    out.extend_from_slice(b"\r\n");
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` for seconds since the epoch.
fn imf_fixdate(secs: u64) -> [u8; 29] {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // 1970-01-01 was a Thursday.
    let weekday = DAYS[((days + 4) % 7) as usize];
    // Civil date from days since the epoch (proleptic Gregorian).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let text = format!(
        "{weekday}, {day:02} {} {year:04} {:02}:{:02}:{:02} GMT",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    let mut out = [b' '; 29];
    let n = text.len().min(29);
    out[..n].copy_from_slice(&text.as_bytes()[..n]);
    out
}

// ---------------------------------------------------------------------
// Requests

fn is(name: &[u8], lower: &[u8]) -> bool {
    name.len() == lower.len() && name.eq_ignore_ascii_case(lower)
}

/// Request or response headers that describe one hop (RFC 9110 7.6.1),
/// dropped on the way through as on the hyper path.
fn hop_by_hop(name: &[u8]) -> bool {
    match name.len() {
        2 => is(name, b"te"),
        7 => is(name, b"trailer") || is(name, b"upgrade"),
        10 => is(name, b"connection") || is(name, b"keep-alive"),
        16 => is(name, b"proxy-connection"),
        17 => is(name, b"transfer-encoding"),
        19 => is(name, b"proxy-authorization"),
        _ => false,
    }
}

/// Headers the proxy sets itself.
fn forwarded(name: &[u8]) -> bool {
    match name.len() {
        15 => is(name, b"x-forwarded-for"),
        16 => is(name, b"x-forwarded-host"),
        17 => is(name, b"x-forwarded-proto"),
        _ => false,
    }
}

/// The comma-separated tokens of a header value, trimmed, empty ones
/// left out.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// A Content-Length value: digits only (no sign, no list).
fn parse_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReqBody {
    None,
    Length(u64),
    Chunked,
}

/// A parsed request. Its method, target and Host live in the upstream
/// head it was rewritten into (`Client::up`), at these offsets.
#[derive(Debug)]
struct Req {
    method_len: usize,
    target: (usize, usize),
    /// End of the path (before `?`).
    path_end: usize,
    host: (usize, usize),
    /// The client asked to close after this request.
    close: bool,
    head_only: bool,
    idempotent: bool,
    body: ReqBody,
}

impl Req {
    fn method<'a>(&self, up: &'a [u8]) -> &'a str {
        std::str::from_utf8(&up[..self.method_len]).unwrap_or("-")
    }

    fn target<'a>(&self, up: &'a [u8]) -> &'a str {
        std::str::from_utf8(&up[self.target.0..self.target.1]).unwrap_or("/")
    }

    fn path<'a>(&self, up: &'a [u8]) -> &'a str {
        std::str::from_utf8(&up[self.target.0..self.path_end]).unwrap_or("/")
    }

    fn host<'a>(&self, up: &'a [u8]) -> &'a str {
        std::str::from_utf8(&up[self.host.0..self.host.1]).unwrap_or("-")
    }
}

#[derive(Debug)]
enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// A request and the length of its head.
    Request(Req, usize),
    /// Not for the fast path: hyper takes the connection from here.
    Handoff,
    /// A head beyond the limits: 431.
    TooLarge,
}

/// Parses a request head at the front of `data` and writes the head to
/// send upstream into `up` (origin-form, hop-by-hop headers dropped,
/// forwarded headers added, final CRLF included); `host` gets the
/// routing host (lower-case, no port).
fn parse_request(
    data: &[u8],
    up: &mut Vec<u8>,
    host: &mut String,
    client_ip: &[u8],
    https: bool,
) -> Parsed {
    let mut storage: [MaybeUninit<httparse::Header<'_>>; MAX_REQUEST_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_REQUEST_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(data, &mut storage) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if data.len() >= MAX_REQUEST_HEAD => {
            return Parsed::TooLarge;
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::TooLarge,
        Err(_) => return Parsed::Handoff,
    };
    if len > MAX_REQUEST_HEAD {
        return Parsed::TooLarge;
    }
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Handoff;
    };
    // Origin-form only, and only what hyper's URI parser takes (ASCII).
    if !target.starts_with('/') || !target.is_ascii() {
        return Parsed::Handoff;
    }
    let mut host_value: Option<&[u8]> = None;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = false;
    let mut listed: [&[u8]; MAX_LISTED] = [&[]; MAX_LISTED];
    let mut n_listed = 0;
    let mut xff = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        match name.len() {
            4 if is(name, b"host") => {
                if host_value.is_some() {
                    return Parsed::Handoff;
                }
                host_value = Some(h.value);
            }
            14 if is(name, b"content-length") => {
                let Some(l) = parse_length(h.value) else {
                    return Parsed::Handoff;
                };
                if length.replace(l).is_some() {
                    return Parsed::Handoff;
                }
            }
            17 if is(name, b"transfer-encoding") => {
                if chunked || !is(h.value.trim_ascii(), b"chunked") {
                    return Parsed::Handoff;
                }
                chunked = true;
            }
            10 if is(name, b"connection") => {
                for t in tokens(h.value) {
                    if is(t, b"close") {
                        close = true;
                    } else if is(t, b"keep-alive") {
                    } else if is(t, b"upgrade") || n_listed == MAX_LISTED {
                        return Parsed::Handoff;
                    } else {
                        listed[n_listed] = t;
                        n_listed += 1;
                    }
                }
            }
            7 if is(name, b"upgrade") => return Parsed::Handoff,
            6 if is(name, b"expect") => return Parsed::Handoff,
            15 if is(name, b"x-forwarded-for") => xff = true,
            _ => {}
        }
    }
    let Some(host_value) = host_value else {
        return Parsed::Handoff;
    };
    if chunked && length.is_some() {
        return Parsed::Handoff;
    }

    // The routing host, as the hyper path's `host_of`: a value that is not
    // visible ASCII routes as no host.
    host.clear();
    let visible = host_value
        .iter()
        .all(|b| (0x20..0x7f).contains(b) || *b == b'\t');
    let raw = if visible { host_value } else { b"" };
    let without_port = if raw.first() == Some(&b'[') {
        match raw.iter().position(|b| *b == b']') {
            Some(i) => &raw[1..i],
            None => raw,
        }
    } else {
        match raw.iter().rposition(|b| *b == b':') {
            Some(i) => &raw[..i],
            None => raw,
        }
    };
    // Visible ASCII (checked above), so valid UTF-8.
    host.push_str(std::str::from_utf8(without_port).unwrap_or(""));
    host.make_ascii_lowercase();

    up.clear();
    up.extend_from_slice(method.as_bytes());
    up.push(b' ');
    let t0 = up.len();
    up.extend_from_slice(target.as_bytes());
    let t1 = up.len();
    let path_end = t0 + target.find('?').unwrap_or(target.len());
    up.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host_at = (0, 0);
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if hop_by_hop(name) || forwarded(name) || listed[..n_listed].iter().any(|l| is(name, l)) {
            // Host is never dropped, even when Connection lists it.
            if !is(name, b"host") {
                continue;
            }
        }
        up.extend_from_slice(name);
        up.extend_from_slice(b": ");
        if is(name, b"host") {
            host_at = (up.len(), up.len() + h.value.len());
        }
        up.extend_from_slice(h.value);
        up.extend_from_slice(b"\r\n");
    }
    up.extend_from_slice(b"x-forwarded-host: ");
    up.extend_from_slice(host_value);
    up.extend_from_slice(b"\r\nx-forwarded-for: ");
    if xff {
        for h in req.headers.iter() {
            if is(h.name.as_bytes(), b"x-forwarded-for") && !h.value.trim_ascii().is_empty() {
                up.extend_from_slice(h.value.trim_ascii());
                up.extend_from_slice(b", ");
            }
        }
    }
    up.extend_from_slice(client_ip);
    up.extend_from_slice(if https {
        b"\r\nx-forwarded-proto: https\r\n"
    } else {
        b"\r\nx-forwarded-proto: http\r\n"
    });
    if chunked {
        up.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    up.extend_from_slice(b"\r\n");

    let body = match (chunked, length) {
        (true, _) => ReqBody::Chunked,
        (false, Some(n)) if n > 0 => ReqBody::Length(n),
        _ => ReqBody::None,
    };
    Parsed::Request(
        Req {
            method_len: method.len(),
            target: (t0, t1),
            path_end,
            host: host_at,
            close,
            head_only: method == "HEAD",
            idempotent: matches!(
                method,
                "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
            ),
            body,
        },
        len,
    )
}

/// What of the request body is still to be read from the client.
#[derive(Debug, Clone, Copy)]
enum BodyLeft {
    Done,
    Length(u64),
    Chunked(Dechunk),
}

impl BodyLeft {
    fn is_done(&self) -> bool {
        matches!(self, BodyLeft::Done)
    }
}

/// Moves the part of the body that arrived with the head into `up`
/// (re-chunked when chunked), so a small request is one write upstream.
fn take_buffered_body(
    inb: &mut Inbuf,
    body: ReqBody,
    up: &mut Vec<u8>,
) -> Result<BodyLeft, &'static str> {
    match body {
        ReqBody::None => Ok(BodyLeft::Done),
        ReqBody::Length(n) => {
            let k = usize::try_from(n).unwrap_or(usize::MAX).min(inb.len());
            up.extend_from_slice(&inb.data()[..k]);
            inb.consume(k);
            let left = n - k as u64;
            Ok(if left == 0 {
                BodyLeft::Done
            } else {
                BodyLeft::Length(left)
            })
        }
        ReqBody::Chunked => {
            let mut d = Dechunk::default();
            let used = d.decode(inb.data(), |p| put_chunk(up, p))?;
            inb.consume(used);
            if d.done() {
                up.extend_from_slice(LAST_CHUNK);
                Ok(BodyLeft::Done)
            } else {
                Ok(BodyLeft::Chunked(d))
            }
        }
    }
}

/// Skips a body that is entirely in the buffer; false when it is not (the
/// connection then closes after the answer).
fn skip_buffered_body(inb: &mut Inbuf, body: ReqBody) -> bool {
    match body {
        ReqBody::None => true,
        ReqBody::Length(n) => {
            if n <= inb.len() as u64 {
                inb.consume(n as usize);
                true
            } else {
                false
            }
        }
        ReqBody::Chunked => {
            let mut d = Dechunk::default();
            match d.decode(inb.data(), |_| {}) {
                Ok(used) if d.done() => {
                    inb.consume(used);
                    true
                }
                _ => false,
            }
        }
    }
}

// ---------------------------------------------------------------------
// Responses

/// How the upstream's response body ends.
#[derive(Debug, Clone, Copy)]
enum Framing {
    None,
    Length(u64),
    Chunked(Dechunk),
    /// At the upstream's close (sent to the client chunked).
    Close,
}

#[derive(Debug)]
struct RespHead {
    status: u16,
    framing: Framing,
    /// The upstream connection may carry another request after the body.
    reusable: bool,
}

fn status_line(out: &mut Vec<u8>, code: u16, reason: &str) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (code / 100 % 10) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
        b' ',
    ]);
    let canonical = http::StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason());
    out.extend_from_slice(canonical.unwrap_or(reason).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Parses a response head at the front of `buf` and writes the client's
/// head into `out` (without the final CRLF: the caller may add
/// `connection: close`). `None`: incomplete.
fn parse_response(
    buf: &[u8],
    out: &mut Vec<u8>,
    head_only: bool,
) -> Result<Option<(usize, RespHead)>, UpstreamError> {
    let mut storage: [MaybeUninit<httparse::Header<'_>>; MAX_RESPONSE_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut storage,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(UpstreamError::Malformed("bad response head")),
    };
    let code = resp.code.unwrap_or(0);
    if !(100..=999).contains(&code) {
        return Err(UpstreamError::Malformed("bad status code"));
    }
    let http10 = resp.version == Some(0);
    let mut length: Option<u64> = None;
    let mut te: Option<bool> = None;
    let mut close = http10;
    let mut has_date = false;
    let mut listed: [&[u8]; MAX_LISTED] = [&[]; MAX_LISTED];
    let mut n_listed = 0;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        match name.len() {
            14 if is(name, b"content-length") => {
                let l =
                    parse_length(h.value).ok_or(UpstreamError::Malformed("bad content-length"))?;
                if length.replace(l).is_some_and(|prev| prev != l) {
                    return Err(UpstreamError::Malformed("conflicting content-length"));
                }
            }
            17 if is(name, b"transfer-encoding") => {
                // Chunked when it is the last coding; any other coding
                // means the body ends at the close.
                let last = h.value.rsplit(|b| *b == b',').next().unwrap_or(b"");
                te = Some(is(last.trim_ascii(), b"chunked"));
            }
            10 if is(name, b"connection") => {
                for t in tokens(h.value) {
                    if is(t, b"close") {
                        close = true;
                    } else if is(t, b"keep-alive") {
                        if http10 {
                            close = false;
                        }
                    } else if n_listed < MAX_LISTED {
                        listed[n_listed] = t;
                        n_listed += 1;
                    }
                }
            }
            4 if is(name, b"date") => has_date = true,
            _ => {}
        }
    }
    out.clear();
    status_line(out, code, resp.reason.unwrap_or(""));
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if hop_by_hop(name)
            || listed[..n_listed].iter().any(|l| is(name, l))
            || (te.is_some() && is(name, b"content-length"))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if !has_date {
        put_date(out);
    }
    let framing = match (te, length) {
        (Some(true), _) => Framing::Chunked(Dechunk::default()),
        (Some(false), _) | (None, None) => Framing::Close,
        (None, Some(n)) => Framing::Length(n),
    };
    let reusable = !close && !matches!(framing, Framing::Close);
    let framing = if head_only || code < 200 || code == 204 || code == 304 {
        Framing::None
    } else {
        if matches!(framing, Framing::Chunked(_) | Framing::Close) {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        framing
    };
    Ok(Some((
        len,
        RespHead {
            status: code,
            framing,
            reusable,
        },
    )))
}

/// Why an exchange with the upstream failed.
enum Failure {
    /// The request could not be written: the upstream got none of it.
    NotSent(UpstreamError),
    /// Sent, but the connection ended before any of the response.
    NoResponse(UpstreamError),
    After(UpstreamError),
}

/// Reads the upstream's final response head (skipping 1xx) into `out`.
async fn read_response_head<R: AsyncRead + Unpin>(
    r: &mut R,
    rbuf: &mut BytesMut,
    out: &mut Vec<u8>,
    head_only: bool,
) -> Result<RespHead, Failure> {
    let mut got_any = false;
    loop {
        if !rbuf.is_empty() {
            got_any = true;
            match parse_response(rbuf, out, head_only).map_err(Failure::After)? {
                Some((_, head)) if head.status == 101 => {
                    // Upgrades take the hyper path; this request asked
                    // for none.
                    return Err(Failure::After(UpstreamError::Malformed(
                        "101 to a request without Upgrade",
                    )));
                }
                Some((len, head)) if head.status < 200 => {
                    rbuf.advance(len);
                    continue;
                }
                Some((len, head)) => {
                    rbuf.advance(len);
                    return Ok(head);
                }
                None if rbuf.len() > upstream::MAX_HEAD => {
                    return Err(Failure::After(UpstreamError::Malformed(
                        "response head too large",
                    )));
                }
                None => {}
            }
        }
        let failure = |e: io::Error| {
            if got_any {
                Failure::After(e.into())
            } else {
                Failure::NoResponse(e.into())
            }
        };
        let n = std::future::poll_fn(|cx| upstream::poll_read_buf(&mut *r, rbuf, cx))
            .await
            .map_err(failure)?;
        if n == 0 {
            return Err(failure(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "upstream closed the connection",
            )));
        }
    }
}

/// Streams the rest of the request body from the client upstream.
async fn send_body<S: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    io: &mut S,
    inb: &mut Inbuf,
    w: &mut W,
    left: &mut BodyLeft,
    tmp: &mut Vec<u8>,
) -> Result<(), UpstreamError> {
    loop {
        match left {
            BodyLeft::Done => return Ok(()),
            BodyLeft::Length(n) => {
                let k = usize::try_from(*n).unwrap_or(usize::MAX).min(inb.len());
                if k > 0 {
                    w.write_all(&inb.data()[..k]).await?;
                    inb.consume(k);
                    *n -= k as u64;
                }
                if *n == 0 {
                    *left = BodyLeft::Done;
                    return Ok(());
                }
            }
            BodyLeft::Chunked(d) => {
                tmp.clear();
                let used = d
                    .decode(inb.data(), |p| put_chunk(tmp, p))
                    .map_err(UpstreamError::Malformed)?;
                inb.consume(used);
                let done = d.done();
                if done {
                    tmp.extend_from_slice(LAST_CHUNK);
                }
                if !tmp.is_empty() {
                    w.write_all(tmp).await?;
                }
                if done {
                    *left = BodyLeft::Done;
                    return Ok(());
                }
            }
        }
        if inb.fill(io).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed the connection mid-body",
            )
            .into());
        }
    }
}

/// Writes the request (head and what arrived of its body, `up`), streams
/// the rest of the body while the response head is awaited, and reads
/// that head into `out`. An upstream that answers 4xx/5xx before the body
/// is all sent is not fed the rest (that connection is not reused, and
/// `left` says the client's body was not read to its end).
#[allow(clippy::too_many_arguments)]
async fn exchange<S: AsyncRead + Unpin>(
    io: &mut S,
    inb: &mut Inbuf,
    up: &[u8],
    left: &mut BodyLeft,
    uc: &mut upstream::Conn,
    out: &mut Vec<u8>,
    tmp: &mut Vec<u8>,
    head_only: bool,
) -> Result<RespHead, Failure> {
    uc.stream
        .write_all(up)
        .await
        .map_err(|e| Failure::NotSent(e.into()))?;
    if left.is_done() {
        return read_response_head(&mut uc.stream, &mut uc.rbuf, out, head_only).await;
    }
    let (mut r, mut w) = uc.stream.split();
    let send = send_body(io, inb, &mut w, left, tmp);
    let read = read_response_head(&mut r, &mut uc.rbuf, out, head_only);
    tokio::pin!(send, read);
    tokio::select! {
        biased;
        sent = &mut send => {
            sent.map_err(Failure::After)?;
            read.await
        }
        head = &mut read => {
            let mut head = head?;
            if head.status >= 400 {
                // Rejected: the rest of the body stays unsent.
                head.reusable = false;
            } else {
                send.await.map_err(Failure::After)?;
            }
            Ok(head)
        }
    }
}

/// Sends the response head (in `out`) and streams the body after it.
/// An error leaves both connections unusable.
async fn forward_body<S: AsyncWrite + Unpin>(
    io: &mut S,
    uc: &mut upstream::Conn,
    out: &mut Vec<u8>,
    framing: Framing,
) -> Result<(), UpstreamError> {
    let eof = || {
        UpstreamError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "upstream closed mid-body",
        ))
    };
    match framing {
        Framing::None => io.write_all(out).await?,
        Framing::Length(mut n) => {
            // The usual case: head and whole body in one write.
            let k = usize::try_from(n).unwrap_or(usize::MAX).min(uc.rbuf.len());
            out.extend_from_slice(&uc.rbuf[..k]);
            uc.rbuf.advance(k);
            n -= k as u64;
            io.write_all(out).await?;
            while n > 0 {
                let got = std::future::poll_fn(|cx| {
                    upstream::poll_read_buf(&mut uc.stream, &mut uc.rbuf, cx)
                })
                .await?;
                if got == 0 {
                    return Err(eof());
                }
                let k = usize::try_from(n).unwrap_or(usize::MAX).min(uc.rbuf.len());
                io.write_all(&uc.rbuf[..k]).await?;
                uc.rbuf.advance(k);
                n -= k as u64;
            }
        }
        Framing::Chunked(mut d) => loop {
            let used = d
                .decode(&uc.rbuf, |p| put_chunk(out, p))
                .map_err(UpstreamError::Malformed)?;
            uc.rbuf.advance(used);
            if d.done() {
                out.extend_from_slice(LAST_CHUNK);
                io.write_all(out).await?;
                break;
            }
            if !out.is_empty() {
                io.write_all(out).await?;
                out.clear();
            }
            let got = std::future::poll_fn(|cx| {
                upstream::poll_read_buf(&mut uc.stream, &mut uc.rbuf, cx)
            })
            .await?;
            if got == 0 {
                return Err(eof());
            }
        },
        Framing::Close => loop {
            if !uc.rbuf.is_empty() {
                put_chunk(out, &uc.rbuf);
                uc.rbuf.clear();
            }
            if !out.is_empty() {
                io.write_all(out).await?;
                out.clear();
            }
            let got = std::future::poll_fn(|cx| {
                upstream::poll_read_buf(&mut uc.stream, &mut uc.rbuf, cx)
            })
            .await?;
            if got == 0 {
                io.write_all(LAST_CHUNK).await?;
                break;
            }
        },
    }
    Ok(())
}

// ---------------------------------------------------------------------
// The connection loop

/// One client connection's state, reused request after request.
struct Client<S> {
    io: S,
    inb: Inbuf,
    /// The request head (and first body bytes) to send upstream.
    up: Vec<u8>,
    /// The answer to the client.
    out: Vec<u8>,
    /// Re-chunked request body pieces.
    tmp: Vec<u8>,
    /// The routing host of the current request.
    host: String,
}

/// Serves a client connection (plain, or TLS without ALPN `h2`) until it
/// closes, or until a request the fast path leaves to hyper.
pub(crate) async fn serve<S>(proxy: Arc<Proxy>, io: S, conn: Conn)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut c = Client {
        io,
        inb: Inbuf::new(),
        up: Vec::with_capacity(512),
        out: Vec::with_capacity(512),
        tmp: Vec::new(),
        host: String::new(),
    };
    loop {
        let req = loop {
            if !c.inb.is_empty() {
                match parse_request(
                    c.inb.data(),
                    &mut c.up,
                    &mut c.host,
                    conn.client_ip.as_bytes(),
                    conn.https,
                ) {
                    Parsed::Request(req, len) => {
                        c.inb.consume(len);
                        break req;
                    }
                    Parsed::Partial => {}
                    Parsed::Handoff => {
                        let prefix = Bytes::copy_from_slice(c.inb.data());
                        let io = hyper_util::rt::TokioIo::new(Rewind {
                            prefix,
                            inner: c.io,
                        });
                        proxy.serve_conn(io, conn).await;
                        return;
                    }
                    Parsed::TooLarge => {
                        tracing::debug!(peer = %conn.peer, "request head too large");
                        let _ = answer(
                            &mut c,
                            431,
                            "request header fields too large\n",
                            None,
                            false,
                            false,
                        )
                        .await;
                        return;
                    }
                }
            }
            match c.inb.fill(&mut c.io).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        if !handle(&proxy, &conn, &mut c, &req).await {
            return;
        }
    }
}

enum Route {
    Backend(Arc<Backend>),
    Redirect(Arc<Backend>),
    Unmatched,
}

/// Answers one request; false when the client connection is to close.
async fn handle<S>(proxy: &Proxy, conn: &Conn, c: &mut Client<S>, req: &Req) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    if !proxy.is_synced() {
        let keep = !req.close && skip_buffered_body(&mut c.inb, req.body);
        return answer(
            c,
            503,
            "ingress routes are not loaded yet\n",
            None,
            keep,
            req.head_only,
        )
        .await;
    }
    let route = {
        let snap = proxy.snapshot.load();
        match snap.route(&c.host, req.path(&c.up)) {
            Some(b) if !conn.https && b.ssl_redirect && snap.has_tls(&c.host) => {
                Route::Redirect(b.clone())
            }
            Some(b) => Route::Backend(b.clone()),
            None => Route::Unmatched,
        }
    };
    let backend = match route {
        Route::Backend(b) => b,
        Route::Redirect(b) => {
            c.tmp.clear();
            c.tmp.extend_from_slice(b"https://");
            c.tmp.extend_from_slice(c.host.as_bytes());
            let port = proxy.https_port();
            if port != 443 && port != 0 {
                let _ = write!(c.tmp, ":{port}");
            }
            c.tmp.extend_from_slice(req.target(&c.up).as_bytes());
            b.stats.observe(308, started.elapsed());
            log(conn, req, &c.up, 308, None, Some(&b), started);
            let keep = !req.close && skip_buffered_body(&mut c.inb, req.body);
            let location = std::mem::take(&mut c.tmp);
            let kept = answer(
                c,
                308,
                "redirecting to HTTPS\n",
                Some(&location),
                keep,
                req.head_only,
            )
            .await;
            c.tmp = location;
            return kept;
        }
        Route::Unmatched => {
            proxy.registry.unmatched.observe(404, started.elapsed());
            log(conn, req, &c.up, 404, None, None, started);
            let keep = !req.close && skip_buffered_body(&mut c.inb, req.body);
            return answer(
                c,
                404,
                "no Ingress rule matches this request\n",
                None,
                keep,
                req.head_only,
            )
            .await;
        }
    };

    let mut left = match take_buffered_body(&mut c.inb, req.body, &mut c.up) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(peer = %conn.peer, error = e, "malformed chunked request body");
            return answer(c, 400, "malformed chunked body\n", None, false, false).await;
        }
    };
    let attempts = backend.endpoints.len().clamp(1, MAX_ATTEMPTS);
    let start = backend.start();
    'attempts: for attempt in 0..attempts {
        let Some((ep, _)) = backend.pick(start, attempt) else {
            break;
        };
        let mut reused = conn.h1.take(ep);
        loop {
            let fresh = reused.is_none();
            let mut uc = match reused.take() {
                Some(u) => u,
                None => match upstream::Pool::connect(ep).await {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::debug!(endpoint = %ep, error = %e, "upstream connect failed; trying the next endpoint");
                        continue 'attempts;
                    }
                },
            };
            // Only a reused connection can be stale, and only a request
            // whose body is all in `up` can be sent again.
            let retryable = !fresh && left.is_done();
            let result = exchange(
                &mut c.io,
                &mut c.inb,
                &c.up,
                &mut left,
                &mut uc,
                &mut c.out,
                &mut c.tmp,
                req.head_only,
            )
            .await;
            let head = match result {
                Ok(h) => h,
                Err(Failure::NotSent(_)) if retryable => {
                    tracing::debug!(upstream = %ep, "stale keep-alive connection; reconnecting");
                    continue;
                }
                Err(Failure::NoResponse(_)) if retryable && req.idempotent => {
                    tracing::debug!(upstream = %ep, "stale keep-alive connection; reconnecting");
                    continue;
                }
                Err(Failure::NotSent(e) | Failure::NoResponse(e) | Failure::After(e)) => {
                    tracing::debug!(endpoint = %ep, error = %e, "upstream request failed");
                    break 'attempts;
                }
            };
            backend.stats.observe(head.status, started.elapsed());
            log(
                conn,
                req,
                &c.up,
                head.status,
                Some(ep),
                Some(&backend),
                started,
            );
            let keep = !req.close && left.is_done();
            if !keep {
                c.out.extend_from_slice(b"connection: close\r\n");
            }
            c.out.extend_from_slice(b"\r\n");
            match forward_body(&mut c.io, &mut uc, &mut c.out, head.framing).await {
                Ok(()) => {
                    if head.reusable && uc.rbuf.is_empty() {
                        conn.h1.put(ep, uc);
                    }
                }
                Err(e) => {
                    tracing::debug!(endpoint = %ep, error = %e, "response body failed; closing the client connection");
                    return false;
                }
            }
            if !keep {
                finish(c, left.is_done()).await;
            }
            return keep;
        }
    }
    let (code, text) = if backend.endpoints.is_empty() {
        (503, "the Service has no ready endpoints\n")
    } else {
        (502, "the upstream did not answer\n")
    };
    backend.stats.observe(code, started.elapsed());
    log(conn, req, &c.up, code, None, Some(&backend), started);
    let keep = !req.close && left.is_done();
    answer(c, code, text, None, keep, req.head_only).await
}

fn log(
    conn: &Conn,
    req: &Req,
    up: &[u8],
    code: u16,
    endpoint: Option<std::net::SocketAddr>,
    backend: Option<&Backend>,
    started: Instant,
) {
    // Without a subscriber for it (the benchmark), skip even the
    // conversions below.
    if !tracing::enabled!(target: "skep::ingress::access", tracing::Level::INFO) {
        return;
    }
    proxy::access_log(
        req.method(up),
        req.target(up),
        conn.peer,
        req.host(up),
        code,
        endpoint,
        backend,
        started,
    );
}

/// The proxy's own answer (plain text); false when the connection closes
/// after it (`keep` false, or the write failed).
async fn answer<S>(
    c: &mut Client<S>,
    code: u16,
    text: &str,
    location: Option<&[u8]>,
    keep: bool,
    head_only: bool,
) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let out = &mut c.out;
    out.clear();
    status_line(out, code, "");
    out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\n");
    if let Some(l) = location {
        out.extend_from_slice(b"location: ");
        out.extend_from_slice(l);
        out.extend_from_slice(b"\r\n");
    }
    let _ = write!(out, "content-length: {}\r\n", text.len());
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    }
    put_date(out);
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(text.as_bytes());
    }
    if c.io.write_all(&c.out).await.is_err() {
        return false;
    }
    if !keep {
        // Whether the request body (if any) was read: the 431/400 cases
        // and unread bodies end up here alike.
        finish(c, false).await;
    }
    keep
}

/// Ends the client connection after its last answer: FIN first, then
/// (when the client may still be sending a body) its bytes are read and
/// dropped for a bounded time, so closing does not reset the answer away.
async fn finish<S>(c: &mut Client<S>, body_read: bool)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = c.io.shutdown().await;
    if body_read {
        return;
    }
    let drain = async {
        let mut total = 0;
        while total < LINGER_BYTES {
            c.inb.consume(c.inb.len());
            match c.inb.fill(&mut c.io).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

// ---------------------------------------------------------------------
// Handing a connection to hyper

/// A connection with bytes already read from it put back in front: what
/// the fast path read before deciding that hyper serves this connection.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dechunk_all(input: &[u8]) -> Result<(Vec<u8>, usize, bool), &'static str> {
        let mut d = Dechunk::default();
        let mut out = Vec::new();
        let used = d.decode(input, |p| out.extend_from_slice(p))?;
        Ok((out, used, d.done()))
    }

    #[test]
    fn chunked_bodies_decode_strictly() {
        let (out, used, done) =
            dechunk_all(b"4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\nx-t: 1\r\n\r\nNEXT").unwrap();
        assert_eq!((out.as_slice(), used, done), (&b"wikipedia"[..], 38, true));
        // Split anywhere: the same content, fed piece by piece.
        let full = b"A\r\n0123456789\r\n3 \r\nabc\r\n0\r\n\r\n";
        for cut in 0..full.len() {
            let mut d = Dechunk::default();
            let mut out = Vec::new();
            let used = d
                .decode(&full[..cut], |p| out.extend_from_slice(p))
                .unwrap();
            let mut rest = full[used..].to_vec();
            let used2 = d.decode(&rest, |p| out.extend_from_slice(p)).unwrap();
            rest.drain(..used2);
            assert!(d.done() && rest.is_empty(), "cut at {cut}");
            assert_eq!(out, b"0123456789abc", "cut at {cut}");
        }
        for bad in [
            &b"4\nwiki\r\n0\r\n\r\n"[..],
            b"4\r\nwikiXX0\r\n\r\n",
            b"x\r\n",
            b"-4\r\nwiki\r\n",
            b"4 4\r\nwiki\r\n",
            b"10000000000000000\r\n",
            b"0\r\nbad\n\r\n",
        ] {
            assert!(
                dechunk_all(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn dates_are_imf_fixdate() {
        assert_eq!(&imf_fixdate(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&imf_fixdate(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            &imf_fixdate(1_709_210_096),
            b"Thu, 29 Feb 2024 12:34:56 GMT"
        );
    }

    #[test]
    fn request_heads_are_rewritten() {
        let mut up = Vec::new();
        let mut host = String::new();
        let head = b"GET /a/b?x=1 HTTP/1.1\r\nHost: Ex.Test:8080\r\nConnection: keep-alive, x-drop\r\nX-Drop: 1\r\nX-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Proto: ftp\r\nKeep-Alive: 5\r\nAccept: */*\r\n\r\nrest";
        let Parsed::Request(req, len) = parse_request(head, &mut up, &mut host, b"10.0.0.1", true)
        else {
            panic!("not parsed");
        };
        assert_eq!(len, head.len() - 4);
        assert_eq!(host, "ex.test");
        assert_eq!(req.path(&up), "/a/b");
        assert_eq!(req.target(&up), "/a/b?x=1");
        assert_eq!(req.host(&up), "Ex.Test:8080");
        assert_eq!(
            String::from_utf8(up).unwrap(),
            "GET /a/b?x=1 HTTP/1.1\r\nHost: Ex.Test:8080\r\nAccept: */*\r\nx-forwarded-host: Ex.Test:8080\r\nx-forwarded-for: 192.0.2.1, 10.0.0.1\r\nx-forwarded-proto: https\r\n\r\n"
        );
        for handoff in [
            &b"GET / HTTP/1.0\r\nHost: a\r\n\r\n"[..],
            b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            assert!(
                matches!(
                    parse_request(handoff, &mut Vec::new(), &mut String::new(), b"ip", false),
                    Parsed::Handoff
                ),
                "{}",
                String::from_utf8_lossy(handoff)
            );
        }
    }
}
