//! The `#` op field and acknowledgements: what this service writes back to Redis (docs/design.md
//! section 4).
//!
//! # The op field
//!
//! A client writes `HSET key f v ... # <op>[uuid]`. `<op>` is one character:
//!
//! | op | Redis | database | ack to `{key}uuid` |
//! |---|---|---|---|
//! | `=` (default) | `#` removed, data kept | full row upserted, also when only `#` was written | after the database commit |
//! | `+` | `#` removed, data kept | untouched | once durably captured |
//! | `-` | key deleted | untouched (row kept) | once durably captured |
//! | `~` | key deleted | row deleted | after the database commit |
//! | other, empty | `#` removed | untouched | `status failed reason invalid op` |
//!
//! The uuid is everything after the first character (the recipe's split); no uuid, no ack.
//!
//! # Completing an op written with a plain `HSET`
//!
//! Redis stores the `#` field; the service sees the `HSET` in the replication stream, applies the
//! op to its mirror (which then holds the state the op gives) and keeps what Redis really holds
//! in the buffer's `raw` column family. Every later command on that key is applied to both, so
//! both stay exact whatever the client writes next. The [`writer`] then calls
//! `FCALL writebehind_complete 1 key <raw fields> <mirror fields> <persist>`, a compare-and-set:
//! if the key still holds exactly the raw fields, the function rewrites it to the mirror's
//! fields (or deletes it); if the client has written the key since, it does nothing and the
//! writer tries again once capture has seen those writes. `HSET k a 1 # -` followed at once by
//! `HSET k b 2` therefore ends as `{b: 2}` in Redis, exactly as if the op had been atomic.
//!
//! # Recognising our own writes
//!
//! Every write the library makes for an op starts, inside the same atomic unit (a function's
//! effects replicate as one `MULTI`), with `PUBLISH __writebehind__ <kind>:<n>:<op><key>`, where
//! `<n>` is the byte length of `<op>`. `complete` units are applied to the raw state only (they
//! bring Redis to the mirror's state; they are not user changes). `op` units come from the
//! atomic entry point `FCALL writebehind_hset`: their commands are ordinary changes and the tag
//! carries the op and uuid.
//!
//! Any client may publish to the channel, so a tag is believed only when it cannot be a
//! forgery (docs/design.md section 4.4):
//! - a `complete` tag carries, in the `<op>` slot, a random nonce the write-back task chose for
//!   that call and registered in [`Writeback`]; capture honours it only when it matches an
//!   issued completion (once: a replay does not match) and the unit only writes that key. A
//!   genuine completion left unmatched (issued before a restart) is harmless as a client write:
//!   it brings Redis to the state the mirror already holds;
//! - an `op` tag is believed only when the unit's commands write that key alone, and, for `-`
//!   and `~`, leave it absent. A unit of that shape has the effect `writebehind_hset` gives, which
//!   any client may call anyway.
//!
//! Otherwise the unit is applied as the client's own commands, and
//! `writebehind_forged_tags_total{kind}` counts it.
//!
//! # Acknowledgements
//!
//! Acks are queued durably in the buffer (`acks`): by capture for `+`, `-` and invalid ops, by
//! each sink runner after its commit for `=` and `~` (`status failed reason <why>` when the row
//! was dead-lettered). The writer sends them in order, pipelined, through
//! `FCALL writebehind_ack` (`XADD {key}uuid * status done` and `EXPIRE`, atomically), then
//! deletes them from the queue. A crash between the two writes an ack twice: a client reading
//! from `0-0` sees the first entry.

mod redirect;
pub mod writer;

use std::collections::HashSet;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::replication::stream::Command;

/// The function library (Lua), loaded with `FUNCTION LOAD REPLACE`.
pub const LIBRARY: &str = include_str!("writebehind.lua");
/// The version `writebehind_version` returns; the service upgrades an older library.
pub const LIBRARY_VERSION: i64 = 4;
/// The field that carries the op.
pub const OP_FIELD: &[u8] = b"#";
/// The reason of the `failed` ack of an invalid op (one with a uuid is never empty).
pub const INVALID_OP: &str = "invalid op: unknown operation";
/// The channel of the tags that mark the library's writes.
pub const TAG_CHANNEL: &[u8] = b"__writebehind__";

/// How capture and the sink runners wake the write-back task: keys whose raw state capture
/// has just written (their op may need completing), and a wake-up for newly queued acks. It
/// also holds the completions the write-back task has issued and capture has not seen yet:
/// a completion tag counts only when it matches one of them (and only once).
#[derive(Debug, Default)]
pub struct Writeback {
    touched: Mutex<HashSet<(u32, Bytes)>>,
    wake: Notify,
    issued: Mutex<HashSet<(u32, Bytes, Bytes)>>,
}

impl Writeback {
    /// Capture wrote the raw state of these keys.
    pub fn keys_touched(&self, keys: impl IntoIterator<Item = (u32, Bytes)>) {
        self.touched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(keys);
        self.wake.notify_one();
    }

    /// Acks were queued in the buffer.
    pub fn acks_queued(&self) {
        self.wake.notify_one();
    }

