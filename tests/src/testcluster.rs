//! One test's qslice cluster: etcd (started for the test, or one it was given), a spool,
//! queues, coordinators and runners as real processes, started by [`TestClusterBuilder`]
//! and waited for until they are ready. Everything it started stops when the
//! [`TestCluster`] is dropped, also when the test fails: processes are killed before the
//! spool and etcd go.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use qslice_tests::testcluster::TestCluster;
//! let tc = TestCluster::builder().queue("in", 12).coordinators(1).runners(&["r1", "r2", "r3"]).start().await?;
//! // Here c1 leads, the runners are registered and hold 4 slices each.
//! let held = tc.holdings("in").await;
//! # Ok(()) }
//! ```
//!
//! Runners get the fixtures' settings of [`crate::cluster::start_runner_at`] (the
//! recording exec handler, a 2 s lease TTL, 50 ms polling) and coordinators those of
//! [`crate::cluster::start_coordinator_at`]; flags and environment given to the builder
//! come on top.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::Client;
use qslice_common::spool::QueueDir;
use qslice_proto::keys::Keys;

use crate::cluster::{self, Coordinator, Spool};
use crate::wait::{wait_for_async, Wait};
use crate::{Etcd, Proc};

/// The cluster name unless the builder is given another.
pub const CLUSTER: &str = "t";

/// How long [`TestClusterBuilder::start`] waits for readiness unless told otherwise:
/// generous, for loaded two-core machines; each step takes a second or two when idle.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How far [`TestClusterBuilder::start`] waits before it returns; each step includes the
/// ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ready {
    /// Nothing: the processes have been spawned.
    Started,
    /// A coordinator leads (if any were started) and every runner has registered.
    Registered,
    /// Every slice of every queue written and of every assignment made is claimed.
    Claimed,
    /// Every queue's slices are spread evenly over the runners (needs a coordinator).
    Balanced,
}

