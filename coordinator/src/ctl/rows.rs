//! The rows of qslicectl's replies other than status (moves, pins, rebalance, drain
//! progress, events): serde types, the `--json` output. Pure. The status rows are
//! [`crate::status_rows`].

use std::time::{Duration, UNIX_EPOCH};

use qslice_proto::admin::{event, DrainProgress, Event, PlannedMove, RebalanceResponse};
use serde::Serialize;

use crate::status_rows::non_empty;

/// A slice move, done or planned.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MoveRow {
    /// Queue name.
    pub queue: String,
    /// Slice number.
    pub slice: u32,
    /// Node it leaves, if it had one.
    pub from_node: Option<String>,
    /// Node it goes to.
    pub to_node: Option<String>,
    /// Why the planner moves it (rebalance only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The `rebalance` reply.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RebalanceView {
    /// Whether the moves were written (false for a dry run).
    pub applied: bool,
    /// The moves.
    pub moves: Vec<MoveRow>,
}

/// The `pin` and `unpin` reply.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PinRow {
    /// Queue name.
    pub queue: String,
    /// Slice number.
    pub slice: u32,
    /// The node it is pinned to; `None` once unpinned.
    pub node: Option<String>,
}

/// One `drain` progress message.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DrainRow {
    /// The node being drained.
    pub node: String,
    /// Slices still on it.
    pub slices_remaining: u32,
    /// Slices moved away so far.
    pub slices_moved: u32,
    /// Whether the drain is complete.
    pub done: bool,
    /// What the coordinator says, if anything.
    pub message: Option<String>,
}

/// One cluster event.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventRow {
    /// Kind in lower case, e.g. `node_joined` (see [`event_kind_name`]).
    pub kind: String,
    /// Milliseconds since the Unix epoch.
    pub time_unix_ms: i64,
    /// The time as RFC 3339 (UTC).
    pub time: String,
    /// Node concerned.
    pub node: Option<String>,
    /// Queue concerned.
    pub queue: Option<String>,
    /// Slice concerned (only with a queue).
    pub slice: Option<u32>,
    /// Claim epoch (only when the server sends one).
    pub epoch: Option<i64>,
    /// Free text.
    pub message: Option<String>,
}

/// A planned move as a row.
pub fn planned_move_row(m: &PlannedMove) -> MoveRow {
    let (queue, slice) = m.slice.as_ref().map_or((String::new(), 0), |s| (s.queue.clone(), s.slice));
    MoveRow { queue, slice, from_node: non_empty(&m.from_node), to_node: non_empty(&m.to_node), reason: Some(m.reason.clone()) }
}

/// The rebalance reply as a view.
pub fn rebalance_view(r: &RebalanceResponse) -> RebalanceView {
    RebalanceView { applied: r.applied, moves: r.moves.iter().map(planned_move_row).collect() }
}

/// A drain progress message as a row.
pub fn drain_row(p: &DrainProgress) -> DrainRow {
    DrainRow { node: p.node.clone(), slices_remaining: p.slices_remaining, slices_moved: p.slices_moved, done: p.done, message: non_empty(&p.message) }
}

/// The lower-case name of an event kind, e.g. `node_joined`; `unknown_<n>` for a kind
/// newer than this client.
pub fn event_kind_name(kind: i32) -> String {
    match event::Kind::try_from(kind) {
        Ok(event::Kind::Unspecified) => "unspecified".to_owned(),
        Ok(k) => k.as_str_name().to_ascii_lowercase(),
        Err(_) => format!("unknown_{kind}"),
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 with milliseconds.
pub fn format_unix_ms(ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(ms.max(0).unsigned_abs());
    humantime::format_rfc3339_millis(time).to_string()
}

/// An event as a row.
pub fn event_row(e: &Event) -> EventRow {
    EventRow {
        kind: event_kind_name(e.kind),
        time_unix_ms: e.time_unix_ms,
        time: format_unix_ms(e.time_unix_ms),
        node: non_empty(&e.node),
        queue: non_empty(&e.queue),
        slice: (!e.queue.is_empty() && !e.whole_queue).then_some(e.slice),
        epoch: (e.epoch != 0).then_some(e.epoch),
        message: non_empty(&e.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kinds_are_lower_case_names() {
        assert_eq!(event_kind_name(event::Kind::NodeJoined as i32), "node_joined");
        assert_eq!(event_kind_name(event::Kind::SliceOrphaned as i32), "slice_orphaned");
        assert_eq!(event_kind_name(event::Kind::LeaderChanged as i32), "leader_changed");
        assert_eq!(event_kind_name(event::Kind::Alert as i32), "alert");
        assert_eq!(event_kind_name(event::Kind::AlertCleared as i32), "alert_cleared");
        assert_eq!(event_kind_name(0), "unspecified");
        assert_eq!(event_kind_name(99), "unknown_99", "a kind newer than the client still prints");
    }
}
