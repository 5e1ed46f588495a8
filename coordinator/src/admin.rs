//! The admin API's decisions, in plain Rust: validation, reads from the instance's
//! [`ClusterCache`], and mutations written to etcd as configuration or intent that the
//! leader acts on (so any instance, leader or standby, can take them).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, DeleteOptions, Txn, TxnOp};
use qslice_proto::admin::{
    CoordinatorInfo, DrainProgress, Event, GetStatusResponse, NodeInfo, PlannedMove, QueueInfo, RebalanceResponse, SliceInfo, SliceRef,
};
use qslice_proto::keys::{validate_name, Keys};
use qslice_proto::records::{Cordon, Maintenance, MoveRequest, Pin as PinRecord, QueueConfig, RebalanceRequest, Record, SliceFigures, RECORD_VERSION};
use qslice_proto::slice::validate_slice_count;
use qslice_common::etcd::REQUEST_TIMEOUT;
use tokio_stream::Stream;

use crate::cache::{now_ms, ClusterCache};
use crate::health::{active_alerts, in_flight_too_long, no_eligible_node, queue_state, refused_by};
use crate::config::AdminConfig;
use crate::planner::{plan, PlanInput, PlanOptions};
use crate::view::{planner_input, ClusterView};

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
}

/// A stream of drain progress reports.
pub type DrainStream = Pin<Box<dyn Stream<Item = Result<DrainProgress, AdminError>> + Send>>;

impl Admin {
    /// The admin API over `client`, answering reads from `cache`.
    pub fn new(client: Client, keys: Keys, cache: Arc<ClusterCache>, cfg: AdminConfig) -> Admin {
        Admin { client, keys, cache, cfg }
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
        let info = |id: &str| CoordinatorInfo {
            id: id.to_owned(),
            admin_address: view.coordinators.get(id).and_then(|c| c.admin_addr.clone()).unwrap_or_default(),
        };
        let slices = if include_slices { self.slice_rows(&view) } else { Vec::new() };
        Ok(GetStatusResponse {
            cluster: self.keys.root().trim_start_matches("/qslice/").trim_end_matches('/').to_owned(),
            leader: leader_id.as_deref().map(info),
            standbys: view.coordinators.keys().filter(|id| Some(*id) != leader_id.as_ref()).map(|id| info(id)).collect(),
            nodes: self.node_rows(&view),
            queues: queue_rows(&view),
            slices,
            maintenance: view.maintenance,
            alerts: active_alerts(&view, now_ms(), &self.cache.alert_settings()).into_iter().map(|a| a.message).collect(),
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
                age_seconds: ((now_ms() - n.started_unix_ms).max(0) / 1000) as u64,
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
        let now = now_ms();
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
        let record = Cordon { v: RECORD_VERSION, reason: "cordoned through the admin API".into(), since_unix_ms: now_ms() };
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
        Ok(row.map(|mut r| {
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
        self.txn(vec![
            TxnOp::delete(self.keys.queue(name), None),
            prefix(format!("{}pins/{name}/", self.keys.root())),
            prefix(format!("{}moves/{name}/", self.keys.root())),
        ])
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
        let record = MoveRequest { v: RECORD_VERSION, node_id: target.to_owned(), requested_unix_ms: now_ms() };
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
            let record = RebalanceRequest { v: RECORD_VERSION, requested_unix_ms: now_ms() };
            self.put(self.keys.rebalance(), record.encode()).await?;
        }
        Ok(RebalanceResponse { moves, applied: !dry_run })
    }

    /// Turns maintenance mode on or off.
    pub async fn set_maintenance(&self, on: bool) -> Result<bool, AdminError> {
        let record = Maintenance { v: RECORD_VERSION, on, since_unix_ms: now_ms() };
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
