//! Every coordinator instance's local copy of the cluster's keys, kept by one
//! list-then-watch of the cluster prefix. The leader's reconciler plans from it, and the
//! admin API (on leader and standbys alike) answers reads and streams events from it.
//!
//! Events are derived from the changes: nodes joining and leaving, slices assigned,
//! claimed, released (the owner let go while assigned elsewhere) or orphaned (the claim
//! vanished while its owner was still assigned it: a crash or a fence), leader changes,
//! and alerts ([`crate::health`]): raised once when a condition begins, cleared when it
//! ends. Alerts are checked within [`ALERT_CHECK`] of a change of nodes, queues, claims
//! or cordons (a refusal shows at once), and every [`FIGURES_CHECK`] for the runners'
//! figures (which they republish every 5 s).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, KeyValue};
use qslice_proto::admin::{event::Kind, Event};
use qslice_proto::keys::{Key, Keys};
use qslice_proto::records::{Assignment, Claim, QueueConfig, Record};
use qslice_common::etcd::{PrefixUpdate, PrefixWatch};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

pub use crate::health::IDLE_ALERT_AFTER;
use crate::health::{active_alerts, AlertKey, AlertSettings};
use crate::planner::SliceKey;
use crate::view::{ClusterView, Stored};

/// How soon after a change of nodes, queues, claims or cordons the alerts are checked
/// (changes in a burst are checked once; a full decode of a large cluster is not free).
pub const ALERT_CHECK: Duration = Duration::from_millis(250);
/// How often the alerts are checked anyway, for the runners' figures and ages that grow.
pub const FIGURES_CHECK: Duration = Duration::from_secs(5);

/// The local copy of the cluster and its event stream.
pub struct ClusterCache {
    keys: Keys,
    store: RwLock<BTreeMap<Vec<u8>, Stored>>,
    /// The highest mod revision applied to `store` (written under its lock).
    revision: std::sync::atomic::AtomicI64,
    /// Bumped on every change that can alter the plan (not on runners' figures).
    version: watch::Sender<u64>,
    events: broadcast::Sender<Event>,
    /// When each slice lost its claim.
    unowned_since: Mutex<BTreeMap<SliceKey, SystemTime>>,
    /// The leader as last seen (lowest create revision among election keys).
    leader: Mutex<Option<String>>,
    /// The alerts' thresholds.
    settings: AlertSettings,
    /// Alerts raised and not cleared yet, so each is raised once per episode.
    alerted: Mutex<BTreeSet<AlertKey>>,
    /// Something changed that can start or end an alert since the last check.
    alerts_dirty: AtomicBool,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// An event of `kind` stamped now.
pub fn event(kind: Kind) -> Event {
    Event { kind: kind as i32, time_unix_ms: now_ms(), ..Event::default() }
}

impl ClusterCache {
    /// An empty cache of cluster `keys`, alerting at the default thresholds.
    pub fn new(keys: Keys) -> ClusterCache {
        ClusterCache::with_alerts(keys, AlertSettings::default())
    }

    /// An empty cache of cluster `keys`, alerting at `settings`.
    pub fn with_alerts(keys: Keys, settings: AlertSettings) -> ClusterCache {
        ClusterCache {
            keys,
            store: RwLock::new(BTreeMap::new()),
            revision: std::sync::atomic::AtomicI64::new(0),
            version: watch::channel(0).0,
            events: broadcast::channel(4096).0,
            unowned_since: Mutex::new(BTreeMap::new()),
            leader: Mutex::new(None),
            settings,
            alerted: Mutex::new(BTreeSet::new()),
            alerts_dirty: AtomicBool::new(false),
        }
    }

