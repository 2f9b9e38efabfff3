//! The read side of a link's connection, and the replica's handshake on it.
//!
//! A [`Socket`] holds where the bytes come from (the TCP read half, or the spool a full sync
//! or a lagging stream is drained into: `spool.rs`) and what has been read but not consumed.
//! The handshake is the one a replica makes (mod.rs, "Protocol"): `PING`, `AUTH` when the
//! endpoint has a password, the advisory `REPLCONF`s, `PSYNC` with the resume position, and,
//! for a full sync, the snapshot's header (`$<length>` or the diskless `$EOF:<mark>`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::behind::left_behind;
use super::link::Phase;
use super::rdb::RdbDecoder;
use super::spool::Spool;
use super::stream::CommandStream;
use super::{LinkError, ReplicationEvent, SnapshotFraming};
use crate::position::{DurableOffset, ReplId, ReplOffset, StreamPosition};
use crate::redis_client::encode_command;

/// Length of the random delimiter of a diskless (`$EOF:`) snapshot.
pub(super) const EOF_MARK_LEN: usize = 40;
pub(super) const READ_CHUNK: usize = 64 * 1024;

/// The read side of the connection: where bytes come from and what has been read but not
/// consumed.
pub(super) struct Socket {
    pub(super) source: Source,
    pub(super) input: BytesMut,
    pub(super) address: String,
    pub(super) timeout: Duration,
    /// What TLS established, on a `rediss://` link.
    pub(super) tls: Option<crate::tls::Negotiated>,
    /// A read of the socket left more unread in the kernel than the consumer keeps up with
    /// ([`left_behind`](super::behind::left_behind)).
    pub(super) behind: bool,
}

pub(super) enum Source {
    Tcp(OwnedReadHalf),
    Spool(Spool),
    /// Only while the socket moves between the two (a failure then ends the link).
    Detached,
}

/// The server version announced with `REPLCONF version`: the newest whose snapshot format the
/// decoder reads (see mod.rs, "Protocol").
const ANNOUNCED_VERSION: &[u8] = b"9.2.0";

