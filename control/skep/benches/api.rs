//! `cargo xtask bench api`: a real `skep server --no-agent` (release build,
//! embedded SQLite) driven over HTTPS on loopback:
//! * create / get / update latency with 1, 16 and 64 concurrent clients;
//! * LIST of 10,000 pods, as JSON and as the Table kubectl asks for;
//! * 100 watchers receiving 1,000 updates (delivery latency);
//! * the server's RSS with 10,000 pods stored.
//!
//! Writes target/bench/api.json. Every loop is bounded in count; all
//! traffic stays on 127.0.0.1.

// Benchmark harness: a failed expect aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod apiclient;

use apiclient::{Conn, Server, connect, rss_mb, rss_parts_mb, start_server};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

const LEVELS: [usize; 3] = [1, 16, 64];
/// Requests per level and operation.
const REQUESTS: usize = 3_200;
const PODS: usize = 10_000;
const WATCHERS: usize = 100;
const UPDATES: usize = 1_000;

fn pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "bench", "tier": "web"}},
           "spec": {"containers": [{"name": "app", "image": "host", "command": ["skep", "tools", "serve", "--http", "8080"],
                                    "ports": [{"containerPort": 8080, "name": "http"}],
                                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}})
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[(((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize).min(v.len() - 1)]
}

/// Runs `op` REQUESTS times spread over `clients` connections; returns
/// (p50, p99) latency in ms.
async fn latency<F, Fut>(s: &Server, clients: usize, op: F) -> (f64, f64)
where
    F: Fn(Conn, usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Vec<f64>> + Send,
{
    let per = REQUESTS / clients;
    let mut handles = Vec::new();
    for c in 0..clients {
        let conn = connect(s).await;
        let op = op.clone();
        handles.push(tokio::spawn(async move { op(conn, c, per).await }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    (pct(&mut all, 50.0), pct(&mut all, 99.0))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let s = start_server();
    let pid = s.child.id();
    let mut c = connect(&s).await;
    let (code, _) = c
        .call(
            "POST",
            "/api/v1/namespaces",
            Some(&json!({"metadata": {"name": "bench"}})),
            "application/json",
        )
        .await;
    assert_eq!(code, 201);
    let rss_idle = rss_mb(pid);
    let mut report = serde_json::Map::new();
    report.insert("rss_mb_idle".into(), json!(rss_idle));
    println!(
        "{:<34} {:>10} {:>10}",
        "api benchmark (skep server)", "p50 ms", "p99 ms"
    );
    println!("{}", "-".repeat(56));

    let mut created = 0usize;
    for clients in LEVELS {
        let tag = format!("c{clients}");
        let (p50, p99) = latency(&s, clients, move |mut conn, c, n| {
            let tag = tag.clone();
            async move {
                let mut out = Vec::with_capacity(n);
                for i in 0..n {
                    let t = Instant::now();
                    let (code, _) = conn
                        .call(
                            "POST",
                            "/api/v1/namespaces/bench/pods",
                            Some(&pod(&format!("{tag}-{c}-{i}"))),
                            "application/json",
                        )
                        .await;
                    out.push(t.elapsed().as_secs_f64() * 1e3);
                    assert_eq!(code, 201);
                }
                out
            }
        })
        .await;
        created += REQUESTS / clients * clients;
        println!(
            "{:<34} {p50:>10.2} {p99:>10.2}",
            format!("create, {clients} clients")
        );
        report.insert(format!("create_p50_ms_{clients}"), json!(p50));
        report.insert(format!("create_p99_ms_{clients}"), json!(p99));

        let (p50, p99) = latency(&s, clients, move |mut conn, c, n| async move {
            let mut out = Vec::with_capacity(n);
            let path = format!("/api/v1/namespaces/bench/pods/c{clients}-{c}-0");
            for _ in 0..n {
                let t = Instant::now();
                let (code, _) = conn.call("GET", &path, None, "application/json").await;
                out.push(t.elapsed().as_secs_f64() * 1e3);
                assert_eq!(code, 200);
            }
            out
        })
        .await;
        println!(
            "{:<34} {p50:>10.2} {p99:>10.2}",
            format!("get, {clients} clients")
        );
        report.insert(format!("get_p50_ms_{clients}"), json!(p50));
        report.insert(format!("get_p99_ms_{clients}"), json!(p99));

        let (p50, p99) = latency(&s, clients, move |mut conn, c, n| async move {
            let mut out = Vec::with_capacity(n);
            let path = format!("/api/v1/namespaces/bench/pods/c{clients}-{c}-1");
            for i in 0..n {
                let mut body = pod(&format!("c{clients}-{c}-1"));
                body["metadata"]["labels"]["round"] = json!(i.to_string());
                let t = Instant::now();
                let (code, _) = conn
                    .call("PUT", &path, Some(&body), "application/json")
                    .await;
                out.push(t.elapsed().as_secs_f64() * 1e3);
                assert_eq!(code, 200);
            }
            out
        })
        .await;
        println!(
            "{:<34} {p50:>10.2} {p99:>10.2}",
            format!("update, {clients} clients")
        );
        report.insert(format!("update_p50_ms_{clients}"), json!(p50));
        report.insert(format!("update_p99_ms_{clients}"), json!(p99));
    }

    // Top up to 10,000 pods with 32 clients.
    let missing = PODS - created;
    let mut fill = Vec::new();
    for c in 0..32 {
        let mut conn = connect(&s).await;
        fill.push(tokio::spawn(async move {
            for i in (c..missing).step_by(32) {
                let (code, _) = conn
                    .call(
                        "POST",
                        "/api/v1/namespaces/bench/pods",
                        Some(&pod(&format!("fill-{i}"))),
                        "application/json",
                    )
                    .await;
                assert_eq!(code, 201);
            }
        }));
    }
    for f in fill {
        f.await.unwrap();
    }
    // The first connection sat idle through the latency runs; the server
    // may have closed it.
    let mut c = connect(&s).await;
    let mut list_ms = Vec::new();
    let mut table_ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (code, body) = c
            .call(
                "GET",
                "/api/v1/namespaces/bench/pods",
                None,
                "application/json",
            )
            .await;
        list_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(code, 200);
        let n = serde_json::from_slice::<Value>(&body).unwrap()["items"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(n, PODS);
        let t = Instant::now();
        let (code, body) = c
            .call(
                "GET",
                "/api/v1/namespaces/bench/pods",
                None,
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
            )
            .await;
        table_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(code, 200);
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap()["rows"]
                .as_array()
                .unwrap()
                .len(),
            PODS
        );
    }
    let list = pct(&mut list_ms, 50.0);
    let table = pct(&mut table_ms, 50.0);
    // Right after the lists, the heap still holds their freed buffers; the
    // server hands free heap back 1.5 s after a large list
    // (apiserver heap.rs). Both are reported; the settled figure is what
    // storing the pods costs.
    let rss_after_lists = rss_mb(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = rss_mb(pid);
    let (rss_anon, rss_file) = rss_parts_mb(pid);
    println!(
        "{:<34} {list:>10.1} ms (median of 5)",
        "LIST 10,000 pods, JSON"
    );
    println!(
        "{:<34} {table:>10.1} ms (median of 5)",
        "LIST 10,000 pods, Table"
    );
    println!(
        "{:<34} {rss:>10.1} MB (heap {rss_anon:.1} MB, mapped files {rss_file:.1} MB; idle: {rss_idle:.1} MB; right after the lists: {rss_after_lists:.1} MB)",
        "server RSS with 10,000 pods"
    );
    report.insert("rss_mb_10k_pods_anon".into(), json!(rss_anon));
    report.insert("rss_mb_10k_pods_file".into(), json!(rss_file));
    report.insert("list_10k_pods_ms".into(), json!(list));
    report.insert("list_10k_pods_table_ms".into(), json!(table));
    report.insert("rss_mb_10k_pods".into(), json!(rss));
    report.insert(
        "rss_mb_10k_pods_right_after_lists".into(),
        json!(rss_after_lists),
    );

    let mut c = connect(&s).await;
    // Watch fan-out: 100 watchers, 1,000 updates of one ConfigMap paced at
    // about 500/s; each update carries its send time.
    let (code, _) = c
        .call(
            "POST",
            "/api/v1/namespaces/bench/configmaps",
            Some(&json!({"metadata": {"name": "tick"}, "data": {"t": "0"}})),
            "application/json",
        )
        .await;
    assert_eq!(code, 201);
    let (_, body) = c
        .call(
            "GET",
            "/api/v1/namespaces/bench/configmaps",
            None,
            "application/json",
        )
        .await;
    let rv = serde_json::from_slice::<Value>(&body).unwrap()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let origin = Instant::now();
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let mut conn = connect(&s).await;
        let path = format!(
            "/api/v1/namespaces/bench/configmaps?watch=1&resourceVersion={rv}&timeoutSeconds=60"
        );
        watchers.push(tokio::spawn(async move {
            let mut body = conn.stream(&path).await;
            let mut buf = Vec::new();
            let mut lat = Vec::with_capacity(UPDATES);
            while lat.len() < UPDATES {
                let Some(frame) = body.frame().await else {
                    break;
                };
                let frame = frame.unwrap();
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                buf.extend_from_slice(data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let now = origin.elapsed().as_secs_f64() * 1e3;
                    let ev: Value = serde_json::from_slice(&line).unwrap();
                    if let Some(sent) = ev["object"]["data"]["sent"]
                        .as_str()
                        .and_then(|s| s.parse::<f64>().ok())
                    {
                        lat.push(now - sent);
                    }
                }
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ticker = tokio::time::interval(Duration::from_millis(2));
    for i in 0..UPDATES {
        ticker.tick().await;
        let sent = origin.elapsed().as_secs_f64() * 1e3;
        let body = json!({"metadata": {"name": "tick"}, "data": {"t": i.to_string(), "sent": format!("{sent:.4}")}});
        let (code, _) = c
            .call(
                "PUT",
                "/api/v1/namespaces/bench/configmaps/tick",
                Some(&body),
                "application/json",
            )
            .await;
        assert_eq!(code, 200);
    }
    let mut all = Vec::new();
    for w in watchers {
        let lat = w.await.unwrap();
        assert_eq!(lat.len(), UPDATES, "a watcher missed updates");
        all.extend(lat);
    }
    let (w50, w99) = (pct(&mut all, 50.0), pct(&mut all, 99.0));
    println!(
        "{:<34} {w50:>10.2} {w99:>10.2}",
        format!("watch delivery, {WATCHERS} watchers")
    );
    report.insert("watch_fanout_p50_ms".into(), json!(w50));
    report.insert("watch_fanout_p99_ms".into(), json!(w99));

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    let file: PathBuf = out.join("api.json");
    std::fs::write(
        &file,
        serde_json::to_string_pretty(&Value::Object(report)).unwrap(),
    )
    .unwrap();
    println!("wrote {}", file.canonicalize().unwrap().display());
}
