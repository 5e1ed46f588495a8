//! The lease every qslice daemon holds: grant, keepalive, and the self-fencing clock.
//!
//! The fence deadline is (send time of the last acknowledged keepalive + TTL − margin).
//! etcd expires the lease no earlier than TTL after it received that keepalive, which is
//! after we sent it, so a holder that stops all work at its deadline has stopped before
//! anyone else can take over what the lease held.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::Client;
use qslice_proto::records::NodeRecord;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::etcd::REQUEST_TIMEOUT;

/// Why a lease could not be granted.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Granting the lease failed.
    #[error("cannot grant a {ttl}s lease: {source}")]
    Grant {
        /// Requested TTL in seconds.
        ttl: i64,
        /// The cause.
        #[source]
        source: etcd_client::Error,
    },
    /// An etcd call took longer than the request timeout.
    #[error("etcd did not answer {what} within {REQUEST_TIMEOUT:?}")]
    Timeout {
        /// The call.
        what: &'static str,
    },
}

/// Which daemon holds the lease: its metrics carry the role's name, so an alert on a
/// runner's fence does not fire when a coordinator steps down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `qslice-runner`.
    Runner,
    /// `qslice-coordinator`.
    Coordinator,
}

impl Role {
    fn keepalive_latency_metric(self) -> &'static str {
        match self {
            Role::Runner => "qslice_runner_keepalive_latency_seconds",
            Role::Coordinator => "qslice_coordinator_keepalive_latency_seconds",
        }
    }

    fn fence_events_metric(self) -> &'static str {
        match self {
            Role::Runner => "qslice_runner_fence_events_total",
            Role::Coordinator => "qslice_coordinator_fence_events_total",
        }
    }
}

/// Time on CLOCK_BOOTTIME, which keeps counting while the host is suspended (tokio's
/// Instant, CLOCK_MONOTONIC, stops then).
fn boottime() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).map_or(Duration::ZERO, |t| Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
}

/// The CLOCK_BOOTTIME time of `at`, a tokio Instant, taken from how far it is from now.
fn boottime_of(at: Instant) -> Duration {
    let now = Instant::now();
    if at >= now {
        boottime() + (at - now)
    } else {
        boottime().saturating_sub(now - at)
    }
}

/// The self-fencing clock of one incarnation.
///
/// The deadline is kept on both clocks and checked on both: tokio's (timers and tests
/// with paused time run on it) and CLOCK_BOOTTIME, so that a host resumed from a suspend
/// past the deadline finds its fence expired although its monotonic clock stood still.
pub struct Fence {
    deadline: Mutex<Instant>,
    /// The same deadline on CLOCK_BOOTTIME.
    boot_deadline: Mutex<Duration>,
    /// The deadline (CLOCK_BOOTTIME) the runner's leash was last told: past it the leash
    /// kills the children, so work started on this fence would be killed too. None where
    /// no leash watches (a coordinator, before the first renewal).
    leash_deadline: Mutex<Option<Duration>>,
    lost: CancellationToken,
    reason: Mutex<Option<String>>,
}

impl Fence {
    fn new(deadline: Instant) -> Fence {
        Fence::with_deadlines(deadline, boottime_of(deadline))
    }

    fn with_deadlines(deadline: Instant, boot_deadline: Duration) -> Fence {
        Fence {
            deadline: Mutex::new(deadline),
            boot_deadline: Mutex::new(boot_deadline),
            leash_deadline: Mutex::new(None),
            lost: CancellationToken::new(),
            reason: Mutex::new(None),
        }
    }

    /// Whether the deadline has passed on either clock, or the leash's.
    fn passed(&self) -> bool {
        let now = boottime();
        Instant::now() >= self.deadline() || now >= *self.boot_deadline.lock().expect("fence lock") || self.leash_deadline.lock().expect("fence lock").is_some_and(|d| now >= d)
    }

    /// Records that the leash was told `boot_deadline` (CLOCK_BOOTTIME). If the deadline it
    /// was told before has passed meanwhile (this runner was starved of CPU between two
    /// renewals), the leash may already have killed the children and dropped the lease
    /// for good: the fence trips, so that no work starts that the leash would kill and no
    /// killed handler is taken for a failed one.
    pub fn leashed_until(&self, boot_deadline: Duration) {
        let mut d = self.leash_deadline.lock().expect("fence lock");
        if d.is_some_and(|before| boottime() >= before) {
            drop(d);
            self.trip("the leash's deadline passed before this runner renewed it (starved of CPU or frozen): the leash killed its children");
            return;
        }
        *d = Some(boot_deadline);
    }

    /// Whether work may start now: the deadline has not passed and the lease is not lost.
    /// A deadline seen passed trips the fence: it stays invalid for good, whatever
    /// keepalive reply is processed afterwards (the runtime may have stalled past the
    /// deadline on a synchronous call while the leash already killed the children).
    pub fn is_valid(&self) -> bool {
        if self.lost.is_cancelled() {
            return false;
        }
        if !self.passed() {
            return true;
        }
        self.trip("the fence deadline passed before a keepalive was acknowledged");
        false
    }

