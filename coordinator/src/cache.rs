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
//!
//! For the failover timeline it also remembers how each slice's last claim ended
//! ([`ClaimEnd`]): whether the holder's lease ended with it (the claim and the node record
//! went in one etcd revision) and that lease's granted TTL, asked of etcd when the node
//! joined, so the idle time can be counted from the dead node's last keepalive.

use qslice_common::lease::unix_ms;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime};

use etcd_client::{Client, KeyValue};
use qslice_common::etcd::{PrefixUpdate, PrefixWatch};
use qslice_proto::admin::{event::Kind, Event};
use qslice_proto::keys::{Key, Keys};
use qslice_proto::records::{Assignment, Claim, QueueConfig, Record};
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
    /// An operator's request (cordon, pin, move, maintenance, rebalance) changed since the
    /// leader last looked: it plans at once instead of after the burst debounce.
    operator_request: AtomicBool,
    /// How each slice's last claim ended, for the failover timeline.
    claim_ends: Mutex<BTreeMap<SliceKey, ClaimEnd>>,
    /// Granted TTL (seconds) of each live node's lease, as etcd reported it.
    lease_ttls: Mutex<BTreeMap<i64, i64>>,
    /// Leases of nodes that joined whose TTL `run` has yet to ask etcd for.
    leases_to_ask: Mutex<Vec<i64>>,
}

/// How a slice's claim ended, as this instance saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimEnd {
    /// The ended claim's epoch (its create revision).
    pub epoch: i64,
    /// The etcd revision of the deletion.
    pub revision: i64,
    /// When this instance saw the deletion (ms since the Unix epoch).
    pub at_unix_ms: i64,
    /// The lease the claim was attached to.
    pub lease: i64,
    /// Whether the holder's lease ended in the same revision (expired or revoked): the
    /// claim was not released by its owner.
    pub lease_ended: bool,
    /// The lease's granted TTL in ms, if etcd told it while the node was alive.
    pub lease_ttl_ms: Option<i64>,
}

