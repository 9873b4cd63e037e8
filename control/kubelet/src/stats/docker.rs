//! Counters of the docker runtime's containers: one-shot `stats` from
//! dockerd (which reads the same cgroup files).

use super::cgroup::Reading;
use bollard::{Docker, query_parameters::StatsOptionsBuilder};
use futures::StreamExt;

/// Seconds dockerd gets to answer.
const TIMEOUT_SECS: u64 = 30;

pub fn connect(socket: &std::path::Path) -> Result<Docker, String> {
    let path = socket.to_string_lossy();
    Docker::connect_with_unix(&path, TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        .map_err(|e| format!("connecting to docker at {path}: {e}"))
}

/// One reading of container `id`; `None` when docker has none (gone,
/// stopped, or dockerd unreachable).
pub async fn read(docker: &Docker, id: &str) -> Option<Reading> {
    let opts = StatsOptionsBuilder::new()
        .stream(false)
        .one_shot(true)
        .build();
    let stats = match docker.stats(id, Some(opts)).next().await? {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(container = %id, error = %e, "docker stats failed");
            return None;
        }
    };
    let cpu_ns = stats.cpu_stats?.cpu_usage?.total_usage?;
    let mem = stats.memory_stats?;
    let usage = mem.usage.unwrap_or(0);
    // cgroup v1 reports total_inactive_file, v2 inactive_file.
    let inactive = mem
        .stats
        .as_ref()
        .and_then(|s| {
            s.get("total_inactive_file")
                .or_else(|| s.get("inactive_file"))
        })
        .copied()
        .unwrap_or(0);
    Some(Reading {
        cpu_ns,
        working_set: usage.saturating_sub(inactive),
    })
}
