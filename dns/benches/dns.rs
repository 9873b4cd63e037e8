//! `cargo xtask bench dns`: dnsperf on loopback against skep's DNS, dnsmasq,
//! unbound and nsd serving the same 10,000 services (A, SRV, PTR; AAAA
//! queries are NODATA, plus NXDOMAIN names), UDP and TCP, one after the
//! other on this machine. Then latency percentiles at a fixed query rate
//! from our own UDP load generator ([`fixed_rate`]): dnsperf's "max
//! throughput" mode measures how fast a server drains a queue, not how long
//! a query waits at a realistic load.
//!
//! `SKEP_DNS_BENCH_ROUNDS` (default 1) repeats everything; odd rounds run
//! the servers in reverse order (skep last), so machine noise that drifts
//! over a run does not always favour the same side.
//!
//! skep runs in a child process (this executable re-run with
//! `SKEP_DNS_BENCH_CHILD`), fed by a real SqliteStore holding the Services
//! as the API server stores them, so its RSS is its own. Writes
//! target/bench/dns.json. Every run is bounded (`SKEP_DNS_BENCH_SECONDS`,
//! default 30 per server and transport); all traffic stays on 127.0.0.1.

// Benchmark harness: a failed expect aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use skep_store::{SqliteStore, Store};
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

const SERVICES: usize = 10_000;
const NS: &str = "bench";
const CHILD_ENV: &str = "SKEP_DNS_BENCH_CHILD";

fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 43, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
}

fn svc_name(i: usize) -> String {
    format!("svc{i}.{NS}.svc.cluster.local")
}

fn reverse(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    // A port free for both TCP and UDP.
    loop {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = t.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The query mix: 40 % A hits, 20 % SRV hits, 15 % PTR hits, 10 % AAAA
/// (NODATA), 15 % NXDOMAIN; 20,000 lines from a fixed pseudo-random walk.
fn query_file(dir: &Path) -> PathBuf {
    let mut out = String::new();
    let mut x: u64 = 0x5ce9_d115;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x % SERVICES as u64) as usize;
        let _ = match (x >> 32) % 100 {
            0..40 => writeln!(out, "{} A", svc_name(i)),
            40..60 => writeln!(out, "_http._tcp.{} SRV", svc_name(i)),
            60..75 => writeln!(out, "{} PTR", reverse(cluster_ip(i))),
            75..85 => writeln!(out, "{} AAAA", svc_name(i)),
            _ => writeln!(out, "nosuch{i}.{NS}.svc.cluster.local A"),
        };
    }
    let p = dir.join("queries.txt");
    std::fs::write(&p, out).unwrap();
    p
}

