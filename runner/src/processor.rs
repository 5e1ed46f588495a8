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
//! - when the fence trips, every handler is killed at once and nothing more is touched;
//!   a handler qslice kills (fence, drain timeout) gets a stop mark first, so that its
//!   entry's next recovery does not count toward `bad/` (crashes and poison mail do).
//!
//! Faults of the moment never quarantine mail: an entry that cannot be opened, a listing
//! that fails, a finish, preserve or requeue that fails are retried with backoff (per
//! entry, per queue, per entry in flight), alerted (`alert:` log lines, rate-limited) and
//! counted (`qslice_runner_spool_errors_total{queue,op}`). A `.bak` of an owned slice that
//! this node does not have in flight and that is older than the handler timeout (a late
//! NFS rename, a stale listing, a failed finish of an earlier incarnation) is stranded:
//! the loop recovers it as a new owner would.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::Client;
use qslice_common::lease::Fence;
use qslice_common::spool::{Dequeued, Entry, InFlight, Problem, QueueDir, Scan, SpoolError};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::arrivals::{Armed, Arrivals, BUSY_PASS};
use crate::figures::{publish_figures, publish_status, STATUS_INTERVAL};
use crate::handler::{Handler, Job, Outcome};
use crate::retry::{errno_name, AlertGate, Backoff, Deferred, ALERT_INTERVAL, SPOOL_BACKOFF};
use crate::shared::Shared;

/// How often the loop looks for stranded `.bak` entries of its slices (it stats only the
/// `.bak` files it has not in flight).
const STRANDED_CHECK: Duration = Duration::from_secs(1);

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
    /// Slices added since a pass began, and a wake-up for a pass waiting for a permit: a
    /// pass that is working through other slices' entries ends, and the next one takes the
    /// new slice's entries in its round-robin, instead of after everything listed before.
    pub(crate) slices_added: SliceAdditions,
    /// Entries whose take failed and when to try them again, and the alert rate limit.
    pub(crate) faults: Mutex<SpoolFaults>,
    /// File bases of the entries this node is taking or has in flight (until settled):
    /// any other `.bak` of an owned slice is someone else's, or stranded.
    pub(crate) taken: Mutex<BTreeSet<String>>,
    /// How long after the fence deadline the lease (and the claim) can still be alive:
    /// a stop mark written later than that is said so in the log.
    pub(crate) lease_margin: Duration,
    /// The per-entry metrics, looked up once.
    pub(crate) meters: EntryMeters,
}

/// The metrics every entry changes, looked up in the registry once per queue loop
/// instead of per entry (a lookup hashes the name and labels and takes a lock).
pub(crate) struct EntryMeters {
    /// `qslice_runner_entries_total{queue,outcome="finished"}`.
    finished: metrics::Counter,
    /// `qslice_runner_in_flight`.
    in_flight: metrics::Gauge,
}

impl EntryMeters {
    /// The meters of `queue`.
    pub(crate) fn new(queue: &str) -> EntryMeters {
        EntryMeters {
            finished: metrics::counter!("qslice_runner_entries_total", "queue" => queue.to_owned(), "outcome" => "finished"),
            in_flight: metrics::gauge!("qslice_runner_in_flight"),
        }
    }

    /// Counts an entry settled with `outcome` (a label of `qslice_runner_entries_total`).
    fn settled(&self, queue: &str, outcome: &'static str) {
        match outcome {
            "finished" => self.finished.increment(1),
            _ => metrics::counter!("qslice_runner_entries_total", "queue" => queue.to_owned(), "outcome" => outcome).increment(1),
        }
    }
}

/// See [`QueueState::slices_added`].
#[derive(Debug, Default)]
pub(crate) struct SliceAdditions {
    /// Woken at each addition.
    notify: Notify,
    /// The slices added since a pass last looked, each with its `.pck` entries as the
    /// claim's recovery listed them: a pass under way takes them in next in its
    /// round-robin, and a new pass serves them first, so that a slice handed over with a
    /// backlog waiting gets the next free permit, without waiting for another listing.
    fresh: Mutex<Vec<(u32, Vec<Entry>)>>,
}

