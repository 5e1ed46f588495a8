//! The leash: a small process beside each qslice-runner that binds every child process
//! (supervised Mailman runners, exec handlers, worker coprocesses) to the runner's fence
//! deadline, whatever happens to the runner itself.
//!
//! A runner that is frozen (SIGSTOP, a stuck NFS call, a bug) cannot stop its children,
//! and PR_SET_PDEATHSIG only covers its death. The leash is the same binary
//! (`qslice-runner --leash`), started by the runner in its own process group without the
//! death signal, so it keeps running when the runner is frozen, hung or dead:
//! - the runner keeps telling it the fence deadline (plus half the fence margin, so that
//!   the runner's own fence has tripped first and the lease still cannot have expired), as
//!   an absolute time on CLOCK_BOOTTIME (which counts through a suspend), so that a line
//!   read late is still exact; the leash SIGKILLs every registered process group the
//!   moment it passes without a renewal. A lease whose deadline passed stays dead: a late
//!   renewal of it re-arms nothing, and a group added afterwards is killed at once;
//! - when its stdin closes without `bye` (the runner died on a live host), it kills the
//!   groups, waits until they are gone, and revokes the runner's lease itself, so that the
//!   coordinator moves the slices at once instead of after the TTL.
//!
//! Its commands, one line each on its stdin: `etcd <json>` (how to reach etcd, first),
//! `until <id> <boot ms>` (the current lease and its deadline on CLOCK_BOOTTIME),
//! `lease <id> <ms>` (the same with the time left; `lease <id> 0` is the runner ending the
//! lease itself), `add <pgid>`, `del <pgid>`,
//! `bye` (a clean exit: the runner revoked its lease itself). It logs to the runner's
//! stderr. A runner whose leash is gone fences itself (see [`Leash::send`]).

use std::collections::BTreeSet;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use qslice_common::config::EtcdConfig;

/// How often the runner renews the leash's deadline.
pub const RENEW_EVERY: Duration = Duration::from_millis(100);
/// How long the leash of a dead runner waits for its children to be gone before it gives
/// up revoking the lease (the lease then ends with its TTL).
const GONE_WAIT: Duration = Duration::from_secs(10);
/// The longest the leash sleeps between looks at its deadline: the deadline is on
/// CLOCK_BOOTTIME, the channel's timeout on CLOCK_MONOTONIC, which stops during a suspend.
const TICK: Duration = Duration::from_millis(20);

/// How the leash reaches etcd (with the password, unlike the printed configuration).
#[derive(Serialize, Deserialize)]
struct LeashEtcd {
    endpoints: Vec<String>,
    user: Option<String>,
    password: Option<String>,
    ca: Option<std::path::PathBuf>,
    cert: Option<std::path::PathBuf>,
    key: Option<std::path::PathBuf>,
}

impl LeashEtcd {
    fn of(cfg: &EtcdConfig) -> LeashEtcd {
        LeashEtcd { endpoints: cfg.endpoints.clone(), user: cfg.user.clone(), password: cfg.password.clone(), ca: cfg.ca.clone(), cert: cfg.cert.clone(), key: cfg.key.clone() }
    }

    fn config(self) -> EtcdConfig {
        EtcdConfig { endpoints: self.endpoints, user: self.user, password: self.password, ca: self.ca, cert: self.cert, key: self.key }
    }
}

/// The runner's side of its leash.
pub struct Leash {
    child: Mutex<Child>,
    stdin: Mutex<Option<ChildStdin>>,
    /// Tripped when the leash is gone: the runner then fences itself.
    lost: tokio_util::sync::CancellationToken,
}

/// The current leash and every live child process group, so that a replacement leash
/// (the previous one died) is told about the children already running.
struct Registry {
    leash: Option<Arc<Leash>>,
    groups: BTreeSet<i32>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { leash: None, groups: BTreeSet::new() });

