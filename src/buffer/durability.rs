//! Writes that are synced after they are written, and who may read them in between.
//!
//! RocksDB makes a write with `sync` readable only once it is on disk, but every other write
//! waits behind it while it syncs (there is one write-ahead log, written in order). Capture's
//! commits are synced, the sinks' acknowledgement queue and the write-back task's deletions are
//! not, yet they waited for capture's syncs: about 0.2 ms at the median and 0.8 ms at the 99th
//! percentile of an acknowledgement's path went there (docs/benchmarks.md, session 14).
//!
//! Capture's committer writes without `sync` ([`Store::write_in_window`]), then syncs the log
//! ([`Store::sync_window`]: `SyncWAL`, which lets other writes go on meanwhile). Until the
//! sync returns, the write can be read but is not on disk; a crash of the machine (not of the
//! process: the page cache keeps it) could lose it.
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
//! **Applied while it syncs.** Capture's committer writes a batch with
//! [`Store::write_in_window`] and syncs it with [`Store::sync_window`]. In between, the batch's
//! changes are a *window*: sinks may read them ([`Store::changes_to_apply`]) and write them into
//! an open database transaction, but they must not commit until [`Store::wait_synced`] says the
//! sync has returned, and they abandon the transaction when it says the sync failed. The
//! database's round trips then overlap the buffer's sync instead of following it (an
//! acknowledgement's path is the sync *or* the sink's writes, whichever is longer, then the
//! commit), and `buffered >= applied` still holds: a change counts as applied only once
//! committed. A window is opened only when no earlier change is unsynced (the batch's mark is
//! the mark), so what a sink reads in it is exactly that batch, which nothing else writes or
//! cuts while it is in flight (the committer holds one batch at a time, and whatever cuts the
//! change log waits for it). A failed sync is final for the process: every later wait fails
//! too, since a later clear of the mark could not vouch for the changes read in the window.
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

use tokio::sync::Notify;

use super::batch::Op;
use super::{Batch, Store, StoreError};
use crate::position::ChangeSeq;

/// What is written but not synced yet: the first seq sinks must not read (`u64::MAX`: none),
/// and whether raw states of `#` ops are among it.
#[derive(Debug)]
pub(crate) struct Unsynced {
    changes_from: AtomicU64,
    raw: AtomicBool,
    /// The last seq of the window being synced (0: no window): sinks may read up to it.
    window_end: AtomicU64,
    /// Why a write or sync of a window failed, once one has: nothing read in a window may
    /// commit any more.
    failure: std::sync::Mutex<Option<String>>,
    /// Woken when a window's sync returns, or fails.
    settled: Notify,
}

impl Default for Unsynced {
    fn default() -> Self {
        Unsynced {
            changes_from: AtomicU64::new(u64::MAX),
            raw: AtomicBool::new(false),
            window_end: AtomicU64::new(0),
            failure: Default::default(),
            settled: Notify::new(),
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
        self.window_end.store(0, Ordering::SeqCst);
        self.changes_from.store(u64::MAX, Ordering::SeqCst);
        self.raw.store(false, Ordering::SeqCst);
    }

    /// The seq a sink applying (not committing) stops before: past the mark to the window's
    /// end while a window is open. Read after the read's snapshot is taken, as the mark is.
    pub(super) fn apply_until(&self) -> u64 {
        let from = self.changes_from();
        let end = self.window_end.load(Ordering::SeqCst);
        if end != 0 && end >= from {
            end + 1
        } else {
            from
        }
    }

    /// Why a window failed, once one has.
    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn fail(&self, error: &StoreError) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
        self.window_end.store(0, Ordering::SeqCst);
        self.settled.notify_waiters();
    }
}

/// Why a change read in a window cannot be committed: the buffer's error.
#[derive(Debug, thiserror::Error)]
#[error("the buffer could not write or sync changes read before their sync ({0}); their transaction is abandoned and capture stops on the same error")]
pub struct SyncFailed(String);

