//! Which keys are watched, and the row a hash maps to.
//!
//! A key is watched when it lies in a mapping's database and starts with the mapping's prefix
//! and separator. The row id is everything after `<prefix><separator>` (so `person2:a:b` has id
//! `a:b`). The row image lists every mapped column in a fixed order, `None` for an absent field;
//! a field mapped onto the key column is left out of the image, since the key decides the id.

use bytes::Bytes;

use crate::buffer::{EncodedRow, Fields, Name};
use crate::config::{InitialLoad, MappingConfig, OnExpire};

#[derive(Debug, Clone)]
pub struct Mapping {
    pub name: Name,
    pub db: u32,
    pub key_prefix: Bytes,
    pub key_column: String,
    /// (hash field, column), in column order, without the key column.
    pub columns: Vec<(Bytes, Name)>,
    pub on_expire: OnExpire,
    pub initial_load: InitialLoad,
    pub backend: String,
    pub table: String,
    /// Columns that must be present, else the change is dead-lettered.
    pub required: Vec<String>,
    pub create_table: bool,
}

impl Mapping {
    pub fn from_config(config: &MappingConfig) -> Mapping {
        let mut columns: Vec<(Bytes, Name)> = config
            .columns
            .iter()
            .filter(|(_, column)| **column != config.key_column)
            .map(|(field, column)| (Bytes::from(field.clone()), Name::from(column.as_str())))
            .collect();
        columns.sort_by(|a, b| a.1.cmp(&b.1));
        Mapping {
            name: Name::from(config.name.as_str()),
            db: config.db,
            key_prefix: Bytes::from(config.key_prefix()),
            key_column: config.key_column.clone(),
            columns,
            on_expire: config.on_expire,
            initial_load: config.initial_load,
            backend: config.backend.clone(),
            table: config.table.clone(),
            required: config.required.clone(),
            create_table: config.create_table,
        }
    }

    /// The row id of a key this mapping watches.
    pub fn row_id(&self, key: &Bytes) -> Bytes {
        key.slice(self.key_prefix.len()..)
    }

    /// The mapped row image of a hash's fields.
    pub fn row_image(&self, fields: &Fields) -> Vec<(Name, Option<Bytes>)> {
        self.columns
            .iter()
            .map(|(field, column)| (column.clone(), fields.get(field).map(|f| f.value.clone())))
            .collect()
    }

    /// The upsert of a hash's row, encoded as the change log holds it ([`EncodedRow`]).
    pub fn encoded_row(&self, fields: &Fields) -> EncodedRow {
        // Room for the names and short values: a longer value grows it.
        let room: usize = self.columns.iter().map(|(_, c)| c.len() + 9 + 16).sum();
        let values = self.columns.iter().map(|(field, column)| {
            let value = fields.get(field).map(|f| &f.value[..]);
            (&**column, value)
        });
        EncodedRow::upsert(values, room + 5)
    }

    /// The values of the mapped columns, in the mapping's column order (cheaper to compare than
    /// a named image: no column names are copied).
    pub fn row_values(&self, fields: &Fields) -> Vec<Option<Bytes>> {
        self.columns
            .iter()
            .map(|(field, _)| fields.get(field).map(|f| f.value.clone()))
            .collect()
    }

    /// Names values given in the mapping's column order (see [`Mapping::row_values`]).
    pub fn named(&self, values: Vec<Option<Bytes>>) -> Vec<(Name, Option<Bytes>)> {
        self.columns
            .iter()
            .zip(values)
            .map(|((_, column), value)| (column.clone(), value))
            .collect()
    }

    /// The hash fields mapped to columns, in column order.
    pub fn mapped_fields(&self) -> impl Iterator<Item = &[u8]> {
        self.columns.iter().map(|(field, _)| &field[..])
    }

    /// Whether a field is mapped to a column (changes of other fields do not touch the row).
    pub fn maps_field(&self, field: &[u8]) -> bool {
        self.column_of(field).is_some()
    }

    /// The position of a field's column in the mapping's column order.
    pub fn column_of(&self, field: &[u8]) -> Option<usize> {
        self.columns.iter().position(|(f, _)| f.as_ref() == field)
    }
}