/// The write end of the current leash's stdin, or -1: read by a forked child, which may
/// take no lock. Set to -1 before the pipe is closed, so a child forked after the close
/// never writes to whatever file reuses the number.
static LEASH_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Called in a forked child before exec (see [`crate::child::die_with_parent`]): sends
/// `add <pid>` for the child's own process group straight to the leash. One short write
/// to a pipe is atomic, so it never mixes with the runner's own lines. Async-signal-safe:
/// no allocation, no lock.
#[allow(unsafe_code)]
pub fn announce_from_child(pid: libc::pid_t) {
    let fd = LEASH_FD.load(std::sync::atomic::Ordering::SeqCst);
    if fd < 0 || pid <= 0 {
        return;
    }
    // SAFETY: fstat and write on a plain fd with stack buffers.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 || st.st_mode & libc::S_IFMT != libc::S_IFIFO {
            return;
        }
        let mut line = [0u8; 24];
        line[..4].copy_from_slice(b"add ");
        let mut digits = [0u8; 12];
        let (mut n, mut len) = (pid as u32, 0);
        while n > 0 || len == 0 {
            digits[len] = b'0' + (n % 10) as u8;
            n /= 10;
            len += 1;
        }
        for i in 0..len {
            line[4 + i] = digits[len - 1 - i];
        }
        line[4 + len] = b'\n';
        // A leash that has just died must not kill the child with SIGPIPE (Rust resets
        // SIGPIPE to its default before pre_exec runs): ignored around the write, which
        // then fails with EPIPE, and put back for the program exec'd next.
        let mut ignore: libc::sigaction = std::mem::zeroed();
        ignore.sa_sigaction = libc::SIG_IGN;
        let mut previous: libc::sigaction = std::mem::zeroed();
        let ignored = libc::sigaction(libc::SIGPIPE, &ignore, &mut previous) == 0;
        let _ = libc::write(fd, line.as_ptr().cast(), 5 + len);
        if ignored {
            libc::sigaction(libc::SIGPIPE, &previous, std::ptr::null_mut());
        }
    }
}

impl Leash {
    /// Starts a leash and makes it the one [`Leashed`] registers with; tells it about the
    /// children already running.
    pub fn start(etcd: &EtcdConfig) -> std::io::Result<Arc<Leash>> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("--leash").stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::inherit());
        // Its own process group and no death signal: it must outlive a dead runner.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take().ok_or_else(|| std::io::Error::other("the leash has no stdin"))?;
        // Never block the runner on a leash that stopped reading: a full pipe is a lost leash.
        let fd = stdin.as_raw_fd();
        let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        let leash = Arc::new(Leash { child: Mutex::new(child), stdin: Mutex::new(Some(stdin)), lost: Default::default() });
        let json = serde_json::to_string(&LeashEtcd::of(etcd)).map_err(std::io::Error::other)?;
        leash.send(&format!("etcd {json}"));
        let mut registry = REGISTRY.lock().expect("leash registry");
        for g in &registry.groups {
            leash.send(&format!("add {g}"));
        }
        registry.leash = Some(leash.clone());
        LEASH_FD.store(fd, std::sync::atomic::Ordering::SeqCst);
        Ok(leash)
    }

    /// Cancelled once the leash is gone.
    pub fn lost(&self) -> &tokio_util::sync::CancellationToken {
        &self.lost
    }

    /// Sends one command; a leash that cannot take it is lost.
    pub fn send(&self, line: &str) {
        let mut stdin = self.stdin.lock().expect("leash lock");
        let Some(pipe) = stdin.as_mut() else { return };
        if let Err(e) = pipe.write_all(format!("{line}\n").as_bytes()) {
            let status = self.child.lock().expect("leash lock").try_wait().ok().flatten();
            tracing::error!(error = %e, ?status, "the leash is gone or stopped reading; fencing: no child process may outlive this runner's fence");
            let _ = LEASH_FD.compare_exchange(pipe.as_raw_fd(), -1, std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst);
            *stdin = None;
            self.lost.cancel();
        }
    }

    /// The lease and the time left before the fence deadline; returns the deadline the
    /// leash was told (CLOCK_BOOTTIME), None when the lease ends.
    pub fn renew(&self, lease: i64, left: Duration) -> Option<Duration> {
        if left.is_zero() {
            // The runner ends the lease itself (a stop, or its own fence).
            self.send(&format!("lease {lease} 0"));
            None
        } else {
            // Absolute, on the leash's clock: a leash slow to read the line (CPU-starved,
            // or frozen a moment) still kills on time, not `left` after it read it.
            let until = boot_ms() + left.as_millis();
            self.send(&format!("until {lease} {until}"));
            Some(Duration::from_millis(until as u64))
        }
    }

    /// A clean exit: the runner revoked its lease itself; the leash just ends.
    pub fn bye(&self) {
        self.send("bye");
        let mut stdin = self.stdin.lock().expect("leash lock");
        if let Some(pipe) = stdin.as_ref() {
            let _ = LEASH_FD.compare_exchange(pipe.as_raw_fd(), -1, std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst);
        }
        *stdin = None;
        drop(stdin);
        let _ = self.child.lock().expect("leash lock").wait();
    }
}

