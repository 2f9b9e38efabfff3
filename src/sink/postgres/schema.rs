//! Mapped tables as PostgreSQL declares them (`pg_attribute`, `pg_index`), and the statements a
//! batch runs on each, with every value cast to its column's type (see the module doc of
//! `mod.rs`).

use std::collections::HashMap;

use tokio_postgres::Client;

use super::super::convert::{ColumnType, SqlValue};
use super::super::{ColumnInfo, SchemaProblem, TableSchema};
use super::Param;
use crate::capture::mapping::Mapping;

/// Columns of a table: name, type without modifier, base type name, modifier, nullable, and
/// whether a single-column unique index (or the primary key) covers it alone.
const COLUMNS: &str = "SELECT a.attname::text, format_type(a.atttypid, NULL), t.typname::text, a.atttypmod, NOT a.attnotnull, \
     EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid AND i.indisunique AND i.indnkeyatts = 1 \
             AND i.indkey[0] = a.attnum AND i.indpred IS NULL AND i.indexprs IS NULL) \
     FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
     WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped";

/// `"name"`, with `"` doubled.
pub fn ident(name: &str) -> String {
    super::super::quote(name, '"')
}

/// A table name as configured (`person1` or `sales.person1`), quoted.
pub fn qualified(table: &str) -> String {
    match table.split_once('.') {
        Some((schema, name)) => format!("{}.{}", ident(schema), ident(name)),
        None => ident(table),
    }
}

/// One column as statements write it.
#[derive(Debug, Clone)]
struct Column {
    quoted: String,
    /// The type to cast a text parameter to (`None`: `bytea`, bound as bytes).
    cast: Option<String>,
    /// The scale of a `numeric(p,s)` column: more decimal places would be rounded.
    scale: Option<u32>,
    name: String,
}

/// The statements of one mapped table.
#[derive(Debug, Clone)]
pub struct TableTypes {
    /// The table as configured (what `TableSchema::table` holds).
    pub table: String,
    quoted: String,
    key: Column,
    columns: Vec<Column>,
    /// Whether new rows may be copied straight into it (`copy_allowed`).
    pub direct_copy: bool,
}

impl TableTypes {
    /// The statements of `schema`'s table from its catalog columns `found`; `None` when a
    /// column of the schema is not among them.
    fn of(schema: &TableSchema, found: &Found, direct_copy: bool) -> Option<TableTypes> {
        let column = |name: &str| found.get(name).map(|(_, _, c)| c.clone());
        Some(TableTypes {
            table: schema.table.clone(),
            quoted: qualified(&schema.table),
            key: column(&schema.key_column.name)?,
            columns: schema
                .columns
                .iter()
                .map(|c| column(&c.name))
                .collect::<Option<Vec<_>>>()?,
            direct_copy,
        })
    }

    /// Parameters per row: the key and the mapped columns.
    pub fn width(&self) -> usize {
        self.columns.len() + 1
    }

    fn placeholder(column: &Column, n: usize) -> String {
        match &column.cast {
            Some(cast) => format!("${n}::text::{cast}"),
            None => format!("${n}::bytea"),
        }
    }

    /// `INSERT ... VALUES (...) x rows ON CONFLICT (key) DO UPDATE` of the mapped columns.
    pub fn upsert(&self, rows: usize) -> String {
        let mut names = vec![self.key.quoted.clone()];
        names.extend(self.columns.iter().map(|c| c.quoted.clone()));
        let mut values = Vec::with_capacity(rows);
        let mut n = 0;
        for _ in 0..rows {
            let row: Vec<String> = std::iter::once(&self.key)
                .chain(&self.columns)
                .map(|column| {
                    n += 1;
                    Self::placeholder(column, n)
                })
                .collect();
            values.push(format!("({})", row.join(", ")));
        }
        format!(
            "INSERT INTO {} ({}) VALUES {} {}",
            self.quoted,
            names.join(", "),
            values.join(", "),
            self.on_conflict()
        )
    }

