//! Counters of the DNS server: queries by transport, address family, type
//! and response code, latency histogram, forwarding cache hits. Plain
//! relaxed atomics, so counting costs no lock on the query path;
//! [`Metrics::prometheus`] renders them in the Prometheus text format under
//! CoreDNS's metric names (so existing dashboards and alerts work), served
//! over HTTP by [`crate::metrics_http`].

use hickory_server::proto::{op::ResponseCode, rr::RecordType};
use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

const TYPES: [RecordType; 9] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::SRV,
    RecordType::PTR,
    RecordType::TXT,
    RecordType::CNAME,
    RecordType::SOA,
    RecordType::ANY,
    RecordType::AXFR,
];
const TYPE_SLOTS: usize = TYPES.len() + 1; // + "other"

const RCODES: [ResponseCode; 7] = [
    ResponseCode::NoError,
    ResponseCode::NXDomain,
    ResponseCode::ServFail,
    ResponseCode::Refused,
    ResponseCode::FormErr,
    ResponseCode::NotImp,
    ResponseCode::BADVERS,
];
const RCODE_SLOTS: usize = RCODES.len() + 1;

/// Upper bounds of the latency buckets, in microseconds.
const BUCKETS_US: [u64; 11] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000,
];

fn type_slot(t: RecordType) -> usize {
    TYPES.iter().position(|x| *x == t).unwrap_or(TYPES.len())
}

fn rcode_slot(r: ResponseCode) -> usize {
    RCODES.iter().position(|x| *x == r).unwrap_or(RCODES.len())
}

fn type_name(slot: usize) -> String {
    TYPES
        .get(slot)
        .map_or_else(|| "other".to_owned(), |t| t.to_string())
}

/// Names as dig prints them, in the order of [`RCODES`].
const RCODE_NAMES: [&str; RCODES.len()] = [
    "NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "FORMERR", "NOTIMP", "BADVERS",
];

fn rcode_name(slot: usize) -> String {
    RCODE_NAMES.get(slot).unwrap_or(&"other").to_string()
}

/// How a query arrived: CoreDNS's `proto` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    Udp = 0,
    Tcp = 1,
}

const PROTO_NAMES: [&str; 2] = ["udp", "tcp"];
/// CoreDNS's `family` label: "1" for IPv4 clients, "2" for IPv6.
const FAMILY_NAMES: [&str; 2] = ["1", "2"];

type Counts = [[AtomicU64; RCODE_SLOTS]; TYPE_SLOTS];

#[derive(Debug)]
pub struct Metrics {
    /// The `server` label: `dns://<listen address>` as CoreDNS writes it.
    server: String,
    /// Indexed by [proto][family][type][rcode].
    queries: [[Counts; 2]; 2],
    /// Cumulative counts per bucket are computed when rendering.
    latency: [AtomicU64; BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    /// Services and names of the current snapshot, set by the feed.
    snapshot_services: AtomicU64,
    snapshot_names: AtomicU64,
    snapshot_revision: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new("dns://:53".into())
    }
}

fn zeros<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

impl Metrics {
    pub(crate) fn new(server: String) -> Self {
        Self {
            server,
            queries: std::array::from_fn(|_| {
                std::array::from_fn(|_| std::array::from_fn(|_| zeros()))
            }),
            latency: zeros(),
            latency_sum_us: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            snapshot_services: AtomicU64::new(0),
            snapshot_names: AtomicU64::new(0),
            snapshot_revision: AtomicU64::new(0),
        }
    }

