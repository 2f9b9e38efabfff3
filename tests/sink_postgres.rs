//! PostgreSQL-specific sink behaviour against the machine's PostgreSQL (a fresh database per
//! test): values the server or the conversion refuses are dead-lettered alike in a single-row
//! batch and in a 1,000-row batch, and a value is never rounded or truncated to fit its column.

mod support;

use support::sink::{config_text, run, start, Database};
use support::RedisServer;

/// The recipe's tables, typed: an integer key, `first` `varchar(5) NOT NULL`, `last`
/// `numeric(6,2)`, `age` `smallint`; `car.color` a `uuid`.
const TYPED_TABLES: &str = "CREATE TABLE person1 (id INTEGER PRIMARY KEY, first VARCHAR(5) NOT NULL, last NUMERIC(6,2), age SMALLINT);
    CREATE TABLE car (id TEXT PRIMARY KEY, color UUID)";

/// Each poison value, alone in its batch and then with 1,000 good rows in one transaction:
/// dead-lettered with its reason, never written altered, while the good rows are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_values_are_refused_alike_in_small_and_large_batches() {
    let database = Database::postgres().await;
    database.execute(TYPED_TABLES).await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start(&server, &database).await;
    // (key, fields, what the reason says)
    let poison: [(&str, [&str; 4], &str); 7] = [
        (
            "person2:101",
            ["first_name", "a", "age", "forty"],
            "is not an integer",
        ),
        (
            "person2:102",
            ["first_name", "a", "age", "70000"],
            "out of range",
        ),
        (
            "person2:103",
            ["first_name", "toolong", "age", "1"],
            "longer than its 5",
        ),
        (
            "person2:104",
            ["first_name", "a", "last_name", "1.234"],
            "more than its scale 2",
        ),
        ("person2:105", ["age", "1", "age", "1"], "not-null"),
        (
            "person2:106",
            ["first_name", "a", "last_name", "123456.5"],
            "numeric field overflow",
        ),
        (
            "car:c1",
            ["color", "not-a-uuid", "color", "not-a-uuid"],
            "uuid",
        ),
    ];
    for (round, (key, fields, _)) in poison.iter().enumerate() {
        let mut alone = vec!["HSET", key];
        alone.extend(fields);
        run(&mut client, &alone).await;
        service.settle(&mut client, &database).await;
        let mut commands: Vec<Vec<String>> = vec![vec!["MULTI".into()]];
        for n in 0..1_000 {
            commands.push(
                ["HSET", &format!("person2:{}", 10_000 + round * 1_000 + n)]
                    .into_iter()
                    .chain(["first_name", "ok", "age", &(n % 100).to_string()])
                    .map(String::from)
                    .collect(),
            );
        }
        let big_key = match key.strip_prefix("car:") {
            Some(id) => format!("car:{id}big"),
            None => format!("person2:{}", 900 + round),
        };
        commands.push(
            ["HSET", big_key.as_str()]
                .into_iter()
                .chain(fields.iter().copied())
                .map(String::from)
                .collect(),
        );
        commands.push(vec!["EXEC".into()]);
        support::send_all(&mut client, &commands).await;
        service.settle(&mut client, &database).await;
    }
    let letters = service.store.dead_letters().expect("dead letters");
    for (key, _, reason) in poison {
        let found = letters.iter().filter(|l| l.reason.contains(reason)).count();
        assert_eq!(
            found, 2,
            "{key}: `{reason}` in a small and a large batch: {letters:#?}"
        );
    }
    assert_eq!(letters.len(), 14, "{letters:#?}");
    let people = database.rows("person1", &["first", "last"]).await;
    assert_eq!(
        people.len(),
        7_000,
        "the good rows, none of the poison ones"
    );
    assert!(people
        .values()
        .all(|v| v[0].as_deref() == Some("ok") && v[1].is_none()));
    assert!(database.rows("car", &["color"]).await.is_empty());

    // The column widened, the too-long names are retried and written; the others stay.
    let (config, _dir) = service.stop().await;
    database
        .execute("ALTER TABLE person1 ALTER COLUMN first TYPE VARCHAR(10)")
        .await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_writebehind"))
        .args(["dlq", "retry", "--all", "--config"])
        .arg(&config)
        .output()
        .expect("dlq retry");
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(out.matches(" applied").count(), 2, "{out}");
    assert_eq!(out.matches("still refused").count(), 12, "{out}");
    let people = database.rows("person1", &["first"]).await;
    for id in ["103", "902"] {
        assert_eq!(people[id][0].as_deref(), Some("toolong"), "{id}");
    }
    database.drop_database().await;
}

