//! A map that keeps only its newest entries: the edge's caches of what it
//! opened or asked lately, shared by many connections, bounded whatever
//! the traffic.

use std::{collections::VecDeque, hash::Hash, sync::Mutex};

use super::*;

/// At most `cap` entries, behind a lock; past it the one put in first goes.
pub(super) struct Recent<K, V> {
    inner: Mutex<Inner<K, V>>,
    cap: usize,
}

struct Inner<K, V> {
    by_key: HashMap<K, V>,
    order: VecDeque<K>,
}

impl<K: Hash + Eq + Clone, V: Clone> Recent<K, V> {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                by_key: HashMap::new(),
                order: VecDeque::new(),
            }),
            cap,
        }
    }

    /// A copy of the entry of `key`, if it is kept and `keep` says so.
    pub(super) fn get(&self, key: &K, keep: impl FnOnce(&V) -> bool) -> Option<V> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.by_key.get(key).filter(|v| keep(v)).cloned()
    }

    pub(super) fn put(&self, key: K, value: V) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.by_key.insert(key.clone(), value).is_none() {
            inner.order.push_back(key);
        }
        while inner.order.len() > self.cap {
            if let Some(old) = inner.order.pop_front() {
                inner.by_key.remove(&old);
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
        let recent = Recent::new(3);
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
}
