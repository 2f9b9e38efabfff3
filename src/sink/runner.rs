//! Moves the change log into one backend: bounded batches of whole units, split by partition
//! (`partition.rs`), coalesced per row, converted by column type, applied with the checkpoint
//! rows, retried forever on transient errors; refused rows go to the dead-letter store; the
//! change log is trimmed behind the slowest backend.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::acks::AckShare;
pub use super::applied::AppliedPositions;
pub use super::coalesce::convert_row;
use super::coalesce::{Coalesced, RefusedRow};
use super::long_unit::Streamed;
use super::partition::{partition_of_change, row_name, FoundRows};
use super::read_ahead::{split_batch, Read, ReadAhead, Share, Shares};
use super::reconcile::{Reconcile, RECONCILE_LETTERS};
use super::retry::{apply_with_retry, new_backoff};
use super::{
    BeforeCommit, CommitGate, Destination, Rejected, RowWrite, SchemaProblem, SinkBatch, SinkError,
    TableSchema,
};
use crate::ack::Writeback;
use crate::backoff::Backoff;
use crate::buffer::{Batch, Change, DeadLetter, ReadLimit, Store, StoreError};
use crate::capture::mapping::fingerprint;
use crate::capture::mapping::Mapping;
use crate::clock::now_ms;
use crate::metrics::Health;
use crate::position::{ChangeSeq, ReplOffset};

/// Most read for one batch (more when one unit is larger): changes taking about 16 MiB once
/// decoded (`ReadLimit`: each counts its encoded size plus 1 KiB, so at most 16,384 changes;
/// about 15,000 of a three-column row; the read ahead holds one more such batch). Bounded by
/// bytes because a change carries its row's mapped values, whatever their size (5,000 changes
/// of 1 MB values were 5 GB). Larger than the 5,000 changes of before because a sink that is
/// behind then coalesces more changes of a row into one write and spreads each transaction's
/// fixed costs further (a batch is what is waiting: a sink that keeps up writes each change as
/// it comes). End to end: 8 MiB gained nothing, 16 MiB 4-8% on a quiet machine and 20-30%
/// while the disk was busy, 32 MiB a little more for 40 MB more at a flush's peak
/// (docs/benchmarks.md, session 21).
pub const BATCH_LIMIT: ReadLimit = ReadLimit {
    changes: 16_384,
    bytes: 16 << 20,
};

/// A batch of this many changes or more has the next one read while it is written
/// (`read_ahead.rs`); a smaller one means the sink keeps up (at 1,000 acknowledged writes a
/// second, reading ahead after every batch of one change added 0.2-0.3 ms to the ack's p50).
const READ_AHEAD_FROM: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a runner shares with the rest of the service.
pub struct RunnerLinks {
    /// The buffer: the change log it reads, the dead letters and acknowledgements it writes.
    pub store: Arc<Store>,
    /// Woken after every capture commit.
    pub committed: Arc<Notify>,
    /// Every backend's applied seq, to trim the change log behind the slowest.
    pub positions: Arc<AppliedPositions>,
    pub health: Arc<Health>,
    /// Woken when acknowledgements are queued.
    pub writeback: Arc<Writeback>,
    /// In a cluster: this shard's id and every shard (a reconciliation deletes a row only when
    /// no shard holds its key; a delete of a key that moved is a hand-over: `handoff.rs`).
    pub peers: Option<(String, Arc<crate::cluster::peers::Peers>)>,
}

/// One partition's share of a batch.
struct PartWork {
    partition: usize,
    /// How many changes its share holds.
    count: usize,
    /// Its changes that carry a `#` op (`Share::with_ops`).
    with_ops: Vec<Change>,
    batch: SinkBatch,
    before_commit: BeforeCommit,
    /// Why each row refused before the database was refused (for the acks).
    refused_rows: HashMap<(String, Bytes), String>,
}

