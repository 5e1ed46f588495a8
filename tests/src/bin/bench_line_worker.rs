//! The worker coprocess `bench_throughput` also measures the worker handler with: it reads
//! paths a line at a time from a buffered stdin and answers `ok` to each, flushing every
//! answer. Unlike the `sh` loop (whose `read` makes one `read(2)` per byte), it costs
//! about what any worker costs that reads its input buffered: a read and a write per entry.

use std::io::{BufRead, Write};

fn main() -> std::io::Result<()> {
    let stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lines() {
        line?;
        stdout.write_all(b"ok\n")?;
        stdout.flush()?;
    }
    Ok(())
}
