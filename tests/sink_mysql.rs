//! MySQL/MariaDB-specific sink behaviour against real servers: sessions stay strict whatever
//! the server's `sql_mode`, on every batch and not only the first; the partition count of a
//! backend changes between runs without losing or repeating a write (on PostgreSQL too); a
//! batch read before the buffer synced it is written at once and committed only after the sync
//! (on PostgreSQL too).

mod support;

use std::time::{Duration, Instant};

use support::sink::{
    config_text_with, run, start, Database, CAR_TABLE, COUNTED_PERSON_TABLE,
    COUNTED_PERSON_TABLE_POSTGRES, PERSON_TABLE,
};
use support::{MariaDbServer, RedisServer};
use writebehind::redis_client::RedisClient;

/// On a server whose `sql_mode` is empty (values clamped with a warning), every batch of the
/// service runs in a strict session: a value out of range for its column (300 for a `TINYINT`,
/// which passes the conversion to an integer and is left to the database) is refused and
/// dead-lettered in the tenth batch as in the first, never written clamped to 127. (A pooled
/// connection reset between batches would put the server's mode back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_batch_is_strict_on_a_server_that_is_not() {
    let mariadb = MariaDbServer::start_with(&["--sql-mode="]);
    let database = Database::maria_on(&mariadb).await;
    database
        .execute("CREATE TABLE person1 (id VARCHAR(64) PRIMARY KEY, first VARCHAR(255), last VARCHAR(255), age TINYINT)")
        .await;
    database.execute(CAR_TABLE).await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start(&server, &database).await;
    for round in 1..=10 {
        let key = format!("person2:{round}");
        run(
            &mut client,
            &["HSET", &key, "first_name", "F", "age", "300"],
        )
        .await;
        let fine = format!("person2:{}", 100 + round);
        run(&mut client, &["HSET", &fine, "age", "7"]).await;
        // Each round in its own batches: wait until it is applied.
        service.settle(&mut client, &database).await;
    }
    let rows = database.rows("person1", &["age"]).await;
    let clamped: Vec<&String> = rows
        .iter()
        .filter(|(_, v)| v[0].as_deref() != Some("7"))
        .map(|(id, _)| id)
        .collect();
    assert!(clamped.is_empty(), "written clamped: {clamped:?}");
    assert_eq!(rows.len(), 10, "the valid rows are written: {rows:?}");
    let letters = service.store.dead_letters().expect("dead letters");
    assert_eq!(
        letters.len(),
        10,
        "each out-of-range value refused: {letters:?}"
    );
    service.stop().await;
}

/// A value the server would alter without an error (a decimal rounded to its column's scale:
/// a note, even in a strict session) is refused and dead-lettered, never written rounded: the
/// batch's statement reports the note, the batch is redone row by row, and there the row's
/// statement, which succeeds with the note, refuses its row. Rows the server takes as sent are
/// written, in batches before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_the_server_would_round_is_refused_not_written_rounded() {
    let database = Database::maria().await;
    database
        .execute("CREATE TABLE person1 (id VARCHAR(64) PRIMARY KEY, first VARCHAR(255), last VARCHAR(255), age DECIMAL(5,2))")
        .await;
    database.execute(CAR_TABLE).await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start(&server, &database).await;
    run(&mut client, &["HSET", "person2:0", "age", "1.25"]).await;
    service.settle(&mut client, &database).await;
    for round in 1..=3 {
        let rounded = format!("person2:{round}");
        run(&mut client, &["HSET", &rounded, "age", "3.256"]).await;
        service.settle(&mut client, &database).await;
        let fine = format!("person2:{}", 100 + round);
        run(
            &mut client,
            &["HSET", &fine, "first_name", "é", "age", "7.25"],
        )
        .await;
        service.settle(&mut client, &database).await;
    }
    let rows = database.rows("person1", &["first", "age"]).await;
    let expected: std::collections::BTreeMap<String, Vec<Option<String>>> = [
        ("0", None, "1.25"),
        ("101", Some("é"), "7.25"),
        ("102", Some("é"), "7.25"),
        ("103", Some("é"), "7.25"),
    ]
    .into_iter()
    .map(|(id, first, age)| {
        (
            id.to_string(),
            vec![first.map(str::to_string), Some(age.to_string())],
        )
    })
    .collect();
    assert_eq!(
        rows.into_iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
        expected
    );
    let letters = service.store.dead_letters().expect("dead letters");
    let refused: Vec<(String, bool)> = letters
        .iter()
        .map(|l| {
            (
                String::from_utf8_lossy(&l.row_id).into_owned(),
                l.reason.contains("1265"),
            )
        })
        .collect();
    assert_eq!(
        refused,
        [1, 2, 3].map(|n| (n.to_string(), true)),
        "each rounded value refused with the server's note: {letters:?}"
    );
    service.stop().await;
}

