//! Unit tests of [`super::Applier`]: commands applied to a working set, row events out.

use super::*;
use crate::buffer::{HashOp, RowChange, Store};
use crate::capture::clock::PrimaryClock;
use crate::clock::now_ms;
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

pub(super) fn command(args: &[&str], end: u64) -> Command {
    Command::from_words(args, 0, ReplOffset(end))
}

/// Applies `commands` in order; returns the row events.
/// A buffer in a temporary directory and what an applier of generation 1 borrows.
pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    pub(super) store: Arc<Store>,
    mappings: Mappings,
    clock: PrimaryClock,
}

impl Fixture {
    pub(super) fn new(on_expire: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        Fixture {
            _dir: dir,
            store,
            mappings: mappings(on_expire),
            clock: PrimaryClock::default(),
        }
    }

    pub(super) fn applier<'a>(&'a self, table: &'a CommandTable) -> Applier<'a> {
        Applier {
            mappings: &self.mappings,
            commands: table,
            generation: 1,
            ops: true,
            clock: &self.clock,
        }
    }
}

fn run(
    on_expire: &str,
    table: &CommandTable,
    commands: &[&[&str]],
) -> (Vec<RowEvent>, Needs, WorkingSet) {
    let fixture = Fixture::new(on_expire);
    let applier = fixture.applier(table);
    let mut ws = WorkingSet::new(fixture.store.clone());
    let mut out = Vec::new();
    let mut needs = Needs::default();
    for (i, args) in commands.iter().enumerate() {
        let command = command(args, 100 + i as u64);
        let write = Write::parse(&command, now_ms());
        needs = applier.apply(&mut ws, &command, &write, &mut out).unwrap();
    }
    (out, needs, ws)
}

pub(super) fn upsert(id: &str, name: Option<&str>, n: Option<&str>) -> RowEvent {
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
        }
        .into(),
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
    let (out, needs, mut ws) = run("keep", &table, &[&["HSET", "p:1", "name", "A", "#", "+u2"]]);
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

