//! The SQLite sink (`sqlite://path`), the embedded default: nothing to run but Redis.
//!
//! The database runs in WAL mode with `synchronous = FULL`, so a committed batch survives a
//! crash. A failed statement inside a transaction only backs out itself in SQLite, so a
//! refused row is skipped without a savepoint and the rest of the batch commits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rusqlite::{params_from_iter, Connection, ErrorCode};

use super::convert::{ColumnType, SqlValue};
use super::SinkCheckpoint;
use super::{
    quote, BeforeCommit, ColumnInfo, Destination, Rejected, RowOp, SchemaProblem, SinkBatch,
    SinkError, SinkErrorKind, TableSchema, CHECKPOINT_TABLE,
};
use crate::capture::mapping::Mapping;
use crate::position::ChangeSeq;

pub struct SqliteSink {
    name: String,
    path: String,
    connection: Arc<Mutex<Connection>>,
    /// Whether the connection holds a long unit's open transaction (`write_unit_part`).
    in_unit: bool,
}

fn q(identifier: &str) -> String {
    quote(identifier, '"')
}

impl rusqlite::ToSql for SqlValue {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value, ValueRef};
        Ok(match self {
            SqlValue::Null => ToSqlOutput::Owned(Value::Null),
            SqlValue::Int(i) => ToSqlOutput::Owned(Value::Integer(*i)),
            SqlValue::UInt(u) => match i64::try_from(*u) {
                Ok(i) => ToSqlOutput::Owned(Value::Integer(i)),
                Err(_) => ToSqlOutput::Owned(Value::Text(u.to_string())),
            },
            SqlValue::Float(f) => ToSqlOutput::Owned(Value::Real(*f)),
            SqlValue::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            SqlValue::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

/// The one place SQLite errors are classified.
fn classify(error: rusqlite::Error) -> SinkError {
    let kind = match error.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation)
        | Some(ErrorCode::TooBig)
        | Some(ErrorCode::TypeMismatch) => SinkErrorKind::RowRefused,
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => SinkErrorKind::Transient,
        _ => SinkErrorKind::Fatal,
    };
    SinkError::new(kind, error.to_string()).caused_by(error)
}

impl SqliteSink {
    pub async fn open(name: &str, path: &str) -> Result<SqliteSink, SinkError> {
        let (name, path) = (name.to_string(), path.to_string());
        let opened = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || -> rusqlite::Result<Connection> {
                let connection = Connection::open(&path)?;
                connection.busy_timeout(std::time::Duration::from_secs(5))?;
                connection.pragma_update(None, "journal_mode", "WAL")?;
                connection.pragma_update(None, "synchronous", "FULL")?;
                Ok(connection)
            })
            .await
            .map_err(|e| SinkError::fatal(format!("backend `{name}`: SQLite worker failed: {e}")))?
        };
        let connection = opened.map_err(|e| {
            SinkError::fatal(format!(
                "backend `{name}`: cannot open SQLite database `{path}`: {e}"
            ))
            .caused_by(e)
        })?;
        Ok(SqliteSink {
            name,
            path,
            connection: Arc::new(Mutex::new(connection)),
            in_unit: false,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> T + Send + 'static,
    ) -> Result<T, SinkError> {
        let connection = self.connection.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = connection
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            work(&mut guard)
        })
        .await
        .map_err(|e| SinkError::fatal(format!("SQLite worker failed: {e}")))
    }
}

/// Columns of a table: name -> (info, is the primary key or has a single-column unique index).
/// Checkpoint tables of earlier versions lack the identity columns.
fn add_identity_columns(connection: &Connection) -> rusqlite::Result<()> {
    let existing = describe(connection, CHECKPOINT_TABLE)?;
    for column in ["buffer_id", "mappings_id"] {
        if !existing.contains_key(column) {
            connection.execute_batch(&format!(
                "ALTER TABLE {CHECKPOINT_TABLE} ADD COLUMN {column} TEXT"
            ))?;
        }
    }
    Ok(())
}

/// A value read back from SQLite.
fn sql_value(value: rusqlite::types::Value) -> SqlValue {
    use rusqlite::types::Value as V;
    match value {
        V::Null => SqlValue::Null,
        V::Integer(i) => SqlValue::Int(i),
        V::Real(f) => SqlValue::Float(f),
        V::Text(t) => SqlValue::Text(t),
        V::Blob(b) => SqlValue::Bytes(b),
    }
}

