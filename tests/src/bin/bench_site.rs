//! A whole Mailman 3.3.10 site end to end (tests/src/site.rs: PostgreSQL, two lists, posts
//! in over LMTP, out over SMTP to a recording sink), served three ways on one site:
//!
//! - Mailman's own master (`mailman start` on node r1: every runner of its mailman.cfg,
//!   its own `lmtp` runner among them, one instance each unless `--master-instances`
//!   says otherwise), qslice not involved;
//! - qslice with one qslice-runner (r1) serving every queue a post passes through
//!   ([`POST_QUEUES`]: in, pipeline and out at two slices, the others at one), and
//!   Mailman's `lmtp` runner on r1 started outside qslice (as systemd runs it);
//! - qslice with two and with three runners (r1, r2, r3), an LMTP server on each node.
//!
//! Each configuration gets a burst (every post handed over as fast as LMTP takes it:
//! posts/s through the whole site) and, in full mode, a paced run (latency below
//! saturation), once a warm-up has passed through it and its processes are idle (every
//! warm spare started). `--only` picks configurations (e.g. `--only master,1`). Then,
//! with two runners and posts paced, kill -9 of r1's qslice-runner (a process crash) and
//! the death of r1's host (its qslice-runner tree and its LMTP server frozen with the
//! cgroup freezer, then SIGKILLed): the longest any post waited.
//!
//! A post's latency: LMTP accepted -> every regular member of its list has it (the first
//! copy each got; the digest member is left out). Throughput: the run's posts over first
//! LMTP acceptance -> last post's latency end. Benchmarks print figures and assert no speed,
//! but this fails if a post is lost (a member never gets it, or it is shunted) or the site
//! does not settle within `--settle-timeout`. `--quick` (what the test command runs) does
//! only the bursts of Mailman's master and of one runner, [`QUICK_POSTS`] posts per list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use qslice_tests::benchkit::{emit_json, machine, machine_line, round, Table};
use qslice_tests::freezer::{process_tree, Freezer};
use qslice_tests::site::{SiteOptions, WholeSite, POST_QUEUES};
use qslice_tests::testcluster::TestCluster;
use qslice_tests::wait::Wait;

