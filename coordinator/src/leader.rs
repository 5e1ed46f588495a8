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
//! Batching: at most 127 writes per transaction (etcd allows 128 operations; one is the
//! leader compare). Assignment values are per (node, queue) and hold slice ranges, so a
//! failover of one node among 1,000 with 100,000 slices rewrites at most one key per
//! receiving node and queue.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, LeaderKey, ResignOptions, Txn, TxnOp};
use qslice_proto::admin::event::Kind;
use qslice_proto::admin::Event;
use qslice_proto::keys::Keys;
use qslice_proto::records::{CoordinatorRecord, Record, RECORD_VERSION};
use qslice_common::etcd::{connect_when_ready, EtcdError, REQUEST_TIMEOUT};
use qslice_common::lease::{grant_lease, keep_alive, Incarnation, Role};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::{event, ClusterCache};
use crate::config::Config;
use crate::planner::{plan, Alert, PlanOptions, SliceKey};
use crate::view::{assignment_writes, planner_input, ClusterView, MoveSettled, PlannerInput, Write};

/// Operations per transaction besides the leader compare (etcd's limit is 128).
const MAX_WRITES_PER_TXN: usize = 127;
/// Quiet time after a change before reconciling, so a burst of events plans once.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// Reconcile at least this often (revoke deadlines, safety valve hold).
const RESYNC: Duration = Duration::from_secs(1);

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
    let mut backoff = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        let inc = match grant_lease(&mut client, cfg.lease_ttl).await {
            Ok(inc) => inc,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot get an election lease");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        register(&mut client, &keys, &cfg, inc.lease_id).await;
        let keeper = {
            let (client, inc) = (client.clone(), inc.clone());
            tokio::spawn(async move { keep_alive(client, &inc, Role::Coordinator).await })
        };
        tracing::info!(id = %cfg.id, lease = inc.lease_id, "campaigning for leadership");
        let campaign = tokio::select! {
            r = client.campaign(keys.election(), cfg.id.as_bytes(), inc.lease_id) => Some(r),
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
                tokio::time::sleep(backoff).await;
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

/// Writes this instance's record (id and addresses) on its lease, for GetStatus.
async fn register(client: &mut Client, keys: &Keys, cfg: &Config, lease: i64) {
    let record = CoordinatorRecord {
        v: RECORD_VERSION,
        id: cfg.id.clone(),
        admin_addr: Some(cfg.admin.addr.to_string()),
        http_addr: cfg.http_addr.map(|a| a.to_string()),
    };
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
    PlanOptions {
        churn_budget: if view.rebalance_requested { usize::MAX } else { churn_budget },
        max_vanished_fraction,
        maintenance: false,
    }
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
    /// Slices whose claim holder is not their desired owner, since when.
    handoff_since: BTreeMap<SliceKey, (String, Instant)>,
    last_alerts: Vec<String>,
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
            handoff_since: BTreeMap::new(),
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
            let due = reconcile_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                _ = fence.lost().cancelled() => return TermEnd::Fenced,
                _ = shutdown.cancelled() => return TermEnd::Shutdown,
                _ = tokio::time::sleep_until(due), if reconcile_at.is_some() => {
                    reconcile_at = None;
                    if let Err(end) = self.reconcile().await { return end; }
                    state.leading.store(true, Ordering::SeqCst);
                }
                _ = resync.tick(), if self.cache.is_listed() => {
                    if let Err(end) = self.reconcile().await { return end; }
                    state.leading.store(true, Ordering::SeqCst);
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return TermEnd::Shutdown;
                    }
                    if reconcile_at.is_none() {
                        reconcile_at = Some(Instant::now() + DEBOUNCE);
                    }
                }
            }
        }
    }

    async fn reconcile(&mut self) -> Result<(), TermEnd> {
        let started = Instant::now();
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
        let PlannerInput { input, settled_moves } = planner_input(&view, self.previous_nodes.clone(), options);
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
        let plan = plan(&input);
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
        writes.extend(done_requests);
        self.write(&writes).await?;
        for m in &plan.moves {
            metrics::counter!("qslice_coordinator_moves_total", "reason" => m.reason.as_str()).increment(1);
            tracing::info!(queue = %m.queue, slice = m.slice, from = m.from.as_deref().unwrap_or("-"), to = %m.to, reason = %m.reason, "assigned slice");
        }
        self.enforce_revoke_deadline(&view, &plan.assignment).await;
        metrics::gauge!("qslice_coordinator_reconcile_seconds").set(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Writes in transactions guarded by the leader key; a failed compare means this
    /// instance is no longer the leader.
    async fn write(&mut self, writes: &[Write]) -> Result<(), TermEnd> {
        for chunk in writes.chunks(MAX_WRITES_PER_TXN) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|w| match w {
                    Write::Put(k, v) => TxnOp::put(k.as_str(), v.clone(), None),
                    Write::Delete(k) => TxnOp::delete(k.as_str(), None),
                })
                .collect();
            let txn = Txn::new()
                .when([Compare::create_revision(self.leader.key(), CompareOp::Equal, self.leader.rev())])
                .and_then(ops);
            match tokio::time::timeout(REQUEST_TIMEOUT, self.client.txn(txn)).await {
                Ok(Ok(resp)) if resp.succeeded() => {}
                Ok(Ok(_)) => {
                    tracing::error!("assignment write refused: this instance's election key is gone (deposed)");
                    return Err(TermEnd::Deposed);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "assignment write failed; retrying next round");
                    return Ok(());
                }
                Err(_) => {
                    tracing::warn!("assignment write timed out; retrying next round");
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Fences an old owner that holds a moved slice's claim past the revoke deadline by
    /// revoking its lease, so that the move completes.
    async fn enforce_revoke_deadline(&mut self, view: &ClusterView, desired: &BTreeMap<SliceKey, String>) {
        let mut stuck = BTreeMap::new();
        for (slice, claim) in &view.claims {
            let moved = desired.get(slice).is_some_and(|owner| owner != &claim.node);
            if moved && view.nodes.contains_key(&claim.node) {
                let since = match self.handoff_since.get(slice) {
                    Some((holder, since)) if holder == &claim.node => *since,
                    _ => Instant::now(),
                };
                stuck.insert(slice.clone(), (claim.node.clone(), since));
            }
        }
        self.handoff_since = stuck;
        let mut revoked = BTreeSet::new();
        for ((queue, slice), (holder, since)) in &self.handoff_since {
            if since.elapsed() < self.cfg.revoke_deadline || revoked.contains(holder) {
                continue;
            }
            let Some(lease) = view.claims.get(&(queue.clone(), *slice)).map(|c| c.lease) else { continue };
            tracing::warn!(%queue, slice, node = %holder, lease, deadline = ?self.cfg.revoke_deadline, "owner did not release a moved slice in time; revoking its lease (fencing it)");
            match tokio::time::timeout(REQUEST_TIMEOUT, self.client.lease_revoke(lease)).await {
                Ok(Ok(_)) => {
                    metrics::counter!("qslice_coordinator_fenced_nodes_total").increment(1);
                    let message = format!("did not release {queue}/{slice} within {}; lease revoked", humantime::format_duration(self.cfg.revoke_deadline));
                    self.cache.emit(Event { node: holder.clone(), queue: queue.clone(), slice: *slice, message, ..event(Kind::NodeFenced) });
                    revoked.insert(holder.clone());
                }
                Ok(Err(e)) => tracing::warn!(node = %holder, error = %e, "revoking the lease failed"),
                Err(_) => tracing::warn!(node = %holder, "revoking the lease timed out"),
            }
        }
    }
}
