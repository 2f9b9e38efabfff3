//! The `writebehind` command line.

mod dlq;
mod tail;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, RedisEndpoint};
use crate::position::{ChangeSeq, ReplId, ReplOffset, StreamPosition};
use crate::redis_client::RedisClient;
use crate::replication::discovery::Discovery;
use crate::replication::ReplicatorOptions;
use crate::service::{Service, ServiceOptions};
use crate::sink::Destination;

#[derive(Debug, Parser)]
#[command(
    name = "writebehind",
    version,
    about = "Keeps SQL tables equal to Redis hashes, attached to the primary as a replica"
)]
pub struct Cli {
    /// Log format on standard error.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Capture into the buffer but write to no database (for database maintenance: the
        /// change log keeps everything until the sinks run again).
        #[arg(long)]
        capture_only: bool,
    },
    /// Validate the configuration and check that Redis can be reached; exit 0 only when all is well.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Positions, lags, dead letters and link state: from the running service (its `[admin]`
    /// listener) or, when it is stopped, from the buffer and the databases.
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The dead-letter store: rows a database refused (stop the service first).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Attach to a primary and print what it replicates, decoded, one line per event.
    Tail {
        /// redis://[user:password@]host:port
        #[arg(long)]
        source: String,
        /// Continue after this position (`<replid>:<offset>[:<db>]`) instead of a full sync.
        #[arg(long)]
        from: Option<String>,
        /// The port announced to the primary (nothing should answer there).
        #[arg(long, default_value_t = 1)]
        announce_port: u16,
        /// Seconds of silence after which the link is considered dead.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// List the dead letters with their reasons.
    List {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Write the current state of the rows again (after fixing the cause).
    Retry {
        #[arg(long, short)]
        config: PathBuf,
        /// The seqs to retry (see `list`).
        #[arg(long = "seq", required_unless_present = "all")]
        seqs: Vec<u64>,
        /// Retry every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Forget dead letters.
    Drop {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long = "seq", required_unless_present = "all")]
        seqs: Vec<u64>,
        #[arg(long)]
        all: bool,
    },
}

/// Whether the connected user may run what a replica runs (`ACL DRYRUN`, Redis 7+). Prints
/// one line; `false` only when a permission is known to be missing.
async fn replica_permissions(client: &mut RedisClient, endpoint: &RedisEndpoint) -> bool {
    let user = match client.command(&["ACL", "WHOAMI"]).await {
        Ok(reply) => crate::redis_client::frame_text(&reply),
        Err(_) => endpoint
            .username
            .clone()
            .unwrap_or_else(|| "default".into()),
    };
    let mut missing = Vec::new();
    for command in [
        &["PSYNC", "?", "-1"][..],
        &["REPLCONF", "ACK", "0"],
        &["PING"],
    ] {
        let mut args = vec!["ACL", "DRYRUN", user.as_str()];
        args.extend_from_slice(command);
        match client.command(&args).await {
            Ok(redis_protocol::resp2::types::BytesFrame::SimpleString(ok))
                if ok.as_ref() == b"OK" => {}
            Ok(reply) => missing.push(format!(
                "{} ({})",
                command[0],
                crate::redis_client::frame_text(&reply)
            )),
            Err(crate::redis_client::ClientError::Reply { message, .. })
                if message.contains("NOPERM") || message.contains("unknown") =>
            {
                println!("note: Redis at {}: cannot verify that user `{user}` may run PSYNC (ACL DRYRUN not permitted or not available): {message}", endpoint.address());
                return true;
            }
            Err(e) => missing.push(format!("{} ({e})", command[0])),
        }
    }
    if missing.is_empty() {
        println!("ok: Redis user `{user}` may run PSYNC, REPLCONF, PING, FUNCTION, FCALL, XADD and EXPIRE");
        true
    } else {
        println!(
            "error: Redis at {}: user `{user}` may not run {}; grant it +psync +replconf +ping +function +fcall +xadd +expire",
            endpoint.address(),
            missing.join(", ")
        );
        false
    }
}

/// Why the running service did not answer on its admin listener.
#[derive(Debug, thiserror::Error)]
enum AdminRequestError {
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
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {listen}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(io)?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .map_err(|_| timeout())?
        .map_err(io)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(AdminRequestError::Malformed)?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(AdminRequestError::Status(
            head.lines().next().unwrap_or("").to_string(),
        ));
    }
    Ok(body.to_string())
}

