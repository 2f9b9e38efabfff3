//! Operating the service: metrics, readiness, status and graceful shutdown, with the
//! `writebehind` binary against real redis-server, SQLite and a private MariaDB.

mod support;

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use support::service::{exchange, get, metric, sqlite_rows, status_of, write, Service};
use support::{MariaDbServer, RedisServer};
use writebehind::redis_client::RedisClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_during_a_load_and_positions_stay_ordered() {
    let redis = RedisServer::start(&[]);
    let mut client = redis.client().await;
    let service = Service::new(&redis, None);
    service.until_ready().await;
    assert_eq!(get(service.admin, "/health").map(|(s, _)| s), Some(200));
    let mut changes_seen = Vec::new();
    for round in 0..5u64 {
        write(&mut client, round * 2000..(round + 1) * 2000).await;
        let (status, text) = get(service.admin, "/metrics").expect("metrics");
        assert_eq!(status, 200);
        let received = metric(&text, "writebehind_position_received_bytes").unwrap_or(0.0);
        let buffered = metric(&text, "writebehind_position_buffered_bytes").unwrap_or(0.0);
        let applied = metric(&text, "writebehind_position_applied_bytes").unwrap_or(0.0);
        let acked = metric(&text, "writebehind_position_acked_bytes").unwrap_or(0.0);
        assert!(
            received >= buffered && buffered >= applied && applied >= acked,
            "{received} {buffered} {applied} {acked}"
        );
        changes_seen.push(metric(&text, "writebehind_changes_total").unwrap_or(0.0));
        for name in [
            "writebehind_lag_bytes",
            "writebehind_lag_seconds",
            "writebehind_primary_offset_bytes",
            "writebehind_full_syncs_total",
        ] {
            assert!(
                metric(&text, name).is_some(),
                "{name} missing from:\n{text}"
            );
        }
    }
    service
        .until("all rows", || sqlite_rows(&service.sqlite()) == 10_000)
        .await;
    // A batch is counted once its acknowledgements are queued, just after its rows are seen.
    let batches = || {
        get(service.admin, "/metrics")
            .and_then(|(_, text)| metric(&text, "writebehind_sink_batches_total"))
            .unwrap_or(0.0)
    };
    service
        .until("a sink batch counted", || batches() >= 1.0)
        .await;
    let (_, text) = get(service.admin, "/metrics").expect("metrics");
    assert_eq!(
        metric(&text, "writebehind_changes_total"),
        Some(10_000.0),
        "{text}"
    );
    // The memory by part: the allocator's figures (the binary runs on jemalloc) and RocksDB's.
    let part = |name: &str| {
        metric(
            &text,
            &format!("writebehind_memory_bytes{{part=\"{name}\"}}"),
        )
    };
    let (allocated, resident) = (part("heap_allocated"), part("heap_resident"));
    assert!(
        allocated.is_some_and(|a| a > 1e6) && resident >= allocated,
        "{allocated:?} {resident:?}"
    );
    for name in [
        "rocksdb_memtables",
        "rocksdb_table_readers",
        "rocksdb_block_cache",
    ] {
        assert!(
            part(name).is_some(),
            "memory part {name} missing from:\n{text}"
        );
    }
    assert!(
        text.contains("writebehind_sink_commit_seconds_bucket"),
        "{text}"
    );
    // The first scrape came after 2,000 of the 10,000 writes: the counter moved since.
    assert!(
        changes_seen.first().is_some_and(|first| *first <= 2_000.0),
        "{changes_seen:?}"
    );
    // The status document of the running service.
    let output = Command::new(env!("CARGO_BIN_EXE_writebehind"))
        .args(["status", "--config"])
        .arg(&service.config)
        .output()
        .expect("status");
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).expect("status JSON");
    assert_eq!(status["link"], "up");
    assert_eq!(status["dead_letters"], 0);
    // The buffer's size on disk: its files, whatever column family they belong to.
    assert!(
        status["buffer_bytes"].as_u64().is_some_and(|b| b > 0),
        "{status}"
    );
    // Nothing waits in the replication spool of a service that keeps up.
    assert_eq!(status["spool_bytes"], 0, "{status}");
    assert!(
        metric(&text, "writebehind_buffer_size_bytes").is_some_and(|b| b > 0.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_while_the_database_is_down() {
    let mut mariadb = MariaDbServer::start();
    let (_, url) = support::create_database(&mariadb.server(), "wb").await;
    let redis = RedisServer::start(&[]);
    let mut client = redis.client().await;
    let service = Service::new(&redis, Some(&url));
    service.until_ready().await;
    tokio::task::block_in_place(|| mariadb.stop());
    write(&mut client, 0..10).await;
    service
        .until("503 while MariaDB is down", || {
            get(service.admin, "/ready")
                .is_some_and(|(s, body)| s == 503 && body.contains("backend `db` is down"))
        })
        .await;
    assert_eq!(
        get(service.admin, "/health").map(|(s, _)| s),
        Some(200),
        "alive all the same"
    );
    tokio::task::block_in_place(|| mariadb.crash_and_restart(Duration::ZERO));
    service
        .until("ready again", || {
            get(service.admin, "/ready").is_some_and(|(s, _)| s == 200)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_load_exits_0_and_a_restart_loses_nothing() {
    let redis = RedisServer::start(&["--repl-backlog-size", "64mb"]);
    let mut client = redis.client().await;
    let mut service = Service::new(&redis, None);
    service.until_ready().await;
    // The load runs before, during and after the stop, until told to end.
    let (end_tx, end_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(async move {
        let mut next = 1u64;
        while !*end_rx.borrow() {
            write(&mut client, next..next + 100).await;
            next += 100;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        next - 1
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = tokio::task::block_in_place(|| service.terminate());
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        service.log()
    );
    assert!(service.log().contains("SIGTERM: stopping"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    service.spawn();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = end_tx.send(true);
    let written = load.await.expect("load");
    service
        .until("every row", || sqlite_rows(&service.sqlite()) == written)
        .await;
    let db = rusqlite::Connection::open(service.sqlite()).expect("sqlite");
    let (min, max): (i64, i64) = db
        .query_row(
            "SELECT MIN(CAST(seq AS INTEGER)), MAX(CAST(seq AS INTEGER)) FROM person1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("range");
    assert_eq!((min, max), (1, written as i64));
    let stats = redis.client().await.info("stats").await.expect("info");
    assert_eq!(
        writebehind::redis_client::info_field(&stats, "sync_partial_ok"),
        Some("1"),
        "the restart resumed with PSYNC; redis log:\n{}\nservice log:\n{}",
        redis.log(),
        service.log()
    );
}

/// The admin listener is bounded: GET only, headers within a timeout, a connection limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_is_read_only_and_bounded() {
    let redis = RedisServer::start(&[]);
    let service = Service::new(&redis, None);
    service
        .until("listening", || get(service.admin, "/health").is_some())
        .await;
    let post = exchange(
        service.admin,
        b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    assert!(post.contains("allow: GET, HEAD, POST"), "{post}");
    let bad_drop = exchange(
        service.admin,
        b"POST /dlq/drop?seq=x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(bad_drop.starts_with("HTTP/1.1 400"), "{bad_drop}");
    // Headers that never end: the connection is closed without an answer (after 10 s).
    assert_eq!(
        exchange(service.admin, b"GET /status HTTP/1.1\r\nHost: x\r\n"),
        ""
    );
    // 32 connections that send nothing take every slot: the next is closed unanswered, and
    // once they are gone (closed here) requests are served again.
    let idle: Vec<TcpStream> = (0..32)
        .map(|_| TcpStream::connect(("127.0.0.1", service.admin)).expect("connect"))
        .collect();
    let refused = exchange(
        service.admin,
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(refused, "", "served past the connection limit");
    drop(idle);
    service
        .until("served again", || {
            get(service.admin, "/health").is_some_and(|(s, _)| s == 200)
        })
        .await;
}

/// A first full sync the primary delays (`repl-diskless-sync-delay`) says why it waits: in
/// `/status`, in `/ready`'s reason and in one log line; then the link comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_snapshot_is_reported_while_the_primary_prepares_it() {
    let redis = RedisServer::start(&[
        "--repl-diskless-sync",
        "yes",
        "--repl-diskless-sync-delay",
        "4",
    ]);
    let service = Service::new(&redis, None);
    let status = || status_of(service.admin);
    service
        .until("the wait reported", || {
            status().is_some_and(|s| s["link"] == "waiting for the primary to start the snapshot")
        })
        .await;
    let (code, reason) = get(service.admin, "/ready").expect("ready");
    assert_eq!(code, 503);
    assert!(
        reason.contains("waiting for the primary to start the snapshot"),
        "{reason}"
    );
    service
        .until("the link up", || {
            status().is_some_and(|s| s["link"] == "up")
        })
        .await;
    let log = service.log();
    assert_eq!(
        log.matches("waiting for the primary to start the snapshot")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains("repl-diskless-sync-delay"), "{log}");
}

/// The lag is measured against the primary's own offset, read with the source's credentials:
/// on a password-protected primary too (it once connected with the address only, was refused,
/// and silently counted from what was received).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_poller_reads_a_protected_primary_with_the_sources_credentials() {
    let redis = RedisServer::start(&["--requirepass", "pollpw"]);
    let service = Service::with_source(&format!("redis://:pollpw@127.0.0.1:{}", redis.port), None);
    service
        .until("the primary's offset polled", || {
            status_of(service.admin).is_some_and(|s| s["primary_polled"] == true)
        })
        .await;
    assert!(
        !service.log().contains("cannot read the primary's offset"),
        "{}",
        service.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_one_line_per_problem() {
    let redis = RedisServer::start(&["--requirepass", "adminpw"]);
    let admin = writebehind::config::RedisEndpoint::parse(&format!(
        "redis://:adminpw@127.0.0.1:{}",
        redis.port
    ))
    .expect("url");
    let mut client = RedisClient::connect(&admin, Duration::from_secs(5))
        .await
        .expect("admin");
    client
        .command(&[
            "ACL", "SETUSER", "app", "on", ">apppw", "+@all", "-psync", "-dump",
        ])
        .await
        .expect("acl");
    let dir = tempfile::tempdir().expect("dir");
    let database = dir.path().join("rows.db");
    rusqlite::Connection::open(&database)
        .expect("sqlite")
        .execute_batch("CREATE TABLE person1 (id TEXT PRIMARY KEY, first TEXT)")
        .expect("table");
    let run = |url: String| {
        let config = dir.path().join("check.toml");
        std::fs::write(
            &config,
            format!(
                "[source]\nurl = \"{url}\"\n[backends.db]\nurl = \"sqlite://{}\"\n\
                 [[mappings]]\nname = \"People\"\nprefix = \"person2\"\nbackend = \"db\"\ntable = \"person1\"\nkey_column = \"id\"\n[mappings.columns]\nfirst_name = \"first\"\nage = \"age\"\n\
                 [[mappings]]\nname = \"Cars\"\nprefix = \"car\"\nbackend = \"db\"\ntable = \"car\"\nkey_column = \"id\"\n[mappings.columns]\ncolor = \"color\"\n",
                database.display()
            ),
        )
        .expect("config");
        let output = Command::new(env!("CARGO_BIN_EXE_writebehind"))
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .expect("check");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        (output.status.success(), stdout)
    };
    let (ok, out) = run(format!("redis://app:wrong@127.0.0.1:{}", redis.port));
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("error: ")).collect();
    assert!(!ok, "{out}");
    assert!(
        errors
            .iter()
            .any(|l| l.contains("AUTH") && !l.contains("wrong")),
        "wrong password, without printing it: {out}"
    );

    let (ok, out) = run(format!("redis://app:apppw@127.0.0.1:{}", redis.port));
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("error: ")).collect();
    assert!(!ok, "{out}");
    assert_eq!(errors.len(), 3, "{out}");
    assert!(
        errors
            .iter()
            .any(|l| l.contains("user `app` may not run PSYNC") && l.contains("DUMP (")),
        "capture's refresh needs DUMP too: {out}"
    );
    assert!(
        errors
            .iter()
            .any(|l| l.contains("table `person1` has no column `age`")),
        "{out}"
    );
    assert!(
        errors
            .iter()
            .any(|l| l.contains("table `car` does not exist")),
        "{out}"
    );
}
