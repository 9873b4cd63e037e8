//! Job controller: runs pods from the template until `completions` of them
//! succeeded, at most `parallelism` at a time; gives up after more than
//! `backoffLimit` failed pods or after `activeDeadlineSeconds`; `Indexed`
//! mode gives each pod an index (0..completions) and completes when every
//! index succeeded; `suspend` stops the active pods;
//! `ttlSecondsAfterFinished` deletes a finished Job (and, through the
//! garbage collector, its pods).

use crate::{
    client::{Client, PODS},
    enqueue,
    error::Result,
    events::EventType,
    informer::{Informer, Informers},
    meta,
    own_writes::OwnWrites,
    queue::Queue,
    runner::{Reconciler, Requeue},
};
use serde_json::{Value, json};
use std::{collections::BTreeSet, sync::Arc, time::Duration};

/// The events' source, as upstream names it.
const COMPONENT: &str = "job-controller";

pub const JOBS: crate::client::Gvr = ("batch", "v1", "jobs");
pub const INDEX_ANNOTATION: &str = "batch.kubernetes.io/job-completion-index";

#[derive(Debug)]
pub struct JobController {
    client: Client,
    jobs: Arc<Informer>,
    pods: Arc<Informer>,
    written: OwnWrites,
}

fn spec_i64(j: &Value, f: &str) -> Option<i64> {
    j.get("spec").and_then(|s| s.get(f)).and_then(Value::as_i64)
}

fn pod_index(p: &Value) -> Option<i64> {
    meta::annotation(p, INDEX_ANNOTATION).and_then(|i| i.parse().ok())
}

/// "0-2,4": kube's compressed list of indexes.
pub fn format_indexes(idx: &BTreeSet<i64>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut it = idx.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end += 1;
            it.next();
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

/// When a pod finished: its containers' latest `finishedAt`, else its
/// Ready condition's last transition, else its creation.
fn finish_time(p: &Value) -> Option<chrono::DateTime<chrono::Utc>> {
    let parse = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc))
    };
    let from_containers = p
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| {
            c.pointer("/state/terminated/finishedAt")
                .and_then(Value::as_str)
                .and_then(parse)
        })
        .max();
    from_containers
        .or_else(|| {
            meta::condition(p, "Ready")
                .and_then(|c| c.get("lastTransitionTime"))
                .and_then(Value::as_str)
                .and_then(parse)
        })
        .or_else(|| {
            p.pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str)
                .and_then(parse)
        })
}

const BACKOFF_BASE: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(360);

/// How long replacements must still wait: failures since the latest
/// success n ≥ 1 → 10 s × 2^(n−1) (at most 6 min) after the last one.
fn retry_backoff_left(pods: &[Arc<Value>], now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let last_success = pods
        .iter()
        .filter(|p| meta::pod_phase(p) == "Succeeded")
        .filter_map(|p| finish_time(p))
        .max();
    let failures: Vec<chrono::DateTime<chrono::Utc>> = pods
        .iter()
        .filter(|p| meta::pod_phase(p) == "Failed")
        .filter_map(|p| finish_time(p))
        .filter(|t| last_success.is_none_or(|s| *t > s))
        .collect();
    let last = *failures.iter().max()?;
    let n = failures.len() as u32;
    let delay = BACKOFF_BASE
        .saturating_mul(1u32 << (n - 1).min(16))
        .min(BACKOFF_MAX);
    let elapsed = (now - last).to_std().unwrap_or(Duration::ZERO);
    delay.checked_sub(elapsed).filter(|d| !d.is_zero())
}

fn finished(j: &Value) -> Option<&str> {
    ["Complete", "Failed"]
        .into_iter()
        .find(|c| meta::condition_true(j, c))
}

impl JobController {
    pub fn start(
        client: &Client,
        informers: &Informers,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let queue = Queue::new();
        let c = Arc::new(Self {
            client: client.clone(),
            jobs: informers.get_or_create(client.info(JOBS)?),
            pods: informers.get_or_create(client.info(PODS)?),
            written: OwnWrites::default(),
        });
        c.jobs.on_change(enqueue::own_key(&queue));
        c.pods.on_change(enqueue::controller_of(&queue, "Job"));
        Ok(crate::runner::spawn(c, queue, 2))
    }

