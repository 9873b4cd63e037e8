//! Durability: a writer process is SIGKILLed mid-stream; every write it saw
//! acknowledged must be in the store when it is reopened.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use skep_store::{ListRequest, SqliteStore, Store};
use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_store-crash-writer"))
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start store-crash-writer");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();

    // Let it get well into its stream, then kill it without warning.
    let mut acked = BTreeSet::new();
    let started = Instant::now();
    while acked.len() < 3000 {
        let line = lines
            .next()
            .expect("writer ended before being killed")
            .unwrap();
        acked.insert(line.strip_prefix("ack ").unwrap().to_owned());
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "writer too slow"
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Lines already written before the kill are acknowledged writes too.
    for line in lines {
        let line = line.unwrap();
        if let Some(key) = line.strip_prefix("ack ") {
            acked.insert(key.to_owned());
        }
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the writer must have been killed");

    let store = SqliteStore::open(&path).expect("reopen after SIGKILL");
    let present: BTreeSet<String> = store
        .list(ListRequest::prefix("/crash/"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    let lost: Vec<_> = acked.difference(&present).take(5).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged keys lost, e.g. {lost:?}",
        acked.difference(&present).count()
    );
    // The revision continues after the reopened history.
    let next = store
        .create("/crash/after", bytes::Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(next.mod_revision, present.len() as i64 + 1);
}
