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

use super::command::{FieldTtl, Write};
use super::command_table::CommandTable;
use super::mapping::{Mapping, Mappings};
use super::ops::{apply_op, OpSeen};
use super::rows::{mirror_value_from_dump, row_event, RowEvent};
use super::working_set::WorkingSet;
use crate::ack::OP_FIELD;
use crate::buffer::{FieldValue, MirrorKind, MirrorValue, StoreError};
use crate::clock::now_ms;
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
                needs.op = self.update_hash(ws, db, key, command, out, |fields| {
                    for (field, value) in pairs {
                        if *only_new && fields.contains_key(field) {
                            continue;
                        }
                        let expire_at_ms = match ttl {
                            FieldTtl::Clear => None,
                            FieldTtl::Keep => fields.get(field).and_then(|old| old.expire_at_ms),
                            FieldTtl::At(at) => Some(*at),
                        };
                        fields.insert(
                            field.clone(),
                            FieldValue {
                                value: value.clone(),
                                expire_at_ms,
                            },
                        );
                    }
                })?;
            }
            Write::DeleteFields { key, fields } => {
                needs.op = self.update_hash(ws, db, key, command, out, |map| {
                    for field in fields {
                        map.remove(field);
                    }
                })?;
            }
            Write::IncrementField { key, field, by } => {
                needs.op = self.update_hash(ws, db, key, command, out, |fields| {
                    let old = fields.get(field);
                    let current = old.and_then(|v| parse_i64(&v.value)).unwrap_or(0);
                    let expire_at_ms = old.and_then(|v| v.expire_at_ms);
                    fields.insert(
                        field.clone(),
                        FieldValue {
                            value: Bytes::from(current.wrapping_add(*by).to_string()),
                            expire_at_ms,
                        },
                    );
                })?;
            }
            Write::FieldExpiry { key, at, fields } => {
                needs.op = self.update_hash(ws, db, key, command, out, |map| {
                    for field in fields {
                        if let Some(v) = map.get_mut(field) {
                            v.expire_at_ms = *at;
                        }
                    }
                })?;
            }
            Write::Unreproducible { key } => self.refresh_if_watched(ws, db, key, &mut needs)?,
            Write::Delete { keys } => {
                for key in keys {
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
            } => self.restore(
                ws,
                command,
                key,
                payload.as_ref(),
                *expire_at_ms,
                out,
                &mut needs,
            )?,
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
            .is_some_and(|v| v.refreshed_through >= command.end)
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
            v.refreshed_through = ReplOffset(0);
        }
        if let Some(event) = row_event(mapping, to, &before, &after, false) {
            out.push(event);
        }
        ws.set(to_db, to, after)
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
        if let Some(event) = row_event(mapping, key, &before, &after, false) {
            out.push(event);
        }
        ws.set(db, key, after)
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
            if let Some(event) = row_event(mapping, &key, &before, &None, false) {
                out.push(event);
            }
            ws.set(key_db, &key, None)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{HashOp, RowChange, Store};
    use crate::config::Config;
    use crate::position::ReplOffset;
    use redis_protocol::resp2::types::BytesFrame;
    use std::sync::Arc;

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
            let command = command(args, 100 + i as u64);
            let write = Write::parse(&command, now_ms());
            needs = applier.apply(&mut ws, &command, &write, &mut out).unwrap();
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
        let mut ws = ws;
        assert_eq!(
            ws.get(0, &Bytes::from("p:1")).unwrap().map(|v| v.kind),
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
        refreshed.refreshed_through = ReplOffset(500);
        refreshed.fields.insert(
            Bytes::from("n"),
            FieldValue {
                value: Bytes::from("10"),
                expire_at_ms: None,
            },
        );
        ws.set(0, &Bytes::from("p:1"), Some(refreshed)).unwrap();
        let mut out = Vec::new();
        let at_400 = command(&["HINCRBY", "p:1", "n", "1"], 400);
        let write = Write::parse(&at_400, now_ms());
        applier.apply(&mut ws, &at_400, &write, &mut out).unwrap();
        assert!(
            out.is_empty(),
            "the increment at 400 is already in the value read at 500"
        );
        let at_600 = command(&["HINCRBY", "p:1", "n", "1"], 600);
        let write = Write::parse(&at_600, now_ms());
        applier.apply(&mut ws, &at_600, &write, &mut out).unwrap();
        assert_eq!(out, vec![upsert("1", None, Some("11"))]);
    }
}

#[cfg(test)]
mod field_ttl_tests {
    use super::*;
    use crate::buffer::Store;
    use crate::config::Config;
    use crate::position::ReplOffset;
    use std::sync::Arc;

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
            let write = Write::parse(&command, now_ms());
            applier.apply(&mut ws, &command, &write, &mut out).unwrap();
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
