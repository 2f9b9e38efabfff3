//! Applying replicated commands to the mirror, exactly as Redis applied them, and deriving row
//! changes (design.md section 3).
//!
//! The primary only replicates commands that succeeded and had an effect, so a command in the
//! stream is trusted: an `HSET` makes its key a hash whatever the mirror thought. Keys that are
//! not watched are not mirrored; when a watched key receives content from one (a `RENAME` from an
//! unwatched key, a write this service does not model), the key is *refreshed*: read from the
//! primary together with the primary's offset, and commands up to that offset are not applied to
//! it again.
//!
//! Each command compares every touched watched key's row before and after it: a new or changed
//! mapped image is an upsert (also for a new hash with no mapped field: the row now exists); a
//! hash that stopped existing is a delete, unless it expired and its mapping keeps rows on
//! expiry; a change of unmapped fields only is nothing.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::command_table::CommandTable;
use super::mapping::{Mapping, Mappings};
use crate::ack::{OpField, OpKind, INVALID_OP, OP_FIELD};
use crate::buffer::{
    Batch, FieldValue, HashOp, MirrorKind, MirrorValue, RowChange, Store, StoreError,
};
use crate::config::OnExpire;
use crate::replication::rdb::{decode_dump_payload, DumpedValue, ValueKind};
use crate::replication::stream::Command;

/// A row change derived from a command, before it gets its place in the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowEvent {
    pub mapping: String,
    pub row_id: Bytes,
    pub row: RowChange,
    /// The `#` op (with its uuid) to acknowledge once the database has this change.
    pub op: Option<HashOp>,
}

/// What a command needs beyond the mirror.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Needs {
    /// Watched keys whose content must be read from the primary.
    pub refresh: Vec<(u32, Bytes)>,
    /// A reason to start a full resynchronisation (the mirror cannot follow this command).
    pub full_resync: Option<String>,
    /// A command that touched watched keys and is not modelled (logged and counted).
    pub unknown_command: Option<String>,
    /// A `#` op the command wrote.
    pub op: Option<OpSeen>,
}

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

/// Applies the op of `raw`, a watched hash holding a `#` field (design.md section 4). Returns
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
                row,
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

struct Slot {
    value: Option<MirrorValue>,
    dirty: bool,
}

/// The mirror entries touched by the commands of one batch, loaded on first use and written
/// back in one `Batch`.
pub struct WorkingSet {
    store: Arc<Store>,
    slots: HashMap<(u32, Bytes), Slot>,
    /// Holds what Redis really holds for keys with a pending `#` op (the buffer's `raw`), not
    /// the mirror.
    raw: bool,
}

impl WorkingSet {
    pub fn new(store: Arc<Store>) -> Self {
        WorkingSet {
            store,
            slots: HashMap::new(),
            raw: false,
        }
    }

    /// A working set of raw states: a key without a raw entry holds what the mirror holds.
    pub fn raw(store: Arc<Store>) -> Self {
        WorkingSet {
            raw: true,
            ..WorkingSet::new(store)
        }
    }

    fn slot(&mut self, db: u32, key: &Bytes) -> Result<&mut Slot, StoreError> {
        let (store, raw) = (&self.store, self.raw);
        match self.slots.entry((db, key.clone())) {
            Entry::Occupied(slot) => Ok(slot.into_mut()),
            Entry::Vacant(slot) => {
                let value = match raw {
                    true => match store.raw(db, key)? {
                        Some(value) => Some(value),
                        None => store.mirror(db, key)?,
                    },
                    false => store.mirror(db, key)?,
                };
                Ok(slot.insert(Slot {
                    value,
                    dirty: false,
                }))
            }
        }
    }

    /// Loads `key` with `value` unless it is already held.
    pub fn seed(&mut self, db: u32, key: &Bytes, value: Option<MirrorValue>) {
        self.slots.entry((db, key.clone())).or_insert(Slot {
            value,
            dirty: false,
        });
    }

    pub fn contains(&self, db: u32, key: &[u8]) -> bool {
        self.slots.contains_key(&(db, Bytes::copy_from_slice(key)))
    }

    /// Whether a key of this name is held, in any database.
    pub fn holds_name(&self, key: &[u8]) -> bool {
        self.slots.keys().any(|(_, k)| k.as_ref() == key)
    }

