//! Starting, following and retiring the shards' pipelines (see the module doc of `cluster`).
//!
//! Every [`super::TOPOLOGY_EVERY`] the cluster is read again:
//! - the nodes each running shard has now are remembered (and recorded on disk as soon as a
//!   shard's list grows, whoever learned them: the link's locator or this poll);
//! - a shard with an online primary that no running shard recognises gets a pipeline;
//! - a running shard is **retired** (its pipeline stopped, its members file renamed
//!   `<id>.retired`, its buffer left on disk) when, for [`RETIRE_AFTER`] reads in a row, either
//!   another shard that started before it follows the same nodes (an empty primary that became
//!   a replica: both would follow one primary), or no shard of the cluster holds any of its nodes
//!   and none of the nodes it had still serves a slot (asked directly, so that one node's partial
//!   view never retires a live shard), and its pipeline has applied everything it captured.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, watch};

use super::locator::{self, ShardLocator};
use super::peers::Peers;
use super::registry::{self, KnownShard};
use super::topology::Topology;
use super::{slot_state, stop_requested, ShardView, ShardViews, ASK_TIMEOUT, TOPOLOGY_EVERY};
use crate::capture::CaptureStats;
use crate::config::{Config, RedisEndpoint};
use crate::redis_client::RedisClient;
use crate::service::{
    Service, ServiceError, ServiceOptions, ShardSetup, StartError, Stopper, CAPTURE_STOP_GRACE,
    FINISH_GRACE,
};

/// Reads of the topology in a row before a shard that left is retired.
const RETIRE_AFTER: u32 = 3;

/// A shard's pipeline ended: its id and outcome.
pub(super) type Finished = (String, Result<CaptureStats, ServiceError>);

/// Starts, follows and retires the shards' services.
pub(super) struct Supervisor {
    config: Config,
    options: ServiceOptions,
    seeds: Vec<RedisEndpoint>,
    dir: PathBuf,
    peers: Arc<Peers>,
    shards: ShardViews,
    stoppers: HashMap<String, Stopper>,
    /// Members recorded on disk, by shard.
    saved: HashMap<String, usize>,
    /// Reads in a row each shard looked retired.
    gone: HashMap<String, u32>,
    /// Shards being retired: their pipelines' ends are expected.
    retiring: HashSet<String>,
    finished: mpsc::UnboundedSender<Finished>,
}

fn registry_error(dir: &std::path::Path, source: std::io::Error) -> StartError {
    StartError::Registry {
        path: dir.to_path_buf(),
        source,
    }
}

impl Supervisor {
    pub(super) fn new(
        config: Config,
        options: ServiceOptions,
        (seeds, dir): (Vec<RedisEndpoint>, PathBuf),
        finished: mpsc::UnboundedSender<Finished>,
    ) -> Supervisor {
        Supervisor {
            config,
            options,
            seeds,
            dir,
            peers: Arc::new(Peers::default()),
            shards: Arc::new(RwLock::new(Vec::new())),
            stoppers: HashMap::new(),
            saved: HashMap::new(),
            gone: HashMap::new(),
            retiring: HashSet::new(),
            finished,
        }
    }

    pub(super) fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    pub(super) fn views_handle(&self) -> ShardViews {
        self.shards.clone()
    }

    pub(super) fn seeds(&self) -> &[RedisEndpoint] {
        &self.seeds
    }

    /// Starts the pipeline of shard `id`.
    pub(super) async fn start_shard(
        &mut self,
        id: String,
        locator: Arc<ShardLocator>,
    ) -> Result<(), StartError> {
        let known = KnownShard {
            id: id.clone(),
            members: locator.members(),
        };
        registry::save(&self.dir, &known).map_err(|e| registry_error(&self.dir, e))?;
        self.saved.insert(id.clone(), known.members.len());
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
        self.stoppers.insert(id.clone(), service.stopper());
        let finished = self.finished.clone();
        tokio::spawn(async move {
            let outcome = service.wait().await;
            let _ = finished.send((id, outcome));
        });
        Ok(())
    }

