//! The last change of each slice's desired owner as this coordinator instance saw it,
//! for `ExplainSlice`: from where to where, when, and the planner's reason for it.
//!
//! Contract: the history is fed the cache's events in order ([`MoveHistory::observe`]);
//! it follows each slice's assignee, claim holder and the live nodes through them, so the
//! state it reasons from is the cluster as of each event. The reason is worked out the way
//! the planner decides it (`crate::planner` module doc): no earlier owner is a new slice,
//! a dead one an orphan, a pin or move request to the new owner a pin, an ineligible old
//! owner (cordon, refusal, weight 0, queue list) a drain, a live owner that held no claim
//! an unclaimed slice, else balance. Cordons, pins and eligibility are read from the
//! snapshot taken when the events are handled (they rarely change within one burst). The
//! history knows only what happened since it began ([`MoveHistory::since_unix_ms`]); the
//! leader's log has every move with the planner's own reason. Pure apart from the task
//! [`spawn`] starts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};

use qslice_proto::admin::{event::Kind, Event};

use crate::cache::ClusterCache;
use crate::planner::{MoveReason, NodeSpec, SliceKey};
use crate::view::ClusterView;

/// One change of a slice's desired owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenMove {
    /// When the new assignment was seen, ms since the Unix epoch.
    pub time_unix_ms: i64,
    /// The owner it left, if it had one.
    pub from: Option<String>,
    /// The new owner.
    pub to: String,
    /// Why, as worked out from the cluster then.
    pub reason: MoveReason,
}

/// What the history follows through the events.
#[derive(Debug, Default)]
struct State {
    /// Whether the state was seeded from a snapshot.
    seeded: bool,
    /// Each slice's assignee.
    owners: BTreeMap<SliceKey, String>,
    /// Each slice's claim holder.
    holders: BTreeMap<SliceKey, String>,
    /// Live node ids.
    live: BTreeSet<String>,
    /// The last move of each slice.
    last: BTreeMap<SliceKey, SeenMove>,
}

/// The moves seen by this instance; shared by the admin API and the task feeding it.
#[derive(Debug)]
pub struct MoveHistory {
    /// When the history began, ms since the Unix epoch.
    since_unix_ms: i64,
    /// Guarded state.
    state: Mutex<State>,
}

impl MoveHistory {
    /// An empty history that begins at `now_ms`.
    pub fn new(now_ms: i64) -> MoveHistory {
        MoveHistory { since_unix_ms: now_ms, state: Mutex::new(State::default()) }
    }

    /// When the history began: moves before it are unknown.
    pub fn since_unix_ms(&self) -> i64 {
        self.since_unix_ms
    }

    /// Takes the owners, holders and live nodes of `view` as the starting point (once).
    pub fn seed(&self, view: &ClusterView) {
        let mut st = self.state.lock().expect("history lock");
        if st.seeded {
            return;
        }
        st.seeded = true;
        st.owners = view.current_assignment();
        st.holders = view.claims.iter().map(|(k, c)| (k.clone(), c.node.clone())).collect();
        st.live = view.nodes.keys().cloned().collect();
    }

    /// Follows `events` (in the order the cache emitted them); `view` is a snapshot
    /// taken after them.
    pub fn observe(&self, events: &[Event], view: &ClusterView) {
        let mut st = self.state.lock().expect("history lock");
        for e in events {
            let k = (e.queue.clone(), e.slice);
            match Kind::try_from(e.kind) {
                Ok(Kind::NodeJoined) => {
                    st.live.insert(e.node.clone());
                }
                Ok(Kind::NodeLeft) => {
                    st.live.remove(&e.node);
                }
                Ok(Kind::SliceClaimed) => {
                    st.holders.insert(k, e.node.clone());
                }
                Ok(Kind::SliceReleased | Kind::SliceOrphaned) if st.holders.get(&k) == Some(&e.node) => {
                    st.holders.remove(&k);
                }
                Ok(Kind::SliceAssigned) => {
                    let from = st.owners.get(&k).cloned();
                    if from.as_deref() == Some(e.node.as_str()) {
                        continue;
                    }
                    let reason = infer_reason(view, &st.live, st.holders.get(&k).map(String::as_str), &k, from.as_deref(), &e.node);
                    st.owners.insert(k.clone(), e.node.clone());
                    st.last.insert(k, SeenMove { time_unix_ms: e.time_unix_ms, from, to: e.node.clone(), reason });
                }
                _ => {}
            }
        }
        // A slice the snapshot assigns to nobody (a paused or deleted queue, a dead
        // owner's slices with no eligible node) has no owner to move from any more.
        let current = view.current_assignment();
        st.owners.retain(|k, _| current.contains_key(k));
    }

