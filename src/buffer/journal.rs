//! The mirror journal: how the command stream's mirror updates reach RocksDB without a random
//! insert per key per batch.
//!
//! **Why.** Every batch of the command stream used to put each key it changed into the `mirror`
//! family: one memtable insert per key per batch, each a skiplist search among random keys.
//! Profiling `scripts/bench-capture.sh` put two thirds of capture's commit thread there
//! (docs/benchmarks.md, sessions 15 and 16), and a key written in every batch was inserted
//! every time.
//!
//! **How.** A batch writes its mirror entries as **one record** of the `journal` family, in
//! the same `WriteBatch` as its changes and checkpoint (so the three still never disagree).
//! Records have sequential keys: one cheap insert per batch. The entries are also held in
//! memory, the newest per key (`Pending`), and every point read of the mirror looks there
//! before the `mirror` family. Once the records not yet settled pass the journal's size
//! ([`Journal::limit`]), the next write first **settles** the journal: the newest value of every pending key is
//! put into `mirror`, in key order, once however often it was written, and the records are
//! deleted, in one `WriteBatch`. Invariant: **the `mirror` family with the journal's records
//! applied over it in order is the mirror**; a crash at any point leaves that true (a settle
//! is atomic), and opening the buffer replays the records into memory.
//!
//! **On disk.** Family `journal`; key: `seq u64` (big-endian, from 1, in write order); value:
//! `count u32`, then per entry `db u32, key bytes, present u8` and, when present, `value
//! bytes` (a whole value in the `mirror` family's encoding, see `mirror.rs`).
//!
//! **Rules** (`store.rs` applies them):
//! - only whole values go through the journal; a batch that writes the mirror any other way (a
//!   hash stored by field, its fields, a put or delete of its own: a full sync's pages, a large
//!   hash's updates) settles first, by a write of its own, so an older journaled value can
//!   never be applied over a newer direct write (and readers find the same values throughout);
//! - a record's entries become readable **before** its write, never after: a reader must not
//!   find a batch's raw states, changes or checkpoint with the mirror from before it (the
//!   write-back task completes a `#` op only when the raw state and the mirror say so; a
//!   mirror ahead of the raw state makes the completion's compare-and-set fail, a mirror
//!   behind it would complete with the old value). A write that fails puts back what the
//!   record replaced;
//! - a rollback of an open unit settles first: it writes the family alone;
//! - memory: pending keys and values are slices of their records; what the journal counts
//!   against its size is each record's allocation and the map's table, so what it holds is
//!   bounded by its size plus one batch's record; the map's table is given back once a settle
//!   leaves it mostly empty;
//! - a scan of the mirror settles first, on every page: it reads the family alone (a flush's
//!   pages then settle the page before's deletions; during a reconcile, rare, the journal
//!   writes through);
//! - one writer at a time ([`Journal::writer`]): records are written and applied in seq order,
//!   and a settle deletes only records whose entries it wrote. A reader takes the pending lock
//!   only to look up; a settle writes the family before it forgets the entries it wrote (and
//!   not those journaled since), so a key that is not pending is in the family, as new.

use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;

use rocksdb::{IteratorMode, WriteBatch};

use super::codec::{DecodeError, Decoder, Encoder};
use super::mirror::{mirror_key_into, KeyRef, MirrorEntries};
use super::{MirrorValue, Store, StoreError, CF_JOURNAL, CF_MIRROR};

/// The bytes of records the journal holds before it is settled (and about what its pending
/// values take in memory). Measured with `scripts/bench-capture.sh` (docs/benchmarks.md).
pub const DEFAULT_JOURNAL_BYTES: u64 = 32 << 20;

/// The newest journaled value of a key: the `mirror` encoding (`None`: deleted), and the
/// record it came from.
struct PendingEntry {
    value: Option<Bytes>,
    seq: u64,
}

impl Pending {
    fn memory(&self) -> u64 {
        self.bytes + self.entries.capacity() as u64 * SLOT_BYTES
    }
}

