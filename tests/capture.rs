//! Durable capture against real `redis-server` processes: the mirror follows Redis, the change
//! log replays to the right rows, restarts resume by PSYNC, WAIT means durable.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mysql_async::prelude::Queryable;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis_protocol::resp2::types::BytesFrame;
use support::RedisServer;
use writebehind::buffer::{MirrorCursor, MirrorKind, RowChange, Store};
use writebehind::capture::mapping::Mappings;
use writebehind::capture::{Capture, CaptureOutputs, CaptureSettings};
use writebehind::config::Config;
use writebehind::position::ChangeSeq;
use writebehind::redis_client::{frame_text, info_field, RedisClient};
use writebehind::replication::{Replicator, ReplicatorOptions};

/// The test configuration; the service writes to a SQLite file next to its buffer, creating the
/// tables.
fn config_text(url: &str, buffer: &str, on_expire: &str) -> String {
    config_text_for(url, buffer, on_expire, &format!("sqlite://{buffer}.db"))
}

fn config_text_for(url: &str, buffer: &str, on_expire: &str, database: &str) -> String {
    format!(
        r#"
[source]
url = "{url}"
[buffer]
path = "{buffer}"
[backends.db]
url = "{database}"
[[mappings]]
name = "People"
prefix = "person2"
backend = "db"
table = "person1"
key_column = "id"
create_table = true
on_expire = "{on_expire}"
[mappings.columns]
first_name = "first"
last_name = "last"
age = "age"
seq = "seq"
[[mappings]]
name = "Cars"
prefix = "car"
db = 1
backend = "db"
table = "car"
key_column = "id"
create_table = true
on_expire = "{on_expire}"
[mappings.columns]
color = "color"
"#
    )
}

fn mappings(server: &RedisServer, on_expire: &str) -> Mappings {
    let config =
        Config::parse(&config_text(&server.url(), "unused", on_expire), &|_| None).expect("config");
    Mappings::new(&config.mappings)
}

/// Capture running in a task of this process.
struct Running {
    task: tokio::task::JoinHandle<Capture>,
    stop: tokio::sync::oneshot::Sender<()>,
}

fn start_capture(server: &RedisServer, store: Arc<Store>, mappings: Mappings) -> Running {
    start_capture_as(
        server.endpoint(),
        store,
        mappings,
        CaptureOutputs::default(),
    )
}

/// Capture connecting as `endpoint` says (a user, a password), reporting to `outputs`.
fn start_capture_as(
    endpoint: writebehind::config::RedisEndpoint,
    store: Arc<Store>,
    mappings: Mappings,
    outputs: CaptureOutputs,
) -> Running {
    let settings = CaptureSettings {
        ops: true,
        // Small, so that tests also read what it evicted from RocksDB.
        mirror_cache_bytes: 256 << 10,
    };
    let mut capture =
        Capture::new(store, mappings, endpoint.clone(), settings, outputs).expect("capture");
    let mut options = ReplicatorOptions::new(endpoint);
    options.timeout = Duration::from_secs(20);
    options.backoff_min = Duration::from_millis(10);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut replicator = Replicator::new(options, capture.resume_position());
        capture
            .run(&mut replicator, async {
                let _ = stopped.await;
            })
            .await
            .expect("capture failed");
        capture
    });
    Running { task, stop }
}

impl Running {
    async fn stop(self) -> Capture {
        let _ = self.stop.send(());
        self.task.await.expect("capture task")
    }
}

async fn master_offset(client: &mut RedisClient) -> u64 {
    let info = client.info("replication").await.expect("info");
    info_field(&info, "master_repl_offset")
        .and_then(|v| v.parse().ok())
        .expect("offset")
}

