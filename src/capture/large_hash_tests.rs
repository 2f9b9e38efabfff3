//! Unit tests of hashes stored by field (`buffer/window.rs`): commands on a large hash,
//! batch after batch through the batch in flight and the mirror cache, against a model.

use std::collections::BTreeMap;

use super::tests::{command, delete, upsert, Fixture};
use super::*;
use crate::buffer::{Batch, RowChange, Store, STORED_BY_FIELD};
use crate::capture::mirror_cache::MirrorCache;
use crate::capture::working_set::{Flushed, MirrorView};
use crate::clock::now_ms;

/// Applies `commands` as one batch reading through `view`; returns its row events and what it
/// flushed, with the batch to write.
fn apply_batch(
    fixture: &Fixture,
    view: MirrorView,
    commands: &[Vec<String>],
) -> (Vec<RowEvent>, Flushed, Batch) {
    let table = CommandTable::default();
    let applier = fixture.applier(&table);
    let mut ws = WorkingSet::viewing(fixture.store.clone(), view);
    let mut out = Vec::new();
    for (i, args) in commands.iter().enumerate() {
        let words: Vec<&str> = args.iter().map(String::as_str).collect();
        let command = command(&words, 100 + i as u64);
        let write = Write::parse(&command, now_ms());
        applier.apply(&mut ws, &command, &write, &mut out).unwrap();
    }
    let mut batch = Batch::default();
    let flushed = ws.flush_into(&mut batch);
    (out, flushed, batch)
}

fn words(list: &[&str]) -> Vec<String> {
    list.iter().map(|w| w.to_string()).collect()
}

/// The whole stored hash, as names and values.
fn stored(store: &Store, key: &str) -> Option<BTreeMap<String, String>> {
    let value = store.mirror_whole(0, key.as_bytes()).unwrap()?;
    Some(
        value
            .fields
            .iter()
            .map(|(f, v)| {
                (
                    String::from_utf8_lossy(f).into_owned(),
                    String::from_utf8_lossy(&v.value).into_owned(),
                )
            })
            .collect(),
    )
}

fn stored_field_count(store: &Store, key: &str) -> usize {
    let mut count = 0;
    store
        .each_stored_field(0, key.as_bytes(), |_, _| count += 1)
        .unwrap();
    count
}

#[test]
fn a_large_hash_is_stored_by_field_and_follows_every_command() {
    let fixture = Fixture::new("keep");
    let store = fixture.store.clone();
    let cache = MirrorCache::new(64 << 20);
    let mut model = BTreeMap::new();
    // Batch 1 creates the hash past the size: written whole, as fields.
    let mut create = words(&["HSET", "p:big", "name", "A"]);
    model.insert("name".to_string(), "A".to_string());
    for i in 0..STORED_BY_FIELD + 100 {
        create.extend([format!("f{i}"), format!("v{i}")]);
        model.insert(format!("f{i}"), format!("v{i}"));
    }
    let view = MirrorView {
        cache: cache.clone(),
        in_flight: None,
    };
    let (out, first, batch1) = apply_batch(&fixture, view, &[create]);
    assert_eq!(out, vec![upsert("big", Some("A"), None)]);

    // Batch 2 reads batch 1 while it is in flight (not yet in RocksDB).
    let view = MirrorView {
        cache: cache.clone(),
        in_flight: Some(first.changed()),
    };
    let (out, second, batch2) = apply_batch(
        &fixture,
        view,
        &[
            words(&["HSET", "p:big", "f5", "x", "name", "B"]),
            words(&["HDEL", "p:big", "f7", "absent"]),
            words(&["HINCRBY", "p:big", "n", "5"]),
        ],
    );
    model.insert("f5".into(), "x".into());
    model.insert("name".into(), "B".into());
    model.remove("f7");
    model.insert("n".into(), "5".into());
    assert_eq!(
        out,
        vec![
            upsert("big", Some("B"), None),
            upsert("big", Some("B"), Some("5"))
        ]
    );
    store.write(batch1, true).unwrap();
    first.written();
    let changed = second.changed();
    let window = changed[&(0, Bytes::from("p:big"))]
        .as_ref()
        .and_then(|v| v.fields.window())
        .cloned()
        .expect("held as a window");
    assert_eq!(
        window.changed().count(),
        4,
        "only f5, f7, n and name are written back"
    );
    store.write(batch2, true).unwrap();
    second.written();
    assert_eq!(stored(&store, "p:big").as_ref(), Some(&model));
    assert_eq!(stored_field_count(&store, "p:big"), model.len());

    // Batch 3 takes the hash from the cache (its count alone): the mapped fields it does not
    // name are read from the store, so the row is whole.
    let view = MirrorView {
        cache: cache.clone(),
        in_flight: None,
    };
    let (out, third, batch3) = apply_batch(
        &fixture,
        view,
        &[
            words(&["HSET", "p:big", "f8", "y"]),
            words(&["HSET", "p:big", "name", "C"]),
        ],
    );
    model.insert("f8".into(), "y".into());
    model.insert("name".into(), "C".into());
    assert_eq!(out, vec![upsert("big", Some("C"), Some("5"))]);
    store.write(batch3, true).unwrap();
    third.written();
    assert_eq!(stored(&store, "p:big").as_ref(), Some(&model));

    // Batch 4 renames it: the new key gets every field, the old one's fields are cleared.
    let view = MirrorView {
        cache: cache.clone(),
        in_flight: None,
    };
    let (out, fourth, batch4) =
        apply_batch(&fixture, view, &[words(&["RENAME", "p:big", "p:moved"])]);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].row, RowChange::Delete);
    assert_eq!(out[1], upsert("moved", Some("C"), Some("5")));
    store.write(batch4, true).unwrap();
    fourth.written();
    assert_eq!(stored(&store, "p:big"), None);
    assert_eq!(
        stored_field_count(&store, "p:big"),
        0,
        "no field left behind"
    );
    assert_eq!(stored(&store, "p:moved").as_ref(), Some(&model));
    assert!(store
        .mirror(0, b"p:moved")
        .unwrap()
        .is_some_and(|v| v.fields.window().is_some()));

    // Batch 5 deletes it.
    let view = MirrorView {
        cache,
        in_flight: None,
    };
    let (out, fifth, batch5) = apply_batch(&fixture, view, &[words(&["DEL", "p:moved"])]);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].row, RowChange::Delete);
    store.write(batch5, true).unwrap();
    fifth.written();
    assert_eq!(stored(&store, "p:moved"), None);
    assert_eq!(stored_field_count(&store, "p:moved"), 0);
}

