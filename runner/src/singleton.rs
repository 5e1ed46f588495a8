//! Cluster-wide singleton commands: a command that must run on exactly one host of the
//! cluster at a time (Mailman 3's `mailman digests --periodic` and `mailman notify`, which
//! a single-host site runs from cron), periodic (a cron schedule) or long-running.
//!
//! Contract:
//! - Claim: every runner configured with a `[singleton.<name>]` table competes for the key
//!   `singletons/<name>`, created only if absent and attached to its lease (the same
//!   transaction shape as a slice claim; a request without an answer is read back and the
//!   claim adopted if it is on this lease). The holder runs the command; the others watch
//!   the key and claim it the moment it is deleted (a release) or its lease expires (a
//!   dead or fenced holder). No coordinator is involved.
//! - Fence: the command starts only while the fence is valid; it runs in its own process
//!   group, dies with the runner and is registered with the leash, so a frozen or dead
//!   holder's command is killed at the fence deadline, before the lease can expire and
//!   another runner can claim. A tripped fence kills it at once; the claim goes with the
//!   lease.
//! - Periodic: the holder runs the command at each slot (scheduled time) of its cron
//!   schedule and then records the slot as settled in `singleton-runs/<name>`, in a
//!   transaction that compares its claim's create revision (only the current holder
//!   writes). A new holder starts after the last settled slot: a slot is never run twice
//!   concurrently, never run again once settled, and run again only when its run was cut
//!   off by the holder's death or fence (at-least-once on a crash). Due slots that were
//!   missed (no holder, a takeover) are run at once, the most recent `catch_up` of them;
//!   older ones are skipped and logged.
//! - Long-running: started when the claim is won and restarted with backoff whenever it
//!   exits, for as long as the claim is held.
//! - Shutdown: the command gets SIGTERM, then SIGKILL after `stop_timeout`; the claim is
//!   deleted so that another runner takes over at once.
//! - Losing the claim otherwise (its key deleted by hand) kills the command; the runner
//!   then competes again.

use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use qslice_common::etcd::REQUEST_TIMEOUT;
use qslice_common::lease::{unix_ms, Fence, Incarnation};

use crate::claims::{create_on_lease, LeaseCreate};
use crate::schedule::{baseline, due, Schedule, SingletonConfig};
use crate::shared::Shared;
use crate::supervise::{child_command, ChildSetup};
use qslice_proto::keys::Keys;
use qslice_proto::records::{Record, SingletonClaim, SingletonRun, RECORD_VERSION};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How often a runner that waits for a singleton held by another looks at its claim even
/// without a watch event (a watch that failed quietly): the watch is the fast path.
const RECHECK: Duration = Duration::from_secs(5);
/// Wait after a failed claim request or watch before the next try.
const RETRY: Duration = Duration::from_millis(500);
/// First restart delay of a long-running command that exited; it doubles to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest restart delay of a long-running command.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A long-running command that ran this long before it exited starts again without delay
/// growth: it was not crash-looping.
const STABLE_RUN: Duration = Duration::from_secs(60);

/// An etcd request of the singleton protocol that failed or got no answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Claiming `singletons/<name>` failed.
    #[error("claiming singleton {name}: {source}")]
    ClaimSingleton {
        /// The singleton.
        name: String,
        /// What the request ran into.
        #[source]
        source: crate::claims::RequestError,
    },
    /// Reading or writing the singleton's last settled slot failed.
    #[error("recording the settled slot of singleton {name}: {source}")]
    RecordSlot {
        /// The singleton.
        name: String,
        /// What the request ran into.
        #[source]
        source: crate::claims::RequestError,
    },
}

/// What a claim attempt found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The claim is ours (new, or adopted: it was already on this lease).
    Held {
        /// The claim's create revision.
        epoch: i64,
    },
    /// Nobody has it, but it is held back: the leader revoked its last holder's lease, and
    /// nobody claims it until that holder's fence has surely expired.
    HeldBack {
        /// The store's revision when the claim was refused (watch the hold's deletion).
        revision: i64,
    },
    /// Another holder has it.
    HeldByOther {
        /// The holder's node id, as its record says.
        holder: String,
        /// The store's revision when the claim was refused (watch its deletion after it).
        revision: i64,
    },
}