    /// The write-back task is about to send a completion of `key` tagged with `nonce`.
    pub fn issue(&self, db: u32, key: Bytes, nonce: Bytes) {
        self.issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((db, key, nonce));
    }

    /// A completion that wrote nothing (so published no tag) is forgotten.
    pub fn withdraw(&self, db: u32, key: &Bytes, nonce: &Bytes) {
        self.take_issued(db, key, nonce);
    }

    /// Whether a completion tag was issued by this service (it is forgotten: a replay of the
    /// same tag does not count).
    pub fn take_issued(&self, db: u32, key: &Bytes, nonce: &Bytes) -> bool {
        self.issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(db, key.clone(), nonce.clone()))
    }

    fn take_touched(&self) -> HashSet<(u32, Bytes)> {
        std::mem::take(&mut *self.touched.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn woken(&self) {
        self.wake.notified().await
    }
}

/// What an op does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `=`: keep the data, write the full row.
    Write,
    /// `+`: keep the data, do not write the row.
    KeepOnly,
    /// `-`: delete the key, keep the row.
    DeleteKeyOnly,
    /// `~`: delete the key and the row.
    Delete,
}

impl OpKind {
    pub fn from_char(c: u8) -> Option<OpKind> {
        match c {
            b'=' => Some(OpKind::Write),
            b'+' => Some(OpKind::KeepOnly),
            b'-' => Some(OpKind::DeleteKeyOnly),
            b'~' => Some(OpKind::Delete),
            _ => None,
        }
    }

    pub fn as_char(self) -> u8 {
        match self {
            OpKind::Write => b'=',
            OpKind::KeepOnly => b'+',
            OpKind::DeleteKeyOnly => b'-',
            OpKind::Delete => b'~',
        }
    }

    /// Whether the key is gone from Redis after the op.
    pub fn deletes_key(self) -> bool {
        matches!(self, OpKind::DeleteKeyOnly | OpKind::Delete)
    }
}

/// A parsed `#` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpField {
    /// `None`: not a valid op (empty, or an unknown first character).
    pub kind: Option<OpKind>,
    /// Everything after the first character, when not empty.
    pub uuid: Option<Bytes>,
}

impl OpField {
    pub fn parse(value: &Bytes) -> OpField {
        let kind = value.first().and_then(|c| OpKind::from_char(*c));
        let uuid = (value.len() > 1).then(|| value.slice(1..));
        OpField { kind, uuid }
    }
}

/// A write of the function library, recognised by its first command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tag {
    /// `writebehind_complete`: brings the key to the mirror's state; not a user change. The
    /// nonce says which completion the service issued.
    Completion { key: Bytes, nonce: Bytes },
    /// `writebehind_hset`: a user write whose op was applied atomically.
    Op { op: OpField, key: Bytes },
}

/// The key a tag is written to in a Redis Cluster: in `key`'s slot (`cluster::slot`), as the
/// library names it (`tag_key` in `writebehind.lua`). `None` for a key with `}` and no hash tag.
pub fn tag_key(key: &[u8]) -> Option<Vec<u8>> {
    let channel = TAG_CHANNEL;
    let mut reserved = Vec::with_capacity(channel.len() + key.len() + 3);
    reserved.extend_from_slice(channel);
    reserved.push(b':');
    if crate::cluster::slot::hash_tag(key).len() != key.len() {
        // A hash tag of its own, which stays the first one after the prefix.
        reserved.extend_from_slice(key);
        return Some(reserved);
    }
    if key.is_empty() || key.contains(&b'}') {
        return None;
    }
    reserved.push(b'{');
    reserved.extend_from_slice(key);
    reserved.push(b'}');
    Some(reserved)
}

/// The tag a unit starts with, and how many of its commands the tag takes: `PUBLISH
/// __writebehind__ <kind>:<n>:<op><key>` (1), or, in a cluster, `SET <tag key> <payload>` then
/// `DEL <tag key>` (2), the tag key being [`tag_key`] of the payload's key.
pub fn parse_tag(commands: &[Command]) -> Option<(Tag, usize)> {
    let first = commands.first()?;
    let args = &first.args;
    if args.len() == 3
        && args[0].eq_ignore_ascii_case(b"PUBLISH")
        && args[1].as_ref() == TAG_CHANNEL
    {
        return parse_payload(&args[2]).map(|tag| (tag, 1));
    }
    if args.len() != 3 || !args[0].eq_ignore_ascii_case(b"SET") || !args[1].starts_with(TAG_CHANNEL)
    {
        return None;
    }
    let deleted = commands.get(1).is_some_and(|c| {
        c.args.len() == 2 && c.args[0].eq_ignore_ascii_case(b"DEL") && c.args[1] == args[1]
    });
    let tag = parse_payload(&args[2]).filter(|_| deleted)?;
    let key = match &tag {
        Tag::Completion { key, .. } | Tag::Op { key, .. } => key,
    };
    (tag_key(key).as_deref() == Some(&args[1][..])).then_some((tag, 2))
}