    /// Keeps the cache current until `shutdown`, and raises and clears alerts.
    pub async fn run(&self, client: Client, shutdown: CancellationToken) {
        let mut watch = PrefixWatch::new(client, self.keys.root().to_owned());
        let mut soon = tokio::time::interval(ALERT_CHECK);
        soon.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut figures = tokio::time::interval(FIGURES_CHECK);
        figures.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                update = watch.next() => self.apply(update),
                _ = soon.tick() => {
                    if self.alerts_dirty.swap(false, Ordering::SeqCst) {
                        self.check_alerts();
                    }
                }
                _ = figures.tick() => self.check_alerts(),
            }
        }
    }

    /// The alerts' thresholds.
    pub fn alert_settings(&self) -> AlertSettings {
        self.settings
    }

    /// A receiver that changes whenever the plan may have to change; 0 until first listed.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// The event stream.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Publishes an event (the leader's fences and alerts).
    pub fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Whether the first listing has arrived.
    pub fn is_listed(&self) -> bool {
        *self.version.borrow() > 0
    }

    /// A decoded snapshot.
    pub fn view(&self) -> ClusterView {
        let store = self.store.read().expect("store lock");
        let mut view = ClusterView::from_store(&self.keys, store.iter());
        view.revision = self.revision.load(Ordering::SeqCst);
        view
    }

    /// The current leader's id, if any.
    pub fn leader(&self) -> Option<String> {
        self.leader.lock().expect("leader lock").clone()
    }

    /// Seconds since `slice` lost its claim, if it has none now.
    pub fn unowned_for(&self, slice: &SliceKey) -> Option<f64> {
        let since = *self.unowned_since.lock().expect("unowned lock").get(slice)?;
        Some(SystemTime::now().duration_since(since).map(|d| d.as_secs_f64()).unwrap_or(0.0))
    }

    fn apply(&self, update: PrefixUpdate) {
        let stored = |kv: &KeyValue| Stored { value: kv.value().to_vec(), create_revision: kv.create_revision(), lease: kv.lease() };
        let relevant = match update {
            PrefixUpdate::Snapshot(kvs) => {
                let new: BTreeMap<Vec<u8>, Stored> = kvs.iter().map(|kv| (kv.key().to_vec(), stored(kv))).collect();
                // Slices of known queues without a claim count as unowned from now on.
                {
                    let mut store = self.store.write().expect("store lock");
                    *store = new;
                    let newest = kvs.iter().map(KeyValue::mod_revision).max().unwrap_or(0);
                    self.revision.fetch_max(newest, Ordering::SeqCst);
                }
                let view = self.view();
                let mut unowned = self.unowned_since.lock().expect("unowned lock");
                unowned.retain(|k, _| !view.claims.contains_key(k));
                for (name, q) in &view.queues {
                    for s in 0..q.slices {
                        let k = (name.clone(), s);
                        if !view.claims.contains_key(&k) {
                            unowned.entry(k).or_insert_with(SystemTime::now);
                        }
                    }
                }
                drop(unowned);
                self.update_leader();
                true
            }
            PrefixUpdate::Put(kv) => {
                let old = {
                    let mut store = self.store.write().expect("store lock");
                    self.revision.fetch_max(kv.mod_revision(), Ordering::SeqCst);
                    store.insert(kv.key().to_vec(), stored(&kv))
                };
                self.derive(&kv, old.as_ref(), true)
            }
            PrefixUpdate::Delete(kv) => {
                let old = {
                    let mut store = self.store.write().expect("store lock");
                    self.revision.fetch_max(kv.mod_revision(), Ordering::SeqCst);
                    store.remove(kv.key())
                };
                self.derive(&kv, old.as_ref(), false)
            }
        };
        if relevant {
            self.alerts_dirty.store(true, Ordering::SeqCst);
            self.version.send_modify(|v| *v += 1);
        }
    }

    /// Emits the events one change means; true when it can alter the plan.
    fn derive(&self, kv: &KeyValue, old: Option<&Stored>, put: bool) -> bool {
        let Some(key) = self.keys.parse(kv.key()) else { return false };
        match key {
            Key::Node { node } => {
                if put && old.is_none() {
                    self.emit(Event { node, ..event(Kind::NodeJoined) });
                } else if !put {
                    self.emit(Event { node, message: "its lease ended (stopped, crashed or fenced)".into(), ..event(Kind::NodeLeft) });
                }
            }
            Key::Assignment { node, queue } => {
                let before: BTreeSet<u32> = old.and_then(|o| Assignment::decode(&o.value).ok()).map(|a| a.slices.iter().collect()).unwrap_or_default();
                if put {
                    if let Ok(a) = Assignment::decode(kv.value()) {
                        for s in a.slices.iter().filter(|s| !before.contains(s)) {
                            self.emit(Event { node: node.clone(), queue: queue.clone(), slice: s, ..event(Kind::SliceAssigned) });
                        }
                    }
                }
            }
            Key::Claim { queue, slice } => {
                let k = (queue.clone(), slice);
                if put {
                    self.unowned_since.lock().expect("unowned lock").remove(&k);
                    let node = Claim::decode(kv.value()).map(|c| c.node_id).unwrap_or_default();
                    self.emit(Event { node, queue, slice, epoch: kv.create_revision(), ..event(Kind::SliceClaimed) });
                } else {
                    self.unowned_since.lock().expect("unowned lock").insert(k, SystemTime::now());
                    let holder = old.and_then(|o| Claim::decode(&o.value).ok()).map(|c| c.node_id).unwrap_or_default();
                    let epoch = old.map(|o| o.create_revision).unwrap_or(0);
                    // Still assigned to the holder: it did not let go by itself.
                    let still_assigned = {
                        let store = self.store.read().expect("store lock");
                        store
                            .get(self.keys.assignment(&holder, &queue).as_bytes())
                            .and_then(|s| Assignment::decode(&s.value).ok())
                            .is_some_and(|a| a.slices.contains(slice))
                    };
                    let kind = if still_assigned { Kind::SliceOrphaned } else { Kind::SliceReleased };
                    self.emit(Event { node: holder, queue, slice, epoch, ..event(kind) });
                }
            }
            Key::Queue { queue } => self.track_unowned(&queue, put.then(|| QueueConfig::decode(kv.value()).ok()).flatten()),
            Key::Election => {
                self.update_leader();
                return false;
            }
            Key::Status { .. } | Key::Coordinator { .. } => return false,
            _ => {}
        }
        true
    }

    fn update_leader(&self) {
        let election = self.keys.election();
        let current = {
            let store = self.store.read().expect("store lock");
            store
                .iter()
                .filter(|(k, _)| k.starts_with(election.as_bytes()) && k.len() > election.len())
                .min_by_key(|(_, s)| s.create_revision)
                .map(|(_, s)| String::from_utf8_lossy(&s.value).into_owned())
        };
        let mut leader = self.leader.lock().expect("leader lock");
        if *leader != current {
            *leader = current.clone();
            if let Some(id) = current {
                self.emit(Event { node: id.clone(), message: format!("coordinator {id} leads"), ..event(Kind::LeaderChanged) });
            }
        }
    }

    /// Counts the slices of a queue that was created or resliced as unowned from now on
    /// (until claimed), and forgets the slices it no longer has.
    fn track_unowned(&self, queue: &str, config: Option<QueueConfig>) {
        let slices = config.map_or(0, |q| q.slices);
        let claimed: BTreeSet<u32> = {
            let store = self.store.read().expect("store lock");
            let prefix = self.keys.queue_claims_prefix(queue);
            store.range(prefix.clone().into_bytes()..).take_while(|(k, _)| k.starts_with(prefix.as_bytes())).filter_map(|(k, _)| match self.keys.parse(k) {
                Some(Key::Claim { slice, .. }) => Some(slice),
                _ => None,
            }).collect()
        };
        let mut unowned = self.unowned_since.lock().expect("unowned lock");
        unowned.retain(|(q, s), _| q != queue || *s < slices);
        for s in (0..slices).filter(|s| !claimed.contains(s)) {
            unowned.entry((queue.to_owned(), s)).or_insert_with(SystemTime::now);
        }
    }

    /// Raises an `ALERT` event for each condition that began since the last check and an
    /// `ALERT_CLEARED` for each that ended ([`crate::health::active_alerts`]).
    fn check_alerts(&self) {
        if !self.is_listed() {
            return;
        }
        let view = self.view();
        let now: BTreeMap<AlertKey, String> = active_alerts(&view, now_ms(), &self.settings).into_iter().map(|a| (a.key, a.message)).collect();
        let mut alerted = self.alerted.lock().expect("alerted lock");
        for (key, message) in &now {
            if alerted.insert(key.clone()) {
                let (queue, slice) = key.target();
                tracing::error!(%queue, slice, "alert: {message}");
                self.emit(Event { queue: queue.to_owned(), slice, whole_queue: key.whole_queue(), message: message.clone(), ..event(Kind::Alert) });
            }
        }
        let ended: Vec<AlertKey> = alerted.iter().filter(|k| !now.contains_key(*k)).cloned().collect();
        for key in ended {
            alerted.remove(&key);
            let (queue, slice) = key.target();
            let message = key.cleared_message(&self.settings);
            tracing::info!(%queue, slice, "alert over: {message}");
            self.emit(Event { queue: queue.to_owned(), slice, whole_queue: key.whole_queue(), message, ..event(Kind::AlertCleared) });
        }
    }
}
