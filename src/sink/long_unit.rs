//! Units longer than a batch, written in parts through one open transaction.
//!
//! A unit (a `MULTI ... EXEC`, a script's effects) of more changes than a batch holds
//! ([`MAX_BATCH_CHANGES`]) was read whole and written in one `apply`: a transaction of a million
//! commands held a million changes in the sink (docs/benchmarks.md). With one connection and one
//! partition, the runner now reads such a unit a batch of changes at a time, coalesces each
//! chunk, and hands it to [`Destination::apply_unit_part`], which writes it inside the
//! transaction the unit keeps open; the chunk holding the unit's end goes to
//! [`Destination::commit_unit`] with the checkpoint row. The unit stays one transaction
//! (all or nothing, as before), and memory one chunk.
//!
//! Chunks are applied in order inside the transaction, so a row changed in several chunks ends
//! as the last one left it (coalescing works within a chunk only).
//!
//! The usual path stays for what streaming does not do: a row the database refuses (the unit is
//! rolled back and written whole with [`Destination::apply`], which isolates and dead-letters
//! it), a backend that does not stream (none of the three today: MySQL/MariaDB, SQLite and
//! PostgreSQL all do), and several partitions (each writes its share of the unit in its own
//! transaction, design 8.6). A transient failure rolls
//! the unit back and writes it again from its first change, after the backoff; when the commit
//! itself may have reached the database, the checkpoint rows decide, as for any batch.

use std::collections::HashMap;

use bytes::Bytes;

use super::coalesce::{coalesce, Coalesced};
use super::runner::{batch_is_in, RunnerError, SinkRunner, MAX_BATCH_CHANGES};
use super::{Destination, SinkBatch, SinkError, SinkErrorKind};
use crate::buffer::Change;
use crate::position::ChangeSeq;

/// How writing a long unit in parts ended.
pub(super) enum Streamed {
    /// Committed with its checkpoint.
    Committed,
    /// To be written whole (a row the database refuses, or a backend that does not stream).
    WriteWhole,
    /// Its end is not in the log (cut by a trim or a damaged log): nothing was applied.
    Incomplete,
}

impl<D: Destination> SinkRunner<D> {
    /// Whether the unit starting at `first` may be written in parts: one connection, one
    /// partition, and not already found to need the usual path.
    pub(super) fn streams_long_unit(&self, first: ChangeSeq) -> bool {
        self.sinks.len() == 1 && self.applied.len() == 1 && self.whole_unit != Some(first)
    }

    /// Writes the unit whose first changes are `first` (no unit end among them) in parts,
    /// retrying transient failures from its start.
    pub(super) async fn stream_long_unit(
        &mut self,
        first: Vec<Change>,
    ) -> Result<Streamed, RunnerError> {
        let mut write = true;
        loop {
            let started = std::time::Instant::now();
            let result = self.write_long_unit(first.clone(), write).await;
            let error = match result {
                Ok(streamed) => {
                    if let Some(backoff) = self.backoffs.first_mut() {
                        backoff.reset();
                    }
                    if matches!(streamed, Streamed::Committed) {
                        metrics::histogram!("writebehind_sink_commit_seconds", "backend" => self.name.clone())
                            .record(started.elapsed().as_secs_f64());
                    }
                    return Ok(streamed);
                }
                Err(RunnerError::Sink(error)) => error,
                Err(other) => {
                    self.abandon_long_unit().await;
                    return Err(other);
                }
            };
            self.abandon_long_unit().await;
            match error.kind() {
                SinkErrorKind::RowRefused => {
                    tracing::info!(backend = %self.name, first = %first[0].seq, reason = %error, "a long unit holds a row the database refuses; writing it whole, to isolate that row");
                    self.whole_unit = Some(first[0].seq);
                    return Ok(Streamed::WriteWhole);
                }
                SinkErrorKind::Fatal => return Err(error.into()),
                SinkErrorKind::Transient => {}
            }
            let Some(backoff) = self.backoffs.first_mut() else {
                return Err(error.into());
            };
            let delay = backoff.next_delay();
            tracing::warn!(backend = %self.name, %error, retry_in = ?delay, "database write failed; retrying the long unit from its start");
            metrics::counter!("writebehind_sink_retries_total", "backend" => self.name.clone())
                .increment(1);
            self.health
                .backend(&self.name, false, Some(error.to_string()));
            tokio::time::sleep(delay).await;
            // The commit may have reached the database before the connection failed.
            write = !self.long_unit_is_in(&first).await?;
        }
    }

