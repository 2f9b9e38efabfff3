//! The RDB formats of servers newer than the ones CI runs (Redis 8.6 writes RDB 13, 8.8 RDB
//! 14, Valkey 9.2 `VALKEY081`), from hand-built files: no binary of those servers can be had
//! here, so each file is built byte by byte from the layouts in redis and valkey `src/rdb.c`
//! (`rdbSaveObject`, `rdbSaveKeyMetadata`), as src/replication/rdb/mod.rs describes them. What is decoded: the hashes around the new
//! structures, which must come out whole (a skip one byte off would misread them); what is
//! refused: what cannot be skipped, with the offset.

use bytes::{Bytes, BytesMut};
use writebehind::replication::rdb::{
    decode_dump_payload, RdbDecoder, RdbError, RdbEvent, ValueKind,
};

/// An RDB written by hand: RDB length encoding, strings, raw bytes.
struct Rdb(Vec<u8>);

impl Rdb {
    fn new(header: &str) -> Rdb {
        Rdb(header.as_bytes().to_vec())
    }
    fn byte(mut self, b: u8) -> Rdb {
        self.0.push(b);
        self
    }
    fn raw(mut self, bytes: &[u8]) -> Rdb {
        self.0.extend_from_slice(bytes);
        self
    }
    fn len(mut self, n: u64) -> Rdb {
        match n {
            0..=63 => self.0.push(n as u8),
            64..=16383 => self.0.extend_from_slice(&[0x40 | (n >> 8) as u8, n as u8]),
            _ => {
                self.0.push(0x80);
                self.0.extend_from_slice(&(n as u32).to_be_bytes());
            }
        }
        self
    }
    fn string(self, s: &[u8]) -> Rdb {
        self.len(s.len() as u64).raw(s)
    }
    /// A hash of type 4 (field/value pairs).
    fn hash(self, key: &str, pairs: &[(&str, &str)]) -> Rdb {
        let mut rdb = self.byte(4).string(key.as_bytes()).len(pairs.len() as u64);
        for (f, v) in pairs {
            rdb = rdb.string(f.as_bytes()).string(v.as_bytes());
        }
        rdb
    }
    /// KEY_META with one class per entry, each holding `values` module strings.
    fn key_meta(self, classes: &[usize]) -> Rdb {
        let mut rdb = self.byte(0xF3).len(classes.len() as u64);
        for values in classes {
            rdb = rdb.raw(&[0x41, 0x42, 0x43, 0x01]);
            for i in 0..*values {
                // MODULE_OP_UINT then MODULE_OP_STRING, as RM_Save* write them.
                rdb = rdb.len(2).len(i as u64).len(5).string(b"meta\xff\x00");
            }
            rdb = rdb.len(0);
        }
        rdb
    }
    /// A stream of type 26 or 27: one listpack node, one group with one pending entry and one
    /// consumer (27: two NACKed ids), then the IDMP section with two producers.
    fn stream(self, type_byte: u8, key: &str) -> Rdb {
        let mut rdb = self.byte(type_byte).string(key.as_bytes()).len(1);
        rdb = rdb.string(&[0u8; 16]).string(b"a listpack, skipped whole");
        for meta in [1, 1700000000000, 0, 1700000000000, 0, 0, 0, 1] {
            rdb = rdb.len(meta); // length, last id, first id, max deleted id, entries added
        }
        rdb = rdb.len(1).string(b"group").len(1700000000000).len(0).len(1);
        rdb = rdb.len(1).raw(&[7u8; 24]).len(1); // pending: id, delivery time, count
        rdb = rdb
            .len(1)
            .string(b"consumer")
            .raw(&[9u8; 16])
            .len(1)
            .raw(&[7u8; 16]);
        if type_byte >= 27 {
            rdb = rdb.len(2).raw(&[5u8; 32]);
        }
        rdb = rdb.len(60_000).len(1000).len(2); // IDMP duration, max entries, producers
        rdb = rdb.string(b"producer-1").len(2);
        rdb = rdb.string(b"iid-1").len(1700000000000).len(0);
        rdb = rdb.string(b"iid-2").len(1700000000001).len(3);
        rdb = rdb.string(b"producer-2").len(0);
        rdb.len(2).len(1) // iids added, iids found duplicate
    }
    /// An array (type 28): every element tag, with the insert-index flag set.
    fn array(self, key: &str) -> Rdb {
        let rdb = self.byte(28).string(key.as_bytes()).len(4).len(1).len(9);
        let rdb = rdb.len(0).len(0).string(b"a string");
        let rdb = rdb.len(3).len(1).raw(&42i64.to_le_bytes());
        let rdb = rdb.len(5).len(2).raw(&1.5f64.to_le_bytes());
        rdb.len(8).len(3).string(b"small")
    }
    /// A Valkey path hash (type 23): paths, each with its fields and values.
    fn path_hash(self, key: &str, paths: &[(&str, &[(&str, &str)])]) -> Rdb {
        let mut rdb = self.byte(23).string(key.as_bytes()).len(paths.len() as u64);
        for (path, fields) in paths {
            rdb = rdb.string(path.as_bytes()).len(fields.len() as u64);
            for (f, v) in *fields {
                rdb = rdb.string(f.as_bytes()).string(v.as_bytes());
            }
        }
        rdb
    }
    /// EOF and a zero checksum (not computed).
    fn end(self) -> Vec<u8> {
        self.byte(0xFF).raw(&[0; 8]).0
    }
}

