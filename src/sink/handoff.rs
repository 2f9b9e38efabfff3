//! Hand-overs, the runner side (the protocol is in `cluster/peers.rs`): in a cluster, before a
//! batch is written, its changes written for another shard's delete wait until that shard's
//! batch has committed, and its deletes of rows whose key this shard does not serve steadily
//! are applied only if no other shard holds the key.

use std::time::{Duration, Instant};

use bytes::BytesMut;

use std::sync::Arc;

use super::read_ahead::Share;
use super::runner::SinkRunner;
use super::{Destination, RowOp};
use crate::capture::mapping::Mapping;
use crate::cluster::peers::{AskedKey, Dependency, HoldCheck, Peer, Peers};
use crate::cluster::slot::slot_of;
use crate::cluster::slot_state::{self, SteadySlots};
use crate::metrics::Health;
use crate::position::{ChangeSeq, ReplOffset};
use crate::redis_client::RedisClient;

/// How long the other shard's primary may take to tell its offset before the check goes on
/// with what that shard has captured.
const OFFSET_PATIENCE: Duration = Duration::from_secs(10);
/// How often a dependency's progress is looked at.
const DEPENDENCY_POLL: Duration = Duration::from_millis(5);
/// How long a wait on another shard (its batch, its answer) goes on before the log says so.
/// The wait itself has no end: deciding without that shard could remove a row it holds.
const WAIT_TOLD_AFTER: Duration = Duration::from_secs(30);

/// What a hand-off needs of its runner (owned: the runner is not shared across the waits).
pub(super) struct HandOff {
    name: String,
    mappings: Vec<Mapping>,
    health: Arc<Health>,
    shard: String,
    peers: Arc<Peers>,
}

impl<D: Destination> SinkRunner<D> {
    /// In a cluster, what [`HandOff::run`] needs.
    pub(super) fn hand_off(&self) -> Option<HandOff> {
        let (shard, peers) = self.peers.clone()?;
        Some(HandOff {
            name: self.name.clone(),
            mappings: self.mappings.clone(),
            health: self.health.clone(),
            shard,
            peers,
        })
    }
}

impl HandOff {
    /// See the module doc; `shares` is the batch `from..=last_seq`. `false` when a shard asked
    /// could not answer (it is stopping): the batch is not written now, and is read again.
    pub(super) async fn run(
        self,
        from: ChangeSeq,
        last_seq: ChangeSeq,
        shares: &mut [Share],
    ) -> bool {
        let (shard, peers) = (&self.shard, &self.peers);
        let backend = self.backend_name().to_string();
        for dependency in peers.dependencies(shard, &backend, from, last_seq) {
            wait_for(peers, &dependency).await;
        }
        let deletes = self.deleted_keys(shares);
        if deletes.is_empty() {
            return true;
        }
        // Every shard known at start is asked, not only those started before this one.
        while !peers.started() {
            tokio::time::sleep(DEPENDENCY_POLL).await;
        }
        let steady = self.steady_slots().await;
        let asked: Vec<(usize, usize, AskedKey)> = deletes
            .into_iter()
            .filter(|(_, _, k)| !steady.as_ref().is_some_and(|s| s.contains(slot_of(&k.key))))
            .collect();
        if asked.is_empty() {
            return true;
        }
        let keys: Vec<AskedKey> = asked.iter().map(|(_, _, k)| k.clone()).collect();
        let waiter = Dependency {
            shard: shard.clone(),
            backend,
            seq: last_seq,
        };
        let Some(held) = ask_every_shard(peers, shard, &keys, &waiter).await else {
            tracing::info!(backend = %self.name, "a shard asked about a delete did not answer (stopping?): the batch is written later");
            return false;
        };
        let mut dropped: Vec<(usize, usize)> = asked
            .iter()
            .zip(&held)
            .filter(|(_, held)| **held)
            .map(|((share, write, _), _)| (*share, *write))
            .collect();
        if dropped.is_empty() {
            return true;
        }
        tracing::info!(backend = %self.name, rows = dropped.len(), "deletes of keys another shard now holds are hand-overs: not applied; that shard writes their rows");
        metrics::counter!("writebehind_cluster_deletes_handed_over_total", "backend" => self.name.clone())
            .increment(dropped.len() as u64);
        // Highest index first, so that the others stay in place.
        dropped.sort_unstable_by(|a, b| b.cmp(a));
        for (share, write) in dropped {
            shares[share].coalesced.writes.remove(write);
        }
        true
    }

    /// The backend's name as configured (a shard's runner is named `<backend>@<shard>`).
    fn backend_name(&self) -> &str {
        self.name.rsplit_once('@').map_or(&self.name, |(b, _)| b)
    }

