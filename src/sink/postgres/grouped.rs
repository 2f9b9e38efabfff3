//! The fast path: a batch as one transaction of grouped statements.
//!
//! Per table, `DELETE ... WHERE key = ANY($1)` of the ids to delete first, then the upserts: one
//! `INSERT ... SELECT ... FROM unnest($1, $2, ...)` (one array per column); or, for new rows from
//! `DIRECT_COPY_MIN` on, `COPY` straight into the table (where `COPY` acts as the insert would:
//! no rules, no row-level security); or, for upserts from `COPY_THRESHOLD` on, `COPY` into a
//! stage and one merge (`copy.rs`); then the checkpoint rows; then `COMMIT`.
//!
//! **Pipelined.** Unless a table is staged, the statements of the transaction, `BEGIN` to
//! `COMMIT`, are sent before the first answer is read: one round trip per batch instead of one
//! per statement (a `COPY` of new rows waits for what precedes it). A batch whose changes the
//! buffer is still syncing (its `CommitGate` closed when it is sent) goes without its
//! `COMMIT`, which is sent alone once the gate opens: the statements overlap the sync. Each
//! statement is sent on its future's first poll (tokio-postgres), so the futures are polled
//! once each, in order, before any is awaited. Why a batch is still written whole or not at all:
//! - after a statement fails on the server, PostgreSQL refuses every later one in the
//!   transaction (`25P02`) and answers the `COMMIT` by rolling back; the first error counts;
//! - a statement that fails before it is sent (parameters that cannot be encoded, a closed
//!   connection) stops the sending there: the `COMMIT` is never sent, and the transaction is
//!   rolled back (or the connection dropped);
//! - `BEGIN` on an idle session cannot fail on the server but with the connection (then nothing
//!   later runs); in a failed transaction it fails, and so does everything after it. The
//!   session is never left in one: it is dropped after any failure.
//!
//! Everything a statement needs (the refusal checks, the arrays) is ready before the first is
//! sent.
//!
//! **Insert first** ([`Upserts`]): the upserts are first tried as a plain `INSERT`; a key that
//! exists fails it with `23505`, the transaction is rolled back and the batch is redone with
//! `ON CONFLICT`, and the next [`UPSERTS_AFTER_A_CONFLICT`] batches upsert directly.

use std::task::Poll;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use super::schema::TableTypes;
use super::{classify, copy, message, Param, PostgresSink, MAX_PARAMETERS};
use crate::sink::convert::SqlValue;
use crate::sink::{RowOp, SinkBatch, SinkError, SinkErrorKind, TableWrites, CHECKPOINT_TABLE};

/// How a grouped batch writes its upserts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Upserts {
    /// A plain `INSERT`: measured 1.7x faster than `ON CONFLICT` for new rows (1,000-row
    /// statements, docs/benchmarks.md); a key that exists fails it, and the batch is redone.
    InsertOnly,
    /// `INSERT ... ON CONFLICT (key) DO UPDATE`.
    Upsert,
}

/// What a grouped attempt did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Grouped {
    Written,
    /// An insert-only attempt met a key that exists: rolled back, to be redone as upserts.
    KeyExists,
}

/// After an insert-only attempt met an existing key, batches upsert this many times before
/// trying insert-only again (a workload of updates wastes one attempt in this many).
pub(super) const UPSERTS_AFTER_A_CONFLICT: u32 = 32;

/// A statement and its typed parameters, ready to send.
pub(super) struct Statement<'a> {
    sql: String,
    params: Vec<(&'a (dyn ToSql + Sync), Type)>,
}

impl Statement<'_> {
    fn plain(sql: &str) -> Statement<'static> {
        Statement {
            sql: sql.to_string(),
            params: Vec::new(),
        }
    }
}

/// One table's upserts as one array per column (text, or bytes for a `bytea` column).
struct ColumnArrays {
    text: Vec<Vec<Option<String>>>,
    bytes: Vec<Vec<Option<Vec<u8>>>>,
}

impl ColumnArrays {
    fn of(types: &TableTypes, upserts: &[(&SqlValue, &Vec<SqlValue>)]) -> ColumnArrays {
        let width = types.width();
        let mut arrays = ColumnArrays {
            text: vec![Vec::with_capacity(upserts.len()); width],
            bytes: vec![Vec::new(); width],
        };
        for (id, values) in upserts {
            for (i, param) in types.params(id, values).into_iter().enumerate() {
                match param {
                    Param::Text(t) => arrays.text[i].push(t),
                    Param::Bytes(b) => arrays.bytes[i].push(b),
                }
            }
        }
        arrays
    }

