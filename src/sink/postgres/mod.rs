//! The PostgreSQL sink (`postgres://` or `postgresql://`, `tokio-postgres`).
//!
//! A batch is one transaction: `DELETE ... WHERE key = ANY($1)` per table, then one
//! `INSERT ... SELECT ... FROM unnest($1, $2, ...) ON CONFLICT (key) DO UPDATE` of the mapped
//! columns only (one array parameter per column; unmapped columns of an existing row stay as
//! they are), or, from 5,000 upserts into a table on, `COPY` into a stage and one merge
//! (`copy.rs`); then the checkpoint row, then `COMMIT` (`grouped.rs`: without `COPY`, the whole
//! transaction is pipelined, one round trip). Every statement goes with its parameter types
//! (`execute_typed`): no prepare. If the server refuses
//! a row, the transaction is rolled back and replayed row by row, each behind a savepoint, so
//! the refused rows are isolated and the others commit.
//!
//! **Values.** Every value is converted by column type first (`convert.rs`, as for the other
//! backends), then sent as text and cast in the statement to the column's type without its
//! modifier (`$1::text::integer`, `$2::text::numeric`): the server's own input function decides,
//! exactly as `COPY` would, and a value it refuses (`22P02` invalid text, `22003` out of range,
//! `22001` too long for `varchar(n)`, ...) is a refused row. Casting to the base type, never to
//! `varchar(n)` or `numeric(p,s)`, matters: an explicit cast to those truncates or rounds, while
//! assignment to the column refuses a too-long string. Assignment still rounds a number to the
//! column's scale, so a value with more decimal places than `numeric(p,s)` holds is refused here
//! (`schema.rs`). `bytea` columns take the bytes as they are.
//!
//! **Errors** by SQLSTATE (`classify`): data exceptions (class 22) and integrity violations
//! (class 23) refuse the row; a lost connection, `40001`, `40P01`, `57P01`-`57P03`, `53300`,
//! `25006` (read-only during a failover) and class 08 are transient (retried); the rest is
//! fatal.

mod copy;
mod grouped;
mod schema;
mod ssl;
mod unit;

use std::str::FromStr;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use super::convert::SqlValue;
use super::{
    BeforeCommit, Destination, Rejected, RowOp, SchemaProblem, SinkBatch, SinkCheckpoint,
    SinkError, SinkErrorKind, TableSchema, CHECKPOINT_TABLE,
};
use crate::capture::mapping::Mapping;
use crate::position::ChangeSeq;
use grouped::{Grouped, Upserts, UPSERTS_AFTER_A_CONFLICT};
use schema::TableTypes;

/// Parameters per statement stay well under the protocol's 65,535.
const MAX_PARAMETERS: usize = 30_000;

pub struct PostgresSink {
    name: String,
    /// Boxed: it is large, and `Sink` holds one of three backends.
    config: Box<tokio_postgres::Config>,
    address: String,
    /// The connection batches are written on; replaced after it is lost.
    client: Option<Client>,
    /// `sslmode` and the rest (`ssl.rs`; boxed: `Sink` holds one of three backends).
    tls: Box<ssl::PgTls>,
    /// Per mapped table (in schema order): the cast of each column, key first.
    types: Vec<TableTypes>,
    /// Whether large batches may go through `COPY` (it needs the TEMP privilege for its stage).
    copy: bool,
    /// What this connection has set up (boxed: `Sink` holds one of three backends).
    session: Box<Session>,
    /// Batches left to upsert before trying insert-only again ([`UPSERTS_AFTER_A_CONFLICT`]).
    upserts_left: u32,
    /// Whether `client` holds the open transaction of a long unit (`unit.rs`).
    in_unit: bool,
}

/// What a connection has set up, gone with it (temporary tables and prepared statements die
/// with their session).
#[derive(Default)]
struct Session {
    /// The tables whose `COPY` stage this connection has created (`copy.rs`).
    stages: std::sync::Mutex<std::collections::HashSet<usize>>,
    /// Per table, the prepared `COPY` of new rows (`copy.rs`).
    copy_into: std::sync::Mutex<std::collections::HashMap<usize, tokio_postgres::Statement>>,
}

