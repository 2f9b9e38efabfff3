//! Arbitrary bytes as a Redis reply, checked and then decoded the way `RedisClient` does: never
//! a panic and never a stack overflow, however deep the arrays nest. A leading byte picks a
//! small depth bound so that the fuzzer reaches the refusal with short inputs; the input is
//! also repeated to reach the real bound.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use writebehind::resp::{check, Check, MAX_DEPTH};

fuzz_target!(|data: &[u8]| {
    let Some((&bound, body)) = data.split_first() else {
        return;
    };
    for (input, max) in [
        (body.to_vec(), usize::from(bound % 8)),
        (body.repeat(MAX_DEPTH + 1), MAX_DEPTH),
    ] {
        match check(&input, max) {
            Check::Complete => {
                let mut bytes = BytesMut::from(&input[..]);
                let _ = redis_protocol::resp2::decode::decode_bytes_mut(&mut bytes);
            }
            Check::TooDeep { at } => assert!(at < input.len()),
            Check::Incomplete => {}
        }
    }
});
