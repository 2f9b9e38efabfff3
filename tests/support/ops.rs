//! Helpers of the `#` op tests (tests/ops.rs, tests/ops_acks.rs): Redis, a fresh MariaDB
//! database with the recipe's tables, and the service binary between them.

use mysql_async::prelude::Queryable;
use redis_protocol::resp2::types::BytesFrame;
use writebehind::redis_client::RedisClient;

use super::RedisServer;

pub const TABLE: &str = "CREATE TABLE persons (person_id VARCHAR(100) PRIMARY KEY, first VARCHAR(100), last VARCHAR(100), age INT)";
pub const TABLE2: &str = "CREATE TABLE persons2 (person_id VARCHAR(100) PRIMARY KEY, first VARCHAR(100), last VARCHAR(100), age INT)";

pub type Row = (Option<String>, Option<String>, Option<i64>);
/// (op, the hash in Redis afterwards, the row afterwards)
pub type RaceCase = (&'static str, &'static [(&'static str, &'static str)], Row);

pub struct Setup {
    pub _redis: RedisServer,
    pub client: RedisClient,
    pub pool: mysql_async::Pool,
    pub database: String,
    pub child: Option<super::ServiceProcess>,
    pub dir: tempfile::TempDir,
}

impl Setup {
    /// Redis (with `extra` arguments), a fresh database with the recipe's tables, and the
    /// service; `before` runs against Redis before the service starts.
    pub async fn start(extra: &[&str]) -> Setup {
        Setup::start_on(extra, super::SHARED_MARIADB).await
    }

    /// The same, with the database on the MariaDB server at `server` (`mysql://user@host:port`).
    pub async fn start_on(extra: &[&str], server: &str) -> Setup {
        let redis = RedisServer::start(extra);
        let source = format!("url = \"{}\"", redis.url());
        Setup::start_with_source(redis, server, &source).await
    }

    /// With `redis` and `source` as the `[source]` section's lines (the service's view of
    /// Redis: a TLS port, say), the tests' client on the plain port.
    pub async fn start_with_source(redis: RedisServer, server: &str, source: &str) -> Setup {
        let client = redis.client().await;
        let (database, url) = super::create_database(server, "wb_ops").await;
        let pool = mysql_async::Pool::new(url.as_str());
        let mut conn = pool.get_conn().await.expect("conn");
        conn.query_drop(TABLE).await.expect("table");
        conn.query_drop(TABLE2).await.expect("table");
        drop(conn);
        let dir = tempfile::tempdir().expect("dir");
        let mut mappings = String::new();
        for (name, prefix, table) in [
            ("Persons", "person", "persons"),
            ("Persons2", "person2", "persons2"),
        ] {
            mappings.push_str(&format!(
                "[[mappings]]\nname = \"{name}\"\nprefix = \"{prefix}\"\nbackend = \"db\"\ntable = \"{table}\"\nkey_column = \"person_id\"\n\
                 [mappings.columns]\nfirst_name = \"first\"\nlast_name = \"last\"\nage = \"age\"\n"
            ));
        }
        std::fs::write(
            dir.path().join("writebehind.toml"),
            format!(
                "[admin]\nlisten = \"\"\n[source]\n{source}\n[buffer]\npath = \"{}\"\n[backends.db]\nurl = \"{url}\"\n{mappings}",
                dir.path().join("buffer").display()
            ),
        )
        .expect("config");
        Setup {
            _redis: redis,
            client,
            pool,
            database,
            child: None,
            dir,
        }
    }

