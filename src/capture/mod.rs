//! Capture: turns the replication stream into durable, ordered row changes in the buffer
//! (docs/design.md sections 3 to 5).
//!
//! [`Capture`] takes the events of the replication link in order and hands each to the part
//! that owns it:
//! - a **full sync** (`full_sync.rs`) writes the snapshot into the mirror under a new generation
//!   and sweeps what it did not contain;
//! - the **command stream** (`stream.rs`) is applied in batches of everything that arrived
//!   together, one synced write each (group commit); every command is parsed once into a typed
//!   write ([`command`]) that the mirror ([`apply`]) and the raw states of `#` ops (`ops.rs`)
//!   both consume; keys it cannot derive are read from the primary (`primary.rs`);
//! - **restart**: `PSYNC` from the checkpoint; a full sync that was interrupted starts over.
//!
//! After each commit it reports through [`CaptureOutputs`]: the buffered position (for the
//! metrics and `/ready`), a wake-up for the sink runners, and the keys and acknowledgements for
//! the write-back task. The offset it reports to the primary (`REPLCONF ACK`) is only ever one
//! that is synced.

pub mod apply;
pub mod clock;
pub mod command;
pub mod command_table;
mod committer;
mod full_sync;
mod handoff;
mod long_unit;
pub mod mapping;
pub mod mirror_cache;
mod ops;
mod primary;
mod progress;
pub mod requeue;
pub mod rows;
mod snapshot_writer;
mod state;
mod stream;
pub mod working_set;

use std::collections::VecDeque;
use std::sync::Arc;

use crate::ack::Writeback;
use crate::buffer::{Batch, Checkpoint, MirrorCursor, Store, StoreError};
use crate::config::RedisEndpoint;
use crate::metrics::Health;
use crate::position::{ChangeSeq, DurableOffset, ReplOffset, StreamPosition};
use crate::replication::stream::StreamEvent;
use crate::replication::{LinkError, ReplicationEvent, Replicator};
use clock::{ClockSample, PrimaryClock};
use command::Write;
use committer::Committer;
use full_sync::FullSync;
use long_unit::LongUnit;
use mapping::Mappings;
use mirror_cache::MirrorCache;
use ops::OpState;
use primary::Primary;
use requeue::{next_request, RequeueRequest};
use state::CaptureState;
use stream::StreamBatch;
use working_set::MirrorView;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("capture's commit thread stopped unexpectedly (see the log above); restart the service: nothing it did not finish was acknowledged")]
    CommitterStopped,
    #[error("cannot start capture's commit thread: {0}; check the process limits and restart")]
    CommitterStart(std::io::Error),
}

/// Counters, for logs and metrics.
#[derive(Debug, Default, Clone)]
pub struct CaptureStats {
    pub units: u64,
    pub changes: u64,
    pub commits: u64,
    pub refreshed_keys: u64,
    pub unknown_commands: u64,
    pub full_syncs: u64,
    pub partial_syncs: u64,
    /// Parts of long transactions written ahead of their end (`long_unit.rs`).
    pub unit_parts_written: u64,
    /// Transactions written in parts that were rolled back (their end never came on the link,
    /// or the process stopped first).
    pub units_rolled_back: u64,
}

impl CaptureStats {
    /// Adds `other`'s counts to these (a cluster's shards, summed).
    pub fn absorb(&mut self, other: &CaptureStats) {
        self.units += other.units;
        self.changes += other.changes;
        self.commits += other.commits;
        self.refreshed_keys += other.refreshed_keys;
        self.unknown_commands += other.unknown_commands;
        self.full_syncs += other.full_syncs;
        self.partial_syncs += other.partial_syncs;
        self.unit_parts_written += other.unit_parts_written;
        self.units_rolled_back += other.units_rolled_back;
    }
}

