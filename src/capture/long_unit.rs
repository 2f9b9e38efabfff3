//! Long units: a `MULTI ... EXEC` (a transaction, a script's or a function's effects) that
//! arrives in parts ([`StreamEvent::TransactionPart`]) is applied part by part, and what it has
//! changed is written ahead of its end whenever its batch holds [`SPILL_KEYS`] keys or
//! [`SPILL_ROWS`] row events. Memory then stays bounded whatever the transaction's size (until
//! 2026-11-29 a unit was held whole: about 2 KB a command, 538 MB for 300,000 commands).
//!
//! A written part (the buffer's `open_unit.rs` describes the records) holds the part's mirror
//! entries and changes, none of which ends the unit, the values its keys had before the unit
//! (`undo`), and the checkpoint still before `MULTI`: nothing of the unit is acknowledged to
//! the primary, and no sink reads it. The part holding `EXEC` ends the unit in one write with
//! its last changes, the checkpoint after it, and the deletion of the undo entries. The last
//! row event of each written part is held back for the next one, so that the unit's last change
//! is always written with its end.
//!
//! A unit that cannot end here is rolled back before anything else reads the buffer: the link
//! was lost or a full resync begins (`Capture::handle`), a command needs a full resync, or the
//! process stops (the next start rolls it back, `Capture::new`). The primary sends it again
//! from `MULTI`.
//!
//! Not written in parts: a batch holding raw states or acknowledgements of `#` ops (they are
//! written with the unit's end: a part must not acknowledge anything), and a unit of the function
//! library (tagged: applied whole at its end, as before). While a unit is open, dead letters are
//! not requeued (their changes would fall inside it).

use bytes::Bytes;

use super::committer::Publication;
use super::rows::RowEvent;
use super::state::{CaptureState, ChangeCounts};
use super::stream::{Committed, Prepared, StreamBatch};
use super::working_set::MirrorView;
use super::{Capture, CaptureError};
use crate::ack::parse_tag;
use crate::buffer::{Batch, EncodedChanges, OpenUnit, StoreError};
use crate::metrics::OpenTransaction;
use crate::position::{ChangeSeq, DurableOffset, ReplOffset, StreamPosition};
use crate::replication::stream::{Command, StreamEvent};

/// Keys of a long unit's batch before what it changed is written.
pub const SPILL_KEYS: usize = 8192;
/// Row events of a long unit's batch before they are written.
pub const SPILL_ROWS: usize = 8192;
/// Fields of large hashes (`buffer/window.rs`) a long unit's batch loads before what it
/// changed is written.
pub const SPILL_FIELDS: usize = 8192;

/// A unit whose `EXEC` has not arrived.
pub struct LongUnit {
    /// The seq its first change gets (the next seq when it began).
    first_seq: ChangeSeq,
    /// The stream offset before its `MULTI` (the checkpoint's).
    start: ReplOffset,
    /// Whether parts of it are written (then it must be rolled back if it cannot end).
    written: bool,
    /// The last row event of what was written, written with the next part.
    held: Option<RowEvent>,
    /// Keys to read from the primary once it ends.
    refresh: Vec<(u32, Bytes)>,
    /// The commands of a unit of the function library, applied whole at its end.
    tagged: Option<Vec<Command>>,
    /// Its commands received so far and its parts written (shown by `/status`).
    commands: u64,
    parts_written: u64,
}

impl LongUnit {
    /// What `/status` shows of it.
    fn shown(&self) -> OpenTransaction {
        OpenTransaction {
            start: self.start,
            first_seq: self.first_seq,
            commands: self.commands,
            parts_written: self.parts_written,
        }
    }
}

impl StreamBatch {
    /// Whether what the long unit changed in this batch is to be written now.
    fn should_spill(&self) -> bool {
        let large = self.ws.len() >= SPILL_KEYS
            || self.long_rows.len() >= SPILL_ROWS
            || self.ws.fields_seen() >= SPILL_FIELDS;
        large && self.raw.is_empty() && self.acks.is_empty() && self.retired.is_empty()
    }

    /// Applies a part of a long unit: its row events stay in the batch until written.
    fn apply_part(
        &mut self,
        state: &mut CaptureState,
        commands: &[Command],
        end: ReplOffset,
        refresh: &mut Vec<(u32, Bytes)>,
    ) -> Result<Option<String>, StoreError> {
        let mut rows = std::mem::take(&mut self.long_rows);
        let applied = self.apply_commands(state, commands, (end, false), &mut rows, refresh);
        self.long_rows = rows;
        applied
    }

