//! Built-in handlers: what happens to an entry once it is taken (`.bak`).
//!
//! - `exec`: runs a command per entry (an argv array, never a shell). Exit 0 finishes the
//!   entry; exit 75 (EX_TEMPFAIL) puts it back after a backoff; any other exit, a signal or
//!   a timeout preserves it in `bad/`.
//! - `worker`: one long-lived coprocess per claimed slice (and epoch), started on the
//!   slice's first entry, so that spawning a process per message is not the ceiling. The
//!   runner writes one entry path per line on its stdin; it answers one line per entry:
//!   `ok` (finish), `retry` (back to the queue after the backoff) or `fail <reason>`
//!   (preserve in `bad/`). Any other answer, an exit or a timeout preserves the entry and
//!   the next entry gets a fresh coprocess. The coprocess is stopped when its slice is
//!   released, and killed when the runner fences itself.
//! - `move`: moves the entry into another queue directory as `.pck` (a pipeline stage).
//!
//! Children run in their own process group and die with the runner (PR_SET_PDEATHSIG), and
//! a handler whose future is dropped (fence, forced stop) kills its whole process group.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::config::{HandlerConfig, HandlerKind};

/// Exit code that asks for a retry (sysexits EX_TEMPFAIL).
pub const EX_TEMPFAIL: i32 = 75;

/// One entry handed to a handler.
#[derive(Clone, Debug)]
pub struct Job {
    /// The `.bak` file.
    pub path: PathBuf,
    /// The entry's file base `<TIME>+<DIGEST>`.
    pub filebase: String,
    /// The queue.
    pub queue: String,
    /// The slice.
    pub slice: u32,
    /// The queue's slice count.
    pub slices: u32,
    /// The claim's epoch (its create revision): a fencing token that only grows.
    pub epoch: i64,
    /// This runner's node id.
    pub node: String,
}

/// What the handler decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: unlink the `.bak`.
    Finished,
    /// Done by moving the entry elsewhere: nothing left to do.
    Moved(PathBuf),
    /// Temporary failure: queue it again after the backoff.
    Retry,
    /// Permanent failure: preserve in `bad/` with this reason.
    Failed(String),
}

/// A configured handler.
#[derive(Clone, Debug)]
pub struct Handler {
    cfg: HandlerConfig,
    /// The worker coprocesses, one per (queue, slice, epoch); empty for other kinds.
    workers: Arc<Mutex<Workers>>,
}

type WorkerKey = (String, u32, i64);
/// Each worker's coprocess, started on first use.
type Workers = HashMap<WorkerKey, Arc<tokio::sync::Mutex<Option<Coprocess>>>>;

/// A running worker coprocess. Dropping it kills its whole process group.
#[derive(Debug)]
struct Coprocess {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    _group: GroupKiller,
}

impl Handler {
    /// A handler from its configuration.
    pub fn new(cfg: HandlerConfig) -> Handler {
        Handler { cfg, workers: Arc::default() }
    }

    /// Whether an entry is done at the handler's first poll (the move handler's one
    /// rename): nothing to wait for, so no task of its own is worth it.
    pub fn done_at_once(&self) -> bool {
        self.cfg.kind == HandlerKind::Move
    }

    /// Whether the handler reads the entry's file (all but the move handler, which only
    /// renames it): a take opens the file first only for those.
    pub fn reads_entries(&self) -> bool {
        self.cfg.kind != HandlerKind::Move
    }

    /// The configured retry backoff.
    pub fn retry_backoff(&self) -> Duration {
        self.cfg.retry_backoff
    }

    /// Handles one entry. Dropping the future kills any child process.
    pub async fn handle(&self, job: &Job) -> Outcome {
        match self.cfg.kind {
            HandlerKind::Exec => self.exec(job).await,
            HandlerKind::Move => move_entry(job, self.cfg.move_to.as_deref().expect("validated: move_to is set")),
            HandlerKind::Worker => self.worker(job).await,
        }
    }

    /// Stops the worker coprocesses of a released slice: stdin is closed so that the
    /// worker can exit by itself; after `grace` it is killed.
    pub async fn slice_released(&self, queue: &str, slice: u32, grace: Duration) {
        let slots: Vec<_> = {
            let mut workers = self.workers.lock().expect("workers lock");
            let keys: Vec<WorkerKey> = workers.keys().filter(|(q, s, _)| q == queue && *s == slice).cloned().collect();
            keys.into_iter().filter_map(|k| workers.remove(&k)).collect()
        };
        for slot in slots {
            if let Some(coprocess) = slot.lock().await.take() {
                let Coprocess { mut child, stdin, stdout: _stdout, _group } = coprocess;
                drop(stdin);
                if tokio::time::timeout(grace, child.wait()).await.is_err() {
                    tracing::warn!(%queue, slice, "worker did not exit after its stdin closed; killing it");
                }
            }
        }
    }

