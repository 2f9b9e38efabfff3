//! Redis Cluster: resharding under load, a shard added and one removed.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use support::cluster::RedisCluster;
use support::cluster_load::*;
use support::sink::{Database, PERSON_TABLE};

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
    let (first, second, third) = (
        cluster.primary_port(0).await,
        cluster.primary_port(6000).await,
        cluster.primary_port(12000).await,
    );
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
    let (first, third) = (
        cluster.primary_port(0).await,
        cluster.primary_port(12000).await,
    );
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
