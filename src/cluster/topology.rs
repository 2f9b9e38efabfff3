//! A cluster's shards as its nodes describe them: `CLUSTER SHARDS` (Redis 7.0 and later,
//! Valkey), or `CLUSTER SLOTS` where that is unknown.
//!
//! `CLUSTER SHARDS` answers one entry per shard, each a flat map: `slots` (pairs of first and
//! last slot) and `nodes`, each node itself a flat map with at least `id`, `port`, `ip`,
//! `endpoint`, `role` (`master` or `replica`), `replication-offset` and `health` (`online`,
//! `fail` or `loading`). A primary with no slots is listed too. `CLUSTER SLOTS` answers one
//! entry per slot range: first slot, last slot, then the primary and its replicas as `[ip,
//! port, id, ...]`; primaries without slots are missing and health is not given (every node
//! listed is taken as online). Replies are from the network: every field is checked and a
//! malformed reply is an error naming what was seen, never a panic.
//!
//! Both are asked, in one round trip, and a shard's slots are taken from `CLUSTER SLOTS` (the
//! slot table itself): `CLUSTER SHARDS` shows the slots of its entry's first node's primary, and
//! after an automatic failover, while the failed primary is still known, Redis 7.2 and later
//! may list it first in its shard's entry, a primary without slots, so the shard shows none
//! (redis/redis#13414; seen here on 7.4.1: the failover test's clients found no primary for a
//! third of the slots).

use redis_protocol::resp2::types::BytesFrame;

use super::slot::SLOTS;
use crate::config::RedisEndpoint;
use crate::redis_client::{frame_text, ClientError, RedisClient};

/// One node of a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The cluster's 40-character node id.
    pub id: String,
    pub host: String,
    /// The plain-text port (0 when the node serves TLS only).
    pub port: u16,
    /// The TLS port, when `CLUSTER SHARDS` gives one.
    pub tls_port: Option<u16>,
    pub primary: bool,
    /// Reachable as far as the cluster knows (`health` is `online`).
    pub online: bool,
    pub replication_offset: u64,
}

/// A primary, its replicas and the slots it serves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Shard {
    /// Inclusive ranges.
    pub slots: Vec<(u16, u16)>,
    pub nodes: Vec<Node>,
}

impl Shard {
    /// The node serving the shard's writes, when the cluster names one that is online.
    pub fn primary(&self) -> Option<&Node> {
        self.nodes.iter().find(|n| n.primary && n.online)
    }

    pub fn owns(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|&(first, last)| first <= slot && slot <= last)
    }

    pub fn slot_count(&self) -> u32 {
        self.slots
            .iter()
            .map(|&(first, last)| u32::from(last - first) + 1)
            .sum()
    }

    /// Whether `id` is one of this shard's nodes.
    pub fn has_node(&self, id: &str) -> bool {
        self.nodes.iter().any(|n| n.id == id)
    }
}

/// Every shard of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topology {
    pub shards: Vec<Shard>,
}

impl Topology {
    /// The shard serving `slot`.
    pub fn owner(&self, slot: u16) -> Option<&Shard> {
        self.shards.iter().find(|s| s.owns(slot))
    }

    /// The shard one of whose nodes is one of `ids`.
    pub fn shard_with_any(&self, ids: &[String]) -> Option<&Shard> {
        self.shards
            .iter()
            .find(|s| ids.iter().any(|id| s.has_node(id)))
    }

    /// These shards with the slots `table` (a parsed `CLUSTER SLOTS`) gives their nodes: each
    /// range goes to the shard holding the node that serves it.
    pub fn with_slots_of(mut self, table: &Topology) -> Topology {
        for shard in &mut self.shards {
            shard.slots = table
                .shards
                .iter()
                .filter(|t| t.nodes.first().is_some_and(|p| shard.has_node(&p.id)))
                .flat_map(|t| t.slots.iter().copied())
                .collect();
            shard.slots.sort_unstable();
        }
        self
    }

