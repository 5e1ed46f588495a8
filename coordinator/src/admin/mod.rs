//! The admin API's decisions, in plain Rust: validation, reads from the instance's
//! [`ClusterCache`], and mutations written to etcd as configuration or intent that the
//! leader acts on (so any instance, leader or standby, can take them).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, DeleteOptions, Txn, TxnOp};
use qslice_common::etcd::REQUEST_TIMEOUT;
use qslice_proto::admin::{
    CoordinatorInfo, DrainProgress, Event, ExplainNode, ExplainSliceResponse, GetStatusResponse, NodeInfo, PlannedMove, QueueInfo, RebalanceResponse, SingletonInfo, SliceInfo,
    SliceMove, SliceRef,
};
use qslice_proto::keys::{validate_name, Keys};
use qslice_proto::records::{
    Claim, Cordon, Maintenance, MoveRequest, Pin as PinRecord, QueueConfig, RebalanceRequest, Record, SingletonClaim, SingletonRun, SliceFigures, RECORD_VERSION,
};
use qslice_proto::slice::validate_slice_count;
use tokio_stream::Stream;

use crate::cache::ClusterCache;
use crate::config::AdminConfig;
use crate::health::{active_alerts, in_flight_too_long, no_eligible_node, queue_state, refused_by};
use crate::history::{MoveHistory, SeenMove};
use crate::planner::{plan, NodeSpec, PlanInput, PlanOptions};
use crate::view::{planner_input, ClusterView};
use qslice_common::lease::unix_ms;

mod explain;

pub use explain::{explain_slice, ExplainFacts};

/// Why an admin call failed; mapped to a gRPC status in one place (`service.rs`).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No bearer token was sent.
    #[error("this call needs a bearer token (authorization: Bearer <token>)")]
    Unauthenticated,
    /// The token is wrong.
    #[error("the bearer token is not accepted")]
    PermissionDenied,
    /// An unknown queue, node or slice.
    #[error("{what} {name:?} does not exist")]
    NotFound {
        /// "queue", "node", "slice" or "pin".
        what: &'static str,
        /// What was asked for.
        name: String,
    },
    /// A bad argument; the message names the field.
    #[error("{field}: {message}")]
    Invalid {
        /// The request field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// etcd failed or did not answer.
    #[error("etcd: {0}")]
    Etcd(String),
    /// The call cannot be done in the cluster's current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The instance has not read the cluster yet.
    #[error("this coordinator has not read the cluster from etcd yet; retry shortly")]
    NotReady,
}

fn invalid(field: &'static str, message: impl Into<String>) -> AdminError {
    AdminError::Invalid { field, message: message.into() }
}

fn not_found(what: &'static str, name: impl Into<String>) -> AdminError {
    AdminError::NotFound { what, name: name.into() }
}

/// Whether a call reads or changes the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A read.
    Read,
    /// A change.
    Mutate,
}

impl Access {
    /// What a rebalance needs: a dry run only reads.
    pub fn rebalance(dry_run: bool) -> Access {
        if dry_run {
            Access::Read
        } else {
            Access::Mutate
        }
    }
}

/// The admin API's state, shared by every call.
pub struct Admin {
    client: Client,
    keys: Keys,
    cache: Arc<ClusterCache>,
    cfg: AdminConfig,
    /// The slice moves this instance saw, for ExplainSlice.
    history: Arc<MoveHistory>,
}

/// The singletons as status rows, from their stored claims and last settled slots
/// (`keys` names the cluster; `now_ms` for the time held).
pub fn singleton_rows(keys: &Keys, stored: &BTreeMap<String, (Vec<u8>, i64)>, now_ms: i64) -> Vec<SingletonInfo> {
    let mut rows: BTreeMap<String, SingletonInfo> = BTreeMap::new();
    let runs = keys.singleton_runs_prefix();
    for (key, (value, create_revision)) in stored {
        if let Some(name) = keys.parse_singleton(key.as_bytes()) {
            let row = rows.entry(name.clone()).or_insert_with(|| SingletonInfo { name, ..SingletonInfo::default() });
            match SingletonClaim::decode(value) {
                Ok(c) => {
                    row.holder = c.node_id;
                    row.incarnation = c.incarnation.to_string();
                    row.held_seconds = u64::try_from(now_ms - c.claimed_unix_ms).unwrap_or(0) / 1000;
                }
                Err(_) => row.holder = "(unreadable claim)".into(),
            }
            row.epoch = *create_revision;
        } else if let Some(name) = key.strip_prefix(&runs).filter(|n| validate_name("singleton", n).is_ok()) {
            let row = rows.entry(name.to_owned()).or_insert_with(|| SingletonInfo { name: name.to_owned(), ..SingletonInfo::default() });
            if let Ok(r) = SingletonRun::decode(value) {
                row.last_slot_unix_seconds = r.last_slot_unix_ms / 1000;
                row.last_outcome = r.outcome;
            }
        }
    }
    rows.into_values().collect()
}

