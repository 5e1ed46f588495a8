//! Supervising real Mailman queue runners: one child process per claimed slice.
//!
//! - The child runs in its own process group and dies with the runner
//!   (PR_SET_PDEATHSIG), so a runner killed with SIGKILL leaves no Mailman process behind.
//! - Mailman 3 (the default `mailman3` flavour) runs qslice's own slice runner, which
//!   builds on this file (`mailman3.rs`; `supervised_slices.rs` chooses between the two):
//!   it is asked to stop over a pipe and stops between messages, starts warm, and takes
//!   the slice count and the fence deadline from qslice.
//! - Quiet stop of the command flavours: Mailman 2.1's qrunner finishes its current
//!   message on SIGTERM. Mailman 3's own `runner` (`mailman3-runner`) shunts the message
//!   it is processing when a stop signal arrives while busy; so the child is frozen
//!   (SIGSTOP), the slice is looked at, and it gets SIGTERM (then SIGCONT) only when no
//!   `.bak` of its slice exists, else it is thawed and looked at again shortly. That is
//!   not safe (DESIGN.md: a signal inside `finish()` or `dequeue()` still damages a
//!   message), which is why it is not the default. Past the stop timeout the child is
//!   killed. A message shunted anyway is reported.
//! - Restarts like Mailman's master: a crashed child is restarted with backoff; exit 15 or
//!   death by SIGTERM is a clean stop; more than `max_restarts` crashes within
//!   `restart_window` gives the slice up (the owner releases it and raises an alert).
//! - In this mode `.bak` recovery is Mailman's own (it recovers its slice at start and
//!   counts recoveries inside the entry); qslice's recovery serves its built-in handlers.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use qslice_common::config::{humantime_serde_opt, humantime_serialize};
use qslice_common::spool::QueueDir;

/// How a queue's slices are run, and so how they are stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum Flavour {
    /// Mailman 2.1 `bin/qrunner`: SIGTERM finishes the current message.
    #[serde(rename = "mailman2")]
    Mailman2,
    /// qslice's own Mailman 3 slice runner (`mailman3.rs`), run with the site's
    /// Mailman interpreter: stops between messages, starts warm, takes its slice count
    /// from qslice and honours the fence deadline itself.
    #[default]
    #[serde(rename = "mailman3")]
    Mailman3,
    /// Mailman 3's own `runner` command. No moment is safe for its stop signal (it can
    /// shunt a message already accepted, or send a good one to bad/); kept for sites that
    /// insist. qslice freezes it, signals it only while its slice has no `.bak`, and checks
    /// mailman.cfg's `instances` against the slice count.
    #[serde(rename = "mailman3-runner")]
    Mailman3Runner,
}

/// How to run one queue's Mailman runners (the `[supervise.<queue>]` table).
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SuperviseConfig {
    /// How the slices are run and stopped.
    #[serde(default)]
    pub flavour: Flavour,
    /// Command argv with `{queue}` `{slice}` `{slices}` placeholders (never a shell);
    /// for `mailman2` and `mailman3-runner`.
    #[serde(default)]
    pub command: Vec<String>,
    /// The site's Mailman 3 interpreter (the venv's `bin/python`); for `mailman3`.
    #[serde(default)]
    pub python: Option<PathBuf>,
    /// The site's mailman.cfg; for `mailman3`.
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// The Mailman runner name [default: the queue's name]; for `mailman3`.
    #[serde(default)]
    pub runner: Option<String>,
    /// Warm slice runners kept ready beside the running ones, so that a takeover does
    /// not wait for Mailman's start-up; for `mailman3` [default: 1].
    #[serde(default = "default_spares")]
    pub spares: usize,
    /// Fork every slice runner from a process that has initialised Mailman once (a start
    /// then takes a fraction of a second and shares the imported pages), one per node for
    /// the queues of the same python, config, env, workdir, user and group, instead of
    /// starting each one on its own; for `mailman3` [default: true].
    #[serde(default = "default_fork_server")]
    pub fork_server: bool,
    /// Environment variables passed through from the runner's environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// User to run as (name or uid); needs the runner to run as root.
    #[serde(default)]
    pub user: Option<String>,
    /// Group to run as (name or gid).
    #[serde(default)]
    pub group: Option<String>,
    /// How long a quiet stop may take before SIGKILL.
    #[serde(default = "default_stop_timeout", with = "humantime_serde_req")]
    pub stop_timeout: Duration,
    /// Crashes allowed within `restart_window` before the slice is given up.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: usize,
    /// The window for `max_restarts`.
    #[serde(default = "default_restart_window", with = "humantime_serde_req")]
    pub restart_window: Duration,
}

