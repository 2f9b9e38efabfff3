//! The service: the whole pipeline of one process, wired (docs/architecture.md draws it).
//!
//! [`Service::start`] opens the buffer, connects every backend (checking or creating its
//! tables), and spawns the tasks, each given at construction what it needs:
//! - **capture**, on a thread of its own with its own single-threaded runtime (it also
//!   supervises the other tasks): the replication link and [`Capture`], which reports through
//!   [`CaptureOutputs`];
//! - one **sink runner** per backend with mappings, woken by capture's commits;
//! - the **write-back** task (`[acks] enabled`): `#` completions and acknowledgement streams;
//! - helpers: the admin listener (`[admin]`) and a poller of the primary's offset and the
//!   buffer's size.
//!
//! [`Service::shutdown`] (or [`Stopper::shutdown`] from another task) begins a graceful stop:
//! `/ready` turns 503, capture finishes the batch it is applying (bounded by
//! [`CAPTURE_STOP_GRACE`]), the durable offset is reported to the primary one last time, the
//! sinks write everything committed, and every task returns (all bounded by
//! [`FINISH_GRACE`]). What capture had not committed was never acknowledged and comes again
//! after a restart. [`Service::wait`] returns when the service has stopped, after a shutdown or
//! because a task failed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::ack::writer::{Writer, WriterError};
use crate::buffer::{Store, StoreError};
use crate::capture::mapping::Mappings;
use crate::capture::{Capture, CaptureError, CaptureOutputs, CaptureSettings, CaptureStats};
use crate::cluster::locator::ShardLocator;
use crate::cluster::peers::{Peer, Peers};
use crate::config::{Config, RedisEndpoint};
use crate::metrics::{AdminError, Health};
use crate::redis_client::{info_field, RedisClient};
use crate::replication::discovery::{Discovery, DiscoveryError};
use crate::replication::{Replicator, ReplicatorOptions};
use crate::sink::runner::{AppliedPositions, RunnerError, RunnerLinks, SinkRunner};
use crate::sink::{SchemaProblem, Sink};

/// How long capture may take to finish the batch it is applying once a stop is requested.
pub const CAPTURE_STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the rest of a graceful stop may take (final `REPLCONF ACK`, sinks draining).
pub const FINISH_GRACE: Duration = Duration::from_secs(30);
/// How often the primary's offset (for the lag) and the buffer's size are read.
const POLL_EVERY: Duration = Duration::from_secs(2);

/// How the service runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServiceOptions {
    /// Capture into the buffer but write to no database.
    pub capture_only: bool,
}

/// One shard of a Redis Cluster: `crate::cluster` starts a service per shard, each with a
/// buffer of its own (`[buffer] path/shards/<id>`) and checkpoint rows of its own
/// (`<backend>@<id>`).
#[derive(Debug, Clone)]
pub struct ShardSetup {
    /// The shard's id: the node id of its primary when it was first seen.
    pub id: String,
    pub locator: Arc<ShardLocator>,
    /// Every shard's buffer, health and capture (`cluster/peers.rs`).
    pub peers: Arc<Peers>,
}

