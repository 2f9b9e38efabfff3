//! The fields of a mirrored hash, in field-name order.
//!
//! Most watched hashes are rows: a handful of fields. A `BTreeMap` allocates a whole node (11
//! slots of 80 bytes, about 900 bytes) for even one field, so a 3-field hash took about 1 KB in
//! memory (measured: docs/benchmarks.md), which bounded how many keys the mirror cache holds and
//! what a large transaction's working set costs. Up to [`SMALL_FIELDS`] fields are therefore
//! kept in one sorted vector (80 bytes a field, looked up by binary search); a hash that grows
//! past that becomes a `BTreeMap`, whose inserts stay logarithmic for hashes of millions of
//! fields. Both iterate in name order and compare by content, whatever the representation.
//!
//! A hash of more than [`STORED_BY_FIELD`](super::window::STORED_BY_FIELD) fields is stored one
//! entry per field and held as a [`Window`] (`window.rs`): only the fields loaded or changed.
//! Its `get` answers only for fields it has seen (the callers load what they ask for first),
//! and its `iter` yields only those.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::mirror::FieldValue;
use super::window::{Window, STORED_BY_FIELD};

/// Fields kept in the sorted vector before the hash becomes a map.
pub const SMALL_FIELDS: usize = 32;

/// Bytes of one field besides its name and value: its slot (name and value handles, TTL) and
/// the allocations of the name and the value. A name or value of up to 7 bytes is held inline
/// in an allocation of 16 with its reference count, one of up to 23 in 32, one of up to 55 in 64
/// (`buffer::mirror::stored_copy`); a mapped name is the mapping's own. 48 covers a value and
/// an unmapped name of the usual few bytes; the weight is an estimate (scripts/soak.sh
/// checks the process against it).
const FIELD_OVERHEAD: u64 = 80 + 48;
/// Bytes of one node of the map (11 slots of 80 bytes), counted per 8 fields (nodes are not full).
const MAP_NODE: u64 = 900;
const FIELDS_PER_NODE: u64 = 8;

#[derive(Debug, Clone)]
enum Repr {
    /// Sorted by name, names unique.
    Small(Vec<(Bytes, FieldValue)>),
    Large(BTreeMap<Bytes, FieldValue>),
    /// A hash stored by field: what was seen of it.
    Window(Box<Window>),
}

/// The fields of a hash.
#[derive(Debug, Clone)]
pub struct Fields(Repr);

impl Default for Fields {
    fn default() -> Fields {
        Fields(Repr::Small(Vec::new()))
    }
}

impl PartialEq for Fields {
    /// By content; windows compare what they have seen (and what they would write).
    fn eq(&self, other: &Fields) -> bool {
        match (&self.0, &other.0) {
            (Repr::Window(a), Repr::Window(b)) => a == b,
            (Repr::Window(_), _) | (_, Repr::Window(_)) => false,
            _ => self.len() == other.len() && self.iter().eq(other.iter()),
        }
    }
}

impl Eq for Fields {}

impl Fields {
    pub fn new() -> Fields {
        Fields::default()
    }

