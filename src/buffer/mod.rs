//! The durable buffer: a RocksDB database between the replication stream and the sinks.
//!
//! # On-disk format (format version 3)
//!
//! Nine column families; integers big-endian, byte strings `u32 length + bytes` (see [`codec`]).
//! Each record kind has its own file (`mirror.rs`, `change.rs`, `checkpoint.rs`,
//! `dead_letter.rs`, `acknowledgement.rs`) with its encoding; `batch.rs` gathers writes and
//! `store.rs` applies them atomically:
//!
//! - **`mirror`**: every watched key, as Redis holds it. Key: `db u32 + key bytes` (so a database
//!   is a contiguous range). Value: `kind u8` (1 hash, 2 any other type, 3 a hash stored by
//!   field), `expire_at_ms opt i64`, `generation u64` (the full sync that last saw it; for
//!   mark-and-sweep), `refreshed_through u64` (commands ending at or before this offset are
//!   already in the value: it was read from the primary at that offset), `field count u32`, then
//!   (kinds 1 and 2) per field in byte order `field bytes, value bytes, expire_at_ms opt i64`.
//! - **`fields`**: the fields of hashes of kind 3 (more than 1,024 fields), one entry each. Key:
//!   `db u32 + key length u32 + key bytes + field bytes`; value: `value bytes, expire_at_ms opt
//!   i64` (`field_store.rs`; `window.rs` for how capture holds such a hash).
//! - **`changes`**: the change log, in order, a block of changes per entry (`change_log.rs`
//!   gives the block's layout; a buffer of format 2 holds one change per entry). Key: the
//!   last seq, `seq u64` (from 1; 0 means "none"), then the byte 1. Each change: `unit u64` (seq of the first
//!   change of its execution unit: a command, or a `MULTI ... EXEC`; the sink commits a unit in
//!   one transaction), `unit_end u8`, `offset u64` (stream offset after the unit; before it, for
//!   the changes of a long transaction written in parts, none of which ends it), `mapping
//!   bytes`, `row_id bytes`, `kind u8` (1 upsert, 2 delete), for an upsert `column count u32` and
//!   per column `name bytes, value opt bytes` (absent field = NULL), then `op opt (u8 op, bytes
//!   uuid, u32 db, bytes key)`: the `#` op of the write when it carried a uuid, so the sink's
//!   commit can be acknowledged to `{key}uuid`.
//! - **`dead_letters`**: changes a database refused. Key: `seq u64`. Value: `backend bytes,
//!   mapping bytes, row_id bytes, reason bytes, at_ms i64`. `writebehind dlq` lists, retries
//!   (with the key's current mirror state) and drops them.
//! - **`raw`**: watched keys whose real Redis state differs from the mirror because a `#` op
//!   written with a plain `HSET` is not completed in Redis yet (the mirror holds the state the op
//!   gives; this holds what Redis holds, `#` field included). Key and value as in `mirror`. An
//!   entry disappears when the two agree again (src/ack explains the completion).
//! - **`acks`**: acknowledgements to write to Redis, in order. Key: `id u64`. Value: `db u32,
//!   key bytes, uuid bytes, status bytes` (`done` or `failed`), `reason opt bytes`, `offset u64`
//!   (stream offset of the change). Ids are given when the batch is written, under a lock, so
//!   they become visible in increasing order. Deleted once written.
//! - **`meta`**: `format` (u32 = 3; a buffer of format 2 is read as it is and recorded as 3 when
//!   opened: only the change log's entries differ, and both forms are read); `checkpoint` (`replid opt bytes`, `offset u64`, `db u32`,
//!   `next_seq u64`, `generation u64`, `full_sync_in_progress u8`); `replid/<seq u64>` the
//!   history of replication IDs (`replid bytes, first offset u64`); `acks_enqueued/<backend>`
//!   (u64: the backend's changes up to this seq have their acks in `acks`); `identity` (text: a
//!   UUID chosen when the buffer is created; every backend's checkpoint row records it, so a
//!   database checkpoint of another buffer is never taken for this one's); `watched` (text: the
//!   `db:prefix` of every mapping, one per line, as of the last full sync; when the
//!   configuration watches other keys the mirror is rebuilt by a full sync); `clock`
//!   (`offset u64, time_ms i64, expired_keys u64`: the latest sample of the primary's clock,
//!   written with each commit; see `src/capture/clock.rs`); `open_unit` (`first_seq u64, start
//!   u64`: a long transaction written in parts whose end is not written yet).
//! - **`undo`**: the mirror values and large-hash fields from before the open unit, for a
//!   rollback (`open_unit.rs` describes both; added 2026-11-29 without a new format version: a
//!   buffer of version 2 gets the family when it is next opened; `fields` likewise, in a
//!   later session of the same day).
//! - **`journal`**: the mirror's updates not yet settled into `mirror`, one record per batch
//!   (`journal.rs` gives the format and the rules); added, like `undo`, without a new format
//!   version.
//!
//! Every command (or `MULTI` unit) is applied with one `WriteBatch` holding its mirror updates
//! (a journal record),
//! its changes and the checkpoint after it, so the three never disagree; several units share one
//! synced write (group commit), written first and synced after (`durability.rs` says who may
//! read it in between). A long transaction is the exception: its parts are written
//! before its end, with undo records and the checkpoint before it, and rolled back if its end
//! never comes (`open_unit.rs`). `REPLCONF ACK` reports only a checkpoint that has been synced.

