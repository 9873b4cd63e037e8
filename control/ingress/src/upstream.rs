//! The proxy's HTTP/1.1 client to upstream pods, for every request that
//! is not a protocol upgrade: the request future itself writes the
//! request and reads the response on a pooled keep-alive connection, and
//! the response body reads straight from that socket.
//!
//! Why not hyper's client (still used for upgrades, [`crate::pool`]): it
//! runs each connection as its own task and passes every request, response
//! and body chunk through channels between that task and the proxy's;
//! profiled under the ingress benchmark those hand-offs (channel sends,
//! task wake-ups, a body channel per response) were the largest part of
//! the proxy's user-space CPU per request. Here a request is one write and
//! (usually) one read, with no other task involved.
//!
//! Framing follows RFC 9112: requests with a body keep its Content-Length
//! or are sent chunked; responses are delimited by Transfer-Encoding
//! chunked, else Content-Length, else the connection's close (which is
//! then not reused). HEAD requests and 1xx/204/304 answers have no body.
//! A connection returns to the pool only when its response was read to
//! the end and neither side asked to close it.

use crate::proxy::UpBody;
use bytes::{Buf, Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version,
    uri::Authority,
};
use hyper::body::{Body, Frame, SizeHint};
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle connections kept per endpoint (more are closed when returned).
const MAX_IDLE: usize = 1024;
/// Response heads larger than this are refused (nginx's default large
/// header buffers are 4 × 8 KiB).
pub(crate) const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Read size from the upstream socket.
const READ_CHUNK: usize = 16 * 1024;

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The headers the proxy adds or replaces upstream.
#[derive(Debug)]
pub struct Forwarded {
    /// Host to send when the request has none (HTTP/2's :authority); an
    /// HTTP/1.0 request without either gets the endpoint's address.
    pub host: Option<HeaderValue>,
    pub x_forwarded_host: Option<HeaderValue>,
    pub x_forwarded_for: Option<HeaderValue>,
    pub x_forwarded_proto: &'static str,
}

impl Forwarded {
    /// Request headers that the proxy's own values replace.
    fn replaces(name: &HeaderName) -> bool {
        name == X_FORWARDED_FOR || name == X_FORWARDED_HOST || name == X_FORWARDED_PROTO
    }

    fn encode(&self, out: &mut Vec<u8>, has_host: bool, endpoint: &Authority) {
        let mut line = |name: &[u8], value: &[u8]| {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        };
        if !has_host {
            match &self.host {
                Some(h) => line(b"host", h.as_bytes()),
                None => line(b"host", endpoint.as_str().as_bytes()),
            }
        }
        if let Some(h) = &self.x_forwarded_host {
            line(b"x-forwarded-host", h.as_bytes());
        }
        if let Some(v) = &self.x_forwarded_for {
            line(b"x-forwarded-for", v.as_bytes());
        }
        line(b"x-forwarded-proto", self.x_forwarded_proto.as_bytes());
    }

    /// The same, into a header map (for hyper's client).
    pub fn apply(&self, headers: &mut HeaderMap, endpoint: &Authority) {
        if !headers.contains_key(http::header::HOST) {
            let host = match &self.host {
                Some(h) => Some(h.clone()),
                None => HeaderValue::from_str(endpoint.as_str()).ok(),
            };
            if let Some(h) = host {
                headers.insert(http::header::HOST, h);
            }
        }
        match &self.x_forwarded_host {
            Some(h) => headers.insert(X_FORWARDED_HOST, h.clone()),
            None => headers.remove(X_FORWARDED_HOST),
        };
        match &self.x_forwarded_for {
            Some(v) => headers.insert(X_FORWARDED_FOR, v.clone()),
            None => headers.remove(X_FORWARDED_FOR),
        };
        headers.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(self.x_forwarded_proto),
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("upstream I/O: {0}")]
    Io(#[from] io::Error),
    #[error("upstream sent a malformed response: {0}")]
    Malformed(&'static str),
    #[error("request body: {0}")]
    Body(#[from] hyper::Error),
}

/// One keep-alive connection and what was read beyond the last response.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) rbuf: BytesMut,
    /// Reused between requests for the serialized head.
    wbuf: Vec<u8>,
}

impl Conn {
    /// Whether an idle connection may carry a request: the peer has not
    /// closed it and sent nothing unasked. Costs no syscall unless the
    /// event loop already saw it readable.
    fn usable(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable while idle: EOF or stray bytes, or a stale event.
            Poll::Ready(Ok(())) => {
                let mut b = [0u8; 1];
                matches!(self.stream.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// Idle connections by endpoint. One per worker thread, so the lock is
/// never contended; a list scanned by address, since a worker talks to
/// few endpoints and hashing a SocketAddr costs more than comparing it.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Vec<(SocketAddr, Vec<Conn>)>>,
}

impl Pool {
    pub(crate) fn take(&self, ep: SocketAddr) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = &mut idle.iter_mut().find(|(a, _)| *a == ep)?.1;
        while let Some(mut c) = list.pop() {
            if c.usable() {
                return Some(c);
            }
        }
        None
    }

    pub(crate) fn put(&self, ep: SocketAddr, c: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let i = match idle.iter().position(|(a, _)| *a == ep) {
            Some(i) => i,
            None => {
                // Endpoints that went away leave empty lists: drop those
                // before adding another.
                idle.retain(|(_, l)| !l.is_empty());
                idle.push((ep, Vec::new()));
                idle.len() - 1
            }
        };
        let list = &mut idle[i].1;
        if list.len() < MAX_IDLE {
            list.push(c);
        }
    }

    pub(crate) async fn connect(ep: SocketAddr) -> Result<Conn, UpstreamError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(ep))
            .await
            .map_err(|_| UpstreamError::Connect(ep, "timed out".into()))?
            .map_err(|e| UpstreamError::Connect(ep, e.to_string()))?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: Vec::with_capacity(512),
        })
    }

