//! A snapshot of the cluster as read from etcd, turned into the planner's input
//! ([`planner_input`], the one builder the leader and the rebalance dry run share), and
//! the planner's assignment turned into the etcd writes that reach it. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};

use qslice_proto::keys::{Key, Keys};
use qslice_proto::records::{
    Assignment, Claim, CoordinatorRecord, Cordon, Hold, Maintenance, MoveRequest, NodeRecord, Pin, QueueConfig, RebalanceRequest, Record, SliceFigures, SliceSet, SliceStatus,
    RECORD_VERSION,
};

use crate::planner::{NodeSpec, PlanInput, PlanOptions, QueueSpec, SliceKey};

/// One stored key: its value and create revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The value bytes.
    pub value: Vec<u8>,
    /// The key's create revision (a claim's epoch).
    pub create_revision: i64,
    /// The lease the key is attached to (0 for none).
    pub lease: i64,
}

/// The claim on one slice, as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimView {
    /// The holder.
    pub node: String,
    /// The epoch (create revision of the claim key).
    pub epoch: i64,
    /// The lease the claim hangs on (the holder's).
    pub lease: i64,
    /// The slice count the claim was made under.
    pub slices_total: u32,
}

/// Everything the reconciler needs, decoded. Unreadable values are skipped and listed in
/// `problems` (a garbage value in etcd is reported, never a crash).
#[derive(Debug, Default)]
pub struct ClusterView {
    /// Queue configs by name.
    pub queues: BTreeMap<String, QueueConfig>,
    /// Live nodes by id.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Cordoned node ids.
    pub cordons: BTreeSet<String>,
    /// Pinned slices.
    pub pins: BTreeMap<SliceKey, String>,
    /// Whether maintenance mode is on.
    pub maintenance: bool,
    /// The stored assignment: (node, queue) -> record.
    pub assignments: BTreeMap<(String, String), Assignment>,
    /// Claims by slice.
    pub claims: BTreeMap<SliceKey, ClaimView>,
    /// Slices held back after the leader revoked their holder's lease: slice -> that
    /// node ("?" if the hold's value is unreadable; the hold holds all the same).
    pub holds: BTreeMap<SliceKey, String>,
    /// Requested moves: slice -> target node.
    pub moves: BTreeMap<SliceKey, String>,
    /// Whether a one-shot rebalance was requested.
    pub rebalance_requested: bool,
    /// Live coordinator instances by id.
    pub coordinators: BTreeMap<String, CoordinatorRecord>,
    /// Published slice figures by (node, queue).
    pub status: BTreeMap<(String, String), SliceStatus>,
    /// Keys whose values could not be read, with why.
    pub problems: Vec<String>,
    /// The etcd revision the snapshot is at least as new as: the highest mod revision of
    /// any change the cache applied (0 for a view not read from etcd). Every claim in
    /// `claims` was written at or before it.
    pub revision: i64,
}

