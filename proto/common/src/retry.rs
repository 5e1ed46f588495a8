//! Retrying what failed for the moment: [`Backoff`], the wait before the next try, and
//! [`until_ok`], the retry loop of a daemon's start-up steps (a lease, a registration).

use std::fmt::Display;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How the daemons retry a start-up step that failed (etcd unreachable, a node id still
/// taken): soon at first, then no more than every 5 s.
pub const STARTUP_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

/// Exponential backoff without jitter: `first`, then doubling, up to `max`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failure.
    first: Duration,
    /// The longest wait.
    max: Duration,
    /// The wait after the next failure.
    next: Duration,
}

impl Backoff {
    /// A backoff from `first` up to `max`.
    pub fn new((first, max): (Duration, Duration)) -> Backoff {
        Backoff { first, max, next: first.min(max) }
    }

    /// The wait after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// A success: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.next = self.first.min(self.max);
    }
}

/// Runs `attempt` until it succeeds and returns its value, waiting `backoff` after each
/// failure and logging it as `what` with the error and the wait; `None` once `shutdown`
/// is cancelled. A success resets `backoff`.
pub async fn until_ok<T, E: Display>(what: &str, backoff: &mut Backoff, shutdown: &CancellationToken, mut attempt: impl AsyncFnMut() -> Result<T, E>) -> Option<T> {
    loop {
        if shutdown.is_cancelled() {
            return None;
        }
        match attempt().await {
            Ok(value) => {
                backoff.reset();
                return Some(value);
            }
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?wait, "{what}");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_step_is_retried_with_growing_waits_until_it_succeeds_or_shutdown() {
        let mut backoff = Backoff::new(STARTUP_BACKOFF);
        let mut tries = 0;
        let started = tokio::time::Instant::now();
        let got = until_ok("step failed", &mut backoff, &CancellationToken::new(), async || {
            tries += 1;
            if tries < 4 {
                Err("not yet")
            } else {
                Ok(tries)
            }
        })
        .await;
        assert_eq!(got, Some(4));
        assert_eq!(started.elapsed(), Duration::from_millis(200 + 400 + 800), "waits double between tries");
        assert_eq!(backoff.next_delay(), Duration::from_millis(200), "a success resets the backoff");
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        assert_eq!(until_ok("never", &mut backoff, &shutdown, async || Err::<(), _>("down")).await, None);
    }
}
