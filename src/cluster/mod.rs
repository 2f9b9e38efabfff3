//! Redis Cluster: one replication session per shard (docs/design.md, "Redis Cluster").
//!
//! `[source] cluster = ["host:port", ...]` names seed nodes. [`ClusterService`] asks them for
//! the cluster's shards (`topology.rs`) and runs one [`Service`] per shard primary, each with
//! its own replication link, position (replication ID and offset), buffer
//! (`[buffer] path/shards/<id>/`), capture and sink runners, whose checkpoint rows are named
//! `<backend>@<id>` in the same database. So each shard's changes are applied in that shard's
//! order, exactly once, and resumed from that shard's checkpoint; the shards share nothing but
//! the tables (and the admin listener).
//!
//! - **Which shard is which** (`registry.rs`, `locator.rs`): a shard is known by the node ids
//!   seen in it, kept on disk, so that it is recognised after failovers and restarts; its link
//!   asks the cluster which node is the shard's primary now.
//! - **Topology**: every [`TOPOLOGY_EVERY`] the cluster is asked again; a shard with a primary
//!   that no running shard recognises (a node added as a primary, a replica of a new shard) gets
//!   a pipeline of its own, and the nodes seen in known shards are remembered.
//! - **Reconciliations** look in every shard's mirror before deleting a row (`peers.rs`).
//!
//! Redis defines no order between shards: a row is exact per key, and a `MULTI` is one shard's
//! (Redis refuses a transaction over several slots).

pub mod locator;
pub mod peers;
pub mod registry;
pub mod slot;
pub mod slot_state;
pub mod topology;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::buffer::Store;
use crate::capture::CaptureStats;
use crate::config::{Config, RedisEndpoint};
use crate::metrics::Health;
use crate::replication::discovery::Discovery;
use crate::service::{
    Service, ServiceError, ServiceOptions, ShardSetup, StartError, Stopper, CAPTURE_STOP_GRACE,
    FINISH_GRACE,
};
use locator::ShardLocator;
use peers::Peers;
use registry::KnownShard;
use topology::Topology;

/// How often the cluster's shards are read again.
pub const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);
/// How long a node may take to describe the cluster.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// One shard as the admin listener and the tests see it.
#[derive(Clone)]
pub struct ShardView {
    pub id: String,
    pub health: Arc<Health>,
    pub store: Arc<Store>,
    pub locator: Arc<ShardLocator>,
    /// Where the admin listener's dead-letter retries go (the shard's capture).
    pub requeue: Option<tokio::sync::mpsc::Sender<crate::capture::requeue::RequeueRequest>>,
}

impl ShardView {
    /// What the admin listener serves of this shard.
    pub fn admin(&self) -> crate::admin::PipelineAdmin {
        crate::admin::PipelineAdmin {
            health: self.health.clone(),
            store: self.store.clone(),
            requeue: self.requeue.clone(),
        }
    }
}

/// The shards running now, in the order they started.
pub type ShardViews = Arc<RwLock<Vec<ShardView>>>;

/// A running cluster service: a [`Service`] per shard, and the task that follows the topology.
pub struct ClusterService {
    stopper: Stopper,
    shards: ShardViews,
    supervisor: tokio::task::JoinHandle<Result<CaptureStats, ServiceError>>,
}