    /// What the long unit changed in this batch, as one write that leaves the checkpoint
    /// before the unit (see the module doc). The committer must have written every batch
    /// before (the undo values are read from RocksDB).
    fn spill(
        mut self,
        state: &mut CaptureState,
        long: &mut LongUnit,
    ) -> Result<Prepared, StoreError> {
        let mut batch = Batch::default();
        let store = state.store.clone();
        for (db, key) in self.ws.dirty_keys() {
            // The first part that changes a key records its value from before the unit.
            if !store.has_undo(*db, key)? {
                batch.put_undo(*db, key, &store.mirror(*db, key)?);
            }
            // And of a large hash, the fields it writes (`buffer/field_store.rs`).
            if let Some(writes) = self.ws.field_writes(*db, key) {
                store.undo_fields(&mut batch, (*db, key), writes.all_stored, &writes.names)?;
            }
        }
        let mut rows: Vec<RowEvent> = long.held.take().into_iter().collect();
        rows.append(&mut self.long_rows);
        long.held = rows.pop();
        let mut counts = ChangeCounts::default();
        let mut changes = EncodedChanges::with_capacity(rows.len());
        state.number_rows(
            &mut changes,
            rows.into_iter(),
            (long.first_seq, long.start, false),
            &mut counts,
        );
        batch.put_encoded_changes(changes);
        let flushed = self.ws.flush_into(&mut batch);
        batch.open_unit(&OpenUnit {
            first_seq: long.first_seq,
            start: long.start,
        });
        batch.put_checkpoint(&state.checkpoint);
        long.written = true;
        Ok(Prepared {
            batch,
            flushed,
            publication: Publication {
                committed: Committed {
                    to_complete: Vec::new(),
                    acks_queued: false,
                    last_seq: None,
                },
                offset: state.offset(),
                counts,
            },
            wait: false,
        })
    }

    /// Applies the last commands of a long unit and ends it at `end` (`db` selected after it);
    /// returns a reason when a full resync is needed instead.
    async fn finish_long(
        &mut self,
        state: &mut CaptureState,
        primary: &mut super::primary::Primary,
        long: &mut LongUnit,
        (commands, end, db): (&[Command], ReplOffset, u32),
    ) -> Result<Option<String>, StoreError> {
        if let Some(reason) = self.apply_part(state, commands, end, &mut long.refresh)? {
            return Ok(Some(reason));
        }
        let Some(position) = state.checkpoint.position.clone() else {
            return Ok(None);
        };
        let mut rows: Vec<RowEvent> = long.held.take().into_iter().collect();
        rows.append(&mut self.long_rows);
        let refresh = std::mem::take(&mut long.refresh);
        if let Some(reason) = self
            .refresh_keys(state, primary, refresh, &position.replid, &mut rows)
            .await?
        {
            return Ok(Some(reason));
        }
        self.units += 1;
        state.stats.units += 1;
        self.closes_unit = long.written;
        self.push_long_end(rows, end, long.first_seq);
        state.checkpoint.position = Some(StreamPosition {
            replid: position.replid,
            offset: end,
            db,
        });
        Ok(None)
    }
}

