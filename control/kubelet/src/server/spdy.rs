//! Server side of SPDY/3.1 as the Kubernetes streaming protocols use it
//! (client-go's spdystream): the client opens streams with SYN_STREAM
//! frames whose headers say what each is for (`streamtype`, `port`,
//! `requestid`); we answer each with SYN_REPLY and exchange DATA frames,
//! FIN closing a direction. Header blocks are zlib-compressed, one
//! compression context per direction for the whole connection, primed with
//! the SPDY/3 dictionary. spdystream does no flow control, so neither do we
//! (WINDOW_UPDATE and SETTINGS are ignored).

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::sync::OnceLock;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
    task::JoinHandle,
};

const VERSION: u16 = 3;
const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const FLAG_FIN: u8 = 0x01;
/// RST_STREAM status CANCEL.
const STATUS_CANCEL: u32 = 5;
/// Largest frame payload accepted.
const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Our DATA frames carry at most this much.
pub const MAX_DATA: usize = 32 * 1024;

/// Header names of the SPDY/3 compression dictionary, each preceded by its
/// 32-bit length in the dictionary.
const DICTIONARY_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

/// The dictionary's tail: status codes, reason phrases, dates and common
/// values, without length prefixes.
const DICTIONARY_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,",
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

/// The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00
/// section 2.6.10.1).
pub fn dictionary() -> &'static [u8] {
    static DICT: OnceLock<Vec<u8>> = OnceLock::new();
    DICT.get_or_init(|| {
        let mut d = Vec::with_capacity(1500);
        for w in DICTIONARY_WORDS {
            d.extend_from_slice(&(w.len() as u32).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(DICTIONARY_TAIL.as_bytes());
        d
    })
}

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Inflates the client's header blocks (one zlib stream per connection).
struct HeaderReader {
    z: Decompress,
}

impl HeaderReader {
    fn new() -> Self {
        Self {
            z: Decompress::new(true),
        }
    }

    fn inflate(&mut self, input: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(input.len() * 4 + 256);
        let mut pos = 0usize;
        for _ in 0..10_000 {
            if out.capacity() - out.len() < 1024 {
                out.reserve(4096);
            }
            let before = self.z.total_in();
            let res = self
                .z
                .decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync);
            pos += (self.z.total_in() - before) as usize;
            match res {
                Ok(Status::StreamEnd) => return Ok(out),
                Ok(_) => {
                    if pos >= input.len() && out.len() < out.capacity() {
                        return Ok(out);
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(dictionary())
                        .map_err(|e| invalid(format!("SPDY header dictionary: {e}")))?;
                }
                Err(e) => return Err(invalid(format!("SPDY header block: {e}"))),
            }
            if out.len() > MAX_FRAME {
                break;
            }
        }
        Err(invalid("SPDY header block does not end"))
    }
}

/// Deflates our header blocks.
struct HeaderWriter {
    z: Compress,
}

impl HeaderWriter {
    fn new() -> std::io::Result<Self> {
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(dictionary())
            .map_err(|e| invalid(format!("SPDY header dictionary: {e}")))?;
        Ok(Self { z })
    }

    fn deflate(&mut self, input: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(input.len() + 1024);
        let mut pos = 0usize;
        for _ in 0..10_000 {
            if out.capacity() - out.len() < 256 {
                out.reserve(1024);
            }
            let before = self.z.total_in();
            self.z
                .compress_vec(&input[pos..], &mut out, FlushCompress::Sync)
                .map_err(|e| invalid(format!("SPDY header compression: {e}")))?;
            pos += (self.z.total_in() - before) as usize;
            if pos >= input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
        Err(invalid("SPDY header compression does not end"))
    }
}

fn parse_headers(block: &[u8]) -> std::io::Result<Vec<(String, String)>> {
    let mut p = block;
    let mut take = |n: usize| -> std::io::Result<&[u8]> {
        if p.len() < n {
            return Err(invalid("truncated SPDY header block"));
        }
        let (a, b) = p.split_at(n);
        p = b;
        Ok(a)
    };
    let count = u32::from_be_bytes(take(4)?.try_into().map_err(|_| invalid("count"))?);
    let mut out = Vec::new();
    for _ in 0..count {
        let n = u32::from_be_bytes(take(4)?.try_into().map_err(|_| invalid("len"))?) as usize;
        let name = String::from_utf8_lossy(take(n)?).to_ascii_lowercase();
        let n = u32::from_be_bytes(take(4)?.try_into().map_err(|_| invalid("len"))?) as usize;
        let value = String::from_utf8_lossy(take(n)?).into_owned();
        for v in value.split('\0') {
            out.push((name.clone(), v.to_owned()));
        }
    }
    Ok(out)
}

/// What the client did.
#[derive(Debug)]
pub enum Event {
    /// A new stream (already answered with SYN_REPLY).
    Stream {
        id: u32,
        headers: Vec<(String, String)>,
    },
    Data {
        id: u32,
        data: Bytes,
    },
    /// The client closed its side of the stream.
    Fin {
        id: u32,
    },
    Reset {
        id: u32,
    },
}

/// What we send.
#[derive(Debug)]
pub enum Out {
    Reply(u32),
    Data(u32, Bytes),
    Fin(u32),
    Reset(u32),
    Ping(u32),
    GoAway,
}

fn control(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + payload.len());
    f.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    f.extend_from_slice(&kind.to_be_bytes());
    let len = payload.len() as u32;
    f.push(flags);
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.extend_from_slice(payload);
    f
}

fn data_frame(id: u32, fin: bool, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + data.len());
    f.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
    f.push(if fin { FLAG_FIN } else { 0 });
    f.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(data);
    f
}

