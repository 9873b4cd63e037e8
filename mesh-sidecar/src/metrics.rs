//! Counters and histograms for the Prometheus endpoint. Each connection
//! looks up its peer's counters once and then updates atomics only.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }

    fn index(self) -> usize {
        match self {
            Direction::Inbound => 0,
            Direction::Outbound => 1,
        }
    }
}

/// Peer label of connections without a verified identity.
pub const PLAINTEXT_PEER: &str = "plaintext";

/// Upper bounds (seconds) of the latency buckets.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Per (direction, peer): connections and bytes.
#[derive(Debug, Default)]
pub struct PeerStats {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    /// Bytes towards the peer / from the peer.
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

/// Requests and their latency, per (direction, peer, protocol).
#[derive(Debug, Default)]
pub struct RequestStats {
    count: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len()],
    answered: AtomicU64,
    sum_micros: AtomicU64,
}

impl RequestStats {
    pub fn started(&self, n: u64) {
        self.count.fetch_add(n, Relaxed);
    }

    pub fn answered(&self, latency: Duration) {
        let s = latency.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if s <= *bound {
                self.buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.answered.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(
            latency.as_micros().min(u128::from(u64::MAX)) as u64,
            Relaxed,
        );
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
}

type PeerKey = (Direction, String);
type RequestKey = (Direction, String, &'static str);

#[derive(Debug, Default)]
pub struct Metrics {
    peers: Mutex<BTreeMap<PeerKey, Arc<PeerStats>>>,
    requests: Mutex<BTreeMap<RequestKey, Arc<RequestStats>>>,
    tls_failures: [AtomicU64; 2],
    refused: Mutex<BTreeMap<(Direction, &'static str), u64>>,
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn peer(&self, direction: Direction, peer: &str) -> Arc<PeerStats> {
        let mut m = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((direction, peer.to_owned())).or_default().clone()
    }

    pub fn requests(
        &self,
        direction: Direction,
        peer: &str,
        protocol: crate::detect::Protocol,
    ) -> Arc<RequestStats> {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((direction, peer.to_owned(), protocol.as_str()))
            .or_default()
            .clone()
    }

    pub fn tls_failure(&self, direction: Direction) {
        self.tls_failures[direction.index()].fetch_add(1, Relaxed);
    }

    pub fn tls_failures(&self, direction: Direction) -> u64 {
        self.tls_failures[direction.index()].load(Relaxed)
    }

    /// A connection turned away (`reason`: plaintext in strict mode, a peer
    /// not on the allow-list, no destination, ...).
    pub fn refused(&self, direction: Direction, reason: &'static str) {
        let mut m = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((direction, reason)).or_default() += 1;
    }

    pub fn refused_count(&self, direction: Direction, reason: &str) -> u64 {
        let m = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter(|((d, r), _)| *d == direction && *r == reason)
            .map(|(_, n)| *n)
            .sum()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let peers: Vec<_> = {
            let m = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let _ = writeln!(
            out,
            "# HELP skep_mesh_connections_total Connections opened, by direction and peer identity.\n# TYPE skep_mesh_connections_total counter"
        );
        for ((d, p), s) in &peers {
            let _ = writeln!(
                out,
                "skep_mesh_connections_total{{direction=\"{}\",peer=\"{}\"}} {}",
                d.as_str(),
                escape(p),
                s.opened.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP skep_mesh_connections_open Connections open now.\n# TYPE skep_mesh_connections_open gauge"
        );
        for ((d, p), s) in &peers {
            let open = s
                .opened
                .load(Relaxed)
                .saturating_sub(s.closed.load(Relaxed));
            let _ = writeln!(
                out,
                "skep_mesh_connections_open{{direction=\"{}\",peer=\"{}\"}} {open}",
                d.as_str(),
                escape(p)
            );
        }
        let _ = writeln!(
            out,
            "# HELP skep_mesh_bytes_total Bytes relayed, sent to or received from the peer.\n# TYPE skep_mesh_bytes_total counter"
        );
        for ((d, p), s) in &peers {
            for (flow, v) in [("sent", &s.bytes_sent), ("received", &s.bytes_received)] {
                let _ = writeln!(
                    out,
                    "skep_mesh_bytes_total{{direction=\"{}\",peer=\"{}\",flow=\"{flow}\"}} {}",
                    d.as_str(),
                    escape(p),
                    v.load(Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP skep_mesh_tls_handshake_failures_total Failed mTLS handshakes.\n# TYPE skep_mesh_tls_handshake_failures_total counter"
        );
        for d in [Direction::Inbound, Direction::Outbound] {
            let _ = writeln!(
                out,
                "skep_mesh_tls_handshake_failures_total{{direction=\"{}\"}} {}",
                d.as_str(),
                self.tls_failures(d)
            );
        }
        let _ = writeln!(
            out,
            "# HELP skep_mesh_connections_refused_total Connections turned away, by reason.\n# TYPE skep_mesh_connections_refused_total counter"
        );
        {
            let m = self.refused.lock().unwrap_or_else(|p| p.into_inner());
            for ((d, r), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "skep_mesh_connections_refused_total{{direction=\"{}\",reason=\"{r}\"}} {n}",
                    d.as_str()
                );
            }
        }
        let requests: Vec<_> = {
            let m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let _ = writeln!(
            out,
            "# HELP skep_mesh_requests_total HTTP requests, by peer identity and protocol.\n# TYPE skep_mesh_requests_total counter"
        );
        for ((d, p, proto), s) in &requests {
            let _ = writeln!(
                out,
                "skep_mesh_requests_total{{direction=\"{}\",peer=\"{}\",protocol=\"{proto}\"}} {}",
                d.as_str(),
                escape(p),
                s.count()
            );
        }
        let _ = writeln!(
            out,
            "# HELP skep_mesh_request_duration_seconds Request start to first response byte.\n# TYPE skep_mesh_request_duration_seconds histogram"
        );
        for ((d, p, proto), s) in &requests {
            let labels = format!(
                "direction=\"{}\",peer=\"{}\",protocol=\"{proto}\"",
                d.as_str(),
                escape(p)
            );
            for (i, bound) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "skep_mesh_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {}",
                    s.buckets[i].load(Relaxed)
                );
            }
            let n = s.answered.load(Relaxed);
            let _ = writeln!(
                out,
                "skep_mesh_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {n}\nskep_mesh_request_duration_seconds_sum{{{labels}}} {}\nskep_mesh_request_duration_seconds_count{{{labels}}} {n}",
                s.sum_micros.load(Relaxed) as f64 / 1e6
            );
        }
        out
    }
}
