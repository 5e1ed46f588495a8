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

    // Eligible entries, pushed in node-id order so each queue's list is sorted.
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
            _ => out.released.push((queue.clone(), *slice)),
        }
    }
    for ((queue, slice), pin) in &input.pins {
        if let (Some(&qi), Some(&ni)) = (queue_index.get(queue.as_str()), node_index.get(pin.as_str())) {
            if *slice < queues[qi].slices {
                queues[qi].pin_to[*slice as usize] = Some(ni);
            }
        }
    }

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

/// "No entry": a node that is not eligible for a queue.
const NO_ENTRY: u32 = u32::MAX;

/// One eligible node of one queue.
#[derive(Clone, Debug)]
struct Entry {
    /// The node's index (nodes sorted by id).
    node: usize,
    /// The node's weight.
    weight: u128,
    /// Slices of this queue whose pin will hold on this node.
    pinned: u64,
    /// Slices the node holds now and may keep (not pinned elsewhere).
    keep: u64,
    /// Slices the node holds while moves are being planned.
    held: i64,
    /// `floor(x)`.
    lo: u64,
    /// The fractional part of `x`, as `rem / den`.
    rem: u128,
    /// See `rem`.
    den: u128,
    /// The node's target is `ceil(x)` (it got one of the queue's rounding slots).
    slot: bool,
}

impl Entry {
    fn target(&self) -> i64 {
        (self.lo + u64::from(self.slot)) as i64
    }

    /// The node would lose a slice it holds if it did not get a rounding slot.
    fn wants_slot(&self) -> bool {
        self.rem > 0 && self.keep > self.lo
    }
}

/// One active queue while it is planned.
struct QueueWork<'a> {
    /// Position in the plan's queue list (queues sorted by name).
    index: usize,
    name: &'a str,
    slices: u32,
    /// The owner in the current assignment, live or dead.
    orig: Vec<Option<&'a str>>,
    /// The current owner's node index, when it is live.
    owner: Vec<Option<usize>>,
    /// The live node each slice is pinned to, before deciding whether the pin holds.
    pin_to: Vec<Option<usize>>,
    /// The node each slice's pin holds it on.
    pinned: Vec<Option<usize>>,
    /// The planned owner.
    new_owner: Vec<Option<usize>>,
    /// Eligible nodes, by node index.
    entries: Vec<Entry>,
    /// Node index to entry index, or [`NO_ENTRY`].
    entry_of: Vec<u32>,
    /// How many entries get `ceil(x)` rather than `floor(x)`.
    slots: usize,
    /// The live owner (node index) of each slice it did not claim in time ([`PlanInput::stalled`]).
    stalled: Vec<Option<usize>>,
    /// Entries of nodes in [`PlanInput::avoid`], sorted.
    avoided: Vec<usize>,
}

/// A move before names are filled in.
struct RawMove<'a> {
    queue: usize,
    slice: u32,
    from: Option<&'a str>,
    to: usize,
    reason: MoveReason,
}

/// Lets planned moves through while the plan is not paused and the budget lasts.
struct Gate {
    paused: bool,
    budget: usize,
    used: usize,
    deferred: usize,
}

impl Gate {
    fn allow(&mut self) -> bool {
        if self.paused || self.used >= self.budget {
            self.deferred += 1;
            false
        } else {
            self.used += 1;
            true
        }
    }
}

impl<'a> QueueWork<'a> {
    fn new(index: usize, name: &'a str, slices: u32, node_count: usize) -> Self {
        let n = slices as usize;
        QueueWork {
            index,
            name,
            slices,
            orig: vec![None; n],
            owner: vec![None; n],
            pin_to: vec![None; n],
            pinned: vec![None; n],
            new_owner: vec![None; n],
            entries: Vec::new(),
            entry_of: vec![NO_ENTRY; node_count],
            slots: 0,
            stalled: vec![None; n],
            avoided: Vec::new(),
        }
    }

    /// Whether a slice's owner is dead and some node can take it over.
    fn has_orphans(&self) -> bool {
        !self.entries.is_empty() && self.orig.iter().zip(&self.owner).any(|(o, live)| o.is_some() && live.is_none())
    }

    fn add_entry(&mut self, node: usize, weight: u32) {
        self.entry_of[node] = self.entries.len() as u32;
        self.entries.push(Entry { node, weight: u128::from(weight), pinned: 0, keep: 0, held: 0, lo: 0, rem: 0, den: 1, slot: false });
    }

    fn entry(&self, node: usize) -> Option<usize> {
        match self.entry_of[node] {
            NO_ENTRY => None,
            e => Some(e as usize),
        }
    }

