//! The `#` op field and acknowledgements (docs/design.md section 4), end to end: the `writebehind`
//! binary between a real redis-server and a fresh MariaDB database. The original recipe's
//! scenarios (rgsync `testSimpleWriteBehind`, `testWriteBehindAck`,
//! `testWriteBehindOperations`, the README's `XREAD BLOCK` example), the pipelined races, `# =`
//! alone, invalid ops, the atomic entry point, dead-lettered acks, the library upgrade, and a
//! primary without functions.

mod support;

use std::process::Child;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use redis_protocol::resp2::types::BytesFrame;
use support::{MariaDbServer, RedisServer};
use writebehind::redis_client::RedisClient;

const TABLE: &str = "CREATE TABLE persons (person_id VARCHAR(100) PRIMARY KEY, first VARCHAR(100), last VARCHAR(100), age INT)";
const TABLE2: &str = "CREATE TABLE persons2 (person_id VARCHAR(100) PRIMARY KEY, first VARCHAR(100), last VARCHAR(100), age INT)";

type Row = (Option<String>, Option<String>, Option<i64>);
/// (op, the hash in Redis afterwards, the row afterwards)
type RaceCase = (&'static str, &'static [(&'static str, &'static str)], Row);

struct Setup {
    _redis: RedisServer,
    client: RedisClient,
    pool: mysql_async::Pool,
    database: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Setup {
    /// Redis (with `extra` arguments), a fresh database with the recipe's tables, and the
    /// service; `before` runs against Redis before the service starts.
    async fn start(extra: &[&str]) -> Setup {
        Setup::start_on(extra, support::SHARED_MARIADB).await
    }

    /// The same, with the database on the MariaDB server at `server` (`mysql://user@host:port`).
    async fn start_on(extra: &[&str], server: &str) -> Setup {
        let redis = RedisServer::start(extra);
        let client = redis.client().await;
        let (database, url) = support::create_database(server, "wb_ops").await;
        let pool = mysql_async::Pool::new(url.as_str());
        let mut conn = pool.get_conn().await.expect("conn");
        conn.query_drop(TABLE).await.expect("table");
        conn.query_drop(TABLE2).await.expect("table");
        drop(conn);
        let dir = tempfile::tempdir().expect("dir");
        let mut mappings = String::new();
        for (name, prefix, table) in [
            ("Persons", "person", "persons"),
            ("Persons2", "person2", "persons2"),
        ] {
            mappings.push_str(&format!(
                "[[mappings]]\nname = \"{name}\"\nprefix = \"{prefix}\"\nbackend = \"db\"\ntable = \"{table}\"\nkey_column = \"person_id\"\n\
                 [mappings.columns]\nfirst_name = \"first\"\nlast_name = \"last\"\nage = \"age\"\n"
            ));
        }
        std::fs::write(
            dir.path().join("writebehind.toml"),
            format!(
                "[source]\nurl = \"{}\"\n[buffer]\npath = \"{}\"\n[backends.db]\nurl = \"{url}\"\n{mappings}",
                redis.url(),
                dir.path().join("buffer").display()
            ),
        )
        .expect("config");
        Setup {
            _redis: redis,
            client,
            pool,
            database,
            child: None,
            dir,
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("service.log")).expect("log");
        self.child = Some(support::spawn_service(
            &self.dir.path().join("writebehind.toml"),
            log,
        ));
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("service.log")).unwrap_or_default()
    }

    async fn redis(&mut self, args: &[&str]) -> BytesFrame {
        self.client.command(args).await.expect("redis command")
    }

