//! A private PostgreSQL cluster (`initdb` and `pg_ctl` from `pg_config --bindir`, run as the
//! `postgres` user: PostgreSQL refuses to run as root), on a free port in a temporary
//! directory, for tests that stop the database. Stopped (immediately) when dropped.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

pub struct PostgresServer {
    pub port: u16,
    dir: tempfile::TempDir,
    bindir: PathBuf,
    running: bool,
}

/// Runs a PostgreSQL program as the `postgres` user; panics with its output on failure.
fn as_postgres(program: &std::path::Path, args: &[&str]) {
    let output = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("runuser {}: {e}", program.display()));
    assert!(
        output.status.success(),
        "{} {args:?} failed ({}):\n{}\n{}",
        program.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl PostgresServer {
    pub fn start() -> PostgresServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(dir.path())
            .status()
            .expect("chown");
        assert!(status.success(), "chown of the cluster directory");
        let bindir = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
            .expect("pg_config --bindir (PostgreSQL server package, installed by .ci/run)");
        let data = dir.path().join("data");
        as_postgres(
            &bindir.join("initdb"),
            &[
                "-D",
                &data.display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        let mut server = PostgresServer {
            port: super::free_port(),
            dir,
            bindir,
            running: false,
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let d = self.dir.path();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            d.display()
        );
        as_postgres(
            &self.bindir.join("pg_ctl"),
            &[
                "-D",
                &d.join("data").display().to_string(),
                "-l",
                &d.join("server.log").display().to_string(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
        self.running = true;
    }

    /// `postgres://postgres@127.0.0.1:<port>`.
    pub fn server(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`: no shutdown checkpoint, crash
    /// recovery on the next start) and starts it again on the same data and port.
    pub fn crash_and_restart(&mut self, down_for: Duration) {
        self.stop();
        std::thread::sleep(down_for);
        self.launch();
    }

    pub fn stop(&mut self) {
        if self.running {
            let data = self.dir.path().join("data").display().to_string();
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.bindir.join("pg_ctl"))
                .args(["-D", &data, "-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            self.running = false;
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}
