//! `skep ctl connectivity-test`: checks a live cluster the way a user's
//! workloads use it. In a temporary namespace it runs an echo server on
//! every node (up to three), a Service in front of them, and one short-lived
//! probe pod per check (`skep tools probe`, pinned to a node): pod to pod on
//! the same node and across nodes, pod to Service by ClusterIP and by DNS
//! name (TCP and UDP), and a NetworkPolicy that admits one client and
//! denies another. A check passes when its pod succeeds; the summary shows
//! each probe's own output. The namespace is deleted afterwards.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use skep_client::Client;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct ConnectivityArgs {
    /// Give up on pods that are not done after this long (e.g. 90s, 3m).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    timeout: Duration,
    /// Keep the test namespace for inspection.
    #[arg(long)]
    keep: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s or 3m"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: use s or m")),
    }
}

const HTTP_PORT: u16 = 8080;
const UDP_PORT: u16 = 8081;

/// One probe pod.
struct Check {
    pod: String,
    what: String,
    node: String,
}

fn server_pod(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "echo"}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "echo", "image": "host",
                "command": ["skep", "tools", "serve", "--http", HTTP_PORT.to_string(),
                            "--udp", UDP_PORT.to_string()],
                "ports": [{"name": "http", "containerPort": HTTP_PORT},
                          {"name": "udp", "containerPort": UDP_PORT, "protocol": "UDP"}],
                "readinessProbe": {"tcpSocket": {"port": HTTP_PORT}, "periodSeconds": 1}
            }]
        }
    })
}

fn probe_pod(name: &str, node: &str, role: Option<&str>, args: &[String]) -> Value {
    let mut command = vec!["skep".to_owned(), "tools".to_owned(), "probe".to_owned()];
    command.extend(args.iter().cloned());
    let labels = match role {
        Some(r) => json!({"app": "probe", "role": r}),
        None => json!({"app": "probe"}),
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "probe", "image": "host", "command": command}]
        }
    })
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

