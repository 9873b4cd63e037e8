//! The web console in a real browser: headless Chromium driven over
//! WebDriver (chromedriver) against a real two-node cluster. Signs in
//! (a wrong token first), sees the nodes Ready, opens a Deployment and its
//! pods, streams a pod's logs, and after real allowed and denied
//! connections sees a green and a red edge in the service map, whose
//! detail names the flows and the policy. A screenshot of each view goes
//! to target/console-screenshots/.
//!
//! The API listens inside the server node's network namespace, so
//! chromedriver (and the Chromium it starts) run there too; the test talks
//! to chromedriver through a loopback relay whose outbound side joins that
//! namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod netpol;

use cluster::Cluster;
use fantoccini::{Client, ClientBuilder, Locator};
use netpol::probe::{self, Proto};
use serde_json::{Value, json};
use std::{
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// chromedriver's port inside the server's namespace (fresh, so free).
const DRIVER_PORT: u16 = 9515;
const NS: &str = "shop";

fn require_browser() {
    for (path, pkg) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: the console's browser tests need Debian's {pkg} \
             (`cargo xtask setup`, or `apt-get install chromium chromium-driver`)"
        );
    }
}

fn enter_netns(netns: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{netns}"))
        .unwrap_or_else(|e| panic!("open netns {netns}: {e}"));
    // SAFETY: setns on this thread only, with a valid namespace fd.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {netns}: {}", std::io::Error::last_os_error());
}

/// chromedriver in the server's namespace, in its own process group so
/// that the browsers it started die with it (also on panic).
struct Driver {
    child: Child,
    user_data: tempfile::TempDir,
}

impl Driver {
    fn start(netns: &str, log: &Path) -> Driver {
        let ns = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
        let mut cmd = Command::new(CHROMEDRIVER);
        unsafe {
            // SAFETY: setns is async-signal-safe; `ns` outlives spawn.
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = ns.as_raw_fd();
            cmd.process_group(0).pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .arg(format!("--port={DRIVER_PORT}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        Driver {
            child,
            user_data: tempfile::tempdir().unwrap(),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: signals our own child's process group.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// A loopback port in this (root) namespace relayed to chromedriver in
/// `netns`: each accepted connection is forwarded by a thread that joined
/// the namespace before connecting.
fn relay_to(netns: &str) -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(client) = conn else { continue };
            let netns = netns.clone();
            std::thread::spawn(move || {
                enter_netns(&netns);
                let Ok(upstream) = TcpStream::connect((Ipv4Addr::LOCALHOST, DRIVER_PORT)) else {
                    return;
                };
                let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut u2);
                    let _ = u2.shutdown(std::net::Shutdown::Write);
                });
                let (mut c, mut u) = (client, upstream);
                let _ = std::io::copy(&mut u, &mut c);
                let _ = c.shutdown(std::net::Shutdown::Write);
                let _ = up.join();
            });
        }
    });
    port
}

fn kubeconfig_field(c: &Cluster, field: &str) -> String {
    let text = std::fs::read_to_string(c.kubeconfig()).unwrap();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_owned())
        .next()
        .unwrap_or_else(|| panic!("no {field} in the kubeconfig:\n{text}"))
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir.canonicalize().unwrap()
}

async fn screenshot(b: &Client, name: &str) -> PathBuf {
    let png = b.screenshot().await.expect("take a screenshot");
    assert!(
        png.len() > 1000 && png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{name}: the screenshot is not a PNG ({} bytes)",
        png.len()
    );
    let path = screenshot_dir().join(format!("{name}.png"));
    std::fs::write(&path, &png).unwrap();
    let back = std::fs::read(&path).unwrap();
    assert_eq!(back.len(), png.len(), "{} written whole", path.display());
    println!("screenshot: {}", path.display());
    path
}

