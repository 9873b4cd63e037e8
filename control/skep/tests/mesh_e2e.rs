//! [mesh] end to end in a real cluster (tests/cluster: the node is a
//! network namespace; pods are process-runtime pods with their own
//! namespaces and cgroups): the kubelet injects the sidecar into pods of a
//! namespace labelled `skep.io/mesh=enabled`, `mesh_connect4` on the pod's
//! cgroup v2 directory captures the app's connections, the sidecars talk
//! mTLS.
//!
//! One cluster, checks in order: the client reaches the server by Service
//! name; a capture on the server pod's host veth sees TLS records and never
//! the payload; the server's sidecar counts the client's verified identity;
//! `skep ctl mesh status` shows identities and expiry; an unmeshed pod
//! reaches the server in permissive mode and is refused in strict mode
//! while the meshed client still gets through; a meshed Job completes; a
//! SIGKILLed sidecar is restarted and traffic recovers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use cluster::Cluster;
use std::{
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

const SIDECAR: &str = "skep-mesh-proxy";
const SECRET: &str = "MESH-SECRET-PAYLOAD-4242";

const WORKLOADS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: meshed
  labels: {skep.io/mesh: enabled}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: meshed}
spec:
  replicas: 1
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: echo
        image: host
        command: [skep, tools, serve, --tcp, "7000"]
        readinessProbe: {tcpSocket: {port: 7000}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: meshed}
spec:
  selector: {app: echo}
  ports: [{name: tcp, port: 7000, targetPort: 7000}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: meshed}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: host
    command: [sleep, infinity]
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: plain}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: host
    command: [sleep, infinity]
"#;

const JOB: &str = r#"
apiVersion: batch/v1
kind: Job
metadata: {name: once, namespace: meshed}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      terminationGracePeriodSeconds: 1
      containers:
      - name: work
        image: host
        command: [skep, tools, probe, tcp, "echo:7000", --timeout, 3s, --tries, "5"]
"#;

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `kubectl exec` in a pod's app container.
fn exec(c: &Cluster, ns: &str, pod: &str, cmd: &[&str]) -> (bool, String) {
    let mut args = vec!["-n", ns, "exec", pod, "-c", "app", "--"];
    args.extend_from_slice(cmd);
    let out = c.kubectl(&args);
    (out.status.success(), text(&out))
}

