//! Transactions far longer than a part (`src/capture/long_unit.rs`), against real servers: they
//! are written in parts and end as one unit; a link lost or a process killed inside one rolls
//! back what was written of it, and it is received and applied again, once.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::capture::*;
use support::proxy::LinkProxy;
use support::send_all;
use support::RedisServer;
use writebehind::buffer::{Change, Store};
use writebehind::capture::mapping::Mappings;
use writebehind::capture::CaptureOutputs;
use writebehind::config::RedisEndpoint;
use writebehind::redis_client::{info_field, RedisClient};

/// `MULTI`, an `HSET` of `first_name` on `person2:<prefix><i>` for every `i` in `keys`, `EXEC`.
fn transaction(prefix: &str, keys: std::ops::Range<usize>, value: &str) -> Vec<Vec<String>> {
    let mut commands = vec![vec!["MULTI".to_string()]];
    commands.extend(keys.map(|i| {
        vec![
            "HSET".into(),
            format!("person2:{prefix}{i}"),
            "first_name".into(),
            format!("{value}{i}"),
        ]
    }));
    commands.push(vec!["EXEC".into()]);
    commands
}

fn all_changes(store: &Store) -> Vec<Change> {
    store
        .changes(Default::default(), usize::MAX)
        .expect("changes")
}

/// Every unit of the log is whole: it starts at its own seq, its changes follow each other, and
/// only its last change ends it.
fn assert_units_whole(changes: &[Change]) {
    let mut open: Option<u64> = None;
    for change in changes {
        match open {
            None => assert_eq!(change.unit, change.seq, "a unit starts at its first change"),
            Some(unit) => assert_eq!(change.unit.0, unit, "seq {}", change.seq),
        }
        open = (!change.unit_end).then_some(change.unit.0);
    }
    assert_eq!(open, None, "the last unit is not ended");
}

/// The changes of the unit that ends last.
fn last_unit(changes: &[Change]) -> Vec<&Change> {
    let Some(last) = changes.last() else {
        return Vec::new();
    };
    changes.iter().filter(|c| c.unit == last.unit).collect()
}

/// A new primary (started with `args`) and capture running on it in this process, caught up.
/// Destructure it binding every field: one left to `..` is dropped at once (the server stops).
struct Captured {
    server: RedisServer,
    client: RedisClient,
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    mappings: Mappings,
    running: Running,
}

async fn capture_started(args: &[&str]) -> Captured {
    capture_started_spooling(args, true).await
}

