//! The change log (`changes` family): its entries, reading from a seq, trimming and cutting.
//!
//! # Format (buffer format 3)
//!
//! An entry holds consecutive changes of one batch, a *block* of about [`BLOCK_BYTES`] (a batch
//! writes as many as its changes need). Key: the **last** seq of the block, `seq u64`, then the
//! byte 1 (9 bytes). Value: per change, in increasing seq order, `seq u64` then the change's
//! encoding as `bytes` (`u32 length` + the bytes `change.rs` describes); the last change's seq
//! is the key's. Every change of an entry has a higher seq than the last of the entry before
//! it: entries never overlap, so the log in key order is the changes in seq order.
//!
//! Buffers of format 2 (before 2026-11-30) hold one change per entry, under the 8-byte key
//! `seq u64`, its value the change's encoding; they are read as blocks of one (whose last seq
//! is their seq), so such a buffer is used as it is (opening it records format 3; no entry is
//! rewritten). The two forms sort by their seqs: `s` before `s` + byte 1 before `s + 1`.
//!
//! # Why blocks
//! A change per entry cost a RocksDB memtable insert per change: a skip-list search of about
//! forty key comparisons, about 3,200 instructions, a third of the committer's thread
//! (`scripts/bench-instructions.sh`, docs/benchmarks.md session 19). A block is one insert per
//! about two hundred changes. Blocks are bounded because RocksDB reads a value whole, in a
//! table block of its own when it is larger than the table's blocks: a batch's 10,000 changes
//! (1.5 MB) in one value were read and decompressed again by every read of the sinks, as the
//! change log's block cache (16 MiB in 32 shards of 512 KiB) cannot keep a block larger than a
//! shard.
//!
//! # Reading, trimming, cutting
//! Keyed by their last seq, the entries are found by forward seeks only (a backward seek in
//! RocksDB crosses every memtable, table and range deletion backwards, and the sinks read
//! after every commit: keyed by first seq, with `seek_for_prev`, an initial load took a
//! quarter more CPU).
//! - **Reading from a seq** starts at the first entry whose key is at least the seq's 8 bytes:
//!   the entry holding it. Its changes before the seq are skipped.
//! - **Trimming** through a seq deletes the keys below `seq + 1`: the entries whose changes
//!   are all applied. An entry holding a change the sinks have not applied stays whole, its
//!   applied changes included, until all of them are; readers skip them (they read from a
//!   seq) and `status` counts them as held.
//! - **Cutting** from a seq (rolling back an open unit) deletes every key from the seq's 8
//!   bytes on, and writes the entry holding that seq, if it started before it, again with only
//!   its earlier changes (under its new last seq).

use rocksdb::{DBAccess, DBRawIteratorWithThreadMode, WriteBatch};

use super::change::ChangeParts;
use super::codec::{DecodeError, Decoder};
use super::{Change, StoreError, CF_CHANGES};
use crate::position::ChangeSeq;

/// The size at which a block is full (its last change may end past it).
pub(super) const BLOCK_BYTES: usize = 32 << 10;

/// The last byte of a block's key.
const BLOCK_TAG: u8 = 1;

/// The key of a block whose last change is `last`.
pub(super) fn block_key(last: ChangeSeq) -> [u8; 9] {
    let mut key = [BLOCK_TAG; 9];
    key[..8].copy_from_slice(&last.key());
    key
}

/// Appends a change already encoded, numbered `seq`, to a block's value being built.
fn append_encoded(block: &mut Vec<u8>, seq: ChangeSeq, encoded: &[u8]) {
    block.extend_from_slice(&seq.key());
    block.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    block.extend_from_slice(encoded);
}

/// Appends a change, numbered `seq`, to a block's value being built (encoded in place, its
/// length written after).
pub(super) fn append_to_block(block: &mut Vec<u8>, change: &ChangeParts) {
    block.extend_from_slice(&change.seq.key());
    let length_at = block.len();
    block.extend_from_slice(&[0; 4]);
    change.append_to(block);
    let length = (block.len() - length_at - 4) as u32;
    block[length_at..length_at + 4].copy_from_slice(&length.to_be_bytes());
}

/// One entry of the log: its changes' seqs and encodings, in order.
pub(super) struct Entry<'a> {
    /// The last seq (the key's).
    last_seq: u64,
    /// The change of a format 2 entry; `None` for a block.
    single: Option<&'a [u8]>,
    block: Decoder<'a>,
    /// The seq of the change returned last.
    last: Option<u64>,
}

