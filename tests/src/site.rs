//! A whole Mailman 3 site for end-to-end tests: PostgreSQL (Debian's, started here on a
//! Unix socket in a temporary directory), a recording SMTP server of the test's own
//! (tests/fixtures/smtp_sink.py, aiosmtpd from the Mailman venv) that can answer 451 on
//! demand, and a site (tests/fixtures/mailman3_whole_site.py) with two lists, one of them
//! with a digest member, whose per-node mailman.cfg files share every shared directory
//! and keep logs, pid and lock files per node. Everything is stopped and removed on drop,
//! also when a test fails.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::cluster::Spool;
use crate::mailman3::python;
use crate::testcluster::{Ready, TestCluster};
use crate::wait::wait_for;

/// How long PostgreSQL, the SMTP server and Mailman's LMTP runners and master may take to
/// come up on a loaded machine (Mailman initialising beside emulated guests and CPU hogs
/// took over a minute).
const START_TIMEOUT: Duration = Duration::from_secs(300);

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Debian's PostgreSQL server binaries (the newest installed major version).
fn postgres_bin() -> Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (tests/run.sh installs Debian's postgresql)")?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().context("no /usr/lib/postgresql/<version>/bin/postgres")
}

/// Runs `cmd` as the `postgres` user when this process is root (PostgreSQL refuses to
/// run as root).
fn as_postgres(program: &Path) -> Command {
    if nix::unistd::Uid::effective().is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// A PostgreSQL server of the test's own, listening on a Unix socket (and on TCP when
/// asked to).
pub struct Postgres {
    dir: tempfile::TempDir,
    server: Child,
    /// `(address, port)` it listens on over TCP too, if any.
    tcp: Option<(String, u16)>,
}

impl Postgres {
    /// initdb, start on a Unix socket only, and create the database `mailman`.
    pub fn start() -> Result<Postgres> {
        Postgres::start_listening(None)
    }

    /// Like [`Postgres::start`], listening on TCP too at `address` (and 127.0.0.1) on a
    /// free port; [`Postgres::url`] then names `address` (hosts elsewhere, such as the NFS
    /// bed's guests, reach it there).
    pub fn start_listening(address: Option<&str>) -> Result<Postgres> {
        let bin = postgres_bin()?;
        let dir = tempfile::Builder::new().prefix("qslice-pg-").tempdir()?;
        if nix::unistd::Uid::effective().is_root() {
            let user = nix::unistd::User::from_name("postgres")?.context("no postgres user (Debian's postgresql package makes it)")?;
            nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid))?;
        }
        let data = dir.path().join("data");
        let out = as_postgres(&bin.join("initdb")).args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "-D"]).arg(&data).output()?;
        if !out.status.success() {
            bail!("initdb failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        if let Some(a) = address.filter(|a| *a != "127.0.0.1") {
            // initdb's trust covers the socket and 127.0.0.1 only.
            let hba = data.join("pg_hba.conf");
            let mut rules = std::fs::read_to_string(&hba).with_context(|| format!("read {}", hba.display()))?;
            rules.push_str(&format!("host all all {a}/32 trust\n"));
            std::fs::write(&hba, rules).with_context(|| format!("write {}", hba.display()))?;
        }
        let log = File::create(dir.path().join("postgres.log"))?;
        let tcp = match address {
            Some(a) => Some((a.to_owned(), crate::free_port()?)),
            None => None,
        };
        let (listen, port) = match &tcp {
            Some((a, port)) if a == "127.0.0.1" => (a.clone(), *port),
            Some((a, port)) => (format!("127.0.0.1,{a}"), *port),
            None => (String::new(), 5432),
        };
        let mut cmd = as_postgres(&bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(dir.path())
            .args(["-p", &port.to_string()])
            .args(["-c", &format!("listen_addresses={listen}"), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=300"])
            .stdout(Stdio::null())
            .stderr(log);
        crate::die_with_parent(&mut cmd);
        let server = cmd.spawn().context("start postgres")?;
        let pg = Postgres { dir, server, tcp };
        let socket = pg.dir.path().join(format!(".s.PGSQL.{port}"));
        wait_for(START_TIMEOUT, "PostgreSQL's socket", || socket.exists()).map_err(|e| anyhow::anyhow!("{e}: {}", pg.log()))?;
        let mut created = false;
        let mut last = String::new();
        let _ = wait_for(START_TIMEOUT, "database mailman created", || {
            let out = as_postgres(&bin.join("createdb")).arg("-h").arg(pg.dir.path()).args(["-p", &port.to_string(), "-U", "postgres", "mailman"]).output();
            match out {
                Ok(o) if o.status.success() => created = true,
                Ok(o) => last = String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => last = e.to_string(),
            }
            created
        });
        if !created {
            bail!("createdb mailman failed: {last}; {}", pg.log());
        }
        Ok(pg)
    }

    /// The SQLAlchemy URL of the `mailman` database.
    pub fn url(&self) -> String {
        match &self.tcp {
            Some((address, port)) => format!("postgresql+psycopg2://postgres@{address}:{port}/mailman"),
            None => format!("postgresql+psycopg2://postgres@/mailman?host={}", self.dir.path().display()),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Postgres {
    /// The postmaster's pid, from its `postmaster.pid` (as root the child we started is
    /// runuser, which passes no signal on).
    fn postmaster(&self) -> Option<nix::unistd::Pid> {
        let text = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok().map(nix::unistd::Pid::from_raw)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        let child = nix::unistd::Pid::from_raw(self.server.id() as i32);
        let postmaster = self.postmaster().unwrap_or(child);
        // SIGQUIT: PostgreSQL's immediate shutdown, which ends every backend at once.
        let _ = kill(postmaster, Signal::SIGQUIT);
        if wait_for(Duration::from_secs(10), "postgres exited", || matches!(self.server.try_wait(), Ok(Some(_)))).is_err() {
            let _ = kill(postmaster, Signal::SIGKILL);
            let _ = self.server.kill();
        }
        let _ = self.server.wait();
    }
}

/// One delivery the SMTP server accepted: a message to one recipient.
#[derive(Clone, Debug, Deserialize)]
pub struct Delivery {
    /// When (Unix seconds).
    pub t: f64,
    /// The recipient.
    pub rcpt: String,
    /// The message's Message-ID.
    pub message_id: String,
    /// The subject.
    #[serde(default)]
    pub subject: String,
    /// For a digest, the Message-IDs of the posts in it.
    #[serde(default)]
    pub digest_ids: Vec<String>,
}

/// One refused delivery attempt (while the server answered 451).
#[derive(Clone, Debug, Deserialize)]
pub struct Refusal {
    /// When (Unix seconds).
    pub t: f64,
    /// The message's Message-ID, if it got that far.
    #[serde(default)]
    pub message_id: Option<String>,
}

/// The recording SMTP server.
pub struct SmtpSink {
    dir: PathBuf,
    child: Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
}

impl SmtpSink {
    /// Starts it, recording under `dir`.
    pub fn start(dir: &Path) -> Result<SmtpSink> {
        std::fs::create_dir_all(dir)?;
        let log = File::create(dir.join("sink.log"))?;
        let mut cmd = Command::new(python()?);
        cmd.arg(fixtures().join("smtp_sink.py")).arg(dir).stdout(Stdio::null()).stderr(log);
        crate::die_with_parent(&mut cmd);
        let child = cmd.spawn().context("start the SMTP sink")?;
        let mut sink = SmtpSink { dir: dir.to_owned(), child, port: 0 };
        let port_file = dir.join("port");
        wait_for(START_TIMEOUT, "the SMTP sink's port file", || port_file.exists())
            .map_err(|e| anyhow::anyhow!("{e}: {}", std::fs::read_to_string(dir.join("sink.log")).unwrap_or_default()))?;
        sink.port = std::fs::read_to_string(&port_file)?.trim().parse().context("port file")?;
        Ok(sink)
    }

    /// Answers 451 to every delivery while `failing`.
    pub fn set_failing(&self, failing: bool) -> Result<()> {
        let flag = self.dir.join("fail");
        if failing {
            std::fs::write(flag, b"")?;
        } else if flag.exists() {
            std::fs::remove_file(flag)?;
        }
        Ok(())
    }

    /// Every delivery so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        read_jsonl(&self.dir.join("deliveries.jsonl"))
    }

    /// Every refused attempt so far.
    pub fn refusals(&self) -> Vec<Refusal> {
        read_jsonl(&self.dir.join("refusals.jsonl"))
    }
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Vec<T> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the site's database, queues and logs say.
#[derive(Clone, Debug, Deserialize)]
pub struct SiteReport {
    /// Each list's post_id.
    pub post_id: BTreeMap<String, i64>,
    /// Bounce events: total and processed.
    pub bounce_events: BounceEvents,
    /// `.pck`/`.bak` counts per queue.
    pub queues: BTreeMap<String, QueueCount>,
    /// Messages in shunt/.
    pub shunt: usize,
    /// Files in bad/.
    pub bad: usize,
    /// Messages in each list's prototype archive.
    pub archive: BTreeMap<String, usize>,
    /// Their Message-IDs.
    #[serde(default)]
    pub archive_ids: BTreeMap<String, Vec<String>>,
    /// Every line of every node's error log.
    pub errors: Vec<String>,
    /// Lines about the prototype archiver's lock.
    pub archiver_errors: Vec<String>,
    /// Every line of every node's bounce log.
    pub bounce_log: Vec<String>,
}

/// Bounce events in the database.
#[derive(Clone, Debug, Deserialize)]
pub struct BounceEvents {
    /// All of them.
    pub total: usize,
    /// Those processed.
    pub processed: usize,
}

/// Files in one queue.
#[derive(Clone, Debug, Deserialize)]
pub struct QueueCount {
    /// Waiting.
    pub pck: usize,
    /// In flight.
    pub bak: usize,
}

impl SiteReport {
    /// Whether every queue is empty.
    pub fn queues_empty(&self) -> bool {
        self.queues.values().all(|q| q.pck == 0 && q.bak == 0)
    }
}

/// A whole site: PostgreSQL, the SMTP sink, and the site's files in a test spool whose
/// root is the site's queue directory.
pub struct WholeSite {
    // Field order is drop order: the site's users stop before the servers.
    /// The test spool (its root is a link to the site's queue directory).
    pub spool: Spool,
    /// The site's directory.
    pub dir: PathBuf,
    /// The venv's python.
    pub python: PathBuf,
    /// The SMTP server.
    pub sink: SmtpSink,
    posters: Vec<Child>,
    /// Each node's LMTP port (127.0.0.1), and its `runner -r lmtp` while it runs.
    lmtp_ports: BTreeMap<String, u16>,
    lmtp: BTreeMap<String, crate::Proc>,
    /// The node whose mailman.cfg the fixture's own commands use.
    first_node: String,
    /// The database server.
    pub postgres: Postgres,
}

/// Site options.
#[derive(Clone, Debug)]
pub struct SiteOptions {
    /// Node names: each gets its own mailman-<node>.cfg.
    pub nodes: Vec<String>,
    /// `[runner.retry] sleep_time`.
    pub retry_sleep: String,
    /// The digest list's digest_size_threshold in KiB.
    pub digest_threshold_kb: u32,
    /// Where to create the site (its var/ is what the nodes share); default: in the spool's
    /// scratch directory.
    pub dir: Option<PathBuf>,
    /// Whether each node gets an LMTP port of its own ([`WholeSite::start_lmtp`]).
    pub lmtp: bool,
    /// The address other hosts reach this one at (the NFS bed's 10.0.2.2): PostgreSQL
    /// listens there too and the site's URL and SMTP host name it. Default: PostgreSQL on
    /// a Unix socket, SMTP at 127.0.0.1.
    pub gateway: Option<String>,
}

impl Default for SiteOptions {
    fn default() -> SiteOptions {
        SiteOptions { nodes: vec!["r1".into(), "r2".into()], retry_sleep: "3s".into(), digest_threshold_kb: 1, dir: None, gateway: None, lmtp: false }
    }
}

impl WholeSite {
    /// Starts PostgreSQL and the SMTP sink and creates the site.
    pub fn new(options: &SiteOptions) -> Result<WholeSite> {
        let python = python()?;
        let postgres = Postgres::start_listening(options.gateway.as_deref())?;
        let spool = Spool::new(&[])?;
        let sink = SmtpSink::start(&spool.scratch("smtp"))?;
        let dir = options.dir.clone().unwrap_or_else(|| spool.scratch("site"));
        let mut lmtp_ports = BTreeMap::new();
        if options.lmtp {
            for node in &options.nodes {
                lmtp_ports.insert(node.clone(), crate::free_port()?);
            }
        }
        let ports: Vec<String> = options.nodes.iter().filter_map(|n| lmtp_ports.get(n)).map(u16::to_string).collect();
        let out = Command::new(&python)
            .arg(fixtures().join("mailman3_whole_site.py"))
            .arg("init")
            .arg(&dir)
            .args(["--db", &postgres.url(), "--smtp-port", &sink.port.to_string(), "--nodes", &options.nodes.join(","), "--retry-sleep", &options.retry_sleep])
            .args(["--digest-threshold-kb", &options.digest_threshold_kb.to_string()])
            .args(["--smtp-host", options.gateway.as_deref().unwrap_or("127.0.0.1")])
            .args(["--lmtp-ports", &ports.join(",")])
            .output()?;
        if !out.status.success() {
            bail!("mailman3_whole_site.py init failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        let queue_dir = dir.join("var/queue");
        let _ = std::fs::remove_dir(spool.root());
        std::os::unix::fs::symlink(&queue_dir, spool.root())?;
        Ok(WholeSite { spool, dir, python, sink, posters: Vec::new(), lmtp_ports, lmtp: BTreeMap::new(), first_node: options.nodes.first().cloned().unwrap_or_default(), postgres })
    }

    /// Starts node `node`'s LMTP server (Mailman's `runner -r lmtp`, as systemd runs it on
    /// every host, outside qslice) and returns once it answers on its port.
    pub fn start_lmtp(&mut self, node: &str) -> Result<()> {
        let port = *self.lmtp_ports.get(node).with_context(|| format!("no LMTP port for node {node} (SiteOptions::lmtp)"))?;
        let runner = self.python.parent().context("the venv's bin")?.join("runner");
        let log = self.spool.scratch(&format!("lmtp-{node}.log"));
        let config = self.config(node);
        let proc = crate::Proc::spawn(&runner, &["-C", config.to_str().context("utf8 config path")?, "-r", "lmtp"], &[], &log)?;
        self.lmtp.insert(node.to_owned(), proc);
        wait_for(START_TIMEOUT, &format!("{node}'s LMTP server on port {port}"), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
            .map_err(|e| anyhow::anyhow!("{e}: {}", std::fs::read_to_string(&log).unwrap_or_default()))?;
        Ok(())
    }

    /// The process id of node `node`'s LMTP server, while it runs.
    pub fn lmtp_pid(&self, node: &str) -> Option<u32> {
        self.lmtp.get(node).and_then(crate::Proc::pid)
    }

    /// Stops node `node`'s LMTP server (SIGKILL), as its host's death does.
    pub fn kill_lmtp(&mut self, node: &str) {
        if let Some(mut p) = self.lmtp.remove(node) {
            p.kill();
        }
    }

    /// Posts `count` posts to `list` numbered from `start` over LMTP at `rate` per second in
    /// the background, to every node's LMTP port in turn (the next one when a node does not
    /// answer, as an MTA does); [`WholeSite::lmtp_accepted`] tells when each was accepted.
    pub fn post_lmtp_in_background(&mut self, list: &str, count: usize, start: usize, rate: f64) -> Result<()> {
        let nodes: Vec<String> = self.lmtp_ports.keys().cloned().collect();
        self.post_lmtp_to(&nodes.iter().map(String::as_str).collect::<Vec<_>>(), list, count, start, rate)
    }

    /// When each post was accepted over LMTP (Unix time), by Message-ID.
    pub fn lmtp_accepted(&self) -> BTreeMap<String, f64> {
        #[derive(Deserialize)]
        struct Accepted {
            id: String,
            t: f64,
        }
        let text = std::fs::read_to_string(self.spool.scratch("lmtp-accepted.jsonl")).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str::<Accepted>(l).ok()).map(|a| (a.id, a.t)).collect()
    }

    /// The posts whose LMTP delivery to node `node` failed (no answer, a deferral, a
    /// connection cut) before another node accepted them: the node may have queued such a
    /// post before it failed to answer, so it may go out twice.
    pub fn lmtp_failed_at(&self, node: &str) -> BTreeSet<String> {
        #[derive(Deserialize)]
        struct Accepted {
            id: String,
            #[serde(default)]
            failed: Vec<u16>,
        }
        let Some(port) = self.lmtp_ports.get(node) else { return BTreeSet::new() };
        let text = std::fs::read_to_string(self.spool.scratch("lmtp-accepted.jsonl")).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str::<Accepted>(l).ok()).filter(|a| a.failed.contains(port)).map(|a| a.id).collect()
    }

    /// Node `node`'s mailman.cfg.
    pub fn config(&self, node: &str) -> PathBuf {
        self.dir.join(format!("mailman-{node}.cfg"))
    }

    /// A runner config for `node` supervising `queues` (name, extra TOML lines) with
    /// qslice's slice runner, plus `top` at the top level; returns its path.
    pub fn runner_config(&self, node: &str, queues: &[(&str, &str)], top: &str) -> Result<String> {
        let mut toml = format!("{top}\n");
        for (queue, extra) in queues {
            toml.push_str(&format!(
                "[supervise.{queue}]\npython = {:?}\nconfig = {:?}\nstop_timeout = \"30s\"\nenv = [\"QSLICE_HOST\"]\n{extra}\n",
                self.python.display().to_string(),
                self.config(node).display().to_string()
            ));
        }
        let path = self.spool.scratch(&format!("{node}.toml"));
        std::fs::write(&path, toml)?;
        Ok(path.to_string_lossy().into_owned())
    }

    fn site_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg(fixtures().join("mailman3_whole_site.py")).arg(args[0]).arg(&self.dir).arg(self.config(&self.first_node)).args(&args[1..]);
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.site_command(args).output()?;
        if !out.status.success() {
            bail!("mailman3_whole_site.py {args:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Enqueues `count` posts to `list` ("test" or "digest") numbered from `start`.
    pub fn post(&self, list: &str, count: usize, start: usize) -> Result<()> {
        self.run(&["post", &count.to_string(), "--start", &start.to_string(), "--list", list]).map(|_| ())
    }

    /// Enqueues posts in the background at `rate` per second (stopped on drop).
    pub fn post_in_background(&mut self, list: &str, count: usize, start: usize, rate: f64) -> Result<()> {
        let child = self.site_command(&["post", &count.to_string(), "--start", &start.to_string(), "--list", list, "--rate", &rate.to_string()]).stdout(Stdio::null()).spawn()?;
        self.posters.push(child);
        Ok(())
    }

    /// Whether every background poster has finished.
    pub fn posting_done(&mut self) -> bool {
        self.posters.iter_mut().all(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Enqueues `count` bounce messages for the test list, numbered from `start`.
    pub fn bounce(&self, count: usize, start: usize) -> Result<()> {
        self.run(&["bounce", &count.to_string(), "--start", &start.to_string()]).map(|_| ())
    }

    /// Sends every list's pending digest now.
    pub fn send_digests(&self) -> Result<()> {
        self.run(&["send-digests"]).map(|_| ())
    }

    /// The Message-IDs of the entries in flight (`.bak`) in every queue now.
    pub fn in_flight(&self) -> Result<Vec<String>> {
        let out = self.run(&["inflight"])?;
        serde_json::from_str(&out).with_context(|| format!("inflight printed no JSON: {out}"))
    }

    /// Leaves, for every list, the Mailman locks that a process killed while holding
    /// them leaves (a mailbox dot lock, the prototype archiver's lock); returns their paths.
    pub fn plant_dead_locks(&self) -> Result<Vec<PathBuf>> {
        let out = self.run(&["plant-dead-locks"])?;
        serde_json::from_str(&out).with_context(|| format!("plant-dead-locks printed no JSON: {out}"))
    }

    /// What the site says now.
    pub fn report(&self) -> Result<SiteReport> {
        let out = self.run(&["report"])?;
        serde_json::from_str(&out).with_context(|| format!("report printed no JSON: {out}"))
    }

    /// Every (recipient, Message-ID) delivered, with its count.
    pub fn delivery_counts(&self) -> BTreeMap<(String, String), usize> {
        let mut counts = BTreeMap::new();
        for d in self.sink.deliveries() {
            *counts.entry((d.rcpt, d.message_id)).or_insert(0) += 1;
        }
        counts
    }
}

impl Drop for WholeSite {
    fn drop(&mut self) {
        for c in &mut self.posters {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The queues a post passes through from LMTP to the recipients, the digests and the
/// archive, with the slice counts the whole-site runs give them (nntp and command are not
/// on a post's way; bounces only carries bounces).
pub const POST_QUEUES: [(&str, u32); 7] = [("in", 2), ("pipeline", 2), ("out", 2), ("retry", 1), ("digest", 1), ("archive", 1), ("virgin", 1)];

/// A site's runners' lease TTL: qslice's default (5 s), as a site runs it. A dozen Mailman
/// processes initialising on two cores starve a runner for longer than the tests' usual
/// 2 s, and it rightly fences itself.
pub const SITE_LEASE_TTL: (&str, &str) = ("QSLICE_LEASE_TTL", "5s");

/// A site's coordinator flags: its default revoke deadline (60 s), as a site runs it; a
/// shorter one fences a node whose Mailman slice runner is still finishing its message
/// when a slice moves.
pub const SITE_COORDINATOR_ARGS: &[&str] = &["--revoke-deadline", "60s"];

impl WholeSite {
    /// Like [`WholeSite::post_lmtp_in_background`], to the LMTP ports of `nodes` only (the
    /// nodes whose LMTP server runs: an MTA that tries a port nobody listens on waits
    /// before the next).
    pub fn post_lmtp_to(&mut self, nodes: &[&str], list: &str, count: usize, start: usize, rate: f64) -> Result<()> {
        let ports = nodes.iter().map(|n| self.lmtp_ports.get(*n).map(u16::to_string).with_context(|| format!("no LMTP port for node {n}"))).collect::<Result<Vec<_>>>()?;
        let log = self.spool.scratch("lmtp-accepted.jsonl");
        let child = self
            .site_command(&["post-lmtp", &count.to_string(), "--start", &start.to_string(), "--list", list, "--rate", &rate.to_string(), "--ports", &ports.join(",")])
            .arg("--log")
            .arg(&log)
            .stdout(Stdio::null())
            .spawn()?;
        self.posters.push(child);
        Ok(())
    }

    /// Starts Mailman's own master on node `node` (`mailman start`: every runner its
    /// config starts, its own `lmtp` runner among them, and `instances` processes of each
    /// named runner), from a copy of the node's mailman.cfg whose REST runner listens on a
    /// free port; returns once the node's LMTP port answers. The master and its runners are
    /// stopped when the returned value is dropped.
    pub fn start_mailman(&self, node: &str, instances: &[(&str, u32)]) -> Result<MailmanMaster> {
        let port = *self.lmtp_ports.get(node).with_context(|| format!("no LMTP port for node {node} (SiteOptions::lmtp)"))?;
        let spec: Vec<String> = instances.iter().map(|(runner, n)| format!("{runner}={n}")).collect();
        let out = Command::new(&self.python)
            .arg(fixtures().join("mailman3_whole_site.py"))
            .arg("master-config")
            .arg(&self.dir)
            .arg(self.config(node))
            .args(["--rest-port", &crate::free_port()?.to_string(), "--instances", &spec.join(",")])
            .output()?;
        if !out.status.success() {
            bail!("mailman3_whole_site.py master-config failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        let config = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let log = self.spool.scratch(&format!("mailman-start-{node}.log"));
        let mailman = self.python.parent().context("the venv's bin")?.join("mailman");
        let mut cmd = Command::new(&mailman);
        if nix::unistd::Uid::effective().is_root() {
            // The `mailman` command refuses root without it.
            cmd.arg("--run-as-root");
        }
        // The master detaches (its own session) but keeps the command's stdout and stderr:
        // a file, so that nothing waits for a pipe the master holds open.
        let out = File::create(&log)?;
        let status = cmd.arg("-C").arg(&config).arg("start").stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).status().context("run mailman start")?;
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        if !status.success() {
            bail!("mailman start failed ({status}): {}", read_log());
        }
        let pid_file = self.dir.join(format!("var/run-{node}/master.pid"));
        let mut pid = 0;
        wait_for(START_TIMEOUT, "Mailman's master pid file", || {
            pid = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
            pid != 0
        })
        .map_err(|e| anyhow::anyhow!("{e}: {}", read_log()))?;
        let master = MailmanMaster { pid, config };
        wait_for(START_TIMEOUT, &format!("the master's LMTP runner on port {port}"), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
            .map_err(|e| anyhow::anyhow!("{e}: {}", read_log()))?;
        Ok(master)
    }

    /// Starts a coordinator and a qslice-runner on each of `nodes` serving `queues` (name,
    /// slices) with qslice's slice runner, as a site runs them ([`SITE_LEASE_TTL`],
    /// [`SITE_COORDINATOR_ARGS`]), on a new etcd; returns once every slice is claimed.
    pub async fn start_cluster(&self, nodes: &[&str], queues: &[(&str, u32)], timeout: Duration) -> Result<TestCluster> {
        let mut builder = TestCluster::builder().spool(self.spool.clone()).queues(queues).coordinators(1).coordinator_args(SITE_COORDINATOR_ARGS);
        for node in nodes {
            let cfg = self.runner_config(node, &queues.iter().map(|(q, _)| (*q, "")).collect::<Vec<_>>(), "")?;
            builder = builder.runner_with(node, &["--config", &cfg], &[SITE_LEASE_TTL]);
        }
        builder.ready(Ready::Claimed).ready_timeout(timeout).start().await
    }

    /// Starts node `node`'s qslice-runner of `tc` again (as [`WholeSite::start_cluster`]
    /// does), as its host coming back does.
    pub fn restart_runner(&self, tc: &mut TestCluster, node: &str, queues: &[(&str, u32)]) -> Result<()> {
        let cfg = self.runner_config(node, &queues.iter().map(|(q, _)| (*q, "")).collect::<Vec<_>>(), "")?;
        tc.start_runner_with(node, &["--config", &cfg], &[SITE_LEASE_TTL])?;
        Ok(())
    }

    /// `.pck` and `.bak` files in each of `queues`, and the messages in shunt/, counted
    /// here rather than by [`WholeSite::report`] (which starts Python), for a cheap poll.
    pub fn queue_files(&self, queues: &[&str]) -> (BTreeMap<String, QueueCount>, usize) {
        let queue_dir = self.dir.join("var/queue");
        let count = |queue: &str, ext: &str| {
            std::fs::read_dir(queue_dir.join(queue)).map(|rd| rd.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(ext)).count()).unwrap_or(0)
        };
        let queues = queues.iter().map(|q| ((*q).to_owned(), QueueCount { pck: count(q, ".pck"), bak: count(q, ".bak") })).collect();
        (queues, count("shunt", ".pck"))
    }
}

/// Mailman's own master on one node, started by [`WholeSite::start_mailman`]; stopped on
/// drop.
pub struct MailmanMaster {
    /// The master's pid (from its pid file: `mailman start` detaches it).
    pid: u32,
    /// The mailman.cfg it runs with.
    pub config: PathBuf,
}

impl MailmanMaster {
    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Stops the master and its runners as `mailman stop` does (SIGTERM to the master,
    /// which passes it on to each runner and waits for them); whatever of its process tree
    /// still runs after two minutes (a loaded machine: runners still initialising Mailman
    /// at the SIGTERM) is SIGKILLed, and named in the error. Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        if self.pid == 0 {
            return Ok(());
        }
        let tree: Vec<u32> = crate::freezer::process_tree(self.pid).into_iter().filter(|p| crate::process_alive(*p)).collect();
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::Signal::SIGTERM);
        self.pid = 0;
        // A runner finishes the message in hand before it exits: seconds on an idle machine.
        let stopped = wait_for(Duration::from_secs(120), "Mailman's master and its runners to exit", || tree.iter().all(|p| !crate::process_alive(*p)));
        let left: Vec<String> = tree
            .iter()
            .filter(|p| crate::process_alive(**p))
            .map(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), nix::sys::signal::Signal::SIGKILL);
                format!("{pid} {}", String::from_utf8_lossy(&cmdline).replace('\0', " ").trim_end())
            })
            .collect();
        stopped.with_context(|| format!("still running, killed: {left:?}"))
    }
}

impl Drop for MailmanMaster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
