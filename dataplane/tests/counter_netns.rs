//! End-to-end proof of the eBPF toolchain: the `tc_count` program, built by
//! `cargo xtask build-ebpf` and embedded in this crate, is loaded into the
//! kernel and attached to the host side of a veth pair inside a fresh
//! network namespace; real UDP traffic from a "pod" namespace must show up
//! in its map. Everything lives in namespaces this test creates (and
//! deletes, even on panic), so no packet touches the host's network.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use skep_dataplane::{Direction, NetNs, PacketCounter};
use std::{net::UdpSocket, process::Command, time::Duration};

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run `ip` (package iproute2; `cargo xtask setup` installs it)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tc_count_counts_real_packets_on_a_veth_in_a_netns() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads BPF programs and creates network namespaces: run it as root"
    );
    let tag = std::process::id();
    let node = NetNs::create(&format!("skep-t{tag}-node")).expect("create node netns");
    let pod = NetNs::create(&format!("skep-t{tag}-pod")).expect("create pod netns");

    // Host-side veth in the node namespace, pod side (eth0) in the pod one.
    ip(&[
        "-n",
        node.name(),
        "link",
        "add",
        "vh-test",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod.name(),
    ]);
    // No IPv6 on the pod side: its autoconfiguration (MLD reports, router
    // solicitations) reaches the hook at random times, e.g. before the
    // "no packet yet" check below (seen on Linux 5.10 under qemu). /proc/sys/net
    // belongs to the network namespace of the thread that opens it.
    pod.run(|| {
        match std::fs::write("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", "1") {
            // A kernel without IPv6 sends no IPv6 packets either.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    })
    .expect("enter pod netns")
    .expect("disable IPv6 on the pod's eth0");
    ip(&[
        "-n",
        node.name(),
        "addr",
        "add",
        "10.42.250.1/30",
        "dev",
        "vh-test",
    ]);
    ip(&["-n", node.name(), "link", "set", "vh-test", "up"]);
    ip(&[
        "-n",
        pod.name(),
        "addr",
        "add",
        "10.42.250.2/30",
        "dev",
        "eth0",
    ]);
    ip(&["-n", pod.name(), "link", "set", "eth0", "up"]);

    let mut counter =
        PacketCounter::load().expect("load tc_count (did `cargo xtask build-ebpf` run?)");
    let ifindex = node
        .run(|| -> Result<u32, skep_dataplane::DataplaneError> {
            counter.attach("vh-test", Direction::Ingress)?;
            Ok(nix::net::if_::if_nametoindex("vh-test").expect("ifindex of vh-test"))
        })
        .expect("enter node netns")
        .expect("attach tc_count");
    assert_eq!(counter.stats(ifindex).unwrap(), None, "no packet yet");

    // A receiver on the node side proves the datagrams really crossed.
    const PACKETS: usize = 200;
    const PAYLOAD: usize = 100;
    let received = std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            node.run(|| {
                let sock = UdpSocket::bind("10.42.250.1:7777").expect("bind receiver");
                sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut buf = [0u8; 2048];
                let mut n = 0;
                while n < PACKETS {
                    match sock.recv(&mut buf) {
                        Ok(_) => n += 1,
                        Err(_) => break,
                    }
                }
                n
            })
            .unwrap()
        });
        std::thread::sleep(Duration::from_millis(200));
        pod.run(|| {
            let sock = UdpSocket::bind("10.42.250.2:0").unwrap();
            for _ in 0..PACKETS {
                sock.send_to(&[0xab; PAYLOAD], "10.42.250.1:7777").unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
        })
        .unwrap();
        receiver.join().unwrap()
    });
    assert!(
        received > PACKETS * 9 / 10,
        "only {received} of {PACKETS} datagrams arrived"
    );

    let stats = counter
        .stats(ifindex)
        .unwrap()
        .expect("tc_count saw the traffic");
    // Every datagram that arrived passed the ingress hook (plus ARP).
    assert!(
        stats.packets >= received as u64,
        "counted {} packets, {} datagrams arrived",
        stats.packets,
        received
    );
    assert!(
        stats.packets < received as u64 + 50,
        "counted {} packets for {received} datagrams",
        stats.packets
    );
    assert!(
        stats.bytes >= (received * (PAYLOAD + 28)) as u64,
        "bytes {}",
        stats.bytes
    );

    drop(counter);
    node.delete().expect("delete node netns");
    pod.delete().expect("delete pod netns");
    assert!(!std::path::Path::new(&format!("/run/netns/skep-t{tag}-node")).exists());
}