fn default_stop_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_spares() -> usize {
    1
}
fn default_fork_server() -> bool {
    true
}
fn default_max_restarts() -> usize {
    5
}
fn default_restart_window() -> Duration {
    Duration::from_secs(60)
}

/// Durations with a default: the same text form as elsewhere ("30s").
mod humantime_serde_req {
    use std::time::Duration;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        super::humantime_serde_opt::deserialize(d)?.ok_or_else(|| serde::de::Error::custom("a duration such as \"30s\""))
    }

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        super::humantime_serialize::serialize(d, s)
    }
}

/// A supervised queue that cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperviseError {
    /// The command is empty.
    #[error("supervise.{queue}.command is empty")]
    EmptyCommand {
        /// The queue.
        queue: String,
    },
    /// mailman.cfg could not be read.
    #[error("supervise.{queue}: cannot read {path}: {error}")]
    ReadMailmanCfg {
        /// The queue.
        queue: String,
        /// The file.
        path: PathBuf,
        /// The cause.
        error: String,
    },
    /// `[runner.<name>] instances` is not the queue's slice count.
    #[error("supervise.{queue}: {path} sets [runner.{runner}] instances = {instances}, but the queue has {slices} slices; Mailman 3 takes the slice count from mailman.cfg, so make them equal")]
    InstancesMismatch {
        /// The queue.
        queue: String,
        /// mailman.cfg.
        path: PathBuf,
        /// The runner name.
        runner: String,
        /// What mailman.cfg says.
        instances: u32,
        /// The queue's slice count.
        slices: u32,
    },
    /// `instances` is not a power of two.
    #[error("supervise.{queue}: {path} sets [runner.{runner}] instances = {instances}, which Mailman 3 rejects: use a power of two")]
    NotPowerOfTwo {
        /// The queue.
        queue: String,
        /// mailman.cfg.
        path: PathBuf,
        /// The runner name.
        runner: String,
        /// What mailman.cfg says.
        instances: u32,
    },
    /// The queue's slice count is not a power of two, which Mailman 3 requires.
    #[error("supervise.{queue}: the queue has {slices} slices, but Mailman 3 slices a queue only into a power of two; set it with `qslicectl queue set {queue} --slices N` (1, 2, 4, 8, ...)")]
    SliceCountNotPowerOfTwo {
        /// The queue.
        queue: String,
        /// The queue's slice count.
        slices: u32,
    },
    /// A key the flavour needs is not set.
    #[error("supervise.{queue}.{key} is required with flavour = \"{flavour}\": {what}")]
    Missing {
        /// The queue.
        queue: String,
        /// The key.
        key: &'static str,
        /// The flavour.
        flavour: &'static str,
        /// What the key is.
        what: &'static str,
    },
    /// A file the configuration names does not exist.
    #[error("supervise.{queue}.{key}: {path} does not exist ({error})")]
    NoSuchFile {
        /// The queue.
        queue: String,
        /// The key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        error: String,
    },
    /// `command` was given to the slice-runner flavour.
    #[error("supervise.{queue}: flavour = \"mailman3\" runs qslice's own slice runner and takes python and config, not command; to keep running Mailman's runner command (it can shunt or send to bad/ the message it is stopped in, see docs/SUPERVISING.md) set flavour = \"mailman3-runner\"")]
    CommandNotUsed {
        /// The queue.
        queue: String,
    },
}

pub use qslice_proto::mailman::{mailman3_instances, mailman3_target};

