//! The RDB state machine. See the module documentation of [`super`] for the format.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};
use crc::{Crc, Digest, Table, CRC_64_REDIS};

use super::cursor::{malformed, Cursor, StepError, StepResult, StrRef};
pub(crate) use super::types::kind_of;
use super::types::module_name;
use super::{
    Checksum, HashField, Magic, RdbError, RdbEvent, ValueKind, MAX_REDIS_RDB_VERSION,
    VALKEY_RDB_VERSIONS,
};

/// CRC-64/Jones as Redis computes it (`crc64.c`), slice-by-16 for speed.
pub(crate) static CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_REDIS);

/// 243 is Valkey's SLOT_IMPORT under `VALKEY` magic and Redis's KEY_META (RDB 13+) under `REDIS`.
const OP_SLOT_IMPORT_VALKEY: u8 = 0xF3;
/// Valkey's UPDATE: a command (RESP) a forkless save inlines into the snapshot; refused.
const OP_INLINE_COMMAND_VALKEY: u8 = 0xF2;
const OP_KEY_META_REDIS: u8 = 0xF3;
/// A key carries at most this many classes of metadata (Redis: 7, `rdbSaveKeyMetadata`).
const KEY_META_MAX_CLASSES: u64 = 7;
const OP_SLOT_INFO: u8 = 0xF4;
const OP_FUNCTION2: u8 = 0xF5;
const OP_FUNCTION_PRE_GA: u8 = 0xF6;
const OP_MODULE_AUX: u8 = 0xF7;
const OP_IDLE: u8 = 0xF8;
const OP_FREQ: u8 = 0xF9;
const OP_AUX: u8 = 0xFA;
const OP_RESIZEDB: u8 = 0xFB;
const OP_EXPIRETIME_MS: u8 = 0xFC;
const OP_EXPIRETIME: u8 = 0xFD;
const OP_SELECTDB: u8 = 0xFE;
const OP_EOF: u8 = 0xFF;

/// Module opcodes inside MODULE_AUX and module values (`rdbLoadCheckModuleValue`).
const MODULE_OP_EOF: u64 = 0;
const MODULE_OP_SINT: u64 = 1;
const MODULE_OP_UINT: u64 = 2;
const MODULE_OP_FLOAT: u64 = 3;
const MODULE_OP_DOUBLE: u64 = 4;
const MODULE_OP_STRING: u64 = 5;

#[path = "decoder_values.rs"]
mod values;

#[derive(Debug, Clone)]
enum State {
    Magic,
    TopLevel,
    /// Module opcodes until `MODULE_OP_EOF`, for MODULE_AUX, a module value or a class of key
    /// metadata.
    ModuleOps {
        of: ModuleData,
    },
    /// KEY_META (Redis RDB 13+): classes of module metadata of the next key, each a 4-byte
    /// class spec and module opcodes; the key's type byte follows.
    KeyMeta {
        classes_left: u64,
    },
    /// The type byte of a DUMP payload (after its KEY_META, if any).
    DumpType,
    Value(Value),
    Checksum,
    Done,
    Failed,
}

/// What a run of module opcodes belongs to: where the decoder goes at its `MODULE_OP_EOF`.
#[derive(Debug, Clone, Copy)]
enum ModuleData {
    Aux,
    Value,
    KeyMeta { classes_left: u64 },
}

#[derive(Debug, Clone)]
struct Value {
    type_byte: u8,
    phase: Phase,
    nonempty: bool,
}

#[derive(Debug, Clone)]
enum Phase {
    Start,
    Items {
        remaining: u64,
        shape: Shape,
        part: u8,
    },
    StreamMeta,
    StreamGroups {
        remaining: u64,
    },
    /// Streams 26 and 27: the IDMP settings and the producer count after the groups.
    StreamIdmp,
    StreamProducers {
        remaining: u64,
    },
    End,
}

