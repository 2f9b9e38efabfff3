//! A batch of writes applied atomically by [`super::Store::write`].

use super::acknowledgement::NewAck;
use super::change::{Change, ChangeParts};
use super::checkpoint::Checkpoint;
use super::codec::Encoder;
use super::dead_letter::DeadLetter;
use super::fields::Fields;
use super::mirror::{mirror_key, MirrorEntries, MirrorValue};
use super::open_unit::{undo_key, undo_value, OpenUnit, META_OPEN_UNIT};
use super::{
    META_ACKS_ENQUEUED_PREFIX, META_CHECKPOINT, META_CLOCK, META_REPLID_PREFIX, META_WATCHED,
};
use crate::position::{ChangeSeq, ReplId, ReplOffset};
use std::sync::Arc;

use super::change_log::BLOCK_BYTES;

/// Changes encoded for a batch ([`Op::Changes`]) as blocks of the change log
/// (`change_log.rs`), in seq order: each encoded as it is pushed and freed at once, where it is
/// made (capture's thread), so that neither a vector of changes nor the committer's thread
/// touches their values.
#[derive(Debug, Default)]
pub struct EncodedChanges {
    pub(super) first_unit: Option<ChangeSeq>,
    /// The seq of the last change.
    last: Option<ChangeSeq>,
    /// Each block's last seq (its key) and value; the last block is being filled.
    pub(super) blocks: Vec<(ChangeSeq, Vec<u8>)>,
    /// The room the first block is made with (a batch of one change needs little).
    first_block_bytes: usize,
}

impl EncodedChanges {
    /// Room for about `changes` changes.
    pub fn with_capacity(changes: usize) -> EncodedChanges {
        EncodedChanges {
            first_unit: None,
            last: None,
            blocks: Vec::with_capacity(changes * 128 / BLOCK_BYTES + 1),
            first_block_bytes: changes.saturating_mul(128),
        }
    }

    /// The seq of the last change pushed.
    pub(super) fn last_seq(&self) -> Option<ChangeSeq> {
        self.last
    }

    /// Encodes `change` after those pushed before it; its seq must be higher than theirs.
    pub fn push(&mut self, change: Change) {
        self.push_parts(&change.parts());
    }

    /// Encodes a change from its parts after those pushed before it; its seq must be higher
    /// than theirs.
    pub fn push_parts(&mut self, change: &ChangeParts) {
        match self.last {
            None => self.first_unit = Some(change.unit.min(change.seq)),
            Some(last) => assert!(
                change.seq > last,
                "change {} pushed after {}: a block's seqs increase",
                change.seq.0,
                last.0
            ),
        }
        self.last = Some(change.seq);
        if self
            .blocks
            .last()
            .is_none_or(|(_, block)| block.len() >= BLOCK_BYTES)
        {
            let room = match self.blocks.is_empty() {
                true => self.first_block_bytes.min(BLOCK_BYTES + 1024),
                false => BLOCK_BYTES + 1024,
            };
            self.blocks.push((change.seq, Vec::with_capacity(room)));
        }
        if let Some((last, block)) = self.blocks.last_mut() {
            super::change_log::append_to_block(block, change);
            *last = change.seq;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_none()
    }
}

/// How a batch writes the mirror (`journal.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MirrorWrite {
    /// Not at all.
    None,
    /// Whole values only, as a journal record.
    Journal,
    /// Some other way too (by field, puts and deletes of its own): the journal is settled
    /// first, and every mirror write of the batch goes to the family.
    Direct,
}

/// Writes to apply together, in order, atomically.
#[derive(Debug, Default)]
pub struct Batch {
    pub(super) ops: Vec<Op>,
    pub(super) new_acks: Vec<NewAck>,
}

