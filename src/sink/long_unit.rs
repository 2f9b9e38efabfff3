//! Units longer than a batch, written in parts through one open transaction.
//!
//! A unit (a `MULTI ... EXEC`, a script's effects) of more changes than a batch holds
//! ([`BATCH_LIMIT`](super::runner::BATCH_LIMIT)) was read whole and written in one `apply`: a transaction of a million
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
//! With several partitions (design 8.6), each partition's share of the unit goes through its
//! own connection and transaction, as a batch's would: the partitions are written one after the
//! other (the unit is read once per partition), each committing with its own checkpoint row.
//! After a crash between two of them, the partitions that committed skip their share, as for a
//! batch.
//!
//! The usual path stays for what streaming does not do: a row the database refuses (the unit is
//! rolled back and written whole with [`Destination::apply`], which isolates and dead-letters
//! it), a backend that does not stream (none of the three today: MySQL/MariaDB, SQLite and
//! PostgreSQL all do), and a layout whose partitions do not have a connection each (while
//! the partition count changes). A transient failure rolls
//! the unit back and writes it again from its first change, after the backoff; when the commit
//! itself may have reached the database, the checkpoint rows decide, as for any batch.

use std::collections::HashMap;

use bytes::Bytes;

use super::coalesce::{coalesce, Coalesced};
use super::retry::batch_is_in;
use super::runner::{RunnerError, SinkRunner};
use super::{Destination, SinkBatch, SinkErrorKind};
use crate::buffer::Change;
use crate::position::{ChangeSeq, ReplOffset};

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
    /// Whether the unit starting at `first` may be written in parts: a connection per
    /// partition, and not already found to need the usual path.
    pub(super) fn streams_long_unit(&self, first: ChangeSeq) -> bool {
        self.sinks.len() == self.applied.len() && self.whole_unit != Some(first)
    }

    /// Writes the unit whose first changes are `first` (no unit end among them) in parts, a
    /// partition after the other.
    pub(super) async fn stream_long_unit(
        &mut self,
        first: Vec<Change>,
    ) -> Result<Streamed, RunnerError> {
        let started = std::time::Instant::now();
        let mut end = None;
        for partition in 0..self.applied.len() {
            match self.stream_partition(&first, partition).await? {
                (Streamed::Committed, at) => end = at.or(end),
                (other, _) => return Ok(other),
            }
        }
        self.report()?;
        let backend = self.name.clone();
        metrics::histogram!("writebehind_sink_commit_seconds", "backend" => backend)
            .record(started.elapsed().as_secs_f64());
        if let Some((last_seq, offset)) = end {
            self.health.backend(&self.name, true, None);
            self.health.applied(&self.name, last_seq, offset);
            self.applied_offset = offset;
        }
        Ok(Streamed::Committed)
    }

    /// Writes `partition`'s share of the unit, retrying transient failures from its start;
    /// returns with a committed share the unit's last seq and offset.
    async fn stream_partition(
        &mut self,
        first: &[Change],
        partition: usize,
    ) -> Result<(Streamed, Option<(ChangeSeq, ReplOffset)>), RunnerError> {
        let mut write = true;
        loop {
            let error = match self.write_share(first.to_vec(), partition, write).await {
                Ok(done) => {
                    self.backoffs[partition].reset();
                    return Ok(done);
                }
                Err(RunnerError::Sink(error)) => error,
                Err(other) => {
                    self.sinks[partition].abandon_unit().await;
                    return Err(other);
                }
            };
            self.sinks[partition].abandon_unit().await;
            match error.kind() {
                SinkErrorKind::RowRefused => {
                    tracing::info!(backend = %self.name, first = %first[0].seq, reason = %error, "a long unit holds a row the database refuses; writing it whole, to isolate that row");
                    self.whole_unit = Some(first[0].seq);
                    return Ok((Streamed::WriteWhole, None));
                }
                SinkErrorKind::Fatal => return Err(error.into()),
                SinkErrorKind::Transient => {}
            }
            let delay = self.backoffs[partition].next_delay();
            tracing::warn!(backend = %self.name, %error, retry_in = ?delay, "database write failed; retrying the long unit from its start");
            metrics::counter!("writebehind_sink_retries_total", "backend" => self.name.clone())
                .increment(1);
            self.health
                .backend(&self.name, false, Some(error.to_string()));
            tokio::time::sleep(delay).await;
            // The commit may have reached the database before the connection failed.
            write = !self.share_is_in(first, partition).await?;
        }
    }

    /// Reads the unit on from `first` a chunk at a time and, with `write`, writes `partition`'s
    /// share of each chunk (without: the share is known to be committed; only its
    /// acknowledgements and position are recorded). A partition a crash left past the unit
    /// writes nothing.
    async fn write_share(
        &mut self,
        first: Vec<Change>,
        partition: usize,
        write: bool,
    ) -> Result<(Streamed, Option<(ChangeSeq, ReplOffset)>), RunnerError> {
        let replid = self.replid()?;
        let applied = self.applied[partition];
        let unit = first.first().map(|c| c.seq).unwrap_or_default();
        if applied >= unit {
            // Committed before a crash (positions are at unit ends): nothing to write, and no
            // transaction may be begun for it.
            return Ok((Streamed::Committed, None));
        }
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
                return Ok((Streamed::Incomplete, None));
            };
            let mine: Vec<Change> = chunk
                .into_iter()
                .filter(|c| c.seq > applied && self.partition(c) == partition)
                .collect();
            let Coalesced { writes, refused } = coalesce(&self.mappings, &self.schemas, &mine);
            refused_rows.extend(
                refused
                    .iter()
                    .map(|r| ((r.mapping.clone(), r.row_id.clone()), r.reason.clone())),
            );
            if write {
                // Stored before the unit commits: nothing is lost if we crash.
                self.dead_letter(refused)?;
            }
            acks.extend(self.acks_of(&mine, |c| {
                refused_rows
                    .get(&(c.mapping.to_string(), c.row_id.clone()))
                    .cloned()
            }));
            rows += writes.len();
            let batch = self.unit_batch(writes, (last_seq, offset), &replid, partition);
            let sink = &mut self.sinks[partition];
            if end.is_some() {
                if write {
                    sink.commit_unit(&self.schemas, &batch).await?;
                }
                self.share_committed(partition, last_seq, acks, rows)?;
                return Ok((Streamed::Committed, Some((last_seq, offset))));
            }
            if write && !sink.apply_unit_part(&self.schemas, &batch).await? {
                // The backend does not write units in parts.
                self.whole_unit = Some(unit);
                return Ok((Streamed::WriteWhole, None));
            }
            chunk = self
                .store
                .closed_changes(last_seq.next(), self.batch_limit)?;
            if chunk.is_empty() {
                self.sinks[partition].abandon_unit().await;
                return Ok((Streamed::Incomplete, None));
            }
        }
    }

    fn unit_batch(
        &self,
        writes: Vec<super::RowWrite>,
        (last_seq, offset): (ChangeSeq, ReplOffset),
        replid: &str,
        partition: usize,
    ) -> SinkBatch {
        SinkBatch {
            // A long unit is read once synced (`SinkRunner::read_batch`): nothing to wait for.
            commit_gate: Default::default(),
            writes,
            last_seq,
            replid: replid.to_string(),
            offset,
            buffer_id: self.store.identity().to_string(),
            mappings_id: self.mappings_id.clone(),
            checkpoint_rows: vec![self.row(partition)],
            retire_rows: Vec::new(),
        }
    }

    /// Records a committed share: its acknowledgements, the partition's position, metrics.
    fn share_committed(
        &mut self,
        partition: usize,
        last_seq: ChangeSeq,
        acks: Vec<(ChangeSeq, crate::buffer::NewAck)>,
        rows: usize,
    ) -> Result<(), RunnerError> {
        let row = self.row(partition);
        self.applied[partition] = last_seq;
        self.existing_rows.insert(row.clone());
        self.queue_shares(vec![(row, last_seq, acks)])?;
        let backend = self.name.clone();
        metrics::counter!("writebehind_sink_batches_total", "backend" => backend.clone())
            .increment(1);
        metrics::histogram!("writebehind_sink_batch_rows", "backend" => backend)
            .record(rows as f64);
        Ok(())
    }

    /// Whether `partition`'s checkpoint row says its share of the unit starting with `first`
    /// has committed: the unit's last seq is read from the log.
    async fn share_is_in(
        &mut self,
        first: &[Change],
        partition: usize,
    ) -> Result<bool, RunnerError> {
        let mut from = first.last().map(|c| c.seq).unwrap_or_default();
        let last = loop {
            let chunk = self.store.closed_changes(from, self.batch_limit)?;
            if let Some(end) = chunk.iter().find(|c| c.unit_end) {
                break end.seq;
            }
            match chunk.last() {
                Some(c) => from = c.seq.next(),
                None => return Ok(false),
            }
        };
        let batch = self.unit_batch(Vec::new(), (last, ReplOffset::default()), "", partition);
        Ok(match self.sinks[partition].checkpoints().await {
            Ok(rows) => batch_is_in(&batch, &rows),
            Err(_) => false,
        })
    }
}