impl SliceAdditions {
    /// `slices` were added (after they are in `owned`), with their `.pck` entries as
    /// listed since their claim.
    pub(crate) fn added(&self, slices: impl IntoIterator<Item = (u32, Vec<Entry>)>) {
        self.fresh.lock().expect("fresh lock").extend(slices);
        self.notify.notify_waiters();
    }

    /// The slices added since the last call, with their listed entries.
    fn take(&self) -> Vec<(u32, Vec<Entry>)> {
        std::mem::take(&mut *self.fresh.lock().expect("fresh lock"))
    }

    /// Whether slices were added since the last [`SliceAdditions::take`].
    fn any_fresh(&self) -> bool {
        !self.fresh.lock().expect("fresh lock").is_empty()
    }
}

/// The spool faults of one queue's loop.
#[derive(Debug)]
pub(crate) struct SpoolFaults {
    /// Entries (file bases) whose take failed, backing off.
    entries: Deferred<String>,
    /// At most one alert line per operation and interval.
    alerts: AlertGate<&'static str>,
}

impl Default for SpoolFaults {
    fn default() -> SpoolFaults {
        SpoolFaults { entries: Deferred::new(SPOOL_BACKOFF), alerts: AlertGate::new(ALERT_INTERVAL) }
    }
}

impl SpoolFaults {
    /// Drops from `entries` those whose take failed and whose backoff has not run out.
    fn keep_ready(&self, entries: &mut Vec<Entry>, now: Instant) {
        if !self.entries.is_empty() {
            entries.retain(|e| self.entries.ready(&e.name.filebase, now));
        }
    }
}

impl QueueState {
    /// Counts a failed spool operation `op` and says whether to write its alert line now
    /// (`Some` with the alerts held back since the last one).
    fn spool_error(&self, op: &'static str) -> Option<u64> {
        metrics::counter!("qslice_runner_spool_errors_total", "queue" => self.queue.clone(), "op" => op).increment(1);
        self.faults.lock().expect("faults lock").alerts.admit(op, Instant::now())
    }

    /// Writes the stop mark of `entry`: qslice stopped its handler (a fence, a drain
    /// timeout), so the next recovery of the entry does not count toward `bad/`.
    ///
    /// Written even when this runner gets here after the claim may have lapsed (see
    /// `lease_margin`): a runner starved of CPU or frozen learns of its fence late, but the
    /// leash killed its handlers at the fence deadline, inside the claim. Without the mark
    /// every such fence would count, and a node that fences often (a starved host) would
    /// send healthy mail to `bad/` at the third. A mark that lands after the next owner has
    /// recovered the entry stays until that owner's next sweep, and at worst spares one
    /// later recovery of the entry from the count.
    fn mark_stopped(&self, entry: &Entry, fence: &Fence) {
        let late = Instant::now() >= fence.deadline() + self.lease_margin;
        match self.dir.mark_stopped(entry) {
            Ok(()) if late => {
                tracing::info!(queue = %self.queue, entry = %entry.name.filebase, "stop mark written after the claim may have lapsed (this runner learnt of its fence late; the leash had killed the handler at the fence deadline)");
            }
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(queue = %self.queue, entry = %entry.name.filebase, error = %e, "cannot write the stop mark; the next recovery of this entry counts");
            }
        }
    }
}

/// The `.bak` entries of `owned` slices in `in_flight` that this node does not have in
/// flight (`taken`) and whose age (`age_of`, seconds since the rename to `.bak`) is above
/// `timeout`: no handler of this or an earlier owner can still run on them.
pub(crate) fn stranded(
    in_flight: &BTreeMap<u32, Vec<Entry>>,
    owned: &[u32],
    taken: &BTreeSet<String>,
    timeout: Duration,
    mut age_of: impl FnMut(&Entry) -> Option<f64>,
) -> Vec<Entry> {
    owned
        .iter()
        .filter_map(|s| in_flight.get(s))
        .flatten()
        .filter(|e| !taken.contains(&e.name.filebase))
        .filter(|e| age_of(e).is_some_and(|age| age > timeout.as_secs_f64()))
        .cloned()
        .collect()
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
    /// The entry's file base, in the queue's `taken` set while this lives.
    filebase: String,
}

