//! Arbitrary bytes never make the command stream decoder panic, and offsets only grow.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use writebehind::position::ReplOffset;
use writebehind::replication::stream::CommandStream;

fuzz_target!(|data: &[u8]| {
    let mut stream = CommandStream::new(ReplOffset(1000), 0);
    let mut input = BytesMut::new();
    let mut last = ReplOffset(1000);
    for chunk in data.chunks(5) {
        input.extend_from_slice(chunk);
        loop {
            match stream.decode(&mut input) {
                Ok(Some(event)) => {
                    assert!(event.end() > last);
                    last = event.end();
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