/// Measure a whole Mailman 3 site: Mailman's own master against qslice with 1-3 runners,
/// and the longest wait across a runner crash and a host death.
#[derive(Parser)]
struct Args {
    /// A short run for CI: the bursts of Mailman's master and of one qslice-runner, 10
    /// posts per list each; no paced runs, no faults.
    #[arg(long)]
    quick: bool,
    /// Posts per list in each burst (full mode).
    #[arg(long, default_value_t = 150)]
    burst: usize,
    /// Posts per list in each paced run and fault run (full mode).
    #[arg(long, default_value_t = 100)]
    paced: usize,
    /// Posts per second per list in paced runs: below every configuration's throughput,
    /// so that their latency is the site's and not a backlog's.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Seconds a run may take from its first post until everything is delivered and every
    /// queue is empty; past it the benchmark fails.
    #[arg(long, default_value_t = 600)]
    settle_timeout: u64,
    /// Instances of Mailman's own runners under `mailman start`, e.g. `in=2,out=2`
    /// (default: mailman.cfg's, one of each). Two pipeline instances shunt posts: both
    /// append to a list's digest mailbox, and the one that finds it locked raises.
    #[arg(long, default_value = "")]
    master_instances: String,
    /// Only these configurations, comma-separated: `master` (Mailman's own master) and
    /// qslice runner counts `1`, `2`, `3`, e.g. `--only master,1` (default: all of the
    /// mode's). The faults run with `2` in full mode.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Write the JSON summary here too.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

/// The site's nodes; qslice runs use the first one, two or three.
const NODES: [&str; 3] = ["r1", "r2", "r3"];
/// The regular members of each list (the digest list's d5 takes MIME digests).
const TEST_MEMBERS: [&str; 5] = ["m1@example.com", "m2@example.com", "m3@example.com", "m4@example.com", "m5@example.com"];
const DIGEST_REGULAR: [&str; 4] = ["d1@example.com", "d2@example.com", "d3@example.com", "d4@example.com"];
/// Posts per list that warm a configuration up before it is measured: enough to pass
/// through both slices of the two-slice queues, so that each Python process on a post's
/// way has initialised and handled one.
const WARM_UP: usize = 4;
/// Posts per list in a `--quick` burst: one runner moves about one post a second on a
/// loaded two-core machine in a debug build, and the quick mode must stay well within two
/// minutes there.
const QUICK_POSTS: usize = 10;
/// Generous bound for starting a configuration (a dozen or more Mailman processes
/// initialising on a loaded two-core machine) and for a takeover.
const START: Duration = Duration::from_secs(240);
/// Cores a configuration's processes may use together and count as idle (their idle
/// polls: a few hundredths of a core) before a run is measured.
const IDLE_CPU: f64 = 0.1;
/// Seconds in a row a configuration must be idle before a run is measured (more than the
/// second between two warm spares' starts).
const IDLE_SECONDS: u32 = 3;

/// What one run measured.
struct Run {
    /// The configuration, e.g. "qslice, 2 runners".
    config: String,
    /// How the posts came: "burst", "paced", or the fault.
    phase: String,
    /// Posts, both lists together.
    posts: usize,
    /// First LMTP acceptance -> the last post delivered to its last member, seconds.
    seconds: f64,
    /// Per post, LMTP accepted -> every regular member reached, seconds, sorted.
    latency: Vec<f64>,
    /// Posts some member got twice (allowed only across a fault: see the end-to-end tests).
    doubled: usize,
    /// First LMTP acceptance and last delivery, seconds since the Unix epoch (to line the
    /// run up with other records: Mailman's logs, CPU samples).
    span: (f64, f64),
    /// CPU ms per post by kind of process, machine-wide, over the run (see [`cpu_by_kind`]).
    cpu_per_post: BTreeMap<String, f64>,
}

impl Run {
    fn posts_per_s(&self) -> f64 {
        self.posts as f64 / self.seconds
    }

    /// The `p`th percentile of the latencies, in ms.
    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latency.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * (self.latency.len() - 1) as f64).round() as usize;
        self.latency[i.min(self.latency.len() - 1)] * 1000.0
    }

    fn max_ms(&self) -> f64 {
        self.latency.last().map_or(f64::NAN, |l| l * 1000.0)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "config": self.config,
            "phase": self.phase,
            "posts": self.posts,
            "seconds": round(self.seconds, 2),
            "posts_per_s": round(self.posts_per_s(), 2),
            "p50_ms": round(self.percentile_ms(50.0), 0),
            "p99_ms": round(self.percentile_ms(99.0), 0),
            "max_ms": round(self.max_ms(), 0),
            "beyond_p50_ms": round(self.max_ms() - self.percentile_ms(50.0), 0),
            "doubled": self.doubled,
            "cpu_ms_per_post": self.cpu_per_post.iter().map(|(k, v)| (k.clone(), serde_json::json!(round(*v, 1)))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// A fault done to r1 in the middle of a paced run with two runners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// kill -9 of r1's qslice-runner alone (its leash revokes the lease and stops its
    /// Mailman slice runners); its LMTP server runs on.
    RunnerCrash,
    /// r1's host dies: its qslice-runner tree and its LMTP server frozen at one instant,
    /// then SIGKILLed (the lease must expire).
    HostDeath,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::RunnerCrash => "kill -9 of r1's qslice-runner",
            Fault::HostDeath => "r1's host dies (freeze, SIGKILL)",
        }
    }
}

/// The site and what has been posted to it.
struct Bench {
    site: WholeSite,
    /// The number of the next post to either list (Message-IDs `<site-<list>-<n>@...>`).
    next: usize,
    /// Messages in shunt/ before the current run.
    shunted: usize,
    /// The bound of a run's settling.
    settle_timeout: Duration,
}

fn post_id(list: &str, n: usize) -> String {
    format!("<site-{list}-{n}@example.com>")
}

