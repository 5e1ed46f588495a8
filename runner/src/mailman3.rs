//! qslice's own Mailman 3 slice runner: the `mailman3` flavour of supervision.
//!
//! `qslice_mailman3.py` ships inside this binary ([`SCRIPT`]) and is written into the
//! runner's state dir at start ([`install_script`]); it runs with the site's Mailman
//! interpreter, so nothing is installed into the Mailman venv. One process runs one
//! slice with Mailman's own runner class, and adds what a bare `runner` lacks:
//! - the slice count comes from qslice (`go`), set in process over mailman.cfg's
//!   `[runner.<name>] instances`, so a reslice needs no mailman.cfg edit;
//! - a stop request only cuts the idle sleep short: the message in hand is finished and
//!   nothing is raised inside dequeue, processing or finish (no shunt, no bad/ copy);
//! - it initialises Mailman (the slow part of a start) before it is given a slice, so a
//!   [`WarmPool`] keeps spares ready and a takeover pays one listing, not a start-up;
//! - it takes no message past the fence deadline that qslice keeps passing on (`lease`).
//!
//! The control channel, one line per message:
//! - qslice -> runner (its stdin): `go SLICE COUNT EPOCH UNTIL_MS`, `lease UNTIL_MS`
//!   (absolute deadlines in milliseconds on CLOCK_BOOTTIME), `stop`; end of file means stop.
//! - runner -> qslice (its stdout, nothing else is written there): `ready PID` once
//!   Mailman is initialised, `running SLICE COUNT` once the slice's runner is built (its
//!   `.bak` files recovered), `stopped` before exit 0, `fenced` before exit 3 (the lease
//!   ran out), `error TEXT` before exit 2 (a request it refuses, such as a slice count
//!   that is not a power of two), `quarantined NAME REASON` (a file Mailman cannot serve
//!   moved aside).
//! - its stderr is its log, logged here tagged with the queue and pid.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::supervise::{command, log_lines, wait_backoff, SuperviseConfig, Supervised, SupervisorExit};
pub use fork_server::ForkServers;
use fork_server::{ForkServer, ServerKey};
use qslice_common::lease::Fence;

mod fork_server;

/// The slice runner's source, shipped inside the binary.
pub const SCRIPT: &str = include_str!("mailman3/qslice_mailman3.py");
/// Its file name in the state dir.
pub const SCRIPT_NAME: &str = "qslice_mailman3.py";

/// How often a running slice runner is told the fence deadline. The runner measures each
/// remaining duration from when it reads it, so its deadline is never later than ours.
const LEASE_RENEW: Duration = Duration::from_millis(200);
/// How often a pool replaces spares that died.
const POOL_TICK: Duration = Duration::from_secs(1);
/// The longest wait between start-up attempts of spares that keep dying.
const WARMUP_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Exit code: stopped on request.
const EXIT_STOPPED: i32 = 0;
/// Exit code: a request was refused (`error` says why); restarting would not help.
const EXIT_REFUSED: i32 = 2;
/// Exit code: the lease ran out.
const EXIT_FENCED: i32 = 3;

/// Writes the slice runner into `state_dir` (atomically, readable by the Mailman user)
/// and returns its path.
pub fn install_script(state_dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = state_dir.join(SCRIPT_NAME);
    let tmp = state_dir.join(format!(".{SCRIPT_NAME}.tmp"));
    std::fs::write(&tmp, SCRIPT)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// A line the slice runner wrote on its control channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Mailman is initialised; it waits for `go`.
    Ready,
    /// The slice's runner is built and about to list the slice.
    Running {
        /// The slice.
        slice: u32,
        /// The slice count.
        count: u32,
    },
    /// It stopped on request and exits 0.
    Stopped,
    /// Its lease ran out; it takes nothing more and exits 3.
    Fenced,
    /// It refused a request; it exits 2.
    Error(String),
    /// It moved a file Mailman cannot serve into the quarantine.
    Quarantined {
        /// The file's name in the queue directory.
        name: String,
        /// Why Mailman cannot serve it.
        reason: String,
    },
}

