//! `qslicectl rolling-restart --all`, the real binaries on a real etcd: every node of a
//! 3-runner cluster is drained, restarted by the `--exec` command, waited for, uncordoned
//! and given slices again, one after the other, while entries keep arriving; at the end
//! every entry was finished exactly once and none is left.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use qslice_tests::qslice_bin;
use qslice_tests::testcluster::TestCluster;
use qslice_tests::wait::Wait;

const NODES: [&str; 3] = ["r1", "r2", "r3"];
/// Bound of the whole rolling restart: each node takes a few seconds when idle.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);
const LONG: Duration = Duration::from_secs(60);

/// The `--exec` command's script: it asks the test to restart the node (a request file)
/// and returns once the test says the new runner was started (a done file), so that the
/// test, which owns the runner processes, does the kill and the start.
const SCRIPT: &str = r#"node="$1"; dir="$2"
: > "$dir/request-$node"
i=0
while [ ! -e "$dir/done-$node" ]; do
  i=$((i+1)); [ "$i" -gt 600 ] && { echo "no restart of $node within 60s" >&2; exit 1; }
  sleep 0.1
done
rm -f "$dir/done-$node"
"#;

fn incarnations(admin: &str) -> BTreeMap<String, (String, bool)> {
    let out = std::process::Command::new(qslice_bin("qslicectl").expect("built")).args(["--coordinator", admin, "--json", "nodes"]).output().expect("run qslicectl");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("nodes --json: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    json.as_array()
        .expect("an array of nodes")
        .iter()
        .map(|n| (n["id"].as_str().unwrap_or_default().to_owned(), (n["incarnation"].as_str().unwrap_or_default().to_owned(), n["cordoned"] == true)))
        .collect()
}

/// A runner being restarted by the test: SIGTERM sent, waiting for it to exit.
struct Restarting {
    node: String,
    since: Instant,
}

#[tokio::test]
async fn a_rolling_restart_of_every_node_loses_no_entry_and_runs_none_twice() {
    let mut tc = TestCluster::builder()
        .queue("in", 9)
        .coordinators(1)
        .runners(&NODES)
        // Each entry takes 20 ms, so that drains find entries in flight.
        .runner_env(&[("QSLICE_TEST_DELAY", "0.02")])
        .start()
        .await
        .expect("cluster");
    let admin = tc.coordinator("c1").admin.clone();
    let spool = tc.spool().clone();
    let dir = spool.scratch("restarts");
    std::fs::create_dir_all(&dir).expect("restarts dir");
    let script = dir.join("restart.sh");
    std::fs::write(&script, SCRIPT).expect("script");
    let before = incarnations(&admin);
    assert_eq!(before.keys().map(String::as_str).collect::<Vec<_>>(), NODES);

    let log_path = spool.scratch("rolling-restart.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let exec = format!("sh {} {{node}} {}", script.display(), dir.display());
    let mut ctl = tokio::process::Command::new(qslice_bin("qslicectl").expect("built"))
        .args(["--coordinator", &admin, "rolling-restart", "--all", "--exec", &exec, "--wait-for-slices", "--step-timeout", "60s"])
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("start qslicectl");

    // Entries arrive the whole time; the test restarts a runner when the script asks.
    let q = tc.queue("in");
    let mut enqueued = BTreeSet::new();
    let mut restarted = Vec::new();
    let mut restarting: Option<Restarting> = None;
    // Entries written while each node's runner was stopped or starting.
    let mut while_down: BTreeMap<String, usize> = BTreeMap::new();
    let started = Instant::now();
    let status = loop {
        let name = q.enqueue(format!("m{}", enqueued.len()).as_bytes()).expect("enqueue");
        enqueued.insert(name.filebase);
        if let Some(r) = &restarting {
            *while_down.entry(r.node.clone()).or_insert(0) += 1;
        }
        if let Some(status) = ctl.try_wait().expect("qslicectl status") {
            break status;
        }
        if let Some(r) = &restarting {
            let exited = tc.runner_mut(&r.node).try_wait().expect("runner status").is_some();
            assert!(r.since.elapsed() < LONG, "runner {} did not exit within {LONG:?} of SIGTERM", r.node);
            if exited {
                tc.start_runner(&r.node).expect("start the runner again");
                std::fs::write(dir.join(format!("done-{}", r.node)), b"").expect("done file");
                restarted.push(r.node.clone());
                restarting = None;
            }
        } else if let Some(node) = NODES.iter().find(|n| dir.join(format!("request-{n}")).exists()) {
            std::fs::remove_file(dir.join(format!("request-{node}"))).expect("take the request");
            tc.runner(node).signal(Signal::SIGTERM).expect("SIGTERM the runner");
            restarting = Some(Restarting { node: (*node).to_owned(), since: Instant::now() });
        }
        assert!(started.elapsed() < RUN_TIMEOUT, "the rolling restart did not end within {RUN_TIMEOUT:?}:\n{}", std::fs::read_to_string(&log_path).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.success(), "rolling-restart failed ({status}):\n{output}");
    assert_eq!(restarted, NODES, "each node restarted once, in id order:\n{output}");
    for node in NODES {
        for step in ["drained: holds nothing", "back: registered as incarnation", "uncordoned", "slices: holds", "done: restarted in"] {
            assert!(output.contains(&format!("{node}: {step}")), "no {step:?} for {node}:\n{output}");
        }
    }
    // Each node came back as a new incarnation and is uncordoned.
    let after = incarnations(&admin);
    for node in NODES {
        let (inc, cordoned) = &after[node];
        assert_ne!(inc, &before[node].0, "{node} is a new incarnation");
        assert!(!cordoned, "{node} is uncordoned");
    }

    // Nothing lost, nothing twice.
    let total = enqueued.len();
    for node in NODES {
        assert!(while_down.get(node).is_some_and(|n| *n > 0), "entries arrived while {node} was restarted: {while_down:?}");
    }
    Wait::new(LONG, &format!("all {total} entries finished")).until_async(|| async { spool.finished().len() >= total }).await.expect("drained");
    let finished = spool.finished();
    let twice: Vec<_> = finished.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "entries finished more than once: {twice:?}");
    let names: BTreeSet<String> = finished.keys().cloned().collect();
    assert_eq!(names, enqueued, "exactly the enqueued entries finished");
    let left: Vec<String> = qslice_tests::cluster::files_in(&spool.root().join("in"));
    assert!(left.iter().all(|f| !f.ends_with(".pck") && !f.ends_with(".bak")), "entries left: {left:?}");
}