/// An error as one line: the server's message and SQLSTATE when it has them (the driver's own
/// `Display` says only "db error").
pub(super) fn message(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            // The driver's own text omits its cause ("error performing TLS handshake").
            let mut text = error.to_string();
            let mut cause = std::error::Error::source(error);
            while let Some(inner) = cause {
                text.push_str(&format!(": {inner}"));
                cause = inner.source();
            }
            text
        }
    }
}

/// One place PostgreSQL errors are classified (see the module doc).
fn classify(error: tokio_postgres::Error) -> SinkError {
    let kind = match error.code().map(|code| code.code()) {
        Some(code) if code.starts_with("22") || code.starts_with("23") => SinkErrorKind::RowRefused,
        Some("40001" | "40P01" | "57P01" | "57P02" | "57P03" | "53300" | "25006") => {
            SinkErrorKind::Transient
        }
        Some(code) if code.starts_with("08") => SinkErrorKind::Transient,
        Some(_) => SinkErrorKind::Fatal,
        // No SQLSTATE: the connection (closed, or an I/O error on it).
        None if error.is_closed() || std::error::Error::source(&error).is_some() => {
            SinkErrorKind::Transient
        }
        None => SinkErrorKind::Fatal,
    };
    SinkError::new(kind, message(&error)).caused_by(error)
}

/// A value as a statement parameter: text (cast in the statement) or, for a `bytea` column,
/// bytes.
enum Param {
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

impl Param {
    /// `value` for a column (`bytea` or not). A non-UTF-8 value for a text column never gets
    /// here: `TableTypes::refusal` refuses it first.
    fn of(value: &SqlValue, bytea: bool) -> Param {
        let text = match value {
            SqlValue::Null if bytea => return Param::Bytes(None),
            SqlValue::Null => return Param::Text(None),
            SqlValue::Bytes(b) if bytea => return Param::Bytes(Some(b.clone())),
            SqlValue::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
            SqlValue::Int(i) => i.to_string(),
            SqlValue::UInt(u) => u.to_string(),
            SqlValue::Float(f) => f.to_string(),
            SqlValue::Text(t) => t.clone(),
        };
        match bytea {
            true => Param::Bytes(Some(text.into_bytes())),
            false => Param::Text(Some(text)),
        }
    }

    /// The value with its type: statements are sent with their parameter types
    /// (`execute_typed`), one round trip instead of three (prepare, execute, close).
    fn typed(&self) -> (&(dyn ToSql + Sync), Type) {
        match self {
            Param::Text(t) => (t, Type::TEXT),
            Param::Bytes(b) => (b, Type::BYTEA),
        }
    }
}

impl PostgresSink {
    pub async fn connect(name: &str, url: &str) -> Result<PostgresSink, SinkError> {
        let redacted = crate::config::redact(url);
        let (url, tls) = ssl::split(url)
            .map_err(|e| SinkError::fatal(format!("backend `{name}`: `{redacted}`: {e}")))?;
        let mut config = tokio_postgres::Config::from_str(&url).map_err(|e| {
            SinkError::fatal(format!(
                "backend `{name}`: `{redacted}` is not a PostgreSQL URL: {e}"
            ))
        })?;
        config.ssl_mode(tls.mode);
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        if config.get_dbname().is_none() {
            return Err(SinkError::fatal(format!(
                "backend `{name}`: `{redacted}` names no database; add /<database> to the URL"
            )));
        }
        let mut sink = PostgresSink {
            name: name.to_string(),
            config: Box::new(config),
            address: format!("{host}:{port}"),
            client: None,
            tls: Box::new(tls),
            types: Vec::new(),
            copy: true,
            session: Default::default(),
            upserts_left: 0,
            in_unit: false,
        };
        let temporary = sink
            .client()
            .await?
            .query_one(
                "SELECT has_database_privilege(current_database(), 'TEMP')",
                &[],
            )
            .await
            .and_then(|row| row.try_get::<_, bool>(0));
        sink.copy = temporary.unwrap_or(false);
        Ok(sink)
    }