/// The regular members that must get post `id`.
fn members_of(id: &str) -> &'static [&'static str] {
    if id.starts_with("<site-test-") {
        &TEST_MEMBERS
    } else {
        &DIGEST_REGULAR
    }
}

impl Bench {
    /// Posts `n` posts to each list over LMTP to the servers of `nodes`, `rate` per second
    /// per list (0: as fast as they are taken); returns their Message-IDs.
    fn post(&mut self, nodes: &[&str], n: usize, rate: f64) -> Result<Vec<String>> {
        let start = self.next;
        self.next += n;
        self.shunted = self.site.queue_files(&[]).1;
        let mut ids = Vec::new();
        for list in ["test", "digest"] {
            self.site.post_lmtp_to(nodes, list, n, start, rate)?;
            ids.extend((start..start + n).map(|i| post_id(list, i)));
        }
        Ok(ids)
    }

    /// Waits until each post of `ids` was accepted over LMTP and reached each regular
    /// member of its list, and every queue a post passes through is empty. Fails at once if
    /// a post was shunted, and after `settle_timeout` saying what is missing.
    async fn settle(&mut self, ids: &[String]) -> Result<()> {
        let queues: Vec<&str> = POST_QUEUES.iter().map(|(q, _)| *q).collect();
        let what = format!("{} posts accepted over LMTP and delivered to every regular member, and the queues empty", ids.len());
        // Each look parses the sink's whole record: a few times a second is plenty.
        let wait = Wait::new(self.settle_timeout, &what).every(Duration::from_millis(300));
        let mut state = String::new();
        let settled = wait
            .poll_async(|| {
                let look = self.look(ids, &queues, &mut state);
                async move { look }
            })
            .await;
        settled.map_err(|e| anyhow!("{e}: {state}"))
    }

    /// One look of [`Bench::settle`]; `state` says what is still missing.
    fn look(&mut self, ids: &[String], queues: &[&str], state: &mut String) -> Result<Option<()>> {
        let (counts, shunt) = self.site.queue_files(queues);
        if shunt > self.shunted {
            bail!("{} posts shunted (lost to their recipients); Mailman's error logs: {:?}", shunt - self.shunted, self.site.report().map(|r| r.errors));
        }
        let posting = !self.site.posting_done();
        let accepted = self.site.lmtp_accepted();
        let reached: BTreeSet<(String, String)> = self.site.sink.deliveries().into_iter().map(|d| (d.rcpt, d.message_id)).collect();
        let missing: Vec<&String> =
            ids.iter().filter(|id| !accepted.contains_key(*id) || members_of(id).iter().any(|m| !reached.contains(&((*m).to_owned(), (*id).clone())))).collect();
        let busy: Vec<String> = counts.iter().filter(|(_, c)| c.pck + c.bak > 0).map(|(q, c)| format!("{q} {}+{}", c.pck, c.bak)).collect();
        *state = format!(
            "posting {}; {} of {} posts not yet accepted or not at every member (first: {:?}); queues holding .pck+.bak: {busy:?}",
            if posting { "still running" } else { "done" },
            missing.len(),
            ids.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        );
        Ok((!posting && missing.is_empty() && busy.is_empty()).then_some(()))
    }

