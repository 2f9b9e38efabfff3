//! Check-then-parse reading of RDB primitives from a byte slice.
//!
//! Every read either succeeds, reports [`StepError::Incomplete`] (more bytes are needed; the
//! caller keeps its state and retries once more bytes arrived), or reports malformed input with
//! the position of the offending byte relative to the start of the slice.

use std::ops::Range;

use bytes::Bytes;

/// Largest string the decoder materialises in memory (Redis' default `proto-max-bulk-len`).
/// Larger strings of skipped types are skipped without buffering them.
pub(crate) const MAX_MATERIALISED_STRING: u64 = 512 * 1024 * 1024;

/// LZF cannot expand input by more than this factor (a 3-byte back reference yields at most
/// 264 bytes); a larger announced length is corruption, refused before allocating.
const LZF_MAX_EXPANSION: u64 = 90;

#[derive(Debug)]
pub(crate) enum StepError {
    /// Not enough bytes yet; nothing must be consumed.
    Incomplete,
    /// Malformed input at `at` (relative to the slice start).
    Malformed { at: usize, message: String },
    /// Input that is well-formed but refused (unsupported version, bad checksum).
    Rejected(super::RdbError),
}

pub(crate) type StepResult<T> = Result<T, StepError>;

pub(crate) fn malformed<T>(at: usize, message: impl Into<String>) -> StepResult<T> {
    Err(StepError::Malformed {
        at,
        message: message.into(),
    })
}

/// A length-encoded value: either a plain length or a special string encoding (the low six
/// bits of a `11xxxxxx` first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Length {
    Plain(u64),
    Encoded(u8),
}

/// A string read from the input: bytes inside the input slice (zero-copy once the slice is
/// frozen), or bytes that had to be produced (integers rendered as decimal, LZF output).
#[derive(Debug, Clone)]
pub(crate) enum StrRef {
    Slice(Range<usize>),
    Owned(Bytes),
}

impl StrRef {
    /// The bytes of this string, given the input slice it refers to.
    pub(crate) fn as_slice<'a>(&'a self, input: &'a [u8]) -> &'a [u8] {
        match self {
            StrRef::Slice(range) => &input[range.clone()],
            StrRef::Owned(bytes) => bytes,
        }
    }

    /// Turns the reference into `Bytes`, slicing `frozen` (the consumed input) without copying.
    pub(crate) fn resolve(self, frozen: &Bytes) -> Bytes {
        match self {
            StrRef::Slice(range) => frozen.slice(range),
            StrRef::Owned(bytes) => bytes,
        }
    }
}

