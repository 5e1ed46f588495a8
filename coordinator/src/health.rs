//! What needs an operator, derived from one [`ClusterView`]: queues no node may take,
//! slices whose entries wait with no owner, slices with a message in flight for too long.
//! Pure: the caller passes the time and the thresholds.
//!
//! Every instance (leader and standbys) derives the same answer from its own cluster
//! cache, so `GetStatus`, `/api/status` and the event stream agree wherever they are
//! asked. The cache turns the set of [`ActiveAlert`]s into events: an `ALERT` when a key
//! appears, an `ALERT_CLEARED` when it goes ([`AlertKey`] leaves out the figures that
//! change while the condition lasts, so an episode is raised once).

use std::fmt;
use std::time::Duration;

use qslice_proto::records::QueueConfig;

use crate::planner::{NodeSpec, SliceKey};
use crate::view::ClusterView;

/// Entries waiting this long in a slice with no owner raise an alert.
pub const IDLE_ALERT_AFTER: Duration = Duration::from_secs(60);

/// The default of the coordinator's `in_flight_alert_after`: a message in flight this
/// long raises an alert. The coordinator cannot know each runner's handler timeout; ten
/// minutes is beyond any sane one and well before an operator would notice otherwise.
pub const DEFAULT_IN_FLIGHT_ALERT_AFTER: Duration = Duration::from_secs(600);

/// The thresholds of the alerts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlertSettings {
    /// Waiting entries in an unowned slice older than this raise an alert.
    pub idle_after: Duration,
    /// An in-flight entry (`.bak`) older than this raises an alert.
    pub in_flight_after: Duration,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings { idle_after: IDLE_ALERT_AFTER, in_flight_after: DEFAULT_IN_FLIGHT_ALERT_AFTER }
    }
}

/// Why no live node may take an active queue's slices: each live node under the first
/// reason that applies to it (a node that refused the queue is listed as such whatever
/// else holds).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NoEligibleNode {
    /// Nodes that gave the queue up (`refused_queues` in their record).
    pub refused_by: Vec<String>,
    /// Cordoned nodes.
    pub cordoned: Vec<String>,
    /// Nodes of weight 0.
    pub weight_zero: Vec<String>,
    /// Nodes whose queue list leaves this queue out.
    pub serving_others: Vec<String>,
}

impl fmt::Display for NoEligibleNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let mut part = |what: &str, nodes: &[String]| {
            if !nodes.is_empty() {
                parts.push(format!("{what}{}", nodes.join(", ")));
            }
        };
        part("refused by ", &self.refused_by);
        part("cordoned: ", &self.cordoned);
        part("weight 0: ", &self.weight_zero);
        part("serving other queues: ", &self.serving_others);
        if parts.is_empty() {
            write!(f, "no eligible node (no live node)")
        } else {
            write!(f, "no eligible node ({})", parts.join("; "))
        }
    }
}

/// Why `queue` has no eligible node, or `None` when some live node may take it (or the
/// queue is paused: nothing is to run).
pub fn no_eligible_node(view: &ClusterView, queue: &QueueConfig) -> Option<NoEligibleNode> {
    if queue.paused {
        return None;
    }
    let mut why = NoEligibleNode::default();
    for n in view.nodes.values() {
        let spec = NodeSpec::from_record(n, view.cordons.contains(&n.node_id));
        if spec.eligible_for(&queue.name) {
            return None;
        }
        let id = n.node_id.clone();
        if spec.refused.iter().any(|q| q == &queue.name) {
            why.refused_by.push(id);
        } else if !spec.serves(&queue.name) {
            why.serving_others.push(id);
        } else if spec.cordoned {
            why.cordoned.push(id);
        } else {
            why.weight_zero.push(id);
        }
    }
    Some(why)
}

/// Live nodes that gave `queue` up, sorted.
pub fn refused_by(view: &ClusterView, queue: &str) -> Vec<String> {
    view.nodes.values().filter(|n| n.refused_queues.iter().any(|q| q == queue)).map(|n| n.node_id.clone()).collect()
}

