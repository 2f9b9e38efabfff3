//! Large batches through `COPY`: from [`COPY_THRESHOLD`] upserts into one table on (below, one
//! statement of column arrays measured faster: docs/benchmarks.md), the rows are
//! copied (text format) into a temporary table of text columns and merged with one `INSERT ...
//! SELECT ... ON CONFLICT (key) DO UPDATE`, inside the batch's transaction.
//!
//! Exactly as strict as the statements of small batches: the stage's columns are `text`
//! (`bytea` for binary columns), so the copy converts nothing, and the merge casts each column
//! with the same `::text::<type>` as a statement's parameter (`schema.rs`); the numeric scale is
//! checked before either path runs. A value the merge refuses rolls the batch back, and the
//! row-by-row replay refuses that row alone, with the same reason a single-row batch gives.
//!
//! The stage (`writebehind_stage_<n>`, `ON COMMIT DELETE ROWS`) lives as long as the session.

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use tokio_postgres::Client;

use super::schema::TableTypes;
use super::Param;
use crate::sink::convert::SqlValue;

/// Upserts into one table from this many rows on go through `COPY`.
pub const COPY_THRESHOLD: usize = 5_000;

/// Bytes of copy data sent per message.
const COPY_CHUNK: usize = 1 << 20;

/// Copies `upserts` into table `index`'s stage (created first unless `staged`: this session
/// has it) and merges them (inserts them only, `insert_only`: see `Upserts` in mod.rs).
pub async fn copy_and_merge(
    client: &Client,
    index: usize,
    types: &TableTypes,
    upserts: &[(&SqlValue, &Vec<SqlValue>)],
    staged: bool,
    insert_only: bool,
) -> Result<(), tokio_postgres::Error> {
    let stage = format!("writebehind_stage_{index}");
    if !staged {
        client
            .batch_execute(&format!(
                "CREATE TEMPORARY TABLE IF NOT EXISTS {stage} ({}) ON COMMIT DELETE ROWS",
                types.stage_columns().join(", ")
            ))
            .await?;
    }
    let sink = client
        .copy_in::<_, Bytes>(&format!("COPY {stage} FROM STDIN"))
        .await?;
    futures_util::pin_mut!(sink);
    let mut data = BytesMut::with_capacity(COPY_CHUNK);
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
    client
        .batch_execute(&types.merge_from(&stage, insert_only))
        .await
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