    pub fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("service.log")).expect("log");
        self.child = Some(super::spawn_service(
            &self.dir.path().join("writebehind.toml"),
            log,
        ));
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("service.log")).unwrap_or_default()
    }

    pub async fn redis(&mut self, args: &[&str]) -> BytesFrame {
        self.client.command(args).await.expect("redis command")
    }

    /// The hash as sorted (field, value) pairs.
    pub async fn hash(&mut self, key: &str) -> Vec<(String, String)> {
        let BytesFrame::Array(items) = self.redis(&["HGETALL", key]).await else {
            panic!("HGETALL is not an array")
        };
        let text: Vec<String> = items
            .iter()
            .map(writebehind::redis_client::frame_text)
            .collect();
        let mut pairs: Vec<(String, String)> = text
            .chunks(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect();
        pairs.sort();
        pairs
    }

    pub async fn row(&self, table: &str, id: &str) -> Option<Row> {
        let mut conn = self.pool.get_conn().await.expect("conn");
        conn.exec_first(
            format!("SELECT first, last, age FROM {table} WHERE person_id = ?"),
            (id,),
        )
        .await
        .expect("select")
    }

    /// `XREAD BLOCK 2000 STREAMS <stream> 0-0`, as the recipe's clients do: the first entry's
    /// fields, or `None` when nothing arrived within 2 s.
    pub async fn xread(&mut self, stream: &str) -> Option<Vec<String>> {
        let reply = self
            .redis(&["XREAD", "BLOCK", "2000", "STREAMS", stream, "0-0"])
            .await;
        let BytesFrame::Array(streams) = reply else {
            return None;
        };
        let BytesFrame::Array(stream) = streams.first()? else {
            return None;
        };
        let BytesFrame::Array(entries) = stream.get(1)? else {
            return None;
        };
        let BytesFrame::Array(entry) = entries.first()? else {
            return None;
        };
        let BytesFrame::Array(fields) = entry.get(1)? else {
            return None;
        };
        Some(
            fields
                .iter()
                .map(writebehind::redis_client::frame_text)
                .collect(),
        )
    }

    /// Waits for the ack `{key}uuid` (several 2 s `XREAD BLOCK`s at most) and returns it.
    pub async fn ack(&mut self, key: &str, uuid: &str) -> Vec<String> {
        let stream = format!("{{{key}}}{uuid}");
        for _ in 0..10 {
            if let Some(fields) = self.xread(&stream).await {
                return fields;
            }
        }
        panic!("no ack on {stream}; service log:\n{}", self.log())
    }

    /// `FCALL writebehind_version 0`, when the library is loaded.
    pub async fn library_version(&mut self) -> Option<i64> {
        match self
            .client
            .command(&["FCALL", "writebehind_version", "0"])
            .await
        {
            Ok(BytesFrame::Integer(version)) => Some(version),
            _ => None,
        }
    }

    pub async fn keys(&mut self, pattern: &str) -> Vec<String> {
        match self.redis(&["KEYS", pattern]).await {
            BytesFrame::Array(items) => items
                .iter()
                .map(writebehind::redis_client::frame_text)
                .collect(),
            _ => Vec::new(),
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let (pool, database) = (self.pool.clone(), self.database.clone());
        // Best effort: the database is dropped by a fresh connection.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async move {
                    if let Ok(mut conn) = pool.get_conn().await {
                        let _ = conn.query_drop(format!("DROP DATABASE {database}")).await;
                    }
                });
            }
        })
        .join()
        .ok();
    }
}

/// Polls `condition` (an expression that may `.await`) until it holds, with a deadline.
#[macro_export]
macro_rules! until {
    ($t:ident, $what:expr, $condition:expr) => {{
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if $condition {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {}; service log:\n{}",
                $what,
                $t.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }};
}

impl Setup {
    /// Starts the service and waits for the function library and for the replica link to be
    /// online: an op tag written before the snapshot's fork is not in the snapshot, so its ack
    /// would never come (docs/design.md 10.1).
    pub async fn spawn_attached(&mut self) {
        use std::time::{Duration, Instant};
        self.spawn();
        let t = self;
        until!(
            t,
            "the library",
            t.library_version().await == Some(writebehind::ack::LIBRARY_VERSION)
        );
        until!(
            t,
            "the replica online",
            t.client
                .info("replication")
                .await
                .is_ok_and(|info| info.contains("state=online"))
        );
    }
}

pub fn done() -> Vec<String> {
    vec!["status".into(), "done".into()]
}

pub fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

pub fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = items
        .iter()
        .map(|(f, v)| (f.to_string(), v.to_string()))
        .collect();
    out.sort();
    out
}

pub const PERSON: [&str; 8] = [
    "HSET",
    "person:1",
    "first_name",
    "foo",
    "last_name",
    "bar",
    "age",
    "22",
];

pub fn person_with_op(op: &str) -> Vec<&str> {
    let mut command = PERSON.to_vec();
    command.extend(["#", op]);
    command
}
