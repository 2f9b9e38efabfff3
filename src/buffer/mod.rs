//! The durable buffer: a RocksDB database between the replication stream and the sinks.
//!
//! # On-disk format (format version 2)
//!
//! Three column families; integers big-endian, byte strings `u32 length + bytes` (see [`codec`]):
//!
//! - **`mirror`**: every watched key, as Redis holds it. Key: `db u32 + key bytes` (so a database
//!   is a contiguous range). Value: `kind u8` (1 hash, 2 any other type), `expire_at_ms opt i64`,
//!   `generation u64` (the full sync that last saw it; for mark-and-sweep), `refreshed_through
//!   u64` (commands ending at or before this offset are already in the value: it was read from
//!   the primary at that offset), `field count u32`, then per field in byte order `field bytes,
//!   value bytes, expire_at_ms opt i64`.
//! - **`changes`**: the change log, in order. Key: `seq u64` (from 1; 0 means "none"). Value: `unit u64` (seq of the first
//!   change of its execution unit: a command, or a `MULTI ... EXEC`; the sink commits a unit in
//!   one transaction), `unit_end u8`, `offset u64` (stream offset after the unit), `mapping
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
//! - **`meta`**: `format` (u32 = 2); `checkpoint` (`replid opt bytes`, `offset u64`, `db u32`,
//!   `next_seq u64`, `generation u64`, `full_sync_in_progress u8`); `replid/<seq u64>` the
//!   history of replication IDs (`replid bytes, first offset u64`); `acks_enqueued/<backend>`
//!   (u64: the backend's changes up to this seq have their acks in `acks`).
//!
//! Every command (or `MULTI` unit) is applied with one `WriteBatch` holding its mirror updates,
//! its changes and the checkpoint after it, so the three never disagree; several units share one
//! synced write (group commit). `REPLCONF ACK` reports only a checkpoint that has been synced.

pub mod codec;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};

use crate::position::{ReplId, ReplOffset, StreamPosition};
use codec::{DecodeError, Decoder, Encoder};

const FORMAT_VERSION: u32 = 2;
const CF_MIRROR: &str = "mirror";
const CF_CHANGES: &str = "changes";
const CF_META: &str = "meta";
const CF_DEAD_LETTERS: &str = "dead_letters";
const CF_RAW: &str = "raw";
const CF_ACKS: &str = "acks";
const META_FORMAT: &[u8] = b"format";
const META_CHECKPOINT: &[u8] = b"checkpoint";
const META_REPLID_PREFIX: &[u8] = b"replid/";
const META_ACKS_ENQUEUED_PREFIX: &[u8] = b"acks_enqueued/";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("buffer at {path}: RocksDB error: {message}; check the disk (space, permissions) and restart")]
    RocksDb { path: PathBuf, message: String },
    #[error("buffer at {path}: {source}; the buffer is damaged: move it away to start over with a full sync")]
    Corrupt { path: PathBuf, source: DecodeError },
    #[error("buffer at {path} is in use by another writebehind process; stop it first")]
    InUse { path: PathBuf },
    #[error("buffer at {path} has format version {found}; this writebehind reads version {FORMAT_VERSION}")]
    Format { path: PathBuf, found: u32 },
}

/// What a mirrored key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorKind {
    Hash,
    /// Any other type: the key exists, it has no row.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldValue {
    pub value: Bytes,
    pub expire_at_ms: Option<i64>,
}

/// A watched key as Redis holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorValue {
    pub kind: MirrorKind,
    pub expire_at_ms: Option<i64>,
    pub generation: u64,
    pub refreshed_through: u64,
    pub fields: BTreeMap<Bytes, FieldValue>,
}

impl MirrorValue {
    pub fn hash(generation: u64) -> Self {
        MirrorValue {
            kind: MirrorKind::Hash,
            expire_at_ms: None,
            generation,
            refreshed_through: 0,
            fields: BTreeMap::new(),
        }
    }

    pub fn other(generation: u64) -> Self {
        MirrorValue {
            kind: MirrorKind::Other,
            ..MirrorValue::hash(generation)
        }
    }

