//! Change-log records (column family `changes`).

use bytes::Bytes;

use super::codec::{DecodeError, Decoder, Encoder};
use crate::position::{ChangeSeq, ReplOffset};

/// A mapping's or a column's name in a change. Shared: a change names its mapping and every
/// column of its row, and a copy of each name per change was 5% of capture's thread.
pub type Name = std::sync::Arc<str>;

/// What a change does to its row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowChange {
    /// The full mapped row image: every mapped column, `None` for an absent field.
    Upsert {
        columns: Vec<(Name, Option<Bytes>)>,
    },
    Delete,
}

/// The `#` op of a write that carried a uuid: after the sink commits the change, `{key}uuid`
/// (in `db`) is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashOp {
    pub op: u8,
    pub uuid: Bytes,
    pub db: u32,
    pub key: Bytes,
}

/// One entry of the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub seq: ChangeSeq,
    /// The seq of the first change of its execution unit.
    pub unit: ChangeSeq,
    /// Whether it is the last change of its unit.
    pub unit_end: bool,
    /// Stream offset after the unit.
    pub offset: ReplOffset,
    pub mapping: Name,
    pub row_id: Bytes,
    pub row: RowChange,
    pub op: Option<HashOp>,
}

impl Change {
    /// A test change: the deletion of row `seq`, a unit of its own, at offset `seq * 10`.
    #[cfg(test)]
    pub(crate) fn deleting(seq: u64) -> Change {
        Change {
            seq: ChangeSeq(seq),
            unit: ChangeSeq(seq),
            unit_end: true,
            offset: ReplOffset(seq * 10),
            mapping: "m".into(),
            row_id: Bytes::from(format!("{seq}")),
            row: RowChange::Delete,
            op: None,
        }
    }

    #[cfg(test)]
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.append_to(&mut out);
        out
    }

    /// Encodes at the end of `out`.
    pub(super) fn append_to(&self, out: &mut Vec<u8>) {
        let mut e = Encoder {
            out: std::mem::take(out),
        };
        e.u64(self.unit.0)
            .u8(u8::from(self.unit_end))
            .u64(self.offset.0)
            .bytes(self.mapping.as_bytes())
            .bytes(&self.row_id);
        match &self.row {
            RowChange::Upsert { columns } => {
                e.u8(1).u32(columns.len() as u32);
                for (column, value) in columns {
                    e.bytes(column.as_bytes()).opt_bytes(value.as_deref());
                }
            }
            RowChange::Delete => {
                e.u8(2);
            }
        }
        match &self.op {
            Some(op) => e.u8(1).u8(op.op).bytes(&op.uuid).u32(op.db).bytes(&op.key),
            None => e.u8(0),
        };
        *out = e.out;
    }

    pub(super) fn decode(seq: ChangeSeq, input: &[u8]) -> Result<Change, DecodeError> {
        let mut d = Decoder::new(input, "change");
        let unit = ChangeSeq(d.u64()?);
        let unit_end = d.u8()? != 0;
        let offset = ReplOffset(d.u64()?);
        let mapping = Name::from(d.string()?);
        let row_id = d.bytes()?;
        let row = match d.u8()? {
            1 => {
                let count = d.u32()?;
                let mut columns = Vec::with_capacity(count.min(1024) as usize);
                for _ in 0..count {
                    columns.push((Name::from(d.string()?), d.opt_bytes()?));
                }
                RowChange::Upsert { columns }
            }
            2 => RowChange::Delete,
            other => return Err(d.error(format!("row change kind {other}"))),
        };
        let op = match d.u8()? {
            0 => None,
            _ => Some(HashOp {
                op: d.u8()?,
                uuid: d.bytes()?,
                db: d.u32()?,
                key: d.bytes()?,
            }),
        };
        d.end()?;
        Ok(Change {
            seq,
            unit,
            unit_end,
            offset,
            mapping,
            row_id,
            row,
            op,
        })
    }
}
