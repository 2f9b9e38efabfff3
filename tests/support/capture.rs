//! Helpers of the capture tests (tests/capture.rs, tests/capture_restarts.rs): capture in this
//! process or the service as a process, the configuration they use, and the views compared in
//! the assertions (Redis's hashes, the mirror, the change log replayed, the rows expected).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mysql_async::prelude::Queryable;
use redis_protocol::resp2::types::BytesFrame;
use writebehind::buffer::{MirrorCursor, MirrorKind, Name, RowChange, Store};
use writebehind::capture::mapping::Mappings;
use writebehind::capture::{Capture, CaptureOutputs, CaptureSettings};
use writebehind::config::Config;
use writebehind::position::ChangeSeq;
use writebehind::redis_client::{frame_text, info_field, RedisClient};
use writebehind::replication::{Replicator, ReplicatorOptions};

use super::RedisServer;

/// The test configuration; the service writes to a SQLite file next to its buffer, creating the
/// tables.
pub fn config_text(url: &str, buffer: &str, on_expire: &str) -> String {
    config_text_for(url, buffer, on_expire, &format!("sqlite://{buffer}.db"))
}

pub fn config_text_for(url: &str, buffer: &str, on_expire: &str, database: &str) -> String {
    format!(
        r#"
[admin]
listen = ""
[source]
url = "{url}"
[buffer]
path = "{buffer}"
[backends.db]
url = "{database}"
[[mappings]]
name = "People"
prefix = "person2"
backend = "db"
table = "person1"
key_column = "id"
create_table = true
on_expire = "{on_expire}"
[mappings.columns]
first_name = "first"
last_name = "last"
age = "age"
seq = "seq"
[[mappings]]
name = "Cars"
prefix = "car"
db = 1
backend = "db"
table = "car"
key_column = "id"
create_table = true
on_expire = "{on_expire}"
[mappings.columns]
color = "color"
"#
    )
}

pub fn mappings(server: &RedisServer, on_expire: &str) -> Mappings {
    let config =
        Config::parse(&config_text(&server.url(), "unused", on_expire), &|_| None).expect("config");
    Mappings::new(&config.mappings)
}

/// Capture running in a task of this process.
pub struct Running {
    task: tokio::task::JoinHandle<Capture>,
    stop: tokio::sync::oneshot::Sender<()>,
}

pub fn start_capture(server: &RedisServer, store: Arc<Store>, mappings: Mappings) -> Running {
    start_capture_as(
        server.endpoint(),
        store,
        mappings,
        CaptureOutputs::default(),
    )
}

/// Capture whose link never spools the command stream (`[replication] stream_spool_mb = 0`):
/// what it has not read stays with the primary. For the tests that cut the link inside a
/// transaction whose `EXEC` must not have arrived yet: a spool would have received it whole.
pub fn start_capture_unspooled(
    server: &RedisServer,
    store: Arc<Store>,
    mappings: Mappings,
) -> Running {
    start_capture_configured(
        server.endpoint(),
        store,
        mappings,
        CaptureOutputs::default(),
        |options| options.stream_spool_bytes = 0,
    )
}

/// Capture connecting as `endpoint` says (a user, a password), reporting to `outputs`.
pub fn start_capture_as(
    endpoint: writebehind::config::RedisEndpoint,
    store: Arc<Store>,
    mappings: Mappings,
    outputs: CaptureOutputs,
) -> Running {
    start_capture_configured(endpoint, store, mappings, outputs, |_| {})
}

fn start_capture_configured(
    endpoint: writebehind::config::RedisEndpoint,
    store: Arc<Store>,
    mappings: Mappings,
    outputs: CaptureOutputs,
    configure: impl FnOnce(&mut ReplicatorOptions),
) -> Running {
    let settings = CaptureSettings {
        ops: true,
        // Small, so that tests also read what it evicted from RocksDB.
        mirror_cache_bytes: 256 << 10,
    };
    let mut capture =
        Capture::new(store, mappings, endpoint.clone(), settings, outputs).expect("capture");
    let mut options = ReplicatorOptions::new(endpoint);
    options.timeout = Duration::from_secs(20);
    options.backoff_min = Duration::from_millis(10);
    configure(&mut options);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut replicator = Replicator::new(options, capture.resume_position());
        capture
            .run(&mut replicator, async {
                let _ = stopped.await;
            })
            .await
            .expect("capture failed");
        capture
    });
    Running { task, stop }
}

