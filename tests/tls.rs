//! TLS to Redis against real servers (`redis-server --tls-port`, certificates generated per
//! test): the recipe's `#` ops and acks over TLS, a `kill -9` resumed over TLS, mutual TLS with a
//! client certificate, and `check` naming what it verified, or why it refused (a wrong CA, no
//! client certificate, plain text to a TLS port).

mod support;

use support::ops::{done, pairs, s, Setup};
use support::tls::{tls_redis, TestCerts};

/// `[source]` lines for the TLS port: `rediss://` and `[source.tls]` with `tls` lines.
fn tls_source(port: u16, tls: &str) -> String {
    format!("url = \"rediss://localhost:{port}\"\n[source.tls]\n{tls}")
}

fn ca_line(certs: &TestCerts) -> String {
    format!("ca_file = \"{}\"\n", certs.ca.display())
}

fn client_lines(certs: &TestCerts) -> String {
    format!(
        "{}cert_file = \"{}\"\nkey_file = \"{}\"\n",
        ca_line(certs),
        certs.client_cert.display(),
        certs.client_key.display()
    )
}

/// `writebehind check` on the setup's configuration with its `[source]` lines replaced.
fn check_with_source(t: &Setup, source: &str) -> (bool, String) {
    let path = t.dir.path().join("writebehind.toml");
    let text = std::fs::read_to_string(&path).expect("config");
    let start = text.find("[source]").expect("[source]") + "[source]\n".len();
    let end = text.find("[buffer]").expect("[buffer]");
    let other = t.dir.path().join("check.toml");
    std::fs::write(
        &other,
        format!("{}{source}\n{}", &text[..start], &text[end..]),
    )
    .expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_writebehind"))
        .args(["check", "--config"])
        .arg(&other)
        .output()
        .expect("check");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// The recipe over TLS: a change with an `=` op is written and acknowledged (the replication
/// link and the ack writer both on the TLS port); the service killed with SIGKILL resumes over
/// TLS and a later change arrives too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recipe_with_acks_and_a_kill_9_over_tls() {
    let certs = TestCerts::generate();
    let (redis, tls_port) = tls_redis(&certs, false, &[]);
    let mut t = Setup::start_with_source(
        redis,
        support::SHARED_MARIADB,
        &tls_source(tls_port, &ca_line(&certs)),
    )
    .await;
    t.spawn();
    t.redis(&[
        "HSET",
        "person:1",
        "first_name",
        "a",
        "age",
        "7",
        "#",
        "=c0",
    ])
    .await;
    assert_eq!(t.ack("person:1", "c0").await, done());
    assert_eq!(t.row("persons", "1").await, Some((s("a"), None, Some(7))));

    let mut child = t.child.take().expect("running");
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    t.redis(&["HSET", "person:2", "first_name", "b", "#", "=c1"])
        .await;
    t.spawn();
    assert_eq!(t.ack("person:2", "c1").await, done());
    assert_eq!(t.row("persons", "2").await, Some((s("b"), None, None)));
    assert_eq!(t.hash("person:2").await, pairs(&[("first_name", "b")]));
}

/// A server that asks for client certificates: the service presents its own and works; `check`
/// reports the TLS session and the certificate it verified; without the client certificate,
/// with a CA that did not sign the server's, and in plain text to the TLS port, `check` fails
/// with one line naming Redis and what went wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_works_and_a_wrong_ca_or_plain_text_is_refused() {
    let certs = TestCerts::generate();
    let (redis, tls_port) = tls_redis(&certs, true, &[]);
    let mut t = Setup::start_with_source(
        redis,
        support::SHARED_MARIADB,
        &tls_source(tls_port, &client_lines(&certs)),
    )
    .await;
    t.spawn();
    t.redis(&["HSET", "person:1", "first_name", "m", "#", "=t1"])
        .await;
    assert_eq!(t.ack("person:1", "t1").await, done());
    assert_eq!(t.row("persons", "1").await, Some((s("m"), None, None)));

    let (ok, out) = check_with_source(&t, &tls_source(tls_port, &client_lines(&certs)));
    assert!(ok, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("Redis at localhost"))
        .unwrap_or_default();
    assert!(
        line.starts_with("ok:") && line.contains("TLS") && line.contains("CN=localhost"),
        "{out}"
    );
    assert!(line.contains("writebehind test CA"), "{out}");

    let refusals = [
        (
            tls_source(tls_port, &ca_line(&certs)),
            "CertificateRequired",
        ),
        (
            tls_source(
                tls_port,
                &format!(
                    "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                    certs.other_ca.display(),
                    certs.client_cert.display(),
                    certs.client_key.display()
                ),
            ),
            "UnknownIssuer",
        ),
        (
            format!("url = \"redis://localhost:{tls_port}\""),
            "rediss://",
        ),
    ];
    for (source, what) in refusals {
        let (ok, out) = check_with_source(&t, &source);
        assert!(!ok, "{what}: check passed:\n{out}");
        let errors: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("error:") && l.contains(&format!("localhost:{tls_port}")))
            .collect();
        assert_eq!(errors.len(), 1, "{what}: one line naming Redis:\n{out}");
        assert!(errors[0].contains(what), "{out}");
    }
}
