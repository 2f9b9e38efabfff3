//! Partitions of a backend: rows spread by key over several connections, each partition with
//! its own checkpoint row, so that a backend commits several transactions at once.
//!
//! # Layout
//!
//! `[backends.<name>] partitions = N`. A change belongs to partition
//! `fmix64(fnv1a64(mapping, 0x00, row id)) mod N` (FNV-1a alone keeps, in its low bits, only
//! the low bits of each byte; murmur3's finalizer mixes them): every change of one row goes to the same partition,
//! so a row's changes are applied in their order. The hash is written here, not taken from the
//! standard library, because it is part of what the checkpoint rows mean: it never changes
//! between versions or runs.
//!
//! # Checkpoint rows
//!
//! With one partition the row is named after the backend (`writebehind_checkpoint.backend =
//! <name>`, as before partitions existed). With N > 1, partition `p` has the row `<name>#p/N`.
//! The acknowledgement marker in the buffer (`acks_enqueued`) is kept under the same name.
//!
//! # Batches
//!
//! The runner reads one batch of whole units, splits it by partition, and applies every part
//! at once, each in one transaction with its own row (also a part with no rows, so that all rows
//! move together). It waits for all of them before the next batch. A crash can leave some rows
//! at the batch's last seq and the others one batch behind: the next start reads from the
//! lowest row and skips, per partition, what that partition's row says is applied. So each
//! change is applied once, and each row's changes in order.
//!
//! # What a MULTI spanning partitions guarantees
//!
//! With N > 1 the part of a unit (a `MULTI`, a script) that falls in one partition commits in
//! one transaction; the parts in other partitions commit in theirs, at about the same moment
//! but not atomically: a reader of the tables can see one part without the other for that
//! instant, and a crash between the commits leaves the other part to the restart. With
//! `partitions = 1` (the default) a unit is one transaction, as before.
//!
//! # Changing N
//!
//! The rows of exactly one layout exist at a time. When the configured N differs from the rows
//! found, the runner first brings the rows found to one seq `S` (a batch in the old layout, when
//! a crash left them apart), then, in one transaction, writes the N new rows at `S` and deletes
//! the old ones (the new acknowledgement markers are set to `S` first). Rows of several layouts
//! at once cannot be made by the service: they are reconciled (`reconcile.rs`).

use std::collections::BTreeMap;

use crate::buffer::Change;
use crate::position::ChangeSeq;

use super::SinkCheckpoint;

/// Most partitions a backend may have.
pub const MAX_PARTITIONS: u32 = 64;

