//! Counters of the DNS server: queries by type and response code, latency
//! histogram, forwarding cache hits. Plain relaxed atomics, so counting
//! costs no lock on the query path; [`Metrics::prometheus`] renders them in
//! the Prometheus text format for whoever serves /metrics.

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

const RCODES: [ResponseCode; 6] = [
    ResponseCode::NoError,
    ResponseCode::NXDomain,
    ResponseCode::ServFail,
    ResponseCode::Refused,
    ResponseCode::FormErr,
    ResponseCode::NotImp,
];
const RCODE_SLOTS: usize = RCODES.len() + 1;

/// Upper bounds of the latency buckets, in microseconds.
const BUCKETS_US: [u64; 11] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000,
];

#[derive(Debug)]
pub struct Metrics {
    queries: [[AtomicU64; RCODE_SLOTS]; TYPE_SLOTS],
    /// Cumulative counts per bucket are computed when rendering.
    latency: [AtomicU64; BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            queries: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_us: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
        }
    }
}

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
    "NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "FORMERR", "NOTIMP",
];

fn rcode_name(slot: usize) -> String {
    RCODE_NAMES.get(slot).unwrap_or(&"other").to_string()
}

impl Metrics {
    pub(crate) fn query(&self, qtype: RecordType, rcode: ResponseCode, took: Duration) {
        self.queries[type_slot(qtype)][rcode_slot(rcode)].fetch_add(1, Ordering::Relaxed);
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

    /// Queries answered with `qtype` (e.g. "A", "other") and `rcode`
    /// (e.g. "NOERROR", "NXDOMAIN").
    pub fn queries(&self, qtype: &str, rcode: &str) -> u64 {
        (0..TYPE_SLOTS)
            .filter(|t| type_name(*t) == qtype)
            .flat_map(|t| {
                (0..RCODE_SLOTS)
                    .filter(|r| rcode_name(*r) == rcode)
                    .map(move |r| self.queries[t][r].load(Ordering::Relaxed))
            })
            .sum()
    }

    pub fn cache_hits(&self) -> u64 {
        self.cache_hits.load(Ordering::Relaxed)
    }

    pub fn cache_misses(&self) -> u64 {
        self.cache_misses.load(Ordering::Relaxed)
    }

    /// The counters in the Prometheus text exposition format.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        out.push_str("# TYPE skep_dns_queries_total counter\n");
        for t in 0..TYPE_SLOTS {
            for r in 0..RCODE_SLOTS {
                let n = self.queries[t][r].load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "skep_dns_queries_total{{type=\"{}\",rcode=\"{}\"}} {n}",
                        type_name(t),
                        rcode_name(r)
                    );
                }
            }
        }
        out.push_str("# TYPE skep_dns_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (i, le) in BUCKETS_US.iter().enumerate() {
            cumulative += self.latency[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "skep_dns_request_duration_seconds_bucket{{le=\"{}\"}} {cumulative}",
                *le as f64 / 1e6
            );
        }
        cumulative += self.latency[BUCKETS_US.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "skep_dns_request_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "skep_dns_request_duration_seconds_sum {}",
            self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "skep_dns_request_duration_seconds_count {cumulative}");
        out.push_str("# TYPE skep_dns_forward_cache_hits_total counter\n");
        let _ = writeln!(
            out,
            "skep_dns_forward_cache_hits_total {}",
            self.cache_hits()
        );
        out.push_str("# TYPE skep_dns_forward_cache_misses_total counter\n");
        let _ = writeln!(
            out,
            "skep_dns_forward_cache_misses_total {}",
            self.cache_misses()
        );
        out
    }
}