impl InFlightCount {
    /// Counts an entry of `slice` in, if the slice is still claimed and accepting and the
    /// fence is valid (checked and counted under the one lock a release looks at).
    fn enter(state: &Arc<QueueState>, entry: &Entry, fence: &Fence) -> Option<InFlightCount> {
        let mut owned = state.owned.lock().expect("owned lock");
        let s = owned.get_mut(&entry.slice)?;
        if !s.accepting || !fence.is_valid() {
            return None;
        }
        s.in_flight += 1;
        // Known as ours before the rename makes it a .bak: never mistaken for stranded.
        state.taken.lock().expect("taken lock").insert(entry.name.filebase.clone());
        let filebase = entry.name.filebase.clone();
        Some(InFlightCount { state: state.clone(), slice: entry.slice, epoch: s.epoch, kill: s.kill.clone(), gauged: false, filebase })
    }

    /// The entry was taken: count it in the node's in-flight gauge too.
    fn taken(&mut self) {
        self.state.meters.in_flight.increment(1.0);
        self.gauged = true;
    }
}

impl Drop for InFlightCount {
    fn drop(&mut self) {
        if self.gauged {
            self.state.meters.in_flight.decrement(1.0);
        }
        self.state.taken.lock().expect("taken lock").remove(&self.filebase);
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

/// Lists the queue once per pass and processes the claimed slices' entries FIFO. A pass
/// that started nothing waits for the poll interval, a change of the slices, or the inotify
/// hint that an entry arrived ([`Arrivals`]).
pub(crate) async fn queue_loop(state: Arc<QueueState>, shared: Arc<Shared>, fence: Arc<Fence>, mut client: Client, lease_id: i64) {
    let poll = shared.cfg.poll_interval;
    let mut list_backoff = Backoff::new((poll, SPOOL_BACKOFF.1.max(poll)));
    let mut last_status = None::<tokio::time::Instant>;
    let mut last_stranded_check = None::<tokio::time::Instant>;
    let mut arrivals = Arrivals::new(state.dir.dir());
    loop {
        if fence.lost().is_cancelled() {
            return;
        }
        // Armed before the listing: slices claimed (or work ended) while this pass lists
        // and starts entries end the wait below at once; `notify_waiters` wakes only armed
        // waiters, so an unarmed one slept up to a poll interval after a hand-off's claim.
        let woken = state.changed.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        // Created just before its first slices are registered: wait for them, so that
        // nothing (figures, quarantine) is done for a queue this node holds nothing of.
        if state.owned.lock().expect("owned lock").is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = &mut woken => {}
                _ = fence.lost().cancelled() => return,
            }
            continue;
        }
        let dir = state.dir.clone();
        let total = state.slices_total;
        // Only the held slices' entries are kept (the others are counted); in full when a
        // status is due and this node reports the slices nobody here holds (slice 0's).
        let status_due = last_status.is_none_or(|t| t.elapsed() >= STATUS_INTERVAL);
        // Armed before `owned` is read, and `owned` read before the listing, which keeps
        // only its slices' entries: a slice added after it is taken into this pass, with
        // the entries its claim listed, at the next entry or wait for a permit.
        let added = state.slices_added.notify.notified();
        tokio::pin!(added);
        added.as_mut().enable();
        // Listed anew below: the entries listed at their claim are dropped.
        let fresh: Vec<u32> = state.slices_added.take().into_iter().map(|(s, _)| s).collect();
        let mut owned: Vec<u32> = state.owned.lock().expect("owned lock").keys().copied().collect();
        let held: BTreeSet<u32> = owned.iter().copied().collect();
        let full = status_due && held.contains(&0);
        let listing = move || if full { dir.scan(total) } else { dir.scan_for(total, |s| held.contains(&s)) };
        let scan = match tokio::task::spawn_blocking(listing).await {
            Ok(Ok(scan)) => scan,
            Ok(Err(e)) => {
                let delay = list_backoff.next_delay();
                alert_list_failure(&state, &e, delay);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = fence.lost().cancelled() => return,
                }
                continue;
            }
            Err(_) => return,
        };
        list_backoff.reset();
        publish_figures(&state.queue, &scan, &owned, shared.cfg.metrics_slice_series);
        if status_due {
            publish_status(&mut client, &shared, &state.dir, &scan, &owned, lease_id).await;
            last_status = Some(tokio::time::Instant::now());
        }
        if last_stranded_check.is_none_or(|t| t.elapsed() >= STRANDED_CHECK) {
            last_stranded_check = Some(tokio::time::Instant::now());
            recover_stranded(&state, &shared, &fence, &scan, &owned).await;
        }
        let Scan { mut pending, problems, .. } = scan;
        quarantine(&state, problems).await;
        // Round-robin over the claimed slices, FIFO within each; an entry whose take failed
        // waits for its backoff, and one no longer listed is forgotten.
        keep_ready(&state, &mut pending);
        // Newly claimed slices first in the round-robin (the rest in slice order).
        owned.sort_by_key(|s| !fresh.contains(s));
        let lists: Vec<VecDeque<Entry>> = owned.iter().filter_map(|s| pending.remove(s)).map(VecDeque::from).collect();
        let Some(started) = start_round_robin(&state, &shared, &fence, &mut owned, lists, &mut added).await else {
            return;
        };
        if started >= BUSY_PASS {
            arrivals.disarm();
        }
        if started == 0 {
            // Armed only now: list once more, so that what arrived since this pass's
            // listing is not left for the poll.
            if arrivals.arm() == Armed::Now {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = &mut woken => {}
                _ = arrivals.arrived() => {}
                _ = fence.lost().cancelled() => return,
            }
        }
    }
}