    /// The figures of the settled posts `ids`.
    fn measure(&self, config: &str, phase: &str, ids: &[String]) -> Result<Run> {
        let accepted = self.site.lmtp_accepted();
        let wanted: BTreeSet<&String> = ids.iter().collect();
        let mut first: BTreeMap<(String, String), f64> = BTreeMap::new();
        let mut copies: BTreeMap<(String, String), usize> = BTreeMap::new();
        for d in self.site.sink.deliveries().into_iter().filter(|d| wanted.contains(&d.message_id)) {
            let key = (d.rcpt, d.message_id);
            let t = first.entry(key.clone()).or_insert(d.t);
            *t = t.min(d.t);
            *copies.entry(key).or_insert(0) += 1;
        }
        let (mut latency, mut began, mut ended) = (Vec::new(), f64::MAX, 0.0f64);
        for id in ids {
            let at = *accepted.get(id).with_context(|| format!("{id} was not accepted over LMTP"))?;
            let reached = members_of(id)
                .iter()
                .map(|m| first.get(&((*m).to_owned(), id.clone())).copied().with_context(|| format!("{id} never reached {m}")))
                .collect::<Result<Vec<f64>>>()?
                .into_iter()
                .fold(0.0, f64::max);
            latency.push(reached - at);
            began = began.min(at);
            ended = ended.max(reached);
        }
        latency.sort_by(f64::total_cmp);
        let doubled = ids.iter().filter(|id| members_of(id).iter().any(|m| copies.get(&((*m).to_owned(), (*id).clone())).copied().unwrap_or(0) > 1)).count();
        Ok(Run {
            config: config.to_owned(),
            phase: phase.to_owned(),
            posts: ids.len(),
            seconds: ended - began,
            latency,
            doubled,
            span: (began, ended),
            cpu_per_post: BTreeMap::new(),
        })
    }

    /// Posts, waits until they are all out, and measures them.
    async fn run(&mut self, config: &str, phase: &str, nodes: &[&str], n: usize, rate: f64) -> Result<Run> {
        let cpu_before = cpu_by_kind();
        let ids = self.post(nodes, n, rate)?;
        self.settle(&ids).await.with_context(|| format!("{config}, {phase}"))?;
        let mut run = self.measure(config, phase, &ids)?;
        run.cpu_per_post = cpu_per_post(&cpu_before, &cpu_by_kind(), run.posts);
        println!(
            "{config}, {phase}: {} posts in {:.1} s ({:.2} posts/s), latency p50 {:.0} ms, max {:.0} ms (Unix time {:.1} to {:.1})",
            run.posts,
            run.seconds,
            run.posts_per_s(),
            run.percentile_ms(50.0),
            run.max_ms(),
            run.span.0,
            run.span.1
        );
        Ok(run)
    }

    /// A few posts through every process on a post's way, not measured.
    async fn warm_up(&mut self, nodes: &[&str]) -> Result<()> {
        let ids = self.post(nodes, WARM_UP, 0.0)?;
        self.settle(&ids).await.context("warming up")
    }

    /// A paced run with two runners during which `fault` happens to r1, which then comes
    /// back; returns once r1 holds its share of the two-slice queues again.
    async fn fault_run(&mut self, tc: &mut TestCluster, fault: Fault, n: usize, rate: f64) -> Result<Run> {
        let nodes = ["r1", "r2"];
        let ids = self.post(&nodes, n, rate)?;
        // The fault comes a third of the way in, with posts in every stage on both nodes.
        Wait::new(self.settle_timeout, "a third of the posts accepted over LMTP")
            .every(Duration::from_millis(100))
            .until_async(|| {
                let accepted = self.site.lmtp_accepted();
                let enough = ids.iter().filter(|id| accepted.contains_key(*id)).count() >= ids.len() / 3;
                async move { enough }
            })
            .await?;
        match fault {
            Fault::RunnerCrash => tc.runner_mut("r1").kill(),
            Fault::HostDeath => {
                let freezer = Freezer::new()?;
                freezer.add_tree(tc.runner("r1").pid().context("r1's qslice-runner runs")?)?;
                freezer.add_tree(self.site.lmtp_pid("r1").context("r1's LMTP server runs")?)?;
                freezer.freeze()?;
                for pid in freezer.pids() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
                }
                freezer.thaw()?;
                tc.runner_mut("r1").kill();
                self.site.kill_lmtp("r1");
            }
        }
        let cluster: &TestCluster = tc;
        Wait::new(START, "r1's slices taken over by r2")
            .every(Duration::from_millis(100))
            .until_async(|| async move {
                let mut moved = true;
                for (q, _) in POST_QUEUES {
                    moved &= !cluster.holdings(q).await.contains_key("r1");
                }
                moved
            })
            .await?;
        // r1 comes back once the run has settled: its return is a join (a balance move
        // hands it slices before it has warm spares), not part of what a death costs.
        self.settle(&ids).await.with_context(|| fault.name())?;
        let run = self.measure("qslice, 2 runners", fault.name(), &ids)?;
        self.site.restart_runner(tc, "r1", &POST_QUEUES)?;
        if fault == Fault::HostDeath {
            self.site.start_lmtp("r1")?;
        }
        println!("{}: {} posts, latency p50 {:.0} ms, max {:.0} ms, {} posts went out twice", fault.name(), run.posts, run.percentile_ms(50.0), run.max_ms(), run.doubled);
        balanced(tc).await?;
        self.warm_up(&nodes).await?;
        Ok(run)
    }
}

