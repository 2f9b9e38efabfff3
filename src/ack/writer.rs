//! The write-back task: loads the function library into the primary, completes pending `#` ops
//! and writes queued acknowledgements, both in one pipeline per round (an ack then never waits
//! for the answer to the round's completions).
//!
//! Capture reports the keys whose raw state it wrote ([`super::Writeback`]); at start every key
//! with a raw state is a candidate. Acks are read on from the last id written. Neither needs a
//! scan of the buffer per round (deleted entries would be walked over again and again).
//!
//! It follows the primary the way the replication link does (the same discovery), so after a
//! failover completions and acks go to the new primary. The library is checked on every
//! connection (`writebehind_version`) and loaded with `FUNCTION LOAD REPLACE` when missing or
//! older. A primary without functions (Redis < 7.0), or a user not allowed to load them, stops
//! the service with one line saying so (or set `[acks] enabled = false`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Writeback, LIBRARY, LIBRARY_VERSION};
use crate::backoff::Backoff;
use crate::buffer::{Batch, MirrorKind, MirrorValue, Store};
use crate::config::RedisEndpoint;
use crate::redis_client::{ClientError, RedisClient};
use crate::replication::discovery::Discovery;
use crate::replication::LinkError;
use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;

/// Most completions and acks sent in one pipeline.
const PIPELINE: usize = 1_000;
/// A completion refused (the key changed) is retried when capture has seen a new raw state, or
/// after this long.
const RETRY_UNCHANGED: Duration = Duration::from_secs(1);

/// Why a round of write-back failed; [`WriterError::is_transient`] decides whether the task
/// retries (with backoff) or stops the service.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// Redis unreachable or the connection lost.
    #[error(transparent)]
    Redis(#[from] ClientError),
    /// No primary found (discovery).
    #[error(transparent)]
    Discovery(#[from] LinkError),
    /// The server refuses writes for now (read-only or loading during a failover, the library
    /// gone after a `FUNCTION FLUSH`).
    #[error("Redis at {address} refused a write: {message}")]
    Refused { address: String, message: String },
    #[error("Redis at {address}: FUNCTION LOAD: {message}")]
    LibraryLoad { address: String, message: String },
    #[error("Redis at {address} has no functions (FUNCTION LOAD: {message}): the # op field and acknowledgements need Redis 7.0 or later; upgrade, or set [acks] enabled = false")]
    NoFunctions { address: String, message: String },
    #[error("Redis at {address} refused FUNCTION LOAD ({message}): grant the service's user +function|load +fcall, or set [acks] enabled = false")]
    NotPermitted { address: String, message: String },
    #[error(transparent)]
    Store(#[from] crate::buffer::StoreError),
}

impl WriterError {
    /// Whether trying again later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            WriterError::Redis(_)
                | WriterError::Discovery(_)
                | WriterError::Refused { .. }
                | WriterError::LibraryLoad { .. }
        )
    }
}

/// A completion sent: its key, the raw state it was sent for, and its nonce.
type Completion = (u32, Bytes, MirrorValue, Bytes);

/// The completions of one round, sent in the same pipeline as its acks.
#[derive(Default)]
struct Completions {
    commands: Vec<Vec<Bytes>>,
    /// Per command, its completion (`None` for a `SELECT`).
    keys: Vec<Option<Completion>>,
}

struct Connection {
    client: RedisClient,
    /// The primary's endpoint (credentials and TLS for the nodes a cluster redirects to).
    endpoint: RedisEndpoint,
    db: u32,
    /// In a cluster, the other nodes commands are redirected to (`redirect.rs`).
    redirects: super::redirect::Redirects,
}

pub struct Writer {
    store: Arc<Store>,
    discovery: Discovery,
    writeback: Arc<Writeback>,
    expire_secs: u64,
    health: Arc<crate::metrics::Health>,
    connection: Option<Connection>,
    /// Keys that may have an op to complete: all pending ones at start, then those capture
    /// reports; a key leaves when it has no raw state any more.
    candidates: HashSet<(u32, Bytes)>,
    /// Completions sent for a raw state, and when: not sent again for the same state soon.
    attempted: HashMap<(u32, Bytes), (MirrorValue, Instant)>,
    /// Acks below this id are written (and deleted): reading starts here.
    next_ack: u64,
}