impl ShardSetup {
    /// The shard's buffer directory.
    pub fn buffer_path(&self, config: &Config) -> std::path::PathBuf {
        config.buffer.path.join("shards").join(&self.id)
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `[source]` names no usable primary.
    #[error(transparent)]
    Source(#[from] DiscoveryError),
    #[error("[admin] listen `{listen}`: {source}")]
    AdminAddress {
        listen: String,
        source: std::net::AddrParseError,
    },
    /// Backends or mapped tables that cannot work as they are: every one found.
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Backends(Vec<SchemaProblem>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("cannot start the capture thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot record the cluster's shards in {}: {source}; check that directory's permissions and free space", .path.display())]
    Registry {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl StartError {
    /// Whether the configuration is at fault (a usage error) rather than the machine.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            StartError::Source(_) | StartError::AdminAddress { .. } | StartError::Backends(_)
        )
    }

    /// One line per problem, as printed.
    pub fn lines(&self) -> Vec<String> {
        match self {
            StartError::Backends(problems) => problems.iter().map(|p| p.to_string()).collect(),
            other => vec![other.to_string()],
        }
    }
}

/// Why the service stopped by itself.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Sink(#[from] RunnerError),
    #[error(transparent)]
    Writeback(#[from] WriterError),
    #[error("a task of the service failed: {0}")]
    Task(String),
}

/// Requests a graceful stop from anywhere.
#[derive(Clone)]
pub struct Stopper {
    stop: Arc<watch::Sender<bool>>,
    health: Arc<Health>,
}

impl Stopper {
    /// A stopper sending on `stop`; `health` turns unready when it is used.
    pub(crate) fn new(stop: Arc<watch::Sender<bool>>, health: Arc<Health>) -> Stopper {
        Stopper { stop, health }
    }

    /// Begins a graceful stop (idempotent); `reason` is logged.
    pub fn shutdown(&self, reason: &str) {
        if !*self.stop.borrow() {
            tracing::info!("{reason}: stopping");
        }
        self.health.begin_shutdown();
        self.stop.send_replace(true);
    }
}

/// A running service.
pub struct Service {
    store: Arc<Store>,
    health: Arc<Health>,
    stopper: Stopper,
    /// The capture thread's outcome (it supervises the other tasks).
    supervisor: tokio::sync::oneshot::Receiver<Result<CaptureStats, ServiceError>>,
    /// Where dead-letter retries go (capture serves them between events).
    requeue: tokio::sync::mpsc::Sender<crate::capture::requeue::RequeueRequest>,
}

/// Resolves when a stop has been requested.
async fn stop_requested(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

impl Service {
    /// Opens the buffer, prepares every backend and starts the tasks. Every configuration
    /// problem is reported before anything starts.
    pub async fn start(config: &Config, options: ServiceOptions) -> Result<Service, StartError> {
        Service::start_shard(config, options, None).await
    }

    /// [`Service::start`], for one shard of a cluster when `shard` is given: it has no admin
    /// listener of its own (the cluster's serves every shard).
    pub async fn start_shard(
        config: &Config,
        options: ServiceOptions,
        shard: Option<ShardSetup>,
    ) -> Result<Service, StartError> {
        let discovery = match &shard {
            Some(shard) => Discovery::Cluster(shard.locator.clone()),
            None => Discovery::from_config(&config.source)?,
        };
        let endpoint = first_guess(&discovery)?;
        let admin =
            match (&shard, config.admin.address()) {
                (None, Some(listen)) => Some(listen.parse::<SocketAddr>().map_err(|source| {
                    StartError::AdminAddress {
                        listen: listen.to_string(),
                        source,
                    }
                })?),
                _ => None,
            };
        let buffer_path = match &shard {
            Some(shard) => shard.buffer_path(config),
            None => config.buffer.path.clone(),
        };
        let mut store = Store::open(&buffer_path)?;
        store.set_journal_bytes(config.buffer.mirror_journal_mb << 20);
        let store = Arc::new(store);
        let mappings = Mappings::new(&config.mappings);
        let outputs = CaptureOutputs {
            health: Health::for_shard(shard.as_ref().map(|s| s.id.clone())),
            ..CaptureOutputs::default()
        };
        let mut capture = Capture::new(
            store.clone(),
            mappings.clone(),
            endpoint,
            CaptureSettings {
                ops: config.acks.enabled,
                mirror_cache_bytes: config.buffer.mirror_cache_mb << 20,
            },
            outputs.clone(),
        )?;
        // Dead-letter retries from the admin listener, served by capture in the change order.
        let (requeue, requeues) = tokio::sync::mpsc::channel(4);
        capture.serve_requeues(requeues);
        if let Some(shard) = &shard {
            // Other shards' runners ask this capture about keys that move here.
            let (holds, checks) = tokio::sync::mpsc::unbounded_channel();
            capture.serve_holds(shard.id.clone(), shard.peers.clone(), checks);
            shard.peers.add(Peer {
                id: shard.id.clone(),
                store: store.clone(),
                health: outputs.health.clone(),
                holds,
            });
        }
        let runners = start_runners(
            config,
            &mappings,
            (&store, &outputs),
            shard.as_ref(),
            options,
        )
        .await?;
        let writer = match config.acks.enabled {
            true => Some(Writer::new(
                store.clone(),
                discovery.clone(),
                outputs.writeback.clone(),
                config.acks.expire_secs,
                outputs.health.clone(),
            )?),
            false => None,
        };
        let metrics = match admin {
            Some(listen) => Some((listen, crate::metrics::install()?)),
            None => None,
        };
        let (stop, stop_rx) = watch::channel(false);
        let stopper = Stopper {
            stop: Arc::new(stop),
            health: outputs.health.clone(),
        };
        let mut tasks: JoinSet<Result<(), ServiceError>> = JoinSet::new();
        let runner_count = runners.len();
        for runner in runners {
            let stop = stop_requested(stop_rx.clone());
            tasks.spawn(async move { runner.run(stop).await.map_err(ServiceError::from) });
        }
        if let Some(writer) = writer {
            let stop = stop_requested(stop_rx.clone());
            tasks.spawn(async move { writer.run(stop).await.map_err(ServiceError::from) });
        }
        let mut helpers = JoinSet::new();
        if let Some((listen, handle)) = metrics {
            let admin = crate::admin::Admin::new(
                handle,
                config.admin.token.clone(),
                crate::admin::PipelineAdmin {
                    health: outputs.health.clone(),
                    store: store.clone(),
                    requeue: Some(requeue.clone()),
                },
            );
            let stop = stop_requested(stop_rx.clone());
            helpers.spawn(async move {
                if let Err(e) = crate::admin::serve(listen, admin, stop).await {
                    tracing::error!(error = %e, "admin listener stopped; the pipeline runs on without /metrics and /status");
                }
            });
        }
        helpers.spawn(poll_primary(
            outputs.health.clone(),
            store.clone(),
            stop_rx.clone(),
        ));
        let mut replication = ReplicatorOptions::with_discovery(discovery.clone());
        replication.announce_port = config.replication.announce_port;
        replication.timeout = Duration::from_secs(config.replication.timeout_secs);
        replication.spool_dir = buffer_path.join("spool");
        replication.stream_spool_bytes = config.replication.stream_spool_mb.saturating_mul(1 << 20);
        replication.waiting_for_snapshot = outputs.health.waiting_for_snapshot_flag();
        replication.spooled = outputs.health.spooled_counter();
        // A spool never outlives its link: what a previous run left is of no use.
        if let Err(e) = std::fs::remove_dir_all(&replication.spool_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %replication.spool_dir.display(), error = %e, "cannot empty the snapshot spool directory");
            }
        }
        let replicator = Replicator::new(replication, capture.resume_position());
        tracing::info!(source = %discovery.describe(), resume = ?capture.resume_position().map(|p| p.to_string()), buffer = %buffer_path.display(), backends = runner_count, "starting");
        // Capture runs on a thread of its own (as a replica's main loop does): sharing the
        // runtime's workers with the sinks and the write-back task measurably delays every
        // commit, and so every acknowledgement.
        let parts = Tasks {
            capture,
            replicator,
            tasks,
            helpers,
        };
        let (done, supervisor) = tokio::sync::oneshot::channel();
        let capture_stopper = stopper.clone();
        std::thread::Builder::new()
            .name("writebehind-capture".into())
            .spawn(move || {
                crate::buffer::stop_rocksdb_perf_counters();
                let result = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(supervise(parts, capture_stopper, stop_rx)),
                    Err(e) => Err(ServiceError::Task(format!(
                        "cannot start capture's runtime: {e}"
                    ))),
                };
                let _ = done.send(result);
            })
            .map_err(StartError::Thread)?;
        Ok(Service {
            store,
            health: outputs.health,
            stopper,
            supervisor,
            requeue,
        })
    }