mod acknowledgement;
mod batch;
mod change;
mod change_log;
mod checkpoint;
pub mod codec;
mod dead_letter;
mod durability;
mod field_store;
mod fields;
mod footprint;
mod journal;
mod mirror;
mod mirror_scan;
mod open_unit;
mod reader;
mod store;
mod window;

use std::path::PathBuf;

pub use acknowledgement::{AckRecord, NewAck};
pub use batch::{Batch, EncodedChanges};
pub use change::{Change, ChangeParts, EncodedRow, HashOp, Name, RowChange, RowRef};
pub use change_log::{ReadLimit, DECODED_CHANGE_BYTES};
pub use checkpoint::Checkpoint;
pub use codec::DecodeError;
pub use dead_letter::{DeadLetter, DeadLetterSummary};
pub use durability::SyncFailed;
pub use fields::Fields;
pub use footprint::StoreMemory;
pub use journal::DEFAULT_JOURNAL_BYTES;
pub use mirror::{stored_copy, FieldValue, KeyRef, MirrorEntries, MirrorKind, MirrorValue};
pub use mirror_scan::{MirrorCursor, MirrorPage};
pub use open_unit::OpenUnit;
pub use store::{stop_rocksdb_perf_counters, Store};
pub use window::{Window, STORED_BY_FIELD};

const FORMAT_VERSION: u32 = 3;
/// The oldest format this build reads (`change_log.rs`: format 2's change log is read as it
/// is).
const OLDEST_READABLE_FORMAT: u32 = 2;
const CF_MIRROR: &str = "mirror";
const CF_CHANGES: &str = "changes";
const CF_META: &str = "meta";
const CF_DEAD_LETTERS: &str = "dead_letters";
const CF_RAW: &str = "raw";
const CF_ACKS: &str = "acks";
/// Mirror values from before an open unit (`open_unit.rs`).
const CF_UNDO: &str = "undo";
/// The fields of hashes stored one entry per field (`field_store.rs`).
const CF_FIELDS: &str = "fields";
/// Records of mirror updates not yet settled into `mirror` (`journal.rs`).
const CF_JOURNAL: &str = "journal";
const META_FORMAT: &[u8] = b"format";
const META_CHECKPOINT: &[u8] = b"checkpoint";
const META_REPLID_PREFIX: &[u8] = b"replid/";
const META_ACKS_ENQUEUED_PREFIX: &[u8] = b"acks_enqueued/";
const META_IDENTITY: &[u8] = b"identity";
const META_WATCHED: &[u8] = b"watched";
const META_CLOCK: &[u8] = b"clock";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("buffer at {path}: RocksDB error: {message}; check the disk (space, permissions) and restart")]
    RocksDb { path: PathBuf, message: String },
    #[error("buffer at {path}: {source}; the buffer is damaged: move it away to start over (the service reconciles the tables with Redis)")]
    Corrupt { path: PathBuf, source: DecodeError },
    #[error("buffer at {path}: RocksDB reports damaged data ({message}); move the buffer away to start over: the service reconciles the tables with Redis")]
    Damaged { path: PathBuf, message: String },
    #[error("buffer at {path} is in use by another writebehind process; stop it first")]
    InUse { path: PathBuf },
    #[error("buffer at {path} has format version {found}; this writebehind reads versions {OLDEST_READABLE_FORMAT} to {FORMAT_VERSION}: run a release that reads it, or move the buffer away to start over")]
    Format { path: PathBuf, found: u32 },
    #[error("buffer at {path}: {message}; restart the service (nothing it did not write was acknowledged)")]
    Writer { path: PathBuf, message: String },
}