    /// Every entry held, emptying the set.
    pub fn drain(&mut self) -> Vec<((u32, Bytes), Option<MirrorValue>)> {
        self.slots.drain().map(|(k, s)| (k, s.value)).collect()
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn get(&mut self, db: u32, key: &Bytes) -> Result<Option<MirrorValue>, StoreError> {
        Ok(self.slot(db, key)?.value.clone())
    }

    pub fn set(
        &mut self,
        db: u32,
        key: &Bytes,
        value: Option<MirrorValue>,
    ) -> Result<(), StoreError> {
        let slot = self.slot(db, key)?;
        slot.value = value;
        slot.dirty = true;
        Ok(())
    }

    /// Moves the changed entries into `batch` and forgets them.
    pub fn flush_into(&mut self, batch: &mut Batch) {
        for ((db, key), slot) in self.slots.drain() {
            if slot.dirty {
                match &slot.value {
                    Some(value) => batch.put_mirror(db, &key, value),
                    None => batch.delete_mirror(db, &key),
                }
            }
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

fn row_of(mapping: &Mapping, value: &Option<MirrorValue>) -> Option<Vec<(String, Option<Bytes>)>> {
    match value {
        Some(v) if v.kind == MirrorKind::Hash && !v.fields.is_empty() => {
            Some(mapping.row_image(&v.fields))
        }
        _ => None,
    }
}

/// The row event between two states of a watched key.
pub fn row_event(
    mapping: &Mapping,
    key: &Bytes,
    before: &Option<MirrorValue>,
    after: &Option<MirrorValue>,
    expired: bool,
) -> Option<RowEvent> {
    let (old, new) = (row_of(mapping, before), row_of(mapping, after));
    let row = match (old, new) {
        (old, Some(new)) if old.as_ref() != Some(&new) => RowChange::Upsert { columns: new },
        (Some(_), None) if expired && mapping.on_expire == OnExpire::Keep => return None,
        (Some(_), None) => RowChange::Delete,
        _ => return None,
    };
    Some(RowEvent {
        mapping: mapping.name.clone(),
        row_id: mapping.row_id(key),
        row,
        op: None,
    })
}

fn parse_i64(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn parse_u32(b: &[u8]) -> Option<u32> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Applies commands to a working set.
pub struct Applier<'m> {
    pub mappings: &'m Mappings,
    pub commands: &'m CommandTable,
    pub generation: u64,
    /// Whether a `#` field is an op (false: follow Redis exactly, for the raw state of keys with
    /// a pending op, or when `[acks] enabled = false`).
    pub ops: bool,
}

impl Applier<'_> {
    /// Applies one command; row events go to `out`.
    pub fn apply(
        &self,
        ws: &mut WorkingSet,
        command: &Command,
        out: &mut Vec<RowEvent>,
    ) -> Result<Needs, StoreError> {
        let mut needs = Needs::default();
        let name = command.name();
        let args = &command.args;
        let db = command.db;
        let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
        match name.as_str() {
            "HSET" | "HMSET" => {
                let pairs: Vec<(Bytes, Bytes)> = args[2.min(args.len())..]
                    .chunks_exact(2)
                    .map(|p| (p[0].clone(), p[1].clone()))
                    .collect();
                needs.op = self.update_hash(ws, db, &arg(1), command, out, |fields| {
                    for (f, v) in pairs {
                        fields.insert(
                            f,
                            FieldValue {
                                value: v,
                                expire_at_ms: None,
                            },
                        );
                    }
                })?;
            }
            "HSETNX" => {
                let (f, v) = (arg(2), arg(3));
                needs.op = self.update_hash(ws, db, &arg(1), command, out, |fields| {
                    fields.entry(f).or_insert(FieldValue {
                        value: v,
                        expire_at_ms: None,
                    });
                })?;
            }
            "HDEL" => {
                let doomed: Vec<Bytes> = args.iter().skip(2).cloned().collect();
                needs.op = self.update_hash(ws, db, &arg(1), command, out, |fields| {
                    for f in &doomed {
                        fields.remove(f);
                    }
                })?;
            }
            "HINCRBY" => {
                let (f, by) = (arg(2), parse_i64(&arg(3)).unwrap_or(0));
                needs.op = self.update_hash(ws, db, &arg(1), command, out, |fields| {
                    let current = fields
                        .get(&f)
                        .and_then(|v| parse_i64(&v.value))
                        .unwrap_or(0);
                    let expire_at_ms = fields.get(&f).and_then(|v| v.expire_at_ms);
                    fields.insert(
                        f,
                        FieldValue {
                            value: Bytes::from(current.wrapping_add(by).to_string()),
                            expire_at_ms,
                        },
                    );
                })?;
            }
            "HINCRBYFLOAT" => {
                // Redis replicates it as HSET with the result; a verbatim one (very old primary)
                // cannot be reproduced bit for bit: read the key instead.
                self.refresh_if_watched(ws, db, &arg(1), &mut needs)?;
            }
            "HSETEX" => needs.op = self.hsetex(ws, command, out)?,
            "HPEXPIREAT" | "HPERSIST" => {
                let persist = name == "HPERSIST";
                let at = if persist { None } else { parse_i64(&arg(2)) };
                let start = if persist { 2 } else { 3 };
                let fields: Vec<Bytes> = fields_argument(args, start);
                needs.op = self.update_hash(ws, db, &arg(1), command, out, |map| {
                    for f in &fields {
                        if let Some(v) = map.get_mut(f) {
                            v.expire_at_ms = at;
                        }
                    }
                })?;
            }
            "DEL" | "UNLINK" => {
                for key in args.iter().skip(1) {
                    self.delete_key(ws, db, key, command, out)?;
                }
            }
            "PEXPIREAT" | "EXPIREAT" | "PEXPIRE" | "EXPIRE" | "PERSIST" => {
                let value = parse_i64(&arg(2)).unwrap_or(0);
                let at = match name.as_str() {
                    "PEXPIREAT" => Some(value),
                    "EXPIREAT" => Some(value.saturating_mul(1000)),
                    "PEXPIRE" => Some(now_ms().saturating_add(value)),
                    "EXPIRE" => Some(now_ms().saturating_add(value.saturating_mul(1000))),
                    _ => None,
                };
                self.set_expire(ws, db, &arg(1), command, at)?;
            }
            "RENAME" | "RENAMENX" => self.move_key(
                ws,
                db,
                &arg(1),
                db,
                &arg(2),
                false,
                command,
                out,
                &mut needs,
            )?,
            "MOVE" => match parse_u32(&arg(2)) {
                Some(to) => self.move_key(
                    ws,
                    db,
                    &arg(1),
                    to,
                    &arg(1),
                    false,
                    command,
                    out,
                    &mut needs,
                )?,
                None => {
                    needs.full_resync = Some(format!(
                        "MOVE with database {:?}",
                        String::from_utf8_lossy(&arg(2))
                    ))
                }
            },
            "COPY" => {
                let mut to_db = db;
                let mut i = 3;
                while i < args.len() {
                    if args[i].eq_ignore_ascii_case(b"DB") {
                        to_db = parse_u32(&arg(i + 1)).unwrap_or(db);
                        i += 1;
                    }
                    i += 1;
                }
                self.move_key(
                    ws,
                    db,
                    &arg(1),
                    to_db,
                    &arg(2),
                    true,
                    command,
                    out,
                    &mut needs,
                )?;
            }
            "RESTORE" => self.restore(ws, command, out, &mut needs)?,
            "FLUSHDB" => self.flush(ws, Some(db), command, out)?,
            "FLUSHALL" => self.flush(ws, None, command, out)?,
            "SWAPDB" => {
                let (a, b) = (parse_u32(&arg(1)), parse_u32(&arg(2)));
                if a.is_some_and(|a| self.mappings.watches_db(a))
                    || b.is_some_and(|b| self.mappings.watches_db(b))
                {
                    needs.full_resync = Some(format!(
                        "SWAPDB {} {} involves a mapped database",
                        String::from_utf8_lossy(&arg(1)),
                        String::from_utf8_lossy(&arg(2))
                    ));
                }
            }
            "EVAL" | "EVALSHA" | "EVAL_RO" | "EVALSHA_RO" | "FCALL" | "FCALL_RO" => {
                // Since Redis 7 (and by default since 5) scripts replicate their effects; a script
                // sent verbatim cannot be reproduced here.
                needs.full_resync = Some(format!("{name} replicated verbatim (the primary replicates scripts, not their effects)"));
            }
            _ => self.other_write(ws, command, out, &mut needs)?,
        }
        Ok(needs)
    }

    /// The mapping watching a key and the key's mirrored state, unless the key is not watched or
    /// its state already contains this command (it was refreshed from the primary later).
    fn watched<'s>(
        &'s self,
        ws: &mut WorkingSet,
        db: u32,
        key: &Bytes,
        command: &Command,
    ) -> Result<Option<(&'s Mapping, Option<MirrorValue>)>, StoreError> {
        let Some(mapping) = self.mappings.watching(db, key) else {
            return Ok(None);
        };
        let before = ws.get(db, key)?;
        if Self::already_in(&before, command) {
            return Ok(None);
        }
        Ok(Some((mapping, before)))
    }

    /// Whether commands ending at `end` are already contained in a refreshed value.
    fn already_in(value: &Option<MirrorValue>, command: &Command) -> bool {
        value
            .as_ref()
            .is_some_and(|v| v.refreshed_through >= command.end.0)
    }

    fn update_hash(
        &self,
        ws: &mut WorkingSet,
        db: u32,
        key: &Bytes,
        command: &Command,
        out: &mut Vec<RowEvent>,
        change: impl FnOnce(&mut std::collections::BTreeMap<Bytes, FieldValue>),
    ) -> Result<Option<OpSeen>, StoreError> {
        let Some((mapping, before)) = self.watched(ws, db, key, command)? else {
            return Ok(None);
        };
        let mut after = match &before {
            Some(v) if v.kind == MirrorKind::Hash => v.clone(),
            // The command succeeded, so the key was a hash (or absent).
            _ => MirrorValue::hash(self.generation),
        };
        change(&mut after.fields);
        if self.ops && after.fields.contains_key(OP_FIELD) {
            let (intended, event, seen) = apply_op(mapping, db, key, after);
            out.extend(event);
            ws.set(db, key, intended)?;
            return Ok(Some(seen));
        }
        let after = if after.fields.is_empty() {
            None
        } else {
            Some(after)
        };
        if let Some(event) = row_event(mapping, key, &before, &after, false) {
            out.push(event);
        }
        ws.set(db, key, after)?;
        Ok(None)
    }

    fn delete_key(
        &self,
        ws: &mut WorkingSet,
        db: u32,
        key: &Bytes,
        command: &Command,
        out: &mut Vec<RowEvent>,
    ) -> Result<(), StoreError> {
        let Some((mapping, before)) = self.watched(ws, db, key, command)? else {
            return Ok(());
        };
        if before.is_none() {
            return Ok(());
        }
        // A DEL of a key whose time has come is how an expiry reaches replicas.
        let expired = before
            .as_ref()
            .and_then(|v| v.expire_at_ms)
            .is_some_and(|at| at <= now_ms());
        if let Some(event) = row_event(mapping, key, &before, &None, expired) {
            out.push(event);
        }
        ws.set(db, key, None)
    }

    fn set_expire(
        &self,
        ws: &mut WorkingSet,
        db: u32,
        key: &Bytes,
        command: &Command,
        at: Option<i64>,
    ) -> Result<(), StoreError> {
        if let Some((_, Some(mut value))) = self.watched(ws, db, key, command)? {
            value.expire_at_ms = at;
            ws.set(db, key, Some(value))?;
        }
        Ok(())
    }

    /// RENAME, RENAMENX, MOVE and COPY: the destination gets the source's value (and TTL); the
    /// source is gone unless it is a copy.
    #[allow(clippy::too_many_arguments)]
    fn move_key(
        &self,
        ws: &mut WorkingSet,
        from_db: u32,
        from: &Bytes,
        to_db: u32,
        to: &Bytes,
        copy: bool,
        command: &Command,
        out: &mut Vec<RowEvent>,
        needs: &mut Needs,
    ) -> Result<(), StoreError> {
        if from_db == to_db && from == to {
            return Ok(());
        }
        let source_mapping = self.mappings.watching(from_db, from);
        let source = if source_mapping.is_some() {
            ws.get(from_db, from)?
        } else {
            None
        };
        let source_ahead = Self::already_in(&source, command);
        if let Some(mapping) = source_mapping {
            if !copy && !source_ahead && source.is_some() {
                if let Some(event) = row_event(mapping, from, &source, &None, false) {
                    out.push(event);
                }
                ws.set(from_db, from, None)?;
            }
        }
        let Some((mapping, before)) = self.watched(ws, to_db, to, command)? else {
            return Ok(());
        };
        if source_mapping.is_none() || source_ahead || source.is_none() {
            // The content comes from a key we do not mirror (or mirror at a later point, or
            // lost track of): read the destination from the primary.
            needs.refresh.push((to_db, to.clone()));
            return Ok(());
        }
        let mut after = source.clone();
        if let Some(v) = after.as_mut() {
            v.refreshed_through = 0;
        }
        if let Some(event) = row_event(mapping, to, &before, &after, false) {
            out.push(event);
        }
        ws.set(to_db, to, after)
    }

    fn restore(
        &self,
        ws: &mut WorkingSet,
        command: &Command,
        out: &mut Vec<RowEvent>,
        needs: &mut Needs,
    ) -> Result<(), StoreError> {
        let args = &command.args;
        let (db, key) = (command.db, args.get(1).cloned().unwrap_or_default());
        let Some((mapping, before)) = self.watched(ws, db, &key, command)? else {
            return Ok(());
        };
        let Some(payload) = args.get(3) else {
            return Ok(());
        };
        let decoded = match decode_dump_payload(payload) {
            Ok(decoded) => decoded,
            Err(error) => {
                tracing::warn!(key = %String::from_utf8_lossy(&key), %error, "RESTORE payload not decodable; reading the key from the primary");
                needs.refresh.push((db, key));
                return Ok(());
            }
        };
        let ttl = args.get(2).and_then(|t| parse_i64(t)).unwrap_or(0);
        let absolute = args
            .iter()
            .skip(4)
            .any(|a| a.eq_ignore_ascii_case(b"ABSTTL"));
        let expire_at_ms = match (ttl, absolute) {
            (0, _) => None,
            (t, true) => Some(t),
            (t, false) => Some(now_ms().saturating_add(t)),
        };
        let after = mirror_value_from_dump(decoded, self.generation, expire_at_ms);
        if let Some(event) = row_event(mapping, &key, &before, &after, false) {
            out.push(event);
        }
        ws.set(db, &key, after)
    }

    fn flush(
        &self,
        ws: &mut WorkingSet,
        db: Option<u32>,
        command: &Command,
        out: &mut Vec<RowEvent>,
    ) -> Result<(), StoreError> {
        // Entries already in the working set, then everything stored.
        let mut keys: Vec<(u32, Bytes)> = ws
            .slots
            .iter()
            .filter(|((d, _), s)| db.is_none_or(|db| db == *d) && s.value.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = ws.store().mirror_scan(db, after.as_deref(), 1024)?;
            let Some(last) = page.last() else { break };
            after = Some(crate::buffer::mirror_key(last.0, &last.1));
            keys.extend(page.into_iter().map(|(d, k, _)| (d, k)));
        }
        keys.sort();
        keys.dedup();
        for (key_db, key) in keys {
            let Some(mapping) = self.mappings.watching(key_db, &key) else {
                continue;
            };
            let before = ws.get(key_db, &key)?;
            if before.is_none() || Self::already_in(&before, command) {
                continue;
            }
            if let Some(event) = row_event(mapping, &key, &before, &None, false) {
                out.push(event);
            }
            ws.set(key_db, &key, None)?;
        }
        Ok(())
    }

    fn hsetex(
        &self,
        ws: &mut WorkingSet,
        command: &Command,
        out: &mut Vec<RowEvent>,
    ) -> Result<Option<OpSeen>, StoreError> {
        // HSETEX key [FNX|FXX] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL] FIELDS n field value ...
        let args = &command.args;
        let mut at: Option<Option<i64>> = Some(None);
        let mut i = 2;
        let mut pairs = Vec::new();
        while i < args.len() {
            let word = args[i].to_ascii_uppercase();
            let number = args.get(i + 1).and_then(|n| parse_i64(n)).unwrap_or(0);
            match word.as_slice() {
                b"PXAT" => at = Some(Some(number)),
                b"EXAT" => at = Some(Some(number.saturating_mul(1000))),
                b"PX" => at = Some(Some(now_ms().saturating_add(number))),
                b"EX" => at = Some(Some(now_ms().saturating_add(number.saturating_mul(1000)))),
                b"KEEPTTL" => {
                    at = None;
                    i += 1;
                    continue;
                }
                b"FIELDS" => {
                    let n = number.max(0) as usize;
                    for p in args[(i + 2).min(args.len())..].chunks_exact(2).take(n) {
                        pairs.push((p[0].clone(), p[1].clone()));
                    }
                    break;
                }
                _ => {
                    i += 1;
                    continue;
                }
            }
            i += 2;
        }
        self.update_hash(
            ws,
            command.db,
            &args.get(1).cloned().unwrap_or_default(),
            command,
            out,
            |fields| {
                for (f, v) in pairs {
                    let keep = fields.get(&f).and_then(|old| old.expire_at_ms);
                    fields.insert(
                        f,
                        FieldValue {
                            value: v,
                            expire_at_ms: at.unwrap_or(keep),
                        },
                    );
                }
            },
        )
    }

    fn refresh_if_watched(
        &self,
        ws: &mut WorkingSet,
        db: u32,
        key: &Bytes,
        needs: &mut Needs,
    ) -> Result<(), StoreError> {
        if self.mappings.watching(db, key).is_some() {
            let _ = ws.get(db, key)?;
            needs.refresh.push((db, key.clone()));
        }
        Ok(())
    }

    /// Any other write: a command on other data types makes a watched key "not a hash"; an
    /// unknown one touching a watched key has that key read from the primary.
    fn other_write(
        &self,
        ws: &mut WorkingSet,
        command: &Command,
        out: &mut Vec<RowEvent>,
        needs: &mut Needs,
    ) -> Result<(), StoreError> {
        let Some(spec) = self.commands.get(&command.name()) else {
            // Not in the primary's table (or the table is not loaded): only its first argument
            // can be guessed to be a key.
            if let Some(key) = command.args.get(1) {
                if self.mappings.watching(command.db, key).is_some() {
                    needs.unknown_command = Some(command.name());
                    self.refresh_if_watched(ws, command.db, key, needs)?;
                }
            }
            return Ok(());
        };
        if !spec.write {
            return Ok(());
        }
        let spec = spec.clone();
        for key in self.commands.keys(&spec, command) {
            let Some((mapping, before)) = self.watched(ws, command.db, &key, command)? else {
                continue;
            };
            if spec.other_type && !spec.hash_type {
                let mut after = MirrorValue::other(self.generation);
                after.expire_at_ms = before.as_ref().and_then(|v| v.expire_at_ms);
                if let Some(event) = row_event(mapping, &key, &before, &Some(after.clone()), false)
                {
                    out.push(event);
                }
                ws.set(command.db, &key, Some(after))?;
            } else {
                needs.unknown_command = Some(command.name());
                needs.refresh.push((command.db, key));
            }
        }
        Ok(())
    }
}

/// The mirror value of a decoded DUMP payload (`None` for an empty hash, which Redis would not
/// keep).
pub fn mirror_value_from_dump(
    decoded: DumpedValue,
    generation: u64,
    expire_at_ms: Option<i64>,
) -> Option<MirrorValue> {
    if decoded.kind != ValueKind::Hash {
        return Some(MirrorValue {
            expire_at_ms,
            ..MirrorValue::other(generation)
        });
    }
    if decoded.empty {
        return None;
    }
    let mut value = MirrorValue {
        expire_at_ms,
        ..MirrorValue::hash(generation)
    };
    for f in decoded.fields {
        value.fields.insert(
            f.field,
            FieldValue {
                value: f.value,
                expire_at_ms: f.expire_at_ms,
            },
        );
    }
    Some(value)
}

/// The field names after `FIELDS n` starting at `start` (`HPEXPIREAT key ms [NX|XX|GT|LT]
/// FIELDS n f...`, `HPERSIST key FIELDS n f...`).
fn fields_argument(args: &[Bytes], start: usize) -> Vec<Bytes> {
    let Some(pos) = args
        .iter()
        .skip(start)
        .position(|a| a.eq_ignore_ascii_case(b"FIELDS"))
    else {
        return Vec::new();
    };
    let pos = start + pos;
    let n = args
        .get(pos + 1)
        .and_then(|n| parse_i64(n))
        .unwrap_or(0)
        .max(0) as usize;
    args.iter().skip(pos + 2).take(n).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::position::ReplOffset;
    use redis_protocol::resp2::types::BytesFrame;

    fn mappings(on_expire: &str) -> Mappings {
        let text = format!(
            "[source]\nurl = \"redis://127.0.0.1:1\"\n[backends.db]\nurl = \"sqlite://x\"\n[[mappings]]\nname = \"P\"\nprefix = \"p\"\nbackend = \"db\"\ntable = \"t\"\nkey_column = \"id\"\non_expire = \"{on_expire}\"\n[mappings.columns]\nname = \"name\"\nn = \"n\"\n"
        );
        Mappings::new(&Config::parse(&text, &|_| None).unwrap().mappings)
    }

    fn command(args: &[&str], end: u64) -> Command {
        Command {
            args: args
                .iter()
                .map(|a| Bytes::copy_from_slice(a.as_bytes()))
                .collect(),
            db: 0,
            end: ReplOffset(end),
        }
    }

    /// Applies `commands` in order; returns the row events.
    fn run(
        on_expire: &str,
        table: &CommandTable,
        commands: &[&[&str]],
    ) -> (Vec<RowEvent>, Needs, WorkingSet) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mappings = mappings(on_expire);
        let applier = Applier {
            mappings: &mappings,
            commands: table,
            generation: 1,
            ops: true,
        };
        let mut ws = WorkingSet::new(store);
        let mut out = Vec::new();
        let mut needs = Needs::default();
        for (i, args) in commands.iter().enumerate() {
            needs = applier
                .apply(&mut ws, &command(args, 100 + i as u64), &mut out)
                .unwrap();
        }
        (out, needs, ws)
    }

    fn upsert(id: &str, name: Option<&str>, n: Option<&str>) -> RowEvent {
        RowEvent {
            mapping: "P".into(),
            row_id: Bytes::copy_from_slice(id.as_bytes()),
            row: RowChange::Upsert {
                columns: vec![
                    ("n".into(), n.map(|v| Bytes::copy_from_slice(v.as_bytes()))),
                    (
                        "name".into(),
                        name.map(|v| Bytes::copy_from_slice(v.as_bytes())),
                    ),
                ],
            },
            op: None,
        }
    }

    fn with_op(mut event: RowEvent, op: u8, uuid: &str) -> RowEvent {
        event.op = Some(HashOp {
            op,
            uuid: Bytes::copy_from_slice(uuid.as_bytes()),
            db: 0,
            key: Bytes::from("p:1"),
        });
        event
    }

    #[test]
    fn op_field_semantics_in_the_mirror_and_the_rows() {
        let table = CommandTable::default();
        let name = |v: &Option<MirrorValue>| {
            v.as_ref().map(|v| {
                v.fields
                    .keys()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .collect::<Vec<_>>()
            })
        };
        // `-` then a write: the key was deleted at the op, the row only gets the later write.
        let (out, _, mut ws) = run(
            "keep",
            &table,
            &[
                &["HSET", "p:1", "name", "A", "#", "-"],
                &["HSET", "p:1", "n", "2"],
            ],
        );
        assert_eq!(out, vec![upsert("1", None, Some("2"))]);
        assert_eq!(
            name(&ws.get(0, &Bytes::from("p:1")).unwrap()),
            Some(vec!["n".into()])
        );
        // `=` alone re-sends the full row, with its uuid.
        let (out, needs, _) = run(
            "keep",
            &table,
            &[&["HSET", "p:1", "name", "A"], &["HSET", "p:1", "#", "=u1"]],
        );
        assert_eq!(
            out,
            vec![
                upsert("1", Some("A"), None),
                with_op(upsert("1", Some("A"), None), b'=', "u1")
            ]
        );
        let seen = needs.op.unwrap();
        assert_eq!(seen.ack_now, None);
        assert!(seen.raw.fields.contains_key(&Bytes::from("#")));
        // `+` keeps the data without a row; `~` deletes both; invalid keeps data, no row.
        let (out, needs, mut ws) =
            run("keep", &table, &[&["HSET", "p:1", "name", "A", "#", "+u2"]]);
        assert!(out.is_empty());
        assert_eq!(needs.op.unwrap().ack_now, Some((Bytes::from("u2"), None)));
        assert_eq!(
            name(&ws.get(0, &Bytes::from("p:1")).unwrap()),
            Some(vec!["name".into()])
        );
        let (out, _, mut ws) = run("keep", &table, &[&["HSET", "p:1", "name", "A", "#", "~u3"]]);
        assert_eq!(out, vec![with_op(delete("1"), b'~', "u3")]);
        assert_eq!(ws.get(0, &Bytes::from("p:1")).unwrap(), None);
        let (out, needs, mut ws) = run("keep", &table, &[&["HSET", "p:1", "name", "A", "#", "x9"]]);
        assert!(out.is_empty());
        assert_eq!(
            needs.op.unwrap().ack_now,
            Some((
                Bytes::from("9"),
                Some("invalid op: unknown operation".into())
            ))
        );
        assert_eq!(
            name(&ws.get(0, &Bytes::from("p:1")).unwrap()),
            Some(vec!["name".into()])
        );
    }

    fn delete(id: &str) -> RowEvent {
        RowEvent {
            mapping: "P".into(),
            row_id: Bytes::copy_from_slice(id.as_bytes()),
            row: RowChange::Delete,
            op: None,
        }
    }

    #[test]
    fn hash_commands_give_full_row_images() {
        let table = CommandTable::default();
        let (out, _, _) = run(
            "keep",
            &table,
            &[
                &["HSET", "p:1", "name", "Ann"],
                &["HINCRBY", "p:1", "n", "5"],
                &["HSETNX", "p:1", "name", "Bob"],
                &["HSET", "p:1", "other", "x"],
                &["HDEL", "p:1", "name"],
                &["HDEL", "p:1", "n", "other"],
                &["HSET", "q:1", "name", "unwatched"],
            ],
        );
        assert_eq!(
            out,
            vec![
                upsert("1", Some("Ann"), None),
                upsert("1", Some("Ann"), Some("5")),
                upsert("1", None, Some("5")),
                delete("1")
            ]
        );
    }

    #[test]
    fn an_expiry_keeps_or_deletes_the_row_by_mapping() {
        let table = CommandTable::default();
        for (on_expire, expected) in [("keep", 1), ("delete", 2)] {
            let (out, _, _) = run(
                on_expire,
                &table,
                &[
                    &["HSET", "p:1", "name", "A"],
                    &["PEXPIREAT", "p:1", "1000"],
                    &["DEL", "p:1"],
                ],
            );
            assert_eq!(out.len(), expected, "{on_expire}: {out:?}");
        }
        // A DEL before the TTL is a delete whatever on_expire says.
        let far = (now_ms() + 1_000_000).to_string();
        let (out, _, _) = run(
            "keep",
            &table,
            &[
                &["HSET", "p:1", "name", "A"],
                &["PEXPIREAT", "p:1", &far],
                &["DEL", "p:1"],
            ],
        );
        assert_eq!(out.last(), Some(&delete("1")));
    }

    #[test]
    fn renames_move_rows_and_unknown_sources_are_refreshed() {
        let table = CommandTable::default();
        let (out, needs, _) = run(
            "keep",
            &table,
            &[&["HSET", "p:1", "name", "A"], &["RENAME", "p:1", "p:2"]],
        );
        assert_eq!(
            out,
            vec![
                upsert("1", Some("A"), None),
                delete("1"),
                upsert("2", Some("A"), None)
            ]
        );
        assert!(needs.refresh.is_empty());
        let (out, needs, _) = run("keep", &table, &[&["RENAME", "tmp", "p:3"]]);
        assert!(out.is_empty());
        assert_eq!(needs.refresh, vec![(0, Bytes::from("p:3"))]);
    }

    #[test]
    fn other_writes_follow_the_primarys_command_table() {
        let entry = |name: &str, flags: &[&str], categories: &[&str]| {
            let words = |w: &[&str]| {
                BytesFrame::Array(
                    w.iter()
                        .map(|x| BytesFrame::SimpleString(Bytes::copy_from_slice(x.as_bytes())))
                        .collect(),
                )
            };
            BytesFrame::Array(vec![
                BytesFrame::BulkString(Bytes::copy_from_slice(name.as_bytes())),
                BytesFrame::Integer(-3),
                words(flags),
                BytesFrame::Integer(1),
                BytesFrame::Integer(1),
                BytesFrame::Integer(1),
                words(categories),
            ])
        };
        let table = CommandTable::from_reply(&BytesFrame::Array(vec![
            entry("set", &["write"], &["@write", "@string"]),
            entry("hmodule", &["write"], &["@write", "@hash"]),
            entry("get", &["readonly"], &["@read", "@string"]),
        ]));
        let (out, _, ws) = run(
            "keep",
            &table,
            &[
                &["HSET", "p:1", "name", "A"],
                &["GET", "p:1"],
                &["SET", "p:1", "v"],
            ],
        );
        assert_eq!(out, vec![upsert("1", Some("A"), None), delete("1")]);
        assert_eq!(
            ws.slots[&(0, Bytes::from("p:1"))]
                .value
                .as_ref()
                .map(|v| v.kind),
            Some(MirrorKind::Other)
        );
        let (_, needs, _) = run("keep", &table, &[&["HMODULE", "p:1", "x"]]);
        assert_eq!(needs.unknown_command.as_deref(), Some("HMODULE"));
        assert_eq!(needs.refresh, vec![(0, Bytes::from("p:1"))]);
    }

    #[test]
    fn commands_already_contained_in_a_refreshed_value_are_skipped() {
        let table = CommandTable::default();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mappings = mappings("keep");
        let applier = Applier {
            mappings: &mappings,
            commands: &table,
            generation: 1,
            ops: true,
        };
        let mut ws = WorkingSet::new(store);
        let mut refreshed = MirrorValue::hash(1);
        refreshed.refreshed_through = 500;
        refreshed.fields.insert(
            Bytes::from("n"),
            FieldValue {
                value: Bytes::from("10"),
                expire_at_ms: None,
            },
        );
        ws.set(0, &Bytes::from("p:1"), Some(refreshed)).unwrap();
        let mut out = Vec::new();
        applier
            .apply(
                &mut ws,
                &command(&["HINCRBY", "p:1", "n", "1"], 400),
                &mut out,
            )
            .unwrap();
        assert!(
            out.is_empty(),
            "the increment at 400 is already in the value read at 500"
        );
        applier
            .apply(
                &mut ws,
                &command(&["HINCRBY", "p:1", "n", "1"], 600),
                &mut out,
            )
            .unwrap();
        assert_eq!(out, vec![upsert("1", None, Some("11"))]);
    }
}

#[cfg(test)]
mod field_ttl_tests {
    use super::*;
    use crate::config::Config;
    use crate::position::ReplOffset;

