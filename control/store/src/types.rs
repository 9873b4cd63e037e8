use crate::StoreError;
use bytes::Bytes;
use tokio::sync::mpsc;

/// A store revision: a point in the store's single, global history. It is
/// what the API exposes as `resourceVersion`. Revisions start at 1; 0 means
/// "before everything".
pub type Revision = i64;

/// A key's value and its revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// Revision of the write that created the key.
    pub create_revision: Revision,
    /// Revision of the latest write to the key.
    pub mod_revision: Revision,
}

/// The result of a delete: what was deleted and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deleted {
    pub prev: KeyValue,
    pub revision: Revision,
}

/// One change, as a watch delivers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `kv` was created (`prev` is `None`) or updated.
    Put {
        kv: KeyValue,
        prev: Option<KeyValue>,
    },
    /// `key` was deleted at `revision`. `prev` is the deleted value; it is
    /// only missing for an event exactly at a compaction boundary, whose
    /// previous value may already be compacted.
    Delete {
        key: String,
        revision: Revision,
        prev: Option<KeyValue>,
    },
}

impl Event {
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put { kv, .. } => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Event::Put { kv, .. } => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
}

/// A range read: keys under `prefix`, from `start` (inclusive) on.
#[derive(Clone, Copy, Debug, Default)]
pub struct ListRequest<'a> {
    pub prefix: &'a str,
    /// First key to return (inclusive); must be under `prefix`. For the next
    /// page, pass the previous page's [`ListPage::next_start`].
    pub start: Option<&'a str>,
    /// At most this many items; 0 means no limit.
    pub limit: usize,
    /// Read as of this revision; `None` means the newest.
    pub revision: Option<Revision>,
}

impl<'a> ListRequest<'a> {
    pub fn prefix(prefix: &'a str) -> Self {
        Self {
            prefix,
            ..Self::default()
        }
    }
}

/// One page of a range read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListPage {
    pub items: Vec<KeyValue>,
    /// The revision the page was read at; pass it back for the next page.
    pub revision: Revision,
    /// True when keys remain after this page.
    pub more: bool,
}

impl ListPage {
    /// The `start` of the next page, when there is one.
    pub fn next_start(&self) -> Option<String> {
        if !self.more {
            return None;
        }
        self.items.last().map(|kv| format!("{}\0", kv.key))
    }
}

/// A stream of changes. Dropping it cancels the watch.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::Receiver<Result<Event, StoreError>>,
}

impl Watch {
    /// Wraps the receiving end of a backend's event channel. A backend sends
    /// events in revision order and at most one error, after which the watch
    /// has ended.
    pub fn new(rx: mpsc::Receiver<Result<Event, StoreError>>) -> Self {
        Self { rx }
    }

    /// The next change; `None` when the store shut down.
    pub async fn next(&mut self) -> Option<Result<Event, StoreError>> {
        self.rx.recv().await
    }
}

/// The smallest key greater than every key that starts with `prefix`, as
/// etcd computes range ends; `None` when there is no such key (empty prefix
/// or all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(
            prefix_end(b"/registry/pods/"),
            Some(b"/registry/pods0".to_vec())
        );
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }
}
