//! Sink benchmark: rows per second written by the MySQL/MariaDB sink at several batch sizes
//! (new rows), updates of every row at 1,000 rows per batch, and new rows at 1,000 rows per
//! batch in 2 and 4 partitions, next to `LOAD DATA LOCAL INFILE` of the
//! same rows into the same table, in the same run; and `LOAD DATA` in 1,000-row transactions,
//! the ceiling of any design that commits each batch.
//! Used by `scripts/bench-sink.sh`; prints one `key=value` line per figure.
//!
//! With `ROUNDS=n`, it measures instead, `n` times over in turn: one `LOAD DATA`, `LOAD DATA`
//! in 1,000-row transactions, and the sink at 1,000 rows per batch in 1 and 2 partitions, each
//! into an empty table; then the median of each ratio over the rounds. On a machine whose
//! speed moves from minute to minute, a ratio of two figures taken seconds apart is steadier
//! than one of figures a minute apart.
//!
//! Usage: `sink_bench <mysql://user@host:port/database> [rows]`

use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use mysql_async::prelude::Queryable;
use writebehind::capture::mapping::Mapping;

mod bench_rows;

/// The service's allocator (`src/main.rs`), so that the sink runs here as it runs there: with
/// glibc's, a quarter of this client's time went to `malloc` and `free`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const CREATE: &str = "CREATE TABLE wb_bench (id VARCHAR(64) PRIMARY KEY, first VARCHAR(255), last VARCHAR(255), age INT) ENGINE=InnoDB";

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> BenchResult<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> BenchResult<()> {
    let (url, rows) = bench_rows::args("usage: sink_bench <mysql-url> [rows]")?;
    let data = bench_rows::rows(rows);
    let pool = mysql_async::Pool::new(url.as_str());
    let mut conn = pool.get_conn().await?;
    reset(&mut conn).await?;
    let mappings = bench_rows::mappings(&url)?;
    let tsv: Vec<String> = data
        .iter()
        .map(|(id, first, last, age)| format!("{id}\t{first}\t{last}\t{age}\n"))
        .collect();
    let rounds = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok());
    println!("rows={rows}");
    match rounds {
        Some(rounds) if rounds > 0 => {
            in_rounds(&mut conn, &url, &mappings, &data, &tsv, rounds).await?
        }
        _ => once(&mut conn, &url, &mappings, &data, &tsv).await?,
    }
    conn.query_drop("DROP TABLE IF EXISTS wb_bench").await?;
    Ok(())
}

/// Every figure once, one after the other.
async fn once(
    conn: &mut mysql_async::Conn,
    url: &str,
    mappings: &[Mapping],
    data: &[bench_rows::Row],
    tsv: &[String],
) -> BenchResult<()> {
    // The database's own fastest path.
    reset(conn).await?;
    let load_rate = load_data_rate(conn, tsv, tsv.len()).await?;
    println!("load_data_rows_per_second={load_rate:.0}");
    // The ceiling for a transaction per batch: LOAD DATA of 1,000 rows per transaction.
    reset(conn).await?;
    let rate = load_data_rate(conn, tsv, 1_000).await?;
    println!("load_data_1000_per_transaction_rows_per_second={rate:.0}");
    println!(
        "load_data_1000_per_transaction_ratio_to_load_data={:.2}",
        rate / load_rate
    );
    // New rows at each size; the 1,000-row updates pass writes the same rows again: every row
    // exists, every write an update. Then partitions, as the runner applies them.
    for (name, batch_size, partitions, updates) in [
        ("sink_batch_100", 100usize, 1u32, false),
        ("sink_batch_1000", 1_000, 1, false),
        ("sink_batch_5000", 5_000, 1, false),
        ("sink_batch_1000_updates", 1_000, 1, true),
        ("sink_batch_1000_partitions_2", 1_000, 2, false),
        ("sink_batch_1000_partitions_4", 1_000, 4, false),
    ] {
        if !updates {
            reset(conn).await?;
        }
        let rate = bench_rows::sink_rate(url, mappings, data, batch_size, partitions).await?;
        println!("{name}_rows_per_second={rate:.0}");
        println!("{name}_ratio_to_load_data={:.2}", rate / load_rate);
    }
    Ok(())
}

/// The figures of goal 4 taken in turn, `rounds` times, then each ratio's median (see the
/// module doc).
async fn in_rounds(
    conn: &mut mysql_async::Conn,
    url: &str,
    mappings: &[Mapping],
    data: &[bench_rows::Row],
    tsv: &[String],
    rounds: usize,
) -> BenchResult<()> {
    const NAMES: [&str; 3] = [
        "load_data_1000_per_transaction",
        "sink_batch_1000",
        "sink_batch_1000_partitions_2",
    ];
    let mut ratios: Vec<[f64; 3]> = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        reset(conn).await?;
        let load_rate = load_data_rate(conn, tsv, tsv.len()).await?;
        reset(conn).await?;
        let per_transaction = load_data_rate(conn, tsv, 1_000).await?;
        reset(conn).await?;
        let sink = bench_rows::sink_rate(url, mappings, data, 1_000, 1).await?;
        reset(conn).await?;
        let partitioned = bench_rows::sink_rate(url, mappings, data, 1_000, 2).await?;
        let round_ratios = [per_transaction, sink, partitioned].map(|rate| rate / load_rate);
        println!(
            "round_{round}: load_data_rows_per_second={load_rate:.0} {}",
            NAMES
                .iter()
                .zip(round_ratios)
                .map(|(name, ratio)| format!("{name}_ratio_to_load_data={ratio:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        ratios.push(round_ratios);
    }
    for (index, name) in NAMES.iter().enumerate() {
        let mut values: Vec<f64> = ratios.iter().map(|round| round[index]).collect();
        values.sort_by(f64::total_cmp);
        println!(
            "median_{name}_ratio_to_load_data={:.2} (rounds: {:.2} to {:.2})",
            values[values.len() / 2],
            values[0],
            values[values.len() - 1]
        );
    }
    Ok(())
}

/// Rows per second of `LOAD DATA LOCAL INFILE` of `lines` into `wb_bench`, `per_transaction`
/// rows in each transaction (all of them: one autocommitted statement).
async fn load_data_rate(
    conn: &mut mysql_async::Conn,
    lines: &[String],
    per_transaction: usize,
) -> BenchResult<f64> {
    let whole = per_transaction >= lines.len();
    let started = Instant::now();
    for chunk in lines.chunks(per_transaction.max(1)) {
        let payload = Bytes::from(chunk.concat());
        conn.set_infile_handler(async move {
            Ok(futures_util::stream::iter(vec![Ok(payload)]).boxed())
        });
        if !whole {
            conn.query_drop("START TRANSACTION").await?;
        }
        conn.query_drop(
            "LOAD DATA LOCAL INFILE 'rows.tsv' INTO TABLE wb_bench (id, first, last, age)",
        )
        .await?;
        if !whole {
            conn.query_drop("COMMIT").await?;
        }
    }
    Ok(lines.len() as f64 / started.elapsed().as_secs_f64())
}

/// An empty `wb_bench`, and no checkpoint row of an earlier pass.
async fn reset(conn: &mut mysql_async::Conn) -> Result<(), mysql_async::Error> {
    conn.query_drop("DROP TABLE IF EXISTS wb_bench").await?;
    conn.query_drop(CREATE).await?;
    conn.query_drop("DELETE FROM writebehind_checkpoint WHERE backend LIKE 'bench%'")
        .await
        .ok();
    Ok(())
}
