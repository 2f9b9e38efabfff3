//! The RDB state machine. See the module documentation of [`super`] for the format.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};
use crc::{Crc, Digest, Table, CRC_64_REDIS};

use super::compact::{self, Entry};
use super::cursor::{decimal, malformed, Cursor, StepError, StepResult, StrRef};
use super::{
    Checksum, HashField, Magic, RdbError, RdbEvent, ValueKind, MAX_REDIS_RDB_VERSION,
    VALKEY_RDB_VERSION,
};

/// CRC-64/Jones as Redis computes it (`crc64.c`), slice-by-16 for speed.
pub(crate) static CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_REDIS);

const OP_SLOT_IMPORT_VALKEY: u8 = 0xF3;
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

#[derive(Debug, Clone)]
enum State {
    Magic,
    TopLevel,
    /// Module opcodes until `MODULE_OP_EOF`, for MODULE_AUX (`in_value` false) or a module value.
    ModuleOps {
        in_value: bool,
    },
    Value(Value),
    Checksum,
    Done,
    Failed,
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
        }
    }

    /// A decoder for one value of the given RDB type (the body of a DUMP payload).
    pub(crate) fn for_value(type_byte: u8, magic: Magic, version: u32) -> Result<Self, RdbError> {
        kind_of(type_byte, magic).map_err(|e| RdbError::Malformed {
            offset: 0,
            message: e.to_string(),
        })?;
        let mut decoder = RdbDecoder::new();
        decoder.magic = magic;
        decoder.version = version;
        decoder.value_only = true;
        decoder.state = State::Value(Value {
            type_byte,
            phase: Phase::Start,
            nonempty: false,
        });
        Ok(decoder)
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
            State::ModuleOps { in_value } => self.step_module_op(cur, in_value),
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
            Magic::Valkey => version == VALKEY_RDB_VERSION,
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
                self.state = State::ModuleOps { in_value: false };
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
            OP_SLOT_IMPORT_VALKEY if self.magic == Magic::Valkey => {
                cur.string()?;
                let ranges = cur.length()?;
                for _ in 0..ranges {
                    cur.length()?;
                    cur.length()?;
                }
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
                let kind = kind_of(type_byte, self.magic).map_err(|e| StepError::Malformed {
                    at,
                    message: e.to_string(),
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

    fn step_module_op(&mut self, cur: &mut Cursor<'_>, in_value: bool) -> StepResult<()> {
        let at = cur.pos;
        match cur.length()? {
            MODULE_OP_EOF => {
                self.state = State::TopLevel;
                if in_value {
                    self.end_value(true);
                }
            }
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

    fn end_value(&mut self, nonempty: bool) {
        self.staged
            .push(Staged::Ready(RdbEvent::KeyEnd { empty: !nonempty }));
        self.state = if self.value_only {
            State::Done
        } else {
            State::TopLevel
        };
    }

    fn set_phase(&mut self, mut value: Value, phase: Phase) {
        value.phase = phase;
        self.state = State::Value(value);
    }

    fn step_value(&mut self, cur: &mut Cursor<'_>, value: Value) -> StepResult<()> {
        match value.phase {
            Phase::Start => self.start_value(cur, value),
            Phase::Items {
                remaining: 0,
                shape: Shape::StreamListpack,
                ..
            } => {
                self.set_phase(value, Phase::StreamMeta);
                Ok(())
            }
            Phase::Items { remaining: 0, .. } | Phase::End => {
                self.end_value(value.nonempty);
                Ok(())
            }
            Phase::Items {
                remaining,
                shape,
                part,
            } => self.step_item(cur, value, remaining, shape, part),
            Phase::StreamMeta => {
                // length, last id (ms, seq); v2+: first id, max deleted id, entries added.
                let fields = if value.type_byte >= 19 { 8 } else { 3 };
                for _ in 0..fields {
                    cur.length()?;
                }
                let groups = cur.length()?;
                self.set_phase(value, Phase::StreamGroups { remaining: groups });
                Ok(())
            }
            Phase::StreamGroups { remaining: 0 } => {
                self.end_value(true);
                Ok(())
            }
            Phase::StreamGroups { remaining } => {
                self.skip_stream_group(cur, value.type_byte)?;
                self.set_phase(
                    value,
                    Phase::StreamGroups {
                        remaining: remaining - 1,
                    },
                );
                Ok(())
            }
        }
    }

    fn start_value(&mut self, cur: &mut Cursor<'_>, mut value: Value) -> StepResult<()> {
        let at = cur.pos;
        let items = |remaining: u64, shape: Shape| Phase::Items {
            remaining,
            shape,
            part: 0,
        };
        let phase = match value.type_byte {
            0 => {
                self.skip = cur.skip_string()?;
                value.nonempty = true;
                Phase::End
            }
            1 | 2 => {
                let n = cur.length()?;
                value.nonempty = n > 0;
                items(n, Shape::Str)
            }
            3 | 5 => {
                let n = cur.length()?;
                value.nonempty = n > 0;
                items(
                    n,
                    if value.type_byte == 3 {
                        Shape::ZsetAscii
                    } else {
                        Shape::ZsetBinary
                    },
                )
            }
            4 => items(cur.length()?, Shape::HashPair),
            7 => {
                let _module_id = cur.length()?;
                self.state = State::ModuleOps { in_value: true };
                return Ok(());
            }
            9 => {
                let blob = cur.string()?;
                let pairs = compact::zipmap_pairs(blob.as_slice(cur.data()))
                    .map_err(|e| blob_error(at, &blob, "zipmap", e))?;
                for (field, val) in pairs {
                    value.nonempty = true;
                    self.staged.push(Staged::Field {
                        field: sub(&blob, field),
                        value: sub(&blob, val),
                        expire_at_ms: None,
                    });
                }
                Phase::End
            }
            13 | 16 => {
                let blob = cur.string()?;
                let (entries, what) = if value.type_byte == 13 {
                    (
                        compact::ziplist_entries(blob.as_slice(cur.data())),
                        "ziplist",
                    )
                } else {
                    (
                        compact::listpack_entries(blob.as_slice(cur.data())),
                        "listpack",
                    )
                };
                let entries = entries.map_err(|e| blob_error(at, &blob, what, e))?;
                self.stage_packed_fields(at, &blob, &entries, 2, &mut value)?;
                Phase::End
            }
            10 | 12 => {
                let blob = cur.string()?;
                value.nonempty = !compact::packed_is_empty(blob.as_slice(cur.data()), 10);
                Phase::End
            }
            17 | 20 => {
                let blob = cur.string()?;
                value.nonempty = !compact::packed_is_empty(blob.as_slice(cur.data()), 6);
                Phase::End
            }
            11 => {
                let blob = cur.string()?;
                let len = compact::intset_len(blob.as_slice(cur.data()))
                    .map_err(|e| blob_error(at, &blob, "intset", e))?;
                value.nonempty = len > 0;
                Phase::End
            }
            14 => items(cur.length()?, Shape::QuicklistNode),
            18 => items(cur.length()?, Shape::Quicklist2Node),
            15 | 19 | 21 => {
                value.nonempty = true;
                items(cur.length()?, Shape::StreamListpack)
            }
            22 if self.magic == Magic::Valkey => items(cur.length()?, Shape::ValkeyHash2),
            22 => items(cur.length()?, Shape::HashTtlAbsolute),
            24 => {
                let min_expire = cur.i64_le()?;
                items(cur.length()?, Shape::HashTtlRelative { min_expire })
            }
            23 | 25 => {
                // 25: minExpire first; 23 (7.4 RC) has none. TTLs in the listpack are absolute.
                if value.type_byte == 25 {
                    cur.i64_le()?;
                }
                let blob = cur.string()?;
                let entries = compact::listpack_entries(blob.as_slice(cur.data()))
                    .map_err(|e| blob_error(at, &blob, "listpack", e))?;
                self.stage_packed_fields(at, &blob, &entries, 3, &mut value)?;
                Phase::End
            }
            other => return malformed(at, format!("unknown RDB value type {other}")),
        };
        self.set_phase(value, phase);
        Ok(())
    }

    /// Stages the fields of a hash stored as a ziplist or listpack: entries in groups of
    /// `width`, field and value, and for width 3 an absolute expiry (0 = none).
    fn stage_packed_fields(
        &mut self,
        at: usize,
        blob: &StrRef,
        entries: &[Entry],
        width: usize,
        value: &mut Value,
    ) -> StepResult<()> {
        if entries.len() % width != 0 {
            return malformed(
                at,
                format!(
                    "hash blob has {} entries, not a multiple of {width}",
                    entries.len()
                ),
            );
        }
        for group in entries.chunks_exact(width) {
            let expire_at_ms = match group.get(2) {
                None | Some(Entry::Int(0)) => None,
                Some(Entry::Int(ms)) => Some(*ms),
                Some(Entry::Bytes(_)) => {
                    return malformed(at, "hash field TTL entry is a string, expected an integer")
                }
            };
            value.nonempty = true;
            self.staged.push(Staged::Field {
                field: entry_str(blob, &group[0]),
                value: entry_str(blob, &group[1]),
                expire_at_ms,
            });
        }
        Ok(())
    }

    fn step_item(
        &mut self,
        cur: &mut Cursor<'_>,
        mut value: Value,
        remaining: u64,
        shape: Shape,
        part: u8,
    ) -> StepResult<()> {
        let at = cur.pos;
        let mut next_part = 0;
        match (shape, part) {
            (Shape::Str, _) => self.skip = cur.skip_string()?,
            (Shape::ZsetAscii | Shape::ZsetBinary | Shape::StreamListpack, 0) => {
                self.skip = cur.skip_string()?;
                next_part = 1;
            }
            (Shape::ZsetAscii, _) => {
                let len = cur.u8()?;
                // 253, 254, 255 stand for NaN, +inf, -inf without digits.
                if len < 253 {
                    cur.take(u64::from(len))?;
                }
            }
            (Shape::ZsetBinary, _) => {
                cur.take(8)?;
            }
            (Shape::StreamListpack, _) => self.skip = cur.skip_string()?,
            (Shape::HashPair, _) => {
                let field = cur.string()?;
                let val = cur.string()?;
                value.nonempty = true;
                self.staged.push(Staged::Field {
                    field,
                    value: val,
                    expire_at_ms: None,
                });
            }
            (Shape::HashTtlRelative { min_expire }, _) => {
                let ttl = cur.length()?;
                let field = cur.string()?;
                let val = cur.string()?;
                let expire_at_ms = if ttl == 0 {
                    None
                } else {
                    let ttl = i64::try_from(ttl).map_err(|_| StepError::Malformed {
                        at,
                        message: format!("field TTL {ttl} out of range"),
                    })?;
                    Some(ttl.saturating_add(min_expire).saturating_sub(1))
                };
                value.nonempty = true;
                self.staged.push(Staged::Field {
                    field,
                    value: val,
                    expire_at_ms,
                });
            }
            (Shape::HashTtlAbsolute, _) => {
                let ttl = cur.length()?;
                let field = cur.string()?;
                let val = cur.string()?;
                value.nonempty = true;
                self.staged.push(Staged::Field {
                    field,
                    value: val,
                    expire_at_ms: if ttl == 0 {
                        None
                    } else {
                        i64::try_from(ttl).ok()
                    },
                });
            }
            (Shape::ValkeyHash2, _) => {
                let field = cur.string()?;
                let val = cur.string()?;
                let expiry = cur.i64_le()?;
                value.nonempty = true;
                self.staged.push(Staged::Field {
                    field,
                    value: val,
                    expire_at_ms: (expiry >= 0).then_some(expiry),
                });
            }
            (Shape::QuicklistNode, _) => {
                let blob = cur.string()?;
                value.nonempty |= !compact::packed_is_empty(blob.as_slice(cur.data()), 10);
            }
            (Shape::Quicklist2Node, _) => match cur.length()? {
                1 => {
                    self.skip = cur.skip_string()?;
                    value.nonempty = true;
                }
                2 => {
                    let blob = cur.string()?;
                    value.nonempty |= !compact::packed_is_empty(blob.as_slice(cur.data()), 6);
                }
                other => return malformed(at, format!("unknown quicklist container kind {other}")),
            },
        }
        let remaining = if next_part == 0 {
            remaining - 1
        } else {
            remaining
        };
        self.set_phase(
            value,
            Phase::Items {
                remaining,
                shape,
                part: next_part,
            },
        );
        Ok(())
    }

    fn skip_stream_group(&mut self, cur: &mut Cursor<'_>, type_byte: u8) -> StepResult<()> {
        cur.string()?; // group name
        cur.length()?; // last delivered id: ms
        cur.length()?; // and seq
        if type_byte >= 19 {
            cur.length()?; // entries read
        }
        let pending = cur.length()?;
        for _ in 0..pending {
            cur.take(16 + 8)?; // raw id, delivery time
            cur.length()?; // delivery count
        }
        let consumers = cur.length()?;
        for _ in 0..consumers {
            cur.string()?; // name
            cur.take(if type_byte >= 21 { 16 } else { 8 })?; // seen time (+ active time)
            let owned = cur.length()?;
            let at = cur.pos;
            let bytes = owned.checked_mul(16).ok_or(StepError::Malformed {
                at,
                message: format!("consumer PEL size {owned} overflows"),
            })?;
            cur.take(bytes)?;
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

/// An RDB type byte this decoder cannot read or skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UnreadableType {
    #[error("Valkey PATH_HASH values (type 23) are not supported")]
    PathHash,
    #[error("module value in the pre-release format (type 6) cannot be skipped")]
    PreReleaseModule,
    #[error("unknown RDB value type or opcode {0}")]
    Unknown(u8),
}

/// The logical kind of an RDB type byte; 22 and 23 depend on who wrote the file.
pub(crate) fn kind_of(type_byte: u8, magic: Magic) -> Result<ValueKind, UnreadableType> {
    Ok(match type_byte {
        0 => ValueKind::String,
        1 | 10 | 14 | 18 => ValueKind::List,
        2 | 11 | 20 => ValueKind::Set,
        3 | 5 | 12 | 17 => ValueKind::SortedSet,
        4 | 9 | 13 | 16 | 22 | 24 | 25 => ValueKind::Hash,
        23 if magic == Magic::Redis => ValueKind::Hash,
        23 => return Err(UnreadableType::PathHash),
        6 => return Err(UnreadableType::PreReleaseModule),
        7 => ValueKind::Module,
        15 | 19 | 21 => ValueKind::Stream,
        other => return Err(UnreadableType::Unknown(other)),
    })
}

/// A module's name from its 64-bit id: nine characters of six bits each, then ten bits of
/// encoding version (`moduleTypeNameByID`).
fn module_name(id: u64) -> String {
    const CHARSET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits = id >> 10;
    let mut name = [0u8; 9];
    for slot in name.iter_mut().rev() {
        *slot = CHARSET[(bits & 63) as usize];
        bits >>= 6;
    }
    String::from_utf8_lossy(&name).into_owned()
}

/// A string inside a blob, as a reference usable once the input is frozen.
fn sub(blob: &StrRef, range: std::ops::Range<usize>) -> StrRef {
    match blob {
        StrRef::Slice(outer) => StrRef::Slice(outer.start + range.start..outer.start + range.end),
        StrRef::Owned(bytes) => StrRef::Owned(bytes.slice(range)),
    }
}

fn entry_str(blob: &StrRef, entry: &Entry) -> StrRef {
    match entry {
        Entry::Bytes(range) => sub(blob, range.clone()),
        Entry::Int(value) => decimal(*value),
    }
}

fn blob_error(at: usize, blob: &StrRef, what: &str, error: compact::BlobError) -> StepError {
    let (at, note) = match blob {
        StrRef::Slice(range) => (range.start + error.at, String::new()),
        StrRef::Owned(_) => (
            at,
            format!(" (at byte {} of the decompressed {what})", error.at),
        ),
    };
    StepError::Malformed {
        at,
        message: format!("corrupt {what}: {}{note}", error.message),
    }
}
