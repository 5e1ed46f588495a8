//! The mechanics qslice's daemons share. The runner and the coordinator never import each
//! other: what both need lives here, beside the contract in `qslice-proto`.
//!
//! - [`config`]: the etcd connection settings, the log format, duration strings, TOML files.
//! - [`etcd`]: connecting to etcd and list-then-watch of a key prefix.
//! - [`lease`]: the lease grant and keepalive, and the self-fencing clock.
//! - [`daemon`]: logging and stop signals.
//! - [`notify`]: systemd readiness and watchdog (sd_notify).
//! - [`health`]: the `/metrics`, `/healthz` and `/readyz` routes.
//! - [`retry`]: backoff, and the retry loop of start-up steps.
//! - [`spool`]: the Mailman-compatible queue directory.

pub mod config;
pub mod daemon;
pub mod etcd;
pub mod health;
pub mod lease;
pub mod notify;
pub mod retry;
pub mod spool;