/// `spool: false`: the link never spools the stream (`start_capture_unspooled`).
async fn capture_started_spooling(args: &[&str], spool: bool) -> Captured {
    let server = RedisServer::start(args);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let mappings = mappings(&server, "keep");
    let running = match spool {
        true => start_capture(&server, store.clone(), mappings.clone()),
        false => start_capture_unspooled(&server, store.clone(), mappings.clone()),
    };
    caught_up(&store, &mut client).await;
    Captured {
        server,
        client,
        _dir: dir,
        store,
        mappings,
        running,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_is_written_in_parts_and_ends_as_one_unit() {
    let Captured {
        server: _server,
        mut client,
        _dir,
        store,
        mappings,
        running,
    } = capture_started(&[]).await;
    // Rows that exist before: the transaction updates some and deletes others.
    send_all(&mut client, &transaction("", 0..3000, "before")[1..3001]).await;
    caught_up(&store, &mut client).await;
    let before = all_changes(&store).len();

    let keys = 30_000;
    let mut commands = transaction("", 0..keys, "inside");
    let exec = commands.pop().expect("EXEC");
    commands.extend((0..1000).map(|i| vec!["DEL".into(), format!("person2:{}", i * 3)]));
    // Then more keys than a part holds change no row (an unmapped field): the unit's last
    // change was written with an earlier part's, and must still end the unit.
    commands.extend((10_000..20_000).map(|i| {
        vec![
            "HSET".into(),
            format!("person2:{i}"),
            "unmapped".into(),
            "x".into(),
        ]
    }));
    commands.push(exec);
    send_all(&mut client, &commands).await;
    let exec_end = master_offset(&mut client).await;
    caught_up(&store, &mut client).await;
    let capture = running.stop().await;

    assert!(
        capture.stats().unit_parts_written >= 2,
        "a transaction of {keys} keys is written in parts: {:?}",
        capture.stats()
    );
    assert_eq!(capture.stats().units_rolled_back, 0);
    assert_eq!(store.open_unit().expect("open unit"), None);
    assert!(!store.has_undo(0, b"person2:5").expect("undo"));
    let changes = all_changes(&store);
    assert_units_whole(&changes);
    let unit = last_unit(&changes);
    assert_eq!(unit.len(), changes.len() - before, "one unit");
    assert_eq!(unit.len(), keys + 1000);
    // The unit's last change records the offset after EXEC (where a sink's checkpoint goes);
    // those written in parts, the offset before MULTI (the first one was).
    let (last, others) = unit.split_last().expect("changes");
    let start = unit[0].offset;
    assert!(last.offset.0 <= exec_end && start < last.offset);
    assert!(others
        .iter()
        .all(|c| c.offset == start || c.offset == last.offset));
    let redis = assert_follows_redis(&store, &mut client, &mappings).await;
    assert_eq!(redis.len(), keys - 1000);
}

/// A write that reaches the stream just before a long transaction touching the same key (a
/// script's effects, pipelined right after it): the unit starts from the value that write
/// left, not from an older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_sees_the_write_just_before_it() {
    let Captured {
        server: _server,
        mut client,
        _dir,
        store,
        mappings,
        running,
    } = capture_started(&[]).await;
    let script = "redis.call('HSET', ARGV[1], 'age', '9') \
                  for i = 0, 9999 do redis.call('HSET', ARGV[2] .. i, 'first_name', 'x') end";
    for round in 0..5 {
        let key = format!("person2:{round}");
        client
            .command(&["HSET", &key, "first_name", "before"])
            .await
            .expect("hset");
        caught_up(&store, &mut client).await;
        let prefix = format!("person2:r{round}-");
        client
            .pipeline(&[
                &["HSET", &key, "last_name", "just before"][..],
                &["EVAL", script, "0", &key, &prefix][..],
            ])
            .await
            .expect("pipeline");
        caught_up(&store, &mut client).await;
    }
    let capture = running.stop().await;
    assert!(
        capture.stats().unit_parts_written >= 5,
        "{:?}",
        capture.stats()
    );
    assert_follows_redis(&store, &mut client, &mappings).await;
}

/// While a transaction arrives in parts, `/status` shows it open (where it began, its commands
/// so far, its parts written), and once its `EXEC` has arrived, no longer. A proxy holds the
/// replication stream inside the transaction, so that it stays open while the test looks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_is_shown_until_its_exec_arrives() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let proxy = LinkProxy::start(server.port).await;
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let mappings = mappings(&server, "keep");
    let health = writebehind::metrics::Health::new();
    let outputs = CaptureOutputs {
        health: health.clone(),
        ..Default::default()
    };
    let through_proxy =
        RedisEndpoint::parse(&format!("redis://127.0.0.1:{}", proxy.port)).expect("endpoint");
    let running = start_capture_as(through_proxy, store.clone(), mappings.clone(), outputs);
    caught_up(&store, &mut client).await;
    let shown = || health.status(&Default::default())["open_transaction"].clone();
    assert!(shown().is_null(), "{}", shown());

    let before = master_offset(&mut client).await;
    let keys = 40_000;
    // About half of the transaction's 73 bytes a command pass, then the stream is held.
    proxy.hold_after(keys as u64 * 35);
    send_all(&mut client, &transaction("open", 0..keys, "inside")).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let open = loop {
        let open = shown();
        // (Shown when handed to the committer, which writes it a moment later.) The stream is
        // held inside the transaction: it stays open while the test looks.
        if open["parts_written"].as_u64().unwrap_or(0) >= 1
            && store.open_unit().expect("open unit").is_some()
            && proxy.holding()
        {
            break open;
        }
        assert!(
            Instant::now() < deadline,
            "no open transaction shown: {open}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // It began at MULTI (after a PING of the primary's, at most).
    let start = open["start_offset"].as_u64().expect("start");
    assert!(
        (before..before + 64).contains(&start),
        "{open} (before {before})"
    );
    let received = open["commands"].as_u64().expect("commands");
    assert!(
        (8192..keys as u64).contains(&received),
        "part of the transaction received: {open}"
    );
    assert!(open["open_seconds"].as_f64().is_some(), "{open}");
    let checkpoint = store.checkpoint().expect("checkpoint");
    assert_eq!(
        checkpoint.position.map(|p| p.offset.0),
        Some(start),
        "nothing of it is acknowledged before its end"
    );

    proxy.release();
    caught_up(&store, &mut client).await;
    assert!(shown().is_null(), "ended: {}", shown());
    let capture = running.stop().await;
    assert_eq!(capture.stats().units_rolled_back, 0);
    assert_follows_redis(&store, &mut client, &mappings).await;
}

/// A command that needs a full resync (SWAPDB of a mapped database) late in a transaction
/// already written in parts: what was written is rolled back before the full sync, which then
/// reconciles the mirror and the log with Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_that_needs_a_full_resync_is_rolled_back_first() {
    let Captured {
        server: _server,
        mut client,
        _dir,
        store,
        mappings,
        running,
    } = capture_started(&[]).await;

    let keys = 20_000;
    let mut commands = transaction("", 0..keys, "inside");
    let exec = commands.pop().expect("EXEC");
    commands.push(vec!["SWAPDB".into(), "0".into(), "1".into()]);
    commands.push(exec);
    send_all(&mut client, &commands).await;
    caught_up(&store, &mut client).await;
    let capture = running.stop().await;

    assert!(
        capture.stats().unit_parts_written >= 2,
        "{:?}",
        capture.stats()
    );
    assert_eq!(
        capture.stats().units_rolled_back,
        1,
        "{:?}",
        capture.stats()
    );
    assert_eq!(capture.stats().full_syncs, 2);
    assert_eq!(store.open_unit().expect("open unit"), None);
    assert_units_whole(&all_changes(&store));
    assert_follows_redis(&store, &mut client, &mappings).await;
}

/// A command that needs a full resync right after a long transaction, in the same read of the
/// stream: the unit's end was applied but not written when the batch is dropped, so what was
/// written of it is rolled back before the full sync (left, it would stop every sink at the
/// unit for good and be rolled back over the full sync's changes at the next start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_right_after_a_long_transaction_rolls_back_its_written_parts() {
    let Captured {
        server: _server,
        mut client,
        _dir,
        store,
        mappings,
        running,
    } = capture_started(&[]).await;
    let script = "for i = 0, 19999 do redis.call('HSET', 'person2:' .. i, 'first_name', 'x') end";
    client
        .pipeline(&[&["EVAL", script, "0"][..], &["SWAPDB", "0", "1"][..]])
        .await
        .expect("pipeline");
    caught_up(&store, &mut client).await;
    let capture = running.stop().await;

    assert!(
        capture.stats().unit_parts_written >= 2,
        "{:?}",
        capture.stats()
    );
    assert_eq!(capture.stats().full_syncs, 2);
    assert_eq!(
        store.open_unit().expect("open unit"),
        None,
        "{:?}",
        capture.stats()
    );
    assert_units_whole(&all_changes(&store));
    assert_follows_redis(&store, &mut client, &mappings).await;
}

