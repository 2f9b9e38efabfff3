//! The MySQL/MariaDB sink (`mysql_async`).
//!
//! A batch is one transaction: `DELETE ... WHERE key IN (...)` per table, then multi-row
//! `INSERT ... ON DUPLICATE KEY UPDATE` of the mapped columns only (so unmapped columns of
//! existing rows stay as they are), then the checkpoint row, then `COMMIT`. From
//! [`STAGE_THRESHOLD`] upserts for a table on, they are first loaded straight into the table as
//! new rows (`new_rows.rs`), and when not every one of them goes in as sent, loaded into a stage
//! and merged (`staging.rs`). If the server refuses a row, the transaction is rolled back and
//! replayed row by row, each behind a savepoint, so the refused rows (an error, or a statement
//! that succeeded with warnings) are isolated and the others commit (`grouped.rs` for the
//! fast path, `row_by_row.rs` for the slow one). Either way the `COMMIT` waits for the batch's
//! `CommitGate`: its rows may be written while the buffer still syncs their changes.

use std::collections::HashMap;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, DriverError, Opts, OptsBuilder, Params, Pool, Value};

use super::convert::{ColumnType, SqlValue};
use super::SinkCheckpoint;
use super::{
    quote, BeforeCommit, ColumnInfo, Destination, Rejected, SchemaProblem, SinkBatch, SinkError,
    SinkErrorKind, TableSchema, CHECKPOINT_TABLE,
};
use crate::capture::mapping::Mapping;
use crate::position::ChangeSeq;

mod grouped;
mod new_rows;
mod packet;
mod row_by_row;
mod schema;
mod ssl;
mod staging;
mod statements;

use new_rows::NewRows;
use packet::{param_bytes, row_text_bytes};
use schema::{add_identity_columns, create_table, missing_grants};
use staging::Stages;
use statements::{push_checkpoint, Statements};

/// Placeholders per statement stay well under the protocol's 65,535.
const MAX_PLACEHOLDERS: usize = 30_000;
/// Run on every new connection: strict `sql_mode` added to the server's.
const STRICT_SESSION: &str = "SET SESSION sql_mode = IF(@@SESSION.sql_mode = '', 'STRICT_ALL_TABLES', CONCAT(@@SESSION.sql_mode, ',STRICT_ALL_TABLES'))";
/// A kept session idle this long is pinged before a batch (a server closes idle sessions after
/// its `wait_timeout`).
const SESSION_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
/// Upserts into one table from this many rows on go through LOAD DATA LOCAL INFILE (straight
/// into the table as new rows, or into a stage).
pub(super) const STAGE_THRESHOLD: usize = 500;
/// `max_allowed_packet` until the server has said (MariaDB's default).
const DEFAULT_MAX_PACKET: usize = 16 << 20;

pub struct MysqlSink {
    name: String,
    /// Connections for reading (schemas, checkpoint, row ids); reset when returned.
    pool: Pool,
    /// What a batch's own session connects with.
    opts: Opts,
    /// The session batches are written on, kept between batches so that its staging tables and
    /// prepared statements last; dropped (closed, so the server rolls back whatever it had
    /// open) after any failure.
    session: Option<Session>,
    /// The session of a long unit written in parts, its transaction open
    /// (`Destination::apply_unit_part`).
    unit: Option<Session>,
    address: String,
    /// Whether large batches may use LOAD DATA LOCAL INFILE (off once the server refuses it).
    staging: std::sync::atomic::AtomicBool,
    /// The engine of the staging tables (see `staging.rs`): `Aria` where the server has it.
    stage_engine: staging::StageEngine,
    /// The server's `max_allowed_packet`, read on every new session (see `packet.rs`).
    max_packet: std::sync::atomic::AtomicUsize,
    /// `ssl-mode` and what it verifies against (`ssl.rs`), for `check`.
    tls: String,
}

