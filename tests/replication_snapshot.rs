//! Full syncs against real `redis-server` processes: every type and encoding decoded, on disk
//! and diskless, and DUMP payloads of every hash encoding.

mod support;

use std::collections::BTreeMap;

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;
use support::replication::*;
use support::RedisServer;
use writebehind::position::ReplOffset;
use writebehind::redis_client::{frame_text, info_field, RedisClient};
use writebehind::replication::rdb::{decode_dump_payload, Checksum, RdbError, ValueKind};
use writebehind::replication::stream::StreamEvent;
use writebehind::replication::{Framing, Replicator};

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