impl ClusterService {
    /// Starts a pipeline for every shard remembered in the buffer and every shard the seeds
    /// name. A seed that does not answer is not an error: shards are started as they are found.
    pub async fn start(
        config: &Config,
        options: ServiceOptions,
    ) -> Result<ClusterService, StartError> {
        let seeds = Discovery::cluster_seeds(&config.source)?;
        let dir = registry::shards_dir(&config.buffer.path);
        let known = registry::load(&dir).map_err(|e| StartError::Registry {
            path: dir.clone(),
            source: e,
        })?;
        let (finished, finishing) = mpsc::unbounded_channel();
        let mut supervisor = Supervisor {
            config: config.clone(),
            options,
            seeds,
            dir,
            peers: Arc::new(Peers::default()),
            shards: Arc::new(RwLock::new(Vec::new())),
            stoppers: Vec::new(),
            finished,
        };
        for shard in known {
            let locator = ShardLocator::from_members(supervisor.seeds.clone(), shard.members);
            supervisor.start_shard(shard.id, Arc::new(locator)).await?;
        }
        supervisor.follow_topology().await?;
        let (stop, stop_rx) = watch::channel(false);
        let stopper = Stopper::new(Arc::new(stop), Health::new());
        let shards = supervisor.shards.clone();
        if let Some(listen) = config.admin.address() {
            let listen = listen.parse().map_err(|source| StartError::AdminAddress {
                listen: listen.to_string(),
                source,
            })?;
            let admin = crate::admin::Admin::for_cluster(
                crate::metrics::install()?,
                shards.clone(),
                config.admin.token.clone(),
            );
            let stopped = stop_requested(stop_rx.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::admin::serve(listen, admin, stopped).await {
                    tracing::error!(error = %e, "admin listener stopped; the pipelines run on without /metrics and /status");
                }
            });
        }
        let supervisor = tokio::spawn(supervisor.run(finishing, stop_rx));
        Ok(ClusterService {
            stopper,
            shards,
            supervisor,
        })
    }

    /// The shards running now.
    pub fn shards(&self) -> Vec<ShardView> {
        self.shards
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A handle that requests a graceful stop of every shard from anywhere.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Begins a graceful stop.
    pub fn shutdown(&self) {
        self.stopper.shutdown("shutdown requested");
    }

    /// Waits until every shard has stopped: the counters of all shards after a graceful stop,
    /// the first failure otherwise.
    pub async fn wait(self) -> Result<CaptureStats, ServiceError> {
        self.supervisor
            .await
            .map_err(|e| ServiceError::Task(format!("the cluster supervisor failed: {e}")))?
    }
}