    /// The current deadline.
    pub fn deadline(&self) -> Instant {
        *self.deadline.lock().expect("fence lock")
    }

    /// Cancelled the moment the incarnation must stop all work.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// Why the fence tripped, once it has.
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().expect("fence lock").clone()
    }

    /// Moves the deadline later, unless it has passed or the fence tripped: a deadline
    /// that passed is final (see [`Fence::is_valid`]).
    fn extend(&self, deadline: Instant) {
        if self.lost.is_cancelled() || self.passed() {
            return;
        }
        let mut d = self.deadline.lock().expect("fence lock");
        if deadline > *d {
            *d = deadline;
            *self.boot_deadline.lock().expect("fence lock") = boottime_of(deadline);
        }
    }

    /// Trips the fence: every holder stops work at once.
    pub fn trip(&self, reason: &str) {
        let mut r = self.reason.lock().expect("fence lock");
        if r.is_none() {
            *r = Some(reason.to_owned());
        }
        self.lost.cancel();
    }
}

/// One lease of a runner or coordinator, with its fence clock.
#[derive(Clone)]
pub struct Incarnation {
    /// The lease the node record and all claims are attached to.
    pub lease_id: i64,
    /// Tells this incarnation apart from earlier ones of the same node.
    pub incarnation: Uuid,
    /// The TTL etcd granted.
    pub ttl: Duration,
    /// The self-fencing clock.
    pub fence: Arc<Fence>,
    /// The node record written for this incarnation (runners only).
    pub record: Option<NodeRecord>,
}

/// Wait before retrying a failed keepalive (well below any TTL/3).
const KEEPALIVE_RETRY: Duration = Duration::from_millis(100);

/// How far before the lease's earliest expiry the runner stops: a tenth of the TTL,
/// at least 100 ms, for clock-rate drift and scheduling delay.
pub fn fence_margin(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(100))
}

/// Runs one etcd call under the request timeout; `what` names it in the error.
pub async fn timed<T>(what: &'static str, f: impl std::future::Future<Output = T>) -> Result<T, LeaseError> {
    tokio::time::timeout(REQUEST_TIMEOUT, f).await.map_err(|_| LeaseError::Timeout { what })
}

