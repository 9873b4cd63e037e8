//! Leader election on a coordination.k8s.io/v1 Lease, as client-go's
//! leaderelection: the holder renews `renewTime` every `renew_every`; a
//! candidate takes the Lease over once `renewTime + leaseDurationSeconds`
//! has passed. Writes are compare-and-swap on the resourceVersion, so two
//! candidates never both win.

use crate::{
    client::{Client, LEASES},
    error::Result,
};
use serde_json::{Value, json};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
    pub retry_every: Duration,
}

impl LeaseConfig {
    pub fn controller_manager(identity: String) -> Self {
        Self {
            namespace: "kube-system".into(),
            name: "skep-controller-manager".into(),
            identity,
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            retry_every: Duration::from_secs(2),
        }
    }
}

fn micro_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn expired(lease: &Value, now: chrono::DateTime<chrono::Utc>) -> bool {
    let renew = lease
        .pointer("/spec/renewTime")
        .and_then(Value::as_str)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
    let secs = lease
        .pointer("/spec/leaseDurationSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(15);
    match renew {
        Some(t) => t.with_timezone(&chrono::Utc) + chrono::Duration::seconds(secs) < now,
        None => true,
    }
}

/// One attempt to acquire or renew; true when we hold the Lease after it.
pub async fn try_acquire_or_renew(client: &Client, cfg: &LeaseConfig) -> Result<bool> {
    let spec = |transitions: i64, acquire: Option<String>| {
        json!({
            "holderIdentity": cfg.identity,
            "leaseDurationSeconds": cfg.lease_duration.as_secs(),
            "acquireTime": acquire.unwrap_or_else(micro_now),
            "renewTime": micro_now(),
            "leaseTransitions": transitions,
        })
    };
    let current = match client.get(LEASES, Some(&cfg.namespace), &cfg.name).await {
        Ok(l) => l,
        Err(e) if e.is_not_found() => {
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": cfg.name, "namespace": cfg.namespace},
                "spec": spec(0, None),
            });
            return match client.create(LEASES, Some(&cfg.namespace), lease).await {
                Ok(_) => Ok(true),
                Err(e) if e.is_already_exists() => Ok(false),
                Err(e) => Err(e),
            };
        }
        Err(e) => return Err(e),
    };
    let holder = current
        .pointer("/spec/holderIdentity")
        .and_then(Value::as_str)
        .unwrap_or("");
    let transitions = current
        .pointer("/spec/leaseTransitions")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let mine = holder == cfg.identity;
    if !mine && !holder.is_empty() && !expired(&current, chrono::Utc::now()) {
        return Ok(false);
    }
    let acquire = mine
        .then(|| {
            current
                .pointer("/spec/acquireTime")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .flatten();
    let mut next = current.clone();
    next["spec"] = spec(if mine { transitions } else { transitions + 1 }, acquire);
    match client.update(LEASES, Some(&cfg.namespace), next).await {
        Ok(_) => Ok(true),
        Err(e) if e.is_conflict() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Blocks until this candidate holds the Lease.
pub async fn acquire(client: &Client, cfg: &LeaseConfig) {
    loop {
        match try_acquire_or_renew(client, cfg).await {
            Ok(true) => {
                tracing::info!(identity = %cfg.identity, lease = %cfg.name, "became the leader");
                return;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "leader election: lease update failed"),
        }
        tokio::time::sleep(cfg.retry_every).await;
    }
}

/// Renews until a renewal has not succeeded for a whole lease duration,
/// then returns: leadership is lost and the caller must stop its loops.
pub async fn keep(client: &Client, cfg: &LeaseConfig) {
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(cfg.renew_every).await;
        match try_acquire_or_renew(client, cfg).await {
            Ok(true) => last_ok = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::warn!(identity = %cfg.identity, "leadership taken over by another server");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "leader election: renewal failed"),
        }
        if last_ok.elapsed() > cfg.lease_duration {
            tracing::warn!(identity = %cfg.identity, "lease not renewed in time; stepping down");
            return;
        }
    }
}
