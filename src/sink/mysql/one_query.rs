//! A small batch in one round trip (MariaDB): its upserts, a guard after each, its checkpoint
//! rows and `COMMIT`, sent as one query.
//!
//! **Why.** A batch of a few rows otherwise takes two round trips: its upserts as prepared
//! statements, whose warning counts are read before anything commits (a strict session still
//! answers some alterations with a *note*, not an error: a decimal rounded to its column's
//! scale, 1265), then the checkpoint rows with `COMMIT`. That second wait is a quarter of a
//! small transaction, and a small transaction is most of an acknowledgement's path
//! (docs/benchmarks.md, session 26).
//!
//! **The guard.** After each upsert the query runs
//! `SET @@SESSION.sql_mode = IF(@@warning_count = 0, @@SESSION.sql_mode, '<not a mode>')`:
//! with no warning it sets the mode to itself; with any warning (notes included) it fails with
//! error 1231, whatever the tables' shapes, and the server runs no statement after it, so the
//! `COMMIT` never runs. A statement that touches no table leaves the previous statement's
//! diagnostics in place, so `@@warning_count` there is the upsert's own (checked by hand on
//! MariaDB 10.11, and by `tests/integrity.rs`, whose single-row batches include a rounded
//! decimal). Any failure of the query, the guard's or another, rolls the transaction back and
//! the batch takes the two-round-trip path, which decides as it always did (a refused row is
//! isolated there). MySQL is left on that path: the guard was checked on MariaDB only.
//!
//! **When it is tried** ([`MysqlSink::one_query`]): every table's writes are upserts (no
//! delete), fewer than [`STAGE_THRESHOLD`] of them, every id and value is text, an integer or
//! `NULL` (text goes as `_utf8mb4 X'..'`, a string in the session's character set as a
//! parameter is; numbers as decimal digits; floats and bytes keep their parameters), and the
//! whole query fits the statement budget; not in the [`AFTER_A_FALLBACK`] batches after one
//! that fell back.

use std::fmt::Write as _;

use mysql_async::Conn;

use super::statements::{push_checkpoint, Statements};
use super::{MysqlSink, STAGE_THRESHOLD};
use crate::sink::convert::SqlValue;
use crate::sink::{SinkBatch, SinkError, TableSchema, TableWrites};

/// After a batch fell back, this many batches take the two-round-trip path without trying.
pub(super) const AFTER_A_FALLBACK: u8 = 32;

/// Fails the query when the statement before it left any warning (see the module doc).
pub(super) const GUARD: &str = "SET @@SESSION.sql_mode = IF(@@warning_count = 0, @@SESSION.sql_mode, 'writebehind: the upsert before this was not taken exactly as sent')";

/// A batch's query, and where its upserts and guards are among its statements.
pub(super) struct OneQuery {
    statements: Statements,
    /// Positions of the upserts and guards, whose answers must carry no warning.
    checked: Vec<usize>,
}

/// What running it did.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Committed.
    Committed,
    /// Not committed and rolled back (the reason, for the log): the batch takes the other path.
    FellBack(String),
}

impl MysqlSink {
    /// The batch as one query, when it qualifies (see the module doc).
    pub(super) fn one_query(&self, schemas: &[TableSchema], batch: &SinkBatch) -> Option<OneQuery> {
        let mut statements = Statements::default();
        let mut checked = Vec::new();
        for (index, schema) in schemas.iter().enumerate() {
            let TableWrites { deletes, upserts } = TableWrites::of(batch, index);
            if !deletes.is_empty() || upserts.len() >= STAGE_THRESHOLD {
                return None;
            }
            if upserts.is_empty() {
                continue;
            }
            let mut sql = self.insert_head(schema);
            sql.push_str(" VALUES ");
            for (n, (id, values)) in upserts.iter().enumerate() {
                sql.push_str(if n == 0 { "(" } else { ",(" });
                for (m, value) in std::iter::once(*id).chain(values.iter()).enumerate() {
                    if m > 0 {
                        sql.push(',');
                    }
                    push_literal(&mut sql, value)?;
                }
                sql.push(')');
            }
            sql.push_str(&self.insert_tail(schema));
            checked.push(statements.push(sql));
            checked.push(statements.push(GUARD));
        }
        if checked.is_empty() {
            return None;
        }
        push_checkpoint(&mut statements, batch);
        statements.push("COMMIT");
        (statements.bytes() <= self.statement_budget()).then_some(OneQuery {
            statements,
            checked,
        })
    }
}

impl OneQuery {
    /// Runs the query; on failure rolls back, so that the session is outside a transaction
    /// again. Only a failed `ROLLBACK` is an error (the session cannot be trusted then).
    pub(super) async fn run(self, conn: &mut Conn) -> Result<Outcome, SinkError> {
        use mysql_async::prelude::Queryable;
        match self.statements.run(conn).await {
            Ok(answers) => {
                // The guards make this impossible; were it to happen, the batch is committed
                // with a value the server altered: stop, loudly.
                if let Some(at) = self
                    .checked
                    .iter()
                    .find(|&&at| answers.get(at).is_none_or(|answer| answer.warnings > 0))
                {
                    return Err(SinkError::fatal(format!(
                        "statement {at} of a one-query batch committed with warnings despite its guard; this server does not keep @@warning_count as MariaDB 10.11 does: please report it"
                    )));
                }
                Ok(Outcome::Committed)
            }
            Err(failure) => match conn.query_drop("ROLLBACK").await {
                Ok(()) => Ok(Outcome::FellBack(failure.to_string())),
                Err(e) => Err(SinkError::transient(format!(
                    "ROLLBACK after `{failure}` failed: {e}"
                ))),
            },
        }
    }
}

/// Appends `value` as an SQL literal; `None` for a value that keeps its parameter.
fn push_literal(sql: &mut String, value: &SqlValue) -> Option<()> {
    match value {
        SqlValue::Null => sql.push_str("NULL"),
        SqlValue::Int(i) => {
            let _ = write!(sql, "{i}");
        }
        SqlValue::UInt(u) => {
            let _ = write!(sql, "{u}");
        }
        SqlValue::Text(text) => {
            sql.push_str("_utf8mb4 X'");
            for b in text.as_bytes() {
                let _ = write!(sql, "{b:02X}");
            }
            sql.push('\'');
        }
        SqlValue::Float(_) | SqlValue::Bytes(_) => return None,
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_carry_text_and_integers_and_leave_floats_and_bytes_to_parameters() {
        let literal = |value: SqlValue| {
            let mut sql = String::new();
            push_literal(&mut sql, &value).map(|()| sql)
        };
        assert_eq!(literal(SqlValue::Null).as_deref(), Some("NULL"));
        assert_eq!(
            literal(SqlValue::Int(i64::MIN)).as_deref(),
            Some("-9223372036854775808")
        );
        assert_eq!(
            literal(SqlValue::UInt(u64::MAX)).as_deref(),
            Some("18446744073709551615")
        );
        assert_eq!(
            literal(SqlValue::Text("a'\\é".into())).as_deref(),
            Some("_utf8mb4 X'61275CC3A9'")
        );
        assert_eq!(
            literal(SqlValue::Text(String::new())).as_deref(),
            Some("_utf8mb4 X''")
        );
        assert_eq!(literal(SqlValue::Float(0.1)), None);
        assert_eq!(literal(SqlValue::Bytes(vec![0xff])), None);
    }
}
