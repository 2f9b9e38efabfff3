//! Durable capture against real `redis-server` processes: the mirror follows Redis, the change
//! log replays to the right rows, WAIT means durable, full syncs reconcile, flushes are bounded.
//! Restarts and kills are in tests/capture_restarts.rs.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis_protocol::resp2::types::BytesFrame;
use support::capture::*;
use support::send_all;
use support::RedisServer;
use writebehind::buffer::{RowChange, Store};
use writebehind::capture::CaptureOutputs;
use writebehind::redis_client::{frame_text, RedisClient};

/// One random command of the workload (as arguments), or a MULTI block.
fn random_command(rng: &mut StdRng) -> Vec<Vec<String>> {
    let watched = |rng: &mut StdRng| -> String {
        if rng.random_bool(0.15) {
            format!("car:{}", rng.random_range(0..10))
        } else {
            format!("person2:{}", rng.random_range(0..40))
        }
    };
    let any = |rng: &mut StdRng| -> String {
        if rng.random_bool(0.3) {
            format!("tmp:{}", rng.random_range(0..10))
        } else {
            watched(rng)
        }
    };
    let field = |rng: &mut StdRng| -> String {
        ["first_name", "last_name", "age", "seq", "color", "extra"][rng.random_range(0..6)]
            .to_string()
    };
    let value = |rng: &mut StdRng| -> String { format!("v{}", rng.random_range(0..1000)) };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let roll = rng.random_range(0..100);
    let one = match roll {
        0..=29 => {
            let k = any(rng);
            let (f1, v1, f2, v2) = (field(rng), value(rng), field(rng), value(rng));
            s(&["HSET", &k, &f1, &v1, &f2, &v2])
        }
        30..=34 => {
            let (k, f, v) = (any(rng), field(rng), value(rng));
            s(&["HMSET", &k, &f, &v])
        }
        35..=38 => {
            let (k, f, v) = (any(rng), field(rng), value(rng));
            s(&["HSETNX", &k, &f, &v])
        }
        39..=46 => {
            let (k, f) = (any(rng), field(rng));
            s(&["HDEL", &k, &f])
        }
        47..=51 => {
            let k = any(rng);
            s(&[
                "HINCRBY",
                &k,
                "counter",
                &rng.random_range(-5..10).to_string(),
            ])
        }
        52..=54 => {
            let k = any(rng);
            s(&["HINCRBYFLOAT", &k, "score", "1.5"])
        }
        55..=58 => {
            let k = any(rng);
            s(&[
                if rng.random_bool(0.5) {
                    "DEL"
                } else {
                    "UNLINK"
                },
                &k,
            ])
        }
        59..=63 => {
            let (a, b) = (any(rng), any(rng));
            s(&[
                if rng.random_bool(0.7) {
                    "RENAME"
                } else {
                    "RENAMENX"
                },
                &a,
                &b,
            ])
        }
        64..=65 => {
            let k = any(rng);
            s(&["MOVE", &k, if rng.random_bool(0.5) { "1" } else { "0" }])
        }
        66..=68 => {
            let (a, b) = (any(rng), any(rng));
            if rng.random_bool(0.5) {
                s(&["COPY", &a, &b, "REPLACE"])
            } else {
                s(&["COPY", &a, &b, "DB", "1", "REPLACE"])
            }
        }
        69..=70 => {
            let k = any(rng);
            s(&["SET", &k, "a-string"])
        }
        71..=72 => {
            let k = any(rng);
            return vec![
                s(&["SADD", "tmpset", "m"]),
                s(&["SUNIONSTORE", &k, "tmpset"]),
            ];
        }
        73..=76 => {
            let k = any(rng);
            s(&["EXPIRE", &k, "1000"])
        }
        77..=78 => {
            let k = any(rng);
            s(&["PERSIST", &k])
        }
        79..=80 => {
            let k = any(rng);
            s(&["PEXPIRE", &k, &rng.random_range(1..200).to_string()])
        }
        81..=85 => {
            let (a, b, f, v) = (any(rng), any(rng), field(rng), value(rng));
            return vec![
                s(&["MULTI"]),
                s(&["HSET", &a, &f, &v]),
                s(&["DEL", &b]),
                s(&["HINCRBY", &a, "counter", "1"]),
                s(&["EXEC"]),
            ];
        }
        86..=88 => {
            let (a, b) = (any(rng), any(rng));
            s(&["EVAL", "redis.call('HSET', KEYS[1], 'age', ARGV[1]); redis.call('HDEL', KEYS[2], 'age'); return 1", "2", &a, &b, &rng.random_range(0..99).to_string()])
        }
        89..=92 => {
            let k = any(rng);
            return vec![
                s(&["SELECT", "1"]),
                s(&["HSET", &k, "color", &value(rng)]),
                s(&["SELECT", "0"]),
            ];
        }
        93..=94 => {
            let k = any(rng);
            return vec![s(&["SELECT", "1"]), s(&["DEL", &k]), s(&["SELECT", "0"])];
        }
        _ => {
            let k = any(rng);
            s(&["HSET", &k, "seq", &value(rng)])
        }
    };
    vec![one]
}