impl<'a> Entry<'a> {
    /// Reads an entry's key and value.
    pub(super) fn parse(key: &[u8], value: &'a [u8]) -> Result<Entry<'a>, DecodeError> {
        let key_error = |message: String| DecodeError {
            what: "change log key",
            at: 0,
            message,
        };
        let single = match (key.len(), key.last()) {
            (8, _) => true,
            (9, Some(&BLOCK_TAG)) => false,
            (9, Some(other)) => {
                return Err(key_error(format!(
                    "last byte {other}, expected {BLOCK_TAG}"
                )))
            }
            (n, _) => return Err(key_error(format!("{n} bytes, expected 8 or 9"))),
        };
        let mut seq = [0; 8];
        seq.copy_from_slice(&key[..8]);
        Ok(Entry {
            last_seq: u64::from_be_bytes(seq),
            single: single.then_some(value),
            block: Decoder::new(if single { &[] } else { value }, "change block"),
            last: None,
        })
    }

    /// The next change's seq and encoding, or `None` after the last.
    pub(super) fn next_change(&mut self) -> Result<Option<(ChangeSeq, &'a [u8])>, DecodeError> {
        if let Some(single) = self.single.take() {
            self.last = Some(self.last_seq);
            return Ok(Some((ChangeSeq(self.last_seq), single)));
        }
        if self.block.at_end() {
            return match self.last {
                None => Err(self.block.error("an empty block")),
                Some(last) if last != self.last_seq => Err(self.block.error(format!(
                    "the block keyed {} ends at seq {last}",
                    self.last_seq
                ))),
                Some(_) => Ok(None),
            };
        }
        let seq = self.block.u64()?;
        if self.last.is_some_and(|last| seq <= last) || seq > self.last_seq {
            return Err(self.block.error(format!(
                "seq {seq} after {:?} in the block keyed {}: seqs increase up to the key's",
                self.last, self.last_seq
            )));
        }
        let change = self.block.bytes_slice()?;
        self.last = Some(seq);
        Ok(Some((ChangeSeq(seq), change)))
    }
}

/// What one read of the change log returns at most: `changes` changes, and changes taking
/// about `bytes` of memory once decoded, each counted as its encoded size plus
/// [`DECODED_CHANGE_BYTES`]. A read returns at least one change (a change larger than `bytes`
/// is read alone). A count alone did not bound a sink's memory: a change carries its row's
/// mapped values, and values may be large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimit {
    pub changes: usize,
    pub bytes: usize,
}

/// A count alone: no bound on bytes.
impl From<usize> for ReadLimit {
    fn from(changes: usize) -> ReadLimit {
        ReadLimit {
            changes,
            bytes: usize::MAX,
        }
    }
}

/// What a change read from the log takes in a sink beyond its encoded bytes: the decoded
/// `Change` and its row image, its coalesced row and the row's converted values (measured
/// with `bench-e2e.sh`: docs/benchmarks.md, session 21).
pub const DECODED_CHANGE_BYTES: usize = 1024;

