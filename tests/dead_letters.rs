//! Dead letters while the service runs: listed, requeued through capture in the change order,
//! dropped; the admin listener's rules for `/dlq` (loopback without a token, a bearer token
//! otherwise). The `writebehind` binary against real redis-server and SQLite.

mod support;

use std::process::Command;

use support::service::{exchange, get, sqlite_rows, status_of, write, Service};
use support::RedisServer;

/// `writebehind dlq <args> --config <service's>`: (success, stdout and stderr).
fn dlq(service: &Service, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_writebehind"))
        .arg("dlq")
        .args(args)
        .arg("--config")
        .arg(&service.config)
        .output()
        .expect("dlq");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// The seq of the change a `dlq retry` line says it requeued the letter `letter` as.
fn requeued_as(out: &str, letter: u64) -> u64 {
    let prefix = format!("seq={letter} requeued as change ");
    out.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("letter {letter} not requeued: {out}"))
}

/// Runs SQL on the service's SQLite file (beside the running service).
fn sqlite(service: &Service, sql: &str) {
    let connection = rusqlite::Connection::open(service.sqlite()).expect("open SQLite");
    connection
        .busy_timeout(std::time::Duration::from_secs(10))
        .expect("busy timeout");
    connection.execute_batch(sql).expect(sql);
}

fn first_of(service: &Service, id: &str) -> Option<String> {
    rusqlite::Connection::open(service.sqlite())
        .and_then(|c| {
            c.query_row("SELECT first FROM person1 WHERE id = ?1", [id], |r| {
                r.get::<_, Option<String>>(0)
            })
        })
        .ok()
        .flatten()
}

/// A row the database refuses (a trigger) is listed while the pipeline flows, requeued while
/// still refused (a new letter with the new change's seq), then requeued once the database
/// takes it: the row is written with the key's current state and the letter is gone; rows
/// written meanwhile all arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_row_is_listed_and_retried_while_the_pipeline_flows() {
    let redis = RedisServer::start(&[]);
    let mut client = redis.client().await;
    let service = Service::new(&redis, None);
    service.until_ready().await;
    let poison = "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END;";
    sqlite(
        &service,
        &format!(
            "CREATE TRIGGER poison_insert BEFORE INSERT ON person1 WHEN NEW.first = 'poison' {poison}\n\
             CREATE TRIGGER poison_update BEFORE UPDATE ON person1 WHEN NEW.first = 'poison' {poison}"
        ),
    );
    client
        .command(&["HSET", "person2:poison", "first_name", "poison", "seq", "1"])
        .await
        .expect("hset");
    write(&mut client, 0..1_000).await;
    let status = || status_of(service.admin).expect("status");
    service
        .until("a dead letter", || status()["dead_letters"] == 1)
        .await;
    let letter = status()["oldest_dead_letter"]["seq"].as_u64().expect("seq");
    let (ok, out) = dlq(&service, &["list"]);
    assert!(
        ok && out.contains("row=poison") && out.contains("poisoned row"),
        "{out}"
    );

    // Requeued while the database still refuses it: refused again, as the requeued change.
    let (ok, out) = dlq(&service, &["retry", "--all"]);
    assert!(ok, "{out}");
    let change = requeued_as(&out, letter);
    assert!(change > letter, "{out}");
    write(&mut client, 1_000..2_000).await;
    service
        .until("the requeued change refused again", || {
            let s = status();
            s["dead_letters"] == 1 && s["oldest_dead_letter"]["seq"] == change
        })
        .await;

    // The key moves on, refused too; then the database takes it: both letters requeued
    // write the key's current state.
    client
        .command(&["HSET", "person2:poison", "seq", "2"])
        .await
        .expect("hset");
    service
        .until("the key's newer change refused too", || {
            status()["dead_letters"] == 2
        })
        .await;
    sqlite(
        &service,
        "DROP TRIGGER poison_insert; DROP TRIGGER poison_update;",
    );
    let (ok, out) = dlq(&service, &["retry", "--all"]);
    assert!(ok, "{out}");
    assert!(out.contains("2 dead letters requeued, 0 kept"), "{out}");
    write(&mut client, 2_000..3_000).await;
    service
        .until("no dead letter, every row", || {
            status()["dead_letters"] == 0 && sqlite_rows(&service.sqlite()) == 3_001
        })
        .await;
    assert_eq!(first_of(&service, "poison").as_deref(), Some("poison"));
    let seq: Option<String> = rusqlite::Connection::open(service.sqlite())
        .and_then(|c| {
            c.query_row("SELECT seq FROM person1 WHERE id = 'poison'", [], |r| {
                r.get::<_, Option<String>>(0)
            })
        })
        .expect("row");
    assert_eq!(seq.as_deref(), Some("2"), "the key's current state");
    // A letter named that does not exist is said so.
    let (ok, out) = dlq(&service, &["retry", "--seq", &letter.to_string()]);
    assert!(ok && out.contains("is not a dead letter"), "{out}");
}