/// A key as decoded: name, kind, expiry and fields.
#[derive(Debug, PartialEq)]
struct Key {
    name: String,
    kind: ValueKind,
    expire_at_ms: Option<i64>,
    fields: Vec<(String, String)>,
}

/// Decodes `data` fed `chunk` bytes at a time.
fn decode(data: &[u8], chunk: usize) -> Result<Vec<Key>, RdbError> {
    let mut decoder = RdbDecoder::new();
    let mut input = BytesMut::new();
    let (mut fed, mut keys) = (0, Vec::<Key>::new());
    let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
    loop {
        match decoder.decode(&mut input)? {
            Some(RdbEvent::KeyStart {
                key,
                kind,
                expire_at_ms,
                ..
            }) => keys.push(Key {
                name: text(&key),
                kind,
                expire_at_ms,
                fields: Vec::new(),
            }),
            Some(RdbEvent::HashField(f)) => {
                let key = keys.last_mut().expect("a field inside a key");
                key.fields.push((text(&f.field), text(&f.value)));
            }
            Some(_) => {}
            None if decoder.is_done() => break,
            None if fed < data.len() => {
                let end = (fed + chunk).min(data.len());
                input.extend_from_slice(&data[fed..end]);
                fed = end;
            }
            None => {
                decoder.finish()?;
                break;
            }
        }
    }
    assert!(
        input.is_empty() && fed == data.len(),
        "bytes left after the RDB"
    );
    Ok(keys)
}

/// Decodes whole and byte by byte (every step cut at every place), which must agree. With
/// `WRITEBEHIND_RDB_SEEDS=<dir>` the file is also written there (seeds for `scripts/fuzz.sh`).
fn decode_both_ways(data: &[u8]) -> Vec<Key> {
    if let Ok(dir) = std::env::var("WRITEBEHIND_RDB_SEEDS") {
        let name = format!("newer-{:016x}.rdb", fnv(data));
        std::fs::write(std::path::Path::new(&dir).join(name), data).expect("seed written");
    }
    let whole = decode(data, data.len()).expect("decodes");
    assert_eq!(decode(data, 1).expect("decodes byte by byte"), whole);
    whole
}

/// FNV-1a: a stable name for a seed file.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

fn hash_key(name: &str, expire_at_ms: Option<i64>, fields: &[(&str, &str)]) -> Key {
    Key {
        name: name.into(),
        kind: ValueKind::Hash,
        expire_at_ms,
        fields: fields
            .iter()
            .map(|(f, v)| (f.to_string(), v.to_string()))
            .collect(),
    }
}

fn other_key(name: &str, kind: ValueKind) -> Key {
    Key {
        name: name.into(),
        kind,
        expire_at_ms: None,
        fields: Vec::new(),
    }
}

#[test]
fn rdb_13_key_metadata_and_idmp_streams_are_skipped_around_the_hashes() {
    let data = Rdb::new("REDIS0013")
        .byte(0xFA)
        .string(b"redis-ver")
        .string(b"8.6.0")
        .byte(0xFE)
        .len(0)
        .key_meta(&[2, 0])
        .hash("h1", &[("f", "v")])
        .byte(0xFC)
        .raw(&1_900_000_000_000i64.to_le_bytes())
        .key_meta(&[1])
        .hash("h2", &[("a", "1"), ("b", "2")])
        .stream(26, "s")
        .hash("after", &[("x", "y")])
        .end();
    assert_eq!(
        decode_both_ways(&data),
        vec![
            hash_key("h1", None, &[("f", "v")]),
            hash_key("h2", Some(1_900_000_000_000), &[("a", "1"), ("b", "2")]),
            other_key("s", ValueKind::Stream),
            hash_key("after", None, &[("x", "y")]),
        ]
    );
}

#[test]
fn rdb_14_nack_streams_and_arrays_are_skipped_around_the_hashes() {
    let data = Rdb::new("REDIS0014")
        .byte(0xFE)
        .len(0)
        .stream(27, "s")
        .hash("between", &[("f", "v")])
        .array("a")
        .key_meta(&[1])
        .array("with-meta")
        .hash("after", &[("x", "y")])
        .end();
    assert_eq!(
        decode_both_ways(&data),
        vec![
            other_key("s", ValueKind::Stream),
            hash_key("between", None, &[("f", "v")]),
            other_key("a", ValueKind::Array),
            other_key("with-meta", ValueKind::Array),
            hash_key("after", None, &[("x", "y")]),
        ]
    );
}

