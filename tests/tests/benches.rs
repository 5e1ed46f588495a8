//! The benchmark programs in their short mode (`--quick`), so that they cannot rot: each
//! must run to the end and print a `JSON:` summary whose figures say that it measured
//! something (samples taken, posts accepted, nothing lost). The figures themselves are the
//! full runs' (README); no test here times anything.

use std::process::Command;

use serde_json::Value;

/// Runs `program` with `args` and `--quick`; returns its `JSON:` line, parsed.
fn quick(program: &str, args: &[&str]) -> Value {
    // Its error, not a backtrace of where main returned it.
    let out = Command::new(program).args(args).arg("--quick").env("RUST_BACKTRACE", "0").env("RUST_LIB_BACKTRACE", "0").output().unwrap_or_else(|e| panic!("run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tail = |s: &str| tail_of(s, 30);
    assert!(out.status.success(), "{program} {args:?} --quick failed ({}):\n{}\n--- stderr\n{}", out.status, tail(&stdout), tail_of(&String::from_utf8_lossy(&out.stderr), 300));
    // Figures the test log keeps (nextest shows them with --no-capture).
    println!("{}", tail(&stdout));
    let line = stdout.lines().rev().find_map(|l| l.strip_prefix("JSON: ")).unwrap_or_else(|| panic!("{program} printed no JSON line:\n{}", tail(&stdout)));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{program}'s JSON line does not parse ({e}): {line}"))
}

/// The last `n` lines of `s`.
fn tail_of(s: &str, n: usize) -> String {
    s.lines().rev().take(n).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// The number of samples of figure `name` in `figures`.
fn samples(figures: &Value, name: &str) -> u64 {
    figures[name]["samples"].as_u64().unwrap_or_else(|| panic!("no samples of {name:?} in {figures}"))
}

#[test]
fn bench_failover_measures_crashes_deaths_and_drains() {
    let json = quick(env!("CARGO_BIN_EXE_bench_failover"), &[]);
    let ttl = &json["ttl_2s"];
    assert!(samples(ttl, "process crash -> first") > 0, "{json}");
    assert!(samples(ttl, "host death -> first entry") > 0, "{json}");
    assert!(samples(ttl, "drain: hand-off gap") > 0, "{json}");
}

#[test]
fn bench_failover_on_nfs_measures_a_kill_a_drain_and_a_guest_death() {
    let json = quick(env!("CARGO_BIN_EXE_bench_failover"), &["--nfs"]);
    assert!(samples(&json, "runner kill -> first entry") > 0, "{json}");
    assert!(samples(&json, "guest death -> .bak recovered") > 0, "{json}");
    assert!(samples(&json, "drain: hand-off gap") > 0, "{json}");
}

#[test]
fn bench_mailman3_accepts_every_post_through_moves_and_crashes() {
    let json = quick(env!("CARGO_BIN_EXE_bench_mailman3"), &[]);
    let ttl = &json["ttl_2s"];
    assert!(ttl["posts"].as_u64().is_some_and(|p| p > 0), "{json}");
    assert_eq!(ttl["accepted"], ttl["posts"], "every post accepted: {json}");
    assert_eq!(ttl["shunted"], 0, "{json}");
    assert_eq!(ttl["bad"], 0, "{json}");
    assert!(samples(ttl, "planned move: last ACCEPT -> new owner's first ACCEPT") > 0, "{json}");
}

#[test]
fn bench_site_delivers_every_post_under_mailman_start_and_qslice() {
    let json = quick(env!("CARGO_BIN_EXE_bench_site"), &[]);
    let runs = json["runs"].as_array().unwrap_or_else(|| panic!("no runs: {json}"));
    assert!(runs.len() >= 2, "mailman start and qslice measured: {json}");
    for run in runs {
        assert!(run["posts"].as_u64().is_some_and(|p| p > 0) && run["posts_per_s"].as_f64().is_some_and(|r| r > 0.0), "{run}");
        assert_eq!(run["doubled"], 0, "{run}");
    }
    assert_eq!(json["shunted"], 0, "{json}");
    assert_eq!(json["bad"], 0, "{json}");
    assert_eq!(json["error_log_lines"], 0, "{json}");
}

#[test]
fn bench_throughput_moves_entries_with_every_handler() {
    let json = quick(env!("CARGO_BIN_EXE_bench_throughput"), &[]);
    let runs = json["runs"].as_array().unwrap_or_else(|| panic!("no runs: {json}"));
    assert!(!runs.is_empty(), "{json}");
    for run in runs {
        assert!(run["entries_per_s"].as_f64().is_some_and(|r| r > 0.0), "{run}");
    }
}

#[test]
fn bench_scale_measures_a_cluster_and_the_planner() {
    let json = quick(env!("CARGO_BIN_EXE_bench_scale"), &[]);
    let clusters = json["clusters"].as_array().unwrap_or_else(|| panic!("no clusters: {json}"));
    assert!(!clusters.is_empty(), "{json}");
    for cluster in clusters {
        assert_eq!(cluster["death"]["receiving_members"].as_u64().map(|n| n > 0), Some(true), "a death's slices reassigned: {cluster}");
    }
    assert!(json["planner"]["cells"].as_array().is_some_and(|c| !c.is_empty()), "{json}");
}

#[test]
fn bench_footprint_measures_each_process() {
    let json = quick(env!("CARGO_BIN_EXE_bench_footprint"), &[]);
    let processes = json["processes"].as_array().unwrap_or_else(|| panic!("no processes: {json}"));
    assert_eq!(processes.len(), 3, "runner, coordinator and etcd: {json}");
    for p in processes {
        assert!(p["peak_rss_kib"].as_u64().is_some_and(|k| k > 0), "{p}");
    }
}
