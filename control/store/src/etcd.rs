//! [`Store`] over a real etcd v3 cluster, through the `etcd-client` crate.
//!
//! The trait was modelled on etcd, so most operations map onto one request:
//!
//! * Conditional writes are transactions. `create` compares the key's
//!   create revision with 0; `update` and a conditional `delete` compare its
//!   mod revision with the expected one (and its version with 0, so a stale
//!   `expected` of 0 cannot resurrect a deleted key). The failure branch
//!   reads the key without its value, so a conflict costs no extra round
//!   trip and tells `NotFound` from `Conflict`. A successful `update` reads
//!   the key back (keys only) in the same transaction to learn its create
//!   revision without shipping the value twice.
//! * Every revision we report is the response header's revision, which for
//!   a write is the revision of that write.
//! * A list is one range request; an empty prefix (or one of all 0xff bytes)
//!   ranges to etcd's "\0" end, meaning "to the end of the keyspace".
//! * etcd's "compacted" and "future revision" errors become
//!   [`StoreError::Compacted`] / [`StoreError::FutureRevision`]. etcd does
//!   not say where history starts, so the compaction revision is learned
//!   best-effort by a throwaway watch from revision 1 (etcd cancels it with
//!   the compaction revision); 0 means it could not be learned.
//! * A watch first checks with a cheap range read at `after + 1` whether the
//!   start was compacted, so `watch()` itself fails with `Compacted` in the
//!   common case instead of the caller finding out from the stream (etcd
//!   reports compaction of a new watcher asynchronously, up to ~100 ms after
//!   creating it). A spawned task then forwards events into the channel of
//!   a [`Watch`]. It ends, cancelling the etcd watch, when the receiver is
//!   dropped; it ends with one `Compacted` error when etcd cancels the watch
//!   for compaction; and when the gRPC stream breaks it re-creates the watch
//!   from the first revision not yet delivered, with exponential backoff, so
//!   a transient etcd hiccup neither ends the watch nor loses or repeats an
//!   event.
//! * With several endpoints, `etcd-client` spreads requests over them at
//!   random and keeps trying a dead one, where requests fail at once with
//!   "connection refused". Such a request never reached etcd, so it is
//!   re-sent (a few times, 20 ms apart), which is safe even for conditional
//!   writes; every other failure is returned as it is (the caller retries).
//! * `connect` retries with exponential backoff (100 ms doubling to 5 s)
//!   until `connect_timeout`, and only counts an attempt as successful once
//!   a real (linearizable) read has been answered: `etcd-client` connects
//!   lazily, so a successful `Client::connect` alone proves nothing.
//!
//! Message size limits are raised to 2 GiB for responses, since a page of
//! large objects (or a watch response carrying values and previous values)
//! easily exceeds tonic's 4 MiB default. The server's own limit for requests
//! is etcd's `--max-request-bytes`.

use crate::{
    Deleted, Event, KeyValue, ListPage, ListRequest, Result, Revision, Store, StoreError, Watch,
    prefix_end,
};
use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Client, CompactionOptions, CompactionResponse, Compare, CompareOp, ConnectOptions,
    DeleteOptions, DeleteResponse, EventType, GetOptions, GetResponse, KvClient, Txn, TxnOp,
    TxnOpResponse, TxnResponse, WatchClient, WatchOptions, WatchStream, Watcher,
};
use std::{
    fmt,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::mpsc;

/// First delay between connection attempts and watch re-creations.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest delay between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bounds of the time one connection attempt may take.
const ATTEMPT_TIMEOUT_MIN: Duration = Duration::from_millis(500);
const ATTEMPT_TIMEOUT_MAX: Duration = Duration::from_secs(5);
/// How long re-creating a broken watch may take before it counts as failed.
const REWATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for etcd to tell the compaction revision.
const COMPACTION_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 keep-alive, so a silently dead connection (and the watches on it)
/// is noticed. etcd's default `--grpc-keepalive-min-time` is 5 s; pinging
/// more often than that gets the connection closed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response we accept (gRPC messages cannot be larger anyway).
const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;
/// Pause before re-sending a request that an endpoint refused.
const REFUSED_RETRY_DELAY: Duration = Duration::from_millis(20);
/// How long requests wait out an etcd leader election (etcd's default
/// election timeout is 1 s; several rounds may be needed).
const ELECTION_RETRY_FOR: Duration = Duration::from_secs(8);
/// Events buffered per watch before etcd's stream is back-pressured.
const WATCH_BUFFER: usize = 1024;
/// A key no skep object uses: targets of requests that only want the
/// response header (the revision) or a revision check.
const PROBE_KEY: &[u8] = b"\0";

/// How to reach etcd.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EtcdOptions {
    /// Client URLs such as `http://10.0.0.1:2379` (or `host:port`).
    pub endpoints: Vec<String>,
    /// Total time to keep retrying the first connection (default 30 s).
    pub connect_timeout: Duration,
}

