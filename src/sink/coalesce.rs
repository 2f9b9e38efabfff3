//! From changes to row writes: the changes of one batch are reduced to each row's final state
//! (keeping a delete that precedes the final upsert, see [`super::Destination`]) and converted
//! by column type. A row whose values cannot be written is refused here, with its reason, the
//! same way for every backend.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use bytes::Bytes;

use super::convert::{convert, Refusal, SqlValue};
use super::{RowOp, RowWrite, TableSchema};
use crate::buffer::{Change, Name, RowChange};
use crate::capture::mapping::Mapping;
use crate::position::ChangeSeq;

/// A row refused before it reached the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRow {
    /// The seq of the last change coalesced into the row.
    pub seq: ChangeSeq,
    pub mapping: String,
    pub row_id: Bytes,
    pub reason: String,
}

/// The writes of a batch and the rows refused on the way.
#[derive(Debug, Default)]
pub struct Coalesced {
    pub writes: Vec<RowWrite>,
    pub refused: Vec<RefusedRow>,
}

/// Coalesces `changes` per row and converts them for `schemas` (one per mapping, same order);
/// changes of other mappings are skipped.
pub fn coalesce(mappings: &[Mapping], schemas: &[TableSchema], changes: &[Change]) -> Coalesced {
    // Each row's last change, in the order rows first appear, and whether a delete of the row
    // came before it; found by (table, row id) with one hash per change.
    let mut rows: Vec<(usize, &Change, bool)> = Vec::with_capacity(changes.len());
    let mut found: HashMap<(usize, &[u8]), usize, ahash::RandomState> =
        HashMap::with_capacity_and_hasher(changes.len(), ahash::RandomState::default());
    for change in changes {
        let Some(table) = mappings.iter().position(|m| m.name == change.mapping) else {
            continue;
        };
        match found.entry((table, &change.row_id[..])) {
            Entry::Occupied(at) => {
                let (_, last, deleted) = &mut rows[*at.get()];
                *deleted |= matches!(last.row, RowChange::Delete);
                *last = change;
            }
            Entry::Vacant(at) => {
                at.insert(rows.len());
                rows.push((table, change, false));
            }
        }
    }
    drop(found);
    let mut out = Coalesced {
        writes: Vec::with_capacity(rows.len()),
        refused: Vec::new(),
    };
    for (table, change, deleted) in rows {
        let row_id = change.row_id.clone();
        let (Some(schema), Some(mapping)) = (schemas.get(table), mappings.get(table)) else {
            continue;
        };
        let refuse = |reason: String| RefusedRow {
            seq: change.seq,
            mapping: mapping.name.to_string(),
            row_id: row_id.clone(),
            reason,
        };
        let key_column = &schema.key_column;
        let id = match convert(&key_column.kind, &key_column.name, Some(&row_id)) {
            Ok(id) => id,
            Err(reason) => {
                out.refused.push(refuse(format!("key {reason}")));
                continue;
            }
        };
        let op = match &change.row {
            RowChange::Delete => RowOp::Delete { id },
            RowChange::Upsert { columns } => match convert_row(schema, columns) {
                Ok(values) => RowOp::Upsert { id, values },
                Err(reason) => {
                    out.refused.push(refuse(reason.0));
                    continue;
                }
            },
        };
        out.writes.push(RowWrite {
            table,
            seq: change.seq,
            row_id,
            delete_first: deleted && matches!(op, RowOp::Upsert { .. }),
            op,
        });
    }
    out
}

/// Converts a row image to the schema's columns, checking required ones.
pub fn convert_row(
    schema: &TableSchema,
    columns: &[(Name, Option<Bytes>)],
) -> Result<Vec<SqlValue>, Refusal> {
    schema
        .columns
        .iter()
        .map(|column| {
            let value = columns
                .iter()
                .find(|(name, _)| **name == *column.name)
                .and_then(|(_, v)| v.as_deref());
            if value.is_none() && schema.required.contains(&column.name) {
                return Err(Refusal(format!(
                    "required column `{}` is absent",
                    column.name
                )));
            }
            convert(&column.kind, &column.name, value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::ReplOffset;
    use crate::sink::convert::ColumnType;
    use crate::sink::ColumnInfo;

    fn mapping() -> Mapping {
        let text = "[source]\nurl = \"redis://127.0.0.1:1\"\n[backends.db]\nurl = \"sqlite://unused\"\n[[mappings]]\nname = \"P\"\nprefix = \"p\"\nbackend = \"db\"\ntable = \"t\"\nkey_column = \"id\"\nrequired = [\"n\"]\n[mappings.columns]\nn = \"n\"\n";
        let config = crate::config::Config::parse(text, &|_| None).expect("config");
        Mapping::from_config(&config.mappings[0])
    }

    fn schema() -> TableSchema {
        let column = |name: &str, kind| ColumnInfo {
            name: name.into(),
            kind,
            nullable: true,
        };
        TableSchema {
            table: "t".into(),
            key_column: column("id", ColumnType::Integer { unsigned: false }),
            columns: vec![column("n", ColumnType::Integer { unsigned: false })],
            required: vec!["n".into()],
        }
    }

    fn change(seq: u64, row: &str, n: Option<&str>) -> Change {
        Change {
            seq: ChangeSeq(seq),
            unit: ChangeSeq(seq),
            unit_end: true,
            offset: ReplOffset(seq),
            mapping: "P".into(),
            row_id: Bytes::copy_from_slice(row.as_bytes()),
            row: match n {
                Some(n) => RowChange::Upsert {
                    columns: vec![("n".into(), Some(Bytes::copy_from_slice(n.as_bytes())))],
                },
                None => RowChange::Delete,
            },
            op: None,
        }
    }

    #[test]
    fn a_row_ends_in_its_final_state_with_an_earlier_delete_kept_and_bad_rows_refused() {
        let changes = [
            change(1, "1", Some("5")),
            change(2, "1", None),
            change(3, "1", Some("6")),
            change(4, "2", Some("x")),
            change(5, "y", None),
            change(6, "3", None),
        ];
        let out = coalesce(&[mapping()], &[schema()], &changes);
        let writes: Vec<(u64, bool, RowOp)> = out
            .writes
            .iter()
            .map(|w| (w.seq.0, w.delete_first, w.op.clone()))
            .collect();
        assert_eq!(
            writes,
            vec![
                (
                    3,
                    true,
                    RowOp::Upsert {
                        id: SqlValue::Int(1),
                        values: vec![SqlValue::Int(6)]
                    }
                ),
                (
                    6,
                    false,
                    RowOp::Delete {
                        id: SqlValue::Int(3)
                    }
                ),
            ]
        );
        let refused: Vec<(u64, &str)> = out
            .refused
            .iter()
            .map(|r| (r.seq.0, r.reason.as_str()))
            .collect();
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0].0 == 4 && refused[0].1.contains("`x` is not an integer"));
        assert!(refused[1].0 == 5 && refused[1].1.starts_with("key "));
    }
}
