//! Sinks: the databases the rows are written to. The contract every backend keeps is on
//! [`Destination`]; [`Sink`] picks the backend from the URL.

mod acks;
mod applied;
mod coalesce;
pub mod convert;
mod error;
mod handoff;
mod long_unit;
#[cfg(test)]
pub mod memory;
pub mod mysql;
pub mod partition;
pub mod postgres;
mod read_ahead;
mod reconcile;
mod retry;
pub mod runner;
pub mod sqlite;
mod url_parameters;

use std::collections::HashMap;

use bytes::Bytes;

use crate::buffer::StoreError;
use crate::capture::mapping::Mapping;
use crate::position::{ChangeSeq, ReplOffset};
use convert::{ColumnType, SqlValue};
pub use error::{SchemaProblem, SinkError, SinkErrorKind};

/// Name of the checkpoint table every sink keeps in its database.
pub const CHECKPOINT_TABLE: &str = "writebehind_checkpoint";

/// A column as the database declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnInfo {
    pub name: String,
    pub kind: ColumnType,
    pub nullable: bool,
}

/// What the sink needs to know about a mapped table.
#[derive(Debug, Clone)]
pub struct TableSchema {
    pub table: String,
    pub key_column: ColumnInfo,
    /// Mapped columns, in the mapping's column order.
    pub columns: Vec<ColumnInfo>,
    pub required: Vec<String>,
}

impl TableSchema {
    /// Checks a table's columns against a mapping.
    pub fn build(
        mapping: &Mapping,
        found: &HashMap<String, (ColumnInfo, bool)>,
    ) -> Result<TableSchema, Vec<SchemaProblem>> {
        let table = mapping.table.as_str();
        let mut problems = Vec::new();
        let key_column = match found.get(&mapping.key_column) {
            Some((info, true)) => Some(info.clone()),
            Some((_, false)) => {
                problems.push(SchemaProblem::KeyNotUnique {
                    mapping: mapping.name.to_string(),
                    table: table.to_string(),
                    column: mapping.key_column.clone(),
                });
                None
            }
            None => {
                problems.push(SchemaProblem::MissingKeyColumn {
                    mapping: mapping.name.to_string(),
                    table: table.to_string(),
                    column: mapping.key_column.clone(),
                });
                None
            }
        };
        let mut columns = Vec::new();
        for (_, column) in &mapping.columns {
            match found.get(&**column) {
                Some((info, _)) => columns.push(info.clone()),
                None => problems.push(SchemaProblem::MissingColumn {
                    mapping: mapping.name.to_string(),
                    table: table.to_string(),
                    column: column.to_string(),
                }),
            }
        }
        match key_column {
            Some(key_column) if problems.is_empty() => Ok(TableSchema {
                table: table.to_string(),
                key_column,
                columns,
                required: mapping.required.clone(),
            }),
            _ => Err(problems),
        }
    }
}

/// One row operation, converted for its table.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOp {
    Upsert { id: SqlValue, values: Vec<SqlValue> },
    Delete { id: SqlValue },
}

/// Operations on one row after coalescing a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct RowWrite {
    /// Index of the mapping (its table) in the sink's table list.
    pub table: usize,
    /// The seq of the last change that produced it (to dead-letter it).
    pub seq: ChangeSeq,
    pub row_id: Bytes,
    /// Delete the row first (a delete preceded the final upsert in this batch).
    pub delete_first: bool,
    pub op: RowOp,
}

/// The writes of `batch` to table `table`, as grouped statements take them: the ids to delete
/// first (deletes, and upserts that follow a delete in the batch), then the upserts.
pub struct TableWrites<'a> {
    pub deletes: Vec<&'a SqlValue>,
    pub upserts: Vec<(&'a SqlValue, &'a Vec<SqlValue>)>,
}

