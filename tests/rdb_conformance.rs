//! Conformance of the RDB decoder over the shared corpus of real RDB files
//! (`fixtures/rdb`, see its MANIFEST.md and EXPECTED.md).
//!
//! - Every file Redis 7.0.15 loaded is compared with what Redis loaded
//!   (`redis-7.0.15-load.json`): keys per database, their types, hash contents, expired keys.
//! - Every other file has its expected outcome here, transcribed from EXPECTED.md: the keys and
//!   hash contents its source states, or the error it must give.
//! - Every file decodes to the same events whether it arrives whole or in small pieces.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use serde_json::Value;
use writebehind::replication::rdb::{Checksum, RdbDecoder, RdbError, RdbEvent, ValueKind};

fn corpus() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/rdb");
    assert!(
        dir.is_dir(),
        "the RDB corpus is missing at {}: it is part of the repository",
        dir.display()
    );
    dir
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Key {
    db: u64,
    name: Bytes,
    kind: Option<ValueKind>,
    expire_at_ms: Option<i64>,
    fields: Vec<(Bytes, Bytes, Option<i64>)>,
    empty: bool,
}

#[derive(Debug, Default)]
struct Decoded {
    keys: Vec<Key>,
    aux: Vec<(Bytes, Bytes)>,
    functions: Vec<Bytes>,
    modules_aux: Vec<String>,
    checksum: Option<Checksum>,
    events: Vec<RdbEvent>,
}

