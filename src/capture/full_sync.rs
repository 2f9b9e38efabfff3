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
use crate::ack::OP_FIELD;
use crate::buffer::{
    Batch, EncodedChanges, FieldValue, Fields, MirrorCursor, MirrorValue, StoreError,
};
use crate::config::InitialLoad;
use crate::position::{ReplOffset, StreamPosition};
use crate::replication::rdb::{RdbEvent, ValueKind};

/// Snapshot keys written per batch.
pub const SNAPSHOT_BATCH_KEYS: usize = 1_000;

/// Fields of a snapshot hash gathered before they are written by field: a hash larger than
/// this is never held whole (docs/design.md 5.3 "Large hashes").
pub const SNAPSHOT_FIELD_PAGE: usize = 4096;

/// The watched key of the snapshot being read.
struct SnapshotKey {
    db: u32,
    key: Bytes,
    /// Its value; of a hash written a page at a time, the fields of the page being gathered.
    value: MirrorValue,
    empty: bool,
    /// Set once the first page of a large hash is written.
    paged: Option<Paged>,
}

/// A large hash of the snapshot written a page of fields at a time.
struct Paged {
    /// The key's mirror value before the snapshot, with its mapped fields: read before the
    /// first page is written (the pages replace its fields).
    before: Option<MirrorValue>,
    /// Fields written.
    written: usize,
    /// The names whose values are kept in memory: the mapped fields and `#` (its row, its op).
    names: Vec<Bytes>,
    /// Their values, as the pages passed.
    kept: Vec<(Bytes, FieldValue)>,
}

