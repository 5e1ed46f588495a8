//! Scale benchmark (issue #7 c): the planner at 10, 100 and 1,000 nodes by 1,000, 10,000
//! and 100,000 slices, and a cluster of simulated runner members against one etcd and a
//! real `qslice-coordinator`.
//!
//! Planner (pure, in this process): time of one `plan()` from scratch, with nothing
//! changed, after one death and after one join; slices moved on the death (the takeover
//! plan, and the follow-up plan's hand-offs), and on the join (with the default churn
//! budget of one plan, and in all). A queue holds at most 65,536 slices, so 100,000 slices
//! are two queues of 50,000.
//!
//! Cluster: one process registers many members the way `qslice-runner` does (a lease
//! each, kept alive every TTL/3 on its own keepalive stream, and a node record on it),
//! watches the assignment (one watch on `assign/`, dispatched to the members by key;
//! a real runner watches its own `assign/<node>/`) and claims each assigned slice with a
//! create-if-absent transaction on the member's lease, one slice per request, with the
//! runner's own claim and release transactions (`qslice_runner::claims`; failed claims
//! retried every 100 ms). Members publish no slice figures and process no entries.
//! Then one member "dies" (its lease is revoked), and the benchmark measures the time
//! until all its slices are claimed by others, the etcd requests that took (etcd's own
//! Prometheus counters), and the coordinator's memory and CPU; then one member joins.
//!
//! Full mode runs 200 members with 2,000 slices, then 1,000 with 10,000. Prints tables and
//! a `JSON:` summary line. `--quick` (for CI) runs a smaller grid and 50 members with 500
//! slices.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use qslice_common::etcd::{PrefixUpdate, PrefixWatch};
use qslice_coordinator::planner::{plan, NodeSpec, Plan, PlanInput, PlanOptions, QueueSpec, SliceKey, DEFAULT_CHURN_BUDGET};
use qslice_proto::keys::{Key, Keys};
use qslice_proto::records::{Assignment, Claim, NodeRecord, Record, RECORD_VERSION};
use qslice_runner::claims::{claim_txn, release_txn, QueueRevision};
use qslice_tests::benchkit::{self, round, EtcdLoad, Metrics, ProcSample, Table};
use qslice_tests::cluster::{client, leader, put_queue};
use qslice_tests::Etcd;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Measure the planner and a large simulated cluster.
#[derive(Parser)]
struct Args {
    /// A short run for CI: planner up to 100 nodes x 10,000 slices; 50 members, 500 slices.
    #[arg(long)]
    quick: bool,
    /// Simulated members of one cluster run (instead of the default runs: 200 members
    /// with 2,000 slices and 1,000 with 10,000; 50 with 500 with --quick).
    #[arg(long, requires = "slices")]
    members: Option<usize>,
    /// Slices of that cluster run's queue.
    #[arg(long, requires = "members")]
    slices: Option<u32>,
    /// Skip the planner grid.
    #[arg(long)]
    no_planner: bool,
    /// Skip the cluster run.
    #[arg(long)]
    no_cluster: bool,
    /// Write the JSON summary here too.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mode = if args.quick { "quick" } else { "full" };
    println!("bench_scale ({mode} mode)");
    println!("{}", benchkit::machine_line());
    let mut summary = serde_json::json!({
        "benchmark": "scale",
        "mode": mode,
        "profile": benchkit::profile(),
        "machine": benchkit::machine(),
    });
    if !args.no_planner {
        summary["planner"] = planner_grid(args.quick)?;
    }
    if !args.no_cluster {
        let runs: Vec<(usize, u32)> = match (args.members, args.slices) {
            (Some(m), Some(s)) => vec![(m, s)],
            _ if args.quick => vec![(50, 500)],
            _ => vec![(200, 2_000), (1_000, 10_000)],
        };
        let mut results = Vec::new();
        for (members, slices) in runs {
            results.push(cluster_run(members, slices).await?);
        }
        summary["clusters"] = serde_json::Value::Array(results);
    }
    benchkit::emit_json(&summary, args.json_out.as_deref())
}

// ---------------------------------------------------------------------------------------
// Planner
// ---------------------------------------------------------------------------------------

/// One cell of the planner grid.
#[derive(serde::Serialize)]
struct PlanCell {
    nodes: usize,
    slices: u32,
    queues: usize,
    /// Median milliseconds per plan: from nothing, nothing changed, one death, one join.
    fresh_ms: f64,
    steady_ms: f64,
    death_ms: f64,
    join_ms: f64,
    /// Slices moved by the plan that sees the death (takeovers of the dead node's slices).
    death_moves: usize,
    /// Hand-offs the next plan still makes after the death.
    death_followup_moves: usize,
    /// Slices moved by the plan that sees the join (limited by the churn budget).
    join_moves: usize,
    /// Moves that plan deferred to later plans.
    join_deferred: usize,
    /// Slices the join moves in all (one plan with no churn limit).
    join_moves_total: usize,
    /// Plans timed per kind (median taken).
    reps: usize,
}