#[derive(Default)]
struct Pending {
    entries: hashbrown::HashMap<(u32, Bytes), PendingEntry, ahash::RandomState>,
    /// The newest record applied to `entries` (0: none).
    applied: u64,
    /// The seq the next record gets.
    next_seq: u64,
    /// Bytes of the records applied and not settled (their allocations).
    bytes: u64,
}

/// A key of a record: its database, where its name and its value lie in the record (`None`:
/// deleted). Pending keys and values are slices of their record, never the batch's own
/// `Bytes`: those are shared with capture's thread, and counting their references from the
/// committer's too cost more than the whole journal (docs/benchmarks.md).
type RecordEntry = (u32, Range<usize>, Option<Range<usize>>);

/// A record written (or about to be), with where each entry's value lies in it.
pub(super) struct Record {
    seq: u64,
    blob: Bytes,
    entries: Vec<RecordEntry>,
    /// Its allocation, which stays in memory while any of its entries is pending.
    size: u64,
}

/// Memory a slot of the pending map takes (key, value, seq, and its control byte): the map's
/// table counts by its capacity, spare slots included. A flush journals its deletions, small
/// records whose table then outweighed them: counted by record bytes alone, a 32 MiB journal
/// took 55 MB more in `bench-flush.sh`.
const SLOT_BYTES: u64 = std::mem::size_of::<((u32, Bytes), PendingEntry)>() as u64 + 1;

/// What applying a record replaced, to put back when its write fails.
pub(super) struct Undo {
    replaced: Vec<((u32, Bytes), Option<PendingEntry>)>,
    applied: u64,
    size: u64,
}

impl Record {
    pub(super) fn key(&self) -> [u8; 8] {
        self.seq.to_be_bytes()
    }
    pub(super) fn bytes(&self) -> &[u8] {
        &self.blob
    }
}

/// What a settle wrote: each key with the record of the value it wrote, and the bytes of the
/// records it deleted.
pub(super) struct Settled {
    keys: Vec<((u32, Bytes), u64)>,
    bytes: u64,
}

/// The journal's state in memory (see the module doc).
pub(super) struct Journal {
    pending: Mutex<Pending>,
    writer: Mutex<()>,
    /// Bytes of records held before the next write settles them (`[buffer] mirror_journal_mb`).
    pub(super) limit: u64,
}

