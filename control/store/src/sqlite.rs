//! The embedded SQLite backend, the default for a single server.
//!
//! Layout: one table, `kv`, is the whole history. Each write appends a row
//! whose `revision` (the INTEGER PRIMARY KEY) is the store revision it made;
//! a delete appends a tombstone row. A key's current state is its row with
//! the highest revision, found through the `(key, revision)` index; a read
//! "at revision R" takes the highest row <= R. `meta` holds the compaction
//! point.
//!
//! Writes: a single writer thread owns the write connection. It takes every
//! request that is waiting (up to [`MAX_BATCH`]), applies them one after the
//! other in one transaction, commits (one fsync for the group, WAL with
//! `synchronous=FULL`), and only then answers the callers and publishes the
//! events. So an acknowledged write is durable, and a group of 64 concurrent
//! writers costs one commit, not 64.
//!
//! The WAL is copied back into the database file by a checkpointer thread
//! of its own, not by the commit that crosses SQLite's threshold (its
//! default): that commit would write back a thousand pages and fsync the
//! database before answering its group, a stall every few thousand writes
//! that every write waiting behind it sees.
//!
//! Reads run on a small pool of read connections (WAL readers never block
//! the writer), each inside one read transaction so multi-query reads see
//! one snapshot.
//!
//! Watches: committed events are broadcast in groups; a watcher first
//! subscribes, then replays history from the table, then follows the
//! broadcast, skipping what it already sent. A watcher that falls behind the
//! broadcast buffer goes back to the table (or ends with `Compacted` if its
//! history is gone).

use crate::{
    Deleted, Event, KeyValue, ListPage, ListRequest, Result, Revision, Store, StoreError, Watch,
    prefix_end,
};
use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};
use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
};
use tokio::sync::{broadcast, mpsc, oneshot};

/// Most write requests committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Rows fetched per query when replaying history to a watcher.
const REPLAY_PAGE: i64 = 1000;
/// Groups of events buffered for watchers before a slow one must go back to
/// the table.
const BROADCAST_GROUPS: usize = 4096;
/// Events buffered per watcher.
const WATCH_BUFFER: usize = 1024;
/// How often the checkpointer looks for committed frames to copy back.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// WAL frames (pages) past which the checkpointer makes the WAL restart
/// (about 64 MB).
const WAL_RESTART_FRAMES: i64 = 16_384;
/// The WAL file is cut back to this size when it restarts (it only grows
/// while readers hold old snapshots during a burst of writes).
const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// Read connections, opened at start; also the most reads run at once.
/// A read beyond them waits for one: a fresh connection would cost an open
/// and a cold page cache (every B-tree page read again), more than the
/// wait for a warm one.
const READ_POOL: usize = 4;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    revision      INTEGER PRIMARY KEY,
    key           BLOB    NOT NULL,
    create_rev    INTEGER NOT NULL,
    prev_rev      INTEGER NOT NULL,
    deleted       INTEGER NOT NULL,
    value         BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS kv_key_revision ON kv (key, revision);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('compacted', 0);
INSERT OR IGNORE INTO meta (name, value) VALUES ('schema', 1);
";

/// Revisions shared between the writer and the readers.
#[derive(Debug, Default)]
struct Clock {
    /// Newest committed revision.
    committed: AtomicI64,
    /// Newest compaction point.
    compacted: AtomicI64,
}

/// The SQLite store. Cheap to share behind an `Arc`; dropping the last
/// handle stops the writer after it has committed what it was given.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    writes: mpsc::Sender<WriteRequest>,
    readers: Arc<ReadPool>,
    clock: Arc<Clock>,
    events: broadcast::Sender<Arc<Vec<Event>>>,
}