impl Writer {
    pub fn new(
        store: Arc<Store>,
        discovery: Discovery,
        writeback: Arc<Writeback>,
        expire_secs: u64,
        health: Arc<crate::metrics::Health>,
    ) -> Result<Writer, crate::buffer::StoreError> {
        let candidates = store.raw_keys()?.into_iter().collect();
        Ok(Writer {
            store,
            discovery,
            writeback,
            expire_secs,
            health,
            connection: None,
            candidates,
            attempted: HashMap::new(),
            next_ack: 0,
        })
    }

    /// Runs until `stop` resolves or a fatal error.
    pub async fn run(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), WriterError> {
        tokio::pin!(stop);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let wait = match self.round().await {
                Ok(more) => {
                    backoff.reset();
                    if more {
                        Duration::ZERO
                    } else {
                        Duration::from_millis(500)
                    }
                }
                Err(error) if !error.is_transient() => return Err(error),
                Err(error) => {
                    self.connection = None;
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "writing acknowledgements to Redis failed; retrying");
                    metrics::counter!("writebehind_writeback_errors_total").increment(1);
                    delay
                }
            };
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                _ = self.writeback.woken() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = &mut stop => {
                    // Write what is queued, once, then stop.
                    let _ = self.round().await;
                    return Ok(());
                }
            }
        }
    }

    /// One round: completions, then acks. Returns whether more work is waiting.
    pub async fn round(&mut self) -> Result<bool, WriterError> {
        // Connected (and the library checked) from the start, not at the first op: a primary
        // without functions is refused at once.
        self.connect().await?;
        self.candidates.extend(self.writeback.take_touched());
        let now = Instant::now();
        let mut pending = Vec::new();
        let mut gone = Vec::new();
        for (db, key) in &self.candidates {
            if pending.len() == PIPELINE {
                break;
            }
            let Some((raw, intended)) = self.store.pending_completion(*db, key)? else {
                // Completed (or read while capture moved it: then it is reported again).
                gone.push((*db, key.clone()));
                continue;
            };
            // Sent for this very state a moment ago: wait for capture to see its effect or the
            // client's newer write.
            let tried = self.attempted.get(&(*db, key.clone()));
            if tried.is_some_and(|(state, at)| {
                *state == raw && now.duration_since(*at) < RETRY_UNCHANGED
            }) {
                continue;
            }
            pending.push((*db, key.clone(), raw, intended));
        }
        for key in &gone {
            self.candidates.remove(key);
            self.attempted.remove(key);
        }
        if !self.store.raw_states_synced() {
            // A raw state read above may not be on disk yet (`buffer/durability.rs`): no
            // completion from it. Its batch's publication, after the sync, wakes this task.
            pending.clear();
        }
        let acks = self.store.acks(self.next_ack, PIPELINE)?;
        if pending.is_empty() && acks.is_empty() {
            self.health.acks_pending(None);
            return Ok(false);
        }
        // Both in one pipeline: an ack does not wait for the completions' answer.
        let mut db_now = self.connection.as_ref().map(|c| c.db).unwrap_or(0);
        let completed = pending.len();
        let completions = self.completion_commands(pending, &mut db_now);
        let (ack_commands, ack_index) = self.ack_commands(&acks, &mut db_now);
        let mut commands = completions.commands;
        let split = commands.len();
        commands.extend(ack_commands);
        let mut replies = Vec::new();
        if !commands.is_empty() {
            replies = match self.pipeline(&commands, db_now).await {
                Ok(replies) => replies,
                Err(error) => {
                    // Unknown whether they ran: forgotten (one that did is then taken for a
                    // client write, which brings Redis to the state the mirror holds:
                    // harmless). The acks stay queued.
                    for (db, key, _, nonce) in completions.keys.iter().flatten() {
                        self.writeback.withdraw(*db, key, nonce);
                    }
                    return Err(error);
                }
            };
        }
        let ack_replies = replies.split_off(split.min(replies.len()));
        self.completion_replies(replies, completions.keys);
        let written = self.ack_replies(ack_replies, &ack_index, &acks)?;
        if let Some(last) = acks.last() {
            self.next_ack = last.id + 1;
        }
        let remaining = self.store.acks(self.next_ack, 1)?;
        self.health
            .acks_pending(remaining.first().map(|a| a.offset).filter(|o| o.0 > 0));
        Ok(written == PIPELINE || completed == PIPELINE)
    }

    async fn connect(&mut self) -> Result<(), WriterError> {
        if self.connection.is_some() {
            return Ok(());
        }
        let endpoint = self.discovery.primary(Duration::from_secs(5)).await?;
        let client = RedisClient::connect(&endpoint, Duration::from_secs(10)).await?;
        let mut connection = Connection {
            client,
            endpoint: endpoint.clone(),
            db: 0,
            redirects: Default::default(),
        };
        ensure_library(&mut connection.client, &endpoint).await?;
        self.connection = Some(connection);
        Ok(())
    }

    /// The `writebehind_complete` calls for `pending` (each nonce registered before it is
    /// sent: capture may see its effect before the reply), from database `db_now` on.
    fn completion_commands(
        &mut self,
        pending: Vec<(u32, Bytes, MirrorValue, Option<MirrorValue>)>,
        db_now: &mut u32,
    ) -> Completions {
        let mut completions = Completions::default();
        for (db, key, raw, intended) in pending {
            if raw.kind != MirrorKind::Hash
                || intended
                    .as_ref()
                    .is_some_and(|i| i.kind != MirrorKind::Hash)
            {
                continue;
            }
            if db != *db_now {
                completions.commands.push(vec![
                    Bytes::from_static(b"SELECT"),
                    Bytes::from(db.to_string()),
                ]);
                completions.keys.push(None);
                *db_now = db;
            }
            let nonce = Bytes::from(uuid::Uuid::new_v4().simple().to_string());
            self.writeback.issue(db, key.clone(), nonce.clone());
            completions
                .commands
                .push(completion_command(&key, &raw, intended.as_ref(), &nonce));
            completions.keys.push(Some((db, key, raw, nonce)));
        }
        completions
    }

    /// Records what each completion's reply says.
    fn completion_replies(&mut self, replies: Vec<BytesFrame>, keys: Vec<Option<Completion>>) {
        let now = Instant::now();
        for (reply, key) in replies.into_iter().zip(keys) {
            let Some((db, key, raw, nonce)) = key else {
                continue;
            };
            if reply != BytesFrame::Integer(1) {
                // Nothing was written, so no tag will come.
                self.writeback.withdraw(db, &key, &nonce);
            }
            let result = match reply {
                BytesFrame::Integer(1) => "done",
                BytesFrame::Integer(_) => "changed",
                BytesFrame::Error(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(&key), error = %e, "completing a # op failed");
                    "error"
                }
                _ => "error",
            };
            metrics::counter!("writebehind_completions_total", "result" => result).increment(1);
            self.attempted.insert((db, key), (raw, now));
        }
    }

    /// The `writebehind_ack` calls for `acks`, from database `db_now` on; with each command,
    /// the index of its ack (`None` for a `SELECT`).
    fn ack_commands(
        &self,
        acks: &[crate::buffer::AckRecord],
        db_now: &mut u32,
    ) -> (Vec<Vec<Bytes>>, Vec<Option<usize>>) {
        let mut commands: Vec<Vec<Bytes>> = Vec::with_capacity(acks.len() + 4);
        let mut index = Vec::with_capacity(acks.len() + 4);
        let expire = Bytes::from(self.expire_secs.to_string());
        for (i, ack) in acks.iter().enumerate() {
            if ack.db != *db_now {
                commands.push(vec![
                    Bytes::from_static(b"SELECT"),
                    Bytes::from(ack.db.to_string()),
                ]);
                index.push(None);
                *db_now = ack.db;
            }
            let mut command = vec![
                Bytes::from_static(b"FCALL"),
                Bytes::from_static(b"writebehind_ack"),
                Bytes::from_static(b"1"),
                Bytes::from(ack.stream_key()),
                expire.clone(),
            ];
            match &ack.failure {
                None => command.push(Bytes::from_static(b"done")),
                Some(reason) => {
                    command.push(Bytes::from_static(b"failed"));
                    command.push(Bytes::from(reason.clone()));
                }
            }
            commands.push(command);
            index.push(Some(i));
        }
        (commands, index)
    }

    /// Removes from the queue the acks whose replies say they are written (or can never be).
    fn ack_replies(
        &mut self,
        replies: Vec<BytesFrame>,
        index: &[Option<usize>],
        acks: &[crate::buffer::AckRecord],
    ) -> Result<usize, WriterError> {
        if acks.is_empty() {
            return Ok(0);
        }
        let mut batch = Batch::default();
        let mut retry = None;
        for (reply, i) in replies.into_iter().zip(index) {
            let Some(ack) = i.and_then(|i| acks.get(i)) else {
                continue;
            };
            let status = match reply {
                // The stream key holds another type: no retry can write it. Dropped, so that it
                // does not block the queue, logged and counted.
                BytesFrame::Error(e) if e.starts_with("WRONGTYPE") => {
                    tracing::warn!(stream = %String::from_utf8_lossy(&ack.stream_key()), error = %e, "an acknowledgement cannot be written (the key is not a stream); dropped");
                    "refused"
                }
                // Anything else (-OOM, -BUSY, -NOREPLICAS, -MASTERDOWN, NOPERM, ...) may pass
                // later: the ack stays queued and the round is retried with backoff.
                BytesFrame::Error(e) => {
                    retry.get_or_insert(e);
                    continue;
                }
                _ if ack.failure.is_some() => "failed",
                _ => "done",
            };
            metrics::counter!("writebehind_acks_total", "status" => status).increment(1);
            batch.delete_ack(ack.id);
        }
        self.store.write(batch, false)?;
        match retry {
            Some(message) => Err(WriterError::Refused {
                address: self
                    .connection
                    .as_ref()
                    .map(|c| c.client.address().to_string())
                    .unwrap_or_default(),
                message: message.to_string(),
            }),
            None => Ok(acks.len()),
        }
    }

    async fn pipeline(
        &mut self,
        commands: &[Vec<Bytes>],
        db_after: u32,
    ) -> Result<Vec<BytesFrame>, WriterError> {
        let connection = self
            .connection
            .as_mut()
            .ok_or_else(|| WriterError::Refused {
                address: String::new(),
                message: "not connected".into(),
            })?;
        let refs: Vec<&[Bytes]> = commands.iter().map(|c| c.as_slice()).collect();
        let mut replies = connection.client.pipeline(&refs).await?;
        connection.db = db_after;
        connection
            .redirects
            .follow(&connection.endpoint, commands, &mut replies)
            .await?;
        // A read-only or loading server (a failover in progress) refuses everything: reconnect.
        if let Some(BytesFrame::Error(e)) = replies.iter().find(|r| {
            matches!(r, BytesFrame::Error(e) if e.starts_with("READONLY") || e.starts_with("LOADING") || e.starts_with("NOSCRIPT") || e.contains("Function not found"))
        }) {
            return Err(WriterError::Refused {
                address: connection.client.address().to_string(),
                message: e.to_string(),
            });
        }
        Ok(replies)
    }
}

