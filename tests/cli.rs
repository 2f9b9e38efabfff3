//! The `writebehind` binary: `tail` against a real primary, `check` and configuration errors.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::RedisServer;

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_writebehind"))
}

/// Kills the child process when the test ends, whatever happens.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_line(
    lines: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    what: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if what(&line) {
                    return line;
                }
            }
            Err(_) => break,
        }
    }
    panic!("expected line not printed; got:\n{}", seen.join("\n"));
}

#[tokio::test]
async fn tail_prints_the_snapshot_and_every_command_with_offsets() {
    let server = RedisServer::start(&[]);
    let mut client = server.client().await;
    client
        .command(&["HSET", "car:1", "color", "red"])
        .await
        .expect("hset");
    client.command(&["SADD", "tags", "a"]).await.expect("sadd");

    let mut child = binary()
        .args(["tail", "--source", &server.url()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run writebehind");
    let stdout = child.stdout.take().expect("stdout");
    let _running = Running(child);
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    wait_for_line(&lines, &mut seen, |l| l.starts_with("full-sync replid="));
    wait_for_line(&lines, &mut seen, |l| l.starts_with("full-sync-done "));
    // Keys come in the primary's hash-table order.
    for expected in [
        "snapshot db=0 hash car:1 fields=1 {color=red}",
        "snapshot db=0 set tags",
    ] {
        assert!(
            seen.iter().any(|l| l == expected),
            "{expected} missing from:\n{}",
            seen.join("\n")
        );
    }

    client
        .command(&["HSET", "person2:7", "first_name", "Ann", "age", "30"])
        .await
        .expect("hset");
    let line = wait_for_line(&lines, &mut seen, |l| l.contains("HSET person2:7"));
    assert!(
        line.ends_with(" db=0 HSET person2:7 first_name Ann age 30"),
        "{line}"
    );
    let offset: u64 = line
        .split(' ')
        .next()
        .and_then(|o| o.parse().ok())
        .expect("offset first");
    let info = client.info("replication").await.expect("info");
    let master: u64 = writebehind::redis_client::info_field(&info, "master_repl_offset")
        .and_then(|v| v.parse().ok())
        .expect("offset");
    assert_eq!(
        offset, master,
        "the printed offset is the primary's offset after the command"
    );
}

#[test]
fn check_reports_each_configuration_problem_on_one_line() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[admin]
listen = ""
[source]
url = "redis://127.0.0.1:1"
[backends.db]
url = "oracle://x"
[[mappings]]
name = "A"
prefix = "person2"
backend = "nope"
table = "person1"
key_column = "id"
[mappings.columns]
first_name = "first"
"#,
    )
    .expect("write");
    let output = binary()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines.iter().any(|l| l.contains("[backends.db] url")),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("backend `nope` is not defined")),
        "{stderr}"
    );
}

#[tokio::test]
async fn check_reaches_redis_or_says_why_not() {
    let server = RedisServer::start(&["--requirepass", "pw"]);
    let dir = tempfile::tempdir().expect("dir");
    for (password, ok) in [("pw", true), ("wrong", false)] {
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            format!(
                "[admin]\nlisten = \"\"\n[source]\nurl = \"redis://:{password}@127.0.0.1:{}\"\n",
                server.port
            ),
        )
        .expect("write");
        let output = binary()
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("run");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.success(), ok, "{stdout}");
        if !ok {
            assert!(
                stdout
                    .lines()
                    .any(|l| l.starts_with("error: ") && l.contains("AUTH")),
                "{stdout}"
            );
            assert!(
                !stdout.contains("wrong"),
                "the password must not be printed: {stdout}"
            );
        }
    }
}
