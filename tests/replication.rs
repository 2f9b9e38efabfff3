//! The replication client against real `redis-server` processes.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;
use support::RedisServer;
use writebehind::position::{ReplId, ReplOffset, StreamPosition};
use writebehind::redis_client::{frame_text, info_field, RedisClient};
use writebehind::replication::rdb::{decode_dump_payload, Checksum, RdbError, RdbEvent, ValueKind};
use writebehind::replication::stream::{Command, StreamEvent};
use writebehind::replication::{
    Framing, LinkError, ReplicationEvent, Replicator, ReplicatorOptions,
};

fn options(server: &RedisServer) -> ReplicatorOptions {
    let mut options = ReplicatorOptions::new(server.endpoint());
    options.timeout = Duration::from_secs(20);
    options.backoff_min = Duration::from_millis(10);
    options
}

async fn next(replicator: &mut Replicator) -> ReplicationEvent {
    match tokio::time::timeout(Duration::from_secs(30), replicator.next()).await {
        Ok(Ok(event)) => event,
        Ok(Err(e)) => panic!("fatal replication error: {e}"),
        Err(_) => panic!("no replication event within 30 s"),
    }
}

#[derive(Debug, Default)]
struct SnapshotKey {
    kind: Option<ValueKind>,
    expire_at_ms: Option<i64>,
    fields: BTreeMap<Bytes, Bytes>,
}

#[derive(Debug)]
struct FullSync {
    replid: ReplId,
    offset: ReplOffset,
    framing: Framing,
    keys: BTreeMap<(u64, Bytes), SnapshotKey>,
    aux: BTreeMap<Bytes, Bytes>,
    functions: Vec<Bytes>,
    checksum: Option<Checksum>,
    position: StreamPosition,
}

