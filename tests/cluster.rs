//! Redis Cluster end to end: a local cluster of 3 primaries and 3 replicas, the service
//! following every shard (`[source] cluster`), MariaDB as the backend.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use support::cluster::{ClusterClient, RedisCluster};
use support::sink::{Database, PERSON_TABLE};
use writebehind::cluster::ClusterService;
use writebehind::config::Config;
use writebehind::service::ServiceOptions;

/// The configuration: every node a seed, `person2:*` hashes into `person1`, expiry deletes;
/// without the op field (the tests of `#` switch it on).
fn config_text(cluster: &RedisCluster, db_url: &str, buffer: &std::path::Path) -> String {
    format!(
        r#"
[admin]
listen = ""
[acks]
enabled = false
[source]
cluster = [{}]
[buffer]
path = "{}"
[backends.db]
url = "{db_url}"
[[mappings]]
name = "People"
prefix = "person2"
backend = "db"
table = "person1"
key_column = "id"
on_expire = "delete"
[mappings.columns]
first_name = "first"
last_name = "last"
age = "age"
"#,
        cluster.seeds(),
        buffer.display()
    )
}

async fn start_service(
    cluster: &RedisCluster,
    database: &Database,
) -> (ClusterService, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let text = config_text(cluster, &database.url(), &dir.path().join("buffer"));
    let config = Config::parse(&text, &|_| None).expect("config");
    let service = ClusterService::start(&config, ServiceOptions::default())
        .await
        .unwrap_or_else(|e| panic!("the cluster service did not start: {e}"));
    (service, dir)
}

/// What the table should hold: every `person2:*` hash of every primary, projected.
async fn expected_rows(client: &mut ClusterClient) -> BTreeMap<String, Vec<Option<String>>> {
    client
        .hashes("person2:")
        .await
        .into_iter()
        .filter_map(|(key, fields)| {
            let row: Vec<Option<String>> = ["first_name", "last_name", "age"]
                .iter()
                .map(|f| fields.get(*f).cloned())
                .collect();
            let id = key.strip_prefix("person2:")?.to_string();
            // A hash with none of the mapped fields still has a row (all NULL).
            Some((id, row))
        })
        .collect()
}

