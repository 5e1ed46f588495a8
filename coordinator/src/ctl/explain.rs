//! `qslicectl explain QUEUE/SLICE`: the argument, the reply as a serde row (the `--json`
//! output) and as labelled lines (the default output). Pure.

use qslice_proto::admin::{ExplainNode, ExplainSliceResponse};
use serde::Serialize;

use super::rows::format_unix_ms;
use crate::offline::format_age;
use crate::status_rows::non_empty;

/// A `QUEUE/SLICE` argument that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{input:?}: {reason}; write it as QUEUE/SLICE, e.g. in/3 (`qslicectl queues` lists the queues and their slice counts)")]
pub struct BadSliceArg {
    /// The argument as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Splits `in/3` into the queue and the slice number.
pub fn parse_slice_arg(input: &str) -> Result<(String, u32), BadSliceArg> {
    let bad = |reason| BadSliceArg { input: input.to_owned(), reason };
    let (queue, slice) = input.rsplit_once('/').ok_or_else(|| bad("no '/' between the queue and the slice number"))?;
    if queue.is_empty() {
        return Err(bad("no queue name before the '/'"));
    }
    let slice = slice.parse::<u32>().map_err(|_| bad("the slice is not a number (slices count from 0)"))?;
    Ok((queue.to_owned(), slice))
}

/// A node as `explain` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExplainNodeRow {
    /// Node id.
    pub id: String,
    /// Whether it has a node record.
    pub live: bool,
    /// Whether it is cordoned.
    pub cordoned: bool,
    /// Whether it refused the slice's queue.
    pub refuses_queue: bool,
    /// Whether its queue list allows the slice's queue.
    pub serves_queue: bool,
    /// Its weight.
    pub weight: u32,
    /// The registered incarnation.
    pub incarnation: Option<String>,
    /// Seconds since that incarnation registered.
    pub registered_seconds: Option<f64>,
    /// Its lease id (hex).
    pub lease_id: Option<String>,
}

/// A move of the slice, seen or planned.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExplainMoveRow {
    /// When it was seen (absent for a planned move).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// The node it leaves, if it had one.
    pub from_node: Option<String>,
    /// The node it goes to.
    pub to_node: String,
    /// The planner's reason.
    pub reason: String,
}

/// The `explain` reply.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExplainView {
    /// Queue name.
    pub queue: String,
    /// Slice number.
    pub slice: u32,
    /// The queue's slice count.
    pub queue_slices: u32,
    /// The answer in one line.
    pub summary: String,
    /// Everything that keeps the slice from a node or moves it.
    pub reasons: Vec<String>,
    /// The assignment's owner.
    pub desired_owner: Option<String>,
    /// The claim's holder.
    pub claim_holder: Option<String>,
    /// The claim's epoch.
    pub epoch: Option<i64>,
    /// Seconds since the claim was made.
    pub claim_age_seconds: Option<f64>,
    /// Whether an earlier incarnation of the holder made the claim.
    pub claim_from_old_incarnation: bool,
    /// The desired owner's node.
    pub desired_node: Option<ExplainNodeRow>,
    /// The holder's node.
    pub holder_node: Option<ExplainNodeRow>,
    /// Seconds left on the holder's lease.
    pub holder_lease_remaining_seconds: Option<i64>,
    /// The holder's lease's granted TTL.
    pub holder_lease_granted_seconds: Option<i64>,
    /// Seconds without a holder.
    pub unowned_seconds: f64,
    /// The pin's node.
    pub pinned_to: Option<String>,
    /// A pending move request's target.
    pub move_requested_to: Option<String>,
    /// Whether the queue is paused.
    pub queue_paused: bool,
    /// Whether the queue is being resliced.
    pub reslicing: bool,
    /// Whether maintenance mode is on.
    pub maintenance: bool,
    /// The queue's state in words.
    pub queue_state: String,
    /// Whether no live node may take the queue.
    pub no_eligible_node: bool,
    /// Nodes that refused the queue.
    pub refused_by: Vec<String>,
    /// Entries waiting, as last published (absent: no figures).
    pub depth: Option<u64>,
    /// Age of the oldest waiting entry, seconds.
    pub oldest_entry_age_seconds: Option<f64>,
    /// Entries in flight (`.bak`).
    pub in_flight: Option<u64>,
    /// Age of the oldest entry in flight, seconds.
    pub oldest_in_flight_age_seconds: Option<f64>,
    /// The node whose figures these are.
    pub figures_from_node: Option<String>,
    /// How old the figures are, seconds.
    pub figures_age_seconds: Option<f64>,
    /// The last move seen (absent: none seen since `history_since`).
    pub last_move: Option<ExplainMoveRow>,
    /// Since when the coordinator watched moves (RFC 3339).
    pub history_since: String,
    /// What the leader would do next (absent: nothing).
    pub next_move: Option<ExplainMoveRow>,
    /// Why nothing would move, or what it waits for.
    pub next_note: Option<String>,
}