/// The transaction that creates the claim of singleton `name` on `lease_id` only if absent
/// and not held back; when it fails, its responses are the claim and the hold.
pub fn claim_txn(keys: &Keys, name: &str, record: &SingletonClaim, lease_id: i64) -> Txn {
    let key = keys.singleton(name);
    let hold = keys.singleton_hold(name);
    Txn::new()
        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0), Compare::create_revision(hold.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.as_str(), record.encode(), Some(PutOptions::new().with_lease(lease_id)))])
        .or_else([TxnOp::get(key.as_str(), None), TxnOp::get(hold.as_str(), None)])
}

/// Claims singleton `name` within [`REQUEST_TIMEOUT`]; a request that failed or timed out
/// may have committed, so the claim is read back and adopted if it is on `lease_id`.
pub async fn claim(client: &mut Client, keys: &Keys, name: &str, record: &SingletonClaim, lease_id: i64) -> Result<ClaimOutcome, Error> {
    let txn = claim_txn(keys, name, record, lease_id);
    let answer = create_on_lease(client, txn, &keys.singleton(name), lease_id).await.map_err(|source| Error::ClaimSingleton { name: name.to_owned(), source })?;
    Ok(match answer {
        LeaseCreate::Created { revision } => ClaimOutcome::Held { epoch: revision },
        LeaseCreate::Ours(kv) => ClaimOutcome::Held { epoch: kv.create_revision() },
        LeaseCreate::Refused { revision, found } => {
            let (claim, hold) = (found.first().cloned().flatten(), found.get(1).cloned().flatten());
            match (claim, hold) {
                (Some(kv), _) if kv.lease() == lease_id => ClaimOutcome::Held { epoch: kv.create_revision() },
                (Some(kv), _) => ClaimOutcome::HeldByOther { holder: SingletonClaim::decode(kv.value()).map(|c| c.node_id).unwrap_or_else(|_| "?".into()), revision },
                (None, Some(_)) => ClaimOutcome::HeldBack { revision },
                // Deleted between the compare and the get: there is none; the next try claims it.
                (None, None) => ClaimOutcome::HeldByOther { holder: String::new(), revision },
            }
        }
    })
}

/// Deletes the claim of singleton `name` if it is still the one of `epoch`.
pub async fn release(client: &mut Client, keys: &Keys, name: &str, epoch: i64) -> Result<(), etcd_client::Error> {
    let key = keys.singleton(name);
    let txn = Txn::new().when([Compare::create_revision(key.as_str(), CompareOp::Equal, epoch)]).and_then([TxnOp::delete(key.as_str(), None)]);
    match tokio::time::timeout(REQUEST_TIMEOUT, client.txn(txn)).await {
        Ok(r) => r.map(drop),
        Err(_) => Err(etcd_client::Error::InvalidArgs("delete singleton claim timed out".into())),
    }
}

/// The last settled slot of singleton `name`, if one was ever recorded.
pub async fn read_settled(client: &mut Client, keys: &Keys, name: &str) -> Result<Option<SingletonRun>, Error> {
    let failed = |source| Error::RecordSlot { name: name.to_owned(), source };
    let resp = match tokio::time::timeout(REQUEST_TIMEOUT, client.get(keys.singleton_run(name), None)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(failed(e.into())),
        Err(_) => return Err(failed(crate::claims::RequestError::TimedOut(REQUEST_TIMEOUT))),
    };
    Ok(resp.kvs().first().and_then(|kv| match SingletonRun::decode(kv.value()) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(singleton = %name, error = %e, "unreadable last settled slot; starting the schedule from now");
            None
        }
    }))
}

/// Records `run` as the last settled slot of singleton `name`, only while the claim of
/// `epoch` is current. `Ok(false)`: the claim is no longer ours.
pub async fn record_settled(client: &mut Client, keys: &Keys, name: &str, epoch: i64, run: &SingletonRun) -> Result<bool, Error> {
    let failed = |source| Error::RecordSlot { name: name.to_owned(), source };
    let claim = keys.singleton(name);
    let txn = Txn::new().when([Compare::create_revision(claim.as_str(), CompareOp::Equal, epoch)]).and_then([TxnOp::put(keys.singleton_run(name), run.encode(), None)]);
    match tokio::time::timeout(REQUEST_TIMEOUT, client.txn(txn)).await {
        Ok(Ok(r)) => Ok(r.succeeded()),
        Ok(Err(e)) => Err(failed(e.into())),
        Err(_) => Err(failed(crate::claims::RequestError::TimedOut(REQUEST_TIMEOUT))),
    }
}

