//! Test fixtures for qslice's end-to-end tests and benchmark programs.
//!
//! # Layout
//! - [`Etcd`]: a real etcd process on free loopback ports with a temporary data dir;
//!   it can be stopped, restarted, paused and resumed, and is killed (and its data
//!   removed) on drop, also when a test panics.
//! - [`Proc`]: a qslice binary (or any program) run as a child with its output captured
//!   to a log file, killed on drop.
//! - [`wait`]: the one bounded wait ([`wait_for`], [`wait_for_async`], [`wait::Wait`]):
//!   a poll for a condition with a message naming what did not happen; tests use it
//!   instead of sleeps.
//! - [`testcluster::TestCluster`]: etcd, coordinators, runners and queues for one test,
//!   started by a builder, waited for until ready, and stopped on drop.
//! - [`mailman3`]: a real Mailman 3 from PyPI (a venv built once) and small SQLite sites;
//!   [`site`]: a whole site on PostgreSQL with a recording SMTP server.

pub mod benchkit;
pub mod checker;
pub mod cluster;
pub mod etcd_cluster;
pub mod freezer;
pub mod mailman3;
pub mod nfs;
pub mod pki;
pub mod site;
pub mod testcluster;
pub mod wait;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub use wait::{wait_for, wait_for_async};

/// Nanoseconds since the Unix epoch, by the host's clock.
pub fn now_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos()
}

/// Runs qslicectl against the coordinator's admin API at `admin` (allowing it `timeout`,
/// e.g. "120s", for a drain); it must succeed. Its standard output.
pub fn qslicectl(admin: &str, timeout: &str, args: &[&str]) -> String {
    let out = Command::new(qslice_bin("qslicectl").expect("built")).args(["--coordinator", admin, "--timeout", timeout]).args(args).output().expect("run qslicectl");
    assert!(out.status.success(), "qslicectl {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free TCP port on 127.0.0.1 (free when asked; callers retry if it is taken by then).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// Makes the child die with the thread that spawned it (see the test beds' own).
pub(crate) fn die_with_parent(cmd: &mut Command) {
    qslice_testbeds::die_with_parent(cmd);
}

/// How long etcd may take to answer after start on a loaded machine.
const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A real etcd (`/usr/bin/etcd`, or `$QSLICE_TEST_ETCD`) for one test.
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    starts: u32,
    /// Another address etcd's client port listens on (a test network namespace's peer).
    extra_ip: Option<String>,
}

impl Etcd {
    /// Starts etcd on free loopback ports with fast election settings (heartbeat 50 ms,
    /// election timeout 500 ms, which lets it grant 1 s leases) and waits until it answers.
    pub fn start() -> Result<Etcd> {
        Etcd::start_listening_also_on(None)
    }

    /// Like [`Etcd::start`], and also serving clients on `extra_ip` (for a runner in a
    /// network namespace the test made).
    pub fn start_listening_also_on(extra_ip: Option<&str>) -> Result<Etcd> {
        let mut last_error = None;
        // A port found free can be taken by another test before etcd binds it: retry.
        for _ in 0..5 {
            let mut etcd = Etcd {
                child: None,
                dir: tempfile::Builder::new().prefix("qslice-etcd-").tempdir()?,
                client_port: free_port()?,
                peer_port: free_port()?,
                starts: 0,
                extra_ip: extra_ip.map(str::to_owned),
            };
            match etcd.launch() {
                Ok(()) => return Ok(etcd),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("tried at least once"))
    }

    fn launch(&mut self) -> Result<()> {
        let binary = std::env::var("QSLICE_TEST_ETCD").unwrap_or_else(|_| "/usr/bin/etcd".into());
        self.starts += 1;
        let log_path = self.log_path();
        let log = File::options().create(true).append(true).open(&log_path)?;
        let mut client = format!("http://127.0.0.1:{}", self.client_port);
        if let Some(ip) = &self.extra_ip {
            client.push_str(&format!(",http://{ip}:{}", self.client_port));
        }
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(&binary);
        cmd.args(["--name", "qslice-test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("qslice-test={peer}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--log-level", "warn", "--logger", "zap"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("start {binary} (install etcd-server)"))?;
        self.child = Some(child);
        let started = wait::Wait::new(ETCD_START_TIMEOUT, "etcd to answer").every(Duration::from_millis(50)).poll(|| {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                bail!("etcd exited at start ({status}); log {}:\n{}", log_path.display(), tail(&log_path, 20));
            }
            Ok(self.is_healthy().then_some(()))
        });
        match started {
            Err(e) if self.child.is_some() => {
                self.kill();
                bail!("{e}; log:\n{}", tail(&log_path, 20))
            }
            other => other,
        }
    }

    /// The client URL, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The client URLs, for clients that take a list.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The data directory (kept across restarts, removed on drop).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// etcd's own log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Whether etcd answers `GET /health` with `"health":"true"` within a second.
    pub fn is_healthy(&self) -> bool {
        let probe = || -> std::io::Result<String> {
            let addr = ([127, 0, 0, 1], self.client_port).into();
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            stream.set_read_timeout(Some(Duration::from_secs(1)))?;
            stream.set_write_timeout(Some(Duration::from_secs(1)))?;
            stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply)?;
            Ok(reply)
        };
        probe().is_ok_and(|reply| reply.contains("\"health\":\"true\""))
    }

    /// Kills etcd (SIGKILL) and waits for it; the data dir stays for [`Etcd::restart`].
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts etcd again on the same ports with the same data, and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.launch()
    }

    /// Freezes etcd with SIGSTOP and waits until every thread of it has stopped:
    /// connections stay open but nothing answers.
    pub fn pause(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)?;
        let pid = self.pid().context("etcd is not running")?;
        wait_for(Duration::from_secs(10), "every etcd thread to stop", || all_threads_stopped(pid))
    }

    /// Thaws etcd with SIGCONT.
    pub fn resume(&self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().context("etcd is not running")?;
        kill(Pid::from_raw(pid as i32), signal).with_context(|| format!("send {signal} to etcd"))
    }

    fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- etcd log (last lines) ---\n{}", tail(&self.log_path(), 20));
        }
        self.kill();
    }
}

