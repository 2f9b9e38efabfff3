//! Hashes stored one entry per field (column family `fields`), for hashes of more than
//! [`STORED_BY_FIELD`](super::STORED_BY_FIELD) fields (`window.rs` says why).
//!
//! Such a hash's `mirror` entry is its header (kind byte 3: `mirror.rs`) with its field count;
//! each field is an entry of `fields`. Key: `db u32 + key length u32 + key bytes + field
//! bytes` (the length makes one key's fields a contiguous range no other key's fields fall in,
//! whatever the key bytes); value: `value bytes, expire_at_ms opt i64`. A hash written whole
//! (it grew past the size, or was replaced) clears its range first; a hash that stops being
//! stored by field (deleted, replaced by a small one) has its range cleared in the same write.

use bytes::Bytes;
use rocksdb::{ColumnFamily, Direction, IteratorMode, ReadOptions, Snapshot, WriteBatch};

use super::codec::{DecodeError, Decoder, Encoder};
use super::fields::Fields;
use super::mirror::mirror_key;
use super::mirror::{FieldValue, MirrorValue};
use super::store::Store;
use super::window::Window;
use super::{StoreError, CF_FIELDS, CF_MIRROR};

/// Fields read per page when a whole hash is read.
const PAGE_FIELDS: usize = 4096;

/// Where the fields of `key` in `db` start: every field key begins with it.
pub(super) fn field_prefix(db: u32, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&db.to_be_bytes());
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// The key of `field` of `key` in `db`.
pub(super) fn field_key(prefix: &[u8], field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len() + field.len());
    out.extend_from_slice(prefix);
    out.extend_from_slice(field);
    out
}

/// The first key after every key that starts with `prefix` (the prefix incremented as a
/// big-endian number; a prefix always has a byte below 0xff: its key length is below 4 GiB).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

pub(super) fn encode_field(value: &FieldValue) -> Vec<u8> {
    Encoder::default()
        .bytes(&value.value)
        .opt_i64(value.expire_at_ms)
        .finish()
}

pub(super) fn decode_field(input: &[u8]) -> Result<FieldValue, DecodeError> {
    let mut d = Decoder::new(input, "hash field");
    let value = d.bytes()?;
    let expire_at_ms = d.opt_i64()?;
    d.end()?;
    Ok(FieldValue {
        value,
        expire_at_ms,
    })
}

/// Adds to `write` what clears every stored field of `key` in `db`.
pub(super) fn clear_fields(write: &mut WriteBatch, family: &ColumnFamily, db: u32, key: &[u8]) {
    let prefix = field_prefix(db, key);
    write.delete_range_cf(family, &prefix, &prefix_end(&prefix));
}

/// Adds to `write` the fields of a window: every field after clearing the stored ones for a
/// rewrite, else only the fields it changed.
pub(super) fn put_window(
    write: &mut WriteBatch,
    family: &ColumnFamily,
    (db, key): (u32, &[u8]),
    window: &Window,
) {
    if window.is_rewrite() {
        clear_fields(write, family, db, key);
    }
    let prefix = field_prefix(db, key);
    for (name, value) in window.changed() {
        let key = field_key(&prefix, name);
        match value {
            Some(value) => write.put_cf(family, key, encode_field(value)),
            None => write.delete_cf(family, key),
        }
    }
}

/// Adds to `write` every field of a whole hash, after clearing the stored ones.
pub(super) fn put_whole(
    write: &mut WriteBatch,
    family: &ColumnFamily,
    (db, key): (u32, &[u8]),
    fields: &Fields,
) {
    clear_fields(write, family, db, key);
    put_fields(write, family, (db, key), fields);
}

/// Adds to `write` every field of `fields` (a page of a hash whose range was cleared before).
pub(super) fn put_fields(
    write: &mut WriteBatch,
    family: &ColumnFamily,
    (db, key): (u32, &[u8]),
    fields: &Fields,
) {
    let prefix = field_prefix(db, key);
    for (name, value) in fields {
        write.put_cf(family, field_key(&prefix, name), encode_field(value));
    }
}

