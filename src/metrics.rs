//! What an operator sees: Prometheus metrics, health, readiness and status, served by the admin
//! HTTP listener (`src/admin.rs`).
//!
//! Endpoints: `GET /metrics` (Prometheus text), `GET /health` (200 while the process runs),
//! `GET /ready` (200 once the replication link and every backend are up, 503 with the reason
//! otherwise and from the moment a shutdown begins), `GET /status` (JSON: positions, lags, dead
//! letters, link state; what `writebehind status` prints).
//!
//! Metrics (all prefixed `writebehind_`; offsets in bytes of the replication stream):
//! - `position_received_bytes`, `position_buffered_bytes`, `position_applied_bytes{backend}`,
//!   `position_acked_bytes`, `primary_offset_bytes`: the positions, ordered
//!   received >= buffered >= applied >= acked;
//! - `lag_bytes` (primary offset minus the slowest applied position), `lag_seconds` (age of the
//!   oldest captured change not yet applied everywhere; 0 when idle);
//! - `changes_total{mapping,operation}` (upsert, delete), `dead_letters_total{backend}`;
//! - `sink_batches_total{backend}`, `sink_batch_rows{backend}` and `sink_commit_seconds{backend}`
//!   (histograms), `sink_retries_total{backend}`;
//! - `link_errors_total{kind}`, `full_syncs_total`, `partial_syncs_total`;
//! - `transaction_parts_written_total` (parts of long transactions written ahead of their end)
//!   and `transactions_rolled_back_total` (such transactions cut off before their end, rolled
//!   back and received again): `src/capture/long_unit.rs`; `open_transaction_commands` (the
//!   commands received so far of a transaction whose `EXEC` has not arrived; 0: none, which
//!   `/status` details as `open_transaction`);
//! - `buffer_size_bytes` (RocksDB files), `spool_bytes` (a full sync, or the command stream while
//!   capture is behind it, received and not yet decoded: `src/replication/spool.rs`),
//!   `stream_spooled_total` (times the link spooled the command stream), `link_up`,
//!   `backend_up{backend}`;
//! - `memory_bytes{part}`: `heap_allocated` and `heap_resident` (the allocator's figures: what
//!   the process asked for, and what the allocator keeps in RAM for it, which RSS follows),
//!   `rocksdb_memtables`, `rocksdb_table_readers` (index and filter blocks held outside the
//!   caches: the mirror's, which grow with the keyspace; the change log's are in its cache),
//!   `rocksdb_block_cache`, `rocksdb_pinned_blocks`, `mirror_journal` (mirror updates held in
//!   memory until they are settled into RocksDB's mirror: `src/buffer/journal.rs`); sampled
//!   with the primary's offset.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::buffer::DeadLetterSummary;
use crate::config::RedisEndpoint;
use crate::position::{ChangeSeq, ReplOffset};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Why the admin endpoints cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(#[from] metrics_exporter_prometheus::BuildError),
    #[error("admin listener cannot listen on {listen}: {source}; set [admin] listen to a free address, or to \"\" to turn it off")]
    Listen {
        listen: SocketAddr,
        source: std::io::Error,
    },
}

/// Installs the Prometheus recorder for the process, once: a second service in the same
/// process (a library user, the tests) shares it.
pub fn install() -> Result<PrometheusHandle, AdminError> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut installed = HANDLE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("writebehind_sink_commit_seconds".into()),
            &[0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("writebehind_sink_batch_rows".into()),
                &[1.0, 10.0, 100.0, 500.0, 1000.0, 5000.0],
            )
        })?
        .install_recorder()?;
    *installed = Some(handle.clone());
    Ok(handle)
}

/// Most commit records kept for `lag_seconds` (a backend down for an hour under load commits
/// many thousands): beyond, neighbours are merged, so the lag's resolution coarsens instead of
/// the memory growing.
const LAG_RECORDS: usize = 4096;

/// Merges each pair of neighbouring commit records into one: the later commit's seq with the
/// earlier one's time, so the lag is never under-reported.
fn merge_neighbours(records: &mut VecDeque<(u64, Instant)>) {
    let merged: VecDeque<(u64, Instant)> = records
        .make_contiguous()
        .chunks(2)
        .map(|pair| (pair[pair.len() - 1].0, pair[0].1))
        .collect();
    *records = merged;
}

