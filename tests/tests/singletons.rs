//! Cluster-wide singleton commands with the real runner binary and a real etcd: of the
//! runners configured with a singleton, exactly one runs it at any time; when the holder
//! dies (kill -9), stops (SIGTERM) or freezes, another takes over within the lease TTL and
//! the old command is gone first (the leash kills a frozen or dead holder's command at its
//! fence deadline); a periodic singleton runs each slot once across the runners.
//!
//! The commands are shell loops that append what they did to a file, with the time:
//! these files are what the tests check.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use qslice_proto::keys::Keys;
use qslice_proto::records::{Record, SingletonClaim};
use qslice_tests::cluster::Spool;
use qslice_tests::freezer::{process_tree, Freezer};
use qslice_tests::now_ns;
use qslice_tests::pids_with_env;
use qslice_tests::testcluster::{TestCluster, CLUSTER};
use qslice_tests::wait_for_async;

const LONG: Duration = Duration::from_secs(60);
/// The fixtures' lease TTL (tests/src/cluster.rs `start_runner_at`).
const TTL: Duration = Duration::from_secs(2);

/// A node id of this test's own: tests run side by side, and processes are found by their
/// `QSLICE_NODE`.
fn node(name: &str) -> String {
    format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// Writes a runner configuration file holding one `[singleton.<name>]` table.
fn config(spool: &Spool, name: &str, table: &str) -> PathBuf {
    let path = spool.scratch(&format!("singleton-{name}.toml"));
    std::fs::write(&path, format!("[singleton.{name}]\n{table}")).expect("write config");
    path
}

/// A TOML string holding `text` (a JSON string is a TOML basic string).
fn toml_str(text: &str) -> String {
    serde_json::to_string(text).expect("json string")
}

/// The node that holds singleton `name`, if any.
async fn holder(c: &etcd_client::Client, name: &str) -> Option<String> {
    let keys = Keys::new(CLUSTER).ok()?;
    let resp = c.clone().get(keys.singleton(name), None).await.ok()?;
    let kv = resp.kvs().first()?;
    SingletonClaim::decode(kv.value()).ok().map(|c| c.node_id)
}

/// One line a long-running command wrote: `<node> <pid> <ns>`.
#[derive(Clone, Debug)]
struct Beat {
    node: String,
    pid: u32,
    at_ns: u128,
}

fn beats(path: &Path) -> Vec<Beat> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(Beat { node: f.first()?.to_string(), pid: f.get(1)?.parse().ok()?, at_ns: f.get(2)?.parse().ok()? })
        })
        .collect()
}

/// Each writer (node, pid) with the time of its first and last line, in order of first line.
fn writers(beats: &[Beat]) -> Vec<(String, u32, u128, u128)> {
    let mut spans: BTreeMap<(String, u32), (u128, u128)> = BTreeMap::new();
    for b in beats {
        let span = spans.entry((b.node.clone(), b.pid)).or_insert((b.at_ns, b.at_ns));
        span.0 = span.0.min(b.at_ns);
        span.1 = span.1.max(b.at_ns);
    }
    let mut out: Vec<_> = spans.into_iter().map(|((n, p), (a, b))| (n, p, a, b)).collect();
    out.sort_by_key(|w| w.2);
    out
}

/// Panics if two writers' spans overlap in time: one runs the singleton at any time.
fn assert_no_overlap(beats: &[Beat]) {
    let w = writers(beats);
    for pair in w.windows(2) {
        assert!(
            pair[0].3 < pair[1].2,
            "two copies of the singleton ran at once: {:?} until {} and {:?} from {}",
            (&pair[0].0, pair[0].1),
            pair[0].3,
            (&pair[1].0, pair[1].1),
            pair[1].2
        );
    }
}

/// A long-running singleton command: every 50 ms appends `<node> <pid> <ns>` to `out`.
fn heartbeat_table(out: &Path) -> String {
    let script = format!("while :; do echo \"$QSLICE_NODE $$ $(date +%s%N)\" >> {}; sleep 0.05; done", out.display());
    format!("command = [\"/bin/sh\", \"-c\", {}]\nlong_running = true\nstop_timeout = \"2s\"\n", toml_str(&script))
}