    /// Slots no shard serves.
    pub fn unserved_slots(&self) -> u32 {
        u32::from(SLOTS).saturating_sub(self.shards.iter().map(Shard::slot_count).sum::<u32>())
    }
}

/// Why a node's description of the cluster cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{address}: {message}")]
    Reply { address: String, message: String },
}

/// Asks `node` for the cluster's shards: `CLUSTER SHARDS` with the slots of `CLUSTER SLOTS`
/// (see the module doc), or `CLUSTER SLOTS` alone where `CLUSTER SHARDS` is unknown.
pub async fn read(client: &mut RedisClient) -> Result<Topology, TopologyError> {
    let address = client.address().to_string();
    let reply = |message: String| TopologyError::Reply {
        address: address.clone(),
        message,
    };
    let mut replies = client
        .pipeline(&[&["CLUSTER", "SHARDS"][..], &["CLUSTER", "SLOTS"][..]])
        .await?
        .into_iter();
    let (shards, slots) = (replies.next(), replies.next());
    let slot_table = match slots {
        Some(BytesFrame::Error(e)) => Err(reply(format!("CLUSTER SLOTS: {e}"))),
        Some(frame) => parse_slots(&frame).map_err(reply),
        None => Err(reply("no reply to CLUSTER SLOTS".into())),
    };
    match shards {
        Some(BytesFrame::Error(e)) if e.to_ascii_lowercase().contains("unknown subcommand") => {
            slot_table
        }
        Some(BytesFrame::Error(e)) => Err(reply(format!("CLUSTER SHARDS: {e}"))),
        Some(frame) => {
            let shards = parse_shards(&frame).map_err(reply)?;
            // Without a slot table, the slots `CLUSTER SHARDS` gave (right but for the case
            // above).
            Ok(match slot_table {
                Ok(table) => shards.with_slots_of(&table),
                Err(_) => shards,
            })
        }
        None => Err(reply("no reply to CLUSTER SHARDS".into())),
    }
}

fn items(frame: &BytesFrame, what: &str) -> Result<Vec<BytesFrame>, String> {
    match frame {
        BytesFrame::Array(items) => Ok(items.clone()),
        other => Err(format!("{what}: expected an array, got {other:?}")),
    }
}

fn integer(frame: &BytesFrame, what: &str) -> Result<i64, String> {
    match frame {
        BytesFrame::Integer(i) => Ok(*i),
        other => frame_text(other)
            .parse()
            .map_err(|_| format!("{what}: expected an integer, got {other:?}")),
    }
}

fn slot(frame: &BytesFrame) -> Result<u16, String> {
    let value = integer(frame, "slot")?;
    u16::try_from(value)
        .ok()
        .filter(|&s| s < SLOTS)
        .ok_or_else(|| format!("slot {value} is out of range"))
}

fn port(value: i64) -> Result<u16, String> {
    u16::try_from(value).map_err(|_| format!("port {value} is out of range"))
}

/// Pairs of a flat map (`[name, value, name, value, ...]`).
fn pairs(frame: &BytesFrame, what: &str) -> Result<Vec<(String, BytesFrame)>, String> {
    let items = items(frame, what)?;
    if items.len() % 2 != 0 {
        return Err(format!("{what}: a map of {} items", items.len()));
    }
    Ok(items
        .chunks(2)
        .map(|pair| (frame_text(&pair[0]), pair[1].clone()))
        .collect())
}

