//! Helpers of the sink tests (tests/sink.rs, tests/sink_mysql.rs, tests/sink_postgres.rs): a
//! test database (a fresh MariaDB or PostgreSQL database, or a SQLite file), the recipe's
//! configuration, and the service started in this process through the library's `Service`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use writebehind::buffer::Store;
use writebehind::config::Config;
use writebehind::redis_client::{info_field, RedisClient};
use writebehind::service::{Service, ServiceOptions};

use super::{MariaDbServer, RedisServer};

pub const PERSON_TABLE: &str = "CREATE TABLE person1 (id VARCHAR(64) PRIMARY KEY, first VARCHAR(255), last VARCHAR(255), age VARCHAR(20), note TEXT)";
/// `person1` with every insert and update of a row counted in `writes` (exactly-once checks).
pub const COUNTED_PERSON_TABLE: &str = "CREATE TABLE person1 (id VARCHAR(64) PRIMARY KEY, first VARCHAR(255), last VARCHAR(255), age VARCHAR(20));
    CREATE TABLE writes (id VARCHAR(64));
    CREATE TRIGGER counted_insert AFTER INSERT ON person1 FOR EACH ROW INSERT INTO writes VALUES (NEW.id);
    CREATE TRIGGER counted_update AFTER UPDATE ON person1 FOR EACH ROW INSERT INTO writes VALUES (NEW.id);";
/// `person1` with every insert and update counted in `writes`, for PostgreSQL.
pub const COUNTED_PERSON_TABLE_POSTGRES: &str = "CREATE TABLE person1 (id VARCHAR(64) PRIMARY KEY, first VARCHAR(255), last VARCHAR(255), age VARCHAR(20));
    CREATE TABLE writes (id VARCHAR(64));
    CREATE FUNCTION count_write() RETURNS trigger AS $$ BEGIN INSERT INTO writes VALUES (NEW.id); RETURN NEW; END $$ LANGUAGE plpgsql;
    CREATE TRIGGER counted AFTER INSERT OR UPDATE ON person1 FOR EACH ROW EXECUTE FUNCTION count_write();";
pub const CAR_TABLE: &str = "CREATE TABLE car (id VARCHAR(64) PRIMARY KEY, color VARCHAR(32))";

/// The machine's shared PostgreSQL (`pg_hba` trusts 127.0.0.1), started by `.ci/run`.
pub const SHARED_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";

/// A test database: a fresh MariaDB or PostgreSQL database, or a SQLite file.
pub enum Database {
    Maria {
        pool: mysql_async::Pool,
        name: String,
        url: String,
    },
    /// Connected anew for each use: a test may restart the server.
    Postgres { name: String, url: String },
    Sqlite {
        path: std::path::PathBuf,
        _dir: tempfile::TempDir,
    },
}

impl Database {
    pub async fn maria() -> Database {
        let (name, url) = super::create_database(super::SHARED_MARIADB, "wb_test").await;
        let pool = mysql_async::Pool::new(url.as_str());
        Database::Maria { pool, name, url }
    }

    /// A database on a private server (see `MariaDbServer`).
    pub async fn maria_on(server: &MariaDbServer) -> Database {
        let (name, url) = super::create_database(&server.server(), "wb").await;
        Database::Maria {
            pool: mysql_async::Pool::new(url.as_str()),
            name,
            url,
        }
    }

    /// A fresh database on the shared PostgreSQL.
    pub async fn postgres() -> Database {
        Self::postgres_at(SHARED_POSTGRES).await
    }

    /// A fresh database on a private cluster (see `PostgresServer`).
    pub async fn postgres_on(server: &super::postgres::PostgresServer) -> Database {
        Self::postgres_at(&server.server()).await
    }

