//! Processing of the claimed slices of handled (not supervised) queues: one loop per queue
//! and slice count that lists the queue, takes entries FIFO per slice and round-robin over
//! the slices, runs the handler on each, and settles the entry by the handler's outcome.
//!
//! Rules that keep a slice single-owned:
//! - an entry is taken (`.pck` -> `.bak`) only while its slice is claimed, accepting, and
//!   the fence is valid; the check and the in-flight count change under one lock
//!   ([`InFlightCount::enter`]), so a release that sees no work in flight knows none can start;
//! - [`drain_slice`] stops a slice taking entries and returns only once its in-flight work
//!   ended (or was killed at the drain timeout, leaving `.bak` files for the next owner);
//! - when the fence trips, every handler is killed at once and nothing more is touched.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::Client;
use qslice_common::lease::Fence;
use qslice_common::spool::{Dequeued, Entry, InFlight, QueueDir, Scan};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::figures::{publish_figures, publish_status, STATUS_INTERVAL};
use crate::handler::{Handler, Job, Outcome};
use crate::incarnation::Shared;

/// One claimed slice of a handled queue.
pub(crate) struct SliceState {
    /// The claim's epoch, handed to every handler.
    pub(crate) epoch: i64,
    /// Whether entries may still be taken (false once the release began).
    pub(crate) accepting: bool,
    /// Entries being taken or in flight; changed only through [`InFlightCount`].
    pub(crate) in_flight: usize,
    /// Kills this slice's handlers (a child of the incarnation's fence token).
    pub(crate) kill: CancellationToken,
}

/// The claimed slices of one queue (for one slice count) and what its loop shares with
/// the incarnation.
pub(crate) struct QueueState {
    /// The queue.
    pub(crate) queue: String,
    /// The slice count the slice numbers refer to.
    pub(crate) slices_total: u32,
    /// The queue's directory in the spool.
    pub(crate) dir: QueueDir,
    /// The claimed slices; the incarnation adds them, [`drain_slice`] removes them.
    pub(crate) owned: Mutex<BTreeMap<u32, SliceState>>,
    /// Wakes the loop (slices added) and a release (in-flight work ended).
    pub(crate) changed: Notify,
}

/// One entry in flight on a slice: counted in the slice's `in_flight` from
/// [`InFlightCount::enter`] on, and in the `qslice_runner_in_flight` gauge once the entry is
/// taken; dropping the guard counts it out of both and wakes a release waiting for it.
struct InFlightCount {
    /// The queue the entry is in.
    state: Arc<QueueState>,
    /// The entry's slice.
    slice: u32,
    /// The slice's epoch when the entry was counted in.
    epoch: i64,
    /// The slice's kill token.
    kill: CancellationToken,
    /// Whether the entry was taken and counted in the gauge.
    gauged: bool,
}

impl InFlightCount {
    /// Counts an entry of `slice` in, if the slice is still claimed and accepting and the
    /// fence is valid (checked and counted under the one lock a release looks at).
    fn enter(state: &Arc<QueueState>, slice: u32, fence: &Fence) -> Option<InFlightCount> {
        let mut owned = state.owned.lock().expect("owned lock");
        let s = owned.get_mut(&slice)?;
        if !s.accepting || !fence.is_valid() {
            return None;
        }
        s.in_flight += 1;
        Some(InFlightCount { state: state.clone(), slice, epoch: s.epoch, kill: s.kill.clone(), gauged: false })
    }

    /// The entry was taken: count it in the node's in-flight gauge too.
    fn taken(&mut self) {
        metrics::gauge!("qslice_runner_in_flight").increment(1.0);
        self.gauged = true;
    }
}

impl Drop for InFlightCount {
    fn drop(&mut self) {
        if self.gauged {
            metrics::gauge!("qslice_runner_in_flight").decrement(1.0);
        }
        if let Some(s) = self.state.owned.lock().expect("owned lock").get_mut(&self.slice) {
            s.in_flight -= 1;
        }
        self.state.changed.notify_waiters();
    }
}