pub struct FullSync {
    /// The very first sync of this buffer (`initial_load` applies).
    first: bool,
    /// The offset of the snapshot (`+FULLRESYNC`), recorded with its changes.
    offset: ReplOffset,
    key: Option<SnapshotKey>,
    batch: Batch,
    /// The changes of `batch`, in blocks (one entry of the change log holds many keys'
    /// changes); put into it when it is handed over.
    changes: EncodedChanges,
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
            changes: EncodedChanges::with_capacity(SNAPSHOT_BATCH_KEYS),
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
                        paged: None,
                    }
                });
            }
            RdbEvent::HashField(field) => {
                let Some(current) = self.key.as_mut() else {
                    return Ok(());
                };
                current.value.fields.insert(
                    field.field,
                    FieldValue {
                        value: field.value,
                        expire_at_ms: field.expire_at_ms,
                    },
                );
                if current.value.fields.len() >= SNAPSHOT_FIELD_PAGE {
                    self.write_page(state)?;
                }
            }
            RdbEvent::KeyEnd { empty } => {
                self.progress.key_done();
                if self.key.as_ref().is_some_and(|k| k.paged.is_some()) {
                    self.write_page(state)?;
                }
                if let Some(mut current) = self.key.take() {
                    current.empty = empty;
                    if let Some(paged) = current.paged.take() {
                        return self.paged_key_done(state, current, paged);
                    }
                    self.key_done(state, current, None)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Writes the fields gathered of the current key as a page of a hash stored by field
    /// (the first page reads the key's value before the snapshot and clears its fields).
    fn write_page(&mut self, state: &mut CaptureState) -> Result<(), StoreError> {
        let Some(current) = self.key.as_mut() else {
            return Ok(());
        };
        let (db, key) = (current.db, current.key.clone());
        if current.paged.is_none() {
            let Some(mapping) = state.mappings.watching(db, &key) else {
                return Ok(());
            };
            let columns = mapping.mapped_fields();
            let before = match self.mirror_was_empty {
                true => None,
                false => state.store.mirror_with_fields(db, &key, columns)?,
            };
            let mut names: Vec<Bytes> = mapping.columns.iter().map(|(f, _)| f.clone()).collect();
            names.push(Bytes::from_static(OP_FIELD));
            // Whatever the key held (or an interrupted sync left) is replaced.
            self.batch.clear_fields(db, &key);
            current.paged = Some(Paged {
                before,
                written: 0,
                names,
                kept: Vec::new(),
            });
        }
        let page = std::mem::take(&mut current.value.fields);
        if let Some(paged) = current.paged.as_mut() {
            for (name, value) in &page {
                if paged.names.contains(name) {
                    paged.kept.push((name.clone(), value.clone()));
                }
            }
            paged.written += page.len();
        }
        self.batch.put_fields(db, &key, page);
        // Handed over at once: a batch never holds more than a page of one hash.
        self.hand_over(state)
    }

    /// Hands the batch, its changes and the checkpoint (whose next seq follows them) to the
    /// writer.
    fn hand_over(&mut self, state: &CaptureState) -> Result<(), StoreError> {
        let mut batch = std::mem::take(&mut self.batch);
        let changes = std::mem::replace(
            &mut self.changes,
            EncodedChanges::with_capacity(SNAPSHOT_BATCH_KEYS),
        );
        batch.put_encoded_changes(changes);
        batch.put_checkpoint(&state.checkpoint);
        self.writer.write(batch)
    }

    /// The end of a large hash written in pages: its header, its row, its op.
    fn paged_key_done(
        &mut self,
        state: &mut CaptureState,
        mut key: SnapshotKey,
        paged: Paged,
    ) -> Result<(), StoreError> {
        let mut fields = Fields::unseen(paged.written);
        if let Some(window) = fields.window_mut() {
            for (name, value) in paged.kept {
                window.see(name, Some(value));
            }
            for name in paged.names {
                window.see(name, None);
            }
        }
        key.value.fields = fields;
        if state.ops.holds_op(&key.value) {
            // Its op is completed against the whole hash: read back once every page is written.
            self.hand_over(state)?;
            self.writer.finish()?;
            self.writer = SnapshotWriter::start(state.store.clone())?;
            key.value = state.store.whole(key.db, &key.key, key.value)?;
        }
        self.key_done(state, key, Some(paged.before))
    }

    /// The end of a watched key of the snapshot; `before`: its value before the snapshot when
    /// already read (a key written in pages), else read here.
    fn key_done(
        &mut self,
        state: &mut CaptureState,
        key: SnapshotKey,
        before: Option<Option<MirrorValue>>,
    ) -> Result<(), StoreError> {
        let Some(mapping) = state.mappings.watching(key.db, &key.key).cloned() else {
            return Ok(());
        };
        let paged = before.is_some();
        let before = match before {
            Some(before) => before,
            None if self.mirror_was_empty => None,
            // Of a large hash (stored by field), the mapped fields: its row.
            None => {
                let columns = mapping.mapped_fields();
                state.store.mirror_with_fields(key.db, &key.key, columns)?
            }
        };
        // (A key written in pages cleared its fields with its first page.)
        let before_by_field =
            !paged && before.as_ref().is_some_and(|v| v.fields.window().is_some());
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
        // A hash stored by field (before, or written in pages now) is not compared with the
        // mirror: its pages are written before its header and its row, so after a crash in a
        // full sync its field range holds the interrupted sync's values under the older header
        // while the table still holds the older row; compared with that, a restarted sync
        // would find nothing to write. Its row is written whole (one upsert per such hash and
        // sync). A row that goes is still deleted.
        let compared = match &after {
            Some(_) if paged || before_by_field => &None,
            _ => &before,
        };
        // The op's row when it has one, else the difference with the mirror.
        let event = op_row.or_else(|| {
            emit.then(|| row_event(&mapping, &key.key, compared, &after, false))
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
            let events = std::iter::once(event);
            state.number_unit(&mut self.changes, events, self.offset, &mut self.counts);
        }
        self.keys_in_batch += 1;
        if self.keys_in_batch >= SNAPSHOT_BATCH_KEYS {
            self.keys_in_batch = 0;
            self.hand_over(state)?;
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
        self.hand_over(state)?;
        // The sweep reads the whole mirror: every batch is written first.
        self.writer.finish()?;
        std::mem::take(&mut self.counts).report();
        // A mirror empty when the sync began holds only what this sync wrote: nothing older
        // to sweep (on a first load, reading every entry back took a third of capture's
        // instructions).
        let swept = match self.mirror_was_empty {
            true => 0,
            false => sweep(state, position.offset)?,
        };
        let mut batch = Batch::default();
        batch.add_replid(state.checkpoint.next_seq, &position.replid, position.offset);
        state.checkpoint.position = Some(position);
        state.checkpoint.full_sync_in_progress = false;
        batch.put_checkpoint(&state.checkpoint);
        batch.put_watched(&state.mappings.watched_keys());
        // Written with `sync` (its position is read once on disk), which syncs the sweep's
        // deletions before it and then shows them to sinks.
        state.store.write_synced(batch)?;
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
        let page = state
            .store
            .mirror_scan_older(generation, &from, SNAPSHOT_BATCH_KEYS)?;
        cursor = page.next;
        if page.entries.is_empty() {
            continue;
        }
        let mut batch = Batch::default();
        let mut changes = EncodedChanges::with_capacity(page.entries.len());
        let mut counts = ChangeCounts::default();
        for (db, key, value) in page.entries {
            swept += 1;
            if value.fields.window().is_some() {
                batch.clear_fields(db, &key);
            }
            batch.delete_mirror(db, &key);
            if let Some(mapping) = state.mappings.watching(db, &key).cloned() {
                if let Some(event) = row_event(&mapping, &key, &Some(value), &None, false) {
                    state.number_unit(&mut changes, std::iter::once(event), offset, &mut counts);
                }
            }
        }
        batch.put_encoded_changes(changes);
        batch.put_checkpoint(&state.checkpoint);
        // Hidden from sinks until the full sync's last write syncs it.
        state.store.write_unsynced(batch)?;
        counts.report();
    }
    Ok(swept)
}
