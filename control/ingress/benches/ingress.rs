//! `cargo xtask bench ingress`: skep's Ingress proxy vs nginx (Debian's
//! package) in front of the same upstream, in one run.
//!
//! Everything runs inside a network namespace the benchmark creates
//! (loopback only): one upstream HTTP/1.1 server (hyper, 1 worker thread,
//! a 6-byte body), the skep proxy (this binary re-executed, its routing
//! table built from Ingress/Service/EndpointSlice/Secret objects by the
//! same code the node's watches use; tokio with WORKERS worker threads)
//! (skep's own worker threads, `--ingress-workers` = WORKERS, each a
//! single-threaded runtime with a SO_REUSEPORT listener)
//! and nginx (`worker_processes` = WORKERS, upstream keepalive 64,
//! access_log off) with the same routes, the same certificate and the
//! same forwarded headers. The skep proxy runs without a log subscriber,
//! so its access log is off too.
//!
//! Loads (each bounded in time; same for both proxies, one after the
//! other): HTTP/1.1 keep-alive plaintext (wrk), HTTP/1.1 keep-alive over
//! TLS (wrk, SNI bench.test), HTTP/2 over TLS (h2load, 10 streams per
//! connection; latencies from its per-request log). Reports requests/s,
//! p50/p99 latency, CPU time per request (utime + stime of the whole
//! process tree over the measured run, divided by the requests) and the
//! proxies' RSS (VmHWM, nginx master + workers).
//! Writes target/bench/ingress.json. SKEP_INGRESS_BENCH_SECS (default 10)
//! sets each load's duration; SKEP_INGRESS_BENCH_WORKERS (default 1) the
//! proxies' worker count.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const ROLE: &str = "SKEP_INGRESS_BENCH_ROLE";
const UPSTREAM_PORT: u16 = 18000;
const SKEP_HTTP: u16 = 18080;
const SKEP_HTTPS: u16 = 18443;
const NGINX_HTTP: u16 = 28080;
const NGINX_HTTPS: u16 = 28443;
const HOST: &str = "bench.test";
const CONNECTIONS: u32 = 50;

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("upstream") => return upstream(),
        Ok("skep") => return skep_proxy(),
        _ => {}
    }
    run();
}

/// The upstream both proxies use: a fixed small answer, keep-alive.
fn upstream() {
    use hyper::{Request, Response, body::Incoming};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", UPSTREAM_PORT))
            .await
            .unwrap();
        loop {
            let (s, _) = l.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"hello\n"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}

fn workers() -> usize {
    std::env::var("SKEP_INGRESS_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// The skep proxy with the bench's Ingress (cert files from argv's dir).
fn skep_proxy() {
    use base64::Engine;
    let dir = PathBuf::from(std::env::var("SKEP_INGRESS_BENCH_DIR").unwrap());
    let b64 = |p: &str| {
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(dir.join(p)).unwrap())
    };
    let mut objs = skep_ingress::Objects::default();
    objs.classes
        .insert("skep".into(), skep_ingress::class_manifest());
    objs.services.insert(
        "bench/up".into(),
        json!({"metadata": {"name": "up", "namespace": "bench"},
               "spec": {"ports": [{"name": "http", "port": 80}]}}),
    );
    objs.slices.insert(
        "bench/up-1".into(),
        json!({"metadata": {"name": "up-1", "namespace": "bench",
                            "labels": {"kubernetes.io/service-name": "up"}},
               "ports": [{"name": "http", "port": UPSTREAM_PORT}],
               "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}]}),
    );
    objs.secrets.insert(
        "bench/tls".into(),
        json!({"metadata": {"name": "tls", "namespace": "bench", "resourceVersion": "1"},
               "type": "kubernetes.io/tls",
               "data": {"tls.crt": b64("tls.crt"), "tls.key": b64("tls.key")}}),
    );
    // nginx serves plain HTTP too, so the HTTP→HTTPS redirect is off.
    objs.ingresses.insert(
        "bench/web".into(),
        json!({"metadata": {"name": "web", "namespace": "bench",
                            "annotations": {"skep.io/ssl-redirect": "false"}},
               "spec": {"tls": [{"hosts": [HOST], "secretName": "tls"}],
                        "rules": [{"host": HOST, "http": {"paths": [{"path": "/", "pathType": "Prefix",
                            "backend": {"service": {"name": "up", "port": {"number": 80}}}}]}}]}}),
    );
    // Only sets up: the proxy's own `workers()` threads serve.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let proxy = skep_ingress::new_proxy();
        let mut certs = skep_ingress::tls::CertCache::default();
        let snap = skep_ingress::routes::build(
            &objs,
            skep_ingress::routes::BuildContext {
                registry: &proxy.registry,
                certs: &mut certs,
            },
        );
        proxy.update(snap);
        let args = skep_ingress::IngressArgs {
            no_ingress: false,
            ingress_http_listen: format!("127.0.0.1:{SKEP_HTTP}").parse().unwrap(),
            ingress_https_listen: format!("127.0.0.1:{SKEP_HTTPS}").parse().unwrap(),
            ingress_metrics_listen: "off".parse().unwrap(),
            ingress_workers: workers(),
        };
        let bound = skep_ingress::serve(proxy, &args).await;
        assert!(
            bound.http.is_some() && bound.https.is_some(),
            "skep proxy could not listen"
        );
        std::future::pending::<()>().await;
    });
}

fn need(bin: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{bin} is missing: install the Debian package {package} (cargo xtask setup does)"
    );
}

/// Processes killed and the namespace removed on drop (also on panic).
struct Env {
    netns: String,
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for c in &mut self.children {
            // nginx's workers outlive a killed master: the whole tree goes.
            for pid in tree(c.id()).into_iter().skip(1) {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.netns));
    }
}

