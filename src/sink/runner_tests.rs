//! Unit tests of the runner with the in-memory destination (the real databases are in tests/).
use super::*;
use crate::buffer::{HashOp, RowChange};
use crate::position::ReplOffset;
use crate::sink::convert::SqlValue;
use crate::sink::memory::MemoryDestination;

fn change(seq: u64, uuid: Option<&str>) -> Change {
    Change {
        seq: ChangeSeq(seq),
        unit: ChangeSeq(seq),
        unit_end: true,
        offset: ReplOffset(100 + seq),
        mapping: "P".into(),
        row_id: Bytes::from(format!("{seq}")),
        row: RowChange::Delete,
        op: uuid.map(|u| HashOp {
            op: b'~',
            uuid: Bytes::copy_from_slice(u.as_bytes()),
            db: 0,
            key: Bytes::from(format!("p:{seq}")),
        }),
    }
}

fn links(store: &Arc<Store>) -> RunnerLinks {
    RunnerLinks {
        store: store.clone(),
        committed: Arc::new(Notify::new()),
        positions: Arc::new(AppliedPositions::new(1)),
        health: crate::metrics::Health::new(),
        writeback: Arc::new(Writeback::default()),
        peers: None,
    }
}

fn mappings() -> Vec<Mapping> {
    let text = "[source]\nurl = \"redis://127.0.0.1:1\"\n[backends.db]\nurl = \"sqlite://unused\"\n[[mappings]]\nname = \"P\"\nprefix = \"p\"\nbackend = \"db\"\ntable = \"t\"\nkey_column = \"id\"\n[mappings.columns]\nname = \"name\"\n";
    let config = crate::config::Config::parse(text, &|_| None).expect("config");
    config.mappings.iter().map(Mapping::from_config).collect()
}

/// A crash between a database commit and the ack queue: the next start queues the acks of
/// what the database has, once.
#[tokio::test]
async fn acks_lost_between_commit_and_queue_are_queued_at_start() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(&dir.path().join("buffer")).expect("store"));
    let mut batch = Batch::default();
    for c in [change(1, None), change(2, Some("u2")), change(3, None)] {
        batch.put_change(&c);
    }
    store.write(batch, true).expect("write");
    let start = || {
        SinkRunner::start(
            "db",
            vec![MemoryDestination::default()],
            mappings(),
            links(&store),
        )
    };
    let mut runner = start().await.expect("runner");
    // As if the database had committed through seq 3 and the process died right after.
    runner.applied = vec![ChangeSeq(3)];
    runner.catch_up_acks().expect("catch up");
    let acks = store.acks(0, 10).expect("acks");
    assert_eq!(acks.len(), 1);
    assert_eq!(
        (
            acks[0].key.as_ref(),
            acks[0].uuid.as_ref(),
            &acks[0].failure
        ),
        (&b"p:2"[..], &b"u2"[..], &None)
    );
    assert_eq!(store.acks_enqueued("db").expect("mark"), ChangeSeq(3));
    runner.catch_up_acks().expect("again");
    assert_eq!(store.acks(0, 10).expect("acks").len(), 1, "queued once");
}

async fn runner(
    store: &Arc<Store>,
    sinks: Vec<MemoryDestination>,
) -> SinkRunner<MemoryDestination> {
    let mut runner = SinkRunner::start("db", sinks, mappings(), links(store))
        .await
        .expect("runner");
    runner.batch_limit = ReadLimit::from(TEST_BATCH_CHANGES);
    runner
}

/// The batch size of these tests' runners (a count only, as before batches were bounded by
/// bytes too): their long units are 12,000 changes.
const TEST_BATCH_CHANGES: usize = 5_000;

/// A buffer holding 40 upserts with `#` ops, and a runner in two partitions.
async fn forty_ops_in_two_partitions() -> (
    tempfile::TempDir,
    Arc<Store>,
    Vec<Change>,
    SinkRunner<MemoryDestination>,
) {
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let changes: Vec<Change> = (1..=40)
        .map(|seq| upsert(seq, &seq.to_string(), "n", Some(&format!("u{seq}"))))
        .collect();
    log(&store, &changes);
    let sinks = vec![MemoryDestination::default(), MemoryDestination::default()];
    let runner = runner(&store, sinks).await;
    (dir, store, changes, runner)
}

