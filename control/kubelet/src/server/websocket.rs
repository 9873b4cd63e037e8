//! Server side of RFC 6455 WebSockets, as much as the Kubernetes streaming
//! protocols use: binary/text messages (fragmented or not), ping/pong and
//! close. Client frames are masked, ours are not; no extensions.

use base64::Engine;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
    task::JoinHandle,
};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Larger messages are refused (a stdin chunk or a SPDY frame is far
/// smaller).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut input = key.trim().as_bytes().to_vec();
    input.extend_from_slice(GUID.as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    /// A text or binary message.
    Data(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close,
}

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_owned())
}

/// Reads the next message; `None` at end of stream.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Message>> {
    let mut message: Vec<u8> = Vec::new();
    let mut fragmented = false;
    loop {
        let mut head = [0u8; 2];
        match r.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let fin = head[0] & 0x80 != 0;
        let opcode = head[0] & 0x0f;
        let masked = head[1] & 0x80 != 0;
        let len = match head[1] & 0x7f {
            126 => u64::from(r.read_u16().await?),
            127 => r.read_u64().await?,
            n => u64::from(n),
        };
        let len = usize::try_from(len).map_err(|_| invalid("frame too large"))?;
        if len > MAX_MESSAGE || message.len() + len > MAX_MESSAGE {
            return Err(invalid("WebSocket message too large"));
        }
        let mut mask = [0u8; 4];
        if masked {
            r.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        match opcode {
            OP_PING => return Ok(Some(Message::Ping(payload))),
            OP_PONG => return Ok(Some(Message::Pong)),
            OP_CLOSE => return Ok(Some(Message::Close)),
            OP_TEXT | OP_BINARY if !fragmented => {
                message = payload;
                if fin {
                    return Ok(Some(Message::Data(message)));
                }
                fragmented = true;
            }
            OP_CONTINUATION if fragmented => {
                message.extend_from_slice(&payload);
                if fin {
                    return Ok(Some(Message::Data(message)));
                }
            }
            _ => return Err(invalid("unexpected WebSocket opcode")),
        }
    }
}

/// An unmasked (server → client) frame.
pub fn encode(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

/// What the writer task sends.
#[derive(Debug)]
pub enum Outgoing {
    Binary(Vec<u8>),
    Pong(Vec<u8>),
    /// Sends a close frame (normal closure) and ends the writer.
    Close,
}

/// A WebSocket connection run by two tasks: `incoming` yields data
/// messages (ends when the client closes or goes away), `outgoing` takes
/// messages to send. Pings are answered by the reader.
#[derive(Debug)]
pub struct WsConn {
    pub incoming: mpsc::Receiver<Vec<u8>>,
    pub outgoing: mpsc::Sender<Outgoing>,
    pub reader: JoinHandle<()>,
    pub writer: JoinHandle<()>,
}

impl WsConn {
    pub fn spawn<IO>(io: IO) -> Self
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(io);
        let (in_tx, incoming) = mpsc::channel::<Vec<u8>>(64);
        let (outgoing, mut out_rx) = mpsc::channel::<Outgoing>(64);
        let pong = outgoing.clone();
        let reader = tokio::spawn(async move {
            loop {
                match read_message(&mut rd).await {
                    Ok(Some(Message::Data(d))) => {
                        if in_tx.send(d).await.is_err() {
                            // Nobody listens any more; keep answering pings
                            // until the connection ends.
                        }
                    }
                    Ok(Some(Message::Ping(p))) => {
                        let _ = pong.send(Outgoing::Pong(p)).await;
                    }
                    Ok(Some(Message::Pong)) => {}
                    Ok(Some(Message::Close)) | Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "WebSocket read failed");
                        break;
                    }
                }
            }
        });
        let writer = tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                let (frame, last) = match msg {
                    Outgoing::Binary(d) => (encode(OP_BINARY, &d), false),
                    Outgoing::Pong(p) => (encode(OP_PONG, &p), false),
                    Outgoing::Close => (encode(OP_CLOSE, &1000u16.to_be_bytes()), true),
                };
                if wr.write_all(&frame).await.is_err() || wr.flush().await.is_err() {
                    break;
                }
                if last {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        Self {
            incoming,
            outgoing,
            reader,
            writer,
        }
    }

    /// Sends a close frame, then waits (briefly) for the client to close.
    pub async fn close(self) {
        let _ = self.outgoing.send(Outgoing::Close).await;
        drop(self.outgoing);
        let _ = self.writer.await;
        let wait = tokio::time::timeout(std::time::Duration::from_secs(5), self.reader).await;
        if let Err(elapsed) = wait {
            tracing::debug!(%elapsed, "WebSocket client did not close in time");
        }
    }
}

/// Presents a WebSocket carrying a byte stream in binary messages (the
/// `SPDY/3.1+portforward.k8s.io` tunnel) as a plain duplex byte stream.
pub fn tunnel<IO>(io: IO) -> tokio::io::DuplexStream
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let WsConn {
        mut incoming,
        outgoing,
        reader,
        writer,
    } = WsConn::spawn(io);
    let (mut rd, mut wr) = tokio::io::split(ours);
    tokio::spawn(async move {
        while let Some(msg) = incoming.recv().await {
            if wr.write_all(&msg).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if outgoing
                        .send(Outgoing::Binary(buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = outgoing.send(Outgoing::Close).await;
        drop(outgoing);
        let _ = writer.await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), reader).await;
    });
    theirs
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn masked_fragmented_message() {
        let mask = [1u8, 2, 3, 4];
        let mut wire = Vec::new();
        for (op, fin, part) in [
            (OP_BINARY, false, &b"hel"[..]),
            (OP_CONTINUATION, true, b"lo"),
        ] {
            wire.push(if fin { 0x80 } else { 0 } | op);
            wire.push(0x80 | part.len() as u8);
            wire.extend_from_slice(&mask);
            wire.extend(part.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        let mut r = &wire[..];
        assert_eq!(
            read_message(&mut r).await.unwrap(),
            Some(Message::Data(b"hello".to_vec()))
        );
        assert_eq!(read_message(&mut r).await.unwrap(), None);
    }
}