/// A dead letter of a large hash (stored one entry per field, `src/buffer/window.rs`) is
/// requeued with the key's mapped fields: they are read for the row, never taken for absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_of_a_large_hash_is_requeued_with_its_row() {
    let redis = RedisServer::start(&[]);
    let mut client = redis.client().await;
    let service = Service::new(&redis, None);
    service.until_ready().await;
    let poison = "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END;";
    sqlite(
        &service,
        &format!("CREATE TRIGGER poison_insert BEFORE INSERT ON person1 WHEN NEW.first = 'poison' {poison}"),
    );
    let mut big: Vec<String> = ["HSET", "person2:big", "first_name", "poison", "seq", "7"]
        .map(String::from)
        .to_vec();
    for i in 0..writebehind::buffer::STORED_BY_FIELD + 100 {
        big.extend([format!("f{i}"), "v".to_string()]);
    }
    let big: Vec<&str> = big.iter().map(String::as_str).collect();
    client.command(&big).await.expect("hset");
    let status = || status_of(service.admin).expect("status");
    service
        .until("a dead letter", || status()["dead_letters"] == 1)
        .await;
    sqlite(&service, "DROP TRIGGER poison_insert;");
    // Other keys written since: the large hash is no longer in the batch in flight, and is
    // read from the cache or the store, as a window.
    write(&mut client, 0..10).await;
    service
        .until("the other rows", || sqlite_rows(&service.sqlite()) == 10)
        .await;
    let (ok, out) = dlq(&service, &["retry", "--all"]);
    assert!(ok, "{out}");
    service
        .until("the row, no dead letter", || {
            status()["dead_letters"] == 0 && first_of(&service, "big").is_some()
        })
        .await;
    assert_eq!(first_of(&service, "big").as_deref(), Some("poison"));
    let seq: Option<String> = rusqlite::Connection::open(service.sqlite())
        .and_then(|c| {
            c.query_row("SELECT seq FROM person1 WHERE id = 'big'", [], |r| {
                r.get::<_, Option<String>>(0)
            })
        })
        .expect("row");
    assert_eq!(
        seq.as_deref(),
        Some("7"),
        "every mapped field of the large hash"
    );
}

/// `dlq list` reads a running service's buffer; `dlq drop` goes through its admin listener;
/// `/status` counts the letter and names the oldest without its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_dropped_while_the_service_runs() {
    let redis = RedisServer::start(&[]);
    let mut client = redis.client().await;
    let service = Service::new(&redis, None);
    service.until_ready().await;
    client
        .command(&["HSET", "strict:1", "seq", "1"])
        .await
        .expect("hset");
    let status = || status_of(service.admin).expect("status");
    service
        .until("a dead letter", || status()["dead_letters"] == 1)
        .await;
    let oldest = status()["oldest_dead_letter"].clone();
    assert_eq!(oldest["mapping"], "Strict", "{oldest}");
    assert_eq!(
        oldest
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>()),
        Some(vec![
            "at_ms".into(),
            "backend".into(),
            "mapping".into(),
            "seq".into()
        ]),
        "the row stays behind dlq list: {oldest}"
    );
    let (ok, out) = dlq(&service, &["list"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("mapping=Strict row=1 ") && out.contains("1 dead letters"),
        "{out}"
    );
    // `GET /dlq` on loopback without a token shows the same line.
    let (code, body) = get(service.admin, "/dlq").expect("GET /dlq");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("mapping=Strict row=1 "), "{body}");
    let (ok, out) = dlq(&service, &["drop", "--seq", "1"]);
    assert!(ok && out.contains("1 dead letters dropped"), "{out}");
    assert_eq!(status()["dead_letters"], 0);
}

/// Off loopback without a token, `/dlq` is refused (403) and the reads stay open; with a
/// token, `/dlq` needs it (401 without it or with another), and the CLI sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_the_dead_letters_need_the_token() {
    let redis = RedisServer::start(&[]);
    let mut client = redis.client().await;
    let open = Service::start(&redis.url(), None, "0.0.0.0", None);
    open.until_ready().await;
    assert_eq!(get(open.admin, "/dlq").map(|(s, _)| s), Some(403));
    assert_eq!(get(open.admin, "/status").map(|(s, _)| s), Some(200));
    let (ok, out) = dlq(&open, &["drop", "--all"]);
    assert!(!ok && out.contains("403"), "{out}");
    drop(open);

    let token = "s3cret-admin-token-0123456789";
    let guarded = Service::start(&redis.url(), None, "0.0.0.0", Some(token));
    guarded.until_ready().await;
    client
        .command(&["HSET", "strict:1", "seq", "1"])
        .await
        .expect("hset");
    guarded
        .until("a dead letter", || {
            status_of(guarded.admin).is_some_and(|s| s["dead_letters"] == 1)
        })
        .await;
    let request = |authorization: &str| {
        exchange(
            guarded.admin,
            format!("POST /dlq/drop?all HTTP/1.1\r\nHost: x\r\n{authorization}Content-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
        )
    };
    for refused in [
        "",
        "Authorization: Bearer wrong-token-0123456789\r\n",
        "Authorization: Basic eDp5\r\n",
    ] {
        let answer = request(refused);
        assert!(answer.starts_with("HTTP/1.1 401"), "{refused}: {answer}");
        assert!(
            answer.to_lowercase().contains("www-authenticate: bearer"),
            "{answer}"
        );
    }
    assert_eq!(get(guarded.admin, "/dlq").map(|(s, _)| s), Some(401));
    assert_eq!(
        status_of(guarded.admin).expect("status")["dead_letters"],
        1,
        "nothing was dropped"
    );
    // The CLI sends the configuration's token: the letter is requeued, and refused again.
    let (ok, out) = dlq(&guarded, &["retry", "--all"]);
    assert!(
        ok && out.contains("1 dead letters requeued, 0 kept"),
        "{out}"
    );
    let change = requeued_as(&out, 1);
    guarded
        .until("refused again", || {
            status_of(guarded.admin).is_some_and(|s| s["oldest_dead_letter"]["seq"] == change)
        })
        .await;
    let answer = request(&format!("Authorization: Bearer {token}\r\n"));
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("1 dead letters dropped"),
        "{answer}"
    );
    assert_eq!(status_of(guarded.admin).expect("status")["dead_letters"], 0);
}
