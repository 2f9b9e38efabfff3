//! The state of `#` ops in capture (docs/design.md section 4; `src/ack` explains the completion).
//!
//! A watched hash written with a `#` field holds, in the mirror, the state the op gives; what
//! Redis really holds (the `#` field included) is kept as the key's *raw state* (the buffer's
//! `raw` column family) until the write-back task has completed the op in Redis. [`OpState`]
//! knows which keys have a raw state ([`PendingKeys`]) and applies every later command to it, so
//! the raw state follows Redis exactly; [`OpState::flush_raw`] decides at commit which keys
//! still need completing.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;

use super::command::Write;
use super::mapping::Mapping;
use super::rows::RowEvent;
use super::state::CaptureState;
use super::working_set::WorkingSet;
use std::sync::Arc;

use crate::ack::{OpField, OpKind, Tag, Writeback, INVALID_OP, OP_FIELD};
use crate::buffer::{Batch, HashOp, MirrorKind, MirrorValue, NewAck, RowChange, StoreError};
use crate::position::ReplOffset;
use crate::replication::stream::Command;

/// A `#` op found in a watched hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpSeen {
    pub db: u32,
    pub key: Bytes,
    /// The op character (`None`: invalid).
    pub kind: Option<OpKind>,
    /// What Redis holds: the hash with its `#` field, until the op is completed in Redis.
    pub raw: MirrorValue,
    /// An acknowledgement due as soon as the change is captured: the uuid, and the failure.
    pub ack_now: Option<(Bytes, Option<String>)>,
}

/// Applies the op of `raw`, a watched hash holding a `#` field (docs/design.md section 4). Returns
/// the mirror's new value (the state the op gives), the row event, and what was seen.
pub fn apply_op(
    mapping: &Mapping,
    db: u32,
    key: &Bytes,
    raw: MirrorValue,
) -> (Option<MirrorValue>, Option<RowEvent>, OpSeen) {
    let mut kept = raw.clone();
    let value = kept
        .fields
        .remove(OP_FIELD)
        .map(|f| f.value)
        .unwrap_or_default();
    let op = OpField::parse(&value);
    let after = match op.kind {
        Some(kind) if kind.deletes_key() => None,
        _ => (!kept.fields.is_empty()).then_some(kept),
    };
    let (event, ack_now) = op_effects(mapping, db, key, &op, &after);
    let seen = OpSeen {
        db,
        key: key.clone(),
        kind: op.kind,
        raw,
        ack_now,
    };
    (after, event, seen)
}

/// What an op does beyond Redis, given the key's state after it: the row event (`=`: the full
/// row, also when nothing mapped changed; `~`: a delete), carrying the uuid to acknowledge
/// after the commit; otherwise the acknowledgement due once the change is captured (`failed`
/// for an invalid op).
pub fn op_effects(
    mapping: &Mapping,
    db: u32,
    key: &Bytes,
    op: &OpField,
    after: &Option<MirrorValue>,
) -> (Option<RowEvent>, Option<(Bytes, Option<String>)>) {
    let row = match op.kind {
        Some(OpKind::Write) => after
            .as_ref()
            .filter(|v| v.kind == MirrorKind::Hash && !v.fields.is_empty())
            .map(|v| RowChange::Upsert {
                columns: mapping.row_image(&v.fields),
            }),
        Some(OpKind::Delete) => Some(RowChange::Delete),
        _ => None,
    };
    match (row, op.kind) {
        (Some(row), Some(kind)) => {
            let event = RowEvent {
                mapping: mapping.name.clone(),
                row_id: mapping.row_id(key),
                row: row.into(),
                op: op.uuid.clone().map(|uuid| HashOp {
                    op: kind.as_char(),
                    uuid,
                    db,
                    key: key.clone(),
                }),
            };
            (Some(event), None)
        }
        _ => {
            let failure = op.kind.is_none().then(|| INVALID_OP.to_string());
            (None, op.uuid.clone().map(|uuid| (uuid, failure)))
        }
    }
}