impl SqliteStore {
    /// Opens the store at `path`, creating it if the file does not exist.
    ///
    /// An existing file that is not a skep store (or not SQLite at all) is an
    /// error naming the file; it is never replaced by a new database.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let existed = path.exists();
        if existed && path.is_dir() {
            return Err(StoreError::Open {
                path,
                detail: "it is a directory; the store is a file".into(),
            });
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                path: path.clone(),
                detail: format!("creating directory {}: {e}", dir.display()),
            })?;
        }
        let mut writer = open_connection(&path, true)?;
        // Checkpoints are the checkpointer's (module docs).
        writer
            .pragma_update(None, "wal_autocheckpoint", 0i64)
            .map_err(|e| classify(&path, e))?;
        writer
            .pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
            .map_err(|e| classify(&path, e))?;
        let fresh = !existed
            || std::fs::metadata(&path)
                .map(|m| m.len() == 0)
                .unwrap_or(true);
        init_schema(&mut writer, &path, fresh)?;

        let compacted: Revision = writer
            .query_row("SELECT value FROM meta WHERE name = 'compacted'", [], |r| {
                r.get(0)
            })
            .map_err(|e| classify(&path, e))?;
        let newest: Option<Revision> = writer
            .query_row("SELECT MAX(revision) FROM kv", [], |r| r.get(0))
            .map_err(|e| classify(&path, e))?;
        let clock = Arc::new(Clock {
            committed: AtomicI64::new(newest.unwrap_or(0).max(compacted)),
            compacted: AtomicI64::new(compacted),
        });

        let mut readers = Vec::with_capacity(READ_POOL);
        for _ in 0..READ_POOL {
            readers.push(open_connection(&path, false)?);
        }
        let readers = Arc::new(ReadPool {
            path: path.clone(),
            idle: Mutex::new(readers),
            permits: Arc::new(tokio::sync::Semaphore::new(READ_POOL)),
        });

        let (events, _) = broadcast::channel(BROADCAST_GROUPS);
        let (writes, queue) = mpsc::channel(MAX_BATCH * 8);
        let writer_state = Writer {
            conn: writer,
            path: path.clone(),
            clock: clock.clone(),
            events: events.clone(),
        };
        let checkpointer = Checkpointer {
            conn: open_connection(&path, true)?,
            path: path.clone(),
            clock: Arc::downgrade(&clock),
            done: 0,
        };
        std::thread::Builder::new()
            .name("skep-store-writer".into())
            .spawn(move || writer_state.run(queue))
            .map_err(|e| StoreError::Open {
                path: path.clone(),
                detail: format!("starting the writer thread: {e}"),
            })?;
        std::thread::Builder::new()
            .name("skep-store-ckpt".into())
            .spawn(move || checkpointer.run())
            .map_err(|e| StoreError::Open {
                path: path.clone(),
                detail: format!("starting the checkpointer thread: {e}"),
            })?;
        tracing::info!(path = %path.display(), revision = clock.committed.load(Ordering::Acquire), "SQLite store open");
        Ok(Self {
            path,
            writes,
            readers,
            clock,
            events,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn write(&self, op: WriteOp) -> Result<WriteOutcome> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(WriteRequest { op, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

fn open_connection(path: &Path, write: bool) -> Result<Connection> {
    let flags = if write {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| StoreError::Open {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    // Readers wait for the writer's checkpoint instead of failing.
    conn.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(|e| classify(path, e))?;
    // Page cache: 16 MiB for the writer (its B-tree pages stay hot), 4 MiB
    // per reader. No mmap: mapped database pages count in the server's
    // RSS (100+ MB once a few LISTs of 10,000 pods have touched them),
    // while pages read with pread stay in the kernel's page cache, shared
    // and reclaimable. A LIST of 10,000 pods costs ~15k more preads.
    let cache_kib: i64 = if write { 16384 } else { 4096 };
    conn.pragma_update(None, "cache_size", -cache_kib)
        .map_err(|e| classify(path, e))?;
    conn.pragma_update(None, "mmap_size", 0i64)
        .map_err(|e| classify(path, e))?;
    if write {
        // WAL: readers never block the writer. FULL: the WAL is synced at
        // every commit, so an acknowledged write survives power loss too
        // (a SIGKILL alone could not lose it even with NORMAL).
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| classify(path, e))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| classify(path, e))?;
    }
    Ok(conn)
}

fn init_schema(conn: &mut Connection, path: &Path, fresh: bool) -> Result<()> {
    if !fresh {
        // Reading the schema touches the file header: a file that is not
        // SQLite fails here with NOTADB instead of being reinitialised.
        let has_kv: bool = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'kv'",
                [],
                |r| r.get::<_, i64>(0).map(|n| n > 0),
            )
            .map_err(|e| classify(path, e))?;
        let tables: i64 = conn
            .query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(|e| classify(path, e))?;
        if !has_kv && tables > 0 {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: "it is an SQLite database but not a skep store".into(),
            });
        }
        let check: String = conn
            .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
            .map_err(|e| classify(path, e))?;
        if check != "ok" {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("integrity check failed: {check}"),
            });
        }
    }
    conn.execute_batch(SCHEMA).map_err(|e| classify(path, e))
}

