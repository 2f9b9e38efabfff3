//! A bounded in-memory cache of the mirror, in front of RocksDB.
//!
//! Every replicated command reads the mirrored state of its key before it changes it; read from
//! RocksDB, that is a memtable skiplist search (or a block read) per command, which profiling
//! showed to be the largest single cost of capture (docs/benchmarks.md). The cache holds the
//! decoded values of recently touched keys that exist, up to `[buffer] mirror_cache_mb`; what
//! does not fit is read from RocksDB as before.
//!
//! Entries own their bytes: keys, field names and values that came from the replication stream
//! are copied where they enter the mirror (`apply::owned`), never kept as slices of a stream
//! read, which would keep the whole read buffer alive unseen by the weight.
//!
//! Coherence rule: the cache only ever holds what the mirror holds **as of the last commit**.
//! Capture is the only writer of the mirror and the only user of the cache. A hash write on a
//! cached key runs on the cached entry, under the cache's lock
//! ([`MirrorCache::update_in_place`]): when it leaves the entry as it was (most writes when
//! values repeat), the entry stays, never moved out, put back or weighed again; when it
//! changes it, the entry is moved out in the same lookup. Otherwise a batch *takes* the entries
//! it touches out of the cache (moved, not copied: copying a hash per command was about 6% of
//! capture's time, dropping the replaced copy another 4%). An entry it changed goes back in
//! only once the batch's write succeeded; one it only read, once every earlier batch is
//! written (its value is then the store's, and the batch's own write cannot change it:
//! `working_set::Flushed::unchanged_written`). This relies on one batch at most being in
//! flight, the one each new batch reads through. A batch dropped for a resync leaves the keys
//! it took uncached, and they are read from RocksDB, which holds the same. A full sync rewrites
//! the mirror outside working sets, so it empties the cache when it starts and when it ends.
//! Other readers of the mirror (the write-back task, `status`) read RocksDB, which holds the
//! same as of the last commit.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::buffer::{KeyRef, MirrorValue};

/// Bytes counted for an entry besides its key and fields: the table slot, the value's header
/// and the key's allocation. The fields count what they take ([`Fields::heap_bytes`](crate::buffer::Fields::heap_bytes)):
/// a model that undercounted (64 bytes a field, when a B-tree node alone took 900) let a
/// "64 MB" cache take 160 MB and more (scripts/soak.sh).
const ENTRY_OVERHEAD: u64 = 160;

pub type Key = (u32, Bytes);
type Value = Option<MirrorValue>;

/// A cached value with its weight, computed once when it goes in: the cache weighs an entry
/// again when it takes it out, and walking the fields of a hash that is no longer in the CPU's
/// caches then cost about 2% of capture's thread.
///
/// The value is in a `RefCell` so that a write can change it where it is, inside the cache's
/// `remove_if` (`MirrorCache::update_in_place`): one lookup decides, changes and, when the
/// value changed, removes it.
struct Weighed {
    value: RefCell<MirrorValue>,
    weight: u64,
}

impl Weighed {
    fn new(key: &Key, value: MirrorValue) -> Weighed {
        let weight = ENTRY_OVERHEAD + key.1.len() as u64 + value.fields.heap_bytes();
        Weighed {
            value: RefCell::new(value),
            weight,
        }
    }
}

#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<Key, Weighed> for Weight {
    fn weight(&self, _key: &Key, value: &Weighed) -> u64 {
        value.weight
    }
}

type Inner = quick_cache::unsync::Cache<Key, Weighed, Weight>;

/// What [`MirrorCache::update_in_place`] did.
pub enum InPlace<C, R> {
    /// The key is not cached (or the cache is disabled), or `accept` refused its value: the
    /// change did not run, and its input is given back.
    NotRun(C),
    /// The change left the value as it was: it stays cached.
    Unchanged(R),
    /// The value is no longer cached: the batch holds it, with its owned key, and writes it
    /// back when `changed`.
    Taken {
        result: R,
        key: Key,
        value: Value,
        changed: bool,
    },
}

/// A shared handle to the cache (capture's batches and its state hold it); `None` inside when
/// the cache is disabled (size 0).
#[derive(Clone, Default)]
pub struct MirrorCache {
    inner: Option<Arc<Mutex<Inner>>>,
    /// Bytes it may hold.
    capacity: u64,
}

