//! A full synchronisation: the snapshot replaces what the mirror knew (docs/design.md
//! section 5).
//!
//! [`FullSync::begin`] starts a new *generation* (persisted at once, with the mark that a full
//! sync is in progress: an interrupted one starts over). Every watched key of the snapshot is
//! written to the mirror with the new generation; a key whose data changed (or is new) gives an
//! upsert (on the very first sync only if its mapping's `initial_load` is `upsert`), an
//! unchanged one only gets its generation mark. A hash holding a `#` op is applied as the op
//! says ([`super::ops::OpState::found_in_snapshot`]). [`FullSync::finish`] sweeps: mirror entries of
//! older generations are gone from Redis, their rows are deleted. Memory stays bounded: one key
//! at a time, written in batches of [`SNAPSHOT_BATCH_KEYS`].

use bytes::Bytes;

use super::progress::SnapshotProgress;
use super::rows::row_event;
use super::snapshot_writer::SnapshotWriter;
use super::state::{CaptureState, ChangeCounts};
use crate::buffer::{Batch, FieldValue, MirrorCursor, MirrorValue, StoreError};
use crate::config::InitialLoad;
use crate::position::{ReplOffset, StreamPosition};
use crate::replication::rdb::{RdbEvent, ValueKind};

/// Snapshot keys written per batch.
pub const SNAPSHOT_BATCH_KEYS: usize = 1_000;

/// The watched key of the snapshot being read.
struct SnapshotKey {
    db: u32,
    key: Bytes,
    value: MirrorValue,
    empty: bool,
}

pub struct FullSync {
    /// The very first sync of this buffer (`initial_load` applies).
    first: bool,
    /// The offset of the snapshot (`+FULLRESYNC`), recorded with its changes.
    offset: ReplOffset,
    key: Option<SnapshotKey>,
    batch: Batch,
    keys_in_batch: usize,
    /// Changes in `batch`, for the metrics once it is written.
    counts: ChangeCounts,
    progress: SnapshotProgress,
    /// Whether the mirror held nothing when the sync began (a first load): no key then has a
    /// previous value to read back.
    mirror_was_empty: bool,
    /// Writes the batches while the next keys are read.
    writer: SnapshotWriter,
}

/// What a finished full sync did, for the log.
pub struct FullSyncSummary {
    pub keys: u64,
    pub keys_per_second: u64,
    pub swept: u64,
}

impl FullSync {
    /// Starts a new generation, durably; `total_keys` is the primary's key count (progress).
    pub fn begin(
        state: &mut CaptureState,
        total_keys: u64,
        offset: ReplOffset,
    ) -> Result<FullSync, StoreError> {
        state.stats.full_syncs += 1;
        metrics::counter!("writebehind_full_syncs_total").increment(1);
        let first = state.checkpoint.position.is_none();
        state.checkpoint.generation += 1;
        state.checkpoint.full_sync_in_progress = true;
        // The snapshot is written to the mirror outside working sets (see mirror_cache.rs).
        state.cache.clear();
        let mut batch = Batch::default();
        batch.put_checkpoint(&state.checkpoint);
        state.store.write(batch, true)?;
        // The snapshot says what Redis holds: pending `#` ops are found in it again.
        state.store.clear_raw()?;
        state.ops.forget_pending();
        let mirror_was_empty = state
            .store
            .mirror_scan(None, &MirrorCursor::default(), 1)?
            .entries
            .is_empty();
        Ok(FullSync {
            mirror_was_empty,
            writer: SnapshotWriter::start(state.store.clone())?,
            first,
            offset,
            key: None,
            batch: Batch::default(),
            keys_in_batch: 0,
            counts: ChangeCounts::default(),
            progress: SnapshotProgress::new(total_keys),
        })
    }