/// The service as a process on the configuration `text`, its log kept in `dir`.
fn spawn(dir: &std::path::Path, text: &str, run: usize) -> support::ServiceProcess {
    let config = dir.join(format!("writebehind-{run}.toml"));
    std::fs::write(&config, text).expect("config");
    let log = std::fs::File::create(dir.join(format!("run-{run}.log"))).expect("log");
    support::spawn_service(&config, log)
}

/// SIGTERM, then waits for the exit (a graceful stop writes what was captured).
fn terminate(child: &mut std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The recipe's configuration with `partitions` and the buffer at `buffer`.
fn partitioned_config(
    server: &RedisServer,
    database: &Database,
    buffer: &std::path::Path,
    partitions: u32,
) -> String {
    let options = format!("partitions = {partitions}");
    format!(
        "{}\n[buffer]\npath = \"{}\"\n",
        config_text_with(server, &database.url(), &options),
        buffer.display()
    )
}

/// Writes `count` new keys `person2:<n>` (age n) from `next` on, in one pipeline.
async fn write_new_keys(client: &mut RedisClient, next: &mut u64, count: usize) {
    let commands: Vec<Vec<String>> = (0..count)
        .map(|_| {
            let n = next.to_string();
            *next += 1;
            vec!["HSET".into(), format!("person2:{n}"), "age".into(), n]
        })
        .collect();
    support::send_all(client, &commands).await;
}

/// Waits until `person1` has `expected` rows.
async fn until_rows(database: &Database, expected: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while database.rows("person1", &["age"]).await.len() as u64 != expected {
        assert!(Instant::now() < deadline, "{what}: rows missing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The partition count changes between runs: 1, then 4, then 2, then 3. In the run with 4,
/// partition 1's checkpoint row is held locked by the test while a load arrives, so the other
/// three partitions commit the batch and partition 1 cannot; the service is then killed
/// (SIGKILL): the rows are left apart, as a crash between the partitions' commits leaves them.
/// The next run (2 partitions) must finish the old layout's batch for partition 1 only, then
/// switch. At the end every key's row is there, written exactly once (counted by triggers), and
/// only the last layout's checkpoint rows remain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_count_changes_between_runs_without_loss_or_repeats() {
    let database = Database::maria().await;
    for statement in COUNTED_PERSON_TABLE.split(";\n") {
        database.execute(statement).await;
    }
    partition_count_changes(database).await;
}

/// The same on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_count_changes_between_runs_on_postgres() {
    let database = Database::postgres().await;
    database.execute(COUNTED_PERSON_TABLE_POSTGRES).await;
    partition_count_changes(database).await;
}

async fn partition_count_changes(database: Database) {
    database.execute(CAR_TABLE).await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let buffer = dir.path().join("buffer");
    let config_for = |partitions| partitioned_config(&server, &database, &buffer, partitions);
    let mut next = 1u64;
    for (run, partitions) in [1, 4, 2, 3].into_iter().enumerate() {
        let mut child = spawn(dir.path(), &config_for(partitions), run);
        write_new_keys(&mut client, &mut next, 3_000).await;
        until_rows(&database, next - 1, &format!("run {run}")).await;
        if partitions != 4 {
            tokio::task::block_in_place(|| terminate(&mut child.0));
            continue;
        }
        let before = database.checkpoint_rows().await;
        assert_eq!(before.len(), 4, "{before:?}");
        let lock = database.lock_checkpoint_row("db#1/4").await;
        write_new_keys(&mut client, &mut next, 3_000).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = database.checkpoint_rows().await;
            let moved: Vec<bool> = now.iter().zip(&before).map(|(a, b)| a.1 > b.1).collect();
            if moved == [true, false, true, true] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "partitions 0, 2, 3 did not commit: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.kill().expect("kill");
        child.wait().expect("wait");
        lock.release().await;
    }
    let rows = database.rows("person1", &["age"]).await;
    assert_eq!(rows.len() as u64, next - 1, "every key has its row");
    assert!(rows
        .iter()
        .all(|(id, v)| v[0].as_deref() == Some(id.as_str())));
    assert_eq!(database.written_twice().await, 0, "rows written twice");
    let names: Vec<String> = database
        .checkpoint_rows()
        .await
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(names, vec!["db#0/3", "db#1/3", "db#2/3"]);
    database.drop_database().await;
}

/// How many entries the acknowledgement stream of `key` and `uuid` holds.
async fn ack_count(client: &mut RedisClient, key: &str, uuid: &str) -> i64 {
    let stream = format!("{{{key}}}{uuid}");
    match client.command(&["XLEN", &stream]).await.expect("XLEN") {
        redis_protocol::resp2::types::BytesFrame::Integer(n) => n,
        other => panic!("XLEN {stream}: {other:?}"),
    }
}

/// Waits until the acknowledgement of `key`/`uuid` is in Redis.
async fn until_acked(client: &mut RedisClient, key: &str, uuid: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ack_count(client, key, uuid).await == 0 {
        assert!(Instant::now() < deadline, "no ack for {key} {uuid}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A start that must reconcile (the checkpoint row lost its buffer identity) and also changes
/// the partition count (1 to 4) queues no acknowledgement twice: the reconciliation runs in the
/// rows' own layout, whose acknowledgement marker says what was queued, and the switch to four
/// partitions follows. Each op's stream holds one entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciliation_with_a_new_partition_count_acks_each_op_once() {
    let database = Database::maria().await;
    database.execute(PERSON_TABLE).await;
    database.execute(CAR_TABLE).await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let buffer = dir.path().join("buffer");
    let config_for = |partitions| partitioned_config(&server, &database, &buffer, partitions);
    let mut child = spawn(dir.path(), &config_for(1), 0);
    for n in 1..=20 {
        let (key, op) = (format!("person2:{n}"), format!("=u{n}"));
        run(&mut client, &["HSET", &key, "age", "1", "#", &op]).await;
    }
    for n in 1..=20 {
        until_acked(&mut client, &format!("person2:{n}"), &format!("u{n}")).await;
    }
    tokio::task::block_in_place(|| terminate(&mut child.0));
    // A checkpoint row the service cannot vouch for: reconciled at the next start.
    database
        .execute("UPDATE writebehind_checkpoint SET buffer_id = NULL")
        .await;
    let mut child = spawn(dir.path(), &config_for(4), 1);
    run(
        &mut client,
        &["HSET", "person2:last", "age", "2", "#", "=last"],
    )
    .await;
    // Acks are written in the order they are queued: the catch-up after the reconciliation
    // comes before this one.
    until_acked(&mut client, "person2:last", "last").await;
    for n in 1..=20 {
        let count = ack_count(&mut client, &format!("person2:{n}"), &format!("u{n}")).await;
        assert_eq!(count, 1, "person2:{n} acknowledged {count} times");
    }
    let names: Vec<String> = database
        .checkpoint_rows()
        .await
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(names, vec!["db#0/4", "db#1/4", "db#2/4", "db#3/4"]);
    tokio::task::block_in_place(|| terminate(&mut child.0));
    database.drop_database().await;
}

/// Every row a batch writes or deletes is written inside the batch's transaction, on the
/// statement path and on the staged one (`LOAD DATA` and a merge): a trigger on the table
/// records `@@in_transaction` for each. The batch session runs with autocommit off and sends
/// no `START TRANSACTION`; were autocommit on, each statement would commit alone and a unit
/// could be seen, or survive a crash, in part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_of_a_batch_is_written_inside_its_transaction() {
    let database = Database::maria().await;
    database.execute(PERSON_TABLE).await;
    database.execute(CAR_TABLE).await;
    database.execute("CREATE TABLE tx_log (in_tx INT)").await;
    for event in ["INSERT", "UPDATE", "DELETE"] {
        database
            .execute(&format!("CREATE TRIGGER log_{event} BEFORE {event} ON person1 FOR EACH ROW INSERT INTO tx_log VALUES (@@in_transaction)"))
            .await;
    }
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start(&server, &database).await;
    run(&mut client, &["HSET", "person2:1", "first_name", "A"]).await;
    run(&mut client, &["HSET", "person2:2", "first_name", "B"]).await;
    service.settle(&mut client, &database).await;
    // 600 rows in one unit, one of them an update: tried as new rows straight into the table
    // (500 or more), rolled back on the key that exists, then staged and merged.
    one_transaction(&mut client, 2..602, "C").await;
    service.settle(&mut client, &database).await;
    run(&mut client, &["DEL", "person2:1", "person2:2"]).await;
    service.settle(&mut client, &database).await;
    let counts = counts_by(&database, "in_tx", "tx_log").await;
    let count = |in_tx: &str| counts.get(in_tx).copied().unwrap_or(0);
    assert_eq!(
        count("0"),
        0,
        "rows written outside a transaction: {counts:?}"
    );
    // 602 inserts, the update of person2:2 (its BEFORE INSERT and BEFORE UPDATE), 2 deletes.
    assert!(count("1") >= 605, "every row was logged: {counts:?}");
    service.stop().await;
    database.drop_database().await;
}

/// A large batch of new rows goes straight into its table (`LOAD DATA` into the table itself,
/// no stage), and every value arrives as sent: tabs, line breaks, backslashes, `\N`, non-ASCII
/// text, an empty string, an absent field (`NULL`), text converted into a `latin1` column. A large batch holding a key that exists is
/// rolled back to its savepoint and staged instead: the rolled-back attempt leaves nothing (its
/// rows and what their trigger wrote are gone), and the row that existed is updated, not
/// duplicated or skipped. A trigger logs, for every row inserted, how many rows the session's
/// stage held at that moment: 0 for a row loaded straight in, the batch's size for a merged
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_rows_go_straight_into_the_table_and_an_existing_key_sends_the_batch_to_the_stage() {
    let database = Database::maria().await;
    // `last` in latin1: text reaches it converted from UTF-8, as a statement's would.
    database
        .execute("CREATE TABLE person1 (id VARCHAR(64) PRIMARY KEY, first VARCHAR(255), last VARCHAR(255) CHARACTER SET latin1, age VARCHAR(20))")
        .await;
    database.execute(CAR_TABLE).await;
    database
        .execute("CREATE TABLE stage_log (n INT AUTO_INCREMENT PRIMARY KEY, staged INT)")
        .await;
    // The rows in the session's stages (named by table index; 1146: not made yet).
    database
        .execute("CREATE FUNCTION staged_rows() RETURNS INT READS SQL DATA BEGIN DECLARE n INT DEFAULT 0; DECLARE CONTINUE HANDLER FOR 1146 BEGIN END; SET n = n + (SELECT COUNT(*) FROM writebehind_stage_0); SET n = n + (SELECT COUNT(*) FROM writebehind_stage_1); RETURN n; END")
        .await;
    database
        .execute("CREATE TRIGGER log_stage AFTER INSERT ON person1 FOR EACH ROW INSERT INTO stage_log (staged) VALUES (staged_rows())")
        .await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start(&server, &database).await;
    service.settle(&mut client, &database).await;
    let tricky = [
        "a\tb",
        "line\nbreak\r\n",
        "back\\slash",
        "\\N",
        "ünïcödé ✓",
        "",
    ];
    let last = |n: u64| match n % 3 {
        0 => None,
        1 => Some("Doe".to_string()),
        _ => Some("Müller é".to_string()),
    };
    // In round 1, person2:599 changes.
    let first = |n: u64, round: u64| format!("{}{n}", tricky[(n + round) as usize % tricky.len()]);
    let hsets = |keys: std::ops::Range<u64>, round: u64| -> Vec<Vec<String>> {
        keys.map(|n| {
            let mut hset = vec!["HSET".to_string(), format!("person2:{n}")];
            hset.extend(["first_name".to_string(), first(n, round), "age".to_string()]);
            hset.push(n.to_string());
            if n % 3 != 0 {
                hset.extend(["last_name".to_string(), last(n).expect("a name")]);
            }
            hset
        })
        .collect()
    };
    let logged = || async {
        let counts = counts_by(&database, "staged > 0", "stage_log").await;
        let count = |staged: &str| counts.get(staged).copied().unwrap_or(0);
        (count("0"), count("1"))
    };
    let before = logged().await;
    multi(&mut client, &hsets(0..600, 0)).await;
    service.settle(&mut client, &database).await;
    let (straight, staged) = logged().await;
    assert_eq!(
        (straight - before.0, staged - before.1),
        (600, 0),
        "600 new rows loaded straight in, none through the stage"
    );
    // 599 exists: the whole table's share is staged; 600 more new rows, one update.
    multi(&mut client, &hsets(599..1200, 1)).await;
    service.settle(&mut client, &database).await;
    assert_eq!(
        logged().await,
        (straight, staged + 600),
        "the attempt rolled back; 600 rows inserted by the merge, person2:599 updated"
    );
    let rows = database.rows("person1", &["first", "last", "age"]).await;
    for n in 0..1200u64 {
        assert_eq!(
            rows.get(&n.to_string()),
            Some(&vec![
                Some(first(n, (n >= 599).into())),
                last(n),
                Some(n.to_string())
            ]),
            "person2:{n}"
        );
    }
    service.stop().await;
    database.drop_database().await;
}

/// The rows of `table` counted by the value of `expression`, as text.
async fn counts_by(
    database: &Database,
    expression: &str,
    table: &str,
) -> std::collections::BTreeMap<String, u64> {
    let grouped = format!("(SELECT CAST({expression} AS CHAR) AS id, CAST(COUNT(*) AS CHAR) AS n FROM {table} GROUP BY {expression}) AS counts");
    let rows = database.rows(&grouped, &["n"]).await;
    rows.into_iter()
        .map(|(value, n)| {
            let n = n[0].as_deref().map(|n| n.parse().expect("a count"));
            (value, n.unwrap_or(0))
        })
        .collect()
}

/// Runs `commands` as one `MULTI`.
async fn multi(client: &mut RedisClient, commands: &[Vec<String>]) {
    let mut all: Vec<Vec<&str>> = vec![vec!["MULTI"]];
    all.extend(
        commands
            .iter()
            .map(|c| c.iter().map(String::as_str).collect()),
    );
    all.push(vec!["EXEC"]);
    let slices: Vec<&[&str]> = all.iter().map(Vec::as_slice).collect();
    client.pipeline(&slices).await.expect("MULTI");
}

/// One `MULTI` of `count` HSETs of `person2:<n>` with `first_name` = `value`.
async fn one_transaction(client: &mut RedisClient, keys: std::ops::Range<u64>, value: &str) {
    let keys: Vec<String> = keys.map(|n| format!("person2:{n}")).collect();
    let mut commands: Vec<Vec<&str>> = vec![vec!["MULTI"]];
    commands.extend(
        keys.iter()
            .map(|key| vec!["HSET", key.as_str(), "first_name", value, "age", "7"]),
    );
    commands.push(vec!["EXEC"]);
    let slices: Vec<&[&str]> = commands.iter().map(Vec::as_slice).collect();
    client.pipeline(&slices).await.expect("MULTI");
}

/// On a server whose `max_allowed_packet` is 1 MiB, transactions whose rows add up to several
/// times that are written whole, through multi-row INSERTs (400 rows of 4 KB: 1.6 MB) and
/// through the staged load (2,000 rows: 8 MB); a row no packet can carry (2 MB) is
/// dead-lettered with the reason while the rows of its transaction are written. None of it is
/// retried forever (a statement over the limit used to be, as a lost connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_stay_within_the_servers_max_allowed_packet() {
    let mariadb = MariaDbServer::start_with(&["--max-allowed-packet=1M"]);
    let database = Database::maria_on(&mariadb).await;
    database
        .execute("CREATE TABLE person1 (id VARCHAR(64) PRIMARY KEY, first LONGTEXT, last LONGTEXT, age INT)")
        .await;
    database.execute(CAR_TABLE).await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start(&server, &database).await;
    let value = "v".repeat(4_000);
    one_transaction(&mut client, 0..400, &value).await;
    one_transaction(&mut client, 1_000..3_000, &value).await;
    let mut commands: Vec<Vec<String>> = vec![vec!["MULTI".into()]];
    for n in 5_000..5_010u64 {
        commands.push(vec![
            "HSET".into(),
            format!("person2:{n}"),
            "age".into(),
            "1".into(),
        ]);
    }
    commands.push(vec![
        "HSET".into(),
        "person2:huge".into(),
        "first_name".into(),
        "h".repeat(2 << 20),
    ]);
    commands.push(vec!["EXEC".into()]);
    support::send_all(&mut client, &commands).await;
    service.settle(&mut client, &database).await;
    let rows = database.rows("person1", &["first"]).await;
    assert_eq!(rows.len(), 2_410, "every row but the huge one");
    assert!(
        rows.iter()
            .filter(|(id, _)| !id.starts_with('5'))
            .all(|(_, v)| v[0].as_deref() == Some(value.as_str())),
        "values written whole"
    );
    let letters = service.store.dead_letters().expect("dead letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(&letters[0].row_id[..], b"huge");
    assert!(
        letters[0].reason.contains("max_allowed_packet"),
        "{}",
        letters[0].reason
    );
    service.stop().await;
}

/// A batch is bounded by the bytes of its changes, not only by their count (`BATCH_LIMIT`):
/// while the checkpoint table is locked, 48 hashes of 1 MB values are written one by one (48
/// units) and pile up in the log behind the sink's blocked batch; once it is unlocked they
/// reach the table in at least three more transactions, every value whole. A trigger logs, for
/// each row inserted, the checkpoint seq its transaction sees (a batch writes its rows before
/// its checkpoint row: each batch sees the one before it). (By count alone, one batch took them
/// all: 5,000 such changes would have been 5 GB in the sink. `information_schema.innodb_trx`
/// cannot tell the transactions apart: it is a cache refreshed at most every 100 ms.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_large_values_is_bounded_by_their_bytes() {
    use mysql_async::prelude::Queryable;
    let database = Database::maria().await;
    database
        .execute("CREATE TABLE person1 (id VARCHAR(64) PRIMARY KEY, first LONGTEXT, last LONGTEXT, age INT)")
        .await;
    database.execute(CAR_TABLE).await;
    database
        .execute("CREATE TABLE batch_log (n INT AUTO_INCREMENT PRIMARY KEY, before_seq BIGINT)")
        .await;
    database
        .execute("CREATE TRIGGER log_batch AFTER INSERT ON person1 FOR EACH ROW INSERT INTO batch_log (before_seq) SELECT MAX(change_seq) FROM writebehind_checkpoint WHERE backend = 'db'")
        .await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start(&server, &database).await;
    service.settle(&mut client, &database).await;
    let mut lock = mysql_async::Conn::from_url(database.url().as_str())
        .await
        .expect("connect");
    lock.query_drop("LOCK TABLES writebehind_checkpoint WRITE")
        .await
        .expect("lock");
    let rows = 48u64;
    let value = |n: u64| format!("{n}-{}", "v".repeat(1 << 20));
    for n in 0..rows {
        let key = format!("person2:{n}");
        let command = ["HSET", key.as_str(), "first_name", &value(n)];
        client.pipeline(&[&command[..]]).await.expect("HSET");
    }
    // Every write captured while the sink waits for the lock.
    let info = client.info("replication").await.expect("info");
    let target: u64 = writebehind::redis_client::info_field(&info, "master_repl_offset")
        .and_then(|v| v.parse().ok())
        .expect("offset");
    let deadline = Instant::now() + Duration::from_secs(30);
    let captured = || {
        service
            .store
            .checkpoint()
            .expect("checkpoint")
            .position
            .is_some_and(|p| p.offset.0 >= target)
    };
    while !captured() {
        assert!(Instant::now() < deadline, "not captured within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lock.query_drop("UNLOCK TABLES").await.expect("unlock");
    drop(lock);
    service.settle(&mut client, &database).await;
    let written = database.rows("person1", &["first"]).await;
    let mut large = 0;
    for (id, first) in &written {
        let Ok(n) = id.parse::<u64>() else { continue };
        assert!(first[0].as_deref() == Some(value(n).as_str()), "{id}");
        large += 1;
    }
    assert_eq!(large, rows);
    let transactions = counts_by(&database, "before_seq", "batch_log").await;
    let bound = writebehind::sink::runner::BATCH_LIMIT.bytes as u64;
    // The blocked batch, then the rest a bound at a time.
    assert!(
        transactions.len() as u64 > (rows - 1) * (1 << 20) / bound,
        "{} transactions for {rows} MB: {transactions:?}",
        transactions.len()
    );
    service.stop().await;
    database.drop_database().await;
}

/// A batch read while the buffer is still syncing its changes (`buffer/durability.rs`) writes
/// its rows at once, inside its transaction, but commits only once the sync has returned:
/// until then no other session sees its row or its checkpoint, and the sync releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_read_before_the_buffer_synced_it_commits_only_after_the_sync() {
    // InnoDB counts the rows an open transaction modified; `innodb_trx` is a cache refreshed
    // only when last read over 100 ms ago (hence the polling pace below).
    let open = "SELECT COUNT(*) FROM information_schema.innodb_trx t \
        JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id \
        WHERE p.db = DATABASE() AND t.trx_rows_modified > 0";
    committed_only_after_the_sync(Database::maria().await, open).await;
}

/// The same on PostgreSQL, whose batch otherwise goes with its `COMMIT` in one flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_read_before_the_buffer_synced_it_commits_only_after_the_sync_on_postgres() {
    // A session idle in its transaction, holding the lock its insert took on the table.
    let open = "SELECT COUNT(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid \
        JOIN pg_class c ON c.oid = l.relation WHERE a.datname = current_database() \
        AND a.state = 'idle in transaction' AND c.relname = 'gated' \
        AND l.mode = 'RowExclusiveLock'";
    committed_only_after_the_sync(Database::postgres().await, open).await;
}

/// Applies a one-row batch read in a sync window; `open_transactions` counts the sink's open
/// transaction once it has written the row.
async fn committed_only_after_the_sync(database: Database, open_transactions: &str) {
    use writebehind::buffer::{Batch, Change, RowChange, Store};
    use writebehind::position::{ChangeSeq, ReplOffset};
    use writebehind::sink::convert::SqlValue;
    use writebehind::sink::{
        BeforeCommit, CommitGate, Destination, RowOp, RowWrite, Sink, SinkBatch,
    };
    database
        .execute("CREATE TABLE gated (id VARCHAR(64) PRIMARY KEY, first VARCHAR(64))")
        .await;
    let config = writebehind::config::Config::parse(
        &format!(
            "[source]\nurl = \"redis://127.0.0.1:1\"\n[backends.gate]\nurl = \"{}\"\n[[mappings]]\nname = \"Gated\"\nprefix = \"g\"\nbackend = \"gate\"\ntable = \"gated\"\nkey_column = \"id\"\n[mappings.columns]\nfirst = \"first\"\n",
            database.url()
        ),
        &|_| None,
    )
    .expect("config");
    let mappings: Vec<_> = writebehind::capture::mapping::Mappings::new(&config.mappings)
        .iter()
        .cloned()
        .collect();
    let mut sink = Sink::connect("gate", &database.url())
        .await
        .expect("connect");
    assert!(sink.waits_at_commit(), "the writes overlap the sync");
    let schemas = sink.prepare(&mappings).await.expect("prepare");
    let dir = tempfile::tempdir().expect("dir");
    let store = std::sync::Arc::new(Store::open(dir.path()).expect("store"));
    let mut captured = Batch::default();
    captured.put_changes(vec![Change {
        seq: ChangeSeq(1),
        unit: ChangeSeq(1),
        unit_end: true,
        offset: ReplOffset(10),
        mapping: "Gated".into(),
        row_id: "1".into(),
        row: RowChange::Delete,
        op: None,
    }]);
    store
        .write_in_window(captured)
        .expect("written, not synced");
    let batch = SinkBatch {
        writes: vec![RowWrite {
            table: 0,
            seq: ChangeSeq(1),
            row_id: "1".into(),
            delete_first: false,
            op: RowOp::Upsert {
                id: SqlValue::Text("1".into()),
                values: vec![SqlValue::Text("written early".into())],
            },
        }],
        last_seq: ChangeSeq(1),
        offset: ReplOffset(10),
        buffer_id: "gate-test".into(),
        checkpoint_rows: vec!["gate".into()],
        commit_gate: CommitGate::after_sync(&store, ChangeSeq(1)),
        ..SinkBatch::default()
    };
    let applying = tokio::spawn(async move {
        let no_hook: BeforeCommit = std::sync::Arc::new(|_| Ok(()));
        sink.apply(&schemas, &batch, &no_hook).await
    });
    // The row is written inside an open transaction...
    let deadline = Instant::now() + Duration::from_secs(20);
    while database.query_i64(open_transactions).await != [1] {
        if applying.is_finished() {
            panic!("the batch ended before the sync: {:?}", applying.await);
        }
        assert!(
            Instant::now() < deadline,
            "the batch's rows were never written"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // ... which waits: nothing of it is visible, it has not returned.
    assert_eq!(database.query_i64("SELECT COUNT(*) FROM gated").await, [0]);
    assert_eq!(
        database
            .query_i64("SELECT COUNT(*) FROM writebehind_checkpoint")
            .await,
        [0]
    );
    assert!(!applying.is_finished(), "committed before the sync");
    store.sync_window().expect("sync");
    let rejected = applying
        .await
        .expect("task")
        .expect("committed after the sync");
    assert!(rejected.is_empty());
    assert_eq!(
        database.rows("gated", &["first"]).await,
        [("1".to_string(), vec![Some("written early".to_string())])].into()
    );
    database.drop_database().await;
}