/// State shared by capture, the sinks and the admin listener.
#[derive(Debug, Default)]
pub struct Health {
    /// In a cluster: the shard this is the health of (the `shard` label of its gauges).
    shard: Option<String>,
    link_up: AtomicBool,
    stopping: AtomicBool,
    received: AtomicU64,
    buffered: AtomicU64,
    primary_offset: AtomicU64,
    /// The last poll of the primary's offset succeeded: `lag_bytes` is measured against the
    /// primary, not only against what was received.
    primary_polled: AtomicBool,
    /// The failure to poll it was logged (once per failure streak).
    primary_poll_failing: AtomicBool,
    /// The primary accepted a full sync and has not started the snapshot for over a second
    /// (set by the replication link).
    waiting_for_snapshot: Arc<AtomicBool>,
    /// Bytes received into the replication spool and not yet captured (set by the link).
    spooled: Arc<AtomicU64>,
    /// The buffer's size on disk (bytes), sampled by the service.
    buffer_bytes: AtomicU64,
    backends: Mutex<BTreeMap<String, BackendState>>,
    /// (last seq of a commit, when it was captured), oldest first, until every backend applied it.
    unapplied: Mutex<VecDeque<(u64, Instant)>>,
    /// The primary of the link, with the source's credentials (the lag poller connects to it;
    /// only its address is shown).
    primary: Mutex<Option<RedisEndpoint>>,
    replid: Mutex<Option<String>>,
    /// Stream offset of the oldest acknowledgement not written to Redis yet (0: none).
    oldest_unacked: AtomicU64,
    /// The stream started over below where it was (a full sync from a primary with a lower
    /// offset): positions of the old history may stay ahead of the new one, so their order is
    /// no longer checked.
    restarted_lower: AtomicBool,
    /// Why capture cannot go on for now (a key it cannot read from the primary).
    capture_problem: Mutex<Option<String>>,
    /// The transaction capture is receiving in parts, and since when.
    open_transaction: Mutex<Option<(OpenTransaction, Instant)>>,
}

/// A transaction capture receives in parts and whose `EXEC` has not arrived yet
/// (`src/capture/long_unit.rs`): `/status` shows it, as the reason the positions stand still
/// while it arrives (nothing of it is acknowledged or applied before its end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenTransaction {
    /// The stream offset before its `MULTI` (where the buffered position stays until its end).
    pub start: ReplOffset,
    /// The seq its first change gets.
    pub first_seq: ChangeSeq,
    /// Its commands received so far.
    pub commands: u64,
    /// Its parts written to the buffer ahead of its end.
    pub parts_written: u64,
}