/// Returns once `key` is deleted after `revision`; `Err` when the watch fails or ends.
async fn deleted_after(mut client: Client, key: String, revision: i64) -> Result<(), String> {
    let options = WatchOptions::new().with_start_revision(revision + 1);
    let mut stream = client.watch(key.as_str(), Some(options)).await.map_err(|e| e.to_string())?;
    loop {
        match stream.message().await {
            Ok(Some(resp)) => {
                if resp.canceled() {
                    return Err(format!("watch cancelled: {}", resp.cancel_reason()));
                }
                if resp.events().iter().any(|e| e.event_type() == EventType::Delete) {
                    return Ok(());
                }
            }
            Ok(None) => return Err("watch ended".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Why a held singleton stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// The fence tripped: kill at once; the claim goes with the lease.
    Fence,
    /// The runner shuts down: stop gently, then release the claim.
    Shutdown,
    /// The claim was deleted by someone else: kill at once and compete again.
    Lost,
}

/// What one singleton's task needs of its incarnation.
#[derive(Clone)]
struct Ctx {
    /// The etcd client.
    client: Client,
    /// The cluster's keys.
    keys: Keys,
    /// This node's id, written in the claim and passed as QSLICE_NODE.
    node_id: String,
    /// This incarnation's id, written in the claim.
    incarnation: Uuid,
    /// The lease the claim hangs on.
    lease_id: i64,
    /// The incarnation's fence: the command runs only while it is valid.
    fence: Arc<Fence>,
    /// The runner's shutdown: stop the command gently and release the claim.
    shutdown: CancellationToken,
}

impl Ctx {
    /// Resolves when the holder must stop, and why (the fence first).
    async fn stop(&self, lost: &CancellationToken) -> Stop {
        tokio::select! {
            biased;
            _ = self.fence.lost().cancelled() => Stop::Fence,
            _ = lost.cancelled() => Stop::Lost,
            _ = self.shutdown.cancelled() => Stop::Shutdown,
        }
    }

    /// Why the holder has to stop now, if it has: nothing starts then (say, a claim won
    /// just as shutdown began).
    fn must_stop(&self, lost: &CancellationToken) -> Option<Stop> {
        if !self.fence.is_valid() {
            Some(Stop::Fence)
        } else if lost.is_cancelled() {
            Some(Stop::Lost)
        } else if self.shutdown.is_cancelled() {
            Some(Stop::Shutdown)
        } else {
            None
        }
    }

    fn stopping(&self) -> bool {
        self.fence.lost().is_cancelled() || self.shutdown.is_cancelled()
    }
}

/// The singleton tasks of one incarnation.
pub struct Singletons {
    /// One task per configured singleton ([`compete`]).
    tasks: JoinSet<()>,
}

impl Singletons {
    /// Starts one task per configured singleton; each competes for its claim on this
    /// incarnation's lease until `shutdown` or the fence.
    pub fn start(client: &Client, shared: &Shared, inc: &Incarnation, shutdown: &CancellationToken) -> Singletons {
        let mut tasks = JoinSet::new();
        for (name, cfg) in &shared.cfg.singleton {
            let ctx = Ctx {
                client: client.clone(),
                keys: shared.keys.clone(),
                node_id: shared.cfg.node_id.clone(),
                incarnation: inc.incarnation,
                lease_id: inc.lease_id,
                fence: inc.fence.clone(),
                shutdown: shutdown.clone(),
            };
            metrics::gauge!("qslice_runner_singleton_held", "name" => name.clone()).set(0.0);
            tasks.spawn(compete(ctx, name.clone(), cfg.clone()));
        }
        Singletons { tasks }
    }

    /// Waits until every task ended (each stops its command first: at once on a fence,
    /// gently on shutdown).
    pub async fn join(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// One singleton on one incarnation: claim, hold and run, or watch the holder.
async fn compete(ctx: Ctx, name: String, cfg: SingletonConfig) {
    let schedule = cfg.schedule.as_deref().map(|s| Schedule::parse(s, cfg.timezone).expect("checked with the configuration"));
    let mut waiting_on: Option<String> = None;
    while !ctx.stopping() {
        let record = SingletonClaim { v: RECORD_VERSION, node_id: ctx.node_id.clone(), incarnation: ctx.incarnation, claimed_unix_ms: unix_ms() };
        let key = ctx.keys.singleton(&name);
        let outcome = if ctx.fence.is_valid() { claim(&mut ctx.client.clone(), &ctx.keys, &name, &record, ctx.lease_id).await } else { return };
        match outcome {
            Ok(ClaimOutcome::Held { epoch }) => {
                match &waiting_on {
                    Some(holder) => tracing::info!(singleton = %name, epoch, previous = %holder, "took over the singleton: the previous holder released it or its lease ended"),
                    None => tracing::info!(singleton = %name, epoch, "holding the singleton; this node runs it"),
                }
                waiting_on = None;
                let gauge = metrics::gauge!("qslice_runner_singleton_held", "name" => name.clone());
                gauge.set(1.0);
                let stop = hold(&ctx, &name, &cfg, schedule.as_ref(), epoch).await;
                gauge.set(0.0);
                match stop {
                    Stop::Fence => {
                        tracing::warn!(singleton = %name, epoch, reason = %ctx.fence.reason().unwrap_or_default(), "fenced: the singleton's command is stopped; its claim ends with the lease");
                        return;
                    }
                    Stop::Shutdown => {
                        match release(&mut ctx.client.clone(), &ctx.keys, &name, epoch).await {
                            Ok(()) => tracing::info!(singleton = %name, epoch, "released the singleton; another node takes it over now"),
                            Err(e) => tracing::warn!(singleton = %name, epoch, error = %e, "releasing the singleton failed; it ends with the lease"),
                        }
                        return;
                    }
                    Stop::Lost => {
                        tracing::warn!(singleton = %name, epoch, "the singleton's claim was deleted while held; its command was killed; competing again");
                    }
                }
            }
            Ok(ClaimOutcome::HeldByOther { holder, .. }) if holder.is_empty() => {
                // Deleted between the transaction's compare and its read: claim again now.
                continue;
            }
            Ok(outcome @ (ClaimOutcome::HeldByOther { .. } | ClaimOutcome::HeldBack { .. })) => {
                let (holder, watched, revision) = match outcome {
                    ClaimOutcome::HeldByOther { holder, revision } => (holder, key, revision),
                    ClaimOutcome::HeldBack { revision } => (String::new(), ctx.keys.singleton_hold(&name), revision),
                    ClaimOutcome::Held { .. } => unreachable!("matched above"),
                };
                if waiting_on.as_deref() != Some(holder.as_str()) {
                    if holder.is_empty() {
                        tracing::info!(singleton = %name, "the singleton is held back after the leader revoked its last holder's lease; taking it over once the hold ends");
                    } else {
                        tracing::info!(singleton = %name, %holder, "the singleton is held by another node; watching its claim to take over when it ends");
                    }
                    waiting_on = Some(holder);
                }
                tokio::select! {
                    watched = deleted_after(ctx.client.clone(), watched, revision) => {
                        if let Err(e) = watched {
                            tracing::debug!(singleton = %name, error = %e, "watching the singleton's claim failed; looking again shortly");
                            tokio::time::sleep(RETRY).await;
                        }
                    }
                    _ = tokio::time::sleep(RECHECK) => {}
                    _ = ctx.fence.lost().cancelled() => return,
                    _ = ctx.shutdown.cancelled() => return,
                }
            }
            Err(e) => {
                tracing::warn!(singleton = %name, error = %e, "claiming the singleton failed; will retry");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = ctx.fence.lost().cancelled() => return,
                    _ = ctx.shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// Holds the claim of `epoch` and runs the command until it must stop.
async fn hold(ctx: &Ctx, name: &str, cfg: &SingletonConfig, schedule: Option<&Schedule>, epoch: i64) -> Stop {
    // The claim's deletion by anyone but us means it is no longer ours. The watch starts
    // from a fresh read each time, so a compacted revision or a broken watch only costs a
    // read, never a missed deletion.
    let lost = CancellationToken::new();
    let watcher = {
        let (mut client, key, lost, fenced, shutdown) = (ctx.client.clone(), ctx.keys.singleton(name), lost.clone(), ctx.fence.lost().clone(), ctx.shutdown.clone());
        tokio::spawn(async move {
            loop {
                let read = tokio::time::timeout(REQUEST_TIMEOUT, client.get(key.as_str(), None)).await;
                let watched = match read {
                    Ok(Ok(resp)) => {
                        if resp.kvs().first().is_none_or(|kv| kv.create_revision() != epoch) {
                            lost.cancel();
                            return;
                        }
                        let revision = resp.header().map(|h| h.revision()).unwrap_or(epoch);
                        tokio::select! {
                            watched = deleted_after(client.clone(), key.clone(), revision) => watched,
                            _ = fenced.cancelled() => return,
                            _ = shutdown.cancelled() => return,
                        }
                    }
                    _ => Err("cannot read the claim".to_owned()),
                };
                match watched {
                    Ok(()) => {
                        lost.cancel();
                        return;
                    }
                    Err(_) => tokio::select! {
                        _ = tokio::time::sleep(RETRY) => {}
                        _ = fenced.cancelled() => return,
                        _ = shutdown.cancelled() => return,
                    },
                }
            }
        })
    };
    let stop = match schedule {
        Some(schedule) => periodic(ctx, name, cfg, schedule, epoch, &lost).await,
        None => long_running(ctx, name, cfg, epoch, &lost).await,
    };
    watcher.abort();
    stop
}

/// How one run of the command ended.
enum RunEnd {
    /// It exited by itself (or, on shutdown, within the stop timeout).
    Exited(ExitStatus),
    /// It did not start.
    NotStarted(String),
    /// It was killed after the periodic run timeout.
    TimedOut,
    /// It was stopped from outside before it ended.
    Stopped(Stop),
}

/// Runs the command once; `slot` is passed as QSLICE_SLOT (periodic runs).
async fn run_once(ctx: &Ctx, name: &str, cfg: &SingletonConfig, epoch: i64, slot: Option<i64>, lost: &CancellationToken) -> (RunEnd, Option<Stop>) {
    if let Some(stop) = ctx.must_stop(lost) {
        return (RunEnd::Stopped(stop), Some(stop));
    }
    let mut env = vec![("QSLICE_SINGLETON", name.to_owned()), ("QSLICE_NODE", ctx.node_id.clone()), ("QSLICE_EPOCH", epoch.to_string())];
    if let Some(slot) = slot {
        env.push(("QSLICE_SLOT", (slot / 1000).to_string()));
    }
    let mut child = match command(cfg, &env).and_then(|mut c| c.spawn()) {
        Ok(c) => c,
        Err(e) => return (RunEnd::NotStarted(e.to_string()), None),
    };
    let pid = child.id().unwrap_or(0) as i32;
    let _leashed = crate::leash::Leashed::new(child.id());
    if let Some(out) = child.stdout.take() {
        crate::supervise::log_lines(out, format!("singleton {name}"), format!("pid {pid}"), "stdout");
    }
    if let Some(err) = child.stderr.take() {
        crate::supervise::log_lines(err, format!("singleton {name}"), format!("pid {pid}"), "stderr");
    }
    tracing::info!(singleton = %name, pid, epoch, slot = ?slot.map(|s| s / 1000), "started the singleton's command");
    let group = Pid::from_raw(pid);
    let kill_all = || {
        let _ = killpg(group, Signal::SIGKILL);
    };
    let timeout = async {
        match cfg.timeout {
            Some(t) if slot.is_some() => tokio::time::sleep(t).await,
            _ => std::future::pending().await,
        }
    };
    let end = tokio::select! {
        biased;
        stop = ctx.stop(lost) => match stop {
            Stop::Shutdown => {
                // Gently: SIGTERM, then SIGKILL after the stop timeout (or at once on a fence).
                let _ = killpg(group, Signal::SIGTERM);
                tokio::select! {
                    biased;
                    _ = ctx.fence.lost().cancelled() => { kill_all(); let _ = child.wait().await; RunEnd::Stopped(Stop::Fence) }
                    status = tokio::time::timeout(cfg.stop_timeout(), child.wait()) => match status {
                        // It finished its run despite the signal: the run counts.
                        Ok(Ok(status)) if status.success() => RunEnd::Exited(status),
                        // It ended of qslice's own SIGTERM (or failed on it): qslice cut
                        // the run off, so the slot stays unsettled for the next holder.
                        Ok(Ok(status)) => {
                            tracing::info!(singleton = %name, pid, %status, "the singleton's command ended on the stop signal; its run was cut off, not failed");
                            RunEnd::Stopped(Stop::Shutdown)
                        }
                        _ => {
                            tracing::warn!(singleton = %name, pid, timeout = ?cfg.stop_timeout(), "the singleton's command did not stop in time after SIGTERM; killing it");
                            kill_all();
                            let _ = child.wait().await;
                            RunEnd::Stopped(Stop::Shutdown)
                        }
                    },
                }
            }
            other => {
                kill_all();
                let _ = child.wait().await;
                RunEnd::Stopped(other)
            }
        },
        status = child.wait() => match status {
            Ok(status) => RunEnd::Exited(status),
            Err(e) => RunEnd::NotStarted(e.to_string()),
        },
        _ = timeout => {
            kill_all();
            let _ = child.wait().await;
            RunEnd::TimedOut
        }
    };
    // Whatever it left in its group goes with it.
    kill_all();
    let stop = match &end {
        RunEnd::Stopped(s) => Some(*s),
        _ if ctx.fence.lost().is_cancelled() => Some(Stop::Fence),
        _ if lost.is_cancelled() => Some(Stop::Lost),
        _ if ctx.shutdown.is_cancelled() => Some(Stop::Shutdown),
        _ => None,
    };
    (end, stop)
}

/// The label of a run's end in `qslice_runner_singleton_runs_total`.
fn outcome_of(end: &RunEnd) -> &'static str {
    match end {
        RunEnd::Exited(s) if s.success() => "ok",
        RunEnd::Exited(_) => "failed",
        RunEnd::NotStarted(_) => "not_started",
        RunEnd::TimedOut => "timeout",
        RunEnd::Stopped(_) => "interrupted",
    }
}

fn count(name: &str, outcome: &'static str) {
    metrics::counter!("qslice_runner_singleton_runs_total", "name" => name.to_owned(), "outcome" => outcome).increment(1);
}

/// A periodic singleton while held: runs each due slot and settles it.
async fn periodic(ctx: &Ctx, name: &str, cfg: &SingletonConfig, schedule: &Schedule, epoch: i64, lost: &CancellationToken) -> Stop {
    let mut client = ctx.client.clone();
    // Where the schedule stands: the last settled slot, read once per claim.
    let mut settled = loop {
        match read_settled(&mut client, &ctx.keys, name).await {
            Ok(Some(run)) => break run.last_slot_unix_ms,
            Ok(None) => {
                let start = baseline(schedule, unix_ms());
                let run = SingletonRun { v: RECORD_VERSION, last_slot_unix_ms: start, node_id: ctx.node_id.clone(), settled_unix_ms: unix_ms(), outcome: "baseline".into() };
                match record_settled(&mut client, &ctx.keys, name, epoch, &run).await {
                    Ok(true) => {
                        tracing::info!(singleton = %name, "first holder of this singleton: its schedule starts now");
                        break start;
                    }
                    Ok(false) => return Stop::Lost,
                    Err(e) => tracing::warn!(singleton = %name, error = %e, "cannot record where the schedule starts; retrying"),
                }
            }
            Err(e) => tracing::warn!(singleton = %name, error = %e, "cannot read the last settled slot; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            stop = ctx.stop(lost) => return stop,
        }
    };
    loop {
        let now = unix_ms();
        let plan = due(schedule, settled, now, cfg.catch_up);
        let Some(&slot) = plan.run.first() else {
            let Some(next) = plan.next else {
                tracing::error!(singleton = %name, "the schedule has no further slot; holding without running");
                return ctx.stop(lost).await;
            };
            // Sleep on tokio's clock for the wall-clock distance; looked at again on
            // waking (the wall clock may have been stepped meanwhile).
            let wait = Duration::from_millis(u64::try_from(next - now).unwrap_or(0));
            tokio::select! {
                _ = tokio::time::sleep(wait) => continue,
                stop = ctx.stop(lost) => return stop,
            }
        };
        if plan.skipped_older && plan.run.len() == cfg.catch_up {
            tracing::warn!(singleton = %name, catch_up = cfg.catch_up, first_run = slot / 1000, "slots were missed beyond the catch-up (no holder for a while); the older ones are skipped");
            metrics::counter!("qslice_runner_singleton_skipped_total", "name" => name.to_owned()).increment(1);
        }
        if now - slot > 1000 {
            tracing::info!(singleton = %name, slot = slot / 1000, late_ms = now - slot, "running a missed slot (taken over from a holder that did not settle it, or no holder at its time)");
        }
        if let Some(stop) = ctx.must_stop(lost) {
            return stop;
        }
        let (end, stop) = run_once(ctx, name, cfg, epoch, Some(slot), lost).await;
        let outcome = outcome_of(&end);
        count(name, outcome);
        match &end {
            RunEnd::Exited(status) if status.success() => tracing::info!(singleton = %name, slot = slot / 1000, "the singleton's run ended"),
            RunEnd::Exited(status) => {
                tracing::warn!(singleton = %name, slot = slot / 1000, %status, "the singleton's run failed; the slot counts as run (a failed run is not retried)")
            }
            RunEnd::TimedOut => tracing::warn!(singleton = %name, slot = slot / 1000, timeout = ?cfg.timeout, "the singleton's run took longer than its timeout; killed"),
            RunEnd::NotStarted(e) => tracing::error!(singleton = %name, slot = slot / 1000, error = %e, "cannot start the singleton's command; the slot counts as run"),
            RunEnd::Stopped(why) => {
                tracing::warn!(singleton = %name, slot = slot / 1000, ?why, "the singleton's run was cut off; the slot stays unsettled, so the next holder runs it again");
                return *why;
            }
        }
        // The run ended (however it went): settle its slot, under our claim.
        let run = SingletonRun { v: RECORD_VERSION, last_slot_unix_ms: slot, node_id: ctx.node_id.clone(), settled_unix_ms: unix_ms(), outcome: outcome.into() };
        let mut recorded = false;
        while ctx.fence.is_valid() {
            match record_settled(&mut client, &ctx.keys, name, epoch, &run).await {
                Ok(true) => {
                    recorded = true;
                    break;
                }
                Ok(false) => return Stop::Lost,
                Err(e) => {
                    tracing::warn!(singleton = %name, slot = slot / 1000, error = %e, "recording the settled slot failed; retrying while the lease lasts");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
        if !recorded {
            tracing::warn!(singleton = %name, slot = slot / 1000, "the slot ran but could not be recorded before the fence; the next holder runs it again");
            return Stop::Fence;
        }
        settled = slot;
        if let Some(stop) = stop {
            return stop;
        }
    }
}

/// A long-running singleton while held: started, and restarted with backoff when it exits.
async fn long_running(ctx: &Ctx, name: &str, cfg: &SingletonConfig, epoch: i64, lost: &CancellationToken) -> Stop {
    let mut backoff = FIRST_BACKOFF;
    loop {
        if let Some(stop) = ctx.must_stop(lost) {
            return stop;
        }
        let started = tokio::time::Instant::now();
        let (end, stop) = run_once(ctx, name, cfg, epoch, None, lost).await;
        count(name, outcome_of(&end));
        if let Some(stop) = stop {
            tracing::info!(singleton = %name, ?stop, "the singleton's command is stopped");
            return stop;
        }
        if started.elapsed() >= STABLE_RUN {
            backoff = FIRST_BACKOFF;
        }
        match &end {
            RunEnd::Exited(status) => tracing::warn!(singleton = %name, %status, restart_in = ?backoff, "the long-running singleton's command exited; restarting it"),
            RunEnd::NotStarted(e) => tracing::error!(singleton = %name, error = %e, restart_in = ?backoff, "cannot start the singleton's command; trying again"),
            RunEnd::TimedOut | RunEnd::Stopped(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            stop = ctx.stop(lost) => return stop,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The singleton's command, set up like a supervised child (no group of its own).
fn command(cfg: &SingletonConfig, extra: &[(&str, String)]) -> std::io::Result<tokio::process::Command> {
    let setup = ChildSetup { env: &cfg.env, workdir: cfg.workdir.as_deref(), user: cfg.user.as_deref(), group: None };
    child_command(&setup, &cfg.command, extra)
}