/// A runner the builder starts, with its own flags and environment.
struct RunnerSpec {
    node: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// Says what [`TestCluster`] to start; see [`TestCluster::builder`].
#[must_use]
pub struct TestClusterBuilder {
    /// The cluster name.
    cluster: String,
    /// An etcd the test started (the cluster then owns it).
    etcd: Option<Etcd>,
    /// Endpoints of an etcd the test runs itself (a TLS or multi-member one).
    endpoints: Option<String>,
    /// A client to use instead of a plain one (TLS, a user's login).
    client: Option<Client>,
    /// A spool to use instead of a new one (a Mailman site's).
    spool: Option<Spool>,
    /// Queue directories without a queue configuration.
    spool_queues: Vec<String>,
    /// Queues written with their slice counts, as the admin API would.
    queues: Vec<(String, u32)>,
    /// Assignments written before the runners start: node, queue, slice count, slices.
    assignments: Vec<(String, String, u32, Vec<u32>)>,
    /// How many coordinators (`c1`, `c2`, ...).
    coordinators: usize,
    /// Flags of every coordinator.
    coordinator_args: Vec<String>,
    /// Whether every coordinator serves its dashboard on a free port.
    dashboards: bool,
    /// The runners started at once.
    runners: Vec<RunnerSpec>,
    /// Flags of every runner.
    runner_args: Vec<String>,
    /// Environment of every runner.
    runner_env: Vec<(String, String)>,
    /// How far to wait; `None` for as far as what was asked for allows.
    ready: Option<Ready>,
    /// The bound of the readiness waits.
    ready_timeout: Duration,
}

/// A running test cluster; see the module doc.
pub struct TestCluster {
    // Field order is drop order: runners and coordinators stop before the spool and etcd.
    /// The runners by node id.
    runners: BTreeMap<String, Proc>,
    /// The coordinators by id.
    coordinators: BTreeMap<String, Coordinator>,
    /// A client of the cluster's etcd.
    client: Client,
    /// The spool every runner works on.
    spool: Spool,
    /// The cluster name.
    cluster: String,
    /// What runners and coordinators get as `--etcd-endpoints`.
    endpoints: String,
    /// Flags every runner gets.
    runner_args: Vec<String>,
    /// Environment every runner gets.
    runner_env: Vec<(String, String)>,
    /// Flags every coordinator gets.
    coordinator_args: Vec<String>,
    /// Whether coordinators serve a dashboard.
    dashboards: bool,
    /// The etcd, when the cluster owns it.
    etcd: Option<Etcd>,
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

fn owned_env(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

impl TestClusterBuilder {
    /// Names the cluster (default [`CLUSTER`]).
    pub fn cluster_name(mut self, name: &str) -> Self {
        self.cluster = name.to_owned();
        self
    }

    /// Runs on this etcd, which the cluster then owns (for a test that prepares it first).
    pub fn etcd(mut self, etcd: Etcd) -> Self {
        self.etcd = Some(etcd);
        self
    }

    /// Runs on an etcd the test keeps (comma-separated endpoints, as `--etcd-endpoints`).
    pub fn etcd_endpoints(mut self, endpoints: &str) -> Self {
        self.endpoints = Some(endpoints.to_owned());
        self
    }

    /// Uses this client for the cluster's own reads and writes.
    pub fn client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Runs the runners on this spool (shared with the caller) instead of a new one.
    pub fn spool(mut self, spool: Spool) -> Self {
        self.spool = Some(spool);
        self
    }

    /// Queue directories in the spool, with no queue configuration written.
    pub fn spool_queues(mut self, queues: &[&str]) -> Self {
        self.spool_queues.extend(owned(queues));
        self
    }

    /// Writes queue `name` with `slices` slices (its spool directory too).
    pub fn queue(mut self, name: &str, slices: u32) -> Self {
        self.queues.push((name.to_owned(), slices));
        self
    }

    /// [`TestClusterBuilder::queue`] for several queues.
    pub fn queues(mut self, queues: &[(&str, u32)]) -> Self {
        for (name, slices) in queues {
            self = self.queue(name, *slices);
        }
        self
    }

    /// Writes the assignment of `slices` of `queue` (of `total`) to `node` before the
    /// runners start, as a leader would (for tests without a coordinator).
    pub fn assign(mut self, node: &str, queue: &str, total: u32, slices: impl IntoIterator<Item = u32>) -> Self {
        self.assignments.push((node.to_owned(), queue.to_owned(), total, slices.into_iter().collect()));
        self
    }

    /// Starts `n` coordinators, `c1` to `c<n>`.
    pub fn coordinators(mut self, n: usize) -> Self {
        self.coordinators = n;
        self
    }

    /// Flags for every coordinator.
    pub fn coordinator_args(mut self, args: &[&str]) -> Self {
        self.coordinator_args.extend(owned(args));
        self
    }

    /// Every coordinator serves its dashboard (`--http-addr`) on a free port.
    pub fn dashboards(mut self) -> Self {
        self.dashboards = true;
        self
    }

    /// Starts runners with these node ids.
    pub fn runners(mut self, nodes: &[&str]) -> Self {
        for node in nodes {
            self = self.runner_with(node, &[], &[]);
        }
        self
    }

    /// Starts a runner with flags and environment of its own (on top of the common ones).
    pub fn runner_with(mut self, node: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        self.runners.push(RunnerSpec { node: node.to_owned(), args: owned(args), env: owned_env(env) });
        self
    }

    /// Flags for every runner (also those started later by [`TestCluster::start_runner`]).
    pub fn runner_args(mut self, args: &[&str]) -> Self {
        self.runner_args.extend(owned(args));
        self
    }

    /// Environment for every runner (also those started later).
    pub fn runner_env(mut self, env: &[(&str, &str)]) -> Self {
        self.runner_env.extend(owned_env(env));
        self
    }

    /// Waits only this far (see [`Ready`]); by default as far as what was asked for
    /// allows: [`Ready::Balanced`] with queues, coordinators and runners, else
    /// [`Ready::Claimed`] with runners and queues or assignments, else
    /// [`Ready::Registered`].
    pub fn ready(mut self, ready: Ready) -> Self {
        self.ready = Some(ready);
        self
    }

    /// Bounds each readiness wait by `timeout` (default [`READY_TIMEOUT`]).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    fn default_ready(&self) -> Ready {
        let runners = !self.runners.is_empty();
        if runners && self.coordinators > 0 && !self.queues.is_empty() {
            Ready::Balanced
        } else if runners && (!self.queues.is_empty() || !self.assignments.is_empty()) {
            Ready::Claimed
        } else {
            Ready::Registered
        }
    }

    /// Starts etcd (unless given one), writes the queues and assignments, starts the
    /// coordinators and then the runners, and waits until the cluster is ready (see
    /// [`TestClusterBuilder::ready`]). On an error, whatever was started is stopped.
    pub async fn start(self) -> Result<TestCluster> {
        let ready = self.ready.unwrap_or_else(|| self.default_ready());
        let etcd = match (self.etcd, &self.endpoints) {
            (Some(etcd), _) => Some(etcd),
            (None, Some(_)) => None,
            (None, None) => Some(Etcd::start()?),
        };
        let endpoints = match (&etcd, self.endpoints) {
            (Some(etcd), _) => etcd.endpoint(),
            (None, endpoints) => endpoints.expect("etcd or endpoints"),
        };
        let mut dirs: BTreeSet<&str> = self.spool_queues.iter().map(String::as_str).collect();
        dirs.extend(self.queues.iter().map(|(q, _)| q.as_str()));
        dirs.extend(self.assignments.iter().map(|(_, q, _, _)| q.as_str()));
        let spool = match self.spool {
            Some(spool) => spool,
            None => Spool::new(&[])?,
        };
        for q in &dirs {
            std::fs::create_dir_all(spool.root().join(q)).with_context(|| format!("create the spool directory of {q}"))?;
        }
        let client = match self.client {
            Some(client) => client,
            None => cluster::client_at(&endpoints.split(',').map(str::to_owned).collect::<Vec<_>>()).await?,
        };
        let mut tc = TestCluster {
            runners: BTreeMap::new(),
            coordinators: BTreeMap::new(),
            client,
            spool,
            cluster: self.cluster,
            endpoints,
            runner_args: self.runner_args,
            runner_env: self.runner_env,
            coordinator_args: self.coordinator_args,
            dashboards: self.dashboards,
            etcd,
        };
        for (queue, slices) in &self.queues {
            tc.put_queue(queue, *slices).await?;
        }
        for (node, queue, total, slices) in &self.assignments {
            tc.assign(node, queue, *total, slices.iter().copied()).await?;
        }
        for i in 1..=self.coordinators {
            tc.start_coordinator(&format!("c{i}"))?;
        }
        if ready >= Ready::Registered && self.coordinators > 0 {
            wait_for_async(self.ready_timeout, "a coordinator to lead", || async { tc.leader().await.is_some() }).await.with_context(|| tc.logs())?;
        }
        for spec in &self.runners {
            let args: Vec<&str> = spec.args.iter().map(String::as_str).collect();
            let env: Vec<(&str, &str)> = spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            tc.start_runner_with(&spec.node, &args, &env)?;
        }
        let nodes: Vec<&str> = self.runners.iter().map(|r| r.node.as_str()).collect();
        if ready >= Ready::Registered {
            for node in &nodes {
                wait_for_async(self.ready_timeout, &format!("runner {node} to register"), || tc.is_registered(node)).await.with_context(|| tc.logs())?;
            }
        }
        if ready >= Ready::Claimed {
            let mut wanted: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
            for (queue, slices) in &self.queues {
                wanted.entry(queue).or_default().extend(0..*slices);
            }
            for (_, queue, _, slices) in &self.assignments {
                wanted.entry(queue).or_default().extend(slices);
            }
            for (queue, slices) in &wanted {
                let what = format!("the {} slices of {queue} claimed", slices.len());
                wait_for_async(self.ready_timeout, &what, || async { tc.claims(queue).await.is_ok_and(|held| slices.iter().all(|s| held.contains_key(s))) })
                    .await
                    .with_context(|| tc.logs())?;
            }
        }
        if ready >= Ready::Balanced && !nodes.is_empty() {
            for (queue, slices) in &self.queues {
                let (low, high) = (*slices as usize / nodes.len(), (*slices as usize).div_ceil(nodes.len()));
                let what = format!("the {slices} slices of {queue} spread over {nodes:?}, {low} to {high} each");
                wait_for_async(self.ready_timeout, &what, || async {
                    let held = tc.holdings(queue).await;
                    held.values().map(Vec::len).sum::<usize>() == *slices as usize
                        && held.keys().all(|n| nodes.contains(&n.as_str()))
                        && nodes.iter().all(|n| (low..=high).contains(&held.get(*n).map_or(0, Vec::len)))
                })
                .await
                .with_context(|| tc.logs())?;
            }
        }
        Ok(tc)
    }
}

impl TestCluster {
    /// A builder of a cluster named [`CLUSTER`] on a new etcd and a new spool, with nothing
    /// in it yet.
    pub fn builder() -> TestClusterBuilder {
        TestClusterBuilder {
            cluster: CLUSTER.to_owned(),
            etcd: None,
            endpoints: None,
            client: None,
            spool: None,
            spool_queues: Vec::new(),
            queues: Vec::new(),
            assignments: Vec::new(),
            coordinators: 0,
            coordinator_args: Vec::new(),
            dashboards: false,
            runners: Vec::new(),
            runner_args: Vec::new(),
            runner_env: Vec::new(),
            ready: None,
            ready_timeout: READY_TIMEOUT,
        }
    }

