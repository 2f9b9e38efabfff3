//! MySQL/MariaDB-specific sink behaviour against real servers: sessions stay strict whatever
//! the server's `sql_mode`, on every batch and not only the first.

mod support;

use support::sink::{run, start, Database, CAR_TABLE};
use support::{MariaDbServer, RedisServer};

/// On a server whose `sql_mode` is empty (values clamped with a warning), every batch of the
/// service runs in a strict session: a value out of range for its column (300 for a `TINYINT`,
/// which passes the conversion to an integer and is left to the database) is refused and
/// dead-lettered in the tenth batch as in the first, never written clamped to 127. (A pooled
/// connection reset between batches would put the server's mode back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_batch_is_strict_on_a_server_that_is_not() {
    let mariadb = MariaDbServer::start_with(&["--sql-mode="]);
    let database = Database::maria_on(&mariadb).await;
    database
        .execute("CREATE TABLE person1 (id VARCHAR(64) PRIMARY KEY, first VARCHAR(255), last VARCHAR(255), age TINYINT)")
        .await;
    database.execute(CAR_TABLE).await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start(&server, &database).await;
    for round in 1..=10 {
        let key = format!("person2:{round}");
        run(
            &mut client,
            &["HSET", &key, "first_name", "F", "age", "300"],
        )
        .await;
        let fine = format!("person2:{}", 100 + round);
        run(&mut client, &["HSET", &fine, "age", "7"]).await;
        // Each round in its own batches: wait until it is applied.
        service.settle(&mut client, &database).await;
    }
    let rows = database.rows("person1", &["age"]).await;
    let clamped: Vec<&String> = rows
        .iter()
        .filter(|(_, v)| v[0].as_deref() != Some("7"))
        .map(|(id, _)| id)
        .collect();
    assert!(clamped.is_empty(), "written clamped: {clamped:?}");
    assert_eq!(rows.len(), 10, "the valid rows are written: {rows:?}");
    let letters = service.store.dead_letters().expect("dead letters");
    assert_eq!(
        letters.len(),
        10,
        "each out-of-range value refused: {letters:?}"
    );
    service.stop().await;
}