/// Stops taking entries of `slice`, waits for its in-flight work (killing it at the drain
/// timeout), and forgets the slice. Returns the claim's epoch.
pub(crate) async fn drain_slice(state: &QueueState, slice: u32, drain: Duration) -> Option<i64> {
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

/// Lists the queue once per pass and processes the claimed slices' entries FIFO.
pub(crate) async fn queue_loop(state: Arc<QueueState>, shared: Arc<Shared>, fence: Arc<Fence>, mut client: Client, lease_id: i64) {
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
        let mut lists: Vec<std::vec::IntoIter<Entry>> = owned.iter().filter_map(|s| pending.remove(s)).map(|v| v.into_iter()).collect();
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

/// Takes one entry if its slice is still claimed and accepting and the fence is valid,
/// and runs the handler on it in a task of its own.
fn start_entry(state: &Arc<QueueState>, shared: &Arc<Shared>, fence: &Arc<Fence>, entry: Entry, permit: OwnedSemaphorePermit) -> bool {
    let Some(mut in_flight) = InFlightCount::enter(state, entry.slice, fence) else { return false };
    let taken = match state.dir.dequeue(&entry) {
        // The rename can block (NFS) while the lease runs out: look at the fence again
        // before anything starts. The entry stays .bak for the next owner.
        Ok(Dequeued::Taken(_)) if !fence.is_valid() => {
            tracing::warn!(queue = %state.queue, slice = entry.slice, entry = %entry.name.filebase, "the fence tripped while the entry was being taken; it stays .bak for the next owner");
            return false;
        }
        Ok(Dequeued::Taken(t)) => t,
        Ok(Dequeued::Gone) => return false,
        Ok(Dequeued::Quarantined(q)) => {
            tracing::warn!(queue = %state.queue, from = %q.from.display(), to = %q.to.display(), reason = %q.reason, "entry quarantined");
            metrics::counter!("qslice_runner_entries_total", "queue" => state.queue.clone(), "outcome" => "quarantined").increment(1);
            return false;
        }
        Err(e) => {
            tracing::error!(queue = %state.queue, error = %e, "dequeue failed");
            return false;
        }
    };
    in_flight.taken();
    let job = Job {
        path: taken.path.clone(),
        filebase: entry.name.filebase.clone(),
        queue: state.queue.clone(),
        slice: entry.slice,
        slices: state.slices_total,
        epoch: in_flight.epoch,
        node: shared.cfg.node_id.clone(),
    };
    let state = state.clone();
    let handler: Handler = shared.handler.clone();
    let fence = fence.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let kill = in_flight.kill.clone();
        let outcome = tokio::select! {
            biased;
            _ = kill.cancelled() => None,
            o = handler.handle(&job) => Some(o),
        };
        // A handler killed by the leash at the fence deadline (this runner was frozen or
        // hung) looks like a failure: it is a kill, and the entry stays .bak.
        let fenced = kill.is_cancelled() || !fence.is_valid();
        let outcome = outcome.filter(|o| !(fenced && matches!(o, Outcome::Failed(_) | Outcome::Retry)));
        let label = settle(&state, &handler, &job, &taken, &kill, outcome).await;
        metrics::counter!("qslice_runner_entries_total", "queue" => state.queue.clone(), "outcome" => label).increment(1);
        drop(in_flight);
    });
    true
}

/// Settles a taken entry by its handler's outcome (`None`: the handler was killed) and
/// returns the outcome label of `qslice_runner_entries_total`.
async fn settle(state: &QueueState, handler: &Handler, job: &Job, taken: &InFlight, kill: &CancellationToken, outcome: Option<Outcome>) -> &'static str {
    let queue = &state.queue;
    match outcome {
        None => {
            tracing::warn!(%queue, slice = job.slice, entry = %job.filebase, "handler killed (fence or drain timeout); the entry stays .bak for recovery");
            "killed"
        }
        Some(Outcome::Finished) => match state.dir.finish(taken) {
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
                match state.dir.requeue(taken) {
                    Ok(()) => "retried",
                    Err(e) => {
                        tracing::error!(%queue, error = %e, "requeue failed");
                        "requeue_failed"
                    }
                }
            }
        }
        Some(Outcome::Failed(reason)) => match state.dir.preserve(taken) {
            Ok(psv) => {
                tracing::warn!(%queue, slice = job.slice, entry = %job.filebase, %reason, to = %psv.display(), "handler failed; entry preserved");
                "preserved"
            }
            Err(e) => {
                tracing::error!(%queue, %reason, error = %e, "handler failed and preserving the entry failed too; it stays .bak");
                "preserve_failed"
            }
        },
    }
}
