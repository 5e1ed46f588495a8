//! qslice-coordinator: assigns slices to live runners, and the qslicectl admin client.
//!
//! # Layout
//! - [`config`]: configuration from file, flags and environment.
//! - [`leader`]: election and the level-triggered reconcile loop (the daemon).
//! - [`view`]: a decoded snapshot of the cluster, and the writes that reach a plan.
//! - [`planner`]: the pure assignment planner.
//! - [`offline`]: qslicectl's tools that need no coordinator (`slice-of`, `spool stats`).

pub mod config;
pub mod ctl;
pub mod leader;
pub mod offline;
pub mod planner;
pub mod view;