/// Waits until the store's checkpoint reaches the primary's current offset.
async fn caught_up(store: &Store, client: &mut RedisClient) {
    let target = master_offset(client).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let checkpoint = store.checkpoint().expect("checkpoint");
        if checkpoint
            .position
            .as_ref()
            .is_some_and(|p| p.offset.0 >= target)
            && !checkpoint.full_sync_in_progress
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "capture did not reach offset {target}: {checkpoint:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Hashes = BTreeMap<(u32, Bytes), BTreeMap<Bytes, Bytes>>;

/// Every watched hash in Redis.
async fn redis_hashes(client: &mut RedisClient, mappings: &Mappings) -> Hashes {
    let mut out = BTreeMap::new();
    for mapping in mappings.iter() {
        client
            .command(&["SELECT", &mapping.db.to_string()])
            .await
            .expect("select");
        let pattern = format!("{}*", String::from_utf8_lossy(&mapping.key_prefix));
        let BytesFrame::Array(keys) = client.command(&["KEYS", &pattern]).await.expect("keys")
        else {
            panic!("KEYS")
        };
        for key in keys {
            let BytesFrame::BulkString(key) = key else {
                continue;
            };
            if frame_text(&client.command(&[&b"TYPE"[..], &key]).await.expect("type")) != "hash" {
                continue;
            }
            let BytesFrame::Array(items) = client
                .command(&[&b"HGETALL"[..], &key])
                .await
                .expect("hgetall")
            else {
                panic!("HGETALL")
            };
            let fields = items
                .chunks(2)
                .filter_map(|p| match (&p[0], &p[1]) {
                    (BytesFrame::BulkString(f), BytesFrame::BulkString(v)) => {
                        Some((f.clone(), v.clone()))
                    }
                    _ => None,
                })
                .collect();
            out.insert((mapping.db, key), fields);
        }
    }
    client.command(&["SELECT", "0"]).await.expect("select");
    out
}

fn mirror_hashes(store: &Store) -> Hashes {
    store
        .mirror_scan(None, &MirrorCursor::default(), usize::MAX)
        .expect("scan")
        .entries
        .into_iter()
        .filter(|(_, _, v)| v.kind == MirrorKind::Hash)
        .map(|(db, key, v)| {
            (
                (db, key),
                v.fields.into_iter().map(|(f, v)| (f, v.value)).collect(),
            )
        })
        .collect()
}

type Rows = BTreeMap<(String, Bytes), Vec<(String, Option<Bytes>)>>;

/// Replays the whole change log over an empty table.
fn replay(store: &Store) -> Rows {
    let mut rows = BTreeMap::new();
    let mut from = ChangeSeq::NONE;
    loop {
        let page = store.changes(from, 1000).expect("changes");
        let Some(last) = page.last() else { break };
        from = last.seq.next();
        for change in page {
            match change.row {
                RowChange::Upsert { columns } => {
                    rows.insert((change.mapping, change.row_id), columns);
                }
                RowChange::Delete => {
                    rows.remove(&(change.mapping, change.row_id));
                }
            }
        }
    }
    rows
}

/// The rows the tables should hold for these hashes.
fn projection(hashes: &Hashes, mappings: &Mappings) -> Rows {
    let mut rows = BTreeMap::new();
    for ((db, key), fields) in hashes {
        let Some(mapping) = mappings.watching(*db, key) else {
            continue;
        };
        let fields = fields
            .iter()
            .map(|(f, v)| {
                (
                    f.clone(),
                    writebehind::buffer::FieldValue {
                        value: v.clone(),
                        expire_at_ms: None,
                    },
                )
            })
            .collect();
        rows.insert(
            (mapping.name.clone(), mapping.row_id(key)),
            mapping.row_image(&fields),
        );
    }
    rows
}

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

async fn send_all(client: &mut RedisClient, commands: &[Vec<String>]) {
    for chunk in commands.chunks(200) {
        let refs: Vec<Vec<&str>> = chunk
            .iter()
            .map(|c| c.iter().map(String::as_str).collect())
            .collect();
        let slices: Vec<&[&str]> = refs.iter().map(Vec::as_slice).collect();
        client.pipeline(&slices).await.expect("pipeline");
    }
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
            value.fields[&Bytes::from("first_name")].value,
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
        value.fields[&Bytes::from("first_name")].value,
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
                        .find(|(c, _)| c == "age")
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

/// Writes a service configuration for `server` into `dir`; returns (config, buffer) paths.
fn service_config(
    server: &RedisServer,
    dir: &tempfile::TempDir,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let buffer = dir.path().join("buffer");
    let database = format!("sqlite://{}.db", buffer.display());
    service_config_for(server, dir, &database)
}

fn service_config_for(
    server: &RedisServer,
    dir: &tempfile::TempDir,
    database: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let buffer = dir.path().join("buffer");
    let config = dir.path().join("writebehind.toml");
    std::fs::write(
        &config,
        config_text_for(
            &server.url(),
            &buffer.display().to_string(),
            "keep",
            database,
        ),
    )
    .expect("config");
    (config, buffer)
}

/// The database of the kill test, with triggers that count every write of a row.
enum CountedDb {
    Sqlite(std::path::PathBuf),
    Maria {
        pool: mysql_async::Pool,
        admin: mysql_async::Pool,
        name: String,
    },
}

impl CountedDb {
    async fn maria() -> CountedDb {
        let admin = mysql_async::Pool::new(format!("{}/mysql", support::SHARED_MARIADB).as_str());
        let (name, url) = support::create_database(support::SHARED_MARIADB, "wb_kill").await;
        let pool = mysql_async::Pool::new(url.as_str());
        let mut conn = pool.get_conn().await.expect("conn");
        for statement in [
            "CREATE TABLE person1 (id VARCHAR(64) PRIMARY KEY, first TEXT, last TEXT, age TEXT, seq BIGINT)",
            "CREATE TABLE writes (id VARCHAR(64))",
            "CREATE TRIGGER counted_insert AFTER INSERT ON person1 FOR EACH ROW INSERT INTO writes VALUES (NEW.id)",
            "CREATE TRIGGER counted_update AFTER UPDATE ON person1 FOR EACH ROW INSERT INTO writes VALUES (NEW.id)",
            "CREATE TABLE car (id VARCHAR(64) PRIMARY KEY, color TEXT)",
        ] {
            conn.query_drop(statement).await.expect(statement);
        }
        CountedDb::Maria { pool, admin, name }
    }

    fn sqlite(path: std::path::PathBuf) -> CountedDb {
        rusqlite::Connection::open(&path)
            .expect("sqlite")
            .execute_batch(
                "CREATE TABLE person1 (id TEXT PRIMARY KEY, first TEXT, last TEXT, age TEXT, seq INTEGER);
                 CREATE TABLE writes (id TEXT);
                 CREATE TRIGGER counted_insert AFTER INSERT ON person1 BEGIN INSERT INTO writes VALUES (NEW.id); END;
                 CREATE TRIGGER counted_update AFTER UPDATE ON person1 BEGIN INSERT INTO writes VALUES (NEW.id); END;",
            )
            .expect("schema");
        CountedDb::Sqlite(path)
    }

    fn url(&self) -> String {
        match self {
            CountedDb::Sqlite(path) => format!("sqlite://{}", path.display()),
            CountedDb::Maria { name, .. } => format!("mysql://root@127.0.0.1:3306/{name}"),
        }
    }

    /// (rows, seqs in order, rows written more than once)
    async fn counts(&self) -> (u64, Vec<u64>, u64) {
        match self {
            CountedDb::Sqlite(path) => {
                let Ok(db) = rusqlite::Connection::open(path) else {
                    return (0, vec![], 0);
                };
                let rows = db
                    .query_row("SELECT COUNT(*) FROM person1", [], |r| r.get::<_, i64>(0))
                    .unwrap_or(0) as u64;
                let seqs = db
                    .prepare("SELECT seq FROM person1 ORDER BY seq")
                    .and_then(|mut s| {
                        s.query_map([], |r| r.get::<_, i64>(0))
                            .map(|rows| rows.filter_map(Result::ok).map(|v| v as u64).collect())
                    })
                    .unwrap_or_default();
                let twice = db.query_row("SELECT COUNT(*) FROM (SELECT id FROM writes GROUP BY id HAVING COUNT(*) > 1)", [], |r| r.get::<_, i64>(0)).unwrap_or(0) as u64;
                (rows, seqs, twice)
            }
            CountedDb::Maria { pool, .. } => {
                let Ok(mut conn) = pool.get_conn().await else {
                    return (0, vec![], 0);
                };
                let rows: Option<u64> = conn
                    .query_first("SELECT COUNT(*) FROM person1")
                    .await
                    .unwrap_or(None);
                let seqs: Vec<u64> = conn
                    .query("SELECT seq FROM person1 ORDER BY seq")
                    .await
                    .unwrap_or_default();
                let twice: Option<u64> = conn.query_first("SELECT COUNT(*) FROM (SELECT id FROM writes GROUP BY id HAVING COUNT(*) > 1) t").await.unwrap_or(None);
                (rows.unwrap_or(0), seqs, twice.unwrap_or(0))
            }
        }
    }

    async fn row_count(&self) -> u64 {
        match self {
            CountedDb::Sqlite(path) => rusqlite::Connection::open(path)
                .and_then(|c| {
                    c.query_row("SELECT COUNT(*) FROM person1", [], |r| r.get::<_, i64>(0))
                })
                .map(|n| n as u64)
                .unwrap_or(0),
            CountedDb::Maria { pool, .. } => match pool.get_conn().await {
                Ok(mut conn) => conn
                    .query_first::<u64, _>("SELECT COUNT(*) FROM person1")
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(0),
                Err(_) => 0,
            },
        }
    }

    async fn drop_database(self) {
        if let CountedDb::Maria { admin, name, pool } = self {
            pool.disconnect().await.ok();
            admin
                .get_conn()
                .await
                .expect("conn")
                .query_drop(format!("DROP DATABASE {name}"))
                .await
                .ok();
            admin.disconnect().await.ok();
        }
    }
}

/// Starts `writebehind run` on `config`.
fn spawn_service(config: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_writebehind"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start writebehind")
}

/// The primary's view of our acknowledged offset (`slave0:...,offset=N`).
async fn replica_ack_offset(client: &mut RedisClient) -> Option<u64> {
    let info = client.info("replication").await.ok()?;
    let line = info_field(&info, "slave0")?;
    line.split(',')
        .find_map(|part| part.strip_prefix("offset="))
        .and_then(|o| o.parse().ok())
}

/// Every write makes a new row (`person2:<n>` with `seq = n`), so that no two writes coalesce:
/// the table must end with exactly rows 1..N, each written once (triggers count the writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_at_random_instants_loses_and_repeats_nothing_sqlite() {
    kill_dash_nine(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_at_random_instants_loses_and_repeats_nothing_mariadb() {
    kill_dash_nine(true).await;
}

async fn kill_dash_nine(mariadb: bool) {
    // The backlog must cover the writes made while the service restarts (README: sizing it).
    let server = RedisServer::start(&["--repl-backlog-size", "256mb"]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let database = if mariadb {
        CountedDb::maria().await
    } else {
        CountedDb::sqlite(dir.path().join("writebehind.db"))
    };
    let (config, buffer) = service_config_for(&server, &dir, &database.url());
    let mut rng = StdRng::seed_from_u64(9);
    let mut service = spawn_service(&config);
    // The first attach is a full sync of an empty database; writes start once it is done.
    let deadline = Instant::now() + Duration::from_secs(30);
    while replica_ack_offset(&mut client).await.is_none() {
        assert!(Instant::now() < deadline, "the service never attached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut next_seq = 1u64;
    let kills = 20;
    for round in 0..=kills {
        // Each restarted service first attaches (a partial resync), so that every kill hits a
        // running capture; then writes flow and it is killed at a random instant.
        let deadline = Instant::now() + Duration::from_secs(30);
        while round > 0
            && info_field(
                &client.info("stats").await.expect("info"),
                "sync_partial_ok",
            ) != Some(round.to_string().as_str())
        {
            assert!(Instant::now() < deadline, "restart {round} did not attach");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let kill_after = Duration::from_millis(rng.random_range(50..400));
        let started = Instant::now();
        while started.elapsed() < kill_after || round == kills {
            let commands: Vec<Vec<String>> = (0..50)
                .map(|_| {
                    let seq = next_seq.to_string();
                    next_seq += 1;
                    vec!["HSET".into(), format!("person2:{seq}"), "seq".into(), seq]
                })
                .collect();
            send_all(&mut client, &commands).await;
            if round == kills {
                break;
            }
        }
        if round < kills {
            let _ = service.kill();
            let _ = service.wait();
            service = spawn_service(&config);
        }
    }
    // Let the last service capture and apply everything, then stop it.
    let target = master_offset(&mut client).await;
    let written = next_seq - 1;
    let deadline = Instant::now() + Duration::from_secs(120);
    while replica_ack_offset(&mut client)
        .await
        .is_none_or(|o| o < target)
        || database.row_count().await < written
    {
        assert!(
            Instant::now() < deadline,
            "the service never caught up (offset {target}, {written} rows)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = service.kill();
    let _ = service.wait();

    let stats = client.info("stats").await.expect("info");
    let log: Vec<String> = server
        .log()
        .lines()
        .filter(|l| l.contains("esync") || l.contains("PSYNC") || l.contains("backlog"))
        .map(String::from)
        .collect();
    assert_eq!(
        info_field(&stats, "sync_full"),
        Some("1"),
        "only the first attach may be a full sync:\n{}",
        log.join("\n")
    );
    assert_eq!(
        info_field(&stats, "sync_partial_ok"),
        Some(kills.to_string().as_str()),
        "every restart resumed with PSYNC"
    );

    let (rows, seqs, twice) = database.counts().await;
    assert_eq!(rows, written);
    assert_eq!(
        seqs,
        (1..next_seq).collect::<Vec<u64>>(),
        "every write arrived"
    );
    assert_eq!(twice, 0, "no row was written twice");
    // The mirror holds every key; a sample is compared field by field with Redis (reading all
    // of several hundred thousand keys back from Redis would dominate the test).
    let store = Store::open(&buffer).expect("store");
    let mirror = mirror_hashes(&store);
    assert_eq!(mirror.len() as u64, written);
    for _ in 0..200 {
        let key = format!("person2:{}", rng.random_range(1..next_seq));
        let BytesFrame::Array(items) = client.command(&["HGETALL", &key]).await.expect("hgetall")
        else {
            panic!("HGETALL")
        };
        let fields: BTreeMap<Bytes, Bytes> = items
            .chunks(2)
            .filter_map(|p| match (&p[0], &p[1]) {
                (BytesFrame::BulkString(f), BytesFrame::BulkString(v)) => {
                    Some((f.clone(), v.clone()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            mirror.get(&(0, Bytes::from(key.clone()))),
            Some(&fields),
            "{key}"
        );
    }
    database.drop_database().await;
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
                c.mapping,
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
        .map(|c| (c.mapping.clone(), c.row_id.clone()))
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
        .filter(|c| c.row == RowChange::Delete && c.mapping == "People")
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

/// A service killed (-9) while it deletes a large flush page by page resumes with PSYNC, the
/// flush arrives again and deletes what is left: the table ends empty, nothing comes back, and no
/// full resync is needed (docs/design.md 5.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_during_a_paged_flush_deletes_every_row_once_resumed() {
    let server = RedisServer::start(&["--repl-backlog-size", "64mb"]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let database = CountedDb::sqlite(dir.path().join("writebehind.db"));
    let (config, buffer) = service_config_for(&server, &dir, &database.url());
    let keys = 30_000u64;
    let fill: Vec<Vec<String>> = (1..=keys)
        .map(|i| {
            vec![
                "HSET".into(),
                format!("person2:{i}"),
                "seq".into(),
                i.to_string(),
            ]
        })
        .collect();
    send_all(&mut client, &fill).await;
    let mut service = spawn_service(&config);
    let deadline = Instant::now() + Duration::from_secs(120);
    while database.row_count().await < keys {
        assert!(Instant::now() < deadline, "the initial load did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.command(&["FLUSHALL"]).await.expect("flushall");
    let mut rng = StdRng::seed_from_u64(13);
    let kills = 5;
    let mut mirrored_at_kills = Vec::new();
    for round in 1..=kills {
        // Killed while the pages are being deleted (or just after: both must end the same).
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..150))).await;
        let _ = service.kill();
        let _ = service.wait();
        let store = Store::open(&buffer).expect("store");
        mirrored_at_kills.push(mirror_hashes(&store).len() as u64);
        drop(store);
        service = spawn_service(&config);
        let deadline = Instant::now() + Duration::from_secs(30);
        while info_field(
            &client.info("stats").await.expect("info"),
            "sync_partial_ok",
        ) != Some(round.to_string().as_str())
        {
            assert!(Instant::now() < deadline, "restart {round} did not attach");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let target = master_offset(&mut client).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while replica_ack_offset(&mut client)
        .await
        .is_none_or(|o| o < target)
        || database.row_count().await > 0
    {
        assert!(
            Instant::now() < deadline,
            "the flush did not complete: {} rows left",
            database.row_count().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = service.kill();
    let _ = service.wait();
    assert!(
        mirrored_at_kills.iter().any(|n| *n > 0 && *n < keys),
        "a kill landed in the middle of the paged flush: {mirrored_at_kills:?}"
    );
    let stats = client.info("stats").await.expect("info");
    assert_eq!(info_field(&stats, "sync_full"), Some("1"), "no full resync");
    assert_eq!(database.row_count().await, 0);
    let store = Store::open(&buffer).expect("store");
    assert!(mirror_hashes(&store).is_empty(), "the mirror is empty too");
}
