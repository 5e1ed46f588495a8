//! Shared pieces of the benchmark programs (`src/bin/bench_*.rs`): process figures from
//! `/proc`, etcd's own Prometheus counters, daemons started with exactly the flags a
//! benchmark wants, and the readable table and `JSON:` summary line each program ends with.
//!
//! Benchmarks print figures; nothing here asserts a speed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::{qslice_bin, Etcd, Proc};

/// Clock ticks per second of `/proc/<pid>/stat` times: USER_HZ, which Linux fixes at 100
/// for everything it exports to user space.
pub const TICKS_PER_SECOND: f64 = 100.0;

/// The build profile of this benchmark binary (the daemons it runs come from the same
/// target directory, so the same profile).
pub fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// One look at a process: memory and CPU time so far.
#[derive(Clone, Copy, Debug)]
pub struct ProcSample {
    /// Resident set size (`VmRSS`), KiB.
    pub rss_kib: u64,
    /// Peak resident set size (`VmHWM`), KiB.
    pub hwm_kib: u64,
    /// Threads.
    pub threads: u64,
    /// User + system CPU time in clock ticks (fields 14 and 15 of `/proc/<pid>/stat`).
    pub cpu_ticks: u64,
    /// When the sample was taken.
    pub at: Instant,
}

impl ProcSample {
    /// Reads `/proc/<pid>/status` and `/proc/<pid>/stat`.
    pub fn take(pid: u32) -> Result<ProcSample> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("read /proc/{pid}/status"))?;
        let field =
            |name: &str| -> u64 { status.lines().find_map(|l| l.strip_prefix(name)).and_then(|rest| rest.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or(0) };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("read /proc/{pid}/stat"))?;
        // Fields after the ")" that ends the command name start at field 3 (state).
        let rest: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
        let tick = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Ok(ProcSample { rss_kib: field("VmRSS:"), hwm_kib: field("VmHWM:"), threads: field("Threads:"), cpu_ticks: tick(11) + tick(12), at: Instant::now() })
    }

    /// CPU time used between `self` and a later sample, in milliseconds.
    pub fn cpu_ms_until(&self, later: &ProcSample) -> f64 {
        later.cpu_ticks.saturating_sub(self.cpu_ticks) as f64 * 1000.0 / TICKS_PER_SECOND
    }

    /// CPU use between `self` and a later sample, in percent of one core.
    pub fn cpu_percent_until(&self, later: &ProcSample) -> f64 {
        let wall = later.at.duration_since(self.at).as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        self.cpu_ms_until(later) / 10.0 / wall
    }
}

/// The pid of a running process, or an error naming it.
pub fn pid_of(proc: &Proc, what: &str) -> Result<u32> {
    proc.pid().with_context(|| format!("{what} is not running"))
}

/// One scrape of etcd's `/metrics`: each sample line as (name with labels, value).
#[derive(Clone, Debug, Default)]
pub struct Metrics(Vec<(String, f64)>);

impl Metrics {
    /// Fetches `GET /metrics` from the etcd's client port.
    pub fn scrape(etcd: &Etcd) -> Result<Metrics> {
        let endpoint = etcd.endpoint();
        let port: u16 = endpoint.rsplit(':').next().and_then(|p| p.parse().ok()).context("etcd endpoint has a port")?;
        let addr = ([127, 0, 0, 1], port).into();
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).context("connect to etcd's metrics")?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).context("read etcd's metrics")?;
        let body = reply.split_once("\r\n\r\n").map(|(_, b)| b).context("metrics reply has a body")?;
        let samples = body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect();
        Ok(Metrics(samples))
    }

    /// Sum of the samples of metric `name` whose labels include every `label="value"` given.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, _)| n == name || n.starts_with(&format!("{name}{{")))
            .filter(|(n, _)| labels.iter().all(|(k, v)| n.contains(&format!("{k}=\"{v}\""))))
            .map(|(_, v)| v)
            .sum()
    }

    /// Sums of metric `name` grouped by the value of `label`.
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let prefix = format!("{name}{{");
        let needle = format!("{label}=\"");
        for (n, v) in self.0.iter().filter(|(n, _)| n.starts_with(&prefix)) {
            if let Some(start) = n.find(&needle) {
                let rest = &n[start + needle.len()..];
                let value = rest.split('"').next().unwrap_or_default();
                *out.entry(value.to_owned()).or_insert(0.0) += v;
            }
        }
        out
    }
}