    /// The hash as sorted (field, value) pairs.
    async fn hash(&mut self, key: &str) -> Vec<(String, String)> {
        let BytesFrame::Array(items) = self.redis(&["HGETALL", key]).await else {
            panic!("HGETALL is not an array")
        };
        let text: Vec<String> = items
            .iter()
            .map(writebehind::redis_client::frame_text)
            .collect();
        let mut pairs: Vec<(String, String)> = text
            .chunks(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect();
        pairs.sort();
        pairs
    }

    async fn row(&self, table: &str, id: &str) -> Option<Row> {
        let mut conn = self.pool.get_conn().await.expect("conn");
        conn.exec_first(
            format!("SELECT first, last, age FROM {table} WHERE person_id = ?"),
            (id,),
        )
        .await
        .expect("select")
    }

    /// `XREAD BLOCK 2000 STREAMS <stream> 0-0`, as the recipe's clients do: the first entry's
    /// fields, or `None` when nothing arrived within 2 s.
    async fn xread(&mut self, stream: &str) -> Option<Vec<String>> {
        let reply = self
            .redis(&["XREAD", "BLOCK", "2000", "STREAMS", stream, "0-0"])
            .await;
        let BytesFrame::Array(streams) = reply else {
            return None;
        };
        let BytesFrame::Array(stream) = streams.first()? else {
            return None;
        };
        let BytesFrame::Array(entries) = stream.get(1)? else {
            return None;
        };
        let BytesFrame::Array(entry) = entries.first()? else {
            return None;
        };
        let BytesFrame::Array(fields) = entry.get(1)? else {
            return None;
        };
        Some(
            fields
                .iter()
                .map(writebehind::redis_client::frame_text)
                .collect(),
        )
    }

    /// Waits for the ack `{key}uuid` (several 2 s `XREAD BLOCK`s at most) and returns it.
    async fn ack(&mut self, key: &str, uuid: &str) -> Vec<String> {
        let stream = format!("{{{key}}}{uuid}");
        for _ in 0..10 {
            if let Some(fields) = self.xread(&stream).await {
                return fields;
            }
        }
        panic!("no ack on {stream}; service log:\n{}", self.log())
    }

    /// `FCALL writebehind_version 0`, when the library is loaded.
    async fn library_version(&mut self) -> Option<i64> {
        match self
            .client
            .command(&["FCALL", "writebehind_version", "0"])
            .await
        {
            Ok(BytesFrame::Integer(version)) => Some(version),
            _ => None,
        }
    }

    async fn keys(&mut self, pattern: &str) -> Vec<String> {
        match self.redis(&["KEYS", pattern]).await {
            BytesFrame::Array(items) => items
                .iter()
                .map(writebehind::redis_client::frame_text)
                .collect(),
            _ => Vec::new(),
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let (pool, database) = (self.pool.clone(), self.database.clone());
        // Best effort: the database is dropped by a fresh connection.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async move {
                    if let Ok(mut conn) = pool.get_conn().await {
                        let _ = conn.query_drop(format!("DROP DATABASE {database}")).await;
                    }
                });
            }
        })
        .join()
        .ok();
    }
}

