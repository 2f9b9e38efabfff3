//! The RocksDB store: opening (and checking the format), reading each record kind, and
//! writing batches atomically.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use rocksdb::{
    Cache, ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};

use super::batch::MirrorWrite;
use super::batch::Op;
use super::change_log::block_key;
use super::codec::{DecodeError, Decoder};
use super::field_store::{clear_fields, put_fields};
use super::journal::Journal;
use super::mirror::{mirror_key, put_entries, put_value, split_mirror_key};
use super::{
    AckRecord, Batch, Checkpoint, DeadLetter, MirrorValue, StoreError, CF_ACKS, CF_CHANGES,
    CF_DEAD_LETTERS, CF_FIELDS, CF_JOURNAL, CF_META, CF_MIRROR, CF_RAW, CF_UNDO, FORMAT_VERSION,
    META_ACKS_ENQUEUED_PREFIX, META_CHECKPOINT, META_CLOCK, META_FORMAT, META_IDENTITY,
    META_REPLID_PREFIX, META_WATCHED, OLDEST_READABLE_FORMAT,
};
use crate::position::{ChangeSeq, ReplId, ReplOffset};

/// The one place RocksDB errors are classified, by their kind: another process holding the
/// lock file, damaged data, anything else (disk full, permissions).
pub(super) fn classify(path: &Path, e: rocksdb::Error) -> StoreError {
    let path = path.to_path_buf();
    let message = e.to_string();
    match e.kind() {
        rocksdb::ErrorKind::Corruption => StoreError::Damaged { path, message },
        // `IO error: While lock file: <path>/LOCK: Resource temporarily unavailable`.
        rocksdb::ErrorKind::IOError if message.contains("/LOCK") => StoreError::InUse { path },
        _ => StoreError::RocksDb { path, message },
    }
}

/// The RocksDB buffer.
pub struct Store {
    pub(super) db: DB,
    pub(super) path: PathBuf,
    /// The id the next acknowledgement gets. Held while a batch with acks is written, so ids
    /// become visible in increasing order (the write-back task reads on from the last one).
    pub(super) next_ack_id: std::sync::Mutex<u64>,
    /// This buffer's identity (`meta/identity`).
    pub(super) identity: String,
    /// A reader's own directory (`open_for_reading`), removed when the store is dropped.
    pub(super) reader_dir: Option<PathBuf>,
    /// What is written but not synced yet (`durability.rs`).
    pub(super) unsynced: super::durability::Unsynced,
    /// Syncs begun (unit tests check what is synced before it is used).
    #[cfg(test)]
    pub(crate) syncs: std::sync::atomic::AtomicU64,
    /// Mirror updates not yet settled into the `mirror` family (`journal.rs`).
    pub(super) journal: Journal,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(dir) = &self.reader_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Every column family.
pub(super) const FAMILIES: [&str; 9] = [
    CF_MIRROR,
    CF_CHANGES,
    CF_META,
    CF_DEAD_LETTERS,
    CF_RAW,
    CF_ACKS,
    CF_UNDO,
    CF_FIELDS,
    CF_JOURNAL,
];

/// The memory RocksDB's memtables may take, all column families together (measured with
/// scripts/bench-flush.sh and scripts/bench-capture.sh: docs/benchmarks.md).
const MEMTABLES_BYTES: usize = 64 << 20;

/// What RocksDB writes to its own log (`LOG` in the buffer): fatal errors only. Its log shares
/// the buffer's disk, and RocksDB 7.x's log writer, once a line failed to be written, fails a
/// debug assertion on the next one, which Debian's build keeps: on a full disk, RocksDB's own
/// message about the failed write (the line before it having failed for want of space)
/// aborted the process instead of letting the service stop with its one-line error, and a
/// restart on the still-full disk aborted while opening the buffer (`tests/full_disk.rs`: 8
/// runs of 8 with RocksDB's default level). Everything the service has to say about its
/// buffer, it says in its own log.
pub(super) const ROCKSDB_LOG_LEVEL: rocksdb::LogLevel = rocksdb::LogLevel::Fatal;

/// The block cache of the change log, which also holds the log's index and filter blocks: the
/// memory the log's tables take is then bounded by this figure whatever the log's length
/// (without it, the index and filter blocks of every open table stay in memory beside the cache
/// and grow with the log: the soak measured 0.9 to 10.5 MB as the log grew to 669 MB). The
/// other families keep RocksDB's default (an 8 MiB cache each, index and filter blocks beside
/// it): their tables grow with the keyspace, not with time, and a 16 MiB cache shared by all,
/// index and filters included, made a full sync of a million keys 3.6x slower (evicted filter
/// blocks read again for every lookup; docs/benchmarks.md).
const CHANGE_LOG_CACHE_BYTES: usize = 16 << 20;

/// A column family's options. The mirror and the raw states are read by key for every command
/// that touches a key the mirror cache does not hold, often a key that does not exist yet:
/// bloom filters (in the memtable and in the tables) answer those without a search. The change
/// log's index blocks live in its bounded cache, those of its newest tables (level 0) pinned.
fn family_options(name: &str) -> Result<Options, rocksdb::Error> {
    let mut options = Options::default();
    if name == CF_MIRROR || name == CF_RAW || name == CF_FIELDS {
        options.set_memtable_whole_key_filtering(true);
        options.set_memtable_prefix_bloom_ratio(0.1);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        options.set_block_based_table_factory(&table);
    } else if name == CF_CHANGES {
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&Cache::new_lru_cache(CHANGE_LOG_CACHE_BYTES)?);
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        options.set_block_based_table_factory(&table);
    }
    Ok(options)
}

