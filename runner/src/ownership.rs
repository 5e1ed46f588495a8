//! The ownership state machine of one incarnation, as plain data: what the leader assigned
//! to this node (desired), the claims it holds (held), the queues it gave up (refused), and
//! [`plan`], the pure diff of desired against held that says what to claim and what to
//! release. The incarnation's watch loop executes the actions; nothing here does I/O.
//!
//! Only this incarnation's own claims are adopted (a claim request whose answer was lost,
//! see [`crate::claims`]): a claim this node held in an earlier incarnation is another
//! holder's, and is claimed again only once etcd deletes it (release or lease expiry).
//!
//! The reslice barrier, runner side: a slice is claimed only under the slice count of its
//! queue's configuration record (or when the queue has none), and only once the records
//! were listed; the claim transaction checks that the record did not change since.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

/// How long a queue stays refused on a node after its supervised runners kept crashing,
/// the first time; each refusal after doubles it, up to [`REFUSE_COOLDOWN_MAX`]. A change
/// of the Mailman configuration file lifts it at once.
pub const REFUSE_COOLDOWN: Duration = Duration::from_secs(30);
/// The longest crash refusal.
pub const REFUSE_COOLDOWN_MAX: Duration = Duration::from_secs(600);

/// One slice of one queue.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SliceId {
    /// The queue.
    pub queue: String,
    /// The slice number, below the queue's slice count.
    pub slice: u32,
}

impl SliceId {
    /// Slice `slice` of `queue`.
    pub fn new(queue: &str, slice: u32) -> SliceId {
        SliceId { queue: queue.to_owned(), slice }
    }
}

/// A queue cut into a given number of slices: the processing loop of a queue is per slice
/// count, so that a reslice never mixes the numbering of two counts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlicedQueue {
    /// The queue.
    pub queue: String,
    /// The slice count.
    pub slices_total: u32,
}

/// Some slices of one queue, numbered for one slice count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueSlices {
    /// The slice count the numbers refer to.
    pub slices_total: u32,
    /// The slices.
    pub slices: BTreeSet<u32>,
}

/// What the leader assigned to this node, per queue.
pub type Desired = BTreeMap<String, QueueSlices>;

/// A claim this incarnation holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldClaim {
    /// The slice count the claim was made for.
    pub slices_total: u32,
    /// The claim's create revision: the slice's epoch (fencing token).
    pub epoch: i64,
}

/// The claims this incarnation holds, including those being released.
pub type Held = BTreeMap<SliceId, HeldClaim>;

/// A slice just claimed, with its epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimedSlice {
    /// The slice number.
    pub slice: u32,
    /// The new claim's epoch.
    pub epoch: i64,
}

/// Why and until when this node gave a queue up.
#[derive(Clone, Debug)]
pub struct Refusal {
    /// The cause, as published in the log.
    pub reason: String,
    /// Crashes: given up until then, or until the Mailman configuration file changes.
    /// Configuration (the slice count does not suit the flavour): `None`, lifted as soon as
    /// the check passes again.
    pub until: Option<Instant>,
    /// The Mailman configuration file's modification time when the queue was given up.
    pub config_stamp: Option<std::time::SystemTime>,
}

impl Refusal {
    /// Whether the queue is still refused at `now`.
    pub fn in_force(&self, now: Instant) -> bool {
        self.until.is_none_or(|until| now < until)
    }

    /// Whether the refusal ends at `now`: a crash refusal when its cooldown is over or the
    /// Mailman configuration file changed, a configuration refusal when the check passes.
    /// Each closure is called only when its answer decides (they look at files).
    pub fn lifted(&self, now: Instant, config_changed: impl FnOnce() -> bool, check_passes: impl FnOnce() -> bool) -> bool {
        match self.until {
            Some(until) => until <= now || config_changed(),
            None => check_passes(),
        }
    }
}

/// The cooldown of a queue's crash refusal after `earlier` crash refusals of it.
pub fn crash_cooldown(earlier: u32) -> Duration {
    (REFUSE_COOLDOWN * 2u32.saturating_pow(earlier)).min(REFUSE_COOLDOWN_MAX)
}

/// The slice counts of the queues' configuration records, once they were listed (`None`
/// before: nothing is claimed until the counts are known).
pub type QueueCounts<'a> = Option<&'a BTreeMap<String, u32>>;

