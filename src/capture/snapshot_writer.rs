//! Writes a full sync's batches on a thread of its own, so that capture decodes and applies the
//! next keys of the snapshot while RocksDB inserts the previous ones (the initial load's
//! profile: about a third of capture's thread in RocksDB's write, docs/benchmarks.md).
//!
//! The batches are written in the order they are handed over, without syncing each: every
//! [`SYNC_EVERY_BATCHES`] batches, after [`SYNC_WHEN_IDLE`] without a batch and at its end the
//! thread syncs them together (a batch that queues acknowledgements is written with `sync`, as
//! the committer writes one: the write-back task sends what it reads), and until then
//! their changes are hidden from sinks ([`Store::write_unsynced`], `buffer/durability.rs`): a
//! database written from a change a machine crash then takes from the buffer would stand ahead
//! of it. [`SnapshotWriter::finish`] waits for every batch handed over and its sync; the full
//! sync's last write is synced and made by capture itself after it. Reads during a full sync are
//! not affected: a snapshot names each key once, so the key a batch reads back (its previous
//! mirror value) is never one an earlier batch of the same sync wrote.

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::buffer::{Batch, Store, StoreError};

/// Batches queued before handing over another one waits: bounds memory to a few batches.
const QUEUED_BATCHES: usize = 4;

/// Batches written between two syncs: what sinks may trail a load by (a few thousand keys),
/// against a sync for every batch.
pub(super) const SYNC_EVERY_BATCHES: usize = 8;

/// How long written batches wait for the next one before they are synced anyway: a snapshot
/// that arrives slowly (or stalls) does not hide what was written from sinks.
const SYNC_WHEN_IDLE: Duration = Duration::from_millis(50);

/// The writing thread of one full sync.
pub struct SnapshotWriter {
    path: std::path::PathBuf,
    batches: Option<SyncSender<Batch>>,
    thread: Option<JoinHandle<Result<(), StoreError>>>,
}

impl SnapshotWriter {
    /// Starts the writing thread.
    pub fn start(store: Arc<Store>) -> Result<SnapshotWriter, StoreError> {
        SnapshotWriter::syncing_when_idle(store, SYNC_WHEN_IDLE)
    }

    /// Starts the writing thread, which syncs what it wrote after `idle` without a batch.
    fn syncing_when_idle(store: Arc<Store>, idle: Duration) -> Result<SnapshotWriter, StoreError> {
        let path = store.path().to_path_buf();
        let store_path_for_error = path.clone();
        let (batches, queue) = sync_channel::<Batch>(QUEUED_BATCHES);
        let thread = std::thread::Builder::new()
            .name("writebehind-snapshot".into())
            .spawn(move || {
                crate::buffer::stop_rocksdb_perf_counters();
                write_batches(&store, &queue, idle)
            })
            .map_err(|e| StoreError::Writer {
                path: store_path_for_error.clone(),
                message: format!("cannot start the full sync's writing thread: {e}"),
            })?;
        Ok(SnapshotWriter {
            path,
            batches: Some(batches),
            thread: Some(thread),
        })
    }

    /// Hands a batch over; fails with the writer's error once a write failed.
    pub fn write(&mut self, batch: Batch) -> Result<(), StoreError> {
        let sent = self
            .batches
            .as_ref()
            .is_some_and(|batches| batches.send(batch).is_ok());
        if sent {
            return Ok(());
        }
        self.finish()?;
        Err(self.stopped("the full sync's writing thread stopped"))
    }

    /// Waits until every batch handed over is written and synced; the first failed write's
    /// error.
    pub fn finish(&mut self) -> Result<(), StoreError> {
        drop(self.batches.take());
        match self.thread.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => {
                Err(self.stopped("the full sync's writing thread panicked (see the log above)"))
            }
        }
    }

    fn stopped(&self, message: &str) -> StoreError {
        StoreError::Writer {
            path: self.path.clone(),
            message: message.into(),
        }
    }
}