/// Moves the change log into one backend (see the module doc).
pub struct SinkRunner<D: Destination> {
    pub(super) name: String,
    /// One connection per configured partition (`partition.rs`).
    pub(super) sinks: Vec<D>,
    pub(super) backoffs: Vec<Backoff>,
    pub(super) mappings: Vec<Mapping>,
    pub(super) schemas: Vec<TableSchema>,
    pub(super) store: Arc<Store>,
    pub(super) notify: Arc<Notify>,
    pub(super) positions: Arc<AppliedPositions>,
    /// The partition count of the checkpoint rows in the database: the configured one, or the
    /// one found at start until the rows found agree and the layout is switched.
    pub(super) layout: u32,
    /// The applied seq of each partition of `layout`.
    pub(super) applied: Vec<ChangeSeq>,
    /// The stream offset of the last change applied (recorded with a layout switch).
    pub(super) applied_offset: ReplOffset,
    /// The checkpoint rows of this backend that exist in the database.
    pub(super) existing_rows: BTreeSet<String>,
    pub(super) health: Arc<Health>,
    pub(super) writeback: Arc<Writeback>,
    /// In a cluster: this shard's id and every shard.
    pub(super) peers: Option<(String, Arc<crate::cluster::peers::Peers>)>,
    /// The fingerprint of `mappings`, recorded with every checkpoint.
    pub(super) mappings_id: String,
    /// Why the tables must be reconciled before anything else (found at start).
    pub(super) reconcile: Option<Reconcile>,
    /// The next dead-letter id of a reconciliation.
    pub(super) reconcile_letters: u64,
    /// The first seq of a long unit that is to be written whole, not in parts
    /// (`long_unit.rs`: the database refused a row of it).
    pub(super) whole_unit: Option<ChangeSeq>,
    /// The next batch, prepared while the database writes the current one.
    pub(super) read_ahead: Option<ReadAhead>,
    /// Most read for one batch: [`BATCH_LIMIT`] (less in tests).
    pub(super) batch_limit: ReadLimit,
}

impl<D: Destination> SinkRunner<D> {
    /// Checks (or creates) the sink's tables and reads its checkpoint rows; `sinks` holds one
    /// connection per partition (at least one). Problems are returned one per line.
    pub async fn start(
        name: &str,
        mut sinks: Vec<D>,
        mappings: Vec<Mapping>,
        links: RunnerLinks,
    ) -> Result<SinkRunner<D>, Vec<SchemaProblem>> {
        let Some(first) = sinks.first_mut() else {
            return Err(vec![SinkError::fatal(format!(
                "backend `{name}`: no connection"
            ))
            .into()]);
        };
        let schemas = first.prepare(&mappings).await?;
        let found = first.checkpoints().await.map_err(|e| vec![e.into()])?;
        let found = FoundRows::new(name, found);
        let mappings_id = fingerprint(&mappings);
        let store_problem =
            |e: StoreError| vec![SinkError::fatal(e.to_string()).caused_by(e).into()];
        let reconcile =
            Reconcile::needed(&found, name, &links.store, &mappings_id).map_err(store_problem)?;
        let configured = sinks.len() as u32;
        // The rows' own layout when there is one (also to reconcile in: the acknowledgement
        // markers are kept per row), switched to the configured one once settled.
        let layout = match found.layouts(name).as_slice() {
            [count] => *count,
            _ => configured,
        };
        // Until the tables are reconciled, nothing of this buffer counts as applied here.
        let applied = match reconcile {
            None => found.applied(name, layout),
            Some(_) => vec![ChangeSeq::NONE; layout as usize],
        };
        let reconcile_letters = links
            .store
            .dead_letters()
            .map_err(store_problem)?
            .iter()
            .map(|l| l.seq.0 + 1)
            .filter(|seq| *seq > RECONCILE_LETTERS)
            .max()
            .unwrap_or(RECONCILE_LETTERS);
        links.health.backend(name, true, None);
        let backoffs = sinks.iter().map(|_| new_backoff()).collect();
        Ok(SinkRunner {
            name: name.to_string(),
            sinks,
            backoffs,
            mappings,
            schemas,
            store: links.store,
            notify: links.committed,
            positions: links.positions,
            layout,
            applied,
            applied_offset: ReplOffset(0),
            existing_rows: found.rows.keys().cloned().collect(),
            health: links.health,
            writeback: links.writeback,
            peers: links.peers,
            mappings_id,
            reconcile,
            reconcile_letters,
            whole_unit: None,
            read_ahead: None,
            batch_limit: BATCH_LIMIT,
        })
    }

