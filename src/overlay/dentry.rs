//! The merged lookup cache: what a name in a directory node resolved to (a
//! node id, or nothing), so repeated lookups on the hot path never touch
//! the layers. Entries are corrected by the operations that change a name.
//!
//! The kernel may hold a node for every file of a tree, each with a
//! positive entry here, so those are kept small: keyed by a hash of
//! (parent, name), with no copy of the name. The node holds its names, and
//! the caller checks a hit against them (`Node::has_name`): a node found
//! through a colliding hash is a miss. Negative entries keep their name.

use std::collections::hash_map::RandomState;
use std::ffi::OsStr;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

/// A cached answer for (parent node, name). A positive one names a node
/// the caller still has to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dentry {
    Positive(u64),
    Negative,
}

/// Negative entries are dropped wholesale past this many, which bounds the
/// cache when something probes many names that do not exist.
const MAX_NEGATIVE: usize = 100_000;

/// The maps' keys are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, _: &[u8]) {
        unreachable!("keys are u64 hashes")
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

type ByHash<V> = DashMap<u64, V, BuildHasherDefault<Prehashed>>;

#[derive(Debug, Default)]
pub(crate) struct DentryCache {
    keys: RandomState,
    positive: ByHash<u64>,
    negative: ByHash<(u64, Box<OsStr>)>,
    negatives: AtomicUsize,
}

impl DentryCache {
    fn key(&self, parent: u64, name: &OsStr) -> u64 {
        self.keys.hash_one((parent, name))
    }

    pub(crate) fn get(&self, parent: u64, name: &OsStr) -> Option<Dentry> {
        let key = self.key(parent, name);
        if let Some(id) = self.positive.get(&key) {
            return Some(Dentry::Positive(*id));
        }
        self.negative
            .get(&key)
            .filter(|entry| entry.0 == parent && *entry.1 == *name)
            .map(|_| Dentry::Negative)
    }

    pub(crate) fn insert_positive(&self, parent: u64, name: &OsStr, id: u64) {
        let key = self.key(parent, name);
        self.negative.remove(&key);
        self.positive.insert(key, id);
    }

    pub(crate) fn insert_negative(&self, parent: u64, name: &OsStr) {
        if self.negatives.fetch_add(1, Ordering::Relaxed) >= MAX_NEGATIVE {
            self.negative.clear();
            self.negatives.store(0, Ordering::Relaxed);
        }
        let key = self.key(parent, name);
        self.positive.remove(&key);
        self.negative.insert(key, (parent, name.into()));
    }

    pub(crate) fn remove(&self, parent: u64, name: &OsStr) {
        let key = self.key(parent, name);
        self.positive.remove(&key);
        self.negative.remove(&key);
    }

    /// Removes the positive entry only while it still names `id` (a newer
    /// answer for the name stays).
    pub(crate) fn remove_if_points_to(&self, parent: u64, name: &OsStr, id: u64) {
        self.positive
            .remove_if(&self.key(parent, name), |_, cached| *cached == id);
    }

    /// Gives back the room of entries that went, once most of it is empty.
    pub(crate) fn shrink(&self) {
        if self.positive.len() * 4 < self.positive.capacity() {
            self.positive.shrink_to_fit();
        }
        if self.negative.len() * 4 < self.negative.capacity() {
            self.negative.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn answers_and_corrections() {
        let cache = DentryCache::default();
        cache.insert_positive(1, name("a"), 7);
        cache.insert_negative(1, name("b"));
        assert_eq!(cache.get(1, name("a")), Some(Dentry::Positive(7)));
        assert_eq!(cache.get(1, name("b")), Some(Dentry::Negative));
        assert_eq!(cache.get(2, name("a")), None);
        assert_eq!(cache.get(2, name("b")), None);
        cache.remove_if_points_to(1, name("a"), 8);
        assert_eq!(cache.get(1, name("a")), Some(Dentry::Positive(7)));
        cache.remove_if_points_to(1, name("a"), 7);
        assert_eq!(cache.get(1, name("a")), None);
    }

    #[test]
    fn the_latest_answer_for_a_name_wins() {
        let cache = DentryCache::default();
        cache.insert_positive(1, name("a"), 7);
        cache.insert_negative(1, name("a"));
        assert_eq!(cache.get(1, name("a")), Some(Dentry::Negative));
        cache.insert_positive(1, name("a"), 9);
        assert_eq!(cache.get(1, name("a")), Some(Dentry::Positive(9)));
        cache.remove(1, name("a"));
        assert_eq!(cache.get(1, name("a")), None);
    }

    #[test]
    fn negative_entries_are_bounded() {
        let cache = DentryCache::default();
        cache.insert_positive(1, name("kept"), 3);
        for i in 0..=MAX_NEGATIVE {
            cache.insert_negative(1, OsStr::new(&format!("n{i}")));
        }
        assert!(cache.negative.len() <= 1, "negatives dropped wholesale");
        assert_eq!(cache.get(1, name("kept")), Some(Dentry::Positive(3)));
    }
}