/// Waits until `port` answers a query for svc0 with NOERROR.
fn wait_ready(name: &str, port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in svc_name(0).split('.') {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    loop {
        let _ = s.send_to(&q, ("127.0.0.1", port));
        let mut buf = [0u8; 512];
        if let Ok(n) = s.recv(&mut buf)
            && n > 12
            && buf[3] & 0xf == 0
            && buf[7] >= 1
        {
            return;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("{name} exited with {st} before answering");
        }
        assert!(Instant::now() < deadline, "{name} not answering on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Debug, Default, Clone)]
struct Perf {
    qps: f64,
    lost: u64,
    sent: u64,
    avg_latency_ms: f64,
    max_latency_ms: f64,
    rcodes: String,
}

fn field<'a>(out: &'a str, label: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .map(str::trim)
}

fn first_num(s: Option<&str>) -> f64 {
    s.and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0)
}

fn dnsperf(port: u16, queries: &Path, secs: u64, tcp: bool) -> Perf {
    let mut cmd = Command::new("dnsperf");
    cmd.args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(queries)
        .args([
            "-l",
            &secs.to_string(),
            "-c",
            "8",
            "-T",
            "1",
            "-q",
            "256",
            "-t",
            "2",
        ]);
    if tcp {
        cmd.args(["-m", "tcp"]);
    }
    let out = cmd.output().expect("run dnsperf (apt-get install dnsperf)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dnsperf failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lat = field(&text, "Average Latency (s):").unwrap_or("");
    let max = lat
        .split("max ")
        .nth(1)
        .and_then(|m| m.trim_end_matches(')').parse::<f64>().ok())
        .unwrap_or(0.0);
    Perf {
        qps: first_num(field(&text, "Queries per second:")),
        lost: first_num(field(&text, "Queries lost:")) as u64,
        sent: first_num(field(&text, "Queries sent:")) as u64,
        avg_latency_ms: first_num(Some(lat)) * 1000.0,
        max_latency_ms: max * 1000.0,
        rcodes: field(&text, "Response codes:").unwrap_or("").to_owned(),
    }
}

/// Latency distribution at a fixed offered load.
#[derive(Debug, Default, Clone)]
struct Latency {
    sent: u64,
    answered: u64,
    lost: u64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

/// The query file's lines (`name TYPE`) as wire-format queries without
/// EDNS, RD set, id 0 (patched per send).
fn wire_queries(queries: &Path) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(queries).unwrap();
    text.lines()
        .filter_map(|l| {
            let (name, t) = l.split_once(' ')?;
            let qtype: u16 = match t {
                "A" => 1,
                "PTR" => 12,
                "AAAA" => 28,
                "SRV" => 33,
                other => panic!("query type {other} not in the mix"),
            };
            let mut q = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
            for label in name.trim_end_matches('.').split('.') {
                q.push(label.len() as u8);
                q.extend_from_slice(label.as_bytes());
            }
            q.push(0);
            q.extend_from_slice(&qtype.to_be_bytes());
            q.extend_from_slice(&[0, 1]);
            Some(q)
        })
        .collect()
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

/// Offers `rate` queries/s for `secs` seconds over `sockets` UDP sockets
/// (the query mix, in order) and measures each query's send→receive time.
/// One sender thread paces the whole load on a fixed schedule (it does not
/// wait for answers, so a slow server cannot slow the offered load); one
/// receiver thread per socket matches answers by id. A query unanswered
/// 1 s after the last send, or whose id comes round again (65,536 queries
/// later on its socket), is lost. Bounded: `rate × secs` queries, then at
/// most 1 s of waiting. Loopback only.
fn fixed_rate(port: u16, queries: &[Vec<u8>], rate: u64, secs: u64, sockets: usize) -> Latency {
    const SLOTS: usize = 1 << 16;
    let base = Instant::now();
    let nanos = move || u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1;
    let socks: Vec<Arc<UdpSocket>> = (0..sockets)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            Arc::new(s)
        })
        .collect();
    // Per socket and id: when the query in flight was sent (0: none).
    let sent_at: Arc<Vec<Vec<AtomicU64>>> = Arc::new(
        (0..sockets)
            .map(|_| (0..SLOTS).map(|_| AtomicU64::new(0)).collect())
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let receivers: Vec<_> = socks
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (s, sent_at, stop) = (s.clone(), sent_at.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut lat_us: Vec<u32> = Vec::with_capacity(1 << 20);
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = s.recv(&mut buf) else { continue };
                    if n < 12 {
                        continue;
                    }
                    let id = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
                    let t = sent_at[i][id].swap(0, Ordering::AcqRel);
                    if t != 0 {
                        let took = nanos().saturating_sub(t) / 1000;
                        lat_us.push(u32::try_from(took).unwrap_or(u32::MAX));
                    }
                }
                lat_us
            })
        })
        .collect();
    let total = rate * secs;
    let interval_ns = 1_000_000_000 / rate.max(1);
    let mut lost = 0u64;
    let mut ids = vec![0u16; sockets];
    let mut buf = Vec::with_capacity(512);
    let start = Instant::now();
    let mut k = 0u64;
    while k < total {
        // Everything due by now goes out (catching up after a preemption),
        // then sleep until the next one is due.
        let due = (start.elapsed().as_nanos() as u64 / interval_ns + 1).min(total);
        while k < due {
            let sock = (k as usize) % sockets;
            let id = ids[sock];
            ids[sock] = id.wrapping_add(1);
            buf.clear();
            buf.extend_from_slice(&queries[(k as usize) % queries.len()]);
            buf[0..2].copy_from_slice(&id.to_be_bytes());
            if sent_at[sock][usize::from(id)].swap(nanos(), Ordering::AcqRel) != 0 {
                lost += 1;
            }
            let _ = socks[sock].send(&buf);
            k += 1;
        }
        let next = Duration::from_nanos(k * interval_ns);
        if let Some(wait) = next.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<u32> = receivers
        .into_iter()
        .flat_map(|r| r.join().unwrap())
        .collect();
    lost += sent_at
        .iter()
        .flatten()
        .filter(|t| t.load(Ordering::Acquire) != 0)
        .count() as u64;
    all.sort_unstable();
    Latency {
        sent: total,
        answered: all.len() as u64,
        lost,
        p50_ms: percentile(&all, 0.50),
        p90_ms: percentile(&all, 0.90),
        p99_ms: percentile(&all, 0.99),
        p999_ms: percentile(&all, 0.999),
        max_ms: all.last().map_or(0.0, |m| f64::from(*m) / 1000.0),
    }
}