    /// Whether Redis holding `raw` and the mirror holding `intended` agree, so no `#` op is
    /// left to complete: same kind and field values, a TTL on both or neither (field TTLs and
    /// the exact instant are not compared: both sides are applied from the same commands).
    pub fn agree(raw: &Option<MirrorValue>, intended: &Option<MirrorValue>) -> bool {
        match (raw, intended) {
            (None, None) => true,
            (Some(r), Some(i)) => {
                r.kind == i.kind
                    && r.expire_at_ms.is_some() == i.expire_at_ms.is_some()
                    && r.fields.len() == i.fields.len()
                    && r.fields
                        .iter()
                        .zip(i.fields.iter())
                        .all(|((f1, v1), (f2, v2))| f1 == f2 && v1.value == v2.value)
            }
            _ => false,
        }
    }

    /// Same content, whatever the bookkeeping (generation, refresh point).
    pub fn same_data(&self, other: &MirrorValue) -> bool {
        self.kind == other.kind
            && self.expire_at_ms == other.expire_at_ms
            && self.fields == other.fields
    }

    fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u8(match self.kind {
            MirrorKind::Hash => 1,
            MirrorKind::Other => 2,
        })
        .opt_i64(self.expire_at_ms)
        .u64(self.generation)
        .u64(self.refreshed_through)
        .u32(self.fields.len() as u32);
        for (field, value) in &self.fields {
            e.bytes(field)
                .bytes(&value.value)
                .opt_i64(value.expire_at_ms);
        }
        e.finish()
    }

    fn decode(input: &[u8]) -> Result<MirrorValue, DecodeError> {
        let mut d = Decoder::new(input, "mirror value");
        let kind = match d.u8()? {
            1 => MirrorKind::Hash,
            2 => MirrorKind::Other,
            other => return Err(d.error(format!("kind {other}"))),
        };
        let expire_at_ms = d.opt_i64()?;
        let generation = d.u64()?;
        let refreshed_through = d.u64()?;
        let count = d.u32()?;
        let mut fields = BTreeMap::new();
        for _ in 0..count {
            let field = d.bytes()?;
            let value = d.bytes()?;
            let expire_at_ms = d.opt_i64()?;
            fields.insert(
                field,
                FieldValue {
                    value,
                    expire_at_ms,
                },
            );
        }
        d.end()?;
        Ok(MirrorValue {
            kind,
            expire_at_ms,
            generation,
            refreshed_through,
            fields,
        })
    }
}

/// What a change does to its row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowChange {
    /// The full mapped row image: every mapped column, `None` for an absent field.
    Upsert {
        columns: Vec<(String, Option<Bytes>)>,
    },
    Delete,
}

/// The `#` op of a write that carried a uuid: after the sink commits the change, `{key}uuid`
/// (in `db`) is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashOp {
    pub op: u8,
    pub uuid: Bytes,
    pub db: u32,
    pub key: Bytes,
}

/// One entry of the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub seq: u64,
    /// The seq of the first change of its execution unit.
    pub unit: u64,
    /// Whether it is the last change of its unit.
    pub unit_end: bool,
    /// Stream offset after the unit.
    pub offset: ReplOffset,
    pub mapping: String,
    pub row_id: Bytes,
    pub row: RowChange,
    pub op: Option<HashOp>,
}

