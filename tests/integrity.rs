//! Never silently diverge (docs/design.md section 8.5): states the service cannot vouch for — a
//! lost buffer, a buffer restored from an older copy, a change log trimmed before a backend saw
//! it, mappings changed over an existing buffer — are reconciled, and the tables end equal to
//! Redis. Real `redis-server` and MariaDB; the pipeline runs in-process (`Service`).

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use support::RedisServer;
use writebehind::config::Config;
use writebehind::position::ChangeSeq;
use writebehind::redis_client::RedisClient;
use writebehind::service::{Service, ServiceOptions};

/// A row as (first, age).
type Row = (Option<String>, Option<String>);

struct Fixture {
    _redis: RedisServer,
    redis_url: String,
    client: RedisClient,
    databases: Vec<(String, String, mysql_async::Pool)>,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// Redis (with `extra` arguments) and `count` fresh MariaDB databases.
    async fn new(count: usize) -> Fixture {
        Fixture::with_redis(count, &[]).await
    }

    async fn with_redis(count: usize, extra: &[&str]) -> Fixture {
        let redis = RedisServer::start(extra);
        let client = redis.client().await;
        let mut databases = Vec::new();
        for _ in 0..count {
            let (name, url) = support::create_database(support::SHARED_MARIADB, "wb_int").await;
            let pool = mysql_async::Pool::new(url.as_str());
            databases.push((name, url, pool));
        }
        Fixture {
            redis_url: redis.url(),
            _redis: redis,
            client,
            databases,
            dir: tempfile::tempdir().expect("dir"),
        }
    }

    fn buffer(&self) -> std::path::PathBuf {
        self.dir.path().join("buffer")
    }

    /// A configuration: `mappings` as (name, prefix, backend index, table).
    fn config(&self, mappings: &[(&str, &str, usize, &str)]) -> Config {
        let mut text = format!(
            "[admin]\nlisten = \"\"\n[source]\nurl = \"{}\"\n[buffer]\npath = \"{}\"\n",
            self.redis_url,
            self.buffer().display()
        );
        for (i, (_, url, _)) in self.databases.iter().enumerate() {
            text.push_str(&format!("[backends.db{i}]\nurl = \"{url}\"\n"));
        }
        for (name, prefix, backend, table) in mappings {
            text.push_str(&format!(
                "[[mappings]]\nname = \"{name}\"\nprefix = \"{prefix}\"\nbackend = \"db{backend}\"\ntable = \"{table}\"\nkey_column = \"id\"\ncreate_table = true\n[mappings.columns]\nfirst_name = \"first\"\nage = \"age\"\n"
            ));
        }
        Config::parse(&text, &|_| None).expect("config")
    }

    async fn start(&self, config: &Config) -> Service {
        Service::start(config, ServiceOptions::default())
            .await
            .unwrap_or_else(|e| panic!("the service did not start: {e}"))
    }

    async fn redis(&mut self, args: &[&str]) {
        self.client
            .command(args)
            .await
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }

    /// `HSET <prefix>:<i> first_name <first> age <i>` for each `i`.
    async fn people(&mut self, prefix: &str, ids: std::ops::Range<u32>, first: &str) {
        for i in ids {
            let (key, age) = (format!("{prefix}:{i}"), i.to_string());
            self.redis(&[
                "HSET",
                &key,
                "first_name",
                &format!("{first}{i}"),
                "age",
                &age,
            ])
            .await;
        }
    }

    /// What the rows of `prefix` must be: every hash in Redis, by id.
    async fn expected(&mut self, prefix: &str) -> BTreeMap<String, Row> {
        let keys = match self
            .client
            .command(&["KEYS", &format!("{prefix}:*")])
            .await
            .expect("keys")
        {
            redis_protocol::resp2::types::BytesFrame::Array(keys) => keys,
            other => panic!("KEYS: {other:?}"),
        };
        let mut rows = BTreeMap::new();
        for key in keys.iter().map(writebehind::redis_client::frame_text) {
            let field = |reply| match reply {
                redis_protocol::resp2::types::BytesFrame::BulkString(v) => {
                    Some(String::from_utf8_lossy(&v).into_owned())
                }
                _ => None,
            };
            let first = self.client.command(&["HGET", &key, "first_name"]).await;
            let age = self.client.command(&["HGET", &key, "age"]).await;
            let id = key[prefix.len() + 1..].to_string();
            rows.insert(id, (field(first.expect("hget")), field(age.expect("hget"))));
        }
        rows
    }

