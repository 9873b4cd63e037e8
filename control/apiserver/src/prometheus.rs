//! The API server's `/metrics` in the Prometheus text format (0.0.4),
//! written by hand: a few counters, one histogram family and gauges do
//! not need a metrics library.
//!
//! Families (kube-apiserver's names and a subset of its labels):
//! `apiserver_request_total{verb,resource,code}`,
//! `apiserver_request_duration_seconds{verb,resource}` (histogram,
//! kube-apiserver's buckets), `apiserver_current_inflight_requests
//! {request_kind="readOnly"|"mutating"}`, and the process collector's
//! `process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_start_time_seconds`,
//! `process_open_fds`.

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{
        Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

/// kube-apiserver's request latency buckets (seconds).
const BUCKETS: [f64; 23] = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Per bucket (not cumulative; summed when rendered).
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if let Some(i) = BUCKETS.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }
}

/// Request metrics of one API server.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    durations: Mutex<BTreeMap<(String, String), Histogram>>,
    inflight_read: AtomicI64,
    inflight_mutating: AtomicI64,
}

/// Counts a request as in flight until dropped.
#[derive(Debug)]
pub struct Inflight<'a>(&'a AtomicI64);

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Label values are quoted strings: escape what the format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Marks a request in flight (`mutating`: anything but GET/HEAD/OPTIONS).
    pub fn inflight(&self, mutating: bool) -> Inflight<'_> {
        let gauge = if mutating {
            &self.inflight_mutating
        } else {
            &self.inflight_read
        };
        gauge.fetch_add(1, Ordering::Relaxed);
        Inflight(gauge)
    }

    /// Records a finished request (`verb` uppercase as kube-apiserver
    /// reports it is not required: whatever the caller passes).
    pub fn record(&self, verb: &str, resource: &str, code: u16, took: Duration) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((verb.to_owned(), resource.to_owned(), code))
                .or_default() += 1;
        }
        if let Ok(mut d) = self.durations.lock() {
            d.entry((verb.to_owned(), resource.to_owned()))
                .or_default()
                .observe(took.as_secs_f64());
        }
    }

    /// The whole exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP apiserver_request_total Counter of apiserver requests broken out for each verb, resource and HTTP response code.\n# TYPE apiserver_request_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((verb, resource, code), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "apiserver_request_total{{verb=\"{}\",resource=\"{}\",code=\"{code}\"}} {n}",
                    escape(verb),
                    escape(resource)
                );
            }
        }
        out.push_str("# HELP apiserver_request_duration_seconds Response latency distribution in seconds for each verb and resource.\n# TYPE apiserver_request_duration_seconds histogram\n");
        if let Ok(d) = self.durations.lock() {
            for ((verb, resource), h) in d.iter() {
                let labels = format!(
                    "verb=\"{}\",resource=\"{}\"",
                    escape(verb),
                    escape(resource)
                );
                let mut cumulative = 0;
                for (b, n) in BUCKETS.iter().zip(h.counts.iter()) {
                    cumulative += n;
                    let _ = writeln!(
                        out,
                        "apiserver_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {cumulative}"
                    );
                }
                let _ = writeln!(
                    out,
                    "apiserver_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}\napiserver_request_duration_seconds_sum{{{labels}}} {}\napiserver_request_duration_seconds_count{{{labels}}} {}",
                    h.count, h.sum, h.count
                );
            }
        }
        let _ = write!(
            out,
            "# HELP apiserver_current_inflight_requests Maximal number of currently used inflight request limit of this apiserver per request kind in last second.\n# TYPE apiserver_current_inflight_requests gauge\napiserver_current_inflight_requests{{request_kind=\"mutating\"}} {}\napiserver_current_inflight_requests{{request_kind=\"readOnly\"}} {}\n",
            self.inflight_mutating.load(Ordering::Relaxed),
            self.inflight_read.load(Ordering::Relaxed)
        );
        out.push_str(&process_metrics());
        out
    }
}

/// The standard process collector's metrics, from /proc/self.
pub fn process_metrics() -> String {
    let mut out = String::new();
    // /proc reports CPU times in USER_HZ ticks, which the kernel fixes at
    // 100 on x86 and arm (whatever its internal HZ).
    const TICKS: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 1..))
        .map(|s| s.split_whitespace().collect())
        .unwrap_or_default();
    // Fields after ')' start at stat(5)'s field 3.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        let _ = write!(
            out,
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}\n",
            (utime + stime) / TICKS
        );
    }
    if let Some(vsize) = field(23) {
        let _ = write!(
            out,
            "# HELP process_virtual_memory_bytes Virtual memory size in bytes.\n# TYPE process_virtual_memory_bytes gauge\nprocess_virtual_memory_bytes {vsize}\n"
        );
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kib = status.lines().find_map(|l| {
        l.strip_prefix("VmRSS:")?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    });
    if let Some(kib) = rss_kib {
        let _ = write!(
            out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}\n",
            kib * 1024
        );
    }
    let boot_time = std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok());
    if let (Some(btime), Some(start)) = (boot_time, field(22)) {
        let _ = write!(
            out,
            "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {}\n",
            btime + start / TICKS
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = write!(
            out,
            "# HELP process_open_fds Number of open file descriptors.\n# TYPE process_open_fds gauge\nprocess_open_fds {}\n",
            fds.count()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn renders_counters_histograms_and_process_metrics() {
        let m = Metrics::default();
        m.record("list", "pods", 200, Duration::from_millis(30));
        m.record("list", "pods", 200, Duration::from_millis(2));
        {
            let _g = m.inflight(true);
            assert!(m.render().contains("request_kind=\"mutating\"} 1"));
        }
        let text = m.render();
        assert!(
            text.contains(
                "apiserver_request_total{verb=\"list\",resource=\"pods\",code=\"200\"} 2"
            )
        );
        assert!(text.contains(
            "apiserver_request_duration_seconds_bucket{verb=\"list\",resource=\"pods\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "apiserver_request_duration_seconds_bucket{verb=\"list\",resource=\"pods\",le=\"0.05\"} 2"
        ));
        assert!(text.contains(
            "apiserver_request_duration_seconds_count{verb=\"list\",resource=\"pods\"} 2"
        ));
        assert!(text.contains("request_kind=\"mutating\"} 0"));
        assert!(text.contains("process_resident_memory_bytes "));
        assert!(text.contains("process_cpu_seconds_total "));
    }
}