    /// Where the admin listener sends dead-letter retries.
    pub fn requeue(
        &self,
    ) -> Option<tokio::sync::mpsc::Sender<crate::capture::requeue::RequeueRequest>> {
        Some(self.requeue.clone())
    }

    /// The buffer, for status and tests.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Positions, link and backend state (what `/status` shows).
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// A handle that requests a graceful stop from anywhere.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Begins a graceful stop.
    pub fn shutdown(&self) {
        self.stopper.shutdown("shutdown requested");
    }

    /// Waits until the service has stopped: `Ok` with capture's counters after a graceful
    /// stop, the first failure otherwise.
    pub async fn wait(self) -> Result<CaptureStats, ServiceError> {
        self.supervisor
            .await
            .map_err(|_| ServiceError::Task("the capture thread ended without a result".into()))?
    }
}

/// Where capture first looks for the primary; it follows whatever primary the link finds.
fn first_guess(discovery: &Discovery) -> Result<RedisEndpoint, StartError> {
    match discovery {
        Discovery::Fixed(e) => Ok(e.clone()),
        Discovery::Cluster(locator) => locator
            .first_guess()
            .ok_or(StartError::Source(DiscoveryError::NoSource)),
        Discovery::Nodes(nodes)
        | Discovery::Sentinel {
            sentinels: nodes, ..
        } => nodes
            .first()
            .cloned()
            .ok_or(StartError::Source(DiscoveryError::NoSource)),
    }
}

