//! A map that keeps only its newest entries: the edge's caches of what it
//! opened or asked lately, shared by many connections, bounded whatever
//! the traffic.

use std::{collections::VecDeque, hash::Hash, sync::Mutex};

use super::*;

/// At most `cap` entries, and at most `max_bytes` as `weigh` counts them,
/// behind a lock; past either the one put in first goes.
pub(super) struct Recent<K, V> {
    inner: Mutex<Inner<K, V>>,
    cap: usize,
    max_bytes: usize,
    weigh: fn(&V) -> usize,
}

struct Inner<K, V> {
    by_key: HashMap<K, V>,
    order: VecDeque<K>,
    bytes: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> Recent<K, V> {
    /// Bounded by the number of entries and by their bytes, as `weigh`
    /// counts them (every cache of the edge holds something a client
    /// chose the size of).
    pub(super) fn new(cap: usize, max_bytes: usize, weigh: fn(&V) -> usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                by_key: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
            }),
            cap,
            max_bytes,
            weigh,
        }
    }

    /// A copy of the entry of `key`, if it is kept and `keep` says so.
    pub(super) fn get(&self, key: &K, keep: impl FnOnce(&V) -> bool) -> Option<V> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.by_key.get(key).filter(|v| keep(v)).cloned()
    }

    pub(super) fn put(&self, key: K, value: V) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.bytes += (self.weigh)(&value);
        match inner.by_key.insert(key.clone(), value) {
            Some(old) => inner.bytes -= (self.weigh)(&old),
            None => inner.order.push_back(key),
        }
        while inner.order.len() > self.cap || inner.bytes > self.max_bytes {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            if let Some(v) = inner.by_key.remove(&old) {
                inner.bytes -= (self.weigh)(&v);
            }
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        debug_assert_eq!(inner.by_key.len(), inner.order.len());
        inner.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_keeps_the_newest_cap_entries() {
        let recent = Recent::new(3, usize::MAX, |_| 0);
        for k in 0..5u64 {
            recent.put(k, k * 10);
        }
        // putting a kept key again takes no second place
        recent.put(4, 41);
        assert_eq!(recent.len(), 3);
        assert_eq!(recent.get(&1, |_| true), None, "the oldest went");
        assert_eq!(recent.get(&2, |_| true), Some(20));
        assert_eq!(recent.get(&4, |_| true), Some(41));
        assert_eq!(recent.get(&4, |v| *v == 40), None, "refused by keep");
    }

    #[test]
    fn it_keeps_the_newest_entries_within_the_bytes() {
        let recent: Recent<u64, String> = Recent::new(100, 10, String::len);
        recent.put(1, "aaaa".into());
        recent.put(2, "bbbb".into());
        assert_eq!(recent.len(), 2);
        recent.put(3, "cccc".into());
        assert_eq!(recent.len(), 2, "12 bytes > 10: the oldest went");
        assert_eq!(recent.get(&1, |_| true), None);
        // a kept key put again counts its new size, not both
        recent.put(3, "c".into());
        recent.put(4, "dddd".into());
        assert_eq!(recent.len(), 3, "4 + 1 + 4 bytes");
        // one entry past the budget is not kept at all
        recent.put(5, "e".repeat(11));
        assert_eq!(recent.len(), 0);
        recent.put(6, "f".into());
        assert_eq!(recent.get(&6, |_| true).as_deref(), Some("f"));
    }
}
