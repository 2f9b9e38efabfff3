//! What the shards of a cluster share in one process: each shard's buffer, health and a way to
//! ask its capture whether it holds keys; and the hand-overs between them.
//!
//! # Reconciliation
//!
//! Each shard has a buffer of its own, so a key's hash is in the mirror of the shard that holds
//! it. A backend's reconciliation (`sink/reconcile.rs`) deletes a row only when no shard's
//! mirror holds its key: a key in another shard is that shard's row, not an absent one.
//!
//! # Hand-overs: a key that moves between shards
//!
//! A slot migration moves each key with `MIGRATE`: the target shard's stream shows
//! `RESTORE-ASKING k` and then, once the target has it, the source's stream shows `DEL k`. The
//! two shards' pipelines apply them in no defined order, so the source's `DEL` must not delete
//! the row the target now writes, and the source's last writes of the key, applied late, must
//! not be left over the target's newer state. So a runner about to delete the row of a key its
//! shard does not serve steadily (the slot is being migrated away or is another shard's now,
//! read from its primary's `CLUSTER NODES` after the delete was captured:
//! `cluster/slot_state.rs`) first asks every other shard (`sink/handoff.rs`):
//! 1. it reads the other shard's primary offset `O`: the `RESTORE-ASKING` of a migrated key ran
//!    before the `DEL` this runner holds, so before `O`;
//! 2. that shard's capture answers once it has captured through `O`
//!    (`capture/handoff.rs`): for each key whose row it holds, it appends a change writing the
//!    row as its mirror has it now, durably, before answering;
//! 3. the delete is applied only if no shard holds the key; otherwise it is dropped, and the
//!    other shard's runner applies its change only after this runner's batch has committed (a
//!    [`Dependency`]), so the row ends as the shard holding the key has it, whatever order the
//!    two pipelines ran in.
//!
//! A crash anywhere repeats the batch and so the question; rewriting the holder's state again is
//! harmless. Dependencies are kept in memory for that reason.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::buffer::{MirrorKind, Name, Store, StoreError};
use crate::metrics::Health;
use crate::position::{ChangeSeq, ReplOffset};

/// A key whose row a runner would delete, asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AskedKey {
    pub mapping: Name,
    pub db: u32,
    pub key: Bytes,
    pub row_id: Bytes,
}

/// A runner's batch that another shard's change must wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub shard: String,
    /// The backend (as configured, without the shard).
    pub backend: String,
    /// The batch's last seq in that shard's change log.
    pub seq: ChangeSeq,
}

/// Asks a shard's capture which of `keys` it holds, once it has captured through `after`.
#[derive(Debug)]
pub struct HoldCheck {
    /// `None`: the other shard's primary could not be asked; answer from what is captured.
    pub after: Option<ReplOffset>,
    pub keys: Vec<AskedKey>,
    pub waiter: Dependency,
    /// For each key, whether this shard holds its row (and wrote it again).
    pub reply: oneshot::Sender<Vec<bool>>,
}

/// The changes of one shard and backend written for hand-overs, with the batches they wait for.
type Waits = BTreeMap<ChangeSeq, Vec<Dependency>>;

/// One shard as the others see it.
#[derive(Clone)]
pub struct Peer {
    pub id: String,
    pub store: Arc<Store>,
    pub health: Arc<Health>,
    pub holds: mpsc::UnboundedSender<HoldCheck>,
}

/// Every shard of the process, and the hand-overs waiting to be applied.
#[derive(Default)]
pub struct Peers {
    shards: RwLock<Vec<Peer>>,
    /// Every shard known at start has been added (set by the cluster's supervisor).
    started: std::sync::atomic::AtomicBool,
    /// By shard and backend, the seqs of changes written for a hand-over, with the batch each
    /// waits for.
    dependencies: Mutex<BTreeMap<(String, String), Waits>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shards = self.shards.read().unwrap_or_else(|p| p.into_inner());
        f.debug_list()
            .entries(shards.iter().map(|p| &p.id))
            .finish()
    }
}

impl Peers {
    /// Adds (or replaces) a shard.
    pub fn add(&self, peer: Peer) {
        let mut shards = self.shards.write().unwrap_or_else(|p| p.into_inner());
        shards.retain(|p| p.id != peer.id);
        shards.push(peer);
    }