async fn status(path: &std::path::Path) -> ExitCode {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Some(admin) = &config.admin {
        match admin_get(&admin.listen, "/status").await {
            Ok(body) => {
                match serde_json::from_str::<serde_json::Value>(&body) {
                    Ok(json) => println!("{}", serde_json::to_string_pretty(&json).unwrap_or(body)),
                    Err(_) => println!("{body}"),
                }
                return ExitCode::SUCCESS;
            }
            Err(e) => println!(
                "note: the service does not answer on {} ({e}); reading the buffer",
                admin.listen
            ),
        }
    }
    let store = match crate::buffer::Store::open(&config.buffer.path) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let checkpoint = match store.checkpoint() {
        Ok(checkpoint) => checkpoint,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let oldest = store
        .changes(ChangeSeq::NONE, 1)
        .ok()
        .and_then(|c| c.first().map(|c| c.seq));
    let letters = store.dead_letters().map(|l| l.len()).unwrap_or(0);
    let mut backends = serde_json::Map::new();
    let mappings = crate::capture::mapping::Mappings::new(&config.mappings);
    for (name, backend) in &config.backends {
        if !mappings.iter().any(|m| &m.backend == name) {
            continue;
        }
        let applied = match crate::sink::Sink::connect(name, &backend.url).await {
            Ok(mut sink) => sink
                .applied_seq()
                .await
                .map(|seq| serde_json::Value::from(seq.0))
                .unwrap_or_else(|e| serde_json::Value::from(e.to_string())),
            Err(e) => serde_json::Value::from(e.to_string()),
        };
        backends.insert(name.clone(), serde_json::json!({ "applied_seq": applied }));
    }
    let json = serde_json::json!({
        "service": "stopped",
        "position": checkpoint.position.as_ref().map(|p| p.to_string()),
        "full_sync_in_progress": checkpoint.full_sync_in_progress,
        "captured_seq": checkpoint.next_seq.previous().unwrap_or_default(),
        "oldest_unapplied_seq": oldest,
        "dead_letters": letters,
        "backends": backends,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&json).unwrap_or_default()
    );
    ExitCode::SUCCESS
}

async fn dead_letters(action: DlqAction) -> ExitCode {
    let (path, selection) = match &action {
        DlqAction::List { config } => (config, dlq::Selection::All),
        DlqAction::Retry { config, seqs, all } | DlqAction::Drop { config, seqs, all } => (
            config,
            if *all {
                dlq::Selection::All
            } else {
                dlq::Selection::Seqs(seqs.iter().copied().map(ChangeSeq).collect())
            },
        ),
    };
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let store = match crate::buffer::Store::open(&config.buffer.path) {
        Ok(store) => std::sync::Arc::new(store),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match action {
        DlqAction::List { .. } => dlq::list(&store),
        DlqAction::Drop { .. } => dlq::drop(&store, &selection),
        DlqAction::Retry { .. } => dlq::retry(&config, store, &selection).await,
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run {
                config,
                capture_only,
            } => run(&config, capture_only).await,
            Command::Check { config } => check(&config).await,
            Command::Dlq { action } => dead_letters(action).await,
            Command::Status { config } => status(&config).await,
            Command::Tail {
                source,
                from,
                announce_port,
                timeout,
            } => {
                let endpoint = match RedisEndpoint::parse(&source) {
                    Ok(endpoint) => endpoint,
                    Err(e) => return usage_error(&format!("--source: {e}")),
                };
                let resume = match from.as_deref().map(parse_position).transpose() {
                    Ok(resume) => resume,
                    Err(e) => return usage_error(&format!("--from: {e}")),
                };
                let mut options = ReplicatorOptions::new(endpoint);
                options.announce_port = announce_port;
                options.timeout = Duration::from_secs(timeout.max(1));
                tail::tail(options, resume).await
            }
        }
    })
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Why `--from` is not a position.
#[derive(Debug, Clone, Copy, thiserror::Error)]
enum PositionError {
    #[error("expected <40-hex replid>:<offset>[:<db>]")]
    Replid,
    #[error("the offset must be a number")]
    Offset,
    #[error("the db must be a number")]
    Db,
}

/// `<replid>:<offset>[:<db>]`
fn parse_position(text: &str) -> Result<StreamPosition, PositionError> {
    let mut parts = text.split(':');
    let replid = parts
        .next()
        .and_then(ReplId::parse)
        .ok_or(PositionError::Replid)?;
    let offset = parts
        .next()
        .and_then(|o| o.parse().ok())
        .ok_or(PositionError::Offset)?;
    let db = match parts.next() {
        Some(db) => db.parse().map_err(|_| PositionError::Db)?,
        None => 0,
    };
    Ok(StreamPosition {
        replid,
        offset: ReplOffset(offset),
        db,
    })
}

fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        for problem in &errors.0 {
            eprintln!("error: {problem}");
        }
        ExitCode::from(2)
    })
}