impl Change {
    fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u64(self.unit)
            .u8(u8::from(self.unit_end))
            .u64(self.offset.0)
            .bytes(self.mapping.as_bytes())
            .bytes(&self.row_id);
        match &self.row {
            RowChange::Upsert { columns } => {
                e.u8(1).u32(columns.len() as u32);
                for (column, value) in columns {
                    e.bytes(column.as_bytes()).opt_bytes(value.as_deref());
                }
            }
            RowChange::Delete => {
                e.u8(2);
            }
        }
        match &self.op {
            Some(op) => e.u8(1).u8(op.op).bytes(&op.uuid).u32(op.db).bytes(&op.key),
            None => e.u8(0),
        };
        e.finish()
    }

    fn decode(seq: u64, input: &[u8]) -> Result<Change, DecodeError> {
        let mut d = Decoder::new(input, "change");
        let unit = d.u64()?;
        let unit_end = d.u8()? != 0;
        let offset = ReplOffset(d.u64()?);
        let mapping = d.string()?;
        let row_id = d.bytes()?;
        let row = match d.u8()? {
            1 => {
                let count = d.u32()?;
                let mut columns = Vec::with_capacity(count.min(1024) as usize);
                for _ in 0..count {
                    columns.push((d.string()?, d.opt_bytes()?));
                }
                RowChange::Upsert { columns }
            }
            2 => RowChange::Delete,
            other => return Err(d.error(format!("row change kind {other}"))),
        };
        let op = match d.u8()? {
            0 => None,
            _ => Some(HashOp {
                op: d.u8()?,
                uuid: d.bytes()?,
                db: d.u32()?,
                key: d.bytes()?,
            }),
        };
        d.end()?;
        Ok(Change {
            seq,
            unit,
            unit_end,
            offset,
            mapping,
            row_id,
            row,
            op,
        })
    }
}

/// Where capture stands, written atomically with the data it describes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// The position after the last captured unit; `None` before the first full sync.
    pub position: Option<StreamPosition>,
    /// The seq the next change gets.
    pub next_seq: u64,
    /// The generation of the last full sync.
    pub generation: u64,
    /// A full sync began and did not finish: the next attach must start a new one.
    pub full_sync_in_progress: bool,
}

impl Checkpoint {
    fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        let (replid, offset, db) = match &self.position {
            Some(p) => (Some(p.replid.as_str().as_bytes()), p.offset.0, p.db),
            None => (None, 0, 0),
        };
        e.opt_bytes(replid)
            .u64(offset)
            .u32(db)
            .u64(self.next_seq)
            .u64(self.generation)
            .u8(u8::from(self.full_sync_in_progress));
        e.finish()
    }

    fn decode(input: &[u8]) -> Result<Checkpoint, DecodeError> {
        let mut d = Decoder::new(input, "checkpoint");
        let replid = d.opt_bytes()?;
        let offset = ReplOffset(d.u64()?);
        let db = d.u32()?;
        let next_seq = d.u64()?;
        let generation = d.u64()?;
        let full_sync_in_progress = d.u8()? != 0;
        d.end()?;
        let position = match replid {
            Some(id) => {
                let text = std::str::from_utf8(&id)
                    .ok()
                    .and_then(ReplId::parse)
                    .ok_or_else(|| d.error("replid is not 40 hex characters"))?;
                Some(StreamPosition {
                    replid: text,
                    offset,
                    db,
                })
            }
            None => None,
        };
        Ok(Checkpoint {
            position,
            next_seq,
            generation,
            full_sync_in_progress,
        })
    }
}

/// The mirror key of `key` in `db`.
pub fn mirror_key(db: u32, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + key.len());
    out.extend_from_slice(&db.to_be_bytes());
    out.extend_from_slice(key);
    out
}

fn split_mirror_key(raw: &[u8]) -> Option<(u32, Bytes)> {
    let db = u32::from_be_bytes(raw.get(..4)?.try_into().ok()?);
    Some((db, Bytes::copy_from_slice(&raw[4..])))
}

/// Writes to apply together, in order, atomically.
#[derive(Debug, Default)]
pub struct Batch {
    ops: Vec<Op>,
    new_acks: Vec<NewAck>,
}

/// A change a database refused, kept until it is retried or dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub seq: u64,
    pub backend: String,
    pub mapping: String,
    pub row_id: Bytes,
    pub reason: String,
    pub at_ms: i64,
}

impl DeadLetter {
    fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.bytes(self.backend.as_bytes())
            .bytes(self.mapping.as_bytes())
            .bytes(&self.row_id)
            .bytes(self.reason.as_bytes())
            .i64(self.at_ms);
        e.finish()
    }

    fn decode(seq: u64, input: &[u8]) -> Result<DeadLetter, DecodeError> {
        let mut d = Decoder::new(input, "dead letter");
        let letter = DeadLetter {
            seq,
            backend: d.string()?,
            mapping: d.string()?,
            row_id: d.bytes()?,
            reason: d.string()?,
            at_ms: d.i64()?,
        };
        d.end()?;
        Ok(letter)
    }
}

