//! The compact encodings Redis stores inside an RDB string: ziplist, listpack, zipmap, intset.
//!
//! Layouts (all integers little-endian unless stated):
//!
//! - **ziplist**: `u32 zlbytes, u32 zltail, u16 zllen (0xFFFF = unknown)`, entries, `0xFF`.
//!   Entry: `prevlen` (1 byte if < 254, else `0xFE` + u32), then the encoding: `00pppppp`
//!   (6-bit string length), `01pppppp qqqqqqqq` (14-bit, big-endian), `10000000` + u32 big-endian
//!   string length; `C0` i16, `D0` i32, `E0` i64, `F0` i24, `FE` i8, `F1`..`FD` the immediate
//!   values 0..12.
//! - **listpack**: `u32 total bytes, u16 count (65535 = unknown)`, entries, `0xFF`. Entry:
//!   encoding + data, then `backlen` (1-5 bytes). Encodings: `0xxxxxxx` 7-bit uint, `10xxxxxx`
//!   6-bit string length, `110xxxxx` + 1 byte 13-bit signed int, `1110xxxx` + 1 byte 12-bit string
//!   length, `F0` + u32 string length, `F1` i16, `F2` i24, `F3` i32, `F4` i64.
//! - **zipmap** (Redis < 2.6 hashes): `zmlen` byte, then `len key len free value [free bytes]`
//!   pairs, `0xFF`. A length is one byte if < 254, else `0xFE` + u32.
//! - **intset**: `u32 encoding (2, 4 or 8), u32 count`, then the integers.
//!
//! The count headers are never trusted: entries are walked to the end marker, and every length
//! is checked against the blob before it is used, so corrupt blobs give an error, never a panic.

use std::ops::Range;

/// One element of a ziplist or listpack: bytes inside the blob, or an integer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    Bytes(Range<usize>),
    Int(i64),
}

/// An error inside a blob: position relative to the blob start and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlobError {
    pub at: usize,
    pub message: String,
}

fn err<T>(at: usize, message: impl Into<String>) -> Result<T, BlobError> {
    Err(BlobError {
        at,
        message: message.into(),
    })
}

fn slice(blob: &[u8], at: usize, len: usize, what: &str) -> Result<Range<usize>, BlobError> {
    match at.checked_add(len) {
        Some(end) if end <= blob.len() => Ok(at..end),
        _ => err(
            at,
            format!(
                "{what} of {len} bytes runs past the end of the {}-byte blob",
                blob.len()
            ),
        ),
    }
}

fn le_int(bytes: &[u8]) -> i64 {
    // Sign-extends a little-endian two's complement integer of 1..=8 bytes.
    let mut value: u64 = 0;
    for (i, b) in bytes.iter().enumerate() {
        value |= u64::from(*b) << (8 * i);
    }
    let bits = 8 * bytes.len() as u32;
    if bits < 64 {
        let shift = 64 - bits;
        ((value << shift) as i64) >> shift
    } else {
        value as i64
    }
}

/// All entries of a ziplist.
pub(crate) fn ziplist_entries(blob: &[u8]) -> Result<Vec<Entry>, BlobError> {
    if blob.len() < 11 {
        return err(
            0,
            format!(
                "ziplist of {} bytes is shorter than its 11-byte minimum",
                blob.len()
            ),
        );
    }
    let total = u32::from_le_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
    if total != blob.len() {
        return err(
            0,
            format!(
                "ziplist header says {total} bytes but the blob has {}",
                blob.len()
            ),
        );
    }
    let mut entries = Vec::new();
    let mut pos = 10;
    loop {
        let Some(&first) = blob.get(pos) else {
            return err(pos, "ziplist has no 0xFF end marker");
        };
        if first == 0xFF {
            if pos + 1 != blob.len() {
                return err(pos, "ziplist end marker before the end of the blob");
            }
            return Ok(entries);
        }
        pos += match first {
            0..=253 => 1,
            254 => 5,
            _ => return err(pos, "invalid ziplist prevlen byte 0xff"),
        };
        let at = pos;
        let Some(&enc) = blob.get(pos) else {
            return err(pos, "ziplist entry is cut off after its prevlen");
        };
        match enc >> 6 {
            0 => {
                let len = usize::from(enc & 0x3f);
                let range = slice(blob, pos + 1, len, "ziplist string")?;
                pos = range.end;
                entries.push(Entry::Bytes(range));
            }
            1 => {
                let hdr = slice(blob, pos, 2, "ziplist string header")?;
                let len =
                    (usize::from(blob[hdr.start] & 0x3f) << 8) | usize::from(blob[hdr.start + 1]);
                let range = slice(blob, pos + 2, len, "ziplist string")?;
                pos = range.end;
                entries.push(Entry::Bytes(range));
            }
            2 => {
                if enc != 0x80 {
                    return err(at, format!("invalid ziplist string encoding 0x{enc:02x}"));
                }
                let hdr = slice(blob, pos + 1, 4, "ziplist string header")?;
                let len = u32::from_be_bytes([
                    blob[hdr.start],
                    blob[hdr.start + 1],
                    blob[hdr.start + 2],
                    blob[hdr.start + 3],
                ]);
                let range = slice(blob, pos + 5, len as usize, "ziplist string")?;
                pos = range.end;
                entries.push(Entry::Bytes(range));
            }
            _ => {
                let width = match enc {
                    0xC0 => 2,
                    0xD0 => 4,
                    0xE0 => 8,
                    0xF0 => 3,
                    0xFE => 1,
                    0xF1..=0xFD => {
                        entries.push(Entry::Int(i64::from(enc & 0x0f) - 1));
                        pos += 1;
                        continue;
                    }
                    _ => return err(at, format!("invalid ziplist integer encoding 0x{enc:02x}")),
                };
                let range = slice(blob, pos + 1, width, "ziplist integer")?;
                entries.push(Entry::Int(le_int(&blob[range.clone()])));
                pos = range.end;
            }
        }
    }
}

