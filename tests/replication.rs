//! The replication client against real `redis-server` processes: the link (offsets, `WAIT`,
//! resuming, ACLs, keepalives, retries, timeouts, misbehaving peers). The snapshot's decoding
//! is in tests/replication_snapshot.rs.

mod support;

use std::time::Duration;

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;
use support::replication::*;
use support::RedisServer;
use writebehind::position::{ReplId, ReplOffset, StreamPosition};
use writebehind::redis_client::{info_field, RedisClient};
use writebehind::replication::rdb::RdbEvent;
use writebehind::replication::stream::{Command, StreamEvent};
use writebehind::replication::{LinkError, ReplicationEvent, Replicator, ReplicatorOptions};

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

/// The consumer stops reading right after `FullSyncStarted` while the primary takes 30 MB of
/// writes under a 4 MB `client-output-buffer-limit replica`: the snapshot spool drains the link,
/// so the primary never cuts it and the one full sync completes with every write after it.
async fn a_paused_consumer_is_not_cut_by_the_output_buffer_limit(diskless: &str) {
    let server = RedisServer::start(&["--repl-diskless-sync", diskless]);
    let mut client = client_limiting_replicas_to_4mb(&server).await;
    for chunk in 0..20 {
        let fields: Vec<String> = (0..100)
            .flat_map(|i| [format!("k{chunk}-{i}"), "v".repeat(100)])
            .collect();
        let mut args = vec!["MSET"];
        args.extend(fields.iter().map(String::as_str));
        run(&mut client, &args).await;
    }
    let spool_root = tempfile::tempdir().expect("tempdir");
    let mut options = options(&server);
    options.spool_dir = spool_root.path().to_path_buf();
    let mut replicator = Replicator::new(options, None);
    assert!(matches!(
        next(&mut replicator).await,
        ReplicationEvent::FullSyncStarted { .. }
    ));
    // The primary holds what is written while it forks and sends the snapshot, whoever the
    // replica is: write once the stream flows, seen as a 1 MB marker value (the snapshot is
    // about 250 KB) in the spool.
    run(&mut client, &["SET", "marker", &"m".repeat(1 << 20)]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while spooled_bytes(spool_root.path()) < 1 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the primary never streamed to the paused consumer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let value = "x".repeat(10_000);
    const WRITES: usize = 3_000;
    for i in 0..WRITES {
        run(&mut client, &["HSET", "during", &format!("f{i}"), &value]).await;
    }
    let mut completed = 0;
    loop {
        match next(&mut replicator).await {
            ReplicationEvent::Snapshot(_) => {}
            ReplicationEvent::FullSyncCompleted { position, .. } => {
                replicator.report_durable(position.offset);
                completed += 1;
                break;
            }
            other => panic!("the link dropped during the snapshot: {other:?}"),
        }
    }
    let mut writes = 0;
    while writes < WRITES {
        match next(&mut replicator).await {
            ReplicationEvent::Stream(StreamEvent::Command(c)) if c.is("HSET") => writes += 1,
            ReplicationEvent::Stream(_) => {}
            other => panic!(
                "the link dropped after {writes} writes: {other:?}\n{}",
                server.log()
            ),
        }
    }
    assert_eq!(completed, 1);
    assert!(
        !server.log().contains("output buffer limits"),
        "{}",
        server.log()
    );
    // Caught up: the link reads the socket again and the spool directory is gone.
    run(&mut client, &["HSET", "after", "f", "v"]).await;
    stream_until(
        &mut replicator,
        |e| matches!(e, StreamEvent::Command(c) if c.is("HSET")),
    )
    .await;
    // The next read finds the spool read to its end and takes the socket back.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(spool_root.path()).map_or(0, Iterator::count) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the link never left the spool"
        );
        if let Ok(event) = tokio::time::timeout(Duration::from_millis(50), replicator.next()).await
        {
            // The primary's periodic PING may come; nothing else was written.
            assert!(
                matches!(
                    &event,
                    Ok(ReplicationEvent::Stream(StreamEvent::Ping { .. }))
                ),
                "nothing more was written, got {event:?}"
            );
        }
    }
}