    /// One event of the snapshot.
    pub fn on_event(
        &mut self,
        state: &mut CaptureState,
        event: RdbEvent,
    ) -> Result<(), StoreError> {
        let generation = state.checkpoint.generation;
        match event {
            RdbEvent::KeyStart {
                db,
                key,
                kind,
                expire_at_ms,
                ..
            } => {
                let db = u32::try_from(db).unwrap_or(u32::MAX);
                self.key = state.mappings.watching(db, &key).map(|_| {
                    let mut value = if kind == ValueKind::Hash {
                        MirrorValue::hash(generation)
                    } else {
                        MirrorValue::other(generation)
                    };
                    value.expire_at_ms = expire_at_ms;
                    SnapshotKey {
                        db,
                        key,
                        value,
                        empty: false,
                    }
                });
            }
            RdbEvent::HashField(field) => {
                if let Some(current) = self.key.as_mut() {
                    current.value.fields.insert(
                        field.field,
                        FieldValue {
                            value: field.value,
                            expire_at_ms: field.expire_at_ms,
                        },
                    );
                }
            }
            RdbEvent::KeyEnd { empty } => {
                self.progress.key_done();
                if let Some(mut current) = self.key.take() {
                    current.empty = empty;
                    self.key_done(state, current)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn key_done(&mut self, state: &mut CaptureState, key: SnapshotKey) -> Result<(), StoreError> {
        let Some(mapping) = state.mappings.watching(key.db, &key.key).cloned() else {
            return Ok(());
        };
        let before = match self.mirror_was_empty {
            true => None,
            false => state.store.mirror(key.db, &key.key)?,
        };
        // Of a large hash (stored by field), the mapped fields: its row.
        let mut before = before;
        if let Some(value) = before.as_mut() {
            let columns = super::apply::columns(&mapping);
            state.store.see_fields(key.db, &key.key, value, columns)?;
        }
        let before_by_field = before.as_ref().is_some_and(|v| v.fields.window().is_some());
        let after = if key.empty { None } else { Some(key.value) };
        let emit = !self.first || mapping.initial_load == InitialLoad::Upsert;
        let mut acks = Vec::new();
        let (after, op_row) = match after {
            Some(value) if state.ops.holds_op(&value) => state.ops.found_in_snapshot(
                &mapping,
                (key.db, &key.key),
                value,
                emit,
                self.offset,
                &mut self.batch,
                &mut acks,
            ),
            other => (other, None),
        };
        // The op's row when it has one, else the difference with the mirror.
        let event = op_row.or_else(|| {
            emit.then(|| row_event(&mapping, &key.key, &before, &after, false))
                .flatten()
        });
        self.batch.put_acks(acks);
        let after_by_field = after.as_ref().is_some_and(|v| v.fields.stored_by_field());
        if before_by_field && !after_by_field {
            self.batch.clear_fields(key.db, &key.key);
        }
        match after {
            Some(value) => self.batch.put_mirror_value(key.db, &key.key, value),
            None if before.is_some() => self.batch.delete_mirror(key.db, &key.key),
            None => {}
        }
        if let Some(event) = event {
            state.append_unit(&mut self.batch, vec![event], self.offset, &mut self.counts);
        }
        self.keys_in_batch += 1;
        if self.keys_in_batch >= SNAPSHOT_BATCH_KEYS {
            self.keys_in_batch = 0;
            let mut batch = std::mem::take(&mut self.batch);
            batch.put_checkpoint(&state.checkpoint);
            self.writer.write(batch)?;
            std::mem::take(&mut self.counts).report();
        }
        Ok(())
    }

    /// The snapshot is complete: writes what is left, sweeps older generations, and records
    /// `position` (synced) as where the stream continues.
    pub fn finish(
        mut self,
        state: &mut CaptureState,
        position: StreamPosition,
    ) -> Result<FullSyncSummary, StoreError> {
        self.progress.finish();
        let mut batch = std::mem::take(&mut self.batch);
        batch.put_checkpoint(&state.checkpoint);
        self.writer.write(batch)?;
        // The sweep reads the whole mirror: every batch is written first.
        self.writer.finish()?;
        std::mem::take(&mut self.counts).report();
        let swept = sweep(state, position.offset)?;
        let mut batch = Batch::default();
        batch.add_replid(state.checkpoint.next_seq, &position.replid, position.offset);
        state.checkpoint.position = Some(position);
        state.checkpoint.full_sync_in_progress = false;
        batch.put_checkpoint(&state.checkpoint);
        batch.put_watched(&state.mappings.watched_keys());
        state.store.write(batch, true)?;
        state.cache.clear();
        Ok(FullSyncSummary {
            keys: self.progress.keys,
            keys_per_second: self.progress.rate(),
            swept,
        })
    }
}

/// Deletes the mirror entries of older generations (what the snapshot did not contain is gone
/// from Redis) with their rows; returns how many.
fn sweep(state: &mut CaptureState, offset: ReplOffset) -> Result<u64, StoreError> {
    let generation = state.checkpoint.generation;
    let mut cursor = Some(MirrorCursor::default());
    let mut swept = 0u64;
    while let Some(from) = cursor.take() {
        let page = state.store.mirror_scan(None, &from, SNAPSHOT_BATCH_KEYS)?;
        cursor = page.next;
        let mut batch = Batch::default();
        let mut counts = ChangeCounts::default();
        for (db, key, value) in page.entries {
            if value.generation >= generation {
                continue;
            }
            swept += 1;
            if value.fields.window().is_some() {
                batch.clear_fields(db, &key);
            }
            batch.delete_mirror(db, &key);
            if let Some(mapping) = state.mappings.watching(db, &key).cloned() {
                if let Some(event) = row_event(&mapping, &key, &Some(value), &None, false) {
                    state.append_unit(&mut batch, vec![event], offset, &mut counts);
                }
            }
        }
        batch.put_checkpoint(&state.checkpoint);
        state.store.write(batch, false)?;
        counts.report();
    }
    Ok(swept)
}