    pub(crate) fn query(
        &self,
        proto: Proto,
        ipv6: bool,
        qtype: RecordType,
        rcode: ResponseCode,
        took: Duration,
    ) {
        self.queries[proto as usize][usize::from(ipv6)][type_slot(qtype)][rcode_slot(rcode)]
            .fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let b = BUCKETS_US
            .iter()
            .position(|le| us <= *le)
            .unwrap_or(BUCKETS_US.len());
        self.latency[b].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub(crate) fn cache(&self, hit: bool) {
        let c = if hit {
            &self.cache_hits
        } else {
            &self.cache_misses
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, services: usize, names: usize, revision: i64) {
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        self.snapshot_services.store(n(services), Ordering::Relaxed);
        self.snapshot_names.store(n(names), Ordering::Relaxed);
        self.snapshot_revision
            .store(u64::try_from(revision).unwrap_or(0), Ordering::Relaxed);
    }

    fn cells(&self) -> impl Iterator<Item = (usize, usize, usize, usize, u64)> + '_ {
        (0..2).flat_map(move |p| {
            (0..2).flat_map(move |f| {
                (0..TYPE_SLOTS).flat_map(move |t| {
                    (0..RCODE_SLOTS).map(move |r| {
                        (p, f, t, r, self.queries[p][f][t][r].load(Ordering::Relaxed))
                    })
                })
            })
        })
    }

    /// Queries answered with `qtype` (e.g. "A", "other") and `rcode`
    /// (e.g. "NOERROR", "NXDOMAIN"), over both transports and families.
    pub fn queries(&self, qtype: &str, rcode: &str) -> u64 {
        self.cells()
            .filter(|(_, _, t, r, _)| type_name(*t) == qtype && rcode_name(*r) == rcode)
            .map(|c| c.4)
            .sum()
    }

    pub fn cache_hits(&self) -> u64 {
        self.cache_hits.load(Ordering::Relaxed)
    }

    pub fn cache_misses(&self) -> u64 {
        self.cache_misses.load(Ordering::Relaxed)
    }

    /// The counters in the Prometheus text exposition format, with
    /// CoreDNS's names and labels. The `zone` label is "." as for CoreDNS's
    /// usual single server block: one server answers every name.
    pub fn prometheus(&self) -> String {
        let server = &self.server;
        let mut out = String::with_capacity(4096);
        let mut requests = std::collections::BTreeMap::<(usize, usize, usize), u64>::new();
        for (p, f, t, _, n) in self.cells() {
            *requests.entry((p, f, t)).or_default() += n;
        }
        out.push_str(
            "# HELP coredns_dns_requests_total Counter of DNS requests made per zone, protocol and family.\n\
             # TYPE coredns_dns_requests_total counter\n",
        );
        for ((p, f, t), n) in requests.iter().filter(|(_, n)| **n > 0) {
            let _ = writeln!(
                out,
                "coredns_dns_requests_total{{server=\"{server}\",zone=\".\",proto=\"{}\",family=\"{}\",type=\"{}\"}} {n}",
                PROTO_NAMES[*p],
                FAMILY_NAMES[*f],
                type_name(*t)
            );
        }
        let mut responses = std::collections::BTreeMap::<(usize, usize, usize), u64>::new();
        for (p, _, t, r, n) in self.cells() {
            *responses.entry((p, t, r)).or_default() += n;
        }
        out.push_str(
            "# HELP coredns_dns_responses_total Counter of response status codes.\n\
             # TYPE coredns_dns_responses_total counter\n",
        );
        for ((p, t, r), n) in responses.iter().filter(|(_, n)| **n > 0) {
            let _ = writeln!(
                out,
                "coredns_dns_responses_total{{server=\"{server}\",zone=\".\",proto=\"{}\",type=\"{}\",rcode=\"{}\"}} {n}",
                PROTO_NAMES[*p],
                type_name(*t),
                rcode_name(*r)
            );
        }
        out.push_str(
            "# HELP coredns_dns_request_duration_seconds Histogram of the time (in seconds) each request took.\n\
             # TYPE coredns_dns_request_duration_seconds histogram\n",
        );
        let labels = format!("server=\"{server}\",zone=\".\"");
        let mut cumulative = 0;
        for (i, le) in BUCKETS_US.iter().enumerate() {
            cumulative += self.latency[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "coredns_dns_request_duration_seconds_bucket{{{labels},le=\"{}\"}} {cumulative}",
                *le as f64 / 1e6
            );
        }
        cumulative += self.latency[BUCKETS_US.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "coredns_dns_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "coredns_dns_request_duration_seconds_sum{{{labels}}} {}",
            self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "coredns_dns_request_duration_seconds_count{{{labels}}} {cumulative}"
        );
        let gauges: [(&str, &str, &str, u64); 5] = [
            (
                "coredns_cache_hits_total",
                "counter",
                "The count of cache hits (forwarded names).",
                self.cache_hits(),
            ),
            (
                "coredns_cache_misses_total",
                "counter",
                "The count of cache misses (forwarded names).",
                self.cache_misses(),
            ),
            (
                "skep_dns_snapshot_services",
                "gauge",
                "Services in the DNS snapshot being served.",
                self.snapshot_services.load(Ordering::Relaxed),
            ),
            (
                "skep_dns_snapshot_names",
                "gauge",
                "Names with records in the DNS snapshot being served.",
                self.snapshot_names.load(Ordering::Relaxed),
            ),
            (
                "skep_dns_snapshot_revision",
                "gauge",
                "Store revision the DNS snapshot reflects (0 before the first sync).",
                self.snapshot_revision.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{server=\"{server}\"}} {v}"
            );
        }
        out
    }
}
