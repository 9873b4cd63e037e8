//! Opening the SQLite store: persistence across reopen, and clear errors (not
//! a silent new database) for files that are not a skep store.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use bytes::Bytes;
use skep_store::{ListRequest, SqliteStore, Store, StoreError};

#[tokio::test]
async fn reopening_keeps_objects_and_revision() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let (rev, kv) = {
        let s = SqliteStore::open(&path).unwrap();
        let kv = s.create("/k/1", Bytes::from_static(b"one")).await.unwrap();
        s.create("/k/2", Bytes::from_static(b"two")).await.unwrap();
        s.delete("/k/2", None).await.unwrap();
        s.compact(2).await.unwrap();
        (s.revision().await.unwrap(), kv)
    };
    // The writer thread commits before acknowledging, so the file is
    // complete once the calls above returned.
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.revision().await.unwrap(), rev);
    assert_eq!(s.get("/k/1").await.unwrap(), Some(kv));
    assert_eq!(s.get("/k/2").await.unwrap(), None);
    let page = s.list(ListRequest::prefix("/k/")).await.unwrap();
    assert_eq!(page.items.len(), 1);
    // The compaction point survives too.
    assert!(matches!(
        s.list(ListRequest {
            prefix: "/k/",
            revision: Some(1),
            ..Default::default()
        })
        .await,
        Err(StoreError::Compacted { .. })
    ));
    let next = s
        .create("/k/3", Bytes::from_static(b"three"))
        .await
        .unwrap();
    assert_eq!(next.mod_revision, rev + 1);
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "got {err:?}");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        message.contains("backup") || message.contains("move it away"),
        "{message}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        garbage,
        "the file was modified"
    );
}

#[test]
fn another_sqlite_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO users (name) VALUES ('x');")
            .unwrap();
    }
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(err.to_string().contains("not a skep store"), "{err}");
    let c = rusqlite::Connection::open(&path).unwrap();
    let n: i64 = c
        .query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn a_directory_in_place_of_the_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = SqliteStore::open(dir.path()).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("directory"), "{message}");
}

/// Commits only append to the WAL; the checkpointer thread copies them
/// into the database file while the store is open, and the WAL restarts
/// instead of growing with every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpointer_copies_the_wal_back_while_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let wal = dir.path().join("state.db-wal");
    let s = SqliteStore::open(&path).unwrap();
    let value = Bytes::from(vec![b'x'; 4096]);
    let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut wal_peak = 0;
    // 4 rounds of 1,000 writes of 4 KiB.
    for round in 0..4 {
        for i in 0..1000 {
            s.create(&format!("/k/{round}/{i}"), value.clone())
                .await
                .unwrap();
        }
        wal_peak = wal_peak.max(size(&wal));
        // Long enough for a checkpoint to run (every 250 ms).
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    }
    let db = size(&path);
    assert!(
        db >= 16 << 20,
        "16 MB of rows were written and checkpointed, but the database file holds {db} bytes"
    );
    // Without checkpoints the WAL would hold every frame written: each
    // round appends ~4,200 pages (17 MB), ~70 MB in all. The WAL restarts
    // from its beginning once a checkpoint copied everything (here, in the
    // pauses), so the file never grows much past one round.
    let wal_now = size(&wal);
    assert!(
        wal_now < 40 << 20 && wal_peak < 40 << 20,
        "the WAL keeps growing: {wal_now} bytes now, {wal_peak} at most"
    );
    // Everything is still there.
    let page = s.list(ListRequest::prefix("/k/")).await.unwrap();
    assert_eq!(page.items.len(), 4000);
}
