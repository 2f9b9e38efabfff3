//! Group commits written on a thread of their own, so that capture decodes and applies the next
//! batch while the previous one is written and synced.
//!
//! Profiling the capture benchmark showed about a third of capture's time in RocksDB's write
//! (memtable inserts, the log, the sync) with the decoding and applying waiting for it
//! (docs/benchmarks.md). The committer takes a finished batch and, on its thread, writes it
//! synced and then publishes it: the buffered position and the wake-up for the sinks, the keys
//! and acknowledgements for the write-back task, and the durable offset the link reports to
//! the primary (`REPLCONF ACK`). Nothing is published before its batch is synced, so the rule
//! "acknowledge only what is durable" holds as before.
//!
//! At most **one batch is in flight**: handing over the next one first waits for it. While it
//! is in flight, capture reads the mirror through the batch's changed entries (the
//! [`MirrorView`](super::working_set::MirrorView)), never from RocksDB alone. Whatever else
//! reads the buffer directly waits for the batch first ([`Committer::wait`]): a full sync, a
//! resync, a reconnection, a stop. A batch that writes raw states of `#` ops (which capture
//! reads back from RocksDB) is waited for at once, so raw states are never in flight.
//!
//! **How a batch is synced** (`buffer/durability.rs` says who may read what before):
//! - most batches are written without `sync` and then synced with `SyncWAL`
//!   ([`Store::write_in_window`], [`Store::sync_window`]), so that the sinks' and the
//!   write-back task's writes do not wait behind the sync; the sinks are woken between the two
//!   and write the batch's changes into their transactions meanwhile, but commit only once
//!   the sync has returned;
//! - a batch that queues acknowledgements is written with `sync`, which makes it readable only
//!   once it is on disk (the write-back task sends what it reads);
//! - a *quiet* batch (only mirror updates, deleted raw states and the checkpoint: commands on
//!   keys no mapping counts, completions of `#` ops) is written without a sync of its own. The
//!   next batch's sync covers it, or, when none comes within [`QUIET_SYNC_DELAY`], a sync of
//!   its own; its offset is published only then. Each `=` op written with a plain `HSET` costs
//!   one sync instead of two (the op's own commit, then its completion's).

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::state::ChangeCounts;
use super::stream::{Committed, Prepared};
use super::working_set::{Entries, Flushed};
use super::{CaptureError, CaptureOutputs};
use crate::buffer::{Batch, Store, StoreError};
use crate::position::{DurableOffset, ReplOffset};

/// What is published once a batch is synced.
pub struct Publication {
    pub committed: Committed,
    /// The offset the batch's checkpoint records.
    pub offset: ReplOffset,
    pub counts: ChangeCounts,
}

/// How long a quiet batch waits for a later batch's sync before it is synced on its own: the
/// most its offset's acknowledgement to the primary (`REPLCONF ACK`, hence `WAIT`) is delayed.
pub const QUIET_SYNC_DELAY: Duration = Duration::from_millis(5);

struct Job {
    batch: Batch,
    publication: Publication,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// What the writing thread is asked to do.
enum Work {
    Write(Job),
    /// Sync and publish the quiet batches written so far ([`Committer::settle`]).
    Settle(tokio::sync::oneshot::Sender<Result<(), StoreError>>),
}

struct InFlight {
    done: tokio::sync::oneshot::Receiver<Result<(), StoreError>>,
    flushed: Flushed,
}

/// Writes and publishes group commits on its own thread, one at a time.
pub struct Committer {
    jobs: Option<SyncSender<Work>>,
    thread: Option<JoinHandle<()>>,
    in_flight: Option<InFlight>,
}

impl Committer {
    /// Starts the writing thread; `durable` is the offset the link reports to the primary.
    pub fn start(
        store: Arc<Store>,
        outputs: CaptureOutputs,
        durable: DurableOffset,
    ) -> std::io::Result<Committer> {
        let (jobs, queue) = sync_channel::<Work>(1);
        let thread = std::thread::Builder::new()
            .name("writebehind-commit".into())
            .spawn(move || {
                crate::buffer::stop_rocksdb_perf_counters();
                write_jobs(queue, &store, &outputs, &durable)
            })?;
        Ok(Committer {
            jobs: Some(jobs),
            thread: Some(thread),
            in_flight: None,
        })
    }

    /// The changed mirror entries of the batch in flight, for the next batch to read.
    pub fn in_flight(&self) -> Option<Arc<Entries>> {
        self.in_flight.as_ref().map(|f| f.flushed.changed())
    }