/// All entries of a listpack.
pub(crate) fn listpack_entries(blob: &[u8]) -> Result<Vec<Entry>, BlobError> {
    if blob.len() < 7 {
        return err(
            0,
            format!(
                "listpack of {} bytes is shorter than its 7-byte minimum",
                blob.len()
            ),
        );
    }
    let total = u32::from_le_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
    if total != blob.len() {
        return err(
            0,
            format!(
                "listpack header says {total} bytes but the blob has {}",
                blob.len()
            ),
        );
    }
    // The header's element count (65,535: not known) sizes the vector once; every entry takes
    // at least two bytes (its encoding and its length after it), so an untrusted count cannot
    // reserve more than the blob could hold.
    let count = usize::from(u16::from_le_bytes([blob[4], blob[5]]));
    let mut entries = Vec::with_capacity(count.min(blob.len() / 2));
    let mut pos = 6;
    loop {
        let at = pos;
        let Some(&enc) = blob.get(pos) else {
            return err(pos, "listpack has no 0xFF end marker");
        };
        let (entry, encoded_len) = if enc == 0xFF {
            if pos + 1 != blob.len() {
                return err(pos, "listpack end marker before the end of the blob");
            }
            return Ok(entries);
        } else if enc & 0x80 == 0 {
            (Entry::Int(i64::from(enc & 0x7f)), 1)
        } else if enc & 0xC0 == 0x80 {
            let len = usize::from(enc & 0x3f);
            (
                Entry::Bytes(slice(blob, pos + 1, len, "listpack string")?),
                1 + len,
            )
        } else if enc & 0xE0 == 0xC0 {
            let next = slice(blob, pos + 1, 1, "listpack integer")?;
            let raw = (u16::from(enc & 0x1f) << 8) | u16::from(blob[next.start]);
            // 13-bit two's complement.
            let value = ((raw << 3) as i16 >> 3) as i64;
            (Entry::Int(value), 2)
        } else if enc & 0xF0 == 0xE0 {
            let next = slice(blob, pos + 1, 1, "listpack string header")?;
            let len = (usize::from(enc & 0x0f) << 8) | usize::from(blob[next.start]);
            (
                Entry::Bytes(slice(blob, pos + 2, len, "listpack string")?),
                2 + len,
            )
        } else {
            match enc {
                0xF0 => {
                    let hdr = slice(blob, pos + 1, 4, "listpack string header")?;
                    let len = u32::from_le_bytes([
                        blob[hdr.start],
                        blob[hdr.start + 1],
                        blob[hdr.start + 2],
                        blob[hdr.start + 3],
                    ]) as usize;
                    (
                        Entry::Bytes(slice(blob, pos + 5, len, "listpack string")?),
                        5 + len,
                    )
                }
                0xF1..=0xF4 => {
                    let width = match enc {
                        0xF1 => 2,
                        0xF2 => 3,
                        0xF3 => 4,
                        _ => 8,
                    };
                    let range = slice(blob, pos + 1, width, "listpack integer")?;
                    (Entry::Int(le_int(&blob[range])), 1 + width)
                }
                _ => return err(at, format!("invalid listpack encoding byte 0x{enc:02x}")),
            }
        };
        let backlen = match encoded_len {
            0..=127 => 1,
            128..=16382 => 2,
            16383..=2097150 => 3,
            2097151..=268435454 => 4,
            _ => 5,
        };
        pos = slice(blob, pos, encoded_len + backlen, "listpack entry")?.end;
        entries.push(entry);
    }
}