    fn pod_for(job: &Value, index: Option<i64>) -> Value {
        let tmpl = job.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let name = meta::name(job);
        let uid = meta::uid(job);
        let mut labels = tmpl
            .pointer("/metadata/labels")
            .cloned()
            .unwrap_or(json!({}));
        labels["batch.kubernetes.io/controller-uid"] = json!(uid);
        labels["batch.kubernetes.io/job-name"] = json!(name);
        labels["controller-uid"] = json!(uid);
        labels["job-name"] = json!(name);
        let mut annotations = tmpl
            .pointer("/metadata/annotations")
            .cloned()
            .unwrap_or(json!({}));
        let mut spec = tmpl.get("spec").cloned().unwrap_or(json!({}));
        let generate = match index {
            Some(i) => {
                annotations[INDEX_ANNOTATION] = json!(i.to_string());
                labels[INDEX_ANNOTATION] = json!(i.to_string());
                spec["hostname"] = json!(format!("{name}-{i}"));
                if let Some(cs) = spec.get_mut("containers").and_then(Value::as_array_mut) {
                    for c in cs {
                        let env = c
                            .as_object_mut()
                            .map(|m| m.entry("env").or_insert_with(|| json!([])));
                        if let Some(Value::Array(env)) = env {
                            env.push(
                                json!({"name": "JOB_COMPLETION_INDEX", "value": i.to_string()}),
                            );
                        }
                    }
                }
                format!("{name}-{i}-")
            }
            None => format!("{name}-"),
        };
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "generateName": generate, "namespace": meta::namespace(job),
            "labels": labels, "annotations": annotations,
            "ownerReferences": [meta::controller_ref(job, "batch/v1", "Job")],
        }, "spec": spec})
    }

    async fn delete_pods(&self, key: &str, pods: &[Arc<Value>]) -> Result<()> {
        for p in pods {
            match self
                .client
                .delete(PODS, meta::namespace(p), meta::name(p), Some(meta::uid(p)))
                .await
            {
                Ok(out) => self.written.note(key, meta::resource_version(&out)),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn finish_with_ttl(&self, job: &Value) -> Result<Requeue> {
        let Some(ttl) = spec_i64(job, "ttlSecondsAfterFinished") else {
            return Ok(Requeue::No);
        };
        let done_at = job
            .pointer("/status/completionTime")
            .or_else(|| {
                meta::condition(job, finished(job).unwrap_or("Failed"))
                    .and_then(|c| c.get("lastTransitionTime"))
            })
            .and_then(Value::as_str)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc))
            .unwrap_or_else(chrono::Utc::now);
        let left = ttl - (chrono::Utc::now() - done_at).num_seconds();
        if left > 0 {
            return Ok(Requeue::After(Duration::from_secs(left as u64)));
        }
        let info = self.client.info(JOBS)?;
        crate::client::ignore_not_found(
            self.client
                .delete_in(
                    &info,
                    meta::namespace(job),
                    meta::name(job),
                    Some("Background"),
                    Some(meta::uid(job)),
                )
                .await,
        )?;
        Ok(Requeue::No)
    }
}

