//! Moves the change log into one backend: bounded batches of whole units, coalesced per row,
//! converted by column type, applied with the checkpoint, retried forever on transient errors;
//! refused rows go to the dead-letter store; the change log is trimmed behind the slowest
//! backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::convert::{convert, Refusal, SqlValue};
use super::{
    BeforeCommit, Destination, Rejected, RowOp, RowWrite, SchemaProblem, SinkBatch, SinkError,
    TableSchema,
};
use crate::ack::Writeback;
use crate::backoff::Backoff;
use crate::buffer::{Batch, Change, DeadLetter, NewAck, RowChange, Store, StoreError};
use crate::capture::mapping::Mapping;
use crate::clock::now_ms;

/// Most changes read for one batch (more when a unit is larger).
pub const MAX_BATCH_CHANGES: usize = 5_000;

/// Changes trimmed at once at least (or after `TRIM_EVERY`): every trim is a range tombstone
/// that each later read of the change log must process, so trimming after every small batch
/// makes reads slower and slower (seen at 1,000 commits per second).
const TRIM_AT_LEAST: u64 = 10_000;
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// The applied seq of every backend, so the change log is trimmed behind the slowest.
#[derive(Debug)]
pub struct AppliedPositions {
    applied: Mutex<HashMap<String, u64>>,
    backends: usize,
    /// Trimmed through this seq, at this instant.
    trimmed: Mutex<(u64, std::time::Instant)>,
}

impl AppliedPositions {
    pub fn new(backends: usize) -> Self {
        AppliedPositions {
            applied: Mutex::new(HashMap::new()),
            backends,
            trimmed: Mutex::new((0, std::time::Instant::now())),
        }
    }

    /// Records a backend's position; returns the seq every backend has passed when it is time
    /// to trim the change log through it.
    fn record(&self, backend: &str, seq: u64) -> Option<u64> {
        let through = {
            let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
            applied.insert(backend.to_string(), seq);
            if applied.len() < self.backends {
                return None;
            }
            applied.values().copied().min().unwrap_or(0)
        };
        let mut trimmed = self.trimmed.lock().unwrap_or_else(|p| p.into_inner());
        let due = through >= trimmed.0.saturating_add(TRIM_AT_LEAST)
            || (through > trimmed.0 && trimmed.1.elapsed() >= TRIM_EVERY);
        if !due {
            return None;
        }
        *trimmed = (through, std::time::Instant::now());
        Some(through)
    }

    pub fn get(&self, backend: &str) -> Option<u64> {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(backend)
            .copied()
    }
}

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
    pub health: Arc<crate::metrics::Health>,
    /// Woken when acknowledgements are queued.
    pub writeback: Arc<Writeback>,
}

/// Moves the change log into one backend (see the module doc).
pub struct SinkRunner<D: Destination> {
    name: String,
    sink: D,
    mappings: Vec<Mapping>,
    schemas: Vec<TableSchema>,
    store: Arc<Store>,
    notify: Arc<Notify>,
    positions: Arc<AppliedPositions>,
    applied: u64,
    health: Arc<crate::metrics::Health>,
    writeback: Arc<Writeback>,
    backoff: Backoff,
}

