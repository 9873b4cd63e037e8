//! What a sidecar is started with.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

/// Whether plaintext from unmeshed clients reaches the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Plaintext is passed to the app; mTLS is verified when offered.
    Permissive,
    /// Only mTLS from a verified peer reaches the app.
    Strict,
}

/// Well-known ports whose servers speak first (FTP, SSH, SMTP, POP3, IMAP,
/// submission, MySQL): no detection wait on them.
pub const DEFAULT_SERVER_FIRST_PORTS: [u16; 7] = [21, 22, 25, 110, 143, 587, 3306];

#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// mTLS from other sidecars (and, permissive, plaintext).
    pub inbound_listen: SocketAddr,
    /// The app's captured outbound connections.
    pub outbound_listen: SocketAddr,
    /// Metrics, readiness and liveness.
    pub admin_listen: SocketAddr,
    pub trust_domain: String,
    pub mode: Mode,
    /// Peer SPIFFE IDs allowed in; empty allows every identity of the
    /// trust domain.
    pub allowed_peers: Vec<String>,
    /// Ports whose protocol has the server speak first.
    pub server_first_ports: Vec<u16>,
    /// How long the inbound side waits for a client's first byte to tell
    /// TLS from plaintext before it connects to the app anyway.
    pub detect_timeout: Duration,
    /// The app's port for inbound plaintext when the capture did not say
    /// which port the client wanted (no inbound redirection).
    pub inbound_default_port: Option<u16>,
    /// Where the app listens.
    pub app_host: Ipv4Addr,
    /// The inbound port of other sidecars.
    pub peer_inbound_port: u16,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// How long open connections may finish after SIGTERM.
    pub drain_timeout: Duration,
}

impl Default for SidecarConfig {
    fn default() -> Self {
        Self {
            inbound_listen: SocketAddr::from(([0, 0, 0, 0], 15006)),
            outbound_listen: SocketAddr::from(([127, 0, 0, 1], 15001)),
            admin_listen: SocketAddr::from(([0, 0, 0, 0], 15020)),
            trust_domain: "cluster.local".into(),
            mode: Mode::Permissive,
            allowed_peers: Vec::new(),
            server_first_ports: DEFAULT_SERVER_FIRST_PORTS.to_vec(),
            detect_timeout: Duration::from_millis(100),
            inbound_default_port: None,
            app_host: Ipv4Addr::LOCALHOST,
            peer_inbound_port: 15006,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
        }
    }
}
