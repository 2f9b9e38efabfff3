//! The typed command layer: every replicated command is parsed once into a [`Write`], which
//! both the mirror ([`super::apply`]) and the raw states of `#` ops (`ops.rs`) consume, so
//! the two can never read the same command differently.
//!
//! Parsing is total: a command this service does not model, or one whose arguments it cannot
//! read, is [`Write::Other`] (classified later through the primary's command table) or a
//! [`Write::Resync`] when the mirror cannot follow it. Relative times (`EXPIRE`, `PX`, a
//! relative `RESTORE` TTL) are made absolute with the `now_ms` given to [`Write::parse`].
//! Options are read only where the syntax puts them, so keys and values named like options
//! (`db`, `replace`, `fields`) are never taken for one.

use bytes::Bytes;

use crate::replication::stream::Command;

/// What a field write does to the field's TTL (Redis 7.4+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldTtl {
    /// `HSET`, `HSETNX`, `HSETEX` without a TTL option: the field has no TTL.
    Clear,
    /// `HSETEX ... KEEPTTL`: the field keeps the TTL it had.
    Keep,
    /// An absolute time in milliseconds.
    At(i64),
}

/// A replicated write, as capture models it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// `HSET`, `HMSET`, `HSETNX` (`only_new`), `HSETEX`.
    SetFields {
        key: Bytes,
        pairs: Vec<(Bytes, Bytes)>,
        only_new: bool,
        ttl: FieldTtl,
    },
    /// `HDEL`.
    DeleteFields { key: Bytes, fields: Vec<Bytes> },
    /// `HINCRBY`.
    IncrementField { key: Bytes, field: Bytes, by: i64 },
    /// `HPEXPIREAT` (`at` set) and `HPERSIST` (`None`).
    FieldExpiry {
        key: Bytes,
        at: Option<i64>,
        fields: Vec<Bytes>,
    },
    /// A write whose effect cannot be reproduced bit for bit (`HINCRBYFLOAT` sent verbatim by a
    /// very old primary): the key is read from the primary instead.
    Unreproducible { key: Bytes },
    /// `DEL`, `UNLINK`.
    Delete { keys: Vec<Bytes> },
    /// `PEXPIREAT`, `EXPIREAT`, `PEXPIRE`, `EXPIRE` (`at` set) and `PERSIST` (`None`).
    Expire { key: Bytes, at: Option<i64> },
    /// `RENAME`, `RENAMENX`, `MOVE` and `COPY`: `to` in `to_db` gets `from`'s value; `from` is
    /// gone unless `copy`.
    Move {
        from: Bytes,
        to: Bytes,
        to_db: u32,
        copy: bool,
    },
    /// `RESTORE key ttl payload [REPLACE] [ABSTTL] ...`; `expire_at_ms` already absolute.
    Restore {
        key: Bytes,
        payload: Option<Bytes>,
        expire_at_ms: Option<i64>,
    },
    /// `FLUSHDB` (`Some(db)`) and `FLUSHALL` (`None`).
    Flush { db: Option<u32> },
    /// `SWAPDB a b` (`None` where the argument is not a database number).
    SwapDb {
        a: Option<u32>,
        b: Option<u32>,
        text: String,
    },
    /// The mirror cannot follow this command: a full resynchronisation, for this reason.
    Resync { reason: String },
    /// Anything else: classified by the primary's command table.
    Other,
}