/// Parses one control-channel line.
pub fn parse_event(line: &str) -> Option<Event> {
    let (word, rest) = line.trim_end().split_once(' ').unwrap_or((line.trim_end(), ""));
    match word {
        "ready" => Some(Event::Ready),
        "running" => {
            let mut it = rest.split_whitespace().map(str::parse::<u32>);
            match (it.next(), it.next()) {
                (Some(Ok(slice)), Some(Ok(count))) => Some(Event::Running { slice, count }),
                _ => None,
            }
        }
        "stopped" => Some(Event::Stopped),
        "fenced" => Some(Event::Fenced),
        "error" => Some(Event::Error(rest.to_owned())),
        "quarantined" => {
            let (name, reason) = rest.split_once(' ').unwrap_or((rest, ""));
            (!name.is_empty()).then(|| Event::Quarantined { name: name.to_owned(), reason: reason.to_owned() })
        }
        _ => None,
    }
}

/// What a queue's slice runners are started with.
#[derive(Clone)]
struct Launch {
    queue: String,
    cfg: SuperviseConfig,
    script: PathBuf,
    node: String,
    /// The node's permits to initialise Mailman, shared by every queue's pool.
    starts: Starts,
    /// The node's fork servers, shared by the queues whose slice runners are alike.
    servers: ForkServers,
}

impl Launch {
    /// The slice runner's command line with `extra` arguments.
    fn argv(&self, extra: &[&str]) -> std::io::Result<Vec<String>> {
        let (python, config) = match (&self.cfg.python, &self.cfg.config) {
            (Some(p), Some(c)) => (p, c),
            _ => return Err(std::io::Error::other("supervise.python and supervise.config are required")),
        };
        let mut argv = vec![python.display().to_string(), self.script.display().to_string(), "--config".to_owned(), config.display().to_string()];
        argv.extend(extra.iter().map(|a| (*a).to_owned()));
        Ok(argv)
    }

    /// What a fork server for this queue is started with, apart from the queue.
    fn server_key(&self) -> ServerKey {
        let cfg = &self.cfg;
        ServerKey { python: cfg.python.clone(), config: cfg.config.clone(), env: cfg.env.clone(), workdir: cfg.workdir.clone(), user: cfg.user.clone(), group: cfg.group.clone() }
    }

    /// The slice runner's environment beside the configured one.
    fn env(&self) -> [(&'static str, String); 3] {
        [("QSLICE_QUEUE", self.queue.clone()), ("QSLICE_NODE", self.node.clone()), ("QSLICE_HOST", host_name())]
    }
}

/// How many slice runners may initialise Mailman at once on this node, over all queues.
/// A permit is held from the spawn until the process says `ready` (or exits).
#[derive(Clone)]
pub struct Starts(Arc<tokio::sync::Semaphore>);

impl Starts {
    /// At most `n` (at least 1) initialising at once.
    pub fn new(n: usize) -> Starts {
        Starts(Arc::new(tokio::sync::Semaphore::new(n.max(1))))
    }
}

/// The host name passed to slice runners as QSLICE_HOST (the site checks: nodes of one
/// host may share its per-host files): `$QSLICE_HOST` if set, else the hostname.
fn host_name() -> String {
    std::env::var("QSLICE_HOST").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "-".to_owned()))
}

/// One slice runner process and its control channel.
pub struct SliceRunner {
    process: Process,
    pid: i32,
    stdin: Option<Box<dyn AsyncWrite + Unpin + Send>>,
    events: mpsc::UnboundedReceiver<Event>,
    /// Whether the events channel is still open (the process's stdout).
    events_open: bool,
    /// Whether it said `ready` (Mailman initialised) when last looked at.
    ready: bool,
    /// Its process group is on the leash while it lives.
    _leashed: crate::leash::Leashed,
}

/// How a slice runner's exit is learnt.
enum Process {
    /// Started by qslice-runner itself: its child.
    Spawned(tokio::process::Child),
    /// Forked by the node's fork server, which reports its exit code (the channel closes
    /// without one if the server died first: its children died with it).
    Forked(watch::Receiver<Option<i32>>),
}

impl Process {
    /// Waits for it to exit.
    async fn wait(&mut self) -> Exit {
        match self {
            Process::Spawned(child) => match child.wait().await {
                Ok(status) => Exit { code: status.code(), text: status.to_string() },
                Err(e) => Exit { code: None, text: e.to_string() },
            },
            Process::Forked(exit) => loop {
                if let Some(code) = *exit.borrow_and_update() {
                    return Exit::of_code(code);
                }
                if exit.changed().await.is_err() {
                    return Exit { code: None, text: "gone with its fork server (killed)".to_owned() };
                }
            },
        }
    }
}

