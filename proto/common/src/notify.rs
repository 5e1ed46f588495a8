//! systemd's sd_notify(3) protocol, for the runner and the coordinator run as
//! `Type=notify` units: `READY=1` the first time the daemon is ready, `WATCHDOG=1` at half
//! of `WATCHDOG_USEC` while the async runtime runs, and `STOPPING=1` when a graceful stop
//! begins. Without `NOTIFY_SOCKET` (not started by systemd) nothing is sent, so the
//! daemons run this unconditionally.

use std::future::Future;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// How often readiness is checked until it first holds.
const READY_POLL: Duration = Duration::from_millis(100);

/// Sends `states` to the service manager, if there is one. A failure is logged, never
/// fatal: systemd's own start timeout and watchdog catch a daemon that cannot report.
pub fn send(states: &[NotifyState<'_>]) {
    // unset_env = false: the daemon reports more than once (removing the variable later
    // would also race with other threads reading the environment).
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// The watchdog ping interval systemd asks for: half of `WATCHDOG_USEC` (as
/// sd_watchdog_enabled(3) advises), or `None` when the watchdog is off or meant for
/// another process (`WATCHDOG_PID`).
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec) / 2)
    } else {
        None
    }
}

/// Reports to systemd until `shutdown` and beyond, for the life of the runtime: polls
/// `ready` every 100 ms until it first returns true and then sends `READY=1`; pings the
/// watchdog throughout (from the same runtime as the daemon's work, so a wedged runtime
/// stops pinging); sends `STOPPING=1` once `shutdown` is cancelled, then keeps pinging
/// while the daemon finishes in-flight work. Returns when nothing is left to send.
pub async fn run<F, Fut>(mut ready: F, shutdown: CancellationToken)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut watchdog = watchdog_interval().map(|every| {
        tracing::info!(every = ?every, "pinging the systemd watchdog");
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        interval
    });
    let mut poll = tokio::time::interval(READY_POLL);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut readied, mut stopping) = (false, false);
    loop {
        if stopping && watchdog.is_none() {
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled(), if !stopping => {
                stopping = true;
                send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
            }
            _ = poll.tick(), if !readied && !stopping => {
                if ready().await {
                    readied = true;
                    send(&[NotifyState::Ready, NotifyState::Status("ready")]);
                }
            }
            _ = tick(&mut watchdog) => send(&[NotifyState::Watchdog]),
        }
    }
}

/// The next tick of an optional interval; never, without one.
async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}
