//! The coordinator daemon: election, then (as leader) a level-triggered reconcile loop.
//!
//! Election: campaign on `election` with this instance's own lease (kept alive every
//! TTL/3, self-fenced like a runner); a standby blocks in the campaign and takes over when
//! the leader's key goes (its lease expired or it resigned). The leader steps down at once
//! when its fence trips, and resigns on shutdown.
//!
//! Reconcile: the instance's [`ClusterCache`] (one list-then-watch of the whole cluster
//! prefix) holds a local copy of every key. Any change of a key that matters (not the runners' figures) only schedules a
//! reconcile, which plans from a full snapshot and writes the difference. A missed or
//! coalesced event can therefore never leave a slice orphaned. Every write is a
//! transaction that compares the leader's election key, so a deposed leader's writes fail.
//!
//! Ownership checks ([`crate::claim_checks`]): a slice assigned to a live node that has no
//! claim at all after the claim deadline goes to another node, and its owner gets no new
//! slices for a while; takeovers avoid nodes whose lease missed a keepalive; a claim that
//! no desired owner explains is fenced (its holder's lease revoked) or alerted on at the
//! revoke deadline. Every revoke is preceded by a transaction that confirms leadership
//! and by holds on everything the lease holds, which keep other nodes from claiming it
//! until the revoked runner's fence has surely expired ([`crate::holds`]); deadlines run
//! on the leader's running time, which a pause of the leader does not advance.
//!
//! Reslice barrier: the transaction that writes a queue's first assignment under its
//! current slice count also requires that no claim of the queue changed after the
//! snapshot (a range compare on the queue's claims prefix), so a claim the cache has not
//! seen yet fails the write and the round is planned again from a fresh snapshot.
//!
//! Batching: at most 127 writes per transaction (etcd allows 128 operations; one is the
//! leader compare). Assignment values are per (node, queue) and hold slice ranges, so a
//! failover of one node among 1,000 with 100,000 slices rewrites at most one key per
//! receiving node and queue.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, LeaderKey, ResignOptions, Txn, TxnOp};
use qslice_common::etcd::{connect_when_ready, EtcdError, REQUEST_TIMEOUT};
use qslice_common::lease::{grant_lease, keep_alive, Incarnation, Role};
use qslice_common::retry::{until_ok, Backoff, STARTUP_BACKOFF};
use qslice_proto::admin::event::Kind;
use qslice_proto::admin::Event;
use qslice_proto::keys::Keys;
use qslice_proto::records::{CoordinatorRecord, Record, RECORD_VERSION};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::{event, ClusterCache};
use crate::claim_checks::{barrier_queues, classify_claims, lease_is_stale, ClaimState, LeaderClock, Stalls};
use crate::config::Config;
use crate::holds::{revoke_with_hold, Revoked};
use crate::planner::{plan, Alert, MoveReason, Plan, PlanInput, PlanOptions, SliceKey};
use crate::view::{assignment_writes, planner_input, ClusterView, MoveSettled, PlannerInput, Write};

/// Operations per transaction besides the leader compare (etcd's limit is 128).
const MAX_WRITES_PER_TXN: usize = 127;
/// Quiet time after a change before reconciling, so a burst of events (runners starting,
/// a lease's keys ending) plans once. An operator's request (a cordon, a move) is planned
/// at once: the old owner of a drained slice lets go this much sooner.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// Reconcile at least this often (revoke deadlines, safety valve hold). The leader's
/// running clock ([`LeaderClock`]) counts at most two of these per round.
const RESYNC: Duration = Duration::from_secs(1);
/// How long a node that did not claim a slice in time, or whose lease missed a keepalive,
/// gets no new slices: far longer than any lease TTL, so that a dying node is gone before
/// it could be given anything again; a node that is alive after all gets its share back
/// when this ends.
const SUSPECT_HOLD: Duration = Duration::from_secs(30);

/// Why a term as leader ended.
#[derive(Debug, PartialEq, Eq)]
enum TermEnd {
    Shutdown,
    Fenced,
    Deposed,
}

/// Whether this instance leads; read by /readyz and metrics.
#[derive(Default)]
pub struct LeaderState {
    /// True while this instance is the leader and has reconciled once.
    pub leading: AtomicBool,
}

/// Why the coordinator stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Reaching etcd failed for good (bad TLS files).
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The cluster name is invalid.
    #[error("cluster: {0}")]
    Cluster(#[from] qslice_proto::keys::NameError),
}

