//! The staged path of large batches: `LOAD DATA LOCAL INFILE` into a per-connection temporary
//! table, then one `INSERT ... SELECT ... ON DUPLICATE KEY UPDATE` into the mapped table.
//!
//! It must be exactly as strict as the statement path (docs/design.md section 8.2): the staging
//! columns are wide (`LONGTEXT CHARACTER SET utf8mb4`, `LONGBLOB` for binary columns, all
//! nullable), so loading never converts, clamps or fills in a value; every conversion happens in
//! the `INSERT ... SELECT`, under the session's strict `sql_mode`, where a value out of range, a
//! bad date, a `NULL` for a `NOT NULL` column, a value outside an `ENUM` or text the column's
//! character set cannot hold is an error, as it is for a statement. Any warning is treated as a
//! refusal too (the batch is redone row by row).
//!
//! The staging table is `ENGINE=Aria` where the server has Aria (MariaDB): measured on MariaDB
//! 10.11, 200 batches of 1,000 rows staged through an Aria table ran at 170-233k rows/s, through
//! the default InnoDB temporary table at 52-67k (docs/benchmarks.md). A stage needs no
//! transactions: it is emptied before every load and read only inside the batch's transaction,
//! and a rolled-back batch leaves nothing in the target table. Elsewhere (MySQL) the server's
//! default temporary engine is used.

use futures_util::StreamExt;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::statements::Statements;
use super::{classify, q, MysqlSink};
use crate::sink::convert::{ColumnType, SqlValue};
use crate::sink::{SinkError, SinkErrorKind, TableSchema};

/// Why staging did not write the rows.
pub(super) enum StageError {
    /// LOCAL INFILE is disabled on the server or the client (1148, 3948): statements, for good.
    Unavailable(String),
    /// The rows (or the server) refused: transient errors are retried, refused rows are
    /// isolated row by row, anything else falls back to statements.
    Failed(SinkError),
}

impl From<mysql_async::Error> for StageError {
    fn from(e: mysql_async::Error) -> StageError {
        match &e {
            mysql_async::Error::Server(server) if matches!(server.code, 1148 | 3948) => {
                StageError::Unavailable(e.to_string())
            }
            _ => StageError::Failed(classify(e)),
        }
    }
}

/// The engine staging tables are created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StageEngine {
    Aria,
    ServerDefault,
}

impl StageEngine {
    /// Aria when the server supports it, the server's default otherwise (or when it cannot
    /// tell).
    pub(super) async fn probe(conn: &mut Conn) -> StageEngine {
        let aria: Option<String> = conn
            .query_first(
                "SELECT SUPPORT FROM information_schema.ENGINES WHERE ENGINE = 'Aria' AND SUPPORT IN ('YES', 'DEFAULT')",
            )
            .await
            .ok()
            .flatten();
        match aria {
            Some(_) => StageEngine::Aria,
            None => StageEngine::ServerDefault,
        }
    }

    fn clause(self) -> &'static str {
        match self {
            StageEngine::Aria => " ENGINE=Aria",
            StageEngine::ServerDefault => "",
        }
    }
}

/// The staging column type for a mapped column: wide enough to hold any value unconverted.
fn staging_type(kind: &ColumnType) -> &'static str {
    match kind {
        ColumnType::Binary { .. } => "LONGBLOB",
        _ => "LONGTEXT CHARACTER SET utf8mb4",
    }
}

/// A statement's warnings count as a refusal: the batch is redone row by row, where the same
/// value gets the same answer as a single row would.
pub(super) fn no_warnings(warnings: u16, what: &str) -> Result<(), SinkError> {
    match warnings {
        0 => Ok(()),
        n => Err(SinkError::new(
            SinkErrorKind::RowRefused,
            format!("{what} gave {n} warnings"),
        )),
    }
}

/// MySQL's warning that a syntax is deprecated (8.0.20 on: `VALUES()` in `ON DUPLICATE KEY
/// UPDATE`): about the statement, not the row's values.
const DEPRECATED_SYNTAX: u32 = 1287;

