//! The coordinator's planner: from one snapshot of the cluster (queues, live nodes, the
//! current assignment, pins) to the next assignment and the moves that reach it.
//!
//! The planner is pure: no I/O, no clock, no randomness. The same [`PlanInput`] always
//! gives the same [`Plan`], whatever the order of its `queues` and `nodes` (of duplicate
//! ids or names, the first listed counts). The coordinator calls [`plan`] on every change
//! (level-triggered: a fresh snapshot each time) and writes the difference.
//!
//! # Terms
//! - A queue is *active* when it is not paused; its slices are `0..slices`.
//! - A node is *live* when it is listed in [`PlanInput::nodes`]. An owner that is not is
//!   dead, and its slices are *orphans*.
//! - A node is *eligible* for a queue when it is live, has weight >= 1, is not cordoned and
//!   serves the queue (an empty queue list serves every queue).
//! - Node i's *share* of a queue is `x = S * w_i / W`: S the queue's slices, W the summed
//!   weights of the queue's eligible nodes. Pins water-fill: a node pinned more slices than
//!   its share gets exactly its pins and the others share the rest by weight; slices pinned
//!   to (and held by) an ineligible node are left out of S. A node's *total share* `T` is
//!   the sum of its shares over the active queues it is eligible for.
//! - Each eligible node has a *target* per queue, `floor(x)` or `ceil(x)`, chosen so the
//!   targets sum to S and each node's targets sum to `floor(T)` or `ceil(T)` (such a
//!   rounding always exists; it prefers leaving slices where they are).
//! - A *planned move* takes a slice from a live node, which hands it off (reasons
//!   [`MoveReason::Pinned`], [`MoveReason::NodeIneligible`], [`MoveReason::Balance`]).
//!   Giving an orphan or a never-owned slice an owner is a *takeover*
//!   ([`MoveReason::Orphaned`], [`MoveReason::NewQueueSlice`]).
//!
//! # Contract
//! - Coverage: every slice of every active queue that has an eligible node gets a live
//!   owner. A slice of a queue with no eligible node keeps its live owner if it has one,
//!   else it is listed in [`Plan::uncovered`]. Slices of paused or unknown queues, and
//!   slices beyond a queue's count, get no owner ([`Plan::released`]).
//! - Takeovers always happen, in maintenance and when the safety valve trips too. An
//!   orphan goes to the eligible node furthest below its target (ties: lowest node id).
//!   A slice in [`PlanInput::stalled`] (its live owner did not claim it in time) is taken
//!   over like an orphan ([`MoveReason::Unclaimed`]), but only by a node not avoided: when
//!   every other eligible node is avoided too, it stays with its owner (handing it to
//!   another slow node would only restart the claim clock there, and slow nodes passing
//!   a slice back and forth never claim it).
//! - Nodes in [`PlanInput::avoid`] come last: they get a takeover or a drain only when no
//!   other eligible node exists, and never a balance move (so the balance bounds below
//!   can leave them under their target while they are avoided).
//! - Planned moves are limited: at most [`PlanOptions::churn_budget`] per plan (pins first,
//!   then drains off ineligible nodes, then balance); none at all in maintenance, or when
//!   more than [`PlanOptions::max_vanished_fraction`] of [`PlanInput::previous_nodes`] have
//!   vanished (the safety valve: [`Plan::balance_paused`] and [`Alert::MassVanish`]).
//!   Moves held back are counted in [`Plan::deferred_moves`].
//! - Deaths take two plans. The plan that sees one (an orphan to take over, or a node of
//!   `previous_nodes` gone) makes takeovers only, so a death moves only the dead node's
//!   slices. The next plan makes the hand-offs balance still needs: usually none, but
//!   placing the orphans cannot always keep every survivor within its bounds (when the
//!   shares grow, a survivor's floor may rise past what the orphans can fill: Hamilton
//!   rounding's population paradox), and then a live node must give up a slice.
//! - Pins: a slice pinned to a live node that holds it never moves. A slice pinned to an
//!   eligible node moves there. A pin to a node that is not live, or that is live but not
//!   eligible and does not hold the slice, is ignored until that changes: meanwhile the
//!   slice is planned like any other (an orphan pinned to a dead node is taken over).
//! - Ineligible nodes get nothing: every move goes to a node eligible for its queue.
//! - Balance: when `deferred_moves == 0`, every eligible node holds exactly its target of
//!   each active queue, hence `floor(x) ..= ceil(x)` per queue and `floor(T) ..= ceil(T)` in
//!   total, and ineligible nodes hold only slices pinned to them.
//! - Stickiness: a slice held by a live node moves only when that node is ineligible, the
//!   slice is pinned elsewhere, or the node holds more than its target; each balance move
//!   goes from a node above its target to a node below it. Targets prefer the current
//!   holdings but are re-rounded every plan, so during a rebalance spread over several
//!   plans by the churn budget a slice can (rarely) move twice; the rounds still converge.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::fmt;

