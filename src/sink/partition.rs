//! Partitions of a backend: rows spread by key over several connections, each partition with
//! its own checkpoint row, so that a backend commits several transactions at once.
//!
//! # Layout
//!
//! `[backends.<name>] partitions = N`. A change belongs to partition
//! `fmix64(fnv1a64(table, 0x00, key)) mod N` (FNV-1a alone keeps, in its low bits, only the low
//! bits of each byte; murmur3's finalizer mixes them), where `key` is the row's key as the
//! database compares it, as far as the service can tell: an integer key column by its value
//! (`1`, `01` and `+1` are one row), a text key column lowercased (a case-insensitive collation,
//! MySQL's default, makes `Ab` and `ab` one row), anything else by its bytes. Every change of
//! one database row then goes to one partition and is applied in order. Two keys a collation
//! equates otherwise (accent-insensitive collations: `é` and `e`) can fall in two partitions:
//! use `partitions = 1` for such keys. The hash is written here, not taken from the
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
use crate::capture::mapping::Mapping;
use crate::position::ChangeSeq;

use super::convert::ColumnType;
use super::{SinkCheckpoint, TableSchema};

/// Most partitions a backend may have.
pub const MAX_PARTITIONS: u32 = 64;

/// The partition of a row among `count`: `table` and the row's key as compared by the
/// database ([`comparable_key`]).
pub fn partition_of(table: &str, key: &[u8], count: u32) -> usize {
    if count <= 1 {
        return 0;
    }
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for byte in table.bytes().chain([0u8]).chain(key.iter().copied()) {
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

/// A row id as the database compares keys of `kind`: integers by value, text lowercased,
/// anything else as it is (see the module doc).
pub fn comparable_key(kind: &ColumnType, row_id: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(row_id).ok();
    match (kind, text) {
        (ColumnType::Integer { .. }, Some(text)) => match text.trim().parse::<i128>() {
            Ok(value) => value.to_string().into_bytes(),
            Err(_) => row_id.to_vec(),
        },
        (ColumnType::Text { .. } | ColumnType::Other, Some(text)) => {
            text.to_lowercase().into_bytes()
        }
        _ => row_id.to_vec(),
    }
}

/// The partition of a change among `count`, for the backend's `mappings` and their `schemas`
/// (same order); a change of another mapping goes by its mapping name.
pub fn partition_of_change(
    change: &Change,
    mappings: &[Mapping],
    schemas: &[TableSchema],
    count: u32,
) -> usize {
    if count <= 1 {
        return 0;
    }
    let index = mappings.iter().position(|m| m.name == change.mapping);
    match index.and_then(|i| schemas.get(i)) {
        Some(schema) => partition_of(
            &schema.table,
            &comparable_key(&schema.key_column.kind, &change.row_id),
            count,
        ),
        None => partition_of(&change.mapping, &change.row_id, count),
    }
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
    (count > 1
        && count <= MAX_PARTITIONS
        && index < count as usize
        && name == row_name(backend, index, count))
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
    /// seq (where reading resumes; nothing when a row of the layout is missing, as the runner
    /// counts it), and an identity only when every row has the same one.
    pub fn merged(&self, backend: &str) -> SinkCheckpoint {
        let mut rows = self.rows.values();
        let Some(first) = rows.next() else {
            return SinkCheckpoint::default();
        };
        let mut merged = first.clone();
        let complete = match self.layouts(backend).as_slice() {
            [count] => self.rows.len() == *count as usize,
            _ => true,
        };
        if !complete {
            merged.seq = ChangeSeq::NONE;
        }
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
    /// change (FNV-1a 64 of `table \0 key`, then murmur3's fmix64), or a restart after an
    /// upgrade would skip or repeat changes.
    #[test]
    fn the_assignment_is_fixed_and_spreads_rows() {
        assert_eq!(partition_of("People", b"1", 1), 0);
        let golden: Vec<usize> = ["1", "2", "3", "4", "5", "6", "7", "8"]
            .iter()
            .map(|id| partition_of("People", id.as_bytes(), 4))
            .collect();
        // Computed independently (Python: the same FNV-1a 64 and fmix64).
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
            "the table is part of the key"
        );
        let int = ColumnType::Integer { unsigned: false };
        let text = ColumnType::Text { max_chars: None };
        for (a, b) in [("1", "01"), ("1", "+1")] {
            assert_eq!(
                comparable_key(&int, a.as_bytes()),
                comparable_key(&int, b.as_bytes())
            );
        }
        assert_eq!(comparable_key(&text, b"Ab"), comparable_key(&text, b"ab"));
        assert_ne!(comparable_key(&text, b"01"), comparable_key(&text, b"1"));
        let binary = ColumnType::Binary { max_bytes: None };
        assert_ne!(
            comparable_key(&binary, b"Ab"),
            comparable_key(&binary, b"ab")
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
        assert_eq!(found.merged("db").seq, ChangeSeq(5));
        assert_eq!(found.merged("db").buffer_id.as_deref(), Some("b"));
        let partial = FoundRows::new("db", vec![("db#0/2".into(), row(7))]);
        assert_eq!(
            partial.merged("db").seq,
            ChangeSeq::NONE,
            "a missing row applied nothing"
        );
        assert_eq!(
            parse_row_name("db", "db#0/4000000000"),
            None,
            "more than MAX_PARTITIONS"
        );
        assert_eq!(found.highest(), ChangeSeq(7));
        assert_eq!(found.applied("db", 2), vec![ChangeSeq(7), ChangeSeq(5)]);
        assert_eq!(found.applied("db", 3), vec![ChangeSeq::NONE; 3]);
    }
}