/// How a slice runner ended.
struct Exit {
    /// Its exit code; none if a signal killed it.
    code: Option<i32>,
    /// As the log says it.
    text: String,
}

impl Exit {
    fn of_code(code: i32) -> Exit {
        if code < 0 {
            Exit { code: None, text: format!("signal: {}", -code) }
        } else {
            Exit { code: Some(code), text: format!("exit status: {code}") }
        }
    }
}

impl SliceRunner {
    /// Starts a slice runner that initialises Mailman itself (no fork server).
    fn spawn(launch: &Launch, permit: tokio::sync::OwnedSemaphorePermit) -> std::io::Result<SliceRunner> {
        let argv = launch.argv(&["--runner", launch.cfg.runner_name(&launch.queue)])?;
        let mut cmd = command(&launch.cfg, &argv, &launch.env())?;
        cmd.stdin(Stdio::piped());
        let mut child = cmd.spawn()?;
        let pid = child.id().map_or(0, |p| p as i32);
        let (stdout, stderr, stdin) = (child.stdout.take(), child.stderr.take(), child.stdin.take());
        let _leashed = crate::leash::Leashed::new(child.id());
        Ok(SliceRunner::new(launch, Process::Spawned(child), pid, stdin.map(|s| Box::new(s) as _), stdout, stderr, Some(permit), _leashed))
    }

    /// Forks a slice runner of the queue from the node's fork server.
    async fn fork(launch: &Launch, server: &ForkServer) -> std::io::Result<SliceRunner> {
        let forked = server.fork(launch.cfg.runner_name(&launch.queue), &launch.queue).await?;
        let _leashed = crate::leash::Leashed::new(Some(forked.pid as u32));
        Ok(SliceRunner::new(launch, Process::Forked(forked.exit), forked.pid, Some(Box::new(forked.stdin)), Some(forked.stdout), Some(forked.stderr), None, _leashed))
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        launch: &Launch,
        process: Process,
        pid: i32,
        stdin: Option<Box<dyn AsyncWrite + Unpin + Send>>,
        stdout: Option<impl AsyncRead + Unpin + Send + 'static>,
        stderr: Option<impl AsyncRead + Unpin + Send + 'static>,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
        _leashed: crate::leash::Leashed,
    ) -> SliceRunner {
        let (tx, events) = mpsc::unbounded_channel();
        if let Some(out) = stdout {
            let queue = launch.queue.clone();
            tokio::spawn(async move {
                // Held until Mailman is initialised (or the process is gone).
                let mut permit = permit;
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match parse_event(&line) {
                        Some(event) => {
                            if event == Event::Ready {
                                permit = None;
                            }
                            let _ = tx.send(event);
                        }
                        None => tracing::warn!(%queue, pid, %line, "unexpected line on the slice runner's control channel"),
                    }
                }
                drop(permit);
            });
        }
        if let Some(err) = stderr {
            log_lines(err, launch.queue.clone(), format!("pid {pid}"), "stderr");
        }
        SliceRunner { process, pid, stdin, events, events_open: true, ready: false, _leashed }
    }

    /// The process id (and process group).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    async fn send(&mut self, line: &str) -> std::io::Result<()> {
        let stdin = self.stdin.as_mut().ok_or_else(|| std::io::Error::other("control channel closed"))?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await
    }

    /// Reads what it said so far; true once it said `ready`.
    fn poll_ready(&mut self) -> bool {
        while let Ok(event) = self.events.try_recv() {
            if event == Event::Ready {
                self.ready = true;
            }
        }
        self.ready
    }

    /// Its exit status if it has exited.
    fn exited(&mut self) -> Option<String> {
        match &mut self.process {
            Process::Spawned(child) => match child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(e.to_string()),
            },
            Process::Forked(exit) => match *exit.borrow() {
                Some(code) => Some(Exit::of_code(code).text),
                None => exit.has_changed().is_err().then(|| "gone with its fork server".to_owned()),
            },
        }
    }

    /// Waits for it to exit.
    async fn wait(&mut self) -> Exit {
        self.process.wait().await
    }

    /// Kills it and whatever it started (its process group).
    fn kill(&self) {
        if self.pid > 0 {
            // The process too: a child just forked may not have its own group yet.
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
    }
}

/// The idle, initialised slice runners of one queue on this node.
pub struct WarmPool {
    launch: Launch,
    state: Mutex<PoolState>,
}