impl super::Store {
    /// Up to `limit` changes with `from <= seq < until`, in order, read with `iter` (of the
    /// change log, from the database or a snapshot).
    pub(super) fn read_changes<D: DBAccess>(
        &self,
        mut iter: DBRawIteratorWithThreadMode<'_, D>,
        from: ChangeSeq,
        until: u64,
        limit: ReadLimit,
    ) -> Result<Vec<Change>, StoreError> {
        let mut out = Vec::new();
        let mut weight = 0usize;
        iter.seek(from.key());
        'entries: while let Some((key, value)) = iter.item() {
            let mut entry = Entry::parse(key, value).map_err(|e| self.corrupt(e))?;
            while let Some((seq, bytes)) = entry.next_change().map_err(|e| self.corrupt(e))? {
                if seq < from {
                    continue;
                }
                weight = weight.saturating_add(bytes.len().saturating_add(DECODED_CHANGE_BYTES));
                let over = !out.is_empty() && weight > limit.bytes;
                if seq.0 >= until || out.len() >= limit.changes || over {
                    break 'entries;
                }
                out.push(Change::decode(seq, bytes).map_err(|e| self.corrupt(e))?);
            }
            iter.next();
        }
        iter.status().map_err(|e| self.rocks(e))?;
        Ok(out)
    }

    /// The changes with seq >= `from`, in order, as many as `limit` allows.
    pub fn changes(
        &self,
        from: ChangeSeq,
        limit: impl Into<ReadLimit>,
    ) -> Result<Vec<Change>, StoreError> {
        let iter = self.db.raw_iterator_cf(self.cf(CF_CHANGES)?);
        self.read_changes(iter, from, u64::MAX, limit.into())
    }

    /// Removes every entry whose changes all have seq <= `through` (the sinks have applied
    /// them); the entry holding `through` and later changes stays (see the module doc).
    pub fn trim_changes(&self, through: ChangeSeq) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(CF_CHANGES)?,
            0u64.to_be_bytes(),
            through.next().key(),
        );
        self.write_rocks(batch, false)
    }

    /// Adds to `write` the deletion of every change with seq >= `from`: the entries from
    /// there, and the changes from `from` on of the entry holding it.
    pub(super) fn cut_changes(
        &self,
        write: &mut WriteBatch,
        from: ChangeSeq,
    ) -> Result<(), StoreError> {
        let changes = self.cf(CF_CHANGES)?;
        let mut iter = self.db.raw_iterator_cf(changes);
        iter.seek(from.key());
        if let Some((key, value)) = iter.item() {
            let mut entry = Entry::parse(key, value).map_err(|e| self.corrupt(e))?;
            let mut kept = Vec::new();
            let mut kept_last = None;
            while let Some((seq, bytes)) = entry.next_change().map_err(|e| self.corrupt(e))? {
                if seq >= from {
                    break;
                }
                append_encoded(&mut kept, seq, bytes);
                kept_last = Some(seq);
            }
            // The entry itself, keyed at or after `from`, goes with the range below.
            if let Some(last) = kept_last {
                write.put_cf(changes, block_key(last), kept);
            }
        }
        iter.status().map_err(|e| self.rocks(e))?;
        write.delete_range_cf(changes, from.key(), u64::MAX.to_be_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{Batch, Store};

    fn change(seq: u64) -> Change {
        Change::deleting(seq)
    }

    fn seqs(changes: &[Change]) -> Vec<u64> {
        changes.iter().map(|c| c.seq.0).collect()
    }

    /// A log as a buffer of format 2 left it (one change per 8-byte key, seqs 1-3), then blocks
    /// of 4-6 and 7-9 written by this build.
    fn mixed_log(dir: &std::path::Path) -> Result<Store, Box<dyn std::error::Error>> {
        let store = Store::open(dir)?;
        let log = store.cf(CF_CHANGES)?;
        for seq in 1..=3 {
            store
                .db
                .put_cf(log, ChangeSeq(seq).key(), change(seq).encode())?;
        }
        for block in [4..=6, 7..=9] {
            let mut batch = Batch::default();
            batch.put_changes(block.map(change).collect());
            store.write(batch, false)?;
        }
        Ok(store)
    }

    #[test]
    fn reads_from_any_seq_of_either_form() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = mixed_log(dir.path())?;
        assert_eq!(
            store.changes(ChangeSeq::NONE, 100)?,
            (1..=9).map(change).collect::<Vec<_>>()
        );
        for from in 0..=10 {
            for limit in [1, 2, 5, 100] {
                let expected: Vec<u64> = (from.max(1)..=9).take(limit).collect();
                assert_eq!(
                    seqs(&store.changes(ChangeSeq(from), limit)?),
                    expected,
                    "from {from}, limit {limit}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn trimming_removes_whole_entries_only() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = mixed_log(dir.path())?;
        store.trim_changes(ChangeSeq(2))?;
        assert_eq!(
            seqs(&store.changes(ChangeSeq::NONE, 100)?),
            (3..=9).collect::<Vec<_>>()
        );
        // 5 is applied, 6 is not: the block of 4-6 stays whole.
        store.trim_changes(ChangeSeq(5))?;
        assert_eq!(
            seqs(&store.changes(ChangeSeq::NONE, 100)?),
            (4..=9).collect::<Vec<_>>()
        );
        assert_eq!(
            seqs(&store.changes(ChangeSeq(6), 100)?),
            (6..=9).collect::<Vec<_>>()
        );
        store.trim_changes(ChangeSeq(6))?;
        assert_eq!(
            seqs(&store.changes(ChangeSeq::NONE, 100)?),
            (7..=9).collect::<Vec<_>>()
        );
        store.trim_changes(ChangeSeq(20))?;
        assert!(store.changes(ChangeSeq::NONE, 100)?.is_empty());
        store.trim_changes(ChangeSeq(20))?;
        Ok(())
    }

    #[test]
    fn cutting_keeps_what_comes_before() -> Result<(), Box<dyn std::error::Error>> {
        for from in 1..=10 {
            let dir = tempfile::tempdir()?;
            let store = mixed_log(dir.path())?;
            let mut write = WriteBatch::default();
            store.cut_changes(&mut write, ChangeSeq(from))?;
            store.write_rocks(write, false)?;
            assert_eq!(
                store.changes(ChangeSeq::NONE, 100)?,
                (1..from.min(10)).map(change).collect::<Vec<_>>(),
                "cut from {from}"
            );
            // The log goes on after a cut as before it.
            let mut batch = Batch::default();
            batch.put_changes((from..from + 2).map(change).collect());
            store.write(batch, false)?;
            assert_eq!(
                seqs(&store.changes(ChangeSeq::NONE, 100)?),
                (1..from + 2).collect::<Vec<_>>()
            );
        }
        Ok(())
    }

    #[test]
    fn damaged_entries_are_errors_naming_what_was_seen() -> Result<(), Box<dyn std::error::Error>> {
        let mut good = Vec::new();
        append_to_block(&mut good, &change(5).parts());
        append_to_block(&mut good, &change(6).parts());
        let mut backwards = Vec::new();
        append_to_block(&mut backwards, &change(5).parts());
        append_to_block(&mut backwards, &change(5).parts());
        let cases: Vec<(Vec<u8>, Vec<u8>, &str)> = vec![
            (
                block_key(ChangeSeq(7)).to_vec(),
                good.clone(),
                "ends at seq 6",
            ),
            (
                block_key(ChangeSeq(5)).to_vec(),
                good.clone(),
                "up to the key's",
            ),
            (block_key(ChangeSeq(5)).to_vec(), backwards, "seqs increase"),
            (
                block_key(ChangeSeq(5)).to_vec(),
                Vec::new(),
                "an empty block",
            ),
            (
                block_key(ChangeSeq(6)).to_vec(),
                good[..good.len() - 1].to_vec(),
                "more bytes",
            ),
            (vec![0; 10], good.clone(), "10 bytes, expected 8 or 9"),
            (
                [&ChangeSeq(5).key()[..], &[2]].concat(),
                good.clone(),
                "last byte 2",
            ),
        ];
        for (key, value, expected) in cases {
            let dir = tempfile::tempdir()?;
            let store = Store::open(dir.path())?;
            store.db.put_cf(store.cf(CF_CHANGES)?, &key, &value)?;
            match store.changes(ChangeSeq::NONE, 100) {
                Err(e @ StoreError::Corrupt { .. }) => {
                    assert!(
                        e.to_string().contains(expected),
                        "{e} should say {expected}"
                    )
                }
                other => panic!("{key:?}: expected a corrupt entry, got {other:?}"),
            }
        }
        Ok(())
    }

    #[test]
    fn a_buffer_of_format_2_is_read_and_recorded_as_3() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let format = |store: &Store| -> Result<Option<Vec<u8>>, Box<dyn std::error::Error>> {
            Ok(store
                .db
                .get_cf(store.cf(super::super::CF_META)?, super::super::META_FORMAT)?)
        };
        // Written with RocksDB itself: `Store::open` refuses a format it does not read.
        let set_format = |version: u32| -> Result<(), Box<dyn std::error::Error>> {
            let db = rocksdb::DB::open_cf(
                &rocksdb::Options::default(),
                dir.path(),
                super::super::store::FAMILIES,
            )?;
            let meta = db
                .cf_handle(super::super::CF_META)
                .ok_or("no meta family")?;
            db.put_cf(meta, super::super::META_FORMAT, version.to_be_bytes())?;
            Ok(())
        };
        drop(mixed_log(dir.path())?);
        set_format(2)?;
        let store = Store::open(dir.path())?;
        assert_eq!(format(&store)?, Some(3u32.to_be_bytes().to_vec()));
        assert_eq!(
            seqs(&store.changes(ChangeSeq::NONE, 100)?),
            (1..=9).collect::<Vec<_>>()
        );
        drop(store);
        for refused in [1, 4] {
            set_format(refused)?;
            match Store::open(dir.path()) {
                Err(StoreError::Format { found, .. }) => assert_eq!(found, refused),
                other => panic!("format {refused}: {:?}", other.map(|_| ())),
            }
        }
        Ok(())
    }

    /// Damaged blocks (bytes changed, cut short, keys of every length) are errors or changes,
    /// never a panic.
    #[test]
    fn damaged_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(19);
        let mut good = Vec::new();
        for seq in 5..9 {
            append_to_block(&mut good, &change(seq).parts());
        }
        for _ in 0..20_000 {
            let mut value = good.clone();
            value.truncate(rng.random_range(0..=good.len()));
            for _ in 0..rng.random_range(0..4) {
                if !value.is_empty() {
                    let at = rng.random_range(0..value.len());
                    value[at] = rng.random();
                }
            }
            let mut key = block_key(ChangeSeq(8)).to_vec();
            key.truncate(rng.random_range(7..=9));
            let Ok(mut entry) = Entry::parse(&key, &value) else {
                continue;
            };
            while let Ok(Some((seq, bytes))) = entry.next_change() {
                let _ = Change::decode(seq, bytes);
            }
        }
    }

    /// A batch of many changes is written as blocks of about `BLOCK_BYTES`, read back from
    /// any seq across their boundaries.
    #[test]
    fn a_large_batch_is_several_bounded_blocks() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let mut batch = Batch::default();
        batch.put_changes((1..=2_000).map(change).collect());
        store.write(batch, false)?;
        let mut sizes = Vec::new();
        let mut iter = store.db.raw_iterator_cf(store.cf(CF_CHANGES)?);
        iter.seek_to_first();
        while let Some((_, value)) = iter.item() {
            sizes.push(value.len());
            iter.next();
        }
        assert!(sizes.len() > 1, "one block of {sizes:?}");
        assert!(
            sizes.iter().all(|size| *size < BLOCK_BYTES + 1024),
            "{sizes:?}"
        );
        for from in [1, 2, 999, 1_000, 1_999, 2_000] {
            assert_eq!(
                seqs(&store.changes(ChangeSeq(from), 700)?),
                (from..=2_000).take(700).collect::<Vec<_>>()
            );
        }
        Ok(())
    }

    /// A read stops before the change that would take it past its bytes, whatever the count
    /// allows, and returns at least one change however large.
    #[test]
    fn a_read_is_bounded_by_bytes_and_returns_at_least_one_change(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        // Changes 1-10 carry a 100 KB value each, 11-20 none.
        let valued = |seq: u64| Change {
            row: crate::buffer::RowChange::Upsert {
                columns: vec![("v".into(), Some(bytes::Bytes::from(vec![b'x'; 100_000])))],
            },
            ..change(seq)
        };
        let mut batch = Batch::default();
        batch.put_changes((1..=10).map(valued).chain((11..=20).map(change)).collect());
        store.write(batch, false)?;
        let limit = |bytes: usize| ReadLimit {
            changes: 1_000,
            bytes,
        };
        let per_large = 100_000 + DECODED_CHANGE_BYTES;
        // Room for three large changes and a part of a fourth: three.
        let read = store.changes(ChangeSeq(1), limit(3 * per_large + 50_000))?;
        assert_eq!(seqs(&read), vec![1, 2, 3]);
        // A bound smaller than one change: that change alone.
        assert_eq!(seqs(&store.changes(ChangeSeq(4), limit(10))?), vec![4]);
        // Small changes: as many as their bytes allow.
        let small = store.changes(ChangeSeq(11), limit(5 * (DECODED_CHANGE_BYTES + 100)))?;
        assert!((4..=5).contains(&small.len()), "{}", small.len());
        // The count still bounds, and a count alone has no bound on bytes.
        assert_eq!(store.changes(ChangeSeq(1), 20)?.len(), 20);
        assert_eq!(
            seqs(&store.changes(
                ChangeSeq(1),
                ReadLimit {
                    changes: 2,
                    bytes: usize::MAX
                }
            )?),
            vec![1, 2]
        );
        Ok(())
    }
}