/// Turns SQLite's "not a database"/"corrupt" codes into an error that names
/// the file and says what to do.
fn classify(path: &Path, e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
    match e.sqlite_error_code() {
        Some(NotADatabase) | Some(DatabaseCorrupt) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        _ => StoreError::Sqlite(e),
    }
}

// ---------------------------------------------------------------------------
// Checkpointer

/// Copies committed WAL frames back into the database file, off the
/// commit path. PASSIVE checkpoints take no lock the writer needs and stop
/// at the oldest snapshot a reader still holds; the writer restarts the
/// WAL from its beginning once everything in it was copied.
struct Checkpointer {
    conn: Connection,
    path: PathBuf,
    /// The store's clock: gone once the store is (the thread then ends;
    /// closing the last connection checkpoints what is left).
    clock: std::sync::Weak<Clock>,
    /// The revision the last checkpoint covered.
    done: Revision,
}

impl Checkpointer {
    fn run(mut self) {
        loop {
            std::thread::sleep(CHECKPOINT_EVERY);
            let Some(clock) = self.clock.upgrade() else {
                break;
            };
            let committed = clock.committed.load(Ordering::Acquire);
            drop(clock);
            if committed == self.done {
                continue;
            }
            match self
                .conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                }) {
                Ok((_, wal_frames, copied)) => {
                    // All frames copied: nothing newer than `committed` was
                    // left behind. Otherwise a reader held some back; look
                    // again next time.
                    if copied == wal_frames {
                        self.done = committed;
                    }
                    // The writer restarts the WAL only when it begins at a
                    // moment everything was copied; writes without a pause
                    // never give it one. Past this size, a RESTART
                    // checkpoint waits for the writer, copies the rest
                    // and makes it start over (a stall of one checkpoint,
                    // every 64 MB of writes without a pause).
                    if wal_frames > WAL_RESTART_FRAMES
                        && let Err(e) =
                            self.conn
                                .query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
                    {
                        tracing::warn!(path = %self.path.display(), error = %e, "WAL restart failed; the next look retries");
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "WAL checkpoint failed; the next one retries");
                }
            }
        }
        tracing::debug!(path = %self.path.display(), "store checkpointer stopped");
    }
}

// ---------------------------------------------------------------------------
// Writer

#[derive(Debug)]
enum WriteOp {
    Create {
        key: String,
        value: Bytes,
    },
    Update {
        key: String,
        value: Bytes,
        expected: Revision,
    },
    Delete {
        key: String,
        expected: Option<Revision>,
    },
    Compact {
        revision: Revision,
    },
}

#[derive(Debug)]
enum WriteOutcome {
    Put(KeyValue),
    Deleted(Deleted),
    Compacted,
}

#[derive(Debug)]
struct WriteRequest {
    op: WriteOp,
    reply: oneshot::Sender<Result<WriteOutcome>>,
}

struct Writer {
    conn: Connection,
    path: PathBuf,
    clock: Arc<Clock>,
    events: broadcast::Sender<Arc<Vec<Event>>>,
}

/// The latest row of a key, as the writer needs it.
struct Latest {
    revision: Revision,
    create_rev: Revision,
    deleted: bool,
    value: Bytes,
}