/// What rows a set of mappings writes, as one fingerprint (hex CRC-64 of a canonical text:
/// name, db, key prefix, table, key column, field-to-column pairs, required columns). A
/// backend's checkpoint row records it: rows written under other mappings are reconciled.
pub fn fingerprint<'m>(mappings: impl IntoIterator<Item = &'m Mapping>) -> String {
    let mut described: Vec<String> = mappings
        .into_iter()
        .map(|m| {
            let columns: Vec<String> = m
                .columns
                .iter()
                .map(|(field, column)| format!("{}={column}", String::from_utf8_lossy(field)))
                .collect();
            format!(
                "{}|{}|{}|{}|{}|{}|{}",
                m.name,
                m.db,
                String::from_utf8_lossy(&m.key_prefix),
                m.table,
                m.key_column,
                columns.join(","),
                m.required.join(",")
            )
        })
        .collect();
    described.sort();
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182);
    format!("{:016x}", crc.checksum(described.join("\n").as_bytes()))
}

/// All mappings, looked up by database and key.
#[derive(Debug, Clone, Default)]
pub struct Mappings {
    /// Shared: a full sync holds the mapping of each key while it changes the state around it
    /// (a clone of its columns per key was measurable in the initial load).
    mappings: Vec<std::sync::Arc<Mapping>>,
}

impl Mappings {
    pub fn new(configs: &[MappingConfig]) -> Mappings {
        Mappings {
            mappings: configs
                .iter()
                .map(|config| std::sync::Arc::new(Mapping::from_config(config)))
                .collect(),
        }
    }

    /// The mapping watching `key` in `db`, if any.
    pub fn watching(&self, db: u32, key: &[u8]) -> Option<&std::sync::Arc<Mapping>> {
        self.mappings.iter().find(|m| {
            m.db == db && key.len() > m.key_prefix.len() && key.starts_with(&m.key_prefix)
        })
    }

    /// Whether any mapping watches database `db`.
    pub fn watches_db(&self, db: u32) -> bool {
        self.mappings.iter().any(|m| m.db == db)
    }

    /// The keys the mirror follows: `db:prefix` of every mapping, one per line, sorted (the
    /// buffer records it; a change means the mirror must be rebuilt).
    pub fn watched_keys(&self) -> String {
        let mut lines: Vec<String> = self
            .mappings
            .iter()
            .map(|m| format!("{}:{}", m.db, String::from_utf8_lossy(&m.key_prefix)))
            .collect();
        lines.sort();
        lines.dedup();
        lines.join("\n")
    }

    pub fn iter(&self) -> impl Iterator<Item = &Mapping> {
        self.mappings.iter().map(|m| &**m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::FieldValue;
    use crate::config::Config;

    #[test]
    fn row_ids_keep_everything_after_the_prefix() {
        let config = Config::parse(
            r#"
[source]
url = "redis://127.0.0.1:6379"
[backends.db]
url = "sqlite://x.db"
[[mappings]]
name = "P"
prefix = "person2"
backend = "db"
table = "person1"
key_column = "id"
[mappings.columns]
first_name = "first"
id = "id"
age = "age"
"#,
            &|_| None,
        )
        .unwrap();
        let mappings = Mappings::new(&config.mappings);
        let m = mappings.watching(0, b"person2:a:b").unwrap();
        assert_eq!(m.row_id(&Bytes::from("person2:a:b")), Bytes::from("a:b"));
        assert!(mappings.watching(1, b"person2:1").is_none());
        assert!(mappings.watching(0, b"person2:").is_none());
        assert!(mappings.watching(0, b"person20:1").is_none());
        let mut fields = Fields::new();
        fields.insert(
            Bytes::from("first_name"),
            FieldValue {
                value: Bytes::from("Ann"),
                expire_at_ms: None,
            },
        );
        fields.insert(
            Bytes::from("id"),
            FieldValue {
                value: Bytes::from("99"),
                expire_at_ms: None,
            },
        );
        assert_eq!(
            m.row_image(&fields),
            vec![
                (Name::from("age"), None),
                (Name::from("first"), Some(Bytes::from("Ann")))
            ]
        );
    }
}