fn node_row(n: &ExplainNode) -> ExplainNodeRow {
    ExplainNodeRow {
        id: n.id.clone(),
        live: n.live,
        cordoned: n.cordoned,
        refuses_queue: n.refuses_queue,
        serves_queue: n.serves_queue,
        weight: n.weight,
        incarnation: non_empty(&n.incarnation),
        registered_seconds: n.live.then_some(n.registered_seconds),
        lease_id: non_empty(&n.lease_id),
    }
}

/// The reply as a view.
pub fn explain_view(r: &ExplainSliceResponse) -> ExplainView {
    let (queue, slice) = r.slice.as_ref().map_or((String::new(), 0), |s| (s.queue.clone(), s.slice));
    let held = !r.claim_holder.is_empty();
    let figures = r.figures_known;
    ExplainView {
        queue,
        slice,
        queue_slices: r.queue_slices,
        summary: r.summary.clone(),
        reasons: r.reasons.clone(),
        desired_owner: non_empty(&r.desired_owner),
        claim_holder: non_empty(&r.claim_holder),
        epoch: held.then_some(r.epoch),
        claim_age_seconds: (r.claim_age_seconds >= 0.0).then_some(r.claim_age_seconds),
        claim_from_old_incarnation: r.claim_from_old_incarnation,
        desired_node: r.desired_node.as_ref().map(node_row),
        holder_node: r.holder_node.as_ref().map(node_row),
        holder_lease_remaining_seconds: (r.holder_lease_remaining_seconds >= 0).then_some(r.holder_lease_remaining_seconds),
        holder_lease_granted_seconds: (r.holder_lease_granted_seconds >= 0).then_some(r.holder_lease_granted_seconds),
        unowned_seconds: r.unowned_seconds,
        pinned_to: non_empty(&r.pinned_to),
        move_requested_to: non_empty(&r.move_requested_to),
        queue_paused: r.queue_paused,
        reslicing: r.reslicing,
        maintenance: r.maintenance,
        queue_state: r.queue_state.clone(),
        no_eligible_node: r.no_eligible_node,
        refused_by: r.refused_by.clone(),
        depth: figures.then_some(r.depth),
        oldest_entry_age_seconds: figures.then_some(r.oldest_entry_age_seconds),
        in_flight: figures.then_some(r.in_flight),
        oldest_in_flight_age_seconds: figures.then_some(r.oldest_in_flight_age_seconds),
        figures_from_node: non_empty(&r.figures_from_node),
        figures_age_seconds: figures.then_some(r.figures_age_seconds),
        last_move: r.last_move.as_ref().map(|m| ExplainMoveRow {
            time: Some(format_unix_ms(m.time_unix_ms)),
            from_node: non_empty(&m.from_node),
            to_node: m.to_node.clone(),
            reason: m.reason.clone(),
        }),
        history_since: format_unix_ms(r.history_since_unix_ms),
        next_move: r.next_move.as_ref().map(|m| ExplainMoveRow { time: None, from_node: non_empty(&m.from_node), to_node: m.to_node.clone(), reason: m.reason.clone() }),
        next_note: non_empty(&r.next_note),
    }
}

