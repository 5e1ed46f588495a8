//! The leader's checks of the claims against the assignment, as plain data: which
//! assigned slices nobody claimed in time ([`Stalls`]), which claims no desired owner
//! explains ([`classify_claims`]), which queues' writes need the reslice barrier
//! ([`barrier_queues`]), and the clock all their deadlines are measured on
//! ([`LeaderClock`]). Pure: time comes in as an argument.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::planner::{NodeSpec, SliceKey};
use crate::view::ClusterView;

/// A leader's running time: time that passed while its process ran, not while it was
/// paused.
///
/// Why: the revoke deadline fences a runner for holding a moved slice too long, and a
/// deadline measured on the wall clock (or the monotonic clock, which runs on during a
/// SIGSTOP, a VM pause or a cgroup freeze) would count the leader's own pause against the
/// runner: a leader paused for longer than the deadline would revoke a runner the moment
/// it resumes, though the runner had only as much time as it had before the pause. So the
/// leader advances this clock once per reconcile round by the real time since the last
/// round, capped at [`LeaderClock::MAX_STEP`]: rounds run at least every second (the
/// resync tick), so a step longer than the cap is a pause (or a stall of the process), and
/// it counts as one capped step. A deadline on this clock can only be late, never early.
#[derive(Clone, Copy, Debug)]
pub struct LeaderClock {
    /// Running time accumulated so far.
    elapsed: Duration,
    /// When the clock last advanced.
    last: Instant,
}

impl LeaderClock {
    /// The longest step one round may add: twice the leader's resync interval (1 s), so a
    /// round delayed by a busy machine still counts in full.
    pub const MAX_STEP: Duration = Duration::from_secs(2);

    /// A clock at zero, started `now`.
    pub fn new(now: Instant) -> LeaderClock {
        LeaderClock { elapsed: Duration::ZERO, last: now }
    }

    /// Advances to `now` by at most [`LeaderClock::MAX_STEP`]; returns the running time.
    pub fn tick(&mut self, now: Instant) -> Duration {
        let step = now.saturating_duration_since(self.last).min(Self::MAX_STEP);
        self.elapsed += step;
        self.last = now;
        self.elapsed
    }

    /// The running time at the last tick.
    pub fn now(&self) -> Duration {
        self.elapsed
    }
}

/// Assigned slices that have no claim at all, since when (running time), and which of
/// them passed the claim deadline.
///
/// Only a slice with no claim at all counts: a planned move's new owner cannot claim
/// before the old owner releases (its drain may take a while, bounded by the revoke
/// deadline), so the clock of a slice starts when its last claim is gone.
///
/// A node that is claiming is not stalled: each new claim it makes restarts the clock of
/// every slice still waiting on it. A node given twenty slices at a cold start on a
/// loaded host claims them over a second or more (measured: the last claims 0.77 s after
/// the assignment, with a dozen Mailman processes initialising on two cores), and
/// taking its slices away while it works through them only moves the work and stops the
/// processes it has started. A node that claims nothing for the whole deadline is
/// stalled, as before.
#[derive(Debug, Default)]
pub struct Stalls {
    /// Slice -> (its assigned owner, since when it has been unclaimed).
    unclaimed_since: BTreeMap<SliceKey, (String, Duration)>,
    /// The claims seen at the last update (slice -> holder), to tell new claims.
    claimed: BTreeMap<SliceKey, String>,
    /// Node -> when it was last seen making a new claim.
    progress: BTreeMap<String, Duration>,
}

impl Stalls {
    /// Updates from a snapshot at running time `now`; returns the slices whose live owner
    /// has not claimed them for `deadline` or longer. Slices of paused queues and of queues
    /// being resliced are left out (nobody should claim them), as are slices assigned to a
    /// node that is not live (an orphan, taken over anyway) or that may no longer take the
    /// queue (it refused the queue, was cordoned, or dropped it from its list): such a
    /// node did not stall, and the plan moves its slices anyway, if any node may take
    /// them. A held slice (after a revoke) cannot be claimed until its hold ends, so its
    /// clock starts then.
    pub fn update(&mut self, view: &ClusterView, now: Duration, deadline: Duration) -> BTreeSet<SliceKey> {
        let reslicing = view.reslicing_queues();
        for (slice, claim) in &view.claims {
            if self.claimed.get(slice) != Some(&claim.node) {
                self.progress.insert(claim.node.clone(), now);
            }
        }
        self.claimed = view.claims.iter().map(|(slice, claim)| (slice.clone(), claim.node.clone())).collect();
        self.progress.retain(|node, _| view.nodes.contains_key(node));
        let mut next = BTreeMap::new();
        for (slice, owner) in view.current_assignment() {
            let active = view.queues.get(&slice.0).is_some_and(|q| !q.paused) && !reslicing.contains(&slice.0);
            if !active || !may_take(view, &owner, &slice.0) || view.claims.contains_key(&slice) || view.holds.contains_key(&slice) {
                continue;
            }
            let since = match self.unclaimed_since.get(&slice) {
                Some((o, since)) if *o == owner => *since,
                _ => now,
            };
            next.insert(slice, (owner, since));
        }
        self.unclaimed_since = next;
        self.unclaimed_since.iter().filter(|(_, (owner, since))| now.saturating_sub(self.clock_start(owner, *since)) >= deadline).map(|(k, _)| k.clone()).collect()
    }

