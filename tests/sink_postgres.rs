//! PostgreSQL-specific sink behaviour against the machine's PostgreSQL (a fresh database per
//! test): values the server or the conversion refuses are dead-lettered alike in a single-row
//! batch and in batches of 1,000 and 2,500 rows (column arrays, and COPY), and a value is never
//! rounded or truncated to fit its column.

mod support;

use support::sink::{config_text, run, start, Database};
use support::RedisServer;

/// The recipe's tables, typed: an integer key, `first` `varchar(5) NOT NULL`, `last`
/// `numeric(6,2)`, `age` `smallint`; `car.color` a `uuid`.
const TYPED_TABLES: &str = "CREATE TABLE person1 (id INTEGER PRIMARY KEY, first VARCHAR(5) NOT NULL, last NUMERIC(6,2), age SMALLINT);
    CREATE TABLE car (id TEXT PRIMARY KEY, color UUID)";

/// Each poison value, alone in its batch and then with 1,000 and with 2,500 good rows in one
/// transaction (column arrays, then COPY straight into the table):
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
        // New rows: 1,000 go as column arrays, 2,500 are copied straight into the table.
        for (size, base, big) in [(1_000, 10_000, 900), (2_500, 20_000, 950)] {
            let mut commands: Vec<Vec<String>> = vec![vec!["MULTI".into()]];
            for n in 0..size {
                commands.push(
                    ["HSET", &format!("person2:{}", base + round * size + n)]
                        .into_iter()
                        .chain(["first_name", "ok", "age", &(n % 100).to_string()])
                        .map(String::from)
                        .collect(),
                );
            }
            let big_key = match key.strip_prefix("car:") {
                Some(id) => format!("car:{id}big{size}"),
                None => format!("person2:{}", big + round),
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
    }
    let letters = service.store.dead_letters().expect("dead letters");
    for (key, _, reason) in poison {
        let found = letters.iter().filter(|l| l.reason.contains(reason)).count();
        assert_eq!(
            found, 3,
            "{key}: `{reason}` alone, in 1,000 and in 2,500 rows: {letters:#?}"
        );
    }
    assert_eq!(letters.len(), 21, "{letters:#?}");
    let people = database.rows("person1", &["first", "last"]).await;
    assert_eq!(
        people.len(),
        24_500,
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
    assert_eq!(out.matches(" applied").count(), 3, "{out}");
    assert_eq!(out.matches("still refused").count(), 18, "{out}");
    let people = database.rows("person1", &["first"]).await;
    for id in ["103", "902", "952"] {
        assert_eq!(people[id][0].as_deref(), Some("toolong"), "{id}");
    }
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
    // A connection for dropping the role, in a scratch database of its own, dropped too.
    let admin = Database::postgres().await;
    admin.execute(&format!("DROP ROLE IF EXISTS {user}")).await;
    admin.drop_database().await;
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

/// One transaction of `hset_tricky` for `ids`, or of a plain `HSET person2:<i> age 0`.
async fn multi_exec(
    client: &mut writebehind::redis_client::RedisClient,
    ids: std::ops::Range<usize>,
    plain: bool,
) {
    client.command(&["MULTI"]).await.expect("multi");
    for i in ids {
        match plain {
            true => run(client, &["HSET", &format!("person2:{i}"), "age", "0"]).await,
            false => hset_tricky(client, i).await,
        }
    }
    client.command(&["EXEC"]).await.expect("exec");
}

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
/// on every write path: new rows through a statement of column arrays (700 in one batch) and
/// through COPY straight into the table (5,000), existing rows through COPY into a stage and a
/// merge (5,000), and one row at a time; a NUL, which PostgreSQL text cannot hold, is refused
/// on every path. A statement trigger logs which path each batch took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_value_survives_copy_and_statements_alike() {
    let database = Database::postgres().await;
    database
        .execute(
            "CREATE TABLE person1 (id INTEGER PRIMARY KEY, first TEXT, last BYTEA, age TEXT); CREATE TABLE car (id TEXT PRIMARY KEY, color TEXT); \
             CREATE TABLE statements (id SERIAL PRIMARY KEY, query TEXT); \
             CREATE FUNCTION log_statement() RETURNS trigger AS $$ BEGIN INSERT INTO statements (query) VALUES (current_query()); RETURN NULL; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER log_statement AFTER INSERT ON person1 FOR EACH STATEMENT EXECUTE FUNCTION log_statement()",
        )
        .await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start(&server, &database).await;
    // How many committed statements inserted into person1 by each path.
    let paths = || async {
        let mut counts = Vec::new();
        for pattern in [
            "%unnest(%",
            "COPY \"person1\"%",
            "%FROM writebehind_stage_%",
        ] {
            let sql = format!("SELECT COUNT(*) FROM statements WHERE query LIKE '{pattern}'");
            counts.extend(database.query_i64(&sql).await);
        }
        counts
    };
    // New rows: 700 in one statement of column arrays, then 5,000 copied into the table.
    // Then 5,000 rows written plainly (copied) and again tricky: a key exists, so staged.
    for (ids, plain, expected) in [
        (0..700, false, [1, 0, 0]),
        (10_000..15_000, false, [1, 1, 0]),
        (30_000..35_000, true, [1, 2, 0]),
        (30_000..35_000, false, [1, 2, 1]),
    ] {
        multi_exec(&mut client, ids, plain).await;
        service.settle(&mut client, &database).await;
        assert_eq!(paths().await, expected, "unnest, COPY, staged merge");
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
    assert_eq!(all.len(), 15_706, "every row but the two with a NUL");
    let tricky_rows = |id: &String| {
        id.parse::<usize>()
            .is_ok_and(|i| !(20_000..30_000).contains(&i))
    };
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

/// A table under row-level security, written by a role the policy applies to: PostgreSQL
/// refuses `COPY FROM` there, so its new rows go as statements at every size (here 2,500 in one
/// batch, where a table without it takes `COPY`), and every row arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_rows_under_row_level_security_go_as_statements() {
    let database = Database::postgres().await;
    let role = format!("wbro_rls_{}", rand::random::<u32>());
    database
        .execute(&format!(
            "CREATE TABLE person1 (id INTEGER PRIMARY KEY, first TEXT, last TEXT, age TEXT); CREATE TABLE car (id TEXT PRIMARY KEY, color TEXT); \
             CREATE ROLE {role} LOGIN; GRANT CREATE ON SCHEMA public TO {role}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON person1, car TO {role}; \
             ALTER TABLE person1 ENABLE ROW LEVEL SECURITY; \
             CREATE POLICY everyone ON person1 USING (true) WITH CHECK (true)"
        ))
        .await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let url = database.url().replacen("postgres@", &format!("{role}@"), 1);
    let service = support::sink::start_with_url(&server, &url, "").await;
    client.command(&["MULTI"]).await.expect("multi");
    for i in 0..2_500 {
        run(&mut client, &["HSET", &format!("person2:{i}"), "age", "1"]).await;
    }
    client.command(&["EXEC"]).await.expect("exec");
    service.settle(&mut client, &database).await;
    assert_eq!(database.rows("person1", &["age"]).await.len(), 2_500);
    assert!(service.store.dead_letters().expect("letters").is_empty());
    service.stop().await;
    // The role's grants go with the database; then the role.
    database.drop_database().await;
    let admin = Database::postgres().await;
    admin.execute(&format!("DROP ROLE {role}")).await;
    admin.drop_database().await;
}
