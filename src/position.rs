//! Positions in a primary's replication stream.
//!
//! A primary numbers every byte it feeds to its replicas; `master_repl_offset` is the number
//! of the last byte. A replica's offset is the number of the last byte it has processed, so
//! after a `+FULLRESYNC <replid> <offset>` the first byte of the command stream has number
//! `offset + 1`, and a replica resumes with `PSYNC <replid> <offset + 1>`.
//!
//! Offsets only compare within one replication ID: a promoted replica starts a new ID and
//! carries the old one on as its secondary ID up to the switch point.
//!
//! The service reports four positions along the stream, all [`ReplOffset`]s, with the invariant
//! `received >= buffered >= applied >= acked` (for positions of the same replid; checked by
//! debug assertions in `src/metrics.rs`):
//! - **received**: bytes read from the socket and decoded;
//! - **buffered**: effects synced to the local store; the only offset reported to the primary
//!   (`REPLCONF ACK`, see [`DurableOffset`]), so a client's `WAIT 1` means "captured durably";
//! - **applied**: committed to the database, in the same transaction as the rows (per backend;
//!   the slowest counts);
//! - **acked**: every client acknowledgement (`{key}uuid` stream) of a change up to here is
//!   written back to Redis.
//!
//! Positions shared between tasks only move forward (`fetch_max`); they are set back only at
//! the points where the stream itself starts over (a new link, a full sync).
//!
//! Inside the buffer, changes are numbered by [`ChangeSeq`]: capture gives consecutive seqs
//! from 1 in stream order, each sink commits its last applied seq with its rows, and the change
//! log is trimmed through the seq every backend has applied.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The number of the last byte of the replication stream that has been processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
#[serde(transparent)]
pub struct ReplOffset(pub u64);

impl ReplOffset {
    /// The offset after `bytes` more bytes.
    pub fn advanced(self, bytes: u64) -> ReplOffset {
        ReplOffset(self.0 + bytes)
    }

    /// The byte to ask for in `PSYNC` to continue after this offset.
    pub fn next_byte(self) -> u64 {
        self.0 + 1
    }
}

impl fmt::Display for ReplOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The number of a change in the change log. Seqs start at 1 and increase by one per change in
/// stream order; [`ChangeSeq::NONE`] (0) means "no change" (a sink that has applied nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
#[serde(transparent)]
pub struct ChangeSeq(pub u64);

impl ChangeSeq {
    pub const NONE: ChangeSeq = ChangeSeq(0);
    pub const FIRST: ChangeSeq = ChangeSeq(1);

    /// The seq after this one.
    pub fn next(self) -> ChangeSeq {
        ChangeSeq(self.0 + 1)
    }

    /// The seq before this one (`None` before the first).
    pub fn previous(self) -> Option<ChangeSeq> {
        self.0.checked_sub(1).filter(|s| *s > 0).map(ChangeSeq)
    }

    /// The big-endian key of this seq (change log, dead letters), so key order is seq order.
    pub fn key(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for ChangeSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The offset the service reports to the primary with `REPLCONF ACK`: what it has made
/// durable. Shared between the task that makes changes durable and the link's writer; it only
/// moves forward, except when a new link starts (where that link starts).
#[derive(Debug, Clone, Default)]
pub struct DurableOffset(Arc<AtomicU64>);

impl DurableOffset {
    /// Everything up to `offset` is durable (an older offset changes nothing).
    pub fn advance(&self, offset: ReplOffset) {
        self.0.fetch_max(offset.0, Ordering::SeqCst);
    }

    /// A new link starts at `offset`: what was reported on the previous one does not count.
    pub fn restart_at(&self, offset: ReplOffset) {
        self.0.store(offset.0, Ordering::SeqCst);
    }

    pub fn get(&self) -> ReplOffset {
        ReplOffset(self.0.load(Ordering::SeqCst))
    }
}

/// A replication ID: 40 hexadecimal characters chosen by a primary.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplId(String);

impl ReplId {
    /// Accepts exactly 40 hexadecimal characters (`CONFIG_RUN_ID_SIZE`).
    pub fn parse(text: &str) -> Option<ReplId> {
        (text.len() == 40 && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| ReplId(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReplId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a consumer stands in a primary's history: a top-level command boundary, with the
/// database selected at that point (a resumed stream does not repeat `SELECT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPosition {
    pub replid: ReplId,
    pub offset: ReplOffset,
    pub db: u32,
}

impl fmt::Display for StreamPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} (db {})", self.replid, self.offset, self.db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replid_must_be_forty_hex_characters() {
        assert!(ReplId::parse(&"a".repeat(40)).is_some());
        assert!(ReplId::parse(&"a".repeat(39)).is_none());
        assert!(ReplId::parse(&"g".repeat(40)).is_none());
        assert!(ReplId::parse("?").is_none());
    }

    #[test]
    fn the_durable_offset_only_moves_forward_within_a_link() {
        let durable = DurableOffset::default();
        durable.advance(ReplOffset(10));
        durable.advance(ReplOffset(7));
        assert_eq!(durable.get(), ReplOffset(10));
        durable.restart_at(ReplOffset(3));
        assert_eq!(durable.get(), ReplOffset(3));
        assert_eq!(ChangeSeq(5).previous(), Some(ChangeSeq(4)));
        assert_eq!(ChangeSeq::FIRST.previous(), None);
        assert_eq!(ChangeSeq::NONE.next(), ChangeSeq::FIRST);
    }

    #[test]
    fn psync_asks_for_the_byte_after_the_offset() {
        assert_eq!(ReplOffset(867).next_byte(), 868);
        assert_eq!(ReplOffset(10).advanced(14), ReplOffset(24));
    }
}
