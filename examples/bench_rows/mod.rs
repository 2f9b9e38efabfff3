//! What the sink benchmarks share: their arguments, the rows they write, the mapping of
//! `wb_bench`, and a batch of upserts as the runner would build it.

use bytes::Bytes;
use writebehind::capture::mapping::{Mapping, Mappings};
use writebehind::config::Config;
use writebehind::position::{ChangeSeq, ReplOffset};
use writebehind::sink::convert::SqlValue;
use writebehind::sink::{RowOp, RowWrite, SinkBatch};

/// One bench row: id, first, last, age.
pub type Row = (String, String, String, i64);

/// `<program> <database-url> [rows]` (200,000 rows by default).
pub fn args(usage: &str) -> Result<(String, usize), Box<dyn std::error::Error>> {
    let url = std::env::args().nth(1).ok_or(usage.to_string())?;
    let rows = std::env::args()
        .nth(2)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(200_000);
    Ok((url, rows))
}

/// The rows every bench writes.
pub fn rows(count: usize) -> Vec<Row> {
    (0..count)
        .map(|i| {
            (
                format!("{i}"),
                format!("first-{i}"),
                format!("last-{}", i % 977),
                (i % 100) as i64,
            )
        })
        .collect()
}

/// The mapping of `wb_bench` (key `id`; `first`, `last`, `age`) on backend `bench` at `url`.
pub fn mappings(url: &str) -> Result<Vec<Mapping>, String> {
    let config = Config::parse(
        &format!(
            "[source]\nurl = \"redis://127.0.0.1:1\"\n[backends.bench]\nurl = \"{url}\"\n[[mappings]]\nname = \"Bench\"\nprefix = \"p\"\nbackend = \"bench\"\ntable = \"wb_bench\"\nkey_column = \"id\"\n[mappings.columns]\nfirst = \"first\"\nlast = \"last\"\nage = \"age\"\n"
        ),
        &|_| None,
    )
    .map_err(|e| e.to_string())?;
    Ok(Mappings::new(&config.mappings).iter().cloned().collect())
}

/// The upsert of one row, as change `seq`.
pub fn upsert(seq: u64, (id, first, last, age): &Row) -> RowWrite {
    RowWrite {
        table: 0,
        seq: ChangeSeq(seq),
        row_id: Bytes::from(id.clone()),
        delete_first: false,
        op: RowOp::Upsert {
            id: SqlValue::Text(id.clone()),
            values: vec![
                SqlValue::Int(*age),
                SqlValue::Text(first.clone()),
                SqlValue::Text(last.clone()),
            ],
        },
    }
}

/// A batch of `writes` ending at change `last_seq`, moving the checkpoint rows `rows`.
pub fn batch(writes: Vec<RowWrite>, last_seq: u64, rows: Vec<String>) -> SinkBatch {
    SinkBatch {
        // Not from a buffer: nothing to wait for before the commit.
        commit_gate: Default::default(),
        writes,
        last_seq: ChangeSeq(last_seq),
        replid: String::new(),
        offset: ReplOffset(0),
        buffer_id: "bench".into(),
        mappings_id: String::new(),
        checkpoint_rows: rows,
        retire_rows: Vec::new(),
    }
}

/// Rows per second the sink of `url` writes `data` at, in batches of `batch_size` upserts,
/// each split into `partitions` shares by `partition_of` as the runner splits them: every share
/// applied at once on its own connection with its own checkpoint row (a transaction each), the
/// next batch after all of them.
pub async fn sink_rate(
    url: &str,
    mappings: &[Mapping],
    data: &[Row],
    batch_size: usize,
    partitions: u32,
) -> Result<f64, Box<dyn std::error::Error>> {
    use writebehind::sink::partition::{partition_of, row_name};
    use writebehind::sink::{BeforeCommit, Destination, Sink};
    let no_hook: BeforeCommit = std::sync::Arc::new(|_| Ok(()));
    let mut sinks = Vec::new();
    for _ in 0..partitions.max(1) {
        sinks.push(Sink::connect("bench", url).await?);
    }
    let schemas = sinks[0].prepare(mappings).await.map_err(|p| {
        p.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let started = std::time::Instant::now();
    let mut seq = 0u64;
    for chunk in data.chunks(batch_size) {
        let mut shares: Vec<Vec<RowWrite>> = vec![Vec::new(); sinks.len()];
        for row in chunk {
            seq += 1;
            shares[partition_of("Bench", row.0.as_bytes(), partitions)].push(upsert(seq, row));
        }
        let applies = sinks
            .iter_mut()
            .zip(shares)
            .enumerate()
            .map(|(index, (sink, writes))| {
                let batch = batch(writes, seq, vec![row_name("bench", index, partitions)]);
                let (schemas, no_hook) = (&schemas, &no_hook);
                async move { sink.apply(schemas, &batch, no_hook).await }
            });
        for rejected in futures_util::future::join_all(applies).await {
            let rejected = rejected?;
            if !rejected.is_empty() {
                return Err(format!("rows refused: {rejected:?}").into());
            }
        }
    }
    Ok(data.len() as f64 / started.elapsed().as_secs_f64())
}
