//! Write-behind to real MariaDB (127.0.0.1:3306, a fresh database per test) and SQLite, fed by a
//! real redis-server: the original recipe's example, step by step.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use support::postgres::PostgresServer;
use support::sink::{
    config_text, row, run, start, start_with, Database, CAR_TABLE, COUNTED_PERSON_TABLE,
    COUNTED_PERSON_TABLE_POSTGRES, PERSON_TABLE,
};
use support::{MariaDbServer, RedisServer};

/// The recipe's example, step by step; after each step the tables hold what they must.
/// `backend_options` go to `[backends.db]`.
async fn recipe_suite(database: Database, backend_options: &str) {
    database.execute(PERSON_TABLE).await;
    database.execute(CAR_TABLE).await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    run(
        &mut client,
        &["HSET", "person2:0", "first_name", "Pre", "age", "1"],
    )
    .await;
    let service = start_with(&server, &database, backend_options).await;
    service.settle(&mut client, &database).await;
    let cols = ["first", "last", "age", "note"];
    let mut expected: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    expected.insert("0".into(), row(&[Some("Pre"), None, Some("1"), None]));
    assert_eq!(
        database.rows("person1", &cols).await,
        expected,
        "initial load"
    );

    run(
        &mut client,
        &[
            "HSET",
            "person2:1",
            "first_name",
            "Ann",
            "last_name",
            "Lee",
            "age",
            "30",
        ],
    )
    .await;
    run(
        &mut client,
        &["HMSET", "person2:2", "first_name", "Bob", "age", "40"],
    )
    .await;
    service.settle(&mut client, &database).await;
    expected.insert(
        "1".into(),
        row(&[Some("Ann"), Some("Lee"), Some("30"), None]),
    );
    expected.insert("2".into(), row(&[Some("Bob"), None, Some("40"), None]));
    assert_eq!(
        database.rows("person1", &cols).await,
        expected,
        "HSET, HMSET (missing field is NULL)"
    );

    // Unmapped columns of existing rows stay as they are.
    database
        .execute("UPDATE person1 SET note = 'kept' WHERE id = '1'")
        .await;
    run(&mut client, &["HINCRBY", "person2:1", "age", "1"]).await;
    run(&mut client, &["HINCRBYFLOAT", "person2:2", "age", "0.5"]).await;
    run(&mut client, &["HSET", "person2:1", "unmapped", "x"]).await;
    service.settle(&mut client, &database).await;
    expected.insert(
        "1".into(),
        row(&[Some("Ann"), Some("Lee"), Some("31"), Some("kept")]),
    );
    expected.insert("2".into(), row(&[Some("Bob"), None, Some("40.5"), None]));
    assert_eq!(
        database.rows("person1", &cols).await,
        expected,
        "HINCRBY, HINCRBYFLOAT, unmapped field"
    );

    run(&mut client, &["HDEL", "person2:1", "last_name"]).await;
    run(&mut client, &["DEL", "person2:2"]).await;
    run(&mut client, &["HSET", "person2:3", "first_name", "Cy"]).await;
    run(&mut client, &["UNLINK", "person2:3"]).await;
    service.settle(&mut client, &database).await;
    expected.insert(
        "1".into(),
        row(&[Some("Ann"), None, Some("31"), Some("kept")]),
    );
    expected.remove("2");
    assert_eq!(
        database.rows("person1", &cols).await,
        expected,
        "HDEL of a field, DEL, UNLINK"
    );

    run(&mut client, &["RENAME", "person2:1", "person2:4"]).await;
    service.settle(&mut client, &database).await;
    expected.remove("1");
    expected.insert("4".into(), row(&[Some("Ann"), None, Some("31"), None]));
    assert_eq!(database.rows("person1", &cols).await, expected, "RENAME");

    // Expiry: person2 keeps rows (default), car deletes them.
    run(&mut client, &["HSET", "car:1", "id", "1", "color", "red"]).await;
    run(&mut client, &["HSET", "person2:5", "first_name", "Eve"]).await;
    service.settle(&mut client, &database).await;
    assert_eq!(database.rows("car", &["color"]).await.len(), 1);
    run(&mut client, &["PEXPIRE", "car:1", "20"]).await;
    run(&mut client, &["PEXPIRE", "person2:5", "20"]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while client
        .command(&["EXISTS", "car:1", "person2:5"])
        .await
        .expect("exists")
        != redis_protocol::resp2::types::BytesFrame::Integer(0)
    {
        assert!(Instant::now() < deadline, "keys did not expire");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    service.settle(&mut client, &database).await;
    expected.insert("5".into(), row(&[Some("Eve"), None, None, None]));
    assert_eq!(
        database.rows("person1", &cols).await,
        expected,
        "on_expire = keep"
    );
    assert!(
        database.rows("car", &["color"]).await.is_empty(),
        "on_expire = delete"
    );

    // A required column's absence dead-letters with its reason; the rest flows on.
    run(&mut client, &["HSET", "car:9", "id", "9"]).await;
    run(&mut client, &["HSET", "car:2", "color", "blue"]).await;
    service.settle(&mut client, &database).await;
    let cars = database.rows("car", &["color"]).await;
    assert_eq!(
        cars,
        BTreeMap::from([("2".to_string(), row(&[Some("blue")]))])
    );
    let letters = service.store.dead_letters().expect("dead letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].row_id.as_ref(), b"9");
    assert!(
        letters[0]
            .reason
            .contains("required column `color` is absent"),
        "{}",
        letters[0].reason
    );

    // A MULTI with several keys is one transaction.
    run(&mut client, &["MULTI"]).await;
    for i in 10..13 {
        run(
            &mut client,
            &["HSET", &format!("person2:{i}"), "first_name", "M"],
        )
        .await;
    }
    run(&mut client, &["EXEC"]).await;
    service.settle(&mut client, &database).await;
    for i in 10..13 {
        expected.insert(i.to_string(), row(&[Some("M"), None, None, None]));
    }
    assert_eq!(database.rows("person1", &cols).await, expected, "MULTI");

    run(&mut client, &["FLUSHDB"]).await;
    service.settle(&mut client, &database).await;
    // Only the row kept on expiry remains: its key was already gone from Redis.
    let kept = BTreeMap::from([("5".to_string(), row(&[Some("Eve"), None, None, None]))]);
    assert_eq!(database.rows("person1", &cols).await, kept, "FLUSHDB");
    assert!(database.rows("car", &["color"]).await.is_empty());
    service.stop().await;
    database.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recipe_example_on_mariadb() {
    recipe_suite(Database::maria().await, "").await;
}

/// The same with rows spread over four connections (src/sink/partition.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recipe_example_on_mariadb_in_four_partitions() {
    recipe_suite(Database::maria().await, "partitions = 4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recipe_example_on_postgres() {
    recipe_suite(Database::postgres().await, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recipe_example_on_postgres_in_four_partitions() {
    recipe_suite(Database::postgres().await, "partitions = 4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recipe_example_on_sqlite() {
    recipe_suite(Database::sqlite(), "").await;
}

#[tokio::test]
async fn check_reports_a_missing_table_and_a_missing_column_on_one_line_each() {
    let server = RedisServer::start(&[]);
    let database = Database::sqlite();
    database
        .execute("CREATE TABLE person1 (id VARCHAR(64) PRIMARY KEY, first TEXT, age TEXT)")
        .await;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("writebehind.toml");
    let text = format!(
        "[admin]\nlisten = \"\"\n[source]\nurl = \"{}\"\n[backends.db]\nurl = \"{}\"\n\
         [[mappings]]\nname = \"PersonWriteBehind\"\nprefix = \"person2\"\nbackend = \"db\"\ntable = \"person1\"\nkey_column = \"id\"\n\
         [mappings.columns]\nfirst_name = \"first\"\nlast_name = \"last\"\nage = \"age\"\n\
         [[mappings]]\nname = \"CarsWriteBehind\"\nprefix = \"car\"\nbackend = \"db\"\ntable = \"car\"\nkey_column = \"id\"\n\
         [mappings.columns]\ncolor = \"color\"\n",
        server.url(),
        database.url()
    );
    std::fs::write(&path, text).expect("config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_writebehind"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    let errors: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 2, "{stdout}");
    assert!(
        errors
            .iter()
            .any(|l| l.contains("table `person1` has no column `last`")),
        "{stdout}"
    );
    assert!(
        errors
            .iter()
            .any(|l| l.contains("table `car` does not exist")),
        "{stdout}"
    );
}

fn writebehind(args: &[&str], config: &std::path::Path) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_writebehind"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_rows_are_dead_lettered_and_retried_after_the_fix() {
    let database = Database::maria().await;
    database
        .execute("CREATE TABLE person1 (id VARCHAR(64) PRIMARY KEY, first VARCHAR(5), last VARCHAR(255) NOT NULL, age INT, note TEXT)")
        .await;
    database.execute(CAR_TABLE).await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start(&server, &database).await;
    run(
        &mut client,
        &[
            "HSET",
            "person2:1",
            "first_name",
            "Ann",
            "last_name",
            "L",
            "age",
            "abc",
        ],
    )
    .await;
    run(
        &mut client,
        &[
            "HSET",
            "person2:2",
            "first_name",
            "Bobbybobby",
            "last_name",
            "L",
            "age",
            "2",
        ],
    )
    .await;
    run(
        &mut client,
        &[
            "HSET",
            "person2:3",
            "first_name",
            "Cy",
            "last_name",
            "L",
            "age",
            "3",
        ],
    )
    .await;
    run(
        &mut client,
        &["HSET", "person2:4", "first_name", "Dee", "age", "4"],
    )
    .await;
    service.settle(&mut client, &database).await;
    let cols = ["first", "last", "age"];
    let rows = database.rows("person1", &cols).await;
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        vec!["3"],
        "only the good row commits: {rows:?}"
    );
    let mut letters: Vec<(String, String)> = service
        .store
        .dead_letters()
        .expect("letters")
        .into_iter()
        .map(|l| (String::from_utf8_lossy(&l.row_id).into_owned(), l.reason))
        .collect();
    letters.sort();
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert!(
        letters[0].1.contains("`abc` is not an integer"),
        "{letters:?}"
    );
    assert!(
        letters[1].1.contains("10 characters, longer than its 5"),
        "{letters:?}"
    );
    assert!(
        letters[2].1.contains("cannot be null") && letters[2].1.contains("1048"),
        "the database's own refusal: {letters:?}"
    );
    let (config, _dir) = service.stop().await;

    let (ok, out) = writebehind(&["dlq", "list"], &config);
    assert!(ok && out.contains("3 dead letters"), "{out}");
    let (ok, out) = writebehind(&["dlq", "retry", "--all"], &config);
    assert!(
        !ok && out.matches("still refused").count() == 3,
        "nothing is fixed yet: {out}"
    );

    // Fix the columns, retry: the rows are written with their current values.
    database.execute("ALTER TABLE person1 MODIFY first VARCHAR(255), MODIFY last VARCHAR(255) NULL, MODIFY age VARCHAR(20)").await;
    run(&mut client, &["HSET", "person2:4", "age", "44"]).await;
    let (ok, out) = writebehind(&["dlq", "retry", "--all"], &config);
    assert!(ok, "{out}");
    let (ok, out) = writebehind(&["dlq", "list"], &config);
    assert!(ok && out.contains("0 dead letters"), "{out}");
    let rows = database.rows("person1", &cols).await;
    assert_eq!(rows["1"], row(&[Some("Ann"), Some("L"), Some("abc")]));
    assert_eq!(rows["2"], row(&[Some("Bobbybobby"), Some("L"), Some("2")]));
    // The mirror was last updated before the service stopped: person2:4 is retried as captured.
    assert_eq!(rows["4"], row(&[Some("Dee"), None, Some("4")]));
    database.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_crashing_during_a_load_loses_and_duplicates_nothing() {
    database_crash_suite("", false).await;
}

/// The same with PostgreSQL stopped at once (`pg_ctl stop -m immediate`) twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopping_during_a_load_loses_and_duplicates_nothing() {
    database_crash_suite("", true).await;
}

/// With four partitions a crash of the database lands between the partitions' commits: each
/// partition resumes from its own checkpoint row, nothing twice, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_crashing_during_a_load_in_four_partitions_loses_and_duplicates_nothing() {
    database_crash_suite("partitions = 4", false).await;
}

/// A private database server that a test crashes: MariaDB or PostgreSQL.
enum Private {
    Maria(MariaDbServer),
    Postgres(PostgresServer),
}

impl Private {
    fn crash_and_restart(&mut self, down_for: Duration) {
        match self {
            Private::Maria(server) => server.crash_and_restart(down_for),
            Private::Postgres(server) => server.crash_and_restart(down_for),
        }
    }
}

async fn database_crash_suite(backend_options: &str, postgres: bool) {
    let (mut private, database) = if postgres {
        let server = PostgresServer::start();
        let database = Database::postgres_on(&server).await;
        database.execute(COUNTED_PERSON_TABLE_POSTGRES).await;
        (Private::Postgres(server), database)
    } else {
        let server = MariaDbServer::start();
        let database = Database::maria_on(&server).await;
        for statement in COUNTED_PERSON_TABLE.split(";\n") {
            database.execute(statement).await;
        }
        (Private::Maria(server), database)
    };
    database.execute(CAR_TABLE).await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start_with(&server, &database, backend_options).await;
    let mut next = 1u64;
    for round in 0..10 {
        let commands: Vec<Vec<String>> = (0..2000)
            .map(|_| {
                let n = next.to_string();
                next += 1;
                vec!["HSET".into(), format!("person2:{n}"), "age".into(), n]
            })
            .collect();
        support::send_all(&mut client, &commands).await;
        // The database dies twice in the middle of the load, for a second each time.
        if round == 3 || round == 6 {
            tokio::task::block_in_place(|| private.crash_and_restart(Duration::from_secs(1)));
        }
    }
    service.settle(&mut client, &database).await;
    let rows = database.rows("person1", &["age"]).await;
    assert_eq!(rows.len() as u64, next - 1, "every change arrived");
    assert!(rows
        .iter()
        .all(|(id, v)| v[0].as_deref() == Some(id.as_str())));
    assert_eq!(database.written_twice().await, 0, "rows written twice");
    service.stop().await;
}

/// A reader polling the table never sees part of a MULTI: each group of keys written in one
/// MULTI is either wholly absent or wholly present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_becomes_visible_at_once() {
    let database = Database::maria().await;
    database.execute(PERSON_TABLE).await;
    database.execute(CAR_TABLE).await;
    multi_visible_at_once(database).await;
}

/// The same on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_becomes_visible_at_once_on_postgres() {
    let database = Database::postgres().await;
    database.execute(PERSON_TABLE).await;
    database.execute(CAR_TABLE).await;
    multi_visible_at_once(database).await;
}

/// Polls `person1`'s groups (`group_counts`) until told to stop; returns the groups seen with
/// another count than `whole` (partly written) and how many polls were made.
async fn poll_group_counts(
    database: &Database,
    whole: i64,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<(Vec<(String, i64)>, u64)>,
) {
    let mut reader = database.reader().await;
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let polling = tokio::spawn(async move {
        let (mut partial, mut reads) = (Vec::new(), 0u64);
        while !*done_rx.borrow_and_update() {
            let counts = reader.group_counts().await;
            reads += 1;
            partial.extend(counts.into_iter().filter(|(_, n)| *n != whole));
        }
        (partial, reads)
    });
    (done_tx, polling)
}

async fn multi_visible_at_once(database: Database) {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start(&server, &database).await;
    service.settle(&mut client, &database).await;
    let groups = 40;
    let (done_tx, reader) = poll_group_counts(&database, 5).await;
    for g in 0..groups {
        client.command(&["MULTI"]).await.expect("multi");
        for i in 0..5 {
            client
                .command(&["HSET", &format!("person2:g{g}-{i}"), "first_name", "M"])
                .await
                .expect("hset");
        }
        client.command(&["EXEC"]).await.expect("exec");
    }
    service.settle(&mut client, &database).await;
    let _ = done_tx.send(true);
    let (partial, reads) = reader.await.expect("reader");
    assert!(reads > 10, "the reader polled only {reads} times");
    assert!(
        partial.is_empty(),
        "partially visible MULTI groups: {partial:?}"
    );
    assert_eq!(database.rows("person1", &["first"]).await.len(), groups * 5);
    service.stop().await;
    database.drop_database().await;
}

/// A MULTI of more changes than a batch holds is written in parts through one transaction
/// (src/sink/long_unit.rs): a reader polling the table sees none of its rows or all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_multi_becomes_visible_at_once() {
    let database = Database::maria().await;
    database.execute(PERSON_TABLE).await;
    database.execute(CAR_TABLE).await;
    long_multi_visible_at_once(database).await;
}

/// The same on PostgreSQL (its parts are staged through `COPY`, each stage emptied first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_multi_becomes_visible_at_once_on_postgres() {
    let database = Database::postgres().await;
    database.execute(PERSON_TABLE).await;
    database.execute(CAR_TABLE).await;
    long_multi_visible_at_once(database).await;
}

