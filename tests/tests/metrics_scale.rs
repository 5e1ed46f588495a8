//! A runner's metrics stay bounded however many slices a queue has: per-slice series only
//! for slices it holds, at most `metrics_slice_series` (default 256) slice numbers per
//! queue, and queue-level figures over every slice listed.

use std::time::Duration;

use qslice_tests::testcluster::TestCluster;
use qslice_tests::{wait_for, wait_for_async};

/// Generous bound: claiming 4,096 slices is 4,096 etcd transactions.
const LONG: Duration = Duration::from_secs(120);

/// The default of `metrics_slice_series`.
const CAP: usize = 256;

/// `GET path` from `addr`, or an empty string if nothing answers.
fn get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The series (sample lines) of `metric` in a /metrics text.
fn series<'a>(text: &'a str, metric: &str) -> Vec<&'a str> {
    let prefix = format!("{metric}{{");
    text.lines().filter(|l| l.starts_with(&prefix)).collect()
}

#[tokio::test]
async fn a_runner_holding_4096_slices_exports_at_most_the_cap_of_per_slice_series() {
    let port = qslice_tests::free_port().expect("port");
    let addr = format!("127.0.0.1:{port}");
    let tc = TestCluster::builder().assign("r", "in", 4096, 0..4096).runner_with("r", &["--metrics-addr", &addr], &[]).ready_timeout(LONG).start().await.expect("cluster");
    wait_for_async(LONG, "r to hold all 4096 slices", || async { tc.claims("in").await.is_ok_and(|c| c.len() == 4096) }).await.expect("claimed");
    let spool = tc.spool();
    wait_for(LONG, "/metrics to show 4096 slices claimed and the queue's figures", || {
        let m = get(&addr, "/metrics");
        m.contains("qslice_runner_slices_claimed 4096") && m.contains("qslice_runner_queue_depth{queue=\"in\"}")
    })
    .expect("metrics");
    let metrics = get(&addr, "/metrics");
    for metric in ["qslice_runner_slice_depth", "qslice_runner_slice_oldest_age_seconds"] {
        let lines = series(&metrics, metric);
        assert_eq!(lines.len(), CAP, "{metric}: one series per slice for the {CAP} lowest held slices, no more: {lines:?}");
        assert!(lines.iter().any(|l| l.contains("slice=\"0\"")), "{metric} of slice 0: {lines:?}");
        assert!(!lines.iter().any(|l| l.contains(&format!("slice=\"{CAP}\""))), "{metric} of slice {CAP} is beyond the cap: {lines:?}");
    }
    assert_eq!(series(&metrics, "qslice_runner_queue_oldest_age_seconds").len(), 1, "{metrics}");
    // An entry in a held slice beyond the cap is processed; it gets no series of its own.
    let q = spool.queue("in");
    q.enqueue_in_slice(b"beyond the cap", 4000, 4096).expect("enqueue");
    wait_for_async(LONG, "the entry of slice 4000 finished", || async { spool.finished().len() == 1 }).await.expect("finished");
    let metrics = get(&addr, "/metrics");
    assert_eq!(series(&metrics, "qslice_runner_slice_depth").len(), CAP, "no series for slice 4000: {metrics}");
}

#[tokio::test]
async fn released_slices_are_zeroed_and_new_ones_never_pass_the_cap() {
    let port = qslice_tests::free_port().expect("port");
    let addr = format!("127.0.0.1:{port}");
    let tc = TestCluster::builder().assign("r", "in", 64, 0..8).runner_with("r", &["--metrics-addr", &addr, "--metrics-slice-series", "10"], &[]).start().await.expect("cluster");
    wait_for(LONG, "/metrics to show the 8 held slices", || series(&get(&addr, "/metrics"), "qslice_runner_slice_depth").len() == 8).expect("metrics");
    // Give r slices 8..64 instead: 0..8 are released; of the new ones only 8 and 9 fit.
    tc.assign("r", "in", 64, 8..64).await.expect("reassign");
    wait_for(LONG, "/metrics to show 56 slices claimed", || get(&addr, "/metrics").contains("qslice_runner_slices_claimed 56")).expect("claimed");
    wait_for(LONG, "series for slices 8 and 9", || series(&get(&addr, "/metrics"), "qslice_runner_slice_depth").len() == 10).expect("series");
    let metrics = get(&addr, "/metrics");
    let lines = series(&metrics, "qslice_runner_slice_depth");
    assert!(lines.iter().any(|l| l.contains("slice=\"9\"")) && !lines.iter().any(|l| l.contains("slice=\"10\"")), "{lines:?}");
    for line in series(&metrics, "qslice_runner_slice_oldest_age_seconds").iter().filter(|l| l.contains("slice=\"3\"")) {
        assert!(line.ends_with(" 0"), "a released slice reads 0: {line}");
    }
}