    /// `INSERT ... SELECT ... FROM unnest($1, $2, ...) ON CONFLICT (key) DO UPDATE`: any
    /// number of rows in one statement, one array parameter per column (text, or bytea),
    /// each cast as a single row's parameter is.
    pub fn upsert_unnest(&self, insert_only: bool) -> String {
        let all: Vec<&Column> = std::iter::once(&self.key).chain(&self.columns).collect();
        let names: Vec<&str> = all.iter().map(|c| c.quoted.as_str()).collect();
        let arrays: Vec<String> = all
            .iter()
            .enumerate()
            .map(|(i, c)| match c.cast {
                Some(_) => format!("${}::text[]", i + 1),
                None => format!("${}::bytea[]", i + 1),
            })
            .collect();
        let aliases: Vec<String> = (0..all.len()).map(|i| format!("c{i}")).collect();
        let values: Vec<String> = all
            .iter()
            .enumerate()
            .map(|(i, c)| match &c.cast {
                Some(cast) => format!("c{i}::text::{cast}"),
                None => format!("c{i}"),
            })
            .collect();
        format!(
            "INSERT INTO {} ({}) SELECT {} FROM unnest({}) AS s({}) {}",
            self.quoted,
            names.join(", "),
            values.join(", "),
            arrays.join(", "),
            aliases.join(", "),
            self.on_conflict_unless(insert_only)
        )
    }

    /// The conflict clause, or none for an insert-only statement.
    fn on_conflict_unless(&self, insert_only: bool) -> String {
        match insert_only {
            true => String::new(),
            false => self.on_conflict(),
        }
    }

    /// `ON CONFLICT (key) DO UPDATE SET` the mapped columns (`DO NOTHING` when there are none).
    fn on_conflict(&self) -> String {
        let action = if self.columns.is_empty() {
            "DO NOTHING".to_string()
        } else {
            let updates: Vec<String> = self
                .columns
                .iter()
                .map(|c| format!("{0} = EXCLUDED.{0}", c.quoted))
                .collect();
            format!("DO UPDATE SET {}", updates.join(", "))
        };
        format!("ON CONFLICT ({}) {action}", self.key.quoted)
    }

    /// `DELETE ... WHERE key = ANY($1)`, the keys as a text array.
    pub fn delete_any(&self) -> String {
        let cast = self.key.cast.as_deref().unwrap_or("bytea");
        format!(
            "DELETE FROM {} WHERE {} = ANY($1::text[]::{cast}[])",
            self.quoted, self.key.quoted
        )
    }

    /// `DELETE ... WHERE key = $1`.
    pub fn delete_one(&self) -> String {
        format!(
            "DELETE FROM {} WHERE {} = {}",
            self.quoted,
            self.key.quoted,
            Self::placeholder(&self.key, 1)
        )
    }

    /// Up to `limit` keys (as text) in key order, after `$1` when `after`.
    pub fn ids_after(&self, after: bool, limit: usize) -> String {
        let key = &self.key.quoted;
        let filter = match after {
            true => format!("WHERE {key} > {}", Self::placeholder(&self.key, 1)),
            false => String::new(),
        };
        format!(
            "SELECT {key}::text FROM {} {filter} ORDER BY {key} LIMIT {limit}",
            self.quoted
        )
    }

    /// The parameters of a row: `id`, then `values` (fewer or none for a delete).
    pub fn params(&self, id: &SqlValue, values: &[SqlValue]) -> Vec<Param> {
        std::iter::once((&self.key, id))
            .chain(self.columns.iter().zip(values))
            .map(|(column, value)| Param::of(value, column.cast.is_none()))
            .collect()
    }