async fn long_multi_visible_at_once(database: Database) {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start(&server, &database).await;
    service.settle(&mut client, &database).await;
    // More changes than a batch holds by its bytes alone (each counted at least
    // `DECODED_CHANGE_BYTES`), half again with the rewrites below.
    let batch =
        writebehind::sink::runner::BATCH_LIMIT.bytes / writebehind::buffer::DECODED_CHANGE_BYTES;
    let rows = batch as i64;
    let (done_tx, reader) = poll_group_counts(&database, rows).await;
    let mut commands = vec![vec!["MULTI".to_string()]];
    commands.extend((0..rows).map(|i| {
        vec![
            "HSET".into(),
            format!("person2:g0-{i}"),
            "first_name".into(),
            format!("n{i}"),
        ]
    }));
    // Then half of them again: a row written by an early part and changed by a late one must
    // end as the late one left it (a stage still holding the early part would undo that).
    commands.extend((0..rows / 2).map(|i| {
        vec![
            "HSET".into(),
            format!("person2:g0-{i}"),
            "first_name".into(),
            format!("m{i}"),
        ]
    }));
    commands.push(vec!["EXEC".into()]);
    support::send_all(&mut client, &commands).await;
    service.settle(&mut client, &database).await;
    let _ = done_tx.send(true);
    let (partial, reads) = reader.await.expect("reader");
    assert!(reads > 10, "the reader polled only {reads} times");
    assert!(
        partial.is_empty(),
        "the unit was seen partly written: {:?}",
        &partial[..partial.len().min(5)]
    );
    let written = database.rows("person1", &["first"]).await;
    assert_eq!(written.len() as i64, rows);
    for (id, first) in &written {
        let i: i64 = id.trim_start_matches("g0-").parse().expect("id");
        let expected = if i < rows / 2 {
            format!("m{i}")
        } else {
            format!("n{i}")
        };
        assert_eq!(first, &vec![Some(expected)], "{id}");
    }
    service.stop().await;
    database.drop_database().await;
}