    /// A hash of `len` fields stored by field, none of them loaded.
    pub fn unseen(len: usize) -> Fields {
        Fields(Repr::Window(Box::new(Window::unseen(len))))
    }

    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Small(v) => v.len(),
            Repr::Large(m) => m.len(),
            Repr::Window(w) => w.len(),
        }
    }

    /// The window, for a hash stored by field.
    pub fn window(&self) -> Option<&Window> {
        match &self.0 {
            Repr::Window(w) => Some(w),
            _ => None,
        }
    }

    pub fn window_mut(&mut self) -> Option<&mut Window> {
        match &mut self.0 {
            Repr::Window(w) => Some(w),
            _ => None,
        }
    }

    /// Whether the hash is stored one entry per field: held as a window, or whole and larger
    /// than [`STORED_BY_FIELD`].
    pub fn stored_by_field(&self) -> bool {
        matches!(self.0, Repr::Window(_)) || self.len() > STORED_BY_FIELD
    }

    /// A whole hash larger than [`STORED_BY_FIELD`] becomes a window to be written whole
    /// (then only what changes is written); anything else is left as it is.
    pub fn into_stored_form(self) -> Fields {
        match self.0 {
            Repr::Large(m) if m.len() > STORED_BY_FIELD => {
                Fields(Repr::Window(Box::new(Window::rewrite(m))))
            }
            other => Fields(other),
        }
    }

    /// The whole hash from a window and its stored fields (anything else is whole already).
    pub fn merged(self, stored: impl IntoIterator<Item = (Bytes, FieldValue)>) -> Fields {
        match self.0 {
            Repr::Window(w) => {
                let whole = w.merge(stored);
                match whole.len() <= SMALL_FIELDS {
                    true => Fields(Repr::Small(whole.into_iter().collect())),
                    false => Fields(Repr::Large(whole)),
                }
            }
            other => Fields(other),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, name: &[u8]) -> Option<&FieldValue> {
        match &self.0 {
            Repr::Small(v) => find(v, name).ok().map(|i| &v[i].1),
            Repr::Large(m) => m.get(name),
            Repr::Window(w) => w.get(name),
        }
    }

    pub fn get_mut(&mut self, name: &[u8]) -> Option<&mut FieldValue> {
        match &mut self.0 {
            Repr::Small(v) => find(v, name).ok().map(|i| &mut v[i].1),
            Repr::Large(m) => m.get_mut(name),
            Repr::Window(w) => w.get_mut(name),
        }
    }

    pub fn contains_key(&self, name: &[u8]) -> bool {
        self.get(name).is_some()
    }

    /// Sets `name`; returns what it held.
    pub fn insert(&mut self, name: Bytes, value: FieldValue) -> Option<FieldValue> {
        match &mut self.0 {
            Repr::Small(v) => match find(v, &name) {
                Ok(i) => Some(std::mem::replace(&mut v[i].1, value)),
                Err(i) => {
                    if v.len() < SMALL_FIELDS {
                        v.insert(i, (name, value));
                    } else {
                        let mut map: BTreeMap<Bytes, FieldValue> = v.drain(..).collect();
                        map.insert(name, value);
                        self.0 = Repr::Large(map);
                    }
                    None
                }
            },
            Repr::Large(m) => m.insert(name, value),
            Repr::Window(w) => w.insert(name, value),
        }
    }

    pub fn remove(&mut self, name: &[u8]) -> Option<FieldValue> {
        match &mut self.0 {
            Repr::Small(v) => find(v, name).ok().map(|i| v.remove(i).1),
            Repr::Large(m) => m.remove(name),
            Repr::Window(w) => w.remove(name),
        }
    }

    /// Fields in name order (of a window: those it has seen).
    pub fn iter(&self) -> Iter<'_> {
        match &self.0 {
            Repr::Small(v) => Iter::Small(v.iter()),
            Repr::Large(m) => Iter::Large(m.iter()),
            Repr::Window(w) => Iter::Window(Box::new(w.iter())),
        }
    }

    /// Field names in order.
    pub fn keys(&self) -> impl Iterator<Item = &Bytes> {
        self.iter().map(|(name, _)| name)
    }

    /// A lower bound of [`Fields::heap_bytes`], in constant time (what it counts besides the
    /// names' and values' bytes).
    pub fn min_heap_bytes(&self) -> u64 {
        let len = self.len() as u64;
        match &self.0 {
            Repr::Small(_) => len * FIELD_OVERHEAD,
            Repr::Large(_) => len * FIELD_OVERHEAD + len.div_ceil(FIELDS_PER_NODE) * MAP_NODE,
            Repr::Window(_) => 0,
        }
    }

    /// Reads the first byte of every value of a small hash, and nothing of a larger one. Called
    /// for many keys in a row before they are used (`WorkingSet::preload`), the reads of
    /// different keys do not wait on one another, so their cache misses overlap. The lookups
    /// that come later then find these bytes cached.
    pub fn warm(&self) {
        if let Repr::Small(v) = &self.0 {
            for (_, field) in v {
                std::hint::black_box(field.value.first().copied());
            }
        }
    }

    /// The memory the fields take, estimated (the mirror cache's weight).
    pub fn heap_bytes(&self) -> u64 {
        if let Repr::Window(w) = &self.0 {
            return w.heap_bytes(FIELD_OVERHEAD, MAP_NODE, FIELDS_PER_NODE);
        }
        let weigh =
            |(f, v): (&Bytes, &FieldValue)| f.len() as u64 + v.value.len() as u64 + FIELD_OVERHEAD;
        // The few fields of a row directly, not through the iterator of every representation
        // (weighing each value cached was 3% of capture's thread).
        if let Repr::Small(v) = &self.0 {
            let contents: u64 = v.iter().map(|(f, v)| weigh((f, v))).sum();
            return contents + (v.capacity() - v.len()) as u64 * 80;
        }
        let contents: u64 = self.iter().map(weigh).sum();
        match &self.0 {
            Repr::Small(_) => contents,
            Repr::Large(m) => contents + (m.len() as u64).div_ceil(FIELDS_PER_NODE) * MAP_NODE,
            Repr::Window(_) => contents,
        }
    }
}