/// The partition of a row among `count`.
pub fn partition_of(mapping: &str, row_id: &[u8], count: u32) -> usize {
    if count <= 1 {
        return 0;
    }
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for byte in mapping.bytes().chain([0u8]).chain(row_id.iter().copied()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    (hash % u64::from(count)) as usize
}

/// The partition of a change among `count`.
pub fn partition_of_change(change: &Change, count: u32) -> usize {
    partition_of(&change.mapping, &change.row_id, count)
}

/// The checkpoint row (and acknowledgement marker) name of partition `index` of `count`.
pub fn row_name(backend: &str, index: usize, count: u32) -> String {
    if count <= 1 {
        backend.to_string()
    } else {
        format!("{backend}#{index}/{count}")
    }
}

/// Which partition a checkpoint row name stands for: `(index, count)`; `None` when the name is
/// not one of `backend`'s rows.
pub fn parse_row_name(backend: &str, name: &str) -> Option<(usize, u32)> {
    if name == backend {
        return Some((0, 1));
    }
    let rest = name.strip_prefix(backend)?.strip_prefix('#')?;
    let (index, count) = rest.split_once('/')?;
    let (index, count): (usize, u32) = (index.parse().ok()?, count.parse().ok()?);
    (count > 1 && index < count as usize && name == row_name(backend, index, count))
        .then_some((index, count))
}

/// The checkpoint rows of a backend, as read at start.
#[derive(Debug, Clone, Default)]
pub struct FoundRows {
    /// By name.
    pub rows: BTreeMap<String, SinkCheckpoint>,
}

impl FoundRows {
    /// Keeps the rows that belong to `backend`.
    pub fn new(backend: &str, rows: Vec<(String, SinkCheckpoint)>) -> FoundRows {
        FoundRows {
            rows: rows
                .into_iter()
                .filter(|(name, _)| parse_row_name(backend, name).is_some())
                .collect(),
        }
    }

    /// The partition counts the rows are of (empty when there is no row).
    pub fn layouts(&self, backend: &str) -> Vec<u32> {
        let mut counts: Vec<u32> = self
            .rows
            .keys()
            .filter_map(|name| parse_row_name(backend, name).map(|(_, count)| count))
            .collect();
        counts.sort_unstable();
        counts.dedup();
        counts
    }

    /// One row standing for all of them, for the checks of `Reconcile::needed`: the lowest
    /// seq (where reading resumes), and an identity only when every row has the same one.
    pub fn merged(&self) -> SinkCheckpoint {
        let mut rows = self.rows.values();
        let Some(first) = rows.next() else {
            return SinkCheckpoint::default();
        };
        let mut merged = first.clone();
        for row in rows {
            merged.seq = merged.seq.min(row.seq);
            if row.buffer_id != merged.buffer_id {
                merged.buffer_id = None;
            }
            if row.mappings_id != merged.mappings_id {
                merged.mappings_id = None;
            }
        }
        merged
    }

    /// The highest seq of any row.
    pub fn highest(&self) -> ChangeSeq {
        self.rows.values().map(|r| r.seq).max().unwrap_or_default()
    }

    /// The applied seq of each partition of a `count` layout (a missing row: nothing applied).
    pub fn applied(&self, backend: &str, count: u32) -> Vec<ChangeSeq> {
        (0..count.max(1) as usize)
            .map(|index| {
                self.rows
                    .get(&row_name(backend, index, count))
                    .map(|r| r.seq)
                    .unwrap_or_default()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The assignment is part of what stored checkpoint rows mean: these values must never
    /// change (FNV-1a 64 of `mapping \0 row id`, then murmur3's fmix64), or a restart after an upgrade would skip or
    /// repeat changes.
    #[test]
    fn the_assignment_is_fixed_and_spreads_rows() {
        assert_eq!(partition_of("People", b"1", 1), 0);
        let golden: Vec<usize> = ["1", "2", "3", "4", "5", "6", "7", "8"]
            .iter()
            .map(|id| partition_of("People", id.as_bytes(), 4))
            .collect();
        // Computed independently (Python, the same FNV-1a 64).
        assert_eq!(golden, vec![0, 0, 1, 2, 1, 2, 1, 1]);
        let mut counts = [0usize; 4];
        for i in 0..40_000 {
            counts[partition_of("People", i.to_string().as_bytes(), 4)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(
            (
                partition_of("People", b"17", 4),
                partition_of("Cars", b"17", 4)
            ),
            (1, 3),
            "the mapping is part of the key"
        );
        // Keys differing only in the high bits of a byte ("a" and "e", "1" and "5") spread too.
        let letters: std::collections::BTreeSet<usize> = ["a", "e", "i", "m", "q", "u"]
            .iter()
            .map(|k| partition_of("People", k.as_bytes(), 4))
            .collect();
        assert!(letters.len() > 1, "{letters:?}");
    }

    #[test]
    fn row_names_round_trip_and_foreign_rows_are_ignored() {
        assert_eq!(row_name("db", 0, 1), "db");
        assert_eq!(row_name("db", 2, 4), "db#2/4");
        assert_eq!(parse_row_name("db", "db"), Some((0, 1)));
        assert_eq!(parse_row_name("db", "db#2/4"), Some((2, 4)));
        for foreign in [
            "db2",
            "db#4/4",
            "db#1/1",
            "db#01/4",
            "db#x/4",
            "other#0/2",
            "db#",
        ] {
            assert_eq!(parse_row_name("db", foreign), None, "{foreign}");
        }
        let row = |seq| SinkCheckpoint {
            seq: ChangeSeq(seq),
            buffer_id: Some("b".into()),
            mappings_id: Some("m".into()),
        };
        let found = FoundRows::new(
            "db",
            vec![
                ("db#0/2".into(), row(7)),
                ("db#1/2".into(), row(5)),
                ("dbx".into(), row(1)),
            ],
        );
        assert_eq!(found.layouts("db"), vec![2]);
        assert_eq!(found.merged().seq, ChangeSeq(5));
        assert_eq!(found.merged().buffer_id.as_deref(), Some("b"));
        assert_eq!(found.highest(), ChangeSeq(7));
        assert_eq!(found.applied("db", 2), vec![ChangeSeq(7), ChangeSeq(5)]);
        assert_eq!(found.applied("db", 3), vec![ChangeSeq::NONE; 3]);
    }
}