fn node_spec(id: String) -> NodeSpec {
    NodeSpec { id, weight: 1, queues: Vec::new(), cordoned: false, refused: Vec::new() }
}

/// `slices` in queues of at most 50,000 (a queue has at most 65,536).
fn queue_specs(slices: u32) -> Vec<QueueSpec> {
    let n = slices.div_ceil(50_000).max(1);
    (0..n).map(|i| QueueSpec { name: format!("q{i}"), slices: slices / n + u32::from(i < slices % n), paused: false }).collect()
}

/// Runs `plan(input)` repeatedly (at least once, until `budget` is used or `max_reps`
/// runs) and returns the median milliseconds and the plan.
fn time_plan(input: &PlanInput, budget: Duration, max_reps: usize) -> (f64, Plan, usize) {
    let mut times = Vec::new();
    let started = Instant::now();
    let mut out;
    loop {
        let t = Instant::now();
        out = plan(input);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        if times.len() >= max_reps || started.elapsed() >= budget {
            break;
        }
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], out, times.len())
}

fn planner_grid(quick: bool) -> Result<serde_json::Value> {
    let (node_counts, slice_counts, budget, max_reps): (&[usize], &[u32], Duration, usize) =
        if quick { (&[10, 100], &[1_000, 10_000], Duration::from_millis(300), 5) } else { (&[10, 100, 1_000], &[1_000, 10_000, 100_000], Duration::from_secs(2), 11) };
    println!();
    println!("planner: plan() in this process, {} build, default options (churn budget {DEFAULT_CHURN_BUDGET})", benchkit::profile());
    let mut cells = Vec::new();
    for &n in node_counts {
        for &s in slice_counts {
            let queues = queue_specs(s);
            let ids: Vec<String> = (0..n).map(|i| format!("n{i:04}")).collect();
            let nodes: Vec<NodeSpec> = ids.iter().cloned().map(node_spec).collect();
            let all: BTreeSet<String> = ids.iter().cloned().collect();
            let fresh = PlanInput { queues: queues.clone(), nodes: nodes.clone(), options: PlanOptions::default(), ..PlanInput::default() };
            let (fresh_ms, first, reps) = time_plan(&fresh, budget, max_reps);
            if first.assignment.len() != s as usize {
                bail!("planner left slices unassigned at {n} nodes x {s} slices");
            }
            let steady = PlanInput { current: first.assignment.clone(), previous_nodes: all.clone(), ..fresh.clone() };
            let (steady_ms, unchanged, _) = time_plan(&steady, budget, max_reps);
            if !unchanged.moves.is_empty() {
                bail!("planner moved {} slices with nothing changed", unchanged.moves.len());
            }

            let victim = &ids[n / 2];
            let survivors: Vec<NodeSpec> = nodes.iter().filter(|x| &x.id != victim).cloned().collect();
            let death = PlanInput { nodes: survivors.clone(), ..steady.clone() };
            let (death_ms, after_death, _) = time_plan(&death, budget, max_reps);
            let mut without: BTreeSet<String> = all.clone();
            without.remove(victim);
            let followup = PlanInput { nodes: survivors, current: after_death.assignment.clone(), previous_nodes: without, ..steady.clone() };
            let follow = plan(&followup);

            let mut joined = nodes.clone();
            joined.push(node_spec(format!("n{n:04}")));
            let join = PlanInput { nodes: joined, ..steady.clone() };
            let (join_ms, after_join, _) = time_plan(&join, budget, max_reps);
            let unlimited = PlanInput { options: PlanOptions { churn_budget: usize::MAX, ..PlanOptions::default() }, ..join.clone() };
            let join_total = plan(&unlimited).moves.len();

            let cell = PlanCell {
                nodes: n,
                slices: s,
                queues: queues.len(),
                fresh_ms: round(fresh_ms, 3),
                steady_ms: round(steady_ms, 3),
                death_ms: round(death_ms, 3),
                join_ms: round(join_ms, 3),
                death_moves: after_death.moves.len(),
                death_followup_moves: follow.moves.len(),
                join_moves: after_join.moves.len(),
                join_deferred: after_join.deferred_moves,
                join_moves_total: join_total,
                reps,
            };
            println!("  {n} nodes x {s} slices: {fresh_ms:.2} ms per fresh plan");
            cells.push(cell);
        }
    }
    let mut table = Table::new(&["nodes x slices", "fresh ms", "no change ms", "death ms", "moved on death", "follow-up", "join ms", "moved on join (one plan)", "join in all"]);
    for c in &cells {
        table.row(vec![
            format!("{} x {}", c.nodes, c.slices),
            format!("{:.2}", c.fresh_ms),
            format!("{:.2}", c.steady_ms),
            format!("{:.2}", c.death_ms),
            c.death_moves.to_string(),
            c.death_followup_moves.to_string(),
            format!("{:.2}", c.join_ms),
            format!("{} (+{} deferred)", c.join_moves, c.join_deferred),
            c.join_moves_total.to_string(),
        ]);
    }
    println!();
    println!("{}", table.render());
    println!("(ms: median of up to {max_reps} plans; \"follow-up\": hand-offs the plan after a death still makes; a join moves at most the churn budget per plan)");
    Ok(serde_json::json!({ "churn_budget": DEFAULT_CHURN_BUDGET, "cells": cells }))
}

