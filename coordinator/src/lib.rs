//! qslice-coordinator: assigns slices to live runners, and the qslicectl admin client.
//!
//! # Layout
//! - [`offline`]: qslicectl's tools that need no coordinator (`slice-of`, `spool stats`).

pub mod offline;
