//! Failover benchmark: how long a dead runner's slices sit idle, and how big the gap of a
//! planned hand-off (drain) is.
//!
//! For each of K host deaths (kill -9 of a runner with its leash and handlers, under a
//! steady stream of entries) it measures, per orphaned slice, the time from the kill to the
//! first entry started by the new owner, and to the slice being drained of what was waiting
//! at the kill; and for K process crashes (kill -9 of qslice-runner alone: its leash
//! revokes the lease) the time to the first entry; at lease TTL 2 s and 5 s.
//! For drains (`qslicectl`-equivalent cordon through etcd) it measures, per moved slice, the
//! gap between the old owner's last entry and the new owner's first, and how long the new
//! owner's first entry waited; then the same drains again with a backlog of 40 entries put
//! into each of the node's slices just before the cordon, so that the gap is the
//! hand-off's own and not time the slice was empty (a slice whose backlog the old owner
//! finished before the hand-off is left out, and counted). Prints a table and a
//! `JSON:` summary line. `--quick` runs 3 host deaths and 3 process crashes at TTL 2 s and
//! one drain.
//!
//! `--nfs` runs the runners in three guests of the NFS bed instead (real Linux NFS clients
//! of an nfs-ganesha export, emulated; the recommended mount options; TTL 5 s, the guests'
//! one), entries written through NFS by a writer in a guest at 20 a second: per orphaned
//! slice the time from a kill -9 of a guest's runner (its leash revokes the lease: a
//! process crash) to the first entry started by the new owner, and per moved slice the gap of a drain (the old
//! owner's last entry to the new owner's first, arrivals included); then the death of a
//! whole guest (its QEMU killed with an entry in flight): per orphaned slice the time to
//! the first entry elsewhere, and per `.bak` it left the time to its recovery at the new
//! owner's claim (qslice's bound on real hosts: TTL + 1 s). With `--quick`: two guests,
//! the writer at 5 a second, one kill, one drain and the guest death.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Parser;
use qslice_proto::keys::Keys;
use qslice_proto::records::{Cordon, Record, RECORD_VERSION};
use qslice_tests::cluster::{client, holdings, put_queue, start_coordinator, start_runner, Spool};
use qslice_tests::now_ns;
use qslice_tests::wait_for_async;
use qslice_tests::{Etcd, Proc};

/// Measure failover and drain gaps.
#[derive(Parser)]
struct Args {
    /// A short run for CI: 3 kills at TTL 2 s, one drain.
    #[arg(long)]
    quick: bool,
    /// Kills per TTL in full mode.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Drains per TTL in full mode, of each kind (each moves 4 slices: 25 give a p99 of
    /// 100 samples, not the largest of a few dozen).
    #[arg(long, default_value_t = 25)]
    drains: usize,
    /// Write the JSON summary here too.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    /// Run the runners in guests of the NFS bed (kills and drains: `--nfs-runs` each).
    #[arg(long)]
    nfs: bool,
    /// Kills and drains in NFS mode (full mode).
    #[arg(long, default_value_t = 6)]
    nfs_runs: usize,
}

const SLICES: u32 = 12;
/// Entries put into each slice of a node just before a backlog drain's cordon.
const BACKLOG: usize = 40;
const LONG: Duration = Duration::from_secs(60);

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[derive(serde::Serialize)]
struct Stats {
    samples: usize,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    Stats { samples: v.len(), p50_ms: percentile(&v, 50.0), p95_ms: percentile(&v, 95.0), p99_ms: percentile(&v, 99.0), max_ms: v.last().copied().unwrap_or(f64::NAN) }
}

struct Cluster {
    etcd: Etcd,
    spool: Spool,
    _coordinator: qslice_tests::cluster::Coordinator,
    runners: BTreeMap<String, Proc>,
    ttl: String,
    writer_stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    writer: Option<std::thread::JoinHandle<()>>,
    enqueued: std::sync::Arc<std::sync::Mutex<Vec<(String, u128, u32)>>>,
}