    /// Reads the cluster's shards: remembers the nodes of known shards, retires those that
    /// left, starts new ones.
    pub(super) async fn follow_topology(&mut self) -> Result<(), StartError> {
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
        self.retire_departed(&topology).await?;
        for shard in &topology.shards {
            // Known: a running shard takes this entry for itself, or remembers its primary (a
            // primary of a shard switching over shows, for a moment, in an entry of its own).
            // Holding one of a shard's nodes is not enough: a replica may have moved here.
            let views = self.views();
            let known = views.iter().any(|v| {
                v.locator.find(&topology) == Some(shard)
                    || shard
                        .primary()
                        .is_some_and(|p| v.id == p.id || v.locator.members().contains(&p.id))
            });
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

    /// Takes in the nodes each known shard has now, and records its list when it grew.
    fn remember(&mut self, topology: &Topology) -> Result<(), StartError> {
        for view in self.views() {
            if let Some(shard) = view.locator.find(topology) {
                view.locator.remember(shard);
            }
            let members = view.locator.members();
            if self.saved.get(&view.id) != Some(&members.len()) {
                tracing::info!(shard = %view.id, ?members, "nodes of a shard");
                let known = KnownShard {
                    id: view.id.clone(),
                    members,
                };
                registry::save(&self.dir, &known).map_err(|e| registry_error(&self.dir, e))?;
                self.saved.insert(view.id.clone(), known.members.len());
            }
        }
        Ok(())
    }

    /// Retires the shards that left the cluster or merged into another (see the module doc).
    async fn retire_departed(&mut self, topology: &Topology) -> Result<(), StartError> {
        let views = self.views();
        for (index, view) in views.iter().enumerate() {
            let found = view.locator.find(topology);
            let shadowed = found.is_some_and(|shard| {
                views[..index]
                    .iter()
                    .any(|older| older.locator.find(topology) == Some(shard))
            });
            // Everything it captured applied (by seq: stream bytes that change no row, such as
            // the primary's pings, move the buffered offset but never the applied one).
            let drained = view.store.checkpoint().is_ok_and(|c| {
                let captured = c.next_seq.previous().unwrap_or_default();
                view.health
                    .slowest_applied_seq()
                    .is_none_or(|a| a >= captured)
            });
            let departed = drained && found.is_none() && !self.serves_slots(&view.locator).await;
            let count = self.gone.entry(view.id.clone()).or_default();
            *count = if (shadowed && drained) || departed {
                *count + 1
            } else {
                0
            };
            if *count >= RETIRE_AFTER {
                let why = if shadowed {
                    "another shard follows the same nodes"
                } else {
                    "it left the cluster"
                };
                self.retire(view, why)?;
            }
        }
        Ok(())
    }

    /// Whether a node the shard had still serves a slot (or cannot be asked: then it may).
    async fn serves_slots(&self, locator: &ShardLocator) -> bool {
        for node in locator.nodes() {
            let asked = async {
                let mut client = RedisClient::connect(&node, ASK_TIMEOUT)
                    .await
                    .map_err(|e| e.to_string())?;
                slot_state::read(&mut client).await
            };
            match tokio::time::timeout(ASK_TIMEOUT, asked).await {
                Ok(Ok(steady)) if steady.count() == 0 => {}
                // Refused (stopped): it serves nothing. Any other answer: it may.
                Ok(Err(e)) if e.contains("cannot connect") => {}
                _ => return true,
            }
        }
        false
    }

    /// Stops shard `view`'s pipeline for good (its buffer stays on disk).
    fn retire(&mut self, view: &ShardView, why: &str) -> Result<(), StartError> {
        tracing::warn!(shard = %view.id, why, "retiring a shard's pipeline; its buffer stays on disk");
        if let Some(stopper) = self.stoppers.remove(&view.id) {
            stopper.shutdown("the shard was retired");
        }
        self.retiring.insert(view.id.clone());
        self.gone.remove(&view.id);
        self.saved.remove(&view.id);
        self.peers.remove(&view.id);
        self.shards
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|v| v.id != view.id);
        registry::retire(&self.dir, &view.id).map_err(|e| registry_error(&self.dir, e))
    }

    fn views(&self) -> Vec<ShardView> {
        self.shards
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Follows the topology until a stop is requested or a shard fails; then stops every shard
    /// and waits for them.
    pub(super) async fn run(
        mut self,
        mut finishing: mpsc::UnboundedReceiver<Finished>,
        stop: watch::Receiver<bool>,
    ) -> Result<CaptureStats, ServiceError> {
        let stopped = stop_requested(stop);
        tokio::pin!(stopped);
        let mut outcome: Result<CaptureStats, ServiceError> = Ok(CaptureStats::default());
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                Some((id, result)) = finishing.recv() => {
                    let retired = self.retiring.remove(&id);
                    match result {
                        Ok(stats) if retired => {
                            if let Ok(total) = outcome.as_mut() {
                                total.absorb(&stats);
                            }
                            continue;
                        }
                        Ok(stats) => {
                            tracing::error!(shard = %id, ?stats, "a shard's pipeline stopped by itself; stopping every shard");
                            outcome = Err(ServiceError::Task(format!("shard {id}'s pipeline stopped")));
                        }
                        Err(e) => {
                            tracing::error!(shard = %id, error = %e, "a shard's pipeline failed; stopping every shard");
                            outcome = Err(e);
                        }
                    }
                    self.stoppers.remove(&id);
                    break;
                }
                _ = tokio::time::sleep(TOPOLOGY_EVERY) => {
                    if let Err(e) = self.follow_topology().await {
                        tracing::error!(error = %e, "cannot follow the cluster's shards; stopping every shard");
                        outcome = Err(ServiceError::Task(e.to_string()));
                        break;
                    }
                }
            }
        }
        for stopper in self.stoppers.values() {
            stopper.shutdown("the cluster service stops");
        }
        let mut running = self.stoppers.len() + self.retiring.len();
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
