//! Dead letters requeued while the service runs (`POST /dlq/retry` on the admin listener, which
//! `writebehind dlq retry` asks of a running service).
//!
//! A retry must not write a key's state beside the sink: the sink may have written a newer
//! state of the row meanwhile, and the older would win. So capture does it, in the change
//! order: for each letter it reads the key's current state from the mirror (through the batch
//! in flight) and appends a change that writes it out whatever the row was before (an upsert of
//! the mapped fields, or a delete when the key has no row), as a unit of its own at the current
//! offset; the letter is deleted in the same synced RocksDB write. The sink applies that change
//! after every change before it and before any after it; refused again, it becomes a new dead
//! letter with the new reason.
//!
//! Not requeued (the letter stays, and the reply says why): a letter whose mapping is no longer
//! configured or now writes to another backend; a key that no longer exists under a mapping
//! that keeps the rows of expired keys (whether its row is to be deleted is not known); every
//! letter while a full sync rebuilds the mirror. At most [`REQUEUE_LIMIT`] letters per request,
//! so memory stays bounded; the reply says when more are left.
//!
//! Requests are served while the link waits for its next event. The wait is a future that
//! capture keeps across a request rather than cancelling and starting again, so no byte the
//! link has read is lost, whatever the link was doing.

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use super::rows::{row_of, RowEvent};
use super::stream::StreamBatch;
use super::{Capture, CaptureError};
use crate::buffer::{DeadLetter, RowChange, StoreError};
use crate::config::OnExpire;
use crate::position::{ChangeSeq, DurableOffset};

/// Letters requeued by one request at most.
pub const REQUEUE_LIMIT: usize = 10_000;

/// Which dead letters to requeue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Letters {
    /// Every letter (the first [`REQUEUE_LIMIT`] of them).
    All,
    /// The letters with these seqs.
    Seqs(Vec<ChangeSeq>),
}

impl Letters {
    /// Whether the letter of change `seq` is one of these.
    pub fn includes(&self, seq: ChangeSeq) -> bool {
        match self {
            Letters::All => true,
            Letters::Seqs(seqs) => seqs.contains(&seq),
        }
    }

    /// As a query of `/dlq/retry` and `/dlq/drop`: `all`, or `seq=N&seq=M`.
    pub fn query(&self) -> String {
        match self {
            Letters::All => "all".to_string(),
            Letters::Seqs(seqs) => seqs
                .iter()
                .map(|seq| format!("seq={}", seq.0))
                .collect::<Vec<_>>()
                .join("&"),
        }
    }
}

/// A request to requeue dead letters, answered on `reply`.
#[derive(Debug)]
pub struct RequeueRequest {
    pub letters: Letters,
    /// The outcome, or why nothing was requeued.
    pub reply: oneshot::Sender<Result<Requeued, String>>,
}

/// What a request did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Requeued {
    /// (the letter's seq, the seq of the change that writes its key's state again).
    pub requeued: Vec<(ChangeSeq, ChangeSeq)>,
    /// (the letter's seq, why it stays).
    pub kept: Vec<(ChangeSeq, String)>,
    /// Seqs asked for that name no dead letter.
    pub unknown: Vec<ChangeSeq>,
    /// Whether letters are left beyond what one request requeues.
    pub more: bool,
}

impl Requeued {
    /// One line per letter, then a summary line (what the admin listener answers).
    pub fn report(&self) -> String {
        let mut text = String::new();
        for (letter, change) in &self.requeued {
            text.push_str(&format!("seq={letter} requeued as change {change}\n"));
        }
        for (letter, reason) in &self.kept {
            text.push_str(&format!("seq={letter} kept: {reason}\n"));
        }
        for seq in &self.unknown {
            text.push_str(&format!("seq={seq} is not a dead letter\n"));
        }
        text.push_str(&format!(
            "{} dead letters requeued, {} kept{}\n",
            self.requeued.len(),
            self.kept.len(),
            if self.more {
                format!("; more are left: ask again (at most {REQUEUE_LIMIT} per request)")
            } else {
                String::new()
            }
        ));
        text
    }
}

/// The next request, or never when there is no channel (or it is closed).
pub(super) async fn next_request(
    requests: &mut Option<mpsc::Receiver<RequeueRequest>>,
) -> Option<RequeueRequest> {
    if let Some(channel) = requests {
        if let Some(request) = channel.recv().await {
            return Some(request);
        }
        // Closed (no admin listener): never asked again.
        *requests = None;
    }
    std::future::pending().await
}