/// A queue's state in words, as `qslicectl queues` shows it.
pub fn queue_state(view: &ClusterView, queue: &QueueConfig) -> String {
    if queue.paused {
        return "paused".to_owned();
    }
    if let Some(why) = no_eligible_node(view, queue) {
        return why.to_string();
    }
    let old = view.claims.iter().filter(|((q, _), c)| q == &queue.name && c.slices_total != queue.slices).count();
    let refused = refused_by(view, &queue.name);
    let mut state = if old > 0 { format!("reslicing ({old} old claims)") } else { "active".to_owned() };
    if !refused.is_empty() {
        state.push_str(&format!(" (refused by {})", refused.join(", ")));
    }
    state
}

/// What an alert is about; the same key while the condition lasts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AlertKey {
    /// An active queue no live node may take.
    NoEligibleNode(String),
    /// A slice whose entries wait too long with no owner.
    Idle(SliceKey),
    /// A slice with a message in flight for too long.
    InFlight(SliceKey),
}

/// One condition that needs an operator now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveAlert {
    /// What it is about.
    pub key: AlertKey,
    /// The sentence an operator reads.
    pub message: String,
}

impl AlertKey {
    /// The queue and slice an event about this alert carries (slice 0 for a queue alert).
    pub fn target(&self) -> (&str, u32) {
        match self {
            AlertKey::NoEligibleNode(q) => (q, 0),
            AlertKey::Idle((q, s)) | AlertKey::InFlight((q, s)) => (q, *s),
        }
    }

    /// Whether the alert is about a whole queue rather than one slice.
    pub fn whole_queue(&self) -> bool {
        matches!(self, AlertKey::NoEligibleNode(_))
    }

    /// The sentence of the event that says the condition ended.
    pub fn cleared_message(&self, settings: &AlertSettings) -> String {
        match self {
            AlertKey::NoEligibleNode(q) => format!("queue {q} has an eligible node again (or is paused or gone)"),
            AlertKey::Idle((q, s)) => format!("{q}/{s} no longer has old entries waiting without an owner"),
            AlertKey::InFlight((q, s)) => {
                format!("{q}/{s} has no message in flight for longer than {}", humantime::format_duration(settings.in_flight_after))
            }
        }
    }
}

/// A duration as an alert says it: `45 s`, `12 min`, `3 h`.
pub fn spoken_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

/// The age of a published figure now: the figure plus the time since it was listed
/// (figures are republished every few seconds; a clock behind the runner's counts 0).
pub fn aged(age_ms: u64, listed_unix_ms: i64, now_ms: i64) -> u64 {
    age_ms.saturating_add((now_ms - listed_unix_ms).max(0) as u64)
}