/// One runner per backend that has mappings (none when capturing only); every problem of
/// every backend is reported together.
/// A shard's runners name their checkpoint rows `<backend>@<shard>`.
async fn start_runners(
    config: &Config,
    mappings: &Mappings,
    (store, outputs): (&Arc<Store>, &CaptureOutputs),
    shard: Option<&ShardSetup>,
    options: ServiceOptions,
) -> Result<Vec<SinkRunner<Sink>>, StartError> {
    let backends: Vec<_> = config
        .backends
        .iter()
        .filter(|(name, _)| !options.capture_only && mappings.iter().any(|m| &m.backend == *name))
        .collect();
    let positions = Arc::new(AppliedPositions::new(backends.len()));
    let mut runners = Vec::new();
    let mut problems = Vec::new();
    for (name, backend) in backends {
        let mine: Vec<_> = mappings
            .iter()
            .filter(|m| &m.backend == name)
            .cloned()
            .collect();
        let mut sinks = Vec::new();
        for _ in 0..backend.partitions.max(1) {
            match Sink::connect(name, &backend.url).await {
                Ok(sink) => sinks.push(sink),
                Err(e) => {
                    problems.push(e.into());
                    break;
                }
            }
        }
        if sinks.len() < backend.partitions.max(1) as usize {
            continue;
        }
        let links = RunnerLinks {
            store: store.clone(),
            committed: outputs.committed.clone(),
            positions: positions.clone(),
            health: outputs.health.clone(),
            writeback: outputs.writeback.clone(),
            peers: shard.map(|s| (s.id.clone(), s.peers.clone())),
        };
        let rows = match shard {
            Some(shard) => format!("{name}@{}", shard.id),
            None => name.to_string(),
        };
        match SinkRunner::start(&rows, sinks, mine, links).await {
            Ok(runner) => runners.push(runner),
            Err(mut p) => problems.append(&mut p),
        }
    }
    match problems.is_empty() {
        true => Ok(runners),
        false => Err(StartError::Backends(problems)),
    }
}

/// What the supervising task owns.
struct Tasks {
    capture: Capture,
    replicator: Replicator,
    /// Sink runners and the write-back task: one failing stops the service.
    tasks: JoinSet<Result<(), ServiceError>>,
    /// The admin listener and the poller.
    helpers: JoinSet<()>,
}

/// Runs capture until a stop is requested or something fails, then stops the rest in order.
async fn supervise(
    mut parts: Tasks,
    stopper: Stopper,
    stop: watch::Receiver<bool>,
) -> Result<CaptureStats, ServiceError> {
    let outcome = {
        let capture = parts
            .capture
            .run(&mut parts.replicator, stop_requested(stop.clone()));
        tokio::pin!(capture);
        tokio::select! {
            result = &mut capture => result.map_err(ServiceError::from),
            Some(result) = parts.tasks.join_next() => task_outcome(result),
            _ = stop_requested(stop.clone()) => {
                // Capture finishes the batch it is applying (a stop is seen between events).
                match tokio::time::timeout(CAPTURE_STOP_GRACE, &mut capture).await {
                    Ok(result) => result.map_err(ServiceError::from),
                    Err(_) => {
                        tracing::warn!("capture did not stop within {CAPTURE_STOP_GRACE:?}; what it had not committed comes again after a restart");
                        Ok(())
                    }
                }
            }
        }
    };
    // A final report of the durable offset; the sinks write everything committed; exit.
    stopper.health.begin_shutdown();
    let replicator = &parts.replicator;
    let finish = async {
        replicator.send_durable_offset().await;
        stopper.stop.send_replace(true);
        while let Some(result) = parts.tasks.join_next().await {
            if let Err(e) = task_outcome(result) {
                tracing::error!(error = %e, "a task failed while stopping");
            }
        }
        while parts.helpers.join_next().await.is_some() {}
    };
    if tokio::time::timeout(FINISH_GRACE, finish).await.is_err() {
        tracing::warn!("stopping took longer than {FINISH_GRACE:?}; exiting anyway (a restart resumes from the checkpoints)");
    }
    outcome.map(|()| parts.capture.stats().clone())
}

fn task_outcome(
    result: Result<Result<(), ServiceError>, tokio::task::JoinError>,
) -> Result<(), ServiceError> {
    result.map_err(|e| ServiceError::Task(e.to_string()))?
}

/// The primary's offset (for the lag), the buffer's size and the memory figures, every
/// [`POLL_EVERY`].
/// The primary's `master_repl_offset`, or why it cannot be read.
pub(crate) async fn primary_offset(primary: &RedisEndpoint) -> Result<u64, String> {
    let mut client = RedisClient::connect(primary, Duration::from_secs(2))
        .await
        .map_err(|e| e.to_string())?;
    let info = client
        .info("replication")
        .await
        .map_err(|e| e.to_string())?;
    info_field(&info, "master_repl_offset")
        .and_then(|o| o.parse().ok())
        .ok_or_else(|| "INFO replication has no master_repl_offset".to_string())
}

async fn poll_primary(health: Arc<Health>, store: Arc<Store>, stop: watch::Receiver<bool>) {
    let stopped = stop_requested(stop);
    tokio::pin!(stopped);
    loop {
        health.buffer_size(store.disk_size());
        health.memory(store.memory());
        // With the source's credentials: a protected primary refuses INFO otherwise.
        if let Some(primary) = health.primary() {
            match primary_offset(&primary).await {
                Ok(offset) => health.primary_offset(offset),
                Err(why) => health.primary_offset_unavailable(&why),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_EVERY) => {}
            _ = &mut stopped => return,
        }
    }
}