/// A child's process group, registered with the leash while the guard lives.
#[derive(Debug)]
pub struct Leashed(Option<i32>);

impl Leashed {
    /// Registers the process group `pgid` (a child started with `process_group(0)`).
    pub fn new(pgid: Option<u32>) -> Leashed {
        let pgid = pgid.map(|p| p as i32);
        if let Some(p) = pgid {
            let mut registry = REGISTRY.lock().expect("leash registry");
            registry.groups.insert(p);
            if let Some(leash) = &registry.leash {
                leash.send(&format!("add {p}"));
            }
        }
        Leashed(pgid)
    }
}

impl Drop for Leashed {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let mut registry = REGISTRY.lock().expect("leash registry");
            registry.groups.remove(&p);
            if let Some(leash) = &registry.leash {
                leash.send(&format!("del {p}"));
            }
        }
    }
}

/// The leash's nice value: on a host busy with Mailman processes it still runs at its
/// deadline. Lowering one's nice value takes CAP_SYS_NICE or an RLIMIT_NICE that allows it
/// (the runner's systemd unit sets `LimitNICE=-10`).
pub const LEASH_NICE: i32 = -10;

/// Runs the leash at [`LEASH_NICE`]; says why not when it may not.
#[allow(unsafe_code)]
fn raise_priority() {
    // SAFETY: setpriority changes this process's nice value only; no memory is touched.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, LEASH_NICE) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        say(&format!(
            "cannot raise its scheduling priority to nice {LEASH_NICE} ({error}); on a loaded host it may kill late. Allow it with LimitNICE={LEASH_NICE} in the runner's systemd unit (or CAP_SYS_NICE)"
        ));
    }
}

fn boot_ms() -> u128 {
    clock_gettime(ClockId::CLOCK_BOOTTIME).map_or(0, |t| t.tv_sec() as u128 * 1000 + t.tv_nsec() as u128 / 1_000_000)
}

fn say(what: &str) {
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ");
    eprintln!("{now} qslice-runner leash[{}]: {what}", std::process::id());
}

fn kill_groups(groups: &BTreeSet<i32>) {
    for g in groups {
        let _ = killpg(Pid::from_raw(*g), Signal::SIGKILL);
    }
}