    /// Hands a batch over (after the previous one is written); when it must be waited for
    /// (`Prepared::wait`), returns once it is written too.
    pub async fn commit(&mut self, prepared: Prepared) -> Result<(), CaptureError> {
        let Prepared {
            batch,
            mut flushed,
            publication,
            wait,
        } = prepared;
        self.wait().await?;
        // Every earlier batch is written: what this one only read is the store's as of now.
        flushed.unchanged_written();
        let (done, written) = tokio::sync::oneshot::channel();
        let job = Job {
            batch,
            publication,
            done,
        };
        if self
            .jobs
            .as_ref()
            .is_none_or(|jobs| jobs.send(Work::Write(job)).is_err())
        {
            return Err(CaptureError::CommitterStopped);
        }
        self.in_flight = Some(InFlight {
            done: written,
            flushed,
        });
        if wait {
            self.wait().await?;
        }
        Ok(())
    }

    /// Waits until the batch in flight, if any, is written (and its entries are in the cache).
    pub async fn wait(&mut self) -> Result<(), CaptureError> {
        let Some(in_flight) = self.in_flight.take() else {
            return Ok(());
        };
        in_flight
            .done
            .await
            .map_err(|_| CaptureError::CommitterStopped)??;
        in_flight.flushed.written();
        Ok(())
    }

