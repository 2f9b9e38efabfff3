//! Hand-overs, the capture side (the protocol is in `cluster/peers.rs`): another shard's
//! runner, about to delete the row of a key that may have moved here, asks which of its keys
//! this shard holds once capture has captured through an offset of this shard's primary.
//!
//! Checks wait in [`Holds::pending`] until capture's position reaches their offset (or a full
//! sync has rebuilt the mirror since they came: its snapshot is later than the offset), and no
//! full sync is in progress and no transaction is open. Then, in one batch, each key whose row
//! this shard holds gets a change that writes the row as the mirror has it now (a unit of its
//! own, as a dead-letter retry does), recorded as waiting for the asking runner's batch; the
//! batch is made durable before the answer, so the asker never drops a delete that nothing
//! replaces.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::rows::{row_of, RowEvent};
use super::{Capture, CaptureError};
use crate::buffer::RowChange;
use crate::cluster::peers::{HoldCheck, Peers};
use crate::position::DurableOffset;

/// The checks capture serves, and those waiting for its position.
pub(super) struct Holds {
    shard: String,
    peers: Arc<Peers>,
    checks: mpsc::UnboundedReceiver<HoldCheck>,
    /// With the mirror generation when each came.
    pending: Vec<(HoldCheck, u64)>,
}

impl Holds {
    /// The next check, or never when there is no channel (or it is closed).
    pub(super) async fn next(holds: &mut Option<Holds>) -> HoldCheck {
        if let Some(holds) = holds {
            if let Some(check) = holds.checks.recv().await {
                return check;
            }
        }
        std::future::pending().await
    }
}

impl Capture {
    /// Serves other shards' hold checks from `checks` (this shard is `shard` among `peers`).
    pub fn serve_holds(
        &mut self,
        shard: String,
        peers: Arc<Peers>,
        checks: mpsc::UnboundedReceiver<HoldCheck>,
    ) {
        self.holds = Some(Holds {
            shard,
            peers,
            checks,
            pending: Vec::new(),
        });
    }

    /// Queues `check` and answers every check that can be answered.
    pub(super) async fn hold_check(
        &mut self,
        durable: &DurableOffset,
        check: HoldCheck,
    ) -> Result<(), CaptureError> {
        let generation = self.state.checkpoint.generation;
        if let Some(holds) = self.holds.as_mut() {
            holds.pending.push((check, generation));
        }
        self.answer_holds(durable).await
    }

    /// Answers the checks whose offset capture has reached (see the module doc).
    pub(super) async fn answer_holds(
        &mut self,
        durable: &DurableOffset,
    ) -> Result<(), CaptureError> {
        let busy = self.long.is_some()
            || self.full_sync.is_some()
            || self.state.checkpoint.full_sync_in_progress;
        let Some(holds) = self
            .holds
            .as_mut()
            .filter(|h| !h.pending.is_empty() && !busy)
        else {
            return Ok(());
        };
        let (offset, generation) = (self.state.offset(), self.state.checkpoint.generation);
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut holds.pending)
            .into_iter()
            .partition(|(check, since)| {
                *since != generation || check.after.is_none_or(|after| offset >= after)
            });
        holds.pending = waiting;
        if ready.is_empty() {
            return Ok(());
        }
        let (shard, peers) = (holds.shard.clone(), holds.peers.clone());
        let mut batch = self.new_batch(durable)?;
        let mut next_seq = self.state.checkpoint.next_seq;
        let mut answers = Vec::with_capacity(ready.len());
        for (check, _) in ready {
            let mut held = Vec::with_capacity(check.keys.len());
            for asked in &check.keys {
                let Some(mapping) = self.state.mappings.iter().find(|m| m.name == asked.mapping)
                else {
                    held.push(false);
                    continue;
                };
                let value = batch.mirror_state(mapping, &asked.key)?;
                let Some(values) = row_of(mapping, &value) else {
                    held.push(false);
                    continue;
                };
                let event = RowEvent {
                    mapping: mapping.name.clone(),
                    row_id: asked.row_id.clone(),
                    row: RowChange::Upsert {
                        columns: mapping.named(values),
                    }
                    .into(),
                    op: None,
                };
                batch.push_unit(vec![event], offset);
                peers.depend(&shard, next_seq, check.waiter.clone());
                next_seq = next_seq.next();
                held.push(true);
            }
            answers.push((check.reply, held));
        }
        let written = held_rows(&answers);
        if !batch.is_empty() {
            self.hand_over(durable, batch).await?;
            self.written().await?;
        }
        if written > 0 {
            tracing::info!(
                rows = written,
                "rows of keys that moved to this shard written again for another shard's delete"
            );
            metrics::counter!("writebehind_cluster_handovers_total").increment(written as u64);
        }
        for (reply, held) in answers {
            let _ = reply.send(held);
        }
        Ok(())
    }
}

fn held_rows(answers: &[(tokio::sync::oneshot::Sender<Vec<bool>>, Vec<bool>)]) -> usize {
    answers
        .iter()
        .map(|(_, held)| held.iter().filter(|h| **h).count())
        .sum()
}