/// Waits until no process of the singleton's commands of `nodes` runs any more.
async fn nothing_left(nodes: &[&str]) {
    for n in nodes {
        let needle = format!("QSLICE_NODE={n}");
        wait_for_async(Duration::from_secs(10), &format!("no process of {n} left"), || async { pids_with_env(&needle).is_empty() }).await.expect("nothing left running");
    }
}

#[tokio::test]
async fn a_long_running_singleton_runs_once_and_moves_within_the_ttl_when_its_holder_is_killed() {
    let (n1, n2) = (node("r1"), node("r2"));
    let spool = Spool::new(&[]).expect("spool");
    let out = spool.scratch("beats.log");
    let cfg = config(&spool, "notify", &heartbeat_table(&out));
    let mut tc = TestCluster::builder().spool(spool.clone()).runner_args(&["--config", cfg.to_str().expect("utf8")]).runners(&[&n1, &n2]).start().await.expect("cluster");
    let c = tc.client();
    wait_for_async(LONG, "the singleton running on one node", || async { beats(&out).len() >= 10 }).await.expect("running");
    let first = holder(&c, "notify").await.expect("held");
    let other = if first == n1 { n2.clone() } else { n1.clone() };
    let w = writers(&beats(&out));
    assert_eq!(w.len(), 1, "one copy of the singleton, on its holder: {w:?}");
    assert_eq!(w[0].0, first);
    let old_pid = w[0].1;
    // kill -9 of the holder: the other runner takes over once its lease has ended (its
    // leash revokes it when its children are gone, else after the TTL).
    let killed_ns = now_ns();
    tc.runner_mut(&first).kill();
    wait_for_async(LONG, "the other runner's command writing", || async { beats(&out).iter().any(|b| b.node == other) }).await.expect("taken over");
    let took_ns = beats(&out).iter().find(|b| b.node == other).expect("a line").at_ns;
    let took = Duration::from_nanos((took_ns - killed_ns) as u64);
    assert!(took <= TTL + Duration::from_secs(1), "the singleton was taken over {took:?} after its holder died; TTL {TTL:?} + 1 s allowed");
    assert!(!qslice_tests::process_alive(old_pid), "the dead holder's command ({old_pid}) still runs");
    assert!(pids_with_env(&format!("QSLICE_NODE={first}")).is_empty(), "processes of the dead holder are left");
    assert_eq!(holder(&c, "notify").await.as_deref(), Some(other.as_str()));
    // The first runner comes back and waits. Then the new holder's host dies: the runner
    // and its leash together, so no revoke: the lease has to expire.
    tc.start_runner(&first).expect("restart");
    wait_for_async(LONG, "the first runner registered again", || tc.is_registered(&first)).await.expect("registered");
    let pid = tc.runner(&other).pid().expect("pid");
    let leash: Vec<u32> =
        process_tree(pid).into_iter().filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains("--leash"))).collect();
    assert_eq!(leash.len(), 1, "the runner's leash: {leash:?}");
    let lines_before = beats(&out).len();
    let crashed_ns = now_ns();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(leash[0] as i32), Signal::SIGKILL);
    tc.runner_mut(&other).kill();
    wait_for_async(LONG, "the first runner's command writing again", || async { beats(&out)[lines_before..].iter().any(|b| b.node == first) })
        .await
        .expect("taken over after the TTL");
    let back_ns = beats(&out)[lines_before..].iter().find(|b| b.node == first).expect("a line").at_ns;
    let took_ttl = Duration::from_nanos((back_ns - crashed_ns) as u64);
    assert!(took_ttl <= TTL + Duration::from_secs(1), "after a host crash the singleton was taken over {took_ttl:?} later; TTL {TTL:?} + 1 s allowed");
    assert!(pids_with_env(&format!("QSLICE_NODE={other}")).is_empty(), "processes of the crashed holder are left");
    // It keeps running on the new holder alone.
    let seen = beats(&out).len();
    wait_for_async(LONG, "the new holder's command writing on", || async { beats(&out).len() >= seen + 10 }).await.expect("running on");
    let all = beats(&out);
    assert_no_overlap(&all);
    println!(
        "kill -9 of the holder -> the other runner's command ran {took:?} later; of the holder and its leash -> {took_ttl:?} later ({} writers, {} lines)",
        writers(&all).len(),
        all.len()
    );
    drop(tc);
    nothing_left(&[&n1, &n2]).await;
}

