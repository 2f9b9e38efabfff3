//! A Valkey primary with dual-channel replication enabled (`dual-channel-replication-enabled
//! yes`, Valkey 8+) serves the service's replica link: the option lets a replica that asks for
//! it (`REPLCONF capa dual-channel`) take the snapshot on a second connection; one that does not
//! ask, as ours, gets the usual full sync and stream. The server matrix runs this on Valkey
//! 8.1.8 (`.ci/run`); on a Redis server, which has no such option, it says so and checks
//! nothing else.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::RedisServer;
use writebehind::redis_client::info_field;
use writebehind::replication::rdb::RdbEvent;
use writebehind::replication::stream::StreamEvent;
use writebehind::replication::{ReplicationEvent, Replicator, ReplicatorOptions};

async fn next(replicator: &mut Replicator) -> ReplicationEvent {
    match tokio::time::timeout(Duration::from_secs(30), replicator.next()).await {
        Ok(Ok(event)) => event,
        Ok(Err(e)) => panic!("fatal replication error: {e}"),
        Err(_) => panic!("no replication event within 30 s"),
    }
}

#[tokio::test]
async fn a_primary_with_dual_channel_replication_serves_the_replica() {
    let probe = RedisServer::start(&[]);
    let info = probe.client().await.info("server").await.expect("info");
    if info_field(&info, "valkey_version").is_none() {
        eprintln!(
            "not Valkey ({}): no dual-channel option to test",
            support::server_program()
        );
        return;
    }
    drop(probe);
    let server = RedisServer::start(&["--dual-channel-replication-enabled", "yes"]);
    let mut client = server.client().await;
    for i in 0..1000 {
        let key = format!("person2:{i}");
        client
            .command(&["HSET", &key, "first_name", "Ann"])
            .await
            .expect("HSET");
    }
    let mut options = ReplicatorOptions::new(server.endpoint());
    options.timeout = Duration::from_secs(20);
    let mut replicator = Replicator::new(options, None);

    // The snapshot on the one link: every hash, whole.
    let mut hashes = 0;
    let position = loop {
        match next(&mut replicator).await {
            ReplicationEvent::Snapshot(RdbEvent::HashField(field)) => {
                assert_eq!(
                    (&field.field[..], &field.value[..]),
                    (&b"first_name"[..], &b"Ann"[..])
                );
                hashes += 1;
            }
            ReplicationEvent::FullSyncCompleted { position, .. } => break position,
            _ => {}
        }
    };
    assert_eq!(hashes, 1000);
    replicator.report_durable(position.offset);

    // Then the stream, from where the snapshot ended.
    client
        .command(&["HSET", "person2:new", "first_name", "Bob"])
        .await
        .expect("HSET");
    loop {
        if let ReplicationEvent::Stream(event) = next(&mut replicator).await {
            replicator.report_durable(event.end());
            if let StreamEvent::Command(command) = &event {
                if command.args.get(1) == Some(&Bytes::from_static(b"person2:new")) {
                    assert_eq!(command.name(), "HSET");
                    break;
                }
            }
        }
    }
    let info = client.info("replication").await.expect("info");
    assert!(info.contains("state=online"), "{info}");
}