impl Env {
    fn spawn(&mut self, cmd: &[&str], env: &[(&str, &str)], log: &str) -> u32 {
        let log = std::fs::File::create(self.dir.path().join(log)).unwrap();
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).args(cmd);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a process in the bench namespace");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    fn exec(&self, cmd: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(cmd)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}{}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_port(&self, port: u16, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.netns, "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{port}"))
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(Instant::now() < deadline, "{what} did not listen on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A process's peak RSS in MB (VmHWM).
fn hwm_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// The pid and every descendant's (nginx's workers).
fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // Fields after the ")" of the command: state, ppid, …
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(parent) && !out.contains(&p) {
                out.push(p);
            }
        }
        i += 1;
    }
    out
}

/// utime + stime of a process tree, seconds.
fn cpu_secs(pid: u32) -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    tree(pid)
        .into_iter()
        .map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // After the ")": state is field 3; utime, stime are 14 and 15.
            let f: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().collect())
                .unwrap_or_default();
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (n(11) + n(12)) / tck
        })
        .sum()
}

#[derive(Debug, Clone, Copy)]
enum Load {
    Http1,
    Http1Tls,
    H2Tls,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::Http1 => "http1_keepalive",
            Load::Http1Tls => "http1_tls_keepalive",
            Load::H2Tls => "h2_tls",
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Result_ {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// The proxy's CPU per request, microseconds.
    cpu_us: f64,
}

/// wrk's latency lines ("50%  1.23ms") → milliseconds.
fn wrk_ms(text: &str, pct: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(pct))
        .unwrap_or_else(|| panic!("no {pct} latency in wrk's output:\n{text}"));
    let v = line.split_whitespace().nth(1).unwrap();
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap());
    let n: f64 = num.parse().unwrap();
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => panic!("unit {unit} in {line}"),
    }
}

fn run_load(env: &Env, load: Load, port: u16, secs: u64) -> Result_ {
    let d = format!("{secs}s");
    let c = CONNECTIONS.to_string();
    match load {
        Load::Http1 | Load::Http1Tls => {
            let url = match load {
                Load::Http1 => format!("http://{HOST}:{port}/"),
                _ => format!("https://{HOST}:{port}/"),
            };
            let out = env.exec(&["wrk", "-t1", "-c", &c, "-d", &d, "--latency", &url]);
            let rps = out
                .lines()
                .find_map(|l| l.strip_prefix("Requests/sec:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no Requests/sec in wrk's output:\n{out}"));
            let errors = out
                .lines()
                .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
                + out
                    .lines()
                    .find(|l| l.contains("Socket errors"))
                    .map(|l| {
                        l.split(|c: char| !c.is_ascii_digit())
                            .filter_map(|n| n.parse::<u64>().ok())
                            .sum()
                    })
                    .unwrap_or(0);
            Result_ {
                rps,
                p50_ms: wrk_ms(&out, "50%"),
                p99_ms: wrk_ms(&out, "99%"),
                errors,
                cpu_us: 0.0,
            }
        }
        Load::H2Tls => {
            let log = env.dir.path().join("h2load.log");
            let _ = std::fs::remove_file(&log);
            let url = format!("https://{HOST}:{port}/");
            let out = env.exec(&[
                "h2load",
                "-t1",
                "-c",
                &c,
                "-m",
                "10",
                "-D",
                &secs.to_string(),
                "--log-file",
                log.to_str().unwrap(),
                &url,
            ]);
            // "finished in 10.00s, 12345.67 req/s, …"
            let rps = out
                .lines()
                .find(|l| l.starts_with("finished in"))
                .and_then(|l| l.split(", ").nth(1))
                .and_then(|v| v.trim_end_matches(" req/s").parse().ok())
                .unwrap_or_else(|| panic!("no req/s in h2load's output:\n{out}"));
            let errors = out
                .lines()
                .find(|l| l.starts_with("requests:"))
                .map(|l| {
                    let f: Vec<&str> = l.split(", ").collect();
                    let n = |what: &str| {
                        f.iter()
                            .find(|x| x.ends_with(what))
                            .and_then(|x| x.split_whitespace().next()?.parse::<u64>().ok())
                            .unwrap_or(0)
                    };
                    n("failed") + n("errored") + n("timeout")
                })
                .unwrap_or(0);
            // Per request: start, status, microseconds to the response end.
            let mut lat: Vec<f64> = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<f64>().ok())
                .map(|us| us / 1000.0)
                .collect();
            assert!(!lat.is_empty(), "h2load wrote no per-request log:\n{out}");
            lat.sort_by(|a, b| a.total_cmp(b));
            let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
            Result_ {
                rps,
                p50_ms: pct(0.50),
                p99_ms: pct(0.99),
                errors,
                cpu_us: 0.0,
            }
        }
    }
}

