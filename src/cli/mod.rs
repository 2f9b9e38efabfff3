//! The `writebehind` command line.

mod check;
mod dlq;
mod status;
mod tail;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::capture::requeue::Letters;
use crate::cluster::ClusterService;
use crate::config::{Config, RedisEndpoint};
use crate::position::{ChangeSeq, ReplId, ReplOffset, StreamPosition};
use crate::replication::ReplicatorOptions;
use crate::service::{Service, ServiceOptions};
use futures_util::FutureExt;

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
        /// With `[source] cluster`: the shard whose dead letters these are (`status` lists them).
        #[arg(long, global = true)]
        shard: Option<String>,
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

async fn dead_letters(action: DlqAction, shard: Option<String>) -> ExitCode {
    let (path, letters) = match &action {
        DlqAction::List { config } => (config, Letters::All),
        DlqAction::Retry { config, seqs, all } | DlqAction::Drop { config, seqs, all } => (
            config,
            if *all {
                Letters::All
            } else {
                Letters::Seqs(seqs.iter().copied().map(ChangeSeq).collect())
            },
        ),
    };
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let buffer = match shard_buffer(&config, shard.as_deref()) {
        Ok(buffer) => buffer,
        Err(problem) => {
            eprintln!("error: {problem}");
            return ExitCode::from(2);
        }
    };
    let store = match crate::buffer::Store::open(&buffer) {
        Ok(store) => std::sync::Arc::new(store),
        // The service runs: a listing reads what it wrote; changes are asked of it.
        Err(crate::buffer::StoreError::InUse { path }) => {
            let verb = match action {
                DlqAction::List { .. } => None,
                DlqAction::Retry { .. } => Some("retry"),
                DlqAction::Drop { .. } => Some("drop"),
            };
            return match (verb, config.admin.address()) {
                (Some(verb), Some(listen)) => {
                    let request = (verb, &letters, shard.as_deref());
                    ask_the_service(listen, config.admin.token.as_deref(), request).await
                }
                (Some(verb), None) => {
                    eprintln!("error: the service is running on the buffer at {} without an admin listener: `dlq {verb}` is asked of it through one; set [admin] listen, or stop the service", path.display());
                    ExitCode::FAILURE
                }
                (None, _) => match crate::buffer::Store::open_for_reading(&path) {
                    Ok(store) => dlq::list(&store),
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::FAILURE
                    }
                },
            };
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match action {
        DlqAction::List { .. } => dlq::list(&store),
        DlqAction::Drop { .. } => dlq::drop(&store, &letters),
        DlqAction::Retry { .. } => dlq::retry(&config, store, &letters).await,
    }
}

/// `dlq retry|drop` while the service runs: asked of it through its admin listener
/// (`POST /dlq/<verb>`, with the bearer token when `[admin] token` is set).
async fn ask_the_service(
    listen: &str,
    token: Option<&str>,
    (verb, letters, shard): (&str, &Letters, Option<&str>),
) -> ExitCode {
    let shard = shard.map(|s| format!("shard={s}&")).unwrap_or_default();
    let path = format!("/dlq/{verb}?{shard}{}", letters.query());
    match status::admin_request(listen, "POST", &path, token).await {
        Ok(body) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: the running service did not {verb} the dead letters ({e})");
            ExitCode::FAILURE
        }
    }
}

/// The buffer a `dlq` command works on: `[buffer] path`, or in a cluster that of `--shard`.
fn shard_buffer(config: &Config, shard: Option<&str>) -> Result<PathBuf, String> {
    let dir = crate::cluster::registry::shards_dir(&config.buffer.path);
    match (config.source.cluster.is_some(), shard) {
        (false, None) => Ok(config.buffer.path.clone()),
        (false, Some(_)) => Err("--shard is for a [source] cluster configuration".into()),
        (true, shard) => {
            let known = crate::cluster::registry::load(&dir)
                .map_err(|e| format!("cannot read the shards in {}: {e}", dir.display()))?;
            let ids: Vec<&str> = known.iter().map(|k| k.id.as_str()).collect();
            match shard {
                Some(id) if ids.contains(&id) => Ok(dir.join(id)),
                Some(id) => Err(format!(
                    "no shard `{id}` in {}; the shards are: {}",
                    dir.display(),
                    ids.join(", ")
                )),
                None => Err(format!(
                    "[source] cluster: name the shard with --shard <id>; the shards are: {}",
                    ids.join(", ")
                )),
            }
        }
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // The sinks and the write-back task read the buffer on these threads.
        .on_thread_start(crate::buffer::stop_rocksdb_perf_counters)
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
            Command::Check { config } => check::check(&config).await,
            Command::Dlq { shard, action } => dead_letters(action, shard).await,
            Command::Status { config } => status::status(&config).await,
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
                // A terminal that reads slowly should slow the link, not fill a disk.
                options.stream_spool_bytes = 0;
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

pub(super) fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        for problem in &errors.0 {
            eprintln!("error: {problem}");
        }
        ExitCode::from(2)
    })
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
    let options = ServiceOptions { capture_only };
    let started = match config.source.cluster.is_some() {
        true => ClusterService::start(&config, options)
            .await
            .map(|s| (s.stopper(), s.wait().boxed())),
        false => Service::start(&config, options)
            .await
            .map(|s| (s.stopper(), s.wait().boxed())),
    };
    let (stopper, stopped) = match started {
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