/// Polls `condition` (an expression that may `.await`) until it holds, with a deadline.
macro_rules! until {
    ($t:ident, $what:expr, $condition:expr) => {{
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if $condition {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {}; service log:\n{}",
                $what,
                $t.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }};
}

fn done() -> Vec<String> {
    vec!["status".into(), "done".into()]
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = items
        .iter()
        .map(|(f, v)| (f.to_string(), v.to_string()))
        .collect();
    out.sort();
    out
}

const PERSON: [&str; 8] = [
    "HSET",
    "person:1",
    "first_name",
    "foo",
    "last_name",
    "bar",
    "age",
    "22",
];

fn person_with_op(op: &str) -> Vec<&str> {
    let mut command = PERSON.to_vec();
    command.extend(["#", op]);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recipes_scenarios_pass() {
    let mut t = Setup::start(&[]).await;
    // An older library (version 0) is upgraded at start.
    let old = "#!lua name=writebehind\nredis.register_function{function_name='writebehind_version', callback=function() return 0 end, flags={'no-writes'}}";
    t.redis(&["FUNCTION", "LOAD", old]).await;
    t.spawn();
    until!(
        t,
        "the library upgrade",
        t.library_version().await == Some(writebehind::ack::LIBRARY_VERSION)
    );

    // testSimpleWriteBehind
    t.redis(&PERSON).await;
    until!(
        t,
        "the row",
        t.row("persons", "1").await == Some((s("foo"), s("bar"), Some(22)))
    );
    t.redis(&["DEL", "person:1"]).await;
    until!(t, "the delete", t.row("persons", "1").await.is_none());

    // testWriteBehindAck: `=1` acks after the row is written, `~2` after it is deleted.
    t.redis(&person_with_op("=1")).await;
    assert_eq!(t.ack("person:1", "1").await, done());
    assert_eq!(
        t.row("persons", "1").await,
        Some((s("foo"), s("bar"), Some(22))),
        "the row is committed when the ack arrives"
    );
    until!(
        t,
        "`#` removed from Redis",
        t.hash("person:1").await
            == pairs(&[("age", "22"), ("first_name", "foo"), ("last_name", "bar")])
    );
    t.redis(&["HSET", "person:1", "#", "~2"]).await;
    assert_eq!(t.ack("person:1", "2").await, done());
    assert_eq!(t.row("persons", "1").await, None, "deleted when acked");
    until!(t, "the key deleted", t.hash("person:1").await.is_empty());

    // testWriteBehindOperations: + , +1, =2, -, -3, +, ~ (uuids made unique per step).
    t.redis(&person_with_op("+")).await;
    t.redis(&person_with_op("+op1")).await;
    assert_eq!(t.ack("person:1", "op1").await, done());
    until!(
        t,
        "`#` removed, data kept",
        t.hash("person:1").await
            == pairs(&[("age", "22"), ("first_name", "foo"), ("last_name", "bar")])
    );
    assert_eq!(t.row("persons", "1").await, None, "`+` writes no row");
    t.redis(&person_with_op("=op2")).await;
    assert_eq!(t.ack("person:1", "op2").await, done());
    assert_eq!(
        t.row("persons", "1").await,
        Some((s("foo"), s("bar"), Some(22)))
    );
    t.redis(&["HSET", "person:1", "age", "23", "#", "-"]).await;
    until!(
        t,
        "the key deleted by `-`",
        t.hash("person:1").await.is_empty()
    );
    t.redis(&person_with_op("-op3")).await;
    assert_eq!(t.ack("person:1", "op3").await, done());
    until!(
        t,
        "the key deleted by `-op3`",
        t.hash("person:1").await.is_empty()
    );
    assert_eq!(
        t.row("persons", "1").await,
        Some((s("foo"), s("bar"), Some(22))),
        "`-` keeps the row (and did not write age 23)"
    );
    t.redis(&person_with_op("+")).await;
    t.redis(&["HSET", "person:1", "#", "~op4"]).await;
    assert_eq!(t.ack("person:1", "op4").await, done());
    assert_eq!(t.row("persons", "1").await, None, "`~` deletes the row");
    until!(
        t,
        "the key deleted by `~`",
        t.hash("person:1").await.is_empty()
    );

    // The README's example: XREAD BLOCK 2000 STREAMS {person2:1}<uuid> 0-0.
    let uuid = "6ce0c902-30c2-4ac9-8342-2f04fb359a94";
    let op = format!("={uuid}");
    t.redis(&[
        "HSET",
        "person2:1",
        "first_name",
        "foo",
        "last_name",
        "bar",
        "age",
        "20",
        "#",
        &op,
    ])
    .await;
    let stream = format!("{{person2:1}}{uuid}");
    let mut fields = None;
    for _ in 0..10 {
        fields = t.xread(&stream).await;
        if fields.is_some() {
            break;
        }
    }
    assert_eq!(fields, Some(done()));
    assert_eq!(
        t.row("persons2", "1").await,
        Some((s("foo"), s("bar"), Some(20)))
    );
    let BytesFrame::Integer(ttl) = t.redis(&["TTL", &stream]).await else {
        panic!("TTL")
    };
    assert!(
        (3000..=3600).contains(&ttl),
        "the ack stream expires in an hour: {ttl}"
    );

    // No `{key}None`-style stream, and only the acks asked for exist.
    let mut acks = t.keys("{person*").await;
    acks.sort();
    assert_eq!(
        acks,
        vec![
            "{person2:1}6ce0c902-30c2-4ac9-8342-2f04fb359a94",
            "{person:1}1",
            "{person:1}2",
            "{person:1}op1",
            "{person:1}op2",
            "{person:1}op3",
            "{person:1}op4"
        ]
    );
    assert!(t.keys("*None*").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_pipelined_right_after_an_op_ends_as_if_the_op_were_atomic() {
    let mut t = Setup::start(&[]).await;
    t.spawn();
    // (op, Redis afterwards, row afterwards)
    let cases: [RaceCase; 4] = [
        ("-", &[("last_name", "B")], (None, s("B"), None)),
        ("~", &[("last_name", "B")], (None, s("B"), None)),
        (
            "+",
            &[("first_name", "A"), ("last_name", "B")],
            (s("A"), s("B"), None),
        ),
        (
            "=",
            &[("first_name", "A"), ("last_name", "B")],
            (s("A"), s("B"), None),
        ),
    ];
    for (i, (op, redis_after, row_after)) in cases.into_iter().enumerate() {
        let key = format!("person:race{i}");
        let uuid = format!("race{i}");
        let op_value = format!("{op}{uuid}");
        // The row exists before, with other values: `-` and `~` must not keep them.
        t.redis(&["HSET", &key, "first_name", "old", "age", "1"])
            .await;
        let id = format!("race{i}");
        until!(t, "the first row", t.row("persons", &id).await.is_some());
        t.redis(&["HDEL", &key, "age"]).await;
        let replies = t
            .client
            .pipeline(&[
                &["HSET", &key, "first_name", "A", "#", &op_value][..],
                &["HSET", &key, "last_name", "B"][..],
            ])
            .await
            .expect("pipeline");
        assert!(replies.iter().all(|r| !matches!(r, BytesFrame::Error(_))));
        assert_eq!(t.ack(&key, &uuid).await, done(), "op {op}");
        let expected = pairs(redis_after);
        until!(
            t,
            &format!("Redis after the `{op}` race"),
            t.hash(&key).await == expected
        );
        until!(
            t,
            &format!("the row after the `{op}` race"),
            t.row("persons", &id).await == Some(row_after.clone())
        );
    }
    assert!(t.keys("*None*").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn op_alone_resends_the_row_and_invalid_ops_are_reported_and_removed() {
    let mut t = Setup::start(&[]).await;
    t.spawn();
    t.redis(&[
        "HSET",
        "person:3",
        "first_name",
        "A",
        "last_name",
        "B",
        "age",
        "5",
    ])
    .await;
    until!(t, "the row", t.row("persons", "3").await.is_some());
    // Someone changes the row behind our back; `# =` alone writes the full row again.
    let mut conn = t.pool.get_conn().await.expect("conn");
    conn.query_drop("UPDATE persons SET first = 'tampered' WHERE person_id = '3'")
        .await
        .expect("update");
    drop(conn);
    t.redis(&["HSET", "person:3", "#", "=resend"]).await;
    assert_eq!(t.ack("person:3", "resend").await, done());
    assert_eq!(t.row("persons", "3").await, Some((s("A"), s("B"), Some(5))));

    // Invalid (`x`) and empty ops: `#` removed, data kept, row untouched.
    t.redis(&["HSET", "person:3", "first_name", "C", "#", "x"])
        .await;
    t.redis(&["HSET", "person:3", "last_name", "D", "#", ""])
        .await;
    until!(
        t,
        "`#` removed after invalid ops",
        t.hash("person:3").await == pairs(&[("age", "5"), ("first_name", "C"), ("last_name", "D")])
    );
    // With something after the bad character, that is the uuid: the client hears of it.
    t.redis(&["HSET", "person:3", "age", "6", "#", "?bad"])
        .await;
    assert_eq!(
        t.ack("person:3", "bad").await,
        vec![
            "status",
            "failed",
            "reason",
            "invalid op: unknown operation"
        ]
    );
    // A valid op afterwards is acked after its commit: the invalid ones wrote nothing.
    t.redis(&["HSET", "person:3", "#", "+later"]).await;
    assert_eq!(t.ack("person:3", "later").await, done());
    assert_eq!(t.row("persons", "3").await, Some((s("A"), s("B"), Some(5))));
    let log = t.log();
    assert!(
        !log.contains("panicked"),
        "the service must not panic:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_atomic_entry_point_applies_the_op_in_the_same_instant() {
    let mut t = Setup::start(&[]).await;
    t.spawn();
    until!(
        t,
        "the library",
        t.library_version().await == Some(writebehind::ack::LIBRARY_VERSION)
    );
    // Attached: an op tag written before the snapshot's fork is not in the snapshot, so its
    // ack would never come (docs/design.md 10.1).
    until!(
        t,
        "the replica online",
        t.client
            .info("replication")
            .await
            .is_ok_and(|info| info.contains("state=online"))
    );
    let fcall = |op: &'static str| {
        vec![
            "FCALL",
            "writebehind_hset",
            "1",
            "person:4",
            "first_name",
            "A",
            "age",
            "7",
            "#",
            op,
        ]
    };
    // Read-your-write: no `#` is ever visible.
    t.redis(&fcall("=a1")).await;
    assert_eq!(
        t.hash("person:4").await,
        pairs(&[("age", "7"), ("first_name", "A")])
    );
    assert_eq!(t.ack("person:4", "a1").await, done());
    assert_eq!(t.row("persons", "4").await, Some((s("A"), None, Some(7))));
    // `+`: stored, no row change.
    t.redis(&[
        "FCALL",
        "writebehind_hset",
        "1",
        "person:4",
        "age",
        "8",
        "#",
        "+a2",
    ])
    .await;
    assert_eq!(
        t.hash("person:4").await,
        pairs(&[("age", "8"), ("first_name", "A")])
    );
    assert_eq!(t.ack("person:4", "a2").await, done());
    // `-`: the key is gone at once, the row stays.
    t.redis(&fcall("-a3")).await;
    assert_eq!(
        t.redis(&["EXISTS", "person:4"]).await,
        BytesFrame::Integer(0)
    );
    assert_eq!(t.ack("person:4", "a3").await, done());
    assert_eq!(t.row("persons", "4").await, Some((s("A"), None, Some(7))));
    // `~`: key and row gone.
    t.redis(&fcall("~a4")).await;
    assert_eq!(
        t.redis(&["EXISTS", "person:4"]).await,
        BytesFrame::Integer(0)
    );
    assert_eq!(t.ack("person:4", "a4").await, done());
    assert_eq!(t.row("persons", "4").await, None);
    // An invalid op is refused and writes nothing.
    let refused = t.client.command(&fcall("q")).await;
    assert!(
        matches!(&refused, Err(e) if e.to_string().contains("invalid # op")),
        "{refused:?}"
    );
    assert_eq!(
        t.redis(&["EXISTS", "person:4"]).await,
        BytesFrame::Integer(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_change_acks_failed_with_the_reason() {
    let mut t = Setup::start(&[]).await;
    t.spawn();
    t.redis(&[
        "HSET",
        "person:5",
        "first_name",
        "A",
        "age",
        "not a number",
        "#",
        "=p1",
    ])
    .await;
    let ack = t.ack("person:5", "p1").await;
    assert_eq!(&ack[..3], &["status", "failed", "reason"], "{ack:?}");
    assert!(
        ack[3].contains("age"),
        "the reason names the column: {ack:?}"
    );
    assert_eq!(t.row("persons", "5").await, None);
    // The next good write flows on.
    t.redis(&["HSET", "person:5", "age", "9", "#", "=p2"]).await;
    assert_eq!(t.ack("person:5", "p2").await, done());
    assert_eq!(t.row("persons", "5").await, Some((s("A"), None, Some(9))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_without_functions_is_refused_with_one_clear_line() {
    let mut t = Setup::start(&["--rename-command", "FUNCTION", ""]).await;
    t.spawn();
    // The child stays in `t`, so it is killed even if an assertion fails.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let child = t.child.as_mut().expect("running");
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the service kept running; log:\n{}",
            t.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    let log = t.log();
    let line = log
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(
        line.contains("has no functions") && line.contains("[acks] enabled = false"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_written_while_the_service_was_away_are_applied_from_the_snapshot() {
    let mut t = Setup::start(&[]).await;
    // Before the first full sync: one `=` with a uuid, one `-` without.
    t.redis(&person_with_op("=away1")).await;
    t.redis(&["HSET", "person:6", "first_name", "gone", "#", "-"])
        .await;
    t.spawn();
    assert_eq!(t.ack("person:1", "away1").await, done());
    assert_eq!(
        t.row("persons", "1").await,
        Some((s("foo"), s("bar"), Some(22)))
    );
    until!(
        t,
        "`#` removed and the `-` key deleted",
        t.hash("person:1").await
            == pairs(&[("age", "22"), ("first_name", "foo"), ("last_name", "bar")])
            && t.hash("person:6").await.is_empty()
    );
    assert_eq!(t.row("persons", "6").await, None, "`-` writes no row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_survive_a_database_outage_and_a_kill_9() {
    let mut maria = MariaDbServer::start();
    let mut t = Setup::start_on(&[], &maria.server()).await;
    t.spawn();
    t.redis(&["HSET", "person:1", "first_name", "a", "#", "=c0"])
        .await;
    assert_eq!(t.ack("person:1", "c0").await, done());

    // The database goes away: an `=` ack must wait for it; a `+` ack does not.
    maria.stop();
    t.redis(&["HSET", "person:2", "first_name", "b", "#", "=c1"])
        .await;
    t.redis(&["HSET", "person:3", "first_name", "c", "#", "+c2"])
        .await;
    assert_eq!(t.ack("person:3", "c2").await, done());
    assert_eq!(
        t.xread("{person:2}c1").await,
        None,
        "no ack before the row is committed"
    );
    // Captured (the later `+` ack says so), not written: the service dies.
    let mut child = t.child.take().expect("running");
    child.kill().expect("kill -9");
    child.wait().expect("wait");

    maria.restart();
    t.spawn();
    assert_eq!(t.ack("person:2", "c1").await, done());
    assert_eq!(t.row("persons", "2").await, Some((s("b"), None, None)));
    until!(
        t,
        "`#` removed from person:2",
        t.hash("person:2").await == pairs(&[("first_name", "b")])
    );
    assert_eq!(t.row("persons", "3").await, None, "`+` writes no row");
}

/// An ack Redis refuses for a reason that can pass (here the service's user may not XADD yet)
/// stays queued and is written once it passes: never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_refused_for_a_passing_reason_is_retried_not_dropped() {
    let mut t = Setup::start(&[]).await;
    t.redis(&[
        "ACL", "SETUSER", "wb", "on", ">pw", "~*", "&*", "+@all", "-xadd",
    ])
    .await;
    let config = t.dir.path().join("writebehind.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("redis://127.0.0.1:", "redis://wb:pw@127.0.0.1:"),
    )
    .expect("config");
    t.spawn();
    until!(
        t,
        "the library",
        t.library_version().await == Some(writebehind::ack::LIBRARY_VERSION)
    );
    t.redis(&["HSET", "person:acl", "first_name", "A", "#", "+u-acl"])
        .await;
    // The write-back task tries (and is refused) for a while: no ack, and it is not dropped.
    assert_eq!(t.xread("{person:acl}u-acl").await, None);
    t.redis(&["ACL", "SETUSER", "wb", "+xadd"]).await;
    assert_eq!(t.ack("person:acl", "u-acl").await, done());
}

/// An ack aimed at a stream that already exists (someone's) is added to it, and the stream keeps
/// the TTL it had: the service only sets a TTL on a stream it created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_never_sets_a_ttl_on_a_stream_it_did_not_create() {
    let mut t = Setup::start(&[]).await;
    t.spawn();
    t.redis(&["XADD", "{person:2}audit", "*", "kept", "1"])
        .await;
    t.redis(&["HSET", "person:2", "first_name", "A", "#", "+audit"])
        .await;
    until!(
        t,
        "the ack in the existing stream",
        t.redis(&["XLEN", "{person:2}audit"]).await == BytesFrame::Integer(2)
    );
    assert_eq!(
        t.redis(&["TTL", "{person:2}audit"]).await,
        BytesFrame::Integer(-1)
    );
    // A stream the ack creates gets its TTL.
    t.redis(&["HSET", "person:3", "first_name", "A", "#", "+new"])
        .await;
    assert_eq!(t.ack("person:3", "new").await, done());
    assert!(matches!(
        t.redis(&["TTL", "{person:3}new"]).await,
        BytesFrame::Integer(ttl) if ttl > 0
    ));
}

/// Completing an op on a hash of 9,000 fields (more than Lua's unpack takes at once): a `-`
/// raced by a pipelined write ends as if the op were atomic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_hash_is_completed_in_chunks() {
    let mut t = Setup::start(&[]).await;
    t.spawn();
    until!(
        t,
        "the library",
        t.library_version().await == Some(writebehind::ack::LIBRARY_VERSION)
    );
    let fields: Vec<String> = (0..9000)
        .flat_map(|i| [format!("f{i}"), "v".to_string()])
        .collect();
    let mut big: Vec<&str> = vec!["HSET", "person:big"];
    big.extend(fields.iter().map(String::as_str));
    big.extend(["#", "-big"]);
    t.client
        .pipeline(&[&big[..], &["HSET", "person:big", "last_name", "B"][..]])
        .await
        .expect("pipeline");
    assert_eq!(t.ack("person:big", "big").await, done());
    until!(
        t,
        "the completion",
        t.hash("person:big").await == pairs(&[("last_name", "B")])
    );
}

/// Tags anyone can publish change nothing: a forged `~` op tag leaves the row (and the hash)
/// in place, and a forged completion's write is applied as the client's own write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tags_change_no_row_and_no_hash() {
    let mut t = Setup::start(&[]).await;
    t.spawn();
    t.redis(&["HSET", "person:42", "first_name", "Kept"]).await;
    until!(
        t,
        "the row of person:42",
        t.row("persons", "42").await.is_some()
    );
    t.redis(&["PUBLISH", "__writebehind__", "op:1:~person:42"])
        .await;
    let replies = t
        .client
        .pipeline(&[
            &["MULTI"][..],
            &["PUBLISH", "__writebehind__", "complete:0:person:43"],
            &["HSET", "person:43", "first_name", "Forged"],
            &["EXEC"],
        ])
        .await
        .expect("multi");
    assert!(matches!(replies.last(), Some(BytesFrame::Array(_))));
    // A later write is applied, so everything before it has been seen.
    t.redis(&["HSET", "person:44", "first_name", "Marker"])
        .await;
    until!(t, "the marker row", t.row("persons", "44").await.is_some());
    until!(
        t,
        "the forged completion's write, applied as the client's",
        t.row("persons", "43").await == Some((s("Forged"), None, None))
    );
    assert_eq!(
        t.row("persons", "42").await,
        Some((s("Kept"), None, None)),
        "a forged ~ tag deleted the row"
    );
    assert_eq!(t.hash("person:42").await, pairs(&[("first_name", "Kept")]));
}

/// A genuine completion tag, captured from the channel and published again with a write of
/// the replayer's own, is not taken for a completion: the write reaches the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_completion_tag_is_not_a_completion() {
    let mut t = Setup::start(&[]).await;
    t.spawn();
    until!(
        t,
        "the library",
        t.library_version().await == Some(writebehind::ack::LIBRARY_VERSION)
    );
    let mut listener = t._redis.client().await;
    listener
        .send(&["SUBSCRIBE", "__writebehind__"])
        .await
        .expect("subscribe");
    listener
        .next_frame(Some(Duration::from_secs(5)))
        .await
        .expect("subscribed");
    t.redis(&["HSET", "person:45", "first_name", "A", "#", "=r1"])
        .await;
    assert_eq!(t.ack("person:45", "r1").await, done());
    let payload = loop {
        let BytesFrame::Array(message) = listener
            .next_frame(Some(Duration::from_secs(10)))
            .await
            .expect("the completion's tag")
        else {
            continue;
        };
        let text: Vec<String> = message
            .iter()
            .map(writebehind::redis_client::frame_text)
            .collect();
        if text.first().is_some_and(|k| k == "message") && text[2].starts_with("complete:") {
            break text[2].clone();
        }
    };
    t.client
        .pipeline(&[
            &["MULTI"][..],
            &["PUBLISH", "__writebehind__", &payload],
            &["HSET", "person:45", "first_name", "Replayed"],
            &["EXEC"],
        ])
        .await
        .expect("replay");
    until!(
        t,
        "the replayed unit's write",
        t.row("persons", "45").await == Some((s("Replayed"), None, None))
    );
}
