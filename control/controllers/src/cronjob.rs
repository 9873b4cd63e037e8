//! CronJob controller: at each scheduled time (in `spec.timeZone`, UTC by
//! default) creates a Job `<cronjob>-<minutes since the epoch>` from the
//! jobTemplate, owned by the CronJob. `concurrencyPolicy`: Allow, Forbid
//! (skip while a Job is active) or Replace (delete the active ones);
//! `startingDeadlineSeconds` skips a start that is too late; `suspend`
//! stops new Jobs; finished Jobs beyond the history limits are deleted.
//! Status: active Jobs, lastScheduleTime, lastSuccessfulTime.

use crate::{
    client::Client,
    cron::Schedule,
    error::Result,
    events::EventType,
    informer::{Change, Informer, Informers},
    job::JOBS,
    meta,
    queue::Queue,
    runner::{Reconciler, Requeue},
};
use jiff::tz::TimeZone;
use serde_json::{Value, json};
use std::{sync::Arc, time::Duration};

pub const CRON_JOBS: crate::client::Gvr = ("batch", "v1", "cronjobs");
pub const SCHEDULED_AT: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";

#[derive(Debug)]
pub struct CronJobController {
    client: Client,
    cronjobs: Arc<Informer>,
    jobs: Arc<Informer>,
}

fn parse_time(v: Option<&Value>) -> Option<i64> {
    v.and_then(Value::as_str)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp())
}

fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn job_finished(j: &Value) -> Option<&'static str> {
    ["Complete", "Failed"]
        .into_iter()
        .find(|c| meta::condition_true(j, c))
}

impl CronJobController {
    pub fn start(
        client: &Client,
        informers: &Informers,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let queue = Queue::new();
        let c = Arc::new(Self {
            client: client.clone(),
            cronjobs: informers.get_or_create(client.info(CRON_JOBS)?),
            jobs: informers.get_or_create(client.info(JOBS)?),
        });
        c.cronjobs.on_change(crate::enqueue::own_key(&queue));
        let q = queue.clone();
        c.jobs.on_change(Arc::new(move |ch: &Change| {
            for j in [&ch.old, &ch.new].into_iter().flatten() {
                let Some(ns) = meta::namespace(j) else {
                    continue;
                };
                for r in meta::owner_refs(j) {
                    if r.get("kind").and_then(Value::as_str) == Some("CronJob")
                        && let Some(n) = r.get("name").and_then(Value::as_str)
                    {
                        q.add(format!("{ns}/{n}"));
                    }
                }
            }
        }));
        Ok(crate::runner::spawn(c, queue, 1))
    }

    async fn delete_job(&self, j: &Value) -> Result<()> {
        let info = self.client.info(JOBS)?;
        crate::client::ignore_not_found(
            self.client
                .delete_in(
                    &info,
                    meta::namespace(j),
                    meta::name(j),
                    Some("Background"),
                    Some(meta::uid(j)),
                )
                .await,
        )?;
        Ok(())
    }

    fn job_from(cj: &Value, at: i64) -> Value {
        let tmpl = cj
            .pointer("/spec/jobTemplate")
            .cloned()
            .unwrap_or(json!({}));
        let mut metadata = json!({
            "name": format!("{}-{}", meta::name(cj), at / 60),
            "namespace": meta::namespace(cj),
            "labels": tmpl.pointer("/metadata/labels").cloned().unwrap_or(json!({})),
            "annotations": tmpl.pointer("/metadata/annotations").cloned().unwrap_or(json!({})),
            "ownerReferences": [meta::controller_ref(cj, "batch/v1", "CronJob")],
        });
        metadata["annotations"][SCHEDULED_AT] = json!(rfc3339(at));
        json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
               "spec": tmpl.get("spec").cloned().unwrap_or(json!({}))})
    }
}

