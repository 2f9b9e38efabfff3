//! Attaching to a Redis primary as a replica.
//!
//! # Protocol
//!
//! The handshake is what a real replica sends (`syncWithMaster`): `PING`, `AUTH [user] pass`,
//! `REPLCONF listening-port <port>` (a port where nothing answers, so that Sentinel never
//! considers us promotable), `REPLCONF capa eof capa psync2`, `REPLCONF version 9.2.0`, then
//! `PSYNC <replid> <offset+1>` to continue after a known position, or `PSYNC ? -1`. Bare `\n`
//! keepalives may precede any reply. The primary answers:
//!
//! A primary that refuses a `REPLCONF` (Redis answers `-ERR Unrecognized REPLCONF option` to
//! `version`) still serves `PSYNC`: the refusal is logged, never fatal. `version` is Valkey's
//! (8.0+): a Valkey primary picks the snapshot format from the version its replica announces
//! (`replicaRdbVersion`, `RDB_VERSION_MAP` in its sources), RDB 11 for a replica that announces
//! none, which cannot hold a hash with field TTLs, so such a full sync aborts (and 80 for 9.0
//! and 9.1, which cannot hold 9.2's path hashes). 9.2.0 announces the newest format the decoder
//! reads (`VALKEY081`, [`rdb`]); raise it with the decoder.
//!
//! - `+FULLRESYNC <replid> <offset>`: a snapshot follows, framed as `$<len>\r\n` + exactly
//!   `len` bytes (disk-based sync; no CRLF after it) or as `$EOF:<40 chars>\r\n` + the RDB + the
//!   same 40 chars (diskless). It is received into the snapshot spool ([`spool`]) and decoded
//!   from there ([`rdb`]). A diskless primary sends no command until our first `REPLCONF ACK`
//!   after it considers the snapshot sent, which the spooler sends as soon as it has arrived.
//! - `+CONTINUE [<replid>]`: the command stream continues right after our offset; a different
//!   replid means the history moved to a promoted replica.
//! - `-LOADING` / `-NOMASTERLINK`: transient; we retry with backoff.
//! - any other error: fatal. We never fall back to `SYNC`, which gives no position to resume.
//!
//! Then the command stream ([`stream`]): every byte counts toward the offset. We answer
//! `REPLCONF GETACK *` and send `REPLCONF ACK <offset>` every second with the position the
//! caller acknowledged (for the service: what is durably captured, so that `WAIT` means it).
//!
//! [`Replicator`] wraps one link (`link.rs`) at a time and reconnects with exponential backoff and
//! jitter when it drops, resuming from the position the caller hands back.

mod ack_task;
mod behind;
pub mod discovery;
mod frame;
mod link;
pub mod rdb;
mod socket;
mod spool;
pub mod stream;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::config::RedisEndpoint;
use crate::position::{DurableOffset, ReplId, ReplOffset, StreamPosition};
use discovery::Discovery;
use link::Link;
use rdb::RdbEvent;
use stream::StreamEvent;

/// How the snapshot was framed on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SnapshotFraming {
    Length(u64),
    EofMark(Vec<u8>),
}

impl SnapshotFraming {
    fn describe(&self) -> Framing {
        match self {
            SnapshotFraming::Length(len) => Framing::Length(*len),
            SnapshotFraming::EofMark(_) => Framing::Diskless,
        }
    }
}

/// The framing of a snapshot, as reported to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Disk-based: `$<len>`.
    Length(u64),
    /// Diskless: `$EOF:<mark>`.
    Diskless,
}

/// What the replication link delivers, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationEvent {
    /// A full synchronisation begins: the snapshot's events follow. Whatever the caller held
    /// from before is superseded by the snapshot.
    FullSyncStarted {
        replid: ReplId,
        offset: ReplOffset,
        framing: Framing,
    },
    /// One element of the snapshot.
    Snapshot(RdbEvent),
    /// The snapshot is complete; the command stream continues after `position`.
    FullSyncCompleted {
        position: StreamPosition,
        rdb_bytes: u64,
    },
    /// The primary accepted a partial resynchronisation from `position`. `previous_replid` is
    /// set when the replid changed (a failover): persist the new one.
    Continued {
        position: StreamPosition,
        previous_replid: Option<ReplId>,
    },
    /// An event of the command stream.
    Stream(StreamEvent),
    /// The link failed; the next call reconnects after `retry_in`, from the position set with
    /// [`Replicator::resume_from`] (by default: after the last event delivered).
    Disconnected {
        error: LinkError,
        retry_in: Duration,
    },
}