    /// The stage's columns for `COPY` (`copy.rs`): `text`, `bytea` for binary columns.
    pub fn stage_columns(&self) -> Vec<String> {
        std::iter::once(&self.key)
            .chain(&self.columns)
            .map(|c| match c.cast {
                Some(_) => format!("{} text", c.quoted),
                None => format!("{} bytea", c.quoted),
            })
            .collect()
    }

    /// Whether column `i` of a row (0: the key) is `bytea`.
    pub fn is_bytea(&self, i: usize) -> bool {
        std::iter::once(&self.key)
            .chain(&self.columns)
            .nth(i)
            .is_some_and(|c| c.cast.is_none())
    }

    /// `COPY` of a row's columns (key first) straight into the table: its input functions
    /// take each value with the column's modifier, as assignment after the statements' casts
    /// does (too long a `varchar(n)` refused, a `numeric(p,s)` rounded: checked first).
    pub fn copy_into(&self) -> String {
        let names: Vec<&str> = std::iter::once(&self.key)
            .chain(&self.columns)
            .map(|c| c.quoted.as_str())
            .collect();
        format!("COPY {} ({}) FROM STDIN", self.quoted, names.join(", "))
    }

    /// The merge of a loaded stage: the same casts as a statement's parameters.
    pub fn merge_from(&self, stage: &str) -> String {
        let names: Vec<&str> = std::iter::once(&self.key)
            .chain(&self.columns)
            .map(|c| c.quoted.as_str())
            .collect();
        let values: Vec<String> = std::iter::once(&self.key)
            .chain(&self.columns)
            .map(|c| match &c.cast {
                Some(cast) => format!("{}::text::{cast}", c.quoted),
                None => c.quoted.clone(),
            })
            .collect();
        format!(
            "INSERT INTO {} ({}) SELECT {} FROM {stage} {}",
            self.quoted,
            names.join(", "),
            values.join(", "),
            self.on_conflict()
        )
    }

    /// Why no statement may write this row, if none may: a number with more decimal places
    /// than its `numeric(p,s)` column holds (the server would round it), or bytes that are not
    /// UTF-8 for a column that is not `bytea`.
    pub fn refusal(&self, id: &SqlValue, values: &[SqlValue]) -> Option<String> {
        std::iter::once((&self.key, id))
            .chain(self.columns.iter().zip(values))
            .find_map(|(column, value)| {
                if let (Some(_), SqlValue::Bytes(bytes)) = (&column.cast, value) {
                    if std::str::from_utf8(bytes).is_err() {
                        return Some(format!(
                            "column `{}`: the value is not UTF-8 text",
                            column.name
                        ));
                    }
                }
                let (Some(scale), SqlValue::Text(text)) = (column.scale, value) else {
                    return None;
                };
                let places = decimal_places(text);
                (places > i64::from(scale)).then(|| {
                    format!(
                        "column `{}`: `{text}` has {places} decimal places, more than its scale {scale} (it would be rounded)",
                        column.name
                    )
                })
            })
    }
}

/// The decimal places a decimal number needs (`1.50` needs 1, `1e-3` needs 3, `120` needs 0).
fn decimal_places(text: &str) -> i64 {
    let body = text.strip_prefix(['+', '-']).unwrap_or(text);
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().unwrap_or(0)),
        None => (body, 0),
    };
    let fraction = mantissa.split_once('.').map_or("", |(_, f)| f);
    let significant = fraction.trim_end_matches('0').len() as i64;
    (significant - exponent).max(0)
}

/// The kind of a column from its base type name and modifier.
fn column_type(typname: &str, typmod: i32) -> (ColumnType, Option<u32>) {
    let modifier = u32::try_from(typmod - 4).ok().filter(|_| typmod >= 4);
    match typname {
        "int2" | "int4" | "int8" => (ColumnType::Integer { unsigned: false }, None),
        "numeric" => (ColumnType::Decimal, modifier.map(|m| m & 0xffff)),
        "float4" | "float8" => (ColumnType::Float, None),
        "date" | "time" | "timetz" | "timestamp" | "timestamptz" => (ColumnType::Temporal, None),
        "varchar" | "bpchar" => (
            ColumnType::Text {
                max_chars: modifier.map(u64::from),
            },
            None,
        ),
        "text" | "name" | "citext" => (ColumnType::Text { max_chars: None }, None),
        "bytea" => (ColumnType::Binary { max_bytes: None }, None),
        _ => (ColumnType::Other, None),
    }
}