/// Starts the listed entries round-robin over the claimed slices (`lists`, one per slice
/// of `owned`), FIFO within each; slices claimed meanwhile (`added` wakes) join at once,
/// from their claim's own listing. How many it started; `None` once the fence is lost.
async fn start_round_robin<'a>(
    state: &'a Arc<QueueState>,
    shared: &Arc<Shared>,
    fence: &Arc<Fence>,
    owned: &mut Vec<u32>,
    mut lists: Vec<VecDeque<Entry>>,
    added: &mut std::pin::Pin<&mut tokio::sync::futures::Notified<'a>>,
) -> Option<usize> {
    let mut started = 0usize;
    loop {
        let mut progressed = false;
        let mut i = 0;
        while i < lists.len() {
            if state.slices_added.any_fresh() {
                // Slices claimed meanwhile come next, from their claim's own listing.
                let taken_in = take_in_added(state, owned);
                lists.splice(i..i, taken_in);
            }
            let Some(entry) = lists[i].pop_front() else {
                i += 1;
                continue;
            };
            progressed = true;
            let permit = tokio::select! {
                p = shared.permits.clone().acquire_owned() => p.ok()?,
                _ = added.as_mut() => {
                    // The new slices are taken in above; this entry waits its turn again.
                    lists[i].push_front(entry);
                    added.set(state.slices_added.notify.notified());
                    added.as_mut().enable();
                    continue;
                }
                _ = fence.lost().cancelled() => return None,
            };
            if start_entry(state, shared, fence, entry, permit) {
                started += 1;
            }
            i += 1;
        }
        if !progressed {
            return Some(started);
        }
    }
}

/// Says (rate-limited) that listing the queue failed and when it is tried again.
fn alert_list_failure(state: &QueueState, e: &SpoolError, delay: Duration) {
    if let Some(held_back) = state.spool_error("list") {
        let errno = match e {
            SpoolError::ListQueue { source, .. } => errno_name(source),
            _ => String::new(),
        };
        tracing::error!(queue = %state.queue, file = %state.dir.dir().display(), %errno, error = %e, retry_in = ?delay, alerts_held_back = held_back, "alert: cannot list the queue; retrying");
    }
}

