//! The working set of a batch: the mirror (or raw) entries its commands touch, loaded on first
//! use (from the [`MirrorCache`] when it holds them, else from RocksDB) and written back in one
//! `Batch`.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::mirror_cache::MirrorCache;
use crate::buffer::{Batch, MirrorValue, Store, StoreError};

type LoadResult = Result<Option<MirrorValue>, StoreError>;

/// The entries of a flushed mirror working set, to go into the cache once their batch is
/// durably written (never before: a failed write must leave the cache as the store).
#[must_use = "the cache learns nothing unless `written` is called"]
pub struct Flushed {
    entries: Vec<((u32, Bytes), Option<MirrorValue>)>,
    cache: MirrorCache,
}

impl Flushed {
    /// The batch holding these entries was written.
    pub fn written(self) {
        self.cache.insert_committed(self.entries);
    }
}

struct Slot {
    value: Option<MirrorValue>,
    dirty: bool,
}

/// The mirror entries touched by the commands of one batch, loaded on first use and written
/// back in one `Batch`.
pub struct WorkingSet {
    store: Arc<Store>,
    slots: HashMap<(u32, Bytes), Slot>,
    /// Holds what Redis really holds for keys with a pending `#` op (the buffer's `raw`), not
    /// the mirror.
    raw: bool,
    /// The mirror as of the last commit, in memory (reads only: entries go in after a commit).
    cache: MirrorCache,
}

impl WorkingSet {
    pub fn new(store: Arc<Store>) -> Self {
        WorkingSet::cached(store, MirrorCache::default())
    }

    /// A working set of the mirror that reads through `cache`.
    pub fn cached(store: Arc<Store>, cache: MirrorCache) -> Self {
        WorkingSet {
            store,
            slots: HashMap::new(),
            raw: false,
            cache,
        }
    }

    /// A working set of raw states: a key without a raw entry holds what the mirror holds.
    pub fn raw(store: Arc<Store>, cache: MirrorCache) -> Self {
        WorkingSet {
            raw: true,
            ..WorkingSet::cached(store, cache)
        }
    }

    fn load_mirror(store: &Store, cache: &MirrorCache, db: u32, key: &Bytes) -> LoadResult {
        match cache.get(db, key) {
            Some(value) => Ok(value),
            None => store.mirror(db, key),
        }
    }

    fn slot(&mut self, db: u32, key: &Bytes) -> Result<&mut Slot, StoreError> {
        let (store, raw, cache) = (&self.store, self.raw, &self.cache);
        match self.slots.entry((db, key.clone())) {
            Entry::Occupied(slot) => Ok(slot.into_mut()),
            Entry::Vacant(slot) => {
                let value = match raw {
                    true => match store.raw(db, key)? {
                        Some(value) => Some(value),
                        None => Self::load_mirror(store, cache, db, key)?,
                    },
                    false => Self::load_mirror(store, cache, db, key)?,
                };
                Ok(slot.insert(Slot {
                    value,
                    dirty: false,
                }))
            }
        }
    }

    /// Loads `key` with `value` unless it is already held.
    pub fn seed(&mut self, db: u32, key: &Bytes, value: Option<MirrorValue>) {
        self.slots.entry((db, key.clone())).or_insert(Slot {
            value,
            dirty: false,
        });
    }

    pub fn contains(&self, db: u32, key: &[u8]) -> bool {
        self.slots.contains_key(&(db, Bytes::copy_from_slice(key)))
    }

    /// The keys held with a value, in `db` (every database: `None`).
    pub fn held_keys(&self, db: Option<u32>) -> Vec<(u32, Bytes)> {
        self.slots
            .iter()
            .filter(|((d, _), s)| db.is_none_or(|db| db == *d) && s.value.is_some())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Whether a key of this name is held, in any database.
    pub fn holds_name(&self, key: &[u8]) -> bool {
        self.slots.keys().any(|(_, k)| k.as_ref() == key)
    }

    /// Every entry held, emptying the set.
    pub fn drain(&mut self) -> Vec<((u32, Bytes), Option<MirrorValue>)> {
        self.slots.drain().map(|(k, s)| (k, s.value)).collect()
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn get(&mut self, db: u32, key: &Bytes) -> Result<Option<MirrorValue>, StoreError> {
        Ok(self.slot(db, key)?.value.clone())
    }

    pub fn set(
        &mut self,
        db: u32,
        key: &Bytes,
        value: Option<MirrorValue>,
    ) -> Result<(), StoreError> {
        let slot = self.slot(db, key)?;
        slot.value = value;
        slot.dirty = true;
        Ok(())
    }

    /// Moves the changed entries into `batch` and empties the set; returns every entry held,
    /// for the cache once `batch` is written.
    pub fn flush_into(&mut self, batch: &mut Batch) -> Flushed {
        let mut held = Vec::with_capacity(self.slots.len());
        // In key order: consecutive inserts into RocksDB's memtable skiplist then walk mostly
        // the same, cached, nodes (in hash order each one is a cold search).
        let mut slots: Vec<_> = self.slots.drain().collect();
        slots.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
        for ((db, key), slot) in slots {
            if slot.dirty {
                match &slot.value {
                    Some(value) => batch.put_mirror(db, &key, value),
                    None => batch.delete_mirror(db, &key),
                }
            }
            held.push(((db, key), slot.value));
        }
        Flushed {
            entries: held,
            cache: self.cache.clone(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}