/// Runs the coordinator until `shutdown`.
pub async fn run(cfg: Config, mut client: Client, cache: Arc<ClusterCache>, shutdown: CancellationToken, state: Arc<LeaderState>) -> Result<(), CoordinatorError> {
    let keys = Keys::new(&cfg.cluster)?;
    let mut backoff = Backoff::new(STARTUP_BACKOFF);
    while !shutdown.is_cancelled() {
        let Some(inc) = until_ok("cannot get an election lease", &mut backoff, &shutdown, async || grant_lease(&mut client, cfg.lease_ttl).await).await else {
            return Ok(());
        };
        register(&mut client, &keys, &cfg, inc.lease_id).await;
        let keeper = {
            let (client, inc) = (client.clone(), inc.clone());
            tokio::spawn(async move { keep_alive(client, &inc, Role::Coordinator).await })
        };
        tracing::info!(id = %cfg.id, lease = inc.lease_id, "campaigning for leadership");
        let mut campaigner = campaign_client(&cfg, &client).await;
        let campaign = tokio::select! {
            r = campaigner.campaign(keys.election(), cfg.id.as_bytes(), inc.lease_id) => Some(r),
            _ = inc.fence.lost().cancelled() => None,
            _ = shutdown.cancelled() => None,
        };
        let leader = match campaign {
            Some(Ok(resp)) => resp.leader().cloned(),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "campaign failed; trying again");
                None
            }
            None => None,
        };
        let Some(leader) = leader else {
            keeper.abort();
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(inc.lease_id)).await;
            if !shutdown.is_cancelled() {
                tokio::time::sleep(STARTUP_BACKOFF.0).await;
            }
            continue;
        };
        tracing::info!(id = %cfg.id, "elected leader");
        metrics::gauge!("qslice_coordinator_is_leader").set(1.0);
        let end = Term::new(&cfg, keys.clone(), client.clone(), inc.clone(), leader.clone(), cache.clone()).lead(&shutdown, &state).await;
        state.leading.store(false, Ordering::SeqCst);
        metrics::gauge!("qslice_coordinator_is_leader").set(0.0);
        match end {
            TermEnd::Shutdown => {
                let resign = client.resign(Some(ResignOptions::new().with_leader(leader)));
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, resign).await;
                inc.fence.trip("shutting down");
                keeper.abort();
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(inc.lease_id)).await;
                tracing::info!("resigned leadership; bye");
                return Ok(());
            }
            TermEnd::Fenced | TermEnd::Deposed => {
                tracing::error!(reason = ?end, fence = %inc.fence.reason().unwrap_or_default(), "stepped down as leader; campaigning again");
                inc.fence.trip("stepped down");
                keeper.abort();
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(inc.lease_id)).await;
                client = match connect_when_ready(&cfg.etcd, &shutdown).await {
                    Ok(c) => c,
                    Err(EtcdError::Cancelled) => return Ok(()),
                    Err(e) => return Err(e.into()),
                };
            }
        }
    }
    Ok(())
}

/// The client a campaign goes over: a connection of its own without the request timeout.
/// A campaign waits until the keys before this instance's are gone; cut at the request
/// timeout, it would resign and queue again behind whoever campaigned meanwhile, and a
/// standby could wait behind a leader that re-campaigns forever.
async fn campaign_client(cfg: &Config, fallback: &Client) -> Client {
    let connect = async {
        let options = qslice_common::etcd::options_without_request_timeout(&cfg.etcd).map_err(|e| e.to_string())?;
        Client::connect(cfg.etcd.endpoints.clone(), Some(options)).await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, connect).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot open the campaign's own etcd connection; campaigning over the shared one (its request timeout cuts a long wait short)");
            fallback.clone()
        }
        Err(_) => {
            tracing::warn!("opening the campaign's own etcd connection timed out; campaigning over the shared one");
            fallback.clone()
        }
    }
}

/// Writes this instance's record (id and addresses) on its lease, for GetStatus.
async fn register(client: &mut Client, keys: &Keys, cfg: &Config, lease: i64) {
    let record = CoordinatorRecord { v: RECORD_VERSION, id: cfg.id.clone(), admin_addr: Some(cfg.admin.addr.to_string()), http_addr: cfg.http_addr.map(|a| a.to_string()) };
    let put = client.put(keys.coordinator(&cfg.id), record.encode(), Some(etcd_client::PutOptions::new().with_lease(lease)));
    match tokio::time::timeout(REQUEST_TIMEOUT, put).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot write this coordinator's record"),
        Err(_) => tracing::warn!("writing this coordinator's record timed out"),
    }
}

