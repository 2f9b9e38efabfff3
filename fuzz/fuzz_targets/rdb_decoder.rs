//! Arbitrary bytes, fed whole and in pieces, never make the RDB decoder panic, and both ways
//! agree.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use writebehind::replication::rdb::{RdbDecoder, RdbEvent};

fn run(data: &[u8], chunk: usize) -> (Vec<RdbEvent>, Option<String>) {
    let mut decoder = RdbDecoder::new();
    let mut input = BytesMut::new();
    let mut events = Vec::new();
    let mut fed = 0;
    loop {
        match decoder.decode(&mut input) {
            Ok(Some(event)) => events.push(event),
            Ok(None) if decoder.is_done() || fed == data.len() => {
                return (events, decoder.finish().err().map(|e| e.to_string()));
            }
            Ok(None) => {
                let end = (fed + chunk).min(data.len());
                input.extend_from_slice(&data[fed..end]);
                fed = end;
            }
            Err(e) => return (events, Some(e.to_string())),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = run(data, usize::MAX);
    let pieces = run(data, 3);
    assert_eq!(whole, pieces);
});
