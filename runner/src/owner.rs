//! The ownership state machine of one incarnation: watch this node's assignment, claim
//! assigned slices (create-if-absent, attached to the lease), recover their `.bak` entries,
//! process them, and release slices that move away.
//!
//! Rules that keep a slice single-owned:
//! - an entry is taken (`.pck` -> `.bak`) only while its slice is claimed, accepting, and
//!   the fence is valid; the check and the in-flight count change under one lock, so a
//!   release that sees no work in flight knows none can start;
//! - a released slice's claim is deleted only after its in-flight work ended (or was
//!   killed at the drain timeout, leaving `.bak` files for the next owner to recover);
//! - when the fence trips, every handler is killed at once and nothing more is touched.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use qslice_proto::keys::{Key, Keys};
use qslice_proto::records::{Assignment, Claim, QueueConfig, Record, SliceFigures, SliceStatus, RECORD_VERSION};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use qslice_common::etcd::{PrefixUpdate, PrefixWatch, REQUEST_TIMEOUT};
use crate::handler::{Handler, Job, Outcome};
use qslice_common::lease::{unix_ms, Incarnation};
use qslice_common::spool::{Dequeued, QueueDir, Scan};
use crate::mailman3::WarmPool;
use crate::supervise::{SuperviseConfig, Supervised, SupervisorExit};

/// How often pending claims are tried again while another holder still has them.
const CLAIM_RETRY: Duration = Duration::from_millis(100);
/// How long a released slice's worker coprocess may take to exit after its stdin closes.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a queue stays refused on a node after its supervised runners kept crashing,
/// the first time; each refusal after doubles it, up to [`REFUSE_COOLDOWN_MAX`]. A change
/// of the Mailman configuration file lifts it at once.
const REFUSE_COOLDOWN: Duration = Duration::from_secs(30);
/// The longest crash refusal.
const REFUSE_COOLDOWN_MAX: Duration = Duration::from_secs(600);
/// How often refusals are checked again (cooldown over, configuration changed or fixed).
const REFUSAL_CHECK: Duration = Duration::from_secs(1);
/// How often a runner publishes its slice figures to etcd.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// How an incarnation ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Shutdown was requested; every slice was released.
    Shutdown,
    /// The fence tripped; all work was stopped.
    Fenced,
}

/// What every part of the runner shares.
pub struct Shared {
    /// The configuration.
    pub cfg: Config,
    /// The cluster's keys.
    pub keys: Keys,
    /// The handler.
    pub handler: Handler,
    /// Bounds the entries in flight on this node.
    pub permits: Arc<Semaphore>,
    /// Warm Mailman 3 slice runners, per `mailman3` supervised queue.
    pub pools: BTreeMap<String, Arc<WarmPool>>,
}

/// One claimed slice.
struct SliceState {
    epoch: i64,
    accepting: bool,
    in_flight: usize,
    /// Kills this slice's handlers (a child of the incarnation's fence token).
    kill: CancellationToken,
}

/// The claimed slices of one queue and the loop that processes them.
struct QueueState {
    queue: String,
    slices_total: u32,
    dir: QueueDir,
    owned: Mutex<BTreeMap<u32, SliceState>>,
    changed: Notify,
}

type SliceKey = (String, u32);

