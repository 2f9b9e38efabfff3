use std::process::ExitCode;

/// jemalloc rather than glibc's allocator: capture, the committer and the sinks allocate and
/// free on different threads, and glibc kept the memory a flush of a million keys had freed
/// (RSS 447 MB with a live heap under 50 MB; docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    writebehind::cli::main()
}
