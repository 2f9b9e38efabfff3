//! Failover: the service follows the promoted primary (a node list or Sentinel) and resumes from
//! its checkpoint; when it was ahead of the promoted replica, a full sync reconciles the table
//! to the new primary. Real redis-server processes and Sentinels; the `writebehind` binary
//! writing to SQLite.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use redis_protocol::resp2::types::BytesFrame;
use support::{RedisServer, SentinelServer};
use writebehind::redis_client::{frame_text, info_field, RedisClient};

type Rows = BTreeMap<String, (Option<String>, Option<String>)>;

struct Service {
    /// Killed when dropped.
    _child: support::ServiceProcess,
    database: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Service {
    /// Starts `writebehind run` with `source` as the `[source]` section.
    fn start(source: &str) -> Service {
        let dir = tempfile::tempdir().expect("dir");
        let database = dir.path().join("writebehind.db");
        let config = dir.path().join("writebehind.toml");
        std::fs::write(
            &config,
            format!(
                "[admin]\nlisten = \"\"\n[source]\n{source}\n[buffer]\npath = \"{}\"\n[replication]\ntimeout_secs = 5\n[backends.db]\nurl = \"sqlite://{}\"\n\
                 [[mappings]]\nname = \"People\"\nprefix = \"person2\"\nbackend = \"db\"\ntable = \"person1\"\nkey_column = \"id\"\ncreate_table = true\n\
                 [mappings.columns]\nfirst_name = \"first\"\nage = \"age\"\n",
                dir.path().join("buffer").display(),
                database.display()
            ),
        )
        .expect("config");
        let child = support::spawn_service(
            &config,
            std::fs::File::create(dir.path().join("service.log")).expect("log"),
        );
        Service {
            _child: child,
            database,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("service.log")).unwrap_or_default()
    }

    fn table(&self) -> Rows {
        let Ok(db) = rusqlite::Connection::open(&self.database) else {
            return Rows::new();
        };
        let Ok(mut statement) = db.prepare("SELECT id, first, age FROM person1") else {
            return Rows::new();
        };
        statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?))))
            .map(|rows| rows.filter_map(Result::ok).collect())
            .unwrap_or_default()
    }

    /// Polls until the table equals the projection of `primary`'s hashes.
    async fn converges_to(&self, primary: &mut RedisClient) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let expected = projection(primary).await;
            let table = self.table();
            if table == expected {
                return;
            }
            assert!(Instant::now() < deadline, "table never matched the primary:\ntable {table:?}\nexpected {expected:?}\nservice log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn projection(client: &mut RedisClient) -> Rows {
    let mut rows = Rows::new();
    let BytesFrame::Array(keys) = client.command(&["KEYS", "person2:*"]).await.expect("keys")
    else {
        return rows;
    };
    for key in keys {
        let key = frame_text(&key);
        let BytesFrame::Array(items) = client.command(&["HGETALL", &key]).await.expect("hgetall")
        else {
            continue;
        };
        let fields: BTreeMap<String, String> = items
            .chunks(2)
            .map(|p| (frame_text(&p[0]), frame_text(&p[1])))
            .collect();
        let id = key.trim_start_matches("person2:").to_string();
        rows.insert(
            id,
            (
                fields.get("first_name").cloned(),
                fields.get("age").cloned(),
            ),
        );
    }
    rows
}

