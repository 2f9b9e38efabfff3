//! Applying one batch until it is in: transient failures are retried forever with backoff,
//! and after a failure the checkpoint rows tell whether the batch had committed before the
//! connection went (then it is not applied again). The runner's retry policy; one error kind
//! decides it (`SinkError::is_transient`).

use std::time::Duration;

use super::{
    BeforeCommit, Destination, Rejected, SinkBatch, SinkCheckpoint, SinkError, TableSchema,
};
use crate::backoff::Backoff;
use crate::buffer::Store;
use crate::metrics::Health;
use crate::position::ChangeSeq;

pub(super) fn new_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(30))
}

/// Applies `batch` on `sink`, retrying transient failures forever with `backoff`; `place` is
/// the backend's name, its health and the buffer (where refused rows are dead-lettered).
pub(super) async fn apply_with_retry<D: Destination>(
    sink: &mut D,
    backoff: &mut Backoff,
    place: (&str, &Health, &Store),
    schemas: &[TableSchema],
    batch: &SinkBatch,
    before_commit: &BeforeCommit,
) -> Result<Vec<Rejected>, SinkError> {
    let (name, health, store) = place;
    if !sink.waits_at_commit() {
        batch.commit_gate.wait().await?;
    }
    loop {
        match sink.apply(schemas, batch, before_commit).await {
            Ok(rejected) => {
                if backoff.failures() > 0 {
                    tracing::info!(backend = %name, "database reachable again");
                }
                backoff.reset();
                return Ok(rejected);
            }
            Err(error) if error.is_transient() => {
                let delay = backoff.next_delay();
                tracing::warn!(backend = %name, %error, retry_in = ?delay, "database write failed; retrying");
                metrics::counter!("writebehind_sink_retries_total", "backend" => name.to_string())
                    .increment(1);
                health.backend(name, false, Some(error.to_string()));
                tokio::time::sleep(delay).await;
                // The connection may have died after COMMIT reached the server: if the
                // checkpoint rows say the batch is in, it must not be applied again.
                match sink.checkpoints().await {
                    Ok(rows) if batch_is_in(batch, &rows) => {
                        tracing::info!(backend = %name, seq = %batch.last_seq, "the batch had committed before the connection failed");
                        backoff.reset();
                        // The rows it refused were dead-lettered inside that commit: their
                        // acknowledgements must say so.
                        return refused_in(store, name, batch);
                    }
                    _ => {}
                }
            }
            Err(fatal) => return Err(fatal),
        }
    }
}

/// The rows of `batch` that backend `name` dead-lettered (read back after a commit whose answer
/// was lost).
fn refused_in(store: &Store, name: &str, batch: &SinkBatch) -> Result<Vec<Rejected>, SinkError> {
    let seqs: std::collections::HashSet<ChangeSeq> = batch.writes.iter().map(|w| w.seq).collect();
    let letters = store.dead_letters().map_err(|e| {
        SinkError::fatal(format!(
            "backend `{name}`: cannot read the dead letters: {e}"
        ))
        .caused_by(e)
    })?;
    Ok(letters
        .into_iter()
        .filter(|l| l.backend == name && seqs.contains(&l.seq))
        .map(|l| Rejected {
            seq: l.seq,
            reason: l.reason,
        })
        .collect())
}

/// Whether the checkpoint `rows` say `batch` has committed (a lost connection may have hidden
/// its COMMIT). Only a batch that moves checkpoint rows can tell; the others (reconciliation
/// writes) are idempotent and simply applied again.
pub(super) fn batch_is_in(batch: &SinkBatch, rows: &[(String, SinkCheckpoint)]) -> bool {
    batch.last_seq > ChangeSeq::NONE
        && !batch.buffer_id.is_empty()
        && !batch.checkpoint_rows.is_empty()
        && batch.checkpoint_rows.iter().all(|name| {
            rows.iter().any(|(found, row)| {
                found == name
                    && row.buffer_id.as_deref() == Some(batch.buffer_id.as_str())
                    && row.seq >= batch.last_seq
            })
        })
        && batch
            .retire_rows
            .iter()
            .all(|name| rows.iter().all(|(found, _)| found != name))
}