use qslice_proto::records::{NodeRecord, QueueConfig};
use qslice_proto::slice::{validate_slice_count, SliceCountError};

mod queue_work;
mod rounding;
#[cfg(test)]
mod tests;

use queue_work::*;
use rounding::*;

/// One slice: (queue name, slice number).
pub type SliceKey = (String, u32);

/// The default [`PlanOptions::churn_budget`]; a starting point, to be tuned per site.
pub const DEFAULT_CHURN_BUDGET: usize = 128;

/// The default [`PlanOptions::max_vanished_fraction`]: losing more than half the nodes at
/// once looks more like a partition or an etcd problem than like dead hosts.
pub const DEFAULT_MAX_VANISHED_FRACTION: f64 = 0.5;

/// A queue as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSpec {
    /// The queue's name (its directory under the spool root).
    pub name: String,
    /// How many slices the queue is cut into: 1 to `MAX_SLICES`.
    pub slices: u32,
    /// A paused queue gets no owner for any slice.
    pub paused: bool,
}

impl QueueSpec {
    /// The planner's view of a queue record.
    pub fn from_config(config: &QueueConfig) -> QueueSpec {
        QueueSpec { name: config.name.clone(), slices: config.slices, paused: config.paused }
    }
}

/// A live node as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// The node id.
    pub id: String,
    /// Relative share of slices; 0 makes the node ineligible for every queue.
    pub weight: u32,
    /// Queues the node may serve; empty means all.
    pub queues: Vec<String>,
    /// A cordoned node gets no slices, and the ones it holds are moved away.
    pub cordoned: bool,
    /// Queues the node gave up (its supervised runners kept crashing): it is ineligible
    /// for them, like a cordon limited to those queues.
    pub refused: Vec<String>,
}

impl NodeSpec {
    /// The planner's view of a node record and its cordon state.
    pub fn from_record(record: &NodeRecord, cordoned: bool) -> NodeSpec {
        NodeSpec { id: record.node_id.clone(), weight: record.weight, queues: record.queues.clone(), cordoned, refused: record.refused_queues.clone() }
    }

    /// Whether the node's queue list allows `queue`.
    pub fn serves(&self, queue: &str) -> bool {
        self.queues.is_empty() || self.queues.iter().any(|q| q == queue)
    }

    /// Whether the node may be given slices of `queue`.
    pub fn eligible_for(&self, queue: &str) -> bool {
        self.weight >= 1 && !self.cordoned && self.serves(queue) && !self.refused.iter().any(|q| q == queue)
    }
}

/// The planner's knobs.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanOptions {
    /// The most planned moves (hand-offs from a live node) one plan may contain.
    pub churn_budget: usize,
    /// Planned moves pause while more than this fraction of the previous nodes is gone.
    pub max_vanished_fraction: f64,
    /// Maintenance mode: no planned moves, only takeovers.
    pub maintenance: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions { churn_budget: DEFAULT_CHURN_BUDGET, max_vanished_fraction: DEFAULT_MAX_VANISHED_FRACTION, maintenance: false }
    }
}

/// Everything one plan is computed from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlanInput {
    /// Every configured queue, paused or not.
    pub queues: Vec<QueueSpec>,
    /// The live nodes; any other node is dead.
    pub nodes: Vec<NodeSpec>,
    /// The assignment now: slice to owner node id.
    pub current: BTreeMap<SliceKey, String>,
    /// Pinned slices: slice to the node it must stay on.
    pub pins: BTreeMap<SliceKey, String>,
    /// The live nodes when the last plan was written: one missing from `nodes` is a death.
    /// Empty for the first plan. The safety valve stays tripped for as long as the caller
    /// keeps passing the set from before the mass vanishing (e.g. until an operator acks).
    pub previous_nodes: BTreeSet<String>,
    /// The knobs.
    pub options: PlanOptions,
    /// Slices whose live owner did not claim them within the claim deadline (the leader's
    /// `claim_deadline`): planned like orphans, so that another node takes them over.
    pub stalled: BTreeSet<SliceKey>,
    /// Live nodes that get new slices (takeovers, drains, balance) only when no other
    /// eligible node can take them: nodes that did not claim in time, or whose lease
    /// missed a keepalive (likely dying). They keep what they hold, and may stay below
    /// their target meanwhile.
    pub avoid: BTreeSet<String>,
}

