//! A full disk under the buffer (docs/design.md 6, "RocksDB error, disk full"): capture stops
//! with one clear line, never acknowledges to the primary what is not on disk, and once there is
//! room again a restart resumes with PSYNC and loses and repeats nothing.
//!
//! The buffer lives on a small `tmpfs` mounted for the test, which needs root (CI runs as
//! root); elsewhere the test says why it did nothing and passes.

mod support;

use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use support::capture::*;
use support::send_all;
use support::RedisServer;
use writebehind::buffer::Store;
use writebehind::redis_client::info_field;

/// A `tmpfs` mounted at `path` for the life of the value.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: &std::path::Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(path).expect("mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| SmallDisk {
            path: path.to_path_buf(),
        })
    }

    fn grow(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .expect("mount");
        assert!(status.success(), "remount {}", self.path.display());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// The service, killed when the test ends (a failed assertion included), so that nothing
/// holds the small disk when it is unmounted.
type Service = support::ServiceProcess;

fn spawn_logging(config: &std::path::Path, log: &std::path::Path) -> Service {
    support::spawn_service(config, std::fs::File::create(log).expect("log"))
}

/// Waits until the service stops (on a full disk it must): how it ended, and its log.
async fn until_stopped(service: &mut Service, log: &std::path::Path) -> (ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = || std::fs::read_to_string(log).unwrap_or_default();
        if let Some(status) = service.0.try_wait().expect("wait") {
            return (status, text());
        }
        assert!(
            Instant::now() < deadline,
            "the service still runs on a full disk:\n{}",
            text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the log has the service's one error line for a full disk.
fn names_the_full_disk(log: &str) -> bool {
    log.lines()
        .any(|l| l.contains("ERROR") && l.contains("No space left on device"))
}

/// Rows of about 1 KB, each a new key (`person2:<n>` with `seq = n`), so none coalesce.
fn rows(next_seq: &mut u64, count: usize) -> Vec<Vec<String>> {
    let padding = "x".repeat(1000);
    (0..count)
        .map(|_| {
            let seq = next_seq.to_string();
            *next_seq += 1;
            let key = format!("person2:{seq}");
            vec![
                "HSET".into(),
                key,
                "seq".into(),
                seq,
                "padding".into(),
                padding.clone(),
            ]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_capture_without_acknowledging_or_losing_anything() {
    let server = RedisServer::start(&["--repl-backlog-size", "512mb"]);
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("dir");
    let database = CountedDb::sqlite(dir.path().join("writebehind.db"));
    let (config, buffer) = service_config_for(&server, &dir, &database.url());
    let Some(disk) = SmallDisk::mount(&buffer, "24m") else {
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    };
    let log = dir.path().join("service.log");
    let mut service = spawn_logging(&config, &log);
    until_attached(&mut client, || {
        std::fs::read_to_string(&log).unwrap_or_default()
    })
    .await;
    // Write until the buffer's disk is full and the service stops: at most 100 MB, which the
    // 24 MB disk cannot hold (the service may still be catching up when they are written).
    // The highest offset the service acknowledged is sampled as it runs (once it is gone, the
    // primary no longer shows it).
    let (mut next_seq, mut acked) = (1u64, 0u64);
    // First a few rows, until the primary has an acknowledged offset past them: the service
    // ACKs once a second, and a fast machine fills the disk below within one.
    send_all(&mut client, &rows(&mut next_seq, 200)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked == 0 {
        assert!(
            Instant::now() < deadline,
            "the service never acknowledged anything"
        );
        acked = replica_ack_offset(&mut client).await.unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while service.0.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "the service never stopped");
        acked = acked.max(replica_ack_offset(&mut client).await.unwrap_or(0));
        if next_seq < 100_000 {
            send_all(&mut client, &rows(&mut next_seq, 200)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (status, text) = until_stopped(&mut service, &log).await;
    let written = next_seq - 1;
    assert!(acked > 0, "the service never acknowledged anything");
    assert!(
        !status.success() && names_the_full_disk(&text),
        "no error line names the full disk: {status}\n{text}"
    );

    // Started again on the disk still full, it stops again with its own error line.
    let again = dir.path().join("service-full.log");
    let mut service = spawn_logging(&config, &again);
    let (status, text) = until_stopped(&mut service, &again).await;
    assert!(
        !status.success() && names_the_full_disk(&text),
        "started on a full disk: {status}\n{text}"
    );

    // Room again: what the buffer holds durably covers everything acknowledged.
    disk.grow("1g");
    let store = Store::open(&buffer).expect("the buffer opens once there is room");
    let durable = store
        .checkpoint()
        .expect("checkpoint")
        .position
        .map_or(0, |p| p.offset.0);
    assert!(
        acked <= durable,
        "the primary was told {acked} was captured, the buffer holds up to {durable}"
    );
    drop(store);

    // A restart resumes with PSYNC and captures and applies every row once.
    let restarted_log = dir.path().join("service2.log");
    let service = spawn_logging(&config, &restarted_log);
    until_caught_up(&mut client, &database, written, || {
        format!(
            ":\n{}",
            std::fs::read_to_string(&restarted_log).unwrap_or_default()
        )
    })
    .await;
    drop(service);
    let stats = client.info("stats").await.expect("info");
    assert_eq!(
        info_field(&stats, "sync_full"),
        Some("1"),
        "no second full sync"
    );
    // The start on the full disk may have resumed with PSYNC too before its first write.
    let partial: u32 = info_field(&stats, "sync_partial_ok")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!((1..=2).contains(&partial), "resumed with PSYNC: {partial}");
    assert_each_row_written_once(&database, written).await;
    drop(disk);
}
