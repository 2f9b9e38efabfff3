//! Applying the command stream: one [`StreamBatch`] holds everything that arrived together
//! (up to [`MAX_UNITS_PER_COMMIT`] units), applied to working sets of the mirror and of the raw
//! states, then written with one synced `WriteBatch` (group commit) holding mirror, changes,
//! acknowledgements and the checkpoint after the last unit. Only then is the offset reported to
//! the primary (`REPLCONF ACK`), so `WAIT 1` returns once a write is durably captured.
//!
//! A unit is a command or a `MULTI ... EXEC`; its row changes go to the change log as one unit.
//! A unit of the function library starts with its tag (`src/ack`): a completion is applied to
//! the raw state only, an atomic op decides the unit's row change and ack.

use std::sync::Arc;

use bytes::Bytes;

use super::command::Write;
use super::committer::Publication;
use super::mapping::Mappings;
use super::ops::apply_op;
use super::ops::OpSeen;
use super::primary::Primary;
use super::rows::{row_event, RowEvent};
use super::state::{CaptureState, ChangeCounts};
use super::working_set::{Flushed, MirrorView, WorkingSet};
use crate::ack::{parse_tag, Tag};
use crate::buffer::{Batch, EncodedChanges, KeyRef, NewAck, Store, StoreError};
use crate::position::{ChangeSeq, ReplOffset};
use crate::replication::stream::{Command, StreamEvent};

/// Units applied before a commit even if more are buffered (bounds memory and latency).
pub const MAX_UNITS_PER_COMMIT: usize = 10_000;

/// What a committed batch leaves for the write-back task.
pub struct Committed {
    /// Keys whose `#` op is to be completed in Redis.
    pub to_complete: Vec<(u32, Bytes)>,
    /// Whether acknowledgements were queued.
    pub acks_queued: bool,
    /// The seq of the last change written, when the batch wrote any.
    pub last_seq: Option<ChangeSeq>,
}

/// The stream events of one group commit.
pub struct StreamBatch {
    /// The mirror entries the batch touches.
    pub(super) ws: WorkingSet,
    /// The raw states of keys with a pending `#` op that the batch touches.
    pub(super) raw: WorkingSet,
    /// The row events of every unit, in order (one vector for the batch: a vector per unit was
    /// an allocation and a free per command).
    rows: Vec<RowEvent>,
    /// Per unit with row events: where its events end in `rows`, and the offset after it.
    unit_ends: Vec<(usize, ReplOffset)>,
    /// The events of the unit being applied (empty between units; kept for its room).
    unit_rows: Vec<RowEvent>,
    pub(super) acks: Vec<NewAck>,
    pub(super) units: usize,
    /// Dead letters whose changes this batch requeues (`requeue.rs`), deleted with it.
    pub(super) retired: Vec<ChangeSeq>,
    /// Row events of the long unit being applied, not yet numbered (`long_unit.rs`).
    pub(super) long_rows: Vec<RowEvent>,
    /// The long unit that ends in this batch: the index of its last rows in `unit_ends` and the
    /// seq of its first change (earlier parts of it may be written already).
    continued: Option<(usize, ChangeSeq)>,
    /// Whether a long unit written in parts ends in this batch (its undo entries go).
    pub(super) closes_unit: bool,
}

impl StreamBatch {
    pub fn new(store: Arc<Store>, view: MirrorView) -> StreamBatch {
        StreamBatch {
            ws: WorkingSet::viewing(store.clone(), view.clone()),
            raw: WorkingSet::raw(store, view),
            rows: Vec::new(),
            unit_ends: Vec::new(),
            unit_rows: Vec::new(),
            acks: Vec::new(),
            units: 0,
            retired: Vec::new(),
            long_rows: Vec::new(),
            continued: None,
            closes_unit: false,
        }
    }

    /// With room for `rows` row events and `keys` keys.
    pub fn with_room_for(mut self, rows: usize, keys: usize) -> StreamBatch {
        self.rows.reserve(rows);
        self.ws.reserve(keys);
        self
    }

    /// Whether it holds as many units as one commit may.
    pub fn is_full(&self) -> bool {
        self.units >= MAX_UNITS_PER_COMMIT
    }