impl Running {
    pub async fn stop(self) -> Capture {
        let _ = self.stop.send(());
        self.task.await.expect("capture task")
    }
}

pub async fn master_offset(client: &mut RedisClient) -> u64 {
    let info = client.info("replication").await.expect("info");
    info_field(&info, "master_repl_offset")
        .and_then(|v| v.parse().ok())
        .expect("offset")
}

/// Waits until the store's checkpoint reaches the primary's current offset.
pub async fn caught_up(store: &Store, client: &mut RedisClient) {
    let target = master_offset(client).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let checkpoint = store.checkpoint().expect("checkpoint");
        if checkpoint
            .position
            .as_ref()
            .is_some_and(|p| p.offset.0 >= target)
            && !checkpoint.full_sync_in_progress
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "capture did not reach offset {target}: {checkpoint:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub type Hashes = BTreeMap<(u32, Bytes), BTreeMap<Bytes, Bytes>>;

/// Every watched hash in Redis.
pub async fn redis_hashes(client: &mut RedisClient, mappings: &Mappings) -> Hashes {
    let mut out = BTreeMap::new();
    for mapping in mappings.iter() {
        client
            .command(&["SELECT", &mapping.db.to_string()])
            .await
            .expect("select");
        let pattern = format!("{}*", String::from_utf8_lossy(&mapping.key_prefix));
        let BytesFrame::Array(keys) = client.command(&["KEYS", &pattern]).await.expect("keys")
        else {
            panic!("KEYS")
        };
        for key in keys {
            let BytesFrame::BulkString(key) = key else {
                continue;
            };
            if frame_text(&client.command(&[&b"TYPE"[..], &key]).await.expect("type")) != "hash" {
                continue;
            }
            let BytesFrame::Array(items) = client
                .command(&[&b"HGETALL"[..], &key])
                .await
                .expect("hgetall")
            else {
                panic!("HGETALL")
            };
            let fields = items
                .chunks(2)
                .filter_map(|p| match (&p[0], &p[1]) {
                    (BytesFrame::BulkString(f), BytesFrame::BulkString(v)) => {
                        Some((f.clone(), v.clone()))
                    }
                    _ => None,
                })
                .collect();
            out.insert((mapping.db, key), fields);
        }
    }
    client.command(&["SELECT", "0"]).await.expect("select");
    out
}

pub fn mirror_hashes(store: &Store) -> Hashes {
    store
        .mirror_scan(None, &MirrorCursor::default(), usize::MAX)
        .expect("scan")
        .entries
        .into_iter()
        .filter(|(_, _, v)| v.kind == MirrorKind::Hash)
        .map(|(db, key, v)| {
            // A large hash is stored by field: read whole.
            let v = store.whole(db, &key, v).expect("whole hash");
            (
                (db, key),
                v.fields.into_iter().map(|(f, v)| (f, v.value)).collect(),
            )
        })
        .collect()
}

pub type Rows = BTreeMap<(Name, Bytes), Vec<(Name, Option<Bytes>)>>;

/// Replays the whole change log over an empty table.
pub fn replay(store: &Store) -> Rows {
    let mut rows = BTreeMap::new();
    let mut from = ChangeSeq::NONE;
    loop {
        let page = store.changes(from, 1000).expect("changes");
        let Some(last) = page.last() else { break };
        from = last.seq.next();
        for change in page {
            match change.row {
                RowChange::Upsert { columns } => {
                    rows.insert((change.mapping, change.row_id), columns);
                }
                RowChange::Delete => {
                    rows.remove(&(change.mapping, change.row_id));
                }
            }
        }
    }
    rows
}

/// Asserts that the mirror holds what Redis holds and that the change log replays to the rows
/// it projects to; returns Redis's hashes.
pub async fn assert_follows_redis(
    store: &Store,
    client: &mut RedisClient,
    mappings: &Mappings,
) -> Hashes {
    let redis = redis_hashes(client, mappings).await;
    assert_eq!(mirror_hashes(store), redis, "mirror vs Redis");
    assert_eq!(
        replay(store),
        projection(&redis, mappings),
        "change log replay vs Redis"
    );
    redis
}

/// The rows the tables should hold for these hashes.
pub fn projection(hashes: &Hashes, mappings: &Mappings) -> Rows {
    let mut rows = BTreeMap::new();
    for ((db, key), fields) in hashes {
        let Some(mapping) = mappings.watching(*db, key) else {
            continue;
        };
        let fields = fields
            .iter()
            .map(|(f, v)| {
                (
                    f.clone(),
                    writebehind::buffer::FieldValue {
                        value: v.clone(),
                        expire_at_ms: None,
                    },
                )
            })
            .collect();
        rows.insert(
            (mapping.name.clone(), mapping.row_id(key)),
            mapping.row_image(&fields),
        );
    }
    rows
}

/// Writes a service configuration for `server` into `dir`; returns (config, buffer) paths.
pub fn service_config(
    server: &RedisServer,
    dir: &tempfile::TempDir,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let buffer = dir.path().join("buffer");
    let database = format!("sqlite://{}.db", buffer.display());
    service_config_for(server, dir, &database)
}

pub fn service_config_for(
    server: &RedisServer,
    dir: &tempfile::TempDir,
    database: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let buffer = dir.path().join("buffer");
    let config = dir.path().join("writebehind.toml");
    std::fs::write(
        &config,
        config_text_for(
            &server.url(),
            &buffer.display().to_string(),
            "keep",
            database,
        ),
    )
    .expect("config");
    (config, buffer)
}

/// The database of the kill test, with triggers that count every write of a row.
pub enum CountedDb {
    Sqlite(std::path::PathBuf),
    Maria {
        pool: mysql_async::Pool,
        admin: mysql_async::Pool,
        name: String,
    },
    Postgres(super::sink::Database),
}

impl CountedDb {
    pub async fn maria() -> CountedDb {
        let admin = mysql_async::Pool::new(format!("{}/mysql", super::SHARED_MARIADB).as_str());
        let (name, url) = super::create_database(super::SHARED_MARIADB, "wb_kill").await;
        let pool = mysql_async::Pool::new(url.as_str());
        let mut conn = pool.get_conn().await.expect("conn");
        for statement in [
            "CREATE TABLE person1 (id VARCHAR(64) PRIMARY KEY, first TEXT, last TEXT, age TEXT, seq BIGINT)",
            "CREATE TABLE writes (id VARCHAR(64))",
            "CREATE TRIGGER counted_insert AFTER INSERT ON person1 FOR EACH ROW INSERT INTO writes VALUES (NEW.id)",
            "CREATE TRIGGER counted_update AFTER UPDATE ON person1 FOR EACH ROW INSERT INTO writes VALUES (NEW.id)",
            "CREATE TABLE car (id VARCHAR(64) PRIMARY KEY, color TEXT)",
        ] {
            conn.query_drop(statement).await.expect(statement);
        }
        CountedDb::Maria { pool, admin, name }
    }

    pub async fn postgres() -> CountedDb {
        let database = super::sink::Database::postgres().await;
        database
            .execute(
                "CREATE TABLE person1 (id VARCHAR(64) PRIMARY KEY, first TEXT, last TEXT, age TEXT, seq BIGINT);
                 CREATE TABLE writes (id VARCHAR(64));
                 CREATE FUNCTION count_write() RETURNS trigger AS $$ BEGIN INSERT INTO writes VALUES (NEW.id); RETURN NEW; END $$ LANGUAGE plpgsql;
                 CREATE TRIGGER counted AFTER INSERT OR UPDATE ON person1 FOR EACH ROW EXECUTE FUNCTION count_write();
                 CREATE TABLE car (id VARCHAR(64) PRIMARY KEY, color TEXT)",
            )
            .await;
        CountedDb::Postgres(database)
    }

    pub fn sqlite(path: std::path::PathBuf) -> CountedDb {
        rusqlite::Connection::open(&path)
            .expect("sqlite")
            .execute_batch(
                "CREATE TABLE person1 (id TEXT PRIMARY KEY, first TEXT, last TEXT, age TEXT, seq INTEGER);
                 CREATE TABLE writes (id TEXT);
                 CREATE TRIGGER counted_insert AFTER INSERT ON person1 BEGIN INSERT INTO writes VALUES (NEW.id); END;
                 CREATE TRIGGER counted_update AFTER UPDATE ON person1 BEGIN INSERT INTO writes VALUES (NEW.id); END;",
            )
            .expect("schema");
        CountedDb::Sqlite(path)
    }

    pub fn url(&self) -> String {
        match self {
            CountedDb::Sqlite(path) => format!("sqlite://{}", path.display()),
            CountedDb::Maria { name, .. } => format!("mysql://root@127.0.0.1:3306/{name}"),
            CountedDb::Postgres(database) => database.url(),
        }
    }

    /// (rows, seqs in order, rows written more than once)
    pub async fn counts(&self) -> (u64, Vec<u64>, u64) {
        match self {
            CountedDb::Sqlite(path) => {
                let Ok(db) = rusqlite::Connection::open(path) else {
                    return (0, vec![], 0);
                };
                let rows = db
                    .query_row("SELECT COUNT(*) FROM person1", [], |r| r.get::<_, i64>(0))
                    .unwrap_or(0) as u64;
                let seqs = db
                    .prepare("SELECT seq FROM person1 ORDER BY seq")
                    .and_then(|mut s| {
                        s.query_map([], |r| r.get::<_, i64>(0))
                            .map(|rows| rows.filter_map(Result::ok).map(|v| v as u64).collect())
                    })
                    .unwrap_or_default();
                let twice = db.query_row("SELECT COUNT(*) FROM (SELECT id FROM writes GROUP BY id HAVING COUNT(*) > 1)", [], |r| r.get::<_, i64>(0)).unwrap_or(0) as u64;
                (rows, seqs, twice)
            }
            CountedDb::Maria { pool, .. } => {
                let Ok(mut conn) = pool.get_conn().await else {
                    return (0, vec![], 0);
                };
                let rows: Option<u64> = conn
                    .query_first("SELECT COUNT(*) FROM person1")
                    .await
                    .unwrap_or(None);
                let seqs: Vec<u64> = conn
                    .query("SELECT seq FROM person1 ORDER BY seq")
                    .await
                    .unwrap_or_default();
                let twice: Option<u64> = conn.query_first("SELECT COUNT(*) FROM (SELECT id FROM writes GROUP BY id HAVING COUNT(*) > 1) t").await.unwrap_or(None);
                (rows.unwrap_or(0), seqs, twice.unwrap_or(0))
            }
            CountedDb::Postgres(database) => {
                let one = |sql: &'static str| async move {
                    database.query_i64(sql).await.first().copied().unwrap_or(0) as u64
                };
                let rows = one("SELECT COUNT(*) FROM person1").await;
                let seqs = database
                    .query_i64("SELECT seq FROM person1 ORDER BY seq")
                    .await
                    .into_iter()
                    .map(|v| v as u64)
                    .collect();
                let twice = one("SELECT COUNT(*) FROM (SELECT id FROM writes GROUP BY id HAVING COUNT(*) > 1) t").await;
                (rows, seqs, twice)
            }
        }
    }

    pub async fn row_count(&self) -> u64 {
        match self {
            CountedDb::Sqlite(path) => rusqlite::Connection::open(path)
                .and_then(|c| {
                    c.query_row("SELECT COUNT(*) FROM person1", [], |r| r.get::<_, i64>(0))
                })
                .map(|n| n as u64)
                .unwrap_or(0),
            CountedDb::Maria { pool, .. } => match pool.get_conn().await {
                Ok(mut conn) => conn
                    .query_first::<u64, _>("SELECT COUNT(*) FROM person1")
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(0),
                Err(_) => 0,
            },
            CountedDb::Postgres(database) => database
                .query_i64("SELECT COUNT(*) FROM person1")
                .await
                .first()
                .copied()
                .unwrap_or(0) as u64,
        }
    }

    pub async fn drop_database(self) {
        if let CountedDb::Postgres(database) = self {
            database.drop_database().await;
            return;
        }
        if let CountedDb::Maria { admin, name, pool } = self {
            pool.disconnect().await.ok();
            admin
                .get_conn()
                .await
                .expect("conn")
                .query_drop(format!("DROP DATABASE {name}"))
                .await
                .ok();
            admin.disconnect().await.ok();
        }
    }
}

