//! Failover on real Mailman 3.3.10: three qslice-runners supervising qslice's Mailman 3
//! slice runner on one site, one coordinator, queue `in` with 4 slices.
//!
//! - Planned hand-off (`qslicectl move`, with a backlog in the slice): per move, the gap
//!   between the old owner's last ACCEPT of the slice and the new owner's first.
//! - kill -9 of the qslice-runner holding the most slices, alone (a process crash: its
//!   leash revokes the lease) and with its leash and Mailman processes (a host death: the
//!   lease expires): per orphaned slice, the time from the kill to the first ACCEPT by
//!   another node; the killed runner then comes back.
//!
//! ACCEPT times come from Mailman's own vette log (microsecond timestamps; the slice runner
//! logs which node and slice each pid runs). At lease TTL 2 s and 5 s; `--quick` (what the
//! test command runs) does 2 moves and 1 kill at TTL 2 s. Prints a table and `JSON: {...}`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use qslice_tests::benchkit::{emit_json, machine, machine_line, round, Table};
use qslice_tests::cluster::{claims, client, holdings, put_queue, start_coordinator, start_runner, Coordinator};
use qslice_tests::mailman3::{Report, Site};
use qslice_tests::wait::Wait;
use qslice_tests::{qslice_bin, Etcd, Proc};

/// Measure hand-off gaps and crash takeovers on real Mailman 3.
#[derive(Parser)]
struct Args {
    /// A short run for CI: 2 moves and 1 kill at TTL 2 s.
    #[arg(long)]
    quick: bool,
    /// Planned moves per TTL in full mode.
    #[arg(long, default_value_t = 20)]
    moves: usize,
    /// Kills per TTL in full mode.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// Write the JSON summary here too.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    /// Print the runners' log lines of each hand-off.
    #[arg(long)]
    verbose: bool,
}

const SLICES: u32 = 4;
const NODES: [&str; 3] = ["r1", "r2", "r3"];
const LONG: Duration = Duration::from_secs(120);

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64()
}