    /// The seq every partition has applied.
    pub(super) fn lowest_applied(&self) -> ChangeSeq {
        self.applied.iter().copied().min().unwrap_or_default()
    }

    /// The partition of `change` in the layout.
    pub(super) fn partition(&self, change: &Change) -> usize {
        partition_of_change(change, &self.mappings, &self.schemas, self.layout)
    }

    /// The checkpoint row (and acknowledgement marker) of partition `index` of the layout.
    pub(super) fn row(&self, index: usize) -> String {
        row_name(&self.name, index, self.layout)
    }

    /// Applies changes until `stop` resolves.
    pub async fn run(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), RunnerError> {
        tokio::pin!(stop);
        if let Some(reason) = self.reconcile.take() {
            if !self.reconcile(&reason, &mut stop).await? {
                return Ok(());
            }
        }
        self.catch_up_acks()?;
        self.switch_layout_when_settled().await?;
        self.report()?;
        let notify = self.notify.clone();
        loop {
            // Registered before reading, so a commit in between is not missed.
            let notified = notify.notified();
            let applied_any = self.step().await?;
            let stopping = if !applied_any {
                tokio::select! {
                    _ = notified => false,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => false,
                    _ = &mut stop => true,
                }
            } else {
                futures_ready(&mut stop).await
            };
            if stopping {
                // Graceful stop: write what capture has already committed, then return.
                while self.step().await? {}
                return Ok(());
            }
        }
    }

    /// Applies one batch if there is one; returns whether it did.
    pub async fn step(&mut self) -> Result<bool, RunnerError> {
        let from = self.lowest_applied().next();
        let prepared = match self.read_ahead.take() {
            Some(ahead) => ahead.take_for(from, self.layout, &self.applied).await,
            None => None,
        };
        let shares = match prepared {
            Some(shares) => shares,
            None => match self.read_batch(from).await? {
                Read::Batch(shares) => shares,
                Read::Done { applied } => return Ok(applied),
            },
        };
        let Shares {
            last_seq,
            offset,
            mut shares,
        } = shares;
        if let Some(hand_off) = self.hand_off() {
            if !hand_off.run(from, last_seq, &mut shares).await {
                return Ok(false);
            }
        }
        let replid = self.replid()?;
        let mut work = Vec::with_capacity(shares.len());
        for Share {
            partition,
            count,
            with_ops,
            coalesced: Coalesced { writes, refused },
        } in shares
        {
            let refused_rows = refused
                .iter()
                .map(|r| ((r.mapping.clone(), r.row_id.clone()), r.reason.clone()))
                .collect();
            // Conversion refusals are stored before the batch commits: nothing is lost if we
            // crash.
            self.dead_letter(refused)?;
            let batch = SinkBatch {
                writes,
                last_seq,
                replid: replid.clone(),
                offset,
                buffer_id: self.store.identity().to_string(),
                mappings_id: self.mappings_id.clone(),
                checkpoint_rows: vec![self.row(partition)],
                retire_rows: Vec::new(),
                commit_gate: CommitGate::after_sync(&self.store, last_seq),
            };
            let before_commit = self.dead_letters_before_commit(&batch);
            work.push(PartWork {
                partition,
                count,
                with_ops,
                batch,
                before_commit,
                refused_rows,
            });
        }
        let started = std::time::Instant::now();
        // While the database writes this batch, the next one is prepared on a thread of its
        // own (`read_ahead.rs`), when the sink is behind (a small batch: it keeps up, and the
        // next batch is not there yet).
        let changes: usize = work.iter().map(|part| part.count).sum();
        if changes >= READ_AHEAD_FROM {
            self.read_ahead = Some(ReadAhead::start(
                &self.store,
                (&self.mappings, &self.schemas),
                (self.layout, self.applied.len()),
                last_seq,
                self.batch_limit,
            ));
        }
        let results = self.apply_parts(&work).await;
        let mut failure = None;
        let mut rows = 0;
        let mut acks = Vec::new();
        for (part, result) in work.into_iter().zip(results) {
            let rejected = match result {
                Some(Ok(rejected)) => rejected,
                Some(Err(e)) => {
                    failure.get_or_insert(e);
                    continue;
                }
                None => continue,
            };
            rows += part.batch.writes.len();
            acks.push(self.finish_part(part, rejected));
        }
        self.queue_shares(acks)?;
        self.report()?;
        if let Some(failure) = failure {
            return Err(failure.into());
        }
        let backend = self.name.clone();
        metrics::counter!("writebehind_sink_batches_total", "backend" => backend.clone())
            .increment(1);
        metrics::histogram!("writebehind_sink_batch_rows", "backend" => backend.clone())
            .record(rows as f64);
        metrics::histogram!("writebehind_sink_commit_seconds", "backend" => backend)
            .record(started.elapsed().as_secs_f64());
        self.health.backend(&self.name, true, None);
        self.health.applied(&self.name, last_seq, offset);
        self.applied_offset = offset;
        self.switch_layout_when_settled().await?;
        Ok(true)
    }