#[tokio::test]
async fn a_held_back_singleton_is_taken_over_only_once_its_hold_ends() {
    // The leader holds a revoked lease's singletons back with a key on a lease of its own;
    // here the test writes that hold before any runner starts.
    let n1 = node("r1");
    let spool = Spool::new(&[]).expect("spool");
    let out = spool.scratch("beats.log");
    let cfg = config(&spool, "notify", &heartbeat_table(&out));
    let mut tc = TestCluster::builder().spool(spool.clone()).runner_args(&["--config", cfg.to_str().expect("utf8")]).start().await.expect("cluster");
    let mut c = tc.client();
    let keys = Keys::new(CLUSTER).expect("keys");
    let hold = qslice_proto::records::Hold { v: qslice_proto::records::RECORD_VERSION, node_id: "gone".into(), lease: 7, reason: "test".into(), since_unix_ms: 0 };
    c.put(keys.singleton_hold("notify"), hold.encode(), None).await.expect("hold");
    tc.start_runner(&n1).expect("runner");
    let r1 = tc.runner(&n1);
    wait_for_async(LONG, "the runner seeing the hold", || async { r1.log().contains("held back after the leader revoked") }).await.expect("held back");
    assert_eq!(holder(&c, "notify").await, None, "nobody claims a held-back singleton");
    assert!(beats(&out).is_empty(), "its command does not run");
    c.delete(keys.singleton_hold("notify"), None).await.expect("end the hold");
    wait_for_async(LONG, "the runner's command writing once the hold ended", || async { !beats(&out).is_empty() }).await.expect("taken over");
    assert_eq!(holder(&c, "notify").await.as_deref(), Some(n1.as_str()));
    drop(tc);
    nothing_left(&[&n1]).await;
}

/// One line a periodic command wrote: `<slot> <node> <ns>`.
fn slots(path: &Path) -> Vec<(u64, String, u128)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.first()?.parse().ok()?, f.get(1)?.to_string(), f.get(2)?.parse().ok()?))
        })
        .collect()
}

/// Runners `n1` and `n2` competing for the periodic singleton `digests`, which runs the
/// shell `script` every second (catching up to 30 missed slots, 5 s to stop).
async fn every_second(spool: &Spool, script: &str, n1: &str, n2: &str) -> TestCluster {
    let table = format!("command = [\"/bin/sh\", \"-c\", {}]\nschedule = \"* * * * * *\"\ntimezone = \"utc\"\ncatch_up = 30\nstop_timeout = \"5s\"\n", toml_str(script));
    let cfg = config(spool, "digests", &table);
    TestCluster::builder().spool(spool.clone()).runner_args(&["--config", cfg.to_str().expect("utf8")]).runners(&[n1, n2]).start().await.expect("cluster")
}

