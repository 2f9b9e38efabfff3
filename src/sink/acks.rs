//! The client acknowledgements a backend queues (`#` ops, docs/op-field.md): after each
//! partition's commit for the changes it applied, and at start for what a crash left between a
//! commit and its queueing. The marker `acks_enqueued` is kept per checkpoint row
//! (`partition.rs`), in the same buffer write as the acks, so each ack is queued once.

use std::collections::HashMap;

use super::reconcile::RECONCILE_LETTERS;
use super::runner::SinkRunner;
use super::Destination;
use crate::buffer::{Batch, Change, NewAck, StoreError};
use crate::position::ChangeSeq;

/// One partition's acks of a batch, with their change seqs, and its marker: the checkpoint row
/// and the seq its acks are queued through.
pub(super) type AckShare = (String, ChangeSeq, Vec<(ChangeSeq, NewAck)>);

impl<D: Destination> SinkRunner<D> {
    /// Queues the acks of changes this backend committed before a crash left them unqueued
    /// (between a partition's database commit and its ack queue write).
    pub(super) fn catch_up_acks(&self) -> Result<(), StoreError> {
        let mut behind = Vec::new();
        for (partition, applied) in self.applied.iter().enumerate() {
            let row = self.row(partition);
            let enqueued = self.store.acks_enqueued(&row)?;
            if enqueued < *applied {
                behind.push((partition, row, enqueued, *applied));
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        let (mut letters, mut reconciled) = (HashMap::new(), HashMap::new());
        for letter in self.store.dead_letters()? {
            if letter.backend != self.name {
                continue;
            }
            if letter.seq.0 >= RECONCILE_LETTERS {
                // A row refused by a reconciliation belongs to no change: by row.
                reconciled.insert((letter.mapping, letter.row_id), letter.reason);
            } else {
                letters.insert(letter.seq, letter.reason);
            }
        }
        let refused = |c: &Change| {
            letters.get(&c.seq).cloned().or_else(|| {
                reconciled
                    .get(&(c.mapping.to_string(), c.row_id.clone()))
                    .cloned()
            })
        };
        // One pass over the change log for every partition behind, each chunk queued in one
        // write in stream order (see `queue_shares`).
        let lowest = behind.iter().map(|b| b.2).min().unwrap_or_default();
        let highest = behind.iter().map(|b| b.3).max().unwrap_or_default();
        let mut from = lowest.next();
        loop {
            let changes: Vec<Change> = self
                .store
                .changes(from, self.batch_limit)?
                .into_iter()
                .take_while(|c| c.seq <= highest)
                .collect();
            let Some(last) = changes.last().map(|c| c.seq) else {
                break;
            };
            from = last.next();
            let shares = behind
                .iter()
                .filter(|(_, _, enqueued, _)| last > *enqueued)
                .map(|(partition, row, enqueued, applied)| {
                    let mine: Vec<Change> = changes
                        .iter()
                        .filter(|c| c.seq > *enqueued && c.seq <= *applied)
                        .filter(|c| self.partition(c) == *partition)
                        .cloned()
                        .collect();
                    let through = last.min(*applied);
                    (row.clone(), through, self.acks_of(&mine, refused))
                })
                .collect();
            self.queue_shares(shares)?;
        }
        Ok(())
    }

    /// The acks of this backend's `changes` that carry a `#` op uuid, with their change's seq:
    /// failed with the reason `refused` gives, done otherwise.
    pub(super) fn acks_of(
        &self,
        changes: &[Change],
        refused: impl Fn(&Change) -> Option<String>,
    ) -> Vec<(ChangeSeq, NewAck)> {
        changes
            .iter()
            .filter_map(|c| c.op.as_ref().map(|op| (c, op)))
            .filter(|(c, _)| self.mappings.iter().any(|m| m.name == c.mapping))
            .map(|(change, op)| {
                let ack = NewAck {
                    db: op.db,
                    key: op.key.clone(),
                    uuid: op.uuid.clone(),
                    failure: refused(change),
                    offset: change.offset,
                };
                (change.seq, ack)
            })
            .collect()
    }

    /// Queues the acks of several partitions' shares of one batch in one write, in change-log
    /// order across the shares (the write-back task writes them in queue order, and the acked
    /// position stops before the first one queued: queued per share, a later share's earlier
    /// changes would sit behind an earlier share's later ones); with each share's marker
    /// `(row, through)`. By seq, not by offset: offsets start again with a new replication
    /// history, seqs never do.
    pub(super) fn queue_shares(&self, shares: Vec<AckShare>) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        let mut acks = Vec::new();
        for (row, through, share) in shares {
            if !share.is_empty() {
                batch.put_acks_enqueued(&row, through);
                acks.extend(share);
            }
        }
        if acks.is_empty() {
            return Ok(());
        }
        // Stable: a change's own acks keep their order.
        acks.sort_by_key(|(seq, _)| *seq);
        batch.put_acks(acks.into_iter().map(|(_, ack)| ack).collect());
        self.store.write(batch, false)?;
        self.writeback.acks_queued();
        Ok(())
    }
}
