//! Acknowledgement records (column family `acks`): what the write-back task sends to the
//! clients' `{key}uuid` streams.

use bytes::Bytes;

use super::codec::{DecodeError, Decoder, Encoder};
use crate::position::ReplOffset;

/// An acknowledgement to write: `XADD {key}uuid * status <status> [reason <reason>]` in `db`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckRecord {
    pub id: u64,
    pub db: u32,
    pub key: Bytes,
    pub uuid: Bytes,
    /// `None`: done; `Some(reason)`: failed.
    pub failure: Option<String>,
    /// Stream offset of the change acknowledged.
    pub offset: ReplOffset,
}

impl AckRecord {
    /// The stream the client reads: `{<key>}<uuid>` (the hash tag keeps it in the key's slot).
    pub fn stream_key(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.key.len() + self.uuid.len() + 2);
        out.push(b'{');
        out.extend_from_slice(&self.key);
        out.push(b'}');
        out.extend_from_slice(&self.uuid);
        out
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u32(self.db)
            .bytes(&self.key)
            .bytes(&self.uuid)
            .bytes(if self.failure.is_some() {
                b"failed"
            } else {
                b"done"
            })
            .opt_bytes(self.failure.as_deref().map(str::as_bytes))
            .u64(self.offset.0);
        e.finish()
    }

    pub(super) fn decode(id: u64, input: &[u8]) -> Result<AckRecord, DecodeError> {
        let mut d = Decoder::new(input, "ack");
        let db = d.u32()?;
        let key = d.bytes()?;
        let uuid = d.bytes()?;
        let _status = d.bytes()?;
        let failure = d
            .opt_bytes()?
            .map(|r| String::from_utf8_lossy(&r).into_owned());
        let offset = ReplOffset(d.u64()?);
        d.end()?;
        Ok(AckRecord {
            id,
            db,
            key,
            uuid,
            failure,
            offset,
        })
    }
}

/// An acknowledgement to queue (it gets its id when put in a batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAck {
    pub db: u32,
    pub key: Bytes,
    pub uuid: Bytes,
    /// `None`: done; `Some(reason)`: failed.
    pub failure: Option<String>,
    pub offset: ReplOffset,
}