    fn place(&self) -> String {
        format!("backend `{}` ({})", self.name, self.address)
    }

    fn error(&self, e: tokio_postgres::Error) -> SinkError {
        classify(e).outside_row().context(self.place())
    }

    /// The connection: the kept one, or a new one when there is none or it was lost.
    async fn client(&mut self) -> Result<&Client, SinkError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let connector = self.tls.connector.clone();
            let (client, connection) = self.config.connect(connector).await.map_err(|e| {
                classify(e).outside_row().context(format!(
                    "backend `{}`: cannot connect to {}",
                    self.name, self.address
                ))
            })?;
            let name = self.name.clone();
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(backend = %name, %error, "PostgreSQL connection ended");
                }
            });
            self.client = Some(client);
            // Temporary tables and prepared statements die with their session.
            self.session
                .stages
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            self.forget_copies();
        }
        self.client
            .as_ref()
            .ok_or_else(|| SinkError::transient("the PostgreSQL connection is gone"))
    }

    /// The slow path after a refused row: each row behind a savepoint.
    async fn apply_row_by_row(
        &self,
        client: &Client,
        batch: &SinkBatch,
        before_commit: &BeforeCommit,
    ) -> Result<Vec<Rejected>, SinkError> {
        let err = |e: tokio_postgres::Error| self.error(e);
        client.batch_execute("BEGIN").await.map_err(err)?;
        let mut rejected = Vec::new();
        for write in &batch.writes {
            let Some(types) = self.types.get(write.table) else {
                continue;
            };
            let mut statements: Vec<(String, Vec<Param>)> = Vec::new();
            let delete = |id: &SqlValue| (types.delete_one(), types.params(id, &[]));
            match &write.op {
                RowOp::Delete { id } => statements.push(delete(id)),
                RowOp::Upsert { id, values } => {
                    if let Some(reason) = types.refusal(id, values) {
                        rejected.push(Rejected {
                            seq: write.seq,
                            reason,
                        });
                        continue;
                    }
                    if write.delete_first {
                        statements.push(delete(id));
                    }
                    statements.push((types.upsert(1), types.params(id, values)));
                }
            }
            client
                .batch_execute("SAVEPOINT writebehind_row")
                .await
                .map_err(err)?;
            let mut refused = None;
            for (sql, params) in statements {
                let typed: Vec<_> = params.iter().map(Param::typed).collect();
                if let Err(e) = client.execute_typed(&sql, &typed).await {
                    let failure = classify(e);
                    if failure.kind() != SinkErrorKind::RowRefused {
                        return Err(failure.context(self.place()));
                    }
                    refused = Some(failure.reason().to_string());
                    break;
                }
            }
            let end = match refused {
                Some(reason) => {
                    rejected.push(Rejected {
                        seq: write.seq,
                        reason,
                    });
                    "ROLLBACK TO SAVEPOINT writebehind_row"
                }
                None => "RELEASE SAVEPOINT writebehind_row",
            };
            client.batch_execute(end).await.map_err(err)?;
        }
        let numbers = grouped::CheckpointNumbers::of(batch);
        grouped::run_in_turn(client, &grouped::checkpoint_statements(batch, &numbers))
            .await
            .map_err(err)?;
        super::store_refused(before_commit, &rejected, &self.name)?;
        batch.commit_gate.wait().await?;
        client.batch_execute("COMMIT").await.map_err(err)?;
        Ok(rejected)
    }
}

impl PostgresSink {
    /// Makes sure the statements of `schemas` are known: a partition's sink was not prepared
    /// itself (`runner.rs` prepares the first and hands the schemas to the others).
    async fn types_for(&mut self, schemas: &[TableSchema]) -> Result<(), SinkError> {
        let known = self.types.len() == schemas.len()
            && self
                .types
                .iter()
                .zip(schemas)
                .all(|(t, s)| t.table == s.table);
        if !known {
            let client = self.client().await?;
            let types = schema::types_of(client, schemas)
                .await
                .map_err(|e| SinkError::fatal(format!("{}: {e}", self.place())))?;
            self.types = types;
            self.forget_copies();
        }
        Ok(())
    }