/// The positions along the stream at one moment (see `src/position.rs`), in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Positions {
    pub received: ReplOffset,
    pub buffered: ReplOffset,
    /// The slowest backend's (the buffered position when there is no backend).
    pub applied: ReplOffset,
    pub acked: ReplOffset,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct BackendState {
    up: bool,
    applied_seq: u64,
    applied_offset: u64,
    last_error: Option<String>,
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health::default())
    }

    /// The health of one shard of a cluster (`None`: of the one primary).
    pub fn for_shard(shard: Option<String>) -> Arc<Health> {
        Arc::new(Health {
            shard,
            ..Health::default()
        })
    }

    /// The shard this is the health of, in a cluster.
    pub fn shard(&self) -> Option<&str> {
        self.shard.as_deref()
    }

    /// The labels of this health's gauges, with `extra`.
    fn labels(&self, extra: &[(&'static str, String)]) -> Vec<metrics::Label> {
        let mut labels: Vec<metrics::Label> = extra
            .iter()
            .map(|(name, value)| metrics::Label::new(*name, value.clone()))
            .collect();
        if let Some(shard) = &self.shard {
            labels.push(metrics::Label::new("shard", shard.clone()));
        }
        labels
    }

    pub fn set_link(&self, up: bool, primary: Option<RedisEndpoint>, replid: Option<String>) {
        self.link_up.store(up, Ordering::SeqCst);
        metrics::gauge!("writebehind_link_up", self.labels(&[])).set(if up { 1.0 } else { 0.0 });
        if primary.is_some() {
            *self.primary.lock().unwrap_or_else(|p| p.into_inner()) = primary;
        }
        if replid.is_some() {
            *self.replid.lock().unwrap_or_else(|p| p.into_inner()) = replid;
        }
    }

    /// Capture has read and decoded the stream up to `offset` (never moves back).
    pub fn received(&self, offset: ReplOffset) {
        let received = self
            .received
            .fetch_max(offset.0, Ordering::Relaxed)
            .max(offset.0);
        metrics::gauge!("writebehind_position_received_bytes", self.labels(&[]))
            .set(received as f64);
    }

    /// A commit made changes up to `last_seq` durable at `offset` (never moves back; what is
    /// buffered was received).
    pub fn buffered(&self, offset: ReplOffset, last_seq: Option<ChangeSeq>) {
        self.received(offset);
        let buffered = self
            .buffered
            .fetch_max(offset.0, Ordering::Relaxed)
            .max(offset.0);
        metrics::gauge!("writebehind_position_buffered_bytes", self.labels(&[]))
            .set(buffered as f64);
        let Some(seq) = last_seq else { return };
        // Nothing will apply it without a backend (`--capture-only`): no lag to measure, and a
        // record per commit would be kept for ever.
        if self
            .backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return;
        }
        let mut unapplied = self.unapplied.lock().unwrap_or_else(|p| p.into_inner());
        unapplied.push_back((seq.0, Instant::now()));
        if unapplied.len() > LAG_RECORDS {
            merge_neighbours(&mut unapplied);
        }
    }

    /// The lowest seq the backends have applied through (`None`: no backend).
    pub fn slowest_applied_seq(&self) -> Option<ChangeSeq> {
        let backends = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        backends.values().map(|b| ChangeSeq(b.applied_seq)).min()
    }

    /// The seq backend (runner) `name` has applied through, once it has applied a batch.
    pub fn applied_seq(&self, name: &str) -> Option<ChangeSeq> {
        let backends = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        backends.get(name).map(|b| ChangeSeq(b.applied_seq))
    }

    pub fn backend(&self, name: &str, up: bool, error: Option<String>) {
        let mut backends = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        let state = backends.entry(name.to_string()).or_default();
        state.up = up;
        state.last_error = error;
        metrics::gauge!(
            "writebehind_backend_up",
            self.labels(&[("backend", name.to_string())])
        )
        .set(if up { 1.0 } else { 0.0 });
    }

    /// The stream starts over at `offset` (a full sync completed): received and buffered are
    /// set there, even when that is lower than before.
    pub fn stream_restarted(&self, offset: ReplOffset) {
        let before = self.buffered.swap(offset.0, Ordering::Relaxed);
        self.received.store(offset.0, Ordering::Relaxed);
        if before > offset.0 {
            self.restarted_lower.store(true, Ordering::Relaxed);
        }
        self.buffered(offset, None);
    }

    /// Backend `name` committed changes up to `seq`, the last at stream offset `offset`.
    pub fn applied(&self, name: &str, seq: ChangeSeq, offset: ReplOffset) {
        // A sink reads only what is synced in the buffer: what it applied is buffered, even if
        // capture has not reported its commit yet.
        if !self.restarted_lower.load(Ordering::Relaxed) {
            self.buffered(offset, None);
        }
        let (seq, offset) = (seq.0, offset.0);
        let slowest = {
            let mut backends = self.backends.lock().unwrap_or_else(|p| p.into_inner());
            let state = backends.entry(name.to_string()).or_default();
            state.applied_seq = state.applied_seq.max(seq);
            state.applied_offset = state.applied_offset.max(offset);
            backends
                .values()
                .map(|b| b.applied_seq)
                .min()
                .unwrap_or(seq)
        };
        metrics::gauge!(
            "writebehind_position_applied_bytes",
            self.labels(&[("backend", name.to_string())])
        )
        .set(offset as f64);
        let mut unapplied = self.unapplied.lock().unwrap_or_else(|p| p.into_inner());
        while unapplied.front().is_some_and(|(s, _)| *s <= slowest) {
            unapplied.pop_front();
        }
    }

    /// The oldest acknowledgement still queued (its change's stream offset), after a write.
    pub fn acks_pending(&self, oldest_offset: Option<ReplOffset>) {
        self.oldest_unacked
            .store(oldest_offset.map_or(0, |o| o.0), Ordering::Relaxed);
    }

    /// Everything up to here is applied and acknowledged: the slowest applied position, held
    /// back before the oldest acknowledgement not written yet.
    fn acked(&self, applied: u64) -> u64 {
        match self.oldest_unacked.load(Ordering::Relaxed) {
            0 => applied,
            oldest => applied.min(oldest.saturating_sub(1)),
        }
    }

    /// The flag the replication link sets while the primary prepares a snapshot
    /// (`ReplicatorOptions::waiting_for_snapshot`).
    pub fn waiting_for_snapshot_flag(&self) -> Arc<AtomicBool> {
        self.waiting_for_snapshot.clone()
    }

    /// The count the replication link keeps of what waits in its spool
    /// (`ReplicatorOptions::spooled`).
    pub fn spooled_counter(&self) -> Arc<AtomicU64> {
        self.spooled.clone()
    }

    /// What the link is doing, for `/status`: `up`, `down`, or waiting for the primary to start
    /// a snapshot it accepted.
    fn link_state(&self) -> &'static str {
        if self.link_up.load(Ordering::SeqCst) {
            "up"
        } else if self.waiting_for_snapshot.load(Ordering::SeqCst) {
            "waiting for the primary to start the snapshot"
        } else {
            "down"
        }
    }

    /// The primary's offset, as its `INFO` reported it.
    pub fn primary_offset(&self, offset: u64) {
        self.primary_offset.store(offset, Ordering::Relaxed);
        self.primary_polled.store(true, Ordering::Relaxed);
        if self.primary_poll_failing.swap(false, Ordering::Relaxed) {
            tracing::info!(offset, "the primary's offset can be read again");
        }
    }

    /// The primary's offset cannot be read (`why`): the lag is measured against what was
    /// received until it can. Said once per failure streak, not at every poll.
    pub fn primary_offset_unavailable(&self, why: &str) {
        self.primary_polled.store(false, Ordering::Relaxed);
        if !self.primary_poll_failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(reason = why, "cannot read the primary's offset; lag_bytes counts from what was received until it can");
        }
    }

    /// Capture is blocked (`Some`: why) or no longer (`None`); `/ready` says it.
    pub fn capture_problem(&self, problem: Option<String>) {
        *self
            .capture_problem
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = problem;
    }

    /// The transaction capture is receiving in parts (`None`: none); the time it is shown
    /// open for counts from when its start was first reported.
    pub fn open_transaction(&self, open: Option<OpenTransaction>) {
        let mut shown = self
            .open_transaction
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        metrics::gauge!("writebehind_open_transaction_commands", self.labels(&[]))
            .set(open.map_or(0.0, |o| o.commands as f64));
        *shown = open.map(|open| {
            let since = match *shown {
                Some((before, since))
                    if (before.start, before.first_seq) == (open.start, open.first_seq) =>
                {
                    since
                }
                _ => Instant::now(),
            };
            (open, since)
        });
    }

    /// Whether a stop has begun.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// The primary of the link, credentials included.
    pub fn primary(&self) -> Option<RedisEndpoint> {
        self.primary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `None` when ready, else why not.
    pub fn not_ready(&self) -> Option<String> {
        if self.stopping.load(Ordering::SeqCst) {
            return Some("shutting down".into());
        }
        if !self.link_up.load(Ordering::SeqCst) {
            return Some(format!("the replication link is {}", self.link_state()));
        }
        if let Some(problem) = self
            .capture_problem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Some(problem);
        }
        let backends = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        let down: Vec<String> = backends
            .iter()
            .filter(|(_, b)| !b.up)
            .map(|(n, b)| {
                format!(
                    "backend `{n}` is down ({})",
                    b.last_error.clone().unwrap_or_default()
                )
            })
            .collect();
        (!down.is_empty()).then(|| down.join("; "))
    }

    fn slowest_applied(&self) -> u64 {
        let backends = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        if backends.is_empty() {
            return self.buffered.load(Ordering::Relaxed);
        }
        backends
            .values()
            .map(|b| b.applied_offset)
            .min()
            .unwrap_or(0)
    }

    fn lag_seconds(&self) -> f64 {
        self.unapplied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .front()
            .map(|(_, at)| at.elapsed().as_secs_f64())
            .unwrap_or(0.0)
    }

    /// The positions now, checked to be in order (debug builds).
    pub fn positions(&self) -> Positions {
        // Read from the last to the first: each can only have moved on since.
        let applied = self.slowest_applied();
        let acked = self.acked(applied);
        let buffered = self.buffered.load(Ordering::Relaxed);
        let received = self.received.load(Ordering::Relaxed);
        debug_assert!(
            received >= buffered,
            "received {received} < buffered {buffered}"
        );
        debug_assert!(applied >= acked, "applied {applied} < acked {acked}");
        debug_assert!(
            buffered >= applied || self.restarted_lower.load(Ordering::Relaxed),
            "buffered {buffered} < applied {applied}"
        );
        Positions {
            received: ReplOffset(received),
            buffered: ReplOffset(buffered),
            applied: ReplOffset(applied),
            acked: ReplOffset(acked),
        }
    }

    /// Refreshes the derived gauges (before a scrape).
    pub fn publish(&self) {
        let positions = self.positions();
        let applied = positions.applied.0;
        let primary = self
            .primary_offset
            .load(Ordering::Relaxed)
            .max(positions.received.0);
        metrics::gauge!("writebehind_position_acked_bytes", self.labels(&[]))
            .set(positions.acked.0 as f64);
        metrics::gauge!("writebehind_primary_offset_bytes", self.labels(&[])).set(primary as f64);
        metrics::gauge!("writebehind_lag_bytes", self.labels(&[]))
            .set(primary.saturating_sub(applied) as f64);
        metrics::gauge!("writebehind_lag_seconds", self.labels(&[])).set(self.lag_seconds());
        metrics::gauge!("writebehind_spool_bytes", self.labels(&[]))
            .set(self.spooled.load(Ordering::Relaxed) as f64);
    }

    /// The buffer's size on disk (`buffer_size_bytes`, `buffer_bytes` in the status): what an
    /// outage of a backend makes grow.
    pub fn buffer_size(&self, bytes: u64) {
        self.buffer_bytes.store(bytes, Ordering::Relaxed);
        metrics::gauge!("writebehind_buffer_size_bytes", self.labels(&[])).set(bytes as f64);
    }

    /// The process's memory by part (`memory_bytes{part}`), from the allocator and RocksDB.
    pub fn memory(&self, store: crate::buffer::StoreMemory) {
        let heap = heap_figures();
        let parts = [
            ("heap_allocated", heap.map(|h| h.0)),
            ("heap_resident", heap.map(|h| h.1)),
            ("rocksdb_memtables", Some(store.memtables)),
            ("rocksdb_table_readers", Some(store.table_readers)),
            ("rocksdb_block_cache", Some(store.block_cache)),
            ("rocksdb_pinned_blocks", Some(store.pinned_blocks)),
            ("mirror_journal", Some(store.journal)),
        ];
        for (part, bytes) in parts {
            // The heap is the process's: never labelled with a shard (summing shards would
            // count it once per shard).
            if part.starts_with("heap_") {
                if let Some(bytes) = bytes {
                    metrics::gauge!("writebehind_memory_bytes", "part" => part).set(bytes as f64);
                }
                continue;
            }
            if let Some(bytes) = bytes {
                metrics::gauge!(
                    "writebehind_memory_bytes",
                    self.labels(&[("part", part.to_string())])
                )
                .set(bytes as f64);
            }
        }
    }

    fn open_transaction_status(&self) -> serde_json::Value {
        let shown = *self
            .open_transaction
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match shown {
            Some((open, since)) => serde_json::json!({
                "start_offset": open.start.0,
                "first_seq": open.first_seq.0,
                "commands": open.commands,
                "parts_written": open.parts_written,
                "open_seconds": since.elapsed().as_secs_f64(),
            }),
            None => serde_json::Value::Null,
        }
    }

    /// The status document (`GET /status`, `writebehind status`).
    pub fn status(&self, dead_letters: &DeadLetterSummary) -> serde_json::Value {
        let backends = self
            .backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let positions = self.positions();
        let applied = positions.applied.0;
        let primary_offset = self
            .primary_offset
            .load(Ordering::Relaxed)
            .max(positions.received.0);
        serde_json::json!({
            "link": self.link_state(),
            "primary": self.primary().map(|p| p.address()),
            "replid": self.replid.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            "positions": {
                "primary": primary_offset,
                "received": positions.received.0,
                "buffered": positions.buffered.0,
                "applied": applied,
                "acked": positions.acked.0,
            },
            // False: the primary's offset could not be read; "primary" is then what was received.
            "primary_polled": self.primary_polled.load(Ordering::Relaxed),
            "lag_bytes": primary_offset.saturating_sub(applied),
            "lag_seconds": self.lag_seconds(),
            "dead_letters": dead_letters.count,
            "oldest_dead_letter": oldest_dead_letter(dead_letters),
            "buffer_bytes": self.buffer_bytes.load(Ordering::Relaxed),
            // Received from the primary into the spool (a snapshot, or the stream while
            // capture is behind) and not captured yet: part of the lag, on this host's disk.
            "spool_bytes": self.spooled.load(Ordering::Relaxed),
            "backends": backends,
            "open_transaction": self.open_transaction_status(),
            "ready": self.not_ready().is_none(),
        })
    }
}