#[derive(Debug)]
pub(super) enum Op {
    PutRaw(Vec<u8>, Vec<u8>),
    DeleteRaw(Vec<u8>),
    DeleteAck(u64),
    PutDeadLetter(ChangeSeq, Vec<u8>),
    DeleteDeadLetter(ChangeSeq),
    PutMirror(Vec<u8>, Vec<u8>),
    /// A value stored by field (`field_store.rs`), encoded when the batch is written.
    PutMirrorValue(u32, Vec<u8>, Box<MirrorValue>),
    DeleteMirror(Vec<u8>),
    /// The stored fields of a key that is no longer stored by field (before its new value).
    ClearFields(u32, Vec<u8>),
    /// Fields of a hash stored by field, written as they are (a page of a snapshot's hash).
    PutFields(u32, Vec<u8>, Fields),
    /// Mirror entries encoded when the batch is written (on the committer's thread, not
    /// capture's), in key order.
    MirrorEntries(Arc<MirrorEntries>),
    /// Changes encoded into one block of the change log, and the first seq of the unit of
    /// the first one. Encoded where the batch is built, not on the committer's
    /// thread: the changes' values share their bytes with the mirror, and releasing them on
    /// another thread than capture's was a fifth of the committer's time (docs/benchmarks.md).
    Changes(EncodedChanges),
    PutMeta(Vec<u8>, Vec<u8>),
    /// The value a key had before the open unit (`open_unit.rs`).
    PutUndo(Vec<u8>, Vec<u8>),
    /// The open unit ends: its record and undo entries go.
    CloseUnit,
}

impl Batch {
    pub fn put_mirror(&mut self, db: u32, key: &[u8], value: &MirrorValue) {
        match value.fields.stored_by_field() {
            true => self.put_mirror_value(db, key, value.clone()),
            false => self
                .ops
                .push(Op::PutMirror(mirror_key(db, key), value.encode())),
        }
    }
    /// Puts `value`, moved (a whole large hash is not copied).
    pub fn put_mirror_value(&mut self, db: u32, key: &[u8], value: MirrorValue) {
        match value.fields.stored_by_field() {
            true => self
                .ops
                .push(Op::PutMirrorValue(db, key.to_vec(), Box::new(value))),
            false => self
                .ops
                .push(Op::PutMirror(mirror_key(db, key), value.encode())),
        }
    }
    /// Writes `fields` as fields of `key`, a hash stored by field whose header is written
    /// apart (a full sync's page).
    pub fn put_fields(&mut self, db: u32, key: &[u8], fields: Fields) {
        self.ops.push(Op::PutFields(db, key.to_vec(), fields));
    }
    /// Clears the stored fields of `key` (it was stored by field and no longer is); comes
    /// before its new value.
    pub fn clear_fields(&mut self, db: u32, key: &[u8]) {
        self.ops.push(Op::ClearFields(db, key.to_vec()));
    }
    pub fn delete_mirror(&mut self, db: u32, key: &[u8]) {
        self.ops.push(Op::DeleteMirror(mirror_key(db, key)));
    }
    /// Puts (or, for `None`, deletes) every entry; encoded when the batch is written.
    pub fn put_mirror_entries(&mut self, entries: Arc<MirrorEntries>) {
        if !entries.is_empty() {
            self.ops.push(Op::MirrorEntries(entries));
        }
    }
    /// Puts one change, as a block of its own.
    pub fn put_change(&mut self, change: &Change) {
        let mut encoded = EncodedChanges::with_capacity(1);
        encoded.push_parts(&change.parts());
        self.put_encoded_changes(encoded);
    }
    /// Puts changes (encoded here, and freed).
    pub fn put_changes(&mut self, changes: Vec<Change>) {
        let mut encoded = EncodedChanges::with_capacity(changes.len());
        for change in changes {
            encoded.push(change);
        }
        self.put_encoded_changes(encoded);
    }

