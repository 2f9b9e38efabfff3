//! Finding the current primary: a fixed URL, a replicaof-style list of nodes (asked with
//! `ROLE`), or Sentinel (`SENTINEL get-master-addr-by-name`), and Sentinel's `+switch-master`
//! announcements, which make the service reconnect at once instead of waiting for its link to
//! time out. In a cluster, each shard's link finds its primary through the cluster's own view
//! (`crate::cluster::locator`).

use std::sync::Arc;
use std::time::Duration;

use redis_protocol::resp2::types::BytesFrame;
use tokio::sync::Notify;

use super::LinkError;
use crate::cluster::locator::ShardLocator;
use crate::config::{EndpointError, RedisEndpoint, SourceConfig};
use crate::redis_client::{frame_text, ClientError, RedisClient};

/// Where the primary is.
#[derive(Debug, Clone)]
pub enum Discovery {
    Fixed(RedisEndpoint),
    /// The node whose `ROLE` is `master`.
    Nodes(Vec<RedisEndpoint>),
    /// Whatever the Sentinels say; the data nodes get the credentials in `auth`.
    Sentinel {
        sentinels: Vec<RedisEndpoint>,
        master_name: String,
        auth: (Option<String>, Option<String>),
    },
    /// One shard of a Redis Cluster (`[source] cluster`).
    Cluster(Arc<ShardLocator>),
}

impl Discovery {
    /// From a validated `[source]` section naming one primary (`url`, `nodes` or `sentinels`;
    /// a cluster's shards are found by `crate::cluster`).
    pub fn from_config(source: &SourceConfig) -> Result<Discovery, DiscoveryError> {
        let parse = |list: &[String]| {
            list.iter()
                .map(|u| RedisEndpoint::parse(u))
                .collect::<Result<Vec<_>, _>>()
        };
        let tls = source_tls(source)?;
        let with_tls = |e: RedisEndpoint| with_source_tls(e, &tls);
        let with_auth = |e: RedisEndpoint| with_source_auth(e, source, &tls);
        match (&source.url, &source.nodes, &source.sentinels) {
            (Some(url), _, _) => Ok(Discovery::Fixed(with_auth(RedisEndpoint::parse(url)?))),
            (None, Some(nodes), _) => Ok(Discovery::Nodes(
                parse(nodes)?.into_iter().map(with_auth).collect(),
            )),
            (None, None, Some(sentinels)) => Ok(Discovery::Sentinel {
                sentinels: parse(sentinels)?.into_iter().map(with_tls).collect(),
                master_name: source.master_name.clone().unwrap_or_default(),
                auth: (source.username.clone(), source.password.clone()),
            }),
            _ => Err(DiscoveryError::NoSource),
        }
    }