/// Waits until r1 and r2 each hold a slice of every two-slice queue (r1 back after a fault).
async fn balanced(tc: &TestCluster) -> Result<()> {
    for (queue, slices) in POST_QUEUES.iter().filter(|(_, s)| *s == 2) {
        let what = format!("{queue}'s {slices} slices spread over r1 and r2");
        tc.wait_holdings(START, queue, &what, |held| ["r1", "r2"].iter().all(|n| held.get(*n).is_some_and(|s| s.len() == 1))).await?;
    }
    Ok(())
}

/// CPU time (clock ticks) used so far by the processes of the trees rooted at `roots`, and
/// how many processes they hold.
fn tree_cpu(roots: &[u32]) -> (u64, usize) {
    let pids: BTreeSet<u32> = roots.iter().flat_map(|r| process_tree(*r)).collect();
    let ticks = pids
        .iter()
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    (ticks, pids.len())
}

/// CPU time (clock ticks) used so far by every process on the machine, summed by kind:
/// Mailman runner processes by their queue (`mailman <queue>`, Mailman's own and qslice's
/// slice runners alike), `qslice-runner`, `leash`, `qslice-coordinator`, `etcd`,
/// `postgres`, and the rest by command name. Processes that exit meanwhile are not counted.
fn cpu_by_kind() -> BTreeMap<String, u64> {
    let mut by_kind = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let (Ok(stat), Ok(cmdline)) = (std::fs::read_to_string(format!("/proc/{pid}/stat")), std::fs::read(format!("/proc/{pid}/cmdline"))) else { continue };
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        let comm = head.split_once('(').map_or("", |(_, c)| c);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(Ok(utime)), Some(Ok(stime))) = (fields.get(11).map(|f| f.parse::<u64>()), fields.get(12).map(|f| f.parse::<u64>())) else { continue };
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        *by_kind.entry(process_kind(comm, &args)).or_insert(0) += utime + stime;
    }
    by_kind
}

/// The kind of a process for [`cpu_by_kind`].
fn process_kind(comm: &str, args: &[String]) -> String {
    let queue = args.iter().enumerate().find_map(|(i, a)| match a.strip_prefix("--runner") {
        Some("") => args.get(i + 1).cloned(),
        Some(v) => v.strip_prefix('=').map(str::to_owned),
        None => None,
    });
    if let Some(q) = queue {
        return format!("mailman {}", q.split(':').next().unwrap_or(&q));
    }
    if args.iter().any(|a| a == "--leash") {
        return "leash".into();
    }
    if comm.starts_with("postgres") || args.first().is_some_and(|a| a.starts_with("postgres")) {
        return "postgres".into();
    }
    comm.to_owned()
}

/// CPU ms per post by kind between two [`cpu_by_kind`] samples; kinds under 0.5 ms a post
/// are summed as `other`.
fn cpu_per_post(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, posts: usize) -> BTreeMap<String, f64> {
    let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let mut out = BTreeMap::new();
    for (kind, ticks) in after {
        let ms = ticks.saturating_sub(before.get(kind).copied().unwrap_or(0)) as f64 / ticks_per_s * 1000.0 / posts.max(1) as f64;
        let key = if ms < 0.5 { "other".to_owned() } else { kind.clone() };
        *out.entry(key).or_insert(0.0) += ms;
    }
    out
}