/// Where capture reports what it made durable.
#[derive(Debug, Clone, Default)]
pub struct CaptureOutputs {
    /// Positions and link state, for the metrics and the admin endpoints.
    pub health: Arc<Health>,
    /// Woken after every commit, for the sink runners.
    pub committed: Arc<tokio::sync::Notify>,
    /// Keys whose `#` op is to be completed and newly queued acknowledgements, for the
    /// write-back task.
    pub writeback: Arc<Writeback>,
}

/// How capture is set up (from the configuration).
#[derive(Debug, Clone, Copy)]
pub struct CaptureSettings {
    /// Whether `#` is the op field (`[acks] enabled`).
    pub ops: bool,
    /// The size of the in-memory mirror cache (`[buffer] mirror_cache_mb`; 0: none).
    pub mirror_cache_bytes: u64,
}

/// The capture pipeline.
pub struct Capture {
    state: CaptureState,
    full_sync: Option<FullSync>,
    primary: Primary,
    outputs: CaptureOutputs,
    /// Writes the group commits (started with the link: it reports the durable offset).
    committer: Option<Committer>,
    /// When the primary's clock was last sampled.
    last_sample: Option<std::time::Instant>,
    /// Dead letters to requeue, from the admin listener (`requeue.rs`).
    requests: Option<tokio::sync::mpsc::Receiver<RequeueRequest>>,
    /// In a cluster: other shards' questions about keys that moved here (`handoff.rs`).
    holds: Option<handoff::Holds>,
    /// The transaction being applied in parts, if its `EXEC` has not arrived (`long_unit.rs`).
    long: Option<LongUnit>,
    /// The batch holding its latest part, kept between reads of the stream.
    open_batch: Option<StreamBatch>,
    /// Whether parts of a long unit are written and the batch ending it is not handed over
    /// yet: until then a unit dropped for a resync must be rolled back, even once its `EXEC`
    /// was applied to a batch.
    unit_on_disk: bool,
}

/// Mirror keys deleted per commit ahead of a flush.
const FLUSH_PAGE_KEYS: usize = 1024;

/// Events read ahead of the one being applied, whose cached mirror entries are taken together.
const READ_AHEAD: usize = 32;

