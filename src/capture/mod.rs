//! Capture: turns the replication stream into durable, ordered row changes in the buffer.
//!
//! - **Full sync**: every watched key of the snapshot is written to the mirror with the new
//!   generation; a key whose data changed (or is new) gives an upsert (on the very first sync
//!   only if its mapping's `initial_load` is `upsert`), an unchanged one only gets its generation
//!   mark. When the snapshot ends, mirror entries of older generations are swept: their rows are
//!   deleted. Memory stays bounded: one key at a time, written in batches.
//! - **Stream**: each command or `MULTI` unit is applied to the mirror ([`apply`]); its row
//!   changes go to the change log as one unit. Everything that arrived together is applied and
//!   then written with one synced `WriteBatch` (group commit) holding mirror, changes and the
//!   checkpoint after the last unit. Only then is the offset acknowledged to the primary, so
//!   `WAIT 1` returns once a write is durably captured.
//! - **Restart**: `PSYNC` from the checkpoint; a full sync that was interrupted starts over.

pub mod apply;
pub mod command_table;
pub mod mapping;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;

use crate::ack::{parse_tag, OpField, Tag, Writeback, OP_FIELD};
use crate::buffer::{
    Batch, Change, Checkpoint, FieldValue, MirrorKind, MirrorValue, NewAck, Store, StoreError,
};
use crate::config::{InitialLoad, RedisEndpoint};
use crate::position::{ReplId, ReplOffset, StreamPosition};
use crate::redis_client::{info_field, ClientError, RedisClient};
use crate::replication::rdb::{decode_dump_payload, RdbEvent, ValueKind};
use crate::replication::stream::StreamEvent;
use crate::replication::{LinkError, ReplicationEvent, Replicator};
use apply::{
    apply_op, mirror_value_from_dump, now_ms, op_effects, row_event, Applier, OpSeen, RowEvent,
    WorkingSet,
};
use command_table::CommandTable;
use mapping::Mappings;

/// Units applied before a commit even if more are buffered (bounds memory and latency).
const MAX_UNITS_PER_COMMIT: usize = 10_000;
/// Snapshot keys written per batch.
const SNAPSHOT_BATCH_KEYS: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// Counters, for logs and metrics.
#[derive(Debug, Default, Clone)]
pub struct CaptureStats {
    pub units: u64,
    pub changes: u64,
    pub commits: u64,
    pub refreshed_keys: u64,
    pub unknown_commands: u64,
    pub full_syncs: u64,
    pub partial_syncs: u64,
}

/// Keys whose `#` op is not completed in Redis (the buffer's `raw` entries), with how many
/// databases hold each name: a cheap, conservative test of whether a command may touch one.
#[derive(Default)]
struct PendingKeys {
    keys: HashSet<(u32, Bytes)>,
    names: HashMap<Bytes, usize>,
}

impl PendingKeys {
    fn insert(&mut self, db: u32, key: &Bytes) {
        if self.keys.insert((db, key.clone())) {
            *self.names.entry(key.clone()).or_default() += 1;
        }
    }

    /// Returns whether it was pending.
    fn remove(&mut self, db: u32, key: &Bytes) -> bool {
        if !self.keys.remove(&(db, key.clone())) {
            return false;
        }
        if let Some(count) = self.names.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                self.names.remove(key);
            }
        }
        true
    }

    fn contains(&self, db: u32, key: &Bytes) -> bool {
        self.keys.contains(&(db, key.clone()))
    }

    /// Whether a pending key has this name, in any database.
    fn names(&self, name: &[u8]) -> bool {
        self.names.contains_key(name)
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn clear(&mut self) {
        self.keys.clear();
        self.names.clear();
    }
}

struct SnapshotKey {
    db: u32,
    key: Bytes,
    value: MirrorValue,
    empty: bool,
}

struct FullSync {
    first: bool,
    /// The offset of the snapshot (`+FULLRESYNC`), recorded with its changes.
    offset: ReplOffset,
    key: Option<SnapshotKey>,
    batch: Batch,
    keys_in_batch: usize,
    progress: SnapshotProgress,
}

/// Progress of a snapshot: a log line at every tenth of the keys and at least every few seconds,
/// with percent and rate, and a bar when standard error is a terminal. The total is the
/// primary's key count when the sync began.
struct SnapshotProgress {
    total: u64,
    keys: u64,
    next_percent: f64,
    started: std::time::Instant,
    last_log: std::time::Instant,
    bar: indicatif::ProgressBar,
}

impl SnapshotProgress {
    const LOG_EVERY: Duration = Duration::from_secs(5);