impl<'a> TableWrites<'a> {
    pub fn of(batch: &'a SinkBatch, table: usize) -> TableWrites<'a> {
        let mut writes = TableWrites {
            deletes: Vec::new(),
            upserts: Vec::new(),
        };
        for write in batch.writes.iter().filter(|w| w.table == table) {
            match &write.op {
                RowOp::Delete { id } => writes.deletes.push(id),
                RowOp::Upsert { id, values } => {
                    if write.delete_first {
                        writes.deletes.push(id);
                    }
                    writes.upserts.push((id, values));
                }
            }
        }
        writes
    }
}

/// A transaction's worth of work.
#[derive(Debug, Clone, Default)]
pub struct SinkBatch {
    pub writes: Vec<RowWrite>,
    /// The seq the checkpoint row takes when the batch commits.
    pub last_seq: ChangeSeq,
    pub replid: String,
    /// The stream offset after the batch's last unit (recorded with the checkpoint).
    pub offset: ReplOffset,
    /// The identity of the buffer `last_seq` belongs to (recorded with the checkpoint).
    pub buffer_id: String,
    /// The fingerprint of the backend's mappings (recorded with the checkpoint).
    pub mappings_id: String,
    /// The checkpoint rows the transaction sets to `last_seq` (`partition.rs`; none for the
    /// writes of a reconciliation, which leave the rows as they are).
    pub checkpoint_rows: Vec<String>,
    /// Checkpoint rows the transaction deletes (those of another partition layout).
    pub retire_rows: Vec<String>,
    /// What the transaction waits for before its `COMMIT` (the buffer's sync of changes read
    /// while it was in flight).
    pub commit_gate: CommitGate,
}

/// The buffer's sync a batch read in its window (`buffer/durability.rs`) waits for before it
/// commits: none for a batch whose changes were all synced when it was read.
#[derive(Clone, Default)]
pub struct CommitGate(Option<(std::sync::Arc<crate::buffer::Store>, ChangeSeq)>);

impl CommitGate {
    /// The gate of a batch whose last change is `through`, read from `store`.
    pub fn after_sync(store: &std::sync::Arc<crate::buffer::Store>, through: ChangeSeq) -> Self {
        match store.is_synced(through) {
            true => CommitGate(None),
            false => CommitGate(Some((store.clone(), through))),
        }
    }

    /// Whether the batch may commit now (its changes are synced).
    pub fn is_open(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(|(store, through)| store.is_synced(*through))
    }

    /// Waits for the sync; fatal when it failed (the transaction must then not commit).
    pub async fn wait(&self) -> Result<(), SinkError> {
        let Some((store, through)) = &self.0 else {
            return Ok(());
        };
        store
            .wait_synced(*through)
            .await
            .map_err(|e| SinkError::fatal(e.to_string()))
    }
}

impl std::fmt::Debug for CommitGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("CommitGate(synced)"),
            Some((_, through)) => write!(f, "CommitGate(through {})", through.0),
        }
    }
}

/// What a backend's checkpoint row says: how far it has applied, of which buffer, for which
/// mappings. Seqs are only comparable with the buffer that gave them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SinkCheckpoint {
    /// The seq of the last applied change ([`ChangeSeq::NONE`] when there is no row).
    pub seq: ChangeSeq,
    /// `None` when there is no row, or when it was written before buffers had identities.
    pub buffer_id: Option<String>,
    pub mappings_id: Option<String>,
}

/// Called with the refused rows of a batch just before it commits, so that they are stored
/// (dead-lettered) before the batch counts as applied; an error aborts the batch.
pub type BeforeCommit = std::sync::Arc<dyn Fn(&[Rejected]) -> Result<(), StoreError> + Send + Sync>;

/// Stores a batch's refused rows through its `before_commit` (see [`BeforeCommit`]); a failure
/// is fatal: the batch must not commit without them.
pub fn store_refused(
    before_commit: &BeforeCommit,
    rejected: &[Rejected],
    backend: &str,
) -> Result<(), SinkError> {
    before_commit(rejected).map_err(|e| {
        SinkError::fatal(format!(
            "backend `{backend}`: cannot store refused rows: {e}"
        ))
        .caused_by(e)
    })
}

/// A row the database refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub seq: ChangeSeq,
    pub reason: String,
}