/// Why a row's statement, which succeeded with `warnings`, is refused: the server's own words
/// (`SHOW WARNINGS`), so that the dead letter says which column and what it would have become;
/// `None` when every warning is about the statement's syntax, not the values. A strict
/// session still answers some alterations with a note rather than an error (a decimal rounded
/// to its column's scale, 1265): the row is refused all the same.
pub(super) async fn altered_row_reason<Q: Queryable>(
    conn: &mut Q,
    warnings: u16,
) -> Result<Option<String>, mysql_async::Error> {
    let said: Vec<(String, u32, String)> = conn.query("SHOW WARNINGS").await?;
    let said: Vec<String> = said
        .into_iter()
        .filter(|(_, code, _)| *code != DEPRECATED_SYNTAX)
        .map(|(level, code, message)| format!("{level} {code}: {message}"))
        .collect();
    Ok((!said.is_empty()).then(|| {
        format!(
            "the database would not store the row exactly as sent ({warnings} warnings: {})",
            said[..said.len().min(3)].join("; ")
        )
    }))
}

impl MysqlSink {
    /// Why large batches cannot be staged here (for `check`): the server refuses LOCAL INFILE,
    /// or the user may not create temporary tables. Batches are then written with statements.
    pub async fn staging_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let Ok(mut conn) = self.pool.get_conn().await else {
            return notes;
        };
        let local_infile: Option<i64> = conn
            .query_first("SELECT @@GLOBAL.local_infile")
            .await
            .ok()
            .flatten();
        if local_infile == Some(0) {
            notes.push(format!("backend `{}`: the server has local_infile = 0: batches of {} rows or more are written with multi-row INSERT (slower)", self.name, super::STAGE_THRESHOLD));
        }
        let probe = "CREATE TEMPORARY TABLE writebehind_probe (x INT)";
        match conn.query_drop(probe).await {
            Ok(()) => {
                let _ = conn
                    .query_drop("DROP TEMPORARY TABLE writebehind_probe")
                    .await;
            }
            Err(e) => notes.push(format!("backend `{}`: the database user may not CREATE TEMPORARY TABLES ({e}): batches of {} rows or more are written with multi-row INSERT (slower)", self.name, super::STAGE_THRESHOLD)),
        }
        notes
    }

    /// Loads `upserts` for table `index` (`schema`) and merges them inside the batch's
    /// transaction (mapped columns only, as the multi-row INSERT), in one query: the stage
    /// (re)created or emptied only when [`Stages`] says it must be, the load, the merge, and
    /// the stage emptied again.
    pub(super) async fn stage_and_merge(
        &self,
        conn: &mut Conn,
        stages: &mut Stages,
        index: usize,
        schema: &TableSchema,
        upserts: &[(&SqlValue, &Vec<SqlValue>)],
    ) -> Result<(), StageError> {
        // Named by index: a table name may be up to 64 characters, as is the stage's.
        let stage = q(&format!("writebehind_stage_{index}"));
        let mut columns = vec![q(&schema.key_column.name)];
        columns.extend(schema.columns.iter().map(|c| q(&c.name)));
        let column_list = columns.join(", ");
        let mut definitions = vec![format!(
            "{} {}",
            q(&schema.key_column.name),
            staging_type(&schema.key_column.kind)
        )];
        definitions.extend(
            schema
                .columns
                .iter()
                .map(|c| format!("{} {}", q(&c.name), staging_type(&c.kind))),
        );
        let definitions = format!("({}){}", definitions.join(", "), self.stage_engine.clause());
        let mut statements = Statements::default();
        stages.prepare(index, &stage, definitions, &mut statements);
        let chunks = infile_payload(upserts, self.infile_chunk());
        conn.set_infile_handler(async move { Ok(futures_util::stream::iter(chunks).boxed()) });
        let load = statements.push(format!("LOAD DATA LOCAL INFILE 'writebehind-batch' INTO TABLE {stage} CHARACTER SET binary ({column_list})"));
        // The statement path's upsert, its rows selected from the stage.
        let merge = statements.push(format!(
            "{} SELECT {column_list} FROM {stage}{}",
            self.insert_head(schema),
            self.insert_tail(schema)
        ));
        statements.push(format!("DELETE FROM {stage}"));
        let answers = statements.run(conn).await.map_err(StageError::from)?;
        stages.emptied(index);
        no_warnings(answers[load].warnings, "loading the stage").map_err(StageError::Failed)?;
        no_warnings(answers[merge].warnings, "merging the stage").map_err(StageError::Failed)
    }
}