impl<D: Destination> SinkRunner<D> {
    /// Checks (or creates) the sink's tables and reads its checkpoint. Problems are returned
    /// one per line.
    pub async fn start(
        name: &str,
        mut sink: D,
        mappings: Vec<Mapping>,
        links: RunnerLinks,
    ) -> Result<SinkRunner<D>, Vec<SchemaProblem>> {
        let schemas = sink.prepare(&mappings).await?;
        let applied = sink.applied_seq().await.map_err(|e| vec![e.into()])?;
        links.health.backend(name, true, None);
        Ok(SinkRunner {
            name: name.to_string(),
            sink,
            mappings,
            schemas,
            store: links.store,
            notify: links.committed,
            positions: links.positions,
            applied,
            health: links.health,
            writeback: links.writeback,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(30)),
        })
    }

    /// Queues the acks of changes this backend committed before a crash left them unqueued
    /// (between its database commit and the ack queue write).
    fn catch_up_acks(&self) -> Result<(), StoreError> {
        let enqueued = self.store.acks_enqueued(&self.name)?;
        if enqueued >= self.applied {
            return Ok(());
        }
        let letters: HashMap<u64, String> = self
            .store
            .dead_letters()?
            .into_iter()
            .filter(|l| l.backend == self.name)
            .map(|l| (l.seq, l.reason))
            .collect();
        let mut from = enqueued + 1;
        loop {
            let changes = self.store.changes(from, MAX_BATCH_CHANGES)?;
            let changes: Vec<Change> = changes
                .into_iter()
                .take_while(|c| c.seq <= self.applied)
                .collect();
            let Some(last) = changes.last() else { break };
            from = last.seq + 1;
            self.queue_acks(&changes, |c| letters.get(&c.seq).cloned(), last.seq)?;
        }
        Ok(())
    }

    /// Queues the acks of this backend's `changes` that carry a `#` op uuid: failed with the
    /// reason `refused` gives, done otherwise; records that this backend's acks are queued
    /// through `through`.
    fn queue_acks(
        &self,
        changes: &[Change],
        refused: impl Fn(&Change) -> Option<String>,
        through: u64,
    ) -> Result<(), StoreError> {
        let acks: Vec<NewAck> = changes
            .iter()
            .filter_map(|c| c.op.as_ref().map(|op| (c, op)))
            .filter(|(c, _)| self.mappings.iter().any(|m| m.name == c.mapping))
            .map(|(change, op)| NewAck {
                db: op.db,
                key: op.key.clone(),
                uuid: op.uuid.clone(),
                failure: refused(change),
                offset: change.offset.0,
            })
            .collect();
        if acks.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::default();
        batch.put_acks(acks);
        batch.put_acks_enqueued(&self.name, through);
        self.store.write(batch, false)?;
        self.writeback.acks_queued();
        Ok(())
    }

    /// Applies changes until `stop` resolves.
    pub async fn run(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), RunnerError> {
        tokio::pin!(stop);
        self.catch_up_acks()?;
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
        let changes = self.read_units()?;
        let Some(last) = changes.last() else {
            return Ok(false);
        };
        let last_seq = last.seq;
        let offset = last.offset.0;
        let replid = self
            .store
            .checkpoint()?
            .position
            .map(|p| p.replid.to_string())
            .unwrap_or_default();
        let (writes, refused) = self.build(&changes);
        let mut letters = Vec::new();
        // Why each refused row was refused, for the acks of every change coalesced into it.
        let mut refused_rows: HashMap<(String, Bytes), String> = HashMap::new();
        for (seq, mapping, row_id, reason) in refused {
            refused_rows.insert((mapping.clone(), row_id.clone()), reason.clone());
            letters.push(DeadLetter {
                seq,
                backend: self.name.clone(),
                mapping,
                row_id,
                reason,
                at_ms: now_ms(),
            });
        }
        // Conversion refusals are stored before the batch commits: nothing is lost if we crash.
        metrics::counter!("writebehind_dead_letters_total", "backend" => self.name.clone())
            .increment(letters.len() as u64);
        self.dead_letter(&letters)?;
        let batch = SinkBatch {
            writes,
            last_seq,
            replid,
            offset,
        };
        // Rows the database refuses are dead-lettered inside the commit, before the batch
        // counts as applied: a crash cannot lose them.
        let index: HashMap<u64, (String, Bytes)> = batch
            .writes
            .iter()
            .map(|w| {
                (
                    w.seq,
                    (
                        self.mappings
                            .get(w.table)
                            .map(|m| m.name.clone())
                            .unwrap_or_default(),
                        w.row_id.clone(),
                    ),
                )
            })
            .collect();
        let (store, backend) = (self.store.clone(), self.name.clone());
        let before_commit: BeforeCommit = Arc::new(move |rejected: &[Rejected]| {
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
        });
        let started = std::time::Instant::now();
        let rejected = self.apply_with_retry(&batch, &before_commit).await?;
        for r in &rejected {
            if let Some(write) = batch.writes.iter().find(|w| w.seq == r.seq) {
                let mapping = self
                    .mappings
                    .get(write.table)
                    .map(|m| m.name.clone())
                    .unwrap_or_default();
                refused_rows.insert((mapping, write.row_id.clone()), r.reason.clone());
            }
        }
        self.queue_acks(
            &changes,
            |c| {
                refused_rows
                    .get(&(c.mapping.clone(), c.row_id.clone()))
                    .cloned()
            },
            last_seq,
        )?;
        metrics::counter!("writebehind_sink_batches_total", "backend" => self.name.clone())
            .increment(1);
        metrics::histogram!("writebehind_sink_batch_rows", "backend" => self.name.clone())
            .record(batch.writes.len() as f64);
        metrics::histogram!("writebehind_sink_commit_seconds", "backend" => self.name.clone())
            .record(started.elapsed().as_secs_f64());
        self.health.backend(&self.name, true, None);
        self.health.applied(&self.name, last_seq, offset);
        self.applied = last_seq;
        self.report()?;
        Ok(true)
    }

    fn report(&self) -> Result<(), StoreError> {
        if let Some(through) = self.positions.record(&self.name, self.applied) {
            self.store.trim_changes(through)?;
        }
        Ok(())
    }

    fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::default();
        for letter in letters {
            batch.put_dead_letter(letter);
        }
        self.store.write(batch, true)
    }

    async fn apply_with_retry(
        &mut self,
        batch: &SinkBatch,
        before_commit: &BeforeCommit,
    ) -> Result<Vec<Rejected>, SinkError> {
        loop {
            match self.sink.apply(&self.schemas, batch, before_commit).await {
                Ok(rejected) => {
                    if self.backoff.failures() > 0 {
                        tracing::info!(backend = %self.name, "database reachable again");
                    }
                    self.backoff.reset();
                    return Ok(rejected);
                }
                Err(error) if error.is_transient() => {
                    let delay = self.backoff.next_delay();
                    tracing::warn!(backend = %self.name, %error, retry_in = ?delay, "database write failed; retrying");
                    metrics::counter!("writebehind_sink_retries_total", "backend" => self.name.clone()).increment(1);
                    self.health
                        .backend(&self.name, false, Some(error.to_string()));
                    tokio::time::sleep(delay).await;
                    // The connection may have died after COMMIT reached the server: if the
                    // checkpoint row says the batch is in, it must not be applied again.
                    match self.sink.applied_seq().await {
                        Ok(applied) if applied >= batch.last_seq => {
                            tracing::info!(backend = %self.name, seq = batch.last_seq, "the batch had committed before the connection failed");
                            self.backoff.reset();
                            return Ok(Vec::new());
                        }
                        _ => {}
                    }
                }
                Err(fatal) => return Err(fatal),
            }
        }
    }

    /// Changes after the applied seq: at most about `MAX_BATCH_CHANGES`, ending on a unit end.
    fn read_units(&self) -> Result<Vec<Change>, StoreError> {
        let mut changes = self.store.changes(self.applied + 1, MAX_BATCH_CHANGES)?;
        while changes.last().is_some_and(|c| !c.unit_end) {
            let from = changes.last().map(|c| c.seq + 1).unwrap_or(0);
            let more = self.store.changes(from, MAX_BATCH_CHANGES)?;
            if more.is_empty() {
                // The rest of the unit is not written yet (it is, atomically, so this is a
                // unit cut by a trim or a damaged log): stop before it.
                while changes.last().is_some_and(|c| !c.unit_end) {
                    changes.pop();
                }
                break;
            }
            changes.extend(more);
        }
        Ok(changes)
    }

    /// Coalesces the changes of this backend per row and converts them. Returns the writes and
    /// the refused ones (seq, mapping, row id, reason).
    #[allow(clippy::type_complexity)]
    fn build(&self, changes: &[Change]) -> (Vec<RowWrite>, Vec<(u64, String, Bytes, String)>) {
        let mut order: Vec<(usize, Bytes)> = Vec::new();
        let mut rows: HashMap<(usize, Bytes), (bool, &Change)> = HashMap::new();
        for change in changes {
            let Some(table) = self.mappings.iter().position(|m| m.name == change.mapping) else {
                continue;
            };
            let key = (table, change.row_id.clone());
            match rows.get_mut(&key) {
                Some((deleted, last)) => {
                    *deleted |= matches!(last.row, RowChange::Delete);
                    *last = change;
                }
                None => {
                    order.push(key.clone());
                    rows.insert(key, (false, change));
                }
            }
        }
        let mut writes = Vec::new();
        let mut refused = Vec::new();
        for key in order {
            let Some((deleted, change)) = rows.get(&key) else {
                continue;
            };
            let (table, row_id) = key;
            let (Some(schema), Some(mapping)) = (self.schemas.get(table), self.mappings.get(table))
            else {
                continue;
            };
            let id = match convert(
                &schema.key_column.kind,
                &schema.key_column.name,
                Some(&row_id),
            ) {
                Ok(id) => id,
                Err(reason) => {
                    refused.push((
                        change.seq,
                        mapping.name.clone(),
                        row_id,
                        format!("key {reason}"),
                    ));
                    continue;
                }
            };
            let op = match &change.row {
                RowChange::Delete => RowOp::Delete { id },
                RowChange::Upsert { columns } => match convert_row(schema, columns) {
                    Ok(values) => RowOp::Upsert { id, values },
                    Err(reason) => {
                        refused.push((change.seq, mapping.name.clone(), row_id, reason.0));
                        continue;
                    }
                },
            };
            writes.push(RowWrite {
                table,
                seq: change.seq,
                row_id,
                delete_first: *deleted && matches!(op, RowOp::Upsert { .. }),
                op,
            });
        }
        (writes, refused)
    }
}