    /// Puts changes encoded already.
    pub fn put_encoded_changes(&mut self, changes: EncodedChanges) {
        if !changes.is_empty() {
            self.ops.push(Op::Changes(changes));
        }
    }
    pub fn put_checkpoint(&mut self, checkpoint: &Checkpoint) {
        self.ops
            .push(Op::PutMeta(META_CHECKPOINT.to_vec(), checkpoint.encode()));
    }
    /// Records that `replid` begins at `offset` (history, for diagnostics).
    pub fn add_replid(&mut self, seq: ChangeSeq, replid: &ReplId, offset: ReplOffset) {
        let mut key = META_REPLID_PREFIX.to_vec();
        key.extend_from_slice(&seq.key());
        let mut e = Encoder::default();
        e.bytes(replid.as_str().as_bytes()).u64(offset.0);
        self.ops.push(Op::PutMeta(key, e.finish()));
    }
    pub fn put_dead_letter(&mut self, letter: &DeadLetter) {
        self.ops
            .push(Op::PutDeadLetter(letter.seq, letter.encode()));
    }
    pub fn delete_dead_letter(&mut self, seq: ChangeSeq) {
        self.ops.push(Op::DeleteDeadLetter(seq));
    }
    /// What Redis really holds for a key whose `#` op is not completed yet.
    pub fn put_raw(&mut self, db: u32, key: &[u8], value: &MirrorValue) {
        debug_assert!(value.fields.window().is_none(), "a raw state is whole");
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
    /// The latest sample of the primary's clock: `(offset, time_ms, expired_keys)`.
    pub fn put_clock(&mut self, offset: ReplOffset, time_ms: i64, expired_keys: u64) {
        let mut e = Encoder::default();
        e.u64(offset.0).i64(time_ms).u64(expired_keys);
        self.ops.push(Op::PutMeta(META_CLOCK.to_vec(), e.finish()));
    }
    /// Records what the mirror is built for (see `meta/watched`).
    pub fn put_watched(&mut self, watched: &str) {
        self.ops.push(Op::PutMeta(
            META_WATCHED.to_vec(),
            watched.as_bytes().to_vec(),
        ));
    }
    /// Records that `backend`'s changes up to `seq` have their acks queued.
    pub fn put_acks_enqueued(&mut self, backend: &str, seq: ChangeSeq) {
        let mut key = META_ACKS_ENQUEUED_PREFIX.to_vec();
        key.extend_from_slice(backend.as_bytes());
        self.ops.push(Op::PutMeta(key, seq.key().to_vec()));
    }
    /// Records the unit being written in parts (`open_unit.rs`).
    pub fn open_unit(&mut self, unit: &OpenUnit) {
        self.ops
            .push(Op::PutMeta(META_OPEN_UNIT.to_vec(), unit.encode()));
    }
    /// Records that `key` held `before` when the open unit began.
    pub fn put_undo(&mut self, db: u32, key: &[u8], before: &Option<MirrorValue>) {
        self.ops
            .push(Op::PutUndo(undo_key(db, key), undo_value(before)));
    }
    /// An undo entry already encoded (`Store::undo_fields`).
    pub(super) fn put_undo_entry(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::PutUndo(key, value));
    }
    /// The open unit's end is in this batch: its record and undo entries are deleted.
    pub fn close_unit(&mut self) {
        self.ops.push(Op::CloseUnit);
    }
    /// Whether it queues acknowledgements.
    pub fn queues_acks(&self) -> bool {
        !self.new_acks.is_empty()
    }
    /// Whether nothing outside the buffer depends on it being on disk: it only updates the
    /// mirror, deletes raw states and moves the checkpoint (no change, acknowledgement, raw
    /// state, dead letter or undo record). Capture's committer syncs such a batch later.
    pub fn is_quiet(&self) -> bool {
        self.new_acks.is_empty()
            && self.ops.iter().all(|op| match op {
                Op::PutMirror(..)
                | Op::PutMirrorValue(..)
                | Op::DeleteMirror(_)
                | Op::ClearFields(..)
                | Op::PutFields(..)
                | Op::MirrorEntries(_)
                | Op::DeleteRaw(_) => true,
                Op::PutMeta(key, _) => key == META_CHECKPOINT || key == META_CLOCK,
                _ => false,
            })
    }
    /// Puts the batch's mirror writes (`put_mirror`, `put_mirror_value`, `delete_mirror`) in key
    /// order after its other ops, a key's own writes in the order they came (a stable sort).
    /// Consecutive memtable inserts in key order walk mostly the same skiplist nodes (the
    /// journal settles the same way): a full sync's batch of 1,000 random keys. The other ops
    /// write other families, so the batch means the same; one that also writes or clears fields
    /// apart, or holds journal entries, whose order with the mirror's writes matters, is left
    /// as it is.
    pub fn sort_mirror_writes(&mut self) {
        let apart = |op: &Op| {
            matches!(
                op,
                Op::MirrorEntries(_) | Op::ClearFields(..) | Op::PutFields(..)
            )
        };
        if self.ops.iter().any(apart) {
            return;
        }
        let (mut mirror, mut ops): (Vec<Op>, Vec<Op>) = std::mem::take(&mut self.ops)
            .into_iter()
            .partition(|op| mirror_sort_key(op).is_some());
        mirror.sort_by(|a, b| mirror_sort_key(a).cmp(&mirror_sort_key(b)));
        ops.append(&mut mirror);
        self.ops = ops;
    }