fn upsert(seq: u64, row: &str, name: &str, uuid: Option<&str>) -> Change {
    Change {
        row_id: Bytes::copy_from_slice(row.as_bytes()),
        row: RowChange::Upsert {
            columns: vec![("name".into(), Some(Bytes::copy_from_slice(name.as_bytes())))],
        },
        op: uuid.map(|u| HashOp {
            op: b'=',
            uuid: Bytes::copy_from_slice(u.as_bytes()),
            db: 0,
            key: Bytes::from(format!("p:{row}")),
        }),
        ..change(seq, None)
    }
}

fn log(store: &Store, changes: &[Change]) {
    let mut batch = Batch::default();
    for c in changes {
        batch.put_change(c);
    }
    store.write(batch, true).expect("write");
}

/// A transient failure is retried with backoff; the batch then commits once, with its
/// checkpoint, and the runner moves on from there.
#[tokio::test]
async fn a_transient_failure_is_retried_and_the_batch_commits_once() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    log(
        &store,
        &[
            upsert(1, "1", "a", None),
            upsert(2, "2", "b", None),
            upsert(3, "1", "c", None),
        ],
    );
    let destination = MemoryDestination {
        fail_next: 2,
        ..MemoryDestination::default()
    };
    let mut runner = runner(&store, vec![destination]).await;
    assert!(runner.step().await.expect("step"), "a batch was applied");
    assert_eq!(runner.sinks[0].commits, 1);
    assert_eq!(runner.sinks[0].checkpoints["db"].seq, ChangeSeq(3));
    assert_eq!(runner.applied, vec![ChangeSeq(3)]);
    let rows = &runner.sinks[0].tables["t"];
    assert_eq!(rows.len(), 2);
    assert_eq!(rows["1"], vec![SqlValue::Text("c".into())], "coalesced");
    assert!(!runner.step().await.expect("step"), "nothing left");
    assert_eq!(runner.sinks[0].commits, 1);
}

/// A row the database refuses is dead-lettered inside the commit with its reason; the rest
/// commits; the refused change's client acknowledgement says `failed` with that reason.
#[tokio::test]
async fn a_refused_row_is_dead_lettered_and_its_ack_fails_while_the_rest_commits() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    log(
        &store,
        &[
            upsert(1, "1", "a", Some("u1")),
            upsert(2, "2", "b", Some("u2")),
        ],
    );
    let destination = MemoryDestination {
        refuse: ["2".to_string()].into(),
        ..MemoryDestination::default()
    };
    let mut runner = runner(&store, vec![destination]).await;
    assert!(runner.step().await.expect("step"));
    assert_eq!(
        runner.sinks[0].tables["t"].len(),
        1,
        "the other row committed"
    );
    let letters = store.dead_letters().expect("letters");
    assert_eq!(letters.len(), 1);
    assert_eq!(
        (letters[0].seq, letters[0].row_id.as_ref()),
        (ChangeSeq(2), &b"2"[..])
    );
    assert_eq!(
        acks_by_uuid(&store),
        vec![
            (b"u1".to_vec(), None),
            (
                b"u2".to_vec(),
                Some("refused by the memory destination".to_string())
            )
        ]
    );
    assert_eq!(store.acks_enqueued("db").expect("mark"), ChangeSeq(2));
}