/// The primary cuts the link while capture is inside a transaction it has written parts of
/// (the transaction is larger than the socket's buffers and this link does not spool the
/// stream, so its EXEC is not yet received): they are rolled back, the partial resync sends
/// the transaction again from its MULTI, and the log holds it once, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_lost_inside_a_long_transaction_rolls_it_back_and_receives_it_again() {
    let Captured {
        server,
        mut client,
        _dir,
        store,
        mappings,
        running,
    } = capture_started_spooling(&["--repl-backlog-size", "256mb"], false).await;

    // About 40 MB of stream: 150,000 HSETs with 200-byte values.
    let keys = 150_000;
    let value = "v".repeat(200);
    let commands = transaction("", 0..keys, &value);
    let capture = cut_inside_a_transaction(&server, &store, &mut client, commands, running).await;
    assert_eq!(
        capture.stats().full_syncs,
        1,
        "resumed with a partial resync"
    );
    assert!(capture.stats().partial_syncs >= 1);
    let changes = all_changes(&store);
    assert_units_whole(&changes);
    assert_eq!(
        last_unit(&changes).len(),
        keys,
        "the transaction once, as one unit"
    );
    let redis = assert_follows_redis(&store, &mut client, &mappings).await;
    assert_eq!(redis.len(), keys);
}

