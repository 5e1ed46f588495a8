//! Retrying what a fault of the moment made fail, as plain data: [`Backoff`] (the wait
//! before the next try), [`Deferred`] (per key: failed, so not to be tried before a
//! time) and [`AlertGate`] (per key: at most one alert line per interval). Time is
//! passed in, so the rules are tested without waiting.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

/// The first wait of a claim delete that failed, and the longest: well below the
/// shortest TTL (1 s in tests), so a delete that can succeed again does within the TTL.
pub const RELEASE_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(1));
/// The first wait of a spool operation that failed (open, list, finish, preserve,
/// requeue), and the longest: a fault of a few seconds (an NFS server failing over) is
/// ridden out without hammering the server.
pub const SPOOL_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// At most one alert line per queue and operation in this interval; the counter metric
/// counts every failure.
pub const ALERT_INTERVAL: Duration = Duration::from_secs(10);

pub use qslice_common::retry::Backoff;

/// Keys (entries, queues) whose last try failed, each with its backoff and the time
/// before which it is not tried again.
#[derive(Debug)]
pub struct Deferred<K: Ord> {
    /// The backoff every key starts with.
    schedule: (Duration, Duration),
    /// The failed keys: their backoff and when they may be tried again.
    failed: BTreeMap<K, (Backoff, Instant)>,
}

impl<K: Ord> Deferred<K> {
    /// No failed keys; each failing key backs off by `schedule` ([`Backoff::new`]).
    pub fn new(schedule: (Duration, Duration)) -> Deferred<K> {
        Deferred { schedule, failed: BTreeMap::new() }
    }

    /// Whether `key` may be tried at `now`.
    pub fn ready(&self, key: &K, now: Instant) -> bool {
        self.failed.get(key).is_none_or(|(_, not_before)| *not_before <= now)
    }

    /// `key` failed at `now`: it waits its next delay, which is returned.
    pub fn failed(&mut self, key: K, now: Instant) -> Duration {
        let schedule = self.schedule;
        let (backoff, not_before) = self.failed.entry(key).or_insert_with(|| (Backoff::new(schedule), now));
        let delay = backoff.next_delay();
        *not_before = now + delay;
        delay
    }

    /// `key` succeeded (or is gone): forgotten.
    pub fn succeeded(&mut self, key: &K) {
        self.failed.remove(key);
    }

    /// Forgets the keys `keep` says no to (entries no longer listed).
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.failed.retain(|k, _| keep(k));
    }

    /// How many keys are waiting.
    pub fn len(&self) -> usize {
        self.failed.len()
    }

    /// Whether no key is waiting.
    pub fn is_empty(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Rate limit of alert lines: per key, one line, then silence for `interval`; the lines
/// held back are counted and reported with the next one.
#[derive(Debug)]
pub struct AlertGate<K: Ord> {
    /// The silence after a line.
    interval: Duration,
    /// Per key: when its last line was written, and the lines held back since.
    last: BTreeMap<K, (Instant, u64)>,
}

impl<K: Ord> AlertGate<K> {
    /// A gate that lets one line per key through every `interval`.
    pub fn new(interval: Duration) -> AlertGate<K> {
        AlertGate { interval, last: BTreeMap::new() }
    }

    /// Whether an alert for `key` is written at `now`: `Some(n)` with the `n` lines held
    /// back since the last one, `None` to hold this one back.
    pub fn admit(&mut self, key: K, now: Instant) -> Option<u64> {
        match self.last.get_mut(&key) {
            Some((at, held)) if now.saturating_duration_since(*at) < self.interval => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let suppressed = std::mem::take(held);
                *at = now;
                Some(suppressed)
            }
            None => {
                self.last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// The name of an I/O error's errno (`EMFILE`, `ESTALE`, ...), or its kind when it has none.
pub fn errno_name(error: &std::io::Error) -> String {
    match error.raw_os_error() {
        Some(raw) => format!("{:?}", nix::errno::Errno::from_raw(raw)),
        None => format!("{:?}", error.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_up_to_its_maximum_and_starts_over_after_a_success() {
        let mut b = Backoff::new((100 * MS, 1000 * MS));
        let waits: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        assert_eq!(waits, [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]);
        b.reset();
        assert_eq!(b.next_delay(), 100 * MS);
        // A first wait above the maximum is the maximum.
        assert_eq!(Backoff::new((5000 * MS, 1000 * MS)).next_delay(), 1000 * MS);
    }

    #[test]
    fn a_failed_key_waits_its_backoff_and_a_success_forgets_it() {
        let now = Instant::now();
        let mut d: Deferred<&str> = Deferred::new((100 * MS, 400 * MS));
        assert!(d.ready(&"a", now));
        assert_eq!(d.failed("a", now), 100 * MS);
        assert!(!d.ready(&"a", now + 99 * MS));
        assert!(d.ready(&"a", now + 100 * MS));
        assert!(d.ready(&"b", now), "other keys are not held back");
        let later = now + 100 * MS;
        assert_eq!(d.failed("a", later), 200 * MS);
        assert!(!d.ready(&"a", later + 199 * MS));
        assert_eq!(d.failed("a", later), 400 * MS);
        assert_eq!(d.failed("a", later), 400 * MS, "capped");
        d.succeeded(&"a");
        assert!(d.ready(&"a", later));
        assert_eq!(d.failed("a", later), 100 * MS, "a new failure starts the backoff over");
        d.retain(|k| *k != "a");
        assert!(d.is_empty());
    }

    #[test]
    fn alerts_pass_once_per_interval_per_key_and_report_what_was_held_back() {
        let now = Instant::now();
        let mut gate: AlertGate<(&str, &str)> = AlertGate::new(Duration::from_secs(10));
        assert_eq!(gate.admit(("in", "open"), now), Some(0));
        assert_eq!(gate.admit(("in", "open"), now + Duration::from_secs(1)), None);
        assert_eq!(gate.admit(("in", "open"), now + Duration::from_secs(9)), None);
        assert_eq!(gate.admit(("in", "list"), now + Duration::from_secs(9)), Some(0), "another operation has its own gate");
        assert_eq!(gate.admit(("out", "open"), now + Duration::from_secs(9)), Some(0), "another queue too");
        assert_eq!(gate.admit(("in", "open"), now + Duration::from_secs(10)), Some(2));
        assert_eq!(gate.admit(("in", "open"), now + Duration::from_secs(11)), None);
    }

    #[test]
    fn errno_names_are_the_c_names() {
        assert_eq!(errno_name(&std::io::Error::from_raw_os_error(libc::EMFILE)), "EMFILE");
        assert_eq!(errno_name(&std::io::Error::from_raw_os_error(libc::ESTALE)), "ESTALE");
        assert_eq!(errno_name(&std::io::Error::other("x")), "Other");
    }
}
