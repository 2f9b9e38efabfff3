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
//!
//! A `Write` borrows its command's arguments: a copy of each would take and drop a reference
//! count on the stream read they are sliced from, two atomic operations per argument (with the
//! vectors holding them, 9% of capture's thread went to these counts; docs/benchmarks.md,
//! session 23).

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

/// Field names and values, alternating, as the command sent them (an even number of words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pairs<'a>(&'a [Bytes]);

impl<'a> Pairs<'a> {
    /// The first `limit` pairs of `words` (a trailing word without its value is left out).
    fn of(words: &'a [Bytes], limit: usize) -> Pairs<'a> {
        let len = (words.len() / 2).min(limit) * 2;
        Pairs(&words[..len])
    }

    /// Each field with its value.
    pub fn iter(&self) -> impl Iterator<Item = (&'a Bytes, &'a Bytes)> {
        self.0.chunks_exact(2).map(|pair| (&pair[0], &pair[1]))
    }

    pub fn len(&self) -> usize {
        self.0.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A replicated write, as capture models it, borrowing its command's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write<'a> {
    /// `HSET`, `HMSET`, `HSETNX` (`only_new`), `HSETEX`.
    SetFields {
        key: &'a Bytes,
        pairs: Pairs<'a>,
        only_new: bool,
        ttl: FieldTtl,
    },
    /// `HDEL`.
    DeleteFields { key: &'a Bytes, fields: &'a [Bytes] },
    /// `HINCRBY`.
    IncrementField {
        key: &'a Bytes,
        field: &'a Bytes,
        by: i64,
    },
    /// `HPEXPIREAT` (`at` set) and `HPERSIST` (`None`).
    FieldExpiry {
        key: &'a Bytes,
        at: Option<i64>,
        fields: &'a [Bytes],
    },
    /// A write whose effect cannot be reproduced bit for bit (`HINCRBYFLOAT` sent verbatim by a
    /// very old primary): the key is read from the primary instead.
    Unreproducible { key: &'a Bytes },
    /// `DEL`, `UNLINK`.
    Delete { keys: &'a [Bytes] },
    /// `PEXPIREAT`, `EXPIREAT`, `PEXPIRE`, `EXPIRE` (`at` set) and `PERSIST` (`None`).
    Expire { key: &'a Bytes, at: Option<i64> },
    /// `RENAME`, `RENAMENX`, `MOVE` and `COPY`: `to` in `to_db` gets `from`'s value; `from` is
    /// gone unless `copy`.
    Move {
        from: &'a Bytes,
        to: &'a Bytes,
        to_db: u32,
        copy: bool,
    },
    /// `RESTORE key ttl payload [REPLACE] [ABSTTL] ...`; `expire_at_ms` already absolute.
    Restore {
        key: &'a Bytes,
        payload: Option<&'a Bytes>,
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

/// What a missing argument reads as.
static EMPTY: Bytes = Bytes::new();

impl<'a> Write<'a> {
    /// Parses `command`; `now_ms` makes relative times absolute.
    pub fn parse(command: &'a Command, now_ms: i64) -> Write<'a> {
        let args = &command.args[..];
        let arg = |i: usize| args.get(i).unwrap_or(&EMPTY);
        let mut upper = [0u8; NAME_BUFFER];
        let name = command.name_in(&mut upper);
        match name {
            "HSET" | "HMSET" => Write::SetFields {
                key: arg(1),
                pairs: Pairs::of(args.get(2..).unwrap_or_default(), usize::MAX),
                only_new: false,
                ttl: FieldTtl::Clear,
            },
            "HSETNX" => Write::SetFields {
                key: arg(1),
                pairs: Pairs::of(args.get(2..).unwrap_or_default(), 1),
                only_new: true,
                ttl: FieldTtl::Clear,
            },
            "HSETEX" => hsetex(args, now_ms),
            "HDEL" => Write::DeleteFields {
                key: arg(1),
                fields: args.get(2..).unwrap_or_default(),
            },
            "HINCRBY" => Write::IncrementField {
                key: arg(1),
                field: arg(2),
                by: parse_i64(arg(3)).unwrap_or(0),
            },
            "HINCRBYFLOAT" => Write::Unreproducible { key: arg(1) },
            // HPEXPIREAT key ms [NX|XX|GT|LT] FIELDS n f...
            "HPEXPIREAT" => Write::FieldExpiry {
                key: arg(1),
                at: parse_i64(arg(2)),
                fields: fields_argument(args, 3),
            },
            // HPERSIST key FIELDS n f...
            "HPERSIST" => Write::FieldExpiry {
                key: arg(1),
                at: None,
                fields: fields_argument(args, 2),
            },
            "DEL" | "UNLINK" => Write::Delete {
                keys: args.get(1..).unwrap_or_default(),
            },
            "PEXPIREAT" | "EXPIREAT" | "PEXPIRE" | "EXPIRE" | "PERSIST" => {
                let value = parse_i64(arg(2)).unwrap_or(0);
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
            "MOVE" => match parse_u32(arg(2)) {
                Some(to_db) => Write::Move {
                    from: arg(1),
                    to: arg(1),
                    to_db,
                    copy: false,
                },
                None => Write::Resync {
                    reason: format!("MOVE with database {:?}", String::from_utf8_lossy(arg(2))),
                },
            },
            "COPY" => copy(command),
            // A slot migration's copy (`MIGRATE` sends `RESTORE-ASKING`, propagated as such, its
            // TTL made absolute with `ABSTTL`): the key's whole value, like `RESTORE`.
            "RESTORE" | "RESTORE-ASKING" => restore(args, now_ms),
            "FLUSHDB" => Write::Flush {
                db: Some(command.db),
            },
            "FLUSHALL" => Write::Flush { db: None },
            "SWAPDB" => Write::SwapDb {
                a: parse_u32(arg(1)),
                b: parse_u32(arg(2)),
                text: format!(
                    "{} {}",
                    String::from_utf8_lossy(arg(1)),
                    String::from_utf8_lossy(arg(2))
                ),
            },
            // Since Redis 7 (and by default since 5) scripts replicate their effects; a script
            // sent verbatim cannot be reproduced here.
            "EVAL" | "EVALSHA" | "EVAL_RO" | "EVALSHA_RO" | "FCALL" | "FCALL_RO" => Write::Resync {
                reason: format!(
                    "{name} replicated verbatim (the primary replicates scripts, not their effects)"
                ),
            },
            // Slots emptied without a delete per key: Redis 8.4's atomic slot migration trims
            // the source (`TRIMSLOTS RANGES n first last ...`), `SFLUSH` and Valkey's
            // `CLUSTER FLUSHSLOT` flush slots. The mirror cannot tell which keys went; a full
            // sync does, and the deletes of its sweep are checked with the other shards
            // (`cluster/peers.rs`) like any delete of a slot this shard no longer serves.
            "TRIMSLOTS" | "SFLUSH" => Write::Resync {
                reason: format!("{name}: slots emptied without a delete per key"),
            },
            "CLUSTER" if arg(1).eq_ignore_ascii_case(b"FLUSHSLOT") => Write::Resync {
                reason: "CLUSTER FLUSHSLOT: a slot emptied without a delete per key".into(),
            },
            _ => Write::Other,
        }
    }

    /// Every `(db, key)` this write may read or change, for the keys named by its arguments
    /// (a flush names none: it touches whole databases).
    pub fn keys(&self, db: u32) -> Vec<(u32, &'a Bytes)> {
        match self {
            Write::SetFields { key, .. }
            | Write::DeleteFields { key, .. }
            | Write::IncrementField { key, .. }
            | Write::FieldExpiry { key, .. }
            | Write::Unreproducible { key }
            | Write::Expire { key, .. }
            | Write::Restore { key, .. } => vec![(db, *key)],
            Write::Delete { keys } => keys.iter().map(|k| (db, k)).collect(),
            Write::Move {
                from, to, to_db, ..
            } => vec![(db, *from), (*to_db, *to)],
            Write::Flush { .. } | Write::SwapDb { .. } | Write::Resync { .. } | Write::Other => {
                Vec::new()
            }
        }
    }
}

/// `HSETEX key [FNX|FXX] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL] FIELDS n field value ...`, as the
/// primary propagates it: a relative time rewritten in place to `PXAT <ms>`, every other word
/// kept where the client put it. Since Redis 8.4 (redis#14416) the options may also follow the
/// `FIELDS` block (`HSETEX k FIELDS 1 f v PXAT 5000 FNX`), so options are read on both sides of
/// it, and the block itself is skipped by its count (a field or value named `PX` is data).
/// `FNX`/`FXX` need nothing: a write whose condition failed is not propagated.
fn hsetex(args: &[Bytes], now_ms: i64) -> Write<'_> {
    let mut ttl = FieldTtl::Clear;
    let mut found = Pairs(&[]);
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
                found = Pairs::of(block, n);
                i += 2 + 2 * found.len();
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Write::SetFields {
        key: args.get(1).unwrap_or(&EMPTY),
        pairs: found,
        only_new: false,
        ttl,
    }
}

/// `COPY source destination [DB destination-db] [REPLACE]`: options start at index 3.
fn copy(command: &Command) -> Write<'_> {
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
        from: args.get(1).unwrap_or(&EMPTY),
        to: args.get(2).unwrap_or(&EMPTY),
        to_db,
        copy: true,
    }
}

/// `RESTORE key ttl serialized-value [REPLACE] [ABSTTL] [IDLETIME s] [FREQ f]`, and
/// `RESTORE-ASKING` with the same arguments.
fn restore(args: &[Bytes], now_ms: i64) -> Write<'_> {
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
        key: args.get(1).unwrap_or(&EMPTY),
        payload: args.get(3),
        expire_at_ms,
    }
}

/// The field names after `FIELDS n`, searching from `start` (the options before it are
/// single words or a number, so the first `FIELDS` at or after `start` is the keyword).
fn fields_argument(args: &[Bytes], start: usize) -> &[Bytes] {
    let Some(pos) = args
        .iter()
        .skip(start)
        .position(|a| a.eq_ignore_ascii_case(b"FIELDS"))
    else {
        return &[];
    };
    let pos = start + pos;
    let n = args
        .get(pos + 1)
        .and_then(|n| parse_i64(n))
        .unwrap_or(0)
        .max(0) as usize;
    let names = args.get(pos + 2..).unwrap_or_default();
    &names[..n.min(names.len())]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::ReplOffset;

    /// The command is leaked: the `Write` borrows it (a few bytes per assertion, in tests).
    fn parse(args: &[&str]) -> Write<'static> {
        let command = Box::leak(Box::new(Command::from_words(args, 0, ReplOffset(1))));
        Write::parse(command, 1_000)
    }

    fn b(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    #[test]
    fn keys_named_like_options_are_keys() {
        assert_eq!(
            parse(&["COPY", "db", "replace", "DB", "1", "REPLACE"]),
            Write::Move {
                from: &b("db"),
                to: &b("replace"),
                to_db: 1,
                copy: true
            }
        );
        assert_eq!(
            parse(&["COPY", "db", "fields"]),
            Write::Move {
                from: &b("db"),
                to: &b("fields"),
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
                key: &b("fields"),
                at: Some(5000),
                fields: &[b("fields"), b("db")]
            }
        );
        assert_eq!(
            parse(&["HPERSIST", "fields", "FIELDS", "1", "replace"]),
            Write::FieldExpiry {
                key: &b("fields"),
                at: None,
                fields: &[b("replace")]
            }
        );
        assert_eq!(
            parse(&["HSETEX", "fields", "KEEPTTL", "FIELDS", "1", "px", "1"]),
            Write::SetFields {
                key: &b("fields"),
                pairs: Pairs(&[b("px"), b("1")]),
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
                    key: &b("k"),
                    pairs: Pairs(&[b("PX"), b("KEEPTTL")]),
                    only_new: false,
                    ttl
                },
                "{args:?}"
            );
        }
        assert_eq!(
            parse(&["MOVE", "db", "3"]),
            Write::Move {
                from: &b("db"),
                to: &b("db"),
                to_db: 3,
                copy: false
            }
        );
    }

    #[test]
    fn field_lists_are_the_commands_own_words_within_their_counts() {
        let set = parse(&["HSET", "k", "a", "1", "b", "2"]);
        let Write::SetFields { pairs, .. } = set else {
            panic!("{set:?}");
        };
        let pairs: Vec<(&[u8], &[u8])> = pairs.iter().map(|(f, v)| (&f[..], &v[..])).collect();
        assert_eq!(pairs, [(&b"a"[..], &b"1"[..]), (b"b", b"2")]);
        // HSETNX sets one field; a field without its value is no pair; a count larger than
        // the words there takes what is there.
        assert_eq!(
            parse(&["HSETNX", "k", "a", "1", "b", "2"]),
            Write::SetFields {
                key: &b("k"),
                pairs: Pairs(&[b("a"), b("1")]),
                only_new: true,
                ttl: FieldTtl::Clear
            }
        );
        assert!(matches!(
            parse(&["HSET", "k", "a"]),
            Write::SetFields { pairs, .. } if pairs.is_empty()
        ));
        assert_eq!(
            parse(&["HPERSIST", "k", "FIELDS", "5", "a"]),
            Write::FieldExpiry {
                key: &b("k"),
                at: None,
                fields: &[b("a")]
            }
        );
        assert_eq!(
            parse(&["HDEL", "k", "a", "b"]),
            Write::DeleteFields {
                key: &b("k"),
                fields: &[b("a"), b("b")]
            }
        );
        assert_eq!(parse(&["DEL"]), Write::Delete { keys: &[] });
    }

    #[test]
    fn relative_times_become_absolute_and_bad_numbers_resync() {
        assert_eq!(
            parse(&["PEXPIRE", "k", "500"]),
            Write::Expire {
                key: &b("k"),
                at: Some(1_500)
            }
        );
        assert_eq!(
            parse(&["RESTORE", "k", "20", "payload"]),
            Write::Restore {
                key: &b("k"),
                payload: Some(&b("payload")),
                expire_at_ms: Some(1_020)
            }
        );
        assert_eq!(
            parse(&["RESTORE-ASKING", "k", "5000", "payload", "ABSTTL"]),
            Write::Restore {
                key: &b("k"),
                payload: Some(&b("payload")),
                expire_at_ms: Some(5_000)
            }
        );
        assert!(matches!(parse(&["MOVE", "k", "x"]), Write::Resync { .. }));
        for emptied in [
            &["TRIMSLOTS", "RANGES", "1", "0", "99"][..],
            &["SFLUSH", "0", "99"],
            &["cluster", "flushslot", "7"],
        ] {
            assert!(
                matches!(parse(emptied), Write::Resync { .. }),
                "{emptied:?}"
            );
        }
        assert_eq!(parse(&["CLUSTER", "SETSLOT", "7", "STABLE"]), Write::Other);
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