    fn params(&self, types: &TableTypes) -> Vec<(&(dyn ToSql + Sync), Type)> {
        (0..types.width())
            .map(|i| -> (&(dyn ToSql + Sync), Type) {
                match types.is_bytea(i) {
                    true => (&self.bytes[i], Type::BYTEA_ARRAY),
                    false => (&self.text[i], Type::TEXT_ARRAY),
                }
            })
            .collect()
    }
}

/// Table `index`'s writes in `batch`, or the reason a row is refused (refused on every path:
/// the row-by-row replay dead-letters it).
pub(super) fn checked_writes<'b>(
    batch: &'b SinkBatch,
    index: usize,
    types: &TableTypes,
) -> Result<TableWrites<'b>, SinkError> {
    let writes = TableWrites::of(batch, index);
    match writes
        .upserts
        .iter()
        .find_map(|(id, values)| types.refusal(id, values))
    {
        Some(reason) => Err(SinkError::new(SinkErrorKind::RowRefused, reason)),
        None => Ok(writes),
    }
}

/// The ids to delete as text, in statements of at most `MAX_PARAMETERS`.
fn delete_chunks(deletes: &[&SqlValue]) -> Vec<Vec<Option<String>>> {
    let texts: Vec<Option<String>> = deletes.iter().map(|id| delete_param(id)).collect();
    texts.chunks(MAX_PARAMETERS).map(<[_]>::to_vec).collect()
}

/// A key to delete as its statement's text (a key is never `bytea`).
fn delete_param(id: &SqlValue) -> Option<String> {
    match Param::of(id, false) {
        Param::Text(text) => text,
        Param::Bytes(_) => None,
    }
}

/// The batch's checkpoint numbers as the statements bind them.
pub(super) struct CheckpointNumbers {
    seq: i64,
    offset: i64,
}

impl CheckpointNumbers {
    pub(super) fn of(batch: &SinkBatch) -> CheckpointNumbers {
        CheckpointNumbers {
            seq: i64::try_from(batch.last_seq.0).unwrap_or(i64::MAX),
            offset: i64::try_from(batch.offset.0).unwrap_or(i64::MAX),
        }
    }
}

/// The statements that set the batch's checkpoint rows and delete its retired ones.
pub(super) fn checkpoint_statements<'a>(
    batch: &'a SinkBatch,
    numbers: &'a CheckpointNumbers,
) -> Vec<Statement<'a>> {
    let upsert = format!(
        "INSERT INTO {CHECKPOINT_TABLE} (source, backend, replid, repl_offset, change_seq, buffer_id, mappings_id) \
         VALUES ('writebehind', $1, $2, $3, $4, $5, $6) ON CONFLICT (source, backend) DO UPDATE SET \
         replid = EXCLUDED.replid, repl_offset = EXCLUDED.repl_offset, change_seq = EXCLUDED.change_seq, \
         buffer_id = EXCLUDED.buffer_id, mappings_id = EXCLUDED.mappings_id, updated_at = now()"
    );
    let mut statements: Vec<Statement<'a>> = batch
        .checkpoint_rows
        .iter()
        .map(|name| Statement {
            sql: upsert.clone(),
            params: vec![
                (name, Type::TEXT),
                (&batch.replid, Type::TEXT),
                (&numbers.offset, Type::INT8),
                (&numbers.seq, Type::INT8),
                (&batch.buffer_id, Type::TEXT),
                (&batch.mappings_id, Type::TEXT),
            ],
        })
        .collect();
    if !batch.retire_rows.is_empty() {
        statements.push(Statement {
            sql: format!(
                "DELETE FROM {CHECKPOINT_TABLE} WHERE source = 'writebehind' AND backend = ANY($1)"
            ),
            params: vec![(&batch.retire_rows, Type::TEXT_ARRAY)],
        });
    }
    statements
}

