//! Capture killed (-9) at random instants: every restart resumes with PSYNC, nothing is lost,
//! nothing is written twice, and a flush interrupted half way completes.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis_protocol::resp2::types::BytesFrame;
use support::capture::*;
use support::send_all;
use support::RedisServer;
use writebehind::buffer::Store;
use writebehind::redis_client::info_field;

/// Every write makes a new row (`person2:<n>` with `seq = n`), so that no two writes coalesce:
/// the table must end with exactly rows 1..N, each written once (triggers count the writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_at_random_instants_loses_and_repeats_nothing_sqlite() {
    kill_dash_nine("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_at_random_instants_loses_and_repeats_nothing_mariadb() {
    kill_dash_nine("mariadb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_at_random_instants_loses_and_repeats_nothing_postgres() {
    kill_dash_nine("postgres").await;
}

async fn kill_dash_nine(backend: &str) {
    // The backlog must cover the writes made while the service restarts (README: sizing it).
    let server = RedisServer::start(&["--repl-backlog-size", "256mb"]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let database = match backend {
        "mariadb" => CountedDb::maria().await,
        "postgres" => CountedDb::postgres().await,
        _ => CountedDb::sqlite(dir.path().join("writebehind.db")),
    };
    let (config, buffer) = service_config_for(&server, &dir, &database.url());
    let mut rng = StdRng::seed_from_u64(9);
    let mut service = spawn_service(&config);
    // The first attach is a full sync of an empty database; writes start once it is done.
    until_attached(&mut client, || service_log(&config)).await;
    let mut next_seq = 1u64;
    let kills = 20;
    for round in 0..=kills {
        // Each restarted service first attaches (a partial resync), so that every kill hits a
        // running capture; then writes flow and it is killed at a random instant.
        let deadline = Instant::now() + Duration::from_secs(30);
        while round > 0
            && info_field(
                &client.info("stats").await.expect("info"),
                "sync_partial_ok",
            ) != Some(round.to_string().as_str())
        {
            assert!(
                Instant::now() < deadline,
                "restart {round} did not attach; sync_full {:?}{}",
                info_field(&client.info("stats").await.expect("info"), "sync_full"),
                service_log(&config)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let kill_after = Duration::from_millis(rng.random_range(50..400));
        let started = Instant::now();
        while started.elapsed() < kill_after || round == kills {
            let commands: Vec<Vec<String>> = (0..50)
                .map(|_| {
                    let seq = next_seq.to_string();
                    next_seq += 1;
                    vec!["HSET".into(), format!("person2:{seq}"), "seq".into(), seq]
                })
                .collect();
            send_all(&mut client, &commands).await;
            if round == kills {
                break;
            }
        }
        if round < kills {
            let _ = service.kill();
            let _ = service.wait();
            service = spawn_service(&config);
        }
    }
    // Let the last service capture and apply everything, then stop it.
    let written = next_seq - 1;
    until_caught_up(&mut client, &database, written, || service_log(&config)).await;
    let _ = service.kill();
    let _ = service.wait();

    let stats = client.info("stats").await.expect("info");
    let log: Vec<String> = server
        .log()
        .lines()
        .filter(|l| l.contains("esync") || l.contains("PSYNC") || l.contains("backlog"))
        .map(String::from)
        .collect();
    assert_eq!(
        info_field(&stats, "sync_full"),
        Some("1"),
        "only the first attach may be a full sync:\n{}",
        log.join("\n")
    );
    assert_eq!(
        info_field(&stats, "sync_partial_ok"),
        Some(kills.to_string().as_str()),
        "every restart resumed with PSYNC"
    );

    assert_each_row_written_once(&database, written).await;
    // The mirror holds every key; a sample is compared field by field with Redis (reading all
    // of several hundred thousand keys back from Redis would dominate the test).
    let store = Store::open(&buffer).expect("store");
    let mirror = mirror_hashes(&store);
    assert_eq!(mirror.len() as u64, written);
    for _ in 0..200 {
        let key = format!("person2:{}", rng.random_range(1..next_seq));
        let BytesFrame::Array(items) = client.command(&["HGETALL", &key]).await.expect("hgetall")
        else {
            panic!("HGETALL")
        };
        let fields: BTreeMap<Bytes, Bytes> = items
            .chunks(2)
            .filter_map(|p| match (&p[0], &p[1]) {
                (BytesFrame::BulkString(f), BytesFrame::BulkString(v)) => {
                    Some((f.clone(), v.clone()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            mirror.get(&(0, Bytes::from(key.clone()))),
            Some(&fields),
            "{key}"
        );
    }
    database.drop_database().await;
}

/// A service killed (-9) while it deletes a large flush page by page resumes with PSYNC, the
/// flush arrives again and deletes what is left: the table ends empty, nothing comes back, and no
/// full resync is needed (docs/design.md 5.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_during_a_paged_flush_deletes_every_row_once_resumed() {
    let server = RedisServer::start(&["--repl-backlog-size", "64mb"]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let database = CountedDb::sqlite(dir.path().join("writebehind.db"));
    let (config, buffer) = service_config_for(&server, &dir, &database.url());
    let keys = 30_000u64;
    let fill: Vec<Vec<String>> = (1..=keys)
        .map(|i| {
            vec![
                "HSET".into(),
                format!("person2:{i}"),
                "seq".into(),
                i.to_string(),
            ]
        })
        .collect();
    send_all(&mut client, &fill).await;
    let mut service = spawn_service(&config);
    let deadline = Instant::now() + Duration::from_secs(120);
    while database.row_count().await < keys {
        assert!(Instant::now() < deadline, "the initial load did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.command(&["FLUSHALL"]).await.expect("flushall");
    let mut rng = StdRng::seed_from_u64(13);
    let kills = 5;
    let mut mirrored_at_kills = Vec::new();
    for round in 1..=kills {
        // Killed while the pages are being deleted (or just after: both must end the same):
        // once the table shows the flush under way again (a blind delay from the restart let
        // every kill of a slow machine land before the first page), then after a random delay.
        let rows = database.row_count().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while rows > 0 && database.row_count().await == rows && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let delay = if round == 1 {
            0
        } else {
            rng.random_range(0..40)
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let _ = service.kill();
        let _ = service.wait();
        let store = Store::open(&buffer).expect("store");
        mirrored_at_kills.push(mirror_hashes(&store).len() as u64);
        drop(store);
        service = spawn_service(&config);
        let deadline = Instant::now() + Duration::from_secs(30);
        while info_field(
            &client.info("stats").await.expect("info"),
            "sync_partial_ok",
        ) != Some(round.to_string().as_str())
        {
            assert!(
                Instant::now() < deadline,
                "restart {round} did not attach; sync_full {:?}{}",
                info_field(&client.info("stats").await.expect("info"), "sync_full"),
                service_log(&config)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let target = master_offset(&mut client).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while replica_ack_offset(&mut client)
        .await
        .is_none_or(|o| o < target)
        || database.row_count().await > 0
    {
        assert!(
            Instant::now() < deadline,
            "the flush did not complete: {} rows left",
            database.row_count().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = service.kill();
    let _ = service.wait();
    assert!(
        mirrored_at_kills.iter().any(|n| *n > 0 && *n < keys),
        "a kill landed in the middle of the paged flush: {mirrored_at_kills:?}"
    );
    let stats = client.info("stats").await.expect("info");
    assert_eq!(info_field(&stats, "sync_full"), Some("1"), "no full resync");
    assert_eq!(database.row_count().await, 0);
    let store = Store::open(&buffer).expect("store");
    assert!(mirror_hashes(&store).is_empty(), "the mirror is empty too");
}
