//! The slow path of a batch with a refused row: one transaction, each row behind a savepoint,
//! so that a row the server refuses (an error, or a warning about its values: never written
//! altered) is rolled back alone and dead-lettered with the server's words, and the others
//! commit with the checkpoint.

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Params, TxOpts, Value};

use super::staging::altered_row_reason;
use super::statements::{push_checkpoint, Statements};
use super::{classify, q, value, MysqlSink};
use crate::sink::{
    BeforeCommit, Rejected, RowOp, SinkBatch, SinkError, SinkErrorKind, TableSchema,
};

impl MysqlSink {
    /// The slow path after a refused row: each row behind a savepoint.
    pub(super) async fn apply_row_by_row(
        &self,
        conn: &mut Conn,
        schemas: &[TableSchema],
        batch: &SinkBatch,
        before_commit: &BeforeCommit,
    ) -> Result<Vec<Rejected>, SinkError> {
        let err = |e: mysql_async::Error| self.error(e);
        let mut tx = conn
            .start_transaction(TxOpts::default())
            .await
            .map_err(err)?;
        let mut rejected = Vec::new();
        for write in &batch.writes {
            let Some(schema) = schemas.get(write.table) else {
                continue;
            };
            let delete = format!(
                "DELETE FROM {} WHERE {} = ?",
                q(&schema.table),
                q(&schema.key_column.name)
            );
            let mut statements: Vec<(String, Vec<Value>)> = Vec::new();
            match &write.op {
                RowOp::Delete { id } => statements.push((delete, vec![value(id)])),
                RowOp::Upsert { id, values } => {
                    let fixed = self.insert_head(schema).len() + self.insert_tail(schema).len();
                    if let Some(reason) = self.oversized(fixed, id, values) {
                        rejected.push(Rejected {
                            seq: write.seq,
                            reason,
                        });
                        continue;
                    }
                    if write.delete_first {
                        statements.push((delete, vec![value(id)]));
                    }
                    let row = format!("({})", vec!["?"; values.len() + 1].join(","));
                    let sql = format!(
                        "{} VALUES {row}{}",
                        self.insert_head(schema),
                        self.insert_tail(schema)
                    );
                    statements.push((
                        sql,
                        std::iter::once(id)
                            .chain(values.iter())
                            .map(value)
                            .collect(),
                    ));
                }
            }
            tx.query_drop("SAVEPOINT writebehind_row")
                .await
                .map_err(err)?;
            let mut refused = None;
            for (sql, params) in statements {
                if let Err(e) = tx.exec_drop(sql, Params::Positional(params)).await {
                    let failure = classify(e);
                    if failure.kind() != SinkErrorKind::RowRefused {
                        return Err(failure.context(self.place()));
                    }
                    refused = Some(failure.reason().to_string());
                    break;
                }
                // Warnings about the values, notes included, are a refusal here as in every
                // grouped path.
                let warnings = tx.get_warnings();
                if warnings > 0 {
                    refused = altered_row_reason(&mut tx, warnings).await.map_err(err)?;
                    if refused.is_some() {
                        break;
                    }
                }
            }
            match refused {
                Some(reason) => {
                    tx.query_drop("ROLLBACK TO SAVEPOINT writebehind_row")
                        .await
                        .map_err(err)?;
                    rejected.push(Rejected {
                        seq: write.seq,
                        reason,
                    });
                }
                None => tx
                    .query_drop("RELEASE SAVEPOINT writebehind_row")
                    .await
                    .map_err(err)?,
            }
        }
        let mut checkpoint = Statements::default();
        push_checkpoint(&mut checkpoint, batch);
        checkpoint.run(&mut tx).await.map_err(err)?;
        crate::sink::store_refused(before_commit, &rejected, &self.name)?;
        batch.commit_gate.wait().await?;
        tx.commit().await.map_err(err)?;
        Ok(rejected)
    }
}
