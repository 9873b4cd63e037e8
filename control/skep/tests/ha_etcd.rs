//! HA on etcd: two `skep server`s on a real 3-member etcd cluster. The
//! second adopts the first's credentials from the store; one controller
//! set is active (Lease); killing the active server hands the controllers
//! to the other, killing an etcd member keeps the cluster writable, and no
//! object is lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Server;
use skep_store::LocalEtcd;
use std::time::{Duration, Instant};

const K: &str = "1.33";

fn wait(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn lease_holder(s: &Server) -> String {
    s.k(
        K,
        &[
            "-n",
            "kube-system",
            "get",
            "lease",
            "skep-controller-manager",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
    )
}

/// Pods the ReplicaSet controller made for deployment `name`.
fn pods_of(s: &Server, name: &str) -> usize {
    s.kubectl(
        K,
        &["get", "pods", "-l", &format!("app={name}"), "-o", "name"],
    )
    .stdout
    .split(|&b| b == b'\n')
    .filter(|l| !l.is_empty())
    .count()
}

#[test]
fn two_servers_on_three_etcd_members_survive_losing_the_leader_and_a_member() {
    let mut etcd = LocalEtcd::start_cluster(3).expect("a 3-member etcd (etcd-server from apt)");
    let endpoints = etcd
        .iter()
        .map(LocalEtcd::endpoint)
        .collect::<Vec<_>>()
        .join(",");
    let args = [
        "--no-agent",
        "--store",
        "etcd",
        "--etcd-endpoints",
        &endpoints,
    ];
    let a = Server::start_with(&args);
    let b = Server::start_with(&args);
    let read = |s: &Server, f: &str| std::fs::read_to_string(s.dir.path().join(f)).unwrap();
    for f in ["tls/ca.crt", "tls/sa.key", "admin-token", "node-token"] {
        assert_eq!(
            read(&a, f),
            read(&b, f),
            "{f}: the second server adopted the cluster's"
        );
    }
    let mut servers = [a, b];

    // Objects written through one server are seen through the other.
    servers[0].k(
        K,
        &[
            "create",
            "deployment",
            "web",
            "--image=host",
            "--replicas=2",
        ],
    );
    servers[1].k(K, &["get", "deployment", "web"]);
    for i in 0..10 {
        servers[i % 2].k(K, &["create", "configmap", &format!("before-{i}")]);
    }
    wait(
        "the ReplicaSet controller to make web's 2 pods",
        Duration::from_secs(30),
        || pods_of(&servers[1], "web") == 2,
    );

    // Exactly one controller set: the Lease names one server's identity.
    let holder = lease_holder(&servers[0]);
    let leader = servers
        .iter()
        .position(|s| s.log().contains(&holder))
        .unwrap_or_else(|| panic!("no server logs the lease holder {holder}"));
    let other = 1 - leader;
    assert!(
        !servers[other].log().contains("became the leader"),
        "only one server became the leader"
    );

    // Kill the active server: the other takes the Lease over and runs the
    // controllers (a new Deployment gets its pods).
    servers[leader].kill();
    wait(
        "the surviving server to take the lease",
        Duration::from_secs(45),
        || {
            let h = lease_holder(&servers[other]);
            h != holder && servers[other].log().contains(&h)
        },
    );
    servers[other].k(
        K,
        &[
            "create",
            "deployment",
            "api",
            "--image=host",
            "--replicas=3",
        ],
    );
    wait(
        "api's 3 pods through the new leader",
        Duration::from_secs(30),
        || pods_of(&servers[other], "api") == 3,
    );

    // Kill one etcd member: a quorum of two keeps the cluster writable.
    etcd[0].kill();
    for i in 0..10 {
        servers[other].k(K, &["create", "configmap", &format!("after-{i}")]);
    }
    servers[other].k(K, &["scale", "deployment", "web", "--replicas=3"]);
    wait(
        "web scaled to 3 with one etcd member down",
        Duration::from_secs(30),
        || pods_of(&servers[other], "web") == 3,
    );

    // Nothing was lost, also as seen by the restarted server.
    servers[leader].restart();
    for s in &servers {
        let cms = s.k(K, &["get", "configmaps", "-o", "name"]);
        for i in 0..10 {
            assert!(
                cms.contains(&format!("configmap/before-{i}")),
                "before-{i}: {cms}"
            );
            assert!(
                cms.contains(&format!("configmap/after-{i}")),
                "after-{i}: {cms}"
            );
        }
        assert_eq!(pods_of(s, "web"), 3);
        assert_eq!(pods_of(s, "api"), 3);
    }
}