/// Polls until no key of the workload has a short TTL left. Asking for a key's TTL makes Redis
/// delete it (and replicate the DEL) once it has expired; `KEYS` alone would only hide it.
async fn expire_short_ttls(client: &mut RedisClient) {
    let mut names: Vec<String> = (0..40).map(|i| format!("person2:{i}")).collect();
    names.extend((0..10).map(|i| format!("car:{i}")));
    names.extend((0..10).map(|i| format!("tmp:{i}")));
    let deadline = Instant::now() + Duration::from_secs(30);
    for db in ["0", "1"] {
        client.command(&["SELECT", db]).await.expect("select");
        loop {
            let mut pending = false;
            for name in &names {
                if let BytesFrame::Integer(ttl) =
                    client.command(&["PTTL", name]).await.expect("pttl")
                {
                    pending |= (0..10_000).contains(&ttl);
                }
            }
            if !pending {
                break;
            }
            assert!(Instant::now() < deadline, "short TTLs did not expire");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    client.command(&["SELECT", "0"]).await.expect("select");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_workload_leaves_mirror_and_change_log_equal_to_redis() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let mappings = mappings(&server, "delete");
    // Something to capture in the first full sync.
    client
        .command(&["HSET", "person2:1", "first_name", "Ann", "age", "30"])
        .await
        .expect("hset");
    client
        .command(&["HSET", "tmp:1", "first_name", "Tim"])
        .await
        .expect("hset");
    let running = start_capture(&server, store.clone(), mappings.clone());

    let mut rng = StdRng::seed_from_u64(20261125);
    let mut sent = 0;
    let mut batch = Vec::new();
    while sent < 100_000 {
        for command in random_command(&mut rng) {
            batch.push(command);
            sent += 1;
        }
        if batch.len() >= 2000 {
            send_all(&mut client, &batch).await;
            batch.clear();
            // RESTORE from a DUMP, which a pipeline cannot express.
            let source = format!("tmp:{}", rng.random_range(0..10));
            if let Ok(BytesFrame::BulkString(payload)) = client.command(&["DUMP", &source]).await {
                let target = format!("person2:{}", rng.random_range(0..40));
                client
                    .command(&[
                        &b"RESTORE"[..],
                        target.as_bytes(),
                        b"0",
                        &payload,
                        b"REPLACE",
                    ])
                    .await
                    .expect("restore");
                sent += 1;
            }
        }
    }
    send_all(&mut client, &batch).await;
    client.command(&["SELECT", "1"]).await.expect("select");
    client.command(&["FLUSHDB"]).await.expect("flushdb");
    client
        .command(&["HSET", "car:1", "color", "red"])
        .await
        .expect("hset");
    client.command(&["SELECT", "0"]).await.expect("select");
    expire_short_ttls(&mut client).await;
    caught_up(&store, &mut client).await;
    let capture = running.stop().await;

    let redis = redis_hashes(&mut client, &mappings).await;
    assert!(
        redis.len() > 10,
        "the workload left too few hashes to prove anything: {}",
        redis.len()
    );
    let mirror = mirror_hashes(&store);
    for key in mirror
        .keys()
        .filter(|k| !redis.contains_key(*k))
        .chain(redis.keys().filter(|k| !mirror.contains_key(*k)))
    {
        client
            .command(&["SELECT", &key.0.to_string()])
            .await
            .expect("select");
        let kind = frame_text(&client.command(&[&b"TYPE"[..], &key.1]).await.expect("type"));
        let stored = store.mirror(key.0, &key.1).expect("mirror");
        eprintln!("differs: {key:?}: Redis type {kind}; mirror {stored:?}");
    }
    client.command(&["SELECT", "0"]).await.expect("select");
    assert_eq!(mirror, redis, "mirror vs Redis");
    assert_eq!(
        replay(&store),
        projection(&redis, &mappings),
        "change log replay vs Redis"
    );
    assert!(
        capture.stats().refreshed_keys > 0,
        "renames from unwatched keys must have been refreshed"
    );
    assert_eq!(capture.stats().full_syncs, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_once_the_change_is_in_the_buffer() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let running = start_capture(&server, store.clone(), mappings(&server, "keep"));
    caught_up(&store, &mut client).await;
    for i in 0..20 {
        let key = format!("person2:{i}");
        client
            .command(&["HSET", &key, "first_name", &format!("n{i}")])
            .await
            .expect("hset");
        let waited = client.command(&["WAIT", "1", "5000"]).await.expect("wait");
        assert_eq!(waited, BytesFrame::Integer(1), "WAIT after {key}");
        let value = store
            .mirror(0, key.as_bytes())
            .expect("mirror")
            .expect("captured before WAIT returned");
        assert_eq!(
            value.fields.get(b"first_name").unwrap().value,
            Bytes::from(format!("n{i}"))
        );
    }
    running.stop().await;
}

/// Keys and fields named like command options (`db`, `replace`, `fields`) are keys and fields:
/// every command is parsed once, the same way for the mirror and for the raw state of a key with
/// a pending `#` op, so both end equal to Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_fields_named_like_options_are_followed_exactly() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let mappings = mappings(&server, "keep");
    let running = start_capture(&server, store.clone(), mappings.clone());
    caught_up(&store, &mut client).await;
    let commands: &[&[&str]] = &[
        &["HSET", "db", "last_name", "D"],
        &["HSET", "replace", "first_name", "R"],
        &["HSET", "fields", "age", "3"],
        &[
            "HSET",
            "person2:db",
            "db",
            "1",
            "replace",
            "2",
            "fields",
            "3",
            "first_name",
            "X",
        ],
        // A pending `+` op: Redis keeps the `#` field until the op is completed (no write-back
        // task runs here), so the key's raw state is tracked.
        &["HSET", "person2:op", "first_name", "P", "#", "+"],
        &["COPY", "db", "person2:a", "DB", "0"],
        &["COPY", "replace", "person2:b"],
        &["COPY", "person2:db", "car:db", "DB", "1", "REPLACE"],
        &["COPY", "fields", "person2:replace", "DB", "0", "REPLACE"],
        &["COPY", "replace", "person2:op", "DB", "0", "REPLACE"],
        &["COPY", "db", "person2:fields", "REPLACE"],
        &["MOVE", "db", "1"],
        &["RENAME", "fields", "person2:fields"],
        &["HDEL", "person2:db", "db", "fields"],
    ];
    for command in commands {
        client
            .command(command)
            .await
            .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    }
    caught_up(&store, &mut client).await;
    let capture = running.stop().await;
    assert_eq!(
        capture.stats().full_syncs,
        1,
        "no command was misread into a full resynchronisation"
    );
    let redis = redis_hashes(&mut client, &mappings).await;
    assert_eq!(
        redis.len(),
        7,
        "person2:{{db,op,a,b,replace,fields}} and car:db: {redis:?}"
    );
    assert_eq!(mirror_hashes(&store), redis, "mirror vs Redis");
    assert_eq!(
        store.raw(0, b"person2:op").expect("raw"),
        None,
        "the copy replaced the key with its pending op: nothing is left to complete"
    );
    assert_eq!(
        replay(&store),
        projection(&redis, &mappings),
        "change log replay vs Redis"
    );
}

/// A key capture must read from the primary but may not (the service's user lacks DUMP) is
/// waited for with backoff and reported in the readiness, never turned into a full resync
/// loop; once the permission is granted capture goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_fails_is_retried_not_a_full_resync() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    client
        .command(&[
            "ACL", "SETUSER", "wb", "on", ">pw", "~*", "&*", "+@all", "-dump",
        ])
        .await
        .expect("acl");
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let endpoint = writebehind::config::RedisEndpoint::parse(&format!(
        "redis://wb:pw@127.0.0.1:{}",
        server.port
    ))
    .expect("endpoint");
    let outputs = CaptureOutputs::default();
    let health = outputs.health.clone();
    let running = start_capture_as(endpoint, store.clone(), mappings(&server, "keep"), outputs);
    caught_up(&store, &mut client).await;
    // A watched key gets its content from an unwatched one: capture must read it.
    client
        .command(&["HSET", "tmp", "first_name", "R"])
        .await
        .expect("hset");
    client
        .command(&["RENAME", "tmp", "person2:renamed"])
        .await
        .expect("rename");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !health
        .not_ready()
        .is_some_and(|why| why.contains("cannot read key `person2:renamed`"))
    {
        assert!(
            Instant::now() < deadline,
            "not reported: {:?}",
            health.not_ready()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client
        .command(&["ACL", "SETUSER", "wb", "+dump"])
        .await
        .expect("acl");
    caught_up(&store, &mut client).await;
    assert_eq!(health.not_ready(), None);
    let capture = running.stop().await;
    assert_eq!(capture.stats().full_syncs, 1, "no full resync");
    let value = store
        .mirror(0, b"person2:renamed")
        .expect("mirror")
        .expect("the refreshed key");
    assert_eq!(
        value.fields.get(b"first_name").unwrap().value,
        Bytes::from("R")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_full_resync_reconciles_exactly() {
    let server = RedisServer::start(&["--repl-backlog-size", "16384"]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let mappings = mappings(&server, "keep");
    for i in 1..=10 {
        client
            .command(&[
                "HSET",
                &format!("person2:{i}"),
                "first_name",
                &format!("n{i}"),
                "age",
                "1",
            ])
            .await
            .expect("hset");
    }
    let running = start_capture(&server, store.clone(), mappings.clone());
    caught_up(&store, &mut client).await;
    running.stop().await;
    let seq_before = store.checkpoint().expect("checkpoint").next_seq;

    // While the service is down: deletes, a change, an unmapped-only change, and enough other
    // traffic to overflow the 16 KiB backlog.
    for i in 1..=3 {
        client
            .command(&["DEL", &format!("person2:{i}")])
            .await
            .expect("del");
    }
    client
        .command(&["HSET", "person2:4", "age", "2"])
        .await
        .expect("hset");
    client
        .command(&["HSET", "person2:5", "unmapped", "x"])
        .await
        .expect("hset");
    for i in 0..100 {
        client
            .command(&["SET", &format!("junk:{i}"), &"x".repeat(1000)])
            .await
            .expect("set");
    }
    let running = start_capture(&server, store.clone(), mappings.clone());
    caught_up(&store, &mut client).await;
    let capture = running.stop().await;
    assert_eq!(
        capture.stats().full_syncs,
        1,
        "the backlog no longer covered the checkpoint"
    );

    let changes = store.changes(seq_before, 100).expect("changes");
    let mut summary: Vec<(String, String)> = changes
        .iter()
        .map(|c| {
            let kind = match &c.row {
                RowChange::Upsert { columns } => format!(
                    "upsert {:?}",
                    columns
                        .iter()
                        .find(|(c, _)| &**c == "age")
                        .and_then(|(_, v)| v.clone())
                ),
                RowChange::Delete => "delete".to_string(),
            };
            (String::from_utf8_lossy(&c.row_id).into_owned(), kind)
        })
        .collect();
    summary.sort();
    assert_eq!(
        summary,
        vec![
            ("1".to_string(), "delete".to_string()),
            ("2".to_string(), "delete".to_string()),
            ("3".to_string(), "delete".to_string()),
            (
                "4".to_string(),
                format!("upsert {:?}", Some(Bytes::from("2")))
            ),
        ]
    );
    assert_eq!(
        mirror_hashes(&store),
        redis_hashes(&mut client, &mappings).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_logs_its_progress_in_percent_and_keys_per_second() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let commands: Vec<Vec<String>> = (0..2000)
        .map(|i| {
            vec![
                "HSET".into(),
                format!("person2:{i}"),
                "age".into(),
                i.to_string(),
            ]
        })
        .collect();
    send_all(&mut client, &commands).await;
    let dir = tempfile::tempdir().expect("dir");
    let (config, _buffer) = service_config(&server, &dir);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_writebehind"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start writebehind");
    let stderr = child.stderr.take().expect("stderr");
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let done = line.contains("snapshot captured");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lines.is_finished() {
        assert!(Instant::now() < deadline, "no 'snapshot captured' line");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let seen = lines.join().expect("reader");
    let progress: Vec<&String> = seen
        .iter()
        .filter(|l| l.contains("snapshot progress"))
        .collect();
    assert!(progress.len() >= 5, "{seen:#?}");
    assert!(
        progress
            .iter()
            .all(|l| l.contains("percent=") && l.contains("keys_per_second=")),
        "{progress:#?}"
    );
    assert!(
        progress.last().is_some_and(|l| l.contains("percent=100.0")),
        "{progress:#?}"
    );
    assert!(
        seen.last().is_some_and(|l| l.contains("keys=2000")),
        "{seen:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapdb_of_a_mapped_database_is_reconciled_by_a_full_sync() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let mappings = mappings(&server, "keep");
    client
        .command(&["HSET", "person2:1", "first_name", "A"])
        .await
        .expect("hset");
    client
        .command(&["HSET", "car:9", "color", "blue"])
        .await
        .expect("hset");
    client.command(&["SELECT", "1"]).await.expect("select");
    client
        .command(&["HSET", "car:1", "color", "red"])
        .await
        .expect("hset");
    client.command(&["SELECT", "0"]).await.expect("select");
    let running = start_capture(&server, store.clone(), mappings.clone());
    caught_up(&store, &mut client).await;
    let seq_before = store.checkpoint().expect("checkpoint").next_seq;

    // HSET, then SWAPDB in the same burst: the HSET must not be lost with the batch.
    client
        .command(&["HSET", "car:9", "color", "green"])
        .await
        .expect("hset");
    client.command(&["SWAPDB", "0", "1"]).await.expect("swapdb");
    caught_up(&store, &mut client).await;
    let capture = running.stop().await;
    assert_eq!(capture.stats().full_syncs, 2);
    assert_eq!(
        mirror_hashes(&store),
        redis_hashes(&mut client, &mappings).await
    );
    let mut changes: Vec<(String, String, bool)> = store
        .changes(seq_before, 100)
        .expect("changes")
        .into_iter()
        .map(|c| {
            (
                c.mapping.to_string(),
                String::from_utf8_lossy(&c.row_id).into_owned(),
                c.row == RowChange::Delete,
            )
        })
        .collect();
    changes.sort();
    assert_eq!(
        changes,
        vec![
            ("Cars".to_string(), "1".to_string(), true),
            ("Cars".to_string(), "9".to_string(), false),
            ("People".to_string(), "1".to_string(), true)
        ]
    );
    assert_eq!(
        replay(&store),
        projection(&redis_hashes(&mut client, &mappings).await, &mappings)
    );
}

/// A full sync inside one run rewrites the mirror behind capture's in-memory cache: a hash
/// cached before it must not come back after it (the cache is emptied, src/capture/mirror_cache.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_within_a_run_leaves_no_stale_cached_hash() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let mappings = mappings(&server, "keep");
    client
        .command(&["HSET", "person2:1", "first_name", "A"])
        .await
        .expect("hset");
    client.command(&["SELECT", "1"]).await.expect("select");
    client
        .command(&["HSET", "person2:1", "first_name", "B", "last_name", "Z"])
        .await
        .expect("hset");
    client.command(&["SELECT", "0"]).await.expect("select");
    let running = start_capture(&server, store.clone(), mappings.clone());
    caught_up(&store, &mut client).await;
    // Through the stream, so that the cache holds it.
    client
        .command(&["HSET", "person2:1", "age", "5"])
        .await
        .expect("hset");
    caught_up(&store, &mut client).await;
    client.command(&["SWAPDB", "0", "1"]).await.expect("swapdb");
    caught_up(&store, &mut client).await;
    client
        .command(&["HSET", "person2:1", "seq", "1"])
        .await
        .expect("hset");
    caught_up(&store, &mut client).await;
    let capture = running.stop().await;
    assert_eq!(capture.stats().full_syncs, 2, "SWAPDB forced a full sync");
    let hashes = mirror_hashes(&store);
    assert_eq!(hashes, redis_hashes(&mut client, &mappings).await);
    assert!(
        format!("{hashes:?}").contains("\"Z\""),
        "the swapped-in hash is mirrored: {hashes:?}"
    );
}

/// A flush of many watched keys is committed a page of keys at a time (memory bounded whatever
/// the keyspace, docs/design.md): every row is deleted exactly once, in units of at most 1,024
/// changes recorded no later than the flush, and what another database holds is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_of_many_keys_is_committed_in_bounded_units() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let mappings = mappings(&server, "keep");
    let people = 3000;
    let mut setup: Vec<Vec<String>> = (0..people)
        .map(|i| {
            vec![
                "HSET".into(),
                format!("person2:{i}"),
                "first_name".into(),
                format!("n{i}"),
            ]
        })
        .collect();
    setup.push(vec!["SET".into(), "unwatched".into(), "x".into()]);
    send_all(&mut client, &setup).await;
    client.command(&["SELECT", "1"]).await.expect("select");
    let cars: Vec<Vec<String>> = (0..1500)
        .map(|i| {
            vec![
                "HSET".into(),
                format!("car:{i}"),
                "color".into(),
                "red".into(),
            ]
        })
        .collect();
    send_all(&mut client, &cars).await;
    client.command(&["SELECT", "0"]).await.expect("select");
    let running = start_capture(&server, store.clone(), mappings.clone());
    caught_up(&store, &mut client).await;
    let seq_before = store.checkpoint().expect("checkpoint").next_seq;

    // A change before the flush and one after it, in the same burst.
    send_all(
        &mut client,
        &[
            vec!["HSET".into(), "person2:0".into(), "age".into(), "7".into()],
            vec!["FLUSHDB".into()],
            vec![
                "HSET".into(),
                "person2:new".into(),
                "age".into(),
                "1".into(),
            ],
        ],
    )
    .await;
    caught_up(&store, &mut client).await;
    let flushdb_offset = master_offset(&mut client).await;
    client.command(&["FLUSHALL"]).await.expect("flushall");
    caught_up(&store, &mut client).await;
    let capture = running.stop().await;
    assert_eq!(capture.stats().full_syncs, 1, "no full resync");

    let changes = store.changes(seq_before, usize::MAX).expect("changes");
    let mut deleted: Vec<(String, Bytes)> = changes
        .iter()
        .filter(|c| c.row == RowChange::Delete)
        .map(|c| (c.mapping.to_string(), c.row_id.clone()))
        .collect();
    let count = deleted.len();
    deleted.sort();
    deleted.dedup();
    assert_eq!(deleted.len(), count, "no row is deleted twice");
    assert_eq!(count, people + 1 + 1500, "every row is deleted once");
    let mut unit_sizes = BTreeMap::<u64, usize>::new();
    for change in &changes {
        *unit_sizes.entry(change.unit.0).or_default() += 1;
    }
    assert!(
        unit_sizes.values().all(|n| *n <= 1024),
        "units of at most 1,024 changes: {unit_sizes:?}"
    );
    assert!(unit_sizes.len() >= 6, "the flushes took several units");
    // The FLUSHDB's deletes are all recorded no later than the FLUSHDB itself.
    let people_deletes_offset = changes
        .iter()
        .filter(|c| c.row == RowChange::Delete && &*c.mapping == "People")
        .map(|c| c.offset.0)
        .max()
        .expect("deletes");
    assert!(people_deletes_offset <= flushdb_offset);
    let offsets: Vec<u64> = changes.iter().map(|c| c.offset.0).collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "offsets in order");
    assert_eq!(
        mirror_hashes(&store),
        redis_hashes(&mut client, &mappings).await
    );
    assert!(mirror_hashes(&store).is_empty());
    assert_eq!(
        replay(&store),
        projection(&redis_hashes(&mut client, &mappings).await, &mappings)
    );
}