impl Writer {
    fn run(mut self, mut queue: mpsc::Receiver<WriteRequest>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = queue.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            self.commit_group(&mut batch);
        }
        tracing::debug!(path = %self.path.display(), "store writer stopped");
    }

    /// Applies a group of requests in one transaction and answers them after
    /// the commit. A request that fails its precondition fails alone; an
    /// I/O failure of the commit fails the whole group.
    fn commit_group(&mut self, batch: &mut Vec<WriteRequest>) {
        let base = self.clock.committed.load(Ordering::Acquire);
        let mut compacted = self.clock.compacted.load(Ordering::Acquire);
        let mut outcomes: Vec<Result<WriteOutcome>> = Vec::with_capacity(batch.len());
        let mut events = Vec::new();

        let result = (|| -> Result<Revision> {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut revision = base;
            for request in batch.iter() {
                let outcome = apply(&tx, &request.op, &mut revision, &mut compacted, &mut events);
                outcomes.push(outcome);
            }
            tx.commit()?;
            Ok(revision)
        })();

        match result {
            Ok(revision) => {
                self.clock.compacted.store(compacted, Ordering::Release);
                self.clock.committed.store(revision, Ordering::Release);
                if !events.is_empty() {
                    // No receivers is fine: nobody is watching.
                    let _ = self.events.send(Arc::new(events));
                }
                for (request, outcome) in batch.drain(..).zip(outcomes) {
                    let _ = request.reply.send(outcome);
                }
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "store commit failed; failing its writes");
                let message = e.to_string();
                for request in batch.drain(..) {
                    let _ = request.reply.send(Err(StoreError::Open {
                        path: self.path.clone(),
                        detail: format!("commit failed: {message}"),
                    }));
                }
            }
        }
    }
}

/// Applies one request inside the group's transaction. Errors returned
/// inside `Ok(Err(..))` style are per-request; SQLite errors abort nothing
/// but this request (the statement failed, the transaction stays usable).
fn apply(
    tx: &Transaction<'_>,
    op: &WriteOp,
    revision: &mut Revision,
    compacted: &mut Revision,
    events: &mut Vec<Event>,
) -> Result<WriteOutcome> {
    match op {
        WriteOp::Create { key, value } => {
            let latest = latest_row(tx, key)?;
            if latest.as_ref().is_some_and(|l| !l.deleted) {
                return Err(StoreError::AlreadyExists { key: key.clone() });
            }
            let rev = *revision + 1;
            insert_row(tx, rev, key, rev, 0, false, value)?;
            *revision = rev;
            let kv = KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision: rev,
                mod_revision: rev,
            };
            events.push(Event::Put {
                kv: kv.clone(),
                prev: None,
            });
            Ok(WriteOutcome::Put(kv))
        }
        WriteOp::Update {
            key,
            value,
            expected,
        } => {
            let latest = match latest_row(tx, key)? {
                Some(l) if !l.deleted => l,
                _ => return Err(StoreError::NotFound { key: key.clone() }),
            };
            if latest.revision != *expected {
                return Err(StoreError::Conflict {
                    key: key.clone(),
                    expected: *expected,
                    actual: latest.revision,
                });
            }
            let rev = *revision + 1;
            insert_row(
                tx,
                rev,
                key,
                latest.create_rev,
                latest.revision,
                false,
                value,
            )?;
            *revision = rev;
            let kv = KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision: latest.create_rev,
                mod_revision: rev,
            };
            events.push(Event::Put {
                kv: kv.clone(),
                prev: Some(latest.into_kv(key)),
            });
            Ok(WriteOutcome::Put(kv))
        }
        WriteOp::Delete { key, expected } => {
            let latest = match latest_row(tx, key)? {
                Some(l) if !l.deleted => l,
                _ => return Err(StoreError::NotFound { key: key.clone() }),
            };
            if let Some(expected) = expected
                && latest.revision != *expected
            {
                return Err(StoreError::Conflict {
                    key: key.clone(),
                    expected: *expected,
                    actual: latest.revision,
                });
            }
            let rev = *revision + 1;
            insert_row(
                tx,
                rev,
                key,
                latest.create_rev,
                latest.revision,
                true,
                &Bytes::new(),
            )?;
            *revision = rev;
            let prev = latest.into_kv(key);
            events.push(Event::Delete {
                key: key.clone(),
                revision: rev,
                prev: Some(prev.clone()),
            });
            Ok(WriteOutcome::Deleted(Deleted {
                prev,
                revision: rev,
            }))
        }
        WriteOp::Compact { revision: target } => {
            if *target > *revision {
                return Err(StoreError::FutureRevision {
                    requested: *target,
                    current: *revision,
                });
            }
            if *target <= *compacted {
                return Ok(WriteOutcome::Compacted);
            }
            // Keep, for every key, its newest row below the compaction point
            // (it is the state at `target - 1` and the previous value of the
            // next event), unless that row is a tombstone; drop the rest.
            tx.execute(
                "DELETE FROM kv WHERE revision < ?1 AND (
                     deleted = 1 OR EXISTS (
                         SELECT 1 FROM kv AS newer
                         WHERE newer.key = kv.key
                           AND newer.revision > kv.revision
                           AND newer.revision < ?1))",
                params![target],
            )?;
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE name = 'compacted'",
                params![target],
            )?;
            *compacted = *target;
            Ok(WriteOutcome::Compacted)
        }
    }
}