/// Runs one incarnation until shutdown or fence.
pub async fn run_incarnation(client: Client, shared: Arc<Shared>, inc: &Incarnation, shutdown: &CancellationToken, ready: &std::sync::atomic::AtomicBool) -> Exit {
    let mut inc_run = IncarnationRun {
        client: client.clone(),
        shared: shared.clone(),
        lease_id: inc.lease_id,
        incarnation: inc.incarnation,
        fence: inc.fence.clone(),
        desired: BTreeMap::new(),
        held: BTreeMap::new(),
        releasing: BTreeSet::new(),
        queues: HashMap::new(),
        released_tx: mpsc::unbounded_channel().0,
        supervised: BTreeMap::new(),
        refused: BTreeMap::new(),
        queue_slices: BTreeMap::new(),
        supervised_view: Arc::default(),
        release_watches: BTreeMap::new(),
        freed_tx: mpsc::unbounded_channel().0,
        record: inc.record.clone(),
        gave_up_tx: mpsc::unbounded_channel().0,
        crash_refusals: BTreeMap::new(),
    };
    let (released_tx, mut released_rx) = mpsc::unbounded_channel();
    inc_run.released_tx = released_tx;
    let (gave_up_tx, mut gave_up_rx) = mpsc::unbounded_channel();
    inc_run.gave_up_tx = gave_up_tx;
    let (freed_tx, mut freed_rx) = mpsc::unbounded_channel();
    inc_run.freed_tx = freed_tx;
    let figures = (!shared.cfg.supervise.is_empty()).then(|| {
        tokio::spawn(supervised_figures(client.clone(), shared.clone(), inc.lease_id, inc.fence.clone(), inc_run.supervised_view.clone()))
    });
    let _figures = AbortOnDrop(figures);
    let node = shared.cfg.node_id.clone();
    let mut watch = PrefixWatch::new(client.clone(), shared.keys.node_assignments_prefix(&node));
    // The node record hangs on the lease: its deletion means the lease was revoked (the
    // leader fenced this node) or expired. Stop at once instead of at the next keepalive.
    let node_key = shared.keys.node(&node);
    let mut node_watch = PrefixWatch::new(client.clone(), node_key.clone());
    // Queue configurations: a refusal caused by a queue's slice count is lifted as soon
    // as the count is fixed, even after every slice of the queue left this node.
    let mut queue_watch = PrefixWatch::new(client, shared.keys.queues_prefix());
    let mut retry = tokio::time::interval(CLAIM_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refusal_check = tokio::time::interval(REFUSAL_CHECK);
    refusal_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hard = inc.fence.lost().clone();
    loop {
        tokio::select! {
            biased;
            _ = hard.cancelled() => {
                ready.store(false, std::sync::atomic::Ordering::SeqCst);
                inc_run.stop_all_queues();
                return Exit::Fenced;
            }
            _ = shutdown.cancelled() => {
                ready.store(false, std::sync::atomic::Ordering::SeqCst);
                inc_run.desired.clear();
                inc_run.reconcile().await;
                while !inc_run.held.is_empty() {
                    tokio::select! {
                        _ = hard.cancelled() => { inc_run.stop_all_queues(); return Exit::Fenced; }
                        Some(key) = released_rx.recv() => inc_run.on_released(key),
                    }
                }
                inc_run.stop_all_queues();
                return Exit::Shutdown;
            }
            update = watch.next() => {
                inc_run.apply(update);
                ready.store(true, std::sync::atomic::Ordering::SeqCst);
                inc_run.reconcile().await;
            }
            Some(key) = released_rx.recv() => {
                inc_run.on_released(key);
                inc_run.reconcile().await;
            }
            Some((key, epoch, reason, crashed)) = gave_up_rx.recv() => {
                inc_run.give_up(key, epoch, &reason, crashed).await;
                inc_run.reconcile().await;
            }
            update = node_watch.next() => {
                if let Some(reason) = node_record_lost(&update, node_key.as_bytes(), inc.lease_id) {
                    metrics::counter!("qslice_runner_fence_events_total").increment(1);
                    inc.fence.trip(reason);
                }
            }
            Some(key) = freed_rx.recv() => {
                inc_run.release_watches.remove(&key);
                inc_run.reconcile().await;
            }
            update = queue_watch.next() => {
                inc_run.apply_queue_configs(update);
                inc_run.reconcile().await;
            }
            _ = retry.tick(), if inc_run.has_pending() => inc_run.reconcile().await,
            _ = refusal_check.tick(), if !inc_run.refused.is_empty() => inc_run.reconcile().await,
        }
    }
}

struct IncarnationRun {
    client: Client,
    shared: Arc<Shared>,
    lease_id: i64,
    incarnation: uuid::Uuid,
    fence: Arc<qslice_common::lease::Fence>,
    /// What the leader assigned to this node: queue -> (slice count, slices).
    desired: BTreeMap<String, (u32, BTreeSet<u32>)>,
    /// Claims this incarnation holds, with their epochs (including those being released).
    held: BTreeMap<SliceKey, (u32, i64)>,
    releasing: BTreeSet<SliceKey>,
    queues: HashMap<(String, u32), (Arc<QueueState>, tokio::task::JoinHandle<()>)>,
    released_tx: mpsc::UnboundedSender<SliceKey>,
    /// Slices run by supervised Mailman runners.
    supervised: BTreeMap<SliceKey, SupervisedSlice>,
    /// Queues this node gave up, and until when.
    refused: BTreeMap<String, Refusal>,
    /// Each queue's slice count, from its configuration record.
    queue_slices: BTreeMap<String, u32>,
    /// The supervised slices held, per queue with its slice count, for their figures.
    supervised_view: Arc<Mutex<SupervisedView>>,
    /// Watches of claims held by others on slices assigned here: the slice is claimed the
    /// moment its claim is deleted (the retry tick is the fallback).
    release_watches: BTreeMap<SliceKey, CancellationToken>,
    freed_tx: mpsc::UnboundedSender<SliceKey>,
    /// The node record, to publish refusals in.
    record: Option<qslice_proto::records::NodeRecord>,
    /// Supervised slices given up: the slice, its epoch, why, and whether for crashes
    /// (a cooldown) or for the configuration (until the check passes); see [`Refusal`].
    gave_up_tx: mpsc::UnboundedSender<(SliceKey, i64, String, bool)>,
    /// Crash refusals so far per queue, for the cooldown's backoff.
    crash_refusals: BTreeMap<String, u32>,
}

/// Supervised slices held per queue: queue -> (slice count, slices).
type SupervisedView = BTreeMap<String, (u32, BTreeSet<u32>)>;

/// Aborts a task when dropped (the incarnation ended however it ended).
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// How often the figures of supervised queues are taken: the queue is listed by Mailman
/// itself, so this listing is only for status, metrics and alerts.
const SUPERVISED_FIGURES_EVERY: Duration = Duration::from_secs(1);

/// Lists each supervised queue this node holds slices of (one listing per queue) and
/// publishes its slices' figures, as the queue loop does for handled queues: the depth,
/// the oldest entry's age and the `.bak` files with their age, as metrics every pass and
/// to etcd every [`STATUS_INTERVAL`].
async fn supervised_figures(mut client: Client, shared: Arc<Shared>, lease_id: i64, fence: Arc<qslice_common::lease::Fence>, view: Arc<Mutex<SupervisedView>>) {
    let mut tick = tokio::time::interval(SUPERVISED_FIGURES_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = None::<tokio::time::Instant>;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = fence.lost().cancelled() => return,
        }
        let queues: Vec<(String, u32, Vec<u32>)> =
            view.lock().expect("supervised view").iter().map(|(q, (n, set))| (q.clone(), *n, set.iter().copied().collect())).collect();
        let publish = last_status.is_none_or(|t| t.elapsed() >= STATUS_INTERVAL);
        for (queue, total, owned) in queues.into_iter().filter(|(_, _, owned)| !owned.is_empty()) {
            let dir = QueueDir::new(&shared.cfg.spool, &queue);
            let listed = {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || dir.scan(total)).await
            };
            let Ok(Ok(scan)) = listed else { continue };
            publish_figures(&queue, total, &scan);
            if publish {
                publish_status(&mut client, &shared, &dir, &scan, &owned, lease_id).await;
            }
        }
        if publish {
            last_status = Some(tokio::time::Instant::now());
        }
    }
}

