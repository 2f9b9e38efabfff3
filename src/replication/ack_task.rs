//! The task that writes `REPLCONF ACK` while the link reads the socket directly (while it is
//! spooled, the spooler does: `spool.rs`).
//!
//! It sends the offset the caller acknowledged (never merely what was read) every second, at
//! once when asked, and when the primary asks with `REPLCONF GETACK *`: at once with what is
//! synced, and again as soon as what is synced reaches what the `GETACK` asked for, so that
//! `WAIT` returns promptly. Asked to stop, it gives its half of the socket back (to a spooler),
//! with a `GETACK` it was still to answer again.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::position::{DurableOffset, ReplOffset};
use crate::redis_client::encode_command;

/// What the ACK task gives back when it stops: its half of the socket, and the target of a
/// `GETACK` it was still to answer again.
pub(super) type HandOver = tokio::sync::oneshot::Receiver<(OwnedWriteHalf, Option<u64>)>;

pub(super) enum WriterMessage {
    /// Send an ACK now. The sender, if any, is told once it is written.
    AckNow(Option<tokio::sync::oneshot::Sender<()>>),
    /// `REPLCONF GETACK` arrived: answer with at most this offset.
    GetAck(ReplOffset),
    /// Stop, and give the socket's write half back (to the spooler), with the offset of a
    /// `GETACK` still waiting to be answered again, if any.
    Stop(tokio::sync::oneshot::Sender<(OwnedWriteHalf, Option<u64>)>),
}

/// The task that writes ACKs while the link reads the socket directly.
pub(super) struct AckWriter {
    pub(super) messages: mpsc::UnboundedSender<WriterMessage>,
    task: JoinHandle<()>,
}

impl Drop for AckWriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AckWriter {
    pub(super) fn start(
        writer: OwnedWriteHalf,
        durable: DurableOffset,
        address: String,
    ) -> AckWriter {
        let (messages, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(write_acks(writer, receiver, durable, address));
        AckWriter { messages, task }
    }
}

/// Sends `REPLCONF ACK <durable offset>` every second and when asked.
async fn write_acks(
    mut writer: OwnedWriteHalf,
    mut messages: mpsc::UnboundedReceiver<WriterMessage>,
    durable: DurableOffset,
    address: String,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A GETACK answered below the offset it asked for is answered again once the caller's
    // acknowledged position reaches it, so that `WAIT` returns promptly.
    let mut getack_target: Option<u64> = None;
    let mut written: Option<tokio::sync::oneshot::Sender<()>> = None;
    let mut recheck = tokio::time::interval(Duration::from_millis(5));
    loop {
        let send_ack = tokio::select! {
            _ = tick.tick() => true,
            message = messages.recv() => match message {
                None => return,
                Some(WriterMessage::AckNow(done)) => {
                    written = done;
                    true
                }
                Some(WriterMessage::Stop(back)) => {
                    let _ = back.send((writer, getack_target));
                    return;
                }
                Some(WriterMessage::GetAck(before)) => {
                    if durable.get() < before {
                        getack_target = Some(before.0);
                    }
                    true
                }
            },
            _ = recheck.tick(), if getack_target.is_some() => {
                match getack_target {
                    Some(target) if durable.get().0 >= target => {
                        getack_target = None;
                        true
                    }
                    _ => false,
                }
            }
        };
        if send_ack {
            let offset = durable.get().to_string();
            let result = writer
                .write_all(&encode_command(&[
                    &b"REPLCONF"[..],
                    b"ACK",
                    offset.as_bytes(),
                ]))
                .await;
            if let Some(done) = written.take() {
                let _ = done.send(());
            }
            if let Err(e) = result {
                tracing::debug!(%address, error = %e, "cannot send REPLCONF ACK; the reader will notice the broken link");
                return;
            }
        }
    }
}