/// An acknowledgement to write: `XADD {key}uuid * status <status> [reason <reason>]` in `db`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckRecord {
    pub id: u64,
    pub db: u32,
    pub key: Bytes,
    pub uuid: Bytes,
    /// `None`: done; `Some(reason)`: failed.
    pub failure: Option<String>,
    /// Stream offset of the change acknowledged.
    pub offset: u64,
}

impl AckRecord {
    /// The stream the client reads: `{<key>}<uuid>` (the hash tag keeps it in the key's slot).
    pub fn stream_key(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.key.len() + self.uuid.len() + 2);
        out.push(b'{');
        out.extend_from_slice(&self.key);
        out.push(b'}');
        out.extend_from_slice(&self.uuid);
        out
    }

    fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u32(self.db)
            .bytes(&self.key)
            .bytes(&self.uuid)
            .bytes(if self.failure.is_some() {
                b"failed"
            } else {
                b"done"
            })
            .opt_bytes(self.failure.as_deref().map(str::as_bytes))
            .u64(self.offset);
        e.finish()
    }

    fn decode(id: u64, input: &[u8]) -> Result<AckRecord, DecodeError> {
        let mut d = Decoder::new(input, "ack");
        let db = d.u32()?;
        let key = d.bytes()?;
        let uuid = d.bytes()?;
        let _status = d.bytes()?;
        let failure = d
            .opt_bytes()?
            .map(|r| String::from_utf8_lossy(&r).into_owned());
        let offset = d.u64()?;
        d.end()?;
        Ok(AckRecord {
            id,
            db,
            key,
            uuid,
            failure,
            offset,
        })
    }
}

/// An acknowledgement to queue (it gets its id when put in a batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAck {
    pub db: u32,
    pub key: Bytes,
    pub uuid: Bytes,
    /// `None`: done; `Some(reason)`: failed.
    pub failure: Option<String>,
    pub offset: u64,
}

#[derive(Debug)]
enum Op {
    PutRaw(Vec<u8>, Vec<u8>),
    DeleteRaw(Vec<u8>),
    DeleteAck(u64),
    PutDeadLetter(u64, Vec<u8>),
    DeleteDeadLetter(u64),
    PutMirror(Vec<u8>, Vec<u8>),
    DeleteMirror(Vec<u8>),
    PutChange(u64, Vec<u8>),
    PutMeta(Vec<u8>, Vec<u8>),
}

