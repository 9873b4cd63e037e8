//! Service load-balancing benchmark (not a test): on the netns topology of
//! the dataplane tests (client pod → ClusterIP → 2 backend pods on one
//! node), in one run, compares
//!
//! * skep's eBPF datapath,
//! * kube-proxy's iptables mode reproduced as kube-proxy writes it
//!   (KUBE-SERVICES / KUBE-SVC-* / KUBE-SEP-* chains, `statistic --mode
//!   random`, DNAT, mark-for-masquerade), loaded with iptables-restore,
//! * the pod IP directly (the floor),
//!
//! at 1, 1,000 and 10,000 services (each with 2 backends), for new
//! connections (connect + request + close) and request/response on one
//! persistent connection, plus the time to program the services.
//!
//! Run as root: `cargo run --release -p skep-dataplane --example lb_bench`
//! (SKEP_EBPF_OBJECT as for the tests). Prints a table and writes
//! target/bench/lb.json. `LB_BENCH_SECS` sets the seconds per measurement
//! (default 2), `LB_BENCH_ROUNDS` the interleaved rounds whose medians are
//! reported (default 5; ratios are medians of the per-round ratios).
//! Traffic stays inside the namespaces it creates.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../tests/harness/mod.rs"]
mod harness;

#[path = "common/echo.rs"]
mod echo;

use echo::{EchoServer, Rates, measure};
use harness::Topology;
use skep_dataplane::lb::{
    Endpoint, EndpointState, LbSettings, LoadBalancer, Protocol, Service, ServicePort,
};
use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 43, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
}

fn services(n: usize, topo: &Topology) -> Vec<Service> {
    (0..n)
        .map(|i| Service {
            name: format!("bench/svc-{i}"),
            vip: vip(i),
            ports: vec![ServicePort {
                port: 80,
                protocol: Protocol::Tcp,
                target_port: 8080,
                node_port: None,
            }],
            endpoints: topo.pods[1..]
                .iter()
                .map(|p| Endpoint {
                    addr: p.ip,
                    state: EndpointState::Ready,
                    local: true,
                })
                .collect(),
            session_affinity: None,
            internal_traffic_local: false,
            external_traffic_local: false,
            external_ips: Vec::new(),
        })
        .collect()
}

/// kube-proxy's iptables-mode rules for `n` services, as it writes them.
fn kube_proxy_rules(n: usize, topo: &Topology) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for (name, _) in [
        ("KUBE-SERVICES", ()),
        ("KUBE-MARK-MASQ", ()),
        ("KUBE-POSTROUTING", ()),
    ] {
        chains.push_str(&format!(":{name} - [0:0]\n"));
    }
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    rules.push_str("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n");
    rules.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    let backends: Vec<Ipv4Addr> = topo.pods[1..].iter().map(|p| p.ip).collect();
    for i in 0..n {
        let svc = format!("KUBE-SVC-{i:016X}");
        chains.push_str(&format!(":{svc} - [0:0]\n"));
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/svc-{i}:http cluster IP\" -m tcp --dport 80 -j {svc}\n",
            vip(i)
        ));
        for (k, b) in backends.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i:012X}{k:04X}");
            chains.push_str(&format!(":{sep} - [0:0]\n"));
            let left = backends.len() - k;
            if left > 1 {
                rules.push_str(&format!(
                    "-A {svc} -m comment --comment \"bench/svc-{i}:http -> {b}:8080\" -m statistic --mode random --probability {:.11} -j {sep}\n",
                    1.0 / left as f64
                ));
            } else {
                rules.push_str(&format!(
                    "-A {svc} -m comment --comment \"bench/svc-{i}:http -> {b}:8080\" -j {sep}\n"
                ));
            }
            rules.push_str(&format!(
                "-A {sep} -s {b}/32 -m comment --comment \"bench/svc-{i}:http\" -j KUBE-MARK-MASQ\n"
            ));
            rules.push_str(&format!(
                "-A {sep} -p tcp -m comment --comment \"bench/svc-{i}:http\" -m tcp -j DNAT --to-destination {b}:8080\n"
            ));
        }
    }
    format!("*nat\n{chains}{rules}COMMIT\n")
}

fn iptables_restore(topo: &Topology, rules: &str) -> Duration {
    let start = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", topo.node.name(), "iptables-restore"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("iptables-restore (package iptables)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "iptables-restore failed");
    start.elapsed()
}

/// One measured setup; kept alive for all rounds.
/// Fields drop in order: servers and datapath before the namespaces.
struct Setup {
    name: String,
    _servers: Vec<EchoServer>,
    _lb: Option<LoadBalancer<skep_dataplane::lb::KernelDatapath>>,
    target: SocketAddrV4,
    program: Option<Duration>,
    topo: Topology,
}

