//! Decoding one value of the RDB stream: its encoding chosen from the type byte, then its
//! items (hash fields are events, everything else is skipped by structure). The top level of
//! the file (magic, opcodes, checksum) is in the parent module.

use super::super::compact::{self, Entry};
use super::super::cursor::{decimal, malformed, Cursor, StepError, StepResult, StrRef};
use super::*;

impl RdbDecoder {
    pub(super) fn end_value(&mut self, nonempty: bool) {
        self.staged
            .push(Staged::Ready(RdbEvent::KeyEnd { empty: !nonempty }));
        self.state = if self.value_only {
            State::Done
        } else {
            State::TopLevel
        };
    }

    pub(super) fn set_phase(&mut self, mut value: Value, phase: Phase) {
        value.phase = phase;
        self.state = State::Value(value);
    }

    pub(super) fn step_value(&mut self, cur: &mut Cursor<'_>, value: Value) -> StepResult<()> {
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
            Phase::Items {
                remaining: 0,
                shape: Shape::PathHashString { paths_after },
                ..
            } => {
                let phase = Phase::Items {
                    remaining: paths_after,
                    shape: Shape::PathHashPath,
                    part: 0,
                };
                self.set_phase(value, phase);
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
            Phase::StreamGroups { remaining: 0 } if value.type_byte >= 26 => {
                self.set_phase(value, Phase::StreamIdmp);
                Ok(())
            }
            Phase::StreamGroups { remaining: 0 } => {
                self.end_value(true);
                Ok(())
            }
            Phase::StreamIdmp => {
                cur.length()?; // IDMP duration
                cur.length()?; // and max entries
                let producers = cur.length()?;
                self.set_phase(
                    value,
                    Phase::StreamProducers {
                        remaining: producers,
                    },
                );
                Ok(())
            }
            Phase::StreamProducers { remaining: 0 } => {
                cur.length()?; // iids added
                cur.length()?; // iids found duplicate
                self.end_value(true);
                Ok(())
            }
            Phase::StreamProducers { remaining } => {
                cur.string()?; // producer id
                let iids = cur.length()?;
                for _ in 0..iids {
                    cur.string()?; // iid
                    cur.length()?; // its stream id: ms
                    cur.length()?; // and seq
                }
                self.set_phase(
                    value,
                    Phase::StreamProducers {
                        remaining: remaining - 1,
                    },
                );
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

    pub(super) fn start_value(&mut self, cur: &mut Cursor<'_>, mut value: Value) -> StepResult<()> {
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
                self.state = State::ModuleOps {
                    of: ModuleData::Value,
                };
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
            15 | 19 | 21 | 26 | 27 => {
                value.nonempty = true;
                items(cur.length()?, Shape::StreamListpack)
            }
            28 => {
                let count = cur.length()?;
                match cur.length()? {
                    0 => {}
                    1 => {
                        cur.length()?; // the insert index
                    }
                    other => return malformed(at, format!("array insert-index flag {other}")),
                }
                value.nonempty = count > 0;
                items(count, Shape::ArrayElement)
            }
            22 if self.magic == Magic::Valkey => items(cur.length()?, Shape::ValkeyHash2),
            23 if self.magic == Magic::Valkey => {
                let paths = cur.length()?;
                value.nonempty = paths > 0;
                items(paths, Shape::PathHashPath)
            }
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
    pub(super) fn stage_packed_fields(
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

    pub(super) fn step_item(
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
            (Shape::Str | Shape::PathHashString { .. }, _) => self.skip = cur.skip_string()?,
            (Shape::PathHashPath, 0) => {
                self.skip = cur.skip_string()?;
                next_part = 1;
            }
            (Shape::PathHashPath, _) => {
                let fields = cur.length()?;
                // Valkey's loader refuses a path without fields.
                let strings = match fields.checked_mul(2) {
                    Some(strings) if fields > 0 => strings,
                    _ => return malformed(at, format!("path hash path with {fields} fields")),
                };
                let phase = Phase::Items {
                    remaining: strings,
                    shape: Shape::PathHashString {
                        paths_after: remaining - 1,
                    },
                    part: 0,
                };
                self.set_phase(value, phase);
                return Ok(());
            }
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
            (Shape::ArrayElement, _) => {
                cur.length()?; // index
                match cur.length()? {
                    0 | 3 => self.skip = cur.skip_string()?, // string, small string
                    1 | 2 => {
                        cur.take(8)?; // int64, double
                    }
                    tag => return malformed(at, format!("array element tag {tag}")),
                }
            }
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
                if expiry < -1 {
                    // Valkey's loader refuses it too: -1 is "none", times are not negative.
                    return malformed(at, format!("field expiry {expiry} (below -1)"));
                }
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

    pub(super) fn skip_stream_group(
        &mut self,
        cur: &mut Cursor<'_>,
        type_byte: u8,
    ) -> StepResult<()> {
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
        if type_byte >= 27 {
            // NACKed ids of the group (Redis 8.8).
            let nacked = cur.length()?;
            let at = cur.pos;
            let bytes = nacked.checked_mul(16).ok_or(StepError::Malformed {
                at,
                message: format!("NACK list size {nacked} overflows"),
            })?;
            cur.take(bytes)?;
        }
        Ok(())
    }
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