/// Runs `statements` one after the other.
pub(super) async fn run_in_turn(
    client: &Client,
    statements: &[Statement<'_>],
) -> Result<(), tokio_postgres::Error> {
    for statement in statements {
        client
            .execute_typed(&statement.sql, &statement.params)
            .await?;
    }
    Ok(())
}

/// Sends every statement before reading the first answer (see the module doc); the answers, in
/// order, and whether every statement was sent. A statement that fails before it is sent (its
/// parameters cannot be encoded, the connection is closed) ends the sending: nothing after it
/// goes, the `COMMIT` least of all, and the caller must end the transaction.
async fn run_pipelined(
    client: &Client,
    statements: &[Statement<'_>],
) -> (Vec<Result<u64, tokio_postgres::Error>>, bool) {
    let pending: Vec<_> = statements
        .iter()
        .map(|s| Box::pin(client.execute_typed(&s.sql, &s.params)))
        .collect();
    send_in_order(pending).await
}

/// Polls each future once, in order (the first poll sends), then awaits the answers; returns
/// them with whether every future was sent. A success on the first poll is an answer that came
/// back already (the connection runs on another thread: a loaded machine can let it send and
/// read before this poll looks): the statement was sent, and the next ones must go too.
/// Treating it as a failure stopped the sending after `BEGIN` and reported the batch written
/// with nothing sent (found by the poison-value test under CPU load). An error on the first
/// poll is a failure to send, or an answer as fast: either way nothing more is sent, and the
/// caller ends the transaction.
async fn send_in_order<F, T, E>(
    mut pending: Vec<std::pin::Pin<Box<F>>>,
) -> (Vec<Result<T, E>>, bool)
where
    F: std::future::Future<Output = Result<T, E>> + ?Sized,
{
    let mut answers = Vec::with_capacity(pending.len());
    let mut all_sent = true;
    for future in &mut pending {
        match futures_util::poll!(future.as_mut()) {
            Poll::Ready(Ok(answer)) => answers.push(Some(Ok(answer))),
            Poll::Ready(Err(e)) => {
                answers.push(Some(Err(e)));
                all_sent = false;
                break;
            }
            Poll::Pending => answers.push(None),
        }
    }
    let mut results = Vec::with_capacity(answers.len());
    for (future, answer) in pending.into_iter().zip(answers) {
        results.push(match answer {
            Some(answer) => answer,
            None => future.await,
        });
    }
    (results, all_sent)
}

/// A step of a pipelined transaction.
enum Step<'a> {
    Send(Statement<'a>),
    /// New rows `COPY`ed straight into the table (insert-only); the statements before it are
    /// answered first (a `COPY` cannot be pipelined with tokio-postgres).
    Copy {
        index: usize,
        types: &'a TableTypes,
        rows: Vec<(&'a SqlValue, &'a Vec<SqlValue>)>,
    },
}

/// What an attempt's first error means: the upserts were tried as inserts and a key exists,
/// or a failure.
fn outcome(
    first_error: Option<tokio_postgres::Error>,
    mode: Upserts,
) -> Result<Grouped, SinkError> {
    match first_error {
        None => Ok(Grouped::Written),
        Some(e) if mode == Upserts::InsertOnly && e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            Ok(Grouped::KeyExists)
        }
        Some(e) => Err(classify(e)),
    }
}

/// Ends the transaction a failed step left open, then returns what the failure means.
async fn roll_back(
    client: &Client,
    failure: tokio_postgres::Error,
    mode: Upserts,
) -> Result<Grouped, SinkError> {
    let meant = outcome(Some(failure), mode);
    match client.batch_execute("ROLLBACK").await {
        Ok(()) => meant,
        Err(e) => Err(SinkError::transient(format!(
            "ROLLBACK after `{}` failed: {}",
            meant.map_or_else(|f| f.to_string(), |_| "a key that exists".to_string()),
            message(&e)
        ))),
    }
}

impl PostgresSink {
    /// One attempt at `batch` as a transaction of grouped statements: pipelined, or in turn
    /// when a table's upserts are staged for a merge (`copy.rs`).
    pub(super) async fn apply_grouped(
        &self,
        client: &Client,
        batch: &SinkBatch,
        mode: Upserts,
    ) -> Result<Grouped, SinkError> {
        let staged = self.copy
            && mode == Upserts::Upsert
            && (0..self.types.len()).any(|index| {
                batch
                    .writes
                    .iter()
                    .filter(|w| w.table == index && matches!(w.op, RowOp::Upsert { .. }))
                    .count()
                    >= copy::COPY_THRESHOLD
            });
        if !staged {
            return self.apply_pipelined(client, batch, mode).await;
        }
        let tables = self
            .types
            .iter()
            .enumerate()
            .map(|(index, types)| checked_writes(batch, index, types))
            .collect::<Result<Vec<_>, _>>()?;
        client.batch_execute("BEGIN").await.map_err(classify)?;
        match self.upsert_in_turn(client, batch, tables).await {
            Ok(()) => {
                // A failed gate leaves the transaction open: the caller drops the connection.
                batch.commit_gate.wait().await?;
                match client.batch_execute("COMMIT").await {
                    Ok(()) => Ok(Grouped::Written),
                    Err(e) => Err(classify(e)),
                }
            }
            Err(failure) => roll_back(client, failure, mode).await,
        }
    }

    /// The transaction in one round trip, or one per `COPY` of new rows and one more (see
    /// the module doc).
    async fn apply_pipelined(
        &self,
        client: &Client,
        batch: &SinkBatch,
        mode: Upserts,
    ) -> Result<Grouped, SinkError> {
        let insert_only = mode == Upserts::InsertOnly;
        let mut tables = Vec::with_capacity(self.types.len());
        for (index, types) in self.types.iter().enumerate() {
            let writes = checked_writes(batch, index, types)?;
            let copied =
                insert_only && types.direct_copy && writes.upserts.len() >= copy::DIRECT_COPY_MIN;
            let arrays = (!copied && !writes.upserts.is_empty())
                .then(|| ColumnArrays::of(types, &writes.upserts));
            tables.push((
                types,
                delete_chunks(&writes.deletes),
                arrays,
                writes.upserts,
            ));
        }
        let numbers = CheckpointNumbers::of(batch);
        let mut steps = vec![Step::Send(Statement::plain("BEGIN"))];
        for (index, (types, deletes, arrays, upserts)) in tables.iter().enumerate() {
            for chunk in deletes {
                steps.push(Step::Send(Statement {
                    sql: types.delete_any(),
                    params: vec![(chunk, Type::TEXT_ARRAY)],
                }));
            }
            match arrays {
                Some(arrays) => steps.push(Step::Send(Statement {
                    sql: types.upsert_unnest(insert_only),
                    params: arrays.params(types),
                })),
                None if !upserts.is_empty() => steps.push(Step::Copy {
                    index,
                    types,
                    rows: upserts.clone(),
                }),
                None => {}
            }
        }
        steps.extend(
            checkpoint_statements(batch, &numbers)
                .into_iter()
                .map(Step::Send),
        );
        // While the buffer still syncs the batch's changes, the transaction goes without its
        // `COMMIT`, which follows once the gate opens: one more round trip, and the statements
        // overlap the sync (`buffer/durability.rs`).
        let commit_now = batch.commit_gate.is_open();
        if commit_now {
            steps.push(Step::Send(Statement::plain("COMMIT")));
        }
        let mut queued = Vec::new();
        for step in steps {
            match step {
                Step::Send(statement) => queued.push(statement),
                Step::Copy { index, types, rows } => {
                    let (answers, _) = run_pipelined(client, &queued).await;
                    queued.clear();
                    let copied = match answers.into_iter().find_map(Result::err) {
                        Some(e) => Err(e),
                        None => self.copy_new_rows(client, index, types, &rows).await,
                    };
                    if let Err(e) = copied {
                        return roll_back(client, e, mode).await;
                    }
                }
            }
        }
        // After a failure the server refused the later statements and rolled the COMMIT
        // back; a statement that could not be sent stopped the sending before the COMMIT.
        let (answers, all_sent) = run_pipelined(client, &queued).await;
        let first_error = answers.into_iter().find_map(Result::err);
        match (first_error, all_sent) {
            (Some(e), false) => roll_back(client, e, mode).await,
            // No `COMMIT` was sent: the failed transaction is still open.
            (Some(e), true) if !commit_now => roll_back(client, e, mode).await,
            (None, true) if !commit_now => {
                // A failed gate leaves the transaction open: the caller drops the connection.
                batch.commit_gate.wait().await?;
                client.batch_execute("COMMIT").await.map_err(classify)?;
                Ok(Grouped::Written)
            }
            (first_error, _) => outcome(first_error, mode),
        }
    }

    /// `COPY` of new rows straight into table `index`.
    async fn copy_new_rows(
        &self,
        client: &Client,
        index: usize,
        types: &TableTypes,
        rows: &[(&SqlValue, &Vec<SqlValue>)],
    ) -> Result<(), tokio_postgres::Error> {
        let statement =
            copy::copy_into_statement(client, &self.session.copy_into, index, types).await?;
        copy::copy_rows(client, &statement, types, rows).await
    }

    /// The statements of a transaction that stages upserts, one after the other.
    async fn upsert_in_turn(
        &self,
        client: &Client,
        batch: &SinkBatch,
        tables: Vec<TableWrites<'_>>,
    ) -> Result<(), tokio_postgres::Error> {
        self.write_in_turn(client, tables, false).await?;
        let numbers = CheckpointNumbers::of(batch);
        run_in_turn(client, &checkpoint_statements(batch, &numbers)).await?;
        Ok(())
    }

    /// Writes `tables` one statement after the other inside the open transaction, as upserts;
    /// `in_unit`: the transaction is a long unit's, whose stages may still hold an earlier
    /// part's rows (they are emptied only at commit), so each is emptied before it is filled.
    pub(super) async fn write_in_turn(
        &self,
        client: &Client,
        tables: Vec<TableWrites<'_>>,
        in_unit: bool,
    ) -> Result<(), tokio_postgres::Error> {
        for (index, (types, writes)) in self.types.iter().zip(tables).enumerate() {
            let TableWrites { deletes, upserts } = writes;
            for chunk in &delete_chunks(&deletes) {
                client
                    .execute_typed(&types.delete_any(), &[(chunk, Type::TEXT_ARRAY)])
                    .await?;
            }
            if upserts.is_empty() {
                continue;
            }
            // Measured (docs/benchmarks.md): one statement of column arrays is the faster
            // below COPY_THRESHOLD rows, COPY and a merge from there on.
            if upserts.len() < copy::COPY_THRESHOLD || !self.copy {
                let arrays = ColumnArrays::of(types, &upserts);
                client
                    .execute_typed(&types.upsert_unnest(false), &arrays.params(types))
                    .await?;
                continue;
            }
            let staged = self
                .session
                .stages
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&index);
            let merged =
                copy::copy_and_merge(client, index, types, &upserts, (staged, in_unit)).await;
            self.session
                .stages
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(index);
            merged?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A statement's future: answers on its first poll when `early`, else on its second; counts
    /// its first poll (the send) in `sent`.
    fn statement(
        sent: Arc<AtomicUsize>,
        early: Option<Result<u64, &'static str>>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, &'static str>>>> {
        let mut polls = 0;
        Box::pin(std::future::poll_fn(move |cx| {
            polls += 1;
            if polls == 1 {
                sent.fetch_add(1, Ordering::SeqCst);
                if let Some(answer) = early {
                    return Poll::Ready(answer);
                }
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Ok(polls))
        }))
    }

    /// A statement answered at its first poll (a fast `BEGIN`) does not stop the sending: every
    /// later statement is sent and answered; an early error does stop it.
    #[tokio::test]
    async fn an_early_answer_does_not_stop_the_sending_an_early_error_does() {
        let sent = Arc::new(AtomicUsize::new(0));
        let futures = vec![
            statement(sent.clone(), Some(Ok(0))),
            statement(sent.clone(), None),
            statement(sent.clone(), None),
        ];
        let (answers, all_sent) = send_in_order(futures).await;
        assert!(all_sent);
        assert_eq!(sent.load(Ordering::SeqCst), 3, "every statement was sent");
        assert_eq!(answers, vec![Ok(0), Ok(2), Ok(2)]);

        let sent = Arc::new(AtomicUsize::new(0));
        let futures = vec![
            statement(sent.clone(), None),
            statement(sent.clone(), Some(Err("cannot send"))),
            statement(sent.clone(), None),
        ];
        let (answers, all_sent) = send_in_order(futures).await;
        assert!(!all_sent);
        assert_eq!(
            sent.load(Ordering::SeqCst),
            2,
            "nothing after the failure is sent"
        );
        assert_eq!(answers, vec![Ok(2), Err("cannot send")]);
    }
}