#[tokio::test]
async fn a_periodic_singleton_runs_each_slot_once_across_runners_and_stop_signals() {
    let (n1, n2) = (node("r1"), node("r2"));
    let spool = Spool::new(&[]).expect("spool");
    let out = spool.scratch("slots.log");
    // A run that is under way when its runner is told to stop ends by itself (it ignores
    // SIGTERM): the slot is settled and must not run again on the next holder.
    let script = format!("trap '' TERM; echo \"$QSLICE_SLOT $QSLICE_NODE $(date +%s%N)\" >> {}", out.display());
    let mut tc = every_second(&spool, &script, &n1, &n2).await;
    let c = tc.client();
    wait_for_async(LONG, "a few slots run", || async { slots(&out).len() >= 3 }).await.expect("running");
    // Stop the holder twice, each time with the other runner waiting: the slots go on.
    for round in 0..2 {
        let h = holder(&c, "digests").await.expect("held");
        let other = if h == n1 { n2.clone() } else { n1.clone() };
        tc.runner(&h).signal(Signal::SIGTERM).expect("SIGTERM");
        let status = tc.runner_mut(&h).wait_exit(LONG).expect("the holder exits");
        assert!(status.success(), "round {round}: {h} exited with {status}");
        let before = slots(&out).iter().filter(|s| s.1 == other).count();
        wait_for_async(LONG, &format!("round {round}: {other} running the slots"), || async { slots(&out).iter().filter(|s| s.1 == other).count() >= before + 3 })
            .await
            .expect("taken over");
        assert!(tc.runner(&h).log().contains("released the singleton"), "round {round}: the stopped holder says it released the singleton: {}", tc.runner(&h).log());
        tc.start_runner(&h).expect("restart");
        wait_for_async(LONG, &format!("round {round}: {h} registered again"), || tc.is_registered(&h)).await.expect("registered");
    }
    let seen = slots(&out);
    let mut by_slot: BTreeMap<u64, Vec<&(u64, String, u128)>> = BTreeMap::new();
    for s in &seen {
        by_slot.entry(s.0).or_default().push(s);
    }
    let twice: Vec<_> = by_slot.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(twice.is_empty(), "slots run more than once: {twice:?}");
    let (first, last) = (*by_slot.keys().next().expect("slots"), *by_slot.keys().last().expect("slots"));
    let missing: Vec<u64> = (first..=last).filter(|s| !by_slot.contains_key(s)).collect();
    assert!(missing.is_empty(), "slots between {first} and {last} that never ran: {missing:?}");
    for (slot, _, at_ns) in &seen {
        assert!(*at_ns >= u128::from(*slot) * 1_000_000_000, "slot {slot} ran before its time ({at_ns})");
    }
    let nodes: std::collections::BTreeSet<&str> = seen.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(nodes.len(), 2, "both runners ran slots: {nodes:?}");
    println!("{} slots from {first} to {last}, each run once, by {nodes:?}", by_slot.len());
    drop(tc);
    nothing_left(&[&n1, &n2]).await;
}

#[tokio::test]
async fn a_periodic_run_that_dies_of_qslices_stop_signal_runs_again_on_the_next_holder() {
    let (n1, n2) = (node("r1"), node("r2"));
    let spool = Spool::new(&[]).expect("spool");
    let out = spool.scratch("runs.log");
    // A long run that does not trap SIGTERM: a runner's graceful stop kills it mid-run.
    let script = format!("echo \"start $QSLICE_SLOT $QSLICE_NODE\" >> {0}; sleep 30; echo \"end $QSLICE_SLOT $QSLICE_NODE\" >> {0}", out.display());
    let mut tc = every_second(&spool, &script, &n1, &n2).await;
    let c = tc.client();
    let runs = || std::fs::read_to_string(&out).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>();
    wait_for_async(LONG, "a run under way", || async { !runs().is_empty() }).await.expect("running");
    let first = runs()[0].clone();
    let slot = first.split_whitespace().nth(1).expect("slot").to_owned();
    let h = holder(&c, "digests").await.expect("held");
    let other = if h == n1 { n2.clone() } else { n1.clone() };
    tc.runner(&h).signal(Signal::SIGTERM).expect("SIGTERM");
    let status = tc.runner_mut(&h).wait_exit(LONG).expect("the holder exits");
    assert!(status.success(), "{h} exited with {status}");
    let again = format!("start {slot} {other}");
    wait_for_async(LONG, &format!("slot {slot} run again by {other}"), || async { runs().contains(&again) })
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", runs(), tc.runner(&h).log()));
    assert!(tc.runner(&h).log().contains("its run was cut off, not failed"), "{}", tc.runner(&h).log());
    drop(tc);
    nothing_left(&[&n1, &n2]).await;
}