    /// Drops the prepared `COPY`s: a new session, or tables whose indexes may have moved.
    fn forget_copies(&self) {
        self.session
            .copy_into
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// How the connection is carried, for `check`: TLS (version, the certificate, what it was
    /// verified against) or plain text.
    pub async fn transport(&mut self) -> Result<String, SinkError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .map_err(|e| self.error(e))?;
        let ssl: bool = row.try_get(0).map_err(|e| self.error(e))?;
        let version: Option<String> = row.try_get(1).map_err(|e| self.error(e))?;
        let seen = self
            .tls
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(match (ssl, seen) {
            (true, Some((subject, issuer))) => format!(
                "{}, certificate `{subject}` issued by `{issuer}` ({})",
                version.unwrap_or_else(|| "TLS".into()),
                self.tls.describe
            ),
            (true, None) => format!(
                "{} ({})",
                version.unwrap_or_else(|| "TLS".into()),
                self.tls.describe
            ),
            (false, _) => format!("plain text, no TLS ({})", self.tls.describe),
        })
    }

    /// What `check` mentions without failing: a slower path taken.
    pub fn notes(&self) -> Vec<String> {
        match self.copy {
            true => Vec::new(),
            false => vec![format!(
                "backend `{}`: the database user may not create temporary tables (TEMP): batches of {} rows or more are written with multi-row INSERT (slower)",
                self.name,
                copy::COPY_THRESHOLD
            )],
        }
    }
}