#[async_trait::async_trait]
impl Reconciler for JobController {
    fn name(&self) -> &'static str {
        "job"
    }

    async fn reconcile(&self, key: &str) -> Result<Requeue> {
        let Some(job) = self
            .written
            .current(key, &self.pods, &self.jobs)
            .await
            .filter(|job| !meta::is_deleting(job))
        else {
            return Ok(Requeue::No);
        };
        if finished(&job).is_some() {
            return self.finish_with_ttl(&job).await;
        }
        let uid = meta::uid(&job).to_owned();
        let ns = meta::namespace(&job).unwrap_or("default").to_owned();
        let pods: Vec<Arc<Value>> = self
            .pods
            .list_ns(&ns)
            .into_iter()
            .filter(|p| meta::controller_uid(p) == Some(uid.as_str()))
            .collect();
        let active: Vec<Arc<Value>> = pods
            .iter()
            .filter(|p| meta::pod_active(p))
            .cloned()
            .collect();
        let succeeded_pods: Vec<&Arc<Value>> = pods
            .iter()
            .filter(|p| meta::pod_phase(p) == "Succeeded")
            .collect();
        let failed_now = pods
            .iter()
            .filter(|p| meta::pod_phase(p) == "Failed")
            .count() as i64;
        let old_status = job.get("status").cloned().unwrap_or(json!({}));
        // Counts never go down: a finished pod removed later still counted.
        let failed = failed_now.max(
            old_status
                .get("failed")
                .and_then(Value::as_i64)
                .unwrap_or(0),
        );
        let indexed =
            job.pointer("/spec/completionMode").and_then(Value::as_str) == Some("Indexed");
        let completions = spec_i64(&job, "completions").unwrap_or(1);
        let parallelism = spec_i64(&job, "parallelism").unwrap_or(1).max(0);
        let backoff_limit = spec_i64(&job, "backoffLimit").unwrap_or(6);
        let suspended = job.pointer("/spec/suspend").and_then(Value::as_bool) == Some(true);
        let now = chrono::Utc::now();
        let now_s = meta::now_rfc3339();
        let start_time = old_status
            .get("startTime")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| now_s.clone());
        let done_indexes: BTreeSet<i64> =
            succeeded_pods.iter().filter_map(|p| pod_index(p)).collect();
        let succeeded = if indexed {
            done_indexes.len() as i64
        } else {
            (succeeded_pods.len() as i64).max(
                old_status
                    .get("succeeded")
                    .and_then(Value::as_i64)
                    .unwrap_or(0),
            )
        };

        // Terminal decisions.
        let mut outcome: Option<(&str, &str, String)> = None;
        if failed > backoff_limit {
            outcome = Some((
                "Failed",
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit".into(),
            ));
        } else if let Some(ads) = spec_i64(&job, "activeDeadlineSeconds")
            && chrono::DateTime::parse_from_rfc3339(&start_time)
                .is_ok_and(|t| (now - t.with_timezone(&chrono::Utc)).num_seconds() >= ads)
            && !suspended
        {
            outcome = Some((
                "Failed",
                "DeadlineExceeded",
                "Job was active longer than specified deadline".into(),
            ));
        } else if succeeded >= completions {
            outcome = Some(("Complete", "", String::new()));
        }

        let mut requeue = Requeue::No;
        if outcome.is_some() || suspended {
            self.delete_pods(key, &active).await?;
        } else {
            // Start pods up to parallelism for the work left.
            let mut to_create: Vec<Option<i64>> = Vec::new();
            if indexed {
                let running: BTreeSet<i64> = active.iter().filter_map(|p| pod_index(p)).collect();
                let room = (parallelism - active.len() as i64).max(0) as usize;
                to_create = (0..completions)
                    .filter(|i| !done_indexes.contains(i) && !running.contains(i))
                    .take(room)
                    .map(Some)
                    .collect();
            } else {
                let want = parallelism.min(completions - succeeded).max(0) as usize;
                if active.len() < want {
                    to_create = vec![None; want - active.len()];
                } else if active.len() > want {
                    self.delete_pods(key, &active[want..]).await?;
                }
            }
            // Failed pods are replaced after upstream's back-off: 10 s
            // doubling per failure since the last success, at most 6 min.
            let mut backoff_left = None;
            if !to_create.is_empty()
                && let Some(wait) = retry_backoff_left(&pods, now)
            {
                to_create.clear();
                backoff_left = Some(wait);
            }
            for idx in to_create {
                let out = self
                    .client
                    .create(PODS, Some(&ns), Self::pod_for(&job, idx))
                    .await?;
                self.written.note(key, meta::resource_version(&out));
                self.client.event(
                    COMPONENT,
                    "Job",
                    &job,
                    EventType::Normal,
                    "SuccessfulCreate",
                    format!("Created pod: {}", meta::name(&out)),
                );
            }
            if let Some(ads) = spec_i64(&job, "activeDeadlineSeconds") {
                requeue = Requeue::After(Duration::from_secs(ads.max(1) as u64));
            }
            if let Some(wait) = backoff_left {
                requeue = match requeue {
                    Requeue::After(d) if d < wait => Requeue::After(d),
                    _ => Requeue::After(wait),
                };
            }
        }

        let ready = active.iter().filter(|p| meta::pod_ready(p)).count();
        let mut status = old_status.clone();
        status["startTime"] = json!(start_time);
        status["active"] = json!(if outcome.is_some() || suspended {
            0
        } else {
            active.len()
        });
        status["ready"] = json!(ready);
        status["succeeded"] = json!(succeeded);
        status["failed"] = json!(failed);
        if indexed {
            status["completedIndexes"] = json!(format_indexes(&done_indexes));
        }
        if let Some((kind, reason, message)) = outcome {
            if finished(&job).is_none() {
                let (t, r, m) = if kind == "Complete" {
                    (EventType::Normal, "Completed", "Job completed".to_owned())
                } else {
                    (EventType::Warning, reason, message.clone())
                };
                self.client.event(COMPONENT, "Job", &job, t, r, m);
            }
            let mut conditions: Vec<Value> = Vec::new();
            if kind == "Complete" {
                conditions.push(json!({"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                    "message": "Reached expected number of succeeded pods", "lastProbeTime": now_s, "lastTransitionTime": now_s}));
                conditions.push(json!({"type": "Complete", "status": "True", "reason": "CompletionsReached",
                    "message": "Reached expected number of succeeded pods", "lastProbeTime": now_s, "lastTransitionTime": now_s}));
                status["completionTime"] = json!(now_s);
            } else {
                conditions.push(
                    json!({"type": "FailureTarget", "status": "True", "reason": reason,
                    "message": message, "lastProbeTime": now_s, "lastTransitionTime": now_s}),
                );
                conditions.push(json!({"type": "Failed", "status": "True", "reason": reason,
                    "message": message, "lastProbeTime": now_s, "lastTransitionTime": now_s}));
            }
            status["conditions"] = json!(conditions);
        } else if suspended {
            status["conditions"] = json!([{"type": "Suspended", "status": "True", "reason": "JobSuspended",
                "message": "Job suspended", "lastProbeTime": now_s, "lastTransitionTime": now_s}]);
        } else if let Some(m) = status.as_object_mut() {
            m.remove("conditions");
        }
        if status != old_status {
            crate::client::ignore_not_found(
                self.client
                    .patch(
                        JOBS,
                        Some(&ns),
                        meta::name(&job),
                        Some("status"),
                        json!({"status": status}),
                    )
                    .await,
            )?;
        }
        Ok(requeue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_pods_are_replaced_after_a_doubling_delay() {
        let now = chrono::Utc::now();
        let at = |secs_ago: i64, phase: &str| {
            Arc::new(
                json!({"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"},
                "status": {"phase": phase, "containerStatuses": [{"state": {"terminated": {
                    "finishedAt": (now - chrono::TimeDelta::seconds(secs_ago)).to_rfc3339()}}}]}}),
            )
        };
        // One failure 3 s ago: 7 s left of 10.
        let left = retry_backoff_left(&[at(3, "Failed")], now).unwrap();
        assert!(left > Duration::from_secs(6) && left <= Duration::from_secs(7));
        // Two failures, the last 15 s ago: 20 s delay, 5 s left.
        let left = retry_backoff_left(&[at(40, "Failed"), at(15, "Failed")], now).unwrap();
        assert!(left > Duration::from_secs(4) && left <= Duration::from_secs(5));
        // Waited long enough.
        assert!(retry_backoff_left(&[at(11, "Failed")], now).is_none());
        // A success after the failures resets the count.
        assert!(retry_backoff_left(&[at(5, "Failed"), at(2, "Succeeded")], now).is_none());
        assert!(retry_backoff_left(&[at(2, "Succeeded")], now).is_none());
    }

    #[test]
    fn indexes_compress_to_ranges() {
        let s: BTreeSet<i64> = [0, 1, 2, 4, 6, 7].into_iter().collect();
        assert_eq!(format_indexes(&s), "0-2,4,6-7");
        assert_eq!(format_indexes(&BTreeSet::new()), "");
    }
}
