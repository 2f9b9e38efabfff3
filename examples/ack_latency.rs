//! Acknowledgement latency benchmark (used by scripts/bench-ack.sh; not a test).
//!
//! At a fixed rate, each write is `HSET person:<i> first_name .. age <i> # =<uuid>` followed,
//! on the same connection, by `XREAD BLOCK 10000 STREAMS {person:<i>}<uuid> 0-0`, exactly as a
//! recipe client waits; the latency is from sending the HSET to the ack's arrival (the row is
//! committed in the database by then). Reference, in the same process and at the same rate: a
//! client writing through synchronously, `HSET` then an autocommitted
//! `INSERT ... ON DUPLICATE KEY UPDATE` of the same row into the same database.
//!
//! With `FLOOR_DIR=dir`, a third client measures the floor of any design that acknowledges
//! only what is durable and applies only what is buffered (`buffered >= applied`, design 1.1):
//! `HSET`, then one small record written with `sync` into a RocksDB database in `dir` (the
//! change made durable in the buffer, as the service's committer does before any sink may
//! apply it; writers at the same moment share one sync, as the committer's batches do), then
//! the same autocommitted upsert as the write-through. It does nothing else the service does
//! (no replication hop, no change log, no checkpoint row, no ack written back and read): two
//! syncs in series, the least an acknowledgement can wait for.
//!
//! The clients alternate second by second (a second of acked writes, then a second of writes
//! through, and so on), so that all see the same machine: run one after the other, a
//! background spell of the shared machine (a flush in the database, another process) fell on
//! one of them only, and the ratio of the 99th percentiles moved between 1.3x and 4.6x from
//! run to run of the same build.
//!
//! Usage: ack_latency <redis-url> <mysql-url> [writes-per-second] [seconds]
//! With `LATENCY_CSV=file`, the latency distributions are written there (per mille, ack ms,
//! write-through ms, and floor ms with `FLOOR_DIR`), for the script's plot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use redis_protocol::resp2::types::BytesFrame;
use tokio::sync::Mutex;
use writebehind::config::RedisEndpoint;
use writebehind::redis_client::RedisClient;

/// Connections handed out one per write; a write waits for a free one (the semaphore counts
/// them), so a slow ack delays later writes instead of failing them.
struct Pool<T> {
    free: Mutex<Vec<T>>,
    available: tokio::sync::Semaphore,
}

impl<T> Pool<T> {
    fn new(items: Vec<T>) -> Arc<Pool<T>> {
        Arc::new(Pool {
            available: tokio::sync::Semaphore::new(items.len()),
            free: Mutex::new(items),
        })
    }

    async fn take(&self) -> Option<T> {
        self.available.acquire().await.ok()?.forget();
        self.free.lock().await.pop()
    }

