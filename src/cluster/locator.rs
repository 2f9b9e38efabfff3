//! Finding the primary of one shard of a cluster, whichever node serves it now.
//!
//! A shard is known by the ids of the nodes seen in it (its primary and replicas, remembered as
//! they come). To find its primary, the nodes last seen and then the seeds are asked for the
//! cluster's shards (`topology.rs`) until one answers; the shard holding any remembered node is
//! this one, and its primary is the node the cluster names `master` and `online`. So a manual
//! failover, an automatic one, and a replica added and promoted after every node first seen
//! was replaced are all followed, as long as each step leaves one remembered node in the shard.

use std::sync::Mutex;
use std::time::Duration;

use super::topology::{self, endpoint_of, Shard, Topology};
use crate::config::RedisEndpoint;
use crate::redis_client::RedisClient;
use crate::replication::LinkError;

/// Where one shard's primary is.
#[derive(Debug)]
pub struct ShardLocator {
    /// The configured seeds, with the source's credentials and TLS.
    seeds: Vec<RedisEndpoint>,
    /// The shard's identity: every node id seen in it.
    members: Mutex<Vec<String>>,
    /// Node addresses of the shard as last seen (asked before the seeds).
    nodes: Mutex<Vec<RedisEndpoint>>,
}

impl ShardLocator {
    pub fn new(seeds: Vec<RedisEndpoint>, shard: &Shard) -> ShardLocator {
        let locator = ShardLocator {
            seeds,
            members: Mutex::new(Vec::new()),
            nodes: Mutex::new(Vec::new()),
        };
        locator.remember(shard);
        locator
    }

    /// A locator for a shard known only by the node ids remembered in its buffer.
    pub fn from_members(seeds: Vec<RedisEndpoint>, members: Vec<String>) -> ShardLocator {
        ShardLocator {
            seeds,
            members: Mutex::new(members),
            nodes: Mutex::new(Vec::new()),
        }
    }

    /// Every node id seen in the shard.
    pub fn members(&self) -> Vec<String> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether `shard` is this one (it holds a remembered node).
    pub fn is(&self, shard: &Shard) -> bool {
        let members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        members.iter().any(|id| shard.has_node(id))
    }

    /// This shard in `topology`, among the entries holding a remembered node: first one whose
    /// online primary is a remembered node (a replica that moved to another shard leaves that
    /// shard's entry holding a remembered node too, but not as its primary), then one with an
    /// online primary, then with slots, then holding more remembered nodes. (A primary that
    /// failed and was replaced stays listed as a primary of its own, without slots, until it
    /// comes back as a replica.) Two entries that rank alike: `None`, as neither can be told to
    /// be this shard.
    pub fn find<'t>(&self, topology: &'t Topology) -> Option<&'t Shard> {
        let members = self.members();
        let rank = |s: &Shard| {
            let primary = s.primary();
            (
                primary.is_some_and(|p| members.contains(&p.id)),
                primary.is_some(),
                s.slot_count() > 0,
                s.nodes.iter().filter(|n| members.contains(&n.id)).count(),
            )
        };
        let mut ranked: Vec<_> = topology
            .shards
            .iter()
            .filter(|s| self.is(s))
            .map(|s| (rank(s), s))
            .collect();
        ranked.sort_by_key(|(rank, _)| std::cmp::Reverse(*rank));
        match ranked.as_slice() {
            [] => None,
            [(best, shard), (second, _), ..] if best == second => {
                tracing::warn!(shard = ?shard.nodes.first().map(|n| &n.id), "two shards of the cluster hold nodes this shard had, alike: following neither until it is clear");
                None
            }
            [(_, shard), ..] => Some(shard),
        }
    }

    /// Takes in the nodes `shard` has now; returns whether a node id was new.
    pub fn remember(&self, shard: &Shard) -> bool {
        let template = self.seeds.first().cloned();
        if let Some(template) = &template {
            *self.nodes.lock().unwrap_or_else(|p| p.into_inner()) = shard
                .nodes
                .iter()
                .map(|n| endpoint_of(n, template))
                .collect();
        }
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let mut grew = false;
        for node in &shard.nodes {
            if !members.contains(&node.id) {
                members.push(node.id.clone());
                grew = true;
            }
        }
        grew
    }

    /// The shard's node addresses as last seen.
    pub fn nodes(&self) -> Vec<RedisEndpoint> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Where the link first looks (it follows whatever primary [`ShardLocator::primary`]
    /// finds): a node last seen in the shard, else a seed.
    pub fn first_guess(&self) -> Option<RedisEndpoint> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.first().or(self.seeds.first()).cloned()
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        let members = self.members();
        format!(
            "cluster shard of node {}",
            members.first().map(String::as_str).unwrap_or("?")
        )
    }

    /// The shard's primary now. `NotReady` when no node answers, the shard is gone, or it has
    /// no online primary (retried with backoff by the link).
    pub async fn primary(&self, timeout: Duration) -> Result<RedisEndpoint, LinkError> {
        let not_ready = |message: String| LinkError::NotReady {
            address: self.describe(),
            message,
        };
        let (topology, template) = self
            .ask_any(timeout)
            .await
            .map_err(|seen| not_ready(format!("no node describes the cluster ({seen})")))?;
        let Some(shard) = self.find(&topology) else {
            return Err(not_ready(
                "no shard of the cluster holds any node this shard had: it was removed".into(),
            ));
        };
        self.remember(shard);
        match shard.primary() {
            // Nodes learn each other's TLS ports only with `tls-cluster yes`: without it, the
            // plain port would be tried with TLS, and the handshake wait for its timeout.
            Some(primary) if template.tls.is_some() && primary.tls_port.is_none() => {
                Err(not_ready(format!(
                    "the cluster does not say at which TLS port its node {}:{} serves (the seeds are reached with TLS, and a cluster tells its nodes' TLS ports only with `tls-cluster yes`): set `tls-cluster yes` on every node, or use seeds without TLS",
                    primary.host, primary.port
                )))
            }
            Some(primary) => Ok(endpoint_of(primary, &template)),
            None => Err(not_ready(
                "the shard has no online primary (a failover in progress?)".into(),
            )),
        }
    }

    /// The topology as told by the first node that answers (the shard's last known nodes,
    /// then the seeds), with that node's endpoint as the template for the others.
    async fn ask_any(&self, timeout: Duration) -> Result<(Topology, RedisEndpoint), String> {
        let mut candidates = self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone();
        candidates.extend(self.seeds.iter().cloned());
        ask_first(&candidates, timeout).await
    }
}

/// The topology from the first of `candidates` that describes it.
pub async fn ask_first(
    candidates: &[RedisEndpoint],
    timeout: Duration,
) -> Result<(Topology, RedisEndpoint), String> {
    let mut seen = Vec::new();
    for node in candidates {
        let asked = async {
            let mut client = RedisClient::connect(node, timeout)
                .await
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(timeout, topology::read(&mut client))
                .await
                .map_err(|_| format!("{}: no answer within {timeout:?}", node.address()))?
                .map_err(|e| e.to_string())
        };
        match asked.await {
            Ok(topology) => return Ok((topology, node.clone())),
            Err(e) => seen.push(e),
        }
    }
    Err(seen.join("; "))
}
