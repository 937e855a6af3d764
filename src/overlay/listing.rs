//! Listings served by (directory, offset), with nothing kept per open: the
//! kernel opens directories without asking the daemon (see the adapter's
//! `opendir`), so a reader is known only by the offset it resumes at.
//!
//! An entry's offset comes from its name alone, a keyed hash, and listings
//! are in offset order. A reader resuming at offset N is given the names
//! past N in whatever listing is current, so a name present throughout is
//! listed exactly once however the directory changes meanwhile; POSIX
//! leaves open only whether names added or removed meanwhile show. A
//! listing is therefore only a cache, which may be dropped at any time:
//! one is kept per directory while readers are in the middle of it, and
//! dropped when one reaches its end, when the kernel forgets the directory,
//! when no reader has continued in it for a minute (a reader that stopped
//! halfway never says so: closedir sends nothing), or to stay within a
//! budget of entries.
//!
//! Offsets stay below 2^31, so that a telldir(3) position fits the `long`
//! of a 32-bit program (and the 32-bit d_off of its getdents(2)), as kernel
//! overlayfs' positions in a merged directory do. Names whose hashes meet
//! take consecutive offsets; only a name added or removed right next to
//! such a run can move another name's offset (with 100k names, about one
//! change in 10,000), and a reader resuming across that change may then
//! see that one name twice or miss it.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::readdir::DirEntry;

/// "." and ".." come first, at fixed offsets; names follow.
const DOT: u64 = 1;
const DOT_DOT: u64 = 2;
const FIRST_NAME: u64 = 3;
/// Room at the top for runs of names whose hashes meet.
const NAME_SPAN: u64 = (1 << 31) - FIRST_NAME - (1 << 16);

/// Entries held by all cached listings together (some 20 MiB). One
/// directory larger than this is still served from a listing of its own;
/// it only pushes the others out.
const ENTRY_BUDGET: usize = 1 << 18;
/// A listing no reader has continued in for this long is dropped when the
/// next one is put.
const IDLE: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Listed {
    pub entry: DirEntry,
    /// Where a reader resumes after this entry (its d_off).
    pub offset: u64,
}

/// One directory's entries in offset order.
#[derive(Debug)]
pub struct Listing {
    entries: Vec<Listed>,
    /// The FUSE generation of the node listed: a node id the kernel reuses
    /// for a new directory must not be served the old one's listing.
    generation: u64,
}

impl Listing {
    pub fn new(entries: Vec<DirEntry>, generation: u64, hash: impl Fn(&[u8]) -> u64) -> Listing {
        let mut listed: Vec<Listed> = entries
            .into_iter()
            .map(|entry| {
                let offset = match entry.name.as_bytes() {
                    b"." => DOT,
                    b".." => DOT_DOT,
                    name => FIRST_NAME + hash(name) % NAME_SPAN,
                };
                Listed { entry, offset }
            })
            .collect();
        listed.sort_unstable_by(|a, b| (a.offset, &a.entry.name).cmp(&(b.offset, &b.entry.name)));
        // Names whose hashes meet take the next free offsets, in name order.
        for i in 1..listed.len() {
            let previous = listed[i - 1].offset;
            if listed[i].offset <= previous {
                listed[i].offset = previous + 1;
            }
        }
        Listing {
            entries: listed,
            generation,
        }
    }

