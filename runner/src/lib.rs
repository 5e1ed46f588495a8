//! qslice-runner: the daemon that runs on every host that mounts the shared spool.
//!
//! # Layout
//! - [`cli`]: what the daemons' `main` functions share (logging, stop signals).
//! - [`config`]: configuration from file, flags and environment.
//! - [`etcd`]: connecting to etcd and list-then-watch of a key prefix.
//! - [`membership`]: the lease, the node record, keepalive and the self-fencing clock.
//! - [`owner`]: the ownership state machine: claims, recovery, processing, release.
//! - [`handler`]: the built-in handlers (exec, move).
//! - [`spool`]: the Mailman-compatible queue directory.
//! - [`supervise`]: real Mailman runners, one child process per claimed slice.
//! - [`leash`]: the process that kills the children at the fence deadline, whatever the runner does.
//! - [`mailman3`]: qslice's own Mailman 3 slice runner, its control channel and warm pool.
//! - [`daemon`]: the top level: state-dir lock, incarnations, shutdown.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod etcd;
pub mod handler;
pub mod http;
pub mod leash;
pub mod mailman3;
pub mod membership;
pub mod notify;
pub mod owner;
pub mod spool;
pub mod supervise;