/// A stream of drain progress reports.
pub type DrainStream = Pin<Box<dyn Stream<Item = Result<DrainProgress, AdminError>> + Send>>;

impl Admin {
    /// The admin API over `client`, answering reads from `cache`.
    /// Starts following the cache's events for ExplainSlice's last move (when called
    /// inside a tokio runtime).
    pub fn new(client: Client, keys: Keys, cache: Arc<ClusterCache>, cfg: AdminConfig) -> Admin {
        let history = Arc::new(MoveHistory::new(unix_ms()));
        crate::history::spawn(history.clone(), &cache);
        Admin { client, keys, cache, cfg, history }
    }

    /// Checks the bearer token (`authorization` metadata value) for a call.
    pub fn authorize(&self, authorization: Option<&str>, access: Access) -> Result<(), AdminError> {
        let Some(token) = &self.cfg.token else { return Ok(()) };
        if access == Access::Read && !self.cfg.protect_reads {
            return Ok(());
        }
        let sent = authorization.ok_or(AdminError::Unauthenticated)?;
        let sent = sent.strip_prefix("Bearer ").ok_or(AdminError::Unauthenticated)?;
        if constant_time_eq::constant_time_eq(sent.trim().as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(AdminError::PermissionDenied)
        }
    }

    fn view(&self) -> Result<ClusterView, AdminError> {
        if !self.cache.is_listed() {
            return Err(AdminError::NotReady);
        }
        Ok(self.cache.view())
    }

    async fn put(&self, key: String, value: Vec<u8>) -> Result<(), AdminError> {
        let mut client = self.client.clone();
        match tokio::time::timeout(REQUEST_TIMEOUT, client.put(key, value, None)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(AdminError::Etcd(e.to_string())),
            Err(_) => Err(AdminError::Etcd(format!("no answer within {REQUEST_TIMEOUT:?}"))),
        }
    }

    async fn txn(&self, ops: Vec<TxnOp>) -> Result<(), AdminError> {
        let mut client = self.client.clone();
        match tokio::time::timeout(REQUEST_TIMEOUT, client.txn(Txn::new().and_then(ops))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(AdminError::Etcd(e.to_string())),
            Err(_) => Err(AdminError::Etcd(format!("no answer within {REQUEST_TIMEOUT:?}"))),
        }
    }

    /// Leader, standbys, nodes, queues and (optionally) every slice.
    pub fn status(&self, include_slices: bool) -> Result<GetStatusResponse, AdminError> {
        let view = self.view()?;
        let leader_id = self.cache.leader();
        let info = |id: &str| CoordinatorInfo { id: id.to_owned(), admin_address: view.coordinators.get(id).and_then(|c| c.admin_addr.clone()).unwrap_or_default() };
        let slices = if include_slices { self.slice_rows(&view) } else { Vec::new() };
        Ok(GetStatusResponse {
            cluster: self.keys.root().trim_start_matches("/qslice/").trim_end_matches('/').to_owned(),
            leader: leader_id.as_deref().map(info),
            standbys: view.coordinators.keys().filter(|id| Some(*id) != leader_id.as_ref()).map(|id| info(id)).collect(),
            nodes: self.node_rows(&view),
            queues: queue_rows(&view),
            slices,
            maintenance: view.maintenance,
            alerts: active_alerts(&view, unix_ms(), &self.cache.alert_settings()).into_iter().map(|a| a.message).collect(),
            // `singletons/` claims and `singleton-runs/` slots: kept by the cache, not decoded
            // into the snapshot (they never change the plan).
            singletons: singleton_rows(&self.keys, &self.cache.raw_under(&format!("{}singleton", self.keys.root())), unix_ms()),
        })
    }

