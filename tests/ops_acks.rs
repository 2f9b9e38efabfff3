//! The `#` op field's acknowledgements end to end (docs/design.md section 4): dead-lettered
//! changes, a primary without functions, ops from the snapshot, outages and kill -9, refused and
//! foreign streams, large hashes, forged and replayed tags. The binary between a real
//! redis-server and a fresh MariaDB database (helpers: tests/support/ops.rs).

mod support;

use std::time::{Duration, Instant};

use redis_protocol::resp2::types::BytesFrame;
use support::ops::*;
use support::MariaDbServer;

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

/// `#` ops inside a transaction long enough to be written in parts (src/capture/long_unit.rs):
/// a part holding an acknowledgement is not written ahead of the unit's end, every op is
/// acknowledged once the unit is in the table, and every row is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_inside_a_long_transaction_are_acknowledged() {
    let mut t = Setup::start(&[]).await;
    t.spawn();
    // Attached first: a transaction sent before the snapshot is in it, key by key (each key
    // its own unit, acknowledged alone), and this test would not be about a transaction.
    let mut probe = t._redis.client().await;
    support::capture::until_attached(&mut probe, || t.log()).await;
    let keys = 20_000;
    // The first ops come after the first part was written (8,192 keys): that part is in the
    // buffer, and the batches from the first op on wait for the unit's end.
    let with_op = |i: usize| i >= 10_000 && i % 5_000 == 4_999;
    let mut commands = vec![vec!["MULTI".to_string()]];
    for i in 0..keys {
        let mut command: Vec<String> = [
            "HSET".to_string(),
            format!("person:{i}"),
            "first_name".into(),
            format!("n{i}"),
            "age".into(),
            i.to_string(),
        ]
        .into();
        if with_op(i) {
            command.extend(["#".to_string(), format!("=u{i}")]);
        }
        commands.push(command);
    }
    commands.push(vec!["EXEC".into()]);
    support::send_all(&mut t.client, &commands).await;
    for i in (0..keys).filter(|i| with_op(*i)) {
        assert_eq!(
            t.ack(&format!("person:{i}"), &format!("u{i}")).await,
            done(),
            "person:{i}"
        );
    }
    // Each op is completed in Redis: its `#` field goes.
    for i in (0..keys).filter(|i| with_op(*i)) {
        let key = format!("person:{i}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while t.hash(&key).await.iter().any(|(field, _)| field == "#") {
            assert!(
                Instant::now() < deadline,
                "{key} kept its op; log:\n{}",
                t.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for i in [0, 4_999, 12_345, 14_999, keys - 1] {
        assert_eq!(
            t.row("persons", &i.to_string()).await,
            Some((Some(format!("n{i}")), None, Some(i as i64))),
            "person:{i}"
        );
    }
}