/// Evaluates `script` (a function body) in the page until it returns a
/// truthy value; panics with `what`, the last value and the page's text.
async fn until(b: &Client, what: &str, timeout: Duration, script: &str) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = b.execute(script, vec![]).await.unwrap_or(Value::Null);
        let truthy = match &v {
            Value::Null => false,
            Value::Bool(t) => *t,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if truthy {
            return v;
        }
        if Instant::now() > deadline {
            let page = b
                .execute("return document.body.innerText", vec![])
                .await
                .unwrap_or(Value::Null);
            let _ = screenshot(b, &format!("failed-{}", what.replace([' ', '/'], "-"))).await;
            panic!(
                "{what}: not seen in {timeout:?} (last: {v})\npage:\n{}",
                page.as_str().unwrap_or("")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Clicks the element `css` selects. A row the view redrew between the
/// find and the click is found again (WebDriver's stale element), up to
/// ten times.
async fn click(b: &Client, css: &str) {
    for attempt in 0.. {
        let e = b
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("find {css}: {e}"));
        match e.click().await {
            Ok(()) => return,
            Err(e) if attempt < 10 && e.to_string().contains("stale element") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("click {css}: {e}"),
        }
    }
}

fn manifests() -> Value {
    let deployment = |name: &str, containers: Value| {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"terminationGracePeriodSeconds": 1, "containers": containers}
                }
            }
        })
    };
    let serve = json!({
        "name": "serve", "image": "host",
        "command": ["skep", "tools", "serve", "--tcp", "80"],
        "ports": [{"containerPort": 80, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": 80}, "periodSeconds": 1}
    });
    // A line every 200 ms, numbered, for the live log view.
    let ticker = json!({
        "name": "ticker", "image": "host",
        "command": ["/bin/sh", "-c", "i=0; while :; do i=$((i+1)); echo \"tick $i\"; sleep 0.2; done"]
    });
    json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        deployment("web", json!([serve, ticker])),
        deployment("frontend", json!([serve])),
        deployment("intruder", json!([serve])),
        {
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "web-allow-frontend", "namespace": NS},
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                             "ports": [{"port": 80, "protocol": "TCP"}]}]
            }
        }
    ]})
}

struct AppPod {
    name: String,
    ip: Ipv4Addr,
    netns: String,
}

/// The Ready pod of each app in the test namespace.
fn app_pods(c: &Cluster) -> std::collections::BTreeMap<String, AppPod> {
    let mut out = std::collections::BTreeMap::new();
    c.wait_for(
        "the web, frontend and intruder pods Ready",
        Duration::from_secs(120),
        |c| {
            let pods: Value =
                serde_json::from_str(&c.kubectl_ok(&["get", "pods", "-n", NS, "-o", "json"]))
                    .unwrap();
            out.clear();
            for p in pods["items"].as_array().unwrap() {
                let ready = p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                let ip = p["status"]["podIP"].as_str().and_then(|s| s.parse().ok());
                if let (true, Some(ip)) = (ready, ip) {
                    out.insert(
                        p["metadata"]["labels"]["app"].as_str().unwrap().to_owned(),
                        AppPod {
                            name: p["metadata"]["name"].as_str().unwrap().to_owned(),
                            ip,
                            netns: skep_dataplane::podnet::netns_name(
                                p["metadata"]["uid"].as_str().unwrap(),
                            ),
                        },
                    );
                }
            }
            out.len() == 3
        },
    );
    out
}

