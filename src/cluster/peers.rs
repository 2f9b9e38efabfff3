//! The buffers of every shard of a cluster, seen together.
//!
//! Each shard has a buffer of its own, so a key's hash is in the mirror of the shard that holds
//! it. A backend's reconciliation (`sink/reconcile.rs`) deletes a row only when no shard's
//! mirror holds its key: a key in another shard is that shard's row, not an absent one.

use std::sync::{Arc, RwLock};

use crate::buffer::{MirrorKind, Store, StoreError};

/// Every shard's buffer, by shard id.
#[derive(Default)]
pub struct PeerMirrors {
    stores: RwLock<Vec<(String, Arc<Store>)>>,
}

impl std::fmt::Debug for PeerMirrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stores = self.stores.read().unwrap_or_else(|p| p.into_inner());
        f.debug_list()
            .entries(stores.iter().map(|(id, _)| id))
            .finish()
    }
}

impl PeerMirrors {
    /// Adds (or replaces) a shard's buffer.
    pub fn add(&self, shard: &str, store: Arc<Store>) {
        let mut stores = self.stores.write().unwrap_or_else(|p| p.into_inner());
        stores.retain(|(id, _)| id != shard);
        stores.push((shard.to_string(), store));
    }

    /// Whether a shard other than `except` holds `key` of database `db` as a watched hash
    /// with fields.
    pub fn others_hold(&self, except: &str, db: u32, key: &[u8]) -> Result<bool, StoreError> {
        let stores = self
            .stores
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (id, store) in stores {
            if id != except
                && store
                    .mirror(db, key)?
                    .is_some_and(|v| v.kind == MirrorKind::Hash && !v.fields.is_empty())
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
