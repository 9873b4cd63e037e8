//! Pods reaching an address outside the cluster leave with their node's
//! address (source NAT), while pod-to-pod traffic keeps the pod address.
//! The "outside" is an address on the test cluster's own bridge.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use cluster::Cluster;
use std::{
    net::{Ipv4Addr, UdpSocket},
    time::Duration,
};

const OUTSIDE: &str = "192.168.77.250";

/// A UDP server in the switch namespace answering each datagram with the
/// source address it came from.
fn outside_echo(switch: &str) -> std::thread::JoinHandle<()> {
    let out = std::process::Command::new("ip")
        .args([
            "-n",
            switch,
            "addr",
            "add",
            &format!("{OUTSIDE}/24"),
            "dev",
            "br0",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let netns = format!("/run/netns/{switch}");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&netns).unwrap();
        // SAFETY: setns on this thread only, with a valid namespace fd.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let s = UdpSocket::bind((OUTSIDE, 9999)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut buf = [0u8; 64];
        // Bounded: a few datagrams, then the thread ends.
        for _ in 0..8 {
            let Ok((_, from)) = s.recv_from(&mut buf) else {
                return;
            };
            let _ = s.send_to(from.ip().to_string().as_bytes(), from);
        }
    })
}

/// From inside `netns`: the source address the outside server saw.
fn seen_from(netns: &str, target: &str) -> Option<String> {
    let (netns, target) = (netns.to_owned(), target.to_owned());
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        for _ in 0..3 {
            s.send_to(b"who", &target).unwrap();
            let mut buf = [0u8; 64];
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    })
    .join()
    .unwrap()
}

#[test]
fn pods_leave_the_cluster_with_the_node_address() {
    let c = Cluster::start(0);
    let _server = outside_echo(&c.switch);
    c.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: out, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {name: c, image: host, command: [sleep, infinity]}
"#,
    );
    c.wait_ready("default", "out");
    let uid = c.jsonpath("default", "pod/out", "{.metadata.uid}");
    let pod_ip: Ipv4Addr = c
        .jsonpath("default", "pod/out", "{.status.podIP}")
        .parse()
        .unwrap();
    let netns = skep_dataplane::podnet::netns_name(&uid);
    assert_eq!(
        seen_from(&netns, &format!("{OUTSIDE}:9999")).as_deref(),
        Some(c.nodes[0].ip.as_str()),
        "the outside saw the node address, not the pod's {pod_ip}"
    );
    // The rule is skep's own chain, once.
    let rules = c.in_node(0, &["iptables", "-t", "nat", "-S"]);
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert_eq!(
        rules.matches("-A POSTROUTING -j SKEP-MASQ").count(),
        1,
        "{rules}"
    );
    assert!(
        rules.contains("! -d 10.42.0.0/16") && rules.contains("-j MASQUERADE"),
        "{rules}"
    );
}