/// Keys whose `#` op is not completed in Redis (the buffer's `raw` entries), with how many
/// databases hold each name: a cheap, conservative test of whether a command may touch one.
#[derive(Default)]
pub struct PendingKeys {
    keys: HashSet<(u32, Bytes)>,
    names: HashMap<Bytes, usize>,
}

impl PendingKeys {
    fn insert(&mut self, db: u32, key: &Bytes) {
        if self.keys.insert((db, key.clone())) {
            *self.names.entry(key.clone()).or_default() += 1;
        }
    }

    /// Returns whether it was pending.
    fn remove(&mut self, db: u32, key: &Bytes) -> bool {
        if !self.keys.remove(&(db, key.clone())) {
            return false;
        }
        if let Some(count) = self.names.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                self.names.remove(key);
            }
        }
        true
    }

    fn contains(&self, db: u32, key: &Bytes) -> bool {
        self.keys.contains(&(db, key.clone()))
    }

    /// Whether a pending key has this name, in any database.
    fn names(&self, name: &[u8]) -> bool {
        self.names.contains_key(name)
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn clear(&mut self) {
        self.keys.clear();
        self.names.clear();
    }
}

/// Whether `#` is the op field, and the keys with a pending op.
pub struct OpState {
    /// `[acks] enabled`: whether `#` is the op field at all.
    pub enabled: bool,
    pending: PendingKeys,
    /// The completions the write-back task issued (to tell them from forged tags).
    writeback: Arc<Writeback>,
}

/// Whether every command of a tagged unit writes `key` in `db` alone, with one of `allowed`.
fn writes_only(commands: &[Command], db: u32, key: &Bytes, allowed: &[&str]) -> bool {
    commands
        .iter()
        .all(|c| c.db == db && c.args.get(1) == Some(key) && allowed.contains(&c.name().as_str()))
}

fn forged(kind: &'static str, key: &Bytes, why: &str) {
    tracing::warn!(kind, key = %String::from_utf8_lossy(key), why, "a unit tagged as this service's own write is not; applied as the client's commands");
    metrics::counter!("writebehind_forged_tags_total", "kind" => kind).increment(1);
}

fn ack(
    db: u32,
    key: Bytes,
    (uuid, failure): (Bytes, Option<String>),
    offset: ReplOffset,
) -> NewAck {
    NewAck {
        db,
        key,
        uuid,
        failure,
        offset,
    }
}

impl OpState {
    /// The pending keys are those with a raw state in the buffer.
    pub fn new(enabled: bool, raw_keys: Vec<(u32, Bytes)>, writeback: Arc<Writeback>) -> OpState {
        let mut pending = PendingKeys::default();
        for (db, key) in raw_keys {
            pending.insert(db, &key);
        }
        OpState {
            enabled,
            pending,
            writeback,
        }
    }

    /// The tag of a unit (its first command) when it is believed (src/ack explains when): a
    /// completion the write-back task issued that writes its key alone, or an op whose unit
    /// writes its key alone. A forged tag is counted and the unit is the client's own.
    pub fn believe(&self, tag: Tag, db: u32, commands: &[Command]) -> Option<Tag> {
        match &tag {
            Tag::Completion { key, nonce } => {
                let shaped = writes_only(
                    commands,
                    db,
                    key,
                    &["HSET", "HDEL", "DEL", "UNLINK", "PERSIST"],
                );
                if shaped && self.writeback.take_issued(db, key, nonce) {
                    return Some(tag);
                }
                forged(
                    "complete",
                    key,
                    if shaped {
                        "no completion of this service has this nonce"
                    } else {
                        "the unit writes more than the key"
                    },
                );
                None
            }
            Tag::Op { key, .. } => {
                if writes_only(commands, db, key, &["HSET", "DEL", "UNLINK"]) {
                    return Some(tag);
                }
                forged("op", key, "the unit writes more than the key");
                None
            }
        }
    }