/// A COMMIT that reached the database but whose answer was lost: the retry finds the batch in
/// (its checkpoint row) and does not apply it again, and a row that commit refused (and
/// dead-lettered) still gets a `failed` acknowledgement, not `done`.
#[tokio::test]
async fn a_lost_commit_answer_keeps_the_refusals_of_the_commit() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    log(
        &store,
        &[
            upsert(1, "1", "a", Some("u1")),
            upsert(2, "2", "b", Some("u2")),
        ],
    );
    let destination = MemoryDestination {
        refuse: ["2".to_string()].into(),
        lose_answer_next: 1,
        ..MemoryDestination::default()
    };
    let mut runner = runner(&store, vec![destination]).await;
    assert!(runner.step().await.expect("step"));
    assert_eq!(runner.sinks[0].commits, 1, "applied once");
    assert_eq!(
        acks_by_uuid(&store),
        vec![
            (b"u1".to_vec(), None),
            (
                b"u2".to_vec(),
                Some("refused by the memory destination".to_string())
            )
        ]
    );
}

/// The queued acks as (uuid, failure), in queue order.
fn acks_by_uuid(store: &Store) -> Vec<(Vec<u8>, Option<String>)> {
    let acks = store.acks(0, 10).expect("acks");
    acks.into_iter()
        .map(|a| (a.uuid.to_vec(), a.failure))
        .collect()
}

/// A batch holds whole units and no more than it must: units of 1,024 changes (a flush's pages)
/// give batches of the units that end within `TEST_BATCH_CHANGES`; one unit longer than that is
/// one batch of its own, whole; every change is applied once.
#[tokio::test]
async fn batches_end_at_the_last_whole_unit() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let unit = |first: u64, len: u64| -> Vec<Change> {
        (first..first + len)
            .map(|seq| Change {
                unit: ChangeSeq(first),
                unit_end: seq == first + len - 1,
                ..change(seq, None)
            })
            .collect()
    };
    let mut changes = Vec::new();
    for page in 0..12 {
        changes.extend(unit(1 + page * 1024, 1024));
    }
    let long = TEST_BATCH_CHANGES as u64 * 3 / 2;
    changes.extend(unit(1 + 12 * 1024, long));
    changes.extend(unit(1 + 12 * 1024 + long, 10));
    log(&store, &changes);
    let mut runner = runner(&store, vec![MemoryDestination::default()]).await;
    let mut sizes = Vec::new();
    let mut applied = ChangeSeq::NONE;
    while runner.step().await.expect("step") {
        let now = runner.applied[0];
        sizes.push(now.0 - applied.0);
        applied = now;
    }
    let whole = (TEST_BATCH_CHANGES as u64 / 1024) * 1024;
    assert_eq!(sizes[0], whole, "the units ending within the first read");
    assert!(sizes.contains(&long), "the long unit alone: {sizes:?}");
    assert!(sizes.iter().all(|s| *s <= whole || *s == long), "{sizes:?}");
    assert_eq!(applied.0, changes.len() as u64, "every change once");
}

/// With several partitions, a batch's acks are queued in stream order across the partitions'
/// shares: the write-back task writes them in queue order and the acked position stops before
/// the first one queued, so a share queued after another must not hold earlier offsets.
#[tokio::test]
async fn a_batch_queues_the_acks_of_all_its_partitions_in_stream_order() {
    let (_dir, store, _, mut runner) = forty_ops_in_two_partitions().await;
    assert!(runner.step().await.expect("step"));
    let acks = store.acks(0, 100).expect("acks");
    let offsets: Vec<u64> = acks.iter().map(|a| a.offset.0).collect();
    let mut sorted = offsets.clone();
    sorted.sort();
    assert_eq!(offsets.len(), 40);
    assert_eq!(offsets, sorted, "queued in stream order");
    // Both partitions' shares had acks (a share's marker is written with its acks).
    for partition in 0..2 {
        let row = format!("db#{partition}/2");
        assert_eq!(store.acks_enqueued(&row).expect("marker"), ChangeSeq(40));
    }
}