    /// How it writes the mirror.
    pub(super) fn mirror_write(&self) -> MirrorWrite {
        let mut mode = MirrorWrite::None;
        for op in &self.ops {
            match op {
                Op::MirrorEntries(entries) => {
                    let by_field = entries
                        .values()
                        .any(|v| v.as_ref().is_some_and(|v| v.fields.stored_by_field()));
                    if by_field {
                        return MirrorWrite::Direct;
                    }
                    mode = MirrorWrite::Journal;
                }
                Op::PutMirror(..)
                | Op::PutMirrorValue(..)
                | Op::DeleteMirror(_)
                | Op::ClearFields(..)
                | Op::PutFields(..) => return MirrorWrite::Direct,
                _ => {}
            }
        }
        mode
    }
    /// Whether it writes raw states of `#` ops.
    pub fn touches_raw(&self) -> bool {
        self.ops
            .iter()
            .any(|op| matches!(op, Op::PutRaw(..) | Op::DeleteRaw(_)))
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.new_acks.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// A mirror write's key as its database and key, which order as the mirror key does
/// (`mirror_key`: the database in 4 big-endian bytes, then the key); `None` for other ops.
fn mirror_sort_key(op: &Op) -> Option<(u32, &[u8])> {
    match op {
        Op::PutMirror(raw, _) | Op::DeleteMirror(raw) => Some(match raw.split_first_chunk::<4>() {
            Some((db, key)) => (u32::from_be_bytes(*db), key),
            None => (0, raw.as_slice()),
        }),
        Op::PutMirrorValue(db, key, _) => Some((*db, key.as_slice())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each op as the family it writes and its key (the value's first byte for puts).
    fn shown(batch: &Batch) -> Vec<(&'static str, Vec<u8>)> {
        batch
            .ops
            .iter()
            .map(|op| match op {
                Op::PutMirror(key, value) => ("mirror", [&key[..], &value[..1]].concat()),
                Op::DeleteMirror(key) => ("mirror-", key.clone()),
                Op::PutRaw(key, _) => ("raw", key.clone()),
                Op::PutMeta(key, _) => ("meta", key.clone()),
                Op::ClearFields(_, key) => ("fields-", key.clone()),
                _ => ("other", Vec::new()),
            })
            .collect()
    }

    #[test]
    fn mirror_writes_go_in_key_order_after_the_rest_a_keys_own_in_their_order() {
        let mut batch = Batch::default();
        batch.ops.push(Op::PutMirror(b"b".to_vec(), b"1".to_vec()));
        batch.ops.push(Op::PutRaw(b"r".to_vec(), Vec::new()));
        batch.ops.push(Op::PutMirror(b"a".to_vec(), b"2".to_vec()));
        batch.ops.push(Op::DeleteMirror(b"c".to_vec()));
        batch.ops.push(Op::PutMirror(b"a".to_vec(), b"3".to_vec()));
        batch.ops.push(Op::PutMeta(b"m".to_vec(), Vec::new()));
        let raw = shown(&batch)[1].clone();
        batch.sort_mirror_writes();
        assert_eq!(
            shown(&batch),
            vec![
                raw,
                ("meta", b"m".to_vec()),
                ("mirror", b"a2".to_vec()),
                ("mirror", b"a3".to_vec()),
                ("mirror", b"b1".to_vec()),
                ("mirror-", b"c".to_vec()),
            ]
        );
    }

    #[test]
    fn a_batch_that_writes_fields_apart_keeps_its_order() {
        let mut batch = Batch::default();
        batch.ops.push(Op::PutMirror(b"b".to_vec(), b"1".to_vec()));
        batch.clear_fields(0, b"a");
        batch.ops.push(Op::PutMirror(b"a".to_vec(), b"2".to_vec()));
        let before = shown(&batch);
        batch.sort_mirror_writes();
        assert_eq!(shown(&batch), before);
    }
}