async fn check(path: &std::path::Path) -> ExitCode {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    println!(
        "ok: {} is valid ({} mappings)",
        path.display(),
        config.mappings.len()
    );
    let mut failed = false;
    let endpoints: Vec<RedisEndpoint> = match Discovery::from_config(&config.source) {
        Ok(Discovery::Fixed(endpoint)) => vec![endpoint],
        Ok(Discovery::Nodes(nodes)) => nodes,
        Ok(discovery) => match discovery.primary(Duration::from_secs(5)).await {
            Ok(primary) => {
                println!(
                    "ok: {} names the primary {}",
                    discovery.describe(),
                    primary.address()
                );
                vec![primary]
            }
            Err(e) => {
                failed = true;
                println!("error: {e}");
                Vec::new()
            }
        },
        Err(e) => {
            failed = true;
            println!("error: {e}");
            Vec::new()
        }
    };
    for endpoint in endpoints {
        match RedisClient::connect(&endpoint, Duration::from_secs(5)).await {
            Ok(mut client) => match client.command(&["PING"]).await {
                Ok(_) => {
                    println!("ok: Redis at {} answers", endpoint.address());
                    if !replica_permissions(&mut client, &endpoint).await {
                        failed = true;
                    }
                }
                Err(e) => {
                    failed = true;
                    println!("error: {e}");
                }
            },
            Err(e) => {
                failed = true;
                println!("error: {e}");
            }
        }
    }
    let mappings = crate::capture::mapping::Mappings::new(&config.mappings);
    for (name, backend) in &config.backends {
        // Checked as they are: tables that `create_table` would create are reported as such.
        let mine: Vec<_> = mappings
            .iter()
            .filter(|m| &m.backend == name)
            .map(|m| crate::capture::mapping::Mapping {
                create_table: false,
                ..m.clone()
            })
            .collect();
        let mut sink = match crate::sink::Sink::connect(name, &backend.url).await {
            Ok(sink) => sink,
            Err(e) => {
                failed = true;
                println!("error: {e}");
                continue;
            }
        };
        match sink.prepare(&mine).await {
            Ok(schemas) => println!(
                "ok: backend `{name}` reachable; {} mapped tables match their mappings",
                schemas.len()
            ),
            Err(problems) => {
                for problem in problems {
                    // Checked as they are: a table `create_table` will create is reported as such.
                    let created = problem
                        .missing_table_of()
                        .and_then(|name| mappings.iter().find(|m| m.name == name))
                        .filter(|m| m.create_table);
                    match created {
                        Some(mapping) => println!(
                            "ok: table `{}` will be created at start (create_table = true)",
                            mapping.table
                        ),
                        None => {
                            failed = true;
                            println!("error: {problem}");
                        }
                    }
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The service until a signal or a failure: starts it, stops it gracefully on SIGINT/SIGTERM.
async fn run(path: &std::path::Path, capture_only: bool) -> ExitCode {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(e) => {
                eprintln!("error: cannot listen for SIGTERM: {e}");
                return ExitCode::FAILURE;
            }
        };
    let service = match Service::start(&config, ServiceOptions { capture_only }).await {
        Ok(service) => service,
        Err(e) => {
            for line in e.lines() {
                eprintln!("error: {line}");
            }
            return match e.is_configuration() {
                true => ExitCode::from(2),
                false => ExitCode::FAILURE,
            };
        }
    };
    let stopper = service.stopper();
    let stopped = service.wait();
    tokio::pin!(stopped);
    let outcome = tokio::select! {
        outcome = &mut stopped => outcome,
        _ = tokio::signal::ctrl_c() => {
            stopper.shutdown("SIGINT");
            stopped.await
        }
        _ = terminate.recv() => {
            stopper.shutdown("SIGTERM");
            stopped.await
        }
    };
    match outcome {
        Ok(stats) => {
            tracing::info!(?stats, "stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(%error, "stopped");
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
