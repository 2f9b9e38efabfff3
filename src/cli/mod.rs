//! The `writebehind` command line.

mod dlq;
mod tail;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, RedisEndpoint};
use crate::position::{ReplId, ReplOffset, StreamPosition};
use crate::redis_client::RedisClient;
use crate::replication::discovery::Discovery;
use crate::replication::{Replicator, ReplicatorOptions};
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

async fn dead_letters(action: DlqAction) -> ExitCode {
    let (path, selection) = match &action {
        DlqAction::List { config } => (config, dlq::Selection::All),
        DlqAction::Retry { config, seqs, all } | DlqAction::Drop { config, seqs, all } => (
            config,
            if *all {
                dlq::Selection::All
            } else {
                dlq::Selection::Seqs(seqs.clone())
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

/// `<replid>:<offset>[:<db>]`
fn parse_position(text: &str) -> Result<StreamPosition, String> {
    let mut parts = text.split(':');
    let replid = parts
        .next()
        .and_then(ReplId::parse)
        .ok_or("expected <40-hex replid>:<offset>[:<db>]")?;
    let offset = parts
        .next()
        .and_then(|o| o.parse().ok())
        .ok_or("the offset must be a number")?;
    let db = match parts.next() {
        Some(db) => db.parse().map_err(|_| "the db must be a number")?,
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
    for endpoint in config.source_endpoints() {
        match RedisClient::connect(&endpoint, Duration::from_secs(5)).await {
            Ok(mut client) => match client.command(&["PING"]).await {
                Ok(_) => println!("ok: Redis at {} answers", endpoint.address()),
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
    if config.source.sentinels.is_some() {
        println!(
            "note: Sentinel discovery is not implemented yet; the sentinels were not contacted"
        );
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
                    let created = mine.iter().any(|m| {
                        problem.contains(&format!(
                            "mapping `{}`: table `{}` does not exist",
                            m.name, m.table
                        )) && mappings.iter().any(|o| o.name == m.name && o.create_table)
                    });
                    if created {
                        let table = mine
                            .iter()
                            .find(|m| problem.contains(&format!("mapping `{}`:", m.name)))
                            .map(|m| m.table.as_str())
                            .unwrap_or("?");
                        println!(
                            "ok: table `{table}` will be created at start (create_table = true)"
                        );
                    } else {
                        failed = true;
                        println!("error: {problem}");
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

/// The service: capture into the buffer, and one sink runner per backend.
async fn run(path: &std::path::Path, capture_only: bool) -> ExitCode {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let discovery = match Discovery::from_config(&config.source) {
        Ok(discovery) => discovery,
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    // A first guess; capture follows whatever primary the replication link finds.
    let endpoint = match &discovery {
        Discovery::Fixed(e) => e.clone(),
        Discovery::Nodes(nodes)
        | Discovery::Sentinel {
            sentinels: nodes, ..
        } => match nodes.first() {
            Some(e) => e.clone(),
            None => {
                eprintln!("error: {}: [source] lists no address", path.display());
                return ExitCode::from(2);
            }
        },
    };
    let store = match crate::buffer::Store::open(&config.buffer.path) {
        Ok(store) => std::sync::Arc::new(store),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mappings = crate::capture::mapping::Mappings::new(&config.mappings);
    let mut capture =
        match crate::capture::Capture::new(store.clone(), mappings.clone(), endpoint.clone()) {
            Ok(capture) => capture,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
    // One runner per backend that has mappings; every problem is reported before starting.
    let backends: Vec<(&String, &crate::config::BackendConfig)> = config
        .backends
        .iter()
        .filter(|(name, _)| !capture_only && mappings.iter().any(|m| &m.backend == *name))
        .collect();
    let positions = std::sync::Arc::new(crate::sink::runner::AppliedPositions::new(backends.len()));
    let mut runners = Vec::new();
    let mut problems = Vec::new();
    for (name, backend) in &backends {
        let mine: Vec<_> = mappings
            .iter()
            .filter(|m| &m.backend == *name)
            .cloned()
            .collect();
        match crate::sink::runner::SinkRunner::start(
            name,
            &backend.url,
            mine,
            store.clone(),
            capture.committed(),
            positions.clone(),
        )
        .await
        {
            Ok(runner) => runners.push(runner),
            Err(mut p) => problems.append(&mut p),
        }
    }
    if !problems.is_empty() {
        for problem in problems {
            eprintln!("error: {problem}");
        }
        return ExitCode::from(2);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut tasks = tokio::task::JoinSet::new();
    for runner in runners {
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move { runner.run(stop).await.map_err(|e| e.to_string()) });
    }
    let mut options = ReplicatorOptions::with_discovery(discovery.clone());
    options.announce_port = config.replication.announce_port;
    options.timeout = Duration::from_secs(config.replication.timeout_secs);
    let mut replicator = Replicator::new(options, capture.resume_position());
    tracing::info!(source = %discovery.describe(), resume = ?capture.resume_position().map(|p| p.to_string()), buffer = %config.buffer.path.display(), backends = backends.len(), "starting");
    let capture_stop = stopped(stop_rx.clone());
    let outcome = tokio::select! {
        result = capture.run(&mut replicator, capture_stop) => result.map_err(|e| e.to_string()),
        _ = tokio::signal::ctrl_c() => Ok(()),
        Some(result) = tasks.join_next() => match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(e.to_string()),
        },
    };
    let _ = stop_tx.send(true);
    while let Some(result) = tasks.join_next().await {
        if let Ok(Err(e)) = result {
            tracing::error!(error = %e, "sink stopped");
        }
    }
    match outcome {
        Ok(()) => {
            tracing::info!(stats = ?capture.stats, "stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(%error, "stopped");
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