async fn ready_nodes(client: &Client) -> Result<Vec<String>> {
    let nodes = client.get("/api/v1/nodes").await?;
    let mut names: Vec<String> = nodes["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| {
            n.pointer("/spec/unschedulable").and_then(Value::as_bool) != Some(true)
                && n["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .map(|n| str_at(n, "/metadata/name").to_owned())
        .collect();
    names.sort();
    names.truncate(3);
    if names.is_empty() {
        bail!("no Ready, schedulable node: nothing can run the test pods");
    }
    Ok(names)
}

/// Waits until every named pod satisfies `done`; returns the pods.
async fn wait_pods(
    client: &Client,
    ns: &str,
    names: &[String],
    deadline: Instant,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Result<Vec<Value>> {
    loop {
        let list = client.get(&format!("/api/v1/namespaces/{ns}/pods")).await?;
        let pods: Vec<Value> = names
            .iter()
            .filter_map(|n| {
                list["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| str_at(p, "/metadata/name") == n)
                    .cloned()
            })
            .collect();
        if pods.len() == names.len() && pods.iter().all(&done) {
            return Ok(pods);
        }
        if Instant::now() > deadline {
            let pending: Vec<String> = names
                .iter()
                .filter(|n| {
                    !pods
                        .iter()
                        .any(|p| str_at(p, "/metadata/name") == n.as_str() && done(p))
                })
                .map(|n| {
                    let phase = pods
                        .iter()
                        .find(|p| str_at(p, "/metadata/name") == n.as_str())
                        .map(|p| str_at(p, "/status/phase").to_owned())
                        .unwrap_or_else(|| "missing".into());
                    format!("{n} ({phase})")
                })
                .collect();
            bail!("timed out waiting for {what}: {}", pending.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn is_ready(p: &Value) -> bool {
    p["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn is_finished(p: &Value) -> bool {
    matches!(str_at(p, "/status/phase"), "Succeeded" | "Failed")
}

pub async fn run(client: &Client, args: ConnectivityArgs) -> Result<()> {
    let started = Instant::now();
    let deadline = started + args.timeout;
    let nodes = ready_nodes(client).await?;
    let ns_obj = client
        .create(
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"generateName": "skep-connectivity-",
                                 "labels": {"skep.io/connectivity-test": "true"}}}),
        )
        .await
        .context("creating the test namespace")?;
    let ns = str_at(&ns_obj, "/metadata/name").to_owned();
    println!(
        "connectivity test in namespace {ns} on {} node(s): {}",
        nodes.len(),
        nodes.join(", ")
    );
    let result = checks(client, &ns, &nodes, deadline).await;
    if args.keep {
        println!("namespace {ns} kept (--keep)");
    } else if let Err(e) = client.delete(&format!("/api/v1/namespaces/{ns}")).await {
        eprintln!("warning: deleting namespace {ns}: {e}");
    }
    let (passed, failed) = result?;
    println!(
        "\n{passed} passed, {failed} failed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} connectivity check(s) failed");
    }
    Ok(())
}

async fn checks(
    client: &Client,
    ns: &str,
    nodes: &[String],
    deadline: Instant,
) -> Result<(usize, usize)> {
    let pods = format!("/api/v1/namespaces/{ns}/pods");
    let mut servers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let name = format!("echo-{i}");
        client.create(&pods, &server_pod(&name, node)).await?;
        servers.push(name);
    }
    client
        .create(
            &format!("/api/v1/namespaces/{ns}/services"),
            &json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "echo"},
                    "spec": {"selector": {"app": "echo"}, "ports": [
                        {"name": "http", "port": 80, "targetPort": HTTP_PORT},
                        {"name": "udp", "port": 81, "targetPort": UDP_PORT, "protocol": "UDP"}]}}),
        )
        .await?;
    let ready = wait_pods(
        client,
        ns,
        &servers,
        deadline,
        "echo servers Ready",
        is_ready,
    )
    .await?;
    let server_ips: Vec<(String, String)> = ready
        .iter()
        .map(|p| {
            (
                str_at(p, "/spec/nodeName").to_owned(),
                str_at(p, "/status/podIP").to_owned(),
            )
        })
        .collect();
    let svc = client
        .get(&format!("/api/v1/namespaces/{ns}/services/echo"))
        .await?;
    let cluster_ip = str_at(&svc, "/spec/clusterIP").to_owned();
    let dns = format!("echo.{ns}.svc.cluster.local");

    let mut checks: Vec<Check> = Vec::new();
    let add = |checks: &mut Vec<Check>,
               what: String,
               node: &str,
               role: Option<&str>,
               probe: Vec<String>|
     -> Value {
        let pod = format!(
            "{}-{}",
            if role.is_some() || what.starts_with("policy") {
                "policy"
            } else {
                "check"
            },
            checks.len()
        );
        let manifest = probe_pod(&pod, node, role, &probe);
        checks.push(Check {
            pod,
            what,
            node: node.to_owned(),
        });
        manifest
    };
    let http = |target: String| vec!["http".to_owned(), target, "--tries".into(), "5".into()];
    let mut manifests = Vec::new();
    for node in nodes {
        for (server_node, ip) in &server_ips {
            let kind = if server_node == node {
                "same node"
            } else {
                "across nodes"
            };
            manifests.push(add(
                &mut checks,
                format!("pod → pod ({kind}, to {server_node})"),
                node,
                None,
                http(format!("{ip}:{HTTP_PORT}")),
            ));
        }
        manifests.push(add(
            &mut checks,
            "pod → Service ClusterIP (TCP)".into(),
            node,
            None,
            http(format!("{cluster_ip}:80")),
        ));
        manifests.push(add(
            &mut checks,
            "pod → Service by DNS name (TCP)".into(),
            node,
            None,
            http(format!("{dns}:80")),
        ));
        manifests.push(add(
            &mut checks,
            "pod → Service by DNS name (UDP)".into(),
            node,
            None,
            vec![
                "udp".into(),
                format!("{dns}:81"),
                "--tries".into(),
                "5".into(),
            ],
        ));
    }
    for m in &manifests {
        client.create(&pods, m).await?;
    }
    let mut passed = 0;
    let mut failed = 0;
    let names: Vec<String> = checks.iter().map(|c| c.pod.clone()).collect();
    let done = wait_pods(client, ns, &names, deadline, "probe pods", is_finished).await?;
    report(client, ns, &checks, &done, &mut passed, &mut failed).await;

    // NetworkPolicy: the servers admit only pods labelled role=allowed.
    client
        .create(
            &format!("/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies"),
            &json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "echo-allow-role-allowed"},
                    "spec": {"podSelector": {"matchLabels": {"app": "echo"}},
                             "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "allowed"}}}]}]}}),
        )
        .await?;
    // Policy changes reach the kernel within a second; probe pods start
    // later than that, but give it the margin anyway.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut policy_checks = Vec::new();
    let mut manifests = Vec::new();
    let node = &nodes[nodes.len() - 1];
    manifests.push(add(
        &mut policy_checks,
        "policy admits a pod labelled role=allowed".into(),
        node,
        Some("allowed"),
        http(format!("{cluster_ip}:80")),
    ));
    manifests.push(add(
        &mut policy_checks,
        "policy denies an unlabelled pod".into(),
        node,
        None,
        vec![
            "http".into(),
            format!("{cluster_ip}:80"),
            "--expect-fail".into(),
            "--timeout".into(),
            "2s".into(),
        ],
    ));
    for m in &manifests {
        client.create(&pods, m).await?;
    }
    let names: Vec<String> = policy_checks.iter().map(|c| c.pod.clone()).collect();
    let done = wait_pods(
        client,
        ns,
        &names,
        deadline,
        "policy probe pods",
        is_finished,
    )
    .await?;
    report(client, ns, &policy_checks, &done, &mut passed, &mut failed).await;
    Ok((passed, failed))
}

async fn report(
    client: &Client,
    ns: &str,
    checks: &[Check],
    pods: &[Value],
    passed: &mut usize,
    failed: &mut usize,
) {
    for c in checks {
        let phase = pods
            .iter()
            .find(|p| str_at(p, "/metadata/name") == c.pod)
            .map(|p| str_at(p, "/status/phase"))
            .unwrap_or("");
        let log = client
            .get_text(&format!("/api/v1/namespaces/{ns}/pods/{}/log", c.pod))
            .await
            .unwrap_or_else(|e| format!("(no log: {e})"));
        let detail = log.lines().last().unwrap_or("").trim().to_owned();
        let ok = phase == "Succeeded";
        if ok {
            *passed += 1;
        } else {
            *failed += 1;
        }
        println!(
            "{} {:<48} from {:<20} {}",
            if ok { "PASS" } else { "FAIL" },
            c.what,
            c.node,
            detail
        );
    }
}