    /// When the deadline of a slice waiting on `owner` since `since` started: at the
    /// owner's latest new claim if that came later.
    fn clock_start(&self, owner: &str, since: Duration) -> Duration {
        self.progress.get(owner).map_or(since, |p| since.max(*p))
    }

    /// The owner a slice is waiting on, if it is unclaimed.
    pub fn owner(&self, slice: &SliceKey) -> Option<&str> {
        self.unclaimed_since.get(slice).map(|(o, _)| o.as_str())
    }

    /// How long until the next unclaimed slice passes `deadline`, from running time `now`.
    pub fn next_due(&self, now: Duration, deadline: Duration) -> Option<Duration> {
        self.unclaimed_since.values().map(|(owner, since)| (self.clock_start(owner, *since) + deadline).saturating_sub(now)).filter(|d| !d.is_zero()).min()
    }
}

/// Whether `node` is live and may be given slices of `queue`, as the planner judges it.
fn may_take(view: &ClusterView, node: &str, queue: &str) -> bool {
    view.nodes.get(node).is_some_and(|n| NodeSpec::from_record(n, view.cordons.contains(node)).eligible_for(queue))
}

/// What a claim is, measured against the desired assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimState {
    /// The desired owner holds it, under the queue's slice count.
    Explained,
    /// A live node holds it on its current lease while the slice is desired elsewhere: a
    /// move in progress; the holder releases after its drain, or is fenced at the revoke
    /// deadline.
    Moving {
        /// The desired owner.
        to: String,
    },
    /// A live node holds it on its current lease though no assignment gives it the slice
    /// (a paused, resliced or deleted queue; a claim left by a release whose outcome the
    /// runner never learnt). Handled like a move: fenced at the revoke deadline.
    Unassigned,
    /// The holder is not a live node, or the claim hangs on another lease than the node's
    /// current one (an earlier incarnation still alive, or two processes with one node
    /// id). Nobody can be fenced safely for it: alerted only.
    UnknownHolder,
}

/// Classifies every claim of the snapshot against `desired` (slice -> owner).
pub fn classify_claims(view: &ClusterView, desired: &BTreeMap<SliceKey, String>) -> BTreeMap<SliceKey, ClaimState> {
    view.claims
        .iter()
        .map(|(slice, claim)| {
            let state = match view.nodes.get(&claim.node) {
                // A node record without a lease id (older runners) cannot be compared.
                Some(node) if node.lease_id == 0 || node.lease_id == claim.lease => {
                    let current_count = view.queues.get(&slice.0).is_some_and(|q| q.slices == claim.slices_total);
                    match desired.get(slice) {
                        Some(owner) if *owner == claim.node && current_count => ClaimState::Explained,
                        Some(owner) if *owner != claim.node => ClaimState::Moving { to: owner.clone() },
                        _ => ClaimState::Unassigned,
                    }
                }
                _ => ClaimState::UnknownHolder,
            };
            (slice.clone(), state)
        })
        .collect()
}

/// Queues whose assignment the round writes for the first time under their current slice
/// count (phase 2 of a reslice, or a new queue): their writes must not trust the snapshot's
/// claims, so the transaction also compares the queue's claims prefix against the
/// snapshot's revision. `written` are the queues the writes put an assignment for.
pub fn barrier_queues(view: &ClusterView, written: &BTreeSet<String>) -> BTreeSet<String> {
    let current = view.current_assignment();
    written.iter().filter(|q| view.queues.contains_key(*q) && !current.keys().any(|(cq, _)| cq == *q)).cloned().collect()
}