/// Grants a lease of `ttl` and starts its fence clock (for runners and coordinators alike).
pub async fn grant_lease(client: &mut Client, ttl: Duration) -> Result<Incarnation, LeaseError> {
    let secs = ttl.as_secs().max(1) as i64;
    let sent = Instant::now();
    let grant = timed("lease grant", client.lease_grant(secs, None)).await?.map_err(|source| LeaseError::Grant { ttl: secs, source })?;
    let granted = Duration::from_secs(grant.ttl().max(1) as u64);
    if granted != ttl {
        tracing::warn!(requested = ?ttl, ?granted, "etcd granted a different lease TTL than configured; using etcd's");
    }
    let fence = Arc::new(Fence::new(sent + granted - fence_margin(granted)));
    Ok(Incarnation { lease_id: grant.id(), incarnation: Uuid::new_v4(), ttl: granted, fence, record: None })
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Keeps the lease alive every TTL/3 until the fence trips, extending the fence on every
/// acknowledged keepalive. Every way the lease can be lost ends in a tripped fence:
/// a reply with TTL <= 0 (the lease is gone) trips it at once; a send error, a stream
/// error, a stream end or no reply only stop extending it, and the watchdog trips it at
/// the deadline.
pub async fn keep_alive(mut client: Client, inc: &Incarnation, role: Role) {
    let fence = inc.fence.clone();
    let watchdog = {
        let fence = fence.clone();
        tokio::spawn(async move {
            loop {
                let deadline = fence.deadline();
                tokio::select! {
                    _ = fence.lost().cancelled() => return,
                    _ = tokio::time::sleep_until(deadline) => {
                        if Instant::now() >= fence.deadline() {
                            metrics::counter!(role.fence_events_metric()).increment(1);
                            fence.trip("no keepalive was acknowledged in time (etcd unreachable or this process paused)");
                            return;
                        }
                    }
                }
            }
        })
    };
    let interval = inc.ttl / 3;
    let margin = fence_margin(inc.ttl);
    let mut stream = None;
    let mut last_complaint = None::<Instant>;
    while !fence.lost().is_cancelled() {
        let sent = Instant::now();
        let result = async {
            if stream.is_none() {
                let opened = tokio::time::timeout(interval, client.lease_keep_alive(inc.lease_id))
                    .await
                    .map_err(|_| "opening the keepalive stream timed out".to_owned())?
                    .map_err(|e| format!("opening the keepalive stream failed: {e}"))?;
                stream = Some(opened);
            }
            let (keeper, replies) = stream.as_mut().expect("opened above");
            keeper.keep_alive().await.map_err(|e| format!("keepalive send failed: {e}"))?;
            match tokio::time::timeout(interval, replies.message()).await {
                Err(_) => Err("no keepalive reply".to_owned()),
                Ok(Err(e)) => Err(format!("keepalive stream error: {e}")),
                Ok(Ok(None)) => Err("keepalive stream ended".to_owned()),
                Ok(Ok(Some(reply))) => Ok(reply.ttl()),
            }
        }
        .await;
        match result {
            Ok(ttl) if ttl > 0 => {
                fence.extend(sent + inc.ttl - margin);
                metrics::gauge!(role.keepalive_latency_metric()).set(sent.elapsed().as_secs_f64());
                if last_complaint.take().is_some() {
                    tracing::info!(lease = inc.lease_id, "keepalives are acknowledged again");
                }
            }
            Ok(_) => {
                metrics::counter!(role.fence_events_metric()).increment(1);
                fence.trip("etcd says the lease has expired");
                break;
            }
            Err(error) => {
                stream = None;
                if last_complaint.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
                    let left = fence.deadline().saturating_duration_since(Instant::now());
                    tracing::warn!(lease = inc.lease_id, %error, fence_in = ?left, "lease keepalive failed");
                    last_complaint = Some(Instant::now());
                }
            }
        }
        // After a failure, try again soon rather than after a whole interval: with several
        // endpoints a call can land on a dead member, and the next one on a live member.
        let next = if stream.is_none() { Instant::now() + KEEPALIVE_RETRY } else { sent + interval };
        tokio::select! {
            _ = fence.lost().cancelled() => break,
            _ = tokio::time::sleep_until(next) => {}
        }
    }
    watchdog.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_that_passed_is_final_even_if_a_late_keepalive_reply_extends_it() {
        let fence = Fence::new(Instant::now() + Duration::from_secs(1));
        assert!(fence.is_valid());
        // The runtime stalls past the deadline; the keepalive reply sent before it is
        // processed afterwards.
        tokio::time::advance(Duration::from_millis(1500)).await;
        fence.extend(Instant::now() + Duration::from_secs(4));
        assert!(!fence.is_valid(), "a late reply revived the fence");
        assert!(fence.lost().is_cancelled(), "seen passed, the fence tripped");
        fence.extend(Instant::now() + Duration::from_secs(10));
        assert!(!fence.is_valid(), "still dead after another reply");
    }

    #[test]
    fn a_leash_told_too_late_fences_though_keepalives_extend_the_deadline() {
        // The runner's keepalives keep the fence's own deadline far ahead; the deadline
        // the leash was told passes before the next renewal reaches it (the runner
        // starved of CPU): the leash kills the children, and the fence must not hold.
        let fence = Fence::new(Instant::now() + Duration::from_secs(60));
        fence.leashed_until(boottime() + Duration::from_millis(30));
        assert!(fence.is_valid(), "before the leash's deadline");
        std::thread::sleep(Duration::from_millis(60));
        fence.extend(Instant::now() + Duration::from_secs(60));
        assert!(!fence.is_valid(), "past the deadline the leash had, the fence holds no more");
        assert!(fence.lost().is_cancelled());

        // A renewal told late trips the fence even if nothing looked at it in between.
        let fence = Fence::new(Instant::now() + Duration::from_secs(60));
        fence.leashed_until(boottime() + Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(60));
        fence.leashed_until(boottime() + Duration::from_secs(5));
        assert!(fence.lost().is_cancelled(), "a late renewal is no renewal");
        assert!(fence.reason().is_some_and(|r| r.contains("leash")), "{:?}", fence.reason());

        // Renewals in time keep it valid.
        let fence = Fence::new(Instant::now() + Duration::from_secs(60));
        for _ in 0..3 {
            fence.leashed_until(boottime() + Duration::from_secs(5));
        }
        assert!(fence.is_valid());
    }

    #[tokio::test]
    async fn a_deadline_passed_on_the_boot_clock_fences_though_the_monotonic_clock_stood_still() {
        // A host suspended past the deadline: CLOCK_MONOTONIC (tokio's Instant) did not
        // move, CLOCK_BOOTTIME did.
        let fence = Fence::with_deadlines(Instant::now() + Duration::from_secs(60), boottime().saturating_sub(Duration::from_secs(1)));
        assert!(!fence.is_valid(), "a fence past its deadline on CLOCK_BOOTTIME is not valid");
        assert!(fence.lost().is_cancelled());
        let fresh = Fence::new(Instant::now() + Duration::from_secs(60));
        assert!(fresh.is_valid(), "a deadline ahead on both clocks is valid");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fence_seen_passed_trips_and_stays_tripped() {
        let fence = Fence::new(Instant::now() + Duration::from_millis(300));
        tokio::time::advance(Duration::from_millis(400)).await;
        assert!(!fence.is_valid());
        assert!(fence.reason().is_some_and(|r| r.contains("deadline passed")), "{:?}", fence.reason());
        // A reply in time before the deadline still extends a live fence.
        let live = Fence::new(Instant::now() + Duration::from_secs(1));
        live.extend(Instant::now() + Duration::from_secs(3));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(live.is_valid(), "an in-time renewal extends the fence");
    }
}
