//! `writebehind status`: from the running service (its `[admin]` listener) or, when it is
//! stopped, from the buffer and the databases.

use std::process::ExitCode;
use std::time::Duration;

use super::load_config;
use crate::position::ChangeSeq;
use crate::sink::Destination;

/// Why the running service did not answer on its admin listener.
#[derive(Debug, thiserror::Error)]
pub(super) enum AdminRequestError {
    #[error("{listen}: no answer")]
    Timeout { listen: String },
    #[error("{listen}: {source}")]
    Io {
        listen: String,
        source: std::io::Error,
    },
    #[error("malformed HTTP response")]
    Malformed,
    #[error("{0}")]
    Status(String),
}

/// `GET <path>` on the admin listener; the body when the status is 200.
async fn admin_get(listen: &str, path: &str) -> Result<String, AdminRequestError> {
    admin_request(listen, "GET", path, None).await
}

/// `<method> <path>` on the admin listener (no body; with `token` as a bearer token when
/// given); the body when the status is 200, else the status line and the body.
pub(super) async fn admin_request(
    listen: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<String, AdminRequestError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let timeout = || AdminRequestError::Timeout {
        listen: listen.to_string(),
    };
    let io = |source| AdminRequestError::Io {
        listen: listen.to_string(),
        source,
    };
    let mut stream = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(listen),
    )
    .await
    .map_err(|_| timeout())?
    .map_err(io)?;
    let authorization = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {listen}\r\n{authorization}Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .map_err(io)?;
    let mut response = Vec::new();
    // A retry is answered once capture has made it durable (the listener waits up to 30 s).
    let answer_within = Duration::from_secs(if method == "POST" { 40 } else { 5 });
    tokio::time::timeout(answer_within, stream.read_to_end(&mut response))
        .await
        .map_err(|_| timeout())?
        .map_err(io)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(AdminRequestError::Malformed)?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(AdminRequestError::Status(format!(
            "{}: {}",
            head.lines().next().unwrap_or(""),
            body.trim()
        )));
    }
    Ok(body.to_string())
}

pub(super) async fn status(path: &std::path::Path) -> ExitCode {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Some(listen) = config.admin.address() {
        match admin_get(listen, "/status").await {
            Ok(body) => {
                match serde_json::from_str::<serde_json::Value>(&body) {
                    Ok(json) => println!("{}", serde_json::to_string_pretty(&json).unwrap_or(body)),
                    Err(_) => println!("{body}"),
                }
                return ExitCode::SUCCESS;
            }
            // On standard error: standard output stays one JSON document.
            Err(e) => {
                eprintln!("note: the service does not answer on {listen} ({e}); reading the buffer")
            }
        }
    }
    // A running service without its admin listener holds the buffer: read what it wrote. In a
    // cluster, each shard's buffer.
    let json = match config.source.cluster.is_some() {
        false => buffer_status(&config, &config.buffer.path, None).await,
        true => {
            let dir = crate::cluster::registry::shards_dir(&config.buffer.path);
            match crate::cluster::registry::load(&dir) {
                Ok(known) => {
                    let mut shards = Vec::new();
                    for shard in known {
                        let mut status =
                            match buffer_status(&config, &dir.join(&shard.id), Some(&shard.id))
                                .await
                            {
                                Ok(status) => status,
                                Err(e) => serde_json::json!({ "error": e }),
                            };
                        if let Some(fields) = status.as_object_mut() {
                            fields.insert("shard".into(), serde_json::json!(shard.id));
                        }
                        shards.push(status);
                    }
                    Ok(serde_json::json!({ "shards": shards }))
                }
                Err(e) => Err(format!("cannot read the shards in {}: {e}", dir.display())),
            }
        }
    };
    let json = match json {
        Ok(json) => json,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&json).unwrap_or_default()
    );
    ExitCode::SUCCESS
}

/// The status read from the buffer at `path` and the databases' checkpoint rows (of `shard`'s
/// runners in a cluster).
async fn buffer_status(
    config: &crate::config::Config,
    path: &std::path::Path,
    shard: Option<&str>,
) -> Result<serde_json::Value, String> {
    let (store, service) = match crate::buffer::Store::open(path) {
        Ok(store) => (store, "stopped"),
        Err(crate::buffer::StoreError::InUse { path }) => {
            match crate::buffer::Store::open_for_reading(&path) {
                Ok(store) => (store, "running (read from its buffer)"),
                Err(e) => return Err(e.to_string()),
            }
        }
        Err(e) => return Err(e.to_string()),
    };
    let checkpoint = match store.checkpoint() {
        Ok(checkpoint) => checkpoint,
        Err(e) => return Err(e.to_string()),
    };
    let oldest = store
        .changes(ChangeSeq::NONE, 1)
        .ok()
        .and_then(|c| c.first().map(|c| c.seq));
    let letters = store.dead_letter_summary().unwrap_or_default();
    // Parts of a transaction written ahead of its EXEC: being received, or, when the service
    // stopped before its end, rolled back at the next start (the primary sends it again).
    let open_transaction = match store.open_unit() {
        Ok(Some(open)) => serde_json::json!({
            "start_offset": open.start.0,
            "first_seq": open.first_seq.0,
            "note": match service {
                "stopped" => "written in parts without its EXEC: rolled back at the next start, then received again",
                _ => "being received: parts written ahead of its EXEC",
            },
        }),
        Ok(None) => serde_json::Value::Null,
        Err(e) => serde_json::Value::from(e.to_string()),
    };
    let mut backends = serde_json::Map::new();
    let mappings = crate::capture::mapping::Mappings::new(&config.mappings);
    for (name, backend) in &config.backends {
        if !mappings.iter().any(|m| &m.backend == name) {
            continue;
        }
        // The seq every partition has applied (the lowest of the backend's rows); a shard's
        // rows are `<backend>@<shard>`.
        let rows_name = match shard {
            Some(shard) => format!("{name}@{shard}"),
            None => name.clone(),
        };
        let applied = match crate::sink::Sink::connect(name, &backend.url).await {
            Ok(mut sink) => sink
                .checkpoints()
                .await
                .map(|rows| {
                    let rows = crate::sink::partition::FoundRows::new(&rows_name, rows);
                    serde_json::Value::from(rows.merged(&rows_name).seq.0)
                })
                .unwrap_or_else(|e| serde_json::Value::from(e.to_string())),
            Err(e) => serde_json::Value::from(e.to_string()),
        };
        backends.insert(name.clone(), serde_json::json!({ "applied_seq": applied }));
    }
    Ok(serde_json::json!({
        "service": service,
        "position": checkpoint.position.as_ref().map(|p| p.to_string()),
        "full_sync_in_progress": checkpoint.full_sync_in_progress,
        "captured_seq": checkpoint.next_seq.previous().unwrap_or_default(),
        "oldest_unapplied_seq": oldest,
        "dead_letters": letters.count,
        "oldest_dead_letter": crate::metrics::oldest_dead_letter(&letters),
        "buffer_bytes": store.disk_size(),
        "backends": backends,
        "open_transaction": open_transaction,
    }))
}