fn latest_row(tx: &Transaction<'_>, key: &str) -> Result<Option<Latest>> {
    let mut stmt = tx.prepare_cached(
        "SELECT revision, create_rev, deleted, value FROM kv
         WHERE key = ?1 ORDER BY revision DESC LIMIT 1",
    )?;
    Ok(stmt
        .query_row(params![key.as_bytes()], |r| {
            Ok(Latest {
                revision: r.get(0)?,
                create_rev: r.get(1)?,
                deleted: r.get::<_, i64>(2)? != 0,
                value: Bytes::from(r.get::<_, Vec<u8>>(3)?),
            })
        })
        .optional()?)
}

fn insert_row(
    tx: &Transaction<'_>,
    revision: Revision,
    key: &str,
    create_rev: Revision,
    prev_rev: Revision,
    deleted: bool,
    value: &Bytes,
) -> Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO kv (revision, key, create_rev, prev_rev, deleted, value)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    stmt.execute(params![
        revision,
        key.as_bytes(),
        create_rev,
        prev_rev,
        deleted as i64,
        value.as_ref()
    ])?;
    Ok(())
}

impl Latest {
    fn into_kv(self, key: &str) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: self.value,
            create_revision: self.create_rev,
            mod_revision: self.revision,
        }
    }
}

// ---------------------------------------------------------------------------
// Readers

#[derive(Debug)]
struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// One per connection: whoever holds one finds an idle connection.
    permits: Arc<tokio::sync::Semaphore>,
}

impl ReadPool {
    /// Runs `f` on a pooled read connection on the blocking thread pool.
    async fn with<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        // Held by the blocking task, so a cancelled caller does not free
        // it while its read still runs.
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = pool.idle.lock().map_err(|_| StoreError::Closed)?.pop();
            // With a permit there is an idle connection; a connection lost
            // to a panicking read is replaced here.
            let mut conn = match conn {
                Some(c) => c,
                None => open_connection(&pool.path, false)?,
            };
            let result = f(&mut conn);
            if let Ok(mut idle) = pool.idle.lock()
                && idle.len() < READ_POOL
            {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Open {
            path: self.path.clone(),
            detail: format!("read task failed: {e}"),
        })?
    }
}

/// A row as read back, for lists and replays.
fn row_to_kv(r: &rusqlite::Row<'_>, offset: usize) -> rusqlite::Result<(KeyValue, bool)> {
    let key: Vec<u8> = r.get(offset)?;
    Ok((
        KeyValue {
            // Keys are written from `&str`, so they are always UTF-8.
            key: String::from_utf8_lossy(&key).into_owned(),
            mod_revision: r.get(offset + 1)?,
            create_revision: r.get(offset + 2)?,
            value: Bytes::from(r.get::<_, Vec<u8>>(offset + 4)?),
        },
        r.get::<_, i64>(offset + 3)? != 0,
    ))
}

fn read_compacted(tx: &Transaction<'_>) -> Result<Revision> {
    Ok(
        tx.query_row("SELECT value FROM meta WHERE name = 'compacted'", [], |r| {
            r.get(0)
        })?,
    )
}

