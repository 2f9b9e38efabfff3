//! A unit written before it ends: the parts of a long `MULTI ... EXEC` (`src/capture/long_unit.rs`).
//!
//! A transaction (or a script's effects) of more than a few thousand keys would otherwise be
//! held whole in memory from the stream to its commit. Capture therefore writes it in parts,
//! each with the mirror entries and changes it made so far, while the checkpoint stays before
//! the unit's `MULTI`. Until the part holding `EXEC` is written, the buffer holds:
//!
//! - **`meta/open_unit`**: `first_seq u64` (the seq of the unit's first change: the changes from
//!   it on belong to the open unit, and none of them ends it), `start u64` (the stream offset
//!   before `MULTI`, the checkpoint's offset).
//! - **column family `undo`**: for every mirror key a written part changed, its value before the
//!   unit. Key: `u` then the mirror key; value: `u8 0` (the key did not exist) or `u8 1` then the
//!   mirror encoding. For every field of a hash stored by field (`field_store.rs`) a part wrote
//!   or cleared, the same: key `f` then the field key, value `u8 0` or `u8 1` then the field
//!   encoding.
//!
//! The last part deletes both in the write that holds the unit's last change and the checkpoint
//! after `EXEC`. A unit that cannot end (the process stopped, the link was lost, a full resync)
//! is **rolled back** ([`Store::roll_back_open_unit`]): its changes are deleted, `next_seq` goes
//! back to `first_seq`, and every mirror entry is restored from `undo`, a page at a time, each
//! page deleting its undo entries with the restored values (so a rollback cut short is simply
//! repeated). The primary then sends the unit again from its `MULTI`.
//!
//! Sinks never read into an open unit ([`Store::closed_changes`] stops at `first_seq`): its
//! changes are not a unit yet.

use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::codec::{Decoder, Encoder};
use super::field_store::{decode_field, encode_field, field_key, field_prefix};
use super::mirror::{mirror_key, FieldValue, MirrorValue};
use super::store::Store;
use super::ReadLimit;
use super::{
    Change, StoreError, CF_CHANGES, CF_FIELDS, CF_META, CF_MIRROR, CF_UNDO, META_CHECKPOINT,
};
use crate::position::{ChangeSeq, ReplOffset};

pub(super) const META_OPEN_UNIT: &[u8] = b"open_unit";
/// Every undo key of a mirror entry starts with it.
const UNDO_PREFIX: u8 = b'u';
/// Every undo key of a field starts with it (below [`UNDO_PREFIX`]: the last part deletes
/// both with one range, a rollback reads both in one pass).
const FIELD_UNDO_PREFIX: u8 = b'f';
/// Undo entries restored per write of a rollback.
const ROLLBACK_PAGE: usize = 1024;

/// A unit whose parts are in the buffer and whose end is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenUnit {
    /// The seq of its first change (`next_seq` when it began).
    pub first_seq: ChangeSeq,
    /// The stream offset before its `MULTI`.
    pub start: ReplOffset,
}

impl OpenUnit {
    pub(super) fn encode(&self) -> Vec<u8> {
        Encoder::default()
            .u64(self.first_seq.0)
            .u64(self.start.0)
            .finish()
    }

    fn decode(input: &[u8]) -> Result<OpenUnit, super::DecodeError> {
        let mut d = Decoder::new(input, "open unit");
        let unit = OpenUnit {
            first_seq: ChangeSeq(d.u64()?),
            start: ReplOffset(d.u64()?),
        };
        d.end()?;
        Ok(unit)
    }
}

/// The undo key of `key` in `db`.
pub(super) fn undo_key(db: u32, key: &[u8]) -> Vec<u8> {
    let mut out = mirror_key(db, key);
    out.insert(0, UNDO_PREFIX);
    out
}

/// The undo value of a mirror entry.
pub(super) fn undo_value(value: &Option<MirrorValue>) -> Vec<u8> {
    match value {
        None => vec![0],
        Some(value) => {
            let mut out = vec![1];
            out.extend_from_slice(&value.encode());
            out
        }
    }
}