/// Why and until when this node gave a queue up.
struct Refusal {
    /// The cause, as published in the log.
    reason: String,
    /// Crashes: given up until then, or until the Mailman configuration file changes.
    /// Configuration (the slice count does not suit the flavour): `None`, lifted as soon as
    /// the check passes again.
    until: Option<tokio::time::Instant>,
    /// The Mailman configuration file's modification time when the queue was given up.
    config_stamp: Option<std::time::SystemTime>,
}

impl Refusal {
    fn in_force(&self, now: tokio::time::Instant) -> bool {
        self.until.is_none_or(|until| now < until)
    }
}

/// A slice run by a supervised child process.
struct SupervisedSlice {
    /// Ask for a quiet stop.
    quiet: CancellationToken,
    /// The supervisor; it ends once the child has exited.
    task: tokio::task::JoinHandle<SupervisorExit>,
}

impl IncarnationRun {
    fn apply(&mut self, update: PrefixUpdate) {
        let keys = &self.shared.keys;
        let set = |kv: &etcd_client::KeyValue, desired: &mut BTreeMap<String, (u32, BTreeSet<u32>)>| {
            let Some(Key::Assignment { queue, .. }) = keys.parse(kv.key()) else { return };
            if !self.shared.cfg.queues.is_empty() && !self.shared.cfg.queues.contains(&queue) {
                tracing::warn!(%queue, "assigned a queue this node is not configured to serve; ignoring it");
                return;
            }
            match Assignment::decode(kv.value()) {
                Ok(a) if a.queue == queue => {
                    let slices: BTreeSet<u32> = a.slices.iter().filter(|s| *s < a.slices_total).collect();
                    desired.insert(queue, (a.slices_total, slices));
                }
                Ok(a) => tracing::error!(key = %String::from_utf8_lossy(kv.key()), inner = %a.queue, "assignment names another queue than its key; ignoring it"),
                Err(e) => tracing::error!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable assignment; ignoring it"),
            }
        };
        match update {
            PrefixUpdate::Snapshot(kvs) => {
                let mut desired = BTreeMap::new();
                for kv in &kvs {
                    set(kv, &mut desired);
                }
                self.desired = desired;
            }
            PrefixUpdate::Put(kv) => {
                if let Some(Key::Assignment { queue, .. }) = keys.parse(kv.key()) {
                    self.desired.remove(&queue);
                }
                let mut desired = std::mem::take(&mut self.desired);
                set(&kv, &mut desired);
                self.desired = desired;
            }
            PrefixUpdate::Delete(kv) => {
                if let Some(Key::Assignment { queue, .. }) = keys.parse(kv.key()) {
                    self.desired.remove(&queue);
                }
            }
        }
    }

    /// Tells the figures task which supervised slices this node holds.
    fn sync_supervised_view(&self) {
        let mut view = SupervisedView::new();
        for key in self.supervised.keys() {
            if let Some((total, _)) = self.held.get(key) {
                view.entry(key.0.clone()).or_insert_with(|| (*total, BTreeSet::new())).1.insert(key.1);
            }
        }
        *self.supervised_view.lock().expect("supervised view") = view;
    }

    fn apply_queue_configs(&mut self, update: PrefixUpdate) {
        let keys = &self.shared.keys;
        let parse = |kv: &etcd_client::KeyValue| -> Option<(String, Option<u32>)> {
            let Some(Key::Queue { queue }) = keys.parse(kv.key()) else { return None };
            // An unreadable record says nothing about the count; the coordinator names it.
            let slices = QueueConfig::decode(kv.value()).ok().map(|c| c.slices);
            Some((queue, slices))
        };
        match update {
            PrefixUpdate::Snapshot(kvs) => {
                self.queue_slices = kvs.iter().filter_map(parse).filter_map(|(q, n)| Some((q, n?))).collect();
            }
            PrefixUpdate::Put(kv) => {
                if let Some((queue, slices)) = parse(&kv) {
                    match slices {
                        Some(n) => self.queue_slices.insert(queue, n),
                        None => self.queue_slices.remove(&queue),
                    };
                }
            }
            PrefixUpdate::Delete(kv) => {
                if let Some((queue, _)) = parse(&kv) {
                    self.queue_slices.remove(&queue);
                }
            }
        }
    }

    fn wants(&self, queue: &str, slice: u32, total: u32) -> bool {
        self.desired.get(queue).is_some_and(|(n, set)| *n == total && set.contains(&slice))
    }

    fn has_pending(&self) -> bool {
        self.desired
            .iter()
            .filter(|(q, _)| !self.is_refused(q))
            .any(|(q, (_, set))| set.iter().any(|s| !self.held.contains_key(&(q.clone(), *s))))
    }

    fn is_refused(&self, queue: &str) -> bool {
        self.refused.get(queue).is_some_and(|r| r.in_force(tokio::time::Instant::now()))
    }

    /// Gives up a queue: publishes it in the node record so that the leader moves its
    /// slices to other nodes, and releases what this node holds of it. `until` as in
    /// [`Refusal`].
    async fn refuse(&mut self, queue: &str, reason: &str, until: Option<tokio::time::Instant>) {
        if self.refused.get(queue).is_some_and(|r| r.in_force(tokio::time::Instant::now()) && r.reason == reason) {
            return;
        }
        match until {
            Some(until) => tracing::error!(%queue, %reason, cooldown = ?until.saturating_duration_since(tokio::time::Instant::now()), "alert: giving this queue up on this node so that another node takes its slices"),
            None => tracing::error!(%queue, %reason, "alert: giving this queue up on this node until its configuration is fixed"),
        }
        metrics::counter!("qslice_runner_queues_refused_total", "queue" => queue.to_owned()).increment(1);
        let config_stamp = self.config_stamp(queue);
        self.refused.insert(queue.to_owned(), Refusal { reason: reason.to_owned(), until, config_stamp });
        self.publish_refusals().await;
    }

