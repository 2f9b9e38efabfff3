//! Reconciliation: when a backend's checkpoint row cannot be trusted for this buffer, its
//! tables are made equal to the mirror instead of skipping anything (docs/design.md section
//! 8.5).
//!
//! # When
//!
//! [`Reconcile::needed`] compares the checkpoint row with the buffer at start:
//! - the row belongs to **another buffer** (a buffer lost or replaced; seqs start again at 1 in
//!   the new one, so "applied through N" means nothing), or predates buffer identities, or is the
//!   marker of an interrupted reconciliation;
//! - the row is **ahead of the buffer** (a buffer restored from an older copy);
//! - a **gap**: changes this backend never applied were trimmed (a backend added while others
//!   moved on);
//! - the backend's **mappings changed** (table, columns, key, prefix, db, required).
//!
//! # How
//!
//! 1. The row is set to a marker (no buffer, seq 0), so a crash anywhere below starts over.
//! 2. Wait until capture holds a complete mirror (no full sync in progress; in a cluster, every
//!    shard's); `S` is the last seq buffered then.
//! 3. Per mapping: delete every row whose key Redis does not have (key column read in pages,
//!    each id looked up in the mirror; in a cluster, in every shard's mirror); then upsert every watched hash of the mirror. The
//!    buffer is synced before each page is written: what was read of the mirror is on disk.
//! 4. The row records this buffer, these mappings and `S`; the runner continues from `S + 1`.
//!
//! Every write is an idempotent upsert or delete, and the change log after `S` is applied
//! afterwards in order, so rows end equal to Redis whatever capture did meanwhile. Rows the
//! database refuses are dead-lettered with ids above 2^63 (they belong to no change).

use std::fmt;
use std::time::Duration;

use bytes::Bytes;

use super::coalesce::convert_row;
use super::convert::{convert, SqlValue};
use super::partition::FoundRows;
use super::{Destination, RowOp, RowWrite, SinkBatch};
use crate::buffer::{Batch, DeadLetter, MirrorCursor, MirrorKind, Store, StoreError};
use crate::clock::now_ms;
use crate::position::{ChangeSeq, ReplOffset};

/// Rows read or written per round of a reconciliation.
const PAGE: usize = 1_000;
/// Dead letters of a reconciliation are numbered from here (change seqs never get there).
pub const RECONCILE_LETTERS: u64 = 1 << 63;

/// Why a backend's tables are reconciled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconcile {
    OtherBuffer {
        found: String,
    },
    NoIdentity,
    Ahead {
        database: ChangeSeq,
        buffer: ChangeSeq,
    },
    Gap {
        applied: ChangeSeq,
        first: ChangeSeq,
    },
    MappingsChanged,
    /// Checkpoint rows of several partition counts at once (the service never leaves them so).
    SeveralLayouts {
        counts: Vec<u32>,
    },
}

impl fmt::Display for Reconcile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reconcile::OtherBuffer { found } if found.is_empty() => {
                f.write_str("a reconciliation was interrupted")
            }
            Reconcile::OtherBuffer { found } => write!(
                f,
                "the database's checkpoint belongs to another buffer ({found}): the buffer was lost or replaced"
            ),
            Reconcile::NoIdentity => {
                f.write_str("the database's checkpoint does not say which buffer it belongs to")
            }
            Reconcile::Ahead { database, buffer } => write!(
                f,
                "the database's checkpoint (change {database}) is ahead of the buffer (change {buffer})"
            ),
            Reconcile::Gap { applied, first } => write!(
                f,
                "changes after {applied} were trimmed before this backend applied them (the change log starts at {first})"
            ),
            Reconcile::MappingsChanged => {
                f.write_str("the backend's mappings changed since its rows were written")
            }
            Reconcile::SeveralLayouts { counts } => write!(
                f,
                "the database has checkpoint rows of several partition counts ({counts:?})"
            ),
        }
    }
}