impl Batch {
    pub fn put_mirror(&mut self, db: u32, key: &[u8], value: &MirrorValue) {
        self.ops
            .push(Op::PutMirror(mirror_key(db, key), value.encode()));
    }
    pub fn delete_mirror(&mut self, db: u32, key: &[u8]) {
        self.ops.push(Op::DeleteMirror(mirror_key(db, key)));
    }
    pub fn put_change(&mut self, change: &Change) {
        self.ops.push(Op::PutChange(change.seq, change.encode()));
    }
    pub fn put_checkpoint(&mut self, checkpoint: &Checkpoint) {
        self.ops
            .push(Op::PutMeta(META_CHECKPOINT.to_vec(), checkpoint.encode()));
    }
    /// Records that `replid` begins at `offset` (history, for diagnostics).
    pub fn add_replid(&mut self, seq: u64, replid: &ReplId, offset: ReplOffset) {
        let mut key = META_REPLID_PREFIX.to_vec();
        key.extend_from_slice(&seq.to_be_bytes());
        let mut e = Encoder::default();
        e.bytes(replid.as_str().as_bytes()).u64(offset.0);
        self.ops.push(Op::PutMeta(key, e.finish()));
    }
    pub fn put_dead_letter(&mut self, letter: &DeadLetter) {
        self.ops
            .push(Op::PutDeadLetter(letter.seq, letter.encode()));
    }
    pub fn delete_dead_letter(&mut self, seq: u64) {
        self.ops.push(Op::DeleteDeadLetter(seq));
    }
    /// What Redis really holds for a key whose `#` op is not completed yet.
    pub fn put_raw(&mut self, db: u32, key: &[u8], value: &MirrorValue) {
        self.ops
            .push(Op::PutRaw(mirror_key(db, key), value.encode()));
    }
    pub fn delete_raw(&mut self, db: u32, key: &[u8]) {
        self.ops.push(Op::DeleteRaw(mirror_key(db, key)));
    }
    /// Queues acknowledgements, in order; they get their ids when the batch is written.
    pub fn put_acks(&mut self, acks: Vec<NewAck>) {
        self.new_acks.extend(acks);
    }
    pub fn delete_ack(&mut self, id: u64) {
        self.ops.push(Op::DeleteAck(id));
    }
    /// Records that `backend`'s changes up to `seq` have their acks queued.
    pub fn put_acks_enqueued(&mut self, backend: &str, seq: u64) {
        let mut key = META_ACKS_ENQUEUED_PREFIX.to_vec();
        key.extend_from_slice(backend.as_bytes());
        self.ops.push(Op::PutMeta(key, seq.to_be_bytes().to_vec()));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.new_acks.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// The RocksDB buffer.
pub struct Store {
    db: DB,
    path: PathBuf,
    /// The id the next acknowledgement gets. Held while a batch with acks is written, so ids
    /// become visible in increasing order (the write-back task reads on from the last one).
    next_ack_id: std::sync::Mutex<u64>,
}

impl Store {
    /// Opens (or creates) the buffer at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let families = [
            CF_MIRROR,
            CF_CHANGES,
            CF_META,
            CF_DEAD_LETTERS,
            CF_RAW,
            CF_ACKS,
        ]
        .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db = DB::open_cf_descriptors(&options, path, families).map_err(|e| {
            let message = e.to_string();
            if message.contains("lock") {
                StoreError::InUse {
                    path: path.to_path_buf(),
                }
            } else {
                StoreError::RocksDb {
                    path: path.to_path_buf(),
                    message,
                }
            }
        })?;
        let mut store = Store {
            db,
            path: path.to_path_buf(),
            next_ack_id: std::sync::Mutex::new(1),
        };
        let last_ack = match store
            .db
            .iterator_cf(store.cf(CF_ACKS)?, IteratorMode::End)
            .next()
        {
            Some(item) => {
                let (key, _) = item.map_err(|e| store.rocks(e))?;
                store.seq_key(&key, "ack key")?
            }
            None => 0,
        };
        store.next_ack_id = std::sync::Mutex::new(last_ack + 1);
        let meta = store.cf(CF_META)?;
        match store
            .db
            .get_cf(meta, META_FORMAT)
            .map_err(|e| store.rocks(e))?
        {
            None => store
                .db
                .put_cf(meta, META_FORMAT, FORMAT_VERSION.to_be_bytes())
                .map_err(|e| store.rocks(e))?,
            Some(raw) => {
                let found = raw
                    .as_slice()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .unwrap_or(0);
                if found != FORMAT_VERSION {
                    return Err(StoreError::Format {
                        path: store.path.clone(),
                        found,
                    });
                }
            }
        }
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn rocks(&self, e: rocksdb::Error) -> StoreError {
        StoreError::RocksDb {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn corrupt(&self, e: DecodeError) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            source: e,
        }
    }

    fn cf(&self, name: &str) -> Result<&ColumnFamily, StoreError> {
        self.db.cf_handle(name).ok_or_else(|| StoreError::RocksDb {
            path: self.path.clone(),
            message: format!("column family {name} is missing"),
        })
    }

    /// The last checkpoint (the default one before anything was captured).
    pub fn checkpoint(&self) -> Result<Checkpoint, StoreError> {
        match self
            .db
            .get_cf(self.cf(CF_META)?, META_CHECKPOINT)
            .map_err(|e| self.rocks(e))?
        {
            Some(raw) => Checkpoint::decode(&raw).map_err(|e| self.corrupt(e)),
            None => Ok(Checkpoint::default()),
        }
    }

    /// The replication IDs seen, in order, with the offset each began at.
    pub fn replid_history(&self) -> Result<Vec<(ReplId, ReplOffset)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .prefix_iterator_cf(self.cf(CF_META)?, META_REPLID_PREFIX)
        {
            let (key, value) = item.map_err(|e| self.rocks(e))?;
            if !key.starts_with(META_REPLID_PREFIX) {
                break;
            }
            let mut d = Decoder::new(&value, "replid history");
            let id = d.string().map_err(|e| self.corrupt(e))?;
            let offset = d.u64().map_err(|e| self.corrupt(e))?;
            let id = ReplId::parse(&id)
                .ok_or_else(|| self.corrupt(d.error("replid is not 40 hex characters")))?;
            out.push((id, ReplOffset(offset)));
        }
        Ok(out)
    }