    fn new(total: u64) -> Self {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(total.max(1)),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "snapshot {bar:40} {pos}/{len} keys {per_sec} {eta}",
        ) {
            bar.set_style(style);
        }
        let now = std::time::Instant::now();
        SnapshotProgress {
            total,
            keys: 0,
            next_percent: 10.0,
            started: now,
            last_log: now,
            bar,
        }
    }

    fn key_done(&mut self) {
        self.keys += 1;
        self.bar.set_position(self.keys);
        let percent = self.percent();
        if self.last_log.elapsed() >= Self::LOG_EVERY
            || (self.total > 0 && percent >= self.next_percent)
        {
            self.last_log = std::time::Instant::now();
            while self.next_percent <= percent {
                self.next_percent += 10.0;
            }
            tracing::info!(keys = self.keys, total = self.total, percent = %format!("{percent:.1}"), keys_per_second = self.rate(), "snapshot progress");
        }
    }

    fn percent(&self) -> f64 {
        if self.total == 0 {
            100.0
        } else {
            (self.keys as f64 * 100.0 / self.total as f64).min(100.0)
        }
    }

    fn rate(&self) -> u64 {
        let seconds = self.started.elapsed().as_secs_f64();
        if seconds > 0.0 {
            (self.keys as f64 / seconds) as u64
        } else {
            0
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// The capture pipeline.
pub struct Capture {
    store: Arc<Store>,
    mappings: Mappings,
    commands: CommandTable,
    endpoint: RedisEndpoint,
    checkpoint: Checkpoint,
    full_sync: Option<FullSync>,
    refresher: Option<RedisClient>,
    /// Woken after every commit, for the sinks.
    committed: Arc<tokio::sync::Notify>,
    health: Arc<crate::metrics::Health>,
    /// Whether `#` is the op field (`[acks] enabled`).
    ops: bool,
    /// Keys whose `#` op is not completed in Redis.
    pending: PendingKeys,
    /// Woken when there is something to write back to Redis (a completion, an ack).
    writeback: Arc<Writeback>,
    pub stats: CaptureStats,
}

impl Capture {
    pub fn new(
        store: Arc<Store>,
        mappings: Mappings,
        endpoint: RedisEndpoint,
    ) -> Result<Capture, StoreError> {
        let mut checkpoint = store.checkpoint()?;
        // Seqs start at 1: a sink whose checkpoint says 0 has applied nothing.
        checkpoint.next_seq = checkpoint.next_seq.max(1);
        let mut pending = PendingKeys::default();
        for (db, key) in store.raw_keys()? {
            pending.insert(db, &key);
        }
        Ok(Capture {
            store,
            mappings,
            commands: CommandTable::default(),
            endpoint,
            checkpoint,
            full_sync: None,
            refresher: None,
            committed: Arc::new(tokio::sync::Notify::new()),
            health: crate::metrics::Health::new(),
            ops: true,
            pending,
            writeback: Arc::new(Writeback::default()),
            stats: CaptureStats::default(),
        })
    }

    /// Whether `#` is the op field (default true).
    pub fn set_ops(&mut self, enabled: bool) {
        self.ops = enabled;
    }

    /// Notified when a completion or an acknowledgement is waiting to be written to Redis.
    pub fn writeback(&self) -> Arc<Writeback> {
        self.writeback.clone()
    }

    /// The state the admin endpoints report; shared with the sinks.
    pub fn health(&self) -> Arc<crate::metrics::Health> {
        self.health.clone()
    }

    /// Notified after every commit to the change log.
    pub fn committed(&self) -> Arc<tokio::sync::Notify> {
        self.committed.clone()
    }

    /// Where the next `PSYNC` continues from (`None`: a full sync).
    pub fn resume_position(&self) -> Option<StreamPosition> {
        if self.checkpoint.full_sync_in_progress {
            None
        } else {
            self.checkpoint.position.clone()
        }
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// Runs until `stop` resolves (then commits and returns) or a fatal error.
    pub async fn run(
        &mut self,
        replicator: &mut Replicator,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), CaptureError> {
        tokio::pin!(stop);
        replicator.resume_from(self.resume_position());
        loop {
            let event = tokio::select! {
                event = replicator.next() => event?,
                _ = &mut stop => return Ok(()),
            };
            self.handle(replicator, event).await?;
        }
    }

    /// Handles one event (and, for the command stream, everything already buffered after it).
    pub async fn handle(
        &mut self,
        replicator: &mut Replicator,
        event: ReplicationEvent,
    ) -> Result<(), CaptureError> {
        // After a failover the primary is another server: ordinary commands go there too.
        if let Some(primary) = replicator.primary() {
            if *primary != self.endpoint {
                self.endpoint = primary.clone();
                self.refresher = None;
            }
        }
        match event {
            ReplicationEvent::FullSyncStarted { replid, offset, .. } => {
                tracing::info!(%replid, %offset, "full sync started");
                self.load_command_table().await;
                let total = self.primary_key_count().await;
                self.begin_full_sync(total, offset)?;
            }
            ReplicationEvent::Snapshot(event) => self.snapshot_event(event)?,
            ReplicationEvent::FullSyncCompleted {
                position,
                rdb_bytes,
            } => {
                self.finish_full_sync(position.clone())?;
                replicator.acknowledge(position.offset);
                self.health.set_link(
                    true,
                    Some(self.endpoint.address()),
                    Some(position.replid.to_string()),
                );
                tracing::info!(%position, rdb_bytes, "full sync completed");
            }
            ReplicationEvent::Continued {
                position,
                previous_replid,
            } => {
                self.stats.partial_syncs += 1;
                metrics::counter!("writebehind_partial_syncs_total").increment(1);
                self.health.set_link(
                    true,
                    Some(self.endpoint.address()),
                    Some(position.replid.to_string()),
                );
                self.load_command_table().await;
                if let Some(previous) = previous_replid {
                    tracing::info!(%previous, new = %position.replid, "the primary's replication ID changed; continuing");
                    let mut batch = Batch::default();
                    batch.add_replid(self.checkpoint.next_seq, &position.replid, position.offset);
                    self.checkpoint.position = Some(position.clone());
                    batch.put_checkpoint(&self.checkpoint);
                    self.store.write(batch, true)?;
                }
                tracing::info!(%position, "partial resync accepted");
            }
            ReplicationEvent::Stream(first) => {
                let mut ws = WorkingSet::new(self.store.clone());
                let mut raw = WorkingSet::raw(self.store.clone());
                let mut acks = Vec::new();
                let mut changes = Vec::new();
                let mut units = 0;
                let mut next = Some(first);
                let mut resync = None;
                while let Some(event) = next.take() {
                    self.health.received(event.end().0);
                    if let Some(reason) = self
                        .stream_event(&mut ws, &mut raw, &event, &mut changes, &mut acks)
                        .await?
                    {
                        resync = Some(reason);
                        break;
                    }
                    units += 1;
                    if units < MAX_UNITS_PER_COMMIT {
                        next = replicator.try_next_buffered();
                    }
                }
                if let Some(reason) = resync {
                    // Nothing of this batch is kept: a unit may be half applied to the working
                    // set. The full sync compares the snapshot with the mirror as of the last
                    // commit, so every change since then is found again.
                    tracing::warn!(%reason, "starting a full resynchronisation");
                    drop((ws, raw));
                    self.checkpoint = self.store.checkpoint()?;
                    replicator.resume_from(None);
                    replicator.disconnect();
                    return Ok(());
                }
                self.commit(&mut ws, &mut raw, changes, acks)?;
                if let Some(position) = &self.checkpoint.position {
                    replicator.acknowledge(position.offset);
                }
            }
            ReplicationEvent::Disconnected { error, retry_in } => {
                tracing::warn!(%error, ?retry_in, "replication link lost");
                let kind = match &error {
                    LinkError::Io { .. } => "io",
                    LinkError::Timeout { .. } => "timeout",
                    LinkError::NotReady { .. } => "not_ready",
                    LinkError::Refused { .. } => "refused",
                    LinkError::Protocol { .. } => "protocol",
                    LinkError::Snapshot { .. } => "snapshot",
                    LinkError::Fatal { .. } => "fatal",
                };
                metrics::counter!("writebehind_link_errors_total", "kind" => kind).increment(1);
                self.health.set_link(false, None, None);
                self.full_sync = None;
                replicator.resume_from(self.resume_position());
            }
        }
        Ok(())
    }

    async fn load_command_table(&mut self) {
        let result = async {
            let mut client = RedisClient::connect(&self.endpoint, Duration::from_secs(10)).await?;
            client.command(&["COMMAND"]).await
        }
        .await;
        match result {
            Ok(reply) => self.commands = CommandTable::from_reply(&reply),
            Err(error) => {
                tracing::warn!(%error, "cannot read the primary's command table; unknown writes will be refreshed by key")
            }
        }
    }

    /// The number of keys in the primary (`INFO keyspace`), for the snapshot's progress.
    async fn primary_key_count(&self) -> u64 {
        let info = async {
            RedisClient::connect(&self.endpoint, Duration::from_secs(10))
                .await?
                .info("keyspace")
                .await
        }
        .await;
        let Ok(info) = info else { return 0 };
        info.lines()
            .filter(|l| l.starts_with("db"))
            .filter_map(|l| {
                l.split([':', ','])
                    .find_map(|part| part.strip_prefix("keys="))
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .sum()
    }

    fn begin_full_sync(&mut self, total_keys: u64, offset: ReplOffset) -> Result<(), StoreError> {
        self.stats.full_syncs += 1;
        metrics::counter!("writebehind_full_syncs_total").increment(1);
        let first = self.checkpoint.position.is_none();
        self.checkpoint.generation += 1;
        self.checkpoint.full_sync_in_progress = true;
        let mut batch = Batch::default();
        batch.put_checkpoint(&self.checkpoint);
        self.store.write(batch, true)?;
        // The snapshot says what Redis holds: pending `#` ops are found in it again.
        self.store.clear_raw()?;
        self.pending.clear();
        self.full_sync = Some(FullSync {
            first,
            offset,
            key: None,
            batch: Batch::default(),
            keys_in_batch: 0,
            progress: SnapshotProgress::new(total_keys),
        });
        Ok(())
    }

    fn snapshot_event(&mut self, event: RdbEvent) -> Result<(), StoreError> {
        let generation = self.checkpoint.generation;
        let Some(sync) = self.full_sync.as_mut() else {
            return Ok(());
        };
        match event {
            RdbEvent::KeyStart {
                db,
                key,
                kind,
                expire_at_ms,
                ..
            } => {
                let db = u32::try_from(db).unwrap_or(u32::MAX);
                sync.key = self.mappings.watching(db, &key).map(|_| {
                    let mut value = if kind == ValueKind::Hash {
                        MirrorValue::hash(generation)
                    } else {
                        MirrorValue::other(generation)
                    };
                    value.expire_at_ms = expire_at_ms;
                    SnapshotKey {
                        db,
                        key,
                        value,
                        empty: false,
                    }
                });
            }
            RdbEvent::HashField(field) => {
                if let Some(current) = sync.key.as_mut() {
                    current.value.fields.insert(
                        field.field,
                        FieldValue {
                            value: field.value,
                            expire_at_ms: field.expire_at_ms,
                        },
                    );
                }
            }
            RdbEvent::KeyEnd { empty } => {
                sync.progress.key_done();
                if let Some(mut current) = sync.key.take() {
                    current.empty = empty;
                    self.snapshot_key(current)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn snapshot_key(&mut self, key: SnapshotKey) -> Result<(), StoreError> {
        let Some(mapping) = self.mappings.watching(key.db, &key.key).cloned() else {
            return Ok(());
        };
        let before = self.store.mirror(key.db, &key.key)?;
        let after = if key.empty { None } else { Some(key.value) };
        let Some(sync) = self.full_sync.as_mut() else {
            return Ok(());
        };
        let emit = !sync.first || mapping.initial_load == InitialLoad::Upsert;
        let snapshot_offset = sync.offset;
        let mut batch = std::mem::take(&mut sync.batch);
        // A `#` op not completed when the snapshot was taken (written while this service was
        // away, or lost with its completion): applied now, and completed like any other.
        let mut op_event = None;
        let mut acks = Vec::new();
        let after = match after {
            Some(v)
                if self.ops && v.kind == MirrorKind::Hash && v.fields.contains_key(OP_FIELD) =>
            {
                let (intended, event, seen) = apply_op(&mapping, key.db, &key.key, v);
                batch.put_raw(key.db, &key.key, &seen.raw);
                self.pending.insert(key.db, &key.key);
                let mut ack = seen.ack_now;
                match event {
                    Some(event) if emit => op_event = Some(event),
                    Some(event) => ack = event.op.map(|op| (op.uuid, None)),
                    None => {}
                }
                if let Some((uuid, failure)) = ack {
                    acks.push(NewAck {
                        db: key.db,
                        key: key.key.clone(),
                        uuid,
                        failure,
                        offset: snapshot_offset.0,
                    });
                }
                intended
            }
            other => other,
        };
        let event = if op_event.is_some() {
            op_event
        } else if emit {
            row_event(&mapping, &key.key, &before, &after, false)
        } else {
            None
        };
        batch.put_acks(acks);
        match &after {
            Some(value) => batch.put_mirror(key.db, &key.key, value),
            None if before.is_some() => batch.delete_mirror(key.db, &key.key),
            None => {}
        }
        if let Some(event) = event {
            self.push_unit(&mut batch, vec![event], snapshot_offset);
        }
        let Some(sync) = self.full_sync.as_mut() else {
            return Ok(());
        };
        sync.batch = batch;
        sync.keys_in_batch += 1;
        if sync.keys_in_batch >= SNAPSHOT_BATCH_KEYS {
            sync.keys_in_batch = 0;
            let mut batch = std::mem::take(&mut sync.batch);
            batch.put_checkpoint(&self.checkpoint);
            self.store.write(batch, false)?;
        }
        Ok(())
    }

    fn finish_full_sync(&mut self, position: StreamPosition) -> Result<(), StoreError> {
        let Some(mut sync) = self.full_sync.take() else {
            return Ok(());
        };
        sync.progress.finish();
        let mut batch = std::mem::take(&mut sync.batch);
        batch.put_checkpoint(&self.checkpoint);
        self.store.write(batch, false)?;
        // Sweep: what the snapshot did not contain is gone from Redis.
        let generation = self.checkpoint.generation;
        let mut after: Option<Vec<u8>> = None;
        let mut swept = 0u64;
        loop {
            let page = self
                .store
                .mirror_scan(None, after.as_deref(), SNAPSHOT_BATCH_KEYS)?;
            let Some(last) = page.last() else { break };
            after = Some(crate::buffer::mirror_key(last.0, &last.1));
            let mut batch = Batch::default();
            for (db, key, value) in page {
                if value.generation >= generation {
                    continue;
                }
                swept += 1;
                batch.delete_mirror(db, &key);
                if let Some(mapping) = self.mappings.watching(db, &key).cloned() {
                    if let Some(event) = row_event(&mapping, &key, &Some(value), &None, false) {
                        self.push_unit(&mut batch, vec![event], position.offset);
                    }
                }
            }
            batch.put_checkpoint(&self.checkpoint);
            self.store.write(batch, false)?;
        }
        let mut batch = Batch::default();
        batch.add_replid(self.checkpoint.next_seq, &position.replid, position.offset);
        self.checkpoint.position = Some(position);
        self.checkpoint.full_sync_in_progress = false;
        batch.put_checkpoint(&self.checkpoint);
        self.store.write(batch, true)?;
        let offset = self
            .checkpoint
            .position
            .as_ref()
            .map(|p| p.offset.0)
            .unwrap_or(0);
        self.health
            .buffered(offset, self.checkpoint.next_seq.checked_sub(1));
        self.committed.notify_waiters();
        // Ops found in the snapshot, and acks it queued.
        self.writeback
            .keys_touched(self.pending.keys.iter().cloned());
        self.writeback.acks_queued();
        tracing::info!(
            keys = sync.progress.keys,
            keys_per_second = sync.progress.rate(),
            swept,
            generation,
            "snapshot captured"
        );
        Ok(())
    }

    /// Records which keys still differ from the mirror (their op is to be completed in Redis;
    /// returned) and which agree again.
    fn flush_raw(
        &mut self,
        ws: &mut WorkingSet,
        raw: &mut WorkingSet,
        batch: &mut Batch,
    ) -> Result<Vec<(u32, Bytes)>, StoreError> {
        let mut to_complete = Vec::new();
        for ((db, key), value) in raw.drain() {
            let intended = ws.get(db, &key)?;
            match value {
                Some(value) if !MirrorValue::agree(&Some(value.clone()), &intended) => {
                    batch.put_raw(db, &key, &value);
                    self.pending.insert(db, &key);
                    to_complete.push((db, key));
                }
                value => {
                    if value.is_none() && intended.is_some() {
                        // Redis lost the key (an expiry) while the op's state still has it:
                        // nothing can complete it; the mirror keeps what the op gave.
                        tracing::warn!(key = %String::from_utf8_lossy(&key), "a key with a pending # op vanished from Redis");
                    }
                    if self.pending.remove(db, &key) {
                        batch.delete_raw(db, &key);
                    }
                }
            }
        }
        Ok(to_complete)
    }

    /// Appends one unit of row events to the change log in `batch`.
    fn push_unit(&mut self, batch: &mut Batch, events: Vec<RowEvent>, offset: ReplOffset) {
        let unit = self.checkpoint.next_seq;
        let count = events.len();
        for (i, event) in events.into_iter().enumerate() {
            let change = Change {
                seq: self.checkpoint.next_seq,
                unit,
                unit_end: i + 1 == count,
                offset,
                mapping: event.mapping,
                row_id: event.row_id,
                row: event.row,
                op: event.op,
            };
            let operation = if matches!(change.row, crate::buffer::RowChange::Delete) {
                "delete"
            } else {
                "upsert"
            };
            metrics::counter!("writebehind_changes_total", "mapping" => change.mapping.clone(), "operation" => operation).increment(1);
            batch.put_change(&change);
            self.checkpoint.next_seq += 1;
            self.stats.changes += 1;
        }
    }

    /// Applies one stream event; returns a reason when a full resync is needed instead.
    async fn stream_event(
        &mut self,
        ws: &mut WorkingSet,
        raw: &mut WorkingSet,
        event: &StreamEvent,
        changes: &mut Vec<(Vec<RowEvent>, ReplOffset)>,
        acks: &mut Vec<NewAck>,
    ) -> Result<Option<String>, CaptureError> {
        let Some(position) = self.checkpoint.position.clone() else {
            return Ok(None);
        };
        let commands = match event {
            StreamEvent::Command(command) => std::slice::from_ref(command),
            StreamEvent::Transaction { commands, .. } => commands.as_slice(),
            StreamEvent::Select { db, end } => {
                self.checkpoint.position = Some(StreamPosition {
                    replid: position.replid,
                    offset: *end,
                    db: *db,
                });
                return Ok(None);
            }
            _ => {
                self.checkpoint.position = Some(StreamPosition {
                    offset: event.end(),
                    ..position
                });
                return Ok(None);
            }
        };
        // A unit of the function library starts with its tag (src/ack).
        let tag = match commands.first() {
            Some(first) if self.ops => parse_tag(first).map(|tag| (first.db, tag)),
            _ => None,
        };
        let commands = if tag.is_some() {
            &commands[1..]
        } else {
            commands
        };
        let own_completion = matches!(tag, Some((_, Tag::Completion { .. })));
        let mut rows = Vec::new();
        let mut refresh = Vec::new();
        for command in commands {
            if own_completion {
                // It brings Redis to the mirror's state: only the raw state changes.
                self.apply_raw(ws, raw, command)?;
                continue;
            }
            if self.may_touch_raw(command, raw) {
                self.apply_raw(ws, raw, command)?;
            }
            let needs = self.applier(self.ops).apply(ws, command, &mut rows)?;
            if let Some(reason) = needs.full_resync {
                return Ok(Some(reason));
            }
            if let Some(name) = needs.unknown_command {
                self.stats.unknown_commands += 1;
                tracing::warn!(command = %name, "a write this service does not model touched a watched key; reading the key from the primary");
            }
            refresh.extend(needs.refresh);
            if let Some(seen) = needs.op {
                self.op_seen(raw, seen, event.end(), acks);
            }
        }
        if let Some((db, Tag::Op { op, key })) = tag {
            self.atomic_op(ws, db, op, key, &mut rows, acks, event.end())?;
        }
        for (db, key) in refresh {
            match self.refresh(db, &key, &position.replid).await {
                Ok(Some(value)) => {
                    self.stats.refreshed_keys += 1;
                    let before = ws.get(db, &key)?;
                    let mut value = value;
                    let op_mapping = self.mappings.watching(db, &key).filter(|_| {
                        self.ops
                            && value.as_ref().is_some_and(|v| {
                                v.kind == MirrorKind::Hash && v.fields.contains_key(OP_FIELD)
                            })
                    });
                    if op_mapping.is_some()
                        || raw.contains(db, &key)
                        || self.pending.contains(db, &key)
                    {
                        // What was read is what Redis holds.
                        raw.set(db, &key, value.clone())?;
                    }
                    if let (Some(mapping), Some(v)) = (op_mapping, value.clone()) {
                        // A `#` in it is applied now (without an ack: it may have been seen).
                        value = apply_op(mapping, db, &key, v).0;
                    }
                    if let Some(mapping) = self.mappings.watching(db, &key) {
                        if let Some(event) = row_event(mapping, &key, &before, &value, false) {
                            rows.push(event);
                        }
                    }
                    ws.set(db, &key, value)?;
                }
                Ok(None) => {
                    return Ok(Some(
                        "the primary's replication ID changed while reading a key".into(),
                    ))
                }
                Err(error) => {
                    return Ok(Some(format!("cannot read a key from the primary: {error}")))
                }
            }
        }
        let db = match event {
            StreamEvent::Transaction { db, .. } => *db,
            StreamEvent::Command(command) => command.db,
            _ => position.db,
        };
        if !rows.is_empty() {
            changes.push((rows, event.end()));
        }
        self.stats.units += 1;
        self.checkpoint.position = Some(StreamPosition {
            replid: position.replid,
            offset: event.end(),
            db,
        });
        Ok(None)
    }

    /// Whether `command` may touch a key whose raw state is tracked (cheap and conservative:
    /// any argument naming such a key, or a flush).
    fn may_touch_raw(
        &self,
        command: &crate::replication::stream::Command,
        raw: &WorkingSet,
    ) -> bool {
        if self.pending.is_empty() && raw.is_empty() {
            return false;
        }
        let name = command.name();
        if name == "FLUSHDB" || name == "FLUSHALL" {
            return true;
        }
        command
            .args
            .iter()
            .skip(1)
            .any(|a| self.pending.names(a) || raw.holds_name(a))
    }

    /// Applies `command` to the raw states (what Redis really holds), before the mirror sees it.
    fn apply_raw(
        &self,
        ws: &mut WorkingSet,
        raw: &mut WorkingSet,
        command: &crate::replication::stream::Command,
    ) -> Result<(), StoreError> {
        let name = command.name();
        if name == "FLUSHDB" || name == "FLUSHALL" {
            let db = (name == "FLUSHDB").then_some(command.db);
            let doomed: Vec<(u32, Bytes)> = self
                .pending
                .keys
                .iter()
                .filter(|(d, _)| db.is_none_or(|db| db == *d))
                .cloned()
                .collect();
            for (d, key) in doomed {
                raw.set(d, &key, None)?;
            }
            return Ok(());
        }
        // Every argument that may be a watched key starts from the mirror's state before this
        // command, unless its raw state differs.
        let mut dbs = vec![command.db];
        if name == "MOVE" {
            dbs.extend(
                command
                    .args
                    .get(2)
                    .and_then(|d| std::str::from_utf8(d).ok()?.parse::<u32>().ok()),
            );
        }
        if name == "COPY" {
            let db_arg = command
                .args
                .iter()
                .position(|a| a.eq_ignore_ascii_case(b"DB"));
            dbs.extend(db_arg.and_then(|i| {
                std::str::from_utf8(command.args.get(i + 1)?)
                    .ok()?
                    .parse::<u32>()
                    .ok()
            }));
        }
        for db in dbs {
            for key in command.args.iter().skip(1) {
                if self.mappings.watching(db, key).is_some() && !raw.contains(db, key) {
                    let value = match self.store.raw(db, key)? {
                        Some(value) => Some(value),
                        None => ws.get(db, key)?,
                    };
                    raw.seed(db, key, value);
                }
            }
        }
        let mut ignored = Vec::new();
        self.applier(false).apply(raw, command, &mut ignored)?;
        Ok(())
    }

    /// An applier of the current generation; `ops`: whether `#` is the op field (false for the
    /// raw states, which follow Redis exactly).
    fn applier(&self, ops: bool) -> Applier<'_> {
        Applier {
            mappings: &self.mappings,
            commands: &self.commands,
            generation: self.checkpoint.generation,
            ops,
        }
    }

    /// A `#` op written with a plain command: Redis holds `seen.raw` until the op is completed.
    fn op_seen(
        &mut self,
        raw: &mut WorkingSet,
        seen: OpSeen,
        offset: ReplOffset,
        acks: &mut Vec<NewAck>,
    ) {
        let op = seen.kind.map(|k| (k.as_char() as char).to_string());
        metrics::counter!("writebehind_ops_total", "op" => op.unwrap_or_else(|| "invalid".into()))
            .increment(1);
        // When the key's raw state was already tracked, the raw pass has applied this command.
        if !raw.contains(seen.db, &seen.key) {
            raw.seed(seen.db, &seen.key, Some(seen.raw));
        }
        if let Some((uuid, failure)) = seen.ack_now {
            acks.push(NewAck {
                db: seen.db,
                key: seen.key,
                uuid,
                failure,
                offset: offset.0,
            });
        }
    }

    /// A unit of the atomic entry point `writebehind_hset`: its commands already applied the
    /// op to Redis; the row change and the ack follow the op (design.md section 4).
    #[allow(clippy::too_many_arguments)]
    fn atomic_op(
        &mut self,
        ws: &mut WorkingSet,
        db: u32,
        op: OpField,
        key: Bytes,
        rows: &mut Vec<RowEvent>,
        acks: &mut Vec<NewAck>,
        offset: ReplOffset,
    ) -> Result<(), StoreError> {
        let Some(kind) = op.kind else {
            return Ok(());
        };
        metrics::counter!("writebehind_ops_total", "op" => (kind.as_char() as char).to_string())
            .increment(1);
        let Some(mapping) = self.mappings.watching(db, &key) else {
            // Not watched: nothing to write, acknowledged once captured.
            acks.extend(op.uuid.map(|uuid| NewAck {
                db,
                key,
                uuid,
                failure: None,
                offset: offset.0,
            }));
            return Ok(());
        };
        // The op decides the row, not the commands that carried it out.
        let row_id = mapping.row_id(&key);
        rows.retain(|e| !(e.mapping == mapping.name && e.row_id == row_id));
        let after = ws.get(db, &key)?;
        let (event, ack_now) = op_effects(mapping, db, &key, &op, &after);
        rows.extend(event);
        if let Some((uuid, failure)) = ack_now {
            acks.push(NewAck {
                db,
                key,
                uuid,
                failure,
                offset: offset.0,
            });
        }
        Ok(())
    }

    /// Reads a key from the primary together with the primary's offset (one `MULTI`), so that
    /// the stream's commands up to that offset are not applied to it again. `Ok(None)` when the
    /// primary is on another replication ID than the stream.
    async fn refresh(
        &mut self,
        db: u32,
        key: &Bytes,
        replid: &ReplId,
    ) -> Result<Option<Option<MirrorValue>>, ClientError> {
        if self.refresher.is_none() {
            self.refresher =
                Some(RedisClient::connect(&self.endpoint, Duration::from_secs(10)).await?);
        }
        let Some(client) = self.refresher.as_mut() else {
            return Ok(None);
        };
        let db_text = db.to_string();
        let replies = client
            .pipeline(&[
                &[&b"MULTI"[..]][..],
                &[&b"SELECT"[..], db_text.as_bytes()],
                &[&b"DUMP"[..], key.as_ref()],
                &[&b"PTTL"[..], key.as_ref()],
                &[&b"INFO"[..], b"replication"],
                &[&b"EXEC"[..]],
            ])
            .await;
        let replies = match replies {
            Ok(replies) => replies,
            Err(error) => {
                self.refresher = None;
                return Err(error);
            }
        };
        let bad = |message: &str| ClientError::Protocol {
            address: self.endpoint.address(),
            message: message.to_string(),
        };
        let Some(BytesFrame::Array(results)) = replies.last() else {
            return Err(bad("EXEC did not return an array"));
        };
        let [_, dump, pttl, info] = results.as_slice() else {
            return Err(bad("EXEC returned an unexpected number of replies"));
        };
        let info = crate::redis_client::frame_text(info);
        if info_field(&info, "master_replid") != Some(replid.as_str()) {
            return Ok(None);
        }
        let offset: u64 = info_field(&info, "master_repl_offset")
            .and_then(|o| o.parse().ok())
            .ok_or_else(|| bad("INFO has no master_repl_offset"))?;
        let expire_at_ms = match pttl {
            BytesFrame::Integer(ms) if *ms >= 0 => Some(now_ms() + ms),
            _ => None,
        };
        let value = match dump {
            BytesFrame::BulkString(payload) => {
                let decoded =
                    decode_dump_payload(payload).map_err(|e| bad(&format!("DUMP payload: {e}")))?;
                mirror_value_from_dump(decoded, self.checkpoint.generation, expire_at_ms)
            }
            _ => None,
        };
        // Absent at that offset: a marker entry (no row) records the offset, so that the
        // stream's commands up to it are not replayed onto the absent key.
        let mut value = value.unwrap_or_else(|| MirrorValue::other(self.checkpoint.generation));
        value.refreshed_through = offset;
        let value = Some(value);
        Ok(Some(value))
    }

    fn commit(
        &mut self,
        ws: &mut WorkingSet,
        raw: &mut WorkingSet,
        changes: Vec<(Vec<RowEvent>, ReplOffset)>,
        acks: Vec<NewAck>,
    ) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        let acks_queued = !acks.is_empty();
        let to_complete = self.flush_raw(ws, raw, &mut batch)?;
        ws.flush_into(&mut batch);
        let first_seq = self.checkpoint.next_seq;
        for (rows, offset) in changes {
            self.push_unit(&mut batch, rows, offset);
        }
        batch.put_acks(acks);
        batch.put_checkpoint(&self.checkpoint);
        self.store.write(batch, true)?;
        if !to_complete.is_empty() {
            self.writeback.keys_touched(to_complete);
        } else if acks_queued {
            self.writeback.acks_queued();
        }
        self.stats.commits += 1;
        let offset = self
            .checkpoint
            .position
            .as_ref()
            .map(|p| p.offset.0)
            .unwrap_or(0);
        let last_seq = (self.checkpoint.next_seq > first_seq).then(|| self.checkpoint.next_seq - 1);
        self.health.buffered(offset, last_seq);
        self.committed.notify_waiters();
        Ok(())
    }
}
