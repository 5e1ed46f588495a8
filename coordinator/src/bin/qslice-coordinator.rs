//! qslice-coordinator: leader election, slice assignment and the admin API.
//!
//! The daemon is not built yet; its planner lives in the library. Until then the binary
//! says so and exits non-zero, so that nobody mistakes it for a running coordinator.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("qslice-coordinator: the coordinator daemon is not available in this build yet");
    ExitCode::from(1)
}