/// Whether no process of `groups` runs any more. A zombie runs nothing: the dead
/// runner's children are reparented to init, which may take its time to reap them.
fn groups_gone(groups: &BTreeSet<i32>) -> bool {
    if groups.iter().all(|g| killpg(Pid::from_raw(*g), None) == Err(nix::errno::Errno::ESRCH)) {
        return true;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else { return false };
    !procs.flatten().any(|p| {
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else { return false };
        // After the ")" that ends the command name: state, ppid, pgrp.
        let mut fields = stat.rsplit(')').next().unwrap_or_default().split_whitespace();
        let state = fields.next().unwrap_or("Z");
        let pgrp = fields.nth(1).and_then(|g| g.parse::<i32>().ok());
        state != "Z" && pgrp.is_some_and(|g| groups.contains(&g))
    })
}

/// The leash's stdin, read in the leash's own loop (no reader thread): everything the
/// runner wrote before a look is seen by that look, so a renewal written in time but read
/// late (the leash starved of CPU) is never taken for a lapse.
#[derive(Default)]
struct Input {
    /// Bytes read after the last complete line.
    pending: Vec<u8>,
    /// End of file (the runner closed the pipe or died) or a read error.
    closed: bool,
}

impl Input {
    /// Waits up to `timeout` for input, reads everything there is, and returns the
    /// complete lines read.
    fn lines(&mut self, timeout: Duration) -> Vec<String> {
        let mut wait = timeout;
        while !self.closed && readable(STDIN, wait) {
            let mut buf = [0u8; 8192];
            match read(STDIN, &mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.closed = true,
            }
            wait = Duration::ZERO;
        }
        let mut lines = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            lines.push(String::from_utf8_lossy(&line[..end]).into_owned());
        }
        lines
    }
}

const STDIN: i32 = 0;

/// Whether `fd` can be read without blocking (data, end of file or an error) within `timeout`.
#[allow(unsafe_code)]
fn readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: poll on one pollfd on the stack.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// One read(2) of `fd`.
#[allow(unsafe_code)]
fn read(fd: i32, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: read into a buffer we own, no longer than it.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// What the leash knows: the children's groups, the lease and its deadline.
#[derive(Default)]
struct Leashing {
    groups: BTreeSet<i32>,
    deadline: Option<u128>,
    lease: Option<i64>,
    etcd: Option<LeashEtcd>,
    /// Leases whose deadline passed: dead for good here. A later `lease` for one of them
    /// (a renewal that arrives late) re-arms nothing, and a group added while the current
    /// one is lapsed is killed at once; only a new lease (a new incarnation) re-arms.
    lapsed: BTreeSet<i64>,
    /// Whether the current deadline was the runner's own `lease <id> 0` (a stop), not a
    /// missed renewal: the log says which.
    ended_by_runner: bool,
}

impl Leashing {
    /// Whether the current lease's deadline is armed (set and not lapsed).
    fn armed(&self) -> bool {
        self.deadline.is_some() && !self.lease.is_some_and(|l| self.lapsed.contains(&l))
    }

    /// Kills every group if the deadline has passed; the lease is then dead for good.
    fn enforce_deadline(&mut self) {
        if !(self.armed() && self.deadline.is_some_and(|d| boot_ms() >= d)) {
            return;
        }
        if !self.groups.is_empty() {
            if self.ended_by_runner {
                say(&format!("the runner ended its lease (a stop or its own fence): killed {} process groups", self.groups.len()));
            } else {
                say(&format!("the fence deadline passed without a renewal (the runner is frozen, hung or cut off): killed {} process groups", self.groups.len()));
            }
        }
        kill_groups(&self.groups);
        self.groups.clear();
        self.lapsed.extend(self.lease);
    }

    /// How long to wait for input: until the deadline, and at most a [`TICK`].
    fn wait(&self) -> Duration {
        match self.deadline.filter(|_| self.armed()) {
            Some(d) => TICK.min(Duration::from_millis(d.saturating_sub(boot_ms()) as u64 + 1)),
            None => TICK,
        }
    }

    /// Applies one command line; false for `bye` (a clean exit).
    fn apply(&mut self, line: &str) -> bool {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "lease" => {
                let mut it = rest.split_whitespace().map(str::parse::<i64>);
                if let (Some(Ok(id)), Some(Ok(ms))) = (it.next(), it.next()) {
                    if self.lapsed.contains(&id) {
                        if ms > 0 {
                            say(&format!("ignoring a renewal of lease {id}: its deadline has passed, so it stays dead"));
                        }
                    } else {
                        self.lease = Some(id);
                        self.deadline = Some(boot_ms() + ms.max(0) as u128);
                        self.ended_by_runner = ms <= 0;
                    }
                }
            }
            "until" => {
                let mut it = rest.split_whitespace().map(str::parse::<u128>);
                if let (Some(Ok(id)), Some(Ok(at))) = (it.next(), it.next()) {
                    let id = id as i64;
                    if self.lapsed.contains(&id) {
                        say(&format!("ignoring a renewal of lease {id}: its deadline has passed, so it stays dead"));
                    } else {
                        self.lease = Some(id);
                        self.deadline = Some(at);
                        self.ended_by_runner = false;
                    }
                }
            }
            "add" => {
                if let Ok(g) = rest.trim().parse::<i32>() {
                    // Registered after the deadline passed: it may not run either.
                    if self.deadline.is_some_and(|d| boot_ms() >= d) {
                        let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
                    } else {
                        self.groups.insert(g);
                    }
                }
            }
            "del" => {
                if let Ok(g) = rest.trim().parse::<i32>() {
                    self.groups.remove(&g);
                }
            }
            "etcd" => match serde_json::from_str(rest) {
                Ok(e) => self.etcd = Some(e),
                Err(e) => say(&format!("unreadable etcd settings ({e}); it cannot revoke the lease of a dead runner")),
            },
            "bye" => return false,
            other => say(&format!("unknown command {other:?}")),
        }
        true
    }
}

