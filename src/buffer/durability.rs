//! Writes that are synced after they are written, and who may read them in between.
//!
//! RocksDB makes a write with `sync` readable only once it is on disk, but every other write
//! waits behind it while it syncs (there is one write-ahead log, written in order). Capture's
//! commits are synced, the sinks' acknowledgement queue and the write-back task's deletions are
//! not, yet they waited for capture's syncs: about 0.2 ms at the median and 0.8 ms at the 99th
//! percentile of an acknowledgement's path went there (docs/benchmarks.md, session 14).
//!
//! [`Store::write_then_sync`] writes without `sync`, then syncs the log (`SyncWAL`, which lets
//! other writes go on meanwhile). Until the sync returns, the write can be read but is not on
//! disk; a crash of the machine (not of the process: the page cache keeps it) could lose it.
//! Whatever acts on a write outside this buffer must therefore not read it early:
//! - **sinks**: a change applied to a database and then lost would leave the database ahead of
//!   the buffer. Before the write, [`Unsynced`] marks the first seq of its changes' first unit
//!   (for the batch that ends a long transaction written in parts, that is the transaction's
//!   first change: its earlier parts become readable with its end, not before); the mark is
//!   cleared once the sync returns, and [`Store::closed_changes`] stops before it. The mark is
//!   read *after* the read's RocksDB snapshot is taken: a change in the snapshot was written
//!   after the mark was set, so the mark read then is still set unless the sync has returned.
//!   A failed sync leaves the mark set (the service stops on the error).
//! - **the write-back task**, which completes `#` ops from the raw states it reads: a batch that
//!   puts raw states sets [`Store::raw_states_synced`] false until its sync returns, and the
//!   task defers its completions meanwhile (read first, checked after, as above); the batch's
//!   publication wakes it again.
//! - **acknowledgements** queued by capture (`+`, `-`, invalid ops: sent once durably
//!   captured): a batch that queues any is written with `sync` as before (the committer decides).
//! - **the durable offset** (`REPLCONF ACK`) and the buffered position: published by the
//!   committer after the sync. A reconciliation (`sink/reconcile.rs`) syncs before it reads the
//!   checkpoint it records in the database.
//!
//! Anything else read in between (mirror values) is the state the replication stream up to the
//! write's offset gives; after a crash capture resumes from the last synced checkpoint and
//! rebuilds the same state from the same commands.
//!
//! A full sync writes many batches and syncs them together: [`Store::write_unsynced`] marks and
//! writes one, [`Store::sync_written`] syncs every one written so far and clears the mark (the
//! snapshot writer does so every few batches, when no batch came for a moment, and at its end,
//! so sinks trail a load by those few batches); a batch that queues acknowledgements is written
//! with `sync` ([`Store::write_synced`]), as the committer writes one. A failed write or sync
//! leaves the mark set: capture stops on the error, except when an abandoned full sync's writer
//! fails (it is only logged); its changes then stay hidden until the next full sync, which the
//! checkpoint still demands, syncs. A mark already set is kept: it names an earlier seq than the
//! batch's. One writer
//! of changes at a time: capture's committer or a full sync's writer, never both (capture waits
//! for its committer before anything but the command stream), so a clear after a sync never
//! uncovers another writer's write made during that sync.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::batch::Op;
use super::{Batch, Store, StoreError};
use crate::position::ChangeSeq;

/// What is written but not synced yet: the first seq sinks must not read (`u64::MAX`: none),
/// and whether raw states of `#` ops are among it.
#[derive(Debug)]
pub(crate) struct Unsynced {
    changes_from: AtomicU64,
    raw: AtomicBool,
}

impl Default for Unsynced {
    fn default() -> Self {
        Unsynced {
            changes_from: AtomicU64::new(u64::MAX),
            raw: AtomicBool::new(false),
        }
    }
}

impl Unsynced {
    /// The seq sinks stop before.
    pub(super) fn changes_from(&self) -> u64 {
        self.changes_from.load(Ordering::SeqCst)
    }

    /// Hides `seq` and every later change; an earlier mark already set stays.
    fn mark(&self, seq: Option<ChangeSeq>, raw: bool) {
        if let Some(seq) = seq {
            self.changes_from.fetch_min(seq.0, Ordering::SeqCst);
        }
        if raw {
            self.raw.store(true, Ordering::SeqCst);
        }
    }

    fn clear(&self) {
        self.changes_from.store(u64::MAX, Ordering::SeqCst);
        self.raw.store(false, Ordering::SeqCst);
    }
}

impl Store {
    /// Applies `batch` atomically and then syncs it, letting other writes go on during the
    /// sync; its changes are hidden from sinks until the sync returns (see the module doc).
    pub fn write_then_sync(&self, batch: Batch) -> Result<(), StoreError> {
        self.write_unsynced(batch)?;
        self.sync_written()
    }

    /// Applies `batch` atomically without syncing it; its changes (and raw states) stay hidden
    /// until [`Store::sync_written`]. A failed write leaves the mark set (see the module doc).
    pub fn write_unsynced(&self, batch: Batch) -> Result<(), StoreError> {
        self.unsynced.mark(batch.first_unit_seq(), batch.puts_raw());
        self.write(batch, false)
    }

    /// Applies `batch` atomically with `sync` (readable only once on disk, with every write
    /// before it), then shows what [`Store::write_unsynced`] hid: for a batch that queues
    /// acknowledgements, which the write-back task sends as soon as it reads them.
    pub fn write_synced(&self, batch: Batch) -> Result<(), StoreError> {
        self.unsynced.mark(batch.first_unit_seq(), batch.puts_raw());
        self.write(batch, true)?;
        self.unsynced.clear();
        Ok(())
    }

