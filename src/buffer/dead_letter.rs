//! Dead-letter records (column family `dead_letters`).

use bytes::Bytes;

use super::codec::{DecodeError, Decoder, Encoder};
use super::{Store, StoreError, CF_DEAD_LETTERS};
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
    /// One line: what `dlq list` and `GET /dlq` show (the row id as text, invalid UTF-8
    /// replaced).
    pub fn line(&self) -> String {
        format!(
            "seq={} backend={} mapping={} row={} at_ms={} reason={}",
            self.seq,
            self.backend,
            self.mapping,
            String::from_utf8_lossy(&self.row_id),
            self.at_ms,
            self.reason
        )
    }

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

/// How many dead letters there are, and the oldest (what `/status` shows).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterSummary {
    pub count: u64,
    pub oldest: Option<DeadLetter>,
}

impl Store {
    /// Counts the dead letters by their keys (no value is decoded or copied but the oldest's):
    /// `/status` asks every time it is read, whatever the store holds.
    pub fn dead_letter_summary(&self) -> Result<DeadLetterSummary, StoreError> {
        let mut keys = self.db.raw_iterator_cf(self.cf(CF_DEAD_LETTERS)?);
        keys.seek_to_first();
        let mut summary = DeadLetterSummary::default();
        if let (Some(key), Some(value)) = (keys.key(), keys.value()) {
            let seq = self.seq_key(key, "dead letter key")?;
            let letter = DeadLetter::decode(ChangeSeq(seq), value).map_err(|e| self.corrupt(e))?;
            summary.oldest = Some(letter);
        }
        while keys.valid() {
            summary.count += 1;
            keys.next();
        }
        keys.status().map_err(|e| self.rocks(e))?;
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Batch;

    fn letter(seq: u64) -> DeadLetter {
        DeadLetter {
            seq: ChangeSeq(seq),
            backend: "db".into(),
            mapping: "people".into(),
            row_id: Bytes::from(format!("row{seq}")),
            reason: format!("refused {seq}"),
            at_ms: seq as i64,
        }
    }

    #[test]
    fn the_summary_counts_every_letter_and_names_the_oldest(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        assert_eq!(store.dead_letter_summary()?, DeadLetterSummary::default());
        let mut batch = Batch::default();
        for seq in [300, 7, 42] {
            batch.put_dead_letter(&letter(seq));
        }
        store.write(batch, true)?;
        let summary = store.dead_letter_summary()?;
        assert_eq!(summary.count, 3);
        assert_eq!(summary.oldest, Some(letter(7)));
        let mut batch = Batch::default();
        batch.delete_dead_letter(ChangeSeq(7));
        store.write(batch, true)?;
        let summary = store.dead_letter_summary()?;
        assert_eq!(
            (summary.count, summary.oldest.map(|l| l.seq)),
            (2, Some(ChangeSeq(42)))
        );
        Ok(())
    }
}