impl Default for Journal {
    fn default() -> Self {
        Journal {
            pending: Mutex::new(Pending {
                next_seq: 1,
                ..Default::default()
            }),
            writer: Mutex::new(()),
            limit: DEFAULT_JOURNAL_BYTES,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section leaves the state whole: a panic elsewhere does not poison it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Journal {
    /// Held by whatever writes mirror data (records, settles, direct writes), for the whole
    /// write.
    pub(super) fn writer(&self) -> MutexGuard<'_, ()> {
        lock(&self.writer)
    }

    /// The newest journaled value of `key`: `Some(None)` when it was deleted, `None` when the
    /// `mirror` family holds what there is.
    pub(super) fn get(&self, db: u32, key: &[u8]) -> Option<Option<Bytes>> {
        lock(&self.pending)
            .entries
            .get(&KeyRef { db, key })
            .map(|entry| entry.value.clone())
    }

    /// Whether there is anything to settle.
    pub(super) fn has_pending(&self) -> bool {
        !lock(&self.pending).entries.is_empty()
    }

    /// Whether what is pending passes the journal's size.
    pub(super) fn is_due(&self) -> bool {
        lock(&self.pending).memory() > self.limit
    }

    /// What the pending entries take in memory: their records and the map's table.
    pub(super) fn pending_bytes(&self) -> u64 {
        lock(&self.pending).memory()
    }

    /// Encodes `entries` as the next record (written by the caller, then [`Journal::applied`]).
    pub(super) fn record(&self, entries: &MirrorEntries) -> Record {
        let seq = {
            let mut pending = lock(&self.pending);
            pending.next_seq += 1;
            pending.next_seq - 1
        };
        let mut out = Encoder {
            out: Vec::with_capacity(entries.len() * 64 + 4),
        };
        out.u32(entries.len() as u32);
        let mut ranges = Vec::with_capacity(entries.len());
        let mut value = Vec::new();
        for ((db, key), entry) in entries {
            out.u32(*db);
            let start = out.out.len() + 4;
            out.bytes(key);
            let name = start..out.out.len();
            let range = match entry {
                Some(entry) => {
                    debug_assert!(
                        !entry.fields.stored_by_field(),
                        "journaled values are whole"
                    );
                    entry.encode_into(&mut value);
                    out.u8(1).bytes(&value);
                    Some(out.out.len() - value.len()..out.out.len())
                }
                None => {
                    out.u8(0);
                    None
                }
            };
            ranges.push((*db, name, range));
        }
        let mut blob = out.finish();
        if blob.capacity() > blob.len() + blob.len() / 4 {
            blob.shrink_to_fit();
        }
        // The allocation is what stays in memory (`Bytes` keeps all of it).
        let size = blob.capacity() as u64;
        Record {
            seq,
            blob: Bytes::from(blob),
            entries: ranges,
            size,
        }
    }

    /// Its entries become the newest values of their keys (replaying the journal).
    pub(super) fn applied(&self, record: Record) {
        drop(self.apply(record));
    }

    /// Its entries become the newest values of their keys, before its write: a reader must
    /// never find a batch's raw states, changes or checkpoint with the mirror from before it
    /// (the write-back task completes `#` ops by comparing the raw state with the mirror). The
    /// caller holds [`Journal::writer`] and undoes this when the write fails.
    pub(super) fn apply(&self, record: Record) -> Undo {
        let mut pending = lock(&self.pending);
        let Record {
            seq,
            blob,
            entries,
            size,
        } = record;
        let mut replaced = Vec::with_capacity(entries.len());
        for (db, name, range) in entries {
            let value = range.map(|range| blob.slice(range));
            let key = (db, blob.slice(name));
            let before = pending
                .entries
                .insert(key.clone(), PendingEntry { value, seq });
            replaced.push((key, before));
        }
        let undo = Undo {
            replaced,
            applied: pending.applied,
            size,
        };
        pending.applied = pending.applied.max(seq);
        pending.next_seq = pending.next_seq.max(seq + 1);
        pending.bytes += size;
        undo
    }

    /// The record applied with `undo` was not written: the values before it come back.
    pub(super) fn undo(&self, undo: Undo) {
        let mut pending = lock(&self.pending);
        for (key, before) in undo.replaced.into_iter().rev() {
            match before {
                Some(entry) => pending.entries.insert(key, entry),
                None => pending.entries.remove(&key),
            };
        }
        pending.applied = undo.applied;
        pending.bytes = pending.bytes.saturating_sub(undo.size);
    }

    /// Adds a settle to `write`: every pending value put into (or deleted from) `mirror` in
    /// key order, and the records deleted. `None`: nothing to settle.
    pub(super) fn settle_into(
        &self,
        write: &mut rocksdb::WriteBatch,
        (mirror, journal): (&rocksdb::ColumnFamily, &rocksdb::ColumnFamily),
    ) -> Option<Settled> {
        let (mut values, through, bytes) = {
            let pending = lock(&self.pending);
            if pending.entries.is_empty() {
                return None;
            }
            let values: Vec<_> = pending
                .entries
                .iter()
                .map(|(key, entry)| (key.clone(), entry.value.clone(), entry.seq))
                .collect();
            (values, pending.applied, pending.bytes)
        };
        // In key order, consecutive inserts walk mostly the same nodes of the memtable.
        values.sort_unstable_by(|(a, ..), (b, ..)| a.cmp(b));
        let mut mirror_key = Vec::new();
        let mut keys = Vec::with_capacity(values.len());
        for ((db, key), value, seq) in values {
            mirror_key_into(db, &key, &mut mirror_key);
            match value {
                Some(value) => write.put_cf(mirror, &mirror_key, &value),
                None => write.delete_cf(mirror, &mirror_key),
            }
            keys.push(((db, key), seq));
        }
        write.delete_range_cf(journal, 0u64.to_be_bytes(), (through + 1).to_be_bytes());
        Some(Settled { keys, bytes })
    }

    /// The settle was written: the entries it wrote are forgotten (unless journaled again
    /// since).
    pub(super) fn settled(&self, settled: Settled) {
        let mut pending = lock(&self.pending);
        for (key, seq) in settled.keys {
            if let hashbrown::hash_map::Entry::Occupied(entry) = pending.entries.entry(key) {
                if entry.get().seq == seq {
                    entry.remove();
                }
            }
        }
        pending.bytes = pending.bytes.saturating_sub(settled.bytes);
        // A settle after a large batch (a flush of many keys) leaves the map's table as large
        // as it was: given back once mostly empty.
        let (len, capacity) = (pending.entries.len(), pending.entries.capacity());
        if capacity > 4096 && capacity > 4 * len {
            pending.entries.shrink_to(len * 2);
        }
    }

    /// Decodes a record read back from the journal (opening the buffer).
    pub(super) fn decode(seq: u64, raw: &[u8]) -> Result<Record, DecodeError> {
        let blob = Bytes::copy_from_slice(raw);
        let mut d = Decoder::new(&blob, "mirror journal record");
        let count = d.u32()?;
        let mut entries = Vec::new();
        for _ in 0..count {
            let db = d.u32()?;
            let name = d.bytes_range()?;
            let range = match d.flag()? {
                true => Some(d.bytes_range()?),
                false => None,
            };
            entries.push((db, name, range));
        }
        d.end()?;
        let size = blob.len() as u64;
        Ok(Record {
            seq,
            blob,
            entries,
            size,
        })
    }
}

/// The journal as the store uses it: replayed when opened, read before the `mirror` family,
/// settled into it.
impl Store {
    /// Reads the journal's records back into memory, in order (`journal.rs`).
    pub(super) fn replay_journal(&self) -> Result<(), StoreError> {
        for item in self
            .db
            .iterator_cf(self.cf(CF_JOURNAL)?, IteratorMode::Start)
        {
            let (key, value) = item.map_err(|e| self.rocks(e))?;
            let seq = self.seq_key(&key, "mirror journal key")?;
            let record = Journal::decode(seq, &value).map_err(|e| self.corrupt(e))?;
            self.journal.applied(record);
        }
        Ok(())
    }

    /// How many bytes of mirror updates the journal holds before they are settled
    /// (`[buffer] mirror_journal_mb`; at least 1).
    pub fn set_journal_bytes(&mut self, bytes: u64) {
        self.journal.limit = bytes.max(1);
    }

    /// Writes every journaled mirror update into the `mirror` family (`journal.rs`): before
    /// anything reads or writes the family alone.
    pub fn settle_mirror(&self) -> Result<(), StoreError> {
        if !self.journal.has_pending() {
            return Ok(());
        }
        let _writer = self.journal.writer();
        self.settle_locked()
    }

    /// [`Store::settle_mirror`], the journal's writer lock held.
    pub(super) fn settle_locked(&self) -> Result<(), StoreError> {
        let mut write = WriteBatch::default();
        let families = (self.cf(CF_MIRROR)?, self.cf(CF_JOURNAL)?);
        let Some(settled) = self.journal.settle_into(&mut write, families) else {
            return Ok(());
        };
        self.write_rocks(write, false)?;
        self.journal.settled(settled);
        Ok(())
    }

    /// The newest journaled value of `key`, when it has one not settled (`journal.rs`):
    /// always a whole value.
    pub(super) fn journaled(
        &self,
        db: u32,
        key: &[u8],
    ) -> Result<Option<Option<MirrorValue>>, StoreError> {
        match self.journal.get(db, key) {
            Some(Some(raw)) => MirrorValue::decode(&raw)
                .map(|value| Some(Some(value)))
                .map_err(|e| self.corrupt(e)),
            Some(None) => Ok(Some(None)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Batch;

    fn entries(list: &[(&str, Option<u64>)]) -> MirrorEntries {
        list.iter()
            .map(|(key, generation)| {
                let value = generation.map(MirrorValue::hash);
                ((0, Bytes::copy_from_slice(key.as_bytes())), value)
            })
            .collect()
    }

    fn stored_generation(store: &Store, key: &str) -> Option<u64> {
        Some(store.mirror(0, key.as_bytes()).unwrap()?.generation)
    }

    fn journal_batch(list: &[(&str, Option<u64>)]) -> Batch {
        let mut batch = Batch::default();
        batch.put_mirror_entries(std::sync::Arc::new(entries(list)));
        batch
    }

    /// The invariant of the module doc across restarts: what was journaled is read back, and
    /// a value written to the family directly is never overwritten by an older journaled one.
    #[test]
    fn journaled_values_are_read_survive_a_restart_and_never_land_over_a_newer_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .write(journal_batch(&[("a", Some(1)), ("b", Some(1))]), true)
            .unwrap();
        assert_eq!(stored_generation(&store, "a"), Some(1));
        let family = store.cf(super::super::CF_MIRROR).unwrap();
        assert_eq!(
            store.db.get_cf(family, b"\0\0\0\0a").unwrap(),
            None,
            "journaled"
        );
        let mut direct = Batch::default();
        direct.put_mirror(0, b"a", &MirrorValue::hash(2));
        store.write(direct, true).unwrap();
        assert_eq!(stored_generation(&store, "a"), Some(2));
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            stored_generation(&store, "a"),
            Some(2),
            "not the journaled 1"
        );
        assert_eq!(stored_generation(&store, "b"), Some(1));
        store
            .write(journal_batch(&[("a", Some(3)), ("b", None)]), true)
            .unwrap();
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(stored_generation(&store, "a"), Some(3));
        assert_eq!(stored_generation(&store, "b"), None);
        assert_eq!(store.mirror_whole(0, b"a").unwrap().unwrap().generation, 3);
        let page = store
            .mirror_scan(None, &crate::buffer::MirrorCursor::default(), 10)
            .unwrap();
        let scanned: Vec<_> = page
            .entries
            .iter()
            .map(|(_, k, v)| (k.clone(), v.generation))
            .collect();
        assert_eq!(
            scanned,
            vec![(Bytes::from_static(b"a"), 3)],
            "a scan settles first"
        );
        assert!(!store.journal.has_pending());
    }

    #[test]
    fn past_its_size_the_journal_is_settled() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.journal.limit = 200;
        store.write(journal_batch(&[("a", Some(1))]), true).unwrap();
        assert!(store.journal.has_pending(), "under its size");
        let many: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
        let list: Vec<_> = many.iter().map(|k| (k.as_str(), Some(2))).collect();
        store.write(journal_batch(&list), true).unwrap();
        assert!(
            store.journal.is_due(),
            "past its size: settled by the next write"
        );
        store.write(journal_batch(&[("b", Some(3))]), true).unwrap();
        assert!(store.journal.has_pending(), "the next write's own record");
        store.settle_mirror().unwrap();
        assert!(!store.journal.has_pending());
        assert!(!store.journal.has_pending());
        let records = store.cf(super::super::CF_JOURNAL).unwrap();
        assert_eq!(
            store
                .db
                .iterator_cf(records, rocksdb::IteratorMode::Start)
                .count(),
            0
        );
        assert_eq!(stored_generation(&store, "a"), Some(1));
        assert_eq!(stored_generation(&store, "k9"), Some(2));
        assert_eq!(stored_generation(&store, "b"), Some(3));
    }

    fn generation(journal: &Journal, key: &str) -> Option<Option<u64>> {
        let value = journal.get(0, key.as_bytes())?;
        Some(value.map(|raw| MirrorValue::decode(&raw).unwrap().generation))
    }

    #[test]
    fn the_newest_value_of_each_key_is_pending_and_a_record_reads_back_as_written() {
        let journal = Journal::default();
        let first = journal.record(&entries(&[("a", Some(1)), ("b", Some(1))]));
        let again = Journal::decode(first.seq, first.bytes()).unwrap();
        journal.applied(again);
        journal.applied(journal.record(&entries(&[("a", Some(2)), ("b", None)])));
        assert_eq!(generation(&journal, "a"), Some(Some(2)));
        assert_eq!(generation(&journal, "b"), Some(None), "deleted");
        assert_eq!(generation(&journal, "c"), None, "never journaled");
        assert!(journal.pending_bytes() > 0);
    }

    #[test]
    fn a_record_whose_write_failed_is_undone() {
        let journal = Journal::default();
        journal.applied(journal.record(&entries(&[("a", Some(1))])));
        let bytes = lock(&journal.pending).bytes;
        let undo = journal.apply(journal.record(&entries(&[("a", Some(2)), ("b", None)])));
        assert_eq!(
            generation(&journal, "a"),
            Some(Some(2)),
            "visible before the write"
        );
        journal.undo(undo);
        assert_eq!(generation(&journal, "a"), Some(Some(1)));
        assert_eq!(generation(&journal, "b"), None);
        assert_eq!(lock(&journal.pending).bytes, bytes);
        assert_eq!(lock(&journal.pending).applied, 1);
    }

    #[test]
    fn a_settle_forgets_only_what_it_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let db = rocksdb::DB::open_cf(&options, dir.path(), ["m", "j"]).unwrap();
        let (mirror, records) = (db.cf_handle("m").unwrap(), db.cf_handle("j").unwrap());
        let journal = Journal::default();
        let record = journal.record(&entries(&[("a", Some(1)), ("b", Some(1))]));
        db.put_cf(records, record.key(), record.bytes()).unwrap();
        journal.applied(record);
        let mut write = rocksdb::WriteBatch::default();
        let settled = journal.settle_into(&mut write, (mirror, records)).unwrap();
        // Journaled between the settle's reading and its end: stays pending.
        let later = journal.record(&entries(&[("a", Some(3))]));
        db.put_cf(records, later.key(), later.bytes()).unwrap();
        journal.applied(later);
        db.write(write).unwrap();
        journal.settled(settled);
        assert_eq!(generation(&journal, "a"), Some(Some(3)));
        assert_eq!(generation(&journal, "b"), None, "written to the family");
        let b = db.get_cf(mirror, [0, 0, 0, 0, b'b']).unwrap().unwrap();
        assert_eq!(MirrorValue::decode(&b).unwrap().generation, 1);
        let left: Vec<_> = db
            .iterator_cf(records, rocksdb::IteratorMode::Start)
            .map(|item| item.unwrap().0.to_vec())
            .collect();
        assert_eq!(
            left,
            vec![2u64.to_be_bytes().to_vec()],
            "the later record stays"
        );
        let mut write = rocksdb::WriteBatch::default();
        assert!(journal.settle_into(&mut write, (mirror, records)).is_some());
    }

    #[test]
    fn a_damaged_record_is_an_error_naming_where() {
        let journal = Journal::default();
        let record = journal.record(&entries(&[("a", Some(1))]));
        let cut = &record.bytes()[..record.bytes().len() - 3];
        let error = Journal::decode(1, cut).err().unwrap();
        assert_eq!(error.what, "mirror journal record");
        assert!(Journal::decode(1, &[0, 0, 0, 1, 0]).is_err());
    }
}