/// What etcd handled between two scrapes: unary gRPC calls by method (from
/// `grpc_server_handled_total`), stream messages received by method (from
/// `grpc_server_msg_received_total`, e.g. lease keepalives), and raft proposals
/// committed (`etcd_server_proposals_committed_total`: every write).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EtcdLoad {
    /// Unary calls completed, by method (`Txn`, `Range`, `Put`, `LeaseRevoke`, ...).
    pub unary_by_method: BTreeMap<String, u64>,
    /// All unary calls completed.
    pub unary_total: u64,
    /// Stream messages received, by method (`LeaseKeepAlive`, `Watch`).
    pub stream_msgs_by_method: BTreeMap<String, u64>,
    /// Raft proposals committed (writes).
    pub proposals_committed: u64,
}

impl EtcdLoad {
    /// The difference between two scrapes.
    pub fn between(before: &Metrics, after: &Metrics) -> EtcdLoad {
        let delta = |name: &str, label: &str, only: &[(&str, &str)]| -> BTreeMap<String, u64> {
            let filter = |m: &Metrics| -> BTreeMap<String, f64> {
                let filtered = Metrics(m.0.iter().filter(|(n, _)| only.iter().all(|(k, v)| n.contains(&format!("{k}=\"{v}\"")))).cloned().collect());
                filtered.by_label(name, label)
            };
            let (b, a) = (filter(before), filter(after));
            a.iter().map(|(k, v)| (k.clone(), (v - b.get(k).copied().unwrap_or(0.0)).max(0.0) as u64)).filter(|(_, v)| *v > 0).collect()
        };
        let unary_by_method = delta("grpc_server_handled_total", "grpc_method", &[("grpc_type", "unary")]);
        let stream_msgs_by_method = delta("grpc_server_msg_received_total", "grpc_method", &[("grpc_type", "bidi_stream")]);
        let proposals = |m: &Metrics| m.sum("etcd_server_proposals_committed_total", &[]);
        EtcdLoad {
            unary_total: unary_by_method.values().sum(),
            unary_by_method,
            stream_msgs_by_method,
            proposals_committed: (proposals(after) - proposals(before)).max(0.0) as u64,
        }
    }

    /// One line: `Txn 12, Range 1 (13 unary); LeaseKeepAlive 40 stream msgs; 12 proposals`.
    pub fn summary(&self) -> String {
        let unary: Vec<String> = self.unary_by_method.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let streams: Vec<String> = self.stream_msgs_by_method.iter().map(|(k, v)| format!("{k} {v}")).collect();
        format!(
            "{} unary ({}); stream msgs: {}; {} proposals",
            self.unary_total,
            if unary.is_empty() { "none".into() } else { unary.join(", ") },
            if streams.is_empty() { "none".into() } else { streams.join(", ") },
            self.proposals_committed
        )
    }
}

/// Starts `qslice-runner` with exactly `args` after the connection flags (node id,
/// cluster, spool, state dir, etcd endpoint), logging to `log`. No settings come from the
/// environment, so the runner's own defaults apply unless a flag says otherwise.
pub fn spawn_runner(etcd: &Etcd, spool_root: &Path, state_dir: &Path, log: &Path, node: &str, cluster: &str, args: &[&str]) -> Result<Proc> {
    let endpoint = etcd.endpoint();
    let mut all = vec![
        "--node-id",
        node,
        "--cluster",
        cluster,
        "--spool",
        spool_root.to_str().context("utf8 spool path")?,
        "--state-dir",
        state_dir.to_str().context("utf8 state path")?,
        "--etcd-endpoints",
        &endpoint,
    ];
    all.extend_from_slice(args);
    Proc::spawn(&qslice_bin("qslice-runner")?, &all, &[], log)
}

