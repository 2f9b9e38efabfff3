//! An in-memory [`Destination`] for the runner's own unit tests: it keeps the contract's
//! bookkeeping (checkpoint with the rows, refused rows reported, transient failures on demand)
//! without a database. Real databases prove every feature (tests/); this only lets the runner's
//! logic be tested in isolation.

use std::collections::{BTreeMap, HashSet};

use super::convert::{ColumnType, SqlValue};
use super::{
    BeforeCommit, ColumnInfo, Destination, Rejected, RowOp, SchemaProblem, SinkBatch,
    SinkCheckpoint, SinkError, TableSchema,
};
use crate::capture::mapping::Mapping;

/// Rows per table (by key), the checkpoint, and the failures to simulate.
#[derive(Debug, Default)]
pub struct MemoryDestination {
    pub tables: BTreeMap<String, BTreeMap<String, Vec<SqlValue>>>,
    /// The checkpoint rows, by name.
    pub checkpoints: BTreeMap<String, SinkCheckpoint>,
    /// The next this many `apply` calls fail with a transient error.
    pub fail_next: u32,
    /// The next this many `apply` calls commit, then report a lost connection (a COMMIT that
    /// reached the database while its answer did not).
    pub lose_answer_next: u32,
    /// Keys whose upsert the "database" refuses.
    pub refuse: HashSet<String>,
    /// Batches committed.
    pub commits: u32,
    /// Whether long units are written in parts (`Destination::apply_unit_part`).
    pub streams: bool,
    /// The tables as a long unit's open transaction has them.
    pub open_unit: Option<BTreeMap<String, BTreeMap<String, Vec<SqlValue>>>>,
    /// Parts of long units written.
    pub unit_parts: u32,
    /// The largest batch (in writes) handed over.
    pub largest_batch: usize,
    /// The part with this number (counted from 1 over every attempt) fails once, as an outage
    /// (0: none).
    pub fail_part: u32,
    /// Parts attempted (written or failed).
    pub parts_attempted: u32,
    /// What runs when `row_ids` is called and before `apply` writes a batch.
    pub hooks: Hooks,
}

/// A call a test makes when a batch is applied.
pub type ApplyHook = Box<dyn FnMut(&SinkBatch) + Send>;

/// Calls a test makes at given points of the destination's work.
#[derive(Default)]
pub struct Hooks {
    pub row_ids: Option<Box<dyn FnMut() + Send>>,
    pub apply: Option<ApplyHook>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("row_ids", &self.row_ids.is_some())
            .field("apply", &self.apply.is_some())
            .finish()
    }
}

fn text_column(name: &str) -> ColumnInfo {
    ColumnInfo {
        name: name.to_string(),
        kind: ColumnType::Text { max_chars: None },
        nullable: true,
    }
}

/// Keys are text columns here: the row id as text.
fn key_text(id: &SqlValue) -> String {
    match id {
        SqlValue::Text(text) => text.clone(),
        other => format!("{other:?}"),
    }
}

impl Destination for MemoryDestination {
    async fn prepare(
        &mut self,
        mappings: &[Mapping],
    ) -> Result<Vec<TableSchema>, Vec<SchemaProblem>> {
        Ok(mappings
            .iter()
            .map(|m| {
                self.tables.entry(m.table.clone()).or_default();
                TableSchema {
                    table: m.table.clone(),
                    key_column: text_column(&m.key_column),
                    columns: m.columns.iter().map(|(_, c)| text_column(c)).collect(),
                    required: m.required.clone(),
                }
            })
            .collect())
    }

    async fn checkpoints(&mut self) -> Result<Vec<(String, SinkCheckpoint)>, SinkError> {
        Ok(self.checkpoints.clone().into_iter().collect())
    }

    async fn row_ids(
        &mut self,
        schema: &TableSchema,
        after: Option<&SqlValue>,
        limit: usize,
    ) -> Result<Vec<SqlValue>, SinkError> {
        if let Some(hook) = self.hooks.row_ids.as_mut() {
            hook();
        }
        let after = after.map(key_text);
        Ok(self
            .tables
            .get(&schema.table)
            .into_iter()
            .flat_map(|rows| rows.keys())
            .filter(|id| after.as_ref().is_none_or(|a| *id > a))
            .take(limit)
            .map(|id| SqlValue::Text(id.clone()))
            .collect())
    }