/// Whether a slice of `queue` may be claimed under `slices_total`: the queues'
/// configurations were listed, and `queue`'s has this count (or `queue` has none).
pub fn count_agrees(counts: QueueCounts<'_>, queue: &str, slices_total: u32) -> bool {
    counts.is_some_and(|c| c.get(queue).is_none_or(|n| *n == slices_total))
}

/// Whether `queue` is refused at `now`.
pub fn is_refused(refused: &BTreeMap<String, Refusal>, queue: &str, now: Instant) -> bool {
    refused.get(queue).is_some_and(|r| r.in_force(now))
}

/// One step that brings what is held closer to what is desired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Stop processing the slice, let its in-flight work end, delete the claim.
    Release {
        /// The slice.
        slice: SliceId,
        /// The slice count it is held for.
        slices_total: u32,
    },
    /// Try to create the slice's claim.
    Claim {
        /// The slice.
        slice: SliceId,
        /// The slice count it is assigned for.
        slices_total: u32,
    },
}

/// The diff of desired against held at `now`: first every release, in slice order, then
/// every claim, in queue and slice order.
///
/// - A held slice is released when it is no longer desired for the slice count it is held
///   for (moved away, unassigned, or resliced), or when its queue is refused; a slice
///   already being released is left alone.
/// - A desired slice is claimed when no claim of that slice number is held (whatever its
///   slice count: a resliced slice is claimed again once its old claim is released), its
///   queue is not refused, and the assignment's slice count agrees with the queue's
///   configuration ([`count_agrees`]).
pub fn plan(desired: &Desired, held: &Held, releasing: &BTreeSet<SliceId>, refused: &BTreeMap<String, Refusal>, counts: QueueCounts<'_>, now: Instant) -> Vec<Action> {
    let wants = |id: &SliceId, total: u32| desired.get(&id.queue).is_some_and(|d| d.slices_total == total && d.slices.contains(&id.slice));
    let releases = held
        .iter()
        .filter(|(id, h)| !releasing.contains(*id) && (!wants(id, h.slices_total) || is_refused(refused, &id.queue, now)))
        .map(|(id, h)| Action::Release { slice: id.clone(), slices_total: h.slices_total });
    let claims = pending(desired, held, refused, counts, now).map(|(slice, slices_total)| Action::Claim { slice, slices_total });
    releases.chain(claims).collect()
}

/// Whether [`plan`] would claim anything: some desired slice of a queue that is not
/// refused, whose count agrees with the queue's configuration, is not held.
pub fn has_pending(desired: &Desired, held: &Held, refused: &BTreeMap<String, Refusal>, counts: QueueCounts<'_>, now: Instant) -> bool {
    pending(desired, held, refused, counts, now).next().is_some()
}