#[test]
fn a_large_hash_replaced_by_a_small_one_leaves_no_field() {
    let fixture = Fixture::new("keep");
    let store = fixture.store.clone();
    let mut create = words(&["HSET", "p:big"]);
    for i in 0..STORED_BY_FIELD + 1 {
        create.extend([format!("f{i}"), "v".to_string()]);
    }
    let small = words(&["HSET", "p:small", "name", "S", "g", "w"]);
    let (_, flushed, batch) = apply_batch(&fixture, MirrorView::default(), &[create, small]);
    store.write(batch, true).unwrap();
    flushed.written();
    assert_eq!(stored_field_count(&store, "p:big"), STORED_BY_FIELD + 1);
    let (out, flushed, batch) = apply_batch(
        &fixture,
        MirrorView::default(),
        &[words(&["RENAME", "p:small", "p:big"])],
    );
    assert_eq!(out.len(), 2);
    assert_eq!(out[1], upsert("big", Some("S"), None));
    store.write(batch, true).unwrap();
    flushed.written();
    assert_eq!(
        stored_field_count(&store, "p:big"),
        0,
        "the large hash's fields are gone"
    );
    let expected: BTreeMap<String, String> = [("g", "w"), ("name", "S")]
        .map(|(f, v)| (f.to_string(), v.to_string()))
        .into();
    assert_eq!(stored(&store, "p:big"), Some(expected));
}

/// A batch reading a large hash that the batch in flight rewrites whole (a `COPY ... REPLACE`
/// onto it) must not read the store for what it does not see: the store is cleared only when
/// the rewrite is written, and still holds the old hash's fields.
#[test]
fn a_copy_of_a_rewrite_in_flight_never_reads_the_old_fields() {
    let fixture = Fixture::new("keep");
    let store = fixture.store.clone();
    let mut big = words(&["HSET", "p:big", "only_in_big", "old"]);
    let mut src = words(&["HSET", "p:src"]);
    let mut model = BTreeMap::new();
    for i in 0..STORED_BY_FIELD + 100 {
        big.extend([format!("f{i}"), "b".to_string()]);
        src.extend([format!("f{i}"), "s".to_string()]);
        model.insert(format!("f{i}"), "s".to_string());
    }
    let (_, flushed, batch) = apply_batch(&fixture, MirrorView::default(), &[big, src]);
    store.write(batch, true).unwrap();
    flushed.written();

    let (_, copied, copy_batch) = apply_batch(
        &fixture,
        MirrorView::default(),
        &[words(&["COPY", "p:src", "p:big", "REPLACE"])],
    );
    let view = MirrorView {
        cache: MirrorCache::default(),
        in_flight: Some(copied.changed()),
    };
    let (_, after, after_batch) = apply_batch(
        &fixture,
        view,
        &[words(&["HSETNX", "p:big", "only_in_big", "new"])],
    );
    model.insert("only_in_big".into(), "new".into());
    store.write(copy_batch, true).unwrap();
    copied.written();
    store.write(after_batch, true).unwrap();
    after.written();
    assert_eq!(stored(&store, "p:big"), Some(model));
}

/// A large hash renamed, moved or copied to a key no mapping watches only loses (or keeps) its
/// row: its mapped fields are read, not the whole hash.
#[test]
fn a_large_hash_sent_to_an_unwatched_key_is_not_read_whole() {
    let fixture = Fixture::new("keep");
    let store = fixture.store.clone();
    let mut create = words(&["HSET", "p:big", "name", "A"]);
    for i in 0..STORED_BY_FIELD + 100 {
        create.extend([format!("f{i}"), format!("v{i}")]);
    }
    let (_, first, batch) = apply_batch(&fixture, MirrorView::default(), &[create]);
    store.write(batch, true).unwrap();
    first.written();

    let table = CommandTable::default();
    let applier = fixture.applier(&table);
    for (args, deleted) in [
        (vec!["COPY", "p:big", "unwatched:copy"], false),
        (vec!["RENAME", "p:big", "unwatched:away"], true),
    ] {
        let mut ws = WorkingSet::new(store.clone());
        let command = command(&args, 200);
        let write = Write::parse(&command, now_ms());
        let mut out = Vec::new();
        applier.apply(&mut ws, &command, &write, &mut out).unwrap();
        assert!(
            ws.fields_seen() < 10,
            "{args:?} read {} fields",
            ws.fields_seen()
        );
        match deleted {
            true => assert_eq!(out, vec![delete("big")]),
            false => assert_eq!(out, Vec::new()),
        }
        let mut batch = Batch::default();
        let flushed = ws.flush_into(&mut batch);
        store.write(batch, true).unwrap();
        flushed.written();
    }
    assert_eq!(stored(&store, "p:big"), None);
    assert_eq!(stored_field_count(&store, "p:big"), 0, "no field left");
}
