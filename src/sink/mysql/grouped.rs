//! The fast path of a batch: a few multi-row statements in few round trips (the transaction
//! begins with its first statement; a large batch of new rows is loaded straight into its
//! table and one holding existing keys is staged and merged, `new_rows.rs`, `staging.rs`),
//! then the checkpoint rows with the `COMMIT`. A warning or a refused row rolls the batch back
//! for the row-by-row path (`row_by_row.rs`).

use mysql_async::prelude::Queryable;
use mysql_async::{Params, Value};

use super::packet::{self, param_bytes, row_text_bytes};
use super::staging::{no_warnings, StageError};
use super::{
    classify, commit_with_checkpoint, q, value, MysqlSink, Session, MAX_PLACEHOLDERS,
    STAGE_THRESHOLD,
};
use crate::sink::convert::SqlValue;
use crate::sink::{SinkBatch, SinkError, SinkErrorKind, TableSchema};

impl MysqlSink {
    /// The fast path: a few multi-row statements, in few round trips: the transaction begins
    /// with its first statement, a staged table is loaded and merged in one query
    /// (`staging.rs`), and the checkpoint rows go with the `COMMIT`.
    pub(super) async fn apply_grouped(
        &self,
        session: &mut Session,
        schemas: &[TableSchema],
        batch: &SinkBatch,
    ) -> Result<(), SinkError> {
        // A transaction by hand (not `Transaction`), so that the connection's LOCAL INFILE
        // handler can be set for the staged path, and statements sent together: the session
        // runs with autocommit off, so the first statement begins it (`Self::session`).
        let result = self.write_grouped(session, schemas, batch).await;
        let conn = &mut session.conn;
        match result {
            Ok(()) => Ok(()),
            Err(failure) => match conn.query_drop("ROLLBACK").await {
                Ok(()) => Err(failure),
                // The session cannot be trusted to be outside a transaction (the row-by-row
                // replay would start one inside it): it is dropped, the batch retried.
                Err(e) => Err(SinkError::transient(format!(
                    "ROLLBACK after `{failure}` failed: {e}"
                ))),
            },
        }
    }

    /// Writes the batch and commits it (with its checkpoint rows, in the same query as the
    /// `COMMIT`).
    pub(super) async fn write_grouped(
        &self,
        session: &mut Session,
        schemas: &[TableSchema],
        batch: &SinkBatch,
    ) -> Result<(), SinkError> {
        self.write_rows(session, schemas, batch).await?;
        commit_with_checkpoint(&mut session.conn, batch).await
    }

    /// Writes the batch's rows in the session's transaction (begun by the first statement).
    pub(super) async fn write_rows(
        &self,
        session: &mut Session,
        schemas: &[TableSchema],
        batch: &SinkBatch,
    ) -> Result<(), SinkError> {
        let Session {
            conn,
            stages,
            new_rows,
            ..
        } = session;
        for (index, schema) in schemas.iter().enumerate() {
            let crate::sink::TableWrites { deletes, upserts } =
                crate::sink::TableWrites::of(batch, index);
            let deletes: Vec<Value> = deletes.into_iter().map(value).collect();
            let budget = self.statement_budget();
            let delete_head = 64 + schema.table.len() + schema.key_column.name.len();
            for chunk in packet::runs(&deletes, delete_head, budget, MAX_PLACEHOLDERS, |id| {
                2 + match id {
                    Value::Bytes(bytes) => 11 + bytes.len(),
                    _ => 19,
                }
            }) {
                let sql = format!(
                    "DELETE FROM {} WHERE {} IN ({})",
                    q(&schema.table),
                    q(&schema.key_column.name),
                    vec!["?"; chunk.len()].join(",")
                );
                conn.exec_drop(sql, Params::Positional(chunk.to_vec()))
                    .await
                    .map_err(classify)?;
            }
            // A row no statement can carry is refused on every path: the row-by-row replay
            // dead-letters it with the reason.
            let fixed = self.insert_head(schema).len() + self.insert_tail(schema).len();
            if let Some(reason) = upserts
                .iter()
                .find_map(|(id, values)| self.oversized(fixed, id, values))
            {
                return Err(SinkError::new(SinkErrorKind::RowRefused, reason));
            }
            if upserts.len() >= STAGE_THRESHOLD
                && self.staging.load(std::sync::atomic::Ordering::Relaxed)
            {
                let staged = match self
                    .write_new_rows(conn, new_rows, index, schema, &upserts)
                    .await
                {
                    Ok(true) => continue,
                    Ok(false) => {
                        self.stage_and_merge(conn, stages, index, schema, &upserts)
                            .await
                    }
                    Err(e) => Err(e),
                };
                match staged {
                    Ok(()) => continue,
                    Err(StageError::Failed(failure)) if failure.kind() != SinkErrorKind::Fatal => {
                        return Err(failure)
                    }
                    // LOCAL INFILE refused, or staging impossible here (a missing privilege):
                    // statements from now on; the batch is redone.
                    Err(StageError::Unavailable(message)) => {
                        return Err(self.stop_staging(message));
                    }
                    Err(StageError::Failed(failure)) => {
                        return Err(self.stop_staging(failure.to_string()));
                    }
                }
            }
            let width = schema.columns.len() + 1;
            let row_bytes = |(id, values): &(&SqlValue, &Vec<SqlValue>)| {
                row_text_bytes(width)
                    + std::iter::once(*id)
                        .chain(values.iter())
                        .map(param_bytes)
                        .sum::<usize>()
            };
            for chunk in packet::runs(&upserts, fixed, budget, MAX_PLACEHOLDERS / width, row_bytes)
            {
                let row = format!("({})", vec!["?"; width].join(","));
                let sql = format!(
                    "{} VALUES {}{}",
                    self.insert_head(schema),
                    vec![row; chunk.len()].join(","),
                    self.insert_tail(schema)
                );
                let params: Vec<Value> = chunk
                    .iter()
                    .flat_map(|(id, values)| std::iter::once(*id).chain(values.iter()).map(value))
                    .collect();
                conn.exec_drop(sql, Params::Positional(params))
                    .await
                    .map_err(classify)?;
                no_warnings(conn.get_warnings(), "a multi-row INSERT")?;
            }
        }
        Ok(())
    }

    /// Staging failed in a way retrying cannot fix: statements for the life of the process.
    /// The batch is redone with them (reported as a transient failure, retried at once).
    fn stop_staging(&self, message: String) -> SinkError {
        tracing::warn!(backend = %self.name, %message, "large batches cannot be staged with LOAD DATA LOCAL INFILE; writing them with multi-row INSERT");
        self.staging
            .store(false, std::sync::atomic::Ordering::Relaxed);
        SinkError::transient(format!(
            "staging stopped ({message}); the batch is redone with statements"
        ))
    }
}