/// Retries a probe from a pod until it succeeds (the first connections of
/// a fresh pod may race its Service/endpoint programming).
fn probe_ok(c: &Cluster, ns: &str, pod: &str, target: &str, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = exec(
            c,
            ns,
            pod,
            &["skep", "tools", "probe", "tcp", target, "--timeout", "3s"],
        );
        if ok && out.contains("OK") {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {pod} never reached {target}; last answer: {out}\nnode log:\n{}",
            tail(&c.nodes[0].log(), 80)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn wait_deploy_pod(c: &Cluster, ns: &str, label: &str, not: &str) -> String {
    let mut name = String::new();
    c.wait_for(
        &format!("a Ready pod {label} other than {not:?}"),
        Duration::from_secs(90),
        |c| {
            let out = c.kubectl(&[
                "-n", ns, "get", "pods", "-l", label, "-o",
                "jsonpath={range .items[*]}{.metadata.name} {.metadata.deletionTimestamp} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
            ]);
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() == 2 && f[0] != not && f[1] == "True" {
                    name = f[0].to_owned();
                    return true;
                }
            }
            false
        },
    );
    name
}

/// An AF_PACKET capture of every frame on an interface of a namespace.
struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    fn start(netns: &str, iface: &str) -> Self {
        let ns = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
        let ifname = std::ffi::CString::new(iface).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            // SAFETY: syscalls on fds this thread owns; buffers valid for
            // the lengths passed.
            unsafe {
                assert_eq!(
                    libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET),
                    0,
                    "setns into the node"
                );
                let proto = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
                assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = libc::if_nametoindex(ifname.as_ptr()) as i32;
                assert!(sll.sll_ifindex > 0, "no interface {ifname:?} in the node");
                assert_eq!(
                    libc::bind(
                        fd,
                        (&sll as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    ),
                    0
                );
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                tx.send(()).unwrap();
                let mut frames = Vec::new();
                let mut buf = vec![0u8; 70_000];
                // Bounded: at most 2 minutes or 100k frames.
                let until = Instant::now() + Duration::from_secs(120);
                while !stop2.load(Ordering::Relaxed)
                    && Instant::now() < until
                    && frames.len() < 100_000
                {
                    let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                    if n > 0 {
                        frames.push(buf[..n as usize].to_vec());
                    }
                }
                libc::close(fd);
                frames
            }
        });
        rx.recv().unwrap();
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// TCP segments seen: (src port, dst port, payload).
    fn finish(mut self) -> Vec<(u16, u16, Vec<u8>)> {
        self.stop.store(true, Ordering::Relaxed);
        let frames = self.thread.take().unwrap().join().unwrap();
        frames
            .iter()
            .filter_map(|f| {
                if f.len() < 34 || f[12..14] != [0x08, 0x00] {
                    return None;
                }
                let ip = &f[14..];
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                if ip[9] != 6 || ip.len() < ihl + 20 {
                    return None;
                }
                let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
                let tcp = &ip[ihl..total];
                let off = usize::from(tcp[12] >> 4) * 4;
                Some((
                    u16::from_be_bytes([tcp[0], tcp[1]]),
                    u16::from_be_bytes([tcp[2], tcp[3]]),
                    tcp.get(off..)?.to_vec(),
                ))
            })
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The host processes of a pod's container whose command line contains
/// `needle` (found through the pod UID in their cgroup path).
fn pod_pids(uid: &str, needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cg.contains(uid) && cmd.contains(needle) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn meshed_pods_talk_mtls_through_the_ebpf_capture() {
    let c = Cluster::start(0);
    c.apply(WORKLOADS);
    c.wait_ready("meshed", "client");
    c.wait_ready("plain", "outsider");
    let server = wait_deploy_pod(&c, "meshed", "app=echo", "");

    // Injection: the status shows the native sidecar, ready.
    let sidecars = c.jsonpath(
        "meshed",
        "pod/client",
        "{.status.initContainerStatuses[*].name} {.status.initContainerStatuses[*].ready}",
    );
    assert_eq!(
        sidecars,
        format!("{SIDECAR} true"),
        "the meshed client's status lists the injected sidecar"
    );
    let plain = c.jsonpath("plain", "pod/outsider", "{.status.initContainerStatuses}");
    assert!(plain.is_empty(), "unmeshed namespace: no sidecar ({plain})");

    let server_uid = c.jsonpath("meshed", &format!("pod/{server}"), "{.metadata.uid}");
    let server_ip = c.jsonpath("meshed", &format!("pod/{server}"), "{.status.podIP}");
    let veth = skep_dataplane::podnet::host_veth_name(&server_uid);

    // 1. By Service name, captured by connect4 and carried over mTLS; the
    //    wire shows TLS records only.
    let cap = Capture::start(&c.nodes[0].netns, &veth);
    let out = probe_ok(
        &c,
        "meshed",
        "client",
        "echo:7000",
        "meshed client → Service",
    );
    assert!(out.contains(&server), "answered by the server pod: {out}");
    let (ok, out) = exec(
        &c,
        "meshed",
        "client",
        &[
            "sh",
            "-c",
            &format!("echo {SECRET} | busybox nc -w 3 echo.meshed.svc.cluster.local 7000"),
        ],
    );
    assert!(ok && out.contains(SECRET), "echo through the mesh: {out}");
    std::thread::sleep(Duration::from_millis(300));
    let segments = cap.finish();
    eprintln!(
        "capture on {veth}: {} TCP segments, {} with payload",
        segments.len(),
        segments.iter().filter(|(_, _, p)| !p.is_empty()).count()
    );
    let to_inbound: Vec<_> = segments
        .iter()
        .filter(|(_, d, p)| *d == 15006 && !p.is_empty())
        .collect();
    assert!(
        !to_inbound.is_empty(),
        "traffic to the server went to its sidecar's port 15006 ({} segments seen)",
        segments.len()
    );
    assert!(
        to_inbound
            .iter()
            .any(|(_, _, p)| p[0] == 0x16 && p[1] == 0x03),
        "a TLS handshake record on the wire"
    );
    assert!(
        segments
            .iter()
            .any(|(s, _, p)| *s == 15006 && p.len() > 5 && p[0] == 0x17 && p[1] == 0x03),
        "TLS application data records from the server's sidecar"
    );
    for (s, d, p) in &segments {
        assert!(
            !p.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "plaintext payload on the wire ({s} → {d})"
        );
        assert!(
            *d != 7000 || p.is_empty(),
            "the app port was reached directly on the wire ({s} → {d})"
        );
    }

    // 2. The server's sidecar saw the client's verified identity.
    let metrics = c.in_node(
        0,
        &[
            "curl",
            "-s",
            "--max-time",
            "3",
            &format!("http://{server_ip}:15020/metrics"),
        ],
    );
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("skep_mesh_connections_total")
                && l.contains("inbound")
                && l.contains("spiffe://cluster.local/ns/meshed/sa/default")),
        "server sidecar metrics by peer identity:\n{metrics}"
    );

    // 3. `skep ctl mesh status`: identity and expiry (the kubelet publishes
    //    them from the sidecar).
    c.wait_for("mesh identity annotations", Duration::from_secs(30), |c| {
        c.jsonpath(
            "meshed",
            "pod/client",
            "{.metadata.annotations.skep\\.io/mesh-identity}",
        ) == "spiffe://cluster.local/ns/meshed/sa/default"
    });
    let status = c.ctl(&["mesh", "status"]);
    let status_text = text(&status);
    eprintln!("skep ctl mesh status:\n{status_text}");
    assert!(status.status.success(), "ctl mesh status: {status_text}");
    assert!(
        status_text.contains("meshed") && status_text.contains("permissive"),
        "{status_text}"
    );
    let client_line = status_text
        .lines()
        .find(|l| l.contains(" client "))
        .unwrap_or_else(|| panic!("client row in:\n{status_text}"));
    assert!(
        client_line.contains("spiffe://cluster.local/ns/meshed/sa/default")
            && client_line.contains('T')
            && client_line.trim_end().ends_with('Z'),
        "identity and expiry: {client_line}"
    );

    // 4. Permissive: the unmeshed pod reaches the meshed server.
    probe_ok(
        &c,
        "plain",
        "outsider",
        "echo.meshed:7000",
        "unmeshed client, permissive",
    );

    // 5. Strict: restart the server under the strict label.
    c.kubectl_ok(&["label", "namespace", "meshed", "skep.io/mesh-mode=strict"]);
    c.kubectl_ok(&["-n", "meshed", "delete", "pod", &server, "--wait=false"]);
    let strict_server = wait_deploy_pod(&c, "meshed", "app=echo", &server);
    let strict_ip = c.jsonpath("meshed", &format!("pod/{strict_server}"), "{.status.podIP}");
    // The Service may still list the old endpoint for a moment.
    c.wait_for(
        "endpoint moved to the strict server",
        Duration::from_secs(30),
        |c| {
            c.jsonpath(
                "meshed",
                "endpointslices",
                "{.items[*].endpoints[*].addresses[*]}",
            )
            .split_whitespace()
            .collect::<Vec<_>>()
                == vec![strict_ip.as_str()]
        },
    );
    let out = probe_ok(&c, "meshed", "client", "echo:7000", "meshed client, strict");
    assert!(out.contains(&strict_server), "{out}");
    let (ok, out) = exec(
        &c,
        "plain",
        "outsider",
        &[
            "skep",
            "tools",
            "probe",
            "tcp",
            &format!("{strict_ip}:7000"),
            "--timeout",
            "2s",
            "--expect-fail",
        ],
    );
    assert!(ok, "strict mode refuses the unmeshed client: {out}");
    let (ok, out) = exec(
        &c,
        "plain",
        "outsider",
        &[
            "skep",
            "tools",
            "probe",
            "tcp",
            "echo.meshed:7000",
            "--timeout",
            "2s",
            "--expect-fail",
        ],
    );
    assert!(
        ok,
        "strict mode refuses the unmeshed client via the Service: {out}"
    );

    // 6. A meshed Job completes (its sidecar stops with the app).
    c.apply(JOB);
    c.wait_for("the meshed Job completes", Duration::from_secs(90), |c| {
        c.jsonpath("meshed", "job/once", "{.status.succeeded}") == "1"
    });
    let job_pod = c.kubectl_ok(&[
        "-n",
        "meshed",
        "get",
        "pods",
        "-l",
        "job-name=once",
        "-o",
        "jsonpath={.items[0].status.phase} {.items[0].status.initContainerStatuses[0].name}",
    ]);
    assert_eq!(job_pod, format!("Succeeded {SIDECAR}"), "job pod");

    // 7. A killed sidecar is restarted and traffic recovers.
    let client_uid = c.jsonpath("meshed", "pod/client", "{.metadata.uid}");
    let pids = pod_pids(&client_uid, " sidecar ");
    assert!(!pids.is_empty(), "the client's sidecar process");
    for pid in &pids {
        // SAFETY: plain kill(2) of a process of this test's cluster.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    c.wait_for("the sidecar restarted and ready", Duration::from_secs(60), |c| {
        let st = c.jsonpath(
            "meshed",
            "pod/client",
            "{.status.initContainerStatuses[0].restartCount} {.status.initContainerStatuses[0].ready}",
        );
        st.split_whitespace().next().and_then(|n| n.parse::<u32>().ok()).unwrap_or(0) >= 1
            && st.ends_with("true")
    });
    probe_ok(
        &c,
        "meshed",
        "client",
        "echo:7000",
        "after the sidecar restart",
    );
}