fn cert(dir: &Path) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "ingress bench CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = p.self_signed(&ca_key).unwrap();
    // ECDSA P-256 (rcgen's default), as most ingress certificates today.
    let leaf = rcgen::CertificateParams::new(vec![HOST.to_owned()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let crt = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("tls.crt"), crt.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
}

fn nginx_conf(dir: &Path, workers: usize) -> PathBuf {
    let d = dir.display();
    let conf = format!(
        r#"worker_processes {workers};
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/ngx-body;
    proxy_temp_path {d}/ngx-proxy;
    fastcgi_temp_path {d}/ngx-fastcgi;
    uwsgi_temp_path {d}/ngx-uwsgi;
    scgi_temp_path {d}/ngx-scgi;
    upstream up {{ server 127.0.0.1:{UPSTREAM_PORT}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{NGINX_HTTP} default_server;
        listen 127.0.0.1:{NGINX_HTTPS} ssl http2 default_server;
        ssl_certificate {d}/tls.crt;
        ssl_certificate_key {d}/tls.key;
        return 404;
    }}
    server {{
        listen 127.0.0.1:{NGINX_HTTP};
        listen 127.0.0.1:{NGINX_HTTPS} ssl http2;
        server_name {HOST};
        ssl_certificate {d}/tls.crt;
        ssl_certificate_key {d}/tls.key;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
        }}
    }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    path
}

fn run() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the ingress benchmark creates a network namespace: run it as root"
    );
    need("nginx", "nginx");
    need("wrk", "wrk");
    need("h2load", "nghttp2-client");
    let secs: u64 = std::env::var("SKEP_INGRESS_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .clamp(1, 120);
    let workers = workers();
    let netns = format!("skepib{}", std::process::id());
    let mut env = Env {
        netns: netns.clone(),
        dir: tempfile::tempdir().unwrap(),
        children: Vec::new(),
    };
    let st = Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .unwrap();
    assert!(st.success(), "ip netns add {netns}");
    env.exec(&["ip", "link", "set", "lo", "up"]);
    // `ip netns exec` shows /etc/netns/NS/hosts as /etc/hosts: the load
    // tools resolve bench.test (and send it as SNI) without touching the
    // host's /etc/hosts.
    std::fs::create_dir_all(format!("/etc/netns/{netns}")).unwrap();
    std::fs::write(
        format!("/etc/netns/{netns}/hosts"),
        format!("127.0.0.1 localhost {HOST}\n"),
    )
    .unwrap();
    let dir = env.dir.path().to_path_buf();
    cert(&dir);
    let exe = std::env::current_exe().unwrap();
    let exe = exe.to_str().unwrap();
    env.spawn(&[exe], &[(ROLE, "upstream")], "upstream.log");
    env.wait_port(UPSTREAM_PORT, "the upstream");
    let workers_s = workers.to_string();
    let skep_pid = env.spawn(
        &[exe],
        &[
            (ROLE, "skep"),
            ("SKEP_INGRESS_BENCH_DIR", dir.to_str().unwrap()),
            ("SKEP_INGRESS_BENCH_WORKERS", &workers_s),
        ],
        "skep.log",
    );
    env.wait_port(SKEP_HTTP, "the skep proxy");
    let conf = nginx_conf(&dir, workers);
    let nginx_pid = env.spawn(
        &[
            "nginx",
            "-c",
            conf.to_str().unwrap(),
            "-p",
            dir.to_str().unwrap(),
        ],
        &[],
        "nginx.log",
    );
    env.wait_port(NGINX_HTTP, "nginx");
    // Both answer the route before anything is measured.
    for (port, who) in [(SKEP_HTTP, "skep"), (NGINX_HTTP, "nginx")] {
        let body = env.exec(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://{HOST}:{port}/"),
        ]);
        assert_eq!(body, "hello\n", "{who} proxies to the upstream");
    }
    println!(
        "ingress bench: {secs}s per load, {CONNECTIONS} connections, {workers} worker(s) each (skep tokio threads = nginx worker_processes)"
    );
    let mut results = Vec::new();
    for load in [Load::Http1, Load::Http1Tls, Load::H2Tls] {
        let mut pair = Vec::new();
        for (who, port, pid) in [
            (
                "nginx",
                if matches!(load, Load::Http1) {
                    NGINX_HTTP
                } else {
                    NGINX_HTTPS
                },
                nginx_pid,
            ),
            (
                "skep",
                if matches!(load, Load::Http1) {
                    SKEP_HTTP
                } else {
                    SKEP_HTTPS
                },
                skep_pid,
            ),
        ] {
            // Warm-up: connections, pools, TLS session setup.
            let _ = run_load(&env, load, port, 2);
            let cpu0 = cpu_secs(pid);
            let mut r = run_load(&env, load, port, secs);
            let cpu = cpu_secs(pid) - cpu0;
            // wrk's rate is over its own run; the CPU window is a bit
            // longer (process start-up), which errs against the proxy.
            let requests = r.rps * secs as f64;
            r.cpu_us = if requests > 0.0 {
                cpu * 1e6 / requests
            } else {
                0.0
            };
            println!(
                "  {:<20} {who:<6} {:>10.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  cpu {:>6.1} µs/req  errors {}",
                load.name(),
                r.rps,
                r.p50_ms,
                r.p99_ms,
                r.cpu_us,
                r.errors
            );
            pair.push(r);
        }
        let (n, s) = (pair[0], pair[1]);
        println!(
            "  {:<20} skep/nginx: throughput ×{:.2}, p99 ×{:.2}, cpu/req ×{:.2}",
            load.name(),
            s.rps / n.rps,
            s.p99_ms / n.p99_ms,
            s.cpu_us / n.cpu_us
        );
        results.push((load, s, n));
    }
    let skep_rss = hwm_mb(skep_pid);
    let nginx_rss: f64 = tree(nginx_pid).into_iter().map(hwm_mb).sum();
    println!("  peak RSS: skep proxy {skep_rss:.1} MB, nginx (master + workers) {nginx_rss:.1} MB");
    // The headline is the scenario where skep compares worst.
    let worst = results
        .iter()
        .min_by(|a, b| (a.1.rps / a.2.rps).total_cmp(&(b.1.rps / b.2.rps)))
        .copied()
        .unwrap();
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    let mut loads = serde_json::Map::new();
    for (load, s, n) in &results {
        loads.insert(
            load.name().into(),
            json!({
                "rps": round(s.rps), "p50_ms": round(s.p50_ms), "p99_ms": round(s.p99_ms), "errors": s.errors,
                "cpu_us_per_request": round(s.cpu_us), "nginx_cpu_us_per_request": round(n.cpu_us),
                "nginx_rps": round(n.rps), "nginx_p50_ms": round(n.p50_ms), "nginx_p99_ms": round(n.p99_ms), "nginx_errors": n.errors,
                "rps_ratio_vs_nginx": round(s.rps / n.rps),
                "p99_ratio_vs_nginx": round(s.p99_ms / n.p99_ms),
            }),
        );
    }
    let report: Value = json!({
        "bench": "ingress",
        "seconds_per_load": secs,
        "connections": CONNECTIONS,
        "workers": workers,
        "headline_load": worst.0.name(),
        "rps_ratio_vs_nginx": round(worst.1.rps / worst.2.rps),
        "p99_ms": round(worst.1.p99_ms),
        "nginx_p99_ms": round(worst.2.p99_ms),
        "skep_rss_mb": round(skep_rss),
        "nginx_rss_mb": round(nginx_rss),
        "loads": loads,
    });
    let out = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("ingress.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    println!("report: {}", out.join("ingress.json").display());
}
