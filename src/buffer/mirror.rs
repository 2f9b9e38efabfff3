//! Mirror records: a watched key as Redis holds it (column families `mirror` and `raw`).

use std::hash::{Hash, Hasher};

use bytes::Bytes;

use super::codec::{DecodeError, Decoder, Encoder};
use super::field_store::{put_whole, put_window};
use super::fields::Fields;
use crate::position::ReplOffset;

/// The kind byte of a hash whose fields are stored apart (`field_store.rs`).
const KIND_HASH_BY_FIELD: u8 = 3;

/// What a mirrored key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorKind {
    Hash,
    /// Any other type: the key exists, it has no row.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldValue {
    pub value: Bytes,
    pub expire_at_ms: Option<i64>,
}

/// A watched key as Redis holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorValue {
    pub kind: MirrorKind,
    pub expire_at_ms: Option<i64>,
    pub generation: u64,
    pub refreshed_through: ReplOffset,
    pub fields: Fields,
}

impl MirrorValue {
    pub fn hash(generation: u64) -> Self {
        MirrorValue {
            kind: MirrorKind::Hash,
            expire_at_ms: None,
            generation,
            refreshed_through: ReplOffset(0),
            fields: Fields::new(),
        }
    }

    pub fn other(generation: u64) -> Self {
        MirrorValue {
            kind: MirrorKind::Other,
            ..MirrorValue::hash(generation)
        }
    }

    /// Whether Redis holding `raw` and the mirror holding `intended` agree, so no `#` op is
    /// left to complete: same kind and field values, a TTL on both or neither (field TTLs and
    /// the exact instant are not compared: both sides are applied from the same commands).
    pub fn agree(raw: &Option<MirrorValue>, intended: &Option<MirrorValue>) -> bool {
        match (raw, intended) {
            (None, None) => true,
            (Some(r), Some(i)) => {
                r.kind == i.kind
                    && r.expire_at_ms.is_some() == i.expire_at_ms.is_some()
                    && r.fields.len() == i.fields.len()
                    && r.fields
                        .iter()
                        .zip(i.fields.iter())
                        .all(|((f1, v1), (f2, v2))| f1 == f2 && v1.value == v2.value)
            }
            _ => false,
        }
    }

    /// Same content, whatever the bookkeeping (generation, refresh point).
    pub fn same_data(&self, other: &MirrorValue) -> bool {
        self.kind == other.kind
            && self.expire_at_ms == other.expire_at_ms
            && self.fields == other.fields
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Encodes into `out` (emptied first), so that a batch of values reuses one buffer. A
    /// window (a hash stored by field) encodes its header alone.
    pub(super) fn encode_into(&self, out: &mut Vec<u8>) {
        if self.fields.window().is_some() {
            return self.encode_header_into(out);
        }
        out.clear();
        let size: usize = self
            .fields
            .iter()
            .map(|(f, v)| f.len() + v.value.len() + 17)
            .sum();
        out.reserve(size + 30);
        let mut e = Encoder {
            out: std::mem::take(out),
        };
        e.u8(match self.kind {
            MirrorKind::Hash => 1,
            MirrorKind::Other => 2,
        })
        .opt_i64(self.expire_at_ms)
        .u64(self.generation)
        .u64(self.refreshed_through.0)
        .u32(self.fields.len() as u32);
        for (field, value) in &self.fields {
            e.bytes(field)
                .bytes(&value.value)
                .opt_i64(value.expire_at_ms);
        }
        *out = e.out;
    }

    /// The header of a hash stored by field (`field_store.rs`): kind 3, no fields.
    pub(super) fn encode_header_into(&self, out: &mut Vec<u8>) {
        out.clear();
        let mut e = Encoder {
            out: std::mem::take(out),
        };
        e.u8(KIND_HASH_BY_FIELD)
            .opt_i64(self.expire_at_ms)
            .u64(self.generation)
            .u64(self.refreshed_through.0)
            .u32(self.fields.len() as u32);
        *out = e.out;
    }

    /// The generation of an encoded value, without decoding its fields (a sweep passes over
    /// every entry of the current generation).
    pub(super) fn generation_of(input: &[u8]) -> Result<u64, DecodeError> {
        let mut d = Decoder::new(input, "mirror value");
        let kind = d.u8()?;
        if !matches!(kind, 1..=KIND_HASH_BY_FIELD) {
            return Err(d.error(format!("kind {kind}")));
        }
        d.opt_i64()?;
        d.u64()
    }

    pub(super) fn decode(input: &[u8]) -> Result<MirrorValue, DecodeError> {
        let mut d = Decoder::new(input, "mirror value");
        let kind = d.u8()?;
        if !matches!(kind, 1..=KIND_HASH_BY_FIELD) {
            return Err(d.error(format!("kind {kind}")));
        }
        let expire_at_ms = d.opt_i64()?;
        let generation = d.u64()?;
        let refreshed_through = ReplOffset(d.u64()?);
        let count = d.u32()?;
        if kind == KIND_HASH_BY_FIELD {
            d.end()?;
            return Ok(MirrorValue {
                kind: MirrorKind::Hash,
                expire_at_ms,
                generation,
                refreshed_through,
                fields: Fields::unseen(count as usize),
            });
        }
        let kind = match kind {
            1 => MirrorKind::Hash,
            _ => MirrorKind::Other,
        };
        let mut fields = Fields::new();
        for _ in 0..count {
            let field = d.bytes()?;
            let value = d.bytes()?;
            let expire_at_ms = d.opt_i64()?;
            fields.insert(
                field,
                FieldValue {
                    value,
                    expire_at_ms,
                },
            );
        }
        d.end()?;
        Ok(MirrorValue {
            kind,
            expire_at_ms,
            generation,
            refreshed_through,
            fields,
        })
    }
}

/// Mirror entries by database and key (`None`: the key does not exist), as a batch of the
/// command stream changed them.
pub type MirrorEntries = hashbrown::HashMap<(u32, Bytes), Option<MirrorValue>, ahash::RandomState>;

/// A mirror key borrowed, to look up maps keyed by `(u32, Bytes)` without building (and
/// reference-counting) an owned key per lookup: it hashes and compares exactly as the owned key
/// does (`(db, key)` hashes its `u32` then its bytes as a slice; tested below).
#[derive(Debug, Clone, Copy)]
pub struct KeyRef<'a> {
    pub db: u32,
    pub key: &'a [u8],
}