/// The position of `name` in a sorted vector, or where it would go: a scan for the few fields of
/// a row (no unpredictable branches), a binary search beyond.
fn find(fields: &[(Bytes, FieldValue)], name: &[u8]) -> Result<usize, usize> {
    if fields.len() > 8 {
        return fields.binary_search_by(|(f, _)| compare(f, name));
    }
    for (i, (f, _)) in fields.iter().enumerate() {
        match compare(f, name) {
            std::cmp::Ordering::Less => continue,
            std::cmp::Ordering::Equal => return Ok(i),
            std::cmp::Ordering::Greater => return Err(i),
        }
    }
    Err(fields.len())
}

/// `stored` against `name`, in byte order. The names of a row mostly differ in their first
/// byte, and a mapped name is often looked up by the mapping's own bytes, which the stored name
/// shares (`capture::apply`): both are answered without calling `memcmp` (field lookups were 8%
/// of capture's thread, half of it in `memcmp`).
fn compare(stored: &Bytes, name: &[u8]) -> std::cmp::Ordering {
    if stored.as_ptr() == name.as_ptr() && stored.len() == name.len() {
        return std::cmp::Ordering::Equal;
    }
    match (stored.first(), name.first()) {
        (Some(a), Some(b)) if a != b => a.cmp(b),
        _ => stored.as_ref().cmp(name),
    }
}

/// Fields in name order.
pub enum Iter<'a> {
    Small(std::slice::Iter<'a, (Bytes, FieldValue)>),
    Large(std::collections::btree_map::Iter<'a, Bytes, FieldValue>),
    Window(Box<dyn Iterator<Item = (&'a Bytes, &'a FieldValue)> + 'a>),
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a Bytes, &'a FieldValue);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Small(i) => i.next().map(|(f, v)| (f, v)),
            Iter::Large(i) => i.next(),
            Iter::Window(i) => i.next(),
        }
    }
}

impl<'a> IntoIterator for &'a Fields {
    type Item = (&'a Bytes, &'a FieldValue);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// Fields in name order, owned.
pub enum IntoIter {
    Small(std::vec::IntoIter<(Bytes, FieldValue)>),
    Large(std::collections::btree_map::IntoIter<Bytes, FieldValue>),
}

impl Iterator for IntoIter {
    type Item = (Bytes, FieldValue);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            IntoIter::Small(i) => i.next(),
            IntoIter::Large(i) => i.next(),
        }
    }
}

