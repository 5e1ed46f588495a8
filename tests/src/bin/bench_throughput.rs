//! Throughput benchmark (issue #7 b): entries per second through one runner and through
//! three runners sharing one spool, with the move handler and with the worker handler,
//! beside the raw filesystem ceiling measured in the same run. The worker handler is
//! measured with two coprocesses: a `sh` loop, whose `read` makes a `read(2)` per byte,
//! and `bench_line_worker`, which reads buffered like most workers (`--handlers`,
//! `--runner-counts` choose what to run).
//!
//! How: one set of entries is written once with `QueueDir::enqueue` (Mailman's way:
//! `.tmp`, fsync, rename) and hard-linked into a fresh staging directory for every run, so
//! each run sees the same names. For each configuration a coordinator and the runners
//! start on an empty queue and claim every slice; then the staged directory is renamed
//! over the empty queue directory (the clock starts) and the benchmark polls until no
//! `.pck` or `.bak` is left (the clock stops). The ceiling is a tight loop in this process
//! over the same entries with no coordination: one listing, then per entry `rename(.pck ->
//! .bak)` and `unlink` (the worker handler's file work) or a rename into the target
//! directory (the move handler's). Every figure is the median of three runs (one with
//! `--quick`); the runners of a configuration stay up between its runs.
//!
//! Prints a table and a `JSON:` summary line. `--quick` (for CI) uses fewer entries.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use qslice_common::spool::QueueDir;
use qslice_tests::benchkit::{self, round, ProcSample, Table};
use qslice_tests::cluster::{client, holdings, put_queue};
use qslice_tests::wait::Wait;
use qslice_tests::{Etcd, Proc};

/// Measure entries per second through qslice runners against the raw filesystem.
#[derive(Parser)]
struct Args {
    /// A short run for CI (5,000 entries).
    #[arg(long)]
    quick: bool,
    /// Entries per run [default: 50,000; 5,000 with --quick].
    #[arg(long)]
    entries: Option<usize>,
    /// Slices of the queue.
    #[arg(long, default_value_t = 64)]
    slices: u32,
    /// The runners' --concurrency (entries in flight per runner).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Runs per configuration, median reported [default: 3; 1 with --quick].
    #[arg(long)]
    runs: Option<usize>,
    /// The handlers to measure, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "move,worker,worker-lines")]
    handlers: Vec<Kind>,
    /// The runner counts to measure each handler with, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    runner_counts: Vec<usize>,
    /// Write the JSON summary here too.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

/// The runners' poll interval: short, so that the start of a run is noticed at once.
const POLL_INTERVAL: &str = "50ms";
/// The worker handler's coprocess: answers `ok` to every path.
const WORKER: &str = "while read p; do echo ok; done";
const QUEUE: &str = "in";

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Kind {
    /// The move handler.
    Move,
    /// The worker handler with a `sh` loop as its coprocess.
    Worker,
    /// The worker handler with `bench_line_worker` (buffered reads) as its coprocess.
    WorkerLines,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Move => "move",
            Kind::Worker => "worker",
            Kind::WorkerLines => "worker-lines",
        }
    }

    /// The handler whose raw file work this one's ceiling is.
    fn file_work(self) -> Kind {
        match self {
            Kind::WorkerLines => Kind::Worker,
            k => k,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Move => "move handler",
            Kind::Worker => "worker handler (sh loop)",
            Kind::WorkerLines => "worker handler (bench_line_worker)",
        }
    }
}

/// One configuration's result.
#[derive(serde::Serialize)]
struct RunResult {
    handler: &'static str,
    #[serde(skip)]
    label: &'static str,
    runners: usize,
    entries: usize,
    seconds: f64,
    entries_per_s: f64,
    entries_per_s_runs: Vec<f64>,
    ratio_to_ceiling: f64,
    runner_cpu_ms: f64,
    runner_cpu_us_per_entry: f64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let entries = args.entries.unwrap_or(if args.quick { 5_000 } else { 50_000 });
    println!(
        "bench_throughput ({} mode): {entries} entries, {} slices, concurrency {} per runner, poll {POLL_INTERVAL}",
        if args.quick { "quick" } else { "full" },
        args.slices,
        args.concurrency
    );
    println!("{}", benchkit::machine_line());

