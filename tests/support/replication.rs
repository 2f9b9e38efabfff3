//! Helpers of the replication tests (tests/replication.rs, tests/replication_snapshot.rs): a
//! replicator on a test server, whole full syncs and stream events read as a consumer would.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;
use writebehind::position::{ReplId, ReplOffset, StreamPosition};
use writebehind::redis_client::{info_field, RedisClient};
use writebehind::replication::rdb::{Checksum, RdbEvent, ValueKind};
use writebehind::replication::stream::{Command, StreamEvent};
use writebehind::replication::{Framing, ReplicationEvent, Replicator, ReplicatorOptions};

use super::RedisServer;

pub fn options(server: &RedisServer) -> ReplicatorOptions {
    let mut options = ReplicatorOptions::new(server.endpoint());
    options.timeout = Duration::from_secs(20);
    options.backoff_min = Duration::from_millis(10);
    options
}

pub async fn next(replicator: &mut Replicator) -> ReplicationEvent {
    match tokio::time::timeout(Duration::from_secs(30), replicator.next()).await {
        Ok(Ok(event)) => event,
        Ok(Err(e)) => panic!("fatal replication error: {e}"),
        Err(_) => panic!("no replication event within 30 s"),
    }
}

#[derive(Debug, Default)]
pub struct SnapshotKey {
    pub kind: Option<ValueKind>,
    pub expire_at_ms: Option<i64>,
    pub fields: BTreeMap<Bytes, Bytes>,
}

#[derive(Debug)]
pub struct FullSync {
    pub replid: ReplId,
    pub offset: ReplOffset,
    pub framing: Framing,
    pub keys: BTreeMap<(u64, Bytes), SnapshotKey>,
    pub aux: BTreeMap<Bytes, Bytes>,
    pub functions: Vec<Bytes>,
    pub checksum: Option<Checksum>,
    pub position: StreamPosition,
}

/// Reads a whole full sync, acknowledging it like a consumer that stored it.
pub async fn full_sync(replicator: &mut Replicator) -> FullSync {
    let (replid, offset, framing) = match next(replicator).await {
        ReplicationEvent::FullSyncStarted {
            replid,
            offset,
            framing,
        } => (replid, offset, framing),
        other => panic!("expected a full sync, got {other:?}"),
    };
    let mut keys = BTreeMap::new();
    let mut aux = BTreeMap::new();
    let mut functions = Vec::new();
    let mut checksum = None;
    let mut current: Option<(u64, Bytes, SnapshotKey)> = None;
    loop {
        match next(replicator).await {
            ReplicationEvent::Snapshot(event) => match event {
                RdbEvent::Aux { key, value } => {
                    aux.insert(key, value);
                }
                RdbEvent::Function { code } => functions.push(code),
                RdbEvent::KeyStart {
                    db,
                    key,
                    kind,
                    expire_at_ms,
                    ..
                } => {
                    current = Some((
                        db,
                        key,
                        SnapshotKey {
                            kind: Some(kind),
                            expire_at_ms,
                            fields: BTreeMap::new(),
                        },
                    ))
                }
                RdbEvent::HashField(field) => {
                    current
                        .as_mut()
                        .expect("a key")
                        .2
                        .fields
                        .insert(field.field, field.value);
                }
                RdbEvent::KeyEnd { .. } => {
                    let (db, key, value) = current.take().expect("a key");
                    keys.insert((db, key), value);
                }
                RdbEvent::End { checksum: c } => checksum = Some(c),
                _ => {}
            },
            ReplicationEvent::FullSyncCompleted { position, .. } => {
                replicator.report_durable(position.offset);
                return FullSync {
                    replid,
                    offset,
                    framing,
                    keys,
                    aux,
                    functions,
                    checksum,
                    position,
                };
            }
            other => panic!("unexpected event during the snapshot: {other:?}"),
        }
    }
}

/// Reads stream events (acknowledging each) until `stop` says so.
pub async fn stream_until(
    replicator: &mut Replicator,
    mut stop: impl FnMut(&StreamEvent) -> bool,
) -> Vec<StreamEvent> {
    let mut events = Vec::new();
    loop {
        match next(replicator).await {
            ReplicationEvent::Stream(event) => {
                replicator.report_durable(event.end());
                let done = stop(&event);
                events.push(event);
                if done {
                    return events;
                }
            }
            other => panic!("unexpected event in the stream: {other:?}"),
        }
    }
}

pub fn commands(events: &[StreamEvent]) -> Vec<Command> {
    events
        .iter()
        .flat_map(|e| match e {
            StreamEvent::Command(c) => vec![c.clone()],
            StreamEvent::TransactionPart { commands, .. }
            | StreamEvent::Transaction { commands, .. } => commands.clone(),
            _ => vec![],
        })
        .collect()
}

pub async fn run(client: &mut RedisClient, args: &[&str]) -> BytesFrame {
    client
        .command(args)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

pub async fn master_offset(client: &mut RedisClient) -> u64 {
    let info = client.info("replication").await.expect("info");
    info_field(&info, "master_repl_offset")
        .and_then(|v| v.parse().ok())
        .expect("master_repl_offset")
}

pub async fn hgetall(client: &mut RedisClient, db: u64, key: &[u8]) -> BTreeMap<Bytes, Bytes> {
    run(client, &["SELECT", &db.to_string()]).await;
    let reply = client
        .command(&[&b"HGETALL"[..], key])
        .await
        .expect("hgetall");
    run(client, &["SELECT", "0"]).await;
    let BytesFrame::Array(items) = reply else {
        panic!("HGETALL reply {reply:?}")
    };
    items
        .chunks(2)
        .map(|pair| match (&pair[0], &pair[1]) {
            (BytesFrame::BulkString(f), BytesFrame::BulkString(v)) => (f.clone(), v.clone()),
            other => panic!("{other:?}"),
        })
        .collect()
}
