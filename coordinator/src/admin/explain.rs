//! ExplainSlice's decision: why a slice is where it is, and what stops each node from
//! taking it, from a snapshot (pure). qslicectl's `explain` renders the reply
//! (`ctl/explain.rs`).

use super::*;

/// What [`explain_slice`] needs beyond the snapshot, read by [`Admin::explain`].
#[derive(Clone, Debug, Default)]
pub struct ExplainFacts {
    /// Now, ms since the Unix epoch.
    pub now_ms: i64,
    /// The slice's claim record as stored, if it has a claim and it could be read.
    pub claim: Option<Claim>,
    /// The holder's lease: (seconds left, seconds granted), if etcd said.
    pub lease: Option<(i64, i64)>,
    /// Seconds the slice has had no claim holder (0 while held).
    pub unowned_seconds: f64,
    /// The last move of the slice this instance saw.
    pub last_move: Option<SeenMove>,
    /// When this instance began to watch moves.
    pub history_since_unix_ms: i64,
    /// The thresholds of the in-flight alert.
    pub alert_settings: crate::health::AlertSettings,
}

pub(super) fn explain_node(view: &ClusterView, id: &str, queue: &str, now_ms: i64) -> ExplainNode {
    let cordoned = view.cordons.contains(id);
    match view.nodes.get(id) {
        Some(n) => {
            let spec = NodeSpec::from_record(n, cordoned);
            ExplainNode {
                id: id.to_owned(),
                live: true,
                cordoned,
                refuses_queue: spec.refused.iter().any(|q| q == queue),
                serves_queue: spec.serves(queue),
                weight: n.weight,
                incarnation: n.incarnation.to_string(),
                registered_seconds: (now_ms - n.started_unix_ms).max(0) as f64 / 1000.0,
                lease_id: format!("{:x}", n.lease_id),
            }
        }
        None => ExplainNode { id: id.to_owned(), cordoned, ..ExplainNode::default() },
    }
}

/// Why `node` may not be given slices of `queue`, in words; `None` when it may.
pub(super) fn node_obstacle(node: &ExplainNode, queue: &str) -> Option<String> {
    let id = &node.id;
    if !node.live {
        return Some(format!("node {id} is not live: its node record is gone (stopped, crashed or fenced)"));
    }
    if node.refuses_queue {
        return Some(format!("node {id} refused queue {queue} (its supervised runners kept failing; see its log)"));
    }
    if node.cordoned {
        return Some(format!("node {id} is cordoned (qslicectl uncordon {id})"));
    }
    if !node.serves_queue {
        return Some(format!("node {id} serves other queues (its queue list leaves {queue} out)"));
    }
    if node.weight == 0 {
        return Some(format!("node {id} has weight 0"));
    }
    None
}

