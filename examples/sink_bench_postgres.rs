//! Sink benchmark for PostgreSQL: rows per second written by the PostgreSQL sink at 100, 1,000,
//! 5,000 and 20,000 rows per batch into an empty table, then at 1,000 over the same rows again
//! (every write an update), next to `COPY` of the same rows into the same table, in the same
//! run. Used by `scripts/bench-sink-postgres.sh`; prints one `key=value` line per figure.
//!
//! Usage: `sink_bench_postgres <postgres://user@host:port/database> [rows]`

use std::time::Instant;

use bytes::Bytes;
use futures_util::SinkExt;

mod bench_rows;

/// The service's allocator (`src/main.rs`), so that the sink runs here as it runs there: with
/// glibc's, a quarter of this client's time went to `malloc` and `free`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const CREATE: &str = "DROP TABLE IF EXISTS wb_bench; \
    CREATE TABLE wb_bench (id VARCHAR(64) PRIMARY KEY, first VARCHAR(255), last VARCHAR(255), age INTEGER); \
    DELETE FROM writebehind_checkpoint WHERE backend LIKE 'bench%'";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let (url, rows) = bench_rows::args("usage: sink_bench_postgres <postgres-url> [rows]")?;
    let data = bench_rows::rows(rows);
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS writebehind_checkpoint (source VARCHAR(64) NOT NULL, backend VARCHAR(191) NOT NULL, replid CHAR(40), repl_offset BIGINT, change_seq BIGINT NOT NULL, buffer_id VARCHAR(64), mappings_id VARCHAR(64), updated_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (source, backend))")
        .await?;
    // The database's own fastest path.
    client.batch_execute(CREATE).await?;
    let mut tsv = String::with_capacity(rows * 40);
    for (id, first, last, age) in &data {
        tsv.push_str(&format!("{id}\t{first}\t{last}\t{age}\n"));
    }
    let started = Instant::now();
    let sink = client
        .copy_in::<_, Bytes>("COPY wb_bench (id, first, last, age) FROM STDIN")
        .await?;
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from(tsv.clone())).await?;
    sink.as_mut().finish().await?;
    let copy_rate = rows as f64 / started.elapsed().as_secs_f64();
    println!("rows={rows}");
    println!("copy_rows_per_second={copy_rate:.0}");

    // The ceiling for a transaction per batch: COPY of 1,000 rows per transaction.
    client.batch_execute(CREATE).await?;
    let started = Instant::now();
    for chunk in tsv.lines().collect::<Vec<_>>().chunks(1_000) {
        client.batch_execute("BEGIN").await?;
        let sink = client
            .copy_in::<_, Bytes>("COPY wb_bench (id, first, last, age) FROM STDIN")
            .await?;
        futures_util::pin_mut!(sink);
        let mut data = chunk.join("\n");
        data.push('\n');
        sink.send(Bytes::from(data)).await?;
        sink.as_mut().finish().await?;
        client.batch_execute("COMMIT").await?;
    }
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    println!("copy_1000_per_transaction_rows_per_second={rate:.0}");
    println!(
        "copy_1000_per_transaction_ratio_to_copy={:.2}",
        rate / copy_rate
    );

    // Plain text, as the reference's connection: a server with `ssl = on` would otherwise be
    // written to over TLS (`sslmode=prefer`, the default).
    let url = format!("{url}?sslmode=disable");
    let mappings = bench_rows::mappings(&url)?;
    // The last pass writes the same rows again: every row exists, every write an update.
    for (batch_size, updates) in [
        (100usize, false),
        (1_000, false),
        (5_000, false),
        (20_000, false),
        (1_000, true),
    ] {
        if !updates {
            client.batch_execute(CREATE).await?;
        }
        let rate = bench_rows::sink_rate(&url, &mappings, &data, batch_size, 1).await?;
        let name = match updates {
            true => format!("sink_batch_{batch_size}_updates"),
            false => format!("sink_batch_{batch_size}"),
        };
        println!("{name}_rows_per_second={rate:.0}");
        println!("{name}_ratio_to_copy={:.2}", rate / copy_rate);
    }
    Ok(())
}
