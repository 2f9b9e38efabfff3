//! Decodes an RDB file the way the replication link does (pushed in socket-sized reads) and
//! reports throughput and peak memory. Used by `scripts/bench-rdb.sh`.
//!
//! Usage: `rdb_decode <file.rdb>`; prints one `key=value` line per figure.

use std::io::Read;
use std::time::Instant;

use bytes::BytesMut;
use writebehind::replication::rdb::{RdbDecoder, RdbEvent};

/// The service's allocator (`src/main.rs`), so that the decoder runs here as it runs there.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const READ_SIZE: usize = 64 * 1024;

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: rdb_decode <file.rdb>")?;
    let mut file = std::fs::File::open(&path)?;
    let started = Instant::now();
    let mut decoder = RdbDecoder::new();
    let mut input = BytesMut::with_capacity(4 * READ_SIZE);
    let (mut keys, mut hashes, mut fields, mut field_bytes) = (0u64, 0u64, 0u64, 0u64);
    loop {
        match decoder.decode(&mut input)? {
            Some(RdbEvent::KeyStart { kind, .. }) => {
                keys += 1;
                if kind == writebehind::replication::rdb::ValueKind::Hash {
                    hashes += 1;
                }
            }
            Some(RdbEvent::HashField(field)) => {
                fields += 1;
                field_bytes += (field.field.len() + field.value.len()) as u64;
            }
            Some(_) => {}
            None if decoder.is_done() => break,
            None => {
                input.reserve(READ_SIZE);
                let start = input.len();
                input.resize(start + READ_SIZE, 0);
                let read = file.read(&mut input[start..])?;
                input.truncate(start + read);
                if read == 0 {
                    decoder.finish()?;
                    break;
                }
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let bytes = decoder.consumed();
    println!("file={path}");
    println!("bytes={bytes}");
    println!("keys={keys}");
    println!("hashes={hashes}");
    println!("hash_fields={fields}");
    println!("hash_field_bytes={field_bytes}");
    println!("seconds={seconds:.3}");
    println!("mb_per_s={:.1}", bytes as f64 / 1e6 / seconds);
    println!("keys_per_s={:.0}", keys as f64 / seconds);
    println!("peak_rss_kib={}", peak_rss_kib());
    Ok(())
}