/// The layout of one element of a length-prefixed collection.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// One string (list, set, quicklist v1 node is `QuicklistNode`).
    Str,
    /// Member string + score as a length-prefixed ASCII double (type 3).
    ZsetAscii,
    /// Member string + 8-byte binary double (type 5).
    ZsetBinary,
    /// Field string + value string (type 4).
    HashPair,
    /// TTL length (relative to `min_expire`, 0 = none) + field + value (type 24).
    HashTtlRelative { min_expire: i64 },
    /// TTL length (absolute ms, 0 = none) + field + value (type 22, Redis 7.4 RCs).
    HashTtlAbsolute,
    /// Field + value + i64 expiry (-1 = none) (type 22 under VALKEY magic).
    ValkeyHash2,
    /// A ziplist node of a quicklist (type 14).
    QuicklistNode,
    /// Container kind (1 plain, 2 packed) + node (type 18).
    Quicklist2Node,
    /// Master ID string + listpack string of a stream.
    StreamListpack,
    /// Index + tag + payload of an array element (type 28).
    ArrayElement,
    /// A path of a path hash: its name, then its field count (Valkey type 23).
    PathHashPath,
    /// The field and value strings of a path hash's path, then `paths_after` more paths.
    PathHashString { paths_after: u64 },
}

/// An event whose strings still point into the input being consumed.
enum Staged {
    Ready(RdbEvent),
    Aux {
        key: StrRef,
        value: StrRef,
    },
    Function {
        code: StrRef,
    },
    KeyStart {
        db: u64,
        key: StrRef,
        kind: ValueKind,
        type_byte: u8,
        expire_at_ms: Option<i64>,
    },
    Field {
        field: StrRef,
        value: StrRef,
        expire_at_ms: Option<i64>,
    },
}

impl Staged {
    fn resolve(self, frozen: &Bytes) -> RdbEvent {
        match self {
            Staged::Ready(event) => event,
            Staged::Aux { key, value } => RdbEvent::Aux {
                key: key.resolve(frozen),
                value: value.resolve(frozen),
            },
            Staged::Function { code } => RdbEvent::Function {
                code: code.resolve(frozen),
            },
            Staged::KeyStart {
                db,
                key,
                kind,
                type_byte,
                expire_at_ms,
            } => RdbEvent::KeyStart {
                db,
                key: key.resolve(frozen),
                kind,
                type_byte,
                expire_at_ms,
            },
            Staged::Field {
                field,
                value,
                expire_at_ms,
            } => RdbEvent::HashField(HashField {
                field: field.resolve(frozen),
                value: value.resolve(frozen),
                expire_at_ms,
            }),
        }
    }

    fn borrows_input(&self) -> bool {
        let slice = |s: &StrRef| matches!(s, StrRef::Slice(_));
        match self {
            Staged::Ready(_) => false,
            Staged::Aux { key, value } => slice(key) || slice(value),
            Staged::Function { code } => slice(code),
            Staged::KeyStart { key, .. } => slice(key),
            Staged::Field { field, value, .. } => slice(field) || slice(value),
        }
    }
}

/// Decodes an RDB pushed to it in pieces. See the [module documentation](super).
///
/// ```
/// use bytes::BytesMut;
/// use writebehind::replication::rdb::{RdbDecoder, RdbEvent};
/// let mut decoder = RdbDecoder::new();
/// let mut input = BytesMut::from(&b"REDIS0003"[..]);
/// assert!(matches!(decoder.decode(&mut input), Ok(Some(RdbEvent::Header { version: 3, .. }))));
/// assert_eq!(decoder.decode(&mut input), Ok(None)); // needs more bytes
/// input.extend_from_slice(&[0xff]);
/// assert!(matches!(decoder.decode(&mut input), Ok(Some(RdbEvent::End { .. }))));
/// assert!(decoder.is_done());
/// ```
pub struct RdbDecoder {
    state: State,
    /// Payload bytes of a skipped string still to be consumed before `state` continues.
    skip: u64,
    consumed: u64,
    crc: Option<Digest<'static, u64, Table<16>>>,
    magic: Magic,
    version: u32,
    db: u64,
    pending_expire: Option<i64>,
    staged: Vec<Staged>,
    ready: VecDeque<RdbEvent>,
    /// DUMP payload mode: a single value, no key, no header.
    value_only: bool,
    /// DUMP payload mode: the kind of the value, once its type byte is read.
    dump_kind: Option<ValueKind>,
}

impl Default for RdbDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl RdbDecoder {
    /// A decoder for a whole RDB file or replication snapshot, starting at its magic.
    pub fn new() -> Self {
        RdbDecoder {
            state: State::Magic,
            skip: 0,
            consumed: 0,
            crc: None,
            magic: Magic::Redis,
            version: 0,
            db: 0,
            pending_expire: None,
            staged: Vec::new(),
            ready: VecDeque::new(),
            value_only: false,
            dump_kind: None,
        }
    }