    fn apply_all(commands: &[&[&str]]) -> Option<MirrorValue> {
        let text = "[source]\nurl = \"redis://127.0.0.1:1\"\n[backends.db]\nurl = \"sqlite://x\"\n[[mappings]]\nname = \"P\"\nprefix = \"p\"\nbackend = \"db\"\ntable = \"t\"\nkey_column = \"id\"\n[mappings.columns]\nf = \"f\"\n";
        let mappings = Mappings::new(&Config::parse(text, &|_| None).unwrap().mappings);
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let table = CommandTable::default();
        let applier = Applier {
            mappings: &mappings,
            commands: &table,
            generation: 1,
            ops: true,
        };
        let mut ws = WorkingSet::new(store);
        let mut out = Vec::new();
        for (i, args) in commands.iter().enumerate() {
            let command = Command {
                args: args
                    .iter()
                    .map(|a| Bytes::copy_from_slice(a.as_bytes()))
                    .collect(),
                db: 0,
                end: ReplOffset(10 + i as u64),
            };
            applier.apply(&mut ws, &command, &mut out).unwrap();
        }
        ws.get(0, &Bytes::from("p:1")).unwrap()
    }

    fn ttl(value: &Option<MirrorValue>, field: &str) -> Option<i64> {
        value
            .as_ref()
            .and_then(|v| v.fields.get(&Bytes::copy_from_slice(field.as_bytes())))
            .and_then(|f| f.expire_at_ms)
    }