/// `FCALL writebehind_complete 1 key n_raw raw... n_target target... persist nonce`.
fn completion_command(
    key: &Bytes,
    raw: &MirrorValue,
    intended: Option<&MirrorValue>,
    nonce: &Bytes,
) -> Vec<Bytes> {
    let mut command = vec![
        Bytes::from_static(b"FCALL"),
        Bytes::from_static(b"writebehind_complete"),
        Bytes::from_static(b"1"),
        key.clone(),
        Bytes::from(raw.fields.len().to_string()),
    ];
    for (field, value) in &raw.fields {
        command.push(field.clone());
        command.push(value.value.clone());
    }
    let target = intended.map(|i| &i.fields);
    command.push(Bytes::from(target.map_or(0, |t| t.len()).to_string()));
    for (field, value) in target.into_iter().flatten() {
        command.push(field.clone());
        command.push(value.value.clone());
    }
    // The key lost its TTL with the op (`-`, `~`), and nothing set one since.
    let persist = raw.expire_at_ms.is_some() && intended.is_some_and(|i| i.expire_at_ms.is_none());
    command.push(Bytes::from_static(if persist { b"1" } else { b"0" }));
    command.push(nonce.clone());
    command
}

/// Loads (or upgrades) the library unless the server has this version or a newer one.
pub async fn ensure_library(
    client: &mut RedisClient,
    endpoint: &RedisEndpoint,
) -> Result<(), WriterError> {
    let loaded = match client.command(&["FCALL", "writebehind_version", "0"]).await {
        Ok(BytesFrame::Integer(version)) => Some(version),
        Ok(_) => None,
        Err(ClientError::Reply { .. }) => None,
        Err(other) => return Err(other.into()),
    };
    if loaded.is_some_and(|v| v >= LIBRARY_VERSION) {
        return Ok(());
    }
    match client
        .command(&["FUNCTION", "LOAD", "REPLACE", LIBRARY])
        .await
    {
        Ok(_) => {
            tracing::info!(primary = %endpoint.address(), version = LIBRARY_VERSION, previous = ?loaded, "function library `writebehind` loaded");
            Ok(())
        }
        Err(ClientError::Reply { message, .. }) => {
            let address = endpoint.address();
            if message.contains("unknown command") {
                Err(WriterError::NoFunctions { address, message })
            } else if message.starts_with("NOPERM") {
                Err(WriterError::NotPermitted { address, message })
            } else {
                Err(WriterError::LibraryLoad { address, message })
            }
        }
        Err(other) => Err(other.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::FieldValue;

    fn hash(fields: &[(&str, &str)], expire: Option<i64>) -> MirrorValue {
        let mut v = MirrorValue::hash(1);
        v.expire_at_ms = expire;
        for (f, x) in fields {
            v.fields.insert(
                Bytes::copy_from_slice(f.as_bytes()),
                FieldValue {
                    value: Bytes::copy_from_slice(x.as_bytes()),
                    expire_at_ms: None,
                },
            );
        }
        v
    }

    #[test]
    fn a_completion_names_raw_and_target_fields_and_the_ttl() {
        let raw = hash(&[("#", "-"), ("a", "1"), ("b", "2")], Some(5));
        let target = hash(&[("b", "2")], None);
        let nonce = Bytes::from("n0");
        let command = completion_command(&Bytes::from("k"), &raw, Some(&target), &nonce);
        let text: Vec<&[u8]> = command.iter().map(|b| b.as_ref()).collect();
        assert_eq!(
            text,
            vec![
                &b"FCALL"[..],
                b"writebehind_complete",
                b"1",
                b"k",
                b"3",
                b"#",
                b"-",
                b"a",
                b"1",
                b"b",
                b"2",
                b"1",
                b"b",
                b"2",
                b"1",
                b"n0"
            ]
        );
        let gone = completion_command(&Bytes::from("k"), &raw, None, &nonce);
        assert_eq!(gone[gone.len() - 3].as_ref(), b"0");
        assert_eq!(gone[gone.len() - 2].as_ref(), b"0");
        assert_eq!(gone[gone.len() - 1].as_ref(), b"n0");
    }
}