impl ClusterView {
    /// Decodes every key of the cluster.
    pub fn from_store<'a>(keys: &Keys, store: impl IntoIterator<Item = (&'a Vec<u8>, &'a Stored)>) -> ClusterView {
        let mut view = ClusterView::default();
        for (key, stored) in store {
            let Some(parsed) = keys.parse(key) else { continue };
            let mut problem = |what: String| view_problem(&mut view.problems, key, what);
            match parsed {
                Key::Queue { queue } => match QueueConfig::decode(&stored.value) {
                    Ok(q) if q.name == queue => {
                        view.queues.insert(queue, q);
                    }
                    Ok(q) => problem(format!("names queue {:?}", q.name)),
                    Err(e) => problem(e.to_string()),
                },
                Key::Node { node } => match NodeRecord::decode(&stored.value) {
                    Ok(n) if n.node_id == node => {
                        view.nodes.insert(node, n);
                    }
                    Ok(n) => problem(format!("names node {:?}", n.node_id)),
                    Err(e) => problem(e.to_string()),
                },
                Key::Cordon { node } => match Cordon::decode(&stored.value) {
                    Ok(_) => {
                        view.cordons.insert(node);
                    }
                    Err(e) => problem(e.to_string()),
                },
                Key::Pin { queue, slice } => match Pin::decode(&stored.value) {
                    Ok(p) => {
                        view.pins.insert((queue, slice), p.node_id);
                    }
                    Err(e) => problem(e.to_string()),
                },
                Key::Maintenance => match Maintenance::decode(&stored.value) {
                    Ok(m) => view.maintenance = m.on,
                    Err(e) => problem(e.to_string()),
                },
                Key::Assignment { node, queue } => match Assignment::decode(&stored.value) {
                    Ok(a) => {
                        view.assignments.insert((node, queue), a);
                    }
                    Err(e) => problem(e.to_string()),
                },
                Key::Claim { queue, slice } => match Claim::decode(&stored.value) {
                    Ok(c) => {
                        let claim = ClaimView { node: c.node_id, epoch: stored.create_revision, lease: stored.lease, slices_total: c.slices_total };
                        view.claims.insert((queue, slice), claim);
                    }
                    Err(e) => problem(e.to_string()),
                },
                Key::Hold { queue, slice } => {
                    let node = match Hold::decode(&stored.value) {
                        Ok(h) => h.node_id,
                        Err(e) => {
                            problem(e.to_string());
                            "?".into()
                        }
                    };
                    view.holds.insert((queue, slice), node);
                }
                Key::Move { queue, slice } => match MoveRequest::decode(&stored.value) {
                    Ok(m) => {
                        view.moves.insert((queue, slice), m.node_id);
                    }
                    Err(e) => problem(e.to_string()),
                },
                Key::Rebalance => match RebalanceRequest::decode(&stored.value) {
                    Ok(_) => view.rebalance_requested = true,
                    Err(e) => problem(e.to_string()),
                },
                Key::Coordinator { id } => match CoordinatorRecord::decode(&stored.value) {
                    Ok(c) => {
                        view.coordinators.insert(id, c);
                    }
                    Err(e) => problem(e.to_string()),
                },
                Key::Status { node, queue } => match SliceStatus::decode(&stored.value) {
                    Ok(st) => {
                        view.status.insert((node, queue), st);
                    }
                    Err(e) => problem(e.to_string()),
                },
                Key::Election => {}
            }
        }
        view
    }

    /// The stored assignment as slice -> owner, for queues that exist, under their
    /// current slice count.
    pub fn current_assignment(&self) -> BTreeMap<SliceKey, String> {
        let mut out = BTreeMap::new();
        for ((node, queue), a) in &self.assignments {
            if self.queues.get(queue).is_some_and(|q| q.slices == a.slices_total) {
                for s in a.slices.iter() {
                    out.insert((queue.clone(), s), node.clone());
                }
            }
        }
        out
    }

    /// The freshest published figures of each slice of a known queue (whichever node
    /// listed it last), with when they were listed (ms since the Unix epoch). Figures made
    /// under another slice count than the queue's are left out.
    pub fn slice_figures(&self) -> BTreeMap<SliceKey, (i64, SliceFigures)> {
        let mut out: BTreeMap<SliceKey, (i64, SliceFigures)> = BTreeMap::new();
        for ((_, queue), st) in &self.status {
            if self.queues.get(queue).is_none_or(|q| q.slices != st.slices_total) {
                continue;
            }
            for f in &st.slices {
                let k = (queue.clone(), f.slice);
                if out.get(&k).is_none_or(|(listed, _)| st.listed_unix_ms > *listed) {
                    out.insert(k, (st.listed_unix_ms, f.clone()));
                }
            }
        }
        out
    }

    /// Queues with a claim made under a slice count other than the queue's (a reslice
    /// in progress).
    pub fn reslicing_queues(&self) -> BTreeSet<String> {
        self.claims.iter().filter(|((queue, _), c)| self.queues.get(queue).is_some_and(|q| q.slices != c.slices_total)).map(|((queue, _), _)| queue.clone()).collect()
    }
}

/// A requested move the planner no longer needs to hear of: its request key can go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettledMove {
    /// The slice the request was for.
    pub slice: SliceKey,
    /// The node it was to move to.
    pub target: String,
    /// Why the request is over.
    pub why: MoveSettled,
}

/// Why a move request no longer steers the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoveSettled {
    /// The target holds the slice's claim: the move is done.
    Arrived,
    /// The target is gone or cordoned: the request is dropped.
    TargetIneligible,
    /// The queue is gone, or no longer has that slice.
    SliceGone,
}

