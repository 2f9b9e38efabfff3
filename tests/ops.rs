//! The `#` op field and acknowledgements (docs/design.md section 4), end to end: the `writebehind`
//! binary between a real redis-server and a fresh MariaDB database. The original recipe's
//! scenarios (rgsync `testSimpleWriteBehind`, `testWriteBehindAck`,
//! `testWriteBehindOperations`, the README's `XREAD BLOCK` example), the pipelined races, `# =`
//! alone, invalid ops and the atomic entry point. The acknowledgements' own cases are in
//! tests/ops_acks.rs; the helpers in tests/support/ops.rs.

mod support;

use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use redis_protocol::resp2::types::BytesFrame;

use support::ops::*;

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

/// An atomic `=` with no field on a large hash (stored one entry per field,
/// `src/buffer/window.rs`) re-sends the full row: the mapped fields are read for it, never
/// taken for absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_atomic_write_op_alone_on_a_large_hash_re_sends_its_row() {
    let mut t = Setup::start(&[]).await;
    t.spawn();
    until!(
        t,
        "the library",
        t.library_version().await == Some(writebehind::ack::LIBRARY_VERSION)
    );
    let mut big: Vec<String> = ["HSET", "person:big", "first_name", "A", "age", "7"]
        .map(String::from)
        .to_vec();
    for i in 0..writebehind::buffer::STORED_BY_FIELD + 100 {
        big.extend([format!("f{i}"), "v".to_string()]);
    }
    let big: Vec<&str> = big.iter().map(String::as_str).collect();
    t.redis(&big).await;
    until!(
        t,
        "the large hash's row",
        t.row("persons", "big").await == Some((s("A"), None, Some(7)))
    );
    // Another key since: the large hash is read as a window, not from the batch in flight.
    t.redis(&["HSET", "person:other", "first_name", "O"]).await;
    until!(
        t,
        "the other row",
        t.row("persons", "other").await.is_some()
    );
    t.redis(&["FCALL", "writebehind_hset", "1", "person:big", "#", "=b1"])
        .await;
    assert_eq!(t.ack("person:big", "b1").await, done());
    assert_eq!(t.row("persons", "big").await, Some((s("A"), None, Some(7))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_atomic_entry_point_applies_the_op_in_the_same_instant() {
    let mut t = Setup::start(&[]).await;
    t.spawn_attached().await;
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

/// An op applied through the atomic entry point replaces the row events of its own unit for
/// its row, never those of earlier units of the same batch (a batch's events are one vector:
/// an op once removed an earlier transaction's events of the same row, and the units after it
/// were numbered with the wrong events).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_leaves_the_rows_of_earlier_units_in_its_batch_alone() {
    let mut t = Setup::start(&[]).await;
    t.spawn_attached().await;
    // One pipeline, so that capture receives the units together: a transaction writing the
    // row three times, a `+` op on the same key (stored, no row change), another key.
    let replies = t
        .client
        .pipeline(&[
            &["MULTI"][..],
            &["HSET", "person:5", "first_name", "A"][..],
            &["HSET", "person:5", "age", "1"][..],
            &["HSET", "person:5", "last_name", "L"][..],
            &["EXEC"][..],
            &[
                "FCALL",
                "writebehind_hset",
                "1",
                "person:5",
                "age",
                "2",
                "#",
                "+b1",
            ][..],
            &["HSET", "person:6", "first_name", "X"][..],
        ])
        .await
        .expect("pipeline");
    assert!(replies.iter().all(|r| !matches!(r, BytesFrame::Error(_))));
    assert_eq!(t.ack("person:5", "b1").await, done());
    until!(
        t,
        "the later key's row",
        t.row("persons", "6").await == Some((s("X"), None, None))
    );
    assert_eq!(
        t.row("persons", "5").await,
        Some((s("A"), s("L"), Some(1))),
        "the transaction's row, which the `+` op leaves as it was"
    );
}