/// A node in words: `r1 (live, cordoned, incarnation 6f1c..., registered 3m05s ago)`.
fn describe_node(n: &ExplainNodeRow) -> String {
    if !n.live {
        return format!("{} (not live: no node record)", n.id);
    }
    let mut parts = vec!["live".to_owned()];
    if n.cordoned {
        parts.push("cordoned".to_owned());
    }
    if n.refuses_queue {
        parts.push("refuses the queue".to_owned());
    }
    if !n.serves_queue {
        parts.push("serves other queues".to_owned());
    }
    if n.weight == 0 {
        parts.push("weight 0".to_owned());
    }
    if let Some(inc) = &n.incarnation {
        parts.push(format!("incarnation {inc}"));
    }
    if let Some(age) = n.registered_seconds {
        parts.push(format!("registered {} ago", format_age(age)));
    }
    format!("{} ({})", n.id, parts.join(", "))
}

fn describe_move(m: &ExplainMoveRow) -> String {
    let mut line = String::new();
    if let Some(time) = &m.time {
        line.push_str(time);
        line.push_str("  ");
    }
    line.push_str(&format!("{} -> {} ({})", m.from_node.as_deref().unwrap_or("-"), m.to_node, m.reason));
    line
}

/// The reply as labelled lines.
pub fn render_explain(v: &ExplainView) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| out.push_str(&format!("{:<15}{value}\n", format!("{label}:")));
    line("slice", format!("{}/{} (of {} slices)", v.queue, v.slice, v.queue_slices));
    line("summary", v.summary.clone());
    line("desired owner", v.desired_node.as_ref().map_or_else(|| "none (not assigned)".to_owned(), describe_node));
    let holder = match &v.holder_node {
        Some(n) => describe_node(n),
        None if v.unowned_seconds > 0.0 => format!("none (unowned for {})", format_age(v.unowned_seconds)),
        None => "none".to_owned(),
    };
    line("holder", holder);
    if v.claim_holder.is_some() {
        let mut claim = format!("epoch {}", v.epoch.unwrap_or(0));
        if let Some(age) = v.claim_age_seconds {
            claim.push_str(&format!(", claimed {} ago", format_age(age)));
        }
        if v.claim_from_old_incarnation {
            claim.push_str(", by an earlier incarnation");
        }
        line("claim", claim);
        let lease = match (v.holder_lease_remaining_seconds, v.holder_lease_granted_seconds) {
            (Some(left), Some(granted)) => format!("{left}s left of {granted}s"),
            _ => "unknown".to_owned(),
        };
        line("lease", lease);
    }
    line("queue", format!("{} ({})", v.queue, v.queue_state));
    line("maintenance", if v.maintenance { "on" } else { "off" }.to_owned());
    if let Some(p) = &v.pinned_to {
        line("pinned to", p.clone());
    }
    if let Some(m) = &v.move_requested_to {
        line("move request", format!("to {m}"));
    }
    let figures = match (v.depth, v.in_flight) {
        (Some(depth), Some(in_flight)) => {
            let oldest = if depth > 0 { format_age(v.oldest_entry_age_seconds.unwrap_or(0.0)) } else { "-".to_owned() };
            let mut text = format!("{depth} waiting (oldest {oldest}), {in_flight} in flight (.bak)");
            if in_flight > 0 {
                text.push_str(&format!(" (oldest {})", format_age(v.oldest_in_flight_age_seconds.unwrap_or(0.0))));
            }
            let from = v.figures_from_node.as_deref().unwrap_or("a runner");
            text.push_str(&format!("; published by {from} {} ago", format_age(v.figures_age_seconds.unwrap_or(0.0))));
            text
        }
        _ => "unknown: no runner published figures of this slice".to_owned(),
    };
    line("entries", figures);
    let last = match &v.last_move {
        Some(m) => describe_move(m),
        None => format!("unknown (none seen since this coordinator began watching at {})", v.history_since),
    };
    line("last move", last);
    let next = match (&v.next_move, &v.next_note) {
        (Some(m), _) => describe_move(m),
        (None, Some(note)) => note.clone(),
        (None, None) => "nothing".to_owned(),
    };
    line("next", next);
    if !v.reasons.is_empty() {
        out.push_str("reasons:\n");
        for r in &v.reasons {
            out.push_str(&format!("  - {r}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use qslice_proto::admin::{PlannedMove, SliceMove, SliceRef};

    use super::*;

    #[test]
    fn slice_arguments_name_what_is_wrong() {
        assert_eq!(parse_slice_arg("in/3"), Ok(("in".to_owned(), 3)));
        assert_eq!(parse_slice_arg("a/b/0"), Ok(("a/b".to_owned(), 0)), "the last '/' splits");
        for (bad, why) in [("in", "no '/'"), ("/3", "no queue"), ("in/x", "not a number"), ("in/-1", "not a number")] {
            let err = parse_slice_arg(bad).expect_err(bad).to_string();
            assert!(err.contains(why) && err.contains(&format!("{bad:?}")) && err.contains("QUEUE/SLICE"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_orphaned_slice_shows_its_gone_owner_and_the_takeover() {
        let reply = ExplainSliceResponse {
            slice: Some(SliceRef { queue: "in".into(), slice: 3 }),
            queue_slices: 8,
            summary: "idle: its owner r1 is gone and nothing holds it".into(),
            reasons: vec!["node r1 is not live: its node record is gone (stopped, crashed or fenced)".into()],
            desired_owner: "r1".into(),
            desired_node: Some(ExplainNode { id: "r1".into(), ..ExplainNode::default() }),
            unowned_seconds: 3.2,
            queue_state: "active".into(),
            figures_known: true,
            figures_from_node: "r1".into(),
            figures_age_seconds: 4.0,
            depth: 12,
            oldest_entry_age_seconds: 65.0,
            last_move: Some(SliceMove { time_unix_ms: 1_700_000_000_123, from_node: String::new(), to_node: "r1".into(), reason: "new-queue-slice".into() }),
            next_move: Some(PlannedMove { slice: None, from_node: "r1".into(), to_node: "r2".into(), reason: "orphaned".into() }),
            history_since_unix_ms: 1_700_000_000_000,
            holder_lease_remaining_seconds: -1,
            holder_lease_granted_seconds: -1,
            claim_age_seconds: -1.0,
            ..ExplainSliceResponse::default()
        };
        let text = render_explain(&explain_view(&reply));
        let expected = "\
slice:         in/3 (of 8 slices)
summary:       idle: its owner r1 is gone and nothing holds it
desired owner: r1 (not live: no node record)
holder:        none (unowned for 3s)
queue:         in (active)
maintenance:   off
entries:       12 waiting (oldest 1m05s), 0 in flight (.bak); published by r1 4s ago
last move:     2023-11-14T22:13:20.123Z  - -> r1 (new-queue-slice)
next:          r1 -> r2 (orphaned)
reasons:
  - node r1 is not live: its node record is gone (stopped, crashed or fenced)
";
        assert_eq!(text, expected);
        let json = serde_json::to_value(explain_view(&reply)).expect("serializes");
        assert_eq!(json["desired_owner"], "r1");
        assert_eq!(json["claim_holder"], serde_json::Value::Null);
        assert_eq!(json["next_move"]["reason"], "orphaned");
        assert_eq!(json["depth"], 12);
    }
}
