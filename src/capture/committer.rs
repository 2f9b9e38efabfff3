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

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

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

struct Job {
    batch: Batch,
    publication: Publication,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

struct InFlight {
    done: tokio::sync::oneshot::Receiver<Result<(), StoreError>>,
    flushed: Flushed,
}

/// Writes and publishes group commits on its own thread, one at a time.
pub struct Committer {
    jobs: Option<SyncSender<Job>>,
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
        let (jobs, queue) = sync_channel::<Job>(1);
        let thread = std::thread::Builder::new()
            .name("writebehind-commit".into())
            .spawn(move || write_jobs(queue, &store, &outputs, &durable))?;
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
            flushed,
            publication,
            wait,
        } = prepared;
        self.wait().await?;
        let (done, written) = tokio::sync::oneshot::channel();
        let job = Job {
            batch,
            publication,
            done,
        };
        if self
            .jobs
            .as_ref()
            .is_none_or(|jobs| jobs.send(job).is_err())
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
}

impl Drop for Committer {
    fn drop(&mut self) {
        // The thread ends once the queue is closed, after the batch it holds, if any.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_jobs(
    queue: Receiver<Job>,
    store: &Store,
    outputs: &CaptureOutputs,
    durable: &DurableOffset,
) {
    for job in queue {
        let written = store.write(job.batch, true);
        if written.is_ok() {
            publish(job.publication, outputs, durable);
        }
        let _ = job.done.send(written);
    }
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