    /// The cluster name.
    pub fn name(&self) -> &str {
        &self.cluster
    }

    /// The etcd the cluster owns. Panics on a cluster given only endpoints.
    pub fn etcd(&self) -> &Etcd {
        self.etcd.as_ref().expect("this cluster runs on an etcd the test keeps")
    }

    /// The etcd the cluster owns, to stop, restart or pause it.
    pub fn etcd_mut(&mut self) -> &mut Etcd {
        self.etcd.as_mut().expect("this cluster runs on an etcd the test keeps")
    }

    /// What runners and coordinators get as `--etcd-endpoints`.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// The spool (clone it to keep it beside a `&mut` borrow of the cluster).
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// One queue directory of the spool.
    pub fn queue(&self, queue: &str) -> QueueDir {
        self.spool.queue(queue)
    }

    /// A client of the cluster's etcd (a cheap clone of the cluster's own).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The runner of `node`. Panics if it was never started.
    pub fn runner(&self, node: &str) -> &Proc {
        self.runners.get(node).unwrap_or_else(|| panic!("no runner {node} in this cluster"))
    }

    /// The runner of `node`, to signal or kill it.
    pub fn runner_mut(&mut self, node: &str) -> &mut Proc {
        self.runners.get_mut(node).unwrap_or_else(|| panic!("no runner {node} in this cluster"))
    }

