//! Mirror records: a watched key as Redis holds it (column families `mirror` and `raw`).

use std::collections::BTreeMap;

use bytes::Bytes;

use super::codec::{DecodeError, Decoder, Encoder};
use crate::position::ReplOffset;

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
    pub fields: BTreeMap<Bytes, FieldValue>,
}

impl MirrorValue {
    pub fn hash(generation: u64) -> Self {
        MirrorValue {
            kind: MirrorKind::Hash,
            expire_at_ms: None,
            generation,
            refreshed_through: ReplOffset(0),
            fields: BTreeMap::new(),
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
        let mut e = Encoder::default();
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
        e.finish()
    }

    pub(super) fn decode(input: &[u8]) -> Result<MirrorValue, DecodeError> {
        let mut d = Decoder::new(input, "mirror value");
        let kind = match d.u8()? {
            1 => MirrorKind::Hash,
            2 => MirrorKind::Other,
            other => return Err(d.error(format!("kind {other}"))),
        };
        let expire_at_ms = d.opt_i64()?;
        let generation = d.u64()?;
        let refreshed_through = ReplOffset(d.u64()?);
        let count = d.u32()?;
        let mut fields = BTreeMap::new();
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

/// The mirror key of `key` in `db`.
pub(super) fn mirror_key(db: u32, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + key.len());
    out.extend_from_slice(&db.to_be_bytes());
    out.extend_from_slice(key);
    out
}

pub(super) fn split_mirror_key(raw: &[u8]) -> Option<(u32, Bytes)> {
    let db = u32::from_be_bytes(raw.get(..4)?.try_into().ok()?);
    Some((db, Bytes::copy_from_slice(&raw[4..])))
}