#[tokio::test]
async fn a_frozen_holders_command_is_killed_at_its_fence_deadline_before_another_runner_takes_over() {
    let (n1, n2) = (node("r1"), node("r2"));
    let spool = Spool::new(&[]).expect("spool");
    let out = spool.scratch("beats.log");
    let cfg = config(&spool, "notify", &heartbeat_table(&out));
    // r2 starts once r1 holds the singleton, so r1 is the holder.
    let mut tc = TestCluster::builder().spool(spool.clone()).runner_args(&["--config", cfg.to_str().expect("utf8")]).runners(&[&n1]).start().await.expect("cluster");
    let c = tc.client();
    wait_for_async(LONG, "r1 running the singleton", || async { beats(&out).len() >= 5 }).await.expect("running");
    tc.start_runner(&n2).expect("r2");
    wait_for_async(LONG, "r2 registered", || tc.is_registered(&n2)).await.expect("registered");
    let old_pid = writers(&beats(&out))[0].1;
    // qslice-runner alone freezes (hung in a stuck call, say); its command runs on until
    // the leash kills it.
    let freezer = Freezer::new().expect("freezer");
    freezer.add(&[tc.runner(&n1).pid().expect("pid")]).expect("add");
    freezer.freeze().expect("freeze");
    let frozen = Instant::now();
    wait_for_async(LONG, "r2 holding the singleton", || async { holder(&c, "notify").await.as_deref() == Some(n2.as_str()) }).await.expect("taken over");
    let held_after = frozen.elapsed();
    assert!(!qslice_tests::process_alive(old_pid), "the frozen holder's command ({old_pid}) still runs when r2 holds the singleton");
    assert!(pids_with_env(&format!("QSLICE_NODE={n1}")).is_empty(), "processes of the frozen holder are left");
    wait_for_async(LONG, "r2's command writing", || async { beats(&out).iter().any(|b| b.node == n2) }).await.expect("r2 runs it");
    // Thawed, r1 finds its fence tripped, registers again and waits: r2 keeps the singleton.
    freezer.thaw().expect("thaw");
    let r1 = tc.runner(&n1);
    wait_for_async(LONG, "r1 registered again", || async { r1.log().matches(&format!("registered node={n1}")).count() >= 2 }).await.expect("re-registered");
    let seen = beats(&out).len();
    wait_for_async(LONG, "r2's command writing on", || async { beats(&out).len() >= seen + 10 }).await.expect("running on");
    let all = beats(&out);
    assert_no_overlap(&all);
    let w = writers(&all);
    assert_eq!(w.last().map(|w| w.0.as_str()), Some(n2.as_str()), "r2 runs it after the thaw: {w:?}");
    assert!(r1.log().contains("leash") && r1.log().contains("killed"), "the leash says what it did: {}", r1.log());
    println!("froze the holder; the other runner held the singleton {held_after:?} later (TTL {TTL:?}); writers {w:?}");
    drop(freezer);
    drop(tc);
    nothing_left(&[&n1, &n2]).await;
}

