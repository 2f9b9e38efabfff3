//! Hashes stored one entry per field (`src/buffer/window.rs`), against a real Redis: a large
//! hash from the snapshot and from the stream follows every command, and a long transaction on
//! one is rolled back field by field when its link is cut.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use support::capture::*;
use support::send_all;
use support::RedisServer;
use writebehind::buffer::{Batch, Change, FieldValue, Fields, RowChange, Store, STORED_BY_FIELD};
use writebehind::position::ChangeSeq;

/// `HSET key f<i> <value><i>` for every `i` in `fields`, as one command.
fn hset_fields(key: &str, fields: std::ops::Range<usize>, value: &str) -> Vec<String> {
    let mut command = vec!["HSET".to_string(), key.to_string()];
    for i in fields {
        command.extend([format!("f{i}"), format!("{value}{i}")]);
    }
    command
}

/// Whether the mirror holds `key` as a hash stored by field.
fn stored_by_field(store: &Store, key: &str) -> bool {
    store
        .mirror(0, key.as_bytes())
        .expect("mirror")
        .is_some_and(|v| v.fields.window().is_some())
}

/// A deterministic mix of field commands on `keys`, with renames, copies and deletes.
fn command_mix(keys: &[&str], count: usize) -> Vec<Vec<String>> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |bound: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound
    };
    let words = |list: &[&str]| list.iter().map(|w| w.to_string()).collect::<Vec<_>>();
    let mut commands = Vec::new();
    for i in 0..count {
        let key = keys[next(keys.len() as u64) as usize];
        let field = format!("f{}", next(3000));
        let command = match next(10) {
            0..=3 => words(&["HSET", key, &field, &format!("w{i}")]),
            4 => words(&["HSET", key, "first_name", &format!("n{i}"), &field, "x"]),
            5 => words(&["HDEL", key, &field, &format!("f{}", next(3000))]),
            6 => words(&["HINCRBY", key, "age", "3"]),
            7 => words(&["HSETNX", key, &field, "only-new"]),
            _ => words(&["HSET", key, "last_name", &format!("l{i}")]),
        };
        commands.push(command);
        match i % 700 {
            100 => commands.push(words(&["COPY", key, "person2:copy", "REPLACE"])),
            200 => commands.push(words(&["RENAME", "person2:copy", "person2:renamed"])),
            300 => commands.push(words(&["DEL", "person2:renamed"])),
            _ => {}
        }
    }
    commands
}

/// The key [`huge_hash_captured`] writes.
const HUGE: &str = "person2:huge";

/// A primary holding `person2:huge` (10,000 fields, `first_name` "old", `age` 1) and a buffer
/// that captured it from the snapshot (stored by field), capture stopped.
struct Huge {
    server: RedisServer,
    client: writebehind::redis_client::RedisClient,
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    mappings: writebehind::capture::mapping::Mappings,
}

async fn huge_hash_captured() -> Huge {
    let server = RedisServer::start(&["--enable-debug-command", "yes"]);
    let mut client = server.client().await;
    let mut create = hset_fields(HUGE, 0..10_000, "a");
    create.extend(["first_name", "old", "age", "1"].map(String::from));
    send_all(&mut client, &[create]).await;
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let mappings = mappings(&server, "keep");
    let running = start_capture(&server, store.clone(), mappings.clone());
    caught_up(&store, &mut client).await;
    running.stop().await;
    assert!(stored_by_field(&store, HUGE));
    Huge {
        server,
        client,
        _dir: dir,
        store,
        mappings,
    }
}

/// Captures again after the primary's replication id changed: one full sync.
async fn full_sync_again(
    server: &RedisServer,
    client: &mut writebehind::redis_client::RedisClient,
    store: &Arc<Store>,
    mappings: &writebehind::capture::mapping::Mappings,
) {
    client
        .command(&["DEBUG", "CHANGE-REPL-ID"])
        .await
        .expect("DEBUG CHANGE-REPL-ID");
    let running = start_capture(server, store.clone(), mappings.clone());
    caught_up(store, client).await;
    let capture = running.stop().await;
    assert_eq!(capture.stats().full_syncs, 1, "{:?}", capture.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_hashes_from_the_snapshot_and_the_stream_follow_redis() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let size = STORED_BY_FIELD + 500;
    // One large hash before the service starts: it arrives in the snapshot.
    send_all(&mut client, &[hset_fields("person2:snap", 0..size, "s")]).await;
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let mappings = mappings(&server, "keep");
    let running = start_capture(&server, store.clone(), mappings.clone());
    caught_up(&store, &mut client).await;
    assert!(stored_by_field(&store, "person2:snap"));

    // One more from the stream, then a mix of commands on both.
    send_all(&mut client, &[hset_fields("person2:live", 0..size, "l")]).await;
    let keys = ["person2:snap", "person2:live"];
    send_all(&mut client, &command_mix(&keys, 6000)).await;
    caught_up(&store, &mut client).await;
    let capture = running.stop().await;

    assert!(stored_by_field(&store, "person2:live"));
    let redis = assert_follows_redis(&store, &mut client, &mappings).await;
    assert_eq!(redis.len(), 2, "{:?}", redis.keys().collect::<Vec<_>>());
    assert_eq!(capture.stats().full_syncs, 1);
}

/// A hash of 10,000 fields in a snapshot is written a page of fields at a time, never held
/// whole; a later full sync (the primary's replication id changed while the service was
/// stopped) reads its old row first, replaces its fields page by page, and logs the row change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_hash_in_a_snapshot_is_written_a_page_at_a_time() {
    let Huge {
        server,
        mut client,
        _dir,
        store,
        mappings,
    } = huge_hash_captured().await;
    let key = HUGE;
    assert_follows_redis(&store, &mut client, &mappings).await;

    let mut delete = vec!["HDEL".to_string(), key.to_string()];
    delete.extend((0..5_000).map(|i| format!("f{}", i * 2)));
    let mut change = hset_fields(key, 20_000..20_010, "b");
    change.extend(["first_name", "new"].map(String::from));
    send_all(&mut client, &[delete, change]).await;
    full_sync_again(&server, &mut client, &store, &mappings).await;
    assert!(stored_by_field(&store, key));
    let redis = assert_follows_redis(&store, &mut client, &mappings).await;
    assert_eq!(
        redis.values().next().map(|fields| fields.len()),
        Some(5_012)
    );
}