    /// The entries a reader that stopped at `offset` has not seen yet (all
    /// of them from offset 0).
    pub fn after(&self, offset: u64) -> &[Listed] {
        let start = self.entries.partition_point(|e| e.offset <= offset);
        &self.entries[start..]
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

struct Held {
    listing: Arc<Listing>,
    last_used: Instant,
}

/// The listings readers are in the middle of, by directory node id.
pub struct ListingCache {
    held: DashMap<u64, Held>,
    entries: AtomicUsize,
    /// Keys the offset hash: chosen per mount, so names in a layer cannot
    /// be made to meet on purpose.
    keys: RandomState,
    budget: usize,
    idle: Duration,
}

impl Default for ListingCache {
    fn default() -> ListingCache {
        ListingCache::with_limits(ENTRY_BUDGET, IDLE)
    }
}

impl ListingCache {
    fn with_limits(budget: usize, idle: Duration) -> ListingCache {
        ListingCache {
            held: DashMap::new(),
            entries: AtomicUsize::new(0),
            keys: RandomState::new(),
            budget,
            idle,
        }
    }

    /// Puts `entries` in offset order.
    pub fn listing(&self, entries: Vec<DirEntry>, generation: u64) -> Arc<Listing> {
        Arc::new(Listing::new(entries, generation, |name| {
            self.keys.hash_one(name)
        }))
    }

    /// The listing held for `dir`, if it is of the node with `generation`.
    pub fn get(&self, dir: u64, generation: u64) -> Option<Arc<Listing>> {
        let mut held = self.held.get_mut(&dir)?;
        if held.listing.generation != generation {
            return None;
        }
        held.last_used = Instant::now();
        Some(held.listing.clone())
    }

    /// Keeps `listing` for the readers of `dir` that continue from it. Drops
    /// the idle others, and past the budget the least recently read.
    pub fn put(&self, dir: u64, listing: Arc<Listing>) {
        let now = Instant::now();
        // Counted before it can be removed, so the count never wraps.
        self.entries.fetch_add(listing.len(), Ordering::Relaxed);
        let held = Held {
            listing,
            last_used: now,
        };
        if let Some(old) = self.held.insert(dir, held) {
            self.entries.fetch_sub(old.listing.len(), Ordering::Relaxed);
        }
        self.held.retain(|held_dir, h| {
            let keep = *held_dir == dir || now.duration_since(h.last_used) < self.idle;
            if !keep {
                self.entries.fetch_sub(h.listing.len(), Ordering::Relaxed);
            }
            keep
        });
        let mut total = self.entries.load(Ordering::Relaxed);
        while total > self.budget {
            let oldest = self
                .held
                .iter()
                .filter(|h| *h.key() != dir)
                .min_by_key(|h| h.last_used)
                .map(|h| *h.key());
            let Some(oldest) = oldest else { break };
            self.forget(oldest);
            total = self.entries.load(Ordering::Relaxed);
        }
    }

    /// A reader reached the end of `listing`: the next reader starts afresh.
    /// A newer listing put meanwhile stays.
    pub fn finished(&self, dir: u64, listing: &Arc<Listing>) {
        if let Some((_, old)) = self
            .held
            .remove_if(&dir, |_, h| Arc::ptr_eq(&h.listing, listing))
        {
            self.entries.fetch_sub(old.listing.len(), Ordering::Relaxed);
        }
    }

    /// The kernel forgot the directory: no reader can continue in it.
    pub fn forget(&self, dir: u64) {
        if let Some((_, old)) = self.held.remove(&dir) {
            self.entries.fetch_sub(old.listing.len(), Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    fn held_entries(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::ffi::OsString;

    use super::*;
    use crate::overlay::FileKind;

    fn entries(names: &[&str]) -> Vec<DirEntry> {
        [".", ".."]
            .iter()
            .chain(names)
            .enumerate()
            .map(|(i, name)| DirEntry {
                name: OsString::from(name),
                ino: i as u64 + 10,
                kind: FileKind::Regular,
            })
            .collect()
    }

    fn names(listed: &[Listed]) -> Vec<String> {
        listed
            .iter()
            .map(|l| l.entry.name.to_string_lossy().into_owned())
            .collect()
    }

    fn numbered(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("f{i}")).collect()
    }

    fn refs(names: &[String]) -> Vec<&str> {
        names.iter().map(String::as_str).collect()
    }

    /// Reads `first` from offset 0 for `stop_after` entries, then carries on
    /// from the last offset in `second`, as a reader does across a change.
    fn read_across(first: &Listing, stop_after: usize, second: &Listing) -> Vec<String> {
        let start = &first.after(0)[..stop_after];
        let resume = start.last().map_or(0, |l| l.offset);
        let mut seen = names(start);
        seen.extend(names(second.after(resume)));
        seen
    }

    #[test]
    fn dots_come_first_and_offsets_rise() {
        let cache = ListingCache::default();
        let listing = cache.listing(entries(&["a", "b", "c"]), 0);
        let all = listing.after(0);
        assert_eq!(names(&all[..2]), [".", ".."]);
        assert_eq!((all[0].offset, all[1].offset), (DOT, DOT_DOT));
        assert!(all.windows(2).all(|w| w[0].offset < w[1].offset));
        assert!(
            all.iter().all(|l| l.offset < 1 << 31),
            "fits telldir of 32-bit programs"
        );
    }

    #[test]
    fn resuming_at_any_offset_gives_the_rest() {
        let cache = ListingCache::default();
        let listing = cache.listing(entries(&refs(&numbered(0..50))), 0);
        let all = listing.after(0);
        for (i, listed) in all.iter().enumerate() {
            assert_eq!(names(listing.after(listed.offset)), names(&all[i + 1..]));
            // A position between two offsets (seekdir to a number no entry
            // had) resumes at the next entry.
            assert_eq!(names(listing.after(listed.offset - 1)), names(&all[i..]));
        }
        assert!(listing.after(all.last().unwrap().offset).is_empty());
    }

    #[test]
    fn a_reader_across_a_change_sees_every_name_that_stayed_once() {
        let cache = ListingCache::default();
        let before = numbered(0..300);
        let first = cache.listing(entries(&refs(&before)), 0);
        // 100 names removed, 100 added.
        let after: Vec<String> = numbered(100..400);
        let second = cache.listing(entries(&refs(&after)), 0);
        for stop_after in [0, 1, 2, 50, 150, 302] {
            let seen = read_across(&first, stop_after, &second);
            let unique: HashSet<&String> = seen.iter().collect();
            assert_eq!(unique.len(), seen.len(), "nothing listed twice");
            for name in numbered(100..300) {
                assert!(unique.contains(&name), "{name} stayed and was skipped");
            }
        }
    }

    #[test]
    fn names_whose_hashes_meet_keep_distinct_offsets() {
        // Every name hashes alike: offsets follow name order.
        let listing = Listing::new(entries(&["c", "a", "b"]), 0, |_| 7);
        let all = listing.after(0);
        assert_eq!(names(all), [".", "..", "a", "b", "c"]);
        let offsets: Vec<u64> = all[2..].iter().map(|l| l.offset).collect();
        assert_eq!(offsets, [FIRST_NAME + 7, FIRST_NAME + 8, FIRST_NAME + 9]);
        assert_eq!(names(listing.after(FIRST_NAME + 7)), ["b", "c"]);
        // A name further on keeps its own offset.
        let listing = Listing::new(entries(&["a", "z"]), 0, |n| if n == b"z" { 100 } else { 7 });
        assert_eq!(listing.after(0)[3].offset, FIRST_NAME + 100);
    }

    #[test]
    fn a_listing_is_held_until_read_to_the_end() {
        let cache = ListingCache::default();
        let listing = cache.listing(entries(&["a"]), 3);
        cache.put(9, listing.clone());
        assert!(cache.get(9, 4).is_none(), "another node under the same id");
        assert!(Arc::ptr_eq(&cache.get(9, 3).unwrap(), &listing));
        let newer = cache.listing(entries(&["a", "b"]), 3);
        cache.put(9, newer.clone());
        cache.finished(9, &listing);
        assert!(cache.get(9, 3).is_some(), "the newer listing stays");
        cache.finished(9, &newer);
        assert!(cache.get(9, 3).is_none());
        assert_eq!(cache.held_entries(), 0);
    }

    #[test]
    fn listings_past_the_budget_push_out_the_least_recently_read() {
        let cache = ListingCache::with_limits(14, IDLE);
        for dir in 1..=3 {
            cache.put(dir, cache.listing(entries(&["a", "b"]), 0));
        }
        assert!(cache.get(1, 0).is_some());
        cache.put(4, cache.listing(entries(&["a", "b", "c"]), 0));
        assert!(cache.get(2, 0).is_none(), "least recently read");
        assert!(cache.get(1, 0).is_some() && cache.get(4, 0).is_some());
        assert!(cache.held_entries() <= 14);
        // One listing larger than the budget is still held, alone.
        cache.put(5, cache.listing(entries(&refs(&numbered(0..20))), 0));
        assert!(cache.get(5, 0).is_some());
        assert_eq!(cache.held_entries(), 22);
        cache.forget(5);
        assert_eq!(cache.held_entries(), 0);
    }

    #[test]
    fn an_idle_listing_goes_when_the_next_is_put() {
        let cache = ListingCache::with_limits(1000, Duration::ZERO);
        cache.put(1, cache.listing(entries(&["a"]), 0));
        cache.put(2, cache.listing(entries(&["b"]), 0));
        assert!(cache.get(1, 0).is_none());
        assert!(cache.get(2, 0).is_some(), "the one just put stays");
        assert_eq!(cache.held_entries(), 3);
    }
}