/// The batch session: its connection, when it was last used, and its staging tables.
struct Session {
    conn: Conn,
    used: std::time::Instant,
    stages: Stages,
    new_rows: NewRows,
}

/// Sets the batch's checkpoint rows and commits, in one query, once the buffer has synced the
/// batch's changes (its rows were written meanwhile: `buffer/durability.rs`).
async fn commit_with_checkpoint(conn: &mut Conn, batch: &SinkBatch) -> Result<(), SinkError> {
    batch.commit_gate.wait().await?;
    let mut statements = Statements::default();
    push_checkpoint(&mut statements, batch);
    statements.push("COMMIT");
    statements.run(conn).await.map(drop).map_err(classify)
}

fn q(identifier: &str) -> String {
    quote(identifier, '`')
}

/// A value read back from the server.
fn sql_value(v: Value) -> SqlValue {
    match v {
        Value::NULL => SqlValue::Null,
        Value::Int(i) => SqlValue::Int(i),
        Value::UInt(u) => SqlValue::UInt(u),
        Value::Float(f) => SqlValue::Float(f64::from(f)),
        Value::Double(f) => SqlValue::Float(f),
        Value::Bytes(b) => match String::from_utf8(b) {
            Ok(text) => SqlValue::Text(text),
            Err(e) => SqlValue::Bytes(e.into_bytes()),
        },
        other => SqlValue::Text(other.as_sql(true).trim_matches('\'').to_string()),
    }
}

fn value(v: &SqlValue) -> Value {
    match v {
        SqlValue::Null => Value::NULL,
        SqlValue::Int(i) => Value::Int(*i),
        SqlValue::UInt(u) => Value::UInt(*u),
        SqlValue::Float(f) => Value::Double(*f),
        SqlValue::Text(t) => Value::Bytes(t.as_bytes().to_vec()),
        SqlValue::Bytes(b) => Value::Bytes(b.clone()),
    }
}

/// The one place MySQL/MariaDB errors are classified.
fn classify(error: mysql_async::Error) -> SinkError {
    let kind = match &error {
        mysql_async::Error::Server(server) => match server.code {
            // Lock wait timeout, deadlock, shutdown in progress, connection killed, gone away,
            // lost, too many connections, query interrupted, read-only during failover.
            // 4031: the server closed an idle session (MySQL 8.0.24+).
            1205 | 1213 | 1053 | 1927 | 2006 | 2013 | 1040 | 1317 | 1290 | 4031 => {
                SinkErrorKind::Transient
            }
            // NOT NULL, duplicate, foreign keys, out of range, truncated, bad date, bad string,
            // too long, check constraint, invalid value for the column type.
            1048 | 1062 | 1216 | 1217 | 1264 | 1265 | 1292 | 1366 | 1406 | 1411 | 1451 | 1452
            | 1690 | 3819 | 4025 => SinkErrorKind::RowRefused,
            _ => SinkErrorKind::Fatal,
        },
        // The driver would not send a packet over `max_allowed_packet`: a retry sends the same
        // (statements are sized to it, `packet.rs`: only a row too large for any can do this).
        error if packet::is_packet_too_large(error) => SinkErrorKind::RowRefused,
        mysql_async::Error::Io(_) => SinkErrorKind::Transient,
        // The connection (or the pool) went away, or the stream lost its framing: a new
        // connection can succeed. Anything else the driver refuses (parameters, packet sizes,
        // authentication plugins, ...) will be refused again.
        mysql_async::Error::Driver(
            DriverError::ConnectionClosed
            | DriverError::PoolDisconnected
            | DriverError::PacketOutOfOrder
            | DriverError::UnexpectedPacket { .. }
            | DriverError::BadCompressedPacketHeader,
        ) => SinkErrorKind::Transient,
        _ => SinkErrorKind::Fatal,
    };
    let message = match &error {
        mysql_async::Error::Server(server) if kind == SinkErrorKind::RowRefused => {
            format!("{} (error {})", server.message, server.code)
        }
        other => other.to_string(),
    };
    SinkError::new(kind, message).caused_by(error)
}