impl SuperviseConfig {
    /// Checks the queue's config and, when `slices` is given, that the queue's slice count
    /// suits the flavour: a power of two for Mailman 3 and, for `mailman3-runner`, equal to
    /// mailman.cfg's `instances`.
    pub fn check(&self, queue: &str, slices: Option<u32>) -> Result<(), SuperviseError> {
        let queue_owned = || queue.to_owned();
        match self.flavour {
            Flavour::Mailman3 => {
                if !self.command.is_empty() {
                    return Err(SuperviseError::CommandNotUsed { queue: queue_owned() });
                }
                let need = |value: &Option<PathBuf>, key, what| {
                    let path = value.clone().ok_or(SuperviseError::Missing { queue: queue_owned(), key, flavour: "mailman3", what })?;
                    std::fs::metadata(&path).map(|_| ()).map_err(|e| SuperviseError::NoSuchFile { queue: queue_owned(), key, path, error: e.to_string() })
                };
                need(&self.python, "python", "the site's Mailman interpreter, e.g. /opt/mailman/venv/bin/python")?;
                need(&self.config, "config", "the site's mailman.cfg, e.g. /etc/mailman3/mailman.cfg")?;
                match slices {
                    Some(n) if !n.is_power_of_two() => Err(SuperviseError::SliceCountNotPowerOfTwo { queue: queue_owned(), slices: n }),
                    _ => Ok(()),
                }
            }
            Flavour::Mailman2 if self.command.is_empty() => Err(SuperviseError::EmptyCommand { queue: queue_owned() }),
            Flavour::Mailman2 => Ok(()),
            Flavour::Mailman3Runner => {
                if self.command.is_empty() {
                    return Err(SuperviseError::EmptyCommand { queue: queue_owned() });
                }
                let Some((path, runner)) = mailman3_target(&self.command) else { return Ok(()) };
                let text = std::fs::read_to_string(&path).map_err(|e| SuperviseError::ReadMailmanCfg { queue: queue_owned(), path: path.clone(), error: e.to_string() })?;
                let instances = mailman3_instances(&text, &runner);
                if !instances.is_power_of_two() {
                    return Err(SuperviseError::NotPowerOfTwo { queue: queue_owned(), path, runner, instances });
                }
                if let Some(slices) = slices.filter(|s| *s != instances) {
                    return Err(SuperviseError::InstancesMismatch { queue: queue_owned(), path, runner, instances, slices });
                }
                Ok(())
            }
        }
    }

    /// The Mailman runner name of a `mailman3` queue.
    pub fn runner_name<'a>(&'a self, queue: &'a str) -> &'a str {
        self.runner.as_deref().unwrap_or(queue)
    }
}

/// How a supervisor ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SupervisorExit {
    /// Stopped on request (release or shutdown); the child has exited.
    Stopped,
    /// Killed at once (fence); the child has exited.
    Killed,
    /// Too many crashes: the slice must be given up.
    GaveUp(String),
    /// The configuration no longer suits the slice (checked again before every restart:
    /// mailman.cfg or the files it names changed); given up until it does.
    Refused(String),
}

/// One supervised slice.
pub struct Supervised {
    /// The queue.
    pub queue: String,
    /// The slice.
    pub slice: u32,
    /// The queue's slice count.
    pub slices: u32,
    /// The configuration.
    pub cfg: SuperviseConfig,
    /// The queue directory (to tell busy from idle and to report shunted messages).
    pub dir: QueueDir,
    /// The claim's epoch, passed as QSLICE_EPOCH.
    pub epoch: i64,
    /// This node's id, passed as QSLICE_NODE.
    pub node: String,
    /// The incarnation's fence: its deadline is passed on to the slice runner.
    pub fence: std::sync::Arc<qslice_common::lease::Fence>,
}

fn substitute(arg: &str, s: &Supervised) -> String {
    arg.replace("{queue}", &s.queue).replace("{slices}", &s.slices.to_string()).replace("{slice}", &s.slice.to_string())
}