/// Writes what `queue` hands over, in order, until it closes (see the module doc for the syncs).
fn write_batches(store: &Store, queue: &Receiver<Batch>, idle: Duration) -> Result<(), StoreError> {
    let mut unsynced = 0;
    loop {
        let received = match unsynced {
            0 => queue.recv().map_err(|_| RecvTimeoutError::Disconnected),
            _ => queue.recv_timeout(idle),
        };
        let mut batch = match received {
            Ok(batch) => batch,
            Err(RecvTimeoutError::Timeout) => {
                store.sync_written()?;
                unsynced = 0;
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        // Sorted here, not on capture's thread.
        batch.sort_mirror_writes();
        if batch.queues_acks() {
            // Readable only once synced: the write-back task sends what it reads.
            store.write_synced(batch)?;
            unsynced = 0;
            continue;
        }
        store.write_unsynced(batch)?;
        unsynced += 1;
        if unsynced == SYNC_EVERY_BATCHES {
            store.sync_written()?;
            unsynced = 0;
        }
    }
    if unsynced > 0 {
        store.sync_written()?;
    }
    Ok(())
}

impl Drop for SnapshotWriter {
    /// An abandoned full sync (the link dropped) still writes what it handed over, as before,
    /// and a failure then is reported by the next full sync's own writes.
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!(error = %e, "an abandoned full sync's last writes failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{Change, MirrorValue};
    use crate::position::ChangeSeq;
    use std::time::{Duration, Instant};

    /// A batch writing key `k<seq>` with the deletion of row `seq`.
    fn batch_of_change(seq: u64) -> Batch {
        let mut batch = Batch::default();
        batch.put_mirror(0, format!("k{seq}").as_bytes(), &MirrorValue::hash(1));
        batch.put_changes(vec![Change::deleting(seq)]);
        batch
    }

    fn readable_seqs(store: &Store) -> Vec<u64> {
        let changes = store.closed_changes(ChangeSeq(1), 100).unwrap();
        changes.iter().map(|c| c.seq.0).collect()
    }

    /// Polls until `done` holds, failing after a deadline.
    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Never idle long enough to sync for it, in a test.
    const NEVER: Duration = Duration::from_secs(3600);

    /// A written batch's changes stay hidden from sinks until the thread syncs: after
    /// `SYNC_EVERY_BATCHES` batches, and at the end for the rest.
    #[test]
    fn sinks_read_a_full_syncs_changes_only_once_synced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mut writer = SnapshotWriter::syncing_when_idle(store.clone(), NEVER).unwrap();
        let written = |seq: u64| {
            let store = store.clone();
            move || {
                store
                    .mirror(0, format!("k{seq}").as_bytes())
                    .unwrap()
                    .is_some()
            }
        };
        writer.write(batch_of_change(1)).unwrap();
        wait_for("the first batch's write", written(1));
        assert_eq!(
            readable_seqs(&store),
            Vec::<u64>::new(),
            "written, not synced"
        );

        let every = SYNC_EVERY_BATCHES as u64;
        for seq in 2..=every {
            writer.write(batch_of_change(seq)).unwrap();
        }
        let all: Vec<u64> = (1..=every).collect();
        wait_for("the periodic sync", || readable_seqs(&store) == all);

        writer.write(batch_of_change(every + 1)).unwrap();
        wait_for("the last batch's write", written(every + 1));
        assert_eq!(
            readable_seqs(&store),
            all,
            "the last batch is not synced yet"
        );
        writer.finish().unwrap();
        let all: Vec<u64> = (1..=every + 1).collect();
        assert_eq!(readable_seqs(&store), all, "synced at the end");
    }

    /// What is handed over is written in order, and `finish` returns once all of it is: the
    /// last batch's value of a key is the one read back.
    #[test]
    fn batches_are_written_in_order_and_finish_waits_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mut writer = SnapshotWriter::start(store.clone()).unwrap();
        for generation in 1..=50u64 {
            let mut batch = Batch::default();
            for key in 0..100u32 {
                batch.put_mirror(
                    0,
                    format!("k{key}").as_bytes(),
                    &MirrorValue::hash(generation),
                );
            }
            writer.write(batch).unwrap();
        }
        writer.finish().unwrap();
        for key in 0..100u32 {
            let value = store
                .mirror(0, format!("k{key}").as_bytes())
                .unwrap()
                .unwrap();
            assert_eq!(value.generation, 50);
        }
        assert!(
            writer.write(Batch::default()).is_err(),
            "finished: nothing more is written"
        );
    }

    /// Written batches are synced, and shown to sinks, when no batch follows for a moment.
    #[test]
    fn what_was_written_is_synced_when_the_snapshot_pauses() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let idle = Duration::from_millis(10);
        let mut writer = SnapshotWriter::syncing_when_idle(store.clone(), idle).unwrap();
        writer.write(batch_of_change(1)).unwrap();
        wait_for("the sync after a pause", || readable_seqs(&store) == [1]);
        writer.finish().unwrap();
    }

    /// A batch that queues acknowledgements is written with `sync`, so what it and the batches
    /// before it hold is readable once it is written, without waiting for the next sync.
    #[test]
    fn a_batch_queueing_acknowledgements_is_synced_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mut writer = SnapshotWriter::syncing_when_idle(store.clone(), NEVER).unwrap();
        writer.write(batch_of_change(1)).unwrap();
        let mut batch = batch_of_change(2);
        batch.put_acks(vec![crate::buffer::NewAck {
            db: 0,
            key: "k2".into(),
            uuid: "u".into(),
            failure: None,
            offset: crate::position::ReplOffset(20),
        }]);
        writer.write(batch).unwrap();
        wait_for("the acknowledging batch's sync", || {
            readable_seqs(&store) == [1, 2]
        });
        assert_eq!(store.acks(0, 10).unwrap().len(), 1);
        writer.finish().unwrap();
    }
}
