//! Applying replicated writes to the mirror, exactly as Redis applied them, and deriving row
//! changes (docs/design.md section 3).
//!
//! The primary only replicates commands that succeeded and had an effect, so a command in the
//! stream is trusted: an `HSET` makes its key a hash whatever the mirror thought. Keys that are
//! not watched are not mirrored; when a watched key receives content from one (a `RENAME` from an
//! unwatched key, a write this service does not model), the key is *refreshed*: read from the
//! primary together with the primary's offset, and commands up to that offset are not applied to
//! it again.
//!
//! Each command is parsed once into a [`Write`] (`command.rs`); each write compares every
//! touched watched key's row before and after it: a new or changed mapped image is an upsert
//! (also for a new hash with no mapped field: the row now exists); a hash that stopped existing
//! is a delete, unless it expired and its mapping keeps rows on expiry; a change of unmapped
//! fields only is nothing.

use bytes::Bytes;

use super::clock::{Deletion, PrimaryClock};
use super::command::{FieldTtl, Pairs, Write};
use super::command_table::CommandTable;
use super::mapping::{Mapping, Mappings};
use super::ops::{apply_op, OpSeen};
use super::rows::{
    has_row, mirror_value_from_dump, row_event, row_event_between, upsert, RowEvent,
};
use super::working_set::WorkingSet;
use crate::ack::OP_FIELD;
use crate::buffer::{stored_copy, FieldValue, Fields, MirrorKind, MirrorValue, StoreError};
use crate::position::ReplOffset;
use crate::replication::rdb::decode_dump_payload;
use crate::replication::stream::Command;

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

/// Sets `key` to `after` and records the row event from `before` to `after`.
fn set_with_row(
    ws: &mut WorkingSet,
    (mapping, db, key): (&Mapping, u32, &Bytes),
    before: &Option<MirrorValue>,
    after: Option<MirrorValue>,
    expired: bool,
    out: &mut Vec<RowEvent>,
) -> Result<(), StoreError> {
    out.extend(row_event(mapping, key, before, &after, expired));
    ws.set(db, key, after)
}

/// What a write did to the fields of one hash: whether it changed anything at all (a write that
/// sets values again changes nothing, and its entry is not written back), and the value each
/// mapped field had before the write first changed it. The row changed exactly when one of
/// those differs afterwards (the other mapped fields were not touched), so no row image is
/// built for a write that changes nothing mapped, which is most of them.
struct FieldChanges<'m> {
    mapping: &'m Mapping,
    /// Whether a field's value, presence or TTL changed.
    any: bool,
    /// Column position and the value before the write.
    saved: Vec<(usize, Option<Bytes>)>,
}

impl<'m> FieldChanges<'m> {
    fn new(mapping: &'m Mapping) -> FieldChanges<'m> {
        FieldChanges {
            mapping,
            any: false,
            saved: Vec::new(),
        }
    }

    /// A field's TTL changed (not in its row).
    fn ttl_changed(&mut self) {
        self.any = true;
    }

    /// To be called before `field` changes its value or presence; `old` is what it holds.
    /// Returns the mapping's own copy of the name when the field is mapped.
    fn changing(&mut self, field: &[u8], old: Option<&FieldValue>) -> Option<&'m Bytes> {
        self.any = true;
        let column = self.mapping.column_of(field)?;
        if !self.saved.iter().any(|(c, _)| *c == column) {
            self.saved.push((column, old.map(|f| f.value.clone())));
        }
        Some(&self.mapping.columns[column].0)
    }

    /// `field`'s value was replaced; `previous` is what it held (moved here, not copied: a
    /// clone of a value made its first reference count, an allocation, on every row change).
    fn replaced(&mut self, field: &[u8], previous: Bytes) {
        self.any = true;
        if let Some(column) = self.mapping.column_of(field) {
            if !self.saved.iter().any(|(c, _)| *c == column) {
                self.saved.push((column, Some(previous)));
            }
        }
    }