/// Every condition that needs an operator now, sorted by key.
pub fn active_alerts(view: &ClusterView, now_ms: i64, settings: &AlertSettings) -> Vec<ActiveAlert> {
    let mut out = Vec::new();
    for q in view.queues.values() {
        if let Some(why) = no_eligible_node(view, q) {
            let unowned = (0..q.slices).filter(|s| !view.claims.contains_key(&(q.name.clone(), *s))).count();
            let message = if unowned > 0 {
                format!("queue {} has {why}: {unowned} of {} slices have no owner", q.name, q.slices)
            } else {
                format!("queue {} has {why}: its slices stay with their holders, none can move", q.name)
            };
            out.push(ActiveAlert { key: AlertKey::NoEligibleNode(q.name.clone()), message });
        }
    }
    for ((queue, slice), (listed, f)) in view.slice_figures() {
        let k = (queue.clone(), slice);
        let claim = view.claims.get(&k);
        let idle_ms = aged(f.oldest_age_ms, listed, now_ms);
        if claim.is_none() && f.depth > 0 && idle_ms >= settings.idle_after.as_millis() as u64 {
            let message = format!("{queue}/{slice} has entries older than {} s and no owner", idle_ms / 1000);
            out.push(ActiveAlert { key: AlertKey::Idle(k.clone()), message });
        }
        if f.in_flight > 0 && f.oldest_in_flight_age_ms > 0 {
            let in_flight_ms = aged(f.oldest_in_flight_age_ms, listed, now_ms);
            if in_flight_ms >= settings.in_flight_after.as_millis() as u64 {
                let holder = claim.map(|c| format!(" (held by {})", c.node)).unwrap_or_default();
                let message = format!("{queue}/{slice} has a message in flight for {}{holder}", spoken_age(in_flight_ms));
                out.push(ActiveAlert { key: AlertKey::InFlight(k), message });
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// Whether `figures` (listed at `listed_unix_ms`) show a message in flight longer than
/// the threshold.
pub fn in_flight_too_long(in_flight: u64, oldest_in_flight_age_ms: u64, listed_unix_ms: i64, now_ms: i64, settings: &AlertSettings) -> bool {
    in_flight > 0 && oldest_in_flight_age_ms > 0 && aged(oldest_in_flight_age_ms, listed_unix_ms, now_ms) >= settings.in_flight_after.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use qslice_proto::keys::Keys;
    use qslice_proto::records::{Claim, Cordon, NodeRecord, Record, SliceFigures, SliceStatus, RECORD_VERSION};
    use uuid::Uuid;

    use super::*;
    use crate::view::Stored;

    const NOW: i64 = 1_800_000_000_000;

    struct Fixture {
        keys: Keys,
        store: BTreeMap<Vec<u8>, Stored>,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture { keys: Keys::new("t").expect("keys"), store: BTreeMap::new() }
        }
        fn put(&mut self, key: String, value: Vec<u8>) {
            self.store.insert(key.into_bytes(), Stored { value, create_revision: 5, lease: 0 });
        }
        fn queue(&mut self, name: &str, slices: u32) {
            let q = QueueConfig { v: RECORD_VERSION, name: name.into(), slices, paused: false, mailman3: false };
            self.put(self.keys.queue(name), q.encode());
        }
        fn node(&mut self, id: &str, queues: &[&str], refused: &[&str]) {
            let n = NodeRecord {
                v: RECORD_VERSION,
                node_id: id.into(),
                host: id.into(),
                pid: 1,
                incarnation: Uuid::nil(),
                weight: 1,
                queues: queues.iter().map(|q| q.to_string()).collect(),
                version: "0".into(),
                started_unix_ms: NOW,
                metrics_addr: None,
                lease_id: 1,
                refused_queues: refused.iter().map(|q| q.to_string()).collect(),
            };
            self.put(self.keys.node(id), n.encode());
        }
        fn claim(&mut self, queue: &str, slice: u32, node: &str) {
            let c = Claim { v: RECORD_VERSION, node_id: node.into(), incarnation: Uuid::nil(), slices_total: 4, claimed_unix_ms: NOW };
            self.put(self.keys.claim(queue, slice), c.encode());
        }
        fn figures(&mut self, node: &str, queue: &str, listed: i64, figures: Vec<SliceFigures>) {
            let st = SliceStatus { v: RECORD_VERSION, node_id: node.into(), queue: queue.into(), slices_total: 4, listed_unix_ms: listed, slices: figures };
            self.put(self.keys.status(node, queue), st.encode());
        }
        fn view(&self) -> ClusterView {
            ClusterView::from_store(&self.keys, &self.store)
        }
    }

    fn fig(slice: u32, depth: u64, oldest_age_ms: u64, in_flight: u64, oldest_in_flight_age_ms: u64) -> SliceFigures {
        SliceFigures { slice, depth, in_flight, oldest_age_ms, oldest_in_flight_age_ms }
    }

    #[test]
    fn a_queue_every_node_refused_has_no_eligible_node_and_names_the_refusers() {
        let mut fx = Fixture::new();
        fx.queue("in", 4);
        fx.queue("out", 4);
        fx.node("r1", &[], &["in"]);
        fx.node("r2", &[], &["in"]);
        fx.node("r3", &["out"], &[]);
        fx.put(fx.keys.cordon("r3"), Cordon { v: RECORD_VERSION, reason: String::new(), since_unix_ms: NOW }.encode());
        let view = fx.view();
        let why = no_eligible_node(&view, &view.queues["in"]).expect("nobody may take in");
        assert_eq!(why.refused_by, vec!["r1", "r2"]);
        assert_eq!(why.serving_others, vec!["r3"], "r3 serves only out");
        assert_eq!(queue_state(&view, &view.queues["in"]), "no eligible node (refused by r1, r2; serving other queues: r3)");
        assert_eq!(queue_state(&view, &view.queues["out"]), "active", "r1 and r2 serve every queue");
        let alerts = active_alerts(&view, NOW, &AlertSettings::default());
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].key, AlertKey::NoEligibleNode("in".into()));
        assert_eq!(alerts[0].message, "queue in has no eligible node (refused by r1, r2; serving other queues: r3): 4 of 4 slices have no owner");
    }

    #[test]
    fn one_node_left_that_may_take_the_queue_ends_the_condition_and_the_state_names_the_refuser() {
        let mut fx = Fixture::new();
        fx.queue("in", 4);
        fx.node("r1", &[], &["in"]);
        fx.node("r2", &[], &[]);
        let view = fx.view();
        assert_eq!(no_eligible_node(&view, &view.queues["in"]), None);
        assert_eq!(queue_state(&view, &view.queues["in"]), "active (refused by r1)");
        assert!(active_alerts(&view, NOW, &AlertSettings::default()).is_empty());
    }

    #[test]
    fn no_node_at_all_and_paused_queues() {
        let mut fx = Fixture::new();
        fx.queue("in", 2);
        let view = fx.view();
        assert_eq!(queue_state(&view, &view.queues["in"]), "no eligible node (no live node)");
        let mut q = view.queues["in"].clone();
        q.paused = true;
        assert_eq!(no_eligible_node(&view, &q), None, "a paused queue is meant to have no owner");
        assert_eq!(queue_state(&view, &q), "paused");
    }

    #[test]
    fn held_slices_of_a_queue_nobody_else_may_take_are_said_to_stay() {
        let mut fx = Fixture::new();
        fx.queue("in", 4);
        fx.node("r1", &[], &[]);
        fx.put(fx.keys.cordon("r1"), Cordon { v: RECORD_VERSION, reason: String::new(), since_unix_ms: NOW }.encode());
        for s in 0..4 {
            fx.claim("in", s, "r1");
        }
        let alerts = active_alerts(&fx.view(), NOW, &AlertSettings::default());
        assert_eq!(alerts[0].message, "queue in has no eligible node (cordoned: r1): its slices stay with their holders, none can move");
    }

    #[test]
    fn a_message_in_flight_beyond_the_threshold_is_an_alert_aged_since_the_listing() {
        let mut fx = Fixture::new();
        fx.queue("in", 4);
        fx.node("r1", &[], &[]);
        fx.claim("in", 2, "r1");
        // Listed 30 s ago with the .bak 11.5 min old: 12 min now. Slice 1's is young.
        fx.figures("r1", "in", NOW - 30_000, vec![fig(1, 0, 0, 1, 5_000), fig(2, 3, 1_000, 1, 690_000)]);
        let settings = AlertSettings::default();
        let alerts = active_alerts(&fx.view(), NOW, &settings);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].key, AlertKey::InFlight(("in".into(), 2)));
        assert_eq!(alerts[0].message, "in/2 has a message in flight for 12 min (held by r1)");
        assert!(in_flight_too_long(1, 690_000, NOW - 30_000, NOW, &settings));
        assert!(!in_flight_too_long(0, 690_000, NOW, NOW, &settings), "no .bak, no age");
        let short = AlertSettings { in_flight_after: Duration::from_secs(2), ..settings };
        let keys: Vec<AlertKey> = active_alerts(&fx.view(), NOW, &short).into_iter().map(|a| a.key).collect();
        assert_eq!(keys, vec![AlertKey::InFlight(("in".into(), 1)), AlertKey::InFlight(("in".into(), 2))]);
    }

    #[test]
    fn old_entries_without_an_owner_are_an_idle_alert_and_the_freshest_figures_count() {
        let mut fx = Fixture::new();
        fx.queue("in", 4);
        fx.node("r1", &[], &[]);
        fx.node("r2", &[], &[]);
        fx.figures("r1", "in", NOW - 1_000, vec![fig(3, 2, 61_000, 0, 0)]);
        // r2 listed slice 3 more recently and found it empty.
        fx.figures("r2", "in", NOW - 10, vec![fig(3, 0, 0, 0, 0)]);
        assert!(active_alerts(&fx.view(), NOW, &AlertSettings::default()).is_empty());
        fx.figures("r2", "in", NOW - 2_000, vec![fig(3, 0, 0, 0, 0)]);
        let alerts = active_alerts(&fx.view(), NOW, &AlertSettings::default());
        assert_eq!(alerts.iter().map(|a| a.message.as_str()).collect::<Vec<_>>(), vec!["in/3 has entries older than 62 s and no owner"]);
    }

    #[test]
    fn spoken_ages_round_down_to_their_unit() {
        assert_eq!(spoken_age(59_999), "59 s");
        assert_eq!(spoken_age(720_000), "12 min");
        assert_eq!(spoken_age(3 * 3_600_000 + 1), "3 h");
    }
}
