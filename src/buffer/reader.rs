//! Reading a buffer another process has open: `dlq list` and `status` while the service runs.
//!
//! RocksDB lets one process write a database; others may follow it as *secondary* instances,
//! which open its files without its lock, keep their own small directory (for their info log)
//! and see the data as of when they opened or last caught up. A reader never writes: the
//! identity and format mark are read, not created.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rocksdb::{Options, DB};

use super::store::{classify, FAMILIES};
use super::{Store, StoreError};

impl Store {
    /// Opens the buffer at `path` as a secondary, read-only instance: what the running service
    /// had written when this returns. Writing through it fails.
    pub fn open_for_reading(path: &Path) -> Result<Store, StoreError> {
        static READERS: AtomicU64 = AtomicU64::new(0);
        let reader_dir = std::env::temp_dir().join(format!(
            "writebehind-reader-{}-{}",
            std::process::id(),
            READERS.fetch_add(1, Ordering::Relaxed)
        ));
        let mut options = Options::default();
        // A secondary must keep every table open: the primary may delete files it read.
        options.set_max_open_files(-1);
        options.set_log_level(super::store::ROCKSDB_LOG_LEVEL);
        let db = DB::open_cf_as_secondary(&options, path, &reader_dir, FAMILIES)
            .map_err(|e| classify(path, e))?;
        db.try_catch_up_with_primary()
            .map_err(|e| classify(path, e))?;
        let store = Store {
            db,
            path: path.to_path_buf(),
            next_ack_id: std::sync::Mutex::new(0),
            identity: String::new(),
            reader_dir: Some(reader_dir),
            unsynced: Default::default(),
            #[cfg(test)]
            syncs: Default::default(),
            journal: Default::default(),
        };
        // Point reads of the mirror see what the journal holds; a reader never settles.
        store.replay_journal()?;
        Ok(store)
    }
}

#[cfg(test)]
mod tests {
    use crate::buffer::{Batch, DeadLetter, Store};
    use crate::position::ChangeSeq;

    #[test]
    fn a_reader_sees_what_the_open_buffer_holds() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let mut batch = Batch::default();
        batch.put_dead_letter(&DeadLetter {
            seq: ChangeSeq(5),
            backend: "db".into(),
            mapping: "m".into(),
            row_id: "k".into(),
            reason: "refused".into(),
            at_ms: 1,
        });
        store.write(batch, true)?;
        // The writer keeps it open (and locked): a second writer is refused, a reader is not.
        assert!(Store::open(dir.path()).is_err());
        let reader = Store::open_for_reading(dir.path())?;
        assert_eq!(reader.dead_letter_summary()?.count, 1);
        let mut batch = Batch::default();
        batch.delete_dead_letter(ChangeSeq(5));
        assert!(reader.write(batch, true).is_err(), "a reader never writes");
        assert_eq!(store.dead_letter_summary()?.count, 1);
        let reader_dir = reader.reader_dir.clone();
        drop(reader);
        assert!(reader_dir.is_some_and(|d| !d.exists()));
        Ok(())
    }
}
