//! `cargo xtask bench store`: the SQLite backend and a real local etcd, side
//! by side in one run, on the same operations. Prints a table with ratios and
//! writes target/bench/store.json.
//!
//! Every loop is bounded in time and count; etcd listens on loopback only.

// Benchmark harness: a failed expect aborts the run with its message, which is
// what a broken measurement should do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use skep_store::{EtcdOptions, EtcdStore, ListRequest, LocalEtcd, SqliteStore, Store};
use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

/// How long each throughput row runs.
const RUN: Duration = Duration::from_secs(3);
/// Upper bound on operations per row, whatever the speed.
const MAX_OPS: usize = 200_000;
const WRITERS: [usize; 3] = [1, 16, 64];
const LIST_KEYS: usize = 10_000;
const WATCH_EVENTS: usize = 2_000;

/// A pod-sized value (real pods are 1–4 KiB of JSON).
fn value(i: usize) -> Bytes {
    let mut v = format!("{{\"kind\":\"Pod\",\"n\":{i},\"spec\":\"").into_bytes();
    v.resize(1500, b'x');
    v.extend_from_slice(b"\"}");
    Bytes::from(v)
}

async fn creates_per_s(s: &Arc<dyn Store>, writers: usize, tag: &str) -> f64 {
    let start = Instant::now();
    let per_writer = MAX_OPS / writers;
    let mut handles = Vec::new();
    for w in 0..writers {
        let s = s.clone();
        let tag = tag.to_owned();
        handles.push(tokio::spawn(async move {
            let mut n = 0usize;
            while n < per_writer && start.elapsed() < RUN {
                s.create(&format!("/bench/{tag}/{w}/{n}"), value(n))
                    .await
                    .expect("create");
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.expect("writer task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

async fn updates_per_s(s: &Arc<dyn Store>, writers: usize, tag: &str) -> f64 {
    let mut revs = Vec::new();
    for w in 0..writers {
        revs.push(
            s.create(&format!("/bench/{tag}/{w}"), value(0))
                .await
                .expect("create")
                .mod_revision,
        );
    }
    let start = Instant::now();
    let per_writer = MAX_OPS / writers;
    let mut handles = Vec::new();
    for (w, mut rev) in revs.into_iter().enumerate() {
        let s = s.clone();
        let key = format!("/bench/{tag}/{w}");
        handles.push(tokio::spawn(async move {
            let mut n = 0usize;
            while n < per_writer && start.elapsed() < RUN {
                rev = s
                    .update(&key, value(n), rev)
                    .await
                    .expect("update")
                    .mod_revision;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.expect("writer task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// Median time of a full list of 10,000 pod-sized objects, in ms.
async fn list_10k_ms(s: &Arc<dyn Store>) -> f64 {
    let mut handles = Vec::new();
    for t in 0..32 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            for i in (t..LIST_KEYS).step_by(32) {
                s.create(&format!("/list/pods/default/pod-{i:05}"), value(i))
                    .await
                    .expect("create");
            }
        }));
    }
    for h in handles {
        h.await.expect("filler task");
    }
    let mut times = Vec::new();
    for _ in 0..7 {
        let start = Instant::now();
        let page = s
            .list(ListRequest::prefix("/list/pods/"))
            .await
            .expect("list");
        times.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(page.items.len(), LIST_KEYS);
    }
    percentile(&mut times, 50.0)
}

/// Watch delivery latency: time from issuing a write to a watcher receiving
/// its event, for writes paced at about 1,000/s. Returns (p50, p99) in ms.
async fn watch_latency_ms(s: &Arc<dyn Store>) -> (f64, f64) {
    let from = s.revision().await.expect("revision");
    let mut watch = s.watch("/watch/", from).await.expect("watch");
    let sent: Arc<std::sync::Mutex<BTreeMap<i64, Instant>>> = Arc::default();
    let writer = {
        let s = s.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(1));
            let mut starts = Vec::with_capacity(WATCH_EVENTS);
            for i in 0..WATCH_EVENTS {
                ticker.tick().await;
                let t0 = Instant::now();
                let kv = s
                    .create(&format!("/watch/{i}"), value(i))
                    .await
                    .expect("create");
                starts.push((kv.mod_revision, t0));
            }
            sent.lock().expect("lock").extend(starts);
        })
    };
    let mut received = Vec::with_capacity(WATCH_EVENTS);
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.len() < WATCH_EVENTS && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
            Ok(Some(Ok(event))) => received.push((event.revision(), Instant::now())),
            other => panic!("watch failed: {other:?}"),
        }
    }
    writer.await.expect("writer");
    let sent = sent.lock().expect("lock");
    let mut latencies: Vec<f64> = received
        .iter()
        .filter_map(|(rev, at)| {
            sent.get(rev)
                .map(|t0| at.duration_since(*t0).as_secs_f64() * 1e3)
        })
        .collect();
    assert_eq!(
        latencies.len(),
        WATCH_EVENTS,
        "every write must be delivered once"
    );
    (
        percentile(&mut latencies, 50.0),
        percentile(&mut latencies, 99.0),
    )
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let idx = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    v[idx.min(v.len() - 1)]
}

#[derive(Default)]
struct Results {
    rows: Vec<(String, f64, f64, bool)>, // name, sqlite, etcd, higher is better
}

async fn measure(s: Arc<dyn Store>, name: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for w in WRITERS {
        let v = creates_per_s(&s, w, &format!("c{w}")).await;
        eprintln!("  {name}: creates/s with {w} writers: {v:.0}");
        m.insert(format!("creates_per_s_{w}"), v);
    }
    for w in WRITERS {
        let v = updates_per_s(&s, w, &format!("u{w}")).await;
        eprintln!("  {name}: updates/s with {w} writers: {v:.0}");
        m.insert(format!("updates_per_s_{w}"), v);
    }
    let v = list_10k_ms(&s).await;
    eprintln!("  {name}: list 10,000 objects: {v:.1} ms");
    m.insert("list_10k_ms".into(), v);
    let (p50, p99) = watch_latency_ms(&s).await;
    eprintln!("  {name}: watch delivery p50 {p50:.2} ms, p99 {p99:.2} ms");
    m.insert("watch_p50_ms".into(), p50);
    m.insert("watch_p99_ms".into(), p99);
    m
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; nothing else to parse.
    let dir = tempfile::tempdir()?;
    eprintln!(
        "store bench: SQLite ({}), then a local etcd",
        dir.path().display()
    );
    let sqlite: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("bench.db"))?);
    let s = measure(sqlite, "sqlite").await;

    let etcd = LocalEtcd::start()?;
    let etcd_store: Arc<dyn Store> =
        Arc::new(EtcdStore::connect(EtcdOptions::new(vec![etcd.endpoint()])).await?);
    let e = measure(etcd_store, "etcd").await;
    drop(etcd);

    let mut results = Results::default();
    let label = |k: &str| -> (String, bool) {
        let higher = k.contains("per_s");
        let name = match k {
            "list_10k_ms" => "list 10,000 objects (ms)".to_string(),
            "watch_p50_ms" => "watch delivery p50 (ms)".to_string(),
            "watch_p99_ms" => "watch delivery p99 (ms)".to_string(),
            k => {
                let (what, w) = k.rsplit_once('_').unwrap_or((k, ""));
                let what = if what.starts_with("creates") {
                    "creates/s"
                } else {
                    "updates/s"
                };
                format!("{what}, {w} writers")
            }
        };
        (name, higher)
    };
    let order = [
        "creates_per_s_1",
        "creates_per_s_16",
        "creates_per_s_64",
        "updates_per_s_1",
        "updates_per_s_16",
        "updates_per_s_64",
        "list_10k_ms",
        "watch_p50_ms",
        "watch_p99_ms",
    ];
    for k in order {
        let (name, higher) = label(k);
        results.rows.push((name, s[k], e[k], higher));
    }

    println!();
    println!(
        "{:<28} {:>12} {:>12} {:>18}",
        "store benchmark", "sqlite", "etcd", "sqlite vs etcd"
    );
    println!("{}", "-".repeat(73));
    for (name, sv, ev, higher) in &results.rows {
        // Ratio > 1 always means SQLite is better.
        let ratio = if *higher { sv / ev } else { ev / sv };
        println!("{name:<28} {sv:>12.1} {ev:>12.1} {:>17.2}x", ratio);
    }
    println!("(ratio > 1: SQLite better; etcd on loopback; both fsync every commit)");

    let mut json = serde_json::Map::new();
    for (k, v) in &s {
        json.insert(format!("sqlite_{k}"), (*v).into());
    }
    for (k, v) in &e {
        json.insert(format!("etcd_{k}"), (*v).into());
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    std::fs::create_dir_all(&out)?;
    let file = out.join("store.json");
    std::fs::write(&file, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", file.canonicalize()?.display());
    Ok(())
}