#[test]
fn valkey_081_path_hashes_are_skipped_around_the_hashes() {
    let long = "v".repeat(20_000);
    let data = Rdb::new("VALKEY081")
        .byte(0xFE)
        .len(0)
        .path_hash(
            "p",
            &[("a.b", &[("f", "1"), ("g", "2")]), ("c", &[("h", &long)])],
        )
        .hash("between", &[("f", "v")])
        .path_hash("empty", &[])
        .byte(22) // Valkey's HASH_2: field, value, i64 expiry
        .string(b"h2")
        .len(1)
        .string(b"x")
        .string(b"y")
        .raw(&(-1i64).to_le_bytes())
        .end();
    assert_eq!(
        decode_both_ways(&data),
        vec![
            other_key("p", ValueKind::PathHash),
            hash_key("between", None, &[("f", "v")]),
            other_key("empty", ValueKind::PathHash),
            hash_key("h2", None, &[("x", "y")]),
        ]
    );
}

#[test]
fn a_valkey_dump_payload_holds_valkey_types() {
    // Valkey 9 writes its own format number in the footer: 22 is then HASH_2, not 7.4's RC.
    let body = Rdb::new("").byte(22).len(1).string(b"f").string(b"v");
    let payload = body.raw(&5_000i64.to_le_bytes()).raw(&80u16.to_le_bytes());
    let dumped = decode_dump_payload(&Bytes::from(payload.raw(&[0; 8]).0)).expect("decodes");
    assert_eq!(dumped.kind, ValueKind::Hash);
    assert_eq!(dumped.fields[0].expire_at_ms, Some(5_000));
    let path = Rdb::new("").byte(23).len(1).string(b"p").len(1);
    let path = path.string(b"f").string(b"v").raw(&81u16.to_le_bytes());
    let dumped = decode_dump_payload(&Bytes::from(path.raw(&[0; 8]).0)).expect("decodes");
    assert_eq!(dumped.kind, ValueKind::PathHash);
    assert!(!dumped.empty);
}

#[test]
fn a_dump_payload_may_start_with_key_metadata() {
    let body = Rdb::new("").key_meta(&[1]).byte(4).len(1);
    let payload = body.string(b"f").string(b"v").raw(&13u16.to_le_bytes());
    let payload = Bytes::from(payload.raw(&[0; 8]).0);
    let dumped = decode_dump_payload(&payload).expect("decodes");
    assert_eq!(dumped.kind, ValueKind::Hash);
    assert_eq!(dumped.fields.len(), 1);
    assert_eq!(&dumped.fields[0].value[..], b"v");
    // RDB 12 had no KEY_META: 243 there is not a type.
    let old = Rdb::new("")
        .key_meta(&[0])
        .byte(4)
        .len(0)
        .raw(&12u16.to_le_bytes());
    let old = Bytes::from(old.raw(&[0; 8]).0);
    assert!(decode_dump_payload(&old).is_err());
}

#[test]
fn what_cannot_be_skipped_is_refused_with_its_offset() {
    let refused = |data: Vec<u8>, says: &str, at: u64| {
        let error = decode(&data, data.len()).expect_err("refused");
        let text = error.to_string();
        assert!(text.contains(says), "{text}");
        match error {
            RdbError::Malformed { offset, .. } => assert_eq!(offset, at, "{text}"),
            other => panic!("not a malformed-data error: {other}"),
        }
    };
    // Eight classes of key metadata (Redis writes at most seven), at the opcode's offset.
    let data = Rdb::new("REDIS0013").key_meta(&[0; 8]).end();
    refused(data, "KEY_META with 8 classes", 9);
    // An array element of an unknown tag, at the element.
    let data = Rdb::new("REDIS0014")
        .byte(28)
        .string(b"a")
        .len(1)
        .len(0)
        .len(0)
        .len(9)
        .end();
    refused(data, "array element tag 9", 14);
    // Types Redis added after 7.4 are not Valkey's: under VALKEY080 they are unknown.
    for type_byte in [24, 26, 28] {
        let data = Rdb::new("VALKEY080").byte(type_byte).string(b"k").end();
        refused(data, &format!("type or opcode {type_byte}"), 9);
    }
    // A path without fields (Valkey's loader refuses it too), at the path's field count.
    let data = Rdb::new("VALKEY081").path_hash("p", &[("a", &[])]).end();
    refused(data, "path hash path with 0 fields", 15);
    // PATH_HASH does not exist before VALKEY081.
    let data = Rdb::new("VALKEY080").path_hash("p", &[]).end();
    refused(data, "PATH_HASH", 9);
    // A command a forkless save inlined is a write: refused, never skipped.
    let data = Rdb::new("VALKEY081")
        .byte(0xF2)
        .raw(b"*3\r\n$4\r\nHSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
        .end();
    refused(data, "opcode 242", 9);
    // A version past what the decoder reads is refused before anything else.
    let data = Rdb::new("REDIS0015").end();
    let error = decode(&data, data.len()).expect_err("refused");
    assert!(
        matches!(error, RdbError::UnsupportedVersion { version: 15, .. }),
        "{error}"
    );
}