impl IntoIterator for Fields {
    type Item = (Bytes, FieldValue);
    type IntoIter = IntoIter;

    fn into_iter(self) -> IntoIter {
        match self.0 {
            Repr::Small(v) => IntoIter::Small(v.into_iter()),
            Repr::Large(m) => IntoIter::Large(m.into_iter()),
            Repr::Window(w) => IntoIter::Large(w.merge([]).into_iter()),
        }
    }
}

impl FromIterator<(Bytes, FieldValue)> for Fields {
    fn from_iter<I: IntoIterator<Item = (Bytes, FieldValue)>>(items: I) -> Fields {
        let mut fields = Fields::new();
        for (name, value) in items {
            fields.insert(name, value);
        }
        fields
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

    /// The shortcuts of `compare` give byte order, as a slice comparison does.
    #[test]
    fn names_compare_in_byte_order() {
        let names: Vec<Bytes> = [
            "", "a", "ab", "abc", "b", "ba", "\u{0}", "\u{ff}", "age", "agE",
        ]
        .iter()
        .map(|n| Bytes::copy_from_slice(n.as_bytes()))
        .collect();
        for stored in &names {
            for name in &names {
                let copy = name.to_vec();
                assert_eq!(compare(stored, &copy), stored.as_ref().cmp(&copy[..]));
                assert_eq!(compare(stored, name), stored.as_ref().cmp(name.as_ref()));
            }
        }
    }

    /// The same operations on `Fields` and on a `BTreeMap` give the same contents, in the same
    /// order, across the change of representation and back down in size.
    #[test]
    fn behaves_as_an_ordered_map_small_and_large() {
        let mut fields = Fields::new();
        let mut model = BTreeMap::new();
        let name = |i: u64| Bytes::from(format!("f{}", (i * 7919) % 101));
        for i in 0..300u64 {
            let (n, v) = (name(i), value(&i.to_string()));
            assert_eq!(fields.insert(n.clone(), v.clone()), model.insert(n, v));
            if i % 3 == 0 {
                let gone = name(i / 2);
                assert_eq!(fields.remove(&gone), model.remove(&gone));
            }
            assert_eq!(fields.len(), model.len());
            assert!(
                fields.iter().eq(model.iter()),
                "same contents in order at {i}"
            );
            assert_eq!(fields.get(&name(i)), model.get(&name(i)));
            assert!(!fields.contains_key(b"absent"));
        }
        assert!(
            matches!(fields.0, Repr::Large(_)),
            "grown past {SMALL_FIELDS}"
        );
        let small: Fields = model
            .iter()
            .take(3)
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let mut large = fields.clone();
        let names: Vec<Bytes> = large.keys().skip(3).cloned().collect();
        for n in names {
            large.remove(&n);
        }
        assert!(matches!(small.0, Repr::Small(_)));
        assert_eq!(small, large, "equal by content whatever the representation");
        if let Some(v) = large.get_mut(b"f0") {
            v.value = Bytes::from_static(b"changed");
        }
        assert_ne!(small.get(b"f0"), large.get(b"f0"));
    }

    #[test]
    fn a_small_hash_takes_far_less_than_a_map_node() {
        let fields: Fields = (0..3)
            .map(|i| (Bytes::from(format!("field{i}")), value("value")))
            .collect();
        assert!(fields.heap_bytes() < 500, "{}", fields.heap_bytes());
    }

    #[test]
    fn the_lower_bound_never_exceeds_the_estimate() {
        let mut fields = Fields::new();
        for i in 0..1000u64 {
            assert!(fields.min_heap_bytes() <= fields.heap_bytes(), "{i} fields");
            fields.insert(Bytes::from(format!("f{i}")), value(""));
        }
        // Most of a large hash's estimate is what the bound counts.
        assert!(fields.min_heap_bytes() * 10 > fields.heap_bytes() * 9);
    }
}