    /// Syncs every write made so far and shows what [`Store::write_unsynced`] hid.
    pub fn sync_written(&self) -> Result<(), StoreError> {
        self.sync()?;
        self.unsynced.clear();
        Ok(())
    }

    /// Whether every raw state written is synced. Read *after* the raw states it vouches for.
    pub fn raw_states_synced(&self) -> bool {
        !self.unsynced.raw.load(Ordering::SeqCst)
    }

    /// Syncs every write made so far to disk.
    pub fn sync(&self) -> Result<(), StoreError> {
        #[cfg(test)]
        self.syncs.fetch_add(1, Ordering::SeqCst);
        self.db.flush_wal(true).map_err(|e| self.rocks(e))
    }
}

impl Batch {
    /// The first seq of the unit of the first change the batch puts, if any (of a long
    /// transaction whose end it writes, the transaction's first change).
    pub(super) fn first_unit_seq(&self) -> Option<ChangeSeq> {
        self.ops.iter().find_map(|op| match op {
            Op::Changes(changes) => changes.first_unit,
            _ => None,
        })
    }

    /// Whether it puts raw states of `#` ops.
    pub(super) fn puts_raw(&self) -> bool {
        self.ops.iter().any(|op| matches!(op, Op::PutRaw(..)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Change;
    use crate::position::ReplOffset;

    fn changes(seqs: std::ops::RangeInclusive<u64>) -> Vec<Change> {
        seqs.map(Change::deleting).collect()
    }

    fn read(store: &Store) -> Vec<u64> {
        let read = store.closed_changes(ChangeSeq(1), 100).unwrap();
        read.iter().map(|c| c.seq.0).collect()
    }

    /// Changes written but not synced yet are not what a sink reads: the marked seq and every
    /// later one stay hidden until the mark is cleared, which `write_then_sync` does once its
    /// sync has returned.
    #[test]
    fn sinks_read_no_change_before_it_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut batch = Batch::default();
        batch.put_changes(changes(1..=3));
        store.write_then_sync(batch).unwrap();
        assert_eq!(read(&store), vec![1, 2, 3]);
        assert_eq!(
            store.unsynced.changes_from(),
            u64::MAX,
            "cleared after the sync"
        );

        // The state between `write_then_sync`'s write and its sync.
        let mut batch = Batch::default();
        batch.put_changes(changes(4..=5));
        assert_eq!(batch.first_unit_seq(), Some(ChangeSeq(4)));
        store.unsynced.mark(batch.first_unit_seq(), false);
        store.write(batch, false).unwrap();
        assert_eq!(read(&store), vec![1, 2, 3], "4 and 5 are not synced yet");
        store.sync().unwrap();
        store.unsynced.clear();
        assert_eq!(read(&store), vec![1, 2, 3, 4, 5]);
    }

    /// The batch that ends a unit whose first part is already written marks the unit's first
    /// change: until its sync, a sink sees none of the unit (its parts would be a unit without
    /// its end).
    #[test]
    fn the_end_of_a_long_unit_hides_the_whole_unit_until_synced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut part = changes(1..=4);
        part[3].unit_end = false;
        let mut batch = Batch::default();
        batch.put_changes(part);
        store.write_then_sync(batch).unwrap();
        let mut end = changes(5..=5);
        end[0].unit = ChangeSeq(4);
        let mut batch = Batch::default();
        batch.put_changes(end);
        assert_eq!(batch.first_unit_seq(), Some(ChangeSeq(4)));
        store.unsynced.mark(batch.first_unit_seq(), false);
        store.write(batch, false).unwrap();
        assert_eq!(
            read(&store),
            vec![1, 2, 3],
            "nothing of the unit before its sync"
        );
        store.unsynced.clear();
        assert_eq!(read(&store), vec![1, 2, 3, 4, 5]);
    }

    /// Raw states written by `write_then_sync` are vouched for only once synced.
    #[test]
    fn raw_states_are_vouched_for_once_synced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.raw_states_synced());
        store.unsynced.mark(None, true);
        assert!(!store.raw_states_synced(), "between the write and its sync");
        store.unsynced.clear();
        let mut batch = Batch::default();
        let value = crate::buffer::MirrorValue::hash(1);
        batch.put_raw(0, b"k", &value);
        assert!(batch.puts_raw());
        store.write_then_sync(batch).unwrap();
        assert!(store.raw_states_synced());
    }

    /// Batches written by `write_unsynced` stay hidden, from the first one's first change on,
    /// until `sync_written`; a later batch's mark does not move the first one's.
    #[test]
    fn batches_written_unsynced_are_hidden_until_synced_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut batch = Batch::default();
        batch.put_changes(changes(1..=2));
        store.write_then_sync(batch).unwrap();
        for seqs in [3..=4, 5..=6] {
            let mut batch = Batch::default();
            batch.put_changes(changes(seqs));
            store.write_unsynced(batch).unwrap();
            assert_eq!(read(&store), vec![1, 2], "3 and later are not synced yet");
        }
        let mut batch = Batch::default();
        batch.put_raw(0, b"k", &crate::buffer::MirrorValue::hash(1));
        store.write_unsynced(batch).unwrap();
        assert!(!store.raw_states_synced());
        store.sync_written().unwrap();
        assert_eq!(read(&store), vec![1, 2, 3, 4, 5, 6]);
        assert!(store.raw_states_synced());
    }

    /// A batch without changes marks nothing (and leaves a mark of no one else's).
    #[test]
    fn a_write_without_changes_marks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut batch = Batch::default();
        batch.put_clock(ReplOffset(5), 1, 0);
        assert_eq!(batch.first_unit_seq(), None);
        store.write_then_sync(batch).unwrap();
        assert_eq!(store.unsynced.changes_from(), u64::MAX);
    }
}
