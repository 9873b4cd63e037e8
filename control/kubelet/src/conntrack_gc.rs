//! The periodic conntrack sweep: every 30 s, connections idle past their
//! timeout (Cilium's defaults: TCP 6 h, TCP after FIN/RST 10 s, UDP 60 s)
//! leave the load balancer's and the policy's conntrack. That is what ends
//! an established connection's pass after a NetworkPolicy change once it
//! goes idle, and what keeps the LRU maps from filling with dead flows.

use crate::network::SharedLb;
use skep_dataplane::lb::{CtTimeouts, Datapath as _};
use std::time::Duration;

const EVERY: Duration = Duration::from_secs(30);

pub async fn run(lb: SharedLb) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let lb = lb.clone();
        // Walks whole maps: blocking work, off the runtime's threads.
        let swept = tokio::task::spawn_blocking(move || {
            let mut guard = lb
                .lock()
                .map_err(|_| "the load balancer lock is poisoned".to_string())?;
            guard
                .datapath_mut()
                .gc_conntrack(&CtTimeouts::default())
                .map_err(|e| e.to_string())
        })
        .await;
        match swept {
            Ok(Ok(stats)) if stats.removed > 0 => tracing::debug!(
                removed = stats.removed,
                live = stats.live,
                pressure = stats.pressure(),
                "conntrack swept"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "conntrack sweep failed"),
            Err(e) => tracing::warn!(error = %e, "conntrack sweep task failed"),
        }
    }
}