fn rss_mb(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Peer configurations serving the same data.
/// `srv`: also the SRV records (`srv-host`, which dnsmasq keeps in a list
/// it scans per query); without, only the hosts file (A, PTR).
fn dnsmasq(dir: &Path, port: u16, srv: bool) -> Command {
    let mut hosts = String::new();
    let mut conf = format!(
        "port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\n\
         addn-hosts={}\nlocal=/cluster.local/\nlocal=/43.10.in-addr.arpa/\nuser=root\npid-file=\n",
        dir.join("hosts").display()
    );
    for i in 0..SERVICES {
        let _ = writeln!(hosts, "{} {}", cluster_ip(i), svc_name(i));
        if srv {
            let _ = writeln!(
                conf,
                "srv-host=_http._tcp.{n},{n},80,0,100",
                n = svc_name(i)
            );
        }
    }
    std::fs::write(dir.join("hosts"), hosts).unwrap();
    std::fs::write(dir.join("dnsmasq.conf"), conf).unwrap();
    let mut c = Command::new("dnsmasq");
    c.arg("-k").arg(format!(
        "--conf-file={}",
        dir.join("dnsmasq.conf").display()
    ));
    c
}

fn unbound(dir: &Path, port: u16) -> Command {
    let mut conf = format!(
        "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  num-threads: 2\n  so-reuseport: yes\n\
         \x20 username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  use-syslog: no\n\
         \x20 logfile: \"\"\n  verbosity: 0\n  do-ip6: no\n  access-control: 127.0.0.0/8 allow\n\
         \x20 module-config: \"iterator\"\n  local-zone: \"cluster.local.\" static\n\
         \x20 local-zone: \"43.10.in-addr.arpa.\" static\n",
        d = dir.display()
    );
    for i in 0..SERVICES {
        let n = svc_name(i);
        let ip = cluster_ip(i);
        let _ = writeln!(conf, "  local-data: \"{n}. 5 IN A {ip}\"");
        let _ = writeln!(
            conf,
            "  local-data: \"_http._tcp.{n}. 5 IN SRV 0 100 80 {n}.\""
        );
        let _ = writeln!(conf, "  local-data-ptr: \"{ip} 5 {n}.\"");
    }
    conf.push_str("remote-control:\n  control-enable: no\n");
    std::fs::write(dir.join("unbound.conf"), conf).unwrap();
    let mut c = Command::new("unbound");
    c.arg("-d").arg("-c").arg(dir.join("unbound.conf"));
    c
}

fn nsd(dir: &Path, port: u16) -> Command {
    let soa = |origin: &str| {
        format!(
            "$ORIGIN {origin}.\n$TTL 5\n@ IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5\n@ IN NS ns.dns.cluster.local.\n"
        )
    };
    let mut fwd = soa("cluster.local");
    fwd.push_str("ns.dns IN A 10.43.0.10\n");
    let mut rev = soa("43.10.in-addr.arpa");
    for i in 0..SERVICES {
        let n = svc_name(i);
        let ip = cluster_ip(i);
        let _ = writeln!(fwd, "{n}. IN A {ip}");
        let _ = writeln!(fwd, "_http._tcp.{n}. IN SRV 0 100 80 {n}.");
        let _ = writeln!(rev, "{}. IN PTR {n}.", reverse(ip));
    }
    std::fs::write(dir.join("cluster.local.zone"), fwd).unwrap();
    std::fs::write(dir.join("rev.zone"), rev).unwrap();
    let d = dir.display();
    let conf = format!(
        "server:\n  ip-address: 127.0.0.1@{port}\n  port: {port}\n  server-count: 2\n  reuseport: yes\n\
         \x20 username: \"\"\n  chroot: \"\"\n  zonesdir: \"{d}\"\n  database: \"\"\n\
         \x20 pidfile: \"{d}/nsd.pid\"\n  xfrdfile: \"{d}/xfrd.state\"\n  zonelistfile: \"{d}/zone.list\"\n\
         \x20 logfile: \"{d}/nsd.log\"\n  verbosity: 0\n  do-ip6: no\n\
         \x20 rrl-ratelimit: 0\n  rrl-whitelist-ratelimit: 0\n\
         remote-control:\n  control-enable: no\n\
         zone:\n  name: cluster.local\n  zonefile: cluster.local.zone\n\
         zone:\n  name: 43.10.in-addr.arpa\n  zonefile: rev.zone\n"
    );
    std::fs::write(dir.join("nsd.conf"), conf).unwrap();
    let mut c = Command::new("nsd");
    c.arg("-d").arg("-c").arg(dir.join("nsd.conf"));
    c
}

fn service_object(i: usize) -> Value {
    json!({
        "metadata": {"name": format!("svc{i}"), "namespace": NS, "uid": format!("u{i}")},
        "apiVersion": "v1", "kind": "Service",
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip(i).to_string(),
                 "clusterIPs": [cluster_ip(i).to_string()],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
    })
}

fn populate(db: &Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(db).unwrap());
        let mut tasks = tokio::task::JoinSet::new();
        for chunk in 0..20 {
            let store = store.clone();
            tasks.spawn(async move {
                for i in (chunk..SERVICES).step_by(20) {
                    let key = format!("/registry/services/{NS}/svc{i}");
                    let v = serde_json::to_vec(&service_object(i)).unwrap();
                    store.create(&key, v.into()).await.unwrap();
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    });
}

/// The child: skep's DNS on the store, until killed.
fn child(spec: &str) {
    let (db, listen) = spec.split_once(',').unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(db).unwrap());
        let mut config = skep_dns::DnsConfig::new(listen.parse().unwrap());
        config.forward.upstreams.clear();
        let _dns = skep_dns::start(config, store).await.unwrap();
        std::future::pending::<()>().await;
    });
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
        return;
    }
    // `cargo bench` passes --bench; nothing else to parse.
    let secs: u64 = std::env::var("SKEP_DNS_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    let queries = query_file(dir.path());
    let db = dir.path().join("state.db");
    let t = Instant::now();
    populate(&db);
    eprintln!("stored {SERVICES} services in {:.1?}", t.elapsed());

    let rounds: usize = env_num("SKEP_DNS_BENCH_ROUNDS", 1);
    let lat_rate: u64 = env_num("SKEP_DNS_BENCH_LATENCY_QPS", 20_000);
    let lat_secs: u64 = env_num("SKEP_DNS_BENCH_LATENCY_SECONDS", 10);
    let wire = wire_queries(&queries);

    // name → one (udp, tcp, latency) per round.
    let mut results: Results = Vec::new();
    let mut skep_rss = (0.0, 0.0);
    // SKEP_DNS_BENCH_SERVERS=skep,nsd runs a subset (while tuning).
    let only = std::env::var("SKEP_DNS_BENCH_SERVERS").unwrap_or_default();
    let mut names: Vec<&str> = ["skep", "dnsmasq", "dnsmasq_hosts_only", "unbound", "nsd"]
        .into_iter()
        .filter(|name| only.is_empty() || only.split(',').any(|o| o == *name))
        .collect();
    for round in 0..rounds {
        if round > 0 {
            names.reverse();
        }
        eprintln!("round {}: {}", round + 1, names.join(", "));
        for &name in &names {
            let (udp, tcp, lat, rss) = run_server(
                name,
                dir.path(),
                &db,
                &queries,
                &wire,
                secs,
                lat_rate,
                lat_secs,
            );
            if name == "skep" {
                skep_rss = rss;
            }
            match results.iter_mut().find(|r| r.0 == name) {
                Some(r) => r.1.push((udp, tcp, lat)),
                None => results.push((name, vec![(udp, tcp, lat)])),
            }
        }
    }

    let runs = |n: &str| {
        results
            .iter()
            .find(|r| r.0 == n)
            .map(|r| r.1.clone())
            .unwrap_or_default()
    };
    let skep_runs = runs("skep");
    let mut report = json!({
        "services": SERVICES,
        "seconds_per_run": secs,
        "rounds": rounds,
        "query_mix": "40% A, 20% SRV, 15% PTR, 10% AAAA (NODATA), 15% NXDOMAIN",
        "dnsperf": "-c 8 -T 1 -q 256",
        "latency_load": format!("{lat_rate} queries/s for {lat_secs} s over 4 UDP sockets, no EDNS"),
        "skep_rss_mb": (skep_rss.0 * 10.0f64).round() / 10.0,
        "skep_peak_rss_mb": (skep_rss.1 * 10.0f64).round() / 10.0,
        "skep_lost": skep_runs.iter().map(|r| r.0.lost + r.1.lost).sum::<u64>(),
        "knot_or_nsd_qps_udp": mean(&runs("nsd"), &|r| r.0.qps).round(),
    });
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    for (name, v) in &results {
        // Means over the rounds; the per-round figures alongside.
        report[format!("{name}_qps_udp")] = json!(mean(v, &|r| r.0.qps).round());
        report[format!("{name}_qps_tcp")] = json!(mean(v, &|r| r.1.qps).round());
        report[format!("{name}_qps_udp_rounds")] =
            json!(v.iter().map(|r| r.0.qps.round()).collect::<Vec<_>>());
        report[format!("{name}_qps_tcp_rounds")] =
            json!(v.iter().map(|r| r.1.qps.round()).collect::<Vec<_>>());
        report[format!("{name}_avg_latency_ms_udp")] = json!(mean(v, &|r| r.0.avg_latency_ms));
        report[format!("{name}_avg_latency_ms_tcp")] = json!(mean(v, &|r| r.1.avg_latency_ms));
        report[format!("{name}_max_latency_ms_udp")] = json!(mean(v, &|r| r.0.max_latency_ms));
        report[format!("{name}_lost_udp")] = json!(v.iter().map(|r| r.0.lost).sum::<u64>());
        report[format!("{name}_lost_tcp")] = json!(v.iter().map(|r| r.1.lost).sum::<u64>());
        report[format!("{name}_sent_udp")] = json!(v.iter().map(|r| r.0.sent).sum::<u64>());
        report[format!("{name}_rcodes_udp")] =
            json!(v.iter().map(|r| r.0.rcodes.clone()).collect::<Vec<_>>());
        report[format!("{name}_p50_ms")] = json!(r3(mean(v, &|r| r.2.p50_ms)));
        report[format!("{name}_p90_ms")] = json!(r3(mean(v, &|r| r.2.p90_ms)));
        report[format!("{name}_p99_ms")] = json!(r3(mean(v, &|r| r.2.p99_ms)));
        report[format!("{name}_p99_9_ms")] = json!(r3(mean(v, &|r| r.2.p999_ms)));
        report[format!("{name}_max_ms")] = json!(r3(mean(v, &|r| r.2.max_ms)));
        report[format!("{name}_p99_ms_rounds")] =
            json!(v.iter().map(|r| r3(r.2.p99_ms)).collect::<Vec<_>>());
        report[format!("{name}_latency_lost")] = json!(v.iter().map(|r| r.2.lost).sum::<u64>());
        report[format!("{name}_latency_sent")] = json!(v.iter().map(|r| r.2.sent).sum::<u64>());
        report[format!("{name}_latency_answered")] =
            json!(v.iter().map(|r| r.2.answered).sum::<u64>());
    }
    let skep = mean(&skep_runs, &|r| r.0.qps);
    for peer in ["dnsmasq", "dnsmasq_hosts_only", "unbound", "nsd"] {
        let p = mean(&runs(peer), &|r| r.0.qps);
        report[format!("skep_vs_{peer}_udp")] = json!(if p > 0.0 {
            (skep / p * 100.0).round() / 100.0
        } else {
            0.0
        });
    }
    print_latency_table(&results);
    // Where `cargo xtask bench dns` looks for it.
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    let text = serde_json::to_string_pretty(&report).unwrap();
    std::fs::write(out.join("dns.json"), &text).unwrap();
    println!("{text}");
}