/// A consumer slower than the primary's writes, under a 4 MB `client-output-buffer-limit
/// replica`: read straight from the socket, the primary would hold the lag and cut the link
/// past 4 MB. Once the kernel holds more than the consumer reads, the link spools the command
/// stream instead: the link is never cut, every write arrives once and in order, the primary
/// gets our ACKs (`WAIT`), and once the consumer has caught up the link reads the socket again.
#[tokio::test]
async fn a_slow_consumer_of_the_stream_is_not_cut_by_the_output_buffer_limit() {
    let server = RedisServer::start(&[]);
    let mut client = client_limiting_replicas_to_4mb(&server).await;
    let spool_root = tempfile::tempdir().expect("tempdir");
    let mut options = options(&server);

    options.spool_dir = spool_root.path().to_path_buf();
    let spooled = options.spooled.clone();
    let mut replicator = Replicator::new(options, None);
    full_sync(&mut replicator).await;
    // Let the link leave the snapshot's spool: the first write arrives over the socket.
    run(&mut client, &["SET", "started", "1"]).await;
    stream_until(
        &mut replicator,
        |e| matches!(e, StreamEvent::Command(c) if c.is("SET")),
    )
    .await;

    // 30 MB of writes, pipelined from another connection at about 35 MB/s: over three times
    // what the consumer below reads, so the primary would hold about 20 MB for us when the
    // writes end (5 times its limit) without the spool. Not as fast as the primary takes them:
    // then the primary reached its 4 MB limit within about 10 ms of the first write, and a
    // spooler thread that a loaded machine let wait that long was cut (seen once in CI); at
    // this pace the spool has about 100 ms to start.
    const WRITES: usize = 3_000;
    let mut writer_client = server.client().await;
    let writer = tokio::spawn(async move {
        let value = "x".repeat(10_000);
        for chunk in 0..WRITES / 100 {
            let commands: Vec<[String; 4]> = (chunk * 100..(chunk + 1) * 100)
                .map(|i| {
                    [
                        "HSET".into(),
                        "during".into(),
                        format!("f{i}"),
                        value.clone(),
                    ]
                })
                .collect();
            let commands: Vec<&[String]> = commands.iter().map(|c| &c[..]).collect();
            writer_client.pipeline(&commands).await.expect("writes");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    let mut fields = Vec::with_capacity(WRITES);
    let (mut saw_spool, mut most_spooled) = (false, 0);
    while fields.len() < WRITES {
        match next(&mut replicator).await {
            ReplicationEvent::Stream(event) => {
                replicator.report_durable(event.end());
                if let StreamEvent::Command(c) = &event {
                    if c.is("HSET") {
                        fields.push(String::from_utf8_lossy(&c.args[2]).into_owned());
                    }
                }
            }
            other => panic!(
                "the link dropped after {} writes: {other:?}\n{}",
                fields.len(),
                server.log()
            ),
        }
        saw_spool |= std::fs::read_dir(spool_root.path()).map_or(0, Iterator::count) > 0;
        most_spooled = most_spooled.max(spooled.load(std::sync::atomic::Ordering::Relaxed));
        // The consumer is slow: it takes a millisecond per write (about 10 MB/s).
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    writer.await.expect("writer");
    let expected: Vec<String> = (0..WRITES).map(|i| format!("f{i}")).collect();
    assert!(
        fields == expected,
        "the writes arrived out of order or twice"
    );
    assert!(saw_spool, "the link never spooled the stream");
    assert!(
        most_spooled > 1 << 20,
        "the spool's unread bytes were not counted (at most {most_spooled})"
    );
    assert!(
        !server.log().contains("output buffer limits"),
        "{}",
        server.log()
    );

    // Caught up: the primary counts us for WAIT, and the link reads the socket again (the
    // spool's directory is removed) once the spool is read to its end.
    let ack = replicator.durable_offset();
    let reader = tokio::spawn(async move {
        loop {
            match replicator.next().await {
                Ok(ReplicationEvent::Stream(event)) => ack.advance(event.end()),
                // The link dropped: the check below fails.
                _ => return,
            }
        }
    });
    let waited = run(&mut client, &["WAIT", "1", "10000"]).await;
    assert_eq!(waited, BytesFrame::Integer(1));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(spool_root.path()).map_or(0, Iterator::count) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the link never left the spool"
        );
        // Reads make the link look at the spool: PINGs and GETACKs come by themselves.
        run(&mut client, &["SET", "poke", "1"]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!reader.is_finished(), "{:?}", server.log());
    assert_eq!(spooled.load(std::sync::atomic::Ordering::Relaxed), 0);
    reader.abort();
}

/// A client of `server`, which cuts a replica whose output buffer passes 4 MB.
async fn client_limiting_replicas_to_4mb(server: &RedisServer) -> RedisClient {
    let mut client = server.client().await;
    let limit = [
        "CONFIG",
        "SET",
        "client-output-buffer-limit",
        "replica 4mb 0 0",
    ];
    run(&mut client, &limit).await;
    client
}

/// Bytes in the spool files under `root` (one directory per link).
fn spooled_bytes(root: &std::path::Path) -> u64 {
    let files = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|link| {
            std::fs::read_dir(link.path())
                .into_iter()
                .flatten()
                .flatten()
        });
    files
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[tokio::test]
async fn a_paused_consumer_of_a_diskless_full_sync_is_not_cut_by_the_output_buffer_limit() {
    a_paused_consumer_is_not_cut_by_the_output_buffer_limit("yes").await;
}

#[tokio::test]
async fn a_paused_consumer_of_a_disk_based_full_sync_is_not_cut_by_the_output_buffer_limit() {
    a_paused_consumer_is_not_cut_by_the_output_buffer_limit("no").await;
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

/// The same in the replication stream, where a command is an array of bulk strings and nothing
/// else: the nested array is refused at its first byte, and the link ends with a protocol error
/// naming the offset.
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
            assert!(
                error.to_string().contains("expected an argument"),
                "{error}"
            );
            assert!(
                error.to_string().contains("101"),
                "names the offset: {error}"
            );
        }
        other => panic!("expected the link to end, got {other:?}"),
    }
}
