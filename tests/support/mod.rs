//! Real servers for the integration tests: each test starts its own `redis-server` on a free
//! port in a temporary directory, and the server is killed when the handle drops.
//!
//! The server program is `redis-server` unless `WRITEBEHIND_TEST_SERVER` names another (a
//! Redis or Valkey build taking the same arguments): `.ci/run` runs the suite once per server of
//! the matrix (scripts/fetch-servers.sh).

#![allow(dead_code)]

pub mod capture;
pub mod cluster;
pub mod cluster_load;
pub mod ops;
pub mod postgres;
pub mod proxy;
pub mod replication;
pub mod service;
pub mod sink;
pub mod tls;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use writebehind::config::RedisEndpoint;
use writebehind::redis_client::RedisClient;

pub struct RedisServer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

/// The Redis (or Valkey) server program the tests start.
pub fn server_program() -> String {
    std::env::var("WRITEBEHIND_TEST_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// The `(major, minor)` version a server reports as `redis_version` in `INFO server` (Valkey
/// reports the Redis version it is compatible with, 7.2 for Valkey 8), for assertions that
/// depend on it.
pub fn redis_version(info_server: &str) -> (u32, u32) {
    let version = writebehind::redis_client::info_field(info_server, "redis_version")
        .expect("INFO server has redis_version");
    let mut parts = version
        .split('.')
        .map(|p| p.parse::<u32>().expect("a version number"));
    (parts.next().expect("major"), parts.next().expect("minor"))
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

fn answers_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok();
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 64];
    // A server with a password answers -NOAUTH: it is up all the same.
    matches!(stream.read(&mut reply), Ok(n) if n > 0 && (reply.starts_with(b"+PONG") || reply.starts_with(b"-NOAUTH")))
}

impl RedisServer {
    /// Starts `redis-server` with the test defaults plus `extra` (`--name value` pairs).
    pub fn start(extra: &[&str]) -> RedisServer {
        Self::start_with(None, extra)
    }

    /// Starts on a given port (to bring a stopped server back where its peers expect it).
    pub fn start_on_port(port: u16, extra: &[&str]) -> RedisServer {
        Self::start_with(Some(port), extra)
    }

    fn start_with(fixed_port: Option<u16>, extra: &[&str]) -> RedisServer {
        Self::try_start_with(fixed_port, extra)
            .unwrap_or_else(|e| panic!("could not start redis-server: {e}"))
    }

    /// Starts on `port`, or says why the server would not run there.
    pub fn try_start_on_port(port: u16, extra: &[&str]) -> Result<RedisServer, String> {
        Self::try_start_with(Some(port), extra)
    }

    /// Starts, or says why the server would not run.
    pub fn try_start(extra: &[&str]) -> Result<RedisServer, String> {
        Self::try_start_with(None, extra)
    }

    fn try_start_with(fixed_port: Option<u16>, extra: &[&str]) -> Result<RedisServer, String> {
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = fixed_port.unwrap_or_else(free_port);
            let dir = tempfile::tempdir().expect("temp dir");
            let log = dir.path().join("redis.log");
            let mut child = Command::new(server_program())
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                // No 5 s wait before a diskless snapshot: tests sync often.
                .args(["--repl-diskless-sync-delay", "0"])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(&log)
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {} (see .ci/run): {e}", server_program()));
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if answers_ping(port) {
                    return Ok(RedisServer { child, port, dir });
                }
                if let Ok(Some(status)) = child.try_wait() {
                    last_error = format!(
                        "redis-server exited with {status}: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Err(last_error)
    }

    pub fn endpoint(&self) -> RedisEndpoint {
        RedisEndpoint::parse(&format!("redis://127.0.0.1:{}", self.port)).expect("endpoint")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn client(&self) -> RedisClient {
        RedisClient::connect(&self.endpoint(), Duration::from_secs(10))
            .await
            .expect("connect to the test redis")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private MariaDB server (its own data directory and port), for tests that stop and restart
/// the database. Killed when dropped.
pub struct MariaDbServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// Server options added to every launch.
    options: Vec<String>,
}

impl MariaDbServer {
    pub fn start() -> MariaDbServer {
        MariaDbServer::start_with(&[])
    }

    /// A server launched with `options` too (for example `--sql-mode=`).
    pub fn start_with(options: &[&str]) -> MariaDbServer {
        let dir = tempfile::tempdir().expect("temp dir");
        // A tmpdir of its own: every mariadbd (and mariadb-install-db) deletes the `#sql*` files
        // of its tmpdir when it starts, and in the shared /tmp those are the temporary tables
        // of the machine's shared server in use; MariaDB 10.11 then crashed (signal 11 in
        // ha_maria::drop_table) when its open of one failed, taking every test using it down.
        std::fs::create_dir(dir.path().join("tmp")).expect("tmpdir");
        let output = Command::new("mariadb-install-db")
            .args([
                "--no-defaults",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .arg(format!("--tmpdir={}", dir.path().join("tmp").display()))
            .output()
            .expect("mariadb-install-db (MariaDB server package, installed by .ci/run)");
        // What it printed, to tell why when it fails (it once did in CI, unexplained).
        assert!(
            output.status.success(),
            "mariadb-install-db failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let mut server = MariaDbServer {
            child: None,
            port: free_port(),
            dir,
            options: options.iter().map(|o| o.to_string()).collect(),
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let d = self.dir.path();
        let child = Command::new("mariadbd")
            .args([
                "--no-defaults",
                "--user=root",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
            ])
            .arg(format!("--port={}", self.port))
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--tmpdir={}", d.join("tmp").display()))
            .arg(format!("--socket={}", d.join("mariadb.sock").display()))
            .arg(format!("--pid-file={}", d.join("mariadb.pid").display()))
            .arg(format!("--log-error={}", d.join("error.log").display()))
            .args(&self.options)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mariadbd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mariadbd did not start: {}",
                std::fs::read_to_string(d.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, database: &str) -> String {
        format!("{}/{database}", self.server())
    }

    /// `mysql://root@127.0.0.1:<port>`, for [`create_database`].
    pub fn server(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    /// Stops the server abruptly (SIGKILL) and starts it again on the same data and port.
    pub fn crash_and_restart(&mut self, down_for: Duration) {
        self.stop();
        std::thread::sleep(down_for);
        self.launch();
    }

    /// Starts a stopped server again on the same data and port.
    pub fn restart(&mut self) {
        if self.child.is_none() {
            self.launch();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for MariaDbServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Sentinel (`redis-server <conf> --sentinel`) monitoring `master_name` at `master_port`.
pub struct SentinelServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl SentinelServer {
    pub fn start(master_name: &str, master_port: u16, quorum: u32) -> SentinelServer {
        Self::start_with(master_name, master_port, quorum, "")
    }

    /// With `extra` lines in its configuration (TLS: `tests/support/tls.rs`). A primary is
    /// judged down after 3 s without an answer. With 1 s, `a_sentinel_failover_over_tls` failed
    /// once on a loaded CI machine with its own client cut (`UnexpectedEof` on `KEYS`) before
    /// the test killed the primary: most likely the Sentinels failed the live primary over,
    /// and a Sentinel that demotes a primary kills its clients (`sentinelSendSlaveOf` sends
    /// `CLIENT KILL TYPE normal` with the `SLAVEOF`).
    pub fn start_with(
        master_name: &str,
        master_port: u16,
        quorum: u32,
        extra: &str,
    ) -> SentinelServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}\n{extra}\nsentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}\n\
                 sentinel down-after-milliseconds {master_name} 3000\nsentinel failover-timeout {master_name} 5000\n\
                 sentinel parallel-syncs {master_name} 1\n",
                dir.path().display(),
                dir.path().join("sentinel.log").display()
            ),
        )
        .expect("sentinel.conf");
        let child = Command::new(server_program())
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !answers_ping(port) {
            assert!(Instant::now() < deadline, "sentinel did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        SentinelServer {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("sentinel.log")).unwrap_or_default()
    }
}

impl Drop for SentinelServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `writebehind run --config <config>` at log level info, its log (standard error) into
/// `log`.
pub fn spawn_service(config: &std::path::Path, log: impl Into<Stdio>) -> ServiceProcess {
    ServiceProcess(
        Command::new(env!("CARGO_BIN_EXE_writebehind"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start writebehind"),
    )
}

/// A `writebehind run` process, killed when dropped: a test that fails leaves none behind.
pub struct ServiceProcess(pub Child);

impl std::ops::Deref for ServiceProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for ServiceProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The machine's shared MariaDB (root, empty password), started by `.ci/run`.
pub const SHARED_MARIADB: &str = "mysql://root@127.0.0.1:3306";

/// Creates a database named `<prefix>_<pid>_<random>` on the MariaDB server `server`
/// (`mysql://user@host:port`); returns its name and URL.
pub async fn create_database(server: &str, prefix: &str) -> (String, String) {
    use mysql_async::prelude::Queryable;
    let name = format!("{prefix}_{}_{}", std::process::id(), rand::random::<u32>());
    let admin = mysql_async::Pool::new(format!("{server}/mysql").as_str());
    admin
        .get_conn()
        .await
        .unwrap_or_else(|e| {
            panic!("MariaDB at {server} (the shared one is started by .ci/run): {e}")
        })
        .query_drop(format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    admin.disconnect().await.ok();
    let url = format!("{server}/{name}");
    (name, url)
}

/// Sends `commands` (owned arguments) in pipelines of 200; a `MULTI` may span them.
pub async fn send_all(client: &mut RedisClient, commands: &[Vec<String>]) {
    for chunk in commands.chunks(200) {
        let refs: Vec<Vec<&str>> = chunk
            .iter()
            .map(|c| c.iter().map(String::as_str).collect())
            .collect();
        let slices: Vec<&[&str]> = refs.iter().map(Vec::as_slice).collect();
        client.pipeline(&slices).await.expect("pipeline");
    }
}