impl Destination for PostgresSink {
    async fn prepare(
        &mut self,
        mappings: &[Mapping],
    ) -> Result<Vec<TableSchema>, Vec<SchemaProblem>> {
        let name = self.name.clone();
        let client = self.client().await.map_err(|e| vec![e.into()])?;
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {CHECKPOINT_TABLE} (source VARCHAR(64) NOT NULL, backend VARCHAR(191) NOT NULL, \
             replid CHAR(40), repl_offset BIGINT, change_seq BIGINT NOT NULL, buffer_id VARCHAR(64), mappings_id VARCHAR(64), \
             updated_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (source, backend))"
        );
        // Created only when missing: CREATE TABLE IF NOT EXISTS needs the CREATE privilege
        // even when the table exists (an administrator may have created it).
        let exists = client
            .query_one(
                &format!("SELECT to_regclass('{CHECKPOINT_TABLE}') IS NOT NULL"),
                &[],
            )
            .await
            .and_then(|row| row.try_get::<_, bool>(0));
        if let Err(e) = match exists {
            Ok(true) => Ok(()),
            Ok(false) => client.batch_execute(&create).await,
            Err(e) => Err(e),
        } {
            let text = format!("backend `{name}`: cannot create {CHECKPOINT_TABLE}: {}; grant CREATE on the schema or create it by hand", message(&e));
            return Err(vec![SinkError::fatal(text).caused_by(e).into()]);
        }
        let (schemas, types) = schema::read_all(client, &name, mappings).await?;
        self.types = types;
        self.forget_copies();
        Ok(schemas)
    }

    async fn checkpoints(&mut self) -> Result<Vec<(String, SinkCheckpoint)>, SinkError> {
        let sql = format!("SELECT backend, change_seq, buffer_id, mappings_id FROM {CHECKPOINT_TABLE} WHERE source = 'writebehind'");
        let rows = match self.client().await?.query(&sql, &[]).await {
            Ok(rows) => rows,
            Err(e) => return Err(self.error(e)),
        };
        let mut found = Vec::new();
        for row in rows {
            let seq: i64 = row.try_get(1).map_err(|e| self.error(e))?;
            let checkpoint = SinkCheckpoint {
                seq: ChangeSeq(u64::try_from(seq).unwrap_or(0)),
                buffer_id: row.try_get(2).map_err(|e| self.error(e))?,
                mappings_id: row.try_get(3).map_err(|e| self.error(e))?,
            };
            found.push((row.try_get(0).map_err(|e| self.error(e))?, checkpoint));
        }
        Ok(found)
    }

    async fn row_ids(
        &mut self,
        schema: &TableSchema,
        after: Option<&SqlValue>,
        limit: usize,
    ) -> Result<Vec<SqlValue>, SinkError> {
        let types = match self.types.iter().find(|t| t.table == schema.table) {
            Some(types) => types.clone(),
            None => {
                let client = self.client().await?;
                let mut types = schema::types_of(client, std::slice::from_ref(schema))
                    .await
                    .map_err(|e| SinkError::fatal(format!("{}: {e}", self.place())))?;
                types.remove(0)
            }
        };
        let after = after.map(|id| types.params(id, &[]).remove(0));
        let sql = types.ids_after(after.is_some(), limit);
        let params: Vec<_> = after.iter().map(Param::typed).collect();
        let rows = match self.client().await?.query_typed(&sql, &params).await {
            Ok(rows) => rows,
            Err(e) => return Err(self.error(e)),
        };
        let mut ids = Vec::with_capacity(rows.len());
        for row in rows {
            let text: Option<String> = row.try_get(0).map_err(|e| self.error(e))?;
            // As a Redis key converts: the reconciliation compares the two.
            let id = super::convert::convert(
                &schema.key_column.kind,
                &schema.key_column.name,
                text.as_deref().map(str::as_bytes),
            )
            .map_err(|refusal| SinkError::fatal(refusal.0))?;
            ids.push(id);
        }
        Ok(ids)
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
        self.types_for(schemas).await?;
        // Never a write without its table's statements: it would be skipped silently.
        if let Some(write) = batch.writes.iter().find(|w| w.table >= self.types.len()) {
            return Err(SinkError::fatal(format!(
                "{}: a write to table {} of {} prepared; this is a bug, restart the service",
                self.place(),
                write.table,
                self.types.len()
            )));
        }
        let Some(client) = self.client.as_ref() else {
            return Err(SinkError::transient("the PostgreSQL connection is gone"));
        };
        let mode = match self.upserts_left {
            0 => Upserts::InsertOnly,
            _ => Upserts::Upsert,
        };
        let mut attempt = self.apply_grouped(client, batch, mode).await;
        let mut upserts_left = self.upserts_left.saturating_sub(1);
        if matches!(attempt, Ok(Grouped::KeyExists)) {
            upserts_left = UPSERTS_AFTER_A_CONFLICT;
            // A stage created by the rolled-back attempt is gone with it.
            self.session
                .stages
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            attempt = self.apply_grouped(client, batch, Upserts::Upsert).await;
        }
        let result = match attempt {
            Ok(Grouped::Written) => Ok(Vec::new()),
            Ok(Grouped::KeyExists) => Err(SinkError::fatal(format!(
                "{}: an upsert reported an existing key; this is a bug, restart the service",
                self.place()
            ))),
            Err(e) if e.kind() == SinkErrorKind::RowRefused => {
                // A stage created by the rolled-back transaction is gone with it.
                self.session
                    .stages
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
                self.apply_row_by_row(client, batch, before_commit).await
            }
            Err(e) => Err(e.context(self.place())),
        };
        self.upserts_left = upserts_left;
        if result.is_err() {
            // Not trusted after a failure (a transaction may be open): a new connection next.
            self.client = None;
        }
        result
    }

    async fn apply_unit_part(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
    ) -> Result<bool, SinkError> {
        self.write_unit_part(schemas, batch, false).await?;
        Ok(true)
    }

    async fn commit_unit(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
    ) -> Result<(), SinkError> {
        self.write_unit_part(schemas, batch, true).await
    }

    async fn abandon_unit(&mut self) {
        self.abandon_unit_transaction();
    }
}