pub(crate) fn resolve_user(user: &str) -> Option<(u32, u32)> {
    if let Ok(uid) = user.parse::<u32>() {
        return Some((uid, uid));
    }
    let u = nix::unistd::User::from_name(user).ok()??;
    Some((u.uid.as_raw(), u.gid.as_raw()))
}

fn resolve_group(group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Some(gid);
    }
    Some(nix::unistd::Group::from_name(group).ok()??.gid.as_raw())
}

/// How a child process is set up: which environment variables pass through, and its
/// working directory, user and group.
pub(crate) struct ChildSetup<'a> {
    /// Names of the runner's environment variables the child gets; the rest is cleared.
    pub env: &'a [String],
    /// Working directory.
    pub workdir: Option<&'a Path>,
    /// User to run as (its primary group too).
    pub user: Option<&'a str>,
    /// Group to run as, over the user's.
    pub group: Option<&'a str>,
}

/// A child process as `cfg` says to run it; see [`child_command`].
pub(crate) fn command(cfg: &SuperviseConfig, argv: &[String], extra: &[(&str, String)]) -> std::io::Result<tokio::process::Command> {
    let setup = ChildSetup { env: &cfg.env, workdir: cfg.workdir.as_deref(), user: cfg.user.as_deref(), group: cfg.group.as_deref() };
    child_command(&setup, argv, extra)
}

/// A child process: only the listed environment plus `extra`, the working directory, user
/// and group, its own process group, dying with the runner and announced to the leash;
/// stdin closed, stdout and stderr piped.
pub(crate) fn child_command(setup: &ChildSetup<'_>, argv: &[String], extra: &[(&str, String)]) -> std::io::Result<tokio::process::Command> {
    let (program, args) = argv.split_first().ok_or_else(|| std::io::Error::other("empty command"))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).env_clear();
    for name in setup.env {
        if let Ok(value) = std::env::var(name) {
            cmd.env(name, value);
        }
    }
    for (name, value) in extra {
        cmd.env(name, value);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).process_group(0);
    if let Some(dir) = setup.workdir {
        cmd.current_dir(dir);
    }
    if let Some(user) = setup.user {
        let (uid, gid) = resolve_user(user).ok_or_else(|| std::io::Error::other(format!("unknown user {user:?}")))?;
        cmd.uid(uid).gid(gid);
    }
    if let Some(group) = setup.group {
        cmd.gid(resolve_group(group).ok_or_else(|| std::io::Error::other(format!("unknown group {group:?}")))?);
    }
    crate::child::die_with_parent(&mut cmd);
    Ok(cmd)
}

/// Logs each line of a child's output stream, tagged with the queue and `tag`.
pub(crate) fn log_lines<R: tokio::io::AsyncRead + Unpin + Send + 'static>(stream: R, queue: String, tag: String, name: &'static str) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(%queue, child = %tag, stream = name, "{line}");
        }
    });
}

impl Supervised {
    fn spawn(&self) -> std::io::Result<tokio::process::Child> {
        let argv: Vec<String> = self.cfg.command.iter().map(|a| substitute(a, self)).collect();
        let env = [
            ("QSLICE_QUEUE", self.queue.clone()),
            ("QSLICE_SLICE", self.slice.to_string()),
            ("QSLICE_SLICES", self.slices.to_string()),
            ("QSLICE_EPOCH", self.epoch.to_string()),
            ("QSLICE_NODE", self.node.clone()),
        ];
        let mut child = command(&self.cfg, &argv, &env)?.spawn()?;
        let tag = format!("slice {}", self.slice);
        if let Some(out) = child.stdout.take() {
            log_lines(out, self.queue.clone(), tag.clone(), "stdout");
        }
        if let Some(err) = child.stderr.take() {
            log_lines(err, self.queue.clone(), tag, "stderr");
        }
        Ok(child)
    }

    fn busy(&self) -> bool {
        match self.dir.scan(self.slices) {
            Ok(scan) => scan.in_flight.get(&self.slice).is_some_and(|v| !v.is_empty()),
            // Cannot tell: assume busy, the stop timeout bounds the wait.
            Err(_) => true,
        }
    }