/// Parses a `CLUSTER SHARDS` reply.
pub fn parse_shards(frame: &BytesFrame) -> Result<Topology, String> {
    let mut shards = Vec::new();
    for entry in items(frame, "CLUSTER SHARDS")? {
        let mut shard = Shard::default();
        for (name, value) in pairs(&entry, "a shard")? {
            match name.as_str() {
                "slots" => {
                    let bounds = items(&value, "slots")?;
                    if bounds.len() % 2 != 0 {
                        return Err(format!("slots: {} bounds", bounds.len()));
                    }
                    for pair in bounds.chunks(2) {
                        let (first, last) = (slot(&pair[0])?, slot(&pair[1])?);
                        if first > last {
                            return Err(format!("slots: range {first}-{last}"));
                        }
                        shard.slots.push((first, last));
                    }
                }
                "nodes" => {
                    for node in items(&value, "nodes")? {
                        shard.nodes.push(parse_shard_node(&node)?);
                    }
                }
                _ => {}
            }
        }
        shards.push(shard);
    }
    Ok(Topology { shards })
}

fn parse_shard_node(frame: &BytesFrame) -> Result<Node, String> {
    let (mut id, mut ip, mut endpoint, mut port_number) = (None, None, None, None);
    let mut node = Node {
        id: String::new(),
        host: String::new(),
        port: 0,
        tls_port: None,
        primary: false,
        online: false,
        replication_offset: 0,
    };
    for (name, value) in pairs(frame, "a node")? {
        match name.as_str() {
            "id" => id = Some(frame_text(&value)),
            "ip" => ip = Some(frame_text(&value)),
            "endpoint" => endpoint = Some(frame_text(&value)),
            "port" => port_number = Some(port(integer(&value, "port")?)?),
            "tls-port" => node.tls_port = Some(port(integer(&value, "tls-port")?)?),
            "role" => node.primary = frame_text(&value) == "master",
            "health" => node.online = frame_text(&value) == "online",
            "replication-offset" => {
                node.replication_offset = integer(&value, "replication-offset")?.max(0) as u64
            }
            _ => {}
        }
    }
    node.id = id.filter(|i| !i.is_empty()).ok_or("a node without an id")?;
    node.port = match (port_number, node.tls_port) {
        (Some(port), _) => port,
        (None, Some(_)) => 0,
        (None, None) => return Err(format!("node {} without a port", node.id)),
    };
    // `endpoint` is what clients are told to use (`?` when unknown); `ip` otherwise.
    node.host = endpoint
        .filter(|e| !e.is_empty() && e != "?")
        .or(ip)
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("node {} without an address", node.id))?;
    Ok(node)
}

/// Parses a `CLUSTER SLOTS` reply (shards grouped by their primary's id).
pub fn parse_slots(frame: &BytesFrame) -> Result<Topology, String> {
    let mut topology = Topology::default();
    for entry in items(frame, "CLUSTER SLOTS")? {
        let fields = items(&entry, "a slot range")?;
        if fields.len() < 3 {
            return Err(format!("a slot range of {} items", fields.len()));
        }
        let (first, last) = (slot(&fields[0])?, slot(&fields[1])?);
        let mut nodes = Vec::new();
        for (index, node) in fields[2..].iter().enumerate() {
            let parts = items(node, "a node")?;
            if parts.len() < 3 {
                return Err(format!("a node of {} items", parts.len()));
            }
            nodes.push(Node {
                host: frame_text(&parts[0]),
                port: port(integer(&parts[1], "port")?)?,
                id: frame_text(&parts[2]),
                tls_port: None,
                primary: index == 0,
                online: true,
                replication_offset: 0,
            });
        }
        let primary = nodes[0].id.clone();
        match topology
            .shards
            .iter_mut()
            .find(|s| s.nodes.first().is_some_and(|n| n.id == primary))
        {
            Some(shard) => shard.slots.push((first, last)),
            None => topology.shards.push(Shard {
                slots: vec![(first, last)],
                nodes,
            }),
        }
    }
    Ok(topology)
}