    /// The seed nodes of `[source] cluster`, with the source's credentials and TLS.
    pub fn cluster_seeds(source: &SourceConfig) -> Result<Vec<RedisEndpoint>, DiscoveryError> {
        let tls = source_tls(source)?;
        let seeds = source.cluster.as_deref().unwrap_or_default();
        if seeds.is_empty() {
            return Err(DiscoveryError::NoSource);
        }
        seeds
            .iter()
            .map(|u| Ok(with_source_auth(RedisEndpoint::parse(u)?, source, &tls)))
            .collect()
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        match self {
            Discovery::Fixed(e) => e.address(),
            Discovery::Nodes(nodes) => format!(
                "nodes {}",
                nodes
                    .iter()
                    .map(RedisEndpoint::address)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Discovery::Sentinel {
                sentinels,
                master_name,
                ..
            } => {
                format!(
                    "master `{master_name}` via sentinels {}",
                    sentinels
                        .iter()
                        .map(RedisEndpoint::address)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            Discovery::Cluster(locator) => locator.describe(),
        }
    }

    /// The current primary. `NotReady` when none can be found now (retried with backoff).
    pub async fn primary(&self, timeout: Duration) -> Result<RedisEndpoint, LinkError> {
        match self {
            Discovery::Fixed(endpoint) => Ok(endpoint.clone()),
            Discovery::Nodes(nodes) => {
                let mut seen = Vec::new();
                for node in nodes {
                    match role(node, timeout).await {
                        Ok(role) if role == "master" => return Ok(node.clone()),
                        Ok(role) => seen.push(format!("{} is {role}", node.address())),
                        Err(e) => seen.push(e.to_string()),
                    }
                }
                Err(LinkError::NotReady {
                    address: self.describe(),
                    message: format!("no node is a primary ({})", seen.join("; ")),
                })
            }
            Discovery::Sentinel {
                sentinels,
                master_name,
                auth,
            } => {
                let mut seen = Vec::new();
                for sentinel in sentinels {
                    match master_address(sentinel, master_name, timeout).await {
                        Ok((host, port)) => {
                            // Reached as the Sentinel that named it is: with TLS or without.
                            return Ok(RedisEndpoint {
                                host,
                                port,
                                username: auth.0.clone(),
                                password: auth.1.clone(),
                                tls: sentinel.tls.clone(),
                            });
                        }
                        Err(e) => seen.push(e.to_string()),
                    }
                }
                Err(LinkError::NotReady {
                    address: self.describe(),
                    message: format!("no sentinel knows the primary ({})", seen.join("; ")),
                })
            }
            Discovery::Cluster(locator) => locator.primary(timeout).await,
        }
    }

    /// With Sentinel: a task per sentinel that notifies `switched` on every `+switch-master`
    /// for this master. It runs until the returned handles are dropped or aborted.
    pub fn watch_switches(&self, switched: Arc<Notify>) -> Vec<tokio::task::JoinHandle<()>> {
        let Discovery::Sentinel {
            sentinels,
            master_name,
            ..
        } = self
        else {
            return Vec::new();
        };
        sentinels
            .iter()
            .cloned()
            .map(|sentinel| {
                let (switched, master_name) = (switched.clone(), master_name.clone());
                tokio::spawn(async move {
                    loop {
                        if let Err(error) = watch_one(&sentinel, &master_name, &switched).await {
                            tracing::debug!(sentinel = %sentinel.address(), %error, "sentinel subscription lost; resubscribing");
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                })
            })
            .collect()
    }
}

/// `[source.tls]` loaded, when set.
fn source_tls(source: &SourceConfig) -> Result<Option<crate::tls::RedisTls>, DiscoveryError> {
    match &source.tls {
        Some(files) => Ok(Some(
            crate::tls::RedisTls::from_files(files).map_err(DiscoveryError::Tls)?,
        )),
        None => Ok(None),
    }
}

/// A `rediss://` address with `[source.tls]` instead of the public CAs.
fn with_source_tls(mut e: RedisEndpoint, tls: &Option<crate::tls::RedisTls>) -> RedisEndpoint {
    if let (Some(_), Some(tls)) = (&e.tls, tls) {
        e.tls = Some(tls.clone());
    }
    e
}

/// A data node's address with the source's credentials when it carries none.
fn with_source_auth(
    mut e: RedisEndpoint,
    source: &SourceConfig,
    tls: &Option<crate::tls::RedisTls>,
) -> RedisEndpoint {
    if e.password.is_none() {
        e.username = source.username.clone();
        e.password = source.password.clone();
    }
    with_source_tls(e, tls)
}

/// Why a node or a Sentinel could not say where the primary is.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("[source]: set one of `url`, `nodes`, `sentinels` or `cluster`")]
    NoSource,
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error(transparent)]
    Redis(#[from] ClientError),
    #[error("{address}: {message}")]
    Reply { address: String, message: String },
    #[error("{0}")]
    Tls(String),
}

fn unexpected(node: &RedisEndpoint, message: String) -> DiscoveryError {
    DiscoveryError::Reply {
        address: node.address(),
        message,
    }
}

async fn role(node: &RedisEndpoint, timeout: Duration) -> Result<String, DiscoveryError> {
    let mut client = RedisClient::connect(node, timeout).await?;
    match client.command(&["ROLE"]).await? {
        BytesFrame::Array(items) => items
            .first()
            .map(frame_text)
            .ok_or_else(|| unexpected(node, "empty ROLE reply".into())),
        other => Err(unexpected(node, format!("unexpected ROLE reply {other:?}"))),
    }
}

async fn master_address(
    sentinel: &RedisEndpoint,
    master_name: &str,
    timeout: Duration,
) -> Result<(String, u16), DiscoveryError> {
    let mut client = RedisClient::connect(sentinel, timeout).await?;
    let reply = client
        .command(&["SENTINEL", "get-master-addr-by-name", master_name])
        .await?;
    match reply {
        BytesFrame::Array(items) if items.len() == 2 => {
            let host = frame_text(&items[0]);
            let port = frame_text(&items[1])
                .parse()
                .map_err(|_| unexpected(sentinel, format!("bad port in {items:?}")))?;
            Ok((host, port))
        }
        _ => Err(unexpected(
            sentinel,
            format!("the sentinel does not know master `{master_name}`"),
        )),
    }
}

async fn watch_one(
    sentinel: &RedisEndpoint,
    master_name: &str,
    switched: &Notify,
) -> Result<(), DiscoveryError> {
    let mut client = RedisClient::connect(sentinel, Duration::from_secs(5)).await?;
    client.send(&["SUBSCRIBE", "+switch-master"]).await?;
    loop {
        // `+switch-master <name> <old ip> <old port> <new ip> <new port>`
        let frame = client.next_frame(None).await?;
        if let BytesFrame::Array(items) = frame {
            let texts: Vec<String> = items.iter().map(frame_text).collect();
            if texts.first().is_some_and(|k| k == "message")
                && texts
                    .get(2)
                    .is_some_and(|m| m.split(' ').next() == Some(master_name))
            {
                tracing::info!(sentinel = %sentinel.address(), announcement = %texts[2], "sentinel switched the primary");
                switched.notify_waiters();
            }
        }
    }
}