/// Kills a child with SIGKILL (after SIGCONT, in case it was stopped) and reaps it.
fn kill_and_reap(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The last `n` lines of a file, for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The path of a workspace binary (`qslice-runner`, `qslice-coordinator`, `qslicectl`),
/// next to the test executable's `deps/` directory. The test command builds them first
/// (`cargo build --workspace --bins`).
pub fn qslice_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("test executable has a directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps has a parent")?;
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!("{} not found: run `cargo build --workspace --bins` before the tests", path.display());
    }
    Ok(path)
}

/// A child process with stdout and stderr captured to a log file; killed on drop.
pub struct Proc {
    child: Option<Child>,
    name: String,
    log_path: PathBuf,
}

impl Proc {
    /// Starts `program` with `args` and extra environment `envs`, logging to `log_path`.
    pub fn spawn(program: &Path, args: &[&str], envs: &[(&str, &str)], log_path: &Path) -> Result<Proc> {
        let log = File::create(log_path).with_context(|| format!("create {}", log_path.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args).envs(envs.iter().copied()).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("start {}", program.display()))?;
        let name = program.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Proc { child: Some(child), name, log_path: log_path.to_owned() })
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The captured output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends a signal.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().context("process already reaped")?;
        kill(Pid::from_raw(pid as i32), signal).with_context(|| format!("send {signal} to {}", self.name))
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("process already reaped"),
        }
    }

    /// Waits up to `timeout` for the process to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut status = None;
        wait_for(timeout, &format!("{} to exit", self.name), || {
            status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            status.is_some()
        })?;
        Ok(status.expect("set when the wait succeeded"))
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} log {} (last lines) ---\n{}", self.name, self.log_path.display(), tail(&self.log_path, 40));
        }
        self.kill();
    }
}

/// Whether every thread of `pid` is in the stopped state (`T`).
pub fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().all(|t| {
        let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('T'))
    })
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Live processes whose environment holds `needle` (e.g. `QSLICE_NODE=r1`: a node's
/// handlers and Mailman slice runners). Zombies run nothing and are left out.
pub fn pids_with_env(needle: &str) -> Vec<u32> {
    let Ok(rd) = fs::read_dir("/proc") else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| fs::read(format!("/proc/{pid}/environ")).unwrap_or_default().split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        .filter(|pid| !fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
        .collect()
}