/// Why a slice gets a new owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MoveReason {
    /// Its owner is dead (takeover).
    Orphaned,
    /// It had no owner: a new or resumed queue, or a grown slice count (takeover).
    NewQueueSlice,
    /// Its live owner did not claim it within the claim deadline (takeover).
    Unclaimed,
    /// Its owner holds more than its target (planned move).
    Balance,
    /// Its owner is cordoned, has weight 0 or no longer serves the queue (planned move).
    NodeIneligible,
    /// It is pinned to another node (planned move).
    Pinned,
}

impl MoveReason {
    /// The reason's name, as the admin API and logs show it.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::Orphaned => "orphaned",
            MoveReason::NewQueueSlice => "new-queue-slice",
            MoveReason::Unclaimed => "unclaimed",
            MoveReason::Balance => "balance",
            MoveReason::NodeIneligible => "node-ineligible",
            MoveReason::Pinned => "pinned",
        }
    }

    /// Whether a live owner hands the slice off (as opposed to a takeover).
    pub fn is_planned(self) -> bool {
        matches!(self, MoveReason::Balance | MoveReason::NodeIneligible | MoveReason::Pinned)
    }
}

impl fmt::Display for MoveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One slice changing owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The queue.
    pub queue: String,
    /// The slice number.
    pub slice: u32,
    /// The owner now (live or dead); `None` for a slice that had none.
    pub from: Option<String>,
    /// The new owner.
    pub to: String,
    /// Why.
    pub reason: MoveReason,
}

/// Something the caller should tell an operator about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Alert {
    /// The safety valve tripped: too many nodes vanished at once, planned moves pause.
    MassVanish {
        /// Previous nodes that are gone.
        vanished: usize,
        /// Previous nodes in all.
        previous: usize,
    },
    /// An active queue has slices nobody can take: no node is eligible for it.
    Uncovered {
        /// The queue.
        queue: String,
        /// How many of its slices have no owner.
        slices: usize,
    },
    /// A queue's slice count is unusable; the queue is planned as if paused.
    InvalidQueue {
        /// The queue.
        queue: String,
        /// What is wrong with its count.
        error: SliceCountError,
    },
}

impl fmt::Display for Alert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Alert::MassVanish { vanished, previous } => write!(f, "{vanished} of {previous} nodes vanished at once: orphans are taken over, planned moves pause"),
            Alert::Uncovered { queue, slices } => {
                write!(f, "queue {queue}: {slices} slices have no owner, no node is eligible")
            }
            Alert::InvalidQueue { queue, error } => write!(f, "queue {queue} is not planned: {error}"),
        }
    }
}

/// The planner's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The new assignment: slice to owner node id (always a live node).
    pub assignment: BTreeMap<SliceKey, String>,
    /// Every slice whose owner changes, sorted by slice.
    pub moves: Vec<Move>,
    /// Slices of active queues left without an owner (no eligible node), sorted.
    pub uncovered: Vec<SliceKey>,
    /// Slices in the current assignment that are no longer planned (paused, unknown or
    /// invalid queue, or beyond the slice count), sorted.
    pub released: Vec<SliceKey>,
    /// Planned moves are paused (maintenance, or the safety valve tripped).
    pub balance_paused: bool,
    /// Planned moves wanted but held back: by the pause, by the churn budget, or because
    /// this plan handles a death and only takes over.
    pub deferred_moves: usize,
    /// What to tell an operator.
    pub alerts: Vec<Alert>,
}

