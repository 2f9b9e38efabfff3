//! PostgreSQL-specific sink behaviour against the machine's PostgreSQL (a fresh database per
//! test): values the server or the conversion refuses are dead-lettered alike in a single-row
//! batch and in a 1,000-row batch, and a value is never rounded or truncated to fit its column.

mod support;

use support::sink::{run, start, Database};
use support::RedisServer;

/// The recipe's tables, typed: an integer key, `first` `varchar(5) NOT NULL`, `last`
/// `numeric(6,2)`, `age` `smallint`; `car.color` a `uuid`.
const TYPED_TABLES: &str = "CREATE TABLE person1 (id INTEGER PRIMARY KEY, first VARCHAR(5) NOT NULL, last NUMERIC(6,2), age SMALLINT);
    CREATE TABLE car (id TEXT PRIMARY KEY, color UUID)";

/// Each poison value, alone in its batch and then with 1,000 good rows in one transaction:
/// dead-lettered with its reason, never written altered, while the good rows are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_values_are_refused_alike_in_small_and_large_batches() {
    let database = Database::postgres().await;
    database.execute(TYPED_TABLES).await;
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    let service = start(&server, &database).await;
    // (key, fields, what the reason says)
    let poison: [(&str, [&str; 4], &str); 6] = [
        (
            "person2:101",
            ["first_name", "a", "age", "forty"],
            "is not an integer",
        ),
        (
            "person2:102",
            ["first_name", "a", "age", "70000"],
            "out of range",
        ),
        (
            "person2:103",
            ["first_name", "toolong", "age", "1"],
            "longer than its 5",
        ),
        (
            "person2:104",
            ["first_name", "a", "last_name", "1.234"],
            "more than its scale 2",
        ),
        ("person2:105", ["age", "1", "age", "1"], "not-null"),
        (
            "car:c1",
            ["color", "not-a-uuid", "color", "not-a-uuid"],
            "uuid",
        ),
    ];
    for (round, (key, fields, _)) in poison.iter().enumerate() {
        let mut alone = vec!["HSET", key];
        alone.extend(fields);
        run(&mut client, &alone).await;
        service.settle(&mut client, &database).await;
        let mut commands: Vec<Vec<String>> = vec![vec!["MULTI".into()]];
        for n in 0..1_000 {
            commands.push(
                ["HSET", &format!("person2:{}", 10_000 + round * 1_000 + n)]
                    .into_iter()
                    .chain(["first_name", "ok", "age", &(n % 100).to_string()])
                    .map(String::from)
                    .collect(),
            );
        }
        let big_key = match key.strip_prefix("car:") {
            Some(id) => format!("car:{id}big"),
            None => format!("person2:{}", 900 + round),
        };
        commands.push(
            ["HSET", big_key.as_str()]
                .into_iter()
                .chain(fields.iter().copied())
                .map(String::from)
                .collect(),
        );
        commands.push(vec!["EXEC".into()]);
        let refs: Vec<Vec<&str>> = commands
            .iter()
            .map(|c| c.iter().map(String::as_str).collect())
            .collect();
        let slices: Vec<&[&str]> = refs.iter().map(Vec::as_slice).collect();
        client.pipeline(&slices).await.expect("MULTI");
        service.settle(&mut client, &database).await;
    }
    let letters = service.store.dead_letters().expect("dead letters");
    for (key, _, reason) in poison {
        let found = letters.iter().filter(|l| l.reason.contains(reason)).count();
        assert_eq!(
            found, 2,
            "{key}: `{reason}` in a small and a large batch: {letters:#?}"
        );
    }
    assert_eq!(letters.len(), 12, "{letters:#?}");
    let people = database.rows("person1", &["first", "last"]).await;
    assert_eq!(
        people.len(),
        6_000,
        "the good rows, none of the poison ones"
    );
    assert!(people
        .values()
        .all(|v| v[0].as_deref() == Some("ok") && v[1].is_none()));
    assert!(database.rows("car", &["color"]).await.is_empty());
    service.stop().await;
    database.drop_database().await;
}
