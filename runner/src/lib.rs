//! qslice-runner: the daemon that runs on every host that mounts the shared spool.
//!
//! # Layout
//! - [`config`]: configuration from file, flags and environment.
//! - [`schedule`]: a singleton command's table and its cron schedule (below `config`).
//! - [`shared`]: what every part of an incarnation shares (configuration, keys, handler,
//!   in-flight permits, warm pools).
//! - [`membership`]: the node record on this incarnation's lease.
//! - [`incarnation`]: one incarnation's watch loop: executes the ownership plan (claim,
//!   recover, start, release) and gives up queues that cannot run here.
//! - [`ownership`]: the ownership state machine as plain data: desired against held, the
//!   pure plan of claims and releases, refusals.
//! - [`claims`]: the claim protocol in etcd: the claim and release transactions, adoption
//!   of a claim whose answer was lost, releases retried while the lease lasts.
//! - [`processor`]: handled queues: one loop per queue, entries in flight, handler outcomes.
//! - [`arrivals`]: the inotify wake-up hint of an idle queue loop (polling stays the truth).
//! - [`supervised_slices`]: the lifecycle of slices run by supervised Mailman runners.
//! - [`retry`]: backoff, per-key deferral and alert rate limits for faults of the moment.
//! - [`figures`]: the slice figures published as metrics and to etcd.
//! - [`handler`]: the built-in handlers (exec, move, worker coprocess).
//! - [`supervise`]: real Mailman runners, one child process per claimed slice.
//! - [`singleton`]: cluster-wide singleton commands (periodic or long-running), each run by
//!   the one node that holds its claim, with the same fence, leash and takeover as a slice.
//! - [`leash`]: the process that kills the children at the fence deadline, whatever the runner does.
//! - [`mailman3`]: qslice's own Mailman 3 slice runner, its control channel and warm pool.
//! - [`daemon`]: the top level: state-dir lock, incarnations, shutdown.
//! - [`child`]: how child processes are started.
//! - `spool_mount`: what the spool is mounted as, and what to change about an NFS mount.
//!
//! What the runner shares with the coordinator (etcd, the lease and its fence, logging,
//! signals, sd_notify, health routes, the spool) is `qslice_common`.

pub mod arrivals;
pub mod child;
pub mod claims;
pub mod config;
pub mod daemon;
pub mod figures;
pub mod handler;
pub mod incarnation;
pub mod leash;
pub mod mailman3;
pub mod membership;
pub mod ownership;
pub mod processor;
pub mod retry;
pub mod schedule;
pub mod shared;
pub mod singleton;
mod spool_mount;
pub mod supervise;
pub mod supervised_slices;