/// Starts `writebehind run` on `config`.
/// Starts `writebehind run` on `config`; its log is appended to [`service_log_path`], which a
/// failing test prints with [`service_log`].
pub fn spawn_service(config: &std::path::Path) -> super::ServiceProcess {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(service_log_path(config))
        .expect("service log");
    super::spawn_service(config, log)
}

/// Where [`spawn_service`] appends the stderr of every service started on `config`.
pub fn service_log_path(config: &std::path::Path) -> std::path::PathBuf {
    config.with_extension("log")
}

/// The stderr of every service started on `config` so far, for a failure message.
pub fn service_log(config: &std::path::Path) -> String {
    let text = std::fs::read_to_string(service_log_path(config)).unwrap_or_default();
    format!("\nservice log ({} bytes):\n{text}", text.len())
}

/// Waits until the service has acknowledged the primary's offset of now and `database` holds
/// `rows` rows; `context` (a service log, say) goes into the failure message.
pub async fn until_caught_up(
    client: &mut RedisClient,
    database: &CountedDb,
    rows: u64,
    context: impl Fn() -> String,
) {
    let target = master_offset(client).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while replica_ack_offset(client).await.is_none_or(|o| o < target)
        || database.row_count().await < rows
    {
        assert!(
            Instant::now() < deadline,
            "the service never caught up (offset {target}, {rows} rows){}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The table holds rows 1 to `written`, each written once (the triggers count the writes).
pub async fn assert_each_row_written_once(database: &CountedDb, written: u64) {
    let (rows, seqs, twice) = database.counts().await;
    assert_eq!(rows, written);
    assert_eq!(
        seqs,
        (1..=written).collect::<Vec<u64>>(),
        "every write arrived"
    );
    assert_eq!(twice, 0, "no row was written twice");
}

/// The primary's view of our acknowledged offset (`slave0:...,offset=N`).
/// Waits until the service's first snapshot is in its buffer: a write to an unwatched key is
/// made, and the offset the service acknowledges must reach it (it acknowledges only what is
/// durable, and nothing past a snapshot before the snapshot itself). `slave0` alone proves
/// nothing: the primary lists a replica, at offset 0, as soon as it asks for a sync.
pub async fn until_attached(client: &mut RedisClient, context: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    // Online first: until a replica is attached the primary keeps no backlog, a write leaves
    // its offset at 0, and the replica's first listing (offset 0) passed for an acknowledgement
    // of the write (CI, session 19: a kill landed before the first snapshot was durable).
    while !client.info("replication").await.is_ok_and(|info| {
        info_field(&info, "slave0").is_some_and(|line| line.contains("state=online"))
    }) {
        assert!(
            Instant::now() < deadline,
            "the service never came online{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client
        .command(&["SET", "unwatched:attached", "1"])
        .await
        .expect("set");
    let target = master_offset(client).await;
    assert!(
        target > 0,
        "the primary's offset did not move with a replica online"
    );
    while replica_ack_offset(client).await.is_none_or(|o| o < target) {
        assert!(
            Instant::now() < deadline,
            "the service never attached (offset {target}){}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn replica_ack_offset(client: &mut RedisClient) -> Option<u64> {
    let info = client.info("replication").await.ok()?;
    let line = info_field(&info, "slave0")?;
    line.split(',')
        .find_map(|part| part.strip_prefix("offset="))
        .and_then(|o| o.parse().ok())
}

/// Sends `commands` (a long transaction) from another connection, cuts the replication link
/// once a part of it is written, waits until capture has caught up, stops it and checks that
/// what was written of the transaction was rolled back.
pub async fn cut_inside_a_transaction(
    server: &RedisServer,
    store: &Store,
    client: &mut RedisClient,
    commands: Vec<Vec<String>>,
    running: Running,
) -> Capture {
    let mut sender = server.client().await;
    let sent = tokio::spawn(async move { super::send_all(&mut sender, &commands).await });
    cut_once_a_part_is_written(store, client).await;
    sent.await.expect("send");
    caught_up(store, client).await;
    let capture = running.stop().await;
    assert!(
        capture.stats().units_rolled_back >= 1,
        "the cut transaction was rolled back: {:?}",
        capture.stats()
    );
    assert_eq!(store.open_unit().expect("open unit"), None);
    capture
}

/// Waits until a part of an open transaction is written (`src/buffer/open_unit.rs`), then has
/// the primary cut the replication link.
pub async fn cut_once_a_part_is_written(store: &Store, client: &mut RedisClient) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while store.open_unit().expect("open unit").is_none() {
        assert!(
            Instant::now() < deadline,
            "no part of the transaction was written"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    client
        .command(&["CLIENT", "KILL", "TYPE", "replica"])
        .await
        .expect("client kill");
}
