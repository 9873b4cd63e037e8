//! The pod IP allocator against real files: persistence across reopen,
//! reservations, exhaustion, reconcile, CIDR change, corrupt files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use skep_kubelet::ipam::{Ipam, IpamError};
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "skep-ipam-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self) -> PathBuf {
        self.0.join("ipam.json")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ip(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 42, 7, d)
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn allocations_skip_reserved_addresses_and_survive_a_reopen() {
    let dir = TempDir::new();
    let mut ipam = Ipam::open(dir.file(), "10.42.7.0".parse().unwrap(), 24).unwrap();
    assert!(dir.file().exists(), "the state file is made at open");
    assert_eq!(ipam.capacity(), 253, ".0, .1 and .255 are reserved");
    assert_eq!(ipam.allocate("a").unwrap(), ip(2));
    assert_eq!(ipam.allocate("b").unwrap(), ip(3));
    assert_eq!(ipam.allocate("a").unwrap(), ip(2), "same pod, same IP");
    assert_eq!(ipam.get("b"), Some(ip(3)));
    assert_eq!(ipam.get("c"), None);
    // No temporary file is left behind by the atomic writes.
    assert_eq!(files_in(&dir.0), vec!["ipam.json"]);

    drop(ipam);
    let mut ipam = Ipam::open(dir.file(), "10.42.7.0".parse().unwrap(), 24).unwrap();
    assert_eq!(ipam.get("a"), Some(ip(2)));
    assert_eq!(ipam.get("b"), Some(ip(3)));
    assert_eq!(ipam.allocate("a").unwrap(), ip(2));
    assert_eq!(ipam.allocate("c").unwrap(), ip(4));
    assert_eq!(
        ipam.allocations().collect::<Vec<_>>(),
        vec![(ip(2), "a"), (ip(3), "b"), (ip(4), "c")]
    );
    let text = std::fs::read_to_string(dir.file()).unwrap();
    assert!(text.contains("\"podCIDR\": \"10.42.7.0/24\""), "{text}");
    assert!(text.contains("\"10.42.7.4\": \"c\""), "{text}");
}

#[test]
fn release_frees_and_next_fit_does_not_reuse_at_once() {
    let dir = TempDir::new();
    let mut ipam = Ipam::open(dir.file(), "10.42.7.0".parse().unwrap(), 24).unwrap();
    for uid in ["a", "b", "c"] {
        ipam.allocate(uid).unwrap();
    }
    ipam.release("b").unwrap();
    assert_eq!(ipam.get("b"), None);
    ipam.release("b").unwrap();
    assert_eq!(
        ipam.allocate("d").unwrap(),
        ip(5),
        "continues after the last one"
    );
    // Released state is on disk.
    let ipam = Ipam::open(dir.file(), "10.42.7.0".parse().unwrap(), 24).unwrap();
    assert_eq!(ipam.get("b"), None);
    assert_eq!(ipam.get("d"), Some(ip(5)));
}