/// Waits like the tests, but looks every 300 ms: each look runs a Python report over
/// Mailman's logs, and looking more often would load the two cores the hand-offs are
/// measured on.
async fn poll<F, Fut>(timeout: Duration, what: &str, cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    Wait::new(timeout, what).every(Duration::from_millis(300)).until_async(cond).await
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Bench {
    site: Site,
    runners: BTreeMap<String, Proc>,
    coordinator: Coordinator,
    client: etcd_client::Client,
    etcd: Etcd,
    ttl: String,
    posted: usize,
    verbose: bool,
}

impl Bench {
    async fn start(ttl_secs: u64, verbose: bool) -> Result<Bench> {
        let etcd = Etcd::start()?;
        let site = Site::new()?;
        let coordinator = start_coordinator(&etcd, &site.spool, "c1", "t", &[])?;
        let mut client = client(&etcd).await?;
        put_queue(&mut client, "t", "in", SLICES).await?;
        let mut bench = Bench { site, runners: BTreeMap::new(), coordinator, client, etcd, ttl: format!("{ttl_secs}s"), posted: 0, verbose };
        for node in NODES {
            bench.start_runner(node)?;
        }
        bench.wait_settled().await?;
        Ok(bench)
    }

    fn start_runner(&mut self, node: &str) -> Result<()> {
        let cfg = self.site.runner_config(&format!("{node}.toml"), "")?;
        let proc = start_runner(&self.etcd, &self.site.spool, node, "t", &["--config", &cfg], &[("QSLICE_LEASE_TTL", self.ttl.as_str())])?;
        self.runners.insert(node.to_owned(), proc);
        Ok(())
    }

    fn report(&self) -> Result<Report> {
        self.site.report()
    }

    /// Every node holds a slice, every slice runs a slice runner, and the queue is empty.
    async fn wait_settled(&mut self) -> Result<()> {
        poll(LONG, "posting done", || {
            let done = self.site.posting_done();
            async move { done }
        })
        .await?;
        let c = self.client.clone();
        poll(LONG, "every node holding a slice and every claim's slice runner running", || {
            let report = self.report().ok();
            let mut c = c.clone();
            async move {
                let Some(r) = report else { return false };
                let Ok(held) = claims(&mut c, "t", "in").await else { return false };
                let nodes: std::collections::BTreeSet<&String> = held.values().map(|(n, _)| n).collect();
                let running =
                    held.iter().all(|(slice, (node, epoch))| r.runners.values().any(|x| x.slice == *slice && &x.node == node && x.epoch == *epoch && x.stopped.is_none()));
                held.len() == SLICES as usize && nodes.len() == NODES.len() && running && r.queue.pck == 0 && r.queue.bak == 0
            }
        })
        .await?;
        // Every node has a warm spare again (one was used by the last hand-off): a ready
        // line in its log for each spare not handed a slice since.
        poll(LONG, "a warm spare on every node", || {
            let warm = self.runners.values().all(|p| {
                let log = p.log();
                log.matches("a warm Mailman slice runner is ready").count() > log.matches("warm=true").count()
            });
            async move { warm }
        })
        .await
    }

    /// Kills what a death kills: qslice-runner alone (a process crash: its leash revokes
    /// the lease) or with its leash and children (a host death: the lease expires).
    fn kill(&mut self, node: &str, host: bool) -> Result<()> {
        let proc = self.runners.get_mut(node).context("victim")?;
        let tree = qslice_tests::freezer::process_tree(proc.pid().context("victim runs")?);
        if host {
            for pid in &tree {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
        }
        proc.kill();
        Ok(())
    }

    /// Puts a backlog of `n` posts into the queue at once (about n/4 per slice, each
    /// taking its slice runner several milliseconds).
    fn backlog(&mut self, n: usize) -> Result<()> {
        self.site.post_backlog(n, self.posted)?;
        self.posted += n;
        Ok(())
    }

    fn ctl(&self, args: &[&str]) -> Result<()> {
        let out = Command::new(qslice_bin("qslicectl")?).args(["--coordinator", &self.coordinator.admin]).args(args).output()?;
        if !out.status.success() {
            bail!("qslicectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Moves one slice with a backlog; the gap between the old owner's last ACCEPT of the
    /// slice and the new owner's first, in ms.
    async fn move_once(&mut self, k: usize) -> Result<f64> {
        let held = holdings(&mut self.client.clone(), "t", "in").await;
        let (from, slices) = held.iter().max_by_key(|(_, s)| s.len()).context("a holder")?;
        let slice = slices[k % slices.len()];
        let to = NODES.iter().find(|n| held.get(**n).map_or(0, Vec::len) < slices.len() && *n != from).context("a target")?.to_string();
        let from = from.clone();
        // The slice is busy when it moves: its runner is working through the backlog.
        let backlog_at = unix_now();
        self.backlog(400)?;
        poll(LONG, "the slice's runner working through the backlog", || {
            let busy = self
                .report()
                .is_ok_and(|r| r.accepts.values().flatten().any(|a| a.0 > backlog_at && r.runner_of(a).is_some_and(|x| x.node == from && x.slice == slice && x.stopped.is_none())));
            async move { busy }
        })
        .await?;
        let moved_at = unix_now();
        self.ctl(&["move", "in", &slice.to_string(), &to])?;
        let mut gap = None;
        poll(LONG, "the moved slice accepting on its new owner", || {
            gap = self.report().ok().and_then(|r| {
                let on = |node: &str, after: bool| {
                    r.accepts
                        .values()
                        .flatten()
                        .filter(|a| r.runner_of(a).is_some_and(|x| x.node == node && x.slice == slice && x.count == SLICES && (x.started > moved_at) == after))
                        .map(|a| a.0)
                        .collect::<Vec<f64>>()
                };
                let first_new = on(&to, true).into_iter().reduce(f64::min)?;
                let last_old = on(&from, false).into_iter().filter(|t| *t < first_new).reduce(f64::max)?;
                Some((first_new - last_old) * 1000.0)
            });
            let done = gap.is_some();
            async move { done }
        })
        .await
        .with_context(|| {
            let logs: String =
                NODES.iter().chain(&["coordinator-c1"]).map(|n| format!("--- {n}\n{}\n", qslice_tests::tail(&self.site.spool.scratch(&format!("{n}.log")), 30))).collect();
            let last = self.report().map(|r| r.accepts.values().flatten().map(|a| a.0).fold(0.0, f64::max)).unwrap_or(0.0);
            let per_runner = self.report().map(|r| {
                let mut m: BTreeMap<String, (usize, f64, f64)> = BTreeMap::new();
                for a in r.accepts.values().flatten() {
                    let key = r.runner_of(a).map_or("?".to_owned(), |x| format!("{} {} {:.3}", x.node, x.slice, x.started));
                    let e = m.entry(key).or_insert((0, f64::MAX, 0.0));
                    e.0 += 1;
                    e.1 = e.1.min(a.0);
                    e.2 = e.2.max(a.0);
                }
                m
            });
            format!("slice {slice} from {from} to {to} at {moved_at:.3} (last ACCEPT {last:.3}): {:?} {per_runner:?}\n{logs}", self.report().map(|r| (r.queue, r.accepts.len())))
        })?;
        if self.verbose {
            let tag = format!("slice={slice}");
            for node in [&from, &to] {
                let log = std::fs::read_to_string(self.site.spool.scratch(&format!("{node}.log"))).unwrap_or_default();
                let lines: Vec<&str> = log.lines().filter(|l| l.contains(&tag) || l.contains(&format!("slice {slice}/"))).collect();
                println!("--- {node}, slice {slice}, moved at {moved_at:.3}, gap {gap:?} ms\n{}", lines[lines.len().saturating_sub(8)..].join("\n"));
            }
        }
        self.wait_settled().await?;
        gap.context("a gap")
    }

    /// Kills the runner holding the most slices (see [`Bench::kill`]); per orphaned slice,
    /// ms from the kill to the first ACCEPT by another node. Brings the runner back.
    async fn kill_once(&mut self, host: bool) -> Result<Vec<f64>> {
        let held = holdings(&mut self.client.clone(), "t", "in").await;
        let (victim, slices) = held.iter().max_by_key(|(_, s)| s.len()).map(|(n, s)| (n.clone(), s.clone())).context("a holder")?;
        self.backlog(400)?;
        let killed_at = unix_now();
        self.kill(&victim, host)?;
        let mut firsts: BTreeMap<u32, f64> = BTreeMap::new();
        poll(LONG, "every orphaned slice accepting on another node", || {
            if let Ok(r) = self.report() {
                for a in r.accepts.values().flatten().filter(|a| a.0 > killed_at) {
                    if let Some(x) = r.runner_of(a).filter(|x| x.node != victim && slices.contains(&x.slice) && x.count == SLICES) {
                        let t = firsts.entry(x.slice).or_insert(a.0);
                        *t = t.min(a.0);
                    }
                }
            }
            let done = firsts.len() == slices.len();
            async move { done }
        })
        .await?;
        self.start_runner(&victim)?;
        self.wait_settled().await?;
        Ok(firsts.values().map(|t| (t - killed_at) * 1000.0).collect())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    println!("{}", machine_line());
    let runs: Vec<(u64, usize, usize)> = if args.quick { vec![(2, 2, 1)] } else { vec![(2, args.moves, args.kills), (5, args.moves, args.kills)] };
    let mut table = Table::new(&["lease TTL", "measure", "samples", "p50 ms", "p99 ms", "max ms"]);
    let mut summary = serde_json::Map::new();
    for (ttl, moves, kills) in runs {
        let mut bench = Bench::start(ttl, args.verbose).await?;
        let mut gaps = Vec::new();
        for k in 0..moves {
            gaps.push(bench.move_once(k).await?);
        }
        let (mut crashes, mut deaths) = (Vec::new(), Vec::new());
        for _ in 0..kills {
            crashes.extend(bench.kill_once(false).await?);
            deaths.extend(bench.kill_once(true).await?);
        }
        let doubled = bench.report()?.doubled().len();
        let report = bench.report()?;
        let mut per_ttl = serde_json::Map::new();
        for (name, mut v) in [
            ("planned move: last ACCEPT -> new owner's first ACCEPT", gaps),
            ("process crash (kill -9 qslice-runner) -> first ACCEPT per orphaned slice", crashes),
            ("host death (runner, leash, Mailman) -> first ACCEPT per orphaned slice", deaths),
        ] {
            v.sort_by(f64::total_cmp);
            let (p50, p99, max) = (percentile(&v, 50.0), percentile(&v, 99.0), v.last().copied().unwrap_or(f64::NAN));
            table.row(vec![format!("{ttl} s"), name.to_owned(), v.len().to_string(), format!("{p50:.0}"), format!("{p99:.0}"), format!("{max:.0}")]);
            per_ttl.insert(name.to_owned(), serde_json::json!({"samples": v.len(), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1), "max_ms": round(max, 1)}));
        }
        per_ttl.insert("posts".into(), bench.posted.into());
        per_ttl.insert("accepted".into(), report.accepts.len().into());
        per_ttl.insert("doubled".into(), doubled.into());
        per_ttl.insert("shunted".into(), report.shunt.into());
        per_ttl.insert("bad".into(), report.bad.into());
        println!(
            "TTL {ttl} s: {} posts, {} accepted, {doubled} accepted twice (in flight at a kill), {} shunted, {} in bad/",
            bench.posted,
            report.accepts.len(),
            report.shunt,
            report.bad
        );
        summary.insert(format!("ttl_{ttl}s"), serde_json::Value::Object(per_ttl));
    }
    println!("{}", table.render());
    summary.insert("machine".into(), machine());
    summary.insert("seconds".into(), round(started.elapsed().as_secs_f64(), 1).into());
    emit_json(&serde_json::Value::Object(summary), args.json_out.as_deref())
}