    /// After an `op` unit's commands: a `-` or `~` that left the key in place is not what the
    /// library does (forged).
    pub fn op_took_effect(&self, op: &OpField, key: &Bytes, after: &Option<MirrorValue>) -> bool {
        let deletes = op.kind.is_some_and(|k| k.deletes_key());
        if deletes && after.is_some() {
            forged("op", key, "the key still exists after a deleting op");
            return false;
        }
        true
    }

    /// Every key with a pending op.
    pub fn pending_keys(&self) -> impl Iterator<Item = &(u32, Bytes)> {
        self.pending.keys.iter()
    }

    pub fn is_pending(&self, db: u32, key: &Bytes) -> bool {
        self.pending.contains(db, key)
    }

    /// A full sync starts: the snapshot says what Redis holds, pending ops are found in it again.
    pub fn forget_pending(&mut self) {
        self.pending.clear();
    }

    /// Whether `command` may touch a key whose raw state is tracked (cheap and conservative:
    /// any argument naming such a key, or a flush).
    pub fn may_touch_raw(&self, command: &Command, write: &Write, raw: &WorkingSet) -> bool {
        if self.pending.is_empty() && raw.is_empty() {
            return false;
        }
        if matches!(write, Write::Flush { .. }) {
            return true;
        }
        command
            .args
            .iter()
            .skip(1)
            .any(|a| self.pending.names(a) || raw.holds_name(a))
    }

    /// Applies `write` to the raw states (what Redis really holds), before the mirror sees it.
    pub fn apply_raw(
        &self,
        state: &CaptureState,
        ws: &mut WorkingSet,
        raw: &mut WorkingSet,
        command: &Command,
        write: &Write,
    ) -> Result<(), StoreError> {
        if let Write::Flush { db } = write {
            let doomed: Vec<(u32, Bytes)> = self
                .pending
                .keys
                .iter()
                .filter(|(d, _)| db.is_none_or(|db| db == *d))
                .cloned()
                .collect();
            for (d, key) in doomed {
                raw.set(d, &key, None)?;
            }
            return Ok(());
        }
        // Every key the write names starts from the mirror's state before this command, unless
        // its raw state differs.
        for (db, key) in write.keys(command.db) {
            if state.mappings.watching(db, key).is_some() && !raw.contains(db, key) {
                let value = match state.store.raw(db, key)? {
                    Some(value) => Some(value),
                    None => ws.get_whole(db, key)?,
                };
                raw.seed(db, key, value);
            }
        }
        if matches!(write, Write::Other) {
            // Which arguments are keys only the primary's command table says: any may be.
            for key in command.args.iter().skip(1) {
                if state.mappings.watching(command.db, key).is_some()
                    && !raw.contains(command.db, key)
                {
                    let value = match state.store.raw(command.db, key)? {
                        Some(value) => Some(value),
                        None => ws.get_whole(command.db, key)?,
                    };
                    raw.seed(command.db, key, value);
                }
            }
        }
        let mut ignored = Vec::new();
        state
            .applier(false)
            .apply(raw, command, write, &mut ignored)?;
        Ok(())
    }

    /// A `#` op written with a plain command: Redis holds `seen.raw` until the op is completed.
    pub fn seen(
        &mut self,
        raw: &mut WorkingSet,
        seen: OpSeen,
        offset: ReplOffset,
        acks: &mut Vec<NewAck>,
    ) {
        let op = seen.kind.map(|k| (k.as_char() as char).to_string());
        metrics::counter!("writebehind_ops_total", "op" => op.unwrap_or_else(|| "invalid".into()))
            .increment(1);
        // When the key's raw state was already tracked, the raw pass has applied this command.
        if !raw.contains(seen.db, &seen.key) {
            raw.seed(seen.db, &seen.key, Some(seen.raw));
        }
        if let Some(due) = seen.ack_now {
            acks.push(ack(seen.db, seen.key, due, offset));
        }
    }