/// Waits until the process trees rooted at `roots` are idle: for [`IDLE_SECONDS`] in a row,
/// the same processes as a second before, together using under [`IDLE_CPU`] of a core. A
/// configuration keeps starting processes after it takes its first posts (qslice-runner
/// starts its warm spares one a second after its slices, each initialising Mailman for
/// 0.6-0.8 s of CPU): measured meanwhile, a run counts their start-up against the site's
/// throughput (8 spares in a 100-post burst: a fifth of the run's CPU).
async fn until_idle(roots: &[u32], what: &str) -> Result<()> {
    let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let began = Instant::now();
    let mut before = tree_cpu(roots);
    let mut quiet = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = tree_cpu(roots);
        let cores = now.0.saturating_sub(before.0) as f64 / ticks_per_s;
        quiet = if now.1 == before.1 && cores < IDLE_CPU { quiet + 1 } else { 0 };
        if quiet >= IDLE_SECONDS {
            return Ok(());
        }
        if began.elapsed() > START {
            bail!("{what} still busy after {START:?}: {} processes, {cores:.2} cores over the last second", now.1);
        }
        before = now;
    }
}

/// Stops a qslice configuration: the runners (their leashes stop their Mailman slice
/// runners), the coordinator and etcd, and the LMTP servers of `nodes`; returns once every
/// process of the runners' trees has exited.
fn stop_cluster(site: &mut WholeSite, tc: TestCluster, nodes: &[&str]) -> Result<()> {
    let pids: Vec<u32> = tc.runners().values().filter_map(|p| p.pid()).flat_map(process_tree).collect();
    drop(tc);
    for node in nodes {
        site.kill_lmtp(node);
    }
    Wait::new(Duration::from_secs(120), "every process of the stopped runners to exit").until(|| pids.iter().all(|p| !qslice_tests::process_alive(*p)))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    println!("{}", machine_line());
    let (burst, paced) = if args.quick { (QUICK_POSTS, 0) } else { (args.burst, args.paced) };
    let options = SiteOptions { nodes: NODES.iter().map(|n| (*n).to_owned()).collect(), lmtp: true, ..SiteOptions::default() };
    let mut bench = Bench { site: WholeSite::new(&options)?, next: 0, shunted: 0, settle_timeout: Duration::from_secs(args.settle_timeout) };
    let mut runs: Vec<Run> = Vec::new();
    let paced_phase = format!("paced, {} posts/s per list", args.rate);

    // (a) Mailman's own master on r1.
    let instances = master_instances(&args.master_instances)?;
    for only in &args.only {
        if !["master", "1", "2", "3"].contains(&only.as_str()) {
            bail!("--only: {only:?} is not a configuration; name master, 1, 2 or 3");
        }
    }
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let config = "mailman start (1 node)";
    if wanted("master") {
        let mut master = bench.site.start_mailman("r1", &instances)?;
        bench.warm_up(&["r1"]).await?;
        until_idle(&[master.pid()], "Mailman's master and its runners").await?;
        runs.push(bench.run(config, "burst", &["r1"], burst, 0.0).await?);
        if paced > 0 {
            runs.push(bench.run(config, &paced_phase, &["r1"], paced, args.rate).await?);
        }
        master.stop().context("stop Mailman's master")?;
    }

    // (b) and (c): qslice with one, two and three runners, an LMTP server on each node.
    let counts: &[usize] = if args.quick { &[1] } else { &[1, 2, 3] };
    let mut faults = Vec::new();
    for &count in counts.iter().filter(|c| wanted(&c.to_string())) {
        let nodes = &NODES[..count];
        let config = format!("qslice, {count} runner{}", if count == 1 { "" } else { "s" });
        let mut tc = bench.site.start_cluster(nodes, &POST_QUEUES, START).await?;
        for node in nodes {
            bench.site.start_lmtp(node)?;
        }
        bench.warm_up(nodes).await?;
        let roots: Vec<u32> = tc.runners().values().filter_map(|p| p.pid()).collect();
        until_idle(&roots, "the qslice-runners and their warm spares").await?;
        runs.push(bench.run(&config, "burst", nodes, burst, 0.0).await?);
        if paced > 0 {
            runs.push(bench.run(&config, &paced_phase, nodes, paced, args.rate).await?);
        }
        if count == 2 && paced > 0 {
            for fault in [Fault::RunnerCrash, Fault::HostDeath] {
                faults.push(bench.fault_run(&mut tc, fault, paced, args.rate).await?);
            }
        }
        stop_cluster(&mut bench.site, tc, nodes)?;
    }

    let report = bench.site.report()?;
    let ratio = print_tables(&runs, &faults);
    println!("{} posts in all over LMTP; {} shunted, {} in bad/, {} lines in Mailman's error logs", bench.next * 2, report.shunt, report.bad, report.errors.len());
    let summary = serde_json::json!({
        "runs": runs.iter().map(Run::json).collect::<Vec<_>>(),
        "faults": faults.iter().map(Run::json).collect::<Vec<_>>(),
        "qslice_1_runner_over_mailman_start": round(ratio, 3),
        "posts": bench.next * 2,
        "shunted": report.shunt,
        "bad": report.bad,
        "error_log_lines": report.errors.len(),
        "machine": machine(),
        "seconds": round(started.elapsed().as_secs_f64(), 1),
    });
    emit_json(&summary, args.json_out.as_deref())
}

