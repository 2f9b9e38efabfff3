//! The next batch, read and coalesced while the database writes the current one.
//!
//! A batch's own time is mostly the database's (a 5,000-row batch of a full sync: 26 ms of
//! its 34 ms, docs/benchmarks.md); reading its changes from the log, splitting them by
//! partition and coalescing them took the rest, during which the database waited. So while
//! batch N is applied, batch N+1 is prepared on a blocking thread ([`ReadAhead::start`]) from
//! what the log holds then, assuming N commits: every partition then stands at N's last seq.
//! The next step uses it only if that holds ([`ReadAhead::take_for`]): the same changes, the
//! same split, the same coalescing as it would compute itself; otherwise (a failed share, a
//! changed layout) it is dropped and the step reads anew. A long unit (no unit end among the
//! changes read) is left to the step, which writes it in parts.

use tokio::task::JoinHandle;

use super::coalesce::{coalesce, Coalesced};
use super::partition::partition_of_change;
use super::TableSchema;
use crate::buffer::{Change, ReadLimit, Store, StoreError};
use crate::capture::mapping::Mapping;
use crate::position::{ChangeSeq, ReplOffset};

/// One partition's share of a batch: its writes, and of its changes those that carry a `#` op
/// (their acks are queued once it commits).
pub(super) struct Share {
    pub partition: usize,
    /// How many changes it holds.
    pub count: usize,
    /// Its changes that carry an op. The others are dropped once coalesced, so that a batch
    /// holds its rows, not its changes as well, while it waits and while it is written.
    pub with_ops: Vec<Change>,
    pub coalesced: Coalesced,
}

/// A batch of whole units split by partition.
pub(super) struct Shares {
    pub last_seq: ChangeSeq,
    /// The stream offset after its last unit.
    pub offset: ReplOffset,
    /// Only the partitions not already past it (after a crash some may be).
    pub shares: Vec<Share>,
}

/// What the step's own read found (`SinkRunner::read_batch`).
pub(super) enum Read {
    /// A batch to write.
    Batch(Shares),
    /// Nothing to write here: the log holds nothing after the applied seq, or a long unit was
    /// written in parts (`applied`: a part committed).
    Done { applied: bool },
}

/// Splits `changes` (whole units) by partition of `layout` and coalesces each share; a
/// partition whose applied seq (`applied`) is at or past a change leaves it out, and one at or
/// past the batch's end has no share. `None` for no changes.
pub(super) fn split_batch(
    changes: Vec<Change>,
    mappings: &[Mapping],
    schemas: &[TableSchema],
    layout: u32,
    applied: &[ChangeSeq],
) -> Option<Shares> {
    let last = changes.last()?;
    let (last_seq, offset) = (last.seq, last.offset);
    let mut parts: Vec<Vec<Change>> = vec![Vec::new(); applied.len()];
    for change in changes {
        let partition = partition_of_change(&change, mappings, schemas, layout);
        // After a crash some partitions may have committed this far already.
        if change.seq > applied[partition] {
            parts[partition].push(change);
        }
    }
    let shares = parts
        .into_iter()
        .enumerate()
        // A partition a crash left ahead of this batch has nothing in it (and its row must not
        // move back).
        .filter(|(partition, _)| applied[*partition] < last_seq)
        .map(|(partition, mut changes)| {
            let coalesced = coalesce(mappings, schemas, &changes);
            let count = changes.len();
            changes.retain(|c| c.op.is_some());
            changes.shrink_to_fit();
            Share {
                partition,
                count,
                with_ops: changes,
                coalesced,
            }
        })
        .collect();
    Some(Shares {
        last_seq,
        offset,
        shares,
    })
}

/// The next batch being prepared.
pub(super) struct ReadAhead {
    /// Its first seq: the one after the batch being applied.
    from: ChangeSeq,
    layout: u32,
    prepared: JoinHandle<Result<Option<Shares>, StoreError>>,
}

impl ReadAhead {
    /// Prepares the batch after `after` (on a blocking thread), as the step would if every one
    /// of `partitions` partitions of `layout` stood at `after`.
    pub(super) fn start(
        store: &std::sync::Arc<Store>,
        (mappings, schemas): (&[Mapping], &[TableSchema]),
        (layout, partitions): (u32, usize),
        after: ChangeSeq,
        limit: ReadLimit,
    ) -> ReadAhead {
        let store = store.clone();
        let (mappings, schemas) = (mappings.to_vec(), schemas.to_vec());
        let prepared = tokio::task::spawn_blocking(move || {
            let mut changes = store.closed_changes(after.next(), limit)?;
            // Whole units only; a long unit is the step's to write in parts.
            let Some(last_end) = changes.iter().rposition(|c| c.unit_end) else {
                return Ok(None);
            };
            changes.truncate(last_end + 1);
            let applied = vec![after; partitions];
            Ok(split_batch(changes, &mappings, &schemas, layout, &applied))
        });
        ReadAhead {
            from: after.next(),
            layout,
            prepared,
        }
    }