impl MysqlSink {
    pub async fn connect(name: &str, url: &str) -> Result<MysqlSink, SinkError> {
        let redacted = crate::config::redact(url);
        let (url, tls) = ssl::split(&url.replacen("mariadb://", "mysql://", 1))
            .map_err(|e| SinkError::fatal(format!("backend `{name}`: `{redacted}`: {e}")))?;
        let opts = Opts::from_url(&url).map_err(|e| {
            SinkError::fatal(format!(
                "backend `{name}`: `{redacted}` is not a MySQL URL: {e}"
            ))
        })?;
        let address = format!("{}:{}", opts.ip_or_hostname(), opts.tcp_port());
        // Every session is strict, whatever the server's default: a value the column cannot
        // hold is an error (a refused row), never clamped, truncated or filled in. `setup`, not
        // `init`: the pool resets a connection when it is returned (COM_RESET_CONNECTION puts
        // the server's sql_mode back), and only `setup` runs again after a reset.
        let plain: Opts = OptsBuilder::from_opts(opts)
            .setup(vec![STRICT_SESSION, "SET NAMES utf8mb4"])
            .into();
        // TLS required: never switched to the server's local socket, which carries no TLS.
        let required = tls.ssl.is_some() && !tls.plain_allowed;
        let mut builder = OptsBuilder::from_opts(plain.clone()).ssl_opts(tls.ssl.clone());
        if required {
            builder = builder.prefer_socket(false);
        }
        let mut opts: Opts = builder.into();
        if tls.plain_allowed && tls.ssl.is_some() {
            // PREFERRED: plain text only when the server offers no TLS at all.
            match Conn::new(opts.clone()).await {
                Ok(probe) => {
                    let _ = probe.disconnect().await;
                }
                Err(mysql_async::Error::Driver(DriverError::NoClientSslFlagFromServer)) => {
                    opts = plain;
                }
                // Reported by the first connection below, as for any other failure.
                Err(_) => {}
            }
        }
        let pool = Pool::new(opts.clone());
        let sink = MysqlSink {
            name: name.to_string(),
            pool,
            opts,
            session: None,
            unit: None,
            address,
            staging: std::sync::atomic::AtomicBool::new(true),
            stage_engine: staging::StageEngine::ServerDefault,
            max_packet: std::sync::atomic::AtomicUsize::new(DEFAULT_MAX_PACKET),
            tls: tls.describe,
        };
        let mut conn = sink.conn().await?;
        let database: Option<String> = conn
            .query_first("SELECT DATABASE()")
            .await
            .map_err(|e| sink.error(e))?
            .flatten();
        if database.is_none() {
            return Err(SinkError::fatal(format!(
                "backend `{name}`: `{redacted}` names no database; add /<database> to the URL"
            )));
        }
        let stage_engine = staging::StageEngine::probe(&mut conn).await;
        sink.read_max_packet(&mut conn).await?;
        drop(conn);
        Ok(MysqlSink {
            stage_engine,
            ..sink
        })
    }