struct PoolState {
    idle: VecDeque<SliceRunner>,
    /// Forks asked of the fork server and not answered yet (they count as idle).
    forking: usize,
    /// The fork server the queue forks from, if it forks (`supervise.fork_server`),
    /// shared with the node's other queues of the same configuration.
    server: Option<Arc<ForkServer>>,
    /// How many idle runners to keep: the spares plus the slices assigned here and not
    /// yet claimed (a planned move's new owner warms up while the old owner drains).
    target: usize,
    /// Spares (or fork servers) that died before being used, in a row; backs off their
    /// replacement.
    failures: u32,
    next_spawn: Option<std::time::Instant>,
}

impl WarmPool {
    /// A pool for `queue`, running `script` as `cfg` says.
    pub fn new(queue: &str, cfg: SuperviseConfig, script: PathBuf, node: &str, starts: Starts, servers: ForkServers) -> Arc<WarmPool> {
        let target = cfg.spares;
        Arc::new(WarmPool {
            launch: Launch { queue: queue.to_owned(), cfg, script, node: node.to_owned(), starts, servers },
            state: Mutex::new(PoolState { idle: VecDeque::new(), forking: 0, server: None, target, failures: 0, next_spawn: None }),
        })
    }

    /// Keeps the spares plus `pending` more runners warm.
    pub fn want(self: &Arc<Self>, pending: usize) {
        let mut st = self.state.lock().expect("pool lock");
        st.target = self.launch.cfg.spares + pending;
        self.fill(&mut st);
    }

    /// A runner to give a slice to: an initialised one if there is one, else the oldest
    /// starting one, else a new one: forked as soon as the fork server is ready, or
    /// started once a start permit is free. Its place in the pool is refilled.
    pub async fn take(self: &Arc<Self>) -> std::io::Result<SliceRunner> {
        let server = {
            let mut st = self.state.lock().expect("pool lock");
            self.prune(&mut st);
            let pick = st.idle.iter_mut().position(|r| r.poll_ready()).or(if st.idle.is_empty() { None } else { Some(0) });
            if let Some(runner) = pick.and_then(|i| st.idle.remove(i)) {
                self.fill(&mut st);
                return Ok(runner);
            }
            st.server.clone().filter(|s| !s.is_gone())
        };
        let runner = if self.launch.cfg.fork_server {
            let server = match server.or_else(|| self.launch.servers.running(&self.launch.server_key())) {
                Some(s) => s,
                None => {
                    let permit = self.launch.starts.0.clone().acquire_owned().await.map_err(std::io::Error::other)?;
                    // A fill (of this queue or another) may have started one meanwhile.
                    let server = self.launch.servers.get_or_start(&self.launch.server_key(), || self.start_server(Some(permit)))?;
                    self.state.lock().expect("pool lock").server = Some(server.clone());
                    server
                }
            };
            SliceRunner::fork(&self.launch, &server).await?
        } else {
            let permit = self.launch.starts.0.clone().acquire_owned().await.map_err(std::io::Error::other)?;
            SliceRunner::spawn(&self.launch, permit)?
        };
        self.fill(&mut self.state.lock().expect("pool lock"));
        Ok(runner)
    }

    fn start_server(&self, permit: Option<tokio::sync::OwnedSemaphorePermit>) -> std::io::Result<ForkServer> {
        let argv = self.launch.argv(&["--fork-server"])?;
        let server = ForkServer::start(command(&self.launch.cfg, &argv, &self.launch.env())?, &self.launch.queue, permit)?;
        tracing::info!(queue = %self.launch.queue, pid = server.pid(), config = ?self.launch.cfg.config, "started the Mailman fork server (it initialises Mailman once and forks each slice runner of every queue run with this configuration)");
        Ok(server)
    }