    let work = tempfile::Builder::new().prefix("qslice-bench-tp-").tempdir()?;
    let master = QueueDir::new(work.path().join("master"), QUEUE);
    std::fs::create_dir_all(master.dir())?;
    let payload = vec![b'x'; 1024];
    let started = Instant::now();
    for _ in 0..entries {
        master.enqueue(&payload)?;
    }
    let enqueue_per_s = entries as f64 / started.elapsed().as_secs_f64();
    println!("wrote {entries} entries with QueueDir::enqueue (.tmp, fsync, rename): {enqueue_per_s:.0}/s");

    let runs = args.runs.unwrap_or(if args.quick { 1 } else { 3 }).max(1);

    let (list_all_ms, list_third_ms, list_none_ms) = listings(&master, args.slices, entries)?;
    println!("one listing of {entries} entries (median of 5): {list_all_ms:.1} ms keeping every slice's entries, {list_third_ms:.1} ms keeping a third, {list_none_ms:.1} ms keeping none (counts only)");
    let mut ceiling = Vec::new();
    for kind in [Kind::Move, Kind::Worker] {
        let mut rates = Vec::new();
        for i in 0..runs {
            let dir = work.path().join(format!("ceiling-{}-{i}", kind.name()));
            rates.push(raw_ceiling(master.dir(), &dir, kind, entries)?);
        }
        ceiling.push((kind, median(rates)));
    }
    let ceiling_of = |kind: Kind| ceiling.iter().find(|(k, _)| *k == kind.file_work()).map_or(f64::NAN, |(_, c)| *c);

    let etcd = Etcd::start()?;
    let mut results = Vec::new();
    for kind in args.handlers.clone() {
        for runners in args.runner_counts.clone() {
            let measured = run_config(&etcd, work.path(), master.dir(), kind, runners, entries, runs, &args).await?;
            let result = RunResult::of(kind, runners, entries, &measured, ceiling_of(kind));
            println!("  {} handler, {runners} runner(s): {:.0} entries/s", kind.name(), result.entries_per_s);
            results.push(result);
        }
    }
    print_table(entries, &ceiling_of, &results);

    let summary = serde_json::json!({
        "benchmark": "throughput",
        "mode": if args.quick { "quick" } else { "full" },
        "profile": benchkit::profile(),
        "machine": benchkit::machine(),
        "entries": entries,
        "slices": args.slices,
        "concurrency": args.concurrency,
        "runs_per_figure": runs,
        "poll_interval": POLL_INTERVAL,
        "enqueue_per_s": round(enqueue_per_s, 0),
        "listing_ms": { "all_slices": round(list_all_ms, 2), "a_third": round(list_third_ms, 2), "none": round(list_none_ms, 2) },
        "ceiling_entries_per_s": {
            "move": round(ceiling_of(Kind::Move), 0),
            "worker": round(ceiling_of(Kind::Worker), 0),
        },
        "runs": results,
    });
    benchkit::emit_json(&summary, args.json_out.as_deref())
}

impl RunResult {
    /// The figures of `measured` (seconds and runner CPU ms per run) for `runners` runners
    /// of handler `kind`, against the raw `ceiling` of its file work.
    fn of(kind: Kind, runners: usize, entries: usize, measured: &[(f64, f64)], ceiling: f64) -> RunResult {
        let rates: Vec<f64> = measured.iter().map(|(secs, _)| entries as f64 / secs.max(1e-9)).collect();
        let eps = median(rates.clone());
        let cpu_ms = median(measured.iter().map(|(_, cpu)| *cpu).collect());
        RunResult {
            handler: kind.name(),
            label: kind.label(),
            runners,
            entries,
            seconds: round(entries as f64 / eps, 3),
            entries_per_s: round(eps, 0),
            entries_per_s_runs: rates.iter().map(|r| round(*r, 0)).collect(),
            ratio_to_ceiling: round(eps / ceiling, 3),
            runner_cpu_ms: round(cpu_ms, 0),
            runner_cpu_us_per_entry: round(cpu_ms * 1000.0 / entries as f64, 1),
        }
    }
}

/// One listing of the whole queue in ms (median of 5), as a runner holding every slice
/// makes it, as one of three runners holding a third of the slices makes it (entries kept
/// only of those; the others counted), and keeping none.
fn listings(master: &QueueDir, slices: u32, entries: usize) -> Result<(f64, f64, f64)> {
    let listing_ms = |wanted: &dyn Fn(u32) -> bool| -> Result<f64> {
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let scan = master.scan_for(slices, wanted)?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            if scan.total_depth() != entries {
                bail!("the listing saw {} of {entries} entries", scan.total_depth());
            }
        }
        Ok(median(times))
    };
    Ok((listing_ms(&|_| true)?, listing_ms(&|s| s % 3 == 0)?, listing_ms(&|_| false)?))
}