    /// Every runner by node id.
    pub fn runners(&self) -> &BTreeMap<String, Proc> {
        &self.runners
    }

    /// The coordinator `id` (`c1`, ...). Panics if it was never started.
    pub fn coordinator(&self, id: &str) -> &Coordinator {
        self.coordinators.get(id).unwrap_or_else(|| panic!("no coordinator {id} in this cluster"))
    }

    /// The coordinator `id`, to signal or kill it.
    pub fn coordinator_mut(&mut self, id: &str) -> &mut Coordinator {
        self.coordinators.get_mut(id).unwrap_or_else(|| panic!("no coordinator {id} in this cluster"))
    }

    /// Starts a runner for `node` with the common flags and environment; a runner of that
    /// node started before is dropped (killed) first. Does not wait for anything.
    pub fn start_runner(&mut self, node: &str) -> Result<&mut Proc> {
        self.start_runner_with(node, &[], &[])
    }

    /// [`TestCluster::start_runner`] with flags and environment of its own on top.
    pub fn start_runner_with(&mut self, node: &str, args: &[&str], env: &[(&str, &str)]) -> Result<&mut Proc> {
        self.runners.remove(node);
        let mut all_args: Vec<&str> = self.runner_args.iter().map(String::as_str).collect();
        all_args.extend_from_slice(args);
        let mut all_env: Vec<(&str, &str)> = self.runner_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        all_env.extend_from_slice(env);
        let proc = cluster::start_runner_at(&self.endpoints, &self.spool, node, &self.cluster, &all_args, &all_env)?;
        Ok(self.runners.entry(node.to_owned()).or_insert(proc))
    }