/// Decodes `data` fed in pieces of `chunk` bytes. Bytes after the end of the RDB are an error
/// unless `allow_trailing` (an AOF with an RDB preamble).
fn decode(data: &[u8], chunk: usize, allow_trailing: bool) -> Result<Decoded, RdbError> {
    let mut decoder = RdbDecoder::new();
    let mut input = BytesMut::new();
    let mut fed = 0;
    let mut out = Decoded::default();
    let mut current: Option<Key> = None;
    loop {
        match decoder.decode(&mut input)? {
            Some(event) => {
                out.events.push(event.clone());
                match event {
                    RdbEvent::Aux { key, value } => out.aux.push((key, value)),
                    RdbEvent::Function { code } => out.functions.push(code),
                    RdbEvent::ModuleAux { module } => out.modules_aux.push(module),
                    RdbEvent::KeyStart {
                        db,
                        key,
                        kind,
                        expire_at_ms,
                        ..
                    } => {
                        current = Some(Key {
                            db,
                            name: key,
                            kind: Some(kind),
                            expire_at_ms,
                            ..Key::default()
                        })
                    }
                    RdbEvent::HashField(f) => current
                        .as_mut()
                        .expect("field outside a key")
                        .fields
                        .push((f.field, f.value, f.expire_at_ms)),
                    RdbEvent::KeyEnd { empty } => {
                        let mut key = current.take().expect("KeyEnd without KeyStart");
                        key.empty = empty;
                        out.keys.push(key);
                    }
                    RdbEvent::End { checksum } => out.checksum = Some(checksum),
                    _ => {}
                }
            }
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
    let trailing = input.len() + (data.len() - fed);
    if trailing > 0 && !allow_trailing {
        return Err(RdbError::Malformed {
            offset: decoder.consumed(),
            message: format!("{trailing} bytes after the RDB"),
        });
    }
    Ok(out)
}

fn read(file: &str) -> Vec<u8> {
    let path = corpus().join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Files with bytes after their RDB: an AOF with an RDB preamble, and a snapshot captured from
/// a diskless sync with its 40-byte EOF mark still attached.
const TRAILING_BYTES_EXPECTED: [&str; 2] = [
    "redis-7.2/rdb-preamble.aof",
    "redis-rdb-tools/redis_40_with_module.rdb",
];

fn decode_file(file: &str) -> Result<Decoded, RdbError> {
    decode(
        &read(file),
        usize::MAX,
        TRAILING_BYTES_EXPECTED.contains(&file),
    )
}

/// EXPECTED.md notation: printable UTF-8 as text, otherwise printable ASCII kept and every
/// other byte as `\xNN`.
fn render(bytes: &[u8]) -> String {
    if let Ok(text) = std::str::from_utf8(bytes) {
        if text.chars().all(|c| !c.is_control()) {
            return text.to_string();
        }
    }
    bytes
        .iter()
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

fn kind_name(kind: Option<ValueKind>) -> &'static str {
    kind.map(ValueKind::name).unwrap_or("?")
}

fn hash_of(key: &Key) -> BTreeMap<String, String> {
    key.fields
        .iter()
        .map(|(f, v, _)| (render(f), render(v)))
        .collect()
}

fn find<'a>(decoded: &'a Decoded, name: &str) -> &'a Key {
    decoded
        .keys
        .iter()
        .find(|k| render(&k.name) == name)
        .unwrap_or_else(|| panic!("key {name} not decoded"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Every file Redis 7.0.15 loaded decodes to the same keys, types and hash contents.
#[test]
fn files_redis_loaded_decode_to_what_redis_loaded() {
    let load: Value = serde_json::from_slice(&read("redis-7.0.15-load.json")).expect("load json");
    let mut files = 0;
    for entry in load.as_array().expect("array") {
        if entry["loaded"] != Value::Bool(true) {
            continue;
        }
        let file = entry["file"].as_str().expect("file");
        let decoded = decode_file(file).unwrap_or_else(|e| panic!("{file}: {e}"));
        files += 1;
        // Redis drops empty collections and, loading as a primary, keys already expired.
        let now = now_ms();
        let expired = decoded
            .keys
            .iter()
            .filter(|k| !k.empty && k.expire_at_ms.is_some_and(|at| at < now))
            .count();
        let live: Vec<&Key> = decoded
            .keys
            .iter()
            .filter(|k| !k.empty && k.expire_at_ms.is_none_or(|at| at >= now))
            .collect();
        let log: Vec<&str> = entry["log"]
            .as_array()
            .expect("log")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        if let Some(line) = log.iter().find(|l| l.contains("keys expired: ")) {
            let redis_expired: usize = line
                .split("keys expired: ")
                .nth(1)
                .and_then(|r| r.split(['.', ',']).next())
                .and_then(|n| n.trim().parse().ok())
                .expect("count");
            assert_eq!(expired, redis_expired, "{file}: keys expired at load");
        }
        assert_eq!(
            live.len() as u64,
            entry["total_keys"].as_u64().expect("total"),
            "{file}: total keys"
        );
        for (db, content) in entry["content"].as_object().expect("content") {
            let db: u64 = db.parse().expect("db");
            let ours: Vec<&&Key> = live.iter().filter(|k| k.db == db).collect();
            let mut our_types: BTreeMap<String, u64> = BTreeMap::new();
            for key in &ours {
                *our_types
                    .entry(kind_name(key.kind).to_string())
                    .or_default() += 1;
            }
            let their_types: BTreeMap<String, u64> = content["types"]
                .as_object()
                .expect("types")
                .iter()
                .map(|(t, n)| (t.clone(), n.as_u64().expect("n")))
                .collect();
            assert_eq!(our_types, their_types, "{file} db {db}: types");
            let our_names: BTreeSet<String> = ours.iter().map(|k| render(&k.name)).collect();
            if let Some(samples) = content.get("sample_keys").and_then(Value::as_array) {
                for sample in samples.iter().filter_map(Value::as_str) {
                    assert!(
                        our_names.contains(sample),
                        "{file} db {db}: key {sample} missing"
                    );
                }
            }
            let Some(keys) = content.get("keys").and_then(Value::as_array) else {
                continue;
            };
            let their_names: BTreeSet<String> = keys
                .iter()
                .map(|k| k["key"].as_str().expect("key").to_string())
                .collect();
            assert_eq!(our_names, their_names, "{file} db {db}: key names");
            for key in keys.iter().filter(|k| k["type"] == "hash") {
                let name = key["key"].as_str().expect("key");
                let ours = ours.iter().find(|k| render(&k.name) == name).expect("key");
                let fields = hash_of(ours);
                assert_eq!(
                    fields.len() as u64,
                    key["len"].as_u64().expect("len"),
                    "{file}: {name} field count"
                );
                let pairs = key
                    .get("value")
                    .or_else(|| key.get("first"))
                    .and_then(Value::as_array)
                    .expect("pairs");
                for pair in pairs {
                    let (f, v) = (
                        pair[0].as_str().expect("field"),
                        pair[1].as_str().expect("value"),
                    );
                    // Long values appear cut to their first 64 characters.
                    let ours = fields
                        .get(f)
                        .map(String::as_str)
                        .unwrap_or_else(|| panic!("{file}: {name}.{f} missing"));
                    assert!(
                        ours == v || (v.chars().count() == 64 && ours.starts_with(v)),
                        "{file}: {name}.{f}: {ours} vs {v}"
                    );
                }
            }
        }
    }
    assert_eq!(
        files, 87,
        "EXPECTED.md: Redis 7.0.15 loaded 87 of the 146 files"
    );
}

fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(f, v)| (f.to_string(), v.to_string()))
        .collect()
}

fn names(decoded: &Decoded) -> BTreeSet<String> {
    decoded.keys.iter().map(|k| render(&k.name)).collect()
}

/// Files Redis 7.0.15 did not load: newer versions, Valkey, modules, corruption.
#[test]
fn files_redis_did_not_load_give_what_their_sources_state() {
    let ok = |file: &str| decode_file(file).unwrap_or_else(|e| panic!("{file}: {e}"));

    // Hashes in every encoding, with field TTLs.
    let d = ok("librdb/hash_lp_v11.rdb");
    assert_eq!(
        hash_of(find(&d, "hash1")),
        fields(&[
            ("field2", "2"),
            ("field3", "3"),
            ("field4", "value4.0"),
            ("field5", "5.0"),
            ("6", "6")
        ])
    );
    assert_eq!(
        hash_of(find(&d, "hash2")),
        fields(&[
            ("field7", "value7"),
            ("field8", "value8"),
            ("9", "value9"),
            ("field10", "value10"),
            ("field11", "11"),
            ("12", "12.0")
        ])
    );
    for file in [
        "librdb/hash_with_expire_v12.rdb",
        "librdb/hash_lp_with_hexpire_v12.rdb",
    ] {
        let d = ok(file);
        assert_eq!(
            hash_of(find(&d, "myhash")),
            fields(&[
                ("field1", "value1"),
                ("field2", "value2"),
                ("field3", "value3")
            ]),
            "{file}"
        );
    }
    let ttls = |key: &Key| -> BTreeMap<String, Option<i64>> {
        key.fields.iter().map(|(f, _, t)| (render(f), *t)).collect()
    };
    let d = ok("HDT3213-rdb/hash_with_hfe.rdb");
    let key = find(&d, "hash-hfe");
    assert_eq!(hash_of(key).len(), 8);
    assert_eq!(ttls(key)["F1"], Some(2755482424661));
    assert_eq!(ttls(key)["F2"], Some(2755483429282));
    assert_eq!(ttls(key)["F3"], Some(2755484433842));
    assert_eq!(ttls(key)["F4"], None);
    let d = ok("HDT3213-rdb/hash_as_listpack_with_hfe.rdb");
    let key = find(&d, "listpack-hfe");
    assert_eq!(
        hash_of(key),
        fields(&[("F1", "V1"), ("F2", "V2"), ("F3", "V3")])
    );
    assert_eq!(
        (ttls(key)["F1"], ttls(key)["F2"], ttls(key)["F3"]),
        (Some(2755482478325), None, Some(2755484483878))
    );
    let d = ok("HDT3213-rdb/valkey_hash2_with_hfe.rdb");
    let key = find(&d, "hash2-hfe");
    assert_eq!(
        hash_of(key),
        fields(&[("F1", "V1"), ("F2", "V2"), ("F3", "V3")])
    );
    assert_eq!(
        (ttls(key)["F1"], ttls(key)["F2"], ttls(key)["F3"]),
        (Some(2715785640000), Some(2400425640000), None)
    );
    let d = ok("redis-replicator/dump-ttlhash.rdb");
    let mut sizes: Vec<usize> = d
        .keys
        .iter()
        .filter(|k| k.kind == Some(ValueKind::Hash))
        .map(|k| k.fields.len())
        .collect();
    sizes.sort();
    assert_eq!(
        sizes,
        vec![3, 128, 1024],
        "dump-ttlhash: 1024, 128 and 3 fields"
    );
    assert!(find(&d, "iterttlhash")
        .fields
        .iter()
        .any(|(_, _, t)| t.is_some()));
    assert!(find(&d, "ttlhash1")
        .fields
        .iter()
        .any(|(_, _, t)| t.is_some()));
    let d = ok("HDT3213-rdb/zipmap_big_len.rdb"); // count byte 0xFF: walked, as HDT3213/rdb does
    assert_eq!(
        hash_of(find(&d, "zimap_doesnt_compress")),
        fields(&[("MKD1G6", "2"), ("YNNXK", "F7TI")])
    );
    let d = ok("rdb-rs/hash_list_pack.rdb");
    assert!(d.keys.iter().any(|k| k.kind == Some(ValueKind::Hash)
        && k.fields.iter().any(|(f, _, _)| f.starts_with(b"_ts:"))));

    // Other types are skipped by structure, keeping key and type.
    let d = ok("librdb/100_lists.rdb");
    assert_eq!(names(&d), (1..=100).map(|i| format!("mylist{i}")).collect());
    assert!(d.keys.iter().all(|k| k.kind == Some(ValueKind::List)));
    assert_eq!(
        names(&ok("librdb/cluster_slot_info.rdb")),
        BTreeSet::from(["abc".to_string()])
    );
    assert!(ok("librdb/empty.rdb").keys.is_empty());
    assert_eq!(ok("librdb/function.rdb").functions.len(), 1);
    let d = ok("librdb/function2.rdb");
    assert_eq!(d.functions.len(), 2);
    assert!(d
        .functions
        .iter()
        .any(|f| f.starts_with(b"#!lua name=mylib2")));
    assert_eq!(d.keys.len(), 10);
    for file in ["librdb/mem_policy_lfu.rdb", "librdb/mem_policy_lru.rdb"] {
        assert_eq!(
            names(&ok(file)),
            BTreeSet::from(["abcdefghijk".to_string()]),
            "{file}"
        );
    }
    let d = ok("librdb/misc_with_stream.rdb");
    assert!(
        !d.modules_aux.is_empty() && d.modules_aux.iter().all(|m| m == "test__rdb"),
        "{:?}",
        d.modules_aux
    );
    assert!(d.keys.iter().any(|k| k.kind == Some(ValueKind::Stream)));
    let d = ok("librdb/module.rdb");
    assert_eq!(find(&d, "key1").kind, Some(ValueKind::Module));
    assert_eq!(
        names(&ok("librdb/module_aux.rdb")),
        BTreeSet::from(["x".to_string()])
    );
    assert!(ok("librdb/module_aux_empty.rdb").keys.is_empty());
    assert!(!ok("librdb/module_aux_v12.rdb").modules_aux.is_empty());
    let d = ok("librdb/multiple_dbs.rdb");
    let dbs: Vec<(u64, String)> = d.keys.iter().map(|k| (k.db, render(&k.name))).collect();
    assert_eq!(dbs, vec![(0, "x".into()), (1, "y".into()), (2, "z".into())]);
    assert_eq!(names(&ok("librdb/multiple_lists_strings.rdb")).len(), 6);
    assert_eq!(
        find(&ok("librdb/plain_zset_2_v11.rdb"), "myzset").kind,
        Some(ValueKind::SortedSet)
    );
    assert_eq!(
        find(&ok("librdb/quicklist2_v11.rdb"), "mylist").kind,
        Some(ValueKind::List)
    );
    let d = ok("librdb/script.rdb");
    assert!(d.keys.is_empty());
    assert!(d
        .aux
        .iter()
        .any(|(k, v)| k.as_ref() == b"lua" && v.as_ref() == b"return 'Hello from Lua!'"));
    let d = ok("librdb/set_expired_v11.rdb");
    assert!(find(&d, "mykey")
        .expire_at_ms
        .is_some_and(|at| at < now_ms()));
    assert!(find(&ok("librdb/set_not_expired_v11.rdb"), "mykey")
        .expire_at_ms
        .is_some_and(|at| at > now_ms()));
    assert_eq!(
        find(&ok("librdb/set_is_v11.rdb"), "myintest").kind,
        Some(ValueKind::Set)
    );
    assert_eq!(
        find(&ok("librdb/set_lp_v11.rdb"), "myset").kind,
        Some(ValueKind::Set)
    );
    let d = ok("librdb/single_key.rdb");
    assert_eq!(names(&d), BTreeSet::from(["xxx".to_string()]));
    assert!(d.aux.iter().any(|(k, v)| k.as_ref() == b"repl-id"
        && v.as_ref() == b"67ebe8f627f436e2630eef8661a697fa33563a8f"));
    assert_eq!(
        find(&ok("librdb/stream_v11.rdb"), "mystream").kind,
        Some(ValueKind::Stream)
    );
    let d = ok("librdb/string_int_encoded.rdb");
    assert!(names(&d).contains("str::-281474976710656"));
    assert!(!ok("librdb/string_lzf.rdb").keys.is_empty());
    assert_eq!(
        find(&ok("librdb/zset_lp_v11.rdb"), "myzset").kind,
        Some(ValueKind::SortedSet)
    );
    let d = ok("redis-rdb-tools/redis_40_with_module.rdb");
    assert_eq!(find(&d, "foo").kind, Some(ValueKind::Module));
    assert_eq!(find(&d, "simplekey").kind, Some(ValueKind::String));
    assert_eq!(
        ok("redis-rdb-tools/redis_60_with_module_aux.rdb")
            .modules_aux
            .len(),
        1
    );
    let d = ok("redis-replicator/dump-module-2.rdb");
    assert_eq!(
        d.keys
            .iter()
            .filter(|k| k.kind == Some(ValueKind::Module))
            .count(),
        1
    );
    assert_eq!(ok("redis-replicator/dump-slot.rdb").keys.len(), 5);
    let d = ok("redis-replicator/dumpV11.rdb");
    assert_eq!(d.keys.len(), 2);
    assert!(d.keys.iter().any(|k| k.kind == Some(ValueKind::Stream)));
    let d = ok("HDT3213-rdb/expiration.rdb");
    assert_eq!(
        d.keys
            .iter()
            .filter(|k| k
                .expire_at_ms
                .is_some_and(|at| (1751731200000..1751817600000).contains(&at)))
            .count(),
        1
    );
    assert_eq!(
        d.keys
            .iter()
            .filter(|k| k.expire_at_ms.is_some_and(|at| at >= 1751817600000))
            .count(),
        0
    );
    assert_eq!(ok("HDT3213-rdb/function.rdb").functions.len(), 1);
    assert_eq!(
        find(&ok("HDT3213-rdb/set_listpack.rdb"), "s").kind,
        Some(ValueKind::Set)
    );
    assert_eq!(
        find(&ok("HDT3213-rdb/stream_listoacks_3.rdb"), "mystream").kind,
        Some(ValueKind::Stream)
    );
    assert!(!ok("HDT3213-rdb/tree.rdb").keys.is_empty());
    let d = ok("keydb/redis-module-save.rdb");
    assert_eq!(names(&d), (1..=5).map(|i| format!("key{i}")).collect());
    assert!(d.keys.iter().all(|k| k.kind == Some(ValueKind::Module)));
    // redis-rdb-cli: duplicate keys (Redis refuses them); all.rdb's stated counts.
    let d = ok("redis-rdb-cli/all.rdb");
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for key in &d.keys {
        *counts.entry(kind_name(key.kind)).or_default() += 1;
    }
    assert_eq!(
        counts,
        BTreeMap::from([
            ("zset", 17),
            ("set", 20),
            ("string", 85),
            ("stream", 11),
            ("module", 1),
            ("list", 23),
            ("hash", 113)
        ])
    );
    for file in [
        "redis-rdb-cli/12.rdb",
        "redis-rdb-cli/34.rdb",
        "redis-rdb-cli/89.rdb",
        "redis-rdb-cli/dump.rdb",
        "redis-rdb-cli/filter.rdb",
        "redis-rdb-cli/string.rdb",
    ] {
        assert!(!ok(file).keys.is_empty(), "{file}");
    }
    let merged: usize = [
        "redis-rdb-cli/12.rdb",
        "redis-rdb-cli/34.rdb",
        "redis-rdb-cli/89.rdb",
    ]
    .iter()
    .map(|f| ok(f).keys.len())
    .sum();
    assert_eq!(
        merged,
        ok("redis-rdb-cli/dump.rdb").keys.len(),
        "dump.rdb is the merge of 12, 34 and 89"
    );

    // Files that must fail, each with an error naming what and where.
    let fails = |file: &str| {
        decode_file(file)
            .err()
            .unwrap_or_else(|| panic!("{file} must not decode"))
    };
    assert!(matches!(
        fails("librdb/future_v19.rdb"),
        RdbError::UnsupportedVersion { version: 99, .. }
    ));
    assert!(matches!(
        fails("librdb/invalid_chksum_v8.rdb"),
        RdbError::BadChecksum {
            expected: 0xb477e446e98e5402,
            computed: 0xa609bb6465990fe1
        }
    ));
    let e = fails("redis-7.2/corrupt_ziplist.rdb");
    assert!(
        matches!(&e, RdbError::Malformed { message, .. } if message.contains("ziplist")),
        "{e}"
    );
    // node-rdb-tools reports offset 48, where the entry starts (type byte); the unknown
    // encoding 0xFF is the key's length byte right after it.
    let e = fails("node-rdb-tools/error_reporting.rdb");
    assert!(
        matches!(&e, RdbError::Malformed { offset: 49, message } if message.contains("unknown string encoding 63")),
        "{e}"
    );
    let e = fails("redis-replicator/module.rdb");
    assert!(e.to_string().contains("type 6"), "{e}");
    let e = fails("librdb/redis_ent_opcode_ram_lru.rdb");
    assert!(
        matches!(&e, RdbError::Malformed { message, .. } if message.contains("unknown RDB value type or opcode")),
        "{e}"
    );
}

/// Every file gives the same events fed whole, in 7-byte pieces and (for small files) byte by
/// byte; and every prefix of a file is reported as truncated at a precise offset.
#[test]
fn decoding_does_not_depend_on_how_the_bytes_arrive() {
    let mut files = Vec::new();
    for dir in std::fs::read_dir(corpus()).expect("corpus") {
        let dir = dir.expect("entry").path();
        if !dir.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&dir).expect("dir") {
            let path = file.expect("entry").path();
            if path.extension().is_some_and(|e| e == "rdb" || e == "aof") {
                files.push(path);
            }
        }
    }
    assert!(
        files.len() >= 140,
        "found only {} corpus files",
        files.len()
    );
    for path in &files {
        let data = std::fs::read(path).expect("read");
        let trailing = TRAILING_BYTES_EXPECTED.iter().any(|f| path.ends_with(f));
        let whole = decode(&data, usize::MAX, trailing);
        let chunks = [7usize, if data.len() < 200_000 { 1 } else { 4096 }];
        for chunk in chunks {
            let pieces = decode(&data, chunk, trailing);
            match (&whole, &pieces) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a.events, b.events, "{}: chunk {chunk}", path.display())
                }
                (Err(a), Err(b)) => assert_eq!(a, b, "{}: chunk {chunk}", path.display()),
                _ => panic!(
                    "{}: whole {:?} vs chunk {chunk} {:?}",
                    path.display(),
                    whole.as_ref().err(),
                    pieces.as_ref().err()
                ),
            }
        }
        if whole.is_ok() && data.len() < 20_000 {
            for cut in 0..data.len() {
                match decode(&data[..cut], usize::MAX, trailing) {
                    Err(RdbError::Truncated { offset, .. }) => assert!(offset <= cut as u64),
                    Ok(d) if trailing && d.checksum.is_some() => {}
                    other => panic!(
                        "{} cut at {cut}: {:?}",
                        path.display(),
                        other.map(|d| d.keys.len())
                    ),
                }
            }
        }
    }
}

/// A changed byte anywhere in a checksummed file is never accepted as good data.
#[test]
fn corruption_is_detected() {
    for file in [
        "librdb/hash_lp_v11.rdb",
        "redis-replicator/dumpV10.rdb",
        "HDT3213-rdb/valkey_hash2_with_hfe.rdb",
    ] {
        let data = read(file);
        let good = decode(&data, usize::MAX, false).expect("good file");
        assert!(
            matches!(good.checksum, Some(Checksum::Verified(_))),
            "{file}"
        );
        for i in 0..data.len() {
            let mut bad = data.clone();
            bad[i] ^= 0x01;
            if let Ok(decoded) = decode(&bad, usize::MAX, false) {
                panic!(
                    "{file}: flipping byte {i} was not detected ({} keys)",
                    decoded.keys.len()
                );
            }
        }
    }
}