/// An event of `kind` stamped now.
pub fn event(kind: Kind) -> Event {
    Event { kind: kind as i32, time_unix_ms: unix_ms(), ..Event::default() }
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
            operator_request: AtomicBool::new(false),
            claim_ends: Mutex::new(BTreeMap::new()),
            lease_ttls: Mutex::new(BTreeMap::new()),
            leases_to_ask: Mutex::new(Vec::new()),
        }
    }

    /// Keeps the cache current until `shutdown`, and raises and clears alerts.
    pub async fn run(&self, client: Client, shutdown: CancellationToken) {
        let mut watch = PrefixWatch::new(client.clone(), self.keys.root().to_owned());
        let mut soon = tokio::time::interval(ALERT_CHECK);
        soon.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut figures = tokio::time::interval(FIGURES_CHECK);
        figures.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Lease TTL answers come back here from tasks of their own, so a slow etcd never
        // holds up the watch.
        let (ttl_tx, mut ttl_rx) = tokio::sync::mpsc::unbounded_channel::<(i64, i64)>();
        loop {
            let asks: Vec<i64> = std::mem::take(&mut *self.leases_to_ask.lock().expect("ask lock"));
            for lease in asks {
                let (mut client, tx) = (client.clone(), ttl_tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(qslice_common::etcd::REQUEST_TIMEOUT, client.lease_time_to_live(lease, None)).await {
                        Ok(Ok(r)) if r.granted_ttl() > 0 => {
                            let _ = tx.send((lease, r.granted_ttl()));
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::debug!(lease, error = %e, "cannot read a node's lease TTL; its failovers show the time unowned only"),
                        Err(_) => tracing::debug!(lease, "reading a node's lease TTL timed out"),
                    }
                });
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                update = watch.next() => self.apply(update),
                Some((lease, ttl)) = ttl_rx.recv() => {
                    self.lease_ttls.lock().expect("ttl lock").insert(lease, ttl);
                }
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

    /// Whether an operator's request changed since the last call (see
    /// `operator_request`).
    pub fn take_operator_request(&self) -> bool {
        self.operator_request.swap(false, Ordering::SeqCst)
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

    /// The stored keys under `prefix` with their values and create revisions, for what the
    /// snapshot does not decode (the singletons' claims and slots).
    pub fn raw_under(&self, prefix: &str) -> BTreeMap<String, (Vec<u8>, i64)> {
        let store = self.store.read().expect("store lock");
        store
            .range(prefix.as_bytes().to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix.as_bytes()))
            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), (v.value.clone(), v.create_revision)))
            .collect()
    }

    /// The current leader's id, if any.
    pub fn leader(&self) -> Option<String> {
        self.leader.lock().expect("leader lock").clone()
    }

    /// How the claim of `slice` with `epoch` ended, if this instance saw it end.
    pub fn claim_end(&self, slice: &SliceKey, epoch: i64) -> Option<ClaimEnd> {
        self.claim_ends.lock().expect("claim end lock").get(slice).filter(|c| c.epoch == epoch).copied()
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
                self.leases_to_ask.lock().expect("ask lock").extend(view.nodes.values().map(|n| n.lease_id).filter(|l| *l != 0));
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
                if put && old.is_none_or(|o| o.lease != kv.lease()) && kv.lease() != 0 {
                    self.leases_to_ask.lock().expect("ask lock").push(kv.lease());
                }
                if put && old.is_none() {
                    self.emit(Event { node, ..event(Kind::NodeJoined) });
                } else if !put {
                    if let Some(lease) = old.map(|o| o.lease).filter(|l| *l != 0) {
                        // A lease's keys all go in one revision (etcd deletes them in key
                        // order, claims before nodes): those claims ended with the lease.
                        for end in self.claim_ends.lock().expect("claim end lock").values_mut() {
                            if end.lease == lease && end.revision == kv.mod_revision() {
                                end.lease_ended = true;
                            }
                        }
                        self.lease_ttls.lock().expect("ttl lock").remove(&lease);
                    }
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
                    self.unowned_since.lock().expect("unowned lock").insert(k.clone(), SystemTime::now());
                    let holder = old.and_then(|o| Claim::decode(&o.value).ok()).map(|c| c.node_id).unwrap_or_default();
                    let epoch = old.map(|o| o.create_revision).unwrap_or(0);
                    let lease = old.map(|o| o.lease).unwrap_or(0);
                    let end = ClaimEnd {
                        epoch,
                        revision: kv.mod_revision(),
                        at_unix_ms: unix_ms(),
                        lease,
                        lease_ended: false,
                        lease_ttl_ms: self.lease_ttls.lock().expect("ttl lock").get(&lease).map(|s| s * 1000),
                    };
                    self.claim_ends.lock().expect("claim end lock").insert(k, end);
                    // Still assigned to the holder: it did not let go by itself.
                    let still_assigned = {
                        let store = self.store.read().expect("store lock");
                        store.get(self.keys.assignment(&holder, &queue).as_bytes()).and_then(|s| Assignment::decode(&s.value).ok()).is_some_and(|a| a.slices.contains(slice))
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
            // A hold's end lets the held slice's owner claim it: no event of its own (the
            // claim brings one), but the leader's checks of unclaimed slices change.
            Key::Hold { .. } => {}
            Key::Cordon { .. } | Key::Pin { .. } | Key::Move { .. } | Key::Maintenance | Key::Rebalance => {
                self.operator_request.store(true, Ordering::SeqCst);
            }
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
            store
                .range(prefix.clone().into_bytes()..)
                .take_while(|(k, _)| k.starts_with(prefix.as_bytes()))
                .filter_map(|(k, _)| match self.keys.parse(k) {
                    Some(Key::Claim { slice, .. }) => Some(slice),
                    _ => None,
                })
                .collect()
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
        let now: BTreeMap<AlertKey, String> = active_alerts(&view, unix_ms(), &self.settings).into_iter().map(|a| (a.key, a.message)).collect();
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