/// `kill -9` while the service has written parts of a transaction (seen through a reader of
/// its buffer): the restart rolls them back, the primary sends the transaction again, and every
/// row of it reaches MariaDB once (triggers count the writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_inside_a_long_transaction_rolls_it_back_and_applies_it_once() {
    let server = RedisServer::start(&["--repl-backlog-size", "256mb"]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let database = CountedDb::maria().await;
    let (config, buffer) = service_config_for(&server, &dir, &database.url());
    let mut service = spawn_service(&config);
    until_attached(&mut client, || service_log(&config)).await;

    let (transactions, per) = (2, 40_000);
    for t in 0..transactions {
        // New rows (`seq` is what the counted table checks), one transaction each.
        let mut commands = vec![vec!["MULTI".to_string()]];
        commands.extend((t * per..(t + 1) * per).map(|i| {
            let seq = (i + 1).to_string();
            vec!["HSET".into(), format!("person2:{seq}"), "seq".into(), seq]
        }));
        commands.push(vec!["EXEC".into()]);
        send_all(&mut client, &commands).await;
        let deadline = Instant::now() + Duration::from_secs(120);
        while Store::open_for_reading(&buffer)
            .and_then(|reader| reader.open_unit())
            .ok()
            .flatten()
            .is_none()
        {
            assert!(
                Instant::now() < deadline,
                "transaction {t}: no part was written{}",
                service_log(&config)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = service.kill();
        let _ = service.wait();
        // Stopped inside it: `status` shows what the next start rolls back.
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_writebehind"))
            .args(["status", "--config"])
            .arg(&config)
            .output()
            .expect("status");
        let status: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("status JSON");
        assert_eq!(status["service"], "stopped", "{status}");
        let open = &status["open_transaction"];
        assert!(
            open["first_seq"].as_u64().is_some_and(|seq| seq > 0)
                && open["note"]
                    .as_str()
                    .is_some_and(|note| note.contains("rolled back at the next start")),
            "{status}"
        );
        service = spawn_service(&config);
        let deadline = Instant::now() + Duration::from_secs(60);
        while info_field(
            &client.info("stats").await.expect("info"),
            "sync_partial_ok",
        ) != Some((t + 1).to_string().as_str())
        {
            assert!(
                Instant::now() < deadline,
                "restart {t} did not resume{}",
                service_log(&config)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let written = (transactions * per) as u64;
    until_caught_up(&mut client, &database, written, || service_log(&config)).await;
    let _ = service.kill();
    let _ = service.wait();

    let log = service_log(&config);
    assert_eq!(
        log.matches("rolled back a transaction written in parts")
            .count(),
        transactions,
        "every kill landed inside a transaction and was rolled back:{log}"
    );
    let stats = client.info("stats").await.expect("info");
    assert_eq!(info_field(&stats, "sync_full"), Some("1"));
    assert_each_row_written_once(&database, written).await;
    database.drop_database().await;
}

/// The embedded default: a transaction of more changes than a batch holds reaches SQLite in one
/// transaction written in parts, every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_reaches_sqlite_once() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let database = CountedDb::sqlite(dir.path().join("writebehind.db"));
    let (config, _buffer) = service_config_for(&server, &dir, &database.url());
    let mut service = spawn_service(&config);
    until_attached(&mut client, || service_log(&config)).await;
    // Twice what a batch holds by its bytes alone (each change counted at least
    // `DECODED_CHANGE_BYTES`).
    let rows = (2 * writebehind::sink::runner::BATCH_LIMIT.bytes
        / writebehind::buffer::DECODED_CHANGE_BYTES) as u64;
    let mut commands = vec![vec!["MULTI".to_string()]];
    commands.extend((1..=rows).map(|seq| {
        let seq = seq.to_string();
        vec!["HSET".into(), format!("person2:{seq}"), "seq".into(), seq]
    }));
    commands.push(vec!["EXEC".into()]);
    send_all(&mut client, &commands).await;
    until_caught_up(&mut client, &database, rows, || service_log(&config)).await;
    let _ = service.kill();
    let _ = service.wait();
    assert_each_row_written_once(&database, rows).await;
}