/// Why one slice is or is not being processed, from one snapshot and `facts`: its owners
/// and their nodes, everything that keeps it from a node, its figures, its last move, and
/// the leader's next step for it. The next step is planned from the leader's input for the
/// same snapshot ([`planner_input`], maintenance mode included) without a churn budget;
/// the leader alone also steers takeovers away from nodes that stall or missed a
/// keepalive, so its choice of node can differ. Pure.
pub fn explain_slice(view: &ClusterView, q: &QueueConfig, slice: u32, facts: &ExplainFacts) -> ExplainSliceResponse {
    let now = facts.now_ms;
    let k = (q.name.clone(), slice);
    let queue = q.name.as_str();
    let desired = view.current_assignment().get(&k).cloned();
    let claim = view.claims.get(&k);
    let desired_node = desired.as_deref().map(|d| explain_node(view, d, queue, now));
    let holder_node = claim.map(|c| explain_node(view, &c.node, queue, now));
    let reslicing = view.claims.iter().any(|((name, _), c)| name == queue && c.slices_total != q.slices);
    let no_eligible = no_eligible_node(view, q);
    let mut reasons = queue_reasons(view, q, reslicing, no_eligible.as_ref());
    let placement = placement_reasons(view, &k, now, [desired_node.as_ref(), holder_node.as_ref()], no_eligible.is_none(), &mut reasons);
    let old_incarnation = match (claim, &facts.claim) {
        (Some(c), Some(record)) => view.nodes.get(&c.node).is_some_and(|n| n.incarnation != record.incarnation),
        _ => false,
    };
    if old_incarnation {
        reasons.push("the claim was made by an earlier incarnation of its holder".to_owned());
    }
    if let Some(c) = claim.filter(|c| c.slices_total != q.slices) {
        reasons.push(format!("the claim was made under {} slices, the queue has {}", c.slices_total, q.slices));
    }
    let (listed, f, publisher) = published_figures(view, q, slice, facts, &mut reasons);

    let (next_move, next_note) = next_step(view, claim, queue, slice);

    let holder = claim.map(|c| c.node.clone());
    let summary = summary_of(q, claim, &desired, desired_node.as_ref(), reslicing, no_eligible.is_some(), reasons.is_empty());

    ExplainSliceResponse {
        slice: Some(SliceRef { queue: queue.to_owned(), slice }),
        queue_slices: q.slices,
        summary,
        reasons,
        desired_owner: desired.unwrap_or_default(),
        claim_holder: holder.unwrap_or_default(),
        epoch: claim.map_or(0, |c| c.epoch),
        claim_slices_total: claim.map_or(0, |c| c.slices_total),
        claim_age_seconds: facts.claim.as_ref().filter(|_| claim.is_some()).map_or(-1.0, |c| (now - c.claimed_unix_ms).max(0) as f64 / 1000.0),
        claim_from_old_incarnation: old_incarnation,
        desired_node,
        holder_node,
        holder_lease_remaining_seconds: facts.lease.map_or(-1, |(left, _)| left),
        holder_lease_granted_seconds: facts.lease.map_or(-1, |(_, granted)| granted),
        unowned_seconds: if claim.is_some() { 0.0 } else { facts.unowned_seconds },
        pinned_to: placement.pinned_to.unwrap_or_default(),
        move_requested_to: placement.move_requested_to.unwrap_or_default(),
        queue_paused: q.paused,
        reslicing,
        maintenance: view.maintenance,
        queue_state: queue_state(view, q),
        no_eligible_node: no_eligible.is_some(),
        refused_by: placement.refused,
        figures_known: listed > 0,
        figures_from_node: publisher.unwrap_or_default(),
        figures_age_seconds: if listed > 0 { (now - listed).max(0) as f64 / 1000.0 } else { 0.0 },
        depth: f.depth,
        oldest_entry_age_seconds: f.oldest_age_ms as f64 / 1000.0,
        in_flight: f.in_flight,
        oldest_in_flight_age_seconds: if f.in_flight > 0 { crate::health::aged(f.oldest_in_flight_age_ms, listed, now) as f64 / 1000.0 } else { 0.0 },
        last_move: facts.last_move.as_ref().map(|m| SliceMove {
            time_unix_ms: m.time_unix_ms,
            from_node: m.from.clone().unwrap_or_default(),
            to_node: m.to.clone(),
            reason: m.reason.to_string(),
        }),
        history_since_unix_ms: facts.history_since_unix_ms,
        next_move,
        next_note,
    }
}

/// The reasons that hold for the whole queue: paused, being resliced, maintenance, no
/// eligible node.
fn queue_reasons(view: &ClusterView, q: &QueueConfig, reslicing: bool, no_eligible: Option<&crate::health::NoEligibleNode>) -> Vec<String> {
    let queue = q.name.as_str();
    let mut reasons = Vec::new();
    if q.paused {
        reasons.push(format!("queue {queue} is paused: nobody takes its entries (qslicectl queue resume {queue})"));
    }
    if reslicing {
        let old = view.claims.iter().filter(|((name, _), c)| name == queue && c.slices_total != q.slices).count();
        reasons.push(format!("queue {queue} is being resliced to {} slices: it is held as paused until its {old} claims under the old count are released", q.slices));
    }
    if view.maintenance {
        reasons.push("maintenance mode is on: no planned moves, only orphans are taken over (qslicectl maintenance off)".to_owned());
    }
    if let Some(why) = no_eligible {
        reasons.push(format!("queue {queue} has {why}"));
    }
    reasons
}

/// What an operator asked of the slice's placement, and which nodes refuse its queue.
struct Placement {
    pinned_to: Option<String>,
    move_requested_to: Option<String>,
    refused: Vec<String>,
}

/// Adds to `reasons` the slice's pin, a requested move, what stands in the way of its
/// desired and holding `nodes`, and the nodes that refuse its queue (when some node is
/// eligible: otherwise the queue's reason says it all).
fn placement_reasons(view: &ClusterView, k: &(String, u32), now: i64, nodes: [Option<&ExplainNode>; 2], some_eligible: bool, reasons: &mut Vec<String>) -> Placement {
    let (queue, slice) = (k.0.as_str(), k.1);
    let pinned_to = view.pins.get(k).cloned();
    if let Some(p) = &pinned_to {
        match node_obstacle(&explain_node(view, p, queue, now), queue) {
            Some(o) => reasons.push(format!("pinned to {p}, but {o}: the pin is ignored meanwhile")),
            None => reasons.push(format!("pinned to {p} (qslicectl unpin {queue} {slice})")),
        }
    }
    let move_requested_to = view.moves.get(k).cloned();
    if let Some(m) = &move_requested_to {
        reasons.push(format!("a move to {m} was requested and is not done yet"));
    }
    for node in nodes.into_iter().flatten() {
        if let Some(o) = node_obstacle(node, queue) {
            if !reasons.contains(&o) {
                reasons.push(o);
            }
        }
    }
    let refused = refused_by(view, queue);
    if !refused.is_empty() && some_eligible {
        reasons.push(format!("refused by {} (the other nodes take the queue)", refused.join(", ")));
    }
    Placement { pinned_to, move_requested_to, refused }
}

