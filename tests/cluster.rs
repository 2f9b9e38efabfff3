//! Redis Cluster end to end: a local cluster of 3 primaries and 3 replicas, the service
//! following every shard (`[source] cluster`), MariaDB as the backend.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use support::cluster::{ClusterClient, RedisCluster};
use support::sink::{Database, PERSON_TABLE};
use writebehind::cluster::ClusterService;
use writebehind::config::Config;
use writebehind::service::ServiceOptions;

/// The configuration: every node a seed, `person2:*` hashes into `person1`, expiry deletes.
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
