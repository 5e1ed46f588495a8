//! A snapshot of the cluster as read from etcd, turned into the planner's input, and the
//! planner's assignment turned into the etcd writes that reach it. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};

use qslice_proto::keys::{Key, Keys};
use qslice_proto::records::{
    Assignment, Claim, CoordinatorRecord, Cordon, Maintenance, MoveRequest, NodeRecord, Pin, QueueConfig, Record, RebalanceRequest, SliceFigures,
    SliceSet, SliceStatus, RECORD_VERSION,
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
        self.claims
            .iter()
            .filter(|((queue, _), c)| self.queues.get(queue).is_some_and(|q| q.slices != c.slices_total))
            .map(|((queue, _), _)| queue.clone())
            .collect()
    }

    /// The planner's input; `previous_nodes` is the node set of the last round.
    pub fn plan_input(&self, previous_nodes: BTreeSet<String>, mut options: PlanOptions) -> PlanInput {
        options.maintenance = self.maintenance;
        PlanInput {
            queues: self.queues.values().map(QueueSpec::from_config).collect(),
            nodes: self.nodes.values().map(|n| NodeSpec::from_record(n, self.cordons.contains(&n.node_id))).collect(),
            current: self.current_assignment(),
            pins: self.pins.clone(),
            previous_nodes,
            options,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(value: Vec<u8>) -> Stored {
        Stored { value, create_revision: 7, lease: 0 }
    }

    fn queue(name: &str, slices: u32) -> QueueConfig {
        QueueConfig { v: 1, name: name.into(), slices, paused: false, mailman3: false }
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
            vec![
                Write::Put(keys.assignment("n2", "in"), a(4, &[2, 3]).encode()),
                Write::Delete(keys.assignment("gone", "in")),
            ],
            "n1 is unchanged; n2 rewritten; the dead node's key deleted"
        );
    }
}