/// Whether a lease's remaining time says its holder missed a keepalive: runners renew every
/// TTL/3, so a live one has at least 2/3 of `granted` left (etcd reports whole seconds,
/// rounded down, hence the extra second). A lease that is gone (`remaining` < 0) is stale.
pub fn lease_is_stale(remaining: i64, granted: i64) -> bool {
    remaining < 0 || (remaining + 1) * 3 < granted * 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{test_node, ClaimView};
    use qslice_proto::records::{Assignment, QueueConfig};

    fn key(queue: &str, slice: u32) -> SliceKey {
        (queue.to_owned(), slice)
    }

    /// Queue "in" of 4 slices: n1 assigned 0 and 1, n2 assigned 2 and 3; n1 and n2 live
    /// (leases 1 and 2).
    fn view() -> ClusterView {
        let mut view = ClusterView::default();
        view.queues.insert("in".into(), QueueConfig { v: 1, name: "in".into(), slices: 4, paused: false, mailman3: false });
        view.nodes.insert("n1".into(), test_node("n1", 1));
        view.nodes.insert("n2".into(), test_node("n2", 2));
        view.assignments.insert(("n1".into(), "in".into()), Assignment { v: 1, queue: "in".into(), slices_total: 4, slices: [0, 1].into_iter().collect() });
        view.assignments.insert(("n2".into(), "in".into()), Assignment { v: 1, queue: "in".into(), slices_total: 4, slices: [2, 3].into_iter().collect() });
        view
    }

    fn claim(node: &str, lease: i64, total: u32) -> ClaimView {
        ClaimView { node: node.into(), epoch: 9, lease, slices_total: total }
    }

    #[test]
    fn only_slices_without_any_claim_stall_and_only_after_the_deadline() {
        let mut view = view();
        // in/0 claimed by its owner; in/2 still held by n1 (a move to n2 draining).
        view.claims.insert(key("in", 0), claim("n1", 1, 4));
        view.claims.insert(key("in", 2), claim("n1", 1, 4));
        let mut stalls = Stalls::default();
        let deadline = Duration::from_secs(1);
        assert!(stalls.update(&view, Duration::from_millis(0), deadline).is_empty());
        assert_eq!(stalls.next_due(Duration::from_millis(400), deadline), Some(Duration::from_millis(600)));
        let stalled = stalls.update(&view, Duration::from_millis(1000), deadline);
        assert_eq!(stalled, BTreeSet::from([key("in", 1), key("in", 3)]), "in/2 waits for n1's release, not for the deadline");
        // The old owner releases in/2: its clock starts now, not at the move.
        view.claims.remove(&key("in", 2));
        let stalled = stalls.update(&view, Duration::from_millis(1500), deadline);
        assert!(!stalled.contains(&key("in", 2)));
        assert!(stalls.update(&view, Duration::from_millis(2500), deadline).contains(&key("in", 2)));
        // A paused queue's slices never stall; nor do a dead owner's.
        view.queues.get_mut("in").expect("queue").paused = true;
        assert!(stalls.update(&view, Duration::from_secs(9), deadline).is_empty());
        view.queues.get_mut("in").expect("queue").paused = false;
        view.nodes.remove("n2");
        let stalled = stalls.update(&view, Duration::from_secs(10), deadline);
        assert!(stalled.iter().all(|(_, s)| *s < 2), "{stalled:?}");
    }

    #[test]
    fn a_node_that_may_no_longer_take_the_queue_did_not_stall() {
        // n1 refused queue in, n2 was cordoned: neither will claim, and neither stalled.
        let mut view = view();
        view.nodes.get_mut("n1").expect("n1").refused_queues.push("in".into());
        view.cordons.insert("n2".into());
        let mut stalls = Stalls::default();
        let deadline = Duration::from_millis(500);
        assert!(stalls.update(&view, Duration::ZERO, deadline).is_empty());
        assert!(stalls.update(&view, Duration::from_secs(5), deadline).is_empty(), "a refusal or a cordon is no stall");
        assert_eq!(stalls.next_due(Duration::from_secs(5), deadline), None);
        // The cordon lifted, n2's slices wait on it from then on; a held slice (after a
        // revoke) waits from the end of its hold.
        view.cordons.clear();
        view.holds.insert(key("in", 3), "n9".into());
        assert!(stalls.update(&view, Duration::from_secs(6), deadline).is_empty());
        assert_eq!(stalls.update(&view, Duration::from_millis(6500), deadline), BTreeSet::from([key("in", 2)]));
        view.holds.clear();
        assert_eq!(stalls.update(&view, Duration::from_millis(6600), deadline), BTreeSet::from([key("in", 2)]));
        assert_eq!(stalls.update(&view, Duration::from_millis(7100), deadline), BTreeSet::from([key("in", 2), key("in", 3)]));
    }

    #[test]
    fn a_node_that_keeps_claiming_is_not_stalled_and_one_that_stops_is() {
        let mut view = view();
        let mut stalls = Stalls::default();
        let deadline = Duration::from_millis(500);
        assert!(stalls.update(&view, Duration::from_millis(0), deadline).is_empty());
        // n1 claims in/0 at 400 ms: in/1, still waiting on n1, gets a full deadline from
        // there; n2 claimed nothing and its slices stall at 500 ms.
        view.claims.insert(key("in", 0), claim("n1", 1, 4));
        assert!(stalls.update(&view, Duration::from_millis(400), deadline).is_empty());
        assert_eq!(stalls.update(&view, Duration::from_millis(500), deadline), BTreeSet::from([key("in", 2), key("in", 3)]));
        assert_eq!(stalls.next_due(Duration::from_millis(600), deadline), Some(Duration::from_millis(300)));
        assert!(!stalls.update(&view, Duration::from_millis(800), deadline).contains(&key("in", 1)));
        // n1 then claims nothing more: in/1 stalls a deadline after its last claim.
        assert!(stalls.update(&view, Duration::from_millis(900), deadline).contains(&key("in", 1)));
    }

    #[test]
    fn claims_are_explained_moving_unassigned_or_of_an_unknown_holder() {
        let mut view = view();
        view.queues.insert("paused".into(), QueueConfig { v: 1, name: "paused".into(), slices: 2, paused: true, mailman3: false });
        view.claims.insert(key("in", 0), claim("n1", 1, 4));
        view.claims.insert(key("in", 1), claim("n2", 2, 4));
        view.claims.insert(key("paused", 0), claim("n1", 1, 2));
        view.claims.insert(key("in", 2), claim("gone", 7, 4));
        view.claims.insert(key("in", 3), claim("n2", 99, 4));
        let desired: BTreeMap<SliceKey, String> = view.current_assignment();
        let states = classify_claims(&view, &desired);
        assert_eq!(states[&key("in", 0)], ClaimState::Explained);
        assert_eq!(states[&key("in", 1)], ClaimState::Moving { to: "n1".into() });
        assert_eq!(states[&key("paused", 0)], ClaimState::Unassigned);
        assert_eq!(states[&key("in", 2)], ClaimState::UnknownHolder, "no such live node");
        assert_eq!(states[&key("in", 3)], ClaimState::UnknownHolder, "not n2's current lease");
    }

    #[test]
    fn only_queues_assigned_for_the_first_time_under_their_count_need_the_barrier() {
        let mut view = view();
        view.queues.insert("resliced".into(), QueueConfig { v: 1, name: "resliced".into(), slices: 8, paused: false, mailman3: false });
        view.assignments.insert(("n1".into(), "resliced".into()), Assignment { v: 1, queue: "resliced".into(), slices_total: 4, slices: (0..4).collect() });
        let written = BTreeSet::from(["in".to_owned(), "resliced".to_owned(), "deleted".to_owned()]);
        assert_eq!(barrier_queues(&view, &written), BTreeSet::from(["resliced".to_owned()]));
    }

    #[test]
    fn a_pause_counts_as_one_capped_step() {
        let start = Instant::now();
        let mut clock = LeaderClock::new(start);
        assert_eq!(clock.tick(start + Duration::from_millis(900)), Duration::from_millis(900));
        assert_eq!(clock.tick(start + Duration::from_secs(60)), Duration::from_millis(900) + LeaderClock::MAX_STEP);
        assert_eq!(clock.tick(start + Duration::from_secs(61)), Duration::from_millis(3900));
        assert_eq!(clock.now(), Duration::from_millis(3900));
    }

    #[test]
    fn a_lease_that_missed_a_keepalive_is_stale() {
        // TTL 2 s: renewed every 0.67 s, so a live lease shows 1 or 2 seconds left.
        assert!(!lease_is_stale(1, 2) && !lease_is_stale(2, 2));
        assert!(lease_is_stale(0, 2) && lease_is_stale(-1, 2));
        // TTL 5 s: a live lease shows 3 to 5.
        assert!(!lease_is_stale(3, 5) && lease_is_stale(2, 5));
    }
}