/// The planner's input built from one snapshot, and the move requests it settled.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannerInput {
    /// What [`crate::planner::plan`] plans from.
    pub input: PlanInput,
    /// Move requests that are over, in slice order; the leader deletes their keys.
    pub settled_moves: Vec<SettledMove>,
}

/// The planner's input from a snapshot: the one function the leader's reconcile and the
/// admin API's rebalance dry run both plan from, so the two cannot disagree about the
/// same snapshot. Pure.
///
/// From the snapshot: queues (a queue being resliced is planned as paused), live nodes
/// (cordoned ones marked), the stored assignment, pins (a pending move request is planned
/// as a pin to its target until the target holds the claim), and maintenance mode, which
/// replaces `options.maintenance`. From the caller: `previous_nodes` (the node set of the
/// last round, for the safety valve) and the rest of `options`.
pub fn planner_input(view: &ClusterView, previous_nodes: BTreeSet<String>, mut options: PlanOptions) -> PlannerInput {
    options.maintenance = view.maintenance;
    // Two-phase reslice: while any claim made under another slice count remains, the
    // queue is planned as paused, so every old owner releases before anyone claims under
    // the new slicing.
    let reslicing = view.reslicing_queues();
    let queues = view.queues.values().map(|q| QueueSpec { paused: q.paused || reslicing.contains(&q.name), ..QueueSpec::from_config(q) }).collect();
    let mut pins = view.pins.clone();
    let mut settled_moves = Vec::new();
    for (slice, target) in &view.moves {
        let eligible = view.nodes.contains_key(target) && !view.cordons.contains(target);
        let arrived = view.claims.get(slice).is_some_and(|c| &c.node == target);
        let slice_gone = view.queues.get(&slice.0).is_none_or(|q| slice.1 >= q.slices);
        let why = if !eligible {
            Some(MoveSettled::TargetIneligible)
        } else if arrived {
            Some(MoveSettled::Arrived)
        } else if slice_gone {
            Some(MoveSettled::SliceGone)
        } else {
            None
        };
        match why {
            Some(why) => settled_moves.push(SettledMove { slice: slice.clone(), target: target.clone(), why }),
            None => {
                pins.insert(slice.clone(), target.clone());
            }
        }
    }
    let input = PlanInput {
        queues,
        nodes: view.nodes.values().map(|n| NodeSpec::from_record(n, view.cordons.contains(&n.node_id))).collect(),
        current: view.current_assignment(),
        pins,
        previous_nodes,
        options,
        // Only the leader knows which owners stall (it adds them itself); a dry run shows
        // the plan without them.
        stalled: BTreeSet::new(),
        avoid: BTreeSet::new(),
    };
    PlannerInput { input, settled_moves }
}

fn view_problem(problems: &mut Vec<String>, key: &[u8], what: String) {
    problems.push(format!("{}: {what}", String::from_utf8_lossy(key)));
}

/// One etcd write of the assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Store this value under this key.
    Put(String, Vec<u8>),
    /// Delete this key.
    Delete(String),
}

/// The writes that turn the stored assignment into `desired`: one key per (node, queue),
/// written only where it differs; keys of nodes or queues with no slices are deleted.
pub fn assignment_writes(keys: &Keys, view: &ClusterView, desired: &BTreeMap<SliceKey, String>) -> Vec<Write> {
    let mut want: BTreeMap<(String, String), SliceSet> = BTreeMap::new();
    for ((queue, slice), node) in desired {
        want.entry((node.clone(), queue.clone())).or_default().insert(*slice);
    }
    let mut writes = Vec::new();
    for ((node, queue), slices) in &want {
        let Some(q) = view.queues.get(queue) else { continue };
        let record = Assignment { v: RECORD_VERSION, queue: queue.clone(), slices_total: q.slices, slices: slices.clone() };
        if view.assignments.get(&(node.clone(), queue.clone())) != Some(&record) {
            writes.push(Write::Put(keys.assignment(node, queue), record.encode()));
        }
    }
    for (node, queue) in view.assignments.keys() {
        if !want.contains_key(&(node.clone(), queue.clone())) {
            writes.push(Write::Delete(keys.assignment(node, queue)));
        }
    }
    writes
}