/// Reads a whole full sync, acknowledging it like a consumer that stored it.
async fn full_sync(replicator: &mut Replicator) -> FullSync {
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
async fn stream_until(
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

fn commands(events: &[StreamEvent]) -> Vec<Command> {
    events
        .iter()
        .flat_map(|e| match e {
            StreamEvent::Command(c) => vec![c.clone()],
            StreamEvent::Transaction { commands, .. } => commands.clone(),
            _ => vec![],
        })
        .collect()
}

async fn run(client: &mut RedisClient, args: &[&str]) -> BytesFrame {
    client
        .command(args)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

async fn master_offset(client: &mut RedisClient) -> u64 {
    let info = client.info("replication").await.expect("info");
    info_field(&info, "master_repl_offset")
        .and_then(|v| v.parse().ok())
        .expect("master_repl_offset")
}

async fn hgetall(client: &mut RedisClient, db: u64, key: &[u8]) -> BTreeMap<Bytes, Bytes> {
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

/// A dataset with every value type and every hash encoding Redis 7.0 writes.
async fn populate(client: &mut RedisClient) {
    run(client, &["SET", "str", "hello"]).await;
    run(client, &["SET", "int", "12345"]).await;
    run(client, &["SET", "compressible", &"abc".repeat(10_000)]).await;
    run(client, &["RPUSH", "list", "a", "b", "c"]).await;
    let many: Vec<String> = (0..1000).map(|i| format!("item-{i}")).collect();
    let mut args = vec!["RPUSH", "biglist"];
    args.extend(many.iter().map(String::as_str));
    run(client, &args).await;
    run(client, &["SADD", "intset", "1", "2", "3"]).await;
    run(client, &["SADD", "smallset", "a", "b"]).await;
    let mut args = vec!["SADD", "bigset"];
    args.extend(many.iter().map(String::as_str));
    run(client, &args).await;
    run(client, &["ZADD", "zs", "1", "a", "2.5", "b"]).await;
    let scored: Vec<String> = (0..300)
        .flat_map(|i| [i.to_string(), format!("m{i}")])
        .collect();
    let mut args = vec!["ZADD", "bigzs"];
    args.extend(scored.iter().map(String::as_str));
    run(client, &args).await;
    // Hashes: listpack with integer values, hashtable by count, hashtable by value length.
    run(
        client,
        &[
            "HSET",
            "person2:1",
            "first_name",
            "John",
            "last_name",
            "Doe",
            "age",
            "42",
        ],
    )
    .await;
    run(
        client,
        &[
            "HSET",
            "numbers",
            "neg",
            "-5",
            "big",
            "9223372036854775807",
            "small",
            "7",
            "float",
            "3.14",
            "zero",
            "0",
        ],
    )
    .await;
    let fields: Vec<String> = (0..600)
        .flat_map(|i| [format!("f{i}"), i.to_string()])
        .collect();
    let mut args = vec!["HSET", "bighash"];
    args.extend(fields.iter().map(String::as_str));
    run(client, &args).await;
    run(
        client,
        &["HSET", "longvalue", "text", &"x".repeat(200), "n", "1"],
    )
    .await;
    run(client, &["HSET", "binary", "f\u{0}\u{1}", "\u{ff}\u{fe}"]).await;
    run(client, &["PEXPIRE", "person2:1", "100000000"]).await;
    run(client, &["XADD", "stream", "1-1", "a", "1"]).await;
    run(client, &["XGROUP", "CREATE", "stream", "g", "0"]).await;
    run(
        client,
        &[
            "XREADGROUP",
            "GROUP",
            "g",
            "c",
            "COUNT",
            "1",
            "STREAMS",
            "stream",
            ">",
        ],
    )
    .await;
    run(
        client,
        &[
            "FUNCTION",
            "LOAD",
            "#!lua name=testlib\nredis.register_function('f', function(keys, args) return 1 end)",
        ],
    )
    .await;
    run(client, &["SELECT", "3"]).await;
    run(client, &["HSET", "db3hash", "x", "1"]).await;
    run(client, &["SELECT", "0"]).await;
}

async fn check_full_sync(diskless: &str) {
    let server = RedisServer::start(&[
        "--repl-diskless-sync",
        diskless,
        "--repl-diskless-sync-delay",
        "0",
    ]);
    let mut client = server.client().await;
    populate(&mut client).await;
    let mut replicator = Replicator::new(options(&server), None);
    let sync = full_sync(&mut replicator).await;

    let info = client.info("replication").await.expect("info");
    assert_eq!(
        Some(sync.replid.as_str()),
        info_field(&info, "master_replid")
    );
    match (diskless, sync.framing) {
        ("yes", Framing::Diskless) | ("no", Framing::Length(_)) => {}
        other => panic!("framing {other:?}"),
    }
    assert!(
        matches!(sync.checksum, Some(Checksum::Verified(_))),
        "{:?}",
        sync.checksum
    );
    assert_eq!(
        sync.aux.get(&Bytes::from("repl-offset")),
        Some(&Bytes::from(sync.offset.0.to_string()))
    );
    assert_eq!(sync.position.offset, sync.offset);
    assert_eq!(sync.functions.len(), 1);
    assert!(sync.functions[0].starts_with(b"#!lua name=testlib"));

    let expected_kinds = [
        ("str", ValueKind::String),
        ("int", ValueKind::String),
        ("compressible", ValueKind::String),
        ("list", ValueKind::List),
        ("biglist", ValueKind::List),
        ("intset", ValueKind::Set),
        ("smallset", ValueKind::Set),
        ("bigset", ValueKind::Set),
        ("zs", ValueKind::SortedSet),
        ("bigzs", ValueKind::SortedSet),
        ("person2:1", ValueKind::Hash),
        ("numbers", ValueKind::Hash),
        ("bighash", ValueKind::Hash),
        ("longvalue", ValueKind::Hash),
        ("binary", ValueKind::Hash),
        ("stream", ValueKind::Stream),
    ];
    assert_eq!(
        sync.keys.len(),
        expected_kinds.len() + 1,
        "{:?}",
        sync.keys.keys().collect::<Vec<_>>()
    );
    for (name, kind) in expected_kinds {
        let key = sync
            .keys
            .get(&(0, Bytes::from(name)))
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(key.kind, Some(kind), "{name}");
    }
    for ((db, name), key) in &sync.keys {
        if key.kind == Some(ValueKind::Hash) {
            assert_eq!(
                key.fields,
                hgetall(&mut client, *db, name).await,
                "{name:?}"
            );
        }
    }
    assert_eq!(
        sync.keys[&(3, Bytes::from("db3hash"))].kind,
        Some(ValueKind::Hash)
    );
    let expire_time = run(&mut client, &["PEXPIRETIME", "person2:1"]).await;
    assert_eq!(
        sync.keys[&(0, Bytes::from("person2:1"))].expire_at_ms,
        Some(frame_text(&expire_time).parse().expect("ms"))
    );
    // The encodings really differ, so every decoder path ran. Redis 7.2 (and Valkey) keep a
    // list of this size as one listpack; 7.0 as a quicklist.
    let info = frame_text(&run(&mut client, &["INFO", "server"]).await);
    let biglist = match support::redis_version(&info) {
        (7, 0 | 1) => "quicklist",
        _ => "listpack",
    };
    for (key, encoding) in [
        ("person2:1", "listpack"),
        ("bighash", "hashtable"),
        ("longvalue", "hashtable"),
        ("biglist", biglist),
        ("intset", "intset"),
    ] {
        assert_eq!(
            frame_text(&run(&mut client, &["OBJECT", "ENCODING", key]).await),
            encoding,
            "{key}"
        );
    }

    // The stream starts right after the snapshot: a write arrives with the right offset.
    run(&mut client, &["HSET", "after", "f", "v"]).await;
    let target = master_offset(&mut client).await;
    let events = stream_until(&mut replicator, |e| e.end().0 >= target).await;
    assert_eq!(
        events.last().map(StreamEvent::end),
        Some(ReplOffset(target))
    );
    assert!(commands(&events)
        .iter()
        .any(|c| c.is("HSET") && c.args[1].as_ref() == b"after"));
}

#[tokio::test]
async fn full_sync_diskless_decodes_every_type_and_encoding() {
    check_full_sync("yes").await;
}

#[tokio::test]
async fn full_sync_disk_based_decodes_every_type_and_encoding() {
    check_full_sync("no").await;
}

#[tokio::test]
async fn event_offsets_end_exactly_at_the_primary_offset() {
    let server = RedisServer::start(&["--repl-ping-replica-period", "1"]);
    let mut client = server.client().await;
    let mut replicator = Replicator::new(options(&server), None);
    full_sync(&mut replicator).await;

    run(&mut client, &["HSET", "h", "a", "1"]).await;
    run(&mut client, &["HINCRBYFLOAT", "h", "f", "1.5"]).await;
    run(&mut client, &["HINCRBY", "h", "n", "3"]).await;
    run(&mut client, &["EXPIRE", "h", "1000"]).await;
    run(&mut client, &["SET", "s", "v", "EX", "100"]).await;
    run(&mut client, &["MULTI"]).await;
    run(&mut client, &["HSET", "t1", "a", "1"]).await;
    run(&mut client, &["SELECT", "2"]).await;
    run(&mut client, &["HSET", "t2", "b", "2"]).await;
    run(&mut client, &["EXEC"]).await;
    run(&mut client, &["SELECT", "0"]).await;
    run(
        &mut client,
        &[
            "EVAL",
            "redis.call('HSET', KEYS[1], 'x', 1); redis.call('HSET', KEYS[2], 'y', 2)",
            "2",
            "e1",
            "e2",
        ],
    )
    .await;
    run(&mut client, &["SET", "large", &"z".repeat(1_500_000)]).await;
    run(&mut client, &["PUBLISH", "channel", "message"]).await;
    run(&mut client, &["DEL", "h", "missing"]).await;
    let target = master_offset(&mut client).await;

    let events = stream_until(&mut replicator, |e| e.end().0 >= target).await;
    assert!(
        events.iter().any(|e| e.end().0 == target),
        "no event ends at master_repl_offset {target}"
    );
    for pair in events.windows(2) {
        assert!(
            pair[0].end() < pair[1].end(),
            "offsets must grow: {:?}",
            pair
        );
    }
    let names: Vec<String> = commands(&events).iter().map(Command::name).collect();
    assert_eq!(
        names,
        [
            "HSET",
            "HSET",
            "HINCRBY",
            "PEXPIREAT",
            "SET",
            "HSET",
            "HSET",
            "HSET",
            "HSET",
            "SET",
            "PUBLISH",
            "DEL"
        ]
    );
    let cmds = commands(&events);
    assert_eq!(
        cmds[1].args[3].as_ref(),
        b"1.5",
        "HINCRBYFLOAT arrives as HSET with the final value"
    );
    let transactions: Vec<&StreamEvent> = events
        .iter()
        .filter(|e| matches!(e, StreamEvent::Transaction { .. }))
        .collect();
    assert_eq!(
        transactions.len(),
        2,
        "MULTI/EXEC and the script's two writes"
    );
    let StreamEvent::Transaction { commands: tx, .. } = transactions[0] else {
        unreachable!()
    };
    assert_eq!(
        (tx[0].db, tx[1].db),
        (0, 2),
        "SELECT inside MULTI moves the following commands"
    );
    let large = cmds
        .iter()
        .find(|c| c.is("SET") && c.args[1].as_ref() == b"large")
        .expect("large SET");
    assert_eq!(large.args[2].len(), 1_500_000);

    // PINGs keep arriving every second and keep counting.
    let later = stream_until(&mut replicator, |e| matches!(e, StreamEvent::Ping { .. })).await;
    assert!(later.last().map(StreamEvent::end) > events.last().map(StreamEvent::end));
}

#[tokio::test]
async fn wait_counts_the_client_only_for_what_it_acknowledged() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let mut replicator = Replicator::new(options(&server), None);
    full_sync(&mut replicator).await;
    let ack = replicator.durable_offset();

    // Read the write but do not acknowledge it: WAIT must not count us.
    run(&mut client, &["HSET", "k", "f", "1"]).await;
    let event = loop {
        match next(&mut replicator).await {
            ReplicationEvent::Stream(StreamEvent::Command(c)) if c.is("HSET") => break c,
            ReplicationEvent::Stream(_) => {}
            other => panic!("{other:?}"),
        }
    };
    let reader = tokio::spawn(async move {
        // Keep reading (GETACKs arrive) without acknowledging anything new.
        loop {
            if replicator.next().await.is_err() {
                return;
            }
        }
    });
    let waited = run(&mut client, &["WAIT", "1", "300"]).await;
    assert_eq!(waited, BytesFrame::Integer(0));
    ack.advance(event.end);
    let waited = run(&mut client, &["WAIT", "1", "5000"]).await;
    assert_eq!(waited, BytesFrame::Integer(1));
    reader.abort();
}

#[tokio::test]
async fn a_dropped_link_resumes_with_continue_and_misses_nothing() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let mut replicator = Replicator::new(options(&server), None);
    let sync = full_sync(&mut replicator).await;

    for i in 0..100 {
        run(
            &mut client,
            &["HSET", &format!("seq:{i}"), "n", &i.to_string()],
        )
        .await;
    }
    let mut seen = Vec::new();
    let collect = |event: &StreamEvent, seen: &mut Vec<u32>| {
        if let StreamEvent::Command(c) = event {
            if c.is("HSET") {
                seen.push(String::from_utf8_lossy(&c.args[3]).parse().expect("n"));
            }
        }
    };
    // Read part of the stream, then drop the link from the primary's side.
    for event in stream_until(
        &mut replicator,
        |e| matches!(e, StreamEvent::Command(c) if c.args[1].as_ref() == b"seq:40"),
    )
    .await
    {
        collect(&event, &mut seen);
    }
    run(&mut client, &["CLIENT", "KILL", "TYPE", "replica"]).await;
    for i in 100..200 {
        run(
            &mut client,
            &["HSET", &format!("seq:{i}"), "n", &i.to_string()],
        )
        .await;
    }
    let target = master_offset(&mut client).await;
    let mut continued = None;
    let mut last_end = 0;
    while last_end < target {
        match next(&mut replicator).await {
            ReplicationEvent::Stream(event) => {
                replicator.report_durable(event.end());
                last_end = event.end().0;
                collect(&event, &mut seen);
            }
            ReplicationEvent::Disconnected { .. } => {}
            ReplicationEvent::Continued {
                position,
                previous_replid,
            } => {
                assert_eq!(previous_replid, None);
                continued = Some(position);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let position = continued.expect("the link dropped and continued");
    assert_eq!(position.replid, sync.replid);
    assert_eq!(
        seen,
        (0..200).collect::<Vec<u32>>(),
        "every command exactly once, in order"
    );
    let info = client.info("stats").await.expect("info");
    assert_eq!(info_field(&info, "sync_full"), Some("1"));
    assert_eq!(info_field(&info, "sync_partial_ok"), Some("1"));
}

#[tokio::test]
async fn an_unknown_replid_or_a_future_offset_gives_a_full_sync() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    run(&mut client, &["HSET", "person2:1", "age", "3"]).await;
    let unknown = StreamPosition {
        replid: ReplId::parse(&"ab".repeat(20)).expect("id"),
        offset: ReplOffset(5),
        db: 0,
    };
    let mut replicator = Replicator::new(options(&server), Some(unknown));
    let sync = full_sync(&mut replicator).await;
    assert!(sync.keys.contains_key(&(0, Bytes::from("person2:1"))));

    let ahead = StreamPosition {
        replid: sync.replid.clone(),
        offset: ReplOffset(sync.offset.0 + 1_000_000),
        db: 0,
    };
    let mut replicator = Replicator::new(options(&server), Some(ahead));
    assert!(matches!(
        next(&mut replicator).await,
        ReplicationEvent::FullSyncStarted { .. }
    ));

    let exact = sync.position.clone();
    let mut replicator = Replicator::new(options(&server), Some(exact.clone()));
    match next(&mut replicator).await {
        ReplicationEvent::Continued {
            position,
            previous_replid: None,
        } => assert_eq!(position, exact),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn acl_users_passwords_and_permissions() {
    let server = RedisServer::start(&["--requirepass", "adminpw"]);
    let admin = RedisClient::connect(
        &writebehind::config::RedisEndpoint::parse(&format!(
            "redis://:adminpw@127.0.0.1:{}",
            server.port
        ))
        .expect("url"),
        Duration::from_secs(5),
    )
    .await;
    let mut admin = admin.expect("admin connects");
    run(
        &mut admin,
        &[
            "ACL",
            "SETUSER",
            "replica",
            "on",
            ">replpw",
            "+psync",
            "+replconf",
            "+ping",
        ],
    )
    .await;
    run(
        &mut admin,
        &[
            "ACL",
            "SETUSER",
            "nopsync",
            "on",
            ">pw",
            "+replconf",
            "+ping",
        ],
    )
    .await;
    run(&mut admin, &["HSET", "k", "f", "v"]).await;

    let with = |url: String| {
        let mut o =
            ReplicatorOptions::new(writebehind::config::RedisEndpoint::parse(&url).expect("url"));
        o.timeout = Duration::from_secs(10);
        o
    };
    let mut replicator = Replicator::new(
        with(format!("redis://replica:replpw@127.0.0.1:{}", server.port)),
        None,
    );
    let sync = full_sync(&mut replicator).await;
    assert!(sync.keys.contains_key(&(0, Bytes::from("k"))));
    let mut replicator = Replicator::new(
        with(format!("redis://:adminpw@127.0.0.1:{}", server.port)),
        None,
    );
    full_sync(&mut replicator).await;

    let mut replicator = Replicator::new(
        with(format!("redis://replica:wrong@127.0.0.1:{}", server.port)),
        None,
    );
    let error = replicator
        .next()
        .await
        .expect_err("a wrong password is fatal");
    assert!(
        matches!(&error, LinkError::Fatal { message, .. } if message.contains("authentication failed")),
        "{error}"
    );
    let mut replicator = Replicator::new(
        with(format!("redis://nopsync:pw@127.0.0.1:{}", server.port)),
        None,
    );
    let error = replicator
        .next()
        .await
        .expect_err("PSYNC without permission is fatal");
    assert!(
        matches!(&error, LinkError::Fatal { message, .. } if message.contains("PSYNC refused") && message.contains("NOPERM")),
        "{error}"
    );
}

#[tokio::test]
async fn keepalives_hold_the_link_while_a_slow_consumer_decodes_the_snapshot() {
    let server = RedisServer::start(&["--repl-timeout", "2", "--repl-diskless-sync", "no"]);
    let mut client = server.client().await;
    for chunk in 0..10 {
        let fields: Vec<String> = (0..100)
            .flat_map(|i| [format!("k{chunk}-{i}"), "v".to_string()])
            .collect();
        let mut args = vec!["MSET"];
        args.extend(fields.iter().map(String::as_str));
        run(&mut client, &args).await;
    }
    let mut replicator = Replicator::new(options(&server), None);
    assert!(matches!(
        next(&mut replicator).await,
        ReplicationEvent::FullSyncStarted { .. }
    ));
    // Take more than twice the primary's repl-timeout to go through the snapshot.
    let started = std::time::Instant::now();
    loop {
        match next(&mut replicator).await {
            ReplicationEvent::Snapshot(RdbEvent::KeyStart { .. }) => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            ReplicationEvent::Snapshot(_) => {}
            ReplicationEvent::FullSyncCompleted { position, .. } => {
                replicator.report_durable(position.offset);
                break;
            }
            other => panic!("the link dropped during the snapshot: {other:?}"),
        }
    }
    assert!(
        started.elapsed() > Duration::from_secs(4),
        "the snapshot was not slow enough to prove anything"
    );
    run(&mut client, &["HSET", "after", "f", "v"]).await;
    let events = stream_until(
        &mut replicator,
        |e| matches!(e, StreamEvent::Command(c) if c.is("HSET")),
    )
    .await;
    assert!(!events.is_empty());
    assert!(
        !server.log().contains("timedout replica"),
        "{}",
        server.log()
    );
}

#[tokio::test]
async fn dump_payloads_of_every_hash_encoding_decode() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    populate(&mut client).await;
    for key in ["person2:1", "numbers", "bighash", "longvalue", "binary"] {
        let BytesFrame::BulkString(payload) = run(&mut client, &["DUMP", key]).await else {
            panic!("DUMP {key}")
        };
        let value = decode_dump_payload(&payload).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(value.kind, ValueKind::Hash);
        let fields: BTreeMap<Bytes, Bytes> = value
            .fields
            .into_iter()
            .map(|f| (f.field, f.value))
            .collect();
        assert_eq!(
            fields,
            hgetall(&mut client, 0, key.as_bytes()).await,
            "{key}"
        );

        let mut tampered = payload.to_vec();
        tampered[3] ^= 0x20;
        assert!(matches!(
            decode_dump_payload(&Bytes::from(tampered)),
            Err(RdbError::BadChecksum { .. })
        ));
    }
    let BytesFrame::BulkString(payload) = run(&mut client, &["DUMP", "biglist"]).await else {
        panic!("DUMP biglist")
    };
    assert_eq!(
        decode_dump_payload(&payload).expect("list").kind,
        ValueKind::List
    );
}

#[tokio::test]
async fn a_replica_without_its_primary_is_retried_until_it_serves() {
    let mut primary = RedisServer::start(&[]);
    let primary_port = primary.port.to_string();
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &primary_port]);
    let mut client = replica.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while info_field(
        &client.info("replication").await.expect("info"),
        "master_link_status",
    ) != Some("up")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never linked to its primary"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    primary.kill();

    // Attached to a replica whose primary is gone: -NOMASTERLINK, retried with backoff.
    let mut replicator = Replicator::new(options(&replica), None);
    let mut refusals = 0;
    while refusals < 3 {
        match next(&mut replicator).await {
            ReplicationEvent::Disconnected {
                error: LinkError::NotReady { message, .. },
                ..
            } => {
                assert!(message.starts_with("-NOMASTERLINK"), "{message}");
                refusals += 1;
            }
            other => panic!("expected -NOMASTERLINK, got {other:?}"),
        }
    }
    // The primary returns on the same port: the replica relinks and then serves us.
    let _primary = RedisServer::start_on_port(primary.port, &[]);
    loop {
        match next(&mut replicator).await {
            ReplicationEvent::Disconnected { .. } => {}
            ReplicationEvent::FullSyncStarted { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_silent_primary_times_the_link_out_and_it_resumes() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let mut opts = options(&server);
    opts.timeout = Duration::from_secs(1);
    let mut replicator = Replicator::new(opts, None);
    full_sync(&mut replicator).await;
    // The primary pings every 10 s: with a 1 s timeout its silence ends the link.
    let mut timed_out = false;
    let mut continued = false;
    while !continued {
        match next(&mut replicator).await {
            ReplicationEvent::Disconnected {
                error: LinkError::Timeout { .. },
                ..
            } => timed_out = true,
            ReplicationEvent::Disconnected { .. } => {}
            ReplicationEvent::Continued {
                previous_replid: None,
                ..
            } => continued = true,
            ReplicationEvent::Stream(event) => replicator.report_durable(event.end()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        timed_out,
        "the silence must have been detected as a timeout"
    );
    client
        .command(&["HSET", "after", "f", "v"])
        .await
        .expect("hset");
    let events = stream_until(
        &mut replicator,
        |e| matches!(e, StreamEvent::Command(c) if c.is("HSET")),
    )
    .await;
    assert!(!events.is_empty());
}

/// A peer that answers every request with `reply`: a Redis that misbehaves on purpose.
fn misbehaving_peer(reply: Vec<u8>, after_psync: Option<Vec<u8>>) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let Ok((mut socket, _)) = listener.accept() else {
            return;
        };
        let mut buffer = [0u8; 4096];
        loop {
            let Ok(n) = socket.read(&mut buffer) else {
                return;
            };
            if n == 0 {
                return;
            }
            let request = String::from_utf8_lossy(&buffer[..n]).to_uppercase();
            let answer = match (&after_psync, request.contains("\r\nPSYNC\r\n")) {
                (Some(stream), true) => stream.clone(),
                _ => reply.clone(),
            };
            if socket.write_all(&answer).is_err() {
                return;
            }
        }
    });
    port
}

/// A reply nesting arrays a million levels deep is a protocol error on the connection, not a
/// stack overflow.
#[tokio::test]
async fn a_deeply_nested_reply_is_refused_not_a_crash() {
    let port = misbehaving_peer(b"*1\r\n".repeat(1_000_000), None);
    let endpoint = writebehind::config::RedisEndpoint::parse(&format!("redis://127.0.0.1:{port}"))
        .expect("endpoint");
    let mut client = RedisClient::connect(&endpoint, Duration::from_secs(5))
        .await
        .expect("connect");
    let error = client.command(&["ROLE"]).await.expect_err("refused");
    assert!(error.to_string().contains("deeper than"), "{error}");
}

/// The same in the replication stream: the link ends with a protocol error naming the offset.
#[tokio::test]
async fn a_deeply_nested_frame_in_the_stream_ends_the_link() {
    let replid = "a".repeat(40);
    let mut stream = format!("+CONTINUE {replid}\r\n").into_bytes();
    stream.extend(b"*1\r\n".repeat(1_000_000));
    let port = misbehaving_peer(b"+OK\r\n".to_vec(), Some(stream));
    let endpoint = writebehind::config::RedisEndpoint::parse(&format!("redis://127.0.0.1:{port}"))
        .expect("endpoint");
    let mut options = ReplicatorOptions::new(endpoint);
    options.timeout = Duration::from_secs(10);
    let resume = StreamPosition {
        replid: ReplId::parse(&replid).expect("replid"),
        offset: ReplOffset(100),
        db: 0,
    };
    let mut replicator = Replicator::new(options, Some(resume));
    let first = replicator.next().await.expect("continued");
    assert!(
        matches!(first, ReplicationEvent::Continued { .. }),
        "{first:?}"
    );
    match replicator.next().await.expect("an event") {
        ReplicationEvent::Disconnected { error, .. } => {
            assert!(error.to_string().contains("deeper than"), "{error}");
            assert!(
                error.to_string().contains("101"),
                "names the offset: {error}"
            );
        }
        other => panic!("expected the link to end, got {other:?}"),
    }
}