    /// When the Mailman configuration file of a supervised queue last changed.
    fn config_stamp(&self, queue: &str) -> Option<std::time::SystemTime> {
        let sup = self.shared.cfg.supervise.get(queue)?;
        let path = sup.config.clone().or_else(|| crate::supervise::mailman3_target(&sup.command).map(|(p, _)| p))?;
        std::fs::metadata(path).and_then(|m| m.modified()).ok()
    }

    async fn publish_refusals(&mut self) {
        let now = tokio::time::Instant::now();
        self.refused.retain(|_, r| r.in_force(now));
        let Some(record) = self.record.as_mut() else { return };
        record.refused_queues = self.refused.keys().cloned().collect();
        let key = self.shared.keys.node(&self.shared.cfg.node_id);
        let put = self.client.put(key, record.encode(), Some(PutOptions::new().with_lease(self.lease_id)));
        match tokio::time::timeout(REQUEST_TIMEOUT, put).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot publish refused queues"),
            Err(_) => tracing::warn!("publishing refused queues timed out"),
        }
    }

    /// A supervised slice's runner crashed too often: release the slice, refuse its queue.
    async fn give_up(&mut self, key: SliceKey, epoch: i64, reason: &str, crashed: bool) {
        let until = crashed.then(|| {
            let n = self.crash_refusals.entry(key.0.clone()).or_insert(0);
            let cooldown = (REFUSE_COOLDOWN * 2u32.saturating_pow(*n)).min(REFUSE_COOLDOWN_MAX);
            *n += 1;
            tokio::time::Instant::now() + cooldown
        });
        self.supervised.remove(&key);
        self.sync_supervised_view();
        self.refuse(&key.0, reason, until).await;
        // The child has exited: the claim can go now.
        if let Err(e) = delete_claim(&mut self.client, &self.shared.keys, &key.0, key.1, epoch).await {
            tracing::warn!(queue = %key.0, slice = key.1, error = %e, "deleting the claim failed; it ends with the lease");
        }
        self.releasing.remove(&key);
        self.held.remove(&key);
        metrics::gauge!("qslice_runner_slices_claimed").set(self.held.len() as f64);
    }

    /// Releases what moved away, claims what is assigned and not held.
    async fn reconcile(&mut self) {
        let now = tokio::time::Instant::now();
        // A configuration refusal ends when the check passes: the queue's slice count was
        // fixed (or mailman.cfg, for `mailman3-runner`).
        let lifted: Vec<String> = self
            .refused
            .iter()
            .filter(|(q, r)| {
                let cooled = r.until.is_some_and(|until| until <= now);
                let changed = r.until.is_some() && self.config_stamp(q) != r.config_stamp;
                // The count the refusal was about: the queue's record, else the assignment's.
                let count = self.queue_slices.get(*q).copied().or_else(|| self.desired.get(*q).map(|(n, _)| *n));
                let fixed = r.until.is_none()
                    && count.is_some_and(|n| self.shared.cfg.supervise.get(*q).is_none_or(|sup| sup.check(q, Some(n)).is_ok()));
                cooled || changed || fixed
            })
            .map(|(q, _)| q.clone())
            .collect();
        if !lifted.is_empty() {
            for queue in &lifted {
                tracing::info!(%queue, "refusal lifted; this node takes the queue again");
                self.refused.remove(queue);
            }
            self.publish_refusals().await;
        }
        // A supervised queue's slice count must suit its flavour (a power of two for
        // Mailman 3; mailman.cfg's `instances` for `mailman3-runner`).
        let mismatched: Vec<(String, String)> = self
            .desired
            .iter()
            .map(|(q, (n, _))| (q, *n))
            .chain(self.queue_slices.iter().map(|(q, n)| (q, *n)))
            .filter_map(|(q, n)| {
                let sup = self.shared.cfg.supervise.get(q)?;
                sup.check(q, Some(n)).err().map(|e| (q.clone(), e.to_string()))
            })
            .collect();
        for (queue, error) in mismatched {
            self.refuse(&queue, &error, None).await;
        }
        let to_release: Vec<(SliceKey, u32)> = self
            .held
            .iter()
            // A refused queue's slices go too, without waiting for the leader to move them.
            .filter(|(k, (total, _))| !self.releasing.contains(*k) && (!self.wants(&k.0, k.1, *total) || self.is_refused(&k.0)))
            .map(|(k, (total, _))| (k.clone(), *total))
            .collect();
        for (key, total) in to_release {
            self.start_release(key, total);
        }
        let pending: Vec<(String, u32, u32)> = self
            .desired
            .iter()
            .flat_map(|(q, (n, set))| set.iter().map(move |s| (q.clone(), *s, *n)))
            .filter(|(q, s, _)| !self.held.contains_key(&(q.clone(), *s)) && !self.is_refused(q))
            .collect();
        // Warm a slice runner for each slice about to arrive, beside the spares: a planned
        // move's new owner warms up while the old owner finishes its message.
        for (queue, pool) in &self.shared.pools {
            let refused = self.is_refused(queue);
            pool.want(if refused { 0 } else { pending.iter().filter(|(q, _, _)| q == queue).count() });
        }
        // Watch only the claims of slices still waited for.
        self.release_watches.retain(|key, cancel| {
            let waited = pending.iter().any(|(q, s, _)| q == &key.0 && *s == key.1);
            if !waited {
                cancel.cancel();
            }
            waited
        });
        // Claim first, then recover each queue's newly claimed slices with one listing.
        let mut claimed: BTreeMap<(String, u32), Vec<(u32, i64)>> = BTreeMap::new();
        for (queue, slice, total) in pending {
            if !self.fence.is_valid() {
                return;
            }
            if let Some(epoch) = self.try_claim(&queue, slice, total).await {
                claimed.entry((queue, total)).or_default().push((slice, epoch));
            }
        }
        for ((queue, total), slices) in claimed {
            self.recover_and_start(queue, total, slices).await;
        }
    }

    /// Creates the claim key if absent; the epoch on success.
    async fn try_claim(&mut self, queue: &str, slice: u32, total: u32) -> Option<i64> {
        let key = self.shared.keys.claim(queue, slice);
        let claim = Claim {
            v: RECORD_VERSION,
            node_id: self.shared.cfg.node_id.clone(),
            incarnation: self.incarnation,
            slices_total: total,
            claimed_unix_ms: unix_ms(),
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), claim.encode(), Some(PutOptions::new().with_lease(self.lease_id)))]);
        let resp = match tokio::time::timeout(REQUEST_TIMEOUT, self.client.txn(txn)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                tracing::warn!(%queue, slice, error = %e, "claim failed; will retry");
                return None;
            }
            Err(_) => {
                tracing::warn!(%queue, slice, "claim timed out; will retry");
                return None;
            }
        };
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        if resp.succeeded() {
            if let Some(cancel) = self.release_watches.remove(&(queue.to_owned(), slice)) {
                cancel.cancel();
            }
            return Some(revision);
        }
        // Another holder still has it (a planned move waits for its release, a crash for
        // its lease to expire): watch for its deletion from here on.
        let slice_key = (queue.to_owned(), slice);
        if !self.release_watches.contains_key(&slice_key) {
            let cancel = self.fence.lost().child_token();
            self.release_watches.insert(slice_key.clone(), cancel.clone());
            tokio::spawn(watch_release(self.client.clone(), key, revision, cancel, self.freed_tx.clone(), slice_key));
        }
        None
    }

    /// Recovers the `.bak` entries of newly claimed slices of one queue (one listing for
    /// all of them), then starts processing them.
    async fn recover_and_start(&mut self, queue: String, total: u32, slices: Vec<(u32, i64)>) {
        if let Some(cfg) = self.shared.cfg.supervise.get(&queue).cloned() {
            // Mailman recovers its own slice's .bak files at start.
            for (slice, epoch) in slices {
                self.start_supervised(&queue, slice, total, epoch, cfg.clone());
            }
            metrics::gauge!("qslice_runner_slices_claimed").set(self.held.len() as f64);
            return;
        }
        let state = self.queue_state(&queue, total);
        let dir = state.dir.clone();
        let set: BTreeSet<u32> = slices.iter().map(|(s, _)| *s).collect();
        let fence = self.fence.clone();
        let recovery = tokio::task::spawn_blocking(move || dir.recover_while(total, |s| set.contains(&s), || fence.is_valid())).await;
        let failure = match recovery {
            Ok(Ok(report)) => {
                for (entry, count) in &report.requeued {
                    tracing::info!(%queue, slice = entry.slice, entry = %entry.name.filebase, recoveries = count, "recovered an in-flight entry of the previous owner");
                }
                for entry in &report.preserved {
                    tracing::warn!(%queue, slice = entry.slice, entry = %entry.name.filebase, "entry recovered three times; preserved in bad/");
                }
                for q in &report.quarantined {
                    tracing::warn!(%queue, from = %q.from.display(), to = %q.to.display(), reason = %q.reason, "quarantined");
                }
                None
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(error) = failure {
            tracing::error!(%queue, %error, "recovery of the claimed slices' .bak entries failed; releasing the claims to retry");
            for (slice, epoch) in slices {
                let _ = self.delete_claim(&queue, slice, epoch).await;
            }
            self.drop_idle_queues();
            return;
        }
        for (slice, epoch) in slices {
            self.held.insert((queue.clone(), slice), (total, epoch));
            state.owned.lock().expect("owned lock").insert(
                slice,
                SliceState { epoch, accepting: true, in_flight: 0, kill: self.fence.lost().child_token() },
            );
            tracing::info!(%queue, slice, epoch, "claimed slice");
        }
        state.changed.notify_waiters();
        metrics::gauge!("qslice_runner_slices_claimed").set(self.held.len() as f64);
    }

    async fn delete_claim(&mut self, queue: &str, slice: u32, epoch: i64) -> Result<(), etcd_client::Error> {
        delete_claim(&mut self.client, &self.shared.keys, queue, slice, epoch).await
    }

    fn queue_state(&mut self, queue: &str, total: u32) -> Arc<QueueState> {
        if let Some((state, _)) = self.queues.get(&(queue.to_owned(), total)) {
            return state.clone();
        }
        let state = Arc::new(QueueState {
            queue: queue.to_owned(),
            slices_total: total,
            dir: QueueDir::new(&self.shared.cfg.spool, queue),
            owned: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
        });
        let task = tokio::spawn(queue_loop(
            state.clone(),
            self.shared.clone(),
            self.fence.clone(),
            self.client.clone(),
            self.lease_id,
        ));
        self.queues.insert((queue.to_owned(), total), (state.clone(), task));
        state
    }

    fn start_supervised(&mut self, queue: &str, slice: u32, total: u32, epoch: i64, cfg: SuperviseConfig) {
        let supervised = Supervised {
            queue: queue.to_owned(),
            slice,
            slices: total,
            cfg,
            dir: QueueDir::new(&self.shared.cfg.spool, queue),
            epoch,
            node: self.shared.cfg.node_id.clone(),
            pool: self.shared.pools.get(queue).cloned(),
            fence: self.fence.clone(),
        };
        let quiet = CancellationToken::new();
        // A fence kills the child at once.
        let kill = self.fence.lost().child_token();
        let key: SliceKey = (queue.to_owned(), slice);
        let gave_up = self.gave_up_tx.clone();
        let task = {
            let (quiet, key) = (quiet.clone(), key.clone());
            tokio::spawn(async move {
                let exit = supervised.run(quiet, kill).await;
                match &exit {
                    SupervisorExit::GaveUp(reason) => {
                        let _ = gave_up.send((key, epoch, reason.clone(), true));
                    }
                    SupervisorExit::Refused(reason) => {
                        let _ = gave_up.send((key, epoch, reason.clone(), false));
                    }
                    SupervisorExit::Stopped | SupervisorExit::Killed => {}
                }
                exit
            })
        };
        self.held.insert(key.clone(), (total, epoch));
        self.supervised.insert(key, SupervisedSlice { quiet, task });
        self.sync_supervised_view();
        tracing::info!(%queue, slice, epoch, "claimed slice (supervised)");
    }

    fn start_release(&mut self, key: SliceKey, total: u32) {
        if let Some(sup) = self.supervised.remove(&key) {
            self.sync_supervised_view();
            self.releasing.insert(key.clone());
            let epoch = self.held.get(&key).map(|(_, e)| *e);
            let (mut client, keys, tx) = (self.client.clone(), self.shared.keys.clone(), self.released_tx.clone());
            tokio::spawn(async move {
                sup.quiet.cancel();
                // The claim goes only after the child has exited.
                let exit = sup.task.await;
                let (queue, slice) = key.clone();
                if let (Some(epoch), Ok(SupervisorExit::Stopped)) = (epoch, exit) {
                    match delete_claim(&mut client, &keys, &queue, slice, epoch).await {
                        Ok(()) => tracing::info!(%queue, slice, epoch, "released supervised slice"),
                        Err(e) => tracing::warn!(%queue, slice, error = %e, "deleting the claim failed; it ends with the lease"),
                    }
                }
                let _ = tx.send(key);
            });
            return;
        }
        let Some((state, _)) = self.queues.get(&(key.0.clone(), total)) else { return };
        self.releasing.insert(key.clone());
        let state = state.clone();
        let drain = self.shared.cfg.drain_timeout;
        let mut client = self.client.clone();
        let keys = self.shared.keys.clone();
        let tx = self.released_tx.clone();
        let handler = self.shared.handler.clone();
        tokio::spawn(async move {
            let (queue, slice) = key.clone();
            let epoch = release_slice(&state, slice, drain).await;
            // A worker coprocess of the slice must be gone before the claim is.
            handler.slice_released(&queue, slice, WORKER_STOP_GRACE).await;
            if let Some(epoch) = epoch {
                match delete_claim(&mut client, &keys, &queue, slice, epoch).await {
                    Ok(()) => tracing::info!(%queue, slice, epoch, "released slice"),
                    Err(e) => tracing::warn!(%queue, slice, error = %e, "deleting the claim failed; it ends with the lease"),
                }
            }
            let _ = tx.send(key);
        });
    }

    fn on_released(&mut self, key: SliceKey) {
        self.releasing.remove(&key);
        self.held.remove(&key);
        metrics::gauge!("qslice_runner_slices_claimed").set(self.held.len() as f64);
        self.drop_idle_queues();
    }

    /// Stops the loops of queues that have no claimed slice left.
    fn drop_idle_queues(&mut self) {
        self.queues.retain(|_, (state, task)| {
            let empty = state.owned.lock().expect("owned lock").is_empty();
            if empty {
                task.abort();
            }
            !empty
        });
    }

    fn stop_all_queues(&mut self) {
        self.shared.handler.kill_all();
        // Their kill tokens are children of the fence (cancelled when fenced); on a
        // shutdown they were released before this.
        for (_, sup) in std::mem::take(&mut self.supervised) {
            sup.quiet.cancel();
        }
        self.sync_supervised_view();
        for (_, (state, task)) in self.queues.drain() {
            for s in state.owned.lock().expect("owned lock").values() {
                s.kill.cancel();
            }
            task.abort();
        }
        self.held.clear();
        self.releasing.clear();
        metrics::gauge!("qslice_runner_slices_claimed").set(0.0);
    }
}

/// Tells `freed` once the claim `key` is deleted after `revision`; ends quietly when
/// cancelled or when the watch fails (the claim retry tick covers that).
async fn watch_release(mut client: Client, key: String, revision: i64, cancel: CancellationToken, freed: mpsc::UnboundedSender<SliceKey>, slice: SliceKey) {
    let deleted = async {
        let options = etcd_client::WatchOptions::new().with_start_revision(revision + 1);
        let mut stream = client.watch(key.as_str(), Some(options)).await.ok()?;
        while let Ok(Some(resp)) = stream.message().await {
            if resp.events().iter().any(|e| e.event_type() == etcd_client::EventType::Delete) {
                return Some(());
            }
        }
        None
    };
    tokio::select! {
        d = deleted => if d.is_some() {
            let _ = freed.send(slice);
        },
        _ = cancel.cancelled() => {}
    }
}

/// Why a node-record watch update means this incarnation has lost its lease, if it does.
fn node_record_lost(update: &PrefixUpdate, key: &[u8], lease_id: i64) -> Option<&'static str> {
    let gone = "the node record was deleted: the lease was revoked (fenced by the leader) or expired";
    match update {
        PrefixUpdate::Snapshot(kvs) => match kvs.iter().find(|kv| kv.key() == key) {
            None => Some(gone),
            Some(kv) if kv.lease() != lease_id => Some("the node record belongs to another lease"),
            Some(_) => None,
        },
        PrefixUpdate::Delete(kv) if kv.key() == key => Some(gone),
        PrefixUpdate::Put(kv) if kv.key() == key && kv.lease() != lease_id => Some("the node record belongs to another lease"),
        _ => None,
    }
}

