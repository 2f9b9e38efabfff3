//! Several statements sent as one query, so that a batch costs few round trips.
//!
//! mysql_async connects with `CLIENT_MULTI_STATEMENTS`: a query may hold statements separated
//! by `;`. The server runs them in order and stops at the first that fails; that statement's
//! error is the query's, and no statement after it ran. Each statement answers with its own OK
//! packet, which carries its own warning count, so a statement whose warnings are a refusal
//! (a load, a merge: `staging.rs`) is checked as if it had been sent alone. Nothing that must
//! wait for such a check (a `COMMIT`) goes in the same query as the statement checked.
//!
//! Values in these statements are never client input: checkpoint fields (names, offsets, the
//! primary's replication id, ids) are written as hexadecimal literals (`X'..'`), which mean the
//! same bytes whatever the session's `sql_mode` (`NO_BACKSLASH_ESCAPES`, `ANSI_QUOTES`).

use std::fmt::Write as _;

use mysql_async::prelude::Queryable;

use crate::sink::{SinkBatch, CHECKPOINT_TABLE};

/// What one statement of a query answered (its OK packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Answer {
    pub warnings: u16,
    pub affected_rows: u64,
}

/// Statements to send as one query.
#[derive(Debug, Default)]
pub(super) struct Statements {
    sql: String,
    count: usize,
}

impl Statements {
    /// Adds a statement; returns its position, to find its warnings in what [`Statements::run`]
    /// returns.
    pub(super) fn push(&mut self, statement: impl AsRef<str>) -> usize {
        if self.count > 0 {
            self.sql.push_str(";\n");
        }
        self.sql.push_str(statement.as_ref());
        self.count += 1;
        self.count - 1
    }

    /// Runs the statements in one round trip (and the LOCAL INFILE exchange of a load among
    /// them); returns each statement's answer, in order.
    pub(super) async fn run<Q: Queryable>(
        self,
        conn: &mut Q,
    ) -> Result<Vec<Answer>, mysql_async::Error> {
        if self.count == 0 {
            return Ok(Vec::new());
        }
        let mut result = conn.query_iter(self.sql).await?;
        let mut answers = Vec::with_capacity(self.count);
        answers.push(answer(&result));
        // Reading a statement's (empty) result moves to the next statement's OK packet. A
        // statement that failed is reported by the read after the one that reached it, or by
        // the last read below: every error is seen before any warning count is used.
        for _ in 1..self.count {
            result.collect::<mysql_async::Row>().await?;
            answers.push(answer(&result));
        }
        result.drop_result().await?;
        Ok(answers)
    }
}

/// The answer `result` is at.
fn answer(result: &mysql_async::QueryResult<'_, '_, mysql_async::TextProtocol>) -> Answer {
    Answer {
        warnings: result.warnings(),
        affected_rows: result.affected_rows(),
    }
}

/// `bytes` as a hexadecimal string literal.
pub(super) fn hex_literal(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(3 + 2 * bytes.len());
    out.push_str("X'");
    for b in bytes {
        let _ = write!(out, "{b:02X}");
    }
    out.push('\'');
    out
}

/// Adds the statements that set the batch's checkpoint rows and delete its retired ones.
pub(super) fn push_checkpoint(statements: &mut Statements, batch: &SinkBatch) {
    if !batch.checkpoint_rows.is_empty() {
        let rows: Vec<String> = batch
            .checkpoint_rows
            .iter()
            .map(|name| {
                format!(
                    "('writebehind', {}, {}, {}, {}, {}, {})",
                    hex_literal(name.as_bytes()),
                    hex_literal(batch.replid.as_bytes()),
                    batch.offset.0,
                    batch.last_seq.0,
                    hex_literal(batch.buffer_id.as_bytes()),
                    hex_literal(batch.mappings_id.as_bytes()),
                )
            })
            .collect();
        statements.push(format!(
            "INSERT INTO {CHECKPOINT_TABLE} (source, backend, replid, repl_offset, change_seq, buffer_id, mappings_id) VALUES {} \
             ON DUPLICATE KEY UPDATE replid = VALUES(replid), repl_offset = VALUES(repl_offset), change_seq = VALUES(change_seq), \
             buffer_id = VALUES(buffer_id), mappings_id = VALUES(mappings_id)",
            rows.join(", ")
        ));
    }
    if !batch.retire_rows.is_empty() {
        let names: Vec<String> = batch
            .retire_rows
            .iter()
            .map(|name| hex_literal(name.as_bytes()))
            .collect();
        statements.push(format!(
            "DELETE FROM {CHECKPOINT_TABLE} WHERE source = 'writebehind' AND backend IN ({})",
            names.join(", ")
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_joined_and_numbered() {
        let mut statements = Statements::default();
        assert_eq!(statements.push("DO 1"), 0);
        assert_eq!(statements.push(String::from("DO 2")), 1);
        assert_eq!(statements.sql, "DO 1;\nDO 2");
        assert_eq!(statements.count, 2);
    }

    #[test]
    fn a_hex_literal_holds_any_bytes() {
        assert_eq!(hex_literal(b""), "X''");
        assert_eq!(hex_literal(b"a'\\\x00\xff"), "X'61275C00FF'");
    }
}