fn stream_id(b: &[u8]) -> u32 {
    b.get(..4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0)
        & 0x7fff_ffff
}

/// A SPDY connection run by a reader and a writer task.
#[derive(Debug)]
pub struct SpdyConn {
    pub events: mpsc::Receiver<Event>,
    pub out: mpsc::Sender<Out>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl SpdyConn {
    pub fn spawn<IO>(io: IO) -> std::io::Result<Self>
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let (ev_tx, events) = mpsc::channel(256);
        let (out, out_rx) = mpsc::channel(256);
        let headers = HeaderWriter::new()?;
        let writer = tokio::spawn(write_loop(wr, out_rx, headers));
        let reader = tokio::spawn(read_loop(rd, ev_tx, out.clone()));
        Ok(Self {
            events,
            out,
            reader,
            writer,
        })
    }

    /// Sends GOAWAY, ends our side and waits (briefly) for the client to
    /// close its side.
    pub async fn close(self) {
        let _ = self.out.send(Out::GoAway).await;
        drop(self.out);
        let _ = self.writer.await;
        drop(self.events);
        if tokio::time::timeout(std::time::Duration::from_secs(5), self.reader)
            .await
            .is_err()
        {
            tracing::debug!("SPDY client did not close in time");
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Out>,
    mut headers: HeaderWriter,
) {
    while let Some(out) = rx.recv().await {
        let frame = match out {
            Out::Reply(id) => match headers.deflate(&0u32.to_be_bytes()) {
                Ok(block) => {
                    let mut payload = (id & 0x7fff_ffff).to_be_bytes().to_vec();
                    payload.extend_from_slice(&block);
                    control(TYPE_SYN_REPLY, 0, &payload)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "SPDY: cannot encode a reply");
                    break;
                }
            },
            Out::Data(id, data) => {
                let mut f = Vec::new();
                for chunk in data.chunks(MAX_DATA) {
                    f.extend_from_slice(&data_frame(id, false, chunk));
                }
                f
            }
            Out::Fin(id) => data_frame(id, true, &[]),
            Out::Reset(id) => {
                let mut p = (id & 0x7fff_ffff).to_be_bytes().to_vec();
                p.extend_from_slice(&STATUS_CANCEL.to_be_bytes());
                control(TYPE_RST_STREAM, 0, &p)
            }
            Out::Ping(id) => control(TYPE_PING, 0, &id.to_be_bytes()),
            Out::GoAway => control(TYPE_GOAWAY, 0, &[0u8; 8]),
        };
        if wr.write_all(&frame).await.is_err() || wr.flush().await.is_err() {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    events: mpsc::Sender<Event>,
    out: mpsc::Sender<Out>,
) {
    let mut headers = HeaderReader::new();
    if let Err(e) = read_frames(&mut rd, &events, &out, &mut headers).await {
        tracing::debug!(error = %e, "SPDY connection ended");
    }
}

async fn read_frames<R: AsyncRead + Unpin>(
    rd: &mut R,
    events: &mpsc::Sender<Event>,
    out: &mpsc::Sender<Out>,
    headers: &mut HeaderReader,
) -> std::io::Result<()> {
    // Events are dropped once the handler stops listening; frames are
    // still read so pings get answered until the client goes.
    let emit = |e: Event| async move {
        let _ = events.send(e).await;
    };
    loop {
        let mut head = [0u8; 8];
        match rd.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let flags = head[4];
        let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        if len > MAX_FRAME {
            return Err(invalid("SPDY frame too large"));
        }
        let mut payload = vec![0u8; len];
        rd.read_exact(&mut payload).await?;
        let fin = flags & FLAG_FIN != 0;
        if head[0] & 0x80 == 0 {
            let id = stream_id(&head);
            if !payload.is_empty() {
                emit(Event::Data {
                    id,
                    data: Bytes::from(payload),
                })
                .await;
            }
            if fin {
                emit(Event::Fin { id }).await;
            }
            continue;
        }
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        if version != VERSION {
            return Err(invalid(format!("SPDY version {version} is not supported")));
        }
        match u16::from_be_bytes([head[2], head[3]]) {
            TYPE_SYN_STREAM if payload.len() >= 10 => {
                let id = stream_id(&payload);
                let block = headers.inflate(&payload[10..])?;
                let hs = parse_headers(&block)?;
                let _ = out.send(Out::Reply(id)).await;
                emit(Event::Stream { id, headers: hs }).await;
                if fin {
                    emit(Event::Fin { id }).await;
                }
            }
            TYPE_SYN_REPLY | TYPE_HEADERS if payload.len() >= 4 => {
                // Keeps the decompression context in step; the content is
                // not needed.
                headers.inflate(&payload[4..])?;
                if fin {
                    emit(Event::Fin {
                        id: stream_id(&payload),
                    })
                    .await;
                }
            }
            TYPE_RST_STREAM if payload.len() >= 4 => {
                emit(Event::Reset {
                    id: stream_id(&payload),
                })
                .await;
            }
            TYPE_PING if payload.len() >= 4 => {
                let id = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                let _ = out.send(Out::Ping(id)).await;
            }
            TYPE_GOAWAY => return Ok(()),
            // SETTINGS, WINDOW_UPDATE, NOOP, CREDENTIAL: nothing to do.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dictionary_is_the_spdy3_one() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert_eq!(&d[..11], b"\0\0\0\x07options");
        assert!(d.ends_with(b",enq=0."));
    }

    #[test]
    fn header_blocks_round_trip_across_frames() {
        let mut w = HeaderWriter::new().unwrap();
        let mut r = HeaderReader::new();
        for round in 0..3 {
            let mut block = 2u32.to_be_bytes().to_vec();
            for (k, v) in [("streamtype", "stdout"), ("requestid", "7")] {
                block.extend_from_slice(&(k.len() as u32).to_be_bytes());
                block.extend_from_slice(k.as_bytes());
                let v = format!("{v}{round}");
                block.extend_from_slice(&(v.len() as u32).to_be_bytes());
                block.extend_from_slice(v.as_bytes());
            }
            let compressed = w.deflate(&block).unwrap();
            let plain = r.inflate(&compressed).unwrap();
            let hs = parse_headers(&plain).unwrap();
            assert_eq!(hs[0], ("streamtype".into(), format!("stdout{round}")));
            assert_eq!(hs[1], ("requestid".into(), format!("7{round}")));
        }
    }
}