/// The endpoint of `node`, with the credentials and TLS of `template` (a seed): its TLS port
/// when the seeds are reached with TLS and the node names one.
pub fn endpoint_of(node: &Node, template: &RedisEndpoint) -> RedisEndpoint {
    let port = match (&template.tls, node.tls_port) {
        (Some(_), Some(tls_port)) => tls_port,
        _ => node.port,
    };
    RedisEndpoint {
        host: node.host.clone(),
        port,
        ..template.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn bulk(s: &str) -> BytesFrame {
        BytesFrame::BulkString(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn array(items: Vec<BytesFrame>) -> BytesFrame {
        BytesFrame::Array(items)
    }

    fn node(id: &str, port: i64, role: &str, health: &str) -> BytesFrame {
        array(vec![
            bulk("id"),
            bulk(id),
            bulk("port"),
            BytesFrame::Integer(port),
            bulk("ip"),
            bulk("127.0.0.1"),
            bulk("endpoint"),
            bulk("127.0.0.1"),
            bulk("role"),
            bulk(role),
            bulk("replication-offset"),
            BytesFrame::Integer(72156),
            bulk("health"),
            bulk(health),
        ])
    }

    /// One `CLUSTER SHARDS` entry: its slot ranges and nodes.
    fn shard(ranges: &[(i64, i64)], nodes: Vec<BytesFrame>) -> BytesFrame {
        let slots = ranges
            .iter()
            .flat_map(|&(first, last)| [BytesFrame::Integer(first), BytesFrame::Integer(last)])
            .collect();
        array(vec![
            bulk("slots"),
            array(slots),
            bulk("nodes"),
            array(nodes),
        ])
    }

    #[test]
    fn cluster_shards_gives_slots_primaries_and_health() {
        let reply = array(vec![
            shard(
                &[(0, 5460)],
                vec![
                    node("a1", 30001, "master", "online"),
                    node("a2", 30004, "replica", "online"),
                ],
            ),
            shard(&[], vec![node("b1", 30002, "master", "fail")]),
        ]);
        let topology = parse_shards(&reply).unwrap();
        assert_eq!(topology.shards.len(), 2);
        let first = &topology.shards[0];
        assert_eq!(first.slots, vec![(0, 5460)]);
        assert_eq!(first.primary().map(|n| n.port), Some(30001));
        assert!(first.owns(5460) && !first.owns(5461));
        assert_eq!(first.slot_count(), 5461);
        assert_eq!(
            topology.shards[1].primary(),
            None,
            "a failed primary is not offered"
        );
        assert_eq!(
            topology.owner(100).map(|s| s.nodes[0].id.as_str()),
            Some("a1")
        );
        assert_eq!(topology.unserved_slots(), 16384 - 5461);
        assert_eq!(
            topology.shard_with_any(&["zz".into(), "a2".into()]),
            Some(first)
        );
    }

    #[test]
    fn a_tls_port_is_used_when_the_seeds_are_reached_with_tls() {
        let node = array(vec![
            bulk("id"),
            bulk("t1"),
            bulk("tls-port"),
            BytesFrame::Integer(7443),
            bulk("ip"),
            bulk("10.0.0.1"),
            bulk("role"),
            bulk("master"),
            bulk("health"),
            bulk("online"),
        ]);
        let reply = array(vec![array(vec![bulk("nodes"), array(vec![node])])]);
        let parsed = parse_shards(&reply).unwrap();
        let node = &parsed.shards[0].nodes[0];
        assert_eq!((node.port, node.tls_port), (0, Some(7443)));
        let plain = RedisEndpoint::parse("redis://seed:1").unwrap();
        assert_eq!(endpoint_of(node, &plain).port, 0);
        let mut secure = plain.clone();
        secure.tls = Some(crate::tls::RedisTls::public().unwrap());
        assert_eq!(endpoint_of(node, &secure).port, 7443);
        assert_eq!(endpoint_of(node, &secure).host, "10.0.0.1");
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let cases = [
            bulk("no"),
            array(vec![bulk("slots")]),
            array(vec![array(vec![
                bulk("slots"),
                array(vec![BytesFrame::Integer(9), BytesFrame::Integer(3)]),
            ])]),
            array(vec![array(vec![
                bulk("slots"),
                array(vec![BytesFrame::Integer(0), BytesFrame::Integer(16384)]),
            ])]),
            array(vec![array(vec![
                bulk("nodes"),
                array(vec![array(vec![bulk("id"), bulk("x")])]),
            ])]),
            array(vec![array(vec![
                bulk("nodes"),
                array(vec![array(vec![
                    bulk("id"),
                    bulk("x"),
                    bulk("port"),
                    BytesFrame::Integer(70000),
                ])]),
            ])]),
        ];
        for case in cases {
            assert!(parse_shards(&case).is_err(), "{case:?}");
        }
        assert!(parse_slots(&array(vec![array(vec![BytesFrame::Integer(0)])])).is_err());
        assert!(parse_slots(&array(vec![array(vec![
            BytesFrame::Integer(0),
            BytesFrame::Integer(1),
            array(vec![bulk("h")]),
        ])]))
        .is_err());
    }

    #[test]
    fn slots_come_from_the_slot_table_when_a_failed_primary_hides_them() {
        // Redis 7.4.1 after an automatic failover: the failed primary first, the shard's slots
        // missing; the slot table gives them to the promoted replica.
        let shards = array(vec![
            shard(
                &[],
                vec![
                    node("old", 30002, "master", "fail"),
                    node("new", 30005, "master", "online"),
                ],
            ),
            shard(&[(0, 99)], vec![node("a1", 30001, "master", "online")]),
        ]);
        let slots_node = |port: i64, id: &str| {
            array(vec![bulk("127.0.0.1"), BytesFrame::Integer(port), bulk(id)])
        };
        let table = array(vec![
            array(vec![
                BytesFrame::Integer(0),
                BytesFrame::Integer(99),
                slots_node(30001, "a1"),
            ]),
            array(vec![
                BytesFrame::Integer(200),
                BytesFrame::Integer(16383),
                slots_node(30005, "new"),
            ]),
            array(vec![
                BytesFrame::Integer(100),
                BytesFrame::Integer(199),
                slots_node(30005, "new"),
            ]),
        ]);
        let shards = parse_shards(&shards).unwrap();
        assert_eq!(shards.owner(5000), None, "as CLUSTER SHARDS tells it");
        let merged = shards.with_slots_of(&parse_slots(&table).unwrap());
        assert_eq!(merged.shards[0].slots, vec![(100, 199), (200, 16383)]);
        assert_eq!(merged.shards[1].slots, vec![(0, 99)]);
        assert_eq!(
            merged.owner(5000).and_then(Shard::primary).map(|n| n.port),
            Some(30005)
        );
        assert_eq!(merged.unserved_slots(), 0);
    }

    #[test]
    fn cluster_slots_groups_ranges_by_primary() {
        let node = |port: i64, id: &str| {
            array(vec![bulk("127.0.0.1"), BytesFrame::Integer(port), bulk(id)])
        };
        let range = |first: i64, last: i64, nodes: Vec<BytesFrame>| {
            let mut items = vec![BytesFrame::Integer(first), BytesFrame::Integer(last)];
            items.extend(nodes);
            array(items)
        };
        let reply = array(vec![
            range(0, 99, vec![node(1, "p1"), node(4, "r1")]),
            range(100, 199, vec![node(2, "p2")]),
            range(200, 299, vec![node(1, "p1"), node(4, "r1")]),
        ]);
        let topology = parse_slots(&reply).unwrap();
        assert_eq!(topology.shards.len(), 2);
        assert_eq!(topology.shards[0].slots, vec![(0, 99), (200, 299)]);
        assert_eq!(topology.shards[0].nodes.len(), 2);
        assert!(topology.shards[0].nodes[0].primary && !topology.shards[0].nodes[1].primary);
    }
}