/// The leash process (`qslice-runner --leash`).
pub fn main() -> ExitCode {
    raise_priority();
    let mut input = Input::default();
    let mut state = Leashing::default();
    loop {
        // Everything the runner has written so far is applied before the deadline is
        // looked at.
        for line in input.lines(Duration::ZERO) {
            if !state.apply(&line) {
                return ExitCode::SUCCESS;
            }
        }
        if input.closed {
            break;
        }
        state.enforce_deadline();
        // Wake at the deadline itself, not only on the tick.
        let lines = input.lines(state.wait());
        if lines.is_empty() {
            // A child announces its group itself before exec; if the exec then failed,
            // no `del` follows. Forget groups that no longer exist, so a recycled pid is
            // never killed.
            state.groups.retain(|g| killpg(Pid::from_raw(*g), None).is_ok());
        }
        for line in lines {
            if !state.apply(&line) {
                return ExitCode::SUCCESS;
            }
        }
    }
    let Leashing { groups, lease, etcd, .. } = state;
    // The runner died (its stdin closed without `bye`): its children must be gone before
    // its slices can go to another node.
    kill_groups(&groups);
    let waited = std::time::Instant::now();
    while !groups_gone(&groups) {
        if waited.elapsed() >= GONE_WAIT {
            say(&format!("the runner died and its children are still there after {GONE_WAIT:?}; leaving its lease to expire"));
            return ExitCode::from(1);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (Some(lease), Some(etcd)) = (lease, etcd) else { return ExitCode::SUCCESS };
    match revoke(lease, etcd.config()) {
        Ok(()) => {
            say(&format!(
                "the runner died; its {} child process groups are gone; revoked its lease {lease} {} ms later so that its slices move now",
                groups.len(),
                waited.elapsed().as_millis()
            ));
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(&format!("the runner died; revoking its lease {lease} failed ({e}); it ends with its TTL"));
            ExitCode::from(1)
        }
    }
}

fn revoke(lease: i64, etcd: EtcdConfig) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let options = qslice_common::etcd::connect_options(&etcd).map_err(|e| e.to_string())?;
        let connect = etcd_client::Client::connect(&etcd.endpoints, Some(options));
        let mut client = tokio::time::timeout(qslice_common::etcd::REQUEST_TIMEOUT, connect).await.map_err(|_| "connect timed out".to_owned())?.map_err(|e| e.to_string())?;
        match tokio::time::timeout(qslice_common::etcd::REQUEST_TIMEOUT, client.lease_revoke(lease)).await {
            Ok(Ok(_)) => Ok(()),
            // Already gone (it expired, or the runner revoked it before it died).
            Ok(Err(e)) if e.to_string().contains("not found") => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_owned()),
        }
    })
}
