//! /healthz, /livez and /readyz with named checks, as Kubernetes serves
//! them: `?verbose` lists each check (`[+]name ok` / `[-]name failed:
//! reason`), `/readyz/<check>` runs one, `?exclude=<check>` skips one. The
//! store is always checked; the binary registers more (cluster DNS, …) on
//! the running server, so `skep ctl status` and load balancers in front
//! of several servers see a server whose add-ons are broken as not ready.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, RwLock},
    time::Duration,
};

use crate::api::Api;

/// A check: Ok, or what is wrong.
pub type CheckFn =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// How long one check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The checks registered on a server (besides `ping` and `store`).
#[derive(Default, Clone)]
pub struct HealthChecks {
    checks: Arc<RwLock<Vec<(String, CheckFn)>>>,
}

impl std::fmt::Debug for HealthChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .checks
            .read()
            .map(|c| c.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default();
        f.debug_struct("HealthChecks")
            .field("checks", &names)
            .finish()
    }
}

impl HealthChecks {
    /// Adds (or replaces) a readiness check named `name`.
    pub fn register(&self, name: &str, check: CheckFn) {
        if let Ok(mut checks) = self.checks.write() {
            checks.retain(|(n, _)| n != name);
            checks.push((name.to_owned(), check));
        }
    }

    fn registered(&self) -> Vec<(String, CheckFn)> {
        self.checks.read().map(|c| c.clone()).unwrap_or_default()
    }
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub name: String,
    pub result: Result<(), String>,
}

/// A read of one key: the store answers (etcd: has a leader and quorum).
async fn store_check(api: &Api) -> Result<(), String> {
    api.store
        .get("/registry/namespaces/default")
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Runs the checks an endpoint asks for. `endpoint` is healthz, livez or
/// readyz; liveness does not depend on add-ons (a dead DNS server is no
/// reason to restart the control plane), readiness does.
pub async fn run(
    api: &Api,
    checks: &HealthChecks,
    endpoint: &str,
    only: Option<&str>,
    exclude: &[String],
) -> Vec<Outcome> {
    let mut all: Vec<(String, Option<CheckFn>)> =
        vec![("ping".into(), None), ("store".into(), None)];
    if endpoint == "readyz" || endpoint == "healthz" {
        all.extend(checks.registered().into_iter().map(|(n, c)| (n, Some(c))));
    }
    let mut out = Vec::new();
    for (name, check) in all {
        if only.is_some_and(|o| o != name) || exclude.contains(&name) {
            continue;
        }
        let result = match (name.as_str(), check) {
            ("ping", _) => Ok(()),
            ("store", _) => timeout(store_check(api)).await,
            (_, Some(c)) => timeout(c()).await,
            (_, None) => Ok(()),
        };
        out.push(Outcome { name, result });
    }
    out
}

async fn timeout(f: impl Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::time::timeout(CHECK_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {CHECK_TIMEOUT:?}")))
}

/// The response body and status for `outcomes`, in Kubernetes' format.
/// Without `verbose`, a healthy server answers just `ok`; reasons are
/// only shown verbosely (they may name internal addresses).
pub fn render(endpoint: &str, outcomes: &[Outcome], verbose: bool) -> (u16, String) {
    let healthy = outcomes.iter().all(|o| o.result.is_ok());
    if healthy && !verbose {
        return (200, "ok".into());
    }
    let mut body = String::new();
    for o in outcomes {
        match &o.result {
            Ok(()) => body.push_str(&format!("[+]{} ok\n", o.name)),
            Err(e) if verbose => body.push_str(&format!("[-]{} failed: {e}\n", o.name)),
            Err(_) => body.push_str(&format!("[-]{} failed: reason withheld\n", o.name)),
        }
    }
    if healthy {
        body.push_str(&format!("{endpoint} check passed\n"));
        (200, body)
    } else {
        body.push_str(&format!("{endpoint} check failed\n"));
        (500, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(name: &str, r: Result<(), &str>) -> Outcome {
        Outcome {
            name: name.into(),
            result: r.map_err(str::to_owned),
        }
    }

    #[test]
    fn healthy_is_plain_ok_unless_verbose() {
        let all = [o("ping", Ok(())), o("dns", Ok(()))];
        assert_eq!(render("readyz", &all, false), (200, "ok".into()));
        let (code, body) = render("readyz", &all, true);
        assert_eq!(code, 200);
        assert_eq!(body, "[+]ping ok\n[+]dns ok\nreadyz check passed\n");
    }

    #[test]
    fn a_failed_check_is_500_and_named() {
        let all = [o("ping", Ok(())), o("dns", Err("no answer"))];
        let (code, body) = render("readyz", &all, false);
        assert_eq!(code, 500);
        assert!(body.contains("[-]dns failed: reason withheld"), "{body}");
        let (_, body) = render("readyz", &all, true);
        assert!(body.contains("[-]dns failed: no answer"), "{body}");
        assert!(body.ends_with("readyz check failed\n"), "{body}");
    }
}
