//! Footprint benchmark (issue #7 d): resident memory and idle CPU of one runner and one
//! coordinator.
//!
//! Starts etcd, a coordinator and a runner (both with their default settings: lease TTL
//! 5 s, the runner's poll interval 200 ms) on a queue of 64 slices with no entries, waits
//! until the runner holds every slice, lets everything settle, then watches the idle
//! processes for a window (30 s; 5 s with `--quick`): resident memory (`VmRSS`, sampled
//! every second, and the peak `VmHWM`) and CPU use (`utime + stime` from
//! `/proc/<pid>/stat` over the window). etcd's figures are shown for comparison.
//!
//! Prints a table and a `JSON:` summary line.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use qslice_tests::benchkit::{self, round, ProcSample, Table};
use qslice_tests::cluster::{client, holdings, put_queue};
use qslice_tests::wait::Wait;
use qslice_tests::Etcd;

/// Measure the idle footprint of a runner and a coordinator.
#[derive(Parser)]
struct Args {
    /// A short run for CI: a 5 s idle window.
    #[arg(long)]
    quick: bool,
    /// Length of the idle window in seconds [default: 30; 5 with --quick].
    #[arg(long)]
    idle_seconds: Option<u64>,
    /// Slices of the queue the runner holds.
    #[arg(long, default_value_t = 64)]
    slices: u32,
    /// Write the JSON summary here too.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

const CLUSTER: &str = "fp";
const QUEUE: &str = "in";
/// Time after the last claim for start-up work (first listings, status reports) to end.
const SETTLE: Duration = Duration::from_secs(2);

/// One process's figures over the idle window.
#[derive(serde::Serialize)]
struct Footprint {
    process: &'static str,
    rss_kib_end: u64,
    rss_kib_max: u64,
    peak_rss_kib: u64,
    threads: u64,
    cpu_ms: f64,
    cpu_percent: f64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let idle = Duration::from_secs(args.idle_seconds.unwrap_or(if args.quick { 5 } else { 30 }));
    println!("bench_footprint ({} mode): one runner holding {} slices, one coordinator, no entries, idle window {idle:?}", if args.quick { "quick" } else { "full" }, args.slices);
    println!("{}", benchkit::machine_line());

    let etcd = Etcd::start()?;
    let work = tempfile::Builder::new().prefix("qslice-bench-fp-").tempdir()?;
    let spool = work.path().join("spool");
    std::fs::create_dir_all(spool.join(QUEUE))?;
    let mut c = client(&etcd).await?;
    put_queue(&mut c, CLUSTER, QUEUE, args.slices).await?;
    let coordinator = benchkit::spawn_coordinator(&etcd, &work.path().join("coordinator.log"), "c1", CLUSTER, &[])?;
    let handler = serde_json::to_string(&["/bin/true"])?;
    let runner =
        benchkit::spawn_runner(&etcd, &spool, &work.path().join("state-r1"), &work.path().join("r1.log"), "r1", CLUSTER, &["--handler", "exec", "--handler-command", &handler])?;
    let started = Instant::now();
    let what = format!("the runner to claim all {} slices", args.slices);
    let slices = args.slices as usize;
    Wait::new(Duration::from_secs(60), &what)
        .until_async(|| {
            let mut c = c.clone();
            async move { holdings(&mut c, CLUSTER, QUEUE).await.get("r1").is_some_and(|v| v.len() == slices) }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\nrunner log:\n{}", runner.log()))?;
    let ready_ms = started.elapsed().as_secs_f64() * 1000.0;
    println!("runner holds all {} slices {ready_ms:.0} ms after start; settling {SETTLE:?}, then idling {idle:?}", args.slices);
    tokio::time::sleep(SETTLE).await;

    let procs = [("runner", benchkit::pid_of(&runner, "runner")?), ("coordinator", benchkit::pid_of(&coordinator, "coordinator")?), ("etcd", etcd.pid().unwrap_or(0))];
    let first: Vec<ProcSample> = procs.iter().map(|(_, pid)| ProcSample::take(*pid)).collect::<Result<_>>()?;
    let mut max_rss: Vec<u64> = first.iter().map(|s| s.rss_kib).collect();
    let window_start = Instant::now();
    while window_start.elapsed() < idle {
        let left = idle.saturating_sub(window_start.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        for (i, (_, pid)) in procs.iter().enumerate() {
            max_rss[i] = max_rss[i].max(ProcSample::take(*pid)?.rss_kib);
        }
    }
    let last: Vec<ProcSample> = procs.iter().map(|(_, pid)| ProcSample::take(*pid)).collect::<Result<_>>()?;
    let still_held = holdings(&mut c, CLUSTER, QUEUE).await.get("r1").map_or(0, Vec::len);
    if still_held != args.slices as usize {
        bail!("the runner lost slices while idle: holds {still_held} of {}", args.slices);
    }

    let results: Vec<Footprint> = procs
        .iter()
        .zip(first.iter().zip(&last))
        .zip(&max_rss)
        .map(|(((name, _), (a, b)), max)| Footprint {
            process: name,
            rss_kib_end: b.rss_kib,
            rss_kib_max: *max,
            peak_rss_kib: b.hwm_kib,
            threads: b.threads,
            cpu_ms: round(a.cpu_ms_until(b), 0),
            cpu_percent: round(a.cpu_percent_until(b), 3),
        })
        .collect();
    let mut table = Table::new(&["process (idle)", "RSS MiB", "RSS max MiB", "peak RSS MiB", "threads", "CPU ms", "CPU % of one core"]);
    for r in &results {
        table.row(vec![
            r.process.into(),
            format!("{:.1}", r.rss_kib_end as f64 / 1024.0),
            format!("{:.1}", r.rss_kib_max as f64 / 1024.0),
            format!("{:.1}", r.peak_rss_kib as f64 / 1024.0),
            r.threads.to_string(),
            format!("{:.0}", r.cpu_ms),
            format!("{:.2}", r.cpu_percent),
        ]);
    }
    println!();
    println!("{}", table.render());
    println!("(CPU: utime+stime over the {idle:?} window, 10 ms resolution; RSS: VmRSS at the end and the most seen at 1 s samples; peak: VmHWM since start)");

    let summary = serde_json::json!({
        "benchmark": "footprint",
        "mode": if args.quick { "quick" } else { "full" },
        "profile": benchkit::profile(),
        "machine": benchkit::machine(),
        "slices": args.slices,
        "idle_seconds": idle.as_secs(),
        "runner_ready_ms": round(ready_ms, 0),
        "settings": "defaults: lease TTL 5 s, runner poll interval 200 ms, concurrency 4; coordinator resync 1 s",
        "processes": results,
    });
    drop(runner);
    drop(coordinator);
    drop(etcd);
    benchkit::emit_json(&summary, args.json_out.as_deref())
}
