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
//! - **Topology** (`supervisor.rs`): every [`TOPOLOGY_EVERY`] the cluster is asked again; a
//!   shard with a primary that no running shard recognises (a node added as a primary) gets a
//!   pipeline of its own, the nodes seen in known shards are remembered, and a shard that left
//!   the cluster (or became part of another: an empty primary made a replica) is retired.
//! - **Reconciliations** look in every shard's mirror before deleting a row (`peers.rs`).
//!
//! Redis defines no order between shards: a row is exact per key, and a `MULTI` is one shard's
//! (Redis refuses a transaction over several slots).

pub mod locator;
pub mod peers;
pub mod registry;
pub mod slot;
pub mod slot_state;
mod supervisor;
pub mod topology;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::buffer::Store;
use crate::capture::CaptureStats;
use crate::config::Config;
use crate::metrics::Health;
use crate::replication::discovery::Discovery;
use crate::service::{ServiceError, ServiceOptions, StartError, Stopper};
use locator::ShardLocator;
use supervisor::Supervisor;

/// How often the cluster's shards are read again.
pub const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);
/// How long a node may take to describe the cluster.
pub(crate) const ASK_TIMEOUT: Duration = Duration::from_secs(2);

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
        // The recorder before any shard starts: what a shard reports before it would be lost.
        let metrics = match config.admin.address() {
            Some(_) => Some(crate::metrics::install()?),
            None => None,
        };
        let known = registry::load(&dir).map_err(|e| StartError::Registry {
            path: dir.clone(),
            source: e,
        })?;
        let (finished, finishing) = mpsc::unbounded_channel();
        let mut supervisor = Supervisor::new(config.clone(), options, (seeds, dir), finished);
        for shard in known {
            let locator = ShardLocator::from_members(supervisor.seeds().to_vec(), shard.members);
            supervisor.start_shard(shard.id, Arc::new(locator)).await?;
        }
        supervisor.follow_topology().await?;
        supervisor.peers().set_started();
        let (stop, stop_rx) = watch::channel(false);
        let stopper = Stopper::new(Arc::new(stop), Health::new());
        let shards = supervisor.views_handle();
        if let (Some(listen), Some(handle)) = (config.admin.address(), metrics) {
            let listen = listen.parse().map_err(|source| StartError::AdminAddress {
                listen: listen.to_string(),
                source,
            })?;
            let admin = crate::admin::Admin::for_cluster(
                handle,
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