impl Hash for KeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.db.hash(state);
        self.key.hash(state);
    }
}

impl hashbrown::Equivalent<(u32, Bytes)> for KeyRef<'_> {
    fn equivalent(&self, owned: &(u32, Bytes)) -> bool {
        self.db == owned.0 && self.key == owned.1.as_ref()
    }
}

/// The owned key, in an allocation of its own (never a slice of a stream read: see
/// `capture::apply::owned`). Not inline ([`stored_copy`]): a key is sliced into row ids while
/// it stays cached, and its shared header is made once; inline, every key of a large flush
/// took a larger allocation for no measured gain (scripts/bench-flush.sh, session 18).
impl From<&KeyRef<'_>> for (u32, Bytes) {
    fn from(key: &KeyRef<'_>) -> (u32, Bytes) {
        (key.db, Bytes::copy_from_slice(key.key))
    }
}

/// A copy of `bytes` to keep in the mirror: the values a command sets and the names of fields
/// it adds (`capture::apply::owned`). A short one (most values of a row) is held inline in its
/// reference-counted allocation ([`Bytes::from_owner`]): one allocation, as a copy in a vector
/// of its own takes, but a vector's `Bytes` allocates a second, shared header the first time it
/// is cloned, and every value a command sets is cloned into its row image (an allocation and a
/// free per changed column: scripts/bench-instructions.sh).
pub fn stored_copy(bytes: &[u8]) -> Bytes {
    if bytes.is_empty() {
        return Bytes::new();
    }
    if let Some(inline) = Inline::<7>::new(bytes) {
        return Bytes::from_owner(inline);
    }
    if let Some(inline) = Inline::<23>::new(bytes) {
        return Bytes::from_owner(inline);
    }
    if let Some(inline) = Inline::<55>::new(bytes) {
        return Bytes::from_owner(inline);
    }
    Bytes::copy_from_slice(bytes)
}

/// Up to `N` bytes inline. With the owner's header (`bytes` 1.12: a reference count of 8 bytes)
/// and the length, `Inline<7>` fills an allocation of 16 bytes, `Inline<23>` one of 32 and
/// `Inline<55>` one of 64 (a vector's copy of a few bytes takes 8, and 32 more for the shared
/// header once cloned).
struct Inline<const N: usize> {
    len: u8,
    data: [u8; N],
}

impl<const N: usize> Inline<N> {
    /// `bytes` inline, when they fit.
    fn new(bytes: &[u8]) -> Option<Inline<N>> {
        let len = u8::try_from(bytes.len()).ok()?;
        let mut data = [0; N];
        data.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(Inline { len, data })
    }
}

