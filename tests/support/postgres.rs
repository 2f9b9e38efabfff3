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
    /// Extra `-c name=value` settings (TLS).
    settings: Vec<String>,
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
        Self::start_with(None)
    }

    /// With TLS (`ssl = on`, the server certificate of `certs`), and the role `tlsonly` (a
    /// superuser without password) refused unless it connects with TLS.
    pub fn start_with_tls(certs: &super::tls::TestCerts) -> PostgresServer {
        Self::start_with(Some(certs))
    }

    fn start_with(certs: Option<&super::tls::TestCerts>) -> PostgresServer {
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
        let mut settings = Vec::new();
        if let Some(certs) = certs {
            // The key must belong to the server's user and be readable by it alone.
            for (from, name) in [
                (&certs.server_cert, "server.crt"),
                (&certs.server_key, "server.key"),
            ] {
                let to = data.join(name);
                std::fs::copy(from, &to).expect("copy certificate");
                let status = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&to)
                    .status();
                assert!(status.expect("chown").success());
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                    .expect("chmod");
            }
            let hba = data.join("pg_hba.conf");
            let rules = std::fs::read_to_string(&hba).expect("pg_hba.conf");
            std::fs::write(
                &hba,
                format!("hostnossl all tlsonly 127.0.0.1/32 reject\n{rules}"),
            )
            .expect("pg_hba.conf");
            settings = [
                "ssl=on",
                "ssl_cert_file=server.crt",
                "ssl_key_file=server.key",
            ]
            .map(String::from)
            .to_vec();
        }
        let mut server = PostgresServer {
            port: super::free_port(),
            dir,
            bindir,
            running: false,
            settings,
        };
        server.launch();
        if certs.is_some() {
            let psql = server.bindir.join("psql");
            as_postgres(
                &psql,
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &server.port.to_string(),
                    "-d",
                    "postgres",
                    "-c",
                    "CREATE ROLE tlsonly SUPERUSER LOGIN",
                ],
            );
        }
        server
    }

    fn launch(&mut self) {
        let d = self.dir.path();
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            d.display()
        );
        for setting in &self.settings {
            options.push_str(&format!(" -c {setting}"));
        }
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
