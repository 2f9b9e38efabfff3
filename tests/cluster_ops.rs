//! Redis Cluster: the `#` op field and acknowledgements on keys of every shard.

mod support;

use std::collections::BTreeMap;

use support::cluster::RedisCluster;
use support::cluster_load::*;
use support::sink::{Database, PERSON_TABLE};
use writebehind::cluster::ClusterService;
use writebehind::config::Config;
use writebehind::service::ServiceOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn op_field_scenarios_and_acks_on_keys_of_every_shard_and_with_hash_tags() {
    let cluster = RedisCluster::start(3, 0).await;
    let database = Database::maria().await;
    database.execute(PERSON_TABLE).await;
    let dir = tempfile::tempdir().expect("dir");
    let admin = support::free_port();
    let text = config_text(&cluster, &database.url(), &dir.path().join("buffer"))
        .replace("enabled = false", "enabled = true")
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{admin}\""));
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

    // The admin listener serves every shard.
    let get = |path: &str| support::service::get(admin, path).expect("the admin listener answers");
    let (code, body) = get("/status");
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let shards = status["shards"].as_array().expect("a status per shard");
    assert_eq!(shards.len(), 3, "{body}");
    let ids: Vec<String> = shards
        .iter()
        .map(|s| s["shard"].as_str().expect("the shard's id").to_string())
        .collect();
    for shard in shards {
        assert_eq!(shard["link"], "up", "{shard}");
    }
    assert_eq!(get("/ready").0, 200);
    let (_, metrics) = get("/metrics");
    for id in &ids {
        let labelled = format!("writebehind_link_up{{shard=\"{id}\"}} 1");
        assert!(
            metrics.contains(&labelled),
            "{labelled} in /metrics: {}",
            metrics
                .lines()
                .filter(|l| l.contains("link_up"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        assert!(
            metrics.contains(&format!("backend=\"db@{id}\"")),
            "the shard's runner in /metrics"
        );
    }
    assert_eq!(get("/dlq").0, 400, "/dlq names its shard in a cluster");
    assert_eq!(get(&format!("/dlq?shard={}", ids[0])).0, 200);
    service.shutdown();
    service.wait().await.expect("stopped cleanly");
    database.drop_database().await;
}

/// `[source] cluster` seeds reached with TLS (`rediss://`, `[source.tls]`): every shard's link
/// goes to its primary's TLS port as `CLUSTER SHARDS` names it (`tls-port`), with the seeds'
/// CA and server name; the table ends equal to the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_reached_over_tls_is_followed_through_every_primarys_tls_port() {
    // The service's log on a failure.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("writebehind=info")
        .with_test_writer()
        .try_init();
    let certs = support::tls::TestCerts::generate();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let Some(node) = support::cluster::tls_cluster_node(&certs) else {
            return;
        };
        nodes.push(node);
    }
    let tls_ports: Vec<u16> = nodes.iter().map(|(_, port)| *port).collect();
    let cluster = RedisCluster::form(nodes.into_iter().map(|(n, _)| n).collect(), 3, 0).await;
    let database = Database::maria().await;
    database.execute(PERSON_TABLE).await;
    let dir = tempfile::tempdir().expect("dir");
    // Only the TLS ports, by address (the certificate names `localhost`: `server_name`).
    let seeds: Vec<String> = tls_ports
        .iter()
        .map(|p| format!("\"rediss://127.0.0.1:{p}\""))
        .collect();
    let text = config_text(&cluster, &database.url(), &dir.path().join("buffer")).replace(
        &format!("cluster = [{}]", cluster.seeds()),
        &format!(
            "cluster = [{}]\n[source.tls]\nca_file = \"{}\"\nserver_name = \"localhost\"",
            seeds.join(", "),
            certs.ca.display()
        ),
    );
    assert!(text.contains("rediss://"), "{text}");
    let config = Config::parse(&text, &|_| None).expect("config");
    let service = ClusterService::start(&config, ServiceOptions::default())
        .await
        .expect("the cluster service starts");
    let mut client = cluster.client().await;
    for n in 0..300 {
        let key = format!("person2:t{n}");
        client
            .run(&["HSET", &key, "first_name", &format!("f{n}"), "age", "7"])
            .await;
        if n % 7 == 0 {
            client.run(&["DEL", &key]).await;
        }
    }
    until_equal_explained(&mut client, &database, || shards_status(&service)).await;
    assert_eq!(database.rows("person1", &["first"]).await.len(), 300 - 43);
    let shards = service.shards();
    assert_eq!(shards.len(), 3, "{}", shards_status(&service));
    for shard in &shards {
        let primary = shard.health.primary().expect("a primary");
        assert!(
            tls_ports.contains(&primary.port) && primary.tls.is_some(),
            "{} is followed over TLS at a TLS port",
            primary.address()
        );
    }
    service.shutdown();
    service.wait().await.expect("stopped cleanly");
    database.drop_database().await;
}