    /// A decoder for the body of a DUMP payload: one value, starting at its type byte (or,
    /// Redis RDB 13+, its KEY_META).
    pub(crate) fn for_dump(magic: Magic, version: u32) -> Self {
        let mut decoder = RdbDecoder::new();
        decoder.magic = magic;
        decoder.version = version;
        decoder.value_only = true;
        decoder.state = State::DumpType;
        decoder
    }

    /// The kind of a DUMP payload's value, once its type byte is decoded.
    pub(crate) fn dump_kind(&self) -> Option<ValueKind> {
        self.dump_kind
    }

    /// Bytes consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// True once the EOF opcode (and checksum) were consumed: the RDB is complete.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done) && self.ready.is_empty()
    }

    /// The database selected by the last SELECTDB.
    pub fn current_db(&self) -> u64 {
        self.db
    }

    /// Consumes what it can from the front of `input` and returns the next event, or `None`
    /// when more input is needed (or the RDB is done). Bytes after the end of the RDB are left
    /// in `input` untouched.
    pub fn decode(&mut self, input: &mut BytesMut) -> Result<Option<RdbEvent>, RdbError> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(Some(event));
            }
            match self.state {
                State::Done => return Ok(None),
                State::Failed => {
                    return Err(RdbError::Malformed {
                        offset: self.consumed,
                        message: "the decoder already failed".into(),
                    })
                }
                _ => {}
            }
            if self.skip > 0 {
                if input.is_empty() {
                    return Ok(None);
                }
                let n = self.skip.min(input.len() as u64) as usize;
                self.consume_discarding(input, n);
                self.skip -= n as u64;
                continue;
            }
            let saved = (self.state.clone(), self.db, self.pending_expire);
            let mut cursor = Cursor::new(&input[..]);
            match self.step(&mut cursor) {
                Ok(()) => {
                    let used = cursor.pos;
                    if self.staged.iter().any(Staged::borrows_input) {
                        let frozen = self.consume(input, used);
                        for staged in self.staged.drain(..) {
                            self.ready.push_back(staged.resolve(&frozen));
                        }
                    } else {
                        self.consume_discarding(input, used);
                        let empty = Bytes::new();
                        for staged in self.staged.drain(..) {
                            self.ready.push_back(staged.resolve(&empty));
                        }
                    }
                }
                Err(StepError::Incomplete) => {
                    (self.state, self.db, self.pending_expire) = saved;
                    self.staged.clear();
                    return Ok(None);
                }
                Err(StepError::Malformed { at, message }) => {
                    self.state = State::Failed;
                    return Err(RdbError::Malformed {
                        offset: self.consumed + at as u64,
                        message,
                    });
                }
                Err(StepError::Rejected(error)) => {
                    self.state = State::Failed;
                    return Err(error);
                }
            }
        }
    }

    /// Call when the input has ended: an error unless the RDB was complete.
    pub fn finish(&self) -> Result<(), RdbError> {
        if self.is_done() || (self.value_only && matches!(self.state, State::Done)) {
            return Ok(());
        }
        Err(RdbError::Truncated {
            offset: self.consumed,
            context: self.describe_state(),
        })
    }

    fn describe_state(&self) -> String {
        match &self.state {
            State::Magic => "the header".into(),
            State::TopLevel => "the opcode stream (no EOF opcode yet)".into(),
            State::ModuleOps { .. } => "module data".into(),
            State::KeyMeta { .. } => "key metadata (KEY_META)".into(),
            State::DumpType => "the type of a DUMP payload".into(),
            State::Value(value) => format!("a value of RDB type {}", value.type_byte),
            State::Checksum => "the checksum trailer".into(),
            State::Done | State::Failed => "nothing".into(),
        }
    }

    fn consume(&mut self, input: &mut BytesMut, n: usize) -> Bytes {
        if let Some(digest) = &mut self.crc {
            digest.update(&input[..n]);
        }
        self.consumed += n as u64;
        input.split_to(n).freeze()
    }

    fn consume_discarding(&mut self, input: &mut BytesMut, n: usize) {
        if let Some(digest) = &mut self.crc {
            digest.update(&input[..n]);
        }
        self.consumed += n as u64;
        input.advance(n);
    }

    fn step(&mut self, cur: &mut Cursor<'_>) -> StepResult<()> {
        match self.state.clone() {
            State::Magic => self.step_magic(cur),
            State::TopLevel => self.step_top_level(cur),
            State::ModuleOps { of } => self.step_module_op(cur, of),
            State::KeyMeta { classes_left } => self.step_key_meta(cur, classes_left),
            State::DumpType => self.step_dump_type(cur),
            State::Value(value) => self.step_value(cur, value),
            State::Checksum => self.step_checksum(cur),
            State::Done | State::Failed => Ok(()),
        }
    }

    fn step_magic(&mut self, cur: &mut Cursor<'_>) -> StepResult<()> {
        let header = cur.array::<9>()?;
        let (magic, digits, name) = if header.starts_with(b"REDIS") {
            (Magic::Redis, &header[5..], "REDIS")
        } else if header.starts_with(b"VALKEY") {
            (Magic::Valkey, &header[6..], "VALKEY")
        } else {
            return malformed(
                0,
                format!(
                    "not an RDB: the file starts with {:?}",
                    String::from_utf8_lossy(&header)
                ),
            );
        };
        let version: u32 = std::str::from_utf8(digits)
            .ok()
            .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| StepError::Malformed {
                at: name.len(),
                message: format!(
                    "RDB version digits {:?} are not a number",
                    String::from_utf8_lossy(digits)
                ),
            })?;
        let supported = match magic {
            Magic::Redis => (1..=MAX_REDIS_RDB_VERSION).contains(&version),
            Magic::Valkey => VALKEY_RDB_VERSIONS.contains(&version),
        };
        if !supported {
            return Err(StepError::Rejected(RdbError::UnsupportedVersion {
                magic: name.into(),
                version,
                max: MAX_REDIS_RDB_VERSION,
            }));
        }
        self.magic = magic;
        self.version = version;
        if version >= 5 {
            self.crc = Some(CRC64.digest());
        }
        self.staged
            .push(Staged::Ready(RdbEvent::Header { magic, version }));
        self.state = State::TopLevel;
        Ok(())
    }

    fn step_top_level(&mut self, cur: &mut Cursor<'_>) -> StepResult<()> {
        let at = cur.pos;
        let op = cur.u8()?;
        match op {
            OP_AUX => {
                let key = cur.string()?;
                let value = cur.string()?;
                self.staged.push(Staged::Aux { key, value });
            }
            OP_SELECTDB => {
                self.db = cur.length()?;
                self.staged
                    .push(Staged::Ready(RdbEvent::SelectDb { db: self.db }));
            }
            OP_RESIZEDB => {
                let keys = cur.length()?;
                let expires = cur.length()?;
                self.staged
                    .push(Staged::Ready(RdbEvent::ResizeDb { keys, expires }));
            }
            OP_EXPIRETIME => self.pending_expire = Some(i64::from(cur.i32_le()?) * 1000),
            OP_EXPIRETIME_MS => self.pending_expire = Some(cur.i64_le()?),
            OP_IDLE => {
                cur.length()?;
            }
            OP_FREQ => {
                cur.u8()?;
            }
            OP_MODULE_AUX => {
                let module_id = cur.length()?;
                let when_opcode = cur.length()?;
                let _when = cur.length()?;
                if when_opcode != MODULE_OP_UINT {
                    return malformed(
                        at,
                        format!(
                            "MODULE_AUX of {} has when-opcode {when_opcode}, expected 2",
                            module_name(module_id)
                        ),
                    );
                }
                self.staged.push(Staged::Ready(RdbEvent::ModuleAux {
                    module: module_name(module_id),
                }));
                self.state = State::ModuleOps {
                    of: ModuleData::Aux,
                };
            }
            OP_FUNCTION_PRE_GA => {
                // Redis 7.0 release candidates: name, engine, has-description flag,
                // [description], code. Redis 7.0 still loads it.
                cur.string()?;
                cur.string()?;
                if cur.length()? != 0 {
                    cur.string()?;
                }
                let code = cur.string()?;
                self.staged.push(Staged::Function { code });
            }
            OP_FUNCTION2 => {
                let code = cur.string()?;
                self.staged.push(Staged::Function { code });
            }
            OP_SLOT_INFO => {
                cur.length()?;
                cur.length()?;
                cur.length()?;
            }
            OP_KEY_META_REDIS if self.magic == Magic::Redis => self.start_key_meta(cur, at)?,
            OP_SLOT_IMPORT_VALKEY if self.magic == Magic::Valkey => {
                cur.string()?;
                let ranges = cur.length()?;
                for _ in 0..ranges {
                    cur.length()?;
                    cur.length()?;
                }
            }
            OP_INLINE_COMMAND_VALKEY if self.magic == Magic::Valkey => {
                return malformed(
                    at,
                    "opcode 242, a command inlined by a forkless save (Valkey 9.2), carries a \
                     write that cannot be skipped; turn forkless saves off for replicas on the \
                     primary",
                );
            }
            OP_EOF => {
                if self.value_only {
                    return malformed(at, "EOF opcode inside a DUMP payload");
                }
                if self.version >= 5 {
                    self.state = State::Checksum;
                } else {
                    self.staged.push(Staged::Ready(RdbEvent::End {
                        checksum: Checksum::Absent,
                    }));
                    self.state = State::Done;
                }
            }
            type_byte => {
                let kind = kind_of(type_byte, self.magic, self.version).map_err(|e| {
                    StepError::Malformed {
                        at,
                        message: e.to_string(),
                    }
                })?;
                let key = cur.string()?;
                self.staged.push(Staged::KeyStart {
                    db: self.db,
                    key,
                    kind,
                    type_byte,
                    expire_at_ms: self.pending_expire.take(),
                });
                self.state = State::Value(Value {
                    type_byte,
                    phase: Phase::Start,
                    nonempty: false,
                });
            }
        }
        Ok(())
    }

    /// KEY_META's class count (`rdbSaveKeyMetadata`); the classes follow.
    fn start_key_meta(&mut self, cur: &mut Cursor<'_>, at: usize) -> StepResult<()> {
        let classes = cur.length()?;
        if classes > KEY_META_MAX_CLASSES {
            return malformed(
                at,
                format!("KEY_META with {classes} classes (at most {KEY_META_MAX_CLASSES})"),
            );
        }
        self.state = State::KeyMeta {
            classes_left: classes,
        };
        Ok(())
    }

    /// One class of key metadata: its 4-byte spec (name, version, flags), then its values as
    /// module opcodes up to `MODULE_OP_EOF`; after the last class, the key's type byte.
    fn step_key_meta(&mut self, cur: &mut Cursor<'_>, classes_left: u64) -> StepResult<()> {
        if classes_left == 0 {
            self.state = match self.value_only {
                true => State::DumpType,
                false => State::TopLevel,
            };
            return Ok(());
        }
        cur.take(4)?;
        self.state = State::ModuleOps {
            of: ModuleData::KeyMeta {
                classes_left: classes_left - 1,
            },
        };
        Ok(())
    }

    /// A DUMP payload starts with its type byte, or (Redis RDB 13+) with KEY_META and then it.
    fn step_dump_type(&mut self, cur: &mut Cursor<'_>) -> StepResult<()> {
        let at = cur.pos;
        let type_byte = cur.u8()?;
        if type_byte == OP_KEY_META_REDIS && self.magic == Magic::Redis && self.version >= 13 {
            return self.start_key_meta(cur, at);
        }
        let kind =
            kind_of(type_byte, self.magic, self.version).map_err(|e| StepError::Malformed {
                at,
                message: e.to_string(),
            })?;
        self.dump_kind = Some(kind);
        self.state = State::Value(Value {
            type_byte,
            phase: Phase::Start,
            nonempty: false,
        });
        Ok(())
    }

    fn step_module_op(&mut self, cur: &mut Cursor<'_>, of: ModuleData) -> StepResult<()> {
        let at = cur.pos;
        match cur.length()? {
            MODULE_OP_EOF => match of {
                ModuleData::Aux => self.state = State::TopLevel,
                ModuleData::Value => self.end_value(true),
                ModuleData::KeyMeta { classes_left } => {
                    self.state = State::KeyMeta { classes_left }
                }
            },
            MODULE_OP_SINT | MODULE_OP_UINT => {
                cur.length()?;
            }
            MODULE_OP_FLOAT => {
                cur.take(4)?;
            }
            MODULE_OP_DOUBLE => {
                cur.take(8)?;
            }
            MODULE_OP_STRING => self.skip = cur.skip_string()?,
            other => return malformed(at, format!("unknown module opcode {other}")),
        }
        Ok(())
    }

    fn step_checksum(&mut self, cur: &mut Cursor<'_>) -> StepResult<()> {
        let expected = u64::from_le_bytes(cur.array::<8>()?);
        let checksum = if expected == 0 {
            Checksum::NotComputed
        } else {
            let computed = self.crc.clone().map(|d| d.finalize()).unwrap_or_default();
            if computed != expected {
                return Err(StepError::Rejected(RdbError::BadChecksum {
                    expected,
                    computed,
                }));
            }
            Checksum::Verified(expected)
        };
        self.staged.push(Staged::Ready(RdbEvent::End { checksum }));
        self.state = State::Done;
        Ok(())
    }
}