/// A reader polling the table never sees part of a MULTI: each group of keys written in one
/// MULTI is either wholly absent or wholly present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_becomes_visible_at_once_on_postgres() {
    let database = Database::postgres().await;
    database
        .execute("CREATE TABLE person1 (id TEXT PRIMARY KEY, first TEXT, last TEXT, age TEXT); CREATE TABLE car (id TEXT PRIMARY KEY, color TEXT)")
        .await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start(&server, &database).await;
    service.settle(&mut client, &database).await;
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let groups = 40;
    let url = database.url();
    let reader = tokio::spawn(async move {
        let (reader, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("reader");
        tokio::spawn(connection);
        let (mut partial, mut reads) = (Vec::new(), 0u64);
        while !*done_rx.borrow_and_update() {
            let rows = reader
                .query("SELECT split_part(id, '-', 1), COUNT(*) FROM person1 WHERE id LIKE 'g%' GROUP BY 1", &[])
                .await
                .expect("poll");
            reads += 1;
            partial.extend(
                rows.iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
                    .filter(|(_, n)| *n != 5),
            );
        }
        (partial, reads)
    });
    for g in 0..groups {
        client.command(&["MULTI"]).await.expect("multi");
        for i in 0..5 {
            let key = format!("person2:g{g}-{i}");
            client
                .command(&["HSET", &key, "first_name", "M"])
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

/// `writebehind check`: a user without INSERT, UPDATE and DELETE on the tables is told so, one
/// line each; a database without the TEMP privilege is noted (large batches without COPY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_missing_postgres_grants() {
    let database = Database::postgres().await;
    database
        .execute("CREATE TABLE person1 (id TEXT PRIMARY KEY, first TEXT, last TEXT, age TEXT); CREATE TABLE car (id TEXT PRIMARY KEY, color TEXT)")
        .await;
    let (name, url) = match &database {
        Database::Postgres { name, url } => (name.clone(), url.clone()),
        _ => unreachable!(),
    };
    let user = format!("wbro{}", rand::random::<u32>());
    database
        .execute(&format!(
            "CREATE ROLE {user} LOGIN; GRANT SELECT ON person1, car TO {user}; GRANT CREATE ON SCHEMA public TO {user}; REVOKE TEMP ON DATABASE {name} FROM PUBLIC"
        ))
        .await;
    let server = RedisServer::start(&[]);
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("check.toml");
    let restricted = url.replacen("postgres://postgres@", &format!("postgres://{user}@"), 1);
    std::fs::write(&path, config_text(&server, &restricted)).expect("config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_writebehind"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("check");
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(!output.status.success(), "{out}");
    for (privilege, table) in [("INSERT", "person1"), ("UPDATE", "car"), ("DELETE", "car")] {
        assert!(
            out.lines().any(|l| l.starts_with("error: ")
                && l.contains(&format!("may not {privilege} on `{table}`"))),
            "{privilege} on {table}: {out}"
        );
    }
    assert!(!out.contains("may not SELECT"), "SELECT is granted: {out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("note: ") && l.contains("temporary tables (TEMP)")),
        "large batches without COPY are noted: {out}"
    );
    database.drop_database().await;
    Database::postgres()
        .await
        .execute(&format!("DROP ROLE IF EXISTS {user}"))
        .await;
}

/// Values that need escaping in COPY's text format, by row number.
const TRICKY: [&str; 6] = [
    "a\tb",
    "line\nbreak\r\n",
    "back\\slash\\N",
    "ünïcödé ✓",
    "",
    "\\",
];

/// `HSET person2:<i> first_name <TRICKY[i]> last_name <bytes> age <i>`.
async fn hset_tricky(client: &mut writebehind::redis_client::RedisClient, i: usize) {
    let (key, age) = (format!("person2:{i}"), i.to_string());
    client
        .command(&[
            &b"HSET"[..],
            key.as_bytes(),
            b"first_name",
            TRICKY[i % TRICKY.len()].as_bytes(),
            b"last_name",
            &[0xff, 0x00, b'\t', b'\n', b'\\'],
            b"age",
            age.as_bytes(),
        ])
        .await
        .expect("hset");
}

/// Text with tabs, line breaks and backslashes, and bytes into a `bytea` column, arrive intact
/// through a statement of column arrays (700 rows in one batch), through COPY (5,000) and one
/// row at a time; a NUL, which PostgreSQL text cannot hold, is refused on every path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_value_survives_copy_and_statements_alike() {
    let database = Database::postgres().await;
    database
        .execute("CREATE TABLE person1 (id INTEGER PRIMARY KEY, first TEXT, last BYTEA, age TEXT); CREATE TABLE car (id TEXT PRIMARY KEY, color TEXT)")
        .await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start(&server, &database).await;
    let stages = || {
        database.query_i64("SELECT COUNT(*) FROM pg_class WHERE relname LIKE 'writebehind_stage_%'")
    };
    // 700 rows in one statement of column arrays, then 5,000 through COPY.
    for (ids, copied) in [(0..700, 0), (10_000..15_000, 1)] {
        client.command(&["MULTI"]).await.expect("multi");
        for i in ids {
            hset_tricky(&mut client, i).await;
        }
        client.command(&["EXEC"]).await.expect("exec");
        service.settle(&mut client, &database).await;
        assert_eq!(stages().await, vec![copied], "COPY's stage");
    }
    for i in 1_000..1_006 {
        hset_tricky(&mut client, i).await;
        service.settle(&mut client, &database).await;
    }
    // A NUL alone, and among 5,000 rows (COPY, then the replay row by row).
    let nul = |key: &'static str| ["HSET", key, "first_name", "nul\0byte"];
    run(&mut client, &nul("person2:5001")).await;
    client.command(&["MULTI"]).await.expect("multi");
    for i in 20_000..25_000 {
        let key = format!("person2:{i}");
        run(&mut client, &["HSET", &key, "age", &i.to_string()]).await;
    }
    run(&mut client, &nul("person2:5000")).await;
    client.command(&["EXEC"]).await.expect("exec");
    service.settle(&mut client, &database).await;
    let all = database.rows("person1", &["first", "age"]).await;
    assert_eq!(all.len(), 10_706, "every row but the two with a NUL");
    let tricky_rows = |id: &String| id.parse::<usize>().is_ok_and(|i| i < 20_000);
    for (id, values) in all.iter().filter(|(id, _)| tricky_rows(id)) {
        let i: usize = id.parse().expect("id");
        assert_eq!(
            values[0].as_deref(),
            Some(TRICKY[i % TRICKY.len()]),
            "row {i}"
        );
        assert_eq!(values[1], Some(i.to_string()), "row {i}");
    }
    let hex = database.rows("person1", &["encode(last, 'hex')"]).await;
    assert!(
        hex.iter()
            .filter(|(id, _)| tricky_rows(id))
            .all(|(_, v)| v[0].as_deref() == Some("ff00090a5c")),
        "{hex:?}"
    );
    let letters = service.store.dead_letters().expect("dead letters");
    assert_eq!(letters.len(), 2, "{letters:#?}");
    assert!(
        letters.iter().all(|l| l.reason.contains("0x00")),
        "{letters:#?}"
    );
    service.stop().await;
    database.drop_database().await;
}
