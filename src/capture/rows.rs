//! Row events: what a change of a watched key does to its row.

use bytes::Bytes;

use super::mapping::Mapping;
use crate::buffer::{
    EncodedRow, FieldValue, Fields, HashOp, MirrorKind, MirrorValue, Name, RowChange, RowRef,
};
use crate::config::OnExpire;
use crate::replication::rdb::{DumpedValue, ValueKind};

/// A row change derived from a command, before it gets its place in the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowEvent {
    pub mapping: Name,
    pub row_id: Bytes,
    pub row: EventRow,
    /// The `#` op (with its uuid) to acknowledge once the database has this change.
    pub op: Option<HashOp>,
}

/// A row event's row: a value, or (the upsert of a command, the common case) encoded as the
/// change log holds it ([`EncodedRow`]). Equal by what they say, whatever the form.
#[derive(Debug, Clone)]
pub enum EventRow {
    Change(RowChange),
    Encoded(EncodedRow),
}

impl EventRow {
    /// Whether it deletes the row.
    pub fn is_delete(&self) -> bool {
        matches!(self, EventRow::Change(RowChange::Delete))
    }

    /// What the change log encodes.
    pub fn as_ref(&self) -> RowRef<'_> {
        match self {
            EventRow::Change(row) => RowRef::Change(row),
            EventRow::Encoded(row) => RowRef::Encoded(row),
        }
    }

    /// The row change it says (`None`: an encoding that does not decode, never made here).
    pub fn decoded(&self) -> Option<RowChange> {
        match self {
            EventRow::Change(row) => Some(row.clone()),
            EventRow::Encoded(row) => row.decode().ok(),
        }
    }
}

impl From<RowChange> for EventRow {
    fn from(row: RowChange) -> EventRow {
        EventRow::Change(row)
    }
}

impl PartialEq for EventRow {
    fn eq(&self, other: &EventRow) -> bool {
        match (self, other) {
            (EventRow::Change(a), EventRow::Change(b)) => a == b,
            (EventRow::Encoded(a), EventRow::Encoded(b)) => a == b,
            _ => match (self.decoded(), other.decoded()) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            },
        }
    }
}

impl Eq for EventRow {}

impl PartialEq<RowChange> for EventRow {
    fn eq(&self, other: &RowChange) -> bool {
        self.decoded().as_ref() == Some(other)
    }
}

/// The values of a row's mapped columns, in the mapping's column order (`None`: no row).
pub type RowImage = Option<Vec<Option<Bytes>>>;

/// The row a state of a watched key has.
pub fn row_of(mapping: &Mapping, value: &Option<MirrorValue>) -> RowImage {
    match value {
        Some(v) if has_row(value) => Some(mapping.row_values(&v.fields)),
        _ => None,
    }
}

/// Whether a state of a watched key has a row: a hash with at least one field.
pub fn has_row(value: &Option<MirrorValue>) -> bool {
    matches!(value, Some(v) if v.kind == MirrorKind::Hash && !v.fields.is_empty())
}

/// The row event between two states of a watched key.
pub fn row_event(
    mapping: &Mapping,
    key: &Bytes,
    before: &Option<MirrorValue>,
    after: &Option<MirrorValue>,
    expired: bool,
) -> Option<RowEvent> {
    // A row that goes is deleted whatever it held: its values are not read (of a large hash,
    // only the fields loaded are known).
    let old = match after {
        None => has_row(before).then(Vec::new),
        Some(_) => row_of(mapping, before),
    };
    row_event_between(mapping, key, old, row_of(mapping, after), expired)
}

/// The row event of a hash whose row was created or whose mapped values changed: its full
/// image, encoded in one pass (no intermediate [`RowImage`] to compare).
pub fn upsert(mapping: &Mapping, key: &Bytes, fields: &Fields) -> RowEvent {
    RowEvent {
        mapping: mapping.name.clone(),
        row_id: mapping.row_id(key),
        row: EventRow::Encoded(mapping.encoded_row(fields)),
        op: None,
    }
}

/// The row event between two rows of a watched key (see [`row_of`]).
pub fn row_event_between(
    mapping: &Mapping,
    key: &Bytes,
    old: RowImage,
    new: RowImage,
    expired: bool,
) -> Option<RowEvent> {
    let row = match (old, new) {
        (old, Some(new)) if old.as_ref() != Some(&new) => RowChange::Upsert {
            columns: mapping.named(new),
        },
        (Some(_), None) if expired && mapping.on_expire == OnExpire::Keep => return None,
        (Some(_), None) => RowChange::Delete,
        _ => return None,
    };
    Some(RowEvent {
        mapping: mapping.name.clone(),
        row_id: mapping.row_id(key),
        row: row.into(),
        op: None,
    })
}

/// The mirror value of a decoded DUMP payload (`None` for an empty hash, which Redis would not
/// keep).
pub fn mirror_value_from_dump(
    decoded: DumpedValue,
    generation: u64,
    expire_at_ms: Option<i64>,
) -> Option<MirrorValue> {
    if decoded.kind != ValueKind::Hash {
        return Some(MirrorValue {
            expire_at_ms,
            ..MirrorValue::other(generation)
        });
    }
    if decoded.empty {
        return None;
    }
    let mut value = MirrorValue {
        expire_at_ms,
        ..MirrorValue::hash(generation)
    };
    for f in decoded.fields {
        // Owned copies: the decoded fields are slices of the reply (see `apply::owned`).
        value.fields.insert(
            super::apply::owned(&f.field),
            FieldValue {
                value: super::apply::owned(&f.value),
                expire_at_ms: f.expire_at_ms,
            },
        );
    }
    Some(value)
}
