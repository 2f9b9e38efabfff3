//! A long unit written in parts (`src/sink/long_unit.rs`): `BEGIN` with its first part, each
//! part's statements one after the other in the open transaction (as upserts, staged from
//! `COPY_THRESHOLD` rows as a batch would be, each stage emptied before it is filled again),
//! and with the last part the checkpoint rows and `COMMIT`.
//!
//! PostgreSQL refuses every later statement of a transaction once one failed, so any failure,
//! a refused row included, ends the unit: the connection is dropped (the server rolls the unit
//! back), and the runner writes the unit whole (a refused row) or again (an outage).

use super::grouped::{checked_writes, checkpoint_statements, run_in_turn, CheckpointNumbers};
use super::{classify, PostgresSink};
use crate::sink::{SinkBatch, SinkError, TableSchema};

impl PostgresSink {
    /// Writes a part of a long unit; with `commit`, its checkpoint rows and the commit.
    pub(super) async fn write_unit_part(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
        commit: bool,
    ) -> Result<(), SinkError> {
        let written = self.try_unit_part(schemas, batch, commit).await;
        if written.is_err() || commit {
            self.in_unit = false;
        }
        if let Err(e) = written {
            // Not trusted after a failure (the unit's transaction is open or failed): the
            // server rolls it back when the connection closes.
            self.client = None;
            return Err(e.context(self.place()));
        }
        Ok(())
    }

    async fn try_unit_part(
        &mut self,
        schemas: &[TableSchema],
        batch: &SinkBatch,
        commit: bool,
    ) -> Result<(), SinkError> {
        if !self.in_unit {
            self.types_for(schemas).await?;
            self.client().await?;
        }
        if let Some(write) = batch.writes.iter().find(|w| w.table >= self.types.len()) {
            return Err(SinkError::fatal(format!(
                "a write to table {} of {} prepared; this is a bug, restart the service",
                write.table,
                self.types.len()
            )));
        }
        let Some(client) = self.client.as_ref().filter(|c| !c.is_closed()) else {
            return Err(SinkError::transient(
                "the connection holding a long unit's transaction is gone",
            ));
        };
        let tables = self
            .types
            .iter()
            .enumerate()
            .map(|(index, types)| checked_writes(batch, index, types))
            .collect::<Result<Vec<_>, _>>()?;
        if !self.in_unit {
            client.batch_execute("BEGIN").await.map_err(classify)?;
        }
        self.in_unit = true;
        self.write_in_turn(client, tables, true)
            .await
            .map_err(classify)?;
        if commit {
            let numbers = CheckpointNumbers::of(batch);
            run_in_turn(client, &checkpoint_statements(batch, &numbers))
                .await
                .map_err(classify)?;
            client.batch_execute("COMMIT").await.map_err(classify)?;
        }
        Ok(())
    }

    /// Drops a long unit's open transaction with its connection.
    pub(super) fn abandon_unit_transaction(&mut self) {
        if self.in_unit {
            self.in_unit = false;
            self.client = None;
        }
    }
}