    /// Kills the runner of `node` and forgets it.
    pub fn stop_runner(&mut self, node: &str) {
        self.runners.remove(node);
    }

    /// Starts coordinator `id` with the common flags (and a dashboard if asked for).
    pub fn start_coordinator(&mut self, id: &str) -> Result<&mut Coordinator> {
        self.start_coordinator_with(id, &[])
    }

    /// [`TestCluster::start_coordinator`] with flags of its own on top.
    pub fn start_coordinator_with(&mut self, id: &str, args: &[&str]) -> Result<&mut Coordinator> {
        self.coordinators.remove(id);
        let http = if self.dashboards { Some(format!("127.0.0.1:{}", crate::free_port()?)) } else { None };
        let mut all: Vec<&str> = Vec::new();
        if let Some(http) = &http {
            all.extend_from_slice(&["--http-addr", http]);
        }
        all.extend(self.coordinator_args.iter().map(String::as_str));
        all.extend_from_slice(args);
        let mut coordinator = cluster::start_coordinator_at(&self.endpoints, &self.spool, id, &self.cluster, &all)?;
        coordinator.http = http;
        Ok(self.coordinators.entry(id.to_owned()).or_insert(coordinator))
    }

    /// Writes a queue's configuration, as the admin API would.
    pub async fn put_queue(&self, queue: &str, slices: u32) -> Result<()> {
        cluster::put_queue(&mut self.client(), &self.cluster, queue, slices).await.map(drop)
    }

    /// Writes the assignment of `slices` of `queue` (of `total`) to `node`, as a leader would.
    pub async fn assign(&self, node: &str, queue: &str, total: u32, slices: impl IntoIterator<Item = u32>) -> Result<()> {
        cluster::assign(&mut self.client(), &self.cluster, node, queue, total, slices).await
    }

    /// Removes `node`'s assignment of `queue`.
    pub async fn unassign(&self, node: &str, queue: &str) -> Result<()> {
        cluster::unassign(&mut self.client(), &self.cluster, node, queue).await
    }

    /// The claims of `queue`: slice -> (holder node, epoch).
    pub async fn claims(&self, queue: &str) -> Result<BTreeMap<u32, (String, i64)>> {
        cluster::claims(&mut self.client(), &self.cluster, queue).await
    }

    /// Slices of `queue` held per node (empty if the claims cannot be read).
    pub async fn holdings(&self, queue: &str) -> BTreeMap<String, Vec<u32>> {
        cluster::holdings(&mut self.client(), &self.cluster, queue).await
    }

    /// The id of the coordinator that leads, if one does.
    pub async fn leader(&self) -> Option<String> {
        cluster::leader(&mut self.client(), &self.cluster).await
    }

    /// Whether `node` has its node record in etcd (it registered and its lease lives).
    pub async fn is_registered(&self, node: &str) -> bool {
        let Ok(keys) = Keys::new(&self.cluster) else { return false };
        self.client().get(keys.node(node), None).await.is_ok_and(|r| r.count() == 1)
    }

    /// Waits up to `timeout` until the holdings of `queue` satisfy `cond`; `what` names it.
    pub async fn wait_holdings(&self, timeout: Duration, queue: &str, what: &str, cond: impl Fn(&BTreeMap<String, Vec<u32>>) -> bool) -> Result<()> {
        Wait::new(timeout, what).until_async(|| async { cond(&self.holdings(queue).await) }).await
    }

    /// The last lines of every process's log, for an error from a readiness wait (the
    /// processes are gone by the time the test panics on it).
    fn logs(&self) -> String {
        let tail = |log: String| {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        };
        let coordinators = self.coordinators.iter().map(|(id, c)| format!("--- coordinator {id}\n{}\n", tail(c.proc.log())));
        let runners = self.runners.iter().map(|(node, r)| format!("--- runner {node}\n{}\n", tail(r.log())));
        coordinators.chain(runners).collect()
    }
}