/// The same after a crash between the partitions' commits and their ack queue: the catch-up at
/// start queues every partition's acks, once, in change-log order across the partitions.
#[tokio::test]
async fn the_acks_caught_up_at_start_are_queued_in_change_log_order_across_partitions() {
    let (_dir, store, changes, mut runner) = forty_ops_in_two_partitions().await;
    // As if both partitions had committed through seq 40 (partition 1 only through 30) and the
    // process died before queueing.
    runner.applied = vec![ChangeSeq(40), ChangeSeq(30)];
    runner.catch_up_acks().expect("catch up");
    let seqs: Vec<u64> = store
        .acks(0, 100)
        .expect("acks")
        .iter()
        .map(|a| a.offset.0 - 100)
        .collect();
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(seqs, sorted, "queued in change-log order");
    let partition_1 = |seq: &u64| runner.partition(&changes[*seq as usize - 1]) == 1;
    assert!(seqs.iter().all(|s| *s <= 30 || !partition_1(s)), "{seqs:?}");
    let expected = (1..=40u64).filter(|s| *s <= 30 || !partition_1(s)).count();
    assert_eq!(seqs.len(), expected, "each once");
    runner.catch_up_acks().expect("again");
    assert_eq!(
        store.acks(0, 100).expect("acks").len(),
        expected,
        "queued once"
    );
}

/// One unit of `len` upserts from seq `first`: rows `0..len`, each named `name`.
fn long_unit(first: u64, len: u64, name: &str) -> Vec<Change> {
    (0..len)
        .map(|i| Change {
            unit: ChangeSeq(first),
            unit_end: i + 1 == len,
            ..upsert(first + i, &i.to_string(), name, None)
        })
        .collect()
}

/// 12,000 changes in one unit, then a unit of one change; the destination writes long units in
/// parts (with `destination`'s other settings).
async fn long_unit_runner(
    destination: MemoryDestination,
) -> (tempfile::TempDir, Arc<Store>, SinkRunner<MemoryDestination>) {
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    log(&store, &long_unit(1, 12_000, "a"));
    log(&store, &[upsert(12_001, "x", "b", None)]);
    let destination = MemoryDestination {
        streams: true,
        ..destination
    };
    let runner = runner(&store, vec![destination]).await;
    (dir, store, runner)
}

fn assert_long_unit_written(runner: &SinkRunner<MemoryDestination>) {
    let rows = &runner.sinks[0].tables["t"];
    assert_eq!(rows.len(), 12_000);
    assert!(rows
        .values()
        .all(|v| *v == vec![SqlValue::Text("a".into())]));
    assert_eq!(runner.sinks[0].checkpoints["db"].seq, ChangeSeq(12_000));
    assert_eq!(runner.applied, vec![ChangeSeq(12_000)]);
    assert_eq!(runner.sinks[0].open_unit, None, "no transaction left open");
}

/// A unit longer than a batch is written a batch at a time inside one transaction, committed
/// once with its checkpoint; the next unit follows as usual.
#[tokio::test]
async fn a_unit_longer_than_a_batch_is_written_in_parts_in_one_transaction() {
    let (_dir, _store, mut runner) = long_unit_runner(MemoryDestination::default()).await;
    assert!(runner.step().await.expect("step"));
    assert_long_unit_written(&runner);
    let sink = &runner.sinks[0];
    assert_eq!((sink.commits, sink.unit_parts), (1, 2));
    assert!(
        sink.largest_batch <= TEST_BATCH_CHANGES,
        "{}",
        sink.largest_batch
    );
    assert!(runner.step().await.expect("step"));
    assert_eq!(runner.sinks[0].commits, 2);
    assert_eq!(runner.sinks[0].tables["t"].len(), 12_001);
    assert!(!runner.step().await.expect("step"), "nothing left");
}

/// A row the database refuses inside a long unit: the unit is rolled back and written whole,
/// which dead-letters that row and commits the rest once.
#[tokio::test]
async fn a_long_unit_with_a_refused_row_is_written_whole() {
    let destination = MemoryDestination {
        refuse: ["7000".to_string()].into(),
        ..MemoryDestination::default()
    };
    let (_dir, store, mut runner) = long_unit_runner(destination).await;
    assert!(runner.step().await.expect("step"));
    let sink = &runner.sinks[0];
    assert_eq!(sink.commits, 1);
    assert_eq!(sink.largest_batch, 12_000, "written whole");
    assert_eq!(sink.tables["t"].len(), 11_999);
    assert_eq!(sink.open_unit, None);
    let letters = store.dead_letters().expect("letters");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].seq, ChangeSeq(7_001));
    assert_eq!(runner.applied, vec![ChangeSeq(12_000)]);
}

