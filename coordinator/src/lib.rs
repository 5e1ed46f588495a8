//! qslice-coordinator: assigns slices to live runners, and the qslicectl admin client.
//!
//! # Layout
//! - [`config`]: configuration from file, flags and environment.
//! - [`cache`]: the instance's copy of the cluster, and the event stream.
//! - [`view`]: a decoded snapshot of the cluster, the planner's input built from it
//!   ([`view::planner_input`], one builder for the leader and the rebalance dry run), and
//!   the writes that reach a plan (pure).
//! - [`planner`]: the pure assignment planner: its contract and `plan` (`mod.rs`), one
//!   queue's work (`queue_work.rs`), the rounding of shares to slices (`rounding.rs`).
//! - [`leader`]: election and the level-triggered reconcile loop (the daemon).
//! - [`holds`]: the leader's revoke of a runner's lease and the hold on its slices.
//! - [`claim_checks`]: the leader's checks of claims against the assignment (claim
//!   deadline, unexplained claims, the reslice barrier) and its pause-proof clock (pure).
//! - [`health`]: the alerts and queue states derived from a snapshot (pure).
//! - [`admin`]: the admin API's decisions (ExplainSlice's in `admin/explain.rs`); [`service`] is its
//!   thin gRPC face.
//! - [`history`]: the slice moves an instance saw, for ExplainSlice's last move.
//! - [`status_rows`]: the cluster status as rows, built from the admin API's status
//!   reply; qslicectl prints them and the dashboard draws them (pure).
//! - [`dashboard`]: the HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, and the live
//!   dashboard page (`dashboard/page.html`) with its `/api/status`.
//! - [`ctl`]: qslicectl's admin client ([`ctl::client`]), its reply rows ([`ctl::rows`]),
//!   text output ([`ctl::render`]), `explain` ([`ctl::explain`]) and `rolling-restart`
//!   ([`ctl::restart`]).
//! - [`offline`]: qslicectl's tools that need no coordinator (`slice-of`, `spool stats`).
//!
//! The binaries in `src/bin/` parse flags, wire these together and print.

pub mod admin;
pub mod cache;
pub mod claim_checks;
pub mod config;
pub mod ctl;
pub mod dashboard;
pub mod health;
pub mod history;
pub mod holds;
pub mod leader;
pub mod offline;
pub mod planner;
pub mod service;
pub mod status_rows;
pub mod view;
