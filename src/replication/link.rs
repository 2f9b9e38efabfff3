//! One connection to a primary, from the handshake to the end of the command stream (the
//! handshake itself and the reads of the connection are in `socket.rs`).
//!
//! The read side is driven by the caller ([`Link::next`]); it decodes only when asked. A full
//! sync is drained into the spool by a thread of its own ([`spool`](super::spool)) so that the
//! primary never holds the snapshot's backlog for us; once the snapshot is decoded and the spool
//! read to its end, the link reads the socket directly again. When its consumer then falls
//! behind the command stream (the kernel holds more unread bytes for the socket than
//! [`left_behind`](super::behind::left_behind) after a read), the link spools the stream the same way until the
//! consumer has caught up, so that the primary does not hold the lag either; past
//! `[replication] stream_spool_mb` unread in the spool, the spooler stops reading and the
//! socket slows (TCP backpressure) instead of the disk filling without bound. While the link reads
//! the socket directly, a task of its own sends `REPLCONF ACK <offset>` every second with the
//! position the caller acknowledged, and at once when the primary asks with
//! `REPLCONF GETACK *`; while it is spooled, the spooler does (with a `\n` every second until
//! the snapshot has arrived, as the primary's `repl-timeout` clock runs during that time).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;

use super::ack_task::{AckWriter, HandOver, WriterMessage};
use super::behind::{
    available_disk, MIN_STREAM_SPOOL_BYTES, SPOOL_LOG_EVERY, SPOOL_PAUSE_AFTER_FAILURE,
};
use super::rdb::{RdbDecoder, RdbEvent};
use super::socket::{Socket, Source, EOF_MARK_LEN, READ_CHUNK};
use super::spool::{SnapshotEnd, Spool, SpoolSettings};
use super::stream::{CommandStream, StreamEvent};
use super::{LinkError, ReplicationEvent, ReplicatorOptions, SnapshotFraming};
use crate::position::{DurableOffset, ReplId, ReplOffset, StreamPosition};

/// Numbers the spool directories of this process's links.
static SPOOL_COUNTER: AtomicU64 = AtomicU64::new(0);

pub(super) enum Phase {
    Snapshot {
        decoder: RdbDecoder,
        framing: SnapshotFraming,
        replid: ReplId,
        offset: ReplOffset,
        stream_db: u32,
    },
    Streaming {
        replid: ReplId,
        stream: CommandStream,
    },
}

pub(crate) struct Link {
    socket: Socket,
    phase: Phase,
    address: String,
    durable: DurableOffset,
    /// None while the link is spooled (the spooler sends the ACKs).
    writer: Option<AckWriter>,
    /// The ACK writer asked to give the write half back, to spool the command stream with the
    /// limit beside it; kept until it has (dropping it would abort its task, and the half with
    /// it).
    returning: Option<(AckWriter, HandOver, u64)>,
    /// After a spool of the stream that could not write, none is started before this.
    spool_paused_until: Option<std::time::Instant>,
    /// Where this link's spool directories go.
    spool_root: PathBuf,
    /// The most bytes of the command stream spooled and unread (0: the stream is never spooled).
    stream_spool_bytes: u64,
    /// Where the spool counts its unread bytes (`ReplicatorOptions::spooled`).
    spooled: std::sync::Arc<AtomicU64>,
    /// When spooling the stream was last logged, and the times it started since.
    spool_logged: Option<(std::time::Instant, u64)>,
}