/// A database the rows are written to.
///
/// - **Input**: batches of row operations built from the change log, in change-log order, made
///   of whole execution units (a `MULTI ... EXEC` is never split across batches).
/// - **Coalescing**: inside a batch, the changes of one row are reduced to its final state, and
///   a delete that precedes the final upsert is kept, so that the committed state equals applying
///   the changes one by one (including unmapped columns of an existing row, which a delete then
///   upsert resets and a plain upsert keeps).
/// - **Atomicity**: a batch is one database transaction that also sets the batch's checkpoint
///   rows in `writebehind_checkpoint` (`SinkBatch::checkpoint_rows`: one per partition, see
///   `partition.rs`) to the seq of the last change of the batch, and deletes its
///   `retire_rows`. **Applied** means exactly that: committed together with the checkpoint.
/// - **Idempotence**: on start the runner reads the checkpoint rows and skips, per partition,
///   every change at or below that partition's row, so a batch is applied once whatever crashes
///   in between (exactly-once effect). Each row also records the identity of the buffer its seq
///   belongs to and the fingerprint of the backend's mappings: when either differs, the seq
///   means nothing here and the runner reconciles the tables with the mirror instead
///   (`reconcile.rs`).
/// - **Rejections**: a row the database refuses (conversion, length, NOT NULL, constraint) is
///   isolated (savepoint per row) and reported with its reason; the rest of the batch commits.
///   Values are converted by column type before they are sent, so a value that cannot be
///   represented is rejected the same way by every backend.
/// - **Errors**: transient ones (connection lost, server restarting, deadlock, lock timeout) are
///   reported as such and the runner retries the batch forever with backoff; anything else is
///   fatal and stops the service with a clear line.
/// - **Durability**: a batch may hold changes the buffer is still syncing
///   ([`SinkBatch::commit_gate`]). A backend whose [`Destination::waits_at_commit`] is true
///   awaits the gate right before each `COMMIT` of the batch (so its statements overlap the
///   sync); for any other the runner awaits it before [`Destination::apply`].
/// - **Long units** (`long_unit.rs`): a unit longer than a batch may be written in parts
///   through one open transaction ([`Destination::apply_unit_part`], then
///   [`Destination::commit_unit`]), so that it is never held whole; a backend that does not
///   (the default) gets the whole unit in one [`Destination::apply`].
#[allow(async_fn_in_trait)]
pub trait Destination {
    /// Creates missing tables (when the mapping asks) and the checkpoint table, then reads each
    /// mapped table's schema. Every problem found is returned.
    async fn prepare(
        &mut self,
        mappings: &[Mapping],
    ) -> Result<Vec<TableSchema>, Vec<SchemaProblem>>;

    /// Every checkpoint row of the `writebehind` source, by name (the caller keeps its own:
    /// `partition::FoundRows`).
    async fn checkpoints(&mut self) -> Result<Vec<(String, SinkCheckpoint)>, SinkError>;

    /// Up to `limit` values of the key column of `schema`'s table greater than `after`, in key
    /// order (for reconciliation: rows whose key Redis no longer has are deleted).
    async fn row_ids(
        &mut self,
        schema: &TableSchema,
        after: Option<&SqlValue>,
        limit: usize,
    ) -> Result<Vec<SqlValue>, SinkError>;

    /// Whether [`Destination::apply`] awaits the batch's [`CommitGate`] before it commits
    /// (the default: no, the runner awaits it first).
    fn waits_at_commit(&self) -> bool {
        false
    }

    /// Applies a batch in one transaction with the checkpoint; returns the refused rows.
    async fn apply(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
        before_commit: &BeforeCommit,
    ) -> Result<Vec<Rejected>, SinkError>;

    /// Writes `batch`'s rows (a part of a unit too long to hold: `long_unit.rs`) in the
    /// transaction the unit keeps open across calls, begun by its first part: no checkpoint, no
    /// commit. Any failure ends that transaction (rolled back); a row the database refuses fails
    /// it with `RowRefused`, and the unit is then written whole with [`Destination::apply`].
    /// Returns `false` when the backend does not write units in parts (nothing was done).
    async fn apply_unit_part(
        &mut self,
        _schemas: &[TableSchema],
        _batch: &SinkBatch,
    ) -> Result<bool, SinkError> {
        Ok(false)
    }

    /// Writes `batch` (the long unit's last rows) and its checkpoint rows, and commits the
    /// unit's transaction. Fails as [`Destination::apply_unit_part`] does.
    async fn commit_unit(
        &mut self,
        _schemas: &[TableSchema],
        _batch: &SinkBatch,
    ) -> Result<(), SinkError> {
        Err(SinkError::fatal(
            "this backend does not write units in parts".to_string(),
        ))
    }

    /// Rolls back the open transaction of a long unit, if any.
    async fn abandon_unit(&mut self) {}
}

/// The configured backend, by URL scheme.
pub enum Sink {
    Mysql(mysql::MysqlSink),
    Postgres(postgres::PostgresSink),
    Sqlite(sqlite::SqliteSink),
}