/// Stops taking entries of `slice`, waits for its in-flight work (killing it at the drain
/// timeout), and forgets the slice. Returns the claim's epoch.
async fn release_slice(state: &QueueState, slice: u32, drain: Duration) -> Option<i64> {
    let kill = {
        let mut owned = state.owned.lock().expect("owned lock");
        let s = owned.get_mut(&slice)?;
        s.accepting = false;
        s.kill.clone()
    };
    let in_flight = || state.owned.lock().expect("owned lock").get(&slice).map_or(0, |s| s.in_flight);
    let deadline = tokio::time::Instant::now() + drain;
    while in_flight() > 0 {
        let notified = state.changed.notified();
        if in_flight() == 0 {
            break;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            tracing::warn!(queue = %state.queue, slice, "in-flight work did not finish within the drain timeout; killing it (the next owner recovers it)");
            kill.cancel();
            // Killed handlers leave their .bak and count themselves out promptly.
            while in_flight() > 0 {
                let notified = state.changed.notified();
                if in_flight() == 0 {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            }
            break;
        }
    }
    state.owned.lock().expect("owned lock").remove(&slice).map(|s| s.epoch)
}

async fn delete_claim(client: &mut Client, keys: &Keys, queue: &str, slice: u32, epoch: i64) -> Result<(), etcd_client::Error> {
    let key = keys.claim(queue, slice);
    // Delete only our own claim: the create revision is the epoch we got.
    let txn = Txn::new()
        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, epoch)])
        .and_then([TxnOp::delete(key.as_str(), None)]);
    match tokio::time::timeout(REQUEST_TIMEOUT, client.txn(txn)).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(etcd_client::Error::InvalidArgs("delete claim timed out".into())),
    }
}