/// Connections frontend → web:80 (allowed) and intruder → web:80
/// (denied) every half second until dropped.
struct Traffic(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Traffic {
    fn start(from_ok: String, from_denied: String, to: Ipv4Addr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let jobs = [
                    (from_ok.clone(), Proto::Tcp, to, 80),
                    (from_denied.clone(), Proto::Tcp, to, 80),
                ];
                probe::probe_all(&jobs);
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        Traffic(stop, Some(handle))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
        if let Some(h) = self.1.take() {
            let _ = h.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_real_browser() {
    require_browser();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = Cluster::start(1);
    c.apply(&manifests().to_string());
    let pods = app_pods(&c);
    let (web, frontend, intruder) = (&pods["web"], &pods["frontend"], &pods["intruder"]);

    // The policy is programmed asynchronously: wait until it holds.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = probe::probe_all(&[
            (frontend.netns.clone(), Proto::Tcp, web.ip, 80),
            (intruder.netns.clone(), Proto::Tcp, web.ip, 80),
        ]);
        if r[0].is_some() && r[1].is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the policy never took effect (frontend: {:?}, intruder: {:?})",
            r[0],
            r[1]
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    let server = kubeconfig_field(&c, "server");
    let token = kubeconfig_field(&c, "token");
    let server_netns = c.nodes[0].netns.clone();
    let driver = Driver::start(&server_netns, &c.dir.path().join("chromedriver.log"));
    let port = relay_to(&server_netns);
    let caps = json!({
        "browserName": "chrome",
        "acceptInsecureCerts": true,
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1440,1000",
                format!("--user-data-dir={}", driver.user_data.path().display()),
            ]
        }
    });
    let caps = match caps {
        Value::Object(m) => m,
        _ => unreachable!(),
    };
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let b = loop {
        match ClientBuilder::rustls()
            .expect("WebDriver client")
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            Ok(b) => break b,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no WebDriver session from chromedriver in 30 s: {e}\n{}",
                    std::fs::read_to_string(c.dir.path().join("chromedriver.log"))
                        .unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };

    // Sign in: a wrong token shows the API's 401, the right one the console.
    b.goto(&format!("{server}/ui/")).await.unwrap();
    until(
        &b,
        "the login form",
        Duration::from_secs(20),
        "return !document.getElementById('login').hidden",
    )
    .await;
    b.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys("not-a-token")
        .await
        .unwrap();
    click(&b, "#login-btn").await;
    let err = until(
        &b,
        "the 401 of a wrong token",
        Duration::from_secs(10),
        "return document.getElementById('login-error').textContent",
    )
    .await;
    assert!(err.as_str().unwrap().contains("401"), "{err}");
    screenshot(&b, "login").await;
    b.find(Locator::Css("#token"))
        .await
        .unwrap()
        .clear()
        .await
        .unwrap();
    b.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(&token)
        .await
        .unwrap();
    click(&b, "#login-btn").await;
    let stored = b
        .execute("return document.documentElement.outerHTML", vec![])
        .await
        .unwrap();
    assert!(
        !stored.as_str().unwrap().contains(&token),
        "the token never lands in the page"
    );

    // Overview: both nodes Ready, control-plane checks, the dataplane.
    let ready = until(
        &b,
        "both nodes Ready",
        Duration::from_secs(30),
        "const r = [...document.querySelectorAll('tr.node td.ready')].map(t => t.textContent);
         return r.length === 2 && r.every(t => t.startsWith('Ready')) ? r.join(',') : null",
    )
    .await;
    println!("nodes: {ready}");
    until(
        &b,
        "the control plane's checks",
        Duration::from_secs(20),
        "return [...document.querySelectorAll('#control-plane tr.check')].some(r => r.dataset.name === 'store')",
    )
    .await;
    // Agents publish their dataplane every 30 s.
    until(
        &b,
        "each node's dataplane programs and maps",
        Duration::from_secs(75),
        "const cards = [...document.querySelectorAll('.dataplane')];
         return cards.length === 2 && cards.every(c => c.querySelector('.programs') && c.querySelector('tr[data-map]'))
             && document.querySelector('.dataplane tr[data-map] .bar')",
    )
    .await;
    screenshot(&b, "overview").await;

    // Workloads of the namespace: the Deployment, its pod, its logs.
    b.execute(
        &format!(
            "const sel = document.getElementById('namespace');
             if (![...sel.options].some(o => o.value === '{NS}')) sel.append(new Option('{NS}', '{NS}'));
             sel.value = '{NS}'; sel.dispatchEvent(new Event('change'));"
        ),
        vec![],
    )
    .await
    .unwrap();
    click(&b, "a[data-view=workloads]").await;
    until(
        &b,
        "the web Deployment rolled out",
        Duration::from_secs(20),
        "const r = document.querySelector('tr.workload[data-kind=Deployment][data-name=web]');
         return r && r.querySelector('.rollout').textContent.includes('1/1 ready')",
    )
    .await;
    click(&b, "tr.workload[data-kind=Deployment][data-name=web]").await;
    let web_pod = &web.name;
    until(
        &b,
        "the web Deployment's pod, Running",
        Duration::from_secs(20),
        &format!(
            "const rows = [...document.querySelectorAll('#pod-table tr.pod')];
             return rows.length === 1 && rows[0].dataset.name === '{web_pod}'
                 && rows[0].querySelector('.status').textContent === 'Running'
                 && document.getElementById('pods').previousElementSibling.textContent.includes('web')"
        ),
    )
    .await;
    screenshot(&b, "workloads").await;
    click(
        &b,
        &format!("tr.pod[data-name='{web_pod}'] button.logs[data-container=ticker]"),
    )
    .await;
    let first = until(
        &b,
        "log lines of the ticker",
        Duration::from_secs(20),
        "const l = document.querySelectorAll('#log-output .log-line');
         return l.length >= 3 ? l[l.length - 1].textContent : null",
    )
    .await;
    let first_n: u64 = first
        .as_str()
        .unwrap()
        .trim_start_matches("tick ")
        .parse()
        .unwrap_or_else(|_| panic!("a tick line: {first}"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = until(
        &b,
        "new log lines streaming in",
        Duration::from_secs(10),
        &format!(
            "const l = document.querySelectorAll('#log-output .log-line');
             const last = l[l.length - 1].textContent;
             return parseInt(last.replace('tick ', '')) >= {first_n} + 5 ? last : null"
        ),
    )
    .await;
    println!("log: {first} … {later}");
    screenshot(&b, "logs").await;

    // Service map: an allowed and a denied edge from real connections.
    let traffic = Traffic::start(frontend.netns.clone(), intruder.netns.clone(), web.ip);
    click(&b, "a[data-view=map]").await;
    let forwarded =
        format!("g.edge[data-verdict=FORWARDED][data-from='{NS}/frontend'][data-to='{NS}/web']");
    let dropped =
        format!("g.edge[data-verdict=DROPPED][data-from='{NS}/intruder'][data-to='{NS}/web']");
    until(
        &b,
        "a green frontend → web and a red intruder → web edge",
        Duration::from_secs(45),
        &format!(
            "const f = document.querySelector(\"{forwarded}\"), d = document.querySelector(\"{dropped}\");
             return !!(f && d && getComputedStyle(f.querySelector('.line')).stroke !== getComputedStyle(d.querySelector('.line')).stroke)"
        ),
    )
    .await;
    let colours = b
        .execute(
            &format!(
                "return [\"{forwarded}\", \"{dropped}\"].map(s => getComputedStyle(document.querySelector(s).querySelector('.line')).stroke)"
            ),
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        colours,
        json!(["rgb(31, 157, 85)", "rgb(217, 45, 32)"]),
        "green forwarded, red dropped"
    );
    drop(traffic);
    screenshot(&b, "service-map").await;

    // The denied edge's flows and why they were dropped. A real click on
    // the SVG edge; the map may redraw under it, so retry.
    let detail = {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(e) = b.find(Locator::Css(&dropped)).await {
                let _ = e.click().await;
            }
            let text = b
                .execute(
                    "const d = document.getElementById('edge-detail');
                     return d.querySelector('tr.flow') ? d.innerText : null",
                    vec![],
                )
                .await
                .unwrap();
            if let Some(t) = text.as_str() {
                break t.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "clicking the red edge shows no flows"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    println!("denied edge:\n{detail}");
    assert!(detail.contains("DROPPED"), "{detail}");
    assert!(detail.contains(&intruder.ip.to_string()), "{detail}");
    assert!(detail.contains("policy-denied-ingress"), "{detail}");
    assert!(
        detail.contains("default deny (no policy admits it)") || detail.contains("dropped by"),
        "the reason is named: {detail}"
    );
    assert!(
        detail.contains("web-allow-frontend"),
        "the policy isolating web is named: {detail}"
    );
    screenshot(&b, "service-map-denied-edge").await;
    click(
        &b,
        &format!("tr.edge-row[data-key='{NS}/frontend|{NS}/web|FORWARDED']"),
    )
    .await;
    let allowed = until(
        &b,
        "the allowed edge's policy",
        Duration::from_secs(10),
        "const p = document.querySelector('#edge-detail .policy');
         return p && p.textContent.startsWith('allowed') ? p.textContent : null",
    )
    .await;
    assert!(
        allowed.as_str().unwrap().contains("web-allow-frontend"),
        "the allowing policy is named: {allowed}"
    );
    screenshot(&b, "service-map-allowed-edge").await;

    // Network policies: what the policy selects, per-pod isolation.
    click(&b, "a[data-view=policies]").await;
    until(
        &b,
        "the policy selecting the web pod",
        Duration::from_secs(15),
        &format!(
            "const r = document.querySelector('tr.policy[data-name=web-allow-frontend]');
             const iso = document.querySelector(\"tr.pod-isolation[data-name='{web_pod}'] .ingress\");
             return r && r.querySelector('.selected-pods').textContent === '{web_pod}'
                 && iso && iso.textContent.startsWith('isolated')"
        ),
    )
    .await;
    screenshot(&b, "policies").await;

    // Events, live from the watch.
    click(&b, "a[data-view=events]").await;
    until(
        &b,
        "events of the namespace",
        Duration::from_secs(15),
        "return document.querySelectorAll('#events tr.event').length",
    )
    .await;
    screenshot(&b, "events").await;

    at_scale(&b, &c, frontend, web).await;

    b.close().await.unwrap();
    drop(driver);
}

/// Pods of the scale check: unschedulable on purpose (no node has the
/// label), so 1,000 of them are real API objects without 1,000 processes.
const BULK_PODS: usize = 1000;
/// The connection rate and duration of the scale check (bounded: at most
/// `FLOW_RATE × FLOW_SECS` connections, all inside the test's namespaces).
const FLOW_RATE: u64 = 100;
const FLOW_SECS: u64 = 15;

/// CPU time (user + system, clock ticks) of a process.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after ')'.
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// New TCP connections from `netns` to `to:80` at `FLOW_RATE`/s for
/// `FLOW_SECS`; returns how many were accepted.
fn connection_burst(netns: String, to: Ipv4Addr) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        enter_netns(&netns);
        let start = Instant::now();
        let total = FLOW_RATE * FLOW_SECS;
        let mut ok = 0;
        for i in 0..total {
            // Paced against the start, so a slow connect does not lower
            // the rate of the rest.
            let due = start + Duration::from_micros(i * 1_000_000 / FLOW_RATE);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if TcpStream::connect_timeout(&(to, 80).into(), Duration::from_secs(1)).is_ok() {
                ok += 1;
            }
            if start.elapsed() > Duration::from_secs(FLOW_SECS + 10) {
                break;
            }
        }
        ok
    })
}

/// The console with 1,000 pods and a flow stream of ~100 flows/s: the
/// workloads view lists the 1,000 pods (its table capped, the count
/// exact), the service map receives every flow of the burst, the page
/// makes no polling requests meanwhile and stays interactive. The
/// figures (render time, event-loop lag, long tasks, heap, server CPU) go
/// to target/console-screenshots/scale.json; they are reported, not
/// asserted.
async fn at_scale(b: &Client, c: &Cluster, frontend: &AppPod, web: &AppPod) {
    let bulk = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "bulk", "namespace": NS},
        "spec": {
            "replicas": BULK_PODS,
            "selector": {"matchLabels": {"app": "bulk"}},
            "template": {
                "metadata": {"labels": {"app": "bulk"}},
                "spec": {
                    "nodeSelector": {"skep.io/console-test": "no-such-node"},
                    "containers": [{"name": "idle", "image": "host", "command": ["sleep", "3600"]}]
                }
            }
        }
    });
    let created = Instant::now();
    c.apply(&bulk.to_string());
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let names = c.kubectl_ok(&["get", "pods", "-n", NS, "-l", "app=bulk", "-o", "name"]);
        let n = names.lines().count();
        if n == BULK_PODS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bulk Deployment made {n} of {BULK_PODS} pods in 240 s"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    let create_s = created.elapsed().as_secs_f64();
    println!("{BULK_PODS} pods created in {create_s:.1} s");

    // The workloads view: the Deployment's 1,000 pods, drawn capped.
    click(b, "a[data-view=workloads]").await;
    let t = Instant::now();
    until(
        b,
        "the bulk Deployment in the workloads view",
        Duration::from_secs(30),
        "return !!document.querySelector('tr.workload[data-kind=Deployment][data-name=bulk]')",
    )
    .await;
    click(b, "tr.workload[data-kind=Deployment][data-name=bulk]").await;
    let note = until(
        b,
        "the bulk Deployment's 1,000 pods",
        Duration::from_secs(30),
        &format!(
            "const title = document.getElementById('pods').previousElementSibling.textContent;
             const note = [...document.querySelectorAll('#pods p.note')].map(n => n.textContent).join(' ');
             const rows = document.querySelectorAll('#pod-table tr.pod').length;
             return title.includes('bulk') && note.includes('of {BULK_PODS} pods') && rows > 0 && rows <= 200
                 ? note + ' (' + rows + ' rows)' : null"
        ),
    )
    .await;
    let render_ms = t.elapsed().as_secs_f64() * 1000.0;
    println!("workloads view: {note}, drawn in {render_ms:.0} ms");
    let pending = b
        .execute(
            "return [...document.querySelectorAll('#pod-table tr.pod .status')].every(s => s.textContent === 'Pending')",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(pending, json!(true), "the unschedulable pods show Pending");
    screenshot(b, "scale-workloads").await;

    // The service map under a burst of new connections.
    click(b, "a[data-view=map]").await;
    let received = |v: &Value| -> u64 {
        v.as_str()
            .and_then(|t| t.strip_prefix("live: "))
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let before = until(
        b,
        "the service map's live flow stream",
        Duration::from_secs(20),
        "const t = document.getElementById('map-status').textContent;
         return t.startsWith('live: ') ? t : null",
    )
    .await;
    // Quiet first: the stream replays the last minutes, then settles.
    let mut start_count = received(&before);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = received(
            &b.execute(
                "return document.getElementById('map-status').textContent",
                vec![],
            )
            .await
            .unwrap(),
        );
        if now == start_count {
            break;
        }
        start_count = now;
    }
    let server_pid = c.nodes[0].pid().expect("the server node runs");
    // Let the control plane finish with the 1,000 pods (their scheduling
    // status, the ReplicaSet's count) so the burst's CPU is the flows':
    // a few seconds in a row at under 15 % of a core, for at most 60 s.
    let (mut quiet, mut idle_percent) = (0, 100.0);
    let settle = Instant::now();
    while quiet < 3 && settle.elapsed() < Duration::from_secs(60) {
        let t = cpu_ticks(server_pid);
        tokio::time::sleep(Duration::from_secs(1)).await;
        idle_percent = 100.0 * (cpu_ticks(server_pid) - t) as f64 / clock_ticks() as f64;
        quiet = if idle_percent < 15.0 { quiet + 1 } else { 0 };
    }
    println!(
        "server CPU before the burst: {idle_percent:.1} % (settled after {:.1} s)",
        settle.elapsed().as_secs_f64()
    );
    // Page-side probes: event-loop lag (a 50 ms timer's lateness), long
    // tasks, and every request the page starts from now on.
    b.execute(
        "window.__scale = { lag: [], long: [], t0: performance.now() };
         let last = performance.now();
         window.__scale.timer = setInterval(() => {
           const n = performance.now(); window.__scale.lag.push(n - last - 50); last = n;
         }, 50);
         try {
           new PerformanceObserver((l) => l.getEntries().forEach((e) => window.__scale.long.push(e.duration)))
             .observe({ type: 'longtask' });
         } catch (_) {}",
        vec![],
    )
    .await
    .unwrap();
    let cpu0 = cpu_ticks(server_pid);
    let t0 = Instant::now();
    let accepted = tokio::task::spawn_blocking({
        let h = connection_burst(frontend.netns.clone(), web.ip);
        move || h.join().expect("the connection burst")
    })
    .await
    .unwrap();
    let burst_s = t0.elapsed().as_secs_f64();
    let cpu_s = (cpu_ticks(server_pid) - cpu0) as f64 / clock_ticks() as f64;
    let attempted = FLOW_RATE * FLOW_SECS;
    assert!(
        accepted >= attempted * 95 / 100,
        "only {accepted} of {attempted} allowed connections frontend → web were accepted"
    );
    // Every accepted connection is at least one FORWARDED flow into web.
    let expect = start_count + accepted;
    let after = until(
        b,
        "every flow of the burst in the service map",
        Duration::from_secs(30),
        &format!(
            "const t = document.getElementById('map-status').textContent;
             const n = parseInt(t.replace('live: ', ''));
             return n >= {expect} ? t : null"
        ),
    )
    .await;
    let delivered = received(&after) - start_count;
    let page = b
        .execute(
            "clearInterval(window.__scale.timer);
             const s = window.__scale;
             const lag = s.lag.slice().sort((a, b) => a - b);
             const reqs = performance.getEntriesByType('resource')
               .filter((e) => e.startTime >= s.t0).map((e) => e.name);
             return {
               lag_p50_ms: lag[Math.floor(lag.length / 2)] || 0,
               lag_p99_ms: lag[Math.floor(lag.length * 0.99)] || 0,
               lag_max_ms: lag[lag.length - 1] || 0,
               long_tasks: s.long.length,
               long_task_ms: s.long.reduce((a, b) => a + b, 0),
               heap_mb: performance.memory ? performance.memory.usedJSHeapSize / 1048576 : null,
               requests: reqs,
               edges: document.querySelectorAll('g.edge').length,
             };",
            vec![],
        )
        .await
        .unwrap();
    println!("service map under load: {page}");
    let requests = page["requests"].as_array().map(Vec::len).unwrap_or(0);
    assert!(
        requests <= 5,
        "the page polled during the burst ({requests} requests): {}",
        page["requests"]
    );
    screenshot(b, "scale-service-map").await;
    // Still interactive: the busy edge opens its flows.
    let edge =
        format!("g.edge[data-verdict=FORWARDED][data-from='{NS}/frontend'][data-to='{NS}/web']");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(e) = b.find(Locator::Css(&edge)).await {
            let _ = e.click().await;
        }
        let shown = b
            .execute(
                "return !!document.querySelector('#edge-detail tr.flow')",
                vec![],
            )
            .await
            .unwrap();
        if shown == json!(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the busy edge does not open its flows"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let figures = json!({
        "pods": BULK_PODS,
        "pods_created_s": create_s,
        "workloads_view_ms": render_ms,
        "connections": accepted,
        "burst_s": burst_s,
        "flows_delivered": delivered,
        "flows_per_s": delivered as f64 / burst_s,
        "server_cpu_percent": 100.0 * cpu_s / burst_s,
        "server_cpu_percent_before": idle_percent,
        "page": page,
    });
    let path = screenshot_dir().join("scale.json");
    std::fs::write(&path, serde_json::to_string_pretty(&figures).unwrap()).unwrap();
    println!("scale figures ({}): {figures}", path.display());
}