/// Why a link ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("Redis primary {address}: {message}")]
    Io { address: String, message: String },
    #[error("Redis primary {address} was silent for {seconds} s")]
    Timeout { address: String, seconds: u64 },
    #[error("Redis primary {address} is not ready to serve replicas: {message}")]
    NotReady { address: String, message: String },
    #[error("Redis primary {address} refused the handshake: {message}")]
    Refused { address: String, message: String },
    #[error("Redis primary {address} sent something unexpected: {message}")]
    Protocol { address: String, message: String },
    #[error("snapshot from {address} is unusable, the sync restarts: {message}")]
    Snapshot { address: String, message: String },
    /// Retrying cannot help: wrong credentials, missing permission, PSYNC refused.
    #[error("Redis primary {address}: {message}")]
    Fatal { address: String, message: String },
}

impl LinkError {
    pub fn is_fatal(&self) -> bool {
        matches!(self, LinkError::Fatal { .. })
    }

    /// The metric label of the error's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            LinkError::Io { .. } => "io",
            LinkError::Timeout { .. } => "timeout",
            LinkError::NotReady { .. } => "not_ready",
            LinkError::Refused { .. } => "refused",
            LinkError::Protocol { .. } => "protocol",
            LinkError::Snapshot { .. } => "snapshot",
            LinkError::Fatal { .. } => "fatal",
        }
    }
}

/// Settings of the replica side.
#[derive(Debug, Clone)]
pub struct ReplicatorOptions {
    /// Where the primary is (a fixed address, a list of nodes, or Sentinel).
    pub discovery: Discovery,
    /// Announced with `REPLCONF listening-port`; nothing must answer there.
    pub announce_port: u16,
    /// Silence after which the link is considered dead (a real replica's `repl-timeout`).
    pub timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Where full syncs are spooled (a directory per link inside; see `spool.rs`). The
    /// service uses `<buffer path>/spool`; by default the system's temporary directory.
    pub spool_dir: PathBuf,
    /// The most bytes of the command stream spooled and not yet read when capture falls behind
    /// (see `spool.rs`; 0: never spooled, the primary holds the lag).
    pub stream_spool_bytes: u64,
    /// Set while the primary has accepted a full sync but not started sending the snapshot for
    /// over a second (it waits `repl-diskless-sync-delay`, or saves its RDB first): shown by
    /// `/status`, which otherwise only sees a link that is down.
    pub waiting_for_snapshot: Arc<AtomicBool>,
    /// Bytes received into the spool and not yet read by capture (shown by `/status`).
    pub spooled: Arc<AtomicU64>,
}

impl ReplicatorOptions {
    pub fn new(endpoint: RedisEndpoint) -> Self {
        Self::with_discovery(Discovery::Fixed(endpoint))
    }