/// The raw ceilings and each configuration's figures, as a table.
fn print_table(entries: usize, ceiling_of: &dyn Fn(Kind) -> f64, results: &[RunResult]) {
    let mut table = Table::new(&["configuration", "runners", "entries", "seconds", "entries/s", "ratio to ceiling", "runner CPU µs/entry"]);
    for kind in [Kind::Move, Kind::Worker] {
        let what = match kind {
            Kind::Move => "raw ceiling: list, rename .bak, rename to target",
            Kind::Worker | Kind::WorkerLines => "raw ceiling: list, rename .bak, unlink",
        };
        let c = ceiling_of(kind);
        table.row(vec![what.into(), "-".into(), entries.to_string(), format!("{:.3}", entries as f64 / c), format!("{c:.0}"), "1".into(), "-".into()]);
    }
    for r in results {
        table.row(vec![
            r.label.to_owned(),
            r.runners.to_string(),
            r.entries.to_string(),
            format!("{:.3}", r.seconds),
            format!("{:.0}", r.entries_per_s),
            format!("{:.3}", r.ratio_to_ceiling),
            format!("{:.1}", r.runner_cpu_us_per_entry),
        ]);
    }
    println!();
    println!("{}", table.render());
    println!();
    println!("ratio = entries/s through the runners / the raw ceiling of the same handler's file work (same entries, same run)");
}

/// The median (the upper one of an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Hard-links every file of `from` into a new directory `to`.
fn stage(from: &Path, to: &Path) -> Result<usize> {
    std::fs::create_dir_all(to)?;
    let mut n = 0;
    for dirent in std::fs::read_dir(from)? {
        let dirent = dirent?;
        std::fs::hard_link(dirent.path(), to.join(dirent.file_name()))?;
        n += 1;
    }
    Ok(n)
}