    /// Whether it holds anything to commit.
    pub fn is_empty(&self) -> bool {
        self.units == 0 && self.unit_ends.is_empty()
    }

    /// Deletes, ahead of a `FLUSHALL`/`FLUSHDB` ending at `end`, the watched keys of one page of
    /// the mirror, as one unit recorded at the checkpoint's offset (see `flush_ahead` in
    /// mod.rs): keys with a pending `#` op and keys refreshed past the flush are left to the
    /// flush itself.
    pub fn delete_ahead_of_flush(
        &mut self,
        state: &mut CaptureState,
        page: Vec<(u32, Bytes, crate::buffer::MirrorValue)>,
        end: ReplOffset,
    ) -> Result<(), StoreError> {
        let mut rows = Vec::new();
        for (db, key, value) in page {
            if value.refreshed_through >= end || state.ops.is_pending(db, &key) {
                continue;
            }
            let Some(mapping) = state.mappings.watching(db, &key) else {
                continue;
            };
            let value = Some(value);
            rows.extend(row_event(mapping, &key, &value, &None, false));
            // Seeded with what the page read, so that deleting it reads nothing more.
            self.ws.seed(db, &key, value);
            self.ws.set(db, &key, None)?;
        }
        self.push_unit(rows, state.offset());
        Ok(())
    }

    /// The state of `key`, watched by `mapping`, as of this batch (of a large hash, with its
    /// mapped fields loaded).
    pub fn mirror_state(
        &mut self,
        mapping: &super::mapping::Mapping,
        key: &Bytes,
    ) -> Result<Option<crate::buffer::MirrorValue>, StoreError> {
        self.ws
            .see_fields(mapping.db, key, mapping.mapped_fields())?;
        self.ws.get(mapping.db, key)
    }

    /// Appends row events as one unit recorded at `offset`.
    pub fn push_unit(&mut self, mut rows: Vec<RowEvent>, offset: ReplOffset) {
        if !rows.is_empty() {
            self.rows.append(&mut rows);
            self.unit_ends.push((self.rows.len(), offset));
        }
    }

    /// Appends the last row events of a long unit whose first change is `unit`, recorded at
    /// `offset` (its end): numbered on from the changes already written of it (`long_unit.rs`).
    pub(super) fn push_long_end(
        &mut self,
        rows: Vec<RowEvent>,
        offset: ReplOffset,
        unit: ChangeSeq,
    ) {
        if !rows.is_empty() {
            self.continued = Some((self.unit_ends.len(), unit));
            self.push_unit(rows, offset);
        }
    }

    /// Deletes a dead letter with this batch's write.
    pub fn retire_dead_letter(&mut self, seq: ChangeSeq) {
        self.retired.push(seq);
    }

