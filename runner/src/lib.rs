//! qslice-runner: the daemon that runs on every host that mounts the shared spool.
//!
//! # Layout
//! - [`spool`]: the Mailman-compatible queue directory (listing by slice, dequeue,
//!   finish, preserve, recovery, quarantine, enqueue).

pub mod spool;