    async fn postgres_at(server: &str) -> Database {
        let name = format!("wb_pg_{}_{}", std::process::id(), rand::random::<u32>());
        let admin = Self::postgres_client(&format!("{server}/postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE");
        let url = format!("{server}/{name}");
        Database::Postgres { name, url }
    }

    async fn postgres_client(url: &str) -> tokio_postgres::Client {
        Self::try_postgres_client(url).await.unwrap_or_else(|e| {
            panic!("PostgreSQL at {url} (the shared one is started by .ci/run): {e}")
        })
    }

    async fn try_postgres_client(
        url: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    pub fn sqlite() -> Database {
        let dir = tempfile::tempdir().expect("dir");
        Database::Sqlite {
            path: dir.path().join("writebehind.db"),
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        match self {
            Database::Maria { url, .. } | Database::Postgres { url, .. } => url.clone(),
            Database::Sqlite { path, .. } => format!("sqlite://{}", path.display()),
        }
    }

    pub async fn execute(&self, sql: &str) {
        match self {
            Database::Maria { pool, .. } => pool
                .get_conn()
                .await
                .expect("conn")
                .query_drop(sql)
                .await
                .expect(sql),
            Database::Postgres { url, .. } => Self::postgres_client(url)
                .await
                .batch_execute(sql)
                .await
                .expect(sql),
            Database::Sqlite { path, .. } => {
                rusqlite::Connection::open(path)
                    .expect("open")
                    .execute_batch(sql)
                    .expect(sql);
            }
        }
    }

    /// All rows of a table as text, by id.
    pub async fn rows(
        &self,
        table: &str,
        columns: &[&str],
    ) -> BTreeMap<String, Vec<Option<String>>> {
        let sql = format!("SELECT id, {} FROM {table}", columns.join(", "));
        match self {
            Database::Maria { pool, .. } => {
                let rows: Vec<mysql_async::Row> = pool
                    .get_conn()
                    .await
                    .expect("conn")
                    .query(sql)
                    .await
                    .expect("select");
                rows.into_iter()
                    .map(|row| {
                        let values: Vec<Option<String>> = (0..row.len())
                            .map(|i| row.get::<Option<String>, _>(i).flatten())
                            .collect();
                        (values[0].clone().unwrap_or_default(), values[1..].to_vec())
                    })
                    .collect()
            }
            Database::Postgres { url, .. } => {
                let client = Self::postgres_client(url).await;
                let columns: Vec<String> = std::iter::once("id")
                    .chain(columns.iter().copied())
                    .map(|c| format!("{c}::text"))
                    .collect();
                let sql = format!("SELECT {} FROM {table}", columns.join(", "));
                let rows = client.query(&sql, &[]).await.expect("select");
                rows.into_iter()
                    .map(|row| {
                        let values: Vec<Option<String>> =
                            (0..row.len()).map(|i| row.get(i)).collect();
                        (values[0].clone().unwrap_or_default(), values[1..].to_vec())
                    })
                    .collect()
            }
            Database::Sqlite { path, .. } => {
                let conn = rusqlite::Connection::open(path).expect("open");
                let mut statement = conn.prepare(&sql).expect("prepare");
                let count = columns.len() + 1;
                statement
                    .query_map([], |row| {
                        let values: Vec<Option<String>> = (0..count)
                            .map(|i| row.get::<_, Option<String>>(i).ok().flatten())
                            .collect();
                        Ok((values[0].clone().unwrap_or_default(), values[1..].to_vec()))
                    })
                    .expect("query")
                    .collect::<Result<_, _>>()
                    .expect("rows")
            }
        }
    }

    /// The first column of every row of `sql`, as integers (PostgreSQL and MariaDB; empty on
    /// error).
    pub async fn query_i64(&self, sql: &str) -> Vec<i64> {
        let url = match self {
            Database::Postgres { url, .. } => url,
            Database::Maria { pool, .. } => {
                let Ok(mut conn) = pool.get_conn().await else {
                    return Vec::new();
                };
                return conn.query::<i64, _>(sql).await.unwrap_or_default();
            }
            Database::Sqlite { .. } => panic!("query_i64 is for PostgreSQL and MariaDB"),
        };
        let Ok(client) = Self::try_postgres_client(url).await else {
            return Vec::new();
        };
        client
            .query(sql, &[])
            .await
            .map(|rows| rows.iter().map(|r| r.get::<_, i64>(0)).collect())
            .unwrap_or_default()
    }

    pub async fn checkpoint_seq(&self) -> u64 {
        // The seq every partition has applied: the lowest of the backend's rows, 0 while a
        // partition of a layout has no row yet (its first commit may come after the others').
        let sql = "SELECT backend, change_seq FROM writebehind_checkpoint WHERE backend = 'db' OR backend LIKE 'db#%'";
        let rows: Vec<(String, u64)> = match self {
            Database::Maria { pool, .. } => {
                let mut conn = pool.get_conn().await.expect("conn");
                conn.query(sql).await.unwrap_or_default()
            }
            Database::Postgres { url, .. } => match Self::try_postgres_client(url).await {
                Ok(client) => client.query(sql, &[]).await,
                Err(e) => Err(e),
            }
            .map(|rows| {
                rows.iter()
                    .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
                    .collect()
            })
            .unwrap_or_default(),
            Database::Sqlite { path, .. } => {
                let conn = rusqlite::Connection::open(path).expect("open");
                let rows = conn.prepare(sql).and_then(|mut statement| {
                    statement
                        .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
                        .collect::<Result<Vec<_>, _>>()
                });
                rows.unwrap_or_default()
            }
        };
        let layout = |name: &str| -> usize {
            name.rsplit_once('/')
                .and_then(|(_, n)| n.parse().ok())
                .unwrap_or(1)
        };
        let complete = rows.iter().all(|(name, _)| {
            rows.iter()
                .filter(|(other, _)| layout(other) == layout(name))
                .count()
                >= layout(name)
        });
        match complete {
            true => rows.iter().map(|(_, seq)| *seq).min().unwrap_or(0),
            false => 0,
        }
    }

    /// A connection of its own for polling (MariaDB or PostgreSQL).
    pub async fn reader(&self) -> Reader {
        match self {
            Database::Maria { url, .. } => Reader::Maria(
                mysql_async::Conn::from_url(url.as_str())
                    .await
                    .expect("reader"),
            ),
            Database::Postgres { url, .. } => Reader::Postgres(Self::postgres_client(url).await),
            Database::Sqlite { .. } => panic!("reader is for MariaDB and PostgreSQL"),
        }
    }

    /// The checkpoint rows by name, each with its change seq (MariaDB or PostgreSQL).
    pub async fn checkpoint_rows(&self) -> Vec<(String, u64)> {
        let sql = "SELECT backend, change_seq FROM writebehind_checkpoint ORDER BY backend";
        match self {
            Database::Maria { pool, .. } => {
                let mut conn = pool.get_conn().await.expect("conn");
                conn.query(sql).await.expect("checkpoint rows")
            }
            Database::Postgres { url, .. } => Self::postgres_client(url)
                .await
                .query(sql, &[])
                .await
                .expect("checkpoint rows")
                .iter()
                .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
                .collect(),
            Database::Sqlite { .. } => panic!("checkpoint_rows is for MariaDB and PostgreSQL"),
        }
    }

    /// How many ids `writes` (see `COUNTED_PERSON_TABLE`) holds more than once.
    pub async fn written_twice(&self) -> i64 {
        let sql =
            "SELECT COUNT(*) FROM (SELECT id FROM writes GROUP BY id HAVING COUNT(*) > 1) AS twice";
        match self {
            Database::Maria { pool, .. } => {
                let mut conn = pool.get_conn().await.expect("conn");
                let count: Option<i64> = conn.query_first(sql).await.expect("count");
                count.unwrap_or(0)
            }
            Database::Postgres { url, .. } => Self::postgres_client(url)
                .await
                .query_one(sql, &[])
                .await
                .expect("count")
                .get(0),
            Database::Sqlite { .. } => panic!("written_twice is for MariaDB and PostgreSQL"),
        }
    }

    /// Holds the checkpoint row `backend` locked (`SELECT ... FOR UPDATE` in an open
    /// transaction) until the returned lock is released.
    pub async fn lock_checkpoint_row(&self, backend: &str) -> RowLock {
        let sql = format!("SELECT * FROM writebehind_checkpoint WHERE source = 'writebehind' AND backend = '{backend}' FOR UPDATE");
        match self {
            Database::Maria { pool, .. } => {
                let mut conn = pool.get_conn().await.expect("lock conn");
                conn.query_drop("BEGIN").await.expect("begin");
                conn.query_drop(sql).await.expect("lock");
                RowLock::Maria(conn)
            }
            Database::Postgres { url, .. } => {
                let client = Self::postgres_client(url).await;
                client.batch_execute("BEGIN").await.expect("begin");
                client.batch_execute(&sql).await.expect("lock");
                RowLock::Postgres(client)
            }
            Database::Sqlite { .. } => panic!("lock_checkpoint_row is for MariaDB and PostgreSQL"),
        }
    }

    pub async fn drop_database(self) {
        if let Database::Postgres { name, url } = self {
            let server = url.rsplit_once('/').map_or(SHARED_POSTGRES, |(s, _)| s);
            Self::postgres_client(&format!("{server}/postgres"))
                .await
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .ok();
            return;
        }
        if let Database::Maria { pool, name, .. } = self {
            pool.get_conn()
                .await
                .expect("conn")
                .query_drop(format!("DROP DATABASE {name}"))
                .await
                .ok();
            pool.disconnect().await.ok();
        }
    }
}

pub fn config_text(server: &RedisServer, db_url: &str) -> String {
    config_text_with(server, db_url, "")
}

/// The recipe's configuration with `backend_options` (TOML lines) added to `[backends.db]`.
pub fn config_text_with(server: &RedisServer, db_url: &str, backend_options: &str) -> String {
    format!(
        r#"
[admin]
listen = ""
[source]
url = "{}"
[backends.db]
url = "{db_url}"
{backend_options}
[[mappings]]
name = "PersonWriteBehind"
prefix = "person2"
backend = "db"
table = "person1"
key_column = "id"
[mappings.columns]
first_name = "first"
last_name = "last"
age = "age"
[[mappings]]
name = "CarsWriteBehind"
prefix = "car"
backend = "db"
table = "car"
key_column = "id"
on_expire = "delete"
required = ["color"]
[mappings.columns]
id = "id"
color = "color"
"#,
        server.url()
    )
}

/// The pipeline, started in this process through the library's `Service`.
pub struct Running {
    pub service: Service,
    pub store: Arc<Store>,
    pub config_file: std::path::PathBuf,
    pub _dir: tempfile::TempDir,
}

pub async fn start(server: &RedisServer, database: &Database) -> Running {
    start_with(server, database, "").await
}

/// The service with `backend_options` (TOML lines) added to `[backends.db]`.
pub async fn start_with(
    server: &RedisServer,
    database: &Database,
    backend_options: &str,
) -> Running {
    start_with_url(server, &database.url(), backend_options).await
}

/// The service writing to `db_url` (the test database reached another way: as another user,
/// with TLS parameters).
pub async fn start_with_url(server: &RedisServer, db_url: &str, backend_options: &str) -> Running {
    let dir = tempfile::tempdir().expect("dir");
    let buffer = dir.path().join("buffer");
    // The configuration as a file too, for the command line (`dlq`).
    let config_file = dir.path().join("writebehind.toml");
    let text = format!(
        "{}\n[buffer]\npath = \"{}\"\n",
        config_text_with(server, db_url, backend_options),
        buffer.display()
    );
    std::fs::write(&config_file, &text).expect("config file");
    let config = Config::parse(&text, &|_| None).expect("config");
    let service = Service::start(&config, ServiceOptions::default())
        .await
        .unwrap_or_else(|problems| panic!("the service did not start: {problems}"));
    Running {
        store: service.store().clone(),
        service,
        config_file,
        _dir: dir,
    }
}

impl Running {
    /// Waits until everything the primary has written is captured and applied.
    pub async fn settle(&self, client: &mut RedisClient, database: &Database) {
        let info = client.info("replication").await.expect("info");
        let target: u64 = info_field(&info, "master_repl_offset")
            .and_then(|v| v.parse().ok())
            .expect("offset");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let checkpoint = self.store.checkpoint().expect("checkpoint");
            let captured = checkpoint
                .position
                .as_ref()
                .is_some_and(|p| p.offset.0 >= target)
                && !checkpoint.full_sync_in_progress;
            if captured && database.checkpoint_seq().await + 1 >= checkpoint.next_seq.0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not applied within 30 s: {checkpoint:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the service; returns its configuration file and keeps its buffer.
    pub async fn stop(self) -> (std::path::PathBuf, tempfile::TempDir) {
        self.service.shutdown();
        self.service
            .wait()
            .await
            .expect("the service stopped cleanly");
        (self.config_file, self._dir)
    }
}

pub fn row(values: &[Option<&str>]) -> Vec<Option<String>> {
    values.iter().map(|v| v.map(String::from)).collect()
}

pub async fn run(client: &mut RedisClient, args: &[&str]) {
    client
        .command(args)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
}

/// A row held locked by an open transaction (`Database::lock_checkpoint_row`).
pub enum RowLock {
    Maria(mysql_async::Conn),
    Postgres(tokio_postgres::Client),
}

impl RowLock {
    pub async fn release(self) {
        match self {
            RowLock::Maria(mut conn) => conn.query_drop("ROLLBACK").await.expect("unlock"),
            RowLock::Postgres(client) => client.batch_execute("ROLLBACK").await.expect("unlock"),
        }
    }
}

/// A connection kept open to poll a table (`Database::reader`).
pub enum Reader {
    Maria(mysql_async::Conn),
    Postgres(tokio_postgres::Client),
}

impl Reader {
    /// `person1`'s rows with ids `g<group>-<n>`, counted by group.
    pub async fn group_counts(&mut self) -> Vec<(String, i64)> {
        match self {
            Reader::Maria(conn) => conn
                .query("SELECT SUBSTRING_INDEX(id, '-', 1) AS g, COUNT(*) FROM person1 WHERE id LIKE 'g%' GROUP BY g")
                .await
                .expect("poll"),
            Reader::Postgres(client) => client
                .query("SELECT split_part(id, '-', 1), COUNT(*) FROM person1 WHERE id LIKE 'g%' GROUP BY 1", &[])
                .await
                .expect("poll")
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        }
    }
}