/// `person1` with a `BIT(40)` column for `last`, which the stage's text columns cannot carry
/// every value of.
const BIT_PERSON_TABLE: &str =
    "CREATE TABLE person1 (id VARCHAR(64) PRIMARY KEY, first TEXT, last BIT(40), age VARCHAR(20))";

/// A MariaDB database with `person1` as `person_table` defines it, a primary and the service
/// writing to it, settled.
async fn staged_setup(
    person_table: &str,
) -> (
    Database,
    RedisServer,
    writebehind::redis_client::RedisClient,
    support::sink::Running,
) {
    let database = Database::maria().await;
    database.execute(person_table).await;
    database.execute(CAR_TABLE).await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start(&server, &database).await;
    service.settle(&mut client, &database).await;
    (database, server, client, service)
}

/// `person1`'s rows: id and `last`, as bytes.
async fn ids_and_last(database: &Database) -> BTreeMap<String, Vec<u8>> {
    let Database::Maria { pool, .. } = database else {
        unreachable!()
    };
    let rows: Vec<(String, Vec<u8>)> = pool
        .get_conn()
        .await
        .expect("conn")
        .query("SELECT id, last FROM person1")
        .await
        .expect("select");
    rows.into_iter().collect()
}

/// A large batch goes through LOAD DATA LOCAL INFILE (staged): values with tabs, newlines,
/// backslashes, NUL bytes, non-ASCII text, empty strings and absent fields arrive intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_is_staged_and_every_value_survives() {
    let (database, _server, mut client, service) = staged_setup("CREATE TABLE person1 (id VARCHAR(64) PRIMARY KEY, first TEXT, last VARBINARY(64), age VARCHAR(20), note TEXT)").await;
    let loads = |pool: mysql_async::Pool| async move {
        let status: Option<(String, u64)> = pool
            .get_conn()
            .await
            .expect("conn")
            .query_first("SHOW GLOBAL STATUS LIKE 'Com_load'")
            .await
            .expect("status");
        status.map(|(_, n)| n).unwrap_or(0)
    };
    let Database::Maria { pool, .. } = &database else {
        unreachable!()
    };
    let loads_before = loads(pool.clone()).await;
    let tricky = [
        "a\tb",
        "line\nbreak\r\n",
        "back\\slash\\N",
        "nul\0byte",
        "ünïcödé ✓",
        "",
        "\\",
    ];
    // One MULTI is one unit, so all 700 rows land in one batch.
    client.command(&["MULTI"]).await.expect("multi");
    for i in 0..700 {
        let first = tricky[i % tricky.len()];
        let key = format!("person2:{i}");
        if i % 10 == 0 {
            client
                .command(&["HSET", &key, "first_name", first])
                .await
                .expect("hset");
        } else {
            client
                .command(&[
                    &b"HSET"[..],
                    key.as_bytes(),
                    b"first_name",
                    first.as_bytes(),
                    b"last_name",
                    &[0xff, 0x00, b'\t', b'\n', b'\\'],
                    b"age",
                    i.to_string().as_bytes(),
                ])
                .await
                .expect("hset");
        }
    }
    client.command(&["EXEC"]).await.expect("exec");
    service.settle(&mut client, &database).await;
    assert!(
        loads(pool.clone()).await > loads_before,
        "the batch did not go through LOAD DATA"
    );
    type Row = (String, Option<String>, Option<Vec<u8>>, Option<String>);
    let rows: Vec<Row> = pool
        .get_conn()
        .await
        .expect("conn")
        .query("SELECT id, first, last, age FROM person1")
        .await
        .expect("select");
    assert_eq!(rows.len(), 700);
    for (id, first, last, age) in rows {
        let i: usize = id.parse().expect("id");
        assert_eq!(first.as_deref(), Some(tricky[i % tricky.len()]), "row {i}");
        if i % 10 == 0 {
            assert_eq!((last, age), (None, None), "row {i}: absent fields are NULL");
        } else {
            assert_eq!(
                last.as_deref(),
                Some(&[0xff, 0x00, b'\t', b'\n', b'\\'][..]),
                "row {i}"
            );
            assert_eq!(age, Some(i.to_string()));
        }
    }
    service.stop().await;
    database.drop_database().await;
}