fn env_num<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// One round's figures for one server: dnsperf UDP, dnsperf TCP, latency.
type Run = (Perf, Perf, Latency);
/// Every server's runs, in the order first run.
type Results<'a> = Vec<(&'a str, Vec<Run>)>;

/// The mean of `f` over the rounds.
fn mean(v: &[Run], f: &dyn Fn(&Run) -> f64) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().map(f).sum::<f64>() / v.len() as f64
    }
}

/// Percentiles side by side, with skep's ratio to each peer (below 1:
/// skep is faster).
fn print_latency_table(results: &Results) {
    type Col = (&'static str, fn(&Latency) -> f64);
    let cols: [Col; 5] = [
        ("p50", |l| l.p50_ms),
        ("p90", |l| l.p90_ms),
        ("p99", |l| l.p99_ms),
        ("p99.9", |l| l.p999_ms),
        ("max", |l| l.max_ms),
    ];
    let skep = results.iter().find(|r| r.0 == "skep");
    eprintln!("\nlatency at a fixed rate (ms; in brackets skep's value / this server's)");
    let mut head = format!("{:<20}", "server");
    for (c, _) in &cols {
        let _ = write!(head, "{c:>16}");
    }
    eprintln!("{head}   qps_udp");
    for (name, v) in results {
        let mut line = format!("{name:<20}");
        for (_, f) in &cols {
            let x = mean(v, &|r| f(&r.2));
            let ratio = skep
                .filter(|s| s.0 != *name)
                .map(|s| mean(&s.1, &|r| f(&r.2)) / x.max(1e-9));
            match ratio {
                Some(r) => {
                    let _ = write!(line, "{x:>9.3} [{r:>4.2}]");
                }
                None => {
                    let _ = write!(line, "{x:>16.3}");
                }
            }
        }
        eprintln!("{line}   {:.0}", mean(v, &|r| r.0.qps));
    }
}

/// One server: start it, dnsperf over UDP and TCP, then the fixed-rate
/// latency run; returns the three and skep's (RSS, peak RSS).
#[allow(clippy::too_many_arguments)]
fn run_server(
    name: &str,
    dir: &Path,
    db: &Path,
    queries: &Path,
    wire: &[Vec<u8>],
    secs: u64,
    lat_rate: u64,
    lat_secs: u64,
) -> (Perf, Perf, Latency, (f64, f64)) {
    let port = free_port();
    let pdir = dir.join(format!("{name}-{port}"));
    std::fs::create_dir_all(&pdir).unwrap();
    let mut cmd = match name {
        "skep" => {
            let mut c = Command::new(std::env::current_exe().unwrap());
            c.env(CHILD_ENV, format!("{},127.0.0.1:{port}", db.display()))
                .env("RUST_LOG", "warn");
            c
        }
        "dnsmasq" => dnsmasq(&pdir, port, true),
        "dnsmasq_hosts_only" => dnsmasq(&pdir, port, false),
        "unbound" => unbound(&pdir, port),
        _ => nsd(&pdir, port),
    };
    let log = std::fs::File::create(pdir.join("stderr.log")).unwrap();
    let started = Instant::now();
    let mut child = Killed(
        cmd.stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e} (cargo xtask setup installs it)")),
    );
    wait_ready(name, port, &mut child.0);
    eprintln!("{name}: answering after {:.1?}", started.elapsed());
    let udp = dnsperf(port, queries, secs, false);
    eprintln!("{name} udp: {udp:?}");
    let mut rss = (0.0, 0.0);
    if name == "skep" {
        rss = (
            rss_mb(child.0.id(), "VmRSS:"),
            rss_mb(child.0.id(), "VmHWM:"),
        );
    }
    let tcp = dnsperf(port, queries, secs, true);
    eprintln!("{name} tcp: {tcp:?}");
    let lat = fixed_rate(port, wire, lat_rate, lat_secs, 4);
    eprintln!("{name} latency: {lat:?}");
    (udp, tcp, lat, rss)
}