impl Capture {
    /// Serves one request (see the module doc). A failure of the buffer or of the committer is
    /// capture's own failure, returned after the reply.
    pub(super) async fn requeue(
        &mut self,
        durable: &DurableOffset,
        request: RequeueRequest,
    ) -> Result<(), CaptureError> {
        if self.full_sync.is_some() || self.state.checkpoint.full_sync_in_progress {
            let _ = request.reply.send(Err(
                "a full synchronisation is rebuilding the mirror; retry once it has completed (GET /ready)".into(),
            ));
            return Ok(());
        }
        match self.requeue_letters(durable, &request.letters).await {
            Ok(requeued) => {
                metrics::counter!("writebehind_dead_letters_requeued_total")
                    .increment(requeued.requeued.len() as u64);
                tracing::info!(
                    requeued = requeued.requeued.len(),
                    kept = requeued.kept.len(),
                    "dead letters requeued"
                );
                let _ = request.reply.send(Ok(requeued));
                Ok(())
            }
            Err(error) => {
                let _ = request.reply.send(Err(error.to_string()));
                Err(error)
            }
        }
    }

    async fn requeue_letters(
        &mut self,
        durable: &DurableOffset,
        letters: &Letters,
    ) -> Result<Requeued, CaptureError> {
        let mut outcome = Requeued::default();
        let store = &self.state.store;
        let selected = match letters {
            Letters::All => {
                let mut letters = store.dead_letters_from(ChangeSeq(0), REQUEUE_LIMIT + 1)?;
                outcome.more = letters.len() > REQUEUE_LIMIT;
                letters.truncate(REQUEUE_LIMIT);
                letters
            }
            Letters::Seqs(seqs) => {
                let mut seqs = seqs.clone();
                seqs.sort_unstable();
                seqs.dedup();
                outcome.more = seqs.len() > REQUEUE_LIMIT;
                seqs.truncate(REQUEUE_LIMIT);
                let mut letters = Vec::with_capacity(seqs.len());
                for seq in seqs {
                    match store.dead_letter(seq)? {
                        Some(letter) => letters.push(letter),
                        None => outcome.unknown.push(seq),
                    }
                }
                letters
            }
        };
        let mut batch = self.new_batch(durable)?;
        let mut next_seq = self.state.checkpoint.next_seq;
        for letter in &selected {
            match batch.requeue(&mut self.state, letter)? {
                Ok(()) => {
                    outcome.requeued.push((letter.seq, next_seq));
                    next_seq = next_seq.next();
                }
                Err(reason) => outcome.kept.push((letter.seq, reason)),
            }
        }
        if !batch.is_empty() {
            self.hand_over(durable, batch).await?;
            // Answered once durable: the letters are gone and their changes are in the log.
            self.written().await?;
        }
        Ok(outcome)
    }
}

impl StreamBatch {
    /// Appends the change that writes `letter`'s key's current state, as a unit of its own, and
    /// deletes the letter with it; or says why the letter stays (see the module doc).
    pub(super) fn requeue(
        &mut self,
        state: &mut super::state::CaptureState,
        letter: &DeadLetter,
    ) -> Result<Result<(), String>, StoreError> {
        let Some(mapping) = state.mappings.iter().find(|m| *m.name == *letter.mapping) else {
            return Ok(Err(format!(
                "mapping `{}` is no longer configured",
                letter.mapping
            )));
        };
        if mapping.backend != letter.backend {
            return Ok(Err(format!(
                "mapping `{}` now writes to backend `{}`, not `{}`",
                mapping.name, mapping.backend, letter.backend
            )));
        }
        let mut key = BytesMut::from(&mapping.key_prefix[..]);
        key.extend_from_slice(&letter.row_id);
        let key: Bytes = key.freeze();
        let value = self.mirror_state(mapping, &key)?;
        let row = match row_of(mapping, &value) {
            Some(values) => RowChange::Upsert {
                columns: mapping.named(values),
            },
            None if mapping.on_expire == OnExpire::Keep => {
                return Ok(Err(format!(
                    "the key no longer exists, and mapping `{}` keeps the rows of expired keys: whether its row is to be deleted is not known; write the key again, or drop the letter",
                    mapping.name
                )))
            }
            None => RowChange::Delete,
        };
        let event = RowEvent {
            mapping: mapping.name.clone(),
            row_id: letter.row_id.clone(),
            row: row.into(),
            op: None,
        };
        self.push_unit(vec![event], state.offset());
        self.retire_dead_letter(letter.seq);
        Ok(Ok(()))
    }
}