    /// Kills every worker coprocess at once (the runner fenced itself).
    pub fn kill_all(&self) {
        // Dropping a coprocess kills its process group; one busy with an entry is killed
        // when its cancelled handler future drops it.
        let slots: Vec<_> = self.workers.lock().expect("workers lock").drain().map(|(_, v)| v).collect();
        for slot in slots {
            if let Ok(mut guard) = slot.try_lock() {
                guard.take();
            }
        }
    }

    async fn worker(&self, job: &Job) -> Outcome {
        let slot = {
            let mut workers = self.workers.lock().expect("workers lock");
            workers.entry((job.queue.clone(), job.slice, job.epoch)).or_default().clone()
        };
        let mut guard = slot.lock().await;
        // Taken out for the exchange: if this future is dropped midway, the coprocess is
        // dropped (killed) with it rather than left with an unread answer.
        let mut coprocess = match guard.take() {
            Some(c) => c,
            None => match self.start_worker(job) {
                Ok(c) => c,
                Err(e) => return Outcome::Failed(e),
            },
        };
        let exchange = async {
            let line = format!("{}\n", job.path.to_string_lossy());
            coprocess.stdin.write_all(line.as_bytes()).await.map_err(|e| format!("writing to the worker failed: {e}"))?;
            coprocess.stdin.flush().await.map_err(|e| format!("writing to the worker failed: {e}"))?;
            match coprocess.stdout.next_line().await {
                Ok(Some(answer)) => Ok(answer),
                Ok(None) => Err("the worker exited without answering".to_owned()),
                Err(e) => Err(format!("reading the worker's answer failed: {e}")),
            }
        };
        let answer = match tokio::time::timeout(self.cfg.timeout, exchange).await {
            Err(_) => return Outcome::Failed(format!("worker timed out after {}", humantime::format_duration(self.cfg.timeout))),
            Ok(Err(e)) => return Outcome::Failed(e),
            Ok(Ok(answer)) => answer,
        };
        let answer = answer.trim();
        let outcome = match answer.split_once(' ').map_or((answer, ""), |(w, r)| (w, r.trim())) {
            ("ok", "") => Outcome::Finished,
            ("retry", "") => Outcome::Retry,
            ("fail", reason) => Outcome::Failed(format!("worker failed the entry: {}", if reason.is_empty() { "no reason given" } else { reason })),
            _ => return Outcome::Failed(format!("worker answered {answer:?}; expected ok, retry or fail <reason>")),
        };
        *guard = Some(coprocess);
        outcome
    }

    fn start_worker(&self, job: &Job) -> Result<Coprocess, String> {
        let argv: Vec<String> = self.cfg.command.iter().map(|a| substitute(a, job)).collect();
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]).envs(job_env(job).into_iter().filter(|(k, _)| *k != "QSLICE_PATH")).stdin(Stdio::piped()).stdout(Stdio::piped()).kill_on_drop(true).process_group(0);
        crate::child::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| format!("cannot start worker {:?}: {e}", argv[0]))?;
        let stdin = child.stdin.take().ok_or("worker has no stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("worker has no stdout")?).lines();
        tracing::info!(queue = %job.queue, slice = job.slice, epoch = job.epoch, pid = child.id(), "started worker coprocess");
        let group = GroupKiller::new(child.id());
        Ok(Coprocess { child, stdin, stdout, _group: group })
    }

    async fn exec(&self, job: &Job) -> Outcome {
        let argv: Vec<String> = self.cfg.command.iter().map(|a| substitute(a, job)).collect();
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]).envs(job_env(job)).stdin(Stdio::null()).kill_on_drop(true).process_group(0);
        crate::child::die_with_parent(&mut cmd);
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => return Outcome::Failed(format!("cannot start {:?}: {e}", argv[0])),
        };
        let mut group = GroupKiller::new(child.id());
        let result = tokio::time::timeout(self.cfg.timeout, child.wait_with_output()).await;
        let outcome = match result {
            Err(_) => Outcome::Failed(format!("timed out after {}", humantime::format_duration(self.cfg.timeout))),
            Ok(Err(e)) => Outcome::Failed(format!("waiting for the handler failed: {e}")),
            Ok(Ok(out)) => match out.status.code() {
                Some(0) => Outcome::Finished,
                Some(EX_TEMPFAIL) => Outcome::Retry,
                Some(code) => Outcome::Failed(format!("handler exited with status {code}")),
                None => Outcome::Failed(format!("handler was killed: {}", out.status)),
            },
        };
        // The child exited by itself: its group needs no kill (and its pid may be reused).
        if !matches!(outcome, Outcome::Failed(ref r) if r.starts_with("timed out")) {
            group.pid = None;
        }
        outcome
    }
}

