//! qslicectl's side of the admin API, in three parts:
//!
//! - [`client`]: connecting (several addresses, next on failure), the bearer token and
//!   TLS, and one method per call.
//! - [`rows`]: the replies other than status as serde rows (the `--json` output); the
//!   status rows are [`crate::status_rows`], shared with the dashboard.
//! - [`render`]: rows as tables and lines (the default output).
//! - [`explain`]: `explain QUEUE/SLICE`: its argument, row and labelled lines.
//! - [`restart`]: `rolling-restart`: drain, restart, wait, uncordon, node by node.
//!
//! Contract: a call goes to the first address that answers. A failed connection or an
//! `UNAVAILABLE` status moves on to the next address (any coordinator instance serves the
//! API, and one that cannot reach etcd says `UNAVAILABLE`); every other status is the
//! answer. Unary calls, and the opening of a stream, are bounded by the per-call timeout;
//! a stream, once open, is not. Rows and rendering are pure.

pub mod client;
pub mod explain;
pub mod render;
pub mod restart;
pub mod rows;
