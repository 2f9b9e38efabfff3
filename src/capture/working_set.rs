//! The working set of a batch: the mirror (or raw) entries its commands touch, loaded on first
//! use (from the [`MirrorCache`] when it holds them, else from RocksDB) and written back in one
//! `Batch`.

use std::sync::Arc;

use bytes::Bytes;
use hashbrown::hash_map::EntryRef;

use super::mirror_cache::{InPlace, MirrorCache};
use crate::buffer::{Batch, KeyRef, MirrorEntries, MirrorValue, Store, StoreError};

/// A loaded value, with its owned key when it came from the cache.
type LoadResult = Result<(Option<(u32, Bytes)>, Option<MirrorValue>), StoreError>;

/// The mirror entries a batch changed, keyed by database and key.
pub type Entries = MirrorEntries;

/// Where a mirror working set reads what it does not hold: the entries of the batch being
/// written (newest), then the cache, then RocksDB.
#[derive(Clone, Default)]
pub struct MirrorView {
    pub cache: MirrorCache,
    /// The changed entries of the batch handed to the committer and not yet written.
    pub in_flight: Option<Arc<Entries>>,
}

/// The entries of a flushed mirror working set: what its batch changed (read by the next
/// batch while this one is written, and written by the committer), which goes into the cache
/// once the batch is durably written (never before: a failed write must leave the cache as the
/// store), and what it read unchanged, which may go back as soon as every earlier batch is
/// written ([`Flushed::unchanged_written`]).
#[must_use = "the cache learns nothing unless `unchanged_written` or `written` is called"]
pub struct Flushed {
    changed: Arc<Entries>,
    loaded: Vec<((u32, Bytes), Option<MirrorValue>)>,
    cache: MirrorCache,
}

/// A large hash is cached as its field count: its fields are read again when asked for.
fn forget_seen(
    (key, mut value): ((u32, Bytes), Option<MirrorValue>),
) -> ((u32, Bytes), Option<MirrorValue>) {
    if let Some(window) = value.as_mut().and_then(|v| v.fields.window_mut()) {
        window.forget_seen();
    }
    (key, value)
}

impl Flushed {
    /// The changed entries, for the next batch to read while this one is written.
    pub fn changed(&self) -> Arc<Entries> {
        self.changed.clone()
    }

    /// Every batch before this one is written: what this one only read goes back into the
    /// cache now, before this batch's own write. Those values are the store's as of the last
    /// commit (each came from the cache, from the batch in flight, now written, or from RocksDB
    /// for a key that batch did not change), and this batch's write, or its failure, leaves
    /// them as they are. The next batch, applied while this one is written, then finds them
    /// cached; it read them from RocksDB before (`Store::journaled` and RocksDB's `Get` were
    /// 9% of capture's thread when values repeat).
    pub fn unchanged_written(&mut self) {
        let loaded = std::mem::take(&mut self.loaded);
        self.cache
            .insert_committed(loaded.into_iter().map(forget_seen));
    }

    /// The batch holding these entries was written.
    pub fn written(self) {
        // Shared only while the committer or the next batch still holds it (rare: the
        // committer drops the batch before reporting it written, the next batch is flushed).
        let changed = Arc::try_unwrap(self.changed).unwrap_or_else(|shared| (*shared).clone());
        self.cache
            .insert_committed(changed.into_iter().chain(self.loaded).map(forget_seen));
    }
}

struct Slot {
    value: Option<MirrorValue>,
    dirty: bool,
    /// The store holds the key's fields one entry each (it was loaded as a window): a new
    /// value that is not stored so clears them.
    by_field: bool,
}

impl Slot {
    fn loaded(value: Option<MirrorValue>) -> Slot {
        let by_field = is_window(&value);
        Slot {
            value,
            dirty: false,
            by_field,
        }
    }
}

/// Whether `value` is a hash stored by field, held as a window.
fn is_window(value: &Option<MirrorValue>) -> bool {
    value.as_ref().is_some_and(|v| v.fields.window().is_some())
}