/// Converts a row image to the schema's columns, checking required ones.
pub fn convert_row(
    schema: &TableSchema,
    columns: &[(String, Option<Bytes>)],
) -> Result<Vec<SqlValue>, Refusal> {
    schema
        .columns
        .iter()
        .map(|column| {
            let value = columns
                .iter()
                .find(|(name, _)| *name == column.name)
                .and_then(|(_, v)| v.as_deref());
            if value.is_none() && schema.required.contains(&column.name) {
                return Err(Refusal(format!(
                    "required column `{}` is absent",
                    column.name
                )));
            }
            convert(&column.kind, &column.name, value)
        })
        .collect()
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
mod tests {
    use super::*;
    use crate::buffer::HashOp;
    use crate::position::ReplOffset;
    use crate::sink::memory::MemoryDestination;

    fn change(seq: u64, uuid: Option<&str>) -> Change {
        Change {
            seq,
            unit: seq,
            unit_end: true,
            offset: ReplOffset(100 + seq),
            mapping: "P".into(),
            row_id: Bytes::from(format!("{seq}")),
            row: RowChange::Delete,
            op: uuid.map(|u| HashOp {
                op: b'~',
                uuid: Bytes::copy_from_slice(u.as_bytes()),
                db: 0,
                key: Bytes::from(format!("p:{seq}")),
            }),
        }
    }

    fn links(store: &Arc<Store>) -> RunnerLinks {
        RunnerLinks {
            store: store.clone(),
            committed: Arc::new(Notify::new()),
            positions: Arc::new(AppliedPositions::new(1)),
            health: crate::metrics::Health::new(),
            writeback: Arc::new(Writeback::default()),
        }
    }

    fn mappings() -> Vec<Mapping> {
        let text = "[source]\nurl = \"redis://127.0.0.1:1\"\n[backends.db]\nurl = \"sqlite://unused\"\n[[mappings]]\nname = \"P\"\nprefix = \"p\"\nbackend = \"db\"\ntable = \"t\"\nkey_column = \"id\"\n[mappings.columns]\nname = \"name\"\n";
        let config = crate::config::Config::parse(text, &|_| None).expect("config");
        config.mappings.iter().map(Mapping::from_config).collect()
    }

    /// A crash between a database commit and the ack queue: the next start queues the acks of
    /// what the database has, once.
    #[tokio::test]
    async fn acks_lost_between_commit_and_queue_are_queued_at_start() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Arc::new(Store::open(&dir.path().join("buffer")).expect("store"));
        let mut batch = Batch::default();
        for c in [change(1, None), change(2, Some("u2")), change(3, None)] {
            batch.put_change(&c);
        }
        store.write(batch, true).expect("write");
        let start = || {
            SinkRunner::start(
                "db",
                MemoryDestination::default(),
                mappings(),
                links(&store),
            )
        };
        let mut runner = start().await.expect("runner");
        // As if the database had committed through seq 3 and the process died right after.
        runner.applied = 3;
        runner.catch_up_acks().expect("catch up");
        let acks = store.acks(0, 10).expect("acks");
        assert_eq!(acks.len(), 1);
        assert_eq!(
            (
                acks[0].key.as_ref(),
                acks[0].uuid.as_ref(),
                &acks[0].failure
            ),
            (&b"p:2"[..], &b"u2"[..], &None)
        );
        assert_eq!(store.acks_enqueued("db").expect("mark"), 3);
        runner.catch_up_acks().expect("again");
        assert_eq!(store.acks(0, 10).expect("acks").len(), 1, "queued once");
    }
}