    /// Decides which pins hold, counts what each node holds and may keep, and computes
    /// each eligible node's share (water-filled around pins).
    fn resolve_pins_and_share(&mut self) {
        let mut fixed_on_ineligible = 0u64;
        for s in 0..self.slices as usize {
            let Some(p) = self.pin_to[s] else { continue };
            match self.entry(p) {
                Some(e) => {
                    self.pinned[s] = Some(p);
                    self.entries[e].pinned += 1;
                }
                None if self.owner[s] == Some(p) => {
                    self.pinned[s] = Some(p);
                    fixed_on_ineligible += 1;
                }
                None => {}
            }
        }
        for s in 0..self.slices as usize {
            let Some(o) = self.owner[s] else { continue };
            if let Some(e) = self.entry(o) {
                self.entries[e].held += 1;
                if self.pinned[s].is_none_or(|p| p == o) {
                    self.entries[e].keep += 1;
                }
            }
        }
        self.new_owner.clone_from(&self.owner);
        if self.entries.is_empty() {
            return;
        }

        let total = u128::from(self.slices) - u128::from(fixed_on_ineligible);
        // Water-filling: a node pinned more than its share gets exactly its pins; taking it
        // out only lowers everyone else's share, so all such nodes can be fixed per round.
        let mut fixed = vec![false; self.entries.len()];
        let (mut rest, mut weight);
        loop {
            rest = total;
            weight = 0u128;
            for (e, &f) in self.entries.iter().zip(&fixed) {
                if f {
                    rest -= u128::from(e.pinned);
                } else {
                    weight += e.weight;
                }
            }
            let mut changed = false;
            for (e, f) in self.entries.iter().zip(fixed.iter_mut()) {
                if !*f && u128::from(e.pinned) * weight > rest * e.weight {
                    *f = true;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let mut floors = 0u128;
        for (e, &f) in self.entries.iter_mut().zip(&fixed) {
            if f {
                (e.lo, e.rem, e.den) = (e.pinned, 0, 1);
            } else {
                let x = rest * e.weight;
                (e.lo, e.rem, e.den) = ((x / weight) as u64, x % weight, weight);
            }
            floors += u128::from(e.lo);
        }
        self.slots = (total - floors) as usize;
    }

    /// Heap of entries by how far they are below target; ties go to the lowest node id.
    /// Avoided nodes come after every other node, whatever their deficit.
    fn deficit_heap(&self) -> BinaryHeap<(bool, i64, Reverse<usize>)> {
        self.entries.iter().enumerate().map(|(i, e)| (self.avoided.binary_search(&i).is_err(), e.target() - e.held, Reverse(i))).collect()
    }

    fn give(&mut self, s: usize, to_entry: usize) {
        if let Some(from) = self.new_owner[s].and_then(|o| self.entry(o)) {
            self.entries[from].held -= 1;
        }
        self.entries[to_entry].held += 1;
        self.new_owner[s] = Some(self.entries[to_entry].node);
    }

    fn push_move(&self, s: usize, to_entry: usize, reason: MoveReason, moves: &mut Vec<RawMove<'a>>) {
        moves.push(RawMove { queue: self.index, slice: s as u32, from: self.orig[s], to: self.entries[to_entry].node, reason });
    }

    /// Brings pinned slices to their pin node.
    fn move_pinned(&mut self, gate: &mut Gate, moves: &mut Vec<RawMove<'a>>) {
        for s in 0..self.slices as usize {
            let Some(p) = self.pinned[s] else { continue };
            if self.owner[s] == Some(p) {
                continue;
            }
            let Some(e) = self.entry(p) else { continue };
            let reason = match (self.owner[s], self.orig[s]) {
                (Some(_), _) => {
                    if !gate.allow() {
                        continue;
                    }
                    MoveReason::Pinned
                }
                (None, Some(_)) => MoveReason::Orphaned,
                (None, None) => MoveReason::NewQueueSlice,
            };
            self.give(s, e);
            self.push_move(s, e, reason, moves);
        }
    }

    /// Gives every slice without a live owner to the node furthest below its target.
    fn take_over_free(&mut self, moves: &mut Vec<RawMove<'a>>, uncovered: &mut Vec<SliceKey>) {
        let mut heap = self.deficit_heap();
        for s in 0..self.slices as usize {
            if self.new_owner[s].is_some() {
                continue;
            }
            let Some((preferred, deficit, Reverse(e))) = heap.pop() else {
                uncovered.push((self.name.to_owned(), s as u32));
                continue;
            };
            // A stalled slice goes only to a node not avoided; else its slow owner keeps it.
            if let Some(owner) = self.stalled[s].and_then(|n| self.entry(n)).filter(|_| !preferred) {
                heap.push((preferred, deficit, Reverse(e)));
                self.give(s, owner);
                continue;
            }
            let reason = match self.orig[s] {
                Some(_) if self.stalled[s].is_some() => MoveReason::Unclaimed,
                Some(_) => MoveReason::Orphaned,
                None => MoveReason::NewQueueSlice,
            };
            self.give(s, e);
            self.push_move(s, e, reason, moves);
            heap.push((preferred, deficit - 1, Reverse(e)));
        }
    }

    /// Moves slices off live nodes that may no longer hold them (unless pinned there).
    fn drain_ineligible(&mut self, gate: &mut Gate, moves: &mut Vec<RawMove<'a>>) {
        if self.entries.is_empty() {
            return;
        }
        let mut heap = self.deficit_heap();
        for s in 0..self.slices as usize {
            let Some(o) = self.new_owner[s] else { continue };
            // A pinned slice stays on its (ineligible) pin node or was handled by `move_pinned`.
            if self.entry(o).is_some() || self.pinned[s].is_some() || !gate.allow() {
                continue;
            }
            let Some((preferred, deficit, Reverse(e))) = heap.pop() else { continue };
            self.give(s, e);
            self.push_move(s, e, MoveReason::NodeIneligible, moves);
            heap.push((preferred, deficit - 1, Reverse(e)));
        }
    }

    /// Moves slices from nodes above target to nodes below it.
    fn balance(&mut self, gate: &mut Gate, moves: &mut Vec<RawMove<'a>>) {
        let mut excess: Vec<i64> = self.entries.iter().map(|e| (e.held - e.target()).max(0)).collect();
        if excess.iter().all(|&x| x == 0) {
            return;
        }
        // What each donor gives: its highest-numbered slices that are not pinned to it.
        let mut give: Vec<Vec<usize>> = vec![Vec::new(); self.entries.len()];
        for s in (0..self.slices as usize).rev() {
            let Some(e) = self.new_owner[s].and_then(|o| self.entry(o)) else { continue };
            if excess[e] > 0 && self.pinned[s].is_none() {
                give[e].push(s);
                excess[e] -= 1;
            }
        }
        let mut donors: Vec<usize> = (0..self.entries.len()).filter(|&e| !give[e].is_empty()).collect();
        donors.sort_by_key(|&e| (Reverse(give[e].len()), e));
        let mut heap = self.deficit_heap();
        for d in donors {
            for &s in &give[d] {
                // Balance never gives an avoided node anything: it may be dying.
                if heap.peek().is_none_or(|&(preferred, deficit, _)| !preferred || deficit <= 0) || !gate.allow() {
                    continue;
                }
                let Some((preferred, deficit, Reverse(e))) = heap.pop() else { continue };
                self.give(s, e);
                self.push_move(s, e, MoveReason::Balance, moves);
                heap.push((preferred, deficit - 1, Reverse(e)));
            }
        }
    }
}

/// A node's summed fractional shares `F` (exact while it fits in `u128`, else `f64`).
///
/// A node's total share is `T = sum(floor(x)) + F`, so targets sum to `floor(T)` or
/// `ceil(T)` exactly when the node gets `floor(F)` to `ceil(F)` rounding slots.
#[derive(Clone, Copy, Debug)]
struct FractionSum {
    whole: u128,
    num: u128,
    den: u128,
    exact: bool,
    approx: f64,
}

impl FractionSum {
    const ZERO: FractionSum = FractionSum { whole: 0, num: 0, den: 1, exact: true, approx: 0.0 };

    /// Adds `num / den`, with `num < den`.
    fn add(&mut self, num: u128, den: u128) {
        self.approx += num as f64 / den as f64;
        if !self.exact || num == 0 {
            return;
        }
        let sum = (|| {
            let lcm = (self.den / gcd(self.den, den)).checked_mul(den)?;
            self.num.checked_mul(lcm / self.den)?.checked_add(num.checked_mul(lcm / den)?).map(|n| (n, lcm))
        })();
        match sum {
            Some((n, lcm)) => {
                self.whole += n / lcm;
                let r = n % lcm;
                let g = gcd(r, lcm);
                (self.num, self.den) = (r / g, lcm / g);
            }
            None => self.exact = false,
        }
    }

    fn floor(&self) -> u64 {
        if self.exact {
            self.whole as u64
        } else {
            (self.approx + 1e-9).floor() as u64
        }
    }

    fn ceil(&self) -> u64 {
        if self.exact {
            (self.whole + u128::from(self.num > 0)) as u64
        } else {
            (self.approx - 1e-9).ceil().max(0.0) as u64
        }
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Chooses which entries of each queue get `ceil(x)` (a rounding slot), so that each
/// queue hands out exactly its slots and each node gets `floor(F)..=ceil(F)` slots.
///
/// Such a choice always exists (the fractional parts themselves are a fractional
/// solution of this transportation problem, and its bounds are integers). A greedy pass
/// picks, per queue, nodes that would otherwise lose a slice first, then nodes furthest
/// behind their running fractional total. A repair pass then shifts slots along
/// alternating paths (node a gives its slot in queue q to node b, which gives its slot in
/// queue q' to c, ...) until every node is within bounds; paths prefer not to take a slot
/// from a node that would then lose a slice (0-1 BFS on that cost). Each path fixes one
/// unit of violation and creates none, so the repair ends.
fn choose_targets(queues: &mut [QueueWork<'_>], node_count: usize) {
    let mut slots = vec![0u64; node_count];
    let mut running = vec![0f64; node_count];
    let mut sums = vec![FractionSum::ZERO; node_count];
    // Fractional memberships per node: (queue, entry).
    let mut member: Vec<Vec<(usize, usize)>> = vec![Vec::new(); node_count];
    for (qi, q) in queues.iter_mut().enumerate() {
        let mut candidates: Vec<(bool, f64, usize)> = Vec::new();
        for (ei, e) in q.entries.iter().enumerate() {
            if e.rem == 0 {
                continue;
            }
            running[e.node] += e.rem as f64 / e.den as f64;
            sums[e.node].add(e.rem, e.den);
            member[e.node].push((qi, ei));
            candidates.push((!e.wants_slot(), slots[e.node] as f64 - running[e.node], ei));
        }
        candidates.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)));
        for &(_, _, ei) in candidates.iter().take(q.slots) {
            q.entries[ei].slot = true;
            slots[q.entries[ei].node] += 1;
        }
    }

    let floor: Vec<u64> = sums.iter().map(FractionSum::floor).collect();
    let ceil: Vec<u64> = sums.iter().map(FractionSum::ceil).collect();
    let mut search = PathSearch::new(node_count, queues.len());
    for u in 0..node_count {
        while slots[u] > ceil[u] {
            let Some(v) = search.push_slot(queues, &member, u, |v| v != u && slots[v] < ceil[v]) else { break };
            slots[u] -= 1;
            slots[v] += 1;
        }
    }
    for v in 0..node_count {
        while slots[v] < floor[v] {
            let Some(u) = search.pull_slot(queues, &member, v, |u| u != v && slots[u] > floor[u]) else { break };
            slots[u] -= 1;
            slots[v] += 1;
        }
    }
}

/// Scratch space of the repair's path searches.
struct PathSearch {
    dist: Vec<u64>,
    /// For each reached node: (the node on the path toward the start, queue, the entry
    /// that gives the slot, the entry that takes it).
    via: Vec<Option<(usize, usize, usize, usize)>>,
    /// Per queue: 0 not scanned, 1 scanned at cost 1, 2 scanned at cost 0.
    scanned: Vec<u8>,
}

impl PathSearch {
    fn new(node_count: usize, queue_count: usize) -> Self {
        PathSearch { dist: vec![u64::MAX; node_count], via: vec![None; node_count], scanned: vec![0; queue_count] }
    }

    fn reset(&mut self) {
        self.dist.fill(u64::MAX);
        self.via.fill(None);
        self.scanned.fill(0);
    }

    /// Moves one slot away from `start` along the cheapest alternating path to a node
    /// that `room` accepts; returns that node.
    fn push_slot(&mut self, queues: &mut [QueueWork<'_>], member: &[Vec<(usize, usize)>], start: usize, room: impl Fn(usize) -> bool) -> Option<usize> {
        self.reset();
        let mut deque = VecDeque::from([(0u64, start)]);
        self.dist[start] = 0;
        let mut found = None;
        while let Some((d, a)) = deque.pop_front() {
            if d > self.dist[a] {
                continue;
            }
            if room(a) {
                found = Some(a);
                break;
            }
            for &(qi, ea) in &member[a] {
                let giver = &queues[qi].entries[ea];
                if !giver.slot {
                    continue;
                }
                // Taking the slot from a node that holds ceil(x) slices costs it a slice.
                let cost = u64::from(giver.wants_slot());
                let level = if cost == 0 { 2 } else { 1 };
                if self.scanned[qi] >= level {
                    continue;
                }
                self.scanned[qi] = level;
                for (eb, taker) in queues[qi].entries.iter().enumerate() {
                    let b = taker.node;
                    if taker.slot || taker.rem == 0 || d + cost >= self.dist[b] {
                        continue;
                    }
                    self.dist[b] = d + cost;
                    self.via[b] = Some((a, qi, ea, eb));
                    if cost == 0 {
                        deque.push_front((d, b));
                    } else {
                        deque.push_back((d + 1, b));
                    }
                }
            }
        }
        let end = found?;
        let mut at = end;
        while at != start {
            let (prev, qi, giver, taker) = self.via[at]?;
            queues[qi].entries[giver].slot = false;
            queues[qi].entries[taker].slot = true;
            at = prev;
        }
        Some(end)
    }

    /// Moves one slot to `end` along the cheapest alternating path from a node that
    /// `spare` accepts; returns that node.
    fn pull_slot(&mut self, queues: &mut [QueueWork<'_>], member: &[Vec<(usize, usize)>], end: usize, spare: impl Fn(usize) -> bool) -> Option<usize> {
        self.reset();
        let mut deque = VecDeque::from([(0u64, end)]);
        self.dist[end] = 0;
        let mut found = None;
        while let Some((d, b)) = deque.pop_front() {
            if d > self.dist[b] {
                continue;
            }
            if spare(b) {
                found = Some(b);
                break;
            }
            for &(qi, eb) in &member[b] {
                if queues[qi].entries[eb].slot || self.scanned[qi] > 0 {
                    continue;
                }
                self.scanned[qi] = 2;
                for (ea, giver) in queues[qi].entries.iter().enumerate() {
                    let a = giver.node;
                    let cost = u64::from(giver.wants_slot());
                    if !giver.slot || d + cost >= self.dist[a] {
                        continue;
                    }
                    self.dist[a] = d + cost;
                    self.via[a] = Some((b, qi, ea, eb));
                    if cost == 0 {
                        deque.push_front((d, a));
                    } else {
                        deque.push_back((d + 1, a));
                    }
                }
            }
        }
        let start = found?;
        let mut at = start;
        while at != end {
            let (next, qi, giver, taker) = self.via[at]?;
            queues[qi].entries[giver].slot = false;
            queues[qi].entries[taker].slot = true;
            at = next;
        }
        Some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use proptest::test_runner::TestCaseError;

    fn node(id: &str, weight: u32) -> NodeSpec {
        NodeSpec { id: id.into(), weight, queues: Vec::new(), cordoned: false, refused: Vec::new() }
    }

    fn queue(name: &str, slices: u32) -> QueueSpec {
        QueueSpec { name: name.into(), slices, paused: false }
    }

    fn key(queue: &str, slice: u32) -> SliceKey {
        (queue.to_owned(), slice)
    }

    fn unlimited() -> PlanOptions {
        PlanOptions { churn_budget: usize::MAX, ..PlanOptions::default() }
    }

    fn cluster(queues: Vec<QueueSpec>, nodes: Vec<NodeSpec>) -> PlanInput {
        PlanInput { queues, nodes, options: unlimited(), ..PlanInput::default() }
    }

    /// Slices of `queue` per owner in an assignment.
    fn held(assignment: &BTreeMap<SliceKey, String>, queue: &str) -> BTreeMap<String, u128> {
        let mut out = BTreeMap::new();
        for ((q, _), owner) in assignment {
            if q == queue {
                *out.entry(owner.clone()).or_insert(0) += 1;
            }
        }
        out
    }

    fn live(input: &PlanInput, id: &str) -> bool {
        input.nodes.iter().any(|n| n.id == id)
    }

    fn eligible(input: &PlanInput, id: &str, queue: &str) -> bool {
        input.nodes.iter().find(|n| n.id == id).is_some_and(|n| n.eligible_for(queue))
    }

    fn active(input: &PlanInput) -> impl Iterator<Item = &QueueSpec> {
        input.queues.iter().filter(|q| !q.paused)
    }

    fn planned(input: &PlanInput, key: &SliceKey) -> bool {
        active(input).any(|q| q.name == key.0 && key.1 < q.slices)
    }

    /// A share as (numerator, denominator).
    type Fraction = (u128, u128);

    /// `floor` and `ceil` of a sum of fractions, computed exactly (test sizes keep the
    /// common denominator small).
    fn floor_ceil(fractions: &[Fraction]) -> (u128, u128) {
        let den = fractions.iter().fold(1u128, |l, &(_, d)| l / gcd(l, d) * d);
        let num: u128 = fractions.iter().map(|&(n, d)| n * (den / d)).sum();
        (num / den, num.div_ceil(den))
    }

    /// A node's share of a queue without pins: `S * w / W` over the eligible nodes.
    fn share(input: &PlanInput, q: &QueueSpec, id: &str) -> Fraction {
        let total: u128 = input.nodes.iter().filter(|n| n.eligible_for(&q.name)).map(|n| u128::from(n.weight)).sum();
        let weight = input.nodes.iter().find(|n| n.id == id).map_or(0, |n| u128::from(n.weight));
        (u128::from(q.slices) * weight, total)
    }

    /// The bounds the contract promises when nothing is deferred and nothing is pinned:
    /// `floor(x)..=ceil(x)` per queue, `floor(T)..=ceil(T)` in total, and nothing left
    /// on a node that is not eligible (for queues that have an eligible node).
    fn check_balanced(input: &PlanInput, plan: &Plan) -> Result<(), TestCaseError> {
        // Per node: slices held, and its share of each queue as (numerator, denominator).
        let mut totals: BTreeMap<&str, (u128, Vec<Fraction>)> = BTreeMap::new();
        for q in active(input) {
            if !input.nodes.iter().any(|n| n.eligible_for(&q.name)) {
                continue;
            }
            let counts = held(&plan.assignment, &q.name);
            for (owner, count) in &counts {
                prop_assert!(eligible(input, owner, &q.name), "{} holds {} slices of {} but is not eligible", owner, count, q.name);
            }
            for n in input.nodes.iter().filter(|n| n.eligible_for(&q.name)) {
                let x = share(input, q, &n.id);
                let (lo, hi) = floor_ceil(&[x]);
                let count = counts.get(&n.id).copied().unwrap_or(0);
                prop_assert!(lo <= count && count <= hi, "{} holds {} of {}, share {}/{}", n.id, count, q.name, x.0, x.1);
                let t = totals.entry(&n.id).or_default();
                t.0 += count;
                t.1.push(x);
            }
        }
        for (id, (total, shares)) in totals {
            let (lo, hi) = floor_ceil(&shares);
            prop_assert!(lo <= total && total <= hi, "{} holds {} in total, share in {}..={}", id, total, lo, hi);
        }
        Ok(())
    }

    /// Up to 4 queues of up to 64 slices, up to 12 nodes with weights 0..=4, cordons and
    /// queue lists, a current assignment mixing live, dead and missing owners (and stale
    /// entries), and a few pins.
    fn arb_input() -> impl Strategy<Value = PlanInput> {
        (1usize..=4, 1usize..=12).prop_flat_map(|(nq, nn)| {
            (
                proptest::collection::vec((1u32..=64, prop::bool::weighted(0.2)), nq),
                proptest::collection::vec(
                    (prop_oneof![1 => Just(0u32), 7 => 1u32..=4], prop::bool::weighted(0.15), prop::option::weighted(0.3, proptest::collection::vec(0..nq + 1, 1..=2))),
                    nn,
                ),
                proptest::collection::vec(any::<u8>(), nq * 64),
                proptest::collection::vec((0..nq, any::<u32>(), 0..nn + 2), 0..=6),
            )
                .prop_map(move |(queues, nodes, owners, pins)| {
                    let queues: Vec<QueueSpec> = queues.into_iter().enumerate().map(|(i, (slices, paused))| QueueSpec { name: format!("q{i}"), slices, paused }).collect();
                    let nodes: Vec<NodeSpec> = nodes
                        .into_iter()
                        .enumerate()
                        .map(|(i, (weight, cordoned, serves))| NodeSpec {
                            id: format!("n{i:02}"),
                            weight,
                            queues: serves.unwrap_or_default().into_iter().map(|q| format!("q{q}")).collect(),
                            cordoned,
                            refused: Vec::new(),
                        })
                        .collect();
                    let name = |i: usize| if i < nn { format!("n{i:02}") } else { format!("gone{}", i - nn) };
                    let mut current = BTreeMap::new();
                    for (qi, q) in queues.iter().enumerate() {
                        for s in 0..q.slices {
                            let code = usize::from(owners[qi * 64 + s as usize]);
                            match code % 8 {
                                0 => {}
                                1 => _ = current.insert(key(&q.name, s), name(nn + code % 2)),
                                _ => _ = current.insert(key(&q.name, s), name(code / 8 % nn)),
                            }
                        }
                        if owners[qi * 64 + 63] % 4 == 0 {
                            current.insert(key(&q.name, q.slices + 1), name(0));
                            current.insert(key("retired", q.slices), name(0));
                        }
                    }
                    let pins = pins.into_iter().map(|(qi, s, ni)| (key(&queues[qi].name, s % queues[qi].slices), name(ni))).collect();
                    PlanInput { queues, nodes, current, pins, options: unlimited(), ..PlanInput::default() }
                })
        })
    }

    /// Options that constrain the plan: maintenance, small budgets, a tripped valve.
    fn arb_constrained(input: PlanInput) -> impl Strategy<Value = PlanInput> {
        (any::<bool>(), prop_oneof![0usize..=6, Just(usize::MAX)], any::<bool>()).prop_map(move |(maintenance, churn_budget, vanish)| {
            let mut input = input.clone();
            input.options.maintenance = maintenance;
            input.options.churn_budget = churn_budget;
            if vanish {
                input.previous_nodes = mass_vanished_history(&input);
            }
            input
        })
    }

    /// A previous node set of which more than half is gone now.
    fn mass_vanished_history(input: &PlanInput) -> BTreeSet<String> {
        let mut previous: BTreeSet<String> = input.nodes.iter().map(|n| n.id.clone()).collect();
        previous.extend((0..=input.nodes.len()).map(|i| format!("old{i}")));
        previous
    }

    fn arb_any_options() -> impl Strategy<Value = PlanInput> {
        arb_input().prop_flat_map(arb_constrained)
    }

    fn fresh(mut input: PlanInput) -> PlanInput {
        input.current.clear();
        input.pins.clear();
        input.options = unlimited();
        input
    }

    /// Plans and applies until nothing is deferred (a death takes two plans); returns the
    /// input of the last plan and that plan.
    fn settle(mut input: PlanInput) -> (PlanInput, Plan) {
        for _ in 0..3 {
            let plan = plan(&input);
            if plan.deferred_moves == 0 {
                return (input, plan);
            }
            input.current = plan.assignment;
            input.previous_nodes = input.nodes.iter().map(|n| n.id.clone()).collect();
        }
        panic!("still deferring moves after three plans with an unlimited budget");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_slice_of_every_active_queue_with_an_eligible_node_is_covered(input in arb_any_options()) {
            let plan = plan(&input);
            for q in active(&input) {
                let coverable = input.nodes.iter().any(|n| n.eligible_for(&q.name));
                for s in 0..q.slices {
                    let k = key(&q.name, s);
                    let owner_now = input.current.get(&k).filter(|o| live(&input, o));
                    match plan.assignment.get(&k) {
                        Some(owner) => prop_assert!(live(&input, owner)),
                        None => {
                            prop_assert!(!coverable, "{:?} has no owner", k);
                            prop_assert!(owner_now.is_none(), "{:?} lost its live owner", k);
                            prop_assert!(plan.uncovered.contains(&k));
                        }
                    }
                    if !coverable && owner_now.is_some() {
                        prop_assert_eq!(plan.assignment.get(&k), owner_now);
                    }
                }
            }
            for k in plan.assignment.keys() {
                prop_assert!(planned(&input, k), "{:?} is not a slice of an active queue", k);
            }
        }

        #[test]
        fn each_queue_and_each_nodes_total_stay_within_one_slice_of_the_weighted_share(input in arb_input()) {
            let mut input = input;
            input.pins.clear();
            let (input, plan) = settle(input);
            check_balanced(&input, &plan)?;
        }

        #[test]
        fn a_balanced_plan_is_a_fixpoint(input in arb_input()) {
            let mut input = input;
            input.pins.clear();
            let (mut input, plan) = settle(input);
            input.current = plan.assignment;
            let again = super::plan(&input);
            prop_assert!(again.moves.is_empty(), "{:?}", again.moves);
        }

        #[test]
        fn a_death_moves_only_the_dead_nodes_slices(input in arb_input(), victim in any::<Index>()) {
            let mut input = fresh(input);
            let before = plan(&input);
            input.current = before.assignment.clone();
            input.previous_nodes = input.nodes.iter().map(|n| n.id.clone()).collect();
            let dead = victim.get(&input.nodes).id.clone();
            input.nodes.retain(|n| n.id != dead);
            input.options.max_vanished_fraction = 1.0;
            let after = plan(&input);
            for (k, owner) in &before.assignment {
                if *owner != dead {
                    prop_assert_eq!(after.assignment.get(k), Some(owner), "{:?} moved off a live node", k);
                }
            }
            for m in &after.moves {
                prop_assert_eq!(m.from.as_deref(), Some(dead.as_str()));
                prop_assert_eq!(m.reason, MoveReason::Orphaned);
            }
            // The next plan makes only the balance moves placing the orphans could not.
            input.current = after.assignment;
            input.previous_nodes = input.nodes.iter().map(|n| n.id.clone()).collect();
            let next = plan(&input);
            prop_assert_eq!(next.deferred_moves, 0);
            prop_assert!(next.moves.iter().all(|m| m.reason == MoveReason::Balance), "{:?}", next.moves);
            check_balanced(&input, &next)?;
        }

        #[test]
        fn a_join_moves_within_budget_toward_balance_and_converges(
            input in arb_input(),
            weight in 1u32..=4,
            serves in prop::option::of(0usize..4),
            budget in 1usize..=6,
        ) {
            let mut input = fresh(input);
            input.current = plan(&input).assignment;
            input.nodes.push(NodeSpec {
                id: "n99".into(),
                weight,
                queues: serves.map(|q| format!("q{q}")).into_iter().collect(),
                cordoned: false,
                refused: Vec::new(),
            });
            input.options.churn_budget = budget;
            let slices: usize = input.queues.iter().map(|q| q.slices as usize).sum();
            let mut rounds = 0;
            loop {
                let round = plan(&input);
                if round.moves.is_empty() {
                    check_balanced(&input, &round)?;
                    break;
                }
                rounds += 1;
                prop_assert!(rounds <= 2 * slices, "no convergence after {} rounds", rounds);
                prop_assert!(round.moves.iter().filter(|m| m.reason.is_planned()).count() <= budget);
                for m in &round.moves {
                    if m.from.is_none() {
                        // The newcomer may make a queue coverable that had no eligible node.
                        prop_assert_eq!(m.reason, MoveReason::NewQueueSlice);
                        prop_assert!(!input.current.contains_key(&key(&m.queue, m.slice)));
                        continue;
                    }
                    prop_assert_eq!(m.reason, MoveReason::Balance);
                    let q = input.queues.iter().find(|q| q.name == m.queue).expect("planned queue");
                    let from = m.from.as_deref().expect("balance moves have an owner");
                    let (from_lo, _) = floor_ceil(&[share(&input, q, from)]);
                    let (_, to_hi) = floor_ceil(&[share(&input, q, &m.to)]);
                    let (before, after) = (held(&input.current, &q.name), held(&round.assignment, &q.name));
                    prop_assert!(before[from] > from_lo && after.get(from).copied().unwrap_or(0) >= from_lo,
                        "{} gave below its share", from);
                    prop_assert!(before.get(&m.to).copied().unwrap_or(0) < to_hi && after[&m.to] <= to_hi,
                        "{} took above its share", m.to);
                }
                input.current = round.assignment;
            }
        }

        #[test]
        fn planned_moves_never_exceed_the_churn_budget(input in arb_input(), budget in 0usize..=6) {
            let mut input = input;
            input.options.churn_budget = budget;
            let plan = plan(&input);
            prop_assert!(plan.moves.iter().filter(|m| m.reason.is_planned()).count() <= budget);
            for m in plan.moves.iter().filter(|m| m.reason.is_planned()) {
                prop_assert!(m.from.as_deref().is_some_and(|f| live(&input, f)));
            }
        }

        #[test]
        fn pinned_slices_never_leave_a_live_pin_node(input in arb_any_options()) {
            let plan = plan(&input);
            for (k, pin) in &input.pins {
                if planned(&input, k) && live(&input, pin) && input.current.get(k) == Some(pin) {
                    prop_assert_eq!(plan.assignment.get(k), Some(pin), "{:?} left its pin node", k);
                }
            }
            let mut free = input.clone();
            free.options = unlimited();
            free.previous_nodes.clear();
            let (free, plan) = settle(free);
            for (k, pin) in &free.pins {
                if planned(&free, k) && eligible(&free, pin, &k.0) {
                    prop_assert_eq!(plan.assignment.get(k), Some(pin), "{:?} is not on its pin node", k);
                }
            }
        }

        #[test]
        fn maintenance_moves_only_orphans_and_unowned_slices(input in arb_input(), budget in 0usize..=6) {
            let mut input = input;
            input.options.maintenance = true;
            input.options.churn_budget = budget;
            let plan = plan(&input);
            prop_assert!(plan.balance_paused);
            for m in &plan.moves {
                prop_assert!(!m.reason.is_planned());
                prop_assert!(m.from.as_deref().is_none_or(|f| !live(&input, f)));
            }
            for (k, owner) in &input.current {
                if planned(&input, k) && live(&input, owner) {
                    prop_assert_eq!(plan.assignment.get(k), Some(owner));
                }
            }
        }

        #[test]
        fn mass_vanish_pauses_planned_moves_but_orphans_are_taken_over(input in arb_input()) {
            let mut input = input;
            input.previous_nodes = mass_vanished_history(&input);
            let plan = plan(&input);
            prop_assert!(plan.balance_paused);
            let vanished = input.nodes.len() + 1;
            let alert = Alert::MassVanish { vanished, previous: 2 * vanished - 1 };
            prop_assert!(plan.alerts.contains(&alert), "no {:?} in {:?}", alert, plan.alerts);
            for m in &plan.moves {
                prop_assert!(!m.reason.is_planned());
            }
            for (k, owner) in &input.current {
                if !planned(&input, k) {
                    continue;
                }
                if live(&input, owner) {
                    prop_assert_eq!(plan.assignment.get(k), Some(owner));
                } else if input.nodes.iter().any(|n| n.eligible_for(&k.0)) {
                    let new = plan.assignment.get(k).expect("orphan taken over");
                    prop_assert!(eligible(&input, new, &k.0));
                }
            }
            // Without the vanished nodes the valve stays shut.
            input.previous_nodes = input.nodes.iter().map(|n| n.id.clone()).collect();
            let plan = super::plan(&input);
            prop_assert!(!plan.balance_paused);
            let tripped = plan.alerts.iter().any(|a| matches!(a, Alert::MassVanish { .. }));
            prop_assert!(!tripped, "{:?}", plan.alerts);
        }

        #[test]
        fn paused_queues_get_no_owner(input in arb_any_options()) {
            let plan = plan(&input);
            for q in input.queues.iter().filter(|q| q.paused) {
                prop_assert!(!plan.assignment.keys().any(|(name, _)| *name == q.name));
                prop_assert!(!plan.moves.iter().any(|m| m.queue == q.name));
                for k in input.current.keys().filter(|(name, _)| *name == q.name) {
                    prop_assert!(plan.released.contains(k));
                }
            }
        }

        #[test]
        fn ineligible_nodes_get_no_new_slices(input in arb_any_options()) {
            let plan = plan(&input);
            for m in &plan.moves {
                prop_assert!(eligible(&input, &m.to, &m.queue), "{:?}", m);
            }
            for (k, owner) in &plan.assignment {
                if !eligible(&input, owner, &k.0) {
                    prop_assert_eq!(input.current.get(k), Some(owner));
                }
            }
        }

        #[test]
        fn the_same_input_gives_the_same_plan(input in arb_any_options()) {
            let first = plan(&input);
            let mut shuffled = input.clone();
            shuffled.nodes.reverse();
            shuffled.queues.reverse();
            prop_assert_eq!(&first, &plan(&shuffled));
            prop_assert_eq!(&first, &plan(&input));
        }
    }

    #[test]
    fn new_queue_slices_are_spread_in_proportion_to_weight() {
        let input = cluster(vec![queue("in", 12)], vec![node("a", 1), node("b", 2), node("c", 3)]);
        let plan = plan(&input);
        let counts = held(&plan.assignment, "in");
        assert_eq!(counts, BTreeMap::from([("a".into(), 2), ("b".into(), 4), ("c".into(), 6)]));
        assert_eq!(plan.moves.len(), 12);
        assert!(plan.moves.iter().all(|m| m.from.is_none() && m.reason == MoveReason::NewQueueSlice));
    }

    #[test]
    fn totals_stay_within_one_slice_of_the_weighted_share_across_queues() {
        // Every node's share of each one-slice queue is 1/3, so each queue alone would allow
        // any node; in total each must hold 1 or 2 of the 4.
        let queues = (0..4).map(|i| queue(&format!("q{i}"), 1)).collect();
        let input = cluster(queues, vec![node("a", 1), node("b", 1), node("c", 1)]);
        let plan = plan(&input);
        let mut totals = BTreeMap::<&str, u32>::new();
        for owner in plan.assignment.values() {
            *totals.entry(owner.as_str()).or_default() += 1;
        }
        assert_eq!(totals.values().copied().collect::<Vec<_>>(), vec![2, 1, 1]);
    }

    #[test]
    fn dead_nodes_slices_move_and_nothing_else_does() {
        let mut input = cluster(vec![queue("in", 12)], vec![node("a", 1), node("b", 1), node("c", 1)]);
        let first = plan(&input);
        input.current = first.assignment.clone();
        input.nodes.retain(|n| n.id != "b");
        let second = plan(&input);
        assert_eq!(second.moves.len(), 4);
        for m in &second.moves {
            assert_eq!((m.from.as_deref(), m.reason), (Some("b"), MoveReason::Orphaned));
        }
        for (k, owner) in first.assignment.iter().filter(|(_, o)| *o != "b") {
            assert_eq!(&second.assignment[k], owner);
        }
        assert_eq!(held(&second.assignment, "in"), BTreeMap::from([("a".into(), 6), ("c".into(), 6)]));
    }

    #[test]
    fn cordoned_node_is_drained_by_node_ineligible_moves() {
        let mut input = cluster(vec![queue("in", 8)], vec![node("a", 1), node("b", 1)]);
        input.current = plan(&input).assignment;
        input.nodes[1].cordoned = true;
        let plan = plan(&input);
        assert_eq!(plan.moves.len(), 4);
        for m in &plan.moves {
            assert_eq!((m.from.as_deref(), m.to.as_str(), m.reason), (Some("b"), "a", MoveReason::NodeIneligible));
        }
        assert!(plan.assignment.values().all(|o| o == "a"));
    }

    #[test]
    fn a_node_that_stops_serving_a_queue_is_drained_of_it() {
        let mut input = cluster(vec![queue("in", 4), queue("out", 4)], vec![node("a", 1), node("b", 1)]);
        input.current = plan(&input).assignment;
        input.nodes[1].queues = vec!["out".into()];
        let plan = plan(&input);
        assert!(plan.moves.iter().all(|m| m.queue == "in" && m.reason == MoveReason::NodeIneligible));
        assert_eq!(held(&plan.assignment, "in"), BTreeMap::from([("a".into(), 4)]));
    }

    #[test]
    fn churn_budget_limits_planned_moves_per_round() {
        let mut input = cluster(vec![queue("in", 12)], vec![node("a", 1), node("b", 1), node("c", 1)]);
        input.current = (0..12).map(|s| (key("in", s), "a".to_owned())).collect();
        input.options.churn_budget = 3;
        let mut rounds = 0;
        loop {
            let plan = plan(&input);
            if plan.moves.is_empty() {
                break;
            }
            rounds += 1;
            assert!(plan.moves.len() <= 3);
            assert!(plan.moves.iter().all(|m| m.reason == MoveReason::Balance));
            if rounds == 1 {
                assert_eq!(plan.deferred_moves, 5);
            }
            input.current = plan.assignment;
        }
        assert_eq!(rounds, 3, "8 moves at 3 per round");
        let counts = held(&input.current, "in");
        assert!(counts.values().all(|&c| c == 4));
    }

    #[test]
    fn maintenance_freezes_everything_but_orphan_takeover() {
        let mut input = cluster(vec![queue("in", 6)], vec![node("a", 1), node("b", 1)]);
        input.current = (0..6).map(|s| (key("in", s), if s < 2 { "dead" } else { "a" }.to_owned())).collect();
        input.options.maintenance = true;
        let plan = plan(&input);
        assert!(plan.balance_paused);
        assert_eq!(plan.moves.len(), 2);
        assert!(plan.moves.iter().all(|m| m.reason == MoveReason::Orphaned && m.to == "b"));
        assert_eq!(plan.deferred_moves, 1, "a holds 4 where 3 is its share");
    }

    #[test]
    fn mass_vanish_trips_the_safety_valve() {
        let mut input = cluster(vec![queue("in", 8)], vec![node("a", 1), node("b", 1)]);
        input.previous_nodes = ["a", "b", "c", "d", "e"].into_iter().map(String::from).collect();
        input.current = (0..8).map(|s| (key("in", s), ["a", "c", "d", "e"][s as usize % 4].to_owned())).collect();
        input.current.insert(key("in", 0), "a".into());
        input.current.insert(key("in", 4), "a".into());
        input.current.insert(key("in", 1), "a".into());
        let plan = plan(&input);
        assert!(plan.balance_paused);
        assert_eq!(plan.alerts, vec![Alert::MassVanish { vanished: 3, previous: 5 }]);
        assert!(plan.moves.iter().all(|m| m.reason == MoveReason::Orphaned));
        assert_eq!(plan.assignment.len(), 8);
        assert_eq!(held(&plan.assignment, "in"), BTreeMap::from([("a".into(), 4), ("b".into(), 4)]));
    }

    #[test]
    fn pinned_slice_moves_to_its_node_and_stays_there() {
        let mut input = cluster(vec![queue("in", 4)], vec![node("a", 1), node("b", 1)]);
        input.current = (0..4).map(|s| (key("in", s), "a".to_owned())).collect();
        input.pins.insert(key("in", 0), "b".into());
        input.pins.insert(key("in", 1), "a".into());
        let first = plan(&input);
        assert!(first.moves.iter().any(|m| m.slice == 0 && m.to == "b" && m.reason == MoveReason::Pinned));
        assert_eq!(first.assignment[&key("in", 1)], "a");
        assert_eq!(held(&first.assignment, "in"), BTreeMap::from([("a".into(), 2), ("b".into(), 2)]));
        // Cordoning the pin node does not move a slice it holds.
        input.current = first.assignment;
        input.nodes[1].cordoned = true;
        let second = plan(&input);
        assert_eq!(second.assignment[&key("in", 0)], "b");
        assert!(second.moves.iter().all(|m| m.slice != 0));
    }

    #[test]
    fn pin_to_a_dead_node_is_ignored_until_the_node_returns() {
        let mut input = cluster(vec![queue("in", 2)], vec![node("a", 1)]);
        input.current.insert(key("in", 0), "b".into());
        input.pins.insert(key("in", 0), "b".into());
        let first = plan(&input);
        assert_eq!(first.assignment[&key("in", 0)], "a");
        input.current = first.assignment;
        input.nodes.push(node("b", 1));
        let second = plan(&input);
        assert_eq!(second.assignment[&key("in", 0)], "b");
        assert_eq!(second.moves.len(), 1);
        assert_eq!(second.moves[0].reason, MoveReason::Pinned);
    }

    #[test]
    fn a_queue_without_an_eligible_node_is_reported_uncovered() {
        let mut input = cluster(vec![queue("in", 3)], vec![node("a", 1)]);
        input.nodes[0].queues = vec!["out".into()];
        input.current.insert(key("in", 0), "a".into());
        let plan = plan(&input);
        assert_eq!(plan.assignment, BTreeMap::from([(key("in", 0), "a".to_owned())]));
        assert_eq!(plan.uncovered, vec![key("in", 1), key("in", 2)]);
        assert_eq!(plan.alerts, vec![Alert::Uncovered { queue: "in".into(), slices: 2 }]);
    }

    #[test]
    fn an_invalid_slice_count_is_reported_and_the_queue_is_not_planned() {
        let mut input = cluster(vec![queue("in", 0)], vec![node("a", 1)]);
        input.current.insert(key("in", 0), "a".into());
        let plan = plan(&input);
        assert!(plan.assignment.is_empty());
        assert_eq!(plan.released, vec![key("in", 0)]);
        assert!(matches!(&plan.alerts[..], [Alert::InvalidQueue { queue, .. }] if queue == "in"));
    }

    #[test]
    fn a_node_that_refused_a_queue_is_drained_of_it_and_keeps_the_others() {
        let mut input = cluster(vec![queue("in", 4), queue("out", 4)], vec![node("a", 1), node("b", 1)]);
        input.current = plan(&input).assignment;
        input.nodes[0].refused = vec!["in".into()];
        let next = plan(&input);
        assert!(next.assignment.iter().filter(|((q, _), _)| q == "in").all(|(_, n)| n == "b"), "{:?}", next.assignment);
        assert_eq!(next.assignment.iter().filter(|((q, _), n)| q == "out" && *n == "a").count(), 2);
        assert!(next.moves.iter().all(|m| m.reason == MoveReason::NodeIneligible), "{:?}", next.moves);
    }

    #[test]
    fn a_stalled_slice_goes_to_another_node_and_an_avoided_node_gets_nothing_new() {
        let mut input = cluster(vec![queue("in", 6)], vec![node("a", 1), node("b", 1), node("c", 1)]);
        input.current = plan(&input).assignment;
        let of_b: Vec<SliceKey> = input.current.iter().filter(|(_, o)| *o == "b").map(|(k, _)| k.clone()).collect();
        assert_eq!(of_b.len(), 2);
        // b was given two slices and claimed neither in time; c's lease missed a keepalive.
        input.stalled = of_b.iter().cloned().collect();
        input.avoid = BTreeSet::from(["b".to_owned(), "c".to_owned()]);
        let next = plan(&input);
        for k in &of_b {
            assert_eq!(next.assignment[k], "a", "a stalled slice goes to the one node not avoided");
        }
        assert!(next.moves.iter().all(|m| m.reason == MoveReason::Unclaimed && m.from.as_deref() == Some("b")), "{:?}", next.moves);
        assert_eq!(next.moves.len(), 2, "nothing else moves: {:?}", next.moves);
        // The round after: avoided nodes get no balance moves while avoided.
        input.current = next.assignment.clone();
        input.stalled.clear();
        let after = plan(&input);
        assert!(after.moves.is_empty(), "no balance towards avoided nodes: {:?}", after.moves);
        // Once no longer avoided, balance resumes.
        input.avoid.clear();
        let healed = plan(&input);
        assert_eq!(held(&healed.assignment, "in"), BTreeMap::from([("a".into(), 2), ("b".into(), 2), ("c".into(), 2)]));
    }

    #[test]
    fn a_stalled_slice_stays_with_its_owner_when_every_other_node_is_avoided_too() {
        let mut input = cluster(vec![queue("in", 6)], vec![node("a", 1), node("b", 1), node("c", 1)]);
        input.current = plan(&input).assignment;
        // a is drained; b and c each stalled on a slice it was given: both are avoided.
        input.nodes.iter_mut().filter(|n| n.id == "a").for_each(|n| n.cordoned = true);
        let stalled_b = input.current.iter().find(|(_, o)| *o == "b").map(|(k, _)| k.clone()).expect("a slice of b");
        let stalled_c = input.current.iter().find(|(_, o)| *o == "c").map(|(k, _)| k.clone()).expect("a slice of c");
        input.stalled = BTreeSet::from([stalled_b.clone(), stalled_c.clone()]);
        input.avoid = BTreeSet::from(["b".to_owned(), "c".to_owned()]);
        let next = plan(&input);
        assert_eq!(next.assignment[&stalled_b], "b", "b keeps its stalled slice: c is no better");
        assert_eq!(next.assignment[&stalled_c], "c", "c keeps its stalled slice");
        assert!(next.moves.iter().all(|m| m.reason != MoveReason::Unclaimed), "no slice passed between slow nodes: {:?}", next.moves);
        // Once b and c have claimed, a is drained (to them, avoided or not: nobody else can).
        input.current = next.assignment.clone();
        input.stalled.clear();
        let after = plan(&input);
        assert!(after.assignment.values().all(|o| o != "a"), "a is drained: {:?}", after.assignment);
    }

    #[test]
    fn an_avoided_node_still_takes_orphans_nobody_else_can() {
        let mut input = cluster(vec![queue("in", 4)], vec![node("a", 1), node("b", 1)]);
        input.current = plan(&input).assignment;
        input.nodes.retain(|n| n.id != "a");
        input.avoid = BTreeSet::from(["b".to_owned()]);
        let next = plan(&input);
        assert!(next.assignment.values().all(|o| o == "b") && next.assignment.len() == 4, "{:?}", next.assignment);
        // A dead node's orphans prefer the fresh node.
        let mut input = cluster(vec![queue("in", 6)], vec![node("a", 1), node("b", 1), node("c", 1)]);
        input.current = plan(&input).assignment;
        input.nodes.retain(|n| n.id != "a");
        input.avoid = BTreeSet::from(["b".to_owned()]);
        let next = plan(&input);
        assert_eq!(held(&next.assignment, "in"), BTreeMap::from([("b".into(), 2), ("c".into(), 4)]));
    }
}