/// The fields of a hash stored by field that a batch writes (for a long unit's undo records).
pub struct FieldWrites {
    /// Every stored field is cleared or replaced.
    pub all_stored: bool,
    /// The fields written.
    pub names: Vec<Bytes>,
}

/// The mirror entries touched by the commands of one batch, loaded on first use and written
/// back in one `Batch`.
pub struct WorkingSet {
    store: Arc<Store>,
    /// ahash: keys are hashed for every command, and a batch is not exposed to the clients
    /// that choose the keys for longer than it lasts (a randomly seeded hasher either way).
    /// Looked up by [`KeyRef`]: the owned key is built once, when the key is first loaded.
    slots: hashbrown::HashMap<(u32, Bytes), Slot, ahash::RandomState>,
    /// Holds what Redis really holds for keys with a pending `#` op (the buffer's `raw`), not
    /// the mirror.
    raw: bool,
    /// What it reads before RocksDB.
    view: MirrorView,
    /// Fields of large hashes read whole into this set (a long unit writes what it changed
    /// when it holds many: `long_unit.rs`).
    fields_seen: usize,
}

impl WorkingSet {
    pub fn new(store: Arc<Store>) -> Self {
        WorkingSet::viewing(store, MirrorView::default())
    }

    /// A working set of the mirror that reads through `view`.
    pub fn viewing(store: Arc<Store>, view: MirrorView) -> Self {
        WorkingSet {
            store,
            slots: Default::default(),
            raw: false,
            view,
            fields_seen: 0,
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

    /// The mirrored value of `key`: from the batch in flight, else the cache (moved out of it,
    /// with its owned key, when `take`; copied otherwise), else RocksDB.
    fn load_mirror(store: &Store, view: &MirrorView, key: KeyRef, take: bool) -> LoadResult {
        if let Some(value) = view.in_flight.as_ref().and_then(|e| e.get(&key)) {
            let mut value = value.clone();
            // What the batch in flight writes of a large hash is written by it, not again.
            if let Some(window) = value.as_mut().and_then(|v| v.fields.window_mut()) {
                window.settle();
            }
            return Ok((None, value));
        }
        let cached = match take {
            true => view
                .cache
                .take(key.db, key.key)
                .map(|(owned, value)| (Some(owned), value)),
            false => view.cache.get(key.db, key.key).map(|value| (None, value)),
        };
        match cached {
            Some((owned, value)) => Ok((owned, value)),
            None => Ok((None, store.mirror(key.db, key.key)?)),
        }
    }

    fn slot(&mut self, db: u32, key: &[u8]) -> Result<&mut Slot, StoreError> {
        let id = KeyRef { db, key };
        let (store, raw, view) = (&self.store, self.raw, &self.view);
        match self.slots.entry_ref(&id) {
            EntryRef::Occupied(slot) => Ok(slot.into_mut()),
            EntryRef::Vacant(vacant) => {
                let (owned, value) = match raw {
                    true => match store.raw(db, key)? {
                        Some(value) => (None, Some(value)),
                        // The mirror is only read here: it is not this set's to put back. A
                        // raw state is whole.
                        None => match Self::load_mirror(store, view, id, false)?.1 {
                            Some(value) => (None, Some(store.whole(db, key, value)?)),
                            None => (None, None),
                        },
                    },
                    false => Self::load_mirror(store, view, id, true)?,
                };
                // The key goes in as its own allocation (see `apply::owned`): it goes to the
                // cache. One taken from the cache is one already.
                Ok(match owned {
                    Some(owned) => vacant.insert_with_key(owned, Slot::loaded(value)),
                    None => vacant.insert(Slot::loaded(value)),
                })
            }
        }
    }

    /// Looks up the cached entries of `keys` in one go, before the commands that touch them
    /// are applied ([`MirrorCache::warm_each`]); a mirror set only. A key held already or in
    /// the batch in flight (newer than the cache) is looked up too, though its write will not
    /// read the cache: leaving it out took two map lookups per key, more than the probe.
    pub fn preload<'k>(&mut self, keys: impl IntoIterator<Item = KeyRef<'k>>) {
        if self.raw {
            return;
        }
        self.view.cache.warm_each(keys);
    }

    /// Runs `f` on the value of `key` where the mirror cache holds it
    /// ([`MirrorCache::update_in_place`]), when this is the value [`WorkingSet::update`] would
    /// load: a mirror set that does not hold the key, the batch in flight did not change it,
    /// and it is not a hash stored by field (whose fields are loaded first). `f` says, as for
    /// `update`, whether it changed the value; one it left as it was stays cached and is not
    /// held by this set, one it changed is held and written back. Otherwise `f` does not run,
    /// and its input comes back (`Err`) for `update`.
    pub fn update_cached<C, R>(
        &mut self,
        db: u32,
        key: &Bytes,
        input: C,
        f: impl FnOnce(&mut Option<MirrorValue>, C) -> (R, bool),
    ) -> Result<R, C> {
        let id = KeyRef { db, key };
        let in_flight = self.view.in_flight.as_deref();
        if self.raw
            || self.slots.contains_key(&id)
            || in_flight.is_some_and(|entries| entries.contains_key(&id))
        {
            return Err(input);
        }
        let accept = |value: &MirrorValue| value.fields.window().is_none();
        match self
            .view
            .cache
            .update_in_place((db, key), accept, (input, f))
        {
            InPlace::NotRun(input) => Err(input),
            InPlace::Unchanged(result) => Ok(result),
            InPlace::Taken {
                result,
                key,
                value,
                changed,
            } => {
                // Not a window (`accept` above): nothing of it is stored by field yet.
                let slot = Slot {
                    value,
                    dirty: changed,
                    by_field: false,
                };
                self.slots.insert(key, slot);
                Ok(result)
            }
        }
    }

    /// Loads `key` with `value` unless it is already held.
    pub fn seed(&mut self, db: u32, key: &Bytes, value: Option<MirrorValue>) {
        self.slots
            .entry_ref(&KeyRef { db, key })
            .or_insert_with(|| Slot::loaded(value));
    }

    /// Loads `names` of `key` when it is a hash stored by field (any other value holds every
    /// field): what a command reads of a large hash is loaded before it runs.
    pub fn see_fields<'n>(
        &mut self,
        db: u32,
        key: &[u8],
        names: impl IntoIterator<Item = &'n [u8]>,
    ) -> Result<(), StoreError> {
        if !self.is_window(db, key)? {
            return Ok(());
        }
        let store = self.store.clone();
        if let Some(value) = &mut self.slot(db, key)?.value {
            store.see_fields(db, key, value, names)?;
        }
        Ok(())
    }