    /// Drops idle runners that died; repeated deaths back the next start off.
    fn prune(&self, st: &mut PoolState) {
        let mut died = Vec::new();
        let queue = &self.launch.queue;
        st.idle.retain_mut(|r| {
            let was_ready = r.ready;
            if r.poll_ready() && !was_ready {
                tracing::info!(%queue, pid = r.pid, "a warm Mailman slice runner is ready (Mailman initialised, waiting for a slice)");
            }
            match r.exited() {
                Some(status) => {
                    died.push((r.pid, r.ready, status));
                    false
                }
                None => true,
            }
        });
        for (pid, ready, status) in died {
            self.back_off(st);
            tracing::warn!(queue = %self.launch.queue, pid, initialised = ready, %status, retry_in = ?st.next_spawn.map(|t| t.saturating_duration_since(std::time::Instant::now())), "a warm Mailman slice runner died before it was given a slice; see its log lines above");
        }
        if st.server.as_ref().is_some_and(|s| s.is_gone()) {
            let (pid, label) = st.server.take().map_or((0, String::new()), |s| (s.pid(), s.label().to_owned()));
            self.back_off(st);
            tracing::warn!(queue = %self.launch.queue, pid, started_by = %label, "the Mailman fork server is gone; starting another (see its log lines above)");
        }
        if st.idle.iter().any(|r| r.ready) || st.server.as_ref().is_some_and(|s| s.is_ready()) {
            st.failures = 0;
        }
        metrics::gauge!("qslice_runner_warm_slice_runners", "queue" => queue.clone()).set(st.idle.iter().filter(|r| r.ready).count() as f64);
    }

    fn back_off(&self, st: &mut PoolState) {
        st.failures += 1;
        let wait = (Duration::from_millis(500) * 2u32.saturating_pow(st.failures.min(6))).min(WARMUP_BACKOFF_MAX);
        st.next_spawn = Some(std::time::Instant::now() + wait);
    }

    fn fill(self: &Arc<Self>, st: &mut PoolState) {
        self.prune(st);
        while st.idle.len() + st.forking > st.target {
            // Keep the initialised ones: drop the newest.
            match st.idle.pop_back() {
                Some(r) => r.kill(),
                None => break,
            }
        }
        if st.next_spawn.is_some_and(|t| std::time::Instant::now() < t) {
            return;
        }
        if self.launch.cfg.fork_server {
            self.fill_by_forks(st);
            return;
        }
        while st.idle.len() < st.target {
            // Spares wait for a free start permit (the next tick looks again).
            let Ok(permit) = self.launch.starts.0.clone().try_acquire_owned() else {
                return;
            };
            match SliceRunner::spawn(&self.launch, permit) {
                Ok(r) => st.idle.push_back(r),
                Err(e) => {
                    self.back_off(st);
                    tracing::error!(queue = %self.launch.queue, error = %e, "cannot start a Mailman slice runner");
                    return;
                }
            }
        }
    }

    /// Takes the node's fork server for this configuration, or starts it if there is none
    /// (once a start permit is free), and forks spares from it up to the target once it
    /// is ready.
    fn fill_by_forks(self: &Arc<Self>, st: &mut PoolState) {
        if st.server.is_none() {
            st.server = self.launch.servers.running(&self.launch.server_key());
        }
        if st.server.is_none() {
            // The server starts at once on a node's first fill; the next tick looks again
            // if no permit is free.
            let Ok(permit) = self.launch.starts.0.clone().try_acquire_owned() else {
                return;
            };
            match self.launch.servers.get_or_start(&self.launch.server_key(), || self.start_server(Some(permit))) {
                Ok(server) => st.server = Some(server),
                Err(e) => {
                    self.back_off(st);
                    tracing::error!(queue = %self.launch.queue, error = %e, "cannot start the Mailman fork server");
                    return;
                }
            }
        }
        let Some(server) = st.server.clone().filter(|s| s.is_ready()) else {
            return;
        };
        while st.idle.len() + st.forking < st.target {
            st.forking += 1;
            let (pool, server) = (self.clone(), server.clone());
            tokio::spawn(async move {
                let forked = SliceRunner::fork(&pool.launch, &server).await;
                let mut st = pool.state.lock().expect("pool lock");
                st.forking -= 1;
                match forked {
                    Ok(r) if st.idle.len() < st.target => st.idle.push_back(r),
                    Ok(r) => r.kill(),
                    Err(e) => {
                        pool.back_off(&mut st);
                        tracing::error!(queue = %pool.launch.queue, error = %e, "the Mailman fork server could not fork a slice runner");
                    }
                }
            });
        }
    }

    /// Replaces dead spares every second until `cancel`, then stops the idle runners.
    pub async fn maintain(self: Arc<WarmPool>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(POOL_TICK);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let mut st = self.state.lock().expect("pool lock");
                    self.fill(&mut st);
                }
                _ = cancel.cancelled() => break,
            }
        }
        let mut st = self.state.lock().expect("pool lock");
        for r in st.idle.drain(..) {
            r.kill();
        }
        // The fork server ends once the last pool using it has let go and the slice runners
        // it forked have exited.
        st.server = None;
    }
}