    async fn give(&self, item: T) {
        self.free.lock().await.push(item);
        self.available.add_permits(1);
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs `one(i)` for `i` in `first..first + count` at `rate` a second; adds the latencies (ms)
/// to `samples`, returns how many failed.
async fn run<F, Fut>(rate: u64, first: u64, count: u64, one: &Arc<F>, samples: &mut Vec<f64>) -> u64
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<Duration>> + Send + 'static,
{
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    for i in first..first + count {
        ticker.tick().await;
        let one = one.clone();
        tasks.spawn(async move { one(i).await });
    }
    let mut lost = 0;
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Some(d)) => samples.push(d.as_secs_f64() * 1000.0),
            _ => lost += 1,
        }
    }
    lost
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(redis_url), Some(mysql_url)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: ack_latency <redis-url> <mysql-url> [writes-per-second] [seconds]");
        std::process::exit(2);
    };
    let rate: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let seconds: u64 = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(10);
    let endpoint = RedisEndpoint::parse(redis_url).expect("redis url");
    let mut clients = Vec::new();
    for _ in 0..256 {
        clients.push(
            RedisClient::connect(&endpoint, Duration::from_secs(15))
                .await
                .expect("connect"),
        );
    }
    let clients = Pool::new(clients);

    let pool = clients.clone();
    let ack_one = Arc::new(move |i: u64| {
        let pool = pool.clone();
        async move {
            let mut client = pool.take().await?;
            let key = format!("person:{i}");
            let uuid = format!("bench{i}");
            let op = format!("={uuid}");
            let age = i.to_string();
            let stream = format!("{{{key}}}{uuid}");
            let started = Instant::now();
            let replies = client
                .pipeline(&[
                    &["HSET", &key, "first_name", "bench", "age", &age, "#", &op][..],
                    &["XREAD", "BLOCK", "10000", "STREAMS", &stream, "0-0"][..],
                ])
                .await
                .ok()?;
            let elapsed = started.elapsed();
            pool.give(client).await;
            matches!(replies.get(1), Some(BytesFrame::Array(_))).then_some(elapsed)
        }
    });

    let mysql = mysql_async::Pool::new(mysql_url.as_str());
    let through_one = write_through_client(clients.clone(), mysql.clone(), None);
    let floor_one = std::env::var("FLOOR_DIR").ok().map(|dir| {
        let db = rocksdb::DB::open_default(dir).expect("open the floor's RocksDB");
        write_through_client(clients.clone(), mysql.clone(), Some(Arc::new(db)))
    });
    let (mut acked, mut reference, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    let (mut acked_lost, mut reference_lost, mut floor_lost) = (0, 0, 0);
    for second in 0..seconds {
        let first = second * rate;
        acked_lost += run(rate, first, rate, &ack_one, &mut acked).await;
        reference_lost += run(rate, first, rate, &through_one, &mut reference).await;
        if let Some(floor_one) = &floor_one {
            floor_lost += run(rate, first, rate, floor_one, &mut floor).await;
        }
    }
    acked.sort_by(|a, b| a.total_cmp(b));
    reference.sort_by(|a, b| a.total_cmp(b));
    floor.sort_by(|a, b| a.total_cmp(b));

    if let Ok(path) = std::env::var("LATENCY_CSV") {
        let mut csv = String::from("per_mille,ack_ms,write_through_ms,floor_ms\n");
        for per_mille in 0..=1000 {
            let p = f64::from(per_mille) / 1000.0;
            csv.push_str(&format!(
                "{per_mille},{:.3},{:.3},{:.3}\n",
                percentile(&acked, p),
                percentile(&reference, p),
                percentile(&floor, p)
            ));
        }
        std::fs::write(&path, csv).expect("write LATENCY_CSV");
    }
    let (a50, a99) = (percentile(&acked, 0.50), percentile(&acked, 0.99));
    let (r50, r99) = (percentile(&reference, 0.50), percentile(&reference, 0.99));
    println!("rate {rate} writes/s for {seconds} s");
    println!(
        "ack latency (HSET # =uuid -> XREAD sees the ack): p50 {a50:.2} ms  p99 {a99:.2} ms  max {:.2} ms  ({} acks, {acked_lost} missing)",
        acked.last().copied().unwrap_or(f64::NAN),
        acked.len()
    );
    println!(
        "reference, synchronous write-through (HSET + INSERT ... ON DUPLICATE KEY UPDATE): p50 {r50:.2} ms  p99 {r99:.2} ms  ({} writes, {reference_lost} failed)",
        reference.len()
    );
    println!(
        "ratio ack / write-through: p50 {:.2}x  p99 {:.2}x",
        a50 / r50,
        a99 / r99
    );
    if floor_one.is_some() {
        let (f50, f99) = (percentile(&floor, 0.50), percentile(&floor, 0.99));
        println!(
            "floor, two syncs in series (HSET + a synced RocksDB write + the same upsert): p50 {f50:.2} ms  p99 {f99:.2} ms  ({} writes, {floor_lost} failed)",
            floor.len()
        );
        println!(
            "ratio floor / write-through: p50 {:.2}x  p99 {:.2}x",
            f50 / r50,
            f99 / r99
        );
    }
}

/// A client writing through synchronously: `HSET`, then the autocommitted upsert of the same
/// row; with `buffer`, the floor's client (see the module's doc): a synced RocksDB write between
/// the two.
fn write_through_client(
    pool: Arc<Pool<RedisClient>>,
    mysql: mysql_async::Pool,
    buffer: Option<Arc<rocksdb::DB>>,
) -> Arc<impl Fn(u64) -> BoxedLatency + Send + Sync + 'static> {
    let prefix = if buffer.is_some() { "floor" } else { "through" };
    Arc::new(move |i: u64| -> BoxedLatency {
        let (pool, mysql, buffer) = (pool.clone(), mysql.clone(), buffer.clone());
        Box::pin(async move {
            let mut client = pool.take().await?;
            let mut conn = mysql.get_conn().await.ok()?;
            let key = format!("{prefix}:{i}");
            let age = i.to_string();
            let started = Instant::now();
            client
                .command(&["HSET", &key, "first_name", "bench", "age", &age])
                .await
                .ok()?;
            if let Some(db) = buffer {
                let record = key.clone();
                tokio::task::spawn_blocking(move || {
                    let mut options = rocksdb::WriteOptions::default();
                    options.set_sync(true);
                    db.put_opt(record.as_bytes(), b"first_name bench", &options)
                })
                .await
                .ok()?
                .ok()?;
            }
            conn.exec_drop(
                "INSERT INTO through_persons (person_id, first, age) VALUES (?, ?, ?) \
                 ON DUPLICATE KEY UPDATE first = VALUES(first), age = VALUES(age)",
                (key, "bench", i),
            )
            .await
            .ok()?;
            let elapsed = started.elapsed();
            pool.give(client).await;
            Some(elapsed)
        })
    })
}

/// One write's latency, or `None` if it failed.
type BoxedLatency =
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<Duration>> + Send + 'static>>;