    /// Waits until every batch handed over is written, synced and published (quiet ones
    /// included): before anything that reads the buffer directly or restarts the link, whose
    /// durable offset must not move on later for a batch of before.
    pub async fn settle(&mut self) -> Result<(), CaptureError> {
        self.wait().await?;
        let (done, settled) = tokio::sync::oneshot::channel();
        if self
            .jobs
            .as_ref()
            .is_none_or(|jobs| jobs.send(Work::Settle(done)).is_err())
        {
            return Err(CaptureError::CommitterStopped);
        }
        settled
            .await
            .map_err(|_| CaptureError::CommitterStopped)??;
        Ok(())
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        // The thread ends once the queue is closed, after the batch it holds, if any, and a
        // sync of the quiet batches written.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes and publishes the jobs in order (the module doc says how each is synced).
fn write_jobs(
    queue: Receiver<Work>,
    store: &Store,
    outputs: &CaptureOutputs,
    durable: &DurableOffset,
) {
    // The last quiet batch written but not synced yet, and when the first of them was.
    let mut unsynced: Option<(Publication, Instant)> = None;
    // A failed sync of quiet batches, reported to the next job.
    let mut failed: Option<StoreError> = None;
    loop {
        let work = match &unsynced {
            None => queue.recv().ok(),
            Some((_, since)) => {
                match queue.recv_timeout(QUIET_SYNC_DELAY.saturating_sub(since.elapsed())) {
                    Ok(work) => Some(work),
                    Err(RecvTimeoutError::Timeout) => {
                        if let Err(error) = sync_quiet(store, &mut unsynced, outputs, durable) {
                            tracing::error!(%error, "syncing the buffer failed");
                            // Not retried by the clock (that would spin): the next job or
                            // `settle` gets the error, which stops capture; the batch's offset
                            // is never published.
                            unsynced = None;
                            failed = Some(error);
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                }
            }
        };
        let job = match work {
            Some(Work::Write(job)) => job,
            Some(Work::Settle(done)) => {
                let settled = match failed.take() {
                    Some(error) => Err(error),
                    None => sync_quiet(store, &mut unsynced, outputs, durable),
                };
                let _ = done.send(settled);
                continue;
            }
            None => {
                // Stopping: what was written is synced first.
                if let Err(error) = sync_quiet(store, &mut unsynced, outputs, durable) {
                    tracing::error!(%error, "syncing the buffer failed");
                }
                return;
            }
        };
        if let Some(error) = failed.take() {
            let _ = job.done.send(Err(error));
            continue;
        }
        let written = write_job(store, job.batch, &outputs.committed);
        match &written {
            Ok(true) => {
                let since = unsynced
                    .take()
                    .map_or_else(Instant::now, |(_, since)| since);
                unsynced = Some((job.publication, since));
            }
            Ok(false) => {
                // Its sync covered the quiet batches before it, and its offset theirs.
                unsynced = None;
                publish(job.publication, outputs, durable);
            }
            Err(_) => {}
        }
        let _ = job.done.send(written.map(drop));
    }
}

/// Writes one batch; returns whether it is quiet (written, its sync left for later); the
/// publication of a quiet batch holds nothing but its offset. `sinks` is woken between the
/// write and the sync of a batch with changes: they apply them while it syncs, and commit
/// after (`buffer/durability.rs`).
fn write_job(store: &Store, batch: Batch, sinks: &tokio::sync::Notify) -> Result<bool, StoreError> {
    // Its publication then holds nothing but the offset: a batch with changes, acks or ops to
    // complete (whose raw states it puts) is not quiet.
    if batch.is_quiet() {
        store.write(batch, false)?;
        return Ok(true);
    }
    if batch.queues_acks() {
        // Readable only once synced: the write-back task sends what it reads.
        store.write(batch, true)?;
    } else {
        store.write_in_window(batch)?;
        sinks.notify_waiters();
        store.sync_window()?;
    }
    Ok(false)
}

/// Syncs the quiet batches written so far, if any, and publishes the last one.
fn sync_quiet(
    store: &Store,
    unsynced: &mut Option<(Publication, Instant)>,
    outputs: &CaptureOutputs,
    durable: &DurableOffset,
) -> Result<(), StoreError> {
    let Some((publication, since)) = unsynced.take() else {
        return Ok(());
    };
    if let Err(error) = store.sync() {
        // Kept: a later sync may still publish it.
        *unsynced = Some((publication, since));
        return Err(error);
    }
    publish(publication, outputs, durable);
    Ok(())
}

/// Reports a synced batch to the write-back task, the metrics, the sinks and the primary.
fn publish(publication: Publication, outputs: &CaptureOutputs, durable: &DurableOffset) {
    let Publication {
        committed,
        offset,
        counts,
    } = publication;
    counts.report();
    let writeback = &outputs.writeback;
    if !committed.to_complete.is_empty() {
        writeback.keys_touched(committed.to_complete);
    } else if committed.acks_queued {
        writeback.acks_queued();
    }
    outputs.health.buffered(offset, committed.last_seq);
    outputs.committed.notify_waiters();
    durable.advance(offset);
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::buffer::{Change, RowChange};
    use crate::capture::working_set::{MirrorView, WorkingSet};
    use crate::position::ChangeSeq;

    /// A batch ending at `offset`, with one change (not quiet) or none (quiet).
    fn prepared(store: &Arc<Store>, offset: u64, change: Option<u64>) -> Prepared {
        let mut batch = Batch::default();
        let flushed =
            WorkingSet::viewing(store.clone(), MirrorView::default()).flush_into(&mut batch);
        if let Some(seq) = change {
            batch.put_changes(vec![Change {
                seq: ChangeSeq(seq),
                unit: ChangeSeq(seq),
                unit_end: true,
                offset: ReplOffset(offset),
                mapping: "m".into(),
                row_id: Bytes::from_static(b"1"),
                row: RowChange::Delete,
                op: None,
            }]);
        }
        batch.put_clock(ReplOffset(offset), 0, 0);
        Prepared {
            batch,
            flushed,
            publication: Publication {
                committed: Committed {
                    to_complete: Vec::new(),
                    acks_queued: false,
                    last_seq: change.map(ChangeSeq),
                },
                offset: ReplOffset(offset),
                counts: ChangeCounts::default(),
            },
            wait: false,
        }
    }

    /// A quiet batch's offset is reported to the primary only once synced: by the next
    /// batch's sync, by a sync of its own when none follows within `QUIET_SYNC_DELAY`, by
    /// `settle`, and when the committer stops.
    #[tokio::test]
    async fn a_quiet_batch_is_published_once_synced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let outputs = CaptureOutputs {
            health: crate::metrics::Health::new(),
            committed: Arc::new(tokio::sync::Notify::new()),
            writeback: Arc::new(crate::ack::Writeback::default()),
        };
        let durable = DurableOffset::default();
        let mut committer = Committer::start(store.clone(), outputs, durable.clone()).unwrap();

        committer.commit(prepared(&store, 10, None)).await.unwrap();
        committer.wait().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while durable.get() < ReplOffset(10) {
            assert!(
                Instant::now() < deadline,
                "a quiet batch alone is synced in time"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        // Published (after its sync) before the writer reports a batch written.
        committer.commit(prepared(&store, 20, None)).await.unwrap();
        committer
            .commit(prepared(&store, 30, Some(1)))
            .await
            .unwrap();
        committer.wait().await.unwrap();
        assert_eq!(durable.get(), ReplOffset(30));

        committer.commit(prepared(&store, 40, None)).await.unwrap();
        committer.settle().await.unwrap();
        assert_eq!(durable.get(), ReplOffset(40), "settled");

        committer.commit(prepared(&store, 50, None)).await.unwrap();
        drop(committer);
        assert_eq!(durable.get(), ReplOffset(50), "synced when stopping");
    }
}
