//! The fields of a large hash that capture has seen: a window onto a hash stored one entry per
//! field (`field_store.rs`).
//!
//! A hash of more than [`STORED_BY_FIELD`] fields is not held whole: rewriting and copying a
//! hash of a million fields in every batch that changed one of them took a whole core at 1,000
//! writes a second (docs/benchmarks.md, `bench-bighash.sh`). It is stored as a header (kind,
//! TTL, field count) and one RocksDB entry per field, and held in memory as a [`Window`]: the
//! field count and the fields read or changed since it was loaded. A command on such a hash
//! first loads the fields it names and the mapped ones (`WorkingSet::see_fields`); only those
//! are ever asked for, so a field outside the window is never taken for an absent one. What
//! needs the whole hash (a `RENAME` or `COPY` of it, a `#` op on it) materialises it from the
//! store (`WorkingSet::whole`).
//!
//! A window remembers which fields it changed (`dirty`): only those are written back. A
//! window made from a whole hash (a hash that grew past the size, or was replaced whole) is a
//! `rewrite`: the stored fields are cleared and every field is written.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::mirror::FieldValue;

/// Fields past which a hash is stored one entry per field and held as a [`Window`].
pub const STORED_BY_FIELD: usize = 1024;

/// A field the window has seen.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    /// `None`: the hash does not hold it.
    value: Option<FieldValue>,
    /// Changed since the hash was loaded: written back.
    dirty: bool,
}

/// The seen part of a hash stored by field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    seen: BTreeMap<Bytes, Seen>,
    /// Fields the hash holds (seen or not).
    len: usize,
    /// Every field is in `seen`: the stored fields are cleared and `seen` written.
    rewrite: bool,
    /// Every field is in `seen` (a rewrite, or a copy of one in flight): a field not seen is
    /// absent, whatever the store holds (it may not be cleared yet).
    complete: bool,
}

impl Window {
    /// A hash of `len` stored fields, none seen.
    pub fn unseen(len: usize) -> Window {
        Window {
            len,
            ..Window::default()
        }
    }