fn list_at(
    conn: &mut Connection,
    prefix: String,
    start: Option<String>,
    limit: usize,
    revision: Revision,
) -> Result<ListPage> {
    let tx = conn.transaction()?;
    let compacted = read_compacted(&tx)?;
    if revision < compacted {
        return Err(StoreError::Compacted {
            requested: revision,
            compacted,
        });
    }
    let end = prefix_end(prefix.as_bytes());
    let mut from = start.unwrap_or(prefix).into_bytes();
    let mut items = Vec::new();
    let want = if limit == 0 { usize::MAX } else { limit + 1 };
    // One row per key (its newest <= revision) in key order, tombstones
    // filtered here; keep reading until the page is full or the range ends.
    let mut stmt = tx.prepare_cached(
        "SELECT key, MAX(revision), create_rev, deleted, value FROM kv
         WHERE key >= ?1 AND (?2 IS NULL OR key < ?2) AND revision <= ?3
         GROUP BY key ORDER BY key LIMIT ?4",
    )?;
    loop {
        let chunk = (want - items.len()).min(10_000) as i64;
        let mut rows = stmt.query(params![from, end, revision, chunk])?;
        let mut seen = 0i64;
        let mut last_key = None;
        while let Some(row) = rows.next()? {
            seen += 1;
            let (kv, deleted) = row_to_kv(row, 0)?;
            last_key = Some(kv.key.clone());
            if !deleted {
                items.push(kv);
            }
        }
        match last_key {
            Some(k) if seen == chunk && items.len() < want => {
                from = k.into_bytes();
                from.push(0);
            }
            _ => break,
        }
    }
    drop(stmt);
    tx.commit()?;
    let more = items.len() > limit && limit != 0;
    if more {
        items.truncate(limit);
    }
    Ok(ListPage {
        items,
        revision,
        more,
    })
}

/// History under `prefix` with revisions in `(after, upto]`, at most
/// [`REPLAY_PAGE`] events, each with its previous value.
fn replay(
    conn: &mut Connection,
    prefix: &[u8],
    after: Revision,
    upto: Revision,
) -> Result<Vec<Event>> {
    let tx = conn.transaction()?;
    let compacted = read_compacted(&tx)?;
    if after + 1 < compacted {
        return Err(StoreError::Compacted {
            requested: after,
            compacted,
        });
    }
    let end = prefix_end(prefix);
    let mut stmt = tx.prepare_cached(
        "SELECT c.key, c.revision, c.create_rev, c.deleted, c.value,
                p.key, p.revision, p.create_rev, p.deleted, p.value
         FROM kv AS c LEFT JOIN kv AS p ON p.revision = c.prev_rev AND c.prev_rev > 0
         WHERE c.revision > ?1 AND c.revision <= ?2
           AND c.key >= ?3 AND (?4 IS NULL OR c.key < ?4)
         ORDER BY c.revision LIMIT ?5",
    )?;
    let mut rows = stmt.query(params![after, upto, prefix, end, REPLAY_PAGE])?;
    let mut events = Vec::new();
    while let Some(row) = rows.next()? {
        let (kv, deleted) = row_to_kv(row, 0)?;
        let prev = match row.get::<_, Option<Vec<u8>>>(5)? {
            Some(_) => Some(row_to_kv(row, 5)?.0),
            None => None,
        };
        events.push(if deleted {
            Event::Delete {
                key: kv.key,
                revision: kv.mod_revision,
                prev,
            }
        } else {
            Event::Put { kv, prev }
        });
    }
    Ok(events)
}

// ---------------------------------------------------------------------------
// Watches

struct Watcher {
    prefix: Vec<u8>,
    end: Option<Vec<u8>>,
    sent: Revision,
    tx: mpsc::Sender<Result<Event>>,
    readers: Arc<ReadPool>,
    clock: Arc<Clock>,
}

impl Watcher {
    fn matches(&self, key: &str) -> bool {
        let k = key.as_bytes();
        k >= self.prefix.as_slice() && self.end.as_deref().is_none_or(|end| k < end)
    }

    /// Sends history from the table up to the committed revision. Returns
    /// false when the receiver is gone.
    async fn catch_up(&mut self) -> Result<bool> {
        loop {
            let upto = self.clock.committed.load(Ordering::Acquire);
            if self.sent >= upto {
                return Ok(true);
            }
            let prefix = self.prefix.clone();
            let after = self.sent;
            let events = self
                .readers
                .with(move |conn| replay(conn, &prefix, after, upto))
                .await?;
            let full = events.len() as i64 == REPLAY_PAGE;
            for event in events {
                let rev = event.revision();
                if self.tx.send(Ok(event)).await.is_err() {
                    return Ok(false);
                }
                self.sent = rev;
            }
            if !full {
                // Everything up to `upto` is sent, even if no event matched.
                self.sent = self.sent.max(upto);
            }
        }
    }