    /// How the connection is carried, for `check`: the TLS version and cipher, or plain text.
    pub async fn transport(&self) -> Result<String, SinkError> {
        let mut conn = self.conn().await?;
        let status: Vec<(String, String)> = conn
            .query("SHOW SESSION STATUS WHERE Variable_name IN ('Ssl_version', 'Ssl_cipher')")
            .await
            .map_err(|e| self.error(e))?;
        let value = |name: &str| {
            status
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        Ok(match (value("Ssl_version"), value("Ssl_cipher")) {
            (Some(version), cipher) => format!(
                "{version}{} ({})",
                cipher.map(|c| format!(" {c}")).unwrap_or_default(),
                self.tls
            ),
            (None, _) => format!("plain text, no TLS ({})", self.tls),
        })
    }

    /// Where errors happened, as messages name it.
    fn place(&self) -> String {
        format!("backend `{}` ({})", self.name, self.address)
    }

    fn error(&self, e: mysql_async::Error) -> SinkError {
        classify(e).outside_row().context(self.place())
    }

    async fn conn(&self) -> Result<Conn, SinkError> {
        self.pool.get_conn().await.map_err(|e| {
            classify(e).outside_row().context(format!(
                "backend `{}`: cannot connect to {}",
                self.name, self.address
            ))
        })
    }

    /// The batch session: the kept one (checked with a ping after an idle spell: the server
    /// may have closed it), or a new connection.
    async fn session(&mut self) -> Result<Session, SinkError> {
        if let Some(mut session) = self.session.take() {
            if session.used.elapsed() < SESSION_IDLE || session.conn.ping().await.is_ok() {
                return Ok(session);
            }
        }
        let mut conn = Conn::new(self.opts.clone()).await.map_err(|e| {
            classify(e).outside_row().context(format!(
                "backend `{}`: cannot connect to {}",
                self.name, self.address
            ))
        })?;
        self.read_max_packet(&mut conn).await?;
        self.autocommit_off(&mut conn).await?;
        Ok(Session {
            conn,
            used: std::time::Instant::now(),
            stages: Stages::default(),
            new_rows: NewRows::default(),
        })
    }

    /// Turns autocommit off for a batch session: every statement is then inside a transaction
    /// that only `COMMIT` or `ROLLBACK` ends, and a batch's first statement begins it (no
    /// `START TRANSACTION` round trip; one fewer per batch). Checked, since a batch whose
    /// statements committed one by one would not be atomic.
    async fn autocommit_off(&self, conn: &mut Conn) -> Result<(), SinkError> {
        conn.query_drop("SET autocommit = 0")
            .await
            .map_err(|e| self.error(e))?;
        let autocommit: Option<i64> = conn
            .query_first("SELECT @@session.autocommit")
            .await
            .map_err(|e| self.error(e))?;
        // The SELECT began a transaction: ended, so that no read view is held while idle.
        conn.query_drop("COMMIT").await.map_err(|e| self.error(e))?;
        match autocommit {
            Some(0) => Ok(()),
            other => Err(SinkError::fatal(format!(
                "{}: the session's autocommit is {other:?} after SET autocommit = 0; batches cannot be atomic",
                self.place()
            ))),
        }
    }

    /// Reads the server's `max_allowed_packet` (it may have been changed since the last
    /// session: `SET GLOBAL` applies to new sessions).
    async fn read_max_packet(&self, conn: &mut Conn) -> Result<(), SinkError> {
        let size: Option<u64> = conn
            .query_first("SELECT @@max_allowed_packet")
            .await
            .map_err(|e| self.error(e))?;
        let size = size.map_or(DEFAULT_MAX_PACKET, |s| s as usize);
        self.max_packet
            .store(size, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Bytes a statement may take (see `packet.rs`).
    fn statement_budget(&self) -> usize {
        packet::budget(self.max_packet.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The largest chunk of a `LOAD DATA` payload (see `packet.rs`).
    fn infile_chunk(&self) -> usize {
        packet::INFILE_CHUNK.min(self.statement_budget())
    }

    /// Why a row cannot be written by any statement, when its own upsert (whose SQL text
    /// without the row is `fixed` bytes) exceeds the budget.
    fn oversized(&self, fixed: usize, id: &SqlValue, values: &[SqlValue]) -> Option<String> {
        let bytes = fixed
            + row_text_bytes(values.len() + 1)
            + std::iter::once(id)
                .chain(values)
                .map(param_bytes)
                .sum::<usize>();
        let budget = self.statement_budget();
        (bytes > budget).then(|| {
            format!(
                "the row takes about {bytes} bytes in a statement, more than the database's max_allowed_packet allows ({} bytes); raise max_allowed_packet, then `writebehind dlq retry`",
                budget + packet::PACKET_HEADROOM
            )
        })
    }

    fn insert_head(&self, schema: &TableSchema) -> String {
        let mut columns = vec![q(&schema.key_column.name)];
        columns.extend(schema.columns.iter().map(|c| q(&c.name)));
        format!("INSERT INTO {} ({})", q(&schema.table), columns.join(", "))
    }

    fn insert_tail(&self, schema: &TableSchema) -> String {
        let key = q(&schema.key_column.name);
        if schema.columns.is_empty() {
            return format!(" ON DUPLICATE KEY UPDATE {key} = {key}");
        }
        let updates: Vec<String> = schema
            .columns
            .iter()
            .map(|c| format!("{0} = VALUES({0})", q(&c.name)))
            .collect();
        format!(" ON DUPLICATE KEY UPDATE {}", updates.join(", "))
    }
}

impl Destination for MysqlSink {
    async fn prepare(
        &mut self,
        mappings: &[Mapping],
    ) -> Result<Vec<TableSchema>, Vec<SchemaProblem>> {
        let mut conn = self.conn().await.map_err(|e| vec![e.into()])?;
        let mut problems = Vec::new();
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {CHECKPOINT_TABLE} (source VARCHAR(64) NOT NULL, backend VARCHAR(191) NOT NULL, replid CHAR(40), \
             repl_offset BIGINT UNSIGNED, change_seq BIGINT UNSIGNED NOT NULL, \
             buffer_id VARCHAR(64), mappings_id VARCHAR(64), \
             updated_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3), \
             PRIMARY KEY (source, backend)) ENGINE=InnoDB"
        );
        if let Err(e) = conn.query_drop(create).await {
            let message = format!("backend `{}`: cannot create {CHECKPOINT_TABLE}: {e}; grant CREATE or create it by hand", self.name);
            return Err(vec![SinkError::fatal(message).caused_by(e).into()]);
        }
        if let Err(e) = add_identity_columns(&mut conn).await {
            let message = format!("backend `{}`: cannot add the identity columns to {CHECKPOINT_TABLE}: {e}; grant ALTER or add them by hand", self.name);
            return Err(vec![SinkError::fatal(message).caused_by(e).into()]);
        }
        let mut schemas = Vec::new();
        for mapping in mappings {
            if mapping.create_table {
                if let Err(e) = create_table(&mut conn, mapping).await {
                    problems.push(SchemaProblem::CannotCreate {
                        mapping: mapping.name.to_string(),
                        table: mapping.table.clone(),
                        message: e.to_string(),
                    });
                    continue;
                }
            }
            let rows: Vec<(String, String, String, Option<u64>, String, String)> = match conn
                .exec(
                    "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, CHARACTER_MAXIMUM_LENGTH, IS_NULLABLE, COLUMN_KEY \
                     FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                    (mapping.table.clone(),),
                )
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    problems.push(SchemaProblem::Unreadable {
                        mapping: mapping.name.to_string(),
                        table: mapping.table.clone(),
                        message: e.to_string(),
                    });
                    continue;
                }
            };
            if rows.is_empty() {
                problems.push(SchemaProblem::MissingTable {
                    mapping: mapping.name.to_string(),
                    table: mapping.table.clone(),
                    place: format!("backend `{}`", self.name),
                });
                continue;
            }
            let primary_columns = rows.iter().filter(|r| r.5 == "PRI").count();
            let found: HashMap<String, (ColumnInfo, bool)> = rows
                .into_iter()
                .map(
                    |(name, data_type, column_type, max_length, nullable, key)| {
                        let is_key = (key == "PRI" && primary_columns == 1) || key == "UNI";
                        let info = ColumnInfo {
                            name: name.clone(),
                            kind: ColumnType::from_mysql(&data_type, &column_type, max_length),
                            nullable: nullable == "YES",
                        };
                        (name, (info, is_key))
                    },
                )
                .collect();
            match TableSchema::build(mapping, &found) {
                Ok(schema) => {
                    problems.extend(missing_grants(&mut conn, mapping, &schema).await);
                    schemas.push(schema);
                }
                Err(mut p) => problems.append(&mut p),
            }
        }
        if problems.is_empty() {
            Ok(schemas)
        } else {
            Err(problems)
        }
    }

    async fn checkpoints(&mut self) -> Result<Vec<(String, SinkCheckpoint)>, SinkError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(String, u64, Option<String>, Option<String>)> = conn
            .query(format!("SELECT backend, change_seq, buffer_id, mappings_id FROM {CHECKPOINT_TABLE} WHERE source = 'writebehind'"))
            .await
            .map_err(|e| self.error(e))?;
        Ok(rows
            .into_iter()
            .map(|(name, seq, buffer_id, mappings_id)| {
                let row = SinkCheckpoint {
                    seq: ChangeSeq(seq),
                    buffer_id,
                    mappings_id,
                };
                (name, row)
            })
            .collect())
    }