    /// Sends `req` (origin-form URI, headers final) to `ep` and reads the
    /// response head. `Err(Connect)` comes with the request back: nothing
    /// was sent and another endpoint may take it. A reused connection that
    /// fails before any of the response arrived is replaced by a new one
    /// once, when the request has no body (it can be sent again) and
    /// either none of it was written or its method is idempotent.
    pub async fn send(
        self: &Arc<Self>,
        ep: SocketAddr,
        req: Request<UpBody>,
        fwd: &Forwarded,
        authority: &Authority,
    ) -> Result<Response<H1Body>, (UpstreamError, Option<Request<UpBody>>)> {
        let (parts, mut body) = req.into_parts();
        let head_only = parts.method == Method::HEAD;
        let mut reused = self.take(ep);
        loop {
            let fresh = reused.is_none();
            let mut conn = match reused.take() {
                Some(c) => c,
                None => match Self::connect(ep).await {
                    Ok(c) => c,
                    Err(e) => return Err((e, Some(Request::from_parts(parts, body)))),
                },
            };
            // Only a reused connection can be stale, and only a request
            // without a body can be sent again.
            let retryable = !fresh && body.is_end_stream();
            match exchange(&mut conn, &parts, &mut body, fwd, authority).await {
                Ok((head, framing)) => {
                    let framing = if head_only || no_body(head.status()) {
                        Framing::Length(0)
                    } else {
                        framing
                    };
                    let mut body = H1Body {
                        conn: Some(conn),
                        framing,
                        pool: self.clone(),
                        ep,
                        reusable: head.reusable,
                    };
                    body.finish_if_done();
                    let mut resp = Response::new(body);
                    *resp.status_mut() = head.status();
                    *resp.headers_mut() = head.headers;
                    return Ok(resp);
                }
                // A keep-alive connection the upstream closed as it went
                // idle. Repeating a request that was sent is only safe
                // when its method is idempotent (nginx's rule too).
                Err(Failure::NotSent(_)) if retryable => {
                    tracing::debug!(upstream = %ep, "stale keep-alive connection; reconnecting");
                }
                Err(Failure::NoResponse(_)) if retryable && idempotent(&parts.method) => {
                    tracing::debug!(upstream = %ep, "stale keep-alive connection; reconnecting");
                }
                Err(Failure::NotSent(e) | Failure::NoResponse(e) | Failure::After(e)) => {
                    return Err((e, None));
                }
            }
        }
    }
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn no_body(status: StatusCode) -> bool {
    status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

enum Failure {
    /// The request head could not be written: nothing reached the
    /// upstream, the request may go again on another connection.
    NotSent(UpstreamError),
    /// Sent, but the connection ended before any of the response: the
    /// upstream may or may not have acted on it.
    NoResponse(UpstreamError),
    After(UpstreamError),
}

struct Head {
    status: StatusCode,
    headers: HeaderMap,
    reusable: bool,
}

impl Head {
    fn status(&self) -> StatusCode {
        self.status
    }
}

/// How the response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a size line.
    Size,
    /// Inside a chunk's data.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines after the last chunk, up to an empty line.
    Trailers,
    Done,
}

/// Writes the request and reads the response head (skipping 1xx other
/// than 101). The body is sent while the head is awaited: an upstream
/// that answers early with an error (413, 401…) and stops reading is not
/// fed the rest (that connection is then not reused); an early success
/// gets the whole body first, as a streaming upstream expects.
async fn exchange(
    conn: &mut Conn,
    parts: &http::request::Parts,
    body: &mut UpBody,
    fwd: &Forwarded,
    authority: &Authority,
) -> Result<(Head, Framing), Failure> {
    let has_body = !body.is_end_stream();
    let chunked = has_body && !parts.headers.contains_key(http::header::CONTENT_LENGTH);
    encode_head(&mut conn.wbuf, parts, chunked, fwd, authority);
    conn.stream
        .write_all(&conn.wbuf)
        .await
        .map_err(|e| Failure::NotSent(e.into()))?;
    if !has_body {
        return read_head(&mut conn.stream, &mut conn.rbuf).await;
    }
    let (mut r, mut w) = conn.stream.split();
    let send = write_body(&mut w, body, chunked);
    let read = read_head(&mut r, &mut conn.rbuf);
    tokio::pin!(send, read);
    tokio::select! {
        biased;
        sent = &mut send => {
            sent.map_err(Failure::After)?;
            read.await
        }
        head = &mut read => {
            let (mut head, framing) = head?;
            if head.status.is_client_error() || head.status.is_server_error() {
                // Rejected: the rest of the body stays unsent and the
                // connection cannot carry another request.
                head.reusable = false;
            } else {
                send.await.map_err(Failure::After)?;
            }
            Ok((head, framing))
        }
    }
}

/// Streams the request body, chunked when its length is not known.
async fn write_body<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    body: &mut UpBody,
    chunked: bool,
) -> Result<(), UpstreamError> {
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            let size = format!("{:x}\r\n", data.len());
            w.write_all(size.as_bytes()).await?;
            w.write_all(&data).await?;
            w.write_all(b"\r\n").await?;
        } else {
            w.write_all(&data).await?;
        }
    }
    if chunked {
        w.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
}

