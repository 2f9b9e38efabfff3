//! The cluster tests' workloads and checks: the service's configuration, loads that write
//! through the cluster's redirections, and the wait until the table equals every shard's
//! hashes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use writebehind::cluster::ClusterService;
use writebehind::config::Config;
use writebehind::service::ServiceOptions;

use super::cluster::{ClusterClient, RedisCluster};
use super::sink::Database;

/// The configuration: every node a seed, `person2:*` hashes into `person1`, expiry deletes;
/// without the op field (the tests of `#` switch it on).
pub fn config_text(cluster: &RedisCluster, db_url: &str, buffer: &std::path::Path) -> String {
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

pub async fn start_service(
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
pub async fn expected_rows(client: &mut ClusterClient) -> BTreeMap<String, Vec<Option<String>>> {
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
pub async fn until_equal(client: &mut ClusterClient, database: &Database) {
    until_equal_explained(client, database, String::new).await
}

/// Each shard's status (positions, link, backends), for a failure's message.
pub fn shards_status(service: &ClusterService) -> String {
    service
        .shards()
        .iter()
        .map(|s| format!("{}: {}", s.id, s.health.status(&Default::default())))
        .collect::<Vec<_>>()
        .join("\n")
}

/// [`until_equal`], with `explain()` in the failure's message.
pub async fn until_equal_explained(
    client: &mut ClusterClient,
    database: &Database,
    explain: impl Fn() -> String,
) {
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
                "the table differs from the cluster after 60 s: {} rows against {} hashes; missing {missing:?}, extra {extra:?}, different {differ:?}\n{}",
                rows.len(),
                expected.len(),
                explain()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A random workload over every slot: hash writes, deletes, renames within a hash tag,
/// transactions on one slot, expiry. Groups of commands, each on one slot.
pub fn workload(rng: &mut rand::rngs::StdRng, groups: usize) -> Vec<Vec<Vec<String>>> {
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
pub async fn until_expired(client: &mut ClusterClient) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.volatile_keys().await > 0 {
        assert!(Instant::now() < deadline, "keys still volatile after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes `HSET person2:w<n> ...` for n = 1, 2, ... (each key once) until stopped, one command
/// at a time through the cluster's redirections; keys of the primary on the paused port are
/// skipped while it is paused.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub paused: Arc<Mutex<Option<u16>>>,
    written: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    pub async fn start(cluster: &RedisCluster) -> Load {
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
                // While paused, also the keys whose slot has no online primary (the paused
                // primary was killed and is not replaced yet).
                let skip = *pausing.lock().unwrap();
                if skip.is_some_and(|port| client.try_port_of(&key).is_none_or(|p| p == port)) {
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
    pub async fn until_written(&self, more: u64) {
        let target = self.written.load(Ordering::SeqCst) + more;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.written.load(Ordering::SeqCst) < target {
            assert!(Instant::now() < deadline, "the load stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("the load task");
        self.written.load(Ordering::SeqCst)
    }
}

/// Until a shard holding node `node_id` has a primary other than `old_port`; its port.
pub async fn until_promoted(cluster: &RedisCluster, node_id: &str, old_port: u16) -> u16 {
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

/// Updates and deletes of `person2:k0` to `person2:k299` at random (through `MOVED` and `ASK`)
/// until stopped.
pub async fn churn(cluster: &RedisCluster, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
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

/// The first entry of ack stream `stream` (routed by its slot), waited for up to 30 s.
pub async fn ack_of(client: &mut ClusterClient, stream: &str) -> Vec<String> {
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

/// The replication offset a node reports (`master_repl_offset`, the primary's or, on a replica,
/// what it has received).
async fn replication_offset(cluster: &RedisCluster, port: u16) -> u64 {
    let info = cluster
        .node(port)
        .client()
        .await
        .info("replication")
        .await
        .expect("INFO replication");
    writebehind::redis_client::info_field(&info, "master_repl_offset")
        .and_then(|o| o.parse().ok())
        .expect("master_repl_offset")
}

/// Until the replica on `replica` holds everything the primary on `primary` has written (the
/// primary's offset read twice alike around the replica's): nothing writes to that primary.
pub async fn until_caught_up(cluster: &RedisCluster, primary: u16, replica: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = replication_offset(cluster, primary).await;
        let received = replication_offset(cluster, replica).await;
        let after = replication_offset(cluster, primary).await;
        if received >= after && before == after {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not catch up: {received} of {after}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