/// The stage's own warnings are a refusal, as the merge's are: a value the stage cannot hold
/// as it is (bytes that are not UTF-8, bound for a `BIT` column, which the stage's text column
/// loads as `?`) sends the batch row by row, where the value is written exactly; loaded and
/// merged as it was, the row would hold `0x3F..` instead. The stage is loaded, merged and
/// emptied in one query (statements.rs), so this also checks that each statement's warnings
/// are read as its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_the_stage_would_alter_is_written_exactly() {
    let (database, _server, mut client, service) = staged_setup(BIT_PERSON_TABLE).await;
    let not_utf8 = [0xff, 0xfe, 0x00, 0x01, 0x80];
    // Twice: in the second batch the session's stage exists and was emptied by the first.
    for round in 0..2 {
        client.command(&["MULTI"]).await.expect("multi");
        for i in 0..600 {
            let key = format!("person2:{round}_{i}");
            let last: &[u8] = if i == 300 { &not_utf8 } else { b"abcde" };
            client
                .command(&[
                    &b"HSET"[..],
                    key.as_bytes(),
                    b"first_name",
                    b"x",
                    b"last_name",
                    last,
                ])
                .await
                .expect("hset");
        }
        client.command(&["EXEC"]).await.expect("exec");
    }
    service.settle(&mut client, &database).await;
    let rows = ids_and_last(&database).await;
    assert_eq!(rows.len(), 1200);
    for (id, last) in rows {
        let expected: &[u8] = if id.ends_with("_300") {
            &not_utf8
        } else {
            b"abcde"
        };
        assert_eq!(last, expected, "row {id}");
    }
    service.stop().await;
    database.drop_database().await;
}