    #[test]
    fn hash_field_ttl_commands_of_redis_7_4_and_8() {
        // As Redis 7.4+ propagates them: absolute HPEXPIREAT, HPERSIST, HSETEX with PXAT.
        let v = apply_all(&[
            &["HSET", "p:1", "f", "1", "g", "2"],
            &["HPEXPIREAT", "p:1", "5000", "FIELDS", "1", "f"],
        ]);
        assert_eq!((ttl(&v, "f"), ttl(&v, "g")), (Some(5000), None));
        let v = apply_all(&[
            &["HSET", "p:1", "f", "1"],
            &["HPEXPIREAT", "p:1", "5000", "FIELDS", "1", "f"],
            &["HPERSIST", "p:1", "FIELDS", "1", "f"],
        ]);
        assert_eq!(ttl(&v, "f"), None);
        let v = apply_all(&[&[
            "HSETEX", "p:1", "PXAT", "7000", "FIELDS", "2", "f", "1", "g", "2",
        ]]);
        assert_eq!((ttl(&v, "f"), ttl(&v, "g")), (Some(7000), Some(7000)));
        let v = apply_all(&[
            &["HSETEX", "p:1", "PXAT", "7000", "FIELDS", "1", "f", "1"],
            &["HSETEX", "p:1", "KEEPTTL", "FIELDS", "1", "f", "2"],
        ]);
        assert_eq!(ttl(&v, "f"), Some(7000));
        // An expired field arrives as HDEL; the last one takes the key.
        let v = apply_all(&[
            &["HSETEX", "p:1", "PXAT", "7000", "FIELDS", "1", "f", "1"],
            &["HDEL", "p:1", "f"],
        ]);
        assert!(v.is_none());
    }
}