/// Until the table equals the union of the shards' projections (a minute at most).
async fn until_equal(client: &mut ClusterClient, database: &Database) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let expected = expected_rows(client).await;
        let rows = database.rows("person1", &["first", "last", "age"]).await;
        if rows == expected {
            return;
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = expected
                .keys()
                .filter(|k| !rows.contains_key(*k))
                .take(5)
                .collect();
            let extra: Vec<_> = rows
                .keys()
                .filter(|k| !expected.contains_key(*k))
                .take(5)
                .collect();
            let differ: Vec<_> = expected
                .iter()
                .filter(|(k, v)| rows.get(*k).is_some_and(|r| r != *v))
                .take(5)
                .collect();
            panic!(
                "the table differs from the cluster after 60 s: {} rows against {} hashes; missing {missing:?}, extra {extra:?}, different {differ:?}",
                rows.len(),
                expected.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A random workload over every slot: hash writes, deletes, renames within a hash tag,
/// transactions on one slot, expiry. Groups of commands, each on one slot.
fn workload(rng: &mut rand::rngs::StdRng, groups: usize) -> Vec<Vec<Vec<String>>> {
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<String>>();
    let plain = |rng: &mut rand::rngs::StdRng| format!("person2:k{}", rng.random_range(0..600));
    let tagged = |rng: &mut rand::rngs::StdRng, tag: u32| {
        format!("person2:{{g{tag}}}k{}", rng.random_range(0..8))
    };
    let mut out = Vec::new();
    for n in 0..groups {
        let value = format!("v{n}");
        let group = match rng.random_range(0..100) {
            0..=39 => {
                let key = plain(rng);
                vec![s(&[
                    "HSET",
                    &key,
                    "first_name",
                    &value,
                    "last_name",
                    "L",
                    "age",
                    &n.to_string(),
                ])]
            }
            40..=54 => vec![s(&["HSET", &plain(rng), "age", &value])],
            55..=62 => vec![s(&["HDEL", &plain(rng), "last_name"])],
            63..=70 => vec![s(&["DEL", &plain(rng)])],
            71..=76 => vec![s(&["PEXPIRE", &plain(rng), "50"])],
            77..=84 => {
                let tag = rng.random_range(0..40);
                vec![s(&["HSET", &tagged(rng, tag), "first_name", &value])]
            }
            85..=91 => {
                let tag = rng.random_range(0..40);
                let (from, to) = (tagged(rng, tag), tagged(rng, tag));
                // RENAME of an absent key is an error and changes nothing.
                vec![s(&["RENAME", &from, &to])]
            }
            _ => {
                let tag = rng.random_range(0..40);
                vec![
                    s(&["MULTI"]),
                    s(&["HSET", &tagged(rng, tag), "first_name", &value, "age", "1"]),
                    s(&["HSET", &tagged(rng, tag), "last_name", &value]),
                    s(&["DEL", &tagged(rng, tag)]),
                    s(&["EXEC"]),
                ]
            }
        };
        out.push(group);
    }
    out
}

/// Until no key has a time to live left (expiry has deleted what the workload made volatile).
async fn until_expired(client: &mut ClusterClient) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.volatile_keys().await > 0 {
        assert!(Instant::now() < deadline, "keys still volatile after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

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

/// Writes `HSET person2:w<n> ...` for n = 1, 2, ... (each key once) until stopped, one command
/// at a time through the cluster's redirections; keys of the primary on the paused port are
/// skipped while it is paused.
struct Load {
    stop: Arc<AtomicBool>,
    paused: Arc<Mutex<Option<u16>>>,
    written: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    async fn start(cluster: &RedisCluster) -> Load {
        let mut client = cluster.client().await;
        let stop = Arc::new(AtomicBool::new(false));
        let paused: Arc<Mutex<Option<u16>>> = Arc::new(Mutex::new(None));
        let written = Arc::new(AtomicU64::new(0));
        let (stopping, pausing, counting) = (stop.clone(), paused.clone(), written.clone());
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while !stopping.load(Ordering::SeqCst) {
                n += 1;
                let key = format!("person2:w{n}");
                let skip = *pausing.lock().unwrap();
                if skip.is_some_and(|port| client.port_of(&key) == port) {
                    continue;
                }
                let value = format!("v{n}");
                client
                    .run(&["HSET", &key, "first_name", &value, "age", &n.to_string()])
                    .await;
                counting.fetch_add(1, Ordering::SeqCst);
            }
        });
        Load {
            stop,
            paused,
            written,
            task,
        }
    }

    /// Until `more` further keys are written.
    async fn until_written(&self, more: u64) {
        let target = self.written.load(Ordering::SeqCst) + more;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.written.load(Ordering::SeqCst) < target {
            assert!(Instant::now() < deadline, "the load stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("the load task");
        self.written.load(Ordering::SeqCst)
    }
}

/// Until a shard holding node `node_id` has a primary other than `old_port`; its port.
async fn until_promoted(cluster: &RedisCluster, node_id: &str, old_port: u16) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let topology = cluster.topology().await;
        let primary = topology
            .shards
            .iter()
            .filter(|s| s.has_node(node_id))
            .filter_map(|s| s.primary())
            .find(|p| p.port != old_port);
        if let Some(primary) = primary {
            return primary.port;
        }
        assert!(Instant::now() < deadline, "no replica promoted within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_and_automatic_failovers_under_load_are_followed_by_partial_resyncs() {
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
    // is seen to hold everything (`WAIT`), so that what the service received is on the replica
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
    tokio::time::sleep(Duration::from_millis(50)).await;
    let acked = cluster
        .node(victim.port)
        .client()
        .await
        .command(&["WAIT", "2", "5000"])
        .await
        .expect("wait");
    assert_eq!(
        writebehind::redis_client::frame_text(&acked),
        "2",
        "the replica (and the service) hold everything"
    );
    let index = cluster
        .nodes
        .iter()
        .position(|n| n.port == victim.port)
        .unwrap();
    let mut cluster = cluster;
    cluster.nodes[index].kill();
    let heir = second.nodes.iter().find(|n| !n.primary).unwrap().clone();
    let promoted = until_promoted(&cluster, &heir.id, victim.port).await;
    assert_eq!(promoted, heir.port);
    *load.paused.lock().unwrap() = None;
    load.until_written(500).await;
    let written = load.finish().await;

    let mut client = cluster.client().await;
    until_equal(&mut client, &database).await;
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
    assert_eq!(
        text.matches("full sync started").count(),
        3,
        "one full sync per shard, at the first start only"
    );
    assert!(
        text.matches("partial resync accepted").count() == 9,
        "each restart continued every shard: {}",
        text.lines()
            .filter(|l| l.contains("resync") || l.contains("full sync") || l.contains("starting"))
            .collect::<Vec<_>>()
            .join("\n")
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

/// Updates and deletes of `person2:k0` to `person2:k299` at random (through `MOVED` and `ASK`)
/// until stopped.
async fn churn(cluster: &RedisCluster, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let mut client = cluster.client().await;
    tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let key = format!("person2:k{}", rng.random_range(0..300));
            let value = format!("c{n}");
            match rng.random_range(0..10) {
                0..=5 => client.run(&["HSET", &key, "first_name", &value]).await,
                6..=7 => {
                    client
                        .run(&["HSET", &key, "age", &value, "last_name", "M"])
                        .await
                }
                _ => client.run(&["DEL", &key]).await,
            };
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_under_load_leaves_every_row_equal_to_the_shard_holding_its_key() {
    let cluster = RedisCluster::start(3, 1).await;
    let database = Database::maria().await;
    database.execute(PERSON_TABLE).await;
    let mut client = cluster.client().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    client.send_groups(&workload(&mut rng, 3000)).await;
    let (service, _dir) = start_service(&cluster, &database).await;
    until_equal(&mut client, &database).await;

    let stop = Arc::new(AtomicBool::new(false));
    let churning = churn(&cluster, stop.clone()).await;
    let load = Load::start(&cluster).await;
    let topology = cluster.topology().await;
    let port_of = |slot: u16| {
        topology
            .owner(slot)
            .and_then(|s| s.primary())
            .map(|n| n.port)
            .unwrap()
    };
    let (first, second, third) = (port_of(0), port_of(6000), port_of(12000));
    // Thousands of slots while both loads write: from the first shard to the second, then part
    // of those on to the third, and some of the third's back to the first.
    let mut moved = client.migrate_slots(0..2500, first, second).await;
    moved += client.migrate_slots(1000..1800, second, third).await;
    moved += client.migrate_slots(11000..12000, third, first).await;
    stop.store(true, Ordering::SeqCst);
    let churned = churning.await.expect("churn");
    let written = load.finish().await;
    assert!(moved > 300, "keys were migrated: {moved}");
    assert!(
        churned > 100 && written > 100,
        "both loads ran: {churned}, {written}"
    );

    until_expired(&mut client).await;
    until_equal(&mut client, &database).await;
    service.shutdown();
    service.wait().await.expect("stopped cleanly");
    database.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_added_and_a_shard_removed_under_load_are_followed() {
    let mut cluster = RedisCluster::start(3, 0).await;
    let database = Database::maria().await;
    database.execute(PERSON_TABLE).await;
    let mut client = cluster.client().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    client.send_groups(&workload(&mut rng, 3000)).await;
    let (service, _dir) = start_service(&cluster, &database).await;
    let stop = Arc::new(AtomicBool::new(false));
    let churning = churn(&cluster, stop.clone()).await;

    // Added: a new primary joins and takes slots from the first shard.
    let added = support::cluster::cluster_node();
    cluster.meet(&added).await;
    cluster.nodes.push(added);
    cluster.until_stable(4, 1).await;
    let until_shards = async |count: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while service.shards().len() != count {
            assert!(
                Instant::now() < deadline,
                "{} shards followed, not {count}",
                service.shards().len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    until_shards(4).await;
    let topology = cluster.topology().await;
    let port_of = |slot: u16| {
        topology
            .owner(slot)
            .and_then(|s| s.primary())
            .map(|n| n.port)
            .unwrap()
    };
    let (first, third) = (port_of(0), port_of(12000));
    let new_port = cluster.nodes[3].port;
    let moved_in = client.migrate_slots(0..1500, first, new_port).await;
    assert!(moved_in > 20, "keys moved to the new shard: {moved_in}");

    // Removed: the third shard's slots all go to the new one, then it is forgotten and stopped.
    let third_shard = topology.owner(12000).unwrap().clone();
    let third_id = third_shard.primary().unwrap().id.clone();
    for &(from, to) in &third_shard.slots {
        client.migrate_slots(from..to + 1, third, new_port).await;
    }
    for node in cluster.nodes.iter().filter(|n| n.port != third) {
        let reply = node
            .client()
            .await
            .command(&["CLUSTER", "FORGET", &third_id])
            .await
            .expect("forget");
        assert_eq!(writebehind::redis_client::frame_text(&reply), "OK");
    }
    let index = cluster.nodes.iter().position(|n| n.port == third).unwrap();
    cluster.nodes[index].kill();
    cluster.nodes.remove(index);
    client.refresh().await;
    until_shards(3).await;
    assert!(
        service.shards().iter().all(|s| s.id != third_id),
        "the removed shard's pipeline is retired"
    );
    stop.store(true, Ordering::SeqCst);
    churning.await.expect("churn");
    until_expired(&mut client).await;
    until_equal(&mut client, &database).await;
    service.shutdown();
    service.wait().await.expect("stopped cleanly");
    database.drop_database().await;
}

/// The first entry of ack stream `stream` (routed by its slot), waited for up to 30 s.
async fn ack_of(client: &mut ClusterClient, stream: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = client
            .run_for(stream, &["XRANGE", stream, "-", "+", "COUNT", "1"])
            .await;
        if let redis_protocol::resp2::types::BytesFrame::Array(entries) = reply {
            if let Some(redis_protocol::resp2::types::BytesFrame::Array(entry)) = entries.first() {
                if let Some(redis_protocol::resp2::types::BytesFrame::Array(fields)) = entry.get(1)
                {
                    return fields
                        .iter()
                        .map(writebehind::redis_client::frame_text)
                        .collect();
                }
            }
        }
        assert!(Instant::now() < deadline, "no ack on {stream} within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn op_field_scenarios_and_acks_on_keys_of_every_shard_and_with_hash_tags() {
    let cluster = RedisCluster::start(3, 0).await;
    let database = Database::maria().await;
    database.execute(PERSON_TABLE).await;
    let dir = tempfile::tempdir().expect("dir");
    let text = config_text(&cluster, &database.url(), &dir.path().join("buffer"))
        .replace("enabled = false", "enabled = true");
    let config = Config::parse(&text, &|_| None).expect("config");
    let service = ClusterService::start(&config, ServiceOptions::default())
        .await
        .expect("the cluster service starts");
    let mut client = cluster.client().await;
    let done = vec!["status".to_string(), "done".to_string()];
    // Keys on every shard; two with a hash tag of their own, whose ack streams
    // (`{person2:{g}x1}u`: tag `person2:{g`) may be in another shard than the key.
    let mut per_shard: BTreeMap<u16, usize> = BTreeMap::new();
    let mut keys: Vec<String> = Vec::new();
    for i in 0..200 {
        let key = format!("person2:k{i}");
        let count = per_shard.entry(client.port_of(&key)).or_default();
        if *count < 2 {
            *count += 1;
            keys.push(key);
        }
    }
    keys.extend(["person2:{g}x1".to_string(), "person2:{g}x2".to_string()]);
    let shards: std::collections::BTreeSet<u16> = keys.iter().map(|k| client.port_of(k)).collect();
    assert_eq!(shards.len(), 3, "keys on every shard");
    let streams_elsewhere = keys
        .iter()
        .filter(|k| client.port_of(&format!("{{{k}}}u")) != client.port_of(k))
        .count();
    assert!(
        streams_elsewhere > 0,
        "an ack stream in another shard than its key"
    );
    let rows =
        async |database: &Database| database.rows("person1", &["first", "last", "age"]).await;
    for (i, key) in keys.iter().enumerate() {
        let id = key.strip_prefix("person2:").unwrap();
        let stream = |n: u32| format!("{{{key}}}u{i}-{n}");
        // `=`: Redis keeps the data without `#`, the row is written, then the ack.
        client
            .run(&["HSET", key, "first_name", "Ann", "#", &format!("=u{i}-1")])
            .await;
        assert_eq!(ack_of(&mut client, &stream(1)).await, done, "{key} =");
        assert_eq!(
            rows(&database).await.get(id).cloned(),
            Some(vec![Some("Ann".into()), None, None])
        );
        assert_eq!(
            client.run(&["HEXISTS", key, "#"]).await,
            redis_protocol::resp2::types::BytesFrame::Integer(0)
        );
        // `+`: Redis only.
        client
            .run(&["HSET", key, "last_name", "Lee", "#", &format!("+u{i}-2")])
            .await;
        assert_eq!(ack_of(&mut client, &stream(2)).await, done, "{key} +");
        // The atomic entry point, in a cluster too.
        let reply = client
            .run_for(
                key,
                &[
                    "FCALL",
                    "writebehind_hset",
                    "1",
                    key,
                    "age",
                    "30",
                    "#",
                    &format!("=u{i}-3"),
                ],
            )
            .await;
        assert!(
            !matches!(reply, redis_protocol::resp2::types::BytesFrame::Error(_)),
            "{reply:?}"
        );
        assert_eq!(
            ack_of(&mut client, &stream(3)).await,
            done,
            "{key} writebehind_hset"
        );
        assert_eq!(
            rows(&database).await.get(id).cloned(),
            Some(vec![
                Some("Ann".into()),
                Some("Lee".into()),
                Some("30".into())
            ]),
            "{key}: the + kept out of the row until the = after it"
        );
        // `-` on half of them (key gone, row kept), `~` on the others (both gone).
        let op = if i % 2 == 0 { "-" } else { "~" };
        client
            .run(&["HSET", key, "x", "1", "#", &format!("{op}u{i}-4")])
            .await;
        assert_eq!(ack_of(&mut client, &stream(4)).await, done, "{key} {op}");
        assert_eq!(
            client.run(&["EXISTS", key]).await,
            redis_protocol::resp2::types::BytesFrame::Integer(0)
        );
        let row = rows(&database).await.get(id).cloned();
        assert_eq!(row.is_some(), op == "-", "{key} {op}: {row:?}");
    }
    // A key with `}` and no hash tag has no tag key in its slot: the atomic entry point refuses.
    let refused = client
        .run_for(
            "person2:a}b",
            &["FCALL", "writebehind_hset", "1", "person2:a}b", "f", "v"],
        )
        .await;
    assert!(
        matches!(refused, redis_protocol::resp2::types::BytesFrame::Error(ref e) if e.contains("hash tag")),
        "{refused:?}"
    );
    // No tag key is left behind anywhere.
    let left = client.hashes("__writebehind__").await;
    assert!(left.is_empty(), "{left:?}");
    service.shutdown();
    service.wait().await.expect("stopped cleanly");
    database.drop_database().await;
}
