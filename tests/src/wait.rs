//! The tests' one bounded wait: look at a condition until it holds or a deadline passes;
//! the error says what did not happen. [`wait_for`] and [`wait_for_async`] cover the usual
//! case; [`Wait`] adds a fixed polling interval (for looks that cost something, such as a
//! Python report over Mailman's logs) and looks that return a value or fail outright.
//!
//! The sync and async faces share one [`Pace`]: the deadline, the backoff between looks
//! and the last look at the deadline, so both behave alike.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

/// The first pause between two looks; it doubles up to [`MAX_PAUSE`], so that a condition
/// that holds at once is seen at once and a long wait does not load the machine.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// The longest pause between two looks (by default).
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// Polls `cond` until it holds or `timeout` passes; the error says `what` did not happen.
/// Limits are generous: tests run on loaded two-core machines.
pub fn wait_for(timeout: Duration, what: &str, cond: impl FnMut() -> bool) -> Result<()> {
    Wait::new(timeout, what).until(cond)
}

/// [`wait_for`] for an async condition: the same deadline, pauses and message.
pub async fn wait_for_async<F, Fut>(timeout: Duration, what: &str, cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    Wait::new(timeout, what).until_async(cond).await
}

/// A bounded wait for something named `what`.
#[derive(Clone, Debug)]
pub struct Wait {
    /// How long to wait at most.
    timeout: Duration,
    /// What is waited for, for the error.
    what: String,
    /// The first pause between looks.
    first_pause: Duration,
    /// The longest pause between looks.
    max_pause: Duration,
}

/// Where a wait stands: its deadline and the next pause.
struct Pace {
    deadline: Instant,
    pause: Duration,
    max_pause: Duration,
}

impl Pace {
    /// How long to pause before the next look, or `None` once the deadline has passed.
    /// The last pause ends at the deadline, so the last look is made there.
    fn next(&mut self, now: Instant) -> Option<Duration> {
        if now >= self.deadline {
            return None;
        }
        let pause = self.pause.min(self.deadline - now);
        self.pause = (self.pause * 2).min(self.max_pause);
        Some(pause)
    }
}

impl Wait {
    /// A wait of at most `timeout` for `what`, looking with a short backoff.
    pub fn new(timeout: Duration, what: &str) -> Wait {
        Wait { timeout, what: what.to_owned(), first_pause: FIRST_PAUSE, max_pause: MAX_PAUSE }
    }

    /// Looks every `interval` instead (for looks that are costly, or whose timing matters).
    pub fn every(mut self, interval: Duration) -> Wait {
        self.first_pause = interval;
        self.max_pause = interval;
        self
    }

    fn pace(&self, now: Instant) -> Pace {
        Pace { deadline: now + self.timeout, pause: self.first_pause, max_pause: self.max_pause }
    }

    fn timed_out(&self) -> anyhow::Error {
        anyhow!("timed out after {:?} waiting for: {}", self.timeout, self.what)
    }

    /// Polls `look` until it gives a value; an error from `look` ends the wait at once.
    pub fn poll<T>(&self, mut look: impl FnMut() -> Result<Option<T>>) -> Result<T> {
        let mut pace = self.pace(Instant::now());
        loop {
            if let Some(value) = look()? {
                return Ok(value);
            }
            match pace.next(Instant::now()) {
                Some(pause) => std::thread::sleep(pause),
                None => return Err(self.timed_out()),
            }
        }
    }

    /// Polls `cond` until it holds.
    pub fn until(&self, mut cond: impl FnMut() -> bool) -> Result<()> {
        self.poll(|| Ok(cond().then_some(())))
    }

    /// [`Wait::poll`] for an async look; pauses with `tokio::time`.
    pub async fn poll_async<T, F, Fut>(&self, mut look: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>>>,
    {
        let now = || tokio::time::Instant::now().into_std();
        let mut pace = self.pace(now());
        loop {
            if let Some(value) = look().await? {
                return Ok(value);
            }
            match pace.next(now()) {
                Some(pause) => tokio::time::sleep(pause).await,
                None => return Err(self.timed_out()),
            }
        }
    }

    /// [`Wait::until`] for an async condition.
    pub async fn until_async<F, Fut>(&self, mut cond: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        self.poll_async(|| {
            let held = cond();
            async move { Ok(held.await.then_some(())) }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_cap_and_the_last_one_ends_at_the_deadline() {
        let start = Instant::now();
        let mut pace = Wait::new(Duration::from_millis(100), "x").pace(start);
        let pauses: Vec<Duration> = std::iter::from_fn(|| pace.next(start)).take(4).collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(pauses, vec![ms(10), ms(20), ms(40), ms(50)]);
        assert_eq!(pace.next(start + ms(90)), Some(ms(10)), "clamped to the deadline");
        assert_eq!(pace.next(start + ms(100)), None);
    }

    #[test]
    fn a_condition_that_never_holds_names_what_did_not_happen() {
        let err = wait_for(Duration::from_millis(30), "the moon to turn blue", || false).expect_err("times out");
        assert_eq!(err.to_string(), "timed out after 30ms waiting for: the moon to turn blue");
    }

    #[test]
    fn poll_returns_the_value_and_a_failing_look_ends_the_wait() {
        let mut n = 0;
        let got = Wait::new(Duration::from_secs(10), "three looks").poll(|| {
            n += 1;
            Ok((n == 3).then_some(n))
        });
        assert_eq!(got.expect("value"), 3);
        let err = Wait::new(Duration::from_secs(10), "x").poll::<()>(|| Err(anyhow!("broken"))).expect_err("fails");
        assert_eq!(err.to_string(), "broken");
    }

    #[tokio::test]
    async fn the_async_face_waits_alike() {
        let mut n = 0;
        wait_for_async(Duration::from_secs(10), "two looks", || {
            n += 1;
            let held = n >= 2;
            async move { held }
        })
        .await
        .expect("held");
        let err = wait_for_async(Duration::from_millis(30), "never", || async { false }).await.expect_err("times out");
        assert_eq!(err.to_string(), "timed out after 30ms waiting for: never");
    }
}
