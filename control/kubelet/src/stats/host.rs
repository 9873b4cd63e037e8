//! The node's own totals from /proc: CPU time spent outside idle and
//! iowait (/proc/stat) and memory in use (MemTotal − MemAvailable,
//! /proc/meminfo). Nodes simulated as network namespaces on one machine
//! all report that machine.

use super::cgroup::{Reading, clock_ticks};
use std::fs;

/// Busy CPU time of the machine in nanoseconds and its memory in use.
pub fn read() -> Option<Reading> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is
    // already inside user/nice).
    let busy: u64 = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|i| v.get(*i))
        .sum();
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| {
        meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    let total = kib("MemTotal")?;
    let available = kib("MemAvailable").unwrap_or(0);
    Some(Reading {
        cpu_ns: busy.saturating_mul(1_000_000_000) / clock_ticks(),
        working_set: total.saturating_sub(available) * 1024,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn machine_totals_are_plausible() {
        let r = super::read().unwrap();
        assert!(r.cpu_ns > 0);
        assert!(r.working_set > 1024 * 1024);
    }
}
