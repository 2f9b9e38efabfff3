//! Batches through `COPY` (text format), two ways:
//!
//! - **New rows straight into the table**: an insert-only attempt (`grouped.rs`) copies a
//!   table's upserts into the table itself from [`DIRECT_COPY_MIN`] rows on. The column's input
//!   functions take each value with its modifier, which is what assignment does after a
//!   statement's `::text::<type>` cast: a too-long `varchar(n)` or `char(n)` is refused either
//!   way, a `numeric(p,s)` rounded either way (so the scale is checked before either runs), an
//!   invalid value refused with the same SQLSTATE. A key that exists fails the copy with
//!   `23505`, exactly like the insert it replaces; triggers fire as for an insert.
//! - **Upserts, staged**: from [`COPY_THRESHOLD`] upserts into one table on (below, one
//!   statement of column arrays measured faster: docs/benchmarks.md), the rows are copied into
//!   a temporary table of text columns and merged with one `INSERT ... SELECT ... ON CONFLICT
//!   (key) DO UPDATE`, inside the batch's transaction. The stage's columns are `text` (`bytea`
//!   for binary columns), so the copy converts nothing, and the merge casts each column with
//!   the same `::text::<type>` as a statement's parameter (`schema.rs`).
//!
//! A value either refuses rolls the batch back, and the row-by-row replay refuses that row
//! alone, with the same reason a single-row batch gives.
//!
//! The stage (`writebehind_stage_<n>`, `ON COMMIT DELETE ROWS`) lives as long as the session.

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use tokio_postgres::{Client, Statement, ToStatement};

use super::schema::TableTypes;
use super::Param;
use crate::sink::convert::SqlValue;

/// Upserts into one table from this many rows on go through `COPY`.
pub const COPY_THRESHOLD: usize = 5_000;

/// New rows (an insert-only attempt, `grouped.rs`) are copied straight into their table from
/// this many on; below, one statement of column arrays.
pub const DIRECT_COPY_MIN: usize = 2_000;

/// Bytes of copy data sent per message.
const COPY_CHUNK: usize = 1 << 20;

/// Copies `upserts` into table `index`'s stage (created first unless `staged`: this session
/// has it; emptied first when `in_unit`: a long unit's earlier part may have filled it in the
/// same transaction, and it is emptied only at commit) and merges them.
pub async fn copy_and_merge(
    client: &Client,
    index: usize,
    types: &TableTypes,
    upserts: &[(&SqlValue, &Vec<SqlValue>)],
    (staged, in_unit): (bool, bool),
) -> Result<(), tokio_postgres::Error> {
    let stage = format!("writebehind_stage_{index}");
    if !staged {
        client
            .batch_execute(&format!(
                "CREATE TEMPORARY TABLE IF NOT EXISTS {stage} ({}) ON COMMIT DELETE ROWS",
                types.stage_columns().join(", ")
            ))
            .await?;
    } else if in_unit {
        client
            .batch_execute(&format!("DELETE FROM {stage}"))
            .await?;
    }
    copy_rows(client, &format!("COPY {stage} FROM STDIN"), types, upserts).await?;
    client.batch_execute(&types.merge_from(&stage)).await
}

/// Sends `upserts` with `copy` (a `COPY ... FROM STDIN`) in text format.
pub async fn copy_rows<T: ?Sized + ToStatement>(
    client: &Client,
    copy: &T,
    types: &TableTypes,
    upserts: &[(&SqlValue, &Vec<SqlValue>)],
) -> Result<(), tokio_postgres::Error> {
    let sink = client.copy_in::<_, Bytes>(copy).await?;
    futures_util::pin_mut!(sink);
    // About 64 bytes a row to start with, at most a message's worth.
    let mut data = BytesMut::with_capacity(COPY_CHUNK.min(upserts.len() * 64));
    for (id, values) in upserts {
        for (i, value) in std::iter::once(*id).chain(values.iter()).enumerate() {
            if i > 0 {
                data.put_u8(b'\t');
            }
            copy_field(&mut data, value, types.is_bytea(i));
        }
        data.put_u8(b'\n');
        if data.len() >= COPY_CHUNK {
            sink.send(data.split().freeze()).await?;
        }
    }
    if !data.is_empty() {
        sink.send(data.freeze()).await?;
    }
    sink.as_mut().finish().await?;
    Ok(())
}

/// The prepared `COPY` of new rows into table `index` (`TableTypes::copy_into`), prepared once
/// per session: a `COPY` sent as text is prepared first, a round trip each time.
pub async fn copy_into_statement(
    client: &Client,
    cache: &std::sync::Mutex<std::collections::HashMap<usize, Statement>>,
    index: usize,
    types: &TableTypes,
) -> Result<Statement, tokio_postgres::Error> {
    let cached = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&index)
        .cloned();
    if let Some(statement) = cached {
        return Ok(statement);
    }
    let statement = client.prepare(&types.copy_into()).await?;
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(index, statement.clone());
    Ok(statement)
}

/// One field in `COPY`'s text format: `\N` for NULL; backslash, tab, newline and carriage return
/// escaped; bytes (for `bytea`) as `\\x<hex>`.
fn copy_field(out: &mut BytesMut, value: &SqlValue, bytea: bool) {
    match Param::of(value, bytea) {
        Param::Text(None) | Param::Bytes(None) => out.put_slice(b"\\N"),
        Param::Text(Some(text)) => {
            for byte in text.bytes() {
                match byte {
                    b'\\' => out.put_slice(b"\\\\"),
                    b'\t' => out.put_slice(b"\\t"),
                    b'\n' => out.put_slice(b"\\n"),
                    b'\r' => out.put_slice(b"\\r"),
                    other => out.put_u8(other),
                }
            }
        }
        Param::Bytes(Some(bytes)) => {
            out.put_slice(b"\\\\x");
            for byte in bytes {
                out.put_slice(format!("{byte:02x}").as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_escaped_for_copy_text_format() {
        let mut out = BytesMut::new();
        for (value, bytea) in [
            (SqlValue::Null, false),
            (SqlValue::Text("a\tb\nc\\d\re".into()), false),
            (SqlValue::Int(-7), false),
            (SqlValue::Bytes(vec![0xff, 0x00]), true),
            (SqlValue::Text("a\\b".into()), true),
        ] {
            copy_field(&mut out, &value, bytea);
            out.put_u8(b'|');
        }
        assert_eq!(
            &out[..],
            b"\\N|a\\tb\\nc\\\\d\\re|-7|\\\\xff00|\\\\x615c62|"
        );
    }
}
