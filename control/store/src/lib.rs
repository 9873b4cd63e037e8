//! skep's cluster state store.
//!
//! One trait, [`Store`], with the etcd-v3 semantics the Kubernetes API needs
//! (the subset kine serves): a single global revision that becomes
//! `resourceVersion`, compare-and-swap writes on a key's mod revision,
//! consistent paginated range reads at a revision, watches that replay from
//! a revision, and compaction. Two backends implement it:
//!
//! * [`SqliteStore`]: embedded, the default for a single server. WAL mode,
//!   a single writer thread that commits requests in groups (one fsync per
//!   group), durable before a write is acknowledged.
//! * [`EtcdStore`]: a real etcd cluster through `etcd-client`, for HA.
//!
//! Both pass the same conformance suite (`tests/conformance.rs`).

pub mod compactor;
pub mod error;
pub mod etcd;
pub mod local_etcd;
pub mod sqlite;
pub mod types;

pub use compactor::Compactor;
pub use error::StoreError;
pub use etcd::{EtcdOptions, EtcdStore};
pub use local_etcd::LocalEtcd;
pub use sqlite::SqliteStore;
pub use types::{Deleted, Event, KeyValue, ListPage, ListRequest, Revision, Watch, prefix_end};

use async_trait::async_trait;
use bytes::Bytes;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The operations the API server needs from its storage.
///
/// Keys are paths such as `/registry/pods/default/web-1`. Every successful
/// write advances the store's single revision by one and stamps the key with
/// it (`mod_revision`); a key's `create_revision` is the revision that
/// created it.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// The newest committed revision.
    async fn revision(&self) -> Result<Revision>;

    /// The current value of `key`, if it exists.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Creates `key`; fails with [`StoreError::AlreadyExists`] if it exists.
    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue>;

    /// Replaces `key` if its mod revision is still `expected`; fails with
    /// [`StoreError::Conflict`] if it moved and [`StoreError::NotFound`] if
    /// the key is gone.
    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<KeyValue>;

    /// Deletes `key` (only if its mod revision is `expected`, when given).
    /// Returns the deleted value and the revision of the deletion.
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<Deleted>;

    /// Keys under `req.prefix` from `req.start` on, in key order, as of one
    /// revision: `req.revision`, or the newest one. Pages of one listing
    /// stay consistent by passing the first page's `revision` back.
    /// Fails with [`StoreError::Compacted`] when that revision was compacted
    /// and [`StoreError::FutureRevision`] when it does not exist yet.
    async fn list(&self, req: ListRequest<'_>) -> Result<ListPage>;

    /// Every change under `prefix` with a revision greater than `after`, in
    /// revision order, each with the key's previous value. Fails with
    /// [`StoreError::Compacted`] when changes after `after` were compacted
    /// away; a watch that falls that far behind later ends with that error.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch>;

    /// Forgets history before `revision`: afterwards the store answers lists
    /// at revisions >= `revision` and watches from `revision - 1` on.
    /// Compacting at or below an earlier compaction is a no-op.
    async fn compact(&self, revision: Revision) -> Result<()>;
}

/// Reads every key under `prefix` as of one revision (`at`, or the first
/// page's when `None`), `page` keys per request, handing each to `each`;
/// returns that revision. For caches that list, then watch from the
/// returned revision.
pub async fn list_each(
    store: &dyn Store,
    prefix: &str,
    page: usize,
    at: Option<Revision>,
    mut each: impl FnMut(&KeyValue),
) -> Result<Revision> {
    let mut start: Option<String> = None;
    let mut revision = at;
    loop {
        let p = store
            .list(ListRequest {
                prefix,
                start: start.as_deref(),
                limit: page,
                revision,
            })
            .await?;
        revision = Some(p.revision);
        p.items.iter().for_each(&mut each);
        match p.next_start() {
            Some(s) => start = Some(s),
            None => return Ok(p.revision),
        }
    }
}
