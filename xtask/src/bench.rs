//! `cargo xtask bench <target>`: runs one benchmark and checks it left its
//! report under target/bench/. Add a variant to [`BenchTarget`] (and a
//! `Bench` entry to [`BenchTarget::spec`]) for each new benchmark (lb, api,
//! dns, policy…).

use std::{fs, path::PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::{
    setup,
    util::{self, Cmd},
};

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum BenchTarget {
    /// The state store: embedded SQLite vs a real local etcd
    /// (`cargo bench -p skep-store --bench store`).
    Store,
    /// The API server: request latency, LIST of 10,000 pods, watch fan-out,
    /// memory (`cargo bench -p skep --bench api`).
    Api,
    /// Cluster DNS: dnsperf against skep, dnsmasq, unbound and nsd with
    /// 10,000 services (`cargo bench -p skep-dns --bench dns`).
    Dns,
    /// Service load balancing: skep eBPF vs kube-proxy-style iptables vs
    /// direct, at 1, 1,000 and 10,000 services (as root; traffic stays in
    /// network namespaces the benchmark creates).
    Lb,
    /// NetworkPolicy: skep's eBPF policy at 0, 1, 100 and 1,000 policies vs
    /// the same rules as iptables chains (and ipsets), programming time,
    /// and the drop rate of denied traffic at XDP vs iptables (as root;
    /// traffic stays in network namespaces the benchmark creates).
    Policy,
    /// Pod start-up: 100 pods on one node, create → Running/Ready p50/p99,
    /// agent memory idle and with 100 pods (`cargo bench -p skep --bench
    /// pods`; as root).
    Pods,
    /// What a cluster costs: start → node Ready and → demo pods Ready,
    /// server and agent memory idle and with 100 pods, binary size
    /// (`cargo bench -p skep --bench footprint`; as root).
    Footprint,
    /// The Ingress proxy vs nginx in front of the same upstream:
    /// requests/s and p50/p99 for HTTP/1.1 (plain and TLS) and HTTP/2 over
    /// TLS, RSS of both (`cargo bench -p skep-ingress --bench ingress`; as
    /// root; traffic stays in a network namespace the benchmark creates).
    Ingress,
    /// The scheduler: 10,000 pods on 1,000 simulated nodes (pods/s), a
    /// Deployment of 1,000 replicas to Ready with simulated kubelets
    /// (`cargo bench -p skep --bench schedule`).
    Schedule,
    /// The mesh's mTLS hop: skep sidecars vs a stunnel pair vs direct,
    /// latency at 1,000 and 5,000 req/s, max rate, handshakes/s, CPU and
    /// RSS per proxy (`cargo bench -p skep --bench mesh`; as root; traffic
    /// stays in network namespaces the benchmark creates).
    Mesh,
}

/// How to run one benchmark.
#[derive(Debug)]
struct Bench {
    package: &'static str,
    bench: &'static str,
    /// A release example (`cargo run --example`) rather than a bench target.
    example: bool,
    /// The JSON report it writes, relative to the workspace root (the
    /// benchmarks write under target/ whatever CARGO_TARGET_DIR says).
    report: &'static str,
}

impl BenchTarget {
    fn spec(self) -> Bench {
        match self {
            Self::Store => Bench {
                package: "skep-store",
                bench: "store",
                example: false,
                report: "target/bench/store.json",
            },
            Self::Api => Bench {
                package: "skep",
                bench: "api",
                example: false,
                report: "target/bench/api.json",
            },
            Self::Lb => Bench {
                package: "skep-dataplane",
                bench: "lb_bench",
                example: true,
                report: "target/bench/lb.json",
            },
            Self::Policy => Bench {
                package: "skep-dataplane",
                bench: "policy_bench",
                example: true,
                report: "target/bench/policy.json",
            },
            Self::Pods => Bench {
                package: "skep",
                bench: "pods",
                example: false,
                report: "target/bench/pods.json",
            },
            Self::Ingress => Bench {
                package: "skep-ingress",
                bench: "ingress",
                example: false,
                report: "target/bench/ingress.json",
            },
            Self::Footprint => Bench {
                package: "skep",
                bench: "footprint",
                example: false,
                report: "target/bench/footprint.json",
            },
            Self::Schedule => Bench {
                package: "skep",
                bench: "schedule",
                example: false,
                report: "target/bench/schedule.json",
            },
            Self::Mesh => Bench {
                package: "skep",
                bench: "mesh",
                example: false,
                report: "target/bench/mesh.json",
            },
            Self::Dns => Bench {
                package: "skep-dns",
                bench: "dns",
                example: false,
                report: "target/bench/dns.json",
            },
        }
    }
}

pub fn run(target: BenchTarget) -> Result<()> {
    // Benchmarks run against real peers (etcd…) that setup installs.
    setup::run().context("setup (before the benchmark)")?;
    let spec = target.spec();
    let report = report_path(&spec);
    // A report left by an earlier run must not pass for this run's.
    if report.exists() {
        fs::remove_file(&report)
            .with_context(|| format!("removing the old report {}", report.display()))?;
    }
    let object =
        crate::ebpf::build().context("building the eBPF programs (before the benchmark)")?;
    let args: Vec<&str> = if spec.example {
        vec![
            "run",
            "--release",
            "-p",
            spec.package,
            "--example",
            spec.bench,
        ]
    } else {
        vec!["bench", "-p", spec.package, "--bench", spec.bench]
    };
    Cmd::cargo()
        .args(args)
        .env("SKEP_EBPF_OBJECT", &object)
        .cwd(util::workspace_root())
        .hint(format!(
            "see the output above; the benchmark is `{}` in {}",
            spec.bench, spec.package
        ))
        .run()
        .with_context(|| format!("running the {} benchmark", spec.bench))?;
    if !report.is_file() {
        bail!(
            "the {} benchmark finished but did not write {}",
            spec.bench,
            util::display_path(&report)
        );
    }
    let text =
        fs::read_to_string(&report).with_context(|| format!("reading {}", report.display()))?;
    serde_json::from_str::<serde_json::Value>(&text)
        .with_context(|| format!("{} is not valid JSON", report.display()))?;
    println!("[bench] report: {}", report.display());
    Ok(())
}

fn report_path(spec: &Bench) -> PathBuf {
    util::workspace_root().join(spec.report)
}
