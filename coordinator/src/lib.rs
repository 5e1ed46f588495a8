//! qslice-coordinator: assigns slices to live runners, and the qslicectl admin client.
//!
//! # Layout
//! - [`config`]: configuration from file, flags and environment.
//! - [`cache`]: the instance's copy of the cluster, and the event stream.
//! - [`admin`]: the admin API's decisions; [`service`] is its thin gRPC face.
//! - [`leader`]: election and the level-triggered reconcile loop (the daemon).
//! - [`view`]: a decoded snapshot of the cluster, and the writes that reach a plan.
//! - [`health`]: the alerts and queue states derived from a snapshot (pure).
//! - [`planner`]: the pure assignment planner.
//! - [`offline`]: qslicectl's tools that need no coordinator (`slice-of`, `spool stats`).

pub mod admin;
pub mod cache;
pub mod config;
pub mod ctl;
pub mod dashboard;
pub mod health;
pub mod leader;
pub mod offline;
pub mod planner;
pub mod service;
pub mod view;