/// `<kind>:<n>:<op><key>`.
fn parse_payload(payload: &Bytes) -> Option<Tag> {
    let colon = payload.iter().position(|&b| b == b':')?;
    let (kind, rest) = (&payload[..colon], colon + 1);
    let second = rest + payload[rest..].iter().position(|&b| b == b':')?;
    let length: usize = std::str::from_utf8(&payload[rest..second])
        .ok()?
        .parse()
        .ok()?;
    let op_start = second + 1;
    let op_end = op_start.checked_add(length)?;
    if op_end > payload.len() {
        return None;
    }
    let key = payload.slice(op_end..);
    match kind {
        b"complete" => Some(Tag::Completion {
            key,
            nonce: payload.slice(op_start..op_end),
        }),
        b"op" => Some(Tag::Op {
            op: OpField::parse(&payload.slice(op_start..op_end)),
            key,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::ReplOffset;

    fn publish(payload: &[u8]) -> Command {
        Command {
            args: vec![
                Bytes::from_static(b"PUBLISH"),
                Bytes::from_static(TAG_CHANNEL),
                Bytes::copy_from_slice(payload),
            ],
            db: 0,
            end: ReplOffset(1),
        }
    }

    #[test]
    fn op_values_split_as_the_recipe_does() {
        let parse = |v: &'static str| OpField::parse(&Bytes::from(v));
        assert_eq!(
            parse("=1"),
            OpField {
                kind: Some(OpKind::Write),
                uuid: Some(Bytes::from("1"))
            }
        );
        assert_eq!(parse("~").kind, Some(OpKind::Delete));
        assert_eq!(parse("~").uuid, None);
        assert_eq!(parse("-x-y").uuid, Some(Bytes::from("x-y")));
        assert_eq!(parse("").kind, None);
        assert_eq!(parse("x").kind, None);
        assert_eq!(parse("x7").uuid, Some(Bytes::from("7")));
    }

    #[test]
    fn tags_parse_and_anything_else_is_not_a_tag() {
        assert_eq!(
            parse_tag(&[publish(b"complete:3:abcp:1")]),
            Some((
                Tag::Completion {
                    key: Bytes::from("p:1"),
                    nonce: Bytes::from("abc")
                },
                1
            ))
        );
        assert_eq!(
            parse_tag(&[publish(b"op:3:~u1p:a:b")]),
            Some((
                Tag::Op {
                    op: OpField::parse(&Bytes::from("~u1")),
                    key: Bytes::from("p:a:b")
                },
                1
            ))
        );
        for bad in [&b"op:9:~u"[..], b"op:x:~", b"other:0:k", b"complete", b""] {
            assert_eq!(parse_tag(&[publish(bad)]), None, "{bad:?}");
        }
        let mut other_channel = publish(b"complete:0:k");
        other_channel.args[1] = Bytes::from("news");
        assert_eq!(parse_tag(&[other_channel]), None);
    }

    fn command(args: &[&[u8]]) -> Command {
        Command {
            args: args.iter().map(|a| Bytes::copy_from_slice(a)).collect(),
            db: 0,
            end: ReplOffset(1),
        }
    }

    #[test]
    fn tag_keys_share_the_key_s_slot() {
        use crate::cluster::slot::slot_of;
        for key in [&b"p:1"[..], b"p:{t}1", b"{u}", b"a{b"] {
            let reserved = tag_key(key).expect("a tag key");
            assert_eq!(slot_of(&reserved), slot_of(key), "{key:?}");
            assert!(reserved.starts_with(b"__writebehind__:"));
        }
        assert_eq!(tag_key(b"p:1").unwrap(), b"__writebehind__:{p:1}");
        assert_eq!(tag_key(b"p:{t}1").unwrap(), b"__writebehind__:p:{t}1");
        assert_eq!(tag_key(b"a}b"), None);
        assert_eq!(tag_key(b"{}x}"), None);
        assert_eq!(tag_key(b"x{}{y}"), None);
        assert_eq!(tag_key(b""), None);
    }

    #[test]
    fn a_cluster_tag_is_a_set_and_del_of_the_key_s_tag_key() {
        let set = command(&[b"SET", b"__writebehind__:{p:1}", b"op:3:=u1p:1"]);
        let del = command(&[b"DEL", b"__writebehind__:{p:1}"]);
        let write = command(&[b"HSET", b"p:1", b"a", b"1"]);
        assert_eq!(
            parse_tag(&[set.clone(), del.clone(), write.clone()]),
            Some((
                Tag::Op {
                    op: OpField::parse(&Bytes::from("=u1")),
                    key: Bytes::from("p:1")
                },
                2
            ))
        );
        // Without its DEL, with another key's tag key, or a SET of anything else: no tag.
        assert_eq!(parse_tag(&[set.clone(), write.clone()]), None);
        let elsewhere = command(&[b"SET", b"__writebehind__:{p:2}", b"op:3:=u1p:1"]);
        let elsewhere_del = command(&[b"DEL", b"__writebehind__:{p:2}"]);
        assert_eq!(parse_tag(&[elsewhere, elsewhere_del, write.clone()]), None);
        assert_eq!(parse_tag(&[command(&[b"SET", b"k", b"v"]), del]), None);
    }
}