    /// A partition's transaction committed: its acks are queued and its row moves on.
    /// Records a committed share; returns its acks and marker, for [`Self::queue_shares`].
    fn finish_part(&mut self, part: PartWork, rejected: Vec<Rejected>) -> AckShare {
        let PartWork {
            partition,
            with_ops,
            batch,
            mut refused_rows,
            ..
        } = part;
        for r in &rejected {
            if let Some(write) = batch.writes.iter().find(|w| w.seq == r.seq) {
                refused_rows.insert(
                    (self.mapping_name(write), write.row_id.clone()),
                    r.reason.clone(),
                );
            }
        }
        let refused = |c: &Change| {
            refused_rows
                .get(&(c.mapping.to_string(), c.row_id.clone()))
                .cloned()
        };
        let row = self.row(partition);
        let acks = self.acks_of(&with_ops, refused);
        self.applied[partition] = batch.last_seq;
        self.existing_rows.insert(row.clone());
        (row, batch.last_seq, acks)
    }

    /// Applies every partition's share at once, each connection taking the shares of its
    /// partitions in turn (one each, unless the layout found differs from the configured one).
    /// `None` for a share not attempted because an earlier one on its connection failed.
    async fn apply_parts(
        &mut self,
        work: &[PartWork],
    ) -> Vec<Option<Result<Vec<Rejected>, SinkError>>> {
        let connections = self.sinks.len().max(1);
        let (name, health, schemas) = (&self.name, &self.health, &self.schemas);
        let store = &self.store;
        let runs = self
            .sinks
            .iter_mut()
            .zip(self.backoffs.iter_mut())
            .enumerate()
            .map(|(connection, (sink, backoff))| async move {
                let mut results = Vec::new();
                for (index, part) in work.iter().enumerate() {
                    if part.partition % connections != connection {
                        continue;
                    }
                    let result = apply_with_retry(
                        sink,
                        backoff,
                        (name, health, store),
                        schemas,
                        &part.batch,
                        &part.before_commit,
                    )
                    .await;
                    let failed = result.is_err();
                    results.push((index, result));
                    if failed {
                        break;
                    }
                }
                results
            });
        let mut results: Vec<Option<Result<Vec<Rejected>, SinkError>>> =
            work.iter().map(|_| None).collect();
        for (index, result) in futures_util::future::join_all(runs)
            .await
            .into_iter()
            .flatten()
        {
            results[index] = Some(result);
        }
        results
    }

