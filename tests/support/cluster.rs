//! A local Redis Cluster for the tests: primaries and replicas started on ports whose bus port
//! (`port + 10000`) is free too, joined with `CLUSTER MEET`, given slots with
//! `CLUSTER ADDSLOTSRANGE` and replicas with `CLUSTER REPLICATE` (no `redis-cli` needed, so
//! every server of the matrix is formed the same way), and a client that sends each command to
//! the node serving its key's slot.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use redis_protocol::resp2::types::BytesFrame;
use writebehind::cluster::slot::slot_of;
use writebehind::cluster::topology::{self, Topology};
use writebehind::redis_client::{frame_text, info_field, RedisClient};

use super::RedisServer;

/// A port below 55536 whose bus port is free as well.
pub fn cluster_port() -> u16 {
    loop {
        let port = 20_000 + (rand::random::<u16>() % 25_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
}

/// Starts one cluster-enabled node (`--cluster-node-timeout 1000`: failovers in seconds), on
/// another port when the one picked was taken meanwhile. Its backlog (64 MiB) holds whatever a
/// test writes while the service is down or a failover runs: a full sync a test sees is then
/// the service's doing, not a backlog too small for a slow machine.
pub fn cluster_node() -> RedisServer {
    try_cluster_node(&[]).unwrap_or_else(|last| panic!("could not start a cluster node: {last}"))
}

/// [`cluster_node`] with `extra` options; the last error when five ports failed.
pub fn try_cluster_node(extra: &[&str]) -> Result<RedisServer, String> {
    let mut options = vec![
        "--cluster-enabled",
        "yes",
        "--cluster-node-timeout",
        "1000",
        "--repl-backlog-size",
        "64mb",
    ];
    options.extend(extra);
    let mut last = String::new();
    for _ in 0..5 {
        let port = cluster_port();
        // The bus port said (plain port + 10000, what `CLUSTER MEET` assumes), also with
        // `tls-cluster yes`, where it would otherwise follow the TLS port.
        let bus = (port + 10_000).to_string();
        let mut options = options.clone();
        options.extend(["--cluster-port", bus.as_str()]);
        match RedisServer::try_start_on_port(port, &options) {
            Ok(server) => return Ok(server),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A cluster node with a TLS port beside its plain one, and that port; `None` when the server
/// is built without TLS. `tls-cluster yes` (the bus over TLS, at `--cluster-port`: the plain
/// port + 10000 as for every test node) is what makes nodes tell each other's TLS ports; the
/// tests' own client stays on the plain ports.
pub fn tls_cluster_node(certs: &super::tls::TestCerts) -> Option<(RedisServer, u16)> {
    let file = |p: &std::path::PathBuf| p.display().to_string();
    // The bus always asks the connecting node for a certificate: one made for clients.
    let (client_cert, client_key) = (file(&certs.client_cert), file(&certs.client_key));
    let extra = [
        "--tls-client-cert-file",
        &client_cert,
        "--tls-client-key-file",
        &client_key,
        "--tls-cluster",
        "yes",
    ];
    super::tls::start_with_tls(
        certs,
        [&certs.server_cert, &certs.server_key],
        false,
        &extra,
        try_cluster_node,
    )
}

/// A running cluster; nodes are killed when it drops.
pub struct RedisCluster {
    /// Primaries first, then their replicas (replica `r` of primary `p` at
    /// `primaries + p * replicas + r`), then nodes added by tests.
    pub nodes: Vec<RedisServer>,
    pub primaries: usize,
}

async fn command(client: &mut RedisClient, args: &[&str]) -> BytesFrame {
    client
        .command(args)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

pub async fn node_id(server: &RedisServer) -> String {
    frame_text(&command(&mut server.client().await, &["CLUSTER", "MYID"]).await)
}

async fn until(what: &str, deadline_secs: u64, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(deadline_secs);
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {deadline_secs} s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl RedisCluster {
    /// `primaries` primaries sharing the slots evenly, each with `replicas` replicas.
    pub async fn start(primaries: usize, replicas: usize) -> RedisCluster {
        let total = primaries * (1 + replicas);
        let nodes: Vec<RedisServer> = (0..total).map(|_| cluster_node()).collect();
        RedisCluster::form(nodes, primaries, replicas).await
    }

    /// [`RedisCluster::start`] on nodes already running (`primaries * (1 + replicas)` of them,
    /// in the order of [`RedisCluster::nodes`]).
    pub async fn form(nodes: Vec<RedisServer>, primaries: usize, replicas: usize) -> RedisCluster {
        let total = nodes.len();
        assert_eq!(total, primaries * (1 + replicas), "nodes for the cluster");
        let per = 16_384 / primaries;
        for (index, node) in nodes.iter().take(primaries).enumerate() {
            let first = index * per;
            let last = if index + 1 == primaries {
                16_383
            } else {
                first + per - 1
            };
            let reply = command(
                &mut node.client().await,
                &[
                    "CLUSTER",
                    "ADDSLOTSRANGE",
                    &first.to_string(),
                    &last.to_string(),
                ],
            )
            .await;
            assert_eq!(frame_text(&reply), "OK", "ADDSLOTSRANGE");
        }
        let cluster = RedisCluster { nodes, primaries };
        for node in &cluster.nodes[1..] {
            cluster.meet(node).await;
        }
        cluster.until_known(total).await;
        for p in 0..primaries {
            let id = node_id(&cluster.nodes[p]).await;
            for r in 0..replicas {
                let replica = &cluster.nodes[primaries + p * replicas + r];
                cluster.replicate(replica, &id).await;
            }
        }
        cluster.until_stable(primaries, 1 + replicas).await;
        cluster
    }

    /// Introduces `node` to the cluster.
    pub async fn meet(&self, node: &RedisServer) {
        let reply = command(
            &mut self.nodes[0].client().await,
            &["CLUSTER", "MEET", "127.0.0.1", &node.port.to_string()],
        )
        .await;
        assert_eq!(frame_text(&reply), "OK", "CLUSTER MEET");
    }

    /// Until every node knows `count` nodes.
    pub async fn until_known(&self, count: usize) {
        until("every node knows every other", 30, async || {
            for node in &self.nodes {
                let info =
                    frame_text(&command(&mut node.client().await, &["CLUSTER", "INFO"]).await);
                if info_field(&info, "cluster_known_nodes") != Some(&count.to_string()) {
                    return false;
                }
            }
            true
        })
        .await;
    }

    /// Makes `replica` a replica of node `primary_id` (once gossip has told it of that node).
    pub async fn replicate(&self, replica: &RedisServer, primary_id: &str) {
        until("CLUSTER REPLICATE accepted", 30, async || {
            let mut client = replica.client().await;
            let reply = client.command(&["CLUSTER", "REPLICATE", primary_id]).await;
            matches!(reply, Ok(ref r) if frame_text(r) == "OK")
        })
        .await;
    }

    /// Until every node says the cluster is ok and node 0 sees `shards` shards of `size`
    /// online nodes each, with every replica's link up.
    pub async fn until_stable(&self, shards: usize, size: usize) {
        until("the cluster is formed", 60, async || {
            for node in &self.nodes {
                let Ok(mut client) =
                    RedisClient::connect(&node.endpoint(), Duration::from_secs(2)).await
                else {
                    continue;
                };
                let info = frame_text(&command(&mut client, &["CLUSTER", "INFO"]).await);
                if info_field(&info, "cluster_state") != Some("ok") {
                    return false;
                }
                let replication = client.info("replication").await.expect("info");
                if info_field(&replication, "role") == Some("slave")
                    && info_field(&replication, "master_link_status") != Some("up")
                {
                    return false;
                }
            }
            let topology = self.topology().await;
            topology.shards.len() == shards
                && topology
                    .shards
                    .iter()
                    .all(|s| s.nodes.len() == size && s.nodes.iter().all(|n| n.online))
        })
        .await;
    }

    /// The cluster as the first answering node describes it.
    pub async fn topology(&self) -> Topology {
        for node in &self.nodes {
            let Ok(mut client) =
                RedisClient::connect(&node.endpoint(), Duration::from_secs(2)).await
            else {
                continue;
            };
            if let Ok(topology) = topology::read(&mut client).await {
                return topology;
            }
        }
        panic!("no node of the cluster answers");
    }

    /// The port of the primary serving `slot` now.
    pub async fn primary_port(&self, slot: u16) -> u16 {
        self.topology()
            .await
            .owner(slot)
            .and_then(|s| s.primary())
            .map(|n| n.port)
            .expect("every slot served")
    }

    /// The `[source] cluster` seeds: every node's address.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("\"{}\"", n.url()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The node with this port.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .expect("a node of the cluster")
    }

    /// A client routing by slot.
    pub async fn client(&self) -> ClusterClient {
        ClusterClient {
            topology: self.topology().await,
            clients: HashMap::new(),
        }
    }
}

/// Sends each command to the primary serving its key's slot (the key is the second argument),
/// following `MOVED` by reading the topology again.
pub struct ClusterClient {
    pub topology: Topology,
    clients: HashMap<u16, RedisClient>,
}

impl ClusterClient {
    async fn node_client(&mut self, port: u16) -> &mut RedisClient {
        self.try_node_client(port)
            .await
            .unwrap_or_else(|| panic!("cannot connect to cluster node {port}"))
    }

    async fn try_node_client(&mut self, port: u16) -> Option<&mut RedisClient> {
        if let std::collections::hash_map::Entry::Vacant(entry) = self.clients.entry(port) {
            let endpoint = writebehind::config::RedisEndpoint::parse(&format!("127.0.0.1:{port}"))
                .expect("endpoint");
            let client = RedisClient::connect(&endpoint, Duration::from_secs(2))
                .await
                .ok()?;
            entry.insert(client);
        }
        self.clients.get_mut(&port)
    }

    /// The port of the primary serving `key`.
    pub fn port_of(&self, key: &str) -> u16 {
        self.try_port_of(key).expect("every slot served")
    }

    /// The port of the primary serving `key`, if one is online (not during a failover).
    pub fn try_port_of(&self, key: &str) -> Option<u16> {
        self.topology
            .owner(slot_of(key.as_bytes()))
            .and_then(|s| s.primary())
            .map(|n| n.port)
    }

    /// Re-reads the topology from any known node.
    pub async fn refresh(&mut self) {
        let ports: Vec<u16> = self
            .topology
            .shards
            .iter()
            .flat_map(|s| s.nodes.iter().map(|n| n.port))
            .collect();
        for port in ports {
            if let Some(client) = self.try_node_client(port).await {
                if let Ok(topology) = topology::read(client).await {
                    self.topology = topology;
                    return;
                }
            }
            self.clients.remove(&port);
        }
    }

    /// The ports of the online primaries, as last seen.
    fn primary_ports(&self) -> Vec<u16> {
        self.topology
            .shards
            .iter()
            .filter_map(|s| s.primary().map(|n| n.port))
            .collect()
    }

    /// Runs one command on the node serving its key (its second argument).
    pub async fn run(&mut self, args: &[&str]) -> BytesFrame {
        self.run_for(args[1], args).await
    }

    /// Runs one command on the node serving `key`.
    pub async fn run_for(&mut self, key: &str, args: &[&str]) -> BytesFrame {
        let deadline = Instant::now() + Duration::from_secs(60);
        // What the last attempt met, for the failure message.
        let mut last = String::from("nothing tried");
        // Where the last `MOVED` pointed (tried next, as cluster clients do).
        let mut moved_to: Option<u16> = None;
        while Instant::now() < deadline {
            let Some(port) = moved_to.take().or_else(|| self.try_port_of(key)) else {
                // A failover under way: no primary serves the slot yet.
                last = format!("no online primary serves slot {}", slot_of(key.as_bytes()));
                tokio::time::sleep(Duration::from_millis(100)).await;
                self.refresh().await;
                continue;
            };
            // Error replies as frames: a redirection is followed, any other is the answer.
            let reply = match self.try_node_client(port).await {
                Some(client) => client
                    .pipeline(&[args])
                    .await
                    .ok()
                    .and_then(|mut r| r.pop()),
                None => None,
            };
            match reply {
                Some(BytesFrame::Error(e)) if e.starts_with("ASK ") => {
                    // `ASK <slot> <host>:<port>`: this command once at that node, after ASKING.
                    let target: u16 = e
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok())
                        .expect("ASK names a port");
                    last = format!("{port} answered {e}");
                    if let Some(client) = self.try_node_client(target).await {
                        if let Ok(replies) = client.pipeline(&[&["ASKING"][..], args]).await {
                            match replies.last() {
                                Some(BytesFrame::Error(e)) if e.starts_with("TRYAGAIN") => {}
                                Some(reply) => return reply.clone(),
                                None => {}
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Some(BytesFrame::Error(e))
                    if e.starts_with("MOVED") || e.starts_with("CLUSTERDOWN") =>
                {
                    last = format!("{port} answered {e}");
                    // `MOVED <slot> <host>:<port>`
                    if e.starts_with("MOVED") {
                        moved_to = e.rsplit(':').next().and_then(|p| p.parse().ok());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    self.refresh().await;
                }
                Some(frame) => return frame,
                None => {
                    last = format!("{port} did not answer");
                    self.clients.remove(&port);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    self.refresh().await;
                }
            }
        }
        panic!(
            "{args:?}: no node took it within 60 s; last: {last}; topology: {:?}",
            self.topology
        );
    }

    /// Sends groups of commands (each group one key's slot: a single command or a whole
    /// `MULTI` ... `EXEC`), every node's share as one pipeline, in order per node.
    pub async fn send_groups(&mut self, groups: &[Vec<Vec<String>>]) {
        let mut by_node: BTreeMap<u16, Vec<&Vec<String>>> = BTreeMap::new();
        for group in groups {
            let key = group
                .iter()
                .find(|c| c.len() > 1)
                .map(|c| c[1].as_str())
                .expect("a command with a key");
            let port = self.port_of(key);
            by_node.entry(port).or_default().extend(group.iter());
        }
        for (port, commands) in by_node {
            for chunk in commands.chunks(500) {
                let refs: Vec<Vec<&str>> = chunk
                    .iter()
                    .map(|c| c.iter().map(String::as_str).collect())
                    .collect();
                let slices: Vec<&[&str]> = refs.iter().map(Vec::as_slice).collect();
                self.node_client(port)
                    .await
                    .pipeline(&slices)
                    .await
                    .expect("pipeline");
            }
        }
    }

    /// Moves `slots` from the primary on port `from` to the one on `to` as `redis-cli --cluster
    /// reshard` does: `SETSLOT IMPORTING` on the target, `MIGRATING` on the source, `MIGRATE`
    /// of the slot's keys ten at a time, then `SETSLOT NODE` on both. Returns the keys moved.
    pub async fn migrate_slots(&mut self, slots: std::ops::Range<u16>, from: u16, to: u16) -> u64 {
        let id = async |client: &mut ClusterClient, port: u16| {
            frame_text(&command(client.node_client(port).await, &["CLUSTER", "MYID"]).await)
        };
        let (from_id, to_id) = (id(self, from).await, id(self, to).await);
        let mut moved = 0;
        for slot in slots {
            let slot = slot.to_string();
            self.setslot(to, &[&slot, "IMPORTING", &from_id]).await;
            self.setslot(from, &[&slot, "MIGRATING", &to_id]).await;
            loop {
                let BytesFrame::Array(keys) = command(
                    self.node_client(from).await,
                    &["CLUSTER", "GETKEYSINSLOT", &slot, "10"],
                )
                .await
                else {
                    panic!("GETKEYSINSLOT reply");
                };
                if keys.is_empty() {
                    break;
                }
                let keys: Vec<String> = keys.iter().map(frame_text).collect();
                let port = to.to_string();
                let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
                args.extend(keys.iter().map(String::as_str));
                let reply = command(self.node_client(from).await, &args).await;
                assert!(
                    matches!(frame_text(&reply).as_str(), "OK" | "NOKEY"),
                    "MIGRATE: {reply:?}"
                );
                moved += keys.len() as u64;
            }
            self.setslot(to, &[&slot, "NODE", &to_id]).await;
            // The source's last slot gone, Redis 7 may have made it a replica of the target
            // already (`cluster-allow-replica-migration`): then it needs no SETSLOT.
            let source = self.node_client(from).await;
            match source
                .pipeline(&[&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id][..]])
                .await
            {
                Ok(replies) => match replies.first() {
                    Some(BytesFrame::Error(e)) if e.contains("only with masters") => {}
                    Some(reply) => assert_eq!(frame_text(reply), "OK", "NODE on the source"),
                    None => panic!("no reply to SETSLOT"),
                },
                Err(e) => panic!("SETSLOT on the source: {e}"),
            }
        }
        self.refresh().await;
        moved
    }

    /// `CLUSTER SETSLOT <args>` on the node on `port`, which must answer OK.
    async fn setslot(&mut self, port: u16, args: &[&str]) {
        let mut command_args = vec!["CLUSTER", "SETSLOT"];
        command_args.extend_from_slice(args);
        let reply = command(self.node_client(port).await, &command_args).await;
        assert_eq!(frame_text(&reply), "OK", "{command_args:?}");
    }

    /// Every hash whose key starts with `prefix` on every primary: key -> fields.
    pub async fn hashes(&mut self, prefix: &str) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut all = BTreeMap::new();
        for port in self.primary_ports() {
            let client = self.node_client(port).await;
            let mut cursor = "0".to_string();
            loop {
                let pattern = format!("{prefix}*");
                let reply = client
                    .command(&[
                        "SCAN", &cursor, "MATCH", &pattern, "COUNT", "1000", "TYPE", "hash",
                    ])
                    .await
                    .expect("scan");
                let BytesFrame::Array(parts) = reply else {
                    panic!("SCAN reply")
                };
                cursor = frame_text(&parts[0]);
                let BytesFrame::Array(keys) = &parts[1] else {
                    panic!("SCAN keys")
                };
                for key in keys.iter().map(frame_text) {
                    let BytesFrame::Array(items) =
                        client.command(&["HGETALL", &key]).await.expect("hgetall")
                    else {
                        panic!("HGETALL reply")
                    };
                    let fields: BTreeMap<String, String> = items
                        .chunks(2)
                        .map(|p| (frame_text(&p[0]), frame_text(&p[1])))
                        .collect();
                    if !fields.is_empty() {
                        all.insert(key, fields);
                    }
                }
                if cursor == "0" {
                    break;
                }
            }
        }
        all
    }

    /// Keys with a time to live on every primary (`INFO keyspace` expires).
    pub async fn volatile_keys(&mut self) -> u64 {
        let mut total = 0;
        for port in self.primary_ports() {
            let info = self
                .node_client(port)
                .await
                .info("keyspace")
                .await
                .expect("info");
            total += info_field(&info, "db0")
                .and_then(|v| v.split(',').find_map(|p| p.strip_prefix("expires=")))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
        total
    }
}
