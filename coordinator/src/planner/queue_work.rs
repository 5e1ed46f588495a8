//! One queue's share of a plan: its eligible nodes (entries), the owners before and
//! after, and the steps that give slices away (pins, takeovers, drains, balance).

use super::*;

/// "No entry": a node that is not eligible for a queue.
pub(super) const NO_ENTRY: u32 = u32::MAX;

/// One eligible node of one queue.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    /// The node's index (nodes sorted by id).
    pub(super) node: usize,
    /// The node's weight.
    pub(super) weight: u128,
    /// Slices of this queue whose pin will hold on this node.
    pub(super) pinned: u64,
    /// Slices the node holds now and may keep (not pinned elsewhere).
    pub(super) keep: u64,
    /// Slices the node holds while moves are being planned.
    pub(super) held: i64,
    /// `floor(x)`.
    pub(super) lo: u64,
    /// The fractional part of `x`, as `rem / den`.
    pub(super) rem: u128,
    /// See `rem`.
    pub(super) den: u128,
    /// The node's target is `ceil(x)` (it got one of the queue's rounding slots).
    pub(super) slot: bool,
}

impl Entry {
    pub(super) fn target(&self) -> i64 {
        (self.lo + u64::from(self.slot)) as i64
    }

    /// The node would lose a slice it holds if it did not get a rounding slot.
    pub(super) fn wants_slot(&self) -> bool {
        self.rem > 0 && self.keep > self.lo
    }
}

/// One active queue while it is planned.
pub(super) struct QueueWork<'a> {
    /// Position in the plan's queue list (queues sorted by name).
    pub(super) index: usize,
    pub(super) name: &'a str,
    pub(super) slices: u32,
    /// The owner in the current assignment, live or dead.
    pub(super) orig: Vec<Option<&'a str>>,
    /// The current owner's node index, when it is live.
    pub(super) owner: Vec<Option<usize>>,
    /// The live node each slice is pinned to, before deciding whether the pin holds.
    pub(super) pin_to: Vec<Option<usize>>,
    /// The node each slice's pin holds it on.
    pub(super) pinned: Vec<Option<usize>>,
    /// The planned owner.
    pub(super) new_owner: Vec<Option<usize>>,
    /// Eligible nodes, by node index.
    pub(super) entries: Vec<Entry>,
    /// Node index to entry index, or [`NO_ENTRY`].
    pub(super) entry_of: Vec<u32>,
    /// How many entries get `ceil(x)` rather than `floor(x)`.
    pub(super) slots: usize,
    /// The live owner (node index) of each slice it did not claim in time ([`PlanInput::stalled`]).
    pub(super) stalled: Vec<Option<usize>>,
    /// Entries of nodes in [`PlanInput::avoid`], sorted.
    pub(super) avoided: Vec<usize>,
}

/// A move before names are filled in.
pub(super) struct RawMove<'a> {
    pub(super) queue: usize,
    pub(super) slice: u32,
    pub(super) from: Option<&'a str>,
    pub(super) to: usize,
    pub(super) reason: MoveReason,
}

/// Lets planned moves through while the plan is not paused and the budget lasts.
pub(super) struct Gate {
    pub(super) paused: bool,
    pub(super) budget: usize,
    pub(super) used: usize,
    pub(super) deferred: usize,
}

impl Gate {
    pub(super) fn allow(&mut self) -> bool {
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
    pub(super) fn new(index: usize, name: &'a str, slices: u32, node_count: usize) -> Self {
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
    pub(super) fn has_orphans(&self) -> bool {
        !self.entries.is_empty() && self.orig.iter().zip(&self.owner).any(|(o, live)| o.is_some() && live.is_none())
    }

    pub(super) fn add_entry(&mut self, node: usize, weight: u32) {
        self.entry_of[node] = self.entries.len() as u32;
        self.entries.push(Entry { node, weight: u128::from(weight), pinned: 0, keep: 0, held: 0, lo: 0, rem: 0, den: 1, slot: false });
    }

    pub(super) fn entry(&self, node: usize) -> Option<usize> {
        match self.entry_of[node] {
            NO_ENTRY => None,
            e => Some(e as usize),
        }
    }

    /// Decides which pins hold, counts what each node holds and may keep, and computes
    /// each eligible node's share (water-filled around pins).
    pub(super) fn resolve_pins_and_share(&mut self) {
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
    pub(super) fn deficit_heap(&self) -> BinaryHeap<(bool, i64, Reverse<usize>)> {
        self.entries.iter().enumerate().map(|(i, e)| (self.avoided.binary_search(&i).is_err(), e.target() - e.held, Reverse(i))).collect()
    }

    pub(super) fn give(&mut self, s: usize, to_entry: usize) {
        if let Some(from) = self.new_owner[s].and_then(|o| self.entry(o)) {
            self.entries[from].held -= 1;
        }
        self.entries[to_entry].held += 1;
        self.new_owner[s] = Some(self.entries[to_entry].node);
    }

    pub(super) fn push_move(&self, s: usize, to_entry: usize, reason: MoveReason, moves: &mut Vec<RawMove<'a>>) {
        moves.push(RawMove { queue: self.index, slice: s as u32, from: self.orig[s], to: self.entries[to_entry].node, reason });
    }

    /// Brings pinned slices to their pin node.
    pub(super) fn move_pinned(&mut self, gate: &mut Gate, moves: &mut Vec<RawMove<'a>>) {
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
    pub(super) fn take_over_free(&mut self, moves: &mut Vec<RawMove<'a>>, uncovered: &mut Vec<SliceKey>) {
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
    pub(super) fn drain_ineligible(&mut self, gate: &mut Gate, moves: &mut Vec<RawMove<'a>>) {
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
    pub(super) fn balance(&mut self, gate: &mut Gate, moves: &mut Vec<RawMove<'a>>) {
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