/// The two backends' echo servers.
fn echo_servers(topo: &Topology) -> Vec<EchoServer> {
    topo.pods[1..]
        .iter()
        .map(|p| EchoServer::start(p, 8080))
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    harness::require_root();
    let secs: f64 = std::env::var("LB_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let rounds: usize = std::env::var("LB_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let scales = [1usize, 1_000, 10_000];

    let mut setups = Vec::new();
    {
        let topo = Topology::new("bench-direct", 3);
        let servers = echo_servers(&topo);
        let target = SocketAddrV4::new(topo.pods[1].ip, 8080);
        setups.push(Setup {
            name: "direct".into(),
            topo,
            _servers: servers,
            _lb: None,
            target,
            program: None,
        });
    }
    for &n in &scales {
        let topo = Topology::new(&format!("bench-ebpf-{n}"), 3);
        let servers = echo_servers(&topo);
        let settings = LbSettings {
            max_frontends: 10_240,
            max_backends: 20_480,
            ct_entries: 262_144,
            ..topo.settings()
        };
        let mut lb = LoadBalancer::new(topo.datapath_with(settings)).unwrap();
        let t = Instant::now();
        lb.resync(services(n, &topo)).unwrap();
        let program = Some(t.elapsed());
        setups.push(Setup {
            name: format!("skep eBPF, {n} svc"),
            topo,
            _servers: servers,
            _lb: Some(lb),
            target: SocketAddrV4::new(vip(n - 1), 80),
            program,
        });
        let topo = Topology::new(&format!("bench-ipt-{n}"), 3);
        let servers = echo_servers(&topo);
        let program = Some(iptables_restore(&topo, &kube_proxy_rules(n, &topo)));
        setups.push(Setup {
            name: format!("iptables, {n} svc"),
            topo,
            _servers: servers,
            _lb: None,
            target: SocketAddrV4::new(vip(n - 1), 80),
            program,
        });
    }

    // Rounds interleave the setups so that load from elsewhere on the
    // machine spreads over all of them, in alternating order so that no
    // setup always runs right after the same one; medians are reported,
    // and each ratio is the median of the ratios within the rounds (the
    // two sides measured seconds apart, not a minute).
    let mut samples: Vec<Vec<Rates>> = setups.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..setups.len()).collect()
        } else {
            (0..setups.len()).rev().collect()
        };
        for i in order {
            let s = &setups[i];
            samples[i].push(measure(&s.topo, s.target, secs));
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    let index = |name: &str| setups.iter().position(|s| s.name == name).unwrap();
    let ratio = |a: &str, b: &str, f: fn(&Rates) -> f64| {
        let (a, b) = (&samples[index(a)], &samples[index(b)]);
        median(
            &mut a
                .iter()
                .zip(b)
                .map(|(x, y)| f(x) / f(y))
                .collect::<Vec<_>>(),
        )
    };
    let mut rows = Vec::new();
    for (s, m) in setups.iter().zip(&samples) {
        let pick = |f: fn(&Rates) -> f64| median(&mut m.iter().map(f).collect::<Vec<_>>());
        let r = Rates {
            conn_rate: pick(|r| r.conn_rate),
            rr_rate: pick(|r| r.rr_rate),
            p50_us: pick(|r| r.p50_us),
            p99_us: pick(|r| r.p99_us),
        };
        rows.push((s.name.clone(), r, s.program));
    }
    let program = |name: &str| rows.iter().find(|(n, _, _)| n == name).unwrap().2.unwrap();

    println!(
        "\nmedians of {rounds} rounds × {secs} s (ratios: medians of the per-round ratios)\n{:<24} {:>12} {:>12} {:>10} {:>10} {:>12}",
        "mode", "conn/s", "req/s", "p50 µs", "p99 µs", "program"
    );
    for (mode, r, prog) in &rows {
        let prog = prog
            .map(|d| format!("{:.3} s", d.as_secs_f64()))
            .unwrap_or_default();
        println!(
            "{mode:<24} {:>12.0} {:>12.0} {:>10.1} {:>10.1} {prog:>12}",
            r.conn_rate, r.rr_rate, r.p50_us, r.p99_us
        );
    }
    let conn = |r: &Rates| r.conn_rate;
    let conn1 = ratio("skep eBPF, 1 svc", "iptables, 1 svc", conn);
    let conn10k = ratio("skep eBPF, 10000 svc", "iptables, 10000 svc", conn);
    let conn_direct10k = ratio("skep eBPF, 10000 svc", "direct", conn);
    let rr_direct10k = ratio("skep eBPF, 10000 svc", "direct", |r| r.rr_rate);
    let p10k = program("skep eBPF, 10000 svc").as_secs_f64();
    let ipt10k = program("iptables, 10000 svc").as_secs_f64();
    println!(
        "\nconnection rate vs iptables: {conn1:.2}× at 1 service, {conn10k:.2}× at 10,000; vs direct at 10,000: {conn_direct10k:.2}×; request/response vs direct at 10,000: {rr_direct10k:.2}×"
    );
    println!("programming 10,000 services: skep {p10k:.3} s, iptables-restore {ipt10k:.3} s");
    let mut json = vec![
        format!("\"conn_rate_ratio_vs_iptables_1\": {conn1:.4}"),
        format!("\"conn_rate_ratio_vs_iptables_10k\": {conn10k:.4}"),
        format!("\"conn_rate_ratio_vs_direct_10k\": {conn_direct10k:.4}"),
        format!("\"rr_ratio_vs_direct_10k\": {rr_direct10k:.4}"),
        format!("\"program_10k_s\": {p10k:.4}"),
        format!("\"iptables_program_10k_s\": {ipt10k:.4}"),
        format!("\"rounds\": {rounds}"),
        format!("\"seconds_per_measurement\": {secs}"),
    ];
    for (mode, r, _) in &rows {
        json.push(format!(
            "\"{}\": {{\"conn_rate\": {:.1}, \"rr_rate\": {:.1}, \"p50_us\": {:.1}, \"p99_us\": {:.1}}}",
            mode.replace([' ', ','], "_"),
            r.conn_rate,
            r.rr_rate,
            r.p50_us,
            r.p99_us
        ));
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("lb.json"),
        format!("{{\n  {}\n}}\n", json.join(",\n  ")),
    )
    .unwrap();
    println!("wrote {}", out.join("lb.json").display());
}
