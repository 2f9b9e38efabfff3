//! What capture reads from the primary over an ordinary connection, beside the replication
//! link: the command table (to classify writes it does not model), the key count (for the
//! snapshot's progress) and single keys (*refresh*).
//!
//! # Refresh
//!
//! A watched key whose content this service cannot derive (a `RENAME` from an unwatched key, a
//! write it does not model) is read with one `MULTI`: `SELECT db`, `DUMP key`, `PTTL key`,
//! `INFO replication`, `EXEC`. The primary's offset in the same transaction says which commands
//! of the stream the value already contains: it is stored as the value's `refreshed_through`,
//! and commands ending at or before it are not applied to the key again. A key absent at that
//! offset is stored as a marker entry (no row) for the same reason. When the primary is on
//! another replication ID than the stream, the value cannot be placed in the stream: `None`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;

use super::clock::{ClockSample, Skew};
use super::command_table::CommandTable;
use super::rows::mirror_value_from_dump;
use crate::backoff::Backoff;
use crate::buffer::MirrorValue;
use crate::clock::now_ms;
use crate::config::RedisEndpoint;
use crate::metrics::Health;
use crate::position::{ReplId, ReplOffset};
use crate::redis_client::{frame_text, info_field, ClientError, RedisClient};
use crate::replication::rdb::decode_dump_payload;

/// A key as the primary holds it at a point of the stream (`None`: absent there).
pub type Refreshed = Option<MirrorValue>;

pub struct Primary {
    endpoint: RedisEndpoint,
    /// Kept open for refreshes (they come in bursts).
    client: Option<RedisClient>,
    /// Where a refresh that keeps failing is reported (`/ready`).
    health: Arc<Health>,
}

impl Primary {
    pub fn new(endpoint: RedisEndpoint, health: Arc<Health>) -> Primary {
        Primary {
            endpoint,
            client: None,
            health,
        }
    }