/// Starts `qslice-coordinator` with its admin API on a free loopback port, the runner's
/// defaults otherwise (5 s election lease, 60 s revoke deadline) unless `args` say more.
pub fn spawn_coordinator(etcd: &Etcd, log: &Path, id: &str, cluster: &str, args: &[&str]) -> Result<Proc> {
    let endpoint = etcd.endpoint();
    let admin = format!("127.0.0.1:{}", crate::free_port()?);
    let mut all = vec!["--id", id, "--cluster", cluster, "--etcd-endpoints", &endpoint, "--admin-addr", &admin];
    all.extend_from_slice(args);
    Proc::spawn(&qslice_bin("qslice-coordinator")?, &all, &[], log)
}

/// A readable table: a header row and rows of cells, columns padded to fit.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    all_left: bool,
}

impl Table {
    /// A table with these column names.
    pub fn new(header: &[&str]) -> Table {
        Table { header: header.iter().map(|h| (*h).to_owned()).collect(), rows: Vec::new(), all_left: false }
    }

    /// Left-aligns every column (for tables of text rather than numbers).
    pub fn left_aligned(mut self) -> Table {
        self.all_left = true;
        self
    }

    /// Adds a row (missing cells print empty).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text (Markdown), first column left-aligned, the others right-aligned.
    pub fn render(&self) -> String {
        let cols = self.header.len().max(self.rows.iter().map(Vec::len).max().unwrap_or(0));
        let cell = |row: &Vec<String>, i: usize| row.get(i).cloned().unwrap_or_default();
        let widths: Vec<usize> = (0..cols).map(|i| std::iter::once(&self.header).chain(&self.rows).map(|r| cell(r, i).chars().count()).max().unwrap_or(0)).collect();
        let left = |i: usize| i == 0 || self.all_left;
        let line = |row: &Vec<String>| {
            let cells: Vec<String> =
                (0..cols).map(|i| if left(i) { format!("{:<w$}", cell(row, i), w = widths[i]) } else { format!("{:>w$}", cell(row, i), w = widths[i]) }).collect();
            format!("| {} |", cells.join(" | "))
        };
        let rule: Vec<String> = widths.iter().enumerate().map(|(i, w)| if left(i) { "-".repeat(*w) } else { format!("{}:", "-".repeat(w.saturating_sub(1))) }).collect();
        let mut out = vec![line(&self.header), format!("| {} |", rule.join(" | "))];
        out.extend(self.rows.iter().map(line));
        out.join("\n")
    }
}

/// The machine the figures were measured on: cores, memory, CPU model, kernel.
pub fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned()).unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    serde_json::json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "mem_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "cpu": model,
        "kernel": kernel,
    })
}

/// The one-line description printed above each benchmark's tables.
pub fn machine_line() -> String {
    let m = machine();
    format!("machine: {} cores, {} GiB, {}; profile {}", m["cores"], m["mem_gib"], m["cpu"].as_str().unwrap_or("unknown cpu"), profile())
}

/// Prints the summary as the last line, `JSON: {...}`, and writes it to `out` if given.
pub fn emit_json(summary: &serde_json::Value, out: Option<&Path>) -> Result<()> {
    let line = serde_json::to_string(summary)?;
    if let Some(path) = out {
        std::fs::write(path, format!("{line}\n")).with_context(|| format!("write {}", path.display()))?;
    }
    println!("JSON: {line}");
    Ok(())
}

/// Rounds to `digits` decimals, for tables and JSON.
pub fn round(value: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (value * f).round() / f
}