type Found = HashMap<String, (ColumnInfo, bool, Column)>;

/// Whether `COPY` may write new rows straight into `table` as an `INSERT` would: a plain or
/// partitioned table without rules (`COPY` ignores rules) and without row-level security
/// (PostgreSQL refuses `COPY FROM` where it applies). Otherwise its new rows go as statements.
async fn copy_allowed(client: &Client, table: &str) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT c.relkind IN ('r', 'p') AND NOT c.relhasrules AND NOT c.relrowsecurity \
             FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&qualified(table)],
        )
        .await?;
    match row {
        Some(row) => row.try_get(0),
        None => Ok(false),
    }
}

/// Reads one table's columns (empty: no such table) and whether `COPY` may write its new rows
/// (`copy_allowed`).
async fn read_table(client: &Client, table: &str) -> Result<(Found, bool), tokio_postgres::Error> {
    let rows = client.query(COLUMNS, &[&qualified(table)]).await?;
    let mut found = HashMap::new();
    for row in rows {
        let name: String = row.try_get(0)?;
        let cast: String = row.try_get(1)?;
        let typname: String = row.try_get(2)?;
        let typmod: i32 = row.try_get(3)?;
        let (kind, scale) = column_type(&typname, typmod);
        let column = Column {
            quoted: ident(&name),
            cast: (typname != "bytea").then_some(cast),
            scale,
            name: name.clone(),
        };
        let info = ColumnInfo {
            name: name.clone(),
            kind,
            nullable: row.try_get(4)?,
        };
        found.insert(name, (info, row.try_get(5)?, column));
    }
    Ok((found, copy_allowed(client, table).await?))
}

/// `CREATE TABLE IF NOT EXISTS` with the key column as a `TEXT` primary key and every mapped
/// column as `TEXT` (`create_table = true`).
async fn create_table(client: &Client, mapping: &Mapping) -> Result<(), tokio_postgres::Error> {
    // Only when missing: CREATE TABLE IF NOT EXISTS needs the CREATE privilege even then.
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&qualified(&mapping.table)],
        )
        .await?
        .try_get(0)?;
    if exists {
        return Ok(());
    }
    let mut columns = vec![format!(
        "{} TEXT NOT NULL PRIMARY KEY",
        ident(&mapping.key_column)
    )];
    columns.extend(
        mapping
            .columns
            .iter()
            .map(|(_, column)| format!("{} TEXT", ident(column))),
    );
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} ({})",
            qualified(&mapping.table),
            columns.join(", ")
        ))
        .await
}

/// The privileges a batch needs on a mapped table that the connecting user lacks.
async fn missing_grants(client: &Client, mapping: &Mapping) -> Vec<SchemaProblem> {
    let mut problems = Vec::new();
    for privilege in ["SELECT", "INSERT", "UPDATE", "DELETE"] {
        let granted = client
            .query_one(
                "SELECT has_table_privilege($1, $2)",
                &[&qualified(&mapping.table), &privilege],
            )
            .await
            .and_then(|row| row.try_get::<_, bool>(0));
        match granted {
            Ok(true) => {}
            Ok(false) => problems.push(SchemaProblem::MissingGrant {
                mapping: mapping.name.to_string(),
                table: mapping.table.clone(),
                privilege: privilege.to_string(),
                message: format!("permission denied for table {}", mapping.table),
            }),
            Err(e) => problems.push(SchemaProblem::Unreadable {
                mapping: mapping.name.to_string(),
                table: mapping.table.clone(),
                message: super::message(&e),
            }),
        }
    }
    problems
}

