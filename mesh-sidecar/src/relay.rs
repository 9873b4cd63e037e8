//! Copies both directions of a proxied connection, counting bytes and
//! feeding protocol detection with the chunks as they pass (detection
//! never holds data back). A half-close is passed on; the relay ends when
//! both directions are done, or at once when the sidecar is stopped hard.

use crate::{
    detect::{self, Tracker},
    metrics::{Direction, Metrics, PeerStats, RequestStats},
};
use std::{
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::Instant,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::watch,
};

const BUF: usize = 16 * 1024;

/// What the relay records into.
#[derive(Debug, Clone)]
pub struct Labels {
    pub metrics: Arc<Metrics>,
    pub direction: Direction,
    pub peer: String,
}

struct Detection {
    tracker: Option<Tracker>,
    stats: Option<Arc<RequestStats>>,
}

/// Relays `client` (the side requests come from) and `server` until both
/// are done. Inbound, the client is the peer (its bytes are received from
/// it); outbound, the server is.
pub async fn relay<C, S>(client: C, server: S, labels: Labels, mut hard_stop: watch::Receiver<bool>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let stats = labels.metrics.peer(labels.direction, &labels.peer);
    stats.opened.fetch_add(1, Relaxed);
    let detection = Mutex::new(Detection {
        tracker: None,
        stats: None,
    });
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = tokio::io::split(server);
    let inbound = labels.direction == Direction::Inbound;
    let up = copy(&mut cr, &mut sw, &stats, inbound, |chunk| {
        let mut d = detection.lock().unwrap_or_else(|p| p.into_inner());
        if d.tracker.is_none() {
            let protocol = detect::classify(chunk);
            d.tracker = Some(Tracker::new(protocol));
            if protocol != detect::Protocol::Opaque {
                d.stats = Some(
                    labels
                        .metrics
                        .requests(labels.direction, &labels.peer, protocol),
                );
            }
        }
        let d = &mut *d;
        if let (Some(t), Some(s)) = (d.tracker.as_mut(), d.stats.as_ref()) {
            let n = t.client_data(chunk, Instant::now());
            if n > 0 {
                s.started(n);
            }
        }
    });
    let down = copy(&mut sr, &mut cw, &stats, !inbound, |chunk| {
        let mut d = detection.lock().unwrap_or_else(|p| p.into_inner());
        let d = &mut *d;
        if let (Some(t), Some(s)) = (d.tracker.as_mut(), d.stats.as_ref()) {
            for latency in t.server_data(chunk, Instant::now()) {
                s.answered(latency);
            }
        }
    });
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = crate::sidecar::stopped(&mut hard_stop) => {}
    }
    stats.closed.fetch_add(1, Relaxed);
}

/// One direction; `from_peer` says which byte counter it feeds.
async fn copy<R, W>(
    r: &mut R,
    w: &mut W,
    stats: &PeerStats,
    from_peer: bool,
    mut observe: impl FnMut(&[u8]),
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        observe(&buf[..n]);
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
        // A TLS writer returns once the plaintext is taken, possibly with
        // records still queued behind a full socket; without a flush they
        // would wait for the next chunk, which may never come (the peer
        // waits for this answer). A no-op on plain TCP.
        if w.flush().await.is_err() {
            break;
        }
        let counter = if from_peer {
            &stats.bytes_received
        } else {
            &stats.bytes_sent
        };
        counter.fetch_add(n as u64, Relaxed);
    }
    let _ = w.shutdown().await;
}
