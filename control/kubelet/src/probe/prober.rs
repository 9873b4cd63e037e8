//! The probe worker: runs one probe of one container on the kubelet's
//! schedule and turns single results into a verdict with the thresholds.

use super::{ProbeKind, ProbeResult, ProbeTarget, probe_once};
use serde_json::Value;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// A probe's schedule and thresholds, with the API's defaults and minimums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTiming {
    /// `initialDelaySeconds` (default 0): nothing runs before it.
    pub initial_delay: Duration,
    /// `periodSeconds` (default 10, minimum 1).
    pub period: Duration,
    /// `timeoutSeconds` (default 1, minimum 1).
    pub timeout: Duration,
    /// `successThreshold` (default 1; always 1 for liveness and startup).
    pub success_threshold: u32,
    /// `failureThreshold` (default 3, minimum 1).
    pub failure_threshold: u32,
}

impl ProbeTiming {
    pub fn from_probe(kind: ProbeKind, probe: &Value) -> Self {
        let success_threshold = match kind {
            // The API rejects anything else; a stale object must not make
            // a liveness probe need two successes to count as alive.
            ProbeKind::Liveness | ProbeKind::Startup => 1,
            ProbeKind::Readiness => count(probe, "successThreshold", 1),
        };
        Self {
            initial_delay: Duration::from_secs(count(probe, "initialDelaySeconds", 0).into()),
            period: Duration::from_secs(count(probe, "periodSeconds", 10).max(1).into()),
            timeout: Self::timeout_of(probe),
            success_threshold: success_threshold.max(1),
            failure_threshold: count(probe, "failureThreshold", 3).max(1),
        }
    }

    pub(super) fn timeout_of(probe: &Value) -> Duration {
        Duration::from_secs(count(probe, "timeoutSeconds", 1).max(1).into())
    }
}

/// A positive integer field; absent, 0 (what clients that serialise unset
/// fields send) or negative means the default.
fn count(probe: &Value, field: &str, default: u32) -> u32 {
    match probe.get(field).and_then(Value::as_i64) {
        Some(n) if n > 0 => u32::try_from(n).unwrap_or(u32::MAX),
        _ => default,
    }
}

/// The state a running prober publishes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbeStatus {
    /// The verdict after thresholds. Readiness: the container is ready
    /// (starts false, true after `successThreshold` successes in a row).
    /// Liveness: the container is alive (starts true, false once
    /// `failureThreshold` failures in a row were seen). Startup: the
    /// container has started (starts false, true after one success; the
    /// kubelet's `started`).
    pub ready: bool,
    /// The message of the most recent failed probe, kept after later
    /// successes.
    pub last_failure: Option<String>,
    /// Failed probes in a row (0 after a success).
    pub consecutive_failures: u32,
    /// At least one probe has run.
    pub ran: bool,
}

impl ProbeStatus {
    /// What a prober of `kind` reports before its first probe.
    pub fn initial(kind: ProbeKind) -> Self {
        Self {
            ready: kind == ProbeKind::Liveness,
            ..Self::default()
        }
    }
}

/// What a prober tells its owner besides the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeEvent {
    /// One probe failed (post an `Unhealthy` event with
    /// [`ProbeKind::unhealthy_message`]). Dropped when the channel is
    /// full, so a slow reader never delays probing.
    Failed { kind: ProbeKind, message: String },
    /// `failureThreshold` failures in a row: for liveness and startup the
    /// container must be restarted, and the prober has stopped (start a
    /// new one for the new container); for readiness the container just
    /// turned (or stays) not ready and probing goes on.
    ThresholdReached { kind: ProbeKind, message: String },
}

/// Runs one probe of one container with Kubernetes timing until dropped
/// (dropping aborts the task; a probe in flight is cancelled).
///
/// The first probe runs right after `initialDelaySeconds`, then one every
/// `periodSeconds`. A startup prober stops once it succeeds; liveness and
/// startup probers stop when they reach `failureThreshold` (the kubelet
/// holds probing until the container is replaced). When the task ends the
/// watch keeps the last status (`changed()` then returns an error).
/// Liveness and readiness probers should only be spawned once the startup
/// probe, if any, succeeded, as the kubelet does.
#[derive(Debug)]
pub struct Prober {
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    /// Starts the prober on the current tokio runtime.
    pub fn spawn(
        kind: ProbeKind,
        probe: Value,
        target: ProbeTarget,
    ) -> (
        Prober,
        watch::Receiver<ProbeStatus>,
        mpsc::Receiver<ProbeEvent>,
    ) {
        let timing = ProbeTiming::from_probe(kind, &probe);
        let (status_tx, status_rx) = watch::channel(ProbeStatus::initial(kind));
        let (events_tx, events_rx) = mpsc::channel(32);
        let task = tokio::spawn(run(kind, probe, target, timing, status_tx, events_tx));
        (Prober { task }, status_rx, events_rx)
    }