/// An outage after a part was written: the open transaction is dropped and the unit written
/// again from its first change, committed once.
#[tokio::test]
async fn a_long_unit_cut_by_an_outage_is_written_again_from_its_start() {
    let destination = MemoryDestination {
        fail_part: 2,
        ..MemoryDestination::default()
    };
    let (_dir, _store, mut runner) = long_unit_runner(destination).await;
    assert!(runner.step().await.expect("step"));
    assert_long_unit_written(&runner);
    assert_eq!(runner.sinks[0].commits, 1);
    assert_eq!(
        runner.sinks[0].unit_parts, 3,
        "part 1, then parts 1 and 2 again"
    );
}

/// The answer to the unit's COMMIT is lost after it committed: the checkpoint rows say it is
/// in, so it is not written again.
#[tokio::test]
async fn a_long_unit_whose_commit_answer_was_lost_is_not_written_twice() {
    let destination = MemoryDestination {
        lose_answer_next: 1,
        ..MemoryDestination::default()
    };
    let (_dir, _store, mut runner) = long_unit_runner(destination).await;
    assert!(runner.step().await.expect("step"));
    assert_long_unit_written(&runner);
    assert_eq!(runner.sinks[0].commits, 1);
    assert_eq!(runner.sinks[0].unit_parts, 2);
}

/// The long unit in two partitions: each partition's share goes through its own transaction
/// in parts and commits with its own checkpoint row; a partition a crash left past the unit
/// writes nothing again.
#[tokio::test]
async fn a_long_unit_in_two_partitions_is_written_a_share_at_a_time() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    log(&store, &long_unit(1, 12_000, "a"));
    let streaming = || MemoryDestination {
        streams: true,
        ..MemoryDestination::default()
    };
    let mut first = runner(&store, vec![streaming(), streaming()]).await;
    assert!(first.step().await.expect("step"));
    let mut rows = 0;
    for (index, sink) in first.sinks.iter().enumerate() {
        assert_eq!(sink.commits, 1, "partition {index}");
        assert!(
            sink.largest_batch <= TEST_BATCH_CHANGES,
            "{}",
            sink.largest_batch
        );
        assert!(
            sink.unit_parts >= 1,
            "partition {index} was written in parts"
        );
        assert_eq!(
            sink.checkpoints[&format!("db#{index}/2")].seq,
            ChangeSeq(12_000)
        );
        assert_eq!(sink.open_unit, None);
        rows += sink.tables["t"].len();
    }
    assert_eq!(rows, 12_000);
    assert_eq!(first.applied, vec![ChangeSeq(12_000); 2]);

    // As if partition 0 had committed its share and the process had died before partition 1.
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    log(&store, &long_unit(1, 12_000, "a"));
    let mut runner = runner(&store, vec![streaming(), streaming()]).await;
    runner.applied = vec![ChangeSeq(12_000), ChangeSeq::NONE];
    assert!(runner.step().await.expect("step"));
    assert_eq!(
        runner.sinks[0].commits, 0,
        "partition 0 writes nothing again"
    );
    // Not even a part: a transaction begun for nothing would be left open (on PostgreSQL the
    // next long unit then ran outside a transaction).
    assert_eq!(runner.sinks[0].parts_attempted, 0);
    assert_eq!(runner.sinks[0].open_unit, None);
    assert_eq!(runner.sinks[1].commits, 1);
    assert_eq!(runner.applied, vec![ChangeSeq(12_000); 2]);
}