impl<const N: usize> AsRef<[u8]> for Inline<N> {
    fn as_ref(&self) -> &[u8] {
        &self.data[..usize::from(self.len)]
    }
}

/// Adds `entries` to `write` in key order, encoded into two reused buffers (RocksDB copies
/// what it is given): consecutive inserts into the memtable's skiplist then walk mostly the
/// same, cached, nodes (in hash order each one is a cold search).
pub(super) fn put_entries(
    write: &mut rocksdb::WriteBatch,
    (family, fields): (&rocksdb::ColumnFamily, &rocksdb::ColumnFamily),
    entries: &MirrorEntries,
) {
    let mut sorted: Vec<_> = entries.iter().collect();
    sorted.sort_unstable_by_key(|(key, _)| *key);
    let (mut key, mut value) = (Vec::new(), Vec::new());
    for ((db, name), entry) in sorted {
        mirror_key_into(*db, name, &mut key);
        match entry {
            Some(entry) => put_value(
                write,
                (family, fields),
                (*db, name, &key),
                entry,
                &mut value,
            ),
            None => write.delete_cf(family, &key),
        }
    }
}

/// Adds one mirror value to `write`: whole, or as a header and its fields when it is stored by
/// field (`field_store.rs`). `buffer` is reused between calls.
pub(super) fn put_value(
    write: &mut rocksdb::WriteBatch,
    (family, fields): (&rocksdb::ColumnFamily, &rocksdb::ColumnFamily),
    (db, key, mirror_key): (u32, &[u8], &[u8]),
    value: &MirrorValue,
    buffer: &mut Vec<u8>,
) {
    if !value.fields.stored_by_field() {
        value.encode_into(buffer);
        write.put_cf(family, mirror_key, &*buffer);
        return;
    }
    value.encode_header_into(buffer);
    write.put_cf(family, mirror_key, &*buffer);
    match value.fields.window() {
        Some(window) => put_window(write, fields, (db, key), window),
        // A whole hash past the size (not made a window by its batch): written whole.
        None => put_whole(write, fields, (db, key), &value.fields),
    }
}

/// The mirror key of `key` in `db`.
pub(super) fn mirror_key(db: u32, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + key.len());
    mirror_key_into(db, key, &mut out);
    out
}

/// The mirror key of `key` in `db`, into `out` (emptied first).
pub(super) fn mirror_key_into(db: u32, key: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&db.to_be_bytes());
    out.extend_from_slice(key);
}

pub(super) fn split_mirror_key(raw: &[u8]) -> Option<(u32, Bytes)> {
    Some((mirror_key_db(raw)?, Bytes::copy_from_slice(&raw[4..])))
}

/// The database of a mirror key; `None` when it is shorter than its 4-byte prefix.
pub(super) fn mirror_key_db(raw: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(raw.get(..4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_borrowed_key_hashes_and_compares_as_the_owned_key() {
        let state = ahash::RandomState::new();
        for (db, key) in [(0u32, &b"person:1"[..]), (7, b""), (u32::MAX, b"\x00\xff")] {
            let owned = (db, Bytes::copy_from_slice(key));
            let borrowed = KeyRef { db, key };
            assert_eq!(state.hash_one(&owned), state.hash_one(borrowed));
            assert!(hashbrown::Equivalent::equivalent(&borrowed, &owned));
            assert!(!hashbrown::Equivalent::equivalent(
                &KeyRef { db: db ^ 1, key },
                &owned
            ));
            assert_eq!(<(u32, Bytes)>::from(&borrowed), owned);
        }
        let mut entries = MirrorEntries::default();
        entries.insert((3, Bytes::from_static(b"k")), None);
        assert!(entries.contains_key(&KeyRef { db: 3, key: b"k" }));
        assert!(!entries.contains_key(&KeyRef { db: 3, key: b"j" }));
    }

    #[test]
    fn encoding_into_a_reused_buffer_is_the_same_encoding() {
        let mut value = MirrorValue::hash(4);
        value.expire_at_ms = Some(17);
        for i in 0..5 {
            value.fields.insert(
                Bytes::from(format!("f{i}")),
                FieldValue {
                    value: Bytes::from(format!("v{i}")),
                    expire_at_ms: (i % 2 == 0).then_some(i),
                },
            );
        }
        let mut buffer = b"left over from another value".to_vec();
        value.encode_into(&mut buffer);
        assert_eq!(buffer, value.encode());
        assert_eq!(MirrorValue::decode(&buffer).ok(), Some(value));
    }
}