    /// Once the rows of a layout other than the configured one agree (all at one seq `S`), the
    /// configured layout's rows are written at `S` and the others deleted, in one transaction
    /// (the acknowledgement markers of the new rows are set to `S` first). See `partition.rs`.
    async fn switch_layout_when_settled(&mut self) -> Result<(), RunnerError> {
        let configured = self.sinks.len() as u32;
        let settled = self.lowest_applied();
        if self.layout == configured || self.applied.iter().any(|seq| *seq != settled) {
            return Ok(());
        }
        let rows: Vec<String> = (0..configured as usize)
            .map(|index| row_name(&self.name, index, configured))
            .collect();
        let mut markers = Batch::default();
        for row in &rows {
            markers.put_acks_enqueued(row, settled);
        }
        self.store.write(markers, true)?;
        let batch = SinkBatch {
            // No rows, only the checkpoint rows of the new layout: nothing to wait for.
            commit_gate: Default::default(),
            writes: Vec::new(),
            last_seq: settled,
            replid: self.replid()?,
            offset: self.applied_offset,
            buffer_id: self.store.identity().to_string(),
            mappings_id: self.mappings_id.clone(),
            retire_rows: self
                .existing_rows
                .iter()
                .filter(|row| !rows.contains(row))
                .cloned()
                .collect(),
            checkpoint_rows: rows,
        };
        self.apply_on_first(&batch).await?;
        tracing::info!(backend = %self.name, from = self.layout, to = configured, at = %settled, "partition layout changed");
        self.layout = configured;
        self.applied = vec![settled; configured as usize];
        self.existing_rows = batch.checkpoint_rows.iter().cloned().collect();
        Ok(())
    }

    pub(super) fn mapping_name(&self, write: &RowWrite) -> String {
        self.mappings
            .get(write.table)
            .map(|m| m.name.to_string())
            .unwrap_or_default()
    }

    /// Rows the database refuses are dead-lettered inside the commit, before the batch counts
    /// as applied: a crash cannot lose them.
    pub(super) fn dead_letters_before_commit(&self, batch: &SinkBatch) -> BeforeCommit {
        let index: HashMap<ChangeSeq, (String, Bytes)> = batch
            .writes
            .iter()
            .map(|w| (w.seq, (self.mapping_name(w), w.row_id.clone())))
            .collect();
        let (store, backend) = (self.store.clone(), self.name.clone());
        Arc::new(move |rejected: &[Rejected]| {
            let mut letters = Batch::default();
            for r in rejected {
                let (mapping, row_id) = index.get(&r.seq).cloned().unwrap_or_default();
                tracing::warn!(%backend, %mapping, row = %String::from_utf8_lossy(&row_id), reason = %r.reason, "row refused; moved to the dead-letter store");
                letters.put_dead_letter(&DeadLetter {
                    seq: r.seq,
                    backend: backend.clone(),
                    mapping,
                    row_id,
                    reason: r.reason.clone(),
                    at_ms: now_ms(),
                });
            }
            if letters.is_empty() {
                return Ok(());
            }
            metrics::counter!("writebehind_dead_letters_total", "backend" => backend.clone())
                .increment(rejected.len() as u64);
            store.write(letters, true)
        })
    }

    pub(super) fn report(&self) -> Result<(), StoreError> {
        if let Some(through) = self.positions.record(&self.name, self.lowest_applied()) {
            self.store.trim_changes(through)?;
        }
        Ok(())
    }

    /// Stores rows refused before reaching the database, synced.
    pub(super) fn dead_letter(&self, refused: Vec<RefusedRow>) -> Result<(), StoreError> {
        if refused.is_empty() {
            return Ok(());
        }
        metrics::counter!("writebehind_dead_letters_total", "backend" => self.name.clone())
            .increment(refused.len() as u64);
        let mut batch = Batch::default();
        for row in refused {
            batch.put_dead_letter(&DeadLetter {
                seq: row.seq,
                backend: self.name.clone(),
                mapping: row.mapping,
                row_id: row.row_id,
                reason: row.reason,
                at_ms: now_ms(),
            });
        }
        self.store.write(batch, true)
    }

