//! One incarnation's run as a slice owner: the watch loop over this node's assignment,
//! its node record and the queue configurations, which on every change recomputes the
//! ownership plan ([`crate::ownership::plan`]) and executes it: claims assigned slices
//! ([`crate::claims`]), recovers their `.bak` entries and starts processing them
//! ([`crate::processor`], or a supervised runner, [`crate::supervised_slices`]), releases
//! slices that move away, and gives up queues that cannot run here.
//!
//! The loop `select!`s over, in this order: the fence (stop everything at once), the
//! shutdown (release everything, then stop), the assignment, finished releases, given-up
//! supervised slices, the node record (its loss trips the fence), claims freed by other
//! holders, queue configurations, and two ticks: claim retry and refusal check.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use qslice_common::etcd::{PrefixUpdate, PrefixWatch, REQUEST_TIMEOUT};
use qslice_common::lease::{fence_margin, unix_ms, Fence, Incarnation};
use qslice_common::spool::QueueDir;
use qslice_proto::keys::{Key, Keys};
use qslice_proto::records::{Assignment, Claim, NodeRecord, QueueConfig, Record, RECORD_VERSION};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::claims::{self, ClaimOutcome, QueueRevision, RequestError};
use crate::figures::supervised_figures;
use crate::handler::Handler;
use crate::ownership::{self, Action, ClaimedSlice, Desired, Held, HeldClaim, QueueSlices, Refusal, SliceId, SlicedQueue};
use crate::processor::{drain_slice, queue_loop, EntryMeters, QueueState, SliceState, SpoolFaults};
use crate::shared::Shared;
use crate::singleton::Singletons;
use crate::supervise::SuperviseConfig;
use crate::supervised_slices::{GaveUp, SupervisedSlices};

/// How often pending claims are tried again while another holder still has them.
const CLAIM_RETRY: Duration = Duration::from_millis(100);
/// How long a released slice's worker coprocess may take to exit after its stdin closes.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(5);
/// How often refusals are checked again (cooldown over, configuration changed or fixed).
const REFUSAL_CHECK: Duration = Duration::from_secs(1);

/// How an incarnation ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Shutdown was requested; every slice was released.
    Shutdown,
    /// The fence tripped; all work was stopped.
    Fenced,
}

/// How many claim requests one reconcile has in flight at once.
const CLAIMS_AT_ONCE: usize = 16;