    /// True once the prober stopped by itself (startup succeeded, or a
    /// liveness/startup threshold was reached).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    kind: ProbeKind,
    probe: Value,
    target: ProbeTarget,
    timing: ProbeTiming,
    status_tx: watch::Sender<ProbeStatus>,
    events: mpsc::Sender<ProbeEvent>,
) {
    if !timing.initial_delay.is_zero() {
        tokio::time::sleep(timing.initial_delay).await;
    }
    let mut ticker = tokio::time::interval(timing.period);
    // A probe that runs long delays the next one instead of bunching them.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status = status_tx.borrow().clone();
    // The last result and how many times in a row it came.
    let mut streak: Option<(bool, u32)> = None;
    loop {
        ticker.tick().await;
        let result = probe_once(&probe, &target).await;
        let success = result.is_success();
        let run = match streak {
            Some((last, n)) if last == success => n.saturating_add(1),
            _ => 1,
        };
        streak = Some((success, run));
        let threshold = if success {
            timing.success_threshold
        } else {
            timing.failure_threshold
        };

        status.ran = true;
        match &result {
            ProbeResult::Success => status.consecutive_failures = 0,
            ProbeResult::Failure(message) => {
                tracing::debug!(container = %target.container_id, probe = %kind, %message, "probe failed");
                status.consecutive_failures = run;
                status.last_failure = Some(message.clone());
                let event = ProbeEvent::Failed {
                    kind,
                    message: message.clone(),
                };
                if let Err(mpsc::error::TrySendError::Full(_)) = events.try_send(event) {
                    tracing::debug!(container = %target.container_id, probe = %kind, "probe event channel full; dropped a failure event");
                }
            }
        }
        if run >= threshold && status.ready != success {
            tracing::info!(container = %target.container_id, probe = %kind, verdict = success, "probe verdict changed");
            status.ready = success;
        }
        status_tx.send_if_modified(|published| {
            let changed = *published != status;
            if changed {
                *published = status.clone();
            }
            changed
        });

        if let ProbeResult::Failure(message) = &result
            && run == threshold
        {
            let event = ProbeEvent::ThresholdReached {
                kind,
                message: message.clone(),
            };
            match kind {
                // The prober stops right after, so waiting for room costs
                // nothing and the restart is never lost.
                ProbeKind::Liveness | ProbeKind::Startup => {
                    let _ = events.send(event).await;
                }
                // The watch carries the verdict; never stall probing.
                ProbeKind::Readiness => {
                    let _ = events.try_send(event);
                }
            }
        }

        match kind {
            ProbeKind::Startup if status.ready => {
                tracing::debug!(container = %target.container_id, "startup probe succeeded; stops probing");
                return;
            }
            ProbeKind::Liveness | ProbeKind::Startup if !success && run >= threshold => {
                tracing::info!(container = %target.container_id, probe = %kind, "probe failure threshold reached; stops probing until the container is replaced");
                return;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timing_defaults_and_rules() {
        let t = ProbeTiming::from_probe(ProbeKind::Readiness, &json!({}));
        assert_eq!(t.initial_delay, Duration::ZERO);
        assert_eq!(t.period, Duration::from_secs(10));
        assert_eq!(t.timeout, Duration::from_secs(1));
        assert_eq!((t.success_threshold, t.failure_threshold), (1, 3));
        let p = json!({"initialDelaySeconds": 5, "periodSeconds": 2, "timeoutSeconds": 3,
            "successThreshold": 4, "failureThreshold": 6});
        let t = ProbeTiming::from_probe(ProbeKind::Readiness, &p);
        assert_eq!(t.initial_delay, Duration::from_secs(5));
        assert_eq!(t.period, Duration::from_secs(2));
        assert_eq!(t.timeout, Duration::from_secs(3));
        assert_eq!((t.success_threshold, t.failure_threshold), (4, 6));
        let t = ProbeTiming::from_probe(ProbeKind::Liveness, &p);
        assert_eq!(t.success_threshold, 1);
        let t = ProbeTiming::from_probe(ProbeKind::Readiness, &json!({"periodSeconds": 0}));
        assert_eq!(t.period, Duration::from_secs(10));
    }

    #[test]
    fn initial_status_per_kind() {
        assert!(ProbeStatus::initial(ProbeKind::Liveness).ready);
        assert!(!ProbeStatus::initial(ProbeKind::Readiness).ready);
        assert!(!ProbeStatus::initial(ProbeKind::Startup).ready);
    }
}