#[async_trait::async_trait]
impl Reconciler for CronJobController {
    fn name(&self) -> &'static str {
        "cronjob"
    }

    async fn reconcile(&self, key: &str) -> Result<Requeue> {
        let Some(cj) = self.cronjobs.get(key) else {
            return Ok(Requeue::No);
        };
        if meta::is_deleting(&cj) {
            return Ok(Requeue::No);
        }
        let ns = meta::namespace(&cj).unwrap_or("default").to_owned();
        let uid = meta::uid(&cj).to_owned();
        let mut jobs: Vec<Arc<Value>> = self
            .jobs
            .list_ns(&ns)
            .into_iter()
            .filter(|j| meta::controller_uid(j) == Some(uid.as_str()) && !meta::is_deleting(j))
            .collect();
        jobs.sort_by_key(|j| meta::name(j).to_owned());
        let started = |j: &Value| {
            parse_time(j.pointer(&format!(
                "/metadata/annotations/{}",
                SCHEDULED_AT.replace('/', "~1")
            )))
            .unwrap_or(0)
        };
        jobs.sort_by_key(|j| started(j));

        // History limits.
        for (kind, field, default) in [
            ("Complete", "successfulJobsHistoryLimit", 3),
            ("Failed", "failedJobsHistoryLimit", 1),
        ] {
            let limit = cj
                .pointer(&format!("/spec/{field}"))
                .and_then(Value::as_i64)
                .unwrap_or(default)
                .max(0) as usize;
            let done: Vec<&Arc<Value>> = jobs
                .iter()
                .filter(|j| job_finished(j) == Some(kind))
                .collect();
            if done.len() > limit {
                for j in &done[..done.len() - limit] {
                    self.delete_job(j).await?;
                }
            }
        }
        let active: Vec<&Arc<Value>> = jobs.iter().filter(|j| job_finished(j).is_none()).collect();
        let last_success = jobs
            .iter()
            .filter(|j| job_finished(j) == Some("Complete"))
            .filter_map(|j| parse_time(j.pointer("/status/completionTime")))
            .max();

        let schedule = match Schedule::parse(
            cj.pointer("/spec/schedule")
                .and_then(Value::as_str)
                .unwrap_or(""),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(cronjob = %key, error = %e, "cannot schedule");
                return Ok(Requeue::No);
            }
        };
        let tz = match cj.pointer("/spec/timeZone").and_then(Value::as_str) {
            None | Some("") => TimeZone::UTC,
            Some(name) => match TimeZone::get(name) {
                Ok(tz) => tz,
                Err(e) => {
                    tracing::warn!(cronjob = %key, zone = %name, error = %e, "unknown time zone");
                    return Ok(Requeue::No);
                }
            },
        };
        let now = chrono::Utc::now().timestamp();
        let old_status = cj.get("status").cloned().unwrap_or(json!({}));
        let last = parse_time(old_status.get("lastScheduleTime"))
            .or_else(|| parse_time(cj.pointer("/metadata/creationTimestamp")))
            .unwrap_or(now);
        let suspended = cj.pointer("/spec/suspend").and_then(Value::as_bool) == Some(true);
        let mut scheduled_at = None;
        let mut active_refs: Vec<Value> = active
            .iter()
            .map(|j| {
                json!({"apiVersion": "batch/v1", "kind": "Job", "name": meta::name(j),
                            "namespace": ns, "uid": meta::uid(j)})
            })
            .collect();
        if !suspended && let Some(at) = schedule.latest(last, now, &tz) {
            let deadline = cj
                .pointer("/spec/startingDeadlineSeconds")
                .and_then(Value::as_i64);
            let too_late = deadline.is_some_and(|d| now - at > d);
            let policy = cj
                .pointer("/spec/concurrencyPolicy")
                .and_then(Value::as_str)
                .unwrap_or("Allow");
            if too_late {
                tracing::info!(cronjob = %key, "missed a start beyond startingDeadlineSeconds");
                scheduled_at = Some(at);
            } else if policy == "Forbid" && !active.is_empty() {
                // Not recorded as scheduled: it starts once the active
                // Job is done, if still within the deadline.
            } else {
                if policy == "Replace" {
                    for j in &active {
                        self.delete_job(j).await?;
                    }
                    active_refs.clear();
                }
                match self
                    .client
                    .create(JOBS, Some(&ns), Self::job_from(&cj, at))
                    .await
                {
                    Ok(j) => {
                        tracing::info!(cronjob = %key, job = %meta::name(&j), "created a Job");
                        self.client.event(
                            "cronjob-controller",
                            "CronJob",
                            &cj,
                            EventType::Normal,
                            "SuccessfulCreate",
                            format!("Created job {}", meta::name(&j)),
                        );
                        active_refs.push(json!({"apiVersion": "batch/v1", "kind": "Job",
                            "name": meta::name(&j), "namespace": ns, "uid": meta::uid(&j)}));
                    }
                    Err(e) if e.is_already_exists() => {}
                    Err(e) => return Err(e),
                }
                scheduled_at = Some(at);
            }
        }
        let mut status = old_status.clone();
        status["active"] = if active_refs.is_empty() {
            Value::Null
        } else {
            json!(active_refs)
        };
        if let Some(at) = scheduled_at {
            status["lastScheduleTime"] = json!(rfc3339(at));
        }
        if let Some(t) = last_success {
            status["lastSuccessfulTime"] = json!(rfc3339(t));
        }
        if let Some(m) = status.as_object_mut() {
            m.retain(|_, v| !v.is_null());
        }
        if status != old_status {
            crate::client::ignore_not_found(
                self.client
                    .patch(
                        CRON_JOBS,
                        Some(&ns),
                        meta::name(&cj),
                        Some("status"),
                        json!({"status": status}),
                    )
                    .await,
            )?;
        }
        // Wake for the next scheduled time (or sooner for Forbid retries).
        let next = schedule.next(now, &tz).map_or(3600, |t| (t - now).max(1));
        Ok(Requeue::After(Duration::from_secs(next as u64)))
    }
}