async fn stop_requested(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// A shard's pipeline ended: its id and outcome.
type Finished = (String, Result<CaptureStats, ServiceError>);

/// Starts and stops the shards' services.
struct Supervisor {
    config: Config,
    options: ServiceOptions,
    seeds: Vec<RedisEndpoint>,
    dir: PathBuf,
    peers: Arc<Peers>,
    shards: ShardViews,
    stoppers: Vec<Stopper>,
    finished: mpsc::UnboundedSender<Finished>,
}

impl Supervisor {
    /// Starts the pipeline of shard `id`.
    async fn start_shard(
        &mut self,
        id: String,
        locator: Arc<ShardLocator>,
    ) -> Result<(), StartError> {
        let known = KnownShard {
            id: id.clone(),
            members: locator.members(),
        };
        registry::save(&self.dir, &known).map_err(|e| StartError::Registry {
            path: self.dir.clone(),
            source: e,
        })?;
        let setup = ShardSetup {
            id: id.clone(),
            locator: locator.clone(),
            peers: self.peers.clone(),
        };
        tracing::info!(shard = %id, members = ?known.members, "following a shard of the cluster");
        let service = Service::start_shard(&self.config, self.options, Some(setup)).await?;
        self.shards
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(ShardView {
                id: id.clone(),
                health: service.health().clone(),
                store: service.store().clone(),
                locator,
                requeue: service.requeue(),
            });
        self.stoppers.push(service.stopper());
        let finished = self.finished.clone();
        tokio::spawn(async move {
            let outcome = service.wait().await;
            let _ = finished.send((id, outcome));
        });
        Ok(())
    }

    /// Reads the cluster's shards: remembers the nodes of known shards, starts new ones.
    async fn follow_topology(&mut self) -> Result<(), StartError> {
        let candidates: Vec<RedisEndpoint> = self
            .views()
            .iter()
            .filter_map(|v| v.health.primary())
            .chain(self.seeds.iter().cloned())
            .collect();
        let topology = match locator::ask_first(&candidates, ASK_TIMEOUT).await {
            Ok((topology, _)) => topology,
            Err(seen) => {
                tracing::warn!(%seen, "no node of the cluster answers; its shards are looked for again");
                return Ok(());
            }
        };
        self.remember(&topology)?;
        for shard in &topology.shards {
            let known = self.views().iter().any(|v| v.locator.is(shard));
            let Some(primary) = shard.primary().filter(|_| !known) else {
                continue;
            };
            if !registry::is_valid_id(&primary.id) {
                tracing::warn!(id = %primary.id, "a cluster node id that cannot name a shard; ignored");
                continue;
            }
            let locator = ShardLocator::new(self.seeds.clone(), shard);
            self.start_shard(primary.id.clone(), Arc::new(locator))
                .await?;
        }
        Ok(())
    }

    /// Takes in the nodes each known shard has now, and records any new one on disk.
    fn remember(&self, topology: &Topology) -> Result<(), StartError> {
        for view in self.views() {
            let Some(shard) = view.locator.find(topology) else {
                continue;
            };
            let before = view.locator.members().len();
            view.locator.remember(shard);
            let members = view.locator.members();
            if members.len() != before {
                tracing::info!(shard = %view.id, ?members, "new nodes in a shard");
                let known = KnownShard {
                    id: view.id.clone(),
                    members,
                };
                registry::save(&self.dir, &known).map_err(|e| StartError::Registry {
                    path: self.dir.clone(),
                    source: e,
                })?;
            }
        }
        Ok(())
    }

    fn views(&self) -> Vec<ShardView> {
        self.shards
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Follows the topology until a stop is requested or a shard fails; then stops every shard
    /// and waits for them.
    async fn run(
        mut self,
        mut finishing: mpsc::UnboundedReceiver<Finished>,
        stop: watch::Receiver<bool>,
    ) -> Result<CaptureStats, ServiceError> {
        let stopped = stop_requested(stop);
        tokio::pin!(stopped);
        let mut outcome: Result<CaptureStats, ServiceError> = Ok(CaptureStats::default());
        let mut running = self.stoppers.len();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                Some((id, result)) = finishing.recv() => {
                    running -= 1;
                    match result {
                        Ok(stats) => tracing::warn!(shard = %id, ?stats, "a shard's pipeline stopped by itself"),
                        Err(e) => {
                            tracing::error!(shard = %id, error = %e, "a shard's pipeline failed; stopping every shard");
                            outcome = Err(e);
                        }
                    }
                    break;
                }
                _ = tokio::time::sleep(TOPOLOGY_EVERY) => {
                    let before = self.stoppers.len();
                    if let Err(e) = self.follow_topology().await {
                        tracing::error!(error = %e, "cannot start a new shard's pipeline; stopping every shard");
                        outcome = Err(ServiceError::Task(e.to_string()));
                        break;
                    }
                    running += self.stoppers.len() - before;
                }
            }
        }
        for stopper in &self.stoppers {
            stopper.shutdown("the cluster service stops");
        }
        let all = async {
            while running > 0 {
                let Some((id, result)) = finishing.recv().await else {
                    break;
                };
                running -= 1;
                match result {
                    Ok(stats) => {
                        if let Ok(total) = outcome.as_mut() {
                            total.absorb(&stats);
                        }
                    }
                    Err(e) => {
                        tracing::error!(shard = %id, error = %e, "a shard's pipeline failed while stopping");
                        if outcome.is_ok() {
                            outcome = Err(e);
                        }
                    }
                }
            }
        };
        if tokio::time::timeout(CAPTURE_STOP_GRACE + FINISH_GRACE, all)
            .await
            .is_err()
        {
            tracing::warn!("some shards did not stop in time; exiting anyway (a restart resumes from the checkpoints)");
        }
        outcome
    }
}