impl Store {
    /// Applies `batch` atomically and then syncs it, as the committer does (in a window), in
    /// one call: for tests.
    #[cfg(test)]
    pub(crate) fn write_then_sync(&self, batch: Batch) -> Result<(), StoreError> {
        self.write_in_window(batch)?;
        self.sync_window()
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

    /// Applies `batch` without syncing it and opens a window on its changes when no earlier
    /// change is unsynced: sinks may read them now and commit them once
    /// [`Store::sync_window`] has returned (see the module doc). One writer of changes at a
    /// time (capture's committer).
    pub fn write_in_window(&self, batch: Batch) -> Result<(), StoreError> {
        let first = batch.first_unit_seq();
        let last = batch.last_change_seq();
        self.unsynced.mark(first, batch.puts_raw());
        if let (Some(first), Some(last)) = (first, last) {
            if self.unsynced.changes_from() == first.0 {
                self.unsynced.window_end.store(last.0, Ordering::SeqCst);
            }
        }
        self.write(batch, false)
            .inspect_err(|error| self.unsynced.fail(error))
    }

    /// Syncs every write made so far, closes the window and shows what was hidden; wakes the
    /// sinks waiting to commit (or, when the sync fails, tells them it did).
    pub fn sync_window(&self) -> Result<(), StoreError> {
        if let Err(error) = self.sync() {
            self.unsynced.fail(&error);
            return Err(error);
        }
        self.unsynced.clear();
        self.unsynced.settled.notify_waiters();
        Ok(())
    }

    /// Whether every change through `seq` is synced (no mark at or before it).
    pub fn is_synced(&self, seq: ChangeSeq) -> bool {
        self.unsynced.changes_from() > seq.0
    }

    /// Waits until every change through `seq` is synced: what a sink that read them in a
    /// window ([`Store::changes_to_apply`]) waits for before its commit.
    pub async fn wait_synced(&self, seq: ChangeSeq) -> Result<(), SyncFailed> {
        loop {
            let settled = self.unsynced.settled.notified();
            tokio::pin!(settled);
            // Registered before the check: a sync returning in between still wakes it.
            settled.as_mut().enable();
            if let Some(failure) = self.unsynced.failure() {
                return Err(SyncFailed(failure));
            }
            if self.is_synced(seq) {
                return Ok(());
            }
            settled.await;
        }
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

    /// The seq of the last change the batch puts, if any.
    pub(super) fn last_change_seq(&self) -> Option<ChangeSeq> {
        self.ops.iter().rev().find_map(|op| match op {
            Op::Changes(changes) => changes.last_seq(),
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

    fn applicable(store: &Store) -> Vec<u64> {
        let read = store.changes_to_apply(ChangeSeq(1), 100).unwrap();
        read.iter().map(|c| c.seq.0).collect()
    }

    /// A commit waiting, on a task of its own, for every change through `seq` to be synced.
    fn wait_in_task(
        store: &std::sync::Arc<Store>,
        seq: ChangeSeq,
    ) -> tokio::task::JoinHandle<Result<(), SyncFailed>> {
        let store = store.clone();
        tokio::spawn(async move { store.wait_synced(seq).await })
    }

    /// A batch written in a window can be read for applying before its sync, not for anything
    /// else; a commit waiting for it is released by the sync and not before.
    #[tokio::test]
    async fn a_window_is_applied_before_its_sync_and_committed_after() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
        let mut batch = Batch::default();
        batch.put_changes(changes(1..=2));
        store.write_then_sync(batch).unwrap();
        let mut batch = Batch::default();
        batch.put_changes(changes(3..=5));
        store.write_in_window(batch).unwrap();
        assert_eq!(read(&store), vec![1, 2], "not synced: hidden from readers");
        assert_eq!(
            applicable(&store),
            vec![1, 2, 3, 4, 5],
            "the window is applied"
        );
        assert!(store.is_synced(ChangeSeq(2)) && !store.is_synced(ChangeSeq(3)));
        let waiting = wait_in_task(&store, ChangeSeq(5));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "released before the sync");
        store.sync_window().unwrap();
        waiting.await.unwrap().expect("released by the sync");
        assert_eq!(read(&store), vec![1, 2, 3, 4, 5]);
        store.wait_synced(ChangeSeq(5)).await.expect("synced");
    }

    /// No window opens over changes another write left unsynced (a full sync's batches): what
    /// a sink applies early is exactly the window's batch.
    #[test]
    fn no_window_opens_behind_an_earlier_unsynced_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut batch = Batch::default();
        batch.put_changes(changes(1..=2));
        store.write_unsynced(batch).unwrap();
        let mut batch = Batch::default();
        batch.put_changes(changes(3..=4));
        store.write_in_window(batch).unwrap();
        assert_eq!(applicable(&store), Vec::<u64>::new());
        store.sync_window().unwrap();
        assert_eq!(applicable(&store), vec![1, 2, 3, 4]);
    }

    /// After a failed sync no commit waiting for a window is released, now or after a later
    /// sync clears the mark.
    #[tokio::test]
    async fn a_failed_sync_fails_every_wait_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
        let mut batch = Batch::default();
        batch.put_changes(changes(1..=2));
        store.write_in_window(batch).unwrap();
        let waiting = wait_in_task(&store, ChangeSeq(2));
        tokio::task::yield_now().await;
        store.unsynced.fail(&StoreError::RocksDb {
            path: dir.path().into(),
            message: "No space left on device".into(),
        });
        let refused = waiting
            .await
            .unwrap()
            .expect_err("the waiting commit is refused");
        assert!(
            refused.to_string().contains("No space left on device"),
            "the buffer's own error is named: {refused}"
        );
        assert_eq!(
            applicable(&store),
            Vec::<u64>::new(),
            "the window is closed"
        );
        store.sync_written().unwrap();
        assert!(store.wait_synced(ChangeSeq(2)).await.is_err());
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
