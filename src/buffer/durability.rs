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
//!   the buffer. The first seq of the write's changes is marked in [`UnsyncedFrom`] before the
//!   write and cleared once the sync returns; [`Store::closed_changes`] stops before it. The mark
//!   is read *after* the read's RocksDB snapshot is taken: a change in the snapshot was written
//!   after the mark was set, so the mark read then is still set unless the sync has returned.
//!   A failed sync leaves the mark set (the service stops on the error).
//! - **acknowledgements** queued by capture (`+`, `-`, invalid ops: sent once durably
//!   captured): a batch that queues any is written with `sync` as before (the committer decides).
//! - **the durable offset** (`REPLCONF ACK`) and the buffered position: published by the
//!   committer after the sync.
//!
//! Anything else read in between (mirror values, raw states of `#` ops, the checkpoint) is the
//! state the replication stream up to the write's offset gives; after a crash capture resumes
//! from the last synced checkpoint and rebuilds the same state from the same commands.

use std::sync::atomic::{AtomicU64, Ordering};

use super::batch::Op;
use super::{Batch, Store, StoreError};
use crate::position::ChangeSeq;

/// The first seq of changes written but not synced yet (`u64::MAX`: none).
#[derive(Debug)]
pub(crate) struct UnsyncedFrom(AtomicU64);

impl Default for UnsyncedFrom {
    fn default() -> Self {
        UnsyncedFrom(AtomicU64::new(u64::MAX))
    }
}

impl UnsyncedFrom {
    /// The seq sinks stop before.
    pub(super) fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    fn mark(&self, seq: ChangeSeq) {
        self.0.store(seq.0, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.0.store(u64::MAX, Ordering::SeqCst);
    }
}

impl Store {
    /// Applies `batch` atomically and then syncs it, letting other writes go on during the
    /// sync; its changes are hidden from sinks until the sync returns (see the module doc).
    pub fn write_then_sync(&self, batch: Batch) -> Result<(), StoreError> {
        let first = batch.first_change_seq();
        if let Some(seq) = first {
            self.unsynced_from.mark(seq);
        }
        if let Err(e) = self.write(batch, false) {
            // Nothing was written.
            self.unsynced_from.clear();
            return Err(e);
        }
        self.sync()?;
        if first.is_some() {
            self.unsynced_from.clear();
        }
        Ok(())
    }

    /// Syncs every write made so far to disk.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true).map_err(|e| self.rocks(e))
    }
}

impl Batch {
    /// The seq of the first change the batch puts, if any.
    pub(super) fn first_change_seq(&self) -> Option<ChangeSeq> {
        self.ops.iter().find_map(|op| match op {
            Op::PutChange(seq, _) => Some(*seq),
            Op::Changes(changes) => changes.first().map(|c| c.seq),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::buffer::{Change, RowChange};
    use crate::position::ReplOffset;

    fn changes(seqs: std::ops::RangeInclusive<u64>) -> Vec<Change> {
        seqs.map(|seq| Change {
            seq: ChangeSeq(seq),
            unit: ChangeSeq(seq),
            unit_end: true,
            offset: ReplOffset(seq * 10),
            mapping: "m".into(),
            row_id: Bytes::from(format!("{seq}")),
            row: RowChange::Delete,
            op: None,
        })
        .collect()
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
            store.unsynced_from.get(),
            u64::MAX,
            "cleared after the sync"
        );

        // The state between `write_then_sync`'s write and its sync.
        let mut batch = Batch::default();
        batch.put_changes(changes(4..=5));
        assert_eq!(batch.first_change_seq(), Some(ChangeSeq(4)));
        store.unsynced_from.mark(ChangeSeq(4));
        store.write(batch, false).unwrap();
        assert_eq!(read(&store), vec![1, 2, 3], "4 and 5 are not synced yet");
        store.sync().unwrap();
        store.unsynced_from.clear();
        assert_eq!(read(&store), vec![1, 2, 3, 4, 5]);
    }

    /// A batch without changes marks nothing (and leaves a mark of no one else's).
    #[test]
    fn a_write_without_changes_marks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut batch = Batch::default();
        batch.put_clock(ReplOffset(5), 1, 0);
        assert_eq!(batch.first_change_seq(), None);
        store.write_then_sync(batch).unwrap();
        assert_eq!(store.unsynced_from.get(), u64::MAX);
    }
}
