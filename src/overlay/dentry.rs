//! The merged lookup cache: what a name in a directory node resolved to (a
//! node id, or nothing), so repeated lookups on the hot path never touch
//! the layers. Entries are corrected by the operations that change a name.

use std::ffi::{OsStr, OsString};
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

/// A cached answer for (parent node, name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dentry {
    Positive(u64),
    Negative,
}

/// Negative entries are dropped wholesale past this many, which bounds the
/// cache when something probes many names that do not exist.
const MAX_NEGATIVE: usize = 100_000;

#[derive(Debug, Default)]
pub(crate) struct DentryCache {
    map: DashMap<(u64, OsString), Dentry>,
    negatives: AtomicUsize,
}

impl DentryCache {
    /// Takes the key by value and gives it back, so a caller holding an
    /// owned name looks it up without a copy.
    pub(crate) fn get_keyed(&self, key: (u64, OsString)) -> (Option<Dentry>, (u64, OsString)) {
        let found = self.map.get(&key).map(|d| *d);
        (found, key)
    }

    pub(crate) fn get(&self, parent: u64, name: &OsStr) -> Option<Dentry> {
        self.get_keyed((parent, name.to_os_string())).0
    }

    pub(crate) fn insert_positive(&self, parent: u64, name: OsString, id: u64) {
        self.map.insert((parent, name), Dentry::Positive(id));
    }

    pub(crate) fn insert_negative(&self, parent: u64, name: OsString) {
        if self.negatives.fetch_add(1, Ordering::Relaxed) >= MAX_NEGATIVE {
            self.map.retain(|_, d| matches!(d, Dentry::Positive(_)));
            self.negatives.store(0, Ordering::Relaxed);
        }
        self.map.insert((parent, name), Dentry::Negative);
    }

    pub(crate) fn remove(&self, parent: u64, name: &OsStr) {
        self.map.remove(&(parent, name.to_os_string()));
    }

    /// Removes the entry only while it still names `id` (a newer answer for
    /// the name stays).
    pub(crate) fn remove_if_points_to(&self, parent: u64, name: OsString, id: u64) {
        self.map
            .remove_if(&(parent, name), |_, d| *d == Dentry::Positive(id));
    }

    pub(crate) fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_corrections() {
        let cache = DentryCache::default();
        cache.insert_positive(1, "a".into(), 7);
        cache.insert_negative(1, "b".into());
        assert_eq!(cache.get(1, OsStr::new("a")), Some(Dentry::Positive(7)));
        assert_eq!(cache.get(1, OsStr::new("b")), Some(Dentry::Negative));
        assert_eq!(cache.get(2, OsStr::new("a")), None);
        cache.remove_if_points_to(1, "a".into(), 8);
        assert_eq!(cache.get(1, OsStr::new("a")), Some(Dentry::Positive(7)));
        cache.remove_if_points_to(1, "a".into(), 7);
        assert_eq!(cache.get(1, OsStr::new("a")), None);
    }

    #[test]
    fn negative_entries_are_bounded() {
        let cache = DentryCache::default();
        cache.insert_positive(1, "kept".into(), 3);
        for i in 0..=MAX_NEGATIVE {
            cache.insert_negative(1, format!("n{i}").into());
        }
        assert!(cache.map.len() <= 2, "negatives dropped wholesale");
        assert_eq!(cache.get(1, OsStr::new("kept")), Some(Dentry::Positive(3)));
    }
}
