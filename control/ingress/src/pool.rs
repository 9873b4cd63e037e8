//! Upstream keep-alive connections through hyper's HTTP/1.1 client, per
//! endpoint: senders kept idle between requests and handed back when a
//! response body has been read to its end (see [`PooledBody`]). The proxy
//! uses it only for protocol upgrades (WebSocket), where hyper hands over
//! the upgraded connection; every other request goes through
//! [`crate::upstream`], which spends less CPU per request.
//!
//! It replaces hyper-util's legacy client, which spawned a task per
//! request to watch the connection become idle again and hashed a
//! (scheme, authority) key per checkout; the proxy spent ~30 % more CPU
//! per request than nginx with it (profiled with the ingress benchmark).
//! Connecting is explicit here, so a connect failure is known before any
//! of the request is handed over, and the next endpoint gets it intact.

use bytes::Bytes;
use hyper::{
    Request, Response,
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1::{self, SendRequest},
};
use hyper_util::rt::TokioIo;
use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use crate::proxy::UpBody;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle connections kept per endpoint (more are closed when returned).
const MAX_IDLE: usize = 1024;

type Sender = SendRequest<UpBody>;

#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Sender>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

impl Pool {
    fn take(&self, ep: SocketAddr) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(&ep)?;
        while let Some(s) = list.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn put(&self, ep: SocketAddr, s: Sender) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(ep).or_default();
        if list.len() < MAX_IDLE {
            list.push(s);
        }
    }

    async fn connect(ep: SocketAddr) -> Result<Sender, UpstreamError> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(ep))
            .await
            .map_err(|_| UpstreamError::Connect(ep, "timed out".into()))?
            .map_err(|e| UpstreamError::Connect(ep, e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| UpstreamError::Connect(ep, e.to_string()))?;
        tokio::spawn(async move {
            // Upgrades (101) hand the connection to the proxy's splice.
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(upstream = %ep, error = %e, "upstream connection ended");
            }
        });
        Ok(send)
    }

    /// A ready sender to `ep`: an idle one, else a new connection.
    async fn checkout(&self, ep: SocketAddr) -> Result<Sender, UpstreamError> {
        while let Some(mut s) = self.take(ep) {
            // Returned at its body's end, the connection may still be
            // finishing that response; a closed one is dropped.
            if s.ready().await.is_ok() {
                return Ok(s);
            }
        }
        Self::connect(ep).await
    }

    /// Sends `req` to `ep`. A pooled connection that turns out closed
    /// before the request went out is replaced by a new one (once).
    /// `Err(Connect)` means nothing of the request was sent.
    pub async fn send(
        self: &Arc<Self>,
        ep: SocketAddr,
        mut req: Request<UpBody>,
    ) -> Result<Response<PooledBody>, (UpstreamError, Option<Request<UpBody>>)> {
        for fresh in [false, true] {
            let conn = if fresh {
                Self::connect(ep).await
            } else {
                self.checkout(ep).await
            };
            let mut s = match conn {
                Ok(s) => s,
                // Nothing was sent: the caller may try another endpoint.
                Err(e) => return Err((e, Some(req))),
            };
            match s.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, inner) = resp.into_parts();
                    return Ok(Response::from_parts(
                        parts,
                        PooledBody {
                            inner,
                            back: Some((self.clone(), ep, s)),
                        },
                    ));
                }
                Err(mut e) => match e.take_message() {
                    // Not sent: a stale keep-alive connection.
                    Some(r) if !fresh => req = r,
                    r => return Err((UpstreamError::Http(e.into_error()), r)),
                },
            }
        }
        unreachable!("the loop returns on its second pass")
    }
}

/// An upstream response body; when it has been read to the end its
/// connection goes back to the pool.
#[derive(Debug)]
pub struct PooledBody {
    inner: Incoming,
    back: Option<(Arc<Pool>, SocketAddr, Sender)>,
}

impl PooledBody {
    /// The connection is not to be reused (it was upgraded).
    pub fn forget_connection(&mut self) {
        self.back = None;
    }

    fn release(&mut self) {
        if let Some((pool, ep, s)) = self.back.take() {
            pool.put(ep, s);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = r {
            this.release();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body dropped before its end leaves the connection mid-response:
        // it is not reused (dropping the sender closes it).
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}