    async fn table(&self, backend: usize, table: &str) -> BTreeMap<String, Row> {
        let pool = &self.databases[backend].2;
        let rows: Vec<(String, Option<String>, Option<String>)> = match pool.get_conn().await {
            Ok(mut conn) => conn
                .query(format!("SELECT id, first, age FROM {table}"))
                .await
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        rows.into_iter()
            .map(|(id, first, age)| (id, (first, age)))
            .collect()
    }

    /// Waits until table `table` of backend `backend` equals the hashes of `prefix` in Redis.
    async fn converges(&mut self, backend: usize, table: &str, prefix: &str) {
        let expected = self.expected(prefix).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let rows = self.table(backend, table).await;
            if rows == expected {
                return;
            }
            if Instant::now() > deadline {
                let wrong: Vec<_> = expected
                    .iter()
                    .filter(|(id, row)| rows.get(*id) != Some(row))
                    .take(5)
                    .collect();
                let extra: Vec<_> = rows
                    .keys()
                    .filter(|id| !expected.contains_key(*id))
                    .take(5)
                    .collect();
                panic!(
                    "`{table}` never equalled Redis: {} rows for {} hashes; missing or different {wrong:?}; extra {extra:?}",
                    rows.len(),
                    expected.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn stop(service: Service) {
    service.shutdown();
    service.wait().await.expect("the service stopped cleanly");
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let names: Vec<String> = self.databases.iter().map(|d| d.0.clone()).collect();
        std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let admin =
                    mysql_async::Pool::new(format!("{}/mysql", support::SHARED_MARIADB).as_str());
                if let Ok(mut conn) = admin.get_conn().await {
                    for name in names {
                        conn.query_drop(format!("DROP DATABASE IF EXISTS {name}"))
                            .await
                            .ok();
                    }
                }
                admin.disconnect().await.ok();
            });
        })
        .join()
        .ok();
    }
}

/// The first case: 300 hashes in the table; the buffer is lost while the service is
/// stopped; 100 hashes change and 43 are deleted meanwhile; the service starts on an empty
/// buffer and 20 new hashes arrive. The database's checkpoint belongs to the lost buffer: the
/// table is reconciled and ends equal to Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_buffer_is_reconciled_not_skipped_over() {
    let mut f = Fixture::new(1).await;
    let config = f.config(&[("People", "person", 0, "people")]);
    f.people("person", 0..300, "a").await;
    let service = f.start(&config).await;
    f.converges(0, "people", "person").await;
    stop(service).await;
    std::fs::remove_dir_all(f.buffer()).expect("remove the buffer");
    f.people("person", 0..100, "b").await;
    for i in 100..143 {
        f.redis(&["DEL", &format!("person:{i}")]).await;
    }
    let service = f.start(&config).await;
    f.people("person", 300..320, "c").await;
    f.converges(0, "people", "person").await;
    assert_eq!(f.table(0, "people").await.len(), 277);
    stop(service).await;
}

/// A buffer restored from an older copy: the database has applied changes the buffer numbers
/// differently now (the primary's backlog is too short for the old position, so the restored
/// buffer resynchronises in full). The checkpoint is ahead of the buffer: reconciled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_older_than_the_database_is_reconciled() {
    let mut f = Fixture::with_redis(1, &["--repl-backlog-size", "16kb"]).await;
    let config = f.config(&[("People", "person", 0, "people")]);
    f.people("person", 0..50, "a").await;
    let service = f.start(&config).await;
    f.converges(0, "people", "person").await;
    stop(service).await;
    let copy = f.dir.path().join("buffer-copy");
    copy_dir(&f.buffer(), &copy);
    let service = f.start(&config).await;
    // More than the backlog holds, so the old copy cannot continue where it stopped.
    f.people("person", 25..300, &"b".repeat(200)).await;
    for i in 0..10 {
        f.redis(&["DEL", &format!("person:{i}")]).await;
    }
    f.converges(0, "people", "person").await;
    stop(service).await;
    std::fs::remove_dir_all(f.buffer()).expect("remove");
    copy_dir(&copy, &f.buffer());
    let service = f.start(&config).await;
    f.people("person", 80..90, "c").await;
    f.converges(0, "people", "person").await;
    stop(service).await;
}