pub(super) fn delete(id: &str) -> RowEvent {
    RowEvent {
        mapping: "P".into(),
        row_id: Bytes::copy_from_slice(id.as_bytes()),
        row: RowChange::Delete.into(),
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

/// A row event exactly when the mapped image changes: a value set again, a mapped field set
/// and set back within one command, an unmapped field, a field's TTL or an absent field deleted
/// change nothing; a mapped field set to another value, created or deleted does.
#[test]
fn a_row_event_comes_exactly_when_the_mapped_image_changes() {
    let table = CommandTable::default();
    let (out, _, _) = run(
        "keep",
        &table,
        &[
            &["HSET", "p:1", "name", "Ann", "n", "1"],
            &["HSET", "p:1", "name", "Ann"],
            &["HMSET", "p:1", "n", "1", "name", "Ann"],
            &["HSET", "p:1", "name", "Bob", "name", "Ann"],
            &["HSET", "p:1", "other", "x"],
            &["HSET", "p:1", "other", "y", "n", "1"],
            &["HDEL", "p:1", "absent", "other"],
            &["HPEXPIREAT", "p:1", "99999999999999", "FIELDS", "1", "name"],
            &["HINCRBY", "p:1", "n", "0"],
            &["HINCRBY", "p:1", "n", "1"],
            &["HSET", "p:1", "name", "Ann", "name", "Cy"],
            &["HDEL", "p:1", "n"],
            &["HSET", "p:1", "n", "3", "other", "z"],
            &["HDEL", "p:1", "n", "name", "other"],
        ],
    );
    assert_eq!(
        out,
        vec![
            upsert("1", Some("Ann"), Some("1")),
            upsert("1", Some("Ann"), Some("2")),
            upsert("1", Some("Cy"), Some("2")),
            upsert("1", Some("Cy"), None),
            upsert("1", Some("Cy"), Some("3")),
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
    let clock = PrimaryClock::default();
    let applier = Applier {
        mappings: &mappings,
        commands: &table,
        generation: 1,
        ops: true,
        clock: &clock,
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

mod field_ttl_tests {
    use super::super::*;
    use crate::buffer::Store;
    use crate::clock::now_ms;
    use crate::config::Config;
    use crate::position::ReplOffset;
    use std::sync::Arc;

    fn apply_all(commands: &[&[&str]]) -> Option<MirrorValue> {
        let text = "[source]\nurl = \"redis://127.0.0.1:1\"\n[backends.db]\nurl = \"sqlite://x\"\n[[mappings]]\nname = \"P\"\nprefix = \"p\"\nbackend = \"db\"\ntable = \"t\"\nkey_column = \"id\"\n[mappings.columns]\nf = \"f\"\n";
        let mappings = Mappings::new(&Config::parse(text, &|_| None).unwrap().mappings);
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let table = CommandTable::default();
        let clock = PrimaryClock::default();
        let applier = Applier {
            mappings: &mappings,
            commands: &table,
            generation: 1,
            ops: true,
            clock: &clock,
        };
        let mut ws = WorkingSet::new(store);
        let mut out = Vec::new();
        for (i, args) in commands.iter().enumerate() {
            let command = Command::from_words(args, 0, ReplOffset(10 + i as u64));
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

    fn value(value: &Option<MirrorValue>, field: &str) -> Option<String> {
        let field = value.as_ref()?.fields.get(field.as_bytes())?;
        Some(String::from_utf8_lossy(&field.value).into_owned())
    }

    /// Redis 8's HGETEX, HGETDEL and HINCRBYFLOAT never reach a replica as themselves: these
    /// are the forms the primary propagates (redis `tests/unit/type/hash-field-expire.tcl`,
    /// `assert_replication_stream`; built from the spec, no Redis 8 binary here).
    #[test]
    fn the_replicated_forms_of_redis_8_hash_commands() {
        // HGETEX ... EX/PX/EXAT: HPEXPIREAT with every requested field, missing ones included.
        let v = apply_all(&[
            &["HSET", "p:1", "f", "1", "g", "2"],
            &["HPEXPIREAT", "p:1", "9000", "FIELDS", "2", "f", "missing"],
        ]);
        assert_eq!((ttl(&v, "f"), ttl(&v, "g")), (Some(9000), None));
        assert_eq!(value(&v, "missing"), None, "no field is created");
        // HGETEX ... PERSIST: HPERSIST.
        let v = apply_all(&[
            &["HSETEX", "p:1", "PXAT", "9000", "FIELDS", "1", "f", "1"],
            &["HPERSIST", "p:1", "FIELDS", "2", "f", "missing"],
        ]);
        assert_eq!((ttl(&v, "f"), value(&v, "f")), (None, Some("1".into())));
        // HGETEX with a time in the past, HGETDEL: HDEL (several are wrapped in a MULTI, which
        // the stream decoder unwraps); the last field takes the key with it (no DEL is sent).
        let v = apply_all(&[
            &["HSET", "p:1", "f", "1", "g", "2"],
            &["HDEL", "p:1", "f"],
            &["HDEL", "p:1", "missing"],
        ]);
        assert_eq!((value(&v, "f"), value(&v, "g")), (None, Some("2".into())));
        let v = apply_all(&[
            &["HSET", "p:1", "f", "1", "g", "2"],
            &["HDEL", "p:1", "f", "g", "missing"],
        ]);
        assert!(v.is_none());
        // HINCRBYFLOAT (8.2+): HSETEX KEEPTTL with the result, TTL kept.
        let v = apply_all(&[
            &["HSETEX", "p:1", "PXAT", "9000", "FIELDS", "1", "n", "1"],
            &["HSETEX", "p:1", "KEEPTTL", "FIELDS", "1", "n", "1.5"],
        ]);
        assert_eq!(
            (value(&v, "n"), ttl(&v, "n")),
            (Some("1.5".into()), Some(9000))
        );
        // HSETEX with options after the FIELDS block (8.4+).
        let v = apply_all(&[
            &[
                "HSETEX", "p:1", "FIELDS", "1", "n", "1", "PXAT", "9000", "FNX",
            ],
            &["HSETEX", "p:1", "FIELDS", "1", "n", "2", "KEEPTTL"],
        ]);
        assert_eq!(
            (value(&v, "n"), ttl(&v, "n")),
            (Some("2".into()), Some(9000))
        );
    }
}

/// What a command stores in the working set (and so in the mirror cache) owns its bytes: the
/// key, new field names and values are not slices of the stream read they came from.
#[test]
fn stored_keys_names_and_values_do_not_hold_the_stream_buffer() {
    let fixture = Fixture::new("keep");
    let table = CommandTable::default();
    let applier = fixture.applier(&table);
    // One buffer, as a stream read is, every argument a slice of it.
    let read = Bytes::from_static(b"HSETp:1namevaluenname2HINCRBYcount5");
    let range = read.as_ptr() as usize..read.as_ptr() as usize + read.len();
    let slices = |spans: &[(usize, usize)]| -> Vec<Bytes> {
        spans.iter().map(|&(a, b)| read.slice(a..b)).collect()
    };
    let mut ws = WorkingSet::new(fixture.store.clone());
    let mut out = Vec::new();
    for (i, args) in [
        slices(&[(0, 4), (4, 7), (7, 11), (11, 16), (16, 17), (17, 22)]),
        slices(&[(22, 29), (4, 7), (29, 34), (34, 35)]),
    ]
    .into_iter()
    .enumerate()
    {
        let command = Command {
            args,
            db: 0,
            end: ReplOffset(100 + i as u64),
        };
        let write = Write::parse(&command, now_ms());
        applier.apply(&mut ws, &command, &write, &mut out).unwrap();
    }
    let value = ws
        .peek(0, &Bytes::from_static(b"p:1"))
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(value.fields.len(), 3, "name, n and count");
    let outside = |b: &Bytes| !range.contains(&(b.as_ptr() as usize));
    for (name, field) in &value.fields {
        assert!(outside(name), "field name {name:?} is a slice of the read");
        assert!(
            outside(&field.value),
            "value of {name:?} is a slice of the read"
        );
    }
    let mut batch = crate::buffer::Batch::default();
    let flushed = ws.flush_into(&mut batch);
    for ((_, key), _) in flushed.changed().iter() {
        assert!(outside(key), "key {key:?} is a slice of the read");
    }
}

/// A hash that a write leaves as it was (values set again, an absent field deleted) is not
/// written back; one whose value, field or field TTL changed is.
#[test]
fn a_hash_left_as_it_was_is_not_written_back() {
    let fixture = Fixture::new("keep");
    let table = CommandTable::default();
    let applier = fixture.applier(&table);
    let store = fixture.store.clone();
    let apply_batch = |commands: &[&[&str]]| {
        let mut ws = WorkingSet::new(store.clone());
        let mut out = Vec::new();
        for (i, args) in commands.iter().enumerate() {
            let command = command(args, 100 + i as u64);
            let write = Write::parse(&command, now_ms());
            applier.apply(&mut ws, &command, &write, &mut out).unwrap();
        }
        let mut batch = crate::buffer::Batch::default();
        let flushed = ws.flush_into(&mut batch);
        let mut written: Vec<String> = flushed
            .changed()
            .keys()
            .map(|(_, k)| String::from_utf8_lossy(k).into_owned())
            .collect();
        written.sort();
        store.write(batch, true).unwrap();
        flushed.written();
        written
    };
    let all = ["p:1", "p:2", "p:3", "p:4"];
    let first: Vec<&[&str]> = vec![
        &["HSET", "p:1", "name", "A", "other", "x"],
        &["HSET", "p:2", "name", "B"],
        &["HSET", "p:3", "name", "C"],
        &["HSET", "p:4", "name", "D"],
    ];
    assert_eq!(apply_batch(&first), all);
    assert_eq!(
        apply_batch(&[
            &["HSET", "p:1", "other", "x", "name", "A"],
            &["HDEL", "p:1", "absent"],
            &["HSET", "p:2", "other", "new"],
            &["HSET", "p:3", "name", "C", "name", "C2"],
            &["HPEXPIREAT", "p:4", "99999999999999", "FIELDS", "1", "name"],
        ]),
        ["p:2", "p:3", "p:4"]
    );
    assert_eq!(
        store.mirror(0, b"p:2").unwrap().unwrap().fields.len(),
        2,
        "a changed hash is written"
    );
    assert_eq!(
        apply_batch(&first),
        ["p:3", "p:4"],
        "p:4's field TTL is cleared"
    );
}

/// A stored copy holds the same bytes at every length (inline or not), and a clone of a short
/// one shares its allocation (no second allocation for the row image).
#[test]
fn owned_copies_are_equal_and_short_ones_clone_in_place() {
    let source: Vec<u8> = (0..=255u8).cycle().take(300).collect();
    for len in 0..=300 {
        let stream = Bytes::copy_from_slice(&source[..len]);
        let copy = owned(&stream);
        assert_eq!(copy, stream, "length {len}");
        if len > 0 {
            assert_ne!(copy.as_ptr(), stream.as_ptr(), "a copy, not a slice");
            let clone = copy.clone();
            assert_eq!(clone.as_ptr(), copy.as_ptr());
            drop(copy);
            assert_eq!(
                clone, stream,
                "length {len}: the clone outlives the original"
            );
        }
    }
}