    /// Whether every shard known at start has been added.
    pub fn started(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every shard known at start has been added.
    pub fn set_started(&self) {
        self.started
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether every shard's mirror is complete: every shard known at start added, and none
    /// without a position or in a full sync. A reconciliation deletes rows only then, so that a
    /// key of a shard that is still starting is not taken for an absent one.
    pub fn mirrors_complete(&self) -> Result<bool, StoreError> {
        if !self.started.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(false);
        }
        let shards = self
            .shards
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for peer in shards {
            let checkpoint = peer.store.checkpoint()?;
            if checkpoint.position.is_none() || checkpoint.full_sync_in_progress {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Forgets a shard (removed from the cluster).
    pub fn remove(&self, shard: &str) {
        let mut shards = self.shards.write().unwrap_or_else(|p| p.into_inner());
        shards.retain(|p| p.id != shard);
    }

    /// Every shard but `except`.
    pub fn others(&self, except: &str) -> Vec<Peer> {
        self.shards
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|p| p.id != except)
            .cloned()
            .collect()
    }

    /// Whether a shard other than `except` holds `key` of database `db` as a watched hash
    /// with fields.
    pub fn others_hold(&self, except: &str, db: u32, key: &[u8]) -> Result<bool, StoreError> {
        for peer in self.others(except) {
            if peer
                .store
                .mirror(db, key)?
                .is_some_and(|v| v.kind == MirrorKind::Hash && !v.fields.is_empty())
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Records that change `seq` of `shard` waits for `waiter`.
    pub fn depend(&self, shard: &str, seq: ChangeSeq, waiter: Dependency) {
        let mut dependencies = self.dependencies.lock().unwrap_or_else(|p| p.into_inner());
        dependencies
            .entry((shard.to_string(), waiter.backend.clone()))
            .or_default()
            .entry(seq)
            .or_default()
            .push(waiter);
    }

    /// What changes `from..=through` of `shard` wait for, for `backend`; forgets what is
    /// before `from` (applied).
    pub fn dependencies(
        &self,
        shard: &str,
        backend: &str,
        from: ChangeSeq,
        through: ChangeSeq,
    ) -> Vec<Dependency> {
        let mut dependencies = self.dependencies.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mine) = dependencies.get_mut(&(shard.to_string(), backend.to_string())) else {
            return Vec::new();
        };
        let kept = mine.split_off(&from);
        *mine = kept;
        mine.range(from..=through)
            .flat_map(|(_, waiters)| waiters.iter())
            .cloned()
            .collect()
    }

    /// Whether `shard`'s runner for `backend` has applied through `seq`; a shard no longer in
    /// the process (retired) has nothing left to apply.
    pub fn applied_through(&self, shard: &str, backend: &str, seq: ChangeSeq) -> bool {
        let shards = self.shards.read().unwrap_or_else(|p| p.into_inner());
        let Some(peer) = shards.iter().find(|p| p.id == shard) else {
            return true;
        };
        peer.health
            .applied_seq(&format!("{backend}@{shard}"))
            .is_some_and(|applied| applied >= seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_are_given_per_range_and_backend_and_forgotten_once_passed() {
        let peers = Peers::default();
        let waiter = |backend: &str, seq| Dependency {
            shard: "a".into(),
            backend: backend.into(),
            seq: ChangeSeq(seq),
        };
        peers.depend("b", ChangeSeq(5), waiter("db", 40));
        peers.depend("b", ChangeSeq(9), waiter("other", 41));
        peers.depend("b", ChangeSeq(12), waiter("db", 42));
        assert_eq!(
            peers.dependencies("b", "db", ChangeSeq(1), ChangeSeq(10)),
            vec![waiter("db", 40)]
        );
        assert!(peers
            .dependencies("c", "db", ChangeSeq(1), ChangeSeq(10))
            .is_empty());
        assert_eq!(
            peers.dependencies("b", "db", ChangeSeq(11), ChangeSeq(20)),
            vec![waiter("db", 42)]
        );
        // Passed: forgotten.
        assert!(peers
            .dependencies("b", "db", ChangeSeq(1), ChangeSeq(10))
            .is_empty());
    }
}
