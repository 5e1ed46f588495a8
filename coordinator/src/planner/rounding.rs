//! Rounding each node's weighted share of a queue to whole slices so that every node's
//! total across queues stays within one of its exact share (a path search over the
//! rounding slots).

use super::*;

/// A node's summed fractional shares `F` (exact while it fits in `u128`, else `f64`).
///
/// A node's total share is `T = sum(floor(x)) + F`, so targets sum to `floor(T)` or
/// `ceil(T)` exactly when the node gets `floor(F)` to `ceil(F)` rounding slots.
#[derive(Clone, Copy, Debug)]
pub(super) struct FractionSum {
    pub(super) whole: u128,
    pub(super) num: u128,
    pub(super) den: u128,
    pub(super) exact: bool,
    pub(super) approx: f64,
}

impl FractionSum {
    const ZERO: FractionSum = FractionSum { whole: 0, num: 0, den: 1, exact: true, approx: 0.0 };

    /// Adds `num / den`, with `num < den`.
    pub(super) fn add(&mut self, num: u128, den: u128) {
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

    pub(super) fn floor(&self) -> u64 {
        if self.exact {
            self.whole as u64
        } else {
            (self.approx + 1e-9).floor() as u64
        }
    }

    pub(super) fn ceil(&self) -> u64 {
        if self.exact {
            (self.whole + u128::from(self.num > 0)) as u64
        } else {
            (self.approx - 1e-9).ceil().max(0.0) as u64
        }
    }
}

pub(super) fn gcd(mut a: u128, mut b: u128) -> u128 {
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
pub(super) fn choose_targets(queues: &mut [QueueWork<'_>], node_count: usize) {
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
pub(super) struct PathSearch {
    pub(super) dist: Vec<u64>,
    /// For each reached node: (the node on the path toward the start, queue, the entry
    /// that gives the slot, the entry that takes it).
    pub(super) via: Vec<Option<(usize, usize, usize, usize)>>,
    /// Per queue: 0 not scanned, 1 scanned at cost 1, 2 scanned at cost 0.
    pub(super) scanned: Vec<u8>,
}

impl PathSearch {
    pub(super) fn new(node_count: usize, queue_count: usize) -> Self {
        PathSearch { dist: vec![u64::MAX; node_count], via: vec![None; node_count], scanned: vec![0; queue_count] }
    }

    pub(super) fn reset(&mut self) {
        self.dist.fill(u64::MAX);
        self.via.fill(None);
        self.scanned.fill(0);
    }

    /// Moves one slot away from `start` along the cheapest alternating path to a node
    /// that `room` accepts; returns that node.
    pub(super) fn push_slot(&mut self, queues: &mut [QueueWork<'_>], member: &[Vec<(usize, usize)>], start: usize, room: impl Fn(usize) -> bool) -> Option<usize> {
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
    pub(super) fn pull_slot(&mut self, queues: &mut [QueueWork<'_>], member: &[Vec<(usize, usize)>], end: usize, spare: impl Fn(usize) -> bool) -> Option<usize> {
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