/// Reads until a final response head (or 101) is parsed.
async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
    rbuf: &mut BytesMut,
) -> Result<(Head, Framing), Failure> {
    let mut got_any = false;
    loop {
        if !rbuf.is_empty() {
            got_any = true;
            match parse_head(rbuf).map_err(Failure::After)? {
                Some((head, _))
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS =>
                {
                    continue;
                }
                Some(done) => return Ok(done),
                None if rbuf.len() > MAX_HEAD => {
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
        let n = std::future::poll_fn(|cx| poll_read_buf(&mut *r, rbuf, cx))
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

/// Reads what the socket has into `buf` (growing it by a chunk).
pub(crate) fn poll_read_buf<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    let spare = buf.spare_capacity_mut();
    let mut rb = ReadBuf::uninit(spare);
    ready!(Pin::new(stream).poll_read(cx, &mut rb))?;
    let n = rb.filled().len();
    // SAFETY: `poll_read` initialised the first `n` bytes of the spare
    // capacity (ReadBuf's contract).
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

/// The request head in origin form, with the proxy's headers.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::request::Parts,
    chunked: bool,
    fwd: &Forwarded,
    authority: &Authority,
) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(pq.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_host = false;
    for (name, value) in &parts.headers {
        if Forwarded::replaces(name) {
            continue;
        }
        has_host |= name == http::header::HOST;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    fwd.encode(out, has_host, authority);
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Parses a response head off the front of `buf`; `None` if incomplete.
fn parse_head(buf: &mut BytesMut) -> Result<Option<(Head, Framing)>, UpstreamError> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut storage);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(UpstreamError::Malformed("bad response head")),
    };
    let code = resp.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| UpstreamError::Malformed("bad status code"))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Offsets of names and values inside the head, so the values can be
    // slices of one shared buffer rather than copies.
    // On the stack: no allocation per response.
    let base = buf.as_ptr() as usize;
    let mut spans = [(0usize, 0usize, 0usize, 0usize); MAX_HEADERS];
    let count = resp.headers.len();
    for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
        let n = h.name.as_ptr() as usize - base;
        let v = h.value.as_ptr() as usize - base;
        *span = (n, h.name.len(), v, h.value.len());
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = version == Version::HTTP_10;
    for &(n, nl, v, vl) in &spans[..count] {
        let name = HeaderName::from_bytes(&head[n..n + nl])
            .map_err(|_| UpstreamError::Malformed("bad header name"))?;
        // Validated here; the bytes stay shared with the head buffer.
        let value = HeaderValue::from_maybe_shared(head.slice(v..v + vl))
            .map_err(|_| UpstreamError::Malformed("bad header value"))?;
        if name == http::header::CONTENT_LENGTH {
            let parsed = value
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or(UpstreamError::Malformed("bad content-length"))?;
            if length.is_some_and(|l| l != parsed) {
                return Err(UpstreamError::Malformed("conflicting content-length"));
            }
            length = Some(parsed);
        } else if name == http::header::TRANSFER_ENCODING {
            // Chunked when it is the last coding.
            chunked = value
                .to_str()
                .ok()
                .and_then(|s| s.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name == http::header::CONNECTION
            && let Ok(s) = value.to_str()
        {
            for token in s.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && version == Version::HTTP_10 {
                    close = false;
                }
            }
        }
        headers.append(name, value);
    }
    let framing = if chunked {
        Framing::Chunked(Chunk::Size)
    } else if let Some(l) = length {
        Framing::Length(l)
    } else {
        Framing::Close
    };
    // After a 101 the connection speaks another protocol.
    let reusable = !close && framing != Framing::Close && status != StatusCode::SWITCHING_PROTOCOLS;
    Ok(Some((
        Head {
            status,
            headers,
            reusable,
        },
        framing,
    )))
}

/// An upstream response body read from its connection; at its end the
/// connection goes back to the pool (when reusable). Dropped early, the
/// connection is closed.
#[derive(Debug)]
pub struct H1Body {
    conn: Option<Conn>,
    framing: Framing,
    pool: Arc<Pool>,
    ep: SocketAddr,
    reusable: bool,
}

impl H1Body {
    fn done(&self) -> bool {
        matches!(
            self.framing,
            Framing::Length(0) | Framing::Chunked(Chunk::Done)
        )
    }

    /// Returns the connection once the body has been read whole.
    fn finish_if_done(&mut self) {
        if self.done()
            && let Some(c) = self.conn.take()
            && self.reusable
        {
            self.pool.put(self.ep, c);
        }
    }

    /// The next data out of the buffer, advancing the framing; `None`
    /// when more bytes must be read first (or the body is complete).
    fn next_data(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let buf = &mut conn.rbuf;
        loop {
            match &mut self.framing {
                Framing::Length(0) | Framing::Chunked(Chunk::Done) => return Ok(None),
                Framing::Length(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                    *left -= n as u64;
                    return Ok(Some(buf.split_to(n).freeze()));
                }
                Framing::Close => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(buf.split().freeze()));
                }
                Framing::Chunked(state) => match *state {
                    Chunk::Done => return Ok(None),
                    Chunk::Size => {
                        let Some(eol) = find_crlf(buf) else {
                            if buf.len() > 1024 {
                                return Err(UpstreamError::Malformed("chunk size line too long"));
                            }
                            return Ok(None);
                        };
                        let line = &buf[..eol];
                        let hex = line.split(|b| *b == b';').next().unwrap_or(line);
                        let hex = std::str::from_utf8(hex)
                            .ok()
                            .map(str::trim)
                            .ok_or(UpstreamError::Malformed("bad chunk size"))?;
                        let size = u64::from_str_radix(hex, 16)
                            .map_err(|_| UpstreamError::Malformed("bad chunk size"))?;
                        buf.advance(eol + 2);
                        *state = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(left) => {
                        if buf.is_empty() {
                            return Ok(None);
                        }
                        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                        let left = left - n as u64;
                        *state = if left == 0 {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(left)
                        };
                        return Ok(Some(buf.split_to(n).freeze()));
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(None);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(UpstreamError::Malformed("chunk without CRLF"));
                        }
                        buf.advance(2);
                        *state = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        // Trailers are dropped (hyper's server would not
                        // send them to an HTTP/1.1 client either).
                        let Some(eol) = find_crlf(buf) else {
                            if buf.len() > MAX_HEAD {
                                return Err(UpstreamError::Malformed("trailers too large"));
                            }
                            return Ok(None);
                        };
                        buf.advance(eol + 2);
                        if eol == 0 {
                            *state = Chunk::Done;
                        }
                    }
                },
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        loop {
            match this.next_data() {
                Ok(Some(data)) => {
                    this.finish_if_done();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) if this.done() => {
                    this.finish_if_done();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let n = match ready!(poll_read_buf(&mut conn.stream, &mut conn.rbuf, cx)) {
                Ok(n) => n,
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            };
            if n == 0 {
                this.conn = None;
                return Poll::Ready(match this.framing {
                    Framing::Close => None,
                    _ => Some(Err(UpstreamError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed mid-body",
                    )))),
                });
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Chunked(Chunk::Done) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