/// Lists the queue once per pass and processes the claimed slices' entries FIFO.
async fn queue_loop(state: Arc<QueueState>, shared: Arc<Shared>, fence: Arc<qslice_common::lease::Fence>, mut client: Client, lease_id: i64) {
    let poll = shared.cfg.poll_interval;
    let mut last_error = None::<tokio::time::Instant>;
    let mut last_status = None::<tokio::time::Instant>;
    loop {
        if fence.lost().is_cancelled() {
            return;
        }
        // Created just before its first slices are registered: wait for them, so that
        // nothing (figures, quarantine) is done for a queue this node holds nothing of.
        if state.owned.lock().expect("owned lock").is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = state.changed.notified() => {}
                _ = fence.lost().cancelled() => return,
            }
            continue;
        }
        let dir = state.dir.clone();
        let total = state.slices_total;
        let scan = match tokio::task::spawn_blocking(move || dir.scan(total)).await {
            Ok(Ok(scan)) => scan,
            Ok(Err(e)) => {
                if last_error.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::error!(queue = %state.queue, error = %e, "cannot list the queue; retrying");
                    last_error = Some(tokio::time::Instant::now());
                }
                tokio::time::sleep(poll).await;
                continue;
            }
            Err(_) => return,
        };
        let owned: Vec<u32> = state.owned.lock().expect("owned lock").keys().copied().collect();
        publish_figures(&state.queue, state.slices_total, &scan);
        if last_status.is_none_or(|t| t.elapsed() >= STATUS_INTERVAL) {
            publish_status(&mut client, &shared, &state.dir, &scan, &owned, lease_id).await;
            last_status = Some(tokio::time::Instant::now());
        }
        let Scan { mut pending, problems, .. } = scan;
        if !problems.is_empty() {
            let dir = state.dir.clone();
            let queue = state.queue.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for problem in problems {
                    match dir.quarantine(problem) {
                        Ok(q) => {
                            metrics::counter!("qslice_runner_entries_total", "queue" => queue.clone(), "outcome" => "quarantined").increment(1);
                            tracing::warn!(%queue, from = %q.from.display(), to = %q.to.display(), reason = %q.reason, "not a queue entry; quarantined");
                        }
                        Err(e) => tracing::error!(%queue, error = %e, "quarantine failed"),
                    }
                }
            })
            .await;
        }
        // Round-robin over the claimed slices, FIFO within each.
        let mut lists: Vec<std::vec::IntoIter<qslice_common::spool::Entry>> =
            owned.iter().filter_map(|s| pending.remove(s)).map(|v| v.into_iter()).collect();
        let mut started = 0usize;
        loop {
            let mut progressed = false;
            for list in lists.iter_mut() {
                let Some(entry) = list.next() else { continue };
                progressed = true;
                let permit = tokio::select! {
                    p = shared.permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                    _ = fence.lost().cancelled() => return,
                };
                if start_entry(&state, &shared, &fence, entry, permit) {
                    started += 1;
                }
            }
            if !progressed {
                break;
            }
        }
        if started == 0 {
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = state.changed.notified() => {}
                _ = fence.lost().cancelled() => return,
            }
        }
    }
}