impl Reconcile {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Reconcile::OtherBuffer { .. } => "other_buffer",
            Reconcile::NoIdentity => "no_identity",
            Reconcile::Ahead { .. } => "ahead",
            Reconcile::Gap { .. } => "gap",
            Reconcile::MappingsChanged => "mappings",
            Reconcile::SeveralLayouts { .. } => "several_layouts",
        }
    }

    /// Whether the checkpoint rows `found` of `backend` can be trusted for `store` and
    /// `mappings_id`; why not otherwise.
    pub fn needed(
        found: &FoundRows,
        backend: &str,
        store: &Store,
        mappings_id: &str,
    ) -> Result<Option<Reconcile>, StoreError> {
        let layouts = found.layouts(backend);
        if layouts.len() > 1 {
            return Ok(Some(Reconcile::SeveralLayouts { counts: layouts }));
        }
        let row = found.merged(backend);
        let buffered = store.checkpoint()?.next_seq.previous().unwrap_or_default();
        let first = store
            .changes(ChangeSeq::NONE, 1)?
            .first()
            .map(|c| c.seq)
            .unwrap_or(buffered.next());
        let exists = !found.rows.is_empty();
        if exists {
            match row.buffer_id.as_deref() {
                None => return Ok(Some(Reconcile::NoIdentity)),
                Some(id) if id != store.identity() => {
                    return Ok(Some(Reconcile::OtherBuffer {
                        found: id.to_string(),
                    }))
                }
                Some(_) => {}
            }
            if found.highest() > buffered {
                return Ok(Some(Reconcile::Ahead {
                    database: found.highest(),
                    buffer: buffered,
                }));
            }
            if row.mappings_id.as_deref() != Some(mappings_id) {
                return Ok(Some(Reconcile::MappingsChanged));
            }
        }
        if buffered > row.seq && first > row.seq.next() {
            return Ok(Some(Reconcile::Gap {
                applied: row.seq,
                first,
            }));
        }
        Ok(None)
    }
}