/// The statements of tables another connection prepared (`schemas`, in their order): a
/// partition's sink is given the schemas its first sink read (`runner.rs`).
pub async fn types_of(client: &Client, schemas: &[TableSchema]) -> Result<Vec<TableTypes>, String> {
    let mut types = Vec::with_capacity(schemas.len());
    for schema in schemas {
        let (found, direct_copy) = read_table(client, &schema.table).await.map_err(|e| {
            format!(
                "cannot read table `{}`: {}",
                schema.table,
                super::message(&e)
            )
        })?;
        let table = TableTypes::of(schema, &found, direct_copy).ok_or_else(|| {
            format!(
                "table `{}` no longer has the columns it was prepared with",
                schema.table
            )
        })?;
        types.push(table);
    }
    Ok(types)
}

/// Every mapped table's schema and statements; every problem found.
pub async fn read_all(
    client: &Client,
    backend: &str,
    mappings: &[Mapping],
) -> Result<(Vec<TableSchema>, Vec<TableTypes>), Vec<SchemaProblem>> {
    let mut problems = Vec::new();
    let (mut schemas, mut types) = (Vec::new(), Vec::new());
    for mapping in mappings {
        if mapping.create_table {
            if let Err(e) = create_table(client, mapping).await {
                problems.push(SchemaProblem::CannotCreate {
                    mapping: mapping.name.to_string(),
                    table: mapping.table.clone(),
                    message: super::message(&e),
                });
                continue;
            }
        }
        let (found, direct_copy) = match read_table(client, &mapping.table).await {
            Ok(read) => read,
            Err(e) => {
                problems.push(SchemaProblem::Unreadable {
                    mapping: mapping.name.to_string(),
                    table: mapping.table.clone(),
                    message: super::message(&e),
                });
                continue;
            }
        };
        if found.is_empty() {
            problems.push(SchemaProblem::MissingTable {
                mapping: mapping.name.to_string(),
                table: mapping.table.clone(),
                place: format!("backend `{backend}`"),
            });
            continue;
        }
        let infos: HashMap<String, (ColumnInfo, bool)> = found
            .iter()
            .map(|(name, (info, unique, _))| (name.clone(), (info.clone(), *unique)))
            .collect();
        match TableSchema::build(mapping, &infos) {
            Ok(schema) => {
                problems.extend(missing_grants(client, mapping).await);
                let Some(table) = TableTypes::of(&schema, &found, direct_copy) else {
                    continue;
                };
                types.push(table);
                schemas.push(schema);
            }
            Err(mut p) => problems.append(&mut p),
        }
    }
    if problems.is_empty() {
        Ok((schemas, types))
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_places_count_what_rounding_would_drop() {
        for (text, places) in [
            ("1.50", 1),
            ("-12.345", 3),
            ("120", 0),
            ("1e-3", 3),
            ("1.5E2", 0),
            ("0.000", 0),
        ] {
            assert_eq!(decimal_places(text), places, "{text}");
        }
    }

    #[test]
    fn names_are_quoted_and_schemas_kept_apart() {
        assert_eq!(qualified("person1"), "\"person1\"");
        assert_eq!(qualified("sales.person1"), "\"sales\".\"person1\"");
        assert_eq!(qualified("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn types_come_from_the_catalog() {
        assert_eq!(
            column_type("varchar", 14),
            (
                ColumnType::Text {
                    max_chars: Some(10)
                },
                None
            )
        );
        assert_eq!(column_type("numeric", (5 << 16 | 2) + 4).1, Some(2));
        assert_eq!(column_type("numeric", -1).1, None);
        assert_eq!(
            column_type("int4", -1).0,
            ColumnType::Integer { unsigned: false }
        );
        assert_eq!(column_type("uuid", -1).0, ColumnType::Other);
    }
}
