//! Unit tests of commands applied where the mirror cache holds their keys
//! (`WorkingSet::update_cached`): batch after batch, each applied while the one before it is
//! in flight, as the committer runs them, against the same batches applied without a cache.

use super::tests::{command, Fixture};
use super::*;
use crate::buffer::{Batch, KeyRef};
use crate::capture::mirror_cache::MirrorCache;
use crate::capture::working_set::{Flushed, MirrorView};
use crate::clock::now_ms;

const KEYS: [&str; 3] = ["p:1", "p:2", "p:3"];

/// Applies `batches` in order through `cache`, each read ahead first and applied while the
/// batch before it is in flight (written, and its entries cached, only after the next one is
/// applied); returns the row events and the mirror of each of [`KEYS`] in the store and in the
/// cache at the end.
fn apply_batches(
    cache: &MirrorCache,
    batches: &[&[&[&str]]],
) -> (
    Vec<RowEvent>,
    Vec<Option<MirrorValue>>,
    Vec<Option<MirrorValue>>,
) {
    let fixture = Fixture::new("keep");
    let table = CommandTable::default();
    let applier = fixture.applier(&table);
    let mut out = Vec::new();
    let mut in_flight = None;
    for (b, commands) in batches.iter().enumerate() {
        let view = MirrorView {
            cache: cache.clone(),
            in_flight: in_flight
                .as_ref()
                .map(|(_, flushed): &(Batch, Flushed)| flushed.changed()),
        };
        let mut ws = WorkingSet::viewing(fixture.store.clone(), view);
        ws.preload(commands.iter().map(|args| KeyRef {
            db: 0,
            key: args[1].as_bytes(),
        }));
        for (i, args) in commands.iter().enumerate() {
            let command = command(args, (100 * b + i) as u64);
            let write = Write::parse(&command, now_ms());
            applier.apply(&mut ws, &command, &write, &mut out).unwrap();
        }
        let mut batch = Batch::default();
        let mut flushed = ws.flush_into(&mut batch);
        if let Some((previous, written)) = in_flight.take() {
            fixture.store.write(previous, true).unwrap();
            written.written();
        }
        flushed.unchanged_written();
        in_flight = Some((batch, flushed));
    }
    if let Some((last, flushed)) = in_flight {
        fixture.store.write(last, true).unwrap();
        flushed.written();
    }
    let stored = KEYS.map(|k| fixture.store.mirror(0, k.as_bytes()).unwrap());
    let cached = KEYS.map(|k| cache.get(0, k.as_bytes()).flatten());
    (out, stored.to_vec(), cached.to_vec())
}

/// The cache changes where values are read and nothing else: writes that set values again
/// (left in the cache), that change them (moved out), on a key the batch in flight changed,
/// twice in one batch, deletes of fields and of the whole row, give the row events and the
/// stored mirror that they give without a cache; what the cache holds at the end is what the
/// store holds.
#[test]
fn writes_applied_where_their_keys_are_cached_give_what_they_give_without_a_cache() {
    let batches: &[&[&[&str]]] = &[
        &[
            &["HSET", "p:1", "name", "a", "n", "1"],
            &["HSET", "p:2", "name", "b"],
            &["HSET", "p:3", "name", "c", "x", "y"],
        ],
        &[
            &["HSET", "p:1", "name", "a"],
            &["HSET", "p:2", "name", "b", "n", "2"],
            &["HSET", "p:3", "x", "z"],
        ],
        &[
            &["HSET", "p:1", "name", "a"],
            &["HSET", "p:1", "n", "3"],
            &["HSET", "p:2", "name", "b"],
            &["HSETNX", "p:3", "name", "other"],
        ],
        &[
            &["HDEL", "p:1", "n", "absent"],
            &["HINCRBY", "p:2", "n", "5"],
            &["HSET", "p:3", "name", "c"],
        ],
        &[
            &["HDEL", "p:2", "name", "n"],
            &["HSET", "p:1", "name", "a"],
            &["HSET", "p:3", "name", "d"],
            &["HSET", "p:3", "name", "c"],
        ],
    ];
    let cache = MirrorCache::new(1 << 20);
    let (events, stored, cached) = apply_batches(&cache, batches);
    let (without, stored_without, _) = apply_batches(&MirrorCache::default(), batches);
    assert_eq!(events, without);
    assert_eq!(stored, stored_without);
    assert!(events.len() >= 8, "the writes change rows: {events:?}");
    assert!(stored[1].is_none() && stored[0].is_some() && stored[2].is_some());
    for (key, (cached, stored)) in KEYS.iter().zip(cached.iter().zip(&stored)) {
        if cached.is_some() {
            assert_eq!(
                cached, stored,
                "{key}: the cache holds what the store holds"
            );
        }
    }
    assert!(
        cached[0].is_some(),
        "p:1 was last only read: it stays cached"
    );
}