impl<D: Destination> super::runner::SinkRunner<D> {
    /// Makes this backend's tables equal to the mirror (see the module doc). Returns `false`
    /// when `stop` resolved before the mirror was complete (the next start reconciles).
    pub(super) async fn reconcile(
        &mut self,
        reason: &Reconcile,
        stop: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<bool, super::runner::RunnerError> {
        tracing::warn!(backend = %self.name, %reason, "reconciling the tables with the mirror instead of trusting the database's checkpoint");
        metrics::counter!("writebehind_reconciliations_total", "backend" => self.name.clone(), "reason" => reason.label()).increment(1);
        self.commit_stamp(ChangeSeq::NONE, ReplOffset(0), String::new())
            .await?;
        let Some(through) = self.complete_mirror(stop).await? else {
            return Ok(false);
        };
        let (mut deleted, mut upserted) = (0u64, 0u64);
        for index in 0..self.schemas.len() {
            deleted += self.delete_absent_rows(index).await?;
            upserted += self.upsert_mirror(index).await?;
        }
        let offset = self
            .store
            .checkpoint()?
            .position
            .map(|p| p.offset)
            .unwrap_or_default();
        let identity = self.store.identity().to_string();
        self.commit_stamp(through, offset, identity).await?;
        self.applied = vec![through; self.layout as usize];
        tracing::info!(backend = %self.name, deleted, upserted, through = %through, "reconciled");
        Ok(true)
    }

    /// Waits until capture holds a complete mirror; the last seq buffered then (`None`: stop).
    async fn complete_mirror(
        &self,
        stop: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<Option<ChangeSeq>, StoreError> {
        loop {
            let notified = self.notify.notified();
            // Synced first: the checkpoint read may be a commit not synced yet
            // (`buffer/durability.rs`), and what is recorded in the database must never be
            // ahead of the buffer after a crash.
            self.store.sync()?;
            let checkpoint = self.store.checkpoint()?;
            // In a cluster, every shard's mirror too (`cluster/peers.rs`).
            let peers_complete = match &self.peers {
                Some((_, peers)) => peers.mirrors_complete()?,
                None => true,
            };
            if checkpoint.position.is_some() && !checkpoint.full_sync_in_progress && peers_complete
            {
                return Ok(Some(checkpoint.next_seq.previous().unwrap_or_default()));
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.as_mut() => return Ok(None),
            }
        }
    }

    /// Writes only the checkpoint rows, all of the runner's layout (the rows of any other are
    /// deleted): `buffer_id` empty marks a reconciliation in progress. The layout is the rows'
    /// own (their acknowledgement markers stay meaningful); the runner switches to the
    /// configured one afterwards.
    async fn commit_stamp(
        &mut self,
        seq: ChangeSeq,
        offset: ReplOffset,
        buffer_id: String,
    ) -> Result<(), super::runner::RunnerError> {
        let rows: Vec<String> = (0..self.layout as usize)
            .map(|index| self.row(index))
            .collect();
        let batch = SinkBatch {
            // Written from the mirror, not from changes in a sync window: nothing to wait for.
            commit_gate: Default::default(),
            writes: Vec::new(),
            last_seq: seq,
            replid: self.replid()?,
            offset,
            buffer_id,
            mappings_id: self.mappings_id.clone(),
            retire_rows: self
                .existing_rows
                .iter()
                .filter(|row| !rows.contains(row))
                .cloned()
                .collect(),
            checkpoint_rows: rows,
        };
        self.apply_on_first(&batch).await?;
        self.existing_rows = batch.checkpoint_rows.iter().cloned().collect();
        Ok(())
    }

    /// Deletes the rows of table `index` whose key Redis does not have; returns how many.
    async fn delete_absent_rows(
        &mut self,
        index: usize,
    ) -> Result<u64, super::runner::RunnerError> {
        let (schema, mapping) = (self.schemas[index].clone(), self.mappings[index].clone());
        let mut after: Option<SqlValue> = None;
        let mut deleted = 0;
        while let Some(sink) = self.sinks.first_mut() {
            let ids = sink.row_ids(&schema, after.as_ref(), PAGE).await?;
            let Some(last) = ids.last().cloned() else {
                break;
            };
            let mut writes = Vec::new();
            for id in ids {
                let mut key = mapping.key_prefix.to_vec();
                key.extend_from_slice(&id_text(&id));
                let present = self
                    .store
                    .mirror(mapping.db, &key)?
                    .is_some_and(|v| v.kind == MirrorKind::Hash && !v.fields.is_empty())
                    || match &self.peers {
                        Some((shard, peers)) => peers.others_hold(shard, mapping.db, &key)?,
                        None => false,
                    };
                if !present {
                    writes.push(RowWrite {
                        table: index,
                        seq: ChangeSeq::NONE,
                        row_id: Bytes::from(id_text(&id)),
                        delete_first: false,
                        op: RowOp::Delete { id },
                    });
                }
            }
            deleted += writes.len() as u64;
            self.write_reconciled(writes).await?;
            after = Some(last);
        }
        Ok(deleted)
    }

    /// Upserts every watched hash of table `index`'s mapping; returns how many.
    async fn upsert_mirror(&mut self, index: usize) -> Result<u64, super::runner::RunnerError> {
        let (schema, mapping) = (self.schemas[index].clone(), self.mappings[index].clone());
        let mut cursor = Some(MirrorCursor::default());
        let mut upserted = 0;
        while let Some(from) = cursor.take() {
            let page = self.store.mirror_scan(Some(mapping.db), &from, PAGE)?;
            cursor = page.next;
            let mut writes = Vec::new();
            let mut refused = Vec::new();
            for (_, key, value) in page.entries {
                if !key.starts_with(&mapping.key_prefix)
                    || key.len() == mapping.key_prefix.len()
                    || value.kind != MirrorKind::Hash
                    || value.fields.is_empty()
                {
                    continue;
                }
                // A large hash: its header and mapped fields read again together (capture may
                // have changed it since the page was read).
                let value = match value.fields.window() {
                    None => value,
                    Some(_) => {
                        let fields = mapping.mapped_fields();
                        match self.store.mirror_with_fields(mapping.db, &key, fields)? {
                            Some(value) if !value.fields.is_empty() => value,
                            _ => continue,
                        }
                    }
                };
                let row_id = mapping.row_id(&key);
                let key_column = &schema.key_column;
                let converted = convert(&key_column.kind, &key_column.name, Some(&row_id))
                    .map_err(|r| format!("key {r}"))
                    .and_then(|id| {
                        convert_row(&schema, &mapping.row_image(&value.fields))
                            .map(|values| (id, values))
                            .map_err(|r| r.0)
                    });
                match converted {
                    Ok((id, values)) => writes.push(RowWrite {
                        table: index,
                        seq: ChangeSeq::NONE,
                        row_id,
                        delete_first: false,
                        op: RowOp::Upsert { id, values },
                    }),
                    Err(reason) => refused.push((row_id, reason)),
                }
            }
            upserted += writes.len() as u64;
            self.dead_letter_reconciled(&mapping.name, refused)?;
            self.write_reconciled(writes).await?;
        }
        Ok(upserted)
    }

    /// Applies reconciliation writes (the checkpoint row keeps its marker); rows the database
    /// refuses are dead-lettered.
    async fn write_reconciled(
        &mut self,
        mut writes: Vec<RowWrite>,
    ) -> Result<(), super::runner::RunnerError> {
        if writes.is_empty() {
            return Ok(());
        }
        // The values were read from the mirror, which capture goes on writing meanwhile (a full
        // sync's batches, a commit's mirror entries) before it syncs them: synced now, so that
        // no value reaches the database that a crash of the machine could take from the buffer.
        self.store.sync()?;
        // Each write gets a dead-letter id of its own, should the database refuse it.
        let first = self.take_reconcile_letters(writes.len());
        for (n, write) in writes.iter_mut().enumerate() {
            write.seq = ChangeSeq(first + n as u64);
        }
        let batch = SinkBatch {
            // Written from the mirror, not from changes in a sync window: nothing to wait for.
            commit_gate: Default::default(),
            writes,
            last_seq: ChangeSeq::NONE,
            replid: self.replid()?,
            offset: ReplOffset(0),
            buffer_id: String::new(),
            mappings_id: self.mappings_id.clone(),
            checkpoint_rows: Vec::new(),
            retire_rows: Vec::new(),
        };
        self.apply_on_first(&batch).await?;
        Ok(())
    }

    /// Rows refused before reaching the database during a reconciliation.
    fn dead_letter_reconciled(
        &mut self,
        mapping: &str,
        refused: Vec<(Bytes, String)>,
    ) -> Result<(), StoreError> {
        if refused.is_empty() {
            return Ok(());
        }
        let first = self.take_reconcile_letters(refused.len());
        let mut batch = Batch::default();
        for (n, (row_id, reason)) in refused.into_iter().enumerate() {
            tracing::warn!(backend = %self.name, %mapping, row = %String::from_utf8_lossy(&row_id), %reason, "row refused; moved to the dead-letter store");
            batch.put_dead_letter(&DeadLetter {
                seq: ChangeSeq(first + n as u64),
                backend: self.name.clone(),
                mapping: mapping.to_string(),
                row_id,
                reason,
                at_ms: now_ms(),
            });
        }
        metrics::counter!("writebehind_dead_letters_total", "backend" => self.name.clone())
            .increment(batch.len() as u64);
        self.store.write(batch, true)
    }

    /// Reserves `count` dead-letter ids of a reconciliation; returns the first.
    fn take_reconcile_letters(&mut self, count: usize) -> u64 {
        let first = self.reconcile_letters;
        self.reconcile_letters += count as u64;
        first
    }
}

/// A key column value as the text of a row id.
fn id_text(id: &SqlValue) -> Vec<u8> {
    match id {
        SqlValue::Null => Vec::new(),
        SqlValue::Int(i) => i.to_string().into_bytes(),
        SqlValue::UInt(u) => u.to_string().into_bytes(),
        SqlValue::Float(f) => f.to_string().into_bytes(),
        SqlValue::Text(t) => t.as_bytes().to_vec(),
        SqlValue::Bytes(b) => b.clone(),
    }
}