/// `GET /api/status` over HTTP/1.0 as JSON, if it answers 200.
fn api_status(addr: &str) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    stream.write_all(format!("GET /api/status HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| serde_json::from_str(body).ok()).flatten()
}

/// The holder of singleton `name` in an `/api/status` answer.
fn dashboard_holder(status: &serde_json::Value, name: &str) -> Option<String> {
    status["singletons"].as_array()?.iter().find(|s| s["name"] == name)?["holder"].as_str().map(str::to_owned)
}

/// `qslicectl status` against `admin`: its stdout.
fn ctl_status(admin: &str) -> String {
    let out = std::process::Command::new(qslice_tests::qslice_bin("qslicectl").expect("built"))
        .args(["--coordinator", admin, "status"])
        .env_remove("QSLICE_TOKEN")
        .output()
        .expect("run qslicectl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The HELD BY column of singleton `name` in `qslicectl status`'s SINGLETONS table.
fn ctl_holder(text: &str, name: &str) -> Option<String> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with("SINGLETON "));
    lines.next()?;
    lines.take_while(|l| !l.trim().is_empty()).map(|l| l.split_whitespace().collect::<Vec<_>>()).find(|f| f.first() == Some(&name)).and_then(|f| f.get(1).map(|h| (*h).to_owned()))
}

#[tokio::test]
async fn status_and_the_dashboard_show_who_runs_each_singleton_and_follow_a_takeover() {
    let (n1, n2) = (node("r1"), node("r2"));
    let spool = Spool::new(&[]).expect("spool");
    let out = spool.scratch("slots.log");
    let script = format!("echo \"$QSLICE_SLOT $QSLICE_NODE $(date +%s%N)\" >> {}", out.display());
    let table = format!("command = [\"/bin/sh\", \"-c\", {}]\nschedule = \"* * * * * *\"\ntimezone = \"utc\"\n", toml_str(&script));
    let cfg = config(&spool, "digests", &table);
    let mut tc = TestCluster::builder()
        .spool(spool.clone())
        .coordinators(1)
        .dashboards()
        .runner_args(&["--config", cfg.to_str().expect("utf8")])
        .runners(&[&n1, &n2])
        .start()
        .await
        .expect("cluster");
    let c = tc.client();
    let (admin, http) = (tc.coordinator("c1").admin.clone(), tc.coordinator("c1").http.clone().expect("dashboard"));
    wait_for_async(LONG, "a slot run", || async { !slots(&out).is_empty() }).await.expect("running");
    let first = holder(&c, "digests").await.expect("held");
    let other = if first == n1 { n2.clone() } else { n1.clone() };
    let mut text = String::new();
    wait_for_async(LONG, "qslicectl status naming the holder and a settled slot", || {
        text = ctl_status(&admin);
        let shown = ctl_holder(&text, "digests").as_deref() == Some(first.as_str()) && text.lines().any(|l| l.starts_with("digests ") && l.ends_with(" ok"));
        async move { shown }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {text}"));
    wait_for_async(LONG, "the dashboard naming the holder", || async { api_status(&http).and_then(|s| dashboard_holder(&s, "digests")).as_deref() == Some(first.as_str()) })
        .await
        .expect("dashboard");
    tc.runner_mut(&first).kill();
    wait_for_async(LONG, "qslicectl status naming the new holder", || {
        text = ctl_status(&admin);
        let shown = ctl_holder(&text, "digests").as_deref() == Some(other.as_str());
        async move { shown }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {text}"));
    wait_for_async(LONG, "the dashboard naming the new holder", || async { api_status(&http).and_then(|s| dashboard_holder(&s, "digests")).as_deref() == Some(other.as_str()) })
        .await
        .expect("dashboard");
    // The page draws what /api/status says (where headless Chromium is installed).
    let chromium = std::env::var("QSLICE_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if Path::new(&chromium).exists() {
        let profile = tempfile::Builder::new().prefix("qslice-chromium-").tempdir().expect("profile dir");
        let mut dom = String::new();
        let drawn = format!("data-singleton=\"digests\" data-holder=\"{other}\"");
        wait_for_async(LONG, "the page to draw the singleton and its holder", || {
            dom = dump_dom(&chromium, &format!("http://{http}/"), profile.path()).unwrap_or_default();
            let shown = dom.contains(&drawn);
            async move { shown }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; last DOM:\n{dom}"));
    } else {
        eprintln!("{chromium} not installed: the page's singleton list is checked through /api/status only");
    }
    println!("{text}");
    drop(tc);
    nothing_left(&[&n1, &n2]).await;
}

/// Loads `url` in headless Chromium, lets the page run for a few (virtual) seconds, and
/// returns the DOM. Chromium runs in its own process group, killed if it hangs.
fn dump_dom(chromium: &str, url: &str, profile: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        .args(["--disable-sync", "--no-first-run", "--disable-crash-reporter", "--virtual-time-budget=4000"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()?;
    let mut out = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let exited = qslice_tests::wait::Wait::new(LONG, "chromium to finish").every(Duration::from_millis(50)).poll(|| Ok(child.try_wait()?));
    if let Err(e) = exited {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
        return Err(e);
    }
    Ok(reader.join().unwrap_or_default())
}
