//! Stable numbering: identities, CIDR identities, policy ids and endpoint
//! numbers keep their number for as long as the thing they name exists.

use std::collections::{BTreeMap, BTreeSet};

/// Numbers keys from `first..=last`. A released number is handed out again
/// only once the fresh numbers run out, so a number that just stopped
/// naming one thing does not name another in the very next state (flows,
/// conntrack and a half-applied update may still refer to it).
#[derive(Clone, Debug)]
pub struct StableIds<K> {
    last: u32,
    /// Next fresh number (u64 so that `last == u32::MAX` needs no care).
    next: u64,
    ids: BTreeMap<K, u32>,
    free: BTreeSet<u32>,
}

impl<K: Ord + Clone> StableIds<K> {
    pub fn new(first: u32, last: u32) -> Self {
        Self {
            last,
            next: u64::from(first),
            ids: BTreeMap::new(),
            free: BTreeSet::new(),
        }
    }

    /// Keeps the numbers of the keys in `live`, releases the others and
    /// numbers the new keys in key order (so agents that start from the
    /// same cluster state agree). Keys that find no number left are
    /// returned.
    pub fn sync<'a>(&mut self, live: impl IntoIterator<Item = &'a K>) -> Vec<K>
    where
        K: 'a,
    {
        let live: BTreeSet<&K> = live.into_iter().collect();
        let gone: Vec<K> = self
            .ids
            .keys()
            .filter(|k| !live.contains(k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(n) = self.ids.remove(&k) {
                self.free.insert(n);
            }
        }
        let mut exhausted = Vec::new();
        for k in live {
            if self.ids.contains_key(k) {
                continue;
            }
            match self.take() {
                Some(n) => {
                    self.ids.insert(k.clone(), n);
                }
                None => exhausted.push(k.clone()),
            }
        }
        exhausted
    }

    fn take(&mut self) -> Option<u32> {
        if self.next <= u64::from(self.last)
            && let Ok(n) = u32::try_from(self.next)
        {
            self.next += 1;
            return Some(n);
        }
        self.free.pop_first()
    }

    pub fn get(&self, k: &K) -> Option<u32> {
        self.ids.get(k).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, u32)> {
        self.ids.iter().map(|(k, n)| (k, *n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_survive_and_are_reused_last() {
        let mut ids = StableIds::new(10, 12);
        assert!(ids.sync(&["b".to_string(), "a".to_string()]).is_empty());
        assert_eq!(ids.get(&"a".to_string()), Some(10));
        assert_eq!(ids.get(&"b".to_string()), Some(11));
        ids.sync(&["b".to_string(), "c".to_string()]);
        assert_eq!(ids.get(&"b".to_string()), Some(11));
        assert_eq!(ids.get(&"c".to_string()), Some(12), "fresh before reused");
        ids.sync(&["b".to_string(), "c".to_string(), "d".to_string()]);
        assert_eq!(ids.get(&"d".to_string()), Some(10));
        let left = ids.sync(&[
            "b".to_string(),
            "c".to_string(),
            "d".to_string(),
            "e".to_string(),
        ]);
        assert_eq!(left, vec!["e".to_string()]);
    }
}