async fn offset(client: &mut RedisClient) -> u64 {
    let info = client.info("replication").await.expect("info");
    info_field(&info, "master_repl_offset")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Waits until the replica has everything the primary has.
async fn replica_caught_up(primary: &mut RedisClient, replica: &mut RedisClient) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (p, r) = (offset(primary).await, offset(replica).await);
        if p == r && p > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica stuck at {r}, primary at {p}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn hset(client: &mut RedisClient, range: std::ops::Range<u32>, first: &str) {
    for i in range {
        client
            .command(&[
                "HSET",
                &format!("person2:{i}"),
                "first_name",
                first,
                "age",
                &i.to_string(),
            ])
            .await
            .expect("hset");
    }
}

fn pair() -> (RedisServer, RedisServer) {
    let primary = RedisServer::start(&[]);
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    (primary, replica)
}

async fn stat(client: &mut RedisClient, name: &str) -> u64 {
    let info = client.info("stats").await.expect("info");
    info_field(&info, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A primary and its replica, the service following them as `nodes`, `rows` written and
/// applied, and the replica caught up.
async fn attached_pair(
    rows: std::ops::Range<u32>,
) -> (RedisServer, RedisServer, RedisClient, RedisClient, Service) {
    let (primary, replica) = pair();
    let (mut p, mut r) = (primary.client().await, replica.client().await);
    let service = Service::start(&format!(
        "nodes = [\"{}\", \"{}\"]",
        primary.url(),
        replica.url()
    ));
    hset(&mut p, rows, "old").await;
    service.converges_to(&mut p).await;
    replica_caught_up(&mut p, &mut r).await;
    (primary, replica, p, r, service)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_replica_is_followed_with_continue() {
    let (mut primary, _replica, _p, mut r, service) = attached_pair(1..50).await;

    r.command(&["REPLICAOF", "NO", "ONE"])
        .await
        .expect("promote");
    primary.kill();
    hset(&mut r, 40..60, "new").await;
    r.command(&["DEL", "person2:1"]).await.expect("del");
    service.converges_to(&mut r).await;
    assert_eq!(
        stat(&mut r, "sync_full").await,
        0,
        "no full sync:\n{}",
        service.log()
    );
    assert_eq!(
        stat(&mut r, "sync_partial_ok").await,
        1,
        "+CONTINUE from the new primary:\n{}",
        service.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_ahead_of_the_promoted_replica_is_reconciled_by_a_full_sync() {
    let (mut primary, _replica, mut p, mut r, service) = attached_pair(1..20).await;

    // The replica leaves; the old primary goes on taking writes that only the service sees.
    r.command(&["REPLICAOF", "NO", "ONE"])
        .await
        .expect("promote");
    hset(&mut p, 100..110, "lost").await;
    p.command(&["DEL", "person2:5"]).await.expect("del");
    service.converges_to(&mut p).await;
    primary.kill();
    hset(&mut r, 200..205, "new").await;
    service.converges_to(&mut r).await;
    assert_eq!(
        stat(&mut r, "sync_full").await,
        1,
        "the service was ahead: full sync:\n{}",
        service.log()
    );
    let table = service.table();
    assert!(
        table.contains_key("5"),
        "person2:5 is back: the new primary never saw its DEL"
    );
    assert!(
        (100..110).all(|i| !table.contains_key(&i.to_string())),
        "rows of writes the new primary never got are gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_is_followed_and_never_picks_the_service() {
    let (mut primary, replica) = pair();
    let (mut p, mut r) = (primary.client().await, replica.client().await);
    let sentinels: Vec<SentinelServer> = (0..3)
        .map(|_| SentinelServer::start("mymaster", primary.port, 2))
        .collect();
    let list: Vec<String> = sentinels
        .iter()
        .map(|s| format!("\"{}\"", s.url()))
        .collect();
    let service = Service::start(&format!(
        "sentinels = [{}]\nmaster_name = \"mymaster\"",
        list.join(", ")
    ));
    hset(&mut p, 1..30, "old").await;
    service.converges_to(&mut p).await;
    replica_caught_up(&mut p, &mut r).await;

    primary.kill();
    // Sentinel promotes the replica (the service announces port 1, where nothing answers).
    until_sentinel_names(&sentinels[0], replica.port).await;
    follows_with_continue(&replica, &service).await;
}

/// Waits until `sentinel` names `port` as the primary; it must never name the service (port 1).
async fn until_sentinel_names(sentinel: &SentinelServer, port: u16) {
    let mut client = RedisClient::connect(
        &writebehind::config::RedisEndpoint::parse(&sentinel.url()).expect("url"),
        Duration::from_secs(5),
    )
    .await
    .expect("sentinel");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = client
            .command(&["SENTINEL", "get-master-addr-by-name", "mymaster"])
            .await
            .expect("sentinel");
        let BytesFrame::Array(address) = reply else {
            panic!("{reply:?}")
        };
        let named = frame_text(&address[1]);
        assert_ne!(named, "1", "Sentinel picked the service");
        if named == port.to_string() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no failover:\n{}",
            sentinel.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes to the promoted `replica` and checks that the service follows it with a partial
/// resync; the client on it.
async fn follows_with_continue(replica: &RedisServer, service: &Service) -> RedisClient {
    // Sentinel closes the promoted node's client connections when it promotes it.
    let mut r = replica.client().await;
    hset(&mut r, 25..40, "new").await;
    service.converges_to(&mut r).await;
    assert_eq!(
        stat(&mut r, "sync_full").await,
        0,
        "the service resumed with PSYNC:\n{}",
        service.log()
    );
    r
}

/// The first entry of the ack stream `stream` (XREAD BLOCK 2000, as a recipe client), retried
/// a few times.
async fn ack(client: &mut RedisClient, stream: &str, service: &Service) -> String {
    for _ in 0..10 {
        let reply = client
            .command(&["XREAD", "BLOCK", "2000", "STREAMS", stream, "0-0"])
            .await
            .expect("xread");
        if let BytesFrame::Array(streams) = reply {
            return format!("{streams:?}");
        }
    }
    panic!("no ack on {stream}; service log:\n{}", service.log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn op_completions_and_acks_follow_the_promoted_primary() {
    let (mut primary, _replica, mut p, mut r, service) = attached_pair(1..10).await;
    // An op on the old primary, completed and acknowledged there, replicated to the replica.
    p.command(&["HSET", "person2:1", "first_name", "x", "#", "=before"])
        .await
        .expect("hset");
    ack(&mut p, "{person2:1}before", &service).await;
    replica_caught_up(&mut p, &mut r).await;

    r.command(&["REPLICAOF", "NO", "ONE"])
        .await
        .expect("promote");
    primary.kill();
    // The library came with the replication stream; ops on the new primary are completed and
    // acknowledged there, also when the client writes again at once.
    assert_eq!(
        r.command(&["FCALL", "writebehind_version", "0"])
            .await
            .expect("library on the promoted replica"),
        BytesFrame::Integer(writebehind::ack::LIBRARY_VERSION)
    );
    r.pipeline(&[
        &["HSET", "person2:2", "first_name", "gone", "#", "-after"][..],
        &["HSET", "person2:2", "age", "7"][..],
    ])
    .await
    .expect("pipeline");
    let acked = ack(&mut r, "{person2:2}after", &service).await;
    assert!(acked.contains("done"), "{acked}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let BytesFrame::Array(items) = r.command(&["HGETALL", "person2:2"]).await.expect("hgetall")
        else {
            panic!("HGETALL")
        };
        let fields: Vec<String> = items.iter().map(frame_text).collect();
        if fields == ["age", "7"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the `-` op was not completed on the new primary: {fields:?}\n{}",
            service.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    service.converges_to(&mut r).await;
    assert_eq!(
        service.table().get("2"),
        Some(&(None, Some("7".to_string()))),
        "the row has only the write after the op"
    );
}

/// All over TLS: a primary and its replica replicating with TLS, three Sentinels reached with
/// TLS (`rediss://`, naming the nodes by IP: `server_name` says what their certificate
/// carries), the service following the Sentinels' failover with a partial resync, and an op on
/// the promoted primary acknowledged there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_over_tls() {
    let certs = support::tls::TestCerts::generate();
    let Some((mut primary, primary_tls)) = support::tls::tls_redis(&certs, false, &[]) else {
        return;
    };
    let (replica, replica_tls) = support::tls::tls_redis(
        &certs,
        false,
        &["--replicaof", "127.0.0.1", &primary_tls.to_string()],
    )
    .expect("TLS, as the primary");
    let (mut p, mut r) = (primary.client().await, replica.client().await);
    let sentinels: Vec<(SentinelServer, u16)> = (0..3)
        .map(|_| support::tls::tls_sentinel(&certs, "mymaster", primary_tls, 2))
        .collect();
    let list: Vec<String> = sentinels
        .iter()
        .map(|(_, port)| format!("\"rediss://127.0.0.1:{port}\""))
        .collect();
    let service = Service::start(&format!(
        "sentinels = [{}]\nmaster_name = \"mymaster\"\n[source.tls]\nca_file = \"{}\"\nserver_name = \"localhost\"",
        list.join(", "),
        certs.ca.display()
    ));
    hset(&mut p, 1..30, "old").await;
    service.converges_to(&mut p).await;
    replica_caught_up(&mut p, &mut r).await;

    primary.kill();
    until_sentinel_names(&sentinels[0].0, replica_tls).await;
    let mut r = follows_with_continue(&replica, &service).await;
    r.command(&["HSET", "person2:3", "first_name", "z", "#", "=tls"])
        .await
        .expect("hset");
    let acked = ack(&mut r, "{person2:3}tls", &service).await;
    assert!(acked.contains("done"), "{acked}");
}