/// A transaction of 120,000 `HSET`s on one large hash (far more fields than a part loads)
/// whose link is cut once parts are written: the parts are rolled back field by field, the
/// transaction is received again, and its one mapped change is in the log once. Its mapped
/// field is set once, first: without the field undo records, the mirror would keep the new
/// value through the rollback, the re-sent `HSET` would change nothing, and the log would
/// lose the row change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_on_a_large_hash_is_rolled_back_field_by_field() {
    let server = RedisServer::start(&["--repl-backlog-size", "256mb"]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let mappings = mappings(&server, "keep");
    let running = start_capture_unspooled(&server, store.clone(), mappings.clone());
    caught_up(&store, &mut client).await;
    let key = "person2:big";
    let mut before = hset_fields(key, 0..STORED_BY_FIELD + 1000, "old");
    before.extend(["first_name".to_string(), "old".to_string()]);
    send_all(&mut client, &[before]).await;
    caught_up(&store, &mut client).await;
    assert!(stored_by_field(&store, key));

    let value = "v".repeat(200);
    let mut commands = vec![vec!["MULTI".to_string()]];
    commands.push(vec![
        "HSET".into(),
        key.into(),
        "first_name".into(),
        "new".into(),
    ]);
    commands.extend((0..120_000).map(|i| hset_fields(key, i..i + 1, &value)));
    commands.push(vec!["EXEC".into()]);
    cut_inside_a_transaction(&server, &store, &mut client, commands, running).await;
    assert!(stored_by_field(&store, key));
    assert_follows_redis(&store, &mut client, &mappings).await;
}

/// A full sync writes a large hash's pages before its header and its row: a crash in between
/// leaves the interrupted sync's values in the hash's field range under its older header. The
/// restarted sync must still log the hash's row: compared with those values, it found nothing
/// changed, and the table kept the row from before (found by reading; reproduced here by
/// writing such a page into the buffer while the service is stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_hash_whose_page_a_crash_left_behind_still_gets_its_row() {
    let Huge {
        server,
        mut client,
        _dir,
        store,
        mappings,
    } = huge_hash_captured().await;
    let key = HUGE;
    let logged = store
        .changes(ChangeSeq::NONE, 1_000)
        .expect("changes")
        .len();

    // Redis changes the mapped field while the service is stopped; an interrupted full sync
    // had already written the page holding it (the header is the older one).
    let set = ["HSET", key, "first_name", "new"]
        .map(String::from)
        .to_vec();
    send_all(&mut client, &[set]).await;
    let mut page = Fields::new();
    let new = FieldValue {
        value: Bytes::from_static(b"new"),
        expire_at_ms: None,
    };
    page.insert(Bytes::from_static(b"first_name"), new);
    let mut batch = Batch::default();
    batch.put_fields(0, key.as_bytes(), page);
    store.write(batch, true).expect("page");

    full_sync_again(&server, &mut client, &store, &mappings).await;
    let changes = store.changes(ChangeSeq::NONE, 1_000).expect("changes");
    let rows: Vec<&Change> = changes[logged..]
        .iter()
        .filter(|c| &c.row_id[..] == b"huge")
        .collect();
    let carries_new = |c: &&Change| match &c.row {
        RowChange::Upsert { columns } => columns
            .iter()
            .any(|(_, v)| v.as_deref() == Some(&b"new"[..])),
        RowChange::Delete => false,
    };
    assert!(
        rows.iter().any(carries_new),
        "the restarted sync logged no row for the hash: {rows:?}"
    );
    assert_follows_redis(&store, &mut client, &mappings).await;
}
