//! New rows straight into their table: a batch's upserts for one table are first tried as one
//! `LOAD DATA LOCAL INFILE` into the table itself, behind a savepoint, and kept only if every
//! row went in exactly as sent (docs/design.md 8.2 "New rows first").
//!
//! **Why it is as strict as a statement.** With `LOCAL` the server cannot stop the client's
//! transfer half way, so it answers whatever a strict statement refuses with a *warning* and
//! goes on: a key that exists (1062, the row skipped), `NULL` for a `NOT NULL` column (1263), a
//! number out of range (1264), a bad date, a value outside an `ENUM` or a string too long
//! (1265), text the column's character set cannot hold (1366), a failed `CHECK` (4025), a
//! missing or extra field (1261, 1262). Each comes from the same conversion a statement's value
//! goes through, where the strict session makes it an error (checked by hand on MariaDB 10.11
//! for each code above, and by `tests/integrity.rs`, whose 1,000-row transaction of new keys
//! takes this path). So the load is kept only when it gave no warning at all (notes included)
//! and inserted exactly the rows it was sent; otherwise it is rolled back to the savepoint and
//! the table's upserts take the staged path (`staging.rs`), which decides as it always did.
//!
//! **When it is tried** ([`MysqlSink::write_new_rows`]):
//! - the table is an InnoDB table (read from `information_schema` once per session and table),
//!   so that rolling back to the savepoint undoes the attempt (another engine that reports
//!   transactions may refuse that rollback once rows changed, MyRocks does, and every batch
//!   would fail on the same attempt);
//! - every value is text or a number: the file is declared `utf8mb4`, the character set of the
//!   session's statements, so each value reaches its column as a statement's parameter would
//!   (a `latin1` column refuses what it cannot hold instead of taking UTF-8 bytes as `latin1`).
//!   Bytes (binary columns, values that are not UTF-8) take the stage, whose columns hold them
//!   as they are;
//! - not in the [`NEW_ROWS_AFTER_A_REFUSAL`] batches after a refused attempt for the same table:
//!   a workload of updates wastes one attempt in that many.
//!
//! Why: a stage writes every row twice (the load, then the merge); MariaDB 10.11 on 2 cores,
//! 1,000-row transactions: `LOAD DATA` straight into the table 267-298k rows/s, staged through
//! Aria 170-233k (docs/benchmarks.md).

use std::collections::HashMap;

use futures_util::StreamExt;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::staging::{infile_payload, StageError};
use super::statements::Statements;
use super::{classify, q, MysqlSink};
use crate::sink::convert::SqlValue;
use crate::sink::TableSchema;

/// After a table's new rows were refused (a key existed, a value was not taken as it is), its
/// next this many batches are staged without trying.
pub(super) const NEW_ROWS_AFTER_A_REFUSAL: u32 = 32;

/// What an attempt did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Loaded {
    /// Every row inserted as sent, inside the batch's transaction.
    Written,
    /// Not every row went in as sent (the reason, for the log): rolled back to the savepoint,
    /// nothing of it left.
    Refused(String),
}

/// Per session, by table index: whether the table is an InnoDB table (read on its first large
/// batch), and the batches a table whose last attempt was refused still waits.
#[derive(Debug, Default)]
pub(super) struct NewRows {
    innodb: HashMap<usize, bool>,
    waiting: HashMap<usize, u32>,
}

impl NewRows {
    /// Whether table `index` is tried in this batch (a batch it waits counts down).
    pub(super) fn try_now(&mut self, index: usize) -> bool {
        match self.waiting.get_mut(&index) {
            Some(left) if *left > 0 => {
                *left -= 1;
                false
            }
            _ => true,
        }
    }

    /// Whether table `index` (`table`) is an InnoDB table, read on `conn` the first time (a
    /// failed read is not kept: the next large batch asks again).
    async fn innodb(&mut self, conn: &mut Conn, index: usize, table: &str) -> bool {
        if let Some(known) = self.innodb.get(&index) {
            return *known;
        }
        match is_innodb(conn, table).await {
            Some(known) => *self.innodb.entry(index).or_insert(known),
            None => false,
        }
    }

    /// Table `index`'s attempt was refused.
    pub(super) fn refused(&mut self, index: usize) {
        self.waiting.insert(index, NEW_ROWS_AFTER_A_REFUSAL);
    }
}

/// Whether every value of `upserts` is text or a number (see the module doc).
pub(super) fn text_or_numbers(upserts: &[(&SqlValue, &Vec<SqlValue>)]) -> bool {
    upserts.iter().all(|(id, values)| {
        std::iter::once(*id)
            .chain(values.iter())
            .all(|v| !matches!(v, SqlValue::Bytes(_)))
    })
}