    async fn apply(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
        before_commit: &BeforeCommit,
    ) -> Result<Vec<Rejected>, SinkError> {
        if self.fail_next > 0 {
            self.fail_next -= 1;
            return Err(SinkError::transient("memory: simulated outage"));
        }
        if let Some(hook) = self.hooks.apply.as_mut() {
            hook(batch);
        }
        let mut tables = self.tables.clone();
        let rejected = self.write(&mut tables, schemas, batch);
        before_commit(&rejected)
            .map_err(|e| SinkError::fatal("memory: cannot store refused rows").caused_by(e))?;
        self.commit(tables, batch)?;
        Ok(rejected)
    }

    async fn apply_unit_part(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
    ) -> Result<bool, SinkError> {
        if !self.streams {
            return Ok(false);
        }
        let mut tables = self.open_unit.take().unwrap_or_else(|| self.tables.clone());
        self.write_part(&mut tables, schemas, batch)?;
        self.open_unit = Some(tables);
        self.unit_parts += 1;
        Ok(true)
    }

    async fn commit_unit(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
    ) -> Result<(), SinkError> {
        let mut tables = self.open_unit.take().unwrap_or_else(|| self.tables.clone());
        self.write_part(&mut tables, schemas, batch)?;
        self.commit(tables, batch)
    }

    async fn abandon_unit(&mut self) {
        self.open_unit = None;
    }
}

impl MemoryDestination {
    /// Writes a part of a long unit: a simulated outage or a refused row fails it (the caller
    /// then abandons the unit).
    fn write_part(
        &mut self,
        tables: &mut BTreeMap<String, BTreeMap<String, Vec<SqlValue>>>,
        schemas: &[TableSchema],
        batch: &SinkBatch,
    ) -> Result<(), SinkError> {
        self.parts_attempted += 1;
        if self.fail_next > 0 || self.parts_attempted == self.fail_part {
            self.fail_next = self.fail_next.saturating_sub(1);
            return Err(SinkError::transient("memory: simulated outage"));
        }
        match self.write(tables, schemas, batch).first() {
            Some(refused) => Err(SinkError::new(
                super::SinkErrorKind::RowRefused,
                refused.reason.clone(),
            )),
            None => Ok(()),
        }
    }

    /// Applies the batch's writes to `tables`; returns the refused rows.
    fn write(
        &mut self,
        tables: &mut BTreeMap<String, BTreeMap<String, Vec<SqlValue>>>,
        schemas: &[TableSchema],
        batch: &SinkBatch,
    ) -> Vec<Rejected> {
        self.largest_batch = self.largest_batch.max(batch.writes.len());
        let mut rejected = Vec::new();
        for write in &batch.writes {
            // Every connection of a backend writes to the same tables (only the first one is
            // prepared).
            let Some(rows) = schemas
                .get(write.table)
                .map(|s| tables.entry(s.table.clone()).or_default())
            else {
                continue;
            };
            match &write.op {
                RowOp::Delete { id } => {
                    rows.remove(&key_text(id));
                }
                RowOp::Upsert { id, .. } if self.refuse.contains(&key_text(id)) => {
                    rejected.push(Rejected {
                        seq: write.seq,
                        reason: "refused by the memory destination".into(),
                    })
                }
                RowOp::Upsert { id, values } => {
                    rows.insert(key_text(id), values.clone());
                }
            }
        }
        rejected
    }

    /// Commits `tables` with the batch's checkpoint rows (or, as asked, loses the answer).
    fn commit(
        &mut self,
        tables: BTreeMap<String, BTreeMap<String, Vec<SqlValue>>>,
        batch: &SinkBatch,
    ) -> Result<(), SinkError> {
        self.tables = tables;
        for row in &batch.checkpoint_rows {
            let checkpoint = SinkCheckpoint {
                seq: batch.last_seq,
                buffer_id: Some(batch.buffer_id.clone()),
                mappings_id: Some(batch.mappings_id.clone()),
            };
            self.checkpoints.insert(row.clone(), checkpoint);
        }
        for row in &batch.retire_rows {
            self.checkpoints.remove(row);
        }
        self.commits += 1;
        if self.lose_answer_next > 0 {
            self.lose_answer_next -= 1;
            return Err(SinkError::transient(
                "memory: simulated lost answer to COMMIT",
            ));
        }
        Ok(())
    }
}