    /// Whether `key` is a hash stored by field, held as a window.
    pub fn is_window(&mut self, db: u32, key: &[u8]) -> Result<bool, StoreError> {
        Ok(is_window(&self.slot(db, key)?.value))
    }

    /// The value of `key` with every field (a hash stored by field is read whole from the
    /// store, once: it stays whole in this set).
    pub fn get_whole(&mut self, db: u32, key: &Bytes) -> Result<Option<MirrorValue>, StoreError> {
        let store = self.store.clone();
        let slot = self.slot(db, key)?;
        let mut loaded = 0;
        if let Some(value) = slot.value.as_ref().filter(|v| v.fields.window().is_some()) {
            let whole = store.whole(db, key, value.clone())?;
            loaded = whole.fields.len();
            slot.value = Some(whole);
        }
        let value = slot.value.clone();
        self.fields_seen += loaded;
        Ok(value)
    }

    /// The fields of a hash stored by field that writing `key` back writes (`None`: none).
    pub fn field_writes(&self, db: u32, key: &[u8]) -> Option<FieldWrites> {
        let slot = self.slots.get(&KeyRef { db, key }).filter(|s| s.dirty)?;
        let fields = slot.value.as_ref().map(|v| &v.fields);
        match fields.and_then(|f| f.window()) {
            Some(window) => Some(FieldWrites {
                all_stored: window.is_rewrite() || !slot.by_field,
                names: window.changed().map(|(name, _)| name.clone()).collect(),
            }),
            None => {
                let whole = fields.filter(|f| f.stored_by_field());
                (slot.by_field || whole.is_some()).then(|| FieldWrites {
                    all_stored: true,
                    names: whole.into_iter().flat_map(|f| f.keys().cloned()).collect(),
                })
            }
        }
    }