    pub fn mirror(&self, db: u32, key: &[u8]) -> Result<Option<MirrorValue>, StoreError> {
        self.mirror_value(CF_MIRROR, db, key)
    }

    /// A value of `mirror` or `raw` (same keys, same encoding).
    fn mirror_value(
        &self,
        family: &str,
        db: u32,
        key: &[u8],
    ) -> Result<Option<MirrorValue>, StoreError> {
        match self
            .db
            .get_pinned_cf(self.cf(family)?, mirror_key(db, key))
            .map_err(|e| self.rocks(e))?
        {
            Some(raw) => MirrorValue::decode(&raw)
                .map(Some)
                .map_err(|e| self.corrupt(e)),
            None => Ok(None),
        }
    }

    /// Up to `limit` mirror entries after `after` (exclusive; `None` from the start), in key
    /// order, restricted to `db` when given.
    pub fn mirror_scan(
        &self,
        db: Option<u32>,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(u32, Bytes, MirrorValue)>, StoreError> {
        let start = match (after, db) {
            (Some(after), _) => {
                let mut k = after.to_vec();
                k.push(0);
                k
            }
            (None, Some(db)) => db.to_be_bytes().to_vec(),
            (None, None) => Vec::new(),
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(CF_MIRROR)?,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (raw_key, raw_value) = item.map_err(|e| self.rocks(e))?;
            let Some((key_db, key)) = split_mirror_key(&raw_key) else {
                return Err(self.corrupt(DecodeError {
                    what: "mirror key",
                    at: 0,
                    message: "shorter than 4 bytes".into(),
                }));
            };
            if db.is_some_and(|db| db != key_db) || out.len() >= limit {
                break;
            }
            out.push((
                key_db,
                key,
                MirrorValue::decode(&raw_value).map_err(|e| self.corrupt(e))?,
            ));
        }
        Ok(out)
    }

    /// Up to `limit` changes with seq >= `from`, in order.
    pub fn changes(&self, from: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        self.by_seq(CF_CHANGES, "change key", from, limit, Change::decode)
    }

    /// Up to `limit` entries of a column family keyed by `seq u64`, from `from` on, decoded.
    fn by_seq<T>(
        &self,
        family: &str,
        what: &'static str,
        from: u64,
        limit: usize,
        decode: impl Fn(u64, &[u8]) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, StoreError> {
        let start = from.to_be_bytes();
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(family)?,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(|e| self.rocks(e))?;
            let seq = self.seq_key(&key, what)?;
            out.push(decode(seq, &value).map_err(|e| self.corrupt(e))?);
        }
        Ok(out)
    }

    /// A `seq u64` key (change log, dead letters).
    fn seq_key(&self, key: &[u8], what: &'static str) -> Result<u64, StoreError> {
        key.try_into().map(u64::from_be_bytes).map_err(|_| {
            self.corrupt(DecodeError {
                what,
                at: 0,
                message: format!("{} bytes, expected 8", key.len()),
            })
        })
    }

    /// Removes every change with seq <= `through` (the sinks have applied them).
    pub fn trim_changes(&self, through: u64) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(CF_CHANGES)?,
            0u64.to_be_bytes(),
            through.saturating_add(1).to_be_bytes(),
        );
        self.db.write(batch).map_err(|e| self.rocks(e))
    }

    /// Applies `batch` atomically; with `sync`, it is on disk when this returns.
    pub fn write(&self, batch: Batch, sync: bool) -> Result<(), StoreError> {
        let (mirror, changes, meta, dead) = (
            self.cf(CF_MIRROR)?,
            self.cf(CF_CHANGES)?,
            self.cf(CF_META)?,
            self.cf(CF_DEAD_LETTERS)?,
        );
        let (raw, acks) = (self.cf(CF_RAW)?, self.cf(CF_ACKS)?);
        let mut write = WriteBatch::default();
        for op in batch.ops {
            match op {
                Op::PutMirror(k, v) => write.put_cf(mirror, k, v),
                Op::DeleteMirror(k) => write.delete_cf(mirror, k),
                Op::PutChange(seq, v) => write.put_cf(changes, seq.to_be_bytes(), v),
                Op::PutMeta(k, v) => write.put_cf(meta, k, v),
                Op::PutDeadLetter(seq, v) => write.put_cf(dead, seq.to_be_bytes(), v),
                Op::DeleteDeadLetter(seq) => write.delete_cf(dead, seq.to_be_bytes()),
                Op::PutRaw(k, v) => write.put_cf(raw, k, v),
                Op::DeleteRaw(k) => write.delete_cf(raw, k),
                Op::DeleteAck(id) => write.delete_cf(acks, id.to_be_bytes()),
            }
        }
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        if batch.new_acks.is_empty() {
            return self
                .db
                .write_opt(write, &options)
                .map_err(|e| self.rocks(e));
        }
        let mut next_id = self.next_ack_id.lock().unwrap_or_else(|p| p.into_inner());
        let first = *next_id;
        for (id, ack) in (first..).zip(batch.new_acks) {
            let record = AckRecord {
                id,
                db: ack.db,
                key: ack.key,
                uuid: ack.uuid,
                failure: ack.failure,
                offset: ack.offset,
            };
            write.put_cf(acks, id.to_be_bytes(), record.encode());
            *next_id = id + 1;
        }
        let written = self
            .db
            .write_opt(write, &options)
            .map_err(|e| self.rocks(e));
        if written.is_err() {
            *next_id = first;
        }
        written
    }

    /// All dead letters, in seq order.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let all = usize::MAX;
        self.by_seq(
            CF_DEAD_LETTERS,
            "dead letter key",
            0,
            all,
            DeadLetter::decode,
        )
    }

    /// What Redis really holds for `key`, when a `#` op on it is not completed yet.
    pub fn raw(&self, db: u32, key: &[u8]) -> Result<Option<MirrorValue>, StoreError> {
        self.mirror_value(CF_RAW, db, key)
    }

    /// The raw state of `key` (when its `#` op is not completed) with its mirror state. The
    /// raw state is read again after the mirror: if it moved meanwhile, `None` (capture will
    /// report the key again).
    #[allow(clippy::type_complexity)]
    pub fn pending_completion(
        &self,
        db: u32,
        key: &[u8],
    ) -> Result<Option<(MirrorValue, Option<MirrorValue>)>, StoreError> {
        let Some(raw) = self.raw(db, key)? else {
            return Ok(None);
        };
        let intended = self.mirror(db, key)?;
        if self.raw(db, key)?.as_ref() != Some(&raw) {
            return Ok(None);
        }
        Ok(Some((raw, intended)))
    }

    /// Forgets every raw state (a full sync finds pending ops again).
    pub fn clear_raw(&self) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_RAW)?, Vec::<u8>::new(), vec![0xffu8; 5]);
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db
            .write_opt(batch, &options)
            .map_err(|e| self.rocks(e))
    }

    /// Every key with a `#` op not completed in Redis.
    pub fn raw_keys(&self) -> Result<Vec<(u32, Bytes)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_RAW)?, IteratorMode::Start) {
            let (raw_key, _) = item.map_err(|e| self.rocks(e))?;
            if let Some(entry) = split_mirror_key(&raw_key) {
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// Up to `limit` acknowledgements not written yet with id >= `from`, oldest first. (Written
    /// ones are deleted: starting after them skips their tombstones.)
    pub fn acks(&self, from: u64, limit: usize) -> Result<Vec<AckRecord>, StoreError> {
        self.by_seq(CF_ACKS, "ack key", from, limit, AckRecord::decode)
    }

    /// The seq up to which `backend`'s acks are queued (0: none recorded).
    pub fn acks_enqueued(&self, backend: &str) -> Result<u64, StoreError> {
        let mut key = META_ACKS_ENQUEUED_PREFIX.to_vec();
        key.extend_from_slice(backend.as_bytes());
        match self
            .db
            .get_cf(self.cf(CF_META)?, key)
            .map_err(|e| self.rocks(e))?
        {
            Some(raw) => self.seq_key(&raw, "acks_enqueued"),
            None => Ok(0),
        }
    }

    /// Approximate bytes on disk (SST files).
    pub fn disk_size(&self) -> u64 {
        self.db
            .property_int_value(rocksdb::properties::TOTAL_SST_FILES_SIZE)
            .ok()
            .flatten()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value() -> MirrorValue {
        let mut v = MirrorValue::hash(3);
        v.expire_at_ms = Some(1_700_000_000_000);
        v.fields.insert(
            Bytes::from("a"),
            FieldValue {
                value: Bytes::from("1"),
                expire_at_ms: None,
            },
        );
        v.fields.insert(
            Bytes::from("b"),
            FieldValue {
                value: Bytes::from_static(b"\x00\xff"),
                expire_at_ms: Some(5),
            },
        );
        v
    }

    #[test]
    fn everything_round_trips_and_corruption_is_an_error() -> Result<(), Box<dyn std::error::Error>>
    {
        let v = value();
        assert_eq!(MirrorValue::decode(&v.encode())?, v);
        let change = Change {
            seq: 7,
            unit: 6,
            unit_end: true,
            offset: ReplOffset(99),
            mapping: "m".into(),
            row_id: Bytes::from("1"),
            row: RowChange::Upsert {
                columns: vec![
                    ("first".into(), Some(Bytes::from("x"))),
                    ("age".into(), None),
                ],
            },
            op: Some(HashOp {
                op: b'=',
                uuid: Bytes::from("u"),
                db: 3,
                key: Bytes::from("p:1"),
            }),
        };
        assert_eq!(Change::decode(7, &change.encode())?, change);
        let ack = AckRecord {
            id: 9,
            db: 1,
            key: Bytes::from("p:1"),
            uuid: Bytes::from("u-1"),
            failure: Some("too long".into()),
            offset: 77,
        };
        assert_eq!(AckRecord::decode(9, &ack.encode())?, ack);
        assert_eq!(ack.stream_key(), b"{p:1}u-1".to_vec());
        let cp = Checkpoint {
            position: Some(StreamPosition {
                replid: ReplId::parse(&"a".repeat(40)).ok_or("replid")?,
                offset: ReplOffset(5),
                db: 2,
            }),
            next_seq: 10,
            generation: 2,
            full_sync_in_progress: false,
        };
        assert_eq!(Checkpoint::decode(&cp.encode())?, cp);
        let raw = v.encode();
        for cut in 0..raw.len() {
            assert!(MirrorValue::decode(&raw[..cut]).is_err());
        }
        Ok(())
    }

    #[test]
    fn store_writes_atomically_and_trims() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let mut batch = Batch::default();
        batch.put_mirror(1, b"person2:1", &value());
        for seq in 0..5 {
            batch.put_change(&Change {
                seq,
                unit: seq,
                unit_end: true,
                offset: ReplOffset(seq),
                mapping: "m".into(),
                row_id: Bytes::from("1"),
                row: RowChange::Delete,
                op: None,
            });
        }
        batch.put_checkpoint(&Checkpoint {
            next_seq: 5,
            ..Checkpoint::default()
        });
        store.write(batch, true)?;
        assert_eq!(store.mirror(1, b"person2:1")?, Some(value()));
        assert_eq!(store.mirror(0, b"person2:1")?, None);
        assert_eq!(store.mirror_scan(Some(1), None, 10)?.len(), 1);
        assert_eq!(
            store
                .changes(2, 2)?
                .iter()
                .map(|c| c.seq)
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        store.trim_changes(2)?;
        assert_eq!(
            store
                .changes(0, 10)?
                .iter()
                .map(|c| c.seq)
                .collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert_eq!(store.checkpoint()?.next_seq, 5);
        drop(store);
        let store = Store::open(dir.path())?;
        assert_eq!(store.checkpoint()?.next_seq, 5);
        Ok(())
    }
}