    /// Looks up in the mirror cache, in one go, the entries of the watched keys that the plain
    /// hash writes at the head of `events` (the events read ahead, in order) will touch, before
    /// they are applied ([`WorkingSet::preload`]).
    pub fn preload<'e>(
        &mut self,
        mappings: &Mappings,
        events: impl IntoIterator<Item = &'e StreamEvent>,
    ) {
        self.ws.preload(keys_read_ahead(mappings, events));
    }

    /// Applies one stream event; returns a reason when a full resync is needed instead (the
    /// batch must then be dropped: a unit may be half applied).
    pub async fn apply(
        &mut self,
        state: &mut CaptureState,
        primary: &mut Primary,
        event: &StreamEvent,
    ) -> Result<Option<String>, StoreError> {
        // The unit's own events first (an op replaces the events of its unit for its row, never
        // those of earlier units), in a vector kept from unit to unit.
        let mut rows = std::mem::take(&mut self.unit_rows);
        let applied = self.apply_event(state, primary, event, &mut rows).await;
        // The events of a unit not wholly applied are never numbered.
        if matches!(applied, Ok(None)) && !rows.is_empty() {
            self.rows.append(&mut rows);
            self.unit_ends.push((self.rows.len(), event.end()));
        }
        rows.clear();
        self.unit_rows = rows;
        applied
    }

    /// [`StreamBatch::apply`], the unit's row events put in `rows` (empty when called).
    async fn apply_event(
        &mut self,
        state: &mut CaptureState,
        primary: &mut Primary,
        event: &StreamEvent,
        rows: &mut Vec<RowEvent>,
    ) -> Result<Option<String>, StoreError> {
        self.units += 1;
        // The position moves in place: this runs per command, and a copy of it copies the
        // replication ID (an allocation).
        let Some(position) = state.checkpoint.position.as_mut() else {
            return Ok(None);
        };
        let (commands, db) = match event {
            StreamEvent::Command(command) => (std::slice::from_ref(command), command.db),
            StreamEvent::Transaction { commands, db, .. } => (commands.as_slice(), *db),
            StreamEvent::Select { db, end } => {
                (position.offset, position.db) = (*end, *db);
                return Ok(None);
            }
            _ => {
                position.offset = event.end();
                return Ok(None);
            }
        };
        let mut refresh = Vec::new();
        if let Some(reason) = self.apply_unit(state, commands, event.end(), rows, &mut refresh)? {
            return Ok(Some(reason));
        }
        // Most units refresh nothing: no future is built for them (this runs per command).
        if !refresh.is_empty() {
            let Some(replid) = state.checkpoint.position.as_ref().map(|p| p.replid.clone()) else {
                return Ok(None);
            };
            if let Some(reason) = self
                .refresh_keys(state, primary, refresh, &replid, rows)
                .await?
            {
                return Ok(Some(reason));
            }
        }
        state.stats.units += 1;
        if let Some(position) = state.checkpoint.position.as_mut() {
            (position.offset, position.db) = (event.end(), db);
        }
        Ok(None)
    }

    /// Reads `keys` from the primary (after their unit: the commands of the unit wrote what
    /// this service does not model) and applies what it holds; returns a reason when a full
    /// resync is needed instead.
    pub(super) async fn refresh_keys(
        &mut self,
        state: &mut CaptureState,
        primary: &mut Primary,
        keys: Vec<(u32, Bytes)>,
        replid: &crate::position::ReplId,
        rows: &mut Vec<RowEvent>,
    ) -> Result<Option<String>, StoreError> {
        for (db, key) in keys {
            let when = (state.checkpoint.generation, state.clock.now());
            match primary.read_key_retrying(db, &key, replid, when).await {
                Some(value) => self.refreshed(state, db, &key, value, rows)?,
                None => {
                    return Ok(Some(
                        "the primary's replication ID changed while reading a key".into(),
                    ))
                }
            }
        }
        Ok(None)
    }

    /// Applies the commands of one unit to the raw states and the mirror; row events go to
    /// `rows`, keys to read from the primary to `refresh`.
    fn apply_unit(
        &mut self,
        state: &mut CaptureState,
        commands: &[Command],
        end: ReplOffset,
        rows: &mut Vec<RowEvent>,
        refresh: &mut Vec<(u32, Bytes)>,
    ) -> Result<Option<String>, StoreError> {
        // A unit of the function library starts with its tag (src/ack), believed only when it
        // cannot be a forgery.
        let tag = match commands.first() {
            Some(first) if state.ops.enabled => parse_tag(commands).and_then(|(tag, taken)| {
                state
                    .ops
                    .believe(tag, first.db, &commands[taken..])
                    .map(|tag| (first.db, tag, taken))
            }),
            _ => None,
        };
        let (tag, commands) = match tag {
            Some((db, tag, taken)) => (Some((db, tag)), &commands[taken..]),
            None => (None, commands),
        };
        let own_completion = matches!(tag, Some((_, Tag::Completion { .. })));
        if let Some(reason) =
            self.apply_commands(state, commands, (end, own_completion), rows, refresh)?
        {
            return Ok(Some(reason));
        }
        if let Some((db, Tag::Op { op, key })) = tag {
            let after = self.ws.get(db, &key)?;
            if !state.ops.op_took_effect(&op, &key, &after) {
                return Ok(None);
            }
            let mapping = state.mappings.watching(db, &key).map(|m| &**m);
            state.ops.atomic(
                mapping,
                &mut self.ws,
                (db, key),
                op,
                rows,
                &mut self.acks,
                end,
            )?;
        }
        Ok(None)
    }

    /// Applies `commands` (of a unit ending at `end`, or a part of a long one) to the raw
    /// states and the mirror; `own_completion`: they are the function library's completion of
    /// a `#` op, which only brings Redis to the mirror's state.
    pub(super) fn apply_commands(
        &mut self,
        state: &mut CaptureState,
        commands: &[Command],
        (end, own_completion): (ReplOffset, bool),
        rows: &mut Vec<RowEvent>,
        refresh: &mut Vec<(u32, Bytes)>,
    ) -> Result<Option<String>, StoreError> {
        let now = state.clock.now();
        for command in commands {
            let write = Write::parse(command, now);
            if own_completion {
                // It brings Redis to the mirror's state: only the raw state changes.
                state
                    .ops
                    .apply_raw(state, &mut self.ws, &mut self.raw, command, &write)?;
                continue;
            }
            if state.ops.may_touch_raw(command, &write, &self.raw) {
                state
                    .ops
                    .apply_raw(state, &mut self.ws, &mut self.raw, command, &write)?;
            }
            let needs =
                state
                    .applier(state.ops.enabled)
                    .apply(&mut self.ws, command, &write, rows)?;
            if let Some(reason) = needs.full_resync {
                return Ok(Some(reason));
            }
            if let Some(name) = needs.unknown_command {
                state.stats.unknown_commands += 1;
                tracing::warn!(command = %name, "a write this service does not model touched a watched key; reading the key from the primary");
            }
            refresh.extend(needs.refresh);
            if let Some(seen) = needs.op {
                self.op_seen(state, seen, end);
            }
        }
        Ok(None)
    }

    fn op_seen(&mut self, state: &mut CaptureState, seen: OpSeen, end: ReplOffset) {
        state.ops.seen(&mut self.raw, seen, end, &mut self.acks);
    }

    /// A key read from the primary replaces the mirror's value (and the raw state, which is
    /// what Redis holds); a `#` op in it is applied now, without an ack (it may have been seen).
    pub(super) fn refreshed(
        &mut self,
        state: &mut CaptureState,
        db: u32,
        key: &Bytes,
        value: Option<crate::buffer::MirrorValue>,
        rows: &mut Vec<RowEvent>,
    ) -> Result<(), StoreError> {
        state.stats.refreshed_keys += 1;
        let mapping = state.mappings.watching(db, key);
        if let Some(mapping) = mapping {
            self.ws.see_fields(db, key, mapping.mapped_fields())?;
        }
        let before = self.ws.get(db, key)?;
        let mut value = value;
        let op_mapping = mapping.filter(|_| value.as_ref().is_some_and(|v| state.ops.holds_op(v)));
        if op_mapping.is_some() || self.raw.contains(db, key) || state.ops.is_pending(db, key) {
            // What was read is what Redis holds.
            self.raw.set(db, key, value.clone())?;
        }
        if let (Some(mapping), Some(v)) = (op_mapping, value.clone()) {
            value = apply_op(mapping, db, key, v).0;
        }
        if let Some(mapping) = mapping {
            if let Some(event) = row_event(mapping, key, &before, &value, false) {
                rows.push(event);
            }
        }
        self.ws.set(db, key, value)
    }

    /// Turns the batch into one write with the checkpoint, for the committer.
    pub fn commit(mut self, state: &mut CaptureState) -> Result<Prepared, StoreError> {
        let mut batch = Batch::default();
        let acks_queued = !self.acks.is_empty();
        let to_complete = state
            .ops
            .flush_raw(&mut self.ws, &mut self.raw, &mut batch)?;
        state.last_batch_keys = self.ws.len().min(super::state::ROWS_HINT_LIMIT);
        let flushed = self.ws.flush_into(&mut batch);
        let first_seq = state.checkpoint.next_seq;
        let mut counts = ChangeCounts::default();
        state.last_batch_rows = self.rows.len().min(super::state::ROWS_HINT_LIMIT);
        let mut changes = EncodedChanges::with_capacity(self.rows.len());
        let mut rows = self.rows.into_iter();
        let mut start = 0;
        for (i, (end, offset)) in self.unit_ends.into_iter().enumerate() {
            let unit_rows = rows.by_ref().take(end - start);
            start = end;
            match self.continued {
                // The rest of a long unit, some of which may be written already.
                Some((at, unit)) if at == i => {
                    state.number_rows(&mut changes, unit_rows, (unit, offset, true), &mut counts)
                }
                _ => state.number_unit(&mut changes, unit_rows, offset, &mut counts),
            }
        }
        debug_assert_eq!(rows.len(), 0, "every row event belongs to a unit");
        if self.closes_unit {
            batch.close_unit();
        }
        batch.put_encoded_changes(changes);
        batch.put_acks(self.acks);
        for seq in self.retired {
            batch.delete_dead_letter(seq);
        }
        batch.put_checkpoint(&state.checkpoint);
        state.stats.commits += 1;
        let next = state.checkpoint.next_seq;
        let wait = batch.touches_raw();
        Ok(Prepared {
            batch,
            flushed,
            publication: Publication {
                committed: Committed {
                    to_complete,
                    acks_queued,
                    last_seq: (next > first_seq).then(|| next.previous()).flatten(),
                },
                offset: state.offset(),
                counts,
            },
            wait,
        })
    }
}

