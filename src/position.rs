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
//! The service keeps four positions, each a newtype around [`ReplOffset`], with the invariant
//! `received >= buffered >= applied >= acked` (for positions of the same replid):
//! - **received**: bytes read from the socket and decoded;
//! - **buffered**: effects synced to the local store; the only offset `REPLCONF ACK` reports,
//!   so a client's `WAIT 1` means "captured durably";
//! - **applied**: committed to the database, in the same transaction as the rows;
//! - **acked**: acknowledgement streams written back to Redis.

use std::fmt;

/// The number of the last byte of the replication stream that has been processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
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
    fn psync_asks_for_the_byte_after_the_offset() {
        assert_eq!(ReplOffset(867).next_byte(), 868);
        assert_eq!(ReplOffset(10).advanced(14), ReplOffset(24));
    }
}