    /// Reads `key` (see [`Primary::read_key`]), retrying with backoff for as long as it fails
    /// (a connection lost, a user not allowed `DUMP`): a refresh that cannot be done is waited
    /// for, reported in `/ready`, never turned into a full resynchronisation. `None` when the
    /// primary is on another replication ID than `replid`.
    pub async fn read_key_retrying(
        &mut self,
        db: u32,
        key: &Bytes,
        replid: &ReplId,
        (generation, now): (u64, i64),
    ) -> Option<Refreshed> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            match self.read_key(db, key, replid, (generation, now)).await {
                Ok(found) => {
                    if backoff.failures() > 0 {
                        self.health.capture_problem(None);
                        tracing::info!(key = %String::from_utf8_lossy(key), "the key could be read from the primary again");
                    }
                    return found;
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    let problem = format!(
                        "cannot read key `{}` (db {db}) from the primary: {error}",
                        String::from_utf8_lossy(key)
                    );
                    tracing::warn!(%problem, retry_in = ?delay, "capture waits for the key");
                    metrics::counter!("writebehind_refresh_errors_total").increment(1);
                    self.health.capture_problem(Some(problem));
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// After a failover the primary is another server.
    pub fn follow(&mut self, endpoint: &RedisEndpoint) {
        if *endpoint != self.endpoint {
            self.endpoint = endpoint.clone();
            self.client = None;
        }
    }

    /// The primary, with the source's credentials.
    pub fn endpoint(&self) -> &RedisEndpoint {
        &self.endpoint
    }

    /// The primary's `COMMAND` table; `None` (logged) when it cannot be read: unknown writes
    /// are then refreshed by key.
    pub async fn command_table(&self) -> Option<CommandTable> {
        let result = async {
            let mut client = RedisClient::connect(&self.endpoint, Duration::from_secs(10)).await?;
            client.command(&["COMMAND"]).await
        }
        .await;
        match result {
            Ok(reply) => Some(CommandTable::from_reply(&reply)),
            Err(error) => {
                tracing::warn!(%error, "cannot read the primary's command table; unknown writes will be refreshed by key");
                None
            }
        }
    }

    /// A sample of the primary's clock (`TIME`, `INFO replication`, `INFO stats` in one
    /// `MULTI`) and the skew of its time against the local clock, half the round trip counted.
    pub async fn sample_clock(&mut self) -> Result<(ClockSample, Skew), ClientError> {
        let sent = now_ms();
        let results = self
            .transaction(&[
                &[&b"TIME"[..]][..],
                &[&b"INFO"[..], b"replication"],
                &[&b"INFO"[..], b"stats"],
            ])
            .await?;
        let received = now_ms();
        let bad = |message: &str| self.protocol_error(message);
        let [BytesFrame::Array(time), replication, stats] = results.as_slice() else {
            return Err(bad("EXEC returned unexpected replies"));
        };
        let number = |frame: Option<&BytesFrame>| frame_text(frame?).parse::<i64>().ok();
        let (Some(seconds), Some(micros)) = (number(time.first()), number(time.get(1))) else {
            return Err(bad("TIME returned no time"));
        };
        let time_ms = seconds.saturating_mul(1000).saturating_add(micros / 1000);
        let field = |info: &BytesFrame, name: &str| {
            info_field(&frame_text(info), name).and_then(|v| v.parse::<u64>().ok())
        };
        let (Some(offset), Some(expired_keys)) = (
            field(replication, "master_repl_offset"),
            field(stats, "expired_keys"),
        ) else {
            return Err(bad("INFO has no master_repl_offset or expired_keys"));
        };
        let skew = Skew::measured(sent, time_ms, received);
        let sample = ClockSample {
            offset: ReplOffset(offset),
            time_ms,
            expired_keys,
        };
        Ok((sample, skew))
    }

    /// Runs `commands` in one `MULTI` on the kept connection (opened when needed, dropped when
    /// it fails); returns what `EXEC` returned.
    async fn transaction(&mut self, commands: &[&[&[u8]]]) -> Result<Vec<BytesFrame>, ClientError> {
        let client = match self.client.as_mut() {
            Some(client) => client,
            None => self
                .client
                .insert(RedisClient::connect(&self.endpoint, Duration::from_secs(10)).await?),
        };
        let mut all: Vec<&[&[u8]]> = vec![&[b"MULTI"]];
        all.extend_from_slice(commands);
        all.push(&[b"EXEC"]);
        let replies = match client.pipeline(&all).await {
            Ok(replies) => replies,
            Err(error) => {
                self.client = None;
                return Err(error);
            }
        };
        match replies.into_iter().last() {
            Some(BytesFrame::Array(results)) if results.len() == commands.len() => Ok(results),
            _ => Err(self.protocol_error("EXEC did not return one reply per command")),
        }
    }

    fn protocol_error(&self, message: &str) -> ClientError {
        ClientError::Protocol {
            address: self.endpoint.address(),
            message: message.to_string(),
        }
    }

    /// The number of keys in the primary (`INFO keyspace`; 0 when unknown).
    pub async fn key_count(&self) -> u64 {
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

    /// Reads `key` in `db` with the primary's offset (see the module doc). `Ok(None)` when the
    /// primary is on another replication ID than `replid`.
    pub async fn read_key(
        &mut self,
        db: u32,
        key: &Bytes,
        replid: &ReplId,
        (generation, now): (u64, i64),
    ) -> Result<Option<Refreshed>, ClientError> {
        let db_text = db.to_string();
        let results = self
            .transaction(&[
                &[&b"SELECT"[..], db_text.as_bytes()][..],
                &[&b"DUMP"[..], key.as_ref()],
                &[&b"PTTL"[..], key.as_ref()],
                &[&b"INFO"[..], b"replication"],
            ])
            .await?;
        let bad = |message: &str| self.protocol_error(message);
        let [_, dump, pttl, info] = results.as_slice() else {
            return Err(bad("EXEC returned an unexpected number of replies"));
        };
        let info = frame_text(info);
        if info_field(&info, "master_replid") != Some(replid.as_str()) {
            return Ok(None);
        }
        let offset: u64 = info_field(&info, "master_repl_offset")
            .and_then(|o| o.parse().ok())
            .ok_or_else(|| bad("INFO has no master_repl_offset"))?;
        let expire_at_ms = match pttl {
            BytesFrame::Integer(ms) if *ms >= 0 => Some(now + ms),
            _ => None,
        };
        let value = match dump {
            BytesFrame::BulkString(payload) => {
                let decoded =
                    decode_dump_payload(payload).map_err(|e| bad(&format!("DUMP payload: {e}")))?;
                mirror_value_from_dump(decoded, generation, expire_at_ms)
            }
            _ => None,
        };
        // Absent at that offset: a marker entry (no row) records the offset, so that the
        // stream's commands up to it are not replayed onto the absent key.
        let mut value = value.unwrap_or_else(|| MirrorValue::other(generation));
        value.refreshed_through = ReplOffset(offset);
        Ok(Some(Some(value)))
    }
}