impl EtcdOptions {
    /// Options for `endpoints` with the defaults.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            connect_timeout: Duration::from_secs(30),
        }
    }

    /// Sets [`EtcdOptions::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

/// A [`Store`] on an etcd cluster. Cheap to clone: clones share the
/// connection.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    kv: Kv,
    watch: WatchClient,
    /// The endpoints, comma-separated, for messages.
    endpoints: String,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to etcd, retrying with exponential backoff until
    /// `opts.connect_timeout` has passed; fails with
    /// [`StoreError::Unavailable`] if etcd never answered.
    pub async fn connect(opts: EtcdOptions) -> Result<EtcdStore> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::InvalidRequest(
                "no etcd endpoints given".to_owned(),
            ));
        }
        let endpoints = opts.endpoints.join(",");
        let started = Instant::now();
        let mut delay = BACKOFF_START;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let remaining = opts.connect_timeout.saturating_sub(started.elapsed());
            let limit = remaining.clamp(ATTEMPT_TIMEOUT_MIN, ATTEMPT_TIMEOUT_MAX);
            let error = match try_connect(&opts.endpoints, limit).await {
                Ok(client) => {
                    if attempt > 1 {
                        tracing::info!(%endpoints, attempt, "connected to etcd");
                    }
                    return Ok(Self::from_client(&client, endpoints, opts.endpoints.len()));
                }
                Err(e) => e,
            };
            let remaining = opts.connect_timeout.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                tracing::warn!(
                    %endpoints, attempt, %error,
                    "cannot reach etcd; giving up"
                );
                return Err(StoreError::Unavailable {
                    endpoints,
                    attempts: attempt,
                    waited_s: started.elapsed().as_secs_f64(),
                    last_error: error,
                });
            }
            let next = delay.min(remaining);
            tracing::warn!(
                %endpoints, attempt, %error,
                next_attempt_in_ms = next.as_millis() as u64,
                "cannot reach etcd; retrying"
            );
            tokio::time::sleep(next).await;
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }

    fn from_client(client: &Client, endpoints: String, endpoint_count: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                kv: Kv::new(client, endpoint_count),
                watch: client
                    .watch_client()
                    .max_decoding_message_size(MAX_RESPONSE_BYTES),
                endpoints,
            }),
        }
    }

    fn kv(&self) -> &Kv {
        &self.inner.kv
    }

    /// Maps an error of a read at `requested` to `Compacted` or
    /// `FutureRevision` where etcd says so.
    async fn read_error(&self, e: etcd_client::Error, requested: Revision) -> StoreError {
        match classify(&e) {
            Some(Known::Compacted) => StoreError::Compacted {
                requested,
                compacted: self.compaction_hint().await,
            },
            Some(Known::Future) => match self.revision().await {
                Ok(current) => StoreError::FutureRevision { requested, current },
                Err(e) => e,
            },
            None => etcd_error(&e),
        }
    }

    /// Checks that revision `rev` has not been compacted, by a read at it.
    /// A future `rev` is fine.
    async fn check_not_compacted(&self, rev: Revision, requested: Revision) -> Result<()> {
        let opts = GetOptions::new().with_revision(rev).with_count_only();
        match self.kv().get(PROBE_KEY, Some(opts)).await {
            Ok(_) => Ok(()),
            Err(e) => match classify(&e) {
                Some(Known::Future) => Ok(()),
                Some(Known::Compacted) => Err(StoreError::Compacted {
                    requested,
                    compacted: self.compaction_hint().await,
                }),
                None => Err(etcd_error(&e)),
            },
        }
    }

    /// The revision of etcd's latest compaction, best-effort (0 when it
    /// cannot be learned). etcd cancels a watch that starts before it with
    /// that revision, so watch from revision 1 and wait for the cancel.
    async fn compaction_hint(&self) -> Revision {
        let mut client = self.inner.watch.clone();
        let probe = async move {
            let opts = WatchOptions::new().with_start_revision(1);
            let (mut watcher, mut stream) = client.watch(PROBE_KEY, Some(opts)).await.ok()?;
            let found = loop {
                match stream.message().await {
                    Ok(Some(resp)) if resp.compact_revision() > 0 => {
                        break Some(resp.compact_revision());
                    }
                    Ok(Some(resp)) if resp.canceled() => break None,
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break None,
                }
            };
            let _ = watcher.cancel().await;
            found
        };
        tokio::time::timeout(COMPACTION_PROBE_TIMEOUT, probe)
            .await
            .ok()
            .flatten()
            .unwrap_or(0)
    }
}