#[test]
fn an_exhausted_range_is_a_clear_error_and_wraps_around_after_a_release() {
    let dir = TempDir::new();
    // A /29: .0 network, .1 reserved, .7 broadcast: .2 to .6 usable.
    let mut ipam = Ipam::open(dir.file(), "10.42.7.0".parse().unwrap(), 29).unwrap();
    assert_eq!(ipam.capacity(), 5);
    let got: Vec<Ipv4Addr> = (0..5)
        .map(|i| ipam.allocate(&format!("p{i}")).unwrap())
        .collect();
    assert_eq!(got, (2..=6).map(ip).collect::<Vec<_>>());
    let err = ipam.allocate("one-too-many").unwrap_err();
    assert!(
        matches!(err, IpamError::Exhausted { allocated: 5, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("10.42.7.0/29"), "{err}");
    assert_eq!(ipam.get("one-too-many"), None);
    ipam.release("p1").unwrap();
    assert_eq!(
        ipam.allocate("late").unwrap(),
        ip(3),
        "wraps around to the freed IP"
    );
    assert!(Ipam::open(dir.0.join("tiny.json"), "10.42.7.0".parse().unwrap(), 31).is_err());
}

#[test]
fn reconcile_frees_everything_not_live() {
    let dir = TempDir::new();
    let mut ipam = Ipam::open(dir.file(), "10.42.7.0".parse().unwrap(), 24).unwrap();
    for uid in ["a", "b", "c", "d"] {
        ipam.allocate(uid).unwrap();
    }
    let live = vec![
        "b".to_string(),
        "d".to_string(),
        "not-allocated".to_string(),
    ];
    let freed = ipam.reconcile(&live).unwrap();
    assert_eq!(
        freed,
        vec![("a".to_string(), ip(2)), ("c".to_string(), ip(4))]
    );
    assert!(ipam.reconcile(["b", "d"]).unwrap().is_empty());
    let ipam = Ipam::open(dir.file(), "10.42.7.0".parse().unwrap(), 24).unwrap();
    assert_eq!(
        ipam.allocations().collect::<Vec<_>>(),
        vec![(ip(3), "b"), (ip(5), "d")]
    );
}

#[test]
fn a_new_pod_cidr_resets_the_state() {
    let dir = TempDir::new();
    let mut ipam = Ipam::open(dir.file(), "10.42.7.0".parse().unwrap(), 24).unwrap();
    ipam.allocate("a").unwrap();
    drop(ipam);
    let mut ipam = Ipam::open(dir.file(), "10.42.9.0".parse().unwrap(), 24).unwrap();
    assert_eq!(ipam.reset_from(), Some("10.42.7.0/24"));
    assert_eq!(ipam.get("a"), None, "IPs of the old range are gone");
    assert_eq!(ipam.allocate("a").unwrap(), Ipv4Addr::new(10, 42, 9, 2));
    drop(ipam);
    let ipam = Ipam::open(dir.file(), "10.42.9.0".parse().unwrap(), 24).unwrap();
    assert_eq!(ipam.reset_from(), None);
    assert_eq!(ipam.get("a"), Some(Ipv4Addr::new(10, 42, 9, 2)));
}

#[test]
fn a_corrupt_file_is_moved_aside_with_an_error_naming_it() {
    let dir = TempDir::new();
    std::fs::write(
        dir.file(),
        b"{\"version\": 1, \"podCIDR\": \"10.42.7.0/24\", trunc",
    )
    .unwrap();
    let err = Ipam::open(dir.file(), "10.42.7.0".parse().unwrap(), 24).unwrap_err();
    let IpamError::Corrupt { path, moved_to, .. } = &err else {
        panic!("want Corrupt, got {err:?}");
    };
    assert_eq!(path, &dir.file());
    assert!(
        err.to_string().contains(&dir.file().display().to_string()),
        "{err}"
    );
    assert_eq!(
        std::fs::read(moved_to).unwrap(),
        b"{\"version\": 1, \"podCIDR\": \"10.42.7.0/24\", trunc",
        "the corrupt content is kept"
    );
    assert!(!dir.file().exists());
    // The next open starts empty.
    let mut ipam = Ipam::open(dir.file(), "10.42.7.0".parse().unwrap(), 24).unwrap();
    assert_eq!(ipam.allocate("a").unwrap(), ip(2));

    // Valid JSON of the wrong shape, and an unknown version, are corrupt too.
    for bad in [
        &b"[1, 2, 3]"[..],
        b"{\"version\": 99, \"podCIDR\": \"10.42.7.0/24\", \"last\": null, \"allocations\": {}}",
    ] {
        let d = TempDir::new();
        std::fs::write(d.file(), bad).unwrap();
        assert!(matches!(
            Ipam::open(d.file(), "10.42.7.0".parse().unwrap(), 24),
            Err(IpamError::Corrupt { .. })
        ));
        assert_eq!(files_in(&d.0).len(), 1, "moved aside, not deleted");
    }
}

#[test]
fn entries_outside_the_usable_range_are_dropped_at_open() {
    let dir = TempDir::new();
    std::fs::write(
        dir.file(),
        br#"{"version": 1, "podCIDR": "10.42.7.0/24", "last": "10.42.7.3",
             "allocations": {"10.42.7.1": "gw", "10.42.7.3": "ok", "10.42.8.3": "elsewhere",
                             "10.42.7.255": "bcast", "10.42.7.4": "ok"}}"#,
    )
    .unwrap();
    let mut ipam = Ipam::open(dir.file(), "10.42.7.0".parse().unwrap(), 24).unwrap();
    assert_eq!(ipam.allocations().collect::<Vec<_>>(), vec![(ip(3), "ok")]);
    assert_eq!(ipam.allocate("new").unwrap(), ip(4));
}
