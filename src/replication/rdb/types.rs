//! What each RDB type byte holds, by who wrote the file, and module names from their ids.

use super::{Magic, ValueKind};

/// An RDB type byte this decoder cannot read or skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UnreadableType {
    #[error("type 23 (Valkey's PATH_HASH) in a VALKEY080 file, where it does not exist")]
    PathHashBefore81,
    #[error("module value in the pre-release format (type 6) cannot be skipped")]
    PreReleaseModule,
    #[error("unknown RDB value type or opcode {0}")]
    Unknown(u8),
}

/// The logical kind of an RDB type byte; 22 and above depend on who wrote the file (VALKEY080
/// ends at 22, VALKEY081 adds 23; Redis 7.4 added 22 to 25, 8.6 26, 8.8 27 and 28).
pub(crate) fn kind_of(
    type_byte: u8,
    magic: Magic,
    version: u32,
) -> Result<ValueKind, UnreadableType> {
    let redis = magic == Magic::Redis;
    Ok(match type_byte {
        0 => ValueKind::String,
        1 | 10 | 14 | 18 => ValueKind::List,
        2 | 11 | 20 => ValueKind::Set,
        3 | 5 | 12 | 17 => ValueKind::SortedSet,
        4 | 9 | 13 | 16 | 22 => ValueKind::Hash,
        23..=25 if redis => ValueKind::Hash,
        23 if version >= 81 => ValueKind::PathHash,
        23 => return Err(UnreadableType::PathHashBefore81),
        6 => return Err(UnreadableType::PreReleaseModule),
        7 => ValueKind::Module,
        15 | 19 | 21 => ValueKind::Stream,
        26 | 27 if redis => ValueKind::Stream,
        28 if redis => ValueKind::Array,
        other => return Err(UnreadableType::Unknown(other)),
    })
}

/// A module's name from its 64-bit id: nine characters of six bits each, then ten bits of
/// encoding version (`moduleTypeNameByID`).
pub(crate) fn module_name(id: u64) -> String {
    const CHARSET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits = id >> 10;
    let mut name = [0u8; 9];
    for slot in name.iter_mut().rev() {
        *slot = CHARSET[(bits & 63) as usize];
        bits >>= 6;
    }
    String::from_utf8_lossy(&name).into_owned()
}
