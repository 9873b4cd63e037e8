//! `cargo xtask bench dns`: dnsperf on loopback against skep's DNS, dnsmasq,
//! unbound and nsd serving the same 10,000 services (A, SRV, PTR; AAAA
//! queries are NODATA, plus NXDOMAIN names), UDP and TCP, one after the
//! other on this machine.
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
    sync::Arc,
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

    let mut results: Vec<(&str, Perf, Perf)> = Vec::new();
    let mut skep_rss = (0.0, 0.0);
    // SKEP_DNS_BENCH_SERVERS=skep,nsd runs a subset (while tuning).
    let only = std::env::var("SKEP_DNS_BENCH_SERVERS").unwrap_or_default();
    for name in ["skep", "dnsmasq", "dnsmasq_hosts_only", "unbound", "nsd"] {
        if !only.is_empty() && !only.split(',').any(|o| o == name) {
            continue;
        }
        let port = free_port();
        let pdir = dir.path().join(name);
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
        let udp = dnsperf(port, &queries, secs, false);
        eprintln!("{name} udp: {udp:?}");
        if name == "skep" {
            skep_rss = (
                rss_mb(child.0.id(), "VmRSS:"),
                rss_mb(child.0.id(), "VmHWM:"),
            );
        }
        let tcp = dnsperf(port, &queries, secs, true);
        eprintln!("{name} tcp: {tcp:?}");
        results.push((name, udp, tcp));
    }

    let get = |n: &'static str| {
        results
            .iter()
            .find(|r| r.0 == n)
            .map(|r| (r.0, r.1.clone(), r.2.clone()))
            .unwrap_or((n, Perf::default(), Perf::default()))
    };
    let mut report = json!({
        "services": SERVICES,
        "seconds_per_run": secs,
        "query_mix": "40% A, 20% SRV, 15% PTR, 10% AAAA (NODATA), 15% NXDOMAIN",
        "dnsperf": "-c 8 -T 1 -q 256",
        "skep_rss_mb": (skep_rss.0 * 10.0f64).round() / 10.0,
        "skep_peak_rss_mb": (skep_rss.1 * 10.0f64).round() / 10.0,
        "skep_lost": get("skep").1.lost + get("skep").2.lost,
        "knot_or_nsd_qps_udp": get("nsd").1.qps.round(),
    });
    for (name, udp, tcp) in &results {
        report[format!("{name}_qps_udp")] = json!(udp.qps.round());
        report[format!("{name}_qps_tcp")] = json!(tcp.qps.round());
        report[format!("{name}_avg_latency_ms_udp")] = json!(udp.avg_latency_ms);
        report[format!("{name}_avg_latency_ms_tcp")] = json!(tcp.avg_latency_ms);
        report[format!("{name}_max_latency_ms_udp")] = json!(udp.max_latency_ms);
        report[format!("{name}_lost_udp")] = json!(udp.lost);
        report[format!("{name}_lost_tcp")] = json!(tcp.lost);
        report[format!("{name}_sent_udp")] = json!(udp.sent);
        report[format!("{name}_rcodes_udp")] = json!(udp.rcodes);
    }
    let skep = get("skep").1.qps;
    for peer in ["dnsmasq", "dnsmasq_hosts_only", "unbound", "nsd"] {
        let p = get(peer).1.qps;
        report[format!("skep_vs_{peer}_udp")] = json!(if p > 0.0 {
            (skep / p * 100.0).round() / 100.0
        } else {
            0.0
        });
    }
    // Where `cargo xtask bench dns` looks for it.
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    let text = serde_json::to_string_pretty(&report).unwrap();
    std::fs::write(out.join("dns.json"), &text).unwrap();
    println!("{text}");
}