    /// Applies a batch on the first connection (the writes of a reconciliation, stamps of the
    /// checkpoint rows), retried like any other.
    pub(super) async fn apply_on_first(
        &mut self,
        batch: &SinkBatch,
    ) -> Result<Vec<Rejected>, SinkError> {
        let before_commit = self.dead_letters_before_commit(batch);
        let (Some(sink), Some(backoff)) = (self.sinks.first_mut(), self.backoffs.first_mut())
        else {
            return Err(SinkError::fatal(format!(
                "backend `{}`: no connection",
                self.name
            )));
        };
        apply_with_retry(
            sink,
            backoff,
            (&self.name, &self.health, &self.store),
            &self.schemas,
            batch,
            &before_commit,
        )
        .await
    }

    pub(super) fn replid(&self) -> Result<String, StoreError> {
        Ok(self
            .store
            .checkpoint()?
            .position
            .map(|p| p.replid.to_string())
            .unwrap_or_default())
    }

    /// Reads the batch that starts at `from` and splits it, or writes the long unit that starts
    /// there in parts.
    async fn read_batch(&mut self, from: ChangeSeq) -> Result<Read, RunnerError> {
        // Into the window the buffer is syncing, too: the batch's statements overlap the sync,
        // its commit waits for it (`SinkBatch::commit_gate`). A unit longer than a batch is
        // read only once synced (it may be written in parts, each part committing nothing).
        let mut first = self.store.changes_to_apply(from, self.batch_limit)?;
        if !first.is_empty() && !first.iter().any(|c| c.unit_end) {
            first = self.store.closed_changes(from, self.batch_limit)?;
        }
        let long = first.first().filter(|_| !first.iter().any(|c| c.unit_end));
        if let Some(start) = long.map(|c| c.seq) {
            if self.streams_long_unit(start) {
                match self.stream_long_unit(first.clone()).await? {
                    Streamed::Committed => return Ok(Read::Done { applied: true }),
                    Streamed::Incomplete => return Ok(Read::Done { applied: false }),
                    Streamed::WriteWhole => {}
                }
            }
        }
        let changes = self.read_units(first)?;
        let shares = split_batch(
            changes,
            &self.mappings,
            &self.schemas,
            self.layout,
            &self.applied,
        );
        Ok(shares.map_or(Read::Done { applied: false }, Read::Batch))
    }

    /// Whole units from `changes` (the first batch's worth after the lowest applied
    /// seq): the units that end within them, or, when one unit alone is longer, that unit (read
    /// on to its end; `long_unit.rs` writes such a unit in parts where it can). Never a unit
    /// still being written in parts by capture (`Store::closed_changes`). (Reading on in
    /// steps of a batch until a step happened to end on a unit end made batches of
    /// 640,000 changes out of a flush's 1,024-change units: docs/benchmarks.md.)
    fn read_units(&self, mut changes: Vec<Change>) -> Result<Vec<Change>, StoreError> {
        if let Some(last_end) = changes.iter().rposition(|c| c.unit_end) {
            changes.truncate(last_end + 1);
            return Ok(changes);
        }
        // The first unit is longer than a batch: read on to its end.
        while changes.last().is_some_and(|c| !c.unit_end) {
            let from = changes.last().map(|c| c.seq.next()).unwrap_or_default();
            let more = self.store.closed_changes(from, self.batch_limit)?;
            if more.is_empty() {
                // The rest of the unit is not written yet (it is, atomically, so this is a
                // unit cut by a trim or a damaged log): stop before it.
                changes.clear();
                break;
            }
            let end = more
                .iter()
                .position(|c| c.unit_end)
                .map_or(more.len(), |i| i + 1);
            changes.extend(more.into_iter().take(end));
        }
        Ok(changes)
    }
}

/// Whether `stop` has already resolved (without waiting).
async fn futures_ready(
    stop: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> bool {
    tokio::select! {
        biased;
        _ = stop => true,
        _ = std::future::ready(()) => false,
    }
}

#[cfg(test)]
#[path = "runner_tests.rs"]
mod tests;