/// The knobs of one leader round: the configured churn budget and safety valve, the
/// budget lifted for one round by a one-shot rebalance request. Maintenance mode comes
/// from the snapshot ([`planner_input`]).
pub(crate) fn round_options(view: &ClusterView, churn_budget: usize, max_vanished_fraction: f64) -> PlanOptions {
    PlanOptions { churn_budget: if view.rebalance_requested { usize::MAX } else { churn_budget }, max_vanished_fraction, maintenance: false }
}

/// One term as leader.
struct Term<'a> {
    cfg: &'a Config,
    keys: Keys,
    client: Client,
    inc: Incarnation,
    leader: LeaderKey,
    /// The instance's copy of the cluster.
    cache: Arc<ClusterCache>,
    /// Nodes seen by the last round that did not trip the safety valve.
    previous_nodes: BTreeSet<String>,
    /// When the safety valve tripped, while it holds.
    valve_since: Option<Instant>,
    /// The term's running time, on which every deadline below is measured.
    clock: LeaderClock,
    /// Slices whose claim holder is not their desired owner (a move, or no assignment at
    /// all), since when (running time).
    handoff_since: BTreeMap<SliceKey, (String, Duration)>,
    /// Claims of an unknown holder, since when (running time), and whether alerted.
    unknown_since: BTreeMap<SliceKey, (String, Duration, bool)>,
    /// Assigned slices without any claim.
    stalls: Stalls,
    /// Nodes that get no new slices until the given running time.
    suspects: BTreeMap<String, Duration>,
    /// When the next claim deadline falls, for the loop to reconcile then.
    wake_at: Option<Instant>,
    last_alerts: Vec<String>,
}

/// How a guarded write ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WriteOutcome {
    /// Every transaction committed.
    Written,
    /// The election key is gone: this instance no longer leads.
    Deposed,
    /// A queue's claims changed after the snapshot (the reslice barrier): plan again.
    Stale,
    /// etcd failed or timed out; try again next round.
    Failed,
}

/// Writes `writes` in transactions of at most [`MAX_WRITES_PER_TXN`], each guarded by the
/// leader's election key and, for every queue in `barrier` that the transaction writes an
/// assignment of, by "no key under the queue's claims prefix was written after
/// `revision`". etcd (3.3 and later) applies a compare with a range end to every key in the
/// range, and an empty range compares as a key of revision 0, so the guard holds exactly
/// when no claim of the queue was created or changed after the snapshot.
pub(crate) async fn guarded_write(client: &mut Client, keys: &Keys, leader: &LeaderKey, writes: &[Write], barrier: &BTreeSet<String>, revision: i64) -> WriteOutcome {
    if writes.is_empty() {
        return WriteOutcome::Written;
    }
    for chunk in writes.chunks(MAX_WRITES_PER_TXN) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|w| match w {
                Write::Put(k, v) => TxnOp::put(k.as_str(), v.clone(), None),
                Write::Delete(k) => TxnOp::delete(k.as_str(), None),
            })
            .collect();
        let mut compares = vec![Compare::create_revision(leader.key(), CompareOp::Equal, leader.rev())];
        let queues: BTreeSet<String> = chunk
            .iter()
            .filter_map(|w| match w {
                Write::Put(k, _) => match keys.parse(k.as_bytes()) {
                    Some(qslice_proto::keys::Key::Assignment { queue, .. }) if barrier.contains(&queue) => Some(queue),
                    _ => None,
                },
                Write::Delete(_) => None,
            })
            .collect();
        for queue in &queues {
            compares.push(Compare::mod_revision(keys.queue_claims_prefix(queue), CompareOp::Less, revision + 1).with_prefix());
        }
        // On failure, read the election key in the same transaction: still there means the
        // barrier failed, not the leadership.
        let txn = Txn::new().when(compares).and_then(ops).or_else([TxnOp::get(leader.key(), None)]);
        match tokio::time::timeout(REQUEST_TIMEOUT, client.txn(txn)).await {
            Ok(Ok(resp)) if resp.succeeded() => {}
            Ok(Ok(resp)) => {
                let leads = resp.op_responses().into_iter().any(|r| match r {
                    etcd_client::TxnOpResponse::Get(g) => g.kvs().iter().any(|kv| kv.create_revision() == leader.rev()),
                    _ => false,
                });
                return if leads && !queues.is_empty() { WriteOutcome::Stale } else { WriteOutcome::Deposed };
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "assignment write failed; retrying next round");
                return WriteOutcome::Failed;
            }
            Err(_) => {
                tracing::warn!("assignment write timed out; retrying next round");
                return WriteOutcome::Failed;
            }
        }
    }
    WriteOutcome::Written
}

