//! DUMP / RESTORE payloads.
//!
//! A payload is `type byte + value (RDB object encoding) + u16 LE RDB version + u64 LE
//! CRC-64` where the CRC covers everything before it (`createDumpPayload`); from RDB 13
//! (Redis 8.6) a key with module metadata has KEY_META before its type byte (see mod.rs). The
//! version is Redis's (up to 14) or Valkey 9's (80, 81), which decides the meaning of the type
//! byte (mod.rs). It reaches us as the last argument of `RESTORE key ttl payload [REPLACE] [ABSTTL] ...` in the replication stream.

use bytes::{Bytes, BytesMut};

use super::decoder::{RdbDecoder, CRC64};
use super::{
    HashField, Magic, RdbError, RdbEvent, ValueKind, MAX_REDIS_RDB_VERSION, VALKEY_RDB_VERSIONS,
};

/// The decoded value of a DUMP payload: its kind, and for a hash its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpedValue {
    pub kind: ValueKind,
    pub rdb_version: u16,
    pub fields: Vec<HashField>,
    pub empty: bool,
}

/// Decodes a DUMP payload, verifying its version and checksum.
pub fn decode_dump_payload(payload: &Bytes) -> Result<DumpedValue, RdbError> {
    let len = payload.len();
    if len < 11 {
        return Err(RdbError::Truncated {
            offset: len as u64,
            context: format!("a DUMP payload ({len} bytes; at least 11 needed)"),
        });
    }
    let body_end = len - 10;
    let version = u16::from_le_bytes([payload[body_end], payload[body_end + 1]]);
    // Valkey 9 numbers its formats from 80: a payload of 80 or 81 holds Valkey's types.
    let magic = if VALKEY_RDB_VERSIONS.contains(&u32::from(version)) {
        Magic::Valkey
    } else if u32::from(version) <= MAX_REDIS_RDB_VERSION {
        Magic::Redis
    } else {
        return Err(RdbError::UnsupportedVersion {
            magic: "DUMP payload RDB ".into(),
            version: version.into(),
            max: MAX_REDIS_RDB_VERSION,
        });
    };
    let mut crc_bytes = [0u8; 8];
    crc_bytes.copy_from_slice(&payload[len - 8..]);
    let expected = u64::from_le_bytes(crc_bytes);
    let computed = CRC64.checksum(&payload[..len - 8]);
    if expected != 0 && expected != computed {
        return Err(RdbError::BadChecksum { expected, computed });
    }
    let mut decoder = RdbDecoder::for_dump(magic, version.into());
    let mut input = BytesMut::from(&payload[..body_end]);
    let mut value = DumpedValue {
        kind: ValueKind::String,
        rdb_version: version,
        fields: Vec::new(),
        empty: false,
    };
    let mut ended = false;
    while let Some(event) = decoder.decode(&mut input)? {
        match event {
            RdbEvent::HashField(field) => value.fields.push(field),
            RdbEvent::KeyEnd { empty } => {
                value.empty = empty;
                ended = true;
            }
            _ => {}
        }
    }
    let kind = decoder.dump_kind();
    let Some(kind) = kind.filter(|_| ended) else {
        return Err(RdbError::Truncated {
            offset: decoder.consumed(),
            context: match kind {
                Some(kind) => format!("the DUMP value ({})", kind.name()),
                None => "the type of a DUMP value".into(),
            },
        });
    };
    if !input.is_empty() {
        return Err(RdbError::Malformed {
            offset: decoder.consumed(),
            message: format!("{} bytes after the DUMP value", input.len()),
        });
    }
    value.kind = kind;
    Ok(value)
}
