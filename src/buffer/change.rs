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

/// An upsert's row encoded as the change log holds it (what follows a change's row id, before
/// its op), made where the command is applied: its column names and values are copied there
/// once, rather than shared into a vector (two reference counts per column, taken and dropped)
/// and encoded from it at commit (about a tenth of capture's thread, scripts/bench-instructions.sh).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRow(Vec<u8>);

impl EncodedRow {
    /// The upsert of `columns` (name, value; `None`: an absent field), in column order, with
    /// room for `capacity` bytes first.
    pub fn upsert<'a>(
        columns: impl ExactSizeIterator<Item = (&'a str, Option<&'a [u8]>)>,
        capacity: usize,
    ) -> EncodedRow {
        let mut e = Encoder {
            out: Vec::with_capacity(capacity),
        };
        append_upsert(&mut e, columns);
        EncodedRow(e.out)
    }

    /// The row change it encodes.
    pub fn decode(&self) -> Result<RowChange, DecodeError> {
        let mut d = Decoder::new(&self.0, "encoded row");
        let row = decode_row(&mut d)?;
        d.end()?;
        Ok(row)
    }
}

/// An upsert's row: its kind, its column count, then each column's name and value.
fn append_upsert<'a>(
    e: &mut Encoder,
    columns: impl ExactSizeIterator<Item = (&'a str, Option<&'a [u8]>)>,
) {
    e.u8(1).u32(columns.len() as u32);
    for (column, value) in columns {
        e.bytes(column.as_bytes()).opt_bytes(value);
    }
}

fn decode_row(d: &mut Decoder) -> Result<RowChange, DecodeError> {
    match d.u8()? {
        1 => {
            let count = d.u32()?;
            let mut columns = Vec::with_capacity(count.min(1024) as usize);
            for _ in 0..count {
                columns.push((Name::from(d.string()?), d.opt_bytes()?));
            }
            Ok(RowChange::Upsert { columns })
        }
        2 => Ok(RowChange::Delete),
        other => Err(d.error(format!("row change kind {other}"))),
    }
}

/// A change's row as it is encoded: a value, or encoded already.
#[derive(Debug, Clone, Copy)]
pub enum RowRef<'a> {
    Change(&'a RowChange),
    Encoded(&'a EncodedRow),
}

/// What one change encodes ([`ChangeParts::append_to`]), borrowed: of a [`Change`], or of a
/// row event capture numbers (whose row may be encoded already).
#[derive(Debug, Clone, Copy)]
pub struct ChangeParts<'a> {
    pub seq: ChangeSeq,
    pub unit: ChangeSeq,
    pub unit_end: bool,
    pub offset: ReplOffset,
    pub mapping: &'a str,
    pub row_id: &'a [u8],
    pub row: RowRef<'a>,
    pub op: Option<&'a HashOp>,
}

impl ChangeParts<'_> {
    /// Encodes at the end of `out`.
    pub(super) fn append_to(&self, out: &mut Vec<u8>) {
        let mut e = Encoder {
            out: std::mem::take(out),
        };
        e.u64(self.unit.0)
            .u8(u8::from(self.unit_end))
            .u64(self.offset.0)
            .bytes(self.mapping.as_bytes())
            .bytes(self.row_id);
        match self.row {
            RowRef::Change(RowChange::Upsert { columns }) => {
                append_upsert(&mut e, columns.iter().map(|(c, v)| (&**c, v.as_deref())))
            }
            RowRef::Change(RowChange::Delete) => {
                e.u8(2);
            }
            RowRef::Encoded(encoded) => {
                e.raw(&encoded.0);
            }
        }
        match self.op {
            Some(op) => e.u8(1).u8(op.op).bytes(&op.uuid).u32(op.db).bytes(&op.key),
            None => e.u8(0),
        };
        *out = e.out;
    }
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
        self.parts().append_to(&mut out);
        out
    }

    /// What it encodes.
    pub fn parts(&self) -> ChangeParts<'_> {
        ChangeParts {
            seq: self.seq,
            unit: self.unit,
            unit_end: self.unit_end,
            offset: self.offset,
            mapping: &self.mapping,
            row_id: &self.row_id,
            row: RowRef::Change(&self.row),
            op: self.op.as_ref(),
        }
    }

    pub(super) fn decode(seq: ChangeSeq, input: &[u8]) -> Result<Change, DecodeError> {
        let mut d = Decoder::new(input, "change");
        let unit = ChangeSeq(d.u64()?);
        let unit_end = d.u8()? != 0;
        let offset = ReplOffset(d.u64()?);
        let mapping = Name::from(d.string()?);
        let row_id = d.bytes()?;
        let row = decode_row(&mut d)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A change whose row was encoded where it was made is stored byte for byte as the same
    /// change with its row as a value, so sinks read the same whatever path numbered it.
    #[test]
    fn an_encoded_row_is_stored_as_the_row_it_encodes() {
        let columns: Vec<(Name, Option<Bytes>)> = vec![
            ("age".into(), Some(Bytes::from_static(b"42"))),
            ("empty".into(), Some(Bytes::new())),
            ("first".into(), None),
            ("notes".into(), Some(Bytes::from(vec![0xffu8; 300]))),
        ];
        let row = RowChange::Upsert {
            columns: columns.clone(),
        };
        let op = HashOp {
            op: b'=',
            uuid: Bytes::from_static(b"u-1"),
            db: 3,
            key: Bytes::from_static(b"person:1"),
        };
        let change = Change {
            seq: ChangeSeq(7),
            unit: ChangeSeq(6),
            unit_end: true,
            offset: ReplOffset(70),
            mapping: "Persons".into(),
            row_id: Bytes::from_static(b"1"),
            row,
            op: Some(op),
        };
        let encoded = EncodedRow::upsert(
            columns.iter().map(|(c, v)| (&**c, v.as_deref())),
            // Too little room: it grows.
            4,
        );
        assert_eq!(encoded.decode(), Ok(change.row.clone()));
        let mut parts = change.parts();
        parts.row = RowRef::Encoded(&encoded);
        let mut out = Vec::new();
        parts.append_to(&mut out);
        assert_eq!(out, change.encode());
        assert_eq!(Change::decode(ChangeSeq(7), &out), Ok(change));
    }

    /// An encoding that is not a row is an error naming what it saw, never a panic.
    #[test]
    fn a_damaged_encoded_row_is_an_error() {
        let encoded = EncodedRow::upsert(std::iter::once(("c", Some(&b"v"[..]))), 0);
        for cut in 0..encoded.0.len() {
            assert!(EncodedRow(encoded.0[..cut].to_vec()).decode().is_err());
        }
        let error = EncodedRow(vec![9]).decode().unwrap_err();
        assert!(error.message.contains("row change kind 9"), "{error}");
    }
}