    async fn run(mut self, mut live: broadcast::Receiver<Arc<Vec<Event>>>) {
        let outcome: Result<()> = async {
            if !self.catch_up().await? {
                return Ok(());
            }
            loop {
                let group = tokio::select! {
                    group = live.recv() => group,
                    _ = self.tx.closed() => return Ok(()),
                };
                match group {
                    Ok(group) => {
                        for event in group.iter() {
                            if event.revision() <= self.sent || !self.matches(event.key()) {
                                continue;
                            }
                            if self.tx.send(Ok(event.clone())).await.is_err() {
                                return Ok(());
                            }
                        }
                        if let Some(last) = group.last() {
                            self.sent = self.sent.max(last.revision());
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Missed groups are in the table.
                        if !self.catch_up().await? {
                            return Ok(());
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                }
            }
        }
        .await;
        if let Err(e) = outcome {
            let _ = self.tx.send(Err(e)).await;
        }
    }
}

// ---------------------------------------------------------------------------
// The trait

#[async_trait]
impl Store for SqliteStore {
    async fn revision(&self) -> Result<Revision> {
        Ok(self.clock.committed.load(Ordering::Acquire))
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_owned();
        self.readers
            .with(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT key, revision, create_rev, deleted, value FROM kv
                     WHERE key = ?1 ORDER BY revision DESC LIMIT 1",
                )?;
                let row = stmt
                    .query_row(params![key.as_bytes()], |r| row_to_kv(r, 0))
                    .optional()?;
                Ok(row.and_then(|(kv, deleted)| (!deleted).then_some(kv)))
            })
            .await
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue> {
        match self
            .write(WriteOp::Create {
                key: key.to_owned(),
                value,
            })
            .await?
        {
            WriteOutcome::Put(kv) => Ok(kv),
            other => Err(unexpected(other)),
        }
    }

    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<KeyValue> {
        match self
            .write(WriteOp::Update {
                key: key.to_owned(),
                value,
                expected,
            })
            .await?
        {
            WriteOutcome::Put(kv) => Ok(kv),
            other => Err(unexpected(other)),
        }
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<Deleted> {
        match self
            .write(WriteOp::Delete {
                key: key.to_owned(),
                expected,
            })
            .await?
        {
            WriteOutcome::Deleted(d) => Ok(d),
            other => Err(unexpected(other)),
        }
    }

    async fn list(&self, req: ListRequest<'_>) -> Result<ListPage> {
        if let Some(start) = req.start
            && !start.starts_with(req.prefix)
        {
            return Err(StoreError::InvalidRequest(format!(
                "list start {start:?} is not under prefix {:?}",
                req.prefix
            )));
        }
        let current = self.clock.committed.load(Ordering::Acquire);
        let revision = match req.revision {
            Some(r) if r > current => {
                return Err(StoreError::FutureRevision {
                    requested: r,
                    current,
                });
            }
            Some(r) => r,
            None => current,
        };
        let prefix = req.prefix.to_owned();
        let start = req.start.map(str::to_owned);
        let limit = req.limit;
        self.readers
            .with(move |conn| list_at(conn, prefix, start, limit, revision))
            .await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch> {
        if after < 0 {
            return Err(StoreError::InvalidRequest(format!(
                "watch revision {after} is negative"
            )));
        }
        // Subscribe before reading history, so nothing committed in between
        // is missed (duplicates are skipped by revision).
        let live = self.events.subscribe();
        let compacted = self.clock.compacted.load(Ordering::Acquire);
        if after + 1 < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                compacted,
            });
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let watcher = Watcher {
            prefix: prefix.as_bytes().to_vec(),
            end: prefix_end(prefix.as_bytes()),
            sent: after,
            tx,
            readers: self.readers.clone(),
            clock: self.clock.clone(),
        };
        tokio::spawn(watcher.run(live));
        Ok(Watch::new(rx))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        match self.write(WriteOp::Compact { revision }).await? {
            WriteOutcome::Compacted => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(outcome: WriteOutcome) -> StoreError {
    // The writer answers each op with its own outcome kind; reaching this is
    // a bug in this file, reported rather than panicking.
    StoreError::Internal(format!("unexpected write outcome {outcome:?}"))
}