// ---------------------------------------------------------------------------------------
// Cluster of simulated members
// ---------------------------------------------------------------------------------------

/// The lease TTL of every simulated member (the runner's default).
const MEMBER_TTL: i64 = 5;
/// How often a member retries claims another holder still has (the runner's CLAIM_RETRY).
const CLAIM_RETRY: Duration = Duration::from_millis(100);
/// The cluster is quiet once nothing changed for this long.
const QUIET: Duration = Duration::from_secs(1);
/// Generous bound for anything the cluster must do.
const LONG: Duration = Duration::from_secs(120);
const QUEUE: &str = "in";
const CLUSTER: &str = "scale";

/// What the members share with the benchmark.
struct Shared {
    keys: Keys,
    /// Current claims made by members: slice -> (member index, when claimed).
    holders: Mutex<HashMap<u32, (usize, Instant)>>,
    /// When a claim, a release or an assignment last changed.
    last_change: Mutex<Instant>,
    /// When the dispatcher saw assignment writes.
    assign_events: Mutex<Vec<Instant>>,
    /// Claim transactions sent, and how many succeeded.
    claim_txns: AtomicU64,
    claims_won: AtomicU64,
    /// Release (claim delete) transactions sent.
    release_txns: AtomicU64,
    /// Keepalive requests sent by members.
    keepalives_sent: AtomicU64,
    /// Keepalive failures (a member whose lease lapsed would spoil the figures).
    keepalive_failures: AtomicU64,
    /// The queue record's revision, which every claim compares (the reslice barrier).
    queue_revision: Mutex<QueueRevision>,
}

impl Shared {
    fn touch(&self) {
        *self.last_change.lock().expect("lock") = Instant::now();
    }
    fn quiet_for(&self) -> Duration {
        self.last_change.lock().expect("lock").elapsed()
    }
    fn held_by(&self, member: usize) -> BTreeSet<u32> {
        self.holders.lock().expect("lock").iter().filter(|(_, (m, _))| *m == member).map(|(s, _)| *s).collect()
    }
    fn held_total(&self) -> usize {
        self.holders.lock().expect("lock").len()
    }
}

/// A change of one member's assignment.
enum Update {
    /// The member's whole assignment: queue -> (slice count, slices).
    Snapshot(BTreeMap<String, (u32, BTreeSet<u32>)>),
    /// One queue's slices.
    Put(String, u32, BTreeSet<u32>),
    /// One queue is no longer assigned.
    Delete(String),
}

/// A simulated member, as the benchmark holds it.
struct Member {
    lease: i64,
    cancel: CancellationToken,
}

/// Where the dispatcher sends each node's updates.
type Routes = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Update>>>>;