    /// Every live node.
    pub fn nodes(&self) -> Result<Vec<NodeInfo>, AdminError> {
        Ok(self.node_rows(&self.view()?))
    }

    /// Every queue.
    pub fn queues(&self) -> Result<Vec<QueueInfo>, AdminError> {
        Ok(queue_rows(&self.view()?))
    }

    fn node_rows(&self, view: &ClusterView) -> Vec<NodeInfo> {
        let mut held: BTreeMap<&str, u32> = BTreeMap::new();
        for c in view.claims.values() {
            *held.entry(c.node.as_str()).or_default() += 1;
        }
        view.nodes
            .values()
            .map(|n| NodeInfo {
                id: n.node_id.clone(),
                host: n.host.clone(),
                weight: n.weight,
                queues: n.queues.clone(),
                cordoned: view.cordons.contains(&n.node_id),
                incarnation: n.incarnation.to_string(),
                age_seconds: ((unix_ms() - n.started_unix_ms).max(0) / 1000) as u64,
                slices_held: held.get(n.node_id.as_str()).copied().unwrap_or(0),
                version: n.version.clone(),
                metrics_address: n.metrics_addr.clone().unwrap_or_default(),
            })
            .collect()
    }

    fn slice_rows(&self, view: &ClusterView) -> Vec<SliceInfo> {
        let desired = view.current_assignment();
        let figures = view.slice_figures();
        let settings = self.cache.alert_settings();
        let now = unix_ms();
        let mut rows = Vec::new();
        for (name, q) in &view.queues {
            let no_eligible = no_eligible_node(view, q).is_some();
            for s in 0..q.slices {
                let k = (name.clone(), s);
                let claim = view.claims.get(&k);
                let (listed, f) = match figures.get(&k) {
                    Some((listed, f)) => (*listed, f.clone()),
                    None => (now, SliceFigures { slice: s, depth: 0, in_flight: 0, oldest_age_ms: 0, oldest_in_flight_age_ms: 0 }),
                };
                rows.push(SliceInfo {
                    queue: name.clone(),
                    slice: s,
                    desired_owner: desired.get(&k).cloned().unwrap_or_default(),
                    claim_holder: claim.map(|c| c.node.clone()).unwrap_or_default(),
                    epoch: claim.map(|c| c.epoch).unwrap_or(0),
                    depth: f.depth,
                    oldest_entry_age_seconds: f.oldest_age_ms as f64 / 1000.0,
                    unowned_seconds: if claim.is_some() { 0.0 } else { self.cache.unowned_for(&k).unwrap_or(0.0) },
                    pinned: view.pins.contains_key(&k),
                    in_flight: f.in_flight,
                    // 0 with entries in flight: a runner too old to publish the age.
                    oldest_in_flight_age_seconds: if f.in_flight > 0 && f.oldest_in_flight_age_ms > 0 {
                        crate::health::aged(f.oldest_in_flight_age_ms, listed, now) as f64 / 1000.0
                    } else {
                        0.0
                    },
                    in_flight_too_long: in_flight_too_long(f.in_flight, f.oldest_in_flight_age_ms, listed, now, &settings),
                    no_eligible_node: no_eligible,
                    held_after_revoke_of: view.holds.get(&k).cloned().unwrap_or_default(),
                });
            }
        }
        rows
    }

    fn live_node(&self, view: &ClusterView, field: &'static str, node: &str) -> Result<(), AdminError> {
        if node.is_empty() {
            return Err(invalid(field, "a node id is required"));
        }
        if !view.nodes.contains_key(node) {
            return Err(not_found("node", node));
        }
        Ok(())
    }

    /// Cordons a live node: it gets no new slices and its slices move away.
    pub async fn cordon(&self, node: &str) -> Result<NodeInfo, AdminError> {
        let view = self.view()?;
        self.live_node(&view, "node", node)?;
        let record = Cordon { v: RECORD_VERSION, reason: "cordoned through the admin API".into(), since_unix_ms: unix_ms() };
        self.put(self.keys.cordon(node), record.encode()).await?;
        let mut row = self.node_rows(&view).into_iter().find(|n| n.id == node).ok_or_else(|| not_found("node", node))?;
        row.cordoned = true;
        Ok(row)
    }