/// Whether this instance still holds its election key: a transaction comparing the key's
/// create revision (`Ok(false)`: deposed). Used right before a lease revoke, which etcd
/// cannot put in a transaction of its own.
pub(crate) async fn confirm_leadership(client: &mut Client, leader: &LeaderKey) -> Result<bool, String> {
    let txn = Txn::new().when([Compare::create_revision(leader.key(), CompareOp::Equal, leader.rev())]);
    match tokio::time::timeout(REQUEST_TIMEOUT, client.txn(txn)).await {
        Ok(Ok(resp)) => Ok(resp.succeeded()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

impl<'a> Term<'a> {
    fn new(cfg: &'a Config, keys: Keys, client: Client, inc: Incarnation, leader: LeaderKey, cache: Arc<ClusterCache>) -> Term<'a> {
        Term {
            cfg,
            keys,
            client,
            inc,
            leader,
            cache,
            previous_nodes: BTreeSet::new(),
            valve_since: None,
            clock: LeaderClock::new(Instant::now()),
            handoff_since: BTreeMap::new(),
            unknown_since: BTreeMap::new(),
            stalls: Stalls::default(),
            suspects: BTreeMap::new(),
            wake_at: None,
            last_alerts: Vec::new(),
        }
    }

    async fn lead(mut self, shutdown: &CancellationToken, state: &LeaderState) -> TermEnd {
        let mut changes = self.cache.subscribe_changes();
        let mut reconcile_at: Option<Instant> = self.cache.is_listed().then(Instant::now);
        let mut resync = tokio::time::interval(RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let fence = self.inc.fence.clone();
        loop {
            // A claim deadline falling before the next tick wakes the loop then.
            let due = match (reconcile_at, self.wake_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep_until = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                _ = fence.lost().cancelled() => return TermEnd::Fenced,
                _ = shutdown.cancelled() => return TermEnd::Shutdown,
                _ = tokio::time::sleep_until(sleep_until), if due.is_some() => {
                    match self.reconcile().await {
                        Err(end) => return end,
                        Ok(again) => reconcile_at = again.then(|| Instant::now() + DEBOUNCE),
                    }
                    state.leading.store(true, Ordering::SeqCst);
                }
                _ = resync.tick(), if self.cache.is_listed() => {
                    match self.reconcile().await {
                        Err(end) => return end,
                        Ok(again) => reconcile_at = again.then(|| Instant::now() + DEBOUNCE),
                    }
                    state.leading.store(true, Ordering::SeqCst);
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return TermEnd::Shutdown;
                    }
                    if self.cache.take_operator_request() {
                        reconcile_at = Some(Instant::now());
                    } else if reconcile_at.is_none() {
                        reconcile_at = Some(Instant::now() + DEBOUNCE);
                    }
                }
            }
        }
    }

    /// One round; `Ok(true)` asks for another round soon (the snapshot was stale).
    async fn reconcile(&mut self) -> Result<bool, TermEnd> {
        let started = Instant::now();
        let now = self.clock.tick(started);
        self.wake_at = None;
        let view = self.cache.view();
        for problem in &view.problems {
            tracing::warn!(%problem, "unreadable value in etcd; ignoring it");
        }
        let live: BTreeSet<String> = view.nodes.keys().cloned().collect();
        // The safety valve compares against the node set from before the vanishing, for
        // as long as it holds.
        if self.valve_since.is_some_and(|t| t.elapsed() >= self.cfg.safety_valve_hold) {
            tracing::warn!("safety valve hold over: balancing resumes");
            self.valve_since = None;
            self.previous_nodes = live.clone();
        }
        let options = round_options(&view, self.cfg.churn_budget, self.cfg.max_vanished_fraction);
        let PlannerInput { mut input, settled_moves } = planner_input(&view, self.previous_nodes.clone(), options);
        let mut done_requests = Vec::new();
        for settled in &settled_moves {
            let (queue, slice) = &settled.slice;
            if settled.why == MoveSettled::TargetIneligible {
                tracing::warn!(%queue, slice, node = %settled.target, "move request dropped: the target is gone or cordoned");
            }
            done_requests.push(Write::Delete(self.keys.move_request(queue, *slice)));
        }
        if view.rebalance_requested {
            done_requests.push(Write::Delete(self.keys.rebalance()));
        }
        input.stalled = self.stalls.update(&view, now, self.cfg.claim_deadline);
        for slice in &input.stalled {
            if let Some(owner) = self.stalls.owner(slice) {
                if !self.suspects.contains_key(owner) {
                    let (queue, s) = slice;
                    let message = format!("node {owner} did not claim {queue}/{s} within {}; assigning it elsewhere", humantime::format_duration(self.cfg.claim_deadline));
                    tracing::error!(%queue, slice = s, node = %owner, "alert: {message}");
                    self.cache.emit(Event { node: owner.to_owned(), queue: queue.clone(), slice: *s, message, ..event(Kind::Alert) });
                }
                self.suspects.insert(owner.to_owned(), now + SUSPECT_HOLD);
            }
        }
        self.suspects.retain(|node, until| *until > now && live.contains(node));
        input.avoid = self.suspects.keys().cloned().collect();
        let plan = self.plan_preferring_fresh_leases(&view, input, now).await;
        metrics::gauge!("qslice_coordinator_avoided_nodes").set(self.suspects.len() as f64);
        if plan.balance_paused && !view.maintenance && self.valve_since.is_none() {
            self.valve_since = Some(Instant::now());
        }
        if self.valve_since.is_none() {
            self.previous_nodes = live;
        }
        metrics::gauge!("qslice_coordinator_safety_valve_tripped").set(if self.valve_since.is_some() { 1.0 } else { 0.0 });
        metrics::gauge!("qslice_coordinator_maintenance").set(if view.maintenance { 1.0 } else { 0.0 });
        // A queue no node may take is alerted by every instance's cache (crate::health),
        // leader and standbys alike; the plan's other alerts only the leader knows.
        let alerts: Vec<String> = plan.alerts.iter().filter(|a| !matches!(a, Alert::Uncovered { .. })).map(|a| a.to_string()).collect();
        if alerts != self.last_alerts {
            for alert in &alerts {
                tracing::error!(%alert, "alert");
                self.cache.emit(Event { message: alert.clone(), ..event(Kind::Alert) });
            }
            self.last_alerts = alerts;
        }
        let mut writes = assignment_writes(&self.keys, &view, &plan.assignment);
        let written: BTreeSet<String> = plan.assignment.keys().map(|(q, _)| q.clone()).collect();
        let barrier = barrier_queues(&view, &written);
        writes.extend(done_requests);
        match guarded_write(&mut self.client, &self.keys, &self.leader, &writes, &barrier, view.revision).await {
            WriteOutcome::Written => {}
            WriteOutcome::Deposed => {
                tracing::error!("assignment write refused: this instance's election key is gone (deposed)");
                return Err(TermEnd::Deposed);
            }
            WriteOutcome::Stale => {
                tracing::info!(queues = ?barrier, revision = view.revision, "a claim changed after the snapshot of a queue being assigned under a new slice count; planning again");
                return Ok(true);
            }
            WriteOutcome::Failed => return Ok(false),
        }
        for m in &plan.moves {
            metrics::counter!("qslice_coordinator_moves_total", "reason" => m.reason.as_str()).increment(1);
            tracing::info!(queue = %m.queue, slice = m.slice, from = m.from.as_deref().unwrap_or("-"), to = %m.to, reason = %m.reason, "assigned slice");
        }
        self.wake_at = self.stalls.next_due(now, self.cfg.claim_deadline).map(|d| Instant::now() + d);
        self.enforce_revoke_deadline(&view, &plan.assignment, now).await?;
        metrics::gauge!("qslice_coordinator_reconcile_seconds").set(started.elapsed().as_secs_f64());
        Ok(false)
    }

    /// Plans; when the plan gives orphans to nodes, asks etcd how much time their leases
    /// have left and plans again avoiding those that missed a keepalive (a node dying too
    /// would strand its takeovers for another TTL). Only the receivers of takeovers are
    /// asked, and only in rounds that have takeovers.
    async fn plan_preferring_fresh_leases(&mut self, view: &ClusterView, mut input: PlanInput, now: Duration) -> Plan {
        let first = plan(&input);
        let takeover = |r: MoveReason| matches!(r, MoveReason::Orphaned | MoveReason::NewQueueSlice | MoveReason::Unclaimed);
        let receivers: BTreeSet<&str> = first.moves.iter().filter(|m| takeover(m.reason) && !input.avoid.contains(&m.to)).map(|m| m.to.as_str()).collect();
        if receivers.is_empty() {
            return first;
        }
        let mut asks = tokio::task::JoinSet::new();
        for node in receivers {
            let Some(lease) = view.nodes.get(node).map(|n| n.lease_id).filter(|l| *l != 0) else { continue };
            let (mut client, node) = (self.client.clone(), node.to_owned());
            asks.spawn(async move {
                let reply = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_time_to_live(lease, None)).await;
                (node, reply)
            });
        }
        let mut stale = Vec::new();
        while let Some(Ok((node, reply))) = asks.join_next().await {
            match reply {
                Ok(Ok(r)) if lease_is_stale(r.ttl(), r.granted_ttl()) => {
                    tracing::warn!(%node, remaining = r.ttl(), granted = r.granted_ttl(), "this node's lease missed a keepalive; it gets no new slices for now");
                    stale.push(node);
                }
                Ok(Ok(_)) => {}
                // Cannot tell: plan as if fresh (the claim deadline still catches it).
                Ok(Err(e)) => tracing::debug!(%node, error = %e, "cannot read a lease's time to live"),
                Err(_) => tracing::debug!(%node, "reading a lease's time to live timed out"),
            }
        }
        if stale.is_empty() {
            return first;
        }
        for node in stale {
            self.suspects.insert(node.clone(), now + SUSPECT_HOLD);
            input.avoid.insert(node);
        }
        plan(&input)
    }

    /// Fences the holders of claims that no desired owner explains, once they have held
    /// them past the revoke deadline (running time): an old owner that does not release a
    /// moved slice, or a live node that holds a slice no assignment gives it (left by a
    /// release whose outcome it never learnt, or by a drain that hangs). Fencing is a lease
    /// revoke, always preceded by a transaction that confirms this instance still leads.
    /// A claim whose holder is not a live node on its current lease is alerted on only:
    /// revoking a lease nobody explains could fence a process this leader knows nothing
    /// of, and etcd ends such a lease by itself unless something keeps it alive.
    async fn enforce_revoke_deadline(&mut self, view: &ClusterView, desired: &BTreeMap<SliceKey, String>, now: Duration) -> Result<(), TermEnd> {
        let states = classify_claims(view, desired);
        self.track_unexplained_claims(view, &states, now);
        self.alert_unknown_holders(view, now);
        let mut revoked = BTreeSet::new();
        let mut confirmed = false;
        let due: Vec<(SliceKey, String)> = self
            .handoff_since
            .iter()
            .filter(|(_, (_, since))| now.saturating_sub(*since) >= self.cfg.revoke_deadline)
            .map(|(k, (holder, _))| (k.clone(), holder.clone()))
            .collect();
        for ((queue, slice), holder) in due {
            if revoked.contains(&holder) {
                continue;
            }
            let Some(lease) = view.claims.get(&(queue.clone(), slice)).map(|c| c.lease) else { continue };
            // A deposed leader must not revoke: confirm leadership first, even in a round
            // that wrote nothing (an empty write checks nothing).
            if !confirmed {
                if !self.inc.fence.is_valid() {
                    return Err(TermEnd::Fenced);
                }
                match confirm_leadership(&mut self.client, &self.leader).await {
                    Ok(true) => confirmed = true,
                    Ok(false) => {
                        tracing::error!(%queue, slice, node = %holder, "not revoking: this instance's election key is gone (deposed)");
                        return Err(TermEnd::Deposed);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot confirm leadership before a revoke; trying next round");
                        return Ok(());
                    }
                }
            }
            let unassigned = states.get(&(queue.clone(), slice)) == Some(&ClaimState::Unassigned);
            if unassigned {
                let message =
                    format!("{holder} holds {queue}/{slice}, which no assignment gives it, past {}; revoking its lease", humantime::format_duration(self.cfg.revoke_deadline));
                tracing::error!(%queue, slice, node = %holder, lease, "alert: {message}");
                metrics::counter!("qslice_coordinator_unexplained_claims_total", "action" => "revoked").increment(1);
                self.cache.emit(Event { node: holder.clone(), queue: queue.clone(), slice, message, ..event(Kind::Alert) });
            } else {
                tracing::warn!(%queue, slice, node = %holder, lease, deadline = ?self.cfg.revoke_deadline, "owner did not release a moved slice in time; revoking its lease (fencing it)");
            }
            let deadline = humantime::format_duration(self.cfg.revoke_deadline);
            let why = if unassigned {
                format!("held {queue}/{slice}, which no assignment gives it, past {deadline}")
            } else {
                format!("did not release {queue}/{slice} within {deadline}")
            };
            match revoke_with_hold(&mut self.client, &self.keys, &holder, lease, &why).await {
                Ok(Revoked::Revoked { hold, slices, singletons }) => {
                    metrics::counter!("qslice_coordinator_fenced_nodes_total").increment(1);
                    let hold = humantime::format_duration(hold);
                    tracing::warn!(node = %holder, lease, slices, singletons, %hold, "lease revoked; its slices and singletons are held back until its fence has surely expired");
                    let message = format!("{why}; lease revoked, its {slices} slices and {singletons} singletons held back for {hold} (until its fence has expired)");
                    self.cache.emit(Event { node: holder.clone(), queue: queue.clone(), slice, message, ..event(Kind::NodeFenced) });
                    revoked.insert(holder.clone());
                }
                Ok(Revoked::AlreadyGone) => {
                    tracing::info!(node = %holder, lease, "not revoking: the lease has ended already");
                    revoked.insert(holder.clone());
                }
                Err(e) => tracing::warn!(node = %holder, lease, error = %e, "revoking the lease failed; trying again next round"),
            }
        }
        Ok(())
    }

    /// Since when each claim the assignment does not explain (a moved slice not yet
    /// released, a claim no assignment gives, a holder that is not a live node's current
    /// lease) has been held by its current holder; claims explained again are forgotten.
    fn track_unexplained_claims(&mut self, view: &ClusterView, states: &BTreeMap<SliceKey, ClaimState>, now: Duration) {
        let mut stuck = BTreeMap::new();
        let mut unknown = BTreeMap::new();
        for (slice, state) in states {
            let Some(claim) = view.claims.get(slice) else { continue };
            match state {
                ClaimState::Explained => {}
                ClaimState::Moving { .. } | ClaimState::Unassigned => {
                    let since = match self.handoff_since.get(slice) {
                        Some((holder, since)) if holder == &claim.node => *since,
                        _ => now,
                    };
                    stuck.insert(slice.clone(), (claim.node.clone(), since));
                }
                ClaimState::UnknownHolder => {
                    let (since, alerted) = match self.unknown_since.get(slice) {
                        Some((holder, since, alerted)) if holder == &claim.node => (*since, *alerted),
                        _ => (now, false),
                    };
                    unknown.insert(slice.clone(), (claim.node.clone(), since, alerted));
                }
            }
        }
        self.handoff_since = stuck;
        self.unknown_since = unknown;
    }

    /// Alerts once on each claim held past the revoke deadline by a holder that is not a
    /// live node's current lease (never revoked: see [`Self::enforce_revoke_deadline`]).
    fn alert_unknown_holders(&mut self, view: &ClusterView, now: Duration) {
        for ((queue, slice), (holder, since, alerted)) in self.unknown_since.iter_mut() {
            if *alerted || now.saturating_sub(*since) < self.cfg.revoke_deadline {
                continue;
            }
            *alerted = true;
            let lease = view.claims.get(&(queue.clone(), *slice)).map(|c| c.lease).unwrap_or_default();
            let message = format!(
                "claim of {queue}/{slice} held by {holder} on lease {lease:x}, which is not a live node's current lease, for {}; not revoking it",
                humantime::format_duration(self.cfg.revoke_deadline)
            );
            tracing::error!(%queue, slice, node = %holder, lease, "alert: {message}");
            metrics::counter!("qslice_coordinator_unexplained_claims_total", "action" => "alerted").increment(1);
            self.cache.emit(Event { node: holder.clone(), queue: queue.clone(), slice: *slice, message, ..event(Kind::Alert) });
        }
    }
}

#[cfg(test)]
mod tests {
    //! The guarded write against a real etcd (`/usr/bin/etcd`, or `$QSLICE_TEST_ETCD`),
    //! started by the test on free loopback ports and killed when it ends.

    use super::*;
    use std::process::{Child, Command, Stdio};

    /// An etcd process of one test, killed (and its data dir removed) on drop.
    struct TestEtcd {
        child: Child,
        endpoint: String,
        _dir: tempfile::TempDir,
    }

    impl Drop for TestEtcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
    }

    /// Starts etcd and connects; retries with fresh ports if one was taken meanwhile.
    async fn start_etcd() -> (TestEtcd, Client) {
        let binary = std::env::var("QSLICE_TEST_ETCD").unwrap_or_else(|_| "/usr/bin/etcd".into());
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let (client_port, peer_port) = (free_port(), free_port());
            let endpoint = format!("http://127.0.0.1:{client_port}");
            let peer = format!("http://127.0.0.1:{peer_port}");
            let child = Command::new(&binary)
                .args(["--name", "t", "--data-dir"])
                .arg(dir.path().join("data"))
                .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
                .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer, "--initial-cluster", &format!("t={peer}")])
                .args(["--heartbeat-interval", "50", "--election-timeout", "500", "--log-level", "warn", "--logger", "zap"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start etcd (install etcd-server)");
            let mut etcd = TestEtcd { child, endpoint, _dir: dir };
            // Generous: a loaded two-core machine.
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && etcd.child.try_wait().ok().flatten().is_none() {
                let options = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(2)).with_connect_timeout(Duration::from_secs(2));
                if let Ok(mut client) = Client::connect([etcd.endpoint.clone()], Some(options)).await {
                    if client.status().await.is_ok() {
                        return (etcd, client);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = etcd.child.kill();
        }
        panic!("etcd did not start");
    }

    #[tokio::test]
    async fn a_claim_written_after_the_snapshot_fails_the_barrier_write_and_a_deposed_leader_is_told() {
        let (_etcd, mut client) = start_etcd().await;
        let keys = Keys::new("t").expect("keys");
        let lease = client.lease_grant(30, None).await.expect("lease").id();
        let leader = client.campaign(keys.election(), "c1", lease).await.expect("campaign").leader().cloned().expect("leader key");
        let assignment = Write::Put(keys.assignment("n1", "in"), b"a".to_vec());
        let barrier = BTreeSet::from(["in".to_owned()]);
        // The snapshot saw claim in/0; nothing changed since: the write goes through.
        let seen = client.put(keys.claim("in", 0), "c", None).await.expect("put").header().expect("header").revision();
        assert_eq!(guarded_write(&mut client, &keys, &leader, std::slice::from_ref(&assignment), &barrier, seen).await, WriteOutcome::Written);
        // A claim the snapshot did not see fails it, and nothing is written.
        client.put(keys.claim("in", 1), "c", None).await.expect("put");
        let late = Write::Put(keys.assignment("n1", "in"), b"b".to_vec());
        assert_eq!(guarded_write(&mut client, &keys, &leader, std::slice::from_ref(&late), &barrier, seen).await, WriteOutcome::Stale);
        let stored = client.get(keys.assignment("n1", "in"), None).await.expect("get");
        assert_eq!(stored.kvs().first().map(|kv| kv.value().to_vec()), Some(b"a".to_vec()), "the stale write left the key alone");
        // Without the barrier the same write goes through (what the leader did before).
        assert_eq!(guarded_write(&mut client, &keys, &leader, std::slice::from_ref(&late), &BTreeSet::new(), seen).await, WriteOutcome::Written);
        // A queue with no claims at all passes (an empty range compares as revision 0).
        let other = Write::Put(keys.assignment("n1", "other"), b"o".to_vec());
        assert_eq!(guarded_write(&mut client, &keys, &leader, std::slice::from_ref(&other), &BTreeSet::from(["other".to_owned()]), 1).await, WriteOutcome::Written);
        assert_eq!(confirm_leadership(&mut client, &leader).await, Ok(true));
        // The election key gone: every write and the confirmation say deposed.
        client.delete(leader.key(), None).await.expect("delete");
        assert_eq!(guarded_write(&mut client, &keys, &leader, &[late], &barrier, i64::MAX - 1).await, WriteOutcome::Deposed);
        assert_eq!(guarded_write(&mut client, &keys, &leader, &[other], &BTreeSet::new(), 0).await, WriteOutcome::Deposed);
        assert_eq!(confirm_leadership(&mut client, &leader).await, Ok(false));
    }
}