/// Kills a child's whole process group when dropped (the handler was cancelled or timed
/// out); the group is on the leash meanwhile.
#[derive(Debug)]
struct GroupKiller {
    pid: Option<u32>,
    _leash: crate::leash::Leashed,
}

impl GroupKiller {
    fn new(pid: Option<u32>) -> GroupKiller {
        GroupKiller { pid, _leash: crate::leash::Leashed::new(pid) }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Replaces `{path}` `{queue}` `{slice}` `{slices}` `{epoch}` `{node}` in one argument.
pub fn substitute(arg: &str, job: &Job) -> String {
    arg.replace("{path}", &job.path.to_string_lossy())
        .replace("{queue}", &job.queue)
        .replace("{slices}", &job.slices.to_string())
        .replace("{slice}", &job.slice.to_string())
        .replace("{epoch}", &job.epoch.to_string())
        .replace("{node}", &job.node)
}

/// The same values as `QSLICE_*` environment variables.
pub fn job_env(job: &Job) -> Vec<(&'static str, String)> {
    vec![
        ("QSLICE_PATH", job.path.to_string_lossy().into_owned()),
        ("QSLICE_QUEUE", job.queue.clone()),
        ("QSLICE_SLICE", job.slice.to_string()),
        ("QSLICE_SLICES", job.slices.to_string()),
        ("QSLICE_EPOCH", job.epoch.to_string()),
        ("QSLICE_NODE", job.node.clone()),
    ]
}

fn move_entry(job: &Job, target_dir: &Path) -> Outcome {
    let target = target_dir.join(format!("{}.pck", job.filebase));
    match std::fs::rename(&job.path, &target) {
        Ok(()) => Outcome::Moved(target),
        Err(e) => Outcome::Failed(format!("cannot move to {}: {e}", target_dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(path: &Path) -> Job {
        Job { path: path.to_owned(), filebase: "1+0696655d510e3bad34fee55513eec06ed9b3413c".into(), queue: "in".into(), slice: 2, slices: 4, epoch: 42, node: "n1".into() }
    }

    fn exec(command: &[&str], timeout: Duration) -> Handler {
        Handler::new(HandlerConfig {
            kind: HandlerKind::Exec,
            command: command.iter().map(|s| s.to_string()).collect(),
            timeout,
            retry_backoff: Duration::from_millis(10),
            move_to: None,
        })
    }

    #[tokio::test]
    async fn exec_passes_placeholders_and_environment_without_a_shell() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = tmp.path().join("out");
        let script = "echo \"$1 $QSLICE_QUEUE $QSLICE_SLICE/$QSLICE_SLICES $QSLICE_EPOCH $QSLICE_NODE $QSLICE_PATH\" > \"$2\"";
        let h = exec(&["/bin/sh", "-c", script, "sh", "{queue}:{slice}:{slices}:{epoch}:{node}", out.to_str().expect("utf8")], Duration::from_secs(30));
        let j = job(Path::new("/spool/in/x.bak"));
        assert_eq!(h.handle(&j).await, Outcome::Finished);
        let text = std::fs::read_to_string(&out).expect("handler wrote");
        assert_eq!(text.trim(), "in:2:4:42:n1 in 2/4 42 n1 /spool/in/x.bak");
        // An argument with shell syntax is passed as it is, never interpreted.
        let h = exec(&["/bin/echo", "$(touch {path})"], Duration::from_secs(30));
        let marker = tmp.path().join("marker");
        assert_eq!(h.handle(&job(&marker)).await, Outcome::Finished);
        assert!(!marker.exists());
    }

    #[tokio::test]
    async fn exit_codes_map_to_outcomes() {
        let j = job(Path::new("/nonexistent"));
        assert_eq!(exec(&["/bin/sh", "-c", "exit 75"], Duration::from_secs(30)).handle(&j).await, Outcome::Retry);
        let failed = exec(&["/bin/sh", "-c", "exit 3"], Duration::from_secs(30)).handle(&j).await;
        assert_eq!(failed, Outcome::Failed("handler exited with status 3".into()));
        let killed = exec(&["/bin/sh", "-c", "kill -9 $$"], Duration::from_secs(30)).handle(&j).await;
        assert!(matches!(killed, Outcome::Failed(ref r) if r.contains("killed")), "{killed:?}");
        let missing = exec(&["/nonexistent/handler"], Duration::from_secs(30)).handle(&j).await;
        assert!(matches!(missing, Outcome::Failed(ref r) if r.contains("cannot start")), "{missing:?}");
    }

    #[tokio::test]
    async fn a_handler_that_overruns_is_killed_with_its_children() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let pidfile = tmp.path().join("pid");
        let script = format!("sleep 600 & echo $! > {}; wait", pidfile.display());
        let h = exec(&["/bin/sh", "-c", &script], Duration::from_millis(500));
        let outcome = h.handle(&job(Path::new("/x"))).await;
        assert!(matches!(outcome, Outcome::Failed(ref r) if r.starts_with("timed out")), "{outcome:?}");
        let pid: i32 = std::fs::read_to_string(&pidfile).expect("pid").trim().parse().expect("number");
        // The grandchild was in the handler's process group: it is gone (or a zombie
        // reaped by init) shortly after.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "grandchild {pid} still runs");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn move_puts_the_entry_into_the_target_queue_as_pck() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let bak = tmp.path().join("x.bak");
        std::fs::write(&bak, b"m").expect("write");
        std::fs::create_dir(tmp.path().join("out")).expect("mkdir");
        let j = job(&bak);
        let outcome = move_entry(&j, &tmp.path().join("out"));
        let target = tmp.path().join("out").join(format!("{}.pck", j.filebase));
        assert_eq!(outcome, Outcome::Moved(target.clone()));
        assert_eq!(std::fs::read(target).expect("moved"), b"m");
        let failed = move_entry(&j, &tmp.path().join("missing"));
        assert!(matches!(failed, Outcome::Failed(ref r) if r.contains("missing")), "{failed:?}");
    }

    fn worker_handler(script: &str, timeout: Duration) -> Handler {
        Handler::new(HandlerConfig {
            kind: HandlerKind::Worker,
            command: vec!["/bin/sh".into(), "-c".into(), script.into(), "worker".into(), "{queue}/{slice}".into()],
            timeout,
            retry_backoff: Duration::from_millis(10),
            move_to: None,
        })
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    #[tokio::test]
    async fn one_worker_serves_a_slice_line_by_line() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let starts = tmp.path().join("starts");
        let script = format!(
            "echo \"$$ $1 $QSLICE_EPOCH\" >> {}; while read p; do case \"$p\" in *ok*) echo ok;; *retry*) echo retry;; *) echo \"fail no good: $p\";; esac; done",
            starts.display()
        );
        let h = worker_handler(&script, Duration::from_secs(30));
        assert_eq!(h.handle(&job(Path::new("/q/ok-1.bak"))).await, Outcome::Finished);
        assert_eq!(h.handle(&job(Path::new("/q/retry-2.bak"))).await, Outcome::Retry);
        assert_eq!(h.handle(&job(Path::new("/q/bad-3.bak"))).await, Outcome::Failed("worker failed the entry: no good: /q/bad-3.bak".into()));
        assert_eq!(h.handle(&job(Path::new("/q/ok-4.bak"))).await, Outcome::Finished);
        let started = lines(&starts);
        assert_eq!(started.len(), 1, "one coprocess for all entries of the slice: {started:?}");
        assert!(started[0].ends_with(" in/2 42"), "placeholders and environment: {started:?}");
        // Another epoch of the slice (a new claim) gets its own coprocess.
        let mut later = job(Path::new("/q/ok-5.bak"));
        later.epoch = 43;
        assert_eq!(h.handle(&later).await, Outcome::Finished);
        assert_eq!(lines(&starts).len(), 2);
        // Releasing the slice closes its coprocesses' stdin; they exit.
        let pid: i32 = started[0].split(' ').next().expect("pid").parse().expect("number");
        h.slice_released("in", 2, Duration::from_secs(10)).await;
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z"));
    }

    #[tokio::test]
    async fn a_misbehaving_worker_fails_the_entry_and_is_replaced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let starts = tmp.path().join("starts");
        // Answers garbage to the first entry, exits on the second, hangs on the third.
        let script = format!("echo $$ >> {}; n=$(wc -l < {}); read p; case $n in 1) echo bogus; read q;; 2) exit 3;; *) sleep 600;; esac", starts.display(), starts.display());
        let h = worker_handler(&script, Duration::from_millis(500));
        let garbage = h.handle(&job(Path::new("/q/a.bak"))).await;
        assert_eq!(garbage, Outcome::Failed("worker answered \"bogus\"; expected ok, retry or fail <reason>".into()));
        let exited = h.handle(&job(Path::new("/q/b.bak"))).await;
        assert_eq!(exited, Outcome::Failed("the worker exited without answering".into()));
        let hung = h.handle(&job(Path::new("/q/c.bak"))).await;
        assert!(matches!(hung, Outcome::Failed(ref r) if r.starts_with("worker timed out")), "{hung:?}");
        assert_eq!(lines(&starts).len(), 3, "each failure gets a fresh coprocess");
    }
}