/// How often the primary's clock is sampled while the stream flows.
const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Capture {
    /// Capture into `store`.
    pub fn new(
        store: Arc<Store>,
        mappings: Mappings,
        endpoint: RedisEndpoint,
        settings: CaptureSettings,
        outputs: CaptureOutputs,
    ) -> Result<Capture, StoreError> {
        // A transaction written in parts whose end was not: the primary sends it again.
        let rolled_back = store.roll_back_open_unit()?;
        if let Some(open) = rolled_back {
            tracing::warn!(first_seq = %open.first_seq, start = %open.start, "rolled back a transaction written in parts before the last stop; the primary sends it again");
            metrics::counter!("writebehind_transactions_rolled_back_total").increment(1);
        }
        let mut checkpoint = store.checkpoint()?;
        // Seqs start at 1: a sink whose checkpoint says 0 has applied nothing.
        checkpoint.next_seq = checkpoint.next_seq.max(ChangeSeq::FIRST);
        let watched = mappings.watched_keys();
        if checkpoint.position.is_some()
            && !checkpoint.full_sync_in_progress
            && store.watched()?.as_deref() != Some(watched.as_str())
        {
            // The mirror follows other keys than the configuration watches: what the new
            // mappings watch is not in it. A full sync rebuilds it (and the sinks reconcile).
            tracing::warn!(
                "the configuration watches other keys than the buffer was built for; starting with a full synchronisation"
            );
            metrics::counter!("writebehind_reconciliations_total", "reason" => "watched_keys")
                .increment(1);
            checkpoint.full_sync_in_progress = true;
            let mut batch = Batch::default();
            batch.put_checkpoint(&checkpoint);
            store.write(batch, true)?;
        }
        let ops = OpState::new(settings.ops, store.raw_keys()?, outputs.writeback.clone());
        // What the buffer already holds is buffered, whatever this run receives.
        if let Some(position) = &checkpoint.position {
            outputs.health.buffered(position.offset, None);
        }
        // The last sample of the primary's clock from before a restart: the commands replayed
        // from the backlog ran after it.
        let mut clock = PrimaryClock::default();
        if let Some((offset, time_ms, expired_keys)) = store.clock()? {
            let sample = ClockSample {
                offset,
                time_ms,
                expired_keys,
            };
            clock.record(sample, None);
        }
        Ok(Capture {
            state: CaptureState {
                store,
                mappings,
                commands: Default::default(),
                checkpoint,
                ops,
                stats: CaptureStats {
                    units_rolled_back: u64::from(rolled_back.is_some()),
                    ..CaptureStats::default()
                },
                clock,
                cache: MirrorCache::new(settings.mirror_cache_bytes),
                last_batch_rows: 0,
                last_batch_keys: 0,
            },
            full_sync: None,
            primary: Primary::new(endpoint, outputs.health.clone()),
            outputs,
            committer: None,
            last_sample: None,
            requests: None,
            holds: None,
            long: None,
            open_batch: None,
            unit_on_disk: false,
        })
    }

    /// Serves requests to requeue dead letters from `requests` (see `requeue.rs`).
    pub fn serve_requeues(&mut self, requests: tokio::sync::mpsc::Receiver<RequeueRequest>) {
        self.requests = Some(requests);
    }

    pub fn stats(&self) -> &CaptureStats {
        &self.state.stats
    }

    /// Where the next `PSYNC` continues from (`None`: a full sync).
    pub fn resume_position(&self) -> Option<StreamPosition> {
        if self.state.checkpoint.full_sync_in_progress {
            None
        } else {
            self.state.checkpoint.position.clone()
        }
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.state.checkpoint
    }

    /// Runs until `stop` resolves (then commits and returns) or a fatal error.
    pub async fn run(
        &mut self,
        replicator: &mut Replicator,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), CaptureError> {
        tokio::pin!(stop);
        replicator.resume_from(self.resume_position());
        let durable = replicator.durable_offset();
        loop {
            // Requests are served while the link waits for its next event (that future is
            // kept, not cancelled, so nothing it has read is lost: see requeue.rs), and after
            // each event, so that a stream that never pauses does not starve them. In that
            // order: a stop first, the stream before a request.
            let event = {
                let next = replicator.next();
                tokio::pin!(next);
                loop {
                    tokio::select! {
                        biased;
                        _ = &mut stop => return self.written().await,
                        event = &mut next => break event?,
                        // Not inside a long unit: a requeued change would fall inside it.
                        Some(request) = next_request(&mut self.requests), if self.long.is_none() => {
                            self.requeue(&durable, request).await?;
                        }
                        check = handoff::Holds::next(&mut self.holds) => {
                            self.hold_check(&durable, check).await?;
                        }
                    }
                }
            };
            self.handle(replicator, event).await?;
            self.answer_holds(&durable).await?;
            if let Some(request) = self
                .requests
                .as_mut()
                .filter(|_| self.long.is_none())
                .and_then(|r| r.try_recv().ok())
            {
                self.requeue(&durable, request).await?;
            }
        }
    }

    /// The committer, started on first use.
    fn committer(&mut self, durable: &DurableOffset) -> Result<&mut Committer, CaptureError> {
        let committer = match self.committer.take() {
            Some(committer) => committer,
            None => Committer::start(
                self.state.store.clone(),
                self.outputs.clone(),
                durable.clone(),
            )
            .map_err(CaptureError::CommitterStart)?,
        };
        Ok(self.committer.insert(committer))
    }

    /// Waits until every batch handed to the committer is written, synced and published.
    async fn written(&mut self) -> Result<(), CaptureError> {
        match self.committer.as_mut() {
            Some(committer) => committer.settle().await,
            None => Ok(()),
        }
    }

    /// Handles one event (and, for the command stream, everything already buffered after it).
    pub async fn handle(
        &mut self,
        replicator: &mut Replicator,
        event: ReplicationEvent,
    ) -> Result<(), CaptureError> {
        if !matches!(event, ReplicationEvent::Stream(_)) {
            // Everything but the stream reads or writes the buffer directly; a transaction
            // cut off by it never ends on this link.
            self.written().await?;
            self.abandon_long_unit().await?;
        }
        // After a failover the primary is another server: ordinary commands go there too.
        if let Some(primary) = replicator.primary() {
            self.primary.follow(primary);
        }
        match event {
            ReplicationEvent::FullSyncStarted { replid, offset, .. } => {
                tracing::info!(%replid, %offset, "full sync started");
                self.load_command_table().await;
                let total = self.primary.key_count().await;
                // An earlier sync's writes end before this one records its generation: its
                // writing thread would otherwise write an older checkpoint after the new one.
                self.full_sync = None;
                self.full_sync = Some(FullSync::begin(&mut self.state, total, offset)?);
            }
            ReplicationEvent::Snapshot(event) => {
                // With every event already buffered after it.
                let mut next = Some(event);
                while let Some(event) = next {
                    if let Some(sync) = self.full_sync.as_mut() {
                        sync.on_event(&mut self.state, event)?;
                    }
                    next = replicator.try_next_snapshot();
                }
            }
            ReplicationEvent::FullSyncCompleted {
                position,
                rdb_bytes,
            } => {
                self.finish_full_sync(position.clone())?;
                // A new history: samples of the old one do not compare with its offsets.
                self.state.clock.forget();
                self.sample_clock().await;
                replicator.report_durable(position.offset);
                self.link_up(&position);
                tracing::info!(%position, rdb_bytes, "full sync completed");
            }
            ReplicationEvent::Continued {
                position,
                previous_replid,
            } => {
                self.state.stats.partial_syncs += 1;
                metrics::counter!("writebehind_partial_syncs_total").increment(1);
                self.link_up(&position);
                self.load_command_table().await;
                // Taken before the backlog is replayed: every replayed command ran before it.
                self.sample_clock().await;
                if let Some(previous) = previous_replid {
                    tracing::info!(%previous, new = %position.replid, "the primary's replication ID changed; continuing");
                    let checkpoint = &mut self.state.checkpoint;
                    let mut batch = Batch::default();
                    batch.add_replid(checkpoint.next_seq, &position.replid, position.offset);
                    checkpoint.position = Some(position.clone());
                    batch.put_checkpoint(checkpoint);
                    self.state.store.write(batch, true)?;
                }
                tracing::info!(%position, "partial resync accepted");
            }
            ReplicationEvent::Stream(first) => self.stream(replicator, first).await?,
            ReplicationEvent::Disconnected { error, retry_in } => {
                tracing::warn!(%error, ?retry_in, "replication link lost");
                metrics::counter!("writebehind_link_errors_total", "kind" => error.kind())
                    .increment(1);
                self.outputs.health.set_link(false, None, None);
                self.full_sync = None;
                replicator.resume_from(self.resume_position());
            }
        }
        Ok(())
    }

    fn link_up(&self, position: &StreamPosition) {
        self.outputs.health.set_link(
            true,
            Some(self.primary.endpoint().clone()),
            Some(position.replid.to_string()),
        );
    }

    /// Samples the primary's clock (see `clock.rs`); a failure only leaves decisions to the
    /// samples already held.
    async fn sample_clock(&mut self) {
        self.last_sample = Some(std::time::Instant::now());
        match self.primary.sample_clock().await {
            Ok((sample, skew)) => {
                self.state.clock.record(sample, Some(skew));
                // Kept for the next start: the commands it replays ran after this sample.
                let mut batch = Batch::default();
                batch.put_clock(sample.offset, sample.time_ms, sample.expired_keys);
                if let Err(error) = self.state.store.write(batch, false) {
                    tracing::warn!(%error, "cannot store the sample of the primary's clock");
                }
            }
            Err(error) => tracing::debug!(%error, "cannot sample the primary's clock"),
        }
    }

    async fn load_command_table(&mut self) {
        if let Some(table) = self.primary.command_table().await {
            self.state.commands = table;
        }
    }

    fn finish_full_sync(&mut self, position: StreamPosition) -> Result<(), StoreError> {
        let Some(sync) = self.full_sync.take() else {
            return Ok(());
        };
        let generation = self.state.checkpoint.generation;
        let summary = sync.finish(&mut self.state, position)?;
        let checkpoint = &self.state.checkpoint;
        self.outputs.health.stream_restarted(self.state.offset());
        self.outputs
            .health
            .buffered(self.state.offset(), checkpoint.next_seq.previous());
        self.outputs.committed.notify_waiters();
        // Ops found in the snapshot, and acks it queued.
        let writeback = &self.outputs.writeback;
        writeback.keys_touched(self.state.ops.pending_keys().cloned());
        writeback.acks_queued();
        tracing::info!(
            keys = summary.keys,
            keys_per_second = summary.keys_per_second,
            swept = summary.swept,
            generation,
            "snapshot captured"
        );
        Ok(())
    }

    /// Applies `first` and every stream event already buffered after it, then hands them to
    /// the committer (which publishes them once synced).
    async fn stream(
        &mut self,
        replicator: &mut Replicator,
        first: StreamEvent,
    ) -> Result<(), CaptureError> {
        let durable = replicator.durable_offset();
        let mut batch = match self.open_batch.take() {
            Some(batch) => batch,
            None => self.new_batch(&durable)?,
        };
        // Events read ahead of the one applied, applied in order (`read_ahead`).
        let mut ahead = VecDeque::from([first]);
        // Reported once per read of the stream, not per event (a gauge update per command was
        // 2.5% of capture's thread).
        let mut received = ReplOffset::default();
        while let Some(event) = ahead.pop_front() {
            received = event.end();
            if let Some(db) = self.flush_of(&event) {
                self.outputs.health.received(received);
                if !batch.is_empty() {
                    self.hand_over(&durable, batch).await?;
                }
                self.flush_ahead(&durable, db, event.end()).await?;
                batch = self.new_batch(&durable)?;
            }
            let long = self.long.is_some() || matches!(event, StreamEvent::TransactionPart { .. });
            if long {
                // One read of the stream can last a whole long transaction (it reads on while
                // bytes are there): reported per part (1,024 commands) meanwhile.
                self.outputs.health.received(received);
            }
            let resync = match long {
                true => self.apply_long(&durable, &mut batch, event).await?,
                false => {
                    batch
                        .apply(&mut self.state, &mut self.primary, &event)
                        .await?
                }
            };
            if let Some(reason) = resync {
                self.outputs.health.received(received);
                // Nothing of this batch is kept: a unit may be half applied to the working
                // set. The full sync compares the snapshot with the mirror as of the last
                // commit, so every change since then is found again.
                tracing::warn!(%reason, "starting a full resynchronisation");
                drop(batch);
                self.written().await?;
                self.abandon_long_unit().await?;
                self.state.checkpoint = self.state.store.checkpoint()?;
                replicator.resume_from(None);
                replicator.disconnect();
                return Ok(());
            }
            if ahead.is_empty() && !batch.is_full() {
                self.read_ahead(replicator, &mut batch, &mut ahead);
            }
        }
        self.outputs.health.received(received);
        if self.long.is_some() {
            // The unit goes on in the next read of the stream.
            self.open_batch = Some(batch);
        } else {
            self.hand_over(&durable, batch).await?;
        }
        // After the hand-over: the round trip overlaps the batch's write and sync instead of
        // delaying them (and the acknowledgements they carry).
        if self
            .last_sample
            .is_none_or(|at| at.elapsed() >= SAMPLE_EVERY)
        {
            self.sample_clock().await;
        }
        Ok(())
    }

    /// Reads into `ahead` up to [`READ_AHEAD`] events already buffered (stopping after the
    /// first that is not a single command), and has the batch look up what the plain hash
    /// writes among them touch in the mirror cache in one go (`StreamBatch::preload`): looked
    /// up one command at a time, a key's cache misses were most of capture's time (docs/benchmarks.md,
    /// session 23). What is read ahead is applied even when the batch fills meanwhile: a
    /// batch passes its size by fewer than [`READ_AHEAD`] commands and one transaction. Inside
    /// a long unit, one event at a time, as before.
    fn read_ahead(
        &self,
        replicator: &mut Replicator,
        batch: &mut StreamBatch,
        ahead: &mut VecDeque<StreamEvent>,
    ) {
        let limit = if self.long.is_some() { 1 } else { READ_AHEAD };
        while ahead.len() < limit {
            let Some(event) = replicator.try_next_buffered() else {
                break;
            };
            let single = matches!(event, StreamEvent::Command(_));
            ahead.push_back(event);
            if !single {
                break;
            }
        }
        if self.long.is_none() {
            batch.preload(&self.state.mappings, ahead.iter());
        }
    }

    /// An empty batch whose working sets read through the cache and the batch in flight.
    fn new_batch(&mut self, durable: &DurableOffset) -> Result<StreamBatch, CaptureError> {
        let view = MirrorView {
            cache: self.state.cache.clone(),
            in_flight: self.committer(durable)?.in_flight(),
        };
        Ok(StreamBatch::new(self.state.store.clone(), view)
            .with_room_for(self.state.last_batch_rows, self.state.last_batch_keys))
    }

    /// Hands a batch to the committer.
    async fn hand_over(
        &mut self,
        durable: &DurableOffset,
        batch: StreamBatch,
    ) -> Result<(), CaptureError> {
        let closes_unit = batch.closes_unit;
        let prepared = batch.commit(&mut self.state)?;
        self.committer(durable)?.commit(prepared).await?;
        if closes_unit {
            self.unit_on_disk = false;
        }
        Ok(())
    }

    /// The databases a stand-alone `FLUSHALL` (`None`) or `FLUSHDB` empties.
    fn flush_of(&self, event: &StreamEvent) -> Option<Option<u32>> {
        let StreamEvent::Command(command) = event else {
            return None;
        };
        let name = command.args.first()?;
        if !name.eq_ignore_ascii_case(b"flushall") && !name.eq_ignore_ascii_case(b"flushdb") {
            return None;
        }
        match Write::parse(command, self.state.clock.now()) {
            Write::Flush { db } => Some(db),
            _ => None,
        }
    }

    /// Deletes the watched keys a flush ending at `end` empties, a page of the mirror per
    /// commit, before the flush itself is applied: memory stays bounded whatever the keyspace
    /// (docs/design.md, "FLUSHALL and FLUSHDB"). Each page is a unit recorded at the offset
    /// before the flush, so the checkpoint never claims the flush before it is complete; after
    /// a crash the flush is received again and deletes what is left (what was deleted is no
    /// longer in the mirror, so no row is deleted twice).
    async fn flush_ahead(
        &mut self,
        durable: &DurableOffset,
        db: Option<u32>,
        end: ReplOffset,
    ) -> Result<(), CaptureError> {
        self.written().await?;
        let mut cursor = Some(MirrorCursor::default());
        while let Some(from) = cursor.take() {
            let page = self.state.store.mirror_scan(db, &from, FLUSH_PAGE_KEYS)?;
            cursor = page.next;
            let mut batch = self.new_batch(durable)?;
            batch.delete_ahead_of_flush(&mut self.state, page.entries, end)?;
            if !batch.is_empty() {
                self.hand_over(durable, batch).await?;
                // The next page is read from RocksDB.
                self.written().await?;
            }
        }
        Ok(())
    }
}