fn parse_i64(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn parse_u32(b: &[u8]) -> Option<u32> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// Longer than any name [`Write::parse`] models (a longer one is [`Write::Other`]).
const NAME_BUFFER: usize = 24;

impl Write {
    /// Parses `command`; `now_ms` makes relative times absolute.
    pub fn parse(command: &Command, now_ms: i64) -> Write {
        let args = &command.args;
        let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
        let mut upper = [0u8; NAME_BUFFER];
        let name = command.name_in(&mut upper);
        match name {
            "HSET" | "HMSET" => Write::SetFields {
                key: arg(1),
                pairs: pairs(args.get(2..).unwrap_or_default()),
                only_new: false,
                ttl: FieldTtl::Clear,
            },
            "HSETNX" => Write::SetFields {
                key: arg(1),
                pairs: vec![(arg(2), arg(3))],
                only_new: true,
                ttl: FieldTtl::Clear,
            },
            "HSETEX" => hsetex(args, now_ms),
            "HDEL" => Write::DeleteFields {
                key: arg(1),
                fields: args.iter().skip(2).cloned().collect(),
            },
            "HINCRBY" => Write::IncrementField {
                key: arg(1),
                field: arg(2),
                by: parse_i64(&arg(3)).unwrap_or(0),
            },
            "HINCRBYFLOAT" => Write::Unreproducible { key: arg(1) },
            // HPEXPIREAT key ms [NX|XX|GT|LT] FIELDS n f...
            "HPEXPIREAT" => Write::FieldExpiry {
                key: arg(1),
                at: parse_i64(&arg(2)),
                fields: fields_argument(args, 3),
            },
            // HPERSIST key FIELDS n f...
            "HPERSIST" => Write::FieldExpiry {
                key: arg(1),
                at: None,
                fields: fields_argument(args, 2),
            },
            "DEL" | "UNLINK" => Write::Delete {
                keys: args.iter().skip(1).cloned().collect(),
            },
            "PEXPIREAT" | "EXPIREAT" | "PEXPIRE" | "EXPIRE" | "PERSIST" => {
                let value = parse_i64(&arg(2)).unwrap_or(0);
                let at = match name {
                    "PEXPIREAT" => Some(value),
                    "EXPIREAT" => Some(value.saturating_mul(1000)),
                    "PEXPIRE" => Some(now_ms.saturating_add(value)),
                    "EXPIRE" => Some(now_ms.saturating_add(value.saturating_mul(1000))),
                    _ => None,
                };
                Write::Expire { key: arg(1), at }
            }
            "RENAME" | "RENAMENX" => Write::Move {
                from: arg(1),
                to: arg(2),
                to_db: command.db,
                copy: false,
            },
            "MOVE" => match parse_u32(&arg(2)) {
                Some(to_db) => Write::Move {
                    from: arg(1),
                    to: arg(1),
                    to_db,
                    copy: false,
                },
                None => Write::Resync {
                    reason: format!("MOVE with database {:?}", String::from_utf8_lossy(&arg(2))),
                },
            },
            "COPY" => copy(command),
            "RESTORE" => restore(args, now_ms),
            "FLUSHDB" => Write::Flush {
                db: Some(command.db),
            },
            "FLUSHALL" => Write::Flush { db: None },
            "SWAPDB" => Write::SwapDb {
                a: parse_u32(&arg(1)),
                b: parse_u32(&arg(2)),
                text: format!(
                    "{} {}",
                    String::from_utf8_lossy(&arg(1)),
                    String::from_utf8_lossy(&arg(2))
                ),
            },
            // Since Redis 7 (and by default since 5) scripts replicate their effects; a script
            // sent verbatim cannot be reproduced here.
            "EVAL" | "EVALSHA" | "EVAL_RO" | "EVALSHA_RO" | "FCALL" | "FCALL_RO" => Write::Resync {
                reason: format!(
                    "{name} replicated verbatim (the primary replicates scripts, not their effects)"
                ),
            },
            _ => Write::Other,
        }
    }

    /// Every `(db, key)` this write may read or change, for the keys named by its arguments
    /// (a flush names none: it touches whole databases).
    pub fn keys(&self, db: u32) -> Vec<(u32, &Bytes)> {
        match self {
            Write::SetFields { key, .. }
            | Write::DeleteFields { key, .. }
            | Write::IncrementField { key, .. }
            | Write::FieldExpiry { key, .. }
            | Write::Unreproducible { key }
            | Write::Expire { key, .. }
            | Write::Restore { key, .. } => vec![(db, key)],
            Write::Delete { keys } => keys.iter().map(|k| (db, k)).collect(),
            Write::Move {
                from, to, to_db, ..
            } => vec![(db, from), (*to_db, to)],
            Write::Flush { .. } | Write::SwapDb { .. } | Write::Resync { .. } | Write::Other => {
                Vec::new()
            }
        }
    }
}

fn pairs(args: &[Bytes]) -> Vec<(Bytes, Bytes)> {
    args.chunks_exact(2)
        .map(|p| (p[0].clone(), p[1].clone()))
        .collect()
}

/// `HSETEX key [FNX|FXX] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL] FIELDS n field value ...`, as the
/// primary propagates it: a relative time rewritten in place to `PXAT <ms>`, every other word
/// kept where the client put it. Since Redis 8.4 (redis#14416) the options may also follow the
/// `FIELDS` block (`HSETEX k FIELDS 1 f v PXAT 5000 FNX`), so options are read on both sides of
/// it, and the block itself is skipped by its count (a field or value named `PX` is data).
/// `FNX`/`FXX` need nothing: a write whose condition failed is not propagated.
fn hsetex(args: &[Bytes], now_ms: i64) -> Write {
    let mut ttl = FieldTtl::Clear;
    let mut found = Vec::new();
    let mut i = 2;
    while i < args.len() {
        let word = args[i].to_ascii_uppercase();
        let number = args.get(i + 1).and_then(|n| parse_i64(n)).unwrap_or(0);
        let at = match word.as_slice() {
            b"PXAT" => Some(number),
            b"EXAT" => Some(number.saturating_mul(1000)),
            b"PX" => Some(now_ms.saturating_add(number)),
            b"EX" => Some(now_ms.saturating_add(number.saturating_mul(1000))),
            _ => None,
        };
        if let Some(at) = at {
            ttl = FieldTtl::At(at);
            i += 2;
            continue;
        }
        match word.as_slice() {
            b"KEEPTTL" => ttl = FieldTtl::Keep,
            b"FIELDS" if found.is_empty() => {
                let n = number.max(0) as usize;
                let block = args.get(i + 2..).unwrap_or_default();
                found = pairs(block).into_iter().take(n).collect();
                i += 2 + 2 * found.len();
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Write::SetFields {
        key: args.get(1).cloned().unwrap_or_default(),
        pairs: found,
        only_new: false,
        ttl,
    }
}

/// `COPY source destination [DB destination-db] [REPLACE]`: options start at index 3.
fn copy(command: &Command) -> Write {
    let args = &command.args;
    let mut to_db = command.db;
    let mut i = 3;
    while i < args.len() {
        if args[i].eq_ignore_ascii_case(b"DB") {
            match args.get(i + 1).and_then(|d| parse_u32(d)) {
                Some(db) => to_db = db,
                None => {
                    return Write::Resync {
                        reason: "COPY with an unreadable DB option".into(),
                    }
                }
            }
            i += 1;
        }
        i += 1;
    }
    Write::Move {
        from: args.get(1).cloned().unwrap_or_default(),
        to: args.get(2).cloned().unwrap_or_default(),
        to_db,
        copy: true,
    }
}

/// `RESTORE key ttl serialized-value [REPLACE] [ABSTTL] [IDLETIME s] [FREQ f]`
fn restore(args: &[Bytes], now_ms: i64) -> Write {
    let ttl = args.get(2).and_then(|t| parse_i64(t)).unwrap_or(0);
    let absolute = args
        .iter()
        .skip(4)
        .any(|a| a.eq_ignore_ascii_case(b"ABSTTL"));
    let expire_at_ms = match (ttl, absolute) {
        (0, _) => None,
        (t, true) => Some(t),
        (t, false) => Some(now_ms.saturating_add(t)),
    };
    Write::Restore {
        key: args.get(1).cloned().unwrap_or_default(),
        payload: args.get(3).cloned(),
        expire_at_ms,
    }
}

/// The field names after `FIELDS n`, searching from `start` (the options before it are
/// single words or a number, so the first `FIELDS` at or after `start` is the keyword).
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
    use crate::position::ReplOffset;

    fn parse(args: &[&str]) -> Write {
        Write::parse(&Command::from_words(args, 0, ReplOffset(1)), 1_000)
    }

    fn b(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    #[test]
    fn keys_named_like_options_are_keys() {
        assert_eq!(
            parse(&["COPY", "db", "replace", "DB", "1", "REPLACE"]),
            Write::Move {
                from: b("db"),
                to: b("replace"),
                to_db: 1,
                copy: true
            }
        );
        assert_eq!(
            parse(&["COPY", "db", "fields"]),
            Write::Move {
                from: b("db"),
                to: b("fields"),
                to_db: 0,
                copy: true
            }
        );
        assert_eq!(
            parse(&[
                "HPEXPIREAT",
                "fields",
                "5000",
                "FIELDS",
                "2",
                "fields",
                "db"
            ]),
            Write::FieldExpiry {
                key: b("fields"),
                at: Some(5000),
                fields: vec![b("fields"), b("db")]
            }
        );
        assert_eq!(
            parse(&["HPERSIST", "fields", "FIELDS", "1", "replace"]),
            Write::FieldExpiry {
                key: b("fields"),
                at: None,
                fields: vec![b("replace")]
            }
        );
        assert_eq!(
            parse(&["HSETEX", "fields", "KEEPTTL", "FIELDS", "1", "px", "1"]),
            Write::SetFields {
                key: b("fields"),
                pairs: vec![(b("px"), b("1"))],
                only_new: false,
                ttl: FieldTtl::Keep
            }
        );
        // Redis 8.4+: options after the FIELDS block, in the client's order; a field or a value
        // named like an option is data.
        for (args, ttl) in [
            (
                &[
                    "HSETEX", "k", "FIELDS", "1", "PX", "KEEPTTL", "PXAT", "5000", "FNX",
                ][..],
                FieldTtl::At(5000),
            ),
            (
                &[
                    "HSETEX", "k", "FXX", "FIELDS", "1", "PX", "KEEPTTL", "KEEPTTL",
                ],
                FieldTtl::Keep,
            ),
            (
                &["HSETEX", "k", "FIELDS", "1", "PX", "KEEPTTL"],
                FieldTtl::Clear,
            ),
            (
                &[
                    "HSETEX", "k", "PXAT", "7000", "FXX", "FIELDS", "1", "PX", "KEEPTTL",
                ],
                FieldTtl::At(7000),
            ),
        ] {
            assert_eq!(
                parse(args),
                Write::SetFields {
                    key: b("k"),
                    pairs: vec![(b("PX"), b("KEEPTTL"))],
                    only_new: false,
                    ttl
                },
                "{args:?}"
            );
        }
        assert_eq!(
            parse(&["MOVE", "db", "3"]),
            Write::Move {
                from: b("db"),
                to: b("db"),
                to_db: 3,
                copy: false
            }
        );
    }

    #[test]
    fn relative_times_become_absolute_and_bad_numbers_resync() {
        assert_eq!(
            parse(&["PEXPIRE", "k", "500"]),
            Write::Expire {
                key: b("k"),
                at: Some(1_500)
            }
        );
        assert_eq!(
            parse(&["RESTORE", "k", "20", "payload"]),
            Write::Restore {
                key: b("k"),
                payload: Some(b("payload")),
                expire_at_ms: Some(1_020)
            }
        );
        assert!(matches!(parse(&["MOVE", "k", "x"]), Write::Resync { .. }));
        assert!(matches!(
            parse(&["COPY", "a", "b", "DB", "x"]),
            Write::Resync { .. }
        ));
        assert!(matches!(
            parse(&["EVAL", "return 1", "0"]),
            Write::Resync { .. }
        ));
        assert_eq!(parse(&["SET", "k", "v"]), Write::Other);
    }
}