/// Moves what the listing found that is not a queue entry into quarantine.
async fn quarantine(state: &QueueState, problems: Vec<Problem>) {
    if problems.is_empty() {
        return;
    }
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

/// Forgets the take failures of entries no longer listed and holds back, in `pending`,
/// the entries whose take failed until their backoff has run out.
fn keep_ready(state: &QueueState, pending: &mut BTreeMap<u32, Vec<Entry>>) {
    // Nothing to look at (the common case): no set of every listed name per pass.
    let mut faults = state.faults.lock().expect("faults lock");
    if faults.entries.is_empty() {
        return;
    }
    let now = Instant::now();
    let listed: BTreeSet<&str> = pending.values().flatten().map(|e| e.name.filebase.as_str()).collect();
    faults.entries.retain(|f| listed.contains(f.as_str()));
    for list in pending.values_mut() {
        faults.keep_ready(list, now);
    }
}

/// The entry lists of slices claimed since `owned` was read (from their claim's own
/// listing), which join `owned`.
fn take_in_added(state: &QueueState, owned: &mut Vec<u32>) -> Vec<VecDeque<Entry>> {
    let faults = state.faults.lock().expect("faults lock");
    let now = Instant::now();
    let mut taken_in = Vec::new();
    for (slice, mut entries) in state.slices_added.take() {
        // One added before `owned` was read is in this pass's listing already.
        if owned.contains(&slice) {
            continue;
        }
        owned.push(slice);
        faults.keep_ready(&mut entries, now);
        taken_in.push(VecDeque::from(entries));
    }
    taken_in
}

/// Recovers the stranded `.bak` entries of the owned slices in `scan` (see [`stranded`]),
/// while their slices are still claimed and accepting and the fence is valid.
async fn recover_stranded(state: &Arc<QueueState>, shared: &Shared, fence: &Arc<Fence>, scan: &Scan, owned: &[u32]) {
    let candidates: Vec<Entry> = {
        let taken = state.taken.lock().expect("taken lock");
        stranded(&scan.in_flight, owned, &taken, Duration::ZERO, |_| Some(f64::INFINITY))
    };
    if candidates.is_empty() {
        return;
    }
    let timeout = shared.cfg.handler.timeout;
    let (st, fence) = (state.clone(), fence.clone());
    let recovered = tokio::task::spawn_blocking(move || {
        let taken = st.taken.lock().expect("taken lock").clone();
        let in_flight: BTreeMap<u32, Vec<Entry>> = candidates.iter().fold(BTreeMap::new(), |mut m, e| {
            m.entry(e.slice).or_insert_with(Vec::new).push(e.clone());
            m
        });
        let slices: Vec<u32> = in_flight.keys().copied().collect();
        let old = stranded(&in_flight, &slices, &taken, timeout, |e| st.dir.oldest_in_flight_age(std::slice::from_ref(e)));
        if old.is_empty() {
            return Ok(Default::default());
        }
        let accepting = |slice: u32| st.owned.lock().expect("owned lock").get(&slice).is_some_and(|s| s.accepting);
        let old: Vec<Entry> = old.into_iter().filter(|e| accepting(e.slice)).collect();
        st.dir.recover_entries(&old, || fence.is_valid())
    })
    .await;
    let queue = &state.queue;
    match recovered {
        Ok(Ok(report)) => {
            for (entry, count) in &report.requeued {
                tracing::warn!(%queue, slice = entry.slice, entry = %entry.name.filebase, recoveries = count, "recovered a stranded .bak (not in flight here, older than the handler timeout)");
            }
            for (entry, name) in &report.renamed {
                tracing::warn!(%queue, slice = entry.slice, entry = %entry.name.filebase, new_name = %name.filebase, "recovered a stranded .bak whose .pck twin was waiting, under a fresh name");
            }
            for entry in &report.preserved {
                tracing::warn!(%queue, slice = entry.slice, entry = %entry.name.filebase, "stranded entry recovered three times; preserved in bad/");
            }
            if !(report.requeued.is_empty() && report.renamed.is_empty()) {
                state.changed.notify_waiters();
            }
        }
        Ok(Err(e)) => {
            if let Some(held_back) = state.spool_error("recover") {
                tracing::error!(%queue, error = %e, alerts_held_back = held_back, "alert: recovering stranded .bak entries failed; retrying");
            }
        }
        Err(_) => {}
    }
}

/// Takes one entry if its slice is still claimed and accepting and the fence is valid,
/// and runs the handler on it in a task of its own.
fn start_entry(state: &Arc<QueueState>, shared: &Arc<Shared>, fence: &Arc<Fence>, entry: Entry, permit: OwnedSemaphorePermit) -> bool {
    let Some(mut in_flight) = InFlightCount::enter(state, &entry, fence) else { return false };
    let dequeued = if shared.handler.reads_entries() { state.dir.dequeue(&entry) } else { state.dir.dequeue_unread(&entry) };
    let taken = match dequeued {
        // The rename can block (NFS) while the lease runs out: look at the fence again
        // before anything starts. The entry stays .bak for the next owner.
        Ok(Dequeued::Taken(_)) if !fence.is_valid() => {
            tracing::warn!(queue = %state.queue, slice = entry.slice, entry = %entry.name.filebase, "the fence tripped while the entry was being taken; it stays .bak for the next owner");
            return false;
        }
        Ok(Dequeued::Taken(t)) => {
            state.faults.lock().expect("faults lock").entries.succeeded(&entry.name.filebase);
            t
        }
        Ok(Dequeued::Gone) => return false,
        Ok(Dequeued::Quarantined(q)) => {
            tracing::warn!(queue = %state.queue, from = %q.from.display(), to = %q.to.display(), reason = %q.reason, "entry quarantined");
            metrics::counter!("qslice_runner_entries_total", "queue" => state.queue.clone(), "outcome" => "quarantined").increment(1);
            return false;
        }
        Err(SpoolError::OpenEntry { path, source }) => {
            // A fault of the moment (EMFILE, EIO, ESTALE, EACCES...): the entry was put back
            // (or stays .bak, for the stranded recovery); tried again after its backoff.
            let delay = state.faults.lock().expect("faults lock").entries.failed(entry.name.filebase.clone(), Instant::now());
            if let Some(held_back) = state.spool_error("open") {
                tracing::error!(queue = %state.queue, file = %path.display(), errno = %errno_name(&source), error = %source, retry_in = ?delay, alerts_held_back = held_back, "alert: cannot open a queue entry; it stays queued and is retried");
            }
            return false;
        }
        Err(e) => {
            state.faults.lock().expect("faults lock").entries.failed(entry.name.filebase.clone(), Instant::now());
            metrics::counter!("qslice_runner_spool_errors_total", "queue" => state.queue.clone(), "op" => "dequeue").increment(1);
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
    let handler_done_at_once = handler.done_at_once();
    let fence = fence.clone();
    let work = async move {
        let _permit = permit;
        let kill = in_flight.kill.clone();
        // Boxed, so that dropping it below really drops (kills) the handler.
        let mut handling = Box::pin(handler.handle(&job));
        let outcome = tokio::select! {
            biased;
            _ = kill.cancelled() => None,
            o = &mut handling => Some(o),
        };
        // A handler killed by the leash at the fence deadline (this runner was frozen or
        // hung) looks like a failure: it is a kill, and the entry stays .bak.
        let fenced = kill.is_cancelled() || !fence.is_valid();
        let outcome = outcome.filter(|o| !(fenced && matches!(o, Outcome::Failed(_) | Outcome::Retry)));
        if outcome.is_none() {
            // qslice stops it (fence, drain timeout): the mark goes first, the handler's
            // process group after (dropping its future kills it).
            state.mark_stopped(&taken.entry, &fence);
        }
        drop(handling);
        let label = settle(&state, &handler, &job, &taken, &kill, &fence, outcome).await;
        state.meters.settled(&state.queue, label);
        drop(in_flight);
    };
    // A handler done at once (the move handler's one rename) is polled here and settled
    // without a task of its own, which cost more than the rename (a worker thread woken
    // per entry, the queue directory's lock contended by two threads). If it waits after
    // all (a failed rename's preserve backing off), it goes on in a task, whose first poll
    // registers the task's waker in place of the no-op one. Other handlers wait for a
    // child or a coprocess: a task at once.
    let mut work = Box::pin(work);
    if !handler_done_at_once || work.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())).is_pending() {
        tokio::spawn(work);
    }
    true
}

/// Runs a spool operation that settles `taken` (`op`: finish, preserve, requeue) until it
/// succeeds, with backoff, while the fence is valid and the slice's work is not killed;
/// the entry stays `.bak` meanwhile. `Ok(true)` when done, `Ok(false)` when the `.bak` was
/// gone when it failed (done by a lost answer, e.g. an NFS rename that reported ENOENT,
/// or by someone else), `Err` with the last error when it gave up.
async fn retry_settle(
    state: &QueueState,
    taken: &InFlight,
    kill: &CancellationToken,
    fence: &Fence,
    op: &'static str,
    mut attempt: impl FnMut() -> Result<(), SpoolError>,
) -> Result<bool, SpoolError> {
    let mut backoff = Backoff::new(SPOOL_BACKOFF);
    loop {
        let error = match attempt() {
            Ok(()) => return Ok(true),
            Err(e) => e,
        };
        if std::fs::symlink_metadata(&taken.path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
            return Ok(false);
        }
        if !fence.is_valid() || kill.is_cancelled() {
            return Err(error);
        }
        let delay = backoff.next_delay();
        if let Some(held_back) = state.spool_error(op) {
            tracing::error!(queue = %state.queue, file = %taken.path.display(), error = %error, retry_in = ?delay, alerts_held_back = held_back, "alert: cannot {op} an entry; it stays .bak and is retried");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = kill.cancelled() => {}
            _ = fence.lost().cancelled() => {}
        }
    }
}

/// Settles a taken entry by its handler's outcome (`None`: the handler was killed) and
/// returns the outcome label of `qslice_runner_entries_total`. A failed spool operation is
/// retried while the fence is valid ([`retry_settle`]).
async fn settle(state: &QueueState, handler: &Handler, job: &Job, taken: &InFlight, kill: &CancellationToken, fence: &Fence, outcome: Option<Outcome>) -> &'static str {
    let queue = &state.queue;
    match outcome {
        None => {
            tracing::warn!(%queue, slice = job.slice, entry = %job.filebase, "handler killed (fence or drain timeout); the entry stays .bak for recovery");
            "killed"
        }
        Some(Outcome::Finished) => match retry_settle(state, taken, kill, fence, "finish", || state.dir.finish(taken)).await {
            Ok(_) => "finished",
            Err(e) => {
                tracing::error!(%queue, error = %e, "finish failed; the entry stays .bak for recovery");
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
                state.mark_stopped(&taken.entry, fence);
                "killed"
            } else {
                match retry_settle(state, taken, kill, fence, "requeue", || state.dir.requeue(taken)).await {
                    Ok(_) => "retried",
                    Err(e) => {
                        tracing::error!(%queue, error = %e, "requeue failed; the entry stays .bak for recovery");
                        "requeue_failed"
                    }
                }
            }
        }
        Some(Outcome::Failed(reason)) => {
            let mut psv = None;
            match retry_settle(state, taken, kill, fence, "preserve", || state.dir.preserve(taken).map(|p| psv = Some(p))).await {
                Ok(_) => {
                    let to = psv.unwrap_or_else(|| state.dir.bad_dir().join(format!("{}.psv", job.filebase)));
                    tracing::warn!(%queue, slice = job.slice, entry = %job.filebase, %reason, to = %to.display(), "handler failed; entry preserved");
                    "preserved"
                }
                Err(e) => {
                    tracing::error!(%queue, %reason, error = %e, "handler failed and preserving the entry failed too; it stays .bak");
                    "preserve_failed"
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qslice_proto::slice::EntryName;

    fn entry(time: u32, slice: u32) -> Entry {
        let name = EntryName::parse(&format!("{time}+{:040x}.bak", time)).expect("name");
        Entry { name, slice }
    }

    #[test]
    fn a_bak_is_stranded_when_owned_not_in_flight_here_and_older_than_the_handler_timeout() {
        let (a, b, c, d) = (entry(1, 0), entry(2, 0), entry(3, 1), entry(4, 2));
        let in_flight: BTreeMap<u32, Vec<Entry>> = [(0, vec![a.clone(), b.clone()]), (1, vec![c.clone()]), (2, vec![d.clone()])].into();
        let taken: BTreeSet<String> = [b.name.filebase.clone()].into();
        let ages: BTreeMap<String, f64> = [(&a, 301.0), (&b, 900.0), (&c, 299.0), (&d, 900.0)].iter().map(|(e, age)| (e.name.filebase.clone(), *age)).collect();
        let age_of = |e: &Entry| ages.get(&e.name.filebase).copied();
        let timeout = Duration::from_secs(300);
        // a: stranded. b: in flight here. c: too young (a handler may still run on it).
        // d: slice 2 is not owned.
        assert_eq!(stranded(&in_flight, &[0, 1], &taken, timeout, age_of), vec![a.clone()]);
        // A .bak that cannot be looked at (gone meanwhile) is not stranded.
        assert_eq!(stranded(&in_flight, &[0, 1], &taken, timeout, |_| None), vec![]);
        assert_eq!(stranded(&in_flight, &[0, 1, 2], &BTreeSet::new(), timeout, age_of), vec![a, b, d]);
    }
}
