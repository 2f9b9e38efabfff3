//! The capture checkpoint (`meta/checkpoint`).

use super::codec::{DecodeError, Decoder, Encoder};
use crate::position::{ChangeSeq, ReplId, ReplOffset, StreamPosition};

/// Where capture stands, written atomically with the data it describes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// The position after the last captured unit; `None` before the first full sync.
    pub position: Option<StreamPosition>,
    /// The seq the next change gets.
    pub next_seq: ChangeSeq,
    /// The generation of the last full sync.
    pub generation: u64,
    /// A full sync began and did not finish: the next attach must start a new one.
    pub full_sync_in_progress: bool,
}

impl Checkpoint {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        let (replid, offset, db) = match &self.position {
            Some(p) => (Some(p.replid.as_str().as_bytes()), p.offset.0, p.db),
            None => (None, 0, 0),
        };
        e.opt_bytes(replid)
            .u64(offset)
            .u32(db)
            .u64(self.next_seq.0)
            .u64(self.generation)
            .u8(u8::from(self.full_sync_in_progress));
        e.finish()
    }

    pub(super) fn decode(input: &[u8]) -> Result<Checkpoint, DecodeError> {
        let mut d = Decoder::new(input, "checkpoint");
        let replid = d.opt_bytes()?;
        let offset = ReplOffset(d.u64()?);
        let db = d.u32()?;
        let next_seq = ChangeSeq(d.u64()?);
        let generation = d.u64()?;
        let full_sync_in_progress = d.u8()? != 0;
        d.end()?;
        let position = match replid {
            Some(id) => {
                let text = std::str::from_utf8(&id)
                    .ok()
                    .and_then(ReplId::parse)
                    .ok_or_else(|| d.error("replid is not 40 hex characters"))?;
                Some(StreamPosition {
                    replid: text,
                    offset,
                    db,
                })
            }
            None => None,
        };
        Ok(Checkpoint {
            position,
            next_seq,
            generation,
            full_sync_in_progress,
        })
    }
}