pub(crate) struct Cursor<'a> {
    data: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Cursor { data, pos: 0 }
    }

    pub(crate) fn data(&self) -> &'a [u8] {
        self.data
    }

    pub(crate) fn u8(&mut self) -> StepResult<u8> {
        let byte = *self.data.get(self.pos).ok_or(StepError::Incomplete)?;
        self.pos += 1;
        Ok(byte)
    }

    pub(crate) fn take(&mut self, n: u64) -> StepResult<Range<usize>> {
        let available = (self.data.len() - self.pos) as u64;
        if n > available {
            return Err(StepError::Incomplete);
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(start..self.pos)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> StepResult<[u8; N]> {
        let range = self.take(N as u64)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.data[range]);
        Ok(out)
    }

    pub(crate) fn i64_le(&mut self) -> StepResult<i64> {
        Ok(i64::from_le_bytes(self.array::<8>()?))
    }

    pub(crate) fn i32_le(&mut self) -> StepResult<i32> {
        Ok(i32::from_le_bytes(self.array::<4>()?))
    }

    /// RDB length encoding (`rdbLoadLenByRef`): the top two bits of the first byte select a
    /// 6-bit, 14-bit, 32-bit big-endian or 64-bit big-endian length, or a special encoding.
    pub(crate) fn length_or_encoding(&mut self) -> StepResult<Length> {
        let at = self.pos;
        let first = self.u8()?;
        match first >> 6 {
            0 => Ok(Length::Plain(u64::from(first & 0x3f))),
            1 => {
                let second = self.u8()?;
                Ok(Length::Plain(
                    (u64::from(first & 0x3f) << 8) | u64::from(second),
                ))
            }
            2 => match first {
                0x80 => Ok(Length::Plain(u64::from(u32::from_be_bytes(self.array()?)))),
                0x81 => Ok(Length::Plain(u64::from_be_bytes(self.array()?))),
                other => malformed(at, format!("invalid length encoding byte 0x{other:02x}")),
            },
            _ => Ok(Length::Encoded(first & 0x3f)),
        }
    }

    /// A plain length; a special encoding here is malformed input.
    pub(crate) fn length(&mut self) -> StepResult<u64> {
        let at = self.pos;
        match self.length_or_encoding()? {
            Length::Plain(n) => Ok(n),
            Length::Encoded(e) => {
                malformed(at, format!("expected a length, found string encoding {e}"))
            }
        }
    }

    /// A string, materialised (`rdbGenericLoadStringObject`). Integer encodings are rendered
    /// as decimal text, as Redis does when it hands them out.
    pub(crate) fn string(&mut self) -> StepResult<StrRef> {
        let at = self.pos;
        match self.length_or_encoding()? {
            Length::Plain(len) => {
                if len > MAX_MATERIALISED_STRING {
                    return malformed(at, format!("string length {len} exceeds the 512 MiB limit"));
                }
                Ok(StrRef::Slice(self.take(len)?))
            }
            Length::Encoded(0) => Ok(decimal(i64::from(self.u8()? as i8))),
            Length::Encoded(1) => Ok(decimal(i64::from(i16::from_le_bytes(self.array()?)))),
            Length::Encoded(2) => Ok(decimal(i64::from(self.i32_le()?))),
            Length::Encoded(3) => {
                let compressed_len = self.length()?;
                let len = self.length()?;
                if len > MAX_MATERIALISED_STRING
                    || len
                        > compressed_len
                            .saturating_mul(LZF_MAX_EXPANSION)
                            .saturating_add(64)
                {
                    return malformed(
                        at,
                        format!(
                            "LZF string claims {len} bytes from {compressed_len} compressed bytes"
                        ),
                    );
                }
                let range = self.take(compressed_len)?;
                let output = lzf::decompress(&self.data[range], len as usize).map_err(|e| {
                    StepError::Malformed {
                        at,
                        message: format!("LZF string does not decompress: {e:?}"),
                    }
                })?;
                if output.len() as u64 != len {
                    return malformed(
                        at,
                        format!(
                            "LZF string decompressed to {} bytes, expected {len}",
                            output.len()
                        ),
                    );
                }
                Ok(StrRef::Owned(Bytes::from(output)))
            }
            Length::Encoded(other) => malformed(at, format!("unknown string encoding {other}")),
        }
    }

    /// Reads the header of a string that is to be skipped and returns how many payload bytes
    /// still follow it. Small payloads that are already buffered are consumed at once.
    pub(crate) fn skip_string(&mut self) -> StepResult<u64> {
        let at = self.pos;
        let payload = match self.length_or_encoding()? {
            Length::Plain(len) => len,
            Length::Encoded(0) => 1,
            Length::Encoded(1) => 2,
            Length::Encoded(2) => 4,
            Length::Encoded(3) => {
                let compressed_len = self.length()?;
                let _uncompressed_len = self.length()?;
                compressed_len
            }
            Length::Encoded(other) => {
                return malformed(at, format!("unknown string encoding {other}"))
            }
        };
        let buffered = (self.data.len() - self.pos) as u64;
        let now = payload.min(buffered);
        self.pos += now as usize;
        Ok(payload - now)
    }
}

pub(crate) fn decimal(value: i64) -> StrRef {
    StrRef::Owned(Bytes::copy_from_slice(
        itoa::Buffer::new().format(value).as_bytes(),
    ))
}