impl Socket {
    /// `PING` (a primary that wants AUTH answers -NOAUTH, which is fine here), `AUTH` when the
    /// endpoint has a password, then the three advisory `REPLCONF`s (a primary that refuses them
    /// still serves PSYNC; Redis refuses `version`, see mod.rs).
    pub(super) async fn greet(
        &mut self,
        writer: &mut OwnedWriteHalf,
        endpoint: &crate::config::RedisEndpoint,
        announce_port: u16,
    ) -> Result<(), LinkError> {
        let address = self.address.clone();
        self.send(writer, &[&b"PING"[..]]).await?;
        let pong = self.read_line().await?;
        if pong.starts_with('-')
            && !(pong.starts_with("-NOAUTH")
                || pong.starts_with("-NOPERM")
                || pong.contains("operation not permitted"))
        {
            return Err(LinkError::Refused {
                address,
                message: format!("PING answered `{pong}`"),
            });
        }
        if let Some(password) = &endpoint.password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &endpoint.username {
                args.push(user.as_bytes());
            }
            args.push(password.as_bytes());
            self.send(writer, &args).await?;
            let reply = self.read_line().await?;
            if reply.starts_with('-') {
                return Err(LinkError::Fatal {
                    address,
                    message: format!("authentication failed ({reply}); check the user and password in the source URL"),
                });
            }
        }
        let port = announce_port.to_string();
        for args in [
            &[&b"REPLCONF"[..], b"listening-port", port.as_bytes()][..],
            &[&b"REPLCONF"[..], b"capa", b"eof", b"capa", b"psync2"],
            &[&b"REPLCONF"[..], b"version", ANNOUNCED_VERSION],
        ] {
            self.send(writer, args).await?;
            let reply = self.read_line().await?;
            if reply.starts_with('-') {
                tracing::debug!(%address, %reply, command = %String::from_utf8_lossy(args[1]), "REPLCONF refused");
            }
        }
        Ok(())
    }

    /// `PSYNC <replid> <offset + 1>` after `resume`, or `PSYNC ? -1`; the phase the reply
    /// starts and the event that says so.
    pub(super) async fn psync(
        &mut self,
        writer: &mut OwnedWriteHalf,
        resume: Option<&StreamPosition>,
        durable: &DurableOffset,
        waiting: &AtomicBool,
    ) -> Result<(Phase, ReplicationEvent), LinkError> {
        let address = self.address.clone();
        let (psync_id, psync_offset) = match resume {
            Some(p) => (
                p.replid.as_str().to_string(),
                p.offset.next_byte().to_string(),
            ),
            None => ("?".to_string(), "-1".to_string()),
        };
        self.send(
            writer,
            &[&b"PSYNC"[..], psync_id.as_bytes(), psync_offset.as_bytes()],
        )
        .await?;
        let reply = self.read_line_noting_a_wait(waiting).await;
        if !matches!(&reply, Ok(r) if r.starts_with("+FULLRESYNC")) {
            waiting.store(false, Ordering::SeqCst);
        }
        let reply = reply?;
        let malformed = || LinkError::Protocol {
            address: address.clone(),
            message: format!("malformed PSYNC reply `{reply}`"),
        };
        let mut words = reply.split_ascii_whitespace();
        match (words.next(), resume) {
            (Some("+FULLRESYNC"), _) => {
                let replid = words.next().and_then(ReplId::parse).ok_or_else(malformed)?;
                let offset = words
                    .next()
                    .and_then(|o| o.parse::<u64>().ok())
                    .ok_or_else(malformed)?;
                durable.restart_at(ReplOffset(0));
                let header = self.snapshot_header(replid, ReplOffset(offset), waiting).await;
                waiting.store(false, Ordering::SeqCst);
                header
            }
            (Some("+CONTINUE"), Some(resume)) => {
                let replid = match words.next() {
                    Some(id) => ReplId::parse(id).ok_or_else(malformed)?,
                    None => resume.replid.clone(),
                };
                let previous_replid = (replid != resume.replid).then(|| resume.replid.clone());
                durable.restart_at(resume.offset);
                let position = StreamPosition {
                    replid: replid.clone(),
                    offset: resume.offset,
                    db: resume.db,
                };
                let event = ReplicationEvent::Continued {
                    position,
                    previous_replid,
                };
                let stream = CommandStream::new(resume.offset, resume.db);
                Ok((Phase::Streaming { replid, stream }, event))
            }
            (Some("+CONTINUE"), None) => Err(LinkError::Protocol {
                address,
                message: "+CONTINUE to a PSYNC ? -1".into(),
            }),
            _ if reply.starts_with("-LOADING") || reply.starts_with("-NOMASTERLINK") => {
                Err(LinkError::NotReady {
                    address,
                    message: reply,
                })
            }
            _ => Err(LinkError::Fatal {
                address,
                message: format!(
                    "PSYNC refused: `{reply}`; writebehind needs PSYNC (never SYNC): grant the user +psync +replconf +ping"
                ),
            }),
        }
    }

    /// After `+FULLRESYNC`: the snapshot's framing (`$<len>` or `$EOF:<mark>`).
    async fn snapshot_header(
        &mut self,
        replid: ReplId,
        offset: ReplOffset,
        waiting: &AtomicBool,
    ) -> Result<(Phase, ReplicationEvent), LinkError> {
        let header = self.read_line_noting_a_wait(waiting).await?;
        let protocol = |message: String| LinkError::Protocol {
            address: self.address.clone(),
            message,
        };
        let framing = if let Some(mark) = header.strip_prefix("$EOF:") {
            if mark.len() != EOF_MARK_LEN {
                return Err(protocol(format!(
                    "snapshot header `{header}` has a bad EOF mark"
                )));
            }
            SnapshotFraming::EofMark(mark.as_bytes().to_vec())
        } else if let Some(len) = header.strip_prefix('$').and_then(|l| l.parse::<u64>().ok()) {
            SnapshotFraming::Length(len)
        } else {
            return Err(protocol(format!(
                "expected the snapshot header, got `{header}`"
            )));
        };
        let event = ReplicationEvent::FullSyncStarted {
            replid: replid.clone(),
            offset,
            framing: framing.describe(),
        };
        let phase = Phase::Snapshot {
            decoder: RdbDecoder::new(),
            framing,
            replid,
            offset,
            stream_db: 0,
        };
        Ok((phase, event))
    }

    /// Reads what the socket (or the spool) already holds, without waiting; false when nothing
    /// was read (an error or the end of the stream is then found by the next `fill`).
    pub(super) fn try_fill(&mut self) -> bool {
        let want = READ_CHUNK.max(self.input.len());
        match &mut self.source {
            Source::Tcp(reader) => {
                self.input.reserve(want);
                match reader.try_read_buf(&mut self.input) {
                    Ok(read) if read > 0 => {
                        self.behind |= read >= READ_CHUNK && left_behind(reader);
                        true
                    }
                    _ => false,
                }
            }
            Source::Spool(spool) => matches!(spool.try_fill(&mut self.input, want), Ok(true)),
            Source::Detached => false,
        }
    }

    pub(super) async fn fill(&mut self) -> Result<(), LinkError> {
        // Grow reads with the buffer so that a large frame arrives in few reads.
        let want = READ_CHUNK.max(self.input.len());
        let reader = match &mut self.source {
            Source::Tcp(reader) => reader,
            Source::Spool(spool) => return spool.fill(&mut self.input, want).await,
            Source::Detached => {
                return Err(LinkError::Io {
                    address: self.address.clone(),
                    message: "the link lost its socket while handing it over".into(),
                })
            }
        };
        self.input.reserve(want);
        let result = tokio::time::timeout(self.timeout, reader.read_buf(&mut self.input)).await;
        self.behind |= matches!(result, Ok(Ok(read)) if read >= READ_CHUNK) && left_behind(reader);
        let read = result
            .map_err(|_| LinkError::Timeout {
                address: self.address.clone(),
                seconds: self.timeout.as_secs(),
            })?
            .map_err(|e| self.lost(e.to_string()))?;
        if read == 0 {
            return Err(self.lost("the primary closed the connection".into()));
        }
        Ok(())
    }

    /// The connection was lost (`message`); with TLS, the TLS error behind it, if any.
    fn lost(&self, message: String) -> LinkError {
        let message = match self.tls.as_ref().and_then(|t| t.failure()) {
            Some(failure) => format!("{message} ({failure})"),
            None => message,
        };
        LinkError::Io {
            address: self.address.clone(),
            message,
        }
    }

    pub(super) async fn send(
        &mut self,
        writer: &mut OwnedWriteHalf,
        args: &[&[u8]],
    ) -> Result<(), LinkError> {
        writer
            .write_all(&encode_command(args))
            .await
            .map_err(|e| LinkError::Io {
                address: self.address.clone(),
                message: e.to_string(),
            })
    }

    /// A reply line to `PSYNC`, or the snapshot header after it: a primary preparing a full sync
    /// sends only `\n` keepalives until it starts the snapshot (a diskless one first waits
    /// `repl-diskless-sync-delay` for other replicas, and answers `PSYNC` only then; a
    /// disk-based one answers, then writes its RDB). Past a second, `waiting` is set and one
    /// line is logged, so that a first sync that seems stuck says why; cleared by the caller.
    async fn read_line_noting_a_wait(&mut self, waiting: &AtomicBool) -> Result<String, LinkError> {
        // read_line is cancel-safe: what a cut-off read took stays in the input.
        match tokio::time::timeout(Duration::from_secs(1), self.read_line()).await {
            Ok(line) => line,
            Err(_) => {
                if !waiting.swap(true, Ordering::SeqCst) {
                    tracing::info!(primary = %self.address, "waiting for the primary to start the snapshot: a diskless primary waits repl-diskless-sync-delay seconds (5 by default) for other replicas to join, a disk-based one writes its RDB file first");
                }
                self.read_line().await
            }
        }
    }

    /// One reply line, skipping the bare `\n` keepalives a primary sends while it prepares.
    async fn read_line(&mut self) -> Result<String, LinkError> {
        loop {
            while self.input.first() == Some(&b'\n') {
                self.input.advance(1);
            }
            if let Some(end) = self.input.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.input[..end]).into_owned();
                self.input.advance(end + 2);
                return Ok(line);
            }
            if self.input.len() > 64 * 1024 {
                return Err(LinkError::Protocol {
                    address: self.address.clone(),
                    message: "reply line longer than 64 KiB".into(),
                });
            }
            self.fill().await?;
        }
    }
}