/// Whether `table` is an InnoDB table (`None` when that cannot be read now). InnoDB only: an
/// engine that reports transactions may still refuse to roll back to a savepoint once rows
/// changed (MyRocks), and every batch would then fail on the same attempt.
async fn is_innodb(conn: &mut Conn, table: &str) -> Option<bool> {
    let engine: Option<Option<String>> = conn
        .exec_first(
            "SELECT ENGINE FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
            (table,),
        )
        .await
        .ok()?;
    Some(
        engine
            .flatten()
            .is_some_and(|e| e.eq_ignore_ascii_case("InnoDB")),
    )
}

impl MysqlSink {
    /// Writes `upserts` as new rows straight into table `index` when that is tried and every
    /// row goes in as sent; `false` when the table's upserts are still to be written (not
    /// tried, or refused and rolled back).
    pub(super) async fn write_new_rows(
        &self,
        conn: &mut Conn,
        new_rows: &mut NewRows,
        index: usize,
        schema: &TableSchema,
        upserts: &[(&SqlValue, &Vec<SqlValue>)],
    ) -> Result<bool, StageError> {
        if !text_or_numbers(upserts)
            || !new_rows.try_now(index)
            || !new_rows.innodb(conn, index, &schema.table).await
        {
            return Ok(false);
        }
        match self.load_new_rows(conn, schema, upserts).await? {
            Loaded::Written => Ok(true),
            Loaded::Refused(reason) => {
                tracing::debug!(backend = %self.name, table = %schema.table, %reason, "new rows refused; the table's upserts are staged");
                new_rows.refused(index);
                Ok(false)
            }
        }
    }

    /// Loads `upserts` straight into table `schema` as new rows, behind a savepoint of the
    /// batch's transaction; keeps them only if every one went in as sent.
    pub(super) async fn load_new_rows(
        &self,
        conn: &mut Conn,
        schema: &TableSchema,
        upserts: &[(&SqlValue, &Vec<SqlValue>)],
    ) -> Result<Loaded, StageError> {
        let mut columns = vec![q(&schema.key_column.name)];
        columns.extend(schema.columns.iter().map(|c| q(&c.name)));
        let chunks = infile_payload(upserts, self.infile_chunk());
        conn.set_infile_handler(async move { Ok(futures_util::stream::iter(chunks).boxed()) });
        let mut statements = Statements::default();
        statements.push("SAVEPOINT writebehind_new_rows");
        let load = statements.push(format!(
            "LOAD DATA LOCAL INFILE 'writebehind-batch' INTO TABLE {} CHARACTER SET utf8mb4 ({})",
            q(&schema.table),
            columns.join(", ")
        ));
        let answers = statements.run(conn).await.map_err(StageError::from)?;
        let answer = answers[load];
        if answer.warnings == 0 && answer.affected_rows == upserts.len() as u64 {
            return Ok(Loaded::Written);
        }
        let reason = format!(
            "{} of {} rows inserted, {} warnings",
            answer.affected_rows,
            upserts.len(),
            answer.warnings
        );
        conn.query_drop("ROLLBACK TO SAVEPOINT writebehind_new_rows")
            .await
            .map_err(|e| StageError::Failed(classify(e)))?;
        Ok(Loaded::Refused(reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_table_waits_its_batches_then_is_tried_again() {
        let mut new_rows = NewRows::default();
        assert!(new_rows.try_now(0));
        new_rows.refused(0);
        for _ in 0..NEW_ROWS_AFTER_A_REFUSAL {
            assert!(!new_rows.try_now(0));
            assert!(new_rows.try_now(1), "another table does not wait");
        }
        assert!(new_rows.try_now(0));
        assert!(new_rows.try_now(0));
    }

    #[test]
    fn bytes_anywhere_in_the_rows_take_the_stage() {
        let id = SqlValue::Text("1".into());
        let text = vec![SqlValue::Text("a".into()), SqlValue::Int(1), SqlValue::Null];
        let bytes = vec![SqlValue::Text("a".into()), SqlValue::Bytes(vec![0xff])];
        assert!(text_or_numbers(&[(&id, &text)]));
        assert!(!text_or_numbers(&[(&id, &text), (&id, &bytes)]));
        let binary_id = SqlValue::Bytes(vec![1]);
        assert!(!text_or_numbers(&[(&binary_id, &text)]));
    }
}