/// A mapping moved to a new database after the change log was trimmed past its first changes:
/// the new backend starts with a gap, and is reconciled instead of starting mid-stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_missed_trimmed_changes_is_reconciled() {
    let mut f = Fixture::new(2).await;
    let first = f.config(&[("People", "person", 0, "people")]);
    f.people("person", 0..40, "a").await;
    let service = f.start(&first).await;
    f.converges(0, "people", "person").await;
    // Trimming runs every 5 s behind the backends: keep writing until the first changes are gone.
    let store = service.store().clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 40;
    while store
        .changes(ChangeSeq::NONE, 1)
        .expect("changes")
        .first()
        .is_none_or(|c| c.seq == ChangeSeq::FIRST)
    {
        assert!(
            Instant::now() < deadline,
            "the change log was never trimmed"
        );
        f.people("person", n..n + 1, "a").await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(service).await;
    drop(store);
    let moved = f.config(&[("People", "person", 1, "people")]);
    let service = f.start(&moved).await;
    f.people("person", 1000..1005, "b").await;
    f.converges(1, "people", "person").await;
    assert!(f.table(1, "people").await.len() > 40);
    stop(service).await;
}

/// A mapping added to the configuration over an existing buffer: its hashes were never
/// mirrored. They reach the table whole (every mapped column), not from the next write on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapping_added_over_an_existing_buffer_gets_every_hash_whole() {
    let mut f = Fixture::new(1).await;
    let before = f.config(&[("People", "person", 0, "people")]);
    f.people("person", 0..10, "a").await;
    f.people("car", 0..30, "c").await;
    let service = f.start(&before).await;
    f.converges(0, "people", "person").await;
    stop(service).await;
    let after = f.config(&[
        ("People", "person", 0, "people"),
        ("Cars", "car", 0, "cars"),
    ]);
    let service = f.start(&after).await;
    f.redis(&["HSET", "car:3", "age", "99"]).await;
    f.converges(0, "cars", "car").await;
    f.converges(0, "people", "person").await;
    stop(service).await;
}

/// A checkpoint table written before buffers had identities: the columns are added, and a row
/// that cannot say which buffer it belongs to is reconciled rather than trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_from_before_buffer_identities_is_reconciled() {
    let mut f = Fixture::new(1).await;
    let config = f.config(&[("People", "person", 0, "people")]);
    let mut conn = f.databases[0].2.get_conn().await.expect("conn");
    conn.query_drop(
        "CREATE TABLE writebehind_checkpoint (source VARCHAR(64) NOT NULL, backend VARCHAR(191) NOT NULL, replid CHAR(40), \
         repl_offset BIGINT UNSIGNED, change_seq BIGINT UNSIGNED NOT NULL, updated_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3), \
         PRIMARY KEY (source, backend)) ENGINE=InnoDB",
    )
    .await
    .expect("old checkpoint table");
    conn.query_drop("INSERT INTO writebehind_checkpoint (source, backend, change_seq) VALUES ('writebehind', 'db0', 5000)")
        .await
        .expect("old row");
    conn.query_drop(
        "CREATE TABLE people (id VARCHAR(255) NOT NULL PRIMARY KEY, first TEXT, age TEXT)",
    )
    .await
    .expect("table");
    conn.query_drop("INSERT INTO people VALUES ('gone', 'x', '1')")
        .await
        .expect("stale row");
    drop(conn);
    f.people("person", 0..20, "a").await;
    let service = f.start(&config).await;
    f.converges(0, "people", "person").await;
    stop(service).await;
}