/// A batch ready for the committer.
pub struct Prepared {
    pub batch: Batch,
    pub flushed: Flushed,
    pub publication: Publication,
    /// Whether capture must wait for the write (it writes raw states, which are never in
    /// flight: see committer.rs).
    pub wait: bool,
}

/// Whether `command` writes fields of one hash and nothing else (`HSET`, `HMSET`, `HSETNX`,
/// `HDEL`, `HINCRBY`, `HINCRBYFLOAT`): all it loads is that key's mirror entry.
fn is_plain_hash_write(command: &Command) -> bool {
    const PLAIN: [&[u8]; 6] = [
        b"hset",
        b"hmset",
        b"hsetnx",
        b"hdel",
        b"hincrby",
        b"hincrbyfloat",
    ];
    command.args.len() >= 3
        && PLAIN
            .iter()
            .any(|name| command.args[0].eq_ignore_ascii_case(name))
}

/// The watched keys of the plain hash writes at the head of `events`: it stops at the first
/// other event (a flush, a rename or a transaction decides for itself what it loads and when).
fn keys_read_ahead<'e, 'm, I: IntoIterator<Item = &'e StreamEvent>>(
    mappings: &'m Mappings,
    events: I,
) -> impl Iterator<Item = KeyRef<'e>> + use<'e, 'm, I> {
    events
        .into_iter()
        .map_while(|event| match event {
            StreamEvent::Command(command) if is_plain_hash_write(command) => Some(command),
            _ => None,
        })
        .filter_map(|command| {
            let key = command.args.get(1)?;
            mappings.watching(command.db, key)?;
            Some(KeyRef {
                db: command.db,
                key,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn mappings() -> Mappings {
        let text = "[source]\nurl = \"redis://127.0.0.1:1\"\n[backends.db]\nurl = \"sqlite://x\"\n[[mappings]]\nname = \"P\"\nprefix = \"p\"\nbackend = \"db\"\ntable = \"t\"\nkey_column = \"id\"\n[mappings.columns]\nn = \"n\"\n";
        Mappings::new(&Config::parse(text, &|_| None).unwrap().mappings)
    }

    /// Only the watched keys of the plain hash writes at the head of what was read ahead are
    /// looked up: from the first other command on, each command loads what it needs when it
    /// runs.
    #[test]
    fn read_ahead_looks_up_the_watched_keys_of_the_hash_writes_before_any_other_command() {
        let events = [
            &["HSET", "p:1", "n", "2"][..],
            &["hincrby", "p:2", "n", "1"],
            &["HSET", "q:1", "n", "2"],
            &["DEL", "p:3"],
            &["HSET", "p:3", "n", "2"],
        ]
        .map(|words| StreamEvent::Command(Command::from_words(words, 0, ReplOffset(1))));
        let mappings = mappings();
        let keys: Vec<&[u8]> = keys_read_ahead(&mappings, events.iter())
            .map(|key| key.key)
            .collect();
        assert_eq!(
            keys,
            [&b"p:1"[..], b"p:2"],
            "q:1 is not watched; p:3 is after a DEL"
        );
    }
}