    pub fn with_discovery(discovery: Discovery) -> Self {
        ReplicatorOptions {
            discovery,
            announce_port: 1,
            timeout: Duration::from_secs(60),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            spool_dir: std::env::temp_dir(),
            stream_spool_bytes: 1 << 30,
            waiting_for_snapshot: Arc::new(AtomicBool::new(false)),
            spooled: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// A replica's view of one primary, across reconnections.
pub struct Replicator {
    options: ReplicatorOptions,
    link: Option<Link>,
    /// Where the next `PSYNC` continues from.
    resume: Option<StreamPosition>,
    /// The offset reported by `REPLCONF ACK`, set by the caller.
    durable: DurableOffset,
    backoff: Backoff,
    retry_at: Option<tokio::time::Instant>,
    /// An event produced by `try_next_buffered` (a failure) for the next `next` call.
    pending: Option<ReplicationEvent>,
    /// The primary of the current (or last) link.
    primary: Option<RedisEndpoint>,
    /// Notified when Sentinel announces a new primary.
    switched: Arc<tokio::sync::Notify>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Replicator {
    fn drop(&mut self) {
        for watcher in &self.watchers {
            watcher.abort();
        }
    }
}

impl Replicator {
    /// A replicator that starts with a full sync (`resume` None) or continues after `resume`.
    pub fn new(options: ReplicatorOptions, resume: Option<StreamPosition>) -> Self {
        Replicator {
            backoff: Backoff::new(options.backoff_min, options.backoff_max),
            options,
            link: None,
            resume,
            durable: DurableOffset::default(),
            retry_at: None,
            pending: None,
            primary: None,
            switched: Arc::new(tokio::sync::Notify::new()),
            watchers: Vec::new(),
        }
    }

    /// Sets where the next connection resumes (`None`: full sync). Call it after
    /// `Disconnected` to resume from the caller's own durable position.
    pub fn resume_from(&mut self, position: Option<StreamPosition>) {
        self.resume = position;
    }

    /// The primary of the current (or last) link.
    pub fn primary(&self) -> Option<&RedisEndpoint> {
        self.primary.as_ref()
    }

    /// The position after the last event delivered at a command boundary.
    pub fn position(&self) -> Option<&StreamPosition> {
        self.resume.as_ref()
    }

    /// Everything up to `offset` is durable: the next `REPLCONF ACK` reports it (it never
    /// goes back on one link).
    pub fn report_durable(&self, offset: ReplOffset) {
        self.durable.advance(offset);
    }

    /// The durable offset, to advance from another task (the one that makes changes durable).
    pub fn durable_offset(&self) -> DurableOffset {
        self.durable.clone()
    }

    /// Sends `REPLCONF ACK` with the durable offset now (a last report before stopping).
    pub async fn send_durable_offset(&self) {
        if let Some(link) = &self.link {
            link.send_durable_offset().await;
        }
    }

    /// Drops the current link (the next call reconnects at once), and a failure of it met by
    /// `try_next_*` and not yet reported: the caller has decided how the next link starts
    /// ([`Replicator::resume_from`]: a full sync after a resync), and a `Disconnected` it then
    /// received first would make it resume from its checkpoint instead. Capture reads events
    /// ahead of what it applies, so it can decide on a resync after such a failure.
    pub fn disconnect(&mut self) {
        self.link = None;
        if let Some(ReplicationEvent::Disconnected { error, .. }) = self.pending.take() {
            tracing::warn!(%error, "replication link lost while it was being dropped");
        }
    }

    /// The next event. `Err` only for fatal errors (authentication, permission, PSYNC refused);
    /// everything else is reported as `Disconnected` and retried on the next call.
    pub async fn next(&mut self) -> Result<ReplicationEvent, LinkError> {
        if let Some(event) = self.pending.take() {
            return Ok(event);
        }
        let Some(link) = self.link.as_mut() else {
            return self.connect().await;
        };
        let switched = self.switched.clone();
        let next = tokio::select! {
            next = link.next() => next,
            _ = switched.notified() => Err(LinkError::Io {
                address: self.primary.as_ref().map(RedisEndpoint::address).unwrap_or_default(),
                message: "Sentinel announced a new primary".into(),
            }),
        };
        let Some(link) = self.link.as_mut() else {
            return self.connect().await;
        };
        match next {
            Ok(event) => {
                match &event {
                    ReplicationEvent::FullSyncCompleted { position, .. } => {
                        self.resume = Some(position.clone())
                    }
                    ReplicationEvent::Stream(stream_event) => {
                        if let Some((replid, db)) = link.stream_state() {
                            self.resume = Some(StreamPosition {
                                replid,
                                offset: stream_event.end(),
                                db,
                            });
                        }
                    }
                    _ => {}
                }
                Ok(event)
            }
            Err(error) => {
                self.link = None;
                self.failed(error)
            }
        }
    }

    /// The next snapshot event if it is already buffered, without waiting for the socket: a
    /// snapshot is millions of small events, and each through [`Replicator::next`] cost a
    /// third of capture's thread in a full sync (its `select!` and wake-ups). `None` when more
    /// input is needed, at the snapshot's end and on an error, which `next` then reports.
    pub fn try_next_snapshot(&mut self) -> Option<RdbEvent> {
        if self.pending.is_some() {
            return None;
        }
        let link = self.link.as_mut()?;
        match link.try_next_snapshot() {
            Ok(event) => event,
            Err(error) => {
                self.link = None;
                self.pending = Some(match self.failed(error) {
                    Ok(event) => event,
                    Err(fatal) => ReplicationEvent::Disconnected {
                        error: fatal,
                        retry_in: Duration::ZERO,
                    },
                });
                None
            }
        }
    }

    /// The next command-stream event if it is already buffered, without waiting for the
    /// socket: lets a consumer apply everything that arrived together and commit it at once.
    pub fn try_next_buffered(&mut self) -> Option<StreamEvent> {
        if self.pending.is_some() {
            return None;
        }
        let link = self.link.as_mut()?;
        match link.try_next_stream() {
            Ok(Some(event)) => {
                if let Some((replid, db)) = link.stream_state() {
                    self.resume = Some(StreamPosition {
                        replid,
                        offset: event.end(),
                        db,
                    });
                }
                Some(event)
            }
            Ok(None) => None,
            Err(error) => {
                self.link = None;
                match self.failed(error) {
                    Ok(event) => self.pending = Some(event),
                    Err(fatal) => {
                        self.pending = Some(ReplicationEvent::Disconnected {
                            error: fatal,
                            retry_in: Duration::ZERO,
                        })
                    }
                }
                None
            }
        }
    }

    async fn connect(&mut self) -> Result<ReplicationEvent, LinkError> {
        if self.watchers.is_empty() {
            self.watchers = self.options.discovery.watch_switches(self.switched.clone());
        }
        if let Some(at) = self.retry_at.take() {
            // A new primary announced by Sentinel ends the backoff at once.
            let switched = self.switched.clone();
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = switched.notified() => self.backoff.reset(),
            }
        }
        let endpoint = match self.options.discovery.primary(self.options.timeout).await {
            Ok(endpoint) => endpoint,
            Err(error) => return self.failed(error),
        };
        if self
            .primary
            .as_ref()
            .is_some_and(|p| p.address() != endpoint.address())
        {
            tracing::info!(primary = %endpoint.address(), "following a new primary");
        }
        self.primary = Some(endpoint.clone());
        match Link::connect(
            &self.options,
            &endpoint,
            self.resume.as_ref(),
            self.durable.clone(),
        )
        .await
        {
            Ok((link, event)) => {
                self.link = Some(link);
                self.backoff.reset();
                if let ReplicationEvent::Continued { position, .. } = &event {
                    self.resume = Some(position.clone());
                }
                Ok(event)
            }
            Err(error) => self.failed(error),
        }
    }

    fn failed(&mut self, error: LinkError) -> Result<ReplicationEvent, LinkError> {
        if error.is_fatal() {
            return Err(error);
        }
        let retry_in = self.backoff.next_delay();
        self.retry_at = Some(tokio::time::Instant::now() + retry_in);
        Ok(ReplicationEvent::Disconnected { error, retry_in })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resync decided after the link failed (what was read before the failure is applied
    /// first) still starts the next link with a full sync.
    #[test]
    fn a_deliberate_disconnect_supersedes_a_failure_not_yet_reported() {
        let endpoint = RedisEndpoint::parse("redis://127.0.0.1:1").unwrap();
        let mut replicator = Replicator::new(ReplicatorOptions::new(endpoint), None);
        replicator.pending = Some(ReplicationEvent::Disconnected {
            error: LinkError::Io {
                address: "127.0.0.1:1".into(),
                message: "reset".into(),
            },
            retry_in: Duration::ZERO,
        });
        replicator.resume_from(None);
        replicator.disconnect();
        assert!(replicator.pending.is_none());
        assert!(replicator.resume.is_none());
    }
}
