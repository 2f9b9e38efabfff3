//! Every backend's applied seq, so that the change log is trimmed behind the slowest.
//!
//! Trimming is a RocksDB range delete, and every later read of the change log walks its
//! tombstone: it is done in steps of at least [`TRIM_AT_LEAST`] changes or every
//! [`TRIM_EVERY`], not after every batch.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::position::ChangeSeq;

/// Changes trimmed at once at least (or after `TRIM_EVERY`): every trim is a range tombstone
/// that each later read of the change log must process, so trimming after every small batch
/// makes reads slower and slower (seen at 1,000 commits per second).
pub const TRIM_AT_LEAST: u64 = 10_000;
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// The applied seq of every backend, so the change log is trimmed behind the slowest.
#[derive(Debug)]
pub struct AppliedPositions {
    applied: Mutex<HashMap<String, ChangeSeq>>,
    backends: usize,
    /// Trimmed through this seq, at this instant.
    trimmed: Mutex<(ChangeSeq, std::time::Instant)>,
}

impl AppliedPositions {
    pub fn new(backends: usize) -> Self {
        AppliedPositions {
            applied: Mutex::new(HashMap::new()),
            backends,
            trimmed: Mutex::new((ChangeSeq::NONE, std::time::Instant::now())),
        }
    }

    /// Records a backend's position; returns the seq every backend has passed when it is time
    /// to trim the change log through it.
    pub fn record(&self, backend: &str, seq: ChangeSeq) -> Option<ChangeSeq> {
        let through = {
            let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
            applied.insert(backend.to_string(), seq);
            if applied.len() < self.backends {
                return None;
            }
            applied.values().copied().min().unwrap_or_default()
        };
        let mut trimmed = self.trimmed.lock().unwrap_or_else(|p| p.into_inner());
        let due = through.0 >= trimmed.0 .0.saturating_add(TRIM_AT_LEAST)
            || (through > trimmed.0 && trimmed.1.elapsed() >= TRIM_EVERY);
        if !due {
            return None;
        }
        *trimmed = (through, std::time::Instant::now());
        Some(through)
    }

    pub fn get(&self, backend: &str) -> Option<ChangeSeq> {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(backend)
            .copied()
    }
}