/// What a session's staging tables hold, so that a batch neither re-creates nor empties a stage
/// it knows to be ready. A stage is *dirty* from the moment a load is sent until the query that
/// merges and empties it has answered in full: after any failure in between (the session kept,
/// the batch redone row by row) the next load empties it first. The stages are temporary
/// tables: they end with the session, and so does this record of them.
#[derive(Debug, Default)]
pub(super) struct Stages {
    /// By table index: the stage's column definitions, and whether it may hold rows.
    ready: std::collections::HashMap<usize, (String, bool)>,
}

impl Stages {
    /// Adds to `statements` what makes stage `index` (named `stage`) an empty table with
    /// `definitions`, and marks it dirty.
    fn prepare(
        &mut self,
        index: usize,
        stage: &str,
        definitions: String,
        statements: &mut Statements,
    ) {
        match self.ready.get(&index) {
            Some((known, dirty)) if *known == definitions => {
                if *dirty {
                    statements.push(format!("DELETE FROM {stage}"));
                }
            }
            // Not made by this session, or made for other columns (the mappings changed).
            _ => {
                statements.push(format!("DROP TEMPORARY TABLE IF EXISTS {stage}"));
                statements.push(format!("CREATE TEMPORARY TABLE {stage} {definitions}"));
            }
        }
        self.ready.insert(index, (definitions, true));
    }

    /// Stage `index` was merged and emptied.
    fn emptied(&mut self, index: usize) {
        if let Some((_, dirty)) = self.ready.get_mut(&index) {
            *dirty = false;
        }
    }
}

/// `upserts` (key first, then the mapped columns) as a `LOAD DATA` payload in its default
/// format, in chunks of at most `chunk` bytes: one packet each, within the server's
/// `max_allowed_packet` (`packet.rs`).
pub(super) fn infile_payload(
    upserts: &[(&SqlValue, &Vec<SqlValue>)],
    chunk: usize,
) -> Vec<std::io::Result<bytes::Bytes>> {
    let mut data = Vec::with_capacity(upserts.len() * 64);
    for (id, values) in upserts {
        for (i, v) in std::iter::once(*id).chain(values.iter()).enumerate() {
            if i > 0 {
                data.push(b'\t');
            }
            infile_field(&mut data, v);
        }
        data.push(b'\n');
    }
    let payload = bytes::Bytes::from(data);
    let chunk = chunk.max(1);
    (0..payload.len())
        .step_by(chunk)
        .map(|at| Ok(payload.slice(at..(at + chunk).min(payload.len()))))
        .collect()
}

/// One field in LOAD DATA's default format: `\N` for NULL; tab, newline, backslash and NUL
/// escaped with a backslash.
fn infile_field(out: &mut Vec<u8>, value: &SqlValue) {
    let raw: std::borrow::Cow<'_, [u8]> = match value {
        SqlValue::Null => {
            out.extend_from_slice(b"\\N");
            return;
        }
        SqlValue::Int(i) => i.to_string().into_bytes().into(),
        SqlValue::UInt(u) => u.to_string().into_bytes().into(),
        SqlValue::Float(f) => f.to_string().into_bytes().into(),
        SqlValue::Text(t) => t.as_bytes().into(),
        SqlValue::Bytes(b) => b.as_slice().into(),
    };
    for &b in raw.iter() {
        match b {
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0 => out.extend_from_slice(b"\\0"),
            _ => out.push(b),
        }
    }
}