impl MirrorCache {
    /// A cache holding about `bytes` of mirrored values (0: no cache).
    pub fn new(bytes: u64) -> MirrorCache {
        if bytes == 0 {
            return MirrorCache::default();
        }
        // The item estimate only sizes the hash table; the weight is what bounds the cache.
        let items = (bytes / 256).max(16) as usize;
        let cache = Inner::with_weighter(items, bytes, Weight);
        MirrorCache {
            inner: Some(Arc::new(Mutex::new(cache))),
            capacity: bytes,
        }
    }

    fn lock(&self) -> Option<MutexGuard<'_, Inner>> {
        // A panic while holding the lock may have left an entry half changed (or as the empty
        // placeholder of `update_in_place`): the cache then forgets everything, and what it
        // held is read from RocksDB, which holds the same.
        self.inner.as_ref().map(|m| {
            m.lock().unwrap_or_else(|poisoned| {
                m.clear_poison();
                let mut cache = poisoned.into_inner();
                cache.clear();
                cache
            })
        })
    }

    /// A copy of the mirrored state of a key as of the last commit, when cached.
    pub fn get(&self, db: u32, key: &[u8]) -> Option<Value> {
        let cache = self.lock()?;
        let value = cache.get(&KeyRef { db, key })?.value.borrow().clone();
        Some(Some(value))
    }

    /// The mirrored state of a key as of the last commit, moved out of the cache with its
    /// owned key (which the batch keeps rather than allocating another), when cached; the
    /// batch that took it puts it back ([`MirrorCache::insert_committed`]; see the module doc
    /// for when).
    pub fn take(&self, db: u32, key: &[u8]) -> Option<(Key, Value)> {
        self.lock()?
            .remove(&KeyRef { db, key })
            .map(|(key, weighed)| (key, Some(weighed.value.into_inner())))
    }

    /// Looks up each of `keys` that is cached, under one lock, and reads a byte of each value
    /// of a small hash ([`Fields::warm`](crate::buffer::Fields::warm)). The lookups of
    /// different keys do not depend on one another, so the processor overlaps their cache
    /// misses, which one lookup (and one lock, a fence) per key, between the commands that use
    /// them, never lets it do; the commands then find the entries in the processor's caches.
    pub fn warm_each<'k>(&self, keys: impl IntoIterator<Item = KeyRef<'k>>) {
        let Some(cache) = self.lock() else {
            return;
        };
        for key in keys {
            if let Some(weighed) = cache.get(&key) {
                weighed.value.borrow().fields.warm();
            }
        }
    }

    /// Runs `change` (with its `input`) on the cached value of a key where it is cached, when
    /// `accept` takes it. `change` says whether it changed the value; a value it left as it
    /// was (most writes when values repeat) stays cached, and is neither moved out nor put
    /// back, nor weighed again. A value it changed is moved out at once, within the same
    /// lookup (`remove_if`): the cache never holds what is not committed. `change` must leave
    /// a value it reports unchanged exactly as it was. A value left in place is not marked as
    /// used again (read ahead, [`MirrorCache::warm_each`] marks it).
    pub fn update_in_place<C, R>(
        &self,
        (db, key): (u32, &[u8]),
        accept: impl FnOnce(&MirrorValue) -> bool,
        (input, change): (C, impl FnOnce(&mut Option<MirrorValue>, C) -> (R, bool)),
    ) -> InPlace<C, R> {
        let Some(mut cache) = self.lock() else {
            return InPlace::NotRun(input);
        };
        let id = KeyRef { db, key };
        let mut input = Some(input);
        // What the change returned, and the value when it is to leave the cache.
        let mut ran = None;
        let removed = cache.remove_if(&id, |weighed| {
            let mut cached = weighed.value.borrow_mut();
            if !accept(&cached) {
                return false;
            }
            let Some(input) = input.take() else {
                return false;
            };
            let mut value = Some(std::mem::replace(&mut *cached, MirrorValue::hash(0)));
            let (result, changed) = change(&mut value, input);
            match (changed, value) {
                (false, Some(unchanged)) => {
                    *cached = unchanged;
                    ran = Some((result, false, None));
                    false
                }
                (changed, value) => {
                    ran = Some((result, changed, value));
                    true
                }
            }
        });
        let (result, changed, value) = match (input, ran) {
            (Some(input), _) => return InPlace::NotRun(input),
            (None, Some(ran)) => ran,
            (None, None) => unreachable!("the input is taken only by the change, which then ran"),
        };
        match removed {
            Some((key, _placeholder)) => InPlace::Taken {
                result,
                key,
                value,
                changed,
            },
            None if !changed && value.is_none() => InPlace::Unchanged(result),
            // `remove_if` removes exactly when the change asks it to: not reached.
            None => InPlace::Taken {
                result,
                key: (db, Bytes::copy_from_slice(key)),
                value,
                changed,
            },
        }
    }

    /// Records the state of keys as of a commit that succeeded. A key that does not exist is
    /// forgotten rather than cached: deleted keys are rarely written again, and a flush of a
    /// large keyspace would fill the cache with them.
    pub fn insert_committed(&self, entries: impl IntoIterator<Item = (Key, Value)>) {
        if let Some(mut cache) = self.lock() {
            for ((db, key), value) in entries {
                match value {
                    // It could never fit: not weighed (walking a hash of a million fields in
                    // every batch was 5% of capture's time in scripts/bench-bighash.sh), and
                    // an older copy forgotten.
                    Some(value) if value.fields.min_heap_bytes() > self.capacity => {
                        cache.remove(&(db, key));
                    }
                    Some(value) => {
                        let key = (db, key);
                        let weighed = Weighed::new(&key, value);
                        cache.insert(key, weighed)
                    }
                    None => {
                        cache.remove(&(db, key));
                    }
                }
            }
        }
    }

    /// Forgets everything (the mirror was rewritten by other means).
    pub fn clear(&self) {
        if let Some(mut cache) = self.lock() {
            cache.clear();
        }
    }

    /// Bytes held, by the weight above.
    pub fn weight(&self) -> u64 {
        self.lock().map_or(0, |cache| cache.weight())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(fields: &[(&str, &str)]) -> MirrorValue {
        let mut value = MirrorValue::hash(1);
        for (f, v) in fields {
            value.fields.insert(
                Bytes::copy_from_slice(f.as_bytes()),
                crate::buffer::FieldValue {
                    value: Bytes::copy_from_slice(v.as_bytes()),
                    expire_at_ms: None,
                },
            );
        }
        value
    }

    #[test]
    fn holds_committed_values_and_forgets_deleted_keys() {
        let cache = MirrorCache::new(1 << 20);
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        assert_eq!(cache.get(0, &a), None);
        cache.insert_committed([
            ((0, a.clone()), Some(hash(&[("f", "v")]))),
            ((0, b.clone()), Some(hash(&[("g", "w")]))),
        ]);
        assert_eq!(cache.get(0, &a), Some(Some(hash(&[("f", "v")]))));
        assert_eq!(cache.get(1, &a), None, "another database is another key");
        assert_eq!(
            cache.take(0, &a),
            Some(((0, a.clone()), Some(hash(&[("f", "v")]))))
        );
        assert_eq!(
            cache.get(0, &a),
            None,
            "taken out until the batch puts it back"
        );
        cache.insert_committed([((0, b.clone()), None)]);
        assert_eq!(cache.get(0, &b), None, "a deleted key is read from RocksDB");
        cache.clear();
        assert_eq!(cache.get(0, &a), None);
    }

    #[test]
    fn stays_within_its_size() {
        let cache = MirrorCache::new(64 << 10);
        let big = "x".repeat(1000);
        for i in 0..1000u32 {
            let key = Bytes::from(format!("key:{i}"));
            cache.insert_committed([((0, key), Some(hash(&[("f", &big)])))]);
        }
        assert!(cache.weight() <= 64 << 10, "weight {}", cache.weight());
        assert!(
            cache.weight() > 32 << 10,
            "it holds what fits: {}",
            cache.weight()
        );
    }

    #[test]
    fn a_value_too_large_for_the_cache_leaves_no_older_copy_behind() {
        let cache = MirrorCache::new(1 << 10);
        let a = Bytes::from_static(b"a");
        cache.insert_committed([((0, a.clone()), Some(hash(&[("f", "v")])))]);
        assert!(cache.get(0, &a).is_some());
        let names: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
        let large: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        let large = hash(&large);
        assert!(large.fields.min_heap_bytes() > 1 << 10);
        cache.insert_committed([((0, a.clone()), Some(large))]);
        assert_eq!(cache.get(0, &a), None, "the older copy is not read");
    }

    #[test]
    fn a_disabled_cache_holds_nothing() {
        let cache = MirrorCache::new(0);
        let a = Bytes::from_static(b"a");
        cache.insert_committed([((0, a.clone()), Some(hash(&[])))]);
        assert_eq!(cache.get(0, &a), None);
    }
}
