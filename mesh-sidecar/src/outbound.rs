//! The outbound listener: the app's captured connections. A meshed
//! destination gets mTLS to its sidecar's inbound port with the mesh
//! header naming the original port; anything else is passed through in
//! plaintext to the original destination. The sidecar's own connections
//! carry [`crate::net::SIDECAR_MARK`] so the capture leaves them alone.

use crate::{
    header,
    metrics::Direction,
    relay::{Labels, relay},
    sidecar::Shared,
};
use rustls::pki_types::ServerName;
use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::Arc,
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

/// Peer label of pass-through connections.
pub const UNMESHED_PEER: &str = "unmeshed";

pub(crate) async fn handle(app: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let _ = app.set_nodelay(true);
    let metrics = &shared.metrics;
    let dst = match shared.outbound_dst.original_dst(&app) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "no original destination; closing");
            metrics.refused(Direction::Outbound, "no-destination");
            return;
        }
    };
    let own = app.local_addr().ok();
    if own == Some(SocketAddr::V4(dst)) {
        metrics.refused(Direction::Outbound, "loop");
        return;
    }
    if shared.meshed.is_meshed(*dst.ip()) {
        meshed(app, dst, shared).await
    } else {
        passthrough(app, dst, shared).await
    }
}

async fn passthrough(app: TcpStream, dst: SocketAddrV4, shared: Arc<Shared>) {
    let upstream = match crate::net::connect_marked(
        SocketAddr::V4(dst),
        shared.config.connect_timeout,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%dst, error = %e, "upstream unreachable");
            shared
                .metrics
                .refused(Direction::Outbound, "upstream-unreachable");
            return;
        }
    };
    relay(
        app,
        upstream,
        Labels {
            metrics: shared.metrics.clone(),
            direction: Direction::Outbound,
            peer: UNMESHED_PEER.into(),
        },
        shared.hard_stop.clone(),
    )
    .await;
}

async fn meshed(app: TcpStream, dst: SocketAddrV4, shared: Arc<Shared>) {
    let metrics = &shared.metrics;
    let sidecar = SocketAddr::from((*dst.ip(), shared.config.peer_inbound_port));
    let tcp = match crate::net::connect_marked(sidecar, shared.config.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%sidecar, error = %e, "destination sidecar unreachable");
            metrics.refused(Direction::Outbound, "upstream-unreachable");
            return;
        }
    };
    // The verifier ignores the name (identities are SPIFFE IDs); rustls
    // needs one for the session cache.
    let name = ServerName::IpAddress(IpAddr::V4(*dst.ip()).into());
    let mut tls = match tokio::time::timeout(
        shared.config.handshake_timeout,
        shared.connector.connect(name, tcp),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::debug!(%sidecar, error = %e, "outbound mTLS handshake failed");
            metrics.tls_failure(Direction::Outbound);
            return;
        }
        Err(_) => {
            metrics.tls_failure(Direction::Outbound);
            return;
        }
    };
    let Some(id) = crate::tls::peer_id(tls.get_ref().1.peer_certificates()) else {
        metrics.tls_failure(Direction::Outbound);
        return;
    };
    if tls.write_all(&header::encode(dst.port())).await.is_err() || tls.flush().await.is_err() {
        return;
    }
    relay(
        app,
        tls,
        Labels {
            metrics: metrics.clone(),
            direction: Direction::Outbound,
            peer: id.to_string(),
        },
        shared.hard_stop.clone(),
    )
    .await;
}