    pub(crate) fn shunted(&self) -> usize {
        let shunt = self.dir.dir().parent().map(|root| root.join("shunt"));
        shunt.and_then(|d| std::fs::read_dir(d).ok()).map_or(0, |rd| rd.count())
    }

    /// Runs the slice's Mailman runner until `quiet` (stop quietly) or `kill` (at once).
    pub async fn run(self, quiet: CancellationToken, kill_now: CancellationToken) -> SupervisorExit {
        let mut crashes: VecDeque<Instant> = VecDeque::new();
        let mut backoff = Duration::from_millis(500);
        loop {
            // A restart is checked like the first start (mailman.cfg may have changed).
            if let Err(e) = self.cfg.check(&self.queue, Some(self.slices)) {
                return SupervisorExit::Refused(e.to_string());
            }
            let mut child = match self.spawn() {
                Ok(child) => child,
                Err(e) => {
                    tracing::error!(queue = %self.queue, slice = self.slice, error = %e, "cannot start the supervised runner");
                    if let Some(exit) = self.count_crash(&mut crashes, &format!("cannot start: {e}")) {
                        return exit;
                    }
                    if let Some(exit) = wait_backoff(&mut backoff, &quiet, &kill_now).await {
                        return exit;
                    }
                    continue;
                }
            };
            let pid = child.id().unwrap_or(0) as i32;
            let _leashed = crate::leash::Leashed::new(child.id());
            tracing::info!(queue = %self.queue, slice = self.slice, pid, "started supervised runner");
            tokio::select! {
                status = child.wait() => {
                    let status = status.map(|s| (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)));
                    let clean = matches!(status, Ok((Some(15), _)) | Ok((None, Some(15))));
                    // The group may hold leftovers of the runner: they go with it.
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    if clean {
                        tracing::warn!(queue = %self.queue, slice = self.slice, pid, "supervised runner stopped cleanly without being asked; starting it again");
                    } else {
                        let why = format!("exited with {status:?}");
                        tracing::warn!(queue = %self.queue, slice = self.slice, pid, %why, "supervised runner crashed");
                        metrics::counter!("qslice_runner_supervised_crashes_total", "queue" => self.queue.clone()).increment(1);
                        if let Some(exit) = self.count_crash(&mut crashes, &why) {
                            return exit;
                        }
                    }
                    if let Some(exit) = wait_backoff(&mut backoff, &quiet, &kill_now).await {
                        return exit;
                    }
                }
                _ = kill_now.cancelled() => {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    let _ = child.wait().await;
                    return SupervisorExit::Killed;
                }
                _ = quiet.cancelled() => {
                    self.quiet_stop(&mut child, pid, &kill_now).await;
                    return SupervisorExit::Stopped;
                }
            }
        }
    }

    pub(crate) fn count_crash(&self, crashes: &mut VecDeque<Instant>, why: &str) -> Option<SupervisorExit> {
        let now = Instant::now();
        crashes.push_back(now);
        while crashes.front().is_some_and(|t| now.duration_since(*t) > self.cfg.restart_window) {
            crashes.pop_front();
        }
        (crashes.len() > self.cfg.max_restarts)
            .then(|| SupervisorExit::GaveUp(format!("{} crashes within {} (last: {why})", crashes.len(), humantime::format_duration(self.cfg.restart_window))))
    }

    async fn quiet_stop(&self, child: &mut tokio::process::Child, pid: i32, kill_now: &CancellationToken) {
        let deadline = Instant::now() + self.cfg.stop_timeout;
        let shunted_before = self.shunted();
        let target = Pid::from_raw(pid);
        let signalled = loop {
            if Instant::now() >= deadline || kill_now.is_cancelled() {
                break false;
            }
            match self.cfg.flavour {
                Flavour::Mailman2 => {
                    let _ = kill(target, Signal::SIGTERM);
                    break true;
                }
                Flavour::Mailman3 | Flavour::Mailman3Runner => {
                    // Frozen, it cannot pick up a message between the look and the signal.
                    let _ = kill(target, Signal::SIGSTOP);
                    if !self.busy() {
                        let _ = kill(target, Signal::SIGTERM);
                        let _ = kill(target, Signal::SIGCONT);
                        break true;
                    }
                    let _ = kill(target, Signal::SIGCONT);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let exited = signalled
            && tokio::select! {
                r = tokio::time::timeout_at(deadline, child.wait()) => r.is_ok(),
                _ = kill_now.cancelled() => false,
            };
        if !exited {
            tracing::warn!(queue = %self.queue, slice = self.slice, pid, timeout = ?self.cfg.stop_timeout, "supervised runner did not stop in time; killing it (its .bak is recovered by the next runner of the slice)");
        }
        let _ = killpg(target, Signal::SIGKILL);
        let _ = child.wait().await;
        let shunted = self.shunted().saturating_sub(shunted_before);
        if shunted > 0 {
            tracing::warn!(queue = %self.queue, slice = self.slice, shunted, "messages were shunted while the supervised runner stopped");
        }
        tracing::info!(queue = %self.queue, slice = self.slice, pid, "supervised runner stopped");
    }
}

pub(crate) async fn wait_backoff(backoff: &mut Duration, quiet: &CancellationToken, kill_now: &CancellationToken) -> Option<SupervisorExit> {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(30));
    tokio::select! {
        _ = tokio::time::sleep(wait) => None,
        _ = quiet.cancelled() => Some(SupervisorExit::Stopped),
        _ = kill_now.cancelled() => Some(SupervisorExit::Killed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_mailman3_command_names_its_config_and_runner() {
        let cmd = argv(&["/opt/mailman/bin/runner", "-C", "/etc/mailman3/mailman.cfg", "-r", "in:{slice}:{slices}"]);
        assert_eq!(mailman3_target(&cmd), Some((PathBuf::from("/etc/mailman3/mailman.cfg"), "in".into())));
        let cmd = argv(&["runner", "--config=/m.cfg", "--runner=out:{slice}:{slices}"]);
        assert_eq!(mailman3_target(&cmd), Some((PathBuf::from("/m.cfg"), "out".into())));
        assert_eq!(mailman3_target(&argv(&["qrunner", "--runner=Incoming:{slice}:{slices}"])), None);
    }

    #[test]
    fn instances_are_read_from_the_runner_section() {
        let cfg = "[mailman]\nsite_owner: a@b\n\n[runner.in]\n# comment\ninstances: 4\n\n[runner.out]\ninstances = 8\n";
        assert_eq!(mailman3_instances(cfg, "in"), 4);
        assert_eq!(mailman3_instances(cfg, "out"), 8);
        assert_eq!(mailman3_instances(cfg, "virgin"), 1, "Mailman's default");
    }

    #[test]
    fn a_mismatched_or_odd_instance_count_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mailman.cfg");
        let cfg = |instances: u32| {
            SuperviseConfig {
                flavour: Flavour::Mailman3Runner,
                command: argv(&["runner", "-C", path.to_str().expect("utf8"), "-r", "in:{slice}:{slices}"]),
                python: None,
                config: None,
                runner: None,
                spares: 1,
                fork_server: true,
                env: vec![],
                workdir: None,
                user: None,
                group: None,
                stop_timeout: Duration::from_secs(1),
                max_restarts: 1,
                restart_window: Duration::from_secs(1),
            }
            .check("in", Some(4))
            .map_err(|e| (instances, e.to_string()))
        };
        std::fs::write(&path, "[runner.in]\ninstances: 4\n").expect("write");
        assert_eq!(cfg(4), Ok(()));
        std::fs::write(&path, "[runner.in]\ninstances: 2\n").expect("write");
        let (_, err) = cfg(2).expect_err("mismatch");
        assert!(err.contains("instances = 2") && err.contains("4 slices"), "{err}");
        std::fs::write(&path, "[runner.in]\ninstances: 3\n").expect("write");
        let (_, err) = cfg(3).expect_err("odd");
        assert!(err.contains("power of two"), "{err}");
        std::fs::remove_file(&path).expect("rm");
        let (_, err) = cfg(0).expect_err("missing");
        assert!(err.contains("cannot read"), "{err}");
    }
}