    pub fn contains(&self, db: u32, key: &[u8]) -> bool {
        self.slots.contains_key(&KeyRef { db, key })
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

    /// The keys whose entries are to be written back.
    pub fn dirty_keys(&self) -> impl Iterator<Item = &(u32, Bytes)> {
        self.slots.iter().filter(|(_, s)| s.dirty).map(|(k, _)| k)
    }

    /// Whether a key of this name is held, in any database.
    pub fn holds_name(&self, key: &[u8]) -> bool {
        self.slots.keys().any(|(_, k)| k.as_ref() == key)
    }

    /// Every entry held, emptying the set.
    pub fn drain(&mut self) -> Vec<((u32, Bytes), Option<MirrorValue>)> {
        self.slots.drain().map(|(k, s)| (k, s.value)).collect()
    }

    /// Fields of large hashes held: those their windows hold, and those of large hashes read
    /// whole. Walks the keys held: asked once per part of a long unit, not per command.
    pub fn fields_seen(&self) -> usize {
        let windows: usize = self
            .slots
            .values()
            .filter_map(|s| s.value.as_ref()?.fields.window())
            .map(|w| w.seen_len())
            .sum();
        windows + self.fields_seen
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Makes room for `keys` more keys.
    pub fn reserve(&mut self, keys: usize) {
        self.slots.reserve(keys);
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
        Ok(&mut slot.value)
    }

    /// Changes the value of `key` in place with `f`, which says whether it changed it: an
    /// entry left as it was is not written back (unless something else changed it). Raw states
    /// are always written back (`ops.rs` decides what they need).
    pub fn update<R>(
        &mut self,
        db: u32,
        key: &Bytes,
        f: impl FnOnce(&mut Option<MirrorValue>) -> (R, bool),
    ) -> Result<R, StoreError> {
        let raw = self.raw;
        let slot = self.slot(db, key)?;
        let (result, changed) = f(&mut slot.value);
        slot.dirty |= changed || raw;
        Ok(result)
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

    /// Hands the changed entries to `batch` (encoded when it is written) and empties the set;
    /// returns what it changed and what it read unchanged, for the cache.
    pub fn flush_into(&mut self, batch: &mut Batch) -> Flushed {
        let mut changed = Entries::with_capacity_and_hasher(self.slots.len(), Default::default());
        let mut loaded = Vec::new();
        self.fields_seen = 0;
        for (id, mut slot) in self.slots.drain() {
            if slot.dirty {
                // A hash past the size is stored by field from now on (written whole once);
                // one that no longer is has its stored fields cleared first.
                if let Some(value) = slot.value.as_mut() {
                    value.fields = std::mem::take(&mut value.fields).into_stored_form();
                    if let Some(window) = value.fields.window_mut() {
                        window.keep_changed();
                    }
                }
                let stored_by_field = slot
                    .value
                    .as_ref()
                    .is_some_and(|v| v.fields.stored_by_field());
                if slot.by_field && !stored_by_field {
                    batch.clear_fields(id.0, &id.1);
                }
                changed.insert(id, slot.value);
            } else if slot.value.is_some() && (!slot.by_field || is_window(&slot.value)) {
                // (A large hash read whole here is not cached whole: the store holds it by
                // field, and the cache must say so.)
                // Taken out of the cache (or read): it goes back in once the batches before
                // this one are written (`Flushed::unchanged_written`).
                loaded.push((id, slot.value));
            }
        }
        let changed = Arc::new(changed);
        batch.put_mirror_entries(changed.clone());
        Flushed {
            changed,
            loaded,
            cache: self.view.cache.clone(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::FieldValue;

    fn hash(value: &str) -> MirrorValue {
        let mut hash = MirrorValue::hash(1);
        let field = FieldValue {
            value: Bytes::copy_from_slice(value.as_bytes()),
            expire_at_ms: None,
        };
        hash.fields.insert(Bytes::from_static(b"f"), field);
        hash
    }

    fn field(value: &Option<MirrorValue>) -> Option<Bytes> {
        Some(value.as_ref()?.fields.get(&b"f"[..])?.value.clone())
    }

    /// What a batch only read goes back into the cache once the batches before it are
    /// written, before its own write; what it changed only after that write.
    #[test]
    fn what_a_batch_only_read_goes_back_before_its_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (read, changed) = (Bytes::from_static(b"read"), Bytes::from_static(b"changed"));
        let cache = MirrorCache::new(1 << 20);
        cache.insert_committed([
            ((0, read.clone()), Some(hash("cached"))),
            ((0, changed.clone()), Some(hash("cached"))),
        ]);
        let view = MirrorView {
            cache: cache.clone(),
            in_flight: None,
        };
        let mut ws = WorkingSet::viewing(store.clone(), view);
        assert_eq!(field(ws.peek(0, &read).unwrap()).unwrap(), "cached");
        ws.set(0, &changed, Some(hash("new"))).unwrap();
        let mut batch = Batch::default();
        let mut flushed = ws.flush_into(&mut batch);
        assert_eq!(cache.get(0, &read), None, "taken by the batch");
        flushed.unchanged_written();
        assert_eq!(field(&cache.get(0, &read).unwrap()).unwrap(), "cached");
        assert_eq!(cache.get(0, &changed), None, "not before the write");
        store.write(batch, true).unwrap();
        flushed.written();
        assert_eq!(field(&cache.get(0, &changed).unwrap()).unwrap(), "new");
        assert_eq!(field(&cache.get(0, &read).unwrap()).unwrap(), "cached");
    }

    /// A write to a key the mirror cache holds runs on the cached entry: one that leaves it as
    /// it was leaves it cached (and the set does not hold it), one that changes it moves it out
    /// into the set, to be written. A key the set holds, or the batch in flight changed (newer
    /// there than in the cache), or a hash stored by field, is not changed in the cache.
    #[test]
    fn a_write_runs_where_the_key_is_cached_and_moves_it_out_only_when_it_changes_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let [same, changed, flying, held, large] =
            [&b"same"[..], b"changed", b"flying", b"held", b"large"].map(Bytes::from_static);
        let cache = MirrorCache::new(1 << 20);
        cache.insert_committed(
            [&same, &changed, &flying, &held].map(|k| ((0, k.clone()), Some(hash("cached")))),
        );
        let mut window = MirrorValue::hash(1);
        window.fields = crate::buffer::Fields::unseen(10_000);
        cache.insert_committed([((0, large.clone()), Some(window))]);
        let mut in_flight = Entries::default();
        in_flight.insert((0, flying.clone()), Some(hash("in flight")));
        let view = MirrorView {
            cache: cache.clone(),
            in_flight: Some(Arc::new(in_flight)),
        };
        let mut ws = WorkingSet::viewing(store.clone(), view.clone());
        ws.preload([&same, &changed, &flying].map(|key| KeyRef { db: 0, key }));
        assert!(
            cache.get(0, &same).is_some(),
            "read ahead, nothing is taken"
        );
        let set = |to: &'static str| {
            move |value: &mut Option<MirrorValue>, seen: &mut Vec<Option<Bytes>>| {
                seen.push(field(value));
                let was = field(value);
                *value = Some(hash(to));
                ((), was.as_deref() != Some(to.as_bytes()))
            }
        };
        let mut seen = Vec::new();
        assert!(ws.update_cached(0, &same, &mut seen, set("cached")).is_ok());
        assert!(!ws.contains(0, &same), "left as it was: not held");
        assert_eq!(field(&cache.get(0, &same).unwrap()).unwrap(), "cached");
        assert!(ws.update_cached(0, &changed, &mut seen, set("new")).is_ok());
        assert!(ws.contains(0, &changed), "changed: held, to be written");
        assert_eq!(cache.get(0, &changed), None, "never cached uncommitted");
        assert!(ws.update_cached(0, &flying, &mut seen, set("x")).is_err());
        assert!(ws.update_cached(0, &large, &mut seen, set("x")).is_err());
        ws.peek(0, &held).unwrap();
        assert!(ws.update_cached(0, &held, &mut seen, set("x")).is_err());
        let mut raw = WorkingSet::raw(store.clone(), view);
        assert!(raw.update_cached(0, &same, &mut seen, set("x")).is_err());
        assert_eq!(seen.len(), 2, "the change ran twice: {seen:?}");
        assert!(seen.iter().all(|v| v.as_deref() == Some(&b"cached"[..])));
        assert!(cache.get(0, &flying).is_some() && cache.get(0, &large).is_some());

        let mut batch = Batch::default();
        let flushed = ws.flush_into(&mut batch);
        store.write(batch, true).unwrap();
        flushed.written();
        assert_eq!(field(&store.mirror(0, &changed).unwrap()).unwrap(), "new");
        assert_eq!(
            store.mirror(0, &same).unwrap(),
            None,
            "nothing written for it"
        );
        assert_eq!(field(&cache.get(0, &changed).unwrap()).unwrap(), "new");
    }

    /// A batch moves what it touches out of the cache; the cache gets it back only with a
    /// written batch, so a dropped batch (a resync) leaves the store's value to be read.
    #[test]
    fn a_batch_takes_entries_from_the_cache_and_puts_them_back_only_when_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (changed, read) = (Bytes::from_static(b"changed"), Bytes::from_static(b"read"));
        let mut batch = Batch::default();
        batch.put_mirror(0, &changed, &hash("stored"));
        batch.put_mirror(0, &read, &hash("stored"));
        store.write(batch, false).unwrap();
        let cache = MirrorCache::new(1 << 20);
        cache.insert_committed([
            ((0, changed.clone()), Some(hash("cached"))),
            ((0, read.clone()), Some(hash("cached"))),
        ]);
        let view = MirrorView {
            cache: cache.clone(),
            in_flight: None,
        };

        // Dropped: the taken entries are gone from the cache, the store is read again.
        let mut dropped = WorkingSet::viewing(store.clone(), view.clone());
        *dropped.get_mut(0, &changed).unwrap() = Some(hash("dropped"));
        assert_eq!(field(dropped.peek(0, &read).unwrap()).unwrap(), "cached");
        assert_eq!(cache.get(0, &changed), None);
        assert_eq!(cache.get(0, &read), None);
        drop(dropped);
        let mut next = WorkingSet::viewing(store.clone(), view.clone());
        assert_eq!(field(next.peek(0, &changed).unwrap()).unwrap(), "stored");

        // Written: changed and unchanged entries are cached again, as the batch left them.
        next.set(0, &changed, Some(hash("new"))).unwrap();
        assert_eq!(field(next.peek(0, &read).unwrap()).unwrap(), "stored");
        let mut batch = Batch::default();
        let flushed = next.flush_into(&mut batch);
        assert_eq!(cache.get(0, &changed), None, "not before the write");
        store.write(batch, true).unwrap();
        flushed.written();
        assert_eq!(field(&cache.get(0, &changed).unwrap()).unwrap(), "new");
        assert_eq!(field(&cache.get(0, &read).unwrap()).unwrap(), "stored");
        assert_eq!(field(&store.mirror(0, &changed).unwrap()).unwrap(), "new");
    }
}