    /// The last move of `slice` seen, if any.
    pub fn last_move(&self, slice: &SliceKey) -> Option<SeenMove> {
        self.state.lock().expect("history lock").last.get(slice).cloned()
    }
}

/// The planner's reason for giving `slice` to `to` after `from`: `live` and `holder` as of
/// the move, cordons, pins and eligibility from `view`.
pub fn infer_reason(view: &ClusterView, live: &BTreeSet<String>, holder: Option<&str>, slice: &SliceKey, from: Option<&str>, to: &str) -> MoveReason {
    let Some(from) = from else { return MoveReason::NewQueueSlice };
    if !live.contains(from) {
        return MoveReason::Orphaned;
    }
    if view.pins.get(slice).map(String::as_str) == Some(to) || view.moves.get(slice).map(String::as_str) == Some(to) {
        return MoveReason::Pinned;
    }
    let eligible = view.nodes.get(from).is_some_and(|n| NodeSpec::from_record(n, view.cordons.contains(from)).eligible_for(&slice.0));
    if !eligible {
        return MoveReason::NodeIneligible;
    }
    if holder != Some(from) {
        return MoveReason::Unclaimed;
    }
    MoveReason::Balance
}

/// Feeds `history` from `cache`'s events until the cache is gone: waits for the first
/// listing, seeds, then handles the events in bursts (one snapshot per burst).
pub fn spawn(history: Arc<MoveHistory>, cache: &Arc<ClusterCache>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    // Subscribe before seeding, so that no change falls between the two.
    let mut events = cache.subscribe_events();
    let mut changes = cache.subscribe_changes();
    let cache: Weak<ClusterCache> = Arc::downgrade(cache);
    runtime.spawn(async move {
        loop {
            match cache.upgrade() {
                Some(c) if c.is_listed() => {
                    history.seed(&c.view());
                    break;
                }
                Some(_) => {}
                None => return,
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
        loop {
            let first = match events.recv().await {
                Ok(e) => e,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let mut burst = vec![first];
            while let Ok(e) = events.try_recv() {
                burst.push(e);
            }
            let Some(c) = cache.upgrade() else { return };
            history.observe(&burst, &c.view());
        }
    });
}

#[cfg(test)]
mod tests {
    use qslice_proto::records::{Assignment, QueueConfig};

    use super::*;
    use crate::view::{test_node, ClaimView};

    /// Queue "in" (4 slices) on n1 (0, 1) and n2 (2, 3), every slice claimed by its owner.
    fn view() -> ClusterView {
        let mut v = ClusterView::default();
        v.queues.insert("in".into(), QueueConfig { v: 1, name: "in".into(), slices: 4, paused: false, mailman3: false });
        for (n, slices) in [("n1", [0, 1]), ("n2", [2, 3])] {
            v.nodes.insert(n.into(), test_node(n, 1));
            v.assignments.insert((n.into(), "in".into()), Assignment { v: 1, queue: "in".into(), slices_total: 4, slices: slices.into_iter().collect() });
            for s in slices {
                v.claims.insert(("in".into(), s), ClaimView { node: n.into(), epoch: 5, lease: 1, slices_total: 4 });
            }
        }
        v
    }

    fn ev(kind: Kind, at: i64, node: &str, slice: u32) -> Event {
        Event { kind: kind as i32, time_unix_ms: at, node: node.into(), queue: "in".into(), slice, ..Event::default() }
    }

    fn reassign(v: &mut ClusterView, slice: u32, from: &str, to: &str) {
        let drop_from = v.assignments.get_mut(&(from.to_owned(), "in".to_owned())).expect("from");
        drop_from.slices = drop_from.slices.iter().filter(|s| *s != slice).collect();
        v.assignments.entry((to.to_owned(), "in".to_owned())).or_insert(Assignment { v: 1, queue: "in".into(), slices_total: 4, slices: Default::default() }).slices.insert(slice);
    }

    #[test]
    fn a_dead_owners_slice_is_an_orphan_and_a_cordoned_owners_a_drain() {
        let h = MoveHistory::new(0);
        let mut v = view();
        h.seed(&v);
        assert_eq!(h.last_move(&("in".into(), 0)), None, "nothing seen yet");
        // n1 dies: its claims go, then its node record, then n2 is assigned its slices.
        v.nodes.remove("n1");
        v.claims.retain(|_, c| c.node != "n1");
        reassign(&mut v, 0, "n1", "n2");
        h.observe(&[ev(Kind::SliceOrphaned, 10, "n1", 0), ev(Kind::NodeLeft, 11, "n1", 0), ev(Kind::SliceAssigned, 12, "n2", 0)], &v);
        let seen = h.last_move(&("in".into(), 0)).expect("seen");
        assert_eq!((seen.from.as_deref(), seen.to.as_str(), seen.reason, seen.time_unix_ms), (Some("n1"), "n2", MoveReason::Orphaned, 12));

        // n3 joins; n2 is cordoned and hands slice 2 to n3 while still holding it.
        v.nodes.insert("n3".into(), test_node("n3", 1));
        v.cordons.insert("n2".into());
        reassign(&mut v, 2, "n2", "n3");
        h.observe(&[ev(Kind::NodeJoined, 20, "n3", 0), ev(Kind::SliceAssigned, 21, "n3", 2)], &v);
        assert_eq!(h.last_move(&("in".into(), 2)).map(|m| m.reason), Some(MoveReason::NodeIneligible));
    }

    #[test]
    fn reasons_follow_the_planner_pins_balance_unclaimed_and_new_slices() {
        let mut v = view();
        let live: BTreeSet<String> = v.nodes.keys().cloned().collect();
        let k = ("in".to_owned(), 1);
        assert_eq!(infer_reason(&v, &live, Some("n1"), &k, None, "n2"), MoveReason::NewQueueSlice);
        assert_eq!(infer_reason(&v, &live, Some("n1"), &k, Some("n1"), "n2"), MoveReason::Balance, "a live eligible holder gives a slice up for balance");
        assert_eq!(infer_reason(&v, &live, None, &k, Some("n1"), "n2"), MoveReason::Unclaimed, "assigned but never claimed");
        v.pins.insert(k.clone(), "n2".into());
        assert_eq!(infer_reason(&v, &live, Some("n1"), &k, Some("n1"), "n2"), MoveReason::Pinned);
        v.pins.clear();
        v.nodes.get_mut("n1").expect("n1").refused_queues.push("in".into());
        assert_eq!(infer_reason(&v, &live, Some("n1"), &k, Some("n1"), "n2"), MoveReason::NodeIneligible, "a refusal is a drain");
    }

    #[test]
    fn a_paused_queues_slices_come_back_as_new_slices() {
        let h = MoveHistory::new(0);
        let mut v = view();
        h.seed(&v);
        // Paused: the assignment goes, the owners release.
        let before = std::mem::take(&mut v.assignments);
        v.claims.clear();
        h.observe(&[ev(Kind::SliceReleased, 5, "n1", 0)], &v);
        // Resumed: slice 0 goes to n2.
        v.assignments = before;
        reassign(&mut v, 0, "n1", "n2");
        h.observe(&[ev(Kind::SliceAssigned, 9, "n2", 0)], &v);
        let seen = h.last_move(&("in".into(), 0)).expect("seen");
        assert_eq!((seen.from, seen.reason), (None, MoveReason::NewQueueSlice));
    }
}