    /// Reads the unit on from `first` a chunk at a time and, with `write`, writes each chunk
    /// (without: the unit is known to be committed; only its acknowledgements and positions
    /// are recorded).
    async fn write_long_unit(
        &mut self,
        first: Vec<Change>,
        write: bool,
    ) -> Result<Streamed, RunnerError> {
        let replid = self.replid()?;
        let mut chunk = first;
        let mut acks = Vec::new();
        // Rows refused before the database (conversion), for the acknowledgements' reasons.
        let mut refused_rows: HashMap<(String, Bytes), String> = HashMap::new();
        let mut rows = 0;
        loop {
            let end = chunk.iter().position(|c| c.unit_end);
            if let Some(end) = end {
                chunk.truncate(end + 1);
            }
            let Some((last_seq, offset)) = chunk.last().map(|c| (c.seq, c.offset)) else {
                return Ok(Streamed::Incomplete);
            };
            let Coalesced { writes, refused } = coalesce(&self.mappings, &self.schemas, &chunk);
            refused_rows.extend(
                refused
                    .iter()
                    .map(|r| ((r.mapping.clone(), r.row_id.clone()), r.reason.clone())),
            );
            if write {
                // Stored before the unit commits: nothing is lost if we crash.
                self.dead_letter(refused)?;
            }
            acks.extend(self.acks_of(&chunk, |c| {
                refused_rows
                    .get(&(c.mapping.clone(), c.row_id.clone()))
                    .cloned()
            }));
            rows += writes.len();
            let batch = self.unit_batch(writes, last_seq, offset, &replid);
            let Some(sink) = self.sinks.first_mut() else {
                return Err(
                    SinkError::fatal(format!("backend `{}`: no connection", self.name)).into(),
                );
            };
            if end.is_some() {
                if write {
                    sink.commit_unit(&self.schemas, &batch).await?;
                }
                self.long_unit_committed(last_seq, offset, acks, rows)?;
                return Ok(Streamed::Committed);
            }
            if write && !sink.apply_unit_part(&self.schemas, &batch).await? {
                // The backend does not write units in parts.
                self.whole_unit = chunk.first().map(|c| c.unit);
                return Ok(Streamed::WriteWhole);
            }
            chunk = self
                .store
                .closed_changes(last_seq.next(), MAX_BATCH_CHANGES)?;
            if chunk.is_empty() {
                self.abandon_long_unit().await;
                return Ok(Streamed::Incomplete);
            }
        }
    }

    fn unit_batch(
        &self,
        writes: Vec<super::RowWrite>,
        last_seq: ChangeSeq,
        offset: crate::position::ReplOffset,
        replid: &str,
    ) -> SinkBatch {
        SinkBatch {
            writes,
            last_seq,
            replid: replid.to_string(),
            offset,
            buffer_id: self.store.identity().to_string(),
            mappings_id: self.mappings_id.clone(),
            checkpoint_rows: vec![self.row(0)],
            retire_rows: Vec::new(),
        }
    }

    /// Records a committed long unit: its acknowledgements, the applied position, metrics.
    fn long_unit_committed(
        &mut self,
        last_seq: ChangeSeq,
        offset: crate::position::ReplOffset,
        acks: Vec<(ChangeSeq, crate::buffer::NewAck)>,
        rows: usize,
    ) -> Result<(), RunnerError> {
        let row = self.row(0);
        self.applied[0] = last_seq;
        self.existing_rows.insert(row.clone());
        self.queue_shares(vec![(row, last_seq, acks)])?;
        self.report()?;
        let backend = self.name.clone();
        metrics::counter!("writebehind_sink_batches_total", "backend" => backend.clone())
            .increment(1);
        metrics::histogram!("writebehind_sink_batch_rows", "backend" => backend)
            .record(rows as f64);
        self.health.backend(&self.name, true, None);
        self.health.applied(&self.name, last_seq, offset);
        self.applied_offset = offset;
        Ok(())
    }

    /// Whether the checkpoint rows say the unit starting with `first` has committed: its
    /// last seq is read from the log.
    async fn long_unit_is_in(&mut self, first: &[Change]) -> Result<bool, RunnerError> {
        let mut from = first.last().map(|c| c.seq).unwrap_or_default();
        let last = loop {
            let chunk = self.store.closed_changes(from, MAX_BATCH_CHANGES)?;
            if let Some(end) = chunk.iter().find(|c| c.unit_end) {
                break end.seq;
            }
            match chunk.last() {
                Some(c) => from = c.seq.next(),
                None => return Ok(false),
            }
        };
        let batch = self.unit_batch(Vec::new(), last, Default::default(), "");
        let Some(sink) = self.sinks.first_mut() else {
            return Ok(false);
        };
        Ok(match sink.checkpoints().await {
            Ok(rows) => batch_is_in(&batch, &rows),
            Err(_) => false,
        })
    }

    async fn abandon_long_unit(&mut self) {
        if let Some(sink) = self.sinks.first_mut() {
            sink.abandon_unit().await;
        }
    }
}