/// The fence deadline as the slice runner takes it: milliseconds on CLOCK_BOOTTIME
/// (which counts through a suspend), absolute, so that a line read late by a starved
/// process is still exact. A tripped fence gives a deadline already passed.
fn lease_until_ms(fence: &Fence) -> u128 {
    let left = if fence.is_valid() { fence.deadline().saturating_duration_since(Instant::now()) } else { Duration::ZERO };
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).map(|t| Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)).unwrap_or_default();
    // A tripped fence: a deadline already behind the slice runner's clock.
    if left.is_zero() {
        return now.as_millis().saturating_sub(1);
    }
    (now + left).as_millis()
}

/// Runs one supervised slice with slice runners from `pool` until `quiet` (stop between
/// messages) or `kill_now` (at once); restarts a crashed one like the command flavours.
pub async fn run_slice(sup: Supervised, pool: Arc<WarmPool>, quiet: CancellationToken, kill_now: CancellationToken) -> SupervisorExit {
    let mut crashes = VecDeque::new();
    let mut backoff = Duration::from_millis(500);
    let (queue, slice) = (sup.queue.clone(), sup.slice);
    loop {
        if kill_now.is_cancelled() {
            return SupervisorExit::Killed;
        }
        if quiet.is_cancelled() {
            return SupervisorExit::Stopped;
        }
        // A restart is checked like the first start (python or config may be gone).
        if let Err(e) = sup.cfg.check(&sup.queue, Some(sup.slices)) {
            return SupervisorExit::Refused(e.to_string());
        }
        // The deadline as it is when the runner is had (a fork waits for its server).
        let go = |fence: &Fence| format!("go {} {} {} {}", sup.slice, sup.slices, sup.epoch, lease_until_ms(fence));
        let started = match pool.take().await {
            Ok(mut runner) => match runner.send(&go(&sup.fence)).await {
                Ok(()) => Ok(runner),
                Err(e) => {
                    runner.kill();
                    Err(format!("its control channel failed: {e}"))
                }
            },
            Err(e) => Err(format!("cannot start: {e}")),
        };
        let mut runner = match started {
            Ok(r) => r,
            Err(why) => {
                tracing::error!(%queue, slice, %why, "cannot run the Mailman slice runner");
                if let Some(exit) = sup.count_crash(&mut crashes, &why) {
                    return exit;
                }
                if let Some(exit) = wait_backoff(&mut backoff, &quiet, &kill_now).await {
                    return exit;
                }
                continue;
            }
        };
        let pid = runner.pid();
        tracing::info!(%queue, slice, epoch = sup.epoch, pid, warm = runner.ready, "handed the slice to a Mailman slice runner");
        let mut renew = tokio::time::interval(LEASE_RENEW);
        renew.reset();
        let mut refusal = None;
        let exit = loop {
            tokio::select! {
                biased;
                _ = kill_now.cancelled() => {
                    runner.kill();
                    runner.wait().await;
                    return SupervisorExit::Killed;
                }
                _ = quiet.cancelled() => {
                    stop(&sup, &mut runner, &kill_now).await;
                    return SupervisorExit::Stopped;
                }
                exit = runner.process.wait() => break exit,
                event = runner.events.recv(), if runner.events_open => match event {
                    None => runner.events_open = false,
                    Some(Event::Running { slice: s, count }) => tracing::info!(%queue, slice = s, slices = count, pid, "Mailman slice runner is running the slice"),
                    Some(Event::Error(text)) => {
                        tracing::error!(%queue, slice, pid, error = %text, "the Mailman slice runner refused the slice");
                        refusal = Some(text);
                    }
                    Some(Event::Fenced) => tracing::warn!(%queue, slice, pid, "the Mailman slice runner reached the fence deadline and takes nothing more"),
                    Some(Event::Quarantined { name, reason }) => quarantined(&queue, &name, &reason),
                    Some(Event::Ready | Event::Stopped) => {}
                },
                _ = renew.tick() => {
                    let _ = runner.send(&format!("lease {}", lease_until_ms(&sup.fence))).await;
                }
            }
        };
        // Whatever it started goes with it.
        runner.kill();
        let code = exit.code;
        if let Some(reason) = refusal {
            return SupervisorExit::GaveUp(reason);
        }
        match code {
            Some(EXIT_REFUSED) => return SupervisorExit::GaveUp(format!("the slice runner refused the slice ({}); see its log lines above", exit.text)),
            Some(EXIT_FENCED) => tracing::warn!(%queue, slice, pid, "the Mailman slice runner stopped at the fence deadline"),
            Some(EXIT_STOPPED) => tracing::warn!(%queue, slice, pid, "the Mailman slice runner stopped without being asked; starting another"),
            _ => {
                let why = format!("exited with {}", exit.text);
                tracing::warn!(%queue, slice, pid, %why, "the Mailman slice runner crashed");
                metrics::counter!("qslice_runner_supervised_crashes_total", "queue" => queue.clone()).increment(1);
                if let Some(exit) = sup.count_crash(&mut crashes, &why) {
                    return exit;
                }
            }
        }
        if let Some(exit) = wait_backoff(&mut backoff, &quiet, &kill_now).await {
            return exit;
        }
    }
}

