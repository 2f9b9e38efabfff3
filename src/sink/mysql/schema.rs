//! MySQL/MariaDB DDL and grants: the tables `create_table` makes, the checkpoint table's later
//! columns, and the privileges `check` probes without touching rows.

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::q;
use crate::capture::mapping::Mapping;
use crate::sink::{SchemaProblem, TableSchema, CHECKPOINT_TABLE};

/// `CREATE TABLE IF NOT EXISTS` with the key column as a `VARCHAR(255)` primary key and every
/// mapped column as `TEXT` (`create_table = true`).
pub(super) async fn create_table(
    conn: &mut Conn,
    mapping: &Mapping,
) -> Result<(), mysql_async::Error> {
    let mut columns = vec![format!(
        "{} VARCHAR(255) NOT NULL PRIMARY KEY",
        q(&mapping.key_column)
    )];
    columns.extend(
        mapping
            .columns
            .iter()
            .map(|(_, c)| format!("{} TEXT", q(c))),
    );
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {} ({}) ENGINE=InnoDB",
        q(&mapping.table),
        columns.join(", ")
    );
    conn.query_drop(sql).await
}

/// Grants, probed with statements that touch no row but are refused all the same without the
/// privilege (error 1142).
pub(super) async fn missing_grants(
    conn: &mut Conn,
    mapping: &Mapping,
    schema: &TableSchema,
) -> Vec<SchemaProblem> {
    let (table, key) = (q(&schema.table), q(&schema.key_column.name));
    let mut columns = vec![key.clone()];
    columns.extend(schema.columns.iter().map(|c| q(&c.name)));
    let columns = columns.join(", ");
    let mut problems = Vec::new();
    for (privilege, sql) in [
        (
            "SELECT and INSERT",
            format!("INSERT INTO {table} ({columns}) SELECT {columns} FROM {table} WHERE 1 = 0"),
        ),
        (
            "UPDATE",
            format!("UPDATE {table} SET {key} = {key} WHERE 1 = 0"),
        ),
        ("DELETE", format!("DELETE FROM {table} WHERE 1 = 0")),
    ] {
        if let Err(mysql_async::Error::Server(e)) = conn.query_drop(sql).await {
            if matches!(e.code, 1142 | 1143) {
                problems.push(SchemaProblem::MissingGrant {
                    mapping: mapping.name.to_string(),
                    table: schema.table.clone(),
                    privilege: privilege.to_string(),
                    message: e.message,
                });
            }
        }
    }
    problems
}

/// Checkpoint tables of earlier versions lack the identity columns: added when missing.
pub(super) async fn add_identity_columns(conn: &mut Conn) -> Result<(), mysql_async::Error> {
    let existing: Vec<String> = conn
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
            (CHECKPOINT_TABLE,),
        )
        .await?;
    for column in ["buffer_id", "mappings_id"] {
        if !existing.iter().any(|c| c == column) {
            conn.query_drop(format!(
                "ALTER TABLE {CHECKPOINT_TABLE} ADD COLUMN {column} VARCHAR(64)"
            ))
            .await?;
        }
    }
    Ok(())
}
