//! A push-based, streaming decoder for RDB snapshots and DUMP payloads.
//!
//! # Format
//!
//! An RDB file is `magic + version` (9 bytes: `REDIS` + 4 digits, or `VALKEY` + 3 digits for
//! Valkey 9 and later), then a sequence of opcodes and keys, then `0xFF` and (from version 5) an
//! 8-byte little-endian CRC-64/Jones checksum of everything before it (zero = not computed).
//!
//! Top-level opcodes: `0xFA` AUX (two strings; `repl-stream-db`, `repl-id` and `repl-offset`
//! among them), `0xFE` SELECTDB, `0xFB` RESIZEDB, `0xFD`/`0xFC` expiry of the next key in
//! seconds/milliseconds, `0xF8` IDLE and `0xF9` FREQ (eviction hints), `0xF7` MODULE_AUX,
//! `0xF5` FUNCTION2 (a library's source; `0xF6`, the 7.0 release-candidate form, too), `0xF4`
//! SLOT_INFO, and `0xF3`: under `VALKEY` magic SLOT_IMPORT (a job name and slot ranges), under
//! `REDIS` magic KEY_META (RDB 13+, before a key's type byte and at the start of a DUMP payload:
//! a class count of at most 7, then per class a 4-byte spec and module opcodes up to their EOF;
//! skipped). Any other byte is a value type, followed by the key and the value.
//!
//! Lengths and strings use the RDB length encoding (see `cursor.rs`). Hashes are decoded in every
//! encoding Redis and Valkey write: 4 (field/value pairs), 9 (zipmap), 13 (ziplist), 16
//! (listpack), 24 (field TTLs, Redis 7.4+: `minExpire`, then `ttl field value` triples whose
//! `ttl` is relative to it), 25 (listpack of `field value ttl` triples with `minExpire` first),
//! the 7.4 release-candidate forms 22 and 23 (absolute TTLs, no `minExpire`), and Valkey's 22
//! (`field value i64-expiry`, -1 = none). Every other type is skipped by its structure and
//! reported with its key and type, so a consumer can track which keys are not hashes; among
//! them Redis 8.6's stream 26 (type 21 plus an IDMP section after the groups: duration, max
//! entries, producers each with their `iid ms seq` entries, two counters), 8.8's stream 27 (26
//! plus, per group after its consumers, a count of NACKed 16-byte ids) and 8.8's array 28
//! (count, an insert-index flag and index, then `index tag payload` elements: tag 0 and 3 a
//! string, 1 and 2 eight bytes), and Valkey 9.2's PATH_HASH 23 under `VALKEY081` (a path
//! count, then per path its name, a field count of at least one and the field/value strings).
//! Under `VALKEY` magic, opcode 242 (commands a forkless save inlines into the snapshot) is
//! refused: it carries writes, which skipping would lose. Sources: redis and valkey
//! `src/rdb.c`, `rdbSaveObject`; valkey `src/forkless.c`.
//!
//! # Streaming
//!
//! The decoder never needs the whole snapshot: the caller appends bytes to a `BytesMut` and
//! calls [`RdbDecoder::decode`], which consumes what it can and returns one event at a time, or
//! `None` when it needs more bytes. Each step is parsed check-then-parse: it either completes
//! from buffered bytes or leaves the buffer and the decoder untouched. Only one string (or one
//! compact blob) is materialised at a time; large strings of skipped types are skipped without
//! being buffered. Hash fields and values are `Bytes` slices of the consumed input, not copies.
//!
//! Errors name the absolute byte offset in the RDB and what was found there.

mod compact;
pub(crate) mod cursor;
mod decoder;
mod dump;
mod types;

pub use decoder::RdbDecoder;
pub use dump::{decode_dump_payload, DumpedValue};

use bytes::Bytes;

/// Which server family wrote the file; it decides the meaning of type 22/23 and opcode 243.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Magic {
    Redis,
    Valkey,
}

/// Highest `REDIS` RDB version this decoder understands (12: Redis 7.4 to 8.4; 13: 8.6; 14:
/// 8.8).
pub const MAX_REDIS_RDB_VERSION: u32 = 14;
/// The `VALKEY` RDB versions this decoder understands: 80 (Valkey 9.0) and 81 (9.2: PATH_HASH
/// values, skipped; the commands a forkless save inlines are refused, see `types.rs`).
pub const VALKEY_RDB_VERSIONS: std::ops::RangeInclusive<u32> = 80..=81;

/// The logical type of a key, whatever its encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueKind {
    String,
    List,
    Set,
    SortedSet,
    Hash,
    Stream,
    Module,
    /// Redis 8.8's sparse array (RDB type 28).
    Array,
    /// Valkey 9.2's path hash (type 23 under `VALKEY081`): hashes by path, not a hash.
    PathHash,
}

impl ValueKind {
    /// The name `TYPE` returns for it.
    pub fn name(self) -> &'static str {
        match self {
            ValueKind::String => "string",
            ValueKind::List => "list",
            ValueKind::Set => "set",
            ValueKind::SortedSet => "zset",
            ValueKind::Hash => "hash",
            ValueKind::Stream => "stream",
            ValueKind::Module => "module",
            ValueKind::Array => "array",
            ValueKind::PathHash => "pathhash",
        }
    }
}

/// One field of a hash, with its absolute expiry time (Unix ms) when it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashField {
    pub field: Bytes,
    pub value: Bytes,
    pub expire_at_ms: Option<i64>,
}

/// What the checksum trailer said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// The trailer matched the CRC-64 of the file.
    Verified(u64),
    /// The trailer was zero: the writer had `rdbchecksum no`.
    NotComputed,
    /// RDB versions before 5 have no trailer.
    Absent,
}

/// What the decoder found, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RdbEvent {
    Header {
        magic: Magic,
        version: u32,
    },
    Aux {
        key: Bytes,
        value: Bytes,
    },
    /// A Redis Functions library (opcode FUNCTION2), with its source code.
    Function {
        code: Bytes,
    },
    /// Auxiliary data of a module, skipped.
    ModuleAux {
        module: String,
    },
    SelectDb {
        db: u64,
    },
    ResizeDb {
        keys: u64,
        expires: u64,
    },
    /// A key begins. For a hash, its fields follow as `HashField` events; `KeyEnd` closes it.
    KeyStart {
        db: u64,
        key: Bytes,
        kind: ValueKind,
        /// The RDB type byte (its encoding).
        type_byte: u8,
        expire_at_ms: Option<i64>,
    },
    HashField(HashField),
    /// The value of the current key ended. `empty` is true when the collection held no element
    /// (Redis skips such keys when loading; so should a consumer).
    KeyEnd {
        empty: bool,
    },
    /// The end of the file; the decoder consumed exactly the RDB and nothing after it.
    End {
        checksum: Checksum,
    },
}

/// A malformed, truncated or unsupported RDB.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RdbError {
    #[error("RDB byte {offset}: {message}")]
    Malformed { offset: u64, message: String },
    #[error(
        "RDB checksum mismatch: the file says {expected:016x}, its bytes give {computed:016x}"
    )]
    BadChecksum { expected: u64, computed: u64 },
    #[error("RDB byte {offset}: input ends in the middle of {context}")]
    Truncated { offset: u64, context: String },
    #[error("unsupported RDB format {magic}{version:04}: this writebehind reads REDIS versions 1 to {max} and VALKEY 80 and 81")]
    UnsupportedVersion {
        magic: String,
        version: u32,
        max: u32,
    },
}