/// A stage a failed merge left full is emptied before the session loads it again: a batch
/// whose merge is refused (a value too long for its `BIT` column) is redone row by row on the
/// same session, leaving its rows in the stage; a later row change, a fix of the column (after
/// which the refused value would fit) and another staged batch must not merge the old rows
/// again (which would put back the older value and write the dead-lettered row behind the
/// user's back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_left_full_by_a_refused_merge_is_emptied_before_it_is_used_again() {
    let (database, _server, mut client, service) = staged_setup(BIT_PERSON_TABLE).await;
    let staged_batch = |prefix: &'static str, refused: Option<usize>| {
        let mut commands = vec![vec!["MULTI".to_string()]];
        for i in 0..600 {
            let last = if Some(i) == refused {
                "abcdefg"
            } else {
                "abcde"
            };
            commands.push(
                [
                    "HSET",
                    &format!("person2:{prefix}{i}"),
                    "first_name",
                    "x",
                    "last_name",
                    last,
                ]
                .map(String::from)
                .to_vec(),
            );
        }
        commands.push(vec!["EXEC".to_string()]);
        commands
    };
    support::send_all(&mut client, &staged_batch("a", Some(300))).await;
    service.settle(&mut client, &database).await;
    assert_eq!(
        ids_and_last(&database).await.len(),
        599,
        "the refused row is not written"
    );
    client
        .command(&["HSET", "person2:a0", "last_name", "zzzzz"])
        .await
        .expect("hset");
    service.settle(&mut client, &database).await;
    database
        .execute("ALTER TABLE person1 MODIFY last BIT(64)")
        .await;
    support::send_all(&mut client, &staged_batch("b", None)).await;
    service.settle(&mut client, &database).await;
    let rows = ids_and_last(&database).await;
    assert_eq!(rows.len(), 1199, "the dead-lettered row stays out");
    assert!(!rows.contains_key("a300"));
    for (id, last) in rows {
        // BIT(64) returns 8 bytes, zero-padded on the left.
        let expected: &[u8] = if id == "a0" { b"zzzzz" } else { b"abcde" };
        assert_eq!(&last[3..], expected, "row {id}");
    }
    service.stop().await;
    database.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_missing_database_grants() {
    let database = Database::maria().await;
    database.execute(PERSON_TABLE).await;
    database.execute(CAR_TABLE).await;
    let Database::Maria { name, .. } = &database else {
        unreachable!()
    };
    let user = format!("wbro{}", rand::random::<u32>());
    database
        .execute(&format!("CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'"))
        .await;
    database
        .execute(&format!(
            "CREATE USER '{user}'@'localhost' IDENTIFIED BY 'pw'"
        ))
        .await;
    for host in ["%", "localhost"] {
        database
            .execute(&format!(
                "GRANT SELECT, CREATE ON {name}.* TO '{user}'@'{host}'"
            ))
            .await;
    }
    let server = RedisServer::start(&[]);
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("check.toml");
    std::fs::write(
        &path,
        config_text(&server, &format!("mysql://{user}:pw@127.0.0.1:3306/{name}")),
    )
    .expect("config");
    let (ok, out) = writebehind(&["check"], &path);
    assert!(!ok, "{out}");
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("error: ")).collect();
    assert!(
        errors
            .iter()
            .any(|l| l.contains("may not SELECT and INSERT on `person1`")),
        "{out}"
    );
    assert!(
        errors.iter().any(|l| l.contains("may not UPDATE on `car`")),
        "{out}"
    );
    assert!(
        errors.iter().any(|l| l.contains("may not DELETE on `car`")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("note: ") && l.contains("may not CREATE TEMPORARY TABLES")),
        "large batches without staging are noted: {out}"
    );
    database.execute(&format!("DROP USER '{user}'@'%'")).await;
    database
        .execute(&format!("DROP USER '{user}'@'localhost'"))
        .await;
    database.drop_database().await;
}