/// The oldest dead letter as `/status` and `status` show it: where and when, not the row (its
/// key and the refused values stay behind `dlq list`).
pub(crate) fn oldest_dead_letter(summary: &DeadLetterSummary) -> serde_json::Value {
    match &summary.oldest {
        Some(letter) => serde_json::json!({
            "seq": letter.seq.0,
            "backend": letter.backend,
            "mapping": letter.mapping,
            "at_ms": letter.at_ms,
        }),
        None => serde_json::Value::Null,
    }
}

/// Reads the allocator's `(allocated, resident)` bytes.
pub type HeapReader = fn() -> Option<(u64, u64)>;

static HEAP_READER: std::sync::OnceLock<HeapReader> = std::sync::OnceLock::new();

/// Sets where the heap figures come from: the binary, which chose the allocator (jemalloc, in
/// `main.rs`), registers its reader. The library does not link the allocator itself: anything
/// else built on it (the tests, the fuzz targets under a sanitizer) keeps its own.
pub fn set_heap_reader(reader: HeapReader) {
    let _ = HEAP_READER.set(reader);
}

fn heap_figures() -> Option<(u64, u64)> {
    HEAP_READER.get().and_then(|read| read())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a backend (`--capture-only`) commits leave no record and there is no lag; with
    /// one, the records stay bounded however many commits wait, and the lag stays that of the
    /// oldest unapplied commit.
    #[test]
    fn commit_records_are_bounded_and_absent_without_backends() {
        let health = Health::default();
        for seq in 1..=10_000 {
            health.buffered(ReplOffset(seq), Some(ChangeSeq(seq)));
        }
        assert!(health.unapplied.lock().expect("lock").is_empty());
        assert_eq!(health.lag_seconds(), 0.0);

        let health = Health::default();
        health.backend("db", true, None);
        health.buffered(ReplOffset(1), Some(ChangeSeq(1)));
        let first = health.unapplied.lock().expect("lock")[0].1;
        for seq in 2..=100_000 {
            health.buffered(ReplOffset(seq), Some(ChangeSeq(seq)));
        }
        let records = health.unapplied.lock().expect("lock").clone();
        assert!(records.len() <= LAG_RECORDS, "{} records", records.len());
        assert_eq!(
            records.front().map(|r| r.1),
            Some(first),
            "the oldest time kept"
        );
        assert_eq!(records.back().map(|r| r.0), Some(100_000));
        health.applied("db", ChangeSeq(100_000), ReplOffset(100_000));
        assert_eq!(health.lag_seconds(), 0.0, "all applied");
    }
}
