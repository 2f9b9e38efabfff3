//! Dead-letter records (column family `dead_letters`).

use bytes::Bytes;

use super::codec::{DecodeError, Decoder, Encoder};
use crate::position::ChangeSeq;

/// A change a database refused, kept until it is retried or dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub seq: ChangeSeq,
    pub backend: String,
    pub mapping: String,
    pub row_id: Bytes,
    pub reason: String,
    pub at_ms: i64,
}

impl DeadLetter {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.bytes(self.backend.as_bytes())
            .bytes(self.mapping.as_bytes())
            .bytes(&self.row_id)
            .bytes(self.reason.as_bytes())
            .i64(self.at_ms);
        e.finish()
    }

    pub(super) fn decode(seq: ChangeSeq, input: &[u8]) -> Result<DeadLetter, DecodeError> {
        let mut d = Decoder::new(input, "dead letter");
        let letter = DeadLetter {
            seq,
            backend: d.string()?,
            mapping: d.string()?,
            row_id: d.bytes()?,
            reason: d.string()?,
            at_ms: d.i64()?,
        };
        d.end()?;
        Ok(letter)
    }
}