impl Sink {
    /// Connects to the backend at `url` (`mysql://...`, `postgres://...` or `sqlite://path`).
    pub async fn connect(name: &str, url: &str) -> Result<Sink, SinkError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            Ok(Sink::Sqlite(sqlite::SqliteSink::open(name, path).await?))
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            Ok(Sink::Mysql(mysql::MysqlSink::connect(name, url).await?))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Sink::Postgres(
                postgres::PostgresSink::connect(name, url).await?,
            ))
        } else {
            Err(SinkError::fatal(format!(
                "backend `{name}`: unsupported URL scheme in `{}`",
                crate::config::redact(url)
            )))
        }
    }
}

impl Sink {
    /// What `check` should mention about this backend without failing (slower paths taken).
    /// How the connection is carried (TLS or plain text), for `check`; `None` for SQLite.
    pub async fn transport(&mut self) -> Option<Result<String, SinkError>> {
        match self {
            Sink::Mysql(s) => Some(s.transport().await),
            Sink::Postgres(s) => Some(s.transport().await),
            Sink::Sqlite(_) => None,
        }
    }

    pub async fn notes(&mut self) -> Vec<String> {
        match self {
            Sink::Mysql(s) => s.staging_notes().await,
            Sink::Postgres(s) => s.notes(),
            Sink::Sqlite(_) => Vec::new(),
        }
    }
}

impl Destination for Sink {
    /// Creates missing tables (when asked) and the checkpoint table, then reads each mapped
    /// table's schema. Every problem found is returned.
    async fn prepare(
        &mut self,
        mappings: &[Mapping],
    ) -> Result<Vec<TableSchema>, Vec<SchemaProblem>> {
        match self {
            Sink::Mysql(s) => s.prepare(mappings).await,
            Sink::Postgres(s) => s.prepare(mappings).await,
            Sink::Sqlite(s) => s.prepare(mappings).await,
        }
    }

    async fn checkpoints(&mut self) -> Result<Vec<(String, SinkCheckpoint)>, SinkError> {
        match self {
            Sink::Mysql(s) => s.checkpoints().await,
            Sink::Postgres(s) => s.checkpoints().await,
            Sink::Sqlite(s) => s.checkpoints().await,
        }
    }

    async fn row_ids(
        &mut self,
        schema: &TableSchema,
        after: Option<&SqlValue>,
        limit: usize,
    ) -> Result<Vec<SqlValue>, SinkError> {
        match self {
            Sink::Mysql(s) => s.row_ids(schema, after, limit).await,
            Sink::Postgres(s) => s.row_ids(schema, after, limit).await,
            Sink::Sqlite(s) => s.row_ids(schema, after, limit).await,
        }
    }

    fn waits_at_commit(&self) -> bool {
        match self {
            Sink::Mysql(s) => s.waits_at_commit(),
            Sink::Postgres(s) => s.waits_at_commit(),
            Sink::Sqlite(s) => s.waits_at_commit(),
        }
    }

    /// Applies a batch in one transaction with the checkpoint; returns the rejected rows.
    async fn apply(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
        before_commit: &BeforeCommit,
    ) -> Result<Vec<Rejected>, SinkError> {
        match self {
            Sink::Mysql(s) => s.apply(schemas, batch, before_commit).await,
            Sink::Postgres(s) => s.apply(schemas, batch, before_commit).await,
            Sink::Sqlite(s) => s.apply(schemas, batch, before_commit).await,
        }
    }

    async fn apply_unit_part(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
    ) -> Result<bool, SinkError> {
        match self {
            Sink::Mysql(s) => s.apply_unit_part(schemas, batch).await,
            Sink::Postgres(s) => s.apply_unit_part(schemas, batch).await,
            Sink::Sqlite(s) => s.apply_unit_part(schemas, batch).await,
        }
    }

    async fn commit_unit(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
    ) -> Result<(), SinkError> {
        match self {
            Sink::Mysql(s) => s.commit_unit(schemas, batch).await,
            Sink::Postgres(s) => s.commit_unit(schemas, batch).await,
            Sink::Sqlite(s) => s.commit_unit(schemas, batch).await,
        }
    }

    async fn abandon_unit(&mut self) {
        match self {
            Sink::Mysql(s) => s.abandon_unit().await,
            Sink::Postgres(s) => s.abandon_unit().await,
            Sink::Sqlite(s) => s.abandon_unit().await,
        }
    }
}

/// Quotes an identifier for MySQL/MariaDB (backticks) or SQLite (double quotes).
pub fn quote(identifier: &str, quote: char) -> String {
    let doubled = identifier.replace(quote, &format!("{quote}{quote}"));
    format!("{quote}{doubled}{quote}")
}