/// Two nodes: the meshed client on the server's node, the meshed server on
/// the agent's. The client's node learns the remote pod is meshed (the
/// kubelet's remote-peer watch), so the hop across nodes is mTLS too.
#[test]
fn meshed_pods_on_two_nodes_talk_mtls() {
    let c = Cluster::start(1);
    let (here, there) = (c.nodes[0].name.clone(), c.nodes[1].name.clone());
    c.apply(&format!(
        r#"
apiVersion: v1
kind: Namespace
metadata:
  name: meshed
  labels: {{skep.io/mesh: enabled}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo, namespace: meshed}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: echo}}}}
  template:
    metadata: {{labels: {{app: echo}}}}
    spec:
      terminationGracePeriodSeconds: 1
      nodeSelector: {{kubernetes.io/hostname: {there}}}
      containers:
      - name: echo
        image: host
        command: [skep, tools, serve, --tcp, "7000"]
        readinessProbe: {{tcpSocket: {{port: 7000}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: meshed}}
spec:
  selector: {{app: echo}}
  ports: [{{name: tcp, port: 7000, targetPort: 7000}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: meshed}}
spec:
  terminationGracePeriodSeconds: 1
  nodeSelector: {{kubernetes.io/hostname: {here}}}
  containers:
  - name: app
    image: host
    command: [sleep, infinity]
"#
    ));
    c.wait_ready("meshed", "client");
    let server = wait_deploy_pod(&c, "meshed", "app=echo", "");
    assert_eq!(
        c.jsonpath("meshed", &format!("pod/{server}"), "{.spec.nodeName}"),
        there
    );
    let server_uid = c.jsonpath("meshed", &format!("pod/{server}"), "{.metadata.uid}");
    let veth = skep_dataplane::podnet::host_veth_name(&server_uid);
    // The client's node learns from the server's status (its sidecar) that
    // the remote pod is meshed.
    let server_ip: std::net::Ipv4Addr = c
        .jsonpath("meshed", &format!("pod/{server}"), "{.status.podIP}")
        .parse()
        .unwrap();
    c.wait_for(
        "the remote server in the client node's mesh table",
        Duration::from_secs(30),
        |c| {
            skep_dataplane::mesh::MeshPods::open(&c.nodes[0].bpf_root)
                .map(|m| m.list().iter().any(|p| p.addr == server_ip && !p.strict))
                .unwrap_or(false)
        },
    );
    let cap = Capture::start(&c.nodes[1].netns, &veth);
    probe_ok(&c, "meshed", "client", "echo:7000", "across nodes");
    let (_, out) = exec(
        &c,
        "meshed",
        "client",
        &[
            "sh",
            "-c",
            &format!("echo {SECRET} | busybox nc -w 3 echo.meshed.svc.cluster.local 7000"),
        ],
    );
    assert!(out.contains(SECRET), "echo across nodes: {out}");
    std::thread::sleep(Duration::from_millis(300));
    let segments = cap.finish();
    assert!(
        segments
            .iter()
            .any(|(_, d, p)| *d == 15006 && p.len() > 5 && p[0] == 0x16),
        "a TLS handshake to the remote sidecar ({} segments)",
        segments.len()
    );
    for (s, d, p) in &segments {
        assert!(
            !p.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "plaintext payload crossed the nodes ({s} → {d})"
        );
        assert!(
            *d != 7000 || p.is_empty(),
            "the app port was reached directly ({s} → {d})"
        );
    }
}