impl Cluster {
    async fn start(ttl_secs: u64) -> Result<Cluster> {
        let etcd = Etcd::start()?;
        let spool = Spool::new(&["in"])?;
        let mut c = client(&etcd).await?;
        put_queue(&mut c, "t", "in", SLICES).await?;
        let ttl = format!("{ttl_secs}s");
        let coordinator = start_coordinator(&etcd, &spool, "c1", "t", &["--lease-ttl", &ttl])?;
        let mut runners = BTreeMap::new();
        for id in ["r1", "r2", "r3"] {
            runners.insert(id.to_owned(), start_runner(&etcd, &spool, id, "t", &["--lease-ttl", &ttl], &[("QSLICE_TEST_DELAY", "0.01")])?);
        }
        let enqueued = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (q, enqueued, stop) = (spool.queue("in"), enqueued.clone(), writer_stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let at = now_ns();
                    if let Ok(name) = q.enqueue(format!("m{i}").as_bytes()) {
                        enqueued.lock().expect("lock").push((name.filebase.clone(), at, name.slice(SLICES)));
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        let cluster = Cluster { etcd, spool, _coordinator: coordinator, runners, ttl, writer_stop, writer: Some(writer), enqueued };
        cluster.wait_balanced().await?;
        Ok(cluster)
    }

    /// Waits until each runner holds 4 slices and no hand-off is pending (every slice's
    /// claim is held by its assigned owner): a measurement must not start mid-rebalance.
    async fn wait_balanced(&self) -> Result<()> {
        let c = client(&self.etcd).await?;
        let keys = Keys::new("t")?;
        wait_for_async(LONG, "4 slices on each of the 3 runners, held by their assigned owners", || async {
            let h = holdings(&mut c.clone(), "t", "in").await;
            let balanced = h.len() == 3 && h.values().all(|v| v.len() == 4);
            let Ok(resp) = c.clone().get(keys.assignments_prefix(), Some(etcd_client::GetOptions::new().with_prefix())).await else { return false };
            let settled = resp.kvs().iter().all(|kv| {
                let Ok(a) = qslice_proto::records::Assignment::decode(kv.value()) else { return false };
                let Some(qslice_proto::keys::Key::Assignment { node, .. }) = keys.parse(kv.key()) else { return true };
                let held = h.get(&node);
                let all = a.slices.iter().all(|s| held.is_some_and(|v| v.contains(&s)));
                all
            });
            balanced && settled
        })
        .await
    }

    /// Kills one runner; per orphaned slice, ms from the kill to the new owner's first
    /// start and to the slice's backlog (as of the kill) being finished. A host death kills
    /// qslice-runner, its leash and its handlers together (the lease must expire); a
    /// process crash kills qslice-runner alone (its leash revokes the lease).
    async fn kill_once(&mut self, victim: &str, host: bool) -> Result<Vec<(f64, f64)>> {
        let mut c = client(&self.etcd).await?;
        let slices = holdings(&mut c, "t", "in").await.remove(victim).context("victim holds slices")?;
        let waiting: Vec<(String, u32)> = {
            let finished = self.spool.finished();
            self.enqueued.lock().expect("lock").iter().filter(|(e, _, s)| slices.contains(s) && !finished.contains_key(e)).map(|(e, _, s)| (e.clone(), *s)).collect()
        };
        let proc = self.runners.get_mut(victim).context("victim")?;
        let tree = qslice_tests::freezer::process_tree(proc.pid().context("victim runs")?);
        let killed_ns = now_ns();
        if host {
            for pid in &tree {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
        }
        proc.kill();
        let spool = &self.spool;
        wait_for_async(LONG, "each orphaned slice started by a new owner and its backlog finished", || async {
            let records = spool.records();
            let finished = spool.finished();
            slices.iter().all(|s| records.iter().any(|r| r.slice == *s && r.what == "start" && r.node != victim && r.at_ns > killed_ns))
                && waiting.iter().all(|(e, _)| finished.contains_key(e))
        })
        .await?;
        let records = self.spool.records();
        let mut out = Vec::new();
        for s in &slices {
            let first = records.iter().filter(|r| r.slice == *s && r.what == "start" && r.node != victim && r.at_ns > killed_ns).map(|r| r.at_ns).min().unwrap_or(killed_ns);
            let drained = waiting
                .iter()
                .filter(|(_, ws)| ws == s)
                .filter_map(|(e, _)| records.iter().filter(|r| &r.filebase == e && r.what == "end").map(|r| r.at_ns).max())
                .max()
                .unwrap_or(first);
            out.push(((first - killed_ns) as f64 / 1e6, (drained.max(first) - killed_ns) as f64 / 1e6));
        }
        // Bring it back and let the cluster rebalance before the next kill.
        let ttl = self.ttl.clone();
        self.runners.insert(victim.to_owned(), start_runner(&self.etcd, &self.spool, victim, "t", &["--lease-ttl", &ttl], &[("QSLICE_TEST_DELAY", "0.01")])?);
        self.wait_balanced().await?;
        Ok(out)
    }

    /// Cordons a runner; per moved slice, ms between its last entry and the new owner's
    /// first, and the part of it the new owner's first entry waited in the queue (from its
    /// arrival, if it came after the old owner's last entry): the rest was an empty slice.
    ///
    /// With `backlog` > 0, that many entries are put into each of the node's slices just
    /// before the cordon: the slices are never empty at the hand-off, and the gap is the
    /// hand-off's own, from the old owner's last entry ending to the new owner's first.
    async fn drain_once(&mut self, node: &str, backlog: usize) -> Result<Vec<(f64, f64, bool)>> {
        let mut c = client(&self.etcd).await?;
        let slices = holdings(&mut c, "t", "in").await.remove(node).context("node holds slices")?;
        let keys = Keys::new("t")?;
        let cordon = Cordon { v: RECORD_VERSION, reason: "benchmark".into(), since_unix_ms: 0 };
        let queue = self.spool.queue("in");
        let mut backlogged = Vec::new();
        for s in &slices {
            for i in 0..backlog {
                let at = now_ns();
                let name = queue.enqueue_in_slice(format!("backlog {i}").as_bytes(), *s, SLICES)?;
                self.enqueued.lock().expect("lock").push((name.filebase.clone(), at, *s));
                backlogged.push(name.filebase);
            }
        }
        let cordoned_ns = now_ns();
        c.put(keys.cordon(node), cordon.encode(), None).await?;
        wait_for_async(LONG, "the drained node holds nothing, its slices process elsewhere and the backlog is done", || async {
            let records = self.spool.records();
            let finished = self.spool.finished();
            !holdings(&mut c.clone(), "t", "in").await.contains_key(node)
                && slices.iter().all(|s| records.iter().any(|r| r.slice == *s && r.what == "start" && r.node != node && r.at_ns > cordoned_ns))
                && backlogged.iter().all(|e| finished.contains_key(e))
        })
        .await?;
        let records = self.spool.records();
        let arrived: BTreeMap<String, u128> = self.enqueued.lock().expect("lock").iter().map(|(e, at, _)| (e.clone(), *at)).collect();
        let gaps: Vec<(f64, f64, bool)> = slices
            .iter()
            .map(|s| {
                // From the old owner's last entry, or from the cordon if it had been idle
                // (or had only just claimed the slice): an earlier tenure is no gap.
                let last_old = records.iter().filter(|r| r.slice == *s && r.node == node && r.what == "end").map(|r| r.at_ns).max().unwrap_or(cordoned_ns).max(cordoned_ns);
                let first = records.iter().filter(|r| r.slice == *s && r.node != node && r.what == "start" && r.at_ns > cordoned_ns).min_by_key(|r| r.at_ns);
                let first_new = first.map_or(last_old, |r| r.at_ns);
                let arrival = first.and_then(|r| arrived.get(&r.filebase)).copied();
                let waited_from = arrival.map_or(last_old, |at| at.max(last_old));
                // Whether that entry waited through the whole hand-off (it was there before
                // the old owner's last entry ended): then the gap is the hand-off's own.
                let waited_through = arrival.is_some_and(|at| at <= last_old);
                (first_new.saturating_sub(last_old) as f64 / 1e6, first_new.saturating_sub(waited_from) as f64 / 1e6, waited_through)
            })
            .collect();
        if gaps.iter().any(|(g, w, _)| *g > 1000.0 || *w > 30.0) && std::env::var("QSLICE_BENCH_DEBUG").is_ok() {
            eprintln!("slow drain of {node} at {cordoned_ns}: gaps {gaps:?}");
            // The timeline of each slow slice, in ms from the cordon: log lines naming it and
            // its records.
            for (s, (_, w, _)) in slices.iter().zip(&gaps) {
                if *w <= 30.0 {
                    continue;
                }
                let rel = |ns: u128| (ns as f64 - cordoned_ns as f64) / 1e6;
                let mut events: Vec<(f64, String)> = Vec::new();
                for n in ["r1", "r2", "r3", "coordinator-c1"] {
                    let log = std::fs::read_to_string(self.spool.scratch(&format!("{n}.log"))).unwrap_or_default();
                    for line in log.lines() {
                        let Some(at) = line.split_whitespace().next().and_then(|t| humantime::parse_rfc3339(t).ok()) else { continue };
                        let ns = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
                        let this_slice = line.contains(&format!("slice={s} ")) || line.ends_with(&format!("slice={s}"));
                        if (this_slice && ns + 2_000_000_000 > cordoned_ns) || (ns + 5_000_000 > cordoned_ns && ns < cordoned_ns + 150_000_000) {
                            events.push((rel(ns), format!("{n}: {}", line.split_once(' ').map_or(line, |x| x.1))));
                        }
                    }
                }
                for r in records.iter().filter(|r| r.slice == *s && r.at_ns + 500_000_000 > cordoned_ns) {
                    events.push((rel(r.at_ns), format!("record {} {} by {}", r.what, r.filebase, r.node)));
                    if let Some(at) = arrived.get(&r.filebase) {
                        events.push((rel(*at), format!("arrived {}", r.filebase)));
                    }
                }
                events.sort_by(|a, b| a.0.total_cmp(&b.0));
                events.dedup();
                eprintln!("--- slice {s}: waited {w:.1} ms");
                for (at, what) in events {
                    eprintln!("{at:>9.1} {what}");
                }
            }
        }
        c.delete(keys.cordon(node), None).await?;
        self.wait_balanced().await?;
        Ok(gaps)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.writer_stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.nfs {
        return nfs::main(&args);
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(local_main(args))
}

async fn local_main(args: Args) -> Result<()> {
    let started = Instant::now();
    let runs: Vec<(u64, usize, usize)> = if args.quick { vec![(2, 3, 1)] } else { vec![(2, args.kills, args.drains), (5, args.kills, args.drains)] };
    let mut summary = serde_json::Map::new();
    println!("{:<6} {:<29} {:>7} {:>8} {:>8} {:>8} {:>8}", "TTL", "measure", "samples", "p50 ms", "p95 ms", "p99 ms", "max ms");
    for (ttl, kills, drains) in runs {
        let mut cluster = Cluster::start(ttl).await?;
        let (mut to_first, mut to_drained, mut gaps, mut crash_first) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut waits = Vec::new();
        for k in 0..kills {
            let victim = ["r1", "r2", "r3"][k % 3];
            for (first, drained) in cluster.kill_once(victim, true).await? {
                to_first.push(first);
                to_drained.push(drained);
            }
            for (first, _) in cluster.kill_once(victim, false).await? {
                crash_first.push(first);
            }
        }
        for d in 0..drains {
            for (gap, waited, _) in cluster.drain_once(["r1", "r2", "r3"][d % 3], 0).await? {
                gaps.push(gap);
                waits.push(waited);
            }
        }
        // Only slices whose new owner's first entry waited through the hand-off count: one
        // whose backlog the old owner finished first had nothing waiting.
        let (mut backlog_gaps, mut emptied) = (Vec::new(), 0usize);
        for d in 0..drains {
            for (gap, _, waited_through) in cluster.drain_once(["r1", "r2", "r3"][d % 3], BACKLOG).await? {
                if waited_through {
                    backlog_gaps.push(gap);
                } else {
                    emptied += 1;
                }
            }
        }
        let rows = [
            ("host death -> first entry", stats(to_first)),
            ("host death -> drained", stats(to_drained)),
            ("process crash -> first", stats(crash_first)),
            ("drain: hand-off gap", stats(gaps)),
            ("drain: first entry waited", stats(waits)),
            ("drain, backlog: hand-off gap", stats(backlog_gaps)),
        ];
        let mut per_ttl = serde_json::Map::new();
        for (name, s) in rows {
            println!("{:<6} {:<29} {:>7} {:>8.0} {:>8.0} {:>8.0} {:>8.0}", format!("{ttl}s"), name, s.samples, s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms);
            per_ttl.insert(name.to_owned(), serde_json::to_value(&s)?);
        }
        println!("{:<6} backlog drains: {emptied} slices left out, their backlog finished by the old owner before the hand-off", format!("{ttl}s"));
        per_ttl.insert("backlog drains: slices left out (backlog finished before the hand-off)".into(), emptied.into());
        summary.insert(format!("ttl_{ttl}s"), serde_json::Value::Object(per_ttl));
    }
    summary.insert("profile".into(), (if cfg!(debug_assertions) { "debug" } else { "release" }).into());
    summary.insert("seconds".into(), started.elapsed().as_secs_f64().into());
    let json = serde_json::Value::Object(summary).to_string();
    println!("JSON: {json}");
    if let Some(path) = args.json_out {
        std::fs::write(path, &json)?;
    }
    Ok(())
}

/// The runners in guests of the NFS bed.
mod nfs {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context, Result};
    use qslice_proto::keys::Keys;
    use qslice_proto::records::{Cordon, Record, RECORD_VERSION};
    use qslice_testbeds::nfs::{enter_private_network, BedOptions, GuestImage, GuestProc, NfsBed};
    use qslice_tests::cluster::{client, holdings, put_queue, start_coordinator, Rec, Spool};
    use qslice_tests::nfs::{baks_in, enqueued, enqueued_path, records, records_path, recovered_at, runner_script, writer_script, Tail};
    use qslice_tests::now_ns;
    use qslice_tests::Etcd;

    use super::{stats, Args, LONG};

    const SLICES: u32 = 6;
    const MOUNT: &str = "vers=4.1,lookupcache=none";
    const NODES: [&str; 3] = ["g1", "g2", "g3"];

    /// The bed of a run: its guests (the last one writes the entries) and the writer's
    /// interval. The short mode takes two guests and a slower writer: its figures are not
    /// kept, and emulated guests are the heaviest part of the test suite.
    struct Shape {
        nodes: &'static [&'static str],
        write_every: Duration,
    }

    pub(super) fn main(args: &Args) -> Result<()> {
        let started = Instant::now();
        let image = GuestImage::for_this_target()?;
        enter_private_network()?;
        let shape =
            if args.quick { Shape { nodes: &NODES[..2], write_every: Duration::from_millis(200) } } else { Shape { nodes: &NODES, write_every: Duration::from_millis(50) } };
        let mut bed = NfsBed::start(&image, &BedOptions::new(shape.nodes.len(), MOUNT))?;
        let runs = if args.quick { 1 } else { args.nfs_runs };
        let m = tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(measure(&mut bed, runs, &shape))?;
        println!("{:<6} {:<29} {:>7} {:>8} {:>8} {:>8} {:>8}", "TTL", "measure (NFS, guests)", "samples", "p50 ms", "p95 ms", "p99 ms", "max ms");
        let mut summary = serde_json::Map::new();
        let measures = [
            ("runner kill -> first entry", stats(m.takeovers)),
            ("drain: hand-off gap", stats(m.gaps)),
            ("guest death -> .bak recovered", stats(m.death_recoveries)),
            ("guest death -> first entry", stats(m.death_takeovers)),
        ];
        for (name, s) in measures {
            println!("{:<6} {:<29} {:>7} {:>8.0} {:>8.0} {:>8.0} {:>8.0}", "5s", name, s.samples, s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms);
            summary.insert(name.to_owned(), serde_json::to_value(&s)?);
        }
        summary.insert("mount".into(), MOUNT.into());
        summary.insert("seconds".into(), started.elapsed().as_secs_f64().into());
        let json = serde_json::Value::Object(summary).to_string();
        println!("JSON: {json}");
        if let Some(path) = &args.json_out {
            std::fs::write(path, &json)?;
        }
        Ok(())
    }

    async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) -> Result<()> {
        let deadline = Instant::now() + LONG * 3;
        while !cond().await {
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// The last lines of the coordinator's and each runner's log, for a run that stalled.
    fn post_mortem(coordinator: &str, runners: &BTreeMap<&str, GuestProc>) {
        let tail = |log: &str| log.lines().rev().take(80).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        eprintln!("--- coordinator\n{}", tail(coordinator));
        for (node, proc) in runners {
            eprintln!("--- runner {node}\n{}", tail(&proc.output()));
        }
    }

    /// What one bed run measured, in ms.
    struct Measured {
        /// Runner kill -> first entry elsewhere, per orphaned slice.
        takeovers: Vec<f64>,
        /// Drain gaps, per moved slice.
        gaps: Vec<f64>,
        /// Guest death -> recovery at a claim, per `.bak` the dead guest left.
        death_recoveries: Vec<f64>,
        /// Guest death -> first entry elsewhere, per orphaned slice.
        death_takeovers: Vec<f64>,
    }

    /// Runner kills, drains, then the death of guest g1.
    async fn measure(bed: &mut NfsBed, runs: usize, shape: &Shape) -> Result<Measured> {
        let nodes = shape.nodes;
        let writer_node = nodes[nodes.len() - 1];
        let etcd = Etcd::start()?;
        let spool = Spool::new(&[])?;
        let mut c = client(&etcd).await?;
        put_queue(&mut c, "t", "in", SLICES).await?;
        // Emulated guests claim in seconds and, on a loaded machine, release late: with the
        // default claim deadline (500 ms) and the tests' revoke deadline (3 s), slices
        // bounced between two starved guests, each fenced in turn, and never settled.
        let coordinator = start_coordinator(&etcd, &spool, "c1", "t", &["--claim-deadline", "5s", "--revoke-deadline", "60s"])?;
        let root = bed.export().join("spool");
        let queue = root.join("in");
        let (rc, out) = bed.guest(writer_node).run(&format!("mkdir -p {}\n", queue.display()), LONG)?;
        if rc != 0 {
            bail!("mkdir over NFS: {out}");
        }
        let start = |node: &str| -> Result<GuestProc> {
            let g = bed.guest(node);
            Ok(g.spawn(&runner_script(g, "t", etcd.client_port(), &root, "QSLICE_TEST_DELAY=0.05", ""))?)
        };
        let mut runners: BTreeMap<&str, GuestProc> = BTreeMap::new();
        for node in nodes {
            runners.insert(node, start(node)?);
        }
        let balanced = async |c: &mut etcd_client::Client| {
            let h = holdings(c, "t", "in").await;
            h.len() == nodes.len() && h.values().all(|s| s.len() == SLICES as usize / nodes.len())
        };
        until("every slice claimed, as many per guest", async || balanced(&mut c.clone()).await).await?;
        let tail = Tail::follow(nodes.iter().map(|n| records_path(bed.guest(n))).chain([enqueued_path(bed.guest(writer_node))]).collect());
        let writer = bed.guest(writer_node).spawn(&writer_script(bed.guest(writer_node), &queue, 1_000_000, shape.write_every))?;
        until("entries processed", async || starts(&tail).len() >= 20).await?;

        let mut takeovers = Vec::new();
        for k in 0..runs {
            let victim = nodes[k % 2];
            let orphaned: BTreeSet<u32> = holdings(&mut c, "t", "in").await.remove(victim).context("the victim holds slices")?.into_iter().collect();
            let proc = runners.remove(victim).context("runner")?;
            proc.signal("KILL")?;
            until("the kill", async || proc.signal_sent()).await?;
            let killed = now_ns();
            let mut first = BTreeMap::new();
            until("every orphaned slice processing elsewhere", async || {
                first = first_starts(&tail, victim, killed, &orphaned);
                first.len() == orphaned.len()
            })
            .await?;
            takeovers.extend(first.values().map(|t| (t - killed) as f64 / 1e6));
            runners.insert(victim, start(victim)?);
            until("the restarted runner back and balanced", async || balanced(&mut c.clone()).await).await?;
        }

        let mut gaps = Vec::new();
        for d in 0..runs {
            let victim = nodes[d % nodes.len()];
            let drained = drain(&mut c, &tail, victim).await;
            if drained.is_err() {
                let enqueued = std::fs::read_to_string(enqueued_path(bed.guest(writer_node))).unwrap_or_default();
                eprintln!("--- writer: {} entries enqueued, the last: {:?}; its output:\n{}", enqueued.lines().count(), enqueued.lines().last(), writer.output());
                post_mortem(&coordinator.proc.log(), &runners);
                keep_coordinator_log(bed, &coordinator.proc.log());
            }
            gaps.extend(drained?);
            until("the uncordoned node back and balanced", async || balanced(&mut c.clone()).await).await?;
        }
        let (death_recoveries, death_takeovers) = guest_death(bed, &mut c, &tail, &runners).await?;
        keep_coordinator_log(bed, &coordinator.proc.log());
        Ok(Measured { takeovers, gaps, death_recoveries, death_takeovers })
    }

    /// The handler starts seen in the guests' records.
    fn starts(tail: &Tail) -> Vec<Rec> {
        records(&tail.seen()).into_iter().filter(|r| r.rec.what == "start").map(|r| r.rec).collect()
    }

    /// The first start of each of `slices` on a node other than `not_on` after `since_ns`.
    fn first_starts(tail: &Tail, not_on: &str, since_ns: u128, slices: &BTreeSet<u32>) -> BTreeMap<u32, u128> {
        let mut first = BTreeMap::new();
        for r in starts(tail).iter().filter(|r| r.node != not_on && r.at_ns > since_ns && slices.contains(&r.slice)) {
            let t = first.entry(r.slice).or_insert(r.at_ns);
            *t = (*t).min(r.at_ns);
        }
        first
    }

    /// A drain of `victim` (a cordon, then its uncordon once every slice it held is
    /// processing elsewhere): each moved slice's hand-off gap in ms.
    async fn drain(c: &mut etcd_client::Client, tail: &Tail, victim: &str) -> Result<Vec<f64>> {
        let keys = Keys::new("t")?;
        let mut gaps = Vec::new();
        let moved: BTreeSet<u32> = holdings(c, "t", "in").await.remove(victim).context("the victim holds slices")?.into_iter().collect();
        // A gap needs the old owner's last entry: each slice processing there first.
        let held_since = now_ns();
        until("the victim processing each of its slices", async || {
            let all = starts(tail);
            moved.iter().all(|s| all.iter().any(|r| r.node == victim && r.slice == *s && r.at_ns > held_since))
        })
        .await?;
        let cordoned = now_ns();
        let cordon = Cordon { v: RECORD_VERSION, reason: "benchmark".into(), since_unix_ms: 0 };
        c.put(keys.cordon(victim), cordon.encode(), None).await?;
        let mut first = BTreeMap::new();
        let moved_elsewhere = until("every moved slice processing elsewhere", async || {
            first = first_starts(tail, victim, cordoned, &moved);
            first.len() == moved.len()
        })
        .await;
        if let Err(e) = moved_elsewhere {
            eprintln!("drain of {victim} (slices {moved:?}) stalled; holdings now {:?}", holdings(c, "t", "in").await);
            return Err(e);
        }
        // A slice's hand-off gap: how long its first entry on the new owner waited beyond
        // both the old owner's last work on the slice and its own arrival. The writer in a
        // guest is slow (a few entries a second over NFS), so a slice is often empty at the
        // hand-off: time with nothing to take is no gap.
        let seen = tail.seen();
        let all: Vec<_> = records(&seen).into_iter().map(|r| r.rec).collect();
        let arrived = enqueued(&seen, SLICES);
        for (slice, new_first) in &first {
            let Some(taken) = all.iter().find(|r| r.slice == *slice && r.what == "start" && r.at_ns == *new_first) else { continue };
            let last_old = all.iter().filter(|r| r.node == victim && r.slice == *slice && r.at_ns < *new_first).map(|r| r.at_ns).max().unwrap_or(cordoned).max(cordoned);
            let Some((arrival, _)) = arrived.get(&taken.filebase) else { continue };
            let waited_from = last_old.max(*arrival);
            gaps.push((new_first - waited_from) as f64 / 1e6);
            let ms = |t: u128| (t as f64 - cordoned as f64) / 1e6;
            eprintln!(
                "drain of {victim}: slice {slice}: its last work there {:.0} ms, its first entry on {} arrived {:.0} ms and started {:.0} ms after the cordon",
                ms(last_old),
                taken.node,
                ms(*arrival),
                ms(*new_first)
            );
        }
        c.delete(keys.cordon(victim), None).await?;
        Ok(gaps)
    }

    /// Kills g1's QEMU once it has an entry of its slices in flight (or after a bounded
    /// wait without one) and measures, in ms from the death, each `.bak` it left recovered
    /// at a claim, and each of its slices' first entry elsewhere.
    async fn guest_death(bed: &mut NfsBed, c: &mut etcd_client::Client, tail: &Tail, runners: &BTreeMap<&str, GuestProc>) -> Result<(Vec<f64>, Vec<f64>)> {
        let victim = "g1";
        let queue = bed.export().join("spool").join("in");
        // The runners' logs, followed from before the death: their recovery lines.
        let logs = Tail::follow(runners.values().map(GuestProc::log_path).collect());
        let orphaned: BTreeSet<u32> = holdings(c, "t", "in").await.remove(victim).context("the victim holds slices")?.into_iter().collect();
        let in_flight = || baks_in(&queue).into_iter().filter(|b| enqueued(&tail.seen(), SLICES).get(b).is_some_and(|(_, s)| orphaned.contains(s))).collect::<BTreeSet<_>>();
        let waited = Instant::now();
        while in_flight().is_empty() && waited.elapsed() < LONG {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bed.guest_mut(victim).kill();
        let death = now_ns();
        let left = in_flight();
        let mut first = BTreeMap::new();
        until("every slice of the dead guest processing elsewhere", async || {
            first = first_starts(tail, victim, death, &orphaned);
            first.len() == orphaned.len()
        })
        .await?;
        until("every .bak the dead guest left recovered", async || left.iter().all(|b| recovered_at(&logs.seen(), b, death).is_some())).await?;
        let seen = logs.seen();
        let recoveries: Vec<f64> = left.iter().filter_map(|b| recovered_at(&seen, b, death)).map(|t| (t - death) as f64 / 1e6).collect();
        eprintln!("death of {victim} (slices {orphaned:?}): its .bak files {left:?} recovered after {recoveries:?} ms");
        Ok((recoveries, first.values().map(|t| (t - death) as f64 / 1e6).collect()))
    }

    /// Beside a kept bed (`QSLICE_KEEP_NFS_BED`), the coordinator's log, for a post-mortem.
    fn keep_coordinator_log(bed: &NfsBed, log: &str) {
        if std::env::var_os("QSLICE_KEEP_NFS_BED").is_some() {
            if let Some(dir) = bed.export().parent() {
                let _ = std::fs::write(dir.join("coordinator.log"), log);
            }
        }
    }
}