    /// Whether a mapped value differs between before the write and `fields`.
    fn row_changed(&self, fields: &Fields) -> bool {
        self.saved.iter().any(|(column, old)| {
            let field = &self.mapping.columns[*column].0;
            fields.get(field).map(|f| &f.value) != old.as_ref()
        })
    }
}

/// `HSET`-like writes: each pair sets its field (unless `only_new` and it exists) with the TTL
/// the write gives it.
fn set_fields(
    fields: &mut Fields,
    pairs: Pairs<'_>,
    only_new: bool,
    ttl: FieldTtl,
    changes: &mut FieldChanges,
) {
    for (field, value) in pairs.iter() {
        match fields.get_mut(field) {
            Some(_) if only_new => {}
            Some(old) => {
                let expire_at_ms = match ttl {
                    FieldTtl::Clear => None,
                    FieldTtl::Keep => old.expire_at_ms,
                    FieldTtl::At(at) => Some(at),
                };
                if old.expire_at_ms != expire_at_ms {
                    changes.ttl_changed();
                    old.expire_at_ms = expire_at_ms;
                }
                // The same value set again (common) is neither copied nor a row change.
                if old.value != value {
                    let previous = std::mem::replace(&mut old.value, owned(value));
                    changes.replaced(field, previous);
                }
            }
            None => {
                let expire_at_ms = match ttl {
                    FieldTtl::Clear | FieldTtl::Keep => None,
                    FieldTtl::At(at) => Some(at),
                };
                // A mapped field's name is shared with the mapping (every hash of the mapping
                // then compares its names in the same, cached, bytes: looking a field up among
                // names each in an allocation of its own was 7% of capture's thread).
                let name = match changes.changing(field, None) {
                    Some(shared) => shared.clone(),
                    None => owned(field),
                };
                let value = owned(value);
                fields.insert(
                    name,
                    FieldValue {
                        value,
                        expire_at_ms,
                    },
                );
            }
        }
    }
}

/// `bytes` in an allocation of its own. The arguments of a replicated command are slices of a
/// whole stream read (64 KiB or more): kept in the mirror (and its cache, for as long as the key
/// stays cached), a slice would keep that whole buffer alive, unseen by the cache's weight.
/// Measured: a "64 MB" cache of 100,000 small hashes grew the process by 300 MB and more
/// (scripts/soak.sh). Only what is stored is copied: names of new fields and values
/// ([`stored_copy`]: a short one inline).
pub(super) fn owned(bytes: &Bytes) -> Bytes {
    stored_copy(bytes)
}

fn parse_i64(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// Applies commands to a working set.
pub struct Applier<'m> {
    pub mappings: &'m Mappings,
    pub commands: &'m CommandTable,
    pub generation: u64,
    /// Whether a `#` field is an op (false: follow Redis exactly, for the raw state of keys with
    /// a pending op, or when `[acks] enabled = false`).
    pub ops: bool,
    /// The primary's clock: whether a `DEL` was an expiry.
    pub clock: &'m PrimaryClock,
}

