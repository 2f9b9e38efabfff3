//! Redis Cluster end to end: a local cluster of 3 primaries and 3 replicas, the service
//! following every shard (`[source] cluster`), MariaDB as the backend. Slot migration and
//! shards added and removed: `cluster_topology.rs`; the op field: `cluster_ops.rs`.

mod support;

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use support::cluster::RedisCluster;
use support::cluster_load::*;
use support::sink::{Database, PERSON_TABLE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_workload_over_every_slot_ends_equal_to_every_shard() {
    let cluster = RedisCluster::start(3, 1).await;
    let database = Database::maria().await;
    database.execute(PERSON_TABLE).await;
    let mut client = cluster.client().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    // Some of it before the service starts (in the snapshots), the rest while it runs.
    client.send_groups(&workload(&mut rng, 1500)).await;
    let (service, _dir) = start_service(&cluster, &database).await;
    for _ in 0..4 {
        client.send_groups(&workload(&mut rng, 1500)).await;
    }
    until_expired(&mut client).await;
    until_equal(&mut client, &database).await;
    let expected = expected_rows(&mut client).await;
    assert!(
        expected.len() > 300,
        "the workload leaves rows: {}",
        expected.len()
    );
    assert!(
        expected.keys().any(|k| k.starts_with("{g")),
        "tagged keys are in the table"
    );

    // One pipeline per shard, each with its own checkpoint row.
    let shards = service.shards();
    assert_eq!(shards.len(), 3, "a pipeline per primary");
    let rows = database.checkpoint_rows().await;
    for shard in &shards {
        let name = format!("db@{}", shard.id);
        assert!(
            rows.iter().any(|(row, seq)| *row == name && *seq > 0),
            "{name} in {rows:?}"
        );
        let position = shard
            .store
            .checkpoint()
            .expect("checkpoint")
            .position
            .expect("a position");
        let primary = cluster.topology().await;
        let owner = primary
            .shards
            .iter()
            .find(|s| shard.locator.is(s))
            .expect("the shard");
        assert_eq!(
            owner.primary().map(|n| n.id.clone()),
            Some(shard.id.clone()),
            "the shard's id is its primary's"
        );
        assert!(position.offset.0 > 0);
    }
    assert!(
        !rows.iter().any(|(row, _)| row == "db"),
        "no single-primary row: {rows:?}"
    );
    service.shutdown();
    service.wait().await.expect("stopped cleanly");
    database.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_and_automatic_failovers_under_load_are_followed_by_partial_resyncs() {
    // The service's log on a failure (`cargo test` shows a failing test's output).
    let _ = tracing_subscriber::fmt()
        .with_env_filter("writebehind=info")
        .with_test_writer()
        .try_init();
    let cluster = RedisCluster::start(3, 1).await;
    let database = Database::maria().await;
    database.execute(PERSON_TABLE).await;
    let (service, _dir) = start_service(&cluster, &database).await;
    let load = Load::start(&cluster).await;
    load.until_written(500).await;

    // Manual: the replica of the first shard takes over (it waits until it holds everything).
    let first = cluster.topology().await.shards[0].clone();
    let (primary, replica) = (
        first.primary().unwrap().clone(),
        first.nodes.iter().find(|n| !n.primary).unwrap().clone(),
    );
    let reply = cluster
        .node(replica.port)
        .client()
        .await
        .command(&["CLUSTER", "FAILOVER"])
        .await
        .expect("failover");
    assert_eq!(writebehind::redis_client::frame_text(&reply), "OK");
    assert_eq!(
        until_promoted(&cluster, &primary.id, primary.port).await,
        replica.port
    );
    load.until_written(500).await;

    // Automatic: the second shard's primary is killed. Its writes pause first, and its replica
    // is seen to hold the primary's whole offset, so that what the service received is on the replica
    // and the link can continue there; the other shards stay under load.
    let second = cluster
        .topology()
        .await
        .shards
        .iter()
        .find(|s| !s.has_node(&primary.id))
        .unwrap()
        .clone();
    let victim = second.primary().unwrap().clone();
    *load.paused.lock().unwrap() = Some(victim.port);
    let heir = second.nodes.iter().find(|n| !n.primary).unwrap().clone();
    until_caught_up(&cluster, victim.port, heir.port).await;
    let index = cluster
        .nodes
        .iter()
        .position(|n| n.port == victim.port)
        .unwrap();
    let mut cluster = cluster;
    cluster.nodes[index].kill();
    let promoted = until_promoted(&cluster, &heir.id, victim.port).await;
    assert_eq!(promoted, heir.port);
    *load.paused.lock().unwrap() = None;
    load.until_written(500).await;
    let written = load.finish().await;

    let mut client = cluster.client().await;
    until_equal_explained(&mut client, &database, || shards_status(&service)).await;
    let rows = database.rows("person1", &["first"]).await;
    assert!(
        rows.len() as u64 >= written.min(1500),
        "{} rows for {written} writes",
        rows.len()
    );
    let shards = service.shards();
    assert_eq!(shards.len(), 3, "a failover starts no new pipeline");
    for shard in &shards {
        let primary_now = shard.health.primary().expect("a primary").port;
        if shard.locator.members().contains(&victim.id) {
            assert_eq!(
                primary_now, promoted,
                "the killed primary's shard follows its replica"
            );
        }
        if shard.locator.members().contains(&primary.id) {
            assert_eq!(primary_now, replica.port, "the manual failover is followed");
        }
    }
    service.shutdown();
    let stats = service.wait().await.expect("stopped cleanly");
    assert_eq!(
        stats.full_syncs, 3,
        "one full sync per shard, none after a failover: {stats:?}"
    );
    assert!(
        stats.partial_syncs >= 2,
        "both failovers continued: {stats:?}"
    );
    database.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_under_load_resumes_every_shard_and_applies_nothing_twice() {
    let cluster = RedisCluster::start(3, 1).await;
    let database = Database::maria().await;
    database.execute(support::sink::COUNTED_PERSON_TABLE).await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("writebehind.toml");
    std::fs::write(
        &config,
        config_text(&cluster, &database.url(), &dir.path().join("buffer")),
    )
    .expect("config");
    let log_path = dir.path().join("service.log");
    let log = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log")
    };
    // Until every shard's link is up in this run: its snapshot captured (first start) or its
    // partial resync accepted (restarts).
    let until_linked = async |runs: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let linked = text.matches("snapshot captured").count()
                + text.matches("partial resync accepted").count();
            if linked >= 3 * runs {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "shards not linked in run {runs}: {text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let load = Load::start(&cluster).await;
    load.until_written(200).await;
    let mut service = support::spawn_service(&config, log());
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for run in 1..=3 {
        until_linked(run).await;
        load.until_written(rng.random_range(100..600)).await;
        service.0.kill().expect("kill -9");
        service.0.wait().expect("reaped");
        load.until_written(200).await;
        service = support::spawn_service(&config, log());
    }
    until_linked(4).await;
    load.until_written(300).await;
    let written = load.finish().await;
    let mut client = cluster.client().await;
    until_equal(&mut client, &database).await;
    assert_eq!(
        database.rows("person1", &["first"]).await.len() as u64,
        written,
        "every key written is a row"
    );
    assert_eq!(database.written_twice().await, 0, "rows written twice");
    drop(service);
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let links = text
        .lines()
        .filter(|l| {
            ["resync", "full sync", "starting", "shard", "link lost"]
                .iter()
                .any(|word| l.contains(word))
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        text.matches("full sync started").count(),
        3,
        "one full sync per shard, at the first start only: {links}"
    );
    assert_eq!(
        text.matches("partial resync accepted").count(),
        9,
        "each restart continued every shard: {links}"
    );

    // The command line, on every shard.
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_writebehind"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .expect("writebehind runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.code(), text)
    };
    let (code, text) = cli(&["check"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("the cluster has 3 shards with a primary"),
        "{text}"
    );
    let (code, text) = cli(&["status"]);
    assert_eq!(code, Some(0), "{text}");
    let status: serde_json::Value = serde_json::from_str(&text).expect("status is JSON");
    let shards = status["shards"].as_array().expect("a status per shard");
    assert_eq!(shards.len(), 3, "{text}");
    for shard in shards {
        let id = shard["shard"].as_str().expect("the shard's id");
        assert!(shard["captured_seq"].as_u64().unwrap_or(0) > 0, "{text}");
        assert_eq!(
            shard["backends"]["db"]["applied_seq"], shard["captured_seq"],
            "{text}"
        );
        let (code, listed) = cli(&["dlq", "--shard", id, "list"]);
        assert_eq!(code, Some(0), "{listed}");
    }
    let (code, text) = cli(&["dlq", "list"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--shard"), "{text}");
    database.drop_database().await;
}
