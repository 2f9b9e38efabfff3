//! Sink benchmark: rows per second written by the MySQL/MariaDB sink at several batch sizes
//! (new rows), updates of every row at 1,000 rows per batch, and new rows at 1,000 rows per
//! batch in 2 and 4 partitions, next to `LOAD DATA LOCAL INFILE` of the
//! same rows into the same table, in the same run; and `LOAD DATA` in 1,000-row transactions,
//! the ceiling of any design that commits each batch.
//! Used by `scripts/bench-sink.sh`; prints one `key=value` line per figure.
//!
//! Usage: `sink_bench <mysql://user@host:port/database> [rows]`

use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use mysql_async::prelude::Queryable;
use writebehind::sink::partition::{partition_of, row_name};
use writebehind::sink::{BeforeCommit, Destination, RowWrite, Sink};

mod bench_rows;

/// The service's allocator (`src/main.rs`), so that the sink runs here as it runs there: with
/// glibc's, a quarter of this client's time went to `malloc` and `free`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const CREATE: &str = "CREATE TABLE wb_bench (id VARCHAR(64) PRIMARY KEY, first VARCHAR(255), last VARCHAR(255), age INT) ENGINE=InnoDB";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let (url, rows) = bench_rows::args("usage: sink_bench <mysql-url> [rows]")?;
    let data = bench_rows::rows(rows);
    let pool = mysql_async::Pool::new(url.as_str());
    let mut conn = pool.get_conn().await?;
    // The database's own fastest path.
    reset(&mut conn).await?;
    let mut tsv = String::with_capacity(rows * 40);
    for (id, first, last, age) in &data {
        tsv.push_str(&format!("{id}\t{first}\t{last}\t{age}\n"));
    }
    let payload = Bytes::from(tsv.clone());
    conn.set_infile_handler(
        async move { Ok(futures_util::stream::iter(vec![Ok(payload)]).boxed()) },
    );
    let started = Instant::now();
    conn.query_drop("LOAD DATA LOCAL INFILE 'rows.tsv' INTO TABLE wb_bench (id, first, last, age)")
        .await?;
    let load_seconds = started.elapsed().as_secs_f64();
    let load_rate = rows as f64 / load_seconds;
    println!("rows={rows}");
    println!("load_data_rows_per_second={load_rate:.0}");
    // The ceiling for a transaction per batch: LOAD DATA of 1,000 rows per transaction.
    reset(&mut conn).await?;
    let lines: Vec<&str> = tsv.lines().collect();
    let started = Instant::now();
    for chunk in lines.chunks(1_000) {
        let mut part = chunk.join("\n");
        part.push('\n');
        let payload = Bytes::from(part);
        conn.set_infile_handler(async move {
            Ok(futures_util::stream::iter(vec![Ok(payload)]).boxed())
        });
        conn.query_drop("START TRANSACTION").await?;
        conn.query_drop(
            "LOAD DATA LOCAL INFILE 'rows.tsv' INTO TABLE wb_bench (id, first, last, age)",
        )
        .await?;
        conn.query_drop("COMMIT").await?;
    }
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    println!("load_data_1000_per_transaction_rows_per_second={rate:.0}");
    println!(
        "load_data_1000_per_transaction_ratio_to_load_data={:.2}",
        rate / load_rate
    );

    let mappings = bench_rows::mappings(&url)?;
    let no_hook: BeforeCommit = std::sync::Arc::new(|_| Ok(()));
    // New rows at each size; the last pass writes the same rows again: every row exists,
    // every write an update.
    for (batch_size, updates) in [
        (100usize, false),
        (1_000, false),
        (5_000, false),
        (1_000, true),
    ] {
        if !updates {
            reset(&mut conn).await?;
        }
        let rate = bench_rows::sink_rate(&url, &mappings, &data, batch_size).await?;
        let name = match updates {
            true => format!("sink_batch_{batch_size}_updates"),
            false => format!("sink_batch_{batch_size}"),
        };
        println!("{name}_rows_per_second={rate:.0}");
        println!("{name}_ratio_to_load_data={:.2}", rate / load_rate);
    }
    // Partitions, as the runner applies them: each batch of 1,000 rows split by
    // `partition_of`, every share applied at once on its own connection with its own
    // checkpoint row, the next batch after all of them.
    for partitions in [2u32, 4] {
        reset(&mut conn).await?;
        let mut sinks = Vec::new();
        for _ in 0..partitions {
            sinks.push(Sink::connect("bench", &url).await?);
        }
        let schemas = sinks[0].prepare(&mappings).await.map_err(|p| {
            p.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let started = Instant::now();
        let mut seq = 0u64;
        for chunk in data.chunks(1_000) {
            let mut shares: Vec<Vec<RowWrite>> = vec![Vec::new(); partitions as usize];
            for row in chunk {
                seq += 1;
                shares[partition_of("Bench", row.0.as_bytes(), partitions)]
                    .push(bench_rows::upsert(seq, row));
            }
            let applies =
                sinks
                    .iter_mut()
                    .zip(shares)
                    .enumerate()
                    .map(|(index, (sink, writes))| {
                        let rows = vec![row_name("bench", index, partitions)];
                        let batch = bench_rows::batch(writes, seq, rows);
                        let (schemas, no_hook) = (&schemas, &no_hook);
                        async move { sink.apply(schemas, &batch, no_hook).await }
                    });
            for rejected in futures_util::future::join_all(applies).await {
                if !rejected?.is_empty() {
                    return Err("rows refused".into());
                }
            }
        }
        let rate = rows as f64 / started.elapsed().as_secs_f64();
        println!("sink_batch_1000_partitions_{partitions}_rows_per_second={rate:.0}");
        println!(
            "sink_batch_1000_partitions_{partitions}_ratio_to_load_data={:.2}",
            rate / load_rate
        );
    }
    conn.query_drop("DROP TABLE IF EXISTS wb_bench").await?;
    Ok(())
}

/// The upsert of one benchmark row (columns in the schema's order: age, first, last).
async fn reset(conn: &mut mysql_async::Conn) -> Result<(), mysql_async::Error> {
    conn.query_drop("DROP TABLE IF EXISTS wb_bench").await?;
    conn.query_drop(CREATE).await?;
    conn.query_drop("DELETE FROM writebehind_checkpoint WHERE backend LIKE 'bench%'")
        .await
        .ok();
    Ok(())
}