/// A reconciliation writes mirror values to the database only once they are synced: capture
/// goes on writing the mirror while it runs, and a value it wrote but had not synced yet is
/// synced before the page holding it goes to the database (a crash of the machine could
/// otherwise take the value from the buffer and leave it in the table).
#[tokio::test]
async fn a_reconciliation_writes_only_synced_mirror_values() {
    use crate::buffer::{Checkpoint, FieldValue, MirrorValue};
    use crate::position::{ReplId, StreamPosition};
    use std::sync::atomic::{AtomicU64, Ordering};
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    // A complete mirror: the checkpoint of a finished full sync.
    let mut batch = Batch::default();
    batch.put_checkpoint(&Checkpoint {
        position: Some(StreamPosition {
            replid: ReplId::parse(&"a".repeat(40)).expect("replid"),
            offset: ReplOffset(10),
            db: 0,
        }),
        next_seq: ChangeSeq(1),
        generation: 1,
        full_sync_in_progress: false,
    });
    store.write(batch, true).expect("checkpoint");
    // While the reconciliation looks for rows to delete, capture writes a hash, not synced.
    let written_at = Arc::new(AtomicU64::new(u64::MAX));
    let mut sink = MemoryDestination::default();
    let (hook_store, hook_written) = (store.clone(), written_at.clone());
    sink.hooks.row_ids = Some(Box::new(move || {
        if hook_written.load(Ordering::SeqCst) != u64::MAX {
            return;
        }
        let mut value = MirrorValue::hash(1);
        let field = FieldValue {
            value: Bytes::from_static(b"v"),
            expire_at_ms: None,
        };
        value.fields.insert(Bytes::from_static(b"name"), field);
        let mut batch = Batch::default();
        batch.put_mirror(0, b"p:1", &value);
        hook_store.write(batch, false).expect("mirror write");
        let syncs = hook_store.syncs.load(Ordering::SeqCst);
        hook_written.store(syncs, Ordering::SeqCst);
    }));
    // The syncs begun when the page holding it is written.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (hook_store, hook_seen) = (store.clone(), seen.clone());
    sink.hooks.apply = Some(Box::new(move |batch: &SinkBatch| {
        if batch.writes.iter().any(|w| w.row_id.as_ref() == b"1") {
            let syncs = hook_store.syncs.load(Ordering::SeqCst);
            hook_seen.lock().expect("lock").push(syncs);
        }
    }));
    let mut runner = runner(&store, vec![sink]).await;
    let stop = std::future::pending::<()>();
    tokio::pin!(stop);
    let reconciled = runner
        .reconcile(&Reconcile::NoIdentity, &mut stop)
        .await
        .expect("reconcile");
    assert!(reconciled);
    let written_at = written_at.load(Ordering::SeqCst);
    assert_ne!(written_at, u64::MAX, "the hook wrote the hash");
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1, "its row written once: {seen:?}");
    assert!(
        seen[0] > written_at,
        "a sync began after the value was written and before its row was: {seen:?} after {written_at}"
    );
    let rows = &runner.sinks[0].tables["t"];
    assert_eq!(rows.get("1").map(Vec::len), Some(1), "{rows:?}");
}

/// A batch whose changes the buffer is still syncing (a window, `buffer/durability.rs`) is read
/// at once, but a backend that does not await the batch's gate inside its own transaction
/// (`Destination::waits_at_commit`) gets it only once the sync has returned.
#[tokio::test]
async fn a_batch_read_in_a_sync_window_is_applied_only_after_the_sync() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    log(&store, &[upsert(1, "1", "a", None)]);
    let mut runner = runner(&store, vec![MemoryDestination::default()]).await;
    assert!(runner.step().await.expect("step"));
    let mut batch = Batch::default();
    batch.put_change(&upsert(2, "2", "b", None));
    store.write_in_window(batch).expect("written, not synced");
    let stepping = tokio::spawn(async move {
        let applied = runner.step().await.expect("step");
        (applied, runner)
    });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(
        !stepping.is_finished(),
        "the step ended before the sync: it applied the batch early or did not read it"
    );
    store.sync_window().expect("sync");
    let (applied, runner) = stepping.await.expect("task");
    assert!(applied, "applied once synced");
    assert_eq!(runner.sinks[0].commits, 2);
    assert_eq!(runner.applied, vec![ChangeSeq(2)]);
    assert_eq!(
        runner.sinks[0].tables["t"]["2"],
        vec![SqlValue::Text("b".into())]
    );
}