    /// A unit of the atomic entry point `writebehind_hset`: its commands already applied the
    /// op to Redis; the row change and the ack follow the op (docs/design.md section 4).
    #[allow(clippy::too_many_arguments)]
    pub fn atomic(
        &self,
        mapping: Option<&Mapping>,
        ws: &mut WorkingSet,
        (db, key): (u32, Bytes),
        op: OpField,
        rows: &mut Vec<RowEvent>,
        acks: &mut Vec<NewAck>,
        offset: ReplOffset,
    ) -> Result<(), StoreError> {
        let Some(kind) = op.kind else {
            return Ok(());
        };
        metrics::counter!("writebehind_ops_total", "op" => (kind.as_char() as char).to_string())
            .increment(1);
        let Some(mapping) = mapping else {
            // Not watched: nothing to write, acknowledged once captured.
            acks.extend(op.uuid.map(|uuid| ack(db, key, (uuid, None), offset)));
            return Ok(());
        };
        // The op decides the row, not the commands that carried it out.
        let row_id = mapping.row_id(&key);
        rows.retain(|e| !(e.mapping == mapping.name && e.row_id == row_id));
        // Of a large hash, the mapped fields: the op may have written none of them.
        ws.see_fields(db, &key, mapping.mapped_fields())?;
        let after = ws.get(db, &key)?;
        let (event, ack_now) = op_effects(mapping, db, &key, &op, &after);
        rows.extend(event);
        if let Some(due) = ack_now {
            acks.push(ack(db, key, due, offset));
        }
        Ok(())
    }

    /// A watched hash of the snapshot holding a `#` field: an op not completed when the
    /// snapshot was taken (written while this service was away, or lost with its completion),
    /// applied now and completed like any other. Returns the mirror's value and the row event
    /// (`emit`: whether the snapshot's rows are written at all); the raw state and the ack go
    /// to `batch` and `acks`.
    #[allow(clippy::too_many_arguments)]
    pub fn found_in_snapshot(
        &mut self,
        mapping: &Mapping,
        (db, key): (u32, &Bytes),
        value: MirrorValue,
        emit: bool,
        offset: ReplOffset,
        batch: &mut Batch,
        acks: &mut Vec<NewAck>,
    ) -> (Option<MirrorValue>, Option<RowEvent>) {
        let (intended, event, seen) = apply_op(mapping, db, key, value);
        batch.put_raw(db, key, &seen.raw);
        self.pending.insert(db, key);
        let mut due = seen.ack_now;
        let mut row = None;
        match event {
            Some(event) if emit => row = Some(event),
            Some(event) => due = event.op.map(|op| (op.uuid, None)),
            None => {}
        }
        if let Some(due) = due {
            acks.push(ack(db, key.clone(), due, offset));
        }
        (intended, row)
    }

    /// Whether a watched value holds a `#` field that is an op.
    pub fn holds_op(&self, value: &MirrorValue) -> bool {
        self.enabled && value.kind == MirrorKind::Hash && value.fields.contains_key(OP_FIELD)
    }

    /// Records which keys still differ from the mirror (their op is to be completed in Redis;
    /// returned) and which agree again.
    pub fn flush_raw(
        &mut self,
        ws: &mut WorkingSet,
        raw: &mut WorkingSet,
        batch: &mut Batch,
    ) -> Result<Vec<(u32, Bytes)>, StoreError> {
        let mut to_complete = Vec::new();
        for ((db, key), value) in raw.drain() {
            let intended = ws.get_whole(db, &key)?;
            match value {
                Some(value) if !MirrorValue::agree(&Some(value.clone()), &intended) => {
                    batch.put_raw(db, &key, &value);
                    self.pending.insert(db, &key);
                    to_complete.push((db, key));
                }
                value => {
                    if value.is_none() && intended.is_some() {
                        // Redis lost the key (an expiry) while the op's state still has it:
                        // nothing can complete it; the mirror keeps what the op gave.
                        tracing::warn!(key = %String::from_utf8_lossy(&key), "a key with a pending # op vanished from Redis");
                    }
                    if self.pending.remove(db, &key) {
                        batch.delete_raw(db, &key);
                    }
                }
            }
        }
        Ok(to_complete)
    }
}