fn describe(
    connection: &Connection,
    table: &str,
) -> rusqlite::Result<HashMap<String, (ColumnInfo, bool)>> {
    let mut unique = std::collections::HashSet::new();
    {
        let mut indexes = connection.prepare(&format!("PRAGMA index_list({})", q(table)))?;
        let list: Vec<(String, bool)> = indexes
            .query_map([], |row| {
                Ok((row.get::<_, String>(1)?, row.get::<_, bool>(2)?))
            })?
            .collect::<Result<_, _>>()?;
        for (index, is_unique) in list {
            if !is_unique {
                continue;
            }
            let mut info = connection.prepare(&format!("PRAGMA index_info({})", q(&index)))?;
            let columns: Vec<String> = info
                .query_map([], |row| row.get::<_, String>(2))?
                .collect::<Result<_, _>>()?;
            if let [only] = columns.as_slice() {
                unique.insert(only.clone());
            }
        }
    }
    let mut statement = connection.prepare(&format!("PRAGMA table_info({})", q(table)))?;
    let rows: Vec<(String, String, bool, i64)> = statement
        .query_map([], |row| {
            Ok((
                row.get(1)?,
                row.get(2)?,
                row.get::<_, bool>(3)?,
                row.get(5)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    let single_pk = rows.iter().filter(|r| r.3 > 0).count() == 1;
    Ok(rows
        .into_iter()
        .map(|(name, declared, not_null, pk)| {
            let is_key = (pk > 0 && single_pk) || unique.contains(&name);
            (
                name.clone(),
                (
                    ColumnInfo {
                        name,
                        kind: ColumnType::from_sqlite(&declared),
                        nullable: !not_null,
                    },
                    is_key,
                ),
            )
        })
        .collect())
}

fn apply_blocking(
    connection: &mut Connection,
    name: &str,
    schemas: &[TableSchema],
    batch: &SinkBatch,
    before_commit: &BeforeCommit,
) -> Result<Vec<Rejected>, SinkError> {
    let fail = |e: rusqlite::Error| {
        classify(e)
            .outside_row()
            .context(format!("backend `{name}`"))
    };
    let tx = connection.transaction().map_err(fail)?;
    let mut rejected = Vec::new();
    write_rows(&tx, name, schemas, batch, &mut rejected)?;
    write_checkpoint(&tx, batch).map_err(fail)?;
    super::store_refused(before_commit, &rejected, name)?;
    tx.commit().map_err(fail)?;
    Ok(rejected)
}

/// Writes the batch's rows on `connection` (inside its transaction); a row SQLite refuses is
/// skipped (its statement alone is backed out) and reported in `rejected`.
fn write_rows(
    connection: &Connection,
    name: &str,
    schemas: &[TableSchema],
    batch: &SinkBatch,
    rejected: &mut Vec<Rejected>,
) -> Result<(), SinkError> {
    let tx = connection;
    for write in &batch.writes {
        let Some(schema) = schemas.get(write.table) else {
            continue;
        };
        let key = q(&schema.key_column.name);
        let mut run =
            |sql: &str, params: Vec<&SqlValue>| -> Result<(), SinkError> {
                let result = tx
                    .prepare_cached(sql)
                    .and_then(|mut statement| statement.execute(params_from_iter(params)));
                match result {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        let failure = classify(e);
                        match failure.kind() {
                            SinkErrorKind::RowRefused => {
                                rejected.push(Rejected {
                                    seq: write.seq,
                                    reason: failure.reason().to_string(),
                                });
                                Ok(())
                            }
                            SinkErrorKind::Transient => {
                                Err(failure.context(format!("backend `{name}`")))
                            }
                            SinkErrorKind::Fatal => Err(failure
                                .context(format!("backend `{name}`: table `{}`", schema.table))),
                        }
                    }
                }
            };
        let delete = format!("DELETE FROM {} WHERE {key} = ?1", q(&schema.table));
        match &write.op {
            RowOp::Delete { id } => run(&delete, vec![id])?,
            RowOp::Upsert { id, values } => {
                if write.delete_first {
                    run(&delete, vec![id])?;
                }
                let columns: Vec<String> = schema.columns.iter().map(|c| q(&c.name)).collect();
                let placeholders: Vec<String> =
                    (1..=columns.len() + 1).map(|i| format!("?{i}")).collect();
                let update = if columns.is_empty() {
                    "NOTHING".to_string()
                } else {
                    format!(
                        "UPDATE SET {}",
                        columns
                            .iter()
                            .map(|c| format!("{c} = excluded.{c}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                let mut all_columns = vec![key.clone()];
                all_columns.extend(columns);
                let sql = format!(
                    "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT({key}) DO {update}",
                    q(&schema.table),
                    all_columns.join(", "),
                    placeholders.join(", ")
                );
                let mut params = vec![id];
                params.extend(values.iter());
                run(&sql, params)?;
            }
        }
    }
    Ok(())
}

/// Sets the batch's checkpoint rows and deletes its retired ones.
fn write_checkpoint(tx: &Connection, batch: &SinkBatch) -> rusqlite::Result<()> {
    for row in &batch.checkpoint_rows {
        tx.execute(
            &format!(
                "INSERT INTO {CHECKPOINT_TABLE} (source, backend, replid, repl_offset, change_seq, buffer_id, mappings_id, updated_at) VALUES ('writebehind', ?1, ?2, ?3, ?4, ?5, ?6, datetime('now')) \
                 ON CONFLICT(source, backend) DO UPDATE SET replid = excluded.replid, repl_offset = excluded.repl_offset, change_seq = excluded.change_seq, \
                 buffer_id = excluded.buffer_id, mappings_id = excluded.mappings_id, updated_at = excluded.updated_at"
            ),
            rusqlite::params![row, batch.replid, batch.offset.0 as i64, batch.last_seq.0 as i64, batch.buffer_id, batch.mappings_id],
        )?;
    }
    for row in &batch.retire_rows {
        tx.execute(
            &format!(
                "DELETE FROM {CHECKPOINT_TABLE} WHERE source = 'writebehind' AND backend = ?1"
            ),
            [row],
        )?;
    }
    Ok(())
}

/// Writes a part of a long unit in the transaction it keeps open on `connection` (begun by its
/// first part: `starting`), and with `commit` its checkpoint and the commit. Any failure, a
/// refused row included, rolls the unit back.
fn write_unit_part(
    connection: &Connection,
    name: &str,
    schemas: &[TableSchema],
    batch: &SinkBatch,
    (starting, commit): (bool, bool),
) -> Result<(), SinkError> {
    let fail = |e: rusqlite::Error| {
        classify(e)
            .outside_row()
            .context(format!("backend `{name}`"))
    };
    let written = (|| {
        if starting {
            // A transaction an earlier attempt could not roll back is not continued.
            if !connection.is_autocommit() {
                connection.execute_batch("ROLLBACK").map_err(fail)?;
            }
            connection.execute_batch("BEGIN").map_err(fail)?;
        } else if connection.is_autocommit() {
            return Err(SinkError::transient(format!(
                "backend `{name}`: the transaction of a long unit is gone"
            )));
        }
        let mut rejected = Vec::new();
        write_rows(connection, name, schemas, batch, &mut rejected)?;
        if let Some(first) = rejected.first() {
            return Err(SinkError::new(
                SinkErrorKind::RowRefused,
                format!("backend `{name}`: {}", first.reason),
            ));
        }
        if commit {
            write_checkpoint(connection, batch).map_err(fail)?;
            connection.execute_batch("COMMIT").map_err(fail)?;
        }
        Ok(())
    })();
    if written.is_err() && !connection.is_autocommit() {
        let _ = connection.execute_batch("ROLLBACK");
    }
    written
}

impl Destination for SqliteSink {
    async fn prepare(
        &mut self,
        mappings: &[Mapping],
    ) -> Result<Vec<TableSchema>, Vec<SchemaProblem>> {
        let mappings = mappings.to_vec();
        let (name, path) = (self.name.clone(), self.path.clone());
        let result = self
            .blocking(move |connection| {
                let mut problems = Vec::new();
                let mut schemas = Vec::new();
                let create = format!(
                    "CREATE TABLE IF NOT EXISTS {CHECKPOINT_TABLE} (source TEXT NOT NULL, backend TEXT NOT NULL, replid TEXT, repl_offset INTEGER, change_seq INTEGER NOT NULL, buffer_id TEXT, mappings_id TEXT, updated_at TEXT, PRIMARY KEY (source, backend))"
                );
                if let Err(e) = connection.execute_batch(&create).and_then(|()| add_identity_columns(connection)) {
                    let message = format!("backend `{name}` ({path}): cannot create {CHECKPOINT_TABLE}: {e}");
                    return Err(vec![SinkError::fatal(message).caused_by(e).into()]);
                }
                for mapping in &mappings {
                    if mapping.create_table {
                        let mut columns = vec![format!("{} TEXT PRIMARY KEY", q(&mapping.key_column))];
                        columns.extend(mapping.columns.iter().map(|(_, c)| format!("{} TEXT", q(c))));
                        let sql = format!("CREATE TABLE IF NOT EXISTS {} ({})", q(&mapping.table), columns.join(", "));
                        if let Err(e) = connection.execute_batch(&sql) {
                            problems.push(SchemaProblem::CannotCreate {
                                mapping: mapping.name.to_string(),
                                table: mapping.table.clone(),
                                message: e.to_string(),
                            });
                            continue;
                        }
                    }
                    match describe(connection, &mapping.table) {
                        Ok(found) if found.is_empty() => problems.push(SchemaProblem::MissingTable {
                            mapping: mapping.name.to_string(),
                            table: mapping.table.clone(),
                            place: path.clone(),
                        }),
                        Ok(found) => match TableSchema::build(mapping, &found) {
                            Ok(schema) => schemas.push(schema),
                            Err(mut p) => problems.append(&mut p),
                        },
                        Err(e) => problems.push(SchemaProblem::Unreadable {
                            mapping: mapping.name.to_string(),
                            table: mapping.table.clone(),
                            message: e.to_string(),
                        }),
                    }
                }
                if problems.is_empty() {
                    Ok(schemas)
                } else {
                    Err(problems)
                }
            })
            .await;
        result.map_err(|e| vec![e.into()])?
    }

    async fn checkpoints(&mut self) -> Result<Vec<(String, SinkCheckpoint)>, SinkError> {
        let name = self.name.clone();
        self.blocking(move |connection| {
            let read = || -> rusqlite::Result<Vec<(String, SinkCheckpoint)>> {
                let mut statement = connection.prepare(&format!("SELECT backend, change_seq, buffer_id, mappings_id FROM {CHECKPOINT_TABLE} WHERE source = 'writebehind'"))?;
                let rows = statement.query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        SinkCheckpoint {
                            seq: ChangeSeq(row.get::<_, i64>(1)?.max(0) as u64),
                            buffer_id: row.get(2)?,
                            mappings_id: row.get(3)?,
                        },
                    ))
                })?;
                rows.collect()
            };
            read().map_err(|e| SinkError::fatal(format!("backend `{name}`: cannot read {CHECKPOINT_TABLE}: {e}")).caused_by(e))
        })
        .await?
    }

    async fn row_ids(
        &mut self,
        schema: &TableSchema,
        after: Option<&SqlValue>,
        limit: usize,
    ) -> Result<Vec<SqlValue>, SinkError> {
        let (name, key, table) = (
            self.name.clone(),
            q(&schema.key_column.name),
            q(&schema.table),
        );
        let after = after.cloned();
        self.blocking(move |connection| {
            let filter = if after.is_some() {
                format!("WHERE {key} > ?1")
            } else {
                String::new()
            };
            let sql = format!("SELECT {key} FROM {table} {filter} ORDER BY {key} LIMIT {limit}");
            let read = || -> rusqlite::Result<Vec<SqlValue>> {
                let mut statement = connection.prepare(&sql)?;
                let params: Vec<&SqlValue> = after.iter().collect();
                let rows = statement.query_map(params_from_iter(params), |row| {
                    row.get::<_, rusqlite::types::Value>(0)
                })?;
                rows.map(|v| v.map(sql_value)).collect()
            };
            read().map_err(|e| {
                classify(e)
                    .outside_row()
                    .context(format!("backend `{name}`"))
            })
        })
        .await?
    }

    async fn apply(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
        before_commit: &BeforeCommit,
    ) -> Result<Vec<Rejected>, SinkError> {
        let (schemas, batch, name) = (schemas.to_vec(), batch.clone(), self.name.clone());
        let before_commit = before_commit.clone();
        self.blocking(move |connection| {
            apply_blocking(connection, &name, &schemas, &batch, &before_commit)
        })
        .await?
    }

    async fn apply_unit_part(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
    ) -> Result<bool, SinkError> {
        let (schemas, batch, name) = (schemas.to_vec(), batch.clone(), self.name.clone());
        let starting = !self.in_unit;
        let written = self
            .blocking(move |connection| {
                write_unit_part(connection, &name, &schemas, &batch, (starting, false))
            })
            .await
            .and_then(|written| written);
        self.in_unit = written.is_ok();
        written.map(|()| true)
    }

    async fn commit_unit(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
    ) -> Result<(), SinkError> {
        let (schemas, batch, name) = (schemas.to_vec(), batch.clone(), self.name.clone());
        let starting = !self.in_unit;
        self.in_unit = false;
        self.blocking(move |connection| {
            write_unit_part(connection, &name, &schemas, &batch, (starting, true))
        })
        .await?
    }

    async fn abandon_unit(&mut self) {
        self.in_unit = false;
        let _ = self
            .blocking(|connection| {
                if !connection.is_autocommit() {
                    let _ = connection.execute_batch("ROLLBACK");
                }
            })
            .await;
    }
}
