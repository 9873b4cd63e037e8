//! `skep ctl status`: the cluster's health on one screen, from the API
//! alone: the control plane's readiness checks (store, DNS, …), who holds
//! the controller lease, every node with its conditions and its dataplane
//! (what the agent publishes in the `skep.io/dataplane` annotation), the
//! cluster DNS Service, the pods, and the mesh. Exits non-zero when
//! something is unhealthy, so scripts can wait on it.

use anyhow::{Result, bail};
use serde_json::Value;
use skep_client::Client;
use skep_dataplane::status::DataplaneStatus;

/// The Node annotation the agent writes (see skep_kubelet::dataplane_status).
const DATAPLANE_ANNOTATION: &str = skep_kubelet::dataplane_status::ANNOTATION;

fn items(v: &Value) -> Vec<Value> {
    v.get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn condition<'a>(obj: &'a Value, kind: &str) -> Option<&'a Value> {
    obj.pointer("/status/conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c["type"] == kind)
}

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or("")
}

/// One line for a node's dataplane, and whether it is healthy.
pub(crate) fn dataplane_line(node: &Value) -> (String, bool) {
    let Some(raw) = node
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(DATAPLANE_ANNOTATION))
        .and_then(Value::as_str)
    else {
        return (
            "not reported (no eBPF dataplane on this node, or the agent has not published yet)"
                .into(),
            true,
        );
    };
    let Ok(report) = serde_json::from_str::<Value>(raw) else {
        return (format!("unreadable report: {raw}"), false);
    };
    if report["ok"] != true {
        return (format!("BROKEN: {}", s(&report, "/error")), false);
    }
    let Ok(st) = serde_json::from_value::<DataplaneStatus>(report["status"].clone()) else {
        return ("unreadable status".into(), false);
    };
    let fullest = st.fullest().map_or(String::new(), |(m, f)| {
        format!(
            ", fullest map {} {:.0}% ({}/{})",
            m.name,
            f * 100.0,
            m.used.unwrap_or(0),
            m.max
        )
    });
    let line = format!(
        "{} programs, links tc {} xdp {} cgroup {}, {} maps, policy {}, flows {}{}{}",
        st.programs.len(),
        st.links.tc,
        st.links.xdp,
        st.links.cgroup,
        st.maps.len(),
        if st.policy { "on" } else { "off" },
        if st.flows { "on" } else { "off" },
        fullest,
        if st.ready {
            ""
        } else {
            ", NOT READY (passing everything)"
        },
    );
    let full = st.fullest().is_some_and(|(_, f)| f >= 0.9);
    (line, st.ready && !full)
}

pub(crate) async fn status(client: &Client) -> Result<()> {
    let mut problems: Vec<String> = Vec::new();
    let version = client.get("/version").await?;
    println!(
        "API server   {}  ({})",
        client.server(),
        s(&version, "/gitVersion")
    );

    // Control plane: the server's own readiness checks.
    let (code, body) = client.get_text_status("/readyz?verbose").await?;
    let checks: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("[+]") || l.starts_with("[-]"))
        .collect();
    println!(
        "control plane  {}",
        if code == 200 { "ready" } else { "NOT READY" }
    );
    for c in &checks {
        println!("  {c}");
        if let Some(failed) = c.strip_prefix("[-]") {
            problems.push(format!("control plane check {failed}"));
        }
    }
    if code != 200 && checks.is_empty() {
        problems.push(format!("/readyz answered {code}: {}", body.trim()));
    }
    match client
        .get("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/skep-controller-manager")
        .await
    {
        Ok(lease) => println!(
            "  controllers: active on {} (renewed {})",
            s(&lease, "/spec/holderIdentity"),
            s(&lease, "/spec/renewTime")
        ),
        Err(e) => {
            println!("  controllers: no leader lease ({e})");
            problems.push("no active controller set".into());
        }
    }

    // Nodes and their dataplanes.
    let nodes = items(&client.get("/api/v1/nodes").await?);
    let ready = nodes
        .iter()
        .filter(|n| condition(n, "Ready").is_some_and(|c| c["status"] == "True"))
        .count();
    println!("nodes  {ready}/{} ready", nodes.len());
    for n in &nodes {
        let name = s(n, "/metadata/name");
        let cond = condition(n, "Ready");
        let is_ready = cond.is_some_and(|c| c["status"] == "True");
        let why = cond
            .filter(|_| !is_ready)
            .map(|c| format!(" ({}: {})", s(c, "/reason"), s(c, "/message")))
            .unwrap_or_default();
        println!(
            "  {name:<24} {}{why}  {}",
            if is_ready { "Ready" } else { "NotReady" },
            s(n, "/status/nodeInfo/containerRuntimeVersion")
        );
        if !is_ready {
            problems.push(format!("node {name} not Ready"));
        }
        let (line, ok) = dataplane_line(n);
        println!("    dataplane: {line}");
        if !ok {
            problems.push(format!("node {name} dataplane: {line}"));
        }
    }

    // Cluster DNS: the Service and where it points (the check above says
    // whether the server answers).
    match client
        .get("/api/v1/namespaces/kube-system/services/kube-dns")
        .await
    {
        Ok(svc) => {
            let eps = client
                .get("/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Dkube-dns")
                .await
                .map(|l| {
                    items(&l)
                        .iter()
                        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
                        .filter(|e| e.pointer("/conditions/ready") != Some(&Value::Bool(false)))
                        .count()
                })
                .unwrap_or(0);
            println!(
                "DNS  kube-dns {} with {eps} ready endpoint(s)",
                s(&svc, "/spec/clusterIP")
            );
            if eps == 0 {
                problems.push("kube-dns has no ready endpoint".into());
            }
        }
        // A control plane without nodes (`--no-agent`) serves no DNS; when
        // a server does, its `dns` readiness check above covers it.
        Err(_) => println!("DNS  not served (no kube-dns Service)"),
    }

    let pods = items(&client.get("/api/v1/pods").await?);
    let running = pods
        .iter()
        .filter(|p| s(p, "/status/phase") == "Running")
        .count();
    let failing = pods
        .iter()
        .filter(|p| {
            p.pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        s(c, "/state/waiting/reason") == "CrashLoopBackOff"
                            || s(c, "/state/waiting/reason").ends_with("Error")
                    })
                })
        })
        .count();
    println!(
        "pods  {running}/{} running{}",
        pods.len(),
        if failing > 0 {
            format!(", {failing} crash-looping or failing to start")
        } else {
            String::new()
        }
    );

    // The mesh: meshed namespaces (its CA's health is a readiness check
    // above when the server runs it).
    let meshed = items(&client.get("/api/v1/namespaces").await?)
        .iter()
        .filter(|n| s(n, "/metadata/labels/skep.io~1mesh") == "enabled")
        .count();
    println!(
        "mesh  {}",
        if meshed == 0 {
            "no meshed namespace".to_string()
        } else {
            format!("{meshed} meshed namespace(s)")
        }
    );

    if problems.is_empty() {
        println!("\nhealthy");
        Ok(())
    } else {
        bail!("unhealthy:\n  {}", problems.join("\n  "))
    }
}