/// Waits until `key`'s row exists in `people`, after a marker write shows everything before it
/// was applied; returns whether `key`'s row is there.
async fn row_after_marker(f: &mut Fixture, id: &str, marker: &str) -> bool {
    f.people("person", 0..0, "").await;
    f.redis(&["HSET", &format!("person:{marker}"), "first_name", "m"])
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f.table(0, "people").await.contains_key(marker) {
        assert!(Instant::now() < deadline, "the marker row never came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f.table(0, "people").await.contains_key(id)
}

/// Expiry or delete is decided on the primary's clock and its count of expired keys, not on
/// this host's clock at replay time: an application's `DEL` replayed from the backlog after the
/// key's TTL has passed deletes the row (`on_expire = "keep"`), and a real expiry while the
/// service was stopped keeps it. (Both in one stop would be ambiguous: counted, kept.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_and_delete_are_told_apart_when_replayed_from_the_backlog() {
    let mut f = Fixture::new(1).await;
    let config = f.config(&[("People", "person", 0, "people")]);
    let service = f.start(&config).await;
    f.people("person", 1..3, "a").await;
    f.redis(&["PEXPIRE", "person:2", "600000"]).await;
    let started = Instant::now();
    // Long enough for the convergence and the stop below on a loaded machine (1.5 s was not,
    // once, in CI: the key expired first and its DEL was rightly an expiry).
    f.redis(&["PEXPIRE", "person:1", "4000"]).await;
    f.converges(0, "people", "person").await;
    stop(service).await;
    // While the service is stopped, the application deletes person:1 before its TTL; the
    // service comes back after the TTL has passed.
    let deleted = f.client.command(&["DEL", "person:1"]).await.expect("DEL");
    assert_eq!(
        deleted,
        redis_protocol::resp2::types::BytesFrame::Integer(1),
        "person:1 expired before the application's DEL: the machine was too slow for this test"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while started.elapsed() < Duration::from_millis(4500) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let service = f.start(&config).await;
    assert!(
        !row_after_marker(&mut f, "1", "m1").await,
        "the application's DEL was taken for an expiry"
    );
    // Now person:2 expires on the primary while the service is stopped.
    f.redis(&["PEXPIRE", "person:2", "1000"]).await;
    row_after_marker(&mut f, "2", "m2").await;
    stop(service).await;
    while f
        .client
        .command(&["EXISTS", "person:2"])
        .await
        .expect("exists")
        != redis_protocol::resp2::types::BytesFrame::Integer(0)
    {
        assert!(Instant::now() < deadline, "person:2 never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let service = f.start(&config).await;
    assert!(
        row_after_marker(&mut f, "2", "m3").await,
        "the expiry deleted the row on_expire = keep keeps"
    );
    stop(service).await;
}

const TYPED_TABLE: &str =
    "CREATE TABLE typed (id VARCHAR(64) PRIMARY KEY, tiny TINYINT, small SMALLINT, \
    price DECIMAL(5,2), day DATE, need VARCHAR(10) NOT NULL, color ENUM('red','blue'), \
    latin VARCHAR(20) CHARACTER SET latin1) ENGINE=InnoDB";

/// Values a strict database refuses, one per row (field, value); `need` absent is NULL for a
/// NOT NULL column.
const REFUSED: &[(&str, &[(&str, &str)])] = &[
    ("tiny", &[("tiny", "300"), ("need", "x")]),
    ("small", &[("small", "70000"), ("need", "x")]),
    ("price", &[("price", "1234.5"), ("need", "x")]),
    // Rounded to the column's scale: a note, not an error, even in a strict session.
    ("rounded", &[("price", "3.256"), ("need", "x")]),
    ("day", &[("day", "2024-13-45"), ("need", "x")]),
    ("need", &[("tiny", "1")]),
    ("color", &[("color", "green"), ("need", "x")]),
    ("latin", &[("latin", "日本語"), ("need", "x")]),
];

fn good_row(key: &str) -> Vec<String> {
    [
        "HSET",
        key,
        "tiny",
        "1",
        "small",
        "2",
        "price",
        "3.25",
        "day",
        "2024-01-02",
        "need",
        "ok",
        "color",
        "red",
        "latin",
        "café",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn refused_row(key: &str, fields: &[(&str, &str)]) -> Vec<String> {
    let mut args = vec!["HSET".to_string(), key.to_string()];
    for (field, value) in fields {
        args.push(field.to_string());
        args.push(value.to_string());
    }
    args
}

/// A big batch is exactly as strict as a small one: the same values are refused (dead-lettered)
/// whether they come one command at a time or in one MULTI of 1,000 HSETs (a unit staged with
/// LOAD DATA), and nothing is clamped, truncated or filled in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_batch_refuses_exactly_what_a_single_row_refuses() {
    let mut f = Fixture::new(1).await;
    let mut conn = f.databases[0].2.get_conn().await.expect("conn");
    conn.query_drop(TYPED_TABLE).await.expect("table");
    drop(conn);
    let text = format!(
        "[admin]\nlisten = \"\"\n[source]\nurl = \"{}\"\n[buffer]\npath = \"{}\"\n[backends.db0]\nurl = \"{}\"\n\
         [[mappings]]\nname = \"Typed\"\nprefix = \"t\"\nbackend = \"db0\"\ntable = \"typed\"\nkey_column = \"id\"\n\
         [mappings.columns]\ntiny = \"tiny\"\nsmall = \"small\"\nprice = \"price\"\nday = \"day\"\nneed = \"need\"\ncolor = \"color\"\nlatin = \"latin\"\n",
        f.redis_url,
        f.buffer().display(),
        f.databases[0].1
    );
    let config = Config::parse(&text, &|_| None).expect("config");
    let service = f.start(&config).await;
    // One command at a time.
    let mut single = vec![good_row("t:single_good")];
    single.extend(
        REFUSED
            .iter()
            .map(|(name, fields)| refused_row(&format!("t:single_{name}"), fields)),
    );
    for command in &single {
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        f.redis(&args).await;
    }
    // One MULTI of 1,000 HSETs.
    let mut multi: Vec<Vec<String>> = (0..1000 - REFUSED.len())
        .map(|i| good_row(&format!("t:multi_good{i}")))
        .collect();
    multi.extend(
        REFUSED
            .iter()
            .map(|(name, fields)| refused_row(&format!("t:multi_{name}"), fields)),
    );
    let mut pipeline: Vec<Vec<&str>> = vec![vec!["MULTI"]];
    pipeline.extend(multi.iter().map(|c| c.iter().map(String::as_str).collect()));
    pipeline.push(vec!["EXEC"]);
    let refs: Vec<&[&str]> = pipeline.iter().map(|c| c.as_slice()).collect();
    let replies = f.client.pipeline(&refs).await.expect("multi");
    assert!(
        matches!(replies.last(), Some(redis_protocol::resp2::types::BytesFrame::Array(r)) if r.len() == 1000),
        "the MULTI ran"
    );
    let store = service.store().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let expected_letters = 2 * REFUSED.len();
    loop {
        let letters = store.dead_letters().expect("letters").len();
        let rows = f.rows_of_typed().await.len();
        if letters >= expected_letters && rows > 1000 - REFUSED.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{letters} dead letters, {rows} rows"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let letters: Vec<String> = store
        .dead_letters()
        .expect("letters")
        .iter()
        .map(|l| String::from_utf8_lossy(&l.row_id).into_owned())
        .collect();
    let rows = f.rows_of_typed().await;
    for (name, _) in REFUSED {
        for way in ["single", "multi"] {
            let id = format!("{way}_{name}");
            assert!(letters.contains(&id), "{id} is dead-lettered: {letters:?}");
            assert!(
                !rows.contains_key(&id),
                "{id} was written: {:?}",
                rows.get(&id)
            );
        }
    }
    let good = "1|2|3.25|2024-01-02|ok|red|café".to_string();
    assert_eq!(rows.get("single_good"), Some(&good));
    assert_eq!(rows.get("multi_good0"), Some(&good));
    assert_eq!(rows.len(), 1000 - REFUSED.len() + 1);
    assert_eq!(letters.len(), expected_letters);
    stop(service).await;
}

/// Staging needs CREATE TEMPORARY TABLES; without it a large batch is written with statements
/// instead of stopping the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_without_the_temporary_table_privilege_uses_statements() {
    let mut f = Fixture::new(1).await;
    let (name, url, pool) = f.databases[0].clone();
    let user = format!("wbtmp{}", rand::random::<u32>());
    let mut conn = pool.get_conn().await.expect("conn");
    for host in ["%", "localhost"] {
        conn.query_drop(format!("CREATE USER '{user}'@'{host}' IDENTIFIED BY 'pw'"))
            .await
            .expect("user");
        conn.query_drop(format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER ON {name}.* TO '{user}'@'{host}'"
        ))
        .await
        .expect("grant");
    }
    drop(conn);
    f.databases[0].1 = url.replacen("root@", &format!("{user}:pw@"), 1);
    let config = f.config(&[("People", "person", 0, "people")]);
    let service = f.start(&config).await;
    let mut pipeline: Vec<Vec<String>> = vec![vec!["MULTI".into()]];
    for i in 0..600 {
        pipeline.push(
            [
                "HSET",
                &format!("person:{i}"),
                "first_name",
                "a",
                "age",
                "1",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        );
    }
    pipeline.push(vec!["EXEC".into()]);
    let words: Vec<Vec<&str>> = pipeline
        .iter()
        .map(|c| c.iter().map(String::as_str).collect())
        .collect();
    let refs: Vec<&[&str]> = words.iter().map(|c| c.as_slice()).collect();
    f.client.pipeline(&refs).await.expect("multi");
    f.converges(0, "people", "person").await;
    stop(service).await;
    let mut conn = pool.get_conn().await.expect("conn");
    for host in ["%", "localhost"] {
        conn.query_drop(format!("DROP USER '{user}'@'{host}'"))
            .await
            .ok();
    }
}

impl Fixture {
    /// The rows of `typed`, every column joined with `|`.
    async fn rows_of_typed(&self) -> BTreeMap<String, String> {
        let mut conn = self.databases[0].2.get_conn().await.expect("conn");
        let rows: Vec<mysql_async::Row> = conn
            .query(
                "SELECT id, CONCAT_WS('|', tiny, small, price, day, need, color, latin) FROM typed",
            )
            .await
            .expect("select");
        rows.into_iter()
            .map(|row| {
                let id: String = row.get(0).expect("id");
                let all: Option<String> = row.get(1).flatten();
                (id, all.unwrap_or_default())
            })
            .collect()
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("file type").is_dir() {
            continue; // the snapshot spool: never part of what a buffer holds
        }
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}