impl Applier<'_> {
    /// Applies one command, parsed as `write`; row events go to `out`.
    pub fn apply(
        &self,
        ws: &mut WorkingSet,
        command: &Command,
        write: &Write,
        out: &mut Vec<RowEvent>,
    ) -> Result<Needs, StoreError> {
        let mut needs = Needs::default();
        let db = command.db;
        match write {
            Write::SetFields {
                key,
                pairs,
                only_new,
                ttl,
            } => {
                needs.op =
                    self.update_hash(ws, (db, key, write), command, out, |fields, changes| {
                        set_fields(fields, *pairs, *only_new, *ttl, changes)
                    })?;
            }
            Write::DeleteFields { key, fields } => {
                needs.op =
                    self.update_hash(ws, (db, key, write), command, out, |map, changes| {
                        for field in fields.iter() {
                            if let Some(old) = map.get(field) {
                                changes.changing(field, Some(old));
                                map.remove(field);
                            }
                        }
                    })?;
            }
            Write::IncrementField { key, field, by } => {
                needs.op =
                    self.update_hash(ws, (db, key, write), command, out, |fields, changes| {
                        let current = fields.get(field).and_then(|v| parse_i64(&v.value));
                        let value = Bytes::from(current.unwrap_or(0).wrapping_add(*by).to_string());
                        let shared = changes.changing(field, fields.get(field));
                        match fields.get_mut(field) {
                            Some(old) => old.value = value,
                            None => {
                                let expire_at_ms = None;
                                fields.insert(
                                    shared.cloned().unwrap_or_else(|| owned(field)),
                                    FieldValue {
                                        value,
                                        expire_at_ms,
                                    },
                                );
                            }
                        }
                    })?;
            }
            Write::FieldExpiry { key, at, fields } => {
                // A field's TTL is not in its row.
                needs.op =
                    self.update_hash(ws, (db, key, write), command, out, |map, changes| {
                        for field in fields.iter() {
                            if let Some(v) = map.get_mut(field) {
                                if v.expire_at_ms != *at {
                                    changes.ttl_changed();
                                    v.expire_at_ms = *at;
                                }
                            }
                        }
                    })?;
            }
            Write::Unreproducible { key } => self.refresh_if_watched(ws, db, key, &mut needs)?,
            Write::Delete { keys } => {
                for key in keys.iter() {
                    self.delete_key(ws, db, key, command, out)?;
                }
            }
            Write::Expire { key, at } => self.set_expire(ws, db, key, command, *at)?,
            Write::Move {
                from,
                to,
                to_db,
                copy,
            } => self.move_key(ws, command, (from, to, *to_db, *copy), out, &mut needs)?,
            Write::Restore {
                key,
                payload,
                expire_at_ms,
            } => self.restore(ws, command, key, *payload, *expire_at_ms, out, &mut needs)?,
            Write::Flush { db } => self.flush(ws, *db, command, out)?,
            Write::SwapDb { a, b, text } => {
                if a.is_some_and(|a| self.mappings.watches_db(a))
                    || b.is_some_and(|b| self.mappings.watches_db(b))
                {
                    needs.full_resync = Some(format!("SWAPDB {text} involves a mapped database"));
                }
            }
            Write::Resync { reason } => needs.full_resync = Some(reason.clone()),
            Write::Other => self.other_write(ws, command, out, &mut needs)?,
        }
        Ok(needs)
    }

    /// Loads what a field write reads of a large hash (stored by field, `buffer/window.rs`):
    /// the fields it names, the mapped ones and the `#` field. A hash with a `#` op (or
    /// getting one) is read whole: its op completes against the whole hash.
    fn see_named_fields(
        &self,
        ws: &mut WorkingSet,
        (db, key, mapping): (u32, &Bytes, &Mapping),
        write: &Write,
    ) -> Result<(), StoreError> {
        let named: Vec<&[u8]> = match write {
            Write::SetFields { pairs, .. } => pairs.iter().map(|(f, _)| &f[..]).collect(),
            Write::DeleteFields { fields, .. } | Write::FieldExpiry { fields, .. } => {
                fields.iter().map(|f| &f[..]).collect()
            }
            Write::IncrementField { field, .. } => vec![&field[..]],
            _ => Vec::new(),
        };
        let op_named = named.contains(&OP_FIELD);
        ws.see_fields(
            db,
            key,
            named
                .into_iter()
                .chain(mapping.mapped_fields())
                .chain([OP_FIELD]),
        )?;
        let holds_op = ws
            .peek(db, key)?
            .as_ref()
            .is_some_and(|v| v.fields.contains_key(OP_FIELD));
        if self.ops && (op_named || holds_op) {
            ws.get_whole(db, key)?;
        }
        Ok(())
    }

    /// The mapping watching a key and the key's mirrored state, unless the key is not watched or
    /// its state already contains this command (it was refreshed from the primary later). Of a
    /// large hash, the mapped fields are loaded (the row before the command).
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
        ws.see_fields(db, key, mapping.mapped_fields())?;
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
            .is_some_and(|v| v.refreshed_through >= command.end)
    }

    /// Changes the fields of a watched hash in place (no copy of the hash). `change` reports
    /// what it changes ([`FieldChanges`]): the row changed when the hash appeared or
    /// disappeared, or when a mapped value differs afterwards; a hash the write left as it was
    /// is not written back.
    fn update_hash(
        &self,
        ws: &mut WorkingSet,
        (db, key, write): (u32, &Bytes, &Write),
        command: &Command,
        out: &mut Vec<RowEvent>,
        change: impl FnOnce(&mut Fields, &mut FieldChanges),
    ) -> Result<Option<OpSeen>, StoreError> {
        let Some(mapping) = self.mappings.watching(db, key) else {
            return Ok(None);
        };
        // Where the mirror cache holds the key, it is changed there: a write that sets values
        // again (most, when values repeat) then neither moves the entry out of the cache nor
        // puts it back (`WorkingSet::update_cached`).
        let in_cache = ws.update_cached(db, key, change, |value, change| {
            if Self::already_in(value, command) {
                return (None, false);
            }
            self.change_hash(value, (mapping, db, key), out, change)
        });
        let change = match in_cache {
            Ok(seen) => return Ok(seen),
            Err(change) => change,
        };
        let before = ws.peek(db, key)?;
        if Self::already_in(before, command) {
            return Ok(None);
        }
        // A large hash: what the command reads is loaded first (a small one holds it all).
        if before.as_ref().is_some_and(|v| v.fields.window().is_some()) {
            self.see_named_fields(ws, (db, key, mapping), write)?;
        }
        ws.update(db, key, |value| {
            self.change_hash(value, (mapping, db, key), out, change)
        })
    }

    /// The body of [`Applier::update_hash`], on the key's value: the op seen, and whether the
    /// value changed (an op was seen, a field changed, or the key was not a hash).
    fn change_hash(
        &self,
        value: &mut Option<MirrorValue>,
        (mapping, db, key): (&Mapping, u32, &Bytes),
        out: &mut Vec<RowEvent>,
        change: impl FnOnce(&mut Fields, &mut FieldChanges),
    ) -> (Option<OpSeen>, bool) {
        let mut changes = FieldChanges::new(mapping);
        let had_row = has_row(value);
        let was_hash = matches!(value, Some(v) if v.kind == MirrorKind::Hash);
        let hash = match value {
            Some(v) if v.kind == MirrorKind::Hash => v,
            // The command succeeded, so the key was a hash (or absent).
            _ => value.insert(MirrorValue::hash(self.generation)),
        };
        change(&mut hash.fields, &mut changes);
        if self.ops && hash.fields.contains_key(OP_FIELD) {
            let after = std::mem::replace(hash, MirrorValue::hash(self.generation));
            let (intended, event, seen) = apply_op(mapping, db, key, after);
            out.extend(event);
            *value = intended;
            return (Some(seen), true);
        }
        let has_row = !hash.fields.is_empty();
        let event = match (had_row, has_row) {
            // Created, or a mapped value changed: the full image.
            (false, true) => Some(upsert(mapping, key, &hash.fields)),
            (true, true) if changes.row_changed(&hash.fields) => {
                Some(upsert(mapping, key, &hash.fields))
            }
            (true, false) => row_event_between(mapping, key, Some(Vec::new()), None, false),
            _ => None,
        };
        if !has_row {
            *value = None;
        }
        out.extend(event);
        (None, changes.any || !was_hash)
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
        let expired = match before.as_ref().and_then(|v| v.expire_at_ms) {
            Some(at) => {
                let (deletion, ambiguous) = self.clock.deletion(at, command.end);
                let decision = match deletion {
                    Deletion::Expiry => "expiry",
                    Deletion::Delete => "delete",
                };
                let basis = if ambiguous { "ambiguous" } else { "samples" };
                metrics::counter!("writebehind_expiry_decisions_total", "decision" => decision, "basis" => basis).increment(1);
                deletion == Deletion::Expiry
            }
            None => false,
        };
        set_with_row(ws, (mapping, db, key), &before, None, expired, out)
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
    fn move_key(
        &self,
        ws: &mut WorkingSet,
        command: &Command,
        (from, to, to_db, copy): (&Bytes, &Bytes, u32, bool),
        out: &mut Vec<RowEvent>,
        needs: &mut Needs,
    ) -> Result<(), StoreError> {
        let from_db = command.db;
        if from_db == to_db && from == to {
            return Ok(());
        }
        let source_mapping = self.mappings.watching(from_db, from);
        let source = match source_mapping {
            // Whole: the destination gets every field.
            Some(_) if self.mappings.watching(to_db, to).is_some() => {
                ws.get_whole(from_db, from)?
            }
            // Only deleted (or copied away from): its row needs its mapped fields alone, and a
            // large hash is not read whole for it.
            Some(mapping) => {
                ws.see_fields(from_db, from, mapping.mapped_fields())?;
                ws.get(from_db, from)?
            }
            None => None,
        };
        let source_ahead = Self::already_in(&source, command);
        if let Some(mapping) = source_mapping {
            if !copy && !source_ahead && source.is_some() {
                set_with_row(ws, (mapping, from_db, from), &source, None, false, out)?;
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
            v.refreshed_through = ReplOffset(0);
        }
        set_with_row(ws, (mapping, to_db, to), &before, after, false, out)
    }

    #[allow(clippy::too_many_arguments)]
    fn restore(
        &self,
        ws: &mut WorkingSet,
        command: &Command,
        key: &Bytes,
        payload: Option<&Bytes>,
        expire_at_ms: Option<i64>,
        out: &mut Vec<RowEvent>,
        needs: &mut Needs,
    ) -> Result<(), StoreError> {
        let db = command.db;
        let Some((mapping, before)) = self.watched(ws, db, key, command)? else {
            return Ok(());
        };
        let Some(payload) = payload else {
            return Ok(());
        };
        let decoded = match decode_dump_payload(payload) {
            Ok(decoded) => decoded,
            Err(error) => {
                tracing::warn!(key = %String::from_utf8_lossy(key), %error, "RESTORE payload not decodable; reading the key from the primary");
                needs.refresh.push((db, key.clone()));
                return Ok(());
            }
        };
        let after = mirror_value_from_dump(decoded, self.generation, expire_at_ms);
        set_with_row(ws, (mapping, db, key), &before, after, false, out)
    }

    fn flush(
        &self,
        ws: &mut WorkingSet,
        db: Option<u32>,
        command: &Command,
        out: &mut Vec<RowEvent>,
    ) -> Result<(), StoreError> {
        // Entries already in the working set, then everything stored.
        let mut keys = ws.held_keys(db);
        let mut cursor = Some(crate::buffer::MirrorCursor::default());
        while let Some(from) = cursor.take() {
            let page = ws.store().mirror_scan(db, &from, 1024)?;
            cursor = page.next;
            keys.extend(page.entries.into_iter().map(|(d, k, _)| (d, k)));
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
            set_with_row(ws, (mapping, key_db, &key), &before, None, false, out)?;
        }
        Ok(())
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
                set_with_row(
                    ws,
                    (mapping, command.db, &key),
                    &before,
                    Some(after),
                    false,
                    out,
                )?;
            } else {
                needs.unknown_command = Some(command.name());
                needs.refresh.push((command.db, key));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "apply_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "large_hash_tests.rs"]
mod large_hash_tests;

#[cfg(test)]
#[path = "cached_apply_tests.rs"]
mod cached_apply_tests;