/// Computes the next assignment. See the module documentation for the contract.
pub fn plan(input: &PlanInput) -> Plan {
    let mut out = Plan::default();

    let mut nodes: Vec<&NodeSpec> = input.nodes.iter().collect();
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    nodes.dedup_by(|later, first| later.id == first.id);
    let node_index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id.as_str(), i)).collect();

    let previous = input.previous_nodes.len();
    let vanished = input.previous_nodes.iter().filter(|id| !node_index.contains_key(id.as_str())).count();
    let valve = previous > 0 && vanished as f64 > input.options.max_vanished_fraction * previous as f64;
    if valve {
        out.alerts.push(Alert::MassVanish { vanished, previous });
    }
    out.balance_paused = valve || input.options.maintenance;

    let mut specs: Vec<&QueueSpec> = input.queues.iter().collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    specs.dedup_by(|later, first| later.name == first.name);
    let mut queues: Vec<QueueWork<'_>> = Vec::new();
    for spec in specs {
        if spec.paused {
            continue;
        }
        match validate_slice_count(spec.slices, false) {
            Ok(()) => queues.push(QueueWork::new(queues.len(), &spec.name, spec.slices, nodes.len())),
            Err(error) => out.alerts.push(Alert::InvalidQueue { queue: spec.name.clone(), error }),
        }
    }
    let queue_index: HashMap<&str, usize> = queues.iter().enumerate().map(|(i, q)| (q.name, i)).collect();

    add_eligible_entries(&mut queues, &nodes, &queue_index);
    place_current(&mut queues, input, &queue_index, &node_index, &mut out.released);

    for q in queues.iter_mut() {
        q.resolve_pins_and_share();
        for (e, entry) in q.entries.iter().enumerate() {
            if input.avoid.contains(&nodes[entry.node].id) {
                q.avoided.push(e);
            }
        }
    }
    choose_targets(&mut queues, nodes.len());

    // A plan that handles a death only takes over; hand-offs wait for the next plan.
    let death = vanished > 0 || queues.iter().any(QueueWork::has_orphans);
    let mut gate = Gate { paused: out.balance_paused || death, budget: input.options.churn_budget, used: 0, deferred: 0 };
    let mut moves: Vec<RawMove<'_>> = Vec::new();
    for q in queues.iter_mut() {
        q.move_pinned(&mut gate, &mut moves);
    }
    for q in queues.iter_mut() {
        q.take_over_free(&mut moves, &mut out.uncovered);
    }
    for q in queues.iter_mut() {
        q.drain_ineligible(&mut gate, &mut moves);
    }
    for q in queues.iter_mut() {
        q.balance(&mut gate, &mut moves);
    }
    out.deferred_moves = gate.deferred;

    for q in &queues {
        let missing = q.new_owner.iter().filter(|o| o.is_none()).count();
        if missing > 0 {
            out.alerts.push(Alert::Uncovered { queue: q.name.to_owned(), slices: missing });
        }
    }

    out.moves = moves
        .into_iter()
        .map(|m| Move { queue: queues[m.queue].name.to_owned(), slice: m.slice, from: m.from.map(str::to_owned), to: nodes[m.to].id.clone(), reason: m.reason })
        .collect();
    out.moves.sort_by(|a, b| (&a.queue, a.slice).cmp(&(&b.queue, b.slice)));
    out.assignment = queues
        .iter()
        .flat_map(|q| {
            let nodes = &nodes;
            q.new_owner.iter().enumerate().filter_map(move |(s, o)| o.map(|ni| ((q.name.to_owned(), s as u32), nodes[ni].id.clone())))
        })
        .collect();
    out
}

/// Each queue's eligible nodes (weight above zero, not cordoned, serving the queue and not
/// refusing it), pushed in node-id order so that each queue's list is sorted.
fn add_eligible_entries(queues: &mut [QueueWork<'_>], nodes: &[&NodeSpec], queue_index: &HashMap<&str, usize>) {
    for (ni, node) in nodes.iter().enumerate() {
        if node.weight == 0 || node.cordoned {
            continue;
        }
        if node.queues.is_empty() {
            for q in queues.iter_mut().filter(|q| !node.refused.iter().any(|r| r == q.name)) {
                q.add_entry(ni, node.weight);
            }
        } else {
            let mut served: Vec<usize> = node.queues.iter().filter(|q| !node.refused.contains(q)).filter_map(|q| queue_index.get(q.as_str()).copied()).collect();
            served.sort_unstable();
            served.dedup();
            for qi in served {
                queues[qi].add_entry(ni, node.weight);
            }
        }
    }
}

/// The current owners (live or not; a stalled slice's owner apart) and the pins, in each
/// queue's work; slices of queues not planned, or beyond their count, go to `released`.
fn place_current<'a>(queues: &mut [QueueWork<'a>], input: &'a PlanInput, queue_index: &HashMap<&str, usize>, node_index: &HashMap<&str, usize>, released: &mut Vec<SliceKey>) {
    for ((queue, slice), owner) in &input.current {
        match queue_index.get(queue.as_str()) {
            Some(&qi) if *slice < queues[qi].slices => {
                let q = &mut queues[qi];
                q.orig[*slice as usize] = Some(owner.as_str());
                // A stalled slice's owner is planned as gone, for this slice only.
                let live = node_index.get(owner.as_str()).copied();
                if input.stalled.contains(&(queue.clone(), *slice)) {
                    q.stalled[*slice as usize] = live;
                } else {
                    q.owner[*slice as usize] = live;
                }
            }
            _ => released.push((queue.clone(), *slice)),
        }
    }
    for ((queue, slice), pin) in &input.pins {
        if let (Some(&qi), Some(&ni)) = (queue_index.get(queue.as_str()), node_index.get(pin.as_str())) {
            if *slice < queues[qi].slices {
                queues[qi].pin_to[*slice as usize] = Some(ni);
            }
        }
    }
}