/// Runs one incarnation until shutdown or fence.
pub async fn run_incarnation(client: Client, shared: Arc<Shared>, inc: &Incarnation, shutdown: &CancellationToken, ready: &AtomicBool) -> Exit {
    let (released_tx, mut released_rx) = mpsc::unbounded_channel();
    let (gave_up_tx, mut gave_up_rx) = mpsc::unbounded_channel();
    let (freed_tx, mut freed_rx) = mpsc::unbounded_channel();
    let mut inc_run = IncarnationRun::new(client.clone(), shared.clone(), inc, released_tx, gave_up_tx, freed_tx);
    let figures =
        (!shared.cfg.supervise.is_empty()).then(|| tokio::spawn(supervised_figures(client.clone(), shared.clone(), inc.lease_id, inc.fence.clone(), inc_run.supervised.view())));
    let _figures = AbortOnDrop(figures);
    let node = shared.cfg.node_id.clone();
    // Singleton commands compete for their own claims on this lease, beside the slices.
    let mut singletons = Singletons::start(&client, &shared, inc, shutdown);
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
                ready.store(false, Ordering::SeqCst);
                inc_run.stop_all_queues();
                // Their commands are killed at the fence; wait until they are gone.
                singletons.join().await;
                return Exit::Fenced;
            }
            _ = shutdown.cancelled() => {
                ready.store(false, Ordering::SeqCst);
                inc_run.desired.clear();
                inc_run.reconcile().await;
                while !inc_run.held.is_empty() {
                    tokio::select! {
                        _ = hard.cancelled() => { inc_run.stop_all_queues(); singletons.join().await; return Exit::Fenced; }
                        Some(slice) = released_rx.recv() => inc_run.on_released(slice),
                    }
                }
                inc_run.stop_all_queues();
                // Each singleton stops its command (SIGTERM, then SIGKILL after its stop
                // timeout; at once if the fence trips) and releases its claim.
                singletons.join().await;
                return Exit::Shutdown;
            }
            update = watch.next() => {
                inc_run.apply(update);
                ready.store(true, Ordering::SeqCst);
                inc_run.reconcile().await;
            }
            Some(slice) = released_rx.recv() => {
                inc_run.on_released(slice);
                inc_run.reconcile().await;
            }
            Some(gave_up) = gave_up_rx.recv() => {
                inc_run.give_up(gave_up).await;
                inc_run.reconcile().await;
            }
            update = node_watch.next() => {
                if let Some(reason) = node_record_lost(&update, node_key.as_bytes(), inc.lease_id) {
                    metrics::counter!("qslice_runner_fence_events_total").increment(1);
                    inc.fence.trip(reason);
                }
            }
            Some(slice) = freed_rx.recv() => {
                inc_run.release_watches.remove(&slice);
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

/// The state of one incarnation's run; only its watch loop touches it.
struct IncarnationRun {
    /// The etcd client.
    client: Client,
    /// What every part of the runner shares.
    shared: Arc<Shared>,
    /// This incarnation's lease; claims and published records hang on it.
    lease_id: i64,
    /// The lease's TTL as etcd granted it.
    ttl: Duration,
    /// This incarnation's id, written in its claims.
    incarnation: uuid::Uuid,
    /// This incarnation's fence.
    fence: Arc<Fence>,
    /// What the leader assigned to this node.
    desired: Desired,
    /// Claims this incarnation holds, with their epochs (including those being released).
    held: Held,
    /// Held slices whose release is under way.
    releasing: BTreeSet<SliceId>,
    /// The processing loop of each handled queue (per slice count) with claimed slices.
    queues: HashMap<SlicedQueue, (Arc<QueueState>, tokio::task::JoinHandle<()>)>,
    /// Where release tasks report the slices they released.
    released_tx: mpsc::UnboundedSender<SliceId>,
    /// Slices run by supervised Mailman runners.
    supervised: SupervisedSlices,
    /// Queues this node gave up, and until when.
    refused: BTreeMap<String, Refusal>,
    /// Each queue's slice count, from its configuration record.
    queue_slices: BTreeMap<String, u32>,
    /// The mod revision of each queue's configuration key (readable or not), as the
    /// claim transaction compares it (the reslice barrier).
    queue_revisions: BTreeMap<String, i64>,
    /// Whether the queue configurations were listed: claims wait for that.
    queue_configs_listed: bool,
    /// Watches of claims held by others on slices assigned here: the slice is claimed the
    /// moment its claim is deleted (the retry tick is the fallback).
    release_watches: BTreeMap<SliceId, CancellationToken>,
    /// Where those watches report a deleted claim.
    freed_tx: mpsc::UnboundedSender<SliceId>,
    /// The node record, to publish refusals in.
    record: Option<NodeRecord>,
    /// Crash refusals so far per queue, for the cooldown's backoff.
    crash_refusals: BTreeMap<String, u32>,
}

/// Aborts a task when dropped (the incarnation ended however it ended).
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

impl IncarnationRun {
    /// A run of `inc` with nothing desired or held yet; released slices, slices given
    /// up and freed holds come back over the three channels.
    fn new(
        client: Client,
        shared: Arc<Shared>,
        inc: &Incarnation,
        released_tx: mpsc::UnboundedSender<SliceId>,
        gave_up_tx: mpsc::UnboundedSender<GaveUp>,
        freed_tx: mpsc::UnboundedSender<SliceId>,
    ) -> IncarnationRun {
        IncarnationRun {
            client,
            shared,
            lease_id: inc.lease_id,
            ttl: inc.ttl,
            incarnation: inc.incarnation,
            fence: inc.fence.clone(),
            desired: Desired::new(),
            held: Held::new(),
            releasing: BTreeSet::new(),
            queues: HashMap::new(),
            released_tx,
            supervised: SupervisedSlices::new(gave_up_tx),
            refused: BTreeMap::new(),
            queue_slices: BTreeMap::new(),
            queue_revisions: BTreeMap::new(),
            queue_configs_listed: false,
            release_watches: BTreeMap::new(),
            freed_tx,
            record: inc.record.clone(),
            crash_refusals: BTreeMap::new(),
        }
    }

    /// Takes an assignment watch update into `desired`.
    fn apply(&mut self, update: PrefixUpdate) {
        let keys = &self.shared.keys;
        let set = |kv: &etcd_client::KeyValue, desired: &mut Desired| {
            let Some(Key::Assignment { queue, .. }) = keys.parse(kv.key()) else { return };
            if !self.shared.cfg.queues.is_empty() && !self.shared.cfg.queues.contains(&queue) {
                tracing::warn!(%queue, "assigned a queue this node is not configured to serve; ignoring it");
                return;
            }
            match Assignment::decode(kv.value()) {
                Ok(a) if a.queue == queue => {
                    let slices: BTreeSet<u32> = a.slices.iter().filter(|s| *s < a.slices_total).collect();
                    desired.insert(queue, QueueSlices { slices_total: a.slices_total, slices });
                }
                Ok(a) => tracing::error!(key = %String::from_utf8_lossy(kv.key()), inner = %a.queue, "assignment names another queue than its key; ignoring it"),
                Err(e) => tracing::error!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable assignment; ignoring it"),
            }
        };
        match update {
            PrefixUpdate::Snapshot(kvs) => {
                let mut desired = Desired::new();
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

    /// Takes a queue configuration watch update into `queue_slices`.
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
                self.queue_revisions = kvs.iter().filter_map(|kv| Some((parse(kv)?.0, kv.mod_revision()))).collect();
                self.queue_configs_listed = true;
            }
            PrefixUpdate::Put(kv) => {
                if let Some((queue, slices)) = parse(&kv) {
                    self.queue_revisions.insert(queue.clone(), kv.mod_revision());
                    match slices {
                        Some(n) => self.queue_slices.insert(queue, n),
                        None => self.queue_slices.remove(&queue),
                    };
                }
            }
            PrefixUpdate::Delete(kv) => {
                if let Some((queue, _)) = parse(&kv) {
                    self.queue_slices.remove(&queue);
                    self.queue_revisions.remove(&queue);
                }
            }
        }
    }

    /// Whether some assigned slice waits for its claim (drives the retry tick).
    fn has_pending(&self) -> bool {
        ownership::has_pending(&self.desired, &self.held, &self.refused, self.queue_counts(), Instant::now())
    }

    /// The queues' configured slice counts, once listed (the reslice barrier).
    fn queue_counts(&self) -> ownership::QueueCounts<'_> {
        self.queue_configs_listed.then_some(&self.queue_slices)
    }

    /// The revision of `queue`'s configuration that a claim is made under.
    fn queue_revision(&self, queue: &str) -> QueueRevision {
        self.queue_revisions.get(queue).map_or(QueueRevision::Absent, |r| QueueRevision::At(*r))
    }

    /// Gives up a queue: publishes it in the node record so that the leader moves its
    /// slices to other nodes, and releases what this node holds of it. `until` as in
    /// [`Refusal`].
    async fn refuse(&mut self, queue: &str, reason: &str, until: Option<Instant>) {
        if self.refused.get(queue).is_some_and(|r| r.in_force(Instant::now()) && r.reason == reason) {
            return;
        }
        match until {
            Some(until) => {
                tracing::error!(%queue, %reason, cooldown = ?until.saturating_duration_since(Instant::now()), "alert: giving this queue up on this node so that another node takes its slices")
            }
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

    /// Whether a configuration refusal of `queue` can end: the count it was about (the
    /// queue's record, else the assignment's) passes the queue's supervision check.
    fn configuration_passes(&self, queue: &str) -> bool {
        let count = self.queue_slices.get(queue).copied().or_else(|| self.desired.get(queue).map(|d| d.slices_total));
        count.is_some_and(|n| self.shared.cfg.supervise.get(queue).is_none_or(|sup| sup.check(queue, Some(n)).is_ok()))
    }

    /// Writes the refusals in force into the node record.
    async fn publish_refusals(&mut self) {
        let now = Instant::now();
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
    async fn give_up(&mut self, gave_up: GaveUp) {
        let GaveUp { slice, epoch, reason, crashed } = gave_up;
        let until = crashed.then(|| {
            let n = self.crash_refusals.entry(slice.queue.clone()).or_insert(0);
            let cooldown = ownership::crash_cooldown(*n);
            *n += 1;
            Instant::now() + cooldown
        });
        self.supervised.forget(&slice, &self.held);
        self.refuse(&slice.queue, &reason, until).await;
        // The child has exited: the claim can go now (held until its delete went through).
        let total = self.held.get(&slice).map_or(0, |h| h.slices_total);
        self.release_claim_in_background(slice, total, epoch);
    }

    /// Deletes a held claim (no work runs under it), retrying while the lease lasts; the
    /// slice stays held and being released until then, and `released_tx` hears of it.
    fn release_claim_in_background(&mut self, id: SliceId, total: u32, epoch: i64) {
        self.held.insert(id.clone(), HeldClaim { slices_total: total, epoch });
        self.releasing.insert(id.clone());
        metrics::gauge!("qslice_runner_slices_claimed").set(self.held.len() as f64);
        let (mut client, keys, fence, released) = (self.client.clone(), self.shared.keys.clone(), self.fence.clone(), self.released_tx.clone());
        tokio::spawn(async move {
            let SliceId { queue, slice } = &id;
            match claims::release_claim_retrying(&mut client, &keys, queue, *slice, epoch, &fence).await {
                Ok(()) => tracing::info!(%queue, slice, epoch, "deleted the claim"),
                Err(e) => tracing::warn!(%queue, slice, error = %e.cause(), "deleting the claim failed and the fence tripped; it ends with the lease"),
            }
            let _ = released.send(id);
        });
    }

    /// Lifts and imposes refusals, then executes the ownership plan: releases what moved
    /// away, claims what is assigned and not held.
    async fn reconcile(&mut self) {
        let now = Instant::now();
        // A configuration refusal ends when the check passes: the queue's slice count was
        // fixed (or mailman.cfg, for `mailman3-runner`).
        let lifted: Vec<String> =
            self.refused.iter().filter(|(q, r)| r.lifted(now, || self.config_stamp(q) != r.config_stamp, || self.configuration_passes(q))).map(|(q, _)| q.clone()).collect();
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
            .map(|(q, d)| (q, d.slices_total))
            .chain(self.queue_slices.iter().map(|(q, n)| (q, *n)))
            .filter_map(|(q, n)| {
                let sup = self.shared.cfg.supervise.get(q)?;
                sup.check(q, Some(n)).err().map(|e| (q.clone(), e.to_string()))
            })
            .collect();
        for (queue, error) in mismatched {
            self.refuse(&queue, &error, None).await;
        }
        let now = Instant::now();
        let mut pending: Vec<(SliceId, u32)> = Vec::new();
        for action in ownership::plan(&self.desired, &self.held, &self.releasing, &self.refused, self.queue_counts(), now) {
            match action {
                Action::Release { slice, slices_total } => self.start_release(slice, slices_total),
                Action::Claim { slice, slices_total } => pending.push((slice, slices_total)),
            }
        }
        // Warm a slice runner for each slice about to arrive, beside the spares: a planned
        // move's new owner warms up while the old owner finishes its message.
        for (queue, pool) in &self.shared.pools {
            let refused = ownership::is_refused(&self.refused, queue, now);
            pool.want(if refused { 0 } else { pending.iter().filter(|(id, _)| id.queue == *queue).count() });
        }
        // Watch only the claims of slices still waited for.
        self.release_watches.retain(|watched, cancel| {
            let waited = pending.iter().any(|(id, _)| id == watched);
            if !waited {
                cancel.cancel();
            }
            waited
        });
        // Claim first, then recover each queue's newly claimed slices with one listing.
        let mut claimed: BTreeMap<SlicedQueue, Vec<ClaimedSlice>> = BTreeMap::new();
        // How long each successful claim request took, for the "claimed slice" line.
        let mut claim_took: BTreeMap<SliceId, Duration> = BTreeMap::new();
        // The claim requests go out together, a bounded number at a time: slices released
        // at once (a drain) are claimed in one round trip, not one after the other.
        for chunk in pending.chunks(CLAIMS_AT_ONCE) {
            if !self.fence.is_valid() {
                return;
            }
            let requests: Vec<_> = chunk
                .iter()
                .map(|(id, slices_total)| {
                    let (mut client, keys, id2) = (self.client.clone(), self.shared.keys.clone(), id.clone());
                    let (record, lease_id, queue_revision) = (self.claim_record(*slices_total), self.lease_id, self.queue_revision(&id.queue));
                    tokio::spawn(async move {
                        let started = Instant::now();
                        let outcome = claims::claim_slice(&mut client, &keys, &id2.queue, id2.slice, &record, lease_id, queue_revision).await;
                        (outcome, started.elapsed())
                    })
                })
                .collect();
            for ((id, slices_total), request) in chunk.iter().zip(requests) {
                let Ok((outcome, took)) = request.await else { continue };
                if let Some(epoch) = self.settle_claim(id, *slices_total, outcome) {
                    claim_took.insert(id.clone(), took);
                    claimed.entry(SlicedQueue { queue: id.queue.clone(), slices_total: *slices_total }).or_default().push(ClaimedSlice { slice: id.slice, epoch });
                }
            }
        }
        if !self.fence.is_valid() {
            return;
        }
        for (queue, slices) in claimed {
            self.recover_and_start(queue, slices, &claim_took).await;
        }
    }

    /// This incarnation's claim record of a slice of a queue with `total` slices.
    fn claim_record(&self, total: u32) -> Claim {
        Claim { v: RECORD_VERSION, node_id: self.shared.cfg.node_id.clone(), incarnation: self.incarnation, slices_total: total, claimed_unix_ms: unix_ms() }
    }

    /// Acts on the answer to a claim request (made with [`claims::claim_slice`]); the epoch
    /// on success. A claim another holder still has is watched for its deletion.
    fn settle_claim(&mut self, id: &SliceId, total: u32, outcome: Result<ClaimOutcome, claims::Error>) -> Option<i64> {
        let (queue, slice) = (id.queue.as_str(), id.slice);
        let (watched, revision) = match outcome {
            Ok(ClaimOutcome::Claimed { epoch }) => {
                if let Some(cancel) = self.release_watches.remove(id) {
                    cancel.cancel();
                }
                return Some(epoch);
            }
            Ok(ClaimOutcome::Adopted { epoch, slices_total }) => {
                if let Some(cancel) = self.release_watches.remove(id) {
                    cancel.cancel();
                }
                if slices_total == total {
                    tracing::info!(%queue, slice, epoch, "adopted this incarnation's own claim (an earlier claim request committed though its answer was lost)");
                    return Some(epoch);
                }
                // Made under another slice count (the queue was resliced since): ours to delete.
                tracing::warn!(%queue, slice, epoch, claimed_under = slices_total, assigned_under = total, "found this incarnation's own claim under another slice count; deleting it");
                self.release_claim_in_background(id.clone(), slices_total, epoch);
                return None;
            }
            Ok(ClaimOutcome::QueueChanged { .. }) => {
                // The queue's configuration watch brings the new count; the plan waits for it.
                tracing::debug!(%queue, slice, "the queue's configuration changed since it was read; claiming again under the new one");
                return None;
            }
            Ok(ClaimOutcome::HeldByOther { revision }) => (self.shared.keys.claim(queue, slice), revision),
            Ok(ClaimOutcome::Held { revision }) => {
                if !self.release_watches.contains_key(id) {
                    tracing::info!(%queue, slice, "the slice is held back after the leader revoked its last holder's lease; claiming it once the hold ends");
                }
                (self.shared.keys.hold(queue, slice), revision)
            }
            Err(e) => {
                match e.cause() {
                    RequestError::Etcd(e) => tracing::warn!(%queue, slice, error = %e, "claim failed; will retry"),
                    RequestError::TimedOut(_) => tracing::warn!(%queue, slice, "claim timed out; will retry"),
                }
                return None;
            }
        };
        // Another holder still has it (a planned move waits for its release, a crash for
        // its lease to expire), or a hold keeps it back: watch for that key's deletion.
        if !self.release_watches.contains_key(id) {
            let cancel = self.fence.lost().child_token();
            self.release_watches.insert(id.clone(), cancel.clone());
            tokio::spawn(claims::watch_release(self.client.clone(), watched, revision, cancel, self.freed_tx.clone(), id.clone()));
        }
        None
    }

    /// Recovers the `.bak` entries of newly claimed slices of one queue (one listing for
    /// all of them), then starts processing them.
    async fn recover_and_start(&mut self, sliced: SlicedQueue, slices: Vec<ClaimedSlice>, claim_took: &BTreeMap<SliceId, Duration>) {
        let SlicedQueue { queue, slices_total: total } = &sliced;
        let total = *total;
        if let Some(cfg) = self.shared.cfg.supervise.get(queue).cloned() {
            // Mailman recovers its own slice's .bak files at start.
            for ClaimedSlice { slice, epoch } in slices {
                self.start_supervised(SliceId::new(queue, slice), total, epoch, cfg.clone());
            }
            metrics::gauge!("qslice_runner_slices_claimed").set(self.held.len() as f64);
            return;
        }
        let state = self.queue_state(&sliced);
        let dir = state.dir.clone();
        let set: BTreeSet<u32> = slices.iter().map(|s| s.slice).collect();
        let fence = self.fence.clone();
        let recovery_started = Instant::now();
        let recovery = tokio::task::spawn_blocking(move || dir.recover_while(total, |s| set.contains(&s), || fence.is_valid())).await;
        let recovery_ms = recovery_started.elapsed().as_secs_f64() * 1000.0;
        let mut listed = BTreeMap::new();
        let failure = match recovery {
            Ok(Ok(mut report)) => {
                listed = std::mem::take(&mut report.pending);
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
            for ClaimedSlice { slice, epoch } in slices {
                self.release_claim_in_background(SliceId::new(queue, slice), total, epoch);
            }
            self.drop_idle_queues();
            return;
        }
        // The loop starts on the recovery's listing of them if it is working through a pass.
        let added: Vec<_> = slices.iter().map(|s| (s.slice, listed.remove(&s.slice).unwrap_or_default())).collect();
        for ClaimedSlice { slice, epoch } in slices {
            self.held.insert(SliceId::new(queue, slice), HeldClaim { slices_total: total, epoch });
            state.owned.lock().expect("owned lock").insert(slice, SliceState { epoch, accepting: true, in_flight: 0, kill: self.fence.lost().child_token() });
            let claim_ms = claim_took.get(&SliceId::new(queue, slice)).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
            tracing::info!(%queue, slice, epoch, claim_ms = format!("{claim_ms:.1}"), recovery_ms = format!("{recovery_ms:.1}"), "claimed slice");
        }
        state.slices_added.added(added);
        state.changed.notify_waiters();
        metrics::gauge!("qslice_runner_slices_claimed").set(self.held.len() as f64);
    }

    /// The state of `sliced`'s processing loop, starting the loop if it does not run.
    fn queue_state(&mut self, sliced: &SlicedQueue) -> Arc<QueueState> {
        if let Some((state, _)) = self.queues.get(sliced) {
            return state.clone();
        }
        let state = Arc::new(QueueState {
            queue: sliced.queue.clone(),
            slices_total: sliced.slices_total,
            dir: QueueDir::new(&self.shared.cfg.spool, &sliced.queue),
            owned: std::sync::Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            slices_added: Default::default(),
            faults: std::sync::Mutex::new(SpoolFaults::default()),
            taken: std::sync::Mutex::new(BTreeSet::new()),
            lease_margin: fence_margin(self.ttl),
            meters: EntryMeters::new(&sliced.queue),
        });
        let task = tokio::spawn(queue_loop(state.clone(), self.shared.clone(), self.fence.clone(), self.client.clone(), self.lease_id));
        self.queues.insert(sliced.clone(), (state.clone(), task));
        state
    }

    /// Holds a newly claimed supervised slice and starts its child.
    fn start_supervised(&mut self, id: SliceId, total: u32, epoch: i64, cfg: SuperviseConfig) {
        self.held.insert(id.clone(), HeldClaim { slices_total: total, epoch });
        let (queue, slice) = (id.queue.clone(), id.slice);
        self.supervised.start(&self.shared, &self.fence, &self.held, id, total, epoch, cfg);
        tracing::info!(%queue, slice, epoch, "claimed slice (supervised)");
    }

    /// Starts the release of a held slice; `released_tx` hears of it once its claim is
    /// deleted (or left to the lease).
    fn start_release(&mut self, id: SliceId, total: u32) {
        if self.supervised.release(&id, &self.held, &self.client, &self.shared.keys, &self.fence, &self.released_tx) {
            self.releasing.insert(id);
            return;
        }
        let Some((state, _)) = self.queues.get(&SlicedQueue { queue: id.queue.clone(), slices_total: total }) else { return };
        let state = state.clone();
        self.releasing.insert(id.clone());
        tokio::spawn(release_handled(
            state,
            id,
            self.shared.cfg.drain_timeout,
            self.shared.handler.clone(),
            self.client.clone(),
            self.shared.keys.clone(),
            self.fence.clone(),
            self.released_tx.clone(),
        ));
    }

    /// A release ended: the slice is no longer held.
    fn on_released(&mut self, id: SliceId) {
        self.releasing.remove(&id);
        self.held.remove(&id);
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

    /// Kills every handler and child and forgets every slice (fence, or the end of a shutdown).
    fn stop_all_queues(&mut self) {
        self.shared.handler.kill_all();
        // Their kill tokens are children of the fence (cancelled when fenced); on a
        // shutdown they were released before this.
        self.supervised.stop_all(&self.held);
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

/// Releases a handled slice: drains it, stops its worker coprocess (which must be gone
/// before the claim is), deletes the claim (retrying while the lease lasts), and tells
/// `released`.
#[allow(clippy::too_many_arguments)]
async fn release_handled(
    state: Arc<QueueState>,
    id: SliceId,
    drain: Duration,
    handler: Handler,
    mut client: Client,
    keys: Keys,
    fence: Arc<Fence>,
    released: mpsc::UnboundedSender<SliceId>,
) {
    let SliceId { queue, slice } = &id;
    let epoch = drain_slice(&state, *slice, drain).await;
    // A worker coprocess of the slice must be gone before the claim is.
    handler.slice_released(queue, *slice, WORKER_STOP_GRACE).await;
    if let Some(epoch) = epoch {
        match claims::release_claim_retrying(&mut client, &keys, queue, *slice, epoch, &fence).await {
            Ok(()) => tracing::info!(%queue, slice, epoch, "released slice"),
            Err(e) => tracing::warn!(%queue, slice, error = %e.cause(), "deleting the claim failed and the fence tripped; it ends with the lease"),
        }
    }
    let _ = released.send(id);
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