/// `--master-instances`: runner=count, comma-separated.
fn master_instances(list: &str) -> Result<Vec<(&str, u32)>> {
    list.split(',')
        .filter(|i| !i.is_empty())
        .map(|i| i.split_once('=').and_then(|(r, n)| Some((r, n.parse::<u32>().ok()?))).with_context(|| format!("--master-instances: {i:?} is not runner=count")))
        .collect()
}

/// Prints each run's and each fault's figures and where the CPU went; returns the ratio of
/// one runner's burst throughput to `mailman start`'s.
fn print_tables(runs: &[Run], faults: &[Run]) -> f64 {
    let mut table = Table::new(&["configuration", "posts", "phase", "posts/s", "p50 ms", "p99 ms", "max ms"]);
    for r in runs {
        table.row(vec![
            r.config.clone(),
            r.posts.to_string(),
            r.phase.clone(),
            format!("{:.2}", r.posts_per_s()),
            format!("{:.0}", r.percentile_ms(50.0)),
            format!("{:.0}", r.percentile_ms(99.0)),
            format!("{:.0}", r.max_ms()),
        ]);
    }
    println!("{}", table.render());
    let burst_rate = |config: &str| runs.iter().find(|r| r.config == config && r.phase == "burst").map(Run::posts_per_s);
    let ratio = burst_rate("qslice, 1 runner").zip(burst_rate("mailman start (1 node)")).map(|(q, m)| q / m).unwrap_or(f64::NAN);
    println!("qslice with 1 runner / mailman start, burst throughput: {ratio:.2}");
    // Where the CPU went (machine-wide, per post): what a configuration costs beyond
    // Mailman's own work.
    for r in runs.iter().filter(|r| r.phase == "burst") {
        let mut kinds: Vec<(&String, &f64)> = r.cpu_per_post.iter().collect();
        kinds.sort_by(|x, y| y.1.total_cmp(x.1));
        let total: f64 = kinds.iter().map(|(_, ms)| **ms).sum();
        let parts: Vec<String> = kinds.iter().map(|(k, ms)| format!("{k} {ms:.1}")).collect();
        println!("{}, burst: CPU {total:.0} ms a post: {}", r.config, parts.join(", "));
    }
    if !faults.is_empty() {
        let mut table = Table::new(&["fault (2 runners, paced)", "posts", "p50 ms", "max ms", "max beyond p50 ms", "posts out twice"]);
        for f in faults {
            table.row(vec![
                f.phase.clone(),
                f.posts.to_string(),
                format!("{:.0}", f.percentile_ms(50.0)),
                format!("{:.0}", f.max_ms()),
                format!("{:.0}", f.max_ms() - f.percentile_ms(50.0)),
                f.doubled.to_string(),
            ]);
        }
        println!("{}", table.render());
    }
    ratio
}