    /// Every row delete of the batch: (share, write, key).
    fn deleted_keys(&self, shares: &[Share]) -> Vec<(usize, usize, AskedKey)> {
        let mut keys = Vec::new();
        for (s, share) in shares.iter().enumerate() {
            for (w, write) in share.coalesced.writes.iter().enumerate() {
                if !matches!(write.op, RowOp::Delete { .. }) {
                    continue;
                }
                let Some(mapping) = self.mappings.get(write.table) else {
                    continue;
                };
                let mut key = BytesMut::from(&mapping.key_prefix[..]);
                key.extend_from_slice(&write.row_id);
                keys.push((
                    s,
                    w,
                    AskedKey {
                        mapping: mapping.name.clone(),
                        db: mapping.db,
                        key: key.freeze(),
                        row_id: write.row_id.clone(),
                    },
                ));
            }
        }
        keys
    }

    /// The slots this shard's primary serves steadily now (`None`: it cannot be asked, and
    /// every delete is checked).
    async fn steady_slots(&self) -> Option<SteadySlots> {
        let primary = self.health.primary()?;
        let asked = async {
            let mut client = RedisClient::connect(&primary, Duration::from_secs(2))
                .await
                .map_err(|e| e.to_string())?;
            slot_state::read(&mut client).await
        };
        match asked.await {
            Ok(steady) => Some(steady),
            Err(error) => {
                tracing::warn!(backend = %self.name, %error, "cannot read which slots this shard serves; every delete of the batch is checked with the other shards");
                None
            }
        }
    }
}

/// Until `dependency`'s batch has committed.
async fn wait_for(peers: &Peers, dependency: &Dependency) {
    let started = Instant::now();
    let mut told = false;
    while !peers.applied_through(&dependency.shard, &dependency.backend, dependency.seq) {
        if !told && started.elapsed() > WAIT_TOLD_AFTER {
            tracing::warn!(shard = %dependency.shard, seq = %dependency.seq, "a row written for another shard's hand-over waits for that shard's batch to commit");
            told = true;
        }
        tokio::time::sleep(DEPENDENCY_POLL).await;
    }
}

/// For each key, whether any other shard holds it (each asked at once); `None` when a shard
/// could not answer.
async fn ask_every_shard(
    peers: &Peers,
    shard: &str,
    keys: &[AskedKey],
    waiter: &Dependency,
) -> Option<Vec<bool>> {
    let answers = futures_util::future::join_all(
        peers
            .others(shard)
            .into_iter()
            .map(|peer| async move { ask_one(&peer, keys, waiter).await }),
    )
    .await;
    let answers: Vec<Vec<bool>> = answers.into_iter().collect::<Option<_>>()?;
    Some(
        (0..keys.len())
            .map(|i| {
                answers
                    .iter()
                    .any(|held| held.get(i).copied().unwrap_or(false))
            })
            .collect(),
    )
}

/// Asks `peer`'s capture once it has captured through its primary's offset now; `None` when
/// its capture cannot answer (it has stopped): a guess from its buffer could drop a delete that
/// nothing then replaces.
async fn ask_one(peer: &Peer, keys: &[AskedKey], waiter: &Dependency) -> Option<Vec<bool>> {
    let after = offset_now(peer).await;
    let (reply, answer) = tokio::sync::oneshot::channel();
    let check = HoldCheck {
        after,
        keys: keys.to_vec(),
        waiter: waiter.clone(),
        reply,
    };
    peer.holds.send(check).ok()?;
    // A shard that is stopping serves no more checks: no answer, rather than a wait until its
    // capture is dropped.
    tokio::pin!(answer);
    let (started, mut told) = (Instant::now(), false);
    loop {
        match tokio::time::timeout(Duration::from_millis(100), &mut answer).await {
            Ok(answered) => return answered.ok(),
            Err(_) if peer.health.is_stopping() => return None,
            Err(_) if !told && started.elapsed() > WAIT_TOLD_AFTER => {
                tracing::warn!(shard = %peer.id, through = ?after, backend = %waiter.backend, "deletes of keys this shard may now hold wait for it to capture through its primary's offset (is its replication link down?); the batch is written once it answers");
                told = true;
            }
            Err(_) => {}
        }
    }
}

/// The offset of `peer`'s primary now, retried for [`OFFSET_PATIENCE`] (a failover).
async fn offset_now(peer: &Peer) -> Option<ReplOffset> {
    let deadline = Instant::now() + OFFSET_PATIENCE;
    loop {
        let read = match peer.health.primary() {
            Some(primary) => crate::service::primary_offset(&primary).await,
            None => Err("no primary known yet".to_string()),
        };
        match read {
            Ok(offset) => return Some(ReplOffset(offset)),
            Err(error) if Instant::now() >= deadline => {
                tracing::warn!(shard = %peer.id, %error, "cannot read the shard's offset; its hold check answers from what it has captured");
                return None;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