    /// A whole hash, to be written whole.
    pub fn rewrite(fields: impl IntoIterator<Item = (Bytes, FieldValue)>) -> Window {
        let seen: BTreeMap<Bytes, Seen> = fields
            .into_iter()
            .map(|(name, value)| {
                let value = Some(value);
                (name, Seen { value, dirty: true })
            })
            .collect();
        Window {
            len: seen.len(),
            seen,
            rewrite: true,
            complete: true,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fields held in memory (seen: loaded, changed or known absent).
    pub fn seen_len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_rewrite(&self) -> bool {
        self.rewrite
    }

    /// Whether every field is seen: the store has nothing to add to it.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Whether `name` was loaded (or written): its answer is known.
    pub fn has_seen(&self, name: &[u8]) -> bool {
        self.complete || self.seen.contains_key(name)
    }

    /// Records a field read from the store (`None`: not stored); a field already seen keeps
    /// what the window knows, which is newer.
    pub fn see(&mut self, name: Bytes, value: Option<FieldValue>) {
        self.seen.entry(name).or_insert(Seen {
            value,
            dirty: false,
        });
    }

    pub fn get(&self, name: &[u8]) -> Option<&FieldValue> {
        debug_assert!(
            self.has_seen(name),
            "field {name:?} read before it was loaded"
        );
        self.seen.get(name)?.value.as_ref()
    }

    pub fn get_mut(&mut self, name: &[u8]) -> Option<&mut FieldValue> {
        debug_assert!(
            self.has_seen(name),
            "field {name:?} changed before it was loaded"
        );
        let seen = self.seen.get_mut(name)?;
        // Asked for to be changed (`Fields::get_mut`'s callers change what they get).
        seen.dirty |= seen.value.is_some();
        seen.value.as_mut()
    }

    pub fn insert(&mut self, name: Bytes, value: FieldValue) -> Option<FieldValue> {
        debug_assert!(
            self.has_seen(&name),
            "field {name:?} set before it was loaded"
        );
        let seen = self.seen.entry(name).or_insert(Seen {
            value: None,
            dirty: true,
        });
        seen.dirty = true;
        let old = seen.value.replace(value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove(&mut self, name: &[u8]) -> Option<FieldValue> {
        debug_assert!(
            self.has_seen(name),
            "field {name:?} removed before it was loaded"
        );
        let seen = self.seen.get_mut(name)?;
        let old = seen.value.take();
        if old.is_some() {
            seen.dirty = true;
            // (A count below the fields seen would be a damaged header: never below zero.)
            self.len = self.len.saturating_sub(1);
        }
        old
    }

    /// The seen fields the hash holds, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&Bytes, &FieldValue)> {
        self.seen
            .iter()
            .filter_map(|(name, seen)| Some((name, seen.value.as_ref()?)))
    }

    /// The fields to write back: name and value (`None`: delete), in name order.
    pub fn changed(&self) -> impl Iterator<Item = (&Bytes, Option<&FieldValue>)> {
        self.seen
            .iter()
            .filter(|(_, seen)| seen.dirty)
            .map(|(name, seen)| (name, seen.value.as_ref()))
    }

    /// The window as of its write: nothing to write back (a copy of a window in flight, read by
    /// the next batch while the committer writes it). A copy of a rewrite stays complete: the
    /// store is not cleared until the rewrite is written, so it must not be read for what the
    /// copy has not seen.
    pub fn settle(&mut self) {
        self.rewrite = false;
        for seen in self.seen.values_mut() {
            seen.dirty = false;
        }
    }

    /// Only the fields it changed (what the next batch must read from it while they are being
    /// written): the others are in the store, and the next batch reads them there (a copy of
    /// every field read would be taken by every batch that follows while the hash is busy).
    /// A rewrite keeps everything: the store is being cleared.
    pub fn keep_changed(&mut self) {
        if !self.rewrite {
            self.seen.retain(|_, seen| seen.dirty);
            self.complete = false;
        }
    }

    /// The window once written, for the mirror cache: the count alone (the seen fields are read
    /// again when asked for, so a cached large hash weighs next to nothing).
    pub fn forget_seen(&mut self) {
        *self = Window::unseen(self.len);
    }

    /// The whole hash: the stored fields (`stored`, in any order) overlaid with what the window
    /// knows.
    pub fn merge(
        self,
        stored: impl IntoIterator<Item = (Bytes, FieldValue)>,
    ) -> BTreeMap<Bytes, FieldValue> {
        let mut whole = BTreeMap::new();
        if !self.complete {
            whole.extend(stored);
        }
        for (name, seen) in self.seen {
            match seen.value {
                Some(value) => whole.insert(name, value),
                None => whole.remove(&name),
            };
        }
        whole
    }

    /// Bytes held (the mirror cache's weight; see `Fields::heap_bytes`).
    pub fn heap_bytes(&self, field_overhead: u64, node: u64, per_node: u64) -> u64 {
        let contents: u64 = self
            .seen
            .iter()
            .map(|(n, s)| {
                n.len() as u64
                    + s.value.as_ref().map_or(0, |v| v.value.len() as u64)
                    + field_overhead
            })
            .sum();
        contents + (self.seen.len() as u64).div_ceil(per_node) * node
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(v: &str) -> FieldValue {
        FieldValue {
            value: Bytes::copy_from_slice(v.as_bytes()),
            expire_at_ms: None,
        }
    }

    #[test]
    fn a_window_counts_and_writes_back_only_what_changed() {
        let mut window = Window::unseen(10);
        window.see(Bytes::from_static(b"a"), Some(value("1")));
        window.see(Bytes::from_static(b"b"), None);
        window.see(Bytes::from_static(b"c"), Some(value("3")));
        assert_eq!(window.insert(Bytes::from_static(b"b"), value("2")), None);
        assert_eq!(window.len(), 11, "a new field counts");
        assert_eq!(
            window.insert(Bytes::from_static(b"a"), value("x")),
            Some(value("1"))
        );
        assert_eq!(window.len(), 11, "a field set again does not");
        assert_eq!(window.remove(b"c"), Some(value("3")));
        assert_eq!(window.len(), 10);
        // A field read again from the store does not replace what the window changed.
        window.see(Bytes::from_static(b"a"), Some(value("stale")));
        assert_eq!(window.get(b"a"), Some(&value("x")));
        let changed: Vec<_> = window
            .changed()
            .map(|(n, v)| (n.clone(), v.cloned()))
            .collect();
        assert_eq!(
            changed,
            vec![
                (Bytes::from_static(b"a"), Some(value("x"))),
                (Bytes::from_static(b"b"), Some(value("2"))),
                (Bytes::from_static(b"c"), None),
            ]
        );
        let mut copy = window.clone();
        copy.settle();
        assert_eq!(copy.changed().count(), 0);
        assert_eq!(copy.get(b"a"), Some(&value("x")), "settled, still seen");
        let stored = [("a", "1"), ("c", "3"), ("d", "4")]
            .map(|(n, v)| (Bytes::from_static(n.as_bytes()), value(v)));
        let whole = window.merge(stored);
        let names: Vec<&[u8]> = whole.keys().map(|k| k.as_ref()).collect();
        assert_eq!(names, vec![&b"a"[..], b"b", b"d"]);
        assert_eq!(whole[&b"a"[..]], value("x"));
    }

    #[test]
    fn a_rewrite_holds_every_field_and_ignores_the_stored_ones() {
        let window = Window::rewrite([(Bytes::from_static(b"a"), value("1"))]);
        assert!(window.has_seen(b"never stored"));
        assert_eq!(window.changed().count(), 1);
        let whole = window.merge([(Bytes::from_static(b"old"), value("0"))]);
        assert_eq!(whole.len(), 1, "the stored fields are replaced");
    }
}
