//! What the buffer takes: on disk (every file of the RocksDB directory) and in memory (RocksDB's
//! own estimates by use), for the metrics, `status` and the benchmarks.

use std::path::Path;

use super::store::FAMILIES;
use super::Store;

/// RocksDB's memory by use ([`Store::memory`]): memtables (bounded by `MEMTABLES_BYTES`), the
/// index and filter blocks of open tables held outside the block caches (those of the mirror and
/// the other families: they grow with the keyspace; the change log's are in its cache), the
/// block caches, and the cached blocks pinned (by iterators, and the log's level-0 index).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreMemory {
    pub memtables: u64,
    pub table_readers: u64,
    pub block_cache: u64,
    pub pinned_blocks: u64,
    /// Journaled mirror updates held in memory until they are settled (`journal.rs`).
    pub journal: u64,
}

impl Store {
    /// The bytes the buffer takes on disk: every column family's tables and the write-ahead log.
    pub fn disk_size(&self) -> u64 {
        directory_size(&self.path)
    }

    /// What RocksDB holds in memory, every column family together, by its own estimates.
    pub fn memory(&self) -> StoreMemory {
        let sum = |property: &str| -> u64 {
            FAMILIES
                .iter()
                .filter_map(|name| self.db.cf_handle(name))
                .filter_map(|cf| self.db.property_int_value_cf(cf, property).ok().flatten())
                .sum()
        };
        StoreMemory {
            memtables: sum("rocksdb.cur-size-all-mem-tables"),
            table_readers: sum("rocksdb.estimate-table-readers-mem"),
            block_cache: sum("rocksdb.block-cache-usage"),
            pinned_blocks: sum("rocksdb.block-cache-pinned-usage"),
            journal: self.journal.pending_bytes(),
        }
    }
}

/// The bytes of the files in `dir` (RocksDB keeps its files in one directory): tables of every
/// column family, the write-ahead log, the manifest. Unreadable entries count as nothing.
fn directory_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.metadata().ok())
        .filter(|metadata| metadata.is_file())
        .map(|metadata| metadata.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::buffer::{Batch, Change, RowChange, Store};
    use crate::position::{ChangeSeq, ReplOffset};

    /// A megabyte of changes (in the log and the tables of the `changes` family, not the
    /// default family) shows on disk and, until flushed, in the memtables.
    #[test]
    fn a_megabyte_of_changes_shows_on_disk_and_in_the_memtables(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let (disk, memory) = (store.disk_size(), store.memory());
        let mut batch = Batch::default();
        for seq in 0..1_000 {
            batch.put_change(&Change {
                seq: ChangeSeq(seq),
                unit: ChangeSeq(seq),
                unit_end: true,
                offset: ReplOffset(seq),
                mapping: "m".into(),
                row_id: Bytes::from(vec![b'x'; 1_000]),
                row: RowChange::Delete,
                op: None,
            });
        }
        store.write(batch, true)?;
        assert!(
            store.disk_size() >= disk + 1_000_000,
            "{disk} -> {}",
            store.disk_size()
        );
        let after = store.memory();
        assert!(
            after.memtables >= memory.memtables + 1_000_000,
            "{memory:?} -> {after:?}"
        );
        Ok(())
    }
}