/// A live node's record for tests: weight 1, every queue, lease `lease`.
#[cfg(test)]
pub(crate) fn test_node(id: &str, lease: i64) -> qslice_proto::records::NodeRecord {
    qslice_proto::records::NodeRecord {
        v: qslice_proto::records::RECORD_VERSION,
        node_id: id.into(),
        host: id.into(),
        pid: 1,
        incarnation: uuid::Uuid::nil(),
        weight: 1,
        queues: Vec::new(),
        version: "0".into(),
        started_unix_ms: 0,
        metrics_addr: None,
        lease_id: lease,
        refused_queues: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(value: Vec<u8>) -> Stored {
        Stored { value, create_revision: 7, lease: 0 }
    }

    fn queue(name: &str, slices: u32) -> QueueConfig {
        QueueConfig { v: 1, name: name.into(), slices, paused: false, mailman3: false }
    }

    fn claim(node: &str, slices_total: u32) -> ClaimView {
        ClaimView { node: node.into(), epoch: 7, lease: 1, slices_total }
    }

    /// A snapshot mid-way through everything the input must show: queue "in" (4 slices)
    /// resliced from 2 with one old claim left, queue "out" (4 slices) with a move of
    /// out/1 to n2 pending, and move requests that are over (arrived, target cordoned,
    /// target gone, slice gone). n1, n2 and n3 live; n3 cordoned; n1 owns everything.
    fn snapshot() -> ClusterView {
        let mut view = ClusterView::default();
        for (name, slices) in [("in", 4), ("out", 4)] {
            view.queues.insert(name.into(), queue(name, slices));
            let a = Assignment { v: 1, queue: name.into(), slices_total: slices, slices: (0..slices).collect() };
            view.assignments.insert(("n1".into(), name.into()), a);
        }
        for id in ["n1", "n2", "n3"] {
            view.nodes.insert(id.into(), test_node(id, 1));
        }
        view.cordons.insert("n3".into());
        view.claims.insert(("in".into(), 0), claim("n1", 2));
        view.claims.insert(("out".into(), 0), claim("n2", 4));
        view.claims.insert(("out".into(), 1), claim("n1", 4));
        view.pins.insert(("out".into(), 3), "n1".into());
        view.moves.insert(("out".into(), 0), "n2".into());
        view.moves.insert(("out".into(), 1), "n2".into());
        view.moves.insert(("out".into(), 2), "n3".into());
        view.moves.insert(("out".into(), 3), "gone".into());
        view.moves.insert(("out".into(), 9), "n2".into());
        view
    }

    fn key(queue: &str, slice: u32) -> SliceKey {
        (queue.to_owned(), slice)
    }

    #[test]
    fn a_queue_being_resliced_is_planned_as_paused_until_its_old_claims_are_gone() {
        let mut view = snapshot();
        let paused = |view: &ClusterView| -> Vec<(String, bool)> {
            planner_input(view, BTreeSet::new(), PlanOptions::default()).input.queues.into_iter().map(|q| (q.name, q.paused)).collect()
        };
        assert_eq!(paused(&view), vec![("in".into(), true), ("out".into(), false)], "a claim under 2 slices remains on in/0");
        view.claims.remove(&key("in", 0));
        assert_eq!(paused(&view), vec![("in".into(), false), ("out".into(), false)], "no old claim: the queue is planned again");
        if let Some(q) = view.queues.get_mut("out") {
            q.paused = true;
        }
        assert_eq!(paused(&view), vec![("in".into(), false), ("out".into(), true)], "an operator's pause stays");
    }

    #[test]
    fn a_pending_move_request_is_planned_as_a_pin_until_its_target_holds_the_claim() {
        let view = snapshot();
        let built = planner_input(&view, BTreeSet::new(), PlanOptions::default());
        let mut pins = BTreeMap::new();
        pins.insert(key("out", 1), "n2".to_owned());
        pins.insert(key("out", 3), "n1".to_owned());
        assert_eq!(built.input.pins, pins, "the pending move of out/1 is a pin; the operator's pin of out/3 stays");
        let settled: Vec<(SliceKey, MoveSettled)> = built.settled_moves.iter().map(|m| (m.slice.clone(), m.why)).collect();
        assert_eq!(
            settled,
            vec![
                (key("out", 0), MoveSettled::Arrived),
                (key("out", 2), MoveSettled::TargetIneligible),
                (key("out", 3), MoveSettled::TargetIneligible),
                (key("out", 9), MoveSettled::SliceGone),
            ],
            "every other request is over, in slice order"
        );
        let planned = crate::planner::plan(&built.input);
        assert_eq!(planned.assignment.get(&key("out", 1)).map(String::as_str), Some("n2"), "the plan moves out/1 to its target");
    }

    #[test]
    fn dry_run_plans_from_the_leaders_input_for_the_same_snapshot() {
        let mut view = snapshot();
        // A requested rebalance is what a dry run previews: the leader's round then has no
        // churn budget, like the dry run; with its valve off (previous nodes = live) the
        // two inputs are the same value.
        view.rebalance_requested = true;
        let live: BTreeSet<String> = view.nodes.keys().cloned().collect();
        let leader = planner_input(&view, live.clone(), crate::leader::round_options(&view, 3, 1.0)).input;
        let dry_run = crate::admin::dry_run_input(&view);
        assert_eq!(dry_run, leader);
        assert!(dry_run.queues.iter().any(|q| q.name == "in" && q.paused), "the dry run sees the reslice pause");
        assert_eq!(dry_run.pins.get(&key("out", 1)).map(String::as_str), Some("n2"), "the dry run sees the pending move");
        // In maintenance mode the dry run shows what would move once it is off; nothing
        // else differs.
        view.maintenance = true;
        let leader = planner_input(&view, live, crate::leader::round_options(&view, 3, 1.0)).input;
        let dry_run = crate::admin::dry_run_input(&view);
        assert!(leader.options.maintenance && !dry_run.options.maintenance);
        assert_eq!(dry_run, PlanInput { options: PlanOptions { maintenance: false, ..leader.options.clone() }, ..leader });
    }

    #[test]
    fn garbage_values_are_reported_and_skipped() {
        let keys = Keys::new("c").expect("keys");
        let mut store = BTreeMap::new();
        store.insert(keys.queue("in").into_bytes(), stored(queue("in", 4).encode()));
        store.insert(keys.queue("bad").into_bytes(), stored(b"{not json".to_vec()));
        store.insert(keys.queue("other").into_bytes(), stored(queue("in", 4).encode()));
        let view = ClusterView::from_store(&keys, &store);
        assert_eq!(view.queues.keys().collect::<Vec<_>>(), vec!["in"]);
        assert_eq!(view.problems.len(), 2, "{:?}", view.problems);
        assert!(view.problems.iter().any(|p| p.contains("/queues/bad") && p.contains("malformed")));
    }

    #[test]
    fn stale_slicings_are_not_current_and_writes_are_only_the_difference() {
        let keys = Keys::new("c").expect("keys");
        let mut store = BTreeMap::new();
        store.insert(keys.queue("in").into_bytes(), stored(queue("in", 4).encode()));
        let a = |total: u32, slices: &[u32]| Assignment { v: 1, queue: "in".into(), slices_total: total, slices: slices.iter().copied().collect() };
        store.insert(keys.assignment("n1", "in").into_bytes(), stored(a(4, &[0, 1]).encode()));
        store.insert(keys.assignment("n2", "in").into_bytes(), stored(a(2, &[1]).encode()));
        store.insert(keys.assignment("gone", "in").into_bytes(), stored(a(4, &[2, 3]).encode()));
        let view = ClusterView::from_store(&keys, &store);
        let current = view.current_assignment();
        assert_eq!(current.len(), 4, "n2's record is for 2 slices, not the queue's 4");
        let mut desired = BTreeMap::new();
        desired.insert(("in".to_owned(), 0), "n1".to_owned());
        desired.insert(("in".to_owned(), 1), "n1".to_owned());
        desired.insert(("in".to_owned(), 2), "n2".to_owned());
        desired.insert(("in".to_owned(), 3), "n2".to_owned());
        let writes = assignment_writes(&keys, &view, &desired);
        assert_eq!(
            writes,
            vec![Write::Put(keys.assignment("n2", "in"), a(4, &[2, 3]).encode()), Write::Delete(keys.assignment("gone", "in")),],
            "n1 is unchanged; n2 rewritten; the dead node's key deleted"
        );
    }
}