/// The figures runners published for the slice (when listed, the figures, and by whom);
/// adds a reason if its entries have been in flight too long.
fn published_figures(
    view: &ClusterView,
    q: &QueueConfig,
    slice: u32,
    facts: &ExplainFacts,
    reasons: &mut Vec<String>,
) -> (i64, qslice_proto::records::SliceFigures, Option<String>) {
    let (queue, now) = (q.name.as_str(), facts.now_ms);
    let figures = view.slice_figures().remove(&(q.name.clone(), slice));
    let publisher = figures.as_ref().and_then(|(listed, _)| {
        view.status.iter().find(|((_, name), st)| name == queue && st.listed_unix_ms == *listed && st.slices_total == q.slices).map(|((n, _), _)| n.clone())
    });
    let (listed, f) = figures.unwrap_or((0, qslice_proto::records::SliceFigures { slice, depth: 0, in_flight: 0, oldest_age_ms: 0, oldest_in_flight_age_ms: 0 }));
    if in_flight_too_long(f.in_flight, f.oldest_in_flight_age_ms, listed, now, &facts.alert_settings) {
        reasons.push(format!(
            "{} entries in flight (.bak), the oldest for {}: a handler may be stuck",
            f.in_flight,
            crate::health::spoken_age(crate::health::aged(f.oldest_in_flight_age_ms, listed, now))
        ));
    }
    (listed, f, publisher)
}

/// What the leader would do next with the slice: the move it would plan, or why none.
fn next_step(view: &ClusterView, claim: Option<&crate::view::ClaimView>, queue: &str, slice: u32) -> (Option<PlannedMove>, String) {
    let k = (queue.to_owned(), slice);
    let live = view.nodes.keys().cloned().collect();
    let options = PlanOptions { churn_budget: usize::MAX, max_vanished_fraction: 1.0, maintenance: false };
    let planned = plan(&planner_input(view, live, options).input);
    let to_move = |m: &crate::planner::Move| PlannedMove {
        slice: Some(SliceRef { queue: m.queue.clone(), slice: m.slice }),
        from_node: m.from.clone().unwrap_or_default(),
        to_node: m.to.clone(),
        reason: m.reason.to_string(),
    };
    let next_move = planned.moves.iter().find(|m| m.queue == queue && m.slice == slice).map(to_move);
    let next_note = if next_move.is_some() {
        String::new()
    } else if planned.uncovered.contains(&k) {
        "nothing: no node may take it".to_owned()
    } else if planned.released.contains(&k) || !planned.assignment.contains_key(&k) {
        "nothing: the slice is not to run now".to_owned()
    } else if let Some(held_back) = plan(&dry_run_input(view)).moves.iter().find(|m| m.queue == queue && m.slice == slice && view.maintenance) {
        format!("nothing while maintenance mode is on; once it is off: {} -> {} ({})", held_back.from.as_deref().unwrap_or("-"), held_back.to, held_back.reason)
    } else {
        let owner = planned.assignment.get(&k).cloned().unwrap_or_default();
        match claim {
            Some(c) if c.node != owner => format!("nothing new: {} is to hand it over to {owner} (the leader revokes {}'s lease after the revoke deadline)", c.node, c.node),
            Some(_) => format!("nothing: it stays on {owner}"),
            None => format!("nothing new: {owner} is to claim it; if it does not within the claim deadline the leader gives it to another node"),
        }
    };
    (next_move, next_note)
}

/// The one line a slice's explanation starts with.
fn summary_of(
    q: &QueueConfig,
    claim: Option<&crate::view::ClaimView>,
    desired: &Option<String>,
    desired_node: Option<&ExplainNode>,
    reslicing: bool,
    no_eligible: bool,
    no_reasons: bool,
) -> String {
    let holder = claim.map(|c| c.node.clone());
    match (&holder, desired) {
        (Some(h), Some(d)) if h == d && no_reasons => format!("processing on {h} (epoch {})", claim.map_or(0, |c| c.epoch)),
        (Some(h), Some(d)) if h == d => format!("held by {h} (epoch {}), see the reasons below", claim.map_or(0, |c| c.epoch)),
        (Some(h), Some(d)) => format!("handing off: {h} holds it, {d} is to take it"),
        (Some(h), None) => format!("held by {h} without an assignment: it is to let go"),
        (None, _) if q.paused => "idle: the queue is paused".to_owned(),
        (None, _) if reslicing => "idle: the queue is being resliced".to_owned(),
        (None, Some(d)) if desired_node.is_some_and(|n| !n.live) => format!("idle: its owner {d} is gone and nothing holds it"),
        (None, Some(d)) => format!("idle: assigned to {d}, which has not claimed it"),
        (None, None) if no_eligible => "idle: no node may take it".to_owned(),
        (None, None) => "idle: not assigned to any node".to_owned(),
    }
}
