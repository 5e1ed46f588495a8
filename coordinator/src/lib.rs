//! qslice-coordinator: assigns slices to live runners, and the qslicectl admin client.
//!
//! # Layout
//! - [`offline`]: qslicectl's tools that need no coordinator (`slice-of`, `spool stats`).
//! - [`planner`]: the pure planner, from a cluster snapshot to the next assignment and its moves.

pub mod offline;
pub mod planner;