/// Adds to `write` what deletes every undo entry and the open unit's record.
pub(super) fn close_unit(store: &Store, write: &mut WriteBatch) -> Result<(), StoreError> {
    write.delete_range_cf(store.cf(CF_UNDO)?, [FIELD_UNDO_PREFIX], [UNDO_PREFIX + 1]);
    write.delete_cf(store.cf(CF_META)?, META_OPEN_UNIT);
    Ok(())
}

impl Store {
    /// The unit whose parts are written and whose end is not, if any.
    pub fn open_unit(&self) -> Result<Option<OpenUnit>, StoreError> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_META)?, META_OPEN_UNIT)
            .map_err(|e| self.rocks(e))?
        {
            Some(raw) => OpenUnit::decode(&raw)
                .map(Some)
                .map_err(|e| self.corrupt(e)),
            None => Ok(None),
        }
    }

    /// Whether the open unit has recorded the value `key` had before it.
    pub fn has_undo(&self, db: u32, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_UNDO)?, undo_key(db, key))
            .map_err(|e| self.rocks(e))?
            .is_some())
    }

    /// Adds to `batch` the values before the open unit of the fields of `key` a part writes:
    /// `names`, and every stored field when `all_stored` (the part clears them), those without
    /// an undo entry yet.
    pub fn undo_fields(
        &self,
        batch: &mut super::Batch,
        (db, key): (u32, &[u8]),
        all_stored: bool,
        names: &[bytes::Bytes],
    ) -> Result<(), StoreError> {
        let prefix = field_prefix(db, key);
        let undo = self.cf(CF_UNDO)?;
        let mut record = |name: &[u8], before: Option<&FieldValue>| -> Result<(), StoreError> {
            let mut undo_key = vec![FIELD_UNDO_PREFIX];
            undo_key.extend_from_slice(&field_key(&prefix, name));
            let known = self
                .db
                .get_pinned_cf(undo, &undo_key)
                .map_err(|e| self.rocks(e))?;
            if known.is_none() {
                let value = match before {
                    None => vec![0],
                    Some(field) => [&[1u8][..], &encode_field(field)].concat(),
                };
                batch.put_undo_entry(undo_key, value);
            }
            Ok(())
        };
        let mut failed = Ok(());
        if all_stored {
            self.each_stored_field(db, key, |name, value| {
                if failed.is_ok() {
                    failed = record(&name, Some(&value));
                }
            })?;
        }
        failed?;
        let names: Vec<&[u8]> = names.iter().map(|n| &n[..]).collect();
        for (name, before) in names.iter().zip(self.fields_of(db, key, &names)?) {
            record(name, before.as_ref())?;
        }
        Ok(())
    }

    /// The changes with seq >= `from`, in order, as many as `limit` allows, stopping before an
    /// open unit and before changes not synced yet (`durability.rs`): what a sink may read.
    /// Both are read from one snapshot: a part written between two reads would otherwise be
    /// taken for closed changes.
    pub fn closed_changes(
        &self,
        from: ChangeSeq,
        limit: impl Into<ReadLimit>,
    ) -> Result<Vec<Change>, StoreError> {
        self.readable_changes(from, limit.into(), false)
    }

    /// As [`Store::closed_changes`], and on into the window being synced, if any
    /// (`durability.rs`): what a sink may write into its transaction, committing only once
    /// [`Store::wait_synced`] allows.
    pub fn changes_to_apply(
        &self,
        from: ChangeSeq,
        limit: impl Into<ReadLimit>,
    ) -> Result<Vec<Change>, StoreError> {
        self.readable_changes(from, limit.into(), true)
    }

    fn readable_changes(
        &self,
        from: ChangeSeq,
        limit: ReadLimit,
        window: bool,
    ) -> Result<Vec<Change>, StoreError> {
        let snapshot = self.db.snapshot();
        let until = match snapshot
            .get_pinned_cf(self.cf(CF_META)?, META_OPEN_UNIT)
            .map_err(|e| self.rocks(e))?
        {
            Some(raw) => {
                OpenUnit::decode(&raw)
                    .map_err(|e| self.corrupt(e))?
                    .first_seq
                    .0
            }
            None => u64::MAX,
        };
        // Read after the snapshot is taken: a change the snapshot holds was written after
        // its batch set this bound, so the bound read now is still set unless it is synced.
        let unsynced = match window {
            true => self.unsynced.apply_until(),
            false => self.unsynced.changes_from(),
        };
        let iter = snapshot.raw_iterator_cf(self.cf(CF_CHANGES)?);
        self.read_changes(iter, from, until.min(unsynced), limit)
    }

    /// Undoes the open unit, if any (see the module doc): its changes are deleted, the
    /// checkpoint's `next_seq` goes back to its first seq, and the mirror entries it changed
    /// get their values from before it. Returns what was rolled back.
    pub fn roll_back_open_unit(&self) -> Result<Option<OpenUnit>, StoreError> {
        let Some(open) = self.open_unit()? else {
            return Ok(None);
        };
        // The undo entries are written to the family: nothing journaled may land over them.
        self.settle_mirror()?;
        let (mirror, undo, meta) = (self.cf(CF_MIRROR)?, self.cf(CF_UNDO)?, self.cf(CF_META)?);
        let fields = self.cf(CF_FIELDS)?;
        let mut checkpoint = self.checkpoint()?;
        checkpoint.next_seq = open.first_seq;
        let mut write = WriteBatch::default();
        self.cut_changes(&mut write, open.first_seq)?;
        write.put_cf(meta, META_CHECKPOINT, checkpoint.encode());
        self.write_rocks(write, false)?;
        // Each page starts after the last key of the one before, not over its deletions.
        let mut from = vec![FIELD_UNDO_PREFIX];
        loop {
            let mut write = WriteBatch::default();
            let mut restored = 0;
            for item in self
                .db
                .iterator_cf(undo, IteratorMode::From(&from, Direction::Forward))
            {
                let (key, value) = item.map_err(|e| self.rocks(e))?;
                let prefix = key.first().copied();
                if restored == ROLLBACK_PAGE || key.first() > Some(&UNDO_PREFIX) {
                    break;
                }
                from.clear();
                from.extend_from_slice(&key);
                from.push(0);
                // A field's undo entry restores a field, any other a mirror entry.
                let (family, what): (_, &'static str) = match prefix == Some(FIELD_UNDO_PREFIX) {
                    true => (fields, "field undo entry"),
                    false => (mirror, "undo entry"),
                };
                let target = &key[1..];
                match value.split_first() {
                    Some((0, [])) => write.delete_cf(family, target),
                    Some((1, encoded)) => {
                        // Decoded first: a damaged entry is an error, never a value.
                        let decoded = match prefix == Some(FIELD_UNDO_PREFIX) {
                            true => decode_field(encoded).map(drop),
                            false => MirrorValue::decode(encoded).map(drop),
                        };
                        decoded.map_err(|e| self.corrupt(e))?;
                        write.put_cf(family, target, encoded);
                    }
                    _ => {
                        return Err(self.corrupt(super::DecodeError {
                            what,
                            at: 0,
                            message: format!("starts with {:?}", value.first()),
                        }))
                    }
                }
                write.delete_cf(undo, &key);
                restored += 1;
            }
            if restored == 0 {
                break;
            }
            self.write_rocks(write, false)?;
        }
        let mut write = WriteBatch::default();
        write.delete_cf(meta, META_OPEN_UNIT);
        self.write_rocks(write, true)?;
        Ok(Some(open))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::buffer::{Batch, Checkpoint, FieldValue};

    fn hash(value: &str) -> MirrorValue {
        let mut hash = MirrorValue::hash(1);
        let field = FieldValue {
            value: Bytes::copy_from_slice(value.as_bytes()),
            expire_at_ms: None,
        };
        hash.fields.insert(Bytes::from_static(b"f"), field);
        hash
    }

    fn change(seq: u64, unit: u64, unit_end: bool) -> Change {
        Change {
            unit: ChangeSeq(unit),
            unit_end,
            offset: ReplOffset(100),
            ..Change::deleting(seq)
        }
    }

    fn seqs(changes: &[Change]) -> Vec<u64> {
        changes.iter().map(|c| c.seq.0).collect()
    }

    /// Writes keys `k0..k<keys>` and changes 1..=4 as committed units, then a part of an open
    /// unit (changes 5 and 6) that gives `k0` a new value, creates `new`, and changes every
    /// other key too.
    fn store_with_a_written_part(dir: &std::path::Path, keys: usize) -> Store {
        let store = Store::open(dir).unwrap();
        let mut batch = Batch::default();
        for i in 0..keys {
            batch.put_mirror(0, format!("k{i}").as_bytes(), &hash("before"));
        }
        batch.put_changes((1..=4).map(|s| change(s, s, true)).collect());
        batch.put_checkpoint(&Checkpoint {
            next_seq: ChangeSeq(5),
            ..Checkpoint::default()
        });
        store.write(batch, true).unwrap();

        let mut part = Batch::default();
        for i in 0..keys {
            let key = format!("k{i}");
            part.put_undo(0, key.as_bytes(), &store.mirror(0, key.as_bytes()).unwrap());
            part.put_mirror(0, key.as_bytes(), &hash("inside"));
        }
        part.put_undo(0, b"new", &None);
        part.put_mirror(0, b"new", &hash("inside"));
        part.put_changes(vec![change(5, 5, false), change(6, 5, false)]);
        part.open_unit(&OpenUnit {
            first_seq: ChangeSeq(5),
            start: ReplOffset(90),
        });
        part.put_checkpoint(&Checkpoint {
            next_seq: ChangeSeq(7),
            ..Checkpoint::default()
        });
        store.write(part, true).unwrap();
        store
    }

    #[test]
    fn sinks_read_no_change_of_an_open_unit() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_a_written_part(dir.path(), 2);
        assert_eq!(
            seqs(&store.changes(ChangeSeq(1), 100).unwrap()),
            [1, 2, 3, 4, 5, 6]
        );
        assert_eq!(
            seqs(&store.closed_changes(ChangeSeq(1), 100).unwrap()),
            [1, 2, 3, 4]
        );
        assert_eq!(
            seqs(&store.closed_changes(ChangeSeq(5), 100).unwrap()),
            Vec::<u64>::new()
        );
    }

    /// More keys than a page of the rollback: every page is restored.
    #[test]
    fn a_rollback_restores_every_key_and_forgets_the_units_changes() {
        let dir = tempfile::tempdir().unwrap();
        let keys = ROLLBACK_PAGE * 2 + 7;
        let store = store_with_a_written_part(dir.path(), keys);
        assert!(store.has_undo(0, b"k0").unwrap());

        let open = store.roll_back_open_unit().unwrap();
        assert_eq!(
            open,
            Some(OpenUnit {
                first_seq: ChangeSeq(5),
                start: ReplOffset(90)
            })
        );
        for i in 0..keys {
            let key = format!("k{i}");
            assert_eq!(
                store.mirror(0, key.as_bytes()).unwrap(),
                Some(hash("before")),
                "{key}"
            );
            assert!(!store.has_undo(0, key.as_bytes()).unwrap());
        }
        assert_eq!(store.mirror(0, b"new").unwrap(), None);
        assert_eq!(
            seqs(&store.changes(ChangeSeq(1), 100).unwrap()),
            [1, 2, 3, 4]
        );
        assert_eq!(store.checkpoint().unwrap().next_seq, ChangeSeq(5));
        assert_eq!(store.open_unit().unwrap(), None);
        // Nothing is left to roll back.
        assert_eq!(store.roll_back_open_unit().unwrap(), None);
        assert_eq!(store.mirror(0, b"k0").unwrap(), Some(hash("before")));
    }

    /// The unit's end deletes the undo entries and the record, and keeps what the parts wrote.
    #[test]
    fn the_end_of_a_unit_keeps_its_parts() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_a_written_part(dir.path(), 3);
        let mut end = Batch::default();
        end.put_changes(vec![change(7, 5, true)]);
        end.close_unit();
        store.write(end, true).unwrap();
        assert_eq!(store.open_unit().unwrap(), None);
        assert!(!store.has_undo(0, b"k1").unwrap());
        assert!(!store.has_undo(0, b"new").unwrap());
        assert_eq!(store.roll_back_open_unit().unwrap(), None);
        assert_eq!(store.mirror(0, b"k1").unwrap(), Some(hash("inside")));
        assert_eq!(
            seqs(&store.closed_changes(ChangeSeq(1), 100).unwrap()),
            [1, 2, 3, 4, 5, 6, 7]
        );
    }
}