/// A file Mailman cannot serve was moved into the quarantine by a slice runner.
fn quarantined(queue: &str, name: &str, reason: &str) {
    metrics::counter!("qslice_runner_entries_total", "queue" => queue.to_owned(), "outcome" => "quarantined").increment(1);
    tracing::warn!(%queue, file = %name, %reason, "alert: a file Mailman cannot serve was quarantined (moved to .qslice/quarantine/{queue}/ under the spool root); Mailman's listing would have failed on it");
}

/// How a quiet stop ended.
enum StopOutcome {
    /// The slice runner exited.
    Exited,
    /// It did not exit within the stop timeout.
    TimedOut,
    /// The fence fired first (`kill_now`).
    Fenced,
}

/// Asks a running slice runner to stop after the message in hand; kills it at the stop
/// timeout or on `kill_now`.
async fn stop(sup: &Supervised, runner: &mut SliceRunner, kill_now: &CancellationToken) {
    let shunted_before = sup.shunted();
    let asked = Instant::now();
    // A failed write means it is already gone; waiting for it below tells.
    let _ = runner.send("stop").await;
    runner.stdin = None;
    let outcome = tokio::select! {
        r = tokio::time::timeout(sup.cfg.stop_timeout, runner.wait()) => if r.is_ok() { StopOutcome::Exited } else { StopOutcome::TimedOut },
        _ = kill_now.cancelled() => StopOutcome::Fenced,
    };
    match outcome {
        StopOutcome::Exited => {}
        StopOutcome::TimedOut => {
            tracing::warn!(queue = %sup.queue, slice = sup.slice, pid = runner.pid, timeout = ?sup.cfg.stop_timeout, "the Mailman slice runner did not finish its message within the stop timeout; killing it (the slice's next runner recovers the message)")
        }
        StopOutcome::Fenced => {
            tracing::warn!(queue = %sup.queue, slice = sup.slice, pid = runner.pid, waited = ?asked.elapsed(), "the fence fired while the Mailman slice runner was stopping; killing it (the slice's next runner recovers the message)")
        }
    }
    runner.kill();
    runner.wait().await;
    let shunted = sup.shunted().saturating_sub(shunted_before);
    if shunted > 0 {
        tracing::warn!(queue = %sup.queue, slice = sup.slice, shunted, "messages were shunted while the slice runner stopped");
    }
    tracing::info!(queue = %sup.queue, slice = sup.slice, pid = runner.pid, took = ?asked.elapsed(), "Mailman slice runner stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_lines_parse_and_garbage_does_not() {
        assert_eq!(parse_event("ready 1234"), Some(Event::Ready));
        assert_eq!(parse_event("running 3 8\n"), Some(Event::Running { slice: 3, count: 8 }));
        assert_eq!(parse_event("stopped"), Some(Event::Stopped));
        assert_eq!(parse_event("fenced"), Some(Event::Fenced));
        assert_eq!(parse_event("error slice count 3 is not a power of two"), Some(Event::Error("slice count 3 is not a power of two".into())));
        assert_eq!(parse_event("running three 8"), None);
        assert_eq!(parse_event("hello"), None);
        assert_eq!(parse_event(""), None);
    }

    #[test]
    fn the_script_is_installed_readable_and_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = install_script(dir.path()).expect("install");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), SCRIPT);
        // Installing again (a restart) replaces it in place.
        install_script(dir.path()).expect("install again");
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(SCRIPT_NAME)], "no temporary file left");
    }
}