/// A field and its value, as ranges inside a blob.
pub(crate) type FieldValueRanges = (Range<usize>, Range<usize>);

/// Field/value pairs of a zipmap, as ranges inside the blob. The count byte is ignored (Redis
/// itself only trusts it below 254); the pairs are walked to the end marker.
pub(crate) fn zipmap_pairs(blob: &[u8]) -> Result<Vec<FieldValueRanges>, BlobError> {
    fn len_at(blob: &[u8], pos: usize) -> Result<Option<(usize, usize)>, BlobError> {
        match blob.get(pos) {
            None => err(pos, "zipmap has no 0xFF end marker"),
            Some(0xFF) => Ok(None),
            Some(254) => {
                let r = slice(blob, pos + 1, 4, "zipmap length")?;
                let len = u32::from_le_bytes([
                    blob[r.start],
                    blob[r.start + 1],
                    blob[r.start + 2],
                    blob[r.start + 3],
                ]);
                Ok(Some((len as usize, 5)))
            }
            Some(&b) => Ok(Some((usize::from(b), 1))),
        }
    }
    let mut pairs = Vec::new();
    let mut pos = 1;
    loop {
        let Some((key_len, hdr)) = len_at(blob, pos)? else {
            if pos + 1 != blob.len() {
                return err(pos, "zipmap end marker before the end of the blob");
            }
            return Ok(pairs);
        };
        let key = slice(blob, pos + hdr, key_len, "zipmap key")?;
        pos = key.end;
        let Some((value_len, hdr)) = len_at(blob, pos)? else {
            return err(pos, "zipmap key without a value");
        };
        let free = slice(blob, pos + hdr, 1, "zipmap free byte")?;
        let free = usize::from(blob[free.start]);
        let value = slice(blob, pos + hdr + 1, value_len, "zipmap value")?;
        pos = slice(blob, value.end, free, "zipmap free space")?.end;
        pairs.push((key, value));
    }
}

/// Whether a ziplist or listpack blob holds no entry (checked from its first entry byte, not
/// the count header).
pub(crate) fn packed_is_empty(blob: &[u8], header_len: usize) -> bool {
    blob.get(header_len) == Some(&0xFF)
}

/// Number of integers in an intset.
pub(crate) fn intset_len(blob: &[u8]) -> Result<u32, BlobError> {
    if blob.len() < 8 {
        return err(
            0,
            format!(
                "intset of {} bytes is shorter than its 8-byte header",
                blob.len()
            ),
        );
    }
    let width = u32::from_le_bytes([blob[0], blob[1], blob[2], blob[3]]);
    let count = u32::from_le_bytes([blob[4], blob[5], blob[6], blob[7]]);
    if !matches!(width, 2 | 4 | 8) || 8 + (width as usize) * (count as usize) != blob.len() {
        return err(
            0,
            format!(
                "intset header (width {width}, count {count}) does not match its {} bytes",
                blob.len()
            ),
        );
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listpack_integers_and_strings() {
        // total, count, then: 7-bit 5, 13-bit -2, "ab", end.
        let mut lp = vec![0, 0, 0, 0, 3, 0];
        lp.extend_from_slice(&[0x05, 0x01]);
        lp.extend_from_slice(&[0xDF, 0xFE, 0x02]);
        lp.extend_from_slice(&[0x82, b'a', b'b', 0x03]);
        lp.push(0xFF);
        let total = lp.len() as u32;
        lp[..4].copy_from_slice(&total.to_le_bytes());
        let entries = listpack_entries(&lp).unwrap();
        assert_eq!(entries[0], Entry::Int(5));
        assert_eq!(entries[1], Entry::Int(-2));
        assert_eq!(entries[2], Entry::Bytes(12..14));
    }

    #[test]
    fn ziplist_rejects_cut_entry() {
        let mut zl = vec![0u8; 10];
        zl.extend_from_slice(&[0x00, 0x05, b'a', b'b']);
        zl.push(0xFF);
        let total = zl.len() as u32;
        zl[..4].copy_from_slice(&total.to_le_bytes());
        let e = ziplist_entries(&zl).unwrap_err();
        assert!(e.message.contains("runs past the end"), "{e:?}");
    }

    #[test]
    fn sign_extension() {
        assert_eq!(le_int(&[0xFF, 0xFF, 0xFF]), -1);
        assert_eq!(le_int(&[0x00, 0x00, 0x80]), -8388608);
        assert_eq!(le_int(&[0x01, 0x00]), 1);
    }
}