/// Grants a lease, starts the member's keepalive and claim loop, then writes its node
/// record (create-if-absent, on the lease) the way `membership::register` does.
async fn start_member(client: &Client, shared: &Arc<Shared>, routes: &Routes, index: usize, id: &str) -> Result<Member> {
    let mut c = client.clone();
    let lease = c.lease_grant(MEMBER_TTL, None).await.context("grant a member lease")?.id();
    let cancel = CancellationToken::new();
    let incarnation = uuid::Uuid::new_v4();
    let (tx, rx) = mpsc::unbounded_channel();
    routes.lock().expect("lock").insert(id.to_owned(), tx);
    tokio::spawn(keep_alive(client.clone(), lease, shared.clone(), cancel.clone()));
    tokio::spawn(member_loop(
        MemberLoop {
            client: client.clone(),
            shared: shared.clone(),
            index,
            id: id.to_owned(),
            lease,
            incarnation,
            desired: BTreeMap::new(),
            held: BTreeMap::new(),
            pending: false,
        },
        rx,
        cancel.clone(),
    ));
    let record = NodeRecord {
        v: RECORD_VERSION,
        node_id: id.to_owned(),
        host: "bench-scale".into(),
        pid: std::process::id(),
        incarnation,
        weight: 1,
        queues: Vec::new(),
        version: qslice_proto::VERSION.to_owned(),
        started_unix_ms: unix_ms(),
        metrics_addr: None,
        lease_id: lease,
        refused_queues: Vec::new(),
    };
    let key = shared.keys.node(id);
    let txn = Txn::new().when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
        key.as_str(),
        record.encode(),
        Some(PutOptions::new().with_lease(lease)),
    )]);
    if !c.txn(txn).await.context("write a member's node record")?.succeeded() {
        bail!("node id {id} is taken");
    }
    Ok(Member { lease, cancel })
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Keeps one member's lease alive every TTL/3 on its own stream, until cancelled.
async fn keep_alive(mut client: Client, lease: i64, shared: Arc<Shared>, cancel: CancellationToken) {
    let interval = Duration::from_secs(MEMBER_TTL as u64) / 3;
    let mut stream = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let ok = async {
            if stream.is_none() {
                // Opening the stream sends a first keepalive of its own.
                stream = Some(client.lease_keep_alive(lease).await.ok()?);
                shared.keepalives_sent.fetch_add(1, Ordering::Relaxed);
            }
            let (keeper, replies) = stream.as_mut()?;
            keeper.keep_alive().await.ok()?;
            shared.keepalives_sent.fetch_add(1, Ordering::Relaxed);
            let reply = tokio::time::timeout(interval, replies.message()).await.ok()?.ok()??;
            (reply.ttl() > 0).then_some(())
        }
        .await;
        if ok.is_none() {
            stream = None;
            shared.keepalive_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One member's claim state.
struct MemberLoop {
    client: Client,
    shared: Arc<Shared>,
    index: usize,
    id: String,
    lease: i64,
    incarnation: uuid::Uuid,
    /// What the leader assigned: queue -> (slice count, slices).
    desired: BTreeMap<String, (u32, BTreeSet<u32>)>,
    /// Claims held: (queue, slice) -> epoch.
    held: BTreeMap<SliceKey, i64>,
    /// Some assigned slice is still claimed by another holder.
    pending: bool,
}

async fn member_loop(mut m: MemberLoop, mut rx: mpsc::UnboundedReceiver<Update>, cancel: CancellationToken) {
    let mut retry = tokio::time::interval(CLAIM_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            update = rx.recv() => {
                let Some(update) = update else { return };
                m.apply(update);
                while let Ok(update) = rx.try_recv() {
                    m.apply(update);
                }
                m.reconcile(&cancel).await;
            }
            _ = retry.tick(), if m.pending => m.reconcile(&cancel).await,
        }
    }
}

impl MemberLoop {
    fn apply(&mut self, update: Update) {
        match update {
            Update::Snapshot(all) => self.desired = all,
            Update::Put(queue, total, slices) => {
                self.desired.insert(queue, (total, slices));
            }
            Update::Delete(queue) => {
                self.desired.remove(&queue);
            }
        }
    }

    fn wants(&self, key: &SliceKey) -> bool {
        self.desired.get(&key.0).is_some_and(|(_, set)| set.contains(&key.1))
    }

    /// Releases what moved away, then claims what is assigned and not held, one slice per
    /// transaction, as the runner does.
    async fn reconcile(&mut self, cancel: &CancellationToken) {
        let release: Vec<(SliceKey, i64)> = self.held.iter().filter(|(k, _)| !self.wants(k)).map(|(k, e)| (k.clone(), *e)).collect();
        for ((queue, slice), epoch) in release {
            if cancel.is_cancelled() {
                return;
            }
            let txn = release_txn(&self.shared.keys, &queue, slice, epoch);
            self.shared.release_txns.fetch_add(1, Ordering::Relaxed);
            if self.client.txn(txn).await.is_ok() {
                self.held.remove(&(queue, slice));
                let mut holders = self.shared.holders.lock().expect("lock");
                if holders.get(&slice).is_some_and(|(m, _)| *m == self.index) {
                    holders.remove(&slice);
                }
                drop(holders);
                self.shared.touch();
            }
        }
        let claim: Vec<(String, u32, u32)> =
            self.desired.iter().flat_map(|(q, (n, set))| set.iter().map(move |s| (q.clone(), *s, *n))).filter(|(q, s, _)| !self.held.contains_key(&(q.clone(), *s))).collect();
        let mut pending = false;
        for (queue, slice, total) in claim {
            if cancel.is_cancelled() {
                return;
            }
            let record = Claim { v: RECORD_VERSION, node_id: self.id.clone(), incarnation: self.incarnation, slices_total: total, claimed_unix_ms: unix_ms() };
            let revision = *self.shared.queue_revision.lock().expect("lock");
            let txn = claim_txn(&self.shared.keys, &queue, slice, &record, self.lease, revision);
            self.shared.claim_txns.fetch_add(1, Ordering::Relaxed);
            match self.client.txn(txn).await {
                Ok(resp) if resp.succeeded() => {
                    let epoch = resp.header().map(|h| h.revision()).unwrap_or(0);
                    self.held.insert((queue, slice), epoch);
                    if cancel.is_cancelled() {
                        return;
                    }
                    self.shared.claims_won.fetch_add(1, Ordering::Relaxed);
                    self.shared.holders.lock().expect("lock").insert(slice, (self.index, Instant::now()));
                    self.shared.touch();
                }
                _ => pending = true,
            }
        }
        self.pending = pending;
    }
}

/// Watches the whole assignment and hands each node's records to its member.
async fn dispatch(client: Client, shared: Arc<Shared>, routes: Routes, listed: tokio::sync::oneshot::Sender<()>) {
    let mut listed = Some(listed);
    let mut watch = PrefixWatch::new(client, shared.keys.assignments_prefix());
    loop {
        let update = watch.next().await;
        let mut per_node: Vec<(String, Update)> = Vec::new();
        let decode = |kv: &etcd_client::KeyValue| -> Option<(String, String, u32, BTreeSet<u32>)> {
            let Some(Key::Assignment { node, queue }) = shared.keys.parse(kv.key()) else { return None };
            let a = Assignment::decode(kv.value()).ok()?;
            Some((node, queue, a.slices_total, a.slices.iter().collect()))
        };
        match update {
            PrefixUpdate::Snapshot(kvs) => {
                let mut all: HashMap<String, BTreeMap<String, (u32, BTreeSet<u32>)>> = HashMap::new();
                for kv in &kvs {
                    if let Some((node, queue, total, slices)) = decode(kv) {
                        all.entry(node).or_default().insert(queue, (total, slices));
                    }
                }
                let nodes: Vec<String> = routes.lock().expect("lock").keys().cloned().collect();
                for node in nodes {
                    let mine = all.remove(&node).unwrap_or_default();
                    per_node.push((node, Update::Snapshot(mine)));
                }
                if let Some(tx) = listed.take() {
                    let _ = tx.send(());
                }
            }
            PrefixUpdate::Put(kv) => {
                if let Some((node, queue, total, slices)) = decode(&kv) {
                    per_node.push((node, Update::Put(queue, total, slices)));
                }
            }
            PrefixUpdate::Delete(kv) => {
                if let Some(Key::Assignment { node, queue }) = shared.keys.parse(kv.key()) {
                    per_node.push((node, Update::Delete(queue)));
                }
            }
        }
        if !per_node.is_empty() {
            shared.assign_events.lock().expect("lock").push(Instant::now());
            shared.touch();
        }
        let routes = routes.lock().expect("lock");
        for (node, update) in per_node {
            if let Some(tx) = routes.get(&node) {
                let _ = tx.send(update);
            }
        }
    }
}

/// Waits until nothing changed for [`QUIET`]; returns how long that took.
async fn wait_quiet(shared: &Shared, what: &str) -> Result<Duration> {
    let started = Instant::now();
    while shared.quiet_for() < QUIET {
        if started.elapsed() > LONG {
            bail!("the cluster did not settle within {LONG:?} ({what})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(started.elapsed())
}

/// Coordinator and etcd figures at one moment.
struct Snapshot {
    coordinator: ProcSample,
    etcd: ProcSample,
    metrics: Metrics,
    claim_txns: u64,
    release_txns: u64,
}

fn snapshot(coordinator_pid: u32, etcd: &Etcd, shared: &Shared) -> Result<Snapshot> {
    Ok(Snapshot {
        coordinator: ProcSample::take(coordinator_pid)?,
        etcd: ProcSample::take(etcd.pid().context("etcd is running")?)?,
        metrics: Metrics::scrape(etcd)?,
        claim_txns: shared.claim_txns.load(Ordering::Relaxed),
        release_txns: shared.release_txns.load(Ordering::Relaxed),
    })
}

/// What happened between two snapshots, as JSON.
fn window(a: &Snapshot, b: &Snapshot) -> serde_json::Value {
    let load = EtcdLoad::between(&a.metrics, &b.metrics);
    serde_json::json!({
        "seconds": round(b.coordinator.at.duration_since(a.coordinator.at).as_secs_f64(), 3),
        "etcd": load,
        "member_claim_txns": b.claim_txns - a.claim_txns,
        "member_release_txns": b.release_txns - a.release_txns,
        "coordinator_cpu_ms": round(a.coordinator.cpu_ms_until(&b.coordinator), 0),
        "coordinator_rss_kib_after": b.coordinator.rss_kib,
        "etcd_cpu_ms": round(a.etcd.cpu_ms_until(&b.etcd), 0),
    })
}

async fn cluster_run(members: usize, slices: u32) -> Result<serde_json::Value> {
    if members < 3 || (slices as usize) < members {
        bail!("the cluster run needs at least 3 members and at least one slice per member");
    }
    println!();
    println!("cluster: {members} simulated members, one queue of {slices} slices, one etcd, one qslice-coordinator ({} build)", benchkit::profile());
    let etcd = Etcd::start()?;
    let scratch = tempfile::Builder::new().prefix("qslice-bench-scale-").tempdir()?;
    let mut c = client(&etcd).await?;
    let coordinator = benchkit::spawn_coordinator(&etcd, &scratch.path().join("coordinator.log"), "c1", CLUSTER, &[])?;
    let coordinator_pid = benchkit::pid_of(&coordinator, "coordinator")?;
    let started = Instant::now();
    while leader(&mut c, CLUSTER).await.is_none() {
        if started.elapsed() > LONG {
            bail!("the coordinator did not become leader; log:\n{}", coordinator.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shared = Arc::new(Shared {
        keys: Keys::new(CLUSTER)?,
        holders: Mutex::new(HashMap::new()),
        last_change: Mutex::new(Instant::now()),
        assign_events: Mutex::new(Vec::new()),
        claim_txns: AtomicU64::new(0),
        claims_won: AtomicU64::new(0),
        release_txns: AtomicU64::new(0),
        keepalives_sent: AtomicU64::new(0),
        keepalive_failures: AtomicU64::new(0),
        queue_revision: Mutex::new(QueueRevision::Absent),
    });
    let mut run = ClusterRun { c, etcd, coordinator_pid, shared, routes: Arc::new(Mutex::new(HashMap::new())), sims: Vec::new(), dispatcher: None };
    let coordinator_empty = ProcSample::take(coordinator_pid)?;
    let (register_s, initial_s) = run.register_and_assign(members, slices).await?;
    let idle = run.idle().await?;
    let death = run.death(members / 2).await?;
    let join = run.join(members, slices).await?;
    let failures = run.shared.keepalive_failures.load(Ordering::Relaxed);
    print_cluster_table(members, slices, initial_s, &idle, &death, &join, &coordinator_empty, failures);
    if let Some(dispatcher) = run.dispatcher.take() {
        dispatcher.abort();
    }
    for m in &run.sims {
        m.cancel.cancel();
    }
    drop(coordinator);
    let Death { before, at_claimed, settled, slices: dead_slices, receivers, assigned_ms, reassign_ms, .. } = death;
    Ok(serde_json::json!({
        "members": members,
        "slices": slices,
        "member_lease_ttl_s": MEMBER_TTL,
        "register_s": round(register_s, 3),
        "first_assignment_ms": round(initial_s * 1000.0, 1),
        "idle": {
            "seconds": round(idle.secs, 3),
            "etcd": idle.load,
            "member_keepalives_sent": idle.keepalives,
            "coordinator_cpu_percent": round(idle.a.coordinator.cpu_percent_until(&idle.b.coordinator), 2),
        },
        "death": {
            "dead_member_slices": dead_slices,
            "receiving_members": receivers,
            "first_assignment_seen_ms": assigned_ms.map(|m| round(m, 1)),
            "reassign_ms": round(reassign_ms, 1),
            "until_claimed": window(&before, &at_claimed),
            "until_quiet": window(&before, &settled),
        },
        "join": {
            "slices_moved": join.moved,
            "all_claimed_ms": round(join.ms, 1),
            "until_quiet": window(&join.before, &join.after),
        },
        "coordinator_rss_kib": {
            "no_members": coordinator_empty.rss_kib,
            "steady": before.coordinator.rss_kib,
            "after": join.after.coordinator.rss_kib,
            "peak": join.after.coordinator.hwm_kib,
        },
        "etcd_rss_kib": join.after.etcd.rss_kib,
        "keepalive_failures": failures,
        "requests_counted_from": "etcd /metrics: grpc_server_handled_total{grpc_type=unary}, grpc_server_msg_received_total{grpc_type=bidi_stream}, etcd_server_proposals_committed_total",
    }))
}

/// The cluster of a cluster run: etcd, the coordinator's pid, the simulated members.
struct ClusterRun {
    c: Client,
    etcd: Etcd,
    coordinator_pid: u32,
    shared: Arc<Shared>,
    routes: Routes,
    sims: Vec<Member>,
    /// The task routing assignment changes to the members.
    dispatcher: Option<tokio::task::JoinHandle<()>>,
}

/// The steady state: what N members cost while nothing happens.
struct Idle {
    a: Snapshot,
    b: Snapshot,
    secs: f64,
    keepalives: u64,
    load: EtcdLoad,
}

/// One member's death (its lease revoked).
struct Death {
    before: Snapshot,
    at_claimed: Snapshot,
    settled: Snapshot,
    /// How many slices the dead member held, and how many members took them.
    slices: usize,
    receivers: usize,
    assigned_ms: Option<f64>,
    reassign_ms: f64,
    failover_load: EtcdLoad,
    settle_load: EtcdLoad,
}

/// One member's join.
struct Join {
    before: Snapshot,
    after: Snapshot,
    moved: usize,
    ms: f64,
}

impl ClusterRun {
    fn snapshot(&self) -> Result<Snapshot> {
        snapshot(self.coordinator_pid, &self.etcd, &self.shared)
    }

    /// Members first, then the queue: one plan assigns every slice. Returns the seconds the
    /// registrations took and those from the queue's write to its last claim.
    async fn register_and_assign(&mut self, members: usize, slices: u32) -> Result<(f64, f64)> {
        let registering = Instant::now();
        for i in 0..members {
            self.sims.push(start_member(&self.c, &self.shared, &self.routes, i, &format!("sim-{i:04}")).await?);
        }
        let register_s = registering.elapsed().as_secs_f64();
        let (listed_tx, listed_rx) = tokio::sync::oneshot::channel();
        self.dispatcher = Some(tokio::spawn(dispatch(self.c.clone(), self.shared.clone(), self.routes.clone(), listed_tx)));
        listed_rx.await.context("the assignment watch ended before its first listing")?;
        println!("  registered {members} members in {register_s:.2} s");

        let put_at = Instant::now();
        let revision = put_queue(&mut self.c, CLUSTER, QUEUE, slices).await?;
        *self.shared.queue_revision.lock().expect("lock") = QueueRevision::At(revision);
        while self.shared.held_total() < slices as usize {
            if put_at.elapsed() > LONG {
                bail!("only {} of {slices} slices were claimed within {LONG:?}", self.shared.held_total());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let initial_s = put_at.elapsed().as_secs_f64();
        wait_quiet(&self.shared, "after the first assignment").await?;
        println!("  all {slices} slices claimed {initial_s:.2} s after the queue was written");
        Ok((register_s, initial_s))
    }

    async fn idle(&self) -> Result<Idle> {
        let ka0 = self.shared.keepalives_sent.load(Ordering::Relaxed);
        let a = self.snapshot()?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let b = self.snapshot()?;
        let keepalives = self.shared.keepalives_sent.load(Ordering::Relaxed) - ka0;
        let secs = b.coordinator.at.duration_since(a.coordinator.at).as_secs_f64();
        let load = EtcdLoad::between(&a.metrics, &b.metrics);
        Ok(Idle { a, b, secs, keepalives, load })
    }

    /// Member `victim`'s lease is revoked (etcd deletes its node record and claims).
    async fn death(&mut self, victim: usize) -> Result<Death> {
        let shared = self.shared.clone();
        let victim_slices = shared.held_by(victim);
        let before = self.snapshot()?;
        let assign_events_before = shared.assign_events.lock().expect("lock").len();
        let died = Instant::now();
        self.sims[victim].cancel.cancel();
        self.c.lease_revoke(self.sims[victim].lease).await.context("revoke the victim's lease")?;
        shared.holders.lock().expect("lock").retain(|_, (m, _)| *m != victim);
        let (claimed_at, new_owners) = loop {
            let done = {
                let holders = shared.holders.lock().expect("lock");
                let got: Vec<(usize, Instant)> = victim_slices.iter().filter_map(|s| holders.get(s).copied()).collect();
                (got.len() == victim_slices.len()).then(|| {
                    let last = got.iter().map(|(_, t)| *t).max().unwrap_or(died);
                    let owners: BTreeSet<usize> = got.iter().map(|(m, _)| *m).collect();
                    (last, owners)
                })
            };
            if let Some(done) = done {
                break done;
            }
            if died.elapsed() > LONG {
                bail!("the dead member's slices were not all claimed within {LONG:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let at_claimed = self.snapshot()?;
        let first_assign = shared.assign_events.lock().expect("lock").get(assign_events_before).copied();
        wait_quiet(&shared, "after the death").await?;
        let settled = self.snapshot()?;
        let reassign_ms = claimed_at.duration_since(died).as_secs_f64() * 1000.0;
        let assigned_ms = first_assign.map(|t| t.duration_since(died).as_secs_f64() * 1000.0);
        let failover_load = EtcdLoad::between(&before.metrics, &at_claimed.metrics);
        let settle_load = EtcdLoad::between(&before.metrics, &settled.metrics);
        println!("  death of 1 member: its {} slices claimed by {} others after {reassign_ms:.1} ms", victim_slices.len(), new_owners.len());
        Ok(Death { before, at_claimed, settled, slices: victim_slices.len(), receivers: new_owners.len(), assigned_ms, reassign_ms, failover_load, settle_load })
    }

    /// A new member gets its share through planned hand-offs.
    async fn join(&mut self, members: usize, slices: u32) -> Result<Join> {
        let joiner = members;
        let join_started = Instant::now();
        let before = self.snapshot()?;
        self.sims.push(start_member(&self.c, &self.shared, &self.routes, joiner, "sim-join").await?);
        let share = slices as usize / members;
        loop {
            let held = self.shared.held_by(joiner).len();
            if held >= share && self.shared.held_total() == slices as usize {
                break;
            }
            if join_started.elapsed() > LONG {
                bail!("the joining member got {held} of its {share} slices within {LONG:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let ms = self
            .shared
            .holders
            .lock()
            .expect("lock")
            .values()
            .filter(|(m, _)| *m == joiner)
            .map(|(_, t)| t.duration_since(join_started).as_secs_f64() * 1000.0)
            .fold(0.0, f64::max);
        wait_quiet(&self.shared, "after the join").await?;
        let after = self.snapshot()?;
        let moved = self.shared.held_by(joiner).len();
        println!("  join of 1 member: {moved} slices handed to it after {ms:.1} ms");
        Ok(Join { before, after, moved, ms })
    }
}

#[allow(clippy::too_many_arguments)]
fn print_cluster_table(members: usize, slices: u32, initial_s: f64, idle: &Idle, death: &Death, join: &Join, coordinator_empty: &ProcSample, failures: u64) {
    let mut t = Table::new(&["cluster run", "value"]).left_aligned();
    t.row(vec!["members x slices".into(), format!("{members} x {slices}")]);
    t.row(vec!["first assignment: queue written -> all claimed".into(), format!("{:.0} ms", initial_s * 1000.0)]);
    t.row(vec!["idle: etcd unary calls/s".into(), format!("{:.1}", idle.load.unary_total as f64 / idle.secs)]);
    t.row(vec![
        "idle: keepalives/s, sent by members / counted by etcd".into(),
        format!("{:.1} / {:.1}", idle.keepalives as f64 / idle.secs, idle.load.stream_msgs_by_method.get("LeaseKeepAlive").copied().unwrap_or(0) as f64 / idle.secs),
    ]);
    t.row(vec!["idle: coordinator CPU".into(), format!("{:.1} %", idle.a.coordinator.cpu_percent_until(&idle.b.coordinator))]);
    t.row(vec!["death: slices of the dead member".into(), death.slices.to_string()]);
    t.row(vec!["death: revoke -> first new assignment seen".into(), death.assigned_ms.map_or("-".into(), |m| format!("{m:.1} ms"))]);
    t.row(vec!["death: revoke -> all its slices claimed".into(), format!("{:.1} ms", death.reassign_ms)]);
    t.row(vec!["death: etcd requests until claimed".into(), death.failover_load.summary()]);
    t.row(vec![
        "  of which member claim txns".into(),
        format!(
            "{} ({} revoke by the benchmark)",
            death.at_claimed.claim_txns - death.before.claim_txns,
            death.failover_load.unary_by_method.get("LeaseRevoke").copied().unwrap_or(0)
        ),
    ]);
    t.row(vec!["death: etcd requests until quiet for 1 s".into(), death.settle_load.summary()]);
    t.row(vec!["death: coordinator CPU until quiet".into(), format!("{:.0} ms", death.before.coordinator.cpu_ms_until(&death.settled.coordinator))]);
    t.row(vec!["join: slices handed to the new member".into(), join.moved.to_string()]);
    t.row(vec!["join: node record -> all its slices claimed".into(), format!("{:.1} ms", join.ms)]);
    t.row(vec!["join: etcd requests until quiet for 1 s".into(), EtcdLoad::between(&join.before.metrics, &join.after.metrics).summary()]);
    t.row(vec![
        "coordinator RSS: no members / steady / after death+join (peak)".into(),
        format!(
            "{:.1} / {:.1} / {:.1} ({:.1}) MiB",
            mib(coordinator_empty.rss_kib),
            mib(death.before.coordinator.rss_kib),
            mib(join.after.coordinator.rss_kib),
            mib(join.after.coordinator.hwm_kib)
        ),
    ]);
    t.row(vec!["etcd RSS after the run".into(), format!("{:.1} MiB", mib(join.after.etcd.rss_kib))]);
    t.row(vec!["member keepalive failures".into(), failures.to_string()]);
    println!();
    println!("{}", t.render());
    println!("(etcd requests: deltas of etcd's grpc_server_handled_total for unary calls, grpc_server_msg_received_total for stream messages, etcd_server_proposals_committed_total for writes; background keepalives included)");
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