/// The KV API. `etcd-client` balances requests over all endpoints at
/// random and keeps sending some to an endpoint that is down, where they
/// fail at once with "connection refused". Such a request never reached
/// etcd, so re-sending it is safe even for a conditional write; `Kv` does
/// that a few times, so one dead member of a cluster costs no failed
/// requests. Any other failure is returned as it is.
#[derive(Clone)]
struct Kv {
    client: KvClient,
    /// Tries per request.
    attempts: usize,
}

type EtcdResult<T> = std::result::Result<T, etcd_client::Error>;

impl Kv {
    fn new(client: &Client, endpoints: usize) -> Self {
        Self {
            client: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            attempts: 2 * endpoints + 1,
        }
    }

    async fn retry<T, F, Fut>(&self, mut op: F) -> EtcdResult<T>
    where
        F: FnMut(KvClient) -> Fut,
        Fut: Future<Output = EtcdResult<T>>,
    {
        let mut attempt = 1;
        loop {
            match op(self.client.clone()).await {
                Err(e) if attempt < self.attempts && refused(&e) => {
                    attempt += 1;
                    tokio::time::sleep(REFUSED_RETRY_DELAY).await;
                }
                result => return result,
            }
        }
    }

    /// Like [`Kv::retry`], and also through a leader election (etcd
    /// answers Unavailable until a new leader is elected, about a second
    /// after the old one is lost). Returns whether a transient error was
    /// retried, since a write may then have been applied by the failed
    /// attempt.
    async fn retry_transient<T, F, Fut>(&self, mut op: F) -> (EtcdResult<T>, bool)
    where
        F: FnMut(KvClient) -> Fut,
        Fut: Future<Output = EtcdResult<T>>,
    {
        let deadline = tokio::time::Instant::now() + ELECTION_RETRY_FOR;
        let mut delay = Duration::from_millis(50);
        let mut retried = false;
        loop {
            match self.retry(&mut op).await {
                Err(e) if transient(&e) && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %describe(&e), "etcd busy electing a leader; retrying");
                    retried = true;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                result => return (result, retried),
            }
        }
    }

    async fn get(
        &self,
        key: impl Into<Vec<u8>>,
        opts: Option<GetOptions>,
    ) -> EtcdResult<GetResponse> {
        let key = key.into();
        self.retry_transient(|mut c| {
            let (key, opts) = (key.clone(), opts.clone());
            async move { c.get(key, opts).await }
        })
        .await
        .0
    }

    /// A conditional write, retried through leader elections; `true` when
    /// an attempt failed ambiguously first (see [`Kv::retry_transient`]).
    async fn txn_write(&self, txn: Txn) -> (EtcdResult<TxnResponse>, bool) {
        self.retry_transient(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    async fn delete(&self, key: &str, opts: Option<DeleteOptions>) -> EtcdResult<DeleteResponse> {
        self.retry(|mut c| {
            let opts = opts.clone();
            async move { c.delete(key, opts).await }
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> EtcdResult<TxnResponse> {
        self.retry(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    async fn compact(
        &self,
        revision: Revision,
        opts: Option<CompactionOptions>,
    ) -> EtcdResult<CompactionResponse> {
        self.retry(|mut c| {
            let opts = opts.clone();
            async move { c.compact(revision, opts).await }
        })
        .await
    }
}

/// Errors etcd gives while it has no leader (member lost, election under
/// way): the request may be retried once a leader is elected.
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unavailable
                || status.message().contains("leader changed")
                || status.message().contains("no leader")
        }
        _ => false,
    }
}

/// True when the request failed because an endpoint refused the
/// connection, i.e. it was never sent.
fn refused(e: &etcd_client::Error) -> bool {
    let mut source = inner_error(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// The error an etcd client error wraps: `etcd_client::Error` itself has
/// no `source()`, so its causes are only reachable through it.
fn inner_error(e: &etcd_client::Error) -> Option<&(dyn std::error::Error + 'static)> {
    match e {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        etcd_client::Error::TransportError(transport) => Some(transport),
        etcd_client::Error::IoError(io) => Some(io),
        _ => None,
    }
}

/// One connection attempt: connect and prove etcd answers a linearizable
/// read (which needs a leader), all within `limit`.
async fn try_connect(endpoints: &[String], limit: Duration) -> std::result::Result<Client, String> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(limit)
        .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT);
    let attempt = async {
        let client = Client::connect(endpoints, Some(opts)).await?;
        // Not `Kv::get`: that waits out elections, and connect has its own
        // retry loop with the caller's deadline.
        Kv::new(&client, endpoints.len())
            .retry(|mut c| async move {
                c.get(PROBE_KEY, Some(GetOptions::new().with_count_only()))
                    .await
            })
            .await?;
        Ok::<_, etcd_client::Error>(client)
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(describe(&e)),
        Err(_) => Err(format!("no answer within {:.1}s", limit.as_secs_f64())),
    }
}

/// etcd errors with a meaning in the trait.
enum Known {
    Compacted,
    Future,
}

fn classify(e: &etcd_client::Error) -> Option<Known> {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return None;
    };
    let message = status.message();
    if message.contains("required revision has been compacted") {
        Some(Known::Compacted)
    } else if message.contains("required revision is a future revision") {
        Some(Known::Future)
    } else {
        None
    }
}

/// A one-line description of an etcd client error, with its causes (tonic's
/// transport errors say little without them).
fn describe(e: &etcd_client::Error) -> String {
    let mut text = match e {
        etcd_client::Error::GRpcStatus(status) => {
            format!("{:?}: {}", status.code(), status.message())
        }
        other => other.to_string(),
    };
    let mut source = inner_error(e).and_then(std::error::Error::source);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn etcd_error(e: &etcd_client::Error) -> StoreError {
    StoreError::Etcd(describe(e))
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| StoreError::Etcd("etcd sent a response without a header".to_owned()))
}

fn utf8_key(key: Vec<u8>) -> Result<String> {
    String::from_utf8(key).map_err(|e| {
        StoreError::Etcd(format!(
            "etcd holds a key that is not UTF-8: {:?}",
            String::from_utf8_lossy(e.as_bytes())
        ))
    })
}

fn owned_kv(kv: etcd_client::KeyValue) -> Result<KeyValue> {
    let (create_revision, mod_revision) = (kv.create_revision(), kv.mod_revision());
    let (key, value) = kv.into_key_value();
    Ok(KeyValue {
        key: utf8_key(key)?,
        value: Bytes::from(value),
        create_revision,
        mod_revision,
    })
}

fn copied_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    Ok(KeyValue {
        key: utf8_key(kv.key().to_vec())?,
        value: Bytes::copy_from_slice(kv.value()),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

/// The mod revision of the key a transaction's failure
/// branch read, if the key exists.
fn failed_read(responses: Vec<TxnOpResponse>) -> Option<Revision> {
    responses.into_iter().find_map(|r| match r {
        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.mod_revision()),
        _ => None,
    })
}

fn unexpected_txn(op: &str, key: &str) -> StoreError {
    StoreError::Etcd(format!(
        "etcd's answer to the {op} transaction on {key} lacks its result"
    ))
}

#[async_trait]
impl Store for EtcdStore {
    async fn revision(&self) -> Result<Revision> {
        let resp = self
            .kv()
            .get(PROBE_KEY, Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|e| etcd_error(&e))?;
        header_revision(resp.header())
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut resp = self.kv().get(key, None).await.map_err(|e| etcd_error(&e))?;
        resp.take_kvs().into_iter().next().map(owned_kv).transpose()
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value.to_vec(), None)]);
        let (resp, retried) = self.kv().txn_write(txn).await;
        let resp = resp.map_err(|e| etcd_error(&e))?;
        if !resp.succeeded() {
            // After an ambiguous failure the first attempt may be what
            // exists now: the stored bytes tell (objects carry a fresh uid).
            if retried
                && let Some(kv) = self.get(key).await?
                && kv.value == value
            {
                return Ok(kv);
            }
            return Err(StoreError::AlreadyExists {
                key: key.to_owned(),
            });
        }
        let revision = header_revision(resp.header())?;
        Ok(KeyValue {
            key: key.to_owned(),
            value,
            create_revision: revision,
            mod_revision: revision,
        })
    }

    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<KeyValue> {
        let keys_only = || Some(GetOptions::new().with_keys_only());
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key, CompareOp::Equal, expected),
                Compare::version(key, CompareOp::Greater, 0),
            ])
            .and_then([
                TxnOp::put(key, value.to_vec(), None),
                TxnOp::get(key, keys_only()),
            ])
            .or_else([TxnOp::get(key, keys_only())]);
        let (resp, retried) = self.kv().txn_write(txn).await;
        let resp = resp.map_err(|e| etcd_error(&e))?;
        if !resp.succeeded() {
            // As in create: our own earlier attempt may have won.
            if retried
                && let Some(kv) = self.get(key).await?
                && kv.value == value
            {
                return Ok(kv);
            }
            return Err(match failed_read(resp.op_responses()) {
                None => StoreError::NotFound {
                    key: key.to_owned(),
                },
                Some(actual) => StoreError::Conflict {
                    key: key.to_owned(),
                    expected,
                    actual,
                },
            });
        }
        let revision = header_revision(resp.header())?;
        let create_revision = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.create_revision()),
                _ => None,
            })
            .ok_or_else(|| unexpected_txn("update", key))?;
        Ok(KeyValue {
            key: key.to_owned(),
            value,
            create_revision,
            mod_revision: revision,
        })
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<Deleted> {
        let with_prev = || Some(DeleteOptions::new().with_prev_key());
        let (revision, prev) = match expected {
            None => {
                let mut resp = self
                    .kv()
                    .delete(key, with_prev())
                    .await
                    .map_err(|e| etcd_error(&e))?;
                let revision = header_revision(resp.header())?;
                (revision, resp.take_prev_kvs().into_iter().next())
            }
            Some(expected) => {
                let txn = Txn::new()
                    .when([
                        Compare::mod_revision(key, CompareOp::Equal, expected),
                        Compare::version(key, CompareOp::Greater, 0),
                    ])
                    .and_then([TxnOp::delete(key, with_prev())])
                    .or_else([TxnOp::get(key, Some(GetOptions::new().with_keys_only()))]);
                let resp = self.kv().txn(txn).await.map_err(|e| etcd_error(&e))?;
                if !resp.succeeded() {
                    return Err(match failed_read(resp.op_responses()) {
                        None => StoreError::NotFound {
                            key: key.to_owned(),
                        },
                        Some(actual) => StoreError::Conflict {
                            key: key.to_owned(),
                            expected,
                            actual,
                        },
                    });
                }
                let revision = header_revision(resp.header())?;
                let prev = resp.op_responses().into_iter().find_map(|r| match r {
                    TxnOpResponse::Delete(mut d) => d.take_prev_kvs().into_iter().next(),
                    _ => None,
                });
                if prev.is_none() {
                    return Err(unexpected_txn("delete", key));
                }
                (revision, prev)
            }
        };
        match prev {
            Some(prev) => Ok(Deleted {
                prev: owned_kv(prev)?,
                revision,
            }),
            None => Err(StoreError::NotFound {
                key: key.to_owned(),
            }),
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
        match req.revision {
            Some(r) if r < 0 => {
                return Err(StoreError::InvalidRequest(format!(
                    "list revision {r} is negative"
                )));
            }
            // etcd reads "revision 0" as "the newest"; here it means
            // "before everything", which is empty (etcd's history starts
            // with an empty revision 1) unless compacted away.
            Some(0) => {
                self.check_not_compacted(1, 0).await?;
                return Ok(ListPage {
                    items: Vec::new(),
                    revision: 0,
                    more: false,
                });
            }
            _ => {}
        }
        let end = prefix_end(req.prefix.as_bytes()).unwrap_or_else(|| vec![0]);
        let mut from = req.start.unwrap_or(req.prefix).as_bytes().to_vec();
        if from.is_empty() {
            // etcd rejects an empty key; "\0" is the smallest key there is.
            from.push(0);
        }
        let mut opts = GetOptions::new().with_range(end);
        if req.limit > 0 {
            opts = opts.with_limit(i64::try_from(req.limit).unwrap_or(i64::MAX));
        }
        if let Some(r) = req.revision {
            opts = opts.with_revision(r);
        }
        let mut resp = match self.kv().get(from, Some(opts)).await {
            Ok(resp) => resp,
            Err(e) => return Err(self.read_error(e, req.revision.unwrap_or(0)).await),
        };
        let revision = match req.revision {
            Some(r) => r,
            None => header_revision(resp.header())?,
        };
        let more = resp.more();
        let items = resp
            .take_kvs()
            .into_iter()
            .map(owned_kv)
            .collect::<Result<Vec<_>>>()?;
        Ok(ListPage {
            items,
            revision,
            more,
        })
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch> {
        if after < 0 {
            return Err(StoreError::InvalidRequest(format!(
                "watch revision {after} is negative"
            )));
        }
        // A watch's start is compacted exactly when a read at it is; asking
        // first makes `watch()` itself fail instead of the stream, later.
        self.check_not_compacted(after + 1, after).await?;
        let mut task = WatchTask {
            client: self.inner.watch.clone(),
            endpoints: self.inner.endpoints.clone(),
            key: prefix.as_bytes().to_vec(),
            prefix: prefix.to_owned(),
            next: after + 1,
            tx: None,
        };
        // Like `Kv`, re-send a create that an endpoint refused.
        let mut attempt = 1;
        let (watcher, stream) = loop {
            match task.open().await {
                Ok(opened) => break opened,
                Err(e) if attempt < self.inner.kv.attempts && refused(&e) => {
                    attempt += 1;
                    tokio::time::sleep(REFUSED_RETRY_DELAY).await;
                }
                Err(e) => return Err(etcd_error(&e)),
            }
        };
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        task.tx = Some(tx);
        tokio::spawn(task.run(watcher, stream));
        Ok(Watch::new(rx))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        if revision <= 1 {
            // Nothing precedes revision 1.
            return Ok(());
        }
        let opts = CompactionOptions::new().with_physical();
        match self.kv().compact(revision, Some(opts)).await {
            Ok(_) => Ok(()),
            Err(e) => match classify(&e) {
                // At or below an earlier compaction.
                Some(Known::Compacted) => Ok(()),
                Some(Known::Future) => Err(StoreError::FutureRevision {
                    requested: revision,
                    current: self.revision().await?,
                }),
                None => Err(etcd_error(&e)),
            },
        }
    }
}

/// Forwards one etcd watch into a [`Watch`]'s channel.
struct WatchTask {
    client: WatchClient,
    endpoints: String,
    /// The watched prefix, as etcd's key and for messages.
    key: Vec<u8>,
    prefix: String,
    /// The first revision not delivered yet.
    next: Revision,
    /// Set once the watch is established.
    tx: Option<mpsc::Sender<Result<Event>>>,
}

/// Why forwarding stopped.
enum Stop {
    /// The `Watch` was dropped.
    Dropped,
    /// The watch is over; tell the receiver why.
    Fail(StoreError),
    /// The gRPC stream broke; re-create the watch.
    Broken(String),
}

impl WatchTask {
    /// Creates the etcd watch from `self.next` on (etcd answers once it is
    /// created).
    async fn open(&mut self) -> std::result::Result<(Watcher, WatchStream), etcd_client::Error> {
        let mut opts = WatchOptions::new()
            .with_start_revision(self.next)
            .with_prev_key();
        opts = match prefix_end(&self.key) {
            Some(end) => opts.with_range(end),
            None => opts.with_range(vec![0]),
        };
        let key = if self.key.is_empty() {
            vec![0]
        } else {
            self.key.clone()
        };
        self.client.watch(key, Some(opts)).await
    }

    async fn run(mut self, mut watcher: Watcher, mut stream: WatchStream) {
        let Some(tx) = self.tx.clone() else {
            return;
        };
        loop {
            match self.forward(&tx, &mut stream).await {
                Stop::Dropped => {
                    // Dropping the stream ends it too; cancelling is polite.
                    let _ = watcher.cancel().await;
                    return;
                }
                Stop::Fail(e) => {
                    let _ = watcher.cancel().await;
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Stop::Broken(reason) => match self.reopen(&tx, reason).await {
                    Some((w, s)) => (watcher, stream) = (w, s),
                    None => return,
                },
            }
        }
    }

    /// Sends events until the stream breaks, etcd cancels the watch, or
    /// the receiver goes away.
    async fn forward(
        &mut self,
        tx: &mpsc::Sender<Result<Event>>,
        stream: &mut WatchStream,
    ) -> Stop {
        loop {
            let message = tokio::select! {
                biased;
                () = tx.closed() => return Stop::Dropped,
                m = stream.message() => m,
            };
            let resp = match message {
                Ok(Some(resp)) => resp,
                Ok(None) => return Stop::Broken("etcd closed the watch stream".to_owned()),
                Err(e) => return Stop::Broken(describe(&e)),
            };
            if resp.compact_revision() > 0 {
                return Stop::Fail(StoreError::Compacted {
                    requested: self.next - 1,
                    compacted: resp.compact_revision(),
                });
            }
            if resp.canceled() {
                return Stop::Fail(StoreError::Etcd(format!(
                    "etcd cancelled the watch on {:?}: {}",
                    self.prefix,
                    resp.cancel_reason()
                )));
            }
            for event in resp.events() {
                let event = match convert_event(event) {
                    Ok(event) => event,
                    Err(e) => return Stop::Fail(e),
                };
                let revision = event.revision();
                if revision < self.next {
                    // Already delivered before a re-watch.
                    continue;
                }
                if tx.send(Ok(event)).await.is_err() {
                    return Stop::Dropped;
                }
                self.next = revision + 1;
            }
        }
    }

    /// Re-creates the watch after its stream broke, with backoff, until it
    /// works or the receiver goes away (then `None`).
    async fn reopen(
        &mut self,
        tx: &mpsc::Sender<Result<Event>>,
        mut reason: String,
    ) -> Option<(Watcher, WatchStream)> {
        let mut delay = BACKOFF_START;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            tracing::warn!(
                endpoints = %self.endpoints,
                prefix = %self.prefix,
                from_revision = self.next,
                attempt,
                error = %reason,
                retry_in_ms = delay.as_millis() as u64,
                "etcd watch stream broke; re-creating the watch"
            );
            tokio::select! {
                () = tx.closed() => return None,
                () = tokio::time::sleep(delay) => {}
            }
            let opened = tokio::select! {
                () = tx.closed() => return None,
                r = tokio::time::timeout(REWATCH_TIMEOUT, self.open()) => r,
            };
            match opened {
                Ok(Ok(watch)) => {
                    tracing::info!(
                        prefix = %self.prefix,
                        from_revision = self.next,
                        attempt,
                        "etcd watch re-created"
                    );
                    return Some(watch);
                }
                Ok(Err(e)) => reason = describe(&e),
                Err(_) => {
                    reason = format!(
                        "creating the watch took over {}s",
                        REWATCH_TIMEOUT.as_secs()
                    );
                }
            }
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }
}

fn convert_event(event: &etcd_client::Event) -> Result<Event> {
    let kv = event
        .kv()
        .ok_or_else(|| StoreError::Etcd("etcd sent a watch event without a key".to_owned()))?;
    let prev = event.prev_kv().map(copied_kv).transpose()?;
    Ok(match event.event_type() {
        EventType::Put => Event::Put {
            kv: copied_kv(kv)?,
            prev,
        },
        EventType::Delete => Event::Delete {
            key: utf8_key(kv.key().to_vec())?,
            revision: kv.mod_revision(),
            prev,
        },
    })
}
