//! The `writebehind` binary run as an operator runs it: a configuration file, the admin
//! listener, the CLI beside it (tests/operate.rs and tests/dead_letters.rs).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{free_port, RedisServer};
use writebehind::redis_client::RedisClient;

/// `GET path` on 127.0.0.1:port: (status, body), or None when nothing answers.
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// `GET /status` parsed, or None when nothing (or no JSON) answers.
pub fn status_of(port: u16) -> Option<serde_json::Value> {
    get(port, "/status").and_then(|(_, body)| serde_json::from_str(&body).ok())
}

/// One value of a metric (the first series whose line starts with `name`).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `writebehind run` on a configuration of two mappings (`People`: `person2:*` with `first`
/// and `seq`; `Strict`: `strict:*`, `first` required) into SQLite (or `database_url`), its log
/// in the temporary directory, killed on drop.
pub struct Service {
    child: Option<super::ServiceProcess>,
    pub config: std::path::PathBuf,
    /// The admin listener's port (on 127.0.0.1, or on every address: see [`Service::start`]).
    pub admin: u16,
    dir: tempfile::TempDir,
}

impl Service {
    pub fn new(redis: &RedisServer, database_url: Option<&str>) -> Service {
        Service::with_source(&redis.url(), database_url)
    }

    pub fn with_source(source_url: &str, database_url: Option<&str>) -> Service {
        Service::start(source_url, database_url, "127.0.0.1", None)
    }

    /// The admin listener on `host` (`0.0.0.0`: off loopback), with `[admin] token` when given.
    pub fn start(
        source_url: &str,
        database_url: Option<&str>,
        host: &str,
        token: Option<&str>,
    ) -> Service {
        let dir = tempfile::tempdir().expect("dir");
        let admin = free_port();
        let token = token
            .map(|token| format!("token = \"{token}\"\n"))
            .unwrap_or_default();
        let database = database_url
            .map(String::from)
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("writebehind.db").display()));
        let config = dir.path().join("writebehind.toml");
        std::fs::write(
            &config,
            format!(
                "[source]\nurl = \"{}\"\n[buffer]\npath = \"{}\"\n[admin]\nlisten = \"{host}:{admin}\"\n{token}[backends.db]\nurl = \"{database}\"\n\
                 [[mappings]]\nname = \"People\"\nprefix = \"person2\"\nbackend = \"db\"\ntable = \"person1\"\nkey_column = \"id\"\ncreate_table = true\n\
                 [mappings.columns]\nfirst_name = \"first\"\nseq = \"seq\"\n\
                 [[mappings]]\nname = \"Strict\"\nprefix = \"strict\"\nbackend = \"db\"\ntable = \"strict\"\nkey_column = \"id\"\ncreate_table = true\nrequired = [\"first\"]\n\
                 [mappings.columns]\nfirst_name = \"first\"\n",
                source_url,
                dir.path().join("buffer").display()
            ),
        )
        .expect("config");
        let mut service = Service {
            child: None,
            config,
            admin,
            dir,
        };
        service.spawn();
        service
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("service.log"))
            .expect("log");
        self.child = Some(super::spawn_service(&self.config, log));
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("service.log")).unwrap_or_default()
    }

    pub fn sqlite(&self) -> std::path::PathBuf {
        self.dir.path().join("writebehind.db")
    }

    /// Waits until `/ready` answers 200.
    pub async fn until_ready(&self) {
        self.until("ready", || {
            get(self.admin, "/ready").is_some_and(|(s, _)| s == 200)
        })
        .await;
    }

    pub async fn until(&self, what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !condition() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; service log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the service did not exit after SIGTERM; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub async fn write(client: &mut RedisClient, range: std::ops::Range<u64>) {
    for chunk in range.collect::<Vec<_>>().chunks(100) {
        let commands: Vec<Vec<String>> = chunk
            .iter()
            .map(|n| {
                vec![
                    "HSET".into(),
                    format!("person2:{n}"),
                    "seq".into(),
                    n.to_string(),
                ]
            })
            .collect();
        super::send_all(client, &commands).await;
    }
}

pub fn sqlite_rows(path: &std::path::Path) -> u64 {
    rusqlite::Connection::open(path)
        .and_then(|c| c.query_row("SELECT COUNT(*) FROM person1", [], |r| r.get::<_, i64>(0)))
        .map(|n| n as u64)
        .unwrap_or(0)
}

/// What a raw request on a new connection gets back: everything until the server closes (or
/// resets) it; empty: closed without an answer. A read blocked past 30 s fails the test.
pub fn exchange(port: u16, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream.write_all(request).expect("send");
    let mut response = Vec::new();
    match stream.read_to_end(&mut response) {
        // A socket closed with our request unread is reset: closed all the same.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => {
            other.expect("the server closes the connection");
        }
    }
    String::from_utf8_lossy(&response).into_owned()
}