    /// The prepared batch, if it is the one that starts at `from` with every partition of
    /// `layout` at the seq before it (`applied`); `None` otherwise, or when nothing was
    /// prepared (a read failed: the step's own read reports it).
    pub(super) async fn take_for(
        self,
        from: ChangeSeq,
        layout: u32,
        applied: &[ChangeSeq],
    ) -> Option<Shares> {
        let prepared = self.prepared.await.ok()?.ok()??;
        let standing = applied.iter().all(|seq| seq.next() == from);
        (self.from == from && self.layout == layout && standing).then_some(prepared)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::buffer::{Batch, RowChange};

    /// Change `seq` of mapping `P`, a deletion, in unit `unit` (ending it when `ends`).
    fn change(seq: u64, unit: u64, ends: bool) -> Change {
        Change {
            seq: ChangeSeq(seq),
            unit: ChangeSeq(unit),
            unit_end: ends,
            offset: ReplOffset(seq * 10),
            mapping: "P".into(),
            row_id: bytes::Bytes::from(format!("{seq}")),
            row: RowChange::Delete,
            op: None,
        }
    }

    /// Changes `seqs`, each a unit of its own unless `open` (one unit without an end).
    fn store_with(
        dir: &std::path::Path,
        seqs: std::ops::RangeInclusive<u64>,
        open: bool,
    ) -> Arc<Store> {
        let store = Arc::new(Store::open(&dir.join("buffer")).expect("store"));
        let mut batch = Batch::default();
        for seq in seqs {
            batch.put_change(&change(seq, if open { 1 } else { seq }, !open));
        }
        store.write(batch, true).expect("write");
        store
    }

    /// How many changes each share holds.
    fn counts(shares: &Shares) -> Vec<usize> {
        shares.shares.iter().map(|share| share.count).collect()
    }

    #[tokio::test]
    async fn a_prepared_batch_is_taken_only_where_the_step_would_read_it() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store_with(dir.path(), 1..=10, false);
        let start = |after: u64, layout: u32, partitions: usize| {
            ReadAhead::start(
                &store,
                (&[], &[]),
                (layout, partitions),
                ChangeSeq(after),
                5.into(),
            )
        };
        let taken = start(3, 1, 1)
            .take_for(ChangeSeq(4), 1, &[ChangeSeq(3)])
            .await
            .expect("taken");
        assert_eq!(counts(&taken), vec![5], "4 to 8");
        assert_eq!(
            (taken.last_seq, taken.offset),
            (ChangeSeq(8), ReplOffset(80))
        );
        // Another start, another layout, a partition behind (its share failed): dropped.
        let at_5 = [ChangeSeq(4)];
        assert!(start(3, 1, 1)
            .take_for(ChangeSeq(5), 1, &at_5)
            .await
            .is_none());
        let two = [ChangeSeq(3), ChangeSeq(3)];
        assert!(start(3, 1, 1)
            .take_for(ChangeSeq(4), 2, &two)
            .await
            .is_none());
        let behind = [ChangeSeq(3), ChangeSeq(2)];
        assert!(start(3, 2, 2)
            .take_for(ChangeSeq(3), 2, &behind)
            .await
            .is_none());
        // A partition ahead of the others (left so by a crash): the step filters its share.
        let ahead = [ChangeSeq(3), ChangeSeq(5)];
        assert!(start(3, 2, 2)
            .take_for(ChangeSeq(4), 2, &ahead)
            .await
            .is_none());
        let taken = start(3, 2, 2).take_for(ChangeSeq(4), 2, &two).await;
        assert_eq!(taken.map(|t| counts(&t).iter().sum()), Some(5));
        // Nothing after the end.
        assert!(start(10, 1, 1)
            .take_for(ChangeSeq(11), 1, &[ChangeSeq(10)])
            .await
            .is_none());
    }

    #[tokio::test]
    async fn a_long_unit_is_left_to_the_step() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store_with(dir.path(), 1..=10, true);
        let ahead = ReadAhead::start(&store, (&[], &[]), (1, 1), ChangeSeq(0), 5.into());
        assert!(ahead
            .take_for(ChangeSeq(1), 1, &[ChangeSeq(0)])
            .await
            .is_none());
    }

    #[test]
    fn a_partition_already_past_the_batch_has_no_share() {
        let changes: Vec<Change> = (1..=4).map(|seq| change(seq, seq, true)).collect();
        let partition = |c: &Change| partition_of_change(c, &[], &[], 2);
        let expected = changes
            .iter()
            .filter(|c| partition(c) == 0 && c.seq > ChangeSeq(2))
            .count();
        // Partition 1 has applied the whole batch: no share; partition 0 the first 2 changes.
        let split =
            split_batch(changes, &[], &[], 2, &[ChangeSeq(2), ChangeSeq(4)]).expect("split");
        assert_eq!(counts(&split), vec![expected]);
        assert_eq!(split.shares[0].partition, 0);
        assert_eq!(split.last_seq, ChangeSeq(4));
        assert!(split_batch(Vec::new(), &[], &[], 1, &[ChangeSeq(0)]).is_none());
    }
}
