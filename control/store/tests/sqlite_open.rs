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
