//! A real Mailman 3 from PyPI for end-to-end tests and benchmarks: a venv with
//! `mailman==3.3.10` and its dependencies pinned (tests/fixtures/mailman3-requirements.txt),
//! built once per target dir and reused, and throwaway sites
//! (tests/fixtures/mailman3_site.py: SQLite, NullMTA, one list, one member) whose posts
//! are enqueued through Mailman's own Switchboard and counted by their ACCEPT lines.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::Deserialize;

use crate::cluster::Spool;
use crate::wait::Wait;

/// The Mailman release the tests run against.
pub const MAILMAN_VERSION: &str = "3.3.10";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Where the venv lives: under the target dir, so that it is built once and reused.
fn venv_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("QSLICE_MAILMAN3_VENV") {
        return PathBuf::from(dir);
    }
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join(format!("mailman-{MAILMAN_VERSION}-venv"))
}

/// The venv's python, building the venv first if it is not there (one builder at a
/// time: concurrent tests wait on a lock file). Needs PyPI; fails, never skips, without.
pub fn python() -> Result<PathBuf> {
    let dir = venv_dir();
    let python = dir.join("bin/python");
    let done = dir.join(".qslice-complete");
    // The marker holds the requirements the venv was built from: a changed list rebuilds it.
    let requirements = std::fs::read(fixtures().join("mailman3-requirements.txt")).context("read mailman3-requirements.txt")?;
    let complete = || std::fs::read(&done).is_ok_and(|built| built == requirements);
    if complete() {
        return Ok(python);
    }
    std::fs::create_dir_all(dir.parent().context("venv dir has a parent")?)?;
    let lock_path = dir.with_extension("lock");
    let lock = File::create(&lock_path).with_context(|| format!("create {}", lock_path.display()))?;
    let _lock = Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| anyhow::anyhow!("lock {}: {e}", lock_path.display()))?;
    if complete() {
        return Ok(python);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let run = |cmd: &mut Command, what: &str| -> Result<()> {
        let out = cmd.output().with_context(|| format!("run {what}"))?;
        if !out.status.success() {
            bail!("{what} failed ({}): {}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&dir), "python3 -m venv")?;
    run(
        Command::new(&python).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"]).arg(fixtures().join("mailman3-requirements.txt")),
        "pip install mailman (needs PyPI)",
    )?;
    std::fs::write(&done, &requirements)?;
    Ok(python)
}

/// A throwaway Mailman 3 site inside a test spool: the spool root is the site's queue
/// directory, so qslice-runner and Mailman see the same `in/`, `shunt/` and `bad/`.
pub struct Site {
    /// The test spool (its root is a link to the site's `var/queue`).
    pub spool: Spool,
    /// The site's directory.
    pub dir: PathBuf,
    /// The venv's python.
    pub python: PathBuf,
    /// The site's mailman.cfg.
    pub config: PathBuf,
    posters: Vec<Child>,
}

/// A post's ACCEPT line: when, and which process.
#[derive(Clone, Debug, Deserialize)]
pub struct Accept(pub f64, pub u32);

/// One slice runner process, from its start and stop lines in Mailman's runner log.
#[derive(Clone, Debug, Deserialize)]
pub struct RunnerLine {
    /// The qslice node that ran it.
    pub node: String,
    /// The slice.
    pub slice: u32,
    /// The slice count.
    pub count: u32,
    /// The claim's epoch.
    pub epoch: i64,
    /// When it started (Unix seconds).
    pub started: f64,
    /// When it stopped, if it said so.
    pub stopped: Option<f64>,
}

/// What the site's logs and queues say.
#[derive(Clone, Debug, Deserialize)]
pub struct Report {
    /// Every ACCEPT line per Message-ID.
    pub accepts: BTreeMap<String, Vec<Accept>>,
    /// Slice runner processes by pid.
    pub runners: BTreeMap<String, RunnerLine>,
    /// Messages in shunt/.
    pub shunt: usize,
    /// Files in bad/.
    pub bad: usize,
    /// What is left in `in/`.
    pub queue: QueueLeft,
    /// Error-log lines about skipped or shunted messages.
    pub errors: usize,
}

/// `.pck` and `.bak` files left in a queue.
#[derive(Clone, Debug, Deserialize)]
pub struct QueueLeft {
    /// Waiting entries.
    pub pck: usize,
    /// Entries in flight.
    pub bak: usize,
}

impl Report {
    /// The runner process of an ACCEPT line.
    pub fn runner_of(&self, accept: &Accept) -> Option<&RunnerLine> {
        self.runners.get(&accept.1.to_string())
    }

    /// Posts accepted more than once, with their counts.
    pub fn doubled(&self) -> BTreeMap<&str, usize> {
        self.accepts.iter().filter(|(_, a)| a.len() > 1).map(|(id, a)| (id.as_str(), a.len())).collect()
    }
}

impl Site {
    /// A new site (list `test@example.com` with one member) in a new test spool.
    pub fn new() -> Result<Site> {
        let python = python()?;
        let spool = Spool::new(&[])?;
        let dir = spool.scratch("mailman");
        let out = Command::new(&python).arg(fixtures().join("mailman3_site.py")).arg("init").arg(&dir).output()?;
        if !out.status.success() {
            bail!("mailman3_site.py init failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        let queue_dir = dir.join("var/queue");
        if !queue_dir.join("in").is_dir() {
            bail!("the site has no {}", queue_dir.join("in").display());
        }
        // Spool::new(&[]) makes no queue directory, so its root may not exist yet.
        let _ = std::fs::remove_dir(spool.root());
        std::os::unix::fs::symlink(&queue_dir, spool.root())?;
        let config = dir.join("mailman.cfg");
        Ok(Site { spool, dir, python, config, posters: Vec::new() })
    }

    /// The `[supervise.in]` table for qslice's slice runner on this site, plus `extra`.
    pub fn supervise_toml(&self, extra: &str) -> String {
        format!("[supervise.in]\npython = {:?}\nconfig = {:?}\nstop_timeout = \"30s\"\n{extra}", self.python.display().to_string(), self.config.display().to_string())
    }

    /// Writes a runner config file supervising `in` on this site; returns its path.
    pub fn runner_config(&self, name: &str, extra: &str) -> Result<String> {
        let path = self.spool.scratch(name);
        std::fs::write(&path, self.supervise_toml(extra))?;
        Ok(path.to_string_lossy().into_owned())
    }

    fn post_command(&self, count: usize, start: usize, rate: Option<f64>) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg(fixtures().join("mailman3_site.py")).arg("post").arg(&self.dir).arg(count.to_string()).args(["--start", &start.to_string()]);
        if let Some(rate) = rate {
            cmd.args(["--rate", &rate.to_string()]);
        }
        cmd
    }

    /// Enqueues `count` posts numbered from `start`, now.
    pub fn post(&self, count: usize, start: usize) -> Result<()> {
        let out = self.post_command(count, start, None).output()?;
        if !out.status.success() {
            bail!("posting failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Writes `count` posts numbered from `start` into a staging directory of their own
    /// (not the queue); returns their `.pck` files, for a test to rename into `in/`.
    pub fn stage(&self, count: usize, start: usize) -> Result<Vec<PathBuf>> {
        let stage = self.spool.scratch(&format!("stage-{start}"));
        let out = self.post_command(count, start, None).arg("--stage").arg(&stage).output()?;
        if !out.status.success() {
            bail!("posting failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&stage)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "pck") {
                files.push(path);
            }
        }
        Ok(files)
    }

    /// Enqueues `count` posts numbered from `start` so that they appear in the queue at
    /// once: written to a staging directory, then renamed into `in/` (a backlog no single
    /// poster could build against running slice runners).
    pub fn post_backlog(&self, count: usize, start: usize) -> Result<()> {
        let stage = self.spool.scratch("stage");
        let out = self.post_command(count, start, None).arg("--stage").arg(&stage).output()?;
        if !out.status.success() {
            bail!("posting failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let queue = self.dir.join("var/queue/in");
        for entry in std::fs::read_dir(&stage)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "pck") {
                std::fs::rename(&path, queue.join(path.file_name().context("a file name")?))?;
            }
        }
        Ok(())
    }

    /// Starts enqueueing `count` posts numbered from `start` at `rate` per second, in the
    /// background (stopped when the site is dropped).
    pub fn post_in_background(&mut self, count: usize, start: usize, rate: f64) -> Result<()> {
        let child = self.post_command(count, start, Some(rate)).stdout(Stdio::null()).spawn()?;
        self.posters.push(child);
        Ok(())
    }

    /// Whether every background poster has finished.
    pub fn posting_done(&mut self) -> bool {
        self.posters.iter_mut().all(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Waits (bounded) until `posts` posts were accepted and the queue is empty; the
    /// report then, or an error that says how far it got.
    pub async fn all_accepted(&self, posts: usize, timeout: std::time::Duration) -> Result<Report> {
        let mut last = None;
        // Each look runs a Python report over the site's logs: not more often than this.
        let every = std::time::Duration::from_millis(200);
        let what = format!("{posts} posts accepted with the queue empty");
        let accepted = Wait::new(timeout, &what)
            .every(every)
            .poll_async(|| {
                let look = self.report().map(|r| {
                    let done = r.accepts.len() >= posts && r.queue.pck == 0 && r.queue.bak == 0;
                    if done {
                        Some(r)
                    } else {
                        last = Some(r);
                        None
                    }
                });
                std::future::ready(look)
            })
            .await;
        accepted.map_err(|e| match last {
            Some(r) => anyhow::anyhow!("{e}: {} of {posts} posts accepted; queue {:?}, {} shunted, {} in bad/", r.accepts.len(), r.queue, r.shunt, r.bad),
            None => e,
        })
    }

    /// [`Site::all_accepted`] for a test without a runtime.
    pub fn all_accepted_blocking(&self, posts: usize, timeout: std::time::Duration) -> Result<Report> {
        let mut last = None;
        crate::wait::wait_for(timeout, &format!("{posts} posts accepted with the queue empty"), || {
            let report = self.report().ok();
            let done = report.as_ref().is_some_and(|r| r.accepts.len() >= posts && r.queue.pck == 0 && r.queue.bak == 0);
            last = report;
            done
        })?;
        last.context("a report")
    }

    /// What the logs and queues say now.
    pub fn report(&self) -> Result<Report> {
        let out = Command::new(&self.python).arg(fixtures().join("mailman3_site.py")).arg("report").arg(&self.dir).output()?;
        if !out.status.success() {
            bail!("report failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).with_context(|| format!("report printed no JSON: {}", String::from_utf8_lossy(&out.stdout)))
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for c in &mut self.posters {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