    async fn row_ids(
        &mut self,
        schema: &TableSchema,
        after: Option<&SqlValue>,
        limit: usize,
    ) -> Result<Vec<SqlValue>, SinkError> {
        let mut conn = self.conn().await?;
        let key = q(&schema.key_column.name);
        let table = q(&schema.table);
        let (filter, params) = match after {
            Some(after) => (format!("WHERE {key} > ?"), vec![value(after)]),
            None => (String::new(), Vec::new()),
        };
        let sql = format!("SELECT {key} FROM {table} {filter} ORDER BY {key} LIMIT {limit}");
        let ids: Vec<Value> = conn
            .exec(sql, Params::Positional(params))
            .await
            .map_err(|e| self.error(e))?;
        Ok(ids.into_iter().map(sql_value).collect())
    }

    fn waits_at_commit(&self) -> bool {
        true
    }

    async fn apply(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
        before_commit: &BeforeCommit,
    ) -> Result<Vec<Rejected>, SinkError> {
        let mut session = self.session().await?;
        let result = match self.apply_grouped(&mut session, schemas, batch).await {
            Ok(()) => Ok(Vec::new()),
            Err(e) if e.kind() == SinkErrorKind::RowRefused => {
                self.apply_row_by_row(&mut session.conn, schemas, batch, before_commit)
                    .await
            }
            Err(e) => Err(e.context(self.place())),
        };
        // After a failure the session is not trusted (an open transaction, a broken stream):
        // dropping it closes it, and the server rolls back what it had.
        if result.is_ok() {
            session.used = std::time::Instant::now();
            self.session = Some(session);
        }
        result
    }

    async fn apply_unit_part(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
    ) -> Result<bool, SinkError> {
        let mut session = match self.unit.take() {
            Some(open) => open,
            None => self.session().await?,
        };
        // After a failure the session is dropped: closed, so the server rolls the unit back.
        self.write_rows(&mut session, schemas, batch)
            .await
            .map_err(|e| e.context(self.place()))?;
        self.unit = Some(session);
        Ok(true)
    }

    async fn commit_unit(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
    ) -> Result<(), SinkError> {
        let Some(mut session) = self.unit.take() else {
            return Err(SinkError::transient(format!(
                "{}: the transaction of a long unit is gone",
                self.place()
            )));
        };
        self.write_rows(&mut session, schemas, batch)
            .await
            .map_err(|e| e.context(self.place()))?;
        commit_with_checkpoint(&mut session.conn, batch)
            .await
            .map_err(|e| e.context(self.place()))?;
        session.used = std::time::Instant::now();
        self.session = Some(session);
        Ok(())
    }

    async fn abandon_unit(&mut self) {
        // Dropped: closed, so the server rolls the unit back.
        self.unit = None;
    }
}