impl Store {
    /// The stored values of `names` of the hash `key` in `db` (`None`: no such field).
    pub fn fields_of(
        &self,
        db: u32,
        key: &[u8],
        names: &[&[u8]],
    ) -> Result<Vec<Option<FieldValue>>, StoreError> {
        self.fields_at(db, key, names, None)
    }

    fn fields_at(
        &self,
        db: u32,
        key: &[u8],
        names: &[&[u8]],
        snapshot: Option<&Snapshot>,
    ) -> Result<Vec<Option<FieldValue>>, StoreError> {
        let family = self.cf(CF_FIELDS)?;
        let prefix = field_prefix(db, key);
        let keys = names.iter().map(|name| (family, field_key(&prefix, name)));
        self.db
            .multi_get_cf_opt(keys, &read_options(snapshot))
            .into_iter()
            .map(|read| match read.map_err(|e| self.rocks(e))? {
                Some(raw) => decode_field(&raw).map(Some).map_err(|e| self.corrupt(e)),
                None => Ok(None),
            })
            .collect()
    }

    /// Loads `names` into `value`'s window (a hash stored by field), those it has not seen;
    /// any other value holds them already.
    pub fn see_fields<'n>(
        &self,
        db: u32,
        key: &[u8],
        value: &mut MirrorValue,
        names: impl IntoIterator<Item = &'n [u8]>,
    ) -> Result<(), StoreError> {
        self.see_fields_at(db, key, value, names, None)
    }

    fn see_fields_at<'n>(
        &self,
        db: u32,
        key: &[u8],
        value: &mut MirrorValue,
        names: impl IntoIterator<Item = &'n [u8]>,
        snapshot: Option<&Snapshot>,
    ) -> Result<(), StoreError> {
        let Some(window) = value.fields.window_mut() else {
            return Ok(());
        };
        let mut unseen: Vec<&[u8]> = names.into_iter().filter(|n| !window.has_seen(n)).collect();
        if unseen.is_empty() {
            return Ok(());
        }
        unseen.sort_unstable();
        unseen.dedup();
        let read = self.fields_at(db, key, &unseen, snapshot)?;
        for (name, field) in unseen.into_iter().zip(read) {
            window.see(Bytes::copy_from_slice(name), field);
        }
        Ok(())
    }

    /// Up to `limit` stored fields of `key` in `db` after the field `after` (from the first
    /// when `None`), in name order.
    fn stored_fields_at(
        &self,
        db: u32,
        key: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        snapshot: Option<&Snapshot>,
    ) -> Result<Vec<(Bytes, FieldValue)>, StoreError> {
        let prefix = field_prefix(db, key);
        let start = match after {
            Some(after) => {
                let mut start = field_key(&prefix, after);
                start.push(0);
                start
            }
            None => prefix.clone(),
        };
        let mut options = read_options(snapshot);
        options.set_iterate_upper_bound(prefix_end(&prefix));
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(
            self.cf(CF_FIELDS)?,
            options,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            if out.len() >= limit {
                break;
            }
            let (raw_key, raw_value) = item.map_err(|e| self.rocks(e))?;
            let name = Bytes::copy_from_slice(&raw_key[prefix.len()..]);
            let value = decode_field(&raw_value).map_err(|e| self.corrupt(e))?;
            out.push((name, value));
        }
        Ok(out)
    }

    /// Every stored field of `key` in `db`, a page at a time, to `each`.
    pub fn each_stored_field(
        &self,
        db: u32,
        key: &[u8],
        each: impl FnMut(Bytes, FieldValue),
    ) -> Result<(), StoreError> {
        self.each_stored_field_at(db, key, each, None)
    }

    fn each_stored_field_at(
        &self,
        db: u32,
        key: &[u8],
        mut each: impl FnMut(Bytes, FieldValue),
        snapshot: Option<&Snapshot>,
    ) -> Result<(), StoreError> {
        let mut after: Option<Bytes> = None;
        loop {
            let page = self.stored_fields_at(db, key, after.as_deref(), PAGE_FIELDS, snapshot)?;
            let full = page.len() == PAGE_FIELDS;
            for (name, value) in page {
                after = Some(name.clone());
                each(name, value);
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// `value` whole: a window (a hash stored by field) merged with its stored fields. For
    /// capture, whose windows hold whatever the batch in flight writes.
    pub fn whole(
        &self,
        db: u32,
        key: &[u8],
        value: MirrorValue,
    ) -> Result<MirrorValue, StoreError> {
        self.whole_at(db, key, value, None)
    }

    fn whole_at(
        &self,
        db: u32,
        key: &[u8],
        value: MirrorValue,
        snapshot: Option<&Snapshot>,
    ) -> Result<MirrorValue, StoreError> {
        let Some(window) = value.fields.window() else {
            return Ok(value);
        };
        let mut stored = Vec::new();
        // A complete window (a rewrite) ignores what the store holds: not read.
        if !window.is_complete() {
            self.each_stored_field_at(db, key, |name, field| stored.push((name, field)), snapshot)?;
        }
        let MirrorValue {
            kind,
            expire_at_ms,
            generation,
            refreshed_through,
            fields,
        } = value;
        Ok(MirrorValue {
            kind,
            expire_at_ms,
            generation,
            refreshed_through,
            fields: fields.merged(stored),
        })
    }

    /// The mirrored value of `key` with every field (see [`Store::mirror`], which gives a hash
    /// stored by field as a window), header and fields read from one snapshot (capture may be
    /// writing meanwhile).
    pub fn mirror_whole(&self, db: u32, key: &[u8]) -> Result<Option<MirrorValue>, StoreError> {
        // A journaled value is whole. Looked up before the snapshot is taken: a key not
        // pending then is in the family, as new, at any later snapshot (`journal.rs`).
        if let Some(value) = self.journaled(db, key)? {
            return Ok(value);
        }
        let snapshot = self.db.snapshot();
        match self.mirror_at(db, key, &snapshot)? {
            Some(value) => self.whole_at(db, key, value, Some(&snapshot)).map(Some),
            None => Ok(None),
        }
    }

    /// The mirrored value of `key` with `names` loaded (a hash stored by field holds only
    /// those), read from one snapshot: what a reader outside capture needs for a row.
    pub fn mirror_with_fields<'n>(
        &self,
        db: u32,
        key: &[u8],
        names: impl IntoIterator<Item = &'n [u8]>,
    ) -> Result<Option<MirrorValue>, StoreError> {
        if let Some(value) = self.journaled(db, key)? {
            return Ok(value);
        }
        let snapshot = self.db.snapshot();
        let Some(mut value) = self.mirror_at(db, key, &snapshot)? else {
            return Ok(None);
        };
        self.see_fields_at(db, key, &mut value, names, Some(&snapshot))?;
        Ok(Some(value))
    }

    fn mirror_at(
        &self,
        db: u32,
        key: &[u8],
        snapshot: &Snapshot,
    ) -> Result<Option<MirrorValue>, StoreError> {
        let read = self
            .db
            .get_pinned_cf_opt(
                self.cf(CF_MIRROR)?,
                mirror_key(db, key),
                &read_options(Some(snapshot)),
            )
            .map_err(|e| self.rocks(e))?;
        match read {
            Some(raw) => MirrorValue::decode(&raw)
                .map(Some)
                .map_err(|e| self.corrupt(e)),
            None => Ok(None),
        }
    }
}

/// Read options at `snapshot`, if any.
fn read_options(snapshot: Option<&Snapshot>) -> ReadOptions {
    let mut options = ReadOptions::default();
    if let Some(snapshot) = snapshot {
        options.set_snapshot(snapshot);
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_keys_fields_never_reach_another_keys_range() {
        // Without the length, "ab" + field "c" and "a" + field "bc" would share a key.
        let a = field_key(&field_prefix(0, b"a"), b"bc");
        let ab = field_key(&field_prefix(0, b"ab"), b"c");
        assert_ne!(a, ab);
        let prefix = field_prefix(0, b"ab");
        assert!(a < prefix || a >= prefix_end(&prefix));
        assert_eq!(prefix_end(&[1, 2, 0xff]), vec![1, 3]);
    }

    #[test]
    fn a_field_round_trips() {
        let value = FieldValue {
            value: Bytes::from_static(b"v\x00\xff"),
            expire_at_ms: Some(-3),
        };
        assert_eq!(decode_field(&encode_field(&value)).ok(), Some(value));
        assert!(decode_field(b"\x00\x00").is_err());
    }
}