/// Stops RocksDB counting performance statistics on the calling thread. Its default level
/// ("count") updates a thread-local context on every memtable insert and read, which Debian's
/// shared `librocksdb` reaches through a `__tls_get_addr` call (and the context's
/// initialisation check) each time: 10-12% of capture's commit thread in `perf`. Nothing reads
/// those statistics. Called at the start of every thread that uses the buffer heavily.
pub fn stop_rocksdb_perf_counters() {
    rocksdb::perf::set_perf_stats(rocksdb::perf::PerfStatsLevel::Disable);
}

impl Store {
    /// Opens (or creates) the buffer at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        // Memtables of all column families together: RocksDB's default is 64 MiB per family,
        // two each, which a flush of a large keyspace fills in every family at once.
        options.set_db_write_buffer_size(MEMTABLES_BYTES);
        options.set_log_level(ROCKSDB_LOG_LEVEL);
        let mut families = Vec::with_capacity(FAMILIES.len());
        for name in FAMILIES {
            let options = family_options(name).map_err(|e| classify(path, e))?;
            families.push(ColumnFamilyDescriptor::new(name, options));
        }
        let db =
            DB::open_cf_descriptors(&options, path, families).map_err(|e| classify(path, e))?;
        let mut store = Store {
            db,
            path: path.to_path_buf(),
            next_ack_id: std::sync::Mutex::new(1),
            identity: String::new(),
            reader_dir: None,
            unsynced: Default::default(),
            #[cfg(test)]
            syncs: Default::default(),
            journal: Journal::default(),
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
                if !(OLDEST_READABLE_FORMAT..=FORMAT_VERSION).contains(&found) {
                    return Err(StoreError::Format {
                        path: store.path.clone(),
                        found,
                    });
                }
                // An older format is read as it is; the blocks written from now on need this
                // build or a later one.
                if found < FORMAT_VERSION {
                    let mut write = WriteBatch::default();
                    write.put_cf(meta, META_FORMAT, FORMAT_VERSION.to_be_bytes());
                    store.write_rocks(write, true)?;
                }
            }
        }
        store.identity = store.load_identity()?;
        store.replay_journal()?;
        Ok(store)
    }

    /// The buffer's identity, created (synced) the first time it is opened.
    fn load_identity(&self) -> Result<String, StoreError> {
        let meta = self.cf(CF_META)?;
        if let Some(raw) = self
            .db
            .get_cf(meta, META_IDENTITY)
            .map_err(|e| self.rocks(e))?
        {
            return String::from_utf8(raw).map_err(|_| {
                self.corrupt(DecodeError {
                    what: "buffer identity",
                    at: 0,
                    message: "not UTF-8".into(),
                })
            });
        }
        let identity = uuid::Uuid::new_v4().to_string();
        let mut write = WriteBatch::default();
        write.put_cf(meta, META_IDENTITY, identity.as_bytes());
        self.write_rocks(write, true)?;
        Ok(identity)
    }

    /// The identity every backend's checkpoint row records (see the module doc).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The latest sample of the primary's clock (`meta/clock`): `(offset, time_ms,
    /// expired_keys)`.
    pub fn clock(&self) -> Result<Option<(ReplOffset, i64, u64)>, StoreError> {
        let Some(raw) = self
            .db
            .get_cf(self.cf(CF_META)?, META_CLOCK)
            .map_err(|e| self.rocks(e))?
        else {
            return Ok(None);
        };
        let mut d = Decoder::new(&raw, "clock sample");
        let sample = (|| Ok((ReplOffset(d.u64()?), d.i64()?, d.u64()?)))()
            .map_err(|e: DecodeError| self.corrupt(e))?;
        Ok(Some(sample))
    }

    /// What the mirror was built for (`meta/watched`; `None` before the first full sync that
    /// recorded it).
    pub fn watched(&self) -> Result<Option<String>, StoreError> {
        match self
            .db
            .get_cf(self.cf(CF_META)?, META_WATCHED)
            .map_err(|e| self.rocks(e))?
        {
            Some(raw) => Ok(Some(String::from_utf8_lossy(&raw).into_owned())),
            None => Ok(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn rocks(&self, e: rocksdb::Error) -> StoreError {
        classify(&self.path, e)
    }

    /// Writes `write`, synced to disk first with `sync` (every write goes through here).
    pub(super) fn write_rocks(&self, write: WriteBatch, sync: bool) -> Result<(), StoreError> {
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        self.db
            .write_opt(write, &options)
            .map_err(|e| self.rocks(e))
    }

    pub(super) fn corrupt(&self, e: DecodeError) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            source: e,
        }
    }

    pub(super) fn cf(&self, name: &str) -> Result<&ColumnFamily, StoreError> {
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
        match self.journaled(db, key)? {
            Some(value) => Ok(value),
            None => self.mirror_value(CF_MIRROR, db, key),
        }
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

    /// Up to `limit` entries of a column family keyed by `seq u64`, with seqs in `seqs`,
    /// decoded.
    fn by_seq<T>(
        &self,
        family: &str,
        what: &'static str,
        seqs: std::ops::Range<u64>,
        limit: usize,
        decode: impl Fn(u64, &[u8]) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, StoreError> {
        let start = seqs.start.to_be_bytes();
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
            if seq >= seqs.end {
                break;
            }
            out.push(decode(seq, &value).map_err(|e| self.corrupt(e))?);
        }
        Ok(out)
    }

    /// A `seq u64` key (change log, dead letters).
    pub(super) fn seq_key(&self, key: &[u8], what: &'static str) -> Result<u64, StoreError> {
        key.try_into().map(u64::from_be_bytes).map_err(|_| {
            self.corrupt(DecodeError {
                what,
                at: 0,
                message: format!("{} bytes, expected 8", key.len()),
            })
        })
    }

    /// Applies `batch` atomically; with `sync`, it is on disk when this returns. Its mirror
    /// entries go to the journal, unless it writes the mirror some other way too (`journal.rs`).
    pub fn write(&self, batch: Batch, sync: bool) -> Result<(), StoreError> {
        let mode = batch.mirror_write();
        let _writer = (mode != MirrorWrite::None).then(|| self.journal.writer());
        // Settled by a write of its own, before the batch (never after it: a write that fails
        // must mean the batch was not written, and RocksDB is not written to again after a
        // failed write): the family then holds what the journal held, readers find the same
        // either way, and the batch lands whole after it.
        if mode == MirrorWrite::Direct || (mode == MirrorWrite::Journal && self.journal.is_due()) {
            self.settle_locked()?;
        }
        let mut write = WriteBatch::default();
        let journal = self.cf(CF_JOURNAL)?;
        let mut records = Vec::new();
        for op in batch.ops {
            match op {
                Op::MirrorEntries(entries) if mode == MirrorWrite::Journal => {
                    let record = self.journal.record(&entries);
                    write.put_cf(journal, record.key(), record.bytes());
                    records.push(record);
                }
                op => self.add_op(&mut write, op)?,
            }
        }
        let undo: Vec<_> = records.into_iter().map(|r| self.journal.apply(r)).collect();
        let written = self.write_with_acks(write, batch.new_acks, sync);
        if written.is_err() {
            undo.into_iter().rev().for_each(|u| self.journal.undo(u));
        }
        written
    }

    /// Adds one op of a batch to `write`.
    fn add_op(&self, write: &mut WriteBatch, op: Op) -> Result<(), StoreError> {
        let (mirror, changes, meta, dead) = (
            self.cf(CF_MIRROR)?,
            self.cf(CF_CHANGES)?,
            self.cf(CF_META)?,
            self.cf(CF_DEAD_LETTERS)?,
        );
        let (raw, acks) = (self.cf(CF_RAW)?, self.cf(CF_ACKS)?);
        let fields = self.cf(CF_FIELDS)?;
        match op {
            Op::MirrorEntries(entries) => put_entries(write, (mirror, fields), &entries),
            Op::PutMirror(k, v) => write.put_cf(mirror, k, v),
            Op::PutMirrorValue(db, key, value) => {
                let mirror_key = mirror_key(db, &key);
                let mut buffer = Vec::new();
                put_value(
                    write,
                    (mirror, fields),
                    (db, &key, &mirror_key),
                    &value,
                    &mut buffer,
                );
            }
            Op::ClearFields(db, key) => clear_fields(write, fields, db, &key),
            Op::PutFields(db, key, page) => put_fields(write, fields, (db, &key), &page),
            Op::DeleteMirror(k) => write.delete_cf(mirror, k),
            Op::Changes(encoded) => {
                for (first, block) in encoded.blocks {
                    write.put_cf(changes, block_key(first), block);
                }
            }
            Op::PutMeta(k, v) => write.put_cf(meta, k, v),
            Op::PutDeadLetter(seq, v) => write.put_cf(dead, seq.key(), v),
            Op::DeleteDeadLetter(seq) => write.delete_cf(dead, seq.key()),
            Op::PutRaw(k, v) => write.put_cf(raw, k, v),
            Op::DeleteRaw(k) => write.delete_cf(raw, k),
            Op::DeleteAck(id) => write.delete_cf(acks, id.to_be_bytes()),
            Op::PutUndo(k, v) => write.put_cf(self.cf(CF_UNDO)?, k, v),
            Op::CloseUnit => super::open_unit::close_unit(self, write)?,
        }
        Ok(())
    }

    /// Writes `write` with `new_acks` given their ids (in increasing order, under the lock, so
    /// they become visible in order).
    fn write_with_acks(
        &self,
        mut write: WriteBatch,
        new_acks: Vec<super::NewAck>,
        sync: bool,
    ) -> Result<(), StoreError> {
        if new_acks.is_empty() {
            return self.write_rocks(write, sync);
        }
        let acks = self.cf(CF_ACKS)?;
        let mut next_id = self.next_ack_id.lock().unwrap_or_else(|p| p.into_inner());
        let first = *next_id;
        for (id, ack) in (first..).zip(new_acks) {
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
        let written = self.write_rocks(write, sync);
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
            0..u64::MAX,
            all,
            |seq, value| DeadLetter::decode(ChangeSeq(seq), value),
        )
    }

    /// At most `limit` dead letters from `from` on, in seq order.
    pub fn dead_letters_from(
        &self,
        from: ChangeSeq,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.by_seq(
            CF_DEAD_LETTERS,
            "dead letter key",
            from.0..u64::MAX,
            limit,
            |seq, value| DeadLetter::decode(ChangeSeq(seq), value),
        )
    }

    /// The dead letter of change `seq`, if there is one.
    pub fn dead_letter(&self, seq: ChangeSeq) -> Result<Option<DeadLetter>, StoreError> {
        let value = self
            .db
            .get_pinned_cf(self.cf(CF_DEAD_LETTERS)?, seq.0.to_be_bytes())
            .map_err(|e| self.rocks(e))?;
        value
            .map(|value| DeadLetter::decode(seq, &value).map_err(|e| self.corrupt(e)))
            .transpose()
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
        let intended = self.mirror_whole(db, key)?;
        if self.raw(db, key)?.as_ref() != Some(&raw) {
            return Ok(None);
        }
        Ok(Some((raw, intended)))
    }

    /// Forgets every raw state (a full sync finds pending ops again).
    pub fn clear_raw(&self) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_RAW)?, Vec::<u8>::new(), vec![0xffu8; 5]);
        self.write_rocks(batch, true)
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
        self.by_seq(CF_ACKS, "ack key", from..u64::MAX, limit, AckRecord::decode)
    }

    /// The seq up to which `backend`'s acks are queued (0: none recorded).
    pub fn acks_enqueued(&self, backend: &str) -> Result<ChangeSeq, StoreError> {
        let mut key = META_ACKS_ENQUEUED_PREFIX.to_vec();
        key.extend_from_slice(backend.as_bytes());
        match self
            .db
            .get_cf(self.cf(CF_META)?, key)
            .map_err(|e| self.rocks(e))?
        {
            Some(raw) => self.seq_key(&raw, "acks_enqueued").map(ChangeSeq),
            None => Ok(ChangeSeq::NONE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{Change, FieldValue, HashOp, RowChange};
    use crate::position::StreamPosition;

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
            seq: ChangeSeq(7),
            unit: ChangeSeq(6),
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
        assert_eq!(Change::decode(ChangeSeq(7), &change.encode())?, change);
        let ack = AckRecord {
            id: 9,
            db: 1,
            key: Bytes::from("p:1"),
            uuid: Bytes::from("u-1"),
            failure: Some("too long".into()),
            offset: ReplOffset(77),
        };
        assert_eq!(AckRecord::decode(9, &ack.encode())?, ack);
        assert_eq!(ack.stream_key(), b"{p:1}u-1".to_vec());
        let cp = Checkpoint {
            position: Some(StreamPosition {
                replid: ReplId::parse(&"a".repeat(40)).ok_or("replid")?,
                offset: ReplOffset(5),
                db: 2,
            }),
            next_seq: ChangeSeq(10),
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
                seq: ChangeSeq(seq),
                unit: ChangeSeq(seq),
                unit_end: true,
                offset: ReplOffset(seq),
                mapping: "m".into(),
                row_id: Bytes::from("1"),
                row: RowChange::Delete,
                op: None,
            });
        }
        batch.put_checkpoint(&Checkpoint {
            next_seq: ChangeSeq(5),
            ..Checkpoint::default()
        });
        store.write(batch, true)?;
        assert_eq!(store.mirror(1, b"person2:1")?, Some(value()));
        assert_eq!(store.mirror(0, b"person2:1")?, None);
        assert_eq!(
            store
                .mirror_scan(Some(1), &crate::buffer::MirrorCursor::default(), 10)?
                .entries
                .len(),
            1
        );
        assert_eq!(
            store
                .changes(ChangeSeq(2), 2)?
                .iter()
                .map(|c| c.seq.0)
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        store.trim_changes(ChangeSeq(2))?;
        assert_eq!(
            store
                .changes(ChangeSeq::NONE, 10)?
                .iter()
                .map(|c| c.seq.0)
                .collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert_eq!(store.checkpoint()?.next_seq, ChangeSeq(5));
        drop(store);
        let store = Store::open(dir.path())?;
        assert_eq!(store.checkpoint()?.next_seq, ChangeSeq(5));
        Ok(())
    }

    /// A second process is refused as such; damaged files are reported as damage, not as a
    /// lock held by someone else (a message with "lock" in it once was).
    #[test]
    fn open_errors_are_classified_by_kind() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::InUse { .. })
        ));
        drop(store);
        let current = std::fs::read_to_string(dir.path().join("CURRENT"))?;
        let manifest = dir.path().join(current.trim());
        let mut bytes = std::fs::read(&manifest)?;
        for b in bytes.iter_mut().skip(8).step_by(3) {
            *b ^= 0x5a;
        }
        std::fs::write(&manifest, bytes)?;
        match Store::open(dir.path()) {
            Err(StoreError::Damaged { message, .. }) => {
                assert!(!message.is_empty());
            }
            Err(other) => panic!("expected damage, got {other}"),
            Ok(_) => panic!("a damaged manifest opened"),
        }
        Ok(())
    }
}
