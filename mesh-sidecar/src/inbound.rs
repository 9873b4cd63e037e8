//! The inbound listener: mTLS from other sidecars (peer identity verified,
//! allow-list applied, destination port from the mesh header), and in
//! permissive mode plaintext from unmeshed clients.
//!
//! Telling the two apart peeks at the first byte without consuming it. A
//! client of a server-speaks-first protocol sends nothing, so the peek
//! waits at most `detect_timeout` before the app is connected anyway; on
//! the configured server-first ports there is no peek at all.

use crate::{
    config::Mode,
    detect, header,
    metrics::{Direction, PLAINTEXT_PEER},
    relay::{Labels, relay},
    sidecar::Shared,
};
use std::{net::SocketAddr, sync::Arc};
use tokio::net::TcpStream;

enum First {
    Tls,
    Plaintext,
    Silent,
    Closed,
}

async fn first_bytes(tcp: &TcpStream, shared: &Shared) -> First {
    let mut b = [0u8; 1];
    match tokio::time::timeout(shared.config.detect_timeout, tcp.peek(&mut b)).await {
        Err(_) => First::Silent,
        Ok(Ok(0)) | Ok(Err(_)) => First::Closed,
        Ok(Ok(_)) if detect::is_tls_handshake(b[0]) => First::Tls,
        Ok(Ok(_)) => First::Plaintext,
    }
}

pub(crate) async fn handle(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let listen_port = tcp.local_addr().map(|a| a.port()).unwrap_or(0);
    // The app port a plaintext client wanted, when a capture redirected it
    // here (otherwise the client dialled this listener itself).
    let wanted = shared
        .inbound_dst
        .original_dst(&tcp)
        .ok()
        .map(|a| a.port())
        .filter(|p| *p != listen_port);
    let server_first = wanted.is_some_and(|p| shared.config.server_first_ports.contains(&p));
    let first = if server_first {
        First::Silent
    } else {
        first_bytes(&tcp, &shared).await
    };
    match first {
        First::Closed => {}
        // A redirected client speaking TLS may be an unmeshed client of a
        // TLS app: only a ClientHello offering the mesh ALPN is ours.
        First::Tls if wanted.is_some() && !offers_mesh_alpn(&tcp, &shared).await => {
            plaintext(tcp, peer, wanted, shared).await
        }
        First::Tls => mtls(tcp, peer, shared).await,
        First::Plaintext | First::Silent => plaintext(tcp, peer, wanted, shared).await,
    }
}

/// Peeks (never consumes) the ClientHello record for the mesh ALPN. It
/// normally arrives whole in the first segment; a split one is re-peeked
/// for up to the detection window. Unsure means mesh.
async fn offers_mesh_alpn(tcp: &TcpStream, shared: &Shared) -> bool {
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + shared.config.detect_timeout;
    loop {
        let Ok(Ok(n)) = tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await else {
            return true;
        };
        match detect::client_hello_offers(&buf[..n], crate::tls::ALPN) {
            Some(offers) => return offers,
            // A record longer than the buffer: the ALPN extension would
            // have been in it.
            None if n == buf.len() => return false,
            None if tokio::time::Instant::now() >= deadline => return true,
            // peek returns at once while data waits; give the rest of the
            // record a moment to arrive.
            None => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
        }
    }
}

async fn plaintext(tcp: TcpStream, peer: SocketAddr, wanted: Option<u16>, shared: Arc<Shared>) {
    let metrics = &shared.metrics;
    if shared.config.mode == Mode::Strict {
        tracing::debug!(%peer, "strict mode: plaintext refused");
        metrics.refused(Direction::Inbound, "plaintext");
        return;
    }
    let Some(port) = wanted.or(shared.config.inbound_default_port) else {
        tracing::debug!(%peer, "plaintext without a known app port refused");
        metrics.refused(Direction::Inbound, "no-destination");
        return;
    };
    let Some(app) = connect_app(port, &shared).await else {
        return;
    };
    relay(
        tcp,
        app,
        Labels {
            metrics: metrics.clone(),
            direction: Direction::Inbound,
            peer: PLAINTEXT_PEER.into(),
        },
        shared.hard_stop.clone(),
    )
    .await;
}

async fn connect_app(port: u16, shared: &Shared) -> Option<TcpStream> {
    let addr = SocketAddr::from((shared.config.app_host, port));
    if shared.own_ports.contains(&port) {
        tracing::debug!(%addr, "refusing to proxy to the sidecar's own port");
        shared.metrics.refused(Direction::Inbound, "loop");
        return None;
    }
    match tokio::time::timeout(shared.config.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        Ok(Err(e)) => {
            tracing::debug!(%addr, error = %e, "the app refused the connection");
            shared
                .metrics
                .refused(Direction::Inbound, "app-unreachable");
            None
        }
        Err(_) => {
            shared
                .metrics
                .refused(Direction::Inbound, "app-unreachable");
            None
        }
    }
}

async fn mtls(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let metrics = &shared.metrics;
    let accepted =
        tokio::time::timeout(shared.config.handshake_timeout, shared.acceptor.accept(tcp)).await;
    let mut tls = match accepted {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "inbound mTLS handshake failed");
            metrics.tls_failure(Direction::Inbound);
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "inbound mTLS handshake timed out");
            metrics.tls_failure(Direction::Inbound);
            return;
        }
    };
    let Some(id) = crate::tls::peer_id(tls.get_ref().1.peer_certificates()) else {
        metrics.tls_failure(Direction::Inbound);
        return;
    };
    let id = id.to_string();
    if !shared.config.allowed_peers.is_empty() && !shared.config.allowed_peers.contains(&id) {
        tracing::info!(%peer, %id, "peer identity not on the allow-list; refused");
        metrics.refused(Direction::Inbound, "not-allowed");
        return;
    }
    let port =
        match tokio::time::timeout(shared.config.handshake_timeout, header::read(&mut tls)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::debug!(%peer, %id, error = %e, "bad mesh header");
                metrics.refused(Direction::Inbound, "bad-header");
                return;
            }
            Err(_) => {
                metrics.refused(Direction::Inbound, "bad-header");
                return;
            }
        };
    let Some(app) = connect_app(port, &shared).await else {
        return;
    };
    relay(
        tls,
        app,
        Labels {
            metrics: metrics.clone(),
            direction: Direction::Inbound,
            peer: id,
        },
        shared.hard_stop.clone(),
    )
    .await;
}
