//! The working set of a batch: the mirror (or raw) entries its commands touch, loaded on first
//! use (from the [`MirrorCache`] when it holds them, else from RocksDB) and written back in one
//! `Batch`.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::apply::owned;
use super::mirror_cache::MirrorCache;
use crate::buffer::{Batch, MirrorValue, Store, StoreError};

type LoadResult = Result<(Option<MirrorValue>, bool), StoreError>;

/// The mirror entries a batch changed, keyed by database and key.
pub type Entries = HashMap<(u32, Bytes), Option<MirrorValue>, ahash::RandomState>;

/// Where a mirror working set reads what it does not hold: the entries of the batch being
/// written (newest), then the cache, then RocksDB.
#[derive(Clone, Default)]
pub struct MirrorView {
    pub cache: MirrorCache,
    /// The changed entries of the batch handed to the committer and not yet written.
    pub in_flight: Option<Arc<Entries>>,
}

/// The entries of a flushed mirror working set: what its batch changed (read by the next
/// batch while this one is written) and what the cache does not hold yet, which goes into the
/// cache once the batch is durably written (never before: a failed write must leave the cache
/// as the store).
#[must_use = "the cache learns nothing unless `written` is called"]
pub struct Flushed {
    changed: Arc<Entries>,
    loaded: Vec<((u32, Bytes), Option<MirrorValue>)>,
    cache: MirrorCache,
}

impl Flushed {
    /// The changed entries, for the next batch to read while this one is written.
    pub fn changed(&self) -> Arc<Entries> {
        self.changed.clone()
    }

    /// The batch holding these entries was written.
    pub fn written(self) {
        let changed = Arc::try_unwrap(self.changed).unwrap_or_else(|shared| (*shared).clone());
        self.cache
            .insert_committed(changed.into_iter().chain(self.loaded));
    }
}

struct Slot {
    value: Option<MirrorValue>,
    dirty: bool,
    /// Whether the cache holds this value already (loaded from it and unchanged).
    cached: bool,
}

/// The mirror entries touched by the commands of one batch, loaded on first use and written
/// back in one `Batch`.
pub struct WorkingSet {
    store: Arc<Store>,
    /// ahash: keys are hashed for every command, and a batch is not exposed to the clients
    /// that choose the keys for longer than it lasts (a randomly seeded hasher either way).
    slots: HashMap<(u32, Bytes), Slot, ahash::RandomState>,
    /// Holds what Redis really holds for keys with a pending `#` op (the buffer's `raw`), not
    /// the mirror.
    raw: bool,
    /// What it reads before RocksDB.
    view: MirrorView,
}

impl WorkingSet {
    pub fn new(store: Arc<Store>) -> Self {
        WorkingSet::viewing(store, MirrorView::default())
    }

    /// A working set of the mirror that reads through `view`.
    pub fn viewing(store: Arc<Store>, view: MirrorView) -> Self {
        WorkingSet {
            store,
            slots: HashMap::default(),
            raw: false,
            view,
        }
    }

    /// A working set of raw states: a key without a raw entry holds what the mirror holds
    /// (the raw states themselves are never in flight: see `committer.rs`).
    pub fn raw(store: Arc<Store>, view: MirrorView) -> Self {
        WorkingSet {
            raw: true,
            ..WorkingSet::viewing(store, view)
        }
    }

    /// The mirrored value of `key`, and whether the cache holds it.
    fn load_mirror(store: &Store, view: &MirrorView, db: u32, key: &Bytes) -> LoadResult {
        if let Some(value) = view
            .in_flight
            .as_ref()
            .and_then(|e| e.get(&(db, key.clone())))
        {
            return Ok((value.clone(), false));
        }
        match view.cache.get(db, key) {
            Some(value) => Ok((value, true)),
            None => Ok((store.mirror(db, key)?, false)),
        }
    }

    fn slot(&mut self, db: u32, key: &Bytes) -> Result<&mut Slot, StoreError> {
        let id = (db, key.clone());
        if !self.slots.contains_key(&id) {
            let (store, raw, view) = (&self.store, self.raw, &self.view);
            let (value, cached) = match raw {
                true => match store.raw(db, key)? {
                    Some(value) => (Some(value), false),
                    None => Self::load_mirror(store, view, db, key)?,
                },
                false => Self::load_mirror(store, view, db, key)?,
            };
            // The key in its own allocation (see `apply::owned`): it goes to the cache.
            let slot = Slot {
                value,
                dirty: false,
                cached,
            };
            self.slots.insert((db, owned(key)), slot);
        }
        // Present: the stored (owned) key is kept, the slot returned.
        Ok(self.slots.entry(id).or_insert(Slot {
            value: None,
            dirty: false,
            cached: false,
        }))
    }

    /// Loads `key` with `value` unless it is already held.
    pub fn seed(&mut self, db: u32, key: &Bytes, value: Option<MirrorValue>) {
        self.slots.entry((db, owned(key))).or_insert(Slot {
            value,
            dirty: false,
            cached: false,
        });
    }

    pub fn contains(&self, db: u32, key: &[u8]) -> bool {
        self.slots.contains_key(&(db, Bytes::copy_from_slice(key)))
    }

    /// The keys held with a value, in `db` (every database: `None`), with those the batch in
    /// flight gave a value: the keys RocksDB may not have yet.
    pub fn held_keys(&self, db: Option<u32>) -> Vec<(u32, Bytes)> {
        let in_db = |d: &u32| db.is_none_or(|db| db == *d);
        let in_flight = self.view.in_flight.iter().flat_map(|e| e.iter());
        self.slots
            .iter()
            .map(|(k, s)| (k, s.value.is_some()))
            .chain(in_flight.map(|(k, v)| (k, v.is_some())))
            .filter(|((d, _), exists)| in_db(d) && *exists)
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

    /// The value of `key`, without copying it.
    pub fn peek(&mut self, db: u32, key: &Bytes) -> Result<&Option<MirrorValue>, StoreError> {
        Ok(&self.slot(db, key)?.value)
    }

    /// The value of `key`, to change in place (the entry is then written back).
    pub fn get_mut(
        &mut self,
        db: u32,
        key: &Bytes,
    ) -> Result<&mut Option<MirrorValue>, StoreError> {
        let slot = self.slot(db, key)?;
        slot.dirty = true;
        slot.cached = false;
        Ok(&mut slot.value)
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
        slot.cached = false;
        Ok(())
    }

    /// Moves the changed entries into `batch` and empties the set; returns what it changed and
    /// what the cache does not hold yet.
    pub fn flush_into(&mut self, batch: &mut Batch) -> Flushed {
        let mut changed = Entries::with_capacity_and_hasher(self.slots.len(), Default::default());
        let mut loaded = Vec::new();
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
                changed.insert((db, key), slot.value);
            } else if !slot.cached {
                loaded.push(((db, key), slot.value));
            }
        }
        Flushed {
            changed: Arc::new(changed),
            loaded,
            cache: self.view.cache.clone(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}