/// The desired slices to claim, with their slice counts.
fn pending<'a>(desired: &'a Desired, held: &'a Held, refused: &'a BTreeMap<String, Refusal>, counts: QueueCounts<'a>, now: Instant) -> impl Iterator<Item = (SliceId, u32)> + 'a {
    desired
        .iter()
        .filter(move |(queue, d)| !is_refused(refused, queue, now) && count_agrees(counts, queue, d.slices_total))
        .flat_map(|(queue, d)| d.slices.iter().map(move |s| (SliceId::new(queue, *s), d.slices_total)))
        .filter(|(id, _)| !held.contains_key(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assigned(entries: &[(&str, u32, &[u32])]) -> Desired {
        entries.iter().map(|(q, total, slices)| (q.to_string(), QueueSlices { slices_total: *total, slices: slices.iter().copied().collect() })).collect()
    }

    fn holding(entries: &[(&str, u32, u32)]) -> Held {
        entries.iter().enumerate().map(|(i, (q, s, total))| (SliceId::new(q, *s), HeldClaim { slices_total: *total, epoch: 100 + i as i64 })).collect()
    }

    fn claim(q: &str, s: u32, total: u32) -> Action {
        Action::Claim { slice: SliceId::new(q, s), slices_total: total }
    }

    fn release(q: &str, s: u32, total: u32) -> Action {
        Action::Release { slice: SliceId::new(q, s), slices_total: total }
    }

    fn refusal(until: Option<Instant>) -> Refusal {
        Refusal { reason: "runner kept crashing".into(), until, config_stamp: None }
    }

    fn none() -> BTreeMap<String, Refusal> {
        BTreeMap::new()
    }

    /// Queue configurations listed, none of these queues has a record.
    const NO_RECORDS: QueueCounts<'static> = Some(&BTreeMap::new());

    #[test]
    fn a_slice_is_claimed_only_under_its_queues_configured_count_once_the_configurations_are_listed() {
        let now = Instant::now();
        let desired = assigned(&[("in", 4, &[1]), ("out", 8, &[2])]);
        let records: BTreeMap<String, u32> = [("in".to_string(), 8), ("out".to_string(), 8)].into();
        // `in` is assigned under 4 while its record says 8 (a reslice the assignment has not caught up with).
        assert_eq!(plan(&desired, &Held::new(), &BTreeSet::new(), &none(), Some(&records), now), vec![claim("out", 2, 8)]);
        let out_held = holding(&[("out", 2, 8)]);
        assert!(!has_pending(&desired, &out_held, &none(), Some(&records), now), "a slice under another count is not pending");
        // Before the configurations are listed nothing is claimed; without a record, any count.
        assert_eq!(plan(&desired, &Held::new(), &BTreeSet::new(), &none(), None, now), vec![]);
        assert!(!has_pending(&desired, &Held::new(), &none(), None, now));
        assert_eq!(plan(&desired, &Held::new(), &BTreeSet::new(), &none(), NO_RECORDS, now), vec![claim("in", 1, 4), claim("out", 2, 8)]);
        // Held slices are still released as before, whatever the records say.
        let held = holding(&[("in", 3, 4)]);
        assert_eq!(plan(&desired, &held, &BTreeSet::new(), &none(), Some(&records), now), vec![release("in", 3, 4), claim("out", 2, 8)]);
        assert!(count_agrees(Some(&records), "in", 8) && !count_agrees(Some(&records), "in", 4) && !count_agrees(None, "x", 1));
    }

    #[test]
    fn newly_desired_slices_are_claimed_in_queue_and_slice_order() {
        let now = Instant::now();
        let desired = assigned(&[("out", 4, &[3, 1]), ("in", 8, &[5])]);
        let actions = plan(&desired, &Held::new(), &BTreeSet::new(), &none(), NO_RECORDS, now);
        assert_eq!(actions, vec![claim("in", 5, 8), claim("out", 1, 4), claim("out", 3, 4)]);
        assert!(has_pending(&desired, &Held::new(), &none(), NO_RECORDS, now));
    }

    #[test]
    fn slices_held_and_desired_are_kept() {
        let now = Instant::now();
        let desired = assigned(&[("in", 4, &[0, 2])]);
        let held = holding(&[("in", 0, 4), ("in", 2, 4)]);
        assert_eq!(plan(&desired, &held, &BTreeSet::new(), &none(), NO_RECORDS, now), vec![]);
        assert!(!has_pending(&desired, &held, &none(), NO_RECORDS, now));
    }

    #[test]
    fn slices_no_longer_desired_are_released_before_anything_is_claimed() {
        let now = Instant::now();
        let desired = assigned(&[("in", 4, &[0, 3])]);
        let held = holding(&[("in", 0, 4), ("in", 1, 4), ("out", 2, 4)]);
        let actions = plan(&desired, &held, &BTreeSet::new(), &none(), NO_RECORDS, now);
        // `out` has no assignment left (unassigned, or paused: a paused queue is assigned nothing).
        assert_eq!(actions, vec![release("in", 1, 4), release("out", 2, 4), claim("in", 3, 4)]);
    }

    #[test]
    fn an_empty_assignment_releases_the_whole_queue() {
        let now = Instant::now();
        let desired = assigned(&[("in", 4, &[])]);
        let held = holding(&[("in", 0, 4), ("in", 1, 4)]);
        assert_eq!(plan(&desired, &held, &BTreeSet::new(), &none(), NO_RECORDS, now), vec![release("in", 0, 4), release("in", 1, 4)]);
        assert!(!has_pending(&desired, &held, &none(), NO_RECORDS, now));
    }

    #[test]
    fn a_slice_being_released_is_neither_released_again_nor_claimed() {
        let now = Instant::now();
        let held = holding(&[("in", 1, 4)]);
        let releasing: BTreeSet<SliceId> = [SliceId::new("in", 1)].into();
        assert_eq!(plan(&Desired::new(), &held, &releasing, &none(), NO_RECORDS, now), vec![]);
        // Assigned here again while the release runs: claimed only once the release ended.
        let desired = assigned(&[("in", 4, &[1])]);
        assert_eq!(plan(&desired, &held, &releasing, &none(), NO_RECORDS, now), vec![]);
        assert!(!has_pending(&desired, &held, &none(), NO_RECORDS, now));
        assert_eq!(plan(&desired, &Held::new(), &BTreeSet::new(), &none(), NO_RECORDS, now), vec![claim("in", 1, 4)]);
    }

    #[test]
    fn a_reslice_releases_the_old_claim_then_claims_the_slice_for_the_new_count() {
        let now = Instant::now();
        let desired = assigned(&[("in", 8, &[3, 7])]);
        let held = holding(&[("in", 3, 4)]);
        // Slice 3 of 4 is held: it is released, and slice 3 of 8 waits for that.
        assert_eq!(plan(&desired, &held, &BTreeSet::new(), &none(), NO_RECORDS, now), vec![release("in", 3, 4), claim("in", 7, 8)]);
        let releasing: BTreeSet<SliceId> = [SliceId::new("in", 3)].into();
        assert_eq!(plan(&desired, &held, &releasing, &none(), NO_RECORDS, now), vec![claim("in", 7, 8)]);
        let after = holding(&[("in", 7, 8)]);
        assert_eq!(plan(&desired, &after, &BTreeSet::new(), &none(), NO_RECORDS, now), vec![claim("in", 3, 8)]);
    }

    #[test]
    fn a_refused_queue_is_released_and_not_claimed_while_the_refusal_is_in_force() {
        let now = Instant::now();
        let desired = assigned(&[("in", 4, &[0, 1]), ("out", 4, &[2])]);
        let held = holding(&[("in", 0, 4)]);
        for until in [None, Some(now + Duration::from_secs(30))] {
            let refused: BTreeMap<String, Refusal> = [("in".to_string(), refusal(until))].into();
            assert_eq!(plan(&desired, &held, &BTreeSet::new(), &refused, NO_RECORDS, now), vec![release("in", 0, 4), claim("out", 2, 4)]);
            let out_held = holding(&[("out", 2, 4)]);
            assert!(!has_pending(&desired, &out_held, &refused, NO_RECORDS, now), "a refused queue's slices are not pending");
        }
    }

    #[test]
    fn a_crash_refusal_whose_cooldown_is_over_no_longer_counts() {
        let now = Instant::now();
        let desired = assigned(&[("in", 4, &[0, 1])]);
        let held = holding(&[("in", 0, 4)]);
        let refused: BTreeMap<String, Refusal> = [("in".to_string(), refusal(Some(now)))].into();
        assert_eq!(plan(&desired, &held, &BTreeSet::new(), &refused, NO_RECORDS, now), vec![claim("in", 1, 4)]);
        assert!(is_refused(&refused, "in", now - Duration::from_millis(1)));
        assert!(!is_refused(&refused, "in", now));
    }

    #[test]
    fn a_crash_refusal_lifts_when_cooled_or_the_config_changed_and_a_config_refusal_when_fixed() {
        let now = Instant::now();
        let crash = refusal(Some(now + Duration::from_secs(1)));
        assert!(!crash.lifted(now, || false, || panic!("a crash refusal does not run the check")));
        assert!(crash.lifted(now, || true, || false));
        assert!(crash.lifted(now + Duration::from_secs(1), || panic!("cooled: the file is not looked at"), || false));
        let config = refusal(None);
        assert!(!config.lifted(now + Duration::from_secs(3600), || panic!("a config refusal ignores the file stamp"), || false));
        assert!(config.lifted(now, || false, || true));
    }

    #[test]
    fn crash_cooldowns_double_up_to_the_maximum() {
        assert_eq!(crash_cooldown(0), Duration::from_secs(30));
        assert_eq!(crash_cooldown(1), Duration::from_secs(60));
        assert_eq!(crash_cooldown(4), Duration::from_secs(480));
        assert_eq!(crash_cooldown(5), REFUSE_COOLDOWN_MAX);
        assert_eq!(crash_cooldown(40), REFUSE_COOLDOWN_MAX);
    }
}