/// Takes one entry if its slice is still claimed and accepting and the fence is valid.
fn start_entry(state: &Arc<QueueState>, shared: &Arc<Shared>, fence: &Arc<qslice_common::lease::Fence>, entry: qslice_common::spool::Entry, permit: tokio::sync::OwnedSemaphorePermit) -> bool {
    let (epoch, kill) = {
        let mut owned = state.owned.lock().expect("owned lock");
        let Some(s) = owned.get_mut(&entry.slice) else { return false };
        if !s.accepting || !fence.is_valid() {
            return false;
        }
        s.in_flight += 1;
        (s.epoch, s.kill.clone())
    };
    let done = |state: &QueueState| {
        if let Some(s) = state.owned.lock().expect("owned lock").get_mut(&entry.slice) {
            s.in_flight -= 1;
        }
        state.changed.notify_waiters();
    };
    let taken = match state.dir.dequeue(&entry) {
        // The rename can block (NFS) while the lease runs out: look at the fence again
        // before anything starts. The entry stays .bak for the next owner.
        Ok(Dequeued::Taken(_)) if !fence.is_valid() => {
            tracing::warn!(queue = %state.queue, slice = entry.slice, entry = %entry.name.filebase, "the fence tripped while the entry was being taken; it stays .bak for the next owner");
            done(state);
            return false;
        }
        Ok(Dequeued::Taken(t)) => t,
        Ok(Dequeued::Gone) => {
            done(state);
            return false;
        }
        Ok(Dequeued::Quarantined(q)) => {
            tracing::warn!(queue = %state.queue, from = %q.from.display(), to = %q.to.display(), reason = %q.reason, "entry quarantined");
            metrics::counter!("qslice_runner_entries_total", "queue" => state.queue.clone(), "outcome" => "quarantined").increment(1);
            done(state);
            return false;
        }
        Err(e) => {
            tracing::error!(queue = %state.queue, error = %e, "dequeue failed");
            done(state);
            return false;
        }
    };
    metrics::gauge!("qslice_runner_in_flight").increment(1.0);
    let job = Job {
        path: taken.path.clone(),
        filebase: entry.name.filebase.clone(),
        queue: state.queue.clone(),
        slice: entry.slice,
        slices: state.slices_total,
        epoch,
        node: shared.cfg.node_id.clone(),
    };
    let state = state.clone();
    let handler: Handler = shared.handler.clone();
    let fence = fence.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let queue = state.queue.clone();
        let outcome = tokio::select! {
            biased;
            _ = kill.cancelled() => None,
            o = handler.handle(&job) => Some(o),
        };
        // A handler killed by the leash at the fence deadline (this runner was frozen or
        // hung) looks like a failure: it is a kill, and the entry stays .bak.
        let fenced = kill.is_cancelled() || !fence.is_valid();
        let outcome = outcome.filter(|o| !(fenced && matches!(o, Outcome::Failed(_) | Outcome::Retry)));
        let label = match outcome {
            None => {
                tracing::warn!(%queue, slice = job.slice, entry = %job.filebase, "handler killed (fence or drain timeout); the entry stays .bak for recovery");
                "killed"
            }
            Some(Outcome::Finished) => match state.dir.finish(&taken) {
                Ok(()) => "finished",
                Err(e) => {
                    tracing::error!(%queue, error = %e, "finish failed");
                    "finish_failed"
                }
            },
            Some(Outcome::Moved(_)) => "finished",
            Some(Outcome::Retry) => {
                tokio::select! {
                    _ = tokio::time::sleep(handler.retry_backoff()) => {}
                    _ = kill.cancelled() => {}
                }
                if kill.is_cancelled() {
                    "killed"
                } else {
                    match state.dir.requeue(&taken) {
                        Ok(()) => "retried",
                        Err(e) => {
                            tracing::error!(%queue, error = %e, "requeue failed");
                            "requeue_failed"
                        }
                    }
                }
            }
            Some(Outcome::Failed(reason)) => match state.dir.preserve(&taken) {
                Ok(psv) => {
                    tracing::warn!(%queue, slice = job.slice, entry = %job.filebase, %reason, to = %psv.display(), "handler failed; entry preserved");
                    "preserved"
                }
                Err(e) => {
                    tracing::error!(%queue, %reason, error = %e, "handler failed and preserving the entry failed too; it stays .bak");
                    "preserve_failed"
                }
            },
        };
        metrics::counter!("qslice_runner_entries_total", "queue" => queue.clone(), "outcome" => label).increment(1);
        metrics::gauge!("qslice_runner_in_flight").decrement(1.0);
        if let Some(s) = state.owned.lock().expect("owned lock").get_mut(&job.slice) {
            s.in_flight -= 1;
        }
        state.changed.notify_waiters();
    });
    true
}