/// The ceiling: the same file work as a runner with its handler, in one tight loop with no
/// coordination. Returns entries per second.
fn raw_ceiling(master: &Path, dir: &Path, kind: Kind, entries: usize) -> Result<f64> {
    let queue = dir.join(QUEUE);
    let target = dir.join("out");
    std::fs::create_dir_all(&target)?;
    stage(master, &queue)?;
    let started = Instant::now();
    let mut done = 0usize;
    for dirent in std::fs::read_dir(&queue)? {
        let name = dirent?.file_name();
        let Some(base) = name.to_str().and_then(|n| n.strip_suffix(".pck")) else { continue };
        let bak = queue.join(format!("{base}.bak"));
        std::fs::rename(queue.join(&name), &bak)?;
        match kind {
            Kind::Move => std::fs::rename(&bak, target.join(&name))?,
            Kind::Worker | Kind::WorkerLines => std::fs::remove_file(&bak)?,
        }
        done += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    if done != entries {
        bail!("ceiling loop handled {done} entries, expected {entries}");
    }
    std::fs::remove_dir_all(dir)?;
    Ok(done as f64 / elapsed)
}

/// Whether a `.pck` or `.bak` is left in `dir` (stops at the first one found).
fn has_entries(dir: &Path) -> Result<bool> {
    for dirent in std::fs::read_dir(dir)? {
        let name = dirent?.file_name();
        let b = name.as_encoded_bytes();
        if b.ends_with(b".pck") || b.ends_with(b".bak") {
            return Ok(true);
        }
    }
    Ok(false)
}

/// One configuration, `runs` times: returns (seconds, runner CPU milliseconds) per run.
#[allow(clippy::too_many_arguments)]
async fn run_config(etcd: &Etcd, work: &Path, master: &Path, kind: Kind, runners: usize, entries: usize, runs: usize, args: &Args) -> Result<Vec<(f64, f64)>> {
    let cluster = format!("tp-{}-{runners}", kind.name());
    let base = work.join(&cluster);
    let spool = base.join("spool");
    let queue_dir = spool.join(QUEUE);
    let out_dir = spool.join("out");
    std::fs::create_dir_all(&queue_dir)?;
    std::fs::create_dir_all(&out_dir)?;
    let staged = base.join("stage").join(QUEUE);

    let mut c = client(etcd).await?;
    put_queue(&mut c, &cluster, QUEUE, args.slices).await?;
    let _coordinator = benchkit::spawn_coordinator(etcd, &base.join("coordinator.log"), "c1", &cluster, &[])?;
    let concurrency = args.concurrency.to_string();
    let out = out_dir.to_str().context("utf8 path")?.to_owned();
    let worker = serde_json::to_string(&["/bin/sh", "-c", WORKER])?;
    let line_worker = std::env::current_exe()?.with_file_name("bench_line_worker");
    if kind == Kind::WorkerLines && !line_worker.is_file() {
        bail!("{} is missing: build it with cargo build --workspace --bins", line_worker.display());
    }
    let line_worker = serde_json::to_string(&[line_worker.to_str().context("utf8 path")?])?;
    let mut procs: Vec<Proc> = Vec::new();
    for i in 0..runners {
        let node = format!("r{i}");
        let mut flags = vec!["--poll-interval", POLL_INTERVAL, "--concurrency", &concurrency];
        match kind {
            Kind::Move => flags.extend_from_slice(&["--handler", "move", "--move-to", &out]),
            Kind::Worker => flags.extend_from_slice(&["--handler", "worker", "--handler-command", &worker]),
            Kind::WorkerLines => flags.extend_from_slice(&["--handler", "worker", "--handler-command", &line_worker]),
        }
        let state = base.join(format!("state-{node}"));
        let log = base.join(format!("{node}.log"));
        procs.push(benchkit::spawn_runner(etcd, &spool, &state, &log, &node, &cluster, &flags)?);
    }
    let (lo, hi) = (args.slices as usize / runners, (args.slices as usize).div_ceil(runners));
    let what = format!("{cluster}: the runners to claim all {} slices evenly", args.slices);
    let slices = args.slices as usize;
    Wait::new(Duration::from_secs(60), &what)
        .until_async(|| {
            let mut c = c.clone();
            let cluster = cluster.clone();
            async move {
                let h = holdings(&mut c, &cluster, QUEUE).await;
                let total: usize = h.values().map(Vec::len).sum();
                total == slices && h.len() == runners && h.values().all(|v| (lo..=hi).contains(&v.len()))
            }
        })
        .await?;

    let pids: Vec<u32> = procs.iter().map(|p| benchkit::pid_of(p, "runner")).collect::<Result<_>>()?;
    let mut measured = Vec::new();
    for _ in 0..runs {
        stage(master, &staged)?;
        let before: Vec<ProcSample> = pids.iter().map(|p| ProcSample::take(*p)).collect::<Result<_>>()?;
        let started = Instant::now();
        std::fs::rename(&staged, &queue_dir).context("rename the staged entries over the empty queue directory")?;
        let limit = Duration::from_secs(120 + entries as u64 / 100);
        // Looked at every 5 ms: the drain time is the figure measured.
        Wait::new(limit, &format!("{cluster}: the queue to be drained"))
            .every(Duration::from_millis(5))
            .poll_async(|| std::future::ready(has_entries(&queue_dir).map(|busy| (!busy).then_some(()))))
            .await?;
        let seconds = started.elapsed().as_secs_f64();
        let after: Vec<ProcSample> = pids.iter().map(|p| ProcSample::take(*p)).collect::<Result<_>>()?;
        let cpu_ms: f64 = before.iter().zip(&after).map(|(b, a)| b.cpu_ms_until(a)).sum();

        // Every entry must have been handled, none preserved or quarantined.
        let count = |dir: &Path| std::fs::read_dir(dir).map(|rd| rd.count()).unwrap_or(0);
        let bad = count(&spool.join("bad")) + count(&spool.join(".qslice").join("quarantine").join(QUEUE));
        if bad > 0 {
            bail!("{cluster}: {bad} entries went to bad/ or quarantine; see the logs in {}", base.display());
        }
        if kind == Kind::Move {
            if count(&out_dir) != entries {
                bail!("{cluster}: {} of {entries} entries arrived in the move target", count(&out_dir));
            }
            for dirent in std::fs::read_dir(&out_dir)? {
                std::fs::remove_file(dirent?.path())?;
            }
        }
        measured.push((seconds, cpu_ms));
    }
    drop(procs);
    Ok(measured)
}
