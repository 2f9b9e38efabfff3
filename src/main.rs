use std::process::ExitCode;

/// jemalloc rather than glibc's allocator: capture, the committer and the sinks allocate and
/// free on different threads, and glibc kept the memory a flush of a million keys had freed
/// (RSS 447 MB with a live heap under 50 MB; docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (`MALLOC_CONF` in the environment still overrides
/// them): pages freed go back to the system after about a second instead of ten. A flush's
/// and a burst's peaks held about 20-30 MB less, at the same CPU (docs/benchmarks.md, session
/// 21). jemalloc declares `malloc_conf` as a `const char *`, which a reference to a byte array
/// is; this strong definition replaces jemalloc's weak, empty one.
#[export_name = "malloc_conf"]
static MALLOC_CONF: &[u8; 20] = b"dirty_decay_ms:1000\0";

fn main() -> ExitCode {
    writebehind::metrics::set_heap_reader(jemalloc_figures);
    writebehind::cli::main()
}

/// jemalloc's `stats.allocated` and `stats.resident` (refreshed by advancing its epoch), for
/// `memory_bytes{part="heap_*"}`; `None` when they cannot be read.
fn jemalloc_figures() -> Option<(u64, u64)> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    let allocated = tikv_jemalloc_ctl::stats::allocated::read().ok()?;
    let resident = tikv_jemalloc_ctl::stats::resident::read().ok()?;
    Some((allocated as u64, resident as u64))
}