    /// Lifts a cordon.
    pub async fn uncordon(&self, node: &str) -> Result<NodeInfo, AdminError> {
        let view = self.view()?;
        if !view.cordons.contains(node) && !view.nodes.contains_key(node) {
            return Err(not_found("node", node));
        }
        self.txn(vec![TxnOp::delete(self.keys.cordon(node), None)]).await?;
        let row = self.node_rows(&view).into_iter().find(|n| n.id == node);
        Ok(row
            .map(|mut r| {
                r.cordoned = false;
                r
            })
            .unwrap_or(NodeInfo { id: node.to_owned(), ..NodeInfo::default() }))
    }

    /// Cordons the node, then reports progress until it holds no slice or the deadline.
    pub async fn drain(self: &Arc<Self>, node: &str, timeout: Duration) -> Result<DrainStream, AdminError> {
        self.cordon(node).await?;
        let deadline = tokio::time::Instant::now() + if timeout.is_zero() { self.cfg.drain_deadline } else { timeout };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (me, node) = (self.clone(), node.to_owned());
        tokio::spawn(async move {
            let mut first = None;
            let mut last_sent = None;
            loop {
                let view = me.cache.view();
                let held = view.claims.values().filter(|c| c.node == node).count() as u32;
                let assigned: u32 = view.assignments.iter().filter(|((n, _), _)| n == &node).map(|(_, a)| a.slices.len() as u32).sum();
                let remaining = held.max(assigned);
                let start = *first.get_or_insert(remaining);
                let done = remaining == 0;
                let expired = tokio::time::Instant::now() >= deadline;
                let message = if done {
                    format!("{node} holds no slice: drained")
                } else if expired {
                    format!("deadline reached with {remaining} slices still on {node}")
                } else {
                    format!("{remaining} slices still on {node}")
                };
                if last_sent != Some(remaining) || done || expired {
                    let progress = DrainProgress { node: node.clone(), slices_remaining: remaining, slices_moved: start.saturating_sub(remaining), done, message };
                    if tx.send(Ok(progress)).await.is_err() {
                        return;
                    }
                    last_sent = Some(remaining);
                }
                if done || expired {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// Creates a queue, or changes its slice count (the leader reslices in two phases).
    pub async fn put_queue(&self, name: &str, slices: u32, mailman3: bool) -> Result<QueueInfo, AdminError> {
        validate_name("queue", name).map_err(|e| invalid("name", e.to_string()))?;
        validate_slice_count(slices, mailman3).map_err(|e| invalid("slices", e.to_string()))?;
        let mut view = self.view()?;
        let paused = view.queues.get(name).is_some_and(|q| q.paused);
        let record = QueueConfig { v: RECORD_VERSION, name: name.to_owned(), slices, paused, mailman3 };
        self.put(self.keys.queue(name), record.encode()).await?;
        // The reply shows the queue as the leader will see it (state included).
        view.queues.insert(name.to_owned(), record.clone());
        Ok(queue_row(&view, &record))
    }

    fn queue(&self, view: &ClusterView, name: &str) -> Result<QueueConfig, AdminError> {
        validate_name("queue", name).map_err(|e| invalid("name", e.to_string()))?;
        view.queues.get(name).cloned().ok_or_else(|| not_found("queue", name))
    }

    /// Deletes a queue with its pins and move requests; its slices are released.
    pub async fn delete_queue(&self, name: &str) -> Result<QueueInfo, AdminError> {
        let view = self.view()?;
        let q = self.queue(&view, name)?;
        let prefix = |p: String| TxnOp::delete(p, Some(DeleteOptions::new().with_prefix()));
        self.txn(vec![TxnOp::delete(self.keys.queue(name), None), prefix(format!("{}pins/{name}/", self.keys.root())), prefix(format!("{}moves/{name}/", self.keys.root()))])
            .await?;
        Ok(queue_row(&view, &q))
    }

    /// Pauses or resumes a queue.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<QueueInfo, AdminError> {
        let view = self.view()?;
        let mut q = self.queue(&view, name)?;
        q.paused = paused;
        self.put(self.keys.queue(name), q.encode()).await?;
        Ok(queue_row(&view, &q))
    }

    fn slice_ref(&self, view: &ClusterView, slice: Option<&SliceRef>) -> Result<(QueueConfig, u32), AdminError> {
        let slice = slice.ok_or_else(|| invalid("slice", "a queue and slice are required"))?;
        let q = self.queue(view, &slice.queue).map_err(|e| match e {
            AdminError::Invalid { message, .. } => invalid("slice.queue", message),
            other => other,
        })?;
        if slice.slice >= q.slices {
            return Err(not_found("slice", format!("{}/{} (the queue has {} slices)", q.name, slice.slice, q.slices)));
        }
        Ok((q, slice.slice))
    }

    /// Asks the leader to move a slice to `target` (a planned hand-off).
    pub async fn move_slice(&self, slice: Option<&SliceRef>, target: &str) -> Result<(String, String), AdminError> {
        let view = self.view()?;
        let (q, s) = self.slice_ref(&view, slice)?;
        self.live_node(&view, "target_node", target)?;
        if view.cordons.contains(target) {
            return Err(invalid("target_node", format!("node {target:?} is cordoned")));
        }
        let from = view.current_assignment().get(&(q.name.clone(), s)).cloned().unwrap_or_default();
        let record = MoveRequest { v: RECORD_VERSION, node_id: target.to_owned(), requested_unix_ms: unix_ms() };
        self.put(self.keys.move_request(&q.name, s), record.encode()).await?;
        Ok((from, target.to_owned()))
    }

    /// Pins a slice to a node.
    pub async fn pin(&self, slice: Option<&SliceRef>, node: &str) -> Result<(SliceRef, String), AdminError> {
        let view = self.view()?;
        let (q, s) = self.slice_ref(&view, slice)?;
        self.live_node(&view, "node", node)?;
        let record = PinRecord { v: RECORD_VERSION, node_id: node.to_owned() };
        self.put(self.keys.pin(&q.name, s), record.encode()).await?;
        Ok((SliceRef { queue: q.name, slice: s }, node.to_owned()))
    }

    /// Removes a slice's pin.
    pub async fn unpin(&self, slice: Option<&SliceRef>) -> Result<(SliceRef, String), AdminError> {
        let view = self.view()?;
        let (q, s) = self.slice_ref(&view, slice)?;
        let node = view.pins.get(&(q.name.clone(), s)).cloned().ok_or_else(|| not_found("pin", format!("{}/{s}", q.name)))?;
        self.txn(vec![TxnOp::delete(self.keys.pin(&q.name, s), None)]).await?;
        Ok((SliceRef { queue: q.name, slice: s }, node))
    }

    /// The moves a full rebalance would make now, planned from the leader's input for
    /// this snapshot (reslices paused, pending moves pinned; with reasons; in maintenance
    /// mode, what would move once it is off); unless `dry_run`, asks the leader to make
    /// them in its next round regardless of the churn budget.
    pub async fn rebalance(&self, dry_run: bool) -> Result<RebalanceResponse, AdminError> {
        let view = self.view()?;
        if !dry_run && view.maintenance {
            return Err(AdminError::FailedPrecondition("maintenance mode is on: nothing moves but orphans; turn it off to rebalance".into()));
        }
        let planned = plan(&dry_run_input(&view));
        let moves = planned
            .moves
            .iter()
            .filter(|m| m.reason.is_planned())
            .map(|m| PlannedMove {
                slice: Some(SliceRef { queue: m.queue.clone(), slice: m.slice }),
                from_node: m.from.clone().unwrap_or_default(),
                to_node: m.to.clone(),
                reason: m.reason.to_string(),
            })
            .collect();
        if !dry_run {
            let record = RebalanceRequest { v: RECORD_VERSION, requested_unix_ms: unix_ms() };
            self.put(self.keys.rebalance(), record.encode()).await?;
        }
        Ok(RebalanceResponse { moves, applied: !dry_run })
    }

    /// Why one slice is (not) being processed ([`explain_slice`]), with what the snapshot
    /// lacks read from etcd: the claim record (its time and incarnation) and the
    /// holder's lease time to live. Either read failing only leaves its fields unknown.
    pub async fn explain(&self, slice: Option<&SliceRef>) -> Result<ExplainSliceResponse, AdminError> {
        let view = self.view()?;
        let (q, s) = self.slice_ref(&view, slice)?;
        let k = (q.name.clone(), s);
        let mut client = self.client.clone();
        let mut claim = None;
        let mut lease = None;
        if let Some(held) = view.claims.get(&k) {
            if let Ok(Ok(reply)) = tokio::time::timeout(REQUEST_TIMEOUT, client.get(self.keys.claim(&q.name, s), None)).await {
                claim = reply.kvs().first().and_then(|kv| Claim::decode(kv.value()).ok());
            }
            if held.lease != 0 {
                if let Ok(Ok(reply)) = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_time_to_live(held.lease, None)).await {
                    lease = (reply.ttl() >= 0).then(|| (reply.ttl(), reply.granted_ttl()));
                }
            }
        }
        let facts = ExplainFacts {
            now_ms: unix_ms(),
            claim,
            lease,
            unowned_seconds: if view.claims.contains_key(&k) { 0.0 } else { self.cache.unowned_for(&k).unwrap_or(0.0) },
            last_move: self.history.last_move(&k),
            history_since_unix_ms: self.history.since_unix_ms(),
            alert_settings: self.cache.alert_settings(),
        };
        Ok(explain_slice(&view, &q, s, &facts))
    }

    /// Turns maintenance mode on or off.
    pub async fn set_maintenance(&self, on: bool) -> Result<bool, AdminError> {
        let record = Maintenance { v: RECORD_VERSION, on, since_unix_ms: unix_ms() };
        self.put(self.keys.maintenance(), record.encode()).await?;
        Ok(on)
    }

    /// The event stream from now on.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.cache.subscribe_events()
    }
}

/// What a rebalance plans from: the leader's input for the same snapshot
/// ([`planner_input`]: reslices paused, pending moves pinned) with the knobs of a full
/// rebalance: no churn budget, no safety valve (the valve's node history is the leader's),
/// and maintenance mode off, so that a dry run in maintenance mode shows what would move
/// once it is off.
pub(crate) fn dry_run_input(view: &ClusterView) -> PlanInput {
    let live = view.nodes.keys().cloned().collect();
    let options = PlanOptions { churn_budget: usize::MAX, max_vanished_fraction: 1.0, maintenance: false };
    let mut input = planner_input(view, live, options).input;
    input.options.maintenance = false;
    input
}

fn queue_row(view: &ClusterView, q: &QueueConfig) -> QueueInfo {
    let old = view.claims.iter().filter(|((queue, _), c)| queue == &q.name && c.slices_total != q.slices).count() as u32;
    QueueInfo {
        name: q.name.clone(),
        slices: q.slices,
        paused: q.paused,
        mailman3: q.mailman3,
        old_slicing_claims: old,
        no_eligible_node: no_eligible_node(view, q).is_some(),
        refused_by: refused_by(view, &q.name),
        state: queue_state(view, q),
    }
}

fn queue_rows(view: &ClusterView) -> Vec<QueueInfo> {
    view.queues.values().map(|q| queue_row(view, q)).collect()
}

#[cfg(test)]
mod tests {
    use qslice_proto::records::{Assignment, NodeRecord, SliceSet, SliceStatus};

    use super::*;

    #[test]
    fn singleton_rows_join_the_claim_and_the_last_settled_slot_by_name() {
        let keys = Keys::new("prod").expect("keys");
        let claim = SingletonClaim { v: 1, node_id: "r1".into(), incarnation: uuid::Uuid::nil(), claimed_unix_ms: 10_000 };
        let run = SingletonRun { v: 1, last_slot_unix_ms: 60_000, node_id: "r2".into(), settled_unix_ms: 60_100, outcome: "ok".into() };
        let mut stored = BTreeMap::new();
        stored.insert(keys.singleton("digests"), (claim.encode(), 77));
        stored.insert(keys.singleton_run("digests"), (run.encode(), 5));
        stored.insert(keys.singleton_run("notify"), (run.encode(), 6));
        stored.insert(keys.singleton("broken"), (b"garbage".to_vec(), 80));
        let rows = singleton_rows(&keys, &stored, 25_000);
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["broken", "digests", "notify"]);
        assert_eq!((rows[1].holder.as_str(), rows[1].held_seconds, rows[1].epoch, rows[1].last_slot_unix_seconds, rows[1].last_outcome.as_str()), ("r1", 15, 77, 60, "ok"));
        assert_eq!((rows[2].holder.as_str(), rows[2].epoch, rows[2].last_slot_unix_seconds), ("", 0, 60), "run before, held by nobody now");
        assert_eq!(rows[0].holder, "(unreadable claim)");
    }
    use crate::view::{test_node, ClaimView};

    /// Queue "in" with 4 slices: r1 assigned and holding 0 and 1, r2 2 and 3; r2
    /// published the figures of slice 2 (5 waiting, 1 in flight).
    fn view() -> ClusterView {
        let mut v = ClusterView::default();
        v.queues.insert("in".into(), QueueConfig { v: 1, name: "in".into(), slices: 4, paused: false, mailman3: false });
        for (n, slices) in [("r1", [0, 1]), ("r2", [2, 3])] {
            v.nodes.insert(n.into(), NodeRecord { started_unix_ms: 1_000, ..test_node(n, 0x2a) });
            v.assignments.insert((n.into(), "in".into()), Assignment { v: 1, queue: "in".into(), slices_total: 4, slices: slices.into_iter().collect::<SliceSet>() });
            for s in slices {
                v.claims.insert(("in".into(), s), ClaimView { node: n.into(), epoch: 40 + i64::from(s), lease: 0x2a, slices_total: 4 });
            }
        }
        let figures = SliceFigures { slice: 2, depth: 5, in_flight: 1, oldest_age_ms: 9_000, oldest_in_flight_age_ms: 2_000 };
        v.status.insert(("r2".into(), "in".into()), SliceStatus { v: 1, node_id: "r2".into(), queue: "in".into(), slices_total: 4, listed_unix_ms: 60_000, slices: vec![figures] });
        v
    }

    fn facts() -> ExplainFacts {
        ExplainFacts { now_ms: 61_000, history_since_unix_ms: 500, ..ExplainFacts::default() }
    }

    fn explain(v: &ClusterView, slice: u32, facts: &ExplainFacts) -> ExplainSliceResponse {
        let q = v.queues["in"].clone();
        explain_slice(v, &q, slice, facts)
    }

    #[test]
    fn a_held_slice_shows_holder_epoch_lease_and_figures_and_stays() {
        let v = view();
        let f = ExplainFacts {
            claim: Some(Claim { v: 1, node_id: "r2".into(), incarnation: uuid::Uuid::nil(), slices_total: 4, claimed_unix_ms: 31_000 }),
            lease: Some((1, 2)),
            ..facts()
        };
        let r = explain(&v, 2, &f);
        assert_eq!(r.summary, "processing on r2 (epoch 42)");
        assert!(r.reasons.is_empty(), "{:?}", r.reasons);
        assert_eq!((r.desired_owner.as_str(), r.claim_holder.as_str(), r.epoch), ("r2", "r2", 42));
        assert_eq!((r.claim_age_seconds, r.holder_lease_remaining_seconds, r.holder_lease_granted_seconds), (30.0, 1, 2));
        assert_eq!(r.holder_node.as_ref().map(|n| (n.live, n.registered_seconds, n.lease_id.as_str())), Some((true, 60.0, "2a")));
        assert_eq!((r.figures_known, r.figures_from_node.as_str(), r.depth, r.in_flight), (true, "r2", 5, 1));
        assert_eq!((r.oldest_entry_age_seconds, r.oldest_in_flight_age_seconds, r.figures_age_seconds), (9.0, 3.0, 1.0));
        assert!(r.next_move.is_none());
        assert_eq!(r.next_note, "nothing: it stays on r2");
    }

    #[test]
    fn a_paused_queue_is_the_reason_and_nothing_is_to_run() {
        let mut v = view();
        v.queues.get_mut("in").expect("in").paused = true;
        v.assignments.clear();
        v.claims.clear();
        let r = explain(&v, 1, &ExplainFacts { unowned_seconds: 7.0, ..facts() });
        assert_eq!(r.summary, "idle: the queue is paused");
        assert!(r.queue_paused && r.reasons[0].contains("queue resume in"), "{:?}", r.reasons);
        assert_eq!((r.desired_owner.as_str(), r.claim_holder.as_str(), r.unowned_seconds), ("", "", 7.0));
        assert!(r.next_move.is_none());
        assert_eq!(r.next_note, "nothing: the slice is not to run now");
    }

    #[test]
    fn a_cordoned_holder_is_named_and_the_next_move_drains_it() {
        let mut v = view();
        v.cordons.insert("r1".into());
        let r = explain(&v, 0, &facts());
        assert!(r.holder_node.as_ref().is_some_and(|n| n.cordoned));
        assert!(r.reasons.iter().any(|x| x.contains("node r1 is cordoned") && x.contains("uncordon r1")), "{:?}", r.reasons);
        let next = r.next_move.expect("a move");
        assert_eq!((next.from_node.as_str(), next.to_node.as_str(), next.reason.as_str()), ("r1", "r2", "node-ineligible"));
        // In maintenance mode the drain waits, and says what it waits for.
        v.maintenance = true;
        let r = explain(&v, 0, &facts());
        assert!(r.next_move.is_none());
        assert!(r.next_note.starts_with("nothing while maintenance mode is on; once it is off: r1 -> r2 (node-ineligible)"), "{}", r.next_note);
    }

    #[test]
    fn a_dead_owners_slice_shows_the_owner_gone_and_the_takeover() {
        let mut v = view();
        v.nodes.remove("r1");
        v.claims.retain(|_, c| c.node != "r1");
        let f = ExplainFacts {
            unowned_seconds: 2.5,
            last_move: Some(SeenMove { time_unix_ms: 700, from: None, to: "r1".into(), reason: crate::planner::MoveReason::NewQueueSlice }),
            ..facts()
        };
        let r = explain(&v, 1, &f);
        assert_eq!(r.summary, "idle: its owner r1 is gone and nothing holds it");
        assert_eq!((r.desired_owner.as_str(), r.claim_holder.as_str()), ("r1", ""));
        assert!(r.desired_node.as_ref().is_some_and(|n| !n.live));
        assert!(r.reasons.iter().any(|x| x.contains("node r1 is not live")), "{:?}", r.reasons);
        let next = r.next_move.expect("a takeover");
        assert_eq!((next.from_node.as_str(), next.to_node.as_str(), next.reason.as_str()), ("r1", "r2", "orphaned"));
        assert_eq!(r.last_move.map(|m| (m.to_node, m.reason)), Some(("r1".to_owned(), "new-queue-slice".to_owned())));
    }

    #[test]
    fn a_queue_every_node_refused_has_no_eligible_node() {
        let mut v = view();
        for n in v.nodes.values_mut() {
            n.refused_queues.push("in".into());
        }
        v.assignments.clear();
        v.claims.clear();
        let r = explain(&v, 3, &facts());
        assert_eq!(r.summary, "idle: no node may take it");
        assert!(r.no_eligible_node);
        assert_eq!(r.refused_by, vec!["r1", "r2"]);
        assert!(r.reasons.iter().any(|x| x.contains("no eligible node (refused by r1, r2)")), "{:?}", r.reasons);
        assert_eq!(r.next_note, "nothing: no node may take it");
    }

    #[test]
    fn a_pinned_slice_moves_to_its_pin_and_a_stalled_owner_is_explained() {
        let mut v = view();
        v.pins.insert(("in".into(), 0), "r2".into());
        let r = explain(&v, 0, &facts());
        assert!(r.reasons.iter().any(|x| x.starts_with("pinned to r2")), "{:?}", r.reasons);
        assert_eq!(r.next_move.map(|m| (m.to_node, m.reason)), Some(("r2".to_owned(), "pinned".to_owned())));
        // Assigned, not claimed: the claim deadline decides.
        let mut v = view();
        v.claims.remove(&("in".to_owned(), 3));
        let r = explain(&v, 3, &facts());
        assert_eq!(r.summary, "idle: assigned to r2, which has not claimed it");
        assert!(r.next_note.contains("claim deadline"), "{}", r.next_note);
    }
}
