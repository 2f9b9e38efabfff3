//! `writebehind dlq list | retry | drop`: the dead-letter store.
//!
//! A retry writes the key's *current* state (from the mirror), not the refused image: the row
//! must follow Redis, and the key may have changed since. Here the service is stopped: the
//! buffer is opened by this process, and a retry writes the row outside the change order (no
//! change can follow it). While the service runs, `retry` and `drop` are asked of it through its
//! admin listener (`POST /dlq/retry`: capture requeues the key's state in the change order,
//! `capture/requeue.rs`), and `list` reads its buffer as a secondary instance
//! (`buffer/reader.rs`).

use std::process::ExitCode;
use std::sync::Arc;

use crate::buffer::{Batch, DeadLetter, MirrorKind, Store, StoreError};
use crate::capture::mapping::Mappings;
use crate::capture::requeue::Letters;
use crate::config::Config;
use crate::position::ChangeSeq;
use crate::sink::convert::Refusal;
use crate::sink::runner::convert_row;
use crate::sink::{Destination, RowOp, RowWrite, SchemaProblem, Sink, SinkBatch, SinkError};

pub(super) fn list(store: &Store) -> ExitCode {
    match store.dead_letters() {
        Ok(letters) => {
            for letter in &letters {
                println!("{}", letter.line());
            }
            println!("{} dead letters", letters.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(super) fn drop(store: &Store, letters: &Letters) -> ExitCode {
    match crate::admin::drop_letters(store, letters) {
        Ok(dropped) => {
            println!("{dropped} dead letters dropped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(super) async fn retry(config: &Config, store: Arc<Store>, letters: &Letters) -> ExitCode {
    let all = match store.dead_letters() {
        Ok(all) => all,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mappings = Mappings::new(&config.mappings);
    let mut failed = false;
    for letter in all.iter().filter(|l| letters.includes(l.seq)) {
        match retry_one(config, &store, &mappings, letter).await {
            Ok(()) => {
                let mut batch = Batch::default();
                batch.delete_dead_letter(letter.seq);
                if let Err(e) = store.write(batch, true) {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
                println!("seq={} applied", letter.seq);
            }
            Err(error) => {
                failed = true;
                let reason = error.to_string();
                println!("seq={} still refused: {reason}", letter.seq);
                let mut batch = Batch::default();
                batch.put_dead_letter(&DeadLetter {
                    reason,
                    ..letter.clone()
                });
                if let Err(e) = store.write(batch, true) {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Why a dead letter could not be written again.
#[derive(Debug, thiserror::Error)]
enum RetryError {
    #[error("mapping `{0}` is no longer configured")]
    UnknownMapping(String),
    #[error("backend `{0}` is not configured")]
    UnknownBackend(String),
    #[error("mapping `{0}` has no usable table")]
    NoTable(String),
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
    Schema(Vec<SchemaProblem>),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The database (or the conversion) still refuses the row.
    #[error("{0}")]
    Refused(String),
}

impl From<Refusal> for RetryError {
    fn from(refusal: Refusal) -> Self {
        RetryError::Refused(refusal.0)
    }
}

async fn retry_one(
    config: &Config,
    store: &Store,
    mappings: &Mappings,
    letter: &DeadLetter,
) -> Result<(), RetryError> {
    let mapping = mappings
        .iter()
        .find(|m| *m.name == *letter.mapping)
        .ok_or_else(|| RetryError::UnknownMapping(letter.mapping.clone()))?;
    let backend = config
        .backends
        .get(&mapping.backend)
        .ok_or_else(|| RetryError::UnknownBackend(mapping.backend.clone()))?;
    let mut sink = Sink::connect(&mapping.backend, &backend.url).await?;
    let schemas = sink
        .prepare(std::slice::from_ref(mapping))
        .await
        .map_err(RetryError::Schema)?;
    let schema = schemas
        .first()
        .ok_or_else(|| RetryError::NoTable(mapping.name.to_string()))?;
    let mut key = mapping.key_prefix.to_vec();
    key.extend_from_slice(&letter.row_id);
    let current = store.mirror_with_fields(mapping.db, &key, mapping.mapped_fields())?;
    let id = crate::sink::convert::convert(
        &schema.key_column.kind,
        &schema.key_column.name,
        Some(&letter.row_id),
    )?;
    let op = match current {
        Some(value) if value.kind == MirrorKind::Hash && !value.fields.is_empty() => {
            let image = mapping.row_image(&value.fields);
            RowOp::Upsert {
                id,
                values: convert_row(schema, &image)?,
            }
        }
        _ => RowOp::Delete { id },
    };
    let checkpoint = store.checkpoint()?;
    let batch = SinkBatch {
        // A retry of dead letters (synced long ago): nothing to wait for.
        commit_gate: Default::default(),
        writes: vec![RowWrite {
            table: 0,
            seq: letter.seq,
            row_id: letter.row_id.clone(),
            delete_first: false,
            op,
        }],
        // The checkpoint rows stay as they are: this row is written outside the change order.
        checkpoint_rows: Vec::new(),
        retire_rows: Vec::new(),
        last_seq: ChangeSeq::NONE,
        buffer_id: String::new(),
        mappings_id: String::new(),
        replid: checkpoint
            .position
            .as_ref()
            .map(|p| p.replid.to_string())
            .unwrap_or_default(),
        offset: checkpoint.position.map(|p| p.offset).unwrap_or_default(),
    };
    let no_hook: crate::sink::BeforeCommit =
        std::sync::Arc::new(|_: &[crate::sink::Rejected]| Ok(()));
    let rejected = sink.apply(&schemas, &batch, &no_hook).await?;
    match rejected.into_iter().next() {
        Some(r) => Err(RetryError::Refused(r.reason)),
        None => Ok(()),
    }
}