/// Per-slice depth and oldest-entry age of every slice the listing saw.
fn publish_figures(queue: &str, slices_total: u32, scan: &Scan) {
    for slice in 0..slices_total {
        let depth = scan.pending.get(&slice).map_or(0, |v| v.len());
        let labels = [("queue", queue.to_owned()), ("slice", slice.to_string())];
        metrics::gauge!("qslice_runner_slice_depth", &labels).set(depth as f64);
        metrics::gauge!("qslice_runner_slice_oldest_age_seconds", &labels).set(scan.oldest_age(slice).unwrap_or(0.0));
    }
}

/// Publishes this node's figures for its own slices to etcd (attached to the lease). The
/// holder of slice 0 also reports the non-empty slices nobody in this node holds, so the
/// coordinator sees idle entries without every runner reporting every slice.
async fn publish_status(client: &mut Client, shared: &Shared, dir: &QueueDir, scan: &Scan, owned: &[u32], lease_id: i64) {
    let reporter = owned.contains(&0);
    let figures: Vec<SliceFigures> = (0..scan.slices_total)
        .filter(|s| owned.contains(s) || (reporter && (scan.pending.contains_key(s) || scan.in_flight.contains_key(s))))
        .map(|s| SliceFigures {
            slice: s,
            depth: scan.pending.get(&s).map_or(0, |v| v.len() as u64),
            in_flight: scan.in_flight.get(&s).map_or(0, |v| v.len() as u64),
            oldest_age_ms: (scan.oldest_age(s).unwrap_or(0.0) * 1000.0) as u64,
            oldest_in_flight_age_ms: scan.in_flight.get(&s).and_then(|e| dir.oldest_in_flight_age(e)).map_or(0, |a| (a * 1000.0) as u64),
        })
        .collect();
    let status = SliceStatus {
        v: RECORD_VERSION,
        node_id: shared.cfg.node_id.clone(),
        queue: dir.queue().to_owned(),
        slices_total: scan.slices_total,
        listed_unix_ms: unix_ms(),
        slices: figures,
    };
    let key = shared.keys.status(&shared.cfg.node_id, dir.queue());
    let put = client.put(key, status.encode(), Some(PutOptions::new().with_lease(lease_id)));
    if let Ok(Err(e)) = tokio::time::timeout(REQUEST_TIMEOUT, put).await {
        tracing::debug!(error = %e, "publishing slice figures failed");
    }
}

