//! Scans of the mirror in key order, a page at a time: a full sync's sweep, a flush, the sink's
//! reconciliation. A page holds at most its limit of entries; its cursor is the last key read,
//! so the next page starts after it whatever was written meanwhile.

use bytes::Bytes;
use rocksdb::{Direction, IteratorMode};

use super::codec::DecodeError;
use super::mirror::mirror_key_db;
use super::{MirrorValue, Store, StoreError, CF_MIRROR};

/// Where a scan of the mirror continues (opaque outside the buffer): the start, or after the
/// last entry of a page.
#[derive(Debug, Clone, Default)]
pub struct MirrorCursor {
    after: Option<Vec<u8>>,
}

/// A page of a mirror scan: entries in key order and, unless the scan is over, where the
/// next page starts.
#[derive(Debug)]
pub struct MirrorPage {
    pub entries: Vec<(u32, Bytes, MirrorValue)>,
    pub next: Option<MirrorCursor>,
}

impl Store {
    /// Up to `limit` mirror entries from `cursor` on, in key order, restricted to `db` when
    /// given; the page says where the next one starts.
    pub fn mirror_scan(
        &self,
        db: Option<u32>,
        cursor: &MirrorCursor,
        limit: usize,
    ) -> Result<MirrorPage, StoreError> {
        self.scan_mirror(db, cursor, limit, None)
    }

    /// Up to `limit` mirror entries of generations older than `generation`, from `cursor` on in
    /// key order (a full sync's sweep). Entries of `generation` or later are passed over
    /// without decoding more than their generation; the page's cursor stands after the last
    /// entry read, returned or not.
    pub fn mirror_scan_older(
        &self,
        generation: u64,
        cursor: &MirrorCursor,
        limit: usize,
    ) -> Result<MirrorPage, StoreError> {
        self.scan_mirror(None, cursor, limit, Some(generation))
    }

    fn scan_mirror(
        &self,
        db: Option<u32>,
        cursor: &MirrorCursor,
        limit: usize,
        older_than: Option<u64>,
    ) -> Result<MirrorPage, StoreError> {
        let start = match (&cursor.after, db) {
            (Some(after), _) => {
                let mut k = after.clone();
                k.push(0);
                k
            }
            (None, Some(db)) => db.to_be_bytes().to_vec(),
            (None, None) => Vec::new(),
        };
        // The family alone is read: what is pending is settled first. (Settling only what is
        // pending at or after the scan's start let a flush, which deletes in key order behind
        // its scan, keep its deletions pending: no faster, and 60 MB more at its peak in
        // `bench-flush.sh`.)
        self.settle_mirror()?;
        let mut entries = Vec::new();
        let mut last_key = None;
        for item in self.db.iterator_cf(
            self.cf(CF_MIRROR)?,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (raw_key, raw_value) = item.map_err(|e| self.rocks(e))?;
            let Some(key_db) = mirror_key_db(&raw_key) else {
                return Err(self.corrupt(DecodeError {
                    what: "mirror key",
                    at: 0,
                    message: "shorter than 4 bytes".into(),
                }));
            };
            if db.is_some_and(|db| db != key_db) || entries.len() >= limit {
                break;
            }
            let current = match older_than {
                Some(generation) => {
                    MirrorValue::generation_of(&raw_value).map_err(|e| self.corrupt(e))?
                        >= generation
                }
                None => false,
            };
            if !current {
                entries.push((
                    key_db,
                    Bytes::copy_from_slice(&raw_key[4..]),
                    MirrorValue::decode(&raw_value).map_err(|e| self.corrupt(e))?,
                ));
            }
            last_key = Some(raw_key);
        }
        let next = last_key.map(|key| MirrorCursor {
            after: Some(key.to_vec()),
        });
        Ok(MirrorPage { entries, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{Batch, FieldValue};

    fn hash_of(generation: u64, value: &str) -> MirrorValue {
        let mut v = MirrorValue::hash(generation);
        v.fields.insert(
            Bytes::from("f"),
            FieldValue {
                value: Bytes::copy_from_slice(value.as_bytes()),
                expire_at_ms: None,
            },
        );
        v
    }

    /// Keys `k00`..`k19` in db 0 and db 1: generation 1 for the keys whose number is a
    /// multiple of 3, generation 2 for the rest.
    fn store_of_two_generations(dir: &std::path::Path) -> Result<Store, StoreError> {
        let store = Store::open(dir)?;
        let mut batch = Batch::default();
        for db in [0u32, 1] {
            for i in 0..20 {
                let generation = if i % 3 == 0 { 1 } else { 2 };
                let key = format!("k{i:02}");
                batch.put_mirror(db, key.as_bytes(), &hash_of(generation, &key));
            }
        }
        store.write(batch, false)?;
        Ok(store)
    }

    #[test]
    fn a_scan_of_older_entries_pages_through_them_alone_and_passes_over_the_rest(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = store_of_two_generations(dir.path())?;
        let mut found = Vec::new();
        let mut pages = 0;
        let mut cursor = Some(MirrorCursor::default());
        while let Some(from) = cursor.take() {
            let page = store.mirror_scan_older(2, &from, 3)?;
            assert!(page.entries.len() <= 3);
            for (db, key, value) in page.entries {
                assert_eq!(value, hash_of(1, std::str::from_utf8(&key)?));
                found.push((db, String::from_utf8(key.to_vec())?));
            }
            cursor = page.next;
            pages += 1;
            assert!(pages < 100, "the scan does not end");
        }
        let expected: Vec<(u32, String)> = [0u32, 1]
            .into_iter()
            .flat_map(|db| (0..20).step_by(3).map(move |i| (db, format!("k{i:02}"))))
            .collect();
        assert_eq!(found, expected);
        // Nothing is older than the oldest generation; everything is older than the next one.
        let none = store.mirror_scan_older(1, &MirrorCursor::default(), 100)?;
        assert!(none.entries.is_empty());
        assert!(none.next.is_some(), "the cursor stands after what was read");
        let all = store.mirror_scan_older(3, &MirrorCursor::default(), 100)?;
        assert_eq!(all.entries.len(), 40);
        Ok(())
    }

    #[test]
    fn a_scan_of_older_entries_refuses_a_value_it_cannot_read(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = store_of_two_generations(dir.path())?;
        let cf = store.cf(CF_MIRROR)?;
        store
            .db
            .put_cf(cf, super::super::mirror::mirror_key(0, b"k05"), [9u8, 0])?;
        let err = store
            .mirror_scan_older(2, &MirrorCursor::default(), 100)
            .expect_err("a value of an unknown kind is damage");
        assert!(err.to_string().contains("mirror value"), "{err}");
        Ok(())
    }
}
