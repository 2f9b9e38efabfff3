//! Arbitrary DUMP payloads never make the decoder panic.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use writebehind::replication::rdb::decode_dump_payload;

fuzz_target!(|data: &[u8]| {
    let _ = decode_dump_payload(&Bytes::copy_from_slice(data));
});
