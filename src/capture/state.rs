//! What capture's parts share: the buffer, the mappings, the primary's command table, the
//! checkpoint with the numbering of the change log, the `#` op state and the counters.

use std::sync::Arc;

use super::apply::Applier;
use super::clock::PrimaryClock;
use super::command_table::CommandTable;
use super::mapping::Mappings;
use super::mirror_cache::MirrorCache;
use super::ops::OpState;
use super::rows::RowEvent;
use super::CaptureStats;
use crate::buffer::{ChangeParts, Checkpoint, EncodedChanges, Name, Store};
use crate::position::{ChangeSeq, ReplOffset};

pub struct CaptureState {
    pub store: Arc<Store>,
    pub mappings: Mappings,
    pub commands: CommandTable,
    /// Where capture stands; written with every batch of the data it describes.
    pub checkpoint: Checkpoint,
    pub ops: OpState,
    pub stats: CaptureStats,
    /// The primary's clock, sampled with the link.
    pub clock: PrimaryClock,
    /// The mirror as of the last commit, in memory.
    pub cache: MirrorCache,
    /// The row events of the last batch (at most [`ROWS_HINT_LIMIT`]): room the next batch
    /// makes for its own, rather than growing its vector step by step.
    pub last_batch_rows: usize,
    /// The keys the last batch touched (at most [`ROWS_HINT_LIMIT`]): room the next batch's
    /// working set makes for its own (growing its table step by step rehashed every key
    /// again: 2% of capture's thread, scripts/bench-instructions.sh).
    pub last_batch_keys: usize,
}

/// The most row events (and keys) a batch makes room for before it has any.
pub const ROWS_HINT_LIMIT: usize = 16_384;

impl CaptureState {
    /// An applier of the current generation; `ops`: whether `#` is the op field (false for the
    /// raw states, which follow Redis exactly).
    pub fn applier(&self, ops: bool) -> Applier<'_> {
        Applier {
            mappings: &self.mappings,
            commands: &self.commands,
            generation: self.checkpoint.generation,
            ops,
            clock: &self.clock,
        }
    }

    /// The offset of the checkpoint (0 before the first full sync).
    pub fn offset(&self) -> ReplOffset {
        self.checkpoint
            .position
            .as_ref()
            .map(|p| p.offset)
            .unwrap_or_default()
    }

    /// Numbers one unit of row events onto `changes`: consecutive seqs, the first one naming
    /// the unit, the last one ending it. `counts` tallies them per mapping and operation, for
    /// the metrics (counted once per commit: a labelled counter costs a lookup).
    pub fn number_unit(
        &mut self,
        changes: &mut EncodedChanges,
        events: impl ExactSizeIterator<Item = RowEvent>,
        offset: ReplOffset,
        counts: &mut ChangeCounts,
    ) {
        let unit = self.checkpoint.next_seq;
        self.number_rows(changes, events, (unit, offset, true), counts);
    }

    /// Numbers row events of unit `unit` (the seq of its first change) from the next seq on,
    /// each recorded at `offset`; the last one ends the unit when `ends` (a long unit's parts
    /// end nothing: `long_unit.rs`).
    pub fn number_rows(
        &mut self,
        changes: &mut EncodedChanges,
        events: impl ExactSizeIterator<Item = RowEvent>,
        (unit, offset, ends): (ChangeSeq, ReplOffset, bool),
        counts: &mut ChangeCounts,
    ) {
        let count = events.len();
        for (i, event) in events.enumerate() {
            counts.add(&event.mapping, event.row.is_delete());
            changes.push_parts(&ChangeParts {
                seq: self.checkpoint.next_seq,
                unit,
                unit_end: ends && i + 1 == count,
                offset,
                mapping: &event.mapping,
                row_id: &event.row_id,
                row: event.row.as_ref(),
                op: event.op.as_ref(),
            });
            self.checkpoint.next_seq = self.checkpoint.next_seq.next();
            self.stats.changes += 1;
        }
    }
}

/// Changes written, per mapping and operation, until [`ChangeCounts::report`].
#[derive(Default)]
pub struct ChangeCounts {
    /// Per mapping: upserts, deletes. A few mappings, each change naming one by the mapping's
    /// own shared name: found by address first, without hashing the name per change.
    counts: Vec<(Name, [u64; 2])>,
}

impl ChangeCounts {
    fn add(&mut self, mapping: &Name, delete: bool) {
        let slot = usize::from(delete);
        // `Arc`'s equality compares addresses first (the mapping's own name): no hashing.
        let found = self.counts.iter_mut().find(|(m, _)| m == mapping);
        match found {
            Some((_, n)) => n[slot] += 1,
            None => {
                let mut n = [0; 2];
                n[slot] = 1;
                self.counts.push((mapping.clone(), n));
            }
        }
    }

    /// Adds the counts to `writebehind_changes_total`.
    pub fn report(self) {
        for (mapping, [upserts, deletes]) in self.counts {
            for (operation, n) in [("upsert", upserts), ("delete", deletes)] {
                if n > 0 {
                    metrics::counter!("writebehind_changes_total", "mapping" => mapping.to_string(), "operation" => operation).increment(n);
                }
            }
        }
    }
}