impl Capture {
    /// Applies a part of a long unit, or the end of one (the unit's `Transaction`); writes
    /// what it changed when `batch` holds enough. Returns a reason when a full resync is needed.
    pub(super) async fn apply_long(
        &mut self,
        durable: &DurableOffset,
        batch: &mut StreamBatch,
        event: StreamEvent,
    ) -> Result<Option<String>, CaptureError> {
        let mut long = match self.long.take() {
            Some(long) => long,
            None => {
                // What came before the unit is committed on its own: the unit's batches then
                // hold nothing else, and the values before the unit are those in RocksDB. The
                // unit's batch is made after the hand-over, so that it reads through that
                // batch's entries while they are in flight (made before, it read what the
                // batch had changed from RocksDB or an older batch: a lost update).
                if !batch.is_empty() {
                    let before = std::mem::replace(
                        batch,
                        StreamBatch::new(self.state.store.clone(), MirrorView::default()),
                    );
                    self.hand_over(durable, before).await?;
                    *batch = self.new_batch(durable)?;
                }
                let tagged = match &event {
                    StreamEvent::TransactionPart { commands, .. } => {
                        self.state.ops.enabled && parse_tag(commands).is_some()
                    }
                    _ => false,
                };
                LongUnit {
                    first_seq: self.state.checkpoint.next_seq,
                    start: self.state.offset(),
                    written: false,
                    held: None,
                    refresh: Vec::new(),
                    tagged: tagged.then(Vec::new),
                    commands: 0,
                    parts_written: 0,
                }
            }
        };
        match event {
            StreamEvent::TransactionPart { commands, end } => {
                long.commands += commands.len() as u64;
                self.outputs.health.open_transaction(Some(long.shown()));
                if let Some(tagged) = long.tagged.as_mut() {
                    tagged.extend(commands);
                    self.long = Some(long);
                    return Ok(None);
                }
                let applied =
                    batch.apply_part(&mut self.state, &commands, end, &mut long.refresh)?;
                if applied.is_none() && batch.should_spill() {
                    self.written().await?;
                    let full = std::mem::replace(
                        batch,
                        StreamBatch::new(self.state.store.clone(), MirrorView::default()),
                    );
                    let prepared = full.spill(&mut self.state, &mut long)?;
                    self.unit_on_disk = true;
                    self.committer(durable)?.commit(prepared).await?;
                    self.state.stats.unit_parts_written += 1;
                    long.parts_written += 1;
                    self.outputs.health.open_transaction(Some(long.shown()));
                    metrics::counter!("writebehind_transaction_parts_written_total").increment(1);
                    *batch = self.new_batch(durable)?;
                }
                self.long = Some(long);
                Ok(applied)
            }
            StreamEvent::Transaction {
                commands,
                start,
                end,
                db,
            } => {
                // Its end has arrived: applied in this batch (or, should it need a full
                // resync, rolled back).
                self.outputs.health.open_transaction(None);
                self.end_long(batch, long, (commands, start, end, db)).await
            }
            other => {
                // Parts are followed by parts or their EXEC only (replication/stream.rs).
                self.long = Some(long);
                Ok(Some(format!(
                    "the replication stream broke off a transaction at offset {} (no EXEC)",
                    other.end()
                )))
            }
        }
    }

    /// Applies the end of a long unit (its `Transaction` event) to `batch`.
    async fn end_long(
        &mut self,
        batch: &mut StreamBatch,
        mut long: LongUnit,
        (commands, start, end, db): (Vec<Command>, ReplOffset, ReplOffset, u32),
    ) -> Result<Option<String>, CaptureError> {
        match long.tagged.take() {
            Some(mut tagged) => {
                tagged.extend(commands);
                let whole = StreamEvent::Transaction {
                    commands: tagged,
                    start,
                    end,
                    db,
                };
                Ok(batch
                    .apply(&mut self.state, &mut self.primary, &whole)
                    .await?)
            }
            None => {
                let ended = batch
                    .finish_long(
                        &mut self.state,
                        &mut self.primary,
                        &mut long,
                        (&commands, end, db),
                    )
                    .await?;
                if ended.is_some() {
                    // A full resync instead: what was written of it is rolled back first.
                    self.long = Some(long);
                }
                Ok(ended)
            }
        }
    }

    /// Drops the long unit being applied, if any, rolling back what was written of it (see
    /// the module doc); the batch holding its latest part (or its end, not yet handed over) is
    /// dropped by the caller.
    pub(super) async fn abandon_long_unit(&mut self) -> Result<(), CaptureError> {
        self.open_batch = None;
        if self.long.take().is_some() {
            self.outputs.health.open_transaction(None);
        }
        if !self.unit_on_disk {
            return Ok(());
        }
        self.unit_on_disk = false;
        self.written().await?;
        if let Some(open) = self.state.store.roll_back_open_unit()? {
            self.state.stats.units_rolled_back += 1;
            metrics::counter!("writebehind_transactions_rolled_back_total").increment(1);
            tracing::warn!(
                first_seq = %open.first_seq,
                start = %open.start,
                "a transaction written in parts did not reach its EXEC here; what was written of it is rolled back, and the primary sends it again"
            );
        }
        self.state.checkpoint = self.state.store.checkpoint()?;
        // It may hold entries the rollback restored.
        self.state.cache.clear();
        Ok(())
    }
}