impl Link {
    /// Connects, performs the handshake and `PSYNC`, and returns the link with its first event
    /// (`FullSyncStarted` or `Continued`).
    pub(crate) async fn connect(
        options: &ReplicatorOptions,
        endpoint: &crate::config::RedisEndpoint,
        resume: Option<&StreamPosition>,
        durable: DurableOffset,
    ) -> Result<(Link, ReplicationEvent), LinkError> {
        let address = endpoint.address();
        let (stream, tls) = crate::tls::connect_redis(
            &endpoint.host,
            endpoint.port,
            endpoint.tls.as_ref(),
            options.timeout,
        )
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::TimedOut => LinkError::Timeout {
                address: address.clone(),
                seconds: options.timeout.as_secs(),
            },
            _ => LinkError::Io {
                address: address.clone(),
                message: format!("cannot connect: {e}"),
            },
        })?;
        let (reader, mut write_half) = stream.into_split();
        let mut handshake = Socket {
            source: Source::Tcp(reader),
            input: BytesMut::with_capacity(READ_CHUNK),
            address: address.clone(),
            timeout: options.timeout,
            tls,
            behind: false,
        };
        handshake
            .greet(&mut write_half, endpoint, options.announce_port)
            .await?;
        let (phase, first_event) = handshake
            .psync(
                &mut write_half,
                resume,
                &durable,
                &options.waiting_for_snapshot,
            )
            .await?;
        let mut link = Link {
            socket: handshake,
            phase,
            address,
            durable,
            writer: None,
            returning: None,
            spool_paused_until: None,
            spool_root: options.spool_dir.clone(),
            stream_spool_bytes: options.stream_spool_bytes,
            spooled: options.spooled.clone(),
            spool_logged: None,
        };
        match &link.phase {
            Phase::Snapshot { framing, .. } => {
                let end = match framing {
                    SnapshotFraming::Length(len) => SnapshotEnd::AfterBytes(*len),
                    SnapshotFraming::EofMark(mark) => SnapshotEnd::Mark(mark.clone()),
                };
                link.start_spool(write_half, end, None)?;
            }
            Phase::Streaming { .. } => {
                link.writer = Some(AckWriter::start(
                    write_half,
                    link.durable.clone(),
                    link.address.clone(),
                ))
            }
        }
        Ok((link, first_event))
    }

    /// Hands the socket to a spooler (see the module doc); `limit`: the most bytes spooled and
    /// unread before it stops reading.
    fn start_spool(
        &mut self,
        write_half: OwnedWriteHalf,
        end: SnapshotEnd,
        limit: Option<u64>,
    ) -> Result<(), LinkError> {
        let Source::Tcp(reader) = std::mem::replace(&mut self.socket.source, Source::Detached)
        else {
            return Ok(());
        };
        let io_error = |e: std::io::Error| LinkError::Io {
            address: self.address.clone(),
            message: format!("cannot hand the socket to the spool: {e}"),
        };
        let socket = reader
            .reunite(write_half)
            .map_err(|e| io_error(std::io::Error::other(e.to_string())))?
            .into_std()
            .map_err(io_error)?;
        let dir: PathBuf = self.spool_root.join(format!(
            "link-{}-{}",
            std::process::id(),
            SPOOL_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let settings = SpoolSettings {
            dir,
            end,
            durable: self.durable.clone(),
            address: self.address.clone(),
            timeout: self.socket.timeout,
            limit,
            ack_every: super::spool::ACK_EVERY,
            unread: self.spooled.clone(),
        };
        let spool = Spool::start(socket, &self.socket.input, settings)?;
        self.socket.source = Source::Spool(spool);
        Ok(())
    }

    /// Spools the command stream, its consumer being behind (see the module doc). Cancel-safe:
    /// the ACK writer is kept until it has given the write half back, and a later call goes on
    /// waiting for it.
    async fn spool_stream(&mut self) -> Result<(), LinkError> {
        if self.returning.is_none() {
            self.socket.behind = false;
            if self
                .spool_paused_until
                .is_some_and(|until| std::time::Instant::now() < until)
            {
                return Ok(());
            }
            // The spool shares its disk with the buffer: it takes at most a quarter of what is
            // free, so that a spool never fills the disk capture writes to. Checked before the
            // socket moves: a spool that cannot start must not end the link.
            let limit = self
                .stream_spool_bytes
                .min(available_disk(&self.spool_root) / 4);
            if limit < MIN_STREAM_SPOOL_BYTES || std::fs::create_dir_all(&self.spool_root).is_err()
            {
                tracing::debug!(address = %self.address, limit, "capture is behind the command stream, but the disk has no room to spool it");
                return Ok(());
            }
            let Some(writer) = self.writer.take() else {
                return Ok(());
            };
            let (back, receiver) = tokio::sync::oneshot::channel();
            let _ = writer.messages.send(WriterMessage::Stop(back));
            self.returning = Some((writer, receiver, limit));
        }
        let Some((_, receiver, limit)) = self.returning.as_mut() else {
            return Ok(());
        };
        let limit = *limit;
        let handed = receiver.await;
        self.returning = None;
        let (write_half, getack_target) = handed.map_err(|_| LinkError::Io {
            address: self.address.clone(),
            message: "the ACK writer stopped before giving the socket to the spool".into(),
        })?;
        self.start_spool(write_half, SnapshotEnd::AlreadyArrived, Some(limit))?;
        if let (Some(target), Source::Spool(spool)) = (getack_target, &self.socket.source) {
            spool.answer_getack(ReplOffset(target));
        }
        metrics::counter!("writebehind_stream_spooled_total").increment(1);
        // A load near capture's pace starts a spool every second or two: one line a minute.
        let times = match self.spool_logged {
            Some((at, times)) if at.elapsed() < SPOOL_LOG_EVERY => {
                self.spool_logged = Some((at, times + 1));
                return Ok(());
            }
            Some((_, times)) => times + 1,
            None => 1,
        };
        self.spool_logged = Some((std::time::Instant::now(), 0));
        tracing::info!(address = %self.address, limit_bytes = limit, times, "capture is behind the command stream: spooling it to disk until capture catches up, so that the primary does not hold the difference (`times`: spools started since the last such line)");
        Ok(())
    }

    /// Takes the socket back from the spooler: what it wrote and was not read is appended to
    /// the input, and the link reads the socket directly from then on. Cancel-safe: the only
    /// wait leaves the spool in place.
    async fn leave_spool(&mut self) -> Result<(), LinkError> {
        let Source::Spool(spool) = &mut self.socket.source else {
            return Ok(());
        };
        let socket = spool.take_socket().await?;
        spool.drain(&mut self.socket.input)?;
        if spool.ended_early() {
            // The disk refused a write: no spool of the stream for a while (and no warning a
            // read).
            self.spool_paused_until = Some(std::time::Instant::now() + SPOOL_PAUSE_AFTER_FAILURE);
        }
        let address = self.address.clone();
        let io_error = |e: std::io::Error| LinkError::Io {
            address: address.clone(),
            message: format!("cannot take the socket back from the spool: {e}"),
        };
        socket.set_read_timeout(None).map_err(io_error)?;
        socket.set_nonblocking(true).map_err(io_error)?;
        let (reader, writer) = TcpStream::from_std(socket).map_err(io_error)?.into_split();
        // Dropping the spool removes its directory.
        self.socket.source = Source::Tcp(reader);
        self.socket.behind = false;
        self.writer = Some(AckWriter::start(writer, self.durable.clone(), address));
        tracing::debug!(address = %self.address, "the spool is read to its end; reading the primary directly");
        Ok(())
    }

    /// Reads more input: from the spool or the socket. A spool read to its end after the
    /// snapshot gives the socket back first.
    async fn fill(&mut self) -> Result<(), LinkError> {
        if let (Source::Spool(spool), Phase::Streaming { .. }) = (&self.socket.source, &self.phase)
        {
            if spool.may_leave() {
                self.leave_spool().await?;
                if !self.socket.input.is_empty() {
                    return Ok(());
                }
            }
        }
        self.socket.fill().await
    }

    /// Sends `message` to whoever writes ACKs now.
    fn send_to_writer(&self, message: WriterMessage) {
        match (&self.writer, &self.socket.source) {
            (Some(writer), _) => {
                let _ = writer.messages.send(message);
            }
            (None, Source::Spool(spool)) => match message {
                WriterMessage::AckNow(written) => spool.request_ack(written),
                WriterMessage::GetAck(before) => spool.answer_getack(before),
                WriterMessage::Stop(_) => {}
            },
            (None, _) => {}
        }
    }

    /// The next event of this link.
    pub(crate) async fn next(&mut self) -> Result<ReplicationEvent, LinkError> {
        loop {
            let streaming = matches!(self.phase, Phase::Streaming { .. });
            if streaming && self.stream_spool_bytes > 0 && self.socket.behind {
                self.spool_stream().await?;
            }
            match &mut self.phase {
                Phase::Snapshot {
                    decoder,
                    framing,
                    replid,
                    offset,
                    stream_db,
                } => {
                    let event = decode_snapshot_event(
                        &self.address,
                        &mut self.socket.input,
                        decoder,
                        framing,
                        stream_db,
                    )?;
                    match event {
                        Some(event) => return Ok(ReplicationEvent::Snapshot(event)),
                        None if decoder.is_done() => {
                            let rdb_bytes = decoder.consumed();
                            match framing {
                                SnapshotFraming::Length(len) if rdb_bytes != *len => {
                                    return Err(LinkError::Snapshot {
                                        address: self.address.clone(),
                                        message: format!("the RDB ended after {rdb_bytes} of its announced {len} bytes"),
                                    })
                                }
                                SnapshotFraming::EofMark(mark) => {
                                    let mark = mark.clone();
                                    while self.socket.input.len() < EOF_MARK_LEN {
                                        self.socket.fill().await?;
                                    }
                                    if self.socket.input[..EOF_MARK_LEN] != mark[..] {
                                        return Err(LinkError::Snapshot {
                                            address: self.address.clone(),
                                            message: "the diskless snapshot does not end with its EOF mark".into(),
                                        });
                                    }
                                    self.socket.input.advance(EOF_MARK_LEN);
                                }
                                SnapshotFraming::Length(_) => {}
                            }
                            let position = StreamPosition {
                                replid: replid.clone(),
                                offset: *offset,
                                db: *stream_db,
                            };
                            self.phase = Phase::Streaming {
                                replid: position.replid.clone(),
                                stream: CommandStream::new(position.offset, position.db),
                            };
                            // The spooler acknowledged the snapshot when it arrived; this covers
                            // a mark it could not see (then nothing more arrives until an ACK).
                            self.send_to_writer(WriterMessage::AckNow(None));
                            return Ok(ReplicationEvent::FullSyncCompleted {
                                position,
                                rdb_bytes,
                            });
                        }
                        None => self.socket.fill().await?,
                    }
                }
                Phase::Streaming { stream, .. } => match stream.decode(&mut self.socket.input) {
                    Ok(Some(event)) => {
                        if let StreamEvent::GetAck { before, .. } = &event {
                            self.send_to_writer(WriterMessage::GetAck(*before));
                        }
                        return Ok(ReplicationEvent::Stream(event));
                    }
                    Ok(None) => self.fill().await?,
                    Err(e) => {
                        return Err(LinkError::Protocol {
                            address: self.address.clone(),
                            message: e.to_string(),
                        })
                    }
                },
            }
        }
    }

    /// The next snapshot event from what is already buffered (never reads the socket; `None`
    /// also at the snapshot's end, which [`Link::next`] reports).
    pub(crate) fn try_next_snapshot(&mut self) -> Result<Option<RdbEvent>, LinkError> {
        let Phase::Snapshot {
            decoder,
            framing,
            stream_db,
            ..
        } = &mut self.phase
        else {
            return Ok(None);
        };
        decode_snapshot_event(
            &self.address,
            &mut self.socket.input,
            decoder,
            framing,
            stream_db,
        )
    }

    /// The next command-stream event from what is already buffered (never reads the socket).
    pub(crate) fn try_next_stream(&mut self) -> Result<Option<StreamEvent>, LinkError> {
        let Phase::Streaming { stream, .. } = &mut self.phase else {
            return Ok(None);
        };
        let mut decoded = stream.decode(&mut self.socket.input);
        // What the kernel already holds belongs to the same batch: a commit per read of
        // READ_CHUNK bytes would sync the buffer every few hundred commands.
        if matches!(decoded, Ok(None)) && self.socket.try_fill() {
            decoded = stream.decode(&mut self.socket.input);
        }
        match decoded {
            Ok(Some(event)) => {
                if let StreamEvent::GetAck { before, .. } = &event {
                    self.send_to_writer(WriterMessage::GetAck(*before));
                }
                Ok(Some(event))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(LinkError::Protocol {
                address: self.address.clone(),
                message: e.to_string(),
            }),
        }
    }

    /// Sends `REPLCONF ACK` with the durable offset now and waits until it is written (while
    /// spooled: asks the spooler, which sends it within its poll interval).
    pub(crate) async fn send_durable_offset(&self) {
        let (done, written) = tokio::sync::oneshot::channel();
        self.send_to_writer(WriterMessage::AckNow(Some(done)));
        let _ = tokio::time::timeout(Duration::from_secs(2), written).await;
    }

    /// The replid and database of the command stream (None during a snapshot).
    pub(crate) fn stream_state(&self) -> Option<(ReplId, u32)> {
        match &self.phase {
            Phase::Streaming { replid, stream } if !stream.in_transaction() => {
                Some((replid.clone(), stream.db()))
            }
            _ => None,
        }
    }
}

/// Decodes the next snapshot event from `input` (`None`: more input is needed, or the snapshot
/// is complete); notes the stream's database from the `repl-stream-db` aux field.
fn decode_snapshot_event(
    address: &str,
    input: &mut BytesMut,
    decoder: &mut RdbDecoder,
    framing: &SnapshotFraming,
    stream_db: &mut u32,
) -> Result<Option<RdbEvent>, LinkError> {
    let event = decoder.decode(input).map_err(|e| LinkError::Snapshot {
        address: address.to_string(),
        message: e.to_string(),
    })?;
    if let SnapshotFraming::Length(len) = framing {
        if decoder.consumed() > *len {
            return Err(LinkError::Snapshot {
                address: address.to_string(),
                message: format!("the RDB runs past its announced {len} bytes"),
            });
        }
    }
    if let Some(RdbEvent::Aux { key, value }) = &event {
        if key.as_ref() == b"repl-stream-db" {
            *stream_db = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    Ok(event)
}
